//! Static stability: a sidecar keeps its last good config in `--state-dir`; restarted while the
//! control plane is down, it becomes ready on that config and routes by it, and when the control
//! plane comes back its pushes take over.

use std::{collections::HashSet, net::SocketAddr, path::Path};

use ferry_tests::{
    ControlPlane, Reach, Sidecar,
    apps::HttpApp,
    client::{self, header, proxy_get, text},
    eventually,
};
use serde_json::Value;

/// The apps that answered `n` requests for `service` through `outbound`.
async fn answers(outbound: SocketAddr, service: &str, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        let answer = proxy_get(outbound, &format!("http://{service}/")).await.expect("answered");
        assert_eq!(answer.0, 200, "{}: {}", header(&answer, "x-ferry-error"), text(&answer));
        seen.insert(text(&answer));
    }
    seen
}

async fn metrics(sidecar: &Sidecar) -> String {
    let (_, _, body) = client::get(&format!("http://{}/metrics", sidecar.admin)).await.expect("metrics");
    String::from_utf8_lossy(&body).into_owned()
}

/// The value of the metric line starting with `name `.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The endpoints of `service` in the state file under `dir`, if it holds the service.
fn saved_endpoints(dir: &Path, service: &str) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let state: Value = serde_json::from_str(&text).ok()?;
    let saved = state["services"].as_array()?.iter().find(|s| s["service"] == service)?;
    Some(saved["snapshot"]["endpoints"].as_array().map_or(0, Vec::len))
}

#[tokio::test]
async fn a_sidecar_restarted_while_the_control_plane_is_down_serves_from_its_state_dir() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut control_plane = ControlPlane::start_in(data.path(), &[]).await;
    // Turn by turn, so that ten requests reach both instances whatever their latency (a new
    // mTLS connection costs one instance a handshake the other may not pay).
    control_plane.apply("kind: ServicePolicy\nservice: catalog\nload_balancer: round-robin\n").await;
    let apps = [HttpApp::start("one").await, HttpApp::start("two").await];
    let mut catalogs = Vec::new();
    for (n, app) in apps.iter().enumerate() {
        let id = format!("catalog-{n}");
        catalogs.push(Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", &id]).await);
    }
    let state = tempfile::tempdir().expect("tempdir");
    let state_dir = state.path().display().to_string();
    let args = ["--upstream", "catalog=127.0.0.1:0", "--state-dir", &state_dir, "--node-id", "frontend-1"];
    let mut client = Sidecar::start(&control_plane.reach(), "frontend", None, &args).await;
    client.wait_endpoints("catalog", 2).await;
    eventually("the state file to hold both endpoints of catalog", || async {
        (saved_endpoints(state.path(), "catalog")? == 2).then_some(())
    })
    .await;
    assert_eq!(client.config().await["config_source"], "control-plane");

    // The control plane goes away, then the client sidecar restarts.
    control_plane.process.kill().await;
    assert!(client.process.terminate().await.success());
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &args).await;
    let config = client.config().await;
    assert_eq!(config["config_source"], "state-dir", "{config}");
    assert_eq!(config["control_plane"]["connected"], false);
    assert!(config["restored_config_saved_at"].is_string(), "{config}");
    assert!(config["last_contact_seconds_ago"].as_f64().is_some_and(|age| age > 0.0), "{config}");
    assert!(client.process.log().contains("serving the config saved in the state file"), "{}", client.process.log());
    client.wait_endpoints("catalog", 2).await;
    assert_eq!(answers(client.outbound, "catalog", 10).await, HashSet::from(["one".to_owned(), "two".to_owned()]));
    let scraped = metrics(&client).await;
    assert_eq!(metric(&scraped, "ferry_config_from_state_dir"), Some(1.0), "{scraped}");
    assert!(metric(&scraped, "ferry_config_age_seconds").is_some_and(|age| age > 0.0), "{scraped}");

    // The control plane comes back with its data: the sidecar reconnects and takes its config.
    let restarted = ControlPlane::start_in(data.path(), &["--grpc", &control_plane.grpc.to_string()]).await;
    eventually("the sidecar to reconnect and hold the control plane's config", || async {
        let config = client.config().await;
        (config["control_plane"]["connected"] == true && config["config_source"] == "control-plane").then_some(())
    })
    .await;
    restarted.wait_passing("catalog", 2).await;
    client.wait_endpoints("catalog", 2).await;
    assert_eq!(answers(client.outbound, "catalog", 10).await, HashSet::from(["one".to_owned(), "two".to_owned()]));
    let scraped = metrics(&client).await;
    assert_eq!(metric(&scraped, "ferry_config_from_state_dir"), Some(0.0), "{scraped}");
    assert_eq!(metric(&scraped, "ferry_config_age_seconds"), Some(0.0), "{scraped}");
    let sidecars = restarted.get("/v1/sidecars").await.expect("answered");
    assert!(text(&sidecars).contains("frontend-1"), "{}", text(&sidecars));
}

#[tokio::test]
async fn a_corrupt_state_file_is_ignored_with_a_warning() {
    // Bound but not listening: connections to it are refused until the control plane takes it.
    let held = tokio::net::TcpSocket::new_v4().expect("socket");
    held.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let address = held.local_addr().expect("addr");
    let state = tempfile::tempdir().expect("tempdir");
    let file = state.path().join("config.json");
    std::fs::write(&file, b"{\"format\": 1, \"saved_at\": \"2026-").expect("writes");
    let state_dir = state.path().display().to_string();
    let args = ["--upstream", "catalog=127.0.0.1:0", "--state-dir", &state_dir];
    let reach = Reach::plaintext(&address.to_string(), "ferry_static_test", state.path());
    let client = Sidecar::spawn(&reach, "frontend", None, &args).await;
    eventually("a warning about the state file", || async {
        let log = client.process.log();
        let warned = log.lines().any(|line| {
            line.contains("WARN") && line.contains("ignoring the state file") && line.contains(&file.display().to_string())
        });
        warned.then_some(())
    })
    .await;
    let (status, _, body) = client::get(&format!("http://{}/ready", client.admin)).await.expect("admin answers");
    assert_eq!(status, 503, "nothing to serve from: {}", String::from_utf8_lossy(&body));
    assert_eq!(client.config().await["config_source"], "none");

    // The control plane starts: the sidecar gets ready and writes a good file over the bad one.
    drop(held);
    let data = tempfile::tempdir().expect("tempdir");
    let address = address.to_string();
    let flags = ["--grpc", &address, "--api-tls", "off", "--bootstrap-token", "ferry_static_test"];
    let _control_plane = ControlPlane::start_in(data.path(), &flags).await;
    client.wait_ready().await;
    eventually("a good state file", || async { saved_endpoints(state.path(), "catalog").map(|_| ()) }).await;
}
