//! The trust APIs: gRPC `ferry.v1.Identity` (workload certificates), `ferry.v1.Ca` (the trust
//! bundle and its rotation) and `ferry.v1.Tokens`, and their HTTP twins under `/v1/ca` and
//! `/v1/tokens`.

use std::{sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use ferry_proto::{
    v1::{self, ca_server::Ca, identity_server::Identity, tokens_server::Tokens as TokensApi},
    validate,
};
use tonic::{Request, Status};

use crate::{
    auth::{Principal, Tokens, tokens::TokenError},
    ca::{Authority, CaError},
    discovery::Sidecars,
};

use super::json::Json;

/// The largest CSR accepted.
const MAX_CSR_BYTES: usize = 16 << 10;

/// Serves the trust APIs.
#[derive(Clone)]
pub struct SecurityService {
    pub authority: Arc<Authority>,
    pub tokens: Arc<Tokens>,
    pub sidecars: Arc<Sidecars>,
}

fn ca_status(error: CaError) -> Status {
    match error {
        CaError::Refused(why) => Status::failed_precondition(why),
        CaError::Issue(ferry_tls::authority::IssueError::Csr(why)) => Status::invalid_argument(format!("csr_pem: {why}")),
        CaError::Store(e) => Status::unavailable(format!("not persisted: {e}")),
        other => Status::internal(other.to_string()),
    }
}

fn token_status(error: TokenError) -> Status {
    match error {
        TokenError::Invalid(field) => Status::invalid_argument(field.to_string()),
        TokenError::NotFound(_) => Status::not_found(error.to_string()),
        TokenError::Store(e) => Status::unavailable(format!("not persisted: {e}")),
    }
}

impl SecurityService {
    fn certify(&self, principal: &Principal, request: &v1::CertifyRequest) -> Result<v1::CertifyResponse, Status> {
        validate::service_name("service", &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !request.node_id.is_empty() {
            validate::instance_id("node_id", &request.node_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        principal.require_service(&request.service, "a workload certificate")?;
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!("csr_pem: at most {MAX_CSR_BYTES} bytes")));
        }
        let response = self.authority.certify(&request.service, &request.csr_pem, &request.node_id).map_err(ca_status)?;
        tracing::debug!(service = %request.service, node = %request.node_id, "issued a workload certificate");
        Ok(response)
    }

    fn status(&self) -> v1::CaStatus {
        self.authority.status(&self.sidecars.node_ids(), &self.sidecars.remote_leaves())
    }

    async fn create_token(&self, request: v1::CreateTokenRequest) -> Result<v1::CreateTokenResponse, Status> {
        let kind = v1::TokenKind::try_from(request.kind).unwrap_or(v1::TokenKind::Unspecified);
        let ttl = match &request.ttl {
            Some(ttl) => Some(validate::duration("ttl", ttl).map_err(|e| Status::invalid_argument(e.to_string()))?),
            None => None,
        };
        let (token, secret) =
            self.tokens.create(kind, &request.service, ttl, &request.description).await.map_err(token_status)?;
        tracing::info!(id = %token.id, kind = kind.as_str_name(), service = %token.service, "created a token");
        Ok(v1::CreateTokenResponse { token: Some(token), secret })
    }
}

#[tonic::async_trait]
impl Identity for SecurityService {
    async fn certify(&self, request: Request<v1::CertifyRequest>) -> Result<tonic::Response<v1::CertifyResponse>, Status> {
        let principal = Principal::of(&request)?;
        Ok(tonic::Response::new(SecurityService::certify(self, &principal, request.get_ref())?))
    }
}

#[tonic::async_trait]
impl Ca for SecurityService {
    async fn get_bundle(&self, request: Request<v1::GetBundleRequest>) -> Result<tonic::Response<v1::TrustBundle>, Status> {
        Principal::of(&request)?.require_read("reading the trust bundle")?;
        Ok(tonic::Response::new((*self.authority.bundle()).clone()))
    }

    async fn rotate(&self, request: Request<v1::RotateRequest>) -> Result<tonic::Response<v1::CaStatus>, Status> {
        Principal::of(&request)?.require_admin("rotating the CA")?;
        self.authority.rotate().await.map_err(ca_status)?;
        Ok(tonic::Response::new(self.status()))
    }

    async fn retire(&self, request: Request<v1::RetireRequest>) -> Result<tonic::Response<v1::CaStatus>, Status> {
        Principal::of(&request)?.require_admin("retiring roots")?;
        self.authority
            .retire(request.get_ref().force, &self.sidecars.node_ids(), &self.sidecars.remote_leaves())
            .await
            .map_err(ca_status)?;
        Ok(tonic::Response::new(self.status()))
    }

    async fn status(&self, request: Request<v1::CaStatusRequest>) -> Result<tonic::Response<v1::CaStatus>, Status> {
        Principal::of(&request)?.require_read("reading the CA's status")?;
        Ok(tonic::Response::new(SecurityService::status(self)))
    }
}

#[tonic::async_trait]
impl TokensApi for SecurityService {
    async fn create(&self, request: Request<v1::CreateTokenRequest>) -> Result<tonic::Response<v1::CreateTokenResponse>, Status> {
        Principal::of(&request)?.require_admin("creating a token")?;
        Ok(tonic::Response::new(self.create_token(request.into_inner()).await?))
    }

    async fn list(&self, request: Request<v1::ListTokensRequest>) -> Result<tonic::Response<v1::ListTokensResponse>, Status> {
        Principal::of(&request)?.require_admin("listing tokens")?;
        Ok(tonic::Response::new(v1::ListTokensResponse { tokens: self.tokens.list() }))
    }

    async fn revoke(&self, request: Request<v1::RevokeTokenRequest>) -> Result<tonic::Response<v1::RevokeTokenResponse>, Status> {
        Principal::of(&request)?.require_admin("revoking a token")?;
        let id = &request.get_ref().id;
        let token = self.tokens.revoke(id).await.map_err(token_status)?;
        tracing::info!(%id, "revoked a token");
        Ok(tonic::Response::new(v1::RevokeTokenResponse { token: Some(token) }))
    }
}

/// A gRPC status as the HTTP API answers it.
fn http_error(status: Status) -> Response {
    let code = match status.code() {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(serde_json::json!({ "error": status.message() }))).into_response()
}

fn answer<T: serde::Serialize>(result: Result<T, Status>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(status) => http_error(status),
    }
}

