//! The resources API: gRPC `ferry.v1.Config` and its HTTP/JSON twin under `/v1/routes`,
//! `/v1/policies` and `/v1/apply`. Bodies are the proto3 JSON forms (durations may be written
//! `500ms`); `/v1/apply` also takes multi-document YAML, as `ferryctl apply` reads it.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use ferry_proto::{
    json,
    v1::{self, config_server::Config},
    validate::{self, FieldError},
};
use tonic::{Request, Status};

use crate::resources::{Kind, ResourceError, Resources};

/// The gRPC status for a resources error.
fn status(error: ResourceError) -> Status {
    match error {
        ResourceError::Invalid(field) => Status::invalid_argument(field.to_string()),
        ResourceError::NotFound { .. } => Status::not_found(error.to_string()),
        ResourceError::Conflict { .. } | ResourceError::InUse(_) => Status::failed_precondition(error.to_string()),
        ResourceError::Unavailable(_) => Status::unavailable(error.to_string()),
    }
}

fn kind_and_service(kind: i32, service: &str) -> Result<Kind, FieldError> {
    let kind =
        Kind::from_proto(kind).ok_or_else(|| FieldError::new("kind", "must be RESOURCE_KIND_ROUTE or RESOURCE_KIND_POLICY"))?;
    validate::service_name("service", service)?;
    Ok(kind)
}

/// The gRPC `Config` service.
#[derive(Clone)]
pub struct ConfigService {
    resources: Arc<Resources>,
}

impl ConfigService {
    /// A service over `resources`.
    pub fn new(resources: Arc<Resources>) -> Self {
        Self { resources }
    }
}

