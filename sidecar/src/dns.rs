//! The sidecar's DNS answers (`--dns`), from the config it holds: lookups keep working while the
//! control plane is down. A name the sidecar does not track yet is subscribed to on demand.

use std::{sync::Arc, time::Duration};

use ferry_dns::{Directory, DnsEndpoint, Lookup};
use futures::{FutureExt, future::BoxFuture};

use crate::catalog::{Catalog, ServiceState};

/// Answers DNS lookups from the catalog.
pub struct CatalogDirectory {
    catalog: Arc<Catalog>,
    /// How long a lookup of a service not tracked yet waits for its config.
    wait: Duration,
}

impl CatalogDirectory {
    /// A directory over `catalog`; a new service's lookup waits up to `wait` (capped below the
    /// DNS server's own lookup timeout).
    pub fn new(catalog: Arc<Catalog>, wait: Duration) -> Self {
        Self { catalog, wait: wait.min(ferry_dns::LOOKUP_TIMEOUT.saturating_sub(Duration::from_millis(200))) }
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
                .map(|e| DnsEndpoint {
                    id: e.id.clone(),
                    address: e.address.clone(),
                    port: e.port,
                    version: e.metadata.get("version").cloned(),
                })
                .collect();
            Lookup::Endpoints(endpoints)
        }
        .boxed()
    }
}
