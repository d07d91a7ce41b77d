//! The state machines between probe results and health: hysteresis per check, flap damping
//! per instance.
//!
//! A check changes status only after enough consecutive results agree (`success_threshold`
//! passes to recover, `failure_threshold` failures to fail), so one lost packet does not move
//! traffic. Warning and critical are both failing: between them a check moves at once. An
//! instance whose health changes more than `max_flips` times within `window` is held critical
//! for `hold_down`, so a flapping instance stops drawing traffic instead of bouncing in and out.

use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use crate::Health;

/// The longest output kept per check.
pub const MAX_OUTPUT: usize = 256;

/// What one check has concluded so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    pub status: Health,
    /// What the last result said, truncated to [`MAX_OUTPUT`].
    pub output: String,
    pub last_transition: SystemTime,
    /// Whether a result (a probe, a renewal, an expiry) has set the status, rather than an
    /// assumption.
    pub checked: bool,
    /// Consecutive results of the other class (passing vs failing) than the status.
    streak: u32,
}

impl Default for CheckState {
    fn default() -> Self {
        Self::new()
    }
}

fn passing(health: Health) -> bool {
    health == Health::Passing
}

impl CheckState {
    /// A check that has not run yet: critical until it passes.
    pub fn new() -> Self {
        Self::assuming(Health::Critical)
    }

    /// A check not run yet, assumed to be `status` (the last known health of an instance whose
    /// checks restart), until its results say otherwise through the usual thresholds.
    pub fn assuming(status: Health) -> Self {
        Self { status, output: "not checked yet".into(), last_transition: SystemTime::now(), checked: false, streak: 0 }
    }

    /// Records one probe result; returns whether the status changed.
    pub fn record(&mut self, result: Health, output: String, success_threshold: u32, failure_threshold: u32) -> bool {
        self.output = truncate(output);
        self.checked = true;
        if passing(result) == passing(self.status) {
            self.streak = 0;
            return self.set(result);
        }
        self.streak += 1;
        let needed = if passing(result) { success_threshold } else { failure_threshold };
        if self.streak >= needed.max(1) {
            self.streak = 0;
            return self.set(result);
        }
        false
    }

    /// Sets the status directly (a TTL renewal or expiry); returns whether it changed.
    pub fn force(&mut self, status: Health, output: String) -> bool {
        self.output = truncate(output);
        self.checked = true;
        self.streak = 0;
        self.set(status)
    }

    fn set(&mut self, status: Health) -> bool {
        if status == self.status {
            return false;
        }
        self.status = status;
        self.last_transition = SystemTime::now();
        true
    }
}

/// `output` cut to at most [`MAX_OUTPUT`] bytes (on a character boundary), marked when cut.
pub fn truncate(mut output: String) -> String {
    if output.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT - '…'.len_utf8();
        while !output.is_char_boundary(end) {
            end -= 1;
        }
        output.truncate(end);
        output.push('…');
    }
    output
}

/// The health of an instance with these check statuses: the worst of them, passing with none.
pub fn worst(statuses: impl IntoIterator<Item = Health>) -> Health {
    statuses.into_iter().fold(Health::Passing, |worst, status| match (worst, status) {
        (Health::Critical, _) | (_, Health::Critical) => Health::Critical,
        (Health::Warning, _) | (_, Health::Warning) => Health::Warning,
        _ => Health::Passing,
    })
}

/// When an instance counts as flapping and what then happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapPolicy {
    /// More changes than this within `window` is flapping.
    pub max_flips: usize,
    pub window: Duration,
    /// How long a flapping instance is held critical.
    pub hold_down: Duration,
}

impl Default for FlapPolicy {
    fn default() -> Self {
        Self { max_flips: 4, window: Duration::from_secs(60), hold_down: Duration::from_secs(60) }
    }
}

/// Holds a flapping instance critical.
#[derive(Debug, Clone)]
pub struct FlapDamper {
    policy: FlapPolicy,
    last: Option<Health>,
    changes: VecDeque<Instant>,
    held_until: Option<Instant>,
}

impl FlapDamper {
    /// A damper applying `policy`.
    pub fn new(policy: FlapPolicy) -> Self {
        Self { policy, last: None, changes: VecDeque::new(), held_until: None }
    }

