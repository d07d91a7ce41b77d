//! `split`: the backend of one attempt, among a rule's weighted backends (subsets of the
//! service, or other services). Picked anew for every attempt, so that a retry may land on
//! another backend; backends with no endpoint able to take traffic are passed over while
//! another can take it. With every backend empty, the first of weight above zero is picked,
//! and its balancer says why it cannot serve.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tower::Service;

use crate::http::BoxError;

/// How many of a backend's endpoints can take traffic; `None` before its first config.
pub trait Routable {
    fn routable(&self) -> Option<usize>;
}

/// Splits requests over weighted backends. Cheap to clone. Always ready: every backend below
/// is (circuit breakers take their slots per request, balancers decide per request).
#[derive(Clone)]
pub struct Split<S> {
    backends: Arc<[(S, u32)]>,
}

impl<S> Split<S> {
    /// A split over `backends` and their weights. A rule has at least one backend.
    pub fn new(backends: Vec<(S, u32)>) -> Self {
        Self { backends: backends.into() }
    }
}

impl<S: Routable> Split<S> {
    /// The backend of the next attempt.
    fn pick(&self) -> Option<&S> {
        if let [(only, _)] = &*self.backends {
            return Some(only);
        }
        let usable = |(service, weight): &&(S, u32)| *weight > 0 && service.routable() != Some(0);
        let total: u32 = self.backends.iter().filter(usable).map(|(_, w)| *w).sum();
        if total == 0 {
            let first = self.backends.iter().find(|(_, weight)| *weight > 0).or(self.backends.first());
            return first.map(|(service, _)| service);
        }
        let mut roll = ferry_runtime::rng::range(0..total);
        for (service, weight) in self.backends.iter().filter(usable) {
            if roll < *weight {
                return Some(service);
            }
            roll -= weight;
        }
        None
    }
}

impl<S, R> Service<R> for Split<S>
where
    S: Service<R, Error = BoxError> + Routable + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures::future::Either<S::Future, futures::future::Ready<Result<S::Response, BoxError>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        match self.pick() {
            Some(backend) => futures::future::Either::Left(backend.clone().call(request)),
            None => futures::future::Either::Right(futures::future::ready(Err("no backend could be picked".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use futures::future::{Ready, ready};

    use super::*;

    /// A backend that answers its own name.
    #[derive(Clone)]
    struct Named(&'static str, Option<usize>);

    impl Routable for Named {
        fn routable(&self) -> Option<usize> {
            self.1
        }
    }

    impl Service<()> for Named {
        type Response = &'static str;
        type Error = BoxError;
        type Future = Ready<Result<&'static str, BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, (): ()) -> Self::Future {
            ready(Ok(self.0))
        }
    }

    async fn shares(split: &mut Split<Named>, requests: usize) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for _ in 0..requests {
            *counts.entry(split.call(()).await.expect("answered")).or_default() += 1;
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_follow_the_weights() {
        ferry_runtime::rng::seed(11);
        let mut split = Split::new(vec![(Named("v1", Some(2)), 90), (Named("v2", Some(2)), 10)]);
        let counts = shares(&mut split, 2000).await;
        let v2 = counts.get("v2").copied().unwrap_or(0);
        assert!((120..=280).contains(&v2), "about 10 % to v2: {counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn empty_backends_are_passed_over_and_weight_zero_takes_nothing() {
        let mut split = Split::new(vec![(Named("empty", Some(0)), 50), (Named("up", Some(1)), 50), (Named("dark", Some(3)), 0)]);
        assert_eq!(shares(&mut split, 200).await, HashMap::from([("up", 200)]));
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_backend_empty_the_first_says_why() {
        let mut split = Split::new(vec![(Named("dark", Some(0)), 0), (Named("first", Some(0)), 1), (Named("second", None), 1)]);
        // `second` has no config yet: it may still get some, as it may have endpoints.
        let counts = shares(&mut split, 100).await;
        assert_eq!(counts.get("dark"), None);
        assert_eq!(counts.get("first"), None, "an empty backend is passed over while another may serve");
        let mut all_empty = Split::new(vec![(Named("dark", Some(0)), 0), (Named("first", Some(0)), 1)]);
        assert_eq!(shares(&mut all_empty, 10).await, HashMap::from([("first", 10)]));
    }
}
