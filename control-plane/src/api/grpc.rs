//! gRPC `ferry.v1.Registry`.

use std::{pin::Pin, sync::Arc};

use ferry_proto::{
    v1::{self, registry_server::Registry as RegistryApi},
    validate,
};
use futures::StreamExt;
use tokio_stream::{Stream, wrappers::WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{instances_response, registry_status, services_response};
use crate::registry::{InstanceSpec, Registry};

/// The gRPC `Registry` service.
#[derive(Clone)]
pub struct RegistryService {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

impl RegistryService {
    /// A service whose watch streams end when `shutdown` fires.
    pub fn new(registry: Arc<Registry>, shutdown: CancellationToken) -> Self {
        Self { registry, shutdown }
    }
}

type WatchResponses = Pin<Box<dyn Stream<Item = Result<v1::ListInstancesResponse, Status>> + Send>>;

fn invalid(error: validate::FieldError) -> Status {
    Status::invalid_argument(error.to_string())
}

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    type WatchStream = WatchResponses;

    async fn register(&self, request: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let instance = request.into_inner().instance.ok_or_else(|| Status::invalid_argument("instance: required"))?;
        let spec = InstanceSpec::try_from(instance).map_err(|e| invalid(e.within("instance")))?;
        let instance = self.registry.register(spec).await.map_err(|e| registry_status(e, "instance"))?;
        tracing::info!(id = %instance.id, service = %instance.service, "registered through the API");
        Ok(Response::new(v1::RegisterResponse { instance: Some(instance.to_proto()) }))
    }

    async fn deregister(&self, request: Request<v1::DeregisterRequest>) -> Result<Response<v1::DeregisterResponse>, Status> {
        let id = request.into_inner().id;
        validate::instance_id("id", &id).map_err(invalid)?;
        let removed = self.registry.deregister(&id).await.map_err(|e| registry_status(e, ""))?;
        tracing::info!(id = %removed.id, service = %removed.service, "deregistered through the API");
        Ok(Response::new(v1::DeregisterResponse { instance: Some(removed.to_proto()) }))
    }

    async fn list_services(
        &self,
        _request: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        Ok(Response::new(services_response(self.registry.services())))
    }

    async fn list_instances(
        &self,
        request: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        let request = request.into_inner();
        validate::service_name("service", &request.service).map_err(invalid)?;
        match self.registry.snapshot(&request.service) {
            Some(snapshot) if snapshot.exists() => Ok(Response::new(instances_response(&snapshot, request.passing_only))),
            _ => Err(Status::not_found(format!("service {:?} has no instances", request.service))),
        }
    }

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        validate::service_name("service", &request.service).map_err(invalid)?;
        let passing_only = request.passing_only;
        let updates = WatchStream::new(self.registry.watch(&request.service))
            .map(move |snapshot| Ok(instances_response(&snapshot, passing_only)))
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(updates)))
    }
}
