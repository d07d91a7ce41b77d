//! The traffic driver: requests to frontend through the client sidecar, one in
//! [`CANARY_EVERY`] opted into the canary with `x-canary: true`, and what came back.
//!
//! Results are counted per window: the span during which one scenario (or none) was in force.
//! A request counts in the window it was sent in, so a scenario is judged only on requests sent
//! after it took effect.

use ferry_runtime::lock;
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::Empty;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::apps::{self, CANARY_HEADER, CallError, Calls, Page, Reply};

/// One request in this many carries `x-canary: true`.
pub const CANARY_EVERY: u64 = 5;
/// How many recent latencies a window keeps for its percentiles.
const LATENCIES: usize = 2000;

/// The HTTP client of the driver and the readiness checks.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// What the driver has seen.
#[derive(Default)]
pub struct Traffic {
    /// Over the whole run.
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    window: Mutex<Arc<Window>>,
    last_error: Mutex<Option<String>>,
    last_path: Mutex<Option<String>>,
}

/// What came back of the client sidecar's own calls to catalog, sent once a second beside the
/// traffic through frontend: what an authorization policy on catalog decides for a caller
/// other than frontend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Probes {
    /// Refused with 403 and `x-ferry-error: forbidden`.
    pub refused: u64,
    /// Answered by catalog.
    pub answered: u64,
    /// Failed for another reason.
    pub other: u64,
}

/// What came back of the requests sent while one scenario (or none) was in force.
pub struct Window {
    pub started: Instant,
    ok: AtomicU64,
    errors: AtomicU64,
    /// Successful requests by the catalog version that answered: (without, with) `x-canary`.
    versions: Mutex<BTreeMap<String, (u64, u64)>>,
    latencies: Mutex<VecDeque<Duration>>,
    probes: Mutex<Probes>,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            ok: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            versions: Mutex::default(),
            latencies: Mutex::default(),
            probes: Mutex::default(),
        }
    }
}

impl Traffic {
    /// The window requests are counted in now.
    pub fn window(&self) -> Arc<Window> {
        lock(&self.window).clone()
    }

    /// Starts a new window: requests sent from now on count there.
    pub fn new_window(&self) {
        *lock(&self.window) = Arc::new(Window::default());
    }

    /// The path of the last successful request.
    pub fn last_path(&self) -> Option<String> {
        lock(&self.last_path).clone()
    }

    /// The last error.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn record(&self, window: &Window, canary: bool, latency: Duration, result: Result<Reply<Page>, CallError>) {
        {
            let mut latencies = lock(&window.latencies);
            if latencies.len() == LATENCIES {
                latencies.pop_front();
            }
            latencies.push_back(latency);
        }
        match result {
            Ok(Reply { body: page, .. }) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                window.ok.fetch_add(1, Ordering::Relaxed);
                let mut versions = lock(&window.versions);
                let count = versions.entry(page.catalog_version.clone()).or_default();
                if canary {
                    count.1 += 1;
                } else {
                    count.0 += 1;
                }
                drop(versions);
                let inventories: Vec<&str> = page.catalog.items.iter().map(|i| i.inventory.as_str()).collect();
                let path = format!(
                    "{}client -> {} -> {} ({}) -> {}",
                    if canary { "(x-canary: true) " } else { "" },
                    page.frontend,
                    page.catalog.catalog,
                    page.catalog_version,
                    inventories.join(",")
                );
                *lock(&self.last_path) = Some(path);
            }
            Err(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                window.errors.fetch_add(1, Ordering::Relaxed);
                *lock(&self.last_error) = Some(error.to_string());
            }
        }
    }
}

impl Window {
    /// Requests that succeeded.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Requests that failed.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Successful requests by the catalog version that answered: (without, with) `x-canary`.
    pub fn versions(&self) -> BTreeMap<String, (u64, u64)> {
        lock(&self.versions).clone()
    }

    /// The client sidecar's own calls to catalog.
    pub fn probes(&self) -> Probes {
        *lock(&self.probes)
    }

    /// The 50th, 90th and 99th percentile latencies of the recent requests.
    pub fn percentiles(&self) -> Option<[Duration; 3]> {
        let mut sorted: Vec<Duration> = lock(&self.latencies).iter().copied().collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_unstable();
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Some([at(0.5), at(0.9), at(0.99)])
    }

    /// The share of the recent requests that took `at_least`, and how many requests that is of.
    pub fn slow_share(&self, at_least: Duration) -> Option<(f64, usize)> {
        let latencies = lock(&self.latencies);
        if latencies.is_empty() {
            return None;
        }
        let slow = latencies.iter().filter(|l| **l >= at_least).count();
        Some((slow as f64 / latencies.len() as f64, latencies.len()))
    }
}

/// Sends `rate` requests a second to frontend through the client sidecar until `shutdown`.
pub async fn drive(
    http: HttpClient,
    outbound: SocketAddr,
    rate: u32,
    traffic: Arc<Traffic>,
    in_flight: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 1u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let (http, traffic) = (http.clone(), traffic.clone());
        if n % u64::from(rate.max(1)) == 0 {
            let (http, traffic) = (http.clone(), traffic.clone());
            tokio::spawn(async move { probe(&http, outbound, &traffic).await });
        }
        let canary = n % CANARY_EVERY == 0;
        tokio::spawn(async move {
            let window = traffic.window();
            let mut headers = HeaderMap::new();
            if canary {
                headers.insert(CANARY_HEADER, HeaderValue::from_static("true"));
            }
            let started = Instant::now();
            let result = apps::get_json::<Page>(&http, Calls::Sidecar(outbound), "frontend", "/", headers).await;
            traffic.record(&window, canary, started.elapsed(), result);
            drop(permit);
        });
    }
}

/// Calls catalog straight from the client sidecar, as a service other than frontend would.
async fn probe(http: &HttpClient, outbound: SocketAddr, traffic: &Traffic) {
    let window = traffic.window();
    let result = apps::get_json::<serde_json::Value>(http, Calls::Sidecar(outbound), "catalog", "/items", HeaderMap::new()).await;
    let mut probes = lock(&window.probes);
    match result {
        Ok(_) => probes.answered += 1,
        Err(CallError::Status { status, mesh_error: Some(reason), .. })
            if status == http::StatusCode::FORBIDDEN && reason.starts_with("forbidden") =>
        {
            probes.refused += 1
        }
        Err(_) => probes.other += 1,
    }
}
