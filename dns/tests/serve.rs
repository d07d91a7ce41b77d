//! End-to-end tests of [`ferry_dns::serve`] on loopback sockets.
//!
//! Each test starts a server on 127.0.0.1 port 0 (UDP and TCP) over an in-memory directory and
//! queries it either with hickory-resolver, as an app's resolver would, or with hand-built
//! hickory-proto messages where the exact header bits and sections matter (RCODE, TC, SOA).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ferry_dns::{Directory, DnsConfig, DnsEndpoint, Lookup};
use futures::{FutureExt, future::BoxFuture};
use hickory_resolver::{
    Resolver, TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    proto::{
        op::{Edns, Message, Query, ResponseCode},
        rr::{Name, RData, Record, RecordType},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Long enough for a loaded CI machine, short enough that a hang fails the test.
const DEADLINE: Duration = Duration::from_secs(10);
const TTL: u32 = 7;
const NEGATIVE_TTL: u32 = 3;

/// A directory held in memory.
struct Memory(HashMap<String, Vec<DnsEndpoint>>);

impl Directory for Memory {
    fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup> {
        futures::future::ready(Lookup::from(self.0.get(service).cloned())).boxed()
    }
}

fn endpoint(id: &str, address: &str, port: u16, version: Option<&str>) -> DnsEndpoint {
    DnsEndpoint { id: id.to_owned(), address: address.to_owned(), port, version: version.map(str::to_owned) }
}

/// `catalog` with two v1 and one v2 IPv4 instances, one IPv6 and one host-name instance;
/// `empty` registered with nothing routable; `big` with 100 instances.
fn directory() -> Memory {
    let mut services = HashMap::new();
    services.insert(
        "catalog".to_owned(),
        vec![
            endpoint("c1", "10.0.0.1", 8080, Some("v1")),
            endpoint("c2", "10.0.0.2", 8080, Some("v1")),
            endpoint("c3", "10.0.0.3", 8081, Some("v2")),
            endpoint("c4", "fd00::4", 8080, Some("v2")),
            endpoint("c5", "catalog-5.internal", 9090, Some("v1")),
        ],
    );
    services.insert("empty".to_owned(), Vec::new());
    services.insert("big".to_owned(), (0..100u8).map(|i| endpoint(&format!("b{i}"), &format!("10.1.0.{i}"), 80, None)).collect());
    Memory(services)
}

/// A running server; cancelled when dropped.
struct TestServer {
    udp: SocketAddr,
    tcp: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Binds both sockets before `serve` starts, so queries sent right away wait in the kernel
    /// queues: no readiness wait is needed.
    async fn start() -> Self {
        // One port for both, as a resolver retrying a truncated answer over TCP expects.
        let (udp, tcp) = ferry_dns::bind("127.0.0.1:0".parse().expect("address")).await.expect("bind on loopback");
        let (udp_addr, tcp_addr) = (udp.local_addr().expect("UDP address"), tcp.local_addr().expect("TCP address"));
        let config = DnsConfig { ttl: Duration::from_secs(TTL.into()), negative_ttl: Duration::from_secs(NEGATIVE_TTL.into()) };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ferry_dns::serve(udp, tcp, Arc::new(directory()), config, shutdown.clone()));
        Self { udp: udp_addr, tcp: tcp_addr, shutdown, task: Some(task) }
    }

    /// A resolver that asks only this server, over UDP first and TCP when truncated, without a
    /// cache so that every lookup reaches the server.
    fn resolver(&self) -> TokioResolver {
        let mut udp = ConnectionConfig::udp();
        udp.port = self.udp.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = self.tcp.port();
        let server = NameServerConfig::new(self.udp.ip(), true, vec![udp, tcp]);
        let mut options = ResolverOpts::default();
        options.cache_size = 0;
        options.timeout = Duration::from_secs(2);
        Resolver::builder_with_config(ResolverConfig::from_name_servers(vec![server]), TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .expect("resolver config is valid")
    }

    async fn udp(&self, name: &str, qtype: RecordType, edns_payload: Option<u16>) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client UDP");
        socket.send_to(&query(name, qtype, edns_payload), self.udp).await.expect("send UDP query");
        let mut buf = vec![0; 65_535];
        let len = tokio::time::timeout(DEADLINE, socket.recv(&mut buf)).await.expect("UDP answer in time").expect("recv");
        assert!(len <= usize::from(edns_payload.unwrap_or(512).max(512)), "a {len}-byte UDP response exceeds the limit");
        Message::from_vec(&buf[..len]).expect("a well-formed response")
    }

    async fn tcp(&self, name: &str, qtype: RecordType) -> Message {
        let exchange = async {
            let mut stream = TcpStream::connect(self.tcp).await?;
            let request = query(name, qtype, None);
            let len = u16::try_from(request.len()).expect("a query fits a TCP frame");
            stream.write_all(&len.to_be_bytes()).await?;
            stream.write_all(&request).await?;
            let len = stream.read_u16().await?;
            let mut response = vec![0; usize::from(len)];
            stream.read_exact(&mut response).await?;
            std::io::Result::Ok(response)
        };
        let response = tokio::time::timeout(DEADLINE, exchange).await.expect("TCP answer in time").expect("TCP exchange");
        Message::from_vec(&response).expect("a well-formed response")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn query(name: &str, qtype: RecordType, edns_payload: Option<u16>) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = 0x4242;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).expect("test names are valid"), qtype));
    if let Some(payload) = edns_payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        message.set_edns(edns);
    }
    message.to_vec().expect("encode query")
}

