//! The live traffic figures: what the sidecars report every few seconds over their config
//! streams (`TrafficReport`), merged into a one-minute window per edge (caller → destination,
//! from the caller's outbound counts) and per service inbound (from the destination's own
//! sidecars), and read as rates by `GET /v1/traffic`, the `Traffic` RPC and `ferryctl top`.
//!
//! The window is [`SLOTS`] slots of [`SLOT`] each; a report is added to the slot of the time it
//! arrived, and a slot older than the window is dropped whole, so memory holds at most
//! `SLOTS × MAX_KEYS` figures. Rates divide by the time the kept slots cover, from the start of
//! the oldest to now (at least one slot, at most the window): a control plane that started 10 s
//! ago does not spread 10 s of requests over a minute.
//!
//! Percentiles come from the merged latency histogram, interpolated linearly within the bucket
//! the rank falls in (from the previous bound to the bucket's own); a rank past the last bound
//! reads as the last bound.
//!
//! Each replica sees only the sidecars connected to it: with replicas sharing a store, its
//! figures are those of its own sidecars.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_proto::{
    traffic::{LATENCY_BUCKETS_MS, LATENCY_COUNTS},
    v1,
};
use tokio::time::Instant;

/// How much time one slot of the window covers.
pub const SLOT: Duration = Duration::from_secs(5);
/// How many slots the window keeps: a minute.
pub const SLOTS: u64 = 12;
/// The most edges and inbound services one slot holds; reports past it are dropped (and
/// counted in the log at debug), so a flood of names cannot grow memory without bound.
pub const MAX_KEYS: usize = 10_000;

/// The window of every sidecar's reports. Shared by the config streams that add reports and
/// the API that reads them.
#[derive(Debug)]
pub struct Traffic {
    origin: Instant,
    slots: Mutex<VecDeque<Slot>>,
}

/// What one slot holds.
#[derive(Debug)]
struct Slot {
    /// The slot's number: whole [`SLOT`]s since the origin.
    number: u64,
    figures: HashMap<Key, Figures>,
}

/// Whose figures: an edge, or the inbound requests of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Edge { from: Arc<str>, to: Arc<str> },
    Inbound(Arc<str>),
}

/// Merged counts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Figures {
    requests: u64,
    failures: u64,
    latency: [u64; LATENCY_COUNTS],
}

impl Default for Figures {
    fn default() -> Self {
        Self { requests: 0, failures: 0, latency: [0; LATENCY_COUNTS] }
    }
}

impl Figures {
    fn add(&mut self, other: &v1::TrafficFigures) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        for (sum, count) in self.latency.iter_mut().zip(&other.latency_counts) {
            *sum = sum.saturating_add(*count);
        }
    }

    fn merge(&mut self, other: &Figures) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        for (sum, count) in self.latency.iter_mut().zip(&other.latency) {
            *sum = sum.saturating_add(*count);
        }
    }

    /// The latency at quantile `q` (0..=1), in milliseconds; 0 without requests.
    fn percentile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        for (i, &count) in self.latency.iter().enumerate() {
            if count > 0 && (below + count) as f64 >= rank {
                let Some(&upper) = LATENCY_BUCKETS_MS.get(i) else {
                    break;
                };
                let lower = if i == 0 { 0 } else { LATENCY_BUCKETS_MS[i - 1] };
                let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
                return lower as f64 + within * (upper - lower) as f64;
            }
            below += count;
        }
        LATENCY_BUCKETS_MS[LATENCY_BUCKETS_MS.len() - 1] as f64
    }

    fn rates(&self, seconds: f64) -> v1::TrafficRates {
        v1::TrafficRates {
            rps: self.requests as f64 / seconds,
            success_rate: if self.requests == 0 { 1.0 } else { 1.0 - self.failures as f64 / self.requests as f64 },
            p50_ms: self.percentile_ms(0.5),
            p99_ms: self.percentile_ms(0.99),
        }
    }
}