#[tonic::async_trait]
impl Config for ConfigService {
    async fn apply(&self, request: Request<v1::ApplyRequest>) -> Result<tonic::Response<v1::ApplyResponse>, Status> {
        let request = request.into_inner();
        let applied = self.resources.apply(request.items, request.dry_run).await.map_err(status)?;
        log_applied(&applied, request.dry_run);
        Ok(tonic::Response::new(v1::ApplyResponse { applied }))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<tonic::Response<v1::GetResponse>, Status> {
        let request = request.into_inner();
        let kind = kind_and_service(request.kind, &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let resource = self
            .resources
            .get(kind, &request.service)
            .ok_or_else(|| status(ResourceError::NotFound { kind, service: request.service.clone() }))?;
        Ok(tonic::Response::new(v1::GetResponse { resource: Some(resource) }))
    }

    async fn list(&self, request: Request<v1::ListRequest>) -> Result<tonic::Response<v1::ListResponse>, Status> {
        let request = request.into_inner();
        let kind = Kind::from_proto(request.kind);
        if !request.service.is_empty() {
            validate::service_name("service", &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let service = Some(request.service.as_str()).filter(|s| !s.is_empty());
        Ok(tonic::Response::new(v1::ListResponse { resources: self.resources.list(kind, service) }))
    }

    async fn delete(&self, request: Request<v1::DeleteRequest>) -> Result<tonic::Response<v1::DeleteResponse>, Status> {
        let request = request.into_inner();
        let kind = kind_and_service(request.kind, &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let removed = self.resources.delete(kind, &request.service, request.expected_version).await.map_err(status)?;
        tracing::info!(kind = kind.name(), service = %request.service, "deleted");
        Ok(tonic::Response::new(v1::DeleteResponse { resource: Some(removed) }))
    }

    async fn history(&self, request: Request<v1::HistoryRequest>) -> Result<tonic::Response<v1::HistoryResponse>, Status> {
        let request = request.into_inner();
        let kind = kind_and_service(request.kind, &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(tonic::Response::new(v1::HistoryResponse { entries: self.resources.history(kind, &request.service) }))
    }
}

fn log_applied(applied: &[v1::AppliedResource], dry_run: bool) {
    if dry_run {
        return;
    }
    for resource in applied.iter().filter(|a| a.changed) {
        if let Some((kind, service)) = resource.resource.as_ref().and_then(Kind::of) {
            tracing::info!(kind = kind.name(), %service, "applied");
        }
    }
}

/// An error as the HTTP API answers it.
fn http_error(error: ResourceError) -> Response {
    let (code, field) = match &error {
        ResourceError::Invalid(field) => (StatusCode::BAD_REQUEST, Some(field.field.clone())),
        ResourceError::NotFound { .. } => (StatusCode::NOT_FOUND, None),
        ResourceError::Conflict { field, .. } => (StatusCode::CONFLICT, Some(field.clone())),
        ResourceError::InUse(_) => (StatusCode::CONFLICT, None),
        ResourceError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
    };
    let mut body = serde_json::json!({ "error": error.to_string() });
    if let Some(field) = field {
        body["field"] = field.into();
    }
    (code, Json(body)).into_response()
}

/// The routes of the resources API, to merge into the HTTP API's router.
pub fn router(resources: Arc<Resources>) -> Router {
    Router::new()
        .route("/v1/apply", post(apply))
        .route("/v1/routes", get(list_routes))
        .route("/v1/policies", get(list_policies))
        .route("/v1/routes/{service}", get(get_route).put(put_route).delete(delete_route))
        .route("/v1/policies/{service}", get(get_policy).put(put_policy).delete(delete_policy))
        .route("/v1/routes/{service}/history", get(route_history))
        .route("/v1/policies/{service}/history", get(policy_history))
        .with_state(resources)
}

/// Whether a body is JSON: by its content type, or else by its first character (YAML
/// otherwise, so `curl --data-binary @routes.yaml` works without a content type).
fn is_json(headers: &HeaderMap, body: &[u8]) -> bool {
    match headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(kind) if kind.contains("json") => true,
        Some(kind) if kind.contains("yaml") => false,
        _ => matches!(body.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'[')),
    }
}

/// Renames the item an apply error names after where it came from in the body.
fn rename_items(error: ResourceError, rename: impl Fn(&str) -> String) -> ResourceError {
    match error {
        ResourceError::Invalid(mut field) => {
            field.field = rename(&field.field);
            ResourceError::Invalid(field)
        }
        ResourceError::Conflict { field, kind, service, expected, actual } => {
            ResourceError::Conflict { field: rename(&field), kind, service, expected, actual }
        }
        other => other,
    }
}

/// `POST /v1/apply[?dry_run]`: multi-document YAML, or JSON: one resource or a list, each with
/// its `kind`. Errors name the document (`documents[1].rules[0]...`) or the list item
/// (`[1].rules[0]...`).
async fn apply(
    State(resources): State<Arc<Resources>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dry_run = query.get("dry_run").is_some_and(|v| v.is_empty() || v == "true" || v == "1");
    let json = is_json(&headers, &body);
    let list = json && matches!(body.iter().find(|b| !b.is_ascii_whitespace()), Some(b'['));
    let parsed: Result<Vec<(usize, v1::Resource)>, FieldError> = if json {
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| FieldError::new("body", format!("not JSON: {e} (send YAML with content-type: application/yaml)")))
            .and_then(|value| match value {
                serde_json::Value::Array(items) => items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| json_resource(item).map(|r| (i, r)).map_err(|e| e.within(&format!("[{i}]"))))
                    .collect(),
                single => json_resource(single).map(|r| vec![(0, r)]),
            })
    } else {
        json::documents_from_yaml(&String::from_utf8_lossy(&body))
    };
    let documents = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return http_error(error.into()),
    };
    let indexes: Vec<usize> = documents.iter().map(|(i, _)| *i).collect();
    let items = documents.into_iter().map(|(_, r)| v1::ApplyItem { resource: Some(r), expected_version: None }).collect();
    match resources.apply(items, dry_run).await {
        Ok(applied) => {
            log_applied(&applied, dry_run);
            Json(v1::ApplyResponse { applied }).into_response()
        }
        Err(error) if list => {
            http_error(rename_items(error, |field| json::name_document(field, &indexes).replacen("documents", "", 1)))
        }
        Err(error) if json => http_error(strip_item_prefix(error)),
        Err(error) => http_error(rename_items(error, |field| json::name_document(field, &indexes))),
    }
}

/// One resource of a JSON apply body, validated here (as YAML documents are) so that errors name
/// the field within the body, not within the apply's list of items.
fn json_resource(value: serde_json::Value) -> Result<v1::Resource, FieldError> {
    let resource = json::resource_from_value(value)?;
    validate::resource(&resource)?;
    Ok(resource)
}

async fn list(resources: &Resources, kind: Kind) -> Response {
    Json(v1::ListResponse { resources: resources.list(Some(kind), None) }).into_response()
}

async fn list_routes(State(resources): State<Arc<Resources>>) -> Response {
    list(&resources, Kind::Route).await
}

async fn list_policies(State(resources): State<Arc<Resources>>) -> Response {
    list(&resources, Kind::Policy).await
}

fn get_one(resources: &Resources, kind: Kind, service: String) -> Response {
    if let Err(error) = validate::service_name("service", &service) {
        return http_error(error.into());
    }
    match resources.get(kind, &service) {
        Some(resource) => Json(json::resource_to_value(&resource)).into_response(),
        None => http_error(ResourceError::NotFound { kind, service }),
    }
}

async fn get_route(State(resources): State<Arc<Resources>>, Path(service): Path<String>) -> Response {
    get_one(&resources, Kind::Route, service)
}

async fn get_policy(State(resources): State<Arc<Resources>>, Path(service): Path<String>) -> Response {
    get_one(&resources, Kind::Policy, service)
}

/// `PUT /v1/{routes,policies}/{service}[?expected_version=N]` with the resource as JSON or YAML.
async fn put_one(
    resources: &Resources,
    kind: Kind,
    service: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let expected_version = match query.get("expected_version").map(|v| v.parse::<u64>()) {
        Some(Ok(version)) => Some(version),
        Some(Err(_)) => return http_error(FieldError::new("expected_version", "must be a number").into()),
        None => None,
    };
    let value: Result<serde_json::Value, String> = if is_json(&headers, &body) {
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
    } else {
        serde_yaml_ng::from_slice(&body).map_err(|e| format!("not valid YAML: {e}"))
    };
    let mut value = match value {
        Ok(value) => value,
        Err(error) => return http_error(FieldError::new("body", error).into()),
    };
    if let serde_json::Value::Object(members) = &mut value {
        let name = match kind {
            Kind::Route => json::ROUTE,
            Kind::Policy => json::POLICY,
        };
        members.insert("kind".into(), name.into());
        members.entry("service").or_insert_with(|| service.clone().into());
    }
    let resource = match json::resource_from_value(value) {
        Ok(resource) => resource,
        Err(error) => return http_error(error.into()),
    };
    if Kind::of(&resource).is_some_and(|(_, s)| s != service) {
        return http_error(FieldError::new("service", format!("must match the path, {service:?}")).into());
    }
    match resources.apply(vec![v1::ApplyItem { resource: Some(resource), expected_version }], false).await {
        Ok(mut applied) => {
            log_applied(&applied, false);
            let resource = applied.pop().and_then(|a| a.resource).unwrap_or_default();
            Json(json::resource_to_value(&resource)).into_response()
        }
        Err(error) => http_error(strip_item_prefix(error)),
    }
}

/// Field paths of a single PUT are relative to the body, not to an apply's item list.
fn strip_item_prefix(error: ResourceError) -> ResourceError {
    rename_items(error, |field| {
        field.strip_prefix("items[0].resource.").or_else(|| field.strip_prefix("items[0].")).unwrap_or(field).to_owned()
    })
}

async fn put_route(
    State(resources): State<Arc<Resources>>,
    Path(service): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    put_one(&resources, Kind::Route, service, query, headers, body).await
}

async fn put_policy(
    State(resources): State<Arc<Resources>>,
    Path(service): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    put_one(&resources, Kind::Policy, service, query, headers, body).await
}

async fn delete_one(resources: &Resources, kind: Kind, service: String) -> Response {
    if let Err(error) = validate::service_name("service", &service) {
        return http_error(error.into());
    }
    match resources.delete(kind, &service, None).await {
        Ok(removed) => Json(json::resource_to_value(&removed)).into_response(),
        Err(error) => http_error(error),
    }
}

async fn delete_route(State(resources): State<Arc<Resources>>, Path(service): Path<String>) -> Response {
    delete_one(&resources, Kind::Route, service).await
}

async fn delete_policy(State(resources): State<Arc<Resources>>, Path(service): Path<String>) -> Response {
    delete_one(&resources, Kind::Policy, service).await
}

async fn route_history(State(resources): State<Arc<Resources>>, Path(service): Path<String>) -> Response {
    Json(v1::HistoryResponse { entries: resources.history(Kind::Route, &service) }).into_response()
}

async fn policy_history(State(resources): State<Arc<Resources>>, Path(service): Path<String>) -> Response {
    Json(v1::HistoryResponse { entries: resources.history(Kind::Policy, &service) }).into_response()
}
