//! The retry budget of one destination service, kept by each calling sidecar.
//!
//! Retries multiply load exactly when a service is least able to take it. A budget bounds them
//! in proportion to the traffic: every original request deposits `ratio` of a retry, every
//! retry withdraws one, and a floor of `min_per_second` retries per second is allowed whatever
//! the traffic, so that a quiet caller can still retry. Deposits and withdrawals count over a
//! sliding window of one-second buckets and expire with it: a burst of failures an hour ago
//! does not pay for retries now, and retries refused now do not count against later ones.
//!
//! This is the budget of Finagle's `RetryBudget` and Linkerd's `TpsBudget`, with the window
//! kept as a ring of counters instead of a token bucket whose tokens expire.
//!
//! A retry is charged when it is decided, before its backoff, so that many requests failing at
//! once cannot all pass the check while their retries are still asleep.

use std::{
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::policy::Budget;

/// The retry budget of one destination. Shared by every request to it; cheap to lock.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    settings: Budget,
    /// When bucket 0 began.
    start: Instant,
    /// The second (since `start`) of the newest bucket.
    current: u64,
    /// One bucket per second of the window; bucket `s % len` holds second `s`.
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Original requests.
    requests: u64,
    /// Retries allowed.
    retries: u64,
}

/// One bucket per second of the window, at least one; a fraction of a second counts as whole.
fn seconds(window: Duration) -> usize {
    window.as_secs_f64().ceil().max(1.0) as usize
}

impl RetryBudget {
    /// A budget with `settings`, empty.
    pub fn new(settings: Budget) -> Self {
        let state =
            State { settings, start: Instant::now(), current: 0, buckets: vec![Bucket::default(); seconds(settings.window)] };
        Self { state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = ferry_runtime::lock(&self.state);
        state.advance(Instant::now());
        state
    }

    /// The settings in force.
    pub fn settings(&self) -> Budget {
        self.lock().settings
    }

    /// Follows a policy change. A new window starts the count afresh; a new ratio or floor
    /// applies to what is already counted.
    pub fn update(&self, settings: Budget) {
        let mut state = self.lock();
        if state.settings.window != settings.window {
            *state =
                State { settings, start: Instant::now(), current: 0, buckets: vec![Bucket::default(); seconds(settings.window)] };
        } else {
            state.settings = settings;
        }
    }

    /// Counts an original request.
    pub fn deposit(&self) {
        self.lock().newest().requests += 1;
    }

    /// Asks for a retry: true, and the retry is charged, when the budget allows one more.
    pub fn try_withdraw(&self) -> bool {
        let mut state = self.lock();
        let (requests, retries) = state.totals();
        let settings = state.settings;
        let floor = f64::from(settings.min_per_second) * settings.window.as_secs_f64();
        if (retries + 1) as f64 > settings.ratio * requests as f64 + floor {
            return false;
        }
        state.newest().retries += 1;
        true
    }

    /// The original requests and retries counted in the window.
    pub fn counts(&self) -> (u64, u64) {
        self.lock().totals()
    }
}

impl State {
    /// Moves the window to `now`, emptying the buckets of the seconds it leaves behind.
    fn advance(&mut self, now: Instant) {
        let second = now.saturating_duration_since(self.start).as_secs();
        if second <= self.current {
            return;
        }
        let len = self.buckets.len() as u64;
        for s in (self.current + 1)..=second.min(self.current + len) {
            self.buckets[(s % len) as usize] = Bucket::default();
        }
        self.current = second;
    }

    fn newest(&mut self) -> &mut Bucket {
        let len = self.buckets.len() as u64;
        &mut self.buckets[(self.current % len) as usize]
    }

    fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(requests, retries), b| (requests + b.requests, retries + b.retries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min_per_second: u32, window: u64) -> RetryBudget {
        RetryBudget::new(Budget { ratio, min_per_second, window: Duration::from_secs(window) })
    }

    fn withdrawals(budget: &RetryBudget, asked: usize) -> usize {
        (0..asked).filter(|_| budget.try_withdraw()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn the_ratio_holds() {
        let budget = budget(0.2, 0, 10);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget, 50), 20, "0.2 of 100 requests");
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget, 50), 2, "0.2 of 10 more");
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_holds_without_traffic() {
        let budget = budget(0.2, 10, 10);
        assert_eq!(withdrawals(&budget, 500), 100, "10 per second over a 10 s window");
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget, 500), 20, "the ratio adds to the floor");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_and_withdrawals_expire_with_the_window() {
        let budget = budget(0.5, 0, 3);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(withdrawals(&budget, 10), 5);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(withdrawals(&budget, 10), 0, "still inside the window");
        assert_eq!(budget.counts(), (10, 5));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(budget.counts(), (0, 0), "the first second left the window");
        assert_eq!(withdrawals(&budget, 10), 0, "nothing deposited since");

        // Buckets expire one second at a time.
        budget.deposit();
        budget.deposit();
        tokio::time::advance(Duration::from_secs(1)).await;
        budget.deposit();
        budget.deposit();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(budget.counts(), (2, 0), "the older pair expired, the newer one stays");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(budget.counts(), (0, 0), "a long silence empties everything");
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_change_applies_at_once() {
        let budget = budget(0.0, 1, 10);
        assert_eq!(withdrawals(&budget, 50), 10);
        budget.update(Budget { ratio: 0.0, min_per_second: 2, window: Duration::from_secs(10) });
        assert_eq!(withdrawals(&budget, 50), 10, "the floor doubled, what was spent still counts");
        budget.update(Budget { ratio: 0.0, min_per_second: 2, window: Duration::from_secs(5) });
        assert_eq!(withdrawals(&budget, 50), 10, "a new window starts afresh");
    }
}
