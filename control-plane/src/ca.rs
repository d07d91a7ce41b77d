//! The mesh's certificate authority.
//!
//! At first start the control plane makes a self-signed root (10 years) and an issuer signed by
//! it (1 year), and stores them in the [`Store`] under one key, created only if absent, so
//! control planes sharing a store share one CA whoever starts first. With the embedded store the
//! keys are also written under `--data-dir` (mode 0600); with `--store memory` they live in
//! memory. `--ca-cert`/`--ca-key` use an operator's issuer instead, which this CA never rotates.
//!
//! The trust bundle (every root, and the issuer of new leaves) is written to `<data-dir>/ca.pem`
//! and pushed to every sidecar. A rotation is two steps with no request failing:
//! [`Authority::rotate`] adds a new root to the bundle, and once every connected sidecar has
//! acknowledged a bundle that holds it ([`Authority::promote`]), the issuer under the new root
//! takes over; sidecars see a new issuer in the bundle and renew their leaves at once. Then
//! [`Authority::retire`] drops the old roots, refusing while a connected sidecar still holds a
//! leaf from an older issuer.

use ferry_runtime::lock;
use std::{
    collections::HashMap,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use ferry_proto::{time::timestamp, v1};
use ferry_tls::{
    Identity,
    authority::{self, CaPair, IssueError},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    metrics::SecurityMetrics,
    store::{Store, StoreError, Table, Write},
};

/// The leaf a sidecar of another replica holds, as its session records it.
#[derive(Debug, Clone)]
pub struct RemoteLeaf {
    pub node_id: String,
    /// [`issuer_sha256`] of the issuer that signed it.
    pub issuer_sha256: String,
    pub not_after: SystemTime,
}

/// The SHA-256 (hex) of an issuer certificate, as sessions record it.
pub fn issuer_sha256(pem: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pem.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// How long a root is valid.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issuer is valid.
pub const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the API listeners' certificate is valid; it is renewed at 70 % of that.
pub const API_CERT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The key of the CA in its table.
const KEY: &str = "authority";

/// How the CA is set up.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: String,
    /// Lifetime of workload leaves.
    pub cert_ttl: Duration,
    /// An operator's issuer: (certificate, optionally followed by its chain; key).
    pub operator: Option<(PathBuf, PathBuf)>,
    /// Where `ca.pem` goes.
    pub data_dir: PathBuf,
    /// Whether the keys are also written under `data_dir` (the embedded store).
    pub key_files: bool,
    pub metrics: SecurityMetrics,
}

/// Why the CA refused.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
}

/// What the store holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Stored {
    trust_domain: String,
    /// Every root trusted, oldest first. Only the newest one's key signs (new issuers).
    roots: Vec<CaPair>,
    /// The issuer of new leaves.
    issuer: CaPair,
    /// A rotation under way: the issuer under the newest root that takes over once every
    /// connected sidecar trusts that root.
    pending: Option<CaPair>,
    version: u64,
}

/// The last leaf issued to a sidecar.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub identity: String,
    pub serial: String,
    pub not_after: SystemTime,
    /// The issuer that signed it (PEM).
    pub issuer_pem: String,
}

/// The certificate authority.
pub struct Authority {
    config: CaConfig,
    store: Arc<dyn Store>,
    external: bool,
    state: Mutex<Stored>,
    bundle: watch::Sender<Arc<v1::TrustBundle>>,
    issued: Mutex<HashMap<String, IssuedLeaf>>,
    /// Whether this process ends rotations and renews the issuer: with replicas on a shared
    /// store only the elected one does.
    scheduled: std::sync::atomic::AtomicBool,
}

impl Authority {
    /// Loads the CA from `store`, creating it on first start, or takes the operator's issuer.
    pub async fn open(config: CaConfig, store: Arc<dyn Store>) -> Result<Arc<Self>, CaError> {
        let (stored, external) = match &config.operator {
            Some((cert, key)) => (operator_issuer(&config.trust_domain, cert, key)?, true),
            None => (load_or_create(&config, store.as_ref()).await?, false),
        };
        let bundle = watch::Sender::new(Arc::new(bundle_of(&stored)));
        let authority = Arc::new(Self {
            config,
            store,
            external,
            state: Mutex::new(stored),
            bundle,
            issued: Mutex::default(),
            scheduled: true.into(),
        });
        authority.renew_issuer_if_due().await?;
        authority.write_files()?;
        Ok(authority)
    }

