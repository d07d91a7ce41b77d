//! The `ferry-demo` launcher: a control plane, two replicas of each demo service with a sidecar
//! each, a client sidecar, and traffic through all of it, summarised live.
//!
//! Every request crosses the mesh three times: client → frontend (HTTP), frontend → catalog
//! (HTTP, service named in `Host`), catalog → inventory (gRPC, service named in `:authority`),
//! each time from the caller's sidecar to the callee's.

use std::{
    collections::HashMap,
    io::IsTerminal,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use ferry_proto::v1::{self, registry_client::RegistryClient};
use http_body_util::Empty;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::apps::{self, Counters, Page};

pub mod process;

use self::process::{CONTROL_PLANE, Process, SIDECAR, preferred, preferred_udp};

/// The demo's services, in start order (callees first).
const SERVICES: [&str; 3] = ["inventory", "catalog", "frontend"];

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this long and report; run until Ctrl-C when `None`.
    pub duration: Option<Duration>,
    /// Requests per second sent to frontend.
    pub rate: u32,
    /// Instances per service.
    pub replicas: usize,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// One app instance with its sidecar.
struct Instance {
    service: &'static str,
    id: String,
    counters: Arc<Counters>,
    sidecar: Process,
}

/// What the traffic driver has seen.
#[derive(Default)]
struct Traffic {
    ok: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_path: Mutex<Option<String>>,
}

/// Runs the demo. Returns whether traffic flowed through every instance without errors.
pub async fn run(options: Options) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir().context("creating a working directory")?;
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    println!("ferry demo: starting a control plane and {} services with a sidecar each", options.replicas * SERVICES.len());

    let control_plane = Process::start(
        CONTROL_PLANE,
        "control-plane",
        &args(&[
            "--grpc",
            &preferred("127.0.0.1:7070"),
            "--http",
            &preferred("127.0.0.1:7071"),
            "--dns",
            &preferred_udp("127.0.0.1:8600"),
            "--data-dir",
            &dir.path().join("data").display().to_string(),
        ]),
        &logs,
    )
    .await?;
    let control_plane_url = format!("http://{}", control_plane.addr("grpc")?);
    // Apps stop only after the traffic has, so no request in flight meets a stopped app.
    let stop_apps = CancellationToken::new();
    let stop_traffic = CancellationToken::new();

    let mut instances = Vec::new();
    for service in SERVICES {
        for n in 1..=options.replicas {
            instances.push(start_instance(service, n, &control_plane_url, &logs, &stop_apps).await?);
        }
    }
    let mut client = Process::start(
        SIDECAR,
        "client-sidecar",
        &args(&[
            "--service",
            "demo-client",
            "--control-plane",
            &control_plane_url,
            "--outbound",
            &preferred("127.0.0.1:15001"),
            "--admin",
            &preferred("127.0.0.1:15000"),
            "--upstream",
            "frontend=127.0.0.1:0",
        ]),
        &logs,
    )
    .await?;
    let client_outbound = client.addr("outbound")?;
    let client_upstream = client.bound.get("upstreams").cloned().unwrap_or_default();

    let http: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    for sidecar in instances.iter().map(|i| &i.sidecar).chain([&client]) {
        wait_ready(&http, sidecar).await?;
    }
    let mut registry = RegistryClient::new(Channel::from_shared(control_plane_url.clone())?.connect().await?);
    wait_registered(&mut registry, options.replicas).await?;

    println!("control plane  grpc {control_plane_url}  http http://{}", control_plane.addr("http")?);
    println!("client sidecar {client_outbound}   try: curl -x http://{client_outbound} http://frontend/");
    println!("               admin http://{}/config   upstream port {client_upstream}", client.addr("admin")?);
    println!("logs           {}", logs.display());
    println!();

    let traffic = Arc::new(Traffic::default());
    let in_flight = Arc::new(Semaphore::new(32));
    let driver = tokio::spawn(drive(
        http.clone(),
        client_outbound,
        options.rate,
        traffic.clone(),
        in_flight.clone(),
        stop_traffic.clone(),
    ));

    let started = Instant::now();
    let interactive = options.duration.is_none() && std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut failure = None;
    // Ctrl-C or SIGTERM ends the run cleanly: children stopped, working directory removed.
    let stop = ferry_runtime::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut stop => break,
        }
        let health = health(&mut registry).await;
        if interactive {
            print!("\x1b[2J\x1b[H{}", summary(started.elapsed(), &traffic, &instances, &health));
        } else {
            println!(
                "{:>4}s  {} ok  {} errors",
                started.elapsed().as_secs(),
                traffic.ok.load(Ordering::Relaxed),
                traffic.errors.load(Ordering::Relaxed)
            );
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

    stop_traffic.cancel();
    let _ = driver.await;
    // Let requests already sent finish.
    let _ = tokio::time::timeout(Duration::from_secs(5), in_flight.acquire_many(32)).await;
    stop_apps.cancel();
    let health = health(&mut registry).await;
    println!("\n{}", summary(started.elapsed(), &traffic, &instances, &health));

    let ok = traffic.ok.load(Ordering::Relaxed);
    let errors = traffic.errors.load(Ordering::Relaxed);
    let idle: Vec<String> =
        instances.iter().filter(|i| i.counters.served.load(Ordering::Relaxed) == 0).map(|i| i.id.clone()).collect();
    for instance in instances {
        instance.sidecar.stop().await;
    }
    client.stop().await;
    control_plane.stop().await;

    let success = failure.is_none() && ok > 0 && errors == 0 && idle.is_empty();
    if !success {
        let kept = dir.keep();
        println!("logs kept in {}", kept.join("logs").display());
    }
    if let Some(failure) = failure {
        bail!(failure);
    }
    if success {
        println!("traffic flowed through every instance without errors");
    } else if ok == 0 {
        println!("FAILED: no request succeeded");
    } else if errors > 0 {
        println!("FAILED: {errors} requests failed");
    } else {
        println!("FAILED: no traffic reached {}", idle.join(", "));
    }
    Ok(success)
}

