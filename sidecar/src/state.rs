//! Static stability: the last good config kept on disk (`--state-dir`), so a sidecar that starts
//! while the control plane is down can serve from it.
//!
//! Every push applied is followed by a write of the whole config the sidecar holds, each service
//! as a full snapshot of `ferry.v1.ServiceResources` (endpoints, route, policy, version) in the
//! proto3 JSON mapping, so an operator can read it. A burst of pushes is written at most every
//! [`MIN_WRITE_INTERVAL`], the last state always. Writes go to a temporary file that is synced
//! and then renamed over the old one, so a crash leaves either the old file or the new one.
//!
//! At start, when the first attempt to reach the control plane fails, or when it has not
//! answered within [`RESTORE_AFTER`], the file is restored into the catalog, in the services the
//! control plane has not answered for; its pushes replace them as usual when it comes back. A file
//! that cannot be read or holds invalid config is ignored with a warning naming it.
//!
//! The file also keeps the sidecar's trust: the trust bundle, its own service's authorization
//! policy, and its workload certificate with its private key, so that a sidecar restarted while
//! the control plane is down still proves who it is and still enforces who may call it, until
//! the certificate expires. These are restored at every start, ahead of the control plane's
//! answers, which replace them. Because of the key the file is written with mode 0600.

use std::{
    fs,
    future::Future,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use ferry_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    catalog::{Catalog, ServiceState},
    control::{ConfigSource, ControlStatus},
    mesh::{self, Mesh},
    metrics::{Metrics, ResultLabels},
};

/// The state file's name in the state directory.
pub const FILE_NAME: &str = "config.json";

/// Where a write goes before it is renamed over the state file.
const TEMP_NAME: &str = "config.json.tmp";

/// The format this sidecar writes and reads.
const FORMAT: u32 = 1;

/// The least time between two writes.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_millis(100);

/// How long a starting sidecar waits for the control plane before it restores the state file,
/// unless the first attempt to reach it fails sooner.
pub const RESTORE_AFTER: Duration = Duration::from_secs(2);

/// The largest state file read: pushes are bounded too.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// A sidecar's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
    file: PathBuf,
}

/// A config as saved.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub saved_at: SystemTime,
    pub services: Vec<v1::ServiceResources>,
    pub trust: SavedTrust,
    /// The mesh's address table, for an intercepting sidecar.
    pub addresses: Option<v1::AddressTable>,
}

/// The sidecar's trust as saved.
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SavedTrust {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<v1::TrustBundle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<v1::AuthorizationUpdate>,
    /// The leaf then its issuer, PEM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_pem: String,
    /// Its private key, PEM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_pem: String,
}

impl std::fmt::Debug for SavedTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SavedTrust")
            .field("trust_bundle", &self.trust_bundle.as_ref().map(|b| b.version))
            .field("authorization", &self.authorization.as_ref().map(|a| a.version))
            .field("certificate", &!self.certificate_pem.is_empty())
            .finish()
    }
}

/// The state file as written.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: u32,
    /// When it was written, RFC 3339.
    saved_at: String,
    /// Every service the sidecar held, as a full snapshot.
    services: Vec<v1::ServiceResources>,
    /// The sidecar's trust.
    #[serde(default)]
    trust: SavedTrust,
    /// The mesh's address table, when the sidecar intercepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    addresses: Option<v1::AddressTable>,
}

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a usable state file: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