fn addresses(records: &[Record]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|ip| ip.parse().expect("test addresses are valid")).collect()
}

fn sorted(mut ips: Vec<IpAddr>) -> Vec<IpAddr> {
    ips.sort();
    ips
}

/// The MINIMUM and TTL of the SOA in the authority section.
fn soa_minimum_and_ttl(message: &Message) -> Option<(u32, u32)> {
    message.authorities.iter().find_map(|record| match &record.data {
        RData::SOA(soa) => Some((soa.minimum, record.ttl)),
        _ => None,
    })
}

async fn resolve(resolver: &TokioResolver, name: &str, qtype: RecordType) -> Vec<Record> {
    let lookup = tokio::time::timeout(DEADLINE, resolver.lookup(name, qtype)).await.expect("lookup in time");
    lookup.unwrap_or_else(|error| panic!("{qtype} {name}: {error}")).answers().to_vec()
}

#[tokio::test]
async fn a_answers_rotate_between_queries() {
    let server = TestServer::start().await;
    let resolver = server.resolver();
    let first = resolve(&resolver, "catalog.service.ferry.", RecordType::A).await;
    let second = resolve(&resolver, "catalog.service.ferry.", RecordType::A).await;

    // The host-name instance has no address to give, and the IPv6 one is not an A record.
    let all = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    assert_eq!(sorted(addresses(&first)), all);
    assert_eq!(sorted(addresses(&second)), all);
    assert_ne!(addresses(&first), addresses(&second), "successive answers start at different instances");
    assert!(first.iter().all(|record| record.ttl == TTL), "answers carry the configured TTL: {first:?}");
}

#[tokio::test]
async fn aaaa_answers_ipv6_instances() {
    let server = TestServer::start().await;
    let answers = resolve(&server.resolver(), "catalog.service.ferry.", RecordType::AAAA).await;
    assert_eq!(addresses(&answers), ips(&["fd00::4"]));
}

#[tokio::test]
async fn version_tag_selects_instances() {
    let server = TestServer::start().await;
    let resolver = server.resolver();
    assert_eq!(addresses(&resolve(&resolver, "v2.catalog.service.ferry.", RecordType::A).await), ips(&["10.0.0.3"]));
    assert_eq!(addresses(&resolve(&resolver, "v2.catalog.service.ferry.", RecordType::AAAA).await), ips(&["fd00::4"]));
    let v1 = resolve(&resolver, "V1.Catalog.Service.Ferry.", RecordType::A).await;
    assert_eq!(sorted(addresses(&v1)), ips(&["10.0.0.1", "10.0.0.2"]), "names are case-insensitive");
}

#[tokio::test]
async fn srv_names_targets_and_adds_their_addresses() {
    let server = TestServer::start().await;
    let response = server.udp("v2.catalog.service.ferry.", RecordType::SRV, Some(1232)).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.metadata.authoritative);

    let mut srvs: Vec<(u16, u16, u16, String)> = response
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::SRV(srv) => Some((srv.priority, srv.weight, srv.port, srv.target.to_ascii())),
            _ => None,
        })
        .collect();
    srvs.sort();
    let v6_target = format!("{:032x}.addr.ferry.", u128::from("fd00::4".parse::<std::net::Ipv6Addr>().expect("valid")));
    assert_eq!(srvs, [(1, 1, 8080, v6_target.clone()), (1, 1, 8081, "0a000003.addr.ferry.".to_owned())]);

    let mut additional: Vec<(String, IpAddr)> = response
        .additionals
        .iter()
        .filter_map(|r| addresses(std::slice::from_ref(r)).first().map(|ip| (r.name.to_ascii(), *ip)))
        .collect();
    additional.sort();
    assert_eq!(additional, [("0a000003.addr.ferry.".to_owned(), ips(&["10.0.0.3"])[0]), (v6_target, ips(&["fd00::4"])[0])],);

    // The host-name instance is an SRV target under its own name, with no address added.
    let all = server.udp("catalog.service.ferry.", RecordType::SRV, Some(1232)).await;
    assert_eq!(all.answers.len(), 5);
    assert!(
        all.answers
            .iter()
            .any(|r| matches!(&r.data, RData::SRV(srv) if srv.target.to_ascii() == "catalog-5.internal." && srv.port == 9090))
    );
    assert_eq!(addresses(&all.additionals).len(), 4);
}

#[tokio::test]
async fn addr_names_decode_to_their_address() {
    let server = TestServer::start().await;
    let resolver = server.resolver();
    assert_eq!(addresses(&resolve(&resolver, "0a000003.addr.ferry.", RecordType::A).await), ips(&["10.0.0.3"]));
    let v6 = format!("{:032x}.addr.ferry.", u128::from("fd00::4".parse::<std::net::Ipv6Addr>().expect("valid")));
    assert_eq!(addresses(&resolve(&resolver, &v6, RecordType::AAAA).await), ips(&["fd00::4"]));
}

