//! Counts of check results and transitions, by kind of check.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::Health;

/// The health-check metrics of one process.
#[derive(Clone, Default)]
pub struct HealthMetrics {
    results: Family<ResultLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    kind: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    kind: &'static str,
    to: &'static str,
}

impl HealthMetrics {
    /// Registers the metrics in `registry` (the caller chooses the prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("health_check_results", "Health check results, by kind and status", self.results.clone());
        registry.register(
            "health_check_transitions",
            "Health check status changes, by kind and new status",
            self.transitions.clone(),
        );
    }

    pub(crate) fn result(&self, kind: &'static str, status: Health) {
        self.results.get_or_create(&ResultLabels { kind, status: status.as_str() }).inc();
    }

    pub(crate) fn transition(&self, kind: &'static str, to: Health) {
        self.transitions.get_or_create(&TransitionLabels { kind, to: to.as_str() }).inc();
    }
}
