//! An open-loop load generator: requests are sent at a fixed rate whether or not earlier ones
//! have been answered, and each latency is measured from the request's *intended* send time, so
//! a stall delays every request scheduled behind it and shows in the percentiles (no coordinated
//! omission, as in wrk2 and Gil Tene's "How NOT to measure latency").
//!
//! A pacer thread (plain `thread::sleep`, precise to tens of microseconds where tokio's timer
//! wheel has a millisecond) hands each request's intended time to the generator's own
//! single-threaded tokio runtime. HTTP/1.1 requests queue for a fixed pool of keep-alive
//! connections (queueing counts as latency, as it would for an app); HTTP/2 requests are
//! spread over a few multiplexed h2c connections. How late the pacer itself dispatched is
//! reported too, so a saturated generator is visible rather than blamed on the proxy.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::{net::TcpStream, sync::mpsc, task::JoinSet};

/// The largest latency the histograms hold (60 s, in microseconds); larger ones saturate.
const MAX_MICROS: u64 = 60_000_000;

/// Which protocol a run speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "http1")]
    Http1,
    #[serde(rename = "h2c")]
    Http2,
}

impl Protocol {
    /// Both, in report order.
    pub const ALL: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];

    /// The short name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "h2c",
        }
    }
}

/// How an HTTP/1.1 request writes its target (RFC 9112, section 3.2). An HTTP/2 request always
/// carries the authority in `:authority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestForm {
    /// `GET / HTTP/1.1`, the authority in `Host`.
    Origin,
    /// `GET http://AUTHORITY/ HTTP/1.1`, as sent to an HTTP proxy, with the same authority in
    /// `Host` (RFC 9112 asks for both).
    Absolute,
}

/// One open-loop run.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    pub target: SocketAddr,
    /// Sent as `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub authority: String,
    /// How an HTTP/1.1 request names its target.
    pub form: RequestForm,
    pub protocol: Protocol,
    /// Requests per second.
    pub rate: u32,
    pub duration: Duration,
    /// HTTP/1.1 keep-alive connections, or h2c connections.
    pub connections: usize,
    /// A request not answered within this counts as an error.
    pub timeout: Duration,
}

/// When each request of a run is due, relative to its start: request `i` at `i / rate` seconds,
/// computed from `i` (not by adding intervals) so it never drifts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: u32,
    count: u64,
}

impl Schedule {
    /// `rate` requests per second for `duration`.
    pub fn new(rate: u32, duration: Duration) -> Self {
        let rate = rate.max(1);
        Self { rate, count: (duration.as_secs_f64() * f64::from(rate)).round() as u64 }
    }

