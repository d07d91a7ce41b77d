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
    let (status, value) = admin_get(&question.sidecar, &format!("/explain?{}", query.finish())).await?;
    let hint = format!("is {} a sidecar's admin listener (--sidecar, default 127.0.0.1:15000)?", question.sidecar);
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
    // A service that does not exist has nothing to explain: the error alone, with the closest
    // name, rather than a made-up route for it.
    if unknown(&value) {
        let names = super::service_names(control_plane).await.unwrap_or_default();
        return Err(anyhow::anyhow!(unknown_service(&question.service, names.iter().map(String::as_str))));
    }
    let mut value = value;
    // Best effort: without the control plane, the limits are shown per sidecar only.
    if let Some(callers) = callers(control_plane).await {
        value["calling_sidecars"] = serde_json::to_value(callers).unwrap_or_default();
    }
    // The request goes out as the asked sidecar: whether the service's policy lets it in. (A
    // gateway routes to other services by host: it has no single service to ask about.)
    let mut decision = None;
    if value["gateway"].as_bool() != Some(true) {
        let decided = async {
            let caller = own_caller(&question.sidecar).await?;
            let (decision, method) = decide(&question, caller.as_caller(), control_plane).await?;
            anyhow::Ok((caller, decision, method))
        };
        value["authorization"] = match decided.await {
            Ok((caller, verdict, method)) => {
                let shown = authorization_value(&question, &caller.name(), &method, &verdict);
                decision = Some((caller, verdict));
                shown
            }
            Err(error) => serde_json::json!({ "error": super::error_text(&error) }),
        };
    }
    let shown = match output {
        Output::Table => text(&value),
        _ => super::encode(output, &value)?,
    };
    if would_fail(&value) {
        return Err(super::ShownFailure {
            shown,
            why: format!("no endpoint of {} can take this request: it would get 503 no_endpoints", question.service),
        }
        .into());
    }
    match decision {
        Some((caller, decision)) if !decision.allowed() => {
            let why = format!("{} may not make this request: it would get 403 forbidden", caller.name());
            Err(super::ShownFailure { shown, why }.into())
        }
        _ => Ok(shown),
    }
}

/// What to say of `service` when the asked sidecar knows no such service: that, the closest
/// name, and what a request to it gets.
fn unknown_service<'a>(service: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    let hint = match ferry_runtime::suggest::closest(service, names) {
        Some(name) => format!("did you mean {name:?}?"),
        None => "`ferryctl services` lists them".to_owned(),
    };
    format!("there is no service {service:?} ({hint}); a request to it gets 503 unknown_service")
}

