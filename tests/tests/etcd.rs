//! Control-plane replicas on a shared etcd store, end to end: three etcd members and several
//! replicas on loopback, sidecars spread over the replicas, and the failures an operator of a
//! highly available control plane plans for (a replica killed, an etcd member killed, etcd
//! entirely gone and back).
//!
//! Run with `cargo test -p ferry-tests --features etcd --test etcd` on a machine with `etcd`
//! (Debian's `etcd-server`) and `protoc`; `.ci/run` installs both. Elsewhere each test says
//! that it skipped.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use ferry_tests::{
    ControlPlane, Reach, Sidecar,
    apps::HttpApp,
    client::{self, proxy_get},
    etcd::EtcdCluster,
    eventually, probe_route,
};
use http::Method;
use serde_json::Value;

const SECRET: &str = "ferry_etcd_test_bootstrap_secret";

/// A replica on `store`, with its own data directory and the shared bootstrap token.
async fn replica(store: &str, name: &str) -> ControlPlane {
    ControlPlane::start_with(&[
        "--store",
        store,
        "--bootstrap-token",
        SECRET,
        "--replica-id",
        name,
        "--replica-ttl",
        "2s",
        "--reconnect-grace",
        "60s",
    ])
    .await
}

/// How a sidecar reaches any of `replicas`, in that order.
fn reach(replicas: &[&ControlPlane]) -> Reach {
    let first = replicas[0].reach();
    Reach { url: replicas.iter().map(|r| r.url()).collect::<Vec<_>>().join(","), ..first }
}

/// The sidecar `node_id` as `replica` lists it, once it does.
async fn sidecar_row(replica: &ControlPlane, node_id: &str) -> Value {
    eventually(&format!("{node_id} in the sidecars"), || async {
        let (status, _, body) = replica.get("/v1/sidecars").await.ok()?;
        let body: Value = serde_json::from_slice(&body).ok()?;
        let row = body["sidecars"].as_array()?.iter().find(|s| s["node_id"] == node_id)?.clone();
        (status == 200).then_some(row)
    })
    .await
}

/// `PUT /v1/instances` through `replica`: the status and body.
async fn register(replica: &ControlPlane, body: &Value) -> (u16, String) {
    match replica.send_json(Method::PUT, "/v1/instances", &body.to_string()).await {
        Ok(answer) => (answer.0.as_u16(), client::text(&answer)),
        Err(error) => (0, error.to_string()),
    }
}

fn instance(id: &str, service: &str, port: u16) -> Value {
    serde_json::json!({ "id": id, "service": service, "address": "127.0.0.1", "port": port })
}

/// A blocking query of `service` on `replica` from `index`: the index answered and the ids.
async fn blocking(replica: &ControlPlane, service: &str, index: u64) -> (u64, Vec<String>) {
    let (status, headers, body) =
        replica.get(&format!("/v1/services/{service}?index={index}&wait=15s")).await.expect("blocking query answered");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let index = headers.get("x-ferry-index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).expect("an index");
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    let mut ids: Vec<String> =
        body["instances"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str().map(str::to_owned)).collect();
    ids.sort();
    (index, ids)
}

/// Waits until `service` answers through the sidecar `from`.
async fn reachable(from: &Sidecar, service: &str) {
    let url = format!("http://{service}/");
    eventually(&format!("{service} to answer"), || async { (proxy_get(from.outbound, &url).await.ok()?.0 == 200).then_some(()) })
        .await;
}

/// Sends requests for `service` through `outbound` until told to stop, counting failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(outbound: SocketAddr, service: &str) -> Self {
        let (stop, sent, failed) = (Arc::default(), Arc::default(), Arc::default());
        let url = format!("http://{service}/");
        let (s, n, f): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
            (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed));
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            while !s.load(Ordering::SeqCst) {
                n.fetch_add(1, Ordering::SeqCst);
                match proxy_get(outbound, &url).await {
                    Ok(answer) if answer.0 == 200 => {}
                    Ok(answer) => {
                        f.fetch_add(1, Ordering::SeqCst);
                        errors.push(format!("{} {}", answer.0, client::text(&answer)));
                    }
                    Err(error) => {
                        f.fetch_add(1, Ordering::SeqCst);
                        errors.push(error.to_string());
                    }
                }
            }
            errors
        });
        Self { stop, sent, failed, task }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    async fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.task.await.expect("traffic task");
        (self.sent.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst), errors)
    }
}

