//! A Consul-compatible subset of the HTTP API, so Consul clients register, watch and discover
//! services against Ferry unchanged (see `docs/consul.md`).
//!
//! Served under `/v1/agent/`, `/v1/catalog/`, `/v1/health/` and `/v1/status/` on the control
//! plane's HTTP port, next to Ferry's own `/v1/...` routes (none of which share those prefixes),
//! and on `--consul-http` alone. Instances registered here are ordinary API instances: the
//! same validation, permission checks, registry and health checks as `PUT /v1/instances`.
//!
//! Consul's conventions hold here rather than Ferry's: errors are plain text (400 names the
//! field), tokens come as `X-Consul-Token` or `?token=` (mapped onto Ferry's bearer tokens by
//! [`consul_token`]), unknown query parameters and body fields are ignored, bodies are JSON
//! whatever their content type, and every read answers `X-Consul-Index`.
//!
//! Ferry plays a single Consul agent and server: one datacenter (`--datacenter`, default
//! `dc1`), one node named `ferry` whose address is the control plane's, which every instance is
//! registered on.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, Request, State},
    http::{HeaderValue, StatusCode, Uri, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{any, get, put},
};
use ferry_proto::validate::FieldError;
use serde_json::json;

use self::{blocking::CatalogIndex, shapes::Node};
use crate::{
    api::http::HttpState,
    auth::Denied,
    registry::{Instance, RegistryError},
};

mod agent;
mod blocking;
mod catalog;
mod filter;
mod health;
#[cfg(test)]
mod properties;
mod register;
mod shapes;
mod tags;
#[cfg(test)]
mod tests;

/// The node every instance is on.
pub const NODE_NAME: &str = "ferry";
/// The Consul API version `GET /v1/agent/self` reports: the one whose shapes Ferry follows.
const CONSUL_VERSION: &str = "1.17.0";
/// Consul's API prefixes Ferry owns on its HTTP port: what it implements of them, and a 404
/// saying so for the rest.
const IMPLEMENTED_PREFIXES: [&str; 4] = ["agent", "catalog", "health", "status"];
/// Consul's API prefixes Ferry does not implement at all.
const UNIMPLEMENTED_PREFIXES: [&str; 18] = [
    "kv",
    "session",
    "acl",
    "connect",
    "event",
    "txn",
    "query",
    "operator",
    "coordinate",
    "config",
    "snapshot",
    "discovery-chain",
    "peering",
    "namespace",
    "namespaces",
    "partition",
    "partitions",
    "internal",
];

/// What the Consul API needs beyond the HTTP API's state.
#[derive(Debug)]
pub struct Consul {
    pub datacenter: String,
    pub node_name: String,
    /// The node's address: the control plane's HTTP address, or loopback when it listens on
    /// every address.
    pub node_address: String,
    /// `GET /v1/status/leader`: the control plane's HTTP `IP:PORT`.
    pub leader: String,
    catalog: CatalogIndex,
    /// Permits for Consul's blocking queries, fewer than Ferry's own API has: Consul clients
    /// (watches, Prometheus, consul-template) hold one each for minutes at a time.
    blocking: Arc<tokio::sync::Semaphore>,
}

impl Consul {
    /// The Consul API of the control plane serving HTTP on `http`, in `datacenter`.
    pub fn new(datacenter: String, http: SocketAddr) -> Self {
        let ip = if http.ip().is_unspecified() { std::net::Ipv4Addr::LOCALHOST.into() } else { http.ip() };
        Self {
            datacenter,
            node_name: NODE_NAME.to_owned(),
            node_address: ip.to_string(),
            leader: SocketAddr::new(ip, http.port()).to_string(),
            catalog: CatalogIndex::default(),
            blocking: Arc::new(tokio::sync::Semaphore::new(blocking::MAX_CONSUL_BLOCKING_QUERIES)),
        }
    }

