//! Client-side discovery without a sidecar: HTTP blocking queries, filters, the gRPC API, and
//! DNS from the control plane and from a sidecar.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use ferry_proto::v1::{self, registry_client::RegistryClient};
use ferry_tests::{
    ControlPlane, PATIENCE, Sidecar,
    apps::HttpApp,
    client,
    dns::{self, Answer},
    eventually,
};
use hickory_resolver::proto::rr::RecordType;

async fn put(control_plane: &ControlPlane, body: &str) {
    let answer = control_plane.send_json(http::Method::PUT, "/v1/instances", body).await.expect("answered");
    assert_eq!(answer.0, 200, "{}", client::text(&answer));
}

async fn get(control_plane: &ControlPlane, path: &str) -> (u64, serde_json::Value) {
    let answer = control_plane.get(path).await.expect("answered");
    assert_eq!(answer.0, 200, "{path}: {}", client::text(&answer));
    let index = client::header(&answer, "x-ferry-index").parse().expect("X-Ferry-Index is a number");
    (index, serde_json::from_slice(&answer.2).expect("JSON"))
}

fn ids(body: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = body["instances"]
        .as_array()
        .map(|a| a.iter().map(|i| i["id"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

#[tokio::test]
async fn blocking_queries_wake_on_a_change_and_time_out_with_the_same_index() {
    let control_plane = ControlPlane::start().await;
    put(&control_plane, r#"{"id": "db-1", "service": "db", "address": "10.0.0.1", "port": 5432}"#).await;
    let (index, body) = get(&control_plane, "/v1/services/db").await;
    assert_eq!(ids(&body), ["db-1"]);

    // No change: the query holds for the wait, then answers with the same index.
    let started = Instant::now();
    let (same, _) = get(&control_plane, &format!("/v1/services/db?index={index}&wait=300ms")).await;
    assert_eq!(same, index);
    assert!(started.elapsed() >= Duration::from_millis(300), "answered after {:?}", started.elapsed());

    // A change wakes it.
    let blocked = {
        let api = control_plane.api().clone();
        let path = format!("/v1/services/db?index={index}&wait=60s");
        tokio::spawn(async move { api.call(http::Method::GET, &path, None).await })
    };
    put(&control_plane, r#"{"id": "db-2", "service": "db", "address": "10.0.0.2", "port": 5432}"#).await;
    let answer = tokio::time::timeout(PATIENCE, blocked).await.expect("woken by the change").expect("joins").expect("answered");
    let woken: u64 = client::header(&answer, "x-ferry-index").parse().expect("index");
    assert!(woken > index);
    let body: serde_json::Value = serde_json::from_slice(&answer.2).expect("JSON");
    assert_eq!(ids(&body), ["db-1", "db-2"]);

    // A service that does not exist yet: a blocking query waits for it to appear.
    let waiting = {
        let api = control_plane.api().clone();
        tokio::spawn(async move { api.call(http::Method::GET, "/v1/services/cache?index=0&wait=60s", None).await })
    };
    put(&control_plane, r#"{"id": "cache-1", "service": "cache", "address": "10.0.0.9", "port": 6379}"#).await;
    let answer = tokio::time::timeout(PATIENCE, waiting).await.expect("woken").expect("joins").expect("answered");
    assert_eq!(ids(&serde_json::from_slice(&answer.2).expect("JSON")), ["cache-1"]);

    let bad = control_plane.get("/v1/services/db?index=soon").await.expect("answered");
    assert_eq!(bad.0, 400);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&bad.2).expect("JSON")["field"], "index");
}

#[tokio::test]
async fn queries_filter_by_metadata_zone_and_health() {
    let control_plane = ControlPlane::start().await;
    put(&control_plane, r#"{"id": "c1", "service": "catalog", "address": "10.0.0.1", "port": 80, "metadata": {"version": "v1"}, "zone": "eu-1a"}"#).await;
    put(&control_plane, r#"{"id": "c2", "service": "catalog", "address": "10.0.0.2", "port": 80, "metadata": {"version": "v2"}, "zone": "eu-1b"}"#).await;
    put(
        &control_plane,
        r#"{"id": "c3", "service": "catalog", "address": "10.0.0.3", "port": 80, "metadata": {"version": "v2"}, "zone": "eu-1a",
            "checks": [{"ttl": {"ttl": "60s"}}]}"#,
    )
    .await;
    control_plane.wait_health("c3", "HEALTH_CRITICAL").await;

    assert_eq!(ids(&get(&control_plane, "/v1/services/catalog?meta=version:v2").await.1), ["c2", "c3"]);
    assert_eq!(ids(&get(&control_plane, "/v1/services/catalog?zone=eu-1a").await.1), ["c1", "c3"]);
    assert_eq!(ids(&get(&control_plane, "/v1/services/catalog?meta=version:v2&passing").await.1), ["c2"]);
    assert_eq!(ids(&get(&control_plane, "/v1/services/catalog?meta=version:v2&zone=eu-1a").await.1), ["c3"]);

    let mut registry = RegistryClient::new(control_plane.channel().await);
    let request = v1::ListInstancesRequest {
        service: "catalog".into(),
        passing_only: true,
        metadata: [("version".to_owned(), "v1".to_owned())].into(),
        zone: String::new(),
    };
    let response = registry.list_instances(request).await.expect("lists").into_inner();
    assert_eq!(response.instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["c1"]);
}

fn ips(list: &[&str]) -> Answer {
    Answer::Addresses(list.iter().map(|ip| ip.parse::<IpAddr>().expect("valid")).collect())
}

#[tokio::test]
async fn control_plane_dns_answers_follow_health() {
    let control_plane = ControlPlane::start().await;
    put(
        &control_plane,
        r#"{"id": "c1", "service": "catalog", "address": "127.0.0.11", "port": 8080, "metadata": {"version": "v1"}}"#,
    )
    .await;
    put(
        &control_plane,
        r#"{"id": "c2", "service": "catalog", "address": "127.0.0.12", "port": 8081, "metadata": {"version": "v2"},
            "checks": [{"ttl": {"ttl": "60s"}}]}"#,
    )
    .await;
    assert_eq!(
        dns::addresses(control_plane.dns, "catalog.service.ferry.").await,
        ips(&["127.0.0.11"]),
        "c2 is critical until renewed"
    );

    let renewed = control_plane.send_json(http::Method::PUT, "/v1/checks/c2:ttl/pass", "").await.expect("answered");
    assert_eq!(renewed.0, 200);
    eventually("DNS to include c2", || async {
        (dns::addresses(control_plane.dns, "catalog.service.ferry.").await == ips(&["127.0.0.11", "127.0.0.12"])).then_some(())
    })
    .await;
    assert_eq!(dns::addresses(control_plane.dns, "v2.catalog.service.ferry.").await, ips(&["127.0.0.12"]));
    let Answer::Services(mut services) = dns::lookup(control_plane.dns, "catalog.service.ferry.", RecordType::SRV).await else {
        panic!("SRV answer expected")
    };
    services.sort();
    assert_eq!(services.iter().map(|s| s.0).collect::<Vec<_>>(), [8080, 8081]);
    assert_eq!(dns::addresses(control_plane.dns, "nothing.service.ferry.").await, Answer::NxDomain);

    let failed = control_plane.send_json(http::Method::PUT, "/v1/checks/c2:ttl/fail", "broken").await.expect("answered");
    assert_eq!(failed.0, 200);
    eventually("DNS to drop c2", || async {
        (dns::addresses(control_plane.dns, "catalog.service.ferry.").await == ips(&["127.0.0.11"])).then_some(())
    })
    .await;
}

#[tokio::test]
async fn dig_reads_the_control_plane_dns() {
    if tokio::process::Command::new("dig").arg("-v").output().await.is_err() {
        eprintln!(
            "skipping dig_reads_the_control_plane_dns: `dig` is not installed (apt-get install dnsutils); .ci/run installs it"
        );
        return;
    }
    let control_plane = ControlPlane::start().await;
    for n in 1..=3 {
        put(&control_plane, &format!(r#"{{"id": "c{n}", "service": "catalog", "address": "127.0.0.{n}", "port": 80}}"#)).await;
    }
    let port = control_plane.dns.port().to_string();
    let dig = |args: &[&str]| {
        let mut command = tokio::process::Command::new("dig");
        command.args(["@127.0.0.1", "-p", &port, "+time=2", "+tries=1"]).args(args);
        command
    };
    let output = dig(&["+short", "catalog.service.ferry", "A"]).output().await.expect("dig runs");
    let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    let output = dig(&["nothing.service.ferry", "A"]).output().await.expect("dig runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("status: NXDOMAIN") && text.contains("SOA"), "{text}");
}

#[tokio::test]
async fn a_sidecar_answers_dns_from_its_config_even_without_the_control_plane() {
    let mut control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &[]).await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &["--dns", "127.0.0.1:0"]).await;
    let dns_addr = client.process.addr("dns");
    let inbound_ip = catalog.inbound.expect("inbound").ip();

    // The first lookup subscribes on demand and waits for the config.
    assert_eq!(dns::addresses(dns_addr, "catalog.service.ferry.").await, Answer::Addresses(vec![inbound_ip]));
    control_plane.process.kill().await;
    eventually("the sidecar to notice", || async {
        (client.config().await["control_plane"]["connected"] == false).then_some(())
    })
    .await;
    assert_eq!(dns::addresses(dns_addr, "catalog.service.ferry.").await, Answer::Addresses(vec![inbound_ip]));
    // A service it has never seen: it cannot know without the control plane, so it does not
    // claim the name does not exist.
    assert!(matches!(dns::addresses(dns_addr, "unknown.service.ferry.").await, Answer::Error(_)));
}
