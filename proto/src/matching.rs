//! Request matching, compiled once: the `RouteMatch` of routes and authorization rules turned
//! into a matcher (regular expressions built, names parsed) so that matching a request
//! allocates nothing. Shared by the sidecar's routes, its inbound authorization, and `ferryctl
//! explain`.

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

use crate::v1;

#[derive(Debug)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatch {
    Exact(String),
    Regex(Regex),
    Present,
}

impl ValueMatch {
    /// Why `value` of `what` (`header x-canary`) fails this condition, if it does.
    fn mismatch(&self, what: &str, value: Option<&str>) -> Option<String> {
        if self.matches(value) {
            return None;
        }
        Some(match (self, value) {
            (_, None) => format!("{what} is absent"),
            (Self::Exact(expected), Some(value)) if value.eq_ignore_ascii_case(expected) => {
                format!("{what}: {value:?} is not {expected:?} (values are case-sensitive)")
            }
            (Self::Exact(expected), Some(value)) => format!("{what}: {value:?} is not {expected:?}"),
            (Self::Regex(regex), Some(value)) => {
                let pattern = regex.as_str().trim_start_matches("^(?:").trim_end_matches(")$");
                format!("{what}: {value:?} does not match /{pattern}/")
            }
            (Self::Present, Some(_)) => format!("{what} is absent"),
        })
    }

    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Self::Present, value) => value.is_some(),
            (Self::Exact(expected), Some(value)) => value == expected,
            (Self::Regex(regex), Some(value)) => regex.is_match(value),
            (_, None) => false,
        }
    }
}

/// A compiled `RouteMatch`: every condition given must hold.
#[derive(Debug)]
pub struct Matcher {
    path: PathMatch,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
    /// Exact host names, and domains (from `*.domain`) whose subdomains match.
    hosts: Vec<HostMatch>,
}

#[derive(Debug)]
enum HostMatch {
    Exact(String),
    /// `.example.com`, from `*.example.com`.
    Suffix(String),
}

impl HostMatch {
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(exact) => host.eq_ignore_ascii_case(exact),
            Self::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// A regex matched against the whole value.
fn whole(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$")).size_limit(1 << 20).build().map_err(|e| e.to_string())
}

fn header(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|e| e.to_string())
}

impl Matcher {
    /// Compiles a match (already validated); `None` matches every request.
    pub fn compile(m: Option<&v1::RouteMatch>) -> Result<Self, String> {
        let m = m.cloned().unwrap_or_default();
        let path = if !m.path_exact.is_empty() {
            PathMatch::Exact(m.path_exact.clone())
        } else if !m.path_prefix.is_empty() {
            PathMatch::Prefix(m.path_prefix.clone())
        } else if !m.path_regex.is_empty() {
            PathMatch::Regex(whole(&m.path_regex)?)
        } else {
            PathMatch::Any
        };
        let method =
            if m.method.is_empty() { None } else { Some(Method::from_bytes(m.method.as_bytes()).map_err(|e| e.to_string())?) };
        let mut headers = Vec::new();
        for (name, value) in &m.headers {
            headers.push((header(name)?, ValueMatch::Exact(value.clone())));
        }
        for (name, pattern) in &m.header_regex {
            headers.push((header(name)?, ValueMatch::Regex(whole(pattern)?)));
        }
        for name in &m.header_present {
            headers.push((header(name)?, ValueMatch::Present));
        }
        let mut query = Vec::new();
        for (name, value) in &m.query {
            query.push((name.clone(), ValueMatch::Exact(value.clone())));
        }
        for (name, pattern) in &m.query_regex {
            query.push((name.clone(), ValueMatch::Regex(whole(pattern)?)));
        }
        let hosts = m
            .hosts
            .iter()
            .map(|h| match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_owned()),
                None => HostMatch::Exact(h.clone()),
            })
            .collect();
        Ok(Self { path, method, headers, query, hosts })
    }

    /// Whether the matcher holds no condition, and so matches every request.
    pub fn is_empty(&self) -> bool {
        matches!(self.path, PathMatch::Any)
            && self.method.is_none()
            && self.headers.is_empty()
            && self.query.is_empty()
            && self.hosts.is_empty()
    }

    /// The first condition `request` fails, in words (`header x-canary: "True" is not "true"
    /// (values are case-sensitive)`); `None` when it meets them all.
    pub fn first_mismatch(&self, request: &RequestInfo<'_>) -> Option<String> {
        let RequestInfo { method, path, query, headers, host } = *request;
        let path_failure = match &self.path {
            PathMatch::Any => None,
            PathMatch::Exact(exact) => (path != exact).then(|| format!("path {path:?} is not {exact:?}")),
            PathMatch::Prefix(prefix) => {
                (!path.starts_with(prefix.as_str())).then(|| format!("path {path:?} does not start with {prefix:?}"))
            }
            PathMatch::Regex(regex) => (!regex.is_match(path)).then(|| {
                let pattern = regex.as_str().trim_start_matches("^(?:").trim_end_matches(")$");
                format!("path {path:?} does not match /{pattern}/")
            }),
        };
        if path_failure.is_some() {
            return path_failure;
        }
        if let Some(expected) = &self.method
            && expected != method
        {
            return Some(format!("method {method} is not {expected}"));
        }
        for (name, condition) in &self.headers {
            let value = headers.get(name).and_then(|v| v.to_str().ok());
            if let Some(why) = condition.mismatch(&format!("header {name}"), value) {
                return Some(why);
            }
        }
        for (name, condition) in &self.query {
            if let Some(why) = condition.mismatch(&format!("query {name}"), query_value(query, name)) {
                return Some(why);
            }
        }
        if !self.hosts.is_empty() && !host.is_some_and(|host| self.hosts.iter().any(|h| h.matches(host))) {
            let wanted: Vec<String> = self
                .hosts
                .iter()
                .map(|h| match h {
                    HostMatch::Exact(exact) => exact.clone(),
                    HostMatch::Suffix(suffix) => format!("*{suffix}"),
                })
                .collect();
            return Some(match host {
                Some(host) => format!("host {host:?} is not {}", wanted.join(" or ")),
                None => format!("no host, and the rule wants {}", wanted.join(" or ")),
            });
        }
        None
    }

    /// Whether `request` meets every condition.
    pub fn matches(&self, request: &RequestInfo<'_>) -> bool {
        let RequestInfo { method, path, query, headers, host } = *request;
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Regex(regex) => regex.is_match(path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.iter().all(|(name, condition)| condition.matches(headers.get(name).and_then(|v| v.to_str().ok())))
            && self.query.iter().all(|(name, condition)| condition.matches(query_value(query, name)))
            && (self.hosts.is_empty() || host.is_some_and(|host| self.hosts.iter().any(|h| h.matches(host))))
    }
}