impl Default for Traffic {
    fn default() -> Self {
        Self { origin: Instant::now(), slots: Mutex::default() }
    }
}

impl Traffic {
    /// Adds the report of a sidecar of service `from`. The report was validated.
    pub fn record(&self, from: &Arc<str>, report: &v1::TrafficReport) {
        let now = self.slot_number(Instant::now());
        let mut slots = ferry_runtime::lock(&self.slots);
        Self::expire(&mut slots, now);
        if slots.back().is_none_or(|slot| slot.number != now) {
            slots.push_back(Slot { number: now, figures: HashMap::new() });
        }
        let Some(slot) = slots.back_mut() else { return };
        let mut add = |key: Key, figures: &v1::TrafficFigures| {
            if figures.requests == 0 {
                return;
            }
            let held = slot.figures.len();
            match slot.figures.get_mut(&key) {
                Some(sum) => sum.add(figures),
                None if held < MAX_KEYS => slot.figures.entry(key).or_default().add(figures),
                None => tracing::debug!(?key, "traffic window full: figures dropped"),
            }
        };
        for figures in &report.outbound {
            add(Key::Edge { from: from.clone(), to: Arc::from(figures.service.as_str()) }, figures);
        }
        if let Some(inbound) = &report.inbound {
            // The inbound listener counts the sidecar's own service, whatever the report names.
            add(Key::Inbound(from.clone()), inbound);
        }
    }

    /// The rates over the window as it is now.
    pub fn snapshot(&self) -> v1::TrafficResponse {
        let now = Instant::now();
        let current = self.slot_number(now);
        let mut merged: BTreeMap<Key, Figures> = BTreeMap::new();
        let oldest = {
            let mut slots = ferry_runtime::lock(&self.slots);
            Self::expire(&mut slots, current);
            for slot in slots.iter() {
                for (key, figures) in &slot.figures {
                    merged.entry(key.clone()).or_default().merge(figures);
                }
            }
            slots.front().map(|slot| slot.number)
        };
        let window = SLOT * SLOTS as u32;
        let covered = oldest.map_or(SLOT, |number| now.saturating_duration_since(self.origin + SLOT * number as u32));
        let seconds = covered.clamp(SLOT, window).as_secs_f64();

        let mut services: BTreeMap<String, v1::ServiceTraffic> = BTreeMap::new();
        let mut outbound: BTreeMap<Arc<str>, Figures> = BTreeMap::new();
        let mut edges = Vec::new();
        for (key, figures) in &merged {
            match key {
                Key::Edge { from, to } => {
                    outbound.entry(from.clone()).or_default().merge(figures);
                    let rates = figures.rates(seconds);
                    edges.push(v1::TrafficEdge {
                        from: from.to_string(),
                        to: to.to_string(),
                        rps: rates.rps,
                        success_rate: rates.success_rate,
                        p50_ms: rates.p50_ms,
                        p99_ms: rates.p99_ms,
                    });
                }
                Key::Inbound(service) => {
                    services.entry(service.to_string()).or_default().inbound = Some(figures.rates(seconds));
                }
            }
        }
        for (service, figures) in outbound {
            services.entry(service.to_string()).or_default().outbound = Some(figures.rates(seconds));
        }
        v1::TrafficResponse { window_seconds: window.as_secs() as u32, services, edges }
    }

