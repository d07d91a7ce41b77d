//! Transparent interception inside network namespaces: apps that know nothing of Ferry (curl, a
//! gRPC client, a TCP client) call services by plain name or by an instance's address, and the
//! sidecars route, balance, retry and encrypt their traffic.
//!
//! The lab: a hub namespace with the bridge and the control plane (and a server outside the
//! mesh); `cat1` and `cat2`, two instances of `catalog` (HTTP and gRPC on port 8080); `db`, a
//! server that speaks first on 3306; `client` and `denied`, sidecars without an app (the second
//! with `--outbound-policy deny`). Every host but the hub runs `ferry-sidecar iptables install`
//! and a sidecar with `--intercept` as the group the rules exempt.
//!
//! Needs root; elsewhere it says it skips and passes.

use std::{collections::BTreeSet, net::SocketAddr};

use ferry_tests::{
    PATIENCE, Process, eventually,
    netns::{Lab, PROXY_GID, must_skip},
};

/// The port the catalog instances (and their gRPC health) listen on.
const CATALOG_PORT: u16 = 8080;

struct Mesh {
    lab: Lab,
    url: String,
    data_dir: std::path::PathBuf,
    _processes: Vec<Process>,
}

impl Mesh {
    fn args(&self) -> Vec<String> {
        let data = &self.data_dir;
        vec![
            "--control-plane".into(),
            self.url.clone(),
            "--ca-file".into(),
            data.join("ca.pem").display().to_string(),
            "--token-file".into(),
            data.join("admin.token").display().to_string(),
        ]
    }

    /// `iptables install` in `host`, then its sidecar, intercepting.
    async fn sidecar(&mut self, host: &str, service: &str, extra: &[&str]) {
        self.sidecar_as(host, service, extra, Some(PROXY_GID)).await;
    }

