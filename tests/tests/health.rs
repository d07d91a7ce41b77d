//! Health checks against real targets: the sidecar's checks of its app and the control plane's
//! checks of instances registered through the API, TTL renewal, and removal of instances that
//! stay critical.

use std::time::Duration;

use ferry_tests::{
    ControlPlane, Sidecar,
    apps::{GrpcApp, HttpApp},
    binary, client, eventually,
};

async fn put(control_plane: &ControlPlane, path: &str, body: &str) -> client::Answer {
    control_plane.send_json(http::Method::PUT, path, body).await.expect("answered")
}

fn check<'a>(instance: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    instance["checks"].as_array().and_then(|checks| checks.iter().find(|c| c.get(kind).is_some())).expect("the check is listed")
}

#[tokio::test]
async fn a_sidecar_http_check_follows_its_app() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let catalog = Sidecar::start(
        &control_plane.reach(),
        "catalog",
        Some(app.addr),
        &["--id", "catalog-1", "--check", "http:/healthz,interval=100ms"],
    )
    .await;
    let passing = control_plane.wait_health("catalog-1", "HEALTH_PASSING").await;
    assert_eq!(check(&passing, "http")["id"], "catalog-1:http");

    app.set_health(500);
    let critical = control_plane.wait_health("catalog-1", "HEALTH_CRITICAL").await;
    let http = check(&critical, "http");
    assert_eq!(http["status"], "HEALTH_CRITICAL");
    assert!(http["output"].as_str().expect("output").contains("500"), "{http}");
    assert!(http["last_transition"].is_string(), "{http}");

    app.set_health(429);
    control_plane.wait_health("catalog-1", "HEALTH_WARNING").await;
    app.set_health(200);
    control_plane.wait_health("catalog-1", "HEALTH_PASSING").await;

    // The sidecar counts results and transitions per kind of check.
    let (_, _, metrics) = client::get(&format!("http://{}/metrics", catalog.admin)).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        r#"ferry_health_check_results_total{kind="http",status="critical"}"#,
        r#"ferry_health_check_transitions_total{kind="http",to="warning"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // ferryctl shows the check, its status and its output.
    let output = tokio::process::Command::new(binary("ferryctl"))
        .envs(control_plane.ferryctl_env())
        .args(["instances", "catalog"])
        .output()
        .await
        .expect("ferryctl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find(|l| l.starts_with("catalog-1:http")).unwrap_or_else(|| panic!("no check line in:\n{text}"));
    assert!(line.contains("http") && line.contains("passing") && line.contains("200"), "{line}");
}

#[tokio::test]
async fn a_sidecar_grpc_check_follows_the_serving_status() {
    let control_plane = ControlPlane::start().await;
    let app = GrpcApp::start().await;
    let _echo = Sidecar::start(
        &control_plane.reach(),
        "echo",
        Some(app.addr),
        &["--id", "echo-1", "--check", "grpc:ferry.test.Echo,interval=100ms,failure=1"],
    )
    .await;
    control_plane.wait_health("echo-1", "HEALTH_PASSING").await;
    app.reporter.set_service_status("ferry.test.Echo", tonic_health::ServingStatus::NotServing).await;
    let critical = control_plane.wait_health("echo-1", "HEALTH_CRITICAL").await;
    assert!(check(&critical, "grpc")["output"].as_str().expect("output").contains("NOT_SERVING"), "{critical}");
    app.reporter.set_service_status("ferry.test.Echo", tonic_health::ServingStatus::Serving).await;
    control_plane.wait_health("echo-1", "HEALTH_PASSING").await;
}

