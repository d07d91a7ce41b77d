//! `ferry-bench`: the benchmark suite's driver. It measures Ferry's data path against the same
//! upstream reached directly and through HAProxy and nginx (throughput with wrk and h2load,
//! latency at fixed rates with an open-loop generator, CPU and memory of the proxies from
//! `/proc`), runs the control-plane benchmark `ferry-cp-bench` when it is built, and writes a
//! JSON file with every number and a markdown report with charts.
//!
//! It builds nothing: it runs the release binaries next to itself (or those it is pointed at),
//! so it is run after `cargo build --release`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Serialize;

pub mod dataplane;
pub mod load;
pub mod procstat;
pub mod report;
pub mod tools;

use dataplane::{Addressing, PathKind, Running};
use load::{OpenLoop, OpenLoopResult, Protocol};
use tools::Throughput;

/// Benchmarks Ferry's data path against HAProxy and nginx, and its control plane.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench")]
pub struct Options {
    /// Seconds-long runs at lower rates (200 and 1,000 rps), for CI: every figure, less precise.
    #[arg(long)]
    pub quick: bool,

    /// Write benchmarks.md, benchmarks.json and the charts into DIR (default: docs/benchmarks.md
    /// in the workspace, with the JSON and charts in docs/benchmarks/).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Where Ferry's release binaries are (default: next to ferry-bench, else target/release).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,

    /// The ferry-sidecar binary to measure.
    #[arg(long, value_name = "PATH")]
    pub sidecar: Option<PathBuf>,

    /// The ferry-control-plane binary.
    #[arg(long, value_name = "PATH")]
    pub control_plane: Option<PathBuf>,

    /// The ferry-cp-bench binary (default: next to ferry-bench; skipped with a note when absent).
    #[arg(long, value_name = "PATH")]
    pub cp_bench: Option<PathBuf>,

    /// Sidecars the control-plane benchmark connects (default: 1,000; its own default with --quick).
    #[arg(long, value_name = "N")]
    pub cp_sidecars: Option<u32>,

    /// Worker threads of every proxy (default: the sidecar's own default, tokio's one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Only these paths, comma-separated (direct, ferry-1hop, ferry-1hop-host, ferry-1hop-proxy,
    /// ferry-mesh, ferry-mesh-mtls, haproxy, nginx).
    #[arg(long, value_delimiter = ',', value_parser = parse_path, value_name = "PATH,...")]
    pub paths: Vec<PathKind>,

    /// Keep the directory with the proxies' configs and logs.
    #[arg(long)]
    pub keep: bool,
}

fn parse_path(s: &str) -> Result<PathKind, String> {
    PathKind::ALL
        .into_iter()
        .find(|p| p.name() == s)
        .ok_or_else(|| format!("unknown path {s:?}: expected one of {}", PathKind::ALL.map(PathKind::name).join(", ")))
}

/// How long and how hard each run is.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub quick: bool,
    pub run_seconds: u64,
    pub warmup_seconds: u64,
    /// Throughput runs per path and protocol; the median is reported.
    pub rounds: usize,
    pub wrk_connections: u32,
    pub h2load_connections: u32,
    pub h2load_streams: u32,
    /// The fixed rates of the open-loop runs, requests per second.
    pub rates: Vec<u32>,
    pub open_loop_http1_connections: usize,
    pub open_loop_h2c_connections: usize,
}

impl Scenario {
    /// The full suite, or the quick one.
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                run_seconds: 1,
                warmup_seconds: 0,
                rounds: 1,
                wrk_connections: 16,
                h2load_connections: 4,
                h2load_streams: 8,
                rates: vec![200, 1_000],
                open_loop_http1_connections: 16,
                open_loop_h2c_connections: 2,
            }
        } else {
            Self {
                quick,
                run_seconds: 10,
                warmup_seconds: 2,
                rounds: 3,
                wrk_connections: 64,
                h2load_connections: 16,
                h2load_streams: 16,
                rates: vec![1_000, 10_000],
                open_loop_http1_connections: 64,
                open_loop_h2c_connections: 4,
            }
        }
    }
}

