//! What the sidecar registers for its app: the instance (address, port, metadata), its checks
//! started, and the node id it is known by.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Arc,
};

use anyhow::Context;
use ferry_proto::v1;
use ferry_tls::api::ControlPlaneUrl;

use crate::{config::Config, health::AppHealth, metrics::Metrics};

/// The app's registration, ready to be sent.
pub struct Registration {
    /// With an app only.
    pub instance: Option<v1::Instance>,
    /// The app's checks, running.
    pub health: Option<Arc<AppHealth>>,
    pub node_id: String,
}

impl Registration {
    /// The instance for the inbound listener at `inbound` (or, intercepting, at the app's
    /// port), validated, with its checks started.
    pub async fn prepare(config: &Config, inbound: Option<SocketAddr>, metrics: &Metrics) -> anyhow::Result<Self> {
        let mut instance = match inbound {
            Some(inbound) => {
                let host = match &config.advertise {
                    Some(host) => host.clone(),
                    None => advertise_host(inbound.ip(), config.control_plane.first()).await,
                };
                // Intercepting, the instance is where the app listens (as a Kubernetes endpoint is
                // the pod's IP and target port): callers' sidecars dial that address, and this
                // namespace's inbound rules hand the connection to the inbound listener.
                let port = match (&config.app, config.intercept) {
                    (Some(app), true) => app.port,
                    _ => inbound.port(),
                };
                let id = config.id.clone().unwrap_or_else(|| format!("{}-{}-{}", config.service, host, port));
                Some(v1::Instance {
                    id,
                    service: config.service.clone(),
                    address: host,
                    port: u32::from(port),
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
            .unwrap_or_else(|| format!("{}-{:08x}", config.service, ferry_runtime::rng::range(0..=u32::MAX)));
        Ok(Self { instance, health, node_id })
    }
}

/// The host to publish: the inbound listener's IP when it is a specific one, otherwise the local
/// address the system would use to reach the control plane (its first URL: replicas are
/// expected on one network).
async fn advertise_host(inbound_ip: IpAddr, control_plane: &ControlPlaneUrl) -> String {
    if !inbound_ip.is_unspecified() {
        return inbound_ip.to_string();
    }
    let detected = async {
        let target = *control_plane.resolve().await.ok()?.first()?;
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
