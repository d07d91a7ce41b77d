//! Ferry's sidecar: the proxy next to each app instance.
//!
//! It registers the app's instance with the control plane over a config stream, keeps the
//! endpoints of the services the app calls, and proxies HTTP/1.1 and HTTP/2 (gRPC included):
//! outbound from the app to the mesh, balanced over passing endpoints, and inbound from the mesh
//! to the app; and relays opaque TCP connections to services whose instances take raw TCP. No
//! request path depends on the control plane being up.

#![forbid(unsafe_code)]

use std::{ffi::OsString, process::ExitCode};

pub mod addresses;
pub mod admin;
pub mod catalog;
pub mod config;
pub mod control;
pub mod dns;
pub mod errors;
pub mod health;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod intercept;
pub mod iptables;
pub mod mesh;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod sidecar;
pub mod state;
pub mod svc;
pub mod tcp;
pub mod workers;

use crate::config::Config;
pub use crate::sidecar::Sidecar;

/// Runs the sidecar as its binary does: parses `args` (exit 64 on bad config), logs to stderr,
/// and proxies until SIGINT or SIGTERM. `ferry-sidecar iptables install|uninstall ...` runs
/// [`iptables::main`] instead, with no runtime.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    if args.get(1).is_some_and(|arg| arg == "iptables") {
        return iptables::main(args.into_iter().skip(1));
    }
    // The data path runs on its own workers (see [`workers`]); the main runtime carries the
    // control stream, admin API, health checks, DNS and the accept loops, for which one thread is
    // plenty.
    ferry_runtime::main_on_threads(Some(1), args, |config: &Config| config.log.clone(), run)
}

/// Runs a sidecar until SIGINT, SIGTERM or `POST /shutdown`, then drains it (a second signal
/// cuts the drain short) and stops.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let sidecar = Sidecar::start(config).await?;
    tokio::select! {
        () = ferry_runtime::shutdown_signal() => {}
        () = sidecar.shutdown_requested() => {}
    }
    sidecar.drain(ferry_runtime::shutdown_signal()).await;
    tracing::info!("shutting down");
    sidecar.shutdown().await;
    Ok(())
}
