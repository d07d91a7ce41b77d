//! What a query name means inside the `ferry.` zone or one of its aliases.
//!
//! The zone has a fixed shape, so names are parsed rather than looked up in a tree:
//!
//! ```text
//! ferry.                          apex (SOA)
//! service.ferry.                  empty non-terminal
//! NAME.service.ferry.             a service: A, AAAA, SRV
//! TAG.NAME.service.ferry.         the service's instances whose `version` (or a tag) is TAG
//! vip.ferry.                      empty non-terminal
//! NAME.vip.ferry.                 the service's virtual IP
//! addr.ferry.                     empty non-terminal
//! HEX.addr.ferry.                 an IP address spelled in hex, the target of SRV records
//! ```
//!
//! An alias domain such as `consul.` has the same shape under its own name, and one more form,
//! Consul's RFC 2782 spelling: `_NAME._tcp.service.consul.` is `NAME.service.consul.`, and
//! `_NAME._TAG.service.consul.` (any other protocol label) is `TAG.NAME.service.consul.`.
//!
//! Everything else under a domain does not exist (NXDOMAIN); names outside every domain are not
//! ours (REFUSED), except to an intercepting server, which is the app's only resolver: there
//! [`outside_service`] tells which of them may be a mesh service's name (the bare `NAME.` and
//! its search-domain spellings). Parsing works on hickory's [`LowerName`], so names are already
//! case-folded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{LowerName, Name};

/// The label of Ferry's zone, `ferry.`.
pub(crate) const ZONE_LABEL: &[u8] = b"ferry";
/// The label under which services live, `service.ferry.`.
const SERVICE_LABEL: &[u8] = b"service";
/// The label under which services' virtual IPs live, `vip.ferry.`.
const VIP_LABEL: &[u8] = b"vip";
/// The label under which hex-encoded addresses live, `addr.ferry.`.
const ADDR_LABEL: &[u8] = b"addr";
/// The protocol label of the RFC 2782 form that stands for no tag, as Consul reads it.
const TCP_LABEL: &[u8] = b"tcp";
/// The longest service name: one DNS label (RFC 1035 section 2.3.4).
const MAX_LABEL: usize = 63;

/// A query name under one of the server's domains, classified by the part of it the name falls
/// in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MeshName {
    /// The domain itself, `ferry.` or an alias.
    Apex,
    /// A name that exists only because names below it do (`service.ferry.`, `vip.ferry.`,
    /// `addr.ferry.`).
    EmptyNonTerminal,
    /// `NAME.service.ferry.` or `TAG.NAME.service.ferry.` (or an alias's RFC 2782 spelling).
    Service {
        /// The service name, a valid DNS label.
        name: String,
        /// The `version` (or tag) that instances must carry, when the name had a tag label.
        tag: Option<String>,
    },
    /// `NAME.vip.ferry.`: the service's virtual IP.
    Vip {
        /// The service name, a valid DNS label.
        name: String,
    },
    /// `HEX.addr.ferry.`, decoded.
    Addr(IpAddr),
    /// Under the domain but not a name the zone can have.
    NotFound,
}

impl MeshName {
    /// Classifies `name` under the domain `origin`; `None` when `name` is not under it.
    /// `rfc2782` admits the `_NAME._PROTO.service.` form, which only aliases have.
    pub(crate) fn parse(name: &LowerName, origin: &LowerName, rfc2782: bool) -> Option<Self> {
        if !origin.zone_of(name) {
            return None;
        }
        let labels: Vec<&[u8]> = name.iter().collect();
        // `iter().count()`, not `num_labels()`, which leaves out a leading `*`.
        let under = labels.len().checked_sub(origin.iter().count())?;
        // Labels from the right: what sits under the domain, then under that.
        let mut labels = labels[..under].iter().rev().copied();
        let Some(kind) = labels.next() else {
            return Some(Self::Apex);
        };
        let rest: Vec<&[u8]> = labels.collect();
        Some(match (kind, rest.as_slice()) {
            (SERVICE_LABEL | VIP_LABEL | ADDR_LABEL, []) => Self::EmptyNonTerminal,
            (SERVICE_LABEL, [service]) => Self::service(service, None),
            (SERVICE_LABEL, [proto, service]) if rfc2782 && proto.starts_with(b"_") && service.starts_with(b"_") => {
                // `_tcp` is the protocol every instance speaks; any other is a tag, as Consul has it.
                let tag = Some(&proto[1..]).filter(|tag| *tag != TCP_LABEL);
                Self::service(&service[1..], tag)
            }
            (SERVICE_LABEL, [service, tag]) => Self::service(service, Some(tag)),
            (VIP_LABEL, [service]) => service_name(service).map_or(Self::NotFound, |name| Self::Vip { name }),
            (ADDR_LABEL, [hex]) => decode_addr(hex).map_or(Self::NotFound, Self::Addr),
            _ => Self::NotFound,
        })
    }

