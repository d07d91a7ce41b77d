//! What `ferryctl status` shows: the connected sidecars and how far each one's config has come.

use ferry_runtime::lock;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use ferry_proto::v1;

use super::progress::{Held, Part, Progress, ProgressSnapshot, Versions};
use crate::{
    ca::Authority,
    registry::{Registry, SessionId, timestamp},
    resources::Resources,
};

/// The sidecars connected right now.
#[derive(Default)]
pub struct Sidecars {
    connected: Mutex<HashMap<SessionId, Arc<SidecarRecord>>>,
    /// This replica's id, when replicas share a store.
    replica: std::sync::OnceLock<String>,
    /// The sidecars of the other replicas, as they record them in the store, by key.
    remote: Mutex<HashMap<String, v1::SidecarStatus>>,
}

/// One connected sidecar, updated by its session as pushes go out and answers come back.
pub struct SidecarRecord {
    pub node_id: String,
    pub service: String,
    pub instance_id: Option<String>,
    pub peer: String,
    pub build: String,
    pub connected_at: SystemTime,
    /// The id of the token the stream was opened with; empty without authentication.
    pub token_id: String,
    /// How far its config has come; its session writes it.
    pub(crate) progress: Progress,
}

impl SidecarRecord {
    /// A record for a sidecar that just said Hello.
    pub fn new(
        node_id: String,
        service: String,
        instance_id: Option<String>,
        peer: String,
        build: String,
        token_id: String,
    ) -> Self {
        Self {
            node_id,
            service,
            instance_id,
            peer,
            build,
            connected_at: SystemTime::now(),
            token_id,
            progress: Progress::default(),
        }
    }

    fn to_proto(&self, registry: &Registry, resources: &Resources, authority: &Authority) -> v1::SidecarStatus {
        let own = resources.config(&self.service);
        let progress = self.progress.snapshot();
        let mut subscriptions: Vec<_> = progress
            .services
            .iter()
            .map(|(service, p)| {
                let config = resources.config(service);
                let part = |current: u64, of: fn(&Held) -> Option<u64>| {
                    let versions = Versions {
                        sent: p.sent.as_ref().and_then(of),
                        acked: p.acked.as_ref().and_then(of),
                        rejected: p.rejected.as_ref().and_then(of),
                    };
                    resource_progress(current, versions)
                };
                v1::SubscriptionStatus {
                    service: service.to_string(),
                    current_version: registry.snapshot(service).map_or(0, |s| s.version()).max(config.version),
                    sent_version: p.sent.map_or(0, |h| h.version),
                    acked_version: p.acked.map_or(0, |h| h.version),
                    route: Some(part(config.route_version, |h| h.route)),
                    policy: Some(part(config.policy_version, |h| h.policy)),
                }
            })
            .collect();
        subscriptions.sort_by(|a, b| a.service.cmp(&b.service));
        let base = self.identity(authority, &progress);
        v1::SidecarStatus {
            subscriptions,
            last_nack: progress.last_nack,
            authorization: Some(resource_progress(own.authorization_version, progress.authorization)),
            remote: false,
            ..base
        }
    }

    /// What other replicas are told of it: who it is, what it subscribes to, what it trusts
    /// and holds; not how far each push has come, which changes with every push.
    fn to_record(&self, authority: &Authority) -> v1::SidecarStatus {
        let progress = self.progress.snapshot();
        let mut subscriptions: Vec<v1::SubscriptionStatus> = progress
            .services
            .keys()
            .map(|service| v1::SubscriptionStatus { service: service.to_string(), ..Default::default() })
            .collect();
        subscriptions.sort_by(|a, b| a.service.cmp(&b.service));
        v1::SidecarStatus { subscriptions, remote: true, ..self.identity(authority, &progress) }
    }

    /// Who it is, what it trusts and which leaf it holds: what status and records share.
    fn identity(&self, authority: &Authority, progress: &ProgressSnapshot) -> v1::SidecarStatus {
        let issued = authority.issued(&self.node_id);
        v1::SidecarStatus {
            node_id: self.node_id.clone(),
            service: self.service.clone(),
            instance_id: self.instance_id.clone().unwrap_or_default(),
            peer: self.peer.clone(),
            build: self.build.clone(),
            connected_at: Some(timestamp(self.connected_at)),
            trust_bundle_sent: progress.trust_bundle.sent.unwrap_or(0),
            trust_bundle_acked: progress.trust_bundle.acked.unwrap_or(0),
            identity: issued.as_ref().map(|i| i.identity.clone()).unwrap_or_default(),
            certificate_serial: issued.as_ref().map(|i| i.serial.clone()).unwrap_or_default(),
            certificate_issuer_sha256: issued.as_ref().map(|i| crate::ca::issuer_sha256(&i.issuer_pem)).unwrap_or_default(),
            certificate_not_after: issued.map(|i| timestamp(i.not_after)),
            token_id: self.token_id.clone(),
            ..Default::default()
        }
    }
}

