//! Which route is in force, and the stacks of its rules.
//!
//! A new route takes effect only once everything it references is known: the other services it
//! sends to, the subsets it names, and an instance up in each subset it sends requests to (but
//! on a gateway, which has nothing to fall back on). Until then the previous route stays in
//! force (or none), so applying a route before its policy, before its backend's first config, or
//! before the first v2 instance is up does not become a burst of 503s. The control plane sends a
//! route and the services it references in one push, so the wait is normally nil. Once in force,
//! a route stays in force until a newer one is.
//!
//! This work runs in the router's background task, on the main runtime, whenever the service or
//! a service its route uses changes: never on the request path.

use std::sync::{Arc, Weak};

use tokio::sync::{Semaphore, watch};

use super::{Compiled, Inner, lock};
use crate::{
    catalog::{Endpoint, ServiceState},
    http::BoxError,
    outbound::{
        OutboundConfig,
        balance::{Balance, BalanceConfig},
        fault::Faults,
        mirror::MirrorTo,
        protection::{Protection, Protections},
        retry::{BACKOFF, RetryConfig},
        rewrite::Rewrites,
        route::{BackendRef, Retries, RouteTable, Rule},
        stack::{self, Backend, Endpoint as EndpointStack, RuleParams, RuleStack},
    },
};

/// One backend's balancer, its place in the stack, and what it follows.
#[derive(Clone)]
pub struct Built {
    pub balance: Balance<EndpointStack>,
    pub backend: Backend,
    pub protection: Arc<Protection>,
    pub state: watch::Receiver<ServiceState>,
}

impl Built {
    /// The balancer of `reference`, following `state`, behind its service's breaker.
    pub fn new(
        reference: &BackendRef,
        state: watch::Receiver<ServiceState>,
        config: &OutboundConfig,
        protections: &Protections,
    ) -> Self {
        let balance = stack::balance(
            reference.service.clone(),
            reference.subset.clone(),
            state.clone(),
            config.client.clone(),
            BalanceConfig {
                discovery_timeout: config.discovery_timeout,
                zone: config.zone.clone(),
                metrics: config.balance_metrics.clone(),
                runtime: config.runtime.clone(),
            },
        );
        let protection = protections.get(&reference.service);
        protection.follow(&state);
        let backend = stack::backend(&protection, balance.clone());
        Self { balance, backend, protection, state }
    }
}

/// The stack of the requests no rule covers: every endpoint of the service, the mesh's
/// default retries, no timeout of its own.
pub fn default_stack(
    service: &Arc<str>,
    protections: &Protections,
    own: &Built,
    retries: &Retries,
    label: &Arc<str>,
    mirrors: &Arc<Semaphore>,
) -> RuleStack {
    stack::rule(RuleParams {
        timeout: None,
        faults: Faults { rule: label.clone(), ..Faults::default() },
        rewrites: Rewrites::default(),
        mirror: None,
        mirrors: mirrors.clone(),
        retry: RetryConfig {
            retries: retries.clone(),
            backoff: BACKOFF,
            protection: protections.get(service),
            label: label.clone(),
        },
        backends: vec![(own.backend.clone(), 1)],
    })
}

/// Re-evaluates the route whenever the service, or a service its route uses, changes.
pub async fn follow(inner: Weak<Inner>, mut own: watch::Receiver<ServiceState>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let mut dependencies = strong.refresh();
        strong.follow_policies();
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
    pub(super) fn why_no_route(&self) -> String {
        match (&*self.state.borrow(), lock(&self.held).clone()) {
            (_, Some(held)) => held,
            (ServiceState::Pending, None) => format!("no config for {} from the control plane yet", self.service),
            (ServiceState::Known(_), None) => format!("no Route for service {} is applied", self.service),
        }
    }

    /// Brings every backend's budget and breaker up to its service's policy.
    fn follow_policies(&self) {
        for built in lock(&self.balancers).values() {
            built.protection.follow(&built.state);
        }
    }

    /// The balancer of a backend, built on first use.
    pub(super) fn balancer(&self, backend: &BackendRef) -> Result<Built, BoxError> {
        let mut balancers = lock(&self.balancers);
        if let Some(built) = balancers.get(backend) {
            return Ok(built.clone());
        }
        let state = if backend.service == self.service { self.state.clone() } else { self.catalog.watch(&backend.service)? };
        let built = Built::new(backend, state, &self.config, &self.protections);
        balancers.insert(backend.clone(), built.clone());
        Ok(built)
    }

    /// The stack of `rule`.
    fn rule_stack(&self, rule: &Rule) -> Result<RuleStack, BoxError> {
        let backends =
            rule.backends.iter().map(|b| Ok((self.balancer(&b.backend)?.backend, b.weight))).collect::<Result<_, BoxError>>()?;
        // A mirror is best effort: one that cannot be built is left out.
        let mirror = rule.mirror.as_ref().and_then(|(backend, percent)| {
            self.balancer(backend).ok().map(|built| MirrorTo { backend: built.balance, percent: *percent })
        });
        Ok(stack::rule(RuleParams {
            timeout: rule.timeout,
            faults: Faults { abort: rule.abort, delay: rule.delay, rule: rule.label().clone() },
            rewrites: Rewrites {
                request_headers: rule.request_headers.clone(),
                prefix: rule.rewrite_prefix.clone(),
                response_headers: rule.response_headers.clone(),
            },
            mirror,
            mirrors: self.mirrors.clone(),
            retry: RetryConfig {
                retries: rule.retries.clone().unwrap_or_else(|| self.default_retries.clone()),
                backoff: BACKOFF,
                protection: self.protections.get(&self.service),
                label: rule.label().clone(),
            },
            backends,
        }))
    }

    /// Puts the service's current route in force if everything it references is known, and
    /// returns the watches of the other services it references.
    fn refresh(&self) -> Vec<watch::Receiver<ServiceState>> {
        let ServiceState::Known(config) = self.state.borrow().clone() else { return Vec::new() };
        let Some(route) = &config.route else {
            self.compiled.store(None);
            *lock(&self.held) = None;
            return Vec::new();
        };
        let in_force = self.compiled.load().as_ref().map(|c| c.table.version) == Some(route.version);
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
        if in_force {
            // A route in force stays in force: instances leaving later do not take it back.
            *lock(&self.held) = None;
        } else if missing.is_empty() {
            match table.rules.iter().map(|rule| self.rule_stack(rule)).collect::<Result<Vec<_>, _>>() {
                Ok(stacks) => {
                    tracing::info!(service = %self.service, version = table.version, rules = table.rules.len(), "route in force");
                    self.compiled.store(Some(Arc::new(Compiled { table, stacks })));
                    *lock(&self.held) = None;
                }
                Err(error) => self.hold(format!("route version {} waits: {error}", table.version)),
            }
        } else {
            self.hold(format!("route version {} waits: {}", table.version, missing.join("; ")));
        }
        watches
    }

    /// Keeps the route in force (or none) while a newer one waits, saying why.
    fn hold(&self, reason: String) {
        let mut held = lock(&self.held);
        if held.as_deref() != Some(reason.as_str()) {
            tracing::info!(service = %self.service, %reason, "holding the new route; the last one stays in force");
        }
        *held = Some(reason);
    }
}
