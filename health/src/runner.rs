//! Runs an instance's checks and publishes its health.
//!
//! One task per active check probes at its interval; one task owns the states, applies
//! hysteresis per check and flap damping to the whole, expires TTL checks, takes renewals, and
//! publishes a [`Report`] whenever anything changed. The report's `generation` moves only when a
//! status or the health changed: consumers send those at once and may hold back output-only
//! changes, which must never cost a push.

use std::time::{Duration, SystemTime};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
    time::{Instant, MissedTickBehavior},
};

use ferry_proto::v1;

use crate::{
    Health,
    metrics::HealthMetrics,
    probe::{HttpProbes, Outcome, Prober, Target},
    spec::{CheckSpec, Probe},
    state::{CheckState, FlapDamper, FlapPolicy, worst},
};

/// How a runner behaves.
#[derive(Debug, Clone)]
pub struct RunnerOptions {
    pub flap: FlapPolicy,
    /// Start each restarted check (see `assume`) at a random point of its first interval, so
    /// that a control plane starting with many instances does not probe them all at once. The
    /// checks of a new instance always probe at once: it is critical until they pass.
    pub stagger: bool,
    /// Whether script checks may run; when not, they stay critical and say why.
    pub scripts_allowed: bool,
    /// The health to assume until the checks have results: the last known health of an instance
    /// whose checks restart (after a control-plane restart), so it does not flap. `None`: a new
    /// instance, critical until its checks pass.
    pub assume: Option<Health>,
    /// The HTTP client of HTTP checks: one per process, shared by every runner made from
    /// clones of these options, so checks reuse and bound their connections.
    pub http: HttpProbes,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self { flap: FlapPolicy::default(), stagger: false, scripts_allowed: true, assume: None, http: HttpProbes::new() }
    }
}

/// One check as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStatus {
    pub id: String,
    pub kind: &'static str,
    /// What the check counts as: until it has a result, the health assumed for it.
    pub status: Health,
    pub output: String,
    pub last_transition: SystemTime,
    /// Whether a result (a probe, a renewal, an expiry) has set the status yet.
    pub checked: bool,
}

impl CheckStatus {
    /// The status as the API shows it: `HEALTH_NOT_CHECKED` until the check has a result.
    pub fn wire_status(&self) -> v1::Health {
        if self.checked { v1::Health::from(self.status) } else { v1::Health::NotChecked }
    }
}

/// An instance's health and the checks behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub health: Health,
    pub checks: Vec<CheckStatus>,
    /// Counts changes of a status or of the health; output-only changes leave it alone.
    pub generation: u64,
    /// Whether every check has a result yet; before that the health is an assumption, and a
    /// critical one must not count as the instance failing.
    pub settled: bool,
}

/// Why a TTL renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error("no check with id {0:?}")]
    UnknownCheck(String),
    #[error("{id:?} is a {kind} check, not a TTL check")]
    NotTtl { id: String, kind: &'static str },
    #[error("several TTL checks ({0}): name the one to renew")]
    Ambiguous(String),
    #[error("there is no TTL check to renew")]
    NoTtlCheck,
    #[error("a TTL renewal sets passing, warning or critical, not {0}")]
    BadStatus(Health),
    #[error("the health checker has stopped")]
    Stopped,
}

enum Command {
    Ttl { id: Option<String>, status: Health, output: String, reply: oneshot::Sender<Result<CheckStatus, TtlError>> },
}

