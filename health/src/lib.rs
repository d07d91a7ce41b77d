//! Health in Ferry: the states an instance can be in, the checks that decide them, and the
//! state machine between the two.
//!
//! - [`Health`]: passing, warning, critical, draining, and what each means for traffic.
//! - [`spec`]: what a check is (HTTP, TCP, gRPC, script or TTL; interval, timeout, thresholds).
//! - [`probe`]: the probes themselves.
//! - [`state`]: hysteresis per check and flap damping per instance.
//! - [`runner`]: runs an instance's checks and publishes its health; the sidecar runs one for its
//!   app, the control plane one per instance registered through the API.

#![forbid(unsafe_code)]

use std::fmt;

use ferry_proto::v1;

pub mod metrics;
pub mod probe;
pub mod runner;
pub mod spec;
pub mod state;

pub use self::{
    metrics::HealthMetrics,
    probe::Target,
    runner::{CheckStatus, Report, Runner, RunnerOptions, TtlError},
    spec::{CheckSpec, Probe},
    state::FlapPolicy,
};

/// The health of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Health {
    /// Serving and receiving traffic.
    #[default]
    Passing,
    /// Degraded but still serving; receives traffic.
    Warning,
    /// Not serving: failed its checks or lost its sidecar. Receives no traffic.
    Critical,
    /// Leaving on purpose: finishes what it has, receives no new traffic.
    Draining,
}

impl Health {
    /// Whether new requests may be sent to an instance in this state.
    pub fn is_routable(self) -> bool {
        matches!(self, Self::Passing | Self::Warning)
    }

    /// The lowercase name used in tables, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
            Self::Draining => "draining",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Health> for v1::Health {
    fn from(health: Health) -> Self {
        match health {
            Health::Passing => Self::Passing,
            Health::Warning => Self::Warning,
            Health::Critical => Self::Critical,
            Health::Draining => Self::Draining,
        }
    }
}

/// A wire value that is not a health state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown health value {0}")]
pub struct UnknownHealth(pub i32);

impl TryFrom<i32> for Health {
    type Error = UnknownHealth;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match v1::Health::try_from(value) {
            Ok(v1::Health::Passing) => Ok(Self::Passing),
            Ok(v1::Health::Warning) => Ok(Self::Warning),
            Ok(v1::Health::Critical) => Ok(Self::Critical),
            Ok(v1::Health::Draining) => Ok(Self::Draining),
            Ok(v1::Health::Unspecified | v1::Health::NotChecked) | Err(_) => Err(UnknownHealth(value)),
        }
    }
}

/// How tables and the dashboard name a check's status before its first result.
pub const NOT_CHECKED: &str = "not checked yet";

/// A check's status from the wire: its health and whether a result set it.
/// `HEALTH_NOT_CHECKED` is a check with no result yet, which its instance counts as critical.
pub fn check_status_from_wire(value: i32) -> Result<(Health, bool), UnknownHealth> {
    if value == v1::Health::NotChecked as i32 {
        return Ok((Health::Critical, false));
    }
    Health::try_from(value).map(|health| (health, true))
}

/// The name of a check's wire status in tables: `passing`, ..., or [`NOT_CHECKED`].
pub fn check_status_label(value: i32) -> &'static str {
    match check_status_from_wire(value) {
        Ok((_, false)) => NOT_CHECKED,
        Ok((health, true)) => health.as_str(),
        Err(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_wire_value() {
        for health in [Health::Passing, Health::Warning, Health::Critical, Health::Draining] {
            let wire = v1::Health::from(health) as i32;
            assert_eq!(Health::try_from(wire), Ok(health));
        }
        assert_eq!(Health::try_from(0), Err(UnknownHealth(0)));
        assert_eq!(Health::try_from(v1::Health::NotChecked as i32), Err(UnknownHealth(5)), "a check's status only");
        assert_eq!(check_status_from_wire(v1::Health::NotChecked as i32), Ok((Health::Critical, false)));
        assert_eq!(check_status_from_wire(v1::Health::Warning as i32), Ok((Health::Warning, true)));
        assert_eq!(check_status_label(v1::Health::NotChecked as i32), "not checked yet");
        assert_eq!(check_status_label(v1::Health::Passing as i32), "passing");
        assert_eq!(check_status_label(0), "unknown");
        assert_eq!(Health::try_from(42), Err(UnknownHealth(42)));
    }

    #[test]
    fn only_passing_and_warning_take_traffic() {
        assert!(Health::Passing.is_routable());
        assert!(Health::Warning.is_routable());
        assert!(!Health::Critical.is_routable());
        assert!(!Health::Draining.is_routable());
    }
}
