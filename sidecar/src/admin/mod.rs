//! The admin listener: `/ready`, `/live`, `/config`, `/metrics`; `PUT /ttl/{pass,warn,fail}` for
//! the app to renew its TTL check; `POST /shutdown` to drain and stop.

mod render;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, Query, RawQuery, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use ferry_health::{Health, TtlError};
use ferry_proto::v1;
use ferry_tls::api::ControlPlaneUrls;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    catalog::{Catalog, ServiceState},
    control::{ConfigSource, ControlStatus},
    health::AppHealth,
    mesh::Mesh,
    metrics::Metrics,
    outbound::Outbound,
};

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub service: Arc<str>,
    pub node_id: String,
    /// `--control-plane`: every replica's URL.
    pub control_plane: ControlPlaneUrls,
    pub has_app: bool,
    /// A gateway's own service: `/explain` explains its route when no service is given.
    pub gateway: Option<Arc<str>>,
    /// Services declared with `--upstream`: the sidecar is not ready until it has their config.
    pub declared: Vec<Arc<str>>,
    pub catalog: Arc<Catalog>,
    /// For `/explain`: the routers the outbound proxy uses.
    pub outbound: Outbound,
    pub control: Arc<ControlStatus>,
    /// The app's checks; `None` without an app.
    pub health: Option<Arc<AppHealth>>,
    /// Cancelled by `POST /shutdown`.
    pub shutdown: CancellationToken,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// The gauges computed at each scrape.
    pub sidecar_metrics: Metrics,
    /// The state file of `--state-dir`, if any.
    pub state_file: Option<PathBuf>,
    /// The sidecar's trust: certificate, bundle, authorization policy.
    pub mesh: Mesh,
    /// Whether it intercepts its app's connections (and needs the address table).
    pub intercept: bool,
}

/// A JSON answer as people read it with `curl | less`: indented, ending with a newline.
pub struct Pretty<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Pretty<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec_pretty(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding JSON: {error}\n")).into_response(),
        }
    }
}

/// What `GET /` lists: every endpoint of the admin listener.
const INDEX: &str = "Ferry sidecar admin listener
GET  /ready              200 when ready to serve, 503 with the reasons otherwise
GET  /live               200 while the process runs
GET  /config             the config held: services, endpoints, routes, policies, trust (JSON)
GET  /addresses          the mesh's address table, for an intercepting sidecar (JSON)
GET  /explain?service=S  how a request to S would be routed (ferryctl explain asks this)
GET  /metrics            Prometheus / OpenMetrics
PUT  /ttl/pass|warn|fail renews the app's TTL check
POST /shutdown           drains, deregisters and exits
";

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(|| async { INDEX }))
        .route("/ready", get(ready))
        .route("/live", get(|| async { "live\n" }))
        .route("/config", get(config))
        .route("/addresses", get(addresses))
        .route("/explain", get(explain))
        .route("/metrics", get(metrics))
        .route("/ttl/{status}", put(ttl))
        .route("/shutdown", post(shutdown))
        .fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            (StatusCode::NOT_FOUND, format!("no endpoint {method} {}; GET / lists them\n", uri.path()))
        })
        .with_state(state)
}

impl AdminState {
    /// Why the sidecar is not ready, if it is not.
    pub fn not_ready(&self) -> Vec<String> {
        let control = self.control.get();
        let mut reasons = Vec::new();
        if self.health.as_ref().is_some_and(|h| h.is_draining()) || self.shutdown.is_cancelled() {
            reasons.push("draining".to_owned());
        }
        // Restored from --state-dir: serve on it until the control plane is back.
        let from_state_dir = matches!(control.config_source, ConfigSource::StateDir { .. });
        if control.last_contact.is_none() && !from_state_dir {
            let why = control.last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default();
            let at = match self.control_plane.len() {
                1 => format!("at {}", self.control_plane),
                _ => format!("at any of {}", self.control_plane.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")),
            };
            reasons.push(format!("no config from the control plane {at} yet{why}"));
        } else if !control.connected
            && self.has_app
            && control.registered.is_none()
            && let Some(error) = &control.last_error
        {
            // Say why the control plane refuses the sidecar (a token for another service, say).
            reasons.push(format!("the control plane refused the stream: {error}"));
        }
        if let Some(why) = self.mesh.not_ready() {
            reasons.push(why);
        }
        if self.has_app && control.registered.is_none() && !from_state_dir {
            reasons.push("the app's instance is not registered yet".to_owned());
        }
        if self.intercept && self.catalog.addresses_version() == 0 {
            // Without it every intercepted connection would be taken for one outside the mesh.
            reasons.push("no address table from the control plane yet (--intercept)".to_owned());
        }
        for service in &self.declared {
            if !matches!(self.catalog.state(service), Some(ServiceState::Known(_))) {
                reasons.push(format!("no config for upstream {service} yet"));
            }
        }
        // A gateway routes nothing without a route in force.
        if let Some(gateway) = &self.gateway
            && let Some(why) = self.outbound.destination(gateway).ok().and_then(|router| router.without_route())
        {
            reasons.push(why);
        }
        reasons
    }
}

async fn ready(State(state): State<AdminState>) -> Response {
    let reasons = state.not_ready();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", reasons.join("; "))).into_response()
    }
}