#[tokio::test]
async fn an_api_tcp_check_fails_when_the_port_closes_and_the_instance_is_then_removed() {
    let control_plane = ControlPlane::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let body = format!(
        r#"{{"id": "db-1", "service": "db", "address": "127.0.0.1", "port": {port},
            "checks": [{{"tcp": {{}}, "interval": "0.1s", "failure_threshold": 1}}],
            "deregister_critical_after": "1s"}}"#
    );
    let answer = put(&control_plane, "/v1/instances", &body).await;
    assert_eq!(answer.0, 200, "{}", client::text(&answer));
    control_plane.wait_health("db-1", "HEALTH_PASSING").await;

    drop(listener);
    let critical = control_plane.wait_health("db-1", "HEALTH_CRITICAL").await;
    assert!(check(&critical, "tcp")["output"].as_str().expect("output").contains("refused"), "{critical}");
    eventually("db-1 to be removed after deregister_critical_after", || async {
        control_plane.instance("db-1").await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_new_instance_is_probed_at_once_whatever_its_interval() {
    let control_plane = ControlPlane::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // An hour between probes: only a first probe at registration can pass it in time.
    let body = format!(
        r#"{{"id": "db-1", "service": "db", "address": "127.0.0.1", "port": {port},
            "checks": [{{"tcp": {{}}, "interval": "1h"}}]}}"#
    );
    let answer = put(&control_plane, "/v1/instances", &body).await;
    assert_eq!(answer.0, 200, "{}", client::text(&answer));
    let passing = control_plane.wait_health("db-1", "HEALTH_PASSING").await;
    assert_eq!(check(&passing, "tcp")["status"], "HEALTH_PASSING", "{passing}");
    drop(listener);
}

#[tokio::test]
async fn script_checks_map_exit_codes_and_are_off_unless_enabled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let code = dir.path().join("code");
    std::fs::write(&code, "0").expect("write");
    let script = format!(r#"["sh", "-c", "echo from script; exit $(cat {})"]"#, code.display());
    let body = format!(
        r#"{{"id": "batch-1", "service": "batch", "address": "127.0.0.1", "port": 9,
            "checks": [{{"script": {{"args": {script}}}, "interval": "0.1s", "failure_threshold": 1}}]}}"#
    );

    let locked = ControlPlane::start().await;
    let refused = put(&locked, "/v1/instances", &body).await;
    assert_eq!(refused.0, 400, "{}", client::text(&refused));
    let error: serde_json::Value = serde_json::from_slice(&refused.2).expect("JSON");
    assert_eq!(error["field"], "checks[0].script", "{error}");

    let data = tempfile::tempdir().expect("tempdir");
    let control_plane = ControlPlane::start_in(data.path(), &["--enable-script-checks"]).await;
    let answer = put(&control_plane, "/v1/instances", &body).await;
    assert_eq!(answer.0, 200, "{}", client::text(&answer));
    let passing = control_plane.wait_health("batch-1", "HEALTH_PASSING").await;
    assert!(check(&passing, "script")["output"].as_str().expect("output").contains("from script"), "{passing}");
    std::fs::write(&code, "1").expect("write");
    control_plane.wait_health("batch-1", "HEALTH_WARNING").await;
    std::fs::write(&code, "2").expect("write");
    control_plane.wait_health("batch-1", "HEALTH_CRITICAL").await;
    std::fs::write(&code, "0").expect("write");
    control_plane.wait_health("batch-1", "HEALTH_PASSING").await;
}

