//! `retry`: another attempt when one fails in a way that is safe to repeat.
//!
//! The layer is `tower::retry::Retry` with Ferry's [`RetryPolicy`]: which outcomes call for
//! another attempt is in [`classify`]; how many attempts a request gets, and the retry
//! timeout, come from the route rule (else [`mesh_default`]); each retry is charged to the
//! destination's retry budget (see [`crate::outbound::budget`]) before its backoff, and no
//! backoff starts that would end past the request's deadline (the [`RequestDeadline`] the
//! deadline layers above leave on it). The body is streamed to the
//! first attempt while a copy of up to [`MAX_REPLAY_BODY`] is kept for later ones.
//!
//! Every attempt carries `x-ferry-attempt` (1 for the first) and the request's [`Tried`], so
//! that the balancer sends a retry to an endpoint not tried yet. A request that arrives with an
//! attempt number above 1 is itself a retry one hop up, and is not retried again here: retries
//! would multiply along a chain of hops otherwise. Such requests, and those whose rule allows a
//! single attempt, bypass `tower::retry` altogether: no copy of their head or body is made.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use ferry_runtime::backoff::Backoff;
use http::{Request, Response};
use pin_project::pin_project;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

pub use self::{
    body::{AttemptBody, MAX_REPLAY_BODY},
    classify::{ATTEMPT_HEADER, incoming_attempt, mark_attempt, mesh_default, retry_reason},
};
use super::{attempt::Tried, deadline::RequestDeadline, endpoint::PerTryTimeout, protection::Protection, route::Retries};
use crate::http::{Body, BoxError};

pub mod body;
pub mod classify;

/// The backoff between attempts: up to 25 ms before the first retry, doubling to 250 ms.
pub const BACKOFF: Backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(250));

/// What a rule's retry layer follows.
#[derive(Clone)]
pub struct RetryConfig {
    /// How many attempts in all, on which failures, and each attempt's time limit.
    pub retries: Retries,
    pub backoff: Backoff,
    /// The destination whose retry budget pays for retries, and whose metrics count them.
    pub protection: Arc<Protection>,
    /// The rule, for the logs.
    pub label: Arc<str>,
}

/// Wraps a service in a [`Retry`].
#[derive(Clone)]
pub struct RetryLayer {
    config: Arc<RetryConfig>,
}

impl RetryLayer {
    /// A layer retrying as `config` says.
    pub fn new(config: RetryConfig) -> Self {
        Self { config: Arc::new(config) }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { config: self.config.clone(), inner }
    }
}

/// A service that retries its requests through `tower::retry`. Each request gets a
/// `tower::retry::Retry` of its own, so that its policy starts with the request's own state
/// (the attempt number, the deadline) rather than reading it back from headers.
#[derive(Clone)]
pub struct Retry<S> {
    config: Arc<RetryConfig>,
    inner: S,
}

impl<S> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<AttemptBody>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let config = &*self.config;
        // Every original request pays into the budget that its retries draw from.
        config.protection.budget.deposit();
        let retrying = config.retries.attempts > 1 && incoming_attempt(request.headers()) <= 1;
        let per_try = config.retries.per_try_timeout;
        let (mut parts, body) = request.into_parts();
        mark_attempt(&mut parts.headers, 1);
        if let Some(limit) = per_try {
            parts.extensions.insert(PerTryTimeout(limit));
        }
        if !retrying {
            let request = Request::from_parts(parts, AttemptBody::once(body));
            return ResponseFuture::Once { future: self.inner.call(request) };
        }
        parts.extensions.insert(Tried::default());
        let body = AttemptBody::replayable(body, &parts.headers);
        let policy = RetryPolicy {
            config: self.config.clone(),
            attempt: 1,
            // Set by the deadline layers above (the edge's and the rule's).
            deadline: parts.extensions.get::<RequestDeadline>().map(|deadline| deadline.0),
        };
        // The service polled ready goes with the request (its clone stays for the next one, to
        // be polled in turn); tower's `Retry` polls it again before every later attempt.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        let mut retry = tower::retry::Retry::new(policy, ready);
        ResponseFuture::Retrying { future: retry.call(Request::from_parts(parts, body)) }
    }
}

/// The response of a [`Retry`].
// The variants are held inline: the future lives in the connection's task, and boxing the
// larger one would add the allocation per request that naming the future avoids.
#[allow(clippy::large_enum_variant)]
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture<S>
where
    S: Service<Request<AttemptBody>, Response = Response<Body>, Error = BoxError>,
{
    /// A single attempt, straight to the inner service.
    Once {
        #[pin]
        future: S::Future,
    },
    /// Attempts as the policy allows.
    Retrying {
        #[pin]
        future: tower::retry::future::ResponseFuture<RetryPolicy, S, Request<AttemptBody>>,
    },
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request<AttemptBody>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Once { future } => future.poll(cx),
            ResponseFutureProj::Retrying { future } => future.poll(cx),
        }
    }
}

/// Ferry's `tower::retry::Policy`, one per request: it counts the request's attempts and
/// knows its deadline.
#[derive(Clone)]
pub struct RetryPolicy {
    config: Arc<RetryConfig>,
    /// The attempt in flight, from 1.
    attempt: u32,
    /// No retry's backoff may end past this.
    deadline: Option<Instant>,
}

impl tower::retry::Policy<Request<AttemptBody>, Response<Body>, BoxError> for RetryPolicy {
    type Future = Sleep;

    fn retry(&mut self, request: &mut Request<AttemptBody>, result: &mut Result<Response<Body>, BoxError>) -> Option<Sleep> {
        let config = &*self.config;
        // `request` is the copy kept for the next attempt.
        let attempt = self.attempt;
        if attempt >= config.retries.attempts || !request.body().can_replay() {
            return None;
        }
        let reason = retry_reason(&config.retries, request.method(), result)?;
        let delay = config.backoff.delay(attempt);
        if self.deadline.is_some_and(|deadline| Instant::now() + delay >= deadline) {
            return None;
        }
        // Charged now, before the backoff, so that requests failing together cannot all pass
        // the check while their retries sleep.
        let protection = &config.protection;
        if !protection.budget.try_withdraw() {
            tracing::debug!(service = %protection.service, rule = %config.label, attempt, reason, "the retry budget refuses a retry");
            protection.refused();
            return None;
        }
        protection.retried(reason);
        tracing::debug!(service = %protection.service, rule = %config.label, attempt, reason, ?delay, "retrying");
        self.attempt += 1;
        mark_attempt(request.headers_mut(), self.attempt);
        // (tower drops the failed attempt's response, and with it its connection and
        // circuit-breaker slot, before the backoff.)
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, request: &Request<AttemptBody>) -> Option<Request<AttemptBody>> {
        if self.attempt >= self.config.retries.attempts {
            // The last attempt: nothing is kept.
            return None;
        }
        let mut copy = Request::new(request.body().replay()?);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

#[cfg(test)]
mod tests;
