//! Validation of Route, ServicePolicy and AuthorizationPolicy resources. Every error names the
//! field path, such as `rules[1].backends[0].weight`.

use std::{collections::HashSet, time::Duration};

use super::{FieldError, duration, metadata, service_name};
use crate::v1;

/// The most rules in one route.
pub const MAX_RULES: usize = 64;
/// The most backends of one rule.
pub const MAX_BACKENDS: usize = 16;
/// The most subsets of one policy.
pub const MAX_SUBSETS: usize = 64;
/// The most attempts a retry policy allows, the first included.
pub const MAX_ATTEMPTS: u32 = 10;
/// The longest timeout, delay or per-try timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The conditions `retries.on` accepts besides status codes.
pub const RETRY_CONDITIONS: [&str; 5] = ["connect-failure", "refused-stream", "reset", "5xx", "gateway-error"];

/// The gRPC status names `retries.on` accepts.
pub const GRPC_CODES: [&str; 16] = [
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// Headers a route may not match or rewrite: they describe a hop, not the request.
const HOP_BY_HOP: [&str; 9] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"];

/// How much matching one resource may ask of the sidecars that compile it: a bound on the
/// memory and time a hostile or careless resource can cost every sidecar of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Header conditions (`headers`, `header_regex`, `header_present`) across its rules.
    pub header_rules: usize,
    /// Regular expressions across its rules.
    pub regexes: usize,
    /// The compiled size of those regular expressions together, in bytes.
    pub regex_bytes: usize,
}

impl Limits {
    /// What the control plane enforces unless told otherwise.
    pub const DEFAULT: Limits = Limits { header_rules: 256, regexes: 64, regex_bytes: 4 << 20 };
    /// The most any control plane may be configured to accept, and what sidecars and clients
    /// accept, so a raised limit never makes sidecars refuse what the control plane took.
    pub const CEILING: Limits = Limits { header_rules: 1024, regexes: 256, regex_bytes: 16 << 20 };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What the rules of one resource have used of its [`Limits`] so far.
struct Budget {
    limits: Limits,
    header_rules: usize,
    regexes: usize,
    regex_bytes: usize,
}

impl Budget {
    fn new(limits: &Limits) -> Self {
        Self { limits: *limits, header_rules: 0, regexes: 0, regex_bytes: 0 }
    }

    fn header_rule(&mut self, field: &str) -> Result<(), FieldError> {
        self.header_rules += 1;
        if self.header_rules > self.limits.header_rules {
            return Err(FieldError::new(
                field,
                format!(
                    "the resource has more than {} header conditions, the limit (the control plane's --max-header-rules)",
                    self.limits.header_rules
                ),
            ));
        }
        Ok(())
    }

    /// Checks a pattern, compiled as sidecars compile it, and counts it.
    fn regex(&mut self, field: &str, pattern: &str) -> Result<(), FieldError> {
        regex(field, pattern)?;
        self.regexes += 1;
        if self.regexes > self.limits.regexes {
            return Err(FieldError::new(
                field,
                format!(
                    "the resource has more than {} regular expressions, the limit (the control plane's --max-regexes)",
                    self.limits.regexes
                ),
            ));
        }
        let left = self.limits.regex_bytes.saturating_sub(self.regex_bytes);
        let compiled = regex_automata::nfa::thompson::Compiler::new()
            .configure(regex_automata::nfa::thompson::Config::new().nfa_size_limit(Some(left)))
            .build(&format!("^(?:{pattern})$"))
            .map(|nfa| nfa.memory_usage());
        match compiled {
            Ok(bytes) if bytes <= left => {
                self.regex_bytes += bytes;
                Ok(())
            }
            _ => Err(FieldError::new(
                field,
                format!(
                    "the resource's regular expressions compile to more than {} KiB together, the limit (the control plane's --max-regex-bytes)",
                    self.limits.regex_bytes >> 10
                ),
            )),
        }
    }
}

/// Checks a Route within the most any control plane accepts ([`Limits::CEILING`]).
pub fn route(route: &v1::Route) -> Result<(), FieldError> {
    route_within(route, &Limits::CEILING)
}

/// Checks a Route within `limits`.
pub fn route_within(route: &v1::Route, limits: &Limits) -> Result<(), FieldError> {
    service_name("service", &route.service)?;
    if route.rules.len() > MAX_RULES {
        return Err(FieldError::new("rules", format!("at most {MAX_RULES} rules, got {}", route.rules.len())));
    }
    let mut budget = Budget::new(limits);
    for (i, rule) in route.rules.iter().enumerate() {
        route_rule(rule, &mut budget).map_err(|e| e.within(&format!("rules[{i}]")))?;
    }
    unique_rule_names(route.rules.iter().map(|rule| rule.name.as_str()))
}

/// Refuses two rules of one resource with the same name, naming both: the name is how
/// `ferryctl explain`, metrics and fault answers tell rules apart.
fn unique_rule_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), FieldError> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, name) in names.enumerate() {
        if name.is_empty() {
            continue;
        }
        if let Some(first) = seen.insert(name, i) {
            return Err(FieldError::new(
                format!("rules[{i}].name"),
                format!("{name:?} is also the name of rules[{first}]; each rule's name must be unique"),
            ));
        }
    }
    Ok(())
}

