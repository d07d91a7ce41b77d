//! How far one sidecar's config has come: for each service it subscribed to, and for the trust
//! bundle and its own service's authorization policy, the versions sent, acknowledged and
//! rejected, and its last NACK.
//!
//! Its session writes it as pushes go out and answers come back; `ferryctl status` reads a copy.
//! It records what happened and decides nothing: what the next push builds on (what the sidecar
//! will hold once the pushes in flight land) is the session's to work out.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use ferry_proto::v1;

/// What the sidecar holds of a service (or will, once the pushes in flight land).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// The service's version: the largest of the parts'.
    pub(crate) version: u64,
    /// The registry index of the endpoints; `None` when only the version is known (from Hello).
    pub(crate) endpoints: Option<u64>,
    pub(crate) route: Option<u64>,
    pub(crate) policy: Option<u64>,
}

impl Held {
    /// Only the version is known: every part must be sent if it changed.
    pub(crate) fn version_only(version: u64) -> Self {
        Self { version, endpoints: None, route: None, policy: None }
    }
}

/// The last of one thing that was sent to a sidecar, that it acknowledged, and that it rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Versions<T> {
    pub(crate) sent: Option<T>,
    pub(crate) acked: Option<T>,
    pub(crate) rejected: Option<T>,
}

impl<T> Default for Versions<T> {
    fn default() -> Self {
        Self { sent: None, acked: None, rejected: None }
    }
}

/// What every push carries besides services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The mesh's trust bundle, by version.
    TrustBundle,
    /// The authorization policy of the sidecar's own service, by version.
    Authorization,
}

/// A copy of one sidecar's progress.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProgressSnapshot {
    /// Per subscribed service.
    pub(crate) services: HashMap<Arc<str>, Versions<Held>>,
    pub(crate) trust_bundle: Versions<u64>,
    pub(crate) authorization: Versions<u64>,
    pub(crate) last_nack: Option<v1::NackStatus>,
}

/// One sidecar's progress: written by its session, read by status.
#[derive(Default)]
pub(crate) struct Progress {
    state: Mutex<ProgressSnapshot>,
}

impl Progress {
    fn lock(&self) -> MutexGuard<'_, ProgressSnapshot> {
        ferry_runtime::lock(&self.state)
    }

    /// The sidecar subscribed to `service`, holding `held` of it already (from its Hello).
    pub(crate) fn subscribed(&self, service: &Arc<str>, held: Option<Held>) {
        self.lock().services.insert(service.clone(), Versions { sent: held, acked: held, rejected: None });
    }

    pub(crate) fn unsubscribed(&self, service: &str) {
        self.lock().services.remove(service);
    }

    /// Records `held` of `service` as sent, acknowledged or rejected, as `versions` picks.
    fn service(&self, service: &str, held: Held, versions: fn(&mut Versions<Held>) -> &mut Option<Held>) {
        if let Some(entry) = self.lock().services.get_mut(service) {
            *versions(entry) = Some(held);
        }
    }

    pub(crate) fn sent(&self, service: &str, held: Held) {
        self.service(service, held, |v| &mut v.sent);
    }

    pub(crate) fn acked(&self, service: &str, held: Held) {
        self.service(service, held, |v| &mut v.acked);
    }

    pub(crate) fn rejected(&self, service: &str, held: Held) {
        self.service(service, held, |v| &mut v.rejected);
    }

    /// What the sidecar last acknowledged of `service`.
    pub(crate) fn acknowledged(&self, service: &str) -> Option<Held> {
        self.lock().services.get(service).and_then(|v| v.acked)
    }

    /// The versions of `part`.
    pub(crate) fn part(&self, part: Part) -> Versions<u64> {
        let state = self.lock();
        match part {
            Part::TrustBundle => state.trust_bundle,
            Part::Authorization => state.authorization,
        }
    }

    /// Records `version` of `part` as sent, acknowledged or rejected, as `versions` picks.
    fn update_part(&self, part: Part, version: u64, versions: fn(&mut Versions<u64>) -> &mut Option<u64>) {
        let mut state = self.lock();
        let entry = match part {
            Part::TrustBundle => &mut state.trust_bundle,
            Part::Authorization => &mut state.authorization,
        };
        *versions(entry) = Some(version);
    }

    pub(crate) fn part_sent(&self, part: Part, version: u64) {
        self.update_part(part, version, |v| &mut v.sent);
    }

    pub(crate) fn part_acked(&self, part: Part, version: u64) {
        self.update_part(part, version, |v| &mut v.acked);
    }

    pub(crate) fn part_rejected(&self, part: Part, version: u64) {
        self.update_part(part, version, |v| &mut v.rejected);
    }

    pub(crate) fn nacked(&self, nack: v1::NackStatus) {
        self.lock().last_nack = Some(nack);
    }

    /// Whether the sidecar is subscribed to `service`.
    pub(crate) fn subscribes_to(&self, service: &str) -> bool {
        self.lock().services.contains_key(service)
    }

    /// A copy, so readers never hold the session up.
    pub(crate) fn snapshot(&self) -> ProgressSnapshot {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(version: u64) -> Held {
        Held { version, endpoints: Some(version), route: Some(0), policy: Some(0) }
    }

    #[test]
    fn a_service_is_tracked_from_its_subscription_to_its_unsubscription() {
        let progress = Progress::default();
        let catalog: Arc<str> = "catalog".into();
        progress.sent(&catalog, held(1));
        assert!(!progress.subscribes_to("catalog"), "nothing is recorded for a service not subscribed to");

        progress.subscribed(&catalog, Some(Held::version_only(3)));
        assert_eq!(progress.acknowledged("catalog"), Some(Held::version_only(3)), "what Hello said it holds");
        progress.sent(&catalog, held(5));
        progress.rejected(&catalog, held(5));
        progress.sent(&catalog, held(6));
        progress.acked(&catalog, held(6));
        let snapshot = progress.snapshot();
        assert_eq!(snapshot.services[&catalog], Versions { sent: Some(held(6)), acked: Some(held(6)), rejected: Some(held(5)) });

        progress.unsubscribed("catalog");
        assert!(!progress.subscribes_to("catalog"));
        assert_eq!(progress.acknowledged("catalog"), None);
    }

    #[test]
    fn the_parts_besides_services_are_tracked_apart() {
        let progress = Progress::default();
        assert_eq!(progress.part(Part::Authorization), Versions::default(), "nothing sent yet is not version 0");
        progress.part_sent(Part::TrustBundle, 2);
        progress.part_acked(Part::TrustBundle, 2);
        progress.part_sent(Part::Authorization, 7);
        progress.part_rejected(Part::Authorization, 7);
        assert_eq!(progress.part(Part::TrustBundle), Versions { sent: Some(2), acked: Some(2), rejected: None });
        assert_eq!(progress.part(Part::Authorization), Versions { sent: Some(7), acked: None, rejected: Some(7) });
    }
}
