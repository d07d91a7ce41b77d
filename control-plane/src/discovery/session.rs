//! One sidecar's stream: subscriptions, coalesced pushes, and ACK/NACK bookkeeping.
//!
//! A session watches the services its sidecar subscribed to. A change marks the service dirty;
//! dirty services are pushed together, at once when the stream has been quiet for the
//! coalescing bound and otherwise when that bound since the previous push has passed, so no
//! change waits longer than the bound and a burst of changes costs a few pushes. The outbound
//! channel holds a single push: while the sidecar is slow to read, changes keep accumulating
//! and the next push carries the latest state of each service (latest wins).
//!
//! Besides the services it subscribed to, every sidecar is sent the mesh's trust bundle and the
//! authorization policy of its own service: in the stream's first push, and whenever they
//! change. A revoked or expired token ends the stream.
//!
//! A service the sidecar already holds (by the version it sent in Hello, or the last one pushed)
//! is sent as a delta when the registry's change log reaches back to that version and the delta
//! is smaller than the full set. A NACKed delta is followed by a full snapshot; a NACKed snapshot
//! is not resent until the service changes again.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use ferry_proto::{
    v1::{self, control_message, service_resources::Endpoints, sidecar_message},
    validate,
};
use prost::Message;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::{Stream, StreamExt, StreamMap, wrappers::WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::status::SidecarRecord;
use crate::{
    metrics::{KindLabels, PushMetrics},
    registry::{Registry, ServiceSnapshot, SessionId},
    resources::{Resources, ServiceConfig},
};

/// Limits and timing of sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The longest a change waits before it is pushed.
    pub max_delay: Duration,
    /// The most services one sidecar may subscribe to.
    pub max_subscriptions: usize,
    /// The most bytes of a NACK's error text kept.
    pub max_nack_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self { max_delay: Duration::from_millis(50), max_subscriptions: 10_000, max_nack_bytes: 4096 }
    }
}

/// What ends a session besides its stream: the token it was opened with.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Fires when the token is revoked.
    pub revoked: CancellationToken,
    /// When the token expires, if it does.
    pub expires: Option<Instant>,
}

/// Pushes kept for matching ACKs; older ones are forgotten.
const MAX_IN_FLIGHT: usize = 64;

/// The sending half of a sidecar's stream.
pub type Outbound = mpsc::Sender<Result<v1::ControlMessage, Status>>;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The sidecar said goodbye.
    Goodbye,
    /// The stream broke, or the sidecar broke the protocol.
    Broken,
    /// The control plane is shutting down.
    Shutdown,
}

pub struct Session {
    id: SessionId,
    registry: Arc<Registry>,
    resources: Arc<Resources>,
    config: SessionConfig,
    metrics: PushMetrics,
    record: Arc<SidecarRecord>,
    /// Versions the sidecar said it holds, used when it subscribes.
    held: HashMap<String, u64>,
    subscriptions: HashMap<Arc<str>, Subscription>,
    endpoint_watches: StreamMap<Arc<str>, WatchStream<Arc<ServiceSnapshot>>>,
    config_watches: StreamMap<Arc<str>, WatchStream<Arc<ServiceConfig>>>,
    in_flight: VecDeque<InFlight>,
    next_nonce: u64,
    /// When the oldest unpushed change arrived.
    dirty_since: Option<Instant>,
    last_push: Option<Instant>,
    /// The trust bundle, as the CA publishes it.
    bundle_watch: WatchStream<Arc<v1::TrustBundle>>,
    bundle: Option<Arc<v1::TrustBundle>>,
    bundle_sent: Option<u64>,
    /// The config of the sidecar's own service, for its authorization policy.
    own_watch: WatchStream<Arc<ServiceConfig>>,
    own: Option<Arc<ServiceConfig>>,
    authorization_sent: Option<u64>,
    authorization_acked: Option<u64>,
    /// An authorization version the sidecar refused: not sent again until it changes.
    authorization_rejected: Option<u64>,
    credentials: Credentials,
}