/// The actions a policy's rule or default may name; empty is the field's default.
pub const AUTHORIZATION_ACTIONS: [&str; 2] = ["allow", "deny"];

/// Checks an AuthorizationPolicy within the most any control plane accepts.
pub fn authorization(policy: &v1::AuthorizationPolicy) -> Result<(), FieldError> {
    authorization_within(policy, &Limits::CEILING)
}

/// Checks an AuthorizationPolicy within `limits`.
pub fn authorization_within(policy: &v1::AuthorizationPolicy, limits: &Limits) -> Result<(), FieldError> {
    service_name("service", &policy.service)?;
    action("default", &policy.default)?;
    if policy.rules.len() > MAX_RULES {
        return Err(FieldError::new("rules", format!("at most {MAX_RULES} rules, got {}", policy.rules.len())));
    }
    let mut budget = Budget::new(limits);
    for (i, rule) in policy.rules.iter().enumerate() {
        let at = format!("rules[{i}]");
        if rule.name.len() > 63 {
            return Err(FieldError::new(format!("{at}.name"), "must be at most 63 characters"));
        }
        if rule.from.is_empty() {
            return Err(FieldError::new(
                format!("{at}.from"),
                "required: the calling services, or \"*\" for any authenticated mesh identity",
            ));
        }
        if rule.from.len() > MAX_CALLERS {
            return Err(FieldError::new(format!("{at}.from"), format!("at most {MAX_CALLERS} callers, got {}", rule.from.len())));
        }
        for (j, caller) in rule.from.iter().enumerate() {
            if caller != crate::authz::ANY_CALLER {
                service_name(&format!("{at}.from[{j}]"), caller).map_err(|e| {
                    FieldError::new(e.field, format!("{} (a service name, or \"*\" for any mesh identity)", e.reason))
                })?;
            }
        }
        if let Some(m) = &rule.r#match {
            route_match(m, &mut budget).map_err(|e| e.within(&format!("{at}.match")))?;
        }
        action(&format!("{at}.action"), &rule.action)?;
    }
    unique_rule_names(policy.rules.iter().map(|rule| rule.name.as_str()))
}

/// The most callers one authorization rule names.
pub const MAX_CALLERS: usize = 256;

fn action(field: &str, value: &str) -> Result<(), FieldError> {
    if !value.is_empty() && !AUTHORIZATION_ACTIONS.contains(&value) {
        return Err(FieldError::new(field, format!("{value:?} must be allow or deny")));
    }
    Ok(())
}

