//! Wires the registry, the CA, the tokens, the push engine and the APIs to their listeners, and
//! runs them until shutdown.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use ferry_proto::v1::{
    ca_server::CaServer, config_server::ConfigServer, discovery_server::DiscoveryServer, identity_server::IdentityServer,
    registry_server::RegistryServer, tokens_server::TokensServer,
};
use futures::StreamExt;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use ferry_health::RunnerOptions;

use crate::{
    addresses::AddressTable,
    api::{
        grpc::RegistryService,
        http::{self, HttpState},
        resources::ConfigService,
        security::{self, SecurityService},
    },
    auth::{Auth, AuthLayer, Tokens},
    ca::{API_CERT_LIFETIME, Authority, CaConfig, CaError},
    checks::HealthChecks,
    config::{AuthMode, Config, Switch},
    discovery::{DiscoveryService, SessionConfig, Sidecars},
    dns::RegistryDirectory,
    index::Indexes,
    listener::{self, Api, ApiCert, ApiStream},
    metrics::Metrics,
    registry::{Registry, RegistryConfig, Shared},
    resources::Resources,
    store::{self, Store, StoreKind},
};

/// A running control plane.
pub struct ControlPlane {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub authority: Arc<Authority>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    #[cfg(feature = "etcd")]
    replica: Option<Arc<crate::cluster::Replica>>,
}

/// The store `--store` names, and with etcd the connection the replica keeps.
#[cfg(feature = "etcd")]
type Opened = (Arc<dyn Store>, Option<crate::store::etcd::EtcdStore>);
#[cfg(not(feature = "etcd"))]
type Opened = (Arc<dyn Store>, Option<std::convert::Infallible>);

async fn open_store(config: &Config) -> anyhow::Result<Opened> {
    match &config.store {
        #[cfg(feature = "etcd")]
        StoreKind::Etcd(endpoints) => {
            let etcd = crate::store::etcd::EtcdStore::connect(endpoints, &config.etcd_prefix).await?;
            Ok((Arc::new(etcd.clone()), Some(etcd)))
        }
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd(_) => {
            Err(anyhow::Error::new(ferry_runtime::UsageError(format!("--store: {}", store::ETCD_FEATURE_MISSING))))
        }
        other => Ok((store::open(other, &config.data_dir)?, None)),
    }
}

/// This replica's id: `--replica-id`, or the host name and a random suffix.
fn replica_id(config: &Config) -> String {
    if let Some(id) = &config.replica_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    let suffix: u32 = rand::random();
    if host.is_empty() { format!("replica-{suffix:08x}") } else { format!("{host}-{suffix:08x}") }
}

