//! The traffic figures the sidecar reports to the control plane (`TrafficReport`): per
//! destination service and for its own inbound requests, a count, the failures and a latency
//! histogram in the protocol's fixed buckets ([`ferry_proto::traffic::LATENCY_BUCKETS_MS`]).
//!
//! Counting is a few relaxed atomic additions on counters that [`ServiceMetrics`] found once;
//! the control stream takes the deltas every few seconds. A request counted while the deltas are
//! taken may land in one report's count and the next one's histogram: the figures are
//! statistics, and a report's failures are capped at its requests.
//!
//! [`ServiceMetrics`]: super::ServiceMetrics

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ferry_proto::{
    traffic::{LATENCY_COUNTS, MAX_OUTBOUND, bucket},
    v1, validate,
};

/// The counts of one service in one direction since the last report.
#[derive(Debug)]
pub struct TrafficCounters {
    requests: AtomicU64,
    failures: AtomicU64,
    latency: [AtomicU64; LATENCY_COUNTS],
}

impl TrafficCounters {
    fn new() -> Self {
        Self { requests: AtomicU64::new(0), failures: AtomicU64::new(0), latency: std::array::from_fn(|_| AtomicU64::new(0)) }
    }

    /// Counts one request.
    pub fn count(&self, failed: bool, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.latency[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts since the last take, which start again from zero; `None` without requests.
    fn take(&self, service: &str) -> Option<v1::TrafficFigures> {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        if requests == 0 {
            return None;
        }
        let failures = self.failures.swap(0, Ordering::Relaxed).min(requests);
        let latency_counts = self.latency.iter().map(|count| count.swap(0, Ordering::Relaxed)).collect();
        Some(v1::TrafficFigures { service: service.to_owned(), requests, failures, latency_counts })
    }
}

/// Every service's traffic counters. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TrafficTally {
    inner: Arc<Mutex<Tallies>>,
}

#[derive(Debug, Default)]
struct Tallies {
    outbound: HashMap<Arc<str>, Arc<TrafficCounters>>,
    inbound: Option<(Arc<str>, Arc<TrafficCounters>)>,
}

impl TrafficTally {
    /// The counters of `service` in `direction` (`inbound` or `outbound`), found once by whoever
    /// counts its requests. `None` for what is not reported: a name that is no service name
    /// (requests that named no service), destinations past [`MAX_OUTBOUND`].
    pub fn counters(&self, direction: &str, service: &Arc<str>) -> Option<Arc<TrafficCounters>> {
        validate::service_name("service", service).ok()?;
        let mut tallies = ferry_runtime::lock(&self.inner);
        if direction == "inbound" {
            let (_, counters) = tallies.inbound.get_or_insert_with(|| (service.clone(), Arc::new(TrafficCounters::new())));
            return Some(counters.clone());
        }
        if let Some(counters) = tallies.outbound.get(service) {
            return Some(counters.clone());
        }
        if tallies.outbound.len() >= MAX_OUTBOUND {
            return None;
        }
        let counters = Arc::new(TrafficCounters::new());
        tallies.outbound.insert(service.clone(), counters.clone());
        Some(counters)
    }

    /// What happened since the last take, as a report covering `interval`; `None` when nothing
    /// did.
    pub fn take(&self, interval: Duration) -> Option<v1::TrafficReport> {
        let tallies = ferry_runtime::lock(&self.inner);
        let outbound: Vec<_> = tallies.outbound.iter().filter_map(|(service, counters)| counters.take(service)).collect();
        let inbound = tallies.inbound.as_ref().and_then(|(service, counters)| counters.take(service));
        drop(tallies);
        if outbound.is_empty() && inbound.is_none() {
            return None;
        }
        // Within what the control plane accepts, whatever --traffic-report-interval says.
        let interval = interval.clamp(Duration::from_millis(1), validate::MAX_TRAFFIC_INTERVAL);
        let interval_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        Some(v1::TrafficReport { interval_ms, outbound, inbound })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_carries_the_deltas_since_the_last_and_nothing_when_idle() {
        let tally = TrafficTally::default();
        let catalog = tally.counters("outbound", &Arc::from("catalog")).expect("a service");
        let inbound = tally.counters("inbound", &Arc::from("frontend")).expect("a service");
        assert!(tally.counters("outbound", &Arc::from("-")).is_none(), "no service named: not reported");
        assert!(Arc::ptr_eq(&catalog, &tally.counters("outbound", &Arc::from("catalog")).expect("the same")));

        catalog.count(false, Duration::from_millis(3));
        catalog.count(true, Duration::from_millis(40));
        inbound.count(false, Duration::from_micros(200));
        let report = tally.take(Duration::from_secs(5)).expect("something happened");
        assert_eq!(report.interval_ms, 5000);
        let [out] = report.outbound.as_slice() else { panic!("one destination: {report:?}") };
        assert_eq!((out.service.as_str(), out.requests, out.failures), ("catalog", 2, 1));
        assert_eq!(out.latency_counts[bucket(Duration::from_millis(3))], 1);
        assert_eq!(out.latency_counts[bucket(Duration::from_millis(40))], 1);
        assert_eq!(report.inbound.as_ref().map(|i| (i.service.as_str(), i.requests)), Some(("frontend", 1)));
        assert_eq!(validate::traffic_report(&report), Ok(()));

        assert_eq!(tally.take(Duration::from_secs(5)), None, "the deltas were taken");
        catalog.count(false, Duration::from_millis(1));
        let next = tally.take(Duration::from_secs(5)).expect("one more");
        assert_eq!((next.outbound[0].requests, next.outbound[0].failures), (1, 0));
        assert!(next.inbound.is_none(), "no inbound request since");
    }
}
