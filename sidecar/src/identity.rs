//! The sidecar's workload certificate: obtained from the control plane by CSR, renewed at 70 %
//! of its life, and again at once when the trust bundle names a new issuer (a CA rotation).
//!
//! The key pair is made here for every certificate and never leaves the process (but for the
//! sidecar's own state file, mode 0600, with `--state-dir`). A failed attempt is retried with
//! jittered backoff; the certificate in force keeps serving, new handshakes and old
//! connections alike, until it expires, so a control plane that is down costs nothing until
//! then. With several replicas, a CSR goes to the one that answered last, and to the others
//! in turn when it does not answer.

use std::time::{Duration, SystemTime};

use ferry_proto::v1::{self, identity_client::IdentityClient};
use ferry_tls::Issued;
use tokio_util::sync::CancellationToken;

use crate::{
    control::ControlAccess,
    mesh::{self, Mesh},
    metrics::Metrics,
};

/// The share of a certificate's life after which it is renewed.
const RENEW_AT: f64 = 0.7;
/// Backoff between failed attempts: from this...
const RETRY_BASE: Duration = Duration::from_millis(500);
/// ...up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the sidecar asks to be.
#[derive(Debug, Clone)]
pub struct CertifyConfig {
    pub service: String,
    pub node_id: String,
    pub control: ControlAccess,
    /// How long connecting to one control-plane address may take before the next is tried.
    pub connect_timeout: Duration,
}

/// Obtains and renews the certificate until `shutdown`.
pub async fn run(config: CertifyConfig, mesh: Mesh, metrics: Metrics, shutdown: CancellationToken) {
    let mut changes = mesh.changes();
    let mut failures = 0u32;
    loop {
        let now = SystemTime::now();
        let due = due(&mesh, now);
        mesh.update_renewal(|r| r.due = Some(due));
        let wait = due.duration_since(now).unwrap_or_default();
        if !wait.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                // A new bundle may name a new issuer: look again.
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = shutdown.cancelled() => return,
            }
        }
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, certify(&config, &mesh));
        let result = tokio::select! {
            result = attempt => result.unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}"))),
            () = shutdown.cancelled() => return,
        };
        match result {
            Ok(issued) => {
                failures = 0;
                tracing::info!(
                    identity = %issued.identity,
                    serial = %issued.serial,
                    expires = %humantime::format_rfc3339_seconds(issued.not_after),
                    "obtained a workload certificate"
                );
                metrics.identity_expiration.set(seconds(issued.not_after));
                mesh.set_identity(issued);
                mesh.update_renewal(|r| {
                    r.last_error = None;
                    r.renewals += 1;
                });
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                tracing::warn!(%error, retry_in = ?delay, "cannot obtain a workload certificate; the one in force (if any) keeps serving");
                mesh.update_renewal(|r| r.last_error = Some(error));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

fn seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// When the certificate in force should be renewed: now without one, at once (with a little
/// jitter) when the bundle names another issuer, else at 70 % of its life as received.
fn due(mesh: &Mesh, now: SystemTime) -> SystemTime {
    let Some(issued) = mesh.identity() else { return now };
    let received = mesh.received_at().min(now);
    let life = issued.not_after.duration_since(received).unwrap_or_default();
    if let Some(bundle) = mesh.trust().current()
        && let (Some(expected), Some(actual)) = (&bundle.issuer, issued.issuer())
        && expected != actual
    {
        // Every sidecar renews within a couple of seconds of a rotation, not all at once.
        let spread = Duration::from_millis(2000).min(life / 10);
        return now + jitter(spread);
    }
    received + life.mul_f64(RENEW_AT)
}

/// A random delay up to `max`.
fn jitter(max: Duration) -> Duration {
    let millis = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ferry_runtime::rng::range(0..=millis))
}

/// The wait before asking again after `attempt` failures in a row.
fn backoff(attempt: u32) -> Duration {
    ferry_runtime::backoff::Backoff::new(RETRY_BASE, RETRY_MAX).delay(attempt)
}

/// One CSR, signed.
async fn certify(config: &CertifyConfig, mesh: &Mesh) -> Result<Issued, String> {
    let request = ferry_tls::csr::request(&config.service).map_err(|e| format!("making a key: {e}"))?;
    let (channel, _) = config.control.connect(config.connect_timeout).await?;
    let response = IdentityClient::new(channel)
        .certify(v1::CertifyRequest {
            service: config.service.clone(),
            csr_pem: request.csr_pem,
            node_id: config.node_id.clone(),
        })
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    if let Some(bundle) = &response.trust_bundle {
        // Newer than the one pushed, or the first: a leaf is useless without its roots.
        let newer = mesh.bundle().is_none_or(|held| held.version < bundle.version);
        if newer {
            let checked = mesh::check_bundle(bundle).map_err(|e| format!("the trust bundle: {e}"))?;
            mesh.set_bundle(bundle, checked);
        }
    }
    let issued = Issued::from_pem(&response.cert_chain_pem, &request.key_pem)?;
    let expected = ferry_tls::Identity::parse(&response.identity).map_err(|e| e.to_string())?;
    if issued.identity != expected || issued.identity.service != config.service {
        return Err(format!("the control plane issued {} for service {}", issued.identity, config.service));
    }
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_between_a_quarter_and_the_ceiling() {
        for attempt in 1..20 {
            let ceiling = RETRY_BASE.saturating_mul(2u32.saturating_pow((attempt - 1).min(16))).min(RETRY_MAX);
            let delay = backoff(attempt);
            assert!(delay >= ceiling / 4 && delay <= ceiling, "{attempt}: {delay:?}");
        }
    }
}
