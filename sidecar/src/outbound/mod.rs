//! The outbound proxy: requests from the app to services of the mesh.
//!
//! The app sends HTTP to the outbound listener, naming the service in the authority (HTTP proxy
//! mode or `Host`), or to a per-upstream local port (`--upstream catalog=127.0.0.1:9001`). Each
//! destination service gets its stack built once and cached (see [`stack`] for the layers, in
//! the order a request meets them), with the handles of its request metrics.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
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

/// One destination service: its stack, its router (for the admin API), and the handles of
/// its request metrics. Cheap to clone.
#[derive(Clone)]
pub struct Destination {
    stack: stack::DestinationStack,
    router: Router,
    metrics: ServiceMetrics,
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
}

impl Outbound {
    /// An outbound proxy resolving services through `catalog`.
    pub fn new(catalog: Arc<Catalog>, config: OutboundConfig, metrics: Metrics) -> Self {
        let protections = Arc::new(Protections::new(metrics.clone()));
        let unnamed = metrics.service("outbound", Arc::from("-"));
        let destinations = ArcSwap::default();
        let inner = Inner { catalog, config, destinations, building: Mutex::new(()), protections, metrics, unnamed };
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

    /// The stack of `service`, built (and subscribed to) on first use.
    fn build(&self, service: &str) -> Result<Destination, BoxError> {
        if let Some(destination) = self.inner.destinations.load().get(service) {
            return Ok(destination.clone());
        }
        let _building = ferry_runtime::lock(&self.inner.building);
        if let Some(destination) = self.inner.destinations.load().get(service) {
            return Ok(destination.clone());
        }
        let inner = &self.inner;
        let state = inner.catalog.watch(service)?;
        let name: Arc<str> = service.into();
        let router = Router::new(name.clone(), inner.catalog.clone(), state, inner.config.clone(), inner.protections.clone());
        let destination = Destination {
            stack: stack::destination(router.clone(), inner.config.response_timeout),
            router,
            metrics: inner.metrics.service("outbound", name.clone()),
        };
        let mut destinations = HashMap::clone(&inner.destinations.load());
        destinations.insert(name, destination.clone());
        inner.destinations.store(Arc::new(destinations));
        Ok(destination)
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
            counted: Some(counted),
            grpc,
            started,
        };
        if request.method() == Method::CONNECT {
            let error: BoxError = Box::new(Unsupported("CONNECT tunnels are not supported: send plain HTTP through the proxy"));
            let named = self.fixed.clone().or_else(|| target::service_of(&request).ok().map(Arc::from));
            return failed(
                error,
                named.map_or_else(|| self.inner.unnamed.clone(), |name| self.inner.metrics.service("outbound", name)),
            );
        }
        match self.destination_of(&request) {
            // Every layer below is always ready (see `stack`).
            Ok(destination) => ResponseFuture {
                call: Either::Left(destination.stack.oneshot(forwardable(request))),
                counted: Some(destination.metrics),
                grpc,
                started,
            },
            // A service that cannot be followed is counted under its name, the slow way.
            Err((error, service)) => failed(
                error,
                service.map_or_else(|| self.inner.unnamed.clone(), |name| self.inner.metrics.service("outbound", name)),
            ),
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
    counted: Option<ServiceMetrics>,
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
        Poll::Ready(Ok(respond(&counted, "outbound", *this.grpc, *this.started, result)))
    }
}
