//! A Consul service registration (`PUT /v1/agent/service/register`) as a Ferry instance.
//!
//! Consul reads field names without regard to case or underscores (`Name`, `name`,
//! `DeregisterCriticalServiceAfter`, `deregister_critical_service_after` are one field), and
//! ignores fields it does not know; so does this: keys are folded (lowercase, no `_`) before
//! they are read, except inside `Meta`, whose keys are the user's.
//!
//! | Consul                              | Ferry                                                   |
//! |-------------------------------------|---------------------------------------------------------|
//! | `ID` (default: `Name`)              | instance id                                             |
//! | `Name`                              | service                                                 |
//! | `Address`, `Port`                   | address, port (both required)                           |
//! | `Tags`                              | metadata `consul.tags`, a JSON list; `KEY=VALUE` tags also become labels `KEY: VALUE` |
//! | `Meta`                              | metadata, key for key (winning over a tag's label)      |
//! | `Weights.Passing`                   | weight × 100 (Consul's 1 is Ferry's default 100), at most 10 000; `Weights.Warning` is not kept |
//! | `Locality.Region`, `Locality.Zone`  | region, zone                                            |
//! | `Check`, `Checks`                   | checks (see [`check`])                                  |

use std::{collections::HashMap, time::Duration};

use ferry_proto::{
    types, v1,
    validate::{DEFAULT_WEIGHT, FieldError, MAX_WEIGHT},
};
use serde_json::{Map, Value};

use super::tags::{TAGS_KEY, encode_tags, tag_labels};

/// Folds the keys of a Consul request body as Consul reads them: lowercase, without `_`; the
/// keys of `Meta` (anywhere) and of an HTTP check's `Header` are kept as given.
pub fn fold_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut folded = Map::with_capacity(map.len());
            for (key, value) in map {
                let key = fold(&key);
                let value = if key == "meta" || key == "header" || key == "nodemeta" { value } else { fold_keys(value) };
                folded.insert(key, value);
            }
            Value::Object(folded)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(fold_keys).collect()),
        other => other,
    }
}

fn fold(key: &str) -> String {
    key.chars().filter(|c| *c != '_').flat_map(char::to_lowercase).collect()
}

