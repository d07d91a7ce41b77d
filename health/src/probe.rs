//! The probes: each runs once and says what it found.

use std::{process::Stdio, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::{Health, spec::Probe};

/// The address a probe targets when its check names none: the instance (control plane) or
/// the app (sidecar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `host:port`, with brackets around an IPv6 host.
    pub fn authority(&self) -> String {
        if self.host.contains(':') { format!("[{}]:{}", self.host, self.port) } else { format!("{}:{}", self.host, self.port) }
    }
}

/// A result: the status and what to show for it.
pub type Outcome = (Health, String);

/// Runs one kind of probe, keeping what it can reuse between runs (an HTTP client, a gRPC
/// channel).
pub struct Prober {
    probe: Probe,
    target: Target,
    http: Option<Client<HttpConnector, Empty<Bytes>>>,
    grpc: Option<Channel>,
}

/// The body bytes an HTTP probe reads and shows.
const BODY_LIMIT: usize = 4096;

/// The HTTP client that HTTP checks share: one per control plane or sidecar, so that thousands
/// of checks keep at most one idle connection per checked address, closed after a minute
/// unused, instead of a pool each.
#[derive(Clone)]
pub struct HttpProbes(Client<HttpConnector, Empty<Bytes>>);

impl HttpProbes {
    /// A client with a small pool.
    pub fn new() -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(Duration::from_secs(60))
            .build_http();
        Self(client)
    }
}

impl Default for HttpProbes {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for HttpProbes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpProbes")
    }
}

impl Prober {
    /// A prober of `probe` against `target`, with an HTTP client of its own.
    pub fn new(probe: Probe, target: Target) -> Self {
        Self::with_client(probe, target, &HttpProbes::new())
    }

    /// A prober of `probe` against `target` sharing `http` with other probers.
    pub fn with_client(probe: Probe, target: Target, http: &HttpProbes) -> Self {
        let http = matches!(probe, Probe::Http { .. }).then(|| http.0.clone());
        let grpc = match &probe {
            Probe::Grpc { address, .. } => {
                let authority = address.clone().unwrap_or_else(|| target.authority());
                Endpoint::from_shared(format!("http://{authority}")).ok().map(|e| e.connect_lazy())
            }
            _ => None,
        };
        Self { probe, target, http, grpc }
    }

    /// Probes once, giving up after `timeout`. TTL checks are not probed: `None`.
    pub async fn run(&mut self, timeout: Duration) -> Option<Outcome> {
        let outcome = match &self.probe {
            Probe::Ttl { .. } => return None,
            Probe::Http { url, expected_status } => {
                let url = if url.starts_with('/') { format!("http://{}{url}", self.target.authority()) } else { url.clone() };
                bounded(timeout, format!("HTTP GET {url}"), http(self.http.as_ref(), url.clone(), *expected_status)).await
            }
            Probe::Tcp { address } => {
                let address = address.clone().unwrap_or_else(|| self.target.authority());
                bounded(timeout, format!("TCP connect {address}"), tcp(address.clone())).await
            }
            Probe::Grpc { service, .. } => {
                bounded(timeout, "gRPC health check".into(), grpc(self.grpc.clone(), service.clone())).await
            }
            Probe::Script { args } => script(args, timeout).await,
        };
        Some(outcome)
    }
}

/// Runs `probe`, turning a timeout into a critical result.
async fn bounded(timeout: Duration, what: String, probe: impl Future<Output = Outcome>) -> Outcome {
    match tokio::time::timeout(timeout, probe).await {
        Ok(outcome) => outcome,
        Err(_) => (Health::Critical, format!("{what}: no answer within {timeout:?}")),
    }
}

async fn http(client: Option<&Client<HttpConnector, Empty<Bytes>>>, url: String, expected: Option<u16>) -> Outcome {
    let Some(client) = client else { return (Health::Critical, "no HTTP client".into()) };
    let request = match http::Request::get(&url).header(http::header::USER_AGENT, "ferry-health-check").body(Empty::new()) {
        Ok(request) => request,
        Err(error) => return (Health::Critical, format!("HTTP GET {url}: {error}")),
    };
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(error) => return (Health::Critical, format!("HTTP GET {url}: {}", ferry_runtime::error_chain(&error))),
    };
    let status = response.status();
    let body = match Limited::new(response.into_body(), BODY_LIMIT).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let text = String::from_utf8_lossy(&body[..body.len().min(256)]).trim().to_owned();
    let health = match expected {
        Some(expected) if status.as_u16() == expected => Health::Passing,
        Some(_) => Health::Critical,
        None if status.is_success() => Health::Passing,
        None if status == http::StatusCode::TOO_MANY_REQUESTS => Health::Warning,
        None => Health::Critical,
    };
    let output = if text.is_empty() { format!("HTTP GET {url}: {status}") } else { format!("HTTP GET {url}: {status}: {text}") };
    (health, output)
}

