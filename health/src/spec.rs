//! What a check is: its probe, timing and thresholds, from the API (`ferry.v1.Check`) or from
//! the sidecar's command line (`--check http:/healthz`).

use std::time::Duration;

use ferry_proto::{
    types,
    v1::{self, check::Probe as ProtoProbe},
    validate::{self, FieldError},
};

/// Time between probes when none is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a probe may take when no timeout is given (capped at the interval).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive passing results before a failing check passes, by default.
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
/// Consecutive failing results before a passing check fails, by default.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 2;

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET `url` (an absolute `http://` URL, or a path on the target): 2xx passes (or exactly
    /// `expected_status`), 429 warns, anything else is critical.
    Http { url: String, expected_status: Option<u16> },
    /// Connect over TCP to `address`, or the target.
    Tcp { address: Option<String> },
    /// `grpc.health.v1.Health/Check` for `service` at `address`, or the target.
    Grpc { address: Option<String>, service: String },
    /// Run `args[0]` with the rest as arguments: exit 0 passes, 1 warns, anything else is critical.
    Script { args: Vec<String> },
    /// Passive: renewed from outside before `ttl` runs out, or critical.
    Ttl { ttl: Duration },
}

impl Probe {
    /// The kind, as used in ids, tables and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http { .. } => "http",
            Self::Tcp { .. } => "tcp",
            Self::Grpc { .. } => "grpc",
            Self::Script { .. } => "script",
            Self::Ttl { .. } => "ttl",
        }
    }
}

/// One check of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// Unique in the registry; empty until [`assign_ids`] fills it.
    pub id: String,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl CheckSpec {
    /// A check of `probe` with the default timing.
    pub fn new(probe: Probe) -> Self {
        Self {
            id: String::new(),
            probe,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            success_threshold: DEFAULT_SUCCESS_THRESHOLD,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
        }
    }

    /// The check in its API form, without status.
    pub fn to_proto(&self) -> v1::Check {
        let probe = match &self.probe {
            Probe::Http { url, expected_status } => {
                ProtoProbe::Http(v1::HttpProbe { url: url.clone(), expected_status: expected_status.map_or(0, u32::from) })
            }
            Probe::Tcp { address } => ProtoProbe::Tcp(v1::TcpProbe { address: address.clone().unwrap_or_default() }),
            Probe::Grpc { address, service } => {
                ProtoProbe::Grpc(v1::GrpcProbe { address: address.clone().unwrap_or_default(), service: service.clone() })
            }
            Probe::Script { args } => ProtoProbe::Script(v1::ScriptProbe { args: args.clone() }),
            Probe::Ttl { ttl } => ProtoProbe::Ttl(v1::TtlProbe { ttl: Some(proto_duration(*ttl)) }),
        };
        v1::Check {
            id: self.id.clone(),
            probe: Some(probe),
            interval: Some(proto_duration(self.interval)),
            timeout: Some(proto_duration(self.timeout)),
            success_threshold: self.success_threshold,
            failure_threshold: self.failure_threshold,
            ..Default::default()
        }
    }

    /// Parses the sidecar's `--check` syntax: `http:/healthz`, `http:http://host:port/path`,
    /// `tcp`, `tcp:host:port`, `grpc`, `grpc:service`, `script:/path/to/cmd arg...`, `ttl:30s`,
    /// each optionally followed by `,interval=2s`, `,timeout=1s`, `,success=2`, `,failure=3`,
    /// and for HTTP `,expect=204`. A threshold of 0 is the default, as in the API.
    pub fn parse(text: &str, interval: Duration) -> Result<Self, String> {
        let (head, options) = match text.split_once(',') {
            Some((head, options)) => (head, Some(options)),
            None => (text, None),
        };
        let (kind, rest) = head.split_once(':').map_or((head, None), |(k, r)| (k, Some(r)));
        let probe = match (kind, rest) {
            ("http", Some(url)) => Probe::Http { url: url.to_owned(), expected_status: None },
            ("http", None) => return Err("http needs a path or URL, such as http:/healthz".into()),
            ("tcp", address) => Probe::Tcp { address: address.map(str::to_owned) },
            ("grpc", service) => Probe::Grpc { address: None, service: service.unwrap_or_default().to_owned() },
            ("script", Some(command)) => Probe::Script { args: command.split_whitespace().map(str::to_owned).collect() },
            ("script", None) => return Err("script needs a command, such as script:/usr/local/bin/check".into()),
            ("ttl", Some(ttl)) => Probe::Ttl { ttl: humantime::parse_duration(ttl).map_err(|e| format!("ttl {ttl:?}: {e}"))? },
            ("ttl", None) => return Err("ttl needs a duration, such as ttl:30s".into()),
            (other, _) => return Err(format!("unknown check kind {other:?}: expected http, tcp, grpc, script or ttl")),
        };
        let mut spec = Self { interval, ..Self::new(probe) };
        let mut timeout = None;
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            let (key, value) = option.split_once('=').ok_or_else(|| format!("option {option:?} is not KEY=VALUE"))?;
            let duration = || humantime::parse_duration(value).map_err(|e| format!("{key}={value}: {e}"));
            let count = || value.parse::<u32>().map_err(|_| format!("{key}={value}: not a number"));
            // 0 stands for the default, as in the API, which fills it in the same way.
            let threshold = |default| count().map(|n| if n == 0 { default } else { n });
            match key {
                "interval" => spec.interval = duration()?,
                "timeout" => timeout = Some(duration()?),
                "success" => spec.success_threshold = threshold(DEFAULT_SUCCESS_THRESHOLD)?,
                "failure" => spec.failure_threshold = threshold(DEFAULT_FAILURE_THRESHOLD)?,
                "expect" => match &mut spec.probe {
                    Probe::Http { expected_status, .. } => {
                        *expected_status = Some(value.parse().map_err(|_| format!("expect={value}: not a status code"))?)
                    }
                    _ => return Err("expect= applies to http checks only".into()),
                },
                other => return Err(format!("unknown option {other:?}: expected interval, timeout, success, failure or expect")),
            }
        }
        spec.timeout = timeout.unwrap_or(DEFAULT_TIMEOUT.min(spec.interval));
        // The same rules as the API's, with the same messages.
        validate::check(&spec.to_proto()).map_err(|e| e.to_string())?;
        Ok(spec)
    }
}

