//! The app's health as the sidecar reports it: what its checks conclude, or `draining` once
//! the sidecar is leaving.

use std::sync::Arc;

use ferry_health::{CheckSpec, CheckStatus, Health, HealthMetrics, Report, Runner, RunnerOptions, Target, TtlError};
use ferry_proto::v1;
use tokio::sync::watch;

use crate::config::HostPort;

/// Runs the app's checks and holds the draining flag.
pub struct AppHealth {
    specs: Arc<Vec<CheckSpec>>,
    runner: Runner,
    draining: watch::Sender<bool>,
}

/// A view of the app's health that sees every change.
#[derive(Clone, Debug)]
pub struct HealthWatch {
    specs: Arc<Vec<CheckSpec>>,
    report: watch::Receiver<Report>,
    draining: watch::Receiver<bool>,
}

/// What decides whether a report must go out at once: a status, the health or draining moved.
pub type Urgency = (u64, bool);

impl AppHealth {
    /// Starts the checks of the app at `app`.
    pub fn start(specs: Vec<CheckSpec>, app: &HostPort, metrics: HealthMetrics) -> Self {
        let target = Target { host: app.host.clone(), port: app.port };
        let runner = Runner::start(specs.clone(), target, RunnerOptions::default(), metrics);
        Self { specs: Arc::new(specs), runner, draining: watch::Sender::new(false) }
    }

    /// The checks as registered with the instance.
    pub fn specs(&self) -> Vec<v1::Check> {
        self.specs.iter().map(CheckSpec::to_proto).collect()
    }

    /// A view that sees every change.
    pub fn watch(&self) -> HealthWatch {
        HealthWatch { specs: self.specs.clone(), report: self.runner.report(), draining: self.draining.subscribe() }
    }

    /// Reports `draining` from now on.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Whether the sidecar is draining.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Renews a TTL check (the only one when `check` is `None`).
    pub async fn ttl(&self, check: Option<&str>, status: Health, output: String) -> Result<CheckStatus, TtlError> {
        self.runner.ttl(check, status, output).await
    }
}

impl HealthWatch {
    /// Resolves when the report or the draining flag changed.
    pub async fn changed(&mut self) {
        tokio::select! {
            changed = self.report.changed() => if changed.is_err() { std::future::pending::<()>().await },
            changed = self.draining.changed() => if changed.is_err() { std::future::pending::<()>().await },
        }
    }

    /// The report to send now, and what decides whether it is urgent.
    pub fn current(&mut self) -> (v1::HealthReport, Urgency) {
        let report = self.report.borrow_and_update().clone();
        let draining = *self.draining.borrow_and_update();
        let health = if draining { Health::Draining } else { report.health };
        let checks = report
            .checks
            .iter()
            .map(|status| {
                let spec = self.specs.iter().find(|s| s.id == status.id).map(CheckSpec::to_proto).unwrap_or_default();
                v1::Check {
                    id: status.id.clone(),
                    // As an earlier control plane reads it; `unchecked` says the rest.
                    status: v1::Health::from(status.status) as i32,
                    output: status.output.clone(),
                    last_transition: Some(ferry_proto::time::timestamp(status.last_transition)),
                    ..spec
                }
            })
            .collect();
        let unchecked = report.checks.iter().filter(|c| !c.checked).map(|c| c.id.clone()).collect();
        (v1::HealthReport { health: v1::Health::from(health) as i32, checks, unchecked }, (report.generation, draining))
    }
}
