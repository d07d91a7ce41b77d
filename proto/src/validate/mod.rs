//! Validation of the messages that cross a trust boundary.
//!
//! Every check returns a [`FieldError`] naming the field path and the reason, so the API server
//! can answer `InvalidArgument` / HTTP 400 and the sidecar can NACK with the same words.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use crate::v1;

mod resources;

pub use self::resources::*;

/// The longest service name: one DNS label.
pub const MAX_SERVICE_NAME: usize = 63;
/// The longest instance id.
pub const MAX_INSTANCE_ID: usize = 128;
/// The most metadata labels on one instance.
pub const MAX_METADATA: usize = 64;
/// The largest instance weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// The weight of an instance registered without one.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The most checks on one instance.
pub const MAX_CHECKS: usize = 16;
/// The largest success or failure threshold of a check.
pub const MAX_THRESHOLD: u32 = 10;
/// The shortest interval between probes.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest interval between probes.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The longest duration any field takes.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A message field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Path of the field, such as `instance.port` or `resources[2].delta.upserted[0].address`.
    pub field: String,
    /// Why the value was refused.
    pub reason: String,
}

impl FieldError {
    /// A field error at `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// The same error, seen from the message that holds this one in its field `parent`.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() { parent.to_owned() } else { format!("{parent}.{}", self.field) };
        self
    }
}

/// Whether `name` is a DNS name of lowercase labels (letters, digits, inner hyphens; at most
/// 63 bytes each, 253 in all).
pub fn lowercase_dns_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

/// Checks a service name: a DNS label of lowercase letters, digits and '-'.
pub fn service_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(FieldError::new(field, format!("must be at most {MAX_SERVICE_NAME} characters, got {}", name.len())));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(FieldError::new(field, format!("{name:?} must contain only lowercase letters, digits and '-'")));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(FieldError::new(field, format!("{name:?} must not start or end with '-'")));
    }
    Ok(())
}

/// Checks an instance id: 1 to 128 of letters, digits, '.', '_', ':' and '-'.
pub fn instance_id(field: &str, id: &str) -> Result<(), FieldError> {
    if id.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if id.len() > MAX_INSTANCE_ID {
        return Err(FieldError::new(field, format!("must be at most {MAX_INSTANCE_ID} characters, got {}", id.len())));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        return Err(FieldError::new(field, format!("{id:?} must contain only letters, digits, '.', '_', ':' and '-'")));
    }
    Ok(())
}

/// Checks an address: an IPv4 or IPv6 literal, or a DNS host name.
pub fn address(field: &str, address: &str) -> Result<(), FieldError> {
    if address.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let invalid = |why: &str| Err(FieldError::new(field, format!("{address:?} is not an IP address or host name: {why}")));
    if address.contains(':') {
        return invalid("not a valid IPv6 address");
    }
    if address.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return invalid("not a valid IPv4 address");
    }
    if address.len() > 253 {
        return invalid("longer than 253 characters");
    }
    let name = address.strip_suffix('.').unwrap_or(address);
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !valid {
            return invalid("each dot-separated label must be 1 to 63 letters, digits or inner '-'");
        }
    }
    Ok(())
}

/// Checks a TCP port: 1 to 65535.
pub fn port(field: &str, port: u32) -> Result<(), FieldError> {
    if port == 0 || port > u32::from(u16::MAX) {
        return Err(FieldError::new(field, format!("must be between 1 and 65535, got {port}")));
    }
    Ok(())
}

/// Checks metadata labels: at most 64, keys of 1 to 63 letters, digits, '.', '_', '-' or '/',
/// values of at most 256 characters.
pub fn metadata<'a>(field: &str, labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<(), FieldError> {
    let mut count = 0;
    for (key, value) in labels {
        count += 1;
        let valid_key = !key.is_empty()
            && key.len() <= 63
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !valid_key {
            return Err(FieldError::new(
                format!("{field}[{key:?}]"),
                "keys must be 1 to 63 letters, digits, '.', '_', '-' or '/'",
            ));
        }
        if value.len() > 256 {
            return Err(FieldError::new(format!("{field}[{key:?}]"), "values must be at most 256 characters"));
        }
    }
    if count > MAX_METADATA {
        return Err(FieldError::new(field, format!("at most {MAX_METADATA} labels, got {count}")));
    }
    Ok(())
}

