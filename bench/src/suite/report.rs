//! The report: `benchmarks.json` with every number (the raw results, every figure with its
//! ratios to HAProxy's and to the direct path's, and the targets), a markdown page with tables,
//! and SVG charts drawn with plotters.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::Context;
use serde::Serialize;

use super::{
    ControlPlaneBench, PathResult, ProcessMemory, Results,
    dataplane::{Addressing, PathKind},
    load::Protocol,
};

mod charts;

use charts::{Charts, charts};

/// Where the report's files go.
#[derive(Debug, Clone)]
pub struct Layout {
    pub markdown: PathBuf,
    /// The JSON and the charts.
    pub data: PathBuf,
}

impl Layout {
    /// Everything in `out` when given; else `docs/benchmarks.md` with the rest in
    /// `docs/benchmarks/` under the workspace `root`.
    pub fn new(out: Option<&Path>, root: &Path) -> Self {
        match out {
            Some(dir) => Self { markdown: dir.join("benchmarks.md"), data: dir.to_path_buf() },
            None => Self { markdown: root.join("docs").join("benchmarks.md"), data: root.join("docs").join("benchmarks") },
        }
    }

    /// The JSON file.
    pub fn json(&self) -> PathBuf {
        self.data.join("benchmarks.json")
    }

    /// A link from the markdown to `file` in the data directory.
    fn link(&self, file: &str) -> String {
        let base = self.markdown.parent().unwrap_or(Path::new("."));
        match self.data.strip_prefix(base) {
            Ok(relative) if relative.as_os_str().is_empty() => file.to_owned(),
            Ok(relative) => format!("{}/{file}", relative.display()),
            Err(_) => self.data.join(file).display().to_string(),
        }
    }
}

/// A figure to compare across paths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Key {
    /// Closed-loop requests per second.
    Throughput,
    /// Proxy CPU seconds per 1,000 requests at maximum throughput.
    CpuAtMax,
    P50(u32),
    P99(u32),
    P999(u32),
    /// Proxy CPU seconds per 1,000 requests at a fixed rate.
    CpuAt(u32),
    RssIdle,
    RssLoad,
}

impl Key {
    fn name(self) -> String {
        match self {
            Key::Throughput => "throughput_rps".into(),
            Key::CpuAtMax => "cpu_seconds_per_1k_at_max".into(),
            Key::P50(rate) => format!("p50_ms_at_{rate}"),
            Key::P99(rate) => format!("p99_ms_at_{rate}"),
            Key::P999(rate) => format!("p999_ms_at_{rate}"),
            Key::CpuAt(rate) => format!("cpu_seconds_per_1k_at_{rate}"),
            Key::RssIdle => "rss_idle_bytes".into(),
            Key::RssLoad => "rss_load_bytes".into(),
        }
    }

    /// Whether it is one figure per path rather than per protocol.
    fn per_path(self) -> bool {
        matches!(self, Key::RssIdle | Key::RssLoad)
    }

    /// Its value on `path` in `protocol`.
    pub fn value(self, path: &PathResult, protocol: Protocol) -> Option<f64> {
        let rate = |rate: u32| path.protocol(protocol)?.rates.iter().find(|r| r.result.target_rps == rate);
        match self {
            Key::Throughput => Some(path.protocol(protocol)?.throughput.as_ref()?.result.requests_per_second),
            Key::CpuAtMax => path.protocol(protocol)?.throughput.as_ref()?.cost.proxy_cpu_seconds_per_1k,
            Key::P50(r) => rate(r).filter(|r| r.result.ok > 0).map(|r| r.result.p50_ms),
            Key::P99(r) => rate(r).filter(|r| r.result.ok > 0).map(|r| r.result.p99_ms),
            Key::P999(r) => rate(r).filter(|r| r.result.ok > 0).map(|r| r.result.p999_ms),
            Key::CpuAt(r) => rate(r)?.cost.proxy_cpu_seconds_per_1k,
            Key::RssIdle => path.idle_rss_bytes.map(|b| b as f64),
            Key::RssLoad => path.load_rss_bytes.map(|b| b as f64),
        }
    }
}

/// One figure of one path with its ratios to HAProxy's and the direct path's, from the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub path: PathKind,
    /// None for figures of the whole path (memory).
    pub protocol: Option<Protocol>,
    pub figure: String,
    pub value: Option<f64>,
    pub vs_haproxy: Option<f64>,
    pub vs_direct: Option<f64>,
}

/// Every figure's key for a run with these `rates`.
fn keys(rates: &[u32]) -> Vec<Key> {
    let mut keys = vec![Key::Throughput, Key::CpuAtMax];
    for &rate in rates {
        keys.extend([Key::P50(rate), Key::P99(rate), Key::P999(rate), Key::CpuAt(rate)]);
    }
    keys.extend([Key::RssIdle, Key::RssLoad]);
    keys
}

fn find(results: &Results, kind: PathKind) -> Option<&PathResult> {
    results.paths.iter().find(|p| p.path == kind)
}

