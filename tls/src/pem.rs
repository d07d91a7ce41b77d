//! PEM in and out.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Every certificate of a PEM text, in order; an error names what is wrong.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(certs)
}

/// The private key of a PEM text (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("not a PEM private key: {e}"))
}

/// A certificate as PEM.
pub fn certificate_pem(der: &CertificateDer<'_>) -> String {
    encode("CERTIFICATE", der.as_ref())
}

/// `bytes` as a PEM block labelled `label`.
pub fn encode(label: &str, bytes: &[u8]) -> String {
    ::pem::encode_config(&::pem::Pem::new(label, bytes), ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let der = CertificateDer::from((0u8..=200).collect::<Vec<u8>>());
        let pem = certificate_pem(&der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n") && pem.ends_with("-----END CERTIFICATE-----\n"));
        assert_eq!(certificates(&pem).expect("parses"), vec![der]);
        assert!(certificates("nothing").is_err());
    }
}
