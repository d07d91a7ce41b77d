//! Round-robin load balancing over the routable endpoints of one service.
//!
//! A [`Balance`] follows one service's state in the [`Catalog`](crate::catalog::Catalog): a
//! background task rebuilds its endpoint list on every change, reusing the endpoint service of
//! every endpoint that stayed (and with it, its pooled connections). The request path only loads
//! the current list from an `ArcSwap` and picks the next endpoint: no lock, no copy of config.
//!
//! Only passing and warning endpoints take traffic. A service with none answers [`NoEndpoints`],
//! one the control plane does not know answers [`UnknownService`], and a request that arrives
//! before the first config waits for it up to the discovery timeout.
//!
//! This layer is the seam for smarter balancers (P2C over peak-EWMA latency): they take the same
//! inputs, a state watch and a [`NewService`] for endpoints, and slot in without touching the
//! layers around them.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use futures::{FutureExt, future::BoxFuture};
use tokio::sync::watch;
use tower::{Service, ServiceExt};

use crate::{
    catalog::{Endpoint, ServiceState},
    errors::{DiscoveryTimeout, NoEndpoints, UnknownService, UnknownSubset},
    http::BoxError,
    svc::NewService,
};

/// Balances requests over a service's endpoints. Cheap to clone; clones share everything.
pub struct Balance<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

struct Shared<S> {
    service: Arc<str>,
    /// Only endpoints carrying the labels of this subset (from the service's policy).
    subset: Option<Arc<str>>,
    endpoints: ArcSwap<Endpoints<S>>,
    next: AtomicUsize,
    state: watch::Receiver<ServiceState>,
    discovery_timeout: Duration,
    builder: Mutex<Builder<S>>,
    updates: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The endpoint services currently in use.
enum Endpoints<S> {
    Pending,
    Known { version: u64, exists: bool, total: usize, routable: Vec<S>, subset_defined: bool },
}

/// Builds endpoint services, keeping one per endpoint across updates.
struct Builder<S> {
    new_endpoint: Box<dyn NewService<Arc<Endpoint>, Service = S> + Send>,
    built: HashMap<(String, u16), S>,
}

impl<S> Drop for Shared<S> {
    fn drop(&mut self) {
        if let Some(task) = self.updates.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

impl<S> Balance<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// A balancer over the endpoints of `service`, following `state`.
    pub fn new<N>(service: Arc<str>, state: watch::Receiver<ServiceState>, new_endpoint: N, discovery_timeout: Duration) -> Self
    where
        N: NewService<Arc<Endpoint>, Service = S> + Send + 'static,
    {
        Self::subset(service, None, state, new_endpoint, discovery_timeout)
    }

    /// A balancer over the endpoints of `service` in `subset` (all of them when `None`), as the
    /// service's policy defines the subset.
    pub fn subset<N>(
        service: Arc<str>,
        subset: Option<Arc<str>>,
        state: watch::Receiver<ServiceState>,
        new_endpoint: N,
        discovery_timeout: Duration,
    ) -> Self
    where
        N: NewService<Arc<Endpoint>, Service = S> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            service,
            subset,
            endpoints: ArcSwap::from_pointee(Endpoints::Pending),
            next: AtomicUsize::new(0),
            state: state.clone(),
            discovery_timeout,
            builder: Mutex::new(Builder { new_endpoint: Box::new(new_endpoint), built: HashMap::new() }),
            updates: Mutex::new(None),
        });
        shared.refresh();
        let task = tokio::spawn(follow(Arc::downgrade(&shared), state));
        *shared.updates.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        Self { shared }
    }
}

/// Rebuilds the endpoints on every change of the service's state.
async fn follow<S: Clone>(shared: Weak<Shared<S>>, mut state: watch::Receiver<ServiceState>) {
    while state.changed().await.is_ok() {
        match shared.upgrade() {
            Some(shared) => shared.refresh(),
            None => return,
        }
    }
}

impl<S> Balance<S> {
    /// How many endpoints can take traffic; `None` before the service's first config.
    pub fn routable(&self) -> Option<usize> {
        match &**self.shared.endpoints.load() {
            Endpoints::Pending => None,
            Endpoints::Known { routable, .. } => Some(routable.len()),
        }
    }
}