/// `key` on `path` over `key` on the reference path.
fn ratio(results: &Results, key: Key, path: &PathResult, protocol: Protocol, reference: PathKind) -> Option<f64> {
    let value = key.value(path, protocol)?;
    let base = key.value(find(results, reference)?, protocol)?;
    (base > 0.0).then(|| value / base)
}

/// Every figure of every path with its ratios.
pub fn figures(results: &Results) -> Vec<Figure> {
    let mut figures = Vec::new();
    for path in &results.paths {
        for key in keys(&results.scenario.rates) {
            let protocols: &[Protocol] = if key.per_path() { &[Protocol::Http1] } else { &Protocol::ALL };
            for &protocol in protocols {
                figures.push(Figure {
                    path: path.path,
                    protocol: (!key.per_path()).then_some(protocol),
                    figure: key.name(),
                    value: key.value(path, protocol),
                    vs_haproxy: ratio(results, key, path, protocol, PathKind::Haproxy),
                    vs_direct: ratio(results, key, path, protocol, PathKind::Direct),
                });
            }
        }
    }
    figures
}

/// Whether a target is met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Miss,
    NotMeasured,
}

impl Verdict {
    fn from(pass: bool) -> Self {
        if pass { Verdict::Pass } else { Verdict::Miss }
    }

    fn mark(self) -> &'static str {
        match self {
            Verdict::Pass => "✅ pass",
            Verdict::Miss => "❌ miss",
            Verdict::NotMeasured => "— not measured",
        }
    }
}

/// A target with what was measured against it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// The largest of one memory figure over every sidecar process of the Ferry paths.
fn sidecar_max(results: &Results, figure: fn(&ProcessMemory) -> u64) -> Option<(u64, String, &ProcessMemory)> {
    results
        .paths
        .iter()
        .filter(|p| p.path.is_ferry())
        .flat_map(|p| p.processes.iter().map(move |process| (figure(process), format!("{} {}", p.path, process.name), process)))
        .max_by_key(|(bytes, _, _)| *bytes)
}

/// `path`'s throughput in `protocol` checked against at least `factor` times HAProxy's one-hop
/// throughput in the same run.
fn throughput_check(results: &Results, target: String, path: PathKind, protocol: Protocol, factor: f64) -> TargetCheck {
    let ferry = find(results, path).and_then(|p| Key::Throughput.value(p, protocol));
    let haproxy = find(results, PathKind::Haproxy).and_then(|p| Key::Throughput.value(p, protocol));
    match (ferry, haproxy) {
        (Some(ferry), Some(haproxy)) if haproxy > 0.0 => TargetCheck {
            target,
            measured: format!("{} vs {} rps ({})", int(ferry), int(haproxy), times(ferry / haproxy)),
            verdict: Verdict::from(ferry >= factor * haproxy),
        },
        _ => TargetCheck {
            target,
            measured: format!("{path} or haproxy has no {} throughput figure", label(protocol)),
            verdict: Verdict::NotMeasured,
        },
    }
}

