//! Instances coming and going, and the control plane going away: traffic follows the registry,
//! and keeps flowing on the last config while the control plane is down.

use std::{collections::HashSet, sync::Arc};

use ferry_tests::{
    ControlPlane, Reach, Sidecar,
    apps::HttpApp,
    client::{self, header, proxy_get, text},
    eventually,
};

/// The apps that answered `n` requests for `service` through `outbound`.
async fn answers(outbound: std::net::SocketAddr, service: &str, n: usize) -> Vec<String> {
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        let answer = proxy_get(outbound, &format!("http://{service}/")).await.expect("answered");
        assert_eq!(answer.0, 200, "{}: {}", header(&answer, "x-ferry-error"), text(&answer));
        seen.push(text(&answer));
    }
    seen
}

async fn put_instance(control_plane: &ControlPlane, json: &str) -> client::Answer {
    control_plane.send_json(http::Method::PUT, "/v1/instances", json).await.expect("answered")
}

async fn delete_instance(control_plane: &ControlPlane, id: &str) -> client::Answer {
    control_plane.send_json(http::Method::DELETE, &format!("/v1/instances/{id}"), "").await.expect("answered")
}

#[tokio::test]
async fn a_deregistered_instance_stops_receiving_traffic() {
    let control_plane = ControlPlane::start().await;
    let external = HttpApp::start("external").await;
    let meshed = HttpApp::start("meshed").await;
    let registered = put_instance(
        &control_plane,
        &format!(r#"{{"id": "catalog-ext", "service": "catalog", "address": "127.0.0.1", "port": {}}}"#, external.addr.port()),
    )
    .await;
    assert_eq!(registered.0, 200, "{}", text(&registered));
    let _meshed = Sidecar::start(&control_plane.reach(), "catalog", Some(meshed.addr), &[]).await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &["--upstream", "catalog=127.0.0.1:0"]).await;
    client.wait_endpoints("catalog", 2).await;
    let seen: HashSet<_> = answers(client.outbound, "catalog", 10).await.into_iter().collect();
    assert_eq!(seen, HashSet::from(["external".to_owned(), "meshed".to_owned()]));

    let removed = delete_instance(&control_plane, "catalog-ext").await;
    assert_eq!(removed.0, 200, "{}", text(&removed));
    client.wait_endpoints("catalog", 1).await;
    let hits = external.hits();
    assert!(answers(client.outbound, "catalog", 20).await.iter().all(|a| a == "meshed"));
    assert_eq!(external.hits(), hits, "no request reached the deregistered instance");
}

#[tokio::test]
async fn a_killed_instance_stops_receiving_traffic_and_a_stopped_one_leaves() {
    let control_plane = ControlPlane::start().await;
    let apps = [HttpApp::start("one").await, HttpApp::start("two").await, HttpApp::start("three").await];
    let mut one = Sidecar::start(&control_plane.reach(), "catalog", Some(apps[0].addr), &["--id", "catalog-one"]).await;
    let mut two =
        Sidecar::start(&control_plane.reach(), "catalog", Some(apps[1].addr), &["--id", "catalog-two", "--drain", "200ms"]).await;
    let _three = Sidecar::start(&control_plane.reach(), "catalog", Some(apps[2].addr), &["--id", "catalog-three"]).await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &["--upstream", "catalog=127.0.0.1:0"]).await;
    client.wait_endpoints("catalog", 3).await;

    // Killed without goodbye: critical at once, so no more traffic.
    one.process.kill().await;
    client.wait_endpoints("catalog", 2).await;
    let hits = apps[0].hits();
    let seen: HashSet<_> = answers(client.outbound, "catalog", 20).await.into_iter().collect();
    assert_eq!(seen, HashSet::from(["two".to_owned(), "three".to_owned()]));
    assert_eq!(apps[0].hits(), hits);
    let (_, _, body) = control_plane.get("/v1/instances/catalog-one").await.expect("answered");
    let instance: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(instance["health"], "HEALTH_CRITICAL", "{instance}");

    // Stopped with SIGTERM: it says goodbye and its instance is removed at once.
    assert!(two.process.terminate().await.success());
    eventually("catalog-two to be deregistered", || async {
        let answer = control_plane.get("/v1/instances/catalog-two").await.ok()?;
        (answer.0 == 404).then_some(())
    })
    .await;
    client.wait_endpoints("catalog", 1).await;
    assert!(answers(client.outbound, "catalog", 10).await.iter().all(|a| a == "three"));
}

