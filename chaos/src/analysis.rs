//! From observations to figures: per fault, the requests sent in its window and how they ended,
//! the POSTs an app saw twice, when the fault was first seen and when the mesh was whole again;
//! for the run, which acknowledged writes the control plane no longer holds; and the targets,
//! each passed or missed.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    driver::Kind,
    faults::{Fault, VICTIM},
    mesh::{APPS, CHECK_FAILURES, CHECK_INTERVAL, PUSH_BOUND},
    run::{Observations, SHARE, Window},
};

/// The registry's view of catalog when it is whole.
const WHOLE_REGISTRY: &str = "catalog-1=passing,catalog-2=passing";

/// The figures of one window.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub fault: Option<Fault>,
    /// Why the fault was not injected, when it was not.
    pub skipped: Option<&'static str>,
    pub seconds: f64,
    pub sent: usize,
    pub ok: usize,
    pub idempotent_sent: usize,
    pub failed_idempotent: usize,
    pub failed_posts: usize,
    pub reasons: BTreeMap<String, usize>,
    pub duplicated_posts: usize,
    pub writes_tried: usize,
    pub writes_acked: usize,
    pub writes_lost: usize,
    /// Seconds from injection to the first sign of it, and what that sign was.
    pub detect: Option<(f64, &'static str)>,
    /// Seconds from removal until requests succeeded again and the registry and callers were
    /// whole; None when they were not by the window's end.
    pub recover: Option<f64>,
    /// Seconds from removal until catalog-1 took its share of catalog's requests again (over
    /// two seconds), for faults of catalog-1; None when it did not within the window.
    pub share_back: Option<f64>,
    /// Seconds from removal to the first acknowledged write, when writes failed meanwhile.
    pub writes_resumed: Option<f64>,
    /// For a partition of catalog-1: seconds until every caller stopped routing to it.
    pub callers_stopped: Option<f64>,
    /// What else the window showed, in sentences.
    pub notes: Vec<String>,
    /// For a partition of catalog-1: how its traffic stopped.
    pub partition_note: Option<String>,
    /// 95th percentile latency of the successful requests, in milliseconds.
    pub p95_ms: u32,
}

impl Row {
    /// The share of idempotent requests that succeeded.
    pub fn idempotent_success(&self) -> f64 {
        if self.idempotent_sent == 0 {
            return 1.0;
        }
        (self.idempotent_sent - self.failed_idempotent) as f64 / self.idempotent_sent as f64
    }
}

/// A target and how the run did against it.
#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    /// None: the faults it needs were not in this run.
    pub passed: Option<bool>,
    pub showed: String,
}

/// What the control plane lost of what it acknowledged.
#[derive(Debug, Clone, Default)]
pub struct Durability {
    pub registrations_acked: usize,
    pub registrations_lost: Vec<String>,
    pub routes_acked: usize,
    pub last_route_acked: Option<u64>,
    pub route_held: Option<u64>,
    pub route_lost: bool,
    pub read_error: Option<String>,
}

/// Every window's figures.
pub fn rows(obs: &Observations, durability: &Durability) -> Vec<Row> {
    obs.windows.iter().map(|w| row(obs, w, durability)).collect()
}

fn seconds(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1000.0
}

