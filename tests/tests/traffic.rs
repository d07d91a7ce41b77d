//! Traffic between services through two sidecars: HTTP/1.1 (proxy and Host modes), HTTP/2 with
//! prior knowledge, and gRPC (unary, server streaming, trailers), plus the errors the mesh
//! makes itself.

use std::collections::HashSet;

use ferry_tests::{
    ControlPlane, Sidecar,
    apps::{GrpcApp, HttpApp},
    client::{self, grpc_channel, h2_get, header, host_get, proxy_get, text},
};
use futures::StreamExt;
use http_body_util::Empty;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[tokio::test]
async fn http_traffic_crosses_two_sidecars_in_every_client_mode() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &[]).await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &[]).await;
    control_plane.wait_passing("catalog", 1).await;

    // HTTP proxy mode, as `curl -x` and HTTP_PROXY clients send it.
    let answer = proxy_get(client.outbound, "http://catalog/items?page=2").await.expect("proxied");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    assert_eq!(text(&answer), "catalog-app");
    assert_eq!(header(&answer, "x-seen-path"), "/items?page=2");
    assert_eq!(header(&answer, "x-seen-host"), "catalog");
    // An absolute-form target names the destination, and the app sees it as Host too, whatever
    // Host the client sent (RFC 9112 §3.2.2).
    let odd =
        http::Request::get("http://catalog/abs").header(http::header::HOST, "elsewhere").body(Empty::new()).expect("request");
    let answer = client::send_h1(client.outbound, odd).await.expect("proxied");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    assert_eq!(header(&answer, "x-seen-host"), "catalog");
    assert_eq!(header(&answer, "x-seen-version"), "HTTP/1.1");

    // Host-header mode, in each spelling.
    for host in ["catalog", "catalog.ferry", "catalog:80", "catalog.service.ferry"] {
        let answer = host_get(client.outbound, host, "/").await.expect("routed");
        assert_eq!(answer.0, 200, "Host: {host}: {}", text(&answer));
        assert_eq!(text(&answer), "catalog-app");
    }

    // HTTP/2 with prior knowledge stays HTTP/2 to the app.
    let answer = h2_get(client.outbound, "catalog", "/h2").await.expect("h2c");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    assert_eq!(header(&answer, "x-seen-version"), "HTTP/2.0");
    assert_eq!(header(&answer, "x-seen-path"), "/h2");
    assert!(app.hits() >= 7);

    // Both ends count what they proxied, and the control plane what it pushed.
    let (_, _, metrics) = client::get(&format!("http://{}/metrics", client.admin)).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(r#"ferry_requests_total{direction="outbound",service="catalog",route="default",status="2xx"} 7"#),
        "{metrics}"
    );
    let (_, _, metrics) = client::get(&format!("http://{}/metrics", catalog.admin)).await.expect("metrics");
    assert!(
        String::from_utf8_lossy(&metrics)
            .contains(r#"ferry_requests_total{direction="inbound",service="catalog",route="-",status="2xx"} 7"#)
    );
    let (_, _, metrics) = control_plane.get("/metrics").await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("ferry_sidecars_connected 2"), "{metrics}");
    assert!(!metrics.contains("ferry_push_acks_total 0"), "{metrics}");
}

#[tokio::test]
async fn grpc_calls_and_streams_cross_two_sidecars() {
    let control_plane = ControlPlane::start().await;
    let app = GrpcApp::start().await;
    let _echo = Sidecar::start(&control_plane.reach(), "echo", Some(app.addr), &[]).await;
    let client = Sidecar::start(&control_plane.reach(), "caller", None, &[]).await;
    control_plane.wait_passing("echo", 1).await;

    let mut health = HealthClient::new(grpc_channel(client.outbound, "echo"));
    let reply = health.check(HealthCheckRequest { service: "ferry.test.Echo".into() }).await.expect("unary call");
    assert_eq!(reply.into_inner().status(), ServingStatus::Serving);

    // A gRPC error travels in a trailers-only response and arrives intact.
    let error = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await.expect_err("not found");
    assert_eq!(error.code(), tonic::Code::NotFound);

    // Server streaming: every message and the status in the trailers pass through.
    let mut updates = health.watch(HealthCheckRequest { service: "ferry.test.Echo".into() }).await.expect("stream").into_inner();
    let first = updates.next().await.expect("a first message").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);
    app.reporter.set_service_status("ferry.test.Echo", tonic_health::ServingStatus::NotServing).await;
    let second = updates.next().await.expect("a second message").expect("ok");
    assert_eq!(second.status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn requests_are_balanced_over_every_instance() {
    let control_plane = ControlPlane::start().await;
    let apps = [HttpApp::start("catalog-1").await, HttpApp::start("catalog-2").await, HttpApp::start("catalog-3").await];
    let mut sidecars = Vec::new();
    for app in &apps {
        sidecars.push(Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &[]).await);
    }
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &[]).await;
    control_plane.wait_passing("catalog", 3).await;
    client::proxy_get(client.outbound, "http://catalog/").await.expect("first request subscribes");
    client.wait_endpoints("catalog", 3).await;

    let mut seen = HashSet::new();
    for _ in 0..30 {
        let answer = proxy_get(client.outbound, "http://catalog/").await.expect("routed");
        assert_eq!(answer.0, 200);
        seen.insert(text(&answer));
    }
    assert_eq!(seen.len(), 3, "round robin reaches every instance: {seen:?}");
}