impl ControlPlane {
    /// Opens the store, binds every listener and starts serving.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let (store, etcd) = open_store(config).await?;
        let shared = etcd.as_ref().map(|_| Shared::new(&replica_id(config)));
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut prometheus);
        let limits = &config.limits;
        let registry_config = RegistryConfig {
            reconnect_grace: config.reconnect_grace,
            max_instances_per_service: limits.max_instances_per_service as usize,
            max_metadata_bytes: limits.max_metadata_bytes as usize,
            max_checks: limits.max_checks as usize,
            max_push_bytes: limits.max_push_bytes as usize,
            virtual_ips: config.vip_cidr.clone(),
            vip_release_after: config.vip_release_after,
            ..Default::default()
        };
        let description = store.describe();
        let indexes = Arc::new(Indexes::default());
        let registry =
            Registry::open_with(store.clone(), registry_config, metrics.registry.clone(), indexes.clone(), shared.clone())
                .await
                .with_context(|| format!("loading the registry from {description}"))?;
        let addresses = AddressTable::attach(&registry, indexes.clone());
        let resources = Resources::open_with(store.clone(), indexes, Duration::from_secs(5), limits.resources(), shared.clone())
            .await
            .with_context(|| format!("loading routes and policies from {description}"))?;
        let ca_config = CaConfig {
            trust_domain: config.trust_domain.clone(),
            cert_ttl: config.cert_ttl,
            operator: config.ca_cert.clone().zip(config.ca_key.clone()),
            data_dir: config.data_dir.clone(),
            key_files: config.store == StoreKind::Redb,
            metrics: metrics.security.clone(),
        };
        let authority = Authority::open(ca_config, store.clone()).await.map_err(|error| match error {
            CaError::Config(why) => anyhow::Error::new(ferry_runtime::UsageError(why)),
            other => anyhow::Error::new(other).context("opening the certificate authority"),
        })?;
        let tokens = Tokens::open(store).await.with_context(|| format!("loading the API tokens from {description}"))?;
        match registry.set_aside().await {
            Ok(rows) if !rows.is_empty() => {
                metrics.rows_set_aside.set(i64::try_from(rows.len()).unwrap_or(i64::MAX));
                tracing::warn!(
                    rows = rows.len(),
                    "stored rows that could not be read are set aside, not loaded: `ferryctl status` lists them"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot list the stored rows set aside"),
        }
        match config.auth {
            AuthMode::Token => tokens.bootstrap(&config.data_dir, config.bootstrap_token.as_deref()).await?,
            AuthMode::None => tracing::warn!(
                "--auth none: every API call is allowed without a token; for development only (workload certificates and mTLS stay on)"
            ),
        }
        let auth = Auth {
            tokens: tokens.clone(),
            required: config.auth == AuthMode::Token,
            unauthenticated: metrics.security.unauthenticated.clone(),
        };

        let grpc_listener = listen(config.grpc).with_context(|| format!("binding --grpc {}", config.grpc))?;
        let http_listener = listen(config.http).with_context(|| format!("binding --http {}", config.http))?;
        let (dns_udp, dns_tcp) = ferry_dns::bind(config.dns).await.with_context(|| format!("binding --dns {}", config.dns))?;
        let dns_addr = dns_udp.local_addr()?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let consul_listener = match config.consul_http {
            Some(addr) => Some(listen(addr).with_context(|| format!("binding --consul-http {addr}"))?),
            None => None,
        };
        let consul_addr = consul_listener.as_ref().map(TcpListener::local_addr).transpose()?;

        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let (grpc_tls, http_tls) = match config.api_tls {
            Switch::On => {
                let names = api_names(config, &[grpc_addr, http_addr]);
                let (chain, key, not_after) = authority.api_certificate(&names)?;
                let cert = Arc::new(ApiCert::new(ApiCert::certified(&chain, &key)?));
                tasks.push(tokio::spawn(renew_api_certificate(
                    authority.clone(),
                    cert.clone(),
                    names,
                    not_after,
                    shutdown.clone(),
                )));
                let grpc = listener::tls_config(cert.clone(), &[ferry_tls::mesh::ALPN_H2])?;
                let http = listener::tls_config(cert, &[ferry_tls::mesh::ALPN_H2, ferry_tls::mesh::ALPN_HTTP1])?;
                (Some(grpc), Some(http))
            }
            Switch::Off => {
                tracing::warn!("--api-tls off: the API listeners speak plaintext; tokens cross the network in the clear");
                (None, None)
            }
        };
        let listener_limits = listener::Limits {
            max_connections: limits.max_connections as usize,
            handshake_timeout: limits.handshake_timeout,
            header_read_timeout: limits.handshake_timeout,
        };

        let sidecars = Arc::new(Sidecars::default());
        let traffic = Arc::new(crate::traffic::Traffic::default());
        let session_config = SessionConfig {
            max_delay: config.push_max_delay,
            max_subscriptions: limits.max_subscriptions as usize,
            max_nack_bytes: limits.max_nack_bytes as usize,
        };
        let discovery = DiscoveryService::new(
            registry.clone(),
            resources.clone(),
            sidecars.clone(),
            authority.clone(),
            tokens.clone(),
            addresses.clone(),
            session_config,
            metrics.push.clone(),
            shutdown.clone(),
        )
        .with_traffic(traffic.clone());
        let checks = HealthChecks::new(
            registry.clone(),
            RunnerOptions { stagger: true, scripts_allowed: config.enable_script_checks, ..RunnerOptions::default() },
            metrics.health.clone(),
            config.allow_check_targets.clone(),
        );
        checks.sync_all();
        #[cfg(feature = "etcd")]
        let replica = match (etcd, shared) {
            (Some(etcd), Some(shared)) => {
                sidecars.set_replica(&shared.replica);
                let replica_config = crate::cluster::ReplicaConfig {
                    id: shared.replica.to_string(),
                    ttl: config.replica_ttl,
                    grace: config.reconnect_grace,
                    grpc: grpc_addr,
                    http: http_addr,
                };
                let parts = crate::cluster::Parts {
                    registry: registry.clone(),
                    resources: resources.clone(),
                    tokens: tokens.clone(),
                    authority: authority.clone(),
                    checks: checks.clone(),
                    sidecars: sidecars.clone(),
                    addresses: addresses.clone(),
                };
                let replica = crate::cluster::Replica::start(etcd, replica_config, shared, parts, shutdown.clone())
                    .await
                    .with_context(|| format!("joining the replicas on {description}"))?;
                Some(replica)
            }
            _ => None,
        };
        #[cfg(not(feature = "etcd"))]
        let _ = (etcd, shared, &addresses);
        let registry_api = RegistryService::new(registry.clone(), checks.clone(), shutdown.clone());
        let security = SecurityService { authority: authority.clone(), tokens: tokens.clone(), sidecars: sidecars.clone() };

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<RegistryServer<RegistryService>>().await;
        health_reporter.set_serving::<DiscoveryServer<DiscoveryService>>().await;
        health_reporter.set_serving::<ConfigServer<ConfigService>>().await;
        if let Some(shared) = registry.shared() {
            // gRPC health says what /ready says: not serving while the store is out of reach.
            tasks.push(tokio::spawn(follow_store(shared.unavailable.subscribe(), health_reporter.clone(), shutdown.clone())));
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let grpc_incoming = listener::accept(Api::Grpc, grpc_listener, grpc_tls, listener_limits, shutdown.clone());
        let grpc = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .layer(AuthLayer::new(auth.clone()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(RegistryServer::new(registry_api))
            .add_service(DiscoveryServer::new(discovery))
            .add_service(ConfigServer::new(ConfigService::new(resources.clone(), sidecars.clone(), registry.clone())))
            .add_service(IdentityServer::new(security.clone()))
            .add_service(CaServer::new(security.clone()))
            .add_service(TokensServer::new(security.clone()))
            .serve_with_incoming_shutdown(
                ReceiverStream::new(grpc_incoming).map(Ok::<_, std::io::Error>),
                shutdown.clone().cancelled_owned(),
            );
        let http_state = HttpState {
            registry: registry.clone(),
            checks,
            sidecars: sidecars.clone(),
            metrics: Arc::new(prometheus),
            shutdown: shutdown.clone(),
            blocking: Arc::new(tokio::sync::Semaphore::new(http::MAX_BLOCKING_QUERIES)),
            resources: resources.clone(),
            authority: authority.clone(),
            traffic,
        };
        let consul = Arc::new(crate::api::consul::Consul::new(config.datacenter.clone(), http_addr));
        if let Some(listener) = consul_listener {
            // Plain HTTP, as Consul clients expect on their default address; the tokens still
            // apply. The docs say to keep it on loopback or a trusted network.
            crate::api::consul::warn_if_exposed(listener.local_addr()?);
            let router = http::consul_router(http_state.clone(), auth.clone(), consul.clone());
            let incoming = listener::accept(Api::Http, listener, None, listener_limits, shutdown.clone());
            let served = serve_http(incoming, router, listener_limits, shutdown.clone());
            tasks.push(tokio::spawn(async move {
                served.await;
                Ok(())
            }));
        }
        let http_router = http::router(http_state, security, auth, consul);
        let http_incoming = listener::accept(Api::Http, http_listener, http_tls, listener_limits, shutdown.clone());
        let http = serve_http(http_incoming, http_router, listener_limits, shutdown.clone());

        let dns_config = ferry_dns::ServeConfig {
            cache: ferry_dns::DnsConfig { ttl: config.dns_ttl, negative_ttl: config.dns_ttl },
            aliases: config.dns_domain.iter().flatten().cloned().collect(),
            rate_limit: ferry_dns::RateLimit::default(),
        };
        let dns =
            ferry_dns::serve(dns_udp, dns_tcp, Arc::new(RegistryDirectory::new(registry.clone())), dns_config, shutdown.clone());

        tasks.push(tokio::spawn(async move { grpc.await.context("gRPC server") }));
        tasks.push(tokio::spawn(async move {
            http.await;
            Ok(())
        }));
        tasks.push(tokio::spawn(async move { dns.await.context("DNS server") }));
        let (ca, sc, down) = (authority.clone(), sidecars, shutdown.clone());
        tasks.push(tokio::spawn(async move {
            security::supervise_rotation(ca, sc, down).await;
            Ok(())
        }));
        let scheme = if config.api_tls == Switch::On { "https" } else { "http" };
        tracing::info!(
            grpc = %grpc_addr,
            http = %http_addr,
            dns = %dns_addr,
            consul = %consul_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            store = %description,
            api = scheme,
            auth = ?config.auth,
            trust_domain = %config.trust_domain,
            ca = %config.data_dir.join("ca.pem").display(),
            "listening"
        );
        Ok(Self {
            grpc_addr,
            http_addr,
            dns_addr,
            registry,
            authority,
            shutdown,
            tasks,
            #[cfg(feature = "etcd")]
            replica,
        })
    }

    /// Stops accepting, ends every stream, waits for the servers and flushes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await??;
        }
        self.registry.flush().await?;
        #[cfg(feature = "etcd")]
        if let Some(replica) = self.replica {
            replica.leave().await;
        }
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

/// Sets the gRPC health of every service (and of the server, `""`) to follow the store's
/// availability.
async fn follow_store(
    mut unavailable: tokio::sync::watch::Receiver<Option<String>>,
    reporter: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let status = if unavailable.borrow_and_update().is_some() {
            tonic_health::ServingStatus::NotServing
        } else {
            tonic_health::ServingStatus::Serving
        };
        reporter.set_service_status("", status).await;
        reporter.set_service_status("ferry.v1.Registry", status).await;
        reporter.set_service_status("ferry.v1.Discovery", status).await;
        reporter.set_service_status("ferry.v1.Config", status).await;
        tokio::select! {
            changed = unavailable.changed() => if changed.is_err() { return Ok(()) },
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// The names the API certificate covers: every `--advertise-name`, the host name, localhost,
/// the loopback addresses and the addresses the listeners answer on. The local names stay, so
/// ferryctl on the control plane's own host works with the defaults whatever is advertised.
fn api_names(config: &Config, bound: &[SocketAddr]) -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |name: String| {
        if !names.contains(&name) {
            names.push(name);
        }
    };
    config.advertise_names.iter().cloned().for_each(&mut add);
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim().to_ascii_lowercase();
        if ferry_proto::validate::address("host", &host).is_ok() && !host.is_empty() {
            add(host);
        }
    }
    ["localhost", "127.0.0.1", "::1"].into_iter().map(str::to_owned).for_each(&mut add);
    let mut ips: Vec<IpAddr> = Vec::new();
    for addr in bound {
        if addr.ip().is_unspecified() {
            ips.extend(if_addrs::get_if_addrs().unwrap_or_default().into_iter().map(|i| i.ip()));
        } else {
            ips.push(addr.ip());
        }
    }
    ips.into_iter().map(|ip| ip.to_string()).for_each(add);
    names
}

/// Renews the API certificate at 70 % of its life, and whenever the CA's issuer changes (so a
/// client trusting only the new root after a rotation still verifies it).
async fn renew_api_certificate(
    authority: Arc<Authority>,
    cert: Arc<ApiCert>,
    names: Vec<String>,
    mut not_after: SystemTime,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut bundle = authority.watch();
    let mut issuer = bundle.borrow_and_update().issuer_pem.clone();
    loop {
        let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let renew_in = left.saturating_sub(API_CERT_LIFETIME.min(left + Duration::from_secs(1)) * 3 / 10);
        tokio::select! {
            () = tokio::time::sleep(renew_in) => {}
            changed = bundle.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = bundle.borrow_and_update().issuer_pem.clone();
                if now == issuer {
                    continue;
                }
                issuer = now;
            }
            () = shutdown.cancelled() => return Ok(()),
        }
        match authority.api_certificate(&names).and_then(|(chain, key, end)| {
            ApiCert::certified(&chain, &key).map(|k| (k, end)).map_err(|e| CaError::Config(e.to_string()))
        }) {
            Ok((key, end)) => {
                cert.set(key);
                not_after = end;
                tracing::info!("renewed the API certificate");
            }
            Err(error) => {
                tracing::warn!(%error, "cannot renew the API certificate; retrying in a minute");
                not_after = SystemTime::now() + Duration::from_secs(60) + API_CERT_LIFETIME * 3 / 10;
            }
        }
    }
}

/// Serves the HTTP API on the connections `incoming` yields until `shutdown`, then gives open
/// requests a few seconds.
async fn serve_http(
    mut incoming: mpsc::Receiver<ApiStream>,
    router: axum::Router,
    limits: listener::Limits,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Duration::from_secs(20)).max_concurrent_streams(256);
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            stream = incoming.recv() => {
                let Some(stream) = stream else { break };
                let service = TowerToHyperService::new(router.clone());
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "HTTP API connection ended with an error");
                    }
                });
            }
            () = shutdown.cancelled() => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
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
