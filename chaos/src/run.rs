//! One run of the suite: the mesh set up, steady traffic started, each fault injected for a
//! bounded time and removed, recovery awaited (within a bound), and everything observed on the
//! way kept for the analysis: the load generator's records, the apps' request logs, the
//! callers' views of catalog, the route writes and what the control plane holds at the end.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;

use crate::{
    driver::{Kind, Record, WRITES_SERVICE},
    faults::{self, Fault},
    mesh::{self, APPS, Bins, Mesh},
    now_ms,
    soak::Samples,
};

/// How long each step takes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: &'static str,
    pub faults: Vec<Fault>,
    /// Steady traffic before the first fault, as the reference.
    pub baseline: Duration,
    /// How long each fault stays in.
    pub inject_for: Duration,
    /// The longest the suite waits after a removal for the mesh to converge.
    pub recover_within: Duration,
    /// Traffic kept flowing after convergence, still counted to the fault.
    pub settle: Duration,
    /// Requests a second.
    pub rate: u32,
    /// For a soak: the whole run's length; faults are then injected once a minute in turn.
    pub soak: Option<Duration>,
}

/// A stretch of the run: a fault's, or the steady traffic before the first fault.
#[derive(Debug, Clone)]
pub struct Window {
    pub fault: Option<Fault>,
    /// Why the fault was not injected, when it was not.
    pub skipped: Option<&'static str>,
    /// What the injection itself reported (how much a full disk took).
    pub note: Option<String>,
    pub start: u64,
    pub removed: u64,
    pub end: u64,
}

/// One caller's view of catalog at a moment: the endpoints it would route to (None: its admin
/// did not answer).
#[derive(Debug, Clone)]
pub struct View {
    pub t: u64,
    pub host: &'static str,
    pub routable: Option<Vec<String>>,
}

/// One Route write: when, its number, how, and whether the control plane acknowledged it.
#[derive(Debug, Clone)]
pub struct RouteWrite {
    pub t: u64,
    pub n: u64,
    pub via: &'static str,
    pub ok: bool,
    pub said: String,
}

/// What the control plane held at the end.
#[derive(Debug, Clone, Default)]
pub struct Readback {
    /// Registration ids it lists under the writes' service.
    pub registrations: Vec<String>,
    /// The number of the Route it holds, if it holds one.
    pub route: Option<u64>,
    /// Whether the read itself worked.
    pub error: Option<String>,
}

/// Everything a run observed.
pub struct Observations {
    pub plan: Plan,
    pub windows: Vec<Window>,
    pub records: Vec<Record>,
    /// Per app host: (millis, method, id) of each request it served.
    pub app_logs: BTreeMap<String, Vec<(u64, String, String)>>,
    pub views: Vec<View>,
    pub route_writes: Vec<RouteWrite>,
    pub readback: Readback,
    pub samples: Samples,
    /// Whether the kernel had `sch_netem`.
    pub netem: bool,
}

/// The services' policies, applied before any sidecar starts, as an operator would.
pub const POLICIES: &str = "\
kind: ServicePolicy
service: catalog
outlier_detection: { consecutive_failures: 3, base_ejection: 5s, max_ejection_percent: 50 }
---
kind: ServicePolicy
service: inventory
outlier_detection: { consecutive_failures: 3, base_ejection: 5s, max_ejection_percent: 50 }
---
kind: Route
service: frontend
rules:
  - name: default
    timeout: 4s
    retries: { attempts: 3, per_try_timeout: 2s, on: [connect-failure, refused-stream, reset] }
---
kind: Route
service: catalog
rules:
  - name: default
    timeout: 3s
    retries: { attempts: 3, per_try_timeout: 1s, on: [connect-failure, refused-stream, reset, unavailable] }
---
kind: Route
service: inventory
rules:
  - name: default
    timeout: 2s
    retries: { attempts: 3, per_try_timeout: 500ms, on: [connect-failure, refused-stream, reset] }
";

/// The Route write number `n`, on a service no traffic uses so that writing it does not
/// disturb what is measured.
fn route_yaml(n: u64) -> String {
    format!(
        "kind: Route\nservice: {WRITES_SERVICE}\nrules:\n  - name: write-{n}\n    response_headers: {{ set: {{ x-chaos-write: \"{n}\" }} }}\n"
    )
}

