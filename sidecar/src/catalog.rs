//! The config a sidecar holds: one watchable state per service it talks to.
//!
//! Readers (the balancers) get a `watch::Receiver` per service and never lock anything on the
//! request path. The control-plane client applies each push here atomically: the whole push is
//! validated and every delta checked against the version held before anything is published, so
//! a rejected push leaves the last good config untouched. A config saved in `--state-dir` is
//! restored here too, only into services the control plane has not answered for.

use ferry_runtime::lock;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ferry_health::Health;
use ferry_proto::{
    v1::{self, service_resources::Endpoints},
    validate,
};
use tokio::sync::{Notify, watch};

use crate::addresses::{Addresses, Table};

/// What the sidecar knows of one service.
#[derive(Debug, Clone)]
pub enum ServiceState {
    /// Subscribed, waiting for the control plane's first answer.
    Pending,
    Known(Arc<ServiceConfig>),
}

/// One service's config at one version.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: Arc<str>,
    pub version: u64,
    /// Whether any instance of the service is registered.
    pub exists: bool,
    /// Every endpoint, routable or not, by id.
    pub endpoints: BTreeMap<String, Arc<Endpoint>>,
    /// How requests to the service are routed, if a route was applied.
    pub route: Option<Arc<v1::Route>>,
    /// The service's subsets, if a policy was applied.
    pub policy: Option<Arc<v1::ServicePolicy>>,
    /// The service's virtual IP, when it has one.
    pub virtual_ip: Option<std::net::IpAddr>,
}

/// An instance of a service, as the sidecar balances over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub address: String,
    pub port: u16,
    pub health: Health,
    pub metadata: BTreeMap<String, String>,
    pub region: String,
    pub zone: String,
    pub weight: u32,
    /// The identity its sidecar proves with mTLS; `None` for an endpoint reached in plaintext.
    pub identity: Option<Arc<str>>,
}

/// Too many services were asked for; a bound against unbounded on-demand subscriptions.
#[derive(Debug, thiserror::Error)]
#[error("the sidecar already tracks {0} services, its limit")]
pub struct TooManyServices(pub usize);

/// Every service the sidecar is subscribed to, with its current state.
pub struct Catalog {
    services: Mutex<HashMap<Arc<str>, watch::Sender<ServiceState>>>,
    subscriptions_changed: Notify,
    /// Counts the pushes applied, for whoever keeps a copy of the config.
    applied: watch::Sender<u64>,
    max_services: usize,
    /// The mesh's address table, for an intercepting sidecar.
    addresses: Addresses,
    /// Since when each service has had no watcher (see [`Catalog::sweep`]).
    unwatched: Mutex<HashMap<Arc<str>, Instant>>,
    /// Services dropped by a sweep whose pushes may still be in flight: ignored until watched
    /// again. Bounded by the services held at once, as each was one of them.
    evicted: Mutex<HashSet<Arc<str>>>,
    /// Right after the stream to the control plane is (re)established: see [`Catalog::settle`].
    settle: Mutex<Settle>,
}

/// The settling window after a (re)connection, and the configs pushed in it that were held back.
#[derive(Debug, Default)]
struct Settle {
    until: Option<Instant>,
    /// As pushed, by service: the configs whose endpoints are not in force yet (those in force
    /// are the ones held before). Deltas build on these, as the control plane sent them.
    pushed: HashMap<Arc<str>, Arc<ServiceConfig>>,
}

impl ServiceConfig {
    /// How many endpoints can take traffic.
    pub fn routable(&self) -> usize {
        self.endpoints.values().filter(|e| e.health.is_routable()).count()
    }

    /// The whole config as the control plane would push it from nothing: a snapshot of the
    /// endpoints, the route and the policy, at its version.
    pub fn to_resources(&self) -> v1::ServiceResources {
        v1::ServiceResources {
            service: self.name.to_string(),
            version: self.version,
            exists: self.exists,
            endpoints: self.exists.then(|| {
                Endpoints::Snapshot(v1::Endpoints {
                    endpoints: self.endpoints.values().map(|e| v1::Endpoint::from(&**e)).collect(),
                })
            }),
            route: Some(v1::RouteUpdate { route: self.route.as_deref().cloned() }),
            policy: Some(v1::PolicyUpdate { policy: self.policy.as_deref().cloned() }),
            virtual_ip: self.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        }
    }
}

