//! Clients of the control plane's APIs: `https://` verified against the mesh's roots (the
//! `ca.pem` the control plane writes, `--ca-file`), and a bearer token on every call.
//!
//! A failure to connect is explained in words where the cause is a common mistake: a
//! plaintext URL for a TLS listener (the control plane answers that itself), a TLS URL for a
//! plaintext one, or a CA file that does not hold the mesh's root.
//!
//! Several control-plane replicas are a list of URLs ([`ControlPlaneUrls`]), each resolved into
//! addresses to dial ([`Target`]); [`Access::endpoint_at`] dials one of them.

mod urls;

use std::{error::Error as StdError, net::SocketAddr, sync::Arc};

use rustls::ClientConfig;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

/// How to reach the control plane's API.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `https://HOST:PORT`, or `http://` for a control plane with `--api-tls off`.
    pub url: String,
    /// The PEM roots that verify the API's certificate, for `https://` URLs.
    pub ca_pem: Option<String>,
    /// The bearer secret, for a control plane with `--auth token`.
    pub token: Option<String>,
}

/// Why the API cannot be reached as asked.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{url:?} is not a URL: {why}")]
    BadUrl { url: String, why: String },
    #[error(
        "{url} speaks TLS, and nothing says which root to trust: give the CA file (--ca-file, FERRY_CA_FILE), the ca.pem the control plane writes in its data directory"
    )]
    NoCaFile { url: String },
    #[error("the CA file: {0}")]
    BadCa(String),
    #[error("the token holds characters a header cannot carry")]
    BadToken,
}

pub use self::urls::{ControlPlaneUrl, ControlPlaneUrls, MAX_URLS, Resolved, Target};

/// Adds `authorization: Bearer <secret>` to every call.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.write_str(if self.0.is_some() { "Bearer(..)" } else { "Bearer(none)" })
    }
}

impl Bearer {
    /// A bearer of `token`, or of nothing.
    pub fn new(token: Option<&str>) -> Result<Self, AccessError> {
        match token {
            Some(token) => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {}", token.trim()).parse().map_err(|_| AccessError::BadToken)?;
                value.set_sensitive(true);
                Ok(Self(Some(value)))
            }
            None => Ok(Self(None)),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to the API that sends the token with every call.
pub type ApiChannel = InterceptedService<Channel, Bearer>;

impl Access {
    /// The endpoint, with TLS set up for an `https://` URL.
    pub fn endpoint(&self) -> Result<Endpoint, AccessError> {
        let uri = self.uri()?;
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| self.bad_url(e.to_string()))?;
        self.secure(endpoint, &uri, None)
    }

    /// The endpoint that dials `addr`, one address the URL's host resolved to: the connection
    /// goes to `addr`, while the certificate is verified against the host named in the URL and
    /// calls carry the URL's authority. For a URL that names `addr` itself, [`Self::endpoint`].
    pub fn endpoint_at(&self, addr: SocketAddr) -> Result<Endpoint, AccessError> {
        let uri = self.uri()?;
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        if host.parse::<std::net::IpAddr>().ok() == Some(addr.ip()) && port == addr.port() {
            return self.endpoint();
        }
        let scheme = uri.scheme_str().unwrap_or("http");
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| self.bad_url(e.to_string()))?;
        let host = host.to_owned();
        self.secure(endpoint.origin(uri.clone()), &uri, Some(host))
    }

    fn bad_url(&self, why: String) -> AccessError {
        AccessError::BadUrl { url: self.url.clone(), why }
    }

    fn uri(&self) -> Result<http::Uri, AccessError> {
        self.url.parse().map_err(|e: http::uri::InvalidUri| self.bad_url(e.to_string()))
    }

