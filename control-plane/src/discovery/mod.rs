//! `ferry.v1.Discovery`: the config stream of every sidecar, and the status of all of them.
//!
//! The first message of a stream must be `Hello`. It is validated, the sidecar's instance (if it
//! has an app) is attached to the registry under a lease held by this stream, and a `Welcome`
//! answers. From then on a [`Session`] runs the stream. When the stream ends the lease is
//! released: at once with a goodbye, after the reconnect grace period without one.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use ferry_health::{CheckStatus, Health};
use ferry_proto::{
    v1::{self, control_message, discovery_server::Discovery, sidecar_message},
    validate::{self, FieldError},
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    addresses::AddressTable,
    api::registry_status,
    auth::{Principal, Tokens},
    ca::Authority,
    metrics::PushMetrics,
    registry::{InstanceSpec, Registry, system_time},
    resources::Resources,
};

mod progress;
mod session;
mod status;

pub use self::{
    session::{Credentials, Ended, Session, SessionConfig},
    status::{SidecarRecord, Sidecars},
};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC `Discovery` service.
#[derive(Clone)]
pub struct DiscoveryService {
    registry: Arc<Registry>,
    resources: Arc<Resources>,
    sidecars: Arc<Sidecars>,
    authority: Arc<Authority>,
    tokens: Arc<Tokens>,
    addresses: Arc<AddressTable>,
    config: SessionConfig,
    metrics: PushMetrics,
    server_id: String,
    shutdown: CancellationToken,
    traffic: Arc<crate::traffic::Traffic>,
}

/// A validated Hello.
struct Hello {
    node_id: String,
    service: String,
    instance: Option<InstanceSpec>,
    health: Option<(Health, Vec<CheckStatus>)>,
    versions: HashMap<String, u64>,
    build: String,
    mtls: bool,
    /// The sidecar intercepts its app's connections: it is sent the address table.
    intercept: bool,
    /// The version of the address table it holds; 0 for none.
    addresses_version: u64,
}

/// Validates a health report from a sidecar.
pub(crate) fn health_report(report: &v1::HealthReport) -> Result<(Health, Vec<CheckStatus>), FieldError> {
    let health = Health::try_from(report.health).map_err(|e| FieldError::new("health", e.to_string()))?;
    if report.checks.len() > validate::MAX_CHECKS {
        return Err(FieldError::new("checks", format!("at most {} checks", validate::MAX_CHECKS)));
    }
    if report.unchecked.len() > report.checks.len() {
        return Err(FieldError::new("unchecked", "lists more checks than the report has"));
    }
    let mut statuses = Vec::with_capacity(report.checks.len());
    for (i, check) in report.checks.iter().enumerate() {
        let at = |field: &str| format!("checks[{i}].{field}");
        validate::instance_id(&at("id"), &check.id)?;
        let (status, checked) =
            ferry_health::check_status_from_wire(check.status).map_err(|e| FieldError::new(at("status"), e.to_string()))?;
        let checked = checked && !report.unchecked.contains(&check.id);
        let output = ferry_health::state::truncate(check.output.clone());
        let kind = check.probe.as_ref().map_or("unknown", v1::check::Probe::kind);
        // A sidecar's clock, or a bad peer, must not put a transition in the future.
        let now = std::time::SystemTime::now();
        let last_transition = check.last_transition.map_or(now, system_time).min(now);
        statuses.push(CheckStatus { id: check.id.clone(), kind, status, output, last_transition, checked });
    }
    Ok((health, statuses))
}

impl TryFrom<v1::Hello> for Hello {
    type Error = FieldError;

    fn try_from(hello: v1::Hello) -> Result<Self, FieldError> {
        validate::instance_id("node_id", &hello.node_id)?;
        validate::service_name("service", &hello.service)?;
        let instance = match hello.instance {
            Some(instance) => {
                let spec = InstanceSpec::try_from(instance).map_err(|e| e.within("instance"))?;
                if *spec.service != *hello.service {
                    return Err(FieldError::new(
                        "instance.service",
                        format!("{:?} must equal service {:?}", spec.service, hello.service),
                    ));
                }
                Some(spec)
            }
            None => None,
        };
        if hello.build.len() > 128 {
            return Err(FieldError::new("build", "must be at most 128 characters"));
        }
        let health = hello.health.as_ref().map(health_report).transpose().map_err(|e| e.within("health"))?;
        Ok(Self {
            node_id: hello.node_id,
            service: hello.service,
            instance,
            health,
            versions: hello.versions,
            build: hello.build,
            mtls: hello.mtls,
            intercept: hello.intercept,
            addresses_version: hello.addresses_version,
        })
    }
}

