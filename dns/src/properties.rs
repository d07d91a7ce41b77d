//! Property tests of what a DNS client or the host's config reaches: the query names of the
//! zone and its aliases (`NAME.service.ferry.`, `TAG.NAME.service.consul.`,
//! `_NAME._tcp.service.consul.`, `HEX.addr.ferry.`), the names outside them an intercepting
//! server reads, `--dns-domain` values, resolv.conf, and a query's raw bytes through decoding,
//! the answer and its encoding.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use futures::{FutureExt, future::BoxFuture};
use hickory_proto::{
    op::{Edns, Message, Query},
    rr::{DNSClass, LowerName, Name, RecordType},
    serialize::binary::BinEncoder,
};
use hickory_server::{net::xfer::Protocol, server::Request, zone_handler::MessageResponseBuilder};
use proptest::prelude::*;

use crate::{
    AliasDomain, Directory, DnsEndpoint, Lookup, ServeConfig, VirtualIpLookup,
    forward::RequestFlags,
    name::{self, MeshName},
    resolv_conf::{MAX_NAMESERVERS, ResolvConf},
    respond::Responder,
};

/// A label of a query name: mostly the shapes the zone reads, sometimes any bytes.
fn label() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z0-9-]{1,12}".prop_map(String::into_bytes),
        "_[a-zA-Z0-9-]{0,10}".prop_map(String::into_bytes),
        prop_oneof![Just("service"), Just("vip"), Just("addr"), Just("tcp"), Just("_tcp"), Just("ferry"), Just("consul")]
            .prop_map(|l| l.as_bytes().to_vec()),
        "[0-9a-fA-F]{8}|[0-9a-f]{32}|\\+[0-9a-f]{7}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 1..64),
    ]
}

/// A query name, often under `ferry.` or `consul.`.
fn query_name() -> impl Strategy<Value = Name> {
    let suffix = prop_oneof![Just(vec![]), Just(vec!["ferry"]), Just(vec!["consul"]), Just(vec!["dc1", "consul"])];
    (prop::collection::vec(label(), 0..5), suffix).prop_filter_map("too long for a DNS name", |(labels, suffix)| {
        let all = labels.iter().map(Vec::as_slice).chain(suffix.iter().map(|l| l.as_bytes()));
        Name::from_labels(all).ok()
    })
}

fn lower(name: &str) -> LowerName {
    LowerName::new(&Name::from_ascii(name).expect("test names are valid"))
}

/// Every service exists, with a few instances, and some have virtual IPs.
struct Everything;

impl Directory for Everything {
    fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup> {
        let endpoint = |i: u8, version: &str| DnsEndpoint {
            id: format!("{service}-{i}"),
            address: if i == 3 { "fd00::3".into() } else { IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)).to_string() },
            port: 8080,
            version: Some(version.into()),
            tags: vec!["primary".into()],
            has_tag_list: i == 2,
        };
        let found = match service.len() % 3 {
            0 => Lookup::Endpoints(vec![endpoint(1, "v1"), endpoint(2, "v2"), endpoint(3, "v1")]),
            1 => Lookup::NoSuchService,
            _ => Lookup::Endpoints(Vec::new()),
        };
        futures::future::ready(found).boxed()
    }

    fn virtual_ip(&self, service: &str) -> BoxFuture<'_, VirtualIpLookup> {
        let found = match service.len() % 4 {
            0 => VirtualIpLookup::Assigned(IpAddr::V4(Ipv4Addr::new(240, 240, 0, 1))),
            1 => VirtualIpLookup::Unassigned,
            2 => VirtualIpLookup::NoSuchService,
            _ => VirtualIpLookup::Unknown,
        };
        futures::future::ready(found).boxed()
    }
}

/// The endpoints [`Everything`] gives a service at most.
const MOST_ENDPOINTS: usize = 3;

