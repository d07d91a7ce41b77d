//! Route, ServicePolicy and AuthorizationPolicy resources: validated, versioned, stored with
//! their last versions, and watched per service by the push engine.
//!
//! An apply is all or nothing: every resource is validated (and its `expected_version` checked)
//! before any is stored, so an invalid one refuses the request and nothing applied changes.
//! Versions come from the same counter as registry indexes, so a service's version (the largest
//! of its endpoints', route's and policy's) moves whenever any of them does.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use ferry_proto::{
    json,
    time::timestamp,
    v1,
    validate::{self, FieldError},
};
use prost::Message;
use tokio::sync::watch;

use crate::{
    index::Indexes,
    registry::Shared,
    store::{Event, Guard, Store, StoreError, StoreWriter, Table, Write},
};

/// How many versions of a resource are kept for `history` and `rollback`.
pub const HISTORY: usize = 10;

/// The kinds of resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Route,
    Policy,
    Authorization,
}

impl Kind {
    /// The kind of a resource.
    pub fn of(resource: &v1::Resource) -> Option<(Kind, &str)> {
        match &resource.kind {
            Some(v1::resource::Kind::Route(route)) => Some((Kind::Route, &route.service)),
            Some(v1::resource::Kind::Policy(policy)) => Some((Kind::Policy, &policy.service)),
            Some(v1::resource::Kind::Authorization(policy)) => Some((Kind::Authorization, &policy.service)),
            None => None,
        }
    }

    /// The kind named in a request.
    pub fn from_proto(kind: i32) -> Option<Kind> {
        match v1::ResourceKind::try_from(kind) {
            Ok(v1::ResourceKind::Route) => Some(Kind::Route),
            Ok(v1::ResourceKind::Policy) => Some(Kind::Policy),
            Ok(v1::ResourceKind::Authorization) => Some(Kind::Authorization),
            _ => None,
        }
    }

    /// The name used in messages: `route`, `policy` or `authorization`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Route => "route",
            Kind::Policy => "policy",
            Kind::Authorization => "authorization",
        }
    }

    /// The kind stored in `table`.
    pub fn of_table(table: Table) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.table() == table)
    }

    fn table(self) -> Table {
        match self {
            Kind::Route => Table::Routes,
            Kind::Policy => Table::Policies,
            Kind::Authorization => Table::Authorizations,
        }
    }

    /// Every kind, in the order lists show them.
    pub const ALL: [Kind; 3] = [Kind::Route, Kind::Policy, Kind::Authorization];
}

/// What a service's callers are sent besides its endpoints, and what its own sidecars enforce.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceConfig {
    /// The version of the last change to the route or policy (a delete included); 0 if none
    /// ever. The authorization policy is not counted: callers are not sent it.
    pub version: u64,
    pub route: Option<Arc<v1::Route>>,
    pub route_version: u64,
    pub policy: Option<Arc<v1::ServicePolicy>>,
    pub policy_version: u64,
    /// Who may call the service, enforced by its own sidecars.
    pub authorization: Option<Arc<v1::AuthorizationPolicy>>,
    pub authorization_version: u64,
}

impl ServiceConfig {
    /// The other services the route sends traffic to (backends and mirrors).
    pub fn dependencies(&self) -> Vec<String> {
        let Some(route) = &self.route else { return Vec::new() };
        let mut services = HashSet::new();
        for rule in &route.rules {
            let mirrors = rule.mirror.iter().filter_map(|m| m.backend.as_ref());
            for backend in rule.backends.iter().chain(mirrors) {
                if !backend.service.is_empty() && backend.service != route.service {
                    services.insert(backend.service.clone());
                }
            }
        }
        let mut services: Vec<String> = services.into_iter().collect();
        services.sort();
        services
    }
}

/// Why a change to the resources was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("no {} for service {service:?}", kind.name())]
    NotFound { kind: Kind, service: String },
    /// `expected_version` did not match.
    #[error("{field}: the {} of {service:?} is at version {actual}, not {expected}", kind.name())]
    Conflict { field: String, kind: Kind, service: String, expected: u64, actual: u64 },
    /// A delete would leave a route naming a subset nobody defines.
    #[error("{0}")]
    InUse(String),
    #[error("not persisted: {0}")]
    Unavailable(#[from] StoreError),
}

/// A resource and its past versions, newest first; an entry without a resource is a delete.
#[derive(Debug, Clone, Default)]
pub(crate) struct Record {
    history: VecDeque<v1::HistoryEntry>,
}

