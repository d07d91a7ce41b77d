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
use tokio::sync::{Semaphore, watch};
use tower::Service;

use super::{
    Balance, EndpointService, OutboundConfig,
    route::{BackendRef, RequestInfo, Retries, RouteTable, Rule},
};
use crate::{
    catalog::{Catalog, Endpoint, ServiceState},
    errors::{DiscoveryTimeout, FERRY_ERROR, NoRoute, ResponseTimeout, is_grpc},
    http::{
        Body, BoxError,
        client::{ConnectError, UpstreamError},
        full,
        replay::ReplayBody,
    },
};

/// Request bodies up to this size are kept so the request can be retried or mirrored.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;
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
    balancers: Mutex<HashMap<BackendRef, Balance<EndpointService>>>,
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Router {
    /// A router for `service`, following its state (and that of the services its route uses).
    pub fn new(service: Arc<str>, catalog: Arc<Catalog>, state: watch::Receiver<ServiceState>, config: OutboundConfig) -> Self {
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
                (Some(table), Some(index)) => inner.apply(&table.rules[index], request).await,
                (Some(_), None) if inner.gateway => Err(Box::new(NoRoute::NoRule {
                    gateway: inner.service.clone(),
                    host: info.host.unwrap_or_default().to_owned(),
                    path: info.path.to_owned(),
                }) as BoxError),
                (None, _) if inner.gateway => {
                    Err(Box::new(NoRoute::NoTable { gateway: inner.service.clone(), why: inner.why_no_route() }) as BoxError)
                }
                _ => {
                    let backend = BackendRef { service: inner.service.clone(), subset: None };
                    send(inner.balancer(&backend)?, request).await
                }
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
            balancers.iter().map(|(backend, b)| (backend.to_string(), b.describe())).collect();
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
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        let backends: Vec<Value> = backends
            .iter()
            .map(|b| {
                let routable = inner.balancer(&b.backend).ok().and_then(|balance| balance.routable());
                json!({
                    "backend": b.backend.to_string(),
                    "service": &*b.backend.service,
                    "subset": b.backend.subset.as_deref(),
                    "weight": b.weight,
                    "share_percent": if total == 0 { 0.0 } else { f64::from(b.weight) * 100.0 / f64::from(total) },
                    "routable_endpoints": routable,
                })
            })
            .collect();
        json!({
            "service": &*inner.service,
            "route_version": table.as_ref().map(|t| t.version),
            "held_route": held,
            "rule": rule.map(|r| json!({ "index": r.index, "name": r.name, "label": r.label() })),
            "backends": backends,
            "timeout": rule.and_then(|r| r.timeout).map(|t| humantime::format_duration(t).to_string()),
            "retries": rule.and_then(|r| r.retries.as_ref()).map(|r| json!({
                "attempts": r.attempts,
                "per_try_timeout": r.per_try_timeout.map(|t| humantime::format_duration(t).to_string()),
                "on": r.describe(),
            })),
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

    /// The balancer of a backend, built on first use.
    fn balancer(&self, backend: &BackendRef) -> Result<Balance<EndpointService>, BoxError> {
        let mut balancers = lock(&self.balancers);
        if let Some(balance) = balancers.get(backend) {
            return Ok(balance.clone());
        }
        let state = if backend.service == self.service { self.state.clone() } else { self.catalog.watch(&backend.service)? };
        let client = self.config.client.clone();
        let balance = Balance::new(
            backend.service.clone(),
            backend.subset.clone(),
            state,
            move |target: super::balance::Target| EndpointService::new(&target, client.clone()),
            super::balance::BalanceConfig {
                discovery_timeout: self.config.discovery_timeout,
                zone: self.config.zone.clone(),
                metrics: self.config.balance_metrics.clone(),
            },
        );
        balancers.insert(backend.clone(), balance.clone());
        Ok(balance)
    }

    /// Picks a backend by weight among those with endpoints to take traffic; when none has, the
    /// first, whose balancer then says why.
    fn pick(&self, rule: &Rule) -> Result<Balance<EndpointService>, BoxError> {
        let mut candidates = Vec::with_capacity(rule.backends.len());
        for backend in rule.backends.iter().filter(|b| b.weight > 0) {
            let balance = self.balancer(&backend.backend)?;
            if balance.routable() != Some(0) {
                candidates.push((balance, backend.weight));
            }
        }
        let total: u32 = candidates.iter().map(|(_, w)| *w).sum();
        if total == 0 {
            let first = rule.backends.iter().find(|b| b.weight > 0).unwrap_or(&rule.backends[0]);
            return self.balancer(&first.backend);
        }
        let mut roll = rand::random_range(0..total);
        for (balance, weight) in candidates {
            if roll < weight {
                return Ok(balance);
            }
            roll -= weight;
        }
        Err("no backend could be picked".into())
    }

    /// Applies a matched rule to a request.
    async fn apply(self: &Arc<Self>, rule: &Rule, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let grpc = is_grpc(request.headers());
        if let Some((percent, status)) = rule.abort
            && roll(percent)
        {
            return Ok(fault_response(status, &rule.label(), grpc));
        }
        let work = self.attempts(rule, request);
        let mut response = match rule.timeout {
            Some(timeout) => {
                tokio::time::timeout(timeout, work).await.map_err(|_| -> BoxError { Box::new(ResponseTimeout(timeout)) })??
            }
            None => work.await?,
        };
        rule.response_headers.apply(response.headers_mut());
        Ok(response)
    }

    /// The delay, the request's rewrites, the mirror, and the attempts.
    async fn attempts(self: &Arc<Self>, rule: &Rule, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        if let Some((percent, delay)) = rule.delay
            && roll(percent)
        {
            tokio::time::sleep(delay).await;
        }
        let (mut parts, body) = request.into_parts();
        rule.request_headers.apply(&mut parts.headers);
        if let Some((prefix, replacement)) = &rule.rewrite_prefix {
            rewrite_prefix(&mut parts, prefix, replacement);
        }
        let retries = rule.retries.as_ref();
        let attempts = retries.map_or(1, |r| r.attempts);
        let mut body = if attempts > 1 || rule.mirror.is_some() {
            Prepared::from(body, &parts.headers).await?
        } else {
            Prepared::Stream(Some(body))
        };
        if let (Some((backend, percent)), Some(bytes)) = (&rule.mirror, body.bytes())
            && roll(*percent)
        {
            self.mirror(backend, &parts, bytes);
        }
        let mut attempt = 1;
        loop {
            let balance = self.pick(rule)?;
            let request = Request::from_parts(parts.clone(), body.next()?);
            let sent = send(balance, request);
            let result = match retries.and_then(|r| r.per_try_timeout) {
                Some(limit) => tokio::time::timeout(limit, sent).await.unwrap_or_else(|_| Err(Box::new(ResponseTimeout(limit)))),
                None => sent.await,
            };
            let Some(retries) = retries.filter(|_| attempt < attempts && body.replayable()) else { return result };
            if !should_retry(retries, &parts.method, &result) {
                return result;
            }
            tracing::debug!(service = %self.service, rule = %rule.label(), attempt, "retrying");
            attempt += 1;
            // Full-jitter exponential backoff: 25 ms doubling, at most 250 ms.
            let ceiling = (25u64 << (attempt - 2).min(4)).min(250);
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..=ceiling))).await;
        }
    }

    /// Sends a copy of the request to `backend`, fire and forget.
    fn mirror(self: &Arc<Self>, backend: &BackendRef, parts: &Parts, body: Bytes) {
        let Ok(permit) = self.mirrors.clone().try_acquire_owned() else { return };
        let Ok(balance) = self.balancer(backend) else { return };
        let mut request = Request::from_parts(parts.clone(), full(body));
        request.headers_mut().insert("x-ferry-mirror", HeaderValue::from_static("true"));
        tokio::spawn(async move {
            if let Ok(response) = send(balance, request).await {
                // Read and drop, so the connection can be reused.
                let _ = response.into_body().collect().await;
            }
            drop(permit);
        });
    }
}

