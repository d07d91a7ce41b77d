//! The rustls configs of sidecar-to-sidecar mTLS.
//!
//! TLS 1.3 only; both sides present their leaf with its issuer. ALPN carries what the
//! connection carries: `h2`, `http/1.1`, or [`ALPN_TCP`] for opaque TCP. The serving side
//! presents its certificate whatever SNI and ALPN the client sends (so `openssl s_client`
//! shows it), and resumes sessions from a cache, which the per-worker connection pools of the
//! callers make the common case.

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig, client::Resumption, pki_types::ServerName, server::ServerSessionMemoryCache};

use crate::{
    Credentials, Identity, Trust,
    verify::{MeshClientVerifier, PeerVerifier},
};

/// ALPN of HTTP/2 (and gRPC).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN of an opaque TCP connection relayed byte for byte to the app.
pub const ALPN_TCP: &[u8] = b"ferry/tcp";

/// Sessions the serving side keeps for resumption.
const SERVER_SESSIONS: usize = 4096;
/// Sessions a calling config keeps (one config per endpoint and protocol).
const CLIENT_SESSIONS: usize = 16;

/// What a serving config cannot be built without.
#[derive(Debug, thiserror::Error)]
#[error("building the TLS config: {0}")]
pub struct ConfigError(#[from] rustls::Error);

/// The serving side's config: presents `credentials`, requires a client certificate that
/// chains to the bundle in `trust`.
pub fn server_config(credentials: &Credentials, trust: &Trust) -> Result<Arc<ServerConfig>, ConfigError> {
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(MeshClientVerifier::new(trust.clone())))
        .with_cert_resolver(Arc::new(credentials.clone()));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SERVER_SESSIONS);
    Ok(Arc::new(config))
}

/// The calling side's config for one endpoint and protocol: presents `credentials`, and
/// requires the server to prove `expected` (`spiffe://...`).
pub fn client_config(
    credentials: &Credentials,
    trust: &Trust,
    expected: Arc<str>,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, ConfigError> {
    let mut config = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier::new(trust.clone(), expected)))
        .with_client_cert_resolver(Arc::new(credentials.clone()));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = Resumption::in_memory_sessions(CLIENT_SESSIONS);
    Ok(Arc::new(config))
}

/// The SNI a caller sends for an endpoint that must prove `expected`: a DNS form of the
/// identity (`catalog.ferry.local`). The serving side ignores it; it keys session resumption.
pub fn server_name(expected: &str) -> ServerName<'static> {
    let name = Identity::parse(expected).map(|id| format!("{}.{}", id.service, id.trust_domain));
    name.ok()
        .and_then(|name| ServerName::try_from(name).ok())
        .unwrap_or_else(|| ServerName::try_from("ferry.mesh").expect("a valid DNS name"))
}
