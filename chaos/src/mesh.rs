//! The mesh under test: a namespace per host on one bridge ([`Lab`]), the control plane in its
//! own with its data directory on a small tmpfs, an app and its sidecar in each app host (the
//! demo's frontend -> catalog (2 instances) -> inventory) and the load generator with a sidecar
//! of its own. Every process it starts is killed, the tmpfs unmounted and the namespaces removed
//! when it is dropped, on an error or Ctrl-C too.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command as StdCommand, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use ferry_tests::{Process, netns::Lab};

/// The hosts, in the Lab's order (each gets the next address).
pub const HOSTS: [&str; 6] = ["cp", "load", "frontend", "catalog-1", "catalog-2", "inventory"];

/// App hosts: (host, service, the service it calls).
pub const APPS: [(&str, &str, Option<&str>); 4] = [
    ("frontend", "frontend", Some("catalog")),
    ("catalog-1", "catalog", Some("inventory")),
    ("catalog-2", "catalog", Some("inventory")),
    ("inventory", "inventory", None),
];

/// Each sidecar's health check of its app: every second, critical after two failures.
pub const CHECK: &str = "http:/healthz,interval=1s,failure=2";
/// The interval and failure threshold of [`CHECK`].
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub const CHECK_FAILURES: u32 = 2;
/// The control plane's `--push-max-delay` (its default).
pub const PUSH_BOUND: Duration = Duration::from_millis(50);

const APP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 7070;
const HTTP_PORT: u16 = 7071;

/// The Ferry binaries, beside this one in the target directory.
#[derive(Debug, Clone)]
pub struct Bins {
    pub sidecar: PathBuf,
    pub control_plane: PathBuf,
    pub ferryctl: PathBuf,
    pub chaos: PathBuf,
}

impl Bins {
    /// Builds the sidecar, the control plane and ferryctl with the profile this binary was built
    /// with (when run by cargo), and finds them beside it.
    pub fn build() -> anyhow::Result<Self> {
        let chaos = std::env::current_exe()?;
        let dir = chaos.parent().context("the binary's directory")?.to_path_buf();
        if let Some(cargo) = std::env::var_os("CARGO") {
            let mut build = StdCommand::new(cargo);
            build.args(["build", "--quiet", "-p", "ferry-sidecar", "-p", "ferry-control-plane", "-p", "ferryctl"]);
            if dir.ends_with("release") {
                build.arg("--release");
            }
            let status = build.status().context("running cargo build")?;
            if !status.success() {
                bail!("cargo build of the sidecar, the control plane and ferryctl failed");
            }
        }
        let bins = Self {
            sidecar: dir.join("ferry-sidecar"),
            control_plane: dir.join("ferry-control-plane"),
            ferryctl: dir.join("ferryctl"),
            chaos,
        };
        for path in [&bins.sidecar, &bins.control_plane, &bins.ferryctl] {
            if !path.exists() {
                bail!("{} is missing: cargo build -p ferry-sidecar -p ferry-control-plane -p ferryctl", path.display());
            }
        }
        Ok(bins)
    }
}