/// Sends one request through a balancer. Balancers are always ready, and the boxed future keeps
/// the endpoint service's body lifetime concrete inside async blocks.
fn send(mut balance: Balance<EndpointService>, request: Request<Body>) -> BoxFuture<'static, Result<Response<Body>, BoxError>> {
    balance.call(request)
}

/// A request body, ready to be sent more than once when it is small enough.
enum Prepared {
    /// Known whole (a small `content-length`): it can be mirrored and retried.
    Bytes(Bytes),
    /// Streamed to the first attempt as it arrives, with a copy of up to [`MAX_REPLAY_BODY`]
    /// kept for later ones (gRPC calls, chunked uploads).
    Replay(ReplayBody),
    /// Sent once.
    Stream(Option<Body>),
}

impl Prepared {
    async fn from(body: Body, headers: &HeaderMap) -> Result<Self, BoxError> {
        if http_body::Body::is_end_stream(&body) {
            return Ok(Self::Bytes(Bytes::new()));
        }
        let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        match length {
            Some(length) if length <= MAX_REPLAY_BODY => Ok(Self::Bytes(body.collect().await?.to_bytes())),
            Some(_) => Ok(Self::Stream(Some(body))),
            None => Ok(Self::Replay(ReplayBody::new(body, MAX_REPLAY_BODY as usize))),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            Self::Bytes(_) => true,
            Self::Replay(body) => body.can_replay(),
            Self::Stream(_) => false,
        }
    }