/// A Consul registration, read from a folded body, as the instance Ferry registers.
pub fn instance(body: &Value) -> Result<v1::Instance, FieldError> {
    let body = body.as_object().ok_or_else(|| FieldError::new("body", "must be a JSON object"))?;
    let name = string(body, "name", "Name")?.unwrap_or_default();
    if name.is_empty() {
        return Err(FieldError::new("Name", "is required"));
    }
    let id = string(body, "id", "ID")?.filter(|id| !id.is_empty()).unwrap_or_else(|| name.clone());
    // Checked before the checks are, whose default ids are made of them.
    ferry_proto::validate::service_name("Name", &name)?;
    ferry_proto::validate::instance_id("ID", &id)?;
    let address = string(body, "address", "Address")?.unwrap_or_default();
    if address.is_empty() {
        return Err(FieldError::new("Address", "is required: Ferry has no agent node whose address a service could default to"));
    }
    let port = match body.get("port") {
        None | Some(Value::Null) => return Err(FieldError::new("Port", "is required")),
        Some(port) => port
            .as_u64()
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| FieldError::new("Port", format!("must be a number between 1 and 65535, got {port}")))?,
    };
    for unsupported in ["kind", "proxy", "connect", "socketpath", "taggedaddresses"] {
        if body.get(unsupported).is_some_and(|v| !is_empty(v)) {
            return Err(FieldError::new(
                consul_name(unsupported),
                "is not supported by Ferry (Connect proxies, sockets and tagged addresses have no Ferry meaning)",
            ));
        }
    }

    let tags = string_list(body, "tags", "Tags")?;
    let mut metadata: HashMap<String, String> = tag_labels(&tags).collect();
    if let Some(meta) = body.get("meta").filter(|m| !m.is_null()) {
        let meta = meta.as_object().ok_or_else(|| FieldError::new("Meta", "must be an object of strings"))?;
        for (key, value) in meta {
            let value = value.as_str().ok_or_else(|| FieldError::new(format!("Meta[{key:?}]"), "must be a string"))?;
            metadata.insert(key.clone(), value.to_owned());
        }
    }
    if !tags.is_empty() {
        metadata.insert(TAGS_KEY.to_owned(), encode_tags(&tags)?);
    }

    let weight = match body.get("weights").and_then(|w| w.get("passing")) {
        None | Some(Value::Null) => 0,
        Some(passing) => weight(passing)?,
    };
    let locality = body.get("locality");
    let region = locality.map(|l| string(l.as_object().unwrap_or(&Map::new()), "region", "Locality.Region")).transpose()?;
    let zone = locality.map(|l| string(l.as_object().unwrap_or(&Map::new()), "zone", "Locality.Zone")).transpose()?;

    let definitions = check_definitions(body)?;
    let mut checks = Vec::with_capacity(definitions.len());
    let mut deregister_after: Option<Duration> = None;
    let count = definitions.len();
    for (n, (field, definition)) in definitions.into_iter().enumerate() {
        // Consul's ids for checks that do not name one: `service:ID`, or `service:ID:N` from 1
        // when a service has several.
        let default_id = if count == 1 { format!("service:{id}") } else { format!("service:{id}:{}", n + 1) };
        let (check, after) = check(definition, &default_id).map_err(|e| prefixed(e, &field))?;
        // Validated here, where the definition's own name is known: the registry names a check
        // by its place among all of them, and `Check` comes before `Checks`, so it would call
        // `Check` `Checks[0]` and `Checks[0]` `Checks[1]`.
        ferry_proto::validate::check(&check)
            .map_err(|e| prefixed(FieldError::new(consul_check_name(&e.field), e.reason), &field))?;
        checks.push(check);
        deregister_after = match (deregister_after, after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    Ok(v1::Instance {
        id,
        service: name,
        address,
        port: u32::try_from(port).unwrap_or(0),
        metadata,
        region: region.flatten().unwrap_or_default(),
        zone: zone.flatten().unwrap_or_default(),
        weight,
        checks,
        deregister_critical_after: deregister_after.map(proto_duration),
        ..Default::default()
    })
}

/// The check definitions of a folded registration body, each with the name the client gave
/// it (`Check`, `Checks[0]`, ...), in the order of the instance's checks.
fn check_definitions(body: &Map<String, Value>) -> Result<Vec<(String, &Value)>, FieldError> {
    let mut definitions = Vec::new();
    if let Some(check) = body.get("check").filter(|c| !is_empty(c)) {
        definitions.push(("Check".to_owned(), check));
    }
    if let Some(checks) = body.get("checks").filter(|c| !c.is_null()) {
        let checks = checks.as_array().ok_or_else(|| FieldError::new("Checks", "must be a list"))?;
        definitions.extend(checks.iter().enumerate().map(|(i, c)| (format!("Checks[{i}]"), c)));
    }
    Ok(definitions)
}

/// What the client called each check of the instance [`instance`] reads from `body`: `Check`
/// comes first, so the instance's `checks[0]` is `Check` when there is one.
pub fn check_names(body: &Value) -> Vec<String> {
    let definitions = body.as_object().map(check_definitions);
    definitions.and_then(Result::ok).map(|d| d.into_iter().map(|(name, _)| name).collect()).unwrap_or_default()
}

/// An error of the registry about the instance `names` came from ([`check_names`]), with a
/// check named as the client wrote it: `checks[0].http.url` is `Check.HTTP` beside `Checks`.
pub fn name_checks(error: FieldError, names: &[String]) -> FieldError {
    let named = error.field.strip_prefix("checks[").and_then(|rest| {
        let (index, rest) = rest.split_once(']')?;
        let name = names.get(index.parse::<usize>().ok()?)?;
        Some(match rest.strip_prefix('.') {
            Some(inner) => format!("{name}.{}", consul_check_name(inner)),
            None => name.clone(),
        })
    });
    match named {
        Some(field) => FieldError { field, reason: error.reason },
        None => error,
    }
}

/// Consul's `Weights.Passing` as Ferry's weight. Consul's default is 1 where Ferry's is
/// [`DEFAULT_WEIGHT`], so one Consul unit is `DEFAULT_WEIGHT` of Ferry's, up to [`MAX_WEIGHT`]
/// (Consul's weights are relative, so the cap only flattens weights past 100).
fn weight(passing: &Value) -> Result<u32, FieldError> {
    let passing = passing
        .as_u64()
        .filter(|p| *p > 0)
        .ok_or_else(|| FieldError::new("Weights.Passing", format!("must be a number from 1, got {passing}")))?;
    Ok(u32::try_from(passing.saturating_mul(u64::from(DEFAULT_WEIGHT)).min(u64::from(MAX_WEIGHT))).unwrap_or(MAX_WEIGHT))
}

/// One Consul check definition (`AgentServiceCheck`) as a Ferry check, with its
/// `DeregisterCriticalServiceAfter`.
///
/// | Consul                       | Ferry                                                       |
/// |------------------------------|-------------------------------------------------------------|
/// | `HTTP` (+ `Method` GET)      | http probe of that URL                                      |
/// | `TCP`                        | tcp probe of that `HOST:PORT`                               |
/// | `GRPC` (`HOST:PORT[/SVC]`)   | grpc probe, asking about `SVC`                              |
/// | `Args` / `ScriptArgs`        | script probe (the control plane runs it where allowed)      |
/// | `TTL`                        | ttl probe                                                   |
/// | `Interval`, `Timeout`        | interval, timeout                                           |
/// | `SuccessBeforePassing`       | success threshold (default 1)                               |
/// | `FailuresBeforeCritical`     | failure threshold (default 1: critical at once, as Consul)  |
/// | `CheckID` (or `ID`)          | check id (default `service:ID`, `service:ID:N`)             |
pub fn check(definition: &Value, default_id: &str) -> Result<(v1::Check, Option<Duration>), FieldError> {
    use v1::check::Probe;

    let body = definition.as_object().ok_or_else(|| FieldError::new("", "must be an object"))?;
    for unsupported in
        ["h2ping", "udp", "aliasservice", "aliasnode", "dockercontainerid", "osservice", "body", "grpcusetls", "h2pingusetls"]
    {
        if body.get(unsupported).is_some_and(|v| !is_empty(v)) {
            return Err(FieldError::new(consul_name(unsupported), "is not supported by Ferry's health checks"));
        }
    }
    if body.get("header").is_some_and(|h| !is_empty(h)) {
        return Err(FieldError::new("Header", "is not supported: Ferry's HTTP checks send no extra headers"));
    }
    if let Some(method) = string(body, "method", "Method")?.filter(|m| !m.is_empty() && !m.eq_ignore_ascii_case("GET")) {
        return Err(FieldError::new("Method", format!("{method:?} is not supported: Ferry's HTTP checks send GET")));
    }
    let mut probes = Vec::new();
    if let Some(url) = string(body, "http", "HTTP")?.filter(|s| !s.is_empty()) {
        probes.push(("HTTP", Probe::Http(v1::HttpProbe { url, expected_status: 0 })));
    }
    if let Some(address) = string(body, "tcp", "TCP")?.filter(|s| !s.is_empty()) {
        probes.push(("TCP", Probe::Tcp(v1::TcpProbe { address })));
    }
    if let Some(target) = string(body, "grpc", "GRPC")?.filter(|s| !s.is_empty()) {
        let (address, service) = target.split_once('/').unwrap_or((&target, ""));
        probes.push(("GRPC", Probe::Grpc(v1::GrpcProbe { address: address.to_owned(), service: service.to_owned() })));
    }
    let mut args = string_list(body, "args", "Args")?;
    if args.is_empty() {
        args = string_list(body, "scriptargs", "ScriptArgs")?;
    }
    if !args.is_empty() {
        probes.push(("Args", Probe::Script(v1::ScriptProbe { args })));
    }
    if body.get("script").is_some_and(|v| !is_empty(v)) {
        return Err(FieldError::new("Script", "is not supported (Consul removed it too): use Args"));
    }
    let ttl = duration(body, "ttl", "TTL")?;
    if let Some(ttl) = ttl {
        probes.push(("TTL", Probe::Ttl(v1::TtlProbe { ttl: Some(proto_duration(ttl)) })));
    }
    let probe = match probes.len() {
        0 => return Err(FieldError::new("", "needs one of HTTP, TCP, GRPC, Args or TTL")),
        1 => probes.remove(0),
        _ => {
            let kinds: Vec<&str> = probes.iter().map(|(kind, _)| *kind).collect();
            return Err(FieldError::new(
                kinds[1],
                format!("a check has one of HTTP, TCP, GRPC, Args or TTL, not {}", kinds.join(" and ")),
            ));
        }
    };
    let interval = duration(body, "interval", "Interval")?;
    if interval.is_none() && probe.0 != "TTL" {
        return Err(FieldError::new("Interval", format!("is required with {}", probe.0)));
    }
    let timeout = duration(body, "timeout", "Timeout")?;
    let threshold = |key: &str, name: &str| -> Result<u32, FieldError> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(1),
            Some(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| n.max(1))
                .ok_or_else(|| FieldError::new(name, format!("must be a number, got {n}"))),
        }
    };
    let id = string(body, "checkid", "CheckID")?
        .or(string(body, "id", "ID")?)
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| default_id.to_owned());
    let check = v1::Check {
        id,
        probe: Some(probe.1),
        // A TTL check is passive: its interval means nothing.
        interval: interval.filter(|_| probe.0 != "TTL").map(proto_duration),
        timeout: timeout.filter(|_| probe.0 != "TTL").map(proto_duration),
        success_threshold: threshold("successbeforepassing", "SuccessBeforePassing")?,
        failure_threshold: threshold("failuresbeforecritical", "FailuresBeforeCritical")?,
        ..Default::default()
    };
    let after = duration(body, "deregistercriticalserviceafter", "DeregisterCriticalServiceAfter")?;
    Ok((check, after))
}

