//! The errors the proxy makes itself, and the responses they become at the edge.
//!
//! Layers fail with small typed errors. Only the server edge turns an error into a response,
//! by walking the error's `source()` chain for a known type: a 502, 503 or 504 with an
//! `x-ferry-error` header holding a stable reason code and one sentence, such as
//! `no_endpoints: catalog has 0 of 3 passing`. gRPC callers get the same as a trailers-only
//! response with a `grpc-status`, so their client libraries report it properly.

use std::{error::Error as StdError, fmt::Write, sync::Arc, time::Duration};

use http::{HeaderValue, Response, StatusCode, header};

use crate::http::{
    Body, BoxError,
    client::{ConnectError, UpstreamError},
    full,
};

/// The header that carries the reason of a response the proxy made itself.
pub const FERRY_ERROR: http::HeaderName = http::HeaderName::from_static("x-ferry-error");

/// The gRPC status of a response, in its headers (trailers-only) or trailers.
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The request names no service: no absolute URI, no `Host`.
#[derive(Debug, thiserror::Error)]
#[error("the request names no destination: send an absolute URI or a Host header")]
pub struct NoDestination;

/// The request's authority cannot be a mesh service.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a mesh service name")]
pub struct InvalidDestination(pub String);

/// The control plane knows no instance of the service.
#[derive(Debug, thiserror::Error)]
#[error("no service named {0:?} is registered")]
pub struct UnknownService(pub Arc<str>);

/// The service (or the subset of it a route chose) exists but none of its instances can take
/// traffic.
#[derive(Debug, thiserror::Error)]
#[error("{service}{} has 0 of {total} passing", subset.as_ref().map(|s| format!(" (subset {s})")).unwrap_or_default())]
pub struct NoEndpoints {
    pub service: Arc<str>,
    pub subset: Option<Arc<str>>,
    pub total: usize,
}

/// A route chose a subset the service's policy does not define.
#[derive(Debug, thiserror::Error)]
#[error("{service} has no subset {subset:?} in its policy")]
pub struct UnknownSubset {
    pub service: Arc<str>,
    pub subset: Arc<str>,
}

/// A gateway's route has no rule for the request, or the gateway has no route in force.
#[derive(Debug, thiserror::Error)]
pub enum NoRoute {
    #[error("no rule of {gateway}'s route matches host {host:?}, path {path:?}")]
    NoRule { gateway: Arc<str>, host: String, path: String },
    #[error("{gateway} has no route in force: {why}")]
    NoTable { gateway: Arc<str>, why: String },
}

/// The sidecar has no config for the service yet and none arrived in time.
#[derive(Debug, thiserror::Error)]
#[error("no config for {service} arrived within {timeout:?}; is the control plane reachable?")]
pub struct DiscoveryTimeout {
    pub service: Arc<str>,
    pub timeout: Duration,
}

/// The upstream did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error("no response within {0:?}")]
pub struct ResponseTimeout(pub Duration);

/// The inbound sidecar could not reach its own app: the request never got there.
#[derive(Debug, thiserror::Error)]
#[error("the app is unreachable: {0}")]
pub struct AppUnreachable(#[source] pub BoxError);

/// The inbound sidecar reached its app but the exchange failed.
#[derive(Debug, thiserror::Error)]
#[error("the app failed: {0}")]
pub struct AppFailed(#[source] pub BoxError);

/// The calling sidecar's circuit breaker for the service is full: every slot is in use and the
/// queue for them too, so the request was shed without being sent.
#[derive(Debug, thiserror::Error)]
#[error(
    "{service} already has {max_concurrent} requests in flight and {max_pending} waiting from this sidecar (its circuit breaker's limits)"
)]
pub struct Overloaded {
    pub service: Arc<str>,
    pub max_concurrent: usize,
    pub max_pending: usize,
}

/// The destination's authorization policy refuses the caller.
#[derive(Debug, thiserror::Error)]
#[error("{caller} may not call {service}: {because} of its authorization policy (version {version})")]
pub struct Forbidden {
    /// The caller's identity (`spiffe://...`), or `an unauthenticated caller`.
    pub caller: String,
    pub service: Arc<str>,
    pub because: String,
    pub version: u64,
}

/// A request the proxy does not handle, such as CONNECT.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub &'static str);

/// What a synthetic response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason {
    pub code: &'static str,
    pub status: StatusCode,
    /// gRPC status code for gRPC callers.
    pub grpc: u8,
}

const UNAVAILABLE: u8 = 14;
const DEADLINE_EXCEEDED: u8 = 4;
const UNIMPLEMENTED: u8 = 12;
const INTERNAL: u8 = 13;
const PERMISSION_DENIED: u8 = 7;