/// Checks the targets the project set itself.
pub fn targets(results: &Results) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    let not_measured =
        |target: String, why: &str| TargetCheck { target, measured: why.to_owned(), verdict: Verdict::NotMeasured };
    // One hop, in each way an app reaches the sidecar (an HTTP proxy is sent HTTP/1.1 only).
    for (protocol, factor, path, mode) in [
        (Protocol::Http1, 1.0, PathKind::FerryOneHop, "upstream port"),
        (Protocol::Http1, 1.0, PathKind::FerryOneHopHost, "Host"),
        (Protocol::Http1, 1.0, PathKind::FerryOneHopProxy, "HTTP proxy"),
        (Protocol::Http2, 0.9, PathKind::FerryOneHop, "upstream port"),
        (Protocol::Http2, 0.9, PathKind::FerryOneHopHost, ":authority"),
    ] {
        let target =
            format!("One-hop throughput ≥ {factor:.1}× HAProxy's at the same thread count ({}, {mode}: {path})", label(protocol));
        checks.push(throughput_check(results, target, path, protocol, factor));
    }
    // The plaintext mesh, as for the latency target below; the mTLS path's figures are in the
    // tables.
    for protocol in Protocol::ALL {
        let target = format!(
            "Full mesh path (two sidecars) throughput ≥ 0.6× HAProxy's one-hop throughput ({}: {})",
            label(protocol),
            PathKind::FerryMesh
        );
        checks.push(throughput_check(results, target, PathKind::FerryMesh, protocol, 0.6));
    }
    for protocol in Protocol::ALL {
        let target = format!("Full mesh adds ≤ 0.3 ms p99 at 1,000 rps over direct ({})", label(protocol));
        let mesh = find(results, PathKind::FerryMesh).and_then(|p| Key::P99(1_000).value(p, protocol));
        let direct = find(results, PathKind::Direct).and_then(|p| Key::P99(1_000).value(p, protocol));
        checks.push(match (mesh, direct) {
            (Some(mesh), Some(direct)) => TargetCheck {
                target,
                measured: format!("{:+.3} ms (mesh {:.3} ms, direct {:.3} ms)", mesh - direct, mesh, direct),
                verdict: Verdict::from(mesh - direct <= 0.3),
            },
            _ => not_measured(target, "no 1,000 rps run of ferry-mesh and direct"),
        });
    }
    // Anonymous memory only: the file-backed rest of the idle RSS is mostly the binary's code,
    // which every sidecar on a host shares.
    let target = "Sidecar anonymous idle RSS ≤ 2 MB".to_owned();
    checks.push(match sidecar_max(results, |p| p.idle_rss_anon_bytes) {
        Some((bytes, which, process)) => TargetCheck {
            target,
            measured: format!(
                "{} (largest: {which}, of {} idle RSS with {} file-backed)",
                mb(bytes as f64),
                mb(process.idle_rss_bytes as f64),
                mb(process.idle_rss_file_bytes as f64)
            ),
            verdict: Verdict::from(bytes <= 2_000_000),
        },
        None => not_measured(target, "no sidecar was measured"),
    });
    let target = "Sidecar RSS ≤ 15 MB under load".to_owned();
    checks.push(match sidecar_max(results, |p| p.load_rss_peak_bytes) {
        Some((bytes, which, _)) => TargetCheck {
            target,
            measured: format!("{} (largest: {which})", mb(bytes as f64)),
            verdict: Verdict::from(bytes <= 15_000_000),
        },
        None => not_measured(target, "no sidecar was measured"),
    });
    let cp = match &results.control_plane {
        ControlPlaneBench::Ran { result, .. } => Some(result),
        _ => None,
    };
    let cp_number = |pointer: &str| cp.and_then(|r| r.pointer(pointer)?.as_f64());
    let target = "Control plane p99 propagation < 100 ms to 1,000 sidecars".to_owned();
    checks.push(match (cp_number("/propagation/p99_ms"), cp_number("/sidecars")) {
        (Some(p99), Some(sidecars)) if sidecars >= 1_000.0 => TargetCheck {
            target,
            measured: format!("{p99:.1} ms to {} sidecars", int(sidecars)),
            verdict: Verdict::from(p99 < 100.0),
        },
        (Some(p99), Some(sidecars)) => {
            not_measured(target, &format!("{p99:.1} ms to {} sidecars only (a quick run)", int(sidecars)))
        }
        _ => not_measured(target, "ferry-cp-bench did not run"),
    });
    let target = "≤ 100 KB control-plane memory per connected sidecar".to_owned();
    checks.push(match cp_number("/memory/bytes_per_sidecar") {
        Some(bytes) => TargetCheck { target, measured: kb(bytes), verdict: Verdict::from(bytes <= 100_000.0) },
        None => not_measured(target, "ferry-cp-bench did not run"),
    });
    checks
}

/// What `benchmarks.json` holds.
#[derive(Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    results: &'a Results,
    figures: Vec<Figure>,
    targets: Vec<TargetCheck>,
}

/// Writes the JSON, the charts and the markdown.
pub fn write(results: &Results, layout: &Layout) -> anyhow::Result<()> {
    std::fs::create_dir_all(&layout.data).with_context(|| format!("creating {}", layout.data.display()))?;
    if let Some(parent) = layout.markdown.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let output = Output { results, figures: figures(results), targets: targets(results) };
    let json = serde_json::to_string_pretty(&output)?;
    std::fs::write(layout.json(), json + "\n").with_context(|| format!("writing {}", layout.json().display()))?;
    let charts = charts(results, &layout.data)?;
    let mut markdown = markdown(results, &output.targets, layout, &charts);
    // The hand-written record below the marker (what each optimisation changed) outlives the run.
    if let Ok(previous) = std::fs::read_to_string(&layout.markdown) {
        let history = kept_history(&previous);
        if !history.is_empty() {
            markdown.push('\n');
            markdown.push_str(history);
        }
    }
    std::fs::write(&layout.markdown, markdown).with_context(|| format!("writing {}", layout.markdown.display()))?;
    Ok(())
}

/// The line after which `benchmarks.md` is written by hand, and kept when the figures above it
/// are regenerated.
pub const HISTORY_MARKER: &str =
    "<!-- Written by hand from here on: ferry-bench keeps it when it regenerates the figures above. -->";

/// The hand-written part of a previous `benchmarks.md`, from its marker on; empty when it has
/// none.
fn kept_history(previous: &str) -> &str {
    match previous.find(HISTORY_MARKER) {
        Some(at) => &previous[at..],
        None => "",
    }
}

fn label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Http1 => "HTTP/1.1",
        Protocol::Http2 => "h2c",
    }
}

/// `1234567.8` as `1,234,568`.
fn int(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 { format!("-{grouped}") } else { grouped }
}

