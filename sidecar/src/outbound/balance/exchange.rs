//! One exchange with an endpoint, as its balancer follows it: in flight from dispatch until
//! its response body ends, its latency sampled when the head arrives, and its outcome reported
//! to outlier detection.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    endpoint::{OutlierSet, Tracked},
    outcome::{Outcome, Verdict},
};

/// One exchange in flight: counted from dispatch until its response body ends (or the request
/// is given up), then reported to outlier detection.
pub struct Exchange {
    tracked: Arc<Tracked>,
    outliers: Arc<OutlierSet>,
    probe: bool,
    started: Instant,
    decay: Duration,
    answered: bool,
}

impl Exchange {
    pub fn start(tracked: Arc<Tracked>, outliers: Arc<OutlierSet>, probe: bool, decay: Duration) -> Self {
        tracked.start();
        Self { tracked, outliers, probe, started: Instant::now(), decay, answered: false }
    }

    /// The response headers arrived: the latency sample.
    pub fn answered(&mut self) {
        self.answered = true;
        let now = Instant::now();
        self.tracked.observe_latency(now, now.saturating_duration_since(self.started), self.decay);
    }
}

impl Exchange {
    /// Reports a probe's outcome as soon as it is known, releasing the probe.
    pub fn settle_probe(&mut self, outcome: Option<Outcome>) {
        if std::mem::replace(&mut self.probe, false) {
            self.outliers.report(&self.tracked, outcome, true, Instant::now());
        }
    }
}

impl Verdict for Exchange {
    fn decide(mut self, outcome: Option<Outcome>) {
        let now = Instant::now();
        if !self.answered {
            // Given up before any answer: it was at least this slow.
            self.answered = true;
            self.tracked.observe_latency(now, now.saturating_duration_since(self.started), self.decay);
        }
        if outcome == Some(Outcome::Failure) {
            // A failure, however fast, must not make the endpoint look fast to P2C.
            self.tracked.penalize(now, self.decay);
        }
        self.outliers.report(&self.tracked, outcome, std::mem::replace(&mut self.probe, false), now);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.answered {
            let now = Instant::now();
            self.tracked.observe_latency(now, now.saturating_duration_since(self.started), self.decay);
        }
        if self.probe {
            // A probe given up says nothing; the next request may probe again.
            self.outliers.report(&self.tracked, None, true, Instant::now());
        }
        self.tracked.finish();
    }
}
