//! The `ferry-demo` launcher: a control plane, two replicas of each demo service with a sidecar
//! each, a client sidecar, and traffic through all of it, summarised live.
//!
//! Every request crosses the mesh three times: client → frontend (HTTP), frontend → catalog
//! (HTTP, service named in `Host`), catalog → inventory (gRPC, service named in `:authority`),
//! each time from the caller's sidecar to the callee's.
//!
//! The last catalog replica runs version v2, the others v1, so the routing scenarios of
//! `examples/routes/` ([`scenario`]) have a canary to send traffic to. A scenario is applied
//! through the control plane's Config API with `--scenario`, or with a key while the demo runs.
//! The summary shows the routes the control plane holds ([`in_force`]), whoever applied them.
//!
//! The mesh runs as it would in production: the control plane with token auth and TLS on its
//! APIs, every sidecar with a token of its own service and strict mTLS. The demo makes those
//! tokens with the admin token the control plane writes at first start, and prints what a user
//! pastes to use `ferryctl` against it.

use crate::{say, show};
use std::{
    collections::{HashMap, VecDeque},
    io::{IsTerminal, Write as _},
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::apps::{self, Counters};
use anyhow::{Context, bail};
use ferry_proto::v1::{self, registry_client::RegistryClient};
use ferry_tls::api::{Access, ApiChannel};
use http_body_util::Empty;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc},
};
use tokio_util::sync::CancellationToken;

pub mod actions;
pub mod admins;
pub mod config_api;
pub mod in_force;
pub mod out;
pub mod ports;
pub mod process;
mod routing;
pub mod scenario;
pub mod screen;
mod summary;
pub mod text;
pub mod traffic;

use self::{
    actions::Action,
    admins::Admin,
    config_api::ConfigApi,
    ports::{Port, port_notes},
    process::{CONTROL_PLANE, Process, SIDECAR},
    routing::Routing,
    scenario::Scenario,
    summary::Summary,
    traffic::{HttpClient, Traffic},
};

/// The demo's services, in start order (callees first).
const SERVICES: [&str; 3] = ["inventory", "catalog", "frontend"];
/// The service the client sidecar calls out as.
pub const CLIENT_SERVICE: &str = "demo-client";

/// How a sidecar of the demo reaches the control plane: its URL, the CA file, its token file.
struct Reach {
    url: String,
    ca_file: String,
    tokens: std::path::PathBuf,
}

impl Reach {
    /// The flags of a sidecar of `service`.
    fn args(&self, service: &str) -> Vec<String> {
        let token = self.tokens.join(format!("{service}.token")).display().to_string();
        args(&["--control-plane", &self.url, "--ca-file", &self.ca_file, "--token-file", &token])
    }
}
/// How far back the live SHARE column looks, in seconds (one snapshot a second)...
const LIVE_SPAN: usize = 10;
/// ...and that span in words.
const LIVE_SPAN_WORDS: &str = "10s";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this long and report; run until Ctrl-C when `None`.
    pub duration: Option<Duration>,
    /// Requests per second sent to frontend.
    pub rate: u32,
    /// Instances per service.
    pub replicas: usize,
    /// The scenario to apply once traffic flows.
    pub scenario: Option<Scenario>,
}

/// One app instance with its sidecar.
struct Instance {
    service: &'static str,
    id: String,
    /// The `version` its sidecar carries in its metadata: what routes' subsets select.
    version: &'static str,
    counters: Arc<Counters>,
    sidecar: Process,
}

/// Runs the demo. Returns whether the traffic did what the scenario in force at the end says
/// (with no scenario: flowed through every instance without errors).
pub async fn run(options: Options) -> anyhow::Result<bool> {
    if let Some(scenario) = options.scenario {
        if scenario.needs_v2() && options.replicas < 2 {
            bail!("--scenario {} needs --replicas 2 or more: the last catalog replica is the v2 it sends to", scenario.name());
        }
        // A scenario whose YAML does not say what to expect fails before anything starts.
        scenario.expectation().map_err(anyhow::Error::msg)?;
    }
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir().context("creating a working directory")?;
    let result = run_in(dir.path(), options).await;
    if out::closed() {
        // Nobody reads the output any more (`ferry-demo | head`): the reader cut the run short,
        // so its verdict says nothing, and nobody would learn where kept logs are. The folder
        // goes, secrets and all, as at the end of a run that passed; stderr says so.
        let path = dir.path().display().to_string();
        let note = match dir.close() {
            Ok(()) => format!("ferry-demo: its output was closed: every process stopped, {path} removed"),
            Err(error) => format!("ferry-demo: its output was closed: every process stopped; removing {path}: {error}"),
        };
        let _ = writeln!(std::io::stderr(), "{note}");
        return result;
    }
    // The logs of a run that failed, or could not start, are what explains it.
    if !matches!(result, Ok(true)) {
        let kept = dir.keep();
        say!("logs kept in {}", kept.join("logs").display());
    }
    result
}