    /// `endpoint` with TLS for an `https://` URL, verifying the certificate against `name` (by
    /// default the endpoint's own host).
    fn secure(&self, endpoint: Endpoint, uri: &http::Uri, name: Option<String>) -> Result<Endpoint, AccessError> {
        match uri.scheme_str() {
            Some("https") => {
                let ca = self.ca_pem.as_deref().ok_or_else(|| AccessError::NoCaFile { url: self.url.clone() })?;
                crate::pem::certificates(ca).map_err(AccessError::BadCa)?;
                let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some(name) = name {
                    tls = tls.domain_name(name);
                }
                endpoint.tls_config(tls).map_err(|e| AccessError::BadCa(e.to_string()))
            }
            Some("http") => Ok(endpoint),
            _ => Err(self.bad_url("must start with https:// or http://".into())),
        }
    }

    /// The token as an interceptor.
    pub fn bearer(&self) -> Result<Bearer, AccessError> {
        Bearer::new(self.token.as_deref())
    }

    /// Connects, failing at once when the control plane cannot be reached.
    pub async fn connect(&self) -> Result<ApiChannel, ConnectError> {
        let bearer = self.bearer().map_err(ConnectError::Access)?;
        let channel = self
            .endpoint()
            .map_err(ConnectError::Access)?
            .connect()
            .await
            .map_err(|error| ConnectError::Transport { hint: hint(&self.url, &error), url: self.url.clone(), error })?;
        Ok(InterceptedService::new(channel, bearer))
    }

    /// Connects to `target` (one address of this URL's host), failing at once when it cannot
    /// be reached or when `connect_timeout` passes first.
    pub async fn connect_at(
        &self,
        target: &Target,
        connect_timeout: Option<std::time::Duration>,
    ) -> Result<ApiChannel, ConnectError> {
        let bearer = self.bearer().map_err(ConnectError::Access)?;
        let mut endpoint = self.endpoint_at(target.addr).map_err(ConnectError::Access)?;
        if let Some(timeout) = connect_timeout {
            endpoint = endpoint.connect_timeout(timeout);
        }
        let channel = endpoint.connect().await.map_err(|error| ConnectError::Transport {
            hint: hint(&self.url, &error),
            url: target.to_string(),
            error,
        })?;
        Ok(InterceptedService::new(channel, bearer))
    }

    /// A channel that connects on first use.
    pub fn lazy(&self) -> Result<ApiChannel, AccessError> {
        Ok(InterceptedService::new(self.endpoint()?.connect_lazy(), self.bearer()?))
    }
}

/// Why connecting to the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Access(AccessError),
    #[error("cannot reach the control plane at {url}: {}{}", ferry_runtime::error_chain(.error), .hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Transport { url: String, error: tonic::transport::Error, hint: Option<String> },
}

