//! Issuing certificates: roots, issuers, workload leaves from CSRs, and API server leaves.
//!
//! Every key is ECDSA P-256. A root is self-signed; an issuer is a CA signed by a root and
//! constrained to sign leaves only; a workload leaf carries its SPIFFE identity as its only
//! SAN, is good for both TLS client and server authentication, and never outlives its issuer.
//! Storage, rotation and policy are the control plane's; this module only signs.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::{Identity, pem};

/// How far back a leaf's validity starts, for peers whose clocks run a little behind.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// A CA certificate and its key, PEM.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CaPair").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the certificate signing request: {0}")]
    Csr(String),
    #[error("the issuer: {0}")]
    Issuer(String),
    #[error("signing: {0}")]
    Signing(#[from] rcgen::Error),
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and never shortened by a leading zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Ferry");
    name.push(DnType::CommonName, common_name);
    name
}

fn ca_params(common_name: &str, now: SystemTime, lifetime: Duration, path_length: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(match path_length {
        Some(length) => BasicConstraints::Constrained(length),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = true;
    params
}

/// A new self-signed root for `trust_domain`, valid for `lifetime`.
pub fn new_root(trust_domain: &str, now: SystemTime, lifetime: Duration) -> Result<CaPair, IssueError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(&format!("Ferry root CA {trust_domain}"), now, lifetime, None);
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key)?;
    Ok(CaPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A new issuer signed by `root`, valid for `lifetime` (never past the root).
pub fn new_issuer(root: &CaPair, trust_domain: &str, now: SystemTime, lifetime: Duration) -> Result<CaPair, IssueError> {
    let root_key = KeyPair::from_pem(&root.key_pem).map_err(|e| IssueError::Issuer(format!("root key: {e}")))?;
    let root_end = not_after(&root.cert_pem).map_err(IssueError::Issuer)?;
    let issuer = Issuer::from_ca_cert_pem(&root.cert_pem, root_key).map_err(|e| IssueError::Issuer(format!("root: {e}")))?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let lifetime = lifetime.min(root_end.duration_since(now).unwrap_or_default());
    let params = ca_params(&format!("Ferry issuer {trust_domain}"), now, lifetime, Some(0));
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CaPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The end of a PEM certificate's validity.
pub fn not_after(cert_pem: &str) -> Result<SystemTime, String> {
    let cert = pem::certificates(cert_pem)?.remove(0);
    crate::verify::not_after(&cert).ok_or_else(|| "cannot read the certificate's validity".into())
}

/// A leaf issued to a workload.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf then its issuer, PEM.
    pub chain_pem: String,
    pub not_after: SystemTime,
    /// Its serial number, hex.
    pub serial: String,
}

/// Signs the public key of `csr_pem` for `identity`, valid until `now + ttl` or the issuer's
/// end, whichever is first. The CSR's subject and extensions are ignored: its signature proves
/// that whoever asks holds the key, and the identity is the caller's to decide.
pub fn sign_workload(
    issuer: &CaPair,
    csr_pem: &str,
    identity: &Identity,
    now: SystemTime,
    ttl: Duration,
) -> Result<Leaf, IssueError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| IssueError::Csr(e.to_string()))?;
    let uri = identity.to_string().try_into().map_err(|e: rcgen::Error| IssueError::Csr(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&identity.service);
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    sign_leaf(issuer, params, &csr.public_key, now, ttl)
}

/// A key and leaf for the API listeners, covering `names` (DNS names and IP addresses).
pub fn api_server(issuer: &CaPair, names: &[String], now: SystemTime, ttl: Duration) -> Result<(Leaf, String), IssueError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(names.first().map_or("ferry-control-plane", String::as_str));
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let leaf = sign_leaf(issuer, params, &key, now, ttl)?;
    Ok((leaf, key.serialize_pem()))
}