    /// The same, the sidecar running as group `gid` (by default root's).
    async fn sidecar_as(&mut self, host: &str, service: &str, extra: &[&str], gid: Option<u32>) {
        let install = [
            "iptables",
            "install",
            "--proxy-gid",
            "1337",
            "--capture-dns",
            "--skip-inbound-ports",
            "2222",
            "--control-plane",
            &self.url,
        ];
        let sidecar = ferry_tests::binary("ferry-sidecar");
        let output = self.lab.run(host, &sidecar.display().to_string(), &install).await;
        assert!(output.status.success(), "iptables install in {host}: {}", String::from_utf8_lossy(&output.stderr));
        let mut args = self.args();
        args.extend(["--service".into(), service.into(), "--intercept".into(), "--id".into(), host.into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = self.lab.start(host, &format!("sidecar {host}"), "ferry-sidecar", &args, gid).await;
        self._processes.push(process);
    }

    async fn app(&mut self, host: &str, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let process = self.lab.start(host, &format!("app {host}"), "ferry-test-app", &args, None).await;
        self._processes.push(process);
    }

    /// `curl -s URL` in `host`: the status and the body.
    async fn curl(&self, host: &str, url: &str, headers: &[&str]) -> (u16, String) {
        let mut args = vec!["-s", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"];
        for header in headers {
            args.extend(["-H", header]);
        }
        args.push(url);
        let output = self.lab.run(host, "curl", &args).await;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().parse().unwrap_or(0), body.trim().to_owned())
    }

    async fn ferryctl(&self, args: &[&str]) -> String {
        let ferryctl = ferry_tests::binary("ferryctl").display().to_string();
        let mut command = self.lab.command("hub", &ferryctl, args);
        command
            .env("FERRY_CONTROL_PLANE", &self.url)
            .env("FERRY_CA_FILE", self.data_dir.join("ca.pem"))
            .env("FERRY_TOKEN", std::fs::read_to_string(self.data_dir.join("admin.token")).expect("the admin token").trim());
        let output = tokio::time::timeout(PATIENCE, command.output()).await.expect("ferryctl ends").expect("ferryctl runs");
        assert!(output.status.success(), "ferryctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    async fn apply(&self, yaml: &str) {
        let file = self.data_dir.join(format!("apply-{}.yaml", yaml.len()));
        std::fs::write(&file, yaml).expect("writes the resources");
        self.ferryctl(&["apply", "-f", &file.display().to_string()]).await;
    }

    async fn metrics(&self, host: &str) -> String {
        self.curl(host, "http://127.0.0.1:15000/metrics", &[]).await.1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_apps_are_meshed_inside_network_namespaces() {
    if must_skip("the interception tests") {
        return;
    }
    let lab = Lab::new(&["client", "denied", "cat1", "cat2", "db", "looped"]);
    let hub = lab.ip("hub");
    let dir = tempfile::tempdir().expect("temporary directory");
    let data_dir = dir.path().to_path_buf();
    let control_plane = lab
        .start(
            "hub",
            "control-plane",
            "ferry-control-plane",
            &[
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--grpc".into(),
                format!("{hub}:0"),
                "--http".into(),
                format!("{hub}:0"),
                "--dns".into(),
                "127.0.0.1:0".into(),
            ],
            None,
        )
        .await;
    let url = format!("https://{}", control_plane.addr("grpc"));
    let outside =
        lab.start("hub", "outside", "ferry-test-app", &["http".into(), format!("{hub}:0"), "outside".into()], None).await;
    let outside: SocketAddr = outside_addr(&outside);
    let hub6 = lab.ip6("hub");
    let outside6 = lab
        .start("hub", "outside-v6", "ferry-test-app", &["http".into(), format!("[{hub6}]:0"), "outside-v6".into()], None)
        .await;
    let outside6: SocketAddr = outside_addr(&outside6);
    let mut mesh = Mesh { lab, url, data_dir, _processes: vec![control_plane] };
    // Every host resolves through a nameserver the rules hand to its sidecar.
    for host in ["client", "denied", "cat1", "cat2", "db", "looped"] {
        mesh.lab.resolv_conf(host, &format!("nameserver {hub}\n"));
    }

    let catalog = CATALOG_PORT.to_string();
    for (host, version) in [("cat1", "v1"), ("cat2", "v2")] {
        mesh.app(host, &["http", &format!("127.0.0.1:{catalog}"), host]).await;
        let meta = format!("version={version}");
        let app = format!("127.0.0.1:{catalog}");
        // cat1 also takes plaintext, so a caller outside the mesh can show where inbound
        // connections land.
        let mtls = if host == "cat1" { "permissive" } else { "strict" };
        mesh.sidecar(host, "catalog", &["--app", &app, "--meta", &meta, "--mtls", mtls]).await;
    }
    // Another port of cat1's app, one it keeps to itself on loopback, and one the rules skip.
    mesh.app("cat1", &["http", "0.0.0.0:9090", "cat1-other-port"]).await;
    mesh.app("cat1", &["http", "127.0.0.1:9091", "cat1-private"]).await;
    mesh.app("cat1", &["http", "0.0.0.0:2222", "cat1-skipped"]).await;
    mesh.app("db", &["banner", "127.0.0.1:3306", "db-says-hello"]).await;
    // Opaque by its policy alone; permissive, so a plaintext caller outside the mesh gets in.
    mesh.sidecar("db", "db", &["--app", "127.0.0.1:3306", "--mtls", "permissive"]).await;
    // The client waits a minute to detect a protocol: a connection that had to wait for it
    // would fail the test.
    mesh.sidecar("client", "client", &["--detect-timeout", "60s"]).await;
    mesh.sidecar("denied", "denied", &["--outbound-policy", "deny"]).await;
    // A sidecar run as a group the rules do not exempt: its own connections come back to it.
    mesh.sidecar_as("looped", "looped", &[], None).await;

    mesh.apply(
        "kind: ServicePolicy\nservice: catalog\nload_balancer: round-robin\nsubsets: { v1: { labels: { version: v1 } }, v2: { labels: { version: v2 } } }\n---\n\
         kind: Route\nservice: catalog\nrules:\n\
         - name: canary\n  match: { headers: { x-canary: \"true\" } }\n  backends: [ { subset: v2 } ]\n\
         - name: default\n  retries: { attempts: 3, on: [ 5xx ] }\n\
         ---\nkind: ServicePolicy\nservice: db\nopaque_ports: [ 3306 ]\n",
    )
    .await;

    // DNS: the plain name resolves to the service's virtual IP.
    let vip = eventually("catalog's virtual IP in the client's DNS", || async {
        let output = mesh.lab.run("client", "getent", &["ahostsv4", "catalog"]).await;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.split_whitespace().next().filter(|ip| ip.starts_with("240.240.")).map(str::to_owned)
    })
    .await;
    let (_, table) = mesh.curl("client", "http://127.0.0.1:15000/addresses", &[]).await;
    let table: serde_json::Value = serde_json::from_str(&table).expect("the address table as JSON");
    assert_eq!(table["services"]["catalog"]["virtual_ip"], vip.as_str(), "{table}");
    assert_eq!(table["services"]["catalog"]["endpoints"].as_array().map(Vec::len), Some(2), "{table}");
    let services = mesh.ferryctl(&["services"]).await;
    assert!(services.contains(&vip), "ferryctl services shows the virtual IP {vip}:\n{services}");

    // curl by plain name: through both sidecars, balanced over both instances.
    let served = serve_many(&mesh, "client", "http://catalog/items", &[]).await;
    assert_eq!(served, BTreeSet::from(["cat1".to_owned(), "cat2".to_owned()]), "balanced over both instances");
    // An instance's app calling its own service reaches its own instance too.
    let served = serve_many(&mesh, "cat1", "http://catalog/items", &[]).await;
    assert_eq!(served, BTreeSet::from(["cat1".to_owned(), "cat2".to_owned()]), "a call from cat1 to catalog");
    // The route applies: the canary header pins v2.
    let canary = serve_many(&mesh, "client", "http://catalog/items", &["x-canary: true"]).await;
    assert_eq!(canary, BTreeSet::from(["cat2".to_owned()]), "routed by the canary rule");
    // Retries: every other answer of each instance is a 503, which the route retries.
    for _ in 0..10 {
        let (status, body) = mesh.curl("client", "http://catalog/flaky", &[]).await;
        assert_eq!(status, 200, "a retried request succeeds: {body}");
    }
    // gRPC by plain name and any port.
    let output = mesh
        .lab
        .run("client", &ferry_tests::binary("ferry-test-app").display().to_string(), &["grpc-health", "http://catalog:50051"])
        .await;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "Serving", "{}", String::from_utf8_lossy(&output.stderr));

    // An instance's own address is intercepted and balanced like the service.
    let direct = format!("http://{}:{CATALOG_PORT}/items", mesh.lab.ip("cat1"));
    let served = serve_many(&mesh, "client", &direct, &[]).await;
    assert_eq!(served.len(), 2, "a connection to one instance's address is balanced over the service: {served:?}");

    // A protocol where the server speaks first, on a port its policy declares opaque, gets
    // through at once (the client's detection would wait a minute).
    let output =
        mesh.lab.run("client", &ferry_tests::binary("ferry-test-app").display().to_string(), &["banner-read", "db:3306"]).await;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "db-says-hello", "{}", String::from_utf8_lossy(&output.stderr));
    // A plaintext caller outside the mesh (the hub has no sidecar) gets the banner too, once the
    // db sidecar's detection gives up waiting for it to speak.
    let db = format!("{}:3306", mesh.lab.ip("db"));
    let app = ferry_tests::binary("ferry-test-app").display().to_string();
    let output = mesh.lab.run("hub", &app, &["banner-read", &db]).await;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "db-says-hello", "{}", String::from_utf8_lossy(&output.stderr));

    // Outside the mesh: passed through, or refused under --outbound-policy deny.
    let (status, body) = mesh.curl("client", &format!("http://{outside}/"), &[]).await;
    assert_eq!((status, body.as_str()), (200, "outside"), "egress passes through");
    let (status, body) = mesh.curl("client", &format!("http://[{}]:{}/", outside6.ip(), outside6.port()), &[]).await;
    assert_eq!((status, body.as_str()), (200, "outside-v6"), "IPv6 egress is intercepted and passes through");
    let (status, _) = mesh.curl("denied", &format!("http://{outside}/"), &[]).await;
    assert_eq!(status, 0, "egress is refused under --outbound-policy deny");
    assert!(mesh.metrics("denied").await.contains("destination=\"denied\""), "the refusal is counted");

    // Inbound: a connection to another port of cat1 reaches the app on that port; a skipped
    // port is not intercepted at all.
    let cat1 = mesh.lab.ip("cat1");
    let (status, body) = mesh.curl("client", &format!("http://{cat1}:9090/"), &[]).await;
    assert_eq!((status, body.as_str()), (200, "cat1-other-port"), "inbound goes to the original port");
    let (status, body) = mesh.curl("client", &format!("http://{cat1}:9091/"), &[]).await;
    assert!(status != 200 && !body.contains("cat1-private"), "what the app keeps on loopback stays private: {status} {body}");
    let (status, body) = mesh.curl("client", &format!("http://{cat1}:2222/"), &[]).await;
    assert_eq!((status, body.as_str()), (200, "cat1-skipped"), "a skipped inbound port reaches the app directly");

    // A sidecar not run as the exempt group sees its own connection to catalog come back, and
    // says so instead of relaying it again.
    let started = std::time::Instant::now();
    let (status, body) = mesh.curl("looped", "http://catalog/items", &[]).await;
    eprintln!("the looped sidecar answered {status} after {:?}: {body}", started.elapsed());
    assert_ne!(status, 200, "a looped connection does not get through");
    assert!(mesh.metrics("looped").await.contains("destination=\"loop\""), "the loop is counted");
    let client = mesh.metrics("client").await;
    assert!(client.contains("destination=\"egress\",protocol=\"none\""), "{client}");

    // No sidecar run as the exempt group ever saw one of its own connections come back.
    for host in ["client", "denied", "cat1", "cat2", "db"] {
        let metrics = mesh.metrics(host).await;
        assert!(!metrics.contains("destination=\"loop\""), "{host} looped its own connection:\n{metrics}");
    }
    let client = mesh.metrics("client").await;
    assert!(client.contains("service=\"catalog\",destination=\"service\",protocol=\"http1\""), "{client}");
    assert!(client.contains("service=\"catalog\",destination=\"service\",protocol=\"http2\""), "{client}");
    assert!(client.contains("service=\"db\",destination=\"service\",protocol=\"opaque\""), "{client}");
    drop(dir);
}

/// The address the outside server reported.
fn outside_addr(process: &Process) -> SocketAddr {
    process.addr("addr")
}

/// The instances that answered 20 requests to `url` from `host`.
async fn serve_many(mesh: &Mesh, host: &str, url: &str, headers: &[&str]) -> BTreeSet<String> {
    let mut served = BTreeSet::new();
    // The first request may wait for the service's config.
    eventually(&format!("{url} answered through the mesh"), || async {
        let (status, body) = mesh.curl(host, url, headers).await;
        (status == 200).then_some(body)
    })
    .await;
    for _ in 0..20 {
        let (status, body) = mesh.curl(host, url, headers).await;
        assert_eq!(status, 200, "{url}: {body}");
        served.insert(body);
    }
    served
}
