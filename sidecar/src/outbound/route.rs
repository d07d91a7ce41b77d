//! Route tables compiled for the request path: regular expressions built and durations
//! converted once per route version, so matching a request allocates nothing.

use std::{sync::Arc, time::Duration};

use ferry_proto::matching::Matcher;
pub use ferry_proto::matching::RequestInfo;
use ferry_proto::{v1, validate};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Where traffic goes: a service and, optionally, a subset of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendRef {
    pub service: Arc<str>,
    pub subset: Option<Arc<str>>,
}

impl std::fmt::Display for BackendRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.subset {
            Some(subset) => write!(f, "{}/{subset}", self.service),
            None => f.write_str(&self.service),
        }
    }
}

/// A backend and its share.
#[derive(Debug, Clone)]
pub struct WeightedBackend {
    pub backend: BackendRef,
    pub weight: u32,
}

/// A compiled route.
#[derive(Debug)]
pub struct RouteTable {
    pub version: u64,
    pub rules: Vec<Rule>,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Its position in the route, from 0.
    pub index: usize,
    pub name: String,
    /// How it reads in metrics, logs and `ferryctl explain`: see [`Rule::label`].
    label: Arc<str>,
    matcher: Matcher,
    /// Never empty: a rule without backends sends to the whole service.
    pub backends: Vec<WeightedBackend>,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub request_headers: Rewrite,
    pub response_headers: Rewrite,
    /// (matched prefix, replacement)
    pub rewrite_prefix: Option<(String, String)>,
    pub delay: Option<(f64, Duration)>,
    pub abort: Option<(f64, u16)>,
    pub mirror: Option<(BackendRef, f64)>,
}

impl Rule {
    /// How the rule reads in `ferryctl explain`, metrics and logs: its position, and its name
    /// when it has one.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }
}

/// When to retry.
#[derive(Debug, Clone, Default)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub reset: bool,
    pub any_5xx: bool,
    pub gateway_error: bool,
    pub statuses: Vec<u16>,
    /// gRPC status codes, as numbers.
    pub grpc: Vec<u32>,
}

