//! `/v1/agent/...`: registration, deregistration and TTL updates, which go through the same
//! registry and health checks as Ferry's `PUT /v1/instances`, `DELETE /v1/instances/{id}` and
//! `PUT /v1/checks/{id}/{status}`; and the agent's view of its services and checks, which is
//! every instance (Ferry is the one agent).

use std::collections::BTreeMap;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
};
use ferry_health::Health;
use serde_json::json;

use super::{ConsulError, ConsulState, ReadQuery, json_body, read_catalog, register, views};
use crate::{auth::Principal, checks::TtlFailure, registry::InstanceSpec};

/// The most output a check update keeps, as Consul (4 KiB).
const MAX_OUTPUT_BYTES: usize = 4096;

/// `PUT /v1/agent/service/register`.
pub async fn register(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ConsulError> {
    let body = register::fold_keys(json_body(&body)?);
    let instance = register::instance(&body).map_err(ConsulError::field)?;
    // From here on, what `PUT /v1/instances` does, with the checks named as the client named them.
    let names = register::check_names(&body);
    let refused = |error| ConsulError::field(register::name_checks(error, &names));
    let spec = InstanceSpec::try_from(instance).map_err(refused)?;
    principal.require_service(&spec.service, "registering an instance")?;
    let http = &state.http;
    http.checks.admit(&spec).await.map_err(refused)?;
    let id = spec.id.clone();
    let registered = http.registry.register(spec).await;
    // Also when the store failed: the change is in memory, and the checks follow memory.
    http.checks.sync(&id);
    let instance = registered?;
    tracing::info!(id = %instance.id, service = %instance.service, "registered through the Consul API");
    Ok(().into_response())
}

/// `PUT /v1/agent/service/deregister/{id}`.
pub async fn deregister(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    ferry_proto::validate::instance_id("ID", &id).map_err(ConsulError::field)?;
    let http = &state.http;
    let existing = http.registry.instance(&id);
    crate::api::may_deregister(&principal, existing.as_deref())?;
    if existing.is_none() {
        return Err(ConsulError::not_found(format!(
            "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
        )));
    }
    let removed = http.registry.deregister(&id).await;
    http.checks.sync(&id);
    let removed = removed?;
    tracing::info!(id = %removed.id, service = %removed.service, "deregistered through the Consul API");
    Ok(().into_response())
}

/// `PUT /v1/agent/check/{pass,warn,fail}/{id}?note=` and `PUT /v1/agent/check/update/{id}`
/// (body `{"Status", "Output"}`): a TTL check's renewal.
pub async fn update_check(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Path((verb, id)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Result<Response, ConsulError> {
    let note = query.iter().find(|(k, _)| k == "note").map(|(_, v)| v.clone()).unwrap_or_default();
    let (status, output) = match verb.as_str() {
        "pass" => (Health::Passing, note),
        "warn" => (Health::Warning, note),
        "fail" => (Health::Critical, note),
        "update" => {
            let body = super::register::fold_keys(json_body(&body)?);
            let status = match body.get("status").and_then(|s| s.as_str()) {
                Some("passing") => Health::Passing,
                Some("warning") => Health::Warning,
                Some("critical") => Health::Critical,
                other => {
                    return Err(ConsulError::bad_request(format!(
                        "Status: must be passing, warning or critical, got {}",
                        other.unwrap_or("nothing")
                    )));
                }
            };
            (status, body.get("output").and_then(|o| o.as_str()).unwrap_or_default().to_owned())
        }
        other => return Err(ConsulError::not_found(format!("Ferry does not implement /v1/agent/check/{other}"))),
    };
    ferry_proto::validate::instance_id("CheckID", &id).map_err(ConsulError::field)?;
    let http = &state.http;
    match http.registry.check_owner(&id) {
        Some(owner) => principal.require_service(&owner.service, "renewing a TTL check")?,
        None if matches!(principal, Principal::Read { .. }) => principal.require_admin("renewing a TTL check")?,
        None => {}
    }
    http.checks.ttl(&id, status, truncate(output, MAX_OUTPUT_BYTES)).await.map_err(|failure| match failure {
        TtlFailure::UnknownCheck(_) => ConsulError::not_found(format!("Unknown check ID {id:?}")),
        TtlFailure::Forward(why) => ConsulError::unavailable(why),
        other => {
            let text = other.to_string();
            ConsulError::bad_request(format!("CheckID: {}", text.strip_prefix("id: ").unwrap_or(&text)))
        }
    })?;
    Ok(().into_response())
}

fn truncate(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// `GET /v1/agent/services`: service id to `AgentService`.
pub async fn services(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing services")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    read_catalog(&state, query.blocking, |instances| {
        views(&state, &query, instances.iter())
            .iter()
            .map(|v| (v.instance.id.clone(), v.agent_service(&state.consul)))
            .collect::<BTreeMap<String, _>>()
    })
    .await
}

/// `GET /v1/agent/service/{id}`: one instance as `AgentService`; 404 when there is none.
pub async fn service(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("reading a service")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    let unknown = || ConsulError::not_found(format!("unknown service ID: {id}"));
    ferry_proto::validate::instance_id("ID", &id).map_err(|_| unknown())?;
    let instance = state.http.registry.instance(&id).ok_or_else(unknown)?;
    let view = views(&state, &query, std::iter::once(&instance)).pop().ok_or_else(unknown)?;
    Ok(Json(view.agent_service(&state.consul)).into_response())
}

/// `GET /v1/agent/checks`: check id to `AgentCheck`.
pub async fn checks(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing checks")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    read_catalog(&state, query.blocking, |instances| {
        views(&state, &query, instances.iter())
            .iter()
            .flat_map(|v| v.checks(&state.consul))
            .map(|check| (check.check_id.clone(), check))
            .collect::<BTreeMap<String, _>>()
    })
    .await
}

/// `GET /v1/agent/self`: enough for clients that read the datacenter, node and version. Every
/// top-level value is an object, as Consul's Go client decodes it.
pub async fn agent_self(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ConsulError> {
    principal.require_read("reading the agent")?;
    let consul = &state.consul;
    let body = json!({
        "Config": {
            "Datacenter": consul.datacenter,
            "PrimaryDatacenter": consul.datacenter,
            "NodeName": consul.node_name,
            "NodeID": "",
            "Server": true,
            "Revision": format!("ferry-{}", env!("CARGO_PKG_VERSION")),
            "Version": super::CONSUL_VERSION,
        },
        "Member": {
            "Name": consul.node_name,
            "Addr": consul.node_address,
            "Port": 8301,
            "Tags": { "dc": consul.datacenter, "role": "consul", "build": super::CONSUL_VERSION },
            "Status": 1,
            "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
            "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
        },
        "Meta": {},
        "Stats": {},
        "DebugConfig": {},
        "Ferry": { "Version": env!("CARGO_PKG_VERSION") },
    });
    Ok(Json(body).into_response())
}