/// Runs the demo with its logs and store under `dir`.
async fn run_in(dir: &Path, options: Options) -> anyhow::Result<bool> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    say!(
        "ferry demo: starting a control plane, {} services x {} {} (each instance behind its own sidecar) and a client sidecar",
        SERVICES.len(),
        options.replicas,
        if options.replicas == 1 { "replica" } else { "replicas" },
    );

    let data = dir.join("data");
    let mut control_plane_ports = [
        Port::tcp("the control plane's gRPC (ferryctl)", "grpc", "127.0.0.1:7070"),
        Port::tcp("the control plane's HTTP API", "http", "127.0.0.1:7071"),
        Port::dns("the control plane's DNS", "dns", "127.0.0.1:8600"),
    ];
    let control_plane = match start_control_plane("control-plane", &data, &logs, &control_plane_ports).await {
        Ok(control_plane) => control_plane,
        // A usual port was taken between the check and the bind, or the start failed for
        // another reason, which the error gives.
        Err(error) => {
            let why = format!("was given up: the control plane did not start with the usual ports: {error:#}");
            control_plane_ports.iter_mut().for_each(|port| port.any(&why));
            // Under another name, so that the log of the first try stays as the error names it.
            start_control_plane("control-plane-free-ports", &data, &logs, &control_plane_ports).await?
        }
    };
    let control_plane_url = format!("https://{}", control_plane.addr("grpc")?);
    // What the control plane made at first start: its admin token and its trust bundle.
    let admin_file = data.join("admin.token");
    let ca_file = data.join("ca.pem");
    let admin = std::fs::read_to_string(&admin_file).with_context(|| format!("reading {}", admin_file.display()))?;
    let ca_pem = std::fs::read_to_string(&ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let api = ConfigApi::new(control_plane.addr("http")?, &ca_pem, admin.trim().to_owned())?;
    // A token per service, each allowed to act for that service alone.
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    for service in SERVICES.into_iter().chain([CLIENT_SERVICE]) {
        let secret = api.create_token("TOKEN_KIND_SIDECAR", service).await.context("creating the sidecars' tokens")?;
        write_private(&tokens.join(format!("{service}.token")), &secret)?;
    }
    let reach = Reach { url: control_plane_url.clone(), ca_file: ca_file.display().to_string(), tokens };
    let read_token = api.create_token("TOKEN_KIND_READ", "").await.context("creating the demo's read token")?;
    // Apps stop only after the traffic has, so no request in flight meets a stopped app.
    let stop_apps = CancellationToken::new();
    let stop_traffic = CancellationToken::new();

    let mut instances = Vec::new();
    for service in SERVICES {
        for n in 1..=options.replicas {
            // One catalog replica, the last, is the canary.
            let version = if service == "catalog" && n == options.replicas && n > 1 { "v2" } else { "v1" };
            instances.push(start_instance(service, n, version, &reach, &logs, &stop_apps).await?);
        }
    }
    let mut client_ports = [
        Port::tcp("the client sidecar's outbound (curl -x)", "outbound", "127.0.0.1:15001"),
        Port::tcp("the client sidecar's admin", "admin", "127.0.0.1:15000"),
    ];
    let mut client = match start_client("client-sidecar", &reach, &logs, &client_ports).await {
        Ok(client) => client,
        Err(error) => {
            let why = format!("was given up: the client sidecar did not start with the usual ports: {error:#}");
            client_ports.iter_mut().for_each(|port| port.any(&why));
            start_client("client-sidecar-free-ports", &reach, &logs, &client_ports).await?
        }
    };
    let client_outbound = client.addr("outbound")?;
    let client_upstream = client.bound.get("upstreams").cloned().unwrap_or_default();

    let http: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for sidecar in instances.iter().map(|i| &i.sidecar).chain([&client]) {
        wait_ready(&http, sidecar).await?;
    }
    let access = Access { url: control_plane_url.clone(), ca_pem: Some(ca_pem.clone()), token: Some(read_token) };
    let mut registry = RegistryClient::new(access.connect().await?);
    wait_registered(&mut registry, options.replicas).await?;
    // The client sidecar subscribed to frontend when it started, maybe before frontend's
    // sidecars registered: wait for the push that brings them, so the first request finds them.
    wait_client_sees(&http, &client, "frontend", options.replicas).await?;

    let keys = std::io::stdin().is_terminal();
    say!("control plane  grpc {control_plane_url}  http {}", api.base());
    say!("dashboard      {}/ui/  (sign in with the admin token below)", api.base());
    say!("client sidecar {client_outbound}   try: curl -x http://{client_outbound} http://frontend/");
    say!("               admin http://{}/config   upstream port {client_upstream}", client.addr("admin")?);
    say!("logs           {}", logs.display());
    let bound: Vec<(&Port, String)> = control_plane_ports
        .iter()
        .map(|port| (port, &control_plane))
        .chain(client_ports.iter().map(|port| (port, &client)))
        .map(|(port, process)| (port, process.bound.get(port.key).cloned().unwrap_or_default()))
        .collect();
    for line in port_notes(&bound) {
        say!("{line}");
    }
    let sidecars: Vec<String> =
        instances.iter().filter_map(|i| Some(format!("{} {}", i.id, i.sidecar.bound.get("admin")?))).collect();
    say!("sidecar admins {}  (ferryctl explain --sidecar ADDR)", sidecars.join(", "));
    // The same in the env file and the `?` key's answer, as the live screen has no room for them.
    let admins: Vec<Admin> = instances
        .iter()
        .map(|i| (i.service, i.id.as_str(), &i.sidecar))
        .chain([(CLIENT_SERVICE, "client", &client)])
        .filter_map(|(service, id, sidecar)| {
            Some(Admin { service: service.to_owned(), id: id.to_owned(), addr: sidecar.bound.get("admin")?.clone() })
        })
        .collect();
    // The same exports in a file, for `source`, so the live screen can name it in one line.
    let mut exports = format!("export FERRY_TOKEN=$(cat {})\nexport FERRY_CA_FILE={}\n", admin_file.display(), ca_file.display());
    say!("ferryctl       paste these two lines to use ferryctl (and curl) against this mesh:");
    say!("                 export FERRY_TOKEN=$(cat {})", admin_file.display());
    say!("                 export FERRY_CA_FILE={}", ca_file.display());
    if control_plane_url != "https://127.0.0.1:7070" {
        say!("               and: export FERRY_CONTROL_PLANE={control_plane_url}");
        exports.push_str(&format!("export FERRY_CONTROL_PLANE={control_plane_url}\n"));
    }
    exports.push_str(&admins::env_lines(&admins));
    let env_file = dir.join("env");
    std::fs::write(&env_file, exports).with_context(|| format!("writing {}", env_file.display()))?;
    say!("               or: source {}", env_file.display());
    // What stays at the top of the live screen: where everything is.
    let mut header = vec![
        format!("grpc {control_plane_url}  api {}  dashboard {}/ui/", api.base(), api.base()),
        format!("client sidecar {client_outbound} (admin {})  logs {}", client.addr("admin")?, logs.display()),
        format!("ferryctl/curl: source {}  (sidecar admins: ? or $FERRY_DEMO_*_ADMIN)", env_file.display()),
    ];
    header.extend(port_notes(&bound));
    say!(
        "routes         curl -s --cacert \"$FERRY_CA_FILE\" -H \"authorization: Bearer $FERRY_TOKEN\" -H 'content-type: application/yaml' --data-binary @{} {}/v1/apply",
        Scenario::Canary.path(),
        api.base()
    );
    let ferryctl = "ferryctl".to_owned();
    say!(
        "               or {ferryctl} apply -f {}: the summary shows the routes in force, whoever applied them",
        Scenario::Canary.path()
    );
    if keys {
        say!("               or type a key: {}", actions::keys_help());
    }
    say!();

    let traffic = Arc::new(Traffic::default());
    let in_flight = Arc::new(Semaphore::new(32));
    let driver = tokio::spawn(traffic::drive(
        http.clone(),
        client_outbound,
        options.rate,
        traffic.clone(),
        in_flight.clone(),
        stop_traffic.clone(),
    ));

    // On a terminal, lines that scroll wrap at word boundaries rather than mid-word.
    let terminal = std::io::stdout().is_terminal();
    let full_screen = options.duration.is_none() && terminal;
    let mut lines = keys.then(actions::read_lines);
    let (mut routing, mut outcomes) = Routing::new(api.clone(), &instances);
    if let Some(scenario) = options.scenario {
        routing.apply_when_warm(scenario, &instances);
    }
    // Someone may change the routes from another shell: the summary shows what is in force.
    let (mut routes_seen, poller) = in_force::watch(api.clone(), Duration::from_secs(1));
    let started = Instant::now();
    let mut recent: VecDeque<Vec<u64>> = VecDeque::from([served(&instances)]);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut failure = None;
    // Ctrl-C or SIGTERM ends the run cleanly: children stopped, working directory removed.
    let stop = ferry_runtime::shutdown_signal();
    tokio::pin!(stop);
    loop {
        // Whether a second has passed, rather than a key typed or an action finished.
        let second = tokio::select! {
            _ = tick.tick() => true,
            () = &mut stop => break,
            line = next_line(&mut lines) => {
                let Some(line) = line else {
                    // Stdin closed: no more keys.
                    lines = None;
                    continue;
                };
                let note = match Action::parse(&line) {
                    Some(Action::Quit) => break,
                    Some(Action::Help) => routing.note(admins::help(&admins)),
                    Some(action) => routing.start(action),
                    None if line.trim().is_empty() => continue,
                    None => routing.note(format!("{:?} is not a key; {}", line.trim(), actions::keys_help())),
                };
                if !full_screen {
                    say_wrapped(note, terminal);
                }
                false
            }
            Some(outcome) = outcomes.recv() => {
                let report = routing.finish(outcome, &traffic, &instances);
                // The whole answer, diff and all; the live screen shows a few lines of it.
                let actions_log = logs.join("actions.log");
                if let Err(error) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&actions_log)
                    .and_then(|mut file| std::io::Write::write_all(&mut file, format!("{report}\n").as_bytes()))
                {
                    tracing::debug!(%error, file = %actions_log.display(), "cannot keep the action's answer");
                }
                if !full_screen {
                    say_wrapped(report, terminal);
                }
                false
            }
        };
        if second {
            recent.push_back(served(&instances));
            if recent.len() > LIVE_SPAN + 1 {
                recent.pop_front();
            }
            let seen = routes_seen.borrow().clone();
            if let Some(note) = routing.observe(seen, &traffic, &instances)
                && !full_screen
            {
                say_wrapped(&note, terminal);
            }
        }
        if full_screen || second {
            let health = health(&mut registry).await;
            let (since, span) = routing.live_since(&recent, LIVE_SPAN_WORDS);
            let routes = routing.in_force();
            let view = Summary {
                elapsed: started.elapsed(),
                traffic: &traffic,
                instances: &instances,
                health: &health,
                since,
                span: &span,
                routes: (&routes.0, &routes.1),
                keys,
                last_action: routing.last_action.as_deref(),
            };
            if full_screen {
                show!("\x1b[2J\x1b[H{}", view.frame(&header));
            } else {
                say_wrapped(&view.line(), terminal);
            }
        }
        // Nobody reads the output any more (`ferry-demo | head`): stop as on Ctrl-C.
        if out::closed() {
            break;
        }
        if !second {
            continue;
        }
        if let Some(dead) = instances
            .iter_mut()
            .map(|i| &mut i.sidecar)
            .chain([&mut client])
            .find_map(|p| p.exited().map(|s| (p.name.clone(), s, p.log.clone())))
        {
            failure = Some(format!("{} exited ({}); see {}", dead.0, dead.1, dead.2.display()));
            break;
        }
        if options.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }

    // The rate is over the time traffic ran, not the shutdown that follows.
    let ran_for = started.elapsed();
    stop_traffic.cancel();
    let _ = driver.await;
    // Let requests already sent finish.
    let _ = tokio::time::timeout(Duration::from_secs(5), in_flight.acquire_many(32)).await;
    // A last look at the routes, asked after the last request ended, so that a change made
    // from another shell up to the end is not judged as the demo's.
    let drained = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while routes_seen.borrow_and_update().as_ref().is_none_or(|seen| seen.asked_at < drained) {
            if routes_seen.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let seen = routes_seen.borrow().clone();
    if let Some(note) = routing.observe(seen, &traffic, &instances) {
        say_wrapped(&note, terminal);
    }
    poller.abort();
    stop_apps.cancel();
    let health = health(&mut registry).await;
    let (since, span) = routing.window_since();
    let window = span.to_owned();
    let routes = routing.in_force();
    let view = Summary {
        elapsed: ran_for,
        traffic: &traffic,
        instances: &instances,
        health: &health,
        since,
        span,
        routes: (&routes.0, &routes.1),
        keys: false,
        last_action: None,
    };
    say!();
    say_wrapped(&view.render(), terminal);
    say!();

    let verdict = routing.verdict(&traffic, &instances).map_err(anyhow::Error::msg)?;
    for line in &verdict.lines {
        say_wrapped(line, terminal);
    }
    let idle: Vec<String> =
        instances.iter().filter(|i| i.counters.served.load(Ordering::Relaxed) == 0).map(|i| i.id.clone()).collect();
    for instance in instances {
        instance.sidecar.stop().await;
    }
    client.stop().await;
    control_plane.stop().await;

    let success = failure.is_none() && routing.failures.is_empty() && idle.is_empty() && verdict.passed;
    if let Some(failure) = failure {
        bail!(failure);
    }
    for failure in &routing.failures {
        say_wrapped(&format!("FAILED: {failure}"), terminal);
    }
    if !idle.is_empty() {
        say_wrapped(&format!("FAILED: no traffic reached {}", idle.join(", ")), terminal);
    }
    let last = match routing.active {
        _ if !verdict.passed => format!("FAILED: {}: the traffic did not do what it should (see above)", verdict.label),
        _ if !verdict.judged && success => "traffic flowed through every instance; the routes in force at the end were changed \
                                            outside the demo, so their traffic is reported (above), not judged"
            .to_owned(),
        // The window of a run without routes is the whole run; after a reset, it starts there.
        None if success => format!("traffic flowed through every instance without errors {window}"),
        Some((scenario, _)) if success => {
            format!("traffic flowed through every instance and did what the {} scenario says", scenario.name())
        }
        _ => String::new(),
    };
    if !last.is_empty() {
        say_wrapped(&last, terminal);
    }
    Ok(success)
}

