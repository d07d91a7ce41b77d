//! How each figure is computed from what the simulated sidecars applied and when.

use std::{collections::HashMap, time::Duration};

use super::{BytesPerChange, ChangeRecord, FirstConfig, Latency, Propagation, WatchTiming};
use crate::cp_bench::sidecar::{Applied, BoardState, Carried};

/// The `p`-quantile (0..=1) of sorted values, nearest rank; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The first-config figures of sidecars that all started at `start` and were all seen
/// configured at `all_configured`.
pub fn first_config(board: &BoardState, start: Duration, all_configured: Duration) -> FirstConfig {
    let since_start =
        |times: &[Option<Duration>]| sorted(times.iter().flatten().map(|at| ms(at.saturating_sub(start))).collect());
    let times = since_start(&board.configured_at);
    let welcomes = since_start(&board.welcomed_at);
    FirstConfig {
        p50_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
        max_ms: times.last().copied().unwrap_or(f64::NAN),
        all_configured_ms: ms(all_configured.saturating_sub(start)),
        welcome_p50_ms: percentile(&welcomes, 0.5),
        welcome_p99_ms: percentile(&welcomes, 0.99),
        connect_retries: board.connect_retries,
    }
}

/// Where a change's propagation is counted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Just before the API call.
    CallStarted,
    /// The API call's return.
    CallReturned,
}

impl Since {
    fn of(self, change: &ChangeRecord) -> Duration {
        match self {
            Self::CallStarted => change.started,
            Self::CallReturned => change.returned,
        }
    }
}

/// Every push applied, by (sidecar, service), in the order applied.
fn by_stream(board: &BoardState) -> HashMap<(u32, u32), Vec<&Applied>> {
    let mut by_stream: HashMap<(u32, u32), Vec<&Applied>> = HashMap::new();
    for applied in &board.applied {
        by_stream.entry((applied.sidecar, applied.service)).or_default().push(applied);
    }
    for stream in by_stream.values_mut() {
        stream.sort_by_key(|a| a.at);
    }
    by_stream
}

/// The first push applied by `sidecar` that holds `change`.
fn reached<'a>(streams: &HashMap<(u32, u32), Vec<&'a Applied>>, change: &ChangeRecord, sidecar: usize) -> Option<&'a Applied> {
    let stream = streams.get(&(sidecar as u32, change.service as u32))?;
    stream.iter().find(|a| a.version >= change.version).copied()
}

/// The propagation figures counted from `since`: for each change and each sidecar subscribed to
/// its service (`subscribers[service]`, with its subscription slot) that `include` selects, the
/// first push applied there that holds the change's version.
pub fn propagation(
    board: &BoardState,
    changes: &[ChangeRecord],
    subscribers: &[Vec<(usize, usize)>],
    since: Since,
    include: impl Fn(usize) -> bool,
) -> Propagation {
    let streams = by_stream(board);
    let (mut latencies, mut slowest, mut missed) = (Vec::new(), Vec::new(), 0);
    for change in changes {
        let mut slowest_here: Option<f64> = None;
        for &(sidecar, _) in subscribers[change.service].iter().filter(|&&(sidecar, _)| include(sidecar)) {
            let Some(applied) = reached(&streams, change, sidecar) else {
                missed += 1;
                continue;
            };
            let latency = ms(applied.at.saturating_sub(since.of(change)));
            latencies.push(latency);
            slowest_here = Some(slowest_here.map_or(latency, |s| s.max(latency)));
        }
        slowest.extend(slowest_here);
    }
    let latencies = sorted(latencies);
    let slowest = sorted(slowest);
    Propagation {
        changes: changes.len(),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        slowest_sidecar_p50_ms: percentile(&slowest, 0.5),
        slowest_sidecar_p99_ms: percentile(&slowest, 0.99),
        slowest_sidecar_max_ms: slowest.last().copied().unwrap_or(f64::NAN),
        pairs: latencies.len() + missed,
        missed,
    }
}

/// The bytes figures: the pushes that brought each change to each of its sidecars, next to the
/// full snapshots of one service applied before `changes_began`.
pub fn bytes_per_change(
    board: &BoardState,
    changes: &[ChangeRecord],
    subscribers: &[Vec<(usize, usize)>],
    changes_began: Duration,
) -> BytesPerChange {
    let streams = by_stream(board);
    let (mut push_bytes, mut delta_pushes, mut snapshot_pushes) = (Vec::new(), 0, 0);
    for change in changes {
        for &(sidecar, _) in &subscribers[change.service] {
            let Some(applied) = reached(&streams, change, sidecar) else { continue };
            push_bytes.push(f64::from(applied.push_bytes));
            match applied.carried {
                Carried::Delta => delta_pushes += 1,
                Carried::Snapshot => snapshot_pushes += 1,
                Carried::Absent => {}
            }
        }
    }
    let snapshots: Vec<&Applied> =
        board.applied.iter().filter(|a| a.at < changes_began && a.carried == Carried::Snapshot).collect();
    let snapshot_bytes = sorted(snapshots.iter().map(|a| f64::from(a.alone_bytes)).collect());
    let mut endpoints: Vec<u32> = snapshots.iter().map(|a| a.endpoints).collect();
    endpoints.sort_unstable();
    BytesPerChange {
        delta_bytes: percentile(&sorted(push_bytes), 0.5),
        snapshot_bytes: percentile(&snapshot_bytes, 0.5),
        service_endpoints: endpoints.get(endpoints.len() / 2).copied().unwrap_or_default() as usize,
        delta_pushes,
        snapshot_pushes,
    }
}

