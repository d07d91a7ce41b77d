//! An authenticated control plane, end to end: what each kind of token may do over HTTP and
//! gRPC, sidecars refused for a service their token does not allow, revocation, `ferryctl`'s
//! token commands, and the errors of a client that speaks TLS wrong.

use std::os::unix::fs::PermissionsExt;

use ferry_proto::v1::{
    self, config_client::ConfigClient, discovery_client::DiscoveryClient, identity_client::IdentityClient,
    registry_client::RegistryClient, sidecar_message, tokens_client::TokensClient,
};
use ferry_tests::{ControlPlane, Sidecar, apps::HttpApp, binary, client::text, eventually};
use ferry_tls::api::Access;
use http::Method;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const ROUTE: &str = "kind: Route\nservice: catalog\nrules:\n  - timeout: 2s\n";

/// The status of `method path` with `token`.
async fn status(
    control_plane: &ControlPlane,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<(&str, &str)>,
) -> u16 {
    let api = control_plane.api().with_token(token);
    let body = body.map(|(content_type, text)| (content_type, bytes::Bytes::from(text.to_owned())));
    let answer = api.call(method.clone(), path, body).await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    answer.0.as_u16()
}

/// A call and what it answers with no token, a read token, catalog's sidecar token, the admin
/// token.
type Row<'a> = (Method, &'a str, Option<(&'a str, &'a str)>, [u16; 4]);

#[tokio::test]
async fn every_kind_of_token_may_do_what_it_should_over_http_and_nothing_else() {
    let control_plane = ControlPlane::start().await;
    let app = HttpApp::start("catalog-app").await;
    let _catalog = Sidecar::start(&control_plane.reach(), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    let read = control_plane.token("read", None).await;
    let sidecar = control_plane.token("sidecar", Some("catalog")).await;
    let admin = control_plane.token.clone().expect("the admin token");
    let api_instance = r#"{"id": "catalog-api", "service": "catalog", "address": "127.0.0.1", "port": 9}"#;
    let payments = r#"{"id": "payments-api", "service": "payments", "address": "127.0.0.1", "port": 9}"#;
    let json = "application/json";
    // (method, path, body, [no token, read, sidecar of catalog, admin])
    let table: Vec<Row> = vec![
        (Method::GET, "/metrics", None, [200, 200, 200, 200]),
        (Method::GET, "/ready", None, [200, 200, 200, 200]),
        (Method::GET, "/v1/services", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/services/catalog", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/instances/catalog-1", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/sidecars", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/routes", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/authorizations", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/ca", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/ca/bundle", None, [401, 200, 403, 200]),
        (Method::GET, "/v1/tokens", None, [401, 403, 403, 200]),
        (Method::POST, "/v1/apply", Some(("application/yaml", ROUTE)), [401, 403, 403, 200]),
        (Method::DELETE, "/v1/routes/catalog", None, [401, 403, 403, 200]),
        (Method::PUT, "/v1/instances", Some((json, api_instance)), [401, 403, 200, 200]),
        (Method::PUT, "/v1/instances", Some((json, payments)), [401, 403, 403, 200]),
        (Method::DELETE, "/v1/instances/payments-api", None, [401, 403, 403, 200]),
        (Method::DELETE, "/v1/instances/catalog-api", None, [401, 403, 200, 404]),
        // Its sidecar's: only an admin deletes it through the API, and only with force.
        (Method::DELETE, "/v1/instances/catalog-1", None, [401, 403, 403, 409]),
        (Method::DELETE, "/v1/instances/catalog-1?force=true", None, [401, 403, 403, 200]),
    ];
    let tokens = [None, Some(read.as_str()), Some(sidecar.as_str()), Some(admin.as_str())];
    for (method, path, body, expected) in table {
        for (token, expected) in tokens.iter().zip(expected) {
            let got = status(&control_plane, *token, method.clone(), path, body).await;
            let who = ["no token", "read", "sidecar(catalog)", "admin"][tokens.iter().position(|t| t == token).unwrap_or(0)];
            assert_eq!(got, expected, "{method} {path} with {who}");
        }
    }
    // An unknown token is refused as no token is, and says so.
    let answer =
        control_plane.api().with_token(Some("ferry_guess")).call(Method::GET, "/v1/services", None).await.expect("answered");
    assert_eq!(answer.0, 401);
    assert!(text(&answer).contains("not known"), "{}", text(&answer));
    assert_eq!(answer.1.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));

    // The metrics count what was refused and what the CA signed: the table's tokenless calls
    // (17 of its rows need a token) and the guess above; catalog's certificate.
    let metrics = control_plane.api().with_token(None).call(Method::GET, "/metrics", None).await.expect("metrics");
    let metrics = text(&metrics);
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
    };
    assert_eq!(value("ferry_api_unauthenticated_total"), 18.0);
    assert!(value("ferry_certificates_issued_total") >= 1.0);
    assert!(value("ferry_ca_issuer_expiration_timestamp_seconds") > 1.7e9);
    assert_eq!(value("ferry_trust_bundle_version"), 1.0);
}

