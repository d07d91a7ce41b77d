//! Consul's blocking queries: `?index=N&wait=D` holds a list request until what it lists changes
//! (its index moves away from N) or the wait ends, and every answer carries `X-Consul-Index`.
//!
//! A query about one service wakes on the registry's watch of that service, like Ferry's own
//! `GET /v1/services/{name}?index=`. A query spanning every service (the catalog's service list,
//! the agent's services, health by state) has no single watch to wait on: it looks again every
//! [`POLL`], which costs a lock and a scan of the services' summaries (the catalog's index),
//! never a store read; the answer itself is built once, when the index has moved or the wait
//! ends, not at every look.
//!
//! Consul's blocking queries have their own cap, [`MAX_CONSUL_BLOCKING_QUERIES`], under the
//! API's: past it a blocking query is refused with 429, which Consul's clients (the Go client's
//! watches, Prometheus' `consul_sd`) treat as an error and retry after a backoff. Answering at
//! once instead would hand them back the index they hold, and they would ask again at once.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderValue};
use tokio::sync::watch;

use super::{ConsulError, ConsulState};
use crate::{
    api::http::MAX_BLOCKING_QUERIES,
    registry::{Registry, ServiceSnapshot},
};

/// How long a blocking query waits when it does not say, as in Consul.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest a blocking query may wait, as in Consul.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// The most Consul blocking queries waiting at once; each also holds one of the API's permits.
pub const MAX_CONSUL_BLOCKING_QUERIES: usize = 1024;
/// How often a query spanning every service looks for a change.
pub const POLL: Duration = Duration::from_millis(200);

/// The blocking and consistency parameters of a list request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// The index the client holds; `None` answers at once.
    pub index: Option<u64>,
    pub wait: Duration,
}

impl Default for Blocking {
    fn default() -> Self {
        Self { index: None, wait: DEFAULT_WAIT }
    }
}

