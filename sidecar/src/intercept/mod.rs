//! Intercepted outbound connections (`--intercept`): the outbound listener takes the
//! connections that `ferry-sidecar iptables install` redirected to it from the app.
//!
//! For each connection the sidecar reads where the app was connecting (`SO_ORIGINAL_DST`, IPv4
//! and IPv6) and looks it up in the mesh's address table ([`crate::addresses`]):
//!
//! - a service's virtual IP (any port), or the address of one of a service's endpoints: the
//!   connection goes to that service. Its protocol is detected on the first bytes
//!   ([`detect`]): HTTP/1.x and HTTP/2 (h2c, gRPC) are served request by request through the
//!   service's routes, balancer and policies, exactly as in proxy mode; TLS and anything else
//!   are relayed as opaque TCP to one of its endpoints, as a `protocol=tcp` upstream is. Ports
//!   declared opaque (`--opaque-ports`, the service policy's `opaque_ports`) skip detection, so
//!   a protocol where the server speaks first never waits for it.
//! - anything else is outside the mesh: relayed untouched (`--outbound-policy allow`, the
//!   default) or closed (`deny`).
//! - a connection made to the listener itself, not redirected, is served as in proxy mode
//!   (`HTTP_PROXY` and Host-addressed requests keep working).
//!
//! The sidecar's own connections must not be redirected back to it: `iptables install` exempts
//! the sidecar's user or group. One that comes back anyway is noticed (its source is one this
//! sidecar opened, see [`own`]) and closed with an error that says what to fix.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::Request;
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use prometheus_client::metrics::gauge::Gauge;
use socket2::SockRef;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use self::detect::{Detected, Protocol};
use crate::addresses::Destination;
use crate::{
    catalog::{Catalog, ServiceState},
    config::OutboundPolicy,
    http::server::ClientAddr,
    metrics::{InterceptLabels, Metrics},
    outbound::Outbound,
    tcp::{TcpConfig, TcpUpstream},
    workers::Workers,
};

pub mod detect;
pub mod own;

/// The most intercepted connections open at once; past it, new ones wait in the backlog.
const MAX_OPEN: usize = 16_384;

/// How intercepted connections are handled.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    pub outbound_policy: OutboundPolicy,
    /// Destination ports relayed as opaque TCP without detection.
    pub opaque_ports: Vec<u16>,
    pub detect_timeout: Duration,
    pub discovery_timeout: Duration,
    pub connect_timeout: Duration,
}

/// The intercepting outbound listener's state. Cheap to clone.
#[derive(Clone)]
pub struct Intercept {
    inner: Arc<Inner>,
}

struct Inner {
    catalog: Arc<Catalog>,
    /// The proxy for HTTP: `fixed` to the service a connection goes to.
    outbound: Outbound,
    tcp: TcpConfig,
    config: InterceptConfig,
    metrics: Metrics,
    /// The opaque relay of each service a connection went to.
    upstreams: Mutex<HashMap<Arc<str>, TcpUpstream>>,
    shutdown: CancellationToken,
}

impl Intercept {
    pub fn new(
        catalog: Arc<Catalog>,
        outbound: Outbound,
        tcp: TcpConfig,
        config: InterceptConfig,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        own::enable();
        let inner = Inner { catalog, outbound, tcp, config, metrics, upstreams: Mutex::default(), shutdown };
        Self { inner: Arc::new(inner) }
    }

    /// Accepts connections on `listener` until shutdown, each on the next of `workers`, then
    /// gives open ones up to `drain` to end.
    pub async fn serve(self, listener: TcpListener, open: Gauge, workers: Workers, drain: Duration) {
        let slots = Arc::new(Semaphore::new(MAX_OPEN));
        let tracker = TaskTracker::new();
        let shutdown = self.inner.shutdown.clone();
        while let Some((permit, stream, peer)) = ferry_runtime::accept_capped(&listener, &slots, &shutdown, "outbound").await {
            let (stream, worker) = match workers.adopt(stream) {
                Ok(adopted) => adopted,
                Err(error) => {
                    tracing::warn!(listener = "outbound", %error, "cannot hand the connection to a worker");
                    continue;
                }
            };
            let inner = self.inner.clone();
            let open = open.clone();
            worker.spawn(tracker.track_future(async move {
                open.inc();
                inner.connection(stream, peer).await;
                open.dec();
                drop(permit);
            }));
        }
        drop(listener);
        tracker.close();
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::debug!(listener = "outbound", "connections still open after the drain period");
        }
    }
}

/// Where `stream` was going before a `REDIRECT` rule sent it here; `None` when it was not
/// redirected (or the kernel cannot tell).
pub fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = SockRef::from(stream);
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if v4 { socket.original_dst_v4() } else { socket.original_dst_v6() };
    let original = original.ok()?.as_socket()?;
    let same = |a: SocketAddr, b: SocketAddr| canonical(a) == canonical(b);
    (!same(original, local)).then_some(original)
}

pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().map_or(addr, |ip| SocketAddr::new(ip.into(), v6.port())),
        SocketAddr::V4(_) => addr,
    }
}

