//! Zero trust, end to end with the real binaries: mTLS between sidecars (strict and permissive
//! listeners, the identity a caller checks), certificate and CA rotation under traffic, and
//! authorization policies for HTTP, gRPC and opaque TCP.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ferry_proto::v1::{self, discovery_client::DiscoveryClient, identity_client::IdentityClient, sidecar_message};
use ferry_tests::{
    ControlPlane, Sidecar,
    apps::{GrpcApp, HttpApp, RecordingApp, TcpEchoApp},
    client::{self, header, text},
    eventually,
};
use ferry_tls::{Credentials, Issued, Trust, TrustBundle};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

/// A workload certificate of `service`, signed by the control plane (asked with the admin
/// token), with the trust bundle it verifies against.
async fn certificate(control_plane: &ControlPlane, service: &str) -> (Credentials, Trust) {
    let request = ferry_tls::csr::request(service).expect("a CSR");
    let response = IdentityClient::new(control_plane.channel().await)
        .certify(v1::CertifyRequest { service: service.into(), csr_pem: request.csr_pem, node_id: String::new() })
        .await
        .expect("certified")
        .into_inner();
    let credentials = Credentials::default();
    credentials.set(Issued::from_pem(&response.cert_chain_pem, &request.key_pem).expect("issued"));
    let bundle = response.trust_bundle.expect("a bundle");
    let trust = Trust::new(
        TrustBundle::from_pem(&bundle.trust_domain, &bundle.roots_pem, &bundle.issuer_pem, bundle.version).expect("bundle"),
    );
    (credentials, trust)
}

/// A TLS client config that presents `credentials` (if any) and accepts any server: for
/// looking at what a listener shows and refuses.
fn prying_client(credentials: Option<&Credentials>, trust: &Trust) -> Arc<rustls::ClientConfig> {
    // Requires the server to prove catalog: the listener under test is catalog's.
    let mut config = (*ferry_tls::mesh::client_config(
        credentials.cloned().as_ref().unwrap_or(&Credentials::default()),
        trust,
        Arc::from("spiffe://ferry.local/service/catalog"),
        ferry_tls::mesh::ALPN_HTTP1,
    )
    .expect("config"))
    .clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// `GET /` over TLS to `addr` with `config`: the status, or why it failed.
async fn tls_get(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<u16, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ferry_tls::mesh::server_name("spiffe://ferry.local/service/catalog");
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request =
        http::Request::get("/").header("host", "catalog").body(http_body_util::Empty::<bytes::Bytes>::new()).expect("request");
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

/// The value of a sidecar's `/config` at `pointer`.
async fn config_at(sidecar: &Sidecar, pointer: &str) -> serde_json::Value {
    sidecar.config().await.pointer(pointer).cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_strict_inbound_refuses_plaintext_and_strangers_and_a_permissive_one_takes_plaintext() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let strict = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", "catalog-strict"]).await;
    let inbound = strict.inbound.expect("an inbound listener");

    // Plaintext: refused, with a reason a person can read.
    let plain = client::host_get(inbound, "catalog", "/").await.expect("an answer before the close");
    assert_eq!(plain.0, 403, "{}", text(&plain));
    assert!(header(&plain, "x-ferry-error").starts_with("mtls_required"), "{plain:?}");
    assert_eq!(app.hits(), 0, "nothing reached the app");

    // TLS with no certificate, or one of another mesh: refused in the handshake.
    let (credentials, trust) = certificate(&control_plane, "frontend").await;
    let error = tls_get(inbound, prying_client(None, &trust)).await.expect_err("no client certificate");
    assert!(!error.is_empty());
    let stranger = {
        let now = std::time::SystemTime::now();
        let root = ferry_tls::authority::new_root("ferry.local", now, Duration::from_secs(3600)).expect("root");
        let issuer = ferry_tls::authority::new_issuer(&root, "ferry.local", now, Duration::from_secs(3600)).expect("issuer");
        let request = ferry_tls::csr::request("frontend").expect("csr");
        let identity = ferry_tls::Identity::new("ferry.local", "frontend");
        let leaf = ferry_tls::authority::sign_workload(&issuer, &request.csr_pem, &identity, now, Duration::from_secs(600))
            .expect("leaf");
        let credentials = Credentials::default();
        credentials.set(Issued::from_pem(&leaf.chain_pem, &request.key_pem).expect("issued"));
        credentials
    };
    assert!(tls_get(inbound, prying_client(Some(&stranger), &trust)).await.is_err(), "a certificate of another CA");
    assert_eq!(app.hits(), 0, "nothing reached the app");

    // A mesh identity gets through, and the listener proves catalog's identity whatever SNI
    // and ALPN the client sends (the client above requires it).
    assert_eq!(tls_get(inbound, prying_client(Some(&credentials), &trust)).await, Ok(200));
    if let Some(san) = openssl_san(inbound).await {
        assert!(san.contains("URI:spiffe://ferry.local/service/catalog"), "openssl s_client sees: {san}");
    }

    // Permissive: plaintext reaches the app too, with no identity to pass on.
    let recording = RecordingApp::start("catalog-permissive").await;
    let permissive = Sidecar::start(
        &control_plane.reach(),
        "catalog",
        Some(recording.addr),
        &["--id", "catalog-permissive", "--mtls", "permissive"],
    )
    .await;
    let inbound = permissive.inbound.expect("an inbound listener");
    let mut request =
        http::Request::get("/").header("host", "catalog").header("x-ferry-peer-identity", "spiffe://ferry.local/service/admin");
    request = request.header("user-agent", "plaintext");
    let answer = client::send_h1(inbound, request.body(http_body_util::Empty::new()).expect("request")).await.expect("answered");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    let seen = recording.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].headers.get("x-ferry-peer-identity").is_none(), "a spoofed identity is stripped: {:?}", seen[0].headers);
}

