//! Ferry's DNS interface: answers for the mesh's names so that apps which only know how to
//! resolve a host name can still find a service's routable instances or its virtual IP.
//!
//! The control plane answers from its registry and the sidecar from the config it holds; both
//! implement [`Directory`] and hand it to [`serve`], which runs hickory-server on a UDP socket and
//! a TCP listener. The zone is `ferry.`:
//!
//! | name | types | answer |
//! |---|---|---|
//! | `NAME.service.ferry.` | A, AAAA | the routable instances with an IPv4 / IPv6 address, rotated per query |
//! | `TAG.NAME.service.ferry.` | A, AAAA | the same, only instances whose `version` label is TAG (e.g. `v2`) |
//! | either of the above | SRV | every routable instance: priority 1, weight 1, its port, target `HEX.addr.ferry.` (with its A/AAAA as additional) or its host name |
//! | `NAME.vip.ferry.` | A, AAAA | the service's virtual IP, as A or AAAA by its family (NODATA for the other family); NXDOMAIN when there is no such service, NODATA when it has no virtual IP yet, SERVFAIL when the directory cannot tell |
//! | `HEX.addr.ferry.` | A, AAAA | the address spelled by 8 (IPv4) or 32 (IPv6) hex digits |
//! | `ferry.` | SOA | the zone's SOA |
//! | `service.ferry.`, `vip.ferry.`, `addr.ferry.` | any | NODATA: they exist only as parents |
//!
//! Each alias domain of [`ServeConfig::aliases`] (`consul.` unless configured otherwise, see
//! [`AliasDomain`]) holds the same names under its own name, so that apps and resolvers set up
//! for Consul find the mesh's services unchanged, plus Consul's RFC 2782 spelling of a service:
//!
//! | name | types | answer |
//! |---|---|---|
//! | `NAME.service.consul.`, `NAME.vip.consul.`, `HEX.addr.consul.`, `consul.` | as under `ferry.` | as under `ferry.`, SRV targets `HEX.addr.consul.` |
//! | `TAG.NAME.service.consul.` | as under `ferry.` | only instances whose Consul tags ([`TAGS_LABEL`]) include TAG, as Consul answers; an instance without a tag list (registered through Ferry's own API) by its `version` label ([`DnsEndpoint::matches_tag`]) |
//! | `_NAME._tcp.service.consul.` | SRV; A, AAAA | as `NAME.service.consul.` |
//! | `_NAME._TAG.service.consul.` | SRV; A, AAAA | as `TAG.NAME.service.consul.`: a protocol label other than `_tcp` is a tag, as Consul reads it |
//!
//! Owner names are spelled as the question spelled them, and negative answers carry the SOA of
//! the domain asked about. An alias such as `dc1.consul.` gives Consul's datacenter spelling
//! (`NAME.service.dc1.consul.`); where aliases nest, a name belongs to the longest.
//!
//! Instances registered with a host name rather than an IP literal have no address this server
//! could give, so they are left out of A and AAAA answers and appear only as SRV targets.
//!
//! Negative answers follow RFC 2308: a service with no registered instance, or any other name
//! under `ferry.` the zone cannot hold, is NXDOMAIN; a service that exists but has nothing to
//! show for the type asked (no routable instance, or a type such as TXT) is NODATA (NOERROR, no
//! answers). Both carry the zone's SOA in the authority section, with TTL and MINIMUM set to
//! [`DnsConfig::negative_ttl`], which bounds how long resolvers cache the absence. Names outside
//! `ferry.` and its aliases are REFUSED: this server is not a recursive resolver. Names are
//! case-insensitive.
//!
//! An intercepting sidecar is the exception: iptables redirect its app's port-53 queries to it,
//! so it is the app's only resolver, and it serves with [`serve_intercepting`]. There a mesh
//! service's name stands for its virtual IP, so that every connection to the service goes
//! through the sidecar's balancer, and every other name is forwarded:
//!
//! | name | types | answer |
//! |---|---|---|
//! | `NAME.service.ferry.`, `NAME.vip.ferry.`, and the same under each alias (`NAME.service.consul.`, `_NAME._tcp.service.consul.`) for a service the address table knows | A, AAAA | the virtual IP by its family, NODATA for the other family and every other type (but SRV of `NAME.service.ferry.`); a service without a virtual IP keeps its instances under `NAME.service.ferry.` |
//! | `NAME.service.ferry.`, `TAG.NAME.service.ferry.` (and their alias spellings) | SRV; A, AAAA | the instances, as above |
//! | the bare `NAME.`, and `NAME.S.`, `NAME.service.D.S.`, `NAME.vip.D.S.` for each search domain S of resolv.conf and D `ferry` or an alias | any | for a service with a virtual IP: the virtual IP by its family, NODATA (without SOA) for every other type, at once; for any other NAME, forwarded |
//! | any other name under `ferry.` | any | as without interception: never forwarded |
//! | any other name under an alias: a service the address table does not know (or cannot tell of yet), Consul's `X.node.`, `X.query.`, `X.connect.`, the alias itself | any | forwarded, so that during a migration the app still reaches a real Consul; `HEX.addr.` names (targets of this server's own SRV answers) excepted |
//! | every other name | any | forwarded to the upstream resolvers, the answer relayed (rcode and sections); SERVFAIL when none answers or none is configured |
//!
//! Whether a bare name, or a service name under an alias, is a service is asked of
//! [`Directory::virtual_ip`] only, which a sidecar answers from its mesh-wide address table: the
//! names an app looks up cost no subscription.
//!
//! Answers too large for UDP, relayed ones too, are truncated with the TC bit set (RFC 1035
//! section 4.2.1, or the payload size the client advertises with EDNS, RFC 6891, up to 1232
//! bytes), so resolvers
//! retry over TCP, which carries the full answer. hickory-server does this when it encodes a UDP
//! response; see the `handler` module for the details and `tests/serve.rs` for the proof.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::future::BoxFuture;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

