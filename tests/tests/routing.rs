//! Routing end to end: Routes and ServicePolicies applied through the control plane's API reach
//! the calling sidecar and decide where each request goes (weighted subsets, matches), how long
//! it may take, when it is retried, which faults are injected, what is mirrored and how headers
//! and paths change. Bad resources are refused naming the field and change nothing; routes
//! survive a control-plane restart; and a route waits for the subsets it names instead of
//! failing requests.
//!
//! Every route here starts with a probe rule that answers `/probe/TAG` with an injected 418, so
//! a test waits until that route is in force in the caller by polling, never by sleeping.
//!
//! A sidecar NACK is not tested here: the control plane refuses everything the sidecar would
//! (both run the same validation), so a real control plane cannot be made to push a route a
//! sidecar rejects.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ferry_proto::v1::{self, config_client::ConfigClient};
use ferry_tests::{
    ControlPlane, Sidecar,
    apps::{FlakyGrpcApp, HttpApp, RecordingApp, SlowApp},
    client::{self, Answer, header, text},
    eventually, probe_route,
};
use futures::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use serde_json::Value;

/// The subsets of `catalog` most tests route to.
const CATALOG_POLICY: &str = "kind: ServicePolicy
service: catalog
subsets: { v1: { labels: { version: v1 } }, v2: { labels: { version: v2 } } }
";

/// `GET path` from the control plane's HTTP API, as JSON.
async fn get_json(control_plane: &ControlPlane, path: &str) -> (StatusCode, Value) {
    let answer = control_plane.get(path).await.expect("answered");
    (answer.0, serde_json::from_slice(&answer.2).unwrap_or(Value::Null))
}

/// An instance of `service` fronting `app`, labelled `version={version}`.
async fn instance(control_plane: &ControlPlane, service: &str, app: SocketAddr, version: &str) -> Sidecar {
    Sidecar::start(&control_plane.reach(), service, Some(app), &["--meta", &format!("version={version}")]).await
}

/// A sidecar with no app, the one the tests send through.
async fn caller(control_plane: &ControlPlane) -> Sidecar {
    Sidecar::start(&control_plane.reach(), "frontend", None, &[]).await
}

/// `method url` through the proxy at `outbound`, with extra headers.
async fn send(outbound: SocketAddr, method: Method, url: &str, headers: &[(&str, &str)]) -> Answer {
    let uri: http::Uri = url.parse().expect("URL");
    let authority = uri.authority().expect("an absolute URL").to_string();
    let mut request = Request::builder().method(method).uri(uri).header(http::header::HOST, authority);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client::send_h1(outbound, request.body(Empty::new()).expect("valid request")).await.expect("answered")
}

