//! The outbound proxy: requests from the app to services of the mesh.
//!
//! The app sends HTTP to the outbound listener, naming the service in the authority (HTTP proxy
//! mode or `Host`), or to a per-upstream local port (`--upstream catalog=127.0.0.1:9001`). Each
//! destination service gets its stack built once and cached (see [`stack`] for the layers, in
//! the order a request meets them), with the handles of its request metrics.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use futures::future::Either;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceExt, util::Oneshot};

use crate::{
    catalog::Catalog,
    errors::{Unsupported, is_grpc},
    http::{Body, BoxError, client::ClientConfig},
    metrics::{Metrics, ServiceMetrics},
    proxy::{forwardable, respond},
};

pub mod attempt;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod deadline;
pub mod endpoint;
pub mod fault;
pub mod mirror;
pub mod policy;
pub mod protection;
pub mod retry;
pub mod rewrite;
pub mod route;
pub mod router;
pub mod split;
pub mod stack;
pub mod target;

pub use self::{
    balance::{Balance, BalanceMetrics},
    protection::Protections,
    router::Router,
};

/// The `service` label of outbound requests for services that do not exist.
pub const UNKNOWN: &str = "unknown";

/// How long a destination must have been idle for a new one to take its place when the
/// sidecar tracks as many services as it may.
const LEAST_IDLE_TO_MAKE_ROOM: Duration = Duration::from_secs(10);

/// How outbound requests are handled.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// How long a request for a service with no config yet waits for it.
    pub discovery_timeout: Duration,
    /// How long to wait for response headers; `None` waits as long as the client does.
    pub response_timeout: Option<Duration>,
    pub client: ClientConfig,
    /// In a gateway, its own service name: requests are routed by that service's route alone.
    pub gateway: Option<Arc<str>>,
    /// This sidecar's zone: its balancers prefer endpoints there.
    pub zone: Option<Arc<str>>,
    pub balance_metrics: BalanceMetrics,
    /// Where background work (route compilation, balancer rebuilds) runs: the main runtime,
    /// off the data path's workers.
    pub runtime: tokio::runtime::Handle,
}

/// One destination service: its stack, its router (for the admin API), the handles of its
/// request metrics (made at its first request that is not for an unknown service, so names
/// that do not exist never get series of their own) and when it was last used. Cheap to clone.
#[derive(Clone)]
pub struct Destination {
    stack: stack::DestinationStack,
    router: Router,
    counting: Arc<Counting>,
    /// Milliseconds since the outbound's epoch at its last request.
    last_used: Arc<AtomicU64>,
}

/// How a destination's requests are counted: under its name once one of them is for a service
/// that exists (the handles are made then), under `unknown` otherwise.
struct Counting {
    name: Arc<str>,
    handles: OnceLock<ServiceMetrics>,
    metrics: Metrics,
    unknown: ServiceMetrics,
}

/// Which metrics count a request: known when it starts, or its destination's.
enum Counted {
    Now(ServiceMetrics),
    Destination(Arc<Counting>),
}

impl Counted {
    fn metrics(self, result: &Result<Response<Body>, BoxError>) -> ServiceMetrics {
        match self {
            Self::Now(metrics) => metrics,
            Self::Destination(counting) => {
                if result.as_ref().err().is_some_and(|e| e.is::<crate::errors::UnknownService>()) {
                    return counting.unknown.clone();
                }
                counting.handles.get_or_init(|| counting.metrics.service("outbound", counting.name.clone())).clone()
            }
        }
    }
}

/// The outbound proxy service. Cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
    /// Set for a per-upstream listener: every request goes to this service.
    fixed: Option<Arc<str>>,
    /// The fixed service's stack, once built (stacks are never dropped).
    fixed_destination: Arc<std::sync::OnceLock<Destination>>,
}

struct Inner {
    catalog: Arc<Catalog>,
    config: OutboundConfig,
    destinations: ArcSwap<HashMap<Arc<str>, Destination>>,
    building: Mutex<()>,
    protections: Arc<Protections>,
    metrics: Metrics,
    /// The request metrics of requests that name no service.
    unnamed: ServiceMetrics,
    /// The request metrics of requests for services that do not exist, or that could not be
    /// followed: one series for every such name, whatever the names.
    unknown: ServiceMetrics,
    /// What destinations' last uses count from.
    epoch: Instant,
}

