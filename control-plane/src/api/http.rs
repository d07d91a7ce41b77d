//! The HTTP/JSON API. Bodies are the proto3 JSON form of the `ferry.v1` messages, so a
//! registration reads the same over HTTP, gRPC and `ferryctl -o json`.
//!
//! | method and path                       | answer                                        |
//! |---------------------------------------|-----------------------------------------------|
//! | `GET /v1/services`                    | `ListServicesResponse`                        |
//! | `GET /v1/services/{name}`             | `ListInstancesResponse`, header `X-Ferry-Index`; `?passing`, `?meta=KEY:VALUE` (repeatable), `?zone=Z` filter; `?index=N&wait=D` blocks until the service's index differs from N |
//! | `PUT /v1/instances`                   | body `Instance`; answers `RegisterResponse`    |
//! | `GET /v1/instances/{id}`              | `Instance`                                    |
//! | `DELETE /v1/instances/{id}`           | `DeregisterResponse`                          |
//! | `PUT /v1/checks/{id}/{pass,warn,fail}`| renews a TTL check; body: the output to show  |
//! | `GET /v1/sidecars`                    | `ListSidecarsResponse`                        |
//! | `GET /v1/traffic`                     | `TrafficResponse`: the last minute's figures  |
//! | `GET /metrics`                        | Prometheus text                               |
//! | `GET /ready`                          | 200 once serving                              |
//! | `GET /ui/`                            | the read-only dashboard ([`super::ui`])       |
//!
//! Consul's `/v1/agent/`, `/v1/catalog/`, `/v1/health/` and `/v1/status/` are served beside
//! these, by [`super::consul`].
//!
//! Errors answer `{"error": "...", "field": "..."}` with 400, 404 or 503; a missing or unknown
//! token 401, a token without the right 403. Every path but `/metrics`, `/ready` and the
//! dashboard's assets under `/ui/` needs a token (see [`crate::auth`]); the dashboard's page
//! sends one on each call it makes.
//!
//! Every request runs in a tracing span that names its method and path (never its headers, which
//! carry tokens). JSON answers of a kilobyte or more are gzipped for clients that send
//! `accept-encoding: gzip`: a service with thousands of instances shrinks several times over.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, Path, Query, State,
        rejection::{BytesRejection, FailedToBufferBody},
    },
    http::{Extensions, HeaderMap, HeaderValue, StatusCode, Version, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use ferry_health::Health;
use ferry_proto::{v1, validate};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::{
    compression::{
        CompressionLayer,
        predicate::{Predicate, SizeAbove},
    },
    trace::{DefaultMakeSpan, TraceLayer},
};
use tracing::Level;

use super::{Filter, instances_response, json::Json, services_response};
use crate::{
    auth::{Auth, Denied, Principal},
    ca::Authority,
    checks::{HealthChecks, TtlFailure},
    discovery::Sidecars,
    registry::{InstanceSpec, Registry, RegistryError},
};

/// How long a blocking query waits when it does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest a blocking query may wait.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// The most blocking queries held at once; past that they are refused, to be retried.
pub const MAX_BLOCKING_QUERIES: usize = 10_000;
/// The largest output a TTL renewal may carry.
const MAX_TTL_OUTPUT_BYTES: usize = 4096;
/// JSON answers smaller than this are sent as they are: gzip would save next to nothing.
const MIN_COMPRESSED_BYTES: u16 = 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub checks: Arc<HealthChecks>,
    pub sidecars: Arc<Sidecars>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Blocking queries answer at once when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Permits for blocking queries.
    pub blocking: Arc<tokio::sync::Semaphore>,
    pub resources: Arc<crate::resources::Resources>,
    pub authority: Arc<Authority>,
    /// The sidecars' traffic reports.
    pub traffic: Arc<crate::traffic::Traffic>,
}

/// `GET /ready`: 200 while serving; 503 while a shared store is unreachable (this replica still
/// streams its last state to its sidecars, but refuses writes).
async fn ready(State(state): State<HttpState>) -> (StatusCode, String) {
    match state.registry.shared().and_then(|shared| shared.unavailable.borrow().clone()) {
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: the store is unavailable: {why}\n")),
        None => (StatusCode::OK, "ready\n".to_owned()),
    }
}

