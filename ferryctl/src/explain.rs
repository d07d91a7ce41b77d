//! `ferryctl explain`: asks a sidecar's admin listener how it would route a request, from the
//! config it actually holds, and the control plane how many sidecars call the service, to put
//! the per-sidecar circuit breaker in perspective. With `--from`, evaluates the service's
//! authorization policy for that caller with the very code its sidecars run.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use ferry_proto::{
    authz::{Authorization, Caller, Decision, Request},
    matching::RequestInfo,
    v1::{self, config_client::ConfigClient, discovery_client::DiscoveryClient},
};
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;

use super::{ControlPlane, Output, UsageError};

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
pub async fn explain(question: Question, output: Output, control_plane: &ControlPlane) -> anyhow::Result<String> {
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
    let mut value = value;
    // Best effort: without the control plane, the limits are shown per sidecar only.
    if let Some(callers) = callers(control_plane).await {
        value["calling_sidecars"] = serde_json::to_value(callers).unwrap_or_default();
    }
    let shown = match output {
        Output::Table => text(&value),
        _ => super::encode(output, &value)?,
    };
    match would_fail(&value) {
        None => Ok(shown),
        Some(Failure::UnknownService) => {
            let names = super::service_names(control_plane).await.unwrap_or_default();
            let why = super::no_such_service(&question.service, names.iter().map(String::as_str));
            Err(super::ShownFailure { shown, why: format!("{why}: requests to it get 503 unknown_service") }.into())
        }
        Some(Failure::NoEndpoints) => Err(super::ShownFailure {
            shown,
            why: format!("no endpoint of {} can take this request: it would get 503 no_endpoints", question.service),
        }
        .into()),
    }
}

/// Why a request explained would fail, when it would.
enum Failure {
    UnknownService,
    NoEndpoints,
}

fn would_fail(v: &Value) -> Option<Failure> {
    if v["service_exists"].as_bool() == Some(false) && v["gateway"].as_bool() != Some(true) {
        return Some(Failure::UnknownService);
    }
    let backends = v["backends"].as_array()?;
    let none_routable = !backends.is_empty() && backends.iter().all(|b| b["routable_endpoints"].as_u64() == Some(0));
    none_routable.then_some(Failure::NoEndpoints)
}

/// How many connected sidecars subscribe to each service, from the control plane's
/// `ListSidecars` (what `ferryctl status` shows).
async fn callers(control_plane: &ControlPlane) -> Option<BTreeMap<String, usize>> {
    let ask = async {
        let channel = super::connect(control_plane).await.ok()?;
        DiscoveryClient::new(channel).list_sidecars(v1::ListSidecarsRequest {}).await.ok()
    };
    let response = tokio::time::timeout(TIMEOUT, ask).await.ok()??.into_inner();
    let mut callers = BTreeMap::new();
    for sidecar in &response.sidecars {
        for subscription in &sidecar.subscriptions {
            *callers.entry(subscription.service.clone()).or_insert(0) += 1;
        }
    }
    Some(callers)
}

