//! Load balancing over the routable endpoints of one service, or of one subset of it.
//!
//! A [`Balance`] follows one service's state in the [`Catalog`](crate::catalog::Catalog): a
//! background task rebuilds its endpoint list on every change, reusing the endpoint service (and
//! its pooled connections) and the tracked load of every endpoint that stayed. The request path
//! loads the current list from an `ArcSwap` and picks; the only locks it takes are per endpoint.
//!
//! Picking, per request:
//! 1. the routable endpoints (passing or warning), less those outlier detection ejected; when
//!    that leaves none, all of them (panic mode, counted in a metric and named in the error of
//!    a failed request);
//! 2. only those in the caller's zone, while that zone has enough of its endpoints passing;
//! 3. less those this request already tried (see [`Tried`]), unless that leaves none;
//! 4. then the service policy's algorithm: P2C over peak-EWMA latency (the default), round-robin,
//!    least-request, or ring-hash; endpoint weights and slow start weigh every one of them.
//!
//! Each exchange then feeds back: its latency into the endpoint's estimate, its outcome (from
//! the status, or the gRPC status in the trailers) into outlier detection, and it counts as in
//! flight until its response body ends.
//!
//! A service with no routable endpoint answers [`NoEndpoints`], one the control plane does not
//! know answers [`UnknownService`], and a request that arrives before the first config waits for
//! it up to the discovery timeout.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use futures::{FutureExt, future::BoxFuture};
use http::{HeaderValue, Request, Response};
use smallvec::SmallVec;
use tokio::{sync::watch, time::Instant};
use tower::{Service, ServiceExt};

use self::{
    endpoint::{Availability, OutlierSet, Tracked},
    exchange::Exchange,
    outcome::{Observed, Outcome, Verdict},
    pick::{Ring, RoundRobin},
};
use super::{
    attempt::Tried,
    policy::{Algorithm, Resilience},
};
use crate::{
    catalog::{Endpoint, ServiceState},
    errors::{DiscoveryTimeout, FERRY_ERROR, NoEndpoints, UnknownService, UnknownSubset},
    http::{Body, BoxError, boxed, server::ClientAddr},
    svc::NewService,
};

pub mod endpoint;
mod exchange;
pub mod outcome;
pub mod pick;

pub use crate::metrics::BalanceMetrics;

/// What an endpoint service is built for: the endpoint, and the connect timeout its service's
/// policy asks for (else the sidecar's).
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Arc<Endpoint>,
    pub connect_timeout: Option<Duration>,
}

/// How a balancer is set up.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// How long a request waits for the service's first config.
    pub discovery_timeout: Duration,
    /// The caller's zone, for locality.
    pub zone: Option<Arc<str>>,
    pub metrics: BalanceMetrics,
    /// Where endpoint rebuilds run: the main runtime, off the data path's workers.
    pub runtime: tokio::runtime::Handle,
}

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
    config: BalanceConfig,
    endpoints: ArcSwap<Endpoints<S>>,
    state: watch::Receiver<ServiceState>,
    outliers: Arc<OutlierSet>,
    builder: Mutex<Builder<S>>,
    updates: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The endpoint services currently in use.
enum Endpoints<S> {
    Pending,
    Known(Known<S>),
}

struct Known<S> {
    version: u64,
    exists: bool,
    total: usize,
    subset_defined: bool,
    resilience: Arc<Resilience>,
    /// The routable endpoints.
    members: Vec<Member<S>>,
    /// Endpoints of the subset in the caller's zone, routable or not.
    zone_total: usize,
    ring: Option<Ring>,
    round_robin: RoundRobin,
}

struct Member<S> {
    service: S,
    endpoint: Arc<Endpoint>,
    tracked: Arc<Tracked>,
}

/// An endpoint's service and tracked state, as last built.
struct Built<S> {
    service: S,
    endpoint: Arc<Endpoint>,
    tracked: Arc<Tracked>,
}

