//! The data paths under test, each started fresh on loopback and stopped after its runs: the
//! upstream alone (`direct`), one Ferry sidecar reached in each of the three ways apps reach it
//! (a port per upstream, `ferry-1hop`; the outbound listener with the service in `Host`,
//! `ferry-1hop-host`; the outbound listener as an HTTP proxy, `ferry-1hop-proxy`), two sidecars
//! as in a mesh (`ferry-mesh`), and HAProxy and nginx as one-hop reverse proxies with the same
//! number of threads as the sidecar. Also the upstream itself, a hyper server answering 1 KiB
//! bodies over HTTP/1.1 keep-alive and h2c, which runs as a process of its own.

use std::{
    convert::Infallible,
    fmt,
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use ferry_tests::client;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde::Serialize;

use super::{
    load::{Protocol, RequestForm},
    procstat,
};

/// The size of every upstream response body.
pub const BODY_BYTES: usize = 1024;

/// The service name the client sends in `Host` / `:authority`.
pub const AUTHORITY: &str = "bench";

/// How long a process may take to start and a path to carry its first request.
const STARTUP: Duration = Duration::from_secs(20);

/// Serves the upstream on `listener` until the process ends, on a multi-threaded runtime of
/// its own (as many workers as cores, tokio's default).
pub fn serve_upstream(listener: TcpListener) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let body = Bytes::from(vec![b'x'; BODY_BYTES]);
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_: Request<hyper::body::Incoming>| {
                    let response = Response::builder()
                        .header(http::header::CONTENT_TYPE, "text/plain")
                        .body(Full::new(body.clone()))
                        .expect("a static response is valid");
                    std::future::ready(Ok::<_, Infallible>(response))
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // Room for every stream a multiplexing proxy may open on one connection.
                builder.http2().max_concurrent_streams(4096);
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

/// A child process, killed when dropped, logging to a file.
pub struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    /// SIGTERM first (nginx must tell its workers), or SIGKILL at once.
    graceful: bool,
}

impl Child {
    /// Starts `command` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf, graceful: bool) -> anyhow::Result<Self> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Self { name: name.to_owned(), child, log, graceful })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Fails with the log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.log());
        }
        Ok(())
    }

    /// Waits for the line with ` listening ` and returns its `key=value` pairs.
    pub fn wait_listening(&mut self) -> anyhow::Result<Vec<(String, String)>> {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(line) = self.log().lines().find(|line| line.contains(" listening ")) {
                let pairs = line.split_whitespace().filter_map(|t| t.split_once('='));
                return Ok(pairs.map(|(k, v)| (k.to_owned(), v.to_owned())).collect());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!("{} did not log its addresses within {STARTUP:?}:\n{}", self.name, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it and waits for it to exit.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if self.graceful {
            let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of `key` among a listening line's pairs.
pub fn bound(pairs: &[(String, String)], key: &str) -> anyhow::Result<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).with_context(|| format!("no {key}= in the listening line"))
}

/// The paths, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PathKind {
    #[serde(rename = "direct")]
    Direct,
    #[serde(rename = "ferry-1hop")]
    FerryOneHop,
    #[serde(rename = "ferry-1hop-host")]
    FerryOneHopHost,
    #[serde(rename = "ferry-1hop-proxy")]
    FerryOneHopProxy,
    #[serde(rename = "ferry-mesh")]
    FerryMesh,
    #[serde(rename = "ferry-mesh-mtls")]
    FerryMeshMtls,
    #[serde(rename = "haproxy")]
    Haproxy,
    #[serde(rename = "nginx")]
    Nginx,
}

impl PathKind {
    /// Every path, in report order.
    pub const ALL: [PathKind; 8] = [
        PathKind::Direct,
        PathKind::FerryOneHop,
        PathKind::FerryOneHopHost,
        PathKind::FerryOneHopProxy,
        PathKind::FerryMesh,
        PathKind::FerryMeshMtls,
        PathKind::Haproxy,
        PathKind::Nginx,
    ];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::FerryOneHop => "ferry-1hop",
            PathKind::FerryOneHopHost => "ferry-1hop-host",
            PathKind::FerryOneHopProxy => "ferry-1hop-proxy",
            PathKind::FerryMesh => "ferry-mesh",
            PathKind::FerryMeshMtls => "ferry-mesh-mtls",
            PathKind::Haproxy => "haproxy",
            PathKind::Nginx => "nginx",
        }
    }

    /// One line on what the client goes through.
    pub fn description(self) -> &'static str {
        match self {
            PathKind::Direct => "client → upstream",
            PathKind::FerryOneHop => "client → sidecar (`--upstream bench=…`) → upstream (an API-registered instance)",
            PathKind::FerryOneHopHost => {
                "client → sidecar's outbound listener, the service named in `Host: bench` (HTTP/1.1) or `:authority: bench` \
                 (h2c) → upstream (the same instance)"
            }
            PathKind::FerryOneHopProxy => {
                "client → sidecar's outbound listener as an HTTP proxy (`GET http://bench/ HTTP/1.1`, HTTP/1.1 only) → \
                 upstream (the same instance)"
            }
            PathKind::FerryMesh => {
                "client → outbound sidecar → inbound sidecar (`--app`, `--mtls off`: plaintext between sidecars) → upstream"
            }
            PathKind::FerryMeshMtls => {
                "client → outbound sidecar → mTLS → inbound sidecar (`--app`, the default `--mtls strict`) → upstream"
            }
            PathKind::Haproxy => "client → HAProxy (keep-alive to the upstream) → upstream",
            PathKind::Nginx => "client → nginx (keep-alive to the upstream) → upstream",
        }
    }

    /// Whether its proxies are Ferry sidecars.
    pub fn is_ferry(self) -> bool {
        matches!(
            self,
            PathKind::FerryOneHop
                | PathKind::FerryOneHopHost
                | PathKind::FerryOneHopProxy
                | PathKind::FerryMesh
                | PathKind::FerryMeshMtls
        )
    }

    /// How its clients name the upstream.
    pub fn addressing(self) -> Addressing {
        match self {
            PathKind::FerryOneHopHost => Addressing::Host,
            PathKind::FerryOneHopProxy => Addressing::Proxy,
            _ => Addressing::Listener,
        }
    }
}