/// What `GET /` lists: the endpoints of the HTTP API (docs/api.md has each in full).
const INDEX: &str = "Ferry control plane: HTTP API (every /v1 endpoint needs a token; see docs/api.md)
GET    /v1/services                    services, their instance counts and indexes
GET    /v1/services/{name}             a service's instances; ?index=N&wait=60s blocks until a change
PUT    /v1/instances                   registers an instance (JSON)
GET    /v1/instances/{id}              one instance
DELETE /v1/instances/{id}              deregisters it
PUT    /v1/checks/{id}/pass|warn|fail  renews a TTL check
GET    /v1/sidecars                    connected sidecars and the versions they acknowledged
GET    /v1/traffic                     the last minute's traffic between services
GET    /v1/store/set-aside             stored rows that could not be read at start-up
POST   /v1/apply                       applies routes and policies (YAML or JSON); ?dry_run=true
GET    /v1/routes|policies|authorizations[/{service}[/history]]
PUT    /v1/routes|policies|authorizations/{service}
DELETE /v1/routes|policies|authorizations/{service}
GET    /v1/ca, /v1/ca/bundle           the mesh's CA and its trust bundle
POST   /v1/ca/rotate, /v1/ca/retire    rotates the issuer, retires the old one
GET    /v1/tokens, POST /v1/tokens, DELETE /v1/tokens/{id}
GET    /v1/agent/..., /v1/catalog/..., /v1/health/...   the Consul-compatible API (docs/consul.md)
GET    /ui/                            the dashboard
GET    /metrics                        Prometheus / OpenMetrics (no token)
GET    /ready                          200 while serving (no token)
";

/// The API's router: every route behind the token check of `auth`, Consul's among them.
pub fn router(
    state: HttpState,
    security: super::security::SecurityService,
    auth: Auth,
    consul: Arc<super::consul::Consul>,
) -> Router {
    let resources = super::resources::router(state.resources.clone(), state.sidecars.clone(), state.registry.clone());
    let consul = super::consul::routes(state.clone(), consul);
    let routes = Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(list_instances))
        .route("/v1/instances", put(register))
        .route("/v1/instances/{id}", get(instance).delete(deregister))
        .route("/v1/checks/{id}/{status}", put(update_ttl).layer(DefaultBodyLimit::max(MAX_TTL_OUTPUT_BYTES)))
        .route("/v1/sidecars", get(sidecars))
        .route("/v1/traffic", get(traffic))
        .route("/v1/store/set-aside", get(set_aside))
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/", get(|| async { INDEX }))
        .fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::not_found(format!("no endpoint {method} {}; see docs/api.md", uri.path()))
        })
        .with_state(state)
        .merge(resources)
        .merge(super::security::router(security))
        .merge(super::ui::router())
        .merge(consul);
    edge(routes, auth, false)
}

/// The router of `--consul-http`: Consul's routes alone, behind the same token check.
pub fn consul_router(state: HttpState, auth: Auth, consul: Arc<super::consul::Consul>) -> Router {
    edge(super::consul::standalone(state, consul), auth, true)
}

/// What every request passes through before its route, outermost first: Consul's token mapped
/// onto Ferry's (and taken out of the query before the span records it), a tracing span, gzip
/// for large JSON answers, and the token check.
fn edge(routes: Router, auth: Auth, consul_only: bool) -> Router {
    routes.layer(
        ServiceBuilder::new()
            .layer(axum::middleware::from_fn(grpc_here))
            .layer(axum::middleware::from_fn_with_state(consul_only, super::consul::consul_token))
            // The span gives handler events their request; the layer's own events (each request
            // and answer, 5xx answers among them) are debug, so nothing is logged twice at info.
            .layer(TraceLayer::new_for_http().make_span_with(DefaultMakeSpan::new().level(Level::INFO)).on_failure(()))
            .layer(CompressionLayer::new().compress_when(SizeAbove::new(MIN_COMPRESSED_BYTES).and(is_json)))
            .layer(axum::middleware::from_fn_with_state(auth, authenticate)),
    )
}

/// A gRPC call sent here (ferryctl or a gRPC client given the HTTP port) gets a gRPC status
/// that says where to go, rather than a 404 its client reports as a protocol error.
async fn grpc_here(request: axum::extract::Request, next: Next) -> Response {
    let grpc = request.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return next.run(request).await;
    }
    tonic::Status::unimplemented(
        "this is the control plane's HTTP API (--http, port 7071 by default); gRPC clients and ferryctl's \
         --control-plane use its gRPC address (--grpc, port 7070 by default)",
    )
    .into_http::<axum::body::Body>()
}

/// Whether an answer is JSON, the one kind of answer that grows large.
fn is_json(_: StatusCode, _: Version, headers: &HeaderMap, _: &Extensions) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
}

/// Paths anyone may read: scrapers and load balancers carry no token, a browser loads the
/// dashboard's assets (which hold no data) before it has one, and the index lists endpoints only.
fn open(path: &str) -> bool {
    path == "/" || path == "/metrics" || path == "/ready" || super::ui::is_ui_path(path)
}