    /// The trust domain of the mesh.
    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// The trust bundle now.
    pub fn bundle(&self) -> Arc<v1::TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// The trust bundle now and after every change.
    pub fn watch(&self) -> watch::Receiver<Arc<v1::TrustBundle>> {
        self.bundle.subscribe()
    }

    /// The issuer of new leaves now.
    fn issuer(&self) -> CaPair {
        lock(&self.state).issuer.clone()
    }

    /// Signs a workload's CSR with the identity of `service`.
    pub fn certify(&self, service: &str, csr_pem: &str, node_id: &str) -> Result<v1::CertifyResponse, CaError> {
        let identity = Identity::new(&self.config.trust_domain, service);
        let issuer = self.issuer();
        let leaf = authority::sign_workload(&issuer, csr_pem, &identity, SystemTime::now(), self.config.cert_ttl)?;
        self.config.metrics.certificates_issued.inc();
        if !node_id.is_empty() {
            lock(&self.issued).insert(
                node_id.to_owned(),
                IssuedLeaf {
                    identity: identity.to_string(),
                    serial: leaf.serial.clone(),
                    not_after: leaf.not_after,
                    issuer_pem: issuer.cert_pem.clone(),
                },
            );
        }
        Ok(v1::CertifyResponse {
            cert_chain_pem: leaf.chain_pem,
            identity: identity.to_string(),
            not_after: Some(timestamp(leaf.not_after)),
            trust_bundle: Some((*self.bundle()).clone()),
        })
    }

    /// The last leaf issued to `node_id`, if any.
    pub fn issued(&self, node_id: &str) -> Option<IssuedLeaf> {
        lock(&self.issued).get(node_id).cloned()
    }

    /// A key and certificate for the API listeners covering `names`: (chain PEM, key PEM, end).
    pub fn api_certificate(&self, names: &[String]) -> Result<(String, String, SystemTime), CaError> {
        let (leaf, key) = authority::api_server(&self.issuer(), names, SystemTime::now(), API_CERT_LIFETIME)?;
        Ok((leaf.chain_pem, key, leaf.not_after))
    }

    /// Starts a rotation: a new root joins the bundle, with an issuer under it that takes over
    /// once every connected sidecar trusts the new root ([`Authority::promote`]).
    pub async fn rotate(&self) -> Result<(), CaError> {
        if self.external {
            return Err(CaError::Refused(
                "the issuer is the operator's (--ca-cert): rotate it by starting the control plane with a new one".into(),
            ));
        }
        let next = {
            let state = lock(&self.state);
            if state.pending.is_some() {
                return Err(CaError::Refused(
                    "a rotation is under way: it waits for every connected sidecar to trust the new root (ferryctl ca status)"
                        .into(),
                ));
            }
            let now = SystemTime::now();
            let root = authority::new_root(&state.trust_domain, now, ROOT_LIFETIME)?;
            let issuer = authority::new_issuer(&root, &state.trust_domain, now, ISSUER_LIFETIME)?;
            let mut next = state.clone();
            next.roots.push(root);
            next.pending = Some(issuer);
            next.version += 1;
            next
        };
        self.commit(next).await?;
        tracing::info!(version = self.bundle().version, "CA rotation: a new root joined the trust bundle");
        Ok(())
    }

    /// Ends the wait of a rotation when `trusted` (every connected sidecar has acknowledged the
    /// bundle version asked about, which holds the new root): the new issuer takes over.
    /// Returns the bundle version sidecars must have acknowledged, while a rotation waits.
    pub async fn promote(&self, trusted: impl Fn(u64) -> bool) -> Result<Option<u64>, CaError> {
        let next = {
            let state = lock(&self.state);
            let Some(pending) = &state.pending else { return Ok(None) };
            if !trusted(state.version) {
                return Ok(Some(state.version));
            }
            let mut next = state.clone();
            next.issuer = pending.clone();
            next.pending = None;
            next.version += 1;
            next
        };
        self.commit(next).await?;
        tracing::info!(
            version = self.bundle().version,
            "CA rotation: every connected sidecar trusts the new root; its issuer signs from now on"
        );
        Ok(None)
    }