/// Builds endpoint services, keeping one per endpoint across updates.
struct Builder<S> {
    new_endpoint: Box<dyn NewService<Target, Service = S> + Send>,
    built: HashMap<(String, String, u16), Built<S>>,
    connect_timeout: Option<Duration>,
    refreshed: bool,
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
    /// A balancer over the endpoints of `service` in `subset` (all of them when `None`), as the
    /// service's policy defines the subset, following `state`.
    pub fn new<N>(
        service: Arc<str>,
        subset: Option<Arc<str>>,
        state: watch::Receiver<ServiceState>,
        new_endpoint: N,
        config: BalanceConfig,
    ) -> Self
    where
        N: NewService<Target, Service = S> + Send + 'static,
    {
        let label: Arc<str> = match &subset {
            Some(subset) => format!("{service}/{subset}").into(),
            None => service.clone(),
        };
        let shared = Arc::new(Shared {
            service,
            subset,
            outliers: Arc::new(OutlierSet::new(label, config.metrics.clone())),
            config,
            endpoints: ArcSwap::from_pointee(Endpoints::Pending),
            state: state.clone(),
            builder: Mutex::new(Builder {
                new_endpoint: Box::new(new_endpoint),
                built: HashMap::new(),
                connect_timeout: None,
                refreshed: false,
            }),
            updates: Mutex::new(None),
        });
        shared.refresh();
        let task = shared.config.runtime.spawn(follow(Arc::downgrade(&shared), state));
        *ferry_runtime::lock(&shared.updates) = Some(task.abort_handle());
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

impl<S> crate::outbound::split::Routable for Balance<S> {
    fn routable(&self) -> Option<usize> {
        self.routable()
    }
}

impl<S> Balance<S> {
    /// How many endpoints can take traffic; `None` before the service's first config.
    pub fn routable(&self) -> Option<usize> {
        match &**self.shared.endpoints.load() {
            Endpoints::Pending => None,
            Endpoints::Known(known) => Some(known.members.len()),
        }
    }

    /// What the balancer holds, for `/config` and `explain`.
    pub fn describe(&self) -> BalancerState {
        let now = Instant::now();
        match &**self.shared.endpoints.load() {
            Endpoints::Pending => BalancerState::Pending,
            Endpoints::Known(known) => {
                let balancing = &known.resilience.balancing;
                let endpoints = known
                    .members
                    .iter()
                    .map(|m| EndpointState {
                        id: m.tracked.id.clone(),
                        zone: m.endpoint.zone.clone(),
                        weight: m.endpoint.weight,
                        in_flight: m.tracked.in_flight(),
                        latency: Duration::try_from_secs_f64(m.tracked.latency(now, balancing.decay)).unwrap_or_default(),
                        ejected: m.tracked.is_ejected(),
                        slow_start_share: m.tracked.ramp(now, balancing.slow_start),
                    })
                    .collect();
                BalancerState::Known {
                    algorithm: balancing.algorithm.name(),
                    endpoints,
                    panic_requests: self.shared.config.metrics.panic_requests(&self.shared.outliers.label),
                }
            }
        }
    }
}

/// What a balancer holds.
#[derive(Debug, Clone)]
pub enum BalancerState {
    /// Before the service's first config.
    Pending,
    Known {
        algorithm: &'static str,
        endpoints: Vec<EndpointState>,
        panic_requests: u64,
    },
}

/// One endpoint as its balancer sees it.
#[derive(Debug, Clone)]
pub struct EndpointState {
    pub id: Arc<str>,
    pub zone: String,
    pub weight: u32,
    pub in_flight: usize,
    /// The peak-EWMA latency estimate.
    pub latency: Duration,
    pub ejected: bool,
    /// Its share of its weight while it warms up (1 when warm).
    pub slow_start_share: f64,
}

impl<S: Clone> Shared<S> {
    /// Brings the endpoint list up to the service's current state.
    fn refresh(&self) {
        // Read the state under the builder's lock, so two refreshes cannot store out of order.
        let mut builder = ferry_runtime::lock(&self.builder);
        let state = self.state.borrow().clone();
        let ServiceState::Known(config) = state else { return };
        if let Endpoints::Known(known) = &**self.endpoints.load()
            && known.version == config.version
        {
            return;
        }
        let now = Instant::now();
        // Endpoints present when the balancer starts are not new: no slow start for them.
        let warm = !std::mem::replace(&mut builder.refreshed, true);
        let resilience = Arc::new(Resilience::of(config.policy.as_deref()));
        if builder.connect_timeout != resilience.connect_timeout {
            // Endpoint services are built with the connect timeout: rebuild them all.
            builder.connect_timeout = resilience.connect_timeout;
            let kept = std::mem::take(&mut builder.built);
            for (key, built) in kept {
                let target = Target { endpoint: built.endpoint.clone(), connect_timeout: resilience.connect_timeout };
                let service = builder.new_endpoint.new_service(target);
                builder.built.insert(key, Built { service, ..built });
            }
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
        let zone = self.config.zone.as_deref().filter(|z| !z.is_empty());
        // Where an endpoint that becomes routable starts its latency estimate: the fastest of
        // those routable until now that have been measured.
        let decay = resilience.balancing.decay;
        let baseline = builder
            .built
            .values()
            .filter(|b| b.endpoint.health.is_routable() && b.tracked.measured())
            .map(|b| b.tracked.latency(now, decay))
            .fold(None, |min: Option<f64>, l| Some(min.map_or(l, |m| m.min(l))));
        let mut built = HashMap::with_capacity(config.endpoints.len());
        let mut members = Vec::new();
        let mut total = 0;
        let mut zone_total = 0;
        for endpoint in config.endpoints.values().filter(|e| in_subset(e)) {
            total += 1;
            if zone.is_some_and(|z| endpoint.zone == z) {
                zone_total += 1;
            }
            let key = (endpoint.id.clone(), endpoint.address.clone(), endpoint.port);
            // The same endpoint keeps its service and tracked state, whatever else changed
            // (health, metadata, weight).
            let (service, tracked) = match builder.built.remove(&key) {
                Some(built) => (built.service, built.tracked),
                None => {
                    let target = Target { endpoint: endpoint.clone(), connect_timeout: resilience.connect_timeout };
                    let service = builder.new_endpoint.new_service(target);
                    (service, Arc::new(Tracked::new(&endpoint.id, resilience.balancing.default_rtt, now)))
                }
            };
            let routable = endpoint.health.is_routable();
            tracked.set_routable(routable, now, warm, baseline);
            if routable {
                members.push(Member { service: service.clone(), endpoint: endpoint.clone(), tracked: tracked.clone() });
            }
            built.insert(key, Built { service, endpoint: endpoint.clone(), tracked });
        }
        builder.built = built;
        let ring = (resilience.balancing.algorithm == Algorithm::RingHash).then(|| {
            let points: Vec<(&str, u32)> = members.iter().map(|m| (&*m.tracked.id, m.endpoint.weight)).collect();
            Ring::new(&points)
        });
        self.outliers.update(members.iter().map(|m| m.tracked.clone()).collect(), resilience.ejection);
        self.endpoints.store(Arc::new(Endpoints::Known(Known {
            version: config.version,
            exists: config.exists,
            total,
            subset_defined,
            resilience,
            members,
            zone_total,
            ring,
            round_robin: RoundRobin::default(),
        })));
    }

    /// Waits for the first config of the service, up to the discovery timeout.
    async fn wait_for_config(&self) -> Result<(), BoxError> {
        let mut state = self.state.clone();
        let known = tokio::time::timeout(self.config.discovery_timeout, state.wait_for(|s| matches!(s, ServiceState::Known(_))));
        match known.await {
            Ok(Ok(_)) => {
                self.refresh();
                Ok(())
            }
            Ok(Err(_)) | Err(_) => {
                Err(Box::new(DiscoveryTimeout { service: self.service.clone(), timeout: self.config.discovery_timeout }))
            }
        }
    }

    /// Picks the endpoint for `request`.
    fn pick<B>(&self, request: &Request<B>) -> Result<Option<Choice<S>>, BoxError> {
        let endpoints = self.endpoints.load();
        let known = match &**endpoints {
            Endpoints::Pending => return Ok(None),
            Endpoints::Known(known) => known,
        };
        if !known.exists {
            return Err(Box::new(UnknownService(self.service.clone())));
        }
        if !known.subset_defined {
            return Err(Box::new(UnknownSubset {
                service: self.service.clone(),
                subset: self.subset.clone().unwrap_or_default(),
            }));
        }
        if known.members.is_empty() {
            return Err(Box::new(NoEndpoints { service: self.service.clone(), subset: self.subset.clone(), total: known.total }));
        }
        let now = Instant::now();
        let balancing = &known.resilience.balancing;
        let members = &known.members;

        // (Kept inline up to 16 endpoints: no allocation per request for most services.)
        // 1. Not ejected; all of them when every one is (panic mode).
        let availability: SmallVec<[Availability; 16]> = members.iter().map(|m| m.tracked.availability(now)).collect();
        let mut candidates: SmallVec<[usize; 16]> =
            (0..members.len()).filter(|i| availability[*i] != Availability::Ejected).collect();
        let panic = candidates.is_empty();
        if panic {
            candidates = (0..members.len()).collect();
            self.config.metrics.panicked(&self.outliers.label);
        }
        // 2. The caller's zone, while enough of it passes.
        if let (Some(zone), Some(min_percent)) = (self.config.zone.as_deref(), balancing.locality_min_passing_percent)
            && !zone.is_empty()
            && known.zone_total > 0
        {
            let local: SmallVec<[usize; 16]> = candidates.iter().copied().filter(|i| members[*i].endpoint.zone == zone).collect();
            if !local.is_empty() && local.len() * 100 >= min_percent as usize * known.zone_total {
                candidates = local;
            }
        }
        // 3. Somewhere this request has not been yet.
        let tried = request.extensions().get::<Tried>();
        if let Some(tried) = tried {
            let fresh: SmallVec<[usize; 16]> =
                candidates.iter().copied().filter(|i| !tried.contains(&members[*i].tracked.id)).collect();
            if !fresh.is_empty() {
                candidates = fresh;
            }
        }
        // 4. The algorithm, over weights ramped for slow start.
        let weights: SmallVec<[f64; 16]> =
            members.iter().map(|m| f64::from(m.endpoint.weight.max(1)) * m.tracked.ramp(now, balancing.slow_start)).collect();
        // An endpoint not measured yet is assumed a little faster than the fastest one measured
        // (the default RTT when none is), so it is tried soon and learnt, rather than starved
        // behind endpoints that happened to answer first.
        let unmeasured = std::cell::OnceCell::new();
        let ewma_cost = |i: usize| {
            let tracked = &members[i].tracked;
            if tracked.measured() {
                return tracked.cost(now, balancing.decay);
            }
            let baseline = *unmeasured.get_or_init(|| {
                members
                    .iter()
                    .filter(|m| m.tracked.measured())
                    .map(|m| m.tracked.latency(now, balancing.decay))
                    .fold(None, |min: Option<f64>, l| Some(min.map_or(l, |m| m.min(l))))
                    .unwrap_or(balancing.default_rtt.as_secs_f64())
            });
            0.9 * baseline * (tracked.in_flight() + 1) as f64
        };
        let fallback = candidates.first().copied();
        let mut picked = None;
        let mut claimed = false;
        for _ in 0..3 {
            let index = match balancing.algorithm {
                Algorithm::P2cEwma => pick::two_choices(&candidates, &weights, ewma_cost),
                Algorithm::LeastRequest => pick::two_choices(&candidates, &weights, |i| members[i].tracked.in_flight() as f64),
                Algorithm::RoundRobin => known.round_robin.pick(&candidates, &weights),
                Algorithm::RingHash => {
                    let key = hash_key(request, balancing.hash_header.as_ref());
                    match (&known.ring, key) {
                        (Some(ring), Some(key)) => ring.pick(key, |i| candidates.contains(&i)),
                        _ => pick::weighted(&candidates, &weights, None),
                    }
                }
            };
            let Some(index) = index else { break };
            // An endpoint whose ejection ran out takes a single probe request at a time.
            if availability[index] == Availability::Probe && !panic {
                if !members[index].tracked.claim_probe() {
                    candidates.retain(|c| *c != index);
                    if candidates.is_empty() {
                        break;
                    }
                    continue;
                }
                claimed = true;
            }
            picked = Some(index);
            break;
        }
        // Probes lost to other requests: send it anyway, as in panic mode, not as a probe.
        let Some(index) = picked.or_else(|| candidates.first().copied()).or(fallback) else {
            return Err(Box::new(NoEndpoints { service: self.service.clone(), subset: self.subset.clone(), total: known.total }));
        };
        let member = &members[index];
        if let Some(tried) = tried {
            tried.record(member.tracked.id.clone());
        }
        Ok(Some(Choice {
            service: member.service.clone(),
            tracked: member.tracked.clone(),
            probe: claimed,
            panic,
            decay: balancing.decay,
            routable: members.len(),
        }))
    }
}

/// The ring-hash key of a request: its hash header, else the client's address.
fn hash_key<B>(request: &Request<B>, header: Option<&http::HeaderName>) -> Option<u64> {
    if let Some(value) = header.and_then(|h| request.headers().get(h)) {
        return Some(pick::hash(&[value.as_bytes()]));
    }
    request.extensions().get::<ClientAddr>().map(|addr| match addr.0.ip() {
        std::net::IpAddr::V4(ip) => pick::hash(&[&ip.octets()]),
        std::net::IpAddr::V6(ip) => pick::hash(&[&ip.octets()]),
    })
}

/// The endpoint picked for one request.
struct Choice<S> {
    service: S,
    tracked: Arc<Tracked>,
    probe: bool,
    panic: bool,
    decay: Duration,
    routable: usize,
}

/// A failed request of a service in panic mode.
#[derive(Debug, thiserror::Error)]
#[error("{backend} is in panic mode, every one of its {routable} endpoints ejected: {source}")]
pub struct PanicMode {
    pub backend: Arc<str>,
    pub routable: usize,
    #[source]
    pub source: BoxError,
}

impl<S, B> Service<Request<B>> for Balance<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Endpoint services hold pools and are always ready; readiness is decided per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        async move {
            // (The request is borrowed only between awaits: its body is not `Sync`.)
            let first = shared.pick(&request)?;
            let choice = match first {
                Some(choice) => choice,
                None => {
                    shared.wait_for_config().await?;
                    let picked = shared.pick(&request)?;
                    picked.ok_or_else(|| -> BoxError {
                        Box::new(DiscoveryTimeout { service: shared.service.clone(), timeout: shared.config.discovery_timeout })
                    })?
                }
            };
            let Choice { service, tracked, probe, panic, decay, routable } = choice;
            let mut exchange = Exchange::start(tracked, shared.outliers.clone(), probe, decay);
            // Endpoint services are always ready (see `Balance::poll_ready`).
            let result = service.oneshot(request).await.map_err(Into::into);
            match result {
                Ok(response) => {
                    exchange.answered();
                    let known = outcome::of_head(response.status(), response.headers());
                    if known.is_some() {
                        // The head decides: a probe need not wait for a long body to end.
                        exchange.settle_probe(known);
                    }
                    let (mut parts, body) = response.into_parts();
                    if panic && known == Some(Outcome::Failure) && !parts.headers.contains_key(FERRY_ERROR) {
                        let sentence =
                            format!("panic_mode: every endpoint of {} is ejected; sent to one anyway", shared.outliers.label);
                        if let Ok(value) = HeaderValue::from_str(&sentence) {
                            parts.headers.insert(FERRY_ERROR, value);
                        }
                    }
                    Ok(Response::from_parts(parts, boxed(Observed::new(body, known, exchange))))
                }
                Err(error) => {
                    exchange.decide(Some(Outcome::Failure));
                    if panic {
                        return Err(
                            Box::new(PanicMode { backend: shared.outliers.label.clone(), routable, source: error }) as BoxError
                        );
                    }
                    Err(error)
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::atomic::AtomicUsize};

    use ferry_health::Health;
    use ferry_proto::v1;

    use tower::Layer;

    use super::*;
    use crate::{
        catalog::ServiceConfig,
        outbound::endpoint::{PerTry, PerTryLayer, PerTryTimeout},
    };

    /// How each fake endpoint answers: a status after a delay.
    #[derive(Clone, Default)]
    struct Behaviour(Arc<Mutex<HashMap<String, (u16, Duration)>>>);

    impl Behaviour {
        fn set(&self, id: &str, status: u16, delay: Duration) {
            self.0.lock().expect("not poisoned").insert(id.to_owned(), (status, delay));
        }
    }

    /// A fake endpoint service: answers as its behaviour says, naming itself in `x-endpoint`.
    #[derive(Clone)]
    struct Fake {
        id: String,
        behaviour: Behaviour,
        hits: Arc<Mutex<HashMap<String, usize>>>,
    }

    impl Service<Request<()>> for Fake {
        type Response = Response<Body>;
        type Error = BoxError;
        type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: Request<()>) -> Self::Future {
            *self.hits.lock().expect("not poisoned").entry(self.id.clone()).or_default() += 1;
            let (status, delay) =
                self.behaviour.0.lock().expect("not poisoned").get(&self.id).copied().unwrap_or((200, Duration::ZERO));
            let id = self.id.clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut response = Response::new(crate::http::empty());
                *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
                response.headers_mut().insert("x-endpoint", HeaderValue::from_str(&id).expect("id"));
                Ok(response)
            }
            .boxed()
        }
    }

    struct Setup {
        state: watch::Sender<ServiceState>,
        balance: Balance<PerTry<Fake>>,
        behaviour: Behaviour,
        hits: Arc<Mutex<HashMap<String, usize>>>,
        metrics: BalanceMetrics,
    }

    fn endpoint(i: usize, id: &str, health: Health, zone: &str, weight: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            id: id.to_string(),
            address: "127.0.0.1".into(),
            port: 8000 + i as u16,
            health,
            metadata: BTreeMap::new(),
            region: String::new(),
            zone: zone.into(),
            weight,
            identity: None,
        })
    }

