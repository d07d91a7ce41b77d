//! The Consul API through the HTTP API's router, in memory (no sockets, no authentication
//! unless a test asks), and the pieces of its edge.

use std::time::Duration;

use axum::body::{Body, Bytes};
use ferry_health::RunnerOptions;
use ferry_proto::v1;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::*;
use crate::{
    api::{
        http::{self, MAX_BLOCKING_QUERIES},
        security::SecurityService,
    },
    auth::{Auth, Tokens},
    ca::{Authority, CaConfig},
    checks::HealthChecks,
    discovery::Sidecars,
    metrics::Metrics,
    registry::{InstanceSpec, Registry, RegistryConfig},
    resources::Resources,
    store::MemoryStore,
};

/// The HTTP API's router with the Consul routes, in memory.
struct Api {
    router: Router,
    registry: Arc<Registry>,
    state: ConsulState,
    _dir: tempfile::TempDir,
}

type Answer = (StatusCode, axum::http::HeaderMap, Bytes);

async fn api() -> Api {
    let metrics = Metrics::unregistered();
    let registry =
        Registry::open(Arc::new(MemoryStore::default()), RegistryConfig::default(), metrics.registry.clone(), Default::default())
            .await
            .expect("opens");
    let resources =
        Resources::open(Arc::new(MemoryStore::default()), Default::default(), Duration::from_secs(5), Default::default())
            .await
            .expect("opens");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CaConfig {
        trust_domain: "ferry.local".into(),
        cert_ttl: Duration::from_secs(60),
        operator: None,
        data_dir: dir.path().to_path_buf(),
        key_files: false,
        metrics: Default::default(),
    };
    let authority = Authority::open(ca, Arc::new(MemoryStore::default())).await.expect("CA");
    let tokens = Tokens::open(Arc::new(MemoryStore::default())).await.expect("tokens");
    let sidecars = Arc::new(Sidecars::default());
    let state = HttpState {
        registry: registry.clone(),
        checks: HealthChecks::new(registry.clone(), RunnerOptions::default(), metrics.health, Vec::new()),
        sidecars: sidecars.clone(),
        metrics: Arc::new(prometheus_client::registry::Registry::default()),
        shutdown: CancellationToken::new(),
        blocking: Arc::new(tokio::sync::Semaphore::new(MAX_BLOCKING_QUERIES)),
        resources,
        authority: authority.clone(),
        traffic: Arc::default(),
    };
    let security = SecurityService { authority, tokens: tokens.clone(), sidecars };
    let auth = Auth { tokens, required: false, unauthenticated: Default::default() };
    let consul = Arc::new(Consul::new("dc1".into(), ([127, 0, 0, 1], 7071).into()));
    let consul_state = ConsulState { http: state.clone(), consul: consul.clone() };
    Api { router: http::router(state, security, auth, consul), registry, state: consul_state, _dir: dir }
}

impl Api {
    async fn send(&self, request: axum::http::Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.expect("the router never fails");
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.expect("body").to_bytes())
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(axum::http::Request::get(path).body(Body::empty()).expect("request")).await
    }

    async fn register(&self, instance: v1::Instance) {
        self.registry.register(InstanceSpec::try_from(instance).expect("valid")).await.expect("registers");
    }
}

fn json(answer: &Answer) -> serde_json::Value {
    serde_json::from_slice(&answer.2).expect("JSON")
}

#[tokio::test]
async fn a_name_no_service_can_have_is_an_empty_answer_and_watches_nothing() {
    let api = api().await;
    let long = "a".repeat(60 * 1024);
    for path in ["/v1/health/service", "/v1/health/checks", "/v1/catalog/service"] {
        for name in [long.as_str(), "Upper", "dots.in.it"] {
            let answer = api.get(&format!("{path}/{name}")).await;
            assert_eq!(answer.0, StatusCode::OK, "{path}");
            assert_eq!(json(&answer), serde_json::json!([]), "{path}");
            assert_eq!(answer.1["x-consul-index"], "1", "{path}");
            assert!(api.registry.snapshot(name).is_none(), "{path}/{name} left no placeholder");
        }
    }
}