#[tokio::test]
async fn unknown_service_is_nxdomain_with_soa_minimum() {
    let server = TestServer::start().await;
    for name in ["unknown.service.ferry.", "v2.unknown.service.ferry.", "not_a_label.service.ferry.", "www.ferry."] {
        let response = server.udp(name, RecordType::A, None).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(response.metadata.authoritative, "{name}");
        assert!(response.answers.is_empty(), "{name}");
        assert_eq!(soa_minimum_and_ttl(&response), Some((NEGATIVE_TTL, NEGATIVE_TTL)), "{name}");
    }
}

#[tokio::test]
async fn known_name_without_records_is_nodata() {
    let server = TestServer::start().await;
    for (name, qtype) in [
        ("empty.service.ferry.", RecordType::A),
        ("empty.service.ferry.", RecordType::SRV),
        ("catalog.service.ferry.", RecordType::TXT),
        ("catalog.service.ferry.", RecordType::MX),
        ("v9.catalog.service.ferry.", RecordType::A),
    ] {
        let response = server.udp(name, qtype, None).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError, "{qtype} {name}");
        assert!(response.answers.is_empty(), "{qtype} {name}");
        assert_eq!(soa_minimum_and_ttl(&response), Some((NEGATIVE_TTL, NEGATIVE_TTL)), "{qtype} {name}");
    }
}

#[tokio::test]
async fn names_outside_the_zone_are_refused() {
    let server = TestServer::start().await;
    for name in ["example.com.", "ferry.com.", "."] {
        let response = server.udp(name, RecordType::A, None).await;
        assert_eq!(response.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(response.answers.is_empty() && response.authorities.is_empty(), "{name}");
    }
}

#[tokio::test]
async fn edns_is_echoed() {
    let server = TestServer::start().await;
    let response = server.udp("catalog.service.ferry.", RecordType::A, Some(1232)).await;
    assert_eq!(response.edns.as_ref().map(Edns::max_payload), Some(1232));
    let response = server.udp("catalog.service.ferry.", RecordType::A, None).await;
    assert!(response.edns.is_none());
}

/// RFC 1035 section 4.2.1: over UDP an answer is cut at 512 bytes (or the EDNS size the client
/// advertises) with TC set; TCP carries it whole. hickory-server does the cutting.
#[tokio::test]
async fn large_answers_truncate_over_udp_and_complete_over_tcp() {
    let server = TestServer::start().await;
    for (qtype, edns) in
        [(RecordType::A, None), (RecordType::A, Some(1232)), (RecordType::SRV, None), (RecordType::SRV, Some(1232))]
    {
        let response = server.udp("big.service.ferry.", qtype, edns).await;
        assert!(response.metadata.truncation, "{qtype} with EDNS {edns:?}: TC set");
        assert!(response.answers.len() < 100, "{qtype} with EDNS {edns:?}: {} answers", response.answers.len());
    }

    let a = server.tcp("big.service.ferry.", RecordType::A).await;
    assert!(!a.metadata.truncation);
    assert_eq!(a.answers.len(), 100);
    let srv = server.tcp("big.service.ferry.", RecordType::SRV).await;
    assert!(!srv.metadata.truncation);
    assert_eq!(srv.answers.len(), 100);
    assert_eq!(addresses(&srv.additionals).len(), 100);

    // A real resolver sees TC over UDP and retries over TCP on its own.
    let answers = resolve(&server.resolver(), "big.service.ferry.", RecordType::A).await;
    assert_eq!(answers.len(), 100);
}

#[tokio::test]
async fn serve_returns_when_shut_down() {
    let mut server = TestServer::start().await;
    server.udp("catalog.service.ferry.", RecordType::A, None).await;
    server.shutdown.cancel();
    let task = server.task.take().expect("the server task is held until here");
    let result = tokio::time::timeout(DEADLINE, task).await.expect("serve returns in time").expect("serve does not panic");
    assert!(result.is_ok(), "{result:?}");
}

/// `dig`, when installed, gets every address the way a system tool would: over UDP it sees TC
/// and retries over TCP by itself; with `+tcp` it asks over TCP from the start.
#[tokio::test]
async fn dig_resolves_a_large_service() {
    if tokio::process::Command::new("dig").arg("-v").output().await.is_err() {
        eprintln!("skipping dig_resolves_a_large_service: `dig` is not installed");
        return;
    }
    let server = TestServer::start().await;
    for (transport, port) in [("+notcp", server.udp.port()), ("+tcp", server.tcp.port())] {
        let port = port.to_string();
        let args = ["@127.0.0.1", "-p", &port, "+short", "+tries=1", "+time=5", transport, "big.service.ferry.", "A"];
        let output = tokio::time::timeout(DEADLINE, tokio::process::Command::new("dig").args(args).output())
            .await
            .expect("dig returns in time")
            .expect("run dig");
        assert!(output.status.success(), "dig {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 100, "dig {args:?}");
    }
}