    /// The one node.
    pub fn node(&self) -> Node {
        Node {
            id: String::new(),
            node: self.node_name.clone(),
            address: self.node_address.clone(),
            datacenter: self.datacenter.clone(),
            tagged_addresses: [("lan".to_owned(), self.node_address.clone()), ("wan".to_owned(), self.node_address.clone())]
                .into(),
            meta: Default::default(),
            create_index: 1,
            modify_index: 1,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
struct ConsulState {
    http: HttpState,
    consul: Arc<Consul>,
}

/// The Consul routes, to merge into the HTTP API's router.
pub fn routes(http: HttpState, consul: Arc<Consul>) -> Router {
    let mut router = Router::new()
        .route("/v1/agent/service/register", put(agent::register))
        .route("/v1/agent/service/deregister/{id}", put(agent::deregister))
        .route("/v1/agent/check/{status}/{id}", put(agent::update_check))
        .route("/v1/agent/services", get(agent::services))
        .route("/v1/agent/service/{id}", get(agent::service))
        .route("/v1/agent/checks", get(agent::checks))
        .route("/v1/agent/self", get(agent::agent_self))
        .route("/v1/catalog/services", get(catalog::services))
        .route("/v1/catalog/service/{name}", get(catalog::service))
        .route("/v1/catalog/nodes", get(catalog::nodes))
        .route("/v1/catalog/datacenters", get(catalog::datacenters))
        .route("/v1/health/service/{name}", get(health::service))
        .route("/v1/health/checks/{name}", get(health::checks))
        .route("/v1/health/state/{state}", get(health::state))
        .route("/v1/status/leader", get(leader))
        .route("/v1/status/peers", get(peers));
    for prefix in IMPLEMENTED_PREFIXES.iter().chain(&UNIMPLEMENTED_PREFIXES) {
        router = router
            .route(&format!("/v1/{prefix}"), any(not_implemented))
            .route(&format!("/v1/{prefix}/{{*rest}}"), any(not_implemented));
    }
    router.with_state(ConsulState { http, consul })
}

/// The router of `--consul-http`: the Consul routes alone, every other path a Consul-style 404.
pub fn standalone(http: HttpState, consul: Arc<Consul>) -> Router {
    routes(http, consul).fallback(not_implemented)
}

/// Logs a warning when the `--consul-http` listener is bound to `addr` off loopback: it is plain
/// HTTP (Consul clients expect that on their default address), so tokens sent to it and the
/// registrations it takes cross the network in the clear. Returns whether it warned.
pub fn warn_if_exposed(addr: SocketAddr) -> bool {
    if addr.ip().is_loopback() {
        return false;
    }
    tracing::warn!(
        %addr,
        "--consul-http serves plain HTTP off loopback: Consul tokens and registrations cross the network \
         unencrypted; bind it to 127.0.0.1 or keep it on a trusted network (see docs/security.md)"
    );
    true
}

/// Whether `path` is one of Consul's, which this module answers.
pub fn serves(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v1/") else { return false };
    let prefix = rest.split('/').next().unwrap_or_default();
    IMPLEMENTED_PREFIXES.contains(&prefix) || UNIMPLEMENTED_PREFIXES.contains(&prefix)
}

/// Consul's tokens: `token` leaves every request's query (Ferry's own routes never read it, and
/// a token must not reach the access log whatever the path), and on Consul's paths the Consul
/// token becomes Ferry's bearer token, a refusal Consul's 403. On the `--consul-http` listener
/// (`standalone`) every path is Consul's.
pub async fn consul_token(
    axum::extract::State(standalone): axum::extract::State<bool>,
    request: Request,
    next: Next,
) -> Response {
    let consul = standalone || serves(request.uri().path());
    map_token(request, next, consul).await
}

/// Takes `token` out of the query before anything logs the URI; when `consul`, puts Consul's
/// token in Ferry's `Authorization` with Consul's precedence (`?token=`, then
/// `X-Consul-Token`, then `Authorization`) and answers a refusal as Consul does: 403 with a
/// plain-text reason.
async fn map_token(mut request: Request, next: Next, consul: bool) -> Response {
    let (query_token, uri) = take_token(request.uri());
    *request.uri_mut() = uri;
    if !consul {
        return next.run(request).await;
    }
    let header_token = request.headers().get("x-consul-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(token) = query_token.or(header_token) {
        match HeaderValue::from_str(&format!("Bearer {}", token.trim())) {
            Ok(value) => {
                request.headers_mut().insert(header::AUTHORIZATION, value);
            }
            // A token that cannot be a header is no token: it must not fall back to a weaker one.
            Err(_) => {
                request.headers_mut().remove(header::AUTHORIZATION);
            }
        }
    }
    let response = next.run(request).await;
    if response.status() != StatusCode::UNAUTHORIZED {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let why = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_default();
    ConsulError { status: StatusCode::FORBIDDEN, text: format!("ACL not found: {why}") }.into_response()
}

/// `uri` without its `token` query parameters, and the token.
fn take_token(uri: &Uri) -> (Option<String>, Uri) {
    let Some(query) = uri.query() else { return (None, uri.clone()) };
    let mut token = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            // `%74oken` is `token` to every query parser after this one.
            if percent_decode(key) != "token" {
                return true;
            }
            token = Some(percent_decode(value));
            false
        })
        .collect();
    if token.is_none() {
        return (None, uri.clone());
    }
    let path_and_query = if kept.is_empty() { uri.path().to_owned() } else { format!("{}?{}", uri.path(), kept.join("&")) };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    (token, Uri::from_parts(parts).unwrap_or_else(|_| uri.clone()))
}

/// Decodes a query value: `+` is a space, `%XX` a byte.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => decoded.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        decoded.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => decoded.push(b'%'),
                }
            }
            byte => decoded.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// An error as Consul answers it: a status and a plain-text reason.
