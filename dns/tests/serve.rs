//! End-to-end tests of [`ferry_dns::serve`] and [`ferry_dns::serve_intercepting`] on loopback
//! sockets.
//!
//! Each test starts a server on 127.0.0.1 port 0 (UDP and TCP) over an in-memory directory and
//! queries it either with hickory-resolver, as an app's resolver would, or with hand-built
//! hickory-proto messages where the exact header bits and sections matter (RCODE, TC, SOA).
//! An intercepting server forwards to a fake upstream resolver, on loopback too.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use ferry_dns::{Directory, DnsConfig, DnsEndpoint, InterceptConfig, Lookup, RateLimit, ServeConfig, VirtualIpLookup};
use futures::{FutureExt, future::BoxFuture};
use hickory_resolver::{
    Resolver, TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    proto::{
        op::{Edns, Message, Query, ResponseCode},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, SOA},
        },
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Long enough for a loaded CI machine, short enough that a hang fails the test.
const DEADLINE: Duration = Duration::from_secs(10);
const TTL: u32 = 7;
const NEGATIVE_TTL: u32 = 3;

/// A directory held in memory: services and their virtual IPs.
struct Memory(HashMap<String, Vec<DnsEndpoint>>, HashMap<String, IpAddr>);

impl Directory for Memory {
    fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup> {
        futures::future::ready(Lookup::from(self.0.get(service).cloned())).boxed()
    }

    fn virtual_ip(&self, service: &str) -> BoxFuture<'_, VirtualIpLookup> {
        let found = match (self.1.get(service), self.0.contains_key(service)) {
            (Some(ip), _) => VirtualIpLookup::Assigned(*ip),
            (None, true) => VirtualIpLookup::Unassigned,
            (None, false) => VirtualIpLookup::NoSuchService,
        };
        futures::future::ready(found).boxed()
    }
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

/// `catalog` with two v1 and one v2 IPv4 instances, one IPv6 and one host-name instance, and
/// the virtual IP 240.240.0.1; `empty` registered with nothing routable and no virtual IP; `big`
/// with 100 instances.
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
    Memory(services, HashMap::from([("catalog".to_owned(), CATALOG_VIP)]))
}

const CATALOG_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(240, 240, 0, 1));
/// What the fake upstream answers for every name (but `missing.*` and `big.*`).
const UPSTREAM_ANSWER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 99));

/// A running server; cancelled when dropped.
struct TestServer {
    udp: SocketAddr,
    tcp: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// A resolv.conf written for the server, removed with it.
    resolv_conf: Option<PathBuf>,
}

impl TestServer {
    /// Binds both sockets before `serve` starts, so queries sent right away wait in the kernel
    /// queues: no readiness wait is needed.
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// An intercepting server, its resolv.conf holding `resolv_conf`.
    async fn intercepting(resolv_conf: &str, intercept: InterceptConfig) -> Self {
        let path = temp_path("resolv.conf");
        std::fs::write(&path, resolv_conf).expect("write the test resolv.conf");
        let mut server = Self::start_with(Some(InterceptConfig { resolv_conf: path.clone(), ..intercept })).await;
        server.resolv_conf = Some(path);
        server
    }

    async fn start_with(intercept: Option<InterceptConfig>) -> Self {
        Self::start_limited(intercept, RateLimit::default()).await
    }

