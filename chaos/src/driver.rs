//! The load generator, run as its own process inside the load host's namespace, beside a sidecar
//! of its own: steady traffic at a fixed rate through that sidecar (HTTP/1.1 and h2c GETs and
//! POSTs with a unique id to `frontend`, gRPC health checks to `catalog`), a registration
//! written to the control plane's API every so often, and the registry's view of `catalog`
//! polled. Each outcome is one JSON line in its output file, stamped with the wall clock, which
//! the suite splits into the faults' windows afterwards.

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use ferry_tests::client;
use http::Request;
use http_body_util::Empty;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::{ID_HEADER, app::RELAYED_ERROR, now_ms};

/// How long one request may take before the load generator counts it failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests in flight at most; past it a tick is counted failed (`client_backlog`) instead of
/// piling up.
const MAX_IN_FLIGHT: usize = 256;

/// The service the registrations are written under.
pub const WRITES_SERVICE: &str = "chaos-writes";

/// What one line of the output file says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Unix milliseconds when the request was sent (or the poll answered).
    pub t: u64,
    pub kind: Kind,
    pub ok: bool,
    /// The HTTP status, or 0 when there was none.
    pub status: u16,
    /// Why it failed (the mesh's reason when it gave one); for a registry poll, what it showed.
    pub reason: String,
    /// The POST's or registration's id.
    pub id: String,
    /// How long it took, in milliseconds.
    pub ms: u32,
}

/// What a record is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// GET over HTTP/1.1 through the sidecar as a proxy.
    H1,
    /// GET over h2c with prior knowledge.
    H2,
    /// `grpc.health.v1.Health/Check` to catalog.
    Grpc,
    /// POST over HTTP/1.1 with a unique id: not idempotent.
    Post,
    /// A registration written to the control plane.
    Write,
    /// What the registry said of catalog's instances.
    Registry,
}

impl Kind {
    /// Whether the request may be repeated safely (the mesh retries those on a reset).
    pub fn idempotent(self) -> bool {
        matches!(self, Kind::H1 | Kind::H2 | Kind::Grpc)
    }
}

/// What the `drive` subcommand was given.
#[derive(Debug, clap::Args)]
pub struct DriveArgs {
    /// The local sidecar's outbound listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub proxy: SocketAddr,
    /// Requests a second, all kinds together.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// A bound on the whole run, whatever the suite says.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stop_after: Duration,
    /// The file records are appended to.
    #[arg(long)]
    pub out: PathBuf,
    /// The control plane's HTTP API.
    #[arg(long)]
    pub api: SocketAddr,
    /// The control plane's CA bundle.
    #[arg(long)]
    pub ca_file: PathBuf,
    /// The admin token's file.
    #[arg(long)]
    pub token_file: PathBuf,
    /// Time between registrations.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub write_every: Duration,
    /// A prefix for ids, new for each run.
    #[arg(long)]
    pub run_id: String,
}

/// Runs the load until `--stop-after` or SIGTERM, then waits for what is in flight.
pub async fn run(args: DriveArgs) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.out)?;
    let (lines, received) = mpsc::channel::<Record>();
    let writer = std::thread::spawn(move || {
        for record in received {
            if let Ok(mut line) = serde_json::to_vec(&record) {
                line.push(b'\n');
                let _ = file.write_all(&line);
            }
        }
    });
    let ca = std::fs::read_to_string(&args.ca_file)?;
    let token = std::fs::read_to_string(&args.token_file)?.trim().to_owned();
    let api = ferry_tls::api::HttpApi::new(args.api, Some(&ca), Some(token)).map_err(anyhow::Error::msg)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    eprintln!("ferry-chaos drive listening rate={} proxy={}", args.rate, args.proxy);

    let stopped = Stop::new(false);
    let traffic = tokio::spawn(traffic(args.proxy, args.rate, args.run_id.clone(), lines.clone(), stopped.clone()));
    let writes = tokio::spawn(writes(api.clone(), args.write_every, args.run_id.clone(), lines.clone(), stopped.clone()));
    let registry = tokio::spawn(registry(api, lines.clone(), stopped.clone()));
    tokio::select! {
        _ = term.recv() => {}
        () = tokio::time::sleep(args.stop_after) => {}
    }
    stopped.send_replace(true);
    let _ = tokio::join!(traffic, writes, registry);
    drop(lines);
    let _ = writer.join();
    Ok(())
}

/// The flag every loop of the driver watches.
type Stop = tokio::sync::watch::Sender<bool>;

async fn traffic(proxy: SocketAddr, rate: u32, run_id: String, lines: mpsc::Sender<Record>, stop: Stop) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let grpc = client::grpc_channel(proxy, "catalog");
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopped = stop.subscribe();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        n += 1;
        let kind = match n % 10 {
            0..=3 => Kind::H1,
            4 | 5 => Kind::H2,
            6 | 7 => Kind::Grpc,
            _ => Kind::Post,
        };
        let id = format!("{run_id}-{n}");
        let t = now_ms();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let _ = lines.send(Record { t, kind, ok: false, status: 0, reason: "client_backlog".into(), id, ms: 0 });
            continue;
        };
        let (lines, grpc) = (lines.clone(), grpc.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let (ok, status, reason) = match tokio::time::timeout(REQUEST_TIMEOUT, send(proxy, kind, &id, grpc)).await {
                Ok(outcome) => outcome,
                Err(_) => (false, 0, "client_timeout".to_owned()),
            };
            let ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
            let _ = lines.send(Record { t, kind, ok, status, reason, id, ms });
            drop(slot);
        });
    }
    // Waits for what is in flight, within a request's timeout.
    let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, slots.acquire_many(MAX_IN_FLIGHT as u32)).await;
}

