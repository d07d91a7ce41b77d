//! Building the records of a response from what the directory holds.
//!
//! Everything here is synchronous and deterministic (the rotation offset is an argument), so the
//! shape of every answer is unit-tested without sockets. One [`Zone`] stands for each domain the
//! server answers, `ferry.` and every alias, with that domain's SOA and `addr.` names. An intercepting server also relays
//! upstream answers ([`Answer::relayed`]) in the same shape.
//!
//! Negative answers follow RFC 2308: NXDOMAIN (the name does not exist) and NODATA (the name
//! exists, the type does not) both carry the zone's SOA in the authority section, and a resolver
//! caches them for `min(SOA TTL, SOA MINIMUM)`; both are set to [`DnsConfig::negative_ttl`] so a
//! service that appears is seen within that bound.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{
        LowerName, Name, RData, Record, RecordType,
        rdata::{A, AAAA, SOA, SRV},
    },
};

use crate::{
    AliasDomain, DnsConfig, DnsEndpoint, ZoneKind,
    name::{self, MeshName},
};

/// SRV priority and weight of every endpoint: all are equal, the client picks among them.
const SRV_PRIORITY: u16 = 1;
const SRV_WEIGHT: u16 = 1;
/// SOA timers. Nothing transfers this zone, so only `minimum` (and the SOA's TTL) matter; these
/// are the usual values so tools that print them do not look alarming.
const SOA_SERIAL: u32 = 1;
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86_400;

/// An endpoint address that is neither an IP literal nor a valid host name.
#[derive(Debug, thiserror::Error)]
#[error("endpoint address {0:?} is neither an IP literal nor a host name")]
pub(crate) struct InvalidAddress(String);

/// The sections and code of one response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub(crate) code: ResponseCode,
    /// Whether this server is the authority for the name (the AA bit).
    pub(crate) authoritative: bool,
    /// The AD bit: set only when relayed from an upstream that set it.
    pub(crate) authentic_data: bool,
    pub(crate) answers: Vec<Record>,
    /// The zone's SOA in negative answers, or what an upstream put in its authority section.
    pub(crate) authorities: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
}

impl Answer {
    /// The name is outside every domain the server answers: it has no say about it.
    pub(crate) fn refused() -> Self {
        Self::error(ResponseCode::Refused)
    }

    /// The answer could not be worked out (the directory did not answer in time).
    pub(crate) fn servfail() -> Self {
        Self::error(ResponseCode::ServFail)
    }

    /// An upstream resolver's `response`, relayed as it came: code, AA and AD bits, and the
    /// three record sections (its OPT record is not among them: hickory decodes that apart).
    pub(crate) fn relayed(response: Message) -> Self {
        Self {
            code: response.metadata.response_code,
            authoritative: response.metadata.authoritative,
            authentic_data: response.metadata.authentic_data,
            answers: response.answers,
            authorities: response.authorities,
            additionals: response.additionals,
        }
    }