impl<S: Clone> Shared<S> {
    /// Brings the endpoint list up to the service's current state.
    fn refresh(&self) {
        // Read the state under the builder's lock, so two refreshes cannot store out of order.
        let mut builder = self.builder.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.state.borrow().clone();
        let ServiceState::Known(config) = state else { return };
        if let Endpoints::Known { version, .. } = **self.endpoints.load()
            && version == config.version
        {
            return;
        }
        let labels = self
            .subset
            .as_ref()
            .map(|subset| config.policy.as_ref().and_then(|policy| policy.subsets.get(&**subset)).map(|s| s.labels.clone()));
        let subset_defined = !matches!(labels, Some(None));
        let in_subset = |endpoint: &Endpoint| match &labels {
            Some(Some(labels)) => labels.iter().all(|(k, v)| endpoint.metadata.get(k) == Some(v)),
            Some(None) => false,
            None => true,
        };
        let mut built = HashMap::with_capacity(config.endpoints.len());
        let mut routable = Vec::new();
        let mut total = 0;
        for endpoint in config.endpoints.values().filter(|e| in_subset(e)) {
            total += 1;
            let key = (endpoint.address.clone(), endpoint.port);
            let service = match builder.built.remove(&key) {
                Some(service) => service,
                None => builder.new_endpoint.new_service(endpoint.clone()),
            };
            if endpoint.health.is_routable() {
                routable.push(service.clone());
            }
            built.insert(key, service);
        }
        builder.built = built;
        self.endpoints.store(Arc::new(Endpoints::Known {
            version: config.version,
            exists: config.exists,
            total,
            routable,
            subset_defined,
        }));
    }

    /// The next endpoint in turn.
    fn pick(&self) -> Result<Option<S>, BoxError> {
        match &**self.endpoints.load() {
            Endpoints::Pending => Ok(None),
            Endpoints::Known { exists: false, .. } => Err(Box::new(UnknownService(self.service.clone()))),
            Endpoints::Known { subset_defined: false, .. } => {
                Err(Box::new(UnknownSubset { service: self.service.clone(), subset: self.subset.clone().unwrap_or_default() }))
            }
            Endpoints::Known { routable, total, .. } if routable.is_empty() => {
                Err(Box::new(NoEndpoints { service: self.service.clone(), subset: self.subset.clone(), total: *total }))
            }
            Endpoints::Known { routable, .. } => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % routable.len();
                Ok(Some(routable[i].clone()))
            }
        }
    }

    /// Waits for the first config of the service, up to the discovery timeout.
    async fn wait_for_config(&self) -> Result<S, BoxError> {
        let mut state = self.state.clone();
        let known = tokio::time::timeout(self.discovery_timeout, state.wait_for(|s| matches!(s, ServiceState::Known(_))));
        match known.await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                return Err(Box::new(DiscoveryTimeout { service: self.service.clone(), timeout: self.discovery_timeout }));
            }
        }
        self.refresh();
        self.pick()?.ok_or_else(|| -> BoxError {
            Box::new(DiscoveryTimeout { service: self.service.clone(), timeout: self.discovery_timeout })
        })
    }
}

