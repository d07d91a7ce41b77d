//! What a started sidecar runs: the data path's servers (outbound, per-upstream, inbound, DNS)
//! and the work that keeps it in touch with the control plane (the config stream, the workload
//! certificate, the state dir).

use std::{sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{CLOSE, CONTROL_PLANE_CONNECT_TIMEOUT, registration::Registration};
use crate::{
    catalog::Catalog,
    config::{Config, Upstream, UpstreamProtocol},
    control::{self, ControlAccess, ControlConfig, ControlStatus},
    dns::CatalogDirectory,
    http::{
        self,
        client::{Client, ClientConfig},
    },
    identity::{self, CertifyConfig},
    inbound::{InFlight, Inbound},
    intercept::{Intercept, InterceptConfig},
    mesh::{Mesh, MtlsMode},
    metrics::Metrics,
    outbound::{Outbound, OutboundConfig},
    state::{self, StateDir},
    tcp::{TcpConfig, TcpUpstream},
    workers::Workers,
};

/// What every task of the sidecar shares.
pub struct Shared<'a> {
    pub catalog: &'a Arc<Catalog>,
    pub mesh: &'a Mesh,
    pub metrics: &'a Metrics,
    pub workers: &'a Workers,
    pub shutdown: &'a CancellationToken,
}

/// The data path, built: the outbound proxy and the services it was told of in advance.
pub struct DataPath {
    pub outbound: Outbound,
    pub client: ClientConfig,
    /// The services declared on the command line (and a gateway's own), which the sidecar is
    /// not ready without.
    pub declared: Vec<Arc<str>>,
}

impl DataPath {
    /// The outbound proxy, with the stacks of declared HTTP upstreams (and a gateway's own
    /// service) built and subscribed from the start, not on their first request.
    pub fn build(config: &Config, shared: &Shared<'_>) -> anyhow::Result<Self> {
        let client = ClientConfig {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            workers: shared.workers.count(),
            mesh: Some(shared.mesh.clone()),
            ..Default::default()
        };
        let outbound = Outbound::new(
            shared.catalog.clone(),
            OutboundConfig {
                discovery_timeout: config.discovery_timeout,
                response_timeout: config.response_timeout,
                client: client.clone(),
                gateway: config.gateway.then(|| Arc::from(config.service.as_str())),
                zone: (!config.zone.is_empty()).then(|| Arc::from(config.zone.as_str())),
                balance_metrics: shared.metrics.balance.clone(),
                runtime: tokio::runtime::Handle::current(),
            },
            shared.metrics.clone(),
        );
        let mut declared: Vec<Arc<str>> = config.upstreams.iter().map(|u| u.service.clone()).collect();
        if config.gateway {
            // A gateway needs its route before it is ready.
            declared.push(config.service.as_str().into());
        }
        for upstream in &config.upstreams {
            let subscribed = match upstream.protocol {
                UpstreamProtocol::Http => outbound.destination(&upstream.service).map(drop),
                // Opaque TCP follows the service through the catalog alone.
                UpstreamProtocol::Tcp => shared.catalog.watch(&upstream.service).map(drop).map_err(Into::into),
            };
            subscribed.map_err(|e| anyhow::anyhow!("{}: {e}", upstream.service))?;
        }
        if config.gateway {
            outbound.destination(&config.service).map_err(|e| anyhow::anyhow!("{}: {e}", config.service))?;
        }
        Ok(Self { outbound, client, declared })
    }

