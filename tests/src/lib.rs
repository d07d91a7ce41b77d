//! The harness of Ferry's end-to-end tests: it builds and starts the real binaries on
//! `127.0.0.1` with port 0, reads the addresses they bound from their start-up log line, and
//! waits on readiness and convergence (never on a fixed sleep).

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use ferry_tls::api::{Access, ApiChannel, HttpApi};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::oneshot,
};

pub mod apps;
pub mod browser;
pub mod client;
pub mod dns;
pub mod etcd;
pub mod faulty;
pub mod netns;

/// The longest any wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The path of one of Ferry's binaries, up to date with the source.
///
/// The first call builds every binary of the workspace with `cargo build --workspace --tests
/// --bins`: the same features as `cargo test --workspace`, so under that command it only links
/// what is not fresh yet, and under `cargo test -p ferry-tests` it still never runs a stale
/// binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        // Quiet: the progress lines go to a pipe nobody reads, which must not fill up.
        let mut build = escargot::CargoBuild::new().arg("--quiet").arg("--workspace");
        if etcd::FEATURE {
            // The etcd tests run the control plane built with its etcd store.
            build = build.arg("--features").arg("ferry-control-plane/etcd");
        }
        let messages = build.tests().bins().current_release().exec().unwrap_or_else(|e| panic!("building the binaries: {e}"));
        let mut built = HashMap::new();
        for message in messages {
            let message = message.unwrap_or_else(|e| panic!("building the binaries: {e}"));
            if let Ok(escargot::format::Message::CompilerArtifact(artifact)) = message.decode() {
                let is_bin = artifact.target.kind.iter().any(|k| k == "bin");
                if let (true, false, Some(executable)) = (is_bin, artifact.profile.test, artifact.executable) {
                    built.insert(artifact.target.name.to_string(), executable.to_path_buf());
                }
            }
        }
        built
    });
    built.get(name).cloned().unwrap_or_else(|| panic!("no binary named {name} in the workspace"))
}

/// The `key=value` pairs of a process's "listening" line (such as `grpc=127.0.0.1:34567`), or
/// `None` for any other line.
pub fn bound_addresses(line: &str) -> Option<HashMap<String, String>> {
    if !line.contains(" listening ") {
        return None;
    }
    let pairs = line.split_whitespace().filter_map(|t| t.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned()));
    Some(pairs.collect())
}

/// Polls `check` until it returns `Some`, failing the test with `what` after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running Ferry process with the addresses from its "listening" line and its log.
pub struct Process {
    name: String,
    child: Child,
    pub bound: HashMap<String, String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `binary ARGS...` and waits for its "listening" line.
    pub async fn start(name: &str, binary_name: &str, args: &[String]) -> Self {
        let mut command = Command::new(binary(binary_name));
        command.args(args);
        Self::start_command(name, command).await
    }

    /// Starts `command` (a Ferry binary, perhaps behind a wrapper such as `ip netns exec`) and
    /// waits for its "listening" line.
    pub async fn start_command(name: &str, mut command: Command) -> Self {
        let mut child = command
            .env("FERRY_LOG", "info,ferry_sidecar=debug,ferry_control_plane=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (listening, bound) = oneshot::channel();
        let lines = log.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            let mut listening = Some(listening);
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(bound) = bound_addresses(&line)
                    && let Some(listening) = listening.take()
                {
                    let _ = listening.send(bound);
                }
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let bound = match tokio::time::timeout(PATIENCE, bound).await {
            Ok(Ok(bound)) => bound,
            _ => panic!("{name} did not start:\n{}", log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")),
        };
        Self { name: name.to_owned(), child, bound, log }
    }

    /// The address reported under `key`.
    pub fn addr(&self, key: &str) -> SocketAddr {
        let value = self.bound.get(key).unwrap_or_else(|| panic!("{} reported no {key}", self.name));
        value.parse().unwrap_or_else(|_| panic!("{}: {key}={value}", self.name))
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills it (SIGKILL: no goodbye, no flush) and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Stops it with SIGTERM and waits for it to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(Ok(status)) => status,
            _ => panic!("{} did not exit after SIGTERM:\n{}", self.name, self.log()),
        }
    }
}

/// How a sidecar (or `ferryctl`) reaches a control plane: its gRPC URL, the CA file that
/// verifies it, and a file holding the token.
#[derive(Debug, Clone)]
pub struct Reach {
    pub url: String,
    /// `None` for a control plane with `--api-tls off`.
    pub ca_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl Reach {
    /// The flags that say it.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--control-plane".to_owned(), self.url.clone()];
        if let Some(ca) = &self.ca_file {
            args.extend(["--ca-file".to_owned(), ca.display().to_string()]);
        }
        if let Some(token) = &self.token_file {
            args.extend(["--token-file".to_owned(), token.display().to_string()]);
        }
        args
    }

