//! A workload's identity: the URI SAN `spiffe://<trust-domain>/service/<service>` of its leaf.

use std::fmt;

use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The trust domain of a mesh whose control plane was not told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "ferry.local";

/// A SPIFFE identity of the form `spiffe://<trust-domain>/service/<service>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub service: String,
}

/// Why a text or a certificate holds no mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not spiffe://<trust-domain>/service/<name>")]
    Malformed(String),
    #[error("the certificate cannot be read: {0}")]
    Unreadable(String),
    #[error("the certificate carries no spiffe:// URI")]
    Missing,
}

impl Identity {
    /// The identity of `service` in `trust_domain`.
    pub fn new(trust_domain: impl Into<String>, service: impl Into<String>) -> Self {
        Self { trust_domain: trust_domain.into(), service: service.into() }
    }

    /// Parses `spiffe://<trust-domain>/service/<service>`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let malformed = || IdentityError::Malformed(uri.chars().take(256).collect());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(malformed)?;
        let service = path.strip_prefix("service/").ok_or_else(malformed)?;
        let label = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        };
        if !label(trust_domain) || !label(service) || service.contains('.') {
            return Err(malformed());
        }
        Ok(Self::new(trust_domain, service))
    }

    /// The identity a certificate (DER) proves: its first `spiffe://` URI SAN.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| IdentityError::Unreadable(e.to_string()))?;
        let san = cert.subject_alternative_name().map_err(|e| IdentityError::Unreadable(e.to_string()))?;
        let uri = san
            .into_iter()
            .flat_map(|san| san.value.general_names.iter())
            .find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
                _ => None,
            })
            .ok_or(IdentityError::Missing)?;
        Self::parse(uri)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/service/{}", self.trust_domain, self.service)
    }
}

/// Checks a trust domain as `--trust-domain` takes it: a lowercase DNS name.
pub fn check_trust_domain(domain: &str) -> Result<(), String> {
    if !ferry_proto::validate::lowercase_dns_name(domain) {
        return Err(format!("{domain:?} must be a lowercase DNS name such as ferry.local"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_read_as_they_print() {
        let id = Identity::new("ferry.local", "catalog");
        assert_eq!(id.to_string(), "spiffe://ferry.local/service/catalog");
        assert_eq!(Identity::parse(&id.to_string()), Ok(id));
        for bad in
            ["http://ferry.local/service/a", "spiffe://ferry.local/ns/a", "spiffe://ferry.local/service/", "spiffe:///service/a"]
        {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
        assert!(check_trust_domain("ferry.local").is_ok());
        assert!(check_trust_domain("Ferry").is_err());
    }
}
