//! `ferry-demo app inventory|catalog|frontend`: one of the demo's apps as a process of its own,
//! calling the services it depends on by their plain names ([`Calls::Direct`]), or through a
//! sidecar's outbound listener with `--outbound`.
//!
//! By plain name is how `examples/intercept-demo.sh` runs them, one per network namespace behind
//! an intercepting sidecar: the app has no proxy settings and knows nothing of Ferry; the
//! sidecar answers its DNS lookups with the services' virtual IPs and takes its connections.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;

use crate::apps::{self, Calls, Counters, DIRECT_CATALOG, DIRECT_INVENTORY};

/// Runs one of the demo's apps alone until SIGINT or SIGTERM. By default it calls the services
/// it depends on by their plain names, resolved by the system resolver: catalog calls inventory
/// over gRPC at inventory:50051, frontend calls catalog at http://catalog/ (port 80). An
/// intercepting sidecar in its network namespace (`ferry-sidecar --intercept`, after
/// `ferry-sidecar iptables install`) turns those names and connections into mesh calls.
#[derive(Debug, Parser)]
#[command(name = "ferry-demo app", bin_name = "ferry-demo app")]
pub struct AppArgs {
    /// The app to run.
    #[arg(value_enum)]
    pub app: App,

    /// The address to listen on (IP:PORT); 127.0.0.1:50051 for inventory, 127.0.0.1:8080 for
    /// the others by default.
    #[arg(long, env = "FERRY_DEMO_LISTEN", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The instance's name, which its answers carry (frontend's page lists the instances that
    /// served it); the app's name by default.
    #[arg(long, env = "FERRY_DEMO_INSTANCE", value_name = "ID")]
    pub instance: Option<String>,

    /// The version catalog says in its `x-version` header (catalog only).
    #[arg(long, env = "FERRY_DEMO_VERSION", default_value = "v1")]
    pub version: String,

    /// Call the services it depends on through the sidecar's outbound listener at this address,
    /// naming each in Host or the gRPC origin, instead of by plain name.
    #[arg(long, env = "FERRY_DEMO_OUTBOUND", value_name = "ADDR")]
    pub outbound: Option<SocketAddr>,

    /// Log filter, such as `info` or `ferry_examples=debug`.
    #[arg(long, env = "FERRY_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,
}

/// The demo's apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum App {
    /// The gRPC stock service.
    Inventory,
    /// The HTTP item list; calls inventory.
    Catalog,
    /// The HTTP page; calls catalog.
    Frontend,
}

impl App {
    /// Its name, as a service.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Catalog => "catalog",
            Self::Frontend => "frontend",
        }
    }

    fn default_listen(self) -> SocketAddr {
        let port = if self == Self::Inventory { 50051 } else { 8080 };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Where it sends its calls, in words, for its log.
    fn calls_to(self, calls: Calls) -> String {
        let callee = match self {
            Self::Inventory => return "nothing".to_owned(),
            Self::Catalog => DIRECT_INVENTORY,
            Self::Frontend => DIRECT_CATALOG,
        };
        match calls {
            Calls::Direct => callee.to_owned(),
            Calls::Sidecar(outbound) => format!("{callee} through the sidecar at {outbound}"),
        }
    }
}

/// Serves the app until SIGINT or SIGTERM.
pub async fn run(args: AppArgs) -> anyhow::Result<()> {
    let listen = args.listen.unwrap_or_else(|| args.app.default_listen());
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding --listen {listen}"))?;
    let addr = listener.local_addr().context("reading the listener's address")?;
    let instance = args.instance.unwrap_or_else(|| args.app.name().to_owned());
    let calls = args.outbound.map_or(Calls::Direct, Calls::Sidecar);
    tracing::info!(app = args.app.name(), %instance, %addr, calls = %args.app.calls_to(calls), "listening");
    let counters = Arc::new(Counters::default());
    let shutdown = ferry_runtime::shutdown_signal();
    match args.app {
        App::Inventory => apps::inventory(listener, instance, counters.clone(), shutdown).await?,
        App::Catalog => apps::catalog(listener, instance, &args.version, calls, counters.clone(), shutdown).await?,
        App::Frontend => apps::frontend(listener, instance, calls, counters.clone(), shutdown).await?,
    }
    let served = counters.served.load(std::sync::atomic::Ordering::Relaxed);
    let failed = counters.failed.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(served, failed, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_app_listens_on_its_usual_port_unless_told_otherwise() {
        let args = AppArgs::try_parse_from(["ferry-demo app", "inventory"]).expect("valid arguments");
        assert_eq!(args.app.default_listen(), SocketAddr::from(([127, 0, 0, 1], 50051)));
        let args = AppArgs::try_parse_from(["ferry-demo app", "catalog", "--listen", "0.0.0.0:9000", "--version", "v2"])
            .expect("valid arguments");
        assert_eq!(
            (args.app, args.listen, args.version.as_str()),
            (App::Catalog, Some("0.0.0.0:9000".parse().expect("addr")), "v2")
        );
    }

    #[test]
    fn apps_call_by_plain_name_unless_given_a_sidecar() {
        assert_eq!(App::Frontend.calls_to(Calls::Direct), "http://catalog");
        let outbound = "127.0.0.1:15001".parse().expect("addr");
        assert_eq!(
            App::Catalog.calls_to(Calls::Sidecar(outbound)),
            "http://inventory:50051 through the sidecar at 127.0.0.1:15001"
        );
    }
}