/// Checks a locality label (region or zone): empty, or up to 63 letters, digits, '.', '_', '-'.
pub fn locality(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > 63 || !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(FieldError::new(field, format!("{value:?} must be up to 63 letters, digits, '.', '_' or '-'")));
    }
    Ok(())
}

/// Checks a weight: 0 (the default) up to [`MAX_WEIGHT`].
pub fn weight(field: &str, weight: u32) -> Result<(), FieldError> {
    if weight > MAX_WEIGHT {
        return Err(FieldError::new(field, format!("must be between 1 and {MAX_WEIGHT} (0 for the default), got {weight}")));
    }
    Ok(())
}

/// Checks an instance offered for registration. The id may be empty: the registry makes one.
/// Fields the registry sets (health, origin, node id, timestamps, index, check status) are not
/// checked.
pub fn instance(instance: &v1::Instance) -> Result<(), FieldError> {
    service_name("service", &instance.service)?;
    if !instance.id.is_empty() {
        instance_id("id", &instance.id)?;
    }
    address("address", &instance.address)?;
    port("port", instance.port)?;
    metadata("metadata", &instance.metadata)?;
    locality("region", &instance.region)?;
    locality("zone", &instance.zone)?;
    weight("weight", instance.weight)?;
    if instance.checks.len() > MAX_CHECKS {
        return Err(FieldError::new("checks", format!("at most {MAX_CHECKS} checks, got {}", instance.checks.len())));
    }
    let mut ids = HashSet::new();
    for (i, c) in instance.checks.iter().enumerate() {
        let at = format!("checks[{i}]");
        check(c).map_err(|e| e.within(&at))?;
        if !c.id.is_empty() && !ids.insert(c.id.as_str()) {
            return Err(FieldError::new(format!("{at}.id"), format!("{:?} appears twice", c.id)));
        }
    }
    if let Some(after) = &instance.deregister_critical_after {
        let after = duration("deregister_critical_after", after)?;
        if !(Duration::from_secs(1)..=MAX_DURATION).contains(&after) {
            return Err(FieldError::new("deregister_critical_after", format!("must be 1s to 365 days, got {after:?}")));
        }
    }
    Ok(())
}

/// Converts a protobuf duration, refusing negative and malformed ones.
pub fn duration(field: &str, duration: &crate::types::Duration) -> Result<Duration, FieldError> {
    let seconds = u64::try_from(duration.seconds).map_err(|_| FieldError::new(field, "must not be negative"))?;
    let nanos = u32::try_from(duration.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| FieldError::new(field, "nanos must be 0 to 999999999"))?;
    Ok(Duration::new(seconds, nanos))
}

/// Checks a `HOST:PORT` (or `[V6]:PORT`) target.
pub fn host_port(field: &str, value: &str) -> Result<(), FieldError> {
    let Some((host, port_text)) = value.rsplit_once(':') else {
        return Err(FieldError::new(field, format!("{value:?} must be HOST:PORT")));
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    address(field, host)?;
    let port_number: u32 = port_text.parse().map_err(|_| FieldError::new(field, format!("{port_text:?} is not a port")))?;
    port(field, port_number)
}

/// Checks the URL of an HTTP check: `http://HOST[:PORT]/PATH`, or a path starting with `/`.
pub fn http_url(field: &str, url: &str) -> Result<(), FieldError> {
    if url.is_empty() {
        return Err(FieldError::new(field, "must not be empty: give http://HOST:PORT/PATH or a /path"));
    }
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::new(field, "must be at most 2048 characters with no spaces"));
    }
    if url.starts_with('/') {
        return Ok(());
    }
    if url.starts_with("https://") {
        return Err(FieldError::new(field, "https checks are not supported yet; use http://"));
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(FieldError::new(field, format!("{url:?} must start with http:// or /")));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()));
    if has_port { host_port(field, authority) } else { address(field, authority) }
}

