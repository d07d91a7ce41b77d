//! What a balancer knows about each endpoint beyond its config: its load (requests in flight
//! and a peak-EWMA latency estimate), how long it has been routable (for slow start), and its
//! outlier state (consecutive failures, ejections). Kept across config updates for as long as
//! the endpoint stays.

use ferry_runtime::lock;
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::outcome::Outcome;
use crate::metrics::BalanceMetrics;
use crate::outbound::policy::Ejection;

/// The least a failure counts as in the latency estimate.
const PENALTY_FLOOR: Duration = Duration::from_millis(30);
/// The most failures push the latency estimate to.
const PENALTY_CEILING: Duration = Duration::from_secs(10);

/// One endpoint as a balancer tracks it. The request path reads and writes it with atomics
/// alone: its latency estimate, slow-start clock and ejection deadline are words of their own,
/// and only an ejection decision takes the outlier lock.
#[derive(Debug)]
pub struct Tracked {
    pub id: Arc<str>,
    in_flight: AtomicUsize,
    /// The instants below count from here.
    epoch: Instant,
    /// The peak-EWMA latency estimate, in seconds (`f64` bits), as of `rtt_updated`.
    rtt_seconds: AtomicU64,
    rtt_updated: AtomicInstant,
    /// Since when it has been routable, for slow start.
    routable_since: AtomicInstant,
    /// Ejected until then; once past, the next request is a probe.
    ejected_until: AtomicInstant,
    consecutive_failures: AtomicU32,
    /// What ejections need beyond the above, changed only when one is decided.
    outlier: Mutex<Outlier>,
    /// A probe request is in flight to this endpoint, whose ejection has run out.
    probing: AtomicBool,
    /// Its latency has been sampled since it (last) became routable.
    measured: AtomicBool,
    /// The estimate before the first sample, in seconds.
    default_rtt: f64,
}

/// An optional instant in one atomic word: nanoseconds from its owner's epoch (negative for
/// instants before it), `i64::MIN` for none.
#[derive(Debug)]
struct AtomicInstant(AtomicI64);

impl AtomicInstant {
    const NONE: i64 = i64::MIN;

    fn new(epoch: Instant, at: Option<Instant>) -> Self {
        Self(AtomicI64::new(Self::encode(epoch, at)))
    }

    fn encode(epoch: Instant, at: Option<Instant>) -> i64 {
        match at {
            None => Self::NONE,
            Some(at) if at >= epoch => i64::try_from(at.duration_since(epoch).as_nanos()).unwrap_or(i64::MAX),
            Some(at) => -i64::try_from(epoch.duration_since(at).as_nanos()).unwrap_or(i64::MAX),
        }
    }

    fn load(&self, epoch: Instant) -> Option<Instant> {
        match self.0.load(Ordering::Acquire) {
            Self::NONE => None,
            nanos if nanos >= 0 => Some(epoch + Duration::from_nanos(nanos.unsigned_abs())),
            nanos => Some(epoch.checked_sub(Duration::from_nanos(nanos.unsigned_abs())).unwrap_or(epoch)),
        }
    }

    fn store(&self, epoch: Instant, at: Option<Instant>) {
        self.0.store(Self::encode(epoch, at), Ordering::Release);
    }
}

/// Peak-EWMA: jumps up to any slower sample at once, decays towards faster ones (and towards
/// zero while idle) with the configured decay time.
fn decayed(seconds: f64, updated: Instant, now: Instant, decay: Duration) -> f64 {
    let elapsed = now.saturating_duration_since(updated).as_secs_f64();
    seconds * (-elapsed / decay.as_secs_f64().max(1e-3)).exp()
}

#[derive(Debug, Default)]
struct Outlier {
    times_ejected: u32,
    last_ejected: Option<Instant>,
}

/// Whether an endpoint can take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// Its ejection ran out: it can take one probe request.
    Probe,
    Ejected,
}

impl Tracked {
    pub fn new(id: &str, default_rtt: Duration, now: Instant) -> Self {
        Self {
            id: id.into(),
            in_flight: AtomicUsize::new(0),
            epoch: now,
            rtt_seconds: AtomicU64::new(default_rtt.as_secs_f64().to_bits()),
            rtt_updated: AtomicInstant::new(now, Some(now)),
            routable_since: AtomicInstant::new(now, None),
            ejected_until: AtomicInstant::new(now, None),
            consecutive_failures: AtomicU32::new(0),
            outlier: Mutex::new(Outlier::default()),
            probing: AtomicBool::new(false),
            measured: AtomicBool::new(false),
            default_rtt: default_rtt.as_secs_f64(),
        }
    }