#[tokio::test]
async fn three_replicas_serve_one_registry_and_lose_nothing_when_one_dies() {
    let Some(_etcd) = EtcdCluster::start(3).await else { return };
    let store = _etcd.store();
    let mut replicas = vec![replica(&store, "r0").await, replica(&store, "r1").await, replica(&store, "r2").await];
    let names = ["r0", "r1", "r2"];

    // One CA and one admin token across the replicas.
    let ca = std::fs::read_to_string(replicas[0].ca_file.as_ref().expect("TLS")).expect("ca.pem");
    for replica in &replicas[1..] {
        assert_eq!(std::fs::read_to_string(replica.ca_file.as_ref().expect("TLS")).expect("ca.pem"), ca, "one CA");
    }

    // A catalog sidecar that may use any replica, and a caller on another one.
    let app = HttpApp::start("catalog-1").await;
    let all: Vec<&ControlPlane> = replicas.iter().collect();
    let catalog =
        Sidecar::start(&reach(&all), "catalog", Some(app.addr), &["--id", "catalog-1", "--node-id", "catalog-node"]).await;
    let row = sidecar_row(&replicas[1], "catalog-node").await;
    let held_by = names.iter().position(|n| row["replica"] == *n).unwrap_or_else(|| panic!("catalog's replica: {row}"));
    let others: Vec<usize> = (0..3).filter(|i| *i != held_by).collect();
    let frontend = Sidecar::start(&reach(&[&replicas[others[0]]]), "frontend", None, &["--node-id", "frontend-node"]).await;
    reachable(&frontend, "catalog").await;

    // A route applied through catalog's replica is in force, and acknowledged, in the caller
    // connected to another replica; the replica holding its stream shows the ACK.
    let version = replicas[held_by].apply(&probe_route("catalog", "v1", "")).await[0];
    frontend.wait_for_route("catalog", "v1").await;
    eventually("the caller's ACK of the route, on the replica holding its stream", || async {
        let row = sidecar_row(&replicas[others[0]], "frontend-node").await;
        let subscription = row["subscriptions"].as_array()?.iter().find(|s| s["service"] == "catalog")?.clone();
        let acked: u64 = subscription["route"]["acked_version"].as_str()?.parse().ok()?;
        (acked >= version && row["replica"] == names[others[0]]).then_some(())
    })
    .await;

    // `ferryctl status` on the third replica lists the sidecars of the others, each with the
    // replica holding its stream (which alone shows how far its pushes have come).
    let status = eventually("ferryctl status to list both sidecars", || async {
        let output = replicas[others[1]].ferryctl(&["status"]).await;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let listed = |node: &str, replica: &str| text.lines().any(|line| line.split_whitespace().take(2).eq([node, replica]));
        let asks = text.contains(&format!("ask {}", names[others[0]]));
        (output.status.success() && listed("catalog-node", names[held_by]) && listed("frontend-node", names[others[0]]) && asks)
            .then_some(text)
    })
    .await;
    assert!(status.starts_with("NODE") && status.contains("REPLICA"), "{status}");

    // A blocking query that moves to another replica with the index it holds sees the changes
    // after that index, and waits for the next one.
    let (status, _) = register(&replicas[0], &instance("web-1", "web", 9001)).await;
    assert_eq!(status, 200);
    let (held, ids) = blocking(&replicas[0], "web", 0).await;
    assert_eq!(ids, ["web-1"]);
    assert_eq!(register(&replicas[1], &instance("web-2", "web", 9002)).await.0, 200);
    let (moved, ids) = blocking(&replicas[2], "web", held).await;
    assert!(moved > held, "the index moved on: {held} -> {moved}");
    assert_eq!(ids, ["web-1", "web-2"], "the change made through another replica");
    let waiting = {
        let index = moved;
        let replica = &replicas[1];
        async move { blocking(replica, "web", index).await }
    };
    let write = async {
        tokio::task::yield_now().await;
        assert_eq!(register(&replicas[2], &instance("web-3", "web", 9003)).await.0, 200);
    };
    let ((after, ids), ()) = tokio::join!(waiting, write);
    assert!(after > moved);
    assert_eq!(ids, ["web-1", "web-2", "web-3"]);

    // An API instance with a check: passing, as the elected replica's checks say.
    let checked = HttpApp::start("checked").await;
    let body = serde_json::json!({
        "id": "checked-1", "service": "checked", "address": "127.0.0.1", "port": checked.addr.port(),
        "checks": [{ "http": { "url": "/healthz" }, "interval": "0.2s", "timeout": "0.2s" }],
    });
    let (status, answer) = register(&replicas[others[0]], &body).await;
    assert_eq!(status, 200, "{answer}");
    replicas[others[0]].wait_health("checked-1", "HEALTH_PASSING").await;
    let checker = eventually("one replica to run the checks", || async {
        let running: Vec<usize> = (0..3).filter(|i| replicas[*i].process.log().contains("now runs the health checks")).collect();
        (running.len() == 1).then(|| running[0])
    })
    .await;

    // Every replica shows what the checks found, not only the one running them.
    let bystander = (0..3).find(|i| *i != checker).expect("another replica");
    eventually("the check's verdict on a replica that does not run it", || async {
        let instance = replicas[bystander].instance("checked-1").await?;
        (instance["checks"][0]["status"] == "HEALTH_PASSING").then_some(())
    })
    .await;

    // A TTL check renewed through a replica that does not run the checks.
    let ttl = serde_json::json!({
        "id": "ttl-1", "service": "ttl", "address": "127.0.0.1", "port": 9,
        "checks": [{ "ttl": { "ttl": "60s" } }],
    });
    assert_eq!(register(&replicas[checker], &ttl).await.0, 200);
    let elsewhere = (0..3).find(|i| *i != checker).expect("another replica");
    let answer =
        replicas[elsewhere].send_body(Method::PUT, "/v1/checks/ttl-1:ttl/pass", "text/plain", "ok").await.expect("answered");
    assert_eq!(answer.0, 200, "{}", client::text(&answer));
    replicas[checker].wait_health("ttl-1", "HEALTH_PASSING").await;

    // Kill -9 the replica that catalog's sidecar is connected to while the caller sends it
    // steady traffic: no request fails, and catalog's instance never turns critical.
    let traffic = Traffic::start(frontend.outbound, "catalog");
    eventually("traffic to flow", || async { (traffic.sent() > 20).then_some(()) }).await;
    replicas[held_by].process.kill().await;
    let watcher = &replicas[others[0]];
    let moved_to = eventually("catalog's sidecar to re-attach to another replica", || async {
        let instance = watcher.instance("catalog-1").await?;
        assert_eq!(instance["health"], "HEALTH_PASSING", "catalog-1 after its replica died: {instance}");
        let replica = instance["replica"].as_str()?.to_owned();
        (replica != names[held_by]).then_some(replica)
    })
    .await;
    let sent = traffic.sent();
    eventually("more traffic after the re-attach", || async { (traffic.sent() > sent + 50).then_some(()) }).await;
    let (sent, failed, errors) = traffic.stop().await;
    assert_eq!(failed, 0, "{failed} of {sent} requests failed: {errors:?}");
    assert_eq!(watcher.instance("catalog-1").await.expect("kept")["health"], "HEALTH_PASSING");
    assert_ne!(moved_to, names[held_by]);
    catalog.wait_ready().await;

    // The checks keep running once the replica that ran them is gone: kill it if it is still
    // up, then make the checked app fail and see the instance turn critical.
    if checker != held_by {
        replicas[checker].process.kill().await;
    }
    let alive: Vec<usize> = (0..3).filter(|i| *i != held_by && *i != checker).collect();
    let survivor = eventually("another replica to take over the checks", || async {
        alive.iter().copied().find(|i| replicas[*i].process.log().contains("now runs the health checks"))
    })
    .await;
    checked.set_health(503);
    replicas[survivor].wait_health("checked-1", "HEALTH_CRITICAL").await;
    checked.set_health(200);
    replicas[survivor].wait_health("checked-1", "HEALTH_PASSING").await;

    // An id a running replica holds is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let args = [
        "--store",
        &store,
        "--replica-id",
        names[survivor],
        "--replica-ttl",
        "2s",
        "--bootstrap-token",
        SECRET,
        "--data-dir",
        &data_dir,
        "--grpc",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--dns",
        "127.0.0.1:0",
    ];
    let output =
        tokio::process::Command::new(ferry_tests::binary("ferry-control-plane")).args(args).output().await.expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("--replica-id"), "{stderr}");
    drop(replicas.drain(..));
}