/// An instance of `service` with no checks, as a sidecar registers it.
fn instance(id: &str, service: &str) -> v1::Instance {
    v1::Instance { id: id.into(), service: service.into(), address: "127.0.0.1".into(), port: 8080, ..Default::default() }
}

#[tokio::test]
async fn a_valid_name_is_still_looked_up() {
    let api = api().await;
    api.register(instance("web-1", "web")).await;
    let answer = api.get("/v1/catalog/service/web").await;
    assert_eq!(json(&answer)[0]["ServiceID"], "web-1");
}

#[tokio::test]
async fn an_instance_without_checks_shows_ferrys_health_as_a_check() {
    let api = api().await;
    api.register(instance("web-1", "web")).await;
    let entries = json(&api.get("/v1/health/service/web").await);
    let checks = &entries[0]["Checks"];
    assert_eq!(checks.as_array().map(Vec::len), Some(1), "{checks}");
    assert_eq!(checks[0]["CheckID"], "ferry:web-1");
    assert_eq!(checks[0]["Name"], "Ferry instance health");
    assert_eq!((&checks[0]["ServiceID"], &checks[0]["ServiceName"]), (&json!("web-1"), &json!("web")));
    let status = checks[0]["Status"].as_str().expect("a status").to_owned();
    let health = api.registry.instance("web-1").map(|i| shapes::status(api.registry.describe(&i).health));
    assert_eq!(Some(status.as_str()), health, "the instance's health, mapped");
    let listed = json(&api.get("/v1/health/checks/web").await);
    assert_eq!(listed[0]["CheckID"], "ferry:web-1");
    assert_eq!(listed[0]["Status"], status.as_str());
}

#[tokio::test]
async fn the_state_of_every_check_includes_each_instances_own() {
    let api = api().await;
    api.register(instance("web-1", "web")).await;
    let status = json(&api.get("/v1/health/checks/web").await)[0]["Status"].as_str().expect("a status").to_owned();
    let in_state = json(&api.get(&format!("/v1/health/state/{status}")).await);
    assert!(in_state.as_array().expect("a list").iter().any(|c| c["CheckID"] == "ferry:web-1"), "{in_state}");
    let any = json(&api.get("/v1/health/state/any").await);
    assert!(any.as_array().expect("a list").iter().any(|c| c["CheckID"] == "ferry:web-1"), "{any}");
    let other = if status == "passing" { "critical" } else { "passing" };
    let none = json(&api.get(&format!("/v1/health/state/{other}")).await);
    assert!(!none.as_array().expect("a list").iter().any(|c| c["CheckID"] == "ferry:web-1"), "{none}");
}

