//! A sidecar, started: every listener bound, the config stream running, the app's checks
//! running; and its way out: drain, goodbye, stop.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use self::{
    listeners::Listeners,
    registration::Registration,
    tasks::{DataPath, Shared, control_plane_tasks, serve_dns},
};
use crate::{
    admin::{self, AdminState},
    catalog::Catalog,
    config::Config,
    control::{ControlAccess, ControlStatus},
    health::AppHealth,
    inbound::InFlight,
    mesh::Mesh,
    metrics::Metrics,
    state::{self, StateDir},
    workers::Workers,
};

mod listeners;
mod registration;
mod tasks;

/// The most services one sidecar tracks, declared and on demand together.
const MAX_SERVICES: usize = 1024;

/// How long connecting to the control plane may take.
pub(crate) const CONTROL_PLANE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long open connections get to finish once the listeners stop.
pub(crate) const CLOSE: Duration = Duration::from_secs(2);

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
        let listeners = Listeners::bind(&config).await?;
        let addrs = listeners.addrs()?;

        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut prometheus);
        let registration = Registration::prepare(&config, addrs.inbound, &metrics).await?;

        if config.intercept
            && let (Some(instance), Some(inbound)) = (&registration.instance, addrs.inbound)
            && let Ok(ip) = instance.address.parse::<std::net::IpAddr>()
        {
            // The app calling its own service, balanced onto its own instance.
            let local = if inbound.ip().is_unspecified() { std::net::Ipv4Addr::LOCALHOST.into() } else { inbound.ip() };
            crate::intercept::own::route_self(
                SocketAddr::new(ip, u16::try_from(instance.port).unwrap_or(0)),
                SocketAddr::new(local, inbound.port()),
            );
        }
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
        let shutdown = CancellationToken::new();
        let shared = Shared { catalog: &catalog, mesh: &mesh, metrics: &metrics, workers: &workers, shutdown: &shutdown };

        // Declared upstreams are subscribed before the config stream starts, so its first
        // hello names them.
        let Listeners { outbound, admin: admin_listener, inbound, upstreams, dns, outbound_v6, inbound_v6, dns_v6 } = listeners;
        let data_path = DataPath::build(&config, &shared)?;
        let mut servers = data_path.serve_outbound(&config, outbound, outbound_v6, upstreams, &shared)?;
        servers.push(data_path.forget_idle_services(&config, &shared));
        let in_flight = InFlight::default();
        for listener in inbound.into_iter().chain(inbound_v6) {
            servers.extend(data_path.serve_inbound(&config, listener, &in_flight, &shared));
        }
        for (udp, tcp) in dns.into_iter().chain(dns_v6) {
            servers.push(serve_dns(udp, tcp, &config, &shared));
        }

        let status = Arc::new(ControlStatus::default());
        let access =
            ControlAccess::new(config.control_plane.clone(), ca_pem, token, config.token_file.clone(), mesh.trust().clone());
        let tasks = control_plane_tasks(&config, access, &registration, &status, state_dir.as_ref(), &shared);

        let shutdown_requested = CancellationToken::new();
        let service: Arc<str> = config.service.as_str().into();
        let admin = admin::router(AdminState {
            gateway: config.gateway.then(|| service.clone()),
            service,
            node_id: registration.node_id.clone(),
            control_plane: config.control_plane.clone(),
            has_app: config.app.is_some(),
            declared: data_path.declared,
            catalog: catalog.clone(),
            outbound: data_path.outbound,
            control: status,
            health: registration.health.clone(),
            shutdown: shutdown_requested.clone(),
            metrics: Arc::new(prometheus),
            sidecar_metrics: metrics.clone(),
            state_file: state_dir.as_ref().map(|dir| dir.file().to_path_buf()),
            mesh: mesh.clone(),
            intercept: config.intercept,
        });
        let admin_shutdown = shutdown.clone();
        servers.push(tokio::spawn(async move {
            if let Err(error) = axum::serve(admin_listener, admin).with_graceful_shutdown(admin_shutdown.cancelled_owned()).await
            {
                tracing::error!(%error, "admin listener failed");
            }
        }));

        addrs.log(&config, &registration, state_dir.as_ref());
        Ok(Self {
            outbound_addr: addrs.outbound,
            inbound_addr: addrs.inbound,
            admin_addr: addrs.admin,
            upstream_addrs: addrs.upstreams,
            dns_addr: addrs.dns,
            app: config.app.clone(),
            health: registration.health,
            in_flight,
            drain_window: config.drain,
            shutdown_requested,
            shutdown,
            control: tasks.control,
            servers,
            background: tasks.others,
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