    async fn start_limited(intercept: Option<InterceptConfig>, rate_limit: RateLimit) -> Self {
        // One port for both, as a resolver retrying a truncated answer over TCP expects.
        let (udp, tcp) = ferry_dns::bind("127.0.0.1:0".parse().expect("address")).await.expect("bind on loopback");
        let (udp_addr, tcp_addr) = (udp.local_addr().expect("UDP address"), tcp.local_addr().expect("TCP address"));
        let cache = DnsConfig { ttl: Duration::from_secs(TTL.into()), negative_ttl: Duration::from_secs(NEGATIVE_TTL.into()) };
        let config = ServeConfig { rate_limit, ..ServeConfig::from(cache) };
        let shutdown = CancellationToken::new();
        let directory = Arc::new(directory());
        let task = match intercept {
            None => tokio::spawn(ferry_dns::serve(udp, tcp, directory, config, shutdown.clone())),
            Some(intercept) => {
                tokio::spawn(ferry_dns::serve_intercepting(udp, tcp, directory, config, intercept, shutdown.clone()))
            }
        };
        Self { udp: udp_addr, tcp: tcp_addr, shutdown, task: Some(task), resolv_conf: None }
    }

    /// A resolver that asks only this server, over UDP first and TCP when truncated, without a
    /// cache so that every lookup reaches the server.
    fn resolver(&self) -> TokioResolver {
        self.resolver_searching(Vec::new())
    }

