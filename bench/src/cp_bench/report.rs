//! The benchmark's figures: how they are computed from what the sidecars applied, and how they
//! are shown (a table for people, JSON for the suite's driver).

use std::{collections::HashMap, time::Duration};

use serde_json::json;

use super::sidecar::{Applied, BoardState, Carried};

/// A registry change made during the propagation phase.
#[derive(Debug, Clone, Copy)]
pub struct ChangeRecord {
    pub service: usize,
    /// Just before the API call, since the board's epoch.
    pub started: Duration,
    /// The service's version once the change was made.
    pub version: u64,
}

/// Every figure of one run.
#[derive(Debug, Clone)]
pub struct Report {
    pub sidecars: usize,
    pub services: usize,
    pub endpoints: usize,
    pub subscriptions_per_sidecar: usize,
    pub first_config: FirstConfig,
    pub propagation: Propagation,
    pub bytes: BytesPerChange,
    pub memory: Memory,
    pub cpu: Cpu,
    pub context: Context,
}

/// Time until each sidecar held all its subscriptions, all connecting at once.
#[derive(Debug, Clone)]
pub struct FirstConfig {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub all_configured_ms: f64,
    /// The part of it spent connecting: until the stream was open and the Welcome came.
    pub welcome_p50_ms: f64,
    pub welcome_p99_ms: f64,
    /// Attempts to open a stream that failed (the control plane refused or reset the
    /// connection) and were retried after the real sidecar's backoff.
    pub connect_retries: usize,
}

/// Time from a registry change to each sidecar subscribed to the service having applied it.
#[derive(Debug, Clone)]
pub struct Propagation {
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The p99 over changes of the slowest sidecar of each.
    pub slowest_sidecar_p99_ms: f64,
    /// (change, sidecar) pairs measured, and those that never saw their change.
    pub pairs: usize,
    pub missed: usize,
}

/// What a one-endpoint change costs each affected sidecar, next to a full snapshot.
#[derive(Debug, Clone)]
pub struct BytesPerChange {
    /// Median size of the push that brought a change to a sidecar.
    pub delta_bytes: f64,
    /// Median size of a push carrying a full snapshot of one service.
    pub snapshot_bytes: f64,
    pub service_endpoints: usize,
    /// How the pushes that brought changes carried the endpoints.
    pub delta_pushes: usize,
    pub snapshot_pushes: usize,
}

/// The control plane's resident memory.
#[derive(Debug, Clone)]
pub struct Memory {
    pub rss_endpoints_only_bytes: u64,
    pub rss_with_sidecars_bytes: u64,
}

/// The control plane's CPU time.
#[derive(Debug, Clone)]
pub struct Cpu {
    pub first_config_cpu_seconds: f64,
    /// The whole propagation phase, the waits between changes included.
    pub propagation_cpu_seconds: f64,
    /// Only from each change's API call until its last sidecar applied it, summed.
    pub changes_active_cpu_seconds: f64,
}

/// How the run went, to read the figures by.
#[derive(Debug, Clone)]
pub struct Context {
    pub control_plane_binary: String,
    pub registration_seconds: f64,
    pub change_interval_ms: f64,
    pub nacks: usize,
    /// CPU the benchmark itself used: it shares the machine with the control plane.
    pub bench_cpu_seconds: f64,
}

/// The `p`-quantile (0..=1) of sorted values, nearest rank; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The first-config figures of sidecars that all started at `start` and were all seen
/// configured at `all_configured`.
pub fn first_config(board: &BoardState, start: Duration, all_configured: Duration) -> FirstConfig {
    let since_start =
        |times: &[Option<Duration>]| sorted(times.iter().flatten().map(|at| ms(at.saturating_sub(start))).collect());
    let times = since_start(&board.configured_at);
    let welcomes = since_start(&board.welcomed_at);
    FirstConfig {
        p50_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
        max_ms: times.last().copied().unwrap_or(f64::NAN),
        all_configured_ms: ms(all_configured.saturating_sub(start)),
        welcome_p50_ms: percentile(&welcomes, 0.5),
        welcome_p99_ms: percentile(&welcomes, 0.99),
        connect_retries: board.connect_retries,
    }
}