    /// Every few seconds, drops the stacks of services not used for `--service-idle-timeout`
    /// (`--unknown-service-ttl` for names that do not exist), and then the subscriptions nobody
    /// holds any more, so that names asked for once do not stay tracked.
    pub fn forget_idle_services(&self, config: &Config, shared: &Shared<'_>) -> JoinHandle<()> {
        let (outbound, catalog, shutdown) = (self.outbound.clone(), shared.catalog.clone(), shared.shutdown.clone());
        let (idle, unknown) = (config.service_idle_timeout, config.unknown_service_ttl);
        let every = unknown.min(idle).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let stacks = outbound.sweep(idle, unknown);
                // A subscription nobody holds is kept as long as an unknown name is remembered,
                // so that a name looked up again and again (DNS) is not subscribed each time.
                let dropped = catalog.sweep(unknown, std::time::Instant::now());
                if stacks > 0 || !dropped.is_empty() {
                    tracing::debug!(stacks, services = ?dropped, "forgot services not used lately");
                }
            }
        })
    }

    /// Serves the outbound listener and every per-upstream one.
    pub fn serve_outbound(
        &self,
        config: &Config,
        outbound: TcpListener,
        outbound_v6: Option<TcpListener>,
        upstreams: Vec<(Upstream, TcpListener)>,
        shared: &Shared<'_>,
    ) -> anyhow::Result<Vec<JoinHandle<()>>> {
        let mut servers = Vec::with_capacity(1 + upstreams.len());
        let edge = if config.gateway { self.outbound.fixed(config.service.as_str().into()) } else { self.outbound.clone() };
        let tcp_config = TcpConfig {
            discovery_timeout: config.discovery_timeout,
            connect_timeout: config.connect_timeout,
            keepalive: self.client.tcp_keepalive,
            mesh: Some(shared.mesh.clone()),
        };
        if config.intercept {
            let intercept = Intercept::new(
                shared.catalog.clone(),
                edge,
                tcp_config.clone(),
                InterceptConfig {
                    outbound_policy: config.outbound_policy,
                    opaque_ports: config.opaque_ports.clone(),
                    detect_timeout: config.detect_timeout,
                    discovery_timeout: config.discovery_timeout,
                    connect_timeout: config.connect_timeout,
                },
                shared.metrics.clone(),
                shared.shutdown.clone(),
            );
            for listener in std::iter::once(outbound).chain(outbound_v6) {
                servers.push(tokio::spawn(intercept.clone().serve(
                    listener,
                    shared.metrics.connections("outbound"),
                    shared.workers.clone(),
                    CLOSE,
                )));
            }
        } else {
            servers.push(self.serve_http("outbound", outbound, edge, shared));
        }
        for (upstream, listener) in upstreams {
            let service = upstream.service;
            servers.push(match upstream.protocol {
                UpstreamProtocol::Http => self.serve_http("upstream", listener, self.outbound.fixed(service), shared),
                UpstreamProtocol::Tcp => {
                    // (Subscribed in `build`: this cannot fail now.)
                    let state = shared.catalog.watch(&service).map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
                    let upstream = TcpUpstream::new(service, state, tcp_config.clone(), shared.metrics.clone());
                    tokio::spawn(upstream.serve(listener, shared.shutdown.clone(), CLOSE, shared.workers.clone()))
                }
            });
        }
        Ok(servers)
    }

    fn serve_http(&self, name: &'static str, listener: TcpListener, edge: Outbound, shared: &Shared<'_>) -> JoinHandle<()> {
        tokio::spawn(http::server::serve(
            name,
            listener,
            edge,
            shared.shutdown.clone(),
            CLOSE,
            shared.metrics.connections(name),
            shared.workers.clone(),
        ))
    }

    /// Serves the inbound listener: mesh traffic to the app.
    pub fn serve_inbound(
        &self,
        config: &Config,
        listener: TcpListener,
        in_flight: &InFlight,
        shared: &Shared<'_>,
    ) -> Option<JoinHandle<()>> {
        let app = config.app.as_ref()?;
        // The app is next door: in plaintext, whatever the endpoint clients do.
        let client = Client::new(app.host.clone(), app.port, ClientConfig { mesh: None, ..self.client.clone() });
        let service: Arc<str> = config.service.as_str().into();
        let inbound = Inbound::new(client, service.clone(), shared.metrics.clone(), in_flight.clone(), shared.mesh.clone());
        let ports = config.intercept.then(|| {
            let client_config = ClientConfig { mesh: None, ..self.client.clone() };
            let (metrics, in_flight, mesh) = (shared.metrics.clone(), in_flight.clone(), shared.mesh.clone());
            let mut own_ports = vec![config.outbound.port(), config.inbound.port(), config.admin.port()];
            own_ports.extend(config.dns_listen().map(|dns| dns.port()));
            own_ports.extend(config.upstreams.iter().map(|u| u.listen.port()));
            // Its policy's opaque_ports are followed like any other service's config.
            let own_service = match shared.catalog.watch(&config.service) {
                Ok(state) => state,
                Err(_) => tokio::sync::watch::channel(crate::catalog::ServiceState::Pending).1,
            };
            crate::inbound::listener::AppPorts {
                make: Box::new(move |destination| {
                    let client = Client::new(destination.ip().to_string(), destination.port(), client_config.clone());
                    Inbound::new(client, service.clone(), metrics.clone(), in_flight.clone(), mesh.clone())
                }),
                app_port: app.port,
                own_ports,
                opaque_ports: config.opaque_ports.clone(),
                own_service,
                detect_timeout: config.detect_timeout,
                others: Default::default(),
            }
        });
        let limits = crate::inbound::listener::Limits {
            max_connections: config.max_inbound_connections as usize,
            handshake_timeout: config.handshake_timeout,
            connect_timeout: config.connect_timeout,
        };
        Some(tokio::spawn(crate::inbound::listener::serve(
            listener,
            inbound,
            shared.mesh.clone(),
            shared.metrics.clone(),
            limits,
            ports,
            shared.metrics.connections("inbound"),
            shared.workers.clone(),
            shared.shutdown.clone(),
            CLOSE,
        )))
    }
}

