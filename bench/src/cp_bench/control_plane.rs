//! The control plane under test: a real `ferry-control-plane` process, its bound ports, and what
//! `/proc` says about its memory and CPU.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

/// How long the control plane may take to print its "listening" line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Log lines kept to explain a failure.
const LOG_TAIL: usize = 40;

/// Only warnings, and the one info line that says which ports were bound: a log line per
/// registration or per stream would cost the control plane CPU that the benchmark would then
/// blame on the push engine.
const LOG_FILTER: &str = "warn,ferry_control_plane::server=info";

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

/// A running control plane with the in-memory store; killed when dropped.
pub struct ControlPlaneProcess {
    child: Child,
    pid: u32,
    /// The gRPC listener: the registry API and the sidecars' streams.
    pub grpc: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    _data_dir: tempfile::TempDir,
}

impl ControlPlaneProcess {
    /// Starts `binary` on loopback with port 0 listeners and waits for its "listening" line.
    pub async fn start(binary: &Path) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir().context("creating a data directory")?;
        let mut child = Command::new(binary)
            .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--store", "memory"])
            .arg("--data-dir")
            .arg(data_dir.path())
            .env("FERRY_LOG", LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("{} exited at once", binary.display()))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("the control plane's stderr is not piped"))?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let (listening, bound) = oneshot::channel();
        let tail = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut listening = Some(listening);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(bound) = ferry_tests::bound_addresses(&line)
                    && let Some(listening) = listening.take()
                {
                    let _ = listening.send(bound);
                }
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let mut process = Self { child, pid, grpc: SocketAddr::from(([127, 0, 0, 1], 0)), log, _data_dir: data_dir };
        let bound = match tokio::time::timeout(START_TIMEOUT, bound).await {
            Ok(Ok(bound)) => bound,
            _ => bail!("the control plane did not start within {START_TIMEOUT:?}:\n{}", process.log_tail()),
        };
        let grpc = bound.get("grpc").ok_or_else(|| anyhow!("the control plane reported no grpc address"))?;
        process.grpc = grpc.parse().with_context(|| format!("the control plane's grpc address {grpc:?}"))?;
        Ok(process)
    }

    /// How to reach it: TLS verified with the CA it wrote, and the admin token it made (the
    /// control plane runs with its secure defaults, as in production).
    pub fn access(&self) -> anyhow::Result<ferry_tls::api::Access> {
        let read = |name: &str| {
            let path = self._data_dir.path().join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(ferry_tls::api::Access {
            url: format!("https://{}", self.grpc),
            ca_pem: Some(read("ca.pem")?),
            token: Some(read("admin.token")?.trim().to_owned()),
        })
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Fails when the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("the control plane exited ({status}):\n{}", self.log_tail()),
            Err(error) => Err(error).context("checking on the control plane"),
        }
    }

    /// Its resident set size in bytes (`VmRSS` of `/proc/PID/status`).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        vm_rss(&status).ok_or_else(|| anyhow!("{path} has no VmRSS line"))
    }

    /// The CPU time it has used so far, user and system, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        process_cpu_seconds(&self.pid.to_string())
    }

    /// Kills it and waits for it to exit.
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The CPU time that process `pid` (a number, or `self`) has used, user and system, in seconds.
pub fn process_cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = cpu_ticks(&stat).ok_or_else(|| anyhow!("cannot read utime and stime from {path}"))?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// The `VmRSS` of a `/proc/PID/status` text, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks. The command
/// name (field 2) is in parentheses and may hold spaces, so fields are counted after its `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: utime is field 14, the 12th here.
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `sysconf(_SC_CLK_TCK)`, or 100 when the system does not say.
fn clock_ticks_per_second() -> u64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100,
        ticks => ticks,
    }
}

/// Raises the soft limit of open files to what `connections` streams need, here and in the
/// control plane (which inherits it), within the hard limit.
pub fn raise_open_files(connections: usize) -> anyhow::Result<()> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // Each process holds one socket per stream, plus listeners, the runtime and a margin.
    let needed = connections as u64 + 512;
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= needed) {
        return Ok(());
    }
    if limit.maximum.is_some_and(|maximum| maximum < needed) {
        bail!(
            "{connections} sidecars need about {needed} open files per process, but the hard limit is {}; raise it (ulimit -Hn) or run fewer sidecars",
            limit.maximum.unwrap_or_default()
        );
    }
    let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
    setrlimit(Resource::Nofile, raised).context("raising the limit of open files")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_cpu_from_proc() {
        assert_eq!(vm_rss("Name:\tx\nVmRSS:\t  2048 kB\nVmSwap: 0 kB\n"), Some(2048 * 1024));
        assert_eq!(vm_rss("Name:\tx\n"), None);
        let stat = "4242 (ferry control) S 1 4242 4242 0 -1 4194304 900 0 0 0 150 25 0 0 20 0 8 0 1000 2000000 500";
        assert_eq!(cpu_ticks(stat), Some(175));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_an_rss_and_clock_ticks() {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        assert!(vm_rss(&status).is_some_and(|rss| rss > 0));
        let stat = std::fs::read_to_string("/proc/self/stat").expect("procfs");
        assert!(cpu_ticks(&stat).is_some());
        assert!(clock_ticks_per_second() > 0);
    }
}
