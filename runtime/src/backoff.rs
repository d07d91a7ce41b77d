//! The one exponential backoff of Ferry: the wait before the `n`-th try after a failure, for
//! request retries, control-stream reconnects and certificate renewals alike.
//!
//! The ceiling doubles from `base` with each failure in a row, up to `max`. The wait is drawn
//! uniformly between a quarter of the ceiling and the ceiling: random enough that callers
//! failing together spread out ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015),
//! and never so short that a caller spins on a peer that is down.

use std::time::Duration;

use crate::rng;

/// An exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first wait.
    pub base: Duration,
    /// The ceiling of any wait.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `base`, doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The longest wait after `failures` failures in a row (from 1).
    pub fn ceiling(&self, failures: u32) -> Duration {
        self.base.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(self.max)
    }

    /// A wait after `failures` failures in a row: between a quarter of the ceiling and the
    /// ceiling.
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = u64::try_from(self.ceiling(failures).as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rng::range(ceiling / 4..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_stay_between_a_quarter_and_the_ceiling() {
        rng::seed(7);
        let backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(250));
        assert_eq!(backoff.ceiling(1), Duration::from_millis(25));
        assert_eq!(backoff.ceiling(2), Duration::from_millis(50));
        assert_eq!(backoff.ceiling(5), Duration::from_millis(250));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_millis(250), "no overflow");
        for failures in 1..10 {
            let ceiling = backoff.ceiling(failures);
            for _ in 0..100 {
                let delay = backoff.delay(failures);
                assert!(delay >= ceiling / 4 && delay <= ceiling, "{delay:?} outside {:?}..={ceiling:?}", ceiling / 4);
            }
        }
    }

    #[test]
    fn a_zero_base_waits_not_at_all() {
        assert_eq!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).delay(3), Duration::ZERO);
    }
}
