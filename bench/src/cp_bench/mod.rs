//! `ferry-cp-bench`: how the control plane copes with many sidecars.
//!
//! It starts the real `ferry-control-plane` (in-memory store, port 0), registers persistent
//! instances through the gRPC registry API, then opens simulated sidecar streams that speak the
//! real `ferry.v1.Discovery/Stream` protocol, each over its own connection as real sidecars do.
//! It measures:
//!
//! 1. `first_config`: all sidecars connect at once; the time until each has applied and ACKed a
//!    push for every service it subscribed to.
//! 2. `propagation`: sequential one-endpoint registry changes; the time from just before the API
//!    call until each sidecar subscribed to the service has applied and ACKed the push holding it.
//! 3. `bytes_per_change`: the size of that push, next to a full snapshot of the service.
//! 4. `memory`: the control plane's RSS with the endpoints alone, and with every sidecar
//!    connected and configured.
//! 5. `cpu`: the control plane's CPU time during the first config and the propagation phases.
//!
//! The benchmark and the control plane share the machine: the simulated sidecars' side of the
//! work (their connections, decoding and applying pushes) is CPU the control plane does not get,
//! and the latencies include it. See `docs/benchmarks.md`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser;
use tokio::task::JoinSet;

mod control_plane;
mod registry;
mod report;
mod sidecar;

use self::{
    control_plane::ControlPlaneProcess,
    registry::RegistryApi,
    report::{ChangeRecord, Context, Cpu, Memory, Report},
    sidecar::{Board, SimSidecar},
};

/// Measures the control plane's config push: time to first config, change propagation, bytes
/// per change, memory and CPU, with many simulated sidecars.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-cp-bench")]
pub struct Options {
    /// A small run for CI that finishes in seconds: 100 sidecars, 10 services × 20 instances,
    /// 10 changes. Flags given explicitly still win.
    #[arg(long)]
    pub quick: bool,

    /// Simulated sidecars, each with its own connection and stream [default: 1000].
    #[arg(long)]
    pub sidecars: Option<usize>,

    /// Services registered [default: 100].
    #[arg(long)]
    pub services: Option<usize>,

    /// Instances of each service [default: 100].
    #[arg(long)]
    pub instances_per_service: Option<usize>,

    /// Services each sidecar subscribes to [default: 3].
    #[arg(long)]
    pub subscriptions_per_sidecar: Option<usize>,

    /// Registry changes made one after another in the propagation phase [default: 50].
    #[arg(long)]
    pub changes: Option<usize>,

    /// Time from one change to the next [default: 200ms].
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub change_interval: Option<Duration>,

    /// How long the sidecars may take to be configured.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,

    /// How long one change may take to reach its sidecars; those it has not reached by then
    /// count as missed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub change_timeout: Duration,

    /// The `ferry-control-plane` to run [default: target/release/ferry-control-plane when it
    /// exists, else the debug build].
    #[arg(long, value_name = "PATH")]
    pub control_plane_binary: Option<PathBuf>,

    /// Where to write the figures as JSON [default: stdout].
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// The sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    sidecars: usize,
    services: usize,
    per_service: usize,
    subscriptions: usize,
    changes: usize,
    interval: Duration,
}

impl Plan {
    fn from_options(options: &Options) -> anyhow::Result<Self> {
        let (sidecars, services, per_service, changes, interval) = if options.quick {
            (100, 10, 20, 10, Duration::from_millis(100))
        } else {
            (1000, 100, 100, 50, Duration::from_millis(200))
        };
        let plan = Self {
            sidecars: options.sidecars.unwrap_or(sidecars),
            services: options.services.unwrap_or(services),
            per_service: options.instances_per_service.unwrap_or(per_service),
            subscriptions: options.subscriptions_per_sidecar.unwrap_or(3),
            changes: options.changes.unwrap_or(changes),
            interval: options.change_interval.unwrap_or(interval),
        };
        for (flag, value) in [
            ("--sidecars", plan.sidecars),
            ("--services", plan.services),
            ("--instances-per-service", plan.per_service),
            ("--subscriptions-per-sidecar", plan.subscriptions),
            ("--changes", plan.changes),
        ] {
            if value == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if plan.subscriptions > plan.services {
            bail!("--subscriptions-per-sidecar {} is more than the {} services", plan.subscriptions, plan.services);
        }
        Ok(plan)
    }
}

macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("ferry-cp-bench: {}", format_args!($($arg)*)) };
}

/// Runs the benchmark and writes its figures: the table to stderr, the JSON to `--json` or
/// stdout.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let plan = Plan::from_options(&options)?;
    control_plane::raise_open_files(plan.sidecars)?;
    let binary = control_plane::binary(options.control_plane_binary.as_deref())?;
    let mut control_plane = ControlPlaneProcess::start(&binary).await?;
    progress!("control plane {} listening on {}", binary.display(), control_plane.grpc);
    let result = measure(&plan, &options, &mut control_plane, &binary).await;
    let log = control_plane.log_tail();
    control_plane.stop().await;
    let report = result.map_err(|e| anyhow::anyhow!("{e:#}\n--- the control plane's last log lines:\n{log}"))?;
    eprintln!("{}", report.table());
    let json = serde_json::to_string_pretty(&report.to_json()).context("encoding the figures")?;
    match &options.json {
        Some(path) => std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(report)
}

