//! When an outbound request is tried again, and how its body survives the first attempt.
//!
//! Whatever the route says, a retry must be safe: a request that may have reached the upstream
//! app is repeated only when its method is idempotent (or, for gRPC, when the route names the
//! status), while a request that provably never got there (no connection, a refused or
//! unprocessed HTTP/2 stream, the endpoint's sidecar unable to reach its app) may be repeated
//! whatever its method. Requests that match no rule, or a rule without `retries`, get
//! [`mesh_default`]. The router runs the attempts; the budget and backoff bound them.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header, request::Parts};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::{attempt::Tried, guard::Guard, route::Retries};
use crate::{
    errors::{FERRY_ERROR, GRPC_STATUS, ResponseTimeout, is_grpc},
    http::{
        Body, BoxError,
        client::{ConnectError, UpstreamError},
        full,
        replay::ReplayBody,
    },
};

/// Request bodies up to this size are kept so the request can be retried or mirrored.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// The attempt number an outbound sidecar puts on each attempt it sends: 1 for the first. A
/// request arriving with a number above 1 is itself a retry, and is not retried again here.
pub const ATTEMPT_HEADER: http::HeaderName = http::HeaderName::from_static("x-ferry-attempt");

/// The gRPC status UNAVAILABLE.
const GRPC_UNAVAILABLE: u32 = 14;

/// The retry policy of requests that match no rule, or a rule without `retries`: up to 3
/// attempts on connect failures, refused streams and apps their sidecar could not reach (any
/// method), on resets (idempotent methods only), and on a trailers-only gRPC UNAVAILABLE: the
/// status gRPC defines as retryable, which servers and proxies answer for calls they did not
/// process.
pub fn mesh_default() -> Retries {
    Retries {
        attempts: 3,
        connect_failure: true,
        refused_stream: true,
        reset: true,
        grpc: vec![GRPC_UNAVAILABLE],
        ..Retries::default()
    }
}

/// The attempt number a request arrived with (1 when it carries none).
pub fn incoming_attempt(headers: &HeaderMap) -> u32 {
    headers.get(ATTEMPT_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(1)
}

/// Marks `headers` as attempt `attempt`.
pub fn mark_attempt(headers: &mut HeaderMap, attempt: u32) {
    headers.insert(ATTEMPT_HEADER, HeaderValue::from(attempt));
}

/// Why an attempt's outcome calls for another, as the `reason` label of `ferry_retries_total`;
/// `None` when it does not.
pub fn retry_reason(retries: &Retries, method: &Method, result: &Result<Response<Body>, BoxError>) -> Option<&'static str> {
    // A request that reached the upstream is retried only when repeating it is harmless.
    let idempotent =
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE);
    match result {
        Ok(response) => {
            let ferry_error = response.headers().get(FERRY_ERROR).map(HeaderValue::as_bytes);
            // The endpoint's sidecar could not reach its app: the request never got there. (The
            // inbound sidecar only lets `x-ferry-error` out on answers it made itself.)
            if ferry_error.is_some_and(|e| e.starts_with(b"app_unreachable")) {
                return retries.connect_failure.then_some("app_unreachable");
            }
            if ferry_error.is_some_and(|e| e.starts_with(b"app_failed")) {
                // The peer sidecar reached its app and the exchange broke: the app may have
                // done the work, whatever gRPC status the answer carries.
                return (idempotent && retries.reset).then_some("reset");
            }
            if idempotent && retries.retry_response(response.status().as_u16(), None) {
                return Some("status");
            }
            // Every gRPC call is a POST: the gRPC statuses of the policy (the route's, or the
            // mesh's UNAVAILABLE) declare the calls safe to repeat on those.
            if !is_grpc(response.headers()) {
                return None;
            }
            let grpc_status = response.headers().get(GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            retries.retry_response(0, grpc_status).then_some("grpc_status")
        }
        Err(error) => {
            // Looked for down the source chain: the balancer wraps errors of panic mode.
            if caused_by::<ConnectError>(error.as_ref()) {
                return retries.connect_failure.then_some("connect_failure");
            }
            if never_processed(error.as_ref()) {
                return retries.refused_stream.then_some("refused_stream");
            }
            if caused_by::<UpstreamError>(error.as_ref()) {
                return (idempotent && retries.reset).then_some("reset");
            }
            if caused_by::<ResponseTimeout>(error.as_ref()) {
                return (idempotent && (retries.reset || retries.any_5xx || retries.gateway_error)).then_some("timeout");
            }
            None
        }
    }
}