    /// Starts the latency estimate afresh, from `baseline` (the fastest estimate among its
    /// routable peers; the default RTT when none is measured): what it learnt before it stopped
    /// being routable (timeouts, penalties) says nothing of it now, and would starve it until it
    /// decayed (tens of seconds after a 10 s penalty). From there it competes with its peers at
    /// once, and a slow answer raises its estimate at once (peak-EWMA).
    fn forget_latency(&self, now: Instant, baseline: Option<f64>) {
        let start = baseline.filter(|b| b.is_finite() && *b > 0.0).unwrap_or(self.default_rtt);
        self.rtt_seconds.store(start.to_bits(), Ordering::Relaxed);
        self.rtt_updated.store(self.epoch, Some(now));
        self.measured.store(false, Ordering::Relaxed);
    }

    /// An exchange starts.
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// An exchange ended.
    pub fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The peak-EWMA cost of sending one more request here: latency × (in flight + 1).
    pub fn cost(&self, now: Instant, decay: Duration) -> f64 {
        self.latency(now, decay) * (self.in_flight() + 1) as f64
    }

    /// The latency estimate, in seconds.
    pub fn latency(&self, now: Instant, decay: Duration) -> f64 {
        let seconds = f64::from_bits(self.rtt_seconds.load(Ordering::Relaxed));
        let updated = self.rtt_updated.load(self.epoch).unwrap_or(self.epoch);
        decayed(seconds, updated, now, decay)
    }

    /// Folds a sample into the estimate. Two samples folded at once may lose one: the estimate
    /// is a heuristic, and a lost sample costs less than a lock on every response.
    /// `peak` takes a slower sample at once; without it, every sample is averaged in (the
    /// first answer after an endpoint becomes routable, whose new connection's handshake says
    /// nothing of the answers after it).
    fn observe(&self, now: Instant, sample: f64, decay: Duration, peak: bool) {
        let seconds = f64::from_bits(self.rtt_seconds.load(Ordering::Relaxed));
        let updated = self.rtt_updated.load(self.epoch).unwrap_or(self.epoch);
        let next = if peak && sample > seconds {
            sample
        } else {
            let elapsed = now.saturating_duration_since(updated).as_secs_f64();
            let weight = (-elapsed / decay.as_secs_f64().max(1e-3)).exp();
            seconds * weight + sample * (1.0 - weight)
        };
        self.rtt_seconds.store(next.to_bits(), Ordering::Relaxed);
        self.rtt_updated.store(self.epoch, Some(now));
    }

    /// Counts a failure against the latency estimate: doubled, and at least the default RTT,
    /// so that an endpoint failing fast is not taken for a fast one.
    pub fn penalize(&self, now: Instant, decay: Duration) {
        self.measured.store(true, Ordering::Relaxed);
        let penalty = (self.latency(now, decay) * 2.0).clamp(PENALTY_FLOOR.as_secs_f64(), PENALTY_CEILING.as_secs_f64());
        self.observe(now, penalty, decay, true);
    }

    /// Whether its latency has been sampled yet.
    pub fn measured(&self) -> bool {
        self.measured.load(Ordering::Relaxed)
    }

    /// Folds in an answer's latency; the first since the endpoint became routable is averaged
    /// in rather than taken as a peak.
    pub fn observe_latency(&self, now: Instant, sample: Duration, decay: Duration) {
        let first = !self.measured.swap(true, Ordering::Relaxed);
        self.observe(now, sample.as_secs_f64(), decay, !first);
    }

    /// Notes whether the endpoint is routable now; `warm` starts it past any slow start. An
    /// endpoint that becomes routable (again) starts its latency estimate from `baseline`, its
    /// routable peers' fastest. Called by config updates alone, one at a time.
    pub fn set_routable(&self, routable: bool, now: Instant, warm: bool, baseline: Option<f64>) {
        match (routable, self.routable_since.load(self.epoch)) {
            (true, None) => {
                let since = if warm { now.checked_sub(Duration::from_secs(3600)).unwrap_or(now) } else { now };
                self.routable_since.store(self.epoch, Some(since));
                self.forget_latency(now, baseline);
            }
            (false, _) => self.routable_since.store(self.epoch, None),
            (true, Some(_)) => {}
        }
    }

