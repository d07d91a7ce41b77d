//! The protections a calling sidecar keeps per destination service: its retry budget and its
//! circuit breaker, with their metrics, following the service's `ServicePolicy`.
//!
//! Every router sending to a service (its own, or another route's backend) shares that
//! service's protection, so the limits hold per calling sidecar and destination whatever route the
//! requests came by.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::watch;

use super::{breaker::ConcurrencyLimit, budget::RetryBudget, policy::Resilience};
use crate::{
    catalog::ServiceState,
    metrics::{DestinationLabels, Metrics, RetryLabels},
};

/// Every destination's guard, built on first use. Cheap to share.
pub struct Protections {
    metrics: Metrics,
    guards: Mutex<HashMap<Arc<str>, Arc<Protection>>>,
}

/// The retry budget and circuit breaker of one destination service.
pub struct Protection {
    /// The destination service.
    pub service: Arc<str>,
    /// Charged by every retry decision.
    pub budget: RetryBudget,
    /// Taken by every attempt.
    pub breaker: Arc<ConcurrencyLimit>,
    /// The policy version they follow; `u64::MAX` before the first.
    version: AtomicU64,
    metrics: Metrics,
}

impl Protections {
    /// An empty registry counting into `metrics`.
    pub fn new(metrics: Metrics) -> Self {
        Self { metrics, guards: Mutex::new(HashMap::new()) }
    }

    /// Drops the guard of `service` and its series (a service no longer tracked).
    pub fn forget(&self, service: &Arc<str>) {
        ferry_runtime::lock(&self.guards).remove(service);
        let labels = DestinationLabels { service: service.clone() };
        self.metrics.requests_in_flight.remove(&labels);
        self.metrics.requests_shed.remove(&labels);
        self.metrics.retries_refused.remove(&labels);
    }

    /// The guard of `service`.
    pub fn get(&self, service: &Arc<str>) -> Arc<Protection> {
        let mut guards = ferry_runtime::lock(&self.guards);
        guards
            .entry(service.clone())
            .or_insert_with(|| {
                let defaults = Resilience::default();
                let labels = DestinationLabels { service: service.clone() };
                let limit = ConcurrencyLimit::new(
                    service.clone(),
                    defaults.limits,
                    self.metrics.requests_in_flight.get_or_create(&labels).clone(),
                    self.metrics.requests_shed.get_or_create(&labels).clone(),
                );
                Arc::new(Protection {
                    service: service.clone(),
                    budget: RetryBudget::new(defaults.budget),
                    breaker: Arc::new(limit),
                    version: AtomicU64::new(u64::MAX),
                    metrics: self.metrics.clone(),
                })
            })
            .clone()
    }
}

impl Protection {
    /// Brings the budget and limits up to the service's policy, when it changed.
    pub fn follow(&self, state: &watch::Receiver<ServiceState>) {
        let (version, policy) = {
            let state = state.borrow();
            let ServiceState::Known(config) = &*state else { return };
            let version = config.policy.as_ref().map_or(0, |p| p.version);
            // Read first: on every request the version is the same, and a read keeps the
            // cache line shared between the workers.
            if self.version.load(Ordering::Acquire) == version {
                return;
            }
            (version, config.policy.clone())
        };
        if self.version.swap(version, Ordering::AcqRel) != version {
            let resilience = Resilience::of(policy.as_deref());
            self.budget.update(resilience.budget);
            self.breaker.update(resilience.limits);
        }
    }

    /// Counts a retry sent, and why.
    pub fn retried(&self, reason: &'static str) {
        self.metrics.retries.get_or_create(&RetryLabels { service: self.service.clone(), reason }).inc();
    }

    /// Counts a retry the budget refused.
    pub fn refused(&self) {
        self.metrics.retries_refused.get_or_create(&DestinationLabels { service: self.service.clone() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::{
        catalog::ServiceConfig,
        outbound::policy::{Budget, Limits},
    };

    fn state(policy: Option<&str>, version: u64) -> ServiceState {
        let policy = policy.map(|yaml| {
            let text = format!("kind: ServicePolicy\nservice: catalog\n{yaml}\n");
            match ferry_proto::json::resources_from_yaml(&text).expect("valid").remove(0).kind {
                Some(ferry_proto::v1::resource::Kind::Policy(mut policy)) => {
                    policy.version = version;
                    Arc::new(policy)
                }
                other => panic!("not a policy: {other:?}"),
            }
        });
        ServiceState::Known(Arc::new(ServiceConfig {
            name: "catalog".into(),
            version,
            exists: true,
            endpoints: BTreeMap::new(),
            route: None,
            policy,
            virtual_ip: None,
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn guards_follow_the_policy_of_their_service() {
        let guards = Protections::new(Metrics::unregistered());
        let guard = guards.get(&"catalog".into());
        assert!(Arc::ptr_eq(&guard, &guards.get(&"catalog".into())), "one guard per service");
        let (sender, receiver) = watch::channel(ServiceState::Pending);
        guard.follow(&receiver);
        assert_eq!(guard.breaker.limits(), Limits::default());

        sender
            .send_replace(state(Some("circuit_breaker: { max_concurrent: 7, max_pending: 0 }\nretry_budget: { ratio: 0.5 }"), 4));
        guard.follow(&receiver);
        assert_eq!(guard.breaker.limits(), Limits { max_concurrent: 7, max_pending: 0 });
        assert_eq!(guard.budget.settings(), Budget { ratio: 0.5, min_per_second: 10, window: Duration::from_secs(10) });

        sender.send_replace(state(None, 5));
        guard.follow(&receiver);
        assert_eq!(guard.breaker.limits(), Limits::default(), "a deleted policy means the defaults");
        assert_eq!(guard.budget.settings(), Budget::default());
    }
}
