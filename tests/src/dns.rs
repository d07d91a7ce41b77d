//! A DNS client for the tests: hickory-resolver pointed at one of Ferry's DNS listeners, with
//! no cache so every lookup reaches the server.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
};

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The addresses, in the order given.
    Addresses(Vec<IpAddr>),
    /// SRV records as (port, target).
    Services(Vec<(u16, String)>),
    /// The name does not exist.
    NxDomain,
    /// The name exists but has no record of that type.
    NoData,
    /// Anything else.
    Error(String),
}

/// A resolver asking only `server` (UDP, then TCP when truncated).
pub fn resolver(server: SocketAddr) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = server.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = server.port();
    let name_server = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
    let mut options = ResolverOpts::default();
    options.cache_size = 0;
    options.timeout = Duration::from_secs(2);
    Resolver::builder_with_config(ResolverConfig::from_name_servers(vec![name_server]), TokioRuntimeProvider::default())
        .with_options(options)
        .build()
        .expect("resolver config is valid")
}

/// Looks `name` up as `qtype` at `server`.
pub async fn lookup(server: SocketAddr, name: &str, qtype: RecordType) -> Answer {
    match resolver(server).lookup(name, qtype).await {
        Ok(lookup) => {
            let mut addresses = Vec::new();
            let mut services = Vec::new();
            for record in lookup.answers() {
                match &record.data {
                    RData::A(a) => addresses.push(IpAddr::V4(a.0)),
                    RData::AAAA(a) => addresses.push(IpAddr::V6(a.0)),
                    RData::SRV(srv) => services.push((srv.port, srv.target.to_string())),
                    _ => {}
                }
            }
            if services.is_empty() { Answer::Addresses(addresses) } else { Answer::Services(services) }
        }
        Err(error) if error.is_nx_domain() => Answer::NxDomain,
        Err(error) if error.is_no_records_found() => Answer::NoData,
        Err(error) => Answer::Error(error.to_string()),
    }
}

/// The A records of `name` at `server`, sorted.
pub async fn addresses(server: SocketAddr, name: &str) -> Answer {
    match lookup(server, name, RecordType::A).await {
        Answer::Addresses(mut addresses) => {
            addresses.sort();
            Answer::Addresses(addresses)
        }
        other => other,
    }
}