    /// Its share during slow start: from 10% when it became routable up to 100% at the end of
    /// the window.
    pub fn ramp(&self, now: Instant, window: Option<Duration>) -> f64 {
        let Some(window) = window else { return 1.0 };
        let Some(since) = self.routable_since.load(self.epoch) else { return 1.0 };
        let elapsed = now.saturating_duration_since(since).as_secs_f64();
        (elapsed / window.as_secs_f64()).clamp(0.1, 1.0)
    }

    fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until.load(self.epoch)
    }

    fn set_ejected_until(&self, until: Option<Instant>) {
        self.ejected_until.store(self.epoch, until);
    }

    pub fn availability(&self, now: Instant) -> Availability {
        match self.ejected_until() {
            None => Availability::Available,
            Some(until) if now < until => Availability::Ejected,
            Some(_) if self.probing.load(Ordering::Acquire) => Availability::Ejected,
            Some(_) => Availability::Probe,
        }
    }

    /// Whether it is ejected at `now` (an ejection run out, its probe pending, is not counted).
    pub fn is_ejected_at(&self, now: Instant) -> bool {
        self.ejected_until().is_some_and(|until| now < until)
    }

    /// Whether it is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(Instant::now())
    }

    /// Claims the one probe request of an endpoint whose ejection ran out.
    pub fn claim_probe(&self) -> bool {
        self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// The endpoints of one balancer as outlier detection sees them: it decides ejections against
/// the whole set, so that no more than the allowed share is ejected at once.
#[derive(Debug)]
pub struct OutlierSet {
    pub label: Arc<str>,
    /// The routable endpoints.
    members: ArcSwap<Vec<Arc<Tracked>>>,
    ejection: ArcSwap<Option<Ejection>>,
    ejecting: Mutex<()>,
    pub metrics: BalanceMetrics,
}

impl OutlierSet {
    pub fn new(label: Arc<str>, metrics: BalanceMetrics) -> Self {
        Self { label, members: ArcSwap::default(), ejection: ArcSwap::from_pointee(None), ejecting: Mutex::new(()), metrics }
    }

    /// The routable endpoints and the ejection settings, after a config update.
    pub fn update(&self, members: Vec<Arc<Tracked>>, ejection: Option<Ejection>) {
        if ejection.is_none() {
            for member in &members {
                let _outlier = lock(&member.outlier);
                member.set_ejected_until(None);
                member.consecutive_failures.store(0, Ordering::Relaxed);
            }
        }
        self.members.store(Arc::new(members));
        self.ejection.store(Arc::new(ejection));
        self.publish();
    }

    /// Sets the endpoint gauges.
    pub fn publish(&self) {
        let members = self.members.load();
        let ejected = members.iter().filter(|m| m.is_ejected()).count();
        self.metrics.set_endpoints(&self.label, members.len() - ejected, ejected);
    }

    /// Learns from one exchange with `tracked`; `probe` when it was the probe of an ejected
    /// endpoint.
    pub fn report(&self, tracked: &Tracked, outcome: Option<Outcome>, probe: bool, now: Instant) {
        let ejection = **self.ejection.load();
        let release = || {
            if probe {
                tracked.probing.store(false, Ordering::Release);
            }
        };
        let Some(ejection) = ejection else { return release() };
        match outcome {
            None | Some(Outcome::Neutral) => {}
            // The common case, with no lock: a success that is not a probe.
            Some(Outcome::Success) if !probe => {
                if tracked.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    tracked.consecutive_failures.store(0, Ordering::Relaxed);
                }
            }
            Some(Outcome::Success) => {
                tracked.consecutive_failures.store(0, Ordering::Relaxed);
                let outlier = lock(&tracked.outlier);
                if tracked.ejected_until().is_some() {
                    tracked.set_ejected_until(None);
                    tracing::info!(pool = %self.label, endpoint = %tracked.id, "a probe succeeded: the endpoint is back");
                    drop(outlier);
                    release();
                    self.publish();
                    return;
                }
            }
            Some(Outcome::Failure) => {
                let failures = tracked.consecutive_failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                let mut outlier = lock(&tracked.outlier);
                if probe && tracked.ejected_until().is_some() {
                    outlier.times_ejected = outlier.times_ejected.saturating_add(1);
                    let duration = ejection.base.saturating_mul(outlier.times_ejected).min(ejection.max);
                    tracked.set_ejected_until(Some(now + duration));
                    outlier.last_ejected = Some(now);
                    tracing::info!(pool = %self.label, endpoint = %tracked.id, ?duration, "a probe failed: ejected again");
                    self.metrics.ejected(&self.label);
                } else if tracked.ejected_until().is_none() && failures >= ejection.consecutive_failures {
                    drop(outlier);
                    release();
                    self.eject(tracked, &ejection, now);
                    return;
                }
            }
        }
        release();
    }

    /// Ejects `tracked` unless that would eject more than the allowed share, or the last one.
    fn eject(&self, tracked: &Tracked, ejection: &Ejection, now: Instant) {
        let _ejecting = lock(&self.ejecting);
        let members = self.members.load();
        if !members.iter().any(|m| m.id == tracked.id) {
            return;
        }
        let total = members.len();
        let ejected = members.iter().filter(|m| m.is_ejected_at(now)).count();
        // Counted after this ejection, and one always stays.
        let after = ejected + 1;
        if after >= total || after * 100 > ejection.max_percent as usize * total {
            tracing::debug!(pool = %self.label, endpoint = %tracked.id, ejected, total, "not ejected: the ejection limit is reached");
            return;
        }
        let mut outlier = lock(&tracked.outlier);
        if tracked.ejected_until().is_some() {
            return;
        }
        // An endpoint healthy for a long while starts its ejection count afresh.
        if outlier.last_ejected.is_some_and(|at| now.saturating_duration_since(at) > ejection.max * 2) {
            outlier.times_ejected = 0;
        }
        outlier.times_ejected = outlier.times_ejected.saturating_add(1);
        let duration = ejection.base.saturating_mul(outlier.times_ejected).min(ejection.max);
        tracked.set_ejected_until(Some(now + duration));
        outlier.last_ejected = Some(now);
        let failures = tracked.consecutive_failures.load(Ordering::Relaxed);
        drop(outlier);
        tracing::warn!(pool = %self.label, endpoint = %tracked.id, failures, ?duration, "endpoint ejected after consecutive failures");
        self.metrics.ejected(&self.label);
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_routable_again_starts_from_its_peers_estimate() {
        let now = Instant::now();
        let decay = Duration::from_secs(10);
        let tracked = Tracked::new("catalog-1", Duration::from_millis(30), now);
        tracked.set_routable(true, now, false, None);
        assert!((tracked.latency(now, decay) - 0.030).abs() < 1e-9, "the default RTT with no peer measured");
        // Timeouts while it failed push the estimate to the ceiling...
        for _ in 0..10 {
            tracked.penalize(now, decay);
        }
        assert!(tracked.latency(now, decay) >= PENALTY_CEILING.as_secs_f64() - 1e-9);
        // ...and still 60 s later, well above a healthy peer's 2 ms: it would be starved.
        assert!(tracked.latency(now + Duration::from_secs(60), decay) > 0.02);
        // Critical, then passing again: it starts from its peers' fastest estimate.
        tracked.set_routable(false, now, false, None);
        let back = now + Duration::from_secs(1);
        tracked.set_routable(true, back, false, Some(0.002));
        assert!(!tracked.measured());
        assert!((tracked.latency(back, decay) - 0.002).abs() < 1e-9);
        // Its first answer (a new connection's) is averaged in; a slow one after it counts at
        // once (peak-EWMA).
        tracked.observe_latency(back, Duration::from_millis(40), decay);
        assert!((tracked.latency(back, decay) - 0.002).abs() < 1e-9, "averaged in at no time since: no weight");
        tracked.observe_latency(back, Duration::from_millis(40), decay);
        assert!((tracked.latency(back, decay) - 0.040).abs() < 1e-9);
        // Staying routable forgets nothing.
        tracked.set_routable(true, back + Duration::from_secs(1), false, Some(0.002));
        assert!(tracked.measured());
        assert!(tracked.latency(back, decay) > 0.03);
    }
}
