//! Hostile input: each is sent to the real binaries, which must stay up, refuse it with an error
//! naming the field and the limit, and keep everything already stored.

use std::{net::SocketAddr, time::Duration};

use ferry_proto::v1::{self, discovery_client::DiscoveryClient, sidecar_message};
use ferry_tests::{
    ControlPlane, Sidecar,
    apps::HttpApp,
    client::{self, header, text},
    eventually,
};
use http::Method;
use tokio::{io::AsyncReadExt, net::TcpStream, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// The routes the control plane holds, as JSON text.
async fn routes(control_plane: &ControlPlane) -> String {
    text(&control_plane.get("/v1/routes").await.expect("answered"))
}

/// The control plane still answers.
async fn alive(control_plane: &ControlPlane) {
    let answer = control_plane.get("/ready").await.expect("the control plane is up");
    assert_eq!(answer.0, 200);
}

#[tokio::test]
async fn a_billion_laughs_is_refused_at_once_and_changes_nothing() {
    let control_plane = ControlPlane::start().await;
    control_plane.apply("kind: Route\nservice: catalog\nrules:\n  - timeout: 2s\n").await;
    let before = routes(&control_plane).await;
    let mut laughs = String::from("kind: Route\nservice: catalog\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..110 {
        let refs = vec![format!("*a{}", i - 1); 100].join(",");
        laughs.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    assert!(laughs.len() > 50_000);
    let started = std::time::Instant::now();
    let answer = control_plane.send_body(Method::POST, "/v1/apply", "application/yaml", &laughs).await.expect("answered");
    let took = started.elapsed();
    assert_eq!(answer.0, 400, "{}", text(&answer));
    assert!(text(&answer).contains("YAML aliases (*name) are not accepted"), "{}", text(&answer));
    assert!(took < Duration::from_secs(1), "refused in {took:?}");
    let put = control_plane.send_body(Method::PUT, "/v1/routes/catalog", "application/yaml", &laughs).await.expect("answered");
    assert_eq!(put.0, 400, "{}", text(&put));
    alive(&control_plane).await;
    assert_eq!(routes(&control_plane).await, before, "nothing stored changed");

    // Bodies must say what they are: no form posts from a browser.
    for content_type in ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data"] {
        let answer = control_plane
            .send_body(Method::POST, "/v1/apply", content_type, "kind: Route\nservice: catalog\n")
            .await
            .expect("answered");
        assert_eq!(answer.0, 415, "{content_type}: {}", text(&answer));
        assert!(text(&answer).contains("application/yaml"), "{}", text(&answer));
    }
}

#[tokio::test]
async fn registrations_beyond_a_limit_are_refused_naming_it() {
    let control_plane = ControlPlane::start_with(&[
        "--max-instances-per-service",
        "2",
        "--max-metadata-bytes",
        "64",
        "--max-checks",
        "1",
        "--max-header-rules",
        "2",
    ])
    .await;
    let control_plane = &control_plane;
    let put = |json: String| async move { control_plane.send_json(Method::PUT, "/v1/instances", &json).await.expect("answered") };
    let instance =
        |id: &str, extra: &str| format!(r#"{{"id": "{id}", "service": "db", "address": "127.0.0.1", "port": 5432{extra}}}"#);
    assert_eq!(put(instance("db-1", "")).await.0, 200);
    assert_eq!(put(instance("db-2", "")).await.0, 200);
    let refused = put(instance("db-3", "")).await;
    assert_eq!(refused.0, 400, "{}", text(&refused));
    assert!(text(&refused).contains("--max-instances-per-service"), "{}", text(&refused));
    assert_eq!(put(instance("db-2", r#", "weight": 5"#)).await.0, 200, "an instance already there may change");

    let big = format!(r#", "metadata": {{"note": "{}"}}"#, "x".repeat(100));
    let refused = put(instance("db-1", &big)).await;
    assert_eq!(refused.0, 400);
    assert!(
        text(&refused).contains("\"field\":\"metadata\"") && text(&refused).contains("--max-metadata-bytes"),
        "{}",
        text(&refused)
    );
    let checks = r#", "checks": [{"tcp": {}}, {"ttl": {"ttl": "30s"}}]"#;
    let refused = put(instance("db-1", checks)).await;
    assert_eq!(refused.0, 400);
    assert!(text(&refused).contains("--max-checks"), "{}", text(&refused));
    let listed = control_plane.get("/v1/services/db").await.expect("answered");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&listed.2).expect("JSON")["instances"].as_array().map(Vec::len),
        Some(2)
    );

    // Header conditions of a route, counted across its rules.
    let route =
        "kind: Route\nservice: catalog\nrules:\n  - match: { headers: { a: '1', b: '2' } }\n  - match: { header_present: [c] }\n";
    let refused = control_plane.send_body(Method::POST, "/v1/apply", "application/yaml", route).await.expect("answered");
    assert_eq!(refused.0, 400);
    let error: serde_json::Value = serde_json::from_slice(&refused.2).expect("JSON");
    assert_eq!(error["field"], "documents[0].rules[1].match.header_present[0]", "{error}");
    assert!(error["error"].as_str().unwrap_or_default().contains("more than 2 header conditions"), "{error}");

    // A check of a cloud metadata address.
    let imds = r#", "checks": [{"http": {"url": "http://169.254.169.254/latest/meta-data/"}}]"#;
    let refused = put(instance("db-1", imds)).await;
    assert_eq!(refused.0, 400);
    assert!(
        text(&refused).contains("checks[0].http.url") && text(&refused).contains("--allow-check-target"),
        "{}",
        text(&refused)
    );
    alive(control_plane).await;
}

#[tokio::test]
async fn a_push_sidecars_would_refuse_is_never_built() {
    let control_plane = ControlPlane::start_with(&["--max-push-bytes", "65536"]).await;
    // 60 labels of about 250 bytes: 15 KB of metadata per instance, four of them fit.
    let labels: Vec<String> = (0..60).map(|i| format!(r#""k{i}": "{}""#, "v".repeat(240))).collect();
    let metadata = format!("{{{}}}", labels.join(", "));
    let mut refused = None;
    for n in 0..8 {
        let json =
            format!(r#"{{"id": "big-{n}", "service": "big", "address": "127.0.0.1", "port": 80, "metadata": {metadata}}}"#);
        let answer = control_plane.send_json(Method::PUT, "/v1/instances", &json).await.expect("answered");
        if answer.0 != 200 {
            refused = Some((n, answer));
            break;
        }
    }
    let (n, answer) = refused.expect("a registration refused before eight");
    assert!(n >= 3, "the first few fit");
    assert_eq!(answer.0, 400);
    assert!(text(&answer).contains("--max-push-bytes"), "{}", text(&answer));
    // What was taken is pushed, and a sidecar takes it.
    let client = Sidecar::start(&control_plane.reach(), "caller", None, &["--upstream", "big=127.0.0.1:0"]).await;
    client.wait_endpoints("big", n).await;
}

/// Opens a config stream with `hello`, returns its sender and receiver.
async fn stream(
    control_plane: &ControlPlane,
    hello: v1::Hello,
) -> (mpsc::Sender<v1::SidecarMessage>, tonic::Streaming<v1::ControlMessage>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Hello(hello)) }).await.expect("queued");
    let inbound =
        DiscoveryClient::new(control_plane.channel().await).stream(ReceiverStream::new(rx)).await.expect("opened").into_inner();
    (tx, inbound)
}

#[tokio::test]
async fn streams_are_bounded_in_subscriptions_and_nack_text() {
    let control_plane = ControlPlane::start_with(&["--max-subscriptions", "2", "--max-nack-bytes", "100"]).await;
    let hello = |node: &str| v1::Hello { node_id: node.into(), service: "greedy".into(), ..Default::default() };
    let (tx, mut inbound) = stream(&control_plane, hello("greedy-1")).await;
    let services = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
    tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Subscribe(v1::Subscribe { services })) })
        .await
        .expect("sent");
    let ended = loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a reason"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::ResourceExhausted);
    assert!(ended.message().contains("at most 2 subscriptions"), "{}", ended.message());

    // A NACK's text is kept, cut to the limit.
    let (tx, mut inbound) = stream(&control_plane, hello("chatty-1")).await;
    inbound.message().await.expect("ok").expect("welcome");
    let push = inbound.message().await.expect("ok").expect("the first push");
    let Some(v1::control_message::Message::Push(push)) = push.message else { panic!("a push") };
    let nack = v1::Nack { nonce: push.nonce, error: "x".repeat(100_000), services: Vec::new() };
    tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Nack(nack)) }).await.expect("sent");
    let stored = eventually("the NACK to be recorded", || async {
        let answer = control_plane.get("/v1/sidecars").await.ok()?;
        let body: serde_json::Value = serde_json::from_slice(&answer.2).ok()?;
        let sidecar = body["sidecars"].as_array()?.iter().find(|s| s["node_id"] == "chatty-1")?.clone();
        sidecar["last_nack"]["error"].as_str().map(str::to_owned)
    })
    .await;
    assert!(stored.len() <= 100, "kept {} bytes", stored.len());
    alive(&control_plane).await;
}