async fn tcp(address: String) -> Outcome {
    match TcpStream::connect(address.as_str()).await {
        // With nothing listening, a connect from an ephemeral port to itself can "succeed"
        // (TCP simultaneous open); that is no server.
        Ok(stream) if stream.local_addr().ok() == stream.peer_addr().ok() => {
            (Health::Critical, format!("TCP connect {address}: nothing listening (connected to itself)"))
        }
        Ok(_) => (Health::Passing, format!("TCP connect {address}: connected")),
        Err(error) => (Health::Critical, format!("TCP connect {address}: {error}")),
    }
}

async fn grpc(channel: Option<Channel>, service: String) -> Outcome {
    let Some(channel) = channel else { return (Health::Critical, "gRPC health check: invalid address".into()) };
    let asked = if service.is_empty() { "the server".to_owned() } else { format!("{service:?}") };
    match HealthClient::new(channel).check(HealthCheckRequest { service: service.clone() }).await {
        Ok(reply) => match reply.into_inner().status() {
            ServingStatus::Serving => (Health::Passing, format!("gRPC health of {asked}: SERVING")),
            other => (Health::Critical, format!("gRPC health of {asked}: {}", other.as_str_name())),
        },
        Err(status) => (Health::Critical, format!("gRPC health of {asked}: {:?}: {}", status.code(), status.message())),
    }
}

/// The output of a script kept for the check's output; the rest is read and dropped, so a
/// chatty script never blocks on a full pipe nor fills memory.
const SCRIPT_OUTPUT_LIMIT: usize = 4096;

