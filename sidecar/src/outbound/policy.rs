//! The resilience settings of one destination service: its `ServicePolicy` with every knob it
//! leaves unset filled in with Ferry's defaults, resolved once per policy version so the
//! request path reads plain numbers.

use std::time::Duration;

use ferry_proto::{v1, validate};

/// How a calling sidecar picks among a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Power of two choices over a peak-EWMA latency estimate.
    #[default]
    P2cEwma,
    RoundRobin,
    /// Power of two choices by requests in flight.
    LeastRequest,
    /// Consistent hashing of a header or the client address.
    RingHash,
}

impl Algorithm {
    /// The name a policy uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::P2cEwma => "p2c-ewma",
            Self::RoundRobin => "round-robin",
            Self::LeastRequest => "least-request",
            Self::RingHash => "ring-hash",
        }
    }

    fn parse(name: &str) -> Self {
        match name {
            "round-robin" => Self::RoundRobin,
            "least-request" => Self::LeastRequest,
            "ring-hash" => Self::RingHash,
            _ => Self::P2cEwma,
        }
    }
}

/// Load balancing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Balancing {
    pub algorithm: Algorithm,
    /// Ring-hash: the header hashed; `None` hashes the client address.
    pub hash_header: Option<http::HeaderName>,
    /// The latency a new endpoint is assumed to have (peak EWMA).
    pub default_rtt: Duration,
    /// How fast the latency estimate forgets (peak EWMA).
    pub decay: Duration,
    /// A new endpoint's share ramps up over this window.
    pub slow_start: Option<Duration>,
    /// Stay in the caller's zone while at least this share of its endpoints passes; `None`
    /// spreads over every zone.
    pub locality_min_passing_percent: Option<u32>,
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::default(),
            hash_header: None,
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            slow_start: None,
            locality_min_passing_percent: Some(70),
        }
    }
}

/// Outlier detection settings; `None` in [`Resilience`] when turned off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ejection {
    pub consecutive_failures: u32,
    pub base: Duration,
    /// The longest an ejection lasts, however many times the endpoint was ejected.
    pub max: Duration,
    pub max_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Self { consecutive_failures: 5, base: Duration::from_secs(30), max: Duration::from_secs(300), max_percent: 50 }
    }
}

/// Circuit breaker limits, per calling sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent: usize,
    pub max_pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_concurrent: 1024, max_pending: 256 }
    }
}

/// Retry budget settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Retries allowed per request, over the window.
    pub ratio: f64,
    /// Retries allowed per second whatever the traffic.
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Self { ratio: 0.2, min_per_second: 10, window: Duration::from_secs(10) }
    }
}

/// Everything resilience-related about one destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Resilience {
    /// The policy version these came from; 0 with no policy.
    pub version: u64,
    pub balancing: Balancing,
    pub ejection: Option<Ejection>,
    pub limits: Limits,
    pub budget: Budget,
    /// Overrides the sidecar's connect timeout.
    pub connect_timeout: Option<Duration>,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            version: 0,
            balancing: Balancing::default(),
            ejection: Some(Ejection::default()),
            limits: Limits::default(),
            budget: Budget::default(),
            connect_timeout: None,
        }
    }
}

fn duration(value: Option<&ferry_proto::types::Duration>) -> Option<Duration> {
    value.and_then(|d| validate::duration("", d).ok()).filter(|d| !d.is_zero())
}