/// How a client names the upstream to the listener it connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// It does not need to: the listener forwards everything to one upstream (a sidecar's port
    /// per upstream, a reverse proxy, the upstream itself). The generators send what they send
    /// anyway: wrk and h2load the listener's address, the open-loop generator and the probe
    /// [`AUTHORITY`].
    Listener,
    /// The service in `Host` (HTTP/1.1) or `:authority` (h2c), on the sidecar's outbound
    /// listener.
    Host,
    /// As to an HTTP proxy: an absolute-form URI (`GET http://bench/ HTTP/1.1`), HTTP/1.1 only.
    Proxy,
}

impl Addressing {
    /// How the open-loop generator writes an HTTP/1.1 request's target.
    pub fn request_form(self) -> RequestForm {
        match self {
            Addressing::Listener | Addressing::Host => RequestForm::Origin,
            Addressing::Proxy => RequestForm::Absolute,
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the benchmark finds Ferry's binaries and how the proxies are sized.
#[derive(Debug, Clone)]
pub struct Setup {
    pub sidecar: PathBuf,
    pub control_plane: PathBuf,
    pub haproxy: PathBuf,
    pub nginx: PathBuf,
    /// Data-path threads of the sidecar (`FERRY_WORKERS`), HAProxy (`nbthread`) and nginx
    /// (`worker_processes`).
    pub threads: usize,
    /// Where configs, logs and data go.
    pub dir: PathBuf,
}

/// A process whose cost is measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub name: String,
    pub pid: u32,
}

/// A path that is up and carried a request in each protocol it offers.
pub struct Running {
    pub kind: PathKind,
    /// Where the client connects, per protocol; `Err` says why the path cannot carry it.
    pub http1: SocketAddr,
    pub h2c: Result<SocketAddr, String>,
    /// The proxy processes (none for `direct`).
    pub proxies: Vec<Measured>,
    children: Vec<Child>,
}

impl Running {
    /// The address for `protocol`, or why there is none.
    pub fn addr(&self, protocol: Protocol) -> Result<SocketAddr, String> {
        match protocol {
            Protocol::Http1 => Ok(self.http1),
            Protocol::Http2 => self.h2c.clone(),
        }
    }

    /// The proxies' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.proxies.iter().map(|p| p.pid).collect()
    }

    /// Stops every process of the path, the client-facing one first.
    pub fn stop(mut self) {
        for child in self.children.iter_mut() {
            child.stop();
        }
    }
}

/// The control plane shared by the Ferry paths, on its secure defaults (token auth, TLS APIs).
pub struct ControlPlane {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The CA bundle and admin token files it wrote.
    pub ca_file: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
    api: ferry_tls::api::HttpApi,
    _child: Child,
}

impl ControlPlane {
    /// Starts it with the in-memory store on loopback ports.
    pub fn start(setup: &Setup) -> anyhow::Result<Self> {
        let mut command = Command::new(&setup.control_plane);
        command.args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--store", "memory"]);
        let data = setup.dir.join("control-plane");
        command.arg("--data-dir").arg(&data).env("FERRY_LOG", "info");
        let mut child = Child::spawn("ferry-control-plane", command, setup.dir.join("control-plane.log"), true)?;
        let pairs = child.wait_listening()?;
        let grpc = bound(&pairs, "grpc")?.parse().context("grpc address")?;
        let http = bound(&pairs, "http")?.parse().context("http address")?;
        let (ca_file, token_file) = (data.join("ca.pem"), data.join("admin.token"));
        let ca = std::fs::read_to_string(&ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        let token = std::fs::read_to_string(&token_file).with_context(|| format!("reading {}", token_file.display()))?;
        let api = ferry_tls::api::HttpApi::new(http, Some(&ca), Some(token.trim().to_owned())).map_err(anyhow::Error::msg)?;
        Ok(Self { grpc, http, ca_file, token_file, api, _child: child })
    }
}

/// Runs async client calls from the synchronous driver.
pub struct Probe {
    runtime: tokio::runtime::Runtime,
}

impl Probe {
    /// A probe with a small runtime of its own.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self { runtime: tokio::runtime::Builder::new_current_thread().enable_all().build()? })
    }

