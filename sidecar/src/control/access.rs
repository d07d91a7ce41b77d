//! How the sidecar reaches the control plane: the addresses of `--control-plane` (several
//! replicas, or a host name that resolves to several), the roots that verify them and the
//! token; and which address to try next.
//!
//! The config stream goes to one address at a time and moves to the next after a failure
//! ([`Rotation`]), as gRPC's `pick_first` does with a list: the first address at start, so the
//! order of the list is the order of preference; a host name is resolved again at every
//! attempt. Other calls (the CSR) go first to the address the stream last reached, and to the
//! others in turn when it does not answer ([`ControlAccess::connect`]).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_tls::{
    Trust,
    api::{Access, ApiChannel, ControlPlaneUrl, ControlPlaneUrls, Target},
};

/// How to reach the control plane's API: its URLs, the roots that verify it (`--ca-file` and
/// the trust bundle in force), and the token.
#[derive(Clone)]
pub struct ControlAccess {
    pub urls: ControlPlaneUrls,
    pub ca_pem: Option<String>,
    pub token: Option<String>,
    /// `--token-file`: read again at every connection, so that fixing the token in the file
    /// fixes a sidecar the control plane refused, without a restart.
    pub token_file: Option<PathBuf>,
    pub trust: Trust,
    /// The address that answered last: the config stream's replica, tried first by other calls.
    answered: Arc<Mutex<Option<Target>>>,
}

impl std::fmt::Debug for ControlAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("ControlAccess")
            .field("urls", &self.urls.to_string())
            .field("token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl ControlAccess {
    /// Access to the control plane at `urls`.
    pub fn new(
        urls: ControlPlaneUrls,
        ca_pem: Option<String>,
        token: Option<String>,
        token_file: Option<PathBuf>,
        trust: Trust,
    ) -> Self {
        Self { urls, ca_pem, token, token_file, trust, answered: Arc::default() }
    }

    /// The access to `url` as of now: the roots of `--ca-file` and of the bundle in force, and
    /// the token.
    pub fn access(&self, url: &ControlPlaneUrl) -> Access {
        let mut roots = self.ca_pem.clone().unwrap_or_default();
        if let Some(bundle) = self.trust.current() {
            roots.push_str(&bundle.roots_pem);
        }
        let from_file = self.token_file.as_ref().and_then(|path| match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read the token file; using the token read before");
                None
            }
        });
        let token = from_file.or_else(|| self.token.clone());
        Access { url: url.as_str().to_owned(), ca_pem: (!roots.is_empty()).then_some(roots), token }
    }

    /// Records that `target` answered: other calls try it first from now on.
    pub fn answered(&self, target: &Target) {
        *ferry_runtime::lock(&self.answered) = Some(target.clone());
    }

    /// Connects to one replica: the one that answered last first, then every other address in
    /// the order of the list. The error names each address tried, with why it failed.
    pub async fn connect(&self, connect_timeout: Duration) -> Result<(ApiChannel, Target), String> {
        let resolved = self.urls.resolve().await;
        let mut targets = resolved.targets.clone();
        if targets.is_empty() {
            return Err(resolved.why_none());
        }
        let preferred = ferry_runtime::lock(&self.answered).clone();
        if let Some(at) = preferred.and_then(|p| targets.iter().position(|t| *t == p)) {
            targets[..=at].rotate_right(1);
        }
        let mut failures = Vec::new();
        for target in targets {
            match self.access(&target.url).connect_at(&target, Some(connect_timeout)).await {
                Ok(channel) => {
                    self.answered(&target);
                    return Ok((channel, target));
                }
                Err(error) => failures.push(format!("{target}: {}", ferry_runtime::error_chain(&error))),
            }
        }
        failures.extend(resolved.failures.iter().map(|(url, why)| format!("{url}: {why}")));
        Err(failures.join("; "))
    }
}

/// Which address the config stream tries next: the first of the list at start; the same one
/// again after a stream that ended cleanly; the next one, round the list, after a failure.
/// The list is resolved anew for every attempt, so a replica is found again by its address
/// whatever the resolver's order.
#[derive(Debug, Default)]
pub struct Rotation {
    /// The address tried last and its place in the list then.
    last: Option<(Target, usize)>,
    /// Whether it failed.
    failed: bool,
}