/// Over changes, for the sidecars that `include` selects: from each API call's return to the
/// first of them having the change (negative when it had it before the call returned), and
/// from that one to the last.
pub fn first_and_fan_out(
    board: &BoardState,
    changes: &[ChangeRecord],
    subscribers: &[Vec<(usize, usize)>],
    include: impl Fn(usize) -> bool,
) -> (Latency, Latency) {
    let streams = by_stream(board);
    let (mut first, mut fan_out) = (Vec::new(), Vec::new());
    for change in changes {
        let times: Vec<Duration> = subscribers[change.service]
            .iter()
            .filter(|&&(sidecar, _)| include(sidecar))
            .filter_map(|&(sidecar, _)| reached(&streams, change, sidecar).map(|a| a.at))
            .collect();
        if let (Some(earliest), Some(latest)) = (times.iter().min(), times.iter().max()) {
            // Signed: the replica that took the call may push before its answer arrives.
            first.push(ms(*earliest) - ms(change.returned));
            fan_out.push(ms(*latest - *earliest));
        }
    }
    (latency(sorted(first)), latency(sorted(fan_out)))
}

fn latency(sorted: Vec<f64>) -> Latency {
    Latency {
        p50_ms: percentile(&sorted, 0.5),
        p99_ms: percentile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
    }
}

/// Each change against when a watch saw its revision (`seen`, since the board's epoch).
pub fn watch_timing(changes: &[ChangeRecord], seen: impl Fn(u64) -> Option<Duration>) -> WatchTiming {
    let (mut to_watch, mut to_return) = (Vec::new(), Vec::new());
    for change in changes {
        if let Some(at) = seen(change.version) {
            to_watch.push(ms(at) - ms(change.started));
            to_return.push(ms(change.returned) - ms(at));
        }
    }
    WatchTiming { seen: to_watch.len(), to_watch: latency(sorted(to_watch)), to_return: latency(sorted(to_return)) }
}

/// How long the API calls of `changes` took, from just before each to its return.
pub fn api_calls(changes: &[ChangeRecord]) -> Latency {
    latency(sorted(changes.iter().map(|c| ms(c.returned.saturating_sub(c.started))).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp_bench::sidecar::Board;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A board, the changes, and the subscribers of each service.
    type Run = (std::sync::Arc<Board>, Vec<ChangeRecord>, Vec<Vec<(usize, usize)>>);

    /// Two sidecars on service 0: sidecar 0 has version 5 at 14 ms, sidecar 1 at 20 ms; the
    /// change was asked for at 10 ms and answered at 15 ms.
    fn one_change() -> Run {
        let board = Board::new(2, 1);
        for (sidecar, ms) in [(0, 14), (1, 20)] {
            let applied = Applied {
                sidecar: sidecar as u32,
                service: 0,
                version: 5,
                at: at(ms),
                push_bytes: 100,
                alone_bytes: 100,
                carried: Carried::Delta,
                endpoints: 1,
            };
            board.record(sidecar, vec![(0, applied)]);
        }
        let changes = vec![ChangeRecord { service: 0, started: at(10), returned: at(15), version: 5 }];
        (board, changes, vec![vec![(0, 0), (1, 0)]])
    }

    #[test]
    fn propagation_counts_from_the_call_or_its_return_for_the_sidecars_chosen() {
        let (board, changes, subscribers) = one_change();
        let state = board.lock();
        let from_call = propagation(&state, &changes, &subscribers, Since::CallStarted, |_| true);
        assert_eq!((from_call.p50_ms, from_call.max_ms, from_call.slowest_sidecar_max_ms), (4.0, 10.0, 10.0));
        let from_return = propagation(&state, &changes, &subscribers, Since::CallReturned, |_| true);
        assert_eq!((from_return.p50_ms, from_return.max_ms), (0.0, 5.0), "before the return counts 0");
        let second_only = propagation(&state, &changes, &subscribers, Since::CallReturned, |i| i == 1);
        assert_eq!((second_only.pairs, second_only.max_ms, second_only.missed), (1, 5.0, 0));
    }

    #[test]
    fn the_first_sidecar_may_come_before_the_return_and_the_watch_splits_the_call() {
        let (board, changes, subscribers) = one_change();
        let (first, fan_out) = first_and_fan_out(&board.lock(), &changes, &subscribers, |_| true);
        assert_eq!((first.p50_ms, fan_out.p50_ms), (-1.0, 6.0));
        let watch = watch_timing(&changes, |revision| (revision == 5).then(|| at(12)));
        assert_eq!((watch.seen, watch.to_watch.p50_ms, watch.to_return.p50_ms), (1, 2.0, 3.0));
        assert_eq!(watch_timing(&changes, |_| None).seen, 0);
        assert_eq!(api_calls(&changes).max_ms, 5.0);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
