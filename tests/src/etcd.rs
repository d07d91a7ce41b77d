//! etcd members on loopback for the tests of control-plane replicas. Each member runs the
//! `etcd` binary (Debian's `etcd-server`) on ports chosen free on 127.0.0.1, with its data in a
//! temporary directory removed afterwards. Without `etcd` on the PATH, [`EtcdCluster::start`]
//! returns `None` and the test says it skipped.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

use crate::client;

/// Whether this build of the tests runs the control plane with the `etcd` feature.
pub const FEATURE: bool = cfg!(feature = "etcd");

/// Why etcd tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !FEATURE {
        return Some(
            "the tests were built without the etcd feature: run `cargo test -p ferry-tests --features etcd --test etcd`".into(),
        );
    }
    match std::process::Command::new("etcd").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(status) if status.success() => None,
        _ => Some("etcd is not installed (apt-get install etcd-server)".into()),
    }
}

/// One member of the cluster.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    args: Vec<String>,
    /// Where its output goes, for a test that fails to say why.
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// Its client URL's `host:port`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("opens the member's log");
        let child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd member {}: {e}", self.name));
        self.child = Some(child);
    }
}

/// A cluster of etcd members on loopback.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

/// `n` distinct free ports on 127.0.0.1: all held while they are chosen, so that none is
/// handed out twice.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    held.iter().map(|l| l.local_addr().expect("bound").port()).collect()
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster is healthy; `None` (after saying why)
    /// when etcd tests cannot run here.
    pub async fn start(size: usize) -> Option<Self> {
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("temporary directory");
        let free = free_ports(2 * size);
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|pair| (pair[0], pair[1])).collect();
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let token = format!("ferry-test-{}", std::process::id());
        let mut members = Vec::new();
        for (i, (client_port, peer_port)) in ports.into_iter().enumerate() {
            let name = format!("e{i}");
            let data: PathBuf = dir.path().join(&name);
            let args = vec![
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                format!("http://127.0.0.1:{client_port}"),
                "--advertise-client-urls".into(),
                format!("http://127.0.0.1:{client_port}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{peer_port}"),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{peer_port}"),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-token".into(),
                token.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                // Quick elections, so that losing a member costs the tests a moment only.
                "--heartbeat-interval".into(),
                "50".into(),
                "--election-timeout".into(),
                "500".into(),
            ];
            let log = dir.path().join(format!("{name}.log"));
            let mut member = Member { name, client_port, args, log, child: None };
            member.spawn();
            members.push(member);
        }
        let cluster = Self { members, _dir: dir };
        for i in 0..size {
            cluster.wait_healthy(i).await;
        }
        Some(cluster)
    }

    /// `etcd://` with every member's endpoint.
    pub fn store(&self) -> String {
        format!("etcd://{}", self.members.iter().map(Member::endpoint).collect::<Vec<_>>().join(","))
    }

    /// Waits until member `i` says it is healthy (it has a leader).
    pub async fn wait_healthy(&self, i: usize) {
        let url = format!("http://{}/health", self.members[i].endpoint());
        let deadline = std::time::Instant::now() + crate::PATIENCE;
        loop {
            if let Ok(answer) = client::get(&url).await
                && answer.0 == 200
                && client::text(&answer).contains("true")
            {
                return;
            }
            if std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("etcd member {i} not healthy after {:?}; its log ends:\n{}", crate::PATIENCE, tail.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// Starts member `i` again on its data, and waits until it is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.members[i].spawn();
    }
}

/// A TCP relay to an etcd member that a test can cut and heal: a replica given the relay's
/// address as its store is partitioned from etcd while the rest of the mesh is not.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays a new loopback port to `target` (`host:port`).
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("bound");
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = tokio::sync::watch::Sender::new(0u64);
        let (is_open, cuts) = (open.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if !is_open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // Dropped: the partition refuses new connections too.
                }
                let target = target.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, open, cut, task }
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Relays again.
    pub fn heal(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_modify(|n| *n += 1);
    }
}
