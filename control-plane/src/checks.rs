//! The control plane's health checks: it runs the checks of the instances registered through
//! the API (a sidecar runs its own app's), records what they find in the registry, renews their
//! TTL checks, and removes an instance that stays critical past its `deregister_critical_after`.

use std::{
    collections::HashMap,
    net::IpAddr,
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
    /// Networks checks may target although they are link-local or metadata addresses.
    allowed_targets: Vec<ipnet::IpNet>,
    running: Mutex<HashMap<String, Supervised>>,
    /// Whether this process runs the checks: with replicas on a shared store only the elected
    /// one does.
    active: std::sync::atomic::AtomicBool,
    /// With replicas: hands a TTL renewal to the replica that runs the checks.
    forward: std::sync::OnceLock<Forward>,
    this: Weak<HealthChecks>,
}

/// Hands a TTL renewal (check id, status, output) to the replica that runs the checks.
pub type Forward = Arc<dyn Fn(String, Health, String) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Networks no check may probe unless `--allow-check-target` lists them: link-local
/// addresses, where clouds serve instance metadata and credentials, and AWS's IPv6 metadata
/// address. A check is a request the control plane makes for whoever registers it.
const FORBIDDEN_TARGETS: [&str; 3] = ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"];

/// Host names of cloud metadata services.
const METADATA_HOSTS: [&str; 3] = ["metadata.google.internal", "metadata", "instance-data"];

/// How long resolving a check's host may take when it is registered.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The replica that runs the checks could not be told.
    #[error("the renewal could not be handed to the replica running the checks: {0}")]
    Forward(String),
}