/// The HTTP routes of the trust APIs.
pub fn router(service: SecurityService) -> Router {
    Router::new()
        .route("/v1/ca", get(http_status))
        .route("/v1/ca/bundle", get(http_bundle))
        .route("/v1/ca/rotate", post(http_rotate))
        .route("/v1/ca/retire", post(http_retire))
        .route("/v1/tokens", get(http_list_tokens).post(http_create_token))
        .route("/v1/tokens/{id}", delete(http_revoke))
        .with_state(service)
}

async fn http_status(State(service): State<SecurityService>, Extension(principal): Extension<Principal>) -> Response {
    answer(principal.require_read("reading the CA's status").map_err(Status::from).map(|()| service.status()))
}

async fn http_bundle(State(service): State<SecurityService>, Extension(principal): Extension<Principal>) -> Response {
    if let Err(denied) = principal.require_read("reading the trust bundle") {
        return http_error(denied.into());
    }
    ([(header::CONTENT_TYPE, "application/x-pem-file")], service.authority.bundle().roots_pem.clone()).into_response()
}

async fn http_rotate(State(service): State<SecurityService>, Extension(principal): Extension<Principal>) -> Response {
    if let Err(denied) = principal.require_admin("rotating the CA") {
        return http_error(denied.into());
    }
    answer(service.authority.rotate().await.map_err(ca_status).map(|()| service.status()))
}

async fn http_retire(
    State(service): State<SecurityService>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Err(denied) = principal.require_admin("retiring roots") {
        return http_error(denied.into());
    }
    let force = query.get("force").is_some_and(|v| v.is_empty() || v == "true" || v == "1");
    answer(
        service
            .authority
            .retire(force, &service.sidecars.node_ids(), &service.sidecars.remote_leaves())
            .await
            .map_err(ca_status)
            .map(|()| service.status()),
    )
}

async fn http_list_tokens(State(service): State<SecurityService>, Extension(principal): Extension<Principal>) -> Response {
    answer(
        principal
            .require_admin("listing tokens")
            .map_err(Status::from)
            .map(|()| v1::ListTokensResponse { tokens: service.tokens.list() }),
    )
}

async fn http_create_token(
    State(service): State<SecurityService>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Response {
    if let Err(denied) = principal.require_admin("creating a token") {
        return http_error(denied.into());
    }
    let request: v1::CreateTokenRequest = match ferry_proto::json::decode_slice("ferry.v1.CreateTokenRequest", &body) {
        Ok(request) => request,
        Err(error) => return http_error(Status::invalid_argument(error.to_string())),
    };
    answer(service.create_token(request).await)
}

async fn http_revoke(
    State(service): State<SecurityService>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    if let Err(denied) = principal.require_admin("revoking a token") {
        return http_error(denied.into());
    }
    answer(service.tokens.revoke(&id).await.map_err(token_status).map(|token| v1::RevokeTokenResponse { token: Some(token) }))
}

/// How often a rotation that waits for the sidecars' trust is looked at.
const PROMOTE_EVERY: Duration = Duration::from_millis(100);

/// Ends rotations once every connected sidecar trusts the new root, and renews the issuer when
/// it nears its end; runs until `shutdown`.
pub async fn supervise_rotation(
    authority: Arc<Authority>,
    sidecars: Arc<Sidecars>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut bundle = authority.watch();
    let mut last_renewal_check = tokio::time::Instant::now();
    loop {
        if !authority.runs_schedule() {
            // Another replica runs it; look again now and then, in case this one is elected.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                () = shutdown.cancelled() => return,
            }
        }
        let waiting = match authority.promote(|version| sidecars.all_trust(version)).await {
            Ok(waiting) => waiting,
            Err(error) => {
                tracing::warn!(%error, "cannot end the CA rotation");
                Some(0)
            }
        };
        if last_renewal_check.elapsed() > Duration::from_secs(3600) {
            last_renewal_check = tokio::time::Instant::now();
            if let Err(error) = authority.renew_issuer_if_due().await {
                tracing::warn!(%error, "cannot renew the CA's issuer");
            }
        }
        let pause = if waiting.is_some() { PROMOTE_EVERY } else { Duration::from_secs(60) };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = bundle.changed() => {}
            () = shutdown.cancelled() => return,
        }
    }
}