impl StateDir {
    /// The state directory `dir`, created if missing.
    pub fn create(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_path_buf(), file: dir.join(FILE_NAME) })
    }

    /// The state file's path.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Writes `services` as the state file, atomically and durably. Blocks.
    pub fn write(&self, saved: &Saved) -> io::Result<()> {
        let file = StateFile {
            format: FORMAT,
            saved_at: humantime::format_rfc3339_millis(saved.saved_at).to_string(),
            services: saved.services.clone(),
            trust: saved.trust.clone(),
            addresses: saved.addresses.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        let temp = self.dir.join(TEMP_NAME);
        // Whatever is at the temporary path goes, a symbolic link included (the link itself, not
        // what it points to); then `create_new` (O_CREAT|O_EXCL) refuses to follow a link that
        // appears in between, so the private key is never written through a planted link.
        let _ = fs::remove_file(&temp);
        // It holds the private key: readable by this user alone.
        let mut out = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?
        };
        out.write_all(&bytes)?;
        out.sync_all()?;
        drop(out);
        fs::rename(&temp, &self.file)?;
        // The rename is durable once the directory itself is synced.
        #[cfg(unix)]
        fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    /// The saved config; `None` when there is no state file.
    pub async fn read(&self) -> Result<Option<Saved>, StateError> {
        let read_error = |source| StateError::Read { path: self.file.clone(), source };
        let invalid = |reason: String| StateError::Invalid { path: self.file.clone(), reason };
        match tokio::fs::metadata(&self.file).await {
            Ok(metadata) if metadata.len() > MAX_FILE_BYTES => {
                return Err(invalid(format!("{} bytes is more than the {MAX_FILE_BYTES} a state file may hold", metadata.len())));
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(read_error(error)),
        }
        let bytes = tokio::fs::read(&self.file).await.map_err(read_error)?;
        // Decoded with the path of what fails (`services[0].snapshot.endpoints[0].port: invalid
        // type ...`), so an operator need not count characters in the file to find it.
        let file: StateFile =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&bytes)).map_err(|e| {
                match e.path().to_string() {
                    path if path == "." => invalid(format!("not the JSON expected: {}", e.inner())),
                    path => invalid(format!("not the JSON expected: {path}: {}", e.inner())),
                }
            })?;
        if file.format != FORMAT {
            return Err(invalid(format!("format {} is not the one this sidecar reads ({FORMAT})", file.format)));
        }
        let saved_at = humantime::parse_rfc3339(&file.saved_at)
            .map_err(|e| invalid(format!("saved_at: {:?} is not an RFC 3339 time: {e}", file.saved_at)))?;
        Ok(Some(Saved { saved_at, services: file.services, trust: file.trust, addresses: file.addresses }))
    }
}

/// Every service the catalog knows, as full snapshots of what the control plane pushed.
pub fn snapshot(catalog: &Catalog) -> Vec<v1::ServiceResources> {
    catalog
        .pushed_states()
        .into_values()
        .filter_map(|state| match state {
            ServiceState::Known(config) => Some(config.to_resources()),
            ServiceState::Pending => None,
        })
        .collect()
}

/// The sidecar's trust, to save.
pub fn trust_snapshot(mesh: &Mesh) -> SavedTrust {
    let identity = mesh.identity();
    SavedTrust {
        trust_bundle: mesh.bundle(),
        authorization: mesh.authorization_update(),
        certificate_pem: identity.as_ref().map(|i| i.chain_pem.clone()).unwrap_or_default(),
        key_pem: identity.as_ref().map(|i| i.key_pem.clone()).unwrap_or_default(),
    }
}

/// Writes the catalog's config and the sidecar's trust to `dir` after every push applied and
/// every renewal, until `shutdown` (the last change is written before it returns).
pub async fn keep(dir: StateDir, catalog: Arc<Catalog>, mesh: Mesh, metrics: Metrics, shutdown: CancellationToken) {
    let writer = Arc::new(Writer { dir, metrics, failing: AtomicBool::new(false) });
    // Either kind of change is a reason to write.
    let changes = watch::Sender::new(0u64);
    let merged = changes.subscribe();
    let (mut applied, mut trust) = (catalog.applied(), mesh.changes());
    let merge = tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = applied.changed() => if changed.is_err() { return },
                changed = trust.changed() => if changed.is_err() { return },
            }
            changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    follow(merged, shutdown, || {
        let table = catalog.addresses();
        let addresses = (table.version > 0).then(|| table.to_proto());
        let saved = Saved { saved_at: SystemTime::now(), services: snapshot(&catalog), trust: trust_snapshot(&mesh), addresses };
        let writer = writer.clone();
        async move { writer.save(saved).await }
    })
    .await;
    merge.abort();
}