impl Rotation {
    /// The address to try now, among `targets` (the list as resolved for this attempt).
    pub fn pick<'a>(&mut self, targets: &'a [Target]) -> Option<&'a Target> {
        if targets.is_empty() {
            return None;
        }
        let index = match &self.last {
            None => 0,
            Some((last, was_at)) => {
                let at = targets.iter().position(|t| t == last).unwrap_or(*was_at);
                (at + usize::from(self.failed)) % targets.len()
            }
        };
        self.last = Some((targets[index].clone(), index));
        self.failed = false;
        Some(&targets[index])
    }

    /// The address picked last failed, or its stream broke: the next attempt goes elsewhere.
    pub fn failed(&mut self) {
        self.failed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(list: &str) -> Vec<Target> {
        let urls = ControlPlaneUrls::parse(list).expect("a valid list");
        urls.iter().map(|url| Target { url: url.clone(), addr: (url.ip().expect("an IP"), url.port()).into() }).collect()
    }

    fn picks(rotation: &mut Rotation, targets: &[Target]) -> String {
        rotation.pick(targets).map(|t| t.addr.to_string()).unwrap_or_default()
    }

    #[test]
    fn the_stream_starts_on_the_first_address_and_moves_on_after_each_failure() {
        let list = targets("https://10.0.0.1:7070,https://10.0.0.2:7070,https://10.0.0.3:7070");
        let mut rotation = Rotation::default();
        assert_eq!(picks(&mut rotation, &list), "10.0.0.1:7070");
        assert_eq!(picks(&mut rotation, &list), "10.0.0.1:7070", "no failure, no move");
        for expected in ["10.0.0.2:7070", "10.0.0.3:7070", "10.0.0.1:7070", "10.0.0.2:7070"] {
            rotation.failed();
            assert_eq!(picks(&mut rotation, &list), expected, "round the list");
        }
    }

    #[test]
    fn a_replica_is_followed_by_its_address_when_the_resolver_reorders_the_list() {
        let mut rotation = Rotation::default();
        let first = targets("http://10.0.0.1:1,http://10.0.0.2:1,http://10.0.0.3:1");
        assert_eq!(picks(&mut rotation, &first), "10.0.0.1:1");
        rotation.failed();
        assert_eq!(picks(&mut rotation, &first), "10.0.0.2:1");
        // Resolved again in another order: the stream stays with 10.0.0.2 after a clean end...
        let reordered = targets("http://10.0.0.3:1,http://10.0.0.2:1,http://10.0.0.1:1");
        assert_eq!(picks(&mut rotation, &reordered), "10.0.0.2:1");
        // ...and moves to the one after it after a failure.
        rotation.failed();
        assert_eq!(picks(&mut rotation, &reordered), "10.0.0.1:1");
        // An address gone from the list: the rotation goes on from its place.
        rotation.failed();
        let shrunk = targets("http://10.0.0.3:1,http://10.0.0.2:1");
        assert_eq!(picks(&mut rotation, &shrunk), "10.0.0.2:1");
        assert_eq!(picks(&mut rotation, &[]), "", "nothing resolved: nothing to pick");
    }

    #[test]
    fn a_single_address_is_tried_again_and_again() {
        let list = targets("https://127.0.0.1:7070");
        let mut rotation = Rotation::default();
        for _ in 0..3 {
            assert_eq!(picks(&mut rotation, &list), "127.0.0.1:7070");
            rotation.failed();
        }
    }

    #[tokio::test]
    async fn other_calls_go_first_to_the_replica_that_answered_last_and_name_every_failure() {
        // Two addresses nobody listens on (ports of listeners bound and closed at once).
        let closed = || std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let (a, b) = (closed(), closed());
        let urls = ControlPlaneUrls::parse(&format!("http://{a},http://{b}")).expect("a valid list");
        let access = ControlAccess::new(urls, None, None, None, Trust::default());
        let error = access.connect(Duration::from_secs(1)).await.expect_err("nothing listens");
        let (at_a, at_b) = (error.find(&format!("http://{a}:")), error.find(&format!("http://{b}:")));
        assert!(at_a.is_some() && at_b.is_some() && at_a < at_b, "the list's order: {error}");
        access.answered(&Target { url: ControlPlaneUrl::parse(&format!("http://{b}")).expect("a URL"), addr: b });
        let error = access.connect(Duration::from_secs(1)).await.expect_err("nothing listens");
        let (at_a, at_b) = (error.find(&format!("http://{a}:")), error.find(&format!("http://{b}:")));
        assert!(at_a.is_some() && at_b.is_some() && at_b < at_a, "the one that answered last first: {error}");
    }
}
