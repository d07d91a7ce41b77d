//! The control plane's Config API over HTTP, as the demo uses it: apply a scenario's YAML as a
//! person would with curl, delete routes, read the routes the control plane holds, and wait until
//! the sidecars that call a service have acknowledged its new version, which is when a route is
//! in force.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use ferry_proto::v1;
use ferry_tls::api::HttpApi;
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;

/// How long one call to the API may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed call to the control plane's HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{method} {url}: {reason}")]
    Unreachable { method: Method, url: String, reason: String },
    #[error("{method} {url} answered {status}: {message}")]
    Refused { method: Method, url: String, status: StatusCode, message: String },
    #[error("{method} {url}: the answer is not the JSON expected: {reason}")]
    Undecodable { method: Method, url: String, reason: String },
}

/// The sidecars that call a service, and how far they are from a version of it.
#[derive(Debug, Clone)]
pub struct Convergence {
    /// Sidecars subscribed to the service.
    pub callers: usize,
    /// Those that have not acknowledged the version yet, with what they hold.
    pub behind: Vec<String>,
}

/// The control plane's HTTP API, over TLS with the admin token.
#[derive(Clone)]
pub struct ConfigApi {
    http: HttpApi,
    base: String,
}

impl ConfigApi {
    /// The API at `addr`, verified with the roots of `ca_pem`, called with `token`.
    pub fn new(addr: SocketAddr, ca_pem: &str, token: String) -> anyhow::Result<Self> {
        let http = HttpApi::new(addr, Some(ca_pem), Some(token)).map_err(anyhow::Error::msg)?;
        let base = http.base();
        Ok(Self { http, base })
    }

    /// `POST /v1/tokens`: a new token of `kind` (such as `TOKEN_KIND_SIDECAR`) for `service`;
    /// returns its secret.
    pub async fn create_token(&self, kind: &str, service: &str) -> Result<String, ApiError> {
        let body = serde_json::json!({ "kind": kind, "service": service, "description": "ferry-demo" }).to_string();
        let (url, status, bytes) = self.call(Method::POST, "/v1/tokens", Some(("application/json", Bytes::from(body)))).await?;
        let created: v1::CreateTokenResponse = decode(Method::POST, &url, status, &bytes)?;
        Ok(created.secret)
    }