    fn bytes(&self) -> Option<Bytes> {
        match self {
            Self::Bytes(bytes) => Some(bytes.clone()),
            Self::Replay(_) | Self::Stream(_) => None,
        }
    }

    /// The body for the next attempt.
    fn next(&mut self) -> Result<Body, BoxError> {
        match self {
            Self::Bytes(bytes) => Ok(full(bytes.clone())),
            Self::Replay(body) => {
                body.replay().map(crate::http::boxed).ok_or_else(|| "the request body cannot be sent again".into())
            }
            Self::Stream(body) => body.take().ok_or_else(|| "the request body was already sent".into()),
        }
    }
}

/// Whether an attempt's outcome calls for another.
fn should_retry(retries: &Retries, method: &Method, result: &Result<Response<Body>, BoxError>) -> bool {
    // A request that reached the upstream is retried only when repeating it is harmless.
    let idempotent =
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE);
    match result {
        Ok(response) => {
            let grpc_status = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            // Every gRPC call is a POST: a route that names gRPC statuses declares its calls
            // safe to repeat on those.
            (idempotent && retries.retry_response(response.status().as_u16(), None))
                || (is_grpc(response.headers()) && retries.retry_response(0, grpc_status))
        }
        Err(error) => {
            if error.is::<ConnectError>() {
                return retries.connect_failure;
            }
            if refused_stream(error.as_ref()) {
                return retries.refused_stream;
            }
            if error.is::<UpstreamError>() {
                return idempotent && retries.reset;
            }
            if error.is::<ResponseTimeout>() {
                return idempotent && (retries.reset || retries.any_5xx || retries.gateway_error);
            }
            false
        }
    }
}

/// Whether the upstream refused the HTTP/2 stream, so the request was never processed.
fn refused_stream(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        next = error.source();
    }
    false
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

    #[test]
    fn only_safe_requests_are_retried_after_they_reached_the_upstream() {
        let retries = Retries { attempts: 3, any_5xx: true, connect_failure: true, ..Retries::default() };
        let failed = |status: u16| -> Result<Response<Body>, BoxError> {
            let mut response = Response::new(crate::http::empty());
            *response.status_mut() = StatusCode::from_u16(status).expect("status");
            Ok(response)
        };
        assert!(should_retry(&retries, &Method::GET, &failed(503)));
        assert!(!should_retry(&retries, &Method::POST, &failed(503)), "the POST reached the app");
        assert!(!should_retry(&retries, &Method::GET, &failed(404)));
        let unavailable = || -> Result<Response<Body>, BoxError> {
            let mut response = Response::new(crate::http::empty());
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            response.headers_mut().insert("grpc-status", HeaderValue::from_static("14"));
            Ok(response)
        };
        assert!(!should_retry(&retries, &Method::POST, &unavailable()), "no gRPC status named");
        let grpc = Retries { attempts: 3, grpc: vec![14], ..Retries::default() };
        assert!(should_retry(&grpc, &Method::POST, &unavailable()), "a named gRPC status is retried, though gRPC is POST");
        let refused: Result<Response<Body>, BoxError> = Err(Box::new(ConnectError {
            address: "x".into(),
            reason: crate::http::client::ConnectFailure::Timeout(Duration::from_secs(1)),
        }));
        assert!(should_retry(&retries, &Method::POST, &refused), "never sent: safe whatever the method");
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
        let router = Router::new("catalog".into(), catalog.clone(), catalog.watch("catalog").expect("room"), config);
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
        catalog.apply(&ferry_proto::v1::Push { nonce: "1".into(), resources: vec![resources] }).expect("applies");
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
