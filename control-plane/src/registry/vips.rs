//! Virtual IPs: one stable address per service, from `--vip-cidr`, as Kubernetes gives each
//! Service a ClusterIP.
//!
//! A service gets its address when it first has an instance, and keeps it while it has none for
//! up to `--vip-release-after` (a day by default), so that a service redeployed from scratch keeps
//! the address its callers resolved. The address is picked by hashing the service's name into
//! the range (FNV-1a) and probing linearly for a free one, so a name usually gets the same address
//! in every mesh. The network address and, for IPv4, the broadcast address are never handed out.
//!
//! Allocations are stored in two tables written together: `virtual_ips` (service to address, and
//! since when it has had no instance) and `virtual_ip_owners` (address to service). On one process
//! the registry allocates under its lock as the service's first instance is published, so the
//! snapshot that announces the service already carries its address, and writes behind. Replicas
//! sharing a store leave allocation to the elected replica ([`Registry::set_virtual_ip_duty`]),
//! which writes in a transaction guarded on both keys being absent: two replicas can never hand
//! out one address twice, whatever they believe. Every replica, the elected one included, applies
//! the result from the store's watch ([`Registry::apply_virtual_ip_event`]).
//!
//! Allocating, releasing or moving an address gives the service's snapshot a new
//! `virtual_ip_version`, which moves the service's version (and so reaches the sidecars
//! subscribed to it) and bumps nothing else.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use super::{Registry, ServiceEntry, ServiceSnapshot, State};
use crate::store::{Event, Guard, Table, Write};

mod range;

pub use self::range::{InvalidVipRange, VipRange};

/// How often the elected replica looks again at work it could not finish (a write refused by a
/// guard, or the store out of reach).
const RETRY: Duration = Duration::from_secs(1);

/// A service's allocation as stored under `virtual_ips/SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredVip {
    ip: IpAddr,
    /// Since when the service has had no instance (milliseconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    empty_since_ms: Option<u64>,
}