/// Checks one health check offered for registration.
pub fn check(check: &v1::Check) -> Result<(), FieldError> {
    use v1::check::Probe;

    if !check.id.is_empty() {
        instance_id("id", &check.id)?;
    }
    match &check.probe {
        None => return Err(FieldError::new("probe", "one of http, tcp, grpc, script or ttl is required")),
        Some(Probe::Http(http)) => {
            http_url("http.url", &http.url)?;
            if http.expected_status != 0 && !(100..=599).contains(&http.expected_status) {
                return Err(FieldError::new("http.expected_status", format!("must be 100 to 599, got {}", http.expected_status)));
            }
        }
        Some(Probe::Tcp(tcp)) if !tcp.address.is_empty() => host_port("tcp.address", &tcp.address)?,
        Some(Probe::Tcp(_)) => {}
        Some(Probe::Grpc(grpc)) => {
            if !grpc.address.is_empty() {
                host_port("grpc.address", &grpc.address)?;
            }
            if grpc.service.len() > 256 {
                return Err(FieldError::new("grpc.service", "must be at most 256 characters"));
            }
        }
        Some(Probe::Script(script)) => {
            if script.args.first().is_none_or(String::is_empty) {
                return Err(FieldError::new("script.args", "the first argument, the command, is required"));
            }
            if script.args.len() > 64 || script.args.iter().any(|a| a.len() > 1024) {
                return Err(FieldError::new("script.args", "at most 64 arguments of at most 1024 characters"));
            }
        }
        Some(Probe::Ttl(ttl)) => {
            let value = ttl.ttl.as_ref().ok_or_else(|| FieldError::new("ttl.ttl", "required, such as \"30s\""))?;
            let value = duration("ttl.ttl", value)?;
            if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&value) {
                return Err(FieldError::new("ttl.ttl", format!("must be 1s to 24h, got {value:?}")));
            }
        }
    }
    let interval = match &check.interval {
        Some(interval) => Some(duration("interval", interval)?),
        None => None,
    };
    if let Some(interval) = interval
        && !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval)
    {
        return Err(FieldError::new("interval", format!("must be {MIN_INTERVAL:?} to 24h, got {interval:?}")));
    }
    if let Some(timeout) = &check.timeout {
        let timeout = duration("timeout", timeout)?;
        if timeout.is_zero() {
            return Err(FieldError::new("timeout", "must be more than 0"));
        }
        if interval.is_some_and(|interval| timeout > interval) {
            return Err(FieldError::new("timeout", "must not exceed the interval"));
        }
    }
    for (field, threshold) in [("success_threshold", check.success_threshold), ("failure_threshold", check.failure_threshold)] {
        if threshold > MAX_THRESHOLD {
            return Err(FieldError::new(field, format!("must be 1 to {MAX_THRESHOLD} (0 for the default), got {threshold}")));
        }
    }
    Ok(())
}

/// Checks an endpoint pushed to a sidecar.
pub fn endpoint(endpoint: &v1::Endpoint) -> Result<(), FieldError> {
    instance_id("id", &endpoint.id)?;
    address("address", &endpoint.address)?;
    port("port", endpoint.port)?;
    if !matches!(v1::Health::try_from(endpoint.health), Ok(h) if h != v1::Health::Unspecified) {
        return Err(FieldError::new("health", format!("unknown health value {}", endpoint.health)));
    }
    metadata("metadata", &endpoint.metadata)?;
    weight("weight", endpoint.weight)?;
    Ok(())
}

