//! A client bound to one endpoint, with pooled connections, that forwards requests in the
//! protocol they arrived in.
//!
//! HTTP/1.1 requests go over a pool of HTTP/1.1 connections; HTTP/2 requests (gRPC among them)
//! share a multiplexed h2c connection. Each data-path worker ([`crate::workers`]) has its own
//! pool and its own h2c connection, in a slot of the client: a request sent from a worker goes
//! out on a connection that worker drives, so the exchange stays on one thread. Callers off
//! the workers share one further slot. The request's authority is kept as it is (`catalog`,
//! not the endpoint's address), which is why this is written on hyper's connection API instead
//! of `hyper_util`'s legacy client, whose pool key is the authority it sends.
//!
//! Connections idle longer than [`ClientConfig::idle_timeout`] are closed, so that a sidecar
//! does not hold sockets open to endpoints it no longer calls (and does not send on one the
//! peer is about to close). A sweep per client looks every half timeout; an HTTP/1.1 connection
//! counts as idle from its last request (or the last sweep that saw it busy), the HTTP/2 one
//! from the end of its last stream.
//!
//! An endpoint whose identity the control plane knows (a sidecar serving mTLS) is reached over
//! TLS 1.3, presenting this sidecar's workload certificate and requiring that identity from
//! the peer, with ALPN saying which protocol follows. Sessions resume from a cache per endpoint
//! and protocol, so a new pooled connection rarely costs a full handshake.
//!
//! Errors say whether the request provably never left ([`ConnectError`], or a pooled connection
//! that closed before the request was written, which is retried once on a fresh connection) or
//! failed after it was sent ([`UpstreamError`]), because only the first is always safe to retry.

use ferry_runtime::lock;
use std::{
    fmt, io,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use http::{Request, Response, Uri, Version, header, uri::Scheme};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::either::Either;

use super::{Body, BoxError, Guarded, boxed};
use crate::mesh::Mesh;

/// A connection to an endpoint: plaintext, or mTLS.
pub type Conn = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// How connections to endpoints are made.
#[derive(Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// HTTP/1.1 connections (busy or idle) kept for reuse per endpoint. Requests beyond it still
    /// get a connection, used once; limiting concurrency is the circuit breaker's job.
    pub max_pooled_per_endpoint: usize,
    /// TCP keepalive on upstream connections, so a peer that vanished is noticed.
    pub tcp_keepalive: Duration,
    /// Pooled connections with no request for this long are closed.
    pub idle_timeout: Duration,
    /// The data path's workers: each gets connections of its own.
    pub workers: usize,
    /// The sidecar's trust, for endpoints reached over mTLS.
    pub mesh: Option<Mesh>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("workers", &self.workers)
            .field("mtls", &self.mesh.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            max_pooled_per_endpoint: 256,
            tcp_keepalive: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            workers: 0,
            mesh: None,
        }
    }
}

/// The connection to the endpoint could not be made: the request was never sent.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {address}: {reason}")]
pub struct ConnectError {
    pub address: String,
    pub reason: ConnectFailure,
}

/// Why a connection failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectFailure {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(Arc<io::Error>),
    #[error("handshake failed: {0}")]
    Handshake(Arc<hyper::Error>),
    #[error("the new connection closed before the request was written")]
    ClosedBeforeSend,
    /// The mTLS handshake failed: the peer is not who the control plane said, or not of this
    /// mesh, or this sidecar has no certificate yet.
    #[error("mTLS: {0}")]
    Tls(String),
}

/// The request was sent (or may have been) and the exchange failed.
#[derive(Debug, thiserror::Error)]
#[error("{address}: {source}")]
pub struct UpstreamError {
    pub address: String,
    #[source]
    pub source: hyper::Error,
}

/// A pooled client of one endpoint. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    /// One per worker, and one (the first) for callers off the workers.
    slots: Box<[Slot]>,
    /// Whether the idle sweep runs.
    sweeping: AtomicBool,
}

/// The connections of one worker.
struct Slot {
    /// HTTP/1.1 connections, busy ones included: a connection is ready again once its response
    /// has been read.
    pool_h1: Mutex<Vec<Pooled>>,
    h2: Mutex<H2>,
    /// Streams open on the HTTP/2 connection, and when the last one ended.
    h2_activity: Arc<Activity>,
}

impl Slot {
    fn new() -> Self {
        let h2_activity = Arc::new(Activity { streams: AtomicUsize::new(0), last_active: Mutex::new(Instant::now()) });
        Self { pool_h1: Mutex::default(), h2: Mutex::new(H2::None), h2_activity }
    }
}