    /// Drops every root but the newest. Refused while a rotation waits, or (unless `force`)
    /// while one of `connected` (node ids) holds a leaf from an issuer other than the current.
    pub async fn retire(&self, force: bool, connected: &[String], remote: &[RemoteLeaf]) -> Result<(), CaError> {
        if self.external {
            return Err(CaError::Refused("the issuer is the operator's (--ca-cert): its roots are the operator's".into()));
        }
        let behind = self.behind(connected, remote);
        let next = {
            let state = lock(&self.state);
            if state.pending.is_some() {
                return Err(CaError::Refused(
                    "a rotation is under way: retire once its issuer has taken over (ferryctl ca status)".into(),
                ));
            }
            if state.roots.len() < 2 {
                return Err(CaError::Refused("the bundle holds one root: there is nothing to retire".into()));
            }
            if !behind.is_empty() && !force {
                return Err(CaError::Refused(format!(
                    "{} connected sidecar(s) still hold a leaf from an older issuer ({}); they renew within seconds of a rotation, or retire with --force",
                    behind.len(),
                    behind.join(", ")
                )));
            }
            let mut next = state.clone();
            let newest = next.roots.pop().expect("at least two roots");
            next.roots = vec![newest];
            next.version += 1;
            next
        };
        self.commit(next).await?;
        tracing::info!(version = self.bundle().version, "CA rotation: older roots retired");
        Ok(())
    }

    /// Of `connected` (node ids), those holding an unexpired leaf from another issuer.
    pub fn behind(&self, connected: &[String], remote: &[RemoteLeaf]) -> Vec<String> {
        let issuer = self.issuer().cert_pem;
        let now = SystemTime::now();
        let issued = lock(&self.issued);
        let mut behind: Vec<String> = connected
            .iter()
            .filter(|node| issued.get(*node).is_some_and(|leaf| leaf.issuer_pem != issuer && leaf.not_after > now))
            .cloned()
            .collect();
        let current = issuer_sha256(&issuer);
        behind.extend(
            remote.iter().filter(|leaf| leaf.issuer_sha256 != current && leaf.not_after > now).map(|leaf| leaf.node_id.clone()),
        );
        behind
    }

    /// What `ferryctl ca status` shows, given the connected sidecars (node ids).
    pub fn status(&self, connected: &[String], remote: &[RemoteLeaf]) -> v1::CaStatus {
        let behind = self.behind(connected, remote);
        let (roots, pending, issuer_pem) = {
            let state = lock(&self.state);
            (state.roots.len(), state.pending.is_some(), state.issuer.cert_pem.clone())
        };
        let current = {
            let issued = lock(&self.issued);
            let sha = issuer_sha256(&issuer_pem);
            connected.iter().filter(|n| issued.get(*n).is_some_and(|leaf| leaf.issuer_pem == issuer_pem)).count()
                + remote.iter().filter(|leaf| leaf.issuer_sha256 == sha).count()
        };
        let rotation = if pending {
            "waiting for every connected sidecar to acknowledge the bundle holding the new root".to_owned()
        } else if roots > 1 && !behind.is_empty() {
            format!("{} sidecar(s) still renewing their leaves under the new issuer", behind.len())
        } else if roots > 1 {
            "every connected sidecar holds a leaf of the new issuer: the old roots can be retired (ferryctl ca retire)".to_owned()
        } else {
            String::new()
        };
        v1::CaStatus {
            bundle: Some((*self.bundle()).clone()),
            rotation,
            roots: u32::try_from(roots).unwrap_or(u32::MAX),
            sidecars: u32::try_from(connected.len() + remote.len()).unwrap_or(u32::MAX),
            sidecars_current: u32::try_from(current).unwrap_or(u32::MAX),
            behind: behind.into_iter().take(20).collect(),
            external: self.external,
            issuer_not_after: authority::not_after(&issuer_pem).ok().map(timestamp),
        }
    }

    /// Replaces the issuer under the newest root when a third of its life is left, so that it
    /// never expires under the leaves it signs. Leaves chain to the same root: nothing fails.
    pub async fn renew_issuer_if_due(&self) -> Result<(), CaError> {
        if self.external {
            return Ok(());
        }
        let next = {
            let state = lock(&self.state);
            let end = authority::not_after(&state.issuer.cert_pem).map_err(CaError::Config)?;
            let left = end.duration_since(SystemTime::now()).unwrap_or_default();
            if left > ISSUER_LIFETIME / 3 || state.pending.is_some() {
                return Ok(());
            }
            let Some(root) = state.roots.last() else { return Ok(()) };
            let mut next = state.clone();
            next.issuer = authority::new_issuer(root, &state.trust_domain, SystemTime::now(), ISSUER_LIFETIME)?;
            next.version += 1;
            next
        };
        self.commit(next).await?;
        tracing::info!("the CA's issuer was renewed under the same root");
        Ok(())
    }

