//! The sidecar's Prometheus metrics. A leaf: it imports nothing from the modules that count
//! into it.

use std::sync::{Arc, atomic::AtomicU64};

pub use self::{balance::BalanceMetrics, traffic::TrafficTally};
use arc_swap::ArcSwap;

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

pub mod balance;
pub mod traffic;

/// Every metric of the sidecar.
#[derive(Clone)]
pub struct Metrics {
    pub health: ferry_health::HealthMetrics,
    pub control_plane_connected: Gauge,
    pub config_updates: Family<ResultLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DirectionLabels, Histogram>,
    pub balance: BalanceMetrics,
    pub connections_open: Family<ListenerLabels, Gauge>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_connections_open: Family<ServiceLabels, Gauge>,
    /// Connections the intercepting outbound listener took, by where they went.
    pub intercepted: Family<InterceptLabels, Counter>,
    /// Set at each scrape, from the control stream's state.
    pub config_age_seconds: Gauge<f64, AtomicU64>,
    /// Set at each scrape, from the control stream's state.
    pub config_from_state_dir: Gauge,
    pub state_writes: Family<ResultLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub retries_refused: Family<DestinationLabels, Counter>,
    pub requests_shed: Family<DestinationLabels, Counter>,
    pub requests_in_flight: Family<DestinationLabels, Gauge>,
    /// When the workload certificate in force expires, in seconds since the epoch.
    pub identity_expiration: Gauge<f64, AtomicU64>,
    /// Authorization decisions of the inbound listener.
    pub inbound_authz: Family<AuthzLabels, Counter>,
    /// Inbound connections refused before any request: plaintext to a strict listener, a failed
    /// handshake, a handshake that took too long.
    pub inbound_refused: Family<ReasonLabels, Counter>,
    /// The figures reported to the control plane (not exported to Prometheus).
    pub traffic: TrafficTally,
}

/// The request metrics of one service in one direction, found once. Cheap to clone.
#[derive(Clone)]
pub struct ServiceMetrics {
    inner: Arc<ServiceHandles>,
}

struct ServiceHandles {
    requests: Family<RequestLabels, Counter>,
    direction: &'static str,
    service: Arc<str>,
    duration: Histogram,
    /// The traffic figures of the service; `None` for what is not reported.
    traffic: Option<Arc<traffic::TrafficCounters>>,
    /// The counter of each (route, status) seen so far: a family lookup hashes every label, a
    /// scan of these compares a pointer or two.
    counters: ArcSwap<Vec<(Arc<str>, &'static str, Counter)>>,
}

/// The most (route, status) pairs one service keeps handles for; past it, counting looks the
/// series up each time. Routes have few rules and statuses few classes and reasons.
const MAX_COUNTERS: usize = 128;

impl ServiceMetrics {
    /// The service counted.
    pub fn service(&self) -> &Arc<str> {
        &self.inner.service
    }

    /// Counts one request and its latency.
    pub fn record(&self, route: &Arc<str>, status: &'static str, elapsed: std::time::Duration) {
        let inner = &*self.inner;
        inner.duration.observe(elapsed.as_secs_f64());
        if let Some(traffic) = &inner.traffic {
            // Failed: a 5xx from the app or the mesh's own answer (a reason code).
            traffic.count(!matches!(status, "1xx" | "2xx" | "3xx" | "4xx"), elapsed);
        }
        let same = |(r, s, _): &&(Arc<str>, &'static str, Counter)| (Arc::ptr_eq(r, route) || r == route) && *s == status;
        if let Some((_, _, counter)) = inner.counters.load().iter().find(same) {
            counter.inc();
            return;
        }
        let labels = RequestLabels { direction: inner.direction, service: inner.service.clone(), route: route.clone(), status };
        let counter = inner.requests.get_or_create(&labels).clone();
        counter.inc();
        inner.counters.rcu(|counters| {
            let mut counters = Vec::clone(counters);
            if counters.len() < MAX_COUNTERS && !counters.iter().any(|entry| same(&entry)) {
                counters.push((route.clone(), status, counter.clone()));
            }
            counters
        });
    }
}

/// Whether a config push was applied.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// One class of requests through the proxy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub service: Arc<str>,
    /// The route rule that sent the request (`rules[0] (canary)`), `default` when no rule
    /// matched or the service has no route, `-` when the request never reached a router.
    pub route: Arc<str>,
    /// `2xx`..`5xx`, or the `x-ferry-error` reason code of a response the proxy made itself.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
    pub service: Arc<str>,
}

/// Where one intercepted connection went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterceptLabels {
    /// The mesh service, or `-` for a destination outside the mesh.
    pub service: Arc<str>,
    /// `service`, `egress` (outside the mesh, relayed), `denied` (outside the mesh, closed by
    /// --outbound-policy deny), `refused` (too many services tracked, or no address table yet)
    /// or `loop` (the sidecar's own connection, redirected back to it).
    pub destination: &'static str,
    /// `http1`, `http2`, `tls`, `opaque`, or `none` when no detection was made.
    pub protocol: &'static str,
}