#[tokio::test]
async fn a_checks_output_is_kept_short() {
    let control_plane = ControlPlane::start().await;
    // An "app" that answers its check with a long body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                let _ = stream.read(&mut buffer).await;
                let body = "y".repeat(3000);
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes()).await;
            });
        }
    });
    let json = format!(
        r#"{{"id": "chatty", "service": "chatty", "address": "127.0.0.1", "port": {}, "checks": [{{"http": {{"url": "/"}}, "interval": "200ms"}}]}}"#,
        addr.port()
    );
    let answer = control_plane.send_json(Method::PUT, "/v1/instances", &json).await.expect("answered");
    assert_eq!(answer.0, 200, "{}", text(&answer));
    let instance = control_plane.wait_health("chatty", "HEALTH_PASSING").await;
    let output = instance["checks"][0]["output"].as_str().unwrap_or_default().to_owned();
    assert!(!output.is_empty() && output.len() <= 256, "{} bytes: {output}", output.len());
}

#[tokio::test]
async fn an_x_ferry_error_from_an_upstream_that_is_no_sidecar_is_not_trusted() {
    let control_plane = ControlPlane::start().await;
    // Plain upstreams registered through the API, answering as if a sidecar said the app was
    // unreachable: a caller would retry that on another instance whatever the method.
    let mut hits = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = counter.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    let _ = stream.read(&mut buffer).await;
                    let answer = "HTTP/1.1 502 Bad Gateway\r\nx-ferry-error: app_unreachable: made up\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, answer.as_bytes()).await;
                });
            }
        });
        let json = format!(r#"{{"service": "legacy", "address": "127.0.0.1", "port": {}}}"#, addr.port());
        assert_eq!(control_plane.send_json(Method::PUT, "/v1/instances", &json).await.expect("answered").0, 200);
        hits.push(counter);
    }
    let client = Sidecar::start(&control_plane.reach(), "caller", None, &["--upstream", "legacy=127.0.0.1:0"]).await;
    client.wait_endpoints("legacy", 2).await;
    let request = http::Request::post("/orders").header("host", "legacy").body(http_body_util::Empty::new()).expect("request");
    let answer = client::send_h1(client.upstream("legacy"), request).await.expect("answered");
    assert_eq!(answer.0, 502);
    assert_eq!(header(&answer, "x-ferry-error"), "", "not passed on as the mesh's own word");
    assert_eq!(header(&answer, "x-ferry-upstream-error"), "app_unreachable: made up");
    let total: u64 = hits.iter().map(|h| h.load(std::sync::atomic::Ordering::SeqCst)).sum();
    assert_eq!(total, 1, "the POST was not retried on the strength of an untrusted header");
}