#[derive(Debug)]
pub struct ConsulError {
    status: StatusCode,
    text: String,
}

impl ConsulError {
    pub fn bad_request(text: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, text: text.into() }
    }

    pub fn not_found(text: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, text: text.into() }
    }

    /// Too many requests: what Consul answers when its own limits refuse a request.
    pub fn too_many(text: impl Into<String>) -> Self {
        Self { status: StatusCode::TOO_MANY_REQUESTS, text: text.into() }
    }

    pub fn unavailable(text: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, text: text.into() }
    }

    /// A field Ferry's validation refused, named as Consul names it.
    pub fn field(error: FieldError) -> Self {
        let field = register::consul_field(&error.field);
        Self::bad_request(if field.is_empty() { error.reason } else { format!("{field}: {}", error.reason) })
    }
}

impl From<Denied> for ConsulError {
    fn from(denied: Denied) -> Self {
        Self { status: StatusCode::FORBIDDEN, text: format!("Permission denied: {}", denied.0) }
    }
}

impl From<RegistryError> for ConsulError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Invalid(field) => Self::field(field),
            RegistryError::NotFound(_) => Self::not_found(error.to_string()),
            RegistryError::Unavailable(_) => Self::unavailable(error.to_string()),
        }
    }
}

impl IntoResponse for ConsulError {
    fn into_response(self) -> Response {
        let mut text = self.text;
        text.push('\n');
        (self.status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
    }
}

/// A JSON read answer with Consul's index headers.
fn indexed<T: serde::Serialize>(index: u64, body: T) -> Response {
    (blocking::headers(index), Json(body)).into_response()
}

/// The query parameters every read takes: blocking, `dc`, `filter`, and what is left for the
/// endpoint (`tag`, `node-meta`, `passing`).
struct ReadQuery {
    blocking: blocking::Blocking,
    filter: Option<filter::Filter>,
    rest: Vec<(String, String)>,
}

impl ReadQuery {
    fn parse(consul: &Consul, pairs: Vec<(String, String)>) -> Result<Self, ConsulError> {
        let mut query = Self { blocking: blocking::Blocking::default(), filter: None, rest: Vec::new() };
        for (key, value) in pairs {
            if query.blocking.take(&key, &value)? {
                continue;
            }
            match key.as_str() {
                "dc" if !value.is_empty() && value != consul.datacenter => {
                    return Err(ConsulError::bad_request(format!(
                        "dc: Ferry serves one datacenter, {:?}, not {value:?}",
                        consul.datacenter
                    )));
                }
                "filter" => query.filter = Some(filter::Filter::parse(&value).map_err(ConsulError::bad_request)?),
                _ => query.rest.push((key, value)),
            }
        }
        Ok(query)
    }

