//! A local etcd cluster for the control-plane replicas under test: `--etcd-members` members of
//! the `etcd` binary (Debian's `etcd-server`) on ports found free on 127.0.0.1, each with its
//! data in one temporary directory that goes when the cluster is stopped.
//!
//! Members run with etcd's default timings (100 ms heartbeats, 1 s elections) and fsync on:
//! the benchmark measures what a production etcd on this disk would cost, not a tuned one.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::process::Command;

use super::{
    process::{self, Process},
    scrape::Scrape,
};

/// How long the members may take to agree on a leader and say they are healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

/// What to tell someone whose machine has no etcd.
pub const INSTALL: &str = "install it (Debian and Ubuntu: `apt-get install etcd-server`) or pass --etcd-binary PATH";

/// The members of a running cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

/// One member: its process and the port clients reach it on.
pub struct Member {
    pub process: Process,
    pub client_port: u16,
}

impl Member {
    /// Its client URL's `host:port`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Reads its `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Scrape> {
        let url = format!("http://{}/metrics", self.endpoint());
        let answer = ferry_tests::client::get(&url).await.map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
        if answer.0 != http::StatusCode::OK {
            bail!("GET {url} answered {}", answer.0);
        }
        Ok(Scrape::parse(&ferry_tests::client::text(&answer)))
    }
}

/// The `etcd` to run: `flag`, or `etcd` on the PATH; an error that says how to get one when it
/// does not run.
pub async fn binary(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let program = flag.map_or_else(|| PathBuf::from("etcd"), Path::to_path_buf);
    if !process::runs(&program).await {
        match flag {
            Some(path) => {
                bail!("--etcd-binary {}: does not run (`{} --version` failed); {INSTALL}", path.display(), path.display())
            }
            None => bail!("etcd is not installed (no `etcd` on the PATH answers --version), and --etcd needs it: {INSTALL}"),
        }
    }
    Ok(program)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

impl EtcdCluster {
    /// Starts `size` members of `binary` and waits until each says it is healthy.
    pub async fn start(binary: &Path, size: usize) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("ferry-cp-bench-etcd-").tempdir().context("creating etcd's directory")?;
        let mut ports = Vec::with_capacity(size);
        for _ in 0..size {
            ports.push((free_port()?, free_port()?));
        }
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let mut cluster = Self { members: Vec::with_capacity(size), dir };
        for (i, &(client_port, peer_port)) in ports.iter().enumerate() {
            let name = format!("e{i}");
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let mut command = Command::new(binary);
            command
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(cluster.dir.path().join(&name))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("ferry-cp-bench-{}", std::process::id())])
                .args(["--logger", "zap", "--log-level", "warn"]);
            // A failure to start is the cluster's to clean up: stop what already runs.
            match Process::spawn(&format!("etcd member {name}"), command, |_| None) {
                Ok((process, _)) => cluster.members.push(Member { process, client_port }),
                Err(error) => {
                    cluster.stop().await;
                    return Err(error);
                }
            }
        }
        if let Err(error) = cluster.wait_healthy().await {
            cluster.stop().await;
            return Err(error);
        }
        cluster.members.iter().for_each(|m| m.process.forget_warnings());
        Ok(cluster)
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + HEALTHY_TIMEOUT;
        for i in 0..self.members.len() {
            let url = format!("http://{}/health", self.members[i].endpoint());
            loop {
                self.members[i].process.ensure_running()?;
                if let Ok(answer) = ferry_tests::client::get(&url).await
                    && answer.0 == 200
                    && ferry_tests::client::text(&answer).contains("true")
                {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "{} was not healthy within {HEALTHY_TIMEOUT:?} ({url}):\n{}",
                        self.members[i].process.name(),
                        self.members[i].process.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The control plane's `--store`: `etcd://` with every member's endpoint.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.members.iter().map(Member::endpoint).collect::<Vec<_>>().join(","))
    }

    /// The members.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Fails when a member has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.members.iter_mut().try_for_each(|m| m.process.ensure_running())
    }

    /// Kills every member (each wait bounded), then removes the data directory.
    pub async fn stop(self) {
        for member in self.members {
            member.process.stop().await;
        }
        let path = self.dir.path().to_path_buf();
        if let Err(error) = self.dir.close() {
            eprintln!("ferry-cp-bench: removing {}: {error}", path.display());
        }
    }
}