/// Serves DNS from the catalog, under ferry. and the --dns-domain aliases; with --intercept, as
/// the app's only resolver (mesh names as their virtual IPs, other names forwarded to
/// --dns-upstream or resolv.conf's nameservers).
pub fn serve_dns(udp: UdpSocket, tcp: TcpListener, config: &Config, shared: &Shared<'_>) -> JoinHandle<()> {
    let directory = Arc::new(CatalogDirectory::new(shared.catalog.clone(), config.discovery_timeout, config.intercept));
    let dns_config = ferry_dns::ServeConfig {
        cache: ferry_dns::DnsConfig { ttl: config.dns_ttl, negative_ttl: config.dns_ttl },
        aliases: config.dns_aliases(),
        rate_limit: ferry_dns::RateLimit::default(),
    };
    let intercept = config
        .intercept
        .then(|| ferry_dns::InterceptConfig { upstreams: config.dns_upstream.clone(), ..ferry_dns::InterceptConfig::default() });
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let served = match intercept {
            Some(intercept) => ferry_dns::serve_intercepting(udp, tcp, directory, dns_config, intercept, shutdown).await,
            None => ferry_dns::serve(udp, tcp, directory, dns_config, shutdown).await,
        };
        if let Err(error) = served {
            tracing::error!(%error, "DNS listener failed");
        }
    })
}

/// The work that keeps the sidecar in touch with the control plane.
pub struct ControlTasks {
    /// The config stream: it says goodbye at shutdown.
    pub control: JoinHandle<()>,
    /// The state dir's writer and restorer, and the certificate's renewal.
    pub others: Vec<JoinHandle<()>>,
}

/// Starts the state dir's writer and restorer (before the config stream, so that the writer
/// sees every push), the workload certificate's renewal and the config stream.
pub fn control_plane_tasks(
    config: &Config,
    access: ControlAccess,
    registration: &Registration,
    status: &Arc<ControlStatus>,
    state_dir: Option<&StateDir>,
    shared: &Shared<'_>,
) -> ControlTasks {
    let mut others = Vec::new();
    if let Some(dir) = state_dir {
        others.push(tokio::spawn(state::keep(
            dir.clone(),
            shared.catalog.clone(),
            shared.mesh.clone(),
            shared.metrics.clone(),
            shared.shutdown.clone(),
        )));
        others.push(tokio::spawn(state::restore_when_unreachable(
            dir.clone(),
            shared.catalog.clone(),
            status.clone(),
            shared.shutdown.clone(),
        )));
    }
    if let Some(issued) = shared.mesh.identity() {
        shared
            .metrics
            .identity_expiration
            .set(issued.not_after.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64());
    }
    others.push(tokio::spawn(identity::run(
        CertifyConfig {
            service: config.service.clone(),
            node_id: registration.node_id.clone(),
            control: access.clone(),
            connect_timeout: CONTROL_PLANE_CONNECT_TIMEOUT,
        },
        shared.mesh.clone(),
        shared.metrics.clone(),
        shared.shutdown.clone(),
    )));
    let control = tokio::spawn(control::run(
        ControlConfig {
            access,
            mtls: registration.instance.is_some() && config.mtls != MtlsMode::Off,
            node_id: registration.node_id.clone(),
            service: config.service.clone(),
            instance: registration.instance.clone(),
            health: registration.health.as_ref().map(|h| h.watch()),
            connect_timeout: CONTROL_PLANE_CONNECT_TIMEOUT,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            intercept: config.intercept,
            traffic_interval: config.traffic_report_interval,
        },
        shared.catalog.clone(),
        shared.mesh.clone(),
        status.clone(),
        shared.metrics.clone(),
        shared.shutdown.clone(),
    ));
    ControlTasks { control, others }
}
