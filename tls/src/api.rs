//! Clients of the control plane's APIs: `https://` verified against the mesh's roots (the
//! `ca.pem` the control plane writes, `--ca-file`), and a bearer token on every call.
//!
//! A failure to connect is explained in words where the cause is a common mistake: a
//! plaintext URL for a TLS listener (the control plane answers that itself), a TLS URL for a
//! plaintext one, or a CA file that does not hold the mesh's root.

use std::{error::Error as StdError, sync::Arc};

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
        let bad = |why: String| AccessError::BadUrl { url: self.url.clone(), why };
        let uri: http::Uri = self.url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| bad(e.to_string()))?;
        match uri.scheme_str() {
            Some("https") => {
                let ca = self.ca_pem.as_deref().ok_or_else(|| AccessError::NoCaFile { url: self.url.clone() })?;
                crate::pem::certificates(ca).map_err(AccessError::BadCa)?;
                let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                endpoint.tls_config(tls).map_err(|e| AccessError::BadCa(e.to_string()))
            }
            Some("http") => Ok(endpoint),
            _ => Err(bad("must start with https:// or http://".into())),
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
    if text.contains("NotValidForName") {
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