impl From<&Endpoint> for v1::Endpoint {
    fn from(endpoint: &Endpoint) -> Self {
        Self {
            id: endpoint.id.clone(),
            address: endpoint.address.clone(),
            port: u32::from(endpoint.port),
            health: v1::Health::from(endpoint.health) as i32,
            metadata: endpoint.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            region: endpoint.region.clone(),
            zone: endpoint.zone.clone(),
            weight: endpoint.weight,
            identity: endpoint.identity.as_deref().unwrap_or_default().to_owned(),
        }
    }
}

impl TryFrom<&v1::Endpoint> for Endpoint {
    type Error = validate::FieldError;

    fn try_from(endpoint: &v1::Endpoint) -> Result<Self, Self::Error> {
        validate::endpoint(endpoint)?;
        Ok(Self {
            id: endpoint.id.clone(),
            address: endpoint.address.clone(),
            port: u16::try_from(endpoint.port).map_err(|_| validate::FieldError::new("port", "out of range"))?,
            health: Health::try_from(endpoint.health).map_err(|e| validate::FieldError::new("health", e.to_string()))?,
            metadata: endpoint.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            region: endpoint.region.clone(),
            zone: endpoint.zone.clone(),
            weight: if endpoint.weight == 0 { validate::DEFAULT_WEIGHT } else { endpoint.weight },
            identity: match endpoint.identity.as_str() {
                "" => None,
                identity => {
                    ferry_tls::Identity::parse(identity).map_err(|e| validate::FieldError::new("identity", e.to_string()))?;
                    Some(Arc::from(identity))
                }
            },
        })
    }
}

impl Catalog {
    /// An empty catalog that tracks at most `max_services` services.
    pub fn new(max_services: usize) -> Self {
        Self {
            services: Mutex::default(),
            subscriptions_changed: Notify::new(),
            applied: watch::Sender::new(0),
            max_services,
            addresses: Addresses::default(),
            unwatched: Mutex::default(),
            evicted: Mutex::default(),
            settle: Mutex::default(),
        }
    }

    /// Opens the settling window that follows a (re)connection to the control plane, until
    /// `until`. Its view lags then: when its partition heals, or another replica takes over, the
    /// instances of sidecars that lost their streams as well stay critical, or are missing, until
    /// each of those sidecars has reconnected (within its backoff). Meanwhile a push that would
    /// leave a service with no routable endpoint where the sidecar has some keeps those in force
    /// (the rest of the push applies); the pushed endpoints apply when a later push brings a
    /// routable one, or at [`Catalog::settled`]. So healing a partition fails no request, and a
    /// service really gone is dropped at most `until` late, as it would have been had the stream
    /// come back that much later.
    pub fn settle(&self, until: Instant) {
        lock(&self.settle).until = Some(until);
    }

    /// Ends the settling window opened for `until` (a later one stays open): every config held
    /// back applies as pushed. Returns the services it applied to.
    pub fn settled(&self, until: Instant) -> Vec<Arc<str>> {
        // Locked in the order apply locks them.
        let services = lock(&self.services);
        let mut settle = lock(&self.settle);
        if settle.until != Some(until) {
            return Vec::new();
        }
        settle.until = None;
        let pushed = std::mem::take(&mut settle.pushed);
        let mut applied = Vec::new();
        for (name, config) in pushed {
            let Some(sender) = services.get(&name) else { continue };
            let current = match &*sender.borrow() {
                ServiceState::Known(current) => current.version,
                ServiceState::Pending => continue,
            };
            // A later push replaced it, and went through settle itself.
            if current != config.version {
                continue;
            }
            tracing::info!(
                service = %name,
                routable = config.routable(),
                "the control plane still lists no routable endpoint after the reconnection settled: applying its view"
            );
            sender.send_replace(ServiceState::Known(config));
            applied.push(name);
        }
        drop(services);
        drop(settle);
        if !applied.is_empty() {
            self.applied.send_modify(|applied| *applied = applied.wrapping_add(1));
        }
        applied
    }