/// `count` GETs of `url` through `outbound`, `concurrency` at a time: each answer and how long
/// it took.
async fn load(outbound: SocketAddr, url: &str, count: usize, concurrency: usize) -> Vec<(Answer, Duration)> {
    futures::stream::iter(0..count)
        .map(|_| async move {
            let started = Instant::now();
            let answer = client::proxy_get(outbound, url).await.expect("answered");
            (answer, started.elapsed())
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Asserts that `hits` of `trials` is within five standard deviations of the binomial mean for
/// a share `p`, printing the share observed.
fn assert_share(what: &str, hits: usize, trials: usize, p: f64) {
    let (n, k) = (trials as f64, hits as f64);
    let sigma = (n * p * (1.0 - p)).sqrt();
    eprintln!(
        "{what}: {hits} of {trials} ({:.1}%), expected {:.1}% within ±{:.1}% (5 sigma)",
        100.0 * k / n,
        100.0 * p,
        500.0 * sigma / n
    );
    assert!((k - n * p).abs() <= 5.0 * sigma, "{what}: {hits} of {trials} is more than 5 sigma ({sigma:.1}) from {}", n * p);
}

#[tokio::test]
async fn a_90_10_split_holds_within_five_sigma() {
    let control_plane = ControlPlane::start().await;
    let (v1, v2) = (HttpApp::start("catalog-v1").await, HttpApp::start("catalog-v2").await);
    let (_v1, _v2, caller) = tokio::join!(
        instance(&control_plane, "catalog", v1.addr, "v1"),
        instance(&control_plane, "catalog", v2.addr, "v2"),
        caller(&control_plane),
    );
    let split = "  - backends: [ { subset: v1, weight: 90 }, { subset: v2, weight: 10 } ]\n";
    control_plane.apply(&format!("{CATALOG_POLICY}---\n{}", probe_route("catalog", "split", split))).await;
    caller.wait_for_route("catalog", "split").await;
    caller.wait_endpoints("catalog", 2).await;

    let answers = load(caller.outbound, "http://catalog/", 2000, 16).await;
    let failed: Vec<_> = answers.iter().filter(|(a, _)| a.0 != 200).map(|(a, _)| a).collect();
    assert!(failed.is_empty(), "{} failed, the first: {:?}", failed.len(), failed.first());
    let to_v2 = answers.iter().filter(|(a, _)| text(a) == "catalog-v2").count();
    let to_v1 = answers.iter().filter(|(a, _)| text(a) == "catalog-v1").count();
    assert_eq!(to_v1 + to_v2, answers.len());
    assert_share("share sent to v2", to_v2, answers.len(), 0.1);
}

#[tokio::test]
async fn requests_go_where_the_first_matching_rule_says() {
    let control_plane = ControlPlane::start().await;
    let (v1, v2) = (HttpApp::start("catalog-v1").await, HttpApp::start("catalog-v2").await);
    let (_v1, _v2, caller) = tokio::join!(
        instance(&control_plane, "catalog", v1.addr, "v1"),
        instance(&control_plane, "catalog", v2.addr, "v2"),
        caller(&control_plane),
    );
    // Each rule names itself in `x-rule`; the last catches everything else.
    let rules = r#"  - match: { path_exact: /exact }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: exact } }
  - match: { path_prefix: /prefix/ }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: prefix } }
  - match: { path_regex: "/items/[0-9]+" }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: regex } }
  - match: { method: DELETE }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: method } }
  - match: { headers: { x-user: alice } }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: header } }
  - match: { header_regex: { x-tenant: "t-[a-z]+" } }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: header-regex } }
  - match: { header_present: [ x-debug ] }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: header-present } }
  - match: { query: { mode: fast } }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: query } }
  - match: { query_regex: { page: "[0-9]+" } }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: query-regex } }
  - match: { path_prefix: /api, method: POST, headers: { x-canary: "true" } }
    backends: [ { subset: v2 } ]
    response_headers: { set: { x-rule: all-of } }
  - backends: [ { subset: v1 } ]
    response_headers: { set: { x-rule: default } }
"#;
    control_plane.apply(&format!("{CATALOG_POLICY}---\n{}", probe_route("catalog", "matches", rules))).await;
    caller.wait_for_route("catalog", "matches").await;
    caller.wait_endpoints("catalog", 2).await;

    // (method, path and query, headers, the rule expected to take it)
    type Case = (Method, &'static str, &'static [(&'static str, &'static str)], &'static str);
    let cases: &[Case] = &[
        (Method::GET, "/exact", &[], "exact"),
        (Method::GET, "/exact?with=query", &[], "exact"),
        (Method::GET, "/exact/more", &[], "default"),
        (Method::GET, "/prefix/a/b", &[], "prefix"),
        (Method::GET, "/prefix", &[], "default"),
        (Method::GET, "/items/42", &[], "regex"),
        (Method::GET, "/items/42x", &[], "default"),
        (Method::DELETE, "/items/42", &[], "regex"),
        (Method::DELETE, "/anything", &[], "method"),
        (Method::GET, "/", &[("x-user", "alice")], "header"),
        (Method::GET, "/", &[("X-User", "alice")], "header"),
        (Method::GET, "/", &[("x-user", "bob")], "default"),
        (Method::GET, "/", &[("x-tenant", "t-abc")], "header-regex"),
        (Method::GET, "/", &[("x-tenant", "t-ABC")], "default"),
        (Method::GET, "/", &[("x-tenant", "xt-abc")], "default"),
        (Method::GET, "/", &[("x-debug", "")], "header-present"),
        (Method::GET, "/", &[("x-debug", "1")], "header-present"),
        (Method::GET, "/?mode=fast", &[], "query"),
        (Method::GET, "/?a=1&mode=fast", &[], "query"),
        (Method::GET, "/?mode=faster", &[], "default"),
        (Method::GET, "/?x=1&page=12", &[], "query-regex"),
        (Method::GET, "/?page=twelve", &[], "default"),
        (Method::POST, "/api/items", &[("x-canary", "true")], "all-of"),
        (Method::POST, "/api/items", &[], "default"),
        (Method::GET, "/api/items", &[("x-canary", "true")], "default"),
        (Method::POST, "/other", &[("x-canary", "true")], "default"),
    ];
    for (method, path, headers, expected) in cases {
        let answer = send(caller.outbound, method.clone(), &format!("http://catalog{path}"), headers).await;
        let case = format!("{method} {path} {headers:?}");
        assert_eq!(answer.0, 200, "{case}: {}", text(&answer));
        assert_eq!(header(&answer, "x-rule"), *expected, "{case}");
        let server = if *expected == "default" { "catalog-v1" } else { "catalog-v2" };
        assert_eq!(text(&answer), server, "{case}");
        assert_eq!(header(&answer, "x-seen-path"), *path, "{case}: the path reaches the app unchanged");
    }
}