fn route_rule(rule: &v1::RouteRule, budget: &mut Budget) -> Result<(), FieldError> {
    if rule.name.len() > 63 {
        return Err(FieldError::new("name", "must be at most 63 characters"));
    }
    let match_ = rule.r#match.clone().unwrap_or_default();
    route_match(&match_, budget).map_err(|e| e.within("match"))?;
    if rule.backends.len() > MAX_BACKENDS {
        return Err(FieldError::new("backends", format!("at most {MAX_BACKENDS} backends, got {}", rule.backends.len())));
    }
    let mut seen = HashSet::new();
    for (i, b) in rule.backends.iter().enumerate() {
        let at = format!("backends[{i}]");
        backend(b).map_err(|e| e.within(&at))?;
        if !seen.insert((b.service.as_str(), b.subset.as_str())) {
            return Err(FieldError::new(at, "the same backend appears twice"));
        }
    }
    if rule.backends.len() > 1 && rule.backends.iter().all(|b| b.weight == 0) {
        return Err(FieldError::new("backends", "give at least one backend a weight above 0"));
    }
    let timeout = optional_duration("timeout", rule.timeout.as_ref())?;
    if let Some(retries) = &rule.retries {
        retry_policy(retries, timeout).map_err(|e| e.within("retries"))?;
    }
    for (field, rewrite) in [("request_headers", &rule.request_headers), ("response_headers", &rule.response_headers)] {
        if let Some(rewrite) = rewrite {
            header_rewrite(rewrite).map_err(|e| e.within(field))?;
        }
    }
    if !rule.rewrite_path_prefix.is_empty() {
        if match_.path_prefix.is_empty() {
            return Err(FieldError::new("rewrite_path_prefix", "needs match.path_prefix, the prefix it replaces"));
        }
        path("rewrite_path_prefix", &rule.rewrite_path_prefix)?;
    }
    if let Some(fault) = &rule.fault {
        if let Some(delay) = &fault.delay {
            percent("fault.delay.percent", delay.percent)?;
            if optional_duration("fault.delay.duration", delay.duration.as_ref())?.is_none() {
                return Err(FieldError::new("fault.delay.duration", "required, such as \"2s\""));
            }
        }
        if let Some(abort) = &fault.abort {
            percent("fault.abort.percent", abort.percent)?;
            if !(200..=599).contains(&abort.status) {
                return Err(FieldError::new(
                    "fault.abort.status",
                    format!("must be an HTTP status, 200 to 599, got {}", abort.status),
                ));
            }
        }
    }
    if let Some(mirror) = &rule.mirror {
        percent("mirror.percent", mirror.percent)?;
        let backend_ = mirror.backend.as_ref().ok_or_else(|| FieldError::new("mirror.backend", "required"))?;
        backend(backend_).map_err(|e| e.within("mirror.backend"))?;
    }
    Ok(())
}

fn route_match(m: &v1::RouteMatch, budget: &mut Budget) -> Result<(), FieldError> {
    let paths = [&m.path_exact, &m.path_prefix, &m.path_regex].iter().filter(|p| !p.is_empty()).count();
    if paths > 1 {
        return Err(FieldError::new("path_exact", "give at most one of path_exact, path_prefix and path_regex"));
    }
    if !m.path_exact.is_empty() {
        path("path_exact", &m.path_exact)?;
    }
    if !m.path_prefix.is_empty() {
        path("path_prefix", &m.path_prefix)?;
    }
    if !m.path_regex.is_empty() {
        budget.regex("path_regex", &m.path_regex)?;
    }
    if !m.method.is_empty() && (m.method.len() > 16 || !m.method.bytes().all(|b| b.is_ascii_uppercase())) {
        return Err(FieldError::new("method", format!("{:?} must be an uppercase method such as GET", m.method)));
    }
    for (name, value) in &m.headers {
        let field = format!("headers[{name:?}]");
        header_name(&field, name)?;
        if value.len() > 1024 {
            return Err(FieldError::new(field, "values must be at most 1024 characters"));
        }
        budget.header_rule(&field)?;
    }
    for (name, pattern) in &m.header_regex {
        let field = format!("header_regex[{name:?}]");
        header_name(&field, name)?;
        budget.header_rule(&field)?;
        budget.regex(&field, pattern)?;
    }
    for (i, name) in m.header_present.iter().enumerate() {
        let field = format!("header_present[{i}]");
        header_name(&field, name)?;
        budget.header_rule(&field)?;
    }
    for name in m.query.keys() {
        query_name(&format!("query[{name:?}]"), name)?;
    }
    for (name, pattern) in &m.query_regex {
        query_name(&format!("query_regex[{name:?}]"), name)?;
        budget.regex(&format!("query_regex[{name:?}]"), pattern)?;
    }
    for (i, host) in m.hosts.iter().enumerate() {
        host_pattern(&format!("hosts[{i}]"), host)?;
    }
    Ok(())
}