fn row(obs: &Observations, window: &Window, durability: &Durability) -> Row {
    let inside = |t: u64| t >= window.start && t < window.end;
    let traffic: Vec<_> = obs.traffic().filter(|r| inside(r.t)).collect();
    let mut reasons = BTreeMap::new();
    for record in traffic.iter().filter(|r| !r.ok) {
        *reasons.entry(record.reason.clone()).or_insert(0) += 1;
    }
    let idempotent: Vec<_> = traffic.iter().filter(|r| r.kind.idempotent()).collect();
    let mut latencies: Vec<u32> = traffic.iter().filter(|r| r.ok).map(|r| r.ms).collect();
    latencies.sort_unstable();
    let p95_ms = latencies.get(latencies.len() * 95 / 100).copied().unwrap_or(0);

    let post_ids: BTreeSet<&str> = traffic.iter().filter(|r| r.kind == Kind::Post).map(|r| r.id.as_str()).collect();
    let duplicated_posts = duplicates(obs, &post_ids);

    let writes: Vec<_> = obs.records.iter().filter(|r| r.kind == Kind::Write && inside(r.t)).collect();
    let route_writes: Vec<_> = obs.route_writes.iter().filter(|w| inside(w.t)).collect();
    let writes_tried = writes.len() + route_writes.len();
    let writes_acked = writes.iter().filter(|w| w.ok).count() + route_writes.iter().filter(|w| w.ok).count();
    let lost: BTreeSet<&str> = durability.registrations_lost.iter().map(String::as_str).collect();
    let mut writes_lost = writes.iter().filter(|w| w.ok && lost.contains(w.id.as_str())).count();
    if durability.route_lost && route_writes.iter().any(|w| w.ok && Some(w.n) == durability.last_route_acked) {
        writes_lost += 1;
    }

    let registry: Vec<_> = obs.records.iter().filter(|r| r.kind == Kind::Registry).collect();
    let first_failure = traffic.iter().filter(|r| !r.ok).map(|r| r.t).min();
    let first_registry =
        registry.iter().filter(|r| r.t >= window.start && r.t < window.end && r.reason != WHOLE_REGISTRY).map(|r| r.t).next();
    let first_view = obs.views.iter().filter(|v| inside(v.t) && v.routable.as_ref().map(Vec::len) != Some(2)).map(|v| v.t).next();
    let first_write_failure =
        writes.iter().filter(|w| !w.ok).map(|w| w.t).chain(route_writes.iter().filter(|w| !w.ok).map(|w| w.t)).min();
    let detect = [
        (first_failure, "a request failed"),
        (first_registry, "the registry changed"),
        (first_view, "a caller's view changed"),
        (first_write_failure, "a write failed"),
    ]
    .into_iter()
    .filter_map(|(t, what)| Some((t?, what)))
    .min_by_key(|(t, _)| *t)
    .filter(|_| window.fault.is_some())
    .map(|(t, what)| (seconds(window.start, t), what));

    let recover = window.fault.and_then(|_| recovery(obs, window, &traffic));
    let writes_resumed = first_write_failure.and_then(|_| {
        let acked = writes.iter().filter(|w| w.ok && w.t >= window.removed).map(|w| w.t);
        let routes = route_writes.iter().filter(|w| w.ok && w.t >= window.removed).map(|w| w.t);
        acked.chain(routes).min().map(|t| seconds(window.removed, t))
    });
    let share_back = window.fault.filter(|f| f.hits_victim()).and_then(|_| share_back(obs, window));
    let mut notes: Vec<String> = window.note.iter().cloned().collect();
    if window.fault.is_some() && window.skipped.is_none() {
        let served = |host: &str, from: u64, to: u64| {
            obs.app_logs.get(host).map_or(0, |log| log.iter().filter(|(t, _, _)| *t >= from && *t < to).count())
        };
        notes.push(format!(
            "while injected, catalog-1 served {} requests and catalog-2 {}",
            served("catalog-1", window.start, window.removed),
            served("catalog-2", window.start, window.removed)
        ));
    }
    let mut callers_stopped = None;
    let mut partition_note = None;
    if window.fault == Some(Fault::PartitionInstance) {
        let served = obs
            .app_logs
            .get(VICTIM)
            .map_or(0, |log| log.iter().filter(|(t, _, _)| *t >= window.start + 100 && *t < window.removed).count());
        let during = |r: &&&crate::driver::Record| r.t >= window.start && r.t < window.removed;
        let slowed: Vec<_> = traffic.iter().filter(during).filter(|r| r.ms >= SLOWED_MS).collect();
        let last_slowed = slowed.iter().map(|r| r.t).max().map(|t| seconds(window.start, t));
        let views = views_stopped(obs, window);
        partition_note = Some(format!(
            "catalog-1's app served {served} requests during the partition; {} requests sent meanwhile took {SLOWED_MS} ms or more (an attempt waited on catalog-1), the last sent {}; both callers' views left catalog-1 out {}",
            slowed.len(),
            last_slowed.map_or("—".into(), |s| format!("{s:.2}s after the injection")),
            views.map_or("at no point of the fault".into(), |s| format!("after {s:.2}s")),
        ));
        notes.extend(partition_note.clone());
        // Traffic stopped reaching it when no request was held up by it any more, or when the
        // callers formally stopped routing to it, whichever came first.
        callers_stopped = match (last_slowed, views) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (None, _) => Some(0.0),
            (Some(a), None) => Some(a),
        };
    }
    if window.skipped.is_none() && window.fault.is_some_and(Fault::hits_victim) && share_back.is_none_or(|s| s > 10.0) {
        notes.push(format!(
            "catalog-1 took less than {:.0}% of catalog's requests for {} after the removal though both callers listed it routable ([why](#findings))",
            SHARE * 100.0,
            share_back.map_or_else(|| "the rest of the window".to_owned(), |s| format!("{s:.1}s")),
        ));
    }
    let failures: Vec<String> = traffic
        .iter()
        .filter(|r| !r.ok)
        .take(5)
        .map(|r| format!("{:?} +{:.1}s {}", r.kind, seconds(window.start, r.t), r.reason).to_lowercase())
        .collect();
    if !failures.is_empty() {
        notes.push(format!("failed requests (kind, sent after the injection, reason): {}", failures.join(", ")));
    }
    if let Some(failed) = route_writes.iter().find(|w| !w.ok) {
        notes.push(format!("first Route write refused ({}): {}", failed.via, failed.said.lines().next().unwrap_or("")));
    }
    if let Some(failed) = writes.iter().find(|w| !w.ok) {
        let status = if failed.status == 0 { "no answer:".to_owned() } else { failed.status.to_string() };
        notes.push(format!("first registration refused: {status} {}", failed.reason));
    }

    Row {
        name: window.fault.map_or_else(|| "none (steady traffic)".to_owned(), Fault::name),
        fault: window.fault,
        skipped: window.skipped,
        seconds: seconds(window.start, window.end),
        sent: traffic.len(),
        ok: traffic.iter().filter(|r| r.ok).count(),
        idempotent_sent: idempotent.len(),
        failed_idempotent: idempotent.iter().filter(|r| !r.ok).count(),
        failed_posts: traffic.iter().filter(|r| r.kind == Kind::Post && !r.ok).count(),
        reasons,
        duplicated_posts,
        writes_tried,
        writes_acked,
        writes_lost,
        detect,
        recover,
        writes_resumed,
        callers_stopped,
        share_back,
        notes,
        partition_note,
        p95_ms,
    }
}

