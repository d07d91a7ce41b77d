//! What a run does with routes: the scenario in force, the action under way, the routes the
//! control plane actually holds (which someone else may have changed), and the window of traffic
//! the verdict judges, which starts once a change is in force.
//!
//! The demo judges only routes it put in force itself, or no routes at all. Routes applied,
//! changed or deleted outside it (with `ferryctl`, say) open a window that is reported and never
//! judged: the demo cannot know what they are meant to do, and a route of one's own may fail
//! requests on purpose.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{
    Instance,
    actions::{self, Action, Outcome},
    config_api::ConfigApi,
    in_force::{self, Change, RoutesSeen},
    scenario::{Expectation, Measured, Scenario, Verdict},
    text::count,
    traffic::{self, Traffic},
};
use crate::apps::Counters;

/// How long `--scenario` waits for traffic to reach every instance before it applies anyway.
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);

/// The counters at the start of a window, which its measurements are taken from.
struct Baseline {
    /// Requests each instance had served.
    served: Vec<u64>,
    /// Calls frontend had made to catalog, and those aborted by an injected fault.
    catalog_calls: u64,
    injected: u64,
}

impl Baseline {
    fn take(instances: &[Instance]) -> Self {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let frontends = instances.iter().filter(|i| i.service == "frontend").map(|i| &i.counters);
        Self {
            served: instances.iter().map(|i| load(&i.counters.served)).collect(),
            catalog_calls: frontends.clone().map(|c| load(&c.served) + load(&c.failed)).sum(),
            injected: frontends.map(|c| load(&c.injected)).sum(),
        }
    }
}

/// The routes in force that the demo did not put there.
struct Outside {
    /// How they differ from the demo's own, as last seen.
    changes: Vec<Change>,
    /// The changes in words, with the scenario whose routes they are, if any.
    description: String,
    /// When the demo first saw them.
    since: Instant,
    /// Whether every sidecar that calls their services holds them.
    in_force: bool,
}

/// The span of traffic the verdict is about.
struct Window {
    started: Instant,
    /// What started it, in words ("since the reset").
    words: String,
    /// Why it is not judged, if it is not, in words that follow "not judged: 3s to 9s,": "under
    /// route/catalog v12 applied outside the demo", or "while the deletion of route/catalog
    /// reached every sidecar". Such a window is reported, never judged.
    outside: Option<String>,
}

/// A window of requests sent under routes changed outside the demo, for the final report.
struct Unjudged {
    /// When it started and ended, counted from the start of the traffic.
    from: Duration,
    to: Option<Duration>,
    description: String,
    traffic: Arc<traffic::Window>,
    /// The counters when it started, and when it ended.
    start: Baseline,
    end: Option<Baseline>,
}

/// The routing state of a run.
pub(super) struct Routing {
    api: ConfigApi,
    outcomes: mpsc::Sender<Outcome>,
    /// When the run's traffic started, for the times in reports.
    started: Instant,
    /// The scenario the demo put in force, and since when.
    pub active: Option<(Scenario, Instant)>,
    busy: Option<Action>,
    /// Whether `--scenario` still waits to be applied.
    flag_pending: bool,
    /// The last action's report, with the time it finished.
    pub last_action: Option<String>,
    /// Why the `--scenario` of the run failed, if it did.
    pub failures: Vec<String>,
    baseline: Baseline,
    window: Window,
    /// The route versions the demo's own actions left, by service: what it expects the control
    /// plane to hold. The control plane starts empty, so at first: no routes.
    own: BTreeMap<String, u64>,
    /// When the last action finished: a poll sent before then may not show what it did.
    finished_at: Instant,
    /// The routes in force, as last seen.
    seen: Option<RoutesSeen>,
    /// How the routes in force differ from the demo's own, while they do.
    outside: Option<Outside>,
    /// The routes in force became the demo's own again (or none) by changes outside it: the
    /// words of the judged window that starts once every sidecar holds them.
    returning: Option<String>,
    unjudged: Vec<Unjudged>,
}

impl Routing {
    /// The state of a run whose traffic starts now; outcomes of actions arrive on the receiver.
    pub fn new(api: ConfigApi, instances: &[Instance]) -> (Self, mpsc::Receiver<Outcome>) {
        let (outcomes, receiver) = mpsc::channel(4);
        let routing = Self {
            api,
            outcomes,
            started: Instant::now(),
            active: None,
            busy: None,
            flag_pending: false,
            last_action: None,
            failures: Vec::new(),
            baseline: Baseline::take(instances),
            window: Window { started: Instant::now(), words: "since the start".to_owned(), outside: None },
            own: BTreeMap::new(),
            finished_at: Instant::now(),
            seen: None,
            outside: None,
            returning: None,
            unjudged: Vec::new(),
        };
        (routing, receiver)
    }