#[tokio::test]
async fn writes_survive_an_etcd_member_and_wait_out_etcd_while_traffic_flows() {
    let Some(mut etcd) = EtcdCluster::start(3).await else { return };
    let store = etcd.store();
    let replicas = [replica(&store, "a").await, replica(&store, "b").await];
    let app = HttpApp::start("catalog-1").await;
    let _catalog = Sidecar::start(&reach(&[&replicas[0]]), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    let frontend = Sidecar::start(&reach(&[&replicas[1]]), "frontend", None, &[]).await;
    reachable(&frontend, "catalog").await;

    // One member of three killed under traffic: no request fails, writes go on through either
    // replica.
    let traffic = Traffic::start(frontend.outbound, "catalog");
    eventually("traffic to flow", || async { (traffic.sent() > 20).then_some(()) }).await;
    etcd.kill(0).await;
    for (i, replica) in replicas.iter().enumerate() {
        let id = format!("after-member-{i}");
        let (status, body) = eventually("a write with one etcd member down", || async {
            let answer = register(replica, &instance(&id, "web", 9100 + i as u16)).await;
            (answer.0 == 200).then_some(answer)
        })
        .await;
        assert_eq!(status, 200, "{body}");
        replicas[1 - i].wait_health(&id, "HEALTH_PASSING").await;
    }
    let (sent, failed, errors) = traffic.stop().await;
    assert_eq!(failed, 0, "{failed} of {sent} requests failed with an etcd member down: {errors:?}");

    // etcd entirely gone: traffic is not affected, writes are refused with 503 saying why,
    // and the replicas say they are not ready.
    etcd.kill(1).await;
    etcd.kill(2).await;
    for replica in &replicas {
        eventually("a replica to notice etcd is gone", || async {
            let (status, _, body) = replica.get("/ready").await.ok()?;
            (status == 503 && String::from_utf8_lossy(&body).contains("store is unavailable")).then_some(())
        })
        .await;
    }
    let grpc_health = |replica: &ControlPlane| {
        let access = replica.access();
        async move {
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            let channel = access.connect().await.ok()?;
            let reply =
                HealthClient::new(channel).check(HealthCheckRequest { service: "ferry.v1.Registry".into() }).await.ok()?;
            Some(reply.into_inner().status())
        }
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    eventually("gRPC health to say not serving too", || async {
        (grpc_health(&replicas[0]).await? == ServingStatus::NotServing).then_some(())
    })
    .await;
    let (status, body) = register(&replicas[0], &instance("during-outage", "web", 9200)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store is unavailable"), "{body}");
    let route = probe_route("catalog", "outage", "");
    let answer = replicas[1].send_body(Method::POST, "/v1/apply", "application/yaml", &route).await.expect("answered");
    assert_eq!(answer.0, 503, "{}", client::text(&answer));
    for _ in 0..100 {
        let answer = proxy_get(frontend.outbound, "http://catalog/").await.expect("answered");
        assert_eq!(answer.0, 200, "traffic during the etcd outage: {}", client::text(&answer));
    }

    // etcd back: the replicas catch up and take writes again, each seeing the other's.
    for i in 0..3 {
        etcd.restart(i).await;
    }
    for i in 0..3 {
        etcd.wait_healthy(i).await;
    }
    for replica in &replicas {
        eventually("a replica to be ready again", || async { (replica.get("/ready").await.ok()?.0 == 200).then_some(()) }).await;
        eventually("gRPC health to say serving again", || async {
            (grpc_health(replica).await? == ServingStatus::Serving).then_some(())
        })
        .await;
    }
    let (status, body) = eventually("a write once etcd is back", || async {
        let answer = register(&replicas[0], &instance("after-outage", "web", 9300)).await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!(status, 200, "{body}");
    replicas[1].wait_health("after-outage", "HEALTH_PASSING").await;
    replicas[1].apply(&probe_route("catalog", "back", "")).await;
    frontend.wait_for_route("catalog", "back").await;
    for _ in 0..20 {
        assert_eq!(proxy_get(frontend.outbound, "http://catalog/").await.expect("answered").0, 200);
    }
}

#[tokio::test]
async fn a_replica_cut_off_from_etcd_keeps_its_sidecars_serving_and_gets_their_instances_back() {
    let Some(etcd) = EtcdCluster::start(1).await else { return };
    let relay = ferry_tests::etcd::Relay::start(etcd.members[0].endpoint()).await;
    let direct = etcd.store();
    let through_relay = format!("etcd://{}", relay.addr);
    // A short grace, so that the others give up on the cut-off replica's sidecars.
    let flags = |store: &str, name: &str| {
        vec![
            "--store".to_owned(),
            store.to_owned(),
            "--bootstrap-token".to_owned(),
            SECRET.to_owned(),
            "--replica-id".to_owned(),
            name.to_owned(),
            "--replica-ttl".to_owned(),
            "2s".to_owned(),
            "--reconnect-grace".to_owned(),
            "3s".to_owned(),
        ]
    };
    let a_flags = flags(&direct, "a");
    let a = ControlPlane::start_with(&a_flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let b_flags = flags(&through_relay, "b");
    let b = ControlPlane::start_with(&b_flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let app = HttpApp::start("catalog-1").await;
    let catalog = Sidecar::start(&reach(&[&b]), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    let frontend = Sidecar::start(&reach(&[&a]), "frontend", None, &[]).await;
    reachable(&frontend, "catalog").await;

    // Cut off: b says it is not ready and refuses writes, its sidecar keeps serving from it.
    relay.cut();
    eventually("b to notice it is cut off", || async {
        let (status, _, _) = b.get("/ready").await.ok()?;
        (status == 503).then_some(())
    })
    .await;
    assert_eq!(register(&b, &instance("cut-off", "web", 9400)).await.0, 503);
    assert_eq!(a.get("/ready").await.expect("answered").0, 200, "a still reaches etcd");
    // a sees b's lease expire, keeps catalog-1 for the grace period, then removes it.
    eventually("a to remove the instance of the cut-off replica's sidecar", || async {
        a.instance("catalog-1").await.is_none().then_some(())
    })
    .await;
    assert!(a.process.log().contains("an instance's replica is gone"), "kept for the grace period first");
    catalog.wait_ready().await;

    // Healed: b joins again and writes back the instance of the sidecar still streaming to it.
    relay.heal();
    let back = eventually("catalog-1 back, held by b", || async {
        let instance = a.instance("catalog-1").await?;
        (instance["replica"] == "b").then_some(instance)
    })
    .await;
    assert_eq!(back["health"], "HEALTH_PASSING");
    reachable(&frontend, "catalog").await;
    eventually("b to be ready again", || async { (b.get("/ready").await.ok()?.0 == 200).then_some(()) }).await;
}