/// Puts the caller's [`Principal`] in the request, or answers 401.
async fn authenticate(State(auth): State<Auth>, mut request: axum::extract::Request, next: Next) -> Response {
    let principal = if open(request.uri().path()) { Ok(Principal::Anonymous) } else { auth.authenticate(request.headers()) };
    match principal {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(error) => {
            let mut response = (StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": error.0 }))).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// An error as the API answers it.
#[derive(Debug, Serialize)]
struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

impl ApiError {
    fn bad_request(error: validate::FieldError) -> Self {
        Self { status: StatusCode::BAD_REQUEST, error: error.to_string(), field: Some(error.field) }
    }

    fn not_found(error: impl ToString) -> Self {
        Self { status: StatusCode::NOT_FOUND, error: error.to_string(), field: None }
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        Self { status: StatusCode::FORBIDDEN, error: denied.0, field: None }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Invalid(field) => Self::bad_request(field),
            RegistryError::NotFound(_) => Self::not_found(error),
            RegistryError::Unavailable(_) => {
                Self { status: StatusCode::SERVICE_UNAVAILABLE, error: error.to_string(), field: None }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

async fn list_services(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<v1::ListServicesResponse>, ApiError> {
    principal.require_read("listing services")?;
    Ok(Json(services_response(state.registry.services())))
}

/// `GET /v1/store/set-aside`: the stored rows that could not be read at start-up.
async fn set_aside(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<v1::ListSetAsideResponse>, ApiError> {
    principal.require_read("listing rows set aside")?;
    let rows = state.registry.set_aside().await.map_err(|e| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        error: e.to_string(),
        field: None,
    })?;
    Ok(Json(v1::ListSetAsideResponse { rows }))
}

/// The query of `GET /v1/services/{name}`.
struct InstancesQuery {
    filter: Filter,
    index: Option<u64>,
    wait: Duration,
}

impl InstancesQuery {
    fn parse(pairs: Vec<(String, String)>) -> Result<Self, validate::FieldError> {
        let mut query = Self { filter: Filter::default(), index: None, wait: DEFAULT_WAIT };
        let mut metadata = BTreeMap::new();
        for (key, value) in pairs {
            match key.as_str() {
                "passing" => query.filter.routable_only = value.is_empty() || value == "true" || value == "1",
                "meta" => {
                    let (k, v) = value.split_once(':').ok_or_else(|| {
                        validate::FieldError::new("meta", format!("{value:?} must be KEY:VALUE, such as version:v2"))
                    })?;
                    metadata.insert(k.to_owned(), v.to_owned());
                }
                "zone" => {
                    validate::locality("zone", &value)?;
                    query.filter.zone = Some(value);
                }
                "index" => {
                    let index =
                        value.parse().map_err(|_| validate::FieldError::new("index", format!("{value:?} is not a number")))?;
                    query.index = Some(index);
                }
                "wait" => {
                    let wait = humantime::parse_duration(&value)
                        .map_err(|e| validate::FieldError::new("wait", format!("{value:?}: {e}")))?;
                    query.wait = wait.min(MAX_WAIT);
                }
                other => {
                    return Err(validate::FieldError::new(
                        other,
                        "unknown parameter: expected passing, meta, zone, index or wait",
                    ));
                }
            }
        }
        validate::metadata("meta", &metadata)?;
        query.filter.metadata = metadata;
        Ok(query)
    }
}

async fn list_instances(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    principal.require_read("listing instances")?;
    validate::service_name("name", &name).map_err(ApiError::bad_request)?;
    let query = InstancesQuery::parse(pairs).map_err(ApiError::bad_request)?;
    let mut watch = state.registry.watch(&name);
    let _permit = match query.index {
        Some(_) => Some(state.blocking.clone().try_acquire_owned().map_err(|_| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: format!("{MAX_BLOCKING_QUERIES} blocking queries are already waiting; retry later"),
            field: None,
        })?),
        None => None,
    };
    if let Some(index) = query.index {
        // A blocking query: answer when the index moves away from the one the client holds
        // (forward, or backward after a restart), when the wait ends, or at shutdown.
        tokio::select! {
            _ = tokio::time::timeout(query.wait, watch.wait_for(|snapshot| snapshot.index != index)) => {}
            () = state.shutdown.cancelled() => {}
        }
    }
    let snapshot = watch.borrow().clone();
    if !snapshot.exists() && query.index.is_none() {
        return Err(ApiError::not_found(format!("service {name:?} has no instances")));
    }
    let mut response = Json(instances_response(&state.registry, &snapshot, &query.filter)).into_response();
    response.headers_mut().insert("x-ferry-index", HeaderValue::from(snapshot.index));
    Ok(response)
}

async fn register(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Json<v1::RegisterResponse>, ApiError> {
    if let Err(refused) = super::resources::body_type(&headers, &["application/json"]) {
        return Err(ApiError { status: StatusCode::UNSUPPORTED_MEDIA_TYPE, error: refused, field: None });
    }
    let instance: v1::Instance = ferry_proto::json::decode_slice("ferry.v1.Instance", &body).map_err(ApiError::bad_request)?;
    let spec = InstanceSpec::try_from(instance).map_err(ApiError::bad_request)?;
    principal.require_service(&spec.service, "registering an instance")?;
    state.checks.admit(&spec).await.map_err(ApiError::bad_request)?;
    let id = spec.id.clone();
    let registered = state.registry.register(spec).await;
    // Also when the store failed: the change is in memory, and the checks follow memory.
    state.checks.sync(&id);
    let instance = registered?;
    tracing::info!(id = %instance.id, service = %instance.service, "registered through the API");
    Ok(Json(v1::RegisterResponse { instance: Some(state.registry.describe(&instance)) }))
}

async fn instance(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<v1::Instance>, ApiError> {
    principal.require_read("reading an instance")?;
    let instance = state.registry.instance(&id).ok_or_else(|| ApiError::not_found(RegistryError::NotFound(id)))?;
    Ok(Json(state.registry.describe(&instance)))
}

async fn deregister(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<v1::DeregisterResponse>, ApiError> {
    validate::instance_id("id", &id).map_err(ApiError::bad_request)?;
    let force = match pairs.iter().find(|(k, _)| k == "force").map(|(_, v)| v.as_str()) {
        None | Some("false") => false,
        Some("" | "true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(validate::FieldError::new(
                "force",
                format!("must be true or false, got {other:?}"),
            )));
        }
    };
    let existing = state.registry.instance(&id);
    super::may_deregister(&principal, existing.as_deref())?;
    if let Some(why) = super::sidecar_owned(existing.as_deref(), force) {
        return Err(ApiError { status: StatusCode::CONFLICT, error: why, field: Some("force".into()) });
    }
    let removed = state.registry.deregister(&id).await;
    state.checks.sync(&id);
    let removed = removed?;
    tracing::info!(id = %removed.id, service = %removed.service, "deregistered through the API");
    Ok(Json(v1::DeregisterResponse { instance: Some(removed.to_proto()) }))
}

async fn update_ttl(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
    Path((id, status)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<v1::Check>, ApiError> {
    validate::instance_id("id", &id).map_err(ApiError::bad_request)?;
    match state.registry.check_owner(&id) {
        Some(owner) => principal.require_service(&owner.service, "renewing a TTL check")?,
        // Unknown: whoever may renew checks at all hears that it is not there.
        None if matches!(principal, Principal::Read { .. }) => principal.require_admin("renewing a TTL check")?,
        None => {}
    }
    let status = match status.as_str() {
        "pass" => Health::Passing,
        "warn" => Health::Warning,
        "fail" => Health::Critical,
        other => {
            return Err(ApiError::bad_request(validate::FieldError::new(
                "status",
                format!("{other:?} must be pass, warn or fail"),
            )));
        }
    };
    // The route's body limit stops reading past the most an output may be.
    let body = match body {
        Ok(body) => body,
        Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_))) => {
            let why = format!("the output must be at most {MAX_TTL_OUTPUT_BYTES} bytes");
            return Err(ApiError::bad_request(validate::FieldError::new("body", why)));
        }
        Err(rejection) => {
            return Err(ApiError { status: rejection.status(), error: rejection.body_text(), field: None });
        }
    };
    let output = String::from_utf8_lossy(&body).trim().to_owned();
    let check = state.checks.ttl(&id, status, output).await.map_err(|failure| {
        let error = failure.to_string();
        let reason = error.strip_prefix("id: ").unwrap_or(&error).to_owned();
        match failure {
            TtlFailure::UnknownCheck(_) => ApiError { status: StatusCode::NOT_FOUND, error, field: Some("id".into()) },
            TtlFailure::Forward(_) => ApiError { status: StatusCode::SERVICE_UNAVAILABLE, error, field: None },
            _ => ApiError::bad_request(validate::FieldError::new("id", reason)),
        }
    })?;
    Ok(Json(check))
}

async fn sidecars(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<v1::ListSidecarsResponse>, ApiError> {
    principal.require_read("listing sidecars")?;
    Ok(Json(v1::ListSidecarsResponse { sidecars: state.sidecars.list(&state.registry, &state.resources, &state.authority) }))
}

async fn traffic(
    State(state): State<HttpState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<v1::TrafficResponse>, ApiError> {
    principal.require_read("reading traffic figures")?;
    Ok(Json(state.traffic.snapshot()))
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &state.metrics) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {error}\n")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

#[cfg(test)]
mod tests;