    /// How many requests it holds.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// When request `i` is due, after the start.
    pub fn offset(&self, i: u64) -> Duration {
        let nanos = u128::from(i) * 1_000_000_000 / u128::from(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// What an open-loop run measured. Latencies are in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpenLoopResult {
    pub target_rps: u32,
    pub scheduled: u64,
    /// 2xx responses read to the end.
    pub ok: u64,
    /// Failed exchanges, other statuses, timeouts and requests still unanswered at the end.
    pub errors: u64,
    /// `ok` over the time from the first intended send to the last completion.
    pub achieved_rps: f64,
    pub seconds: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// How late the generator itself was in sending (p99): latency includes it.
    pub send_lag_p99_ms: f64,
}

struct Recorder {
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    ok: u64,
    errors: u64,
    last_done: Option<Instant>,
}

impl Recorder {
    fn new() -> anyhow::Result<Self> {
        let histogram = || Histogram::new_with_bounds(1, MAX_MICROS, 3).context("histogram bounds");
        Ok(Self { latency: histogram()?, lag: histogram()?, ok: 0, errors: 0, last_done: None })
    }

    fn record(&mut self, intended: Instant, sent: Instant, done: Instant, ok: bool) {
        self.lag.saturating_record(micros(sent.saturating_duration_since(intended)));
        if ok {
            self.ok += 1;
            self.latency.saturating_record(micros(done.saturating_duration_since(intended)));
        } else {
            self.errors += 1;
        }
        self.last_done = Some(self.last_done.map_or(done, |last| last.max(done)));
    }
}

type Shared = Arc<Mutex<Recorder>>;

fn lock(recorder: &Shared) -> MutexGuard<'_, Recorder> {
    recorder.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn millis(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Runs `config` to the end on a runtime of its own; call it from outside any tokio runtime.
pub fn run(config: &OpenLoop) -> anyhow::Result<OpenLoopResult> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the generator's runtime")?;
    runtime.block_on(drive(config))
}

async fn drive(config: &OpenLoop) -> anyhow::Result<OpenLoopResult> {
    let schedule = Schedule::new(config.rate, config.duration);
    let recorder: Shared = Arc::new(Mutex::new(Recorder::new()?));
    let (due, mut due_rx) = mpsc::unbounded_channel::<Instant>();
    let mut workers = JoinSet::new();

    // Every connection is open before the clock starts.
    match config.protocol {
        Protocol::Http1 => {
            let queue = Arc::new(tokio::sync::Mutex::new(due_rx));
            for _ in 0..config.connections.max(1) {
                let sender = connect_h1(config.target).await?;
                workers.spawn(h1_worker(config.clone(), sender, queue.clone(), recorder.clone()));
            }
        }
        Protocol::Http2 => {
            let mut senders = Vec::new();
            for _ in 0..config.connections.max(1) {
                senders.push(connect_h2(config.target).await?);
            }
            let (config, recorder) = (config.clone(), recorder.clone());
            workers.spawn(async move {
                let mut requests = JoinSet::new();
                let mut next = 0;
                while let Some(intended) = due_rx.recv().await {
                    let sender = senders[next % senders.len()].clone();
                    next += 1;
                    requests.spawn(h2_request(config.clone(), sender, intended, recorder.clone()));
                }
                while requests.join_next().await.is_some() {}
            });
        }
    }

    let start = Instant::now() + Duration::from_millis(10);
    let pacer = std::thread::Builder::new()
        .name("ferry-bench-pacer".into())
        .spawn(move || {
            for i in 0..schedule.len() {
                let at = start + schedule.offset(i);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if due.send(at).is_err() {
                    return;
                }
            }
        })
        .context("the pacer thread")?;

    // Whatever is still unanswered a timeout after the last request is due has failed.
    let deadline = start + schedule.offset(schedule.len()) + config.timeout + Duration::from_secs(1);
    let drained = tokio::time::timeout_at(deadline.into(), async { while workers.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        workers.abort_all();
    }
    let _ = pacer.join();

    let recorder = lock(&recorder);
    let finished = recorder.ok + recorder.errors;
    let end = recorder.last_done.unwrap_or(start);
    let seconds = end.saturating_duration_since(start).as_secs_f64();
    let latency = &recorder.latency;
    Ok(OpenLoopResult {
        target_rps: config.rate,
        scheduled: schedule.len(),
        ok: recorder.ok,
        errors: recorder.errors + schedule.len().saturating_sub(finished),
        achieved_rps: if seconds > 0.0 { recorder.ok as f64 / seconds } else { 0.0 },
        seconds,
        mean_ms: latency.mean() / 1000.0,
        p50_ms: millis(latency.value_at_quantile(0.50)),
        p90_ms: millis(latency.value_at_quantile(0.90)),
        p99_ms: millis(latency.value_at_quantile(0.99)),
        p999_ms: millis(latency.value_at_quantile(0.999)),
        max_ms: millis(latency.max()),
        send_lag_p99_ms: millis(recorder.lag.value_at_quantile(0.99)),
    })
}

async fn connect_h1(target: SocketAddr) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(target).await.with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn connect_h2(target: SocketAddr) -> anyhow::Result<http2::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(target).await.with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One keep-alive connection taking due requests off the shared queue, one at a time.
async fn h1_worker(
    config: OpenLoop,
    mut sender: http1::SendRequest<Empty<Bytes>>,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Instant>>>,
    recorder: Shared,
) {
    let uri = match config.form {
        RequestForm::Origin => "/".to_owned(),
        RequestForm::Absolute => format!("http://{}/", config.authority),
    };
    loop {
        let Some(intended) = queue.lock().await.recv().await else { return };
        let sent = Instant::now();
        let request = Request::get(uri.as_str()).header(http::header::HOST, &config.authority).body(Empty::new());
        let exchange = async {
            sender.ready().await?;
            let response = sender.send_request(request?).await?;
            let ok = response.status().is_success();
            response.into_body().collect().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(ok)
        };
        let outcome = tokio::time::timeout(config.timeout, exchange).await;
        let ok = matches!(outcome, Ok(Ok(true)));
        lock(&recorder).record(intended, sent, Instant::now(), ok);
        if !matches!(outcome, Ok(Ok(_))) {
            // The connection may be broken or mid-response: start a new one.
            match connect_h1(config.target).await {
                Ok(fresh) => sender = fresh,
                Err(_) => return,
            }
        }
    }
}

async fn h2_request(config: OpenLoop, mut sender: http2::SendRequest<Empty<Bytes>>, intended: Instant, recorder: Shared) {
    let sent = Instant::now();
    let request = Request::get(format!("http://{}/", config.authority)).version(Version::HTTP_2).body(Empty::<Bytes>::new());
    let exchange = async {
        sender.ready().await?;
        let response = sender.send_request(request?).await?;
        let ok = response.status().is_success();
        response.into_body().collect().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(ok)
    };
    let ok = matches!(tokio::time::timeout(config.timeout, exchange).await, Ok(Ok(true)));
    lock(&recorder).record(intended, sent, Instant::now(), ok);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_evenly_spaced_and_does_not_drift() {
        let schedule = Schedule::new(3, Duration::from_secs(2));
        assert_eq!(schedule.len(), 6);
        let offsets: Vec<Duration> = (0..4).map(|i| schedule.offset(i)).collect();
        assert_eq!(offsets[0], Duration::ZERO);
        assert_eq!(offsets[1], Duration::from_nanos(333_333_333));
        assert_eq!(offsets[2], Duration::from_nanos(666_666_666));
        assert_eq!(offsets[3], Duration::from_secs(1), "computed from the index, not summed");
        let fast = Schedule::new(10_000, Duration::from_millis(1500));
        assert_eq!(fast.len(), 15_000);
        assert_eq!(fast.offset(10_000), Duration::from_secs(1));
        assert_eq!(fast.offset(1) - fast.offset(0), Duration::from_micros(100));
    }

    #[test]
    fn a_zero_rate_is_one_per_second() {
        assert_eq!(Schedule::new(0, Duration::from_secs(2)).len(), 2);
        assert!(Schedule::new(5, Duration::ZERO).is_empty());
    }

    #[test]
    fn latency_counts_from_the_intended_time() {
        let mut recorder = Recorder::new().expect("histograms");
        let intended = Instant::now();
        // Sent 4 ms late (a stall), answered 1 ms after sending: 5 ms, not 1 ms.
        recorder.record(intended, intended + Duration::from_millis(4), intended + Duration::from_millis(5), true);
        recorder.record(intended, intended, intended + Duration::from_millis(1), false);
        assert_eq!((recorder.ok, recorder.errors), (1, 1));
        assert!((millis(recorder.latency.max()) - 5.0).abs() < 0.01);
        assert!((millis(recorder.lag.max()) - 4.0).abs() < 0.01);
    }

    #[test]
    fn a_run_against_a_local_server_meets_its_rate_in_both_protocols() {
        let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = upstream.local_addr().expect("addr");
        std::thread::spawn(move || crate::suite::dataplane::serve_upstream(upstream));
        for protocol in Protocol::ALL {
            let config = OpenLoop {
                target,
                authority: "bench".into(),
                form: RequestForm::Origin,
                protocol,
                rate: 400,
                duration: Duration::from_millis(500),
                connections: 4,
                timeout: Duration::from_secs(2),
            };
            let result = run(&config).expect("runs");
            assert_eq!((result.scheduled, result.ok, result.errors), (200, 200, 0), "{protocol:?}: {result:?}");
            // Nothing is sent before it is due: the last of 200 at 400 rps leaves at 497.5 ms. (No
            // tight lower bound: a loaded machine may stall the run.)
            assert!(result.seconds >= 0.4975 && result.achieved_rps <= 402.0, "{protocol:?}: {result:?}");
            assert!(result.achieved_rps > 100.0, "{protocol:?}: {result:?}");
            assert!(result.p50_ms > 0.0 && result.p50_ms <= result.p99_ms && result.p99_ms <= result.max_ms);
        }
    }

    #[test]
    fn absolute_form_requests_name_the_authority_in_the_request_line_and_host() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = listener.local_addr().expect("addr");
        let (heads, heads_rx) = std::sync::mpsc::channel::<(String, String)>();
        // A server that reads each request head and answers it with an empty 200.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let heads = heads.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().expect("a clone of the stream");
                    let mut lines = BufReader::new(stream).lines();
                    while let Some(Ok(request_line)) = lines.next() {
                        let mut host = String::new();
                        for line in lines.by_ref() {
                            let Ok(line) = line else { return };
                            if line.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = line.split_once(':')
                                && name.eq_ignore_ascii_case("host")
                            {
                                host = value.trim().to_owned();
                            }
                        }
                        let _ = heads.send((request_line, host));
                        if writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let config = OpenLoop {
            target,
            authority: "bench".into(),
            form: RequestForm::Absolute,
            protocol: Protocol::Http1,
            rate: 100,
            duration: Duration::from_millis(100),
            connections: 2,
            timeout: Duration::from_secs(2),
        };
        let result = run(&config).expect("runs");
        assert_eq!((result.ok, result.errors), (10, 0), "{result:?}");
        let heads: Vec<(String, String)> = heads_rx.try_iter().collect();
        assert_eq!(heads.len(), 10);
        for (request_line, host) in heads {
            assert_eq!((request_line.as_str(), host.as_str()), ("GET http://bench/ HTTP/1.1", "bench"));
        }
    }
}
