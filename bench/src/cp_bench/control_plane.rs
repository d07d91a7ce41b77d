//! The control plane under test: real `ferry-control-plane` processes (one on the in-memory
//! store, or replicas on a shared etcd), their bound ports, and how to reach them.

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use ferry_tls::api::HttpApi;
use tokio::process::Command;

use super::{process::Process, scrape::Scrape};

/// How long the control plane may take to print its "listening" line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Only warnings, and the one info line that says which ports were bound: a log line per
/// registration or per stream would cost the control plane CPU that the benchmark would then
/// blame on the push engine.
const LOG_FILTER: &str = "warn,ferry_control_plane::server=info";

/// The command that builds a control plane able to run on etcd.
pub const BUILD_WITH_ETCD: &str = "cargo build --release -p ferry-control-plane --features etcd";

/// The `ferry-control-plane` binary to run: `flag` when given, else a release build next to this
/// benchmark's target directory, else the debug build that the test harness keeps up to date.
pub fn binary(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = flag {
        if !path.is_file() {
            bail!("--control-plane-binary {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("finding the benchmark's own path")?;
    // The benchmark lives in TARGET/PROFILE/; the release control plane in TARGET/release/.
    let mut candidates: Vec<PathBuf> =
        exe.parent().and_then(Path::parent).map(|target| target.join("release/ferry-control-plane")).into_iter().collect();
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ferry-control-plane"));
    if let Some(release) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(release);
    }
    Ok(ferry_tests::binary("ferry-control-plane"))
}

/// Where a control plane keeps its state.
#[derive(Debug, Clone)]
pub enum Store {
    /// `--store memory`: one process, its admin token made at start and written to its data
    /// directory.
    Memory,
    /// `--store etcd://...`: one replica among several, all with the same admin token.
    Etcd {
        /// The `--store` value, `etcd://HOST:PORT[,HOST:PORT...]`.
        url: String,
        replica_id: String,
        /// The admin token's secret, given to every replica as `--bootstrap-token` (through the
        /// environment, so that it is not in the process list).
        token: String,
    },
}

/// A running control plane; killed when dropped.
pub struct ControlPlaneProcess {
    process: Process,
    /// The gRPC listener: the registry API and the sidecars' streams.
    pub grpc: SocketAddr,
    /// The HTTP listener: `/metrics`.
    http: SocketAddr,
    store: Store,
    data_dir: tempfile::TempDir,
}

impl ControlPlaneProcess {
    /// Starts `binary` on loopback with port 0 listeners and waits for its "listening" line.
    pub async fn start(binary: &Path, store: Store) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir().context("creating a data directory")?;
        let mut command = Command::new(binary);
        command.args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0"]);
        command.arg("--data-dir").arg(data_dir.path()).env("FERRY_LOG", LOG_FILTER);
        let name = match &store {
            Store::Memory => {
                command.args(["--store", "memory"]);
                "the control plane".to_owned()
            }
            Store::Etcd { url, replica_id, token } => {
                command.args(["--store", url, "--replica-id", replica_id]).env("FERRY_BOOTSTRAP_TOKEN", token);
                format!("replica {replica_id}")
            }
        };
        let (mut process, bound) = Process::spawn(&name, command, ferry_tests::bound_addresses)?;
        let bound = tokio::select! {
            bound = bound => bound.ok(),
            () = tokio::time::sleep(START_TIMEOUT) => None,
        };
        let Some(bound) = bound else {
            // The reader task may still hold the last lines: give it a moment.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let log = process.log_tail();
            if matches!(store, Store::Etcd { .. }) && log.contains("build feature") {
                bail!(
                    "{} was built without the etcd store, which --etcd and --replicas need; build it with `{BUILD_WITH_ETCD}` (needs protoc), or pass --control-plane-binary:\n{log}",
                    binary.display()
                );
            }
            let state = if process.exited() { "exited" } else { "did not start listening" };
            bail!("{name} ({}) {state} within {START_TIMEOUT:?}:\n{log}", binary.display());
        };
        let address = |listener: &str| -> anyhow::Result<SocketAddr> {
            let value = bound.get(listener).ok_or_else(|| anyhow!("{name} reported no {listener} address"))?;
            value.parse().with_context(|| format!("{name}'s {listener} address {value:?}"))
        };
        let (grpc, http) = (address("grpc")?, address("http")?);
        process.forget_warnings();
        Ok(Self { process, grpc, http, store, data_dir })
    }

    /// What it is, for messages.
    pub fn name(&self) -> &str {
        self.process.name()
    }

    /// How to reach it: TLS verified with the CA it wrote, and the admin token (the control
    /// plane runs with its secure defaults, as in production).
    pub fn access(&self) -> anyhow::Result<ferry_tls::api::Access> {
        let read = |name: &str| {
            let path = self.data_dir.path().join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let token = match &self.store {
            Store::Memory => read("admin.token")?.trim().to_owned(),
            Store::Etcd { token, .. } => token.clone(),
        };
        Ok(ferry_tls::api::Access { url: format!("https://{}", self.grpc), ca_pem: Some(read("ca.pem")?), token: Some(token) })
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Reads its `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Scrape> {
        let access = self.access()?;
        let api = HttpApi::new(self.http, access.ca_pem.as_deref(), access.token).map_err(|e| anyhow!(e))?;
        let answer = api.call(http::Method::GET, "/metrics", None).await.map_err(|e| anyhow!("{e}"))?;
        if answer.0 != http::StatusCode::OK {
            bail!("GET /metrics on {} answered {}", self.name(), answer.0);
        }
        Ok(Scrape::parse(&String::from_utf8_lossy(&answer.2)))
    }

    /// The warnings and errors it logged so far.
    pub fn warnings(&self) -> super::process::Warnings {
        self.process.warnings()
    }

    /// Fails when the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.process.ensure_running()
    }

    /// Its resident set size in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.process.rss_bytes()
    }

    /// The CPU time it has used so far, user and system, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        self.process.cpu_seconds()
    }

    /// Kills it and waits for it to exit (bounded); its data directory goes with it.
    pub async fn stop(self) {
        self.process.stop().await;
    }
}

/// A fresh admin-token secret for replicas that share one: 32 hex digits from the system's
/// random source.
pub fn new_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    Ok(format!("ferry_bench_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_new_each_time() {
        let (a, b) = (new_secret().expect("a secret"), new_secret().expect("a secret"));
        assert_ne!(a, b);
        assert_eq!(a.len(), "ferry_bench_".len() + 32);
    }
}
