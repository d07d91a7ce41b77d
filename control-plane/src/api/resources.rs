//! The resources API: gRPC `ferry.v1.Config` and its HTTP/JSON twin under `/v1/routes`,
//! `/v1/policies`, `/v1/authorizations` and `/v1/apply`. Bodies are the proto3 JSON forms
//! (durations may be written `500ms`); `/v1/apply` also takes multi-document YAML, as `ferryctl
//! apply` reads it. Reads need a read token, changes an admin token; bodies must say what they
//! are (`application/yaml`, `text/yaml` or `application/json`), so no browser form can post one.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Extension, Router,
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

use crate::{
    auth::{Denied, Principal},
    discovery::Sidecars,
    registry::{Instance, Registry},
    resources::{Kind, ResourceError, Resources},
};

use super::json::Json;

/// The largest body `/v1/apply` and the PUTs read.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Refuses a body whose content type is not one of `allowed` (ignoring parameters such as
/// `charset`), with what to send instead.
pub fn body_type(headers: &HeaderMap, allowed: &[&str]) -> Result<(), String> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let essence = given.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if allowed.contains(&essence.as_str()) {
        return Ok(());
    }
    let shown = if given.is_empty() { "none".to_owned() } else { format!("{given:?}") };
    Err(format!("content-type must be {}, got {shown}", allowed.join(" or ")))
}

/// The content types of resource bodies.
const RESOURCE_TYPES: [&str; 3] = ["application/yaml", "text/yaml", "application/json"];

/// What may keep applied resources from doing what they seem to: a resource for a service that
/// has no instance (naming the closest one that does), a subset whose labels match no instance
/// (with the values its instances have), an authorization policy that no rule lets one of its
/// service's current callers through.
pub fn notes(applied: &[v1::AppliedResource], sidecars: &Sidecars, registry: &Registry) -> Vec<String> {
    let mut notes = Vec::new();
    for resource in applied.iter().filter_map(|a| a.resource.as_ref()) {
        let (label, service) = match &resource.kind {
            Some(v1::resource::Kind::Route(route)) => ("route", route.service.as_str()),
            Some(v1::resource::Kind::Policy(policy)) => ("policy", policy.service.as_str()),
            Some(v1::resource::Kind::Authorization(policy)) => ("authorization", policy.service.as_str()),
            None => continue,
        };
        let snapshot = registry.snapshot(service);
        let instances: Vec<Arc<Instance>> =
            snapshot.as_ref().map(|s| s.instances.values().cloned().collect()).unwrap_or_default();
        // A service that had instances within the last day still holds its virtual IP.
        if instances.is_empty() && snapshot.as_ref().is_none_or(|s| s.virtual_ip.is_none()) {
            let names: Vec<String> = registry.services().into_iter().map(|s| s.name.to_string()).collect();
            let hint = match ferry_runtime::suggest::closest(service, names.iter().map(String::as_str)) {
                Some(name) => format!("; did you mean {name:?}?"),
                None => String::new(),
            };
            notes.push(format!("{label}/{service}: no instance of {service:?} is registered yet{hint}"));
            continue;
        }
        if let Some(v1::resource::Kind::Policy(policy)) = &resource.kind {
            notes.extend(unmatched_subsets(policy, &instances));
        }
    }
    for resource in applied.iter().filter_map(|a| a.resource.as_ref()) {
        let Some(v1::resource::Kind::Authorization(policy)) = &resource.kind else { continue };
        let Ok(compiled) = ferry_proto::authz::Authorization::compile(policy, policy.version) else { continue };
        let refused: Vec<String> =
            sidecars.callers(&policy.service).into_iter().filter(|caller| !compiled.could_allow(caller)).collect();
        if !refused.is_empty() {
            notes.push(format!(
                "authorization/{}: no rule can allow its current {} {}: {} would be refused",
                policy.service,
                if refused.len() == 1 { "caller" } else { "callers" },
                refused.join(", "),
                if refused.len() == 1 { "it" } else { "they" },
            ));
        }
    }
    notes
}

