//! The demo's summary: the routes in force, every instance with its version, health, the requests
//! it served and its share of its service's, catalog's split by version, and what the last action
//! did.

use std::{collections::HashMap, fmt::Write as _, sync::atomic::Ordering, time::Duration};

use super::{
    Instance, actions,
    screen::{self, Part},
    text::count,
    traffic::Traffic,
};

/// What the summary shows.
pub struct Summary<'a> {
    pub elapsed: Duration,
    pub traffic: &'a Traffic,
    pub instances: &'a [Instance],
    pub health: &'a HashMap<String, String>,
    /// Each instance's served count at the start of the span the SHARE column covers...
    pub since: &'a [u64],
    /// ...and that span in words, such as "over the last 10s".
    pub span: &'a str,
    /// The routes in force at the control plane, whoever applied them: in full, and short.
    pub routes: (&'a str, &'a str),
    /// Whether keys are read, so their help is shown.
    pub keys: bool,
    pub last_action: Option<&'a str>,
}

/// Each instance's requests served since `since`, and its share of its service's.
fn shares(instances: &[Instance], since: &[u64]) -> Vec<(u64, Option<f64>)> {
    let served: Vec<u64> = instances
        .iter()
        .enumerate()
        .map(|(i, instance)| {
            instance.counters.served.load(Ordering::Relaxed).saturating_sub(since.get(i).copied().unwrap_or_default())
        })
        .collect();
    instances
        .iter()
        .zip(&served)
        .map(|(instance, &mine)| {
            let total: u64 =
                instances.iter().zip(&served).filter(|(other, _)| other.service == instance.service).map(|(_, n)| n).sum();
            (mine, (total > 0).then(|| mine as f64 / total as f64))
        })
        .collect()
}

/// Catalog's requests since `since` by version, such as `v1 90.2%  v2 9.8%  (of 184)`.
pub fn catalog_split(instances: &[Instance], since: &[u64]) -> Option<String> {
    let mut versions: Vec<(&str, u64)> = Vec::new();
    for (instance, (served, _)) in instances.iter().zip(shares(instances, since)) {
        if instance.service != "catalog" {
            continue;
        }
        match versions.iter_mut().find(|(v, _)| *v == instance.version) {
            Some((_, n)) => *n += served,
            None => versions.push((instance.version, served)),
        }
    }
    let total: u64 = versions.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let parts: Vec<String> = versions.iter().map(|(v, n)| format!("{v} {:.1}%", *n as f64 * 100.0 / total as f64)).collect();
    Some(format!("{}  (of {total})", parts.join("  ")))
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Summary<'_> {
    /// The first line: time, requests, errors, latencies.
    fn status(&self) -> String {
        let ok = self.traffic.ok.load(Ordering::Relaxed);
        let errors = self.traffic.errors.load(Ordering::Relaxed);
        let rate = (ok + errors) as f64 / self.elapsed.as_secs_f64().max(0.001);
        let mut out = format!(
            "ferry demo  {}s  {} through frontend ({rate:.1}/s)  {}",
            self.elapsed.as_secs(),
            count(ok + errors, "request"),
            count(errors, "error"),
        );
        if let Some([p50, p90, p99]) = self.traffic.window().percentiles() {
            let _ = write!(out, "  p50 {} p90 {} p99 {}", millis(p50), millis(p90), millis(p99));
        }
        out
    }

    /// The table's heading, its last column headed `share`.
    fn heading(share: &str) -> String {
        format!(
            "{:<10} {:<12} {:<8} {:<9} {:>7} {:>7} {:>7}",
            "SERVICE", "INSTANCE", "VERSION", "HEALTH", "SERVED", "FAILED", share
        )
    }

    /// The table's rows: one per instance.
    fn rows(&self) -> Vec<String> {
        self.instances
            .iter()
            .zip(shares(self.instances, self.since))
            .map(|(instance, (_, share))| {
                format!(
                    "{:<10} {:<12} {:<8} {:<9} {:>7} {:>7} {:>7}",
                    instance.service,
                    instance.id,
                    instance.version,
                    self.health.get(&instance.id).map_or("-", String::as_str),
                    instance.counters.served.load(Ordering::Relaxed),
                    instance.counters.failed.load(Ordering::Relaxed),
                    share.map_or("-".to_owned(), |s| format!("{:.1}%", s * 100.0)),
                )
            })
            .collect()
    }

    /// The whole summary, for the end of a run or a log.
    pub fn render(&self) -> String {
        let mut out = self.status();
        out.push_str("\nclient -> frontend -> catalog -> inventory (gRPC); every hop sidecar to sidecar\n");
        let _ = writeln!(out, "{}", self.routes.0);
        let _ = writeln!(out, "\n{}", Self::heading("SHARE"));
        for row in self.rows() {
            let _ = writeln!(out, "{row}");
        }
        let _ = writeln!(out, "SHARE: of its service's requests {}", self.span);
        if let Some(split) = catalog_split(self.instances, self.since) {
            let _ = writeln!(out, "catalog by version {}: {split}", self.span);
        }
        if let Some(path) = self.traffic.last_path() {
            let _ = writeln!(out, "\nlast request: {path}");
        }
        if let Some(error) = self.traffic.last_error() {
            let _ = writeln!(out, "last error:   {error}");
        }
        if self.keys {
            let _ = writeln!(out, "\n{}", actions::keys_help());
        }
        if let Some(action) = self.last_action {
            let _ = write!(out, "\n{action}");
        }
        out
    }

    /// The live screen, `header` first, in [`screen::ROWS`] rows of 100 columns: long lines
    /// wrap, and when rows run short the least useful give way (see [`parts`](Self::parts)).
    pub fn frame(&self, header: &[String]) -> String {
        screen::fit(&self.parts(header), screen::ROWS)
    }

    /// What the live screen shows, as text.
    fn parts(&self, header: &[String]) -> Vec<Part> {
        screen::live(&screen::Live {
            header,
            status: self.status(),
            routes: self.routes.0,
            heading: Self::heading("SHARE"),
            rows: self.rows(),
            span: match catalog_split(self.instances, self.since) {
                Some(split) => format!("SHARE and catalog by version {}: {split}", self.span),
                None => format!("SHARE {}", self.span),
            },
            last_request: self.traffic.last_path().map(|path| format!("last request: {path}")),
            last_error: self.traffic.last_error().map(|error| format!("last error:   {error}")),
            keys: self.keys.then(actions::keys_help),
            answer: self.last_action,
        })
    }

    /// One line, for a log that scrolls.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{:>4}s  {} ok  {}",
            self.elapsed.as_secs(),
            self.traffic.ok.load(Ordering::Relaxed),
            count(self.traffic.errors.load(Ordering::Relaxed), "error")
        );
        let _ = write!(line, "  {}", self.routes.1);
        if let Some(split) = catalog_split(self.instances, self.since) {
            let _ = write!(line, "  catalog {}: {split}", self.span);
        }
        line
    }
}