    fn service(name: &[u8], tag: Option<&[u8]>) -> Self {
        let Some(name) = service_name(name) else {
            return Self::NotFound;
        };
        let tag = match tag.map(std::str::from_utf8) {
            None => None,
            Some(Ok(tag)) if !tag.is_empty() => Some(tag.to_owned()),
            // A version label or tag is a non-empty string; bytes that are not UTF-8 can never
            // match one.
            Some(_) => return Self::NotFound,
        };
        Self::Service { name, tag }
    }
}

/// The mesh service that `name`, outside every domain of the server, may stand for when the
/// server is the app's only resolver: the bare `NAME.`, or `NAME`, `NAME.service.DOMAIN` or
/// `NAME.vip.DOMAIN` under one of the `search` domains, for DOMAIN among `origins` (`ferry` and
/// the aliases). A resolver walking its search list asks the latter spellings first
/// (`catalog.default.svc.cluster.local.` for `catalog`); whether NAME is a service is for the
/// directory to say.
pub(crate) fn outside_service(name: &LowerName, search: &[LowerName], origins: &[&LowerName]) -> Option<String> {
    let labels: Vec<&[u8]> = name.iter().collect();
    if let [bare] = labels.as_slice() {
        return service_name(bare);
    }
    search.iter().filter(|domain| !domain.is_root() && domain.zone_of(name)).find_map(|domain| {
        let under = labels.len().checked_sub(domain.iter().count())?;
        match &labels[..under] {
            [service] => service_name(service),
            [service, SERVICE_LABEL | VIP_LABEL, origin @ ..]
                if origins.iter().any(|known| known.iter().eq(origin.iter().copied())) =>
            {
                service_name(service)
            }
            _ => None,
        }
    })
}

/// `label` as a service name, when it is one.
fn service_name(label: &[u8]) -> Option<String> {
    // `is_service_label` admits only ASCII, so the conversion cannot lose anything.
    is_service_label(label).then(|| String::from_utf8_lossy(label).into_owned())
}

/// Whether `label` is a service name: 1 to 63 lowercase letters, digits and inner '-', the
/// same rule the registry applies when instances register.
pub(crate) fn is_service_label(label: &[u8]) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL
        && label.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && label.first() != Some(&b'-')
        && label.last() != Some(&b'-')
}

/// `ferry.`, the name of Ferry's own zone.
pub(crate) fn ferry() -> Name {
    Name::from_labels([ZONE_LABEL]).expect("`ferry` is a valid label")
}

/// The `HEX.addr.ORIGIN.` name of `ip`: 8 lowercase hex digits for IPv4, 32 for IPv6. `None`
/// only when the name would be too long, which [`crate::AliasDomain`] rules out for every domain
/// the server answers.
pub(crate) fn addr_name(ip: IpAddr, origin: &Name) -> Option<Name> {
    let hex = match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    };
    Name::from_labels([hex.as_bytes(), ADDR_LABEL]).ok()?.append_domain(origin).ok()
}

