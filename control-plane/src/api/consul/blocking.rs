//! Consul's blocking queries: `?index=N&wait=D` holds a list request until what it lists changes
//! (its index moves away from N) or the wait ends, and every answer carries `X-Consul-Index`.
//!
//! A query about one service wakes on the registry's watch of that service, like Ferry's own
//! `GET /v1/services/{name}?index=`. A query spanning every service (the catalog's service list,
//! the agent's services, health by state) has no single watch to wait on: it looks again every
//! [`POLL`], which costs a lock and a scan of the services' summaries, never a store read.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderValue};
use tokio::sync::watch;

use super::ConsulError;
use crate::{
    api::http::{HttpState, MAX_BLOCKING_QUERIES},
    registry::{Registry, ServiceSnapshot},
};

/// How long a blocking query waits when it does not say, as in Consul.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest a blocking query may wait, as in Consul.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
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
                let wait = parse_wait(value).map_err(|why| ConsulError::bad_request(format!("wait: {why}")))?;
                self.wait = if wait.is_zero() { DEFAULT_WAIT } else { wait.min(MAX_WAIT) };
            }
            "stale" | "consistent" | "cached" | "leader" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Parses a wait in Go's duration form, as Consul does: `30s`, `120000ms`, `5m`, `1m30s`, `1.5s`.
pub fn parse_wait(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || format!("{text:?} must be a duration such as 30s, 120000ms or 5m");
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(invalid)?;
        let number: f64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    // Anything past the longest wait is cut to it; this only keeps the conversion in range.
    Ok(Duration::from_secs_f64(total.min(MAX_WAIT.as_secs_f64() * 10.0)))
}

/// What wakes a blocking query to look again.
pub enum Wake {
    /// One service's snapshots.
    Service(watch::Receiver<Arc<ServiceSnapshot>>),
    /// Every service: look again every [`POLL`].
    Poll,
}

/// Answers a list request: `view` gives the index of what it lists (never 0) and the answer;
/// with an index in `blocking`, waits until that index moves, the wait ends or the server shuts
/// down.
pub async fn answer<T>(
    state: &HttpState,
    blocking: Blocking,
    mut wake: Wake,
    mut view: impl FnMut() -> (u64, T),
) -> Result<(u64, T), ConsulError> {
    let (mut index, mut value) = view();
    let Some(held) = blocking.index else { return Ok((index, value)) };
    if index != held {
        return Ok((index, value));
    }
    let _permit = state.blocking.clone().try_acquire_owned().map_err(|_| {
        ConsulError::unavailable(format!("{MAX_BLOCKING_QUERIES} blocking queries are already waiting; retry later"))
    })?;
    let deadline = tokio::time::Instant::now() + blocking.wait;
    while index == held {
        let woken = async {
            match &mut wake {
                Wake::Service(watch) => {
                    if watch.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                Wake::Poll => tokio::time::sleep(POLL).await,
            }
        };
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep_until(deadline) => break,
            () = state.shutdown.cancelled() => break,
        }
        (index, value) = view();
    }
    Ok((index, value))
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
    fn waits_read_in_consuls_forms() {
        assert_eq!(parse_wait("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_wait("120000ms"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_wait("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_wait("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_wait("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_wait("0"), Ok(Duration::ZERO));
        for bad in ["", "30", "s", "5 m", "5d", "-1s", "1s2"] {
            assert!(parse_wait(bad).is_err(), "{bad:?} is refused");
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
