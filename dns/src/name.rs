//! What a query name means inside the `ferry.` zone.
//!
//! The zone has a fixed shape, so names are parsed rather than looked up in a tree:
//!
//! ```text
//! ferry.                          apex (SOA)
//! service.ferry.                  empty non-terminal
//! NAME.service.ferry.             a service: A, AAAA, SRV
//! TAG.NAME.service.ferry.         the service's instances whose `version` is TAG
//! vip.ferry.                      empty non-terminal
//! NAME.vip.ferry.                 the service's virtual IP
//! addr.ferry.                     empty non-terminal
//! HEX.addr.ferry.                 an IP address spelled in hex, the target of SRV records
//! ```
//!
//! Everything else under `ferry.` does not exist (NXDOMAIN); names outside it are not ours
//! (REFUSED), except to an intercepting server, which is the app's only resolver: there
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
/// The longest service name: one DNS label (RFC 1035 section 2.3.4).
const MAX_LABEL: usize = 63;

/// A query name, classified by the part of the zone it falls in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MeshName {
    /// Not under `ferry.`: another server's business.
    OutOfZone,
    /// `ferry.` itself.
    Apex,
    /// A name that exists only because names below it do (`service.ferry.`, `vip.ferry.`,
    /// `addr.ferry.`).
    EmptyNonTerminal,
    /// `NAME.service.ferry.` or `TAG.NAME.service.ferry.`.
    Service {
        /// The service name, a valid DNS label.
        name: String,
        /// The `version` that instances must carry, when the name had a tag label.
        tag: Option<String>,
    },
    /// `NAME.vip.ferry.`: the service's virtual IP.
    Vip {
        /// The service name, a valid DNS label.
        name: String,
    },
    /// `HEX.addr.ferry.`, decoded.
    Addr(IpAddr),
    /// Under `ferry.` but not a name the zone can have.
    NotFound,
}

impl MeshName {
    /// Classifies `name`.
    pub(crate) fn parse(name: &LowerName) -> Self {
        // Labels from the right: the zone first, then what sits under it.
        let mut labels = name.iter().rev();
        if labels.next() != Some(ZONE_LABEL) {
            return Self::OutOfZone;
        }
        let Some(kind) = labels.next() else {
            return Self::Apex;
        };
        let rest: Vec<&[u8]> = labels.collect();
        match (kind, rest.as_slice()) {
            (SERVICE_LABEL | VIP_LABEL | ADDR_LABEL, []) => Self::EmptyNonTerminal,
            (SERVICE_LABEL, [service]) => Self::service(service, None),
            (SERVICE_LABEL, [service, tag]) => Self::service(service, Some(tag)),
            (VIP_LABEL, [service]) => service_name(service).map_or(Self::NotFound, |name| Self::Vip { name }),
            (ADDR_LABEL, [hex]) => decode_addr(hex).map_or(Self::NotFound, Self::Addr),
            _ => Self::NotFound,
        }
    }

    fn service(name: &[u8], tag: Option<&[u8]>) -> Self {
        let Some(name) = service_name(name) else {
            return Self::NotFound;
        };
        let tag = match tag.map(std::str::from_utf8) {
            None => None,
            Some(Ok(tag)) => Some(tag.to_owned()),
            // A version label is a string; bytes that are not UTF-8 can never match one.
            Some(Err(_)) => return Self::NotFound,
        };
        Self::Service { name, tag }
    }
}

/// The mesh service that `name`, outside `ferry.`, may stand for when the server is the app's
/// only resolver: the bare `NAME.`, or `NAME`, `NAME.service.ferry` or `NAME.vip.ferry` under
/// one of the `search` domains. A resolver walking its search list asks the latter spellings
/// first (`catalog.default.svc.cluster.local.` for `catalog`); whether NAME is a service is for
/// the directory to say.
pub(crate) fn outside_service(name: &LowerName, search: &[LowerName]) -> Option<String> {
    let labels: Vec<&[u8]> = name.iter().collect();
    if let [bare] = labels.as_slice() {
        return service_name(bare);
    }
    search.iter().filter(|domain| !domain.is_root() && domain.zone_of(name)).find_map(|domain| {
        // `iter().count()`, not `num_labels()`, which leaves out a leading `*`.
        let under = labels.len().checked_sub(domain.iter().count())?;
        match &labels[..under] {
            [service] | [service, SERVICE_LABEL | VIP_LABEL, ZONE_LABEL] => service_name(service),
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

/// The `HEX.addr.ferry.` name of `ip`: 8 lowercase hex digits for IPv4, 32 for IPv6.
pub(crate) fn addr_name(ip: IpAddr) -> Name {
    let hex = match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    };
    // Built from hex digits and fixed labels, so the name is always valid.
    Name::from_labels([hex.as_bytes(), ADDR_LABEL, ZONE_LABEL]).expect("hex digits and fixed labels form a valid name")
}

/// Decodes the hex label of an `addr.ferry.` name; `None` unless it is exactly 8 or 32 hex digits.
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

    /// Parses `name` as it could arrive on the wire: any bytes in a label, even those a host
    /// name may not hold ('_', '+').
    fn parse(name: &str) -> MeshName {
        let labels = name.split('.').filter(|label| !label.is_empty()).map(str::as_bytes);
        let name = Name::from_labels(labels).expect("test names are valid");
        MeshName::parse(&LowerName::new(&name))
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
        outside_service(&lower(name), &search)
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
        assert_eq!(parse("."), MeshName::OutOfZone);
        assert_eq!(parse("example.com."), MeshName::OutOfZone);
        assert_eq!(parse("catalog.service.ferry.com."), MeshName::OutOfZone);
        assert_eq!(parse("xferry."), MeshName::OutOfZone);
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
            let name = addr_name(ip);
            assert_eq!(MeshName::parse(&LowerName::new(&name)), MeshName::Addr(ip), "{name}");
        }
        assert_eq!(addr_name(IpAddr::from([10, 0, 0, 1])).to_ascii(), "0a000001.addr.ferry.");
        assert_eq!(addr_name("::1".parse().expect("valid")).to_ascii(), format!("{:032x}.addr.ferry.", 1));
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