/// Sets the mesh up, runs `plan`, and gathers what it saw.
pub async fn run(plan: Plan, bins: Bins) -> anyhow::Result<Observations> {
    let mut mesh = Mesh::new(bins)?;
    eprintln!("ferry-chaos: hosts in namespaces {}; files in {}", mesh.lab.ns("*"), mesh.dir.display());
    setup(&mut mesh).await?;

    let total = planned_length(&plan);
    mesh.start_driver(plan.rate, total + Duration::from_secs(60)).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let views = Arc::new(Mutex::new(Vec::new()));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let watcher = tokio::spawn(watch_callers(mesh.lab.ns("frontend"), mesh.lab.ns("load"), views.clone(), stop.clone()));
    let writer = tokio::spawn(write_routes(mesh.access(), mesh.dir.clone(), writes.clone(), stop.clone()));
    let mut samples = Samples::default();
    wait_converged(&mesh, Duration::from_secs(20)).await;

    let mut windows = Vec::new();
    let start = now_ms();
    pause(&mesh, plan.baseline, &mut samples).await;
    windows.push(Window { fault: None, skipped: None, note: None, start, removed: now_ms(), end: now_ms() });
    let schedule: Vec<Fault> = match plan.soak {
        None => plan.faults.clone(),
        Some(length) => {
            let minutes = (length.as_secs() / 60).max(1) as usize;
            (0..minutes).map(|i| plan.faults[i % plan.faults.len()]).collect()
        }
    };
    for fault in schedule {
        if let Some(why) = faults::unsupported(fault, mesh.netem) {
            eprintln!("ferry-chaos: {} not run: {why}", fault.name());
            let t = now_ms();
            windows.push(Window { fault: Some(fault), skipped: Some(why), note: None, start: t, removed: t, end: t });
            continue;
        }
        let window_started = tokio::time::Instant::now();
        eprintln!("ferry-chaos: {} for {:?}", fault.name(), plan.inject_for);
        let start = now_ms();
        let injected = faults::inject(&mut mesh, fault).await.with_context(|| format!("injecting {}", fault.name()))?;
        let note = injected.note();
        pause(&mesh, plan.inject_for, &mut samples).await;
        let removed = now_ms();
        injected.remove(&mut mesh).await.with_context(|| format!("removing {}", fault.name()))?;
        let converged = converge(&mesh, plan.recover_within, &mut samples).await;
        if !converged {
            eprintln!("ferry-chaos: the mesh did not converge within {:?} after {}", plan.recover_within, fault.name());
        }
        pause(&mesh, plan.settle, &mut samples).await;
        if plan.soak.is_some() {
            // A fault a minute: the rest of the minute is steady traffic.
            let rest = Duration::from_secs(60).saturating_sub(window_started.elapsed());
            pause(&mesh, rest, &mut samples).await;
        }
        windows.push(Window { fault: Some(fault), skipped: None, note, start, removed, end: now_ms() });
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.await;
    let _ = watcher.await;
    mesh.stop_driver().await;
    let readback = read_back(&mesh).await;
    let records = read_records(&mesh.records())?;
    let mut app_logs = BTreeMap::new();
    for (host, _, _) in APPS {
        app_logs.insert(host.to_owned(), read_app_log(&mesh.app_log(host)));
    }
    let views = std::mem::take(&mut *views.lock().unwrap_or_else(|p| p.into_inner()));
    let route_writes = std::mem::take(&mut *writes.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Observations { plan, windows, records, app_logs, views, route_writes, readback, samples, netem: mesh.netem })
}

/// The longest the fault phase can take.
fn planned_length(plan: &Plan) -> Duration {
    match plan.soak {
        Some(length) => length + plan.baseline + plan.recover_within * 2,
        None => plan.baseline + (plan.inject_for + plan.recover_within + plan.settle) * plan.faults.len() as u32,
    }
}

async fn setup(mesh: &mut Mesh) -> anyhow::Result<()> {
    mesh.start_control_plane().await?;
    let (status, body) = mesh.api_call("POST", "/v1/apply", Some(("application/yaml", POLICIES))).await;
    anyhow::ensure!(status == 200, "applying the policies: {status} {body}");
    for (host, service, _) in APPS.iter().rev() {
        mesh.start_app(host).await?;
        mesh.start_sidecar(host, service, true).await?;
    }
    mesh.start_sidecar("load", "load", false).await?;
    for (service, count) in [("frontend", 1), ("catalog", 2), ("inventory", 1)] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = mesh.api_call("GET", &format!("/v1/services/{service}?passing"), None).await;
            let listed = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|b| b["instances"].as_array().map(Vec::len))
                .unwrap_or(0);
            if status == 200 && listed == count {
                break;
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "{service} has {listed} passing instances, not {count}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Waits `length`, sampling every process's memory and descriptors each second.
async fn pause(mesh: &Mesh, length: Duration, samples: &mut Samples) {
    let until = tokio::time::Instant::now() + length;
    while tokio::time::Instant::now() < until {
        samples.take(&mesh.pids());
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
}

/// Whether the mesh is whole again: the registry lists both catalog instances passing, and
/// both callers would route to both.
async fn converged(mesh: &Mesh) -> bool {
    let (status, body) = mesh.api_call("GET", "/v1/services/catalog?passing", None).await;
    let passing =
        serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|b| b["instances"].as_array().map(Vec::len)).unwrap_or(0);
    if status != 200 || passing != 2 {
        return false;
    }
    for host in ["frontend", "load"] {
        if mesh.routable_catalog(host).await.map(|r| r.len()) != Some(2) {
            return false;
        }
    }
    // And catalog-1 takes its share again: a fault that leaves it starved would hide what the
    // next one does to it.
    let now = now_ms();
    let recent = |host: &str| recent_requests(&mesh.app_log(host), now.saturating_sub(2000));
    let (first, second) = (recent("catalog-1"), recent("catalog-2"));
    first + second >= 5 && first as f64 >= SHARE * (first + second) as f64
}

/// The share of catalog's requests an instance must take for catalog to count as whole.
pub const SHARE: f64 = 0.2;

/// How many requests the app log at `path` recorded since `since`, read from its tail.
fn recent_requests(path: &std::path::Path, since: u64) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else { return 0 };
    let length = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(64 * 1024)));
    let mut tail = String::new();
    let _ = file.read_to_string(&mut tail);
    tail.lines().filter_map(|l| l.split(' ').next()?.parse::<u64>().ok()).filter(|t| *t >= since).count()
}