#[tokio::test]
async fn a_route_timeout_answers_504_upstream_timeout() {
    let control_plane = ControlPlane::start().await;
    let app = SlowApp::start("slow-app", Duration::from_secs(1)).await;
    let (_slow, caller) = tokio::join!(instance(&control_plane, "slow", app.addr, "v1"), caller(&control_plane));
    let rules = "  - match: { path_prefix: /bounded }
    timeout: 300ms
  - match: { path_prefix: /per-try }
    timeout: 5s
    retries: { attempts: 2, per_try_timeout: 200ms, on: [ 5xx ] }
";
    control_plane.apply(&probe_route("slow", "timeouts", rules)).await;
    caller.wait_for_route("slow", "timeouts").await;

    let timed = |path: &'static str| async move {
        let started = Instant::now();
        let answer = client::proxy_get(caller.outbound, &format!("http://slow{path}")).await.expect("answered");
        (answer, started.elapsed())
    };
    let ((bounded, bounded_took), (per_try, per_try_took), (unbounded, unbounded_took)) =
        tokio::join!(timed("/bounded"), timed("/per-try"), timed("/unbounded"));

    assert_eq!(bounded.0, 504, "{}", text(&bounded));
    assert!(header(&bounded, "x-ferry-error").starts_with("upstream_timeout: "), "{bounded:?}");
    assert!(bounded_took >= Duration::from_millis(300), "gave up after {bounded_took:?}, before the timeout");

    // Two attempts, each cut at 200 ms.
    assert_eq!(per_try.0, 504, "{}", text(&per_try));
    assert!(header(&per_try, "x-ferry-error").starts_with("upstream_timeout: "), "{per_try:?}");
    assert!(per_try_took >= Duration::from_millis(400), "two attempts of 200 ms took {per_try_took:?}");

    // Other rules have no deadline: the slow answer arrives.
    assert_eq!(unbounded.0, 200, "{}", text(&unbounded));
    assert_eq!(text(&unbounded), "slow-app");
    assert!(unbounded_took >= Duration::from_secs(1));
}

#[tokio::test]
async fn faults_abort_and_delay_their_share_of_requests() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let (_catalog, caller) = tokio::join!(instance(&control_plane, "catalog", app.addr, "v1"), caller(&control_plane));
    let rules = "  - match: { path_prefix: /abort }
    fault: { abort: { percent: 30, status: 503 } }
  - match: { path_prefix: /delay-some }
    fault: { delay: { percent: 50, duration: 500ms } }
  - match: { path_prefix: /delay-all }
    fault: { delay: { percent: 100, duration: 500ms } }
";
    control_plane.apply(&probe_route("catalog", "faults", rules)).await;
    caller.wait_for_route("catalog", "faults").await;

    let hits_before = app.hits();
    let answers = load(caller.outbound, "http://catalog/abort", 1000, 16).await;
    let aborted = answers.iter().filter(|(a, _)| a.0 == 503).collect::<Vec<_>>();
    for (answer, _) in &aborted {
        assert!(header(answer, "x-ferry-error").starts_with("fault_abort: "), "{answer:?}");
    }
    let served = answers.iter().filter(|(a, _)| a.0 == 200 && text(a) == "catalog-app").count();
    assert_eq!(served + aborted.len(), answers.len(), "every request is either aborted or served");
    assert_eq!(app.hits() - hits_before, served as u64, "aborted requests never reach the app");
    assert_share("share aborted", aborted.len(), answers.len(), 0.3);

    // A delay adds at least its duration, and only to its share of requests.
    let delay = Duration::from_millis(500);
    let answers = load(caller.outbound, "http://catalog/delay-some", 200, 100).await;
    assert!(answers.iter().all(|(a, _)| a.0 == 200), "delayed requests are served");
    let delayed = answers.iter().filter(|(_, took)| *took >= delay).count();
    assert_share("share delayed", delayed, answers.len(), 0.5);
    let answers = load(caller.outbound, "http://catalog/delay-all", 20, 20).await;
    for (answer, took) in &answers {
        assert_eq!(answer.0, 200, "{}", text(answer));
        assert!(*took >= delay, "a request delayed by {delay:?} took {took:?}");
    }
}

