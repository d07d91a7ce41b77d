//! What the registry refuses before it changes anything: an id or a check id that another
//! instance owns, and an instance beyond the registry's limits.

use ferry_health::Health;
use ferry_proto::validate::FieldError;

use super::{Instance, InstanceSpec, Origin, Registry, State};

impl Registry {
    /// Refuses `spec` when its id or one of its check ids belongs to another instance, or when it
    /// would take the registry past one of its limits.
    pub(super) fn admit(&self, state: &State, spec: &InstanceSpec) -> Result<(), FieldError> {
        state.check_id(spec)?;
        state.check_check_ids(spec)?;
        self.check_limits(state, spec)
    }

    /// Refuses an instance beyond the registry's limits, naming the limit and its flag.
    fn check_limits(&self, state: &State, spec: &InstanceSpec) -> Result<(), FieldError> {
        let config = &self.config;
        if spec.checks.len() > config.max_checks {
            return Err(FieldError::new(
                "checks",
                format!("at most {} checks per instance (--max-checks), got {}", config.max_checks, spec.checks.len()),
            ));
        }
        let metadata: usize = spec.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if metadata > config.max_metadata_bytes {
            return Err(FieldError::new(
                "metadata",
                format!(
                    "{metadata} bytes of keys and values; at most {} per instance (--max-metadata-bytes)",
                    config.max_metadata_bytes
                ),
            ));
        }
        let Some(entry) = state.services.get(&spec.service) else { return Ok(()) };
        let snapshot = entry.tx.borrow();
        let existing = snapshot.instances.get(&spec.id);
        if existing.is_none() && snapshot.instances.len() >= config.max_instances_per_service {
            return Err(FieldError::new(
                "service",
                format!(
                    "{} already has {} instances, the most one service may have (--max-instances-per-service)",
                    spec.service,
                    snapshot.instances.len()
                ),
            ));
        }
        let added = Instance::new(spec.clone(), Origin::Api, Health::Passing).endpoint_bytes();
        let bytes = snapshot.encoded_bytes.saturating_sub(existing.map_or(0, |i| i.endpoint_bytes())) + added;
        if bytes > config.max_push_bytes {
            return Err(FieldError::new(
                "service",
                format!(
                    "{}'s endpoints would take {bytes} bytes in a push, more than the {} sidecars accept (--max-push-bytes)",
                    spec.service, config.max_push_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl State {
    /// Refuses an id that another service already uses.
    fn check_id(&self, spec: &InstanceSpec) -> Result<(), FieldError> {
        match self.ids.get(&spec.id) {
            Some(service) if *service != spec.service => {
                Err(FieldError::new("id", format!("{:?} is already registered for service {service:?}", spec.id)))
            }
            _ => Ok(()),
        }
    }

    /// Refuses check ids that another instance already uses.
    fn check_check_ids(&self, spec: &InstanceSpec) -> Result<(), FieldError> {
        for (i, check) in spec.checks.iter().enumerate() {
            match self.check_owners.get(&check.id) {
                Some(owner) if *owner != spec.id => {
                    return Err(FieldError::new(
                        format!("checks[{i}].id"),
                        format!("{:?} is already a check of instance {owner:?}", check.id),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}
