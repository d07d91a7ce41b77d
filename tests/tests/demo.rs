//! The README's first command: the demo runs three services over the mesh without errors.

use std::time::Duration;

use ferry_tests::binary;

#[tokio::test]
async fn the_demo_runs_traffic_through_every_instance_without_errors() {
    let run = tokio::process::Command::new(binary("ferry-demo")).args(["--duration", "6s"]).kill_on_drop(true).output();
    let output = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the demo ends by itself").expect("runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("traffic flowed through every instance without errors"), "{stdout}");
    for instance in ["frontend-1", "frontend-2", "catalog-1", "catalog-2", "inventory-1", "inventory-2"] {
        assert!(stdout.contains(instance), "{instance} in the summary:\n{stdout}");
    }
}