/// Consul's name of a field Ferry validation reported, so a 400 names what the client sent.
pub fn consul_field(field: &str) -> String {
    let renames = [
        ("service", "Name"),
        ("id", "ID"),
        ("address", "Address"),
        ("port", "Port"),
        ("metadata", "Meta"),
        ("weight", "Weights.Passing"),
        ("region", "Locality.Region"),
        ("zone", "Locality.Zone"),
        ("deregister_critical_after", "DeregisterCriticalServiceAfter"),
        ("checks", "Checks"),
    ];
    for (ferry, consul) in renames {
        if let Some(rest) = field.strip_prefix(ferry)
            && (rest.is_empty() || rest.starts_with(['[', '.']))
        {
            return format!("{consul}{}", if ferry == "checks" { consul_check_field(rest) } else { rest.to_owned() });
        }
    }
    field.to_owned()
}

/// Consul's name of a field inside a check (`[0].ttl.ttl` is `[0].TTL`), so a duration
/// Ferry's validation refuses is named as the client wrote it.
fn consul_check_field(rest: &str) -> String {
    let Some((index, field)) = rest.split_once("].") else { return rest.to_owned() };
    format!("{index}].{}", consul_check_name(field))
}

/// Consul's name of a field of `ferry.v1.Check`.
fn consul_check_name(field: &str) -> &str {
    match field {
        "http.url" => "HTTP",
        "tcp.address" => "TCP",
        "grpc.address" | "grpc.service" => "GRPC",
        "script.args" => "Args",
        "ttl.ttl" => "TTL",
        "interval" => "Interval",
        "timeout" => "Timeout",
        "success_threshold" => "SuccessBeforePassing",
        "failure_threshold" => "FailuresBeforeCritical",
        "id" => "CheckID",
        other => other,
    }
}

