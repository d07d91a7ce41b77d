//! HTTP plumbing shared by the inbound and outbound proxies: the body type, the server accept
//! loop, the per-endpoint client, and header hygiene.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, header};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

pub mod client;
pub mod replay;
pub mod server;

/// Any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every request and response inside the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    boxed(Empty::new().map_err(|never| match never {}))
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

/// A body that holds `guard` until the body is dropped: sent in full, or abandoned.
#[pin_project::pin_project]
pub struct Guarded<B, G> {
    #[pin]
    body: B,
    _guard: G,
}

impl<B, G> Guarded<B, G> {
    /// `body`, holding `guard`.
    pub fn new(body: B, guard: G) -> Self {
        Self { body, _guard: guard }
    }
}

impl<B: http_body::Body, G> http_body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Headers that describe one hop's connection and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::UPGRADE,
];

/// Whether a header is one [`strip_hop_by_hop`] may remove or rewrite.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE || name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers, including any the `Connection` header names. `TE: trailers`
/// stays: gRPC needs it end to end.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names settles it, where a removal by
    // name would hash each of the nine.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if name != header::TE {
            headers.remove(name);
        }
    }
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_connection_headers_but_keeps_te_trailers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-private".parse().expect("valid"));
        headers.insert("keep-alive", "timeout=5".parse().expect("valid"));
        headers.insert("x-private", "1".parse().expect("valid"));
        headers.insert(header::TE, "trailers".parse().expect("valid"));
        headers.insert("x-kept", "1".parse().expect("valid"));
        strip_hop_by_hop(&mut headers);
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-kept"]);
    }
}