#[tokio::test]
async fn an_upstream_port_routes_to_its_service_whatever_the_host() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("inventory-app").await;
    let _inventory = Sidecar::start(&control_plane.reach(), "inventory", Some(app.addr), &[]).await;
    let client = Sidecar::start(&control_plane.reach(), "catalog", None, &["--upstream", "inventory=127.0.0.1:0"]).await;
    let upstreams = client.process.bound.get("upstreams").expect("upstreams reported").clone();
    let port: std::net::SocketAddr = upstreams.strip_prefix("inventory@").expect("inventory@ADDR").parse().expect("addr");

    let answer = host_get(port, "localhost", "/stock").await.expect("routed");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    assert_eq!(text(&answer), "inventory-app");
}

#[tokio::test]
async fn the_mesh_explains_what_it_cannot_route() {
    let control_plane = ControlPlane::start().await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &[]).await;

    let answer = proxy_get(client.outbound, "http://ghost/").await.expect("answered");
    assert_eq!(answer.0, 503);
    assert!(header(&answer, "x-ferry-error").starts_with("unknown_service: "), "{answer:?}");
    assert!(text(&answer).ends_with('\n'), "a body ends with a newline: {answer:?}");

    // The admin listener says what it serves, and answers JSON as people read it.
    let (status, _, index) = client::get(&format!("http://{}/", client.admin)).await.expect("index");
    let index = String::from_utf8_lossy(&index);
    assert_eq!(status, 200);
    assert!(index.contains("/config") && index.contains("/explain") && index.ends_with('\n'), "{index}");
    let (status, _, missing) = client::get(&format!("http://{}/nowhere", client.admin)).await.expect("answered");
    let missing = String::from_utf8_lossy(&missing);
    assert_eq!(status, 404);
    assert_eq!(missing, "no endpoint GET /nowhere; GET / lists them\n");
    let (_, headers, config) = client::get(&format!("http://{}/config", client.admin)).await.expect("config");
    let config = String::from_utf8_lossy(&config);
    assert!(config.starts_with("{\n  \"") && config.ends_with("}\n"), "indented JSON: {config}");
    assert_eq!(headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/json"[..]));

    let answer = host_get(client.outbound, "example.com", "/").await.expect("answered");
    assert_eq!(answer.0, 400);
    assert!(header(&answer, "x-ferry-error").starts_with("bad_destination: "), "{answer:?}");

    // An instance whose app is gone: the peer sidecar says the app is unreachable.
    let app = HttpApp::start("gone").await;
    let _gone = Sidecar::start(&control_plane.reach(), "gone", Some(app.addr), &[]).await;
    control_plane.wait_passing("gone", 1).await;
    app.stop();
    let answer = proxy_get(client.outbound, "http://gone/").await.expect("answered");
    assert_eq!(answer.0, 502);
    assert!(header(&answer, "x-ferry-error").starts_with("app_unreachable: "), "{answer:?}");

    // gRPC callers get a gRPC status.
    let mut health = HealthClient::new(grpc_channel(client.outbound, "ghost"));
    let error = health.check(HealthCheckRequest::default()).await.expect_err("unknown service");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert!(error.message().starts_with("unknown_service"), "{}", error.message());
}

