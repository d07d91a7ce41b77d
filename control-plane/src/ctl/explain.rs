//! `ferryctl explain`: asks a sidecar's admin listener how it would route a request, from the
//! config it actually holds.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;

use super::{Output, UsageError};

/// What to explain.
pub struct Question {
    pub service: String,
    pub path: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub host: Option<String>,
    /// The sidecar's admin address, HOST:PORT or a URL.
    pub sidecar: String,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the sidecar and renders its answer.
pub async fn explain(question: Question, output: Output) -> anyhow::Result<String> {
    let base = if question.sidecar.contains("://") { question.sidecar.clone() } else { format!("http://{}", question.sidecar) };
    let mut query = form_urlencoded::Serializer::new(String::new());
    // Methods are case-sensitive in HTTP, but nobody means `post` as a method of its own.
    let method = question.method.to_ascii_uppercase();
    query.append_pair("service", &question.service).append_pair("path", &question.path).append_pair("method", &method);
    for (name, value) in &question.headers {
        query.append_pair("header", &format!("{name}:{value}"));
    }
    if let Some(host) = &question.host {
        query.append_pair("host", host);
    }
    let url = format!("{}/explain?{}", base.trim_end_matches('/'), query.finish());
    let uri: http::Uri = url.parse().map_err(|e| UsageError(format!("--sidecar {:?}: {e}", question.sidecar)))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(TIMEOUT, client.get(uri))
        .await
        .map_err(|_| anyhow::anyhow!("the sidecar at {} did not answer within {TIMEOUT:?}", question.sidecar))?
        .with_context(|| format!("cannot reach the sidecar's admin listener at {}", question.sidecar))?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading the sidecar's answer")?.to_bytes();
    let hint = format!("is {} a sidecar's admin listener (--sidecar, default 127.0.0.1:15000)?", question.sidecar);
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        let text = String::from_utf8_lossy(&body);
        return Err(anyhow::anyhow!("{} answered {status}, not an explanation: {}; {hint}", question.sidecar, text.trim()));
    };
    match status {
        _ if status.is_success() => {}
        http::StatusCode::BAD_REQUEST => {
            return Err(anyhow::anyhow!("the sidecar refused: {}", value["error"].as_str().unwrap_or("no reason given")));
        }
        _ => {
            let error = value["error"].as_str().unwrap_or("no reason given");
            return Err(anyhow::anyhow!("{} answered {status}: {error}; {hint}", question.sidecar));
        }
    }
    match output {
        Output::Table => Ok(text(&value)),
        _ => super::encode(output, &value),
    }
}

fn text(v: &Value) -> String {
    let mut out = String::new();
    let request = &v["request"];
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "{} {}{}{} to {} (as seen by sidecar {})",
        request["method"].as_str().unwrap_or("GET"),
        request["host"].as_str().unwrap_or_default(),
        request["path"].as_str().unwrap_or("/"),
        request["query"].as_str().map(|q| format!("?{q}")).unwrap_or_default(),
        v["service"].as_str().unwrap_or("?"),
        v["node_id"].as_str().unwrap_or("?"),
    ));
    if v["service_exists"].as_bool() == Some(false) && v["gateway"].as_bool() != Some(true) {
        line(format!(
            "service:  no instance of {} is registered: requests to it get 503 unknown_service",
            v["service"].as_str().unwrap_or("?")
        ));
    }
    match v["route_version"].as_u64() {
        Some(version) => line(format!("route:    version {version}")),
        None if v["gateway"].as_bool() == Some(true) => line("route:    none in force: the gateway answers 404 no_route".into()),
        None => line("route:    none (every request goes to all of the service's endpoints)".into()),
    }
    if let Some(held) = v["held_route"].as_str() {
        line(format!("held:     a newer route waits: {held}"));
    }
    match v["rule"]["label"].as_str() {
        Some(rule) => line(format!("rule:     {rule}")),
        None if v["gateway"].as_bool() == Some(true) && v["route_version"].is_u64() => {
            line("rule:     none matches: the gateway answers 404 no_route".into())
        }
        None if v["route_version"].is_u64() => line("rule:     none matches: all endpoints of the service".into()),
        None => {}
    }
    for backend in v["backends"].as_array().into_iter().flatten() {
        let endpoints = match backend["routable_endpoints"].as_u64() {
            Some(n) => format!("{n} routable endpoint(s)"),
            None => "endpoints not known yet".into(),
        };
        line(format!(
            "backend:  {} weight {} ({:.1}%), {endpoints}",
            backend["backend"].as_str().unwrap_or("?"),
            backend["weight"],
            backend["share_percent"].as_f64().unwrap_or(0.0),
        ));
    }
    line(format!("timeout:  {}", v["timeout"].as_str().unwrap_or("none (the client's own)")));
    match v["retries"].as_object() {
        Some(retries) => line(format!(
            "retries:  {} attempt(s) in all, per try {}, on {}",
            retries["attempts"],
            retries["per_try_timeout"].as_str().unwrap_or("no limit"),
            retries["on"]
                .as_array()
                .map(|on| on.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
        )),
        None => line("retries:  none".into()),
    }
    if let Some(delay) = v["fault"]["delay"].as_object() {
        line(format!("fault:    delay {} of {}%", delay["duration"].as_str().unwrap_or("?"), delay["percent"]));
    }
    if let Some(abort) = v["fault"]["abort"].as_object() {
        line(format!("fault:    abort with {} for {}%", abort["status"], abort["percent"]));
    }
    if let Some(mirror) = v["mirror"].as_object() {
        line(format!("mirror:   {}% to {}", mirror["percent"], mirror["backend"].as_str().unwrap_or("?")));
    }
    if let Some(rewrite) = v["rewrite_path_prefix"].as_object() {
        line(format!("rewrite:  path prefix {} → {}", rewrite["from"], rewrite["to"]));
    }
    out
}