/// A tmpfs mounted for the run, unmounted (lazily, whatever still holds it open) on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (such as `16m`) at `path`.
    pub fn mount(path: &Path, size: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        run(StdCommand::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"]).arg(path))?;
        Ok(Self { path: path.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = StdCommand::new("umount").arg("-l").arg(&self.path).stderr(Stdio::null()).status();
    }
}

/// How a role's process is started again after a kill.
#[derive(Debug, Clone)]
struct Launch {
    host: String,
    program: PathBuf,
    args: Vec<String>,
}

/// The running mesh. Fields drop in order: processes, then the tmpfs, the namespaces and the
/// run's directory.
pub struct Mesh {
    processes: BTreeMap<String, Process>,
    launches: BTreeMap<String, Launch>,
    pub data: Tmpfs,
    pub lab: Lab,
    pub bins: Bins,
    /// Where the apps' logs, the load generator's records and the sidecars' state go.
    pub dir: PathBuf,
    pub run_id: String,
    /// Whether the kernel has `sch_netem`.
    pub netem: bool,
    _dir: tempfile::TempDir,
}

/// Whether `tc qdisc ... netem` works here: tried on the hub's bridge, then removed.
fn netem_available(lab: &Lab) -> bool {
    let hub = lab.ns("hub");
    let Ok(links) = run(StdCommand::new("ip").args(["-n", &hub, "-o", "link", "show", "type", "bridge"])) else { return false };
    let Some(bridge) = links.split(':').nth(1).map(|n| n.trim().to_owned()) else { return false };
    let added = run(StdCommand::new("tc").args(["-n", &hub, "qdisc", "add", "dev", &bridge, "root", "netem", "delay", "1ms"]));
    let _ = StdCommand::new("tc").args(["-n", &hub, "qdisc", "del", "dev", &bridge, "root"]).stderr(Stdio::null()).status();
    added.is_ok()
}

/// Runs `command`, failing with its stderr.
pub fn run(command: &mut StdCommand) -> anyhow::Result<String> {
    let output = command.output().with_context(|| format!("{command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Mesh {
    /// Creates the namespaces and the control plane's tmpfs, and starts nothing yet.
    pub fn new(bins: Bins) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-chaos-").tempdir()?;
        let path = dir.path().to_path_buf();
        let data = Tmpfs::mount(&path.join("cp-data"), "16m")?;
        let lab = Lab::new(&HOSTS);
        let run_id = format!("r{:x}", crate::now_ms() % 0xff_ffff);
        let netem = netem_available(&lab);
        Ok(Self { processes: BTreeMap::new(), launches: BTreeMap::new(), data, lab, bins, dir: path, run_id, netem, _dir: dir })
    }

    /// The control plane's gRPC URL.
    pub fn cp_url(&self) -> String {
        format!("https://{}:{GRPC_PORT}", self.lab.ip("cp"))
    }

    /// The control plane's HTTP API.
    pub fn api(&self) -> String {
        format!("{}:{HTTP_PORT}", self.lab.ip("cp"))
    }

    /// The CA bundle and the admin token, copied out of the data directory once it started (so
    /// that filling the data directory does not take them away).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("admin.token")
    }

    /// The interface of `host` on the bridge and its peer in the hub.
    pub fn link(&self, host: &str) -> anyhow::Result<(String, String)> {
        let text = run(StdCommand::new("ip").args(["-n", &self.lab.ns(host), "-o", "link", "show", "type", "veth"]))?;
        let name = text
            .split(':')
            .nth(1)
            .and_then(|n| n.trim().split('@').next())
            .map(str::to_owned)
            .with_context(|| format!("no veth in {host}: {text}"))?;
        // The Lab names each pair `fhIDiN` inside and `fhIDoN` in the hub.
        let at = name.rfind('i').with_context(|| format!("unexpected veth name {name}"))?;
        let peer = format!("{}o{}", &name[..at], &name[at + 1..]);
        Ok((name, peer))
    }

    async fn launch(&mut self, role: &str, launch: Launch) -> anyhow::Result<()> {
        let args: Vec<&str> = launch.args.iter().map(String::as_str).collect();
        let command = self.lab.command(&launch.host, &launch.program.display().to_string(), &args);
        let process = Process::start_command(role, command).await;
        self.processes.insert(role.to_owned(), process);
        self.launches.insert(role.to_owned(), launch);
        Ok(())
    }

    /// Starts the control plane and copies out its CA bundle and admin token.
    pub async fn start_control_plane(&mut self) -> anyhow::Result<()> {
        let ip = self.lab.ip("cp");
        let args = vec![
            "--data-dir".into(),
            self.data.path.display().to_string(),
            "--grpc".into(),
            format!("{ip}:{GRPC_PORT}"),
            "--http".into(),
            format!("{ip}:{HTTP_PORT}"),
            "--dns".into(),
            "127.0.0.1:0".into(),
        ];
        let program = self.bins.control_plane.clone();
        self.launch("control-plane", Launch { host: "cp".into(), program, args }).await?;
        std::fs::copy(self.data.path.join("ca.pem"), self.ca_file())?;
        std::fs::copy(self.data.path.join("admin.token"), self.token_file())?;
        Ok(())
    }

    /// Starts the app of `host` (one of [`APPS`]).
    pub async fn start_app(&mut self, host: &str) -> anyhow::Result<()> {
        let (_, _, next) = APPS.iter().find(|a| a.0 == host).with_context(|| format!("no app on {host}"))?;
        let mut args = vec![
            "app".into(),
            "--listen".into(),
            format!("127.0.0.1:{APP_PORT}"),
            "--name".into(),
            host.into(),
            "--log".into(),
            self.app_log(host).display().to_string(),
        ];
        if let Some(next) = next {
            args.extend(["--next".into(), (*next).into()]);
        }
        let program = self.bins.chaos.clone();
        self.launch(&format!("app {host}"), Launch { host: host.into(), program, args }).await
    }

    /// The file the app of `host` logs each request it serves to.
    pub fn app_log(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.requests"))
    }

    /// Starts the sidecar of `host` for `service`, fronting its app when it has one, and waits
    /// until it is ready.
    pub async fn start_sidecar(&mut self, host: &str, service: &str, app: bool) -> anyhow::Result<()> {
        let mut args = vec![
            "--control-plane".into(),
            self.cp_url(),
            "--ca-file".into(),
            self.ca_file().display().to_string(),
            "--token-file".into(),
            self.token_file().display().to_string(),
            "--service".into(),
            service.into(),
            "--id".into(),
            host.into(),
            "--outbound".into(),
            "127.0.0.1:15001".into(),
            "--inbound".into(),
            "0.0.0.0:15006".into(),
            "--admin".into(),
            "127.0.0.1:15000".into(),
            "--advertise".into(),
            self.lab.ip(host).to_string(),
            "--state-dir".into(),
            self.dir.join("state").join(host).display().to_string(),
        ];
        if app {
            args.extend(["--app".into(), format!("127.0.0.1:{APP_PORT}"), "--check".into(), CHECK.into()]);
        }
        let program = self.bins.sidecar.clone();
        self.launch(&format!("sidecar {host}"), Launch { host: host.into(), program, args }).await?;
        self.wait_ready(host).await
    }

    /// Waits until the sidecar of `host` answers `/ready` with 200.
    pub async fn wait_ready(&self, host: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.curl(host, &["http://127.0.0.1:15000/ready"]).await;
            if status == 200 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the sidecar of {host} is not ready: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the load generator at `rate` requests a second, for at most `bound`.
    pub async fn start_driver(&mut self, rate: u32, bound: Duration) -> anyhow::Result<()> {
        let args = vec![
            "drive".into(),
            "--rate".into(),
            rate.to_string(),
            "--stop-after".into(),
            format!("{}s", bound.as_secs()),
            "--out".into(),
            self.records().display().to_string(),
            "--api".into(),
            self.api(),
            "--ca-file".into(),
            self.ca_file().display().to_string(),
            "--token-file".into(),
            self.token_file().display().to_string(),
            "--run-id".into(),
            self.run_id.clone(),
        ];
        let program = self.bins.chaos.clone();
        self.launch("load generator", Launch { host: "load".into(), program, args }).await
    }

    /// The load generator's records.
    pub fn records(&self) -> PathBuf {
        self.dir.join("records.jsonl")
    }

    /// Stops the load generator (SIGTERM: it waits for what is in flight).
    pub async fn stop_driver(&mut self) {
        if let Some(mut driver) = self.processes.remove("load generator") {
            driver.terminate().await;
        }
    }

    /// `kill -9` of `role` (such as `sidecar catalog-1`).
    pub async fn kill(&mut self, role: &str) -> anyhow::Result<()> {
        let process = self.processes.get_mut(role).with_context(|| format!("no process {role}"))?;
        process.kill().await;
        Ok(())
    }

    /// Starts `role` again as it was started first.
    pub async fn restart(&mut self, role: &str) -> anyhow::Result<()> {
        let launch = self.launches.get(role).cloned().with_context(|| format!("{role} was never started"))?;
        self.launch(role, launch).await
    }

    /// The pid of every process, by role.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.processes.iter().filter_map(|(role, p)| Some((role.clone(), p.pid()?))).collect()
    }

    /// `curl ARGS` inside `host`: the status (0 when there was no answer) and the body.
    pub async fn curl(&self, host: &str, args: &[&str]) -> (u16, String) {
        curl_in(&self.lab.ns(host), args).await
    }

    /// What the load host needs to reach the control plane, for tasks that run beside the mesh.
    pub fn access(&self) -> Access {
        Access {
            ns: self.lab.ns("load"),
            api: self.api(),
            cp_url: self.cp_url(),
            ca_file: self.ca_file(),
            token_file: self.token_file(),
            ferryctl: self.bins.ferryctl.clone(),
        }
    }

    /// `METHOD PATH` on the control plane's API from the load host, with the admin token.
    pub async fn api_call(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
        self.access().api_call(method, path, body).await
    }

    /// The catalog endpoints the sidecar of `host` would send a request to now: passing in its
    /// config and not ejected by its balancer. `None` when its admin does not answer.
    pub async fn routable_catalog(&self, host: &str) -> Option<Vec<String>> {
        routable_catalog(&self.lab.ns(host)).await
    }
}

/// The catalog endpoints the sidecar in namespace `ns` would send a request to now.
pub async fn routable_catalog(ns: &str) -> Option<Vec<String>> {
    let (status, body) = curl_in(ns, &["http://127.0.0.1:15000/config"]).await;
    if status != 200 {
        return None;
    }
    let config: serde_json::Value = serde_json::from_str(&body).ok()?;
    let catalog = &config["services"]["catalog"];
    let mut ejected = Vec::new();
    if let Some(balancers) = catalog["balancers"].as_object() {
        for balancer in balancers.values() {
            for endpoint in balancer["endpoints"].as_array().into_iter().flatten() {
                if endpoint["ejected"].as_bool() == Some(true) {
                    ejected.extend(endpoint["id"].as_str().map(str::to_owned));
                }
            }
        }
    }
    let mut routable: Vec<String> = catalog["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| matches!(e["health"].as_str(), Some("passing" | "warning")))
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .filter(|id| !ejected.contains(id))
        .collect();
    routable.sort();
    Some(routable)
}

/// `curl ARGS` inside namespace `ns`: the status (0 when there was no answer) and the body.
pub async fn curl_in(ns: &str, args: &[&str]) -> (u16, String) {
    let mut all = vec!["netns", "exec", ns, "curl", "-s", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let mut command = tokio::process::Command::new("ip");
    command.args(&all).stdin(Stdio::null()).kill_on_drop(true);
    let Ok(Ok(output)) = tokio::time::timeout(Duration::from_secs(10), command.output()).await else {
        return (0, "curl did not end".into());
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// How the load host reaches the control plane: its API over curl, and ferryctl.
#[derive(Debug, Clone)]
pub struct Access {
    ns: String,
    api: String,
    cp_url: String,
    ca_file: PathBuf,
    token_file: PathBuf,
    ferryctl: PathBuf,
}

impl Access {
    fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file).unwrap_or_default().trim().to_owned()
    }

    /// `METHOD PATH` on the API with the admin token: the status (0: no answer) and the body.
    pub async fn api_call(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
        let url = format!("https://{}{path}", self.api);
        let ca = self.ca_file.display().to_string();
        let auth = format!("authorization: Bearer {}", self.token());
        let mut args = vec!["--cacert", &ca, "-H", &auth, "-X", method];
        let content_type;
        if let Some((kind, data)) = body {
            content_type = format!("content-type: {kind}");
            args.extend(["-H", &content_type, "--data-binary", data]);
        }
        args.push(&url);
        curl_in(&self.ns, &args).await
    }

    /// `ferryctl ARGS` against the control plane: whether it succeeded, and what it said.
    pub async fn ferryctl(&self, args: &[&str]) -> (bool, String) {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.ns])
            .arg(&self.ferryctl)
            .args(args)
            .env("FERRY_CONTROL_PLANE", &self.cp_url)
            .env("FERRY_CA_FILE", &self.ca_file)
            .env("FERRY_TOKEN", self.token())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(15), command.output()).await {
            Ok(Ok(output)) => {
                let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
                (output.status.success(), said.trim().to_owned())
            }
            Ok(Err(error)) => (false, error.to_string()),
            Err(_) => (false, "ferryctl did not end within 15s".into()),
        }
    }
}