impl Record {
    fn current(&self) -> Option<&v1::Resource> {
        self.history.front().and_then(|entry| entry.resource.as_ref())
    }

    fn version(&self) -> u64 {
        self.history.front().map_or(0, |entry| entry.version)
    }

    fn encode(&self) -> Vec<u8> {
        v1::HistoryResponse { entries: self.history.iter().cloned().collect() }.encode_to_vec()
    }
}

struct State {
    records: HashMap<(Kind, Arc<str>), Record>,
    watchers: HashMap<Arc<str>, watch::Sender<Arc<ServiceConfig>>>,
    /// How many watchers the last sweep kept: the next sweeps once there are twice as many,
    /// so each new name costs O(1) on average, not a scan of every watcher.
    swept_at: usize,
}

/// The resources of the mesh.
pub struct Resources {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    /// Set when replicas share the store: a change is a guarded transaction, and memory changes
    /// when the watch reports it.
    shared: Option<Shared>,
    writer: StoreWriter,
    indexes: Arc<Indexes>,
    durable_timeout: Duration,
    limits: validate::Limits,
}

impl Resources {
    /// Opens the resources kept in `store`; applies validate them within `limits`.
    pub async fn open(
        store: Arc<dyn Store>,
        indexes: Arc<Indexes>,
        durable_timeout: Duration,
        limits: validate::Limits,
    ) -> Result<Arc<Self>, StoreError> {
        Self::open_with(store, indexes, durable_timeout, limits, None).await
    }