    fn slot_number(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.origin).as_millis() / SLOT.as_millis()) as u64
    }

    /// Drops the slots that fell out of the window ending with slot `now`.
    fn expire(slots: &mut VecDeque<Slot>, now: u64) {
        while slots.front().is_some_and(|slot| slot.number + SLOTS <= now) {
            slots.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(service: &str, requests: u64, failures: u64, bucket_ms: u64) -> v1::TrafficFigures {
        let mut latency_counts = vec![0; LATENCY_COUNTS];
        latency_counts[LATENCY_BUCKETS_MS.iter().position(|&b| b == bucket_ms).expect("a bound")] = requests;
        v1::TrafficFigures { service: service.into(), requests, failures, latency_counts }
    }

    #[test]
    fn percentiles_interpolate_within_the_bucket_the_rank_falls_in() {
        let mut merged = Figures::default();
        // 100 requests: 50 within 0..=1 ms, 50 within 5..=10 ms.
        merged.add(&figures("a", 50, 0, 1));
        merged.add(&figures("a", 50, 0, 10));
        assert!((merged.percentile_ms(0.5) - 1.0).abs() < 1e-9, "{}", merged.percentile_ms(0.5));
        assert!((merged.percentile_ms(0.99) - 9.9).abs() < 1e-9, "{}", merged.percentile_ms(0.99));
        assert!((merged.percentile_ms(0.25) - 0.5).abs() < 1e-9);

        let mut slow = Figures::default();
        slow.latency[LATENCY_COUNTS - 1] = 3;
        assert_eq!(slow.percentile_ms(0.99), 30_000.0, "past the last bound reads as the last bound");
        assert_eq!(Figures::default().percentile_ms(0.5), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn reports_make_edges_and_inbound_figures_and_leave_the_window_after_a_minute() {
        let traffic = Traffic::default();
        let frontend: Arc<str> = Arc::from("frontend");
        let catalog: Arc<str> = Arc::from("catalog");
        let report = v1::TrafficReport { interval_ms: 5000, outbound: vec![figures("catalog", 10, 1, 5)], inbound: None };
        traffic.record(&frontend, &report);
        let inbound = v1::TrafficReport { interval_ms: 5000, outbound: vec![], inbound: Some(figures("catalog", 10, 0, 2)) };
        traffic.record(&catalog, &inbound);
        tokio::time::advance(Duration::from_secs(10)).await;
        traffic.record(&frontend, &report);

        let snapshot = traffic.snapshot();
        assert_eq!(snapshot.window_seconds, 60);
        let [edge] = snapshot.edges.as_slice() else { panic!("one edge: {snapshot:?}") };
        assert_eq!((edge.from.as_str(), edge.to.as_str()), ("frontend", "catalog"));
        assert!((edge.rps - 2.0).abs() < 1e-9, "20 requests over the 10 s covered: {}", edge.rps);
        assert!((edge.success_rate - 0.9).abs() < 1e-9);
        assert_eq!(snapshot.services["frontend"].outbound.as_ref().map(|r| r.rps), Some(edge.rps));
        assert!(snapshot.services["frontend"].inbound.is_none());
        let catalog_in = snapshot.services["catalog"].inbound.expect("inbound figures");
        assert!((catalog_in.success_rate - 1.0).abs() < 1e-9);

        tokio::time::advance(Duration::from_secs(50)).await;
        let later = traffic.snapshot();
        assert_eq!(later.edges.len(), 1, "the second report is still in the window");
        assert!((later.edges[0].rps - 10.0 / 50.0).abs() < 1e-9, "its slot began 50 s ago: {}", later.edges[0].rps);
        assert!(!later.services.contains_key("catalog"), "the first slot expired");

        tokio::time::advance(Duration::from_secs(10)).await;
        let empty = traffic.snapshot();
        assert!(empty.edges.is_empty() && empty.services.is_empty(), "{empty:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_holds_a_bounded_number_of_edges() {
        let traffic = Traffic::default();
        let from: Arc<str> = Arc::from("a");
        for chunk in 0..(MAX_KEYS / 1000 + 1) {
            let outbound = (0..1000).map(|i| figures(&format!("s{chunk}-{i}"), 1, 0, 1)).collect();
            traffic.record(&from, &v1::TrafficReport { interval_ms: 5000, outbound, inbound: None });
        }
        assert_eq!(traffic.snapshot().edges.len(), MAX_KEYS);
    }
}