#[tokio::test]
async fn sidecars_report_their_traffic_and_ferryctl_top_shows_who_calls_whom() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    // Reports every 200 ms instead of 5 s, so the figures arrive quickly.
    let quick = ["--traffic-report-interval", "200ms"];
    let _catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &quick).await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &quick).await;
    control_plane.wait_passing("catalog", 1).await;
    for _ in 0..5 {
        let answer = proxy_get(client.outbound, "http://catalog/").await.expect("proxied");
        assert_eq!(answer.0, 200, "{}", text(&answer));
    }

    let edge_of = |figures: &serde_json::Value| {
        figures["edges"].as_array()?.iter().find(|e| e["from"] == "frontend" && e["to"] == "catalog").cloned()
    };
    let figures = ferry_tests::eventually("the frontend → catalog edge and catalog's inbound figures", || async {
        let (status, _, body) = control_plane.get("/v1/traffic").await.ok()?;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let figures: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        (edge_of(&figures).is_some() && figures["services"]["catalog"]["inbound"].is_object()).then_some(figures)
    })
    .await;
    assert_eq!(figures["window_seconds"], 60);
    let edge = edge_of(&figures).expect("the edge");
    assert!(edge["rps"].as_f64().is_some_and(|rps| rps > 0.0), "{edge}");
    assert_eq!(edge["success_rate"].as_f64(), Some(1.0), "{edge}");
    assert!(figures["services"]["frontend"]["outbound"]["rps"].as_f64().is_some_and(|rps| rps > 0.0), "{figures}");

    let json = control_plane.ferryctl(&["-o", "json", "top"]).await;
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(edge_of(&shown).map(|e| e["success_rate"].clone()), Some(serde_json::json!(1.0)), "{shown}");
    let table = control_plane.ferryctl(&["top"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().any(|l| l.starts_with("frontend  catalog") && l.contains("100.00%")), "{table}");
}

#[tokio::test]
async fn unknown_names_are_counted_as_one_and_forgotten() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let _catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &[]).await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &["--unknown-service-ttl", "300ms"]).await;
    control_plane.wait_passing("catalog", 1).await;
    assert_eq!(proxy_get(client.outbound, "http://catalog/").await.expect("routed").0, 200);

    for name in ["ghost-one", "ghost-two", "ghost-three"] {
        let answer = proxy_get(client.outbound, &format!("http://{name}/")).await.expect("answered");
        assert_eq!(answer.0, 503);
        assert!(header(&answer, "x-ferry-error").starts_with("unknown_service: "), "{answer:?}");
    }
    // One series for every unknown name, none of their own.
    let (_, _, metrics) = client::get(&format!("http://{}/metrics", client.admin)).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(r#"ferry_requests_total{direction="outbound",service="unknown",route="-",status="unknown_service"} 3"#),
        "{metrics}"
    );
    for family in ["ferry_requests_total", "ferry_request_duration_seconds_count"] {
        let own = format!(r#"{family}{{direction="outbound",service="ghost"#);
        assert!(!metrics.contains(&own), "no request series of their own: {metrics}");
    }

    // Remembered for a short while, then forgotten: no subscription is left behind, here or at
    // the control plane. The service in use stays.
    ferry_tests::eventually("the unknown names to be forgotten", || async {
        let config = client.config().await;
        let services = config["services"].as_object()?;
        (!services.keys().any(|name| name.starts_with("ghost")) && services.contains_key("catalog")).then_some(())
    })
    .await;
    ferry_tests::eventually("the control plane to drop the subscriptions", || async {
        let (_, _, body) = control_plane.get("/v1/sidecars").await.ok()?;
        let text = String::from_utf8_lossy(&body).into_owned();
        (text.contains("catalog") && !text.contains("ghost")).then_some(())
    })
    .await;
    assert_eq!(proxy_get(client.outbound, "http://catalog/").await.expect("routed").0, 200);
    // Forgotten with their balancers' and guards' series.
    let (_, _, metrics) = client::get(&format!("http://{}/metrics", client.admin)).await.expect("metrics");
    assert!(!String::from_utf8_lossy(&metrics).contains("ghost"), "{}", String::from_utf8_lossy(&metrics));
    // Asked for again, an unknown name is still refused the same way.
    let answer = proxy_get(client.outbound, "http://ghost-one/").await.expect("answered");
    assert!(header(&answer, "x-ferry-error").starts_with("unknown_service: "), "{answer:?}");
}