/// Waits until [`converged`], sampling meanwhile, at most `within`.
async fn converge(mesh: &Mesh, within: Duration, samples: &mut Samples) -> bool {
    let until = tokio::time::Instant::now() + within;
    loop {
        samples.take(&mesh.pids());
        if converged(mesh).await {
            return true;
        }
        if tokio::time::Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_converged(mesh: &Mesh, within: Duration) {
    let mut samples = Samples::default();
    if !converge(mesh, within, &mut samples).await {
        eprintln!("ferry-chaos: the callers do not route to both catalog instances yet; going on");
    }
}

/// Polls what the two callers of catalog (frontend's sidecar and the load generator's) would
/// route to, twice a second, and keeps each change.
async fn watch_callers(frontend: String, load: String, views: Arc<Mutex<Vec<View>>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut last: BTreeMap<&'static str, Option<Vec<String>>> = BTreeMap::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for (host, ns) in [("frontend", &frontend), ("load", &load)] {
            let routable = mesh::routable_catalog(ns).await;
            if last.get(host) != Some(&routable) {
                last.insert(host, routable.clone());
                views.lock().unwrap_or_else(|p| p.into_inner()).push(View { t: now_ms(), host, routable });
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Writes a Route every two seconds, in turn with `ferryctl apply` and `POST /v1/apply`.
async fn write_routes(
    access: mesh::Access,
    dir: std::path::PathBuf,
    writes: Arc<Mutex<Vec<RouteWrite>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let yaml = route_yaml(n);
        let t = now_ms();
        let (via, ok, said) = if n % 2 == 0 {
            let file = dir.join("route.yaml");
            let _ = std::fs::write(&file, &yaml);
            let (ok, said) = access.ferryctl(&["apply", "-f", &file.display().to_string()]).await;
            ("ferryctl apply", ok, said)
        } else {
            let (status, body) = access.api_call("POST", "/v1/apply", Some(("application/yaml", &yaml))).await;
            let said = match status {
                0 => "no answer".to_owned(),
                _ => format!("{status} {}", body.chars().take(120).collect::<String>()),
            };
            ("POST /v1/apply", status == 200, said)
        };
        writes.lock().unwrap_or_else(|p| p.into_inner()).push(RouteWrite { t, n, via, ok, said });
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Reads back every registration and the Route the control plane holds.
async fn read_back(mesh: &Mesh) -> Readback {
    let mut readback = Readback::default();
    let (status, body) = mesh.api_call("GET", &format!("/v1/services/{WRITES_SERVICE}"), None).await;
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(listed) if status == 200 => {
            readback.registrations = listed["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect();
        }
        _ => readback.error = Some(format!("GET /v1/services/{WRITES_SERVICE}: {status} {body}")),
    }
    let (status, body) = mesh.api_call("GET", &format!("/v1/routes/{WRITES_SERVICE}"), None).await;
    if status == 200 {
        readback.route = body.split("write-").nth(1).and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        });
    } else if status != 404 {
        readback.error = Some(format!("GET /v1/routes/{WRITES_SERVICE}: {status} {body}"));
    }
    readback
}

fn read_records(path: &std::path::Path) -> anyhow::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect())
}

fn read_app_log(path: &std::path::Path) -> Vec<(u64, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let t = parts.next()?.parse().ok()?;
            Some((t, parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

impl Observations {
    /// The load generator's traffic records (requests, not writes or registry polls).
    pub fn traffic(&self) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(|r| !matches!(r.kind, Kind::Write | Kind::Registry))
    }
}