    /// The health to publish at `now` for the health the checks compute.
    pub fn apply(&mut self, computed: Health, now: Instant) -> Health {
        if self.last.is_some_and(|last| last != computed) {
            self.changes.push_back(now);
        }
        self.last = Some(computed);
        while self.changes.front().is_some_and(|t| now.saturating_duration_since(*t) > self.policy.window) {
            self.changes.pop_front();
        }
        if self.changes.len() > self.policy.max_flips {
            self.held_until = Some(now + self.policy.hold_down);
            self.changes.clear();
        }
        match self.held_until {
            Some(until) if now < until => Health::Critical,
            _ => {
                self.held_until = None;
                computed
            }
        }
    }

    /// When a hold-down in force ends, to re-evaluate then.
    pub fn held_until(&self) -> Option<Instant> {
        self.held_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_fails_only_after_enough_consecutive_failures() {
        let mut state = CheckState::new();
        assert!(state.record(Health::Passing, "ok".into(), 1, 3));
        assert!(!state.record(Health::Critical, "500".into(), 1, 3));
        assert!(!state.record(Health::Critical, "500".into(), 1, 3));
        assert!(!state.record(Health::Passing, "ok".into(), 1, 3), "a pass resets the streak");
        assert!(!state.record(Health::Critical, "500".into(), 1, 3));
        assert!(!state.record(Health::Critical, "500".into(), 1, 3));
        assert!(state.record(Health::Critical, "500".into(), 1, 3), "the third failure in a row");
        assert_eq!(state.status, Health::Critical);
        assert_eq!(state.output, "500");
    }

    #[test]
    fn a_check_recovers_after_enough_consecutive_passes() {
        let mut state = CheckState::new();
        assert!(!state.record(Health::Passing, "ok".into(), 2, 1));
        assert!(state.record(Health::Passing, "ok".into(), 2, 1));
        // Between failing states there is no hysteresis.
        assert!(state.record(Health::Warning, "429".into(), 2, 1));
        assert!(state.record(Health::Critical, "500".into(), 2, 1));
        assert!(!state.record(Health::Critical, "still 500".into(), 2, 1), "the output changes, the status does not");
        assert_eq!(state.output, "still 500");
    }

    #[test]
    fn outputs_are_truncated() {
        let mut state = CheckState::new();
        state.record(Health::Passing, "x".repeat(5000), 1, 1);
        assert!(state.output.len() <= MAX_OUTPUT);
    }

    #[test]
    fn the_worst_check_decides() {
        assert_eq!(worst([]), Health::Passing);
        assert_eq!(worst([Health::Passing, Health::Warning]), Health::Warning);
        assert_eq!(worst([Health::Warning, Health::Critical, Health::Passing]), Health::Critical);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_instance_is_held_critical() {
        let policy = FlapPolicy { max_flips: 3, window: Duration::from_secs(60), hold_down: Duration::from_secs(30) };
        let mut damper = FlapDamper::new(policy);
        let mut now = Instant::now();
        assert_eq!(damper.apply(Health::Passing, now), Health::Passing);
        for (i, health) in [Health::Critical, Health::Passing, Health::Critical].into_iter().enumerate() {
            now += Duration::from_secs(5);
            assert_eq!(damper.apply(health, now), health, "change {i} is within the limit");
        }
        now += Duration::from_secs(5);
        assert_eq!(damper.apply(Health::Passing, now), Health::Critical, "the fourth change in a minute is flapping");
        now += Duration::from_secs(29);
        assert_eq!(damper.apply(Health::Passing, now), Health::Critical, "held down");
        now += Duration::from_secs(2);
        assert_eq!(damper.apply(Health::Passing, now), Health::Passing, "released after the hold-down");
    }

    #[tokio::test(start_paused = true)]
    async fn changes_spread_out_are_not_flapping() {
        let mut damper =
            FlapDamper::new(FlapPolicy { max_flips: 2, window: Duration::from_secs(10), hold_down: Duration::from_secs(30) });
        let mut now = Instant::now();
        let mut health = Health::Passing;
        for _ in 0..10 {
            now += Duration::from_secs(6);
            health = if health == Health::Passing { Health::Critical } else { Health::Passing };
            assert_eq!(damper.apply(health, now), health);
        }
    }
}
