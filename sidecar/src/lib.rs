//! Ferry's sidecar: the proxy next to each app instance.
//!
//! It registers the app's instance with the control plane over a config stream, keeps the
//! endpoints of the services the app calls, and proxies HTTP/1.1 and HTTP/2 (gRPC included):
//! outbound from the app to the mesh, balanced over passing endpoints, and inbound from the mesh
//! to the app. No request path depends on the control plane being up.

#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use ferry_proto::v1;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub mod admin;
pub mod catalog;
pub mod config;
pub mod control;
pub mod errors;
pub mod http;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod svc;

use crate::{
    admin::AdminState,
    catalog::Catalog,
    config::Config,
    control::{ControlConfig, ControlStatus},
    http::client::{Client, ClientConfig},
    inbound::Inbound,
    metrics::Metrics,
    outbound::{Outbound, OutboundConfig},
};

/// The most services one sidecar tracks, declared and on demand together.
const MAX_SERVICES: usize = 1024;

/// How long connecting to the control plane may take.
const CONTROL_PLANE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long open connections get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(1);

/// A running sidecar.
pub struct Sidecar {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub upstream_addrs: Vec<(Arc<str>, SocketAddr)>,
    shutdown: CancellationToken,
    control: JoinHandle<()>,
    servers: Vec<JoinHandle<()>>,
}

async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding {flag} {addr}"))
}

impl Sidecar {
    /// Binds every listener, connects to the control plane in the background and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let outbound_listener = bind("--outbound", config.outbound).await?;
        let admin_listener = bind("--admin", config.admin).await?;
        let inbound_listener = match &config.app {
            Some(_) => Some(bind("--inbound", config.inbound).await?),
            None => None,
        };
        let mut upstream_listeners = Vec::with_capacity(config.upstreams.len());
        for upstream in &config.upstreams {
            upstream_listeners.push((upstream.service.clone(), bind("--upstream", upstream.listen).await?));
        }

        let outbound_addr = outbound_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let inbound_addr = inbound_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let upstream_addrs: Vec<(Arc<str>, SocketAddr)> =
            upstream_listeners.iter().map(|(name, l)| Ok((name.clone(), l.local_addr()?))).collect::<std::io::Result<_>>()?;

