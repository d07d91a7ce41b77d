//! Everything the benchmark started (the etcd members and the control-plane replicas), read
//! together (CPU, memory, metrics, warnings) and stopped together whatever happens.

use super::{control_plane::ControlPlaneProcess, etcd::EtcdCluster, scrape::Scrape};

/// Everything the benchmark started, to be stopped whatever happens.
#[derive(Default)]
pub struct Started {
    /// The etcd cluster, with `--etcd`.
    pub etcd: Option<EtcdCluster>,
    /// The control planes, the first taking the registry's writes.
    pub replicas: Vec<ControlPlaneProcess>,
}

impl Started {
    /// The last log lines of every process, to explain a failure.
    pub fn log_tails(&self) -> String {
        let mut tails: Vec<String> =
            self.replicas.iter().map(|r| format!("--- {}'s last log lines:\n{}", r.name(), r.log_tail())).collect();
        if let Some(etcd) = &self.etcd {
            for member in etcd.members() {
                tails.push(format!("--- {}'s last log lines:\n{}", member.process.name(), member.process.log_tail()));
            }
        }
        tails.join("\n")
    }

    /// Stops the replicas, then etcd (each process's wait is bounded), and removes their
    /// directories.
    pub async fn stop(self) {
        for replica in self.replicas {
            replica.stop().await;
        }
        if let Some(etcd) = self.etcd {
            etcd.stop().await;
        }
    }

    /// Says which processes logged warnings or errors, and the last of each: a run whose figures
    /// look fine may still have had a replica lose the store for a moment.
    pub fn tell_warnings(&self) {
        let members = self.etcd.iter().flat_map(EtcdCluster::members).map(|m| (m.process.name(), m.process.warnings()));
        for (name, warnings) in self.replicas.iter().map(|r| (r.name(), r.warnings())).chain(members) {
            if let Some(last) = warnings.last {
                progress!("{name} logged {} warning(s) or error(s); the last: {last}", warnings.count);
            }
        }
    }

    /// Fails when any of them has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.replicas.iter_mut().try_for_each(ControlPlaneProcess::ensure_running)?;
        self.etcd.as_mut().map_or(Ok(()), EtcdCluster::ensure_running)
    }

    /// The RSS of each replica.
    pub fn rss_bytes(&self) -> anyhow::Result<Vec<u64>> {
        self.replicas.iter().map(ControlPlaneProcess::rss_bytes).collect()
    }

    /// Every replica's and every etcd member's `/metrics`; one that cannot be read is empty
    /// (the figures drawn from it are then missing), with a warning.
    pub async fn scrape(&self) -> Scrapes {
        let mut scrapes = Scrapes::default();
        for replica in &self.replicas {
            scrapes.replicas.push(replica.metrics().await.unwrap_or_else(|error| {
                progress!("warning: reading the metrics of {}: {error:#}", replica.name());
                Scrape::default()
            }));
        }
        for member in self.etcd.iter().flat_map(EtcdCluster::members) {
            scrapes.etcd.push(member.metrics().await.unwrap_or_else(|error| {
                progress!("warning: reading the metrics of {}: {error:#}", member.process.name());
                Scrape::default()
            }));
        }
        scrapes
    }

    /// The CPU time of each replica and of each etcd member.
    pub fn cpu(&self) -> anyhow::Result<CpuSnapshot> {
        Ok(CpuSnapshot {
            replicas: self.replicas.iter().map(ControlPlaneProcess::cpu_seconds).collect::<anyhow::Result<_>>()?,
            etcd: match &self.etcd {
                Some(etcd) => etcd.members().iter().map(|m| m.process.cpu_seconds()).collect::<anyhow::Result<_>>()?,
                None => Vec::new(),
            },
        })
    }
}

/// The `/metrics` of each replica and each etcd member at one moment.
#[derive(Debug, Default)]
pub struct Scrapes {
    pub replicas: Vec<Scrape>,
    pub etcd: Vec<Scrape>,
}

/// CPU seconds used so far by each replica and each etcd member.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    pub replicas: Vec<f64>,
    pub etcd: Vec<f64>,
}

impl CpuSnapshot {
    /// What each process used from `before` to `self`.
    pub fn since(&self, before: &Self) -> Self {
        let minus = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a - b).collect();
        Self { replicas: minus(&self.replicas, &before.replicas), etcd: minus(&self.etcd, &before.etcd) }
    }

    /// Adds what `other` used to each process's.
    pub fn add(&mut self, other: &Self) {
        for (a, b) in self.replicas.iter_mut().zip(&other.replicas) {
            *a += b;
        }
        for (a, b) in self.etcd.iter_mut().zip(&other.etcd) {
            *a += b;
        }
    }
}
