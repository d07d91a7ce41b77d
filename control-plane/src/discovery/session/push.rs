//! What one push carries: every dirty service the sidecar does not hold as it is now, each as a
//! delta from what the sidecar holds when that is smaller, else as a snapshot, with its route and
//! policy when they changed, and always its virtual IP; the trust bundle and the authorization
//! policy when they changed; and, for a sidecar that intercepts, the address table when it
//! changed.

use std::sync::Arc;

use ferry_proto::v1::{self, control_message, service_resources::Endpoints};
use prost::Message;
use tokio::time::Instant;

use super::{InFlight, Session, Subscription};
use crate::{
    discovery::progress::{Held, Part},
    metrics::KindLabels,
    registry::ServiceSnapshot,
};

impl Session {
    /// Builds one push of every dirty service whose version the sidecar does not hold.
    pub(super) fn build_push(&mut self) -> Option<v1::ControlMessage> {
        self.dirty_since = None;
        self.follow_dependencies();
        let now = Instant::now();
        let mut resources = Vec::new();
        let mut carried = Vec::new();
        for (name, subscription) in &mut self.subscriptions {
            if !std::mem::take(&mut subscription.dirty) {
                continue;
            }
            let version = subscription.version();
            if subscription.held.map(|h| h.version) == Some(version) || subscription.rejected_snapshot == Some(version) {
                continue;
            }
            let base = subscription.held.filter(|_| !subscription.needs_full);
            let (service_resources, full) = resources_for(name, subscription, base);
            let kind = match &service_resources.endpoints {
                Some(Endpoints::Delta(_)) => "delta",
                Some(Endpoints::Snapshot(_)) => "snapshot",
                None => "absent",
            };
            self.metrics.resources.get_or_create(&KindLabels { kind }).inc();
            resources.push(service_resources);
            let held = subscription.current();
            carried.push((name.clone(), held, full));
            subscription.held = Some(held);
            self.record.progress.sent(name, held);
            let due_since = subscription.endpoints.changed_at.max(subscription.subscribed_at);
            self.metrics.propagation.observe(now.saturating_duration_since(due_since).as_secs_f64());
        }
        let trust_bundle = self.bundle.as_ref().filter(|b| self.bundle_held != Some(b.version)).map(|b| (**b).clone());
        let authorization_rejected = self.record.progress.part(Part::Authorization).rejected;
        let authorization = self
            .own
            .as_ref()
            .filter(|own| {
                self.authorization_held != Some(own.authorization_version)
                    && authorization_rejected != Some(own.authorization_version)
            })
            .map(|own| v1::AuthorizationUpdate {
                policy: own.authorization.as_deref().cloned(),
                version: own.authorization_version,
            });
        let addresses = self.addresses.as_mut().and_then(|feed| feed.next_update());
        if resources.is_empty() && trust_bundle.is_none() && authorization.is_none() && addresses.is_none() {
            return None;
        }
        let bundle = trust_bundle.as_ref().map(|b| b.version);
        if let Some(version) = bundle {
            self.bundle_held = Some(version);
            self.record.progress.part_sent(Part::TrustBundle, version);
        }
        let authorization_version = authorization.as_ref().map(|a| a.version);
        if let Some(version) = authorization_version {
            self.authorization_held = Some(version);
            self.record.progress.part_sent(Part::Authorization, version);
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        self.last_push = Some(now);
        let addresses_carried = addresses.as_ref().map(|table| (table.version, table.full));
        self.remember(InFlight {
            nonce: nonce.clone(),
            sent_at: now,
            carried,
            bundle,
            authorization: authorization_version,
            addresses: addresses_carried,
        });
        let push = v1::Push { nonce, resources, trust_bundle, authorization, addresses };
        let message = v1::ControlMessage { message: Some(control_message::Message::Push(push)) };
        self.metrics.pushes.inc();
        self.metrics.bytes.inc_by(message.encoded_len() as u64);
        Some(message)
    }
}

/// The resources of one service for a sidecar holding `base` (everything when `None`), and
/// whether they carry everything (nothing built on what the sidecar holds).
fn resources_for(name: &Arc<str>, subscription: &Subscription, base: Option<Held>) -> (v1::ServiceResources, bool) {
    let snapshot = &subscription.endpoints;
    let config = &subscription.config;
    let version = subscription.version();
    let endpoints = match base {
        _ if !snapshot.exists() => None,
        Some(base) => match base.endpoints {
            // Unchanged endpoints: an empty delta, so the route can move on its own.
            Some(held) if held == snapshot.index => Some(Endpoints::Delta(v1::EndpointDelta {
                base_version: base.version,
                upserted: Vec::new(),
                removed: Vec::new(),
            })),
            Some(held) => delta(snapshot, held, base.version),
            None => None,
        },
        None => None,
    }
    .or_else(|| {
        snapshot.exists().then(|| {
            Endpoints::Snapshot(v1::Endpoints { endpoints: snapshot.instances.values().map(|i| i.to_endpoint()).collect() })
        })
    });
    let route = (base.and_then(|b| b.route) != Some(config.route_version))
        .then(|| v1::RouteUpdate { route: config.route.as_deref().cloned() });
    let policy = (base.and_then(|b| b.policy) != Some(config.policy_version))
        .then(|| v1::PolicyUpdate { policy: config.policy.as_deref().cloned() });
    let full = base.is_none();
    (
        v1::ServiceResources {
            service: name.to_string(),
            version,
            exists: snapshot.exists(),
            endpoints,
            route,
            policy,
            virtual_ip: snapshot.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        },
        full,
    )
}

/// The endpoint changes since index `held`, as a delta from the service version `base_version`,
/// when the change log reaches back that far and the delta is smaller than the whole set.
fn delta(snapshot: &ServiceSnapshot, held: u64, base_version: u64) -> Option<Endpoints> {
    let delta = snapshot.changes_since(held)?;
    (delta.upserted.len() + delta.removed.len() < snapshot.instances.len()).then(|| {
        Endpoints::Delta(v1::EndpointDelta {
            base_version,
            upserted: delta.upserted.iter().map(|i| i.to_endpoint()).collect(),
            removed: delta.removed,
        })
    })
}