/// What a run cost the proxy processes (and the upstream, for reference).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    /// User plus system CPU of the proxies over the run (None for `direct`).
    pub proxy_cpu_seconds: Option<f64>,
    pub proxy_cpu_seconds_per_1k: Option<f64>,
    pub upstream_cpu_seconds_per_1k: Option<f64>,
    /// The largest summed RSS of the proxies sampled during the run.
    pub proxy_rss_peak_bytes: Option<u64>,
}

/// A closed-loop throughput run and its cost.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRun {
    pub tool: String,
    #[serde(flatten)]
    pub result: Throughput,
    pub cost: Cost,
    /// Requests per second of every round; this run is the median one.
    pub rounds_rps: Vec<f64>,
}

/// An open-loop run and its cost.
#[derive(Debug, Clone, Serialize)]
pub struct RateRun {
    #[serde(flatten)]
    pub result: OpenLoopResult,
    pub cost: Cost,
}

/// A path's figures in one protocol.
#[derive(Debug, Clone, Serialize)]
pub struct ProtocolResult {
    pub protocol: Protocol,
    /// Why this path does not carry the protocol, if it does not.
    pub unavailable: Option<String>,
    pub throughput: Option<ThroughputRun>,
    pub rates: Vec<RateRun>,
}

/// Memory of one proxy process.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessMemory {
    pub name: String,
    pub idle_rss_bytes: u64,
    /// Of the idle RSS, anonymous memory (heap, stacks) and file-backed pages (code).
    pub idle_rss_anon_bytes: u64,
    pub idle_rss_file_bytes: u64,
    /// The largest RSS sampled during the runs.
    pub load_rss_peak_bytes: u64,
    /// `VmHWM` after the runs: the peak since start, start-up included.
    pub hwm_bytes: u64,
}

/// Everything measured on one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathResult {
    pub path: PathKind,
    pub description: String,
    pub processes: Vec<ProcessMemory>,
    /// The proxies' summed RSS before any load.
    pub idle_rss_bytes: Option<u64>,
    /// The proxies' largest summed RSS sampled under load.
    pub load_rss_bytes: Option<u64>,
    pub protocols: Vec<ProtocolResult>,
    /// Set when the path could not be measured at all.
    pub failed: Option<String>,
}

impl PathResult {
    /// The figures in `protocol`.
    pub fn protocol(&self, protocol: Protocol) -> Option<&ProtocolResult> {
        self.protocols.iter().find(|p| p.protocol == protocol && p.unavailable.is_none())
    }
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_bytes: u64,
    pub load_average_at_start: String,
}

impl Machine {
    /// Reads `/proc`.
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned()))
            .unwrap_or_else(|| "unknown".into());
        let memory_kb: u64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let load = read("/proc/loadavg");
        Self {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            memory_bytes: memory_kb * 1024,
            load_average_at_start: load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        }
    }
}

/// The control-plane benchmark's outcome.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ControlPlaneBench {
    Ran { command: String, result: serde_json::Value },
    Absent { reason: String },
    Failed { command: String, reason: String },
}

/// Everything one `ferry-bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub date: String,
    pub machine: Machine,
    pub tools: Vec<String>,
    pub threads: usize,
    pub scenario: Scenario,
    pub paths: Vec<PathResult>,
    pub control_plane: ControlPlaneBench,
    /// What could not be measured (the run then exits non-zero).
    pub problems: Vec<String>,
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The workspace this binary was built from (where `docs/` is).
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match manifest.parent() {
        Some(root) if root.join("Cargo.toml").is_file() => root.to_path_buf(),
        _ => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    }
}