    /// Puts in force the CA as the shared store reports it, when it is newer than the one held
    /// (another replica rotated or renewed it).
    pub fn apply_stored(&self, value: &[u8]) {
        if self.external {
            return;
        }
        let next: Stored = match serde_json::from_slice(value) {
            Ok(next) => next,
            Err(error) => {
                tracing::warn!(%error, "ignoring a certificate authority in the store that does not decode");
                return;
            }
        };
        {
            let mut state = lock(&self.state);
            // The store is the truth: a newer version, or another replica's write of the same
            // version that landed after this one's.
            if next.version < state.version || next == *state || next.trust_domain != state.trust_domain {
                return;
            }
            *state = next.clone();
        }
        self.bundle.send_replace(Arc::new(bundle_of(&next)));
        if let Err(error) = self.write_files() {
            tracing::warn!(%error, "writing the CA's files");
        }
    }

    /// Whether this process runs the CA's scheduled work (ending rotations, renewing the issuer).
    pub fn runs_schedule(&self) -> bool {
        self.scheduled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Lets this process run the CA's scheduled work, or not.
    pub fn set_runs_schedule(&self, runs: bool) {
        self.scheduled.store(runs, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stores `next` (acknowledged once durable), then puts it in force.
    async fn commit(&self, next: Stored) -> Result<(), CaError> {
        let value = serde_json::to_vec(&next).map_err(|e| CaError::Config(e.to_string()))?;
        if !self.external {
            self.store.apply(vec![Write { table: Table::Ca, key: KEY.into(), value: Some(value) }]).await?;
        }
        let bundle = bundle_of(&next);
        *lock(&self.state) = next;
        self.bundle.send_replace(Arc::new(bundle));
        self.write_files()?;
        Ok(())
    }

    /// Writes `ca.pem` (the roots), and with the embedded store the CA's keys (mode 0600).
    fn write_files(&self) -> Result<(), CaError> {
        let state = lock(&self.state).clone();
        let metrics = &self.config.metrics;
        metrics.bundle_version.set(i64::try_from(state.version).unwrap_or(i64::MAX));
        if let Ok(end) = authority::not_after(&state.issuer.cert_pem) {
            let secs = end.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
            metrics.issuer_expiration.set(i64::try_from(secs).unwrap_or(i64::MAX));
        }
        let dir = &self.config.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| CaError::Config(format!("creating {}: {e}", dir.display())))?;
        let roots: String = state.roots.iter().map(|r| r.cert_pem.as_str()).collect();
        write_file(&dir.join("ca.pem"), &roots, 0o644)?;
        if self.config.key_files && !self.external {
            let ca = dir.join("ca");
            std::fs::create_dir_all(&ca).map_err(|e| CaError::Config(format!("creating {}: {e}", ca.display())))?;
            let _ = std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o700));
            if let Some(root) = state.roots.last() {
                write_file(&ca.join("root.pem"), &root.cert_pem, 0o644)?;
                write_file(&ca.join("root.key"), &root.key_pem, 0o600)?;
            }
            write_file(&ca.join("issuer.pem"), &state.issuer.cert_pem, 0o644)?;
            write_file(&ca.join("issuer.key"), &state.issuer.key_pem, 0o600)?;
        }
        Ok(())
    }
}

/// Writes `text` to `path` with `mode`, atomically (a temporary file renamed over it).
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let fail = |e: std::io::Error| CaError::Config(format!("writing {}: {e}", path.display()));
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp).map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    drop(file);
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    std::fs::rename(&temp, path).map_err(fail)
}

fn bundle_of(stored: &Stored) -> v1::TrustBundle {
    v1::TrustBundle {
        trust_domain: stored.trust_domain.clone(),
        roots_pem: stored.roots.iter().map(|r| r.cert_pem.as_str()).collect(),
        issuer_pem: stored.issuer.cert_pem.clone(),
        version: stored.version,
    }
}

