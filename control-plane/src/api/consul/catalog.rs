//! `/v1/catalog/...`: the services, their instances and the one node.

use std::collections::BTreeMap;

use axum::{
    Extension, Json,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
};

use super::{
    ConsulError, ConsulState, ReadQuery,
    blocking::{self, Wake},
    indexed, node_meta_accepts, read_catalog, read_service, views,
};
use crate::auth::Principal;

/// `GET /v1/catalog/services`: service name to the union of its instances' tags.
pub async fn services(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing services")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    let node_ok = node_meta_accepts(&state.consul, &query)?;
    read_catalog(&state, query.blocking, |all| {
        let instances = if node_ok { all } else { &[] };
        let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for view in views(&state, &query, instances.iter()) {
            let tags = services.entry(view.instance.service.clone()).or_default();
            for tag in view.tags {
                if !tags.contains(&tag) {
                    tags.push(tag);
                }
            }
        }
        services
    })
    .await
}

/// `GET /v1/catalog/service/{name}?tag=&node-meta=&filter=`: its instances as
/// `CatalogService`s; an unknown service is an empty list, as in Consul.
pub async fn service(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing instances")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    let node_ok = node_meta_accepts(&state.consul, &query)?;
    read_service(&state, query.blocking, &name, |snapshot| {
        if node_ok {
            views(&state, &query, snapshot.instances.values()).iter().map(|v| v.catalog_service(&state.consul)).collect()
        } else {
            Vec::new()
        }
    })
    .await
}

/// `GET /v1/catalog/nodes`: the one node.
pub async fn nodes(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing nodes")?;
    let query = ReadQuery::parse(&state.consul, pairs)?;
    let nodes = if node_meta_accepts(&state.consul, &query)? { vec![state.consul.node()] } else { Vec::new() };
    // The node never changes: a blocking query waits out its wait, as Consul's would.
    let (index, nodes) = blocking::answer(&state, query.blocking, Wake::Never, || 1, || nodes).await?;
    Ok(indexed(index, nodes))
}

/// `GET /v1/catalog/datacenters`: the one datacenter.
pub async fn datacenters(
    State(state): State<ConsulState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ConsulError> {
    principal.require_read("listing datacenters")?;
    Ok(Json(vec![state.consul.datacenter.clone()]).into_response())
}