    /// Drops every service nobody has watched for `idle_after` (no router, listener, route
    /// backend or DNS question holds it), so that names asked for once, unknown ones among
    /// them, do not stay subscribed; returns them. The control-plane client unsubscribes them
    /// ([`Catalog::subscriptions_changed`] fires). A service asked for again is subscribed again.
    pub fn sweep(&self, idle_after: Duration, now: Instant) -> Vec<Arc<str>> {
        let mut services = lock(&self.services);
        let mut unwatched = lock(&self.unwatched);
        let mut dropped = Vec::new();
        services.retain(|name, sender| {
            if sender.receiver_count() > 0 {
                unwatched.remove(name);
                return true;
            }
            let since = *unwatched.entry(name.clone()).or_insert(now);
            if now.saturating_duration_since(since) < idle_after {
                return true;
            }
            unwatched.remove(name);
            dropped.push(name.clone());
            false
        });
        drop(unwatched);
        drop(services);
        if !dropped.is_empty() {
            lock(&self.evicted).extend(dropped.iter().cloned());
            self.subscriptions_changed.notify_one();
        }
        dropped
    }

    /// Makes room for one more service by dropping the one unwatched the longest, if any is.
    fn make_room(&self, services: &mut HashMap<Arc<str>, watch::Sender<ServiceState>>) -> bool {
        let mut unwatched = lock(&self.unwatched);
        let oldest = services
            .iter()
            .filter(|(_, sender)| sender.receiver_count() == 0)
            .min_by_key(|(name, _)| unwatched.get(*name).copied())
            .map(|(name, _)| name.clone());
        let Some(name) = oldest else { return false };
        services.remove(&name);
        unwatched.remove(&name);
        lock(&self.evicted).insert(name);
        true
    }

    /// The mesh's address table as held now (empty unless the sidecar intercepts).
    pub fn addresses(&self) -> Arc<Table> {
        self.addresses.current()
    }

    /// Restores a saved address table when the control plane has sent none yet; whether it did.
    pub fn restore_addresses(&self, table: &v1::AddressTable) -> Result<bool, validate::FieldError> {
        let _services = lock(&self.services);
        if self.addresses.version() != 0 || !table.full {
            return Ok(false);
        }
        let table = self.addresses.prepare(table)?;
        self.addresses.store(table);
        Ok(true)
    }

    /// The version of the address table held, for Hello; 0 for none.
    pub fn addresses_version(&self) -> u64 {
        self.addresses.version()
    }

    /// The state of `service`, subscribing to it if this is the first time it is asked for.
    pub fn watch(&self, service: &str) -> Result<watch::Receiver<ServiceState>, TooManyServices> {
        let mut services = lock(&self.services);
        if let Some(sender) = services.get(service) {
            return Ok(sender.subscribe());
        }
        if services.len() >= self.max_services && !self.make_room(&mut services) {
            return Err(TooManyServices(self.max_services));
        }
        lock(&self.evicted).remove(service);
        let sender = watch::Sender::new(ServiceState::Pending);
        let receiver = sender.subscribe();
        services.insert(service.into(), sender);
        drop(services);
        self.subscriptions_changed.notify_one();
        Ok(receiver)
    }

    /// Every service subscribed to.
    pub fn subscriptions(&self) -> Vec<Arc<str>> {
        lock(&self.services).keys().cloned().collect()
    }

    /// Resolves when a service was added since the last call.
    pub async fn subscriptions_changed(&self) {
        self.subscriptions_changed.notified().await;
    }

    /// The version of every service held, for Hello.
    pub fn versions(&self) -> HashMap<String, u64> {
        lock(&self.services)
            .iter()
            .filter_map(|(name, sender)| match &*sender.borrow() {
                ServiceState::Known(config) => Some((name.to_string(), config.version)),
                ServiceState::Pending => None,
            })
            .collect()
    }

    /// Every service and its state, by name.
    pub fn states(&self) -> BTreeMap<Arc<str>, ServiceState> {
        lock(&self.services).iter().map(|(name, sender)| (name.clone(), sender.borrow().clone())).collect()
    }

    /// Every service's config as the control plane pushed it: the same as [`Catalog::states`]
    /// but for those held back while settling. What is saved, so that the versions a restarted
    /// sidecar reports match the endpoints the control plane's deltas build on.
    pub fn pushed_states(&self) -> BTreeMap<Arc<str>, ServiceState> {
        let services = lock(&self.services);
        let settle = lock(&self.settle);
        services
            .iter()
            .map(|(name, sender)| match settle.pushed.get(name) {
                Some(pushed) => (name.clone(), ServiceState::Known(pushed.clone())),
                None => (name.clone(), sender.borrow().clone()),
            })
            .collect()
    }

