//! Opaque TCP upstreams: `--upstream NAME=ADDR,protocol=tcp`.
//!
//! The sidecar listens on `ADDR` and relays each accepted connection, byte for byte, to one
//! routable endpoint of the service `NAME`, following the service's state in the
//! [`Catalog`](crate::catalog::Catalog) as the HTTP balancer does. Nothing is parsed, so routes,
//! subsets and policies (which match HTTP requests) do not apply; health does.
//!
//! Balancing is per connection: the endpoint with the fewest connections open through this
//! listener, ties broken round-robin. Connections can live for hours, so counting what is open
//! spreads load better than rotating. A connect that fails or times out is tried again on another
//! endpoint: each endpoint at most once, at most [`MAX_ATTEMPTS`] endpoints per connection. A
//! connection that cannot be placed is closed after a warning that says why.
//!
//! The endpoints are dialled as registered. An endpoint with an identity is a peer sidecar's
//! inbound listener: it is reached over mTLS with the ALPN `ferry/tcp`, and that sidecar relays
//! the bytes to its app once its authorization policy allows this caller. Any other endpoint
//! (an app registered with its own address through the API) is dialled in plaintext.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tokio_util::{either::Either, sync::CancellationToken};

use crate::{
    catalog::{Endpoint, ServiceConfig, ServiceState},
    errors::{DiscoveryTimeout, NoEndpoints, UnknownService},
    mesh::Mesh,
    metrics::{Metrics, ServiceLabels, TcpLabels},
    workers::Workers,
};

/// The most endpoints one connection tries before it is given up.
pub const MAX_ATTEMPTS: usize = 3;

/// The most connections one listener relays at once; beyond it, new ones wait in the backlog.
const MAX_OPEN: usize = 16_384;

/// How one TCP upstream connects.
#[derive(Clone)]
pub struct TcpConfig {
    /// How long a connection to a service with no config yet waits for it.
    pub discovery_timeout: Duration,
    /// How long connecting to one endpoint may take.
    pub connect_timeout: Duration,
    /// TCP keepalive on connections to endpoints, so a peer that vanished is noticed.
    pub keepalive: Duration,
    /// The sidecar's trust, for endpoints reached over mTLS.
    pub mesh: Option<Mesh>,
}

/// Relays connections to one service. Cheap to clone; clones share the connection counts.
#[derive(Clone)]
pub struct TcpUpstream {
    shared: Arc<Shared>,
}

struct Shared {
    service: Arc<str>,
    state: watch::Receiver<ServiceState>,
    config: TcpConfig,
    open: Mutex<Open>,
    metrics: Metrics,
}

/// The connections open through one listener.
#[derive(Default)]
struct Open {
    /// Per endpoint; endpoints with none are absent.
    counts: HashMap<EndpointKey, usize>,
    /// The endpoint picked last, from which ties go on in turn.
    last: Option<EndpointKey>,
}

/// An endpoint as connections see it: where they go.
type EndpointKey = (String, u16);

/// One connection counted against its endpoint until dropped.
struct Lease {
    shared: Arc<Shared>,
    key: EndpointKey,
}

/// Why a connection could not be placed on an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    DiscoveryTimeout(#[from] DiscoveryTimeout),
    #[error(transparent)]
    UnknownService(#[from] UnknownService),
    #[error(transparent)]
    NoEndpoints(#[from] NoEndpoints),
    #[error(transparent)]
    ConnectFailed(#[from] ConnectFailed),
}

/// Every endpoint tried refused the connection or did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {service} failed at every endpoint tried ({} of {routable} passing): {}", failures.len(), failures.join("; "))]
pub struct ConnectFailed {
    pub service: Arc<str>,
    pub routable: usize,
    /// One line per endpoint tried: its address and what went wrong.
    pub failures: Vec<String>,
}

impl PlaceError {
    /// The reason code, as in `x-ferry-error` and the `outcome` label.
    pub fn code(&self) -> &'static str {
        match self {
            Self::DiscoveryTimeout(_) => "discovery_timeout",
            Self::UnknownService(_) => "unknown_service",
            Self::NoEndpoints(_) => "no_endpoints",
            Self::ConnectFailed(_) => "connect_failed",
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut open = self.shared.lock_open();
        if let Some(count) = open.counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.counts.remove(&self.key);
            }
        }
    }
}

