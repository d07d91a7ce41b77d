//! The benchmark's figures: what one run measured ([`Report`]), how each is computed from what
//! the sidecars applied ([`figures`]), and how they are shown ([`show`]: a table for people,
//! JSON for the suite's driver).

mod figures;
mod show;

use std::time::Duration;

pub use self::figures::{Since, api_calls, bytes_per_change, first_and_fan_out, first_config, propagation, watch_timing};
use super::scrape::Recorded;

/// A registry change made during the propagation phase.
#[derive(Debug, Clone, Copy)]
pub struct ChangeRecord {
    pub service: usize,
    /// Just before the API call, since the board's epoch.
    pub started: Duration,
    /// When the API call returned (the replica that took it had applied the change).
    pub returned: Duration,
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
    pub topology: Topology,
    pub first_config: FirstConfig,
    /// From just before each API call.
    pub propagation: Propagation,
    /// From each API call's return.
    pub after_return: Propagation,
    /// How long the API calls that made the changes took.
    pub api_call: Latency,
    pub bytes: BytesPerChange,
    /// Every replica's together.
    pub memory: Memory,
    /// Every replica's together.
    pub cpu: Cpu,
    pub replicas: Vec<ReplicaFigures>,
    /// Empty without etcd.
    pub etcd: Vec<EtcdFigures>,
    /// When the benchmark's own watch on etcd saw each change, against its API call.
    pub etcd_watch: Option<WatchTiming>,
    pub context: Context,
}

/// What ran: one control plane on the in-memory store, or replicas on an etcd of some members.
#[derive(Debug, Clone, Copy)]
pub struct Topology {
    pub etcd_members: Option<usize>,
    pub replicas: usize,
}

/// One replica's share: its sidecars, its memory and CPU, and the propagation to its sidecars.
#[derive(Debug, Clone)]
pub struct ReplicaFigures {
    pub name: String,
    pub sidecars: usize,
    pub memory: Memory,
    pub cpu: Cpu,
    /// From each API call's return to the sidecars on this replica.
    pub after_return: Propagation,
    /// Over changes: from the API call's return to the first sidecar on this replica having
    /// it (the store's watch, the replica applying it, one push; negative when it was before
    /// the answer reached the benchmark), ...
    pub first_ack: Latency,
    /// ... and from that first sidecar to the last one on this replica (the push's fan-out).
    pub fan_out: Latency,
    /// During the changes, from its own metrics: from the change applied here to the push
    /// sent (`ferry_push_propagation_seconds`), and from the push sent to its ACK
    /// (`ferry_push_ack_seconds`).
    pub push_sent: Option<Recorded>,
    pub push_acked: Option<Recorded>,
}

/// One etcd member's memory at the end and CPU in each phase.
#[derive(Debug, Clone)]
pub struct EtcdFigures {
    pub name: String,
    pub rss_bytes: u64,
    pub first_config_cpu_seconds: f64,
    pub idle_cpu_seconds: f64,
    pub propagation_cpu_seconds: f64,
    /// During the changes, from its metrics: WAL fsyncs and backend commits, and how many
    /// revisions (write transactions), puts and deletes it made.
    pub wal_fsync: Option<Recorded>,
    pub backend_commit: Option<Recorded>,
    pub revisions: f64,
    pub puts: f64,
    pub deletes: f64,
    /// Bytes of the values put, and the growth of its database file, during the changes.
    pub put_bytes: f64,
    pub db_growth_bytes: f64,
}

/// Each change's API call against a watch of etcd like the replicas' own.
#[derive(Debug, Clone, Copy)]
pub struct WatchTiming {
    /// Changes the watch saw.
    pub seen: usize,
    /// From just before the API call to the change reaching the watch: the replica's write to
    /// etcd, its commit and its delivery to watchers.
    pub to_watch: Latency,
    /// From the watch to the API call's return: the writing replica's own watch and apply, and
    /// its answer.
    pub to_return: Latency,
}

/// A distribution in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
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
    /// Over changes, the time until the last of its sidecars had applied and ACKed it.
    pub slowest_sidecar_p50_ms: f64,
    pub slowest_sidecar_p99_ms: f64,
    pub slowest_sidecar_max_ms: f64,
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
    /// A quiet window after the first config: every sidecar connected, nothing changing.
    pub idle_cpu_seconds: f64,
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
    pub idle_window_seconds: f64,
    /// How long the propagation phase lasted, waits between changes included.
    pub propagation_seconds: f64,
    pub nacks: usize,
    /// CPU the benchmark itself used: it shares the machine with the control plane.
    pub bench_cpu_seconds: f64,
}

impl Memory {
    /// The growth of the RSS over the sidecars, per sidecar.
    pub fn per_sidecar(&self, sidecars: usize) -> f64 {
        (self.rss_with_sidecars_bytes as f64 - self.rss_endpoints_only_bytes as f64) / sidecars.max(1) as f64
    }
}

impl Cpu {
    /// CPU per sidecar to connect and be configured (TLS handshake, Hello, first push), in ms.
    pub fn connect_ms_per_sidecar(&self, sidecars: usize) -> f64 {
        self.first_config_cpu_seconds * 1000.0 / sidecars.max(1) as f64
    }

    /// The share of one core that 1,000 connected sidecars keep busy while nothing changes
    /// (keepalives, timers, status records), in percent.
    pub fn idle_percent_per_1000(&self, sidecars: usize, window_seconds: f64) -> f64 {
        self.idle_cpu_seconds / window_seconds.max(f64::EPSILON) * 100.0 * 1000.0 / sidecars.max(1) as f64
    }

    /// The share of one core used during the propagation phase, in percent.
    pub fn propagation_percent(&self, seconds: f64) -> f64 {
        self.propagation_cpu_seconds / seconds.max(f64::EPSILON) * 100.0
    }
}

impl Report {
    /// Control-plane memory per connected sidecar: the growth of its RSS over the sidecars.
    pub fn bytes_per_sidecar(&self) -> f64 {
        self.memory.per_sidecar(self.sidecars)
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
}
