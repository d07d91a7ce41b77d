//! The control plane's health checks: it runs the checks of the instances registered through
//! the API (a sidecar runs its own app's), records what they find in the registry, renews their
//! TTL checks, and removes an instance that stays critical past its `deregister_critical_after`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use ferry_health::{Health, HealthMetrics, Probe, Runner, RunnerOptions, Target, TtlError};
use ferry_proto::{v1, validate::FieldError};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::registry::{Instance, InstanceSpec, Registry, RegistryError};

/// Runs the checks of API instances.
pub struct HealthChecks {
    registry: Arc<Registry>,
    options: RunnerOptions,
    metrics: HealthMetrics,
    running: Mutex<HashMap<String, Supervised>>,
    this: Weak<HealthChecks>,
}

/// The checks of one instance, running.
struct Supervised {
    instance: Arc<Instance>,
    runner: Arc<Runner>,
    forward: JoinHandle<()>,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.forward.abort();
    }
}

/// Why a TTL renewal through the API failed.
#[derive(Debug, thiserror::Error)]
pub enum TtlFailure {
    #[error("id: no check {0:?} is registered")]
    UnknownCheck(String),
    #[error("id: {check:?} runs in the sidecar {node:?}; renew it there (PUT /ttl/pass on its admin listener)")]
    OwnedBySidecar { check: String, node: String },
    #[error("id: {0}")]
    Refused(TtlError),
}

impl HealthChecks {
    /// A supervisor recording into `registry`.
    pub fn new(registry: Arc<Registry>, options: RunnerOptions, metrics: HealthMetrics) -> Arc<Self> {
        Arc::new_cyclic(|this| Self { registry, options, metrics, running: Mutex::default(), this: this.clone() })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Supervised>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses checks this control plane will not run.
    pub fn admit(&self, spec: &InstanceSpec) -> Result<(), FieldError> {
        for (i, check) in spec.checks.iter().enumerate() {
            if matches!(check.probe, Probe::Script { .. }) && !self.options.scripts_allowed {
                return Err(FieldError::new(
                    format!("checks[{i}].script"),
                    "script checks are disabled; start the control plane with --enable-script-checks",
                ));
            }
        }
        Ok(())
    }

    /// Starts, restarts or stops the checks of instance `id` to match what the registry holds
    /// now. Safe to call in any order and any number of times: each call reconciles with the
    /// registry's current state, so racing registrations cannot leave stale checks running.
    pub fn sync(&self, id: &str) {
        self.reconcile(id, None);
    }

    /// Starts the checks of every API instance in the registry, after a restart. Each instance
    /// keeps its stored health until its checks have results, so a restart does not flap it.
    pub fn sync_all(&self) {
        for instance in self.registry.persistent_instances() {
            self.reconcile(&instance.id, Some(instance.health));
        }
    }

    fn reconcile(&self, id: &str, assume: Option<Health>) {
        let mut running = self.lock();
        let instance = self.registry.instance(id).filter(|i| i.node_id().is_none() && !i.checks.is_empty());
        let Some(instance) = instance else {
            running.remove(id);
            return;
        };
        if let Some(current) = running.get(id) {
            let same = current.instance.checks == instance.checks
                && current.instance.address == instance.address
                && current.instance.port == instance.port
                && current.instance.deregister_critical_after == instance.deregister_critical_after
                && !current.forward.is_finished();
            if same {
                return;
            }
        }
        running.remove(id);
        let target = Target { host: instance.address.clone(), port: instance.port };
        let options = RunnerOptions { assume, ..self.options };
        let runner = Arc::new(Runner::start(instance.checks.clone(), target, options, self.metrics.clone()));
        let forward = tokio::spawn(forward(
            self.registry.clone(),
            self.this.clone(),
            instance.id.clone(),
            runner.report(),
            instance.deregister_critical_after,
        ));
        running.insert(instance.id.clone(), Supervised { instance, runner, forward });
    }

    /// Renews the TTL check `check_id` of an API instance.
    /// Renews the TTL check `check_id` of an API instance; answers the check as it is now.
    pub async fn ttl(&self, check_id: &str, status: Health, output: String) -> Result<v1::Check, TtlFailure> {
        let owner = self.registry.check_owner(check_id).ok_or_else(|| TtlFailure::UnknownCheck(check_id.to_owned()))?;
        if let Some(node) = owner.node_id() {
            return Err(TtlFailure::OwnedBySidecar { check: check_id.to_owned(), node: node.to_owned() });
        }
        let runner = self.lock().get(&owner.id).map(|s| s.runner.clone());
        let runner = runner.ok_or_else(|| TtlFailure::UnknownCheck(check_id.to_owned()))?;
        let renewed = runner.ttl(Some(check_id), status, output).await.map_err(TtlFailure::Refused)?;
        let spec = owner.checks.iter().find(|c| c.id == renewed.id).map(ferry_health::CheckSpec::to_proto).unwrap_or_default();
        Ok(v1::Check {
            status: v1::Health::from(renewed.status) as i32,
            output: renewed.output,
            last_transition: Some(crate::registry::timestamp(renewed.last_transition)),
            ..spec
        })
    }
}

/// Copies reports into the registry, and removes the instance once it has been critical for
/// `deregister_after`.
async fn forward(
    registry: Arc<Registry>,
    checks: Weak<HealthChecks>,
    id: String,
    mut report: watch::Receiver<ferry_health::Report>,
    deregister_after: Option<Duration>,
) {
    let mut critical_since: Option<Instant> = None;
    loop {
        let current = report.borrow_and_update().clone();
        match registry.record_health(&id, current.health, current.checks, None) {
            Err(RegistryError::NotFound(_)) => {
                if let Some(checks) = checks.upgrade() {
                    checks.sync(&id);
                }
                return;
            }
            Err(error) => tracing::warn!(%id, %error, "cannot record health"),
            Ok(changed) => {
                if changed {
                    tracing::info!(%id, health = %current.health, "health changed");
                }
            }
        }
        // Only a critical verdict of checks that have run counts, not the assumption before them.
        critical_since = match current.health {
            Health::Critical if current.settled => Some(critical_since.unwrap_or_else(Instant::now)),
            _ => None,
        };
        let deadline = deregister_after.zip(critical_since).and_then(|(after, since)| since.checked_add(after));
        tokio::select! {
            changed = report.changed() => if changed.is_err() { return },
            () = sleep_until(deadline), if deadline.is_some() => {
                tracing::info!(%id, after = ?deregister_after, "removing instance: critical for longer than deregister_critical_after");
                if let Err(error) = registry.deregister(&id).await {
                    tracing::warn!(%id, %error, "cannot remove the critical instance");
                }
                if let Some(checks) = checks.upgrade() {
                    checks.sync(&id);
                }
                return;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