    /// Opens the resources; with `shared`, as one replica of several, which loads nothing
    /// itself: the replica feeds it through [`Resources::apply_event`].
    pub async fn open_with(
        store: Arc<dyn Store>,
        indexes: Arc<Indexes>,
        durable_timeout: Duration,
        limits: validate::Limits,
        shared: Option<Shared>,
    ) -> Result<Arc<Self>, StoreError> {
        let mut records = HashMap::new();
        for kind in Kind::ALL {
            if shared.is_some() {
                break;
            }
            for (key, value) in store.load(kind.table()).await? {
                // A row that does not decode is set aside: the other services' resources load.
                let stored = match v1::HistoryResponse::decode(value.as_slice()) {
                    Ok(stored) => stored,
                    Err(e) => {
                        let reason = format!("does not decode as the history of a {}: {e}", kind.name());
                        crate::store::set_aside::set_aside(&*store, kind.table(), &key, &value, &reason).await?;
                        continue;
                    }
                };
                let record = Record { history: stored.entries.into_iter().collect() };
                indexes.advance_past(record.version());
                records.insert((kind, Arc::from(key.as_str())), record);
            }
        }
        Ok(Arc::new(Self {
            state: Mutex::new(State { records, watchers: HashMap::new(), swept_at: 0 }),
            writer: StoreWriter::spawn(store.clone()),
            store,
            shared,
            indexes,
            durable_timeout,
            limits,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        ferry_runtime::lock(&self.state)
    }

    /// The config of `service` now and after every change.
    pub fn watch(&self, service: &str) -> watch::Receiver<Arc<ServiceConfig>> {
        let mut state = self.lock();
        if let Some(sender) = state.watchers.get(service) {
            return sender.subscribe();
        }
        // Forget watchers nobody holds any more, so names watched once cannot pile up: at most
        // twice as many as were held at the last sweep.
        if state.watchers.len() >= (2 * state.swept_at).max(64) {
            state.watchers.retain(|_, sender| sender.receiver_count() > 0);
            state.swept_at = state.watchers.len();
        }
        let config = Arc::new(service_config(&state, service));
        let sender = watch::Sender::new(config);
        let receiver = sender.subscribe();
        state.watchers.insert(service.into(), sender);
        receiver
    }

    /// The config of `service` now.
    pub fn config(&self, service: &str) -> Arc<ServiceConfig> {
        Arc::new(service_config(&self.lock(), service))
    }

    /// The resource of `kind` for `service`.
    pub fn get(&self, kind: Kind, service: &str) -> Option<v1::Resource> {
        self.lock().records.get(&(kind, Arc::from(service))).and_then(Record::current).cloned()
    }

    /// Every resource, of `kind` and for `service` when given, by kind then service.
    pub fn list(&self, kind: Option<Kind>, service: Option<&str>) -> Vec<v1::Resource> {
        let state = self.lock();
        let mut found: Vec<(&(Kind, Arc<str>), &v1::Resource)> = state
            .records
            .iter()
            .filter(|((k, s), _)| kind.is_none_or(|kind| kind == *k) && service.is_none_or(|service| **s == *service))
            .filter_map(|(key, record)| record.current().map(|r| (key, r)))
            .collect();
        let order = |kind: Kind| Kind::ALL.iter().position(|k| *k == kind);
        found.sort_by(|a, b| (order(a.0.0), &a.0.1).cmp(&(order(b.0.0), &b.0.1)));
        found.into_iter().map(|(_, r)| r.clone()).collect()
    }

    /// The kept versions of a resource, newest first.
    pub fn history(&self, kind: Kind, service: &str) -> Vec<v1::HistoryEntry> {
        self.lock().records.get(&(kind, Arc::from(service))).map(|r| r.history.iter().cloned().collect()).unwrap_or_default()
    }

    /// Validates every item, then (unless `dry_run`) stores the ones that change, all at one
    /// version. Returns each resource as stored, with the change as a diff.
    pub async fn apply(&self, items: Vec<v1::ApplyItem>, dry_run: bool) -> Result<Vec<v1::AppliedResource>, ResourceError> {
        if let Some(shared) = &self.shared
            && !dry_run
        {
            return self
                .shared_change(shared, |state| {
                    let (mut applied, touched) = plan(state, items.clone(), false, 0, &self.limits)?;
                    Ok((touched, move |version| {
                        for resource in &mut applied {
                            if resource.changed
                                && let Some(resource) = &mut resource.resource
                            {
                                set_version_only(resource, version);
                            }
                        }
                        applied
                    }))
                })
                .await;
        }
        let (applied, generation) = {
            let mut state = self.lock();
            let version = if dry_run { 0 } else { self.indexes.next() };
            let (applied, touched) = plan(&mut state, items, dry_run, version, &self.limits)?;
            let mut generation = None;
            if !touched.is_empty() {
                for key in &touched {
                    let record = state.records.get(key).map(Record::encode).unwrap_or_default();
                    generation =
                        Some(self.writer.enqueue(Write { table: key.0.table(), key: key.1.to_string(), value: Some(record) }));
                }
                for (_, service) in &touched {
                    notify(&state, service);
                }
            }
            (applied, generation)
        };
        if let Some(generation) = generation {
            self.writer.durable(generation, self.durable_timeout).await?;
        }
        Ok(applied)
    }

    /// Deletes the resource of `kind` for `service`; it stays in the history.
    pub async fn delete(&self, kind: Kind, service: &str, expected_version: Option<u64>) -> Result<v1::Resource, ResourceError> {
        if let Some(shared) = &self.shared {
            return self
                .shared_change(shared, |state| {
                    let removed = plan_delete(state, kind, service, expected_version, 0)?;
                    Ok((vec![(kind, Arc::from(service))], move |_| removed))
                })
                .await;
        }
        let (removed, generation) = {
            let mut state = self.lock();
            let version = self.indexes.next();
            let removed = plan_delete(&mut state, kind, service, expected_version, version)?;
            let key = (kind, Arc::<str>::from(service));
            let record = state.records.get(&key).map(Record::encode).unwrap_or_default();
            let generation = self.writer.enqueue(Write { table: kind.table(), key: service.to_owned(), value: Some(record) });
            notify(&state, service);
            (removed, generation)
        };
        self.writer.durable(generation, self.durable_timeout).await?;
        Ok(removed)
    }

    /// Makes one change on a shared store: `change` plans it on a copy of the records (its new
    /// versions 0), then the records it touched are written in one transaction guarded by the
    /// versions they were planned on. A guard that fails (another replica changed one of them)
    /// waits for that change to arrive here and plans again. `change` returns the keys touched
    /// and what to answer given the version the change got.
    async fn shared_change<T, F, A>(&self, shared: &Shared, change: F) -> Result<T, ResourceError>
    where
        F: Fn(&mut State) -> Result<(Vec<(Kind, Arc<str>)>, A), ResourceError>,
        A: FnOnce(u64) -> T,
    {
        for _ in 0..8 {
            shared.check_available()?;
            let (guards, writes, answer) = {
                let state = self.lock();
                let mut scratch = State { records: state.records.clone(), watchers: HashMap::new(), swept_at: 0 };
                drop(state);
                let planned_on: HashMap<(Kind, Arc<str>), u64> =
                    scratch.records.iter().map(|(key, record)| (key.clone(), record.version())).collect();
                let (touched, answer) = change(&mut scratch)?;
                let mut guards = Vec::new();
                let mut writes = Vec::new();
                for key in touched {
                    let version = planned_on.get(&key).copied().unwrap_or(0);
                    guards.push(Guard { table: key.0.table(), key: key.1.to_string(), version });
                    let value = scratch.records.get(&key).map(Record::encode);
                    writes.push(Write { table: key.0.table(), key: key.1.to_string(), value });
                }
                (guards, writes, answer)
            };
            if writes.is_empty() {
                return Ok(answer(0));
            }
            match self.store.transact(guards, writes).await? {
                Ok(revision) => {
                    shared.caught_up(revision, self.durable_timeout).await?;
                    return Ok(answer(revision));
                }
                Err(revision) => shared.caught_up(revision, self.durable_timeout).await?,
            }
        }
        Err(StoreError::new("the resources kept changing on other replicas; try again").into())
    }

    /// Applies one change the shared store reports: the head of the record's history takes the
    /// revision of the key's last change as its version.
    pub fn apply_event(&self, kind: Kind, event: &Event) {
        let service: Arc<str> = event.key.as_str().into();
        let mut state = self.lock();
        match &event.value {
            Some(bytes) => match v1::HistoryResponse::decode(bytes.as_slice()) {
                Ok(stored) => {
                    let mut record = Record { history: stored.entries.into_iter().collect() };
                    if let Some(head) = record.history.front_mut() {
                        head.version = event.version;
                        if let Some(resource) = &mut head.resource {
                            set_version_only(resource, event.version);
                        }
                    }
                    state.records.insert((kind, service.clone()), record);
                }
                Err(error) => {
                    tracing::warn!(kind = kind.name(), service = %service, %error, "ignoring a resource in the store that does not decode");
                    return;
                }
            },
            None => {
                state.records.remove(&(kind, service.clone()));
            }
        }
        notify(&state, &service);
        drop(state);
        self.indexes.advance_past(event.revision);
    }

    /// Waits until every change so far is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.writer.flush(self.durable_timeout).await
    }
}

/// Validates `items` and (unless `dry_run`) records the ones that change in `state` at
/// `version`. Returns each resource as it would be stored, and the keys changed.
#[allow(clippy::type_complexity)]
fn plan(
    state: &mut State,
    items: Vec<v1::ApplyItem>,
    dry_run: bool,
    version: u64,
    limits: &validate::Limits,
) -> Result<(Vec<v1::AppliedResource>, Vec<(Kind, Arc<str>)>), ResourceError> {
    let mut seen = HashSet::new();
    let mut plans = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("items[{i}]");
        let mut resource = item.resource.ok_or_else(|| FieldError::new(format!("{at}.resource"), "required"))?;
        validate::resource_within(&resource, limits).map_err(|e| e.within(&format!("{at}.resource")))?;
        let (kind, service) =
            Kind::of(&resource).map(|(k, s)| (k, Arc::<str>::from(s))).ok_or_else(|| FieldError::new(&at, "no resource"))?;
        if !seen.insert((kind, service.clone())) {
            return Err(FieldError::new(&at, format!("a second {} for service {service:?} in one apply", kind.name())).into());
        }
        let record = state.records.get(&(kind, service.clone()));
        let current = record.and_then(Record::current);
        let actual = if current.is_some() { record.map_or(0, Record::version) } else { 0 };
        // A resource that carries its version (as `ferryctl get` prints it) is applied
        // only over that version, so an edited copy cannot undo a newer change.
        let (expected, field) = match (item.expected_version, version_of(&resource)) {
            (Some(expected), _) => (Some(expected), format!("{at}.expected_version")),
            (None, 0) => (None, String::new()),
            (None, version) => (Some(version), format!("{at}.resource.version")),
        };
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(ResourceError::Conflict { field, kind, service: service.to_string(), expected, actual });
        }
        set_version(&mut resource, 0, None);
        let before = current.map(comparable).unwrap_or_default();
        let after = comparable(&resource);
        plans.push((kind, service, resource, before, after));
    }
    let batch: Vec<(usize, &v1::Resource)> = plans.iter().enumerate().map(|(i, p)| (i, &p.2)).collect();
    check_references(state, &batch, None)?;
    let now = SystemTime::now();
    let mut applied = Vec::with_capacity(plans.len());
    let mut touched = Vec::new();
    for (kind, service, mut resource, before, after) in plans {
        let changed = before != after;
        let diff = diff(&before, &after);
        if !changed {
            let current = state.records.get(&(kind, service.clone())).and_then(Record::current).cloned();
            applied.push(v1::AppliedResource { resource: current.or(Some(resource)), changed, diff });
            continue;
        }
        if !dry_run {
            set_version(&mut resource, version, Some(now));
            let record = state.records.entry((kind, service.clone())).or_default();
            record.history.push_front(v1::HistoryEntry { version, at: Some(timestamp(now)), resource: Some(resource.clone()) });
            record.history.truncate(HISTORY);
            touched.push((kind, service));
        }
        applied.push(v1::AppliedResource { resource: Some(resource), changed, diff });
    }
    Ok((applied, touched))
}