/// What a gRPC call with `token` answers: `None` when it succeeded, else its code.
type Code = Option<tonic::Code>;

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    result.err().map(|status| status.code())
}

#[tokio::test]
async fn every_kind_of_token_may_do_what_it_should_over_grpc_and_nothing_else() {
    let control_plane = ControlPlane::start().await;
    let read = control_plane.token("read", None).await;
    let sidecar = control_plane.token("sidecar", Some("catalog")).await;
    let admin = control_plane.token.clone().expect("the admin token");
    let access = |token: Option<&str>| Access { token: token.map(str::to_owned), ..control_plane.access() };
    let tokens = [None, Some(read.as_str()), Some(sidecar.as_str()), Some(admin.as_str())];
    let mut results: Vec<[Code; 7]> = Vec::new();
    for token in tokens {
        let channel = access(token).connect().await.expect("connects");
        let list = code(RegistryClient::new(channel.clone()).list_services(v1::ListServicesRequest {}).await);
        let instance = v1::Instance { service: "catalog".into(), address: "127.0.0.1".into(), port: 9, ..Default::default() };
        let register =
            code(RegistryClient::new(channel.clone()).register(v1::RegisterRequest { instance: Some(instance) }).await);
        let resources = ferry_proto::json::resources_from_yaml(ROUTE).expect("valid");
        let items = resources.into_iter().map(|r| v1::ApplyItem { resource: Some(r), expected_version: None }).collect();
        let apply = code(ConfigClient::new(channel.clone()).apply(v1::ApplyRequest { items, dry_run: true }).await);
        let csr = ferry_tls::csr::request("catalog").expect("csr");
        let certify = code(
            IdentityClient::new(channel.clone())
                .certify(v1::CertifyRequest { service: "catalog".into(), csr_pem: csr.csr_pem.clone(), node_id: String::new() })
                .await,
        );
        let certify_other = code(
            IdentityClient::new(channel.clone())
                .certify(v1::CertifyRequest { service: "payments".into(), csr_pem: csr.csr_pem, node_id: String::new() })
                .await,
        );
        let tokens = code(TokensClient::new(channel.clone()).list(v1::ListTokensRequest {}).await);
        let (tx, rx) = mpsc::channel(4);
        let hello = v1::Hello { node_id: "n-1".into(), service: "catalog".into(), ..Default::default() };
        tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Hello(hello)) }).await.expect("queued");
        let stream = code(DiscoveryClient::new(channel).stream(ReceiverStream::new(rx)).await);
        results.push([list, register, apply, certify, certify_other, tokens, stream]);
    }
    use tonic::Code::{PermissionDenied as Denied, Unauthenticated as Unauth};
    let expected: [[Code; 7]; 4] = [
        [Some(Unauth); 7],
        [None, Some(Denied), Some(Denied), Some(Denied), Some(Denied), Some(Denied), Some(Denied)],
        [Some(Denied), None, Some(Denied), None, Some(Denied), Some(Denied), None],
        [None, None, None, None, None, None, None],
    ];
    for (who, (got, expected)) in ["no token", "read", "sidecar(catalog)", "admin"].iter().zip(results.iter().zip(expected)) {
        assert_eq!(got, &expected, "{who}: list, register, apply, certify, certify another, tokens, stream");
    }
    // Health stays open.
    let channel = access(None).endpoint().expect("endpoint").connect().await.expect("connects");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await;
    assert!(health.is_ok(), "{health:?}");
}

