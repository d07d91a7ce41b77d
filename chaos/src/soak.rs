//! Resource samples of every process of the mesh, taken each second of a run: resident memory
//! (`VmRSS` in `/proc/PID/status`) and open descriptors (the entries of `/proc/PID/fd`). A
//! process grows without bound when the last fifth of its samples sits well above the first.

use std::collections::BTreeMap;

/// One sample of one process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub rss_kib: u64,
    pub fds: u64,
}

/// Every sample, by role (a process started again keeps its role).
#[derive(Debug, Default)]
pub struct Samples {
    pub by_role: BTreeMap<String, Vec<Sample>>,
}

/// How a role's samples moved from the first fifth of the run to the last.
#[derive(Debug, Clone)]
pub struct Growth {
    pub role: String,
    pub samples: usize,
    pub rss_first_mib: f64,
    pub rss_last_mib: f64,
    pub fds_first: f64,
    pub fds_last: f64,
    /// Whether it looks unbounded: more than half again and more than 16 MiB (or 32
    /// descriptors) above where it started.
    pub grows: bool,
}

impl Samples {
    /// Samples each of `pids` once.
    pub fn take(&mut self, pids: &[(String, u32)]) {
        for (role, pid) in pids {
            if let Some(sample) = sample(*pid) {
                self.by_role.entry(role.clone()).or_default().push(sample);
            }
        }
    }

    /// The first-fifth and last-fifth figures of every role.
    pub fn growth(&self) -> Vec<Growth> {
        self.by_role
            .iter()
            .filter(|(_, samples)| samples.len() >= 5)
            .map(|(role, samples)| {
                let fifth = samples.len() / 5;
                let mean = |part: &[Sample], f: fn(&Sample) -> u64| part.iter().map(f).sum::<u64>() as f64 / part.len() as f64;
                let (first, last) = (&samples[..fifth], &samples[samples.len() - fifth..]);
                let (rss_first, rss_last) = (mean(first, |s| s.rss_kib) / 1024.0, mean(last, |s| s.rss_kib) / 1024.0);
                let (fds_first, fds_last) = (mean(first, |s| s.fds), mean(last, |s| s.fds));
                let grows = (rss_last > rss_first * 1.5 && rss_last - rss_first > 16.0)
                    || (fds_last > fds_first * 1.5 && fds_last - fds_first > 32.0);
                Growth {
                    role: role.clone(),
                    samples: samples.len(),
                    rss_first_mib: rss_first,
                    rss_last_mib: rss_last,
                    fds_first,
                    fds_last,
                    grows,
                }
            })
            .collect()
    }
}

fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample { rss_kib, fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss_kib: impl Iterator<Item = u64>) -> Samples {
        let samples = rss_kib.map(|rss_kib| Sample { rss_kib, fds: 20 }).collect();
        Samples { by_role: BTreeMap::from([("sidecar".to_owned(), samples)]) }
    }

    #[test]
    fn a_flat_process_does_not_grow() {
        let growth = samples(std::iter::repeat_n(30_000, 100)).growth();
        assert!(!growth[0].grows, "{growth:?}");
    }

    #[test]
    fn a_process_that_doubles_past_16_mib_grows_without_bound() {
        let growth = samples((0..100).map(|i| 20_000 + i * 400)).growth();
        assert!(growth[0].grows, "{growth:?}");
        assert!(growth[0].rss_last_mib > growth[0].rss_first_mib * 1.5);
    }

    #[test]
    fn a_small_process_that_grows_by_a_few_mib_is_not_flagged() {
        let growth = samples((0..100).map(|i| 4_000 + i * 40)).growth();
        assert!(!growth[0].grows, "{growth:?}");
    }
}
