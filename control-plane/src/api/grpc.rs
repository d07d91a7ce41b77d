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

use super::{Filter, instances_response, registry_status, services_response, ttl_status};
use crate::{
    auth::Principal,
    checks::{HealthChecks, TtlFailure},
    registry::{InstanceSpec, Registry},
};

/// The gRPC `Registry` service.
#[derive(Clone)]
pub struct RegistryService {
    registry: Arc<Registry>,
    checks: Arc<HealthChecks>,
    shutdown: CancellationToken,
}

impl RegistryService {
    /// A service whose watch streams end when `shutdown` fires.
    pub fn new(registry: Arc<Registry>, checks: Arc<HealthChecks>, shutdown: CancellationToken) -> Self {
        Self { registry, checks, shutdown }
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
        let principal = Principal::of(&request)?;
        let instance = request.into_inner().instance.ok_or_else(|| Status::invalid_argument("instance: required"))?;
        let spec = InstanceSpec::try_from(instance).map_err(|e| invalid(e.within("instance")))?;
        principal.require_service(&spec.service, "registering an instance")?;
        self.checks.admit(&spec).await.map_err(|e| invalid(e.within("instance")))?;
        let id = spec.id.clone();
        let registered = self.registry.register(spec).await;
        // Also when the store failed: the change is in memory, and the checks follow memory.
        self.checks.sync(&id);
        let instance = registered.map_err(|e| registry_status(e, "instance"))?;
        tracing::info!(id = %instance.id, service = %instance.service, "registered through the API");
        Ok(Response::new(v1::RegisterResponse { instance: Some(self.registry.describe(&instance)) }))
    }

    async fn deregister(&self, request: Request<v1::DeregisterRequest>) -> Result<Response<v1::DeregisterResponse>, Status> {
        let principal = Principal::of(&request)?;
        let v1::DeregisterRequest { id, force } = request.into_inner();
        validate::instance_id("id", &id).map_err(invalid)?;
        let existing = self.registry.instance(&id);
        super::may_deregister(&principal, existing.as_deref())?;
        if let Some(why) = super::sidecar_owned(existing.as_deref(), force) {
            return Err(Status::failed_precondition(why));
        }
        let removed = self.registry.deregister(&id).await;
        self.checks.sync(&id);
        let removed = removed.map_err(|e| registry_status(e, ""))?;
        tracing::info!(id = %removed.id, service = %removed.service, "deregistered through the API");
        Ok(Response::new(v1::DeregisterResponse { instance: Some(removed.to_proto()) }))
    }

    async fn list_services(
        &self,
        request: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        Principal::of(&request)?.require_read("listing services")?;
        Ok(Response::new(services_response(self.registry.services())))
    }

    async fn list_instances(
        &self,
        request: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        Principal::of(&request)?.require_read("listing instances")?;
        let request = request.into_inner();
        validate::service_name("service", &request.service).map_err(invalid)?;
        let filter = Filter::from_request(request.passing_only, &request.metadata, &request.zone).map_err(invalid)?;
        match self.registry.snapshot(&request.service) {
            Some(snapshot) if snapshot.exists() => Ok(Response::new(instances_response(&self.registry, &snapshot, &filter))),
            _ => Err(Status::not_found(format!("service {:?} has no instances", request.service))),
        }
    }

    async fn watch(&self, request: Request<v1::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Principal::of(&request)?.require_read("watching a service")?;
        let request = request.into_inner();
        validate::service_name("service", &request.service).map_err(invalid)?;
        let filter = Filter::from_request(request.passing_only, &request.metadata, &request.zone).map_err(invalid)?;
        let registry = self.registry.clone();
        let updates = WatchStream::new(self.registry.watch(&request.service))
            .map(move |snapshot| Ok(instances_response(&registry, &snapshot, &filter)))
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(updates)))
    }

    async fn update_ttl(&self, request: Request<v1::UpdateTtlRequest>) -> Result<Response<v1::UpdateTtlResponse>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        validate::instance_id("check_id", &request.check_id).map_err(invalid)?;
        match self.registry.check_owner(&request.check_id) {
            Some(owner) => principal.require_service(&owner.service, "renewing a TTL check")?,
            // Unknown: whoever may renew checks at all hears that it is not there.
            None if matches!(principal, Principal::Read { .. }) => principal.require_admin("renewing a TTL check")?,
            None => {}
        }
        let status = ttl_status("status", request.status).map_err(invalid)?;
        if request.output.len() > 4096 {
            return Err(Status::invalid_argument("output: must be at most 4096 bytes"));
        }
        let check = self.checks.ttl(&request.check_id, status, request.output).await.map_err(|failure| match failure {
            TtlFailure::UnknownCheck(_) => Status::not_found(failure.to_string().replacen("id:", "check_id:", 1)),
            TtlFailure::Forward(_) => Status::unavailable(failure.to_string()),
            _ => Status::invalid_argument(failure.to_string().replacen("id:", "check_id:", 1)),
        })?;
        Ok(Response::new(v1::UpdateTtlResponse { check: Some(check) }))
    }

    async fn list_set_aside(
        &self,
        request: Request<v1::ListSetAsideRequest>,
    ) -> Result<Response<v1::ListSetAsideResponse>, Status> {
        Principal::of(&request)?.require_read("listing rows set aside")?;
        let rows = self.registry.set_aside().await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(v1::ListSetAsideResponse { rows }))
    }
}