    /// The state of `service`, if subscribed.
    pub fn state(&self, service: &str) -> Option<ServiceState> {
        lock(&self.services).get(service).map(|sender| sender.borrow().clone())
    }

    /// Changes every time a push is applied.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Applies `push` whole or not at all.
    pub fn apply(&self, push: &v1::Push) -> Result<(), Rejection> {
        if push.nonce.is_empty() {
            let services = push.resources.iter().map(|r| r.service.clone()).collect();
            return Err(Rejection { error: "nonce: must not be empty".into(), services });
        }
        let mut services = lock(&self.services);
        // What the control plane sends for a service dropped since (its unsubscription may
        // cross the push) is not kept: nobody asked for it any more.
        let evicted = lock(&self.evicted);
        let kept: Vec<v1::ServiceResources>;
        let resources = if evicted.is_empty() || !push.resources.iter().any(|r| evicted.contains(r.service.as_str())) {
            &push.resources
        } else {
            kept = push.resources.iter().filter(|r| !evicted.contains(r.service.as_str())).cloned().collect();
            &kept
        };
        drop(evicted);
        let mut settle = lock(&self.settle);
        let updates = validated(&services, &settle.pushed, resources, true)?;
        let table = match &push.addresses {
            Some(update) => Some(
                self.addresses
                    .prepare(update)
                    .map_err(|e| Rejection { error: e.within("addresses").to_string(), services: Vec::new() })?,
            ),
            None => None,
        };
        if let Some(table) = table {
            self.addresses.store(table);
        }
        let settling = settle.until.is_some_and(|until| Instant::now() < until);
        for config in updates {
            let name = config.name.clone();
            let in_force = services.get(&name).and_then(|sender| match &*sender.borrow() {
                ServiceState::Known(config) => Some(config.clone()),
                ServiceState::Pending => None,
            });
            let config = match in_force {
                Some(in_force) if settling && config.routable() == 0 && in_force.routable() > 0 => {
                    if !settle.pushed.contains_key(&name) {
                        tracing::info!(
                            service = %name,
                            kept = in_force.routable(),
                            "the control plane lists no routable endpoint right after reconnecting: keeping those held \
                             while its other sidecars reconnect"
                        );
                    }
                    let pushed = Arc::new(config);
                    settle.pushed.insert(name.clone(), pushed.clone());
                    ServiceConfig { endpoints: in_force.endpoints.clone(), exists: true, ..(*pushed).clone() }
                }
                _ => {
                    settle.pushed.remove(&name);
                    config
                }
            };
            let state = ServiceState::Known(Arc::new(config));
            match services.get(&name) {
                Some(sender) => {
                    sender.send_replace(state);
                }
                None => {
                    services.insert(name, watch::Sender::new(state));
                }
            }
        }
        drop(settle);
        drop(services);
        self.applied.send_modify(|applied| *applied = applied.wrapping_add(1));
        Ok(())
    }

    /// Restores a saved config, whole or not at all, into the services the control plane has
    /// sent nothing for yet (its answers always win). Each service must be a full snapshot.
    /// Returns the services restored; those new to the catalog are subscribed to.
    pub fn restore(&self, resources: &[v1::ServiceResources]) -> Result<Vec<Arc<str>>, Rejection> {
        let mut services = lock(&self.services);
        let updates = validated(&services, &HashMap::new(), resources, false)?;
        let new = updates.iter().filter(|config| !services.contains_key(&config.name)).count();
        if services.len() + new > self.max_services {
            return Err(Rejection {
                error: format!(
                    "{} services would be more than the {} the sidecar tracks",
                    services.len() + new,
                    self.max_services
                ),
                services: Vec::new(),
            });
        }
        let mut restored = Vec::with_capacity(updates.len());
        for config in updates {
            let name = config.name.clone();
            let state = ServiceState::Known(Arc::new(config));
            match services.get(&name) {
                Some(sender) => {
                    let pending = matches!(*sender.borrow(), ServiceState::Pending);
                    if !pending {
                        continue;
                    }
                    sender.send_replace(state);
                }
                None => {
                    services.insert(name.clone(), watch::Sender::new(state));
                }
            }
            restored.push(name);
        }
        drop(services);
        if new > 0 {
            self.subscriptions_changed.notify_one();
        }
        Ok(restored)
    }
}

