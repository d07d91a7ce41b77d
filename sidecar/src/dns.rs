//! The sidecar's DNS answers (`--dns`, and the app's own resolver with `--intercept`), from the
//! config it holds: lookups keep working while the control plane is down. A name the sidecar
//! does not track yet is subscribed to on demand; virtual IPs come from the mesh-wide address
//! table, which costs no subscription.

use std::{sync::Arc, time::Duration};

use ferry_dns::{Directory, DnsEndpoint, Lookup, VirtualIpLookup};
use futures::{FutureExt, future::BoxFuture};

use crate::{
    addresses::Table,
    catalog::{Catalog, ServiceState},
};

/// Answers DNS lookups from the catalog.
pub struct CatalogDirectory {
    catalog: Arc<Catalog>,
    /// How long a lookup of a service not tracked yet waits for its config.
    wait: Duration,
    /// Whether the sidecar intercepts, and so holds the address table and catches connections
    /// to virtual IPs.
    intercepting: bool,
}

impl CatalogDirectory {
    /// A directory over `catalog`; a new service's lookup waits up to `wait` (capped below the
    /// DNS server's own lookup timeout). `intercepting` says whether the sidecar runs with
    /// `--intercept` (and holds the address table).
    pub fn new(catalog: Arc<Catalog>, wait: Duration, intercepting: bool) -> Self {
        let wait = wait.min(ferry_dns::LOOKUP_TIMEOUT.saturating_sub(Duration::from_millis(200)));
        Self { catalog, wait, intercepting }
    }
}

impl Directory for CatalogDirectory {
    fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup> {
        let service = service.to_owned();
        async move {
            // Too many services tracked, or no config in time: unknown, not absent.
            let Ok(mut state) = self.catalog.watch(&service) else { return Lookup::Unknown };
            let known = tokio::time::timeout(self.wait, state.wait_for(|s| matches!(s, ServiceState::Known(_)))).await;
            let Ok(Ok(state)) = known else { return Lookup::Unknown };
            let ServiceState::Known(config) = &*state else { return Lookup::Unknown };
            if !config.exists {
                return Lookup::NoSuchService;
            }
            let endpoints = config
                .endpoints
                .values()
                .filter(|e| e.health.is_routable())
                .map(|e| DnsEndpoint::from_metadata(e.id.clone(), e.address.clone(), e.port, &e.metadata))
                .collect();
            Lookup::Endpoints(endpoints)
        }
        .boxed()
    }

    /// From the address table when intercepting: the DNS server asks this of every bare name the
    /// app looks up, so it only reads the table (no subscription, no wait). Otherwise, for
    /// `NAME.vip.ferry.`, from the service's config, subscribed to on demand as `lookup` does.
    fn virtual_ip(&self, service: &str) -> BoxFuture<'_, VirtualIpLookup> {
        if self.intercepting {
            return futures::future::ready(from_table(&self.catalog.addresses(), service)).boxed();
        }
        let service = service.to_owned();
        async move {
            let Ok(mut state) = self.catalog.watch(&service) else { return VirtualIpLookup::Unknown };
            let known = tokio::time::timeout(self.wait, state.wait_for(|s| matches!(s, ServiceState::Known(_)))).await;
            let Ok(Ok(state)) = known else { return VirtualIpLookup::Unknown };
            match &*state {
                ServiceState::Known(config) if !config.exists => VirtualIpLookup::NoSuchService,
                ServiceState::Known(config) => config.virtual_ip.map_or(VirtualIpLookup::Unassigned, VirtualIpLookup::Assigned),
                ServiceState::Pending => VirtualIpLookup::Unknown,
            }
        }
        .boxed()
    }
}

