//! Response rate limiting (RRL) of UDP answers, against reflection: a spoofed client that makes
//! the server send the same answer again and again to a victim gets only so many per second.
//!
//! Identical responses to one client network (its /24, or /56 for IPv6) are counted in a token
//! bucket per (network, name, type, response code): `per_second` refill, `burst` at once. Past
//! it, every `slip`-th response is sent truncated and empty (TC set), so that a real client
//! retries over TCP, which cannot be spoofed; the others are dropped. TCP is never limited, nor
//! are loopback clients unless told otherwise (the app next to a sidecar cannot be spoofed and
//! may ask for the same name in a tight loop). The table of buckets is bounded: when full,
//! buckets that have refilled are forgotten, and a new key that still finds no room is limited.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How answers are rate limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Identical responses per second to one client network, on average.
    pub per_second: u32,
    /// How many may be sent at once.
    pub burst: u32,
    /// Every this many limited responses, one is sent truncated (TC set, no records); 0 never.
    pub slip: u32,
    /// Whether loopback clients are left alone.
    pub exempt_loopback: bool,
    /// The most buckets kept.
    pub max_buckets: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self { per_second: 50, burst: 100, slip: 2, exempt_loopback: true, max_buckets: 10_000 }
    }
}

/// What to do with one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Send it truncated and empty, so that the client retries over TCP.
    Slip,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    network: IpAddr,
    name: String,
    qtype: u16,
    code: u16,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    limited: u32,
}

/// The buckets of one server.
#[derive(Debug)]
pub struct ResponseLimiter {
    limit: RateLimit,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_key: HashMap<Key, Bucket>,
    /// When a full table was last swept: at most once a second, so that a flood of new keys
    /// cannot make every answer scan the whole table.
    swept_at: Option<Instant>,
}

/// The network a client address counts in.
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) & 0xffff_ff00).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 72) - 1)).into()),
    }
}

impl ResponseLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self { limit, buckets: Mutex::default() }
    }

    /// Whether to send a response with `code` to `client` about `name` (any case) and `qtype`,
    /// at `now`.
    pub fn check(&self, client: IpAddr, name: &str, qtype: u16, code: u16, now: Instant) -> Verdict {
        let limit = &self.limit;
        if limit.exempt_loopback && client.is_loopback() {
            return Verdict::Send;
        }
        let key = Key { network: network(client), name: name.to_ascii_lowercase(), qtype, code };
        let (per_second, burst) = (f64::from(limit.per_second.max(1)), f64::from(limit.burst.max(1)));
        let mut guard = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Buckets { by_key: buckets, swept_at } = &mut *guard;
        if !buckets.contains_key(&key) && buckets.len() >= limit.max_buckets {
            if swept_at.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
                // Forget the buckets that have refilled: they hold nothing a new one would not.
                let refill = Duration::from_secs_f64(burst / per_second);
                buckets.retain(|_, bucket| now.saturating_duration_since(bucket.at) < refill);
                *swept_at = Some(now);
            }
            if buckets.len() >= limit.max_buckets {
                return Verdict::Drop;
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: burst, at: now, limited: 0 });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Verdict::Send;
        }
        bucket.limited = bucket.limited.wrapping_add(1);
        if limit.slip > 0 && bucket.limited.is_multiple_of(limit.slip) { Verdict::Slip } else { Verdict::Drop }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    fn limiter() -> ResponseLimiter {
        ResponseLimiter::new(RateLimit { per_second: 10, burst: 5, slip: 2, exempt_loopback: true, max_buckets: 4 })
    }

    #[test]
    fn a_burst_passes_then_half_slips_and_half_drops_until_tokens_refill() {
        let limiter = limiter();
        let now = Instant::now();
        let verdicts: Vec<Verdict> = (0..9).map(|_| limiter.check(CLIENT, "catalog.service.ferry.", 1, 0, now)).collect();
        assert_eq!(&verdicts[..5], &[Verdict::Send; 5]);
        assert_eq!(&verdicts[5..], &[Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]);
        // A tenth of a second later, one token is back.
        let later = now + Duration::from_millis(100);
        assert_eq!(limiter.check(CLIENT, "CATALOG.service.ferry.", 1, 0, later), Verdict::Send);
        assert_ne!(limiter.check(CLIENT, "catalog.service.ferry.", 1, 0, later), Verdict::Send);
    }

    #[test]
    fn other_names_types_codes_and_networks_have_their_own_buckets() {
        let limiter = limiter();
        let now = Instant::now();
        for _ in 0..5 {
            limiter.check(CLIENT, "a.service.ferry.", 1, 0, now);
        }
        assert_ne!(limiter.check(CLIENT, "a.service.ferry.", 1, 0, now), Verdict::Send);
        // The same /24 shares the bucket.
        assert_ne!(limiter.check(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200)), "a.service.ferry.", 1, 0, now), Verdict::Send);
        assert_eq!(limiter.check(IpAddr::V4(Ipv4Addr::new(192, 0, 3, 7)), "a.service.ferry.", 1, 0, now), Verdict::Send);
        assert_eq!(limiter.check(CLIENT, "b.service.ferry.", 1, 0, now), Verdict::Send);
        assert_eq!(limiter.check(CLIENT, "a.service.ferry.", 28, 0, now), Verdict::Send);
    }

    #[test]
    fn loopback_is_exempt_and_the_table_is_bounded() {
        let limiter = limiter();
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(limiter.check(IpAddr::V4(Ipv4Addr::LOCALHOST), "a.", 1, 0, now), Verdict::Send);
        }
        for n in 0..4 {
            assert_eq!(limiter.check(CLIENT, &format!("n{n}."), 1, 0, now), Verdict::Send);
        }
        // Full of fresh buckets: a fifth key is limited rather than growing the table.
        assert_eq!(limiter.check(CLIENT, "n4.", 1, 0, now), Verdict::Drop);
        assert_eq!(limiter.buckets.lock().expect("not poisoned").by_key.len(), 4);
        // Once they have refilled (burst / rate = 0.5 s), they make room.
        assert_eq!(limiter.check(CLIENT, "n4.", 1, 0, now + Duration::from_secs(1)), Verdict::Send);
    }
}
