//! Consistent, immutable views of one service, as watchers receive them.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use tokio::time::Instant;

use super::Instance;

/// A service's instances at one registry index. Cheap to clone and share.
#[derive(Debug, Clone)]
pub struct ServiceSnapshot {
    pub name: Arc<str>,
    /// The registry index of the service's last change; 0 if it never had an instance.
    pub index: u64,
    pub instances: Arc<BTreeMap<String, Arc<Instance>>>,
    /// Recent changes, so a subscriber holding an older index can be sent only the difference.
    pub log: Arc<ChangeLog>,
    /// When this snapshot was made, to measure how long pushes take.
    pub changed_at: Instant,
    /// The encoded size of its endpoints as one push carries them.
    pub encoded_bytes: usize,
    /// The service's virtual IP, if it has one.
    pub virtual_ip: Option<IpAddr>,
    /// The version of the virtual IP's last change (given, released or moved); 0 if none ever.
    /// Not an index: the instances did not change.
    pub virtual_ip_version: u64,
}

/// The recent changes of one service.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// Deltas can be computed from any index at or above this one.
    floor: u64,
    entries: VecDeque<Change>,
}

/// One instance added, changed or removed at `index`.
#[derive(Debug, Clone)]
pub struct Change {
    pub index: u64,
    pub id: String,
    /// The instance after the change; `None` when it was removed.
    pub instance: Option<Arc<Instance>>,
}

/// What changed between two indexes of a service.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub upserted: Vec<Arc<Instance>>,
    pub removed: Vec<String>,
}

impl ServiceSnapshot {
    /// The snapshot of a service with no instance yet, whose deltas start at `floor`: versions
    /// a sidecar may hold from before it (say, from before the service was forgotten) get a full
    /// snapshot.
    pub fn empty(name: Arc<str>, floor: u64) -> Self {
        Self {
            name,
            index: 0,
            instances: Arc::default(),
            log: Arc::new(ChangeLog::starting_at(floor)),
            changed_at: Instant::now(),
            encoded_bytes: 0,
            virtual_ip: None,
            virtual_ip_version: 0,
        }
    }

    /// The version of what the snapshot shows: its index, or its virtual IP's, whichever is
    /// newer.
    pub fn version(&self) -> u64 {
        self.index.max(self.virtual_ip_version)
    }

    /// Whether any instance of the service is registered.
    pub fn exists(&self) -> bool {
        !self.instances.is_empty()
    }

    /// How many instances can take traffic.
    pub fn routable(&self) -> usize {
        self.instances.values().filter(|i| i.health.is_routable()).count()
    }

    /// The changes from `index` up to this snapshot, or `None` when the log no longer reaches
    /// back that far (or `index` is not one of this service's past indexes).
    pub fn changes_since(&self, index: u64) -> Option<Delta> {
        if index < self.log.floor || index > self.index {
            return None;
        }
        let mut latest: HashMap<&str, &Option<Arc<Instance>>> = HashMap::new();
        for change in self.log.entries.iter().filter(|c| c.index > index) {
            latest.insert(&change.id, &change.instance);
        }
        let mut delta = Delta::default();
        for (id, instance) in latest {
            match instance {
                Some(instance) => delta.upserted.push(instance.clone()),
                None => delta.removed.push(id.to_owned()),
            }
        }
        delta.upserted.sort_by(|a, b| a.id.cmp(&b.id));
        delta.removed.sort();
        Some(delta)
    }
}

impl ChangeLog {
    /// A log whose deltas start at `floor`.
    pub fn starting_at(floor: u64) -> Self {
        Self { floor, entries: VecDeque::new() }
    }

    /// Records `change`, forgetting the oldest beyond `capacity`.
    pub fn record(&mut self, change: Change, capacity: usize) {
        self.entries.push_back(change);
        while self.entries.len() > capacity {
            if let Some(dropped) = self.entries.pop_front() {
                self.floor = dropped.index;
            }
        }
    }
}
