//! Routing within one destination service: the service's route table decides, per request,
//! which rule applies, and the rule decides where the request goes (weighted backends: subsets
//! of the service or other services), how long it may take (a deadline over every attempt), when
//! it is retried, how its headers and path change, which faults are injected, and what is
//! mirrored. With no route, or no matching rule, requests go to all of the service's endpoints.
//!
//! A new route takes effect only once everything it references is known: the other services it
//! sends to, the subsets it names, and an instance up in each subset it sends requests to (but
//! on a gateway, which has nothing to fall back on). Until then the previous route stays in
//! force (or none), so applying a route before its policy, before its backend's first config, or
//! before the first v2 instance is up does not become a burst of 503s. The control plane sends a
//! route and the services it references in one push, so the wait is normally nil. Once in force,
//! a route stays in force until a newer one is.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header, request::Parts};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::{
    sync::{Semaphore, watch},
    time::Instant,
};
use tower::Service;

use super::{
    Balance, EndpointService, OutboundConfig,
    guard::{Guard, Guards},
    limit,
    retry::{self, Backoff, Prepared},
    route::{BackendRef, RequestInfo, Retries, RouteTable, Rule},
};
use crate::{
    catalog::{Catalog, Endpoint, ServiceState},
    errors::{DiscoveryTimeout, FERRY_ERROR, NoRoute, ResponseTimeout, is_grpc},
    http::{Body, BoxError, full},
    metrics::RouteLabel,
};

pub use super::retry::MAX_REPLAY_BODY;

/// The latest time a request may be answered by, set by the outbound edge (its
/// `--response-timeout`) in the request's extensions. A route's own timeout may come sooner.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);
/// Mirrored requests in flight at once, per destination; past that, copies are skipped.
const MAX_MIRRORS: usize = 64;

/// Routes the requests for one service. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    service: Arc<str>,
    /// A gateway's own route: no matching rule means no route, not the service's endpoints
    /// (a gateway has none).
    gateway: bool,
    catalog: Arc<Catalog>,
    config: OutboundConfig,
    state: watch::Receiver<ServiceState>,
    /// The route in force.
    table: ArcSwapOption<RouteTable>,
    /// Why a newer route is not in force yet, if one is held.
    held: Mutex<Option<String>>,
    /// Set once the route has been evaluated against the service's first config: until then a
    /// request waits, rather than going out as if there were no route.
    settled: watch::Sender<bool>,
    balancers: Mutex<HashMap<BackendRef, Backend>>,
    /// The balancer of the whole service, which requests no rule covers go to: kept apart so
    /// that they need no lock.
    own: std::sync::OnceLock<Backend>,
    guards: Arc<Guards>,
    /// The retry policy of requests no rule with `retries` covers.
    default_retries: Retries,
    /// The route label of requests no rule covers.
    default_label: Arc<str>,
    backoff: Backoff,
    mirrors: Arc<Semaphore>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.task.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// Where one backend's requests go: its balancer, and the guard and state of its service.
#[derive(Clone)]
struct Backend {
    balance: Balance<EndpointService>,
    guard: Arc<Guard>,
    state: watch::Receiver<ServiceState>,
}

