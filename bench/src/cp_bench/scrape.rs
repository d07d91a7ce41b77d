//! Where a change's time goes, from the processes' own metrics: each etcd member's and each
//! replica's Prometheus text, read before and after the propagation phase. The difference of two
//! readings of a histogram gives the phase's own distribution, to the resolution of its buckets.

use std::collections::HashMap;

/// One reading of a `/metrics` page: every sample's value by its series (`name{labels}`).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// Reads Prometheus or OpenMetrics text; lines it does not understand are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                // The value follows the series; a timestamp may follow the value.
                let (series, rest) = match line.find('}') {
                    Some(end) => (&line[..=end], &line[end + 1..]),
                    None => line.split_once(' ')?,
                };
                let value = rest.split_whitespace().next()?.parse().ok()?;
                Some((series.trim().to_owned(), value))
            })
            .collect();
        Self { samples }
    }

    /// The sum of every series of `name`, whatever its labels (0 when there is none).
    pub fn total(&self, name: &str) -> f64 {
        self.samples.iter().filter(|(series, _)| series_name(series) == name).map(|(_, v)| v).sum()
    }

    /// The cumulative buckets of histogram `name`, every series summed, by upper bound.
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_bound: HashMap<u64, (f64, f64)> = HashMap::new();
        for (series, value) in &self.samples {
            if series_name(series) != bucket {
                continue;
            }
            let Some(le) = label(series, "le") else { continue };
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
            if bound.is_nan() {
                continue;
            }
            by_bound.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += value;
        }
        let mut buckets: Vec<(f64, f64)> = by_bound.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }
}

fn series_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let labels = series.split_once('{')?.1.strip_suffix('}')?;
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

/// What histogram `name` recorded between two readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recorded {
    pub count: f64,
    /// The upper bound of the bucket that holds the median and the 99th percentile, in
    /// milliseconds (infinite when it is past the last bound).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// What histogram `name` recorded from `before` to `after`; `None` when it recorded nothing.
pub fn recorded(before: &Scrape, after: &Scrape, name: &str) -> Option<Recorded> {
    let earlier: HashMap<u64, f64> = before.buckets(name).into_iter().map(|(b, c)| (b.to_bits(), c)).collect();
    let buckets: Vec<(f64, f64)> =
        after.buckets(name).into_iter().map(|(b, c)| (b, c - earlier.get(&b.to_bits()).copied().unwrap_or(0.0))).collect();
    let count = buckets.last()?.1;
    if count <= 0.0 {
        return None;
    }
    let quantile = |q: f64| {
        let bound = buckets.iter().find(|(_, c)| *c >= q * count).map_or(f64::INFINITY, |(b, _)| *b);
        bound * 1000.0
    };
    Some(Recorded { count, p50_ms: quantile(0.5), p99_ms: quantile(0.99) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE etcd_disk_wal_fsync_duration_seconds histogram
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 10
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 10
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.004\"} 10
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 10
etcd_debugging_mvcc_current_revision 100
";

    const AFTER: &str = "\
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 60
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 105
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.004\"} 109
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 110
etcd_debugging_mvcc_current_revision 350
ferry_push_ack_seconds_bucket{kind=\"a\",le=\"0.001\"} 3 1700000000
ferry_push_ack_seconds_bucket{kind=\"b\",le=\"0.001\"} 4
";

    #[test]
    fn a_histogram_between_two_readings_gives_its_own_quantiles() {
        let (before, after) = (Scrape::parse(BEFORE), Scrape::parse(AFTER));
        let fsync = recorded(&before, &after, "etcd_disk_wal_fsync_duration_seconds").expect("recorded");
        assert_eq!(fsync, Recorded { count: 100.0, p50_ms: 1.0, p99_ms: 4.0 });
        assert_eq!(
            after.total("etcd_debugging_mvcc_current_revision") - before.total("etcd_debugging_mvcc_current_revision"),
            250.0
        );
        assert!(recorded(&after, &after, "etcd_disk_wal_fsync_duration_seconds").is_none(), "nothing new");
    }

    #[test]
    fn series_with_other_labels_are_summed_and_timestamps_skipped() {
        let after = Scrape::parse(AFTER);
        let ack = recorded(&Scrape::default(), &after, "ferry_push_ack_seconds").expect("recorded");
        assert_eq!(ack.count, 7.0);
        assert_eq!(after.total("nothing_here"), 0.0);
    }
}