/// Records the delete of the resource of `kind` for `service` in `state` at `version`, and
/// returns the resource deleted.
fn plan_delete(
    state: &mut State,
    kind: Kind,
    service: &str,
    expected_version: Option<u64>,
    version: u64,
) -> Result<v1::Resource, ResourceError> {
    let key = (kind, Arc::<str>::from(service));
    let record = state.records.get(&key);
    let Some(current) = record.and_then(Record::current).cloned() else {
        return Err(ResourceError::NotFound { kind, service: service.to_owned() });
    };
    let actual = record.map_or(0, Record::version);
    if let Some(expected) = expected_version
        && expected != actual
    {
        let field = "expected_version".to_owned();
        return Err(ResourceError::Conflict { field, kind, service: service.to_owned(), expected, actual });
    }
    if kind == Kind::Policy {
        check_references(state, &[], Some(service)).map_err(|e| match e {
            ResourceError::Invalid(field) => {
                ResourceError::InUse(format!("the policy of {service:?} cannot be deleted: {}", field.reason))
            }
            other => other,
        })?;
    }
    let record = state.records.entry(key).or_default();
    record.history.push_front(v1::HistoryEntry { version, at: Some(timestamp(SystemTime::now())), resource: None });
    record.history.truncate(HISTORY);
    Ok(current)
}

