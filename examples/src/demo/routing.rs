//! What a run does with routes: the scenario in force, the action under way, and the window of
//! traffic the scenario is judged on, which starts once a change is in force.

use std::{
    collections::VecDeque,
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
    scenario::{Expectation, Measured, Scenario, Verdict},
    traffic::Traffic,
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

/// The routing state of a run.
pub(super) struct Routing {
    api: ConfigApi,
    outcomes: mpsc::Sender<Outcome>,
    /// When the run's traffic started, for the times in reports.
    started: Instant,
    /// The scenario in force, and since when.
    pub active: Option<(Scenario, Instant)>,
    busy: Option<Action>,
    /// Whether `--scenario` still waits to be applied.
    flag_pending: bool,
    /// The last action's report, with the time it finished.
    pub last_action: Option<String>,
    /// Why the `--scenario` of the run failed, if it did.
    pub failures: Vec<String>,
    baseline: Baseline,
    /// When the window started, and what started it, in words ("since the reset").
    window: (Instant, String),
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
            window: (Instant::now(), "since the start".to_owned()),
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
        let from_flag = std::mem::take(&mut self.flag_pending);
        if outcome.accepted {
            self.active = match outcome.action {
                Action::Apply(scenario) => Some((scenario, Instant::now())),
                Action::Reset | Action::Help | Action::Quit => None,
            };
            let words = match outcome.action {
                Action::Apply(scenario) => format!("since {} took effect", scenario.name()),
                _ => format!("since the {}", outcome.action.name()),
            };
            traffic.new_window();
            self.baseline = Baseline::take(instances);
            self.window = (Instant::now(), words);
        }
        if from_flag && !outcome.in_force {
            self.failures.push(format!("--scenario {} did not take effect (see its report above)", outcome.action.name()));
        }
        let report = format!("[{}s] {}", self.started.elapsed().as_secs(), outcome.report);
        self.last_action.insert(report)
    }

    /// What the live SHARE column covers: the last `span` of snapshots (`recent`, oldest first,
    /// one a second), or the window when it is younger.
    pub fn live_since<'a>(&'a self, recent: &'a VecDeque<Vec<u64>>, span: &str) -> (&'a [u64], String) {
        match recent.front() {
            Some(oldest) if self.window.0.elapsed().as_secs() as usize >= recent.len().saturating_sub(1) => {
                (oldest, format!("over the last {span}"))
            }
            _ => (&self.baseline.served, self.window.1.clone()),
        }
    }

    /// What the whole window covers, for the final summary.
    pub fn window_since(&self) -> (&[u64], &str) {
        (&self.baseline.served, &self.window.1)
    }

    /// Judges the window by what the scenario in force expects.
    pub fn verdict(&mut self, traffic: &Traffic, instances: &[Instance]) -> Result<Verdict, String> {
        if self.flag_pending {
            self.failures.push("the run ended before --scenario was applied".to_owned());
        }
        let (label, expectation) = match self.active {
            Some((scenario, _)) => (scenario.name(), scenario.expectation()?),
            None => ("no routes", Expectation::Clean),
        };
        let window = traffic.window();
        let now = Baseline::take(instances);
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
        };
        Ok(expectation.judge(label, &measured))
    }
}