impl StoredVip {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn millis(at: SystemTime) -> u64 {
    u64::try_from(at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// One service's address.
#[derive(Debug, Clone)]
pub(super) struct Allocation {
    pub(super) ip: IpAddr,
    /// The version the address was given at: a registry index, or the store revision that
    /// applied it.
    pub(super) version: u64,
    /// Since when the service has had no instance, as stored.
    empty_since: Option<SystemTime>,
    /// When the address is released unless an instance comes first; set with `empty_since`.
    due: Option<Instant>,
    /// With a shared store, the revision of the record's last change, for guarded writes.
    stored: u64,
}

/// Every allocation, and the work they wait for.
#[derive(Debug, Default)]
pub(super) struct VipBook {
    allocations: HashMap<Arc<str>, Allocation>,
    owners: HashMap<IpAddr, Arc<str>>,
    /// Services without instances, by when their address is due for release.
    releases: BTreeSet<(Instant, Arc<str>)>,
    /// Services with instances and no address: the range is full (one process), or the elected
    /// replica has not allocated yet.
    wanted: BTreeSet<Arc<str>>,
    /// With a shared store: services whose stored emptiness, or an address outside the range,
    /// the elected replica must set right.
    stale: BTreeSet<Arc<str>>,
    /// Every address of the range was taken when one was last picked: picking again scans the
    /// whole range for nothing (some 65,000 probes for a /16), so it waits until an address is
    /// freed, which clears this.
    full: bool,
    /// With a shared store: the elected replica has said the range is full (said once).
    said_full: bool,
}

impl VipBook {
    /// The address of `service`, if it has one.
    pub(super) fn get(&self, service: &str) -> Option<&Allocation> {
        self.allocations.get(service)
    }

    /// Every service with an address.
    pub(super) fn services(&self) -> impl Iterator<Item = &Arc<str>> {
        self.allocations.keys()
    }

    fn insert(&mut self, service: &Arc<str>, allocation: Allocation) {
        let full = self.full;
        if self.remove(service).is_some_and(|previous| previous.ip == allocation.ip) {
            // The same address again (its emptiness changed): nothing was freed.
            self.full = full;
        }
        if let Some(due) = allocation.due {
            self.releases.insert((due, service.clone()));
        }
        self.owners.insert(allocation.ip, service.clone());
        self.allocations.insert(service.clone(), allocation);
        self.wanted.remove(service);
    }

    fn remove(&mut self, service: &str) -> Option<Allocation> {
        let allocation = self.allocations.remove(service)?;
        if self.owners.get(&allocation.ip).is_some_and(|owner| &**owner == service) {
            self.owners.remove(&allocation.ip);
            self.full = false;
        }
        if let Some(due) = allocation.due {
            self.releases.remove(&(due, Arc::from(service)));
        }
        Some(allocation)
    }

    fn set_empty_since(&mut self, service: &Arc<str>, since: Option<SystemTime>, release_after: Duration) {
        let Some(mut allocation) = self.allocations.get(service).cloned() else { return };
        allocation.empty_since = since;
        allocation.due = since.map(|since| due_at(since, release_after));
        self.insert(service, allocation);
    }

    /// A free address for `service`, besides `also_taken`; none without looking while the range
    /// is known to be full.
    fn pick(&self, range: &VipRange, service: &str, also_taken: &[IpAddr]) -> Option<IpAddr> {
        if self.full {
            return None;
        }
        range.pick(service, |ip| self.owners.contains_key(&ip) || also_taken.contains(&ip), self.owners.len() + also_taken.len())
    }
}

/// When an address whose service has had no instance since `since` is due for release.
fn due_at(since: SystemTime, release_after: Duration) -> Instant {
    let empty_for = SystemTime::now().duration_since(since).unwrap_or_default();
    Instant::now() + release_after.saturating_sub(empty_for)
}

/// One write the elected replica makes to the store, guarded.
struct GuardedWrite {
    service: Arc<str>,
    what: &'static str,
    guards: Vec<Guard>,
    writes: Vec<Write>,
}

impl Registry {
    /// Restores the stored allocations (one process), given the services with instances
    /// (`existing`): allocates for those without one, drops those outside the range, and notes
    /// emptiness that began or ended while the control plane was down.
    pub(super) fn restore_virtual_ips(&self, state: &mut State, rows: Vec<(String, Vec<u8>)>, existing: &BTreeSet<Arc<str>>) {
        let range = &self.config.virtual_ips;
        for (service, value) in rows {
            let name: Arc<str> = service.as_str().into();
            let stored = match serde_json::from_slice::<StoredVip>(&value) {
                Ok(stored) if range.contains(stored.ip) && !state.vips.owners.contains_key(&stored.ip) => stored,
                Ok(stored) => {
                    tracing::info!(%service, ip = %stored.ip, range = %range, "dropping a virtual IP outside --vip-cidr, or held twice");
                    self.write_release(&name, stored.ip);
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%service, %error, "dropping a stored virtual IP that does not decode");
                    self.writer.enqueue(Write { table: Table::VirtualIps, key: service, value: None });
                    continue;
                }
            };
            let empty_since = stored.empty_since_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
            let allocation = Allocation {
                ip: stored.ip,
                version: 0,
                empty_since,
                due: empty_since.map(|since| due_at(since, self.config.vip_release_after)),
                stored: 0,
            };
            state.vips.insert(&name, allocation);
        }
        let names: Vec<Arc<str>> = state.vips.allocations.keys().chain(existing).cloned().collect();
        for name in names {
            self.settle_local(state, &name, existing.contains(&name), 0);
        }
        self.vip_work.notify_one();
    }

    /// The address `service` gets as it is published with or without instances (`exists`) at
    /// `index`: on one process, allocated, or its emptiness noted, at once; with a shared store,
    /// noted for the elected replica. Returns the address and its version.
    pub(super) fn virtual_ip_for(
        &self,
        state: &mut State,
        service: &Arc<str>,
        exists: bool,
        index: u64,
    ) -> Option<(IpAddr, u64)> {
        if self.shared.is_some() {
            let allocation = state.vips.get(service);
            let needs_allocation = exists && allocation.is_none();
            let stale = allocation.is_some_and(|a| a.empty_since.is_some() == exists);
            if needs_allocation {
                if state.vips.wanted.insert(service.clone()) {
                    self.vip_work.notify_one();
                }
            } else if !exists {
                state.vips.wanted.remove(service);
            }
            if stale && state.vips.stale.insert(service.clone()) {
                self.vip_work.notify_one();
            }
        } else {
            self.settle_local(state, service, exists, index);
        }
        state.vips.get(service).map(|a| (a.ip, a.version))
    }

    /// On one process: gives `service` an address if it has instances and none, and stores when
    /// its emptiness starts or ends. A new address gets version `index`, or the next index when 0.
    fn settle_local(&self, state: &mut State, service: &Arc<str>, exists: bool, index: u64) {
        let release_after = self.config.vip_release_after;
        match state.vips.get(service).map(|a| (a.ip, a.empty_since.is_some())) {
            None if exists => {
                let Some(ip) = state.vips.pick(&self.config.virtual_ips, service, &[]) else {
                    state.vips.full = true;
                    if state.vips.wanted.insert(service.clone()) {
                        tracing::warn!(
                            %service,
                            range = %self.config.virtual_ips,
                            allocated = state.vips.allocations.len(),
                            "no virtual IP left in --vip-cidr: the service has none until one is released"
                        );
                    }
                    return;
                };
                let version = if index == 0 { self.indexes.next() } else { index };
                let allocation = Allocation { ip, version, empty_since: None, due: None, stored: 0 };
                state.vips.insert(service, allocation);
                self.write_allocation(service, &StoredVip { ip, empty_since_ms: None });
                tracing::debug!(%service, %ip, "allocated a virtual IP");
            }
            None => {
                state.vips.wanted.remove(service);
            }
            Some((ip, empty)) => {
                if let Some(allocation) = state.vips.allocations.get_mut(service)
                    && allocation.version == 0
                {
                    // Restored: a version of this run.
                    allocation.version = if index == 0 { self.indexes.next() } else { index };
                }
                if empty == exists {
                    let since = (!exists).then(SystemTime::now);
                    state.vips.set_empty_since(service, since, release_after);
                    self.write_allocation(service, &StoredVip { ip, empty_since_ms: since.map(millis) });
                    if since.is_some() {
                        self.vip_work.notify_one();
                    }
                }
            }
        }
    }

    fn write_allocation(&self, service: &str, stored: &StoredVip) {
        self.writer.enqueue(Write { table: Table::VirtualIps, key: service.to_owned(), value: Some(stored.encode()) });
        self.writer.enqueue(Write {
            table: Table::VirtualIpOwners,
            key: stored.ip.to_string(),
            value: Some(service.as_bytes().to_vec()),
        });
    }

    fn write_release(&self, service: &str, ip: IpAddr) {
        self.writer.enqueue(Write { table: Table::VirtualIps, key: service.to_owned(), value: None });
        self.writer.enqueue(Write { table: Table::VirtualIpOwners, key: ip.to_string(), value: None });
    }

    /// Gives `service`'s snapshot the address it has now, at `version`, for its watchers: the
    /// service's index and instances stay as they are.
    pub(super) fn republish_virtual_ip(&self, state: &mut State, service: &Arc<str>, version: u64) {
        let virtual_ip = state.vips.get(service).map(|a| a.ip);
        let entry = state.services.entry(service.clone()).or_insert_with(|| ServiceEntry {
            tx: watch::Sender::new(Arc::new(ServiceSnapshot::empty(service.clone(), self.indexes.peek()))),
        });
        let previous = entry.tx.borrow().clone();
        if previous.virtual_ip == virtual_ip {
            return;
        }
        let snapshot = Arc::new(ServiceSnapshot { virtual_ip, virtual_ip_version: version, ..(*previous).clone() });
        entry.tx.send_replace(snapshot.clone());
        if let Some(observer) = self.observer.get() {
            observer.published(&snapshot, None);
        }
    }

    /// Makes this replica the one that allocates and releases addresses (one process always is;
    /// with a shared store, the elected replica).
    pub fn set_virtual_ip_duty(&self, on: bool) {
        self.vip_duty.send_if_modified(|duty| std::mem::replace(duty, on) != on);
    }

    /// Every service with an address, for a replica that loads the store again.
    pub fn virtual_ip_services(&self) -> Vec<String> {
        self.lock().vips.services().map(|s| s.to_string()).collect()
    }

    /// Applies an allocation the shared store reports (`virtual_ips/SERVICE`).
    ///
    /// The store is authoritative: its guarded writes never give one address to two services, so
    /// another service holding the address here holds it from a state this replica has not caught
    /// up with, and loses it. Reloading the store after a compaction comes to this: its rows
    /// arrive in key order, so `beta` may take the address `zeta` held in memory before `zeta`'s
    /// own row moves it elsewhere.
    pub fn apply_virtual_ip_event(&self, event: &Event) {
        let name: Arc<str> = event.key.as_str().into();
        let stored = match event.value.as_deref().map(serde_json::from_slice::<StoredVip>) {
            None => None,
            Some(Ok(stored)) => Some(stored),
            Some(Err(error)) => {
                tracing::warn!(service = %event.key, %error, "ignoring a virtual IP in the store that does not decode");
                return;
            }
        };
        let mut state = self.lock();
        let exists = |state: &State, service: &str| state.services.get(service).is_some_and(|entry| entry.tx.borrow().exists());
        let before = state.vips.get(&name).map(|a| a.ip);
        match stored {
            None => {
                let freed = state.vips.remove(&name).is_some();
                state.vips.stale.remove(&name);
                if exists(&state, &name) {
                    state.vips.wanted.insert(name.clone());
                    self.vip_work.notify_one();
                } else if freed && !state.vips.wanted.is_empty() {
                    // An address for a service the full range left without one.
                    self.vip_work.notify_one();
                }
            }
            Some(stored) => {
                if let Some(owner) = state.vips.owners.get(&stored.ip).filter(|owner| **owner != name).cloned() {
                    tracing::debug!(service = %name, ip = %stored.ip, %owner, "the store moved a virtual IP this replica still gave to another service");
                    state.vips.remove(&owner);
                    state.vips.stale.remove(&owner);
                    if exists(&state, &owner) {
                        state.vips.wanted.insert(owner.clone());
                    }
                    self.republish_virtual_ip(&mut state, &owner, event.revision);
                }
                let empty_since = stored.empty_since_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
                let version = match state.vips.get(&name) {
                    Some(held) if held.ip == stored.ip => held.version,
                    _ => event.revision,
                };
                let allocation = Allocation {
                    ip: stored.ip,
                    version,
                    empty_since,
                    due: empty_since.map(|since| due_at(since, self.config.vip_release_after)),
                    stored: event.version,
                };
                state.vips.insert(&name, allocation);
                if empty_since.is_some() == exists(&state, &name) || !self.config.virtual_ips.contains(stored.ip) {
                    state.vips.stale.insert(name.clone());
                } else {
                    state.vips.stale.remove(&name);
                }
                self.vip_work.notify_one();
            }
        }
        if state.vips.get(&name).map(|a| a.ip) != before {
            self.republish_virtual_ip(&mut state, &name, event.revision);
        }
        drop(state);
        self.indexes.advance_past(event.revision);
    }

    /// When the registry on duty looks again unwoken: when the next address is due for release
    /// and, with a shared store, a second from now while work is left that it could not finish
    /// (a write refused by a guard, or the store out of reach). Services waiting for an address
    /// while the range is full are no such work: only a release helps them, and the release wakes
    /// it.
    fn next_wake(&self) -> Option<Instant> {
        let state = self.lock();
        let next = state.vips.releases.first().map(|(due, _)| *due);
        if self.shared.is_none() {
            return next;
        }
        let again = Instant::now() + RETRY;
        let work_left = !state.vips.stale.is_empty() || (!state.vips.wanted.is_empty() && !state.vips.full);
        if work_left { Some(again) } else { next.map(|due| due.max(again)) }
    }

    /// Releases the addresses due, and allocates what waits for one.
    async fn tend_virtual_ips(&self) {
        if self.shared.is_some() {
            self.tend_shared().await;
            return;
        }
        let mut state = self.lock();
        let now = Instant::now();
        let mut released = false;
        while let Some((due, service)) = state.vips.releases.first().cloned() {
            if due > now {
                break;
            }
            state.vips.releases.remove(&(due, service.clone()));
            let exists = state.services.get(&service).is_some_and(|entry| entry.tx.borrow().exists());
            if exists {
                continue;
            }
            if let Some(allocation) = state.vips.remove(&service) {
                tracing::info!(%service, ip = %allocation.ip, after = ?self.config.vip_release_after, "released the virtual IP of a service without instances");
                self.write_release(&service, allocation.ip);
                let version = self.indexes.next();
                self.republish_virtual_ip(&mut state, &service, version);
                released = true;
            }
        }
        if !released {
            return;
        }
        // Only a release frees an address for the services the full range left without one.
        let waiting: Vec<Arc<str>> = state.vips.wanted.iter().cloned().collect();
        for service in waiting {
            let exists = state.services.get(&service).is_some_and(|entry| entry.tx.borrow().exists());
            if !exists {
                state.vips.wanted.remove(&service);
                continue;
            }
            self.settle_local(&mut state, &service, true, 0);
            if let Some(version) = state.vips.get(&service).map(|a| a.version) {
                self.republish_virtual_ip(&mut state, &service, version);
            } else {
                break; // Still full.
            }
        }
    }

    /// With a shared store, on the elected replica: allocates what waits for an address, sets
    /// right the stored emptiness, and releases what is due, each in a guarded transaction.
    async fn tend_shared(&self) {
        if self.shared.as_ref().is_some_and(|shared| shared.check_available().is_err()) {
            return;
        }
        let writes = self.plan_shared();
        for write in writes {
            let service = write.service.clone();
            match self.store.transact(write.guards, write.writes).await {
                Ok(Ok(_)) => {
                    if write.what == "release" {
                        tracing::info!(%service, "released the virtual IP of a service without instances, or outside --vip-cidr");
                    }
                    let mut state = self.lock();
                    state.vips.wanted.remove(&service);
                    state.vips.stale.remove(&service);
                }
                // Another write came first: its event, once applied, tells what is left to do.
                Ok(Err(revision)) => {
                    tracing::debug!(%service, what = write.what, revision, "a virtual IP write lost its guard; trying again");
                }
                Err(error) => {
                    tracing::warn!(%service, what = write.what, %error, "cannot write a virtual IP; trying again");
                    return;
                }
            }
        }
    }

    /// What the elected replica writes now.
    fn plan_shared(&self) -> Vec<GuardedWrite> {
        let mut state = self.lock();
        let mut full = false;
        let range = &self.config.virtual_ips;
        let exists = |service: &str| state.services.get(service).is_some_and(|entry| entry.tx.borrow().exists());
        let record = |service: &Arc<str>, allocation: &Allocation, empty_since: Option<SystemTime>| GuardedWrite {
            service: service.clone(),
            what: "emptiness",
            guards: vec![Guard { table: Table::VirtualIps, key: service.to_string(), version: allocation.stored }],
            writes: vec![Write {
                table: Table::VirtualIps,
                key: service.to_string(),
                value: Some(StoredVip { ip: allocation.ip, empty_since_ms: empty_since.map(millis) }.encode()),
            }],
        };
        let release = |service: &Arc<str>, allocation: &Allocation| GuardedWrite {
            service: service.clone(),
            what: "release",
            guards: vec![Guard { table: Table::VirtualIps, key: service.to_string(), version: allocation.stored }],
            writes: vec![
                Write { table: Table::VirtualIps, key: service.to_string(), value: None },
                Write { table: Table::VirtualIpOwners, key: allocation.ip.to_string(), value: None },
            ],
        };
        let mut plan = Vec::new();
        let mut out_of_room = false;
        let now = Instant::now();
        for (due, service) in &state.vips.releases {
            if *due > now {
                break;
            }
            if let Some(allocation) = state.vips.get(service).filter(|_| !exists(service)) {
                plan.push(release(service, allocation));
            }
        }
        for service in &state.vips.stale {
            let Some(allocation) = state.vips.get(service) else { continue };
            if !range.contains(allocation.ip) {
                plan.push(release(service, allocation));
            } else if exists(service) && allocation.empty_since.is_some() {
                plan.push(record(service, allocation, None));
            } else if !exists(service) && allocation.empty_since.is_none() {
                plan.push(record(service, allocation, Some(SystemTime::now())));
            }
        }
        let mut picked = Vec::new();
        // While the range is full, `pick` finds nothing without looking.
        let looked = !state.vips.full;
        for service in state.vips.wanted.iter().filter(|_| looked) {
            if state.vips.get(service).is_some() || !exists(service) {
                continue;
            }
            let Some(ip) = state.vips.pick(range, service, &picked) else {
                if !state.vips.said_full {
                    tracing::warn!(%service, %range, "no virtual IP left in --vip-cidr: services have none until one is released");
                }
                out_of_room = true;
                // Full for good only if no address picked in this round is still in flight: a
                // write that loses its guard frees its address again.
                full = picked.is_empty();
                break;
            };
            picked.push(ip);
            plan.push(GuardedWrite {
                service: service.clone(),
                what: "allocation",
                guards: vec![
                    Guard { table: Table::VirtualIps, key: service.to_string(), version: 0 },
                    Guard { table: Table::VirtualIpOwners, key: ip.to_string(), version: 0 },
                ],
                writes: vec![
                    Write {
                        table: Table::VirtualIps,
                        key: service.to_string(),
                        value: Some(StoredVip { ip, empty_since_ms: None }.encode()),
                    },
                    Write { table: Table::VirtualIpOwners, key: ip.to_string(), value: Some(service.as_bytes().to_vec()) },
                ],
            });
        }
        if looked {
            state.vips.full = full;
            state.vips.said_full = out_of_room;
        }
        plan
    }
}

/// Allocates and releases addresses while this registry has the duty: at once when it gets it,
/// when there is work, and when [`Registry::next_wake`] says. A registry without the duty (a
/// replica not elected) waits for nothing else, so no timer wakes it.
pub(super) async fn run(registry: Weak<Registry>, work: Arc<Notify>, mut duty: watch::Receiver<bool>) {
    loop {
        if !*duty.borrow_and_update() {
            if duty.changed().await.is_err() {
                return;
            }
            continue;
        }
        let wake = {
            let Some(registry) = registry.upgrade() else { return };
            registry.tend_virtual_ips().await;
            registry.next_wake()
        };
        tokio::select! {
            () = work.notified() => {}
            () = sleep_until(wake) => {}
            changed = duty.changed() => if changed.is_err() { return },
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
