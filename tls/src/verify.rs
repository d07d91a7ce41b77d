//! Certificate verification for mesh mTLS.
//!
//! Both ends check the peer's chain against the trust bundle in force ([`Trust`]). A mesh leaf
//! names no host: what it proves is a SPIFFE identity, so the calling side checks that identity
//! against the one the control plane said the endpoint has ([`PeerVerifier`]); a stolen address
//! cannot impersonate a service. The serving side accepts any valid mesh identity of its trust
//! domain ([`MeshClientVerifier`]) and leaves who may call what to authorization.

use std::{fmt, sync::Arc, time::SystemTime};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use x509_parser::prelude::FromDer;

use crate::{Identity, Trust, bundle::TrustBundle};

/// The peer proved an identity other than the one expected.
#[derive(Debug, thiserror::Error)]
#[error("the peer is {got}, not {expected}")]
pub struct WrongIdentity {
    pub expected: String,
    pub got: String,
}

/// The peer's certificate names no identity of this mesh's trust domain.
#[derive(Debug, thiserror::Error)]
#[error("the peer's certificate holds no identity of trust domain {trust_domain}: {why}")]
pub struct NoMeshIdentity {
    pub trust_domain: String,
    pub why: String,
}

/// No trust bundle has arrived yet, so no peer can be verified.
#[derive(Debug, thiserror::Error)]
#[error("no trust bundle from the control plane yet")]
pub struct NoTrustBundle;

fn other(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    crate::provider().signature_verification_algorithms
}

/// Checks that `end_entity` chains through `intermediates` to a root of `bundle`, is valid
/// `now`, and allows `usage`; returns the identity it proves.
pub fn verify_chain(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<Identity, Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| other(Webpki(e)))?;
    cert.verify_for_usage(algorithms().all, bundle.anchors(), intermediates, now, usage, None, None).map_err(|e| match e {
        // A chain that names one of our roots but is not signed by it comes from another
        // mesh with the same names: as unknown as any other stranger.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
        }
        webpki::Error::CertExpired { .. } => Error::InvalidCertificate(CertificateError::Expired),
        webpki::Error::CertNotValidYet { .. } => Error::InvalidCertificate(CertificateError::NotValidYet),
        other_error => other(Webpki(other_error)),
    })?;
    let identity = Identity::of_certificate(end_entity)
        .map_err(|e| other(NoMeshIdentity { trust_domain: bundle.trust_domain.clone(), why: e.to_string() }))?;
    if identity.trust_domain != bundle.trust_domain {
        return Err(other(NoMeshIdentity { trust_domain: bundle.trust_domain.clone(), why: format!("it is {identity}") }));
    }
    Ok(identity)
}

/// A webpki error, as an error type rustls can carry.
#[derive(Debug)]
struct Webpki(webpki::Error);

impl fmt::Display for Webpki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for Webpki {}

/// The calling side's verifier: the server must prove `expected`.
#[derive(Debug)]
pub struct PeerVerifier {
    trust: Trust,
    expected: Arc<str>,
}

impl PeerVerifier {
    /// A verifier of peers that must prove `expected` (`spiffe://...`).
    pub fn new(trust: Trust, expected: Arc<str>) -> Self {
        Self { trust, expected }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let bundle = self.trust.current().ok_or_else(|| other(NoTrustBundle))?;
        let identity = verify_chain(&bundle, end_entity, intermediates, now, webpki::KeyUsage::server_auth())?;
        let got = identity.to_string();
        if *got != *self.expected {
            return Err(other(WrongIdentity { expected: self.expected.to_string(), got }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The serving side's verifier: a client certificate is required, and any valid identity of the
/// mesh is accepted.
#[derive(Debug)]
pub struct MeshClientVerifier {
    trust: Trust,
}

impl MeshClientVerifier {
    /// A verifier against the bundle in force in `trust`.
    pub fn new(trust: Trust) -> Self {
        Self { trust }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let bundle = self.trust.current().ok_or_else(|| other(NoTrustBundle))?;
        verify_chain(&bundle, end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// A TLS error in words: the mesh's own refusals (a wrong identity, a stranger's certificate)
/// say what they are instead of rustls's debug form.
pub fn explain(error: &Error) -> String {
    match error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.to_string(),
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the peer's certificate is not signed by a root of this mesh's trust bundle".to_owned()
        }
        Error::InvalidCertificate(CertificateError::Expired) => "the peer's certificate has expired".to_owned(),
        Error::NoCertificatesPresented => "the peer presented no certificate".to_owned(),
        other => other.to_string(),
    }
}

/// The TLS error somewhere in an I/O error's sources, in words; `None` when there is none.
pub fn explain_io(error: &std::io::Error) -> Option<String> {
    let inner = error.get_ref()?;
    inner.downcast_ref::<Error>().map(explain)
}

/// What a certificate says of itself, for status pages: its serial (hex), and the end of its
/// validity.
pub fn describe(der: &CertificateDer<'_>) -> Option<(String, SystemTime)> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let serial = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect::<String>();
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some((serial, SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(not_after)))
}

/// The end of a certificate's validity, for the peer check of resumed sessions.
pub fn not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    describe(der).map(|(_, not_after)| not_after)
}
