//! The control plane as `ferryctl` reaches it: every address of `--control-plane` (several
//! replicas, or a host name that resolves to several addresses), tried in turn, so that a
//! command works while any one replica is up.
//!
//! An address is left for the next one when it cannot be reached or when it answers
//! `UNAVAILABLE` (a replica shutting down, or one that lost its store); any other answer is the
//! control plane's, and final. When every address fails, the error names each with its reason.
//! A command moved to another replica after `UNAVAILABLE` runs again from its start there: the
//! commands that change something are idempotent (register, apply) or say what went wrong
//! (deregister of an instance already gone).

use std::{sync::Mutex, time::Duration};

use ferry_tls::api::{Access, AccessError, ApiChannel, ConnectError, ControlPlaneUrls, Target};

use super::UsageError;

/// How long connecting to one address may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The control plane's addresses, and which of them the command is using.
#[derive(Debug)]
pub struct ControlPlane {
    urls: ControlPlaneUrls,
    ca_pem: Option<String>,
    token: Option<String>,
    attempts: Mutex<Attempts>,
}

#[derive(Debug, Default)]
struct Attempts {
    /// The addresses, resolved at the first connection; `None` before it.
    targets: Option<Vec<Target>>,
    /// The address in use, or to try next.
    next: usize,
    /// Each address that failed, and why, in the order tried.
    failures: Vec<Failure>,
}

/// One address that failed.
#[derive(Debug)]
struct Failure {
    target: String,
    reason: String,
}

/// Every address of `--control-plane` failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "no control plane answered; every address of --control-plane was tried:{}",
    .0.iter().map(|f| format!("\n  {}: {}", f.target, f.reason)).collect::<String>()
)]
struct NoControlPlane(Vec<Failure>);

impl ControlPlane {
    /// The control plane at `urls`, verified with `ca_pem`, called with `token`.
    pub fn new(urls: ControlPlaneUrls, ca_pem: Option<String>, token: Option<String>) -> Self {
        Self { urls, ca_pem, token, attempts: Mutex::default() }
    }

    fn access(&self, target: &Target) -> Access {
        Access { url: target.url.as_str().to_owned(), ca_pem: self.ca_pem.clone(), token: self.token.clone() }
    }

    /// Connects to the address in use, or to the next one that can be reached.
    pub async fn connect(&self) -> anyhow::Result<ApiChannel> {
        let targets = self.targets().await;
        loop {
            let next = ferry_runtime::lock(&self.attempts).next;
            let Some(target) = targets.get(next) else {
                return Err(self.exhausted(None));
            };
            match self.access(target).connect_at(target, Some(CONNECT_TIMEOUT)).await {
                Ok(channel) => return Ok(channel),
                Err(ConnectError::Access(access)) => return Err(usage(access).into()),
                Err(ConnectError::Transport { error, hint, url }) => {
                    let reason = format!(
                        "{}{}",
                        ferry_runtime::error_chain(&error),
                        hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
                    );
                    let last = ConnectError::Transport { url, error, hint };
                    let mut attempts = ferry_runtime::lock(&self.attempts);
                    attempts.failures.push(Failure { target: target.to_string(), reason });
                    attempts.next += 1;
                    if attempts.next >= targets.len() {
                        drop(attempts);
                        return Err(self.exhausted(Some(anyhow::Error::new(last))));
                    }
                }
            }
        }
    }

    /// After `error` from the address in use: whether to run the command again on the next
    /// address (the address could not serve it), or the error to report.
    pub async fn failed(&self, error: anyhow::Error) -> Result<(), anyhow::Error> {
        let Some(status) = error.downcast_ref::<tonic::Status>().filter(|s| s.code() == tonic::Code::Unavailable) else {
            return Err(error);
        };
        let targets = self.targets().await;
        let mut attempts = ferry_runtime::lock(&self.attempts);
        let Some(target) = targets.get(attempts.next) else {
            drop(attempts);
            return Err(error);
        };
        let reason = super::status_text(status);
        attempts.failures.push(Failure { target: target.to_string(), reason });
        attempts.next += 1;
        if attempts.next < targets.len() {
            return Ok(());
        }
        drop(attempts);
        Err(self.exhausted(Some(error)))
    }

    /// The addresses, resolved once for the whole command. A URL that resolves to nothing is a
    /// failure of its own, named with the others if no address answers.
    async fn targets(&self) -> Vec<Target> {
        if let Some(targets) = &ferry_runtime::lock(&self.attempts).targets {
            return targets.clone();
        }
        let resolved = self.urls.resolve().await;
        let mut attempts = ferry_runtime::lock(&self.attempts);
        let targets = attempts.targets.get_or_insert(resolved.targets).clone();
        for (url, why) in resolved.failures {
            attempts.failures.push(Failure { target: url.to_string(), reason: why });
        }
        targets
    }

