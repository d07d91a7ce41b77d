//! The registry's model of an instance, and its conversions to and from `ferry.v1`.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ferry_health::{CheckSpec, Health, spec::assign_ids};
use ferry_proto::{
    v1,
    validate::{self, FieldError},
};

/// One registered instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub service: Arc<str>,
    pub address: String,
    pub port: u16,
    pub metadata: BTreeMap<String, String>,
    pub region: String,
    pub zone: String,
    pub weight: u32,
    pub health: Health,
    pub origin: Origin,
    pub registered_at: SystemTime,
    /// The registry index of this instance's last change.
    pub index: u64,
    /// The checks that decide its health; their status is kept beside the instance.
    pub checks: Vec<CheckSpec>,
    /// An API instance critical this long is removed.
    pub deregister_critical_after: Option<Duration>,
    /// The identity its sidecar proves with mTLS (`spiffe://...`); empty when it is reached in
    /// plaintext.
    pub identity: String,
    /// The replica whose stream holds a sidecar's instance (replicas on a shared store); empty
    /// otherwise.
    pub replica: String,
}

/// Who registered an instance, which decides its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Through the API: stored until deregistered.
    Api,
    /// By the sidecar `node_id` over its stream: ephemeral, bound to that stream.
    Sidecar { node_id: String },
}

/// A validated request to register an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    pub id: String,
    pub service: Arc<str>,
    pub address: String,
    pub port: u16,
    pub metadata: BTreeMap<String, String>,
    pub region: String,
    pub zone: String,
    pub weight: u32,
    pub checks: Vec<CheckSpec>,
    pub deregister_critical_after: Option<Duration>,
    /// Set by whoever attaches a sidecar's instance that serves mTLS; never taken from a
    /// request.
    pub identity: String,
}

impl TryFrom<v1::Instance> for InstanceSpec {
    type Error = FieldError;