/// Checks a push before a sidecar applies it: every resource well formed, no service twice.
pub fn push(push: &v1::Push) -> Result<(), FieldError> {
    if push.nonce.is_empty() {
        return Err(FieldError::new("nonce", "must not be empty"));
    }
    let mut seen = HashSet::with_capacity(push.resources.len());
    for (i, resources) in push.resources.iter().enumerate() {
        let at = format!("resources[{i}]");
        service_resources(resources).map_err(|e| e.within(&at))?;
        if !seen.insert(resources.service.as_str()) {
            return Err(FieldError::new(format!("{at}.service"), format!("{:?} appears twice in one push", resources.service)));
        }
    }
    if let Some(table) = &push.addresses {
        address_table(table).map_err(|e| e.within("addresses"))?;
    }
    Ok(())
}

/// Checks an address table update: services named once, addresses that parse.
pub fn address_table(table: &v1::AddressTable) -> Result<(), FieldError> {
    if !table.full && table.base_version >= table.version {
        return Err(FieldError::new(
            "base_version",
            format!("{} must be below the table's version {}", table.base_version, table.version),
        ));
    }
    let mut seen = HashSet::with_capacity(table.upserted.len() + table.removed.len());
    for (i, entry) in table.upserted.iter().enumerate() {
        let at = format!("upserted[{i}]");
        service_name(&format!("{at}.service"), &entry.service)?;
        if !seen.insert(entry.service.as_str()) {
            return Err(FieldError::new(format!("{at}.service"), format!("{:?} appears twice", entry.service)));
        }
        if !entry.virtual_ip.is_empty() && entry.virtual_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(FieldError::new(format!("{at}.virtual_ip"), format!("{:?} is not an IP address", entry.virtual_ip)));
        }
        for (j, endpoint) in entry.endpoints.iter().enumerate() {
            if endpoint.parse::<std::net::SocketAddr>().is_err() {
                return Err(FieldError::new(format!("{at}.endpoints[{j}]"), format!("{endpoint:?} is not an IP:PORT")));
            }
        }
    }
    for (i, service) in table.removed.iter().enumerate() {
        service_name(&format!("removed[{i}]"), service)?;
        if !seen.insert(service.as_str()) {
            return Err(FieldError::new(format!("removed[{i}]"), format!("{service:?} appears twice")));
        }
    }
    Ok(())
}

/// Checks the resources of one service in a push.
pub fn service_resources(resources: &v1::ServiceResources) -> Result<(), FieldError> {
    use v1::service_resources::Endpoints;

    service_name("service", &resources.service)?;
    if !resources.virtual_ip.is_empty() && resources.virtual_ip.parse::<std::net::IpAddr>().is_err() {
        return Err(FieldError::new("virtual_ip", format!("{:?} is not an IP address", resources.virtual_ip)));
    }
    let check_all = |field: &str, endpoints: &[v1::Endpoint]| {
        let mut ids = HashSet::with_capacity(endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            let at = format!("{field}[{i}]");
            endpoint(e).map_err(|err| err.within(&at))?;
            if !ids.insert(e.id.as_str()) {
                return Err(FieldError::new(format!("{at}.id"), format!("{:?} appears twice", e.id)));
            }
        }
        Ok(())
    };
    match &resources.endpoints {
        Some(Endpoints::Snapshot(set)) => check_all("snapshot.endpoints", &set.endpoints),
        Some(Endpoints::Delta(delta)) => {
            if delta.base_version >= resources.version {
                return Err(FieldError::new(
                    "delta.base_version",
                    format!("{} must be below the resource version {}", delta.base_version, resources.version),
                ));
            }
            check_all("delta.upserted", &delta.upserted)?;
            for (i, id) in delta.removed.iter().enumerate() {
                instance_id(&format!("delta.removed[{i}]"), id)?;
            }
            Ok(())
        }
        None if resources.exists => Err(FieldError::new("endpoints", "an existing service needs a snapshot or a delta")),
        None => Ok(()),
    }
}

/// The longest interval a traffic report may say it covers.
pub const MAX_TRAFFIC_INTERVAL: Duration = Duration::from_secs(600);

