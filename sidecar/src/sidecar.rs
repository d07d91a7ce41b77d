//! A sidecar, started: every listener bound, the config stream running, the app's checks
//! running; and its way out: drain, goodbye, stop.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use ferry_proto::v1;
use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState},
    catalog::Catalog,
    config::{Config, UpstreamProtocol},
    control::{self, ControlAccess, ControlConfig, ControlStatus},
    dns::CatalogDirectory,
    health::AppHealth,
    http::{
        self,
        client::{Client, ClientConfig},
    },
    identity::{self, CertifyConfig},
    inbound::{InFlight, Inbound},
    mesh::{Mesh, MtlsMode},
    metrics::Metrics,
    outbound::{Outbound, OutboundConfig},
    state::{self, StateDir},
    tcp::{TcpConfig, TcpUpstream},
    workers::Workers,
};

/// The most services one sidecar tracks, declared and on demand together.
const MAX_SERVICES: usize = 1024;

/// How long connecting to the control plane may take.
const CONTROL_PLANE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long open connections get to finish once the listeners stop.
const CLOSE: Duration = Duration::from_secs(2);

/// The least a drain lasts, even when the app is gone: time for the control plane to tell the
/// other sidecars that this instance is draining.
const MIN_DRAIN: Duration = Duration::from_millis(500);

/// A running sidecar.
pub struct Sidecar {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub upstream_addrs: Vec<(Arc<str>, SocketAddr)>,
    pub dns_addr: Option<SocketAddr>,
    app: Option<crate::config::HostPort>,
    health: Option<Arc<AppHealth>>,
    in_flight: InFlight,
    drain_window: Duration,
    /// Cancelled by `POST /shutdown`.
    shutdown_requested: CancellationToken,
    shutdown: CancellationToken,
    control: JoinHandle<()>,
    servers: Vec<JoinHandle<()>>,
    /// The state dir's writer and restorer.
    background: Vec<JoinHandle<()>>,
    workers: Workers,
}

/// A per-upstream listener and what serves it.
enum UpstreamServer {
    Http(Outbound, TcpListener),
    Tcp(TcpUpstream, TcpListener),
}

async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding {flag} {addr}"))
}

impl Sidecar {
    /// Binds every listener, connects to the control plane in the background and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let ca_pem = config.ca_pem()?;
        let token = config.token()?;
        let state_dir = match &config.state_dir {
            Some(dir) => Some(
                StateDir::create(dir)
                    .map_err(|e| ferry_runtime::UsageError(format!("--state-dir {}: cannot create it: {e}", dir.display())))?,
            ),
            None => None,
        };
        let outbound_listener = bind("--outbound", config.outbound).await?;
        let admin_listener = bind("--admin", config.admin).await?;
        let inbound_listener = match &config.app {
            Some(_) => Some(bind("--inbound", config.inbound).await?),
            None => None,
        };
        let mut upstream_listeners = Vec::with_capacity(config.upstreams.len());
        for upstream in &config.upstreams {
            upstream_listeners.push((upstream.clone(), bind("--upstream", upstream.listen).await?));
        }
        let dns_sockets = match config.dns {
            Some(addr) => Some(ferry_dns::bind(addr).await.with_context(|| format!("binding --dns {addr}"))?),
            None => None,
        };