#[tokio::test]
async fn mirrors_get_copies_and_callers_only_the_primary_answer() {
    let control_plane = ControlPlane::start().await;
    let (v1, v2, shadow) =
        (RecordingApp::start("catalog-v1").await, RecordingApp::start("catalog-v2").await, RecordingApp::start("shadow").await);
    let (_v1, _v2, _shadow, caller) = tokio::join!(
        instance(&control_plane, "catalog", v1.addr, "v1"),
        instance(&control_plane, "catalog", v2.addr, "v2"),
        instance(&control_plane, "shadow", shadow.addr, "v1"),
        caller(&control_plane),
    );
    let rules = "  - match: { path_prefix: /to-service }
    backends: [ { subset: v1 } ]
    mirror: { backend: { service: shadow }, percent: 100 }
  - match: { path_prefix: /to-subset }
    backends: [ { subset: v1 } ]
    mirror: { backend: { subset: v2 }, percent: 100 }
";
    control_plane.apply(&format!("{CATALOG_POLICY}---\n{}", probe_route("catalog", "mirrors", rules))).await;
    caller.wait_for_route("catalog", "mirrors").await;
    caller.wait_endpoints("catalog", 2).await;
    // The copies' answers must not matter: the shadow fails every one.
    shadow.fail_next(u64::MAX);
    // Probes sent before the route was in force reached the apps: count from here.
    let (v1_before, v2_before) = (v1.hits(), v2.hits());

    for n in 0..10 {
        for path in ["/to-service", "/to-subset"] {
            let answer = client::proxy_get(caller.outbound, &format!("http://catalog{path}/{n}")).await.expect("answered");
            assert_eq!(answer.0, 200, "{}", text(&answer));
            assert_eq!(text(&answer), "catalog-v1", "only the primary answers");
            assert!(answer.1.get("x-ferry-mirror").is_none(), "{answer:?}");
        }
    }
    eventually("every copy to arrive", || async { (shadow.hits() == 10 && v2.hits() - v2_before == 10).then_some(()) }).await;
    let mirrored = |app: &RecordingApp, before: usize, prefix: &str| {
        for seen in app.seen().into_iter().skip(before) {
            assert!(seen.path.starts_with(prefix), "{} got {seen:?}", app.name);
            assert_eq!(seen.headers.get("x-ferry-mirror").map(|v| v.as_bytes()), Some(&b"true"[..]), "{seen:?}");
        }
    };
    mirrored(&shadow, 0, "/to-service/");
    mirrored(&v2, v2_before, "/to-subset/");
    let primary = v1.seen().split_off(v1_before);
    assert_eq!(primary.len(), 20);
    assert!(primary.iter().all(|seen| seen.headers.get("x-ferry-mirror").is_none()), "{primary:?}");
}