/// Prints `text`; on a `terminal`, its lines longer than 100 columns wrap at word boundaries
/// (a pipe or a file gets each line whole, for grep).
fn say_wrapped(text: &str, terminal: bool) {
    for line in text.lines() {
        if terminal {
            for row in text::wrap(line, text::WIDTH) {
                say!("{row}");
            }
        } else {
            say!("{line}");
        }
    }
}

fn args(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// Starts the control plane, keeping its store in `data`, on `ports` (gRPC, HTTP, DNS).
async fn start_control_plane(name: &str, data: &Path, logs: &Path, ports: &[Port; 3]) -> anyhow::Result<Process> {
    let [grpc, http, dns] = ports;
    let args =
        args(&["--grpc", &grpc.arg(), "--http", &http.arg(), "--dns", &dns.arg(), "--data-dir", &data.display().to_string()]);
    Process::start(CONTROL_PLANE, name, &args, logs).await
}

/// Writes a secret to a file only its owner can read.
fn write_private(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(secret.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Starts the sidecar the traffic goes through, on `ports` (outbound, admin).
async fn start_client(name: &str, reach: &Reach, logs: &Path, ports: &[Port; 2]) -> anyhow::Result<Process> {
    let [outbound, admin] = ports;
    let mut args = reach.args(CLIENT_SERVICE);
    args.extend(self::args(&[
        "--service",
        CLIENT_SERVICE,
        "--outbound",
        &outbound.arg(),
        "--admin",
        &admin.arg(),
        "--upstream",
        "frontend=127.0.0.1:0",
    ]));
    Process::start(SIDECAR, name, &args, logs).await
}

/// The requests each instance has served.
fn served(instances: &[Instance]) -> Vec<u64> {
    instances.iter().map(|i| i.counters.served.load(Ordering::Relaxed)).collect()
}

/// The next typed line; never, when keys are not read.
async fn next_line(lines: &mut Option<mpsc::Receiver<String>>) -> Option<String> {
    match lines {
        Some(lines) => lines.recv().await,
        None => std::future::pending().await,
    }
}

/// Starts one app instance with its sidecar.
async fn start_instance(
    service: &'static str,
    n: usize,
    version: &'static str,
    reach: &Reach,
    logs: &Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<Instance> {
    let id = format!("{service}-{n}");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let app = listener.local_addr()?;
    let zone = if n % 2 == 1 { "demo-a" } else { "demo-b" };
    // Each sidecar checks its app: inventory over gRPC health, the others over HTTP.
    let check = if service == "inventory" { "grpc:ferry.demo.v1.Inventory,interval=2s" } else { "http:/healthz,interval=2s" };
    let mut flags = reach.args(service);
    flags.extend(args(&[
        "--service",
        service,
        "--id",
        &id,
        "--app",
        &app.to_string(),
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--meta",
        &format!("version={version}"),
        "--zone",
        zone,
        "--check",
        check,
    ]));
    let sidecar = Process::start(SIDECAR, &format!("{id}-sidecar"), &flags, logs).await?;
    let calls = apps::Calls::Sidecar(sidecar.addr("outbound")?);
    let counters = Arc::new(Counters::default());
    let stop = shutdown.clone().cancelled_owned();
    let task = match service {
        "inventory" => tokio::spawn(apps::inventory(listener, id.clone(), counters.clone(), stop)),
        "catalog" => tokio::spawn(apps::catalog(listener, id.clone(), version, calls, counters.clone(), stop)),
        _ => tokio::spawn(apps::frontend(listener, id.clone(), calls, counters.clone(), stop)),
    };
    let name = id.clone();
    tokio::spawn(async move {
        if let Ok(Err(error)) = task.await {
            eprintln!("{name}: {error:#}");
        }
    });
    Ok(Instance { service, id, version, counters, sidecar })
}

/// Waits until a sidecar's admin `/ready` answers 200.
async fn wait_ready(http: &HttpClient, sidecar: &Process) -> anyhow::Result<()> {
    let admin: SocketAddr = sidecar.addr("admin")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let uri = format!("http://{admin}/ready");
        let request = http::Request::get(uri).body(Empty::new())?;
        if let Ok(response) = http.request(request).await
            && response.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} is not ready after 30s; see {}", sidecar.name, sidecar.log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the sidecar `client` holds `count` passing endpoints of `service`.
async fn wait_client_sees(http: &HttpClient, client: &Process, service: &str, count: usize) -> anyhow::Result<()> {
    use http_body_util::BodyExt as _;
    let admin: SocketAddr = client.addr("admin")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = http::Request::get(format!("http://{admin}/config")).body(Empty::new())?;
        if let Ok(response) = http.request(request).await
            && let Ok(body) = response.into_body().collect().await
            && let Ok(config) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
        {
            let endpoints = config["services"][service]["endpoints"].as_array().cloned().unwrap_or_default();
            if endpoints.iter().filter(|e| e["health"] == "passing").count() >= count {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not see {count} passing {service} endpoints within 30s; see {}", client.name, client.log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the registry lists `replicas` passing instances of every service.
async fn wait_registered(registry: &mut RegistryClient<ApiChannel>, replicas: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    'services: for service in SERVICES {
        loop {
            let request = v1::ListInstancesRequest { service: service.into(), passing_only: true, ..Default::default() };
            if let Ok(response) = registry.list_instances(request).await
                && response.into_inner().instances.len() >= replicas
            {
                continue 'services;
            }
            if Instant::now() > deadline {
                bail!("{service} did not reach {replicas} passing instances within 30s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// The health of every instance, by id, as the control plane reports it.
async fn health(registry: &mut RegistryClient<ApiChannel>) -> HashMap<String, String> {
    let mut health = HashMap::new();
    for service in SERVICES {
        let request = v1::ListInstancesRequest { service: service.into(), passing_only: false, ..Default::default() };
        if let Ok(response) = registry.list_instances(request).await {
            for instance in response.into_inner().instances {
                let label = v1::Health::try_from(instance.health).map_or("unknown", |h| match h {
                    v1::Health::Passing => "passing",
                    v1::Health::Warning => "warning",
                    v1::Health::Critical => "critical",
                    v1::Health::Draining => "draining",
                    v1::Health::Unspecified | v1::Health::NotChecked => "unknown",
                });
                health.insert(instance.id, label.to_owned());
            }
        }
    }
    health
}
