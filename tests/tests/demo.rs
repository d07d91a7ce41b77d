//! The README's first command: the demo runs three services over the mesh without errors, and
//! its routing scenarios do what their routes say; routes applied from another shell, as the
//! README's tour does, show in its summary without being judged as its own.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_tests::{binary, client, eventually};
use http::{Method, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Demos run one at a time: each takes the README's ports when they are free, and two starting
/// at once would both find them free.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `ferry-demo ARGS...` to its end; returns whether it exited 0, and its stdout.
async fn demo(args: &[&str]) -> (bool, String) {
    demo_with_env(args, &[]).await
}

/// Runs `ferry-demo ARGS...` with `env` added to its environment, as [`demo`] does.
async fn demo_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let run = tokio::process::Command::new(binary("ferry-demo"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the demo ends by itself").expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (output.status.success(), format!("{stdout}\n--- stderr ---\n{stderr}"))
}

#[tokio::test]
async fn the_demo_runs_traffic_through_every_instance_without_errors() {
    let (success, output) = demo(&["--duration", "6s"]).await;
    assert!(success, "{output}");
    assert!(output.contains("traffic flowed through every instance without errors"), "{output}");
    for instance in ["frontend-1", "frontend-2", "catalog-1", "catalog-2", "inventory-1", "inventory-2"] {
        assert!(output.contains(instance), "{instance} in the summary:\n{output}");
    }
}

/// A shell where the user sourced the demo's env file (or uses another Ferry) exports Ferry's
/// variables: none of them reaches the demo's control plane and sidecars, which would take them
/// as their own flags (a sidecar refuses --token-file beside FERRY_TOKEN).
#[tokio::test]
async fn the_demo_runs_in_a_shell_that_exports_ferrys_variables() {
    let env = [
        ("FERRY_TOKEN", "bogus"),
        ("FERRY_CA_FILE", "/nonexistent"),
        ("FERRY_CONTROL_PLANE", "https://127.0.0.1:1"),
        ("FERRY_DEMO_FRONTEND_1_ADMIN", "127.0.0.1:1"),
    ];
    let (success, output) = demo_with_env(&["--duration", "4s"], &env).await;
    assert!(success, "{output}");
    assert!(output.contains("traffic flowed through every instance without errors"), "{output}");
}

#[tokio::test]
async fn the_canary_scenario_sends_a_tenth_of_catalog_traffic_to_v2() {
    let (success, output) = demo(&["--duration", "10s", "--scenario", "canary"]).await;
    assert!(success, "{output}");
    assert!(output.contains("in force on every sidecar that calls catalog"), "the route took effect:\n{output}");
    // The last catalog replica is the canary, and the summary says so.
    let row = |instance: &str| output.lines().rev().find(|l| l.split_whitespace().nth(1) == Some(instance)).map(str::to_owned);
    assert_eq!(row("catalog-1").and_then(|r| r.split_whitespace().nth(2).map(str::to_owned)).as_deref(), Some("v1"), "{output}");
    assert_eq!(row("catalog-2").and_then(|r| r.split_whitespace().nth(2).map(str::to_owned)).as_deref(), Some("v2"), "{output}");
    // Both versions served requests sent under the route, v1 most of them:
    // "canary: catalog answered 198 requests: v1 178 (89.9%), v2 20 (10.1%)".
    let split = output.lines().find(|l| l.starts_with("canary: catalog answered")).unwrap_or_else(|| panic!("{output}"));
    let served = |version: &str| -> u64 {
        let counts = split.rsplit(": ").next().unwrap_or_default();
        counts
            .split(", ")
            .find_map(|part| part.strip_prefix(&format!("{version} ")))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count for {version} in {split:?}"))
    };
    let (v1, v2) = (served("v1"), served("v2"));
    assert!(v1 > 0 && v2 > 0, "both versions served traffic: {split}");
    assert!(v1 > v2, "a 90/10 split gives v1 most of the traffic: {split}");
    assert!(output.contains("did what the canary scenario says"), "{output}");
}

#[tokio::test]
async fn the_lockdown_scenario_refuses_every_caller_of_catalog_but_frontend() {
    let (success, output) = demo(&["--duration", "10s", "--scenario", "lockdown"]).await;
    assert!(success, "{output}");
    assert!(output.contains("authorization/catalog enforced by every catalog sidecar"), "the policy took effect:\n{output}");
    let probes =
        output.lines().find(|l| l.starts_with("lockdown: the client sidecar's own calls")).unwrap_or_else(|| panic!("{output}"));
    assert!(probes.contains(", 0 answered, 0 failed otherwise"), "{probes}");
    assert!(!probes.contains(": 0 refused"), "{probes}");
    assert!(output.contains("did what the lockdown scenario says"), "{output}");
}

/// Appends every line `from` writes to `to`.
fn collect(from: impl AsyncRead + Unpin + Send + 'static, to: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(from).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut to = to.lock().unwrap_or_else(|p| p.into_inner());
            to.push_str(&line);
            to.push('\n');
        }
    });
}

