//! What a process costs, read from `/proc`: CPU time (`utime + stime` of `/proc/PID/stat`, which
//! counts every thread, exited ones included) and memory (`VmRSS`, `VmHWM` of `/proc/PID/status`).
//! A proxy made of several processes (nginx: a master and its workers) is measured as the sum over
//! the process and its children, found by their parent pid.

use std::{
    fs,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// Clock ticks per second of `utime` and `stime`; Linux reports `USER_HZ`, 100 on every
/// architecture Ferry builds for (`getconf CLK_TCK`).
const TICKS_PER_SECOND: f64 = 100.0;

/// How often memory is sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// The fields of `/proc/PID/stat` a benchmark needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub ppid: u32,
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses, so the
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15), so index = field - 3.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Stat { ppid, cpu_seconds: (utime + stime) as f64 / TICKS_PER_SECOND })
}

/// `/proc/PID/stat` of a live process.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Memory of one process, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss: u64,
    /// The peak resident set size since the process started.
    pub hwm: u64,
    /// Of `rss`, the anonymous pages (heap, stacks) ...
    pub rss_anon: u64,
    /// ... and the file-backed ones (mostly the binary's code and read-only data).
    pub rss_file: u64,
}

/// Parses `VmRSS`, `VmHWM`, `RssAnon` and `RssFile` (in kB) from `/proc/PID/status`.
pub fn parse_status(text: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
        rss_anon: field("RssAnon:").unwrap_or(0),
        rss_file: field("RssFile:").unwrap_or(0),
    })
}

/// Memory of a live process.
pub fn memory(pid: u32) -> Option<Memory> {
    parse_status(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `pid` and its direct children (nginx's workers, for instance), children sorted by pid.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let mut children: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat(child).is_some_and(|s| s.ppid == pid))
        .collect();
    children.sort_unstable();
    pids.extend(children);
    pids
}

/// CPU seconds used so far by all of `pids` (a process that is gone counts 0).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&pid| stat(pid)).map(|s| s.cpu_seconds).sum()
}

/// The resident memory of all of `pids`, summed.
pub fn rss(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&pid| memory(pid)).map(|m| m.rss).sum()
}

/// Samples the summed RSS of a set of processes in a thread of its own until stopped; the
/// peak is what a run costs in memory (`VmHWM` alone would also count start-up).
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<RssPeak>,
}

/// The largest summed RSS seen, and each process's largest.
#[derive(Debug, Clone, Default)]
pub struct RssPeak {
    pub total: u64,
    pub per_process: Vec<u64>,
}

impl RssSampler {
    /// Starts sampling `pids`.
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = RssPeak { total: 0, per_process: vec![0; pids.len()] };
            loop {
                let mut total = 0;
                for (i, &pid) in pids.iter().enumerate() {
                    let rss = memory(pid).map_or(0, |m| m.rss);
                    peak.per_process[i] = peak.per_process[i].max(rss);
                    total += rss;
                }
                peak.total = peak.total.max(total);
                if stopped.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Self { stop, thread }
    }

    /// Stops sampling (after one last sample) and returns the peak.
    pub fn stop(self) -> RssPeak {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let text = "4242 (ferry side) car) S 17 4242 4242 0 -1 4194560 1571 0 0 0 250 130 0 0 20 0 3 0 1234 \
                    12345678 2345 18446744073709551615 1 1 0 0 0 0 0 4096 17624 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(text), Some(Stat { ppid: 17, cpu_seconds: 3.8 }));
    }

    #[test]
    fn status_memory_is_in_bytes() {
        let text = "Name:\tferry-sidecar\nVmPeak:\t  100000 kB\nVmHWM:\t    9000 kB\nVmRSS:\t    4096 kB\n\
                    RssAnon:\t    1024 kB\nRssFile:\t    3072 kB\nThreads:\t3\n";
        let memory = Memory { rss: 4096 * 1024, hwm: 9000 * 1024, rss_anon: 1024 * 1024, rss_file: 3072 * 1024 };
        assert_eq!(parse_status(text), Some(memory));
    }

    #[test]
    fn this_process_is_measurable() {
        let me = std::process::id();
        assert!(stat(me).is_some());
        assert!(memory(me).is_some_and(|m| m.rss > 0 && m.hwm >= m.rss));
        assert_eq!(with_children(me)[0], me);
    }
}
