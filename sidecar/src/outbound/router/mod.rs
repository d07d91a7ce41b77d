//! `route`: routing within one destination service. The service's route table decides, per
//! request, which rule applies; the rule's own stack (see [`super::stack::rule`]) then decides
//! where the request goes (weighted backends: subsets of the service or other services), how
//! long it may take, which faults are injected, how the request and response are rewritten,
//! what is mirrored and when it is retried.
//! With no route, or no matching rule, requests go to all of the service's endpoints, with the
//! mesh's default retries.
//!
//! A new route takes effect only once everything it references is known (see [`table`]).

use ferry_runtime::lock;
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use futures::{FutureExt, future::BoxFuture};
use http::{Request, Response};
use pin_project::pin_project;
use tokio::sync::watch;
use tower::Service;

use super::{
    OutboundConfig,
    protection::Protections,
    route::{BackendRef, RequestInfo, Retries, RouteTable},
    stack::RuleStack,
};
use crate::{
    catalog::{Catalog, ServiceState},
    errors::{DiscoveryTimeout, NoRoute},
    http::{Body, BoxError},
    metrics::RouteLabel,
};

pub mod explain;
mod table;

pub use self::explain::{Explanation, RouteStatus};

/// Routes the requests for one service. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    service: Arc<str>,
    /// A gateway's own route: no matching rule means no route, not the service's endpoints
    /// (a gateway has none).
    gateway: bool,
    catalog: Arc<Catalog>,
    config: OutboundConfig,
    state: watch::Receiver<ServiceState>,
    /// The route in force, with each rule's stack.
    compiled: ArcSwapOption<Compiled>,
    /// Why a newer route is not in force yet, if one is held.
    held: Mutex<Option<String>>,
    /// Set once the route has been evaluated against the service's first config: until then a
    /// request waits, rather than going out as if there were no route.
    settled: watch::Sender<bool>,
    /// Every backend's balancer, built on first use and shared by every rule sending to it.
    balancers: Mutex<HashMap<BackendRef, table::Built>>,
    /// The stack of requests no rule covers.
    default: RuleStack,
    protections: Arc<Protections>,
    /// The mirrored copies in flight, bounded per destination across route versions.
    mirrors: Arc<tokio::sync::Semaphore>,
    /// The retry policy of requests no rule with `retries` covers.
    default_retries: Retries,
    /// The route label of requests no rule covers.
    default_label: Arc<str>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// A route in force: its table and one stack per rule, in the table's order.
