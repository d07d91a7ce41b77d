//! The control plane's APIs: refusing bad registrations without losing anything, ferryctl, and
//! the standard gRPC health and reflection services.

use std::process::Output;

use ferry_proto::v1::{self, registry_client::RegistryClient};
use ferry_tests::{ControlPlane, Sidecar, apps::HttpApp, binary, client, eventually};
use ferry_tls::api::ApiChannel;
use futures::StreamExt;

async fn registry(control_plane: &ControlPlane) -> RegistryClient<ApiChannel> {
    RegistryClient::new(control_plane.channel().await)
}

async fn put(control_plane: &ControlPlane, json: &str) -> client::Answer {
    control_plane.send_json(http::Method::PUT, "/v1/instances", json).await.expect("answered")
}

fn instance(id: &str, service: &str, address: &str, port: u32) -> v1::Instance {
    v1::Instance { id: id.into(), service: service.into(), address: address.into(), port, ..Default::default() }
}

#[tokio::test]
async fn bad_registrations_are_refused_naming_the_field_and_change_nothing() {
    let control_plane = ControlPlane::start().await;
    let mut registry = registry(&control_plane).await;
    let good = registry
        .register(v1::RegisterRequest { instance: Some(instance("db-1", "db", "10.0.0.1", 5432)) })
        .await
        .expect("registers")
        .into_inner()
        .instance
        .expect("instance");
    let before = registry.list_services(v1::ListServicesRequest {}).await.expect("lists").into_inner();

    let cases = [
        (instance("x-1", "", "10.0.0.2", 80), "instance.service"),
        (instance("x-2", "web", "10.0.0.2", 0), "instance.port"),
        (instance("x-3", "web", "not an address", 80), "instance.address"),
        (instance("db-1", "cache", "10.0.0.3", 6379), "instance.id"),
    ];
    for (bad, field) in cases {
        let status = registry.register(v1::RegisterRequest { instance: Some(bad) }).await.expect_err(field);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().starts_with(&format!("{field}: ")), "{field}: {}", status.message());
    }
    let status = registry.register(v1::RegisterRequest { instance: None }).await.expect_err("no instance");
    assert_eq!(status.message(), "instance: required");

    let http_cases = [
        (r#"{"service": "", "address": "10.0.0.2", "port": 80}"#, "service"),
        (r#"{"service": "web", "address": "10.0.0.2", "port": 0}"#, "port"),
        (r#"{"service": "web", "address": "300.1.2.3", "port": 80}"#, "address"),
        (r#"{"id": "db-1", "service": "cache", "address": "10.0.0.3", "port": 6379}"#, "id"),
        (r#"{"service": "web", "address": "10.0.0.2", "port": "eighty"}"#, "port"),
        (r#"{"service": "web", "address": "10.0.0.2", "port": 80, "metadata": ["v2"]}"#, "metadata"),
        ("not json", "body"),
    ];
    for (body, field) in http_cases {
        let answer = put(&control_plane, body).await;
        assert_eq!(answer.0, 400, "{body}: {}", client::text(&answer));
        let error: serde_json::Value = serde_json::from_slice(&answer.2).expect("JSON error");
        assert_eq!(error["field"], field, "{error}");
        assert!(error["error"].as_str().expect("message").starts_with(&format!("{field}: ")), "{error}");
    }

    let after = registry.list_services(v1::ListServicesRequest {}).await.expect("lists").into_inner();
    assert_eq!(after, before, "nothing stored changed");
    let kept = registry
        .list_instances(v1::ListInstancesRequest { service: "db".into(), passing_only: false, ..Default::default() })
        .await
        .expect("lists")
        .into_inner();
    assert_eq!(kept.instances, vec![good]);
}

#[tokio::test]
async fn the_watch_stream_sends_every_change() {
    let control_plane = ControlPlane::start().await;
    let mut registry = registry(&control_plane).await;
    let mut updates = registry
        .watch(v1::WatchRequest { service: "db".into(), passing_only: false, ..Default::default() })
        .await
        .expect("watches")
        .into_inner();
    let first = updates.next().await.expect("current state").expect("ok");
    assert!(first.instances.is_empty());

    registry.register(v1::RegisterRequest { instance: Some(instance("db-1", "db", "10.0.0.1", 5432)) }).await.expect("registers");
    let second = updates.next().await.expect("a change").expect("ok");
    assert_eq!(second.instances.len(), 1);
    assert!(second.index > first.index);

    registry.deregister(v1::DeregisterRequest { id: "db-1".into(), force: false }).await.expect("deregisters");
    let third = updates.next().await.expect("a change").expect("ok");
    assert!(third.instances.is_empty());
    assert!(third.index > second.index);
}

#[tokio::test]
async fn generic_grpc_clients_find_the_health_and_reflection_services() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };

    let control_plane = ControlPlane::start().await;
    let channel = control_plane.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "ferry.v1.Registry", "ferry.v1.Discovery"] {
        let reply = health.check(HealthCheckRequest { service: service.into() }).await.expect("checked");
        assert_eq!(reply.into_inner().status(), ServingStatus::Serving, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request =
        ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut replies = reflection.server_reflection_info(futures::stream::iter([request])).await.expect("reflection").into_inner();
    let reply = replies.next().await.expect("a reply").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("unexpected {reply:?}") };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["ferry.v1.Registry", "ferry.v1.Discovery", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn ferryctl_registers_lists_and_reports_sidecar_status() {
    let control_plane = ControlPlane::start().await;

    let output = control_plane
        .ferryctl(&["register", "--service", "db", "--address", "10.0.0.1", "--port", "5432", "--meta", "role=primary"])
        .await;
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("registered db-10.0.0.1-5432"), "{}", stdout(&output));

    let output = control_plane.ferryctl(&["services"]).await;
    let text = stdout(&output);
    assert!(text.starts_with("SERVICE"), "{text}");
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()[..3] == ["db", "1", "1"]), "{text}");

    let output = control_plane.ferryctl(&["instances", "db"]).await;
    let text = stdout(&output);
    assert!(text.contains("db-10.0.0.1-5432") && text.contains("passing") && text.contains("role=primary"), "{text}");

    let output = control_plane.ferryctl(&["-o", "json", "instances", "db"]).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["instances"][0]["metadata"]["role"], "primary");

    // Bad input is refused before it reaches the server, naming the flag.
    let output = control_plane.ferryctl(&["register", "--service", "db", "--address", "10.0.0.1", "--port", "0"]).await;
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--port"), "{output:?}");

    // status: a connected sidecar and the versions it acknowledged.
    let app = HttpApp::start("catalog-app").await;
    let _catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    let _client = Sidecar::start(
        &control_plane.reach(),
        "frontend",
        None,
        &["--node-id", "frontend-client", "--upstream", "catalog=127.0.0.1:0"],
    )
    .await;
    let status = eventually("frontend-client to be in sync", || async {
        let output = control_plane.ferryctl(&["status"]).await;
        let text = stdout(&output);
        text.lines().any(|l| l.starts_with("frontend-client") && l.contains("catalog") && l.ends_with("in sync")).then_some(text)
    })
    .await;
    assert!(status.lines().any(|l| l.starts_with("catalog-1")), "{status}");

    let output = control_plane.ferryctl(&["-o", "json", "status"]).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let client =
        json["sidecars"].as_array().expect("sidecars").iter().find(|s| s["node_id"] == "frontend-client").expect("listed");
    let subscription = &client["subscriptions"][0];
    assert_eq!(subscription["service"], "catalog");
    assert_eq!(subscription["acked_version"], subscription["current_version"]);

    // The sidecar's own instance: refused, naming the sidecar, unless forced.
    let output = control_plane.ferryctl(&["deregister", "catalog-1"]).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains(r#"instance "catalog-1" belongs to sidecar "catalog-1""#) && error.contains("--force"), "{error}");
    assert!(control_plane.instance("catalog-1").await.is_some(), "nothing was removed");
    let answer = control_plane.send_json(http::Method::DELETE, "/v1/instances/catalog-1", "").await.expect("answered");
    assert_eq!(answer.0, 409, "{answer:?}");
    let output = control_plane.ferryctl(&["deregister", "--force", "catalog-1"]).await;
    assert!(output.status.success(), "{output:?}");

    let output = control_plane.ferryctl(&["deregister", "db-10.0.0.1-5432"]).await;
    assert!(output.status.success(), "{output:?}");
    let output = control_plane.ferryctl(&["deregister", "db-10.0.0.1-5432"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no instance with id"), "{output:?}");
}

#[tokio::test]
async fn ferryctl_given_the_http_port_is_told_to_use_the_grpc_one() {
    let control_plane = ControlPlane::start().await;
    let output = tokio::process::Command::new(ferry_tests::binary("ferryctl"))
        .envs(control_plane.ferryctl_env())
        .args(["--control-plane", &control_plane.http_url(), "services"])
        .output()
        .await
        .expect("ferryctl runs");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.starts_with("error: this is the control plane's HTTP API") && error.contains("--grpc"), "{error}");
    assert!(!error.contains("compression flag"), "{error}");
}

#[tokio::test]
async fn bad_flags_exit_64_naming_the_flag_before_binding() {
    for (binary_name, args, flag) in [
        ("ferry-control-plane", vec!["--grpc", "not-an-address"], "--grpc"),
        ("ferry-control-plane", vec!["--store", "floppy"], "--store"),
        ("ferry-control-plane", vec!["--push-max-delay", "fast"], "--push-max-delay"),
        ("ferry-control-plane", vec!["--store", "etcd://no-port"], "--store"),
        ("ferry-control-plane", vec!["--etcd-prefix", "ferry"], "--etcd-prefix"),
        ("ferry-control-plane", vec!["--replica-ttl", "500ms"], "--replica-ttl"),
        ("ferry-control-plane", vec!["--replica-id", "a/b"], "--replica-id"),
        ("ferry-sidecar", vec!["--service", "Bad_Name"], "--service"),
        ("ferry-sidecar", vec!["--service", "web", "--app", "nowhere"], "--app"),
        ("ferry-sidecar", vec!["--service", "web", "--upstream", "db"], "--upstream"),
    ] {
        let output = tokio::process::Command::new(binary(binary_name)).args(&args).output().await.expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{binary_name} {args:?}: {stderr}");
        assert!(stderr.contains(flag), "{binary_name} {args:?}: {stderr}");
    }
    // A build without the etcd feature says how to get one.
    if !ferry_tests::etcd::FEATURE {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().display().to_string();
        let args =
            ["--store", "etcd://127.0.0.1:2379", "--data-dir", &data_dir, "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"];
        let output = tokio::process::Command::new(binary("ferry-control-plane")).args(args).output().await.expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("--store") && stderr.contains("--features etcd"), "{stderr}");
    }
}
