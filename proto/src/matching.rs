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