/// Where Ferry's release binaries are: next to this binary when it is there, else the
/// workspace's target/release.
fn bin_dir(options: &Options) -> PathBuf {
    if let Some(dir) = &options.bin_dir {
        return dir.clone();
    }
    let here = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf));
    match here {
        Some(dir) if dir.join("ferry-sidecar").is_file() => dir,
        _ => workspace_root().join("target").join("release"),
    }
}

fn existing(path: PathBuf, what: &str) -> anyhow::Result<PathBuf> {
    if !path.is_file() {
        bail!("no {what} at {}: build it first with `cargo build --release` (or pass its path)", path.display());
    }
    Ok(path)
}

/// Runs the suite and writes the report.
pub fn main(options: Options) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("ferry-bench: warning: this is a debug build; the generator's figures are not comparable (use --release)");
    }
    let bins = bin_dir(&options);
    let sidecar = existing(options.sidecar.clone().unwrap_or_else(|| bins.join("ferry-sidecar")), "ferry-sidecar")?;
    let control_plane =
        existing(options.control_plane.clone().unwrap_or_else(|| bins.join("ferry-control-plane")), "ferry-control-plane")?;
    if sidecar.components().any(|c| c.as_os_str() == "debug") {
        eprintln!("ferry-bench: warning: {} looks like a debug build", sidecar.display());
    }
    let tools = tools::Tools::find_or_install()?;
    let threads = options.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let layout = report::Layout::new(options.out.as_deref(), &workspace_root());
    let scenario = Scenario::new(options.quick);
    let machine = Machine::read();
    let date = report::utc_date(std::time::SystemTime::now());

    let dir = tempfile::Builder::new().prefix("ferry-bench-").tempdir()?;
    if is_root() {
        // nginx's workers run as nobody and need to reach their temp paths.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    eprintln!("ferry-bench: {} threads per proxy; configs and logs in {}", threads, dir.path().display());
    let setup = dataplane::Setup {
        sidecar,
        control_plane,
        haproxy: tools.haproxy.clone(),
        nginx: tools.nginx.clone(),
        threads,
        dir: dir.path().to_path_buf(),
    };

    let kinds = if options.paths.is_empty() { PathKind::ALL.to_vec() } else { options.paths.clone() };
    let wrk_proxy_script = tools::write_wrk_proxy_script(dir.path(), dataplane::AUTHORITY)?;
    let upstream = dataplane::Upstream::start(dir.path())?;
    let cp = dataplane::ControlPlane::start(&setup)?;
    let probe = dataplane::Probe::new()?;
    // Every path is up at once and each scenario runs on one path after the other, so that a
    // neighbour's load that comes and goes on a shared machine spreads over all paths.
    let mut paths: Vec<PathRun> = kinds
        .into_iter()
        .map(|kind| {
            let running = dataplane::start(kind, &setup, upstream.addr, &cp, &probe).map_err(|error| {
                eprintln!("ferry-bench: {kind} failed to start: {error:#}");
                format!("{error:#}")
            });
            PathRun::new(kind, running)
        })
        .collect();
    let started = Instant::now();
    let suite = Suite { scenario: &scenario, tools: &tools, upstream: upstream.pid(), wrk_proxy_script: &wrk_proxy_script };
    let mut problems = suite.run(&mut paths);
    eprintln!("ferry-bench: data path measured in {:.0?}", started.elapsed());
    let results: Vec<PathResult> = paths.into_iter().map(PathRun::finish).collect();
    problems.extend(results.iter().filter_map(|p| Some(format!("{} did not start: {}", p.path, p.failed.as_ref()?))));
    drop(cp);
    drop(upstream);

    let control_plane = run_cp_bench(&options, dir.path());
    if let ControlPlaneBench::Failed { reason, .. } = &control_plane {
        problems.push(format!("ferry-cp-bench failed: {reason}"));
    }
    let results = Results { date, machine, tools: tools.versions(), threads, scenario, paths: results, control_plane, problems };
    report::write(&results, &layout)?;
    eprintln!("ferry-bench: wrote {} and {}", layout.markdown.display(), layout.json().display());
    if options.keep {
        eprintln!("ferry-bench: kept {}", dir.keep().display());
    }
    if !results.problems.is_empty() {
        bail!("the report is written, but some figures are missing:\n  {}", results.problems.join("\n  "));
    }
    Ok(())
}