mod answer;
mod domain;
mod forward;
mod handler;
mod limit;
mod name;
#[cfg(test)]
mod properties;
mod resolv_conf;
mod respond;

pub use domain::{AliasDomain, InvalidAliasDomain};
pub use forward::{MAX_CONCURRENT_FORWARDS, UPSTREAM_TIMEOUT};
pub use limit::RateLimit;
pub use respond::{LOOKUP_TIMEOUT, MAX_CONCURRENT_LOOKUPS};

use crate::{
    forward::Forwarder,
    resolv_conf::ResolvConf,
    respond::{Intercept, Responder},
};

/// How long a TCP connection may stay idle between queries before the server closes it.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many responses may queue for one TCP connection (hickory's per-connection buffer).
const TCP_RESPONSE_BUFFER: usize = 32;

/// The metadata label whose value `TAG.NAME.service.ferry.` matches.
pub const VERSION_LABEL: &str = "version";
/// The metadata label that holds the tags an instance was registered with through Consul's API,
/// as a JSON list of strings (`["primary","version=v2"]`), which `TAG.NAME.service.consul.`
/// matches.
pub const TAGS_LABEL: &str = "consul.tags";

/// Which kind of domain a name was asked under, which decides what its `TAG` label matches
/// ([`DnsEndpoint::matches_tag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneKind {
    /// `ferry.`: `TAG` is a version.
    Ferry,
    /// An alias such as `consul.`: `TAG` is a Consul tag, as Consul's own DNS reads it.
    Alias,
}

/// One routable instance as DNS shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoint {
    /// The instance id, for logs.
    pub id: String,
    /// An IP literal, or a host name (which A/AAAA answers leave out).
    pub address: String,
    /// The port, for SRV answers.
    pub port: u16,
    /// The instance's [`VERSION_LABEL`], which `TAG.NAME.service.ferry.` matches.
    pub version: Option<String>,
    /// The instance's tags (those it was registered with through Consul's API, [`TAGS_LABEL`]),
    /// which `TAG.NAME.service.consul.` matches; empty for instances that have none.
    pub tags: Vec<String>,
    /// Whether the instance has a tag list at all (a [`TAGS_LABEL`] that is a JSON list, even an
    /// empty one), which is what an instance registered through Consul's API has. Under an
    /// alias, an instance with a list is matched on its tags alone, as Consul would; one without
    /// (registered through Ferry's own API) on its version.
    pub has_tag_list: bool,
}