impl TryFrom<&v1::Check> for CheckSpec {
    type Error = FieldError;

    /// Validates a check from the API and fills in the defaults.
    fn try_from(check: &v1::Check) -> Result<Self, FieldError> {
        validate::check(check)?;
        let probe = match &check.probe {
            Some(ProtoProbe::Http(http)) => Probe::Http {
                url: http.url.clone(),
                expected_status: u16::try_from(http.expected_status).ok().filter(|s| *s != 0),
            },
            Some(ProtoProbe::Tcp(tcp)) => Probe::Tcp { address: Some(tcp.address.clone()).filter(|a| !a.is_empty()) },
            Some(ProtoProbe::Grpc(grpc)) => {
                Probe::Grpc { address: Some(grpc.address.clone()).filter(|a| !a.is_empty()), service: grpc.service.clone() }
            }
            Some(ProtoProbe::Script(script)) => Probe::Script { args: script.args.clone() },
            Some(ProtoProbe::Ttl(ttl)) => {
                let value = ttl.ttl.as_ref().ok_or_else(|| FieldError::new("ttl.ttl", "required"))?;
                Probe::Ttl { ttl: validate::duration("ttl.ttl", value)? }
            }
            None => return Err(FieldError::new("probe", "required")),
        };
        let interval = match &check.interval {
            Some(interval) => validate::duration("interval", interval)?,
            None => DEFAULT_INTERVAL,
        };
        let timeout = match &check.timeout {
            Some(timeout) => validate::duration("timeout", timeout)?,
            None => DEFAULT_TIMEOUT.min(interval),
        };
        if timeout > interval {
            return Err(FieldError::new("timeout", format!("{timeout:?} exceeds the interval {interval:?}")));
        }
        let or = |value: u32, default: u32| if value == 0 { default } else { value };
        Ok(Self {
            id: check.id.clone(),
            probe,
            interval,
            timeout,
            success_threshold: or(check.success_threshold, DEFAULT_SUCCESS_THRESHOLD),
            failure_threshold: or(check.failure_threshold, DEFAULT_FAILURE_THRESHOLD),
        })
    }
}

