//! Routing from the operator's side: `ferryctl apply`, `get`, `history`, `rollback`, `status`
//! (ACK and NACK per sidecar), `explain` against a running sidecar, and the gateway routing
//! requests from outside the mesh by host.

use std::{io::Write, process::Output};

use ferry_proto::v1::{self, discovery_client::DiscoveryClient, sidecar_message::Message};
use ferry_tests::{ControlPlane, Sidecar, apps::HttpApp, binary, client, eventually};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

async fn ferryctl(control_plane: &ControlPlane, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = std::process::Command::new(binary("ferryctl"));
    command.envs(control_plane.ferryctl_env()).args(args);
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        command.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("ferryctl starts");
        if let Some(text) = stdin {
            child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("writes stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("ferryctl runs")
    })
    .await
    .expect("joins")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const POLICY: &str = "kind: ServicePolicy\nservice: catalog\nsubsets: { v1: { version: v1 }, v2: { version: v2 } }\n";

fn route_to(subset: &str) -> String {
    format!("kind: Route\nservice: catalog\nrules:\n  - backends: [ {{ subset: {subset} }} ]\n")
}

/// Starts catalog v1 and v2, each behind a sidecar, and a client sidecar that holds both.
async fn mesh(control_plane: &ControlPlane) -> (HttpApp, HttpApp, Vec<Sidecar>, Sidecar) {
    let (v1, v2) = (HttpApp::start("catalog-v1").await, HttpApp::start("catalog-v2").await);
    let url = control_plane.reach();
    let s1 = Sidecar::start(&url, "catalog", Some(v1.addr), &["--meta", "version=v1", "--id", "catalog-1"]).await;
    let s2 = Sidecar::start(&url, "catalog", Some(v2.addr), &["--meta", "version=v2", "--id", "catalog-2"]).await;
    let client = Sidecar::start(&url, "client", None, &["--node-id", "client-1", "--upstream", "catalog=127.0.0.1:0"]).await;
    client.wait_endpoints("catalog", 2).await;
    (v1, v2, vec![s1, s2], client)
}

async fn served_by(client: &Sidecar) -> String {
    let answer = client::proxy_get(client.outbound, "http://catalog/").await.expect("answered");
    assert_eq!(answer.0, 200, "{}", client::text(&answer));
    client::header(&answer, "x-served-by").to_owned()
}

/// Waits until every request goes to `app` (a route's change has reached the client).
async fn wait_served_by(client: &Sidecar, app: &str) {
    eventually(&format!("requests to reach {app}"), || async {
        for _ in 0..5 {
            if served_by(client).await != app {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test]
async fn apply_get_history_and_rollback_through_ferryctl() {
    let control_plane = ControlPlane::start().await;
    let (_v1, _v2, _servers, client) = mesh(&control_plane).await;

    // A dry run validates on the server and shows the change, but applies nothing.
    let yaml = format!("{POLICY}---\n{}", route_to("v2"));
    let output = ferryctl(&control_plane, &["apply", "-f", "-", "--dry-run"], Some(&yaml)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("route/catalog would be created (dry run)") && text.contains("+  - subset: v2"), "{text}");
    let output = ferryctl(&control_plane, &["get", "routes"], None).await;
    assert_eq!(stdout(&output), "no resources\n");

    // Applied from a file.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("routes.yaml");
    std::fs::write(&file, &yaml).expect("writes");
    let output = ferryctl(&control_plane, &["apply", "-f", &file.display().to_string()], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("route/catalog applied, version"), "{}", stdout(&output));
    wait_served_by(&client, "catalog-v2").await;

    // Invalid input is refused with the document and field, and changes nothing.
    let bad = format!("{POLICY}---\nkind: Route\nservice: catalog\nrules:\n  - backends: [ {{ subset: v1, weight: 20000 }} ]\n");
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(&bad)).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("documents[1].rules[0].backends[0].weight: must be 0..=10000"), "{}", stderr(&output));
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some("kind: Route\nservice: catalog\nrules: [ {\n")).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("documents[0]: not valid YAML"), "{}", stderr(&output));
    assert_eq!(served_by(&client).await, "catalog-v2");

    // The policy cannot go while the route uses its subsets.
    let output = ferryctl(&control_plane, &["delete", "policy", "catalog"], None).await;
    assert_eq!(output.status.code(), Some(1));
    let error = stderr(&output);
    assert!(error.contains("cannot be deleted: subset \"v2\" is used by route/catalog rules[0].backends[0]"), "{error}");

    // A second version, then the history and a rollback to the first.
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(&route_to("v1"))).await;
    assert!(output.status.success(), "{}", stderr(&output));
    wait_served_by(&client, "catalog-v1").await;
    let output = ferryctl(&control_plane, &["-o", "json", "history", "route", "catalog"], None).await;
    let history: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let versions: Vec<u64> =
        history.as_array().expect("entries").iter().map(|e| e["version"].as_u64().expect("version")).collect();
    assert_eq!(versions.len(), 2, "{history}");
    assert!(versions[0] > versions[1], "newest first: {versions:?}");
    // The table shows each version by its last digits, marked as cut; rollback takes that form.
    let output = ferryctl(&control_plane, &["history", "route", "catalog"], None).await;
    let table = stdout(&output);
    let shown: Vec<&str> = table.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    let short = |v: u64| format!("…{}", &v.to_string()[v.to_string().len() - 6..]);
    assert_eq!(shown, vec![short(versions[0]), short(versions[1])], "{table}");
    let output = ferryctl(&control_plane, &["rollback", "route", "catalog", "--to", shown[1]], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains(&format!("rolled back to version {}", versions[1])), "{}", stdout(&output));
    wait_served_by(&client, "catalog-v2").await;

    // get, as YAML that applies again unchanged.
    let output = ferryctl(&control_plane, &["-o", "yaml", "get", "routes", "catalog"], None).await;
    let yaml = stdout(&output);
    assert!(yaml.starts_with("kind: Route\nservice: catalog\n"), "{yaml}");
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(&yaml)).await;
    assert!(stdout(&output).contains("route/catalog unchanged"), "{}", stdout(&output));
    // get -o json prints a list: it applies again unchanged too, and a stale copy is refused on
    // its version, naming its place in the list.
    let output = ferryctl(&control_plane, &["-o", "json", "get", "routes", "catalog"], None).await;
    let json = stdout(&output);
    assert!(json.starts_with('['), "{json}");
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(&json)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("route/catalog unchanged"), "{}", stdout(&output));
    let renamed = "kind: Route\nservice: catalog\nrules:\n  - name: all\n    backends: [ { subset: v2 } ]\n";
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(renamed)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(&json)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let error = stderr(&output);
    assert!(error.contains("documents[0][0].version") && error.contains("nothing was applied"), "{error}");
    // The YAML of before the change, likewise.
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(&yaml)).await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stderr(&output).contains("documents[0].version"), "{}", stderr(&output));

    // Deleting the route sends traffic to every endpoint again. On condition of its version:
    // an old one is refused, the current one's short form from `get` is taken.
    let output = ferryctl(&control_plane, &["delete", "route", "catalog", "--expected-version", &short(versions[1])], None).await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stderr(&output).contains("nothing was deleted"), "{}", stderr(&output));
    let output = ferryctl(&control_plane, &["get", "routes", "catalog"], None).await;
    let table = stdout(&output);
    let current = table.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).expect("the version column").to_owned();
    assert!(current.starts_with('…') && current.chars().count() == 7, "{table}");
    let output = ferryctl(&control_plane, &["delete", "route", "catalog", "--expected-version", &current], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    eventually("both versions to serve again", || async {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(served_by(&client).await);
        }
        (seen.len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn status_shows_per_resource_acks_and_nacks_and_explain_reads_the_sidecars_config() {
    let control_plane = ControlPlane::start().await;
    let (_v1, _v2, _servers, client) = mesh(&control_plane).await;
    let yaml = format!(
        "{POLICY}---\nkind: Route\nservice: catalog\nrules:\n  - name: canary\n    match: {{ path_prefix: /api, headers: {{ x-canary: \"true\" }} }}\n    backends: [ {{ subset: v2 }} ]\n    timeout: 2s\n    retries: {{ attempts: 3, per_try_timeout: 500ms, on: [connect-failure, 503] }}\n  - backends: [ {{ subset: v1, weight: 90 }}, {{ subset: v2, weight: 10 }} ]\n"
    );
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(&yaml)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    // A route to a service with no instance yet is accepted, with a note: sidecars hold it.
    let ghost = "kind: Route\nservice: reports\nrules: [ { backends: [ { service: ghost } ] } ]\n";
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(ghost)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let note = "note: route/reports: service ghost has no instance that can take traffic";
    assert!(stdout(&output).contains(note), "{}", stdout(&output));
    let note = r#"note: route/reports: no instance of "reports" is registered yet"#;
    assert!(stdout(&output).contains(note), "{}", stdout(&output));
    // A typo of a service's name: the closest is named. A subset that matches no instance: the
    // values the instances do have.
    let typo = "kind: Route\nservice: catalgo\nrules: [ { backends: [ { service: catalog } ] } ]\n---\nkind: ServicePolicy\nservice: catalog\nsubsets: { v1: { version: v1 }, v2: { version: v2 }, v3: { version: v3 } }\n";
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(typo)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let shown = stdout(&output);
    assert!(
        shown.contains(r#"note: route/catalgo: no instance of "catalgo" is registered yet; did you mean "catalog"?"#),
        "{shown}"
    );
    assert!(
        shown.contains(
            "note: policy/catalog: subset v3 (version=v3) matches no instance of catalog (its instances have version=v1, v2)"
        ),
        "{shown}"
    );
    assert!(!shown.contains("subset v1 ") && !shown.contains("subset v2 "), "{shown}");
    // Two rules of one name: refused, naming both.
    let twice = "kind: Route\nservice: catalog\nrules:\n  - { name: canary, backends: [ { subset: v2 } ] }\n  - { name: canary, backends: [ { subset: v1 } ] }\n";
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(twice)).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains(r#"rules[1].name: "canary" is also the name of rules[0]"#), "{}", stderr(&output));

    // A sidecar of another build that cannot apply what it is sent: it says so with a NACK.
    let channel = control_plane.channel().await;
    let (to_server, outgoing) = mpsc::channel(8);
    // Queued before the call: the control plane answers the stream once it has the Hello.
    let hello = v1::Hello { node_id: "old-sidecar".into(), service: "legacy".into(), ..Default::default() };
    to_server.send(v1::SidecarMessage { message: Some(Message::Hello(hello)) }).await.expect("sends");
    let subscribe = v1::Subscribe { services: vec!["catalog".into()] };
    to_server.send(v1::SidecarMessage { message: Some(Message::Subscribe(subscribe)) }).await.expect("sends");
    let mut incoming = DiscoveryClient::new(channel).stream(ReceiverStream::new(outgoing)).await.expect("stream").into_inner();
    let nonce = loop {
        let message = incoming.next().await.expect("a message").expect("not an error");
        if let Some(v1::control_message::Message::Push(push)) = message.message {
            break push.nonce;
        }
    };
    let nack =
        v1::Nack { nonce, error: "rules[0].retries.on: this build does not know 503".into(), services: vec!["catalog".into()] };
    to_server.send(v1::SidecarMessage { message: Some(Message::Nack(nack)) }).await.expect("sends");

    let text = eventually("status to show the ACK and the NACK", || async {
        let text = stdout(&ferryctl(&control_plane, &["status"], None).await);
        let route = text.lines().find(|l| l.starts_with("route/catalog"))?;
        (route.contains("rejected") && text.contains("client-1") && route.split_whitespace().nth(2) == Some("1")).then_some(text)
    })
    .await;
    assert!(
        text.contains("route/catalog v")
            && text.contains("rejected by old-sidecar: rules[0].retries.on: this build does not know 503"),
        "{text}"
    );
    let reports = text.lines().find(|l| l.starts_with("route/reports")).expect("listed");
    assert!(reports.ends_with("held"), "{text}");
    assert!(text.contains("service ghost has no instance that can take traffic"), "{text}");
    let output = ferryctl(&control_plane, &["-o", "json", "status"], None).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let route =
        json["resources"].as_array().expect("resources").iter().find(|r| r["resource"] == "route/catalog").expect("route");
    assert_eq!(route["acked"], serde_json::json!(["client-1"]), "{json}");
    assert_eq!(route["rejected"][0]["node_id"], "old-sidecar", "{json}");
    drop(to_server);

    // explain asks the client sidecar, from what it holds.
    let admin = client.admin.to_string();
    let explain = |args: &'static [&'static str]| {
        let mut all = vec!["-o", "json", "explain", "catalog", "--sidecar", admin.as_str()];
        all.extend_from_slice(args);
        let control_plane = &control_plane;
        async move {
            let output = ferryctl(control_plane, &all, None).await;
            assert!(output.status.success(), "{}", stderr(&output));
            serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("JSON")
        }
    };
    let canary = eventually("the client to hold the route", || async {
        let canary = explain(&["--path", "/api/items", "--header", "x-canary=true"]).await;
        (canary["rule"]["label"] == "rules[0] (canary)").then_some(canary)
    })
    .await;
    assert_eq!(canary["backends"][0]["backend"], "catalog/v2", "{canary}");
    assert_eq!(canary["timeout"], "2s", "{canary}");
    assert_eq!(canary["retries"]["attempts"], 3, "{canary}");
    assert_eq!(canary["retries"]["per_try_timeout"], "500ms", "{canary}");
    let split = explain(&["--path", "/api/items"]).await;
    assert_eq!(split["rule"]["index"], 1, "{split}");
    assert_eq!(split["backends"][0]["share_percent"], 90.0, "{split}");
    assert_eq!(split["backends"][1]["routable_endpoints"], 1, "{split}");
    let output = ferryctl(&control_plane, &["explain", "catalog", "--sidecar", &admin, "--path", "/x"], None).await;
    let text = stdout(&output);
    assert!(text.contains("rule:     rules[1]") && text.contains("backend:  catalog/v1 weight 90 (90.0%)"), "{text}");
    // Each rule passed over, with the first condition the request fails.
    assert!(text.contains(r#"not:      rules[0] (canary): path "/x" does not start with "/api""#), "{text}");
    let output = ferryctl(
        &control_plane,
        &["explain", "catalog", "--sidecar", &admin, "--path", "/api/items", "--header", "x-canary=True"],
        None,
    )
    .await;
    let text = stdout(&output);
    assert!(
        text.contains(r#"not:      rules[0] (canary): header x-canary: "True" is not "true" (values are case-sensitive)"#),
        "{text}"
    );
    // The circuit breaker per calling sidecar, and in all, from the control plane's count.
    assert!(
        text.contains("circuit breaker: catalog: 1024 concurrent / 256 pending per calling sidecar (here 0 in flight"),
        "{text}"
    );
    assert!(text.contains(" calls catalog: up to ") && text.contains(" concurrent in all"), "{text}");
    assert!(text.contains("budget:   retries up to 20% of requests + 10/s over 10s"), "{text}");
}

#[tokio::test]
async fn the_gateway_routes_by_host_and_path() {
    let control_plane = ControlPlane::start().await;
    let url = control_plane.reach();
    let (catalog, inventory) = (HttpApp::start("catalog").await, HttpApp::start("inventory").await);
    let _catalog = Sidecar::start(&url, "catalog", Some(catalog.addr), &[]).await;
    let _inventory = Sidecar::start(&url, "inventory", Some(inventory.addr), &[]).await;
    let routes = "kind: Route\nservice: gateway\nrules:\n  - match: { hosts: [shop.example.com], path_prefix: /stock }\n    backends: [ { service: inventory } ]\n    rewrite_path_prefix: /\n  - match: { hosts: [shop.example.com, \"*.shop.example.com\"] }\n    backends: [ { service: catalog } ]\n";
    // No app, no --service. Without a route in force a gateway can route nothing: it is not
    // ready, and says why.
    let gateway = Sidecar::spawn(&url, "gateway", None, &["--gateway"]).await;
    let get = |host: &'static str, path: &'static str| client::host_get(gateway.outbound, host, path);
    let ready = format!("http://{}/ready", gateway.admin);
    let not_ready = eventually("the gateway to say why it is not ready", || async {
        let answer = client::get(&ready).await.ok()?;
        client::text(&answer).contains("no Route for service gateway is applied").then_some(answer)
    })
    .await;
    assert_eq!(not_ready.0, 503);
    let answer = get("shop.example.com", "/items").await.expect("answered");
    assert_eq!(answer.0, 404);
    let error = client::header(&answer, "x-ferry-error");
    assert!(error.contains("gateway has no route in force"), "{error}");

    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(routes)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    gateway.wait_ready().await;

    let answer = eventually("the gateway to route to inventory", || async {
        let answer = get("shop.example.com", "/stock/42").await.ok()?;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!(client::header(&answer, "x-served-by"), "inventory");
    assert_eq!(client::header(&answer, "x-seen-path"), "/42", "the prefix is rewritten");
    let answer = get("eu.shop.example.com:8080", "/items").await.expect("answered");
    assert_eq!((answer.0.as_u16(), client::header(&answer, "x-served-by")), (200, "catalog"), "{}", client::text(&answer));

    // A host the route does not name is not routed, even one that names a mesh service.
    for host in ["other.example.com", "catalog"] {
        let answer = get(host, "/items").await.expect("answered");
        assert_eq!(answer.0, 404, "{host}: {}", client::text(&answer));
        assert!(client::header(&answer, "x-ferry-error").starts_with("no_route"), "{host}");
    }
    assert_eq!(catalog.hits() + inventory.hits(), 2);
}

#[tokio::test]
async fn a_service_that_does_not_exist_is_named_with_the_closest_one_and_fails() {
    let control_plane = ControlPlane::start().await;
    let (_v1, _v2, _sidecars, client) = mesh(&control_plane).await;
    let admin = client.admin.to_string();

    for args in [vec!["instances", "catalgo"], vec!["get", "routes", "catalgo"]] {
        let output = ferryctl(&control_plane, &args, None).await;
        assert!(!output.status.success(), "{args:?}: {output:?}");
        assert!(
            stderr(&output).contains(r#"there is no service "catalgo" in the mesh; did you mean "catalog"?"#),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    // Nothing close: the error says how to list the services.
    let output = ferryctl(&control_plane, &["instances", "zzzzzzzz"], None).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("`ferryctl services` lists them"), "{}", stderr(&output));
    // An existing service with no instance passing is not an error.
    let output = ferryctl(&control_plane, &["instances", "catalog", "--passing"], None).await;
    assert!(output.status.success(), "{}", stderr(&output));

    // explain of a service that does not exist: the error alone, no made-up explanation, and
    // exit 1; as JSON too.
    for args in [vec!["explain", "catalgo", "--sidecar", &admin], vec!["-o", "json", "explain", "catalgo", "--sidecar", &admin]] {
        let output = ferryctl(&control_plane, &args, None).await;
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert_eq!(stdout(&output), "", "{args:?}");
        assert_eq!(
            stderr(&output),
            "error: there is no service \"catalgo\" (did you mean \"catalog\"?); a request to it gets 503 unknown_service\n"
        );
    }
    let output = ferryctl(&control_plane, &["explain", "nowhere", "--sidecar", &admin], None).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(stdout(&output), "");
    assert!(stderr(&output).contains(r#"there is no service "nowhere" ("#), "{}", stderr(&output));
    let output = ferryctl(&control_plane, &["explain", "catalog", "--sidecar", &admin], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("1 sidecar calls catalog"), "{}", stdout(&output));
}

#[tokio::test]
async fn explain_without_from_decides_authorization_for_the_asked_sidecar_as_its_requests_are() {
    let control_plane = ControlPlane::start().await;
    let (_v1, _v2, _servers, client) = mesh(&control_plane).await;
    let url = control_plane.reach();
    let frontend =
        Sidecar::start(&url, "frontend", None, &["--node-id", "frontend-1", "--upstream", "catalog=127.0.0.1:0"]).await;
    frontend.wait_endpoints("catalog", 2).await;
    let lockdown = include_str!("../../examples/routes/lockdown.yaml");
    let output = ferryctl(&control_plane, &["apply", "-f", "-"], Some(lockdown)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    // In force: the client's own request is refused.
    eventually("the lockdown to refuse the client", || async {
        let answer = client::proxy_get(client.outbound, "http://catalog/items").await.ok()?;
        (answer.0 == 403).then_some(())
    })
    .await;

    // explain, asked of the client sidecar, says so: the route, then the authz line, exit 1.
    let admin = client.admin.to_string();
    let output = ferryctl(&control_plane, &["explain", "catalog", "--path", "/items", "--sidecar", &admin], None).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("backend:  catalog"), "{text}");
    assert!(text.contains("authz:    denied for client (this sidecar's identity): decided by the default (deny)"), "{text}");
    assert!(stderr(&output).contains("client may not make this request: it would get 403 forbidden"), "{}", stderr(&output));
    let output =
        ferryctl(&control_plane, &["-o", "json", "explain", "catalog", "--path", "/items", "--sidecar", &admin], None).await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        (json["authorization"]["caller"].as_str(), json["authorization"]["decision"].as_str()),
        (Some("client"), Some("deny"))
    );

    // Asked of a frontend sidecar: allowed by the rule, as frontend's real request is.
    let answer = client::proxy_get(frontend.outbound, "http://catalog/items").await.expect("answered");
    assert_eq!(answer.0, 200, "{}", client::text(&answer));
    let admin = frontend.admin.to_string();
    let output = ferryctl(&control_plane, &["explain", "catalog", "--path", "/items", "--sidecar", &admin], None).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("authz:    allowed for frontend (this sidecar's identity): decided by rules[0] (frontend-only)"),
        "{}",
        stdout(&output)
    );
}