/// A pooled HTTP/1.1 connection and when it was last seen in use.
struct Pooled {
    sender: http1::SendRequest<Body>,
    last_used: Instant,
}

#[derive(Debug)]
struct Activity {
    streams: AtomicUsize,
    last_active: Mutex<Instant>,
}

/// One HTTP/2 stream open, until its response body is dropped.
struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        *lock(&self.0.last_active) = Instant::now();
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where and how to connect. The HTTP/2 connect future owns a copy, not the client, so an
/// abandoned connect cannot keep the client alive.
#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    address: String,
    config: ClientConfig,
    /// For an endpoint reached over mTLS.
    tls: Option<Tls>,
}

/// The TLS configs of one endpoint, per protocol.
#[derive(Clone)]
struct Tls {
    h1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

type H2Connect = Shared<BoxFuture<'static, Result<http2::SendRequest<Body>, Arc<ConnectError>>>>;

enum H2 {
    None,
    Connecting(H2Connect),
    Ready(http2::SendRequest<Body>),
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("address", &self.inner.target.address).finish()
    }
}

impl Client {
    /// A client of `host:port` in plaintext. Nothing connects until the first request.
    pub fn new(host: impl Into<String>, port: u16, config: ClientConfig) -> Self {
        Self::build(host.into(), port, config, None)
    }

    /// A client of `host:port`, over mTLS requiring the peer to prove `identity` when one is
    /// given (and the config has the sidecar's trust).
    pub fn with_identity(host: impl Into<String>, port: u16, config: ClientConfig, identity: Option<Arc<str>>) -> Self {
        let tls = match (identity, &config.mesh) {
            (Some(identity), Some(mesh)) => {
                let configs = mesh
                    .client_config(identity.clone(), ferry_tls::mesh::ALPN_HTTP1)
                    .and_then(|h1| Ok((h1, mesh.client_config(identity.clone(), ferry_tls::mesh::ALPN_H2)?)));
                match configs {
                    Ok((h1, h2)) => Some(Tls { h1, h2, name: ferry_tls::mesh::server_name(&identity) }),
                    Err(error) => {
                        tracing::error!(%error, %identity, "cannot build the TLS config of an endpoint");
                        None
                    }
                }
            }
            _ => None,
        };
        Self::build(host.into(), port, config, tls)
    }

    fn build(host: String, port: u16, config: ClientConfig, tls: Option<Tls>) -> Self {
        let address = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let slots = (0..=config.workers).map(|_| Slot::new()).collect();
        let target = Target { host, port, address, config, tls };
        Self { inner: Arc::new(Inner { target, slots, sweeping: AtomicBool::new(false) }) }
    }

    /// Whether requests go over mTLS to a peer sidecar proving its identity.
    pub fn is_mtls(&self) -> bool {
        self.inner.target.tls.is_some()
    }

    /// The connections of the calling worker (or of callers off the workers).
    fn slot(&self) -> &Slot {
        let slots = &self.inner.slots;
        let index = match crate::workers::current() {
            Some(worker) if slots.len() > 1 => 1 + worker % (slots.len() - 1),
            _ => 0,
        };
        &slots[index]
    }

    /// The endpoint's `host:port`.
    pub fn address(&self) -> &str {
        &self.inner.target.address
    }