    /// The same, with `search` domains, as an app's resolver reads them from resolv.conf.
    fn resolver_searching(&self, search: Vec<Name>) -> TokioResolver {
        let mut udp = ConnectionConfig::udp();
        udp.port = self.udp.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = self.tcp.port();
        let server = NameServerConfig::new(self.udp.ip(), true, vec![udp, tcp]);
        let mut options = ResolverOpts::default();
        options.cache_size = 0;
        options.timeout = Duration::from_secs(2);
        Resolver::builder_with_config(ResolverConfig::from_parts(None, search, vec![server]), TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .expect("resolver config is valid")
    }

    async fn udp(&self, name: &str, qtype: RecordType, edns_payload: Option<u16>) -> Message {
        self.udp_within(name, qtype, edns_payload, DEADLINE).await
    }

    /// `udp`, failing unless the answer comes within `deadline`.
    async fn udp_within(&self, name: &str, qtype: RecordType, edns_payload: Option<u16>, deadline: Duration) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client UDP");
        socket.send_to(&query(name, qtype, edns_payload), self.udp).await.expect("send UDP query");
        let mut buf = vec![0; 65_535];
        let len = tokio::time::timeout(deadline, socket.recv(&mut buf)).await.expect("UDP answer in time").expect("recv");
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
        if let Some(path) = &self.resolv_conf {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A path in the test target's scratch directory, unique to this call.
fn temp_path(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{n}-{name}", std::process::id()))
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

/// Whatever size a client advertises, a UDP answer stays within 1232 bytes (DNS Flag Day 2020):
/// larger ones are truncated, and the OPT record says 1232.
#[tokio::test]
async fn udp_answers_are_capped_at_1232_bytes_whatever_the_client_advertises() {
    let server = TestServer::start().await;
    for advertised in [1232, 1400, 4096, 65535] {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        socket.send_to(&query("big.service.ferry.", RecordType::A, Some(advertised)), server.udp).await.expect("send");
        let mut buffer = vec![0; 65535];
        let (len, _) =
            tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer)).await.expect("an answer").expect("recv");
        assert!(len <= 1232, "advertised {advertised}: a {len}-byte answer");
        let response = Message::from_vec(&buffer[..len]).expect("a DNS message");
        assert!(response.metadata.truncation, "advertised {advertised}: TC set");
        if let Some(edns) = &response.edns {
            assert_eq!(edns.max_payload(), 1232, "advertised {advertised}");
        }
    }
    // A client that advertises less gets no more than that.
    let small = server.udp("catalog.service.ferry.", RecordType::A, Some(600)).await;
    assert_eq!(small.edns.as_ref().map(Edns::max_payload), Some(600));
}

/// Response rate limiting: a client that asks for the same answer over and over gets a burst,
/// then some answers truncated (so that a real client retries over TCP) and the rest dropped;
/// TCP is not limited. (Loopback is exempt by default; this server limits it, to test.)
#[tokio::test]
async fn identical_udp_answers_to_one_client_are_rate_limited() {
    let limit = RateLimit { per_second: 1, burst: 5, slip: 2, exempt_loopback: false, max_buckets: 100 };
    let server = TestServer::start_limited(None, limit).await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let asked = 30;
    for _ in 0..asked {
        socket.send_to(&query("catalog.service.ferry.", RecordType::A, None), server.udp).await.expect("send");
    }
    let (mut full, mut truncated) = (0, 0);
    let mut buffer = vec![0; 65535];
    // Every answer the server sends arrives well within a second on loopback; the rest never do.
    while let Ok(Ok((len, _))) = tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buffer)).await {
        let response = Message::from_vec(&buffer[..len]).expect("a DNS message");
        if response.metadata.truncation {
            assert!(response.answers.is_empty(), "a slipped answer holds no records");
            truncated += 1;
        } else {
            assert!(!response.answers.is_empty());
            full += 1;
        }
    }
    assert!((5..=6).contains(&full), "{full} full answers of {asked}: the burst, and at most one refilled");
    assert!(truncated >= 10, "{truncated} truncated answers: every second limited one");
    assert!(full + truncated < asked, "the rest were dropped");
    // TCP carries the answer whatever the limit.
    let over_tcp = server.tcp("catalog.service.ferry.", RecordType::A).await;
    assert!(!over_tcp.metadata.truncation && !over_tcp.answers.is_empty(), "{over_tcp:?}");
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

#[tokio::test]
async fn vip_names_answer_the_virtual_ip() {
    let server = TestServer::start().await;
    let answers = resolve(&server.resolver(), "catalog.vip.ferry.", RecordType::A).await;
    assert_eq!(addresses(&answers), [CATALOG_VIP]);
    assert!(answers.iter().all(|record| record.ttl == TTL));
    for (name, code) in [
        ("catalog.vip.ferry.", ResponseCode::NoError),
        ("empty.vip.ferry.", ResponseCode::NoError),
        ("vip.ferry.", ResponseCode::NoError),
        ("unknown.vip.ferry.", ResponseCode::NXDomain),
    ] {
        let qtype = if name == "catalog.vip.ferry." { RecordType::AAAA } else { RecordType::A };
        let response = server.udp(name, qtype, None).await;
        assert_eq!(response.metadata.response_code, code, "{qtype} {name}");
        assert!(response.answers.is_empty(), "{qtype} {name}");
        assert_eq!(soa_minimum_and_ttl(&response), Some((NEGATIVE_TTL, NEGATIVE_TTL)), "{qtype} {name}");
    }
    // Without interception, the service's name keeps its instances, and bare names are not ours.
    let instances = resolve(&server.resolver(), "catalog.service.ferry.", RecordType::A).await;
    assert_eq!(sorted(addresses(&instances)), ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    assert_eq!(server.udp("catalog.", RecordType::A, None).await.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn consul_names_answer_like_ferry_names() {
    // The server runs on a bare `DnsConfig`, as the control plane's does: `consul.` comes with it.
    let server = TestServer::start().await;
    let resolver = server.resolver();
    let answers = resolve(&resolver, "catalog.service.consul.", RecordType::A).await;
    assert_eq!(sorted(addresses(&answers)), ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    assert!(answers.iter().all(|record| record.ttl == TTL && record.name.to_ascii() == "catalog.service.consul."));
    let v2 = resolve(&resolver, "V2.Catalog.Service.Consul.", RecordType::A).await;
    assert_eq!(addresses(&v2), ips(&["10.0.0.3"]));

    let response = server.udp("_catalog._tcp.service.consul.", RecordType::SRV, Some(1232)).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.metadata.authoritative);
    let mut srvs: Vec<(String, u16, String)> = response
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::SRV(srv) => Some((record.name.to_ascii(), srv.port, srv.target.to_ascii())),
            _ => None,
        })
        .collect();
    srvs.sort();
    let owner = "_catalog._tcp.service.consul.".to_owned();
    let v6_target = format!("{:032x}.addr.consul.", u128::from("fd00::4".parse::<std::net::Ipv6Addr>().expect("valid")));
    assert_eq!(
        srvs,
        [
            (owner.clone(), 8080, "0a000001.addr.consul.".to_owned()),
            (owner.clone(), 8080, "0a000002.addr.consul.".to_owned()),
            (owner.clone(), 8080, v6_target),
            (owner.clone(), 8081, "0a000003.addr.consul.".to_owned()),
            (owner, 9090, "catalog-5.internal.".to_owned()),
        ]
    );
    // The targets resolve under the same domain, so a resolver that forwards only `consul.` here
    // can follow them.
    assert_eq!(addresses(&response.additionals).len(), 4);
    assert_eq!(addresses(&resolve(&resolver, "0a000003.addr.consul.", RecordType::A).await), ips(&["10.0.0.3"]));

    let missing = server.udp("_unknown._tcp.service.consul.", RecordType::SRV, None).await;
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_minimum_and_ttl(&missing), Some((NEGATIVE_TTL, NEGATIVE_TTL)));
    assert!(missing.authorities.iter().all(|record| record.name.to_ascii() == "consul."), "{:?}", missing.authorities);
}

/// A stand-in upstream resolver on 127.0.0.1 (UDP and TCP on one port), served until dropped:
/// `missing.*` is NXDOMAIN with an SOA; `big.*` is truncated over UDP and 100 A records over
/// TCP; every other name has the A record [`UPSTREAM_ANSWER`]. `silent` answers nothing.
struct FakeUpstream {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    _silent: Option<(UdpSocket, TcpListener)>,
}

impl FakeUpstream {
    async fn start() -> Self {
        let (udp, tcp) = ferry_dns::bind("127.0.0.1:0".parse().expect("address")).await.expect("bind the fake upstream");
        let addr = udp.local_addr().expect("address");
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            while let Ok((len, from)) = udp.recv_from(&mut buf).await {
                if let Ok(request) = Message::from_vec(&buf[..len]) {
                    let _ = udp.send_to(&upstream_response(&request, false).to_vec().expect("encode"), from).await;
                }
            }
        });
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let Ok(len) = stream.read_u16().await else { continue };
                let mut buf = vec![0; usize::from(len)];
                if stream.read_exact(&mut buf).await.is_err() {
                    continue;
                }
                let Ok(request) = Message::from_vec(&buf) else { continue };
                let bytes = upstream_response(&request, true).to_vec().expect("encode");
                let len = u16::try_from(bytes.len()).expect("fits a TCP message");
                let _ = stream.write_all(&[&len.to_be_bytes()[..], &bytes].concat()).await;
            }
        });
        Self { addr, tasks: vec![udp_task, tcp_task], _silent: None }
    }

    async fn silent() -> Self {
        let (udp, tcp) = ferry_dns::bind("127.0.0.1:0".parse().expect("address")).await.expect("bind the fake upstream");
        Self { addr: udp.local_addr().expect("address"), tasks: Vec::new(), _silent: Some((udp, tcp)) }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

fn upstream_response(request: &Message, over_tcp: bool) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_available = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.queries = request.queries.clone();
    let Some(query) = request.queries.first() else { return response };
    let name = query.name().clone();
    let first = name.iter().next().map(|label| label.to_ascii_lowercase());
    let a = |ip: Ipv4Addr| Record::from_rdata(name.clone(), 60, RData::A(A(ip)));
    match first.as_deref() {
        Some(b"missing") => {
            response.metadata.response_code = ResponseCode::NXDomain;
            let zone = name.base_name();
            let soa = SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, 30);
            response.authorities.push(Record::from_rdata(zone, 30, RData::SOA(soa)));
        }
        Some(b"big") if !over_tcp => response.metadata.truncation = true,
        Some(b"big") => response.answers = (0..100u8).map(|i| a(Ipv4Addr::new(127, 1, 0, i))).collect(),
        _ if query.query_type() == RecordType::A => {
            let IpAddr::V4(v4) = UPSTREAM_ANSWER else { unreachable!("the upstream's answer is IPv4") };
            response.answers.push(a(v4));
        }
        _ => {}
    }
    response
}