/// An invalid item that names a service nobody knows (no instance, no resource) that is close to
/// one that exists: a typo, most likely, whatever else its error says. Adds the closest name.
fn unknown_service_hint(error: ResourceError, items: &[v1::ApplyItem], registry: &Registry) -> ResourceError {
    let ResourceError::Invalid(mut field) = error else { return error };
    let index =
        field.field.strip_prefix("items[").and_then(|rest| rest.split_once(']')).and_then(|(i, _)| i.parse::<usize>().ok());
    let Some(resource) = index.and_then(|i| items.get(i)).and_then(|item| item.resource.as_ref()) else {
        return ResourceError::Invalid(field);
    };
    let mut named: Vec<&str> = Vec::new();
    match &resource.kind {
        Some(v1::resource::Kind::Route(route)) => {
            named.push(&route.service);
            for rule in &route.rules {
                let mirror = rule.mirror.iter().filter_map(|m| m.backend.as_ref());
                named.extend(rule.backends.iter().chain(mirror).map(|b| b.service.as_str()).filter(|s| !s.is_empty()));
            }
        }
        Some(v1::resource::Kind::Policy(policy)) => named.push(&policy.service),
        Some(v1::resource::Kind::Authorization(policy)) => named.push(&policy.service),
        None => {}
    }
    named.sort_unstable();
    named.dedup();
    let known: Vec<String> = registry.services().into_iter().map(|s| s.name.to_string()).collect();
    let mut typos = Vec::new();
    for service in named {
        let unknown = registry.snapshot(service).is_none_or(|s| s.instances.is_empty() && s.virtual_ip.is_none());
        if let (true, Some(closest)) = (unknown, ferry_runtime::suggest::closest(service, known.iter().map(String::as_str))) {
            typos.push(format!("there is no service {service:?} (did you mean {closest:?}?)"));
        }
    }
    // The likely mistake first, then what the check itself found.
    if !typos.is_empty() {
        field.reason = format!("{}; {}", typos.join("; "), field.reason);
    }
    ResourceError::Invalid(field)
}

/// A note for each subset of `policy` whose labels no current instance carries, with the values
/// the instances do have for those labels.
fn unmatched_subsets(policy: &v1::ServicePolicy, instances: &[Arc<Instance>]) -> Vec<String> {
    let mut notes = Vec::new();
    let mut subsets: Vec<_> = policy.subsets.iter().collect();
    subsets.sort_by_key(|(name, _)| name.as_str());
    for (name, subset) in subsets {
        let matches = |i: &Arc<Instance>| subset.labels.iter().all(|(k, v)| i.metadata.get(k) == Some(v));
        if subset.labels.is_empty() || instances.iter().any(matches) {
            continue;
        }
        let mut wanted: Vec<_> = subset.labels.iter().collect();
        wanted.sort();
        let existing: Vec<String> = wanted
            .iter()
            .map(|(key, _)| {
                let mut values: Vec<&str> =
                    instances.iter().filter_map(|i| i.metadata.get(key.as_str())).map(String::as_str).collect();
                values.sort_unstable();
                values.dedup();
                match values.as_slice() {
                    [] => format!("no instance has {key}"),
                    values => format!("{key}={}", values.join(", ")),
                }
            })
            .collect();
        let labels: Vec<String> = wanted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        notes.push(format!(
            "policy/{}: subset {name} ({}) matches no instance of {} (its instances have {}); a route to it gets 503 no_endpoints",
            policy.service,
            labels.join(", "),
            policy.service,
            existing.join("; "),
        ));
    }
    notes
}

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
    let kind = Kind::from_proto(kind).ok_or_else(|| {
        FieldError::new("kind", "must be RESOURCE_KIND_ROUTE, RESOURCE_KIND_POLICY or RESOURCE_KIND_AUTHORIZATION")
    })?;
    validate::service_name("service", service)?;
    Ok(kind)
}

/// The gRPC `Config` service.
#[derive(Clone)]
pub struct ConfigService {
    resources: Arc<Resources>,
    sidecars: Arc<Sidecars>,
    registry: Arc<Registry>,
}

impl ConfigService {
    /// A service over `resources`; `sidecars` tell who calls whom and `registry` which
    /// instances exist, for the apply notes.
    pub fn new(resources: Arc<Resources>, sidecars: Arc<Sidecars>, registry: Arc<Registry>) -> Self {
        Self { resources, sidecars, registry }
    }
}

