//! The front door of the API listeners (gRPC and HTTP): TLS by default, connection caps, and
//! timeouts for clients that connect and then say nothing.
//!
//! Each accepted connection is told apart by its first byte: a TLS handshake record, or
//! plaintext. A plaintext client of a TLS listener is answered (not dropped) with what to
//! change: gRPC callers get `UNAVAILABLE` saying to use `https://`, HTTP callers a 400 saying
//! the same; a TLS client of a plaintext listener (`--api-tls off`) gets a plaintext 400, which
//! its TLS library reports as a protocol error that `ferryctl` explains. Handshakes run in a
//! task of their own, each bounded in time, so a slow client never holds the accept loop; the
//! number of open connections is capped, and the listener stops accepting at the cap.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_util::sync::CancellationToken;

/// Limits of one API listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; past it the listener stops accepting until one closes.
    pub max_connections: usize,
    /// How long a new connection may take to send its first byte and finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send a request's headers.
    pub header_read_timeout: Duration,
}

/// The API's certificate, replaced in place when renewed.
#[derive(Debug)]
pub struct ApiCert(ArcSwap<CertifiedKey>);

impl ApiCert {
    /// A resolver presenting `key` until [`ApiCert::set`].
    pub fn new(key: CertifiedKey) -> Self {
        Self(ArcSwap::from_pointee(key))
    }

    /// Presents `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }

    /// A certified key from a chain and key in PEM.
    pub fn certified(chain_pem: &str, key_pem: &str) -> anyhow::Result<CertifiedKey> {
        let chain = ferry_tls::pem::certificates(chain_pem).map_err(anyhow::Error::msg)?;
        let key = ferry_tls::pem::private_key(key_pem).map_err(anyhow::Error::msg)?;
        let signing = ferry_tls::provider().key_provider.load_private_key(key)?;
        Ok(CertifiedKey::new(chain, signing))
    }
}

impl ResolvesServerCert for ApiCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The TLS config of an API listener offering `alpn`.
pub fn tls_config(cert: Arc<ApiCert>, alpn: &[&[u8]]) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(ferry_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// One accepted connection, TLS or not, holding its place under the connection cap.
pub struct ApiStream {
    io: Io,
    local: SocketAddr,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ApiStream {
    /// The client's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }
}

impl AsyncRead for ApiStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for ApiStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo { local_addr: Some(self.local), remote_addr: Some(self.remote) }
    }
}

/// What an API listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Grpc,
    Http,
}

/// Accepts connections on `listener` until `shutdown`, and yields each one once its TLS
/// handshake (when `tls` is set) is done.
pub fn accept(
    api: Api,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    limits: Limits,
    shutdown: CancellationToken,
) -> mpsc::Receiver<ApiStream> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let local = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tokio::spawn(async move {
        let name = match api {
            Api::Grpc => "grpc",
            Api::Http => "http",
        };
        while let Some((permit, stream, remote)) = ferry_runtime::accept_capped(&listener, &slots, &shutdown, name).await {
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let connection =
                    tokio::time::timeout(limits.handshake_timeout, classify(api, stream, tls, local, remote, limits));
                match connection.await {
                    Ok(Some(io)) => {
                        let _ = tx.send(ApiStream { io, local, remote, _permit: permit }).await;
                    }
                    Ok(None) => {}
                    Err(_) => tracing::debug!(?api, %remote, "closed a connection that did not finish its handshake in time"),
                }
            });
        }
    });
    rx
}

/// Reads the first byte and finishes the handshake; answers and drops a client that speaks the
/// other protocol.
async fn classify(
    api: Api,
    stream: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    local: SocketAddr,
    remote: SocketAddr,
    limits: Limits,
) -> Option<Io> {
    let mut first = [0u8; 1];
    let read = stream.peek(&mut first).await.ok()?;
    if read == 0 {
        return None;
    }
    let handshake = ferry_tls::is_tls_handshake(&first);
    match (handshake, tls) {
        (true, Some(config)) => match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
            Ok(stream) => Some(Io::Tls(Box::new(stream))),
            Err(error) => {
                let why = ferry_tls::verify::explain_io(&error).unwrap_or_else(|| error.to_string());
                tracing::debug!(?api, %remote, error = %why, "TLS handshake failed");
                None
            }
        },
        (false, None) => Some(Io::Plain(stream)),
        (false, Some(_)) => {
            // Answered outside the handshake bound: the explanation is a short exchange.
            tokio::spawn(explain_plaintext(api, stream, local, limits));
            None
        }
        (true, None) => {
            let mut stream = stream;
            let body = "this listener speaks plaintext (the control plane runs with --api-tls off): use http://\n";
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            None
        }
    }
}

/// Serves a plaintext client of a TLS listener with answers that say to use TLS.
async fn explain_plaintext(api: Api, stream: TcpStream, local: SocketAddr, limits: Limits) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| async move {
        let host = request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_else(|| local.to_string());
        let grpc =
            request.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let message = match api {
            Api::Grpc => format!(
                "this control plane serves TLS on {host}: use https://{host} and --ca-file (the ca.pem in its data directory)"
            ),
            Api::Http => format!("this listener speaks TLS: use https://{host} (curl --cacert <data-dir>/ca.pem)"),
        };
        let response = if grpc {
            let mut response = Response::new(Full::new(Bytes::new()));
            let headers = response.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from_static("14"));
            if let Ok(value) = HeaderValue::from_str(&message) {
                headers.insert("grpc-message", value);
            }
            response
        } else {
            let mut response = Response::new(Full::new(Bytes::from(message + "\n")));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            response
        };
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(false);
    let serve = builder.serve_connection(TokioIo::new(stream), service);
    // One or two answers are enough to say it.
    let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plaintext_client_of_a_tls_listener_is_told_to_use_tls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let now = std::time::SystemTime::now();
        let root = ferry_tls::authority::new_root("ferry.local", now, Duration::from_secs(3600)).expect("root");
        let (leaf, key) =
            ferry_tls::authority::api_server(&root, &["localhost".into()], now, Duration::from_secs(60)).expect("cert");
        let cert = Arc::new(ApiCert::new(ApiCert::certified(&leaf.chain_pem, &key).expect("certified")));
        let config = tls_config(cert, &[b"http/1.1"]).expect("config");
        let limits =
            Limits { max_connections: 4, handshake_timeout: Duration::from_secs(5), header_read_timeout: Duration::from_secs(5) };
        let _rx = accept(Api::Http, listener, Some(config), limits, CancellationToken::new());
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        stream.write_all(b"GET /v1/services HTTP/1.1\r\nhost: localhost\r\n\r\n").await.expect("sent");
        let mut answer = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("this listener speaks TLS: use https://localhost"), "{answer}");
    }
}