    fn error(code: ResponseCode) -> Self {
        Self {
            code,
            authoritative: false,
            authentic_data: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// One domain the server answers, `ferry.` or an alias: its names, SOA and TTLs.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    origin: Name,
    lower: LowerName,
    /// `ferry.` or an alias, which has Consul's RFC 2782 names too and matches tags its own way.
    kind: ZoneKind,
    ttl: u32,
    soa: Record,
}

impl Zone {
    /// `ferry.` as `config` shapes it.
    pub(crate) fn ferry(config: &DnsConfig) -> Self {
        Self::new(config, name::ferry(), ZoneKind::Ferry)
    }

    /// The alias `domain` as `config` shapes it.
    pub(crate) fn alias(config: &DnsConfig, domain: &AliasDomain) -> Self {
        Self::new(config, domain.name().clone(), ZoneKind::Alias)
    }

    fn new(config: &DnsConfig, origin: Name, kind: ZoneKind) -> Self {
        let negative_ttl = ttl_secs(config.negative_ttl);
        let rname = origin.prepend_label("hostmaster").expect("alias domains leave room for `hostmaster.`");
        let soa = SOA::new(origin.clone(), rname, SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, negative_ttl);
        let soa = Record::from_rdata(origin.clone(), negative_ttl, RData::SOA(soa));
        Self { lower: LowerName::new(&origin), origin, kind, ttl: ttl_secs(config.ttl), soa }
    }

    /// The domain's name.
    pub(crate) fn origin(&self) -> &LowerName {
        &self.lower
    }

    /// Whether the domain is `ferry.` or an alias.
    pub(crate) fn kind(&self) -> ZoneKind {
        self.kind
    }

    /// What `name` means in this zone; `None` when it is not under the domain.
    pub(crate) fn parse(&self, name: &LowerName) -> Option<MeshName> {
        MeshName::parse(name, &self.lower, self.kind == ZoneKind::Alias)
    }

    /// The name does not exist (RFC 2308 section 2.1).
    pub(crate) fn nxdomain(&self) -> Answer {
        Answer { code: ResponseCode::NXDomain, ..self.nodata() }
    }

    /// The name exists but has no records of the asked type (RFC 2308 section 2.2).
    pub(crate) fn nodata(&self) -> Answer {
        Answer { authorities: vec![self.soa.clone()], ..Self::records(Vec::new(), Vec::new()) }
    }

    fn records(answers: Vec<Record>, additionals: Vec<Record>) -> Answer {
        Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            authentic_data: false,
            answers,
            authorities: Vec::new(),
            additionals,
        }
    }

    /// The domain itself: its SOA, and nothing else.
    pub(crate) fn apex(&self, qtype: RecordType) -> Answer {
        match qtype {
            RecordType::SOA | RecordType::ANY => Self::records(vec![self.soa.clone()], Vec::new()),
            _ => self.nodata(),
        }
    }

    /// A name that stands for one address (`HEX.addr.DOMAIN.`, a service's virtual IP): A or
    /// AAAA by the address's family (and ANY), NODATA for every other type.
    pub(crate) fn address(&self, qname: &Name, qtype: RecordType, ip: IpAddr) -> Answer {
        let wanted =
            matches!((qtype, ip), (RecordType::A, IpAddr::V4(_)) | (RecordType::AAAA, IpAddr::V6(_)) | (RecordType::ANY, _));
        if !wanted {
            return self.nodata();
        }
        Self::records(vec![self.address_record(qname.clone(), ip)], Vec::new())
    }

    /// A service's virtual IP under a name outside `ferry.` (the bare `NAME.` or a search-domain
    /// spelling), which an intercepting server answers: as [`Zone::address`], but a NODATA
    /// carries no SOA. The SOA of `ferry.` would not be an ancestor of the name, so caches would
    /// drop it (RFC 2181 section 5.4.1 bailiwick rules), and no SOA of the search domain is ours
    /// to give; without one the absence is not cached (RFC 2308 section 5), which costs nothing
    /// on the app's own host.
    pub(crate) fn outside_address(&self, qname: &Name, qtype: RecordType, ip: IpAddr) -> Answer {
        Answer { authorities: Vec::new(), ..self.address(qname, qtype, ip) }
    }

    /// `[TAG.]NAME.service.DOMAIN.`: the service's routable `endpoints` (when `tag` is given,
    /// those it matches under this kind of domain, [`DnsEndpoint::matches_tag`]), rotated left
    /// by `rotation` so successive queries spread load.
    ///
    /// A and AAAA hold only IP endpoints (a host name has no address of ours to give); SRV holds
    /// every endpoint, its target the `addr.DOMAIN.` name of an IP (with that A/AAAA added) or
    /// the host name itself. ANY gets the A and AAAA records.
    pub(crate) fn service(
        &self,
        qname: &Name,
        qtype: RecordType,
        endpoints: &[DnsEndpoint],
        tag: Option<&str>,
        rotation: usize,
    ) -> Answer {
        let targets: Vec<(Target, u16)> = endpoints
            .iter()
            .filter(|endpoint| tag.is_none_or(|tag| endpoint.matches_tag(tag, self.kind)))
            .filter_map(|endpoint| match Target::parse(&endpoint.address) {
                Ok(target) => Some((target, endpoint.port)),
                Err(error) => {
                    tracing::debug!(%error, id = %endpoint.id, "endpoint left out of DNS");
                    None
                }
            })
            .collect();

        let answer = match qtype {
            RecordType::A => self.addresses(qname, &targets, rotation, IpAddr::is_ipv4),
            RecordType::AAAA => self.addresses(qname, &targets, rotation, IpAddr::is_ipv6),
            RecordType::ANY => self.addresses(qname, &targets, rotation, |_| true),
            RecordType::SRV => self.srv(qname, targets, rotation),
            _ => return self.nodata(),
        };
        if answer.answers.is_empty() { self.nodata() } else { answer }
    }

    /// One A/AAAA record per distinct address that `family` accepts: an RRset holds no
    /// duplicates (RFC 2181 section 5), and two instances may share a host.
    fn addresses(&self, qname: &Name, targets: &[(Target, u16)], rotation: usize, family: fn(&IpAddr) -> bool) -> Answer {
        let mut seen = HashSet::new();
        let mut ips: Vec<IpAddr> =
            targets.iter().filter_map(|(target, _)| target.ip()).filter(|ip| family(ip) && seen.insert(*ip)).collect();
        rotate(&mut ips, rotation);
        let answers = ips.into_iter().map(|ip| self.address_record(qname.clone(), ip)).collect();
        Self::records(answers, Vec::new())
    }

    fn srv(&self, qname: &Name, mut targets: Vec<(Target, u16)>, rotation: usize) -> Answer {
        rotate(&mut targets, rotation);
        let mut seen = HashSet::new();
        let mut answers = Vec::with_capacity(targets.len());
        let mut additionals = Vec::new();
        for (target, port) in targets {
            let target_name = match target {
                Target::Ip(ip) => {
                    let addr = name::addr_name(ip, &self.origin).expect("alias domains leave room for `HEX.addr.`");
                    if seen.insert(ip) {
                        additionals.push(self.address_record(addr.clone(), ip));
                    }
                    addr
                }
                Target::Host(host) => host,
            };
            let srv = SRV::new(SRV_PRIORITY, SRV_WEIGHT, port, target_name);
            answers.push(Record::from_rdata(qname.clone(), self.ttl, RData::SRV(srv)));
        }
        Self::records(answers, additionals)
    }

    fn address_record(&self, name: Name, ip: IpAddr) -> Record {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Record::from_rdata(name, self.ttl, rdata)
    }
}

/// Where an endpoint's address points.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Ip(IpAddr),
    Host(Name),
}

