//! The mesh's address table: every service's virtual IP and the `IP:PORT` of each of its
//! instances, for the sidecars that intercept their app's connections (`Hello.intercept`) to tell
//! which service a connection's original destination belongs to.
//!
//! The registry tells the table of every snapshot it publishes ([`Observer`]). The table keeps
//! one entry per service that has instances or a virtual IP, each stamped with the version of its
//! last change, and a tombstone per service removed, so that what changed since a version a
//! sidecar holds is a range scan: a change to one service costs that service, never the mesh.
//! Tombstones are bounded ([`MAX_TOMBSTONES`]); a sidecar holding a version from before the
//! oldest one forgotten gets the whole table, as does one holding a version this table never
//! handed out.
//!
//! Following the registry is cheap, since it happens under the registry's lock for every
//! snapshot, health flips included, whether or not any sidecar intercepts. Each entry counts its
//! endpoints and keeps the instances it counted them from; a new snapshot is compared with those
//! through the one instance the registry says it changed, so a change costs that instance, and a
//! change of health or metadata changes no endpoint and no version.
//!
//! The whole table goes out in one push. Past [`WARN_FULL_TABLE_BYTES`] encoded it nears what a
//! sidecar decodes (64 MiB), and the table says so, once per version.
//!
//! Versions. On one process they come from the control plane's [`Indexes`], which start from the
//! clock: no version handed out after a restart equals one a sidecar still holds from before it,
//! so such a sidecar gets the whole table, never a delta built on another table. Replicas
//! sharing a store stamp each change with the store revision that made it, so a version means the
//! same table on every replica and a sidecar that moves to another replica still gets deltas. One
//! revision may change several services, so a replica hands out a version only once every change
//! of its revision is applied ([`AddressTable::seal`]).

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
};

use ferry_proto::v1;
use prost::Message;
use tokio::sync::watch;

use crate::{
    index::Indexes,
    registry::{Instance, Observer, Registry, ServiceSnapshot},
};

/// Removed services remembered for deltas; a sidecar holding a version older than the oldest one
/// forgotten gets the whole table.
pub const MAX_TOMBSTONES: usize = 4096;

/// The encoded size of a whole table past which the table warns: half of what a sidecar decodes
/// in one push (64 MiB), which the rest of a push and the table's growth soon fill.
pub const WARN_FULL_TABLE_BYTES: usize = 32 << 20;

/// A service's instances, as its snapshots hold them.
type Instances = BTreeMap<String, Arc<Instance>>;

/// The addresses of one service.
#[derive(Debug, Clone)]
struct Entry {
    virtual_ip: Option<IpAddr>,
    /// The `IP:PORT` of each instance whose address is an IP, with how many instances have it.
    endpoints: BTreeMap<SocketAddr, u32>,
    /// The instances `endpoints` counts, from the last snapshot seen.
    instances: Arc<Instances>,
}

impl Entry {
    /// The entry of the service `snapshot` shows.
    fn of(snapshot: &ServiceSnapshot) -> Self {
        let mut entry = Self { virtual_ip: None, endpoints: BTreeMap::new(), instances: Arc::default() };
        entry.follow(snapshot, None);
        entry
    }

    /// Takes the service to what `snapshot` shows, `changed` being the one instance the snapshot
    /// changed (when the registry says so). Returns whether its virtual IP or its set of
    /// endpoints changed.
    fn follow(&mut self, snapshot: &ServiceSnapshot, changed: Option<&str>) -> bool {
        let moves = moves(&self.instances, &snapshot.instances, changed);
        self.instances = snapshot.instances.clone();
        let endpoints_changed = count(&mut self.endpoints, moves);
        let virtual_ip_changed = std::mem::replace(&mut self.virtual_ip, snapshot.virtual_ip) != snapshot.virtual_ip;
        endpoints_changed || virtual_ip_changed
    }

    fn to_proto(&self, service: &str) -> v1::ServiceAddresses {
        v1::ServiceAddresses {
            service: service.to_owned(),
            virtual_ip: self.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            endpoints: self.endpoints.keys().map(ToString::to_string).collect(),
        }
    }
}