impl Retries {
    /// Whether a response with this HTTP status and gRPC status (from trailers-only responses)
    /// should be retried.
    pub fn retry_response(&self, status: u16, grpc_status: Option<u32>) -> bool {
        (self.any_5xx && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || self.statuses.contains(&status)
            || grpc_status.is_some_and(|code| self.grpc.contains(&code))
    }

    /// The conditions, as configured.
    pub fn describe(&self) -> Vec<String> {
        let mut on = Vec::new();
        for (set, name) in [
            (self.connect_failure, "connect-failure"),
            (self.refused_stream, "refused-stream"),
            (self.reset, "reset"),
            (self.any_5xx, "5xx"),
            (self.gateway_error, "gateway-error"),
        ] {
            if set {
                on.push(name.to_owned());
            }
        }
        on.extend(self.statuses.iter().map(u16::to_string));
        on.extend(self.grpc.iter().map(|code| validate::GRPC_CODES.get(*code as usize - 1).copied().unwrap_or("?").to_owned()));
        on
    }
}

/// Header changes.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Rewrite {
    fn compile(rewrite: Option<&v1::HeaderRewrite>) -> Result<Self, String> {
        let Some(rewrite) = rewrite else { return Ok(Self::default()) };
        let pairs = |map: &std::collections::BTreeMap<String, String>| -> Result<Vec<(HeaderName, HeaderValue)>, String> {
            map.iter()
                .map(|(k, v)| {
                    Ok((
                        HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?,
                        HeaderValue::from_str(v).map_err(|e| e.to_string())?,
                    ))
                })
                .collect()
        };
        Ok(Self {
            set: pairs(&rewrite.set)?,
            add: pairs(&rewrite.add)?,
            remove: rewrite
                .remove
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Applies the changes to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

fn duration(value: Option<&ferry_proto::types::Duration>) -> Option<Duration> {
    value.and_then(|d| validate::duration("", d).ok())
}

impl RouteTable {
    /// Compiles `route` (already validated) for the service `service`.
    pub fn compile(service: &Arc<str>, route: &v1::Route, version: u64) -> Result<Self, String> {
        let backend_ref = |b: &v1::Backend| BackendRef {
            service: if b.service.is_empty() { service.clone() } else { Arc::from(b.service.as_str()) },
            subset: (!b.subset.is_empty()).then(|| Arc::from(b.subset.as_str())),
        };
        let mut rules = Vec::with_capacity(route.rules.len());
        for (index, rule) in route.rules.iter().enumerate() {
            let mut backends: Vec<WeightedBackend> =
                rule.backends.iter().map(|b| WeightedBackend { backend: backend_ref(b), weight: b.weight }).collect();
            if backends.is_empty() {
                backends.push(WeightedBackend { backend: BackendRef { service: service.clone(), subset: None }, weight: 1 });
            }
            if backends.len() == 1 {
                backends[0].weight = backends[0].weight.max(1);
            }
            let retries = rule.retries.as_ref().map(|r| {
                let mut retries = Retries {
                    attempts: r.attempts.max(1),
                    per_try_timeout: duration(r.per_try_timeout.as_ref()),
                    ..Retries::default()
                };
                let on: Vec<&str> = if r.on.is_empty() {
                    vec!["connect-failure", "refused-stream"]
                } else {
                    r.on.iter().map(String::as_str).collect()
                };
                for condition in on {
                    match condition {
                        "connect-failure" => retries.connect_failure = true,
                        "refused-stream" => retries.refused_stream = true,
                        "reset" => retries.reset = true,
                        "5xx" => retries.any_5xx = true,
                        "gateway-error" => retries.gateway_error = true,
                        other => match other.parse::<u16>() {
                            Ok(status) => retries.statuses.push(status),
                            Err(_) => {
                                if let Some(code) = validate::GRPC_CODES.iter().position(|c| *c == other) {
                                    retries.grpc.push(code as u32 + 1);
                                }
                            }
                        },
                    }
                }
                retries
            });
            let fault = rule.fault.unwrap_or_default();
            let rewrite_prefix = (!rule.rewrite_path_prefix.is_empty()).then(|| {
                let prefix = rule.r#match.as_ref().map(|m| m.path_prefix.clone()).unwrap_or_default();
                (prefix, rule.rewrite_path_prefix.clone())
            });
            let label = if rule.name.is_empty() { format!("rules[{index}]") } else { format!("rules[{index}] ({})", rule.name) };
            rules.push(Rule {
                index,
                name: rule.name.clone(),
                label: label.into(),
                matcher: Matcher::compile(rule.r#match.as_ref())?,
                backends,
                timeout: duration(rule.timeout.as_ref()),
                retries,
                request_headers: Rewrite::compile(rule.request_headers.as_ref())?,
                response_headers: Rewrite::compile(rule.response_headers.as_ref())?,
                rewrite_prefix,
                delay: fault.delay.as_ref().and_then(|d| Some((d.percent, duration(d.duration.as_ref())?))),
                abort: fault.abort.as_ref().map(|a| (a.percent, u16::try_from(a.status).unwrap_or(503))),
                mirror: rule.mirror.as_ref().and_then(|m| Some((backend_ref(m.backend.as_ref()?), m.percent))),
            });
        }
        Ok(Self { version, rules })
    }

    /// The first rule matching the request, if any.
    pub fn find(&self, request: &RequestInfo<'_>) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matcher.matches(request))
    }

    /// Why each rule before `until` (every rule when `None`) does not match the request: its
    /// label and the first condition it fails.
    pub fn passed_over(&self, request: &RequestInfo<'_>, until: Option<usize>) -> Vec<(Arc<str>, String)> {
        self.rules
            .iter()
            .take(until.unwrap_or(self.rules.len()))
            .filter_map(|rule| Some((rule.label.clone(), rule.matcher.first_mismatch(request)?)))
            .collect()
    }

    /// Every backend the route sends to or mirrors to.
    pub fn references(&self) -> Vec<BackendRef> {
        let mut references: Vec<BackendRef> = Vec::new();
        for rule in &self.rules {
            for backend in rule.backends.iter().map(|b| &b.backend).chain(rule.mirror.iter().map(|m| &m.0)) {
                if !references.contains(backend) {
                    references.push(backend.clone());
                }
            }
        }
        references
    }
}

/// Replaces the matched path prefix, keeping the query.
pub fn rewrite_prefix(parts: &mut http::request::Parts, prefix: &str, replacement: &str) {
    let path = parts.uri.path();
    let Some(rest) = path.strip_prefix(prefix) else { return };
    // `/stock` → `/` on `/stock/42` gives `/42`, not `//42`.
    let rest = if replacement.ends_with('/') { rest.strip_prefix('/').unwrap_or(rest) } else { rest };
    let mut rewritten = format!("{replacement}{rest}");
    if rewritten.is_empty() {
        rewritten.push('/');
    }
    if let Some(query) = parts.uri.query() {
        rewritten.push('?');
        rewritten.push_str(query);
    }
    let mut uri = parts.uri.clone().into_parts();
    if let Ok(path_and_query) = rewritten.parse() {
        uri.path_and_query = Some(path_and_query);
        if let Ok(uri) = http::Uri::from_parts(uri) {
            parts.uri = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;

    #[test]
    fn prefixes_are_rewritten_keeping_the_query() {
        let (mut parts, ()) = http::Request::get("http://catalog/api/v1/items?page=2").body(()).expect("valid").into_parts();
        rewrite_prefix(&mut parts, "/api/v1", "/v2");
        assert_eq!(parts.uri, "http://catalog/v2/items?page=2");
        let (mut parts, ()) = http::Request::get("/old").body(()).expect("valid").into_parts();
        rewrite_prefix(&mut parts, "/old", "");
        assert_eq!(parts.uri, "/");
        let (mut parts, ()) = http::Request::get("/stock/42").body(()).expect("valid").into_parts();
        rewrite_prefix(&mut parts, "/stock", "/");
        assert_eq!(parts.uri, "/42", "no double slash");
    }

    fn table(yaml: &str) -> RouteTable {
        let resource = ferry_proto::json::resources_from_yaml(yaml).expect("valid").remove(0);
        let Some(v1::resource::Kind::Route(route)) = resource.kind else { panic!("a route") };
        RouteTable::compile(&Arc::from("catalog"), &route, 7).expect("compiles")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value")))
            .collect()
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let table = table(
            r#"
kind: Route
service: catalog
rules:
  - name: canary
    match: { path_prefix: /api, headers: { x-canary: "true" } }
    backends: [ { subset: v2 } ]
  - match: { path_regex: "/items/[0-9]+", method: GET }
    backends: [ { subset: v1 } ]
  - match: { header_present: [x-debug], query: { verbose: "1" } }
  - match: { header_regex: { user-agent: ".*Mobile.*" } }
"#,
        );
        let find = |method: &str, path: &str, query: Option<&str>, hs: &[(&str, &str)]| {
            let method = Method::from_bytes(method.as_bytes()).expect("method");
            let headers = headers(hs);
            let request = RequestInfo { method: &method, path, query, headers: &headers, host: None };
            table.find(&request).map(|r| r.index)
        };
        assert_eq!(find("GET", "/api/items", None, &[("x-canary", "true")]), Some(0));
        assert_eq!(find("GET", "/api/items", None, &[("x-canary", "false")]), None);
        assert_eq!(find("GET", "/items/42", None, &[]), Some(1));
        assert_eq!(find("POST", "/items/42", None, &[]), None, "method");
        assert_eq!(find("GET", "/items/42x", None, &[]), None, "the regex matches the whole path");
        assert_eq!(find("GET", "/", Some("a=b&verbose=1"), &[("x-debug", "")]), Some(2));
        assert_eq!(find("GET", "/", Some("verbose=2"), &[("x-debug", "")]), None);
        assert_eq!(find("GET", "/", None, &[("user-agent", "Foo Mobile Bar")]), Some(3));
        assert_eq!(&**table.rules[0].label(), "rules[0] (canary)");
        assert_eq!(table.references().len(), 3, "v2, v1 and the whole service");
    }

    #[test]
    fn hosts_match_exactly_or_by_domain() {
        let table =
            table("kind: Route\nservice: catalog\nrules:\n  - match: { hosts: [shop.example.com, \"*.api.example.com\"] }\n");
        let method = Method::GET;
        let find = |uri: &str, host: Option<&str>| {
            let uri: http::Uri = uri.parse().expect("uri");
            let headers = headers(&host.map(|h| vec![("host", h)]).unwrap_or_default());
            table.find(&RequestInfo::of(&method, &uri, &headers)).map(|r| r.index)
        };
        assert_eq!(find("/", Some("shop.example.com")), Some(0));
        assert_eq!(find("/", Some("SHOP.example.com:8080")), Some(0), "case and port do not matter");
        assert_eq!(find("http://eu.api.example.com/x", None), Some(0), "the URI's authority counts");
        assert_eq!(find("/", Some("api.example.com")), None, "a wildcard needs a subdomain");
        assert_eq!(find("/", Some("example.com")), None);
        assert_eq!(find("/", None), None, "no host, no match");
    }

    #[test]
    fn retries_and_faults_compile() {
        let table = table(
            "kind: Route\nservice: catalog\nrules:\n  - retries: { attempts: 3, per_try_timeout: 500ms, on: [5xx, 429, unavailable] }\n    fault: { delay: { percent: 10, duration: 1s }, abort: { percent: 5, status: 503 } }\n",
        );
        let rule = &table.rules[0];
        let retries = rule.retries.as_ref().expect("retries");
        assert_eq!((retries.attempts, retries.per_try_timeout), (3, Some(Duration::from_millis(500))));
        assert!(retries.retry_response(500, None) && retries.retry_response(429, None) && retries.retry_response(200, Some(14)));
        assert!(!retries.retry_response(404, None));
        assert_eq!(retries.describe(), ["5xx", "429", "unavailable"]);
        assert_eq!(rule.delay, Some((10.0, Duration::from_secs(1))));
        assert_eq!(rule.abort, Some((5.0, 503)));
        assert_eq!(rule.backends[0].backend, BackendRef { service: "catalog".into(), subset: None });
    }
}