async fn script(args: &[String], timeout: Duration) -> Outcome {
    let Some((command, rest)) = args.split_first() else { return (Health::Critical, "script: no command".into()) };
    let mut child = tokio::process::Command::new(command);
    child.args(rest).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    // Its own process group, so that what it starts can be stopped with it.
    #[cfg(unix)]
    child.process_group(0);
    let mut child = match child.spawn() {
        Ok(child) => child,
        Err(error) => return (Health::Critical, format!("script {command}: cannot start: {error}")),
    };
    let leader = child.id().and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?));
    let stdout = child.stdout.take().map(|pipe| tokio::spawn(read_bounded(pipe)));
    let stderr = child.stderr.take().map(|pipe| tokio::spawn(read_bounded(pipe)));
    // Wait for the script to exit without reaping it: until it is reaped its PID, which is also
    // its group's id, cannot be given to another process, so killing the group below cannot hit
    // a stranger that happened to get the number.
    let exited = match leader {
        Some(leader) => {
            let exit = tokio::task::spawn_blocking(move || {
                use rustix::process::{WaitId, WaitIdOptions, waitid};
                loop {
                    match waitid(WaitId::Pid(leader), WaitIdOptions::EXITED | WaitIdOptions::NOWAIT) {
                        Err(rustix::io::Errno::INTR) => continue,
                        // Exited (or, should something else have reaped it, gone).
                        _ => return,
                    }
                }
            });
            tokio::time::timeout(timeout, exit).await.is_ok()
        }
        None => false,
    };
    // Whatever it left behind goes too (and the script itself, when it ran out of time): a check
    // must not leave processes running.
    if let Some(leader) = leader {
        let _ = rustix::process::kill_process_group(leader, rustix::process::Signal::KILL);
    }
    if !exited {
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
        return (Health::Critical, format!("script {command}: killed after {timeout:?}"));
    }
    let status = match child.wait().await {
        Ok(status) => status,
        Err(error) => return (Health::Critical, format!("script {command}: {error}")),
    };
    let mut text = String::new();
    for reader in [stdout, stderr].into_iter().flatten() {
        // The pipes close with the group; do not wait long for them.
        if let Ok(Ok(bytes)) = tokio::time::timeout(Duration::from_millis(200), reader).await {
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    let text = text.trim();
    let health = match status.code() {
        Some(0) => Health::Passing,
        Some(1) => Health::Warning,
        _ => Health::Critical,
    };
    let code = status.code().map_or("a signal".to_owned(), |c| c.to_string());
    let output =
        if text.is_empty() { format!("script {command}: exit {code}") } else { format!("script {command}: exit {code}: {text}") };
    (health, output)
}

/// Reads a pipe to its end, keeping the first [`SCRIPT_OUTPUT_LIMIT`] bytes.
async fn read_bounded(mut pipe: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = SCRIPT_OUTPUT_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    };

    use super::*;

    /// An HTTP server answering every request with the status in `status`.
    async fn server(status: Arc<AtomicU16>) -> Target {
        counting_server(status, Arc::default()).await
    }

    /// The same, counting the connections it accepts in `accepted`.
    async fn counting_server(status: Arc<AtomicU16>, accepted: Arc<std::sync::atomic::AtomicUsize>) -> Target {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let status = status.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        let code = status.load(Ordering::SeqCst);
                        async move {
                            let mut response = http::Response::new(http_body_util::Full::new(Bytes::from("body text")));
                            *response.status_mut() = http::StatusCode::from_u16(code).unwrap_or_default();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Target { host: "127.0.0.1".into(), port }
    }

    #[tokio::test]
    async fn http_checks_share_one_pool_of_connections() {
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let target = counting_server(Arc::new(AtomicU16::new(200)), accepted.clone()).await;
        let shared = HttpProbes::new();
        let probe = Probe::Http { url: "/healthz".into(), expected_status: None };
        let mut probers: Vec<Prober> = (0..10).map(|_| Prober::with_client(probe.clone(), target.clone(), &shared)).collect();
        for _ in 0..3 {
            for prober in &mut probers {
                assert_eq!(prober.run(Duration::from_secs(2)).await.map(|o| o.0), Some(Health::Passing));
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "30 checks, one after another, over one connection");
    }

    #[tokio::test]
    async fn http_maps_statuses_to_health() {
        let status = Arc::new(AtomicU16::new(200));
        let target = server(status.clone()).await;
        let mut prober = Prober::new(Probe::Http { url: "/healthz".into(), expected_status: None }, target.clone());
        for (code, health) in [(200, Health::Passing), (204, Health::Passing), (429, Health::Warning), (500, Health::Critical)] {
            status.store(code, Ordering::SeqCst);
            let (got, output) = prober.run(Duration::from_secs(2)).await.expect("probed");
            assert_eq!(got, health, "{code}: {output}");
            assert!(output.contains(&code.to_string()) && output.contains("/healthz"), "{output}");
        }
        let mut expecting = Prober::new(Probe::Http { url: "/healthz".into(), expected_status: Some(500) }, target);
        assert_eq!(expecting.run(Duration::from_secs(2)).await.map(|o| o.0), Some(Health::Passing));
    }

    #[tokio::test]
    async fn tcp_passes_while_the_port_is_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = Target { host: "127.0.0.1".into(), port: listener.local_addr().expect("addr").port() };
        let mut prober = Prober::new(Probe::Tcp { address: None }, target);
        assert_eq!(prober.run(Duration::from_secs(2)).await.map(|o| o.0), Some(Health::Passing));
        // A port that is bound but not listening refuses connections, and stays ours so no
        // other test can start listening on it meanwhile.
        let closed = tokio::net::TcpSocket::new_v4().expect("socket");
        closed.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let target = Target { host: "127.0.0.1".into(), port: closed.local_addr().expect("addr").port() };
        let (health, output) =
            Prober::new(Probe::Tcp { address: None }, target).run(Duration::from_secs(2)).await.expect("probed");
        assert_eq!(health, Health::Critical, "{output}");
    }

    #[tokio::test]
    async fn scripts_map_exit_codes_and_time_out() {
        let target = Target { host: "127.0.0.1".into(), port: 1 };
        for (code, health) in [(0, Health::Passing), (1, Health::Warning), (2, Health::Critical)] {
            let args = vec!["sh".into(), "-c".into(), format!("echo checked; exit {code}")];
            let (got, output) =
                Prober::new(Probe::Script { args }, target.clone()).run(Duration::from_secs(5)).await.expect("ran");
            assert_eq!(got, health, "{output}");
            assert!(output.contains("checked") && output.contains(&format!("exit {code}")), "{output}");
        }
        let slow = vec!["sleep".into(), "5".into()];
        let (health, output) =
            Prober::new(Probe::Script { args: slow }, target.clone()).run(Duration::from_millis(100)).await.expect("ran");
        assert_eq!(health, Health::Critical);
        assert!(output.contains("killed after"), "{output}");
        // Processes a script leaves behind are stopped with it.
        let marker = format!("ferry-leftover-{}", std::process::id());
        let leaver = vec!["sh".into(), "-c".into(), format!("sleep 30 & echo {marker}; exit 0")];
        let (health, _) =
            Prober::new(Probe::Script { args: leaver }, target.clone()).run(Duration::from_secs(5)).await.expect("ran");
        assert_eq!(health, Health::Passing);
        let ps = tokio::process::Command::new("ps").args(["-eo", "args"]).output().await.expect("ps runs");
        assert!(!String::from_utf8_lossy(&ps.stdout).lines().any(|l| l.trim() == "sleep 30"), "the background sleep was killed");
        let missing = vec!["/nonexistent/check".into()];
        let (health, output) =
            Prober::new(Probe::Script { args: missing }, target).run(Duration::from_secs(1)).await.expect("ran");
        assert_eq!(health, Health::Critical);
        assert!(output.contains("cannot start"), "{output}");
    }
}