/// The mesh's address table, as an intercepting sidecar holds it: which service each virtual IP
/// and endpoint address belongs to.
async fn addresses(State(state): State<AdminState>) -> Pretty<Value> {
    let table = state.catalog.addresses();
    let mut services: Vec<_> = table.services.iter().collect();
    services.sort_by(|a, b| a.0.cmp(b.0));
    let services: serde_json::Map<String, Value> = services
        .into_iter()
        .map(|(name, entry)| {
            let endpoints: Vec<String> = entry.endpoints.iter().map(ToString::to_string).collect();
            (name.to_string(), json!({ "virtual_ip": entry.virtual_ip, "endpoints": endpoints }))
        })
        .collect();
    Pretty(json!({ "intercept": state.intercept, "version": table.version, "services": services }))
}

async fn config(State(state): State<AdminState>) -> Pretty<Value> {
    let control = state.control.get();
    let services: serde_json::Map<String, Value> = state
        .catalog
        .states()
        .into_iter()
        .map(|(name, service)| {
            let value = match service {
                ServiceState::Pending => json!({ "state": "pending" }),
                ServiceState::Known(config) => json!({
                    "state": "known",
                    "version": config.version,
                    "exists": config.exists,
                    "route": config.route.as_deref(),
                    "policy": config.policy.as_deref(),
                    "route_in_force": state.outbound.existing(&name).map(|router| {
                        let status = router.route_status();
                        json!({ "version": status.version, "held": status.held })
                    }),
                    "balancers": state.outbound.existing(&name).map(|router| render::balancers(&router.balancers())),
                    "endpoints": config.endpoints.values().map(|e| json!({
                        "id": e.id,
                        "address": e.address,
                        "port": e.port,
                        "health": e.health.as_str(),
                        "metadata": e.metadata,
                        "region": e.region,
                        "zone": e.zone,
                        "weight": e.weight,
                        "mtls": e.identity.is_some(),
                        "identity": e.identity.as_deref(),
                    })).collect::<Vec<_>>(),
                }),
            };
            (name.to_string(), value)
        })
        .collect();
    let instance: Option<&v1::Instance> = control.registered.as_ref();
    Pretty(json!({
        "service": state.service.to_string(),
        "node_id": state.node_id,
        "instance": instance,
        "ready": state.not_ready().is_empty(),
        "config_source": control.config_source.as_str(),
        "last_contact_seconds_ago": control.config_age(SystemTime::now()).map(|age| age.as_secs_f64()),
        "state_file": state.state_file.as_ref().map(|path| path.display().to_string()),
        "restored_config_saved_at": match control.config_source {
            ConfigSource::StateDir { saved_at } => Some(humantime::format_rfc3339_millis(saved_at).to_string()),
            _ => None,
        },
        "control_plane": {
            "url": state.control_plane.to_string(),
            "urls": state.control_plane.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            "connected": control.connected,
            // The replica the stream is connected to (or was last, while `connected` is false).
            "replica": control.replica.as_ref().map(|r| json!({ "url": r.url.as_str(), "address": r.addr.to_string() })),
            "server_id": control.server_id,
            "last_contact": control.last_contact.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            "last_error": control.last_error,
            "pushes_applied": control.pushes_applied,
            "pushes_rejected": control.pushes_rejected,
            "last_rejection": control.last_rejection,
        },
        "identity": identity(&state.mesh),
        "services": services,
    }))
}

/// The sidecar's trust as `/config` shows it: never the key.
fn identity(mesh: &Mesh) -> Value {
    let issued = mesh.identity();
    let renewal = mesh.renewal();
    let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let bundle = mesh.bundle();
    let authorization = mesh.authorization_update();
    json!({
        "mtls": mesh.mode().as_str(),
        "identity": issued.as_ref().map(|i| i.identity.to_string()),
        "serial": issued.as_ref().map(|i| i.serial.clone()),
        "not_before": issued.as_ref().map(|i| time(i.not_before)),
        "not_after": issued.as_ref().map(|i| time(i.not_after)),
        "expired": issued.as_ref().map(|i| i.expired(SystemTime::now())),
        "renewal_due": renewal.due.map(time),
        "renewals": renewal.renewals,
        "last_renewal_error": renewal.last_error,
        "trust_domain": bundle.as_ref().map(|b| b.trust_domain.clone()),
        "trust_bundle_version": bundle.as_ref().map(|b| b.version),
        "roots": bundle.as_ref().map(|b| ferry_tls::pem::certificates(&b.roots_pem).map_or(0, |r| r.len())),
        "authorization": authorization.map(|a| json!({ "version": a.version, "policy": a.policy })),
    })
}

