//! Resilience end to end: which requests the calling sidecar retries (and which it must not),
//! the retry budget that bounds them when everything fails, retries at one hop only, the
//! circuit breaker that sheds load, and a streaming body outliving a route's timeout.
//!
//! Routes start with a probe rule answering `/probe/TAG` with an injected 418, and policies are
//! waited for by version, so every test waits on convergence, never on a fixed sleep.

use std::{net::SocketAddr, time::Instant};

use bytes::Bytes;
use ferry_tests::{
    ControlPlane, Sidecar,
    apps::{HoldingApp, HttpApp, RecordingApp},
    client::{self, Answer, header, text},
    eventually, probe_route,
};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// `method url` through the proxy at `outbound` with `headers` and a small body.
async fn send(outbound: SocketAddr, method: Method, url: &str, headers: &[(&str, &str)], body: &'static str) -> Answer {
    let uri: http::Uri = url.parse().expect("URL");
    let authority = uri.authority().expect("an absolute URL").to_string();
    let mut request = Request::builder().method(method).uri(uri).header(http::header::HOST, authority);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::from_static(body.as_bytes()))).expect("valid request");
    let stream = TcpStream::connect(outbound).await.expect("connects");
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    let response = sender.send_request(request).await.expect("answered");
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.expect("body").to_bytes())
}

/// Waits until `caller` holds `count` passing endpoints of `service`, subscribing it with a
/// first request (to `/healthz`, which the test apps do not count).
async fn wait_endpoints(caller: &Sidecar, service: &str, count: usize) {
    let _ = client::proxy_get(caller.outbound, &format!("http://{service}/healthz")).await;
    caller.wait_endpoints(service, count).await;
}

/// The caller's metrics, as text.
async fn metrics(caller: &Sidecar) -> String {
    let (_, _, body) = client::get(&format!("http://{}/metrics", caller.admin)).await.expect("metrics");
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of the first metric line starting with `prefix`, or 0.
fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// An instance of `service` fronting `app`.
async fn instance(control_plane: &ControlPlane, service: &str, app: Option<SocketAddr>, extra: &[&str]) -> Sidecar {
    Sidecar::start(&control_plane.reach(), service, app, extra).await
}

async fn caller(control_plane: &ControlPlane) -> Sidecar {
    Sidecar::start(&control_plane.reach(), "frontend", None, &[]).await
}

#[tokio::test]
async fn a_post_that_reached_the_app_is_never_retried() {
    let control_plane = ControlPlane::start().await;
    let app = RecordingApp::start("orders").await;
    let (_orders, caller) = tokio::join!(instance(&control_plane, "orders", Some(app.addr), &[]), caller(&control_plane));
    // Even a route that retries 5xx three times must not repeat a POST the app has seen.
    let rules = "  - retries: { attempts: 3, on: [ connect-failure, 5xx, reset ] }\n";
    control_plane.apply(&probe_route("orders", "post", rules)).await;
    caller.wait_for_route("orders", "post").await;

    app.fail_next(1);
    let answer = send(caller.outbound, Method::POST, "http://orders/orders", &[], "order-1").await;
    assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE, "{}", text(&answer));
    assert_eq!(app.hits(), 1, "the app saw the POST once");

    // The mesh's default policy (no rule) does not repeat it either.
    control_plane.apply("kind: Route\nservice: orders\nrules:\n  - match: { path_exact: /never }\n").await;
    eventually("the default policy in force", || async {
        let explained =
            client::get(&format!("http://{}/explain?service=orders&path=/orders&method=POST", caller.admin)).await.ok()?;
        let value: Value = serde_json::from_slice(&explained.2).ok()?;
        value["no_rule_matches"].as_bool()?.then_some(())
    })
    .await;
    app.fail_next(1);
    let answer = send(caller.outbound, Method::POST, "http://orders/orders", &[], "order-2").await;
    assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE, "{}", text(&answer));
    assert_eq!(app.hits(), 2, "once more, not three times");
    assert_eq!(app.seen()[1].headers["x-ferry-attempt"], "1", "the attempt number reaches the app");
}