async fn load_or_create(config: &CaConfig, store: &dyn Store) -> Result<Stored, CaError> {
    let existing = store.load(Table::Ca).await?.into_iter().find(|(key, _)| key == KEY).map(|(_, value)| value);
    let value = match existing {
        Some(value) => value,
        None => {
            let now = SystemTime::now();
            let root = authority::new_root(&config.trust_domain, now, ROOT_LIFETIME)?;
            let issuer = authority::new_issuer(&root, &config.trust_domain, now, ISSUER_LIFETIME)?;
            let stored =
                Stored { trust_domain: config.trust_domain.clone(), roots: vec![root], issuer, pending: None, version: 1 };
            let value = serde_json::to_vec(&stored).map_err(|e| CaError::Config(e.to_string()))?;
            let held = store.create(Table::Ca, KEY.into(), value.clone()).await?;
            if held == value {
                tracing::info!(trust_domain = %config.trust_domain, "created the mesh's certificate authority");
            }
            held
        }
    };
    let stored: Stored = serde_json::from_slice(&value)
        .map_err(|e| CaError::Config(format!("the stored certificate authority is corrupt: {e}")))?;
    if stored.trust_domain != config.trust_domain {
        return Err(CaError::Config(format!(
            "--trust-domain {}: the store's certificate authority is for trust domain {}; start with --trust-domain {} or a new store",
            config.trust_domain, stored.trust_domain, stored.trust_domain
        )));
    }
    Ok(stored)
}

/// The operator's issuer from `--ca-cert` (the issuer, optionally followed by its chain) and
/// `--ca-key`. The bundle's roots are the self-signed certificates of the chain; a chain without
/// one trusts its last certificate.
fn operator_issuer(trust_domain: &str, cert: &Path, key: &Path) -> Result<Stored, CaError> {
    let read = |path: &Path, flag: &str| {
        std::fs::read_to_string(path).map_err(|e| CaError::Config(format!("{flag} {}: {e}", path.display())))
    };
    let cert_text = read(cert, "--ca-cert")?;
    let key_text = read(key, "--ca-key")?;
    let certs = ferry_tls::pem::certificates(&cert_text).map_err(|e| CaError::Config(format!("--ca-cert: {e}")))?;
    ferry_tls::pem::private_key(&key_text).map_err(|e| CaError::Config(format!("--ca-key: {e}")))?;
    let issuer_pem = ferry_tls::pem::certificate_pem(&certs[0]);
    let pair = CaPair { cert_pem: issuer_pem.clone(), key_pem: key_text };
    // The key must be able to sign as this issuer.
    authority::api_server(&pair, &["ferry-check".into()], SystemTime::now(), Duration::from_secs(60))
        .map_err(|e| CaError::Config(format!("--ca-cert/--ca-key: cannot sign with them: {e}")))?;
    let self_signed: Vec<String> = certs.iter().filter(|c| is_self_signed(c)).map(ferry_tls::pem::certificate_pem).collect();
    let roots = if self_signed.is_empty() {
        vec![certs.last().map(ferry_tls::pem::certificate_pem).unwrap_or(issuer_pem)]
    } else {
        self_signed
    };
    Ok(Stored {
        trust_domain: trust_domain.to_owned(),
        roots: roots.into_iter().map(|cert_pem| CaPair { cert_pem, key_pem: String::new() }).collect(),
        issuer: pair,
        pending: None,
        version: 1,
    })
}