    /// A control plane that will run at `address` with `--api-tls off --bootstrap-token
    /// <secret>`, for sidecars started before it; the token goes to a file in `dir`.
    pub fn plaintext(address: &str, secret: &str, dir: &Path) -> Self {
        let token_file = dir.join("bootstrap.token");
        std::fs::write(&token_file, secret).expect("writes the token file");
        Self { url: format!("http://{address}"), ca_file: None, token_file: Some(token_file) }
    }
}

/// A control plane on loopback, with its own data directory, run with its secure defaults
/// (token auth, TLS on the API) unless its flags say otherwise; the harness reads the admin
/// token and the CA it writes, and calls its APIs with them.
pub struct ControlPlane {
    pub process: Process,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub dns: SocketAddr,
    pub data_dir: PathBuf,
    /// The admin token.
    pub token: Option<String>,
    /// The CA bundle it wrote, when its API speaks TLS.
    pub ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
    api: HttpApi,
    _dir: Option<tempfile::TempDir>,
}

/// The value following `flag` in `args`.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().position(|a| *a == flag).and_then(|i| args.get(i + 1)).copied()
}

impl ControlPlane {
    /// A control plane with the embedded store in a fresh directory.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// The same, with extra flags.
    pub async fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let data_dir = dir.path().to_path_buf();
        let mut control_plane = Self::start_in(&data_dir, extra).await;
        control_plane._dir = Some(dir);
        control_plane
    }

    /// A control plane keeping its store in `data_dir`, with extra flags (which may replace the
    /// default `--grpc 127.0.0.1:0` and `--http 127.0.0.1:0`).
    pub async fn start_in(data_dir: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec!["--data-dir".into(), data_dir.display().to_string()];
        for flag in ["--grpc", "--http", "--dns"] {
            if !extra.contains(&flag) {
                args.extend([flag.to_owned(), "127.0.0.1:0".to_owned()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Process::start("control-plane", "ferry-control-plane", &args).await;
        let (grpc, http, dns) = (process.addr("grpc"), process.addr("http"), process.addr("dns"));
        let tls = flag_value(extra, "--api-tls") != Some("off");
        let auth = flag_value(extra, "--auth") != Some("none");
        let (token, token_file) = match (auth, flag_value(extra, "--bootstrap-token")) {
            (false, _) => (None, None),
            (true, Some(secret)) => {
                let file = data_dir.join("bootstrap.token");
                std::fs::write(&file, secret).expect("writes the token file");
                (Some(secret.to_owned()), Some(file))
            }
            (true, None) => {
                let file = data_dir.join("admin.token");
                let secret = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
                (Some(secret.trim().to_owned()), Some(file))
            }
        };
        let ca_file = tls.then(|| data_dir.join("ca.pem"));
        let ca_pem =
            ca_file.as_ref().map(|f| std::fs::read_to_string(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display())));
        let api = HttpApi::new(http, ca_pem.as_deref(), token.clone()).expect("the API's TLS config");
        Self { process, grpc, http, dns, data_dir: data_dir.to_path_buf(), token, ca_file, token_file, api, _dir: None }
    }

    fn scheme(&self) -> &'static str {
        if self.ca_file.is_some() { "https" } else { "http" }
    }

    /// The gRPC URL sidecars and ferryctl use.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.grpc)
    }

    /// The HTTP API's base URL.
    pub fn http_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.http)
    }

    /// How sidecars reach it, with the admin token.
    pub fn reach(&self) -> Reach {
        Reach { url: self.url(), ca_file: self.ca_file.clone(), token_file: self.token_file.clone() }
    }

    /// The same with another token, written to a file of its own.
    pub fn reach_with(&self, token: &str) -> Reach {
        let file = self.data_dir.join(format!("token-{:016x}", rand_id()));
        std::fs::write(&file, token).expect("writes the token file");
        Reach { token_file: Some(file), ..self.reach() }
    }

    /// How `ferryctl` and gRPC clients reach it, with the admin token.
    pub fn access(&self) -> Access {
        Access {
            url: self.url(),
            ca_pem: self.ca_file.as_ref().map(|f| std::fs::read_to_string(f).expect("the CA file")),
            token: self.token.clone(),
        }
    }

    /// A gRPC channel with the admin token.
    pub async fn channel(&self) -> ApiChannel {
        self.access().connect().await.expect("connects to the control plane")
    }

    /// The environment that points `ferryctl` at it, with the admin token.
    pub fn ferryctl_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("FERRY_CONTROL_PLANE", self.url())];
        if let Some(token) = &self.token {
            env.push(("FERRY_TOKEN", token.clone()));
        }
        if let Some(ca) = &self.ca_file {
            env.push(("FERRY_CA_FILE", ca.display().to_string()));
        }
        env
    }

    /// Runs `ferryctl ARGS` against it with the admin token, and waits for it to end.
    pub async fn ferryctl(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(binary("ferryctl"))
            .envs(self.ferryctl_env())
            .args(args)
            .output()
            .await
            .expect("ferryctl runs")
    }

    /// The HTTP API, with the admin token.
    pub fn api(&self) -> &HttpApi {
        &self.api
    }

    /// `GET path` from the HTTP API, with the admin token.
    pub async fn get(&self, path: &str) -> Result<client::Answer, client::Error> {
        self.api.call(http::Method::GET, path, None).await
    }

    /// `method path` with a JSON body, with the admin token.
    pub async fn send_json(&self, method: http::Method, path: &str, body: &str) -> Result<client::Answer, client::Error> {
        self.send_body(method, path, "application/json", body).await
    }

    /// `method path` with a body of `content_type`, with the admin token.
    pub async fn send_body(
        &self,
        method: http::Method,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> Result<client::Answer, client::Error> {
        self.api.call(method, path, Some((content_type, bytes::Bytes::from(body.to_owned())))).await
    }

    /// A new token of `kind` (`admin`, `read` or `sidecar`), for `service` when a sidecar's.
    pub async fn token(&self, kind: &str, service: Option<&str>) -> String {
        let body = serde_json::json!({
            "kind": format!("TOKEN_KIND_{}", kind.to_ascii_uppercase()),
            "service": service.unwrap_or_default(),
        });
        let answer = self.send_json(http::Method::POST, "/v1/tokens", &body.to_string()).await.expect("answered");
        assert_eq!(answer.0, 200, "creating a token: {}", client::text(&answer));
        let created: serde_json::Value = serde_json::from_slice(&answer.2).expect("JSON");
        created["secret"].as_str().expect("a secret").to_owned()
    }

    /// Applies multi-document YAML through `POST /v1/apply`, which must succeed, and returns the
    /// versions stored, in document order.
    pub async fn apply(&self, yaml: &str) -> Vec<u64> {
        let answer = self.send_body(http::Method::POST, "/v1/apply", "application/yaml", yaml).await.expect("answered");
        assert_eq!(answer.0, 200, "applying:\n{yaml}\n{}", client::text(&answer));
        let body: serde_json::Value = serde_json::from_slice(&answer.2).expect("JSON");
        let applied = body["applied"].as_array().expect("applied resources");
        // The proto3 JSON form (`{"route": {...}}`), where a u64 is a string.
        let version = |resource: &serde_json::Value| {
            let body = ["route", "policy", "authorization"].iter().map(|k| &resource[*k]).find(|b| b.is_object());
            body.and_then(|b| b["version"].as_str())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no version in {resource}"))
        };
        applied.iter().map(|a| version(&a["resource"])).collect()
    }

    /// The instance `id` as the HTTP API shows it, if registered.
    pub async fn instance(&self, id: &str) -> Option<serde_json::Value> {
        let (status, _, body) = self.get(&format!("/v1/instances/{id}")).await.ok()?;
        (status == 200).then(|| serde_json::from_slice(&body).ok()).flatten()
    }

    /// Waits until instance `id` has `health` (such as `"HEALTH_CRITICAL"`) and returns it.
    pub async fn wait_health(&self, id: &str, health: &str) -> serde_json::Value {
        eventually(&format!("{id} to be {health}"), || async {
            let instance = self.instance(id).await?;
            (instance["health"] == health).then_some(instance)
        })
        .await
    }

    /// Waits until the registry lists `count` passing instances of `service`.
    pub async fn wait_passing(&self, service: &str, count: usize) {
        let path = format!("/v1/services/{service}?passing");
        eventually(&format!("{count} passing instances of {service}"), || async {
            let (status, _, body) = self.get(&path).await.ok()?;
            let body: serde_json::Value = serde_json::from_slice(&body).ok()?;
            let instances = body["instances"].as_array().map_or(0, Vec::len);
            (status == 200 && instances == count).then_some(())
        })
        .await;
    }
}