fn times(ratio: f64) -> String {
    format!("{ratio:.2}×")
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

fn kb(bytes: f64) -> String {
    format!("{:.1} KB", bytes / 1e3)
}

fn ms(value: f64) -> String {
    if value >= 100.0 { format!("{value:.0}") } else { format!("{value:.3}") }
}

fn or_na(value: Option<String>) -> String {
    value.unwrap_or_else(|| "n/a".into())
}

/// `value (0.53× haproxy, 1.20× direct)` cells.
fn ratio_cells(results: &Results, key: Key, path: &PathResult, protocol: Protocol) -> [String; 2] {
    [PathKind::Haproxy, PathKind::Direct].map(|reference| {
        if path.path == reference { "1.00×".into() } else { or_na(ratio(results, key, path, protocol, reference).map(times)) }
    })
}

fn markdown(results: &Results, targets: &[TargetCheck], layout: &Layout, charts: &Charts) -> String {
    let mut md = String::new();
    let scenario = &results.scenario;
    let machine = &results.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `ferry-bench{}` on {}. Regenerate with `cargo build --release && cargo run --release -p ferry-bench \
         --bin ferry-bench` (see the README's Benchmarks section); every number is also in [`benchmarks.json`]({}).\n",
        if scenario.quick { " --quick" } else { "" },
        results.date,
        layout.link("benchmarks.json")
    );
    if scenario.quick {
        let _ = writeln!(md, "> **Quick run**: 1-second runs at low rates, for CI. The figures are indicative only.\n");
    }
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(md, "| cores | CPU | kernel | memory | load average at start |\n|---|---|---|---|---|");
    let _ = writeln!(
        md,
        "| {} | {} | {} | {:.1} GB | {} |\n",
        machine.cores,
        machine.cpu_model,
        machine.kernel,
        machine.memory_bytes as f64 / 1e9,
        machine.load_average_at_start
    );
    let _ = writeln!(
        md,
        "Everything (the client, the proxies, the upstream) shares these {} cores on loopback, so the figures compare \
         the paths with one another on this machine; they are not capacity figures. Throughput is the median of {} \
         round(s); every latency and CPU figure comes from a single run. On a shared or noisy machine, differences of \
         10-20% are within the noise.\n",
        machine.cores, results.scenario.rounds
    );

    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | |\n|---|---|---|");
    for check in targets {
        let _ = writeln!(md, "| {} | {} | {} |", check.target, check.measured, check.verdict.mark());
    }
    let _ = writeln!(md);

    if !results.problems.is_empty() {
        let _ = writeln!(md, "**Not measured** (the run exited with an error):\n");
        for problem in &results.problems {
            let _ = writeln!(md, "- {}", problem.lines().next().unwrap_or_default());
        }
        let _ = writeln!(md);
    }
    write_setup(&mut md, results);
    write_throughput(&mut md, results, layout, charts);
    write_latency(&mut md, results, layout, charts);
    write_cpu(&mut md, results, layout, charts);
    write_memory(&mut md, results, layout, charts);
    write_control_plane(&mut md, results);
    md
}

fn write_setup(md: &mut String, results: &Results) {
    let scenario = &results.scenario;
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(md, "| path | what the client goes through |\n|---|---|");
    for path in &results.paths {
        let failed =
            path.failed.as_ref().map(|f| format!(" **(failed: {})**", f.lines().next().unwrap_or(""))).unwrap_or_default();
        let _ = writeln!(md, "| `{}` | {}{failed} |", path.path, path.description);
    }
    let _ = writeln!(
        md,
        "\n- **Upstream**: a hyper server (a process of its own, tokio's default runtime) answering every request with \
         a 1 KiB body, over HTTP/1.1 keep-alive and h2c.\n\
         - **Threads**: the sidecar serves its data path on its default of one worker thread per core, {threads} \
         here (set explicitly with `FERRY_WORKERS={threads}`), each a single-threaded runtime that serves the \
         connections handed to it from accept to close, beside one thread for the control stream and admin API; \
         HAProxy runs `nbthread {threads}` and nginx `worker_processes {threads}`.\n\
         - **Proxies' upstream protocol**: the sidecar forwards each request in the protocol it arrived in (h2c requests \
         over one multiplexed h2c connection to the endpoint per worker); HAProxy does the same (`proto h2` on the h2c backend's \
         server, `http-reuse always`); nginx's proxy speaks only HTTP/1.1 to upstreams, so it forwards h2c requests \
         over HTTP/1.1 keep-alive (`keepalive 256`).\n\
         - **Order**: every path is started before the first run and each scenario runs on every path in turn, so \
         that load from neighbours on a shared machine, which comes and goes, falls on all paths alike.\n\
         - **Throughput** (closed loop): `wrk -t1 -c{wrk_c} -d{s}s` (HTTP/1.1) and `h2load -t1 -c{h2_c} -m{h2_m} -D {s}` \
         (h2c){warmup}; {rounds} round(s), the median reported.\n\
         - **Latency** (open loop): requests sent at {rates} rps for {s} s each, on {ol1} HTTP/1.1 keep-alive \
         connections or {ol2} h2c connections; each latency counts from the request's intended send time (no \
         coordinated omission) and is recorded in an HDR histogram.\n{naming}\
         - **CPU**: user + system time of the proxy processes (both sidecars for the mesh, every nginx process) from \
         `/proc/PID/stat` over a run, per 1,000 requests completed (10 ms resolution).\n\
         - **Memory**: RSS of the proxy processes before any load (idle) and the largest sampled every 50 ms during \
         the runs (under load), in MB of 10⁶ bytes; nginx's figure sums its master and workers (shared pages counted \
         in each).\n\
         - **Tools**: {tools}.\n",
        threads = results.threads,
        wrk_c = scenario.wrk_connections,
        s = scenario.run_seconds,
        h2_c = scenario.h2load_connections,
        h2_m = scenario.h2load_streams,
        rounds = scenario.rounds,
        warmup = if scenario.warmup_seconds > 0 {
            format!(", each after a {} s warm-up of the same tool", scenario.warmup_seconds)
        } else {
            String::new()
        },
        rates = scenario.rates.iter().map(|r| int(f64::from(*r))).collect::<Vec<_>>().join(" and "),
        ol1 = scenario.open_loop_http1_connections,
        ol2 = scenario.open_loop_h2c_connections,
        naming = if results.paths.iter().any(|p| p.path.addressing() != Addressing::Listener) {
            "- **How clients name the service**: on `ferry-1hop-host`, in `Host: bench` (wrk `-H \"Host: bench\"`) or \
             `:authority: bench` (h2load `-H \":authority: bench\"`); on `ferry-1hop-proxy`, as to an HTTP proxy, \
             `GET http://bench/ HTTP/1.1` with `Host: bench` (wrk with a script that sets `wrk.path` and the `Host` \
             header once, so that it still sends one pre-built request). The open-loop generator and the readiness \
             probe address each path the same way. The other paths need no name: wrk and h2load send the \
             listener's address, the open-loop generator `Host: bench`.\n"
        } else {
            ""
        },
        tools = results.tools.join("; "),
    );
}

fn write_throughput(md: &mut String, results: &Results, layout: &Layout, charts: &Charts) {
    let _ = writeln!(md, "## Throughput\n");
    let _ = writeln!(
        md,
        "Requests per second at saturation (closed loop), the median of {} round(s) over all paths in turn; the ratios \
         are to HAProxy's and to the direct path's.\n",
        results.scenario.rounds
    );
    let _ = writeln!(
        md,
        "| path | protocol | requests/s | vs haproxy | vs direct | errors | mean latency (closed loop) | every round |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---|");
    for path in &results.paths {
        for protocol in Protocol::ALL {
            let result = path.protocols.iter().find(|p| p.protocol == protocol);
            if let Some(reason) = result.and_then(|r| r.unavailable.as_ref()) {
                let _ = writeln!(md, "| {} | {} | n/a: {reason} | | | | | |", path.path, label(protocol));
                continue;
            }
            let run = result.and_then(|r| r.throughput.as_ref());
            let [vs_haproxy, vs_direct] = ratio_cells(results, Key::Throughput, path, protocol);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {vs_haproxy} | {vs_direct} | {} | {} | {} |",
                path.path,
                label(protocol),
                or_na(run.map(|r| int(r.result.requests_per_second))),
                or_na(run.map(|r| int(r.result.errors as f64))),
                or_na(run.and_then(|r| r.result.mean_latency_ms).map(|v| format!("{} ms", ms(v)))),
                run.map(|r| r.rounds_rps.iter().map(|v| int(*v)).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(md, "\n![Throughput per path]({})\n", layout.link(&charts.throughput));
}

fn write_latency(md: &mut String, results: &Results, layout: &Layout, charts: &Charts) {
    let _ = writeln!(md, "## Latency at fixed rates\n");
    let _ = writeln!(
        md,
        "Open loop, in milliseconds from each request's intended send time. \"added p99\" is the path's p99 minus the \
         direct path's at the same rate. \"generator lag\" is how late the generator itself sent (p99), which the \
         latencies include.\n"
    );
    for protocol in Protocol::ALL {
        let _ = writeln!(md, "### {}\n", label(protocol));
        let _ = writeln!(
            md,
            "| path | rate | achieved | p50 | p99 | p99.9 | max | p99 vs haproxy | p99 vs direct | added p99 | errors | generator lag |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for path in &results.paths {
            let Some(result) = path.protocols.iter().find(|p| p.protocol == protocol) else { continue };
            if let Some(reason) = &result.unavailable {
                let _ = writeln!(md, "| {} | | n/a: {reason} | | | | | | | | | |", path.path);
                continue;
            }
            for run in &result.rates {
                let r = &run.result;
                let rate = r.target_rps;
                let [vs_haproxy, vs_direct] = ratio_cells(results, Key::P99(rate), path, protocol);
                let added = find(results, PathKind::Direct)
                    .and_then(|direct| Key::P99(rate).value(direct, protocol))
                    .filter(|_| r.ok > 0)
                    .map(|direct| format!("{:+.3}", r.p99_ms - direct));
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {vs_haproxy} | {vs_direct} | {} | {} | {} |",
                    path.path,
                    int(f64::from(rate)),
                    int(r.achieved_rps),
                    ms(r.p50_ms),
                    ms(r.p99_ms),
                    ms(r.p999_ms),
                    ms(r.max_ms),
                    or_na(added),
                    int(r.errors as f64),
                    ms(r.send_lag_p99_ms),
                );
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "![p99 latency per path and rate]({})\n", layout.link(&charts.latency));
}

fn write_cpu(md: &mut String, results: &Results, layout: &Layout, charts: &Charts) {
    let rates = &results.scenario.rates;
    let _ = writeln!(md, "## CPU per 1,000 requests\n");
    let _ = writeln!(
        md,
        "CPU seconds (user + system) the proxy processes spent per 1,000 requests, at maximum throughput and at each \
         fixed rate; the ratio is to HAProxy's in the same run. The direct path has no proxy.\n"
    );
    let mut header = "| path | protocol | at max throughput | vs haproxy |".to_owned();
    let mut line = "|---|---|---:|---:|".to_owned();
    for rate in rates {
        let _ = write!(header, " at {} rps | vs haproxy |", int(f64::from(*rate)));
        line.push_str("---:|---:|");
    }
    let _ = writeln!(md, "{header}\n{line}");
    for path in results.paths.iter().filter(|p| p.path != PathKind::Direct) {
        for protocol in Protocol::ALL {
            let mut row = format!("| {} | {} |", path.path, label(protocol));
            for key in std::iter::once(Key::CpuAtMax).chain(rates.iter().map(|&r| Key::CpuAt(r))) {
                let [vs_haproxy, _] = ratio_cells(results, key, path, protocol);
                let _ = write!(row, " {} | {vs_haproxy} |", or_na(key.value(path, protocol).map(|v| format!("{v:.4}"))));
            }
            let _ = writeln!(md, "{row}");
        }
    }
    let _ = writeln!(md, "\n![CPU per 1,000 requests]({})\n", layout.link(&charts.cpu));
}

fn write_memory(md: &mut String, results: &Results, layout: &Layout, charts: &Charts) {
    let _ = writeln!(md, "## Memory\n");
    let _ = writeln!(
        md,
        "Resident memory of the proxy processes. Idle RSS is split into anonymous memory (heap, stacks) and \
         file-backed pages (mostly the binary's own code), which every process of the same binary shares with the \
         others on a host.\n"
    );
    let _ = writeln!(
        md,
        "| path | process | idle RSS | idle anon / file | RSS under load (peak) | VmHWM | idle vs haproxy | load vs haproxy |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    for path in results.paths.iter().filter(|p| p.path != PathKind::Direct) {
        for process in &path.processes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} / {} | {} | {} | | |",
                path.path,
                process.name,
                mb(process.idle_rss_bytes as f64),
                mb(process.idle_rss_anon_bytes as f64),
                mb(process.idle_rss_file_bytes as f64),
                mb(process.load_rss_peak_bytes as f64),
                mb(process.hwm_bytes as f64)
            );
        }
        if let (Some(idle), Some(load)) = (path.idle_rss_bytes, path.load_rss_bytes) {
            let [idle_ratio, _] = ratio_cells(results, Key::RssIdle, path, Protocol::Http1);
            let [load_ratio, _] = ratio_cells(results, Key::RssLoad, path, Protocol::Http1);
            let _ = writeln!(
                md,
                "| **{}** | **total** | **{}** | | **{}** | | {idle_ratio} | {load_ratio} |",
                path.path,
                mb(idle as f64),
                mb(load as f64)
            );
        }
    }
    let _ = writeln!(md, "\n![RSS per path]({})\n", layout.link(&charts.rss));
}

fn write_control_plane(md: &mut String, results: &Results) {
    let _ = writeln!(md, "## Control plane\n");
    let (command, result) = match &results.control_plane {
        ControlPlaneBench::Ran { command, result } => (command, result),
        ControlPlaneBench::Absent { reason } => {
            let _ = writeln!(md, "Not measured: {reason}. Build it with `cargo build --release` and run ferry-bench again.");
            return;
        }
        ControlPlaneBench::Failed { command, reason } => {
            let _ = writeln!(md, "`{command}` failed:\n\n```\n{reason}\n```");
            return;
        }
    };
    let number = |pointer: &str| result.pointer(pointer).and_then(serde_json::Value::as_f64);
    let _ = writeln!(
        md,
        "From `{command}`: {} sidecars subscribed to {} services each ({} services, {} endpoints in all).\n",
        or_na(number("/sidecars").map(int)),
        or_na(number("/subscriptions_per_sidecar").map(int)),
        or_na(number("/services").map(int)),
        or_na(number("/endpoints").map(int)),
    );
    let _ = writeln!(md, "| figure | p50 | p99 | max | other | target |\n|---|---:|---:|---:|---|---|");
    let millis = |pointer: &str| or_na(number(pointer).map(|v| format!("{} ms", ms(v))));
    let _ = writeln!(
        md,
        "| first config after connecting | {} | {} | {} | all configured after {} | |",
        millis("/first_config/p50_ms"),
        millis("/first_config/p99_ms"),
        millis("/first_config/max_ms"),
        millis("/first_config/all_configured_ms"),
    );
    let p99 = number("/propagation/p99_ms");
    let _ = writeln!(
        md,
        "| propagation of a change | {} | {} | {} | {} changes; slowest sidecar's p99 {} | < 100 ms p99 to 1,000 sidecars: {} |",
        millis("/propagation/p50_ms"),
        millis("/propagation/p99_ms"),
        millis("/propagation/max_ms"),
        or_na(number("/propagation/changes").map(int)),
        millis("/propagation/slowest_sidecar_p99_ms"),
        match (p99, number("/sidecars")) {
            (Some(p99), Some(n)) if n >= 1_000.0 => Verdict::from(p99 < 100.0).mark(),
            _ => Verdict::NotMeasured.mark(),
        }
    );
    let _ = writeln!(
        md,
        "| bytes per endpoint change | | | | delta {} B, full snapshot {} B, service of {} endpoints | |",
        or_na(number("/bytes_per_change/delta_bytes").map(int)),
        or_na(number("/bytes_per_change/snapshot_bytes").map(int)),
        or_na(number("/bytes_per_change/service_endpoints").map(int)),
    );
    let per_sidecar = number("/memory/bytes_per_sidecar");
    let _ = writeln!(
        md,
        "| memory | | | | RSS {} with endpoints only, {} with the sidecars: {} per sidecar | ≤ 100 KB per sidecar: {} |",
        or_na(number("/memory/rss_endpoints_only_bytes").map(mb)),
        or_na(number("/memory/rss_with_sidecars_bytes").map(mb)),
        or_na(per_sidecar.map(kb)),
        per_sidecar.map_or(Verdict::NotMeasured, |b| Verdict::from(b <= 100_000.0)).mark(),
    );
    let _ = writeln!(
        md,
        "| CPU | | | | {} s for first configs, {} s for propagation, {} ms per change | |\n",
        or_na(number("/cpu/first_config_cpu_seconds").map(|v| format!("{v:.2}"))),
        or_na(number("/cpu/propagation_cpu_seconds").map(|v| format!("{v:.2}"))),
        or_na(number("/cpu/cpu_ms_per_change").map(|v| format!("{v:.3}"))),
    );
}

/// `time` as `2025-01-31 14:05 UTC`.
pub fn utc_date(time: SystemTime) -> String {
    let seconds = time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rest / 3600, rest % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::suite::{Cost, Machine, ProtocolResult, Scenario, ThroughputRun, tools::Throughput};

    #[test]
    fn the_hand_written_history_is_kept() {
        let previous = format!("# Benchmarks\n\nold figures\n\n{HISTORY_MARKER}\n\n## Optimisation\n\nbefore and after\n");
        assert_eq!(kept_history(&previous), format!("{HISTORY_MARKER}\n\n## Optimisation\n\nbefore and after\n"));
        assert_eq!(kept_history("# Benchmarks\n\nno marker\n"), "");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date(SystemTime::UNIX_EPOCH), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_660)), "2000-02-29 01:01 UTC");
        assert_eq!(utc_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_735_689_599)), "2024-12-31 23:59 UTC");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(int(1_234_567.8), "1,234,568");
        assert_eq!(int(999.0), "999");
        assert_eq!(int(-1_000.0), "-1,000");
        assert_eq!(mb(4_500_000.0), "4.5 MB");
    }

    /// A path with a closed-loop throughput per protocol (None: it does not carry it) and one
    /// sidecar of this much idle anonymous memory.
    fn path(kind: PathKind, http1: Option<f64>, h2c: Option<f64>, anon: u64) -> PathResult {
        let protocol = |protocol: Protocol, rps: Option<f64>| ProtocolResult {
            protocol,
            unavailable: rps.is_none().then(|| "not carried".to_owned()),
            throughput: rps.map(|rps| ThroughputRun {
                tool: "wrk".into(),
                result: Throughput { requests_per_second: rps, ..Throughput::default() },
                cost: Cost::default(),
                rounds_rps: vec![rps],
            }),
            rates: Vec::new(),
        };
        let process = ProcessMemory {
            name: "sidecar".into(),
            idle_rss_bytes: anon + 10_000_000,
            idle_rss_anon_bytes: anon,
            idle_rss_file_bytes: 10_000_000,
            load_rss_peak_bytes: 14_000_000,
            hwm_bytes: 14_000_000,
        };
        PathResult {
            path: kind,
            description: kind.description().into(),
            processes: if kind.is_ferry() { vec![process] } else { Vec::new() },
            idle_rss_bytes: None,
            load_rss_bytes: None,
            protocols: vec![protocol(Protocol::Http1, http1), protocol(Protocol::Http2, h2c)],
            failed: None,
        }
    }

    fn results(paths: Vec<PathResult>) -> Results {
        let machine = Machine {
            cores: 2,
            cpu_model: "test".into(),
            kernel: "test".into(),
            memory_bytes: 0,
            load_average_at_start: String::new(),
        };
        let control_plane = ControlPlaneBench::Absent { reason: "not built".into() };
        Results {
            date: String::new(),
            machine,
            tools: Vec::new(),
            threads: 2,
            scenario: Scenario::new(true),
            paths,
            control_plane,
            problems: Vec::new(),
        }
    }

    #[test]
    fn one_hop_targets_cover_each_way_in_and_h2c_needs_nine_tenths_of_haproxy() {
        let results = results(vec![
            path(PathKind::FerryOneHop, Some(100.0), Some(91.0), 1_500_000),
            path(PathKind::FerryOneHopHost, Some(99.0), Some(89.0), 1_600_000),
            path(PathKind::FerryOneHopProxy, Some(120.0), None, 2_400_000),
            path(PathKind::FerryMesh, Some(60.0), Some(59.0), 1_000_000),
            path(PathKind::Haproxy, Some(100.0), Some(100.0), 0),
        ]);
        let checks = targets(&results);
        let verdict = |start: &str| {
            let found: Vec<&TargetCheck> = checks.iter().filter(|c| c.target.starts_with(start)).collect();
            assert_eq!(found.len(), 1, "one target starts with {start:?}: {checks:#?}");
            found[0].verdict
        };
        let one_hop = "One-hop throughput ≥ ";
        assert_eq!(
            verdict(&format!("{one_hop}1.0× HAProxy's at the same thread count (HTTP/1.1, upstream port: ferry-1hop)")),
            Verdict::Pass
        );
        assert_eq!(
            verdict(&format!("{one_hop}1.0× HAProxy's at the same thread count (HTTP/1.1, Host: ferry-1hop-host)")),
            Verdict::Miss
        );
        assert_eq!(
            verdict(&format!("{one_hop}1.0× HAProxy's at the same thread count (HTTP/1.1, HTTP proxy: ferry-1hop-proxy)")),
            Verdict::Pass
        );
        assert_eq!(
            verdict(&format!("{one_hop}0.9× HAProxy's at the same thread count (h2c, upstream port: ferry-1hop)")),
            Verdict::Pass
        );
        assert_eq!(
            verdict(&format!("{one_hop}0.9× HAProxy's at the same thread count (h2c, :authority: ferry-1hop-host)")),
            Verdict::Miss
        );
        assert!(!checks.iter().any(|c| c.target.contains("h2c, HTTP proxy")), "an HTTP proxy is sent HTTP/1.1 only");
        assert_eq!(
            verdict("Full mesh path (two sidecars) throughput ≥ 0.6× HAProxy's one-hop throughput (HTTP/1.1"),
            Verdict::Pass
        );
        assert_eq!(verdict("Full mesh path (two sidecars) throughput ≥ 0.6× HAProxy's one-hop throughput (h2c"), Verdict::Miss);
        assert_eq!(verdict("Full mesh adds ≤ 0.3 ms p99 at 1,000 rps over direct (HTTP/1.1)"), Verdict::NotMeasured);
        assert_eq!(verdict("Sidecar RSS ≤ 15 MB under load"), Verdict::Pass);
        assert_eq!(verdict("Sidecar anonymous idle RSS ≤ 2 MB"), Verdict::Miss);
        let anon = checks.iter().find(|c| c.target.starts_with("Sidecar anonymous")).expect("the idle memory target");
        assert_eq!(anon.measured, "2.4 MB (largest: ferry-1hop-proxy sidecar, of 12.4 MB idle RSS with 10.0 MB file-backed)");
    }

    #[test]
    fn a_missing_path_leaves_its_target_not_measured() {
        let results = results(vec![path(PathKind::Haproxy, Some(100.0), Some(100.0), 0)]);
        let checks = targets(&results);
        let host = checks.iter().find(|c| c.target.contains("HTTP/1.1, Host")).expect("the Host target");
        assert_eq!(host.verdict, Verdict::NotMeasured);
        assert_eq!(host.measured, "ferry-1hop-host or haproxy has no HTTP/1.1 throughput figure");
        assert!(checks.iter().filter(|c| c.target.starts_with("Sidecar")).all(|c| c.verdict == Verdict::NotMeasured));
    }

    #[test]
    fn links_are_relative_to_the_markdown() {
        let default = Layout::new(None, Path::new("/ws"));
        assert_eq!(default.markdown, Path::new("/ws/docs/benchmarks.md"));
        assert_eq!(default.json(), Path::new("/ws/docs/benchmarks/benchmarks.json"));
        assert_eq!(default.link("rss.svg"), "benchmarks/rss.svg");
        let out = Layout::new(Some(Path::new("/tmp/out")), Path::new("/ws"));
        assert_eq!(out.link("rss.svg"), "rss.svg");
    }
}
