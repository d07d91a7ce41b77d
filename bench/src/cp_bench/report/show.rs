//! The figures shown: a table for people, JSON for the suite's driver.

use serde_json::json;

use super::{Latency, Propagation, Recorded, Report};

/// Rounds to microseconds (of milliseconds) or to thousandths, for JSON that people read too.
fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn propagation_json(p: &Propagation) -> serde_json::Value {
    json!({
        "changes": p.changes,
        "p50_ms": round(p.p50_ms),
        "p99_ms": round(p.p99_ms),
        "max_ms": round(p.max_ms),
        "slowest_sidecar_p50_ms": round(p.slowest_sidecar_p50_ms),
        "slowest_sidecar_p99_ms": round(p.slowest_sidecar_p99_ms),
        "slowest_sidecar_max_ms": round(p.slowest_sidecar_max_ms),
        "pairs": p.pairs,
        "missed": p.missed,
    })
}

fn latency_json(l: &Latency) -> serde_json::Value {
    json!({ "p50_ms": round(l.p50_ms), "p99_ms": round(l.p99_ms), "max_ms": round(l.max_ms) })
}

/// A histogram's quantiles are bucket bounds: `null` past the last one, and when it recorded
/// nothing.
fn recorded_json(r: Option<&Recorded>) -> serde_json::Value {
    let bound = |ms: f64| if ms.is_finite() { json!(round(ms)) } else { serde_json::Value::Null };
    match r {
        Some(r) => json!({ "count": r.count, "p50_ms_at_most": bound(r.p50_ms), "p99_ms_at_most": bound(r.p99_ms) }),
        None => serde_json::Value::Null,
    }
}

fn recorded_text(r: Option<&Recorded>) -> String {
    match r {
        Some(r) => format!("p50 ≤ {:.1} ms, p99 ≤ {:.1} ms ({:.0})", r.p50_ms, r.p99_ms, r.count),
        None => "not recorded".to_owned(),
    }
}