/// What the sidecar holds of a service (or will, once the pushes in flight land).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// The service's version: the largest of the parts'.
    pub(crate) version: u64,
    /// The registry index of the endpoints; `None` when only the version is known (from Hello).
    pub(crate) endpoints: Option<u64>,
    pub(crate) route: Option<u64>,
    pub(crate) policy: Option<u64>,
}

impl Held {
    /// Only the version is known: every part must be sent if it changed.
    fn version_only(version: u64) -> Self {
        Self { version, endpoints: None, route: None, policy: None }
    }
}

struct Subscription {
    endpoints: Arc<ServiceSnapshot>,
    config: Arc<ServiceConfig>,
    dirty: bool,
    /// What was last pushed and not rejected.
    sent: Option<Held>,
    /// What was last acknowledged.
    acked: Option<Held>,
    /// A full push of this version was rejected: do not send it again.
    rejected: Option<u64>,
    /// A push built on what the sidecar held was rejected: the next one carries everything.
    needs_full: bool,
    /// When the sidecar subscribed: a change older than that waited for the subscription, not
    /// for the push engine.
    subscribed_at: Instant,
}

impl Subscription {
    /// The service's version now.
    fn version(&self) -> u64 {
        self.endpoints.index.max(self.config.version)
    }

    fn held_now(&self) -> Held {
        Held {
            version: self.version(),
            endpoints: Some(self.endpoints.index),
            route: Some(self.config.route_version),
            policy: Some(self.config.policy_version),
        }
    }
}