impl<S, Req> Service<Req> for Balance<S>
where
    S: Service<Req> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Endpoint services hold pools and are always ready; readiness is decided per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let shared = self.shared.clone();
        async move {
            let endpoint = match shared.pick()? {
                Some(endpoint) => endpoint,
                None => shared.wait_for_config().await?,
            };
            endpoint.oneshot(request).await.map_err(Into::into)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferry_health::Health;
    use tower_test::assert_request_eq;

    use super::*;
    use crate::catalog::ServiceConfig;

    /// An endpoint service that answers with its endpoint's id.
    #[derive(Clone)]
    struct Echo(String);

    impl Service<()> for Echo {
        type Response = String;
        type Error = BoxError;
        type Future = futures::future::Ready<Result<String, BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: ()) -> Self::Future {
            futures::future::ready(Ok(self.0.clone()))
        }
    }

    fn config(version: u64, endpoints: &[(&str, Health)]) -> ServiceState {
        let endpoints: BTreeMap<_, _> = endpoints
            .iter()
            .enumerate()
            .map(|(i, (id, health))| {
                let endpoint = Endpoint {
                    id: id.to_string(),
                    address: "127.0.0.1".into(),
                    port: 8000 + i as u16,
                    health: *health,
                    metadata: BTreeMap::new(),
                    region: String::new(),
                    zone: String::new(),
                    weight: 100,
                };
                (id.to_string(), Arc::new(endpoint))
            })
            .collect();
        ServiceState::Known(Arc::new(ServiceConfig {
            name: "catalog".into(),
            version,
            exists: !endpoints.is_empty(),
            endpoints,
            route: None,
            policy: None,
        }))
    }

    fn balance(state: &watch::Sender<ServiceState>) -> Balance<Echo> {
        Balance::new("catalog".into(), state.subscribe(), |e: Arc<Endpoint>| Echo(e.id.clone()), Duration::from_secs(5))
    }

    async fn call(balance: &mut Balance<Echo>) -> Result<String, BoxError> {
        balance.ready().await?.call(()).await
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_over_passing_endpoints_only() {
        let state = watch::Sender::new(config(1, &[("a", Health::Passing), ("b", Health::Critical), ("c", Health::Warning)]));
        let mut balance = balance(&state);
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(call(&mut balance).await.expect("answers"));
        }
        assert_eq!(seen, ["a", "c", "a", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_reaches_exactly_one_endpoint_service() {
        // Mock endpoint services: each request must arrive, unchanged, at the endpoint picked.
        let (mock_a, mut handle_a) = tower_test::mock::pair::<&'static str, &'static str>();
        let (mock_b, mut handle_b) = tower_test::mock::pair::<&'static str, &'static str>();
        let mocks = std::sync::Mutex::new(HashMap::from([("a".to_owned(), mock_a), ("b".to_owned(), mock_b)]));
        let state = watch::Sender::new(config(1, &[("a", Health::Passing), ("b", Health::Passing)]));
        let mut balance = Balance::new(
            "catalog".into(),
            state.subscribe(),
            move |e: Arc<Endpoint>| mocks.lock().expect("not poisoned").remove(&e.id).expect("one endpoint service per endpoint"),
            Duration::from_secs(5),
        );

        let first = tokio::spawn(balance.ready().await.expect("ready").call("first"));
        let (request, respond) = handle_a.next_request().await.expect("a gets the first request");
        assert_eq!(request, "first");
        respond.send_response("from a");
        assert_eq!(first.await.expect("joins").expect("answers"), "from a");

        let second = tokio::spawn(balance.ready().await.expect("ready").call("second"));
        assert_request_eq!(handle_b, "second").send_response("from b");
        assert_eq!(second.await.expect("joins").expect("answers"), "from b");
    }

    #[tokio::test(start_paused = true)]
    async fn follows_endpoint_changes() {
        let state = watch::Sender::new(config(1, &[("a", Health::Passing)]));
        let mut balance = balance(&state);
        assert_eq!(call(&mut balance).await.expect("answers"), "a");
        state.send_replace(config(2, &[("a", Health::Critical), ("b", Health::Passing)]));
        tokio::task::yield_now().await;
        for _ in 0..3 {
            assert_eq!(call(&mut balance).await.expect("answers"), "b");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn explains_why_nothing_can_be_picked() {
        let state = watch::Sender::new(config(1, &[("a", Health::Critical), ("b", Health::Draining)]));
        let mut balance = balance(&state);
        let error = call(&mut balance).await.expect_err("none passing");
        assert_eq!(error.to_string(), "catalog has 0 of 2 passing");

        state.send_replace(config(2, &[]));
        tokio::task::yield_now().await;
        let error = call(&mut balance).await.expect_err("unknown");
        assert!(error.is::<UnknownService>(), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_before_the_first_config_waits_for_it_within_the_bound() {
        let state = watch::Sender::new(ServiceState::Pending);
        let balance = balance(&state);
        let waiting = tokio::spawn({
            let mut balance = balance.clone();
            async move { call(&mut balance).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        state.send_replace(config(1, &[("a", Health::Passing)]));
        assert_eq!(waiting.await.expect("joins").expect("answers"), "a");

        let pending = watch::Sender::new(ServiceState::Pending);
        let mut starved = super::Balance::new(
            "ghost".into(),
            pending.subscribe(),
            |e: Arc<Endpoint>| Echo(e.id.clone()),
            Duration::from_secs(5),
        );
        let error = call(&mut starved).await.expect_err("times out");
        assert!(error.is::<DiscoveryTimeout>(), "{error}");
        drop(balance);
    }
}