/// One part's progress as status shows it: 0 for what never happened.
fn resource_progress(current: u64, versions: Versions<u64>) -> v1::ResourceProgress {
    v1::ResourceProgress {
        current_version: current,
        sent_version: versions.sent.unwrap_or(0),
        acked_version: versions.acked.unwrap_or(0),
        rejected_version: versions.rejected.unwrap_or(0),
    }
}

impl Sidecars {
    /// Adds a connected sidecar; it is listed until the guard is dropped.
    pub fn connect(self: &Arc<Self>, session: SessionId, record: Arc<SidecarRecord>) -> ConnectedGuard {
        lock(&self.connected).insert(session, record);
        ConnectedGuard { sidecars: self.clone(), session }
    }

    /// Every connected sidecar, by node id.
    pub fn list(&self, registry: &Registry, resources: &Resources, authority: &Authority) -> Vec<v1::SidecarStatus> {
        let records: Vec<_> = lock(&self.connected).values().cloned().collect();
        let replica = self.replica.get().cloned().unwrap_or_default();
        let mut list: Vec<_> = records
            .iter()
            .map(|r| v1::SidecarStatus { replica: replica.clone(), ..r.to_proto(registry, resources, authority) })
            .collect();
        list.extend(lock(&self.remote).values().cloned());
        list.sort_by(|a, b| (&a.node_id, &a.replica).cmp(&(&b.node_id, &b.replica)));
        list
    }

    /// The records of the sidecars connected to this replica, for the others to show.
    pub fn records(&self, authority: &Authority) -> Vec<v1::SidecarStatus> {
        let replica = self.replica.get().cloned().unwrap_or_default();
        let records: Vec<_> = lock(&self.connected).values().cloned().collect();
        records.iter().map(|r| v1::SidecarStatus { replica: replica.clone(), ..r.to_record(authority) }).collect()
    }

    /// Names the replica these sidecars are connected to.
    pub fn set_replica(&self, replica: &str) {
        let _ = self.replica.set(replica.to_owned());
    }

    /// Records (or with `None` forgets) a sidecar of another replica under `key`.
    pub fn set_remote(&self, key: &str, status: Option<v1::SidecarStatus>) {
        let mut remote = lock(&self.remote);
        match status {
            Some(status) if Some(&status.replica) != self.replica.get() => {
                remote.insert(key.to_owned(), status);
            }
            Some(_) => {}
            None => {
                remote.remove(key);
            }
        }
    }

    /// Forgets every sidecar of other replicas, before loading them again.
    pub fn clear_remote(&self) {
        lock(&self.remote).clear();
    }

    /// The leaves the sidecars of other replicas hold, as their sessions record them.
    pub fn remote_leaves(&self) -> Vec<crate::ca::RemoteLeaf> {
        lock(&self.remote)
            .values()
            .filter(|r| !r.certificate_issuer_sha256.is_empty())
            .map(|r| crate::ca::RemoteLeaf {
                node_id: r.node_id.clone(),
                issuer_sha256: r.certificate_issuer_sha256.clone(),
                not_after: r.certificate_not_after.map(ferry_proto::time::system_time).unwrap_or(std::time::UNIX_EPOCH),
            })
            .collect()
    }

    /// The node ids of the connected sidecars (this replica's).
    pub fn node_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.connected).values().map(|r| r.node_id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Whether every connected sidecar has acknowledged trust bundle `version` or a later one,
    /// those of the other replicas included (as their sessions last recorded it).
    pub fn all_trust(&self, version: u64) -> bool {
        lock(&self.connected).values().all(|r| r.progress.part(Part::TrustBundle).acked.unwrap_or(0) >= version)
            && lock(&self.remote).values().all(|r| r.trust_bundle_acked >= version)
    }

    /// The services of the sidecars subscribed to `service`: its callers now, on every replica.
    pub fn callers(&self, service: &str) -> std::collections::BTreeSet<String> {
        let mut callers: std::collections::BTreeSet<String> =
            lock(&self.connected).values().filter(|r| r.progress.subscribes_to(service)).map(|r| r.service.clone()).collect();
        let remote = lock(&self.remote);
        callers
            .extend(remote.values().filter(|r| r.subscriptions.iter().any(|s| s.service == service)).map(|r| r.service.clone()));
        callers
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
