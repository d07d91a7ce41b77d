//! Ferry's control plane: the registry of services and instances, the push engine that streams
//! config to sidecars, and the gRPC and HTTP APIs in front of them. `ferryctl` lives here too.
//!
//! `registry` is the core and knows no transport; `discovery` and `api` translate between it and
//! the wire; `server` wires everything to listeners.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod ctl;
pub mod discovery;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod store;

use std::{ffi::OsString, io::IsTerminal, process::ExitCode};

use clap::Parser;

/// Runs the control plane as its binary does: parses `args` (exit 64 on bad config), logs to
/// stderr, and serves until SIGINT or SIGTERM.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let config = match config::Config::try_parse_from(args) {
        Ok(config) => config,
        Err(error) => {
            let _ = error.print();
            // Help and version are not errors; bad config exits with EX_USAGE.
            return if error.use_stderr() { ExitCode::from(64) } else { ExitCode::SUCCESS };
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log) {
        Ok(filter) => filter,
        Err(error) => {
            eprintln!("error: invalid value {:?} for '--log <FILTER>': {error}", config.log);
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