impl Target {
    fn parse(address: &str) -> Result<Self, InvalidAddress> {
        // Accept the bracketed form of IPv6 too, as URLs and socket addresses spell it.
        let literal = address.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(address);
        if let Ok(ip) = literal.parse::<IpAddr>() {
            // An IPv4-mapped IPv6 address is an IPv4 endpoint: answer it as A.
            return Ok(Self::Ip(ip.to_canonical()));
        }
        let invalid = || InvalidAddress(address.to_owned());
        if address.is_empty() || address.contains(':') {
            return Err(invalid());
        }
        let mut name = Name::from_ascii(address).map_err(|_| invalid())?;
        name.set_fqdn(true);
        Ok(Self::Host(name))
    }

    fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Ip(ip) => Some(*ip),
            Self::Host(_) => None,
        }
    }
}

/// Rotates `items` left by `by`, wrapping: the round robin of successive answers.
fn rotate<T>(items: &mut [T], by: usize) {
    if !items.is_empty() {
        let by = by % items.len();
        items.rotate_left(by);
    }
}

/// A TTL in whole seconds, saturating at the largest TTL RFC 2181 section 8 allows (2^31 - 1).
fn ttl_secs(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX).min(i32::MAX.unsigned_abs())
}

/// The IPv4 and IPv6 addresses in an answer section, in order; for tests.
#[cfg(test)]
pub(crate) fn addresses_of(records: &[Record]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(A(v4)) => Some(IpAddr::V4(*v4)),
            RData::AAAA(AAAA(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn zone() -> Zone {
        Zone::ferry(&DnsConfig { ttl: Duration::from_secs(7), negative_ttl: Duration::from_secs(3) })
    }

    fn endpoint(id: &str, address: &str, port: u16, version: Option<&str>) -> DnsEndpoint {
        DnsEndpoint {
            id: id.to_owned(),
            address: address.to_owned(),
            port,
            version: version.map(str::to_owned),
            tags: Vec::new(),
            has_tag_list: false,
        }
    }

    fn catalog() -> Vec<DnsEndpoint> {
        vec![
            endpoint("a", "10.0.0.1", 8080, Some("v1")),
            endpoint("b", "10.0.0.2", 8080, Some("v2")),
            endpoint("c", "fd00::3", 8080, Some("v2")),
            endpoint("d", "catalog-d.internal", 9090, Some("v2")),
            endpoint("e", "10.0.0.2", 8081, None),
        ]
    }

    fn qname() -> Name {
        Name::from_ascii("catalog.service.ferry.").expect("valid")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test addresses are valid")
    }

    fn soa_minimum(answer: &Answer) -> Option<u32> {
        match answer.authorities.as_slice() {
            [Record { data: RData::SOA(soa), .. }] => Some(soa.minimum),
            _ => None,
        }
    }

    #[test]
    fn a_holds_distinct_ipv4_endpoints_with_the_ttl() {
        let answer = zone().service(&qname(), RecordType::A, &catalog(), None, 0);
        assert_eq!(answer.code, ResponseCode::NoError);
        assert!(answer.authoritative);
        assert_eq!(addresses_of(&answer.answers), [ip("10.0.0.1"), ip("10.0.0.2")]);
        assert!(answer.answers.iter().all(|r| r.ttl == 7 && r.name == qname()));
        assert!(answer.authorities.is_empty());
    }

    #[test]
    fn a_rotates_with_the_offset() {
        let zone = zone();
        let endpoints: Vec<_> = (1..=3).map(|i| endpoint(&i.to_string(), &format!("10.0.0.{i}"), 80, None)).collect();
        let order = |rotation| addresses_of(&zone.service(&qname(), RecordType::A, &endpoints, None, rotation).answers);
        assert_eq!(order(0), [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]);
        assert_eq!(order(1), [ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.1")]);
        assert_eq!(order(5), [ip("10.0.0.3"), ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(order(3), order(0));
    }

    #[test]
    fn aaaa_holds_ipv6_endpoints() {
        let answer = zone().service(&qname(), RecordType::AAAA, &catalog(), None, 0);
        assert_eq!(addresses_of(&answer.answers), [ip("fd00::3")]);
    }

    #[test]
    fn tag_filters_on_version() {
        let answer = zone().service(&qname(), RecordType::A, &catalog(), Some("v2"), 0);
        assert_eq!(addresses_of(&answer.answers), [ip("10.0.0.2")]);
        let answer = zone().service(&qname(), RecordType::SRV, &catalog(), Some("v2"), 0);
        assert_eq!(answer.answers.len(), 3);
        let answer = zone().service(&qname(), RecordType::A, &catalog(), Some("v9"), 0);
        assert_eq!(answer, zone().nodata());
    }

    fn consul_zone() -> Zone {
        Zone::alias(&DnsConfig { ttl: Duration::from_secs(7), negative_ttl: Duration::from_secs(3) }, &AliasDomain::consul())
    }

    /// The review's case: web-1 tagged [primary, v9] at version v2, web-2 tagged [v2] at v9.
    fn crossed_tags_and_versions() -> Vec<DnsEndpoint> {
        let tagged = |id, address, version, tags: &[&str]| DnsEndpoint {
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
            has_tag_list: true,
            ..endpoint(id, address, 80, Some(version))
        };
        vec![tagged("web-1", "10.0.0.1", "v2", &["primary", "v9"]), tagged("web-2", "10.0.0.2", "v9", &["v2"])]
    }

    #[test]
    fn under_ferry_a_tag_is_a_version_only() {
        let endpoints = crossed_tags_and_versions();
        let tagged = |tag| addresses_of(&zone().service(&qname(), RecordType::A, &endpoints, Some(tag), 0).answers);
        assert_eq!(tagged("v9"), [ip("10.0.0.2")]);
        assert_eq!(tagged("V2"), [ip("10.0.0.1")], "versions match ignoring case");
        assert!(tagged("primary").is_empty(), "a Consul tag is no version");
    }

    #[test]
    fn under_an_alias_a_tag_is_a_consul_tag() {
        let mut endpoints = crossed_tags_and_versions();
        let qname = Name::from_ascii("v2.web.service.consul.").expect("valid");
        let tagged = |endpoints: &[DnsEndpoint], tag| {
            addresses_of(&consul_zone().service(&qname, RecordType::A, endpoints, Some(tag), 0).answers)
        };
        assert_eq!(tagged(&endpoints, "v2"), [ip("10.0.0.2")], "as Consul answers: web-2 alone");
        assert_eq!(tagged(&endpoints, "v9"), [ip("10.0.0.1")]);
        assert_eq!(tagged(&endpoints, "PRIMARY"), [ip("10.0.0.1")], "tags match ignoring case");

        // An empty tag list is still a list: its version does not stand in for tags.
        endpoints[0].tags.clear();
        assert!(tagged(&endpoints[..1], "v2").is_empty());
        // Without a tag list (registered through Ferry's API), the version does.
        endpoints[0].has_tag_list = false;
        assert_eq!(tagged(&endpoints[..1], "v2"), [ip("10.0.0.1")]);
        assert!(tagged(&catalog()[4..], "v1").is_empty(), "no version, no tags");
    }

    #[test]
    fn an_alias_has_its_own_soa_and_addr_names() {
        let consul = AliasDomain::consul();
        let zone = Zone::alias(&DnsConfig { ttl: Duration::from_secs(7), negative_ttl: Duration::from_secs(3) }, &consul);
        let soa = zone.nxdomain().authorities;
        assert_eq!(soa.iter().map(|r| (r.name.to_ascii(), r.ttl)).collect::<Vec<_>>(), [("consul.".to_owned(), 3)]);
        assert!(matches!(&soa[0].data, RData::SOA(soa) if soa.rname.to_ascii() == "hostmaster.consul." && soa.minimum == 3));
        let qname = Name::from_ascii("_catalog._tcp.service.consul.").expect("valid");
        let answer = zone.service(&qname, RecordType::SRV, &catalog()[..1], None, 0);
        let targets: Vec<String> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(srv.target.to_ascii()),
                _ => None,
            })
            .collect();
        assert_eq!(targets, ["0a000001.addr.consul."]);
        assert_eq!(answer.additionals[0].name.to_ascii(), "0a000001.addr.consul.");
        assert!(answer.answers.iter().all(|r| r.name == qname && r.ttl == 7));
    }

    #[test]
    fn srv_targets_addr_names_and_host_names() {
        let answer = zone().service(&qname(), RecordType::SRV, &catalog(), None, 0);
        let srvs: Vec<(u16, u16, u16, String)> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((srv.priority, srv.weight, srv.port, srv.target.to_ascii())),
                _ => None,
            })
            .collect();
        assert_eq!(
            srvs,
            [
                (1, 1, 8080, "0a000001.addr.ferry.".to_owned()),
                (1, 1, 8080, "0a000002.addr.ferry.".to_owned()),
                (1, 1, 8080, format!("{:032x}.addr.ferry.", u128::from(ip_v6("fd00::3")))),
                (1, 1, 9090, "catalog-d.internal.".to_owned()),
                (1, 1, 8081, "0a000002.addr.ferry.".to_owned()),
            ]
        );
        // One address record per distinct IP target, named as the SRV target names it.
        assert_eq!(addresses_of(&answer.additionals), [ip("10.0.0.1"), ip("10.0.0.2"), ip("fd00::3")]);
        assert_eq!(answer.additionals[0].name.to_ascii(), "0a000001.addr.ferry.");
    }

    fn ip_v6(s: &str) -> Ipv6Addr {
        s.parse().expect("valid")
    }

    #[test]
    fn no_matching_records_is_nodata_with_soa() {
        let zone = zone();
        assert_eq!(zone.service(&qname(), RecordType::A, &[], None, 0), zone.nodata());
        assert_eq!(zone.service(&qname(), RecordType::TXT, &catalog(), None, 0), zone.nodata());
        let hosts_only = [endpoint("d", "catalog-d.internal", 9090, None)];
        assert_eq!(zone.service(&qname(), RecordType::A, &hosts_only, None, 0), zone.nodata());
        let nodata = zone.nodata();
        assert_eq!(nodata.code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(soa_minimum(&nodata), Some(3));
    }

    #[test]
    fn nxdomain_carries_soa_with_negative_ttl() {
        let answer = zone().nxdomain();
        assert_eq!(answer.code, ResponseCode::NXDomain);
        assert_eq!(soa_minimum(&answer), Some(3));
        assert_eq!(answer.authorities.first().map(|soa| soa.ttl), Some(3));
        assert_eq!(answer.authorities.first().map(|soa| soa.name.to_ascii()), Some("ferry.".to_owned()));
    }

    #[test]
    fn addresses_answer_only_their_family() {
        let zone = zone();
        let name = Name::from_ascii("0a000001.addr.ferry.").expect("valid");
        let answer = zone.address(&name, RecordType::A, ip("10.0.0.1"));
        assert_eq!(addresses_of(&answer.answers), [ip("10.0.0.1")]);
        assert_eq!(zone.address(&name, RecordType::AAAA, ip("10.0.0.1")), zone.nodata());
        assert_eq!(zone.address(&name, RecordType::SRV, ip("10.0.0.1")), zone.nodata());
        let v6 = zone.address(&name, RecordType::AAAA, ip("fd00::1"));
        assert_eq!(addresses_of(&v6.answers), [ip("fd00::1")]);
        assert_eq!(zone.address(&name, RecordType::A, ip("fd00::1")), zone.nodata());
        assert_eq!(addresses_of(&zone.address(&name, RecordType::ANY, ip("fd00::1")).answers), [ip("fd00::1")]);
    }

    #[test]
    fn names_outside_the_zone_get_nodata_without_soa() {
        let zone = zone();
        let name = Name::from_ascii("catalog.").expect("valid");
        let answer = zone.outside_address(&name, RecordType::A, ip("240.240.0.1"));
        assert_eq!(addresses_of(&answer.answers), [ip("240.240.0.1")]);
        assert!(answer.answers.iter().all(|r| r.ttl == 7 && r.name == name));
        let nodata = zone.outside_address(&name, RecordType::AAAA, ip("240.240.0.1"));
        assert_eq!((nodata.code, nodata.answers.len(), nodata.authorities.len()), (ResponseCode::NoError, 0, 0));
        assert!(nodata.authoritative);
    }

    #[test]
    fn apex_answers_soa() {
        let zone = zone();
        assert_eq!(zone.apex(RecordType::SOA).answers.len(), 1);
        assert_eq!(zone.apex(RecordType::A), zone.nodata());
    }

    #[test]
    fn endpoint_addresses() {
        assert_eq!(Target::parse("10.1.2.3").ok(), Some(Target::Ip(ip("10.1.2.3"))));
        assert_eq!(Target::parse("[::1]").ok(), Some(Target::Ip(ip("::1"))));
        assert_eq!(Target::parse("::ffff:10.1.2.3").ok(), Some(Target::Ip(ip("10.1.2.3"))));
        assert_eq!(Target::parse("db.internal").ok(), Some(Target::Host(Name::from_ascii("db.internal.").expect("valid"))));
        assert!(Target::parse("").is_err());
        assert!(Target::parse("not:an:address").is_err());
    }

    #[test]
    fn ttls_are_whole_seconds_and_bounded() {
        assert_eq!(ttl_secs(Duration::from_millis(5_900)), 5);
        assert_eq!(ttl_secs(Duration::from_secs(u64::MAX)), 2_147_483_647);
    }
}
