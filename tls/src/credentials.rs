//! A workload's credentials: its current leaf (with the issuer chain) and private key.
//!
//! [`Credentials`] is the certificate resolver of both the serving and the calling side. A
//! renewal swaps the whole [`Issued`] at once: handshakes from then on present the new leaf,
//! while connections already open keep running on the one they negotiated.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwapOption;
use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    pki_types::{CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{Identity, pem};

/// One issued leaf and its key, ready to present.
#[derive(Debug)]
pub struct Issued {
    pub certified: Arc<CertifiedKey>,
    pub identity: Identity,
    /// The leaf's serial number, hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The leaf then its issuer, PEM.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM: kept only in memory, or in the sidecar's own state file
    /// (mode 0600) when it has one.
    pub key_pem: String,
}

impl Issued {
    /// Credentials from a chain (leaf first) and its key, both PEM.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, String> {
        let chain = pem::certificates(chain_pem).map_err(|e| format!("certificate: {e}"))?;
        let key = pem::private_key(key_pem).map_err(|e| format!("key: {e}"))?;
        Self::new(chain, key, chain_pem.to_owned(), key_pem.to_owned())
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        chain_pem: String,
        key_pem: String,
    ) -> Result<Self, String> {
        let leaf = chain.first().ok_or("certificate: the chain is empty")?;
        let identity = Identity::of_certificate(leaf).map_err(|e| format!("certificate: {e}"))?;
        let (serial, not_before, not_after) = validity(leaf).ok_or("certificate: unreadable validity")?;
        let signing = crate::provider().key_provider.load_private_key(key).map_err(|e| format!("key: {e}"))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| format!("the key does not match the certificate: {e}"))?;
        Ok(Self { certified: Arc::new(certified), identity, serial, not_before, not_after, chain_pem, key_pem })
    }

    /// How long it was issued for.
    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Whether it has expired at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The DER of its issuer (the second certificate of the chain), if the chain has one.
    pub fn issuer(&self) -> Option<&CertificateDer<'static>> {
        self.certified.cert.get(1)
    }
}

fn validity(der: &CertificateDer<'_>) -> Option<(String, SystemTime, SystemTime)> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let serial = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect::<String>();
    let at = |t: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?));
    Some((serial, at(cert.validity().not_before.timestamp())?, at(cert.validity().not_after.timestamp())?))
}

/// The credentials in force. Cheap to clone; clones see the same renewals.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    current: Arc<ArcSwapOption<Issued>>,
}

impl Credentials {
    /// The leaf in force, if one was issued.
    pub fn current(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }

    /// Presents `issued` in every handshake from now on.
    pub fn set(&self, issued: Issued) {
        self.current.store(Some(Arc::new(issued)));
    }

    fn presentable(&self) -> Option<Arc<CertifiedKey>> {
        let issued = self.current.load();
        let issued = issued.as_ref()?;
        // An expired leaf would only be refused by the peer: better no handshake than a
        // misleading one.
        (!issued.expired(SystemTime::now())).then(|| issued.certified.clone())
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.presentable()
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.presentable()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}