/// One path while the suite runs: its processes and what was measured so far.
struct PathRun {
    kind: PathKind,
    running: Result<Running, String>,
    idle: Vec<procstat::Memory>,
    peaks: Peaks,
    protocols: Vec<ProtocolResult>,
}

impl PathRun {
    fn new(kind: PathKind, running: Result<Running, String>) -> Self {
        let pids = running.as_ref().map(Running::pids).unwrap_or_default();
        let idle = pids.iter().map(|&pid| procstat::memory(pid).unwrap_or_default()).collect();
        let peaks = Peaks { total: 0, per_process: vec![0; pids.len()] };
        let protocols = Protocol::ALL
            .into_iter()
            .map(|protocol| {
                let unavailable = running.as_ref().ok().and_then(|r| r.addr(protocol).err());
                ProtocolResult { protocol, unavailable, throughput: None, rates: Vec::new() }
            })
            .collect();
        Self { kind, running, idle, peaks, protocols }
    }

    /// Where `protocol` goes, when this path carries it.
    fn addr(&self, protocol: Protocol) -> Option<std::net::SocketAddr> {
        self.running.as_ref().ok()?.addr(protocol).ok()
    }

    fn protocol(&mut self, protocol: Protocol) -> &mut ProtocolResult {
        let index = Protocol::ALL.iter().position(|p| *p == protocol).expect("every protocol has a result");
        &mut self.protocols[index]
    }

    /// Stops the path and returns its figures.
    fn finish(self) -> PathResult {
        let kind = self.kind;
        let running = match self.running {
            Ok(running) => running,
            Err(error) => {
                return PathResult {
                    path: kind,
                    description: kind.description().into(),
                    processes: Vec::new(),
                    idle_rss_bytes: None,
                    load_rss_bytes: None,
                    protocols: Vec::new(),
                    failed: Some(error),
                };
            }
        };
        let processes: Vec<ProcessMemory> = running
            .proxies
            .iter()
            .enumerate()
            .map(|(i, process)| ProcessMemory {
                name: process.name.clone(),
                idle_rss_bytes: self.idle[i].rss,
                idle_rss_anon_bytes: self.idle[i].rss_anon,
                idle_rss_file_bytes: self.idle[i].rss_file,
                load_rss_peak_bytes: self.peaks.per_process[i],
                hwm_bytes: procstat::memory(process.pid).map_or(0, |m| m.hwm),
            })
            .collect();
        let has_proxies = !processes.is_empty();
        running.stop();
        PathResult {
            path: kind,
            description: kind.description().into(),
            idle_rss_bytes: has_proxies.then(|| self.idle.iter().map(|m| m.rss).sum()),
            load_rss_bytes: has_proxies.then_some(self.peaks.total),
            processes,
            protocols: self.protocols,
            failed: None,
        }
    }
}

/// The scenarios, run over every path.
struct Suite<'a> {
    scenario: &'a Scenario,
    tools: &'a tools::Tools,
    upstream: u32,
    /// The wrk script for paths entered as an HTTP proxy.
    wrk_proxy_script: &'a Path,
}

