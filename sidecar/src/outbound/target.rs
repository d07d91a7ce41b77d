//! Which service an outbound request is for, from its authority.
//!
//! Clients reach a service by name in the request's authority: an absolute-form URI as sent to an
//! HTTP proxy (`GET http://catalog/items`), the HTTP/2 `:authority`, or the `Host` header. The
//! forms `catalog`, `catalog.ferry`, `catalog.service.ferry` and any of them with a port all mean
//! the service `catalog`; the port is ignored, since each endpoint has its own.

use http::{Request, header};

use crate::errors::{InvalidDestination, NoDestination};
use crate::http::BoxError;

/// The name of the service `request` is for.
pub fn service_of<B>(request: &Request<B>) -> Result<String, BoxError> {
    let authority = match request.uri().authority() {
        Some(authority) => authority.as_str(),
        None => request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).ok_or(NoDestination)?,
    };
    service_of_authority(authority)
}

/// Makes `Host` agree with an absolute-form request target, as RFC 9112 §3.2.2 requires of a
/// proxy: a client that sends `GET http://catalog/items` with some other `Host` meant the URI's
/// authority, so the app behind the mesh sees `Host: catalog`, not what the client happened to
/// send. An origin-form request (no authority in its target) keeps its `Host`; a request with no
/// `Host` gets one when it is sent over HTTP/1.1.
pub fn host_from_absolute_form<B>(request: &mut Request<B>) {
    let Some(authority) = request.uri().authority() else { return };
    let Some(host) = request.headers().get(header::HOST) else { return };
    if host.as_bytes() == authority.as_str().as_bytes() {
        return;
    }
    if let Ok(value) = header::HeaderValue::from_str(authority.as_str()) {
        request.headers_mut().insert(header::HOST, value);
    }
}

/// The service named by an authority such as `catalog.ferry:80`.
pub fn service_of_authority(authority: &str) -> Result<String, BoxError> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let name = host.strip_suffix(".service.ferry").or_else(|| host.strip_suffix(".ferry")).unwrap_or(&host);
    if name.is_empty() {
        return Err(Box::new(NoDestination));
    }
    ferry_proto::validate::service_name("host", name).map_err(|_| InvalidDestination(authority.to_owned()))?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_service_name_resolves() {
        for authority in
            ["catalog", "catalog.ferry", "catalog:80", "catalog.ferry:8080", "Catalog.Service.Ferry.", "catalog.service.ferry:80"]
        {
            assert_eq!(service_of_authority(authority).expect(authority), "catalog", "{authority}");
        }
    }

    #[test]
    fn other_hosts_are_refused() {
        for authority in ["example.com", "10.0.0.1:80", "", "bad_name"] {
            assert!(service_of_authority(authority).is_err(), "{authority}");
        }
    }

    #[test]
    fn an_absolute_form_target_sets_host_and_an_origin_form_one_keeps_it() {
        let mut request =
            Request::builder().uri("http://catalog:8080/items").header(header::HOST, "other").body(()).expect("valid");
        host_from_absolute_form(&mut request);
        assert_eq!(request.headers()[header::HOST], "catalog:8080");
        assert_eq!(request.headers().get_all(header::HOST).iter().count(), 1);

        let mut request = Request::builder().uri("/items").header(header::HOST, "inventory").body(()).expect("valid");
        host_from_absolute_form(&mut request);
        assert_eq!(request.headers()[header::HOST], "inventory");

        // No Host at all: nothing is added here (HTTP/1.1 adds it when sending, HTTP/2 uses
        // `:authority`).
        let mut request = Request::builder().uri("http://catalog/items").body(()).expect("valid");
        host_from_absolute_form(&mut request);
        assert!(request.headers().get(header::HOST).is_none());
    }

    #[test]
    fn absolute_form_wins_over_host() {
        let request = Request::builder().uri("http://catalog/items").header(header::HOST, "other").body(()).expect("valid");
        assert_eq!(service_of(&request).expect("resolves"), "catalog");
        let request = Request::builder().uri("/items").header(header::HOST, "inventory:80").body(()).expect("valid");
        assert_eq!(service_of(&request).expect("resolves"), "inventory");
        let request = Request::builder().uri("/items").body(()).expect("valid");
        assert!(service_of(&request).is_err());
    }
}