/// The `IP:PORT` an instance puts in the table: none when its address is a host name (it is
/// reached by its name).
fn endpoint(instance: &Instance) -> Option<SocketAddr> {
    instance.address.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, instance.port))
}

/// The endpoints that come (+1) and go (-1) from `before` to `after`. An instance the snapshot
/// shares, or whose address and port stay, costs nothing; with `changed` (the one instance that
/// differs) only it is looked at, unless the counts say more changed.
fn moves(before: &Arc<Instances>, after: &Arc<Instances>, changed: Option<&str>) -> Vec<(SocketAddr, i64)> {
    let mut moves = Vec::new();
    if Arc::ptr_eq(before, after) {
        return moves;
    }
    let mut step = |old: Option<&Arc<Instance>>, new: Option<&Arc<Instance>>| {
        if let (Some(old), Some(new)) = (old, new)
            && (Arc::ptr_eq(old, new) || (old.port == new.port && old.address == new.address))
        {
            return;
        }
        moves.extend(old.and_then(|old| endpoint(old)).map(|e| (e, -1)));
        moves.extend(new.and_then(|new| endpoint(new)).map(|e| (e, 1)));
    };
    if let Some(id) = changed {
        let (old, new) = (before.get(id), after.get(id));
        if before.len() - usize::from(old.is_some()) + usize::from(new.is_some()) == after.len() {
            step(old, new);
            return moves;
        }
    }
    // Every instance, in the order of their ids.
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        match order {
            Ordering::Less => step(old.next().map(|(_, i)| i), None),
            Ordering::Greater => step(None, new.next().map(|(_, i)| i)),
            Ordering::Equal => step(old.next().map(|(_, i)| i), new.next().map(|(_, i)| i)),
        }
    }
    moves
}

/// Applies `moves` to the counts of `endpoints`; returns whether an endpoint came or went.
fn count(endpoints: &mut BTreeMap<SocketAddr, u32>, mut moves: Vec<(SocketAddr, i64)>) -> bool {
    // An endpoint that goes with one instance and comes with another stays.
    moves.sort_unstable_by_key(|(endpoint, _)| *endpoint);
    let mut changed = false;
    for same in moves.chunk_by(|a, b| a.0 == b.0) {
        let Some(&(endpoint, _)) = same.first() else { continue };
        let before = endpoints.get(&endpoint).copied().unwrap_or(0);
        let after = same.iter().fold(i64::from(before), |n, (_, by)| n + by).max(0);
        match u32::try_from(after) {
            Ok(0) => endpoints.remove(&endpoint),
            after => endpoints.insert(endpoint, after.unwrap_or(u32::MAX)),
        };
        changed |= (before == 0) != (after == 0);
    }
    changed
}

/// A service's place in the table: its entry, or a tombstone, and the version it changed at.
struct Slot {
    entry: Option<Entry>,
    version: u64,
}

/// What a snapshot does to a service's slot.
enum Stamp {
    /// Its entry, already changed in place.
    Changed,
    /// A new entry.
    New(Entry),
    /// A tombstone.
    Removed,
}

struct State {
    slots: HashMap<Arc<str>, Slot>,
    /// Every slot by the version of its last change.
    changes: BTreeSet<(u64, Arc<str>)>,
    /// The tombstones, oldest first.
    tombstones: BTreeSet<(u64, Arc<str>)>,
    /// How many slots hold an entry.
    live: usize,
    /// Deltas are built from any version at or above this one.
    floor: u64,
    /// The newest version stamped on a change.
    latest: u64,
    /// The version handed out: every change up to it is applied.
    sealed: u64,
    /// The version whose whole table was last measured against `warn_bytes`.
    measured: u64,
    /// The encoded size of a whole table past which it warns.
    warn_bytes: usize,
}