/// Gives every check without an id the id `INSTANCE:KIND`, then `INSTANCE:KIND-2` and so on.
pub fn assign_ids(instance_id: &str, checks: &mut [CheckSpec]) {
    let mut taken: Vec<String> = checks.iter().filter(|c| !c.id.is_empty()).map(|c| c.id.clone()).collect();
    for check in checks.iter_mut().filter(|c| c.id.is_empty()) {
        let base = format!("{instance_id}:{}", check.probe.kind());
        let mut id = base.clone();
        let mut n = 1;
        while taken.contains(&id) {
            n += 1;
            id = format!("{base}-{n}");
        }
        taken.push(id.clone());
        check.id = id;
    }
}

/// A protobuf duration.
pub fn proto_duration(duration: Duration) -> types::Duration {
    types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line_forms() {
        let interval = Duration::from_secs(5);
        let http = CheckSpec::parse("http:/healthz,expect=204,failure=3", interval).expect("valid");
        assert_eq!(http.probe, Probe::Http { url: "/healthz".into(), expected_status: Some(204) });
        assert_eq!((http.interval, http.failure_threshold), (interval, 3));
        assert_eq!(CheckSpec::parse("tcp", interval).expect("valid").probe, Probe::Tcp { address: None });
        assert_eq!(
            CheckSpec::parse("grpc:inventory.v1.Inventory", interval).expect("valid").probe,
            Probe::Grpc { address: None, service: "inventory.v1.Inventory".into() }
        );
        assert_eq!(
            CheckSpec::parse("script:/bin/check --fast", interval).expect("valid").probe,
            Probe::Script { args: vec!["/bin/check".into(), "--fast".into()] }
        );
        assert_eq!(CheckSpec::parse("ttl:30s", interval).expect("valid").probe, Probe::Ttl { ttl: Duration::from_secs(30) });
    }

    #[test]
    fn bad_command_line_checks_say_why() {
        for (text, words) in [
            ("http", "needs a path"),
            ("ping", "unknown check kind"),
            ("ttl:soon", "ttl \"soon\""),
            ("tcp,expect=200", "http checks only"),
            ("http:/x,interval=10ms", "interval"),
            ("http:/x,timeout=20s", "timeout"),
            ("tcp:nohost", "tcp.address"),
        ] {
            let error = CheckSpec::parse(text, Duration::from_secs(5)).expect_err(text);
            assert!(error.contains(words), "{text}: {error}");
        }
    }

    #[test]
    fn a_zero_threshold_is_the_default_as_in_the_api() {
        let spec = CheckSpec::parse("http:/,success=0,failure=0", DEFAULT_INTERVAL).expect("valid");
        assert_eq!((spec.success_threshold, spec.failure_threshold), (DEFAULT_SUCCESS_THRESHOLD, DEFAULT_FAILURE_THRESHOLD));
        let spec = CheckSpec { id: "web-1:http".into(), ..spec };
        assert_eq!(CheckSpec::try_from(&spec.to_proto()), Ok(spec));
    }

    #[test]
    fn ids_are_assigned_per_kind() {
        let mut checks = vec![
            CheckSpec::new(Probe::Tcp { address: None }),
            CheckSpec::new(Probe::Tcp { address: None }),
            CheckSpec { id: "mine".into(), ..CheckSpec::new(Probe::Ttl { ttl: Duration::from_secs(5) }) },
        ];
        assign_ids("db-1", &mut checks);
        let ids: Vec<_> = checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["db-1:tcp", "db-1:tcp-2", "mine"]);
    }

    #[test]
    fn round_trips_through_the_api_form() {
        let spec = CheckSpec {
            id: "x:http".into(),
            ..CheckSpec::parse("http:/ok,expect=204,interval=3s", DEFAULT_INTERVAL).expect("valid")
        };
        assert_eq!(CheckSpec::try_from(&spec.to_proto()), Ok(spec));
    }
}