        let outbound_addr = outbound_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let inbound_addr = inbound_listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let dns_addr = dns_sockets.as_ref().map(|(udp, _)| udp.local_addr()).transpose()?;
        let upstream_addrs: Vec<(Arc<str>, SocketAddr)> =
            upstream_listeners.iter().map(|(u, l)| Ok((u.service.clone(), l.local_addr()?))).collect::<std::io::Result<_>>()?;

        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut prometheus);

        let mut instance = match inbound_addr {
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
        let health = match (&mut instance, &config.app) {
            (Some(instance), Some(app)) => {
                let checks = config.check_specs(&instance.id)?;
                let health = AppHealth::start(checks, app, metrics.health.clone());
                instance.checks = health.specs();
                Some(Arc::new(health))
            }
            _ => {
                config.check_specs("none")?;
                None
            }
        };
        if let Some(instance) = &instance {
            ferry_proto::validate::instance(instance).context("the instance this sidecar would register")?;
        }
        let node_id = config
            .node_id
            .clone()
            .or_else(|| instance.as_ref().map(|i| i.id.clone()))
            .unwrap_or_else(|| format!("{}-{:08x}", config.service, rand::random::<u32>()));

        let catalog = Arc::new(Catalog::new(MAX_SERVICES));
        let mesh = Mesh::new(config.mtls);
        if let Some(dir) = &state_dir {
            let restored = state::restore_trust(dir, &mesh).await;
            if !restored.is_empty() {
                tracing::info!(from = %dir.file().display(), restored = %restored.join(", "), "restored the sidecar's trust");
            }
        }
        let workers = match config.workers {
            Some(count) => usize::from(count),
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        let workers = Workers::start(workers)?;
        let client_config = ClientConfig {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            workers: workers.count(),
            mesh: Some(mesh.clone()),
            ..Default::default()
        };
        let outbound = Outbound::new(
            catalog.clone(),
            OutboundConfig {
                discovery_timeout: config.discovery_timeout,
                response_timeout: config.response_timeout,
                client: client_config.clone(),
                gateway: config.gateway.then(|| Arc::from(config.service.as_str())),
                zone: (!config.zone.is_empty()).then(|| Arc::from(config.zone.as_str())),
                balance_metrics: metrics.balance.clone(),
                runtime: tokio::runtime::Handle::current(),
            },
            metrics.clone(),
        );
        let mut declared: Vec<Arc<str>> = config.upstreams.iter().map(|u| u.service.clone()).collect();
        if config.gateway {
            // A gateway needs its route before it is ready.
            declared.push(config.service.as_str().into());
        }
        // Declared upstreams are subscribed from the start, not on their first request: TCP ones
        // through the catalog alone, HTTP ones (and a gateway's own service) with their stack.
        let tcp_config = TcpConfig {
            discovery_timeout: config.discovery_timeout,
            connect_timeout: config.connect_timeout,
            keepalive: client_config.tcp_keepalive,
            mesh: Some(mesh.clone()),
        };
        let mut upstream_servers = Vec::with_capacity(upstream_listeners.len());
        for (upstream, listener) in upstream_listeners {
            let service = upstream.service;
            let server = match upstream.protocol {
                UpstreamProtocol::Tcp => {
                    let state = catalog.watch(&service).map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
                    UpstreamServer::Tcp(TcpUpstream::new(service, state, tcp_config.clone(), metrics.clone()), listener)
                }
                UpstreamProtocol::Http => {
                    outbound.destination(&service).map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
                    UpstreamServer::Http(outbound.fixed(service), listener)
                }
            };
            upstream_servers.push(server);
        }
        if config.gateway {
            outbound.destination(&config.service).map_err(|e| anyhow::anyhow!("{}: {e}", config.service))?;
        }

        let shutdown = CancellationToken::new();
        let shutdown_requested = CancellationToken::new();
        let status = Arc::new(ControlStatus::default());
        // Before the config stream, so the writer sees every push.
        let mut background = Vec::new();
        if let Some(dir) = &state_dir {
            background.push(tokio::spawn(state::keep(
                dir.clone(),
                catalog.clone(),
                mesh.clone(),
                metrics.clone(),
                shutdown.clone(),
            )));
            background.push(tokio::spawn(state::restore_when_unreachable(
                dir.clone(),
                catalog.clone(),
                status.clone(),
                shutdown.clone(),
            )));
        }
        let access = ControlAccess {
            url: config.control_plane.clone(),
            ca_pem,
            token,
            token_file: config.token_file.clone(),
            trust: mesh.trust().clone(),
        };
        if let Some(issued) = mesh.identity() {
            metrics
                .identity_expiration
                .set(issued.not_after.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64());
        }
        background.push(tokio::spawn(identity::run(
            CertifyConfig { service: config.service.clone(), node_id: node_id.clone(), control: access.clone() },
            mesh.clone(),
            metrics.clone(),
            shutdown.clone(),
        )));
        let control = tokio::spawn(control::run(
            ControlConfig {
                access,
                mtls: inbound_addr.is_some() && config.mtls != MtlsMode::Off,
                node_id: node_id.clone(),
                service: config.service.clone(),
                instance: instance.clone(),
                health: health.as_ref().map(|h| h.watch()),
                connect_timeout: CONTROL_PLANE_CONNECT_TIMEOUT,
                backoff_base: Duration::from_millis(200),
                backoff_max: Duration::from_secs(10),
            },
            catalog.clone(),
            mesh.clone(),
            status.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));

        let service: Arc<str> = config.service.as_str().into();
        let in_flight = InFlight::default();
        let mut servers = Vec::new();
        let edge = if config.gateway { outbound.fixed(service.clone()) } else { outbound.clone() };
        servers.push(tokio::spawn(http::server::serve(
            "outbound",
            outbound_listener,
            edge,
            shutdown.clone(),
            CLOSE,
            metrics.connections("outbound"),
            workers.clone(),
        )));
        for server in upstream_servers {
            servers.push(match server {
                UpstreamServer::Http(outbound, listener) => tokio::spawn(http::server::serve(
                    "upstream",
                    listener,
                    outbound,
                    shutdown.clone(),
                    CLOSE,
                    metrics.connections("upstream"),
                    workers.clone(),
                )),
                UpstreamServer::Tcp(upstream, listener) => {
                    tokio::spawn(upstream.serve(listener, shutdown.clone(), CLOSE, workers.clone()))
                }
            });
        }
        if let (Some(listener), Some(app)) = (inbound_listener, &config.app) {
            // The app is next door: in plaintext, whatever the endpoint clients do.
            let client = Client::new(app.host.clone(), app.port, ClientConfig { mesh: None, ..client_config.clone() });
            let inbound = Inbound::new(client, service.clone(), metrics.clone(), in_flight.clone(), mesh.clone());
            let limits = crate::inbound::listener::Limits {
                max_connections: config.max_inbound_connections as usize,
                handshake_timeout: config.handshake_timeout,
                connect_timeout: config.connect_timeout,
            };
            servers.push(tokio::spawn(crate::inbound::listener::serve(
                listener,
                inbound,
                mesh.clone(),
                metrics.clone(),
                limits,
                metrics.connections("inbound"),
                workers.clone(),
                shutdown.clone(),
                CLOSE,
            )));
        }
        if let Some((udp, tcp)) = dns_sockets {
            let directory = Arc::new(CatalogDirectory::new(catalog.clone(), config.discovery_timeout));
            let dns_config = ferry_dns::DnsConfig { ttl: config.dns_ttl, negative_ttl: config.dns_ttl };
            let dns_shutdown = shutdown.clone();
            servers.push(tokio::spawn(async move {
                if let Err(error) = ferry_dns::serve(udp, tcp, directory, dns_config, dns_shutdown).await {
                    tracing::error!(%error, "DNS listener failed");
                }
            }));
        }
        let admin = admin::router(AdminState {
            gateway: config.gateway.then(|| service.clone()),
            service,
            node_id: node_id.clone(),
            control_plane: config.control_plane.clone(),
            has_app: config.app.is_some(),
            declared,
            catalog,
            outbound,
            control: status,
            health: health.clone(),
            shutdown: shutdown_requested.clone(),
            metrics: Arc::new(prometheus),
            sidecar_metrics: metrics.clone(),
            state_file: state_dir.as_ref().map(|dir| dir.file().to_path_buf()),
            mesh: mesh.clone(),
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
            dns = %dns_addr.map_or("none".to_owned(), |a| a.to_string()),
            node = %node_id,
            instance = %instance.as_ref().map_or("none", |i| i.id.as_str()),
            mtls = config.mtls.as_str(),
            state = %state_dir.as_ref().map_or("none".to_owned(), |dir| dir.file().display().to_string()),
            "listening"
        );
        Ok(Self {
            outbound_addr,
            inbound_addr,
            admin_addr,
            upstream_addrs,
            dns_addr,
            app: config.app.clone(),
            health,
            in_flight,
            drain_window: config.drain,
            shutdown_requested,
            shutdown,
            control,
            servers,
            background,
            workers,
        })
    }

    /// Resolves when `POST /shutdown` asks the sidecar to leave.
    pub async fn shutdown_requested(&self) {
        self.shutdown_requested.cancelled().await;
    }

    /// Drains the app's instance: it turns `draining`, so the control plane tells every sidecar to
    /// send it nothing new, while this sidecar keeps serving what still arrives (inbound) and
    /// what the app still sends (outbound). Ends when the drain window closes, or earlier when
    /// the app has exited and nothing is in flight, or when `interrupt` resolves.
    pub async fn drain(&self, interrupt: impl Future<Output = ()>) {
        let (Some(health), Some(app)) = (&self.health, &self.app) else { return };
        health.drain();
        tracing::info!(window = ?self.drain_window, "draining");
        let started = Instant::now();
        let deadline = started + self.drain_window;
        tokio::pin!(interrupt);
        loop {
            let now = Instant::now();
            if now >= deadline {
                tracing::info!("drain window closed");
                return;
            }
            if now >= started + MIN_DRAIN && self.in_flight.get() == 0 && app_has_exited(app).await {
                tracing::info!("the app has exited and nothing is in flight");
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100).min(deadline - now)) => {}
                () = &mut interrupt => {
                    tracing::info!("interrupted: ending the drain now");
                    return;
                }
            }
        }
    }

    /// Says goodbye to the control plane (removing the instance), stops accepting and waits
    /// briefly for open connections.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.control).await;
        for server in self.servers {
            let _ = server.await;
        }
        // The last config change is written before the sidecar exits.
        for task in self.background {
            let _ = task.await;
        }
        self.workers.stop();
    }
}

/// Whether nothing listens at the app's address any more.
async fn app_has_exited(app: &crate::config::HostPort) -> bool {
    let connect = tokio::net::TcpStream::connect((app.host.as_str(), app.port));
    matches!(
        tokio::time::timeout(Duration::from_millis(200), connect).await,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused
    )
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
