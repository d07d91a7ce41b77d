//! Which failures a retry may follow. Whatever the route says, a retry must be safe: a request
//! that may have reached the upstream app is repeated only when its method is idempotent (or,
//! for gRPC, when the route names the status), while a request that provably never got there
//! (no connection, a refused or unprocessed HTTP/2 stream, the endpoint's sidecar unable to
//! reach its app) may be repeated whatever its method. Requests that match no rule, or a rule
//! without `retries`, get [`mesh_default`].

use http::{HeaderMap, HeaderValue, Method, Response};

use crate::{
    errors::{FERRY_ERROR, GRPC_STATUS, ResponseTimeout, is_grpc},
    http::{
        Body, BoxError,
        client::{ConnectError, UpstreamError},
    },
    outbound::route::Retries,
};

/// The attempt number an outbound sidecar puts on each attempt it sends: 1 for the first. A
/// request arriving with a number above 1 is itself a retry, and is not retried again here.
pub const ATTEMPT_HEADER: http::HeaderName = http::HeaderName::from_static("x-ferry-attempt");

/// The gRPC status UNAVAILABLE.
const GRPC_UNAVAILABLE: u32 = 14;

/// The retry policy of requests that match no rule, or a rule without `retries`: up to 3
/// attempts on connect failures, refused streams and apps their sidecar could not reach (any
/// method), on resets (idempotent methods only), and on a trailers-only gRPC UNAVAILABLE: the
/// status gRPC defines as retryable, which servers and proxies answer for calls they did not
/// process.
pub fn mesh_default() -> Retries {
    Retries {
        attempts: 3,
        connect_failure: true,
        refused_stream: true,
        reset: true,
        grpc: vec![GRPC_UNAVAILABLE],
        ..Retries::default()
    }
}

/// The attempt number a request arrived with (1 when it carries none).
pub fn incoming_attempt(headers: &HeaderMap) -> u32 {
    headers.get(ATTEMPT_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(1)
}

/// Marks `headers` as attempt `attempt`.
pub fn mark_attempt(headers: &mut HeaderMap, attempt: u32) {
    headers.insert(ATTEMPT_HEADER, HeaderValue::from(attempt));
}

/// Why an attempt's outcome calls for another, as the `reason` label of `ferry_retries_total`;
/// `None` when it does not.
pub fn retry_reason(retries: &Retries, method: &Method, result: &Result<Response<Body>, BoxError>) -> Option<&'static str> {
    // A request that reached the upstream is retried only when repeating it is harmless.
    let idempotent =
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE);
    match result {
        Ok(response) => {
            let ferry_error = response.headers().get(FERRY_ERROR).map(HeaderValue::as_bytes);
            // The endpoint's sidecar could not reach its app: the request never got there. (The
            // inbound sidecar only lets `x-ferry-error` out on answers it made itself.)
            if ferry_error.is_some_and(|e| e.starts_with(b"app_unreachable")) {
                return retries.connect_failure.then_some("app_unreachable");
            }
            if ferry_error.is_some_and(|e| e.starts_with(b"app_failed")) {
                // The peer sidecar reached its app and the exchange broke: the app may have
                // done the work, whatever gRPC status the answer carries.
                return (idempotent && retries.reset).then_some("reset");
            }
            if idempotent && retries.retry_response(response.status().as_u16(), None) {
                return Some("status");
            }
            // Every gRPC call is a POST: the gRPC statuses of the policy (the route's, or the
            // mesh's UNAVAILABLE) declare the calls safe to repeat on those.
            if !is_grpc(response.headers()) {
                return None;
            }
            let grpc_status = response.headers().get(GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            retries.retry_response(0, grpc_status).then_some("grpc_status")
        }
        Err(error) => {
            // Looked for down the source chain: the balancer wraps errors of panic mode.
            if caused_by::<ConnectError>(error.as_ref()) {
                return retries.connect_failure.then_some("connect_failure");
            }
            if never_processed(error.as_ref()) {
                return retries.refused_stream.then_some("refused_stream");
            }
            if caused_by::<UpstreamError>(error.as_ref()) {
                return (idempotent && retries.reset).then_some("reset");
            }
            if caused_by::<ResponseTimeout>(error.as_ref()) {
                return (idempotent && (retries.reset || retries.any_5xx || retries.gateway_error)).then_some("timeout");
            }
            None
        }
    }
}

/// Whether `error` or one of its sources is a `T`.
fn caused_by<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if error.is::<T>() {
            return true;
        }
        next = error.source();
    }
    false
}