/// Counts a connection in the open-connections gauge until dropped, however its task ends.
struct OpenGauge(Gauge);

impl OpenGauge {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl TcpUpstream {
    /// Relays connections to `service`, following its `state`.
    pub fn new(service: Arc<str>, state: watch::Receiver<ServiceState>, config: TcpConfig, metrics: Metrics) -> Self {
        let shared = Shared { service, state, config, open: Mutex::default(), metrics };
        Self { shared: Arc::new(shared) }
    }

    /// Accepts connections on `listener` and relays each until `shutdown`; then stops accepting
    /// and gives open connections up to `close` to end before cutting them.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken, close: Duration, workers: Workers) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept(), if connections.len() < MAX_OPEN => match accepted {
                    Ok((stream, peer)) => {
                        match workers.adopt(stream) {
                            Ok((stream, worker)) => {
                                connections.spawn_on(self.clone().relay(stream, peer), worker);
                            }
                            Err(error) => {
                                tracing::warn!(service = %self.shared.service, %error, "cannot hand the connection to a worker");
                            }
                        }
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(listener = "upstream", service = %self.shared.service, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                () = shutdown.cancelled() => break,
            }
        }
        drop(listener);
        let drained = tokio::time::timeout(close, async { while connections.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::debug!(service = %self.shared.service, open = connections.len(), "closing TCP connections still open");
        }
    }

    /// Relays one accepted connection, or closes it with a warning when it cannot be placed.
    pub async fn relay(self, inbound: TcpStream, peer: SocketAddr) {
        self.relay_to(inbound, peer, None).await;
    }

    /// Relays one accepted connection to the endpoint at `pin` when given (a connection the app
    /// addressed to one instance: members of a cluster protocol are not interchangeable), else
    /// to the endpoint with the fewest connections.
    pub async fn relay_to(self, mut inbound: TcpStream, peer: SocketAddr, pin: Option<SocketAddr>) {
        let shared = &self.shared;
        let _ = inbound.set_nodelay(true);
        let keepalive = shared.config.keepalive;
        let mesh = shared.config.mesh.clone();
        let placed = self
            .place_in(pin, |endpoint: &Endpoint| {
                let (endpoint, mesh) = (endpoint.clone(), mesh.clone());
                async move {
                    let stream = connect(endpoint.address.clone(), endpoint.port, keepalive).await?;
                    match (&endpoint.identity, mesh) {
                        (Some(identity), Some(mesh)) => secure(stream, identity, &mesh).await.map(Either::Right),
                        _ => Ok(Either::Left(stream)),
                    }
                }
            })
            .await;
        let outcome = |outcome| TcpLabels { service: shared.service.clone(), outcome };
        let (mut upstream, lease) = match placed {
            Ok(placed) => placed,
            Err(error) => {
                shared.metrics.tcp_connections.get_or_create(&outcome(error.code())).inc();
                tracing::warn!(
                    service = %shared.service,
                    %peer,
                    reason = error.code(),
                    error = %ferry_runtime::error_chain(&error),
                    "closing a TCP connection that could not be placed"
                );
                return;
            }
        };
        shared.metrics.tcp_connections.get_or_create(&outcome("connected")).inc();
        let _open = OpenGauge::new(
            shared.metrics.tcp_connections_open.get_or_create(&ServiceLabels { service: shared.service.clone() }).clone(),
        );
        let endpoint = format!("{}:{}", lease.key.0, lease.key.1);
        tracing::debug!(service = %shared.service, %peer, %endpoint, "relaying a TCP connection");
        match tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await {
            Ok((sent, received)) => {
                tracing::debug!(service = %shared.service, %peer, %endpoint, sent, received, "TCP connection closed")
            }
            Err(error) => {
                tracing::debug!(service = %shared.service, %peer, %endpoint, %error, "TCP connection ended with an error")
            }
        }
        drop(lease);
    }

    /// Connects to an endpoint of the service with `connect`, trying another endpoint when one
    /// fails, and returns the connection with its lease on the endpoint.
    #[cfg(test)]
    async fn place<C, Fut, T>(&self, connect: C) -> Result<(T, Lease), PlaceError>
    where
        C: FnMut(&Endpoint) -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        self.place_in(None, connect).await
    }

