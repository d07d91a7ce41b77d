//! The outbound proxy: requests from the app to services of the mesh.
//!
//! The app sends HTTP to the outbound listener, naming the service in the authority (HTTP proxy
//! mode or `Host`), or to a per-upstream local port (`--upstream catalog=127.0.0.1:9001`). Each
//! destination gets its stack built once and cached: a [`Balance`] over the service's endpoints,
//! each endpoint a pooled [`Client`]. Route, retry and split layers go between the two.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use futures::{FutureExt, future::BoxFuture};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tower::Service;

use crate::{
    catalog::Catalog,
    errors::{ResponseTimeout, Unsupported, is_grpc},
    http::{
        Body, BoxError,
        client::{Client, ClientConfig},
    },
    metrics::Metrics,
    proxy::{forwardable, respond},
};

pub mod attempt;
pub mod balance;
pub mod budget;
pub mod guard;
pub mod limit;
pub mod policy;
pub mod retry;
pub mod route;
pub mod router;
pub mod target;

pub use self::{
    balance::{Balance, BalanceMetrics},
    guard::Guards,
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
}

/// One endpoint's client as a tower service: over mTLS to a peer sidecar that proves the
/// identity the control plane gave it, in plaintext to anything else.
#[derive(Clone, Debug)]
pub struct EndpointService {
    client: Client,
}

impl EndpointService {
    /// A service sending to `target`'s endpoint.
    pub fn new(target: &balance::Target, mut config: ClientConfig) -> Self {
        if let Some(timeout) = target.connect_timeout {
            config.connect_timeout = timeout;
        }
        let endpoint = &target.endpoint;
        Self { client: Client::with_identity(endpoint.address.clone(), endpoint.port, config, endpoint.identity.clone()) }
    }
}

/// Where an untrusted upstream's `x-ferry-error` goes: only a peer sidecar, verified by mTLS,
/// may tell this sidecar why a request failed (and so whether it may be retried).
fn distrust(response: &mut Response<Body>) {
    if let Some(claimed) = response.headers_mut().remove(crate::errors::FERRY_ERROR) {
        response.headers_mut().insert(crate::inbound::UPSTREAM_ERROR, claimed);
    }
}

impl Service<Request<Body>> for EndpointService {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let client = self.client.clone();
        async move {
            let mut response = client.send(request).await?;
            if !client.is_mtls() {
                distrust(&mut response);
            }
            Ok(response)
        }
        .boxed()
    }
}

/// The stack of one destination service.
pub type Destination = Router;

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
    guards: Arc<Guards>,
    metrics: Metrics,
}

impl Outbound {
    /// An outbound proxy resolving services through `catalog`.
    pub fn new(catalog: Arc<Catalog>, config: OutboundConfig, metrics: Metrics) -> Self {
        let guards = Arc::new(Guards::new(metrics.clone()));
        let inner = Inner { catalog, config, destinations: ArcSwap::default(), building: Mutex::new(()), guards, metrics };
        Self { inner: Arc::new(inner), fixed: None, fixed_destination: Arc::default() }
    }

    /// The same proxy, sending every request to `service` whatever its authority.
    pub fn fixed(&self, service: Arc<str>) -> Self {
        Self { inner: self.inner.clone(), fixed: Some(service), fixed_destination: Arc::default() }
    }

    /// The stack for `service`, built (and subscribed to) on first use.
    pub fn destination(&self, service: &str) -> Result<Destination, BoxError> {
        if let Some(destination) = self.inner.destinations.load().get(service) {
            return Ok(destination.clone());
        }
        let _building = self.inner.building.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(destination) = self.inner.destinations.load().get(service) {
            return Ok(destination.clone());
        }
        let state = self.inner.catalog.watch(service)?;
        let name: Arc<str> = service.into();
        let destination =
            Router::new(name.clone(), self.inner.catalog.clone(), state, self.inner.config.clone(), self.inner.guards.clone());
        let mut destinations = HashMap::clone(&self.inner.destinations.load());
        destinations.insert(name, destination.clone());
        self.inner.destinations.store(Arc::new(destinations));
        Ok(destination)
    }

    /// The stack for `service`, if one was built (nothing is subscribed).
    pub fn existing(&self, service: &str) -> Option<Destination> {
        self.inner.destinations.load().get(service).cloned()
    }

    /// Sends `request` on to `service`. Returns a boxed future, which keeps the stack's future
    /// types out of the caller's async block.
    fn forward(&self, service: &str, request: Request<Incoming>) -> BoxFuture<'static, Result<Response<Body>, BoxError>> {
        if request.method() == Method::CONNECT {
            let error: BoxError = Box::new(Unsupported("CONNECT tunnels are not supported: send plain HTTP through the proxy"));
            return futures::future::ready(Err(error)).boxed();
        }
        let destination = match self.fixed_destination.get() {
            Some(destination) => destination.clone(),
            None => match self.destination(service) {
                Ok(destination) => {
                    if self.fixed.is_some() {
                        let _ = self.fixed_destination.set(destination.clone());
                    }
                    destination
                }
                Err(error) => return futures::future::ready(Err(error)).boxed(),
            },
        };
        let mut request = forwardable(request);
        if let Some(timeout) = self.inner.config.response_timeout {
            // Retries do not start a backoff that would end past it.
            request.extensions_mut().insert(router::Deadline(tokio::time::Instant::now() + timeout));
        }
        // Boxed before it is awaited in another async block: rustc cannot otherwise prove the
        // stack's future `Send` (rust-lang/rust#64552).
        let call = destination.route(request);
        match self.inner.config.response_timeout {
            Some(timeout) => async move {
                match tokio::time::timeout(timeout, call).await {
                    Ok(result) => result,
                    Err(_) => Err(Box::new(ResponseTimeout(timeout)) as BoxError),
                }
            }
            .boxed(),
            None => call,
        }
    }
}

impl Service<Request<Incoming>> for Outbound {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        async move {
            let started = Instant::now();
            let grpc = is_grpc(request.headers());
            let service = match &this.fixed {
                Some(service) => Ok(service.clone()),
                None => target::service_of(&request).map(Arc::from),
            };
            let (label, result) = match service {
                Ok(service) => (service.clone(), this.forward(&service, request).await),
                Err(error) => (Arc::from("-"), Err(error)),
            };
            Ok(respond(&this.inner.metrics, "outbound", label, grpc, started, result))
        }
        .boxed()
    }
}
