//! Several control-plane replicas: sidecars given `--control-plane A,B` move to B when A dies,
//! register their instance there and resubscribe, and traffic between them flows again;
//! `ferryctl` answers while any replica is up and, when none is, names every address it tried.
//!
//! The two control planes here share nothing but their trust: each keeps its own in-memory
//! registry, and both sign with one operator issuer (`--ca-cert`/`--ca-key`) and accept one
//! admin token (`--bootstrap-token`), so a sidecar trusts either and either accepts it. (With
//! `--store etcd`, replicas also share the registry; that is not needed to test the clients.)

use std::{net::SocketAddr, path::Path, time::Duration};

use ferry_tests::{
    ControlPlane, Reach, Sidecar,
    apps::HttpApp,
    client::{header, proxy_get, text},
    eventually,
};

const TOKEN: &str = "ferry_failover_test";

/// An operator's issuer under a root of its own, as `--ca-cert` (issuer then root) and
/// `--ca-key` files in `dir`.
fn operator_ca(dir: &Path) -> (String, String) {
    use ferry_tls::{authority, identity::DEFAULT_TRUST_DOMAIN};
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let root = authority::new_root(DEFAULT_TRUST_DOMAIN, now, day).expect("a root");
    let issuer = authority::new_issuer(&root, DEFAULT_TRUST_DOMAIN, now, day).expect("an issuer");
    let (cert, key) = (dir.join("issuer.pem"), dir.join("issuer.key"));
    std::fs::write(&cert, format!("{}{}", issuer.cert_pem, root.cert_pem)).expect("writes the issuer");
    std::fs::write(&key, &issuer.key_pem).expect("writes the key");
    (cert.display().to_string(), key.display().to_string())
}

/// Two control planes sharing the operator's CA and the admin token, each with its own registry.
async fn two_replicas(dir: &Path) -> (ControlPlane, ControlPlane) {
    let (cert, key) = operator_ca(dir);
    let flags = ["--store", "memory", "--ca-cert", &cert, "--ca-key", &key, "--bootstrap-token", TOKEN];
    (ControlPlane::start_with(&flags).await, ControlPlane::start_with(&flags).await)
}

/// How sidecars reach `urls` with the CA and token the replicas share.
fn reach(urls: &str, any: &ControlPlane) -> Reach {
    Reach { url: urls.to_owned(), ..any.reach() }
}

/// The replica a sidecar's `/config` says it is connected to, if it is: its URL and address.
async fn replica(sidecar: &Sidecar) -> Option<(String, String)> {
    let control = sidecar.config().await["control_plane"].clone();
    if control["connected"] != true {
        return None;
    }
    let replica = &control["replica"];
    Some((replica["url"].as_str()?.to_owned(), replica["address"].as_str()?.to_owned()))
}

/// Sends `n` requests for `service` through `outbound`; every one must be served by `app`.
async fn all_served_by(outbound: SocketAddr, service: &str, app: &str, n: usize) {
    for _ in 0..n {
        let answer = proxy_get(outbound, &format!("http://{service}/")).await.expect("answered");
        assert_eq!(answer.0, 200, "{}: {}", header(&answer, "x-ferry-error"), text(&answer));
        assert_eq!(text(&answer), app);
    }
}

#[tokio::test]
async fn sidecars_move_to_the_next_replica_when_theirs_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, b) = two_replicas(dir.path()).await;
    // B by host name: localhost may resolve to more than one address (::1 first, where nothing
    // listens), and the certificate is verified against the name, not the address dialled.
    let b_url = format!("https://localhost:{}", b.grpc.port());
    let urls = format!("{},{b_url}", a.url());
    let app = HttpApp::start("catalog-app").await;
    let catalog = Sidecar::start(&reach(&urls, &a), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    let client = Sidecar::start(&reach(&urls, &a), "frontend", None, &["--upstream", "catalog=127.0.0.1:0"]).await;

    // Both start on the first replica of the list.
    a.wait_passing("catalog", 1).await;
    assert_eq!(replica(&catalog).await.map(|r| r.0), Some(a.url()));
    assert_eq!(replica(&client).await.map(|r| r.0), Some(a.url()));
    assert!(b.instance("catalog-1").await.is_none(), "B knows nothing of it yet");
    client.wait_endpoints("catalog", 1).await;
    all_served_by(client.outbound, "catalog", "catalog-app", 5).await;

    a.process.kill().await;

    // The instance is registered again on B, and both sidecars say they are connected to B.
    b.wait_health("catalog-1", "HEALTH_PASSING").await;
    for sidecar in [&catalog, &client] {
        let (_, address) =
            eventually("the sidecar to connect to B", || async { replica(sidecar).await.filter(|(url, _)| *url == b_url) }).await;
        assert_eq!(address.parse::<SocketAddr>().map(|a| a.port()), Ok(b.grpc.port()), "{address}");
    }
    let log = catalog.process.log();
    assert!(
        log.lines().any(|l| l.contains("connected to the control plane") && l.contains(&format!("url={b_url}"))),
        "the reconnection is logged with the replica's address:\n{log}"
    );

    // The client resubscribed on B and routes to the instance B knows.
    client.wait_endpoints("catalog", 1).await;
    all_served_by(client.outbound, "catalog", "catalog-app", 20).await;
}

#[tokio::test]
async fn ferryctl_answers_while_any_replica_is_up_and_names_every_address_when_none_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, b) = two_replicas(dir.path()).await;
    let app = HttpApp::start("catalog-app").await;
    let _catalog = Sidecar::start(&reach(&b.url(), &b), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    b.wait_passing("catalog", 1).await;
    let b_url = format!("https://localhost:{}", b.grpc.port());

    // A is up but does not know the instance: the first replica that answers is the one asked.
    let both = format!("{},{b_url}", a.url());
    let output = b.ferryctl(&["--control-plane", &both, "-o", "json", "services"]).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!String::from_utf8_lossy(&output.stdout).contains("catalog"), "answered by A");

    a.process.kill().await;
    let output = b.ferryctl(&["--control-plane", &both, "-o", "json", "services"]).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("catalog"), "answered by B");

    // Nothing answers: the error names each address with its reason.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
    let none = format!("{},https://{closed}", a.url());
    let output = b.ferryctl(&["--control-plane", &none, "services"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no control plane answered"), "{stderr}");
    assert!(stderr.contains(&format!("{}: ", a.url())) && stderr.contains(&format!("https://{closed}: ")), "{stderr}");

    // A bad entry is refused before anything is sent, naming the flag and the entry.
    let output = b.ferryctl(&["--control-plane", &format!("{b_url},,{b_url}"), "services"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--control-plane") && stderr.contains("URL 2 of 3 is empty"), "{stderr}");
}
