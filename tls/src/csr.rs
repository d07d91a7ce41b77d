//! Key pairs and certificate signing requests. A workload makes its own ECDSA P-256 key and
//! sends only the CSR: the control plane never sees a private key.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

/// A fresh key pair and a CSR over it.
#[derive(Debug)]
pub struct Request {
    /// The CSR, PEM.
    pub csr_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// Makes a key pair and a CSR for `service`. The control plane sets the identity it signs;
/// the subject's common name only helps a person reading the CSR.
pub fn request(service: &str) -> Result<Request, rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, service);
    params.distinguished_name = name;
    let csr = params.serialize_request(&key)?;
    Ok(Request { csr_pem: csr.pem()?, key_pem: key.serialize_pem() })
}