#[tokio::test]
async fn traffic_keeps_flowing_while_the_control_plane_is_down_and_sidecars_reconnect() {
    let mut control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let _catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    let client = Sidecar::start(
        &control_plane.reach(),
        "frontend",
        None,
        &["--upstream", "catalog=127.0.0.1:0", "--discovery-timeout", "300ms"],
    )
    .await;
    client.wait_endpoints("catalog", 1).await;

    control_plane.process.kill().await;
    eventually("the client to notice", || async { (client.config().await["control_plane"]["connected"] == false).then_some(()) })
        .await;
    assert!(answers(client.outbound, "catalog", 20).await.iter().all(|a| a == "catalog-app"));
    let answer = proxy_get(client.outbound, "http://never-seen/").await.expect("answered");
    assert_eq!(answer.0, 503);
    assert!(header(&answer, "x-ferry-error").starts_with("discovery_timeout: "), "{answer:?}");

    // A new control plane on the same address: every sidecar reconnects and re-registers.
    let restarted = ControlPlane::start_in(&control_plane.data_dir, &["--grpc", &control_plane.grpc.to_string()]).await;
    eventually("the client to reconnect", || async {
        (client.config().await["control_plane"]["connected"] == true).then_some(())
    })
    .await;
    restarted.wait_passing("catalog", 1).await;
    assert!(answers(client.outbound, "catalog", 5).await.iter().all(|a| a == "catalog-app"));
}

#[tokio::test]
async fn a_sidecar_started_before_its_control_plane_waits_for_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let address = format!("127.0.0.1:{port}");
    let app = HttpApp::start("catalog-app").await;
    // No CA exists before the control plane first starts: this one serves its API in plaintext,
    // with an admin token chosen up front (mTLS between sidecars stays on).
    let dir = tempfile::tempdir().expect("tempdir");
    let reach = Reach::plaintext(&address, "ferry_lifecycle_test", dir.path());
    let catalog = Sidecar::spawn(&reach, "catalog", Some(app.addr), &[]).await;
    let (status, _, body) = client::get(&format!("http://{}/ready", catalog.admin)).await.expect("admin answers");
    assert_eq!(status, 503, "not ready without a control plane: {}", String::from_utf8_lossy(&body));

    let flags = ["--grpc", &address, "--api-tls", "off", "--bootstrap-token", "ferry_lifecycle_test"];
    let control_plane = ControlPlane::start_in(dir.path(), &flags).await;
    catalog.wait_ready().await;
    control_plane.wait_passing("catalog", 1).await;
}

#[tokio::test]
async fn a_persistent_registration_survives_a_control_plane_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut control_plane = ControlPlane::start_in(dir.path(), &[]).await;
    let registered = put_instance(
        &control_plane,
        r#"{"id": "db-1", "service": "db", "address": "db.internal", "port": 5432, "metadata": {"role": "primary"}, "zone": "eu-1a"}"#,
    )
    .await;
    assert_eq!(registered.0, 200, "{}", text(&registered));

    // No clean shutdown: what the API acknowledged is already durable.
    control_plane.process.kill().await;
    let restarted = ControlPlane::start_in(dir.path(), &[]).await;
    let (status, _, body) = restarted.get("/v1/instances/db-1").await.expect("answered");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let instance: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(instance["service"], "db");
    assert_eq!(instance["address"], "db.internal");
    assert_eq!(instance["port"], 5432);
    assert_eq!(instance["metadata"]["role"], "primary");
    assert_eq!(instance["zone"], "eu-1a");
    assert_eq!(instance["origin"], "ORIGIN_API");
}

#[tokio::test]
async fn a_control_plane_restart_does_not_flap_instances_whose_sidecars_reconnect() {
    use ferry_proto::v1::{self, registry_client::RegistryClient};
    use futures::StreamExt;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut control_plane = ControlPlane::start_in(dir.path(), &[]).await;
    let apps = [HttpApp::start("one").await, HttpApp::start("two").await];
    let mut sidecars = Vec::new();
    for (n, app) in apps.iter().enumerate() {
        let id = format!("catalog-{n}");
        sidecars.push(Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", &id]).await);
    }
    let caller = Sidecar::start(&control_plane.reach(), "frontend", None, &["--upstream", "catalog=127.0.0.1:0"]).await;
    caller.wait_endpoints("catalog", 2).await;

    control_plane.process.kill().await;
    let restarted = ControlPlane::start_in(dir.path(), &["--grpc", &control_plane.grpc.to_string()]).await;
    // Watch from the first moment: every view of the service must show both instances passing.
    let channel = restarted.channel().await;
    let request = v1::WatchRequest { service: "catalog".into(), ..Default::default() };
    let mut updates = RegistryClient::new(channel).watch(request).await.expect("watches").into_inner();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(update)) = updates.next().await {
                let healths: Vec<i32> = update.instances.iter().map(|i| i.health).collect();
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(healths);
            }
        })
    };
    eventually("all three sidecars to reconnect", || async {
        let (_, _, body) = restarted.get("/v1/sidecars").await.ok()?;
        let body: serde_json::Value = serde_json::from_slice(&body).ok()?;
        (body["sidecars"].as_array().map_or(0, Vec::len) == 3).then_some(())
    })
    .await;
    assert_eq!(answers(caller.outbound, "catalog", 10).await.len(), 10);
    recorder.abort();
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(!seen.is_empty());
    let passing = v1::Health::Passing as i32;
    for healths in &seen {
        assert_eq!(healths, &vec![passing, passing], "a view with an instance not passing: {seen:?}");
    }
}