/// Whether the server closes a connection that sends nothing, within `limit`.
async fn closes_an_idle_connection(addr: SocketAddr, limit: Duration) -> bool {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let mut buffer = [0u8; 64];
    matches!(tokio::time::timeout(limit, stream.read(&mut buffer)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn idle_clients_are_cut_off_and_connections_are_capped() {
    let control_plane = ControlPlane::start_with(&["--handshake-timeout", "1s", "--max-connections", "2"]).await;
    assert!(closes_an_idle_connection(control_plane.http, Duration::from_secs(5)).await, "the HTTP API");
    assert!(closes_an_idle_connection(control_plane.grpc, Duration::from_secs(5)).await, "the gRPC API");
    let app = HttpApp::start("catalog-app").await;
    let catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--handshake-timeout", "1s"]).await;
    assert!(closes_an_idle_connection(catalog.inbound.expect("inbound"), Duration::from_secs(5)).await, "the inbound listener");

    // Two connections held open: a third waits for a place, then is served.
    let config =
        ferry_tls::api::http_client_config(&std::fs::read_to_string(control_plane.ca_file.as_ref().expect("CA")).expect("CA"))
            .expect("config");
    let http = control_plane.http;
    let connect = move |config: std::sync::Arc<rustls::ClientConfig>| async move {
        let stream = TcpStream::connect(http).await.expect("connects");
        let name = rustls::pki_types::ServerName::IpAddress(http.ip().into());
        tokio_rustls::TlsConnector::from(config).connect(name, stream).await
    };
    let held = [connect(config.clone()).await.expect("first"), connect(config.clone()).await.expect("second")];
    let third = tokio::spawn(connect(config.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "the third waits while two are open");
    drop(held);
    let third = tokio::time::timeout(Duration::from_secs(5), third).await.expect("served once a place is free").expect("joins");
    assert!(third.is_ok(), "{third:?}");
}