/// Decodes the hex label of an `addr.` name; `None` unless it is exactly 8 or 32 hex digits.
fn decode_addr(label: &[u8]) -> Option<IpAddr> {
    // `from_str_radix` alone would also accept a leading '+'.
    if !label.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let hex = std::str::from_utf8(label).ok()?;
    match hex.len() {
        8 => u32::from_str_radix(hex, 16).ok().map(|bits| IpAddr::V4(Ipv4Addr::from(bits))),
        32 => u128::from_str_radix(hex, 16).ok().map(|bits| IpAddr::V6(Ipv6Addr::from(bits))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name` as it could arrive on the wire: any bytes in a label, even those a host name may
    /// not hold ('_', '+').
    fn wire(name: &str) -> LowerName {
        let labels = name.split('.').filter(|label| !label.is_empty()).map(str::as_bytes);
        LowerName::new(&Name::from_labels(labels).expect("test names are valid"))
    }

    /// Parses `name` under `ferry.`, where it must be.
    fn parse(name: &str) -> MeshName {
        parse_under(name, "ferry.").unwrap_or_else(|| panic!("{name} is under ferry."))
    }

    /// Parses `name` under `domain`, with the RFC 2782 form for any domain but `ferry.`, as the
    /// server does.
    fn parse_under(name: &str, domain: &str) -> Option<MeshName> {
        let origin = Name::from_ascii(domain).expect("test domains are valid");
        MeshName::parse(&wire(name), &LowerName::new(&origin), origin != ferry())
    }

    fn service(name: &str, tag: Option<&str>) -> MeshName {
        MeshName::Service { name: name.to_owned(), tag: tag.map(str::to_owned) }
    }

    #[test]
    fn services_with_and_without_tag() {
        assert_eq!(parse("catalog.service.ferry."), service("catalog", None));
        assert_eq!(parse("v2.catalog.service.ferry."), service("catalog", Some("v2")));
        assert_eq!(parse("my-svc-2.service.ferry."), service("my-svc-2", None));
    }

    #[test]
    fn names_are_case_insensitive() {
        assert_eq!(parse("CataLog.SERVICE.Ferry."), service("catalog", None));
        assert_eq!(parse("V2.catalog.service.ferry."), service("catalog", Some("v2")));
        assert_eq!(parse("0A000001.ADDR.ferry."), MeshName::Addr(IpAddr::from([10, 0, 0, 1])));
    }

    #[test]
    fn zone_structure() {
        assert_eq!(parse("ferry."), MeshName::Apex);
        assert_eq!(parse("service.ferry."), MeshName::EmptyNonTerminal);
        assert_eq!(parse("addr.ferry."), MeshName::EmptyNonTerminal);
        assert_eq!(parse("vip.ferry."), MeshName::EmptyNonTerminal);
        assert_eq!(parse("www.ferry."), MeshName::NotFound);
        assert_eq!(parse("v2.catalog.vip.ferry."), MeshName::NotFound);
        assert_eq!(parse("a.b.catalog.service.ferry."), MeshName::NotFound);
        assert_eq!(parse("x.0a000001.addr.ferry."), MeshName::NotFound);
    }

    #[test]
    fn vip_names() {
        let vip = |name: &str| MeshName::Vip { name: name.to_owned() };
        assert_eq!(parse("catalog.vip.ferry."), vip("catalog"));
        assert_eq!(parse("Catalog.VIP.ferry."), vip("catalog"));
        assert_eq!(parse("cat_alog.vip.ferry."), MeshName::NotFound);
        assert_eq!(parse("-catalog.vip.ferry."), MeshName::NotFound);
    }

    fn outside(name: &str, search: &[&str]) -> Option<String> {
        let lower = |name: &str| LowerName::new(&Name::from_ascii(name).expect("test names are valid"));
        let search: Vec<LowerName> = search.iter().map(|domain| lower(domain)).collect();
        let origins = [lower("ferry."), lower("consul.")];
        outside_service(&lower(name), &search, &origins.iter().collect::<Vec<_>>())
    }

    #[test]
    fn bare_names_and_search_spellings_may_be_services() {
        let search = ["default.svc.cluster.local.", "svc.cluster.local.", "cluster.local."];
        let catalog = Some("catalog".to_owned());
        assert_eq!(outside("catalog.", &[]), catalog);
        assert_eq!(outside("Catalog.", &search), catalog);
        assert_eq!(outside("catalog.default.svc.cluster.local.", &search), catalog);
        assert_eq!(outside("catalog.svc.cluster.local.", &search), catalog);
        assert_eq!(outside("CATALOG.Cluster.Local.", &search), catalog);
        assert_eq!(outside("catalog.service.ferry.default.svc.cluster.local.", &search), catalog);
        assert_eq!(outside("catalog.vip.ferry.cluster.local.", &search), catalog);
        assert_eq!(outside("catalog.service.consul.default.svc.cluster.local.", &search), catalog);
        assert_eq!(outside("Catalog.Service.Consul.svc.cluster.local.", &search), catalog);
    }

    #[test]
    fn other_names_outside_the_zone_are_no_services() {
        let search = ["default.svc.cluster.local.", "example.com."];
        for name in [
            "example.com.",
            "www.example.org.",
            "default.svc.cluster.local.",
            "a.b.example.com.",
            "v2.catalog.service.ferry.example.com.",
            "catalog.other.ferry.example.com.",
            "catalog.service.other.example.com.",
            "_catalog._tcp.service.consul.example.com.",
            "cat_alog.",
            "cat_alog.example.com.",
            "catalog.local.",
        ] {
            assert_eq!(outside(name, &search), None, "{name}");
        }
        assert_eq!(outside("catalog.example.com.", &["."]), None, "the root is no search domain");
    }

    #[test]
    fn outside_the_zone_is_refused() {
        for name in [".", "example.com.", "catalog.service.ferry.com.", "xferry.", "catalog.service.consul."] {
            assert_eq!(parse_under(name, "ferry."), None, "{name}");
        }
        for name in ["ferry.", "catalog.service.ferry.", "catalog.service.xconsul.", "consul.com.", "."] {
            assert_eq!(parse_under(name, "consul."), None, "{name}");
        }
        assert_eq!(parse_under("catalog.service.consul.", "dc1.consul."), None);
    }

    #[test]
    fn aliases_have_the_shape_of_ferry() {
        assert_eq!(parse_under("consul.", "consul."), Some(MeshName::Apex));
        assert_eq!(parse_under("Service.Consul.", "consul."), Some(MeshName::EmptyNonTerminal));
        assert_eq!(parse_under("catalog.service.consul.", "consul."), Some(service("catalog", None)));
        assert_eq!(parse_under("V2.CataLog.SERVICE.Consul.", "consul."), Some(service("catalog", Some("v2"))));
        assert_eq!(parse_under("primary.catalog.service.consul.", "consul."), Some(service("catalog", Some("primary"))));
        assert_eq!(parse_under("catalog.vip.consul.", "consul."), Some(MeshName::Vip { name: "catalog".to_owned() }));
        assert_eq!(parse_under("0a000001.addr.consul.", "consul."), Some(MeshName::Addr(IpAddr::from([10, 0, 0, 1]))));
        assert_eq!(parse_under("catalog.service.dc1.consul.", "dc1.consul."), Some(service("catalog", None)));
        assert_eq!(parse_under("www.consul.", "consul."), Some(MeshName::NotFound));
        assert_eq!(parse_under("a.b.catalog.service.consul.", "consul."), Some(MeshName::NotFound));
        // Under `consul.`, a datacenter label is not a kind of name the zone has.
        assert_eq!(parse_under("catalog.service.dc1.consul.", "consul."), Some(MeshName::NotFound));
    }

    #[test]
    fn rfc_2782_names_under_an_alias() {
        let parse = |name| parse_under(name, "consul.");
        assert_eq!(parse("_catalog._tcp.service.consul."), Some(service("catalog", None)));
        assert_eq!(parse("_CataLog._TCP.Service.CONSUL."), Some(service("catalog", None)));
        assert_eq!(parse("_catalog._v2.service.consul."), Some(service("catalog", Some("v2"))));
        assert_eq!(parse("_catalog._udp.service.consul."), Some(service("catalog", Some("udp"))));
        for name in [
            "_catalog.service.consul.",
            "_catalog._.service.consul.",
            "__catalog._tcp.service.consul.",
            "_cat_alog._tcp.service.consul.",
            "catalog._tcp.service.consul.",
            "_catalog._tcp.consul.",
            "_catalog._tcp.vip.consul.",
            "x._catalog._tcp.service.consul.",
        ] {
            assert_eq!(parse(name), Some(MeshName::NotFound), "{name}");
        }
        // One underscore label is the ordinary TAG.NAME form, whatever the tag.
        assert_eq!(parse("_catalog.tcp.service.consul."), Some(service("tcp", Some("_catalog"))));
        // `ferry.` keeps its own names only.
        assert_eq!(parse_under("_catalog._tcp.service.ferry.", "ferry."), Some(MeshName::NotFound));
    }

    #[test]
    fn invalid_service_labels_do_not_exist() {
        for name in
            ["-catalog.service.ferry.", "catalog-.service.ferry.", "cat_alog.service.ferry.", "_catalog._tcp.service.ferry."]
        {
            assert_eq!(parse(name), MeshName::NotFound, "{name}");
        }
        assert!(is_service_label(&[b'a'; 63]));
        assert!(!is_service_label(&[b'a'; 64]));
        assert!(!is_service_label(b""));
    }

    #[test]
    fn addr_names_round_trip() {
        for ip in ["10.0.0.1", "127.0.0.1", "255.255.255.255", "::1", "fd00::1:2", "2001:db8::ff00:42:8329"] {
            let ip: IpAddr = ip.parse().expect("test addresses are valid");
            let name = addr_name(ip, &ferry()).expect("fits");
            assert_eq!(parse(&name.to_ascii()), MeshName::Addr(ip), "{name}");
        }
        assert_eq!(
            addr_name(IpAddr::from([10, 0, 0, 1]), &ferry()).map(|n| n.to_ascii()).as_deref(),
            Some("0a000001.addr.ferry.")
        );
        let v6 = addr_name("::1".parse().expect("valid"), &ferry()).map(|n| n.to_ascii());
        assert_eq!(v6, Some(format!("{:032x}.addr.ferry.", 1)));
        let consul = Name::from_ascii("consul.").expect("valid");
        let under_consul = addr_name(IpAddr::from([10, 0, 0, 1]), &consul).map(|n| n.to_ascii());
        assert_eq!(under_consul.as_deref(), Some("0a000001.addr.consul."));
    }

    #[test]
    fn malformed_addr_labels_do_not_exist() {
        for name in [
            "0a00001.addr.ferry.",
            "0a0000011.addr.ferry.",
            "+a000001.addr.ferry.",
            "0g000001.addr.ferry.",
            "10-0-0-1.addr.ferry.",
        ] {
            assert_eq!(parse(name), MeshName::NotFound, "{name}");
        }
    }
}
