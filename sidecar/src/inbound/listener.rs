//! The inbound listener: mTLS from peer sidecars, told apart from plaintext by the first byte.
//!
//! - A TLS handshake record is answered with this sidecar's certificate, whatever SNI and ALPN
//!   the client sends, and the client must present a leaf that chains to the trust bundle. The
//!   identity it proves travels with each request ([`Peer`]); ALPN says what follows: HTTP/2,
//!   HTTP/1.1, or [`ALPN_TCP`](ferry_tls::mesh::ALPN_TCP), an opaque connection relayed byte for
//!   byte to the app once authorization allows the caller.
//! - Plaintext is refused in `strict` mode (a plaintext HTTP client reads why), and served
//!   without an identity in `permissive` and `off` modes.
//!
//! Each connection is handed to a data-path worker before its handshake, which is bounded in
//! time; the connections open at once are capped, past which the listener stops accepting.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use ferry_proto::authz::Request as AuthzRequest;
use ferry_tls::Identity;
use http::Request;
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use super::{Inbound, Peer, authorize};
use crate::{
    http::server::ClientAddr,
    mesh::{Mesh, MtlsMode},
    metrics::{Metrics, ReasonLabels},
    workers::Workers,
};

/// Bounds of the inbound listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its first byte and finish its handshake.
    pub handshake_timeout: Duration,
    /// How long connecting to the app may take, for relayed TCP.
    pub connect_timeout: Duration,
}

/// With `--intercept`: connections arrive redirected from any port of the namespace, and each
/// goes to the app's port it was sent to, not only to `--app`'s.
///
/// The `--app` port is reached at `--app`'s host (usually `127.0.0.1`); any other port at the
/// address the connection was sent to (the namespace's own address), so that what the app
/// listens on only on loopback stays private, as it is without a mesh. The sidecar's own
/// listeners are never relayed to.
pub struct AppPorts {
    /// The proxy to the app at an address.
    pub make: Box<dyn Fn(SocketAddr) -> Inbound + Send + Sync>,
    /// The port of `--app`, served by the listener's own [`Inbound`].
    pub app_port: u16,
    /// The ports the sidecar itself listens on.
    pub own_ports: Vec<u16>,
    /// Ports where the app speaks opaque TCP (`--opaque-ports`), besides the `opaque_ports` of
    /// its service's policy: plaintext to them is relayed byte for byte without detection.
    pub opaque_ports: Vec<u16>,
    /// The app's own service, for its policy's `opaque_ports`.
    pub own_service: tokio::sync::watch::Receiver<crate::catalog::ServiceState>,
    /// How long plaintext may stay silent before it is relayed as opaque TCP.
    pub detect_timeout: Duration,
    /// The proxy of each other port seen.
    pub others: std::sync::Mutex<std::collections::HashMap<SocketAddr, Inbound>>,
}

/// The most other app ports kept ready; past it, a proxy is built per connection.
const MAX_APP_PORTS: usize = 256;

impl AppPorts {
    /// The proxy for a connection sent to `destination`; `None` for one of the sidecar's own
    /// ports.
    fn inbound(&self, base: &Inbound, destination: SocketAddr) -> Option<Inbound> {
        let port = destination.port();
        if port == self.app_port {
            return Some(base.clone());
        }
        if self.own_ports.contains(&port) {
            return None;
        }
        let mut others = ferry_runtime::lock(&self.others);
        if let Some(inbound) = others.get(&destination) {
            return Some(inbound.clone());
        }
        let inbound = (self.make)(destination);
        if others.len() < MAX_APP_PORTS {
            others.insert(destination, inbound.clone());
        }
        Some(inbound)
    }

    /// Whether the app speaks opaque TCP on `port`.
    fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
            || match &*self.own_service.borrow() {
                crate::catalog::ServiceState::Known(config) => {
                    config.policy.as_ref().is_some_and(|p| p.opaque_ports.contains(&u32::from(port)))
                }
                crate::catalog::ServiceState::Pending => false,
            }
    }
}

/// What every connection's task needs.
struct Shared {
    inbound: Inbound,
    ports: Option<AppPorts>,
    mesh: Mesh,
    metrics: Metrics,
    limits: Limits,
    open: Gauge,
    shutdown: CancellationToken,
}

