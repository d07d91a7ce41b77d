//! `endpoint`: one endpoint of a service, as the balancer sends to it: the attempt's time
//! limit, then the endpoint's pooled client (over mTLS to a peer sidecar that proves the
//! identity the control plane gave it, in plaintext to anything else).
//!
//! The per-try timeout is the one value that travels with the request rather than in a layer's
//! config: it is the route rule's, while the balancer and its endpoints are shared by every
//! rule sending to the service (one load estimate, one outlier state, one connection pool per
//! endpoint). Timing the attempt here, below the balancer, makes an endpoint that does not
//! answer in time count as failing for outlier detection. Only the retry layer sets it, and
//! only this layer reads it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use http::{Request, Response};
use pin_project::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::balance::Target;
use crate::{
    errors::{FERRY_ERROR, ResponseTimeout},
    http::{
        Body, BoxError, boxed,
        client::{Client, ClientConfig},
    },
    inbound::UPSTREAM_ERROR,
};

/// The time limit of one attempt, set by the retry layer from the route rule.
#[derive(Debug, Clone, Copy)]
pub struct PerTryTimeout(pub Duration);

/// One endpoint's client as a tower service. Always ready: the pool opens connections as
/// requests need them.
#[derive(Clone, Debug)]
pub struct EndpointService {
    client: Client,
}

impl EndpointService {
    /// A service sending to `target`'s endpoint.
    pub fn new(target: &Target, mut config: ClientConfig) -> Self {
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
    if let Some(claimed) = response.headers_mut().remove(FERRY_ERROR) {
        response.headers_mut().insert(UPSTREAM_ERROR, claimed);
    }
}

impl<B> Service<Request<B>> for EndpointService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let client = self.client.clone();
        async move {
            let mut response = client.send(request.map(boxed)).await?;
            if !client.is_mtls() {
                distrust(&mut response);
            }
            Ok(response)
        }
        .boxed()
    }
}

/// Wraps a service in a [`PerTry`] limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerTryLayer;

impl<S> Layer<S> for PerTryLayer {
    type Service = PerTry<S>;

    fn layer(&self, inner: S) -> PerTry<S> {
        PerTry { inner }
    }
}

/// A service whose requests fail with [`ResponseTimeout`] past their [`PerTryTimeout`].
#[derive(Debug, Clone)]
pub struct PerTry<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for PerTry<S>
where
    S: Service<Request<B>, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = PerTryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = request.extensions().get::<PerTryTimeout>().map(|t| t.0);
        PerTryFuture { inner: self.inner.call(request), sleep: limit.map(tokio::time::sleep), limit: limit.unwrap_or_default() }
    }
}

/// The response of a [`PerTry`].
#[pin_project]
pub struct PerTryFuture<F> {
    #[pin]
    inner: F,
    #[pin]
    sleep: Option<Sleep>,
    limit: Duration,
}

impl<F, T> Future for PerTryFuture<F>
where
    F: Future<Output = Result<T, BoxError>>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result);
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(Box::new(ResponseTimeout(*this.limit)))),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_test::assert_ready_ok;
    use tower_test::mock;

    use super::*;

    fn request(limit: Option<Duration>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(limit) = limit {
            request.extensions_mut().insert(PerTryTimeout(limit));
        }
        request
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_its_limit_fails_as_a_timeout() {
        let (mut service, mut handle) = mock::spawn_layer::<Request<()>, &str, _>(PerTryLayer);
        assert_ready_ok!(service.poll_ready());
        let response = tokio::spawn(service.call(request(Some(Duration::from_millis(200)))));
        let (_, _answer) = handle.next_request().await.expect("the attempt reaches the endpoint");
        let error = response.await.expect("joins").expect_err("timed out");
        assert!(error.is::<ResponseTimeout>(), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_without_a_limit_waits_for_its_answer() {
        let (mut service, mut handle) = mock::spawn_layer::<Request<()>, &str, _>(PerTryLayer);
        assert_ready_ok!(service.poll_ready());
        let response = tokio::spawn(service.call(request(None)));
        let (_, answer) = handle.next_request().await.expect("the attempt reaches the endpoint");
        tokio::time::sleep(Duration::from_secs(600)).await;
        answer.send_response("late but fine");
        assert_eq!(response.await.expect("joins").expect("answered"), "late but fine");
    }

    #[test]
    fn untrusted_upstream_errors_are_renamed() {
        let mut response = Response::new(crate::http::empty());
        response.headers_mut().insert(FERRY_ERROR, http::HeaderValue::from_static("app_unreachable: claimed"));
        distrust(&mut response);
        assert!(!response.headers().contains_key(FERRY_ERROR));
        assert_eq!(response.headers()[UPSTREAM_ERROR], "app_unreachable: claimed");
    }
}