/// The propagation and bytes figures: for each change and each sidecar subscribed to its service
/// (`subscribers[service]`, with its subscription slot), the first push applied there that holds the change's version.
/// Snapshot sizes come from the pushes applied before `changes_began`.
pub fn propagation(
    board: &BoardState,
    changes: &[ChangeRecord],
    subscribers: &[Vec<(usize, usize)>],
    changes_began: Duration,
) -> (Propagation, BytesPerChange) {
    let mut by_stream: HashMap<(u32, u32), Vec<&Applied>> = HashMap::new();
    for applied in &board.applied {
        by_stream.entry((applied.sidecar, applied.service)).or_default().push(applied);
    }
    for stream in by_stream.values_mut() {
        stream.sort_by_key(|a| a.at);
    }
    let (mut latencies, mut slowest, mut push_bytes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut missed, mut delta_pushes, mut snapshot_pushes) = (0, 0, 0);
    for change in changes {
        let mut slowest_here: Option<f64> = None;
        for &(sidecar, _) in &subscribers[change.service] {
            let stream = by_stream.get(&(sidecar as u32, change.service as u32));
            let Some(applied) = stream.and_then(|s| s.iter().find(|a| a.version >= change.version)) else {
                missed += 1;
                continue;
            };
            let latency = ms(applied.at.saturating_sub(change.started));
            latencies.push(latency);
            slowest_here = Some(slowest_here.map_or(latency, |s| s.max(latency)));
            push_bytes.push(f64::from(applied.push_bytes));
            match applied.carried {
                Carried::Delta => delta_pushes += 1,
                Carried::Snapshot => snapshot_pushes += 1,
                Carried::Absent => {}
            }
        }
        slowest.extend(slowest_here);
    }
    let latencies = sorted(latencies);
    let slowest = sorted(slowest);
    let snapshots: Vec<&Applied> =
        board.applied.iter().filter(|a| a.at < changes_began && a.carried == Carried::Snapshot).collect();
    let snapshot_bytes = sorted(snapshots.iter().map(|a| f64::from(a.alone_bytes)).collect());
    let mut endpoints: Vec<u32> = snapshots.iter().map(|a| a.endpoints).collect();
    endpoints.sort_unstable();
    let propagation = Propagation {
        changes: changes.len(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        slowest_sidecar_p99_ms: percentile(&slowest, 0.99),
        pairs: latencies.len() + missed,
        missed,
    };
    let bytes = BytesPerChange {
        delta_bytes: percentile(&sorted(push_bytes), 0.5),
        snapshot_bytes: percentile(&snapshot_bytes, 0.5),
        service_endpoints: endpoints.get(endpoints.len() / 2).copied().unwrap_or_default() as usize,
        delta_pushes,
        snapshot_pushes,
    };
    (propagation, bytes)
}

/// Rounds to microseconds (of milliseconds) or to thousandths, for JSON that people read too.
fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

impl Report {
    /// Control-plane memory per connected sidecar: the growth of its RSS over the sidecars.
    pub fn bytes_per_sidecar(&self) -> f64 {
        let growth = self.memory.rss_with_sidecars_bytes as f64 - self.memory.rss_endpoints_only_bytes as f64;
        growth / self.sidecars.max(1) as f64
    }

    /// Control-plane CPU per registry change during the propagation phase.
    pub fn cpu_ms_per_change(&self) -> f64 {
        self.cpu.propagation_cpu_seconds * 1000.0 / self.propagation.changes.max(1) as f64
    }

    /// Control-plane CPU per registry change while it was being pushed, without the waits
    /// between changes (keepalives and timers of every connected sidecar).
    pub fn active_cpu_ms_per_change(&self) -> f64 {
        self.cpu.changes_active_cpu_seconds * 1000.0 / self.propagation.changes.max(1) as f64
    }

    /// The ratio of a change's push to a full snapshot of the service.
    pub fn bytes_ratio(&self) -> f64 {
        self.bytes.delta_bytes / self.bytes.snapshot_bytes
    }

    /// The JSON the benchmark suite reads.
    pub fn to_json(&self) -> serde_json::Value {
        let (f, p, b, m, c, x) = (&self.first_config, &self.propagation, &self.bytes, &self.memory, &self.cpu, &self.context);
        json!({
            "sidecars": self.sidecars,
            "services": self.services,
            "endpoints": self.endpoints,
            "subscriptions_per_sidecar": self.subscriptions_per_sidecar,
            "first_config": {
                "p50_ms": round(f.p50_ms),
                "p99_ms": round(f.p99_ms),
                "max_ms": round(f.max_ms),
                "all_configured_ms": round(f.all_configured_ms),
                "welcome_p50_ms": round(f.welcome_p50_ms),
                "welcome_p99_ms": round(f.welcome_p99_ms),
                "connect_retries": f.connect_retries,
            },
            "propagation": {
                "changes": p.changes,
                "p50_ms": round(p.p50_ms),
                "p99_ms": round(p.p99_ms),
                "max_ms": round(p.max_ms),
                "slowest_sidecar_p99_ms": round(p.slowest_sidecar_p99_ms),
                "pairs": p.pairs,
                "missed": p.missed,
            },
            "bytes_per_change": {
                "delta_bytes": round(b.delta_bytes),
                "snapshot_bytes": round(b.snapshot_bytes),
                "service_endpoints": b.service_endpoints,
                "ratio": round(self.bytes_ratio() * 1000.0) / 1000.0,
                "delta_pushes": b.delta_pushes,
                "snapshot_pushes": b.snapshot_pushes,
            },
            "memory": {
                "rss_endpoints_only_bytes": m.rss_endpoints_only_bytes,
                "rss_with_sidecars_bytes": m.rss_with_sidecars_bytes,
                "bytes_per_sidecar": self.bytes_per_sidecar().round(),
            },
            "cpu": {
                "first_config_cpu_seconds": round(c.first_config_cpu_seconds),
                "propagation_cpu_seconds": round(c.propagation_cpu_seconds),
                "cpu_ms_per_change": round(self.cpu_ms_per_change()),
                "active_cpu_ms_per_change": round(self.active_cpu_ms_per_change()),
            },
            "context": {
                "control_plane_binary": x.control_plane_binary,
                "registration_seconds": round(x.registration_seconds),
                "change_interval_ms": round(x.change_interval_ms),
                "nacks": x.nacks,
                "bench_cpu_seconds": round(x.bench_cpu_seconds),
            },
        })
    }

    /// The figures as a table for people.
    pub fn table(&self) -> String {
        let (f, p, b, m, c) = (&self.first_config, &self.propagation, &self.bytes, &self.memory, &self.cpu);
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let mut lines = vec![
            format!(
                "ferry-cp-bench: {} sidecars, {} services, {} endpoints, {} subscriptions per sidecar",
                self.sidecars, self.services, self.endpoints, self.subscriptions_per_sidecar
            ),
            format!(
                "  first config      p50 {:>9.1} ms   p99 {:>9.1} ms   max {:>9.1} ms   all configured {:.1} ms (welcome p50 {:.1} ms, p99 {:.1} ms)",
                f.p50_ms, f.p99_ms, f.max_ms, f.all_configured_ms, f.welcome_p50_ms, f.welcome_p99_ms
            ),
            format!(
                "  propagation       p50 {:>9.1} ms   p99 {:>9.1} ms   max {:>9.1} ms   slowest sidecar p99 {:.1} ms ({} changes, {} pairs, {} missed)",
                p.p50_ms, p.p99_ms, p.max_ms, p.slowest_sidecar_p99_ms, p.changes, p.pairs, p.missed
            ),
            format!(
                "  bytes per change  push {:>8.0} B    snapshot {:>8.0} B ({} endpoints)   ratio {:.4}   ({} delta, {} snapshot pushes)",
                b.delta_bytes,
                b.snapshot_bytes,
                b.service_endpoints,
                self.bytes_ratio(),
                b.delta_pushes,
                b.snapshot_pushes
            ),
            format!(
                "  memory            endpoints only {:.1} MiB   with sidecars {:.1} MiB   per sidecar {:.1} KiB",
                mib(m.rss_endpoints_only_bytes),
                mib(m.rss_with_sidecars_bytes),
                self.bytes_per_sidecar() / 1024.0
            ),
            format!(
                "  cpu               first config {:.2} s   propagation {:.2} s   per change {:.2} ms ({:.2} ms while pushing)",
                c.first_config_cpu_seconds,
                c.propagation_cpu_seconds,
                self.cpu_ms_per_change(),
                self.active_cpu_ms_per_change()
            ),
        ];
        if f.connect_retries > 0 {
            lines.push(format!("  note: {} attempts to open a stream failed and were retried with backoff", f.connect_retries));
        }
        if b.snapshot_pushes > 0 {
            lines.push(format!("  note: {} changes reached a sidecar as a full snapshot, not a delta", b.snapshot_pushes));
        }
        if self.context.nacks > 0 {
            lines.push(format!("  note: the simulated sidecars rejected {} pushes", self.context.nacks));
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
