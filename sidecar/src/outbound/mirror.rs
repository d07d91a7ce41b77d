//! `mirror`: a copy of a share of a rule's requests, sent to another backend, fire and forget.
//! The caller's request goes on at once and never waits for the copy, whose answer is read and
//! dropped. Copies go straight to the backend's balancer: they bypass the circuit breaker and
//! the retry budget (they are never retried) and are bounded by their own limit instead:
//! [`MAX_MIRRORS`] in flight per destination, each for at most [`MIRROR_TIMEOUT`]; past that, copies
//! are skipped. Only requests whose body is known whole and small (no body, or a
//! `content-length` up to the replay bound) are copied.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{FutureExt, TryFutureExt, future::BoxFuture};
use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use super::retry::MAX_REPLAY_BODY;
use crate::http::{Body, BoxError, full};

/// Mirrored requests in flight at once, per destination.
pub const MAX_MIRRORS: usize = 64;

/// How long a mirrored copy may take, answer and body, before it is dropped.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a rule's copies go.
pub struct MirrorTo<M> {
    pub backend: M,
    pub percent: f64,
}

/// Wraps a service in a [`Mirror`].
pub struct MirrorLayer<M> {
    to: Option<Arc<(MirrorTo<M>, Arc<Semaphore>)>>,
}

impl<M> Clone for MirrorLayer<M> {
    fn clone(&self) -> Self {
        Self { to: self.to.clone() }
    }
}

impl<M> MirrorLayer<M> {
    /// A layer mirroring to `to`, or passing requests through with `None`, with at most
    /// `in_flight`'s permits of copies in flight (shared by every rule of a destination).
    pub fn new(to: Option<MirrorTo<M>>, in_flight: Arc<Semaphore>) -> Self {
        Self { to: to.map(|to| Arc::new((to, in_flight))) }
    }
}

impl<S, M> Layer<S> for MirrorLayer<M> {
    type Service = Mirror<S, M>;

    fn layer(&self, inner: S) -> Mirror<S, M> {
        Mirror { inner, to: self.to.clone() }
    }
}

/// A service that sends a copy of some of its requests to another backend.
pub struct Mirror<S, M> {
    inner: S,
    to: Option<Arc<(MirrorTo<M>, Arc<Semaphore>)>>,
}

impl<S: Clone, M> Clone for Mirror<S, M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), to: self.to.clone() }
    }
}

impl<S, M> Service<Request<Body>> for Mirror<S, M>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    M: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + Sync + 'static,
    M::Future: Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures::future::Either<S::Future, BoxFuture<'static, Result<Response<Body>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(to) = self.to.clone().filter(|to| ferry_runtime::rng::roll(to.0.percent) && copyable(&request)) else {
            return futures::future::Either::Left(self.inner.call(request));
        };
        let inner = self.inner.clone();
        let (parts, body) = request.into_parts();
        // Combinators rather than an async block: the inner futures are generic, and an async
        // block would have rustc lose their `Send` (rust-lang/rust#64552).
        let call = body.collect().map_err(BoxError::from).and_then(move |collected| {
            let bytes = collected.to_bytes();
            if let Ok(permit) = to.1.clone().try_acquire_owned() {
                let mut copy = Request::from_parts(parts.clone(), full(bytes.clone()));
                copy.headers_mut().insert("x-ferry-mirror", HeaderValue::from_static("true"));
                let sent: BoxFuture<'static, Result<Response<Body>, BoxError>> = to.0.backend.clone().oneshot(copy).boxed();
                tokio::spawn(async move {
                    let send = async {
                        if let Ok(response) = sent.await {
                            // Read and drop, so the connection can be reused.
                            let _ = response.into_body().collect().await;
                        }
                    };
                    // A mirror that never answers must not keep its slot for good.
                    let _ = tokio::time::timeout(MIRROR_TIMEOUT, send).await;
                    drop(permit);
                });
            }
            inner.oneshot(Request::from_parts(parts, full(bytes)))
        });
        futures::future::Either::Right(call.boxed())
    }
}

/// Whether the request's body is known whole and small enough to copy.
fn copyable(request: &Request<Body>) -> bool {
    if http_body::Body::is_end_stream(request.body()) {
        return true;
    }
    let length = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    length.is_some_and(|length| length <= MAX_REPLAY_BODY)
}

#[cfg(test)]
mod tests {
    use tower_test::mock;

    use super::*;
    use crate::http::empty;

    #[tokio::test(start_paused = true)]
    async fn a_copy_goes_to_the_mirror_and_the_request_goes_on() {
        let (mirror, mut mirrored) = mock::pair::<Request<Body>, Response<Body>>();
        let (inner, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let service = MirrorLayer::new(Some(MirrorTo { backend: mirror, percent: 100.0 }), Arc::new(Semaphore::new(MAX_MIRRORS)))
            .layer(inner);
        let request = Request::post("/orders").header(header::CONTENT_LENGTH, "5").body(full("order")).expect("request");
        let response = tokio::spawn(service.oneshot(request));
        let (request, answer) = handle.next_request().await.expect("the request goes on");
        assert_eq!(request.into_body().collect().await.expect("reads").to_bytes(), "order");
        answer.send_response(Response::new(empty()));
        assert!(response.await.expect("joins").is_ok(), "answered without waiting for the copy");
        let (copy, _never_answered) = mirrored.next_request().await.expect("a copy is sent");
        assert_eq!(copy.headers()["x-ferry-mirror"], "true");
        assert_eq!(copy.into_body().collect().await.expect("reads").to_bytes(), "order");
    }

    #[tokio::test(start_paused = true)]
    async fn streamed_bodies_are_not_copied() {
        let (mirror, mut mirrored) = mock::pair::<Request<Body>, Response<Body>>();
        let (inner, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let service = MirrorLayer::new(Some(MirrorTo { backend: mirror, percent: 100.0 }), Arc::new(Semaphore::new(MAX_MIRRORS)))
            .layer(inner);
        let request = Request::post("/upload").body(full("chunked, length unknown")).expect("request");
        let response = tokio::spawn(service.oneshot(request));
        let (_, answer) = handle.next_request().await.expect("the request goes on");
        answer.send_response(Response::new(empty()));
        assert!(response.await.expect("joins").is_ok());
        let copy = tokio::time::timeout(MIRROR_TIMEOUT, mirrored.next_request()).await;
        // (None once the layer, and with it the mirror's sender, is gone.)
        assert!(!matches!(copy, Ok(Some(_))), "no copy of a body whose length is unknown");
    }
}