    /// Sends `request` to the endpoint in its own HTTP version.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        if request.version() == Version::HTTP_2 {
            let slot = self.slot();
            let stream = slot.open_stream();
            let response = self.send_h2(slot, request).await?;
            Ok(response.map(|body| boxed(Guarded::new(body, stream))))
        } else {
            Ok(self.send_h1(self.slot(), request).await?.map(boxed))
        }
    }

    /// Starts the idle sweep, once: it ends with the client.
    fn sweep(&self) {
        if self.inner.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let period = (self.inner.target.config.idle_timeout / 2).max(Duration::from_millis(100));
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(inner) = Weak::upgrade(&inner) else { return };
                inner.close_idle(Instant::now());
            }
        });
    }

    async fn send_h1(&self, slot: &Slot, mut request: Request<Body>) -> Result<Response<Incoming>, BoxError> {
        origin_form(&mut request);
        let pooled = self.checkout_h1(slot);
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(sender) => sender,
            None => {
                self.sweep();
                self.inner.target.connect_h1().await?
            }
        };
        let sent = sender.try_send_request(request);
        self.checkin_h1(slot, sender);
        match sent.await {
            Ok(response) => Ok(response),
            Err(mut error) => match error.take_message() {
                // A pooled connection closed before the request was written: the request never
                // left, so it is safe to send again on a new connection.
                Some(request) if reused => {
                    let mut sender = self.inner.target.connect_h1().await?;
                    let sent = sender.send_request(request);
                    self.checkin_h1(slot, sender);
                    sent.await.map_err(|source| self.upstream(source))
                }
                Some(_) => Err(Box::new(self.inner.target.connect_error(ConnectFailure::ClosedBeforeSend))),
                None => Err(self.upstream(error.into_error())),
            },
        }
    }

    async fn send_h2(&self, slot: &Slot, mut request: Request<Body>) -> Result<Response<Incoming>, BoxError> {
        absolute_form(&mut request);
        let mut sender = self.h2_sender(slot).await?;
        match sender.try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut error) => match error.take_message() {
                Some(request) => {
                    slot.forget_closed_h2();
                    let mut sender = self.h2_sender(slot).await?;
                    sender.send_request(request).await.map_err(|source| self.upstream(source))
                }
                None => Err(self.upstream(error.into_error())),
            },
        }
    }

    fn upstream(&self, source: hyper::Error) -> BoxError {
        Box::new(UpstreamError { address: self.inner.target.address.clone(), source })
    }

    /// Takes an idle HTTP/1.1 connection that can send now, dropping closed and expired ones.
    fn checkout_h1(&self, slot: &Slot) -> Option<http1::SendRequest<Body>> {
        let idle_timeout = self.inner.target.config.idle_timeout;
        let now = Instant::now();
        let mut pool = lock(&slot.pool_h1);
        // From the most recently returned: the others may idle out. Busy ones stay.
        let mut index = pool.len();
        while index > 0 {
            index -= 1;
            if pool[index].sender.is_closed() {
                pool.swap_remove(index);
            } else if pool[index].sender.is_ready() {
                let pooled = pool.swap_remove(index);
                if now.duration_since(pooled.last_used) <= idle_timeout {
                    return Some(pooled.sender);
                }
                // Expired: dropped, which closes it.
            }
        }
        None
    }

    /// Returns a connection to the pool. It is busy until its response is read; checkout skips
    /// it until then.
    fn checkin_h1(&self, slot: &Slot, sender: http1::SendRequest<Body>) {
        let mut pool = lock(&slot.pool_h1);
        if pool.len() < self.inner.target.config.max_pooled_per_endpoint && !sender.is_closed() {
            pool.push(Pooled { sender, last_used: Instant::now() });
        }
    }

    /// The shared HTTP/2 connection, connecting once for all concurrent callers.
    async fn h2_sender(&self, slot: &Slot) -> Result<http2::SendRequest<Body>, BoxError> {
        let connecting = {
            let mut h2 = lock(&slot.h2);
            match &*h2 {
                H2::Ready(sender) if !sender.is_closed() => return Ok(sender.clone()),
                H2::Connecting(connecting) => connecting.clone(),
                _ => {
                    self.sweep();
                    let target = self.inner.target.clone();
                    let connecting = async move { target.connect_h2().await.map_err(Arc::new) }.boxed().shared();
                    *h2 = H2::Connecting(connecting.clone());
                    connecting
                }
            }
        };
        let result = connecting.clone().await;
        let mut h2 = lock(&slot.h2);
        // Only the attempt still in the slot may fill or clear it: a late waiter of an older
        // attempt must not overwrite a newer one.
        let current = matches!(&*h2, H2::Connecting(slot) if slot.ptr_eq(&connecting));
        match result {
            Ok(sender) => {
                if current {
                    *h2 = H2::Ready(sender.clone());
                }
                Ok(sender)
            }
            Err(error) => {
                if current {
                    *h2 = H2::None;
                }
                Err(Box::new(ConnectError { address: error.address.clone(), reason: error.reason.clone() }))
            }
        }
    }
}

impl Slot {
    fn open_stream(&self) -> OpenStream {
        self.h2_activity.streams.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.h2_activity.clone())
    }

    /// Forgets the HTTP/2 connection if it has closed, so the next request connects anew.
    fn forget_closed_h2(&self) {
        let mut h2 = lock(&self.h2);
        if matches!(&*h2, H2::Ready(sender) if sender.is_closed()) {
            *h2 = H2::None;
        }
    }
}