fn sign_leaf(
    issuer: &CaPair,
    mut params: CertificateParams,
    public_key: &impl rcgen::PublicKeyData,
    now: SystemTime,
    ttl: Duration,
) -> Result<Leaf, IssueError> {
    let issuer_key = KeyPair::from_pem(&issuer.key_pem).map_err(|e| IssueError::Issuer(format!("key: {e}")))?;
    let issuer_end = not_after(&issuer.cert_pem).map_err(IssueError::Issuer)?;
    let signer = Issuer::from_ca_cert_pem(&issuer.cert_pem, issuer_key).map_err(|e| IssueError::Issuer(e.to_string()))?;
    let end = (now + ttl).min(issuer_end);
    params.not_before = (now - BACKDATE).into();
    params.not_after = end.into();
    let serial = serial();
    let hex = serial.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    params.serial_number = Some(serial);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(public_key, &signer)?;
    let chain_pem = format!("{}{}", cert.pem(), issuer.cert_pem);
    Ok(Leaf { chain_pem, not_after: end, serial: hex })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::UnixTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{Credentials, Issued, Trust, TrustBundle, csr, mesh, verify};

    struct Mesh {
        root: CaPair,
        issuer: CaPair,
        trust: Trust,
    }

    fn mesh() -> Mesh {
        let now = SystemTime::now();
        let root = new_root("ferry.local", now, Duration::from_secs(3600)).expect("root");
        let issuer = new_issuer(&root, "ferry.local", now, Duration::from_secs(1800)).expect("issuer");
        let bundle = TrustBundle::from_pem("ferry.local", &root.cert_pem, &issuer.cert_pem, 1).expect("bundle");
        Mesh { root, issuer, trust: Trust::new(bundle) }
    }

    fn workload(mesh: &Mesh, service: &str, ttl: Duration) -> Credentials {
        let request = csr::request(service).expect("csr");
        let identity = Identity::new("ferry.local", service);
        let leaf = sign_workload(&mesh.issuer, &request.csr_pem, &identity, SystemTime::now(), ttl).expect("signed");
        let credentials = Credentials::default();
        credentials.set(Issued::from_pem(&leaf.chain_pem, &request.key_pem).expect("issued"));
        credentials
    }

    /// A full handshake over an in-memory pipe: the server's identity as the client saw it
    /// (or the client's error), and the client's identity as the server saw it.
    async fn handshake(mesh: &Mesh, server: &Credentials, client: &Credentials, expected: &str) -> Result<Identity, String> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = tokio_rustls::TlsAcceptor::from(mesh::server_config(server, &mesh.trust).expect("server config"));
        let serving = tokio::spawn(async move {
            let accepted = acceptor.accept(b).await;
            let mut stream = accepted.map_err(|e| verify::explain_io(&e).unwrap_or_else(|| e.to_string()))?;
            let peer = stream.get_ref().1.peer_certificates().and_then(|c| c.first().cloned()).ok_or("no peer certificate")?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Identity::of_certificate(&peer).map_err(|e| e.to_string())
        });
        let config = mesh::client_config(client, &mesh.trust, Arc::from(expected), mesh::ALPN_H2).expect("client config");
        let connector = tokio_rustls::TlsConnector::from(config);
        let connected = connector.connect(mesh::server_name(expected), a).await;
        let mut stream = connected.map_err(|e| format!("client: {}", verify::explain_io(&e).unwrap_or_else(|| e.to_string())))?;
        stream.write_all(b"x").await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())?;
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(mesh::ALPN_H2));
        serving.await.expect("joined")
    }

    #[tokio::test]
    async fn sidecars_prove_their_service_to_each_other() {
        let mesh = mesh();
        let catalog = workload(&mesh, "catalog", Duration::from_secs(600));
        let frontend = workload(&mesh, "frontend", Duration::from_secs(600));
        let seen = handshake(&mesh, &catalog, &frontend, "spiffe://ferry.local/service/catalog").await.expect("handshake");
        assert_eq!(seen, Identity::new("ferry.local", "frontend"), "the server learns who calls");

        let error =
            handshake(&mesh, &catalog, &frontend, "spiffe://ferry.local/service/inventory").await.expect_err("wrong peer");
        assert!(
            error.contains("the peer is spiffe://ferry.local/service/catalog, not spiffe://ferry.local/service/inventory"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_leaf_from_another_root_or_none_at_all_is_refused() {
        let mesh = mesh();
        let other = self::mesh();
        let catalog = workload(&mesh, "catalog", Duration::from_secs(600));
        let stranger = workload(&other, "frontend", Duration::from_secs(600));
        let error =
            handshake(&mesh, &catalog, &stranger, "spiffe://ferry.local/service/catalog").await.expect_err("unknown root");
        assert!(error.contains("not signed by a root of this mesh"), "{error}");
        let nobody = Credentials::default();
        assert!(handshake(&mesh, &catalog, &nobody, "spiffe://ferry.local/service/catalog").await.is_err(), "no client cert");
    }

    #[test]
    fn leaves_carry_the_identity_and_never_outlive_their_issuer() {
        let mesh = mesh();
        let request = csr::request("catalog").expect("csr");
        let identity = Identity::new("ferry.local", "catalog");
        let now = SystemTime::now();
        let leaf = sign_workload(&mesh.issuer, &request.csr_pem, &identity, now, Duration::from_secs(86_400)).expect("signed");
        let issuer_end = not_after(&mesh.issuer.cert_pem).expect("issuer end");
        assert!(leaf.not_after <= issuer_end, "capped at the issuer's end");
        let chain = pem::certificates(&leaf.chain_pem).expect("chain");
        assert_eq!(chain.len(), 2, "the leaf and its issuer, not the root");
        assert_eq!(Identity::of_certificate(&chain[0]).expect("identity"), identity);
        let bundle = mesh.trust.current().expect("bundle");
        let usage = webpki::KeyUsage::client_auth();
        let verified = verify::verify_chain(&bundle, &chain[0], &chain[1..], UnixTime::now(), usage).expect("verifies");
        assert_eq!(verified, identity);
        assert!(sign_workload(&mesh.issuer, "not a csr", &identity, now, Duration::from_secs(60)).is_err());
        assert_ne!(mesh.root.cert_pem, mesh.issuer.cert_pem);
    }
}
