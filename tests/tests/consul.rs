//! Ferry's Consul-compatible API, driven by Python's Consul client (`py-consul`) unchanged:
//! register with HTTP and TTL checks, pass the TTL, list, discover healthy instances, a
//! blocking query woken by a registration, deregister. Then the instance the client left is
//! an ordinary Ferry instance, with its tags as labels, that a sidecar routes to.
//!
//! The client runs from `FERRY_PYTHON` or `tests/consul/.venv/bin/python` (`.ci/run` makes
//! that virtualenv); without a Python that can `import consul` the test says it skips, unless
//! `FERRY_REQUIRE_CONSUL_CLIENT=1`.

use std::{path::PathBuf, time::Duration};

use ferry_tests::{ControlPlane, Sidecar, apps::HttpApp, client, eventually};
use http::{Request, StatusCode};
use http_body_util::Empty;

/// A Python interpreter that has `consul`, or why there is none.
fn python() -> Result<PathBuf, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidate = match std::env::var_os("FERRY_PYTHON") {
        Some(path) => {
            let path = PathBuf::from(path);
            if path.is_absolute() { path } else { root.join(path) }
        }
        None => root.join("tests/consul/.venv/bin/python"),
    };
    let output = std::process::Command::new(&candidate)
        .args(["-c", "import consul"])
        .output()
        .map_err(|e| format!("{} cannot run: {e}", candidate.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} cannot import consul (pip install py-consul): {}",
            candidate.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(candidate)
}

fn python_or_skip() -> Option<PathBuf> {
    match python() {
        Ok(python) => Some(python),
        Err(why) if std::env::var("FERRY_REQUIRE_CONSUL_CLIENT").as_deref() == Ok("1") => {
            panic!("FERRY_REQUIRE_CONSUL_CLIENT=1 but {why}")
        }
        Err(why) => {
            println!("skipping: no Python Consul client: {why}; set FERRY_PYTHON or run .ci/run's venv step");
            None
        }
    }
}

/// `GET path` on a plain-HTTP address, with an optional `X-Consul-Token`.
async fn plain_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> client::Answer {
    let mut request = Request::get(path).header(http::header::HOST, addr.to_string());
    if let Some(token) = token {
        request = request.header("x-consul-token", token);
    }
    client::send_h1(addr, request.body(Empty::new()).expect("valid request")).await.expect("answered")
}

#[tokio::test]
async fn pythons_consul_client_registers_watches_and_discovers_through_ferry() {
    let Some(python) = python_or_skip() else { return };
    let control_plane = ControlPlane::start_with(&["--consul-http", "127.0.0.1:0"]).await;
    let app = HttpApp::start("web-app").await;
    let caller = Sidecar::start(&control_plane.reach(), "frontend", None, &[]).await;

    // The client speaks to the API port, with its TLS and the admin token.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("consul/client.py");
    let mut command = tokio::process::Command::new(&python);
    command.arg(&script).args(["--url", &control_plane.http_url(), "--app", &app.addr.to_string()]);
    if let Some(token) = &control_plane.token {
        command.args(["--token", token]);
    }
    if let Some(ca) = &control_plane.ca_file {
        command.arg("--ca").arg(ca);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the Consul client finished within two minutes")
        .expect("the Consul client ran");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "the Consul client failed: {}", String::from_utf8_lossy(&output.stderr));

    // What it registered is an ordinary instance, its KEY=VALUE tag a label routes can select.
    let web = control_plane.instance("web-1").await.expect("web-1 is a Ferry instance");
    assert_eq!(web["metadata"]["version"], "v2", "{web}");
    assert_eq!(web["metadata"]["team"], "payments", "{web}");
    assert_eq!(web["metadata"]["consul.tags"], r#"["primary","version=v2"]"#, "{web}");
    assert_eq!(web["origin"], "ORIGIN_API", "{web}");

    // And a sidecar routes to it.
    // (The sidecar subscribes to a service on its first request, which may answer 503 until
    // the endpoints arrive.)
    eventually("the sidecar to route to web-1", || async {
        let (status, _, body) = client::proxy_get(caller.outbound, "http://web/").await.ok()?;
        (status == StatusCode::OK && body.as_ref() == b"web-app").then_some(())
    })
    .await;

    // --consul-http: plain HTTP, the same tokens.
    let consul = control_plane.process.addr("consul");
    let (status, _, _) = plain_get(consul, "/v1/agent/self", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no token, no answer");
    let token = control_plane.token.as_deref();
    let (status, headers, body) = plain_get(consul, "/v1/health/service/web?passing", token).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(headers["x-consul-index"].to_str().expect("ascii").parse::<u64>().expect("a number") > 0);
    assert_eq!(headers["x-consul-knownleader"], "true");
    let entries: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(entries[0]["Service"]["ID"], "web-1", "{entries}");
    let (status, _, body) = plain_get(consul, "/v1/kv/some/key", token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&body).contains("Ferry does not implement"), "{body:?}");
    let (status, _, body) = plain_get(consul, "/v1/catalog/service/web?filter=ServiceName%20matches%20%22w%22", token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("Ferry supports"), "{body:?}");
}