    /// The answer to `GET /` on `addr` in `protocol`, naming [`AUTHORITY`] as `addressing`
    /// says, or why there is none.
    pub fn get(&self, addr: SocketAddr, protocol: Protocol, addressing: Addressing) -> Result<client::Answer, String> {
        self.runtime.block_on(async {
            let request = tokio::time::timeout(Duration::from_secs(2), async {
                match (protocol, addressing.request_form()) {
                    (Protocol::Http1, RequestForm::Origin) => client::host_get(addr, AUTHORITY, "/").await,
                    (Protocol::Http1, RequestForm::Absolute) => client::proxy_get(addr, &format!("http://{AUTHORITY}/")).await,
                    (Protocol::Http2, _) => client::h2_get(addr, AUTHORITY, "/").await,
                }
            });
            request.await.map_err(|_| "no answer within 2s".to_owned())?.map_err(|e| e.to_string())
        })
    }

    /// Polls `GET /` until it answers 200 (or [`STARTUP`] passes).
    pub fn wait_ok(&self, addr: SocketAddr, protocol: Protocol, addressing: Addressing) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let last = match self.get(addr, protocol, addressing) {
                Ok(answer) if answer.0 == http::StatusCode::OK => return Ok(()),
                // A sidecar that cannot name or reach the service says why in x-ferry-error.
                Ok(answer) => match client::header(&answer, "x-ferry-error") {
                    "" => format!("answered {}", answer.0),
                    reason => format!("answered {} (x-ferry-error: {reason})", answer.0),
                },
                Err(error) => error,
            };
            if Instant::now() > deadline {
                return Err(format!("{} to {addr}: {last}", protocol.name()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `PUT path` with a JSON body on the control plane's HTTP API.
    pub fn put_json(&self, control_plane: &ControlPlane, path: &str, body: &str) -> anyhow::Result<()> {
        let body = Some(("application/json", bytes::Bytes::from(body.to_owned())));
        let answer = self
            .runtime
            .block_on(control_plane.api.call(http::Method::PUT, path, body))
            .map_err(|e| anyhow::anyhow!("PUT {path}: {e}"))?;
        if answer.0 != 200 {
            bail!("PUT {path}: {} {}", answer.0, client::text(&answer));
        }
        Ok(())
    }

    /// The sidecar's count of passing endpoints of `service`, from its admin `/config`.
    pub fn passing_endpoints(&self, admin: SocketAddr, service: &str) -> usize {
        let Ok(answer) = self.runtime.block_on(client::get(&format!("http://{admin}/config"))) else { return 0 };
        let Ok(config) = serde_json::from_slice::<serde_json::Value>(&answer.2) else { return 0 };
        let endpoints = config["services"][service]["endpoints"].as_array().cloned().unwrap_or_default();
        endpoints.iter().filter(|e| e["health"] == "passing").count()
    }
}

/// Starts `kind` in front of the upstream at `upstream` and waits until it carries a request
/// in each protocol.
pub fn start(
    kind: PathKind,
    setup: &Setup,
    upstream: SocketAddr,
    control_plane: &ControlPlane,
    probe: &Probe,
) -> anyhow::Result<Running> {
    let mut running = match kind {
        PathKind::Direct => Running { kind, http1: upstream, h2c: Ok(upstream), proxies: Vec::new(), children: Vec::new() },
        PathKind::FerryOneHop | PathKind::FerryOneHopHost | PathKind::FerryOneHopProxy => {
            start_one_hop(kind, setup, upstream, control_plane, probe)?
        }
        PathKind::FerryMesh => start_mesh(setup, upstream, control_plane, probe, false)?,
        PathKind::FerryMeshMtls => start_mesh(setup, upstream, control_plane, probe, true)?,
        PathKind::Haproxy => start_haproxy(setup, upstream)?,
        PathKind::Nginx => start_nginx(setup, upstream)?,
    };
    let addressing = kind.addressing();
    probe.wait_ok(running.http1, Protocol::Http1, addressing).map_err(|e| anyhow::anyhow!("{kind} carries no HTTP/1.1: {e}"))?;
    if let Ok(addr) = running.h2c {
        // A proxy that cannot take h2c from clients is reported as such, not as a failure.
        if let Err(error) = probe.wait_ok(addr, Protocol::Http2, addressing) {
            running.h2c = Err(format!("h2c prior knowledge failed: {error}"));
        }
    }
    if kind == PathKind::Nginx {
        // The workers are the master's children; they exist once it answers.
        let master = running.proxies[0].pid;
        running.proxies = procstat::with_children(master)
            .into_iter()
            .map(|pid| Measured { name: if pid == master { "nginx master".into() } else { "nginx worker".into() }, pid })
            .collect();
    }
    Ok(running)
}

fn sidecar_command(setup: &Setup, control_plane: &ControlPlane, service: &str) -> Command {
    let mut command = Command::new(&setup.sidecar);
    command
        .args(["--service", service, "--control-plane", &format!("https://{}", control_plane.grpc)])
        .arg("--ca-file")
        .arg(&control_plane.ca_file)
        .arg("--token-file")
        .arg(&control_plane.token_file)
        .args(["--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("FERRY_LOG", "info")
        .env("FERRY_WORKERS", setup.threads.to_string());
    command
}

/// A client sidecar that is ready, with one passing endpoint of the service it serves.
struct ClientSidecar {
    child: Child,
    /// Its listener for `--upstream SERVICE=127.0.0.1:0`.
    upstream_port: SocketAddr,
    /// Its outbound listener, where apps name the service in the authority.
    outbound: SocketAddr,
}

/// A client sidecar with `--upstream SERVICE=127.0.0.1:0`, ready, with one passing endpoint of
/// `service`.
fn client_sidecar(
    setup: &Setup,
    control_plane: &ControlPlane,
    probe: &Probe,
    name: &str,
    service: &str,
) -> anyhow::Result<ClientSidecar> {
    let mut command = sidecar_command(setup, control_plane, &format!("{service}-client"));
    command.arg("--upstream").arg(format!("{service}=127.0.0.1:0"));
    let mut child = Child::spawn(name, command, setup.dir.join(format!("{name}.log")), false)?;
    let pairs = child.wait_listening()?;
    let admin: SocketAddr = bound(&pairs, "admin")?.parse().context("admin address")?;
    let outbound: SocketAddr = bound(&pairs, "outbound")?.parse().context("outbound address")?;
    let upstreams = bound(&pairs, "upstreams")?;
    let port = upstreams
        .split(',')
        .find_map(|u| u.strip_prefix(service)?.strip_prefix('@'))
        .with_context(|| format!("no upstream {service} in {upstreams}"))?;
    let upstream_port: SocketAddr = port.parse().context("upstream address")?;
    let deadline = Instant::now() + STARTUP;
    while probe.passing_endpoints(admin, service) < 1 {
        child.check_alive()?;
        if Instant::now() > deadline {
            bail!("{name} has no passing endpoint of {service} after {STARTUP:?}:\n{}", child.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(ClientSidecar { child, upstream_port, outbound })
}

/// A one-hop path of `kind`: a sidecar of its own, so that its cost is measured alone, in front
/// of the one upstream instance every one-hop path shares, entered where `kind` says.
fn start_one_hop(
    kind: PathKind,
    setup: &Setup,
    upstream: SocketAddr,
    control_plane: &ControlPlane,
    probe: &Probe,
) -> anyhow::Result<Running> {
    // Registering the same instance again changes nothing, so each path can do it.
    let instance = format!(
        r#"{{"id": "bench-upstream", "service": "{AUTHORITY}", "address": "{}", "port": {}}}"#,
        upstream.ip(),
        upstream.port()
    );
    probe.put_json(control_plane, "/v1/instances", &instance)?;
    let name = match kind {
        PathKind::FerryOneHopHost => "sidecar-1hop-host",
        PathKind::FerryOneHopProxy => "sidecar-1hop-proxy",
        _ => "sidecar-1hop",
    };
    let sidecar = client_sidecar(setup, control_plane, probe, name, AUTHORITY)?;
    let (http1, h2c) = match kind.addressing() {
        Addressing::Listener => (sidecar.upstream_port, Ok(sidecar.upstream_port)),
        Addressing::Host => (sidecar.outbound, Ok(sidecar.outbound)),
        Addressing::Proxy => {
            (sidecar.outbound, Err(format!("an h2c request names its service in :authority: see {}", PathKind::FerryOneHopHost)))
        }
    };
    let proxies = vec![Measured { name: "sidecar".into(), pid: sidecar.child.pid() }];
    Ok(Running { kind, http1, h2c, proxies, children: vec![sidecar.child] })
}

/// The full mesh path: over mTLS with `mtls`, in plaintext (`--mtls off`) without, each path
/// with a service of its own so that both can run side by side.
fn start_mesh(
    setup: &Setup,
    upstream: SocketAddr,
    control_plane: &ControlPlane,
    probe: &Probe,
    mtls: bool,
) -> anyhow::Result<Running> {
    let (service, name) = if mtls { ("bench-mtls", "sidecar-mesh-mtls") } else { ("bench-mesh", "sidecar-mesh") };
    let mut command = sidecar_command(setup, control_plane, service);
    command.arg("--app").arg(upstream.to_string());
    if !mtls {
        command.args(["--mtls", "off"]);
    }
    let inbound_name = format!("{name}-inbound");
    let mut inbound = Child::spawn(&inbound_name, command, setup.dir.join(format!("{inbound_name}.log")), false)?;
    inbound.wait_listening()?;
    let outbound = client_sidecar(setup, control_plane, probe, &format!("{name}-outbound"), service)?;
    let port = outbound.upstream_port;
    let proxies = vec![
        Measured { name: "outbound sidecar".into(), pid: outbound.child.pid() },
        Measured { name: "inbound sidecar".into(), pid: inbound.pid() },
    ];
    let kind = if mtls { PathKind::FerryMeshMtls } else { PathKind::FerryMesh };
    Ok(Running { kind, http1: port, h2c: Ok(port), proxies, children: vec![outbound.child, inbound] })
}

/// A free loopback port (bound and released: a small race, retried by the caller's start-up).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// HAProxy's config: one frontend per protocol, each with a backend in the same protocol, as
/// the sidecar forwards a request in the protocol it arrived in.
pub fn haproxy_config(threads: usize, http1: SocketAddr, h2c: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        "global
    nbthread {threads}
    maxconn 8192

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend http1
    bind {http1}
    default_backend upstream_http1

frontend h2c
    bind {h2c} proto h2
    default_backend upstream_h2c

backend upstream_http1
    server upstream {upstream}

backend upstream_h2c
    server upstream {upstream} proto h2
"
    )
}

fn start_haproxy(setup: &Setup, upstream: SocketAddr) -> anyhow::Result<Running> {
    let (http1, h2c) = (free_port()?, free_port()?);
    let config = setup.dir.join("haproxy.cfg");
    fs::write(&config, haproxy_config(setup.threads, http1, h2c, upstream))?;
    let mut command = Command::new(&setup.haproxy);
    command.arg("-f").arg(&config).arg("-db");
    let mut child = Child::spawn("haproxy", command, setup.dir.join("haproxy.log"), true)?;
    wait_port(&mut child, http1)?;
    let proxies = vec![Measured { name: "haproxy".into(), pid: child.pid() }];
    Ok(Running { kind: PathKind::Haproxy, http1, h2c: Ok(h2c), proxies, children: vec![child] })
}

/// nginx's config: an HTTP/1.1 listener and an h2c one (`http2` on a cleartext listener takes
/// prior knowledge), both proxying over HTTP/1.1 keep-alive (nginx's proxy has no HTTP/2).
pub fn nginx_config(
    threads: usize,
    dir: &Path,
    user: Option<&str>,
    http1: SocketAddr,
    h2c: SocketAddr,
    upstream: SocketAddr,
) -> String {
    let dir = dir.display();
    let user = user.map(|u| format!("user {u};\n")).unwrap_or_default();
    format!(
        "{user}worker_processes {threads};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/nginx-client-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 60s;

    upstream bench {{
        server {upstream};
        keepalive 256;
        keepalive_requests 100000000;
    }}

    server {{
        listen {http1};
        listen {h2c} http2;
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

fn start_nginx(setup: &Setup, upstream: SocketAddr) -> anyhow::Result<Running> {
    let (http1, h2c) = (free_port()?, free_port()?);
    let config = setup.dir.join("nginx.conf");
    // As root, the workers run as nobody (nginx's own default, made explicit).
    let user = super::is_root().then_some("nobody nogroup");
    fs::write(&config, nginx_config(setup.threads, &setup.dir, user, http1, h2c, upstream))?;
    let mut command = Command::new(&setup.nginx);
    command.arg("-c").arg(&config).arg("-e").arg(setup.dir.join("nginx-error.log")).args(["-g", "daemon off;"]);
    let mut child = Child::spawn("nginx", command, setup.dir.join("nginx.log"), true)?;
    wait_port(&mut child, http1)?;
    let proxies = vec![Measured { name: "nginx master".into(), pid: child.pid() }];
    Ok(Running { kind: PathKind::Nginx, http1, h2c: Ok(h2c), proxies, children: vec![child] })
}

/// Waits until `addr` accepts connections, failing if the process exits first.
fn wait_port(child: &mut Child, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        child.check_alive()?;
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {STARTUP:?}:\n{}", child.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The upstream, started as `ferry-bench upstream` (this same binary) so that it shares no
/// threads with the generator.
pub struct Upstream {
    pub addr: SocketAddr,
    child: Child,
}

impl Upstream {
    /// Starts it and waits for its address.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("the path of ferry-bench")?;
        let mut command = Command::new(exe);
        command.arg("upstream");
        let mut child = Child::spawn("upstream", command, dir.join("upstream.log"), true)?;
        let pairs = child.wait_listening()?;
        let addr = bound(&pairs, "addr")?.parse().context("upstream address")?;
        Ok(Self { addr, child })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxies_get_the_sidecars_thread_count_and_keep_alive() {
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let (a, b, up) = (addr(1), addr(2), addr(3));
        let haproxy = haproxy_config(2, a, b, up);
        assert!(haproxy.contains("nbthread 2") && haproxy.contains("bind 127.0.0.1:2 proto h2"));
        assert!(haproxy.contains("server upstream 127.0.0.1:3 proto h2") && haproxy.contains("http-reuse always"));
        let nginx = nginx_config(2, Path::new("/tmp/x"), Some("nobody nogroup"), a, b, up);
        assert!(nginx.starts_with("user nobody nogroup;\nworker_processes 2;"));
        assert!(nginx.contains("listen 127.0.0.1:2 http2;") && nginx.contains("keepalive 256;"));
        assert!(nginx.contains("proxy_http_version 1.1;"));
    }
}
