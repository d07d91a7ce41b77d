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
//!    call (and, in `propagation_after_return`, from its return) until each sidecar subscribed
//!    to the service has applied and ACKed the push holding it.
//! 3. `bytes_per_change`: the size of that push, next to a full snapshot of the service.
//! 4. `memory`: the control plane's RSS with the endpoints alone, and with every sidecar
//!    connected and configured.
//! 5. `cpu`: the control plane's CPU time during the first config, a quiet window with every
//!    sidecar connected, and the propagation phase.
//!
//! With `--etcd` (implied by `--replicas` above 1) it first starts a local etcd cluster on free
//! loopback ports, then the replicas on it (`--store etcd://...`, one admin token for all);
//! the sidecars are spread over the replicas round-robin, every registry change goes through
//! the first replica, and the figures are also given per replica (and per etcd member), with
//! where a change's time goes: a watch of etcd of the benchmark's own (when etcd delivered the
//! change), each replica's first sidecar and fan-out, the replicas' push histograms and etcd's
//! fsync and commit histograms read from their `/metrics` before and after the changes.
//!
//! The benchmark and the control plane share the machine: the simulated sidecars' side of the
//! work (their connections, decoding and applying pushes) is CPU the control plane does not get,
//! and the latencies include it. See `docs/benchmarks.md`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use clap::Parser;
use tokio::task::JoinSet;

macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("ferry-cp-bench: {}", format_args!($($arg)*)) };
}

mod control_plane;
mod etcd;
mod process;
mod registry;
mod report;
mod scrape;
mod sidecar;
mod started;

use self::{
    control_plane::{ControlPlaneProcess, Store},
    etcd::EtcdCluster,
    registry::RegistryApi,
    report::{ChangeRecord, Context, Cpu, EtcdFigures, Memory, ReplicaFigures, Report, Topology},
    sidecar::{Board, SimSidecar},
    started::{CpuSnapshot, Started},
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

    /// Run the control plane on etcd: start a local etcd cluster of --etcd-members on free
    /// 127.0.0.1 ports (its data in a temporary directory, removed afterwards) and the replicas
    /// with `--store etcd://...`. Needs the `etcd` binary (Debian: etcd-server) and a control
    /// plane built with `cargo build --release -p ferry-control-plane --features etcd`.
    #[arg(long)]
    pub etcd: bool,

    /// Control-plane replicas on the etcd store (more than one implies --etcd). The sidecars are
    /// spread over them round-robin; every registry change goes through the first one, and the
    /// propagation counts until the last sidecar on any replica has ACKed it.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub replicas: usize,

    /// Members of the etcd cluster that --etcd starts (1 to 7; 3 for a quorum that survives one
    /// member's loss).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub etcd_members: usize,

    /// The `etcd` to run with --etcd [default: `etcd` on the PATH].
    #[arg(long, value_name = "PATH")]
    pub etcd_binary: Option<PathBuf>,

    /// How long the sidecars may take to be configured.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub timeout: Duration,

    /// How long one change may take to reach its sidecars; those it has not reached by then
    /// count as missed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub change_timeout: Duration,

    /// The longest the whole run may take; past it everything the benchmark started is stopped
    /// and it fails.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub max_run: Duration,

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
    /// `None`: one control plane on the in-memory store.
    etcd_members: Option<usize>,
    replicas: usize,
    /// The quiet window after the first config in which CPU is measured with every sidecar
    /// connected and nothing changing, and the pause before it.
    settle: Duration,
    idle_window: Duration,
}

