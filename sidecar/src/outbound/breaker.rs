//! Circuit breaking by concurrency: how many requests one calling sidecar may have in flight to
//! one destination service, and how many more may wait for a slot, before it sheds load.
//!
//! A request holds a slot from the moment it is dispatched until its response body ends (or is
//! dropped), so a slow stream counts as long as it flows. When every slot is taken, up to
//! `max_pending` requests wait for one (within their deadline, which the route's timeout
//! enforces around the wait); any more fail at once with [`Overloaded`], which the edge answers
//! `503` with `x-ferry-error: overloaded`. Failing fast is the point: a queue that grows without
//! bound turns an overloaded upstream into an overloaded caller.
//!
//! Unlike `tower::limit::ConcurrencyLimit`, capacity is not taken in `poll_ready`: requests are
//! dispatched concurrently from one shared service, and the waiting ones must be counted and
//! shed, which back-pressure alone cannot do.
//!
//! The limits are Envoy's `max_requests` and `max_pending_requests`, applied per calling sidecar:
//! a service called by N sidecars may get up to N × `max_concurrent` requests at once.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use pin_project::pin_project;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service, ServiceExt, util::Oneshot};

use super::policy::Limits;
use crate::{
    errors::Overloaded,
    http::{Body, BoxError, boxed},
};

/// The limits of one destination and the requests holding or waiting for its slots. Shared by
/// every request to the destination.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    service: Arc<str>,
    current: ArcSwap<Generation>,
    pending: AtomicUsize,
    /// Requests in flight, across policy changes; also the `ferry_requests_in_flight` gauge.
    in_flight: Gauge,
    shed: Counter,
}

/// The slots of one set of limits. A policy change starts a new generation: requests in flight
/// keep their slots in the old one until they end, so for a moment both count.
#[derive(Debug)]
struct Generation {
    limits: Limits,
    slots: Arc<Semaphore>,
}

impl Generation {
    fn new(limits: Limits) -> Self {
        Self { limits, slots: Arc::new(Semaphore::new(limits.max_concurrent.min(Semaphore::MAX_PERMITS))) }
    }
}

/// A slot taken: released when dropped.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl ConcurrencyLimit {
    /// Limits for `service`, counting into `in_flight` and `shed`.
    pub fn new(service: Arc<str>, limits: Limits, in_flight: Gauge, shed: Counter) -> Self {
        Self { service, current: ArcSwap::from_pointee(Generation::new(limits)), pending: AtomicUsize::new(0), in_flight, shed }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.current.load().limits
    }

    /// Follows a policy change.
    pub fn update(&self, limits: Limits) {
        if self.current.load().limits != limits {
            self.current.store(Arc::new(Generation::new(limits)));
        }
    }

    /// Requests holding a slot.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get().max(0) as usize
    }

    /// Requests waiting for one.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Takes a slot at once if one is free (`Ok(Some)`); `Ok(None)` when the request may wait
    /// for one ([`ConcurrencyLimit::acquire`]); [`Overloaded`] when it may not.
    pub fn try_acquire(&self) -> Result<Option<Permit>, Overloaded> {
        let generation = self.current.load();
        match generation.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                self.in_flight.inc();
                Ok(Some(Permit { _slot: slot, in_flight: self.in_flight.clone() }))
            }
            Err(_) if self.pending() < generation.limits.max_pending => Ok(None),
            Err(_) => {
                self.shed.inc();
                Err(self.overloaded(&generation.limits))
            }
        }
    }

    fn overloaded(&self, limits: &Limits) -> Overloaded {
        Overloaded { service: self.service.clone(), max_concurrent: limits.max_concurrent, max_pending: limits.max_pending }
    }

    /// Takes a slot, waiting for one if `max_pending` allows, else fails at once.
    pub async fn acquire(&self) -> Result<Permit, Overloaded> {
        let generation = self.current.load_full();
        let slot = match generation.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let max_pending = generation.limits.max_pending;
                let waiting =
                    self.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_pending).then_some(n + 1));
                if waiting.is_err() {
                    self.shed.inc();
                    return Err(self.overloaded(&generation.limits));
                }
                let _waiting = Waiting(&self.pending);
                // The semaphore is never closed.
                generation.slots.clone().acquire_owned().await.map_err(|_| self.overloaded(&generation.limits))?
            }
        };
        self.in_flight.inc();
        Ok(Permit { _slot: slot, in_flight: self.in_flight.clone() })
    }
}

