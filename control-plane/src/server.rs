//! Wires the registry, the push engine and the APIs to their listeners, and runs them until
//! shutdown.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use ferry_proto::v1::{config_server::ConfigServer, discovery_server::DiscoveryServer, registry_server::RegistryServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use ferry_health::RunnerOptions;

use crate::{
    api::{
        config::ConfigService,
        grpc::RegistryService,
        http::{self, HttpState},
    },
    checks::HealthChecks,
    config::Config,
    discovery::{DiscoveryService, SessionConfig, Sidecars},
    dns::RegistryDirectory,
    index::Indexes,
    metrics::Metrics,
    registry::{Registry, RegistryConfig},
    resources::Resources,
    store,
};

/// A running control plane.
pub struct ControlPlane {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub registry: Arc<Registry>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ControlPlane {
    /// Opens the store, binds every listener and starts serving.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let store = store::open(&config.store, &config.data_dir)?;
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut prometheus);
        let registry_config = RegistryConfig { reconnect_grace: config.reconnect_grace, ..Default::default() };
        let description = store.describe();
        let indexes = Arc::new(Indexes::default());
        let registry = Registry::open(store.clone(), registry_config, metrics.registry.clone(), indexes.clone())
            .await
            .with_context(|| format!("loading the registry from {description}"))?;
        let resources = Resources::open(store, indexes, Duration::from_secs(5))
            .await
            .with_context(|| format!("loading routes and policies from {description}"))?;

        let grpc_listener = listen(config.grpc).with_context(|| format!("binding --grpc {}", config.grpc))?;
        let http_listener = listen(config.http).with_context(|| format!("binding --http {}", config.http))?;
        let (dns_udp, dns_tcp) = ferry_dns::bind(config.dns).await.with_context(|| format!("binding --dns {}", config.dns))?;
        let dns_addr = dns_udp.local_addr()?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let shutdown = CancellationToken::new();
        let sidecars = Arc::new(Sidecars::default());
        let session_config = SessionConfig { max_delay: config.push_max_delay, ..Default::default() };
        let discovery = DiscoveryService::new(
            registry.clone(),
            resources.clone(),
            sidecars.clone(),
            session_config,
            metrics.push.clone(),
            shutdown.clone(),
        );
        let checks = HealthChecks::new(
            registry.clone(),
            RunnerOptions { stagger: true, scripts_allowed: config.enable_script_checks, ..RunnerOptions::default() },
            metrics.health.clone(),
        );
        checks.sync_all();
        let registry_api = RegistryService::new(registry.clone(), checks.clone(), shutdown.clone());

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<RegistryServer<RegistryService>>().await;
        health_reporter.set_serving::<DiscoveryServer<DiscoveryService>>().await;
        health_reporter.set_serving::<ConfigServer<ConfigService>>().await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let grpc = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(RegistryServer::new(registry_api))
            .add_service(DiscoveryServer::new(discovery))
            .add_service(ConfigServer::new(ConfigService::new(resources.clone())))
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), shutdown.clone().cancelled_owned());
        let http_router = http::router(HttpState {
            registry: registry.clone(),
            checks,
            sidecars,
            metrics: Arc::new(prometheus),
            shutdown: shutdown.clone(),
            blocking: Arc::new(tokio::sync::Semaphore::new(http::MAX_BLOCKING_QUERIES)),
            resources: resources.clone(),
        });
        let http = axum::serve(http_listener, http_router).with_graceful_shutdown(shutdown.clone().cancelled_owned());

        let dns_config = ferry_dns::DnsConfig { ttl: config.dns_ttl, negative_ttl: config.dns_ttl };
        let dns =
            ferry_dns::serve(dns_udp, dns_tcp, Arc::new(RegistryDirectory::new(registry.clone())), dns_config, shutdown.clone());

        let tasks = vec![
            tokio::spawn(async move { grpc.await.context("gRPC server") }),
            tokio::spawn(async move { http.await.context("HTTP server") }),
            tokio::spawn(async move { dns.await.context("DNS server") }),
        ];
        tracing::info!(grpc = %grpc_addr, http = %http_addr, dns = %dns_addr, store = %description, "listening");
        Ok(Self { grpc_addr, http_addr, dns_addr, registry, shutdown, tasks })
    }

    /// Stops accepting, ends every stream, waits for the servers and flushes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await??;
        }
        self.registry.flush().await?;
        Ok(())
    }

    /// Waits until a server fails; a healthy control plane never returns from this.
    pub async fn failed(&mut self) -> anyhow::Error {
        let (result, index, _) = futures::future::select_all(self.tasks.iter_mut()).await;
        self.tasks.remove(index);
        match result {
            Ok(Ok(())) => anyhow::anyhow!("a server stopped"),
            Ok(Err(error)) => error,
            Err(error) => error.into(),
        }
    }
}

/// Runs a control plane until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut control_plane = ControlPlane::start(&config).await?;
    tokio::select! {
        () = ferry_runtime::shutdown_signal() => {
            tracing::info!("shutting down");
            control_plane.shutdown().await
        }
        error = control_plane.failed() => Err(error),
    }
}

/// Connections the listeners queue before they are accepted. Thousands of sidecars reconnect at
/// once after a control-plane restart; with a short queue the kernel resets some of them (the
/// kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 8192;

/// Binds a listener with a backlog sized for every sidecar reconnecting at once.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