/// The address table, kept in step with the registry.
pub struct AddressTable {
    state: Mutex<State>,
    /// The version handed out, for the sessions that push the table.
    version: watch::Sender<u64>,
    /// On one process, where versions come from; `None` for a replica, which stamps changes
    /// with the store's revisions.
    indexes: Option<Arc<Indexes>>,
}

impl AddressTable {
    /// A table that follows `registry` from now on, holding every service it has already. With a
    /// shared store (replicas), versions are the store's revisions and the replica seals them.
    pub fn attach(registry: &Registry, indexes: Arc<Indexes>) -> Arc<Self> {
        let table = Arc::new(Self::new(registry.shared().is_none().then_some(indexes)));
        registry.observe(table.clone());
        table
    }

    /// An empty table whose versions come from `indexes` (one process) or from the store's
    /// revisions (`None`: a replica).
    fn new(indexes: Option<Arc<Indexes>>) -> Self {
        // On one process the table starts at a fresh index: any version a sidecar holds is older
        // and gets the whole table. A replica's table starts at the revision it first seals.
        let start = indexes.as_ref().map_or(0, |indexes| indexes.next());
        Self {
            state: Mutex::new(State {
                slots: HashMap::new(),
                changes: BTreeSet::new(),
                tombstones: BTreeSet::new(),
                live: 0,
                floor: if indexes.is_some() { start } else { u64::MAX },
                latest: start,
                sealed: start,
                measured: 0,
                warn_bytes: WARN_FULL_TABLE_BYTES,
            }),
            version: watch::Sender::new(start),
            indexes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        ferry_runtime::lock(&self.state)
    }

    /// The version handed out now.
    pub fn version(&self) -> u64 {
        self.lock().sealed
    }

    /// A receiver of the version handed out, which changes whenever the table does.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// How many services the table holds.
    pub fn len(&self) -> usize {
        self.lock().live
    }

    /// Whether the table holds no service.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// With a shared store: every change up to the store's `revision` is applied, so the table
    /// may hand out the version of the last of them. The first seal (after the replica's first
    /// load) also sets where deltas can start from. On one process every change seals itself.
    pub fn seal(&self, revision: u64) {
        if self.indexes.is_some() {
            return;
        }
        let mut state = self.lock();
        if state.floor == u64::MAX {
            state.floor = revision;
            state.latest = state.latest.max(revision);
        }
        if state.latest != state.sealed {
            state.sealed = state.latest;
            self.version.send_replace(state.latest);
        }
    }

    /// What a sidecar holding version `held` (`None`: nothing it can build on) must be sent to
    /// hold the table as it is: nothing when it holds it already, a delta when the table's log
    /// reaches back to `held` and the delta is smaller than the table, the whole table otherwise.
    pub fn update_for(&self, held: Option<u64>) -> Option<v1::AddressTable> {
        let mut state = self.lock();
        let version = state.sealed;
        match held {
            Some(held) if held == version => None,
            Some(held) if held >= state.floor && held < version => {
                Some(state.delta(held, version).unwrap_or_else(|| state.full(version)))
            }
            _ => Some(state.full(version)),
        }
    }
}

impl State {
    /// Everything the table holds, at `version`.
    fn full(&mut self, version: u64) -> v1::AddressTable {
        let mut upserted: Vec<v1::ServiceAddresses> =
            self.slots.iter().filter_map(|(name, slot)| slot.entry.as_ref().map(|entry| entry.to_proto(name))).collect();
        upserted.sort_by(|a, b| a.service.cmp(&b.service));
        let table = v1::AddressTable { version, full: true, base_version: 0, upserted, removed: Vec::new() };
        if let Some(bytes) = self.oversized(&table) {
            // Past what a sidecar decodes, every intercepting sidecar's stream would fail on the
            // table, reconnect, and fail again.
            tracing::warn!(
                bytes,
                warn_above = self.warn_bytes,
                services = table.upserted.len(),
                endpoints = table.upserted.iter().map(|s| s.endpoints.len()).sum::<usize>(),
                version = table.version,
                "the whole address table nears the 64 MiB a sidecar accepts in one push; past it, an intercepting sidecar that needs the whole table cannot take it"
            );
        }
        table
    }