#[tokio::test]
async fn a_post_to_an_instance_whose_app_is_down_is_retried_on_another() {
    let control_plane = ControlPlane::start().await;
    let (down, up) = (HttpApp::start("down").await, HttpApp::start("up").await);
    let (_down, _up, caller) = tokio::join!(
        instance(&control_plane, "catalog", Some(down.addr), &[]),
        instance(&control_plane, "catalog", Some(up.addr), &[]),
        caller(&control_plane),
    );
    // Its sidecar stays up and passing (it has no check): only the app's port is closed, before
    // any connection to it could be pooled.
    down.stop();
    wait_endpoints(&caller, "catalog", 2).await;

    for i in 0..10 {
        let answer = send(caller.outbound, Method::POST, "http://catalog/orders", &[], "order").await;
        assert_eq!(answer.0, StatusCode::OK, "POST {i}: {} {}", header(&answer, "x-ferry-error"), text(&answer));
        assert_eq!(text(&answer), "up");
    }
    assert_eq!(up.hits(), 10, "every POST reached the live app exactly once");
    let metrics = metrics(&caller).await;
    assert!(
        metric(&metrics, r#"ferry_retries_total{service="catalog",reason="app_unreachable"}"#) >= 1.0,
        "the POSTs that met the closed app were retried: {metrics}"
    );
}

#[tokio::test]
async fn the_retry_budget_bounds_retries_when_every_instance_fails() {
    let control_plane = ControlPlane::start().await;
    let (a, b) = (RecordingApp::start("a").await, RecordingApp::start("b").await);
    let (_a, _b, caller) = tokio::join!(
        instance(&control_plane, "catalog", Some(a.addr), &[]),
        instance(&control_plane, "catalog", Some(b.addr), &[]),
        caller(&control_plane),
    );
    wait_endpoints(&caller, "catalog", 2).await;
    // A small floor, so that the ratio is what bounds a few hundred requests.
    let policy = "kind: ServicePolicy\nservice: catalog\nretry_budget: { ratio: 0.2, min_per_second: 1, window: 10s }\n";
    let rules = "  - retries: { attempts: 3, on: [ 5xx ] }\n";
    let versions = control_plane.apply(&format!("{policy}---\n{}", probe_route("catalog", "budget", rules))).await;
    caller.wait_for_route("catalog", "budget").await;
    caller.wait_for_version("catalog", versions[0]).await;
    let before = a.hits() + b.hits();
    a.fail_next(u64::MAX);
    b.fail_next(u64::MAX);

    let started = Instant::now();
    let requests = 300;
    for _ in 0..requests {
        let answer = client::proxy_get(caller.outbound, "http://catalog/items").await.expect("answered");
        assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    let elapsed = started.elapsed().as_secs_f64().ceil();
    let attempts = (a.hits() + b.hits() - before) as f64;
    // Each request deposits 0.2 of a retry; the floor adds 1 a second over the window, and
    // refills as the window slides.
    let bound = 1.2 * requests as f64 + 1.0 * (10.0 + elapsed);
    eprintln!("{requests} requests made {attempts} attempts in {elapsed}s; bound {bound}; unbounded 900");
    assert!(attempts >= requests as f64 * 1.1, "retries happened: {attempts}");
    assert!(attempts <= bound, "{attempts} attempts for {requests} requests exceeds {bound}");
    let metrics = metrics(&caller).await;
    assert!(metric(&metrics, r#"ferry_retries_refused_total{service="catalog"}"#) >= 1.0, "{metrics}");
}

#[tokio::test]
async fn a_request_that_is_already_a_retry_is_not_retried_again() {
    let control_plane = ControlPlane::start().await;
    let app = RecordingApp::start("flaky").await;
    let (_flaky, caller) = tokio::join!(instance(&control_plane, "flaky", Some(app.addr), &[]), caller(&control_plane));
    let rules = "  - retries: { attempts: 3, on: [ 5xx ] }\n";
    control_plane.apply(&probe_route("flaky", "hop", rules)).await;
    caller.wait_for_route("flaky", "hop").await;

    app.fail_next(1);
    let answer = send(caller.outbound, Method::GET, "http://flaky/", &[("x-ferry-attempt", "2")], "").await;
    assert_eq!(answer.0, StatusCode::SERVICE_UNAVAILABLE, "a retry one hop up is not repeated here");
    assert_eq!(app.hits(), 1);

    app.fail_next(1);
    let answer = send(caller.outbound, Method::GET, "http://flaky/", &[], "").await;
    assert_eq!(answer.0, StatusCode::OK, "a first attempt is retried");
    let seen = app.seen();
    assert_eq!(seen.len(), 3);
    let numbers: Vec<_> = seen[1..].iter().map(|s| s.headers["x-ferry-attempt"].to_str().expect("ascii").to_owned()).collect();
    assert_eq!(numbers, ["1", "2"], "each attempt numbered");
}

#[tokio::test]
async fn a_full_circuit_breaker_sheds_with_503_overloaded() {
    let control_plane = ControlPlane::start().await;
    let app = HoldingApp::start().await;
    let (_slow, caller) = tokio::join!(instance(&control_plane, "slow", Some(app.addr), &[]), caller(&control_plane));
    let policy = "kind: ServicePolicy\nservice: slow\ncircuit_breaker: { max_concurrent: 1, max_pending: 0 }\n";
    let versions = control_plane.apply(policy).await;
    wait_endpoints(&caller, "slow", 1).await;
    caller.wait_for_version("slow", versions[0]).await;

    let outbound = caller.outbound;
    let first = tokio::spawn(async move { client::proxy_get(outbound, "http://slow/held").await.expect("answered") });
    eventually("the first request to reach the app", || async { (app.arrived() == 1).then_some(()) }).await;

    let explained = client::get(&format!("http://{}/explain?service=slow&path=/held", caller.admin)).await.expect("explains");
    let explained: Value = serde_json::from_slice(&explained.2).expect("JSON");
    assert_eq!(explained["circuit_breaker"]["in_flight"], 1, "{explained}");
    assert_eq!(explained["circuit_breaker"]["max_concurrent"], 1, "{explained}");

    let second = client::proxy_get(caller.outbound, "http://slow/held").await.expect("answered");
    assert_eq!(second.0, StatusCode::SERVICE_UNAVAILABLE, "{}", text(&second));
    assert!(header(&second, "x-ferry-error").starts_with("overloaded: "), "{second:?}");
    assert_eq!(app.arrived(), 1, "the shed request was never sent");

    app.release();
    let first = first.await.expect("joins");
    assert_eq!(first.0, StatusCode::OK);
    let metrics = metrics(&caller).await;
    assert_eq!(metric(&metrics, r#"ferry_requests_shed_total{service="slow"}"#), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, r#"ferry_requests_in_flight{service="slow"}"#), 0.0, "{metrics}");
}

#[tokio::test]
async fn a_streaming_body_outlives_the_route_timeout_met_by_its_headers() {
    let control_plane = ControlPlane::start().await;
    let app = HoldingApp::start().await;
    let (_streamer, caller) = tokio::join!(instance(&control_plane, "streamer", Some(app.addr), &[]), caller(&control_plane));
    let rules = "  - timeout: 300ms\n";
    control_plane.apply(&probe_route("streamer", "stream", rules)).await;
    caller.wait_for_route("streamer", "stream").await;

    // Headers and a first chunk come at once; the rest waits for the app's release.
    let stream = TcpStream::connect(caller.outbound).await.expect("connects");
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    let request = Request::get("http://streamer/stream")
        .header(http::header::HOST, "streamer")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("headers within the timeout");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("no error").into_data().expect("data");
    assert_eq!(first, "first,");

    // A held request under the same rule answers 504 once 300 ms have passed: by then the
    // stream, whose headers came first, has run past the timeout too.
    let timed_out = client::proxy_get(caller.outbound, "http://streamer/held").await.expect("answered");
    assert_eq!(timed_out.0, StatusCode::GATEWAY_TIMEOUT, "{}", text(&timed_out));

    app.release();
    let rest = body.collect().await.expect("the stream was not cut").to_bytes();
    assert_eq!(rest, "last");
}
