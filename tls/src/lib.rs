//! Ferry's trust plumbing, shared by the control plane, the sidecar and `ferryctl`.
//!
//! - [`identity`]: a workload's SPIFFE identity, `spiffe://<trust-domain>/service/<service>`,
//!   and how it is read from a certificate.
//! - [`bundle`]: the mesh's roots of trust, as the control plane pushes them, and [`Trust`],
//!   the current bundle that verifiers read on every handshake.
//! - [`verify`]: certificate chains checked against the bundle, and the identity the peer
//!   proves compared with the one the caller meant to reach.
//! - [`credentials`]: a workload's leaf and key, swapped in place when renewed, so new
//!   handshakes use the new certificate while open connections keep theirs.
//! - [`mesh`]: the rustls configs of sidecar-to-sidecar mTLS (TLS 1.3 only) and their ALPN values.
//! - [`authority`]: signing roots, issuers and leaves (the control plane's CA keeps and rotates them).
//! - [`csr`]: key pairs and certificate signing requests: a private key never leaves its process.
//! - [`api`]: clients of the control plane's APIs over TLS with a bearer token.
//!
//! Every config is built on the `aws-lc-rs` provider explicitly (post-quantum hybrid key exchange
//! first), so no process-wide default is needed.

#![forbid(unsafe_code)]

use std::sync::Arc;

pub mod api;
pub mod authority;
pub mod bundle;
pub mod credentials;
pub mod csr;
pub mod identity;
pub mod mesh;
pub mod pem;
pub mod verify;

pub use self::{
    bundle::{Trust, TrustBundle},
    credentials::{Credentials, Issued},
    identity::Identity,
};

/// The crypto provider of every TLS config Ferry builds: one, shared.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    PROVIDER.clone()
}

/// Whether the first bytes of a connection are a TLS handshake record (a ClientHello): the way
/// a listener that accepts both tells TLS from plaintext, without consuming anything.
pub fn is_tls_handshake(first: &[u8]) -> bool {
    first.first() == Some(&0x16)
}
