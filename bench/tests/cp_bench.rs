//! The control-plane benchmark runs end to end in its quick mode and reports every figure. How
//! fast the control plane is does not matter here: only that each figure is there and positive.

use std::process::Command;

use ferry_tests::binary;

#[test]
fn the_quick_benchmark_reports_every_figure() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let json = dir.path().join("cp-bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-cp-bench"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .arg("--control-plane-binary")
        .arg(binary("ferry-control-plane"))
        .output()
        .expect("ferry-cp-bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ferry-cp-bench failed:\n{stderr}");
    assert!(stderr.contains("first config"), "no table on stderr:\n{stderr}");

    let text = std::fs::read_to_string(&json).expect("the JSON file is written");
    let figures: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let expected: &[(&str, &[&str])] = &[
        ("", &["sidecars", "services", "endpoints", "subscriptions_per_sidecar"]),
        ("first_config", &["p50_ms", "p99_ms", "max_ms", "all_configured_ms"]),
        ("propagation", &["changes", "p50_ms", "p99_ms", "max_ms", "slowest_sidecar_p99_ms"]),
        ("bytes_per_change", &["delta_bytes", "snapshot_bytes", "service_endpoints"]),
        ("memory", &["rss_endpoints_only_bytes", "rss_with_sidecars_bytes", "bytes_per_sidecar"]),
        ("cpu", &["first_config_cpu_seconds", "propagation_cpu_seconds", "cpu_ms_per_change"]),
    ];
    for (section, keys) in expected {
        let object = if section.is_empty() { &figures } else { &figures[section] };
        for key in *keys {
            let value = object[key].as_f64();
            assert!(value.is_some_and(|v| v > 0.0), "{section}.{key} is {:?}, not a positive number:\n{text}", object[key]);
        }
    }
    assert_eq!(figures["sidecars"], 100, "--quick runs 100 sidecars");
}

/// `--replicas 2` runs two replicas on a local etcd, or fails saying what is missing (etcd, or a
/// control plane built with the etcd store: the harness builds it without); either way it
/// leaves nothing behind in its temporary directory.
#[test]
fn the_etcd_mode_runs_or_says_what_is_missing_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let out = tempfile::tempdir().expect("temporary directory");
    let json = out.path().join("cp-bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-cp-bench"))
        .args(["--quick", "--replicas", "2", "--json"])
        .arg(&json)
        .arg("--control-plane-binary")
        .arg(binary("ferry-control-plane"))
        .env("TMPDIR", tmp.path())
        .output()
        .expect("ferry-cp-bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        let figures: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON file is written")).expect("JSON");
        assert_eq!(figures["topology"]["replicas"], 2, "{figures}");
        let replicas = figures["replicas"].as_array().expect("figures per replica");
        assert_eq!(replicas.iter().map(|r| r["sidecars"].as_u64()).collect::<Vec<_>>(), [Some(50), Some(50)]);
        assert!(figures["propagation_after_return"]["p99_ms"].as_f64().is_some(), "{figures}");
    } else {
        let says_why = stderr.contains("apt-get install etcd-server")
            || stderr.contains("cargo build --release -p ferry-control-plane --features etcd");
        assert!(says_why, "failed without saying what is missing:\n{stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).expect("readable").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}\n{stderr}");
}