/// `ferryctl explain SERVICE --from CALLER`: the authorization decision for a request of
/// `caller`, and the rule that makes it.
pub async fn authorization(question: Question, caller: &str, output: Output, api: &ControlPlane) -> anyhow::Result<String> {
    let request = v1::GetRequest { kind: v1::ResourceKind::Authorization as i32, service: question.service.clone() };
    let policy = match ConfigClient::new(super::connect(api).await?).get(request).await {
        Ok(response) => match response.into_inner().resource.and_then(|r| r.kind) {
            Some(v1::resource::Kind::Authorization(policy)) => Some(policy),
            _ => None,
        },
        Err(status) if status.code() == tonic::Code::NotFound => None,
        Err(status) => return Err(status.into()),
    };
    let method = http::Method::from_bytes(question.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| UsageError(format!("--method {:?} is not a method", question.method)))?;
    let uri: http::Uri = question.path.parse().map_err(|e| UsageError(format!("--path {:?}: {e}", question.path)))?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &question.headers {
        let name = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|e| UsageError(format!("--header {name:?}: {e}")))?;
        let value = http::HeaderValue::from_str(value).map_err(|e| UsageError(format!("--header {value:?}: {e}")))?;
        headers.append(name, value);
    }
    let info =
        RequestInfo { method: &method, path: uri.path(), query: uri.query(), headers: &headers, host: question.host.as_deref() };
    let decision = match &policy {
        Some(policy) => Authorization::compile(policy, policy.version)
            .map_err(|e| anyhow::anyhow!("the policy does not compile: {e}"))?
            .evaluate(Caller::Service(caller), &Request::Http(info)),
        None => Decision::no_policy(),
    };
    let value = serde_json::json!({
        "service": question.service,
        "caller": caller,
        "method": method.as_str(),
        "path": question.path,
        "decision": decision.action.as_str(),
        "rule": decision.rule,
        "because": decision.because(),
        "policy_version": decision.version,
    });
    let shown = match output {
        Output::Table => {
            let verdict = if decision.allowed() { "ALLOWED" } else { "DENIED" };
            let version = if decision.version == 0 {
                String::new()
            } else {
                format!(" (authorization policy version {})", decision.version)
            };
            format!(
                "{verdict}: {caller} -> {} {} {}\ndecided by: {}{version}\n",
                question.service,
                method,
                question.path,
                decision.because()
            )
        }
        _ => super::encode(output, &value)?,
    };
    if decision.allowed() {
        return Ok(shown);
    }
    let why = format!("{caller} may not make this request: it would get 403 forbidden");
    Err(super::ShownFailure { shown, why }.into())
}

/// The circuit breaker line of one service.
fn breaker_line(breaker: &Value, callers: &Value) -> Option<String> {
    let service = breaker["service"].as_str()?;
    let (concurrent, pending) = (breaker["max_concurrent"].as_u64()?, breaker["max_pending"].as_u64()?);
    let mut line = format!(
        "circuit breaker: {service}: {concurrent} concurrent / {pending} pending per calling sidecar (here {} in flight, {} waiting)",
        breaker["in_flight"], breaker["pending"],
    );
    if let Some(count) = callers.get(service).and_then(Value::as_u64) {
        let callers = if count == 1 { "1 sidecar calls".to_owned() } else { format!("{count} sidecars call") };
        line.push_str(&format!("; {callers} {service}: up to {} concurrent in all", count.saturating_mul(concurrent)));
    }
    Some(line)
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
        Some(version) => line(format!("route:    version {}", ferry_runtime::short::version(version))),
        None if v["gateway"].as_bool() == Some(true) => line("route:    none in force: the gateway answers 404 no_route".into()),
        None => line("route:    none (every request goes to all of the service's endpoints)".into()),
    }
    if let Some(held) = v["held_route"].as_str() {
        line(format!("held:     a newer route waits: {held}"));
    }
    for passed in v["passed_over"].as_array().into_iter().flatten() {
        line(format!(
            "not:      {}: {}",
            passed["rule"].as_str().unwrap_or("?"),
            passed["why"].as_str().unwrap_or("does not match")
        ));
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
    if v["retries"]["default"].as_bool() == Some(true) {
        line("          (the mesh's default: any method when the request never reached the app; gRPC statuses and resets only for idempotent methods)".into());
    }
    if let Some(budget) = v["retry_budget"].as_object() {
        line(format!(
            "budget:   retries up to {}% of requests + {}/s over {} (now {} request(s), {} retry(ies) in the window)",
            budget["ratio"].as_f64().unwrap_or(0.0) * 100.0,
            budget["min_per_second"],
            budget["window"].as_str().unwrap_or("?"),
            budget["requests_in_window"],
            budget["retries_in_window"],
        ));
    }
    let mut breakers: Vec<&Value> = vec![&v["circuit_breaker"]];
    for backend in v["backends"].as_array().into_iter().flatten() {
        if backend["circuit_breaker"]["service"] != v["circuit_breaker"]["service"]
            && !breakers.iter().any(|b| b["service"] == backend["circuit_breaker"]["service"])
        {
            breakers.push(&backend["circuit_breaker"]);
        }
    }
    for breaker in breakers {
        if let Some(text) = breaker_line(breaker, &v["calling_sidecars"]) {
            line(text);
        }
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