#[tokio::test]
async fn ttl_checks_expire_and_are_renewed_through_the_api_and_the_sidecar() {
    let control_plane = ControlPlane::start().await;
    let body = r#"{"id": "job-1", "service": "jobs", "address": "127.0.0.1", "port": 9, "checks": [{"ttl": {"ttl": "1s"}}]}"#;
    assert_eq!(put(&control_plane, "/v1/instances", body).await.0, 200);
    control_plane.wait_health("job-1", "HEALTH_CRITICAL").await;
    // Before its first renewal a check has no result: the JSON and ferryctl say so alike.
    let body = r#"{"id": "job-0", "service": "jobs", "address": "127.0.0.1", "port": 9, "checks": [{"ttl": {"ttl": "1h"}}]}"#;
    assert_eq!(put(&control_plane, "/v1/instances", body).await.0, 200);
    let waiting = control_plane.wait_health("job-0", "HEALTH_CRITICAL").await;
    assert_eq!(check(&waiting, "ttl")["status"], "HEALTH_NOT_CHECKED", "{waiting}");
    for unused in ["interval", "timeout", "success_threshold", "failure_threshold"] {
        assert!(check(&waiting, "ttl").get(unused).is_none(), "a TTL check is not probed: no {unused} in {waiting}");
    }
    let output = check(&waiting, "ttl")["output"].as_str().expect("output");
    assert!(output.contains("waiting for the first renewal") && output.contains("critical until then"), "{output}");
    let listed = control_plane.ferryctl(&["instances", "jobs"]).await;
    let listed = String::from_utf8_lossy(&listed.stdout);
    let row = listed.lines().find(|l| l.starts_with("job-0:ttl")).unwrap_or_else(|| panic!("the check's row in:\n{listed}"));
    let columns: Vec<&str> = row.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(columns.get(2), Some(&"not checked yet"), "the STATUS column of {row:?}");

    let renewed = put(&control_plane, "/v1/checks/job-1:ttl/pass", "all jobs done").await;
    assert_eq!(renewed.0, 200, "{}", client::text(&renewed));
    let passing = control_plane.wait_health("job-1", "HEALTH_PASSING").await;
    assert_eq!(check(&passing, "ttl")["output"], "all jobs done");
    let expired = control_plane.wait_health("job-1", "HEALTH_CRITICAL").await;
    assert!(check(&expired, "ttl")["output"].as_str().expect("output").contains("expired"), "{expired}");

    // The same over gRPC.
    let channel = control_plane.channel().await;
    let mut registry = ferry_proto::v1::registry_client::RegistryClient::new(channel);
    let request = ferry_proto::v1::UpdateTtlRequest {
        check_id: "job-1:ttl".into(),
        status: ferry_proto::v1::Health::Warning as i32,
        output: "slow".into(),
    };
    let renewed = registry.update_ttl(request).await.expect("renewed").into_inner().check.expect("the check");
    assert_eq!((renewed.status, renewed.output.as_str()), (ferry_proto::v1::Health::Warning as i32, "slow"));
    control_plane.wait_health("job-1", "HEALTH_WARNING").await;
    let request = ferry_proto::v1::UpdateTtlRequest { check_id: "job-1:ttl".into(), status: 0, output: String::new() };
    let status = registry.update_ttl(request).await.expect_err("no status");
    assert!(status.message().starts_with("status:"), "{}", status.message());

    // Bad renewals name what is wrong.
    let cases = [("/v1/checks/job-1:ttl/maybe", 400, "status"), ("/v1/checks/nope/pass", 404, "id")];
    for (path, status, field) in cases {
        let answer = put(&control_plane, path, "").await;
        assert_eq!(answer.0, status, "{path}: {}", client::text(&answer));
        let error: serde_json::Value = serde_json::from_slice(&answer.2).expect("JSON");
        assert_eq!(error["field"], field, "{path}: {error}");
    }

    // A sidecar's TTL check is renewed through its admin listener, not the control plane.
    let app = HttpApp::start("worker-app").await;
    let worker =
        Sidecar::spawn(&control_plane.reach(), "worker", Some(app.addr), &["--id", "worker-1", "--check", "ttl:1h"]).await;
    let waiting = control_plane.wait_health("worker-1", "HEALTH_CRITICAL").await;
    assert_eq!(check(&waiting, "ttl")["status"], "HEALTH_NOT_CHECKED", "as the sidecar reports it: {waiting}");
    let through_cp = put(&control_plane, "/v1/checks/worker-1:ttl/pass", "").await;
    assert_eq!(through_cp.0, 400);
    assert!(client::text(&through_cp).contains("PUT /ttl/pass"), "{}", client::text(&through_cp));
    let admin = client::send_json(worker.admin, http::Method::PUT, "/ttl/pass", "warmed up").await.expect("answered");
    assert_eq!(admin.0, 200, "{}", client::text(&admin));
    let passing = control_plane.wait_health("worker-1", "HEALTH_PASSING").await;
    assert_eq!(check(&passing, "ttl")["output"], "warmed up");
    let bad = client::send_json(worker.admin, http::Method::PUT, "/ttl/sometimes", "").await.expect("answered");
    assert_eq!(bad.0, 400);
}

