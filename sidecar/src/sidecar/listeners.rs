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
    /// With --intercept: the IPv6 twins of the outbound and inbound listeners, where
    /// `ip6tables` rules redirect the app's IPv6 connections (`[::1]` and `[::]` on the same
    /// ports), when the host has IPv6.
    pub outbound_v6: Option<TcpListener>,
    pub inbound_v6: Option<TcpListener>,
    /// With --intercept and DNS on `127.0.0.1`: the same port on `[::1]`, where `ip6tables`
    /// redirects IPv6 queries.
    pub dns_v6: Option<(UdpSocket, TcpListener)>,
}

/// The IPv6 listener matching an IPv4 one on the same port: `[::1]` for `127.0.0.1`, `[::]`
/// (IPv6 only, beside the IPv4 one) for `0.0.0.0`; `None` for other addresses or a host without
/// IPv6.
fn ipv6_twin(flag: &str, addr: SocketAddr) -> Option<TcpListener> {
    use std::net::{IpAddr, Ipv6Addr};
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => Ipv6Addr::LOCALHOST,
        IpAddr::V4(v4) if v4.is_unspecified() => Ipv6Addr::UNSPECIFIED,
        _ => return None,
    };
    let twin = SocketAddr::new(ip.into(), addr.port());
    let bound = (|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&twin.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    })();
    match bound {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::info!(%flag, address = %twin, %error, "no IPv6 twin of the listener: IPv6 connections are not intercepted");
            None
        }
    }
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
        let (mut outbound_v6, mut inbound_v6, mut dns_v6) = (None, None, None);
        if config.intercept {
            if let Some((udp, _)) = &dns
                && let Ok(addr) = udp.local_addr()
                && addr.ip().is_loopback()
                && addr.is_ipv4()
            {
                let twin = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port());
                match ferry_dns::bind(twin).await {
                    Ok(bound) => dns_v6 = Some(bound),
                    Err(error) => {
                        tracing::info!(address = %twin, %error, "no IPv6 twin of the DNS listener: IPv6 queries are not answered")
                    }
                }
            }
            outbound_v6 = ipv6_twin("--outbound", outbound.local_addr()?);
            if let Some(inbound) = &inbound {
                inbound_v6 = ipv6_twin("--inbound", inbound.local_addr()?);
            }
        }
        Ok(Self { outbound, admin, inbound, upstreams, dns, outbound_v6, inbound_v6, dns_v6 })
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
