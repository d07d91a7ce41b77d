//! The demo's summary: the routes in force, every instance with its version, health, the requests
//! it served and its share of its service's, catalog's split by version, and what the last action
//! did.

use std::{collections::HashMap, fmt::Write as _, sync::atomic::Ordering, time::Duration};

use super::{Instance, actions, text::count, traffic::Traffic};

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
    /// For a live screen of 24 rows: no blank lines, long lines cut, the last action's answer
    /// cut to a few lines (its whole text is in the logs folder, `actions.log`).
    pub compact: bool,
}

/// The most lines of the last action's answer a live screen shows.
const ACTION_LINES: usize = 3;

/// The widest line a live screen shows uncut (a 100-column terminal).
const WIDTH: usize = 99;

/// `line` cut to [`WIDTH`] characters, marked when cut.
fn cut(line: &str) -> String {
    if line.chars().count() <= WIDTH {
        return line.to_owned();
    }
    let mut kept: String = line.chars().take(WIDTH - 1).collect();
    kept.push('…');
    kept
}

/// The last action's answer in at most [`ACTION_LINES`] lines: its first and last lines and how
/// many are left out between (a diff, mostly).
pub fn brief(action: &str) -> String {
    let lines: Vec<&str> = action.lines().collect();
    if lines.len() <= ACTION_LINES {
        return lines.iter().map(|l| cut(l)).collect::<Vec<_>>().join("\n");
    }
    let left_out = lines.len() - 2;
    format!(
        "{}\n  ... {left_out} more lines (the diff): see actions.log in the logs folder\n{}",
        cut(lines[0]),
        cut(lines[lines.len() - 1])
    )
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
    /// The whole summary, for a screen.
    pub fn render(&self) -> String {
        let ok = self.traffic.ok.load(Ordering::Relaxed);
        let errors = self.traffic.errors.load(Ordering::Relaxed);
        let rate = (ok + errors) as f64 / self.elapsed.as_secs_f64().max(0.001);
        let blank = if self.compact { "" } else { "\n" };
        let mut out = format!(
            "ferry demo  {}s  {} through frontend ({rate:.1}/s)  {}",
            self.elapsed.as_secs(),
            count(ok + errors, "request"),
            count(errors, "error"),
        );
        if let Some([p50, p90, p99]) = self.traffic.window().percentiles() {
            let _ = write!(out, "  p50 {} p90 {} p99 {}", millis(p50), millis(p90), millis(p99));
        }
        out.push_str("\nclient -> frontend -> catalog -> inventory (gRPC); every hop sidecar to sidecar\n");
        let _ = writeln!(out, "{}", self.routes.0);
        let share = if self.compact { format!("SHARE {}", self.span) } else { "SHARE".to_owned() };
        let _ = writeln!(
            out,
            "{blank}{:<10} {:<12} {:<8} {:<9} {:>7} {:>7} {:>7}",
            "SERVICE", "INSTANCE", "VERSION", "HEALTH", "SERVED", "FAILED", share
        );
        for (instance, (_, share)) in self.instances.iter().zip(shares(self.instances, self.since)) {
            let _ = writeln!(
                out,
                "{:<10} {:<12} {:<8} {:<9} {:>7} {:>7} {:>7}",
                instance.service,
                instance.id,
                instance.version,
                self.health.get(&instance.id).map_or("-", String::as_str),
                instance.counters.served.load(Ordering::Relaxed),
                instance.counters.failed.load(Ordering::Relaxed),
                share.map_or("-".to_owned(), |s| format!("{:.1}%", s * 100.0)),
            );
        }
        if !self.compact {
            let _ = writeln!(out, "SHARE: of its service's requests {}", self.span);
        }
        if let Some(split) = catalog_split(self.instances, self.since) {
            let _ = writeln!(out, "catalog by version {}: {split}", self.span);
        }
        if let Some(path) = self.traffic.last_path() {
            let _ = writeln!(out, "{blank}last request: {path}");
        }
        if let Some(error) = self.traffic.last_error() {
            let _ = writeln!(out, "last error:   {error}");
        }
        if self.keys {
            let _ = writeln!(out, "{blank}{}", actions::keys_help());
        }
        if let Some(action) = self.last_action {
            let action = if self.compact { brief(action) } else { action.to_owned() };
            let _ = write!(out, "{blank}{action}");
        }
        if self.compact {
            // Every line fits a 100-column terminal, so none wraps onto the next row.
            return out.lines().map(cut).collect::<Vec<_>>().join("\n") + "\n";
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_answer_is_cut_to_a_few_lines_that_fit_a_100_column_screen() {
        let diff: Vec<String> = (0..20).map(|i| format!("      +line {i}")).collect();
        let action =
            format!("[21s] canary: POST .../v1/apply\n{}\n  in force on every sidecar that calls catalog (3)", diff.join("\n"));
        let shown = brief(&action);
        assert_eq!(shown.lines().count(), ACTION_LINES, "{shown}");
        assert!(shown.starts_with("[21s] canary") && shown.ends_with("calls catalog (3)"), "{shown}");
        assert!(shown.contains("20 more lines"), "{shown}");
        let short = "[3s] \"x\" is not a key";
        assert_eq!(brief(short), short);
        let wide = "x".repeat(150);
        assert_eq!(cut(&wide).chars().count(), WIDTH);
        assert!(brief(&wide).chars().count() <= WIDTH);
    }
}