impl DnsEndpoint {
    /// The endpoint of an instance with these `metadata` labels: its version from
    /// [`VERSION_LABEL`], its tags from [`TAGS_LABEL`] (none, and no tag list, when that label is
    /// not a JSON list of strings: a lookup is no place to fail over a label).
    pub fn from_metadata(id: String, address: String, port: u16, metadata: &BTreeMap<String, String>) -> Self {
        let tags: Option<Vec<String>> = metadata.get(TAGS_LABEL).and_then(|list| serde_json::from_str(list).ok());
        Self {
            id,
            address,
            port,
            version: metadata.get(VERSION_LABEL).cloned(),
            has_tag_list: tags.is_some(),
            tags: tags.unwrap_or_default(),
        }
    }

    /// Whether `TAG.NAME.service.DOMAIN.` holds this instance, for a DOMAIN of kind `zone`:
    /// under `ferry.` when its `version` is `tag`; under an alias when its tags include `tag`,
    /// or, for an instance without a tag list, when its `version` is `tag`. Both ignore ASCII
    /// case, as DNS does.
    pub fn matches_tag(&self, tag: &str, zone: ZoneKind) -> bool {
        let is_tag = |own: &String| own.eq_ignore_ascii_case(tag);
        match zone {
            ZoneKind::Alias if self.has_tag_list => self.tags.iter().any(is_tag),
            ZoneKind::Ferry | ZoneKind::Alias => self.version.as_ref().is_some_and(is_tag),
        }
    }
}

/// What a [`Directory`] knows of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The routable (passing/warning) endpoints; empty when the service exists but none is
    /// routable (=> NODATA).
    Endpoints(Vec<DnsEndpoint>),
    /// No instance of the service is registered (=> NXDOMAIN).
    NoSuchService,
    /// The directory cannot tell now, say a sidecar with no config for the service and no
    /// control plane to ask (=> SERVFAIL, which resolvers do not cache as an absence).
    Unknown,
}

impl From<Option<Vec<DnsEndpoint>>> for Lookup {
    fn from(found: Option<Vec<DnsEndpoint>>) -> Self {
        found.map_or(Self::NoSuchService, Self::Endpoints)
    }
}

/// What a [`Directory`] knows of a service's virtual IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtualIpLookup {
    /// The service's virtual IP.
    Assigned(std::net::IpAddr),
    /// The service exists but has no virtual IP yet (=> NODATA).
    Unassigned,
    /// No instance of the service is registered (=> NXDOMAIN).
    NoSuchService,
    /// The directory cannot tell now (=> SERVFAIL).
    Unknown,
}

/// Where answers come from.
pub trait Directory: Send + Sync + 'static {
    /// What is known of `service`. May wait briefly (the sidecar subscribes on demand), at most
    /// [`LOOKUP_TIMEOUT`], after which the query is answered SERVFAIL.
    fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup>;

    /// The virtual IP of `service`, for `NAME.vip.ferry.`. A directory without virtual IPs
    /// answers that no service has one.
    ///
    /// An intercepting server also asks it whether each bare name the app looks up (and each
    /// search-domain spelling of one, and each service name under an alias) is a service, so
    /// there it must be quick and must not subscribe to anything: most such names are not the
    /// mesh's.
    fn virtual_ip(&self, service: &str) -> BoxFuture<'_, VirtualIpLookup> {
        let _ = service;
        Box::pin(std::future::ready(VirtualIpLookup::NoSuchService))
    }
}

/// How answers are cached by the resolvers that receive them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// TTL of every record in a positive answer, in whole seconds (default 5 s): short, because
    /// instances come and go.
    pub ttl: Duration,
    /// TTL and MINIMUM of the SOA in negative answers, which bounds how long a resolver caches
    /// NXDOMAIN and NODATA (RFC 2308 section 5; default 5 s).
    pub negative_ttl: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self { ttl: Duration::from_secs(5), negative_ttl: Duration::from_secs(5) }
    }
}

