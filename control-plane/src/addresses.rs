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
//! Versions. On one process they come from the control plane's [`Indexes`], which start from the
//! clock: no version handed out after a restart equals one a sidecar still holds from before it,
//! so such a sidecar gets the whole table, never a delta built on another table. Replicas
//! sharing a store stamp each change with the store revision that made it, so a version means the
//! same table on every replica and a sidecar that moves to another replica still gets deltas. One
//! revision may change several services, so a replica hands out a version only once every change
//! of its revision is applied ([`AddressTable::seal`]).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
};

use ferry_proto::v1;
use tokio::sync::watch;

use crate::{
    index::Indexes,
    registry::{Observer, Registry, ServiceSnapshot},
};

/// Removed services remembered for deltas; a sidecar holding a version older than the oldest one
/// forgotten gets the whole table.
pub const MAX_TOMBSTONES: usize = 4096;

/// The addresses of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    virtual_ip: Option<IpAddr>,
    /// The instances whose address is an IP, sorted.
    endpoints: Vec<SocketAddr>,
}

impl Entry {
    /// The entry of the service `snapshot` shows, if it belongs in the table.
    fn of(snapshot: &ServiceSnapshot) -> Option<Self> {
        if !snapshot.exists() && snapshot.virtual_ip.is_none() {
            return None;
        }
        let mut endpoints: Vec<SocketAddr> = snapshot
            .instances
            .values()
            .filter_map(|i| i.address.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, i.port)))
            .collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        Some(Self { virtual_ip: snapshot.virtual_ip, endpoints })
    }

    fn to_proto(&self, service: &str) -> v1::ServiceAddresses {
        v1::ServiceAddresses {
            service: service.to_owned(),
            virtual_ip: self.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            endpoints: self.endpoints.iter().map(ToString::to_string).collect(),
        }
    }
}

/// A service's place in the table: its entry, or a tombstone, and the version it changed at.
struct Slot {
    entry: Option<Entry>,
    version: u64,
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
        let state = self.lock();
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
    fn full(&self, version: u64) -> v1::AddressTable {
        let mut upserted: Vec<v1::ServiceAddresses> =
            self.slots.iter().filter_map(|(name, slot)| slot.entry.as_ref().map(|entry| entry.to_proto(name))).collect();
        upserted.sort_by(|a, b| a.service.cmp(&b.service));
        v1::AddressTable { version, full: true, base_version: 0, upserted, removed: Vec::new() }
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

    /// Records `entry` (`None`: removed) for `name`, changed at `version`.
    fn stamp(&mut self, name: &Arc<str>, entry: Option<Entry>, version: u64) {
        if let Some(old) = self.slots.remove(name) {
            self.changes.remove(&(old.version, name.clone()));
            match old.entry {
                Some(_) => self.live -= 1,
                None => {
                    self.tombstones.remove(&(old.version, name.clone()));
                }
            }
        }
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
    fn published(&self, snapshot: &ServiceSnapshot) {
        let entry = Entry::of(snapshot);
        let mut state = self.lock();
        let held = state.slots.get(&snapshot.name).and_then(|slot| slot.entry.as_ref());
        if held == entry.as_ref() {
            return;
        }
        match &self.indexes {
            Some(indexes) => {
                let version = indexes.next();
                state.stamp(&snapshot.name, entry, version);
                state.sealed = version;
                self.version.send_replace(version);
            }
            None => {
                // The revision of the change: the snapshot's index, or its address's version;
                // never one handed out already, or the sidecars holding it would miss the change.
                let version = snapshot.version().max(state.sealed + 1);
                state.stamp(&snapshot.name, entry, version);
            }
        }
    }
}

#[cfg(test)]
mod tests;
