//! The control plane's Prometheus metrics, registered once and handed to the parts that count.

use ferry_health::{Health, HealthMetrics};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Every metric of the control plane.
#[derive(Clone)]
pub struct Metrics {
    pub registry: RegistryMetrics,
    pub push: PushMetrics,
    pub health: HealthMetrics,
    pub security: SecurityMetrics,
    /// Stored rows set aside at start-up because they could not be read.
    pub rows_set_aside: Gauge,
}

/// Counts of the CA and of API authentication.
#[derive(Clone, Debug, Default)]
pub struct SecurityMetrics {
    /// Workload certificates signed.
    pub certificates_issued: Counter,
    /// When the issuer of new leaves expires (Unix time).
    pub issuer_expiration: Gauge,
    /// The version of the trust bundle in force.
    pub bundle_version: Gauge,
    /// API calls refused for want of a known token.
    pub unauthenticated: Counter,
}

/// Counts of the registry.
#[derive(Clone, Default)]
pub struct RegistryMetrics {
    pub changes: Counter,
    instances: Family<HealthLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HealthLabels {
    health: &'static str,
}

/// Counts of the push engine.
#[derive(Clone)]
pub struct PushMetrics {
    pub connected: Gauge,
    pub pushes: Counter,
    pub resources: Family<KindLabels, Counter>,
    pub bytes: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    /// From a registry change (or a new subscription, if later) to the push that carries it
    /// leaving for a sidecar; observed per service resource.
    pub propagation: Histogram,
    /// From a push leaving to its ACK arriving.
    pub ack_latency: Histogram,
}

/// How a service's endpoints were sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

impl RegistryMetrics {
    /// The gauge of instances in `health`.
    pub fn instances(&self, health: Health) -> Gauge {
        self.instances.get_or_create(&HealthLabels { health: health.as_str() }).clone()
    }
}

impl Metrics {
    /// Creates the metrics and registers them under the `ferry_` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("ferry");
        let metrics = Self {
            registry: RegistryMetrics::default(),
            push: PushMetrics {
                connected: Gauge::default(),
                pushes: Counter::default(),
                resources: Family::default(),
                bytes: Counter::default(),
                acks: Counter::default(),
                nacks: Counter::default(),
                propagation: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
                ack_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            },
            health: HealthMetrics::default(),
            security: SecurityMetrics::default(),
            rows_set_aside: Gauge::default(),
        };
        registry.register(
            "store_rows_set_aside",
            "Stored rows that could not be read at start-up, kept aside (GET /v1/store/set-aside lists them)",
            metrics.rows_set_aside.clone(),
        );
        metrics.health.register(registry);
        let r = &metrics.registry;
        registry.register("registry_changes", "Changes applied to the registry", r.changes.clone());
        registry.register("registry_instances", "Registered instances by health", r.instances.clone());
        let p = &metrics.push;
        registry.register("sidecars_connected", "Sidecar streams currently open", p.connected.clone());
        registry.register("pushes", "Pushes sent to sidecars", p.pushes.clone());
        registry.register("pushed_resources", "Service resources pushed, by snapshot or delta", p.resources.clone());
        registry.register("pushed_bytes", "Encoded bytes of pushes sent", p.bytes.clone());
        registry.register("push_acks", "Pushes acknowledged by sidecars", p.acks.clone());
        registry.register("push_nacks", "Pushes rejected by sidecars", p.nacks.clone());
        registry.register(
            "push_propagation_seconds",
            "Time from a registry change, or a later subscription, to the push carrying it being sent",
            p.propagation.clone(),
        );
        registry.register("push_ack_seconds", "Time from a push being sent to its ACK", p.ack_latency.clone());
        let s = &metrics.security;
        registry.register("certificates_issued", "Workload certificates signed by the CA", s.certificates_issued.clone());
        registry.register(
            "ca_issuer_expiration_timestamp_seconds",
            "When the CA's issuer of new certificates expires (Unix time)",
            s.issuer_expiration.clone(),
        );
        registry.register("trust_bundle_version", "Version of the trust bundle in force", s.bundle_version.clone());
        registry.register(
            "api_unauthenticated",
            "API calls refused for want of a known token (none, malformed, unknown, revoked or expired)",
            s.unauthenticated.clone(),
        );
        metrics
    }

    /// Metrics registered nowhere, for tests.
    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }
}