#[tonic::async_trait]
impl Config for ConfigService {
    async fn apply(&self, request: Request<v1::ApplyRequest>) -> Result<tonic::Response<v1::ApplyResponse>, Status> {
        Principal::of(&request)?.require_admin("applying resources")?;
        let request = request.into_inner();
        let items = request.items;
        let applied = match self.resources.apply(items.clone(), request.dry_run).await {
            Ok(applied) => applied,
            Err(error) => return Err(status(unknown_service_hint(error, &items, &self.registry))),
        };
        log_applied(&applied, request.dry_run);
        let notes = notes(&applied, &self.sidecars, &self.registry);
        Ok(tonic::Response::new(v1::ApplyResponse { applied, notes }))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<tonic::Response<v1::GetResponse>, Status> {
        Principal::of(&request)?.require_read("reading resources")?;
        let request = request.into_inner();
        let kind = kind_and_service(request.kind, &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let resource = self
            .resources
            .get(kind, &request.service)
            .ok_or_else(|| status(ResourceError::NotFound { kind, service: request.service.clone() }))?;
        Ok(tonic::Response::new(v1::GetResponse { resource: Some(resource) }))
    }

    async fn list(&self, request: Request<v1::ListRequest>) -> Result<tonic::Response<v1::ListResponse>, Status> {
        Principal::of(&request)?.require_read("listing resources")?;
        let request = request.into_inner();
        let kind = Kind::from_proto(request.kind);
        if !request.service.is_empty() {
            validate::service_name("service", &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let service = Some(request.service.as_str()).filter(|s| !s.is_empty());
        Ok(tonic::Response::new(v1::ListResponse { resources: self.resources.list(kind, service) }))
    }

    async fn delete(&self, request: Request<v1::DeleteRequest>) -> Result<tonic::Response<v1::DeleteResponse>, Status> {
        Principal::of(&request)?.require_admin("deleting resources")?;
        let request = request.into_inner();
        let kind = kind_and_service(request.kind, &request.service).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let removed = self.resources.delete(kind, &request.service, request.expected_version).await.map_err(status)?;
        tracing::info!(kind = kind.name(), service = %request.service, "deleted");
        Ok(tonic::Response::new(v1::DeleteResponse { resource: Some(removed) }))
    }

    async fn history(&self, request: Request<v1::HistoryRequest>) -> Result<tonic::Response<v1::HistoryResponse>, Status> {
        Principal::of(&request)?.require_read("reading the history of resources")?;
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

/// A refusal as the HTTP API answers it.
fn refused(code: StatusCode, error: impl std::fmt::Display) -> Response {
    (code, Json(serde_json::json!({ "error": error.to_string() }))).into_response()
}

/// What the resource handlers share.
#[derive(Clone)]
pub struct ConfigState {
    resources: Arc<Resources>,
    sidecars: Arc<Sidecars>,
    registry: Arc<Registry>,
}

/// The routes of the resources API, to merge into the HTTP API's router.
pub fn router(resources: Arc<Resources>, sidecars: Arc<Sidecars>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v1/apply", post(apply))
        .route("/v1/{kind}", get(list_kind))
        .route("/v1/{kind}/{service}", get(get_one).put(put_one).delete(delete_one))
        .route("/v1/{kind}/{service}/history", get(history))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ConfigState { resources, sidecars, registry })
}

/// The kind a path names (`routes`, `policies` or `authorizations`), once `allowed` says the
/// caller may do what it asks; else the answer: 404 for another name, 403 when not allowed.
fn path_kind(name: &str, allowed: impl FnOnce() -> Result<(), Denied>) -> Result<Kind, Box<Response>> {
    let kind = match name {
        "routes" => Kind::Route,
        "policies" => Kind::Policy,
        "authorizations" => Kind::Authorization,
        other => {
            return Err(Box::new(refused(StatusCode::NOT_FOUND, format!("no endpoint /v1/{other}; see docs/api.md"))));
        }
    };
    allowed().map_err(|denied| Box::new(refused(StatusCode::FORBIDDEN, denied)))?;
    Ok(kind)
}

/// Whether a body is JSON, by its content type, which [`body_type`] has already required to
/// be YAML or JSON.
fn is_json(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|kind| kind.to_ascii_lowercase().contains("json"))
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
    State(state): State<ConfigState>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(denied) = principal.require_admin("applying resources") {
        return refused(StatusCode::FORBIDDEN, denied);
    }
    if let Err(why) = body_type(&headers, &RESOURCE_TYPES) {
        return refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, why);
    }
    let resources = &state.resources;
    let dry_run = query.get("dry_run").is_some_and(|v| v.is_empty() || v == "true" || v == "1");
    let json = is_json(&headers);
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
    let items: Vec<v1::ApplyItem> =
        documents.into_iter().map(|(_, r)| v1::ApplyItem { resource: Some(r), expected_version: None }).collect();
    let result = resources.apply(items.clone(), dry_run).await.map_err(|e| unknown_service_hint(e, &items, &state.registry));
    match result {
        Ok(applied) => {
            log_applied(&applied, dry_run);
            let notes = notes(&applied, &state.sidecars, &state.registry);
            Json(v1::ApplyResponse { applied, notes }).into_response()
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

async fn list_kind(
    State(state): State<ConfigState>,
    Extension(principal): Extension<Principal>,
    Path(kind): Path<String>,
) -> Response {
    let kind = match path_kind(&kind, || principal.require_read("listing resources")) {
        Ok(kind) => kind,
        Err(response) => return *response,
    };
    Json(v1::ListResponse { resources: state.resources.list(Some(kind), None) }).into_response()
}

async fn get_one(
    State(state): State<ConfigState>,
    Extension(principal): Extension<Principal>,
    Path((kind, service)): Path<(String, String)>,
) -> Response {
    let kind = match path_kind(&kind, || principal.require_read("reading resources")) {
        Ok(kind) => kind,
        Err(response) => return *response,
    };
    if let Err(error) = validate::service_name("service", &service) {
        return http_error(error.into());
    }
    match state.resources.get(kind, &service) {
        Some(resource) => Json(json::resource_to_value(&resource)).into_response(),
        None => http_error(ResourceError::NotFound { kind, service }),
    }
}

/// `PUT /v1/{routes,policies,authorizations}/{service}[?expected_version=N]` with the resource
/// as JSON or YAML.
async fn put_one(
    State(state): State<ConfigState>,
    Extension(principal): Extension<Principal>,
    Path((kind, service)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let kind = match path_kind(&kind, || principal.require_admin("applying resources")) {
        Ok(kind) => kind,
        Err(response) => return *response,
    };
    if let Err(why) = body_type(&headers, &RESOURCE_TYPES) {
        return refused(StatusCode::UNSUPPORTED_MEDIA_TYPE, why);
    }
    let expected_version = match query.get("expected_version").map(|v| v.parse::<u64>()) {
        Some(Ok(version)) => Some(version),
        Some(Err(_)) => return http_error(FieldError::new("expected_version", "must be a number").into()),
        None => None,
    };
    let value: Result<serde_json::Value, String> = if is_json(&headers) {
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
    } else {
        json::refuse_costly_yaml(&String::from_utf8_lossy(&body))
            .map_err(|e| e.reason)
            .and_then(|()| serde_yaml_ng::from_slice(&body).map_err(|e| format!("not valid YAML: {e}")))
    };
    let mut value = match value {
        Ok(value) => value,
        Err(error) => return http_error(FieldError::new("body", error).into()),
    };
    if let serde_json::Value::Object(members) = &mut value {
        let name = match kind {
            Kind::Route => json::ROUTE,
            Kind::Policy => json::POLICY,
            Kind::Authorization => json::AUTHORIZATION,
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
    let items = vec![v1::ApplyItem { resource: Some(resource), expected_version }];
    let result = state.resources.apply(items.clone(), false).await.map_err(|e| unknown_service_hint(e, &items, &state.registry));
    match result {
        Ok(mut applied) => {
            log_applied(&applied, false);
            let resource = applied.pop().and_then(|a| a.resource).unwrap_or_default();
            Json(json::resource_to_value(&resource)).into_response()
        }
        Err(error) => http_error(strip_item_prefix(error)),
    }
}

async fn delete_one(
    State(state): State<ConfigState>,
    Extension(principal): Extension<Principal>,
    Path((kind, service)): Path<(String, String)>,
) -> Response {
    let kind = match path_kind(&kind, || principal.require_admin("deleting resources")) {
        Ok(kind) => kind,
        Err(response) => return *response,
    };
    if let Err(error) = validate::service_name("service", &service) {
        return http_error(error.into());
    }
    match state.resources.delete(kind, &service, None).await {
        Ok(removed) => Json(json::resource_to_value(&removed)).into_response(),
        Err(error) => http_error(error),
    }
}

async fn history(
    State(state): State<ConfigState>,
    Extension(principal): Extension<Principal>,
    Path((kind, service)): Path<(String, String)>,
) -> Response {
    let kind = match path_kind(&kind, || principal.require_read("reading the history of resources")) {
        Ok(kind) => kind,
        Err(response) => return *response,
    };
    Json(v1::HistoryResponse { entries: state.resources.history(kind, &service) }).into_response()
}

/// Field paths of a single PUT are relative to the body, not to an apply's item list.
fn strip_item_prefix(error: ResourceError) -> ResourceError {
    rename_items(error, |field| {
        field.strip_prefix("items[0].resource.").or_else(|| field.strip_prefix("items[0].")).unwrap_or(field).to_owned()
    })
}