/// What a server answers and how: [`serve`] and [`serve_intercepting`] take it, or a bare
/// [`DnsConfig`], which stands for that config with the default aliases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// How resolvers cache the answers.
    pub cache: DnsConfig,
    /// The domains answered like `ferry.` besides it (default [`AliasDomain::defaults`],
    /// `consul.`); empty for none. Repeats do no harm.
    pub aliases: Vec<AliasDomain>,
    /// How UDP answers are rate limited (see [`RateLimit`]).
    pub rate_limit: RateLimit,
}

impl Default for ServeConfig {
    fn default() -> Self {
        DnsConfig::default().into()
    }
}

impl From<DnsConfig> for ServeConfig {
    fn from(cache: DnsConfig) -> Self {
        Self { cache, aliases: AliasDomain::defaults(), rate_limit: RateLimit::default() }
    }
}

/// How an intercepting server ([`serve_intercepting`]) reaches beyond the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    /// The resolvers that names outside the mesh are forwarded to, tried in order; when empty,
    /// the `nameserver`s of [`InterceptConfig::resolv_conf`].
    pub upstreams: Vec<SocketAddr>,
    /// The resolver config of the app's host (default /etc/resolv.conf), read once when the
    /// server starts: its `search` (or `domain`) list gives the spellings under which the app's
    /// resolver asks for mesh names, and its nameservers are the upstreams unless
    /// [`InterceptConfig::upstreams`] names some.
    pub resolv_conf: PathBuf,
    /// How long each upstream may take to answer before the next is tried.
    pub upstream_timeout: Duration,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        Self { upstreams: Vec::new(), resolv_conf: PathBuf::from("/etc/resolv.conf"), upstream_timeout: UPSTREAM_TIMEOUT }
    }
}

/// Binds a UDP socket and a TCP listener on the same address. With port 0 both get one free
/// port: UDP picks it, and when TCP finds that port taken, another is tried.
pub async fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last_error = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) if addr.port() == 0 && error.kind() == io::ErrorKind::AddrInUse => last_error = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no port free for both UDP and TCP")))
}

/// Serves DNS on `udp` and `tcp` until `shutdown` is cancelled: `ferry.` and the aliases of
/// `config`.
///
/// Both sockets must already be bound. Returns once the listeners have stopped; an error if they
/// stopped on their own, before `shutdown`.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    directory: Arc<dyn Directory>,
    config: impl Into<ServeConfig>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let config = config.into();
    run(udp, tcp, Responder::new(directory, &config, None), config.rate_limit, shutdown).await
}

/// Serves DNS as the only resolver of an app whose port-53 traffic is redirected to `udp` and
/// `tcp`, until `shutdown` is cancelled: the `ferry.` zone and its aliases as [`serve`] does,
/// mesh services' names as their virtual IPs, and every other name forwarded upstream (see the
/// crate docs).
///
/// A resolv.conf that cannot be read costs the search-domain spellings (and, without
/// [`InterceptConfig::upstreams`], every outside name: SERVFAIL), not the server: it is logged.
pub async fn serve_intercepting(
    udp: UdpSocket,
    tcp: TcpListener,
    directory: Arc<dyn Directory>,
    config: impl Into<ServeConfig>,
    intercept: InterceptConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let config = config.into();
    let resolv_conf = read_resolv_conf(&intercept.resolv_conf).await;
    let own = udp.local_addr()?;
    let configured = if intercept.upstreams.is_empty() { resolv_conf.nameservers } else { intercept.upstreams };
    let (upstreams, loops): (Vec<SocketAddr>, Vec<SocketAddr>) =
        configured.into_iter().partition(|upstream| !is_own_address(*upstream, own));
    if !loops.is_empty() {
        tracing::warn!(?loops, "DNS upstreams left out: they are this server itself, and would send queries back to it");
    }
    if upstreams.is_empty() {
        tracing::warn!(
            resolv_conf = %intercept.resolv_conf.display(),
            "no DNS upstream: none configured and no usable nameserver in the resolver config; \
             names outside the mesh will be answered SERVFAIL"
        );
    } else {
        let search: Vec<String> = resolv_conf.search.iter().map(ToString::to_string).collect();
        tracing::info!(?upstreams, ?search, "DNS intercepting: mesh names answered, other names forwarded");
    }
    let intercept = Intercept { search: resolv_conf.search, forwarder: Forwarder::new(upstreams, intercept.upstream_timeout) };
    run(udp, tcp, Responder::new(directory, &config, Some(intercept)), config.rate_limit, shutdown).await
}

