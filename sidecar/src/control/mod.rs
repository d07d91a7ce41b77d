//! The sidecar's side of the config stream (`ferry.v1.Discovery/Stream`).
//!
//! Connects, says Hello (node id, the app's instance, the versions already held), subscribes to
//! every service in the [`Catalog`] and to each new one as requests ask for it, applies pushes
//! and ACKs or NACKs each by nonce. When the control plane is unreachable or goes away, the
//! catalog keeps serving the last good config and the client reconnects with jittered
//! exponential backoff. On shutdown it says goodbye, so the instance is removed at once.
//!
//! With several control-plane replicas (`--control-plane A,B`, or a host name that resolves to
//! several addresses), the stream goes to one at a time and, when it breaks, to the next one
//! ([`access::Rotation`]): the new replica gets the same Hello (so it registers the instance
//! again) with the versions held (so it sends only what changed meanwhile) and the same
//! subscriptions. The data path serves from the config held throughout.
//!
//! The stream runs over TLS, verified with `--ca-file` and the trust bundle last pushed (so a
//! CA rotation needs no new file), and carries the sidecar's token. Pushes also carry the trust
//! bundle and the authorization policy of the sidecar's own service; everything in a push is
//! checked before any of it is applied.
//!
//! Every [`TRAFFIC_REPORT_INTERVAL`] while connected, the stream sends what the sidecar proxied
//! since the last report ([`crate::metrics::TrafficTally`]), if anything.

mod access;
mod status;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ferry_proto::v1::{self, control_message, discovery_client::DiscoveryClient, sidecar_message};
use ferry_tls::api::Target;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use self::{
    access::{ControlAccess, Rotation},
    status::{ConfigSource, ControlState, ControlStatus},
};
use crate::{
    catalog::{Catalog, Rejection},
    health::{HealthWatch, Urgency},
    mesh::{self, Mesh},
    metrics::{Metrics, ResultLabels},
};

/// Output-only health changes are sent at most this often; status changes go at once.
const OUTPUT_REFRESH: Duration = Duration::from_secs(10);

/// The largest push the sidecar accepts.
const MAX_PUSH_BYTES: usize = 64 << 20;