impl Suite<'_> {
    /// Runs every scenario; returns what failed.
    fn run(&self, paths: &mut [PathRun]) -> Vec<String> {
        let mut problems = Vec::new();
        let scenario = self.scenario;
        for protocol in Protocol::ALL {
            if scenario.warmup_seconds > 0 {
                for path in paths.iter().filter(|p| p.addr(protocol).is_some()) {
                    let addr = path.addr(protocol).expect("filtered on it");
                    let _ = self.closed_loop(protocol, addr, path.kind.addressing(), scenario.warmup_seconds);
                }
            }
            // Throughput: several rounds over all paths, the median kept.
            let mut rounds: Vec<Vec<ThroughputRun>> = paths.iter().map(|_| Vec::new()).collect();
            for round in 0..scenario.rounds {
                for (path, runs) in paths.iter_mut().zip(rounds.iter_mut()) {
                    let Some(addr) = path.addr(protocol) else { continue };
                    let Ok(running) = path.running.as_ref() else { continue };
                    let addressing = path.kind.addressing();
                    let measured = measured(running, self.upstream, &mut path.peaks, || {
                        let (tool, result) = self.closed_loop(protocol, addr, addressing, scenario.run_seconds)?;
                        let requests = result.requests;
                        Ok(((tool, result), requests))
                    });
                    match measured {
                        Ok(((tool, result), cost)) => {
                            eprintln!(
                                "ferry-bench: {} {} round {}: {:.0} rps, {} errors",
                                path.kind,
                                protocol.name(),
                                round + 1,
                                result.requests_per_second,
                                result.errors
                            );
                            runs.push(ThroughputRun { tool, result, cost, rounds_rps: Vec::new() });
                        }
                        Err(error) => {
                            eprintln!("ferry-bench: {} {} throughput failed: {error:#}", path.kind, protocol.name());
                            problems.push(format!("{} {} throughput: {error:#}", path.kind, protocol.name()));
                        }
                    }
                }
            }
            for (path, runs) in paths.iter_mut().zip(rounds) {
                path.protocol(protocol).throughput = median(runs);
            }
            for &rate in &scenario.rates {
                for path in paths.iter_mut() {
                    let Some(addr) = path.addr(protocol) else { continue };
                    let Ok(running) = path.running.as_ref() else { continue };
                    let config = OpenLoop {
                        target: addr,
                        authority: dataplane::AUTHORITY.into(),
                        form: path.kind.addressing().request_form(),
                        protocol,
                        rate,
                        duration: Duration::from_secs(scenario.run_seconds),
                        connections: match protocol {
                            Protocol::Http1 => scenario.open_loop_http1_connections,
                            Protocol::Http2 => scenario.open_loop_h2c_connections,
                        },
                        timeout: Duration::from_secs(5),
                    };
                    let run = measured(running, self.upstream, &mut path.peaks, || {
                        let result = load::run(&config)?;
                        let ok = result.ok;
                        Ok((result, ok))
                    });
                    match run {
                        Ok((result, cost)) => {
                            eprintln!(
                                "ferry-bench: {} {} @{rate}: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {:.0} rps, {} errors",
                                path.kind,
                                protocol.name(),
                                result.p50_ms,
                                result.p99_ms,
                                result.p999_ms,
                                result.achieved_rps,
                                result.errors
                            );
                            path.protocol(protocol).rates.push(RateRun { result, cost });
                        }
                        Err(error) => {
                            eprintln!("ferry-bench: {} {} @{rate} failed: {error:#}", path.kind, protocol.name());
                            problems.push(format!("{} {} at {rate} rps: {error:#}", path.kind, protocol.name()));
                        }
                    }
                }
            }
        }
        problems
    }

    /// A closed-loop run of `seconds`: wrk for HTTP/1.1, h2load for h2c, naming the upstream as
    /// `addressing` says. Returns the tool's command line and what it measured.
    fn closed_loop(
        &self,
        protocol: Protocol,
        addr: std::net::SocketAddr,
        addressing: Addressing,
        seconds: u64,
    ) -> anyhow::Result<(String, Throughput)> {
        let scenario = self.scenario;
        let url = format!("http://{addr}/");
        let duration = Duration::from_secs(seconds);
        let authority = dataplane::AUTHORITY;
        let extra: Vec<OsString> = match (addressing, protocol) {
            (Addressing::Listener, _) => Vec::new(),
            (Addressing::Host, Protocol::Http1) => vec!["-H".into(), format!("Host: {authority}").into()],
            (Addressing::Host, Protocol::Http2) => vec!["-H".into(), format!(":authority: {authority}").into()],
            (Addressing::Proxy, Protocol::Http1) => vec!["-s".into(), self.wrk_proxy_script.into()],
            (Addressing::Proxy, Protocol::Http2) => bail!("an HTTP proxy is sent HTTP/1.1 only"),
        };
        type Parse = fn(&str) -> anyhow::Result<Throughput>;
        let (name, mut command, parse): (&str, Command, Parse) = match protocol {
            Protocol::Http1 => {
                ("wrk", tools::wrk_command(&self.tools.wrk, &url, scenario.wrk_connections, duration, &extra), tools::parse_wrk)
            }
            Protocol::Http2 => (
                "h2load",
                tools::h2load_command(
                    &self.tools.h2load,
                    &url,
                    scenario.h2load_connections,
                    scenario.h2load_streams,
                    duration,
                    &extra,
                ),
                tools::parse_h2load,
            ),
        };
        let output = command.output().with_context(|| format!("running {name}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!("{name} exited with {}:\n{stdout}{}", output.status, String::from_utf8_lossy(&output.stderr));
        }
        // As a shell would take it, without this run's temporary paths.
        let script = self.wrk_proxy_script.to_string_lossy();
        let args: Vec<String> = command
            .get_args()
            .map(|a| match a.to_string_lossy() {
                a if a == url => "URL".to_owned(),
                a if a == script => tools::WRK_PROXY_SCRIPT.to_owned(),
                a if a.contains(' ') => format!("\"{a}\""),
                a => a.into_owned(),
            })
            .collect();
        Ok((format!("{name} {}", args.join(" ")), parse(&stdout)?))
    }
}