struct InFlight {
    nonce: String,
    sent_at: Instant,
    /// (service, what the push gave, whether it carried everything)
    carried: Vec<(Arc<str>, Held, bool)>,
    /// The trust bundle version it carried, if any.
    bundle: Option<u64>,
    /// The authorization version it carried, if any.
    authorization: Option<u64>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: SessionId,
        registry: Arc<Registry>,
        resources: Arc<Resources>,
        bundle: watch::Receiver<Arc<v1::TrustBundle>>,
        config: SessionConfig,
        metrics: PushMetrics,
        record: Arc<SidecarRecord>,
        held: HashMap<String, u64>,
        credentials: Credentials,
    ) -> Self {
        let own_watch = WatchStream::new(resources.watch(&record.service));
        Self {
            bundle_watch: WatchStream::new(bundle),
            bundle: None,
            bundle_sent: None,
            own_watch,
            own: None,
            authorization_sent: None,
            authorization_acked: None,
            authorization_rejected: None,
            credentials,
            id,
            registry,
            resources,
            config,
            metrics,
            record,
            held,
            subscriptions: HashMap::new(),
            endpoint_watches: StreamMap::new(),
            config_watches: StreamMap::new(),
            in_flight: VecDeque::new(),
            next_nonce: 0,
            dirty_since: None,
            last_push: None,
        }
    }

    /// The session's identity in the registry.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Runs the session until the stream ends, the sidecar says goodbye or `shutdown` fires.
    pub async fn run<S>(mut self, mut inbound: S, outbound: Outbound, shutdown: CancellationToken) -> Ended
    where
        S: Stream<Item = Result<v1::SidecarMessage, Status>> + Unpin,
    {
        loop {
            let flush_at = self.flush_at();
            // Biased: answers and subscriptions first, then every ready change, then the push, so
            // changes that arrive together leave together. A sidecar that floods its own stream
            // only delays its own pushes.
            let flush_now = flush_at.is_some_and(|at| at <= Instant::now());
            let expires = self.credentials.expires;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = outbound.try_send(Err(Status::unavailable("the control plane is shutting down")));
                    return Ended::Shutdown;
                }
                () = self.credentials.revoked.cancelled() => {
                    tracing::info!(node = %self.record.node_id, "closing stream: its token was revoked");
                    let _ = outbound.try_send(Err(Status::unauthenticated("the token of this stream was revoked")));
                    return Ended::Broken;
                }
                () = sleep_until(expires), if expires.is_some() => {
                    tracing::info!(node = %self.record.node_id, "closing stream: its token expired");
                    let _ = outbound.try_send(Err(Status::unauthenticated("the token of this stream has expired")));
                    return Ended::Broken;
                }
                message = inbound.next() => match message {
                    Some(Ok(message)) => match self.handle(message) {
                        Ok(true) => {}
                        Ok(false) => return Ended::Goodbye,
                        Err(status) => {
                            tracing::warn!(node = %self.record.node_id, error = %status.message(), "closing stream: protocol error");
                            let _ = outbound.try_send(Err(status));
                            return Ended::Broken;
                        }
                    },
                    Some(Err(status)) => {
                        tracing::debug!(node = %self.record.node_id, error = %status, "stream failed");
                        return Ended::Broken;
                    }
                    None => return Ended::Broken,
                },
                Some((service, snapshot)) = self.endpoint_watches.next() => self.endpoints_changed(&service, snapshot),
                Some((service, config)) = self.config_watches.next() => self.config_changed(&service, config),
                Some(bundle) = self.bundle_watch.next() => {
                    if self.bundle_sent != Some(bundle.version) {
                        self.dirty_since.get_or_insert_with(Instant::now);
                    }
                    self.bundle = Some(bundle);
                }
                Some(own) = self.own_watch.next() => {
                    if self.authorization_sent != Some(own.authorization_version) {
                        self.dirty_since.get_or_insert_with(Instant::now);
                    }
                    self.own = Some(own);
                }
                permit = outbound.reserve(), if flush_now => match permit {
                    Ok(permit) => {
                        if let Some(push) = self.build_push() {
                            permit.send(Ok(push));
                        }
                    }
                    Err(_) => return Ended::Broken,
                },
                () = sleep_until(flush_at), if flush_at.is_some() && !flush_now => {}
            }
        }
    }

    /// Handles one message; `Ok(false)` on goodbye.
    fn handle(&mut self, message: v1::SidecarMessage) -> Result<bool, Status> {
        match message.message {
            Some(sidecar_message::Message::Subscribe(subscribe)) => self.subscribe(subscribe.services)?,
            Some(sidecar_message::Message::Unsubscribe(unsubscribe)) => {
                for service in unsubscribe.services {
                    self.endpoint_watches.remove(service.as_str());
                    self.config_watches.remove(service.as_str());
                    self.subscriptions.remove(service.as_str());
                    self.record.unsubscribed(&service);
                }
            }
            Some(sidecar_message::Message::Ack(ack)) => self.acked(&ack.nonce),
            Some(sidecar_message::Message::Nack(nack)) => self.nacked(nack),
            Some(sidecar_message::Message::Goodbye(goodbye)) => {
                tracing::info!(node = %self.record.node_id, reason = %goodbye.reason, "sidecar said goodbye");
                return Ok(false);
            }
            Some(sidecar_message::Message::Health(report)) => {
                let (health, statuses) =
                    super::health_report(&report).map_err(|e| Status::invalid_argument(e.within("health").to_string()))?;
                let Some(id) = self.record.instance_id.clone() else {
                    return Err(Status::invalid_argument("health: this sidecar registered no instance"));
                };
                if let Ok(true) = self.registry.record_health(&id, health, statuses, Some(self.id)) {
                    tracing::info!(node = %self.record.node_id, instance = %id, %health, "instance health changed");
                }
            }
            Some(sidecar_message::Message::Hello(_)) => return Err(Status::invalid_argument("hello: sent twice on one stream")),
            None => return Err(Status::invalid_argument("message: empty")),
        }
        Ok(true)
    }

    fn subscribe(&mut self, services: Vec<String>) -> Result<(), Status> {
        for (i, service) in services.into_iter().enumerate() {
            validate::service_name(&format!("subscribe.services[{i}]"), &service)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if self.subscriptions.contains_key(service.as_str()) {
                continue;
            }
            if self.subscriptions.len() >= self.config.max_subscriptions {
                return Err(Status::resource_exhausted(format!(
                    "subscribe.services: at most {} subscriptions per sidecar (the control plane's --max-subscriptions)",
                    self.config.max_subscriptions
                )));
            }
            self.add_subscription(&service);
        }
        Ok(())
    }

    /// Starts following `service`. Its watch streams yield the current state first, which marks
    /// it dirty; the subscription is also marked dirty at once, for pushes built right away.
    fn add_subscription(&mut self, service: &str) {
        let endpoints = self.registry.watch(service);
        let config = self.resources.watch(service);
        let latest = endpoints.borrow().clone();
        let current_config = config.borrow().clone();
        let name = latest.name.clone();
        let held = self.held.get(service).map(|&version| {
            // Versions come from one counter: a held version newer than the service's config
            // can only be an endpoints index, and the config cannot have changed since.
            if current_config.version < version {
                Held {
                    version,
                    endpoints: Some(version),
                    route: Some(current_config.route_version),
                    policy: Some(current_config.policy_version),
                }
            } else {
                Held::version_only(version)
            }
        });
        self.record.subscribed(&name, held);
        self.subscriptions.insert(
            name.clone(),
            Subscription {
                endpoints: latest,
                config: current_config,
                dirty: true,
                sent: held,
                acked: held,
                rejected: None,
                needs_full: false,
                subscribed_at: Instant::now(),
            },
        );
        self.dirty_since.get_or_insert_with(Instant::now);
        self.endpoint_watches.insert(name.clone(), WatchStream::new(endpoints));
        self.config_watches.insert(name, WatchStream::new(config));
    }

    fn endpoints_changed(&mut self, service: &Arc<str>, snapshot: Arc<ServiceSnapshot>) {
        if let Some(subscription) = self.subscriptions.get_mut(service) {
            subscription.endpoints = snapshot;
            subscription.dirty = true;
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    fn config_changed(&mut self, service: &Arc<str>, config: Arc<ServiceConfig>) {
        if let Some(subscription) = self.subscriptions.get_mut(service) {
            subscription.config = config;
            subscription.dirty = true;
            self.dirty_since.get_or_insert_with(Instant::now);
        }
    }

    /// Subscribes to the services the subscribed routes send traffic to, so that a route and
    /// what it references arrive in one push.
    fn follow_dependencies(&mut self) {
        let needed: Vec<String> = self
            .subscriptions
            .values()
            .flat_map(|s| s.config.dependencies())
            .filter(|d| !self.subscriptions.contains_key(d.as_str()))
            .collect();
        for service in needed {
            if self.subscriptions.len() >= self.config.max_subscriptions {
                tracing::warn!(node = %self.record.node_id, %service, "cannot follow a route's backend: too many subscriptions");
                break;
            }
            if !self.subscriptions.contains_key(service.as_str()) {
                self.add_subscription(&service);
            }
        }
    }

    /// When the pending changes are due: at once after a quiet period, otherwise one coalescing
    /// bound after the previous push.
    fn flush_at(&self) -> Option<Instant> {
        let dirty_since = self.dirty_since?;
        Some(match self.last_push {
            Some(last) => dirty_since.max(last + self.config.max_delay),
            None => dirty_since,
        })
    }

    /// Builds one push of every dirty service whose version the sidecar does not hold.
    fn build_push(&mut self) -> Option<v1::ControlMessage> {
        self.dirty_since = None;
        self.follow_dependencies();
        let now = Instant::now();
        let mut resources = Vec::new();
        let mut carried = Vec::new();
        for (name, subscription) in &mut self.subscriptions {
            if !std::mem::take(&mut subscription.dirty) {
                continue;
            }
            let version = subscription.version();
            if subscription.sent.map(|h| h.version) == Some(version) || subscription.rejected == Some(version) {
                continue;
            }
            let base = subscription.sent.filter(|_| !subscription.needs_full);
            let (service_resources, full) = resources_for(name, subscription, base);
            let kind = match &service_resources.endpoints {
                Some(Endpoints::Delta(_)) => "delta",
                Some(Endpoints::Snapshot(_)) => "snapshot",
                None => "absent",
            };
            self.metrics.resources.get_or_create(&KindLabels { kind }).inc();
            resources.push(service_resources);
            let held = subscription.held_now();
            carried.push((name.clone(), held, full));
            subscription.sent = Some(held);
            self.record.sent(name, held);
            let due_since = subscription.endpoints.changed_at.max(subscription.subscribed_at);
            self.metrics.propagation.observe(now.saturating_duration_since(due_since).as_secs_f64());
        }
        let trust_bundle = self.bundle.as_ref().filter(|b| self.bundle_sent != Some(b.version)).map(|b| (**b).clone());
        let authorization = self
            .own
            .as_ref()
            .filter(|own| {
                self.authorization_sent != Some(own.authorization_version)
                    && self.authorization_rejected != Some(own.authorization_version)
            })
            .map(|own| v1::AuthorizationUpdate {
                policy: own.authorization.as_deref().cloned(),
                version: own.authorization_version,
            });
        if resources.is_empty() && trust_bundle.is_none() && authorization.is_none() {
            return None;
        }
        let bundle = trust_bundle.as_ref().map(|b| b.version);
        if let Some(version) = bundle {
            self.bundle_sent = Some(version);
            self.record.bundle_sent(version);
        }
        let authorization_version = authorization.as_ref().map(|a| a.version);
        if let Some(version) = authorization_version {
            self.authorization_sent = Some(version);
            self.record.authorization_sent(version);
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        self.last_push = Some(now);
        self.in_flight.push_back(InFlight {
            nonce: nonce.clone(),
            sent_at: now,
            carried,
            bundle,
            authorization: authorization_version,
        });
        while self.in_flight.len() > MAX_IN_FLIGHT {
            self.in_flight.pop_front();
        }
        let push = v1::Push { nonce, resources, trust_bundle, authorization };
        let message = v1::ControlMessage { message: Some(control_message::Message::Push(push)) };
        self.metrics.pushes.inc();
        self.metrics.bytes.inc_by(message.encoded_len() as u64);
        Some(message)
    }

    fn take_in_flight(&mut self, nonce: &str) -> Option<InFlight> {
        let position = self.in_flight.iter().position(|p| p.nonce == nonce)?;
        // Answers come in order: anything older was answered already or lost with its answer.
        self.in_flight.drain(..position);
        self.in_flight.pop_front()
    }

    fn acked(&mut self, nonce: &str) {
        let Some(push) = self.take_in_flight(nonce) else {
            tracing::debug!(node = %self.record.node_id, nonce, "ACK for an unknown push");
            return;
        };
        self.metrics.acks.inc();
        self.metrics.ack_latency.observe(push.sent_at.elapsed().as_secs_f64());
        if let Some(version) = push.bundle {
            self.record.bundle_acked(version);
        }
        if let Some(version) = push.authorization {
            self.authorization_acked = Some(version);
            self.record.authorization_acked(version);
        }
        for (service, held, _) in push.carried {
            if let Some(subscription) = self.subscriptions.get_mut(&service) {
                subscription.acked = Some(held);
                subscription.needs_full = false;
                self.record.acked(&service, held);
            }
        }
    }

    fn nacked(&mut self, mut nack: v1::Nack) {
        self.metrics.nacks.inc();
        truncate(&mut nack.error, self.config.max_nack_bytes);
        nack.services.truncate(MAX_IN_FLIGHT);
        tracing::warn!(node = %self.record.node_id, nonce = %nack.nonce, error = %nack.error, "sidecar rejected a push");
        let push = self.take_in_flight(&nack.nonce);
        let versions = push.iter().flat_map(|p| p.carried.iter().map(|(s, held, _)| (s.to_string(), held.version))).collect();
        let at_fault: HashSet<String> = nack.services.iter().cloned().collect();
        self.record.nacked(v1::NackStatus {
            nonce: nack.nonce,
            error: nack.error,
            at: Some(crate::registry::timestamp(std::time::SystemTime::now())),
            versions,
        });
        // The bundle and the authorization policy go again; one the sidecar found fault with
        // (a NACK naming no service) only once changed.
        let whole = at_fault.is_empty();
        if let Some(push) = &push {
            if push.bundle.is_some() {
                self.bundle_sent = None;
            }
            if let Some(version) = push.authorization {
                self.authorization_sent = self.authorization_acked;
                if whole {
                    self.authorization_rejected = Some(version);
                    self.record.authorization_rejected(version);
                }
            }
        }
        let Some(push) = push else {
            // Too old to know what it carried: resend everything in full.
            self.bundle_sent = None;
            self.authorization_sent = self.authorization_acked;
            for subscription in self.subscriptions.values_mut() {
                subscription.sent = subscription.acked;
                subscription.needs_full = true;
                subscription.dirty = true;
            }
            self.dirty_since.get_or_insert_with(Instant::now);
            return;
        };
        for (service, held, full) in push.carried {
            let Some(subscription) = self.subscriptions.get_mut(&service) else { continue };
            // A push is applied whole: the sidecar kept what it had acknowledged, and the
            // resources that were fine are sent again.
            subscription.sent = subscription.acked;
            subscription.dirty = true;
            if at_fault.is_empty() || at_fault.contains(&*service) {
                self.record.rejected(&service, held);
                if full {
                    subscription.rejected = Some(held.version);
                } else {
                    subscription.needs_full = true;
                }
            }
        }
        self.dirty_since.get_or_insert_with(Instant::now);
    }
}

/// The resources of one service for a sidecar holding `base` (everything when `None`), and
/// whether they carry everything (nothing built on what the sidecar holds).
fn resources_for(name: &Arc<str>, subscription: &Subscription, base: Option<Held>) -> (v1::ServiceResources, bool) {
    let snapshot = &subscription.endpoints;
    let config = &subscription.config;
    let version = subscription.version();
    let endpoints = match base {
        _ if !snapshot.exists() => None,
        Some(base) => match base.endpoints {
            // Unchanged endpoints: an empty delta, so the route can move on its own.
            Some(held) if held == snapshot.index => Some(Endpoints::Delta(v1::EndpointDelta {
                base_version: base.version,
                upserted: Vec::new(),
                removed: Vec::new(),
            })),
            Some(held) => delta(snapshot, held, base.version),
            None => None,
        },
        None => None,
    }
    .or_else(|| {
        snapshot.exists().then(|| {
            Endpoints::Snapshot(v1::Endpoints { endpoints: snapshot.instances.values().map(|i| i.to_endpoint()).collect() })
        })
    });
    let route = (base.and_then(|b| b.route) != Some(config.route_version))
        .then(|| v1::RouteUpdate { route: config.route.as_deref().cloned() });
    let policy = (base.and_then(|b| b.policy) != Some(config.policy_version))
        .then(|| v1::PolicyUpdate { policy: config.policy.as_deref().cloned() });
    let full = base.is_none();
    (v1::ServiceResources { service: name.to_string(), version, exists: snapshot.exists(), endpoints, route, policy }, full)
}

/// The endpoint changes since index `held`, as a delta from the service version `base_version`,
/// when the change log reaches back that far and the delta is smaller than the whole set.
fn delta(snapshot: &ServiceSnapshot, held: u64, base_version: u64) -> Option<Endpoints> {
    let delta = snapshot.changes_since(held)?;
    (delta.upserted.len() + delta.removed.len() < snapshot.instances.len()).then(|| {
        Endpoints::Delta(v1::EndpointDelta {
            base_version,
            upserted: delta.upserted.iter().map(|i| i.to_endpoint()).collect(),
            removed: delta.removed,
        })
    })
}

/// Cuts `text` to at most `max` bytes, on a character boundary, marked when cut.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