    /// [`TcpUpstream::place`], among the endpoint at `pin` alone when given.
    async fn place_in<C, Fut, T>(&self, pin: Option<SocketAddr>, mut connect: C) -> Result<(T, Lease), PlaceError>
    where
        C: FnMut(&Endpoint) -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        let shared = &self.shared;
        let mut config = shared.wait_for_config().await?;
        let mut tried: Vec<EndpointKey> = Vec::with_capacity(MAX_ATTEMPTS);
        let mut failures = Vec::with_capacity(MAX_ATTEMPTS);
        for _ in 0..MAX_ATTEMPTS {
            let Some((endpoint, lease)) = shared.pick(&config, &tried, pin)? else { break };
            tried.push(lease.key.clone());
            let address = format!("{}:{}", endpoint.address, endpoint.port);
            let timeout = shared.config.connect_timeout;
            let failure = match tokio::time::timeout(timeout, connect(&endpoint)).await {
                Ok(Ok(stream)) => return Ok((stream, lease)),
                Ok(Err(error)) => format!("{address}: {error}"),
                Err(_) => format!("{address}: timed out after {timeout:?}"),
            };
            tracing::debug!(service = %shared.service, error = %failure, "TCP connect failed; trying another endpoint");
            failures.push(failure);
            drop(lease);
            // Endpoints may have changed while this one was tried.
            if let Some(current) = shared.known() {
                config = current;
            }
        }
        Err(ConnectFailed { service: shared.service.clone(), routable: config.routable(), failures }.into())
    }
}

impl Shared {
    fn lock_open(&self) -> MutexGuard<'_, Open> {
        ferry_runtime::lock(&self.open)
    }

    /// The service's config, if the control plane has sent one.
    fn known(&self) -> Option<Arc<ServiceConfig>> {
        match &*self.state.borrow() {
            ServiceState::Known(config) => Some(config.clone()),
            ServiceState::Pending => None,
        }
    }

    /// The service's config, waiting for the first one up to the discovery timeout.
    async fn wait_for_config(&self) -> Result<Arc<ServiceConfig>, DiscoveryTimeout> {
        let timeout = DiscoveryTimeout { service: self.service.clone(), timeout: self.config.discovery_timeout };
        if let Some(config) = self.known() {
            return Ok(config);
        }
        let mut state = self.state.clone();
        let known = tokio::time::timeout(self.config.discovery_timeout, state.wait_for(|s| matches!(s, ServiceState::Known(_))));
        match known.await {
            Ok(Ok(state)) => match &*state {
                ServiceState::Known(config) => Ok(config.clone()),
                ServiceState::Pending => Err(timeout),
            },
            Ok(Err(_)) | Err(_) => Err(timeout),
        }
    }

    /// The routable endpoint not in `tried` with the fewest open connections, counted as one
    /// more; `None` when every routable endpoint was tried. Ties go in turn: to the first tied
    /// endpoint after the one picked last, in the order of endpoint ids.
    fn pick(
        self: &Arc<Self>,
        config: &ServiceConfig,
        tried: &[EndpointKey],
        pin: Option<SocketAddr>,
    ) -> Result<Option<(Arc<Endpoint>, Lease)>, PlaceError> {
        if !config.exists {
            return Err(UnknownService(self.service.clone()).into());
        }
        let pinned = |e: &Endpoint| {
            pin.is_none_or(|pin| e.port == pin.port() && e.address.parse::<std::net::IpAddr>().is_ok_and(|ip| ip == pin.ip()))
        };
        let routable: Vec<(&Arc<Endpoint>, EndpointKey)> = config
            .endpoints
            .values()
            .filter(|e| e.health.is_routable() && pinned(e))
            .map(|e| (e, (e.address.clone(), e.port)))
            .collect();
        if routable.is_empty() {
            return Err(NoEndpoints { service: self.service.clone(), subset: None, total: config.endpoints.len() }.into());
        }
        let mut open = self.lock_open();
        let count = |key: &EndpointKey| open.counts.get(key).copied().unwrap_or(0);
        let untried = || routable.iter().enumerate().filter(|(_, (_, key))| !tried.contains(key));
        let Some(fewest) = untried().map(|(_, (_, key))| count(key)).min() else { return Ok(None) };
        let after = open.last.as_ref().and_then(|last| routable.iter().position(|(_, key)| key == last)).map_or(0, |i| i + 1);
        let n = routable.len();
        let chosen = untried().filter(|(_, (_, key))| count(key) == fewest).min_by_key(|(i, _)| (i + n - after % n) % n);
        let Some((_, (endpoint, key))) = chosen else { return Ok(None) };
        let (endpoint, key) = ((*endpoint).clone(), key.clone());
        *open.counts.entry(key.clone()).or_insert(0) += 1;
        open.last = Some(key.clone());
        drop(open);
        Ok(Some((endpoint, Lease { shared: self.clone(), key })))
    }
}