    /// `DELETE /v1/authorizations/{service}`: the version that deleted it, or `None` if there
    /// was none.
    pub async fn delete_authorization(&self, service: &str) -> Result<Option<u64>, ApiError> {
        let (url, status, bytes) = self.call(Method::DELETE, &format!("/v1/authorizations/{service}"), None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decode::<serde_json::Value>(Method::DELETE, &url, status, &bytes)?;
        let (url, status, bytes) = self.call(Method::GET, &format!("/v1/authorizations/{service}/history"), None).await?;
        let history: v1::HistoryResponse = decode(Method::GET, &url, status, &bytes)?;
        Ok(history.entries.first().map(|entry| entry.version))
    }

    /// Waits up to `limit` until every sidecar of `service` (those with an instance) enforces
    /// its authorization policy at `version`; returns how many there are.
    pub async fn wait_authorization_in_force(&self, service: &str, version: u64, limit: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.call(Method::GET, "/v1/sidecars", None).await {
                Ok((url, status, bytes)) => match decode::<v1::ListSidecarsResponse>(Method::GET, &url, status, &bytes) {
                    Ok(answer) => {
                        let own: Vec<&v1::SidecarStatus> =
                            answer.sidecars.iter().filter(|s| s.service == service && !s.instance_id.is_empty()).collect();
                        let behind: Vec<String> = own
                            .iter()
                            .filter(|s| s.authorization.unwrap_or_default().acked_version < version)
                            .map(|s| {
                                format!(
                                    "{} holds authorization/{service} v{}",
                                    s.node_id,
                                    s.authorization.unwrap_or_default().acked_version
                                )
                            })
                            .collect();
                        if behind.is_empty() {
                            return Ok(own.len());
                        }
                        behind.join("; ")
                    }
                    Err(error) => error.to_string(),
                },
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                let version = ferry_runtime::short::version(version);
                return Err(format!("authorization/{service} version {version} is not in force after {limit:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Its base URL, such as `https://127.0.0.1:7071`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /v1/apply` of multi-document YAML: every resource as stored, with its diff.
    pub async fn apply(&self, yaml: &'static str) -> Result<Vec<v1::AppliedResource>, ApiError> {
        let body = Some(("application/yaml", Bytes::from_static(yaml.as_bytes())));
        let (url, status, bytes) = self.call(Method::POST, "/v1/apply", body).await?;
        let answer: v1::ApplyResponse = decode(Method::POST, &url, status, &bytes)?;
        Ok(answer.applied)
    }

    /// `DELETE /v1/routes/{service}`: the version that deleted it, or `None` if there was none.
    pub async fn delete_route(&self, service: &str) -> Result<Option<u64>, ApiError> {
        let (url, status, bytes) = self.call(Method::DELETE, &format!("/v1/routes/{service}"), None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decode::<serde_json::Value>(Method::DELETE, &url, status, &bytes)?;
        // The delete answers the route it removed; its own version is the newest in the history.
        let (url, status, bytes) = self.call(Method::GET, &format!("/v1/routes/{service}/history"), None).await?;
        let history: v1::HistoryResponse = decode(Method::GET, &url, status, &bytes)?;
        Ok(history.entries.first().map(|entry| entry.version))
    }

    /// `GET /v1/routes`: every route the control plane holds, by service.
    pub async fn routes(&self) -> Result<BTreeMap<String, v1::Route>, ApiError> {
        let (url, status, bytes) = self.call(Method::GET, "/v1/routes", None).await?;
        let answer: v1::ListResponse = decode(Method::GET, &url, status, &bytes)?;
        Ok(answer
            .resources
            .into_iter()
            .filter_map(|resource| match resource.kind {
                Some(v1::resource::Kind::Route(route)) => Some((route.service.clone(), route)),
                _ => None,
            })
            .collect())
    }

    /// The sidecars that call one of `services` and do not hold its current route yet (the
    /// version that deleted it, for a deleted one), each with what it holds. Empty when the
    /// routes of `services` are in force everywhere.
    pub async fn routes_behind(&self, services: &BTreeSet<String>) -> Result<Vec<String>, ApiError> {
        let (url, status, bytes) = self.call(Method::GET, "/v1/sidecars", None).await?;
        let answer: v1::ListSidecarsResponse = decode(Method::GET, &url, status, &bytes)?;
        let mut behind = Vec::new();
        for sidecar in &answer.sidecars {
            for subscription in sidecar.subscriptions.iter().filter(|s| services.contains(&s.service)) {
                let route = subscription.route.unwrap_or_default();
                // The service's version covers its route: a sidecar that acknowledged a version
                // of the service past the route's change holds that change.
                let held = route.acked_version.max(subscription.acked_version);
                if held < route.current_version {
                    behind.push(format!(
                        "{} holds route/{} v{}, not v{}",
                        sidecar.node_id, subscription.service, route.acked_version, route.current_version
                    ));
                }
            }
        }
        Ok(behind)
    }

    /// Where the sidecars that call `service` stand with respect to its `version`.
    pub async fn convergence(&self, service: &str, version: u64) -> Result<Convergence, ApiError> {
        let (url, status, bytes) = self.call(Method::GET, "/v1/sidecars", None).await?;
        let answer: v1::ListSidecarsResponse = decode(Method::GET, &url, status, &bytes)?;
        let mut convergence = Convergence { callers: 0, behind: Vec::new() };
        for sidecar in answer.sidecars {
            for subscription in sidecar.subscriptions.iter().filter(|s| s.service == service) {
                convergence.callers += 1;
                if subscription.acked_version < version {
                    let acked = ferry_runtime::short::version(subscription.acked_version);
                    let mut behind = format!("{} holds {service} version {acked}", sidecar.node_id);
                    if let Some(nack) = &sidecar.last_nack {
                        behind.push_str(&format!(" and last rejected a push: {}", nack.error));
                    }
                    convergence.behind.push(behind);
                }
            }
        }
        Ok(convergence)
    }

    /// Waits up to `limit` until every sidecar calling `service` holds `version`; returns how
    /// many there are, or why they are not there yet.
    pub async fn wait_in_force(&self, service: &str, version: u64, limit: Duration) -> Result<usize, String> {
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.convergence(service, version).await {
                Ok(convergence) if convergence.behind.is_empty() => return Ok(convergence.callers),
                Ok(convergence) => convergence.behind.join("; "),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                let version = ferry_runtime::short::version(version);
                return Err(format!("{service} version {version} is not in force after {limit:?}: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<(String, StatusCode, Bytes), ApiError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |reason: String| ApiError::Unreachable { method: method.clone(), url: url.clone(), reason };
        match tokio::time::timeout(CALL_TIMEOUT, self.http.call(method.clone(), path, body)).await {
            Ok(Ok((status, _, bytes))) => Ok((url, status, bytes)),
            Ok(Err(reason)) => Err(unreachable(ferry_runtime::error_chain(reason.as_ref()))),
            Err(_) => Err(unreachable(format!("no answer within {CALL_TIMEOUT:?}"))),
        }
    }
}

/// Decodes a successful answer; an error answer becomes [`ApiError::Refused`] with the API's
/// own words (`{"error": "...", "field": "..."}`).
fn decode<T: DeserializeOwned>(method: Method, url: &str, status: StatusCode, bytes: &[u8]) -> Result<T, ApiError> {
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(bytes).trim().to_owned());
        return Err(ApiError::Refused { method, url: url.to_owned(), status, message });
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::Undecodable { method, url: url.to_owned(), reason: e.to_string() })
}
