//! The control plane's addresses as `--control-plane URL[,URL...]` gives them, shared by the
//! sidecar and `ferryctl`: every URL checked when the flag is parsed, and resolved again at
//! every (re)connection into the addresses to dial, one IP each.
//!
//! A host name that resolves to several addresses counts as several replicas, as a gRPC
//! client's DNS resolver would make it; whichever address is dialled, the certificate is
//! verified against the name in the URL ([`Access::endpoint_at`](super::Access::endpoint_at)).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

/// The most URLs one `--control-plane` may list.
pub const MAX_URLS: usize = 64;

/// How long resolving one host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The control plane's URLs, in the order given; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneUrls(Arc<[ControlPlaneUrl]>);

/// One URL of `--control-plane`: `https://HOST:PORT`, or `http://` for a control plane with
/// `--api-tls off`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ControlPlaneUrl {
    /// As given.
    text: Arc<str>,
    /// Without the brackets of an IPv6 literal.
    host: Arc<str>,
    /// As given, or the scheme's (443, 80).
    port: u16,
    https: bool,
}

/// One address to dial: a URL of the list and one address its host resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub url: ControlPlaneUrl,
    pub addr: SocketAddr,
}

/// What resolving the whole list gave: the addresses to dial, in the order of the list, and the
/// URLs that resolved to nothing, with why.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub targets: Vec<Target>,
    pub failures: Vec<(ControlPlaneUrl, String)>,
}

impl ControlPlaneUrls {
    /// Parses `URL[,URL...]`: each URL as a single one is checked (`http://` or `https://` and
    /// a host); an empty entry (`a,,b`, a trailing comma) is refused. Errors name the entry.
    pub fn parse(s: &str) -> Result<Self, String> {
        let entries: Vec<&str> = s.split(',').collect();
        if entries.len() > MAX_URLS {
            return Err(format!("at most {MAX_URLS} URLs, not {}", entries.len()));
        }
        let several = entries.len() > 1;
        let mut urls = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(if several {
                    format!("URL {} of {} is empty (in {s:?})", index + 1, entries.len())
                } else {
                    "the URL is empty".to_owned()
                });
            }
            let url = ControlPlaneUrl::parse(entry)
                .map_err(|why| if several { format!("URL {} of {}, {entry:?}: {why}", index + 1, entries.len()) } else { why })?;
            urls.push(url);
        }
        Ok(Self(urls.into()))
    }

    /// The URLs, in order.
    pub fn iter(&self) -> impl Iterator<Item = &ControlPlaneUrl> {
        self.0.iter()
    }

    /// The first URL.
    pub fn first(&self) -> &ControlPlaneUrl {
        self.0.first().expect("a parsed list holds at least one URL")
    }

    /// How many URLs there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a parsed list holds at least one URL.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first `https://` URL, if any: those need roots to verify the control plane.
    pub fn first_https(&self) -> Option<&ControlPlaneUrl> {
        self.iter().find(|url| url.is_https())
    }

    /// Resolves every URL into the addresses to dial, now: an IP literal as it is, a host name
    /// through the system's resolver, each address once.
    pub async fn resolve(&self) -> Resolved {
        let mut resolved = Resolved::default();
        for url in self.iter() {
            match url.resolve().await {
                Ok(addrs) => {
                    for addr in addrs {
                        let target = Target { url: url.clone(), addr };
                        if !resolved.targets.contains(&target) {
                            resolved.targets.push(target);
                        }
                    }
                }
                Err(why) => resolved.failures.push((url.clone(), why)),
            }
        }
        resolved
    }
}

impl fmt::Display for ControlPlaneUrls {
    /// As the flag would give it: the URLs joined by commas.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, url) in self.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            f.write_str(url.as_str())?;
        }
        Ok(())
    }
}

impl ControlPlaneUrl {
    /// Parses one URL: `http://` or `https://` with a host.
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            // HOST:PORT alone, as other tools take it: say the URL meant.
            None if uri.host().is_some() && uri.port_u16().is_some() => {
                return Err(format!("must be http://HOST:PORT or https://HOST:PORT (did you mean https://{s}?)"));
            }
            _ => return Err("must be http://HOST:PORT or https://HOST:PORT".into()),
        };
        let host = match uri.host() {
            Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
            _ => return Err("must be http://HOST:PORT or https://HOST:PORT".into()),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self { text: s.into(), host: host.into(), port, https })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its host: a name, or an IP without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Its port: as given, or the scheme's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it speaks TLS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// Its host as an IP, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The addresses to dial for it, now: an IP literal without a lookup, a name through the
    /// system's resolver (each address once, in the resolver's order).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        if let Some(ip) = self.ip() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let lookup = tokio::net::lookup_host((self.host.as_ref(), self.port));
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
            .await
            .map_err(|_| format!("resolving {}: no answer within {RESOLVE_TIMEOUT:?}", self.host))?
            .map_err(|e| format!("resolving {}: {e}", self.host))?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in found {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(format!("resolving {}: no address", self.host));
        }
        Ok(addrs)
    }
}

impl fmt::Display for ControlPlaneUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Target {
    /// Whether the URL names this address itself (an IP literal), rather than a host name that
    /// resolved to it.
    pub fn is_literal(&self) -> bool {
        self.url.ip() == Some(self.addr.ip())
    }
}