/// What `table` says of `service`'s virtual IP.
fn from_table(table: &Table, service: &str) -> VirtualIpLookup {
    if let Some(ip) = table.virtual_ip(service) {
        VirtualIpLookup::Assigned(ip)
    } else if table.contains(service) {
        VirtualIpLookup::Unassigned
    } else if table.version == 0 {
        // No table yet (the control plane not reached since start, none restored): the name may
        // well be a service. SERVFAIL for `NAME.vip.ferry.`, which resolvers do not cache as an
        // absence; a bare name is forwarded meanwhile rather than failed.
        VirtualIpLookup::Unknown
    } else {
        // The table lists every service with instances, mesh-wide.
        VirtualIpLookup::NoSuchService
    }
}

#[cfg(test)]
mod tests {
    use ferry_proto::v1;

    use super::*;

    fn catalog_with_table() -> Arc<Catalog> {
        let catalog = Arc::new(Catalog::new(16));
        let entry = |service: &str, vip: &str| v1::ServiceAddresses {
            service: service.into(),
            virtual_ip: vip.into(),
            endpoints: vec!["10.0.0.2:8080".into()],
        };
        let table = v1::AddressTable {
            version: 4,
            full: true,
            upserted: vec![entry("catalog", "240.240.0.1"), entry("fresh", "")],
            ..Default::default()
        };
        catalog.apply(&v1::Push { nonce: "1".into(), addresses: Some(table), ..Default::default() }).expect("applies");
        catalog
    }

    #[tokio::test]
    async fn intercepting_virtual_ips_come_from_the_address_table() {
        let catalog = catalog_with_table();
        let directory = CatalogDirectory::new(catalog.clone(), Duration::from_secs(1), true);
        assert_eq!(directory.virtual_ip("catalog").await, VirtualIpLookup::Assigned("240.240.0.1".parse().expect("ip")));
        assert_eq!(directory.virtual_ip("fresh").await, VirtualIpLookup::Unassigned);
        assert_eq!(directory.virtual_ip("example").await, VirtualIpLookup::NoSuchService);
        assert!(catalog.subscriptions().is_empty(), "asking about names subscribes to none");
    }

    #[tokio::test]
    async fn intercepting_before_any_table_the_directory_cannot_tell() {
        let catalog = Arc::new(Catalog::new(16));
        let directory = CatalogDirectory::new(catalog.clone(), Duration::from_secs(1), true);
        assert_eq!(directory.virtual_ip("catalog").await, VirtualIpLookup::Unknown);
        assert!(catalog.subscriptions().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn without_interception_the_virtual_ip_comes_with_the_service() {
        let catalog = catalog_with_table();
        let directory = CatalogDirectory::new(catalog.clone(), Duration::from_secs(1), false);
        // No config comes for the service (no control plane here): the directory cannot tell.
        assert_eq!(directory.virtual_ip("catalog").await, VirtualIpLookup::Unknown);

        // Once its config is held: the virtual IP the control plane sent with it, if any.
        let endpoint = v1::Endpoint {
            id: "c1".into(),
            address: "10.0.0.2".into(),
            port: 8080,
            health: v1::Health::Passing as i32,
            ..Default::default()
        };
        let resources = |service: &str, endpoints: Vec<v1::Endpoint>| v1::ServiceResources {
            service: service.into(),
            version: 1,
            exists: !endpoints.is_empty(),
            endpoints: Some(v1::service_resources::Endpoints::Snapshot(v1::Endpoints { endpoints })),
            virtual_ip: if service == "catalog" { "240.240.0.9".into() } else { String::new() },
            ..Default::default()
        };
        catalog.watch("gone").expect("subscribes");
        let push = v1::Push {
            nonce: "2".into(),
            resources: vec![resources("catalog", vec![endpoint]), resources("gone", Vec::new())],
            ..Default::default()
        };
        catalog.apply(&push).expect("applies");
        assert_eq!(directory.virtual_ip("catalog").await, VirtualIpLookup::Assigned("240.240.0.9".parse().expect("ip")));
        assert_eq!(directory.virtual_ip("gone").await, VirtualIpLookup::NoSuchService);
    }
}