/// The fate of one connection accepted by a TCP upstream listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub service: Arc<str>,
    /// `connected`, or why the connection could not be placed: `no_endpoints`,
    /// `unknown_service`, `discovery_timeout`, `connect_failed`.
    pub outcome: &'static str,
}

/// One service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: Arc<str>,
}

/// Retries of requests to one destination service, by why they were retried.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub service: Arc<str>,
    /// `connect_failure`, `refused_stream`, `app_unreachable`, `reset`, `timeout`, `status`,
    /// `grpc_status`.
    pub reason: &'static str,
}

/// One destination service of the outbound proxy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub service: Arc<str>,
}

/// The route rule that handled an outbound request, put in its response's extensions for the
/// `route` label.
#[derive(Clone, Debug)]
pub struct RouteLabel(pub Arc<str>);

/// One authorization decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `allow` or `deny`.
    pub decision: &'static str,
    pub service: Arc<str>,
    /// The calling service, from its verified identity; `unauthenticated` for plaintext.
    pub caller: Arc<str>,
}

/// Why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// One kind of listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

impl Metrics {
    /// The gauge of connections open on a kind of listener.
    pub fn connections(&self, listener: &'static str) -> Gauge {
        self.connections_open.get_or_create(&ListenerLabels { listener }).clone()
    }