#[tokio::test]
async fn a_sidecar_whose_token_is_another_services_is_refused_and_registers_nothing() {
    let control_plane = ControlPlane::start().await;
    let token = control_plane.token("sidecar", Some("catalog")).await;
    let app = HttpApp::start("payments-app").await;
    let reach = control_plane.reach_with(&token);
    let payments = Sidecar::spawn(&reach, "payments", Some(app.addr), &["--id", "payments-1"]).await;
    let why = eventually("the sidecar to say why it is not ready", || async {
        let (status, _, body) = ferry_tests::client::get(&format!("http://{}/ready", payments.admin)).await.ok()?;
        let body = String::from_utf8_lossy(&body).into_owned();
        (status == 503 && body.contains("PermissionDenied")).then_some(body)
    })
    .await;
    assert!(why.contains("\"payments\"") && why.contains("\"catalog\" only"), "{why}");
    assert!(payments.process.log().contains("PermissionDenied"), "it logs why");
    assert!(control_plane.instance("payments-1").await.is_none(), "nothing was registered");

    // The right token in its file fixes it: it retries with backoff, reading the file again.
    let token = control_plane.token("sidecar", Some("payments")).await;
    std::fs::write(reach.token_file.as_ref().expect("a token file"), &token).expect("fixes the token");
    payments.wait_ready().await;
    control_plane.wait_passing("payments", 1).await;
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn ferryctl_makes_lists_and_revokes_tokens_and_a_revoked_token_ends_its_stream() {
    let control_plane = ControlPlane::start().await;
    let admin_file = control_plane.data_dir.join("admin.token");
    assert_eq!(std::fs::metadata(&admin_file).expect("admin.token").permissions().mode() & 0o777, 0o600);
    assert!(!control_plane.process.log().contains(control_plane.token.as_deref().expect("token")), "the secret is never logged");

    let created = control_plane.ferryctl(&["token", "create", "--kind", "sidecar", "--service", "catalog"]).await;
    assert!(created.status.success(), "{created:?}");
    let secret = stdout(&created);
    assert_eq!(secret.lines().count(), 1, "the secret alone: {secret}");
    let secret = secret.trim().to_owned();
    let missing = control_plane.ferryctl(&["token", "create", "--kind", "sidecar"]).await;
    assert!(!missing.status.success() && stderr(&missing).contains("--service"), "{missing:?}");

    let app = HttpApp::start("catalog-app").await;
    let catalog = Sidecar::start(&control_plane.reach_with(&secret), "catalog", Some(app.addr), &["--id", "catalog-1"]).await;
    let listed = control_plane.ferryctl(&["-o", "json", "token", "list"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let id = listed["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["service"] == "catalog")
        .and_then(|t| t["id"].as_str())
        .expect("the sidecar token")
        .to_owned();
    assert!(!listed.to_string().contains(&secret), "a listing never shows a secret");

    let revoked = control_plane.ferryctl(&["token", "revoke", &id]).await;
    assert!(revoked.status.success(), "{revoked:?}");
    eventually("the stream to end", || async {
        let config = catalog.config().await;
        let error = config["control_plane"]["last_error"].as_str().unwrap_or_default().to_owned();
        (config["control_plane"]["connected"] == false && error.contains("Unauthenticated")).then_some(())
    })
    .await;
    control_plane.wait_health("catalog-1", "HEALTH_CRITICAL").await;

    // ferryctl without a token, or with a read token for a change, is told why.
    let output = tokio::process::Command::new(binary("ferryctl"))
        .envs(control_plane.ferryctl_env().into_iter().filter(|(k, _)| *k != "FERRY_TOKEN"))
        .arg("services")
        .output()
        .await
        .expect("runs");
    assert!(stderr(&output).contains("not authenticated: this control plane needs a token"), "{output:?}");
    let read = control_plane.token("read", None).await;
    let output = tokio::process::Command::new(binary("ferryctl"))
        .envs(control_plane.ferryctl_env())
        .env("FERRY_TOKEN", read)
        .args(["delete", "route", "catalog"])
        .output()
        .await
        .expect("runs");
    assert!(stderr(&output).contains("permission denied: deleting resources needs an admin token"), "{output:?}");
}

#[tokio::test]
async fn a_client_speaking_tls_wrong_is_told_what_to_change() {
    let control_plane = ControlPlane::start().await;
    // Plaintext to the TLS listener: the control plane answers it.
    let plain = tokio::process::Command::new(binary("ferryctl"))
        .envs(control_plane.ferryctl_env())
        .env("FERRY_CONTROL_PLANE", format!("http://{}", control_plane.grpc))
        .arg("services")
        .output()
        .await
        .expect("runs");
    assert!(stderr(&plain).contains("serves TLS") && stderr(&plain).contains("use https://"), "{plain:?}");
    let curl_like = ferry_tests::client::get(&format!("http://{}/v1/services", control_plane.http)).await.expect("answered");
    assert_eq!(curl_like.0, 400);
    assert!(text(&curl_like).contains("this listener speaks TLS: use https://"), "{}", text(&curl_like));
    // No CA file for https: a usage error naming the flag.
    let no_ca = tokio::process::Command::new(binary("ferryctl"))
        .envs(control_plane.ferryctl_env().into_iter().filter(|(k, _)| *k != "FERRY_CA_FILE"))
        .arg("services")
        .output()
        .await
        .expect("runs");
    assert_eq!(no_ca.status.code(), Some(64), "{no_ca:?}");
    assert!(stderr(&no_ca).contains("--ca-file"), "{no_ca:?}");

    // TLS to a plaintext control plane (--api-tls off): ferryctl says so.
    let plaintext = ControlPlane::start_with(&["--api-tls", "off"]).await;
    let output = tokio::process::Command::new(binary("ferryctl"))
        .envs(plaintext.ferryctl_env())
        .env("FERRY_CONTROL_PLANE", format!("https://{}", plaintext.grpc))
        .env("FERRY_CA_FILE", control_plane.ca_file.as_ref().expect("a CA file"))
        .arg("services")
        .output()
        .await
        .expect("runs");
    assert!(stderr(&output).contains("it does not speak TLS"), "{output:?}");
    assert!(plaintext.process.log().contains("--api-tls off"), "it warns at start");

    // --auth none: a warning at start, and calls need no token.
    let open = ControlPlane::start_with(&["--auth", "none"]).await;
    assert!(open.process.log().contains("--auth none"), "{}", open.process.log());
    let answer = open.api().with_token(None).call(Method::GET, "/v1/services", None).await.expect("answered");
    assert_eq!(answer.0, 200);
}
