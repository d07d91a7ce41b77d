//! Instances bound to a sidecar's stream. The stream holds the instance's lease; a stream that
//! breaks without goodbye leaves the instance critical and removed after the reconnect grace
//! period, unless its sidecar comes back (and takes the lease again) first.

use std::sync::Arc;

use ferry_health::Health;
use ferry_proto::validate::FieldError;

use super::{Instance, InstanceSpec, Mutation, Origin, Registry, RegistryError, SessionId, instance_key};

/// Who holds an instance's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lease {
    /// The stream of this session holds it.
    Attached(SessionId),
    /// The stream is gone; the instance is removed when the timer of this epoch fires.
    Detached { epoch: u64 },
}

impl Registry {
    /// Registers the instance of a sidecar's app under a lease held by `session`.
    ///
    /// A sidecar that reconnects (same id) takes its instance back, cancelling its removal.
    pub fn attach(
        &self,
        session: SessionId,
        node_id: &str,
        spec: InstanceSpec,
        health: Health,
    ) -> Result<Arc<Instance>, RegistryError> {
        let mut state = self.lock();
        self.admit(&state, &spec)?;
        let existing = state.current(&spec.id);
        if let Some(existing) = &existing
            && existing.node_id().is_none()
        {
            return Err(FieldError::new("id", format!("{:?} is registered through the API", spec.id)).into());
        }
        state.leases.insert(spec.id.clone(), Lease::Attached(session));
        let origin = Origin::Sidecar { node_id: node_id.to_owned() };
        let replica = self.replica().unwrap_or_default().to_owned();
        match existing {
            Some(existing)
                if existing.matches(&spec)
                    && existing.origin == origin
                    && existing.health == health
                    && existing.replica == replica =>
            {
                Ok(existing)
            }
            _ => {
                let mut instance = Instance::new(spec, origin, health);
                instance.replica = replica;
                let key = instance_key(&instance);
                let (instance, _) = self.commit(&mut state, Mutation::Upsert(Box::new(instance)), &key);
                Ok(instance.expect("an upsert yields the instance"))
            }
        }
    }

    /// Ends `session`'s lease on instance `id`. With `goodbye` the instance is removed at once;
    /// otherwise it turns critical and is removed after the reconnect grace period.
    pub fn detach(&self, session: SessionId, id: &str, goodbye: bool) {
        let mut state = self.lock();
        if state.leases.get(id) != Some(&Lease::Attached(session)) {
            return; // A newer stream holds the lease, or the instance was deregistered.
        }
        let Some(existing) = state.current(id) else {
            state.leases.remove(id);
            return;
        };
        let key = (existing.service.clone(), id.to_owned());
        state.held.remove(id);
        if goodbye {
            state.leases.remove(id);
            self.commit(&mut state, Mutation::Remove, &key);
            return;
        }
        let epoch = state.new_epoch();
        state.leases.insert(id.to_owned(), Lease::Detached { epoch });
        if existing.health != Health::Critical {
            let mut instance = (*existing).clone();
            instance.health = Health::Critical;
            self.commit(&mut state, Mutation::Upsert(Box::new(instance)), &key);
        }
        drop(state);
        self.expire_later(id.to_owned(), epoch);
    }

    /// Removes instance `id` after the reconnect grace period, unless its lease has moved on
    /// from `epoch` by then.
    pub(super) fn expire_later(&self, id: String, epoch: u64) {
        let registry = self.this.clone();
        let grace = self.config.reconnect_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(registry) = registry.upgrade() {
                registry.expire(&id, epoch);
            }
        });
    }

    fn expire(&self, id: &str, epoch: u64) {
        let mut state = self.lock();
        if state.leases.get(id) != Some(&Lease::Detached { epoch }) {
            return; // The sidecar came back, or the instance is gone already.
        }
        state.leases.remove(id);
        if let Some(existing) = state.current(id) {
            tracing::info!(id, service = %existing.service, "removing instance: its sidecar did not reconnect");
            self.commit(&mut state, Mutation::Remove, &(existing.service.clone(), id.to_owned()));
        }
    }
}