/// A host name to match, optionally `*.` and a domain: lowercase DNS labels, no port.
fn host_pattern(field: &str, host: &str) -> Result<(), FieldError> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host.len() > 253 || !super::lowercase_dns_name(name) {
        return Err(FieldError::new(
            field,
            format!("{host:?} must be a lowercase host name such as shop.example.com or *.example.com, without a port"),
        ));
    }
    Ok(())
}

/// Checks a backend: a subset, another service, or both, and a weight.
pub fn backend(b: &v1::Backend) -> Result<(), FieldError> {
    if !b.service.is_empty() {
        service_name("service", &b.service)?;
    }
    if !b.subset.is_empty() {
        subset_name("subset", &b.subset)?;
    }
    if b.weight > 10_000 {
        return Err(FieldError::new("weight", format!("must be 0..=10000, got {}", b.weight)));
    }
    Ok(())
}

fn retry_policy(retries: &v1::RetryPolicy, timeout: Option<Duration>) -> Result<(), FieldError> {
    if !(1..=MAX_ATTEMPTS).contains(&retries.attempts) {
        return Err(FieldError::new("attempts", format!("must be 1 to {MAX_ATTEMPTS}, got {}", retries.attempts)));
    }
    if let Some(per_try) = optional_duration("per_try_timeout", retries.per_try_timeout.as_ref())?
        && timeout.is_some_and(|timeout| per_try > timeout)
    {
        return Err(FieldError::new("per_try_timeout", "must not exceed the rule's timeout"));
    }
    for (i, condition) in retries.on.iter().enumerate() {
        let known = RETRY_CONDITIONS.contains(&condition.as_str())
            || GRPC_CODES.contains(&condition.as_str())
            || condition.parse::<u16>().is_ok_and(|code| (100..=599).contains(&code));
        if !known {
            return Err(FieldError::new(
                format!("on[{i}]"),
                format!("{condition:?} is not one of {}, a status code or a gRPC status name", RETRY_CONDITIONS.join(", ")),
            ));
        }
    }
    Ok(())
}

fn header_rewrite(rewrite: &v1::HeaderRewrite) -> Result<(), FieldError> {
    for (field, names) in [("set", rewrite.set.keys().collect::<Vec<_>>()), ("add", rewrite.add.keys().collect::<Vec<_>>())] {
        for name in names {
            header_name(&format!("{field}[{name:?}]"), name)?;
        }
    }
    for (field, map) in [("set", &rewrite.set), ("add", &rewrite.add)] {
        for (name, value) in map {
            if value.len() > 1024 || value.bytes().any(|b| b == b'\r' || b == b'\n') {
                return Err(FieldError::new(format!("{field}[{name:?}]"), "values must be one line of at most 1024 characters"));
            }
        }
    }
    for (i, name) in rewrite.remove.iter().enumerate() {
        header_name(&format!("remove[{i}]"), name)?;
    }
    Ok(())
}