/// Connects to `host:port`, with no Nagle delay and with TCP keepalive.
async fn connect(host: String, port: u16, keepalive: Duration) -> io::Result<TcpStream> {
    let stream = crate::intercept::own::connect(host.as_str(), port).await?;
    // With nothing listening, a connect from an ephemeral port to itself can succeed (TCP
    // simultaneous open); that is no server.
    if stream.local_addr().ok() == stream.peer_addr().ok() {
        return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "nothing listening (connected to itself)"));
    }
    stream.set_nodelay(true)?;
    SockRef::from(&stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(keepalive))?;
    Ok(stream)
}

/// The mTLS handshake with a peer sidecar that must prove `identity`, asking it to relay bytes.
async fn secure(stream: TcpStream, identity: &Arc<str>, mesh: &Mesh) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = mesh.client_config(identity.clone(), ferry_tls::mesh::ALPN_TCP).map_err(io::Error::other)?;
    tokio_rustls::TlsConnector::from(config).connect(ferry_tls::mesh::server_name(identity), stream).await.map_err(|error| {
        let why = ferry_tls::verify::explain_io(&error).unwrap_or_else(|| error.to_string());
        io::Error::other(format!("mTLS: {why}"))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferry_health::Health;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn endpoint(id: &str, port: u16, health: Health) -> (String, Arc<Endpoint>) {
        let endpoint = Endpoint {
            id: id.to_owned(),
            address: "127.0.0.1".into(),
            port,
            health,
            metadata: BTreeMap::new(),
            region: String::new(),
            zone: String::new(),
            weight: 100,
            identity: None,
        };
        (id.to_owned(), Arc::new(endpoint))
    }

    fn known(version: u64, endpoints: Vec<(String, Arc<Endpoint>)>) -> ServiceState {
        ServiceState::Known(Arc::new(ServiceConfig {
            name: "db".into(),
            version,
            exists: !endpoints.is_empty(),
            endpoints: endpoints.into_iter().collect(),
            route: None,
            policy: None,
            virtual_ip: None,
        }))
    }

    /// Endpoints a, b, c, ... on ports 1, 2, 3, ..., all passing.
    fn passing(n: u16) -> ServiceState {
        known(1, (1..=n).map(|port| endpoint(&((b'a' + port as u8 - 1) as char).to_string(), port, Health::Passing)).collect())
    }

    fn upstream(state: &watch::Sender<ServiceState>) -> TcpUpstream {
        let config = TcpConfig {
            discovery_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            keepalive: Duration::from_secs(30),
            mesh: None,
        };
        TcpUpstream::new("db".into(), state.subscribe(), config, Metrics::unregistered())
    }

    /// A connector that reaches every endpoint and answers with its id.
    fn reach_all(endpoint: &Endpoint) -> futures::future::Ready<io::Result<String>> {
        futures::future::ready(Ok(endpoint.id.clone()))
    }

    fn open_counts(upstream: &TcpUpstream) -> BTreeMap<u16, usize> {
        upstream.shared.lock_open().counts.iter().map(|((_, port), count)| (*port, *count)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_sent_to_one_instance_stays_with_it() {
        let state = watch::Sender::new(passing(3));
        let upstream = upstream(&state);
        let pin = Some(SocketAddr::from(([127, 0, 0, 1], 2)));
        let mut held = Vec::new();
        for _ in 0..4 {
            let (id, lease) = upstream.place_in(pin, reach_all).await.expect("placed");
            assert_eq!(id, "b", "the instance addressed, however busy");
            held.push(lease);
        }
        let gone = Some(SocketAddr::from(([127, 0, 0, 1], 9)));
        let error = upstream.place_in(gone, reach_all).await.err().expect("no such instance");
        assert_eq!(error.code(), "no_endpoints");
    }

    #[tokio::test(start_paused = true)]
    async fn connections_go_to_the_endpoint_with_fewest_open_ties_in_turn() {
        let state = watch::Sender::new(passing(3));
        let upstream = upstream(&state);
        let mut held = Vec::new();
        let mut order = Vec::new();
        for _ in 0..6 {
            let (id, lease) = upstream.place(reach_all).await.expect("placed");
            order.push(id);
            held.push(lease);
        }
        assert_eq!(order, ["a", "b", "c", "a", "b", "c"], "equal counts rotate");
        assert_eq!(open_counts(&upstream), BTreeMap::from([(1, 2), (2, 2), (3, 2)]));

        // b's connections close: b has the fewest, so it gets the next two.
        held.retain(|lease| lease.key.1 != 2);
        for _ in 0..2 {
            let (id, lease) = upstream.place(reach_all).await.expect("placed");
            assert_eq!(id, "b");
            held.push(lease);
        }
        drop(held);
        assert!(open_counts(&upstream).is_empty(), "every lease gave its count back");
    }

    #[tokio::test(start_paused = true)]
    async fn short_connections_alternate_between_the_least_busy_endpoints() {
        let state = watch::Sender::new(passing(3));
        let upstream = upstream(&state);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(upstream.place(reach_all).await.expect("placed").0);
        }
        assert_eq!(order, ["a", "b", "c"]);

        // a, next in turn, holds a long connection; b and c share the short ones evenly.
        let (id, _long) = upstream.place(reach_all).await.expect("placed");
        assert_eq!(id, "a");
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(upstream.place(reach_all).await.expect("placed").0);
        }
        assert_eq!(order, ["b", "c", "b", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn only_passing_and_warning_endpoints_take_connections() {
        let state = watch::Sender::new(known(
            1,
            vec![endpoint("a", 1, Health::Critical), endpoint("b", 2, Health::Warning), endpoint("c", 3, Health::Draining)],
        ));
        let upstream = upstream(&state);
        for _ in 0..3 {
            assert_eq!(upstream.place(reach_all).await.expect("placed").0, "b");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connect_is_retried_on_another_endpoint() {
        let state = watch::Sender::new(passing(2));
        let upstream = upstream(&state);
        let attempts = Mutex::new(Vec::new());
        for _ in 0..4 {
            let (id, _lease) = upstream
                .place(|endpoint: &Endpoint| {
                    attempts.lock().expect("not poisoned").push(endpoint.id.clone());
                    futures::future::ready(if endpoint.id == "a" {
                        Err(io::Error::from(io::ErrorKind::ConnectionRefused))
                    } else {
                        Ok(endpoint.id.clone())
                    })
                })
                .await
                .expect("placed on b");
            assert_eq!(id, "b");
            assert!(!open_counts(&upstream).contains_key(&1), "the failed attempt is not counted as open");
        }
        let attempts = attempts.into_inner().expect("not poisoned");
        assert_eq!(attempts.iter().filter(|id| *id == "a").count(), 4, "a is tried first in turn each time: {attempts:?}");
        assert_eq!(attempts.iter().filter(|id| *id == "b").count(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn each_endpoint_is_tried_once_and_at_most_three_in_all() {
        let state = watch::Sender::new(passing(5));
        let upstream = upstream(&state);
        let attempts = Mutex::new(Vec::new());
        let refuse = |endpoint: &Endpoint| {
            attempts.lock().expect("not poisoned").push(endpoint.id.clone());
            futures::future::ready(Err::<(), _>(io::Error::from(io::ErrorKind::ConnectionRefused)))
        };
        let error = upstream.place(refuse).await.err().expect("every endpoint refuses");
        assert_eq!(error.code(), "connect_failed");
        let mut tried = attempts.lock().expect("not poisoned").clone();
        assert_eq!(tried.len(), MAX_ATTEMPTS, "{tried:?}");
        tried.sort();
        tried.dedup();
        assert_eq!(tried.len(), MAX_ATTEMPTS, "no endpoint twice");
        assert!(
            error.to_string().starts_with("connecting to db failed at every endpoint tried (3 of 5 passing): 127.0.0.1:"),
            "{error}"
        );

        // With two endpoints, two attempts and no more.
        state.send_replace(passing(2));
        attempts.lock().expect("not poisoned").clear();
        let error = upstream.place(refuse).await.err().expect("both refuse");
        assert_eq!(attempts.lock().expect("not poisoned").len(), 2);
        let ConnectFailed { failures, .. } = match error {
            PlaceError::ConnectFailed(failed) => failed,
            other => panic!("expected connect_failed, got {other}"),
        };
        assert_eq!(failures.len(), 2);
        assert!(open_counts(&upstream).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_that_hangs_times_out_and_moves_on() {
        let state = watch::Sender::new(passing(2));
        let upstream = upstream(&state);
        let started = tokio::time::Instant::now();
        let (id, _lease) = upstream
            .place(|endpoint: &Endpoint| {
                let id = endpoint.id.clone();
                async move {
                    if id == "a" {
                        std::future::pending::<()>().await;
                    }
                    Ok(id)
                }
            })
            .await
            .expect("placed on b");
        assert_eq!(id, "b");
        assert_eq!(started.elapsed(), Duration::from_secs(1), "a got the connect timeout, no more");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_before_the_first_config_waits_for_it_within_the_bound() {
        let state = watch::Sender::new(ServiceState::Pending);
        let upstream = upstream(&state);
        let waiting = tokio::spawn({
            let upstream = upstream.clone();
            async move { upstream.place(reach_all).await.map(|(id, _)| id) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        state.send_replace(passing(1));
        assert_eq!(waiting.await.expect("joins").expect("placed"), "a");

        let never = watch::Sender::new(ServiceState::Pending);
        let starved = self::upstream(&never);
        let started = tokio::time::Instant::now();
        let error = starved.place(reach_all).await.err().expect("times out");
        assert_eq!(error.code(), "discovery_timeout");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_services_and_services_without_passing_endpoints_are_refused() {
        let state = watch::Sender::new(known(1, vec![]));
        let upstream = upstream(&state);
        let error = upstream.place(reach_all).await.err().expect("unknown");
        assert_eq!(error.code(), "unknown_service");

        state.send_replace(known(2, vec![endpoint("a", 1, Health::Critical)]));
        let error = upstream.place(reach_all).await.err().expect("none passing");
        assert_eq!(error.code(), "no_endpoints");
        assert_eq!(error.to_string(), "db has 0 of 1 passing");
    }

    #[tokio::test]
    async fn relays_bytes_both_ways_and_skips_a_refusing_endpoint() {
        // An echo server, and a port that is bound but not listening (it refuses, and no other
        // test can take it meanwhile).
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_port = echo.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        let closed = tokio::net::TcpSocket::new_v4().expect("socket");
        closed.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let closed_port = closed.local_addr().expect("addr").port();
        let state = watch::Sender::new(known(
            1,
            vec![endpoint("closed", closed_port, Health::Passing), endpoint("echo", echo_port, Health::Passing)],
        ));
        let metrics = Metrics::unregistered();
        let config = TcpConfig {
            discovery_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            keepalive: Duration::from_secs(30),
            mesh: None,
        };
        let upstream = TcpUpstream::new("db".into(), state.subscribe(), config, metrics.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let workers = Workers::start(2).expect("workers");
        let server = tokio::spawn(upstream.serve(listener, shutdown.clone(), Duration::from_secs(1), workers));

        for i in 0..6 {
            let mut client = TcpStream::connect(addr).await.expect("connects");
            let message = format!("hello {i}");
            client.write_all(message.as_bytes()).await.expect("writes");
            client.shutdown().await.expect("half-closes");
            let mut echoed = String::new();
            client.read_to_string(&mut echoed).await.expect("reads");
            assert_eq!(echoed, message);
        }
        let connected = TcpLabels { service: "db".into(), outcome: "connected" };
        assert_eq!(metrics.tcp_connections.get_or_create(&connected).get(), 6);
        shutdown.cancel();
        server.await.expect("stops");
        assert_eq!(metrics.tcp_connections_open.get_or_create(&ServiceLabels { service: "db".into() }).get(), 0);
    }
}