const SEARCH: &str = "search default.svc.cluster.local svc.cluster.local\noptions ndots:5\n";

async fn intercepting(upstream: &FakeUpstream) -> TestServer {
    TestServer::intercepting(SEARCH, InterceptConfig { upstreams: vec![upstream.addr], ..InterceptConfig::default() }).await
}

#[tokio::test]
async fn intercepting_mesh_names_resolve_to_the_virtual_ip() {
    let upstream = FakeUpstream::start().await;
    let server = intercepting(&upstream).await;
    for name in ["catalog.", "catalog.service.ferry.", "catalog.vip.ferry.", "catalog.default.svc.cluster.local."] {
        let response = server.udp(name, RecordType::A, None).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(addresses(&response.answers), [CATALOG_VIP], "{name}");
        assert!(response.metadata.recursion_available, "{name}: an intercepting server recurses");
    }

    // An app's resolver walking its search list gets there whichever spelling it asks first.
    let search = ["default.svc.cluster.local.", "svc.cluster.local."].map(|d| Name::from_ascii(d).expect("valid"));
    let resolver = server.resolver_searching(search.to_vec());
    let lookup = tokio::time::timeout(DEADLINE, resolver.lookup_ip("catalog")).await.expect("lookup in time");
    assert_eq!(lookup.expect("catalog resolves").iter().collect::<Vec<_>>(), [CATALOG_VIP]);
}

