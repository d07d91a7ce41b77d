//! What the inbound and outbound proxies share: request and response hygiene, and the edge where
//! errors become responses and every request is counted.

use std::{sync::Arc, time::Instant};

use http::{Request, Response};
use hyper::body::Incoming;

use crate::{
    errors::{self, FERRY_ERROR},
    http::{Body, BoxError, boxed, strip_hop_by_hop},
    metrics::{RouteLabel, ServiceMetrics},
};

/// The request as it goes on to the next hop.
pub fn forwardable(request: Request<Incoming>) -> Request<Body> {
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Request::from_parts(parts, boxed(body))
}

/// The response as it goes back to the previous hop, in this hop's HTTP version.
pub fn returnable(response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // An HTTP/1.0 upstream must not make this hop's response HTTP/1.0 (and close the connection);
    // HTTP/2 connections ignore the field.
    parts.version = http::Version::HTTP_11;
    Response::from_parts(parts, body)
}

/// The status label of a response: its class, or the reason of a synthetic one.
fn status_label(response: &Response<Body>, result_was_error: Option<&'static str>) -> &'static str {
    if let Some(code) = result_was_error {
        return code;
    }
    match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Turns the result of a forwarded request into the response the client sees, and counts it.
pub fn respond(
    metrics: &ServiceMetrics,
    direction: &'static str,
    grpc: bool,
    started: Instant,
    result: Result<Response<Body>, BoxError>,
) -> Response<Body> {
    /// The route label of requests no route applies to (inbound ones, failed ones).
    static NO_ROUTE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));
    let route = match &result {
        Ok(response) => response.extensions().get::<RouteLabel>().map_or_else(|| NO_ROUTE.clone(), |r| r.0.clone()),
        Err(_) => NO_ROUTE.clone(),
    };
    let (response, synthetic) = match result {
        Ok(response) => (returnable(response), None),
        Err(error) => {
            let reason = errors::reason(error.as_ref());
            tracing::debug!(direction, service = %metrics.service(), error = %error, reason = reason.code, "request failed");
            (errors::synthetic_response(&error, grpc), Some(reason.code))
        }
    };
    debug_assert!(synthetic.is_none() || response.headers().contains_key(FERRY_ERROR));
    metrics.record(&route, status_label(&response, synthetic), started.elapsed());
    response
}
