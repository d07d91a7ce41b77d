//! The registry side of the benchmark: the services and instances it registers through the gRPC
//! `Registry` API, and the one-endpoint changes it makes while sidecars watch.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use ferry_proto::v1::{self, registry_client::RegistryClient};
use ferry_tls::api::{Access, ApiChannel};
use futures::{StreamExt, TryStreamExt};
use tonic::service::interceptor::InterceptedService;

/// Connections the registrations are spread over.
const CONNECTIONS: usize = 4;
/// Registrations in flight at once.
const CONCURRENCY: usize = 64;

/// The name of service `s`.
pub fn service_name(s: usize) -> String {
    format!("svc-{s:04}")
}

/// Instance `i` of service `s`, persistent and without checks (so passing). Every instance has
/// its own loopback address, a version label and a zone, as a real one would: its endpoint in a
/// push is as large as a real endpoint.
pub fn instance(s: usize, i: usize, per_service: usize) -> v1::Instance {
    let n = s * per_service + i;
    v1::Instance {
        id: format!("{}-{i:05}", service_name(s)),
        service: service_name(s),
        address: format!("127.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff),
        port: 8080,
        metadata: HashMap::from([("version".to_owned(), ["v1", "v2"][i % 2].to_owned())]),
        region: "region-1".to_owned(),
        zone: format!("zone-{}", ["a", "b", "c"][i % 3]),
        ..Default::default()
    }
}

/// One registry change of the propagation phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Registers a new instance.
    Add,
    /// Re-registers that instance with another weight: one endpoint changed in place, as a
    /// health flip would change it.
    Update,
    /// Deregisters it.
    Remove,
}

/// Change `j`: changes come in threes on one service (add, update, remove of an extra
/// instance), so the registry keeps its size, and each three move to the next service.
pub fn change(j: usize, services: usize) -> (usize, ChangeKind) {
    let kind = [ChangeKind::Add, ChangeKind::Update, ChangeKind::Remove][j % 3];
    ((j / 3) % services, kind)
}

/// A client of the control plane's gRPC registry.
pub struct RegistryApi {
    clients: Vec<RegistryClient<ApiChannel>>,
}

impl RegistryApi {
    /// Opens a few connections to the control plane.
    pub async fn connect(access: &Access) -> anyhow::Result<Self> {
        let mut clients = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            let channel = access.endpoint()?.tcp_nodelay(true).connect().await.context("connecting")?;
            clients.push(RegistryClient::new(InterceptedService::new(channel, access.bearer()?)));
        }
        Ok(Self { clients })
    }

    fn client(&self, n: usize) -> RegistryClient<ApiChannel> {
        self.clients[n % self.clients.len()].clone()
    }

    /// Registers `services` × `per_service` instances, [`CONCURRENCY`] at a time.
    pub async fn register_all(&self, services: usize, per_service: usize) -> anyhow::Result<()> {
        futures::stream::iter(0..services * per_service)
            .map(|n| {
                let mut client = self.client(n);
                let instance = instance(n / per_service, n % per_service, per_service);
                async move {
                    let id = instance.id.clone();
                    let request = v1::RegisterRequest { instance: Some(instance) };
                    client.register(request).await.with_context(|| format!("registering {id}"))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_for_each(|_| async { Ok(()) })
            .await
    }

    /// Fails unless every service lists `per_service` instances, all passing.
    pub async fn verify_passing(&self, services: usize, per_service: usize) -> anyhow::Result<()> {
        let listed = self.client(0).list_services(v1::ListServicesRequest {}).await.context("listing services")?.into_inner();
        let listed: HashMap<String, v1::ServiceSummary> = listed.services.into_iter().map(|s| (s.name.clone(), s)).collect();
        for s in 0..services {
            let name = service_name(s);
            let summary = listed.get(&name).ok_or_else(|| anyhow!("service {name} is not listed"))?;
            if summary.instances as usize != per_service || summary.passing as usize != per_service {
                bail!(
                    "service {name} has {} instances, {} passing; expected {per_service}, all passing",
                    summary.instances,
                    summary.passing
                );
            }
        }
        Ok(())
    }

    /// Like [`Self::verify_passing`], but waits up to `limit` for it to hold: for a replica that
    /// applies another replica's registrations from the store.
    pub async fn wait_passing(&self, services: usize, per_service: usize, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            match self.verify_passing(services, per_service).await {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() >= deadline => return Err(error.context(format!("still after {limit:?}"))),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Makes change `kind` on service `s`: the service's version after it, and when the call
    /// that made it returned.
    pub async fn apply(&self, s: usize, kind: ChangeKind, per_service: usize) -> anyhow::Result<Made> {
        let mut client = self.client(0);
        // The extra instance, beyond the registered ones, with the address that its index gives.
        let mut extra = instance(s, per_service, per_service);
        extra.id = format!("{}-extra", service_name(s));
        match kind {
            ChangeKind::Add | ChangeKind::Update => {
                extra.weight = if kind == ChangeKind::Add { 100 } else { 50 };
                let answer = client.register(v1::RegisterRequest { instance: Some(extra) }).await.context("registering")?;
                let returned = Instant::now();
                let version = answer
                    .into_inner()
                    .instance
                    .map(|i| i.index)
                    .ok_or_else(|| anyhow!("the registration answered no instance"))?;
                Ok(Made { version, returned })
            }
            ChangeKind::Remove => {
                client.deregister(v1::DeregisterRequest { id: extra.id.clone(), force: false }).await.context("deregistering")?;
                let returned = Instant::now();
                // The deregistration answers no index: read the service's, which is at least it.
                let request = v1::ListInstancesRequest { service: service_name(s), ..Default::default() };
                let version = client.list_instances(request).await.context("reading the service's index")?.into_inner().index;
                Ok(Made { version, returned })
            }
        }
    }
}

/// A change made.
#[derive(Debug, Clone, Copy)]
pub struct Made {
    /// The service's version once it was made.
    pub version: u64,
    /// When the API call that made it returned.
    pub returned: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_valid_and_distinct() {
        let a = instance(3, 7, 100);
        let b = instance(7, 3, 100);
        assert_ne!(a.address, b.address);
        assert_ne!(a.id, b.id);
        assert!(ferry_proto::validate::instance(&a).is_ok());
    }

    #[test]
    fn changes_add_update_and_remove_an_instance_then_move_on() {
        let kinds: Vec<_> = (0..7).map(|j| change(j, 2)).collect();
        assert_eq!(
            kinds,
            [
                (0, ChangeKind::Add),
                (0, ChangeKind::Update),
                (0, ChangeKind::Remove),
                (1, ChangeKind::Add),
                (1, ChangeKind::Update),
                (1, ChangeKind::Remove),
                (0, ChangeKind::Add)
            ]
        );
    }
}