    /// The encoded size of the whole `table` when it passes `warn_bytes`, once per version: a
    /// table measured already is not measured again.
    fn oversized(&mut self, table: &v1::AddressTable) -> Option<usize> {
        if self.measured == table.version {
            return None;
        }
        self.measured = table.version;
        Some(table.encoded_len()).filter(|bytes| *bytes > self.warn_bytes)
    }

    /// The services changed after `held`, at `version`; `None` when as many as the table holds.
    ///
    /// With a shared store the changes of a revision not yet sealed are included too: a sidecar
    /// then holds some entries newer than its version, which later deltas send again.
    fn delta(&self, held: u64, version: u64) -> Option<v1::AddressTable> {
        let mut upserted = Vec::new();
        let mut removed = Vec::new();
        for (_, name) in self.changes.range((held + 1, Arc::<str>::from(""))..) {
            if upserted.len() + removed.len() >= self.live.max(1) {
                return None;
            }
            match self.slots.get(name).and_then(|slot| slot.entry.as_ref()) {
                Some(entry) => upserted.push(entry.to_proto(name)),
                None => removed.push(name.to_string()),
            }
        }
        upserted.sort_by(|a, b| a.service.cmp(&b.service));
        removed.sort();
        Some(v1::AddressTable { version, full: false, base_version: held, upserted, removed })
    }

    /// Records the change `stamp` of `name`'s slot, at `version`.
    fn stamp(&mut self, name: &Arc<str>, stamp: Stamp, version: u64) {
        let mut held = None;
        if let Some(old) = self.slots.remove(name) {
            self.changes.remove(&(old.version, name.clone()));
            match old.entry {
                Some(entry) => {
                    self.live -= 1;
                    held = Some(entry);
                }
                None => {
                    self.tombstones.remove(&(old.version, name.clone()));
                }
            }
        }
        let entry = match stamp {
            Stamp::Changed => held,
            Stamp::New(entry) => Some(entry),
            Stamp::Removed => None,
        };
        match entry {
            Some(_) => self.live += 1,
            None => {
                self.tombstones.insert((version, name.clone()));
            }
        }
        self.changes.insert((version, name.clone()));
        self.slots.insert(name.clone(), Slot { entry, version });
        self.latest = self.latest.max(version);
        while self.tombstones.len() > MAX_TOMBSTONES {
            let Some((forgotten, gone)) = self.tombstones.pop_first() else { break };
            self.changes.remove(&(forgotten, gone.clone()));
            self.slots.remove(&gone);
            // A sidecar holding an older version may not know it is gone.
            self.floor = if self.floor == u64::MAX { u64::MAX } else { self.floor.max(forgotten) };
        }
    }
}

impl Observer for AddressTable {
    fn published(&self, snapshot: &ServiceSnapshot, changed: Option<&str>) {
        let mut state = self.lock();
        let belongs = snapshot.exists() || snapshot.virtual_ip.is_some();
        let stamp = match state.slots.get_mut(&snapshot.name).and_then(|slot| slot.entry.as_mut()) {
            Some(entry) => {
                // Followed in place even when nothing shows: the next snapshot is compared with
                // this one.
                let moved = entry.follow(snapshot, changed);
                match (belongs, moved) {
                    (false, _) => Stamp::Removed,
                    (true, true) => Stamp::Changed,
                    (true, false) => return,
                }
            }
            None if belongs => Stamp::New(Entry::of(snapshot)),
            None => return,
        };
        match &self.indexes {
            Some(indexes) => {
                let version = indexes.next();
                state.stamp(&snapshot.name, stamp, version);
                state.sealed = version;
                self.version.send_replace(version);
            }
            None => {
                // The revision of the change: the snapshot's index, or its address's version;
                // never one handed out already, or the sidecars holding it would miss the change.
                let version = snapshot.version().max(state.sealed + 1);
                state.stamp(&snapshot.name, stamp, version);
            }
        }
    }
}

#[cfg(test)]
mod tests;