/// What rules match on, taken from a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The host, without its port: from the URI's authority, else the Host header.
    pub host: Option<&'a str>,
}

impl<'a> RequestInfo<'a> {
    /// The matchable parts of a request.
    pub fn of(method: &'a Method, uri: &'a http::Uri, headers: &'a HeaderMap) -> Self {
        let host = uri
            .host()
            .or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(strip_port))
            .map(|h| h.trim_end_matches('.'));
        Self { method, path: uri.path(), query: uri.query(), headers, host }
    }
}

/// `host:port` → `host`, `[::1]:80` → `[::1]`.
pub fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if port.bytes().all(|b| b.is_ascii_digit()) && !host.is_empty() && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

/// The first value of query parameter `name`, as sent (not percent-decoded).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failed_condition_is_said_in_words() {
        let m = v1::RouteMatch {
            path_prefix: "/api".into(),
            method: "GET".into(),
            headers: [("x-canary".to_owned(), "true".to_owned())].into(),
            ..Default::default()
        };
        let matcher = Matcher::compile(Some(&m)).expect("compiles");
        let why = |method: &Method, uri: &str, headers: &[(&str, &str)]| {
            let uri: http::Uri = uri.parse().expect("uri");
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
            }
            matcher.first_mismatch(&RequestInfo::of(method, &uri, &map))
        };
        assert_eq!(why(&Method::GET, "/x", &[]).as_deref(), Some(r#"path "/x" does not start with "/api""#));
        assert_eq!(why(&Method::POST, "/api/1", &[]).as_deref(), Some("method POST is not GET"));
        assert_eq!(why(&Method::GET, "/api/1", &[]).as_deref(), Some("header x-canary is absent"));
        assert_eq!(
            why(&Method::GET, "/api/1", &[("x-canary", "True")]).as_deref(),
            Some(r#"header x-canary: "True" is not "true" (values are case-sensitive)"#)
        );
        assert_eq!(why(&Method::GET, "/api/1", &[("x-canary", "true")]), None);
        let regex = Matcher::compile(Some(&v1::RouteMatch { path_regex: "/items/[0-9]+".into(), ..Default::default() }))
            .expect("compiles");
        let uri: http::Uri = "/items/x".parse().expect("uri");
        assert_eq!(
            regex.first_mismatch(&RequestInfo::of(&Method::GET, &uri, &HeaderMap::new())).as_deref(),
            Some(r#"path "/items/x" does not match //items/[0-9]+/"#)
        );
    }

    #[test]
    fn ports_are_stripped_from_hosts_only() {
        assert_eq!(strip_port("catalog:80"), "catalog");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }

    #[test]
    fn an_absent_match_matches_everything() {
        let matcher = Matcher::compile(None).expect("compiles");
        assert!(matcher.is_empty());
        let headers = HeaderMap::new();
        let request = RequestInfo { method: &Method::POST, path: "/x", query: None, headers: &headers, host: None };
        assert!(matcher.matches(&request));
        let some = v1::RouteMatch { method: "GET".into(), ..Default::default() };
        let matcher = Matcher::compile(Some(&some)).expect("compiles");
        assert!(!matcher.is_empty() && !matcher.matches(&request));
    }
}