/// Puts the saved trust in force at start, ahead of the control plane: the bundle, the
/// authorization policy, and the certificate while it is valid. Returns what was restored.
pub async fn restore_trust(dir: &StateDir, mesh: &Mesh) -> Vec<&'static str> {
    let Ok(Some(saved)) = dir.read().await else { return Vec::new() };
    let trust = saved.trust;
    let mut restored = Vec::new();
    if let Some(pushed) = &trust.trust_bundle {
        match mesh::check_bundle(pushed) {
            Ok(bundle) => {
                mesh.set_bundle(pushed, bundle);
                restored.push("trust bundle");
            }
            Err(error) => tracing::warn!(%error, "ignoring the saved trust bundle"),
        }
    }
    if let Some(update) = &trust.authorization {
        match mesh::check_authorization(update) {
            Ok(compiled) => {
                mesh.set_authorization(update, compiled);
                restored.push("authorization policy");
            }
            Err(error) => tracing::warn!(%error, "ignoring the saved authorization policy"),
        }
    }
    if !trust.certificate_pem.is_empty() {
        match ferry_tls::Issued::from_pem(&trust.certificate_pem, &trust.key_pem) {
            Ok(issued) if !issued.expired(SystemTime::now()) => {
                mesh.set_identity(issued);
                restored.push("workload certificate");
            }
            Ok(_) => tracing::info!("the saved workload certificate has expired"),
            Err(error) => tracing::warn!(%error, "ignoring the saved workload certificate"),
        }
    }
    restored
}

/// Writes the state file off the async threads and reports how it went.
struct Writer {
    dir: StateDir,
    metrics: Metrics,
    /// Whether the last write failed, so a run of failures warns once.
    failing: AtomicBool,
}

impl Writer {
    async fn save(self: Arc<Self>, saved: Saved) {
        let services = saved.services.len();
        let writer = self.clone();
        let result = match tokio::task::spawn_blocking(move || writer.dir.write(&saved)).await {
            Ok(result) => result,
            Err(error) => Err(io::Error::other(error)),
        };
        let file = self.dir.file().display().to_string();
        let result_label = if result.is_ok() { "ok" } else { "failed" };
        self.metrics.state_writes.get_or_create(&ResultLabels { result: result_label }).inc();
        let was_failing = self.failing.swap(result.is_err(), Ordering::Relaxed);
        match (result, was_failing) {
            (Ok(()), true) => tracing::info!(%file, services, "wrote the state file again"),
            (Ok(()), false) => tracing::debug!(%file, services, "wrote the state file"),
            (Err(error), true) => tracing::debug!(%file, %error, "cannot write the state file"),
            (Err(error), false) => tracing::warn!(
                %file,
                %error,
                "cannot write the state file; a restart while the control plane is down would start from an older config, or none"
            ),
        }
    }
}

/// Calls `save` after each change seen on `changes`, at most once per [`MIN_WRITE_INTERVAL`],
/// and once more for a change not yet saved when `shutdown` fires.
async fn follow<F, Fut>(mut changes: watch::Receiver<u64>, shutdown: CancellationToken, mut save: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut last_write: Option<Instant> = None;
    loop {
        let stopping = tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                false
            }
            () = shutdown.cancelled() => true,
        };
        if stopping {
            if changes.has_changed().unwrap_or(false) {
                changes.borrow_and_update();
                save().await;
            }
            return;
        }
        if let Some(at) = last_write {
            tokio::select! {
                () = tokio::time::sleep_until(at + MIN_WRITE_INTERVAL) => {}
                () = shutdown.cancelled() => {}
            }
        }
        // Seen before the save: a change during it is saved next.
        changes.borrow_and_update();
        save().await;
        last_write = Some(Instant::now());
    }
}

/// Restores the state file into the catalog if the control plane has not answered when its
/// first connection attempt fails, or after [`RESTORE_AFTER`].
pub async fn restore_when_unreachable(
    dir: StateDir,
    catalog: Arc<Catalog>,
    status: Arc<ControlStatus>,
    shutdown: CancellationToken,
) {
    let mut control = status.watch();
    let first_attempt = control.wait_for(|s| s.last_contact.is_some() || s.last_error.is_some());
    tokio::select! {
        _ = tokio::time::timeout(RESTORE_AFTER, first_attempt) => {}
        () = shutdown.cancelled() => return,
    }
    if status.get().last_contact.is_some() {
        return;
    }
    restore(&dir, &catalog, &status).await;
}

