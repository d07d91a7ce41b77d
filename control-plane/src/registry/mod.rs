//! The registry: services, their instances, and who may change them.
//!
//! This is the core of the control plane. It knows nothing of gRPC or HTTP: the API modules
//! validate requests, call it, and translate its answers. Every change bumps a monotonic index,
//! replaces the service's [`ServiceSnapshot`] (watchers see a consistent view), and is written
//! behind to the [`Store`](crate::store::Store).
//!
//! Instances come in two kinds (see [`Origin`]): persistent ones registered through the API, and
//! ephemeral ones bound to a sidecar's stream through a lease. A stream that breaks without
//! goodbye makes its instance critical at once and removes it after `reconnect_grace`, unless
//! the sidecar comes back first.
//!
//! Each service that has had an instance gets a virtual IP (`vips`), carried in its snapshots.
//! An [`Observer`] (the address table) is told of every snapshot published.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ferry_health::{CheckStatus, Health};
use ferry_proto::{v1, validate::FieldError};
use prost::Message;
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use self::lease::Lease;
use crate::{
    index::Indexes,
    metrics::RegistryMetrics,
    store::{Event, Store, StoreError, StoreWriter, Table, Write},
};

mod admission;
mod instance;
mod lease;
mod snapshot;
mod vips;

pub use self::{
    instance::{Instance, InstanceSpec, Origin, system_time, timestamp},
    snapshot::{Change, ChangeLog, Delta, ServiceSnapshot},
    vips::{InvalidVipRange, VipRange},
};

/// Tuning of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// How long an instance whose sidecar stream broke is kept (critical) for a reconnect.
    pub reconnect_grace: Duration,
    /// How many recent changes per service are kept for delta pushes.
    pub change_log: usize,
    /// How long an API write waits to be durable before it reports the store's error.
    pub durable_timeout: Duration,
    /// Instances one service may have.
    pub max_instances_per_service: usize,
    /// Bytes of metadata keys and values one instance may carry.
    pub max_metadata_bytes: usize,
    /// Checks one instance may have.
    pub max_checks: usize,
    /// The encoded size a service's endpoints may reach in one push.
    pub max_push_bytes: usize,
    /// Where services' virtual IPs come from (`--vip-cidr`).
    pub virtual_ips: VipRange,
    /// How long a service keeps its virtual IP while it has no instance.
    pub vip_release_after: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            reconnect_grace: Duration::from_secs(30),
            change_log: 256,
            durable_timeout: Duration::from_secs(5),
            max_instances_per_service: 20_000,
            max_metadata_bytes: 16 << 10,
            max_checks: ferry_proto::validate::MAX_CHECKS,
            max_push_bytes: 64 << 20,
            virtual_ips: VipRange::default(),
            vip_release_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// Why the registry refused a change.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed or conflicts with what is registered; names the field.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("no instance with id {0:?}")]
    NotFound(String),
    /// The change is in memory but could not be made durable in time.
    #[error("not persisted: {0}")]
    Unavailable(#[from] StoreError),
}

/// Identifies one sidecar stream, so a stale stream cannot release a lease a newer one holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

/// A service and how many of its instances can take traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: Arc<str>,
    pub index: u64,
    pub instances: usize,
    pub routable: usize,
    pub virtual_ip: Option<IpAddr>,
}

/// Told of every snapshot the registry publishes, in order, under the registry's lock: it must
/// be quick and must not call the registry.
pub trait Observer: Send + Sync + 'static {
    /// `snapshot` replaced its service's previous one. `changed` names the one instance (by id)
    /// in which their instances differ, when the registry knows it; with `None` they may differ
    /// in any (or share them, when only the virtual IP changed).
    fn published(&self, snapshot: &ServiceSnapshot, changed: Option<&str>);
}

/// How a registry shares its store with other replicas.
#[derive(Debug, Clone)]
pub struct Shared {
    /// This replica's id, recorded on the sidecar instances whose streams it holds.
    pub replica: Arc<str>,
    /// The store revision applied last; an API write returns once its own is.
    pub applied: watch::Sender<u64>,
    /// Why the store is unavailable, when it is: writes are refused at once.
    pub unavailable: watch::Sender<Option<String>>,
}

impl Shared {
    /// A fresh state for replica `replica`.
    pub fn new(replica: &str) -> Self {
        Self { replica: replica.into(), applied: watch::Sender::new(0), unavailable: watch::Sender::new(None) }
    }

