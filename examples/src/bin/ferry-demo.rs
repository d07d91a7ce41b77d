//! `ferry-demo`: runs Ferry's three-service demo; see [`ferry_examples::demo`].

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use ferry_examples::demo::{self, process};

/// Runs a control plane, two replicas of frontend, catalog and inventory with a sidecar each,
/// and traffic through them, with a live summary.
#[derive(Debug, Parser)]
#[command(name = "ferry-demo", version)]
struct Args {
    /// Stop after this long (such as 10s) and exit 0 only if traffic flowed without errors.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Requests per second sent to frontend.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rate: u32,

    /// Instances of each service.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=5))]
    replicas: u64,
}

fn main() -> ExitCode {
    let argv = std::env::args_os().skip(1);
    match std::env::args().nth(1).as_deref() {
        Some(process::CONTROL_PLANE) => {
            process::exit_with_parent();
            return ferry_control_plane::main_with_args(std::iter::once("ferry-control-plane".into()).chain(argv.skip(1)));
        }
        Some(process::SIDECAR) => {
            process::exit_with_parent();
            return ferry_sidecar::main_with_args(std::iter::once("ferry-sidecar".into()).chain(argv.skip(1)));
        }
        _ => {}
    }
    let args = match ferry_runtime::parse::<Args, _, _>(std::env::args_os()) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = demo::Options { duration: args.duration, rate: args.rate, replicas: args.replicas as usize };
    match runtime.block_on(demo::run(options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