    /// Validates a registration; an empty id becomes `service-address-port`.
    fn try_from(instance: v1::Instance) -> Result<Self, FieldError> {
        validate::instance(&instance)?;
        let port = u16::try_from(instance.port).map_err(|_| FieldError::new("port", "must be between 1 and 65535"))?;
        let id = if instance.id.is_empty() {
            format!("{}-{}-{}", instance.service, instance.address, instance.port)
        } else {
            instance.id
        };
        // A generated id can outgrow the limit with a long host name.
        validate::instance_id("id", &id)?;
        let mut checks = instance
            .checks
            .iter()
            .enumerate()
            .map(|(i, check)| CheckSpec::try_from(check).map_err(|e| e.within(&format!("checks[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        assign_ids(&id, &mut checks);
        for (i, check) in checks.iter().enumerate() {
            validate::instance_id(&format!("checks[{i}].id"), &check.id)?;
        }
        let deregister_critical_after = match &instance.deregister_critical_after {
            Some(after) => Some(validate::duration("deregister_critical_after", after)?),
            None => None,
        };
        Ok(Self {
            id,
            service: instance.service.into(),
            address: instance.address,
            port,
            metadata: instance.metadata.into_iter().collect(),
            region: instance.region,
            zone: instance.zone,
            weight: if instance.weight == 0 { validate::DEFAULT_WEIGHT } else { instance.weight },
            checks,
            deregister_critical_after,
            identity: String::new(),
        })
    }
}

impl Instance {
    /// A new instance from `spec`, not yet indexed.
    pub fn new(spec: InstanceSpec, origin: Origin, health: Health) -> Self {
        Self {
            id: spec.id,
            service: spec.service,
            address: spec.address,
            port: spec.port,
            metadata: spec.metadata,
            region: spec.region,
            zone: spec.zone,
            weight: spec.weight,
            health,
            origin,
            registered_at: SystemTime::now(),
            index: 0,
            checks: spec.checks,
            deregister_critical_after: spec.deregister_critical_after,
            identity: spec.identity,
            replica: String::new(),
        }
    }

    /// The node id of the owning sidecar, if any.
    pub fn node_id(&self) -> Option<&str> {
        match &self.origin {
            Origin::Sidecar { node_id } => Some(node_id),
            Origin::Api => None,
        }
    }

    /// Whether `spec` describes this instance as it is (so re-registering changes nothing).
    pub fn matches(&self, spec: &InstanceSpec) -> bool {
        self.id == spec.id
            && self.service == spec.service
            && self.address == spec.address
            && self.port == spec.port
            && self.metadata == spec.metadata
            && self.region == spec.region
            && self.zone == spec.zone
            && self.weight == spec.weight
            && self.checks == spec.checks
            && self.deregister_critical_after == spec.deregister_critical_after
            && self.identity == spec.identity
    }

    /// The instance as it is stored, its checks without status. The API shows it through
    /// [`Registry::describe`](super::Registry::describe), which adds the checks' status.
    pub fn to_proto(&self) -> v1::Instance {
        let (origin, node_id) = match &self.origin {
            Origin::Api => (v1::Origin::Api, String::new()),
            Origin::Sidecar { node_id } => (v1::Origin::Sidecar, node_id.clone()),
        };
        v1::Instance {
            id: self.id.clone(),
            service: self.service.to_string(),
            address: self.address.clone(),
            port: u32::from(self.port),
            metadata: self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            weight: self.weight,
            health: v1::Health::from(self.health) as i32,
            origin: origin as i32,
            node_id,
            registered_at: Some(timestamp(self.registered_at)),
            index: self.index,
            checks: self.checks.iter().map(CheckSpec::to_proto).collect(),
            deregister_critical_after: self.deregister_critical_after.map(ferry_health::spec::proto_duration),
            identity: self.identity.clone(),
            replica: self.replica.clone(),
        }
    }

    /// The instance as a sidecar sees it.
    pub fn to_endpoint(&self) -> v1::Endpoint {
        v1::Endpoint {
            id: self.id.clone(),
            address: self.address.clone(),
            port: u32::from(self.port),
            health: v1::Health::from(self.health) as i32,
            metadata: self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            weight: self.weight,
            identity: self.identity.clone(),
        }
    }

    /// The encoded size of the instance as a sidecar receives it, within a push.
    pub fn endpoint_bytes(&self) -> usize {
        use prost::Message;
        let len = self.to_endpoint().encoded_len();
        // The field's tag and length prefix.
        len + 1 + prost::length_delimiter_len(len)
    }

    /// Restores an instance from its stored form.
    pub fn from_stored(stored: v1::Instance) -> Result<Self, FieldError> {
        let health = Health::try_from(stored.health).map_err(|e| FieldError::new("health", e.to_string()))?;
        let origin = match v1::Origin::try_from(stored.origin) {
            Ok(v1::Origin::Sidecar) => Origin::Sidecar { node_id: stored.node_id.clone() },
            Ok(v1::Origin::Api) => Origin::Api,
            _ => return Err(FieldError::new("origin", format!("unknown origin {}", stored.origin))),
        };
        let registered_at = stored.registered_at.map(system_time).unwrap_or(UNIX_EPOCH);
        let index = stored.index;
        let identity = stored.identity.clone();
        let replica = stored.replica.clone();
        let mut spec = InstanceSpec::try_from(stored)?;
        spec.identity = if matches!(origin, Origin::Sidecar { .. }) { identity } else { String::new() };
        Ok(Self { registered_at, index, replica, ..Self::new(spec, origin, health) })
    }
}

pub use ferry_proto::time::{system_time, timestamp};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_round_trips() {
        let spec = InstanceSpec::try_from(v1::Instance {
            service: "db".into(),
            address: "db.internal".into(),
            port: 5432,
            metadata: [("version".to_owned(), "v2".to_owned())].into(),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(spec.id, "db-db.internal-5432");
        assert_eq!(spec.weight, validate::DEFAULT_WEIGHT);
        let mut instance = Instance::new(spec, Origin::Sidecar { node_id: "n1".into() }, Health::Warning);
        instance.index = 7;
        let restored = Instance::from_stored(instance.to_proto()).expect("restores");
        assert_eq!(
            restored.registered_at.duration_since(UNIX_EPOCH).ok(),
            instance.registered_at.duration_since(UNIX_EPOCH).ok()
        );
        assert_eq!(restored, instance);
    }
}