impl Blocking {
    /// Takes `index` and `wait` from a query; `stale`, `consistent` and `cached` are accepted and
    /// change nothing (every answer comes from this control plane's memory, which is as
    /// consistent as its store makes it). Other parameters are left to the caller.
    pub fn take(&mut self, key: &str, value: &str) -> Result<bool, ConsulError> {
        match key {
            "index" => {
                let index = value.parse().map_err(|_| ConsulError::bad_request(format!("index: {value:?} is not a number")))?;
                // Consul treats 0 as "no index": answer at once.
                self.index = Some(index).filter(|i| *i > 0);
            }
            "wait" => {
                // The cap applies to waits alone: the parser returns what was written.
                let wait = parse_duration(value).map_err(|why| ConsulError::bad_request(format!("wait: {why}")))?;
                self.wait = if wait.is_zero() { DEFAULT_WAIT } else { wait.min(MAX_WAIT) };
            }
            "stale" | "consistent" | "cached" | "leader" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// The longest duration Go's `time.Duration` holds (about 292 years): what Consul's own parser
/// accepts, so anything longer is refused rather than cut.
const MAX_GO_DURATION_NANOS: u128 = i64::MAX as u128;

/// Parses a duration in Go's form, as Consul does (`30s`, `120000ms`, `5m`, `1m30s`, `1.5s`,
/// `3h`), exactly: no cap here, since registrations read their TTLs, intervals and
/// `DeregisterCriticalServiceAfter` with it too. A `wait` is capped where it is read
/// ([`Blocking::take`]); a check's durations are bounded by Ferry's validation, which names the
/// field. A duration past Go's range is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || format!("{text:?} must be a duration such as 30s, 120000ms or 5m");
    let too_long = || format!("{text:?} is longer than the longest duration (about 292 years)");
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
        let (whole, fraction) = rest[..digits].split_once('.').unwrap_or((&rest[..digits], ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(invalid());
        }
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit_nanos: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        // Whole units exactly; of the fraction, what a nanosecond resolves (as Go does).
        let mut nanos: u128 = 0;
        for digit in whole.bytes() {
            nanos = nanos.checked_mul(10).and_then(|n| n.checked_add(u128::from(digit - b'0'))).ok_or_else(too_long)?;
            if nanos > MAX_GO_DURATION_NANOS {
                return Err(too_long());
            }
        }
        nanos = nanos.checked_mul(unit_nanos).ok_or_else(too_long)?;
        let mut scale = unit_nanos;
        for digit in fraction.bytes() {
            scale /= 10;
            nanos += u128::from(digit - b'0') * scale;
        }
        total = total.checked_add(nanos).filter(|t| *t <= MAX_GO_DURATION_NANOS).ok_or_else(too_long)?;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_long())?;
    let subsec = u32::try_from(total % 1_000_000_000).map_err(|_| too_long())?;
    Ok(Duration::new(secs, subsec))
}

/// What wakes a blocking query to look again.
pub enum Wake {
    /// One service's snapshots.
    Service(watch::Receiver<Arc<ServiceSnapshot>>),
    /// Every service: look again every [`POLL`].
    Poll,
    /// Nothing: what is asked about cannot change (the one node, a name no service can have),
    /// so a blocking query waits out its wait, as Consul's would.
    Never,
}

/// Answers a list request: `index` gives the index of what it lists (never 0), cheaply, and
/// `build` the answer; with an index in `blocking`, waits until that index moves, the wait ends
/// or the server shuts down, and only then builds the answer.
pub async fn answer<T>(
    state: &ConsulState,
    blocking: Blocking,
    mut wake: Wake,
    mut index: impl FnMut() -> u64,
    build: impl FnOnce() -> T,
) -> Result<(u64, T), ConsulError> {
    let mut now = index();
    let Some(held) = blocking.index.filter(|held| *held == now) else { return Ok((now, build())) };
    let _consul_permit = state.consul.blocking.clone().try_acquire_owned().map_err(|_| {
        ConsulError::too_many(format!("{MAX_CONSUL_BLOCKING_QUERIES} Consul blocking queries are already waiting; retry later"))
    })?;
    let _permit = state.http.blocking.clone().try_acquire_owned().map_err(|_| {
        ConsulError::unavailable(format!("{MAX_BLOCKING_QUERIES} blocking queries are already waiting; retry later"))
    })?;
    let deadline = tokio::time::Instant::now() + blocking.wait;
    while now == held {
        let woken = async {
            match &mut wake {
                Wake::Service(watch) => {
                    if watch.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                Wake::Poll => tokio::time::sleep(POLL).await,
                Wake::Never => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep_until(deadline) => break,
            () = state.http.shutdown.cancelled() => break,
        }
        now = index();
    }
    Ok((now, build()))
}

/// The headers every Consul read answer carries.
pub fn headers(index: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-consul-index", HeaderValue::from(index.max(1)));
    headers.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    headers.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    headers
}

/// An index for answers that span every service, which moves whenever any service changes,
/// its last instance leaving included.
///
/// The largest index of the services that exist moves on every registration and health change,
/// but not when a service loses its last instance (it stops being listed); so the indexes of
/// services seen to disappear are kept here too. The registry hands out indexes from one
/// increasing counter, so the largest of them all is a valid index for the whole catalog.
#[derive(Debug, Default)]
pub struct CatalogIndex {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    services: BTreeSet<Arc<str>>,
    gone: u64,
}

impl CatalogIndex {
    /// The catalog's index now (at least 1).
    pub fn current(&self, registry: &Registry) -> u64 {
        let services = registry.services();
        let names: BTreeSet<Arc<str>> = services.iter().map(|s| s.name.clone()).collect();
        let largest = services.iter().map(|s| s.index).max().unwrap_or(0);
        let mut seen = ferry_runtime::lock(&self.seen);
        let gone: Vec<Arc<str>> = seen.services.difference(&names).cloned().collect();
        for name in gone {
            // Its snapshot stays while anything watches it or until the registry sweeps it;
            // a service swept before it was looked at leaves the index where it was.
            let index = registry.snapshot(&name).map_or(0, |snapshot| snapshot.index);
            seen.gone = seen.gone.max(index);
        }
        seen.services = names;
        largest.max(seen.gone).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_consuls_forms() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("120000ms"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "30", "s", "5 m", "5d", "-1s", "1s2", ".s", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn durations_are_exact_however_long_and_refused_past_gos_range() {
        assert_eq!(parse_duration("3h"), Ok(Duration::from_secs(3 * 3600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(24 * 3600)));
        assert_eq!(parse_duration("8760h"), Ok(Duration::from_secs(365 * 24 * 3600)));
        assert_eq!(parse_duration("2562047h"), Ok(Duration::from_secs(2_562_047 * 3600)));
        for too_long in ["2562048h", "99999999999999999999999999999999999999999h", "9223372036854775808ns"] {
            let why = parse_duration(too_long).expect_err("past Go's range");
            assert!(why.contains("longer than"), "{too_long:?}: {why}");
        }
    }

    #[test]
    fn waits_are_capped_and_zero_means_the_default() {
        let mut blocking = Blocking::default();
        assert!(blocking.take("wait", "1h").expect("valid in this test"));
        assert_eq!(blocking.wait, MAX_WAIT);
        assert!(blocking.take("wait", "0").expect("valid in this test"));
        assert_eq!(blocking.wait, DEFAULT_WAIT);
        assert!(blocking.take("index", "0").expect("valid in this test"));
        assert_eq!(blocking.index, None, "index 0 answers at once");
        assert!(blocking.take("index", "42").expect("valid in this test"));
        assert_eq!(blocking.index, Some(42));
        assert!(blocking.take("stale", "").expect("valid in this test"));
        assert!(!blocking.take("tag", "v2").expect("valid in this test"), "left to the caller");
        assert!(blocking.take("index", "x").is_err());
    }

    #[test]
    fn the_index_header_is_never_zero() {
        let headers = headers(0);
        assert_eq!(headers["x-consul-index"], "1");
        assert_eq!(headers["x-consul-knownleader"], "true");
        assert_eq!(headers["x-consul-lastcontact"], "0");
    }
}