/// Sends one request of `kind`: whether it succeeded, its status, and why not.
async fn send(proxy: SocketAddr, kind: Kind, id: &str, grpc: tonic::transport::Channel) -> (bool, u16, String) {
    let answer = match kind {
        Kind::H1 => client::proxy_get(proxy, "http://frontend/items").await,
        Kind::H2 => client::h2_get(proxy, "frontend", "/items").await,
        Kind::Post => {
            let request = Request::post("http://frontend/orders")
                .header(http::header::HOST, "frontend")
                .header(ID_HEADER, id)
                .body(Empty::<Bytes>::new());
            match request {
                Ok(request) => client::send_h1(proxy, request).await,
                Err(error) => Err(error.into()),
            }
        }
        Kind::Grpc => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(grpc);
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            return match health.check(request).await {
                Ok(response) if response.get_ref().status == 1 => (true, 200, String::new()),
                Ok(response) => (false, 200, format!("not_serving: {}", response.get_ref().status)),
                Err(status) => {
                    let reason = status.metadata().get("x-ferry-error").and_then(|v| v.to_str().ok()).map(reason_of);
                    (false, 0, reason.unwrap_or_else(|| format!("grpc_{:?}", status.code()).to_lowercase()))
                }
            };
        }
        Kind::Write | Kind::Registry => return (false, 0, "not_traffic".into()),
    };
    match answer {
        Ok((status, _, _)) if status.is_success() => (true, status.as_u16(), String::new()),
        Ok((status, headers, _)) => {
            let reason = ["x-ferry-error", RELAYED_ERROR]
                .iter()
                .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
                .map(reason_of)
                .unwrap_or_else(|| format!("status_{}", status.as_u16()));
            (false, status.as_u16(), reason)
        }
        Err(error) => (false, 0, format!("client_error: {}", first_words(&error.to_string()))),
    }
}

/// The reason of an `x-ferry-error` value: the words before its colon.
pub fn reason_of(value: &str) -> String {
    value.split(':').next().unwrap_or(value).trim().to_owned()
}

fn first_words(text: &str) -> String {
    text.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
}

async fn writes(api: ferry_tls::api::HttpApi, every: Duration, run_id: String, lines: mpsc::Sender<Record>, stop: Stop) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopped = stop.subscribe();
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        n += 1;
        let id = format!("{run_id}-w{n}");
        let body = serde_json::json!({
            "id": id, "service": WRITES_SERVICE, "address": "192.0.2.1", "port": 1 + n % 65_000,
        });
        let (t, started) = (now_ms(), Instant::now());
        let call = api.call(http::Method::PUT, "/v1/instances", Some(("application/json", Bytes::from(body.to_string()))));
        let (ok, status, reason) = match tokio::time::timeout(Duration::from_secs(8), call).await {
            Ok(Ok((status, _, _))) if status.is_success() => (true, status.as_u16(), String::new()),
            Ok(Ok((status, _, body))) => (false, status.as_u16(), first_words(&String::from_utf8_lossy(&body))),
            Ok(Err(error)) => (false, 0, format!("client_error: {}", first_words(&error.to_string()))),
            Err(_) => (false, 0, "client_timeout".into()),
        };
        let ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
        let _ = lines.send(Record { t, kind: Kind::Write, ok, status, reason, id, ms });
    }
}

/// Polls the registry's view of catalog four times a second and records each change.
async fn registry(api: ferry_tls::api::HttpApi, lines: mpsc::Sender<Record>, stop: Stop) {
    let mut stopped = stop.subscribe();
    let mut last = String::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        let call = api.call(http::Method::GET, "/v1/services/catalog", None);
        let (ok, view) = match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok((status, _, body))) if status.is_success() => (true, instances(&body)),
            Ok(Ok((status, _, _))) => (false, format!("status_{status}")),
            Ok(Err(_)) => (false, "unreachable".to_owned()),
            Err(_) => (false, "timeout".to_owned()),
        };
        if view != last {
            let _ = lines.send(Record {
                t: now_ms(),
                kind: Kind::Registry,
                ok,
                status: 0,
                reason: view.clone(),
                id: String::new(),
                ms: 0,
            });
            last = view;
        }
    }
}

/// `id=health,...` of a `GET /v1/services/NAME` answer, sorted by id.
fn instances(body: &[u8]) -> String {
    let body: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let mut view: Vec<String> = body["instances"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|i| {
                    format!(
                        "{}={}",
                        i["id"].as_str().unwrap_or("?"),
                        i["health"].as_str().unwrap_or("?").trim_start_matches("HEALTH_").to_lowercase()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    view.sort();
    view.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_the_words_before_the_colon() {
        assert_eq!(reason_of("no_endpoints: catalog has no passing endpoint"), "no_endpoints");
        assert_eq!(reason_of("upstream_timeout"), "upstream_timeout");
    }

    #[test]
    fn the_registry_view_lists_instances_by_id_with_their_health() {
        let body = br#"{"instances": [{"id": "catalog-2", "health": "HEALTH_CRITICAL"}, {"id": "catalog-1", "health": "HEALTH_PASSING"}]}"#;
        assert_eq!(instances(body), "catalog-1=passing,catalog-2=critical");
    }

    #[test]
    fn only_gets_and_health_checks_are_idempotent() {
        assert!(Kind::H1.idempotent() && Kind::H2.idempotent() && Kind::Grpc.idempotent());
        assert!(!Kind::Post.idempotent());
    }
}