/// POSTs among `ids` that some service's instances received more than once, counted once per
/// extra copy.
fn duplicates(obs: &Observations, ids: &BTreeSet<&str>) -> usize {
    let services: BTreeSet<&str> = APPS.iter().map(|a| a.1).collect();
    let mut extra = 0;
    for service in services {
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (host, _, _) in APPS.iter().filter(|a| a.1 == service) {
            for (_, method, id) in obs.app_logs.get(*host).into_iter().flatten() {
                if method == "POST" && ids.contains(id.as_str()) {
                    *seen.entry(id.as_str()).or_insert(0) += 1;
                }
            }
        }
        extra += seen.values().map(|n| n.saturating_sub(1)).sum::<usize>();
    }
    extra
}

/// Seconds from removal until requests succeed again and the registry and both callers are
/// whole; None when they were not by the window's end.
fn recovery(obs: &Observations, window: &Window, traffic: &[&crate::driver::Record]) -> Option<f64> {
    let last_failure = traffic.iter().filter(|r| !r.ok && r.t >= window.removed).map(|r| r.t).max();
    let registry: Vec<_> = obs.records.iter().filter(|r| r.kind == Kind::Registry && r.t < window.end).collect();
    let registry_whole = match registry.last() {
        Some(last) if last.reason != WHOLE_REGISTRY => return None,
        Some(last) if last.t >= window.removed => Some(last.t),
        _ => None,
    };
    let mut views_whole = None;
    for host in ["frontend", "load"] {
        let last = obs.views.iter().rfind(|v| v.host == host && v.t < window.end);
        match last {
            Some(view) if view.routable.as_ref().map(Vec::len) != Some(2) => return None,
            Some(view) if view.t >= window.removed => views_whole = views_whole.max(Some(view.t)),
            _ => {}
        }
    }
    let whole = [last_failure, registry_whole, views_whole].into_iter().flatten().max();
    Some(whole.map_or(0.0, |t| seconds(window.removed, t)))
}

/// Seconds from removal to the first moment from which catalog-1 served at least
/// [`SHARE`] of catalog's requests over the next two seconds.
fn share_back(obs: &Observations, window: &Window) -> Option<f64> {
    let times = |host: &str| -> Vec<u64> {
        obs.app_logs.get(host).map_or(Vec::new(), |log| {
            log.iter().map(|(t, _, _)| *t).filter(|t| *t >= window.removed && *t < window.end).collect()
        })
    };
    let (first, second) = (times("catalog-1"), times("catalog-2"));
    let mut at = window.removed;
    while at + 2000 <= window.end {
        let count = |times: &[u64]| times.iter().filter(|t| **t >= at && **t < at + 2000).count();
        let (a, b) = (count(&first), count(&second));
        if a + b >= 5 && a as f64 >= SHARE * (a + b) as f64 {
            return Some(seconds(window.removed, at));
        }
        at += 250;
    }
    None
}

/// Latency at which a request must have waited on an unreachable endpoint: the connect timeout
/// and catalog's per-try timeout are 1 s.
const SLOWED_MS: u32 = 950;