/// A sidecar's traffic report: at most [`crate::traffic::MAX_OUTBOUND`] destinations, each named
/// once and validly, with one latency count per bucket and no more failures than requests.
pub fn traffic_report(report: &v1::TrafficReport) -> Result<(), FieldError> {
    if report.interval_ms == 0 || u128::from(report.interval_ms) > MAX_TRAFFIC_INTERVAL.as_millis() {
        return Err(FieldError::new(
            "interval_ms",
            format!("{} is not within 1..={}", report.interval_ms, MAX_TRAFFIC_INTERVAL.as_millis()),
        ));
    }
    if report.outbound.len() > crate::traffic::MAX_OUTBOUND {
        return Err(FieldError::new(
            "outbound",
            format!("{} destinations; at most {}", report.outbound.len(), crate::traffic::MAX_OUTBOUND),
        ));
    }
    let mut seen = HashSet::with_capacity(report.outbound.len());
    for (i, figures) in report.outbound.iter().enumerate() {
        let at = format!("outbound[{i}]");
        traffic_figures(figures).map_err(|e| e.within(&at))?;
        if !seen.insert(figures.service.as_str()) {
            return Err(FieldError::new(format!("{at}.service"), format!("{:?} appears twice", figures.service)));
        }
    }
    if let Some(inbound) = &report.inbound {
        traffic_figures(inbound).map_err(|e| e.within("inbound"))?;
    }
    Ok(())
}