fn responder() -> Responder {
    let config = ServeConfig {
        aliases: vec![AliasDomain::consul(), "dc1.consul".parse().expect("a valid alias")],
        ..ServeConfig::default()
    };
    Responder::new(Arc::new(Everything), &config, None)
}

/// A query as a client would send it: one or two questions of a name, a type and a class, with
/// or without EDNS.
fn valid_query() -> impl Strategy<Value = Vec<u8>> {
    let qtype = prop::sample::select(vec![
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::SOA,
        RecordType::TXT,
        RecordType::ANY,
        RecordType::Unknown(65280),
    ]);
    let class = prop::sample::select(vec![DNSClass::IN, DNSClass::CH, DNSClass::ANY]);
    (query_name(), qtype, class, prop::option::of(any::<u16>()), 1usize..3).prop_map(|(name, qtype, class, edns, n)| {
        let mut message = Message::query();
        for _ in 0..n {
            let mut query = Query::query(name.clone(), qtype);
            query.set_query_class(class);
            message.add_query(query);
        }
        if let Some(payload) = edns {
            let mut edns = Edns::new();
            edns.set_max_payload(payload);
            message.set_edns(edns);
        }
        message.to_vec().expect("a query of a valid name encodes")
    })
}

/// Any bytes, a valid query, or a valid query with some of its bytes replaced.
fn query_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..128),
        valid_query(),
        (valid_query(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)).prop_map(
            |(mut bytes, edits)| {
                for (at, byte) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                bytes
            }
        ),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a current-thread runtime builds")
}

