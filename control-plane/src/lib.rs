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