/// Runs checks until dropped.
pub struct Runner {
    commands: mpsc::Sender<Command>,
    report: watch::Receiver<Report>,
    task: JoinHandle<()>,
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Runner {
    /// Starts running `checks` against `target`.
    pub fn start(checks: Vec<CheckSpec>, target: Target, options: RunnerOptions, metrics: HealthMetrics) -> Self {
        let assume = options.assume.filter(|h| *h != Health::Draining);
        let assumed = assume.unwrap_or(Health::Critical);
        let states: Vec<CheckState> = checks
            .iter()
            .map(|check| {
                let mut state = CheckState::assuming(assumed);
                state.output = first_output(check, assume, options.stagger);
                state
            })
            .collect();
        let initial = Report {
            health: if checks.is_empty() { Health::Passing } else { assumed },
            checks: checks.iter().zip(&states).map(|(c, s)| status_of(c, s)).collect(),
            generation: 0,
            settled: checks.is_empty(),
        };
        let (report_tx, report) = watch::channel(initial);
        let (commands, commands_rx) = mpsc::channel(16);
        let task = tokio::spawn(aggregate(checks, states, target, options, metrics, commands_rx, report_tx));
        Self { commands, report, task }
    }

    /// The latest report, and every later one.
    pub fn report(&self) -> watch::Receiver<Report> {
        self.report.clone()
    }

    /// Renews a TTL check (the only one when `id` is `None`) with `status`.
    pub async fn ttl(&self, id: Option<&str>, status: Health, output: String) -> Result<CheckStatus, TtlError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Ttl { id: id.map(str::to_owned), status, output, reply };
        self.commands.send(command).await.map_err(|_| TtlError::Stopped)?;
        answer.await.map_err(|_| TtlError::Stopped)?
    }
}

/// What a check says before its first result: what it waits for, and what is assumed meanwhile.
fn first_output(check: &CheckSpec, assume: Option<Health>, stagger: bool) -> String {
    let waiting = match &check.probe {
        Probe::Ttl { ttl } => format!("waiting for the first renewal (due within {})", humantime::format_duration(*ttl)),
        _ if assume.is_some() && stagger => {
            format!("the first probe runs within {}", humantime::format_duration(check.interval))
        }
        _ => "the first probe is under way".to_owned(),
    };
    match assume {
        Some(health) => format!("{waiting}; assumed {health}, as before the restart, until then"),
        None => format!("{waiting}; critical until then"),
    }
}

fn status_of(check: &CheckSpec, state: &CheckState) -> CheckStatus {
    CheckStatus {
        id: check.id.clone(),
        kind: check.probe.kind(),
        status: state.status,
        output: state.output.clone(),
        last_transition: state.last_transition,
        checked: state.checked,
    }
}

async fn probe_loop(
    index: usize,
    check: CheckSpec,
    target: Target,
    stagger: bool,
    http: HttpProbes,
    results: mpsc::Sender<(usize, Outcome)>,
) {
    let mut prober = Prober::with_client(check.probe.clone(), target, &http);
    if stagger {
        let spread = u64::try_from(check.interval.as_millis()).unwrap_or(u64::MAX).max(1);
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..spread))).await;
    }
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(outcome) = prober.run(check.timeout).await
            && results.send((index, outcome)).await.is_err()
        {
            return;
        }
    }
}

