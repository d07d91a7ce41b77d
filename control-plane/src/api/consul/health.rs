//! `/v1/health/...`: instances with their checks, and checks by state.

use axum::{
    Extension,
    extract::{Path, Query, State},
    response::Response,
};

use super::{ConsulError, ConsulState, ReadQuery, node_meta_accepts, read_catalog, read_service, views};
use crate::auth::Principal;

/// `GET /v1/health/service/{name}?passing&tag=&node-meta=&filter=`: `{Node, Service, Checks}`
/// per instance; with `passing`, only instances whose every check passes.
pub async fn service(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing instances")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    let node_ok = node_meta_accepts(&state.consul, &query)?;
    let passing = query.flag("passing");
    read_service(&state, query.blocking, &name, |snapshot| {
        views(&state, &query, snapshot.instances.values().filter(|_| node_ok))
            .iter()
            .filter(|v| !passing || v.status() == "passing")
            .map(|v| v.entry(&state.consul))
            .collect::<Vec<_>>()
    })
    .await
}

/// `GET /v1/health/checks/{name}`: the checks of a service's instances, each instance's
/// synthetic `ferry:ID` check first (see [`super::shapes::View::instance_check`]).
pub async fn checks(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing checks")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    read_service(&state, query.blocking, &name, |snapshot| {
        views(&state, &query, snapshot.instances.values()).iter().flat_map(|v| v.health_checks(&state.consul)).collect::<Vec<_>>()
    })
    .await
}

/// `GET /v1/health/state/{any,passing,warning,critical}`: every check in that state, each
/// instance's synthetic `ferry:ID` check among them (as Consul lists its node's `serfHealth`), so
/// an alert on `critical` sees a sidecar's instance, which has no checks of its own.
pub async fn state(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Path(wanted): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing checks")?;
    if !matches!(wanted.as_str(), "any" | "passing" | "warning" | "critical") {
        return Err(ConsulError::bad_request(format!("state: {wanted:?} must be any, passing, warning or critical")));
    }
    let query = ReadQuery::parse(&state.consul, pairs)?;
    read_catalog(&state, query.blocking, |instances| {
        views(&state, &query, instances.iter())
            .iter()
            .flat_map(|v| v.health_checks(&state.consul))
            .filter(|check| wanted == "any" || check.status == wanted)
            .collect::<Vec<_>>()
    })
    .await
}