/// A random number, for file names.
fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

/// What a route's probe rule ([`probe_route`]) answers with: an injected abort, so once the
/// route is in force the app never sees a probe.
pub const PROBE_STATUS: u16 = 418;

/// A Route for `service` made of a probe rule for `/probe/{tag}` and then `rules` (YAML list
/// items indented by two spaces). The probe tells a test when this version of the route is in
/// force: [`Sidecar::wait_for_route`].
pub fn probe_route(service: &str, tag: &str, rules: &str) -> String {
    format!(
        "kind: Route
service: {service}
rules:
  - name: probe
    match: {{ path_exact: /probe/{tag} }}
    fault: {{ abort: {{ percent: 100, status: {PROBE_STATUS} }} }}
{rules}"
    )
}

/// A sidecar on loopback.
pub struct Sidecar {
    pub process: Process,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub inbound: Option<SocketAddr>,
}

impl Sidecar {
    /// A sidecar for `service` (fronting `app`, if any) with extra flags, once it is ready.
    pub async fn start(control_plane: &Reach, service: &str, app: Option<SocketAddr>, extra: &[&str]) -> Self {
        let sidecar = Self::spawn(control_plane, service, app, extra).await;
        sidecar.wait_ready().await;
        sidecar
    }

    /// The same, without waiting for readiness.
    pub async fn spawn(control_plane: &Reach, service: &str, app: Option<SocketAddr>, extra: &[&str]) -> Self {
        let mut args: Vec<String> = control_plane.args();
        args.extend([
            "--service".into(),
            service.into(),
            "--outbound".into(),
            "127.0.0.1:0".into(),
            "--inbound".into(),
            "127.0.0.1:0".into(),
            "--admin".into(),
            "127.0.0.1:0".into(),
        ]);
        if let Some(app) = app {
            args.push("--app".into());
            args.push(app.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Process::start(&format!("{service}-sidecar"), "ferry-sidecar", &args).await;
        let outbound = process.addr("outbound");
        let admin = process.addr("admin");
        let inbound = process.bound.get("inbound").and_then(|v| v.parse().ok());
        Self { process, outbound, admin, inbound }
    }

    /// The address of the `--upstream` listener of `service`, from the "listening" line
    /// (`upstreams=NAME@ADDR,...`).
    pub fn upstream(&self, service: &str) -> SocketAddr {
        let upstreams = self.process.bound.get("upstreams").unwrap_or_else(|| panic!("no upstreams reported"));
        let addr = upstreams
            .split(',')
            .find_map(|u| u.strip_prefix(service)?.strip_prefix('@'))
            .unwrap_or_else(|| panic!("no upstream {service} in {upstreams}"));
        addr.parse().unwrap_or_else(|_| panic!("upstream {service}: {addr}"))
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self) {
        let url = format!("http://{}/ready", self.admin);
        eventually("the sidecar to be ready", || async { (client::get(&url).await.ok()?.0 == 200).then_some(()) }).await;
    }

    /// The sidecar's `/config`.
    pub async fn config(&self) -> serde_json::Value {
        let (_, _, body) = client::get(&format!("http://{}/config", self.admin)).await.expect("admin answers");
        serde_json::from_slice(&body).expect("config is JSON")
    }

    /// Waits until the route of [`probe_route`] tagged `tag` is in force for `service` here.
    pub async fn wait_for_route(&self, service: &str, tag: &str) {
        let url = format!("http://{service}/probe/{tag}");
        eventually(&format!("route {tag} of {service} to be in force"), || async {
            let answer = client::proxy_get(self.outbound, &url).await.ok()?;
            (answer.0 == PROBE_STATUS).then_some(())
        })
        .await;
    }

    /// Waits until the sidecar holds `service` at `version` or later.
    pub async fn wait_for_version(&self, service: &str, version: u64) {
        eventually(&format!("{service} at version {version} in the caller"), || async {
            let held = self.config().await["services"][service]["version"].as_u64()?;
            (held >= version).then_some(())
        })
        .await;
    }

    /// Waits until the sidecar holds `count` passing endpoints of `service`.
    pub async fn wait_endpoints(&self, service: &str, count: usize) {
        eventually(&format!("{count} passing endpoints of {service} in the sidecar"), || async {
            let config = self.config().await;
            let endpoints = config["services"][service]["endpoints"].as_array()?;
            let passing = endpoints.iter().filter(|e| e["health"] == "passing").count();
            (passing == count).then_some(())
        })
        .await;
    }
}