fn prefixed(error: FieldError, parent: &str) -> FieldError {
    let field = if error.field.is_empty() { parent.to_owned() } else { format!("{parent}.{}", error.field) };
    FieldError { field, reason: error.reason }
}

fn consul_name(folded: &str) -> &'static str {
    match folded {
        "kind" => "Kind",
        "proxy" => "Proxy",
        "connect" => "Connect",
        "socketpath" => "SocketPath",
        "taggedaddresses" => "TaggedAddresses",
        "h2ping" => "H2PING",
        "udp" => "UDP",
        "aliasservice" => "AliasService",
        "aliasnode" => "AliasNode",
        "dockercontainerid" => "DockerContainerID",
        "osservice" => "OSService",
        "body" => "Body",
        "grpcusetls" => "GRPCUseTLS",
        "h2pingusetls" => "H2PingUseTLS",
        _ => "body",
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
    }
}

fn string(body: &Map<String, Value>, key: &str, name: &str) -> Result<Option<String>, FieldError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(FieldError::new(name, format!("must be a string, got {other}"))),
    }
}

fn string_list(body: &Map<String, Value>, key: &str, name: &str) -> Result<Vec<String>, FieldError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_str().map(str::to_owned).ok_or_else(|| FieldError::new(format!("{name}[{i}]"), "must be a string"))
            })
            .collect(),
        Some(other) => Err(FieldError::new(name, format!("must be a list of strings, got {other}"))),
    }
}