    /// Creates the metrics and registers them under the `ferry_` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("ferry");
        let metrics = Self {
            health: ferry_health::HealthMetrics::default(),
            control_plane_connected: Gauge::default(),
            config_updates: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 18))),
            balance: Default::default(),
            connections_open: Family::default(),
            tcp_connections: Family::default(),
            tcp_connections_open: Family::default(),
            intercepted: Family::default(),
            config_age_seconds: Gauge::default(),
            config_from_state_dir: Gauge::default(),
            state_writes: Family::default(),
            retries: Family::default(),
            retries_refused: Family::default(),
            requests_shed: Family::default(),
            requests_in_flight: Family::default(),
            identity_expiration: Gauge::default(),
            inbound_authz: Family::default(),
            inbound_refused: Family::default(),
            traffic: TrafficTally::default(),
        };
        metrics.balance.register(registry);
        registry.register(
            "connections_open",
            "HTTP connections being served, by listener: outbound, upstream (per-upstream ports), inbound",
            metrics.connections_open.clone(),
        );
        metrics.health.register(registry);
        registry.register(
            "control_plane_connected",
            "1 while the config stream to the control plane is up",
            metrics.control_plane_connected.clone(),
        );
        registry.register(
            "config_updates",
            "Config pushes received, by whether they were applied",
            metrics.config_updates.clone(),
        );
        registry.register("requests", "Requests proxied, by direction, service, route rule and status", metrics.requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response headers",
            metrics.request_duration.clone(),
        );
        registry.register(
            "tcp_connections",
            "Connections accepted by TCP upstream listeners, by service and outcome",
            metrics.tcp_connections.clone(),
        );
        registry.register(
            "tcp_connections_open",
            "TCP upstream connections open now, by service",
            metrics.tcp_connections_open.clone(),
        );
        registry.register(
            "intercepted_connections",
            "Connections taken by the intercepting outbound listener, by service, destination kind and protocol detected",
            metrics.intercepted.clone(),
        );
        registry.register(
            "config_age_seconds",
            "How old the config may be: 0 while the config stream is up, else seconds since the control plane was last heard from \
             (or since the state file was written, for a config from --state-dir); +Inf with no config",
            metrics.config_age_seconds.clone(),
        );
        registry.register(
            "config_from_state_dir",
            "1 while the config held was restored from --state-dir and the control plane has not answered since",
            metrics.config_from_state_dir.clone(),
        );
        registry.register(
            "state_writes",
            "Writes of the config to --state-dir, by whether they succeeded",
            metrics.state_writes.clone(),
        );
        registry.register("retries", "Outbound retries sent, by destination service and why", metrics.retries.clone());
        registry.register(
            "retries_refused",
            "Outbound retries the destination's retry budget refused (the last attempt's answer was returned)",
            metrics.retries_refused.clone(),
        );
        registry.register(
            "requests_shed",
            "Outbound requests failed at once with 503 overloaded: the destination's circuit breaker was full",
            metrics.requests_shed.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Outbound requests holding a slot of the destination's circuit breaker: dispatched, body not ended",
            metrics.requests_in_flight.clone(),
        );
        registry.register(
            "identity_cert_expiration_timestamp_seconds",
            "When the sidecar's workload certificate expires (Unix time); 0 before the first",
            metrics.identity_expiration.clone(),
        );
        registry.register(
            "inbound_authz",
            "Authorization decisions on inbound requests and connections, by decision, service and calling service",
            metrics.inbound_authz.clone(),
        );
        registry.register(
            "inbound_refused",
            "Inbound connections refused before any request, by reason: plaintext (strict mTLS), handshake, timeout, own_port (intercepted, to one of the sidecar's own ports)",
            metrics.inbound_refused.clone(),
        );
        metrics
    }

    /// The request metrics of `service` in `direction`, to be kept by whoever counts its
    /// requests (a destination's stack, the inbound proxy) so that counting looks nothing up.
    pub fn service(&self, direction: &'static str, service: Arc<str>) -> ServiceMetrics {
        let duration = self.request_duration.get_or_create(&DirectionLabels { direction, service: service.clone() }).clone();
        let traffic = self.traffic.counters(direction, &service);
        ServiceMetrics {
            inner: Arc::new(ServiceHandles {
                requests: self.requests.clone(),
                direction,
                service,
                duration,
                traffic,
                counters: ArcSwap::default(),
            }),
        }
    }

    /// Metrics registered nowhere, for tests.
    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_into_their_own_metrics_and_series() {
        let (a, b) = (Metrics::unregistered(), Metrics::unregistered());
        let (service, route): (Arc<str>, Arc<str>) = ("catalog".into(), "default".into());
        let elapsed = std::time::Duration::from_millis(1);
        let (a_catalog, b_catalog) = (a.service("outbound", service.clone()), b.service("outbound", service.clone()));
        for _ in 0..3 {
            a_catalog.record(&route, "2xx", elapsed);
        }
        b_catalog.record(&route, "2xx", elapsed);
        // The same labels in other allocations are the same series.
        a_catalog.record(&"default".into(), "2xx", elapsed);
        a.service("outbound", "catalog".into()).record(&route, "2xx", elapsed);
        a_catalog.record(&route, "5xx", elapsed);
        let count = |metrics: &Metrics, status| {
            let labels = RequestLabels { direction: "outbound", service: service.clone(), route: route.clone(), status };
            metrics.requests.get_or_create(&labels).get()
        };
        assert_eq!((count(&a, "2xx"), count(&a, "5xx"), count(&b, "2xx")), (5, 1, 1));
    }
}
