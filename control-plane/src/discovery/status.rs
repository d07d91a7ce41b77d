//! What `ferryctl status` shows: the connected sidecars and how far each one's config has come.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use ferry_proto::v1;

use super::session::Held;
use crate::{
    registry::{Registry, SessionId, timestamp},
    resources::Resources,
};

/// The sidecars connected right now.
#[derive(Default)]
pub struct Sidecars {
    connected: Mutex<HashMap<SessionId, Arc<SidecarRecord>>>,
}

/// One connected sidecar, updated by its session as pushes go out and answers come back.
pub struct SidecarRecord {
    pub node_id: String,
    pub service: String,
    pub instance_id: Option<String>,
    pub peer: String,
    pub build: String,
    pub connected_at: SystemTime,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    /// Per subscribed service.
    services: HashMap<Arc<str>, ServiceProgress>,
    last_nack: Option<v1::NackStatus>,
}

#[derive(Default, Clone, Copy)]
struct ServiceProgress {
    sent: Option<Held>,
    acked: Option<Held>,
    rejected: Option<Held>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SidecarRecord {
    /// A record for a sidecar that just said Hello.
    pub fn new(node_id: String, service: String, instance_id: Option<String>, peer: String, build: String) -> Self {
        Self { node_id, service, instance_id, peer, build, connected_at: SystemTime::now(), progress: Mutex::default() }
    }

    pub(crate) fn subscribed(&self, service: &Arc<str>, held: Option<Held>) {
        lock(&self.progress).services.insert(service.clone(), ServiceProgress { sent: held, acked: held, rejected: None });
    }

    pub(crate) fn unsubscribed(&self, service: &str) {
        lock(&self.progress).services.remove(service);
    }

    pub(crate) fn sent(&self, service: &Arc<str>, held: Held) {
        if let Some(entry) = lock(&self.progress).services.get_mut(service) {
            entry.sent = Some(held);
        }
    }

    pub(crate) fn acked(&self, service: &Arc<str>, held: Held) {
        if let Some(entry) = lock(&self.progress).services.get_mut(service) {
            entry.acked = Some(held);
        }
    }

    pub(crate) fn rejected(&self, service: &Arc<str>, held: Held) {
        if let Some(entry) = lock(&self.progress).services.get_mut(service) {
            entry.rejected = Some(held);
        }
    }

    pub(crate) fn nacked(&self, nack: v1::NackStatus) {
        lock(&self.progress).last_nack = Some(nack);
    }

    fn to_proto(&self, registry: &Registry, resources: &Resources) -> v1::SidecarStatus {
        let progress = lock(&self.progress);
        let mut subscriptions: Vec<_> = progress
            .services
            .iter()
            .map(|(service, p)| {
                let config = resources.config(service);
                let part = |current: u64, of: fn(&Held) -> Option<u64>| v1::ResourceProgress {
                    current_version: current,
                    sent_version: p.sent.as_ref().and_then(of).unwrap_or(0),
                    acked_version: p.acked.as_ref().and_then(of).unwrap_or(0),
                    rejected_version: p.rejected.as_ref().and_then(of).unwrap_or(0),
                };
                v1::SubscriptionStatus {
                    service: service.to_string(),
                    current_version: registry.snapshot(service).map_or(0, |s| s.index).max(config.version),
                    sent_version: p.sent.map_or(0, |h| h.version),
                    acked_version: p.acked.map_or(0, |h| h.version),
                    route: Some(part(config.route_version, |h| h.route)),
                    policy: Some(part(config.policy_version, |h| h.policy)),
                }
            })
            .collect();
        subscriptions.sort_by(|a, b| a.service.cmp(&b.service));
        v1::SidecarStatus {
            node_id: self.node_id.clone(),
            service: self.service.clone(),
            instance_id: self.instance_id.clone().unwrap_or_default(),
            peer: self.peer.clone(),
            build: self.build.clone(),
            connected_at: Some(timestamp(self.connected_at)),
            subscriptions,
            last_nack: progress.last_nack.clone(),
        }
    }
}

impl Sidecars {
    /// Adds a connected sidecar; it is listed until the guard is dropped.
    pub fn connect(self: &Arc<Self>, session: SessionId, record: Arc<SidecarRecord>) -> ConnectedGuard {
        lock(&self.connected).insert(session, record);
        ConnectedGuard { sidecars: self.clone(), session }
    }

    /// Every connected sidecar, by node id.
    pub fn list(&self, registry: &Registry, resources: &Resources) -> Vec<v1::SidecarStatus> {
        let records: Vec<_> = lock(&self.connected).values().cloned().collect();
        let mut list: Vec<_> = records.iter().map(|r| r.to_proto(registry, resources)).collect();
        list.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        list
    }

    /// How many sidecars are connected.
    pub fn len(&self) -> usize {
        lock(&self.connected).len()
    }

    /// Whether no sidecar is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a sidecar from the list when its session ends.
pub struct ConnectedGuard {
    sidecars: Arc<Sidecars>,
    session: SessionId,
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        lock(&self.sidecars.connected).remove(&self.session);
    }
}
