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

use ferry_proto::{
    authz::{Caller, Decision, Request as AuthzRequest},
    matching::RequestInfo,
};
use futures::{FutureExt, future::BoxFuture};
use http::{HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;
use tower::Service;

use crate::{
    errors::{AppFailed, AppUnreachable, FERRY_ERROR, Forbidden, is_grpc},
    http::{
        Body, BoxError, Guarded, boxed,
        client::{Client, ConnectError},
    },
    mesh::Mesh,
    metrics::{AuthzLabels, Metrics},
    proxy::{forwardable, respond},
};

pub mod listener;

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

/// The inbound proxy service. Cheap to clone.
#[derive(Clone)]
pub struct Inbound {
    app: Client,
    service: Arc<str>,
    metrics: Metrics,
    in_flight: InFlight,
    mesh: Mesh,
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
        Self { app, service, metrics, in_flight, mesh }
    }

    /// The app's address, for connections relayed byte for byte.
    pub fn app(&self) -> &Client {
        &self.app
    }

    async fn forward(&self, mut request: Request<Incoming>, in_flight: InFlightGuard) -> Result<Response<Body>, BoxError> {
        let peer = request.extensions_mut().remove::<Peer>().unwrap_or_default();
        let info = RequestInfo::of(request.method(), request.uri(), request.headers());
        let decision = authorize(&self.mesh, &self.metrics, &self.service, &peer, &AuthzRequest::Http(info));
        if !decision.allowed() {
            return Err(Box::new(Forbidden {
                caller: peer.describe(),
                service: self.service.clone(),
                because: decision.because(),
                version: decision.version,
            }));
        }
        // Only this sidecar says who calls.
        let headers = request.headers_mut();
        headers.remove(&PEER_IDENTITY);
        if let Some(identity) = &peer.0
            && let Ok(value) = HeaderValue::from_str(&identity.to_string())
        {
            headers.insert(PEER_IDENTITY, value);
        }
        match self.app.send(forwardable(request)).await {
            // In flight until the whole body is sent, so a drain does not cut a stream short.
            Ok(mut response) => {
                if let Some(relayed) = response.headers_mut().remove(FERRY_ERROR) {
                    response.headers_mut().insert(UPSTREAM_ERROR, relayed);
                }
                Ok(response.map(|body| boxed(Guarded::new(body, in_flight))))
            }
            Err(error) if error.is::<ConnectError>() => Err(Box::new(AppUnreachable(error))),
            Err(error) => Err(Box::new(AppFailed(error))),
        }
    }
}

impl Service<Request<Incoming>> for Inbound {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        let in_flight = self.in_flight.enter();
        async move {
            let started = Instant::now();
            let grpc = is_grpc(request.headers());
            let result = this.forward(request, in_flight).await;
            Ok(respond(&this.metrics, "inbound", this.service.clone(), grpc, started, result))
        }
        .boxed()
    }
}
