//! `deadline`: the time a request may take, over all of its attempts and their backoffs.
//!
//! Two sit on the outbound path: one at the edge (`--response-timeout`, for every request) and
//! one per route rule (the rule's `timeout`). When the time is up the request is dropped, with
//! whatever attempt is in flight, and the caller gets [`ResponseTimeout`], which the edge answers
//! `504` with `x-ferry-error: upstream_timeout`. The time covers the response head; a body that
//! streams on afterwards is not cut.
//!
//! Each deadline layer also leaves the request's deadline (the earliest of the two) in its
//! extensions as a [`RequestDeadline`], the way gRPC propagates its own: the retry layer below
//! reads it so that it starts no backoff that would end past it, and answers with the last
//! attempt's outcome instead. The deadline is enforced here, and only here.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Request;
use pin_project::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::{errors::ResponseTimeout, http::BoxError};

/// When a request must be answered by: the earliest deadline of the layers it went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestDeadline(pub Instant);

/// Wraps a service in a [`Deadline`]; with no timeout, requests pass untimed.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    timeout: Option<Duration>,
}

impl DeadlineLayer {
    /// A layer giving each request `timeout`, or no limit with `None`.
    pub fn new(timeout: Option<Duration>) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner, timeout: self.timeout }
    }
}

/// A service whose requests fail with [`ResponseTimeout`] when they take longer than its
/// timeout.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The clock starts at `call`: waiting for readiness is not part of the request's time.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(timeout) = self.timeout else {
            return ResponseFuture { inner: self.inner.call(request), sleep: None, timeout: Duration::ZERO };
        };
        let at = Instant::now() + timeout;
        let extensions = request.extensions_mut();
        match extensions.get::<RequestDeadline>() {
            Some(earlier) if earlier.0 <= at => {}
            _ => {
                extensions.insert(RequestDeadline(at));
            }
        }
        ResponseFuture { inner: self.inner.call(request), sleep: Some(tokio::time::sleep_until(at)), timeout }
    }
}

/// The response of a [`Deadline`]: the inner service's, or [`ResponseTimeout`].
#[pin_project]
#[derive(Debug)]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    #[pin]
    sleep: Option<Sleep>,
    timeout: Duration,
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(Box::new(ResponseTimeout(*this.timeout)))),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_test::{assert_pending, assert_ready_ok};
    use tower_test::mock;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_answered_in_time_is_answered() {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<&str>, &str, _>(DeadlineLayer::new(Some(Duration::from_secs(1))));
        assert_ready_ok!(service.poll_ready());
        let response = service.call(Request::new("hello"));
        let (request, send) = handle.next_request().await.expect("the request reaches the inner service");
        assert_eq!(*request.body(), "hello");
        let deadline = request.extensions().get::<RequestDeadline>().expect("the deadline goes down with the request");
        assert_eq!(deadline.0.duration_since(Instant::now()), Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(999)).await;
        send.send_response("world");
        assert_eq!(response.await.expect("answered in time"), "world");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_fails_with_the_timeout_named() {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<&str>, &str, _>(DeadlineLayer::new(Some(Duration::from_secs(1))));
        assert_ready_ok!(service.poll_ready());
        let mut response = tokio_test::task::spawn(service.call(Request::new("slow")));
        let (_, _send) = handle.next_request().await.expect("the request reaches the inner service");
        assert_pending!(response.poll());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let error = match response.poll() {
            Poll::Ready(Err(error)) => error,
            other => panic!("expected a timeout, got {other:?}"),
        };
        assert!(error.is::<ResponseTimeout>(), "{error}");
        assert_eq!(error.to_string(), ResponseTimeout(Duration::from_secs(1)).to_string());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_a_request_waits_as_long_as_it_takes() {
        let (mut service, mut handle) = mock::spawn_layer::<Request<&str>, &str, _>(DeadlineLayer::new(None));
        assert_ready_ok!(service.poll_ready());
        let response = service.call(Request::new("patient"));
        let (_, send) = handle.next_request().await.expect("the request reaches the inner service");
        tokio::time::sleep(Duration::from_secs(3600)).await;
        send.send_response("done");
        assert_eq!(response.await.expect("answered"), "done");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_from_outside_is_kept() {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<&str>, &str, _>(DeadlineLayer::new(Some(Duration::from_secs(10))));
        assert_ready_ok!(service.poll_ready());
        let mut request = Request::new("edge said 2s");
        let earlier = Instant::now() + Duration::from_secs(2);
        request.extensions_mut().insert(RequestDeadline(earlier));
        let _response = service.call(request);
        let (request, _send) = handle.next_request().await.expect("the request reaches the inner service");
        assert_eq!(request.extensions().get::<RequestDeadline>(), Some(&RequestDeadline(earlier)));
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_is_the_inner_services() {
        let (mut service, mut handle) =
            mock::spawn_layer::<Request<&str>, &str, _>(DeadlineLayer::new(Some(Duration::from_secs(1))));
        handle.allow(0);
        assert_pending!(service.poll_ready());
        handle.allow(1);
        assert_ready_ok!(service.poll_ready());
    }
}