/// `GET /explain?service=S&path=P[&method=M][&header=K:V...][&host=H]`: how this sidecar would
/// route such a request, from the config it holds.
async fn explain(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Response {
    let bad = |field: &str, reason: String| {
        (StatusCode::BAD_REQUEST, Pretty(json!({ "error": format!("{field}: {reason}"), "field": field }))).into_response()
    };
    let (mut service, mut path, mut method, mut host) = (None, "/".to_owned(), Method::GET, None);
    let mut headers = HeaderMap::new();
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes()) {
        match &*key {
            "service" => service = Some(value.into_owned()),
            "path" => path = value.into_owned(),
            "host" => host = Some(value.into_owned()),
            "method" => match Method::from_bytes(value.as_bytes()) {
                Ok(m) => method = m,
                Err(_) => return bad("method", format!("{value:?} is not an HTTP method")),
            },
            "header" => {
                let Some((name, value)) = value.split_once([':', '=']) else {
                    return bad("header", format!("{value:?} must be NAME:VALUE"));
                };
                match (HeaderName::from_bytes(name.trim().as_bytes()), HeaderValue::from_str(value.trim())) {
                    (Ok(name), Ok(value)) => {
                        headers.append(name, value);
                    }
                    _ => return bad("header", format!("{name:?}: {value:?} is not a valid header")),
                }
            }
            other => return bad(other, "unknown parameter: expected service, path, method, header or host".into()),
        }
    }
    let service = match (service, &state.gateway) {
        (Some(service), _) => service,
        (None, Some(gateway)) => gateway.to_string(),
        (None, None) => return bad("service", "required: the service whose route to explain".into()),
    };
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    let uri = match host {
        Some(host) => format!("http://{host}{path}").parse::<Uri>(),
        None => path.parse::<Uri>(),
    };
    let uri = match uri {
        Ok(uri) => uri,
        Err(error) => return bad("path", format!("{path:?} is not a valid path: {error}")),
    };
    let router = match state.outbound.destination(&service) {
        Ok(router) => router,
        Err(error) => return bad("service", ferry_runtime::error_chain(error.as_ref())),
    };
    // A service this sidecar had not used yet: give its config a moment to arrive.
    let _ = router.known(Duration::from_secs(2)).await;
    let mut explanation = render::explanation(&router.explain(&method, &uri, &headers));
    explanation["node_id"] = json!(state.node_id);
    explanation["request"] = json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "host": uri.host(),
        "headers": headers.iter().map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?"))).collect::<Vec<_>>(),
    });
    Pretty(explanation).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct TtlQuery {
    check: Option<String>,
}

async fn ttl(
    State(state): State<AdminState>,
    Path(status): Path<String>,
    Query(query): Query<TtlQuery>,
    body: Bytes,
) -> Response {
    let bad = |field: &str, reason: String| {
        (StatusCode::BAD_REQUEST, Pretty(json!({ "error": format!("{field}: {reason}"), "field": field }))).into_response()
    };
    let status = match status.as_str() {
        "pass" => Health::Passing,
        "warn" => Health::Warning,
        "fail" => Health::Critical,
        other => return bad("status", format!("{other:?} must be pass, warn or fail")),
    };
    let Some(health) = &state.health else {
        return bad("check", "this sidecar has no app, so no checks".into());
    };
    if body.len() > 4096 {
        return bad("body", "the output must be at most 4096 bytes".into());
    }
    let output = String::from_utf8_lossy(&body).trim().to_owned();
    match health.ttl(query.check.as_deref(), status, output).await {
        Ok(check) => Pretty(json!({
            "id": check.id,
            "status": check.status.as_str(),
            "output": check.output,
        }))
        .into_response(),
        Err(error @ (TtlError::NoTtlCheck | TtlError::UnknownCheck(_))) => {
            (StatusCode::NOT_FOUND, Pretty(json!({ "error": format!("check: {error}"), "field": "check" }))).into_response()
        }
        Err(error) => bad("check", error.to_string()),
    }
}

async fn shutdown(State(state): State<AdminState>) -> Response {
    state.shutdown.cancel();
    (StatusCode::ACCEPTED, "draining\n").into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    state.control.get().export(&state.sidecar_metrics);
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &state.metrics) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {error}\n")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}