fn is_self_signed(der: &rustls::pki_types::CertificateDer<'_>) -> bool {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der).is_ok_and(|(_, c)| c.subject() == c.issuer())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn config(dir: &Path) -> CaConfig {
        CaConfig {
            trust_domain: "ferry.local".into(),
            cert_ttl: Duration::from_secs(60),
            operator: None,
            data_dir: dir.to_path_buf(),
            key_files: true,
            metrics: Default::default(),
        }
    }

    #[tokio::test]
    async fn control_planes_sharing_a_store_share_one_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let (a, b) = tokio::join!(Authority::open(config(dir.path()), store.clone()), Authority::open(config(dir.path()), store));
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(a.bundle(), b.bundle(), "whoever started first made the CA");
        let key = dir.path().join("ca/issuer.key");
        assert_eq!(std::fs::metadata(&key).expect("key file").permissions().mode() & 0o777, 0o600);
        let pem = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
        assert_eq!(pem, a.bundle().roots_pem);
    }

    #[tokio::test]
    async fn a_rotation_waits_for_trust_then_switches_issuer_then_retires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Authority::open(config(dir.path()), Arc::new(MemoryStore::default())).await.expect("ca");
        let csr = ferry_tls::csr::request("catalog").expect("csr");
        ca.certify("catalog", &csr.csr_pem, "node-1").expect("certified");
        let first = ca.bundle();
        ca.rotate().await.expect("rotates");
        let adding = ca.bundle();
        assert_eq!(adding.issuer_pem, first.issuer_pem, "the old issuer signs until every sidecar trusts the new root");
        assert!(adding.roots_pem.starts_with(&first.roots_pem) && adding.roots_pem.len() > first.roots_pem.len());
        assert!(ca.rotate().await.is_err(), "one rotation at a time");
        assert_eq!(ca.promote(|_| false).await.expect("waits"), Some(adding.version));
        assert_eq!(ca.promote(|acked| acked == adding.version).await.expect("promotes"), None);
        let switched = ca.bundle();
        assert_ne!(switched.issuer_pem, first.issuer_pem);
        let connected = vec!["node-1".to_owned()];
        let refused = ca.retire(false, &connected, &[]).await.expect_err("node-1 still holds an old leaf");
        assert!(refused.to_string().contains("node-1"), "{refused}");
        ca.certify("catalog", &csr.csr_pem, "node-1").expect("renewed");
        // A sidecar of another replica still holds a leaf of the old issuer.
        let elsewhere = RemoteLeaf {
            node_id: "node-2".into(),
            issuer_sha256: issuer_sha256(&first.issuer_pem),
            not_after: SystemTime::now() + Duration::from_secs(3600),
        };
        let refused = ca.retire(false, &connected, std::slice::from_ref(&elsewhere)).await.expect_err("node-2 is behind");
        assert!(refused.to_string().contains("node-2"), "{refused}");
        let renewed = RemoteLeaf { issuer_sha256: issuer_sha256(&switched.issuer_pem), ..elsewhere };
        assert_eq!(ca.status(&connected, std::slice::from_ref(&renewed)).sidecars_current, 2);
        ca.retire(false, &connected, &[renewed]).await.expect("retires");
        let retired = ca.bundle();
        assert!(!retired.roots_pem.contains(&first.roots_pem), "the old root is gone");
        assert_eq!(ferry_tls::pem::certificates(&retired.roots_pem).expect("roots").len(), 1);
        assert!(retired.version > switched.version);
    }

    #[tokio::test]
    async fn an_operators_issuer_signs_and_its_chain_gives_the_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let root = authority::new_root("ferry.local", now, Duration::from_secs(3600)).expect("root");
        let issuer = authority::new_issuer(&root, "ferry.local", now, Duration::from_secs(3600)).expect("issuer");
        let (cert, key) = (dir.path().join("issuer.pem"), dir.path().join("issuer.key"));
        std::fs::write(&cert, format!("{}{}", issuer.cert_pem, root.cert_pem)).expect("cert");
        std::fs::write(&key, &issuer.key_pem).expect("key");
        let operator = CaConfig { operator: Some((cert, key)), ..config(dir.path()) };
        let ca = Authority::open(operator, Arc::new(MemoryStore::default())).await.expect("ca");
        assert_eq!(ca.bundle().roots_pem, root.cert_pem, "the self-signed certificate of the chain is the root");
        let csr = ferry_tls::csr::request("catalog").expect("csr");
        let leaf = ca.certify("catalog", &csr.csr_pem, "").expect("signed by the operator's issuer");
        assert!(leaf.cert_chain_pem.ends_with(&issuer.cert_pem));
        assert!(ca.rotate().await.is_err(), "rotation is the operator's");
        assert!(!dir.path().join("ca").exists(), "no key files of an issuer the control plane does not own");
        let bad =
            CaConfig { operator: Some((dir.path().join("missing.pem"), dir.path().join("issuer.key"))), ..config(dir.path()) };
        let error = Authority::open(bad, Arc::new(MemoryStore::default())).await.err().expect("refused");
        assert!(error.to_string().contains("--ca-cert"), "{error}");
    }

    #[tokio::test]
    async fn a_trust_domain_other_than_the_stores_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        Authority::open(config(dir.path()), store.clone()).await.expect("ca");
        let other = CaConfig { trust_domain: "other.example".into(), ..config(dir.path()) };
        let error = Authority::open(other, store).await.err().expect("refused");
        assert!(error.to_string().contains("trust domain ferry.local"), "{error}");
    }
}
