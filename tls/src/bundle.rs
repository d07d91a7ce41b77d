//! The mesh's roots of trust: the bundle the control plane pushes to every sidecar, and
//! [`Trust`], the bundle in force that every handshake reads.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::pki_types::{CertificateDer, TrustAnchor};

use crate::pem;

/// One version of the trust bundle, parsed.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    pub trust_domain: String,
    /// The roots, oldest first.
    pub roots: Vec<CertificateDer<'static>>,
    pub roots_pem: String,
    /// The certificate that signs new leaves; a leaf signed by another is renewed.
    pub issuer: Option<CertificateDer<'static>>,
    pub issuer_pem: String,
    pub version: u64,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// A bundle from its PEM parts; an error says which part is wrong.
    pub fn from_pem(trust_domain: &str, roots_pem: &str, issuer_pem: &str, version: u64) -> Result<Self, String> {
        crate::identity::check_trust_domain(trust_domain).map_err(|e| format!("trust_domain: {e}"))?;
        let roots = pem::certificates(roots_pem).map_err(|e| format!("roots_pem: {e}"))?;
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(i, root)| {
                webpki::anchor_from_trusted_cert(root).map(|a| a.to_owned()).map_err(|e| format!("roots_pem: root {i}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let issuer = if issuer_pem.trim().is_empty() {
            None
        } else {
            Some(pem::certificates(issuer_pem).map_err(|e| format!("issuer_pem: {e}"))?.remove(0))
        };
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            roots,
            roots_pem: roots_pem.to_owned(),
            issuer,
            issuer_pem: issuer_pem.to_owned(),
            version,
            anchors,
        })
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The roots as a rustls root store, for clients verifying a server's host name.
    pub fn root_store(&self) -> rustls::RootCertStore {
        rustls::RootCertStore { roots: self.anchors.clone() }
    }
}

/// The bundle in force, shared by every verifier and swapped whole when a new one arrives.
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    current: Arc<ArcSwapOption<TrustBundle>>,
}

impl Trust {
    /// A trust holding `bundle`.
    pub fn new(bundle: TrustBundle) -> Self {
        let trust = Self::default();
        trust.set(bundle);
        trust
    }

    /// The bundle in force, if one arrived.
    pub fn current(&self) -> Option<Arc<TrustBundle>> {
        self.current.load_full()
    }

    /// Puts `bundle` in force for every handshake from now on.
    pub fn set(&self, bundle: TrustBundle) {
        self.current.store(Some(Arc::new(bundle)));
    }
}