    /// The values of parameter `key`.
    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rest.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Whether flag `key` is set (`?passing`, `?passing=true`, `?passing=1`).
    fn flag(&self, key: &str) -> bool {
        self.all(key).any(|v| v.is_empty() || v == "true" || v == "1")
    }
}

/// Whether the one node passes `node-meta` filters (`KEY:VALUE`, every one must hold).
fn node_meta_accepts(consul: &Consul, query: &ReadQuery) -> Result<bool, ConsulError> {
    let meta = consul.node().meta;
    let mut accepted = true;
    for pair in query.all("node-meta") {
        let (key, value) =
            pair.split_once(':').ok_or_else(|| ConsulError::bad_request(format!("node-meta: {pair:?} must be KEY:VALUE")))?;
        accepted &= meta.get(key).is_some_and(|v| v == value);
    }
    Ok(accepted)
}

/// The views of `instances` that pass the query's `tag`s and `filter`.
fn views<'a>(state: &ConsulState, query: &ReadQuery, instances: impl Iterator<Item = &'a Arc<Instance>>) -> Vec<shapes::View> {
    let empty = Default::default();
    let wanted_tags: Vec<&str> = query.all("tag").collect();
    instances
        .map(|i| shapes::View::new(i, state.http.registry.describe(i)))
        .filter(|view| wanted_tags.iter().all(|tag| view.tags.iter().any(|t| t == tag)))
        .filter(|view| query.filter.as_ref().is_none_or(|f| f.accepts(&view.subject(&state.consul, &empty))))
        .collect()
}

/// Whether `name` could be a Ferry service's. A name that could not is answered by
/// [`no_such_service`] without asking the registry, whose watch would keep a placeholder for it
/// (as long as the name, for as long as a blocking query holds it).
fn valid_service_name(name: &str) -> bool {
    ferry_proto::validate::service_name("service", name).is_ok()
}

/// The answer about a service that cannot exist: `[]` at index 1, as Consul answers an unknown
/// service; a blocking query waits out its wait, watching nothing.
async fn no_such_service(state: &ConsulState, blocking: blocking::Blocking) -> Result<Response, ConsulError> {
    let (index, none) = blocking::answer(state, blocking, blocking::Wake::Never, || 1, Vec::<()>::new).await?;
    Ok(indexed(index, none))
}

/// A read of one service, answered as a blocking query: `build` over the service's snapshot,
/// woken by the registry's watch of it; a name that cannot be a service is
/// [`no_such_service`].
async fn read_service<T: serde::Serialize>(
    state: &ConsulState,
    blocking: blocking::Blocking,
    name: &str,
    build: impl FnOnce(&crate::registry::ServiceSnapshot) -> T,
) -> Result<Response, ConsulError> {
    if !valid_service_name(name) {
        return no_such_service(state, blocking).await;
    }
    let watch = state.http.registry.watch(name);
    let snapshots = watch.clone();
    let index = || snapshots.borrow().index.max(1);
    let (index, body) =
        blocking::answer(state, blocking, blocking::Wake::Service(watch), index, || build(&snapshots.borrow().clone())).await?;
    Ok(indexed(index, body))
}

/// A read across every service, answered as a blocking query: `build` over every instance,
/// rebuilt only when the catalog's index moves.
async fn read_catalog<T: serde::Serialize>(
    state: &ConsulState,
    blocking: blocking::Blocking,
    build: impl FnOnce(&[Arc<Instance>]) -> T,
) -> Result<Response, ConsulError> {
    let index = || state.consul.catalog.current(&state.http.registry);
    let (index, body) = blocking::answer(state, blocking, blocking::Wake::Poll, index, || build(&all_instances(state))).await?;
    Ok(indexed(index, body))
}

/// Every instance, of every service, by service and id.
fn all_instances(state: &ConsulState) -> Vec<Arc<Instance>> {
    state
        .http
        .registry
        .services()
        .iter()
        .filter_map(|summary| state.http.registry.snapshot(&summary.name))
        .flat_map(|snapshot| snapshot.instances.values().cloned().collect::<Vec<_>>())
        .collect()
}

async fn leader(
    State(state): State<ConsulState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> Result<Response, ConsulError> {
    principal.require_read("reading the leader")?;
    Ok(Json(state.consul.leader.clone()).into_response())
}

async fn peers(
    State(state): State<ConsulState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> Result<Response, ConsulError> {
    principal.require_read("reading the peers")?;
    Ok(Json(vec![state.consul.leader.clone()]).into_response())
}

/// Consul's endpoints Ferry does not implement.
async fn not_implemented(method: axum::http::Method, Query(_): Query<Vec<(String, String)>>, uri: Uri) -> Response {
    let body = json!({
        "error": format!("Ferry does not implement Consul's {method} {}; see docs/consul.md for what it implements", uri.path()),
        "implemented": false,
    });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// Reads a request body as JSON whatever its content type, as Consul does; an empty body is
/// `null`.
fn json_body(body: &[u8]) -> Result<serde_json::Value, ConsulError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| ConsulError::bad_request(format!("Request decode failed: {e}")))
}