    /// Refuses a write at once while the store is unavailable.
    pub fn check_available(&self) -> Result<(), StoreError> {
        match &*self.unavailable.borrow() {
            Some(why) => Err(StoreError::new(format!("the store is unavailable, writes are refused until it returns: {why}"))),
            None => Ok(()),
        }
    }

    /// Waits until this replica has applied `revision`, so a write is seen by reads here.
    pub async fn caught_up(&self, revision: u64, limit: Duration) -> Result<(), StoreError> {
        let mut applied = self.applied.subscribe();
        match tokio::time::timeout(limit, applied.wait_for(|&done| done >= revision)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(StoreError::new(format!(
                "revision {revision} committed but not seen on this replica's watch within {limit:?}"
            ))),
        }
    }
}

/// The registry of services and instances.
pub struct Registry {
    indexes: Arc<Indexes>,
    /// For the guarded writes of virtual IPs with a shared store.
    store: Arc<dyn Store>,
    /// Set when replicas share the store: changes are written first and applied to memory as
    /// the store's watch reports them, so every replica applies them in one order.
    shared: Option<Shared>,
    state: Mutex<State>,
    writer: StoreWriter,
    config: RegistryConfig,
    metrics: RegistryMetrics,
    sessions: AtomicU64,
    this: Weak<Registry>,
    /// Told of every snapshot published.
    observer: OnceLock<Arc<dyn Observer>>,
    /// Wakes the task that allocates and releases virtual IPs.
    vip_work: Arc<Notify>,
    /// Whether this registry allocates and releases virtual IPs (with a shared store, only the
    /// elected replica does).
    vip_duty: watch::Sender<bool>,
}

struct State {
    services: HashMap<Arc<str>, ServiceEntry>,
    /// Instance id to its service.
    ids: HashMap<String, Arc<str>>,
    /// Leases of sidecar-owned instances, by instance id.
    leases: HashMap<String, Lease>,
    /// Check id to the id of the instance it belongs to.
    check_owners: HashMap<String, String>,
    /// What each instance's checks found last, by instance id. Kept beside the snapshots: a
    /// check's output changing is shown but never bumps an index or costs a push.
    check_statuses: HashMap<String, Vec<CheckStatus>>,
    /// With a shared store: this replica's writes not yet seen on the watch, by instance id
    /// (`None`: a removal), so that its next change builds on them.
    pending: HashMap<String, PendingWrite>,
    /// With a shared store: the instances whose sidecars hold a stream to this replica, as
    /// last written, to write again if another replica removed them while this one was cut
    /// off from the store.
    held: HashMap<String, Arc<Instance>>,
    next_epoch: u64,
    /// How many services the last sweep of placeholders kept.
    placeholders_created: u64,
    /// The services' virtual IPs.
    vips: vips::VipBook,
}

struct ServiceEntry {
    tx: watch::Sender<Arc<ServiceSnapshot>>,
}

struct PendingWrite {
    instance: Option<Arc<Instance>>,
    bytes: Option<Vec<u8>>,
}

/// One mutation of an instance, applied by [`Registry::commit`].
enum Mutation {
    Upsert(Box<Instance>),
    Remove,
}

impl Registry {
    /// Opens the registry over `store`, restoring what it holds.
    ///
    /// Restored sidecar instances keep their health and get a fresh grace period in which their
    /// sidecars can reconnect, so a control-plane restart does not flap them.
    pub async fn open(
        store: Arc<dyn Store>,
        config: RegistryConfig,
        metrics: RegistryMetrics,
        indexes: Arc<Indexes>,
    ) -> Result<Arc<Self>, StoreError> {
        Self::open_with(store, config, metrics, indexes, None).await
    }