    /// The error once no address is left: the last one's own when it was the only one tried
    /// (a single URL reads as it always has), otherwise every address with its reason.
    fn exhausted(&self, last: Option<anyhow::Error>) -> anyhow::Error {
        let failures = std::mem::take(&mut ferry_runtime::lock(&self.attempts).failures);
        match (last, failures.as_slice()) {
            (Some(last), [_]) => last,
            (None, [only]) if self.urls.len() == 1 => {
                anyhow::anyhow!("cannot reach the control plane at {}: {}", only.target, only.reason)
            }
            (_, []) => {
                NoControlPlane(vec![Failure { target: self.urls.to_string(), reason: "no address to dial".into() }]).into()
            }
            _ => NoControlPlane(failures).into(),
        }
    }
}

/// A refusal before anything was sent, naming the flag at fault.
fn usage(error: AccessError) -> UsageError {
    let flag = match error {
        AccessError::NoCaFile { .. } | AccessError::BadCa(_) => "--ca-file",
        AccessError::BadToken => "--token",
        AccessError::BadUrl { .. } => "--control-plane",
    };
    UsageError(format!("{flag}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address nobody listens on: a port bound and closed at once.
    fn closed() -> std::net::SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
    }

    fn control_plane(urls: &str) -> ControlPlane {
        ControlPlane::new(ControlPlaneUrls::parse(urls).expect("a valid list"), None, None)
    }

    #[test]
    fn control_plane_takes_one_url_as_before_or_several_and_refuses_an_empty_entry() {
        use clap::Parser;
        let parse = |args: &[&str]| crate::Cli::try_parse_from(["ferryctl"].iter().chain(args).copied());
        let cli = parse(&["services"]).expect("parses");
        assert_eq!(cli.control_plane.to_string(), "https://127.0.0.1:7070", "the default");
        let cli = parse(&["--control-plane", "http://10.0.0.5:7070", "services"]).expect("parses");
        assert_eq!(cli.control_plane.to_string(), "http://10.0.0.5:7070");
        let cli = parse(&["services", "--control-plane", "https://cp-1:7070,https://cp-2:7070"]).expect("a global flag");
        let urls: Vec<&str> = cli.control_plane.iter().map(|u| u.as_str()).collect();
        assert_eq!(urls, ["https://cp-1:7070", "https://cp-2:7070"]);
        for (value, expected) in
            [("https://a:7070,,https://b:7070", "URL 2 of 3 is empty"), ("https://a:7070,ftp://b", "\"ftp://b\"")]
        {
            let error = parse(&["--control-plane", value, "services"]).expect_err(value).to_string();
            assert!(error.contains("--control-plane") && error.contains(expected), "{error}");
        }
    }

    #[tokio::test]
    async fn a_single_address_fails_as_it_always_has() {
        let addr = closed();
        let error = control_plane(&format!("http://{addr}")).connect().await.expect_err("nothing listens");
        let text = ferry_runtime::error_chain(error.as_ref());
        assert!(text.starts_with(&format!("cannot reach the control plane at http://{addr}: ")), "{text}");
    }

    #[tokio::test]
    async fn when_every_address_fails_each_is_named_with_its_reason() {
        let (a, b) = (closed(), closed());
        let error = control_plane(&format!("http://{a},http://{b}")).connect().await.expect_err("nothing listens");
        let text = error.to_string();
        assert!(text.starts_with("no control plane answered"), "{text}");
        let (at_a, at_b) = (text.find(&format!("\n  http://{a}: ")), text.find(&format!("\n  http://{b}: ")));
        assert!(at_a.is_some() && at_b.is_some() && at_a < at_b, "both, in order: {text}");
    }

    #[tokio::test]
    async fn unavailable_moves_on_to_the_next_address_and_other_answers_are_final() {
        let (a, b) = (closed(), closed());
        let api = control_plane(&format!("http://{a},http://{b}"));
        let unavailable = || anyhow::Error::new(tonic::Status::unavailable("draining"));
        api.failed(unavailable()).await.expect("b is left to try");
        let error = api.failed(unavailable()).await.expect_err("no address left");
        let text = error.to_string();
        assert!(text.contains(&format!("http://{a}: the control plane is unavailable: draining")), "{text}");
        assert!(text.contains(&format!("http://{b}: the control plane is unavailable: draining")), "{text}");

        let api = control_plane(&format!("http://{a},http://{b}"));
        let error = api.failed(anyhow::Error::new(tonic::Status::not_found("no such instance"))).await.expect_err("final");
        assert_eq!(error.downcast_ref::<tonic::Status>().map(tonic::Status::code), Some(tonic::Code::NotFound));

        let api = control_plane(&format!("http://{a}"));
        let error = api.failed(unavailable()).await.expect_err("the only address");
        assert!(error.downcast_ref::<tonic::Status>().is_some(), "a single address's own error: {error}");
    }
}
