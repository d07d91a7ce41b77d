//! The config stream's state as the rest of the sidecar sees it: `/ready`, `/config`, the
//! metrics computed at each scrape, and the state dir's restorer.

use std::time::{Duration, SystemTime};

use ferry_proto::v1;
use ferry_tls::api::Target;
use tokio::sync::watch;

/// The stream's state, for `/ready`, `/config`, metrics and logs.
#[derive(Debug)]
pub struct ControlStatus {
    inner: watch::Sender<ControlState>,
}

/// A copy of the stream's state.
#[derive(Debug, Clone, Default)]
pub struct ControlState {
    pub connected: bool,
    /// The replica the stream is connected to, or was last: the URL of the list and the
    /// address dialled.
    pub replica: Option<Target>,
    /// The instance as the control plane registered it, once it has.
    pub registered: Option<v1::Instance>,
    pub server_id: String,
    /// When the sidecar last heard from the control plane: its last message, or the moment a
    /// stream that was up ended.
    pub last_contact: Option<SystemTime>,
    pub last_error: Option<String>,
    pub pushes_applied: u64,
    pub pushes_rejected: u64,
    pub last_rejection: Option<String>,
    /// Where the config held comes from.
    pub config_source: ConfigSource,
}

/// Where the config a sidecar holds comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConfigSource {
    /// Nothing yet.
    #[default]
    None,
    /// Pushes from the control plane.
    ControlPlane,
    /// The state file of `--state-dir`, written at `saved_at`: the control plane has not
    /// answered since the sidecar started.
    StateDir { saved_at: SystemTime },
}

impl ConfigSource {
    /// Its name in `/config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ControlPlane => "control-plane",
            Self::StateDir { .. } => "state-dir",
        }
    }
}

impl ControlState {
    /// Brings the gauges computed from the control stream's state up to date, before a scrape.
    pub fn export(&self, metrics: &crate::metrics::Metrics) {
        let age = self.config_age(std::time::SystemTime::now()).map_or(f64::INFINITY, |age| age.as_secs_f64());
        metrics.config_age_seconds.set(age);
        metrics.config_from_state_dir.set(i64::from(matches!(self.config_source, ConfigSource::StateDir { .. })));
    }

    /// How old the config may be: zero while the stream is up (the control plane would have
    /// pushed any change), otherwise the time since the last contact, or, for a config from the
    /// state dir, since the file was written. `None` with no config at all.
    pub fn config_age(&self, now: SystemTime) -> Option<Duration> {
        if self.connected {
            return Some(Duration::ZERO);
        }
        let since = match (self.last_contact, self.config_source) {
            (Some(contact), _) => contact,
            (None, ConfigSource::StateDir { saved_at }) => saved_at,
            (None, _) => return None,
        };
        Some(now.duration_since(since).unwrap_or_default())
    }
}

impl Default for ControlStatus {
    fn default() -> Self {
        Self { inner: watch::Sender::new(ControlState::default()) }
    }
}

impl ControlStatus {
    /// A copy of the current state.
    pub fn get(&self) -> ControlState {
        self.inner.borrow().clone()
    }

    /// Sees every change of the state.
    pub fn watch(&self) -> watch::Receiver<ControlState> {
        self.inner.subscribe()
    }

    /// Changes the state.
    pub fn update(&self, f: impl FnOnce(&mut ControlState)) {
        self.inner.send_modify(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_as_old_as_the_last_contact_or_the_state_file() {
        let now = SystemTime::now();
        let mut state = ControlState::default();
        assert_eq!(state.config_age(now), None, "no config at all");
        let saved_at = now - Duration::from_secs(600);
        state.config_source = ConfigSource::StateDir { saved_at };
        assert_eq!(state.config_age(now), Some(Duration::from_secs(600)));
        state.connected = true;
        assert_eq!(state.config_age(now), Some(Duration::ZERO), "a live stream would have brought any change");
        state.connected = false;
        state.last_contact = Some(now - Duration::from_secs(7));
        assert_eq!(state.config_age(now), Some(Duration::from_secs(7)));
        state.last_contact = Some(now + Duration::from_secs(7));
        assert_eq!(state.config_age(now), Some(Duration::ZERO), "a clock step back is no negative age");
    }
}
