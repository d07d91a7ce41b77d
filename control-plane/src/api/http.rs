//! The HTTP/JSON API. Bodies are the proto3 JSON form of the `ferry.v1` messages, so a
//! registration reads the same over HTTP, gRPC and `ferryctl -o json`.
//!
//! | method and path              | answer                                               |
//! |------------------------------|------------------------------------------------------|
//! | `GET /v1/services`           | `ListServicesResponse`                               |
//! | `GET /v1/services/{name}`    | `ListInstancesResponse` (`?passing` for routable only), `X-Ferry-Index` |
//! | `PUT /v1/instances`          | body `Instance`; answers `RegisterResponse`           |
//! | `GET /v1/instances/{id}`     | `Instance`                                           |
//! | `DELETE /v1/instances/{id}`  | `DeregisterResponse`                                 |
//! | `GET /v1/sidecars`           | `ListSidecarsResponse`                               |
//! | `GET /metrics`               | Prometheus text                                      |
//! | `GET /ready`                 | 200 once serving                                     |
//!
//! Errors answer `{"error": "...", "field": "..."}` with 400, 404 or 503.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use ferry_proto::{v1, validate};
use serde::Serialize;

use super::{instances_response, services_response};
use crate::{
    discovery::Sidecars,
    registry::{InstanceSpec, Registry, RegistryError},
};

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub sidecars: Arc<Sidecars>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
}

/// The API's router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}", get(list_instances))
        .route("/v1/instances", axum::routing::put(register))
        .route("/v1/instances/{id}", get(instance).delete(deregister))
        .route("/v1/sidecars", get(sidecars))
        .route("/metrics", get(metrics))
        .route("/ready", get(|| async { "ready\n" }))
        .fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            ApiError::not_found(format!("no endpoint {method} {}; see docs/api.md", uri.path()))
        })
        .with_state(state)
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

async fn list_services(State(state): State<HttpState>) -> Json<v1::ListServicesResponse> {
    Json(services_response(state.registry.services()))
}

async fn list_instances(
    State(state): State<HttpState>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    validate::service_name("name", &name).map_err(ApiError::bad_request)?;
    let routable_only = query.get("passing").is_some_and(|v| v.is_empty() || v == "true" || v == "1");
    let snapshot = state
        .registry
        .snapshot(&name)
        .filter(|s| s.exists())
        .ok_or_else(|| ApiError::not_found(format!("service {name:?} has no instances")))?;
    let mut response = Json(instances_response(&snapshot, routable_only)).into_response();
    response.headers_mut().insert("x-ferry-index", HeaderValue::from(snapshot.index));
    Ok(response)
}

/// Decodes a JSON body into `T`, naming the field whose value does not fit when there is one.
fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, validate::FieldError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| validate::FieldError::new("body", format!("not JSON: {e}")))?;
    serde_json::from_value(value.clone()).map_err(|error| {
        // Find the member that fails on its own, so the error can name it.
        let culprit = value.as_object().and_then(|members| {
            members.iter().find(|(name, member)| {
                let alone = serde_json::Value::Object([((*name).clone(), (*member).clone())].into_iter().collect());
                serde_json::from_value::<T>(alone).is_err()
            })
        });
        match culprit {
            Some((name, _)) => validate::FieldError::new(name.clone(), format!("invalid value: {error}")),
            None => validate::FieldError::new("body", format!("does not match the expected message: {error}")),
        }
    })
}

async fn register(State(state): State<HttpState>, body: Bytes) -> Result<Json<v1::RegisterResponse>, ApiError> {
    let instance: v1::Instance = decode(&body).map_err(ApiError::bad_request)?;
    let spec = InstanceSpec::try_from(instance).map_err(ApiError::bad_request)?;
    let instance = state.registry.register(spec).await?;
    tracing::info!(id = %instance.id, service = %instance.service, "registered through the API");
    Ok(Json(v1::RegisterResponse { instance: Some(instance.to_proto()) }))
}

async fn instance(State(state): State<HttpState>, Path(id): Path<String>) -> Result<Json<v1::Instance>, ApiError> {
    let instance = state.registry.instance(&id).ok_or_else(|| ApiError::not_found(RegistryError::NotFound(id)))?;
    Ok(Json(instance.to_proto()))
}

async fn deregister(State(state): State<HttpState>, Path(id): Path<String>) -> Result<Json<v1::DeregisterResponse>, ApiError> {
    validate::instance_id("id", &id).map_err(ApiError::bad_request)?;
    let removed = state.registry.deregister(&id).await?;
    tracing::info!(id = %removed.id, service = %removed.service, "deregistered through the API");
    Ok(Json(v1::DeregisterResponse { instance: Some(removed.to_proto()) }))
}

async fn sidecars(State(state): State<HttpState>) -> Json<v1::ListSidecarsResponse> {
    Json(v1::ListSidecarsResponse { sidecars: state.sidecars.list(&state.registry) })
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &state.metrics) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {error}\n")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}