/// Counts a request as pending while it waits, including when its caller gives up.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Wraps services with a [`Breaker`] sharing one [`ConcurrencyLimit`].
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    limit: Arc<ConcurrencyLimit>,
}

impl BreakerLayer {
    /// A layer sharing `limit`.
    pub fn new(limit: Arc<ConcurrencyLimit>) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;

    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker { inner, limit: self.limit.clone() }
    }
}

/// A service whose requests each hold a slot of a [`ConcurrencyLimit`] until their response
/// body ends.
#[derive(Clone, Debug)]
pub struct Breaker<S> {
    inner: S,
    limit: Arc<ConcurrencyLimit>,
}

impl<S, B> Service<Request<B>> for Breaker<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Capacity is taken per request, in `call`: see the module's docs. The inner service
        // is the balancer, which is always ready.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.limit.try_acquire() {
            Ok(Some(permit)) => ResponseFuture::Called { future: self.inner.call(request), permit: Some(permit) },
            Ok(None) => {
                let limit = self.limit.clone();
                let permit = Box::pin(async move { limit.acquire().await });
                ResponseFuture::Waiting { permit, next: Some((self.inner.clone(), request)) }
            }
            Err(overloaded) => ResponseFuture::Shed { error: Some(overloaded) },
        }
    }
}

impl<S: crate::outbound::split::Routable> crate::outbound::split::Routable for Breaker<S> {
    fn routable(&self) -> Option<usize> {
        self.inner.routable()
    }
}

/// The response of a [`Breaker`].
#[pin_project(project = ResponseFutureProj)]
pub enum ResponseFuture<S: Service<R>, R> {
    /// Waiting for a slot (within `max_pending`).
    Waiting {
        #[pin]
        permit: BoxFuture<'static, Result<Permit, Overloaded>>,
        next: Option<(S, R)>,
    },
    /// Holding a slot, waiting for the response.
    Called {
        #[pin]
        future: S::Future,
        permit: Option<Permit>,
    },
    /// Holding a slot it waited for: readiness is asked again before the call.
    Waited {
        #[pin]
        future: Oneshot<S, R>,
        permit: Option<Permit>,
    },
    /// Shed: every slot and every place in the queue taken.
    Shed { error: Option<Overloaded> },
}

impl<S, R> Future for ResponseFuture<S, R>
where
    S: Service<R, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                ResponseFutureProj::Waiting { permit, next } => {
                    let permit = ready!(permit.poll(cx))?;
                    let Some((inner, request)) = next.take() else {
                        return Poll::Ready(Err("a circuit-breaker future was polled after it ended".into()));
                    };
                    self.set(ResponseFuture::Waited { future: inner.oneshot(request), permit: Some(permit) });
                }
                ResponseFutureProj::Waited { future, permit } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    let permit = permit.take();
                    return Poll::Ready(Ok(response.map(|body| boxed(ReleaseAtEnd { body, permit }))));
                }
                ResponseFutureProj::Called { future, permit } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    let permit = permit.take();
                    return Poll::Ready(Ok(response.map(|body| boxed(ReleaseAtEnd { body, permit }))));
                }
                ResponseFutureProj::Shed { error } => {
                    let error: BoxError = match error.take() {
                        Some(overloaded) => Box::new(overloaded),
                        None => "a circuit-breaker future was polled after it ended".into(),
                    };
                    return Poll::Ready(Err(error));
                }
            }
        }
    }
}

/// A response body that gives its slot back as soon as it ends, fails, or is dropped.
struct ReleaseAtEnd {
    body: Body,
    permit: Option<Permit>,
}

impl http_body::Body for ReleaseAtEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.body.is_end_stream() {
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tower_test::mock;