/// Checks a ServicePolicy.
pub fn policy(policy: &v1::ServicePolicy) -> Result<(), FieldError> {
    service_name("service", &policy.service)?;
    if policy.subsets.len() > MAX_SUBSETS {
        return Err(FieldError::new("subsets", format!("at most {MAX_SUBSETS} subsets, got {}", policy.subsets.len())));
    }
    for (name, subset) in &policy.subsets {
        let at = format!("subsets[{name:?}]");
        subset_name(&at, name)?;
        if subset.labels.is_empty() {
            return Err(FieldError::new(format!("{at}.labels"), "a subset needs at least one label, such as version: v2"));
        }
        metadata(&format!("{at}.labels"), &subset.labels)?;
    }
    if !LOAD_BALANCERS.contains(&policy.load_balancer.as_str()) {
        return Err(FieldError::new(
            "load_balancer",
            format!("{:?} is not a load balancer: expected one of {}", policy.load_balancer, LOAD_BALANCERS[1..].join(", ")),
        ));
    }
    if !policy.hash_header.is_empty() {
        header_name("hash_header", &policy.hash_header)?;
        if policy.load_balancer != "ring-hash" {
            return Err(FieldError::new("hash_header", "only used with load_balancer: ring-hash"));
        }
    }
    if let Some(breaker) = &policy.circuit_breaker {
        if let Some(max) = breaker.max_concurrent {
            count("circuit_breaker.max_concurrent", max, 1, MAX_LIMIT)?;
        }
        if let Some(max) = breaker.max_pending {
            count("circuit_breaker.max_pending", max, 0, MAX_LIMIT)?;
        }
    }
    if let Some(outlier) = &policy.outlier_detection {
        if let Some(failures) = outlier.consecutive_failures {
            count("outlier_detection.consecutive_failures", failures, 1, 1000)?;
        }
        optional_duration("outlier_detection.base_ejection", outlier.base_ejection.as_ref())?;
        if let Some(percent) = outlier.max_ejection_percent {
            count("outlier_detection.max_ejection_percent", percent, 0, 100)?;
        }
    }
    if let Some(budget) = &policy.retry_budget {
        if let Some(ratio) = budget.ratio
            && !(0.0..=10.0).contains(&ratio)
        {
            return Err(FieldError::new("retry_budget.ratio", format!("must be 0 to 10, got {ratio}")));
        }
        if let Some(min) = budget.min_per_second {
            count("retry_budget.min_per_second", min, 0, MAX_LIMIT)?;
        }
        if let Some(window) = optional_duration("retry_budget.window", budget.window.as_ref())?
            && !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&window)
        {
            return Err(FieldError::new("retry_budget.window", format!("must be 1s to 60s, got {window:?}")));
        }
    }
    optional_duration("slow_start", policy.slow_start.as_ref())?;
    if let Some(percent) = policy.locality.as_ref().and_then(|l| l.min_passing_percent) {
        count("locality.min_passing_percent", percent, 1, 100)?;
    }
    if let Some(timeout) = optional_duration("connect_timeout", policy.connect_timeout.as_ref())?
        && timeout > Duration::from_secs(60)
    {
        return Err(FieldError::new("connect_timeout", format!("must be at most 60s, got {timeout:?}")));
    }
    if policy.opaque_ports.len() > MAX_OPAQUE_PORTS {
        return Err(FieldError::new(
            "opaque_ports",
            format!("at most {MAX_OPAQUE_PORTS} ports, got {}", policy.opaque_ports.len()),
        ));
    }
    for (i, &port) in policy.opaque_ports.iter().enumerate() {
        count(&format!("opaque_ports[{i}]"), port, 1, 65_535)?;
    }
    Ok(())
}

/// The most ports a policy may declare opaque.
pub const MAX_OPAQUE_PORTS: usize = 64;

/// The load balancers a policy may name; empty is the default, p2c-ewma.
pub const LOAD_BALANCERS: &[&str] = &["", "p2c-ewma", "round-robin", "least-request", "ring-hash"];
/// The highest request limit a circuit breaker takes.
const MAX_LIMIT: u32 = 1_000_000;

fn count(field: &str, value: u32, min: u32, max: u32) -> Result<(), FieldError> {
    if !(min..=max).contains(&value) {
        return Err(FieldError::new(field, format!("must be {min}..={max}, got {value}")));
    }
    Ok(())
}

/// Checks a resource of any kind within the most any control plane accepts.
pub fn resource(resource: &v1::Resource) -> Result<(), FieldError> {
    resource_within(resource, &Limits::CEILING)
}

