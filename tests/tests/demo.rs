//! The README's first command: the demo runs three services over the mesh without errors, and
//! its routing scenarios do what their routes say.

use std::{process::Stdio, time::Duration};

use ferry_tests::binary;

/// Demos run one at a time: each takes the README's ports when they are free, and two starting
/// at once would both find them free.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `ferry-demo ARGS...` to its end; returns whether it exited 0, and its stdout.
async fn demo(args: &[&str]) -> (bool, String) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let run = tokio::process::Command::new(binary("ferry-demo")).args(args).stdin(Stdio::null()).kill_on_drop(true).output();
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
