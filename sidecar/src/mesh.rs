//! What the sidecar holds of the mesh's trust: its workload certificate, the trust bundle, and
//! the authorization policy of its own service, each replaced whole when a new one arrives.
//!
//! The TLS configs are built from these: the inbound listener's (rebuilt when the bundle
//! changes, so sessions resumed under an older bundle are not), and one per endpoint and
//! protocol on the calling side, each requiring the identity the control plane said the
//! endpoint has.

use ferry_runtime::lock;
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwapOption;
use ferry_proto::{authz::Authorization, v1, validate};
use ferry_tls::{Credentials, Issued, Trust, TrustBundle};
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

/// How the inbound listener takes connections (`--mtls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MtlsMode {
    /// Only mTLS from a valid mesh identity.
    #[default]
    Strict,
    /// mTLS, and plaintext too (told apart by the first bytes), to mesh a service gradually.
    Permissive,
    /// Plaintext only: callers are told to reach this instance without TLS.
    Off,
}

impl MtlsMode {
    /// Its name, as the flag takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
            Self::Off => "off",
        }
    }
}

/// The sidecar's trust state. Cheap to clone.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    credentials: Credentials,
    trust: Trust,
    mode: MtlsMode,
    authorization: ArcSwapOption<Authorization>,
    /// The authorization update last applied, as pushed.
    authorization_update: Mutex<Option<v1::AuthorizationUpdate>>,
    /// The bundle last applied, as pushed.
    bundle: Mutex<Option<v1::TrustBundle>>,
    /// The inbound config and the bundle version it was built for.
    server_config: Mutex<Option<(u64, Arc<ServerConfig>)>>,
    /// Bumped by every change: renewals, bundles, policies.
    changed: watch::Sender<u64>,
    renewal: Mutex<Renewal>,
    /// When the leaf in force was received (renewals are timed from it).
    received_at: AtomicU64,
}

/// How renewals go, for `/config` and `/ready`.
#[derive(Debug, Clone, Default)]
pub struct Renewal {
    /// When the next renewal is due.
    pub due: Option<SystemTime>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    pub renewals: u64,
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// A trust bundle as pushed, checked.
pub fn check_bundle(bundle: &v1::TrustBundle) -> Result<TrustBundle, String> {
    TrustBundle::from_pem(&bundle.trust_domain, &bundle.roots_pem, &bundle.issuer_pem, bundle.version)
}

/// An authorization update as pushed, checked and compiled: `None` when the service has no
/// policy.
pub fn check_authorization(update: &v1::AuthorizationUpdate) -> Result<Option<Arc<Authorization>>, String> {
    let Some(policy) = &update.policy else { return Ok(None) };
    validate::authorization(policy).map_err(|e| e.to_string())?;
    Authorization::compile(policy, update.version).map(|a| Some(Arc::new(a)))
}

impl Mesh {
    /// Empty trust, serving inbound connections as `mode` says.
    pub fn new(mode: MtlsMode) -> Self {
        Self {
            inner: Arc::new(Inner {
                credentials: Credentials::default(),
                trust: Trust::default(),
                mode,
                authorization: ArcSwapOption::empty(),
                authorization_update: Mutex::default(),
                bundle: Mutex::default(),
                server_config: Mutex::default(),
                changed: watch::Sender::new(0),
                renewal: Mutex::default(),
                received_at: AtomicU64::new(0),
            }),
        }
    }

    /// `--mtls`.
    pub fn mode(&self) -> MtlsMode {
        self.inner.mode
    }

    /// The credentials presented in handshakes.
    pub fn credentials(&self) -> &Credentials {
        &self.inner.credentials
    }

    /// The trust bundle in force.
    pub fn trust(&self) -> &Trust {
        &self.inner.trust
    }

    /// Sees every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Puts a checked bundle in force, unless an equal or newer one is.
    pub fn set_bundle(&self, pushed: &v1::TrustBundle, bundle: TrustBundle) {
        {
            let mut current = lock(&self.inner.bundle);
            if current.as_ref().is_some_and(|b| b.version >= pushed.version && *b == *pushed) {
                return;
            }
            *current = Some(pushed.clone());
        }
        self.inner.trust.set(bundle);
        self.bump();
    }

    /// The bundle in force, as pushed.
    pub fn bundle(&self) -> Option<v1::TrustBundle> {
        lock(&self.inner.bundle).clone()
    }

    /// Puts a checked authorization policy in force.
    pub fn set_authorization(&self, update: &v1::AuthorizationUpdate, compiled: Option<Arc<Authorization>>) {
        self.inner.authorization.store(compiled);
        *lock(&self.inner.authorization_update) = Some(update.clone());
        self.bump();
    }

    /// The policy of this sidecar's own service; `None` when it has none.
    pub fn authorization(&self) -> Option<Arc<Authorization>> {
        self.inner.authorization.load_full()
    }

    /// The authorization update in force, as pushed.
    pub fn authorization_update(&self) -> Option<v1::AuthorizationUpdate> {
        lock(&self.inner.authorization_update).clone()
    }

    /// Presents `issued` from the next handshake on.
    pub fn set_identity(&self, issued: Issued) {
        self.inner.received_at.store(seconds(SystemTime::now()), Ordering::Relaxed);
        self.inner.credentials.set(issued);
        self.bump();
    }

    /// The leaf in force.
    pub fn identity(&self) -> Option<Arc<Issued>> {
        self.inner.credentials.current()
    }

    /// When the leaf in force was received.
    pub fn received_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(self.inner.received_at.load(Ordering::Relaxed))
    }

    /// Records how renewals go.
    pub fn update_renewal(&self, f: impl FnOnce(&mut Renewal)) {
        f(&mut lock(&self.inner.renewal));
    }

    /// How renewals go.
    pub fn renewal(&self) -> Renewal {
        lock(&self.inner.renewal).clone()
    }

    /// Why the sidecar cannot take part in mTLS, if it cannot: no leaf, or one that has expired.
    pub fn not_ready(&self) -> Option<String> {
        let why = match self.identity() {
            None => "no workload certificate from the control plane yet".to_owned(),
            Some(issued) if issued.expired(SystemTime::now()) => {
                format!(
                    "its workload certificate expired and no renewal succeeded{}",
                    match self.renewal().last_error {
                        Some(error) => format!(" ({error})"),
                        None => String::new(),
                    }
                )
            }
            Some(_) if self.inner.trust.current().is_none() => "no trust bundle from the control plane yet".to_owned(),
            Some(_) => return None,
        };
        Some(why)
    }

    /// The inbound listener's TLS config, once there is a bundle to verify callers with.
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        let bundle = self.inner.trust.current()?;
        let mut cached = lock(&self.inner.server_config);
        match &*cached {
            Some((version, config)) if *version == bundle.version => Some(config.clone()),
            _ => {
                let config = ferry_tls::mesh::server_config(&self.inner.credentials, &self.inner.trust)
                    .map_err(|error| tracing::error!(%error, "cannot build the inbound TLS config"))
                    .ok()?;
                *cached = Some((bundle.version, config.clone()));
                Some(config)
            }
        }
    }

    /// A calling config for an endpoint that must prove `expected`, speaking `alpn`.
    pub fn client_config(&self, expected: Arc<str>, alpn: &[u8]) -> Result<Arc<ClientConfig>, String> {
        ferry_tls::mesh::client_config(&self.inner.credentials, &self.inner.trust, expected, alpn).map_err(|e| e.to_string())
    }
}