/// A watcher of everything under the control plane's prefix, as each replica keeps one, that
/// notes when each change to an instance reached it: etcd's commit and watch delivery, seen
/// from outside the replicas. It speaks etcd's JSON gateway (`POST /v3/watch`), so that the
/// benchmark needs no etcd client (and no `protoc`).
pub struct WatchProbe {
    seen: Arc<Mutex<HashMap<u64, std::time::Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The control plane's key prefix (its default `--etcd-prefix`), and the start of its instances'
/// keys (`/ferry/instance`: 15 bytes, so its base64 is a prefix of every such key's base64).
const PREFIX: &[u8] = b"/ferry/";
const INSTANCE_KEYS: &[u8] = b"/ferry/instance";

impl WatchProbe {
    /// Opens the watch on `member` and waits until etcd says it is created.
    pub async fn start(member: &Member) -> anyhow::Result<Self> {
        use http_body_util::BodyExt;
        let addr: std::net::SocketAddr = member.endpoint().parse()?;
        let mut end = PREFIX.to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = serde_json::json!({ "create_request": { "key": base64(PREFIX), "range_end": base64(&end) } }).to_string();
        let request = http::Request::post("/v3/watch")
            .header(http::header::HOST, member.endpoint())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let stream = tokio::net::TcpStream::connect(addr).await.context("connecting to etcd's JSON gateway")?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let response = sender.send_request(request).await.context("opening a watch on etcd's JSON gateway")?;
        if !response.status().is_success() {
            bail!("POST /v3/watch on etcd answered {}", response.status());
        }
        let mut body = response.into_body();
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let (created, is_created) = tokio::sync::oneshot::channel();
        let instance_keys = base64(INSTANCE_KEYS);
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut created = Some(created);
            let mut buffer = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let at = std::time::Instant::now();
                let Ok(data) = frame.into_data() else { continue };
                buffer.extend_from_slice(&data);
                while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let Ok(message) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
                    let result = &message["result"];
                    if result["created"] == true
                        && let Some(created) = created.take()
                    {
                        let _ = created.send(());
                    }
                    let mut seen = record.lock().unwrap_or_else(|p| p.into_inner());
                    for event in result["events"].as_array().into_iter().flatten() {
                        let kv = &event["kv"];
                        let is_instance = kv["key"].as_str().is_some_and(|k| k.starts_with(&instance_keys));
                        if let (true, Some(revision)) = (is_instance, kv["mod_revision"].as_str().and_then(|r| r.parse().ok())) {
                            seen.entry(revision).or_insert(at);
                        }
                    }
                }
            }
        });
        if tokio::time::timeout(Duration::from_secs(5), is_created).await.is_err() {
            task.abort();
            bail!("etcd did not create the benchmark's watch within 5 s");
        }
        Ok(Self { seen, task })
    }

    /// When the change to an instance at `revision` reached the watch.
    pub fn seen(&self, revision: u64) -> Option<std::time::Instant> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(&revision).copied()
    }
}

impl Drop for WatchProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Standard base64 with padding, as etcd's JSON gateway wants keys.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_what_etcd_expects() {
        assert_eq!(base64(b"/ferry/"), "L2ZlcnJ5Lw==");
        assert_eq!(base64(b"/ferry0"), "L2ZlcnJ5MA==");
        assert_eq!(base64(b"/ferry/a"), "L2ZlcnJ5L2E=");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"abc"), "YWJj");
        assert!(base64(b"/ferry/instances/svc-0001-extra").starts_with(&base64(INSTANCE_KEYS)));
    }

    #[tokio::test]
    async fn a_missing_etcd_is_named_with_how_to_install_it() {
        let error = binary(Some(Path::new("/nonexistent/etcd"))).await.expect_err("not there");
        let message = error.to_string();
        assert!(
            message.contains("--etcd-binary /nonexistent/etcd") && message.contains("apt-get install etcd-server"),
            "{message}"
        );
    }
}
