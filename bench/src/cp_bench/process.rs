//! The processes the benchmark starts (control-plane replicas, etcd members): each with its log's
//! last lines kept to explain a failure, what `/proc` says about its memory and CPU, and a stop
//! that is bounded in time.

use std::{
    collections::{HashMap, VecDeque},
    path::Path,
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

/// Log lines kept to explain a failure.
const LOG_TAIL: usize = 40;

/// How long a killed process may take to be reaped before the benchmark stops waiting for it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process, killed when dropped.
pub struct Process {
    name: String,
    child: Child,
    pid: u32,
    log: Arc<Mutex<VecDeque<String>>>,
    warnings: Arc<Mutex<Warnings>>,
}

/// The warnings and errors a process logged: how many, and the last one.
#[derive(Debug, Clone, Default)]
pub struct Warnings {
    pub count: usize,
    pub last: Option<String>,
}

/// Whether a log line is a warning or an error, in Ferry's log format or etcd's JSON one.
fn is_warning(line: &str) -> bool {
    line.contains(" WARN ")
        || line.contains(" ERROR ")
        || line.contains("\"level\":\"warn\"")
        || line.contains("\"level\":\"error\"")
}

impl Process {
    /// Starts `command` with its stderr read line by line into the log tail. The first line for
    /// which `bound` returns addresses (the "listening" line) is sent to the receiver returned.
    pub fn spawn(
        name: &str,
        mut command: Command,
        bound: fn(&str) -> Option<HashMap<String, String>>,
    ) -> anyhow::Result<(Self, oneshot::Receiver<HashMap<String, String>>)> {
        let program = command.as_std().get_program().to_string_lossy().into_owned();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} ({program}) exited at once"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("the stderr of {name} is not piped"))?;
        let log = Arc::new(Mutex::new(VecDeque::with_capacity(LOG_TAIL)));
        let (listening, addresses) = oneshot::channel();
        let tail = log.clone();
        let warnings = Arc::new(Mutex::new(Warnings::default()));
        let warned = warnings.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut listening = Some(listening);
            while let Ok(Some(line)) = lines.next_line().await {
                if listening.is_some()
                    && let Some(found) = bound(&line)
                    && let Some(listening) = listening.take()
                {
                    let _ = listening.send(found);
                }
                if is_warning(&line) {
                    let mut warned = warned.lock().unwrap_or_else(|p| p.into_inner());
                    warned.count += 1;
                    warned.last = Some(line.clone());
                }
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == LOG_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        Ok((Self { name: name.to_owned(), child, pid, log, warnings }, addresses))
    }

    /// What it is, for messages: `replica cp-1`, `etcd member e0`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The warnings and errors it logged so far.
    pub fn warnings(&self) -> Warnings {
        self.warnings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets the warnings logged so far: those of starting up (an etcd member warns while it
    /// waits for its peers) say nothing about the run.
    pub fn forget_warnings(&self) {
        *self.warnings.lock().unwrap_or_else(|p| p.into_inner()) = Warnings::default();
    }

    /// Fails when the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!("{} exited ({status}):\n{}", self.name, self.log_tail()),
            Err(error) => Err(error).with_context(|| format!("checking on {}", self.name)),
        }
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Its resident set size in bytes (`VmRSS` of `/proc/PID/status`).
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path} ({})", self.name))?;
        vm_rss(&status).ok_or_else(|| anyhow!("{path} has no VmRSS line"))
    }

    /// The CPU time it has used so far, user and system, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        process_cpu_seconds(&self.pid.to_string())
    }

    /// Kills it (SIGKILL) and waits for it to exit, at most [`STOP_TIMEOUT`].
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await.is_err() {
            eprintln!("ferry-cp-bench: {} (pid {}) did not exit within {STOP_TIMEOUT:?} of SIGKILL", self.name, self.pid);
        }
    }
}

/// Whether `program` runs and answers `--version` within a few seconds.
pub async fn runs(program: &Path) -> bool {
    let mut command = Command::new(program);
    command.arg("--version").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
    matches!(tokio::time::timeout(Duration::from_secs(10), command.status()).await, Ok(Ok(status)) if status.success())
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
/// processes started from here (which inherit it), within the hard limit.
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

    #[test]
    fn warnings_are_told_apart_in_both_log_formats() {
        assert!(is_warning("2026-12-07T06:00:00Z  WARN ferry_control_plane::cluster: the store is unavailable"));
        assert!(is_warning(r#"{"level":"warn","ts":"2026-12-07T06:15:07.875Z","msg":"slow fdatasync"}"#));
        assert!(!is_warning("2026-12-07T06:00:00Z  INFO ferry_control_plane::server: listening grpc=127.0.0.1:1"));
    }

    #[tokio::test]
    async fn a_program_that_is_not_there_does_not_run() {
        assert!(!runs(Path::new("/nonexistent/ferry-cp-bench-no-such-program")).await);
    }
}