/// Whether `error` or one of its sources is a `T`.
fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<T>() {
            return true;
        }
        next = error.source();
    }
    false
}

/// Whether an HTTP/2 upstream said it never processed the stream: `REFUSED_STREAM`, or a
/// graceful GOAWAY that left the stream out (a GOAWAY with an error code fails every stream,
/// processed or not, so it proves nothing).
fn never_processed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
            if h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR) {
                return true;
            }
        }
        next = error.source();
    }
    false
}

/// Full-jitter exponential backoff ("Exponential Backoff And Jitter", AWS Architecture Blog,
/// 2015): before retry `n` (from 1), a random wait between 0 and `base × 2ⁿ⁻¹`, at most `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The longest wait before the first retry.
    pub base: Duration,
    /// The longest wait before any retry.
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(25), cap: Duration::from_millis(250) }
    }
}

impl Backoff {
    /// The longest wait before retry `retry` (from 1).
    pub fn ceiling(&self, retry: u32) -> Duration {
        self.base.saturating_mul(1 << retry.saturating_sub(1).min(16)).min(self.cap)
    }

    /// A wait before retry `retry`.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry).as_millis() as u64;
        Duration::from_millis(rand::random_range(0..=ceiling))
    }
}

/// One attempt on its way: the guard of the service it went to, and its outcome to come.
pub type Sent = (Arc<Guard>, BoxFuture<'static, Result<Response<Body>, BoxError>>);

/// How one request's attempts run.
pub struct Attempts<'a> {
    /// How many attempts in all, and on which failures.
    pub retries: &'a Retries,
    /// The wait between attempts.
    pub backoff: Backoff,
    /// No retry starts, its backoff included, that would begin past this.
    pub deadline: Option<Instant>,
    /// The rule, for the logs.
    pub label: &'a str,
}