pub struct Compiled {
    table: RouteTable,
    stacks: Vec<RuleStack>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl Router {
    /// A router for `service`, following its state (and that of the services its route uses).
    /// Its background work (route compilation, balancer rebuilds) runs on `config.runtime`.
    pub fn new(
        service: Arc<str>,
        catalog: Arc<Catalog>,
        state: watch::Receiver<ServiceState>,
        config: OutboundConfig,
        protections: Arc<Protections>,
    ) -> Self {
        let gateway = config.gateway.as_ref() == Some(&service);
        let default_retries = super::retry::mesh_default();
        let default_label: Arc<str> = Arc::from("default");
        let mut balancers = HashMap::new();
        let own = BackendRef { service: service.clone(), subset: None };
        let built = table::Built::new(&own, state.clone(), &config, &protections);
        let mirrors = Arc::new(tokio::sync::Semaphore::new(super::mirror::MAX_MIRRORS));
        let default = table::default_stack(&service, &protections, &built, &default_retries, &default_label, &mirrors);
        balancers.insert(own, built);
        let runtime = config.runtime.clone();
        let inner = Arc::new(Inner {
            service,
            gateway,
            catalog,
            config,
            state: state.clone(),
            compiled: ArcSwapOption::empty(),
            held: Mutex::new(None),
            settled: watch::Sender::new(false),
            balancers: Mutex::new(balancers),
            default,
            protections,
            mirrors,
            default_retries,
            default_label,
            task: Mutex::new(None),
        });
        let task = runtime.spawn(table::follow(Arc::downgrade(&inner), state));
        *lock(&inner.task) = Some(task.abort_handle());
        Self { inner }
    }

    /// Waits, up to `limit`, for the control plane's first word on the service and the route
    /// it carries to be evaluated.
    pub async fn known(&self, limit: Duration) -> bool {
        let mut settled = self.inner.settled.subscribe();
        matches!(tokio::time::timeout(limit, settled.wait_for(|s| *s)).await, Ok(Ok(_)))
    }

    /// Why no route is in force, or `None` when one is.
    pub fn without_route(&self) -> Option<String> {
        self.inner.compiled.load().is_none().then(|| self.inner.why_no_route())
    }
}

impl Inner {
    /// Routes a request once the service's first config has been evaluated.
    fn dispatch(&self, request: Request<Body>) -> ResponseFuture {
        let compiled = self.compiled.load_full();
        let info = RequestInfo::of(request.method(), request.uri(), request.headers());
        let index = compiled.as_ref().and_then(|c| c.table.find(&info).map(|rule| rule.index));
        match (compiled, index) {
            (Some(compiled), Some(index)) => {
                let label = compiled.table.rules[index].label().clone();
                match call_ready(&mut compiled.stacks[index].clone(), request) {
                    Ok(future) => ResponseFuture::Routed { future, label },
                    Err(error) => ResponseFuture::Failed { error: Some(error) },
                }
            }
            (Some(_), None) if self.gateway => {
                let error = NoRoute::NoRule {
                    gateway: self.service.clone(),
                    host: info.host.unwrap_or_default().to_owned(),
                    path: info.path.to_owned(),
                };
                ResponseFuture::Failed { error: Some(Box::new(error)) }
            }
            (None, _) if self.gateway => {
                let error = NoRoute::NoTable { gateway: self.service.clone(), why: self.why_no_route() };
                ResponseFuture::Failed { error: Some(Box::new(error)) }
            }
            _ => match call_ready(&mut self.default.clone(), request) {
                Ok(future) => ResponseFuture::Routed { future, label: self.default_label.clone() },
                Err(error) => ResponseFuture::Failed { error: Some(error) },
            },
        }
    }
}

/// Calls a rule's stack, which is always ready (see [`super::stack`]): readiness is still
/// asked, and a stack that is not ready fails the request rather than being called anyway.
fn call_ready(stack: &mut RuleStack, request: Request<Body>) -> Result<<RuleStack as Service<Request<Body>>>::Future, BoxError> {
    match stack.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => Ok(stack.call(request)),
        Poll::Ready(Err(error)) => Err(error),
        Poll::Pending => Err("the route's stack is not ready".into()),
    }
}

impl Service<Request<Body>> for Router {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Always ready: everything below is (see `call_ready`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> ResponseFuture {
        if *self.inner.settled.borrow() {
            return self.inner.dispatch(request);
        }
        let inner = self.inner.clone();
        let waiting = async move {
            let limit = inner.config.discovery_timeout;
            let mut settled = inner.settled.subscribe();
            if !matches!(tokio::time::timeout(limit, settled.wait_for(|s| *s)).await, Ok(Ok(_))) {
                return Err(Box::new(DiscoveryTimeout { service: inner.service.clone(), timeout: limit }) as BoxError);
            }
            inner.dispatch(request).await
        };
        ResponseFuture::Waiting { future: waiting.boxed() }
    }
}

/// The response of a [`Router`].
// The variants are held inline: the future lives in the connection's task, and boxing the
// larger one would add the allocation per request that naming the future avoids.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture {
    /// In a rule's stack (or the default one).
    Routed {
        #[pin]
        future: <RuleStack as Service<Request<Body>>>::Future,
        /// The rule's label, for the metrics.
        label: Arc<str>,
    },
    /// Failed before any stack took it.
    Failed { error: Option<BoxError> },
    /// Waiting for the service's first config.
    Waiting {
        #[pin]
        future: BoxFuture<'static, Result<Response<Body>, BoxError>>,
    },
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Routed { future, label } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                response.extensions_mut().insert(RouteLabel(label.clone()));
                Poll::Ready(Ok(response))
            }
            ResponseFutureProj::Failed { error } => {
                Poll::Ready(Err(error.take().unwrap_or_else(|| "a failed request was polled again".into())))
            }
            ResponseFutureProj::Waiting { future } => future.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests;