impl HealthChecks {
    /// A supervisor recording into `registry`; checks may target `allowed_targets` although
    /// they are link-local or metadata networks.
    pub fn new(
        registry: Arc<Registry>,
        options: RunnerOptions,
        metrics: HealthMetrics,
        allowed_targets: Vec<ipnet::IpNet>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            registry,
            options,
            metrics,
            allowed_targets,
            running: Mutex::default(),
            active: std::sync::atomic::AtomicBool::new(true),
            forward: std::sync::OnceLock::new(),
            this: this.clone(),
        })
    }

    /// Whether a check may probe `ip`.
    fn allowed(&self, ip: IpAddr) -> bool {
        let forbidden = FORBIDDEN_TARGETS.iter().filter_map(|n| n.parse::<ipnet::IpNet>().ok()).any(|n| n.contains(&ip));
        !forbidden || self.allowed_targets.iter().any(|n| n.contains(&ip))
    }

    /// Refuses a check whose target is (or resolves to) a forbidden address.
    async fn check_target(&self, field: &str, host: &str, port: u16) -> Result<(), FieldError> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let refuse = |what: String| {
            Err(FieldError::new(
                field,
                format!(
                    "{what}: link-local and cloud metadata addresses may not be probed; list the network with --allow-check-target to allow it"
                ),
            ))
        };
        if METADATA_HOSTS.iter().any(|m| host.eq_ignore_ascii_case(m)) {
            return Err(FieldError::new(
                field,
                format!("{host} is a cloud metadata service, which a check may never probe: name the service's own address"),
            ));
        }
        let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
                // Unresolvable now: the check will say so when it runs.
                _ => Vec::new(),
            },
        };
        match addresses.into_iter().find(|ip| !self.allowed(*ip)) {
            Some(ip) if ip.to_string() == host => refuse(format!("{ip}")),
            Some(ip) => refuse(format!("{host} resolves to {ip}")),
            None => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Supervised>> {
        ferry_runtime::lock(&self.running)
    }

    /// Refuses checks this control plane will not run: scripts unless enabled, and probes of
    /// link-local or metadata addresses unless allowed.
    pub async fn admit(&self, spec: &InstanceSpec) -> Result<(), FieldError> {
        for (i, check) in spec.checks.iter().enumerate() {
            let target = |address: &Option<String>| split_host_port(address.as_deref(), &spec.address, spec.port);
            let (field, (host, port)) = match &check.probe {
                Probe::Script { .. } if !self.options.scripts_allowed => {
                    return Err(FieldError::new(
                        format!("checks[{i}].script"),
                        "script checks are disabled; start the control plane with --enable-script-checks",
                    ));
                }
                Probe::Http { url, .. } => {
                    let host_port = url.strip_prefix("http://").map(|rest| rest.split('/').next().unwrap_or_default().to_owned());
                    (format!("checks[{i}].http.url"), target(&host_port))
                }
                Probe::Tcp { address } => (format!("checks[{i}].tcp.address"), target(address)),
                Probe::Grpc { address, .. } => (format!("checks[{i}].grpc.address"), target(address)),
                Probe::Script { .. } | Probe::Ttl { .. } => continue,
            };
            self.check_target(&field, &host, port).await?;
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
        if !self.is_active() {
            return;
        }
        for instance in self.registry.persistent_instances() {
            self.reconcile(&instance.id, Some(instance.health));
        }
    }

    /// Starts (every API instance's checks) or stops running checks here.
    pub fn set_active(&self, active: bool) {
        let was = self.active.swap(active, std::sync::atomic::Ordering::SeqCst);
        if active && !was {
            tracing::info!("this replica now runs the health checks of API instances");
            self.sync_all();
        } else if !active && was {
            tracing::info!("this replica no longer runs the health checks of API instances");
            self.lock().clear();
        }
    }

    /// Stops running checks here without a word: a replica waiting for its election.
    pub fn stand_by(&self) {
        self.active.store(false, std::sync::atomic::Ordering::SeqCst);
        self.lock().clear();
    }

    /// Whether checks run here.
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn reconcile(&self, id: &str, assume: Option<Health>) {
        let mut running = self.lock();
        if !self.is_active() {
            running.clear();
            return;
        }
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
        let options = RunnerOptions { assume, ..self.options.clone() };
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

    /// Sends TTL renewals made here while another replica runs the checks to that replica.
    pub fn set_forward(&self, forward: Forward) {
        let _ = self.forward.set(forward);
    }

    /// Renews the TTL check `check_id` of an API instance; answers the check as it is now.
    pub async fn ttl(&self, check_id: &str, status: Health, output: String) -> Result<v1::Check, TtlFailure> {
        let owner = self.registry.check_owner(check_id).ok_or_else(|| TtlFailure::UnknownCheck(check_id.to_owned()))?;
        if let Some(node) = owner.node_id() {
            return Err(TtlFailure::OwnedBySidecar { check: check_id.to_owned(), node: node.to_owned() });
        }
        if !self.is_active()
            && let Some(forward) = self.forward.get()
        {
            let spec =
                owner.checks.iter().find(|c| c.id == check_id).ok_or_else(|| TtlFailure::UnknownCheck(check_id.to_owned()))?;
            if !matches!(spec.probe, ferry_health::Probe::Ttl { .. }) {
                return Err(TtlFailure::Refused(TtlError::NotTtl { id: check_id.to_owned(), kind: spec.probe.kind() }));
            }
            forward(check_id.to_owned(), status, output.clone()).await.map_err(TtlFailure::Forward)?;
            return Ok(v1::Check {
                status: v1::Health::from(status) as i32,
                output,
                last_transition: None,
                ..ferry_health::CheckSpec::to_proto(spec)
            });
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

/// The host and port of `address` (`HOST:PORT`, `[V6]:PORT`, or `HOST` on port 80), or the
/// instance's own when it names none.
fn split_host_port(address: Option<&str>, host: &str, port: u16) -> (String, u16) {
    let Some(address) = address.filter(|a| !a.is_empty()) else { return (host.to_owned(), port) };
    if let Ok(socket) = address.parse::<std::net::SocketAddr>() {
        return (socket.ip().to_string(), socket.port());
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => (host.to_owned(), port.parse().unwrap_or(80)),
        _ => (address.to_owned(), 80),
    }
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
    use crate::{index::Indexes, metrics::RegistryMetrics, registry::RegistryConfig, store::MemoryStore};

    async fn checks(allowed: &[&str]) -> Arc<HealthChecks> {
        let registry = Registry::open(
            Arc::new(MemoryStore::default()),
            RegistryConfig::default(),
            RegistryMetrics::default(),
            Arc::new(Indexes::default()),
        )
        .await
        .expect("registry");
        let allowed = allowed.iter().map(|n| n.parse().expect("CIDR")).collect();
        HealthChecks::new(registry, RunnerOptions::default(), HealthMetrics::default(), allowed)
    }

    fn spec(address: &str, check: v1::check::Probe) -> InstanceSpec {
        InstanceSpec::try_from(v1::Instance {
            service: "db".into(),
            address: address.into(),
            port: 80,
            checks: vec![v1::Check { probe: Some(check), ..Default::default() }],
            ..Default::default()
        })
        .expect("valid")
    }

    #[tokio::test]
    async fn checks_may_not_probe_metadata_addresses_unless_allowed() {
        use v1::check::Probe as P;
        let checks = checks(&[]).await;
        let http = |url: &str| P::Http(v1::HttpProbe { url: url.into(), expected_status: 0 });
        let error = checks.admit(&spec("10.0.0.1", http("http://169.254.169.254/latest/meta-data/"))).await.expect_err("IMDS");
        assert_eq!(error.field, "checks[0].http.url");
        assert!(error.reason.contains("--allow-check-target"), "{error}");
        let error = checks.admit(&spec("169.254.169.254", http("/healthz"))).await.expect_err("the instance itself");
        assert_eq!(error.field, "checks[0].http.url");
        let tcp = P::Tcp(v1::TcpProbe { address: "[fd00:ec2::254]:80".into() });
        assert!(checks.admit(&spec("10.0.0.1", tcp)).await.is_err(), "AWS IPv6 metadata");
        let named = http("http://metadata.google.internal/computeMetadata/v1/");
        assert!(checks.admit(&spec("10.0.0.1", named)).await.is_err());
        assert!(checks.admit(&spec("127.0.0.1", http("/healthz"))).await.is_ok());
        let allowed = self::checks(&["169.254.10.0/24"]).await;
        assert!(allowed.admit(&spec("169.254.10.5", http("/healthz"))).await.is_ok());
        assert!(allowed.admit(&spec("169.254.169.254", http("/healthz"))).await.is_err(), "only what is listed");
    }
}