impl Attempts<'_> {
    /// Sends the request through `send` until an attempt needs no retry, or no retry is
    /// allowed: the attempts are used up, the body cannot be sent again, the deadline is near,
    /// or the destination's budget refuses. The last attempt's outcome is the answer.
    ///
    /// Every attempt carries `x-ferry-attempt` and the request's [`Tried`], so the balancer
    /// can send a retry to an endpoint not tried yet.
    pub async fn run<F>(&self, mut parts: Parts, mut body: Prepared, mut send: F) -> Result<Response<Body>, BoxError>
    where
        F: FnMut(Request<Body>) -> Result<Sent, BoxError>,
    {
        // A request that is itself a retry, one hop up, is not retried again here: retries
        // multiply along a chain of hops otherwise.
        let attempts = if incoming_attempt(&parts.headers) > 1 { 1 } else { self.retries.attempts.max(1) };
        parts.extensions.insert(Tried::default());
        let mut attempt = 1;
        loop {
            mark_attempt(&mut parts.headers, attempt);
            if let Some(limit) = self.retries.per_try_timeout {
                // The balancer times the attempt itself, so that outlier detection counts it.
                parts.extensions.insert(crate::outbound::balance::AttemptTimeout(limit));
            }
            let (guard, sent) = send(Request::from_parts(parts.clone(), body.for_attempt()?))?;
            if attempt == 1 {
                guard.budget.deposit();
            }
            let result = match self.retries.per_try_timeout {
                Some(limit) => tokio::time::timeout(limit, sent).await.unwrap_or_else(|_| Err(Box::new(ResponseTimeout(limit)))),
                None => sent.await,
            };
            if attempt >= attempts || !body.replayable() {
                return result;
            }
            let Some(reason) = retry_reason(self.retries, &parts.method, &result) else { return result };
            let delay = self.backoff.delay(attempt);
            if self.deadline.is_some_and(|deadline| Instant::now() + delay >= deadline) {
                return result;
            }
            // Charged now, before the backoff, so that requests failing together cannot all
            // pass the check while their retries sleep.
            if !guard.budget.try_withdraw() {
                tracing::debug!(service = %guard.service, rule = self.label, attempt, reason, "the retry budget refuses a retry");
                guard.refused();
                return result;
            }
            guard.retried(reason);
            tracing::debug!(service = %guard.service, rule = self.label, attempt, reason, ?delay, "retrying");
            // The failed attempt's connection and circuit-breaker slot are free before the wait.
            drop(result);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A request body, ready to be sent more than once when it is small enough.
pub enum Prepared {
    /// Known whole (a small `content-length`): it can be mirrored and retried.
    Bytes(Bytes),
    /// Streamed to the first attempt as it arrives, with a copy of up to [`MAX_REPLAY_BODY`]
    /// kept for later ones (gRPC calls, chunked uploads).
    Replay(ReplayBody),
    /// Sent once.
    Stream(Option<Body>),
}

impl Prepared {
    /// Prepares `body` for retries. With `whole`, a body whose `content-length` is within the
    /// bound is read first (a mirror needs it whole); otherwise it streams while a copy is kept.
    pub async fn from(body: Body, headers: &HeaderMap, whole: bool) -> Result<Self, BoxError> {
        if http_body::Body::is_end_stream(&body) {
            return Ok(Self::Bytes(Bytes::new()));
        }
        let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        match length {
            Some(length) if length <= MAX_REPLAY_BODY && whole => Ok(Self::Bytes(body.collect().await?.to_bytes())),
            Some(length) if length > MAX_REPLAY_BODY => Ok(Self::Stream(Some(body))),
            _ => Ok(Self::Replay(ReplayBody::new(body, MAX_REPLAY_BODY as usize))),
        }
    }

    /// Whether another attempt can have the body.
    pub fn replayable(&self) -> bool {
        match self {
            Self::Bytes(_) => true,
            Self::Replay(body) => body.can_replay(),
            Self::Stream(_) => false,
        }
    }

    /// The whole body, when it is known.
    pub fn bytes(&self) -> Option<Bytes> {
        match self {
            Self::Bytes(bytes) => Some(bytes.clone()),
            Self::Replay(_) | Self::Stream(_) => None,
        }
    }

    /// The body for the next attempt.
    pub fn for_attempt(&mut self) -> Result<Body, BoxError> {
        match self {
            Self::Bytes(bytes) => Ok(full(bytes.clone())),
            Self::Replay(body) => {
                body.replay().map(crate::http::boxed).ok_or_else(|| "the request body cannot be sent again".into())
            }
            Self::Stream(body) => body.take().ok_or_else(|| "the request body was already sent".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::http::{client::ConnectFailure, empty};

    fn status(status: u16) -> Result<Response<Body>, BoxError> {
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        Ok(response)
    }

    fn grpc_unavailable() -> Result<Response<Body>, BoxError> {
        let mut response = Response::new(empty());
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response.headers_mut().insert("grpc-status", HeaderValue::from_static("14"));
        Ok(response)
    }

    fn connect_failed() -> Result<Response<Body>, BoxError> {
        Err(Box::new(ConnectError { address: "x".into(), reason: ConnectFailure::Timeout(Duration::from_secs(1)) }))
    }

    fn app_down() -> Result<Response<Body>, BoxError> {
        let mut response = status(502)?;
        response.headers_mut().insert(FERRY_ERROR, HeaderValue::from_static("app_unreachable: connecting to 127.0.0.1:1"));
        Ok(response)
    }

    #[test]
    fn a_call_that_reached_the_app_is_not_repeated_whatever_its_grpc_status() {
        let default = mesh_default();
        let mut broke = grpc_unavailable();
        if let Ok(response) = &mut broke {
            response.headers_mut().insert(FERRY_ERROR, HeaderValue::from_static("app_failed: connection reset"));
        }
        assert_eq!(retry_reason(&default, &Method::POST, &broke), None, "the app may have done the work");
        assert_eq!(retry_reason(&default, &Method::GET, &broke), Some("reset"), "an idempotent call may be repeated");
        // Errors wrapped on the way (panic mode) are still recognised.
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] BoxError);
        let wrapped: Result<Response<Body>, BoxError> = Err(Box::new(Wrapped(connect_failed().expect_err("an error"))));
        assert_eq!(retry_reason(&default, &Method::POST, &wrapped), Some("connect_failure"));
    }

    #[test]
    fn only_safe_requests_are_retried_after_they_reached_the_upstream() {
        let retries = Retries { attempts: 3, any_5xx: true, connect_failure: true, ..Retries::default() };
        assert_eq!(retry_reason(&retries, &Method::GET, &status(503)), Some("status"));
        assert_eq!(retry_reason(&retries, &Method::POST, &status(503)), None, "the POST reached the app");
        assert_eq!(retry_reason(&retries, &Method::GET, &status(404)), None);
        assert_eq!(retry_reason(&retries, &Method::POST, &grpc_unavailable()), None, "no gRPC status named");
        let grpc = Retries { attempts: 3, grpc: vec![14], ..Retries::default() };
        assert_eq!(retry_reason(&grpc, &Method::POST, &grpc_unavailable()), Some("grpc_status"), "named, though gRPC is POST");
        assert_eq!(retry_reason(&retries, &Method::POST, &connect_failed()), Some("connect_failure"), "never sent");
        assert_eq!(retry_reason(&retries, &Method::POST, &app_down()), Some("app_unreachable"), "never reached the app");
    }

    #[test]
    fn the_default_policy_retries_what_never_arrived_and_idempotent_failures() {
        let default = mesh_default();
        assert_eq!(default.attempts, 3);
        for method in [Method::GET, Method::POST] {
            assert_eq!(retry_reason(&default, &method, &connect_failed()), Some("connect_failure"), "{method}");
            assert_eq!(retry_reason(&default, &method, &app_down()), Some("app_unreachable"), "{method}");
            assert_eq!(retry_reason(&default, &method, &status(503)), None, "an app's own 5xx: {method}");
        }
        assert_eq!(retry_reason(&default, &Method::POST, &grpc_unavailable()), Some("grpc_status"), "gRPC's retryable status");
        assert_eq!(retry_reason(&default, &Method::GET, &grpc_unavailable()), Some("grpc_status"));
    }

    #[test]
    fn unprocessed_http2_streams_are_recognised() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] h2::Error);
        assert!(never_processed(&Wrapped(h2::Error::from(h2::Reason::REFUSED_STREAM))));
        assert!(!never_processed(&Wrapped(h2::Error::from(h2::Reason::INTERNAL_ERROR))));
    }

    #[test]
    fn attempts_are_numbered_in_a_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(incoming_attempt(&headers), 1);
        mark_attempt(&mut headers, 2);
        assert_eq!(incoming_attempt(&headers), 2);
        headers.insert(ATTEMPT_HEADER, HeaderValue::from_static("junk"));
        assert_eq!(incoming_attempt(&headers), 1);
    }

    #[test]
    fn backoff_is_full_jitter_exponential_and_capped() {
        let backoff = Backoff::default();
        let ceilings: Vec<u64> = (1..=6).map(|n| backoff.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [25, 50, 100, 200, 250, 250]);
        for retry in 1..=6 {
            for _ in 0..100 {
                assert!(backoff.delay(retry) <= backoff.ceiling(retry));
            }
        }
        let spread: std::collections::HashSet<_> = (0..200).map(|_| backoff.delay(3)).collect();
        assert!(spread.len() > 10, "jittered: {spread:?}");
    }

    type MockHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// Runs a request through `attempts` (built from `retries`) against a mock endpoint, in a
    /// task; returns its outcome to come and the mock's handle.
    fn spawn_run(
        retries: Retries,
        deadline: Option<Instant>,
        guard: Arc<Guard>,
        request: Request<Body>,
    ) -> (tokio::task::JoinHandle<Result<Response<Body>, BoxError>>, MockHandle) {
        use futures::FutureExt;
        use tower::ServiceExt;
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let task = tokio::spawn(async move {
            let (parts, body) = request.into_parts();
            let body = Prepared::from(body, &parts.headers, false).await?;
            let attempts = Attempts { retries: &retries, backoff: Backoff::default(), deadline, label: "test" };
            attempts.run(parts, body, |request| Ok((guard.clone(), mock.clone().oneshot(request).boxed()))).await
        });
        (task, handle)
    }

    fn guard() -> Arc<Guard> {
        super::super::guard::Guards::new(crate::metrics::Metrics::unregistered()).get(&"catalog".into())
    }

    fn connect_error() -> ConnectError {
        ConnectError { address: "x".into(), reason: ConnectFailure::Timeout(Duration::from_secs(1)) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_never_sent_is_retried_with_its_body_numbered_and_its_endpoints_shared() {
        let request = Request::post("/orders").header(header::CONTENT_LENGTH, "5").body(full("order")).expect("request");
        let (outcome, mut handle) = spawn_run(mesh_default(), None, guard(), request);
        let mut tried = None;
        for attempt in 1..=3 {
            let (request, answer) = handle.next_request().await.expect("an attempt");
            assert_eq!(request.headers()[ATTEMPT_HEADER], attempt.to_string().as_str());
            let shared = request.extensions().get::<Tried>().expect("every attempt carries Tried").clone();
            shared.record(format!("endpoint-{attempt}").into());
            tried = Some(shared);
            let body = request.into_body().collect().await.expect("reads").to_bytes();
            assert_eq!(body, "order", "attempt {attempt} sends the whole body");
            if attempt < 3 {
                answer.send_error(connect_error());
            } else {
                answer.send_response(Response::new(full("done")));
            }
        }
        assert_eq!(outcome.await.expect("joins").expect("answered").status(), StatusCode::OK);
        let endpoints = tried.expect("tried").endpoints();
        assert_eq!(endpoints.len(), 3, "one Tried for every attempt of the request: {endpoints:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_post_that_reached_the_app_is_not_retried() {
        let retries = Retries { attempts: 3, any_5xx: true, ..mesh_default() };
        let request = Request::post("/orders").body(full("order")).expect("request");
        let (outcome, mut handle) = spawn_run(retries, None, guard(), request);
        let (_, answer) = handle.next_request().await.expect("an attempt");
        answer.send_response(status(503).expect("response"));
        assert_eq!(outcome.await.expect("joins").expect("answered").status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_is_already_a_retry_is_not_retried_again() {
        let request = Request::get("/").header(ATTEMPT_HEADER, "2").body(empty()).expect("request");
        let (outcome, mut handle) = spawn_run(mesh_default(), None, guard(), request);
        let (request, answer) = handle.next_request().await.expect("an attempt");
        assert_eq!(request.headers()[ATTEMPT_HEADER], "1", "this hop numbers its own attempts");
        answer.send_error(connect_error());
        assert!(outcome.await.expect("joins").expect_err("not retried").is::<ConnectError>());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_and_the_deadline_stop_retries() {
        let refusing = guard();
        refusing.budget.update(crate::outbound::policy::Budget {
            ratio: 0.0,
            min_per_second: 0,
            window: Duration::from_secs(10),
        });
        let (outcome, mut handle) =
            spawn_run(mesh_default(), None, refusing.clone(), Request::get("/").body(empty()).expect("request"));
        let (_, answer) = handle.next_request().await.expect("an attempt");
        answer.send_error(connect_error());
        assert!(outcome.await.expect("joins").is_err(), "the last attempt's outcome");
        assert_eq!(refusing.budget.counts(), (1, 0));

        let deadline = Some(Instant::now());
        let (outcome, mut handle) =
            spawn_run(mesh_default(), deadline, guard(), Request::get("/").body(empty()).expect("request"));
        let (_, answer) = handle.next_request().await.expect("an attempt");
        answer.send_error(connect_error());
        assert!(outcome.await.expect("joins").is_err(), "no backoff may end past the deadline");
    }

    #[tokio::test]
    async fn the_default_policy_streams_bodies_while_keeping_a_copy() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let mut prepared = Prepared::from(full("hello"), &headers, false).await.expect("prepared");
        assert!(matches!(prepared, Prepared::Replay(_)), "streamed, not read first");
        let first = prepared.for_attempt().expect("a body").collect().await.expect("reads").to_bytes();
        assert_eq!(first, "hello");
        assert!(prepared.replayable());
        assert!(matches!(Prepared::from(full("hello"), &headers, true).await.expect("prepared"), Prepared::Bytes(_)));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(MAX_REPLAY_BODY + 1));
        assert!(!Prepared::from(full("x"), &headers, false).await.expect("prepared").replayable(), "too large to keep");
    }
}