fn args(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// Starts one app instance with its sidecar.
async fn start_instance(
    service: &'static str,
    n: usize,
    control_plane: &str,
    logs: &Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<Instance> {
    let id = format!("{service}-{n}");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let app = listener.local_addr()?;
    let zone = if n % 2 == 1 { "demo-a" } else { "demo-b" };
    // Each sidecar checks its app: inventory over gRPC health, the others over HTTP.
    let check = if service == "inventory" { "grpc:ferry.demo.v1.Inventory,interval=2s" } else { "http:/healthz,interval=2s" };
    let sidecar = Process::start(
        SIDECAR,
        &format!("{id}-sidecar"),
        &args(&[
            "--service",
            service,
            "--id",
            &id,
            "--app",
            &app.to_string(),
            "--control-plane",
            control_plane,
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--meta",
            "version=v1",
            "--zone",
            zone,
            "--check",
            check,
        ]),
        logs,
    )
    .await?;
    let outbound = sidecar.addr("outbound")?;
    let counters = Arc::new(Counters::default());
    let stop = shutdown.clone().cancelled_owned();
    let task = match service {
        "inventory" => tokio::spawn(apps::inventory(listener, id.clone(), counters.clone(), stop)),
        "catalog" => tokio::spawn(apps::catalog(listener, id.clone(), outbound, counters.clone(), stop)),
        _ => tokio::spawn(apps::frontend(listener, id.clone(), outbound, counters.clone(), stop)),
    };
    let name = id.clone();
    tokio::spawn(async move {
        if let Ok(Err(error)) = task.await {
            eprintln!("{name}: {error:#}");
        }
    });
    Ok(Instance { service, id, counters, sidecar })
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

/// Waits until the registry lists `replicas` passing instances of every service.
async fn wait_registered(registry: &mut RegistryClient<Channel>, replicas: usize) -> anyhow::Result<()> {
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

/// Sends `rate` requests a second to frontend through the client sidecar until `shutdown`.
async fn drive(
    http: HttpClient,
    outbound: SocketAddr,
    rate: u32,
    traffic: Arc<Traffic>,
    in_flight: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let (http, traffic) = (http.clone(), traffic.clone());
        tokio::spawn(async move {
            match apps::get_json::<Page>(&http, outbound, "frontend", "/").await {
                Ok(page) => {
                    traffic.ok.fetch_add(1, Ordering::Relaxed);
                    let inventories: Vec<&str> = page.catalog.items.iter().map(|i| i.inventory.as_str()).collect();
                    let path = format!("{} -> {} -> {}", page.frontend, page.catalog.catalog, inventories.join(","));
                    *traffic.last_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path);
                }
                Err(error) => {
                    traffic.errors.fetch_add(1, Ordering::Relaxed);
                    *traffic.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
                }
            }
            drop(permit);
        });
    }
}

/// The health of every instance, by id, as the control plane reports it.
async fn health(registry: &mut RegistryClient<Channel>) -> HashMap<String, String> {
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
                    v1::Health::Unspecified => "unknown",
                });
                health.insert(instance.id, label.to_owned());
            }
        }
    }
    health
}

fn summary(elapsed: Duration, traffic: &Traffic, instances: &[Instance], health: &HashMap<String, String>) -> String {
    let ok = traffic.ok.load(Ordering::Relaxed);
    let errors = traffic.errors.load(Ordering::Relaxed);
    let rate = (ok + errors) as f64 / elapsed.as_secs_f64().max(0.001);
    let mut out = format!(
        "ferry demo  {}s  {} requests through frontend ({rate:.1}/s)  {errors} errors\n\
         client -> frontend -> catalog -> inventory (gRPC); every hop sidecar to sidecar\n\n",
        elapsed.as_secs(),
        ok + errors,
    );
    out.push_str(&format!("{:<10} {:<12} {:<9} {:>7} {:>7}\n", "SERVICE", "INSTANCE", "HEALTH", "SERVED", "FAILED"));
    for instance in instances {
        out.push_str(&format!(
            "{:<10} {:<12} {:<9} {:>7} {:>7}\n",
            instance.service,
            instance.id,
            health.get(&instance.id).map_or("-", String::as_str),
            instance.counters.served.load(Ordering::Relaxed),
            instance.counters.failed.load(Ordering::Relaxed),
        ));
    }
    if let Some(path) = traffic.last_path.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        out.push_str(&format!("\nlast request: {path}\n"));
    }
    if let Some(error) = traffic.last_error.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        out.push_str(&format!("last error:   {error}\n"));
    }
    out
}