#[tokio::test]
async fn intercepting_consul_names_of_mesh_services_resolve_to_the_virtual_ip_without_forwarding() {
    let upstream = FakeUpstream::silent().await;
    let server = intercepting(&upstream).await;
    // The upstream never answers: an answer within a second cannot have come from it.
    for name in ["catalog.service.consul.", "_catalog._tcp.service.consul."] {
        let response = server.udp_within(name, RecordType::A, None, Duration::from_secs(1)).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(addresses(&response.answers), [CATALOG_VIP], "{name}");
    }
}

#[tokio::test]
async fn intercepting_other_consul_names_are_forwarded() {
    let upstream = FakeUpstream::start().await;
    let server = intercepting(&upstream).await;
    // A real Consul still answers these during a migration.
    for name in ["vault.service.consul.", "db-1.node.consul.", "geo-db.query.consul."] {
        assert_eq!(addresses(&server.udp(name, RecordType::A, None).await.answers), [UPSTREAM_ANSWER], "{name}");
    }
}

#[tokio::test]
async fn intercepting_aaaa_for_an_ipv4_virtual_ip_is_nodata_at_once() {
    let upstream = FakeUpstream::silent().await;
    let server = intercepting(&upstream).await;
    // The upstream never answers: an answer within a second cannot have come from it.
    for (name, qtype) in [
        ("catalog.", RecordType::AAAA),
        ("catalog.default.svc.cluster.local.", RecordType::AAAA),
        ("catalog.", RecordType::HTTPS),
        ("catalog.service.ferry.", RecordType::AAAA),
    ] {
        let response = server.udp_within(name, qtype, None, Duration::from_secs(1)).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError, "{qtype} {name}");
        assert!(response.answers.is_empty(), "{qtype} {name}");
    }
    // SRV and tags keep the instances.
    let srv = server.udp("catalog.service.ferry.", RecordType::SRV, Some(1232)).await;
    assert_eq!(srv.answers.len(), 5);
    let v2 = server.udp("v2.catalog.service.ferry.", RecordType::A, None).await;
    assert_eq!(addresses(&v2.answers), ips(&["10.0.0.3"]));
}