/// What a connection failure most likely means, when its cause is a TLS mistake.
pub fn hint(url: &str, error: &(dyn StdError + 'static)) -> Option<String> {
    let text = ferry_runtime::error_chain(error);
    if text.contains("InvalidContentType") || text.contains("corrupt message") || text.contains("received corrupt") {
        let plain = url.replacen("https://", "http://", 1);
        return Some(format!("it does not speak TLS: it may run with --api-tls off; use {plain}"));
    }
    if text.contains("UnknownIssuer") {
        return Some("its certificate is not signed by a root in the CA file: use the ca.pem of this control plane".into());
    }
    if text.contains("NotValidForName") || text.contains("not valid for name") {
        return Some("its certificate does not cover this host name: use one of its --advertise-name values".into());
    }
    None
}

/// A client of the HTTP API: each call on a connection of its own, over TLS when the API
/// speaks it, with the token.
#[derive(Clone)]
pub struct HttpApi {
    addr: std::net::SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    token: Option<String>,
}

/// A response of the HTTP API: status, headers, body.
pub type HttpAnswer = (http::StatusCode, http::HeaderMap, bytes::Bytes);

/// Any error of an HTTP API call.
pub type HttpError = Box<dyn StdError + Send + Sync>;

impl std::fmt::Debug for HttpApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpApi").field("addr", &self.addr).field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

impl HttpApi {
    /// The API at `addr`, over TLS verified with `ca_pem` when given, sending `token`.
    pub fn new(addr: std::net::SocketAddr, ca_pem: Option<&str>, token: Option<String>) -> Result<Self, String> {
        let tls = ca_pem.map(http_client_config).transpose()?;
        Ok(Self { addr, tls, token })
    }

    /// The same API with another token (or none).
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self { token: token.map(str::to_owned), ..self.clone() }
    }

    /// Its base URL, such as `https://127.0.0.1:7071`.
    pub fn base(&self) -> String {
        format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.addr)
    }

    /// `method path` with `body` of `content_type` (or no body).
    pub async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, bytes::Bytes)>,
    ) -> Result<HttpAnswer, HttpError> {
        use http_body_util::BodyExt;
        let mut request = http::Request::builder().method(method).uri(path).header(http::header::HOST, self.addr.to_string());
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let (content, body) = match body {
            Some((content_type, body)) => (Some(content_type), body),
            None => (None, bytes::Bytes::new()),
        };
        if let Some(content_type) = content {
            request = request.header(http::header::CONTENT_TYPE, content_type);
        }
        let request = request.body(http_body_util::Full::new(body))?;
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        let response = match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
                let stream = tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream).await?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                sender.send_request(request).await?
            }
            None => {
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                sender.send_request(request).await?
            }
        };
        let (parts, body) = response.into_parts();
        Ok((parts.status, parts.headers, body.collect().await?.to_bytes()))
    }
}

/// A client config for the HTTP API over TLS: the server's certificate must chain to a root of
/// `ca_pem` and cover the host name asked for.
pub fn http_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::pem::certificates(ca_pem)? {
        roots.add(cert).map_err(|e| format!("the CA file: {e}"))?;
    }
    let mut config = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::mesh::ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::authority;

    /// A TLS server on loopback whose certificate covers `name` only; it records the server
    /// name each client asked for.
    async fn tls_server(name: &str) -> (SocketAddr, String, tokio::sync::mpsc::UnboundedReceiver<Option<String>>) {
        let now = SystemTime::now();
        let root = authority::new_root("ferry.local", now, Duration::from_secs(3600)).expect("a root");
        let (leaf, key) = authority::api_server(&root, &[name.to_owned()], now, Duration::from_secs(3600)).expect("a leaf");
        let chain = crate::pem::certificates(&leaf.chain_pem).expect("the chain");
        let key = crate::pem::private_key(&key).expect("the key");
        let mut config = rustls::ServerConfig::builder_with_provider(crate::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a server config");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (names, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, names) = (acceptor.clone(), names.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        let _ = names.send(tls.get_ref().1.server_name().map(str::to_owned));
                        // Hold the connection until the client leaves.
                        let _ = tokio::io::copy(&mut tls, &mut tokio::io::sink()).await;
                    }
                });
            }
        });
        (addr, root.cert_pem, seen)
    }

    #[tokio::test]
    async fn an_address_a_name_resolved_to_is_verified_against_the_name() {
        let (addr, ca, mut seen) = tls_server("cp.test").await;
        let named = Access { url: format!("https://cp.test:{}", addr.port()), ca_pem: Some(ca.clone()), token: None };
        named.endpoint_at(addr).expect("an endpoint").connect().await.expect("the certificate covers cp.test");
        assert_eq!(seen.recv().await.flatten().as_deref(), Some("cp.test"), "the name is sent as SNI");

        // The same address named by itself is not covered: the name above is what made it pass.
        let by_ip = Access { url: format!("https://{addr}"), ca_pem: Some(ca), token: None };
        let error = by_ip.endpoint_at(addr).expect("an endpoint").connect().await.expect_err("127.0.0.1 is not covered");
        let text = ferry_runtime::error_chain(&error);
        assert!(text.contains("not valid for name"), "{text}");
        assert!(hint(&by_ip.url, &error).is_some_and(|h| h.contains("host name")), "the mistake explained: {text}");
    }
}