/// Accepts connections on `listener` until `shutdown`, then gives open ones up to `drain`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    inbound: Inbound,
    mesh: Mesh,
    metrics: Metrics,
    limits: Limits,
    ports: Option<AppPorts>,
    open: Gauge,
    workers: Workers,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared { inbound, ports, mesh, metrics, limits, open, shutdown: shutdown.clone() });
    while let Some((permit, stream, peer)) = ferry_runtime::accept_capped(&listener, &slots, &shutdown, "inbound").await {
        let (stream, worker) = match workers.adopt(stream) {
            Ok(adopted) => adopted,
            Err(error) => {
                tracing::warn!(listener = "inbound", %error, "cannot hand the connection to a worker");
                continue;
            }
        };
        let shared = shared.clone();
        worker.spawn(tracker.track_future(async move {
            shared.open.inc();
            connection(&shared, stream, peer).await;
            shared.open.dec();
            drop(permit);
        }));
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::debug!(listener = "inbound", "connections still open after the drain period");
    }
}

impl Shared {
    fn refused(&self, reason: &'static str) {
        self.metrics.inbound_refused.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Serves one connection from its first byte to its end.
async fn connection(shared: &Shared, stream: TcpStream, addr: SocketAddr) {
    // Intercepting: the app's port the connection was sent to.
    let intercepted = shared.ports.as_ref().and_then(|ports| Some((ports, crate::intercept::original_destination(&stream)?)));
    let inbound = match intercepted {
        Some((ports, destination)) => match ports.inbound(&shared.inbound, destination) {
            Some(inbound) => inbound,
            None => {
                shared.refused("own_port");
                tracing::debug!(%addr, %destination, "refused a connection to one of the sidecar's own ports");
                return;
            }
        },
        None => shared.inbound.clone(),
    };
    let mode = shared.mesh.mode();
    let opaque = intercepted.is_some_and(|(ports, destination)| ports.is_opaque(destination.port()));
    if opaque && mode == MtlsMode::Off {
        // The app may be the one to speak first: with no mTLS, a caller is relayed at once,
        // without waiting for its first byte.
        return relay(shared, &inbound, stream, addr, Peer(None)).await;
    }
    // Mesh callers begin with a TLS handshake at once. Intercepted, a plaintext caller that
    // stays silent is relayed after the detection timeout (the app may speak first), unless
    // only mTLS is taken.
    let timeout = shared.limits.handshake_timeout;
    let silent_relays = intercepted.is_some() && mode != MtlsMode::Strict;
    let peek_timeout = match intercepted {
        Some((ports, _)) if silent_relays => ports.detect_timeout,
        _ => timeout,
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(peek_timeout, stream.peek(&mut first)).await {
        Ok(Ok(1..)) => {}
        Ok(_) => return,
        Err(_) if silent_relays => return relay(shared, &inbound, stream, addr, Peer(None)).await,
        Err(_) => return shared.refused("timeout"),
    }
    if !ferry_tls::is_tls_handshake(&first) {
        if mode == MtlsMode::Strict {
            shared.refused("plaintext");
            tracing::debug!(%addr, "refused a plaintext connection: this listener takes mTLS only (--mtls strict)");
            return refuse_plaintext(stream).await;
        }
        if let Some((ports, _)) = intercepted {
            // Intercepted plaintext: HTTP is served request by request, anything else relayed.
            use crate::intercept::detect::{Detected, detect};
            if opaque {
                return relay(shared, &inbound, stream, addr, Peer(None)).await;
            }
            match detect(&stream, ports.detect_timeout).await {
                Detected::Protocol(protocol) if protocol.is_http() => {}
                Detected::Closed => return,
                _ => return relay(shared, &inbound, stream, addr, Peer(None)).await,
            }
        }
        return serve_http(shared, &inbound, stream, addr, Peer(None)).await;
    }
    if intercepted.is_some() && mode == MtlsMode::Off {
        // The app's own TLS: with no mTLS, mesh callers come in plaintext.
        return relay(shared, &inbound, stream, addr, Peer(None)).await;
    }
    if intercepted.is_some() && mode == MtlsMode::Permissive && !is_mesh_handshake(&stream, &shared.mesh, timeout).await {
        // The app's own TLS, from a caller outside the mesh: relayed to it untouched.
        return relay(shared, &inbound, stream, addr, Peer(None)).await;
    }
    if shared.mesh.mode() == MtlsMode::Off {
        shared.refused("handshake");
        tracing::debug!(%addr, "refused a TLS connection: this listener takes plaintext only (--mtls off)");
        return;
    }
    let Some(config) = shared.mesh.server_config() else {
        shared.refused("handshake");
        tracing::debug!(%addr, "refused a TLS connection: no trust bundle yet");
        return;
    };
    let accepted = match tokio::time::timeout(timeout, tokio_rustls::TlsAcceptor::from(config).accept(stream)).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(error)) => {
            shared.refused("handshake");
            let why = ferry_tls::verify::explain_io(&error).unwrap_or_else(|| error.to_string());
            tracing::debug!(%addr, error = %why, "inbound TLS handshake failed");
            return;
        }
        Err(_) => return shared.refused("timeout"),
    };
    let session = accepted.get_ref().1;
    // Verified during the handshake; a resumed session carries the leaf it was made with,
    // which must still be valid now.
    let identity = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .filter(|leaf| ferry_tls::verify::not_after(leaf).is_some_and(|end| end > std::time::SystemTime::now()))
        .and_then(|leaf| Identity::of_certificate(leaf).ok());
    let Some(identity) = identity else {
        shared.refused("handshake");
        tracing::debug!(%addr, "refused a TLS connection whose peer certificate is missing or expired");
        return;
    };
    let peer = Peer(Some(Arc::new(identity)));
    if session.alpn_protocol() == Some(ferry_tls::mesh::ALPN_TCP) {
        return relay(shared, &inbound, accepted, addr, peer).await;
    }
    serve_http(shared, &inbound, accepted, addr, peer).await;
}

/// Whether an intercepted TLS connection is a mesh caller's: its ClientHello names this
/// sidecar's identity (the SNI every caller's sidecar sends, `SERVICE.TRUST_DOMAIN`), rather than
/// a name of the app's own TLS.
async fn is_mesh_handshake(stream: &TcpStream, mesh: &Mesh, timeout: Duration) -> bool {
    use crate::intercept::detect::{Detected, Protocol, detect};
    let Some(issued) = mesh.identity() else { return true };
    let expected = format!("{}.{}", issued.identity.service, issued.identity.trust_domain);
    match detect(stream, timeout).await {
        Detected::Protocol(Protocol::Tls { sni: Some(sni) }) => sni.eq_ignore_ascii_case(&expected),
        // No name, or a ClientHello too slow to read whole: the mesh handshake decides.
        _ => true,
    }
}

/// Tells a plaintext client of a strict listener why it is refused, then closes.
async fn refuse_plaintext(mut stream: TcpStream) {
    let error = "mtls_required: this sidecar takes mTLS only (--mtls strict): call it through your own sidecar";
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\nx-ferry-error: {error}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{error}\n",
        error.len() + 1
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Serves HTTP/1.1 and HTTP/2 on one connection, every request carrying `peer`.
async fn serve_http<I>(shared: &Shared, inbound: &Inbound, io: I, addr: SocketAddr, peer: Peer)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = inbound.clone().map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ClientAddr(addr));
        request.extensions_mut().insert(peer.clone());
        request
    });
    let builder = crate::http::server::builder();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shared.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(listener = "inbound", %error, "connection ended with an error");
    }
}

/// Relays an opaque TCP connection to the app, if the caller may make it.
async fn relay<I>(shared: &Shared, inbound: &Inbound, mut tls: I, addr: SocketAddr, peer: Peer)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let service = inbound.service();
    let decision = authorize(&shared.mesh, &shared.metrics, service, &peer, &AuthzRequest::Tcp);
    if !decision.allowed() {
        tracing::info!(%addr, caller = %peer.describe(), because = %decision.because(), "closed a TCP connection the authorization policy refuses");
        let _ = tls.shutdown().await;
        return;
    }
    let app = inbound.app().address().to_owned();
    let connect = tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(app.as_str()));
    let mut upstream = match connect.await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            tracing::warn!(%app, %error, "cannot reach the app for a relayed TCP connection");
            return;
        }
        Err(_) => {
            tracing::warn!(%app, "the app did not accept a relayed TCP connection in time");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut tls, &mut upstream) => copied,
        () = shared.shutdown.cancelled() => return,
    };
    match copied {
        Ok((sent, received)) => tracing::debug!(%addr, sent, received, "relayed TCP connection closed"),
        Err(error) => tracing::debug!(%addr, %error, "relayed TCP connection ended with an error"),
    }
}