/// Checks a resource of any kind within `limits`.
pub fn resource_within(resource: &v1::Resource, limits: &Limits) -> Result<(), FieldError> {
    match &resource.kind {
        Some(v1::resource::Kind::Route(r)) => route_within(r, limits),
        Some(v1::resource::Kind::Policy(p)) => policy(p),
        Some(v1::resource::Kind::Authorization(a)) => authorization_within(a, limits),
        None => Err(FieldError::new("kind", "a resource is a route, a service policy or an authorization policy")),
    }
}

fn subset_name(field: &str, name: &str) -> Result<(), FieldError> {
    service_name(field, name).map_err(|e| FieldError::new(field, e.reason.replace("service", "subset")))
}

fn path(field: &str, value: &str) -> Result<(), FieldError> {
    if !value.starts_with('/') || value.len() > 1024 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(FieldError::new(field, format!("{value:?} must start with / and have no spaces (at most 1024 characters)")));
    }
    Ok(())
}

fn regex(field: &str, pattern: &str) -> Result<(), FieldError> {
    if pattern.len() > 1024 {
        return Err(FieldError::new(field, "must be at most 1024 characters"));
    }
    regex::RegexBuilder::new(pattern).size_limit(1 << 20).build().map(|_| ()).map_err(|e| {
        let text = e.to_string();
        let reason = text.lines().last().unwrap_or_default().trim_start_matches("error: ");
        FieldError::new(field, format!("{pattern:?} is not a valid regular expression: {reason}"))
    })
}

fn header_name(field: &str, name: &str) -> Result<(), FieldError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        return Err(FieldError::new(field, format!("{name:?} is not a header name")));
    }
    if name.eq_ignore_ascii_case("host") {
        return Err(FieldError::new(field, "the host is matched with match.hosts, and cannot be rewritten"));
    }
    if HOP_BY_HOP.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(FieldError::new(field, format!("{name:?} describes a connection, not a request; it cannot be used here")));
    }
    Ok(())
}

fn query_name(field: &str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > 128 {
        return Err(FieldError::new(field, "query parameter names are 1 to 128 characters"));
    }
    Ok(())
}

fn percent(field: &str, value: f64) -> Result<(), FieldError> {
    if !(0.0..=100.0).contains(&value) {
        return Err(FieldError::new(field, format!("must be 0 to 100, got {value}")));
    }
    Ok(())
}

