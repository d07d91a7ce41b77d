//! Ferry's control plane: the registry of services and instances, the push engine that streams
//! config to sidecars, and the gRPC and HTTP APIs in front of them. `ferryctl`, the command line
//! over those APIs, is a crate of its own that does not depend on this one.
//!
//! `registry` is the core and knows no transport; `discovery` and `api` translate between it and
//! the wire; `server` wires everything to listeners.

#![forbid(unsafe_code)]

pub mod addresses;
pub mod api;
pub mod auth;
pub mod ca;
pub mod checks;
#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod dns;
pub mod index;
pub mod listener;
pub mod metrics;
#[cfg(test)]
mod properties;
pub mod registry;
pub mod resources;
pub mod server;
pub mod store;
#[cfg(test)]
mod testing;
pub mod traffic;

use std::{ffi::OsString, process::ExitCode};

/// Runs the control plane as its binary does: parses `args` (exit 64 on bad config), logs to
/// stderr, and serves until SIGINT or SIGTERM.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    ferry_runtime::main(args, |config: &config::Config| config.log.clone(), server::run)
}