impl fmt::Display for Target {
    /// The URL, and the address dialled when the URL names a host: `https://cp:7070 (10.0.0.5:7070)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_literal() { write!(f, "{}", self.url) } else { write!(f, "{} ({})", self.url, self.addr) }
    }
}

impl Resolved {
    /// Why nothing can be dialled, naming every URL: for when `targets` is empty.
    pub fn why_none(&self) -> String {
        let reasons: Vec<String> = self.failures.iter().map(|(url, why)| format!("{url}: {why}")).collect();
        if reasons.is_empty() { "no address to dial".to_owned() } else { reasons.join("; ") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_parses_as_before() {
        let urls = ControlPlaneUrls::parse("https://127.0.0.1:7070").expect("parses");
        assert_eq!(urls.len(), 1);
        assert_eq!(urls.to_string(), "https://127.0.0.1:7070");
        let url = urls.first();
        assert_eq!((url.host(), url.port(), url.is_https()), ("127.0.0.1", 7070, true));
        assert_eq!(url.ip(), Some(IpAddr::from([127, 0, 0, 1])));
        let plain = ControlPlaneUrl::parse("http://cp.example").expect("parses");
        assert_eq!((plain.host(), plain.port(), plain.is_https(), plain.ip()), ("cp.example", 80, false, None));
        assert_eq!(
            ControlPlaneUrl::parse("https://[::1]:7070").expect("parses").ip(),
            Some(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        );
    }

    #[test]
    fn a_list_keeps_its_order_and_tolerates_spaces() {
        let urls = ControlPlaneUrls::parse("https://a:7070, http://10.0.0.2:7070,https://[::1]:7070").expect("parses");
        let texts: Vec<&str> = urls.iter().map(ControlPlaneUrl::as_str).collect();
        assert_eq!(texts, ["https://a:7070", "http://10.0.0.2:7070", "https://[::1]:7070"]);
        assert_eq!(urls.to_string(), "https://a:7070,http://10.0.0.2:7070,https://[::1]:7070");
        assert_eq!(urls.first_https().map(ControlPlaneUrl::as_str), Some("https://a:7070"));
        assert!(ControlPlaneUrls::parse("http://a:1,http://b:2").expect("parses").first_https().is_none());
    }

    #[test]
    fn bad_entries_are_named() {
        let error = ControlPlaneUrls::parse("127.0.0.1:7070").expect_err("no scheme");
        assert_eq!(error, "must be http://HOST:PORT or https://HOST:PORT (did you mean https://127.0.0.1:7070?)");
        let error = ControlPlaneUrls::parse("ftp://x").expect_err("a single bad URL");
        assert_eq!(error, "must be http://HOST:PORT or https://HOST:PORT", "a single URL reads as before");
        let error = ControlPlaneUrls::parse("https://a:7070,ftp://b:7070").expect_err("a bad second URL");
        assert!(error.contains("URL 2 of 2") && error.contains("\"ftp://b:7070\"") && error.contains("must be"), "{error}");
        for empty in ["https://a:7070,,https://b:7070", "https://a:7070,", ",https://a:7070", ""] {
            let error = ControlPlaneUrls::parse(empty).expect_err(empty);
            assert!(error.contains("empty"), "{empty:?}: {error}");
        }
        let error = ControlPlaneUrls::parse("https://a:7070,,https://b:7070").expect_err("empty");
        assert!(error.starts_with("URL 2 of 3 is empty"), "{error}");
        assert!(ControlPlaneUrls::parse("https://:7070").is_err(), "no host");
        assert!(ControlPlaneUrls::parse("127.0.0.1:7070").is_err(), "no scheme");
        let many = vec!["http://a:1"; MAX_URLS + 1].join(",");
        assert!(ControlPlaneUrls::parse(&many).expect_err("too many").contains("at most"));
    }

    #[tokio::test]
    async fn literals_resolve_without_a_lookup_and_names_to_every_address() {
        let urls = ControlPlaneUrls::parse("http://127.0.0.1:7070,https://[::1]:7071").expect("parses");
        let resolved = urls.resolve().await;
        assert!(resolved.failures.is_empty());
        let addrs: Vec<String> = resolved.targets.iter().map(|t| t.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:7070", "[::1]:7071"]);
        assert!(resolved.targets.iter().all(Target::is_literal));
        assert_eq!(resolved.targets[0].to_string(), "http://127.0.0.1:7070");

        // localhost: every loopback address the resolver gives, each a target of its own that
        // names the host it came from.
        let urls = ControlPlaneUrls::parse("http://localhost:7070").expect("parses");
        let resolved = urls.resolve().await;
        assert!(!resolved.targets.is_empty(), "{}", resolved.why_none());
        for target in &resolved.targets {
            assert!(target.addr.ip().is_loopback() && target.addr.port() == 7070, "{target}");
            assert!(!target.is_literal());
            assert_eq!(target.to_string(), format!("http://localhost:7070 ({})", target.addr));
        }

        let urls = ControlPlaneUrls::parse("http://no-such-host.invalid:7070").expect("parses");
        let resolved = urls.resolve().await;
        assert!(resolved.targets.is_empty());
        assert!(
            resolved.why_none().starts_with("http://no-such-host.invalid:7070: resolving no-such-host.invalid"),
            "{}",
            resolved.why_none()
        );
    }
}