async fn aggregate(
    checks: Vec<CheckSpec>,
    mut states: Vec<CheckState>,
    target: Target,
    options: RunnerOptions,
    metrics: HealthMetrics,
    mut commands: mpsc::Receiver<Command>,
    report: watch::Sender<Report>,
) {
    let (results_tx, mut results) = mpsc::channel(checks.len().max(1) * 2);
    let mut probes = JoinSet::new();
    let mut ttl_deadlines: Vec<Option<Instant>> = vec![None; checks.len()];
    for (index, check) in checks.iter().enumerate() {
        match &check.probe {
            Probe::Ttl { ttl } => {
                ttl_deadlines[index] = Some(Instant::now() + *ttl);
            }
            Probe::Script { .. } if !options.scripts_allowed => {
                states[index].force(
                    Health::Critical,
                    "script checks are disabled on this control plane; start it with --enable-script-checks".into(),
                );
            }
            _ => {
                probes.spawn(probe_loop(
                    index,
                    check.clone(),
                    target.clone(),
                    options.stagger && options.assume.is_some(),
                    options.http.clone(),
                    results_tx.clone(),
                ));
            }
        }
    }
    drop(results_tx);
    let mut damper = FlapDamper::new(options.flap);
    let mut health = report.borrow().health;
    let mut generation = 0;
    publish(&report, &checks, &states, health, generation);
    loop {
        let wake = ttl_deadlines.iter().flatten().copied().chain(damper.held_until()).min();
        let mut status_changed = false;
        tokio::select! {
            Some((index, (result, output))) = results.recv() => {
                let kind = checks[index].probe.kind();
                metrics.result(kind, result);
                if states[index].record(result, output, checks[index].success_threshold, checks[index].failure_threshold) {
                    metrics.transition(kind, states[index].status);
                    status_changed = true;
                }
            }
            command = commands.recv() => match command {
                Some(Command::Ttl { id, status, output, reply }) => {
                    let renewed = renew(&checks, &mut states, &mut ttl_deadlines, id.as_deref(), status, output);
                    if let Ok((index, changed)) = &renewed {
                        metrics.result("ttl", status);
                        if *changed {
                            metrics.transition("ttl", status);
                            status_changed = true;
                        }
                        let _ = reply.send(Ok(status_of(&checks[*index], &states[*index])));
                    } else if let Err(error) = renewed {
                        let _ = reply.send(Err(error));
                    }
                }
                None => return,
            },
            () = sleep_until(wake), if wake.is_some() => {
                let now = Instant::now();
                for (index, deadline) in ttl_deadlines.iter_mut().enumerate() {
                    if deadline.is_some_and(|d| d <= now) {
                        *deadline = None;
                        let Probe::Ttl { ttl } = checks[index].probe else { continue };
                        if states[index].force(Health::Critical, format!("TTL of {ttl:?} expired without a renewal")) {
                            metrics.transition("ttl", Health::Critical);
                            status_changed = true;
                        }
                    }
                }
            }
        }
        let next = damper.apply(worst(states.iter().map(|s| s.status)), Instant::now());
        if status_changed || next != health {
            generation += 1;
            health = next;
        }
        publish(&report, &checks, &states, health, generation);
    }
}

/// Applies a TTL renewal; returns the check's index and whether its status changed.
fn renew(
    checks: &[CheckSpec],
    states: &mut [CheckState],
    deadlines: &mut [Option<Instant>],
    id: Option<&str>,
    status: Health,
    output: String,
) -> Result<(usize, bool), TtlError> {
    if status == Health::Draining {
        return Err(TtlError::BadStatus(status));
    }
    let index = match id {
        Some(id) => {
            let index = checks.iter().position(|c| c.id == id).ok_or_else(|| TtlError::UnknownCheck(id.to_owned()))?;
            if !matches!(checks[index].probe, Probe::Ttl { .. }) {
                return Err(TtlError::NotTtl { id: id.to_owned(), kind: checks[index].probe.kind() });
            }
            index
        }
        None => {
            let ttl: Vec<usize> = (0..checks.len()).filter(|i| matches!(checks[*i].probe, Probe::Ttl { .. })).collect();
            match ttl.as_slice() {
                [] => return Err(TtlError::NoTtlCheck),
                [only] => *only,
                several => {
                    return Err(TtlError::Ambiguous(
                        several.iter().map(|i| checks[*i].id.as_str()).collect::<Vec<_>>().join(", "),
                    ));
                }
            }
        }
    };
    let Probe::Ttl { ttl } = checks[index].probe else { return Err(TtlError::NoTtlCheck) };
    deadlines[index] = Some(Instant::now() + ttl);
    let output = if output.is_empty() { format!("renewed as {status}") } else { output };
    Ok((index, states[index].force(status, output)))
}