#[tokio::test]
async fn intercepting_other_names_are_forwarded_and_relayed() {
    let upstream = FakeUpstream::start().await;
    let server = intercepting(&upstream).await;
    let response = server.udp("www.example.com.", RecordType::A, Some(1232)).await;
    assert_eq!(response.metadata.id, 0x4242, "the client's id");
    assert_eq!(response.queries.len(), 1);
    assert_eq!(response.queries[0].name().to_ascii(), "www.example.com.", "the client's question");
    assert_eq!(addresses(&response.answers), [UPSTREAM_ANSWER]);
    assert!(response.metadata.recursion_available);

    // A bare name that is no service (or has no virtual IP) is the upstream's too.
    for name in ["unknown.", "empty.", "unknown.default.svc.cluster.local."] {
        assert_eq!(addresses(&server.udp(name, RecordType::A, None).await.answers), [UPSTREAM_ANSWER], "{name}");
    }

    let missing = server.udp("missing.example.com.", RecordType::A, None).await;
    assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    assert!(matches!(missing.authorities.as_slice(), [Record { data: RData::SOA(_), .. }]), "{missing:?}");

    // Names under `ferry.` are never forwarded.
    let unknown = server.udp("unknown.service.ferry.", RecordType::A, None).await;
    assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_minimum_and_ttl(&unknown), Some((NEGATIVE_TTL, NEGATIVE_TTL)));

    let resolved = resolve(&server.resolver(), "www.example.com.", RecordType::A).await;
    assert_eq!(addresses(&resolved), [UPSTREAM_ANSWER]);
}

/// The upstream truncates over UDP; the server asks it again over TCP, and relays the whole
/// answer: truncated again to a UDP client (which then asks over TCP), whole over TCP.
#[tokio::test]
async fn intercepting_large_upstream_answers_come_through_tcp() {
    let upstream = FakeUpstream::start().await;
    let server = intercepting(&upstream).await;
    let over_udp = server.udp("big.example.com.", RecordType::A, None).await;
    assert!(over_udp.metadata.truncation);
    assert!(!over_udp.answers.is_empty() && over_udp.answers.len() < 100, "{} answers", over_udp.answers.len());
    let over_tcp = server.tcp("big.example.com.", RecordType::A).await;
    assert!(!over_tcp.metadata.truncation);
    assert_eq!(over_tcp.answers.len(), 100);
    assert_eq!(resolve(&server.resolver(), "big.example.com.", RecordType::A).await.len(), 100);
}

#[tokio::test]
async fn intercepting_an_upstream_that_does_not_answer_gives_servfail() {
    let upstream = FakeUpstream::silent().await;
    let timeout = Duration::from_millis(300);
    let server = TestServer::intercepting(
        SEARCH,
        InterceptConfig { upstreams: vec![upstream.addr], upstream_timeout: timeout, ..InterceptConfig::default() },
    )
    .await;
    let started = tokio::time::Instant::now();
    let response = server.udp("www.example.com.", RecordType::A, None).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() >= timeout);
    // Mesh names do not wait on the upstream at all.
    let response = server.udp_within("catalog.", RecordType::A, None, Duration::from_secs(1)).await;
    assert_eq!(addresses(&response.answers), [CATALOG_VIP]);
}

#[tokio::test]
async fn intercepting_without_any_upstream_gives_servfail_at_once() {
    // No upstreams configured, and the resolv.conf names none (nor can be read, the second time).
    for resolv_conf in [Some(SEARCH), None] {
        let server = match resolv_conf {
            Some(text) => TestServer::intercepting(text, InterceptConfig::default()).await,
            None => {
                let missing = InterceptConfig { resolv_conf: temp_path("absent"), ..InterceptConfig::default() };
                TestServer::start_with(Some(missing)).await
            }
        };
        let response = server.udp_within("www.example.com.", RecordType::A, None, Duration::from_secs(1)).await;
        assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(addresses(&server.udp("catalog.", RecordType::A, None).await.answers), [CATALOG_VIP]);
    }
}
