//! A store with rows that no longer decode: the control plane starts anyway, sets them aside
//! (kept, logged, counted, listed by `ferryctl status`) and loads the rest.

use ferry_tests::{ControlPlane, client::text};

/// Writes `value` under `key` of `table` in the redb file of a stopped control plane.
fn damage(data_dir: &std::path::Path, table: &str, key: &str, value: &[u8]) {
    let db = redb::Database::open(data_dir.join("ferry.redb")).expect("opens the store");
    let txn = db.begin_write().expect("a write transaction");
    {
        let definition = redb::TableDefinition::<&str, &[u8]>::new(table);
        let mut table = txn.open_table(definition).expect("the table");
        table.insert(key, value).expect("inserts");
    }
    txn.commit().expect("commits");
}

#[tokio::test]
async fn rows_that_do_not_decode_are_set_aside_and_the_rest_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut control_plane = ControlPlane::start_in(dir.path(), &[]).await;
    let body = r#"{"id": "db-1", "service": "db", "address": "db.internal", "port": 5432}"#;
    let registered = control_plane.send_json(http::Method::PUT, "/v1/instances", body).await.expect("answered");
    assert_eq!(registered.0, 200, "{}", text(&registered));
    let reader = control_plane.token("read", None).await;
    control_plane.apply(&ferry_tests::probe_route("db", "kept", "")).await;
    assert!(control_plane.process.terminate().await.success());

    // Three rows the control plane cannot read: an instance, a token and a route.
    damage(dir.path(), "instances", "db-2", b"\xff\xff not protobuf");
    damage(dir.path(), "tokens", "tok-broken", b"{ not json");
    damage(dir.path(), "routes", "web", b"\x0a\xff\xff\xff");

    let restarted = ControlPlane::start_in(dir.path(), &[]).await;
    assert_eq!(restarted.instance("db-1").await.map(|i| i["service"].clone()), Some("db".into()), "the rest loaded");
    let route = restarted.get("/v1/routes/db").await.expect("answered");
    assert_eq!(route.0, 200, "{}", text(&route));
    let read = restarted.api().with_token(Some(&reader));
    assert_eq!(read.call(http::Method::GET, "/v1/services", None).await.expect("answered").0, 200, "the other tokens work");

    let listed = restarted.get("/v1/store/set-aside").await.expect("answered");
    assert_eq!(listed.0, 200, "{}", text(&listed));
    let rows: serde_json::Value = serde_json::from_slice(&listed.2).expect("JSON");
    let mut seen: Vec<(String, String)> = rows["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (r["table"].as_str().unwrap_or_default().to_owned(), r["key"].as_str().unwrap_or_default().to_owned()))
        .collect();
    seen.sort();
    let expected = [("instances", "db-2"), ("routes", "web"), ("tokens", "tok-broken")];
    assert_eq!(seen, expected.map(|(t, k)| (t.to_owned(), k.to_owned())), "{rows}");
    for row in rows["rows"].as_array().expect("rows") {
        assert!(!row["reason"].as_str().unwrap_or_default().is_empty(), "{row}");
        // proto3 JSON writes a uint64 as a string.
        assert!(row["bytes"].as_str().is_some_and(|b| b.parse::<u64>().is_ok_and(|n| n > 0)), "{row}");
    }
    assert!(restarted.process.log().contains("set aside"), "logged");
    let (_, _, metrics) = restarted.get("/metrics").await.expect("metrics");
    assert!(String::from_utf8_lossy(&metrics).contains("ferry_store_rows_set_aside 3"), "counted");

    let status = restarted.ferryctl(&["status"]).await;
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("3 stored rows could not be read"), "{shown}");
    assert!(shown.lines().any(|l| l.starts_with("instances") && l.contains("db-2") && l.contains("does not decode")), "{shown}");

    // Set aside once: a second restart loads cleanly and still lists them.
    drop(restarted);
    let again = ControlPlane::start_in(dir.path(), &[]).await;
    let listed = again.get("/v1/store/set-aside").await.expect("answered");
    let rows: serde_json::Value = serde_json::from_slice(&listed.2).expect("JSON");
    assert_eq!(rows["rows"].as_array().map(Vec::len), Some(3), "{rows}");
}

/// A tmpfs mounted on a temporary directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// A `size` tmpfs, or why there cannot be one here.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("`mount` cannot run: {e}"))?;
        if !mounted.status.success() {
            return Err(format!("cannot mount a tmpfs: {}", String::from_utf8_lossy(&mounted.stderr).trim()));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the disk with one file, until it is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let file = self.path().join("filler");
        let mut out = std::fs::File::create(&file).expect("creates the filler");
        let chunk = vec![0u8; 64 * 1024];
        while out.write_all(&chunk).is_ok() {}
        let _ = out.sync_all();
        file
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_writes_clearly_and_they_resume_when_space_returns() {
    let disk = match SmallDisk::mount("16m") {
        Ok(disk) => disk,
        Err(why) if std::env::var_os("FERRY_REQUIRE_NETNS").is_some() => panic!("FERRY_REQUIRE_NETNS is set but {why}"),
        Err(why) => {
            eprintln!("skipping the full-disk test: {why} (it needs root)");
            return;
        }
    };
    let data = disk.path().join("data");
    let mut control_plane = ControlPlane::start_in(&data, &[]).await;
    let register = |id: String| {
        let body = format!(r#"{{"id": "{id}", "service": "db", "address": "db.internal", "port": 5432}}"#);
        let control_plane = &control_plane;
        async move { control_plane.send_json(http::Method::PUT, "/v1/instances", &body).await.expect("answered") }
    };
    let mut acknowledged = Vec::new();
    let first = register("db-0".into()).await;
    assert_eq!(first.0, 200, "{}", text(&first));
    acknowledged.push("db-0".to_owned());

    // Full: a registration is refused with a 503 that says why, once the store's file cannot
    // grow (its free pages may take a few first).
    let filler = disk.fill();
    // Ten 250-byte labels, so that each registration grows the file by a few kilobytes.
    let padding = (0..10).map(|i| format!(r#""pad{i}": "{}""#, "x".repeat(250))).collect::<Vec<_>>().join(", ");
    let mut refused = None;
    for n in 1..=200 {
        let id = format!("db-{n}");
        let body =
            format!(r#"{{"id": "{id}", "service": "db", "address": "db.internal", "port": 5432, "metadata": {{{padding}}}}}"#);
        let answer = control_plane.send_json(http::Method::PUT, "/v1/instances", &body).await.expect("answered");
        match answer.0.as_u16() {
            200 => acknowledged.push(id),
            503 => {
                refused = Some(text(&answer));
                break;
            }
            other => panic!("registering {id} with the disk full: {other}: {}", text(&answer)),
        }
    }
    let refused = refused.expect("a registration refused once the disk is full");
    assert!(refused.contains("store") && refused.contains("No space left on device"), "{refused}");

    // Room again: writes resume without a restart.
    std::fs::remove_file(filler).expect("frees the disk");
    ferry_tests::eventually("registrations to succeed again", || async {
        let answer = register("db-after".into()).await;
        (answer.0 == 200).then_some(())
    })
    .await;

    acknowledged.push("db-after".to_owned());

    // Nothing acknowledged is lost, even without a clean shutdown.
    control_plane.process.kill().await;
    let restarted = ControlPlane::start_in(&data, &[]).await;
    for id in &acknowledged {
        assert!(restarted.instance(id).await.is_some(), "{id} was acknowledged and is still stored");
    }
    drop(restarted);
    drop(control_plane);
}