/// Seconds from the partition until neither caller routes to the victim any more.
fn views_stopped(obs: &Observations, window: &Window) -> Option<f64> {
    let mut latest = window.start;
    for host in ["frontend", "load"] {
        let stopped = obs
            .views
            .iter()
            .filter(|v| v.host == host && v.t >= window.start && v.t < window.end)
            .find(|v| v.routable.as_ref().is_some_and(|r| !r.iter().any(|id| id == VICTIM)))?;
        latest = latest.max(stopped.t);
    }
    Some(seconds(window.start, latest))
}

/// Every acknowledged write checked against what the control plane holds at the end.
pub fn durability(obs: &Observations) -> Durability {
    let held: BTreeSet<&str> = obs.readback.registrations.iter().map(String::as_str).collect();
    let acked: Vec<&str> = obs.records.iter().filter(|r| r.kind == Kind::Write && r.ok).map(|r| r.id.as_str()).collect();
    let last_route_acked = obs.route_writes.iter().filter(|w| w.ok).map(|w| w.n).max();
    let route_lost = last_route_acked.is_some_and(|n| obs.readback.route.is_none_or(|held| held < n));
    Durability {
        registrations_acked: acked.len(),
        registrations_lost: acked.iter().filter(|id| !held.contains(*id)).map(|id| (*id).to_owned()).collect(),
        routes_acked: obs.route_writes.iter().filter(|w| w.ok).count(),
        last_route_acked,
        route_held: obs.readback.route,
        route_lost,
        read_error: obs.readback.error.clone(),
    }
}

/// The targets, against the rows.
pub fn targets(rows: &[Row], durability: &Durability) -> Vec<Target> {
    let find = |fault: Fault| rows.iter().find(|r| r.fault == Some(fault) && r.skipped.is_none());
    let kills: Vec<&Row> = [Fault::KillApp, Fault::KillSidecar].into_iter().filter_map(find).collect();
    let mut targets = Vec::new();
    targets.push(Target {
        what: "zero failed idempotent requests under an instance (app) or sidecar kill".into(),
        passed: (!kills.is_empty()).then(|| kills.iter().all(|r| r.failed_idempotent == 0)),
        showed: kills
            .iter()
            .map(|r| format!("{}: {} of {} failed", r.name, r.failed_idempotent, r.idempotent_sent))
            .collect::<Vec<_>>()
            .join("; "),
    });
    targets.push(Target {
        what: "zero duplicated POSTs under an instance (app) or sidecar kill".into(),
        passed: (!kills.is_empty()).then(|| kills.iter().all(|r| r.duplicated_posts == 0)),
        showed: kills.iter().map(|r| format!("{}: {} duplicated", r.name, r.duplicated_posts)).collect::<Vec<_>>().join("; "),
    });
    let loss = find(Fault::Loss(5));
    targets.push(Target {
        what: "at 5% loss on one host's link, at least 99.9% of idempotent requests succeed".into(),
        passed: loss.map(|r| r.idempotent_success() >= 0.999),
        showed: loss.map_or_else(String::new, |r| {
            format!("{:.2}% ({} of {} failed)", r.idempotent_success() * 100.0, r.failed_idempotent, r.idempotent_sent)
        }),
    });
    let bound = CHECK_INTERVAL * CHECK_FAILURES + PUSH_BOUND;
    let partition = find(Fault::PartitionInstance);
    targets.push(Target {
        what: format!(
            "a partitioned instance stops receiving traffic within its check's interval × failure threshold + the push bound ({}s × {} + {}ms = {:.2}s)",
            CHECK_INTERVAL.as_secs(),
            CHECK_FAILURES,
            PUSH_BOUND.as_millis(),
            bound.as_secs_f64()
        ),
        passed: partition.map(|r| r.callers_stopped.is_some_and(|s| s <= bound.as_secs_f64())),
        showed: partition.map_or_else(String::new, |r| match r.callers_stopped {
            Some(s) => format!("traffic stopped reaching catalog-1 after {s:.2}s: {}", r.partition_note.clone().unwrap_or_default()),
            None => format!("traffic did not stop reaching catalog-1: {}", r.partition_note.clone().unwrap_or_default()),
        }),
    });
    let lost = durability.registrations_lost.len() + usize::from(durability.route_lost);
    targets.push(Target {
        what: "zero acknowledged writes lost under any single fault".into(),
        passed: Some(lost == 0 && durability.read_error.is_none()),
        showed: format!(
            "{} registrations and {} Route writes acknowledged; {} registrations missing at the end; Route held: {}, last acknowledged: {}{}",
            durability.registrations_acked,
            durability.routes_acked,
            durability.registrations_lost.len(),
            durability.route_held.map_or("none".into(), |n| format!("write-{n}")),
            durability.last_route_acked.map_or("none".into(), |n| format!("write-{n}")),
            durability.read_error.as_ref().map_or(String::new(), |e| format!("; read back failed: {e}")),
        ),
    });
    targets
}