/// How often the traffic figures are reported, by default.
pub const TRAFFIC_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// How long the control plane may take to answer Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after a (re)connection its view may lag, beyond the longest reconnect backoff (which
/// the other sidecars wait, at worst, before they reconnect too): see [`Catalog::settle`].
const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// How to reach the control plane and what to tell it.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub access: ControlAccess,
    pub node_id: String,
    pub service: String,
    /// The app's instance; `None` for a sidecar without an app.
    pub instance: Option<v1::Instance>,
    /// The app's health, reported in Hello and whenever it changes; `None` without an app.
    pub health: Option<HealthWatch>,
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Whether the instance's inbound listener serves mTLS.
    pub mtls: bool,
    /// Whether the sidecar intercepts its app's connections: it asks for the address table.
    pub intercept: bool,
    /// How often the traffic figures are sent ([`TRAFFIC_REPORT_INTERVAL`] but in tests).
    pub traffic_interval: Duration,
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("no control-plane address: {0}")]
    Resolve(String),
    #[error("connecting: {}", ferry_runtime::error_chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("{}", describe(.0))]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Protocol(String),
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// Runs the config stream until `shutdown`, reconnecting as needed: to the next address of
/// the list after each failure, with jittered exponential backoff between attempts.
pub async fn run(
    config: ControlConfig,
    catalog: Arc<Catalog>,
    mesh: Mesh,
    status: Arc<ControlStatus>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    let mut rotation = Rotation::default();
    loop {
        let mut welcomed = false;
        let resolved = tokio::select! {
            resolved = config.access.urls.resolve() => resolved,
            () = shutdown.cancelled() => return,
        };
        for (url, why) in &resolved.failures {
            tracing::debug!(%url, %why, "a control-plane URL resolves to no address");
        }
        let target = rotation.pick(&resolved.targets).cloned();
        let result = match &target {
            Some(target) => {
                tracing::debug!(url = %target.url, address = %target.addr, "connecting to the control plane");
                stream(&config, target, &catalog, &mesh, &status, &metrics, &shutdown, &mut welcomed).await
            }
            None => Err(StreamError::Resolve(resolved.why_none())),
        };
        status.update(|s| {
            // The stream was up until now.
            if s.connected {
                s.last_contact = Some(SystemTime::now());
            }
            s.connected = false;
        });
        metrics.control_plane_connected.set(0);
        match result {
            Ok(()) => return,
            Err(error) => {
                if welcomed {
                    failures = 0;
                }
                failures = failures.saturating_add(1);
                rotation.failed();
                let delay = backoff(config.backoff_base, config.backoff_max, failures);
                let (url, address, error) = match &target {
                    Some(target) => (target.url.as_str(), target.addr.to_string(), format!("{target}: {error}")),
                    None => ("-", "-".to_owned(), error.to_string()),
                };
                tracing::warn!(%url, %address, %error, retry_in = ?delay, "control plane stream down; serving the last config");
                status.update(|s| s.last_error = Some(error));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// The wait before reconnecting after `attempt` failures in a row.
fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    ferry_runtime::backoff::Backoff::new(base, max).delay(attempt)
}

fn message(message: sidecar_message::Message) -> v1::SidecarMessage {
    v1::SidecarMessage { message: Some(message) }
}

async fn health_changed(health: Option<&mut HealthWatch>) {
    match health {
        Some(health) => health.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn try_send(outbound: &mpsc::Sender<v1::SidecarMessage>, m: sidecar_message::Message) -> Result<(), StreamError> {
    outbound.try_send(message(m)).map_err(|_| StreamError::Protocol("the outbound queue is full".into()))
}

/// Applies a push whole or not at all: the trust bundle and the authorization policy it
/// carries are checked with its services before anything is put in force.
fn apply(push: &v1::Push, catalog: &Catalog, mesh: &Mesh) -> Result<(), Rejection> {
    let whole = |error: String| Rejection { error, services: Vec::new() };
    let bundle = match &push.trust_bundle {
        Some(bundle) => Some((bundle, mesh::check_bundle(bundle).map_err(|e| whole(format!("trust_bundle: {e}")))?)),
        None => None,
    };
    let authorization = match &push.authorization {
        Some(update) => Some((update, mesh::check_authorization(update).map_err(|e| whole(format!("authorization: {e}")))?)),
        None => None,
    };
    catalog.apply(push)?;
    if let Some((pushed, bundle)) = bundle {
        mesh.set_bundle(pushed, bundle);
    }
    if let Some((update, compiled)) = authorization {
        mesh.set_authorization(update, compiled);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // One call site; a struct of borrowed parts would only rename them.
async fn stream(
    config: &ControlConfig,
    target: &Target,
    catalog: &Arc<Catalog>,
    mesh: &Mesh,
    status: &ControlStatus,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    welcomed: &mut bool,
) -> Result<(), StreamError> {
    let access = config.access.access(&target.url);
    let bearer = access.bearer().map_err(|e| StreamError::Protocol(e.to_string()))?;
    let endpoint = access
        .endpoint_at(target.addr)
        .map_err(|e| StreamError::Protocol(e.to_string()))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = tokio::select! {
        channel = endpoint.connect() => channel.map_err(|error| match ferry_tls::api::hint(&access.url, &error) {
            Some(hint) => StreamError::Protocol(format!("connecting: {}: {hint}", ferry_runtime::error_chain(&error))),
            None => StreamError::Connect(error),
        })?,
        () = shutdown.cancelled() => return Ok(()),
    };
    // A push carries whole services; tonic's 4 MiB default would cap a service near 50,000 endpoints.
    let channel = tonic::service::interceptor::InterceptedService::new(channel, bearer);
    let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_PUSH_BYTES);

    let (outbound, rx) = mpsc::channel(64);
    let mut subscribed: HashSet<Arc<str>> = catalog.subscriptions().into_iter().collect();
    let mut health = config.health.clone();
    let mut sent: Option<Urgency> = None;
    let initial = health.as_mut().map(|h| {
        let (report, urgency) = h.current();
        sent = Some(urgency);
        report
    });
    let hello = v1::Hello {
        health: initial,
        node_id: config.node_id.clone(),
        service: config.service.clone(),
        instance: config.instance.clone(),
        versions: catalog.versions(),
        build: env!("CARGO_PKG_VERSION").to_owned(),
        mtls: config.mtls,
        intercept: config.intercept,
        addresses_version: if config.intercept { catalog.addresses_version() } else { 0 },
    };
    try_send(&outbound, sidecar_message::Message::Hello(hello))?;
    if !subscribed.is_empty() {
        let services = subscribed.iter().map(|s| s.to_string()).collect();
        try_send(&outbound, sidecar_message::Message::Subscribe(v1::Subscribe { services }))?;
    }
    // A control plane (or something in front of it) that accepts the stream but never answers
    // must not hold the sidecar forever: keepalives alone would keep such a stream open.
    let welcome = async {
        let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?;
        Ok::<_, StreamError>((inbound, first))
    };
    let (mut inbound, first) = tokio::select! {
        answered = tokio::time::timeout(WELCOME_TIMEOUT, welcome) => answered
            .map_err(|_| StreamError::Protocol(format!("no welcome within {WELCOME_TIMEOUT:?}")))??,
        () = shutdown.cancelled() => return Ok(()),
    };

    match first.and_then(|m| m.message) {
        Some(control_message::Message::Welcome(welcome)) => {
            *welcomed = true;
            let until = std::time::Instant::now() + config.backoff_max + SETTLE_MARGIN;
            catalog.settle(until);
            let settling = catalog.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                settling.settled(until);
            });
            tracing::info!(
                url = %target.url,
                address = %target.addr,
                server = %welcome.server_id,
                instance = welcome.instance.as_ref().map_or("none", |i| i.id.as_str()),
                "connected to the control plane"
            );
            config.access.answered(target);
            status.update(|s| {
                s.connected = true;
                s.replica = Some(target.clone());
                s.registered = welcome.instance.or(s.registered.take());
                s.server_id = welcome.server_id;
                s.last_contact = Some(SystemTime::now());
                s.last_error = None;
            });
            metrics.control_plane_connected.set(1);
        }
        other => return Err(StreamError::Protocol(format!("expected welcome, got {other:?}"))),
    }

    let mut output_due: Option<tokio::time::Instant> = None;
    let mut last_report = tokio::time::Instant::now();
    // Traffic counted while no stream was up is dropped: a report covers only time connected,
    // so the control plane's rates are not inflated by a burst of stale counts.
    let _ = metrics.traffic.take(Duration::ZERO);
    let mut traffic_taken = tokio::time::Instant::now();
    let mut traffic_due = tokio::time::interval_at(traffic_taken + config.traffic_interval, config.traffic_interval);
    traffic_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = traffic_due.tick() => {
                let now = tokio::time::Instant::now();
                if let Some(report) = metrics.traffic.take(now - traffic_taken) {
                    match outbound.try_send(message(sidecar_message::Message::Traffic(report))) {
                        // A report that finds the queue full is dropped: figures, not state.
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return Err(StreamError::Protocol("stream closed".into())),
                    }
                }
                traffic_taken = now;
            }
            () = health_changed(health.as_mut()) => {
                let Some(watch) = health.as_mut() else { continue };
                let (report, urgency) = watch.current();
                if sent != Some(urgency) || last_report.elapsed() >= OUTPUT_REFRESH {
                    match outbound.try_send(message(sidecar_message::Message::Health(report))) {
                        Ok(()) => {
                            sent = Some(urgency);
                            last_report = tokio::time::Instant::now();
                            output_due = None;
                        }
                        // Reports coalesce: when the queue is full, the latest goes a little later.
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            output_due = Some(tokio::time::Instant::now() + Duration::from_millis(100));
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Err(StreamError::Protocol("stream closed".into())),
                    }
                } else {
                    // Only outputs changed: show them, but at a bounded rate.
                    output_due.get_or_insert(last_report + OUTPUT_REFRESH);
                }
            }
            () = sleep_until(output_due), if output_due.is_some() => {
                output_due = None;
                if let Some(watch) = health.as_mut() {
                    let (report, urgency) = watch.current();
                    match outbound.try_send(message(sidecar_message::Message::Health(report))) {
                        Ok(()) => {
                            sent = Some(urgency);
                            last_report = tokio::time::Instant::now();
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            output_due = Some(tokio::time::Instant::now() + Duration::from_millis(100));
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Err(StreamError::Protocol("stream closed".into())),
                    }
                }
            }
            () = shutdown.cancelled() => {
                let goodbye = v1::Goodbye { reason: "shutting down".into() };
                if outbound.send(message(sidecar_message::Message::Goodbye(goodbye))).await.is_ok() {
                    drop(outbound);
                    // The control plane closes the stream once it has the goodbye.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Ok(Some(_)) = inbound.message().await {} }).await;
                }
                return Ok(());
            }
            () = catalog.subscriptions_changed() => {
                let current: HashSet<Arc<str>> = catalog.subscriptions().into_iter().collect();
                let new: Vec<String> =
                    current.iter().filter(|s| subscribed.insert((*s).clone())).map(|s| s.to_string()).collect();
                // Services the catalog dropped (nobody used them for a while): the control plane
                // stops pushing them.
                let gone: Vec<String> = subscribed.iter().filter(|s| !current.contains(*s)).map(|s| s.to_string()).collect();
                subscribed.retain(|s| current.contains(s));
                if !gone.is_empty() {
                    tracing::debug!(services = ?gone, "unsubscribing");
                    try_send(&outbound, sidecar_message::Message::Unsubscribe(v1::Unsubscribe { services: gone }))?;
                }
                if !new.is_empty() {
                    tracing::debug!(services = ?new, "subscribing");
                    try_send(&outbound, sidecar_message::Message::Subscribe(v1::Subscribe { services: new }))?;
                }
            }
            received = inbound.message() => {
                let Some(received) = received? else {
                    return Err(StreamError::Protocol("the control plane closed the stream".into()));
                };
                status.update(|s| s.last_contact = Some(SystemTime::now()));
                if let Some(control_message::Message::Push(push)) = received.message {
                    let answer = match apply(&push, catalog, mesh) {
                        Ok(()) => {
                            metrics.config_updates.get_or_create(&ResultLabels { result: "applied" }).inc();
                            status.update(|s| {
                                s.pushes_applied += 1;
                                s.config_source = ConfigSource::ControlPlane;
                            });
                            tracing::debug!(nonce = %push.nonce, resources = push.resources.len(), "applied push");
                            sidecar_message::Message::Ack(v1::Ack { nonce: push.nonce })
                        }
                        Err(rejection) => {
                            metrics.config_updates.get_or_create(&ResultLabels { result: "rejected" }).inc();
                            tracing::warn!(nonce = %push.nonce, error = %rejection.error, "rejected push; keeping the last good config");
                            status.update(|s| {
                                s.pushes_rejected += 1;
                                s.last_rejection = Some(rejection.error.clone());
                            });
                            sidecar_message::Message::Nack(v1::Nack { nonce: push.nonce, error: rejection.error, services: rejection.services })
                        }
                    };
                    outbound.send(message(answer)).await.map_err(|_| StreamError::Protocol("stream closed".into()))?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 1..30 {
            let delay = backoff(base, max, attempt);
            let ceiling = (base * 2u32.pow((attempt - 1).min(16))).min(max);
            assert!(delay <= ceiling && delay >= ceiling / 4, "attempt {attempt}: {delay:?}");
        }
    }
}