fn optional_duration(field: &str, value: Option<&crate::types::Duration>) -> Result<Option<Duration>, FieldError> {
    let Some(value) = value else { return Ok(None) };
    let value = duration(field, value)?;
    if value.is_zero() || value > MAX_TIMEOUT {
        return Err(FieldError::new(field, format!("must be more than 0 and at most 1h, got {value:?}")));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json;

    /// A route from YAML, decoded but not validated.
    fn parse_route(yaml: &str) -> v1::Route {
        let value: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("YAML");
        match json::resource_from_value(value).expect("decodes").kind {
            Some(v1::resource::Kind::Route(route)) => route,
            other => panic!("not a route: {other:?}"),
        }
    }

    #[test]
    fn accepts_the_documented_example() {
        let route = parse_route(
            r#"
kind: Route
service: catalog
rules:
  - match: { path_prefix: /api, headers: { x-canary: "true" } }
    backends: [ { subset: v2 } ]
    timeout: 2s
    retries: { attempts: 3, per_try_timeout: 500ms, on: [connect-failure, 503] }
  - backends: [ { subset: v1, weight: 90 }, { subset: v2, weight: 10 } ]
"#,
        );
        assert_eq!(super::route(&route), Ok(()));
        assert_eq!(route.rules[0].retries.as_ref().map(|r| r.on.clone()), Some(vec!["connect-failure".into(), "503".into()]));
    }

    #[test]
    fn two_rules_of_one_name_are_refused_naming_both() {
        let route = parse_route(
            "kind: Route\nservice: catalog\nrules:\n  - name: canary\n  - name: rest\n  - name: canary\n  - {}\n  - {}\n",
        );
        let error = super::route(&route).expect_err("refused");
        assert_eq!(error.field, "rules[2].name");
        assert!(error.reason.contains("rules[0]") && error.reason.contains("\"canary\""), "{error}");
        // Rules without a name may be many.
        let unnamed = parse_route("kind: Route\nservice: catalog\nrules:\n  - {}\n  - {}\n");
        assert_eq!(super::route(&unnamed), Ok(()));
    }

    #[test]
    fn names_the_bad_field() {
        let cases = [
            ("rules: [ { backends: [ { subset: v1, weight: 20000 } ] } ]", "rules[0].backends[0].weight"),
            (
                "rules: [ {}, { backends: [ { subset: v1, weight: 90 }, { subset: v2, weight: 10001 } ] } ]",
                "rules[1].backends[1].weight",
            ),
            ("rules: [ { match: { path_regex: '(' } } ]", "rules[0].match.path_regex"),
            ("rules: [ { match: { path_prefix: api } } ]", "rules[0].match.path_prefix"),
            ("rules: [ { match: { path_prefix: /a, path_exact: /b } } ]", "rules[0].match.path_exact"),
            ("rules: [ { retries: { attempts: 0 } } ]", "rules[0].retries.attempts"),
            ("rules: [ { retries: { attempts: 2, on: [sometimes] } } ]", "rules[0].retries.on[0]"),
            ("rules: [ { timeout: 2s, retries: { attempts: 2, per_try_timeout: 3s } } ]", "rules[0].retries.per_try_timeout"),
            ("rules: [ { fault: { abort: { percent: 150, status: 503 } } } ]", "rules[0].fault.abort.percent"),
            ("rules: [ { fault: { abort: { percent: 10, status: 42 } } } ]", "rules[0].fault.abort.status"),
            ("rules: [ { rewrite_path_prefix: /v2 } ]", "rules[0].rewrite_path_prefix"),
            ("rules: [ { request_headers: { set: { connection: close } } } ]", "rules[0].request_headers.set[\"connection\"]"),
            ("rules: [ { mirror: { percent: 5 } } ]", "rules[0].mirror.backend"),
            ("rules: [ { backends: [ { subset: v1 }, { subset: v2 } ] } ]", "rules[0].backends"),
        ];
        for (rules, field) in cases {
            let route = parse_route(&format!("kind: Route\nservice: catalog\n{rules}\n"));
            let error = super::route(&route).expect_err(field);
            assert_eq!(error.field, field, "{rules}: {error}");
        }
    }

    #[test]
    fn header_and_regex_conditions_are_bounded() {
        let limits = Limits { header_rules: 2, regexes: 2, regex_bytes: 4 << 20 };
        let headers = |n: usize| {
            let pairs: Vec<String> = (0..n).map(|i| format!("x-h{i}: v")).collect();
            format!("kind: Route\nservice: catalog\nrules: [ {{ match: {{ headers: {{ {} }} }} }} ]\n", pairs.join(", "))
        };
        assert_eq!(route_within(&parse_route(&headers(2)), &limits), Ok(()));
        let error = route_within(&parse_route(&headers(3)), &limits).expect_err("3 header conditions");
        assert!(error.field.starts_with("rules[0].match.headers"), "{error}");
        assert!(error.reason.contains("more than 2 header conditions"), "{error}");
        let regexes = "kind: Route\nservice: catalog\nrules: [ { match: { path_regex: /a.* } }, { match: { path_regex: /b.* } }, { match: { path_regex: /c.* } } ]\n";
        let error = route_within(&parse_route(regexes), &limits).expect_err("3 regexes");
        assert_eq!(error.field, "rules[2].match.path_regex");
        // A pattern that compiles big: a counted repetition.
        let big = "kind: Route\nservice: catalog\nrules: [ { match: { path_regex: \"/[a-z]{100}\" } } ]\n";
        let tight = Limits { regex_bytes: 1 << 10, ..Limits::DEFAULT };
        let error = route_within(&parse_route(big), &tight).expect_err("too big compiled");
        assert!(error.reason.contains("compile to more than 1 KiB"), "{error}");
        assert_eq!(route_within(&parse_route(big), &Limits::DEFAULT), Ok(()));
    }

    #[test]
    fn authorization_policies_name_the_bad_field() {
        let cases = [
            ("default: maybe", "default"),
            ("rules: [ { action: allow } ]", "rules[0].from"),
            ("rules: [ { from: [Front_End] } ]", "rules[0].from[0]"),
            ("rules: [ { from: [frontend], action: permit } ]", "rules[0].action"),
            ("rules: [ { from: [frontend], match: { path_prefix: items } } ]", "rules[0].match.path_prefix"),
        ];
        for (body, field) in cases {
            let yaml = format!("kind: AuthorizationPolicy\nservice: catalog\n{body}\n");
            let error = json::resources_from_yaml(&yaml).expect_err(field);
            assert_eq!(error.field, format!("documents[0].{field}"), "{body}: {error}");
        }
        let good = "kind: AuthorizationPolicy\nservice: catalog\ndefault: deny\nrules:\n  - from: [frontend]\n    match: { method: GET, path_prefix: /items }\n    action: allow\n";
        assert!(json::resources_from_yaml(good).is_ok());
    }

    #[test]
    fn policies_need_labelled_subsets() {
        let yaml = "kind: ServicePolicy\nservice: catalog\nsubsets: { v1: { labels: { version: v1 } }, v2: { labels: {} } }\n";
        let error = json::resources_from_yaml(yaml).expect_err("an empty subset");
        assert_eq!(error.field, "documents[0].subsets[\"v2\"].labels");
    }

    #[test]
    fn accepts_the_documented_resilience_knobs() {
        let yaml = r#"
kind: ServicePolicy
service: catalog
subsets: { v1: { version: v1 } }
load_balancer: ring-hash
hash_header: x-user
circuit_breaker: { max_concurrent: 1024, max_pending: 0 }
outlier_detection: { consecutive_failures: 5, base_ejection: 30s, max_ejection_percent: 50 }
retry_budget: { ratio: 0.2, min_per_second: 10, window: 10s }
slow_start: 30s
locality: { min_passing_percent: 70 }
connect_timeout: 250ms
opaque_ports: [3306, 25]
"#;
        let resources = json::resources_from_yaml(yaml).expect("valid");
        let Some(v1::resource::Kind::Policy(policy)) = &resources[0].kind else { panic!("a policy") };
        assert_eq!(policy.circuit_breaker.as_ref().and_then(|c| c.max_pending), Some(0));
        assert_eq!(policy.retry_budget.as_ref().and_then(|b| b.ratio), Some(0.2));
        assert_eq!(policy.opaque_ports, [3306, 25]);
    }

    #[test]
    fn names_the_bad_resilience_field() {
        let cases = [
            ("load_balancer: random", "load_balancer"),
            ("hash_header: x-user", "hash_header"),
            ("circuit_breaker: { max_concurrent: 0 }", "circuit_breaker.max_concurrent"),
            ("outlier_detection: { max_ejection_percent: 120 }", "outlier_detection.max_ejection_percent"),
            ("outlier_detection: { consecutive_failures: 0 }", "outlier_detection.consecutive_failures"),
            ("retry_budget: { ratio: -1 }", "retry_budget.ratio"),
            ("retry_budget: { window: 2m }", "retry_budget.window"),
            ("locality: { min_passing_percent: 0 }", "locality.min_passing_percent"),
            ("slow_start: 0s", "slow_start"),
            ("opaque_ports: [3306, 0]", "opaque_ports[1]"),
            ("opaque_ports: [70000]", "opaque_ports[0]"),
        ];
        for (knob, field) in cases {
            let yaml = format!("kind: ServicePolicy\nservice: catalog\n{knob}\n");
            let error = json::resources_from_yaml(&yaml).expect_err(field);
            assert_eq!(error.field, format!("documents[0].{field}"), "{knob}: {error}");
        }
    }
}
