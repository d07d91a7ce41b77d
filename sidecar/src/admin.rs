//! The admin listener: `/ready`, `/live`, `/config` and `/metrics`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use ferry_proto::v1;
use serde_json::{Value, json};

use crate::{
    catalog::{Catalog, ServiceState},
    control::ControlStatus,
};

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub service: Arc<str>,
    pub node_id: String,
    pub control_plane: String,
    pub has_app: bool,
    /// Services declared with `--upstream`: the sidecar is not ready until it has their config.
    pub declared: Vec<Arc<str>>,
    pub catalog: Arc<Catalog>,
    pub control: Arc<ControlStatus>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/live", get(|| async { "live\n" }))
        .route("/config", get(config))
        .route("/metrics", get(metrics))
        .with_state(state)
}

impl AdminState {
    /// Why the sidecar is not ready, if it is not.
    pub fn not_ready(&self) -> Vec<String> {
        let control = self.control.get();
        let mut reasons = Vec::new();
        if control.last_contact.is_none() {
            reasons.push(format!("no config from the control plane at {} yet", self.control_plane));
        }
        if self.has_app && control.registered.is_none() {
            reasons.push("the app's instance is not registered yet".to_owned());
        }
        for service in &self.declared {
            if !matches!(self.catalog.state(service), Some(ServiceState::Known(_))) {
                reasons.push(format!("no config for upstream {service} yet"));
            }
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

async fn config(State(state): State<AdminState>) -> Json<Value> {
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
                    "endpoints": config.endpoints.values().map(|e| json!({
                        "id": e.id,
                        "address": e.address,
                        "port": e.port,
                        "health": e.health.as_str(),
                        "metadata": e.metadata,
                        "region": e.region,
                        "zone": e.zone,
                        "weight": e.weight,
                    })).collect::<Vec<_>>(),
                }),
            };
            (name.to_string(), value)
        })
        .collect();
    let instance: Option<&v1::Instance> = control.registered.as_ref();
    Json(json!({
        "service": state.service.to_string(),
        "node_id": state.node_id,
        "instance": instance,
        "ready": state.not_ready().is_empty(),
        "control_plane": {
            "url": state.control_plane,
            "connected": control.connected,
            "server_id": control.server_id,
            "last_contact": control.last_contact.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            "last_error": control.last_error,
            "pushes_applied": control.pushes_applied,
            "pushes_rejected": control.pushes_rejected,
            "last_rejection": control.last_rejection,
        },
        "services": services,
    }))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &state.metrics) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {error}\n")).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}