impl Resilience {
    /// The settings a policy asks for, defaults filling the gaps. The policy was validated
    /// before it was accepted; anything out of range still falls back to the default.
    pub fn of(policy: Option<&v1::ServicePolicy>) -> Self {
        let Some(policy) = policy else { return Self::default() };
        let mut balancing = Balancing {
            algorithm: Algorithm::parse(&policy.load_balancer),
            hash_header: http::HeaderName::from_bytes(policy.hash_header.as_bytes()).ok(),
            slow_start: duration(policy.slow_start.as_ref()),
            ..Balancing::default()
        };
        if let Some(locality) = &policy.locality {
            balancing.locality_min_passing_percent =
                (!locality.disabled).then(|| locality.min_passing_percent.unwrap_or(70).clamp(1, 100));
        }
        let ejection = match &policy.outlier_detection {
            Some(outlier) if outlier.disabled => None,
            Some(outlier) => {
                let default = Ejection::default();
                Some(Ejection {
                    consecutive_failures: outlier.consecutive_failures.unwrap_or(default.consecutive_failures).max(1),
                    base: duration(outlier.base_ejection.as_ref()).unwrap_or(default.base),
                    max: default.max,
                    max_percent: outlier.max_ejection_percent.unwrap_or(default.max_percent).min(100),
                })
            }
            None => Some(Ejection::default()),
        };
        let mut limits = Limits::default();
        if let Some(breaker) = &policy.circuit_breaker {
            limits.max_concurrent = breaker.max_concurrent.map_or(limits.max_concurrent, |m| m.max(1) as usize);
            limits.max_pending = breaker.max_pending.map_or(limits.max_pending, |m| m as usize);
        }
        let mut budget = Budget::default();
        if let Some(retry) = &policy.retry_budget {
            budget.ratio = retry.ratio.filter(|r| r.is_finite() && *r >= 0.0).unwrap_or(budget.ratio);
            budget.min_per_second = retry.min_per_second.unwrap_or(budget.min_per_second);
            budget.window = duration(retry.window.as_ref()).unwrap_or(budget.window);
        }
        Self {
            version: policy.version,
            balancing,
            ejection,
            limits,
            budget,
            connect_timeout: duration(policy.connect_timeout.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> v1::ServicePolicy {
        let text = format!("kind: ServicePolicy\nservice: catalog\n{yaml}\n");
        match ferry_proto::json::resources_from_yaml(&text).expect("valid").remove(0).kind {
            Some(v1::resource::Kind::Policy(policy)) => policy,
            other => panic!("not a policy: {other:?}"),
        }
    }

    #[test]
    fn no_policy_means_the_defaults() {
        let resilience = Resilience::of(None);
        assert_eq!(resilience.balancing.algorithm, Algorithm::P2cEwma);
        assert_eq!(resilience.balancing.default_rtt, Duration::from_millis(30));
        assert_eq!(resilience.ejection, Some(Ejection::default()));
        assert_eq!(resilience.limits, Limits { max_concurrent: 1024, max_pending: 256 });
        assert_eq!(resilience.budget, Budget { ratio: 0.2, min_per_second: 10, window: Duration::from_secs(10) });
        assert_eq!(Resilience::of(Some(&policy("subsets: { v1: { version: v1 } }"))).ejection, Some(Ejection::default()));
    }

    #[test]
    fn a_policy_overrides_what_it_sets() {
        let resilience = Resilience::of(Some(&policy(
            "load_balancer: ring-hash\nhash_header: x-user\ncircuit_breaker: { max_pending: 0 }\n\
             outlier_detection: { base_ejection: 5s }\nretry_budget: { ratio: 0.5 }\nslow_start: 20s\n\
             locality: { disabled: true }",
        )));
        assert_eq!(resilience.balancing.algorithm, Algorithm::RingHash);
        assert_eq!(resilience.balancing.hash_header.as_ref().map(|h| h.as_str()), Some("x-user"));
        assert_eq!(resilience.balancing.slow_start, Some(Duration::from_secs(20)));
        assert_eq!(resilience.balancing.locality_min_passing_percent, None);
        assert_eq!(resilience.limits, Limits { max_concurrent: 1024, max_pending: 0 });
        assert_eq!(resilience.ejection.map(|e| (e.base, e.consecutive_failures)), Some((Duration::from_secs(5), 5)));
        assert_eq!(resilience.budget.ratio, 0.5);
        assert_eq!(resilience.budget.min_per_second, 10);
        assert_eq!(Resilience::of(Some(&policy("outlier_detection: { disabled: true }"))).ejection, None);
    }
}