#[tokio::test]
async fn bad_resources_are_refused_naming_the_field_and_change_nothing() {
    let control_plane = ControlPlane::start().await;
    let (v1, v2) = (HttpApp::start("catalog-v1").await, HttpApp::start("catalog-v2").await);
    let (_v1, _v2, caller) = tokio::join!(
        instance(&control_plane, "catalog", v1.addr, "v1"),
        instance(&control_plane, "catalog", v2.addr, "v2"),
        caller(&control_plane),
    );
    let rules = "  - match: { headers: { x-canary: \"true\" } }
    backends: [ { subset: v2 } ]
  - backends: [ { subset: v1 } ]
";
    control_plane.apply(&format!("{CATALOG_POLICY}---\n{}", probe_route("catalog", "good", rules))).await;
    caller.wait_for_route("catalog", "good").await;
    caller.wait_endpoints("catalog", 2).await;
    let (_, route_before) = get_json(&control_plane, "/v1/routes/catalog").await;
    let (_, policy_before) = get_json(&control_plane, "/v1/policies/catalog").await;

    let bad_route = |rules: &str| format!("kind: Route\nservice: catalog\nrules:\n{rules}");
    let a_new_policy = "kind: ServicePolicy\nservice: catalog\nsubsets: { v3: { labels: { version: v3 } } }\n---\n";
    let yaml_cases = [
        ("kind: Route\nservice: [\n".to_owned(), "documents[0]"),
        (
            format!("{a_new_policy}{}", bad_route("  - backends: [ { subset: v2, weight: 20000 } ]\n")),
            "documents[1].rules[0].backends[0].weight",
        ),
        (bad_route("  - backend: [ { subset: v2 } ]\n"), "documents[0].rules[0].backend"),
        (bad_route("  - timeout: soon\n"), "documents[0].rules[0].timeout"),
        (bad_route("  - match: { path_regex: \"(\" }\n"), "documents[0].rules[0].match.path_regex"),
        (bad_route("  - {}\n  - fault: { abort: { percent: 150, status: 503 } }\n"), "documents[0].rules[1].fault.abort.percent"),
        (bad_route("  - retries: { attempts: 3, on: [ sometimes ] }\n"), "documents[0].rules[0].retries.on[0]"),
        ("kind: Gateway\nservice: catalog\n".to_owned(), "documents[0].kind"),
    ];
    for (yaml, field) in &yaml_cases {
        for path in ["/v1/apply", "/v1/apply?dry_run=true"] {
            let answer = control_plane.send_body(Method::POST, path, "application/yaml", yaml).await.expect("answered");
            assert_eq!(answer.0, 400, "{path} {yaml}: {}", text(&answer));
            let error: Value = serde_json::from_slice(&answer.2).expect("a JSON error");
            assert_eq!(error["field"], *field, "{yaml}: {error}");
            assert!(error["error"].as_str().is_some_and(|e| e.starts_with(&format!("{field}: "))), "{error}");
        }
    }

    // The JSON forms name the field relative to what was sent.
    let heavy = r#"{"kind": "Route", "service": "catalog", "rules": [{"backends": [{"subset": "v2", "weight": 20000}]}]}"#;
    let json_cases = [
        (Method::POST, "/v1/apply", heavy.to_owned(), "rules[0].backends[0].weight"),
        (Method::POST, "/v1/apply", format!("[{}, {heavy}]", &route_before), "[1].rules[0].backends[0].weight"),
        (Method::PUT, "/v1/routes/catalog", heavy.to_owned(), "rules[0].backends[0].weight"),
        (Method::PUT, "/v1/routes/catalog", r#"{"rules": [{"timeout": "soon"}]}"#.to_owned(), "rules[0].timeout"),
        (Method::POST, "/v1/apply", "{not json".to_owned(), "body"),
    ];
    for (method, path, body, field) in &json_cases {
        let answer = control_plane.send_json(method.clone(), path, body).await.expect("answered");
        assert_eq!(answer.0, 400, "{method} {path} {body}: {}", text(&answer));
        let error: Value = serde_json::from_slice(&answer.2).expect("a JSON error");
        assert_eq!(error["field"], *field, "{method} {path} {body}: {error}");
    }

    // gRPC names the item of the request.
    let channel = control_plane.channel().await;
    let heavy = v1::Route {
        service: "catalog".into(),
        rules: vec![v1::RouteRule {
            backends: vec![v1::Backend { subset: "v2".into(), weight: 20_000, ..Default::default() }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let request = v1::ApplyRequest {
        items: vec![v1::ApplyItem {
            resource: Some(v1::Resource { kind: Some(v1::resource::Kind::Route(heavy)) }),
            expected_version: None,
        }],
        dry_run: false,
    };
    let status = ConfigClient::new(channel).apply(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("items[0].resource.rules[0].backends[0].weight: "), "{}", status.message());

    // A misspelled service gets the closest name, whatever else is wrong with its route.
    let typo = "kind: Route\nservice: catlog\nrules: [ { backends: [ { subset: v1 } ] } ]\n";
    let answer = control_plane.send_body(Method::POST, "/v1/apply", "application/yaml", typo).await.expect("answered");
    assert_eq!(answer.0, 400, "{}", text(&answer));
    let error: Value = serde_json::from_slice(&answer.2).expect("a JSON error");
    let reason = error["error"].as_str().unwrap_or_default();
    let field = "documents[0].rules[0].backends[0].subset";
    assert!(reason.starts_with(&format!(r#"{field}: there is no service "catlog" (did you mean "catalog"?); "#)), "{error}");
    let typo = "kind: Route\nservice: catalog\nrules: [ { backends: [ { service: catalgo, subset: v1 } ] } ]\n";
    let answer = control_plane.send_body(Method::POST, "/v1/apply", "application/yaml", typo).await.expect("answered");
    let error: Value = serde_json::from_slice(&answer.2).expect("a JSON error");
    let reason = error["error"].as_str().unwrap_or_default();
    assert!(reason.contains(r#"there is no service "catalgo" (did you mean "catalog"?)"#), "a backend's service too: {error}");

    // A valid dry run reports the change and stores nothing.
    let answer = control_plane
        .send_body(Method::POST, "/v1/apply?dry_run=true", "application/yaml", &bad_route("  - backends: [ { subset: v2 } ]\n"))
        .await
        .expect("answered");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    let dry: Value = serde_json::from_slice(&answer.2).expect("JSON");
    assert_eq!(dry["applied"][0]["changed"], true, "{dry}");

    let (_, route_after) = get_json(&control_plane, "/v1/routes/catalog").await;
    let (_, policy_after) = get_json(&control_plane, "/v1/policies/catalog").await;
    assert_eq!(route_after, route_before, "the route is unchanged");
    assert_eq!(policy_after, policy_before, "the policy is unchanged");
    let (_, history) = get_json(&control_plane, "/v1/routes/catalog/history").await;
    assert_eq!(history["entries"].as_array().map(Vec::len), Some(1), "{history}");

    // And traffic is routed as before.
    caller.wait_for_route("catalog", "good").await;
    for _ in 0..10 {
        let canary = send(caller.outbound, Method::GET, "http://catalog/", &[("x-canary", "true")]).await;
        assert_eq!(text(&canary), "catalog-v2");
        let other = send(caller.outbound, Method::GET, "http://catalog/", &[]).await;
        assert_eq!(text(&other), "catalog-v1");
    }
}

#[tokio::test]
async fn routes_survive_a_control_plane_restart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut first = ControlPlane::start_in(dir.path(), &[]).await;
    let rules = "  - match: { headers: { x-canary: \"true\" } }
    backends: [ { subset: v2 } ]
  - backends: [ { subset: v1 } ]
";
    let versions = first.apply(&format!("{CATALOG_POLICY}---\n{}", probe_route("catalog", "durable", rules))).await;
    let (_, route_before) = get_json(&first, "/v1/routes/catalog").await;
    let (_, policy_before) = get_json(&first, "/v1/policies/catalog").await;
    first.process.kill().await;

    let second = ControlPlane::start_in(dir.path(), &[]).await;
    let (status, route_after) = get_json(&second, "/v1/routes/catalog").await;
    assert_eq!(status, 200, "{route_after}");
    assert_eq!(route_after, route_before);
    assert_eq!(get_json(&second, "/v1/policies/catalog").await.1, policy_before);

    // A fresh mesh on the restarted control plane routes by the stored rules.
    let (v1, v2) = (HttpApp::start("catalog-v1").await, HttpApp::start("catalog-v2").await);
    let (_v1, _v2, caller) =
        tokio::join!(instance(&second, "catalog", v1.addr, "v1"), instance(&second, "catalog", v2.addr, "v2"), caller(&second),);
    caller.wait_for_route("catalog", "durable").await;
    caller.wait_endpoints("catalog", 2).await;
    for _ in 0..5 {
        assert_eq!(text(&send(caller.outbound, Method::GET, "http://catalog/", &[("x-canary", "true")]).await), "catalog-v2");
        assert_eq!(text(&send(caller.outbound, Method::GET, "http://catalog/", &[]).await), "catalog-v1");
    }

    // Versions keep counting up from where they were.
    let newer = second.apply(&probe_route("catalog", "newer", "  - backends: [ { subset: v2 } ]\n")).await;
    assert!(newer[0] > versions.iter().copied().max().unwrap_or_default(), "{newer:?} after {versions:?}");
}

/// What a steady load saw.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

#[tokio::test]
async fn a_route_waits_for_its_subset_without_failing_requests() {
    let control_plane = ControlPlane::start().await;
    let (v1, v2) = (HttpApp::start("catalog-v1").await, HttpApp::start("catalog-v2").await);
    let (_v1, caller) = tokio::join!(instance(&control_plane, "catalog", v1.addr, "v1"), caller(&control_plane));
    client::proxy_get(caller.outbound, "http://catalog/").await.expect("the first request subscribes");
    caller.wait_endpoints("catalog", 1).await;

    // One request after another, all the way through.
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let worker = tokio::spawn({
        let (load, stop, outbound) = (load.clone(), stop.clone(), caller.outbound);
        async move {
            while !stop.load(Ordering::Relaxed) {
                match client::proxy_get(outbound, "http://catalog/").await {
                    Ok(answer) if answer.0 == 200 => load.ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        let detail = match other {
                            Ok(answer) => format!("{} {}", answer.0, header(&answer, "x-ferry-error")),
                            Err(error) => error.to_string(),
                        };
                        load.first_failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(detail);
                        load.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }
    });
    let progress = |load: Arc<Load>| async move {
        let from = load.ok.load(Ordering::Relaxed);
        eventually("more requests to be served", || async { (load.ok.load(Ordering::Relaxed) >= from + 20).then_some(()) }).await;
    };
    let not_in_force = || async {
        let answer = client::proxy_get(caller.outbound, "http://catalog/probe/canary").await.expect("answered");
        assert_eq!(answer.0, 200, "the held route is not in force: {}", text(&answer));
        assert_eq!(text(&answer), "catalog-v1");
    };

    // A route naming subset v2 before any policy defines it is refused, naming the field.
    let canary = "  - backends: [ { subset: v2 } ]\n    response_headers: { set: { x-route: canary } }\n";
    let refused = control_plane
        .send_body(Method::POST, "/v1/apply", "application/yaml", &probe_route("catalog", "canary", canary))
        .await
        .expect("answered");
    assert_eq!(refused.0, StatusCode::BAD_REQUEST, "{}", text(&refused));
    let error: Value = serde_json::from_slice(&refused.2).expect("JSON");
    assert_eq!(error["field"], "documents[0].rules[1].backends[0].subset", "{error}");

    // The policy defines v2, but no instance is in it yet: the route is held.
    control_plane.apply(CATALOG_POLICY).await;
    let versions = control_plane.apply(&probe_route("catalog", "canary", canary)).await;
    caller.wait_for_version("catalog", versions[0]).await;
    progress(load.clone()).await;
    not_in_force().await;

    // A v2 instance arrives: the route takes effect.
    let _v2 = instance(&control_plane, "catalog", v2.addr, "v2").await;
    caller.wait_for_route("catalog", "canary").await;
    let answer = client::proxy_get(caller.outbound, "http://catalog/").await.expect("answered");
    assert_eq!(text(&answer), "catalog-v2");
    assert_eq!(header(&answer, "x-route"), "canary");
    progress(load.clone()).await;

    stop.store(true, Ordering::Relaxed);
    worker.await.expect("the load finishes");
    let (ok, failed) = (load.ok.load(Ordering::Relaxed), load.failed.load(Ordering::Relaxed));
    let first = load.first_failure.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!("held route: {ok} requests served, {failed} failed");
    assert_eq!(failed, 0, "{failed} of {} requests failed; the first: {first:?}", ok + failed);
}

#[tokio::test]
async fn safe_requests_are_retried_past_failures() {
    let control_plane = ControlPlane::start().await;
    let app = RecordingApp::start("flaky-app").await;
    let (_flaky, caller) = tokio::join!(instance(&control_plane, "flaky", app.addr, "v1"), caller(&control_plane));
    let rules = "  - match: { path_prefix: /retried }
    retries: { attempts: 3, on: [ connect-failure, 5xx ] }
  - match: { path_prefix: /once }
";
    control_plane.apply(&probe_route("flaky", "retries", rules)).await;
    caller.wait_for_route("flaky", "retries").await;

    let attempts = |method: Method, path: &'static str, failures: u64| {
        let (app, outbound) = (&app, caller.outbound);
        async move {
            app.fail_next(failures);
            let before = app.hits();
            let answer = send(outbound, method, &format!("http://flaky{path}"), &[]).await;
            app.fail_next(0);
            (answer.0, app.hits() - before)
        }
    };
    assert_eq!(attempts(Method::GET, "/retried", 2).await, (StatusCode::OK, 3), "two failures, then success");
    assert_eq!(attempts(Method::GET, "/retried", 5).await, (StatusCode::SERVICE_UNAVAILABLE, 3), "attempts run out");
    assert_eq!(attempts(Method::POST, "/retried", 1).await, (StatusCode::SERVICE_UNAVAILABLE, 1), "a POST is not repeated");
    assert_eq!(attempts(Method::GET, "/once", 1).await, (StatusCode::SERVICE_UNAVAILABLE, 1), "no retries configured");
}

#[tokio::test]
async fn grpc_calls_are_retried_on_the_grpc_statuses_a_route_names() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let control_plane = ControlPlane::start().await;
    let app = FlakyGrpcApp::start().await;
    let (_server, caller) = tokio::join!(instance(&control_plane, "checker", app.addr, "v1"), caller(&control_plane));
    let rules = "  - match: { path_prefix: /grpc.health.v1.Health/ }
    retries: { attempts: 3, on: [ unavailable ] }
";
    control_plane.apply(&probe_route("checker", "grpc", rules)).await;
    caller.wait_for_route("checker", "grpc").await;

    // gRPC request bodies have no content-length: the body streams through and is kept for a
    // retry. Every gRPC call is a POST, and is retried all the same on a status the route names.
    let mut client = HealthClient::new(client::grpc_channel(caller.outbound, "checker"));
    app.fail_next(2);
    let before = app.calls();
    let answer = client.check(HealthCheckRequest { service: String::new() }).await.expect("the third attempt succeeds");
    assert_eq!(answer.into_inner().status, 1);
    assert_eq!(app.calls() - before, 3);

    app.fail_next(5);
    let before = app.calls();
    let error = client.check(HealthCheckRequest { service: String::new() }).await.expect_err("attempts run out");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert_eq!(app.calls() - before, 3);
}

#[tokio::test]
async fn headers_and_path_prefixes_are_rewritten() {
    let control_plane = ControlPlane::start().await;
    let app = RecordingApp::start("catalog-app").await;
    let (_catalog, caller) = tokio::join!(instance(&control_plane, "catalog", app.addr, "v1"), caller(&control_plane));
    let rules = "  - match: { path_prefix: /api/v1 }
    rewrite_path_prefix: /v2
    request_headers: { set: { x-env: staging }, add: { x-tag: added }, remove: [ x-secret ] }
    response_headers: { set: { x-route: rewritten }, add: { x-extra: one }, remove: [ x-served-by ] }
";
    control_plane.apply(&probe_route("catalog", "rewrites", rules)).await;
    caller.wait_for_route("catalog", "rewrites").await;

    let sent = [("x-env", "prod"), ("x-tag", "original"), ("x-secret", "s3cr3t")];
    for (path, rewritten) in [("/api/v1/items?page=2", "/v2/items?page=2"), ("/api/v1", "/v2")] {
        let answer = send(caller.outbound, Method::GET, &format!("http://catalog{path}"), &sent).await;
        assert_eq!(answer.0, 200, "{}", text(&answer));
        assert_eq!(header(&answer, "x-seen-path"), rewritten);
        assert_eq!(header(&answer, "x-route"), "rewritten");
        assert_eq!(header(&answer, "x-extra"), "one");
        assert!(answer.1.get("x-served-by").is_none(), "removed from the response: {answer:?}");
        let seen = app.seen().pop().expect("the app saw the request");
        assert_eq!(seen.path, rewritten);
        let values =
            |name: &str| seen.headers.get_all(name).iter().map(|v| v.to_str().unwrap_or("?").to_owned()).collect::<Vec<_>>();
        assert_eq!(values("x-env"), ["staging"], "set replaces");
        assert_eq!(values("x-tag"), ["original", "added"], "add keeps what was there");
        assert!(values("x-secret").is_empty(), "removed from the request");
    }

    // A request no rule matches passes unchanged.
    let answer = send(caller.outbound, Method::GET, "http://catalog/api/v2/items", &sent).await;
    assert_eq!(header(&answer, "x-seen-path"), "/api/v2/items");
    assert_eq!(header(&answer, "x-served-by"), "catalog-app");
    assert!(answer.1.get("x-route").is_none());
    let seen = app.seen().pop().expect("the app saw the request");
    assert_eq!(seen.headers.get("x-secret").map(|v| v.as_bytes()), Some(&b"s3cr3t"[..]));
    assert_eq!(seen.headers.get("x-env").map(|v| v.as_bytes()), Some(&b"prod"[..]));
}
