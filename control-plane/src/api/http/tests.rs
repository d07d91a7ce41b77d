use axum::body::Body;
use ferry_health::RunnerOptions;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::{
    api::security::SecurityService, auth::Tokens, ca::CaConfig, metrics::Metrics, registry::RegistryConfig, resources::Resources,
    store::MemoryStore,
};

/// The HTTP API's router in memory, without authentication.
struct Api {
    router: Router,
    registry: Arc<Registry>,
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
    Api {
        router: router(
            state,
            security,
            auth,
            Arc::new(crate::api::consul::Consul::new("dc1".into(), ([127, 0, 0, 1], 7071).into())),
        ),
        registry,
        _dir: dir,
    }
}

impl Api {
    async fn send(&self, request: axum::http::Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.expect("the router never fails");
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.expect("body").to_bytes())
    }

    async fn get(&self, path: &str, accept_encoding: Option<&str>) -> Answer {
        let mut request = axum::http::Request::get(path);
        if let Some(encoding) = accept_encoding {
            request = request.header(header::ACCEPT_ENCODING, encoding);
        }
        self.send(request.body(Body::empty()).expect("request")).await
    }

    async fn register(&self, service: &str, count: usize) {
        for n in 0..count {
            let instance = v1::Instance {
                id: format!("{service}-{n}"),
                service: service.into(),
                address: "127.0.0.1".into(),
                port: 8000 + u32::try_from(n).expect("small"),
                metadata: [("version".to_owned(), "v1".to_owned())].into(),
                ..Default::default()
            };
            self.registry.register(InstanceSpec::try_from(instance).expect("valid")).await.expect("registers");
        }
    }
}

fn encoding(answer: &Answer) -> Option<&str> {
    answer.1.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn large_json_answers_are_gzipped_for_clients_that_ask_and_only_for_them() {
    let api = api().await;
    api.register("catalog", 40).await;

    let plain = api.get("/v1/services/catalog", None).await;
    assert_eq!(plain.0, StatusCode::OK);
    assert_eq!(encoding(&plain), None);
    assert!(plain.2.len() > usize::from(MIN_COMPRESSED_BYTES), "{} bytes", plain.2.len());
    let listed: serde_json::Value = serde_json::from_slice(&plain.2).expect("JSON");
    assert_eq!(listed["instances"].as_array().map(Vec::len), Some(40));

    let gzipped = api.get("/v1/services/catalog", Some("gzip")).await;
    assert_eq!(gzipped.0, StatusCode::OK);
    assert_eq!(encoding(&gzipped), Some("gzip"));
    assert!(gzipped.2.starts_with(&[0x1f, 0x8b]), "a gzip stream");
    assert!(gzipped.2.len() * 4 < plain.2.len(), "{} of {} bytes", gzipped.2.len(), plain.2.len());
    assert_eq!(gzipped.1.get(header::VARY).and_then(|v| v.to_str().ok()), Some("accept-encoding"));
    assert_eq!(gzipped.1.get("x-ferry-index"), plain.1.get("x-ferry-index"), "headers are kept");

    let other = api.get("/v1/services/catalog", Some("br")).await;
    assert_eq!(encoding(&other), None, "gzip is the one encoding offered");
}

#[tokio::test]
async fn small_answers_and_answers_that_are_not_json_are_sent_as_they_are() {
    let api = api().await;
    api.register("catalog", 1).await;
    let small = api.get("/v1/services", Some("gzip")).await;
    assert_eq!((small.0, encoding(&small)), (StatusCode::OK, None));
    assert!(small.2.len() < usize::from(MIN_COMPRESSED_BYTES));

    let error = api.get("/v1/services/nothing-here", Some("gzip")).await;
    assert_eq!((error.0, encoding(&error)), (StatusCode::NOT_FOUND, None));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&error.2).expect("JSON"),
        serde_json::json!({ "error": "service \"nothing-here\" has no instances" })
    );

    let pem = api.get("/v1/ca/bundle", Some("gzip")).await;
    assert_eq!((pem.0, encoding(&pem)), (StatusCode::OK, None));
    assert!(pem.2.starts_with(b"-----BEGIN CERTIFICATE-----"));
}

#[tokio::test]
async fn every_answer_ends_with_a_newline_and_the_index_lists_the_endpoints() {
    let api = api().await;
    api.register("catalog", 1).await;
    for path in ["/v1/services", "/v1/services/catalog", "/v1/services/nothing-here", "/v1/routes", "/nowhere", "/ready", "/"] {
        let answer = api.get(path, None).await;
        assert!(answer.2.ends_with(b"\n"), "{path}: {:?}", String::from_utf8_lossy(&answer.2));
    }
    let index = api.get("/", None).await;
    assert_eq!(index.0, StatusCode::OK);
    let index = String::from_utf8_lossy(&index.2);
    for endpoint in ["/v1/services/{name}", "/v1/apply", "/v1/tokens", "/ui/", "/metrics"] {
        assert!(index.contains(endpoint), "{endpoint} in:\n{index}");
    }
    assert!(open("/"), "the index holds no data: no token needed");
    assert!(!open("/v1/services"));
}

#[tokio::test]
async fn a_ttl_output_past_its_limit_is_refused_naming_the_body() {
    let api = api().await;
    let renew = |output: String| axum::http::Request::put("/v1/checks/db-1:ttl/pass").body(Body::from(output)).expect("request");

    let refused = api.send(renew("x".repeat(MAX_TTL_OUTPUT_BYTES + 1))).await;
    assert_eq!(refused.0, StatusCode::BAD_REQUEST);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&refused.2).expect("JSON"),
        serde_json::json!({ "error": "body: the output must be at most 4096 bytes", "field": "body" })
    );

    // At the limit the body is read, and the renewal goes on to find no such check.
    let read = api.send(renew("x".repeat(MAX_TTL_OUTPUT_BYTES))).await;
    assert_eq!(read.0, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&read.2));
}

#[tokio::test]
async fn the_service_list_shows_each_services_virtual_ip() {
    let api = api().await;
    api.register("catalog", 1).await;
    let listed = api.get("/v1/services", None).await;
    assert_eq!(listed.0, StatusCode::OK);
    let listed: serde_json::Value = serde_json::from_slice(&listed.2).expect("JSON");
    let vip = api.registry.snapshot("catalog").and_then(|s| s.virtual_ip).expect("allocated");
    assert_eq!(listed["services"][0]["name"], "catalog");
    assert_eq!(listed["services"][0]["virtual_ip"], vip.to_string());
}

#[tokio::test]
async fn a_grpc_call_to_the_http_port_is_told_where_grpc_is() {
    let api = api().await;
    let request = axum::http::Request::post("/ferry.v1.Registry/ListServices")
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(Body::empty())
        .expect("request");
    let (status, headers, _) = api.send(request).await;
    assert_eq!(status, StatusCode::OK, "a gRPC status, not an HTTP one");
    assert_eq!(headers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"12"[..]));
    let message = tonic::Status::from_header_map(&headers).expect("a status").message().to_owned();
    assert!(message.contains("HTTP API") && message.contains("--grpc"), "{message}");
}