/// What `openssl s_client` shows of the certificate at `addr`: its subject alternative names.
/// `None` when openssl is not installed (the test says so).
async fn openssl_san(addr: SocketAddr) -> Option<String> {
    if std::process::Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl is not installed: skipping the openssl s_client check");
        return None;
    }
    let script = format!(
        "openssl s_client -connect {addr} -servername whatever </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName"
    );
    let output = tokio::process::Command::new("sh").args(["-c", &script]).output().await.ok()?;
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Serves HTTP/1.1 over mesh TLS with `credentials` on a free port, answering `name`.
async fn impostor(credentials: Credentials, trust: Trust, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = ferry_tls::mesh::server_config(&credentials, &trust).expect("config");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |_request: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(name))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// Registers an instance of catalog at `addr` over a config stream of its own, saying it
/// serves mTLS; the stream is held while the sender lives.
async fn pose_as_catalog(control_plane: &ControlPlane, id: &str, addr: SocketAddr) -> mpsc::Sender<v1::SidecarMessage> {
    let (tx, rx) = mpsc::channel(8);
    let instance = v1::Instance {
        id: id.into(),
        service: "catalog".into(),
        address: "127.0.0.1".into(),
        port: u32::from(addr.port()),
        ..Default::default()
    };
    let hello =
        v1::Hello { node_id: id.into(), service: "catalog".into(), instance: Some(instance), mtls: true, ..Default::default() };
    tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Hello(hello)) }).await.expect("queued");
    let mut inbound =
        DiscoveryClient::new(control_plane.channel().await).stream(ReceiverStream::new(rx)).await.expect("opened").into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    tx
}

#[tokio::test]
async fn a_caller_refuses_an_endpoint_that_cannot_prove_the_service_it_stands_for() {
    let control_plane = ControlPlane::start().await;
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &["--upstream", "catalog=127.0.0.1:0"]).await;

    // An address published for catalog, where a payments workload answers: a stolen address.
    let (payments, trust) = certificate(&control_plane, "payments").await;
    let address = impostor(payments, trust.clone(), "payments-app").await;
    let _stream = pose_as_catalog(&control_plane, "catalog-impostor", address).await;
    client.wait_endpoints("catalog", 1).await;
    let answer = client::proxy_get(client.outbound, "http://catalog/").await.expect("answered");
    assert_eq!(answer.0, 502, "{}", text(&answer));
    let error = header(&answer, "x-ferry-error");
    assert!(error.starts_with("upstream_connect_failed"), "{error}");
    assert!(
        error.contains("the peer is spiffe://ferry.local/service/payments, not spiffe://ferry.local/service/catalog"),
        "{error}"
    );

    // The same place proving catalog's identity is served: the check is the identity.
    let (catalog, trust) = certificate(&control_plane, "catalog").await;
    let address = impostor(catalog, trust, "catalog-app").await;
    let _genuine = pose_as_catalog(&control_plane, "catalog-genuine", address).await;
    client.wait_endpoints("catalog", 2).await;
    let served = eventually("a request to reach the genuine catalog", || async {
        let answer = client::proxy_get(client.outbound, "http://catalog/").await.ok()?;
        (answer.0 == 200).then(|| text(&answer))
    })
    .await;
    assert_eq!(served, "catalog-app");
}