impl Inner {
    /// Closes the connections idle for longer than the idle timeout.
    fn close_idle(&self, now: Instant) {
        for slot in &self.slots {
            slot.close_idle(now, self.target.config.idle_timeout, &self.target.address);
        }
    }
}

impl Slot {
    fn close_idle(&self, now: Instant, idle_timeout: Duration, address: &str) {
        let mut pool = lock(&self.pool_h1);
        pool.retain_mut(|c| {
            if !c.sender.is_ready() {
                // Busy (or closed): in use until at least now.
                c.last_used = now;
            }
            !c.sender.is_closed() && now.duration_since(c.last_used) <= idle_timeout
        });
        drop(pool);
        let idle = self.h2_activity.streams.load(Ordering::Acquire) == 0
            && now.duration_since(*lock(&self.h2_activity.last_active)) > idle_timeout;
        let mut h2 = lock(&self.h2);
        if idle && matches!(&*h2, H2::Ready(_)) {
            // Dropping the last sender closes the connection.
            tracing::debug!(%address, "closing the idle HTTP/2 connection");
            *h2 = H2::None;
        }
    }
}

impl Target {
    fn connect_error(&self, reason: ConnectFailure) -> ConnectError {
        ConnectError { address: self.address.clone(), reason }
    }

    /// Connects, over mTLS with `alpn`'s config when the endpoint has an identity; the
    /// handshake counts against the connect timeout.
    async fn connect(&self, h2: bool) -> Result<TokioIo<Conn>, ConnectError> {
        let timeout = self.config.connect_timeout;
        let connect = async {
            let stream = crate::intercept::own::connect(self.host.as_str(), self.port)
                .await
                .map_err(|e| self.connect_error(ConnectFailure::Io(Arc::new(e))))?;
            let _ = stream.set_nodelay(true);
            let keepalive = TcpKeepalive::new().with_time(self.config.tcp_keepalive).with_interval(self.config.tcp_keepalive);
            if let Err(error) = SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
                tracing::debug!(address = %self.address, %error, "cannot set TCP keepalive");
            }
            let Some(tls) = &self.tls else { return Ok(Either::Left(stream)) };
            let config = if h2 { tls.h2.clone() } else { tls.h1.clone() };
            let connector = tokio_rustls::TlsConnector::from(config);
            match connector.connect(tls.name.clone(), stream).await {
                Ok(stream) => Ok(Either::Right(stream)),
                Err(error) => {
                    let why = ferry_tls::verify::explain_io(&error).unwrap_or_else(|| error.to_string());
                    Err(self.connect_error(ConnectFailure::Tls(why)))
                }
            }
        };
        let stream =
            tokio::time::timeout(timeout, connect).await.map_err(|_| self.connect_error(ConnectFailure::Timeout(timeout)))??;
        Ok(TokioIo::new(stream))
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<Body>, ConnectError> {
        let io = self.connect(false).await?;
        let (mut sender, connection) =
            http1::Builder::new().handshake(io).await.map_err(|e| self.connect_error(ConnectFailure::Handshake(Arc::new(e))))?;
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%address, %error, "HTTP/1.1 connection ended");
            }
        });
        sender.ready().await.map_err(|e| self.connect_error(ConnectFailure::Handshake(Arc::new(e))))?;
        Ok(sender)
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<Body>, ConnectError> {
        let io = self.connect(true).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|e| self.connect_error(ConnectFailure::Handshake(Arc::new(e))))?;
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%address, %error, "HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }
}

/// HTTP/1.1 sends the path in the request line and the authority in `Host`.
fn origin_form(request: &mut Request<Body>) {
    if let Some(authority) = request.uri().authority().cloned()
        && !request.headers().contains_key(header::HOST)
        && let Ok(host) = authority.as_str().parse()
    {
        request.headers_mut().insert(header::HOST, host);
    }
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = path.parse::<Uri>() {
        *request.uri_mut() = uri;
    }
}