impl Plan {
    fn from_options(options: &Options) -> anyhow::Result<Self> {
        let (sidecars, services, per_service, changes, interval) = if options.quick {
            (100, 10, 20, 10, Duration::from_millis(100))
        } else {
            (1000, 100, 100, 50, Duration::from_millis(200))
        };
        let etcd = options.etcd || options.replicas > 1;
        let plan = Self {
            sidecars: options.sidecars.unwrap_or(sidecars),
            services: options.services.unwrap_or(services),
            per_service: options.instances_per_service.unwrap_or(per_service),
            subscriptions: options.subscriptions_per_sidecar.unwrap_or(3),
            changes: options.changes.unwrap_or(changes),
            interval: options.change_interval.unwrap_or(interval),
            etcd_members: etcd.then_some(options.etcd_members),
            replicas: options.replicas,
            settle: if options.quick { Duration::from_millis(500) } else { Duration::from_secs(2) },
            idle_window: if options.quick { Duration::from_secs(1) } else { Duration::from_secs(5) },
        };
        for (flag, value) in [
            ("--sidecars", plan.sidecars),
            ("--services", plan.services),
            ("--instances-per-service", plan.per_service),
            ("--subscriptions-per-sidecar", plan.subscriptions),
            ("--changes", plan.changes),
            ("--replicas", plan.replicas),
        ] {
            if value == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if plan.subscriptions > plan.services {
            bail!("--subscriptions-per-sidecar {} is more than the {} services", plan.subscriptions, plan.services);
        }
        if !(1..=7).contains(&options.etcd_members) {
            bail!("--etcd-members must be from 1 to 7");
        }
        if plan.replicas > plan.sidecars {
            bail!("--replicas {} is more than the {} sidecars: some replicas would have none", plan.replicas, plan.sidecars);
        }
        Ok(plan)
    }

    /// The replica that sidecar `index` connects to.
    fn replica_of(&self, index: usize) -> usize {
        index % self.replicas
    }
}

/// Runs the benchmark and writes its figures: the table to stderr, the JSON to `--json` or
/// stdout. Whatever happens (a failure, `--max-run`, Ctrl-C), every process it started is
/// stopped before it returns.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let plan = Plan::from_options(&options)?;
    process::raise_open_files(plan.sidecars)?;
    let binary = control_plane::binary(options.control_plane_binary.as_deref())?;
    let mut started = Started::default();
    let result = tokio::select! {
        result = tokio::time::timeout(options.max_run, start_and_measure(&plan, &options, &binary, &mut started)) => {
            result.unwrap_or_else(|_| Err(anyhow!("the run took longer than --max-run {:?}", options.max_run)))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let logs = started.log_tails();
    started.tell_warnings();
    if started.etcd.is_some() || !started.replicas.is_empty() {
        progress!("stopping every process started");
    }
    started.stop().await;
    let report = result.map_err(|e| if logs.is_empty() { e } else { anyhow!("{e:#}\n{logs}") })?;
    eprintln!("{}", report.table());
    let json = serde_json::to_string_pretty(&report.to_json()).context("encoding the figures")?;
    match &options.json {
        Some(path) => std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(report)
}

async fn start_and_measure(
    plan: &Plan,
    options: &Options,
    binary: &std::path::Path,
    started: &mut Started,
) -> anyhow::Result<Report> {
    match plan.etcd_members {
        None => started.replicas.push(ControlPlaneProcess::start(binary, Store::Memory).await?),
        Some(members) => {
            let etcd_binary = etcd::binary(options.etcd_binary.as_deref()).await?;
            let cluster = EtcdCluster::start(&etcd_binary, members).await?;
            let url = cluster.store_url();
            progress!("etcd: {members} member(s) on {url}");
            started.etcd = Some(cluster);
            let token = control_plane::new_secret()?;
            // One after another: the first creates the CA and stores it, the others load it.
            for r in 0..plan.replicas {
                let store = Store::Etcd { url: url.clone(), replica_id: format!("cp-{r}"), token: token.clone() };
                started.replicas.push(ControlPlaneProcess::start(binary, store).await?);
            }
        }
    }
    for replica in &started.replicas {
        progress!("{} ({}) listening on {}", replica.name(), binary.display(), replica.grpc);
    }
    measure(plan, options, started, binary).await
}

async fn measure(plan: &Plan, options: &Options, started: &mut Started, binary: &std::path::Path) -> anyhow::Result<Report> {
    let bench_cpu_start = own_cpu_seconds();
    let accesses: Vec<_> = started.replicas.iter().map(ControlPlaneProcess::access).collect::<anyhow::Result<_>>()?;
    let endpoints = plan.services * plan.per_service;

    // The registry, with no sidecar yet, written through the first replica.
    let api = RegistryApi::connect(&accesses[0]).await.context("connecting to the registry API")?;
    let registration_started = std::time::Instant::now();
    api.register_all(plan.services, plan.per_service).await?;
    let registration_seconds = registration_started.elapsed().as_secs_f64();
    api.verify_passing(plan.services, plan.per_service).await?;
    // The other replicas apply the registrations from etcd's watch: wait until they hold them
    // all, so that the first config measures pushes, not replication.
    for (r, access) in accesses.iter().enumerate().skip(1) {
        let other = RegistryApi::connect(access).await.with_context(|| format!("connecting to replica {r}'s registry API"))?;
        other.wait_passing(plan.services, plan.per_service, Duration::from_secs(60)).await?;
    }
    let everywhere = if plan.replicas > 1 { " on every replica" } else { "" };
    progress!("registered {endpoints} endpoints, all passing{everywhere}, in {registration_seconds:.1} s");
    started.ensure_running()?;
    let rss_endpoints_only = started.rss_bytes()?;

    // First config: every sidecar at once, each on its replica.
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
    let cpu_before = started.cpu()?;
    let start = board.now();
    for (index, services) in subscriptions.into_iter().enumerate() {
        let access = accesses[plan.replica_of(index)].clone();
        sidecars.spawn(SimSidecar::new(index, services).run(access, board.clone(), options.timeout));
    }
    let all = plan.sidecars;
    let done = board.wait_until(options.timeout, |b| b.configured + b.failed >= all).await;
    let all_configured = board.now();
    let first_config_cpu = started.cpu()?.since(&cpu_before);
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

    // A quiet window: what every connected sidecar costs when nothing changes.
    tokio::time::sleep(plan.settle).await;
    let idle_before = started.cpu()?;
    tokio::time::sleep(plan.idle_window).await;
    let idle_cpu = started.cpu()?.since(&idle_before);
    started.ensure_running()?;
    let rss_with_sidecars = started.rss_bytes()?;

    // Propagation: one change at a time, each waited for, spaced by the interval.
    let probe = match &started.etcd {
        Some(etcd) => match etcd::WatchProbe::start(&etcd.members()[0]).await {
            Ok(probe) => Some(probe),
            Err(error) => {
                progress!("warning: no watch of etcd to time its commits by: {error:#}");
                None
            }
        },
        None => None,
    };
    let scraped_before = started.scrape().await;
    let changes = propagate(plan, options, &api, &board, &subscribers, started).await?;
    let propagation_cpu = started.cpu()?.since(&changes.cpu_before);
    let scraped_after = started.scrape().await;
    started.ensure_running()?;
    let etcd_rss = match &started.etcd {
        Some(etcd) => etcd.members().iter().map(|m| m.process.rss_bytes()).collect::<anyhow::Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    sidecars.shutdown().await;

    let state = board.lock();
    let all_sidecars = |_: usize| true;
    let propagation = report::propagation(&state, &changes.records, &subscribers, report::Since::CallStarted, all_sidecars);
    let after_return = report::propagation(&state, &changes.records, &subscribers, report::Since::CallReturned, all_sidecars);
    let bytes = report::bytes_per_change(&state, &changes.records, &subscribers, changes.began);
    let sum = |values: &[f64]| values.iter().sum::<f64>();
    let replicas = (0..plan.replicas)
        .map(|r| {
            let on_replica = |i: usize| plan.replica_of(i) == r;
            let (first_ack, fan_out) = report::first_and_fan_out(&state, &changes.records, &subscribers, on_replica);
            let (before, after) = (&scraped_before.replicas[r], &scraped_after.replicas[r]);
            ReplicaFigures {
                name: started.replicas[r].name().to_owned(),
                sidecars: (0..plan.sidecars).filter(|&i| plan.replica_of(i) == r).count(),
                memory: Memory { rss_endpoints_only_bytes: rss_endpoints_only[r], rss_with_sidecars_bytes: rss_with_sidecars[r] },
                cpu: Cpu {
                    first_config_cpu_seconds: first_config_cpu.replicas[r],
                    idle_cpu_seconds: idle_cpu.replicas[r],
                    propagation_cpu_seconds: propagation_cpu.replicas[r],
                    changes_active_cpu_seconds: changes.active_cpu.replicas[r],
                },
                after_return: report::propagation(
                    &state,
                    &changes.records,
                    &subscribers,
                    report::Since::CallReturned,
                    on_replica,
                ),
                first_ack,
                fan_out,
                push_sent: scrape::recorded(before, after, "ferry_push_propagation_seconds"),
                push_acked: scrape::recorded(before, after, "ferry_push_ack_seconds"),
            }
        })
        .collect();
    let etcd = etcd_rss
        .iter()
        .enumerate()
        .map(|(m, &rss_bytes)| {
            let (before, after) = (&scraped_before.etcd[m], &scraped_after.etcd[m]);
            let grew = |name: &str| after.total(name) - before.total(name);
            EtcdFigures {
                name: format!("e{m}"),
                rss_bytes,
                first_config_cpu_seconds: first_config_cpu.etcd[m],
                idle_cpu_seconds: idle_cpu.etcd[m],
                propagation_cpu_seconds: propagation_cpu.etcd[m],
                wal_fsync: scrape::recorded(before, after, "etcd_disk_wal_fsync_duration_seconds"),
                backend_commit: scrape::recorded(before, after, "etcd_disk_backend_commit_duration_seconds"),
                revisions: grew("etcd_debugging_mvcc_current_revision"),
                puts: grew("etcd_mvcc_put_total"),
                deletes: grew("etcd_mvcc_delete_total"),
                put_bytes: grew("etcd_debugging_mvcc_total_put_size_in_bytes"),
                db_growth_bytes: grew("etcd_mvcc_db_total_size_in_bytes"),
            }
        })
        .collect();
    Ok(Report {
        sidecars: plan.sidecars,
        services: plan.services,
        endpoints,
        subscriptions_per_sidecar: plan.subscriptions,
        topology: Topology { etcd_members: plan.etcd_members, replicas: plan.replicas },
        first_config,
        propagation,
        after_return,
        api_call: report::api_calls(&changes.records),
        bytes,
        memory: Memory {
            rss_endpoints_only_bytes: rss_endpoints_only.iter().sum(),
            rss_with_sidecars_bytes: rss_with_sidecars.iter().sum(),
        },
        cpu: Cpu {
            first_config_cpu_seconds: sum(&first_config_cpu.replicas),
            idle_cpu_seconds: sum(&idle_cpu.replicas),
            propagation_cpu_seconds: sum(&propagation_cpu.replicas),
            changes_active_cpu_seconds: sum(&changes.active_cpu.replicas),
        },
        replicas,
        etcd,
        etcd_watch: probe
            .map(|probe| report::watch_timing(&changes.records, |revision| probe.seen(revision).map(|at| board.since_epoch(at)))),
        context: Context {
            control_plane_binary: binary.display().to_string(),
            registration_seconds,
            change_interval_ms: plan.interval.as_secs_f64() * 1000.0,
            idle_window_seconds: plan.idle_window.as_secs_f64(),
            propagation_seconds: changes.seconds,
            nacks: state.nacks,
            bench_cpu_seconds: own_cpu_seconds() - bench_cpu_start,
        },
    })
}

/// The changes made, when they began and how long they took, the processes' CPU time then, and
/// the CPU each replica spent while changes were under way.
struct Changes {
    records: Vec<ChangeRecord>,
    began: Duration,
    seconds: f64,
    cpu_before: CpuSnapshot,
    active_cpu: CpuSnapshot,
}

async fn propagate(
    plan: &Plan,
    options: &Options,
    api: &RegistryApi,
    board: &Arc<Board>,
    subscribers: &[Vec<(usize, usize)>],
    started: &mut Started,
) -> anyhow::Result<Changes> {
    let cpu_before = started.cpu()?;
    let began = board.now();
    let mut records = Vec::with_capacity(plan.changes);
    let mut active_cpu = CpuSnapshot { replicas: vec![0.0; plan.replicas], etcd: vec![0.0; cpu_before.etcd.len()] };
    let mut missed_changes = 0;
    for j in 0..plan.changes {
        let (service, kind) = registry::change(j, plan.services);
        let cpu_at_change = started.cpu()?;
        let call_started = board.now();
        let made = api.apply(service, kind, plan.per_service).await.with_context(|| format!("change {j}: {kind:?}"))?;
        let call_returned = board.since_epoch(made.returned);
        records.push(ChangeRecord { service, started: call_started, returned: call_returned, version: made.version });
        let reached = board
            .wait_until(options.change_timeout, |b| {
                subscribers[service]
                    .iter()
                    .all(|&(i, slot)| b.held(i, slot, plan.subscriptions).is_some_and(|v| v >= made.version))
            })
            .await;
        active_cpu.add(&started.cpu()?.since(&cpu_at_change));
        if !reached {
            missed_changes += 1;
            progress!("change {j} did not reach every sidecar within {:?}", options.change_timeout);
        }
        if let Some(failure) = &board.lock().first_failure {
            bail!("a sidecar stream failed during the changes: {failure}");
        }
        tokio::time::sleep(plan.interval.saturating_sub(board.now() - call_started)).await;
    }
    let seconds = (board.now() - began).as_secs_f64();
    started.ensure_running()?;
    progress!("{} changes made ({missed_changes} did not reach every sidecar in time)", plan.changes);
    Ok(Changes { records, began, seconds, cpu_before, active_cpu })
}

/// The CPU time this process has used, in seconds (0 when unreadable: it is only context).
fn own_cpu_seconds() -> f64 {
    process::process_cpu_seconds("self").unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("ferry-cp-bench").chain(args.iter().copied())).expect("valid flags")
    }

    #[test]
    fn replicas_imply_etcd_and_share_the_sidecars_round_robin() {
        let plan = Plan::from_options(&options(&["--replicas", "2", "--sidecars", "10"])).expect("a plan");
        assert_eq!(plan.etcd_members, Some(1));
        assert_eq!((0..5).map(|i| plan.replica_of(i)).collect::<Vec<_>>(), [0, 1, 0, 1, 0]);

        let plan = Plan::from_options(&options(&["--etcd", "--etcd-members", "3"])).expect("a plan");
        assert_eq!((plan.etcd_members, plan.replicas), (Some(3), 1));
        let plan = Plan::from_options(&options(&[])).expect("a plan");
        assert_eq!((plan.etcd_members, plan.replicas), (None, 1), "one control plane on memory by default");
    }

    #[test]
    fn impossible_topologies_are_refused() {
        for args in [&["--replicas", "0"][..], &["--etcd", "--etcd-members", "0"], &["--replicas", "20", "--sidecars", "10"]] {
            assert!(Plan::from_options(&options(args)).is_err(), "{args:?}");
        }
    }
}