#[tokio::test]
async fn bad_check_specs_are_refused_naming_the_field() {
    let control_plane = ControlPlane::start().await;
    for (check, field) in [
        (r#"{"http": {"url": "ftp://x"}}"#, "checks[0].http.url"),
        (r#"{"tcp": {"address": "nohost"}}"#, "checks[0].tcp.address"),
        (r#"{"ttl": {}}"#, "checks[0].ttl.ttl"),
        (r#"{"http": {"url": "/x"}, "interval": "1ms"}"#, "checks[0].interval"),
        (r#"{}"#, "checks[0].probe"),
    ] {
        let body = format!(r#"{{"service": "web", "address": "127.0.0.1", "port": 80, "checks": [{check}]}}"#);
        let answer = put(&control_plane, "/v1/instances", &body).await;
        assert_eq!(answer.0, 400, "{check}: {}", client::text(&answer));
        let error: serde_json::Value = serde_json::from_slice(&answer.2).expect("JSON");
        assert_eq!(error["field"], field, "{check}: {error}");
    }

    for spec in ["ping", "http", "ttl:soon", "http:/x,timeout=20s"] {
        let output = tokio::process::Command::new(binary("ferry-sidecar"))
            .args([
                "--service",
                "web",
                "--app",
                "127.0.0.1:8080",
                "--check",
                spec,
                "--outbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--inbound",
                "127.0.0.1:0",
            ])
            .output()
            .await
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{spec}: {stderr}");
        assert!(stderr.contains("--check"), "{spec}: {stderr}");
    }
}

#[tokio::test]
async fn a_flapping_app_is_held_critical() {
    // Flap damping itself is unit-tested on paused time (ferry-health); here: the hold-down reaches
    // the registry. Four changes within a minute is flapping by default.
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("flaky").await;
    let _flaky = Sidecar::start(
        &control_plane.reach(),
        "flaky",
        Some(app.addr),
        &["--id", "flaky-1", "--check", "http:/healthz,interval=100ms,failure=1"],
    )
    .await;
    control_plane.wait_health("flaky-1", "HEALTH_PASSING").await;
    for status in [500, 200, 500, 200, 500, 200] {
        app.set_health(status);
        let wanted = if status == 200 { "HEALTH_PASSING" } else { "HEALTH_CRITICAL" };
        // Wait for the check itself to see the change before flipping again.
        eventually("the check to follow", || async {
            let instance = control_plane.instance("flaky-1").await?;
            (check(&instance, "http")["status"] == wanted).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let instance = control_plane.instance("flaky-1").await.expect("registered");
    assert_eq!(check(&instance, "http")["status"], "HEALTH_PASSING", "{instance}");
    assert_eq!(instance["health"], "HEALTH_CRITICAL", "held down although the check passes: {instance}");
}

#[tokio::test]
async fn api_instances_keep_their_health_across_a_restart_until_their_checks_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut control_plane = ControlPlane::start_in(dir.path(), &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let body = format!(
        r#"{{"id": "db-1", "service": "db", "address": "127.0.0.1", "port": {port},
            "checks": [{{"tcp": {{}}, "interval": "1s"}}], "deregister_critical_after": "1s"}}"#
    );
    assert_eq!(put(&control_plane, "/v1/instances", &body).await.0, 200);
    control_plane.wait_health("db-1", "HEALTH_PASSING").await;
    // The health change is written behind; an API registration returns once every write before
    // it is durable, so after this one the kill cannot lose it.
    let other = r#"{"id": "sync-1", "service": "sync", "address": "127.0.0.1", "port": 9}"#;
    assert_eq!(put(&control_plane, "/v1/instances", other).await.0, 200);

    control_plane.process.kill().await;
    let restarted = ControlPlane::start_in(dir.path(), &[]).await;
    let instance = restarted.instance("db-1").await.expect("restored");
    assert_eq!(instance["health"], "HEALTH_PASSING", "no flap while the checks restart: {instance}");
    // Not critical, and so not removed, before its first probe; then passing on its own result.
    let checked = eventually("the first probe after the restart", || async {
        let instance = restarted.instance("db-1").await.expect("still registered");
        assert_eq!(instance["health"], "HEALTH_PASSING", "{instance}");
        // Until then the check says it has no result, and what is assumed.
        if check(&instance, "tcp")["status"] != "HEALTH_PASSING" {
            assert_eq!(check(&instance, "tcp")["status"], "HEALTH_NOT_CHECKED", "{instance}");
            let output = check(&instance, "tcp")["output"].as_str().expect("output");
            assert!(output.contains("assumed passing, as before the restart"), "{output}");
        }
        check(&instance, "tcp")["output"].as_str().is_some_and(|o| o.contains("connected")).then_some(instance)
    })
    .await;
    assert_eq!(checked["health"], "HEALTH_PASSING");
    drop(listener);
}
