//! Protocol detection on an intercepted connection's first bytes, read with `peek` so nothing
//! is consumed: whatever serves the connection next reads them again.
//!
//! - `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, the HTTP/2 connection preface: h2c and gRPC.
//! - An HTTP/1.x request line: a method token of capital letters and a space.
//! - A TLS handshake record: passed through as opaque TCP; the ClientHello's SNI is read (by
//!   rustls) for the log.
//! - Anything else, or silence until the timeout (a protocol where the server speaks first that
//!   was not declared opaque): opaque TCP.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest HTTP method token recognised (`PROPPATCH` and the like fit).
const MAX_METHOD: usize = 16;
/// The most bytes looked at: enough for a ClientHello with its SNI in nearly every case.
const PEEK_BYTES: usize = 4096;

/// What an intercepted connection carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or 1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
    /// TLS, relayed as opaque TCP; the server name the client asked for, if it said.
    Tls { sni: Option<String> },
    /// Anything else.
    Opaque,
}

impl Protocol {
    /// The label of metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Tls { .. } => "tls",
            Self::Opaque => "opaque",
        }
    }

    /// Whether the connection is served request by request.
    pub fn is_http(&self) -> bool {
        matches!(self, Self::Http1 | Self::Http2)
    }
}

/// How detection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// Decided from the first bytes.
    Protocol(Protocol),
    /// The client sent nothing within the timeout: opaque, as the server may be the one to
    /// speak first.
    Silent,
    /// The client closed (or reset) the connection before deciding.
    Closed,
}

/// Decides what `bytes` (the start of a connection) carry; `None` while more bytes could change
/// the answer.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    let first = *bytes.first()?;
    if first == 0x16 {
        return tls(bytes);
    }
    if first == b'P' && H2_PREFACE.starts_with(&bytes[..bytes.len().min(H2_PREFACE.len())]) {
        if bytes.len() >= H2_PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // `PRI ` would also begin an HTTP/1 request line: wait for the whole preface.
        return None;
    }
    for (i, &byte) in bytes.iter().enumerate().take(MAX_METHOD + 1) {
        match byte {
            b'A'..=b'Z' | b'-' | b'_' => {}
            b' ' if i > 0 => return request_line(bytes),
            _ => return Some(Protocol::Opaque),
        }
    }
    if bytes.len() > MAX_METHOD { Some(Protocol::Opaque) } else { None }
}

/// After a method token: HTTP/1 once the line ends in ` HTTP/1.x` (so that a text protocol with
/// commands in capitals, such as Redis's `SET key value`, is not taken for HTTP).
fn request_line(bytes: &[u8]) -> Option<Protocol> {
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        return (bytes.len() >= PEEK_BYTES).then_some(Protocol::Opaque);
    };
    let line = bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]);
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    Some(if version.starts_with(b"HTTP/1.") { Protocol::Http1 } else { Protocol::Opaque })
}

/// A TLS record: complete once rustls has read the whole ClientHello (or given up on it).
fn tls(bytes: &[u8]) -> Option<Protocol> {
    // A handshake record's header: type 0x16, version 0x03 0x0X.
    if bytes.len() >= 2 && bytes[1] != 0x03 {
        return Some(Protocol::Opaque);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    while !reader.is_empty() {
        match acceptor.read_tls(&mut reader) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(Protocol::Tls { sni: accepted.client_hello().server_name().map(str::to_owned) }),
        // The ClientHello is not whole yet.
        Ok(None) if bytes.len() < PEEK_BYTES => None,
        Ok(None) | Err(_) => Some(Protocol::Tls { sni: None }),
    }
}

/// Peeks at `stream` until its first bytes decide the protocol, or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let deadline = Instant::now() + timeout;
    let mut buffer = vec![0u8; PEEK_BYTES];
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buffer)).await;
        let read = match peeked {
            Ok(Ok(0) | Err(_)) => return Detected::Closed,
            Ok(Ok(read)) => read,
            Err(_) if seen == 0 => return Detected::Silent,
            // Bytes came but not enough to tell: whatever they began, it is not HTTP.
            Err(_) => return Detected::Protocol(classify(&buffer[..seen]).unwrap_or(fallback(&buffer[..seen]))),
        };
        if let Some(protocol) = classify(&buffer[..read]) {
            return Detected::Protocol(protocol);
        }
        if read == buffer.len() {
            return Detected::Protocol(fallback(&buffer[..read]));
        }
        if read == seen {
            // `peek` returns at once while unread bytes wait: give the rest time to arrive.
            if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(2))).await.is_err() {
                return Detected::Protocol(fallback(&buffer[..read]));
            }
        }
        seen = read;
    }
}

/// What undecided bytes count as when no more come.
fn fallback(bytes: &[u8]) -> Protocol {
    if bytes.first() == Some(&0x16) { Protocol::Tls { sni: None } } else { Protocol::Opaque }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines() {
        assert_eq!(classify(b"GET /items HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GET / HTTP/1.0\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST "), None, "the request line is not whole yet");
        assert_eq!(classify(b"SET key value\r\n"), Some(Protocol::Opaque), "a Redis inline command");
        assert_eq!(classify(b"GE"), None, "could still be a method");
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Opaque), "methods are capitals");
        assert_eq!(classify(b" GET"), Some(Protocol::Opaque));
        assert_eq!(classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"), Some(Protocol::Opaque), "too long for a method");
    }

    #[test]
    fn the_h2_preface_whole() {
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"PRI / HTTP/1.1\r\n"), Some(Protocol::Http1), "PRI as an HTTP/1 method");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), Some(Protocol::Opaque), "not the preface");
    }

    #[test]
    fn other_bytes_are_opaque() {
        assert_eq!(classify(b"\x00\x01\x02"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b""), None);
    }

    #[test]
    fn tls_with_its_server_name() {
        let hello = client_hello("catalog.example");
        assert_eq!(classify(&hello), Some(Protocol::Tls { sni: Some("catalog.example".into()) }));
        assert_eq!(classify(&hello[..20]), None, "half a ClientHello waits");
        assert_eq!(classify(b"\x16\x99"), Some(Protocol::Opaque), "not a TLS version");
    }

    /// A real ClientHello, written by rustls.
    fn client_hello(name: &str) -> Vec<u8> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth();
        let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name.to_owned().try_into().expect("name"))
            .expect("client");
        let mut out = Vec::new();
        client.write_tls(&mut out).expect("hello");
        out
    }

    #[tokio::test]
    async fn silence_and_slow_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            tokio::time::sleep(Duration::from_millis(300)).await;
            use tokio::io::AsyncWriteExt;
            stream.write_all(b"GE").await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(b"T / HTTP/1.1\r\n").await.expect("write");
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (server, _) = listener.accept().await.expect("accept");
        assert_eq!(detect(&server, Duration::from_millis(100)).await, Detected::Silent);
        assert_eq!(detect(&server, Duration::from_secs(5)).await, Detected::Protocol(Protocol::Http1));
        client.abort();
    }
}