fn propagation_line(label: &str, p: &Propagation) -> String {
    format!(
        "  {label:<17} p50 {:>9.1} ms   p99 {:>9.1} ms   max {:>9.1} ms   last ACK of a change p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} changes, {} pairs, {} missed)",
        p.p50_ms,
        p.p99_ms,
        p.max_ms,
        p.slowest_sidecar_p50_ms,
        p.slowest_sidecar_p99_ms,
        p.slowest_sidecar_max_ms,
        p.changes,
        p.pairs,
        p.missed
    )
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Report {
    /// The JSON the benchmark suite reads.
    pub fn to_json(&self) -> serde_json::Value {
        let (f, b, m, c, x) = (&self.first_config, &self.bytes, &self.memory, &self.cpu, &self.context);
        let replicas: Vec<serde_json::Value> = self
            .replicas
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "sidecars": r.sidecars,
                    "rss_endpoints_only_bytes": r.memory.rss_endpoints_only_bytes,
                    "rss_with_sidecars_bytes": r.memory.rss_with_sidecars_bytes,
                    "bytes_per_sidecar": r.memory.per_sidecar(r.sidecars).round(),
                    "first_config_cpu_seconds": round(r.cpu.first_config_cpu_seconds),
                    "connect_cpu_ms_per_sidecar": round(r.cpu.connect_ms_per_sidecar(r.sidecars)),
                    "idle_cpu_seconds": round(r.cpu.idle_cpu_seconds),
                    "idle_core_percent_per_1000_sidecars": round(r.cpu.idle_percent_per_1000(r.sidecars, x.idle_window_seconds)),
                    "propagation_cpu_seconds": round(r.cpu.propagation_cpu_seconds),
                    "propagation_core_percent": round(r.cpu.propagation_percent(x.propagation_seconds)),
                    "propagation_after_return": propagation_json(&r.after_return),
                    "first_ack_after_return": latency_json(&r.first_ack),
                    "fan_out": latency_json(&r.fan_out),
                    "push_sent_after_applied": recorded_json(r.push_sent.as_ref()),
                    "push_acked_after_sent": recorded_json(r.push_acked.as_ref()),
                })
            })
            .collect();
        let etcd: Vec<serde_json::Value> = self
            .etcd
            .iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "rss_bytes": e.rss_bytes,
                    "first_config_cpu_seconds": round(e.first_config_cpu_seconds),
                    "idle_cpu_seconds": round(e.idle_cpu_seconds),
                    "propagation_cpu_seconds": round(e.propagation_cpu_seconds),
                    "wal_fsync": recorded_json(e.wal_fsync.as_ref()),
                    "backend_commit": recorded_json(e.backend_commit.as_ref()),
                    "revisions": e.revisions,
                    "puts": e.puts,
                    "deletes": e.deletes,
                    "put_bytes": e.put_bytes,
                    "db_growth_bytes": e.db_growth_bytes,
                })
            })
            .collect();
        json!({
            "sidecars": self.sidecars,
            "services": self.services,
            "endpoints": self.endpoints,
            "subscriptions_per_sidecar": self.subscriptions_per_sidecar,
            "topology": {
                "store": if self.topology.etcd_members.is_some() { "etcd" } else { "memory" },
                "etcd_members": self.topology.etcd_members,
                "replicas": self.topology.replicas,
            },
            "first_config": {
                "p50_ms": round(f.p50_ms),
                "p99_ms": round(f.p99_ms),
                "max_ms": round(f.max_ms),
                "all_configured_ms": round(f.all_configured_ms),
                "welcome_p50_ms": round(f.welcome_p50_ms),
                "welcome_p99_ms": round(f.welcome_p99_ms),
                "connect_retries": f.connect_retries,
            },
            "propagation": propagation_json(&self.propagation),
            "propagation_after_return": propagation_json(&self.after_return),
            "api_call": latency_json(&self.api_call),
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
                "idle_cpu_seconds": round(c.idle_cpu_seconds),
                "propagation_cpu_seconds": round(c.propagation_cpu_seconds),
                "cpu_ms_per_change": round(self.cpu_ms_per_change()),
                "active_cpu_ms_per_change": round(self.active_cpu_ms_per_change()),
            },
            "replicas": replicas,
            "etcd": etcd,
            "etcd_watch": self.etcd_watch.map(|w| json!({
                "seen": w.seen,
                "call_started_to_watch": latency_json(&w.to_watch),
                "watch_to_call_returned": latency_json(&w.to_return),
            })),
            "context": {
                "control_plane_binary": x.control_plane_binary,
                "registration_seconds": round(x.registration_seconds),
                "change_interval_ms": round(x.change_interval_ms),
                "idle_window_seconds": round(x.idle_window_seconds),
                "propagation_seconds": round(x.propagation_seconds),
                "nacks": x.nacks,
                "bench_cpu_seconds": round(x.bench_cpu_seconds),
            },
        })
    }

    /// The figures as a table for people.
    pub fn table(&self) -> String {
        let (f, b, m, c, x) = (&self.first_config, &self.bytes, &self.memory, &self.cpu, &self.context);
        let topology = match self.topology.etcd_members {
            None => "one control plane on the in-memory store".to_owned(),
            Some(members) => {
                format!("{} replica(s) on etcd ({members} member(s)), changes through the first", self.topology.replicas)
            }
        };
        let mut lines = vec![
            format!(
                "ferry-cp-bench: {} sidecars, {} services, {} endpoints, {} subscriptions per sidecar; {topology}",
                self.sidecars, self.services, self.endpoints, self.subscriptions_per_sidecar
            ),
            format!(
                "  first config      p50 {:>9.1} ms   p99 {:>9.1} ms   max {:>9.1} ms   all configured {:.1} ms (welcome p50 {:.1} ms, p99 {:.1} ms)",
                f.p50_ms, f.p99_ms, f.max_ms, f.all_configured_ms, f.welcome_p50_ms, f.welcome_p99_ms
            ),
            propagation_line("propagation", &self.propagation),
            propagation_line("  after return", &self.after_return),
            format!(
                "  API call          p50 {:>9.1} ms   p99 {:>9.1} ms   max {:>9.1} ms",
                self.api_call.p50_ms, self.api_call.p99_ms, self.api_call.max_ms
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
                "  cpu               first config {:.2} s   idle {:.2} s in {:.0} s   propagation {:.2} s   per change {:.2} ms ({:.2} ms while pushing)",
                c.first_config_cpu_seconds,
                c.idle_cpu_seconds,
                x.idle_window_seconds,
                c.propagation_cpu_seconds,
                self.cpu_ms_per_change(),
                self.active_cpu_ms_per_change()
            ),
        ];
        if self.topology.etcd_members.is_some() {
            for r in &self.replicas {
                lines.push(format!(
                    "  {}: {} sidecars; after return p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; RSS {:.1} → {:.1} MiB, {:.1} KiB per sidecar; CPU {:.2} ms per sidecar to connect, {:.2} % of a core per 1,000 idle sidecars, {:.1} % of a core while changing",
                    r.name,
                    r.sidecars,
                    r.after_return.p50_ms,
                    r.after_return.p99_ms,
                    r.after_return.max_ms,
                    mib(r.memory.rss_endpoints_only_bytes),
                    mib(r.memory.rss_with_sidecars_bytes),
                    r.memory.per_sidecar(r.sidecars) / 1024.0,
                    r.cpu.connect_ms_per_sidecar(r.sidecars),
                    r.cpu.idle_percent_per_1000(r.sidecars, x.idle_window_seconds),
                    r.cpu.propagation_percent(x.propagation_seconds),
                ));
            }
            for r in &self.replicas {
                lines.push(format!(
                    "  {} where the time goes: return → its first sidecar p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; first → last sidecar p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; applied → push sent {}; push sent → ACK {}",
                    r.name,
                    r.first_ack.p50_ms,
                    r.first_ack.p99_ms,
                    r.first_ack.max_ms,
                    r.fan_out.p50_ms,
                    r.fan_out.p99_ms,
                    r.fan_out.max_ms,
                    recorded_text(r.push_sent.as_ref()),
                    recorded_text(r.push_acked.as_ref()),
                ));
            }
            if let Some(w) = &self.etcd_watch {
                lines.push(format!(
                    "  etcd watch        API call → a watch of etcd saw the change p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; → the call returned p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {} changes seen)",
                    w.to_watch.p50_ms,
                    w.to_watch.p99_ms,
                    w.to_watch.max_ms,
                    w.to_return.p50_ms,
                    w.to_return.p99_ms,
                    w.to_return.max_ms,
                    w.seen,
                    self.propagation.changes
                ));
            }
            for e in &self.etcd {
                lines.push(format!(
                    "  etcd {}: RSS {:.1} MiB; CPU {:.2} s first config, {:.2} s idle, {:.2} s propagation; during the changes {:.0} revisions ({:.0} puts of {:.1} MiB, {:.0} deletes; the database grew {:.1} MiB), WAL fsync {}, backend commit {}",
                    e.name,
                    mib(e.rss_bytes),
                    e.first_config_cpu_seconds,
                    e.idle_cpu_seconds,
                    e.propagation_cpu_seconds,
                    e.revisions,
                    e.puts,
                    e.put_bytes / (1024.0 * 1024.0),
                    e.deletes,
                    e.db_growth_bytes / (1024.0 * 1024.0),
                    recorded_text(e.wal_fsync.as_ref()),
                    recorded_text(e.backend_commit.as_ref()),
                ));
            }
        }
        if f.connect_retries > 0 {
            lines.push(format!("  note: {} attempts to open a stream failed and were retried with backoff", f.connect_retries));
        }
        if b.snapshot_pushes > 0 {
            lines.push(format!("  note: {} changes reached a sidecar as a full snapshot, not a delta", b.snapshot_pushes));
        }
        if x.nacks > 0 {
            lines.push(format!("  note: the simulated sidecars rejected {} pushes", x.nacks));
        }
        lines.join("\n")
    }
}
