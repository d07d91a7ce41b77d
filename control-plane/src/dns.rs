//! The control plane's DNS answers (`--dns`), straight from the registry.

use std::sync::Arc;

use ferry_dns::{Directory, DnsEndpoint, Lookup, VirtualIpLookup};
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
                .map(|i| DnsEndpoint::from_metadata(i.id.clone(), i.address.clone(), i.port, &i.metadata))
                .collect()
        });
        futures::future::ready(Lookup::from(endpoints)).boxed()
    }

    fn virtual_ip(&self, service: &str) -> BoxFuture<'_, VirtualIpLookup> {
        let answer = match self.registry.snapshot(service) {
            Some(snapshot) => match snapshot.virtual_ip {
                Some(ip) => VirtualIpLookup::Assigned(ip),
                None if snapshot.exists() => VirtualIpLookup::Unassigned,
                None => VirtualIpLookup::NoSuchService,
            },
            None => VirtualIpLookup::NoSuchService,
        };
        futures::future::ready(answer).boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_proto::v1;

    use super::*;
    use crate::{
        metrics::Metrics,
        registry::{InstanceSpec, RegistryConfig},
        store::MemoryStore,
    };

    fn spec(service: &str, id: &str) -> InstanceSpec {
        let instance =
            v1::Instance { id: id.into(), service: service.into(), address: "10.0.0.2".into(), port: 80, ..Default::default() };
        InstanceSpec::try_from(instance).expect("valid")
    }

    #[tokio::test]
    async fn endpoints_carry_the_consul_tags_of_their_instance() {
        let registry = Registry::open(
            Arc::new(MemoryStore::default()),
            RegistryConfig::default(),
            Metrics::unregistered().registry,
            Default::default(),
        )
        .await
        .expect("opens");
        let mut instance = v1::Instance {
            id: "c1".into(),
            service: "catalog".into(),
            address: "10.0.0.2".into(),
            port: 80,
            ..Default::default()
        };
        instance.metadata.insert(ferry_dns::TAGS_LABEL.into(), r#"["primary"]"#.into());
        instance.metadata.insert("version".into(), "v2".into());
        registry.register(InstanceSpec::try_from(instance).expect("valid")).await.expect("registers");
        let Lookup::Endpoints(endpoints) = RegistryDirectory::new(registry).lookup("catalog").await else {
            panic!("catalog has endpoints");
        };
        assert_eq!(
            endpoints.iter().map(|e| (e.version.as_deref(), e.tags.clone())).collect::<Vec<_>>(),
            [(Some("v2"), vec!["primary".to_owned()])]
        );
    }

    #[tokio::test]
    async fn a_service_answers_its_virtual_ip_while_it_has_one() {
        // Two addresses for three services.
        let config = RegistryConfig {
            virtual_ips: "10.0.0.0/30".parse().expect("valid"),
            vip_release_after: Duration::from_secs(3600),
            ..Default::default()
        };
        let registry =
            Registry::open(Arc::new(MemoryStore::default()), config, Metrics::unregistered().registry, Default::default())
                .await
                .expect("opens");
        let directory = RegistryDirectory::new(registry.clone());
        for (service, id) in [("a", "a1"), ("b", "b1"), ("c", "c1")] {
            registry.register(spec(service, id)).await.expect("registers");
        }
        let mut answers = Vec::new();
        for service in ["a", "b", "c"] {
            answers.push(directory.virtual_ip(service).await);
        }
        assert_eq!(answers.iter().filter(|a| matches!(a, VirtualIpLookup::Assigned(_))).count(), 2, "{answers:?}");
        assert_eq!(answers.iter().filter(|a| **a == VirtualIpLookup::Unassigned).count(), 1, "{answers:?}");
        assert_eq!(directory.virtual_ip("nothing-here").await, VirtualIpLookup::NoSuchService);

        // Without instances, a service keeps its address until it is released.
        let held = answers.iter().position(|a| matches!(a, VirtualIpLookup::Assigned(_))).expect("one");
        let name = ["a", "b", "c"][held];
        registry.deregister(&format!("{name}1")).await.expect("deregisters");
        assert_eq!(directory.virtual_ip(name).await, answers[held]);
    }
}
