//! Clients that talk to the sidecars the way apps do: as an HTTP proxy (absolute-form URIs),
//! with the service in `Host`, over h2c with prior knowledge, and over gRPC.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

/// A response's status, headers and body.
pub type Answer = (StatusCode, HeaderMap, Bytes);

/// Any error, boxed.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Sends `request` over a new HTTP/1.1 connection to `addr`, exactly as given (an absolute URI
/// stays absolute, as clients send it to a proxy).
pub async fn send_h1(addr: SocketAddr, request: Request<Empty<Bytes>>) -> Result<Answer, Error> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    Ok((parts.status, parts.headers, body.collect().await?.to_bytes()))
}

/// Sends `request` over a new h2c (prior knowledge) connection to `addr`.
pub async fn send_h2(addr: SocketAddr, request: Request<Empty<Bytes>>) -> Result<Answer, Error> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    Ok((parts.status, parts.headers, body.collect().await?.to_bytes()))
}

/// `GET url` directly (no proxy), for admin and API endpoints.
pub async fn get(url: &str) -> Result<Answer, Error> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().ok_or("no authority")?.to_string();
    let addr: SocketAddr = authority.parse()?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path).header(http::header::HOST, authority).body(Empty::new())?;
    send_h1(addr, request).await
}

/// `method path` to the API at `addr` with a JSON `body`.
pub async fn send_json(addr: SocketAddr, method: http::Method, path: &str, body: &str) -> Result<Answer, Error> {
    send_body(addr, method, path, "application/json", body).await
}

/// `GET url` through the HTTP proxy at `proxy`, as `curl -x` does.
pub async fn proxy_get(proxy: SocketAddr, url: &str) -> Result<Answer, Error> {
    let uri: http::Uri = url.parse()?;
    let host = uri.authority().ok_or("no authority")?.to_string();
    send_h1(proxy, Request::get(uri).header(http::header::HOST, host).body(Empty::new())?).await
}

/// `GET path` from `addr` with `host` in the Host header.
pub async fn host_get(addr: SocketAddr, host: &str, path: &str) -> Result<Answer, Error> {
    send_h1(addr, Request::get(path).header(http::header::HOST, host).body(Empty::new())?).await
}

/// `GET http://authority/path` over h2c to `addr`.
pub async fn h2_get(addr: SocketAddr, authority: &str, path: &str) -> Result<Answer, Error> {
    let request = Request::get(format!("http://{authority}{path}")).version(Version::HTTP_2).body(Empty::new())?;
    send_h2(addr, request).await
}

/// A gRPC channel through the sidecar at `outbound` to `service`, named in `:authority`.
pub fn grpc_channel(outbound: SocketAddr, service: &str) -> Channel {
    Endpoint::from_shared(format!("http://{outbound}"))
        .expect("valid URL")
        .origin(format!("http://{service}").parse().expect("valid origin"))
        .connect_lazy()
}

/// The body as text.
pub fn text(answer: &Answer) -> String {
    String::from_utf8_lossy(&answer.2).into_owned()
}

/// A header as text, or "".
pub fn header<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer.1.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// `method path` to the API at `addr` with `body` of type `content_type` (such as
/// `application/yaml`).
pub async fn send_body(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<Answer, Error> {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body.to_owned())))?;
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    Ok((parts.status, parts.headers, body.collect().await?.to_bytes()))
}