    /// Applies `scenario` (from `--scenario`) once every instance has served a request, so every
    /// sidecar that calls another service has subscribed to it and can acknowledge the change.
    pub fn apply_when_warm(&mut self, scenario: Scenario, instances: &[Instance]) {
        self.busy = Some(Action::Apply(scenario));
        self.flag_pending = true;
        let counters: Vec<Arc<Counters>> = instances.iter().map(|i| i.counters.clone()).collect();
        let (api, outcomes) = (self.api.clone(), self.outcomes.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + WARM_UP_LIMIT;
            while Instant::now() < deadline && counters.iter().any(|c| c.served.load(Ordering::Relaxed) == 0) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = outcomes.send(actions::apply(&api, scenario).await).await;
        });
    }

    /// Shows `text` where the last action's report goes, and returns it as shown.
    pub fn note(&mut self, text: String) -> &str {
        let at = self.started.elapsed().as_secs();
        self.last_action.insert(format!("[{at}s] {text}"))
    }

    /// Starts `action` (typed) unless one is under way. Returns what it says about it.
    pub fn start(&mut self, action: Action) -> &str {
        if action == Action::Help {
            return self.note(actions::keys_help());
        }
        if let Some(busy) = self.busy {
            return self.note(format!("{} is still under way; {} must wait for it", busy.name(), action.name()));
        }
        self.busy = Some(action);
        let (api, outcomes) = (self.api.clone(), self.outcomes.clone());
        tokio::spawn(async move {
            let outcome = match action {
                Action::Apply(scenario) => actions::apply(&api, scenario).await,
                Action::Reset | Action::Help | Action::Quit => actions::reset(&api).await,
            };
            let _ = outcomes.send(outcome).await;
        });
        self.note(format!("{}: under way...", action.name()))
    }

    /// Takes in what an action did: a change the API accepted starts a new window. Returns the
    /// report.
    pub fn finish(&mut self, outcome: Outcome, traffic: &Traffic, instances: &[Instance]) -> &str {
        self.busy = None;
        self.finished_at = Instant::now();
        let from_flag = std::mem::take(&mut self.flag_pending);
        for (service, version) in &outcome.routes {
            match version {
                Some(version) => self.own.insert(service.clone(), *version),
                None => self.own.remove(service),
            };
        }
        if outcome.accepted {
            self.active = match outcome.action {
                Action::Apply(scenario) => Some((scenario, Instant::now())),
                Action::Reset | Action::Help | Action::Quit => None,
            };
            let words = match outcome.action {
                Action::Apply(scenario) => format!("since {} took effect", scenario.name()),
                _ => format!("since the {}", outcome.action.name()),
            };
            // The next poll compares the control plane with what the demo left: routes changed
            // outside it that are still there are found again, and their window starts then.
            self.outside = None;
            self.returning = None;
            self.new_window(words, None, traffic, instances);
        }
        if from_flag && !outcome.in_force {
            self.failures.push(format!("--scenario {} did not take effect (see its report above)", outcome.action.name()));
        }
        let report = format!("[{}s] {}", self.started.elapsed().as_secs(), outcome.report);
        self.last_action.insert(report)
    }

    /// Takes in the routes the control plane holds. A change the demo did not make opens a
    /// window that is not judged; a return to the demo's own routes (or to none) opens a judged
    /// one once every sidecar holds it. Returns what changed, in words, if anything did.
    pub fn observe(&mut self, seen: Option<RoutesSeen>, traffic: &Traffic, instances: &[Instance]) -> Option<String> {
        let seen = seen?;
        // While an action is under way, the routes move because of it; after it, a poll sent
        // before it finished may not show it yet.
        let fresh = self.busy.is_none() && seen.asked_at >= self.finished_at && seen.error.is_none();
        let notes = if fresh { self.compare(&seen, traffic, instances) } else { Vec::new() };
        self.seen = Some(seen);
        if notes.is_empty() {
            return None;
        }
        Some(self.note(notes.join("\n")).to_owned())
    }

    fn compare(&mut self, seen: &RoutesSeen, traffic: &Traffic, instances: &[Instance]) -> Vec<String> {
        let mut notes = Vec::new();
        let mut deleted: Vec<String> = Vec::new();
        // No route at all is the demo's own starting point, whoever deleted them: it judges it
        // as it would after its reset.
        if seen.routes.is_empty() && !self.own.is_empty() {
            deleted.extend(self.own.keys().map(|s| format!("route/{s}")));
            self.own.clear();
            self.active = None;
        }
        let changes = in_force::changes(&self.own, &seen.routes);
        if !changes.is_empty() {
            match &mut self.outside {
                Some(outside) if outside.changes == changes => {
                    if seen.in_force() && !outside.in_force {
                        outside.in_force = true;
                        notes.push(format!("{}: in force on every sidecar that calls them", outside.description));
                    }
                }
                _ if let Some(scenario) = in_force::same_as_scenario(&seen.routes) => {
                    // The very routes of one of the demo's scenarios, applied by hand (as the
                    // README's tour does): taken as that scenario, and judged by it.
                    self.own = seen.routes.iter().map(|(service, route)| (service.clone(), route.version)).collect();
                    self.active = Some((scenario, Instant::now()));
                    self.outside = None;
                    self.returning = Some(format!("since {} took effect", scenario.name()));
                    let description = in_force::describe(&changes);
                    notes.push(format!(
                        "{description}: the same routes as the demo's {} scenario ({}), so the demo takes them as that scenario: \
                         it judges the requests sent once every sidecar holds them by what {} should do",
                        scenario.name(),
                        scenario.path(),
                        scenario.name(),
                    ));
                    // Until every sidecar holds them, requests are reported, not judged.
                    self.new_window(
                        format!("since {}'s routes were applied", scenario.name()),
                        Some(reaching(&format!("the {} scenario's routes (applied outside the demo)", scenario.name()))),
                        traffic,
                        instances,
                    );
                }
                _ => {
                    let description = in_force::describe(&changes);
                    notes.push(format!(
                        "{description}{}: not the routes of any of the demo's scenarios, so the demo reports the requests sent \
                         under them (in the summary, as not judged) and judges none of them; it judges again once the routes \
                         are its own or none",
                        if seen.in_force() { ", in force on every sidecar" } else { "" }
                    ));
                    self.returning = None;
                    self.outside = Some(Outside {
                        changes,
                        description: description.clone(),
                        since: Instant::now(),
                        in_force: seen.in_force(),
                    });
                    self.new_window(
                        "since the change outside the demo".to_owned(),
                        Some(format!("under {description}")),
                        traffic,
                        instances,
                    );
                }
            }
            return notes;
        }
        if let Some(outside) = self.outside.take() {
            // Versions only grow, so the routes in force can match the demo's again only by the
            // routes applied outside it being deleted.
            deleted.extend(outside.changes.iter().filter_map(|change| match change {
                Change::Applied { service, .. } => Some(format!("route/{service}")),
                Change::Deleted { .. } => None,
            }));
        }
        if !deleted.is_empty() {
            deleted.sort();
            deleted.dedup();
            let names = in_force::and(&deleted);
            let what = format!("{names} deleted outside the demo");
            let now = match self.active {
                Some((scenario, _)) => format!("the demo's {} again", scenario.name()),
                None => "none".to_owned(),
            };
            notes.push(format!("{what}: the routes in force are {now}"));
            if self.window.outside.is_none() {
                // The window of the demo's own routes ends with them.
                let while_ = reaching(&format!("the deletion of {names} (outside the demo)"));
                self.new_window(format!("since the deletion of {names}"), Some(while_), traffic, instances);
            }
            self.returning = Some(format!("since the deletion of {names} took effect"));
        }
        if seen.in_force()
            && let Some(words) = self.returning.take()
        {
            let judged = "on every sidecar: the verdict judges the requests sent from now on";
            match notes.last_mut() {
                Some(note) => {
                    let _ = write!(note, ", {judged}");
                }
                None => notes.push(format!("the routes in force are {judged}")),
            }
            self.new_window(words, None, traffic, instances);
        }
        notes
    }

    /// Starts a window: requests sent from now on are measured from here.
    fn new_window(&mut self, words: String, outside: Option<String>, traffic: &Traffic, instances: &[Instance]) {
        let at = self.started.elapsed();
        if let Some(open) = self.unjudged.last_mut().filter(|u| u.to.is_none()) {
            open.to = Some(at);
            open.end = Some(Baseline::take(instances));
        }
        traffic.new_window();
        self.baseline = Baseline::take(instances);
        if let Some(description) = &outside {
            self.unjudged.push(Unjudged {
                from: at,
                to: None,
                description: description.clone(),
                traffic: traffic.window(),
                start: Baseline::take(instances),
                end: None,
            });
        }
        self.window = Window { started: Instant::now(), words, outside };
    }

    /// The routes in force, for the summary: in full, and short for a line that scrolls.
    pub fn in_force(&self) -> (String, String) {
        let (mut full, mut short) = if let Some(outside) = &self.outside {
            let rollout = match self.seen.as_ref().and_then(|s| s.behind.first()) {
                _ if outside.in_force => "in force on every sidecar".to_owned(),
                Some(behind) => format!("not on every sidecar yet ({behind})"),
                None => "not on every sidecar yet".to_owned(),
            };
            let mut full = format!("routes: {}, seen {}s ago, {rollout}", outside.description, outside.since.elapsed().as_secs());
            let kept: Vec<String> = self
                .own
                .iter()
                .filter(|(service, version)| {
                    self.seen.as_ref().and_then(|s| s.routes.get(*service)).map(|r| r.version) == Some(**version)
                })
                .map(|(service, version)| format!("route/{service} v{}", ferry_runtime::short::version(*version)))
                .collect();
            if let (Some((scenario, _)), false) = (self.active, kept.is_empty()) {
                let _ = write!(full, "; {} left of the demo's {}", in_force::and(&kept), scenario.name());
            }
            full.push_str(": not one of the demo's scenarios, so not judged");
            (full, format!("routes: {}", outside.description))
        } else if let Some((scenario, since)) = self.active {
            let routes: Vec<String> = self
                .own
                .iter()
                .map(|(service, version)| format!("route/{service} v{}", ferry_runtime::short::version(*version)))
                .collect();
            // A scenario without routes (lockdown) is an authorization policy.
            let routes = if routes.is_empty() { "authorization/catalog".to_owned() } else { in_force::and(&routes) };
            (
                format!(
                    "routes: {} ({}), in force for {}s: {routes}",
                    scenario.name(),
                    scenario.path(),
                    since.elapsed().as_secs()
                ),
                format!("routes: {} ({routes})", scenario.name()),
            )
        } else {
            (
                "routes: none: each request goes to the faster of two instances picked at random (p2c-ewma); \
                 at this light load, mostly the one that answered fastest"
                    .to_owned(),
                "routes: none".to_owned(),
            )
        };
        if self.returning.is_some() {
            full.push_str(" (not on every sidecar yet: judged once it is)");
            short.push_str(" (not on every sidecar yet)");
        }
        if let Some(busy) = self.busy {
            full = format!("{full}; {} under way", busy.name());
        }
        if let Some(error) = self.seen.as_ref().and_then(|s| s.error.as_deref()) {
            let _ = write!(full, " (as last read; cannot read them now: {error})");
            short.push_str(" (as last read)");
        }
        (full, short)
    }

    /// What the live SHARE column covers: the last `span` of snapshots (`recent`, oldest first,
    /// one a second), or the window when it is younger.
    pub fn live_since<'a>(&'a self, recent: &'a VecDeque<Vec<u64>>, span: &str) -> (&'a [u64], String) {
        match recent.front() {
            Some(oldest) if self.window.started.elapsed().as_secs() as usize >= recent.len().saturating_sub(1) => {
                (oldest, format!("over the last {span}"))
            }
            _ => (&self.baseline.served, self.window.words.clone()),
        }
    }

    /// What the whole window covers, for the final summary.
    pub fn window_since(&self) -> (&[u64], &str) {
        (&self.baseline.served, &self.window.words)
    }

    /// Judges the window by what the scenario in force expects; a window sent under routes
    /// changed outside the demo is reported, not judged.
    pub fn verdict(&mut self, traffic: &Traffic, instances: &[Instance]) -> Result<Verdict, String> {
        if self.flag_pending {
            self.failures.push("the run ended before --scenario was applied".to_owned());
        }
        let (end, now) = (self.started.elapsed(), Baseline::take(instances));
        let mut lines: Vec<String> = self
            .unjudged
            .iter()
            // A window that closed before any request was sent under it (the routes changed
            // again within a poll) has nothing to report.
            .filter(|u| u.to.is_none() || u.traffic.ok() + u.traffic.errors() > 0)
            .map(|u| {
                let last = u.end.as_ref().unwrap_or(&now);
                let injected = last.injected.saturating_sub(u.start.injected);
                let calls = last.catalog_calls.saturating_sub(u.start.catalog_calls);
                let versions: Vec<String> =
                    u.traffic.versions().iter().map(|(v, (plain, canary))| format!("{v} {}", plain + canary)).collect();
                unjudged_line(
                    (u.from, u.to.unwrap_or(end)),
                    &u.description,
                    (u.traffic.ok(), u.traffic.errors()),
                    (injected, calls),
                    &versions,
                )
            })
            .collect();
        if self.window.outside.is_some() {
            return Ok(Verdict { label: "routes changed outside the demo".to_owned(), passed: true, judged: false, lines });
        }
        let (label, expectation) = match self.active {
            Some((scenario, _)) => (scenario.name(), scenario.expectation()?),
            None => ("no routes", Expectation::Clean),
        };
        let window = traffic.window();
        let delay = match expectation {
            Expectation::Fault { delay: Some((_, delay)), .. } => Some(delay),
            _ => None,
        };
        let measured = Measured {
            ok: window.ok(),
            errors: window.errors(),
            versions: window.versions(),
            catalog_calls: now.catalog_calls.saturating_sub(self.baseline.catalog_calls),
            injected: now.injected.saturating_sub(self.baseline.injected),
            slow: delay.and_then(|d| window.slow_share(d)),
            probes: window.probes(),
        };
        let mut verdict = expectation.judge(label, &measured);
        lines.append(&mut verdict.lines);
        verdict.lines = lines;
        Ok(verdict)
    }
}

