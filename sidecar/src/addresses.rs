//! The mesh's address table, held by an intercepting sidecar (`--intercept`): which service a
//! connection's original destination belongs to.
//!
//! The control plane pushes it whole in a stream's first push and as deltas after
//! ([`v1::AddressTable`]): every service's virtual IP and the `IP:PORT` of each of its endpoints.
//! A connection to a virtual IP (on any port) or to an endpoint's address is a connection to
//! that service; the sidecar then subscribes to the service's full config on demand. Readers
//! take the current table without locking ([`ArcSwap`]); an update builds a new one.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use ferry_proto::{v1, validate};

/// One service's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceAddresses {
    pub virtual_ip: Option<IpAddr>,
    pub endpoints: Vec<SocketAddr>,
}

/// The table at one version, with its reverse indexes.
#[derive(Debug, Default)]
pub struct Table {
    pub version: u64,
    pub services: HashMap<Arc<str>, ServiceAddresses>,
    by_virtual_ip: HashMap<IpAddr, Arc<str>>,
    by_endpoint: HashMap<SocketAddr, Arc<str>>,
}

/// What a destination address belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A service's virtual IP.
    VirtualIp(Arc<str>),
    /// The address of one of a service's endpoints.
    Endpoint(Arc<str>),
}

impl Destination {
    /// The service.
    pub fn service(&self) -> &Arc<str> {
        match self {
            Self::VirtualIp(service) | Self::Endpoint(service) => service,
        }
    }
}

impl Table {
    fn build(version: u64, services: HashMap<Arc<str>, ServiceAddresses>) -> Self {
        let mut by_virtual_ip = HashMap::with_capacity(services.len());
        let mut by_endpoint = HashMap::new();
        // Sorted, so that an address claimed by two services (a moment during a move) always
        // resolves to the same one.
        let mut names: Vec<&Arc<str>> = services.keys().collect();
        names.sort();
        for name in names {
            let entry = &services[name];
            if let Some(ip) = entry.virtual_ip {
                by_virtual_ip.entry(ip).or_insert_with(|| name.clone());
            }
            for endpoint in &entry.endpoints {
                by_endpoint.entry(*endpoint).or_insert_with(|| name.clone());
            }
        }
        Self { version, services, by_virtual_ip, by_endpoint }
    }

    /// The service `destination` belongs to: a virtual IP on any port, or an endpoint's address.
    pub fn resolve(&self, destination: SocketAddr) -> Option<Destination> {
        let ip = canonical(destination.ip());
        if let Some(service) = self.by_virtual_ip.get(&ip) {
            return Some(Destination::VirtualIp(service.clone()));
        }
        self.by_endpoint.get(&SocketAddr::new(ip, destination.port())).map(|s| Destination::Endpoint(s.clone()))
    }

    /// The virtual IP of `service`, if it has one.
    pub fn virtual_ip(&self, service: &str) -> Option<IpAddr> {
        self.services.get(service).and_then(|s| s.virtual_ip)
    }