async fn measure(
    plan: &Plan,
    options: &Options,
    control_plane: &mut ControlPlaneProcess,
    binary: &std::path::Path,
) -> anyhow::Result<Report> {
    let bench_cpu_start = own_cpu_seconds();
    let access = control_plane.access()?;
    let endpoints = plan.services * plan.per_service;

    // The registry, with no sidecar yet.
    let api = RegistryApi::connect(&access).await.context("connecting to the registry API")?;
    let started = std::time::Instant::now();
    api.register_all(plan.services, plan.per_service).await?;
    let registration_seconds = started.elapsed().as_secs_f64();
    api.verify_passing(plan.services, plan.per_service).await?;
    progress!("registered {endpoints} endpoints, all passing, in {registration_seconds:.1} s");
    control_plane.ensure_running()?;
    let rss_endpoints_only_bytes = control_plane.rss_bytes()?;

    // First config: every sidecar at once.
    let subscriptions: Vec<Vec<usize>> =
        (0..plan.sidecars).map(|index| sidecar::subscriptions(index, plan.services, plan.subscriptions)).collect();
    let mut subscribers = vec![Vec::new(); plan.services];
    for (index, services) in subscriptions.iter().enumerate() {
        for (slot, &s) in services.iter().enumerate() {
            subscribers[s].push((index, slot));
        }
    }
    if let Some(s) = subscribers.iter().position(Vec::is_empty) {
        bail!(
            "no sidecar subscribes to {}: {} sidecars × {} subscriptions leave services out; run more sidecars",
            registry::service_name(s),
            plan.sidecars,
            plan.subscriptions
        );
    }
    let board = Board::new(plan.sidecars, plan.subscriptions);
    let mut sidecars = JoinSet::new();
    let cpu_before = control_plane.cpu_seconds()?;
    let start = board.now();
    for (index, services) in subscriptions.into_iter().enumerate() {
        sidecars.spawn(SimSidecar::new(index, services).run(access.clone(), board.clone(), options.timeout));
    }
    let all = plan.sidecars;
    let done = board.wait_until(options.timeout, |b| b.configured + b.failed >= all).await;
    let all_configured = board.now();
    let first_config_cpu_seconds = control_plane.cpu_seconds()? - cpu_before;
    {
        let state = board.lock();
        if let Some(failure) = &state.first_failure {
            bail!("{} of {} sidecar streams failed; the first: {failure}", state.failed, plan.sidecars);
        }
        if !done {
            bail!("only {} of {} sidecars were configured within {:?}", state.configured, plan.sidecars, options.timeout);
        }
    }
    let first_config = report::first_config(&board.lock(), start, all_configured);
    progress!("{} sidecars configured in {:.1} ms", plan.sidecars, first_config.all_configured_ms);
    control_plane.ensure_running()?;
    let rss_with_sidecars_bytes = control_plane.rss_bytes()?;

    // Propagation: one change at a time, each waited for, spaced by the interval.
    let changes = propagate(plan, options, &api, &board, &subscribers, control_plane).await?;
    let cpu_after_changes = control_plane.cpu_seconds()?;
    let propagation_cpu_seconds = cpu_after_changes - changes.cpu_before;
    sidecars.shutdown().await;

    let state = board.lock();
    let (propagation, bytes) = report::propagation(&state, &changes.records, &subscribers, changes.began);
    Ok(Report {
        sidecars: plan.sidecars,
        services: plan.services,
        endpoints,
        subscriptions_per_sidecar: plan.subscriptions,
        first_config,
        propagation,
        bytes,
        memory: Memory { rss_endpoints_only_bytes, rss_with_sidecars_bytes },
        cpu: Cpu { first_config_cpu_seconds, propagation_cpu_seconds, changes_active_cpu_seconds: changes.active_cpu_seconds },
        context: Context {
            control_plane_binary: binary.display().to_string(),
            registration_seconds,
            change_interval_ms: plan.interval.as_secs_f64() * 1000.0,
            nacks: state.nacks,
            bench_cpu_seconds: own_cpu_seconds() - bench_cpu_start,
        },
    })
}

/// The changes made, when they began, the control plane's CPU time then, and the CPU it spent
/// while changes were under way.
struct Changes {
    records: Vec<ChangeRecord>,
    began: Duration,
    cpu_before: f64,
    active_cpu_seconds: f64,
}

async fn propagate(
    plan: &Plan,
    options: &Options,
    api: &RegistryApi,
    board: &Arc<Board>,
    subscribers: &[Vec<(usize, usize)>],
    control_plane: &mut ControlPlaneProcess,
) -> anyhow::Result<Changes> {
    let cpu_before = control_plane.cpu_seconds()?;
    let began = board.now();
    let mut records = Vec::with_capacity(plan.changes);
    let mut active_cpu_seconds = 0.0;
    for j in 0..plan.changes {
        let (service, kind) = registry::change(j, plan.services);
        let cpu_at_change = control_plane.cpu_seconds()?;
        let started = board.now();
        let version = api.apply(service, kind, plan.per_service).await.with_context(|| format!("change {j}: {kind:?}"))?;
        records.push(ChangeRecord { service, started, version });
        let reached = board
            .wait_until(options.change_timeout, |b| {
                subscribers[service].iter().all(|&(i, slot)| b.held(i, slot, plan.subscriptions).is_some_and(|v| v >= version))
            })
            .await;
        active_cpu_seconds += control_plane.cpu_seconds()? - cpu_at_change;
        if !reached {
            progress!("change {j} did not reach every sidecar within {:?}", options.change_timeout);
        }
        if let Some(failure) = &board.lock().first_failure {
            bail!("a sidecar stream failed during the changes: {failure}");
        }
        tokio::time::sleep(plan.interval.saturating_sub(board.now() - started)).await;
    }
    control_plane.ensure_running()?;
    progress!("{} changes made", plan.changes);
    Ok(Changes { records, began, cpu_before, active_cpu_seconds })
}

/// The CPU time this process has used, in seconds (0 when unreadable: it is only context).
fn own_cpu_seconds() -> f64 {
    control_plane::process_cpu_seconds("self").unwrap_or(0.0)
}