/// The reason for `error`, from the first known error in its source chain.
pub fn reason(error: &(dyn StdError + 'static)) -> Reason {
    let reason = |code, status, grpc| Reason { code, status, grpc };
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<NoDestination>() || error.is::<InvalidDestination>() {
            return reason("bad_destination", StatusCode::BAD_REQUEST, INTERNAL);
        }
        if error.is::<UnknownService>() {
            return reason("unknown_service", StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
        }
        if error.is::<NoEndpoints>() {
            return reason("no_endpoints", StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
        }
        if error.is::<UnknownSubset>() {
            return reason("unknown_subset", StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
        }
        if error.is::<NoRoute>() {
            return reason("no_route", StatusCode::NOT_FOUND, UNIMPLEMENTED);
        }
        if error.is::<DiscoveryTimeout>() {
            return reason("discovery_timeout", StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
        }
        if error.is::<ResponseTimeout>() {
            return reason("upstream_timeout", StatusCode::GATEWAY_TIMEOUT, DEADLINE_EXCEEDED);
        }
        if error.is::<Overloaded>() {
            // UNAVAILABLE rather than RESOURCE_EXHAUSTED: gRPC clients retry it, and another
            // sidecar (or this one, a moment later) may well have room.
            return reason("overloaded", StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE);
        }
        if error.is::<AppUnreachable>() {
            return reason("app_unreachable", StatusCode::BAD_GATEWAY, UNAVAILABLE);
        }
        if error.is::<AppFailed>() {
            return reason("app_failed", StatusCode::BAD_GATEWAY, UNAVAILABLE);
        }
        if error.is::<ConnectError>() {
            return reason("upstream_connect_failed", StatusCode::BAD_GATEWAY, UNAVAILABLE);
        }
        if error.is::<UpstreamError>() {
            return reason("upstream_reset", StatusCode::BAD_GATEWAY, UNAVAILABLE);
        }
        if error.is::<Forbidden>() {
            return reason("forbidden", StatusCode::FORBIDDEN, PERMISSION_DENIED);
        }
        if error.is::<Unsupported>() {
            return reason("unsupported", StatusCode::NOT_IMPLEMENTED, UNIMPLEMENTED);
        }
        next = error.source();
    }
    reason("proxy_error", StatusCode::BAD_GATEWAY, INTERNAL)
}

/// The response for `error`; `grpc` when the request was a gRPC call.
pub fn synthetic_response(error: &BoxError, grpc: bool) -> Response<Body> {
    let reason = reason(error.as_ref());
    let sentence = format!("{}: {}", reason.code, ferry_runtime::error_chain(error.as_ref()));
    status_response(reason.status, reason.grpc, &sentence, grpc, reason.code)
}

/// The gRPC status a caller gets for an HTTP status the sidecar answers on its own (an
/// injected fault's), after gRPC's own mapping of HTTP statuses.
pub fn grpc_code_of(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => 16,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502..=504 => UNAVAILABLE,
        _ => 2,
    }
}

/// Every answer the sidecar makes on its own: `status` with `sentence` as its body and in
/// `x-ferry-error`, or for a gRPC caller a trailers-only `grpc_code` with the sentence as its
/// message. `code` stands in for the sentence where it cannot be a header value.
pub fn status_response(status: StatusCode, grpc_code: u8, sentence: &str, grpc: bool, code: &'static str) -> Response<Body> {
    let header_value = HeaderValue::from_str(&visible_ascii(sentence)).unwrap_or(HeaderValue::from_static(code));
    let mut response = if grpc {
        let mut response = Response::new(crate::http::empty());
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(grpc_code)));
        if let Ok(message) = HeaderValue::from_str(&percent_encode(sentence)) {
            headers.insert("grpc-message", message);
        }
        response
    } else {
        let mut response = Response::new(full(format!("{sentence}\n")));
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        response
    };
    response.headers_mut().insert(FERRY_ERROR, header_value);
    response
}

fn visible_ascii(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect()
}

/// gRPC's percent-encoding of `grpc-message`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Whether `request` headers announce a gRPC call.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_endpoints_is_a_503_with_the_reason_and_sentence() {
        let error: BoxError = Box::new(NoEndpoints { service: "catalog".into(), subset: None, total: 3 });
        let response = synthetic_response(&error, false);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[FERRY_ERROR], "no_endpoints: catalog has 0 of 3 passing");
    }

    #[test]
    fn the_reason_is_found_down_the_source_chain() {
        let inner: BoxError = Box::new(ResponseTimeout(Duration::from_secs(2)));
        let error: BoxError = Box::new(AppFailed(inner));
        assert_eq!(reason(error.as_ref()).code, "app_failed");
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapper(#[source] BoxError);
        let error: BoxError = Box::new(Wrapper(Box::new(ResponseTimeout(Duration::from_secs(2)))));
        assert_eq!(reason(error.as_ref()).code, "upstream_timeout");
    }

    #[test]
    fn shed_requests_are_503_overloaded_and_grpc_unavailable() {
        let error: BoxError = Box::new(Overloaded { service: "catalog".into(), max_concurrent: 1, max_pending: 0 });
        let response = synthetic_response(&error, false);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers()[FERRY_ERROR].to_str().expect("ascii").starts_with("overloaded: catalog already has 1"));
        assert_eq!(synthetic_response(&error, true).headers()["grpc-status"], "14");
    }

    #[test]
    fn grpc_callers_get_a_trailers_only_status() {
        let error: BoxError = Box::new(UnknownService("ghost".into()));
        let response = synthetic_response(&error, true);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "14");
        assert!(response.headers()["grpc-message"].to_str().expect("ascii").starts_with("unknown_service"));
        assert_eq!(percent_encode("a%b\n"), "a%25b%0A");
    }
}