/// A window that lasts only while `change` reaches every sidecar, in the words of
/// [`Window::outside`]: the requests sent meanwhile met some sidecars with it and some without.
fn reaching(change: &str) -> String {
    format!("while {change} reached every sidecar")
}

/// The final report's line for a window that was not judged: from `span.0` to `span.1`, sent
/// `description` ("under ...", "while ..."), `requests` (succeeded, failed) through frontend,
/// `aborted` (injected, of frontend's calls to catalog), and catalog's answers by version.
fn unjudged_line(
    span: (Duration, Duration),
    description: &str,
    requests: (u64, u64),
    aborted: (u64, u64),
    versions: &[String],
) -> String {
    let (ok, errors) = requests;
    let mut line = format!(
        "not judged: {}s to {}s, {description}: {} through frontend, {errors} failed",
        span.0.as_secs(),
        span.1.as_secs(),
        count(ok + errors, "request"),
    );
    let (injected, calls) = aborted;
    if injected > 0 {
        let _ = write!(line, "; the mesh aborted {injected} of frontend's {} to catalog", count(calls, "call"));
    }
    if !versions.is_empty() {
        let _ = write!(line, "; catalog answered {}", versions.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_before_every_sidecar_holds_a_recognised_scenario_says_so() {
        let secs = Duration::from_secs;
        let description = reaching(&format!("the {} scenario's routes (applied outside the demo)", Scenario::Canary.name()));
        let versions = ["v1 17".to_owned(), "v2 2".to_owned()];
        assert_eq!(
            unjudged_line((secs(121), secs(122)), &description, (19, 0), (0, 19), &versions),
            "not judged: 121s to 122s, while the canary scenario's routes (applied outside the demo) reached every \
             sidecar: 19 requests through frontend, 0 failed; catalog answered v1 17, v2 2"
        );
        let deletion = reaching("the deletion of route/catalog (outside the demo)");
        assert_eq!(
            unjudged_line((secs(30), secs(31)), &deletion, (1, 0), (0, 1), &[]),
            "not judged: 30s to 31s, while the deletion of route/catalog (outside the demo) reached every sidecar: \
             1 request through frontend, 0 failed"
        );
        // Routes of one's own are what the requests were sent under, for as long as they were.
        let outside =
            format!("under {}", in_force::describe(&[in_force::Change::Applied { service: "catalog".into(), version: 12 }]));
        assert_eq!(
            unjudged_line((secs(40), secs(60)), &outside, (380, 20), (21, 400), &[]),
            "not judged: 40s to 60s, under route/catalog v12 applied outside the demo: 400 requests through frontend, \
             20 failed; the mesh aborted 21 of frontend's 400 calls to catalog"
        );
    }
}