/// The run with the median throughput, holding every round's rate.
fn median(mut runs: Vec<ThroughputRun>) -> Option<ThroughputRun> {
    let all: Vec<f64> = runs.iter().map(|r| r.result.requests_per_second).collect();
    runs.sort_by(|a, b| a.result.requests_per_second.total_cmp(&b.result.requests_per_second));
    let middle = runs.len().checked_sub(1)? / 2;
    let mut run = runs.swap_remove(middle);
    run.rounds_rps = all;
    Some(run)
}

/// The largest RSS seen over several runs.
struct Peaks {
    total: u64,
    per_process: Vec<u64>,
}

/// Runs `work` (which returns its result and how many requests it completed) while measuring
/// the proxies' CPU and memory and the upstream's CPU.
fn measured<T>(
    running: &Running,
    upstream: u32,
    peaks: &mut Peaks,
    work: impl FnOnce() -> anyhow::Result<(T, u64)>,
) -> anyhow::Result<(T, Cost)> {
    let pids = running.pids();
    let (proxy_before, upstream_before) = (procstat::cpu_seconds(&pids), procstat::cpu_seconds(&[upstream]));
    let sampler = procstat::RssSampler::start(pids.clone());
    let outcome = work();
    let peak = sampler.stop();
    let (proxy_after, upstream_after) = (procstat::cpu_seconds(&pids), procstat::cpu_seconds(&[upstream]));
    let (result, requests) = outcome?;
    peaks.total = peaks.total.max(peak.total);
    for (max, seen) in peaks.per_process.iter_mut().zip(peak.per_process) {
        *max = (*max).max(seen);
    }
    let per_1k = |seconds: f64| (requests > 0).then(|| seconds / requests as f64 * 1000.0);
    let has_proxies = !pids.is_empty();
    let proxy_cpu = proxy_after - proxy_before;
    let cost = Cost {
        proxy_cpu_seconds: has_proxies.then_some(proxy_cpu),
        proxy_cpu_seconds_per_1k: if has_proxies { per_1k(proxy_cpu) } else { None },
        upstream_cpu_seconds_per_1k: per_1k(upstream_after - upstream_before),
        proxy_rss_peak_bytes: has_proxies.then_some(peak.total),
    };
    Ok((result, cost))
}

