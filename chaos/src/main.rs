//! `ferry-chaos`: Ferry's chaos suite. It builds a mesh in network namespaces of its own
//! (control plane, frontend -> catalog (2 instances) -> inventory, a load generator), sends
//! steady HTTP/1.1, h2c and gRPC traffic and control-plane writes, injects faults one at a time
//! (netem delay, loss, duplication and reordering on one link, partitions, `kill -9` of an app,
//! a sidecar and the control plane, a full disk under the control plane), measures what each did
//! and how soon the mesh recovered, checks that no acknowledged write was lost, and writes
//! `docs/reliability.md`.
//!
//! ```text
//! ferry-chaos                 the full run (ten to twenty minutes)
//! ferry-chaos --ci            a bounded run of about two minutes
//! ferry-chaos --soak 30m      a fault a minute; memory and descriptors of every process sampled
//! ```
//!
//! The `app` and `drive` subcommands are the suite's own app and load generator, which it starts
//! inside the namespaces.

#![forbid(unsafe_code)]

mod analysis;
mod app;
mod driver;
mod faults;
mod mesh;
mod report;
mod run;
mod soak;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{faults::Fault, run::Plan};

/// The header that carries a POST's unique id through the mesh.
pub const ID_HEADER: &str = "x-chaos-id";

/// Milliseconds since the Unix epoch: the clock every process of the suite stamps with.
pub fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Parser)]
#[command(name = "ferry-chaos", about = "Ferry's chaos suite: faults injected into a mesh in network namespaces")]
struct Cli {
    /// A bounded run of about two minutes: fewer, shorter faults.
    #[arg(long, conflicts_with = "soak")]
    ci: bool,
    /// Steady traffic with a fault every minute for this long, sampling every process.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    soak: Option<Duration>,
    /// Write reliability.md into DIR instead of docs/.
    #[arg(long, value_name = "DIR", conflicts_with = "no_docs")]
    out: Option<PathBuf>,
    /// Write no report file; print the tables only.
    #[arg(long)]
    no_docs: bool,
    /// Only these faults (repeatable): delay, loss-5, loss-30, duplicate, reorder,
    /// partition-instance, partition-control-plane, kill-app, kill-sidecar, kill-control-plane,
    /// disk-full.
    #[arg(long = "fault", value_parser = Fault::parse, value_name = "FAULT")]
    faults: Vec<Fault>,
    /// Requests a second, all kinds together.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    rate: u32,
    #[command(subcommand)]
    command: Option<Inner>,
}

#[derive(Debug, Subcommand)]
enum Inner {
    /// The suite's app (started by the suite inside a namespace).
    #[command(hide = true)]
    App(app::AppArgs),
    /// The suite's load generator (started by the suite inside a namespace).
    #[command(hide = true)]
    Drive(driver::DriveArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ferry-chaos: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Some(Inner::App(args)) => app::run(args).await,
            Some(Inner::Drive(args)) => driver::run(args).await,
            None => suite(cli).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-chaos: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why the suite cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    if let Some(why) = ferry_tests::netns::skip_reason() {
        return Some(why);
    }
    let tc = std::process::Command::new("tc").arg("-V").output();
    if !tc.is_ok_and(|o| o.status.success()) {
        return Some("`tc` is missing (apt-get install -y iproute2)".into());
    }
    None
}

async fn suite(cli: Cli) -> anyhow::Result<()> {
    if let Some(why) = skip_reason() {
        anyhow::ensure!(std::env::var_os("FERRY_REQUIRE_NETNS").is_none(), "FERRY_REQUIRE_NETNS is set but {why}");
        eprintln!("skipping the chaos suite: {why}");
        return Ok(());
    }
    let plan = plan(&cli);
    let bins = mesh::Bins::build()?;
    let started = std::time::Instant::now();
    // SIGTERM too (as `timeout` sends): leaving the run's future drops the mesh, which stops
    // and removes everything it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let observed = tokio::select! {
        observed = run::run(plan, bins) => observed?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; everything it started is stopped and removed"),
        _ = term.recv() => anyhow::bail!("terminated; everything it started is stopped and removed"),
    };
    let durability = analysis::durability(&observed);
    let rows = analysis::rows(&observed, &durability);
    let targets = analysis::targets(&rows, &durability);
    let growth = observed.samples.growth();
    let report = report::Report {
        obs: &observed,
        rows: &rows,
        targets: &targets,
        durability: &durability,
        growth: &growth,
        took: started.elapsed(),
    };
    report.print();
    let dir = match (&cli.out, cli.no_docs) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => None,
        (None, false) => Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("docs")),
    };
    if let Some(dir) = dir {
        let path = report.write(&dir)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn plan(cli: &Cli) -> Plan {
    let mut plan = default_plan(cli);
    if !cli.faults.is_empty() {
        plan.faults = cli.faults.clone();
    }
    plan
}

fn default_plan(cli: &Cli) -> Plan {
    let secs = Duration::from_secs;
    if let Some(length) = cli.soak {
        return Plan {
            name: "--soak",
            faults: vec![
                Fault::KillApp,
                Fault::Loss(5),
                Fault::KillSidecar,
                Fault::Delay,
                Fault::PartitionInstance,
                Fault::KillControlPlane,
            ],
            baseline: secs(10),
            inject_for: secs(15),
            recover_within: secs(30),
            settle: secs(2),
            rate: cli.rate,
            soak: Some(length),
        };
    }
    if cli.ci {
        return Plan {
            name: "--ci",
            faults: Fault::CI.to_vec(),
            baseline: secs(8),
            inject_for: secs(8),
            recover_within: secs(12),
            settle: secs(2),
            rate: cli.rate,
            soak: None,
        };
    }
    Plan {
        name: "full",
        faults: Fault::ALL.to_vec(),
        baseline: secs(20),
        inject_for: secs(15),
        // Long enough for a starved catalog-1 to take its share again, so that each fault
        // starts from a whole mesh.
        recover_within: secs(90),
        settle: secs(3),
        rate: cli.rate,
        soak: None,
    }
}