/// HTTP/2 needs `:scheme` and `:authority`, taken from `Host` when the URI lacks them.
fn absolute_form(request: &mut Request<Body>) {
    if request.uri().scheme().is_some() && request.uri().authority().is_some() {
        return;
    }
    let authority = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| "localhost".to_owned());
    let mut parts = request.uri().clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority.parse().ok();
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::http::empty;

    #[test]
    fn http1_requests_use_origin_form_and_keep_the_authority_in_host() {
        let mut request = Request::builder().uri("http://catalog:80/items?x=1").body(empty()).expect("valid");
        origin_form(&mut request);
        assert_eq!(request.uri(), "/items?x=1");
        assert_eq!(request.headers()[header::HOST], "catalog:80");
    }

    #[test]
    fn http2_requests_get_scheme_and_authority_from_host() {
        let mut request = Request::builder()
            .version(Version::HTTP_2)
            .uri("/pkg.Svc/Call")
            .header(header::HOST, "inventory")
            .body(empty())
            .expect("valid");
        absolute_form(&mut request);
        assert_eq!(request.uri(), "http://inventory/pkg.Svc/Call");
    }

    /// An HTTP/1.1 + h2c server that counts the connections it accepts, and those still open.
    async fn counting_server() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (connections, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counted, still_open) = (connections.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                still_open.fetch_add(1, Ordering::SeqCst);
                let still_open = still_open.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_request| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(bytes::Bytes::from("ok"))))
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    still_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, connections, open)
    }

    async fn get(client: &Client, version: Version) -> StatusCode {
        let request = Request::builder().version(version).uri("/").header(header::HOST, "svc").body(empty()).expect("valid");
        let response = client.send(request).await.expect("answers");
        let status = response.status();
        http_body_util::BodyExt::collect(response.into_body()).await.expect("body");
        status
    }

    #[tokio::test]
    async fn http1_connections_are_reused() {
        let (addr, connections, _) = counting_server().await;
        let client = Client::new("127.0.0.1", addr.port(), ClientConfig::default());
        for _ in 0..5 {
            assert_eq!(get(&client, Version::HTTP_11).await, StatusCode::OK);
            tokio::task::yield_now().await;
        }
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_http2_requests_share_one_connection() {
        let (addr, connections, _) = counting_server().await;
        let client = Client::new("127.0.0.1", addr.port(), ClientConfig::default());
        let requests: Vec<_> = (0..10).map(|_| get(&client, Version::HTTP_2)).collect();
        for status in futures::future::join_all(requests).await {
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn each_worker_sends_on_connections_of_its_own() {
        let (addr, connections, _) = counting_server().await;
        let workers = crate::workers::Workers::start(2).expect("workers");
        let config = ClientConfig { workers: workers.count(), ..ClientConfig::default() };
        let client = Client::new("127.0.0.1", addr.port(), config);
        for version in [Version::HTTP_11, Version::HTTP_2] {
            for _ in 0..3 {
                // Round robin: the first request of each pair runs on worker 0, the second on 1.
                for _ in 0..2 {
                    let client = client.clone();
                    let status = workers.next().spawn(async move { get(&client, version).await }).await.expect("ran");
                    assert_eq!(status, StatusCode::OK);
                }
            }
        }
        assert_eq!(
            connections.load(Ordering::SeqCst),
            4,
            "one HTTP/1.1 and one HTTP/2 connection per worker, each reused by its worker's requests"
        );
        workers.stop();
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, connections, open) = counting_server().await;
        let config = ClientConfig { idle_timeout: Duration::from_secs(90), ..ClientConfig::default() };
        let client = Client::new("127.0.0.1", addr.port(), config);
        let both = || async {
            assert_eq!(get(&client, Version::HTTP_11).await, StatusCode::OK);
            assert_eq!(get(&client, Version::HTTP_2).await, StatusCode::OK);
        };
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        both().await;
        assert_eq!(connections.load(Ordering::SeqCst), 2);

        // Idle for less than the timeout: kept, and reused.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(80)).await;
        settle().await;
        tokio::time::resume();
        both().await;
        assert_eq!(connections.load(Ordering::SeqCst), 2, "reused within the idle timeout");

        // Idle for longer: the sweep closes both, with no request to notice it.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(200)).await;
        settle().await;
        tokio::time::resume();
        for _ in 0..200 {
            if open.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(open.load(Ordering::SeqCst), 0, "the server saw both connections close");
        both().await;
        assert_eq!(connections.load(Ordering::SeqCst), 4, "new connections after the idle ones closed");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        // Bound but not listening: refuses connections, and no other test can take the port.
        let closed = tokio::net::TcpSocket::new_v4().expect("socket");
        closed.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let port = closed.local_addr().expect("addr").port();
        let client = Client::new("127.0.0.1", port, ClientConfig::default());
        let request = Request::builder().uri("/").body(empty()).expect("valid");
        let error = client.send(request).await.expect_err("nothing listens");
        assert!(error.is::<ConnectError>(), "{error}");
    }
}