/// The README's tour applies routes with ferryctl while the demo runs. A fault route of one's
/// own fails requests on purpose: the summary shows it as applied outside the demo, the verdict
/// reports its traffic without judging it, and once it is deleted the demo judges again.
#[tokio::test]
async fn routes_applied_outside_the_demo_are_shown_and_not_judged() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut demo = tokio::process::Command::new(binary("ferry-demo"))
        .args(["--duration", "24s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("runs");
    let output = Arc::new(Mutex::new(String::new()));
    collect(demo.stdout.take().expect("piped"), output.clone());
    collect(demo.stderr.take().expect("piped"), output.clone());
    let now = || output.lock().unwrap_or_else(|p| p.into_inner()).clone();

    // "control plane  grpc https://127.0.0.1:7070  http https://127.0.0.1:7071", then the lines
    // to paste: "export FERRY_TOKEN=$(cat /tmp/.../admin.token)", "export FERRY_CA_FILE=...".
    let (addr, token_file, ca_file) = eventually("the demo to print its addresses and credentials", || async {
        let text = now();
        let line = text.lines().find(|l| l.starts_with("control plane"))?.to_owned();
        let addr: SocketAddr = line.rsplit("https://").next()?.trim().parse().ok()?;
        let token =
            text.lines().find_map(|l| l.trim().strip_prefix("export FERRY_TOKEN=$(cat "))?.trim_end_matches(')').to_owned();
        let ca = text.lines().find_map(|l| l.trim().strip_prefix("export FERRY_CA_FILE="))?.to_owned();
        Some((addr, token, ca))
    })
    .await;
    // The env file the demo names ("or: source /tmp/.../env") also exports its sidecars' admin
    // addresses: `ferryctl explain catalog --sidecar "$FERRY_DEMO_FRONTEND_1_ADMIN"` asks one of
    // the sidecars that run catalog's routes.
    let env_file = eventually("the demo to name its env file", || async {
        now().lines().find_map(|l| l.trim().strip_prefix("or: source ").map(str::to_owned))
    })
    .await;
    let env = std::fs::read_to_string(&env_file).expect("the env file");
    assert!(env.contains("export FERRY_TOKEN=") && env.contains("\n# The admin listeners"), "{env}");
    let admin = env.lines().find_map(|l| l.strip_prefix("export FERRY_DEMO_FRONTEND_1_ADMIN=")).expect("frontend-1's admin");
    for id in ["FRONTEND_2", "CATALOG_1", "CATALOG_2", "INVENTORY_1", "INVENTORY_2", "CLIENT"] {
        assert!(env.contains(&format!("export FERRY_DEMO_{id}_ADMIN=127.0.0.1:")), "{id} in:\n{env}");
    }
    let config = client::get(&format!("http://{admin}/config")).await.expect("frontend-1's sidecar answers on its admin");
    assert_eq!(config.0, StatusCode::OK, "{}", client::text(&config));
    assert!(client::text(&config).contains("\"node_id\": \"frontend-1\""), "frontend-1's sidecar: {}", client::text(&config));
    let token = std::fs::read_to_string(&token_file).expect("the admin token file");
    let ca = std::fs::read_to_string(&ca_file).expect("the CA file");
    let api = ferry_tls::api::HttpApi::new(addr, Some(&ca), Some(token.trim().to_owned())).expect("TLS config");
    let send = |method: Method, path: String, content_type: &'static str, body: &'static str| {
        let api = api.clone();
        async move { api.call(method, &path, Some((content_type, bytes::Bytes::from_static(body.as_bytes())))).await }
    };
    eventually("traffic", || async { now().contains(" ok ").then_some(()) }).await;

    // The very routes of a scenario, applied by hand as the README's tour does: taken as that
    // scenario.
    let canary = include_str!("../../examples/routes/canary.yaml");
    let applied = send(Method::POST, "/v1/apply".into(), "application/yaml", canary).await.expect("answered");
    assert_eq!(applied.0, StatusCode::OK, "{}", client::text(&applied));
    eventually("the summary to take the canary's routes as the demo's canary", || async {
        now().contains("the same routes as the demo's canary scenario (examples/routes/canary.yaml)").then_some(())
    })
    .await;
    // A fault route of one's own (the scenario's, with another rate): reported, not judged.
    let fault: &'static str = include_str!("../../examples/routes/fault.yaml").replacen("percent: 10 ", "percent: 12 ", 1).leak();
    let applied = send(Method::POST, "/v1/apply".into(), "application/yaml", fault).await.expect("answered");
    assert_eq!(applied.0, StatusCode::OK, "{}", client::text(&applied));
    eventually("the summary to show the fault as applied outside the demo", || async {
        now().contains("not the routes of any of the demo's scenarios").then_some(())
    })
    .await;
    eventually("the summary line to name them", || async { now().contains("  routes: route/catalog v").then_some(()) }).await;

    for service in ["catalog", "frontend"] {
        let deleted = send(Method::DELETE, format!("/v1/routes/{service}"), "application/json", "").await.expect("answered");
        assert_eq!(deleted.0, StatusCode::OK, "{}", client::text(&deleted));
    }
    eventually("the summary to show the routes deleted", || async {
        now().contains("deleted outside the demo: the routes in force are none").then_some(())
    })
    .await;

    let status =
        tokio::time::timeout(Duration::from_secs(60), demo.wait()).await.expect("the demo ends by itself").expect("runs");
    // The readers may still hold the last lines.
    let output = eventually("the verdict", || async { now().contains("traffic flowed through").then(now) }).await;
    assert!(status.success(), "{output}");
    assert!(!output.contains("FAILED:"), "{output}");
    assert!(output.contains("not judged: "), "the fault's traffic is reported:\n{output}");
    // The two deletions may be seen at one poll or at two: "since the deletion of route/catalog
    // and route/frontend took effect", or of route/frontend alone.
    let verdict = output.lines().find(|l| l.starts_with("traffic flowed through")).unwrap_or_default();
    assert!(
        verdict.starts_with("traffic flowed through every instance without errors since the deletion of route/")
            && verdict.ends_with("took effect"),
        "the traffic after the deletion is judged:\n{output}"
    );
}

/// `ferry-demo | head`: once nobody reads its output the demo stops as on Ctrl-C, with no panic,
/// removes its temporary folder (which holds the admin token), and reports it as a program
/// stopped by SIGPIPE would (141).
#[tokio::test]
async fn the_demo_ends_quietly_when_its_output_closes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut demo = tokio::process::Command::new(binary("ferry-demo"))
        .args(["--duration", "60s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let stderr = Arc::new(Mutex::new(String::new()));
    collect(demo.stderr.take().expect("stderr"), stderr.clone());
    // Read as `head` would, up to the line that names the logs folder
    // (`logs  /tmp/ferry-demo-XXXX/logs`), then close the pipe.
    let mut lines = BufReader::new(demo.stdout.take().expect("stdout")).lines();
    let mut folder = None;
    while folder.is_none() {
        let line = lines.next_line().await.expect("reads").expect("a line naming the logs folder");
        folder = line.strip_prefix("logs ").map(|logs| std::path::PathBuf::from(logs.trim()));
    }
    let folder = folder.and_then(|logs| logs.parent().map(std::path::Path::to_path_buf)).expect("the logs' folder");
    assert!(folder.join("data/admin.token").exists(), "{} holds the admin token while the demo runs", folder.display());
    drop(lines);
    // It notices at its next write (once a second in the summary lines) and stops its children.
    let status =
        tokio::time::timeout(Duration::from_secs(60), demo.wait()).await.expect("ends well before --duration").expect("waits");
    let stderr = stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(status.code(), Some(141), "{status:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Its folder goes, admin token and all, as at the end of a run that passed.
    assert!(!folder.exists(), "{} is left behind:\n{stderr}", folder.display());
    assert!(stderr.contains("removed"), "it says so on stderr:\n{stderr}");
}
