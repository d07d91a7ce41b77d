//! Every listener of a sidecar, bound before anything else starts, and the addresses they got.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};

use super::registration::Registration;
use crate::{
    config::{Config, Upstream},
    state::StateDir,
};

/// The bound listeners.
pub struct Listeners {
    pub outbound: TcpListener,
    pub admin: TcpListener,
    /// With an app only.
    pub inbound: Option<TcpListener>,
    pub upstreams: Vec<(Upstream, TcpListener)>,
    pub dns: Option<(UdpSocket, TcpListener)>,
}

/// The addresses the listeners got.
pub struct Addrs {
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub upstreams: Vec<(Arc<str>, SocketAddr)>,
    pub dns: Option<SocketAddr>,
}

async fn bind(flag: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding {flag} {addr}"))
}

impl Listeners {
    /// Binds every listener the config asks for, naming the flag of one that cannot be bound.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let outbound = bind("--outbound", config.outbound).await?;
        let admin = bind("--admin", config.admin).await?;
        let inbound = match &config.app {
            Some(_) => Some(bind("--inbound", config.inbound).await?),
            None => None,
        };
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for upstream in &config.upstreams {
            upstreams.push((upstream.clone(), bind("--upstream", upstream.listen).await?));
        }
        let dns = match config.dns_listen() {
            Some(addr) => Some(ferry_dns::bind(addr).await.with_context(|| format!("binding --dns {addr}"))?),
            None => None,
        };
        Ok(Self { outbound, admin, inbound, upstreams, dns })
    }

    /// The addresses bound.
    pub fn addrs(&self) -> std::io::Result<Addrs> {
        Ok(Addrs {
            outbound: self.outbound.local_addr()?,
            admin: self.admin.local_addr()?,
            inbound: self.inbound.as_ref().map(TcpListener::local_addr).transpose()?,
            upstreams: self
                .upstreams
                .iter()
                .map(|(u, l)| Ok((u.service.clone(), l.local_addr()?)))
                .collect::<std::io::Result<_>>()?,
            dns: self.dns.as_ref().map(|(udp, _)| udp.local_addr()).transpose()?,
        })
    }
}

impl Addrs {
    /// The one line that tells scripts and tests where everything listens.
    pub fn log(&self, config: &Config, registration: &Registration, state_dir: Option<&StateDir>) {
        let upstreams = self.upstreams.iter().map(|(name, addr)| format!("{name}@{addr}")).collect::<Vec<_>>().join(",");
        tracing::info!(
            outbound = %self.outbound,
            inbound = %self.inbound.map_or("none".to_owned(), |a| a.to_string()),
            admin = %self.admin,
            upstreams = %if upstreams.is_empty() { "none" } else { &upstreams },
            dns = %self.dns.map_or("none".to_owned(), |a| a.to_string()),
            node = %registration.node_id,
            instance = %registration.instance.as_ref().map_or("none", |i| i.id.as_str()),
            mtls = config.mtls.as_str(),
            state = %state_dir.map_or("none".to_owned(), |dir| dir.file().display().to_string()),
            "listening"
        );
    }
}