/// `GET path` of the sidecar's admin listener at `sidecar` (HOST:PORT or a URL): its status
/// and its JSON answer.
async fn admin_get(sidecar: &str, path: &str) -> anyhow::Result<(http::StatusCode, Value)> {
    let base = if sidecar.contains("://") { sidecar.to_owned() } else { format!("http://{sidecar}") };
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: http::Uri = url.parse().map_err(|e| UsageError(format!("--sidecar {sidecar:?}: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(TIMEOUT, client.get(uri))
        .await
        .map_err(|_| anyhow::anyhow!("the sidecar at {sidecar} did not answer within {TIMEOUT:?}"))?
        .with_context(|| format!("cannot reach the sidecar's admin listener at {sidecar}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading the sidecar's answer")?.to_bytes();
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        let text = String::from_utf8_lossy(&body);
        let hint = format!("is {sidecar} a sidecar's admin listener (--sidecar, default 127.0.0.1:15000)?");
        return Err(anyhow::anyhow!("{sidecar} answered {status}, not an explanation: {}; {hint}", text.trim()));
    };
    Ok((status, value))
}

/// Who a sidecar's requests come from, as the called sidecar sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnCaller {
    /// Its mesh identity: the service its leaf was issued for.
    Service(String),
    /// It holds no leaf, so it calls in plaintext, without an identity.
    Unauthenticated,
}

impl OwnCaller {
    fn as_caller(&self) -> Caller<'_> {
        match self {
            Self::Service(service) => Caller::Service(service),
            Self::Unauthenticated => Caller::Unauthenticated,
        }
    }

    fn name(&self) -> String {
        self.as_caller().to_string()
    }
}

/// The caller the sidecar at `sidecar` is, from its `/config`: the service of the identity it
/// holds (what mTLS proves to the called sidecar), or, from a sidecar that does not show its
/// identity, the service it runs for.
async fn own_caller(sidecar: &str) -> anyhow::Result<OwnCaller> {
    let (status, config) = admin_get(sidecar, "/config").await?;
    if !status.is_success() {
        return Err(anyhow::anyhow!("{sidecar}/config answered {status}"));
    }
    own_caller_from(&config).ok_or_else(|| anyhow::anyhow!("{sidecar}/config shows neither its identity nor its service"))
}

fn own_caller_from(config: &Value) -> Option<OwnCaller> {
    match &config["identity"] {
        // A sidecar of a build that shows its identity.
        Value::Object(identity) => Some(match identity.get("identity").and_then(Value::as_str) {
            Some(uri) => match ferry_tls::identity::Identity::parse(uri) {
                Ok(identity) => OwnCaller::Service(identity.service),
                Err(_) => OwnCaller::Unauthenticated,
            },
            None => OwnCaller::Unauthenticated,
        }),
        _ => config["service"].as_str().filter(|s| !s.is_empty()).map(|s| OwnCaller::Service(s.to_owned())),
    }
}

/// The authorization decision as `-o json` shows it.
fn authorization_value(question: &Question, caller: &str, method: &http::Method, decision: &Decision) -> Value {
    serde_json::json!({
        "service": question.service,
        "caller": caller,
        "method": method.as_str(),
        "path": question.path,
        "decision": decision.action.as_str(),
        "rule": decision.rule,
        "because": decision.because(),
        "policy_version": decision.version,
    })
}

/// Whether the sidecar knows no such service (a gateway routes by host, not by service).
fn unknown(v: &Value) -> bool {
    v["service_exists"].as_bool() == Some(false) && v["gateway"].as_bool() != Some(true)
}

/// Whether the request explained would fail for want of an endpoint.
fn would_fail(v: &Value) -> bool {
    let Some(backends) = v["backends"].as_array() else { return false };
    !backends.is_empty() && backends.iter().all(|b| b["routable_endpoints"].as_u64() == Some(0))
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
    // A service that does not exist has no policy to decide by: the request gets 503 anyway.
    let names = super::service_names(api).await?;
    if !names.contains(&question.service) {
        return Err(anyhow::anyhow!(unknown_service(&question.service, names.iter().map(String::as_str))));
    }
    let (decision, method) = decide(&question, Caller::Service(caller), api).await?;
    let value = authorization_value(&question, caller, &method, &decision);
    let shown = match output {
        Output::Table => {
            let verdict = if decision.allowed() { "ALLOWED" } else { "DENIED" };
            let version = if decision.version == 0 {
                String::new()
            } else {
                format!(" (authorization policy version {})", ferry_runtime::short::version(decision.version))
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

/// The decision of the service's authorization policy, from the control plane, on the request
/// of `question` made by `caller`; and the request's method.
async fn decide(question: &Question, caller: Caller<'_>, api: &ControlPlane) -> anyhow::Result<(Decision, http::Method)> {
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
            .evaluate(caller, &Request::Http(info)),
        None => Decision::no_policy(),
    };
    Ok((decision, method))
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
    if let Some(line_text) = authz_line(&v["authorization"]) {
        line(line_text);
    }
    out
}

/// The `authz:` line: whether the service's policy lets the asked sidecar make the request.
fn authz_line(authorization: &Value) -> Option<String> {
    let authorization = authorization.as_object()?;
    if let Some(error) = authorization.get("error").and_then(Value::as_str) {
        return Some(format!("authz:    not checked: {error}"));
    }
    let verdict = if authorization.get("decision").and_then(Value::as_str) == Some("allow") { "allowed" } else { "denied" };
    let version = match authorization.get("policy_version").and_then(Value::as_u64) {
        Some(version) if version > 0 => format!(" (authorization policy version {})", ferry_runtime::short::version(version)),
        _ => String::new(),
    };
    Some(format!(
        "authz:    {verdict} for {} (this sidecar's identity): decided by {}{version}",
        authorization.get("caller").and_then(Value::as_str).unwrap_or("?"),
        authorization.get("because").and_then(Value::as_str).unwrap_or("?"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_service_reads_as_one_sentence_with_the_closest_name() {
        assert_eq!(
            unknown_service("catalgo", ["catalog", "frontend"]),
            r#"there is no service "catalgo" (did you mean "catalog"?); a request to it gets 503 unknown_service"#
        );
        assert_eq!(
            unknown_service("zzzzzzzz", ["catalog"]),
            "there is no service \"zzzzzzzz\" (`ferryctl services` lists them); a request to it gets 503 unknown_service"
        );
    }

    #[test]
    fn the_asked_sidecar_calls_as_its_identity_or_unauthenticated_without_one() {
        let config = serde_json::json!({
            "service": "client",
            "identity": { "identity": "spiffe://ferry.local/service/client", "mtls": "strict" },
        });
        assert_eq!(own_caller_from(&config), Some(OwnCaller::Service("client".into())));
        let config = serde_json::json!({ "service": "client", "identity": { "identity": null } });
        assert_eq!(own_caller_from(&config), Some(OwnCaller::Unauthenticated));
        // A sidecar that does not show its identity: the service it runs for.
        assert_eq!(own_caller_from(&serde_json::json!({ "service": "client" })), Some(OwnCaller::Service("client".into())));
        assert_eq!(own_caller_from(&serde_json::json!({})), None);
    }

    #[test]
    fn the_authz_line_says_the_verdict_the_caller_and_the_deciding_rule() {
        let value = serde_json::json!({
            "authorization": {
                "caller": "client", "decision": "deny", "because": "the default (deny)", "policy_version": 1_796_655_541_938_275_u64,
            },
        });
        let shown = text(&value);
        assert!(
            shown.contains("authz:    denied for client (this sidecar's identity): decided by the default (deny) (authorization policy version …938275)"),
            "{shown}"
        );
        let value = serde_json::json!({ "authorization": { "error": "cannot reach the control plane" } });
        assert!(text(&value).contains("authz:    not checked: cannot reach the control plane"));
    }
}