#[tokio::test]
async fn the_agent_reads_one_service_by_id() {
    let api = api().await;
    api.register(instance("web-1", "web")).await;
    let answer = api.get("/v1/agent/service/web-1").await;
    assert_eq!(answer.0, StatusCode::OK);
    let service = json(&answer);
    assert_eq!((&service["ID"], &service["Service"], &service["Port"]), (&json!("web-1"), &json!("web"), &json!(8080)));
    for missing in ["web-2", "no%20such"] {
        let answer = api.get(&format!("/v1/agent/service/{missing}")).await;
        assert_eq!(answer.0, StatusCode::NOT_FOUND, "{missing}");
        assert!(String::from_utf8_lossy(&answer.2).contains("unknown service ID"), "{missing}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_blocking_query_looks_at_the_index_and_builds_its_answer_once() {
    let api = api().await;
    let looks = std::cell::Cell::new(0);
    let builds = std::cell::Cell::new(0);
    let blocking = blocking::Blocking { index: Some(7), wait: Duration::from_secs(2) };
    let index = || {
        looks.set(looks.get() + 1);
        7
    };
    let (index, ()) = blocking::answer(&api.state, blocking, blocking::Wake::Poll, index, || builds.set(builds.get() + 1))
        .await
        .expect("answers");
    assert_eq!(index, 7);
    assert!(looks.get() >= 10, "looked {} times over 2 s", looks.get());
    assert_eq!(builds.get(), 1, "the answer is built once, when the wait ends");
}

#[tokio::test(start_paused = true)]
async fn past_the_consul_cap_a_blocking_query_is_refused_with_429_and_others_answer() {
    let api = api().await;
    let held = api
        .state
        .consul
        .blocking
        .clone()
        .try_acquire_many_owned(u32::try_from(blocking::MAX_CONSUL_BLOCKING_QUERIES).expect("small"));
    let _held = held.expect("every permit");
    let answer = api.get("/v1/catalog/services?index=1&wait=5s").await;
    assert_eq!(answer.0, StatusCode::TOO_MANY_REQUESTS);
    assert!(String::from_utf8_lossy(&answer.2).contains("1024 Consul blocking queries"));
    assert_eq!(api.get("/v1/catalog/services").await.0, StatusCode::OK, "a query that does not block still answers");
    assert_eq!(api.state.http.blocking.available_permits(), MAX_BLOCKING_QUERIES, "Ferry's own API keeps its permits");
}

#[tokio::test(start_paused = true)]
async fn a_blocking_query_on_a_name_no_service_can_have_waits_out_its_wait() {
    let api = api().await;
    let started = tokio::time::Instant::now();
    let answer = api.get("/v1/health/service/Bad.Name?index=1&wait=2s").await;
    assert_eq!((answer.0, answer.1["x-consul-index"].to_str().ok()), (StatusCode::OK, Some("1")));
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(api.registry.snapshot("Bad.Name").is_none());
}

#[test]
fn the_token_leaves_the_query_and_other_parameters_stay() {
    let uri: Uri = "/v1/health/service/web?passing&token=s%2Fecret&index=5".parse().expect("valid in this test");
    let (token, uri) = take_token(&uri);
    assert_eq!(token.as_deref(), Some("s/ecret"));
    assert_eq!(uri.to_string(), "/v1/health/service/web?passing&index=5");
    let (token, uri) = take_token(&"/v1/agent/self?token=x".parse().expect("valid in this test"));
    assert_eq!((token.as_deref(), uri.to_string().as_str()), (Some("x"), "/v1/agent/self"));
    assert_eq!(take_token(&"/v1/agent/self?tokens=x".parse().expect("valid in this test")).0, None);
}

#[test]
fn an_encoded_token_key_is_taken_out_too() {
    let (token, uri) = take_token(&"/v1/services?%74oken=abc&%74%6F%6B%65%6E=def&x=1".parse().expect("valid in this test"));
    assert_eq!((token.as_deref(), uri.to_string().as_str()), (Some("def"), "/v1/services?x=1"));
    let (token, uri) = take_token(&"/metrics?token=abc".parse().expect("valid in this test"));
    assert_eq!((token.as_deref(), uri.to_string().as_str()), (Some("abc"), "/metrics"));
}

/// A router that answers with the `Authorization` it saw and the URI, behind `layer`.
async fn seen(layer: fn(Request, Next) -> BoxedResponse, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let router = Router::new()
        .fallback(|request: Request| async move {
            let auth = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
            if auth == "Bearer refused" {
                return (StatusCode::UNAUTHORIZED, Json(json!({"error": "unknown token"}))).into_response();
            }
            format!("{auth} {}", request.uri()).into_response()
        })
        .layer(axum::middleware::from_fn(layer));
    let mut request = axum::http::Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router.oneshot(request.body(Body::empty()).expect("request")).await.expect("never fails");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

type BoxedResponse = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

fn main_port(request: Request, next: Next) -> BoxedResponse {
    Box::pin(consul_token(axum::extract::State(false), request, next))
}

fn consul_port(request: Request, next: Next) -> BoxedResponse {
    Box::pin(consul_token(axum::extract::State(true), request, next))
}

#[tokio::test]
async fn tokens_are_taken_with_consuls_precedence_query_then_header_then_authorization() {
    let all = [("x-consul-token", "header"), ("authorization", "Bearer bearer")];
    assert_eq!(seen(main_port, "/v1/agent/services?token=query", &all).await.1, "Bearer query /v1/agent/services");
    assert_eq!(seen(main_port, "/v1/agent/services", &all).await.1, "Bearer header /v1/agent/services");
    assert_eq!(seen(main_port, "/v1/agent/services", &all[1..]).await.1, "Bearer bearer /v1/agent/services");
}

#[tokio::test]
async fn the_main_port_strips_the_token_from_every_path_but_maps_it_only_on_consuls() {
    assert_eq!(seen(main_port, "/v1/services?%74oken=s&x=1", &[]).await.1, "- /v1/services?x=1");
    assert_eq!(seen(main_port, "/metrics?token=s", &[("x-consul-token", "h")]).await.1, "- /metrics");
    let refused = seen(main_port, "/v1/services?token=refused", &[("authorization", "Bearer refused")]).await;
    assert_eq!(refused.0, StatusCode::UNAUTHORIZED, "Ferry's own paths answer as Ferry does");
}

#[tokio::test]
async fn the_consul_port_maps_the_token_and_answers_403_on_every_path() {
    assert_eq!(seen(consul_port, "/anything?token=s&x=1", &[]).await.1, "Bearer s /anything?x=1");
    let refused = seen(consul_port, "/v1/services?token=refused", &[]).await;
    assert_eq!(refused.0, StatusCode::FORBIDDEN);
    assert!(refused.1.starts_with("ACL not found: unknown token"), "{}", refused.1);
}

#[test]
fn a_consul_listener_off_loopback_is_warned_about() {
    let addr = |text: &str| text.parse::<SocketAddr>().expect("valid in this test");
    assert!(!warn_if_exposed(addr("127.0.0.1:8500")));
    assert!(!warn_if_exposed(addr("[::1]:8500")));
    assert!(warn_if_exposed(addr("0.0.0.0:8500")), "every address includes the network's");
    assert!(warn_if_exposed(addr("[::]:8500")));
    assert!(warn_if_exposed(addr("10.0.0.5:8500")));
}

#[test]
fn consuls_prefixes_are_told_from_ferrys_own() {
    assert!(serves("/v1/agent/services"));
    assert!(serves("/v1/kv/some/key"));
    assert!(serves("/v1/status/leader"));
    assert!(!serves("/v1/services"));
    assert!(!serves("/v1/instances/web-1"));
    assert!(!serves("/v1/routes/web"));
    assert!(!serves("/metrics"));
}

#[test]
fn the_node_has_a_usable_address_when_the_api_listens_everywhere() {
    let consul = Consul::new("dc1".into(), "0.0.0.0:8500".parse().expect("valid in this test"));
    assert_eq!(consul.node_address, "127.0.0.1");
    assert_eq!(consul.leader, "127.0.0.1:8500");
    assert_eq!(consul.node().node, "ferry");
}

#[tokio::test]
async fn a_check_the_registry_refuses_is_named_as_the_client_wrote_it() {
    let api = api().await;
    let body = serde_json::json!({
        "Name": "web", "Address": "10.0.0.5", "Port": 80,
        "Check": {"TTL": "30s"},
        "Checks": [{"HTTP": "http://169.254.169.254/latest/meta-data/", "Interval": "10s"}]
    });
    let request = axum::http::Request::put("/v1/agent/service/register").body(Body::from(body.to_string())).expect("request");
    let (status, _, text) = api.send(request).await;
    let text = String::from_utf8_lossy(&text);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.starts_with("Checks[0].HTTP: "), "{text}");
}