/// Whether an HTTP/2 upstream said it never processed the stream: `REFUSED_STREAM`, or a
/// graceful GOAWAY that left the stream out (a GOAWAY with an error code fails every stream,
/// processed or not, so it proves nothing).
fn never_processed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
            if h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR) {
                return true;
            }
        }
        next = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{StatusCode, header};

    use super::*;
    use crate::http::{client::ConnectFailure, empty};

    fn status(status: u16) -> Result<Response<Body>, BoxError> {
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::from_u16(status).expect("status");
        Ok(response)
    }

    fn grpc_unavailable() -> Result<Response<Body>, BoxError> {
        let mut response = Response::new(empty());
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response.headers_mut().insert("grpc-status", HeaderValue::from_static("14"));
        Ok(response)
    }

    fn connect_failed() -> Result<Response<Body>, BoxError> {
        Err(Box::new(ConnectError { address: "x".into(), reason: ConnectFailure::Timeout(Duration::from_secs(1)) }))
    }

    fn app_down() -> Result<Response<Body>, BoxError> {
        let mut response = status(502)?;
        response.headers_mut().insert(FERRY_ERROR, HeaderValue::from_static("app_unreachable: connecting to 127.0.0.1:1"));
        Ok(response)
    }

    #[test]
    fn a_call_that_reached_the_app_is_not_repeated_whatever_its_grpc_status() {
        let default = mesh_default();
        let mut broke = grpc_unavailable();
        if let Ok(response) = &mut broke {
            response.headers_mut().insert(FERRY_ERROR, HeaderValue::from_static("app_failed: connection reset"));
        }
        assert_eq!(retry_reason(&default, &Method::POST, &broke), None, "the app may have done the work");
        assert_eq!(retry_reason(&default, &Method::GET, &broke), Some("reset"), "an idempotent call may be repeated");
        // Errors wrapped on the way (panic mode) are still recognised.
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] BoxError);
        let wrapped: Result<Response<Body>, BoxError> = Err(Box::new(Wrapped(connect_failed().expect_err("an error"))));
        assert_eq!(retry_reason(&default, &Method::POST, &wrapped), Some("connect_failure"));
    }

    #[test]
    fn only_safe_requests_are_retried_after_they_reached_the_upstream() {
        let retries = Retries { attempts: 3, any_5xx: true, connect_failure: true, ..Retries::default() };
        assert_eq!(retry_reason(&retries, &Method::GET, &status(503)), Some("status"));
        assert_eq!(retry_reason(&retries, &Method::POST, &status(503)), None, "the POST reached the app");
        assert_eq!(retry_reason(&retries, &Method::GET, &status(404)), None);
        assert_eq!(retry_reason(&retries, &Method::POST, &grpc_unavailable()), None, "no gRPC status named");
        let grpc = Retries { attempts: 3, grpc: vec![14], ..Retries::default() };
        assert_eq!(retry_reason(&grpc, &Method::POST, &grpc_unavailable()), Some("grpc_status"), "named, though gRPC is POST");
        assert_eq!(retry_reason(&retries, &Method::POST, &connect_failed()), Some("connect_failure"), "never sent");
        assert_eq!(retry_reason(&retries, &Method::POST, &app_down()), Some("app_unreachable"), "never reached the app");
    }

    #[test]
    fn the_default_policy_retries_what_never_arrived_and_idempotent_failures() {
        let default = mesh_default();
        assert_eq!(default.attempts, 3);
        for method in [Method::GET, Method::POST] {
            assert_eq!(retry_reason(&default, &method, &connect_failed()), Some("connect_failure"), "{method}");
            assert_eq!(retry_reason(&default, &method, &app_down()), Some("app_unreachable"), "{method}");
            assert_eq!(retry_reason(&default, &method, &status(503)), None, "an app's own 5xx: {method}");
        }
        assert_eq!(retry_reason(&default, &Method::POST, &grpc_unavailable()), Some("grpc_status"), "gRPC's retryable status");
        assert_eq!(retry_reason(&default, &Method::GET, &grpc_unavailable()), Some("grpc_status"));
    }

    #[test]
    fn unprocessed_http2_streams_are_recognised() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] h2::Error);
        assert!(never_processed(&Wrapped(h2::Error::from(h2::Reason::REFUSED_STREAM))));
        assert!(!never_processed(&Wrapped(h2::Error::from(h2::Reason::INTERNAL_ERROR))));
    }

    #[test]
    fn attempts_are_numbered_in_a_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(incoming_attempt(&headers), 1);
        mark_attempt(&mut headers, 2);
        assert_eq!(incoming_attempt(&headers), 2);
        headers.insert(ATTEMPT_HEADER, HeaderValue::from_static("junk"));
        assert_eq!(incoming_attempt(&headers), 1);
    }
}