/// A duration in Consul's JSON: a Go duration string (`"10s"`) or a number of nanoseconds.
fn duration(body: &Map<String, Value>, key: &str, name: &str) -> Result<Option<Duration>, FieldError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => super::blocking::parse_duration(s).map(Some).map_err(|why| FieldError::new(name, why)),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|ns| Some(Duration::from_nanos(ns)))
            .ok_or_else(|| FieldError::new(name, format!("{n} is not a duration"))),
        Some(other) => Err(FieldError::new(name, format!("must be a duration such as \"10s\", got {other}"))),
    }
}

fn proto_duration(duration: Duration) -> types::Duration {
    types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use v1::check::Probe;

    use super::*;

    fn register(body: Value) -> Result<v1::Instance, FieldError> {
        instance(&fold_keys(body))
    }

    #[test]
    fn keys_are_read_as_consul_reads_them_but_meta_keys_are_kept() {
        let folded = fold_keys(json!({"Service_ID": 1, "Meta": {"Build_ID": "x"}, "Check": {"TLS_Skip_Verify": true}}));
        assert_eq!(folded, json!({"serviceid": 1, "meta": {"Build_ID": "x"}, "check": {"tlsskipverify": true}}));
    }

    #[test]
    fn a_registration_maps_onto_an_instance() {
        let instance = register(json!({
            "Name": "web", "ID": "web-1", "Address": "10.0.0.5", "Port": 8080,
            "Tags": ["primary", "version=v2"], "Meta": {"team": "payments"},
            "Weights": {"Passing": 7, "Warning": 1}, "Unknown": "ignored",
            "Check": {"HTTP": "http://10.0.0.5:8080/health", "Interval": "10s", "Timeout": "1s",
                      "DeregisterCriticalServiceAfter": "90m"}
        }))
        .expect("valid in this test");
        assert_eq!((instance.id.as_str(), instance.service.as_str()), ("web-1", "web"));
        assert_eq!((instance.address.as_str(), instance.port, instance.weight), ("10.0.0.5", 8080, 700));
        assert_eq!(instance.metadata["team"], "payments");
        assert_eq!(instance.metadata["version"], "v2", "a KEY=VALUE tag is a label routes can select");
        assert_eq!(instance.metadata[TAGS_KEY], r#"["primary","version=v2"]"#);
        let check = &instance.checks[0];
        assert_eq!(check.id, "service:web-1");
        assert_eq!(
            check.probe,
            Some(Probe::Http(v1::HttpProbe { url: "http://10.0.0.5:8080/health".into(), expected_status: 0 }))
        );
        assert_eq!(check.interval.as_ref().map(|d| d.seconds), Some(10));
        assert_eq!(check.failure_threshold, 1, "critical at its first failure, as in Consul");
        assert_eq!(instance.deregister_critical_after.map(|d| d.seconds), Some(5400));
    }

    #[test]
    fn the_id_defaults_to_the_name_and_several_checks_are_numbered() {
        let instance = register(json!({
            "name": "api", "address": "127.0.0.1", "port": 9000,
            "check": {"ttl": "15s"},
            "checks": [{"tcp": "127.0.0.1:9000", "interval": "5s"}, {"GRPC": "127.0.0.1:9000/api.v1", "Interval": "5s", "CheckID": "grpc"}]
        }))
        .expect("valid in this test");
        assert_eq!(instance.id, "api");
        let ids: Vec<&str> = instance.checks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["service:api:1", "service:api:2", "grpc"]);
        assert!(matches!(&instance.checks[0].probe, Some(Probe::Ttl(t)) if t.ttl.as_ref().map(|d| d.seconds) == Some(15)));
        assert_eq!(
            instance.checks[2].probe,
            Some(Probe::Grpc(v1::GrpcProbe { address: "127.0.0.1:9000".into(), service: "api.v1".into() }))
        );
    }

    #[test]
    fn args_become_a_script_probe_and_durations_may_be_nanoseconds() {
        let instance =
            register(json!({"Name": "db", "Address": "db.local", "Port": 5432, "Check": {"Args": ["/bin/true"], "Interval": 10_000_000_000u64}}))
                .expect("valid in this test");
        assert_eq!(instance.checks[0].probe, Some(Probe::Script(v1::ScriptProbe { args: vec!["/bin/true".into()] })));
        assert_eq!(instance.checks[0].interval.as_ref().map(|d| d.seconds), Some(10));
    }

    #[test]
    fn unsupported_or_incomplete_registrations_name_the_field() {
        let base = || json!({"Name": "web", "Address": "10.0.0.5", "Port": 80});
        let refused = |patch: Value| {
            let mut body = base();
            for (k, v) in patch.as_object().expect("valid in this test") {
                if v.is_null() {
                    body.as_object_mut().expect("valid in this test").remove(k);
                } else {
                    body[k] = v.clone();
                }
            }
            register(body).expect_err("refused").field
        };
        assert_eq!(refused(json!({"Name": null})), "Name");
        assert_eq!(refused(json!({"Address": null})), "Address");
        assert_eq!(refused(json!({"Port": 70000})), "Port");
        assert_eq!(refused(json!({"Tags": "a"})), "Tags");
        assert_eq!(refused(json!({"Meta": {"k": 1}})), "Meta[\"k\"]");
        assert_eq!(refused(json!({"Connect": {"SidecarService": {}}})), "Connect");
        assert_eq!(refused(json!({"Check": {"HTTP": "http://x/", "TTL": "5s"}})), "Check.TTL");
        assert_eq!(refused(json!({"Check": {"HTTP": "http://x/"}})), "Check.Interval");
        assert_eq!(refused(json!({"Check": {"Interval": "5s"}})), "Check");
        assert_eq!(refused(json!({"Checks": [{"TTL": "5s"}, {"UDP": "x:53", "Interval": "5s"}]})), "Checks[1].UDP");
        assert_eq!(refused(json!({"Check": {"HTTP": "http://x/", "Interval": "5s", "Method": "POST"}})), "Check.Method");
        assert_eq!(refused(json!({"Check": {"TTL": "soon"}})), "Check.TTL");
    }

    #[test]
    fn long_check_durations_are_kept_exactly_and_refused_by_field_when_out_of_range() {
        let instance = register(json!({
            "Name": "web", "Address": "10.0.0.5", "Port": 80,
            "Check": {"TTL": "3h", "DeregisterCriticalServiceAfter": "24h"}
        }))
        .expect("valid in this test");
        assert!(matches!(&instance.checks[0].probe, Some(Probe::Ttl(t)) if t.ttl.as_ref().map(|d| d.seconds) == Some(3 * 3600)));
        assert_eq!(instance.deregister_critical_after.map(|d| d.seconds), Some(24 * 3600));
        let refused =
            |instance: v1::Instance| consul_field(&ferry_proto::validate::instance(&instance).expect_err("out of range").field);
        assert_eq!(ferry_proto::validate::instance(&instance), Ok(()), "3h and 24h are in Ferry's range");
        let long_ttl = register(json!({"Name": "web", "Address": "10.0.0.5", "Port": 80, "Check": {"TTL": "25h"}}));
        assert_eq!(long_ttl.expect_err("Ferry's TTLs end at 24h").field, "Check.TTL");
        let long_interval = register(json!({
            "Name": "web", "Address": "10.0.0.5", "Port": 80,
            "Check": {"HTTP": "http://10.0.0.5/", "Interval": "25h"}
        }));
        assert_eq!(long_interval.expect_err("Ferry's intervals end at 24h").field, "Check.Interval");
        let long_after = register(json!({
            "Name": "web", "Address": "10.0.0.5", "Port": 80,
            "Check": {"TTL": "30s", "DeregisterCriticalServiceAfter": "9000h"}
        }))
        .expect("parsed in this test");
        assert_eq!(refused(long_after), "DeregisterCriticalServiceAfter");
        let overflow = register(json!({"Name": "web", "Address": "10.0.0.5", "Port": 80, "Check": {"TTL": "99999999999h"}}))
            .expect_err("past Go's range");
        assert_eq!(overflow.field, "Check.TTL");
    }

    #[test]
    fn a_bad_check_is_named_as_the_client_wrote_it_beside_other_checks() {
        // Found by a property test: validated with the rest of the instance, `Check` was
        // reported as `Checks[0]`, and each of `Checks` one place off.
        let body = |check: Value, checks: Value| json!({"Name": "web", "Address": "10.0.0.5", "Port": 80, "Check": check, "Checks": checks});
        let good = json!({"TTL": "30s"});
        let error = register(body(json!({"HTTP": "A", "Interval": "10s"}), json!([good.clone()]))).expect_err("a bad URL");
        assert_eq!(error.field, "Check.HTTP", "{error}");
        let error =
            register(body(good, json!([{"TCP": "db:5432", "Interval": "10s", "Timeout": "20s"}]))).expect_err("a long timeout");
        assert_eq!(error.field, "Checks[0].Timeout", "{error}");
    }

    #[test]
    fn registry_errors_name_checks_as_the_client_wrote_them() {
        let body = fold_keys(json!({"Check": {"TTL": "5s"}, "Checks": [{"TTL": "5s"}, {"TTL": "5s"}]}));
        let names = check_names(&body);
        assert_eq!(names, ["Check", "Checks[0]", "Checks[1]"]);
        let named = |field: &str| name_checks(FieldError::new(field, "refused"), &names).field;
        assert_eq!(named("checks[0].http.url"), "Check.HTTP");
        assert_eq!(named("checks[2].id"), "Checks[1].CheckID");
        assert_eq!(named("checks[1]"), "Checks[0]");
        assert_eq!(named("checks[3].id"), "checks[3].id", "no such check: left to consul_field");
        assert_eq!(named("port"), "port");
        assert_eq!(check_names(&fold_keys(json!({"Checks": [{"TTL": "5s"}]}))), ["Checks[0]"]);
    }

    #[test]
    fn consul_weights_scale_onto_ferrys_and_zero_is_refused() {
        let weight = |passing: Value| {
            register(json!({"Name": "web", "Address": "10.0.0.5", "Port": 80, "Weights": {"Passing": passing}}))
                .map(|i| i.weight)
                .map_err(|e| e.field)
        };
        assert_eq!(weight(json!(1)), Ok(DEFAULT_WEIGHT), "Consul's default is Ferry's default");
        assert_eq!(weight(json!(3)), Ok(300));
        assert_eq!(weight(json!(100)), Ok(MAX_WEIGHT));
        assert_eq!(weight(json!(1_000_000_000_000u64)), Ok(MAX_WEIGHT), "capped, not refused");
        assert_eq!(weight(json!(0)), Err("Weights.Passing".to_owned()));
        assert_eq!(weight(json!(-1)), Err("Weights.Passing".to_owned()));
        assert_eq!(weight(Value::Null), Ok(0), "absent: Ferry's default");
    }

    #[test]
    fn ferry_field_names_read_back_as_consuls() {
        assert_eq!(consul_field("service"), "Name");
        assert_eq!(consul_field("metadata[\"k\"]"), "Meta[\"k\"]");
        assert_eq!(consul_field("checks[1].http.url"), "Checks[1].HTTP");
        assert_eq!(consul_field("weight"), "Weights.Passing");
        assert_eq!(consul_field("idle"), "idle");
    }
}