/// The figures of one service in a traffic report.
pub fn traffic_figures(figures: &v1::TrafficFigures) -> Result<(), FieldError> {
    service_name("service", &figures.service)?;
    if figures.failures > figures.requests {
        return Err(FieldError::new("failures", format!("{} is more than the {} requests", figures.failures, figures.requests)));
    }
    if figures.latency_counts.len() != crate::traffic::LATENCY_COUNTS {
        return Err(FieldError::new(
            "latency_counts",
            format!("{} buckets; the protocol has {}", figures.latency_counts.len(), crate::traffic::LATENCY_COUNTS),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> v1::Instance {
        v1::Instance { service: "catalog".into(), address: "127.0.0.1".into(), port: 8080, ..Default::default() }
    }

    #[test]
    fn accepts_a_minimal_instance() {
        assert_eq!(instance(&valid()), Ok(()));
        let named = v1::Instance { address: "db-1.eu.internal".into(), id: "db-1".into(), ..valid() };
        assert_eq!(instance(&named), Ok(()));
        let v6 = v1::Instance { address: "::1".into(), ..valid() };
        assert_eq!(instance(&v6), Ok(()));
    }

    #[test]
    fn names_the_bad_field() {
        let cases = [
            (v1::Instance { service: String::new(), ..valid() }, "service"),
            (v1::Instance { service: "Catalog".into(), ..valid() }, "service"),
            (v1::Instance { port: 0, ..valid() }, "port"),
            (v1::Instance { port: 70_000, ..valid() }, "port"),
            (v1::Instance { address: "not an address".into(), ..valid() }, "address"),
            (v1::Instance { address: "300.1.1.1".into(), ..valid() }, "address"),
            (v1::Instance { address: "fe80::zz".into(), ..valid() }, "address"),
            (v1::Instance { id: "a/b".into(), ..valid() }, "id"),
            (v1::Instance { weight: 10_001, ..valid() }, "weight"),
        ];
        for (bad, field) in cases {
            let err = instance(&bad).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn bad_checks_name_their_field() {
        use v1::check::Probe;
        let with =
            |probe: Probe| v1::Instance { checks: vec![v1::Check { probe: Some(probe), ..Default::default() }], ..valid() };
        let cases = [
            (v1::Instance { checks: vec![v1::Check::default()], ..valid() }, "checks[0].probe"),
            (with(Probe::Http(v1::HttpProbe { url: "ftp://x".into(), ..Default::default() })), "checks[0].http.url"),
            (with(Probe::Http(v1::HttpProbe { url: "https://x/".into(), ..Default::default() })), "checks[0].http.url"),
            (with(Probe::Http(v1::HttpProbe { url: "/ok".into(), expected_status: 42 })), "checks[0].http.expected_status"),
            (with(Probe::Tcp(v1::TcpProbe { address: "nohost".into() })), "checks[0].tcp.address"),
            (with(Probe::Script(v1::ScriptProbe { args: vec![] })), "checks[0].script.args"),
            (with(Probe::Ttl(v1::TtlProbe { ttl: None })), "checks[0].ttl.ttl"),
        ];
        for (bad, field) in cases {
            let err = instance(&bad).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let good = with(Probe::Http(v1::HttpProbe { url: "http://10.0.0.1:8080/healthz".into(), expected_status: 204 }));
        assert_eq!(instance(&good), Ok(()));
    }

    #[test]
    fn push_errors_carry_the_path() {
        let push = v1::Push {
            nonce: "1".into(),
            resources: vec![v1::ServiceResources {
                service: "catalog".into(),
                version: 2,
                exists: true,
                endpoints: Some(v1::service_resources::Endpoints::Snapshot(v1::Endpoints {
                    endpoints: vec![v1::Endpoint { id: "a".into(), address: "10.0.0.1".into(), port: 0, ..Default::default() }],
                })),
                ..Default::default()
            }],
            ..Default::default()
        };
        let err = super::push(&push).expect_err("port 0");
        assert_eq!(err.field, "resources[0].snapshot.endpoints[0].port");
    }

    #[test]
    fn json_uses_proto_field_names() {
        let json = serde_json::to_value(v1::Instance { node_id: "n1".into(), ..valid() }).expect("serialize");
        assert_eq!(json["node_id"], "n1");
        let back: v1::Instance = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back.node_id, "n1");
    }

    fn figures(service: &str, requests: u64) -> v1::TrafficFigures {
        let mut latency_counts = vec![0; crate::traffic::LATENCY_COUNTS];
        latency_counts[0] = requests;
        v1::TrafficFigures { service: service.into(), requests, failures: 0, latency_counts }
    }

    #[test]
    fn a_traffic_report_is_bounded_and_shaped_like_the_buckets() {
        let good =
            v1::TrafficReport { interval_ms: 5000, outbound: vec![figures("catalog", 3)], inbound: Some(figures("frontend", 1)) };
        assert_eq!(traffic_report(&good), Ok(()));

        let mut short = good.clone();
        short.outbound[0].latency_counts.pop();
        assert_eq!(traffic_report(&short).err().map(|e| e.field).as_deref(), Some("outbound[0].latency_counts"));

        let mut twice = good.clone();
        twice.outbound.push(figures("catalog", 1));
        assert_eq!(traffic_report(&twice).err().map(|e| e.field).as_deref(), Some("outbound[1].service"));

        let mut too_many = good.clone();
        too_many.outbound = (0..=crate::traffic::MAX_OUTBOUND).map(|i| figures(&format!("s{i}"), 1)).collect();
        assert_eq!(traffic_report(&too_many).err().map(|e| e.field).as_deref(), Some("outbound"));

        let mut bad_name = good.clone();
        bad_name.inbound = Some(figures("Not A Name", 1));
        assert_eq!(traffic_report(&bad_name).err().map(|e| e.field).as_deref(), Some("inbound.service"));

        let mut failing = good.clone();
        failing.outbound[0].failures = 4;
        assert_eq!(traffic_report(&failing).err().map(|e| e.field).as_deref(), Some("outbound[0].failures"));

        assert_eq!(
            traffic_report(&v1::TrafficReport { interval_ms: 0, ..good }).err().map(|e| e.field).as_deref(),
            Some("interval_ms")
        );
    }

    #[test]
    fn a_latency_falls_in_the_first_bucket_whose_bound_it_does_not_pass() {
        use crate::traffic::{LATENCY_BUCKETS_MS, bucket};
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_millis(1)), 0);
        assert_eq!(bucket(Duration::from_micros(1001)), 1);
        assert_eq!(bucket(Duration::from_millis(12)), 5);
        assert_eq!(bucket(Duration::from_secs(3600)), LATENCY_BUCKETS_MS.len());
    }
}