/// The config of each of `resources`, checked whole: built on the config held when `on_held`,
/// from nothing otherwise.
fn validated(
    services: &HashMap<Arc<str>, watch::Sender<ServiceState>>,
    pushed: &HashMap<Arc<str>, Arc<ServiceConfig>>,
    resources: &[v1::ServiceResources],
    on_held: bool,
) -> Result<Vec<ServiceConfig>, Rejection> {
    let mut updates = Vec::with_capacity(resources.len());
    let mut seen = HashSet::with_capacity(resources.len());
    for (i, resources) in resources.iter().enumerate() {
        let reject = |error: validate::FieldError| Rejection {
            error: error.within(&format!("resources[{i}]")).to_string(),
            services: vec![resources.service.clone()],
        };
        validate::service_resources(resources).map_err(reject)?;
        if !seen.insert(resources.service.as_str()) {
            return Err(reject(validate::FieldError::new("service", "appears twice in one push")));
        }
        // What the control plane last sent: held back while settling, else what is in force.
        let held = match pushed.get(resources.service.as_str()) {
            Some(config) if on_held => Some(config.clone()),
            _ => services.get(resources.service.as_str()).filter(|_| on_held).and_then(|sender| match &*sender.borrow() {
                ServiceState::Known(config) => Some(config.clone()),
                ServiceState::Pending => None,
            }),
        };
        updates.push(next_config(resources, held.as_deref()).map_err(reject)?);
    }
    Ok(updates)
}

/// Why a push was not applied: the NACK's text and the services at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub error: String,
    pub services: Vec<String>,
}