    /// Opens the registry; with `shared`, as one replica of several on a shared store, which
    /// loads nothing itself: the replica feeds it the store's contents and changes through
    /// [`Registry::apply_event`].
    pub async fn open_with(
        store: Arc<dyn Store>,
        config: RegistryConfig,
        metrics: RegistryMetrics,
        indexes: Arc<Indexes>,
        shared: Option<Shared>,
    ) -> Result<Arc<Self>, StoreError> {
        let rows = if shared.is_some() { Vec::new() } else { store.load(Table::Instances).await? };
        let vip_rows = if shared.is_some() { Vec::new() } else { store.load(Table::VirtualIps).await? };
        let mut restored = Vec::with_capacity(rows.len());
        for (key, value) in rows {
            // A row that does not decode, or no longer validates, is set aside: the rest loads.
            let instance = v1::Instance::decode(value.as_slice())
                .map_err(|e| format!("does not decode as an instance: {e}"))
                .and_then(|stored| Instance::from_stored(stored).map_err(|e| format!("is not a valid instance: {e}")));
            match instance {
                Ok(instance) => restored.push(instance),
                Err(reason) => crate::store::set_aside::set_aside(&*store, Table::Instances, &key, &value, &reason).await?,
            }
        }
        indexes.advance_past(restored.iter().map(|i| i.index).max().unwrap_or(0));
        let duty = shared.is_none();
        let registry = Arc::new_cyclic(|this| Registry {
            indexes,
            store: store.clone(),
            shared,
            state: Mutex::new(State {
                services: HashMap::new(),
                ids: HashMap::new(),
                leases: HashMap::new(),
                check_owners: HashMap::new(),
                check_statuses: HashMap::new(),
                pending: HashMap::new(),
                held: HashMap::new(),
                next_epoch: 0,
                placeholders_created: 0,
                vips: vips::VipBook::default(),
            }),
            writer: StoreWriter::spawn(store),
            config,
            metrics,
            sessions: AtomicU64::new(0),
            this: this.clone(),
            observer: OnceLock::new(),
            vip_work: Arc::new(Notify::new()),
            vip_duty: watch::Sender::new(duty),
        });
        registry.restore(restored, vip_rows);
        tokio::spawn(vips::run(Arc::downgrade(&registry), registry.vip_work.clone(), registry.vip_duty.subscribe()));
        Ok(registry)
    }

    fn restore(&self, instances: Vec<Instance>, vip_rows: Vec<(String, Vec<u8>)>) {
        let mut by_service: BTreeMap<Arc<str>, BTreeMap<String, Arc<Instance>>> = BTreeMap::new();
        let mut state = self.lock();
        for instance in instances {
            state.ids.insert(instance.id.clone(), instance.service.clone());
            for check in &instance.checks {
                state.check_owners.insert(check.id.clone(), instance.id.clone());
            }
            self.metrics.instances(instance.health).inc();
            if instance.node_id().is_some() {
                let epoch = state.new_epoch();
                state.leases.insert(instance.id.clone(), Lease::Detached { epoch });
                self.expire_later(instance.id.clone(), epoch);
            }
            by_service.entry(instance.service.clone()).or_default().insert(instance.id.clone(), Arc::new(instance));
        }
        let existing: BTreeSet<Arc<str>> = by_service.keys().cloned().collect();
        self.restore_virtual_ips(&mut state, vip_rows, &existing);
        let with_address: Vec<Arc<str>> = state.vips.services().filter(|name| !existing.contains(*name)).cloned().collect();
        for name in with_address {
            by_service.insert(name, BTreeMap::new());
        }
        for (name, instances) in by_service {
            let index = self.indexes.next();
            let encoded_bytes = instances.values().map(|i| i.endpoint_bytes()).sum();
            let virtual_ip = state.vips.get(&name).map(|a| (a.ip, a.version));
            let snapshot = ServiceSnapshot {
                name: name.clone(),
                index: if instances.is_empty() { 0 } else { index },
                instances: Arc::new(instances),
                log: Arc::new(ChangeLog::starting_at(index)),
                changed_at: Instant::now(),
                encoded_bytes,
                virtual_ip: virtual_ip.map(|(ip, _)| ip),
                virtual_ip_version: virtual_ip.map_or(0, |(_, version)| version),
            };
            state.services.insert(name, ServiceEntry { tx: watch::Sender::new(Arc::new(snapshot)) });
        }
    }