    use super::*;
    use crate::http::{empty, full};

    fn limit(max_concurrent: usize, max_pending: usize) -> Arc<ConcurrencyLimit> {
        Arc::new(ConcurrencyLimit::new(
            "catalog".into(),
            Limits { max_concurrent, max_pending },
            Gauge::default(),
            Counter::default(),
        ))
    }

    fn request() -> Request<Body> {
        Request::get("/").body(empty()).expect("request")
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_slots_requests_wait_and_past_the_queue_they_are_shed() {
        let limit = limit(2, 1);
        let (mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let service = BreakerLayer::new(limit.clone()).layer(mock);
        let call = |service: &Breaker<_>| tokio::spawn(service.clone().oneshot(request()));

        let first = call(&service);
        let second = call(&service);
        let (_, first_answer) = handle.next_request().await.expect("the first is dispatched");
        let (_, second_answer) = handle.next_request().await.expect("the second is dispatched");
        assert_eq!(limit.in_flight(), 2);

        let third = call(&service);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(limit.pending(), 1, "the third waits for a slot");
        assert!(!third.is_finished());

        let fourth = call(&service).await.expect("joins").expect_err("shed at once");
        let overloaded = fourth.downcast_ref::<Overloaded>().expect("Overloaded");
        assert_eq!((overloaded.max_concurrent, overloaded.max_pending), (2, 1));
        assert_eq!(limit.shed.get(), 1);

        // The first ends with an empty body: its slot goes to the third.
        first_answer.send_response(Response::new(empty()));
        let response = first.await.expect("joins").expect("answered");
        assert!(response.into_body().collect().await.is_ok());
        let (_, third_answer) = handle.next_request().await.expect("the third is dispatched");
        assert_eq!((limit.in_flight(), limit.pending()), (2, 0));

        second_answer.send_error("failed");
        assert!(second.await.expect("joins").is_err());
        assert_eq!(limit.in_flight(), 1, "a failed request frees its slot");
        third_answer.send_response(Response::new(empty()));
        drop(third.await.expect("joins").expect("answered"));
        assert_eq!(limit.in_flight(), 0, "a dropped response frees its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_is_held_until_the_body_ends() {
        let limit = limit(1, 0);
        let (mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut service = BreakerLayer::new(limit.clone()).layer(mock);
        let pending = tokio::spawn(service.clone().oneshot(request()));
        let (_, answer) = handle.next_request().await.expect("dispatched");
        answer.send_response(Response::new(full("streamed")));
        let mut body = pending.await.expect("joins").expect("answered").into_body();
        assert_eq!(limit.in_flight(), 1, "headers came, the body has not ended");
        let error = service.ready().await.expect("ready").call(request()).await.expect_err("no slot, no queue");
        assert!(error.is::<Overloaded>());

        let frame = body.frame().await.expect("a frame").expect("no error");
        assert_eq!(frame.into_data().expect("data"), "streamed");
        assert_eq!(limit.in_flight(), 0, "released at the end of the body, before it is dropped");
        drop(body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_that_gives_up_leaves_the_queue() {
        let limit = limit(1, 1);
        let held = limit.acquire().await.expect("a slot");
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { tokio::time::timeout(Duration::from_secs(1), limit.acquire()).await.is_ok() }
        });
        assert!(!waiting.await.expect("joins"), "its deadline passed");
        assert_eq!(limit.pending(), 0);
        drop(held);
        assert!(limit.acquire().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn limits_follow_policy_changes() {
        let limit = limit(1, 0);
        let held = limit.acquire().await.expect("a slot");
        assert!(limit.acquire().await.is_err());
        limit.update(Limits { max_concurrent: 2, max_pending: 0 });
        let more = [limit.acquire().await, limit.acquire().await];
        assert!(more.iter().all(Result::is_ok), "two new slots");
        assert_eq!(limit.in_flight(), 3, "the old generation's request still counts as in flight");
        drop(held);
        assert_eq!(limit.limits(), Limits { max_concurrent: 2, max_pending: 0 });
    }
}