impl DiscoveryService {
    /// A service whose streams end when `shutdown` fires.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Arc<Registry>,
        resources: Arc<Resources>,
        sidecars: Arc<Sidecars>,
        authority: Arc<Authority>,
        tokens: Arc<Tokens>,
        addresses: Arc<AddressTable>,
        config: SessionConfig,
        metrics: PushMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let server_id = format!("{:016x}", rand::random::<u64>());
        let traffic = Arc::default();
        Self { registry, resources, sidecars, authority, tokens, addresses, config, metrics, server_id, shutdown, traffic }
    }

    /// The same service, adding its sidecars' traffic reports to `traffic` (by default, a
    /// window of its own that nothing reads).
    pub fn with_traffic(mut self, traffic: Arc<crate::traffic::Traffic>) -> Self {
        self.traffic = traffic;
        self
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<v1::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ControlStream;

    async fn stream(&self, request: Request<Streaming<v1::SidecarMessage>>) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let principal = Principal::of(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("hello: not received within {HELLO_TIMEOUT:?}")))??;
        let hello = match first.and_then(|m| m.message) {
            Some(sidecar_message::Message::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("hello: the first message on a stream must be hello")),
        };
        let mut hello = Hello::try_from(hello).map_err(|e| Status::invalid_argument(e.within("hello").to_string()))?;
        // Nothing is attached for a sidecar its token does not allow.
        if let Err(denied) = principal.require_service(&hello.service, "opening a config stream") {
            tracing::warn!(node = %hello.node_id, service = %hello.service, %peer, reason = %denied, "refused a sidecar");
            return Err(denied.into());
        }

        let session_id = self.registry.new_session();
        let (health, statuses) = hello.health.unwrap_or((Health::Passing, Vec::new()));
        let identity = ferry_tls::Identity::new(self.authority.trust_domain(), &hello.service).to_string();
        let instance = match hello.instance.take() {
            Some(mut spec) => {
                if hello.mtls {
                    spec.identity = identity;
                }
                let instance = self
                    .registry
                    .attach(session_id, &hello.node_id, spec, health)
                    .map_err(|e| registry_status(e, "hello.instance"))?;
                let _ = self.registry.record_health(&instance.id, health, statuses, Some(session_id));
                Some(instance)
            }
            None => None,
        };
        let instance_id = instance.as_ref().map(|i| i.id.clone());
        tracing::info!(node = %hello.node_id, service = %hello.service, instance = ?instance_id, %peer, "sidecar connected");

        let (outbound, rx) = mpsc::channel(1);
        let welcome = v1::Welcome { instance: instance.map(|i| self.registry.describe(&i)), server_id: self.server_id.clone() };
        outbound
            .try_send(Ok(v1::ControlMessage { message: Some(control_message::Message::Welcome(welcome)) }))
            .map_err(|_| Status::internal("the new stream's channel is full"))?;

        let record = Arc::new(SidecarRecord::new(
            hello.node_id.clone(),
            hello.service,
            instance_id.clone(),
            peer,
            hello.build,
            principal.id().to_owned(),
        ));
        let credentials = match principal.id() {
            "" => Credentials::default(),
            id => Credentials {
                revoked: self.tokens.revoked(id),
                expires: self.tokens.expires_at(id).map(|at| {
                    let left = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
                    tokio::time::Instant::now() + left
                }),
            },
        };
        let session = Session::new(
            session_id,
            self.registry.clone(),
            self.resources.clone(),
            self.authority.watch(),
            self.config.clone(),
            self.metrics.clone(),
            record.clone(),
            hello.versions,
            credentials,
        );
        let session = session.reporting_traffic(self.traffic.clone());
        let session =
            if hello.intercept { session.intercepting(self.addresses.clone(), hello.addresses_version) } else { session };
        let (registry, sidecars, metrics, shutdown) =
            (self.registry.clone(), self.sidecars.clone(), self.metrics.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let _listed = sidecars.connect(session_id, record);
            metrics.connected.inc();
            let ended = session.run(inbound, outbound, shutdown).await;
            metrics.connected.dec();
            tracing::info!(node = %hello.node_id, ?ended, "sidecar disconnected");
            if let Some(id) = instance_id {
                match ended {
                    Ended::Goodbye => registry.detach(session_id, &id, true),
                    Ended::Broken => registry.detach(session_id, &id, false),
                    // The sidecar did nothing wrong; the next control plane restores its lease.
                    Ended::Shutdown => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_sidecars(
        &self,
        request: Request<v1::ListSidecarsRequest>,
    ) -> Result<Response<v1::ListSidecarsResponse>, Status> {
        Principal::of(&request)?.require_read("listing sidecars")?;
        let sidecars = self.sidecars.list(&self.registry, &self.resources, &self.authority);
        Ok(Response::new(v1::ListSidecarsResponse { sidecars }))
    }

    async fn traffic(&self, request: Request<v1::TrafficRequest>) -> Result<Response<v1::TrafficResponse>, Status> {
        Principal::of(&request)?.require_read("reading traffic figures")?;
        Ok(Response::new(self.traffic.snapshot()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(id: &str, status: v1::Health) -> v1::Check {
        v1::Check { id: id.into(), status: status as i32, output: "waiting".into(), ..Default::default() }
    }

    #[test]
    fn a_check_with_no_result_yet_is_read_from_unchecked_or_from_its_status() {
        let report = v1::HealthReport {
            health: v1::Health::Critical as i32,
            // As a sidecar sends it: the assumed status, and the id in `unchecked`.
            checks: vec![check("app:ttl", v1::Health::Critical), check("app:http", v1::Health::Passing)],
            unchecked: vec!["app:ttl".into()],
        };
        let (_, statuses) = health_report(&report).expect("valid");
        let checked: Vec<(&str, Health, bool)> = statuses.iter().map(|s| (s.id.as_str(), s.status, s.checked)).collect();
        assert_eq!(checked, [("app:ttl", Health::Critical, false), ("app:http", Health::Passing, true)]);
        assert_eq!(statuses[0].wire_status(), v1::Health::NotChecked);

        // The status itself says it too.
        let report = v1::HealthReport {
            health: v1::Health::Critical as i32,
            checks: vec![check("app:ttl", v1::Health::NotChecked)],
            unchecked: Vec::new(),
        };
        let (_, statuses) = health_report(&report).expect("valid");
        assert!(!statuses[0].checked);

        let too_many =
            v1::HealthReport { health: v1::Health::Passing as i32, unchecked: vec!["a:ttl".into()], ..Default::default() };
        assert_eq!(health_report(&too_many).map(|_| ()).expect_err("refused").field, "unchecked");
    }
}
