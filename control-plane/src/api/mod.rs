//! The control plane's APIs: gRPC `ferry.v1.Registry` and the HTTP/JSON API. Both validate at
//! the edge, call the [`Registry`] and translate its answers, so they cannot drift apart.

use std::collections::BTreeMap;

use ferry_proto::{
    v1,
    validate::{self, FieldError},
};
use tonic::Status;

use crate::{
    auth::{Denied, Principal},
    registry::{Instance, Registry, RegistryError, ServiceSnapshot, ServiceSummary},
};

pub mod consul;
pub mod grpc;
pub mod http;
pub mod json;
pub mod resources;
pub mod security;
pub mod ui;

/// Whether `principal` may deregister `instance`: one a sidecar registered is its stream's, and
/// only an admin may remove it through the API; one registered through the API may be removed
/// by whoever may act for its service.
pub fn may_deregister(principal: &Principal, instance: Option<&Instance>) -> Result<(), Denied> {
    match instance {
        Some(instance) if instance.node_id().is_some() => {
            principal.require_admin("deregistering an instance its sidecar registered (it belongs to the sidecar's stream)")
        }
        Some(instance) => principal.require_service(&instance.service, "deregistering an instance"),
        // Nothing to remove: whoever may remove instances at all hears that it is not there.
        None => match principal {
            Principal::Read { .. } => Err(Denied(format!(
                "deregistering an instance needs an admin or sidecar token; this is {}",
                principal.describe()
            ))),
            _ => Ok(()),
        },
    }
}

/// Why deregistering `instance` without `force` is refused: its sidecar registered it and keeps
/// it while connected, and would not register it again (it is out of the mesh until the sidecar
/// reconnects), so removing it by hand is almost always a mistake.
pub fn sidecar_owned(instance: Option<&Instance>, force: bool) -> Option<String> {
    let instance = instance?;
    let node = instance.node_id().filter(|_| !force)?;
    Some(format!(
        "instance {:?} belongs to sidecar {node:?}, which registered it on its config stream and keeps it while \
         connected; removed, it is out of the mesh until that sidecar reconnects. To take it out, drain the sidecar \
         (POST /shutdown on its admin listener, or stop it); to remove it anyway, deregister with force \
         (ferryctl deregister --force, ?force=true)",
        instance.id
    ))
}

/// The gRPC status for a registry error; field errors are reported under `prefix`.
pub fn registry_status(error: RegistryError, prefix: &str) -> Status {
    match error {
        RegistryError::Invalid(field) => Status::invalid_argument(field.within(prefix).to_string()),
        RegistryError::NotFound(_) => Status::not_found(error.to_string()),
        RegistryError::Unavailable(_) => Status::unavailable(error.to_string()),
    }
}

/// Which instances of a service a query wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only instances that can take traffic.
    pub routable_only: bool,
    /// Only instances carrying every one of these labels.
    pub metadata: BTreeMap<String, String>,
    /// Only instances in this zone.
    pub zone: Option<String>,
}

impl Filter {
    /// A filter from the fields of a gRPC request.
    pub fn from_request(
        routable_only: bool,
        metadata: &std::collections::HashMap<String, String>,
        zone: &str,
    ) -> Result<Self, FieldError> {
        validate::metadata("metadata", metadata)?;
        validate::locality("zone", zone)?;
        Ok(Self {
            routable_only,
            metadata: metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            zone: Some(zone.to_owned()).filter(|z| !z.is_empty()),
        })
    }

    /// Whether `instance` passes the filter.
    pub fn accepts(&self, instance: &Instance) -> bool {
        (!self.routable_only || instance.health.is_routable())
            && self.zone.as_ref().is_none_or(|zone| instance.zone == *zone)
            && self.metadata.iter().all(|(k, v)| instance.metadata.get(k) == Some(v))
    }
}

/// A service's instances as the API shows them, with their checks' status.
pub fn instances_response(registry: &Registry, snapshot: &ServiceSnapshot, filter: &Filter) -> v1::ListInstancesResponse {
    v1::ListInstancesResponse {
        service: snapshot.name.to_string(),
        index: snapshot.index,
        instances: snapshot.instances.values().filter(|i| filter.accepts(i)).map(|i| registry.describe(i)).collect(),
    }
}

/// The service list as the API shows it.
pub fn services_response(services: Vec<ServiceSummary>) -> v1::ListServicesResponse {
    v1::ListServicesResponse {
        services: services
            .into_iter()
            .map(|s| v1::ServiceSummary {
                name: s.name.to_string(),
                index: s.index,
                instances: u32::try_from(s.instances).unwrap_or(u32::MAX),
                passing: u32::try_from(s.routable).unwrap_or(u32::MAX),
                virtual_ip: s.virtual_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            })
            .collect(),
    }
}

/// The health a TTL renewal sets, from the API's value.
pub fn ttl_status(field: &str, value: i32) -> Result<ferry_health::Health, FieldError> {
    match ferry_health::Health::try_from(value) {
        Ok(health @ (ferry_health::Health::Passing | ferry_health::Health::Warning | ferry_health::Health::Critical)) => {
            Ok(health)
        }
        _ => Err(FieldError::new(field, "must be HEALTH_PASSING, HEALTH_WARNING or HEALTH_CRITICAL")),
    }
}