    fn config(version: u64, endpoints: &[(&str, Health)], policy: Option<&str>) -> ServiceState {
        let endpoints: Vec<_> = endpoints.iter().enumerate().map(|(i, (id, health))| endpoint(i, id, *health, "", 100)).collect();
        config_of(version, endpoints, policy)
    }

    fn config_of(version: u64, endpoints: Vec<Arc<Endpoint>>, policy: Option<&str>) -> ServiceState {
        let policy = policy.map(|yaml| {
            let text = format!("kind: ServicePolicy\nservice: catalog\n{yaml}\n");
            match ferry_proto::json::resources_from_yaml(&text).expect("valid").remove(0).kind {
                Some(v1::resource::Kind::Policy(policy)) => Arc::new(policy),
                other => panic!("not a policy: {other:?}"),
            }
        });
        ServiceState::Known(Arc::new(ServiceConfig {
            name: "catalog".into(),
            version,
            exists: !endpoints.is_empty(),
            endpoints: endpoints.into_iter().map(|e| (e.id.clone(), e)).collect(),
            route: None,
            policy,
            virtual_ip: None,
        }))
    }

    fn setup_in_zone(state: ServiceState, zone: Option<&str>) -> Setup {
        let state = watch::Sender::new(state);
        let behaviour = Behaviour::default();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let metrics = BalanceMetrics::default();
        let balance = Balance::new(
            "catalog".into(),
            None,
            state.subscribe(),
            {
                let (behaviour, hits) = (behaviour.clone(), hits.clone());
                move |target: Target| {
                    PerTryLayer.layer(Fake { id: target.endpoint.id.clone(), behaviour: behaviour.clone(), hits: hits.clone() })
                }
            },
            BalanceConfig {
                discovery_timeout: Duration::from_secs(5),
                zone: zone.map(Arc::from),
                metrics: metrics.clone(),
                runtime: tokio::runtime::Handle::current(),
            },
        );
        Setup { state, balance, behaviour, hits, metrics }
    }

