//! `fault`: the faults a route rule injects, to test how callers cope. An abort answers at
//! once with the rule's status (a trailers-only gRPC status for gRPC callers) and
//! `x-ferry-error: fault_abort`; a delay holds the request before it goes on. Each applies to
//! its percentage of the rule's requests. Both sit inside the rule's deadline, so a delay
//! longer than the rule's timeout times the request out as a slow upstream would.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use pin_project::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service, ServiceExt, util::Oneshot};

use crate::{
    errors::{grpc_code_of, is_grpc, status_response},
    http::{Body, BoxError},
};

/// The faults of one rule.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// (percent, status)
    pub abort: Option<(f64, u16)>,
    /// (percent, delay)
    pub delay: Option<(f64, Duration)>,
    /// The rule, named in an abort's sentence.
    pub rule: Arc<str>,
}

/// Wraps a service in [`Fault`] injection.
#[derive(Debug, Clone)]
pub struct FaultLayer {
    faults: Arc<Faults>,
}

impl FaultLayer {
    /// A layer injecting `faults`.
    pub fn new(faults: Faults) -> Self {
        Self { faults: Arc::new(faults) }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault { inner, faults: self.faults.clone() }
    }
}

/// A service that injects its rule's faults before the inner service sees the request.
#[derive(Debug, Clone)]
pub struct Fault<S> {
    inner: S,
    faults: Arc<Faults>,
}

impl<S> Service<Request<Body>> for Fault<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let faults = &*self.faults;
        if let Some((percent, status)) = faults.abort
            && ferry_runtime::rng::roll(percent)
        {
            return ResponseFuture::Aborted { response: Some(abort(status, &faults.rule, is_grpc(request.headers()))) };
        }
        if let Some((percent, delay)) = faults.delay
            && ferry_runtime::rng::roll(percent)
        {
            return ResponseFuture::Delayed { sleep: tokio::time::sleep(delay), next: Some((self.inner.clone(), request)) };
        }
        ResponseFuture::Called { future: self.inner.call(request) }
    }
}

/// The answer of an injected abort.
fn abort(status: u16, rule: &str, grpc: bool) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let sentence = format!("fault_abort: injected by route {rule}");
    status_response(status, grpc_code_of(status), &sentence, grpc, "fault_abort")
}

/// The response of a [`Fault`].
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture<S: Service<Request<Body>>> {
    Aborted {
        response: Option<Response<Body>>,
    },
    Delayed {
        #[pin]
        sleep: Sleep,
        next: Option<(S, Request<Body>)>,
    },
    Called {
        #[pin]
        future: S::Future,
    },
    /// Delayed, then sent once the inner service says it is ready.
    Sent {
        #[pin]
        future: Oneshot<S, Request<Body>>,
    },
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                ResponseFutureProj::Aborted { response } => {
                    return Poll::Ready(response.take().ok_or_else(|| "an aborted request was polled again".into()));
                }
                ResponseFutureProj::Delayed { sleep, next } => {
                    ready!(sleep.poll(cx));
                    let Some((inner, request)) = next.take() else {
                        return Poll::Ready(Err("a delayed request was polled after it ended".into()));
                    };
                    self.set(ResponseFuture::Sent { future: inner.oneshot(request) });
                }
                ResponseFutureProj::Called { future } => return future.poll(cx),
                ResponseFutureProj::Sent { future } => return future.poll(cx),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;
    use tower_test::mock;

    use super::*;
    use crate::{errors::FERRY_ERROR, http::empty};

    type Mock = mock::Mock<Request<Body>, Response<Body>>;
    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    fn service(faults: Faults) -> (Fault<Mock>, Handle) {
        let (mock, handle) = mock::pair();
        (FaultLayer::new(faults).layer(mock), handle)
    }

    fn get() -> Request<Body> {
        Request::get("/").body(empty()).expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_answers_without_sending() {
        let (service, _handle) = service(Faults { abort: Some((100.0, 503)), rule: "catalog/flaky".into(), ..Faults::default() });
        let response = service.clone().oneshot(get()).await.expect("answered");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[FERRY_ERROR], "fault_abort: injected by route catalog/flaky");
        let grpc = Request::post("/x.Y/Z").header("content-type", "application/grpc").body(empty()).expect("request");
        let response = service.oneshot(grpc).await.expect("answered");
        assert_eq!(response.headers()["grpc-status"], "14");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_request_then_sends_it() {
        let (service, mut handle) =
            service(Faults { delay: Some((100.0, Duration::from_millis(700))), rule: "r".into(), ..Faults::default() });
        let started = Instant::now();
        let response = tokio::spawn(service.oneshot(get()));
        let (_, answer) = handle.next_request().await.expect("sent after the delay");
        assert_eq!(started.elapsed(), Duration::from_millis(700));
        answer.send_response(Response::new(empty()));
        assert_eq!(response.await.expect("joins").expect("answered").status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn no_fault_passes_straight_through() {
        let (service, mut handle) =
            service(Faults { abort: Some((0.0, 500)), delay: Some((0.0, Duration::from_secs(9))), rule: "r".into() });
        let started = Instant::now();
        let response = tokio::spawn(service.oneshot(get()));
        let (_, answer) = handle.next_request().await.expect("sent");
        assert_eq!(started.elapsed(), Duration::ZERO);
        answer.send_response(Response::new(empty()));
        assert!(response.await.expect("joins").is_ok());
    }
}