/// The resolver config at `path`, or an empty one (logged) when it cannot be read.
async fn read_resolv_conf(path: &Path) -> ResolvConf {
    match ResolvConf::read(path).await {
        Ok(conf) => conf,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the resolver config: no search domains, no nameservers from it");
            ResolvConf::default()
        }
    }
}

/// Whether `upstream` is the server listening on `own`: the same address, or the same port on
/// a loopback address when the server listens on every address.
fn is_own_address(upstream: SocketAddr, own: SocketAddr) -> bool {
    upstream == own || (own.ip().is_unspecified() && upstream.port() == own.port() && upstream.ip().is_loopback())
}

async fn run(
    udp: UdpSocket,
    tcp: TcpListener,
    responder: Responder,
    limit: RateLimit,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut server = Server::new(handler::DnsHandler::new(responder, limit::ResponseLimiter::new(limit)));
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);

    // The listeners run until hickory's own shutdown token is cancelled; they end earlier only if
    // their socket fails for good, which must not go unnoticed.
    let stopped = tokio::select! {
        () = shutdown.cancelled() => None,
        result = server.block_until_done() => Some(result),
    };
    match stopped {
        None => server.shutdown_gracefully().await.map_err(io::Error::other),
        Some(result) => {
            result.map_err(io::Error::other)?;
            Err(io::Error::other("DNS listeners stopped before shutdown"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_read_their_version_and_consul_tags_from_metadata() {
        let metadata = BTreeMap::from([
            (VERSION_LABEL.to_owned(), "v2".to_owned()),
            (TAGS_LABEL.to_owned(), r#"["primary","version=v2"]"#.to_owned()),
        ]);
        let endpoint = DnsEndpoint::from_metadata("c1".into(), "10.0.0.1".into(), 80, &metadata);
        assert_eq!(endpoint.version.as_deref(), Some("v2"));
        assert_eq!(endpoint.tags, ["primary", "version=v2"]);
        assert!(endpoint.has_tag_list);
        assert!(endpoint.matches_tag("Primary", ZoneKind::Alias) && !endpoint.matches_tag("v2", ZoneKind::Alias));
        assert!(endpoint.matches_tag("V2", ZoneKind::Ferry) && !endpoint.matches_tag("primary", ZoneKind::Ferry));

        let empty = BTreeMap::from([(VERSION_LABEL.to_owned(), "v2".to_owned()), (TAGS_LABEL.to_owned(), "[]".to_owned())]);
        let endpoint = DnsEndpoint::from_metadata("c2".into(), "10.0.0.2".into(), 80, &empty);
        assert!(endpoint.has_tag_list && endpoint.tags.is_empty(), "an empty list is a list");
        assert!(!endpoint.matches_tag("v2", ZoneKind::Alias) && endpoint.matches_tag("v2", ZoneKind::Ferry));

        let malformed =
            BTreeMap::from([(VERSION_LABEL.to_owned(), "v2".to_owned()), (TAGS_LABEL.to_owned(), "primary".to_owned())]);
        let endpoint = DnsEndpoint::from_metadata("c3".into(), "10.0.0.3".into(), 80, &malformed);
        assert_eq!((endpoint.has_tag_list, endpoint.tags.len()), (false, 0), "a label that is no list holds no tags");
        assert!(endpoint.matches_tag("v2", ZoneKind::Alias), "without a tag list, an alias falls back to the version");
    }

    #[test]
    fn a_bare_dns_config_serves_the_default_aliases() {
        let config = ServeConfig::from(DnsConfig::default());
        assert_eq!(config.aliases, [AliasDomain::consul()]);
        assert_eq!(ServeConfig::default(), config);
    }
}