/// Runs `ferry-cp-bench` when it is built, with `--quick` passed through.
fn run_cp_bench(options: &Options, dir: &Path) -> ControlPlaneBench {
    let binary = options.cp_bench.clone().unwrap_or_else(|| bin_dir(options).join("ferry-cp-bench"));
    if !binary.is_file() {
        return ControlPlaneBench::Absent { reason: "ferry-cp-bench is not built (no such binary next to ferry-bench)".into() };
    }
    let json = dir.join("cp-bench.json");
    let mut command = Command::new(&binary);
    if options.quick {
        command.arg("--quick");
    }
    if let Some(sidecars) = options.cp_sidecars.or((!options.quick).then_some(1_000)) {
        command.arg("--sidecars").arg(sidecars.to_string());
    }
    command.arg("--json").arg(&json);
    // It finds target/release/ferry-control-plane relative to where it runs.
    command.current_dir(workspace_root());
    let shown =
        format!("ferry-cp-bench {}", command.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" "))
            .replace(&json.display().to_string(), "PATH");
    eprintln!("ferry-bench: {shown}");
    let failed = |reason: String| ControlPlaneBench::Failed { command: shown.clone(), reason };
    let limit = if options.quick { Duration::from_secs(300) } else { Duration::from_secs(1_200) };
    let log = dir.join("cp-bench.log");
    let mut child = match dataplane::Child::spawn("ferry-cp-bench", command, log, false) {
        Ok(child) => child,
        Err(error) => return failed(format!("{error:#}")),
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => return failed(format!("exited with {status}: {}", tail(&child.log(), 20))),
            Ok(None) if started.elapsed() > limit => {
                child.stop();
                return failed(format!("still running after {limit:?}; stopped"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(error) => return failed(error.to_string()),
        }
    }
    match std::fs::read(&json).map_err(anyhow::Error::from).and_then(|bytes| Ok(serde_json::from_slice(&bytes)?)) {
        Ok(result) => ControlPlaneBench::Ran { command: shown, result },
        Err(error) => failed(format!("reading {}: {error:#}", json.display())),
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rps: f64) -> ThroughputRun {
        let result = Throughput { requests_per_second: rps, ..Throughput::default() };
        ThroughputRun { tool: "wrk".into(), result, cost: Cost::default(), rounds_rps: Vec::new() }
    }

    #[test]
    fn the_median_round_is_kept_with_every_rounds_rate() {
        let median = median(vec![run(30.0), run(10.0), run(20.0)]).expect("three rounds");
        assert_eq!(median.result.requests_per_second, 20.0);
        assert_eq!(median.rounds_rps, [30.0, 10.0, 20.0]);
        assert_eq!(median_of(&[run(5.0)]), 5.0);
        assert!(super::median(Vec::new()).is_none());
    }

    fn median_of(runs: &[ThroughputRun]) -> f64 {
        super::median(runs.to_vec()).map_or(0.0, |r| r.result.requests_per_second)
    }

    #[test]
    fn paths_are_named_as_in_the_report() {
        assert_eq!(parse_path("ferry-mesh"), Ok(PathKind::FerryMesh));
        assert_eq!(parse_path("ferry-1hop-host"), Ok(PathKind::FerryOneHopHost));
        assert_eq!(parse_path("ferry-1hop-proxy"), Ok(PathKind::FerryOneHopProxy));
        for kind in PathKind::ALL {
            assert_eq!(parse_path(kind.name()), Ok(kind));
        }
        assert_eq!(
            parse_path("envoy").expect_err("unknown"),
            "unknown path \"envoy\": expected one of direct, ferry-1hop, ferry-1hop-host, ferry-1hop-proxy, ferry-mesh, \
             ferry-mesh-mtls, haproxy, nginx"
        );
    }
}