        let instance = match inbound_addr {
            Some(inbound) => {
                let host = match &config.advertise {
                    Some(host) => host.clone(),
                    None => advertise_host(inbound.ip(), &config.control_plane).await,
                };
                let id = config.id.clone().unwrap_or_else(|| format!("{}-{}-{}", config.service, host, inbound.port()));
                Some(v1::Instance {
                    id,
                    service: config.service.clone(),
                    address: host,
                    port: u32::from(inbound.port()),
                    metadata: config.metadata_map().into_iter().collect(),
                    region: config.region.clone(),
                    zone: config.zone.clone(),
                    weight: config.weight,
                    ..Default::default()
                })
            }
            None => None,
        };
        if let Some(instance) = &instance {
            ferry_proto::validate::instance(instance).context("the instance this sidecar would register")?;
        }
        let node_id = config
            .node_id
            .clone()
            .or_else(|| instance.as_ref().map(|i| i.id.clone()))
            .unwrap_or_else(|| format!("{}-{:08x}", config.service, rand::random::<u32>()));

        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut prometheus);
        let catalog = Arc::new(Catalog::new(MAX_SERVICES));
        let client_config = ClientConfig { connect_timeout: config.connect_timeout, ..Default::default() };
        let outbound = Outbound::new(
            catalog.clone(),
            OutboundConfig {
                discovery_timeout: config.discovery_timeout,
                response_timeout: config.response_timeout,
                client: client_config.clone(),
            },
            metrics.clone(),
        );
        // Declared upstreams are subscribed from the start, not on their first request.
        for upstream in &config.upstreams {
            outbound.destination(&upstream.service).map_err(|e| anyhow::anyhow!("--upstream {}: {e}", upstream.service))?;
        }

        let shutdown = CancellationToken::new();
        let status = Arc::new(ControlStatus::default());
        let control = tokio::spawn(control::run(
            ControlConfig {
                url: config.control_plane.clone(),
                node_id: node_id.clone(),
                service: config.service.clone(),
                instance: instance.clone(),
                connect_timeout: CONTROL_PLANE_CONNECT_TIMEOUT,
                backoff_base: Duration::from_millis(200),
                backoff_max: Duration::from_secs(10),
            },
            catalog.clone(),
            status.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));

        let service: Arc<str> = config.service.as_str().into();
        let mut servers = Vec::new();
        servers.push(tokio::spawn(http::server::serve("outbound", outbound_listener, outbound.clone(), shutdown.clone(), DRAIN)));
        for (name, listener) in upstream_listeners {
            servers.push(tokio::spawn(http::server::serve("upstream", listener, outbound.fixed(name), shutdown.clone(), DRAIN)));
        }
        if let (Some(listener), Some(app)) = (inbound_listener, &config.app) {
            let inbound = Inbound::new(Client::new(app.host.clone(), app.port, client_config), service.clone(), metrics.clone());
            servers.push(tokio::spawn(http::server::serve("inbound", listener, inbound, shutdown.clone(), DRAIN)));
        }
        let admin = admin::router(AdminState {
            service,
            node_id: node_id.clone(),
            control_plane: config.control_plane.clone(),
            has_app: config.app.is_some(),
            declared: config.upstreams.iter().map(|u| u.service.clone()).collect(),
            catalog,
            control: status,
            metrics: Arc::new(prometheus),
        });
        let admin_shutdown = shutdown.clone();
        servers.push(tokio::spawn(async move {
            if let Err(error) = axum::serve(admin_listener, admin).with_graceful_shutdown(admin_shutdown.cancelled_owned()).await
            {
                tracing::error!(%error, "admin listener failed");
            }
        }));

        let upstreams = upstream_addrs.iter().map(|(name, addr)| format!("{name}@{addr}")).collect::<Vec<_>>().join(",");
        tracing::info!(
            outbound = %outbound_addr,
            inbound = %inbound_addr.map_or("none".to_owned(), |a| a.to_string()),
            admin = %admin_addr,
            upstreams = %if upstreams.is_empty() { "none" } else { &upstreams },
            node = %node_id,
            instance = %instance.as_ref().map_or("none", |i| i.id.as_str()),
            "listening"
        );
        Ok(Self { outbound_addr, inbound_addr, admin_addr, upstream_addrs, shutdown, control, servers })
    }

    /// Says goodbye to the control plane (removing the instance), stops accepting and waits
    /// briefly for open connections.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.control).await;
        for server in self.servers {
            let _ = server.await;
        }
    }
}

/// The host to publish: the inbound listener's IP when it is a specific one, otherwise the local
/// address the system would use to reach the control plane.
async fn advertise_host(inbound_ip: IpAddr, control_plane: &str) -> String {
    if !inbound_ip.is_unspecified() {
        return inbound_ip.to_string();
    }
    let detected = async {
        let uri: ::http::Uri = control_plane.parse().ok()?;
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(7070);
        let target = tokio::net::lookup_host((host.as_str(), port)).await.ok()?.next()?;
        let socket = UdpSocket::bind(if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip())
    };
    match detected.await {
        Some(ip) => ip.to_string(),
        None => {
            tracing::warn!("cannot tell which address reaches the control plane; advertising 127.0.0.1 (set --advertise)");
            "127.0.0.1".to_owned()
        }
    }
}

/// Runs the sidecar as its binary does: parses `args` (exit 64 on bad config), logs to stderr,
/// and proxies until SIGINT or SIGTERM.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    ferry_runtime::main(args, |config: &Config| config.log.clone(), run)
}

/// Runs a sidecar until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let sidecar = Sidecar::start(config).await?;
    ferry_runtime::shutdown_signal().await;
    tracing::info!("shutting down");
    sidecar.shutdown().await;
    Ok(())
}