/// Restores the state file into the catalog; logs why not when it cannot.
pub async fn restore(dir: &StateDir, catalog: &Catalog, status: &ControlStatus) {
    let file = dir.file().display().to_string();
    let saved = match dir.read().await {
        Ok(Some(saved)) => saved,
        Ok(None) => {
            tracing::info!(%file, "the control plane is unreachable and there is no state file to start from");
            return;
        }
        Err(error) => {
            tracing::warn!(%file, %error, "ignoring the state file");
            return;
        }
    };
    if let Some(table) = &saved.addresses {
        match catalog.restore_addresses(table) {
            Ok(true) => tracing::info!(%file, version = table.version, "serving the address table saved in the state file"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%file, %error, "ignoring the address table of the state file"),
        }
    }
    match catalog.restore(&saved.services) {
        Ok(restored) => {
            status.update(|s| {
                // The control plane may have answered meanwhile; then its config is in force.
                if s.config_source != ConfigSource::ControlPlane {
                    s.config_source = ConfigSource::StateDir { saved_at: saved.saved_at };
                }
            });
            let saved_at = humantime::format_rfc3339_millis(saved.saved_at).to_string();
            let services = restored.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
            tracing::info!(%file, %saved_at, services = %services, "the control plane is unreachable: serving the config saved in the state file");
        }
        Err(rejection) => {
            tracing::warn!(%file, error = %rejection.error, "ignoring the state file: it holds invalid config");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ferry_proto::v1::service_resources::Endpoints;

    use super::*;

    fn resources(service: &str, version: u64, port: u32) -> v1::ServiceResources {
        let endpoint = v1::Endpoint {
            id: format!("{service}-1"),
            address: "127.0.0.1".into(),
            port,
            health: v1::Health::Passing as i32,
            metadata: [("version".to_owned(), "v1".to_owned())].into(),
            weight: 100,
            ..Default::default()
        };
        v1::ServiceResources {
            service: service.into(),
            version,
            exists: true,
            endpoints: Some(Endpoints::Snapshot(v1::Endpoints { endpoints: vec![endpoint] })),
            route: Some(v1::RouteUpdate { route: None }),
            policy: Some(v1::PolicyUpdate { policy: None }),
            virtual_ip: String::new(),
        }
    }

    fn push(nonce: &str, resources: Vec<v1::ServiceResources>) -> v1::Push {
        v1::Push { nonce: nonce.into(), resources, ..Default::default() }
    }

    #[tokio::test]
    async fn the_config_written_is_the_config_read_back() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::create(&temp.path().join("nested")).expect("creates the directory");
        assert_eq!(dir.read().await.expect("no file is no error"), None);

        let catalog = Catalog::new(16);
        catalog.apply(&push("1", vec![resources("catalog", 7, 8080), resources("inventory", 3, 9090)])).expect("applies");
        let saved_at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let saved = Saved { saved_at, services: snapshot(&catalog), trust: SavedTrust::default(), addresses: None };
        dir.write(&saved).expect("writes");
        assert!(!temp.path().join("nested").join(TEMP_NAME).exists(), "the temporary file was renamed");
        let read = dir.read().await.expect("reads").expect("a file");
        assert_eq!(read, saved);

        let restored = Catalog::new(16);
        restored.restore(&read.services).expect("restores");
        assert_eq!(restored.versions(), catalog.versions());
        let text = std::fs::read_to_string(dir.file()).expect("text");
        assert!(text.contains(r#""service": "catalog""#), "readable JSON: {text}");
    }

    #[test]
    fn a_link_planted_at_the_temporary_path_is_not_followed() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::create(&temp.path().join("state")).expect("creates the directory");
        let victim = temp.path().join("victim");
        std::fs::write(&victim, "untouched").expect("a victim file");
        std::os::unix::fs::symlink(&victim, temp.path().join("state").join(TEMP_NAME)).expect("a planted link");
        let saved =
            Saved { saved_at: SystemTime::UNIX_EPOCH, services: Vec::new(), trust: SavedTrust::default(), addresses: None };
        dir.write(&saved).expect("writes");
        assert_eq!(std::fs::read_to_string(&victim).expect("the victim"), "untouched");
        let meta = std::fs::symlink_metadata(dir.file()).expect("the state file");
        assert!(meta.file_type().is_file(), "the state file is a regular file, not the link");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        // A dangling link to a path that does not exist yet is not followed either.
        let target = temp.path().join("would-be-created");
        std::os::unix::fs::symlink(&target, temp.path().join("state").join(TEMP_NAME)).expect("a dangling link");
        dir.write(&saved).expect("writes");
        assert!(!target.exists(), "nothing was created through the link");
    }

    #[tokio::test]
    async fn an_intercepting_sidecar_keeps_the_address_table() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::create(temp.path()).expect("creates the directory");
        let catalog = Catalog::new(16);
        let table = v1::AddressTable {
            version: 9,
            full: true,
            upserted: vec![v1::ServiceAddresses {
                service: "catalog".into(),
                virtual_ip: "240.240.0.7".into(),
                endpoints: vec!["10.0.0.2:8080".into()],
            }],
            ..Default::default()
        };
        catalog.apply(&v1::Push { addresses: Some(table.clone()), ..push("1", vec![]) }).expect("applies");
        let addresses = (catalog.addresses().version > 0).then(|| catalog.addresses().to_proto());
        dir.write(&Saved { saved_at: SystemTime::now(), services: vec![], trust: SavedTrust::default(), addresses })
            .expect("writes");
        let restored = Catalog::new(16);
        restore(&dir, &restored, &ControlStatus::default()).await;
        assert_eq!(restored.addresses().to_proto(), table);
        assert_eq!(restored.addresses_version(), 9, "Hello will say which table it holds");
    }

    #[tokio::test]
    async fn a_bad_state_file_is_refused_naming_the_file_and_the_reason() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::create(temp.path()).expect("creates");
        let file = dir.file().display().to_string();
        let good = serde_json::to_string(&StateFile {
            format: FORMAT,
            saved_at: "2026-01-02T03:04:05.678Z".into(),
            services: vec![resources("catalog", 7, 8080)],
            trust: SavedTrust::default(),
            addresses: None,
        })
        .expect("JSON");
        for (content, reason) in [
            ("\u{0}\u{1}garbage".to_owned(), "not the JSON expected"),
            (good[..good.len() / 2].to_owned(), "not the JSON expected"),
            (good.replace(r#""format":1"#, r#""format":9"#), "format 9"),
            (good.replace("2026-01-02T03:04:05.678Z", "yesterday"), "saved_at"),
            (r#"{"format": 1}"#.to_owned(), "missing field"),
        ] {
            std::fs::write(dir.file(), &content).expect("writes");
            let error = dir.read().await.expect_err(reason).to_string();
            assert!(error.starts_with(&format!("{file} is not a usable state file: ")), "{error}");
            assert!(error.contains(reason), "{reason}: {error}");
        }

        // A file that reads well but holds invalid config is ignored whole.
        let invalid = good.replace(r#""port":8080"#, r#""port":0"#);
        assert_ne!(invalid, good);
        std::fs::write(dir.file(), invalid).expect("writes");
        let catalog = Catalog::new(16);
        let status = ControlStatus::default();
        restore(&dir, &catalog, &status).await;
        assert!(catalog.states().is_empty());
        assert_eq!(status.get().config_source, ConfigSource::None);

        // A directory where the file should be cannot be read.
        std::fs::remove_file(dir.file()).expect("removes");
        std::fs::create_dir(dir.file()).expect("a directory in its place");
        let error = dir.read().await.expect_err("a directory").to_string();
        assert!(error.starts_with(&format!("cannot read {file}: ")), "{error}");
        assert!(
            dir.write(&Saved { saved_at: SystemTime::now(), services: vec![], trust: SavedTrust::default(), addresses: None })
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_good_file_is_restored_and_marks_the_source() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::create(temp.path()).expect("creates");
        let saved_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        dir.write(&Saved {
            saved_at,
            services: vec![resources("catalog", 7, 8080)],
            trust: SavedTrust::default(),
            addresses: None,
        })
        .expect("writes");
        let catalog = Catalog::new(16);
        let status = ControlStatus::default();
        restore(&dir, &catalog, &status).await;
        assert_eq!(catalog.versions().get("catalog"), Some(&7));
        assert_eq!(status.get().config_source, ConfigSource::StateDir { saved_at });
    }

    /// Each save: when it happened (paused time since the start) and the change it saw.
    type Saves = Arc<Mutex<Vec<(Duration, u64)>>>;

    /// Saves recorded with the (paused) time they happened at.
    fn recorder(changes: watch::Receiver<u64>) -> (Saves, impl FnMut() -> futures::future::Ready<()>) {
        let saves = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let record = saves.clone();
        let save = move || {
            record.lock().expect("not poisoned").push((started.elapsed(), *changes.borrow()));
            futures::future::ready(())
        };
        (saves, save)
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_pushes_is_written_at_most_every_interval_and_the_last_one_always() {
        let changes = watch::Sender::new(0u64);
        let shutdown = CancellationToken::new();
        let (saves, save) = recorder(changes.subscribe());
        let writer = tokio::spawn(follow(changes.subscribe(), shutdown.clone(), save));

        // 50 pushes, one every 5 ms.
        for n in 1..=50 {
            changes.send_replace(n);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let saves = saves.lock().expect("not poisoned").clone();
        assert_eq!(saves.last().map(|s| s.1), Some(50), "the last state is written: {saves:?}");
        assert!(saves.len() <= 4, "250 ms of pushes, at most one write per 100 ms and the first at once: {saves:?}");
        for pair in saves.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= MIN_WRITE_INTERVAL, "{saves:?}");
        }
        assert_eq!(saves[0], (Duration::ZERO, 1), "the first push is written at once");

        // Quiet: nothing more is written, and shutdown returns.
        shutdown.cancel();
        writer.await.expect("joins");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_not_yet_written_is_written_at_shutdown() {
        let changes = watch::Sender::new(0u64);
        let shutdown = CancellationToken::new();
        let (saves, save) = recorder(changes.subscribe());
        let writer = tokio::spawn(follow(changes.subscribe(), shutdown.clone(), save));
        changes.send_replace(1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        changes.send_replace(2);
        tokio::time::sleep(Duration::from_millis(1)).await;
        shutdown.cancel();
        writer.await.expect("joins");
        let saves = saves.lock().expect("not poisoned").clone();
        assert_eq!(saves.iter().map(|s| s.1).collect::<Vec<_>>(), [1, 2], "{saves:?}");
        assert!(saves[1].0 < MIN_WRITE_INTERVAL, "shutdown does not wait for the interval: {saves:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_file_is_restored_once_the_first_attempt_fails_or_the_bound_passes() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::create(temp.path()).expect("creates");
        dir.write(&Saved {
            saved_at: SystemTime::now(),
            services: vec![resources("catalog", 7, 8080)],
            trust: SavedTrust::default(),
            addresses: None,
        })
        .expect("writes");

        // The first attempt fails: restored at once.
        let (catalog, status) = (Arc::new(Catalog::new(16)), Arc::new(ControlStatus::default()));
        let task = tokio::spawn(restore_when_unreachable(dir.clone(), catalog.clone(), status.clone(), CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(catalog.states().is_empty());
        status.update(|s| s.last_error = Some("connection refused".into()));
        task.await.expect("joins");
        assert_eq!(catalog.versions().get("catalog"), Some(&7));

        // No answer at all: restored after the bound.
        let (catalog, status) = (Arc::new(Catalog::new(16)), Arc::new(ControlStatus::default()));
        let started = Instant::now();
        restore_when_unreachable(dir.clone(), catalog.clone(), status.clone(), CancellationToken::new()).await;
        assert_eq!(started.elapsed(), RESTORE_AFTER);
        assert_eq!(catalog.versions().get("catalog"), Some(&7));

        // The control plane answered: nothing restored.
        let (catalog, status) = (Arc::new(Catalog::new(16)), Arc::new(ControlStatus::default()));
        status.update(|s| s.last_contact = Some(SystemTime::now()));
        restore_when_unreachable(dir, catalog.clone(), status.clone(), CancellationToken::new()).await;
        assert!(catalog.states().is_empty());
        assert_eq!(status.get().config_source, ConfigSource::None);
    }
}