impl Backend {
    /// Sends one attempt within the service's circuit breaker, following its policy first.
    fn send(&self, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, BoxError>> {
        self.guard.follow(&self.state);
        limit::send(self.guard.limit.clone(), self.balance.clone(), request)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// A router for `service`, following its state (and that of the services its route uses).
    pub fn new(
        service: Arc<str>,
        catalog: Arc<Catalog>,
        state: watch::Receiver<ServiceState>,
        config: OutboundConfig,
        guards: Arc<Guards>,
    ) -> Self {
        let gateway = config.gateway.as_ref() == Some(&service);
        let inner = Arc::new(Inner {
            service,
            gateway,
            catalog,
            config,
            state: state.clone(),
            table: ArcSwapOption::empty(),
            held: Mutex::new(None),
            settled: watch::Sender::new(false),
            balancers: Mutex::new(HashMap::new()),
            own: std::sync::OnceLock::new(),
            guards,
            default_retries: retry::mesh_default(),
            default_label: Arc::from("default"),
            backoff: Backoff::default(),
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS)),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(follow(Arc::downgrade(&inner), state));
        *lock(&inner.task) = Some(task.abort_handle());
        Self { inner }
    }

    /// Routes one request.
    pub fn route(&self, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, BoxError>> {
        let inner = self.inner.clone();
        async move {
            if !*inner.settled.borrow() {
                let limit = inner.config.discovery_timeout;
                let mut settled = inner.settled.subscribe();
                if !matches!(tokio::time::timeout(limit, settled.wait_for(|s| *s)).await, Ok(Ok(_))) {
                    return Err(Box::new(DiscoveryTimeout { service: inner.service.clone(), timeout: limit }) as BoxError);
                }
            }
            let table = inner.table.load_full();
            let info = RequestInfo::of(request.method(), request.uri(), request.headers());
            let rule = table.as_ref().and_then(|t| t.find(&info).map(|r| r.index));
            match (table, rule) {
                (Some(table), Some(index)) => inner.apply(Some(&table.rules[index]), request).await,
                (Some(_), None) if inner.gateway => Err(Box::new(NoRoute::NoRule {
                    gateway: inner.service.clone(),
                    host: info.host.unwrap_or_default().to_owned(),
                    path: info.path.to_owned(),
                }) as BoxError),
                (None, _) if inner.gateway => {
                    Err(Box::new(NoRoute::NoTable { gateway: inner.service.clone(), why: inner.why_no_route() }) as BoxError)
                }
                _ => inner.apply(None, request).await,
            }
        }
        .boxed()
    }

    /// The version of the route in force, if any, and why a newer one is held, if one is.
    pub fn route_status(&self) -> (Option<u64>, Option<String>) {
        (self.inner.table.load().as_ref().map(|t| t.version), lock(&self.inner.held).clone())
    }

    /// What each of its balancers holds: algorithm, endpoints with their load and ejections.
    pub fn balancers(&self) -> Value {
        let balancers = lock(&self.inner.balancers);
        let map: serde_json::Map<String, Value> =
            balancers.iter().map(|(backend, b)| (backend.to_string(), b.balance.describe())).collect();
        Value::Object(map)
    }

    /// Why no route is in force, or `None` when one is.
    pub fn without_route(&self) -> Option<String> {
        self.inner.table.load().is_none().then(|| self.inner.why_no_route())
    }

    /// Waits, up to `limit`, for the control plane's first word on the service and the route
    /// it carries to be evaluated.
    pub async fn known(&self, limit: Duration) -> bool {
        let mut settled = self.inner.settled.subscribe();
        matches!(tokio::time::timeout(limit, settled.wait_for(|s| *s)).await, Ok(Ok(_)))
    }

    /// What would happen to a request: the rule, backends, timeout and retries, from the route
    /// in force.
    pub fn explain(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Value {
        let inner = &self.inner;
        let table = inner.table.load_full();
        let held = lock(&inner.held).clone();
        let info = RequestInfo::of(method, uri, headers);
        let rule = table.as_ref().and_then(|t| t.find(&info));
        let default_backend =
            [super::route::WeightedBackend { backend: BackendRef { service: inner.service.clone(), subset: None }, weight: 1 }];
        let backends = match rule {
            Some(rule) => &rule.backends[..],
            None if inner.gateway => &[],
            None => &default_backend[..],
        };
        let retries = match rule {
            Some(rule) => Some(rule.retries.as_ref().unwrap_or(&inner.default_retries)),
            None if inner.gateway => None,
            None => Some(&inner.default_retries),
        };
        let own = inner.guards.get(&inner.service);
        own.follow(&inner.state);
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        let backends: Vec<Value> = backends
            .iter()
            .map(|b| {
                let built = inner.balancer(&b.backend).ok();
                json!({
                    "backend": b.backend.to_string(),
                    "service": &*b.backend.service,
                    "subset": b.backend.subset.as_deref(),
                    "weight": b.weight,
                    "share_percent": if total == 0 { 0.0 } else { f64::from(b.weight) * 100.0 / f64::from(total) },
                    "routable_endpoints": built.as_ref().and_then(|built| built.balance.routable()),
                    "circuit_breaker": built.map(|built| {
                        built.guard.follow(&built.state);
                        breaker(&built.guard)
                    }),
                })
            })
            .collect();
        json!({
            "service": &*inner.service,
            "route_version": table.as_ref().map(|t| t.version),
            "held_route": held,
            "rule": rule.map(|r| json!({ "index": r.index, "name": r.name, "label": &**r.label() })),
            "backends": backends,
            "timeout": rule.and_then(|r| r.timeout).map(|t| humantime::format_duration(t).to_string()),
            "retries": retries.map(|r| json!({
                "attempts": r.attempts,
                "per_try_timeout": r.per_try_timeout.map(|t| humantime::format_duration(t).to_string()),
                "on": r.describe(),
                "default": rule.is_none_or(|r| r.retries.is_none()),
            })),
            "retry_budget": json!({
                "ratio": own.budget.settings().ratio,
                "min_per_second": own.budget.settings().min_per_second,
                "window": humantime::format_duration(own.budget.settings().window).to_string(),
                "requests_in_window": own.budget.counts().0,
                "retries_in_window": own.budget.counts().1,
            }),
            "circuit_breaker": breaker(&own),
            "fault": rule.map(|r| json!({
                "delay": r.delay.map(|(p, d)| json!({ "percent": p, "duration": humantime::format_duration(d).to_string() })),
                "abort": r.abort.map(|(p, s)| json!({ "percent": p, "status": s })),
            })),
            "mirror": rule.and_then(|r| r.mirror.as_ref()).map(|(b, p)| json!({ "backend": b.to_string(), "percent": p })),
            "rewrite_path_prefix": rule.and_then(|r| r.rewrite_prefix.as_ref()).map(|(from, to)| json!({ "from": from, "to": to })),
            "no_rule_matches": rule.is_none(),
            "service_exists": match &*inner.state.borrow() {
                ServiceState::Known(config) => Some(config.exists),
                ServiceState::Pending => None,
            },
            "gateway": inner.gateway,
            "host": info.host,
        })
    }
}

/// A circuit breaker's limits and its current use, for `/explain`.
fn breaker(guard: &Guard) -> Value {
    let limits = guard.limit.limits();
    json!({
        "service": &*guard.service,
        "max_concurrent": limits.max_concurrent,
        "max_pending": limits.max_pending,
        "in_flight": guard.limit.in_flight(),
        "pending": guard.limit.pending(),
    })
}

/// Re-evaluates the route whenever the service, or a service its route uses, changes.
async fn follow(inner: Weak<Inner>, mut own: watch::Receiver<ServiceState>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let mut dependencies = strong.refresh();
        if matches!(*strong.state.borrow(), ServiceState::Known(_)) {
            strong.settled.send_if_modified(|settled| !std::mem::replace(settled, true));
        }
        drop(strong);
        let dependency_changed = async {
            if dependencies.is_empty() {
                std::future::pending::<()>().await;
            }
            let changes = dependencies.iter_mut().map(|rx| Box::pin(rx.changed()));
            let _ = futures::future::select_all(changes).await;
        };
        tokio::select! {
            changed = own.changed() => if changed.is_err() { return },
            () = dependency_changed => {}
        }
    }
}

impl Inner {
    /// Why no route is in force (when none is).
    fn why_no_route(&self) -> String {
        match (&*self.state.borrow(), lock(&self.held).clone()) {
            (_, Some(held)) => held,
            (ServiceState::Pending, None) => format!("no config for {} from the control plane yet", self.service),
            (ServiceState::Known(_), None) => format!("no Route for service {} is applied", self.service),
        }
    }

    /// Puts the service's current route in force if everything it references is known, and
    /// returns the watches of the other services it references.
    fn refresh(&self) -> Vec<watch::Receiver<ServiceState>> {
        let ServiceState::Known(config) = self.state.borrow().clone() else { return Vec::new() };
        let Some(route) = &config.route else {
            self.table.store(None);
            *lock(&self.held) = None;
            return Vec::new();
        };
        let table = match RouteTable::compile(&self.service, route, route.version) {
            Ok(table) => table,
            Err(error) => {
                // Validated before it was accepted; a failure here keeps the last good route.
                tracing::warn!(service = %self.service, %error, "cannot compile the route; keeping the last good one");
                return Vec::new();
            }
        };
        let mut watches = Vec::new();
        let mut missing = Vec::new();
        // A service or subset that requests are sent to (mirrors aside: best effort) must have
        // an instance up, or the new route would answer 503 where the last one served. A gateway
        // does not wait: with no route in force it serves nothing at all.
        let sends_to = |reference: &BackendRef| {
            !self.gateway && table.rules.iter().flat_map(|r| &r.backends).any(|b| b.weight > 0 && &b.backend == reference)
        };
        for reference in table.references() {
            let target = if reference.service == self.service {
                Some(config.clone())
            } else {
                match self.catalog.watch(&reference.service) {
                    Ok(watch) => {
                        let state = watch.borrow().clone();
                        watches.push(watch);
                        match state {
                            ServiceState::Known(target) => Some(target),
                            ServiceState::Pending => None,
                        }
                    }
                    Err(_) => None,
                }
            };
            match (&target, &reference.subset) {
                (None, _) => missing.push(format!("no config for service {} yet", reference.service)),
                (Some(target), None) if sends_to(&reference) && !target.endpoints.values().any(|e| e.health.is_routable()) => {
                    missing.push(format!("service {} has no instance up yet", reference.service));
                }
                (Some(target), Some(subset)) => match target.policy.as_ref().and_then(|p| p.subsets.get(&**subset)) {
                    None => missing.push(format!("subset {subset} of {} is not defined by its policy", reference.service)),
                    Some(definition) if sends_to(&reference) => {
                        let in_subset = |e: &Endpoint| definition.labels.iter().all(|(k, v)| e.metadata.get(k) == Some(v));
                        if !target.endpoints.values().any(|e| e.health.is_routable() && in_subset(e)) {
                            missing.push(format!("subset {subset} of {} has no instance up yet", reference.service));
                        }
                    }
                    Some(_) => {}
                },
                _ => {}
            }
        }
        let in_force = self.table.load().as_ref().map(|t| t.version) == Some(table.version);
        if in_force {
            // A route in force stays in force: instances leaving later do not take it back.
            *lock(&self.held) = None;
        } else if missing.is_empty() {
            tracing::info!(service = %self.service, version = table.version, rules = table.rules.len(), "route in force");
            self.table.store(Some(Arc::new(table)));
            *lock(&self.held) = None;
        } else {
            let reason = format!("route version {} waits: {}", table.version, missing.join("; "));
            let mut held = lock(&self.held);
            if held.as_deref() != Some(reason.as_str()) {
                tracing::info!(service = %self.service, %reason, "holding the new route; the last one stays in force");
            }
            *held = Some(reason);
        }
        watches
    }

    /// The balancer of a backend, built on first use, with its service's guard.
    fn balancer(&self, backend: &BackendRef) -> Result<Backend, BoxError> {
        let mut balancers = lock(&self.balancers);
        if let Some(built) = balancers.get(backend) {
            return Ok(built.clone());
        }
        let state = if backend.service == self.service { self.state.clone() } else { self.catalog.watch(&backend.service)? };
        let client = self.config.client.clone();
        let balance = Balance::new(
            backend.service.clone(),
            backend.subset.clone(),
            state.clone(),
            move |target: super::balance::Target| EndpointService::new(&target, client.clone()),
            super::balance::BalanceConfig {
                discovery_timeout: self.config.discovery_timeout,
                zone: self.config.zone.clone(),
                metrics: self.config.balance_metrics.clone(),
            },
        );
        let built = Backend { balance, guard: self.guards.get(&backend.service), state };
        balancers.insert(backend.clone(), built.clone());
        Ok(built)
    }

    /// The balancer of the whole service.
    fn own(&self) -> Result<Backend, BoxError> {
        if let Some(own) = self.own.get() {
            return Ok(own.clone());
        }
        let built = self.balancer(&BackendRef { service: self.service.clone(), subset: None })?;
        Ok(self.own.get_or_init(|| built).clone())
    }

    /// Picks a backend by weight among those with endpoints to take traffic; when none has, the
    /// first, whose balancer then says why.
    fn pick(&self, rule: &Rule) -> Result<Backend, BoxError> {
        let mut candidates = Vec::with_capacity(rule.backends.len());
        for backend in rule.backends.iter().filter(|b| b.weight > 0) {
            let built = self.balancer(&backend.backend)?;
            if built.balance.routable() != Some(0) {
                candidates.push((built, backend.weight));
            }
        }
        let total: u32 = candidates.iter().map(|(_, w)| *w).sum();
        if total == 0 {
            let first = rule.backends.iter().find(|b| b.weight > 0).unwrap_or(&rule.backends[0]);
            return self.balancer(&first.backend);
        }
        let mut roll = rand::random_range(0..total);
        for (built, weight) in candidates {
            if roll < weight {
                return Ok(built);
            }
            roll -= weight;
        }
        Err("no backend could be picked".into())
    }

    /// Applies the matched rule (or, with none, the service's defaults) to a request.
    async fn apply(self: &Arc<Self>, rule: Option<&Rule>, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let label = RouteLabel(rule.map_or_else(|| self.default_label.clone(), |r| r.label().clone()));
        if let Some(rule) = rule
            && let Some((percent, status)) = rule.abort
            && roll(percent)
        {
            let mut response = fault_response(status, rule.label(), is_grpc(request.headers()));
            response.extensions_mut().insert(label);
            return Ok(response);
        }
        let timeout = rule.and_then(|r| r.timeout);
        let edge = request.extensions().get::<Deadline>().map(|d| d.0);
        let deadline = match (edge, timeout.map(|t| Instant::now() + t)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let work = self.attempts(rule, request, deadline);
        let mut response = match timeout {
            Some(timeout) => {
                tokio::time::timeout(timeout, work).await.map_err(|_| -> BoxError { Box::new(ResponseTimeout(timeout)) })??
            }
            None => work.await?,
        };
        if let Some(rule) = rule {
            rule.response_headers.apply(response.headers_mut());
        }
        response.extensions_mut().insert(label);
        Ok(response)
    }

    /// The delay, the request's rewrites, the mirror, and the attempts.
    async fn attempts(
        self: &Arc<Self>,
        rule: Option<&Rule>,
        request: Request<Body>,
        deadline: Option<Instant>,
    ) -> Result<Response<Body>, BoxError> {
        let (mut parts, body) = request.into_parts();
        if let Some(rule) = rule {
            if let Some((percent, delay)) = rule.delay
                && roll(percent)
            {
                tokio::time::sleep(delay).await;
            }
            rule.request_headers.apply(&mut parts.headers);
            if let Some((prefix, replacement)) = &rule.rewrite_prefix {
                rewrite_prefix(&mut parts, prefix, replacement);
            }
        }
        let retries = rule.and_then(|r| r.retries.as_ref()).unwrap_or(&self.default_retries);
        let mirror = rule.and_then(|r| r.mirror.as_ref());
        let retrying = retries.attempts > 1 && retry::incoming_attempt(&parts.headers) <= 1;
        // A body is kept for retries only when one may follow; a mirror needs it whole.
        let body = if retrying || mirror.is_some() {
            Prepared::from(body, &parts.headers, mirror.is_some()).await?
        } else {
            Prepared::Stream(Some(body))
        };
        if let (Some((backend, percent)), Some(bytes)) = (mirror, body.bytes())
            && roll(*percent)
        {
            self.mirror(backend, &parts, bytes);
        }
        let label = rule.map_or(&self.default_label, Rule::label);
        let attempts = retry::Attempts { retries, backoff: self.backoff, deadline, label };
        attempts
            .run(parts, body, |request| {
                let backend = match rule {
                    Some(rule) => self.pick(rule)?,
                    None => self.own()?,
                };
                Ok((backend.guard.clone(), backend.send(request)))
            })
            .await
    }

    /// Sends a copy of the request to `backend`, fire and forget. Copies bypass the circuit
    /// breaker (they are bounded by their own limit, and never delay the caller) and the retry
    /// budget (they are never retried).
    fn mirror(self: &Arc<Self>, backend: &BackendRef, parts: &Parts, body: Bytes) {
        let Ok(permit) = self.mirrors.clone().try_acquire_owned() else { return };
        let Ok(built) = self.balancer(backend) else { return };
        let mut request = Request::from_parts(parts.clone(), full(body));
        request.headers_mut().insert("x-ferry-mirror", HeaderValue::from_static("true"));
        tokio::spawn(async move {
            let copy = async {
                if let Ok(response) = send(built.balance, request).await {
                    // Read and drop, so the connection can be reused.
                    let _ = response.into_body().collect().await;
                }
            };
            // A mirror that never answers must not keep its slot for good.
            let _ = tokio::time::timeout(MIRROR_TIMEOUT, copy).await;
            drop(permit);
        });
    }
}

/// How long a mirrored copy may take, answer and body, before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request through a balancer. Balancers are always ready, and the boxed future keeps
/// the endpoint service's body lifetime concrete inside async blocks.
fn send(mut balance: Balance<EndpointService>, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, BoxError>> {
    balance.call(request)
}

/// True with a `percent` in 100 chance.
fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::random::<f64>() * 100.0 < percent)
}

/// Replaces the matched path prefix.
fn rewrite_prefix(parts: &mut Parts, prefix: &str, replacement: &str) {
    let path = parts.uri.path();
    let Some(rest) = path.strip_prefix(prefix) else { return };
    // `/stock` → `/` on `/stock/42` gives `/42`, not `//42`.
    let rest = if replacement.ends_with('/') { rest.strip_prefix('/').unwrap_or(rest) } else { rest };
    let mut rewritten = format!("{replacement}{rest}");
    if rewritten.is_empty() {
        rewritten.push('/');
    }
    if let Some(query) = parts.uri.query() {
        rewritten.push('?');
        rewritten.push_str(query);
    }
    let mut uri = parts.uri.clone().into_parts();
    if let Ok(path_and_query) = rewritten.parse() {
        uri.path_and_query = Some(path_and_query);
        if let Ok(uri) = Uri::from_parts(uri) {
            parts.uri = uri;
        }
    }
}

/// The answer of an injected abort.
fn fault_response(status: u16, rule: &str, grpc: bool) -> Response<Body> {
    let sentence = format!("fault_abort: injected by route {rule}");
    let mut response = if grpc {
        let code: u8 = match status {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502..=504 => 14,
            _ => 2,
        };
        let mut response = Response::new(crate::http::empty());
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response.headers_mut().insert("grpc-status", HeaderValue::from(u16::from(code)));
        if let Ok(message) = HeaderValue::from_str(&sentence) {
            response.headers_mut().insert("grpc-message", message);
        }
        response
    } else {
        let mut response = Response::new(full(format!("{sentence}\n")));
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        response
    };
    if let Ok(value) = HeaderValue::from_str(&sentence) {
        response.headers_mut().insert(FERRY_ERROR, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::BalanceMetrics;

    #[test]
    fn prefixes_are_rewritten_keeping_the_query() {
        let (mut parts, ()) = Request::get("http://catalog/api/v1/items?page=2").body(()).expect("valid").into_parts();
        rewrite_prefix(&mut parts, "/api/v1", "/v2");
        assert_eq!(parts.uri, "http://catalog/v2/items?page=2");
        let (mut parts, ()) = Request::get("/old").body(()).expect("valid").into_parts();
        rewrite_prefix(&mut parts, "/old", "");
        assert_eq!(parts.uri, "/");
        let (mut parts, ()) = Request::get("/stock/42").body(()).expect("valid").into_parts();
        rewrite_prefix(&mut parts, "/stock", "/");
        assert_eq!(parts.uri, "/42", "no double slash");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_request_waits_for_the_route_instead_of_bypassing_it() {
        use ferry_proto::v1::service_resources::Endpoints;
        let catalog = Arc::new(Catalog::new(16));
        let config = OutboundConfig {
            discovery_timeout: Duration::from_secs(5),
            response_timeout: None,
            client: crate::http::client::ClientConfig::default(),
            gateway: None,
            zone: None,
            balance_metrics: BalanceMetrics::default(),
        };
        let guards = Arc::new(Guards::new(crate::metrics::Metrics::unregistered()));
        let router =
            Router::new("catalog".into(), catalog.clone(), catalog.watch("catalog").expect("room"), config, guards.clone());
        let pending = tokio::spawn(router.route(Request::get("/items").body(crate::http::empty()).expect("request")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished(), "no config yet: the request waits");

        // The first config carries a route whose only rule aborts: the waiting request must get
        // the abort, not go to the endpoint as if there were no route.
        let route = ferry_proto::json::resources_from_yaml(
            "kind: Route\nservice: catalog\nrules:\n  - fault: { abort: { percent: 100, status: 418 } }\n",
        )
        .expect("valid")
        .remove(0);
        let Some(ferry_proto::v1::resource::Kind::Route(mut route)) = route.kind else { panic!("a route") };
        route.version = 3;
        let endpoint = ferry_proto::v1::Endpoint {
            id: "a".into(),
            address: "127.0.0.1".into(),
            port: 9,
            health: ferry_proto::v1::Health::Passing as i32,
            ..Default::default()
        };
        let resources = ferry_proto::v1::ServiceResources {
            service: "catalog".into(),
            version: 3,
            exists: true,
            endpoints: Some(Endpoints::Snapshot(ferry_proto::v1::Endpoints { endpoints: vec![endpoint] })),
            route: Some(ferry_proto::v1::RouteUpdate { route: Some(route) }),
            ..Default::default()
        };
        catalog
            .apply(&ferry_proto::v1::Push { nonce: "1".into(), resources: vec![resources], ..Default::default() })
            .expect("applies");
        let response = pending.await.expect("joins").expect("answered");
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);

        // With no config at all within the discovery timeout, the request fails saying so.
        let silent = Router::new(
            "inventory".into(),
            catalog.clone(),
            catalog.watch("inventory").expect("room"),
            OutboundConfig {
                discovery_timeout: Duration::from_secs(5),
                response_timeout: None,
                client: crate::http::client::ClientConfig::default(),
                gateway: None,
                zone: None,
                balance_metrics: BalanceMetrics::default(),
            },
            guards,
        );
        let error = silent.route(Request::get("/").body(crate::http::empty()).expect("request")).await.expect_err("times out");
        assert!(error.is::<DiscoveryTimeout>(), "{error}");
    }

    #[test]
    fn rolls_respect_the_edges() {
        assert!(!roll(0.0));
        assert!(roll(100.0));
        let hits = (0..10_000).filter(|_| roll(10.0)).count();
        assert!((700..1300).contains(&hits), "{hits} of 10000 at 10%");
    }
}
