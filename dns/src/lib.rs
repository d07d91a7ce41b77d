//! Ferry's DNS interface: answers for the mesh's names so that apps which only know how to
//! resolve a host name can still find a service's routable instances.
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
//! | `HEX.addr.ferry.` | A, AAAA | the address spelled by 8 (IPv4) or 32 (IPv6) hex digits |
//!
//! Instances registered with a host name rather than an IP literal have no address this server
//! could give, so they are left out of A and AAAA answers and appear only as SRV targets.
//!
//! Negative answers follow RFC 2308: a service with no registered instance, or any other name
//! under `ferry.` the zone cannot hold, is NXDOMAIN; a service that exists but has nothing to
//! show for the type asked (no routable instance, or a type such as TXT) is NODATA (NOERROR, no
//! answers). Both carry the zone's SOA in the authority section, with TTL and MINIMUM set to
//! [`DnsConfig::negative_ttl`], which bounds how long resolvers cache the absence. Names outside
//! `ferry.` are REFUSED: this server is not a recursive resolver. Names are case-insensitive.
//!
//! Answers too large for UDP are truncated with the TC bit set (RFC 1035 section 4.2.1, or the
//! payload size the client advertises with EDNS, RFC 6891), so resolvers retry over TCP, which
//! carries the full answer. hickory-server does this when it encodes a UDP response; see the
//! `handler` module for the details and `tests/serve.rs` for the proof.

#![forbid(unsafe_code)]

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

mod answer;
mod handler;
mod name;

pub use handler::{LOOKUP_TIMEOUT, MAX_CONCURRENT_LOOKUPS};

/// How long a TCP connection may stay idle between queries before the server closes it.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many responses may queue for one TCP connection (hickory's per-connection buffer).
const TCP_RESPONSE_BUFFER: usize = 32;

/// One routable instance as DNS shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEndpoint {
    /// The instance id, for logs.
    pub id: String,
    /// An IP literal, or a host name (which A/AAAA answers leave out).
    pub address: String,
    /// The port, for SRV answers.
    pub port: u16,
    /// The instance's `version` metadata label, which `TAG.NAME.service.ferry.` matches.
    pub version: Option<String>,
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

/// Serves DNS on `udp` and `tcp` until `shutdown` is cancelled.
///
/// Both sockets must already be bound. Returns once the listeners have stopped; an error if they
/// stopped on their own, before `shutdown`.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    directory: Arc<dyn Directory>,
    config: DnsConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let responder = handler::Responder::new(directory, &config);
    let mut server = Server::new(handler::DnsHandler::new(responder));
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