impl Inner {
    /// Serves one accepted connection from its first byte to its end.
    async fn connection(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Some(destination) = original_destination(&stream) else {
            // Made to the listener itself: proxy mode.
            return self.serve_http(stream, peer, self.outbound.clone()).await;
        };
        if own::is_own(peer, destination) {
            self.count("-", "loop", "none");
            tracing::error!(
                %peer,
                %destination,
                "a connection this sidecar opened was redirected back to it: run the sidecar as the user or group given to `ferry-sidecar iptables install --proxy-uid/--proxy-gid`"
            );
            return;
        }
        if self.catalog.addresses_version() == 0 && !self.wait_for_table().await {
            // Taken for a destination outside the mesh, a connection to an instance would leave
            // in plaintext: refused until the table says what is in the mesh.
            self.count("-", "refused", "none");
            tracing::warn!(%peer, %destination, timeout = ?self.config.discovery_timeout, "closing an intercepted connection: no address table from the control plane yet");
            return;
        }
        let table = self.catalog.addresses();
        match table.resolve(destination) {
            Some(found) => {
                let pin = matches!(found, Destination::Endpoint(_)).then_some(destination);
                self.to_service(stream, peer, destination, found.service().clone(), pin).await;
            }
            None => self.egress(stream, peer, destination).await,
        }
    }

    /// Waits up to the discovery timeout for the first address table; whether it came.
    async fn wait_for_table(&self) -> bool {
        let mut applied = self.catalog.applied();
        let arrived = async {
            while self.catalog.addresses_version() == 0 {
                if applied.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(self.config.discovery_timeout, arrived).await;
        self.catalog.addresses_version() != 0
    }

    /// A connection to `service`: served as HTTP, or relayed as opaque TCP.
    ///
    /// HTTP is balanced over the service whatever address it was sent to; an opaque connection
    /// sent to one instance's address (`pin`) goes to that instance.
    async fn to_service(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        destination: SocketAddr,
        service: Arc<str>,
        pin: Option<SocketAddr>,
    ) {
        let state = match self.catalog.watch(&service) {
            Ok(state) => state,
            Err(error) => {
                self.count(&service, "refused", "none");
                tracing::warn!(%service, %destination, %error, "closing an intercepted connection");
                return;
            }
        };
        let port = destination.port();
        let mut opaque = self.config.opaque_ports.contains(&port);
        if !opaque {
            // The service's policy may declare the port opaque: its config is needed first.
            let mut state = state.clone();
            let known =
                tokio::time::timeout(self.config.discovery_timeout, state.wait_for(|s| matches!(s, ServiceState::Known(_))))
                    .await;
            if let Ok(Ok(state)) = known
                && let ServiceState::Known(config) = &*state
            {
                opaque = config.policy.as_ref().is_some_and(|p| p.opaque_ports.contains(&u32::from(port)));
            }
        }
        let protocol = if opaque {
            Protocol::Opaque
        } else {
            match detect::detect(&stream, self.config.detect_timeout).await {
                Detected::Protocol(protocol) => protocol,
                Detected::Silent => {
                    tracing::debug!(%service, %destination, timeout = ?self.config.detect_timeout, "the client sent nothing: relaying as opaque TCP (declare the port opaque to skip the wait)");
                    Protocol::Opaque
                }
                Detected::Closed => return,
            }
        };
        self.count(&service, "service", protocol.as_str());
        if let Protocol::Tls { sni } = &protocol {
            tracing::debug!(%service, %destination, %peer, sni = sni.as_deref().unwrap_or("none"), "relaying TLS as opaque TCP");
        }
        if protocol.is_http() {
            let edge = self.outbound.fixed(service);
            return self.serve_http(stream, peer, edge).await;
        }
        let upstream = {
            let mut upstreams = ferry_runtime::lock(&self.upstreams);
            upstreams
                .entry(service.clone())
                .or_insert_with(|| TcpUpstream::new(service.clone(), state, self.tcp.clone(), self.metrics.clone()))
                .clone()
        };
        tokio::select! {
            () = upstream.relay_to(stream, peer, pin) => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// A connection to an address outside the mesh.
    async fn egress(&self, mut stream: TcpStream, peer: SocketAddr, destination: SocketAddr) {
        if self.config.outbound_policy == OutboundPolicy::Deny {
            self.count("-", "denied", "none");
            tracing::debug!(%peer, %destination, "closed a connection to an address outside the mesh (--outbound-policy deny)");
            return;
        }
        self.count("-", "egress", "none");
        let connected = tokio::time::timeout(self.config.connect_timeout, own::connect_addr(destination)).await;
        let mut upstream = match connected {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(error)) => return tracing::debug!(%peer, %destination, %error, "outbound connection outside the mesh failed"),
            Err(_) => return tracing::debug!(%peer, %destination, "outbound connection outside the mesh timed out"),
        };
        let _ = upstream.set_nodelay(true);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => {
                if let Err(error) = copied {
                    tracing::debug!(%peer, %destination, %error, "outbound connection outside the mesh ended with an error");
                }
            }
            () = self.shutdown.cancelled() => {}
        }
    }

    /// Serves HTTP/1.1 and HTTP/2 on one connection with `edge`.
    async fn serve_http(&self, stream: TcpStream, peer: SocketAddr, edge: Outbound) {
        let service = edge.map_request(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            request
        });
        let builder = crate::http::server::builder();
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            tracing::debug!(listener = "outbound", %error, "connection ended with an error");
        }
    }

    fn count(&self, service: &str, destination: &'static str, protocol: &'static str) {
        let labels = InterceptLabels { service: service.into(), destination, protocol };
        self.metrics.intercepted.get_or_create(&labels).inc();
    }
}