    fn setup(state: ServiceState) -> Setup {
        setup_in_zone(state, None)
    }

    impl Setup {
        /// Sends one request (its body read to the end); the endpoint that answered and the status.
        async fn send(&mut self, request: Request<()>) -> Result<(String, u16), BoxError> {
            let response = self.balance.ready().await?.call(request).await?;
            let id = response.headers().get("x-endpoint").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
            let status = response.status().as_u16();
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            Ok((id, status))
        }

        async fn get(&mut self) -> Result<String, BoxError> {
            self.send(Request::new(())).await.map(|(id, _)| id)
        }

        /// Requests, one after another; how many each endpoint answered.
        async fn spread(&mut self, requests: usize) -> HashMap<String, usize> {
            let mut counts = HashMap::new();
            for _ in 0..requests {
                *counts.entry(self.get().await.expect("answers")).or_default() += 1;
            }
            counts
        }

        fn hits(&self, id: &str) -> usize {
            self.hits.lock().expect("not poisoned").get(id).copied().unwrap_or(0)
        }
    }

    const PASSING: Health = Health::Passing;

    #[tokio::test(start_paused = true)]
    async fn round_robin_rotates_over_passing_endpoints_only() {
        let mut setup = setup(config(
            1,
            &[("a", PASSING), ("b", Health::Critical), ("c", Health::Warning)],
            Some("load_balancer: round-robin"),
        ));
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(setup.get().await.expect("answers"));
        }
        assert_eq!(seen.iter().filter(|e| *e == "a").count(), 2, "{seen:?}");
        assert_eq!(seen.iter().filter(|e| *e == "c").count(), 2, "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_reaches_exactly_one_endpoint_service() {
        // Mock endpoint services: each request must arrive, unchanged, at the endpoint picked.
        let (mock_a, mut handle_a) = tower_test::mock::pair::<Request<&'static str>, Response<Body>>();
        let (mock_b, mut handle_b) = tower_test::mock::pair::<Request<&'static str>, Response<Body>>();
        let mocks = std::sync::Mutex::new(HashMap::from([("a".to_owned(), mock_a), ("b".to_owned(), mock_b)]));
        let state = watch::Sender::new(config(1, &[("a", PASSING), ("b", PASSING)], Some("load_balancer: round-robin")));
        let mut balance = Balance::new(
            "catalog".into(),
            None,
            state.subscribe(),
            move |t: Target| {
                mocks.lock().expect("not poisoned").remove(&t.endpoint.id).expect("one endpoint service per endpoint")
            },
            BalanceConfig {
                discovery_timeout: Duration::from_secs(5),
                zone: None,
                metrics: BalanceMetrics::default(),
                runtime: tokio::runtime::Handle::current(),
            },
        );
        let first = tokio::spawn(balance.ready().await.expect("ready").call(Request::new("first")));
        let second = tokio::spawn(balance.ready().await.expect("ready").call(Request::new("second")));
        let (request, respond) = handle_a.next_request().await.expect("a gets the first request");
        assert_eq!(*request.body(), "first");
        respond.send_response(Response::new(crate::http::empty()));
        assert!(first.await.expect("joins").is_ok());
        let (request, respond) = handle_b.next_request().await.expect("b gets the second request");
        assert_eq!(*request.body(), "second");
        respond.send_response(Response::new(crate::http::empty()));
        assert!(second.await.expect("joins").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn follows_endpoint_changes() {
        let mut setup = setup(config(1, &[("a", PASSING)], None));
        assert_eq!(setup.get().await.expect("answers"), "a");
        setup.state.send_replace(config(2, &[("a", Health::Critical), ("b", PASSING)], None));
        tokio::task::yield_now().await;
        for _ in 0..3 {
            assert_eq!(setup.get().await.expect("answers"), "b");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn explains_why_nothing_can_be_picked() {
        let mut setup = setup(config(1, &[("a", Health::Critical), ("b", Health::Draining)], None));
        let error = setup.get().await.expect_err("none passing");
        assert_eq!(error.to_string(), "catalog has 0 of 2 passing");
        setup.state.send_replace(config(2, &[], None));
        tokio::task::yield_now().await;
        let error = setup.get().await.expect_err("unknown");
        assert!(error.is::<UnknownService>(), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_before_the_first_config_waits_for_it_within_the_bound() {
        let setup = setup(ServiceState::Pending);
        let state = setup.state.clone();
        let waiting = tokio::spawn(async move {
            let mut setup = setup;
            setup.get().await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        state.send_replace(config(1, &[("a", PASSING)], None));
        assert_eq!(waiting.await.expect("joins").expect("answers"), "a");

        let mut starved = self::setup(ServiceState::Pending);
        let error = starved.get().await.expect_err("times out");
        assert!(error.is::<DiscoveryTimeout>(), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_sends_little_to_a_slow_endpoint() {
        let setup = setup(config(1, &[("a", PASSING), ("b", PASSING), ("slow", PASSING)], None));
        for id in ["a", "b"] {
            setup.behaviour.set(id, 200, Duration::from_millis(5));
        }
        setup.behaviour.set("slow", 200, Duration::from_millis(200));
        // Eight callers at once, as under load.
        let mut callers = Vec::new();
        for _ in 0..8 {
            let mut balance = setup.balance.clone();
            callers.push(tokio::spawn(async move {
                for _ in 0..100 {
                    let response = balance.ready().await.expect("ready").call(Request::new(())).await.expect("answers");
                    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                }
            }));
        }
        for caller in callers {
            caller.await.expect("joins");
        }
        let slow = setup.hits("slow");
        assert!(slow * 100 < 800 * 10, "the slow endpoint got {slow} of 800");
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_ewma_tries_every_endpoint_early_at_light_load() {
        let mut setup = setup(config(1, &[("a", PASSING), ("b", PASSING), ("c", PASSING)], None));
        for id in ["a", "b", "c"] {
            setup.behaviour.set(id, 200, Duration::from_millis(5));
        }
        // One request at a time: an endpoint not measured yet is not starved behind the first
        // to answer (whose 5 ms beat the 30 ms assumed of the unknown).
        let counts = setup.spread(12).await;
        assert_eq!(counts.len(), 3, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn least_request_avoids_the_busy_endpoint() {
        let setup = setup(config(1, &[("a", PASSING), ("b", PASSING)], Some("load_balancer: least-request")));
        setup.behaviour.set("a", 200, Duration::from_secs(3600));
        setup.behaviour.set("b", 200, Duration::from_secs(3600));
        // Ten requests held: they spread evenly, as each goes where fewer are in flight.
        let mut held = Vec::new();
        for _ in 0..10 {
            let mut balance = setup.balance.clone();
            held.push(tokio::spawn(async move { balance.ready().await.expect("ready").call(Request::new(())).await }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!((setup.hits("a"), setup.hits("b")), (5, 5));
        for task in held {
            task.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn weights_set_the_shares() {
        let endpoints = vec![endpoint(0, "light", PASSING, "", 100), endpoint(1, "heavy", PASSING, "", 300)];
        for policy in ["load_balancer: round-robin", "load_balancer: p2c-ewma", "load_balancer: least-request"] {
            let mut setup = setup(config_of(1, endpoints.clone(), Some(policy)));
            let counts = setup.spread(2000).await;
            let heavy = counts.get("heavy").copied().unwrap_or(0);
            assert!((1300..=1700).contains(&heavy), "{policy}: {counts:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ring_hash_keys_stick_and_move_only_when_their_endpoint_leaves() {
        let policy = Some("load_balancer: ring-hash\nhash_header: x-user");
        let ids = ["a", "b", "c", "d"];
        let all: Vec<_> = ids.iter().map(|id| (*id, PASSING)).collect();
        let mut setup = setup(config(1, &all, policy));
        let request = |user: usize| Request::builder().header("x-user", format!("user-{user}")).body(()).expect("request");
        let mut owner = Vec::new();
        for user in 0..200 {
            let first = setup.send(request(user)).await.expect("answers").0;
            for _ in 0..3 {
                assert_eq!(setup.send(request(user)).await.expect("answers").0, first, "user-{user} sticks");
            }
            owner.push(first);
        }
        assert!(ids.iter().all(|id| owner.iter().any(|o| o == id)), "every endpoint owns keys");
        // "b" leaves: only its keys move.
        setup.state.send_replace(config(2, &[("a", PASSING), ("b", Health::Critical), ("c", PASSING), ("d", PASSING)], policy));
        tokio::task::yield_now().await;
        for (user, before) in owner.iter().enumerate() {
            let now = setup.send(request(user)).await.expect("answers").0;
            if before == "b" {
                assert_ne!(now, "b");
            } else {
                assert_eq!(&now, before, "user-{user} stays");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ring_hash_falls_back_to_the_client_address() {
        let mut setup = setup(config(1, &[("a", PASSING), ("b", PASSING), ("c", PASSING)], Some("load_balancer: ring-hash")));
        for client in 1..20u8 {
            let request = || {
                let mut request = Request::new(());
                request.extensions_mut().insert(ClientAddr(([127, 0, 0, client], 40000 + u16::from(client)).into()));
                request
            };
            let first = setup.send(request()).await.expect("answers").0;
            assert_eq!(setup.send(request()).await.expect("answers").0, first);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn locality_prefers_the_callers_zone_and_spills_over() {
        let endpoints = |b_health| {
            vec![
                endpoint(0, "a1", PASSING, "zone-a", 100),
                endpoint(1, "a2", b_health, "zone-a", 100),
                endpoint(2, "b1", PASSING, "zone-b", 100),
                endpoint(3, "b2", PASSING, "zone-b", 100),
            ]
        };
        let mut setup = setup_in_zone(config_of(1, endpoints(PASSING), None), Some("zone-a"));
        let counts = setup.spread(200).await;
        assert!(counts.keys().all(|id| id.starts_with('a')), "{counts:?}");
        // Half of zone-a down: under the 70% bar, so every zone takes traffic.
        setup.state.send_replace(config_of(2, endpoints(Health::Critical), None));
        tokio::task::yield_now().await;
        let counts = setup.spread(300).await;
        assert!(counts.keys().any(|id| id.starts_with('b')), "{counts:?}");
        assert!(!counts.contains_key("a2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_ramps_up_during_slow_start() {
        let policy = Some("load_balancer: round-robin\nslow_start: 10s");
        let mut setup = setup(config(1, &[("a", PASSING), ("b", PASSING)], policy));
        setup.get().await.expect("answers");
        setup.state.send_replace(config(2, &[("a", PASSING), ("b", PASSING), ("new", PASSING)], policy));
        tokio::task::yield_now().await;
        let mut shares = Vec::new();
        for _ in 0..4 {
            let counts = setup.spread(300).await;
            shares.push(counts.get("new").copied().unwrap_or(0));
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        // From about 10% of its fair share to all of it: 300 / 3 = 100 at the end.
        assert!(shares[0] < 30, "{shares:?}");
        assert!(shares.windows(2).all(|w| w[0] <= w[1]), "the share only grows: {shares:?}");
        assert!((90..=110).contains(&shares[3]), "{shares:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ejected_then_probed_back() {
        let mut setup = setup(config(1, &[("a", PASSING), ("b", PASSING), ("bad", PASSING)], Some("load_balancer: round-robin")));
        setup.behaviour.set("bad", 503, Duration::ZERO);
        let counts = setup.spread(30).await;
        assert_eq!(setup.hits("bad"), 5, "ejected after 5 consecutive failures: {counts:?}");
        let counts = setup.spread(30).await;
        assert!(!counts.contains_key("bad"), "{counts:?}");
        // The ejection (30 s) runs out; one probe fails: ejected again, for 60 s.
        tokio::time::sleep(Duration::from_secs(31)).await;
        setup.spread(30).await;
        assert_eq!(setup.hits("bad"), 6, "one probe");
        tokio::time::sleep(Duration::from_secs(31)).await;
        setup.spread(30).await;
        assert_eq!(setup.hits("bad"), 6, "still ejected: base x 2");
        // Healed; the next probe succeeds and it takes its share again.
        setup.behaviour.set("bad", 200, Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let counts = setup.spread(30).await;
        assert!(counts.get("bad").copied().unwrap_or(0) >= 9, "{counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_stop_at_the_limit_and_one_endpoint_always_stays() {
        let mut setup = setup(config(1, &[("a", PASSING), ("b", PASSING)], Some("load_balancer: round-robin")));
        setup.behaviour.set("a", 503, Duration::ZERO);
        setup.behaviour.set("b", 503, Duration::ZERO);
        setup.spread(40).await;
        let ejected = setup.metrics.ejections(&Arc::from("catalog"));
        assert_eq!(ejected, 1, "50% of 2: one ejected, and the last one stays");
        // 3 endpoints at 50%: one (33%) but not two (67%).
        let mut setup = self::setup(config(
            1,
            &[("a", PASSING), ("b", PASSING), ("c", PASSING)],
            Some("load_balancer: round-robin\noutlier_detection: { max_ejection_percent: 50 }"),
        ));
        for id in ["a", "b", "c"] {
            setup.behaviour.set(id, 503, Duration::ZERO);
        }
        setup.spread(60).await;
        assert_eq!(setup.metrics.ejections(&Arc::from("catalog")), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_endpoint_ejected_requests_go_to_all_of_them() {
        let mut setup = setup(config(1, &[("a", PASSING), ("b", PASSING)], Some("load_balancer: round-robin")));
        setup.behaviour.set("a", 503, Duration::ZERO);
        setup.spread(20).await;
        assert!(setup.hits("a") == 5, "a ejected");
        // b, the one left, fails its health checks: only the ejected a is routable.
        setup.state.send_replace(config(2, &[("a", PASSING), ("b", Health::Critical)], Some("load_balancer: round-robin")));
        tokio::task::yield_now().await;
        let (id, status) = setup.send(Request::new(())).await.expect("sent anyway");
        assert_eq!((id.as_str(), status), ("a", 503));
        assert_eq!(setup.metrics.panic_requests(&Arc::from("catalog")), 1);
        let response = setup.balance.ready().await.expect("ready").call(Request::new(())).await.expect("answers");
        let error = response.headers().get(FERRY_ERROR).and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(error.starts_with("panic_mode:"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_unavailable_in_trailers_counts_as_a_failure() {
        /// Answers gRPC calls, with UNAVAILABLE in the trailers when `failing`.
        #[derive(Clone)]
        struct Grpc {
            failing: bool,
            calls: Arc<AtomicUsize>,
        }
        impl Service<Request<()>> for Grpc {
            type Response = Response<Body>;
            type Error = BoxError;
            type Future = futures::future::Ready<Result<Response<Body>, BoxError>>;
            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _request: Request<()>) -> Self::Future {
                if self.failing {
                    self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static(if self.failing { "14" } else { "0" }));
                let frames: Vec<Result<http_body::Frame<bytes::Bytes>, BoxError>> = vec![
                    Ok(http_body::Frame::data(bytes::Bytes::from_static(b"\0\0\0\0\0"))),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                let mut response = Response::new(boxed(http_body_util::StreamBody::new(futures::stream::iter(frames))));
                response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                futures::future::ready(Ok(response))
            }
        }
        let failed_calls = Arc::new(AtomicUsize::new(0));
        let state = watch::Sender::new(config(1, &[("a", PASSING), ("bad", PASSING)], Some("load_balancer: round-robin")));
        let metrics = BalanceMetrics::default();
        let mut balance = Balance::new(
            "catalog".into(),
            None,
            state.subscribe(),
            {
                let calls = failed_calls.clone();
                move |t: Target| Grpc { failing: t.endpoint.id == "bad", calls: calls.clone() }
            },
            BalanceConfig {
                discovery_timeout: Duration::from_secs(5),
                zone: None,
                metrics: metrics.clone(),
                runtime: tokio::runtime::Handle::current(),
            },
        );
        for _ in 0..30 {
            let response = balance.ready().await.expect("ready").call(Request::new(())).await.expect("answers");
            assert_eq!(response.status(), http::StatusCode::OK, "gRPC failures are in the trailers");
            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
        }
        assert_eq!(failed_calls.load(std::sync::atomic::Ordering::SeqCst), 5, "ejected after 5 UNAVAILABLE trailers");
        assert_eq!(metrics.ejections(&Arc::from("catalog")), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_that_times_out_is_ejected_and_failing_fast_does_not_attract_traffic() {
        let mut setup =
            setup(config(1, &[("a", PASSING), ("b", PASSING), ("hung", PASSING)], Some("load_balancer: round-robin")));
        setup.behaviour.set("hung", 200, Duration::from_secs(3600));
        for _ in 0..30 {
            let mut request = Request::new(());
            request.extensions_mut().insert(PerTryTimeout(Duration::from_millis(100)));
            let _ = setup.send(request).await;
        }
        assert_eq!(setup.hits("hung"), 5, "ejected after 5 attempts timed out");
        assert_eq!(setup.metrics.ejections(&Arc::from("catalog")), 1);

        // Under P2C, an endpoint answering 503 at once looks slow, not fast.
        let mut setup = self::setup(config(
            1,
            &[("a", PASSING), ("b", PASSING), ("bad", PASSING)],
            Some("outlier_detection: { disabled: true }"),
        ));
        for id in ["a", "b"] {
            setup.behaviour.set(id, 200, Duration::from_millis(5));
        }
        setup.behaviour.set("bad", 503, Duration::ZERO);
        setup.spread(300).await;
        assert!(setup.hits("bad") < 60, "the fast-failing endpoint got {} of 300", setup.hits("bad"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_to_an_endpoint_not_yet_tried() {
        let mut setup = setup(config(1, &[("a", PASSING), ("b", PASSING), ("c", PASSING)], None));
        for _ in 0..20 {
            let tried = Tried::default();
            let mut seen = Vec::new();
            for _ in 0..3 {
                let mut request = Request::new(());
                request.extensions_mut().insert(tried.clone());
                seen.push(setup.send(request).await.expect("answers").0);
            }
            seen.sort();
            assert_eq!(seen, ["a", "b", "c"]);
            assert_eq!(tried.endpoints().len(), 3);
        }
    }
}
