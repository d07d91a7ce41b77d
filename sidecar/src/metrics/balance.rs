//! The balancers' metrics: endpoints by state, ejections, and requests balanced in panic mode.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Shared by every balancer of a sidecar. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct BalanceMetrics {
    endpoints: Family<EndpointLabels, Gauge>,
    ejections: Family<BackendLabels, Counter>,
    panic: Family<BackendLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    /// The service, or `service/subset`.
    backend: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    backend: Arc<str>,
    state: &'static str,
}

impl BalanceMetrics {
    /// Registers the metrics in `registry` (already prefixed `ferry_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "balancer_endpoints",
            "Routable endpoints per backend, by whether outlier detection ejected them",
            self.endpoints.clone(),
        );
        registry.register("outlier_ejections", "Endpoints ejected by outlier detection", self.ejections.clone());
        registry.register(
            "balancer_panic_requests",
            "Requests balanced over every endpoint because all were ejected (panic mode)",
            self.panic.clone(),
        );
    }

    /// Drops the series of `backend` (a service no longer tracked).
    pub fn forget(&self, backend: &Arc<str>) {
        for state in ["available", "ejected"] {
            self.endpoints.remove(&EndpointLabels { backend: backend.clone(), state });
        }
        self.ejections.remove(&BackendLabels { backend: backend.clone() });
        self.panic.remove(&BackendLabels { backend: backend.clone() });
    }

    pub fn set_endpoints(&self, backend: &Arc<str>, available: usize, ejected: usize) {
        for (state, count) in [("available", available), ("ejected", ejected)] {
            self.endpoints.get_or_create(&EndpointLabels { backend: backend.clone(), state }).set(count as i64);
        }
    }

    pub fn ejected(&self, backend: &Arc<str>) {
        self.ejections.get_or_create(&BackendLabels { backend: backend.clone() }).inc();
    }

    pub fn panicked(&self, backend: &Arc<str>) {
        self.panic.get_or_create(&BackendLabels { backend: backend.clone() }).inc();
    }

    /// Ejections so far, for tests and `/config`.
    pub fn ejections(&self, backend: &Arc<str>) -> u64 {
        self.ejections.get_or_create(&BackendLabels { backend: backend.clone() }).get()
    }

    /// Requests balanced in panic mode so far, for tests and `/config`.
    pub fn panic_requests(&self, backend: &Arc<str>) -> u64 {
        self.panic.get_or_create(&BackendLabels { backend: backend.clone() }).get()
    }
}