fn publish(report: &watch::Sender<Report>, checks: &[CheckSpec], states: &[CheckState], health: Health, generation: u64) {
    let next = Report {
        health,
        checks: checks.iter().zip(states).map(|(c, s)| status_of(c, s)).collect(),
        generation,
        settled: states.iter().all(|s| s.checked),
    };
    report.send_if_modified(|current| {
        if *current == next {
            return false;
        }
        *current = next;
        true
    });
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttl_check(id: &str, seconds: u64) -> CheckSpec {
        CheckSpec { id: id.into(), ..CheckSpec::new(Probe::Ttl { ttl: Duration::from_secs(seconds) }) }
    }

    fn target() -> Target {
        Target { host: "127.0.0.1".into(), port: 1 }
    }

    async fn next(report: &mut watch::Receiver<Report>) -> Report {
        tokio::time::timeout(Duration::from_secs(600), report.changed()).await.expect("a report").expect("running");
        report.borrow_and_update().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn no_checks_means_passing() {
        let runner = Runner::start(Vec::new(), target(), RunnerOptions::default(), HealthMetrics::default());
        assert_eq!(runner.report().borrow().health, Health::Passing);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttl_check_passes_when_renewed_and_fails_when_it_expires() {
        let runner = Runner::start(vec![ttl_check("app:ttl", 30)], target(), RunnerOptions::default(), HealthMetrics::default());
        let mut report = runner.report();
        assert_eq!(report.borrow_and_update().health, Health::Critical, "critical until the first renewal");

        let renewed = runner.ttl(None, Health::Passing, "all good".into()).await.expect("renews");
        assert_eq!((renewed.status, renewed.output.as_str()), (Health::Passing, "all good"));
        assert_eq!(next(&mut report).await.health, Health::Passing);

        tokio::time::sleep(Duration::from_secs(29)).await;
        runner.ttl(None, Health::Warning, String::new()).await.expect("renews");
        assert_eq!(next(&mut report).await.health, Health::Warning);

        let expired = next(&mut report).await;
        assert_eq!(expired.health, Health::Critical);
        assert!(expired.checks[0].output.contains("expired"), "{expired:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn ttl_renewals_name_the_wrong_check() {
        let checks = vec![
            ttl_check("a", 10),
            ttl_check("b", 10),
            CheckSpec { id: "t".into(), ..CheckSpec::new(Probe::Tcp { address: None }) },
        ];
        let runner = Runner::start(checks, target(), RunnerOptions::default(), HealthMetrics::default());
        assert_eq!(runner.ttl(None, Health::Passing, String::new()).await.map(|_| ()), Err(TtlError::Ambiguous("a, b".into())));
        assert_eq!(
            runner.ttl(Some("t"), Health::Passing, String::new()).await.map(|_| ()),
            Err(TtlError::NotTtl { id: "t".into(), kind: "tcp" })
        );
        assert_eq!(
            runner.ttl(Some("zz"), Health::Passing, String::new()).await.map(|_| ()),
            Err(TtlError::UnknownCheck("zz".into()))
        );
        assert!(runner.ttl(Some("b"), Health::Passing, String::new()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn output_changes_do_not_move_the_generation() {
        let runner = Runner::start(vec![ttl_check("app:ttl", 30)], target(), RunnerOptions::default(), HealthMetrics::default());
        let mut report = runner.report();
        runner.ttl(None, Health::Passing, "one".into()).await.expect("renews");
        let first = next(&mut report).await;
        runner.ttl(None, Health::Passing, "two".into()).await.expect("renews");
        let second = next(&mut report).await;
        assert_eq!(second.checks[0].output, "two");
        assert_eq!(second.generation, first.generation, "only the output changed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_instance_keeps_its_health_until_its_checks_say_otherwise() {
        let options = RunnerOptions { assume: Some(Health::Passing), ..RunnerOptions::default() };
        let runner = Runner::start(vec![ttl_check("app:ttl", 30)], target(), options, HealthMetrics::default());
        let mut report = runner.report();
        let first = report.borrow_and_update().clone();
        assert_eq!((first.health, first.settled), (Health::Passing, false), "no flap while the checks restart");
        let mut expired = next(&mut report).await;
        while !expired.settled {
            assert_eq!(expired.health, Health::Passing);
            expired = next(&mut report).await;
        }
        assert_eq!(expired.health, Health::Critical, "the TTL ran out: a real result");
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_scripts_stay_critical_and_say_why() {
        let check = CheckSpec { id: "s".into(), ..CheckSpec::new(Probe::Script { args: vec!["true".into()] }) };
        let options = RunnerOptions { scripts_allowed: false, ..RunnerOptions::default() };
        let runner = Runner::start(vec![check], target(), options, HealthMetrics::default());
        let mut report = runner.report();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let report = report.borrow_and_update().clone();
        assert_eq!(report.health, Health::Critical);
        assert!(report.checks[0].output.contains("--enable-script-checks"), "{report:?}");
    }
}