proptest! {
    #[test]
    fn query_names_parse_to_what_they_spell(name in query_name(), rfc2782 in any::<bool>()) {
        let name = LowerName::new(&name);
        let labels: Vec<Vec<u8>> = name.iter().map(<[u8]>::to_vec).collect();
        for origin in [lower("ferry."), lower("consul."), lower("dc1.consul.")] {
            match MeshName::parse(&name, &origin, rfc2782) {
                None => prop_assert!(!origin.zone_of(&name)),
                Some(MeshName::Service { name: service, tag }) => {
                    prop_assert!(name::is_service_label(service.as_bytes()));
                    let spelled = labels.iter().any(|l| l == service.as_bytes() || l.strip_prefix(b"_") == Some(service.as_bytes()));
                    prop_assert!(spelled, "{service} is no label of {name}");
                    if let Some(tag) = tag {
                        prop_assert!(!tag.is_empty() && tag.len() <= 63);
                    }
                }
                Some(MeshName::Vip { name: service }) => prop_assert!(name::is_service_label(service.as_bytes())),
                Some(MeshName::Addr(ip)) => {
                    let origin_name = Name::from(&origin);
                    let spelled = name::addr_name(ip, &origin_name).expect("every address has a name");
                    prop_assert_eq!(&LowerName::new(&spelled), &name);
                }
                Some(MeshName::Apex | MeshName::EmptyNonTerminal | MeshName::NotFound) => {}
            }
        }
    }

    #[test]
    fn addr_names_round_trip(bits in any::<u128>(), v4 in any::<bool>(), origin in prop_oneof![Just("ferry."), Just("consul."), Just("dc1.consul.")]) {
        let ip = if v4 { IpAddr::V4(Ipv4Addr::from(bits as u32)) } else { IpAddr::V6(bits.into()) };
        let origin = lower(origin);
        let name = name::addr_name(ip, &Name::from(&origin)).expect("fits under every domain");
        prop_assert_eq!(MeshName::parse(&LowerName::new(&name), &origin, true), Some(MeshName::Addr(ip)));
    }

    #[test]
    fn names_outside_the_zone_are_services_only_when_they_spell_one(
        name in query_name(),
        search in prop::collection::vec(prop_oneof![Just("default.svc.cluster.local."), Just("svc.cluster.local."), Just("."), Just("consul.")], 0..3),
    ) {
        let search: Vec<LowerName> = search.into_iter().map(lower).collect();
        let (ferry, consul) = (lower("ferry."), lower("consul."));
        let name = LowerName::new(&name);
        if let Some(service) = name::outside_service(&name, &search, &[&ferry, &consul]) {
            prop_assert!(name::is_service_label(service.as_bytes()));
            prop_assert_eq!(name.iter().next(), Some(service.as_bytes()));
        }
    }

    #[test]
    fn alias_domains_are_valid_or_refused_naming_the_value(value in prop_oneof![
        ".{0,40}",
        "[a-zA-Z0-9.-]{0,30}",
        "([a-z]{1,63}\\.){1,5}[a-z]{1,63}\\.?",
        Just("none".to_owned()),
    ]) {
        match AliasDomain::parse_flag(&value) {
            Ok(None) => prop_assert!(value.trim().is_empty() || value.trim().eq_ignore_ascii_case("none")),
            Ok(Some(domain)) => {
                prop_assert!(domain.name().is_fqdn());
                prop_assert_eq!(domain.to_string(), domain.to_string().to_ascii_lowercase());
                prop_assert!(!lower("ferry.").zone_of(&LowerName::new(domain.name())));
                prop_assert!(name::addr_name(std::net::Ipv6Addr::UNSPECIFIED.into(), domain.name()).is_some());
                prop_assert_eq!(domain.to_string().parse::<AliasDomain>(), Ok(domain));
            }
            Err(error) => prop_assert!(error.to_string().starts_with(&format!("{:?}", value.trim())), "{error}"),
        }
    }

    #[test]
    fn resolv_conf_of_any_text_is_bounded(lines in prop::collection::vec(prop_oneof![
        ".{0,40}",
        "(nameserver|search|domain) [ -~]{0,40}",
        "nameserver (10\\.0\\.0\\.[0-9]{1,3}|fe80::[0-9]%eth0|::1)",
        "search( [a-z.]{1,12}){0,8}",
    ], 0..12)) {
        let text = lines.join("\n");
        let conf = ResolvConf::parse(&text);
        prop_assert!(conf.nameservers.len() <= MAX_NAMESERVERS);
        prop_assert!(conf.search.len() <= text.split_whitespace().count());
        prop_assert!(conf.search.iter().all(|domain| !domain.is_root() && domain.is_fqdn()));
    }

    #[test]
    fn any_query_bytes_get_a_bounded_answer_that_encodes(bytes in query_bytes(), udp in any::<bool>()) {
        let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
        let Ok(request) = Request::from_bytes(bytes, SocketAddr::from(([127, 0, 0, 1], 5353)), protocol) else { return Ok(()) };
        // As the handler does: exactly one question, else FORMERR without asking anything.
        let Ok(info) = request.request_info() else { return Ok(()) };
        let answer = runtime().block_on(responder().respond(info.query, RequestFlags::default()));
        prop_assert!(answer.answers.len() <= MOST_ENDPOINTS, "{answer:?}");
        prop_assert!(answer.additionals.len() <= MOST_ENDPOINTS, "{answer:?}");
        prop_assert!(answer.authorities.len() <= 1, "{answer:?}");
        let queries = &request.queries;
        let edns = request.edns.as_ref().map(|request| {
            let mut edns = Edns::new();
            edns.set_max_payload(request.max_payload().max(512));
            edns
        });
        let mut metadata = hickory_proto::op::Metadata::response_from_request(&request.metadata);
        metadata.response_code = answer.code;
        let response = MessageResponseBuilder::new(queries, edns.as_ref()).build(metadata, &answer.answers, &answer.authorities, &[], &answer.additionals);
        let mut encoded = Vec::new();
        let emitted = response.destructive_emit(&mut BinEncoder::new(&mut encoded));
        prop_assert!(emitted.is_ok(), "{emitted:?}");
        let decoded = Message::from_vec(&encoded);
        prop_assert!(decoded.is_ok(), "{decoded:?}");
    }
}
