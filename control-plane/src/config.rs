//! The control plane's command line. Every flag also reads a `FERRY_*` environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::store::StoreKind;

/// Ferry's control plane: the service registry, config push to sidecars, and the APIs.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-control-plane", version)]
pub struct Config {
    /// Address of the gRPC API and the sidecars' config streams.
    #[arg(long, env = "FERRY_GRPC", default_value = "0.0.0.0:7070", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub grpc: SocketAddr,

    /// Address of the HTTP/JSON API and /metrics.
    #[arg(long, env = "FERRY_HTTP", default_value = "0.0.0.0:7071", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub http: SocketAddr,

    /// Address of the DNS interface (UDP and TCP): NAME.service.ferry and friends.
    #[arg(long, env = "FERRY_DNS", default_value = "0.0.0.0:8600", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub dns: SocketAddr,

    /// TTL of DNS answers, and of the SOA minimum that bounds negative caching.
    #[arg(long, env = "FERRY_DNS_TTL", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub dns_ttl: Duration,

    /// Directory of the embedded store.
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "ferry-data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Where the registry is kept: `redb` (a file under --data-dir) or `memory` (lost on exit).
    #[arg(long, env = "FERRY_STORE", default_value = "redb", value_name = "STORE")]
    pub store: StoreKind,

    /// The longest a registry change waits before it is pushed to sidecars; changes within it
    /// are coalesced.
    #[arg(long, env = "FERRY_PUSH_MAX_DELAY", default_value = "50ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub push_max_delay: Duration,

    /// How long the instance of a sidecar whose stream broke is kept (critical) for it to
    /// reconnect before it is removed.
    #[arg(long, env = "FERRY_RECONNECT_GRACE", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub reconnect_grace: Duration,

    /// Allow script checks on instances registered through the API: they run commands on the
    /// control plane's host, so they are off unless asked for.
    #[arg(long, env = "FERRY_ENABLE_SCRIPT_CHECKS")]
    pub enable_script_checks: bool,

    /// Log filter, such as `info` or `ferry_control_plane=debug`.
    #[arg(long, env = "FERRY_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,
}
