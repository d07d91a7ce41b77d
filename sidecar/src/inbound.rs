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

use futures::{FutureExt, future::BoxFuture};
use http::{Request, Response};
use hyper::body::Incoming;
use tower::Service;

use crate::{
    errors::{AppFailed, AppUnreachable, FERRY_ERROR, is_grpc},
    http::{
        Body, BoxError, Guarded, boxed,
        client::{Client, ConnectError},
    },
    metrics::Metrics,
    proxy::{forwardable, respond},
};

/// Where an app's own `x-ferry-error` goes, so that the header always means this sidecar.
pub const UPSTREAM_ERROR: &str = "x-ferry-upstream-error";

/// The inbound proxy service. Cheap to clone.
#[derive(Clone)]
pub struct Inbound {
    app: Client,
    service: Arc<str>,
    metrics: Metrics,
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
    /// Forwards to the app behind `app`; `service` labels the metrics.
    pub fn new(app: Client, service: Arc<str>, metrics: Metrics, in_flight: InFlight) -> Self {
        Self { app, service, metrics, in_flight }
    }

    async fn forward(&self, request: Request<Incoming>, in_flight: InFlightGuard) -> Result<Response<Body>, BoxError> {
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
