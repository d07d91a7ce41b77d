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
    fn absolute_form_wins_over_host() {
        let request = Request::builder().uri("http://catalog/items").header(header::HOST, "other").body(()).expect("valid");
        assert_eq!(service_of(&request).expect("resolves"), "catalog");
        let request = Request::builder().uri("/items").header(header::HOST, "inventory:80").body(()).expect("valid");
        assert_eq!(service_of(&request).expect("resolves"), "inventory");
        let request = Request::builder().uri("/items").body(()).expect("valid");
        assert!(service_of(&request).is_err());
    }
}
