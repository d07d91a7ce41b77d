//! The control plane's APIs: gRPC `ferry.v1.Registry` and the HTTP/JSON API. Both validate at
//! the edge, call the [`Registry`](crate::registry::Registry) and translate its answers, so they
//! cannot drift apart.

use ferry_proto::v1;
use tonic::Status;

use crate::registry::{RegistryError, ServiceSnapshot, ServiceSummary};

pub mod grpc;
pub mod http;

/// The gRPC status for a registry error; field errors are reported under `prefix`.
pub fn registry_status(error: RegistryError, prefix: &str) -> Status {
    match error {
        RegistryError::Invalid(field) => Status::invalid_argument(field.within(prefix).to_string()),
        RegistryError::NotFound(_) => Status::not_found(error.to_string()),
        RegistryError::Unavailable(_) => Status::unavailable(error.to_string()),
    }
}

/// A service's instances as the API shows them.
pub fn instances_response(snapshot: &ServiceSnapshot, routable_only: bool) -> v1::ListInstancesResponse {
    v1::ListInstancesResponse {
        service: snapshot.name.to_string(),
        index: snapshot.index,
        instances: snapshot
            .instances
            .values()
            .filter(|i| !routable_only || i.health.is_routable())
            .map(|i| i.to_proto())
            .collect(),
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
            })
            .collect(),
    }
}