/// Sets the version a resource carries, keeping when it was applied.
fn set_version_only(resource: &mut v1::Resource, version: u64) {
    match &mut resource.kind {
        Some(v1::resource::Kind::Route(route)) => route.version = version,
        Some(v1::resource::Kind::Policy(policy)) => policy.version = version,
        Some(v1::resource::Kind::Authorization(policy)) => policy.version = version,
        None => {}
    }
}

/// The version a resource carries; 0 when none.
fn version_of(resource: &v1::Resource) -> u64 {
    match &resource.kind {
        Some(v1::resource::Kind::Route(route)) => route.version,
        Some(v1::resource::Kind::Policy(policy)) => policy.version,
        Some(v1::resource::Kind::Authorization(policy)) => policy.version,
        None => 0,
    }
}

/// Checks that every subset a route names is defined by its service's policy, as they would be
/// with `batch` applied (items by their index in the request) and the policy of `deleted`
/// removed.
fn check_references(state: &State, batch: &[(usize, &v1::Resource)], deleted: Option<&str>) -> Result<(), ResourceError> {
    let in_batch = |kind: Kind, service: &str| {
        batch.iter().find(|(_, r)| Kind::of(r).is_some_and(|(k, s)| k == kind && s == service)).copied()
    };
    // A service's policy as it would be, and the batch item that sets it, if one does.
    let policy = |service: &str| -> (Option<usize>, Option<&v1::ServicePolicy>) {
        let (item, resource) = match in_batch(Kind::Policy, service) {
            Some((i, resource)) => (Some(i), Some(resource)),
            None if deleted == Some(service) => (None, None),
            None => (None, state.records.get(&(Kind::Policy, Arc::from(service))).and_then(Record::current)),
        };
        let policy = resource.and_then(|r| match &r.kind {
            Some(v1::resource::Kind::Policy(p)) => Some(p),
            _ => None,
        });
        (item, policy)
    };
    // The routes as they would be: the batch's, then the stored ones it does not replace.
    let mut routes: Vec<(Option<usize>, &v1::Route)> = Vec::new();
    for (i, resource) in batch {
        if let Some(v1::resource::Kind::Route(route)) = &resource.kind {
            routes.push((Some(*i), route));
        }
    }
    for ((kind, service), record) in &state.records {
        if *kind == Kind::Route
            && in_batch(Kind::Route, service).is_none()
            && let Some(v1::resource::Kind::Route(route)) = record.current().and_then(|r| r.kind.as_ref())
        {
            routes.push((None, route));
        }
    }
    for (route_item, route) in routes {
        for (r, rule) in route.rules.iter().enumerate() {
            let mirror = rule.mirror.iter().filter_map(|m| m.backend.as_ref().map(|b| (b, "mirror.backend".to_owned())));
            let backends = rule.backends.iter().enumerate().map(|(b, backend)| (backend, format!("backends[{b}]")));
            for (backend, at) in backends.chain(mirror) {
                if backend.subset.is_empty() {
                    continue;
                }
                let target = if backend.service.is_empty() { route.service.as_str() } else { backend.service.as_str() };
                let (policy_item, policy) = policy(target);
                if policy.is_some_and(|p| p.subsets.contains_key(&backend.subset)) {
                    continue;
                }
                // Only a change in this request can break a reference; the stored ones held.
                if route_item.is_none() && policy_item.is_none() && deleted != Some(target) {
                    continue;
                }
                let defined = policy.map(|p| p.subsets.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default();
                let has = if defined.is_empty() {
                    format!("{target} has no policy defining subsets")
                } else {
                    format!("{target}'s policy defines {defined}")
                };
                let error = match (route_item, policy_item) {
                    (Some(i), _) => FieldError::new(
                        format!("items[{i}].resource.rules[{r}].{at}.subset"),
                        format!(
                            "{:?} is not a subset of {target}: {has}; apply a ServicePolicy defining it with the route or first",
                            backend.subset
                        ),
                    ),
                    (None, Some(i)) => FieldError::new(
                        format!("items[{i}].resource.subsets"),
                        format!(
                            "subset {:?} is used by route/{} rules[{r}].{at}; change that route first",
                            backend.subset, route.service
                        ),
                    ),
                    (None, None) => FieldError::new(
                        "service",
                        format!(
                            "subset {:?} is used by route/{} rules[{r}].{at}; change that route first",
                            backend.subset, route.service
                        ),
                    ),
                };
                return Err(error.into());
            }
        }
    }
    Ok(())
}

/// The config of `service` in `state`.
fn service_config(state: &State, service: &str) -> ServiceConfig {
    let key = |kind| (kind, Arc::<str>::from(service));
    let route = state.records.get(&key(Kind::Route));
    let policy = state.records.get(&key(Kind::Policy));
    let authorization = state.records.get(&key(Kind::Authorization));
    let route_version = route.map_or(0, Record::version);
    let policy_version = policy.map_or(0, Record::version);
    ServiceConfig {
        authorization: authorization.and_then(Record::current).and_then(|r| match &r.kind {
            Some(v1::resource::Kind::Authorization(policy)) => Some(Arc::new(policy.clone())),
            _ => None,
        }),
        authorization_version: authorization.map_or(0, Record::version),
        version: route_version.max(policy_version),
        route: route.and_then(Record::current).and_then(|r| match &r.kind {
            Some(v1::resource::Kind::Route(route)) => Some(Arc::new(route.clone())),
            _ => None,
        }),
        route_version,
        policy: policy.and_then(Record::current).and_then(|r| match &r.kind {
            Some(v1::resource::Kind::Policy(policy)) => Some(Arc::new(policy.clone())),
            _ => None,
        }),
        policy_version,
    }
}

fn notify(state: &State, service: &str) {
    if let Some(sender) = state.watchers.get(service) {
        sender.send_replace(Arc::new(service_config(state, service)));
    }
}

fn set_version(resource: &mut v1::Resource, version: u64, at: Option<SystemTime>) {
    let applied_at = at.map(timestamp);
    match &mut resource.kind {
        Some(v1::resource::Kind::Route(route)) => {
            route.version = version;
            route.applied_at = applied_at;
        }
        Some(v1::resource::Kind::Policy(policy)) => {
            policy.version = version;
            policy.applied_at = applied_at;
        }
        Some(v1::resource::Kind::Authorization(policy)) => {
            policy.version = version;
            policy.applied_at = applied_at;
        }
        None => {}
    }
}

/// The resource as YAML without its version and time, for comparing and diffing.
fn comparable(resource: &v1::Resource) -> String {
    let mut resource = resource.clone();
    set_version(&mut resource, 0, None);
    json::resource_to_yaml(&resource)
}

/// The line changes from `before` to `after`: `-` removed, `+` added, ` ` kept.
fn diff(before: &str, after: &str) -> String {
    if before == after {
        return String::new();
    }
    let mut out = String::new();
    for change in similar::TextDiff::from_lines(before, after).iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => '-',
            similar::ChangeTag::Insert => '+',
            similar::ChangeTag::Equal => ' ',
        };
        out.push(sign);
        out.push_str(change.value());
        if !change.value().ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests;
