//! What the router would do with a request, and what its balancers hold, as plain data: the
//! admin API renders it (`/explain`, `/config`).

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, Method, Uri};

use super::{Router, lock};
use crate::{
    catalog::ServiceState,
    outbound::{
        balance::BalancerState,
        breaker::ConcurrencyLimit,
        policy::Budget,
        protection::Protection,
        route::{BackendRef, RequestInfo, Retries, WeightedBackend},
    },
};

/// The route in force, and why a newer one is held, if one is.
#[derive(Debug, Clone)]
pub struct RouteStatus {
    pub version: Option<u64>,
    pub held: Option<String>,
}

/// What would happen to one request.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub service: Arc<str>,
    pub route_version: Option<u64>,
    pub held_route: Option<String>,
    /// The matching rule: (index, name, label).
    pub rule: Option<(usize, String, Arc<str>)>,
    pub backends: Vec<BackendExplanation>,
    pub timeout: Option<Duration>,
    pub retries: Option<RetriesExplanation>,
    pub retry_budget: BudgetState,
    pub circuit_breaker: BreakerState,
    /// The rule's faults, when a rule matches.
    pub fault: Option<FaultExplanation>,
    pub mirror: Option<(BackendRef, f64)>,
    pub rewrite_path_prefix: Option<(String, String)>,
    pub no_rule_matches: bool,
    /// Each rule before the one that matches (every rule when none does), with the first
    /// condition the request fails: (label, why).
    pub passed_over: Vec<(Arc<str>, String)>,
    /// `None` before the service's first config.
    pub service_exists: Option<bool>,
    pub gateway: bool,
    pub host: Option<String>,
}

/// A rule's injected faults.
#[derive(Debug, Clone)]
pub struct FaultExplanation {
    /// (percent, delay)
    pub delay: Option<(f64, Duration)>,
    /// (percent, status)
    pub abort: Option<(f64, u16)>,
}

/// One backend a request may go to.
#[derive(Debug, Clone)]
pub struct BackendExplanation {
    pub backend: BackendRef,
    pub weight: u32,
    pub share_percent: f64,
    pub routable_endpoints: Option<usize>,
    pub circuit_breaker: Option<BreakerState>,
}

/// The retries a request would get.
#[derive(Debug, Clone)]
pub struct RetriesExplanation {
    pub retries: Retries,
    /// The mesh's default, not the rule's own.
    pub default: bool,
}

/// A retry budget's settings and use.
#[derive(Debug, Clone)]
pub struct BudgetState {
    pub settings: Budget,
    pub requests_in_window: u64,
    pub retries_in_window: u64,
}

/// A circuit breaker's limits and use.
#[derive(Debug, Clone)]
pub struct BreakerState {
    pub service: Arc<str>,
    pub max_concurrent: usize,
    pub max_pending: usize,
    pub in_flight: usize,
    pub pending: usize,
}

impl BreakerState {
    fn of(service: &Arc<str>, breaker: &ConcurrencyLimit) -> Self {
        let limits = breaker.limits();
        Self {
            service: service.clone(),
            max_concurrent: limits.max_concurrent,
            max_pending: limits.max_pending,
            in_flight: breaker.in_flight(),
            pending: breaker.pending(),
        }
    }
}

fn budget(protection: &Protection) -> BudgetState {
    let (requests_in_window, retries_in_window) = protection.budget.counts();
    BudgetState { settings: protection.budget.settings(), requests_in_window, retries_in_window }
}

impl Router {
    /// The version of the route in force, if any, and why a newer one is held, if one is.
    pub fn route_status(&self) -> RouteStatus {
        RouteStatus {
            version: self.inner.compiled.load().as_ref().map(|c| c.table.version),
            held: lock(&self.inner.held).clone(),
        }
    }

    /// What each of its balancers holds, by backend.
    pub fn balancers(&self) -> Vec<(BackendRef, BalancerState)> {
        let balancers = lock(&self.inner.balancers);
        let mut states: Vec<_> = balancers.iter().map(|(backend, built)| (backend.clone(), built.balance.describe())).collect();
        states.sort_by_key(|(backend, _)| backend.to_string());
        states
    }

    /// What would happen to a request: the rule, backends, timeout and retries, from the route
    /// in force.
    pub fn explain(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Explanation {
        let inner = &self.inner;
        let compiled = inner.compiled.load_full();
        let info = RequestInfo::of(method, uri, headers);
        let rule = compiled.as_ref().and_then(|c| c.table.find(&info));
        let default_backend =
            [WeightedBackend { backend: BackendRef { service: inner.service.clone(), subset: None }, weight: 1 }];
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
        let own = inner.protections.get(&inner.service);
        own.follow(&inner.state);
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        let backends = backends
            .iter()
            .map(|b| {
                let built = inner.balancer(&b.backend).ok();
                BackendExplanation {
                    backend: b.backend.clone(),
                    weight: b.weight,
                    share_percent: if total == 0 { 0.0 } else { f64::from(b.weight) * 100.0 / f64::from(total) },
                    routable_endpoints: built.as_ref().and_then(|built| built.balance.routable()),
                    circuit_breaker: built.map(|built| {
                        built.protection.follow(&built.state);
                        BreakerState::of(&built.protection.service, &built.protection.breaker)
                    }),
                }
            })
            .collect();
        Explanation {
            service: inner.service.clone(),
            route_version: compiled.as_ref().map(|c| c.table.version),
            held_route: lock(&inner.held).clone(),
            rule: rule.map(|r| (r.index, r.name.clone(), r.label().clone())),
            backends,
            timeout: rule.and_then(|r| r.timeout),
            retries: retries
                .map(|r| RetriesExplanation { retries: r.clone(), default: rule.is_none_or(|r| r.retries.is_none()) }),
            retry_budget: budget(&own),
            circuit_breaker: BreakerState::of(&own.service, &own.breaker),
            fault: rule.map(|r| FaultExplanation { delay: r.delay, abort: r.abort }),
            mirror: rule.and_then(|r| r.mirror.clone()),
            rewrite_path_prefix: rule.and_then(|r| r.rewrite_prefix.clone()),
            no_rule_matches: rule.is_none(),
            passed_over: compiled.as_ref().map(|c| c.table.passed_over(&info, rule.map(|r| r.index))).unwrap_or_default(),
            service_exists: match &*inner.state.borrow() {
                ServiceState::Known(config) => Some(config.exists),
                ServiceState::Pending => None,
            },
            gateway: inner.gateway,
            host: info.host.map(str::to_owned),
        }
    }
}