/// The config after `resources`, given the config held.
fn next_config(resources: &v1::ServiceResources, held: Option<&ServiceConfig>) -> Result<ServiceConfig, validate::FieldError> {
    let convert = |field: &str, endpoints: &[v1::Endpoint]| -> Result<Vec<Endpoint>, validate::FieldError> {
        endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| Endpoint::try_from(e).map_err(|err| err.within(&format!("{field}[{i}]"))))
            .collect()
    };
    let endpoints = match &resources.endpoints {
        None => BTreeMap::new(),
        Some(Endpoints::Snapshot(set)) => {
            convert("snapshot.endpoints", &set.endpoints)?.into_iter().map(|e| (e.id.clone(), Arc::new(e))).collect()
        }
        Some(Endpoints::Delta(delta)) => {
            let held = held.filter(|h| h.version == delta.base_version).ok_or_else(|| {
                validate::FieldError::new(
                    "delta.base_version",
                    format!(
                        "{} does not match the version held, {}",
                        delta.base_version,
                        held.map_or("none".to_owned(), |h| h.version.to_string())
                    ),
                )
            })?;
            let mut endpoints = held.endpoints.clone();
            for id in &delta.removed {
                endpoints.remove(id);
            }
            for endpoint in convert("delta.upserted", &delta.upserted)? {
                endpoints.insert(endpoint.id.clone(), Arc::new(endpoint));
            }
            endpoints
        }
    };
    // Route and policy: replaced when the push carries them, kept as held otherwise.
    let route = match &resources.route {
        Some(update) => match &update.route {
            Some(route) => {
                validate::route(route).map_err(|e| e.within("route.route"))?;
                if route.service != resources.service {
                    return Err(validate::FieldError::new("route.route.service", "must be the service it is pushed for"));
                }
                Some(Arc::new(route.clone()))
            }
            None => None,
        },
        None => held.and_then(|h| h.route.clone()),
    };
    let policy = match &resources.policy {
        Some(update) => match &update.policy {
            Some(policy) => {
                validate::policy(policy).map_err(|e| e.within("policy.policy"))?;
                Some(Arc::new(policy.clone()))
            }
            None => None,
        },
        None => held.and_then(|h| h.policy.clone()),
    };
    Ok(ServiceConfig {
        name: resources.service.as_str().into(),
        version: resources.version,
        exists: resources.exists,
        endpoints,
        route,
        policy,
        // The current one in every push (checked by `validate::service_resources`).
        virtual_ip: resources.virtual_ip.parse().ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, port: u32) -> v1::Endpoint {
        v1::Endpoint {
            id: id.into(),
            address: "127.0.0.1".into(),
            port,
            health: v1::Health::Passing as i32,
            ..Default::default()
        }
    }

    fn snapshot(service: &str, version: u64, endpoints: Vec<v1::Endpoint>) -> v1::ServiceResources {
        v1::ServiceResources {
            service: service.into(),
            version,
            exists: !endpoints.is_empty(),
            endpoints: Some(Endpoints::Snapshot(v1::Endpoints { endpoints })),
            ..Default::default()
        }
    }

    fn push(resources: Vec<v1::ServiceResources>) -> v1::Push {
        v1::Push { nonce: "1".into(), resources, ..Default::default() }
    }

    fn known(catalog: &Catalog, service: &str) -> Arc<ServiceConfig> {
        match catalog.state(service) {
            Some(ServiceState::Known(config)) => config,
            other => panic!("expected {service} known, got {other:?}"),
        }
    }

    fn critical(mut endpoint: v1::Endpoint) -> v1::Endpoint {
        endpoint.health = v1::Health::Critical as i32;
        endpoint
    }

    #[test]
    fn right_after_a_reconnection_a_push_with_no_routable_endpoint_keeps_those_held() {
        let catalog = Catalog::new(16);
        catalog.apply(&push(vec![snapshot("catalog", 5, vec![endpoint("a", 8080), endpoint("b", 8081)])])).expect("applies");
        // Without a reconnection, the control plane's word is final.
        catalog.apply(&push(vec![snapshot("catalog", 6, vec![critical(endpoint("a", 8080))])])).expect("applies");
        assert_eq!(known(&catalog, "catalog").routable(), 0);
        catalog.apply(&push(vec![snapshot("catalog", 7, vec![endpoint("a", 8080), endpoint("b", 8081)])])).expect("applies");

        // Reconnected: the control plane lists both critical while their sidecars reconnect.
        let until = Instant::now() + Duration::from_secs(3600);
        catalog.settle(until);
        let lagging = vec![critical(endpoint("a", 8080)), critical(endpoint("b", 8081))];
        catalog.apply(&push(vec![snapshot("catalog", 8, lagging)])).expect("applies");
        let in_force = known(&catalog, "catalog");
        assert_eq!((in_force.version, in_force.routable()), (8, 2), "the endpoints held stay in force");
        let saved = catalog.pushed_states();
        let Some(ServiceState::Known(pushed)) = saved.get("catalog") else { panic!("saved: {saved:?}") };
        assert_eq!(pushed.routable(), 0, "what is saved is what was pushed");
        // A delta builds on what was pushed: a back, b still critical.
        let delta = v1::ServiceResources {
            service: "catalog".into(),
            version: 9,
            exists: true,
            endpoints: Some(Endpoints::Delta(v1::EndpointDelta {
                base_version: 8,
                upserted: vec![endpoint("a", 8080)],
                removed: Vec::new(),
            })),
            ..Default::default()
        };
        catalog.apply(&push(vec![delta])).expect("applies");
        let in_force = known(&catalog, "catalog");
        assert_eq!((in_force.version, in_force.routable()), (9, 1), "{in_force:?}");
        assert!(catalog.settled(until).is_empty(), "nothing held any more");
    }

    #[test]
    fn when_the_reconnection_settles_what_was_pushed_applies() {
        let catalog = Catalog::new(16);
        catalog.apply(&push(vec![snapshot("catalog", 5, vec![endpoint("a", 8080)])])).expect("applies");
        let until = Instant::now() + Duration::from_secs(3600);
        catalog.settle(until);
        catalog.apply(&push(vec![snapshot("catalog", 6, Vec::new())])).expect("applies");
        assert_eq!(known(&catalog, "catalog").routable(), 1);
        // A later reconnection's window is not ended by an earlier one's timer.
        let later = until + Duration::from_secs(1);
        catalog.settle(later);
        assert!(catalog.settled(until).is_empty());
        assert_eq!(catalog.settled(later), vec![Arc::<str>::from("catalog")]);
        let in_force = known(&catalog, "catalog");
        assert_eq!((in_force.version, in_force.routable(), in_force.exists), (6, 0, false));
        // Closed: the next push applies as it is.
        catalog.apply(&push(vec![snapshot("catalog", 7, vec![endpoint("a", 8080)])])).expect("applies");
        catalog.apply(&push(vec![snapshot("catalog", 8, Vec::new())])).expect("applies");
        assert_eq!(known(&catalog, "catalog").routable(), 0);
    }

    #[tokio::test]
    async fn a_first_request_subscribes_and_sees_the_push() {
        let catalog = Catalog::new(16);
        let rx = catalog.watch("catalog").expect("room");
        assert!(matches!(*rx.borrow(), ServiceState::Pending));
        assert_eq!(catalog.subscriptions().len(), 1);
        catalog.apply(&push(vec![snapshot("catalog", 5, vec![endpoint("a", 8080)])])).expect("applies");
        assert!(rx.has_changed().expect("open"));
        assert_eq!(known(&catalog, "catalog").routable(), 1);
        assert_eq!(catalog.versions(), HashMap::from([("catalog".to_owned(), 5)]));
    }

    #[test]
    fn deltas_apply_on_the_version_they_were_made_from() {
        let catalog = Catalog::new(16);
        catalog.apply(&push(vec![snapshot("catalog", 5, vec![endpoint("a", 8080), endpoint("b", 8081)])])).expect("applies");
        let delta = v1::ServiceResources {
            service: "catalog".into(),
            version: 7,
            exists: true,
            endpoints: Some(Endpoints::Delta(v1::EndpointDelta {
                base_version: 5,
                upserted: vec![endpoint("c", 8082)],
                removed: vec!["a".into()],
            })),
            ..Default::default()
        };
        catalog.apply(&push(vec![delta.clone()])).expect("applies");
        let config = known(&catalog, "catalog");
        assert_eq!(config.version, 7);
        assert_eq!(config.endpoints.keys().collect::<Vec<_>>(), ["b", "c"]);

        // The same delta again no longer matches the held version.
        let rejection = catalog.apply(&push(vec![delta])).expect_err("base mismatch");
        assert!(rejection.error.starts_with("resources[0].delta.base_version"), "{rejection:?}");
        assert_eq!(rejection.services, ["catalog"]);
        assert_eq!(known(&catalog, "catalog").version, 7, "kept the last good config");
    }

    #[test]
    fn a_bad_push_changes_nothing() {
        let catalog = Catalog::new(16);
        catalog.apply(&push(vec![snapshot("catalog", 5, vec![endpoint("a", 8080)])])).expect("applies");
        let bad = push(vec![snapshot("inventory", 3, vec![endpoint("i", 9000)]), snapshot("catalog", 6, vec![endpoint("b", 0)])]);
        let rejection = catalog.apply(&bad).expect_err("port 0");
        assert_eq!(rejection.error, "resources[1].snapshot.endpoints[0].port: must be between 1 and 65535, got 0");
        assert_eq!(rejection.services, ["catalog"], "only the resource at fault is named");
        assert_eq!(known(&catalog, "catalog").version, 5);
        assert!(catalog.state("inventory").is_none(), "no part of the push was applied");
    }

    #[test]
    fn a_config_turned_back_into_resources_restores_the_same() {
        let catalog = Catalog::new(16);
        let mut resources = snapshot("catalog", 5, vec![endpoint("a", 8080), endpoint("b", 8081)]);
        resources.endpoints = match resources.endpoints {
            Some(Endpoints::Snapshot(mut set)) => {
                set.endpoints[1].health = v1::Health::Warning as i32;
                set.endpoints[1].metadata.insert("version".into(), "v2".into());
                set.endpoints[1].zone = "eu-1a".into();
                Some(Endpoints::Snapshot(set))
            }
            other => other,
        };
        resources.policy = Some(v1::PolicyUpdate {
            policy: Some(v1::ServicePolicy {
                service: "catalog".into(),
                subsets: [("v2".to_owned(), v1::Subset { labels: [("version".to_owned(), "v2".to_owned())].into() })].into(),
                ..Default::default()
            }),
        });
        catalog.apply(&push(vec![resources, snapshot("ghost", 3, vec![])])).expect("applies");
        let saved: Vec<_> = catalog
            .states()
            .into_values()
            .filter_map(|s| match s {
                ServiceState::Known(config) => Some(config.to_resources()),
                ServiceState::Pending => None,
            })
            .collect();

        let restored = Catalog::new(16);
        let mut names = restored.restore(&saved).expect("restores");
        names.sort();
        assert_eq!(names, [Arc::from("catalog"), Arc::from("ghost")]);
        assert_eq!(known(&restored, "catalog"), known(&catalog, "catalog"));
        assert_eq!(known(&restored, "ghost"), known(&catalog, "ghost"));
        assert!(!known(&restored, "ghost").exists);
        assert_eq!(restored.versions(), catalog.versions());
    }

    #[test]
    fn a_restore_never_replaces_what_the_control_plane_sent() {
        let catalog = Catalog::new(16);
        let _pending = catalog.watch("pending").expect("room");
        catalog.apply(&push(vec![snapshot("catalog", 9, vec![endpoint("new", 8080)])])).expect("applies");
        let applied = catalog.applied();
        let saved = vec![
            snapshot("catalog", 5, vec![endpoint("old", 8080)]),
            snapshot("pending", 2, vec![endpoint("p", 8081)]),
            snapshot("other", 4, vec![endpoint("o", 8082)]),
        ];
        let mut restored = catalog.restore(&saved).expect("restores");
        restored.sort();
        assert_eq!(restored, [Arc::from("other"), Arc::from("pending")]);
        assert_eq!(known(&catalog, "catalog").version, 9, "the control plane's answer stays");
        assert_eq!(known(&catalog, "pending").version, 2);
        assert!(catalog.subscriptions().iter().any(|s| &**s == "other"), "restored services are subscribed to");
        assert!(!applied.has_changed().expect("open"), "a restore is no push");

        // Invalid saved config restores nothing.
        let fresh = Catalog::new(16);
        let bad = vec![snapshot("a", 1, vec![endpoint("a", 80)]), snapshot("b", 1, vec![endpoint("b", 0)])];
        let rejection = fresh.restore(&bad).expect_err("port 0");
        assert!(rejection.error.starts_with("resources[1].snapshot.endpoints[0].port"), "{rejection:?}");
        assert!(fresh.states().is_empty());
        let delta = v1::ServiceResources {
            service: "a".into(),
            version: 2,
            exists: true,
            endpoints: Some(Endpoints::Delta(v1::EndpointDelta { base_version: 1, ..Default::default() })),
            ..Default::default()
        };
        assert!(fresh.restore(&[delta]).is_err(), "a delta has nothing to apply to");
        let too_many: Vec<_> = (0..17).map(|i| snapshot(&format!("s{i}"), 1, vec![endpoint("e", 80)])).collect();
        assert!(fresh.restore(&too_many).is_err());
    }

    #[test]
    fn on_demand_subscriptions_are_bounded_and_make_room_by_dropping_an_unwatched_one() {
        let catalog = Catalog::new(2);
        let a = catalog.watch("a").expect("room");
        let b = catalog.watch("b").expect("room");
        catalog.watch("a").expect("already tracked");
        // Both still watched: nothing can go.
        assert!(catalog.watch("c").is_err());
        // `b` is no longer watched: it makes room for `c`.
        drop(b);
        let _c = catalog.watch("c").expect("room made");
        let mut held: Vec<String> = catalog.subscriptions().iter().map(|s| s.to_string()).collect();
        held.sort();
        assert_eq!(held, ["a", "c"]);
        drop(a);
    }

    #[test]
    fn a_sweep_drops_what_nobody_watched_for_a_while_and_ignores_its_late_pushes() {
        let catalog = Catalog::new(16);
        let kept = catalog.watch("kept").expect("room");
        drop(catalog.watch("ghost").expect("room"));
        let start = Instant::now();
        assert!(catalog.sweep(Duration::from_secs(30), start).is_empty(), "unwatched only since now");
        assert!(catalog.sweep(Duration::from_secs(30), start + Duration::from_secs(10)).is_empty());
        let dropped = catalog.sweep(Duration::from_secs(30), start + Duration::from_secs(31));
        assert_eq!(dropped, vec![Arc::<str>::from("ghost")]);
        assert_eq!(catalog.subscriptions(), vec![Arc::<str>::from("kept")]);
        // A push for it that crossed the unsubscription is not kept.
        catalog.apply(&push(vec![snapshot("ghost", 3, vec![endpoint("g", 80)])])).expect("applies");
        assert!(catalog.state("ghost").is_none());
        // Asked for again, it is tracked again.
        let _again = catalog.watch("ghost").expect("room");
        catalog.apply(&push(vec![snapshot("ghost", 4, vec![endpoint("g", 80)])])).expect("applies");
        assert!(matches!(catalog.state("ghost"), Some(ServiceState::Known(_))));
        drop(kept);
    }
}
