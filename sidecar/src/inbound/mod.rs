//! The inbound proxy: requests from other sidecars to this sidecar's app.
//!
//! The address the registry publishes for the app's instance is this listener's, so mesh traffic
//! arrives here and is forwarded to `--app` in the protocol it came in. When the app cannot be
//! reached the answer says so (`x-ferry-error: app_unreachable`), which tells the calling sidecar
//! the request never got to the app, so that it may try another instance whatever the method.
//! For that answer to be trusted, `x-ferry-error` leaves this listener only on answers this
//! sidecar made: one in the app's own response (an app relaying an answer its own sidecar gave
//! it) is renamed `x-ferry-upstream-error`. The request's `x-ferry-attempt` reaches the app as
//! it came.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use ferry_proto::authz::{Caller, Decision, Request as AuthzRequest};
use http::{HeaderName, Request, Response};
use hyper::body::Incoming;
use tower::{Service, ServiceExt, util::Oneshot};

use crate::{
    errors::is_grpc,
    http::{Body, Guarded, boxed, client::Client},
    mesh::Mesh,
    metrics::{AuthzLabels, Metrics, ServiceMetrics},
    proxy::{forwardable, respond},
};

pub mod listener;
pub mod stack;

/// Where an app's own `x-ferry-error` goes, so that the header always means this sidecar.
pub const UPSTREAM_ERROR: &str = "x-ferry-upstream-error";

/// The caller's verified identity, as the app receives it.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-ferry-peer-identity");

/// Who is calling, in a request's extensions: the identity its mTLS certificate proves, or
/// `None` for a plaintext connection to a permissive listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer(pub Option<Arc<ferry_tls::Identity>>);

impl Peer {
    /// The caller as authorization sees it.
    pub fn caller(&self) -> Caller<'_> {
        match &self.0 {
            Some(identity) => Caller::Service(&identity.service),
            None => Caller::Unauthenticated,
        }
    }

    /// The caller in words: its identity, or that it has none.
    pub fn describe(&self) -> String {
        match &self.0 {
            Some(identity) => identity.to_string(),
            None => "an unauthenticated caller".into(),
        }
    }

    /// The `caller` label of the authorization metric.
    fn label(&self) -> Arc<str> {
        match &self.0 {
            Some(identity) => identity.service.as_str().into(),
            None => "unauthenticated".into(),
        }
    }
}

/// Decides whether `peer` may make `request` of `service` under the policy in force, and counts
/// the decision.
pub fn authorize(mesh: &Mesh, metrics: &Metrics, service: &Arc<str>, peer: &Peer, request: &AuthzRequest<'_>) -> Decision {
    let decision = match mesh.authorization() {
        Some(policy) => policy.evaluate(peer.caller(), request),
        None => Decision::no_policy(),
    };
    let labels = AuthzLabels { decision: decision.action.as_str(), service: service.clone(), caller: peer.label() };
    metrics.inbound_authz.get_or_create(&labels).inc();
    decision
}

/// The inbound proxy service: the edge over the [`stack`]. Cheap to clone.
#[derive(Clone)]
pub struct Inbound {
    app: Client,
    stack: stack::InboundStack,
    requests: ServiceMetrics,
    in_flight: InFlight,
}

/// Counts the inbound requests not answered yet, so a drain can tell when nothing is pending.
#[derive(Clone, Default, Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// How many requests are in flight.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inbound {
    /// Forwards to the app behind `app` what `mesh`'s authorization policy allows; `service`
    /// labels the metrics.
    pub fn new(app: Client, service: Arc<str>, metrics: Metrics, in_flight: InFlight, mesh: Mesh) -> Self {
        let requests = metrics.service("inbound", service.clone());
        let stack = stack::inbound(app.clone(), service, mesh, metrics);
        Self { app, stack, requests, in_flight }
    }

    /// The service of the app.
    pub fn service(&self) -> &Arc<str> {
        self.requests.service()
    }

    /// The app's address, for connections relayed byte for byte.
    pub fn app(&self) -> &Client {
        &self.app
    }
}

impl Service<Request<Incoming>> for Inbound {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> ResponseFuture {
        ResponseFuture {
            in_flight: Some(self.in_flight.enter()),
            started: Instant::now(),
            grpc: is_grpc(request.headers()),
            // The stack is always ready (see `stack`).
            call: self.stack.clone().oneshot(forwardable(request)),
            requests: self.requests.clone(),
        }
    }
}

/// The response of the [`Inbound`] edge: the stack's, or its error made a response, counted.
#[pin_project::pin_project]
pub struct ResponseFuture {
    #[pin]
    call: Oneshot<stack::InboundStack, Request<Body>>,
    in_flight: Option<InFlightGuard>,
    requests: ServiceMetrics,
    grpc: bool,
    started: Instant,
}

impl std::future::Future for ResponseFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.call.poll(cx));
        // In flight until the whole body is sent, so a drain does not cut a stream short.
        let in_flight = this.in_flight.take();
        let result = result.map(|response| response.map(|body| boxed(Guarded::new(body, in_flight))));
        Poll::Ready(Ok(respond(this.requests, "inbound", *this.grpc, *this.started, result)))
    }
}
