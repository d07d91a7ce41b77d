//! The control plane's DNS answers (`--dns`), straight from the registry.

use std::sync::Arc;

use ferry_dns::{Directory, DnsEndpoint, Lookup};
use futures::{FutureExt, future::BoxFuture};

use crate::registry::Registry;

/// Answers DNS lookups from the registry.
pub struct RegistryDirectory {
    registry: Arc<Registry>,
}

impl RegistryDirectory {
    /// A directory over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl Directory for RegistryDirectory {
    fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup> {
        let endpoints = self.registry.snapshot(service).filter(|s| s.exists()).map(|snapshot| {
            snapshot
                .instances
                .values()
                .filter(|i| i.health.is_routable())
                .map(|i| DnsEndpoint {
                    id: i.id.clone(),
                    address: i.address.clone(),
                    port: i.port,
                    version: i.metadata.get("version").cloned(),
                })
                .collect()
        });
        futures::future::ready(Lookup::from(endpoints)).boxed()
    }
}