    /// Whether `service` is in the table (it has, or recently had, instances).
    pub fn contains(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// The table as a full update, for the state directory.
    pub fn to_proto(&self) -> v1::AddressTable {
        let mut upserted: Vec<v1::ServiceAddresses> = self
            .services
            .iter()
            .map(|(name, entry)| v1::ServiceAddresses {
                service: name.to_string(),
                virtual_ip: entry.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                endpoints: entry.endpoints.iter().map(ToString::to_string).collect(),
            })
            .collect();
        upserted.sort_by(|a, b| a.service.cmp(&b.service));
        v1::AddressTable { version: self.version, full: true, base_version: 0, upserted, removed: Vec::new() }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps, so that a dual-stack socket's view
/// of a destination matches the table.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The table a sidecar holds, replaced whole by each update.
#[derive(Debug, Default)]
pub struct Addresses {
    current: ArcSwap<Table>,
}

impl Addresses {
    /// The table now.
    pub fn current(&self) -> Arc<Table> {
        self.current.load_full()
    }

    /// The version held; 0 before the first update.
    pub fn version(&self) -> u64 {
        self.current.load().version
    }

    /// The table after `update`, checked whole; nothing changes until [`Addresses::store`].
    pub fn prepare(&self, update: &v1::AddressTable) -> Result<Table, validate::FieldError> {
        validate::address_table(update)?;
        let held = self.current.load();
        let mut services = if update.full {
            HashMap::with_capacity(update.upserted.len())
        } else {
            if held.version != update.base_version {
                return Err(validate::FieldError::new(
                    "base_version",
                    format!("the delta builds on version {} but the sidecar holds {}", update.base_version, held.version),
                ));
            }
            held.services.clone()
        };
        for name in &update.removed {
            services.remove(name.as_str());
        }
        for entry in &update.upserted {
            // Checked by `validate::address_table`.
            let virtual_ip = entry.virtual_ip.parse().ok();
            let endpoints = entry.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
            services.insert(entry.service.as_str().into(), ServiceAddresses { virtual_ip, endpoints });
        }
        Ok(Table::build(update.version, services))
    }

    /// Makes `table` the current one.
    pub fn store(&self, table: Table) {
        self.current.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(service: &str, vip: &str, endpoints: &[&str]) -> v1::ServiceAddresses {
        v1::ServiceAddresses {
            service: service.into(),
            virtual_ip: vip.into(),
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    fn apply(addresses: &Addresses, update: v1::AddressTable) -> Result<(), validate::FieldError> {
        let table = addresses.prepare(&update)?;
        addresses.store(table);
        Ok(())
    }

    #[test]
    fn resolves_virtual_ips_on_any_port_and_endpoints_on_theirs() {
        let addresses = Addresses::default();
        apply(
            &addresses,
            v1::AddressTable {
                version: 5,
                full: true,
                upserted: vec![
                    entry("catalog", "240.240.0.1", &["10.0.0.2:8080", "10.0.0.3:8080"]),
                    entry("db", "", &["[fd00::5]:3306"]),
                ],
                ..Default::default()
            },
        )
        .expect("applies");
        let table = addresses.current();
        let resolve = |s: &str| table.resolve(s.parse().expect("addr"));
        assert_eq!(resolve("240.240.0.1:80"), Some(Destination::VirtualIp("catalog".into())));
        assert_eq!(resolve("240.240.0.1:50051"), Some(Destination::VirtualIp("catalog".into())));
        assert_eq!(resolve("10.0.0.3:8080"), Some(Destination::Endpoint("catalog".into())));
        assert_eq!(resolve("10.0.0.3:9090"), None, "another port of an endpoint's host is not the endpoint");
        assert_eq!(resolve("[fd00::5]:3306"), Some(Destination::Endpoint("db".into())));
        assert_eq!(resolve("[::ffff:10.0.0.2]:8080"), Some(Destination::Endpoint("catalog".into())));
        assert_eq!(resolve("192.0.2.1:443"), None);
        assert_eq!(table.virtual_ip("catalog"), Some("240.240.0.1".parse().expect("ip")));
        assert_eq!(table.virtual_ip("db"), None);
    }

    #[test]
    fn deltas_build_on_the_version_held_or_are_refused() {
        let addresses = Addresses::default();
        apply(
            &addresses,
            v1::AddressTable { version: 5, full: true, upserted: vec![entry("a", "240.240.0.1", &[])], ..Default::default() },
        )
        .expect("full");
        let delta = v1::AddressTable {
            version: 7,
            full: false,
            base_version: 5,
            upserted: vec![entry("b", "240.240.0.2", &["10.0.0.9:80"])],
            removed: vec!["a".into()],
        };
        apply(&addresses, delta.clone()).expect("delta");
        let table = addresses.current();
        assert!(!table.contains("a") && table.contains("b"));
        assert_eq!(table.resolve("240.240.0.1:80".parse().expect("addr")), None, "a's address went with it");
        let error = apply(&addresses, delta).expect_err("base 5 is no longer held");
        assert_eq!(error.field, "base_version");
        assert_eq!(addresses.version(), 7, "a refused update changes nothing");
        let error = apply(
            &addresses,
            v1::AddressTable { version: 9, full: true, upserted: vec![entry("c", "not-an-ip", &[])], ..Default::default() },
        )
        .expect_err("bad ip");
        assert_eq!(error.field, "upserted[0].virtual_ip");
        assert!(addresses.current().contains("b"));
    }

    #[test]
    fn round_trips_through_a_full_update() {
        let addresses = Addresses::default();
        let update = v1::AddressTable {
            version: 3,
            full: true,
            upserted: vec![entry("a", "240.240.0.1", &["10.0.0.1:80"]), entry("b", "", &[])],
            ..Default::default()
        };
        apply(&addresses, update.clone()).expect("applies");
        assert_eq!(addresses.current().to_proto(), update);
    }
}