    /// Tells `observer` of every snapshot published from now on, and at once of every current
    /// one. A registry has one observer: a second is ignored.
    pub fn observe(&self, observer: Arc<dyn Observer>) {
        let state = self.lock();
        if self.observer.set(observer.clone()).is_err() {
            tracing::warn!("the registry has an observer already");
            return;
        }
        for entry in state.services.values() {
            observer.published(&entry.tx.borrow(), None);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        ferry_runtime::lock(&self.state)
    }

    /// A new identity for a sidecar stream.
    pub fn new_session(&self) -> SessionId {
        SessionId(self.sessions.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Every service with at least one instance, by name.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let state = self.lock();
        let mut services: Vec<_> = state
            .services
            .values()
            .map(|entry| entry.tx.borrow().clone())
            .filter(|snapshot| snapshot.exists())
            .map(|snapshot| ServiceSummary {
                name: snapshot.name.clone(),
                index: snapshot.index,
                instances: snapshot.instances.len(),
                routable: snapshot.routable(),
                virtual_ip: snapshot.virtual_ip,
            })
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        services
    }

    /// The current snapshot of `service`, if it was ever seen.
    pub fn snapshot(&self, service: &str) -> Option<Arc<ServiceSnapshot>> {
        self.lock().services.get(service).map(|entry| entry.tx.borrow().clone())
    }

    /// A receiver of `service`'s snapshots, which sees every later change. Watching a service
    /// that has no instances yet is allowed: its snapshot has index 0 until one registers.
    pub fn watch(&self, service: &str) -> watch::Receiver<Arc<ServiceSnapshot>> {
        let mut state = self.lock();
        if let Some(entry) = state.services.get(service) {
            return entry.tx.subscribe();
        }
        state.sweep_placeholders();
        let name: Arc<str> = service.into();
        let floor = self.indexes.peek();
        let mut empty = ServiceSnapshot::empty(name.clone(), floor);
        if let Some(allocation) = state.vips.get(&name) {
            (empty.virtual_ip, empty.virtual_ip_version) = (Some(allocation.ip), allocation.version);
        }
        let tx = watch::Sender::new(Arc::new(empty));
        let rx = tx.subscribe();
        state.services.insert(name, ServiceEntry { tx });
        rx
    }

    /// The instance with `id`.
    pub fn instance(&self, id: &str) -> Option<Arc<Instance>> {
        self.lock().current(id)
    }

    /// Registers or replaces a persistent instance and waits until it is durable.
    pub async fn register(&self, spec: InstanceSpec) -> Result<Arc<Instance>, RegistryError> {
        if let Some(shared) = &self.shared {
            shared.check_available()?;
        }
        let id = spec.id.clone();
        let (instance, generation) = {
            let mut state = self.lock();
            self.admit(&state, &spec)?;
            let existing = state.current(&spec.id);
            match existing {
                Some(existing) if existing.node_id().is_some() => {
                    return Err(FieldError::new(
                        "id",
                        format!("{:?} belongs to the sidecar {:?}", spec.id, existing.node_id().unwrap_or_default()),
                    )
                    .into());
                }
                // Unchanged, but an earlier write of it may still be pending: wait for all of them.
                Some(existing) if existing.matches(&spec) => (existing, Some(self.writer.pending())),
                existing => {
                    // New checks start critical until they pass; unchanged ones keep their verdict.
                    let health = match existing {
                        Some(existing) if existing.checks == spec.checks => existing.health,
                        _ if spec.checks.is_empty() => Health::Passing,
                        _ => Health::Critical,
                    };
                    let instance = Instance::new(spec, Origin::Api, health);
                    let key = instance_key(&instance);
                    let (instance, generation) = self.commit(&mut state, Mutation::Upsert(Box::new(instance)), &key);
                    (instance.expect("an upsert yields the instance"), Some(generation))
                }
            }
        };
        if let Some(generation) = generation {
            self.durable(generation).await?;
        }
        Ok(if self.shared.is_some() { self.instance(&id).unwrap_or(instance) } else { instance })
    }

    /// Waits until the write of `generation` is durable and, with a shared store, applied here.
    async fn durable(&self, generation: u64) -> Result<(), RegistryError> {
        let revision = self.writer.durable(generation, self.config.durable_timeout).await?;
        if let Some(shared) = &self.shared {
            shared.caught_up(revision, self.config.durable_timeout).await?;
        }
        Ok(())
    }

    /// This replica's id, when replicas share the store.
    pub fn replica(&self) -> Option<&str> {
        self.shared.as_ref().map(|shared| &*shared.replica)
    }

    /// The stored rows set aside at start-up because they could not be read, oldest first.
    pub async fn set_aside(&self) -> Result<Vec<v1::SetAsideRow>, StoreError> {
        let rows = crate::store::set_aside::list(&*self.store).await?;
        Ok(rows
            .into_iter()
            .map(|row| v1::SetAsideRow {
                set_aside_at: (row.at_ms > 0).then(|| ferry_proto::time::timestamp(row.at())),
                bytes: row.len() as u64,
                table: row.table,
                key: row.key,
                reason: row.reason,
            })
            .collect())
    }

    /// The replication state, when replicas share the store.
    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    /// Applies one change the shared store reports (this replica's own writes included), in the
    /// store's order: the instance's index is the revision of its last change, its service's
    /// index the revision of the event.
    pub fn apply_event(&self, event: &Event) {
        let id = &event.key;
        let stored = match &event.value {
            None => None,
            Some(bytes) => match v1::Instance::decode(bytes.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|stored| Instance::from_stored(stored).map_err(|e| e.to_string()))
            {
                Ok(mut instance) => {
                    instance.index = event.version;
                    Some(Arc::new(instance))
                }
                Err(error) => {
                    tracing::warn!(id, %error, "ignoring an instance in the store that does not decode");
                    return;
                }
            },
        };
        let mut state = self.lock();
        let ours_pending = match state.pending.get(id) {
            Some(pending) if pending.bytes.as_deref() == event.value.as_deref() => {
                state.pending.remove(id);
                false
            }
            Some(_) => true,
            None => false,
        };
        let previous = state.ids.get(id).cloned();
        if let Some(previous) = &previous
            && stored.as_ref().is_none_or(|instance| instance.service != *previous)
        {
            self.publish(&mut state, previous, id, None, event.revision);
        }
        if let Some(instance) = &stored {
            let service = instance.service.clone();
            self.publish(&mut state, &service, id, stored.clone(), event.revision);
        }
        // A sidecar instance another replica now holds is not ours to expire. One removed while
        // its sidecar's stream is still here keeps its lease: see `reassert`.
        let mine = stored.as_ref().is_some_and(|instance| Some(instance.replica.as_str()) == self.replica());
        let streaming_here = matches!(state.leases.get(id), Some(Lease::Attached(_)));
        let keep = mine || ours_pending || (stored.is_none() && streaming_here);
        if !keep {
            state.leases.remove(id);
            state.held.remove(id);
        }
        if let Some(instance) = stored.as_ref().filter(|_| mine && streaming_here) {
            state.held.insert(id.clone(), instance.clone());
        }
        // One of ours with no stream here: this replica restarted under the same id. Its
        // sidecar gets the grace period to come back, as after a restart on a local store.
        let detached = mine && !ours_pending && !state.leases.contains_key(id);
        let epoch = detached.then(|| {
            let epoch = state.new_epoch();
            state.leases.insert(id.clone(), Lease::Detached { epoch });
            epoch
        });
        drop(state);
        if let Some(epoch) = epoch {
            self.expire_later(id.clone(), epoch);
        }
        self.indexes.advance_past(event.revision);
    }

    /// The id of every instance.
    pub fn all_ids(&self) -> Vec<String> {
        self.lock().ids.keys().cloned().collect()
    }

    /// Writes again the instances of the sidecars streaming to this replica that the store no
    /// longer shows here: another replica removed them as orphans while this one was cut off
    /// from the store longer than its lease. Returns how many.
    pub fn reassert(&self) -> usize {
        let Some(me) = self.replica().map(str::to_owned) else { return 0 };
        let mut state = self.lock();
        let lost: Vec<Arc<Instance>> = state
            .held
            .iter()
            .filter(|(id, _)| matches!(state.leases.get(*id), Some(Lease::Attached(_))))
            .filter(|(id, _)| state.current(id).is_none_or(|current| current.replica != me))
            .map(|(_, instance)| instance.clone())
            .collect();
        for instance in &lost {
            tracing::info!(id = %instance.id, service = %instance.service, "writing again an instance whose sidecar streams here");
            let key = instance_key(instance);
            self.commit(&mut state, Mutation::Upsert(Box::new((**instance).clone())), &key);
        }
        lost.len()
    }

    /// Applies what an instance's checks found, as the replica running them wrote it.
    pub fn apply_checks_event(&self, event: &Event) {
        let mut state = self.lock();
        let Some(value) = &event.value else {
            state.check_statuses.remove(&event.key);
            return;
        };
        let Ok(stored) = serde_json::from_slice::<Vec<StoredStatus>>(value) else {
            tracing::warn!(id = %event.key, "ignoring check statuses in the store that do not decode");
            return;
        };
        let Some(instance) = state.current(&event.key) else { return };
        let statuses = stored
            .into_iter()
            .filter_map(|s| {
                let kind = instance.checks.iter().find(|c| c.id == s.id)?.probe.kind();
                let (status, checked) = ferry_health::check_status_from_wire(s.status).ok()?;
                Some(CheckStatus {
                    id: s.id,
                    kind,
                    status,
                    output: s.output,
                    last_transition: std::time::UNIX_EPOCH + Duration::from_millis(s.last_transition_ms),
                    checked,
                })
            })
            .collect::<Vec<_>>();
        // What this replica saw itself is as new, with a fresher output.
        if state.check_statuses.get(&event.key).is_some_and(|held| same_verdicts(held, &statuses)) {
            return;
        }
        state.check_statuses.insert(event.key.clone(), statuses);
    }

    /// Every sidecar-bound instance with the replica whose stream holds it.
    pub fn sidecar_instances(&self) -> Vec<Arc<Instance>> {
        self.instances_where(|i| i.node_id().is_some())
    }

    /// Every instance that `keep` keeps.
    fn instances_where(&self, keep: impl Fn(&Instance) -> bool) -> Vec<Arc<Instance>> {
        let state = self.lock();
        state
            .services
            .values()
            .flat_map(|entry| entry.tx.borrow().instances.values().filter(|i| keep(i)).cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Removes the sidecar instance `id` if it is still exactly `seen` (its replica died and its
    /// sidecar did not come back to another one within the grace period).
    pub fn remove_orphan(&self, id: &str, seen: &Instance) {
        let mut state = self.lock();
        let Some(existing) = state.current(id) else { return };
        if existing.index != seen.index || existing.replica != seen.replica {
            return;
        }
        tracing::info!(id, service = %existing.service, replica = %existing.replica, "removing instance: its replica died and its sidecar did not reconnect");
        state.leases.remove(id);
        self.commit(&mut state, Mutation::Remove, &(existing.service.clone(), id.to_owned()));
    }

    /// Removes the instance `id`, whatever registered it, and waits until that is durable.
    pub async fn deregister(&self, id: &str) -> Result<Arc<Instance>, RegistryError> {
        if let Some(shared) = &self.shared {
            shared.check_available()?;
        }
        let (removed, generation) = {
            let mut state = self.lock();
            let Some(existing) = state.current(id) else {
                return Err(RegistryError::NotFound(id.to_owned()));
            };
            state.leases.remove(id);
            state.held.remove(id);
            let (_, generation) = self.commit(&mut state, Mutation::Remove, &(existing.service.clone(), id.to_owned()));
            (existing, generation)
        };
        self.durable(generation).await?;
        Ok(removed)
    }

    /// Sets the health of instance `id`, bumping its service's index only on a change.
    pub fn set_health(&self, id: &str, health: Health) -> Result<Arc<Instance>, RegistryError> {
        let mut state = self.lock();
        let Some(existing) = state.current(id) else {
            return Err(RegistryError::NotFound(id.to_owned()));
        };
        if existing.health == health {
            return Ok(existing);
        }
        let mut instance = (*existing).clone();
        instance.health = health;
        let key = instance_key(&instance);
        let (instance, _) = self.commit(&mut state, Mutation::Upsert(Box::new(instance)), &key);
        Ok(instance.expect("an upsert yields the instance"))
    }

    /// Records what the checks of instance `id` found. The statuses are kept as they are; the
    /// health, when it changed, is committed like any change. With `session`, only the sidecar
    /// stream holding the instance's lease may report. Returns whether the health changed.
    pub fn record_health(
        &self,
        id: &str,
        health: Health,
        statuses: Vec<CheckStatus>,
        session: Option<SessionId>,
    ) -> Result<bool, RegistryError> {
        let mut state = self.lock();
        if session.is_some_and(|session| state.leases.get(id) != Some(&Lease::Attached(session))) {
            return Ok(false);
        }
        let Some(existing) = state.current(id) else {
            return Err(RegistryError::NotFound(id.to_owned()));
        };
        if self.shared.is_some() && state.check_statuses.get(id).is_none_or(|old| !same_verdicts(old, &statuses)) {
            // Other replicas show them too; an output that changes alone is not worth a write.
            let value = encode_statuses(&statuses);
            self.writer.enqueue(Write { table: Table::Checks, key: id.to_owned(), value: Some(value) });
        }
        state.check_statuses.insert(id.to_owned(), statuses);
        if existing.health == health {
            return Ok(false);
        }
        let mut instance = (*existing).clone();
        instance.health = health;
        let key = instance_key(&instance);
        self.commit(&mut state, Mutation::Upsert(Box::new(instance)), &key);
        Ok(true)
    }

    /// The instance as the API shows it, with what its checks found last.
    pub fn describe(&self, instance: &Instance) -> v1::Instance {
        let mut described = instance.to_proto();
        // A TTL check is renewed, never probed: its interval, timeout and thresholds mean nothing.
        for check in &mut described.checks {
            if matches!(check.probe, Some(v1::check::Probe::Ttl(_))) {
                check.interval = None;
                check.timeout = None;
                check.success_threshold = 0;
                check.failure_threshold = 0;
            }
        }
        let state = self.lock();
        if let Some(statuses) = state.check_statuses.get(&instance.id) {
            for check in &mut described.checks {
                if let Some(status) = statuses.iter().find(|s| s.id == check.id) {
                    check.status = status.wire_status() as i32;
                    check.output = status.output.clone();
                    check.last_transition = Some(timestamp(status.last_transition));
                }
            }
        }
        described
    }

    /// Every instance registered through the API.
    pub fn persistent_instances(&self) -> Vec<Arc<Instance>> {
        self.instances_where(|i| i.node_id().is_none())
    }

    /// The instance a check belongs to.
    pub fn check_owner(&self, check_id: &str) -> Option<Arc<Instance>> {
        let state = self.lock();
        let id = state.check_owners.get(check_id)?;
        state.current(id)
    }

    /// Waits until every change so far is durable, for a clean shutdown.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.writer.flush(self.config.durable_timeout).await
    }

    /// Applies one mutation: new index, new snapshot for watchers, write-behind to the store.
    /// Returns the instance as stored (for upserts) and the store generation of the write.
    /// With a shared store the write goes first, and memory changes when the watch reports it.
    fn commit(&self, state: &mut State, mutation: Mutation, (service, id): &(Arc<str>, String)) -> (Option<Arc<Instance>>, u64) {
        if self.shared.is_some() {
            let stored = match mutation {
                Mutation::Upsert(instance) => {
                    let mut instance = *instance;
                    instance.index = 0;
                    Some(Arc::new(instance))
                }
                Mutation::Remove => None,
            };
            let bytes = stored.as_ref().map(|instance| instance.to_proto().encode_to_vec());
            if stored.is_none() && state.check_statuses.contains_key(id) {
                self.writer.enqueue(Write { table: Table::Checks, key: id.clone(), value: None });
            }
            let generation = self.writer.enqueue(Write { table: Table::Instances, key: id.clone(), value: bytes.clone() });
            state.pending.insert(id.clone(), PendingWrite { instance: stored.clone(), bytes });
            return (stored, generation);
        }
        let index = self.indexes.next();
        let stored = match mutation {
            Mutation::Upsert(instance) => {
                let mut instance = *instance;
                instance.index = index;
                Some(Arc::new(instance))
            }
            Mutation::Remove => None,
        };
        self.publish(state, service, id, stored.clone(), index);
        let value = stored.as_ref().map(|instance| instance.to_proto().encode_to_vec());
        let generation = self.writer.enqueue(Write { table: Table::Instances, key: id.clone(), value });
        (stored, generation)
    }

    /// Puts one change in memory: a new snapshot of `service` at `index` for its watchers.
    fn publish(&self, state: &mut State, service: &Arc<str>, id: &String, stored: Option<Arc<Instance>>, index: u64) {
        let entry = state
            .services
            .entry(service.clone())
            .or_insert_with(|| ServiceEntry { tx: watch::Sender::new(Arc::new(ServiceSnapshot::empty(service.clone(), index))) });
        let previous = entry.tx.borrow().clone();
        let index = index.max(previous.index);
        let mut encoded_bytes =
            previous.encoded_bytes.saturating_sub(previous.instances.get(id).map_or(0, |i| i.endpoint_bytes()));
        let old_checks: Vec<String> =
            previous.instances.get(id).map(|old| old.checks.iter().map(|c| c.id.clone()).collect()).unwrap_or_default();
        let mut instances = (*previous.instances).clone();
        let mut log = (*previous.log).clone();
        match &stored {
            Some(instance) => {
                encoded_bytes += instance.endpoint_bytes();
                if let Some(old) = instances.insert(id.clone(), instance.clone()) {
                    self.metrics.instances(old.health).dec();
                }
                self.metrics.instances(instance.health).inc();
            }
            None => {
                if let Some(old) = instances.remove(id) {
                    self.metrics.instances(old.health).dec();
                }
            }
        }
        log.record(Change { index, id: id.clone(), instance: stored.clone() }, self.config.change_log);
        let exists = !instances.is_empty();
        let (virtual_ip, virtual_ip_version) = match self.virtual_ip_for(state, service, exists, index) {
            Some((ip, version)) => (Some(ip), version),
            None => (None, previous.virtual_ip_version),
        };
        let snapshot = Arc::new(ServiceSnapshot {
            name: service.clone(),
            index,
            instances: Arc::new(instances),
            log: Arc::new(log),
            changed_at: Instant::now(),
            encoded_bytes,
            virtual_ip,
            virtual_ip_version,
        });
        if let Some(entry) = state.services.get(service) {
            entry.tx.send_replace(snapshot.clone());
        }
        if let Some(observer) = self.observer.get() {
            observer.published(&snapshot, Some(id));
        }
        for check in old_checks {
            if state.check_owners.get(&check) == Some(id) {
                state.check_owners.remove(&check);
            }
        }
        match &stored {
            Some(instance) => {
                state.ids.insert(id.clone(), service.clone());
                for check in &instance.checks {
                    state.check_owners.insert(check.id.clone(), id.clone());
                }
                let ids: Vec<&str> = instance.checks.iter().map(|c| c.id.as_str()).collect();
                if let Some(statuses) = state.check_statuses.get_mut(id) {
                    statuses.retain(|s| ids.contains(&s.id.as_str()));
                }
            }
            None => {
                state.ids.remove(id);
                state.check_statuses.remove(id);
            }
        }
        self.metrics.changes.inc();
    }
}

/// One check's last verdict as replicas share it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredStatus {
    id: String,
    /// A `ferry.v1.Health`: `HEALTH_NOT_CHECKED` for a check with no result yet.
    status: i32,
    output: String,
    last_transition_ms: u64,
}

fn encode_statuses(statuses: &[CheckStatus]) -> Vec<u8> {
    let stored: Vec<StoredStatus> = statuses
        .iter()
        .map(|s| StoredStatus {
            id: s.id.clone(),
            status: s.wire_status() as i32,
            output: s.output.clone(),
            last_transition_ms: u64::try_from(
                s.last_transition.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis(),
            )
            .unwrap_or(0),
        })
        .collect();
    serde_json::to_vec(&stored).unwrap_or_default()
}

/// Whether two reports say the same of each check (outputs aside).
fn same_verdicts(a: &[CheckStatus], b: &[CheckStatus]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.id == b.id && a.status == b.status && a.checked == b.checked && a.last_transition == b.last_transition
        })
}

fn instance_key(instance: &Instance) -> (Arc<str>, String) {
    (instance.service.clone(), instance.id.clone())
}

impl State {
    fn new_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    fn current(&self, id: &str) -> Option<Arc<Instance>> {
        if let Some(pending) = self.pending.get(id) {
            return pending.instance.clone();
        }
        let service = self.ids.get(id)?;
        self.services.get(service)?.tx.borrow().instances.get(id).cloned()
    }

    /// Forgets services that have no instances and no watchers once the map has doubled since
    /// the last sweep, so that subscriptions to names that never appear cannot grow it without
    /// bound, and each new name costs O(1) on average rather than a scan of every service.
    fn sweep_placeholders(&mut self) {
        if self.services.len() < (2 * self.placeholders_created as usize).max(256) {
            return;
        }
        self.services.retain(|_, entry| {
            let snapshot = entry.tx.borrow();
            entry.tx.receiver_count() > 0 || snapshot.exists() || snapshot.virtual_ip.is_some()
        });
        self.placeholders_created = self.services.len() as u64;
    }
}

#[cfg(test)]
mod tests;