impl Outbound {
    /// An outbound proxy resolving services through `catalog`.
    pub fn new(catalog: Arc<Catalog>, config: OutboundConfig, metrics: Metrics) -> Self {
        let protections = Arc::new(Protections::new(metrics.clone()));
        let unnamed = metrics.service("outbound", Arc::from("-"));
        let unknown = metrics.service("outbound", Arc::from(UNKNOWN));
        let destinations = ArcSwap::default();
        let building = Mutex::new(());
        let epoch = Instant::now();
        let inner = Inner { catalog, config, destinations, building, protections, metrics, unnamed, unknown, epoch };
        Self { inner: Arc::new(inner), fixed: None, fixed_destination: Arc::default() }
    }

    /// The same proxy, sending every request to `service` whatever its authority.
    pub fn fixed(&self, service: Arc<str>) -> Self {
        Self { inner: self.inner.clone(), fixed: Some(service), fixed_destination: Arc::default() }
    }

    /// The router of `service`, built (and subscribed to) on first use.
    pub fn destination(&self, service: &str) -> Result<Router, BoxError> {
        self.build(service).map(|destination| destination.router)
    }

    /// The router of `service`, if its stack was built (nothing is subscribed).
    pub fn existing(&self, service: &str) -> Option<Router> {
        self.inner.destinations.load().get(service).map(|destination| destination.router.clone())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The stack of `service`, built (and subscribed to) on first use.
    fn build(&self, service: &str) -> Result<Destination, BoxError> {
        if let Some(destination) = self.inner.destinations.load().get(service) {
            // A coarse mark (idle times are minutes): written at most once a second, so that the
            // workers sending to one destination do not all write its cache line every request.
            let now = self.now_ms();
            if now.saturating_sub(destination.last_used.load(Ordering::Relaxed)) >= 1000 {
                destination.last_used.store(now, Ordering::Relaxed);
            }
            return Ok(destination.clone());
        }
        let _building = ferry_runtime::lock(&self.inner.building);
        if let Some(destination) = self.inner.destinations.load().get(service) {
            return Ok(destination.clone());
        }
        let inner = &self.inner;
        let state = match inner.catalog.watch(service) {
            Ok(state) => state,
            // Full: the destination unused the longest makes room, if it has been idle a while.
            Err(full) => {
                self.drop_least_used(LEAST_IDLE_TO_MAKE_ROOM);
                inner.catalog.sweep(Duration::ZERO, Instant::now());
                inner.catalog.watch(service).map_err(|_| full)?
            }
        };
        let name: Arc<str> = service.into();
        let router = Router::new(name.clone(), inner.catalog.clone(), state, inner.config.clone(), inner.protections.clone());
        let destination = Destination {
            stack: stack::destination(router.clone(), inner.config.response_timeout),
            router,
            counting: Arc::new(Counting {
                name: name.clone(),
                handles: OnceLock::new(),
                metrics: inner.metrics.clone(),
                unknown: inner.unknown.clone(),
            }),
            last_used: Arc::new(AtomicU64::new(self.now_ms())),
        };
        let mut destinations = HashMap::clone(&inner.destinations.load());
        destinations.insert(name, destination.clone());
        inner.destinations.store(Arc::new(destinations));
        Ok(destination)
    }

    /// Drops the destination unused the longest, if it has been idle for `idle` at least.
    fn drop_least_used(&self, idle: Duration) {
        let now = self.now_ms();
        let idle = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let destinations = self.inner.destinations.load();
        let oldest = destinations
            .iter()
            .map(|(name, d)| (name, d.last_used.load(Ordering::Relaxed)))
            .filter(|(_, used)| now.saturating_sub(*used) >= idle)
            .min_by_key(|(_, used)| *used)
            .map(|(name, _)| name.clone());
        if let Some(name) = oldest {
            let mut kept = HashMap::clone(&destinations);
            kept.remove(&name);
            self.inner.destinations.store(Arc::new(kept));
            self.forget(&name);
        }
    }

    /// Drops what the outbound keeps of `service` besides its stack: its guard (concurrency
    /// limit, retry budget) and the series of its balancer and guard.
    fn forget(&self, service: &Arc<str>) {
        self.inner.protections.forget(service);
        self.inner.config.balance_metrics.forget(service);
    }

    /// Drops the stacks of services not used for `idle` (for `unknown` when the service does not
    /// exist), releasing their subscriptions to the catalog, which then drops what nobody else
    /// watches ([`Catalog::sweep`]); returns how many were dropped. Per-upstream listeners keep
    /// theirs.
    pub fn sweep(&self, idle: Duration, unknown: Duration) -> usize {
        let _building = ferry_runtime::lock(&self.inner.building);
        let now = self.now_ms();
        let destinations = self.inner.destinations.load();
        let stale = |name: &Arc<str>, d: &Destination| {
            let idle_ms = now.saturating_sub(d.last_used.load(Ordering::Relaxed));
            let missing = match self.inner.catalog.state(name) {
                Some(crate::catalog::ServiceState::Known(config)) => !config.exists,
                Some(crate::catalog::ServiceState::Pending) | None => true,
            };
            let limit = if missing { unknown } else { idle };
            u128::from(idle_ms) >= limit.as_millis()
        };
        let (gone, kept): (Vec<_>, Vec<_>) = destinations.iter().partition(|(name, d)| stale(name, d));
        if gone.is_empty() {
            return 0;
        }
        let kept: HashMap<Arc<str>, Destination> = kept.into_iter().map(|(n, d)| (n.clone(), d.clone())).collect();
        self.inner.destinations.store(Arc::new(kept));
        for (name, _) in &gone {
            self.forget(name);
        }
        gone.len()
    }

    /// The destination of a request: the fixed one of a per-upstream listener, else the one its
    /// authority names.
    fn destination_of(&self, request: &Request<Incoming>) -> Result<Destination, (BoxError, Option<Arc<str>>)> {
        if let Some(destination) = self.fixed_destination.get() {
            return Ok(destination.clone());
        }
        let service = match &self.fixed {
            Some(service) => service.clone(),
            None => target::service_of(request).map(Arc::from).map_err(|error| (error, None))?,
        };
        let destination = self.build(&service).map_err(|error| (error, Some(service)))?;
        if self.fixed.is_some() {
            let _ = self.fixed_destination.set(destination.clone());
        }
        Ok(destination)
    }
}

impl Service<Request<Incoming>> for Outbound {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Incoming>) -> ResponseFuture {
        let started = Instant::now();
        target::host_from_absolute_form(&mut request);
        let grpc = is_grpc(request.headers());
        let failed = |error: BoxError, counted: ServiceMetrics| ResponseFuture {
            call: Either::Right(futures::future::ready(Err(error))),
            counted: Some(Counted::Now(counted)),
            grpc,
            started,
        };
        if request.method() == Method::CONNECT {
            let error: BoxError = Box::new(Unsupported("CONNECT tunnels are not supported: send plain HTTP through the proxy"));
            return failed(error, self.inner.unnamed.clone());
        }
        match self.destination_of(&request) {
            // Every layer below is always ready (see `stack`).
            Ok(destination) => ResponseFuture {
                call: Either::Left(destination.stack.oneshot(forwardable(request))),
                counted: Some(Counted::Destination(destination.counting)),
                grpc,
                started,
            },
            // A service that cannot be followed is counted under `unknown`, whatever its name.
            Err((error, service)) => {
                failed(error, if service.is_some() { self.inner.unknown.clone() } else { self.inner.unnamed.clone() })
            }
        }
    }
}

/// A request that failed before reaching a stack.
type Failed = futures::future::Ready<Result<Response<Body>, BoxError>>;

/// The response of the [`Outbound`] edge: the stack's, or its error made a response, counted.
#[pin_project::pin_project]
pub struct ResponseFuture {
    #[pin]
    call: Either<Oneshot<stack::DestinationStack, Request<Body>>, Failed>,
    counted: Option<Counted>,
    grpc: bool,
    started: Instant,
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let after_completion = |grpc| Poll::Ready(Ok(crate::errors::synthetic_response(&"polled after completion".into(), grpc)));
        if this.counted.is_none() {
            // Answered already: the call must not be polled again.
            return after_completion(*this.grpc);
        }
        let result = std::task::ready!(this.call.poll(cx));
        let Some(counted) = this.counted.take() else { return after_completion(*this.grpc) };
        let counted = counted.metrics(&result);
        Poll::Ready(Ok(respond(&counted, "outbound", *this.grpc, *this.started, result)))
    }
}