/// GETs `url` through `outbound` every 20 ms until `stop`, counting the answers that are not
/// 200.
fn steady_traffic(
    outbound: SocketAddr,
    url: &'static str,
    stop: tokio_util::sync::CancellationToken,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<Vec<String>>) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (ok_count, failed_count) = (ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let mut failures = Vec::new();
        while !stop.is_cancelled() {
            match client::proxy_get(outbound, url).await {
                Ok(answer) if answer.0 == 200 => {
                    ok_count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(answer) => {
                    failed_count.fetch_add(1, Ordering::Relaxed);
                    failures.push(format!("{}: {}", answer.0, header(&answer, "x-ferry-error")));
                }
                Err(error) => {
                    failed_count.fetch_add(1, Ordering::Relaxed);
                    failures.push(error.to_string());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failures
    });
    (ok, failed, task)
}

/// Two catalog instances with their sidecars, and a frontend sidecar that reaches both.
async fn two_catalogs_and_a_client(control_plane: &ControlPlane) -> ([HttpApp; 2], Vec<Sidecar>, Sidecar) {
    let apps = [HttpApp::start("one").await, HttpApp::start("two").await];
    let mut catalogs = Vec::new();
    for (n, app) in apps.iter().enumerate() {
        catalogs
            .push(Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", &format!("catalog-{n}")]).await);
    }
    let client = Sidecar::start(&control_plane.reach(), "frontend", None, &["--upstream", "catalog=127.0.0.1:0"]).await;
    client.wait_endpoints("catalog", 2).await;
    (apps, catalogs, client)
}

#[tokio::test]
async fn certificates_roll_under_steady_traffic_and_no_request_fails() {
    let control_plane = ControlPlane::start_with(&["--cert-ttl", "10s"]).await;
    let (_apps, catalogs, client) = two_catalogs_and_a_client(&control_plane).await;
    let serial = config_at(&catalogs[0], "/identity/serial").await;
    let client_serial = config_at(&client, "/identity/serial").await;

    let stop = tokio_util::sync::CancellationToken::new();
    let (ok, failed, traffic) = steady_traffic(client.outbound, "http://catalog/", stop.clone());
    // 30 s: three lifetimes of 10 s, so every sidecar renews at least three times.
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop.cancel();
    let failures = traffic.await.expect("joins");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests: {failures:?}");
    assert!(ok.load(Ordering::Relaxed) > 300, "traffic flowed: {}", ok.load(Ordering::Relaxed));
    assert_ne!(config_at(&catalogs[0], "/identity/serial").await, serial, "catalog-0's certificate rolled");
    assert_ne!(config_at(&client, "/identity/serial").await, client_serial, "the client's certificate rolled");
    assert!(config_at(&client, "/identity/renewals").await.as_u64().is_some_and(|n| n >= 3), "{}", client.config().await);
    let (_, _, metrics) = client::get(&format!("http://{}/metrics", client.admin)).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    let expiry = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ferry_identity_cert_expiration_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the expiry metric");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!(expiry > now && expiry < now + 11.0, "{expiry} vs {now}");
}

#[tokio::test]
async fn a_ca_rotation_rolls_every_leaf_and_fails_no_request() {
    let control_plane = ControlPlane::start().await;
    let (_apps, catalogs, client) = two_catalogs_and_a_client(&control_plane).await;
    let first_roots = std::fs::read_to_string(control_plane.data_dir.join("ca.pem")).expect("ca.pem");
    let bundle = String::from_utf8(control_plane.ferryctl(&["ca", "bundle"]).await.stdout).expect("text");
    assert_eq!(bundle, first_roots, "ferryctl ca bundle prints ca.pem");

    let stop = tokio_util::sync::CancellationToken::new();
    let (ok, failed, traffic) = steady_traffic(client.outbound, "http://catalog/", stop.clone());
    let rotated = control_plane.ferryctl(&["ca", "rotate"]).await;
    assert!(rotated.status.success(), "{rotated:?}");
    let text = String::from_utf8_lossy(&rotated.stdout);
    assert!(text.contains("2 root(s)"), "{text}");
    // Every sidecar renews within seconds of the new issuer taking over.
    eventually("every sidecar to hold a leaf of the new issuer", || async {
        let status = control_plane.ferryctl(&["-o", "json", "ca", "status"]).await;
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).ok()?;
        (status["sidecars"] == 3 && status["sidecars_current"] == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retired = control_plane.ferryctl(&["ca", "retire"]).await;
    assert!(retired.status.success(), "{retired:?}");
    // The retired bundle reaches every sidecar; traffic goes on under the new root alone.
    eventually("the one-root bundle on every sidecar", || async {
        let mut versions = Vec::new();
        for sidecar in catalogs.iter().chain([&client]) {
            versions.push(config_at(sidecar, "/identity/roots").await.as_u64()?);
        }
        versions.iter().all(|roots| *roots == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let failures = traffic.await.expect("joins");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests: {failures:?}");
    assert!(ok.load(Ordering::Relaxed) > 50);
    let roots = std::fs::read_to_string(control_plane.data_dir.join("ca.pem")).expect("ca.pem");
    assert_ne!(roots, first_roots, "ca.pem holds the new root alone");
    // A new connection after the retirement works: the leaves chain to the new root.
    let fresh =
        Sidecar::start(&control_plane.reach(), "frontend", None, &["--node-id", "fresh", "--upstream", "catalog=127.0.0.1:0"])
            .await;
    fresh.wait_endpoints("catalog", 2).await;
    assert_eq!(client::proxy_get(fresh.outbound, "http://catalog/").await.expect("answered").0, 200);
}

#[tokio::test]
async fn authorization_policies_decide_for_http_grpc_and_tcp_on_the_verified_caller() {
    let control_plane = ControlPlane::start().await;
    let recording = RecordingApp::start("catalog-app").await;
    let grpc = GrpcApp::start().await;
    let echo = TcpEchoApp::start().await;
    let catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(recording.addr), &[]).await;
    let _inventory = Sidecar::start(&control_plane.reach(), "inventory", Some(grpc.addr), &[]).await;
    let _echo = Sidecar::start(&control_plane.reach(), "echo", Some(echo.addr), &[]).await;
    let upstream = ["--upstream", "echo=127.0.0.1:0,protocol=tcp"];
    let frontend = Sidecar::start(&control_plane.reach(), "frontend", None, &upstream).await;
    let batch = Sidecar::start(&control_plane.reach(), "batch", None, &upstream).await;
    for caller in [&frontend, &batch] {
        client::proxy_get(caller.outbound, "http://catalog/").await.expect("subscribes");
        caller.wait_endpoints("echo", 1).await;
    }

    let policies = r#"kind: AuthorizationPolicy
service: catalog
default: deny
rules:
  - name: frontend-reads
    from: [frontend]
    match: { method: GET, path_prefix: /items }
  - name: no-admin
    from: ["*"]
    match: { path_prefix: /items/admin }
    action: deny
---
kind: AuthorizationPolicy
service: inventory
rules:
  - from: [frontend]
---
kind: AuthorizationPolicy
service: echo
rules:
  - from: [frontend]
  - from: [batch]
    match: { method: GET }
"#;
    let answer = control_plane.send_body(http::Method::POST, "/v1/apply", "application/yaml", policies).await.expect("answered");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    let notes: serde_json::Value = serde_json::from_slice(&answer.2).expect("JSON");
    let notes = notes["notes"].to_string();
    assert!(notes.contains("authorization/catalog: no rule can allow its current caller batch"), "{notes}");

    // HTTP: allow, the default, and a deny that wins over an allow.
    let get = |caller: &Sidecar, path: &'static str| {
        let outbound = caller.outbound;
        async move { client::proxy_get(outbound, &format!("http://catalog{path}")).await.expect("answered") }
    };
    let allowed = eventually("catalog's policy in force", || async {
        let answer = get(&frontend, "/items/1").await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!(text(&allowed), "catalog-app");
    let seen = recording.seen();
    let identity =
        seen.last().and_then(|s| s.headers.get("x-ferry-peer-identity")).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(identity.as_deref(), Some("spiffe://ferry.local/service/frontend"), "the app learns who calls");
    let denied = get(&batch, "/items/1").await;
    assert_eq!(denied.0, 403, "{}", text(&denied));
    assert!(header(&denied, "x-ferry-error").starts_with("forbidden"), "{denied:?}");
    assert!(
        text(&denied).contains("spiffe://ferry.local/service/batch may not call catalog: the default (deny)"),
        "{}",
        text(&denied)
    );
    assert!(text(&denied).contains("(version "), "the policy's version is named: {}", text(&denied));
    let admin = get(&frontend, "/items/admin/1").await;
    assert_eq!(admin.0, 403, "a matching deny wins over the matching allow");
    assert!(text(&admin).contains("rules[1] (no-admin)"), "{}", text(&admin));
    let hits = recording.hits();
    let spoofed = client::send_h1(
        frontend.outbound,
        http::Request::get("http://catalog/items/2")
            .header("host", "catalog")
            .header("x-ferry-peer-identity", "spiffe://ferry.local/service/admin")
            .body(http_body_util::Empty::new())
            .expect("request"),
    )
    .await
    .expect("answered");
    assert_eq!(spoofed.0, 200);
    let seen = recording.seen();
    assert_eq!(seen.len(), hits + 1);
    let identity =
        seen.last().and_then(|s| s.headers.get("x-ferry-peer-identity")).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(identity.as_deref(), Some("spiffe://ferry.local/service/frontend"), "a header never decides who calls");

    // gRPC: refused with PERMISSION_DENIED.
    let health = |caller: &Sidecar| {
        let channel = client::grpc_channel(caller.outbound, "inventory");
        async move {
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest { service: "ferry.test.Echo".into() })
                .await
        }
    };
    eventually("inventory's policy in force", || async {
        let status = health(&batch).await.err()?;
        (status.code() == tonic::Code::PermissionDenied).then_some(())
    })
    .await;
    assert!(health(&frontend).await.is_ok(), "frontend may call inventory");

    // TCP: the rule with an HTTP match cannot allow a connection; batch's is closed unechoed.
    let echoed = |caller: &Sidecar| {
        let upstream = caller.upstream("echo");
        async move {
            let mut stream = TcpStream::connect(upstream).await.expect("connects");
            stream.write_all(b"ping").await.ok()?;
            let mut buffer = [0u8; 4];
            match tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buffer)).await {
                Ok(Ok(_)) => Some(buffer == *b"ping"),
                _ => Some(false),
            }
        }
    };
    eventually("echo's policy in force", || async { (echoed(&batch).await == Some(false)).then_some(()) }).await;
    assert_eq!(echoed(&frontend).await, Some(true), "frontend's connection is relayed");

    let (_, _, metrics) = client::get(&format!("http://{}/metrics", catalog.admin)).await.expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.lines().any(|l| l.starts_with("ferry_inbound_authz_total{")
            && l.contains("decision=\"deny\"")
            && l.contains("caller=\"batch\"")),
        "{metrics}"
    );

    // ferryctl explains a decision with the same rules.
    let explain = control_plane.ferryctl(&["explain", "catalog", "--from", "frontend", "--path", "/items/admin/x"]).await;
    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(text.starts_with("DENIED: frontend -> catalog GET /items/admin/x"), "{text}{explain:?}");
    assert!(text.contains("decided by: rules[1] (no-admin)"), "{text}");
    // A request that would be refused is explained, and the exit status says it would fail.
    assert!(!explain.status.success(), "{explain:?}");
    assert!(String::from_utf8_lossy(&explain.stderr).contains("frontend may not make this request"), "{explain:?}");
    let explain = control_plane.ferryctl(&["explain", "catalog", "--from", "frontend", "--path", "/items/3"]).await;
    assert!(String::from_utf8_lossy(&explain.stdout).starts_with("ALLOWED"), "{explain:?}");
    assert!(explain.status.success(), "{explain:?}");
    // A misspelled service is not explained as allowed: it does not exist.
    let explain = control_plane.ferryctl(&["explain", "catalgo", "--from", "frontend"]).await;
    assert_eq!(explain.status.code(), Some(1), "{explain:?}");
    assert!(explain.stdout.is_empty(), "{explain:?}");
    assert!(
        String::from_utf8_lossy(&explain.stderr).contains(r#"there is no service "catalgo" (did you mean "catalog"?)"#),
        "{explain:?}"
    );
}
