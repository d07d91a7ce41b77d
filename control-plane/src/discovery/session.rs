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
//! change. A sidecar that intercepts its app's connections (`Hello.intercept`) is also sent the
//! mesh's address table: whole in the first push (or as a delta from the version its Hello says
//! it holds), then a delta whenever the table changes, coalesced with everything else; after a
//! NACK of a push that carried it, whole again. A revoked or expired token ends the stream.
//!
//! A service the sidecar already holds (by the version it sent in Hello, or the last one pushed)
//! is sent as a delta when the registry's change log reaches back to that version and the delta
//! is smaller than the full set. A NACKed delta is followed by a full snapshot; a NACKed snapshot
//! is not resent until the service changes again.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use ferry_proto::{
    v1::{self, sidecar_message},
    validate,
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::{Stream, StreamExt, StreamMap, wrappers::WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use self::answers::InFlight;
use super::{progress::Held, status::SidecarRecord};
use crate::{
    addresses::AddressTable,
    metrics::PushMetrics,
    registry::{Registry, ServiceSnapshot, SessionId},
    resources::{Resources, ServiceConfig},
};

mod answers;
mod push;

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

/// The sending half of a sidecar's stream.
pub type Outbound = mpsc::Sender<Result<v1::ControlMessage, Status>>;

/// Ends the stream with `status`, after whatever is still queued (the channel holds one
/// message, so a `try_send` behind a queued push would drop the reason and end the stream with
/// OK); a peer that reads nothing gets a second, then the stream ends all the same.
async fn end_with(outbound: &Outbound, status: Status) {
    let _ = tokio::time::timeout(Duration::from_secs(1), outbound.send(Err(status))).await;
}

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

/// One sidecar's stream, run by [`Session::run`]: its pushes are built in `push`, its answers
/// matched in `answers`.
pub struct Session {
    id: SessionId,
    registry: Arc<Registry>,
    resources: Arc<Resources>,
    config: SessionConfig,
    metrics: PushMetrics,
    record: Arc<SidecarRecord>,
    /// Versions the sidecar said in Hello it holds, used when it subscribes.
    hello_versions: HashMap<String, u64>,
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
    /// The bundle version the sidecar holds, or will once the pushes in flight land.
    bundle_held: Option<u64>,
    /// The config of the sidecar's own service, for its authorization policy.
    own_watch: WatchStream<Arc<ServiceConfig>>,
    own: Option<Arc<ServiceConfig>>,
    /// The authorization version the sidecar holds, or will once the pushes in flight land. A
    /// version it refused (its progress says which) is not sent again until it changes.
    authorization_held: Option<u64>,
    /// The address table, for a sidecar that intercepts.
    addresses: Option<AddressFeed>,
    credentials: Credentials,
    /// Where the sidecar's traffic reports go, with its service (the caller of its outbound
    /// figures); without it, reports are checked and dropped.
    traffic: Option<(Arc<crate::traffic::Traffic>, Arc<str>)>,
}

/// The address table as one intercepting sidecar is sent it.
struct AddressFeed {
    table: Arc<AddressTable>,
    /// The table's version.
    watch: WatchStream<u64>,
    /// The version the sidecar holds, or will once the pushes in flight land; `None`: it must be
    /// sent the whole table.
    held: Option<u64>,
    /// A whole table the sidecar refused: not sent again until the table changes.
    rejected: Option<u64>,
}

impl AddressFeed {
    /// What the next push carries of the table, if the sidecar does not hold it as it is.
    fn next_update(&mut self) -> Option<v1::AddressTable> {
        let version = self.table.version();
        if self.held == Some(version) || self.rejected == Some(version) {
            return None;
        }
        let update = self.table.update_for(self.held)?;
        self.held = Some(update.version);
        Some(update)
    }
}

struct Subscription {
    endpoints: Arc<ServiceSnapshot>,
    config: Arc<ServiceConfig>,
    dirty: bool,
    /// What the sidecar holds, or will once the pushes in flight land: what the next push
    /// builds on. A NACK takes it back to what the sidecar last acknowledged.
    held: Option<Held>,
    /// A full push of this version was rejected: do not send it again.
    rejected_snapshot: Option<u64>,
    /// A push built on what the sidecar held was rejected: the next one carries everything.
    needs_full: bool,
    /// When the sidecar subscribed: a change older than that waited for the subscription, not
    /// for the push engine.
    subscribed_at: Instant,
}

impl Subscription {
    /// The service's version now.
    fn version(&self) -> u64 {
        self.endpoints.version().max(self.config.version)
    }

    /// What the sidecar holds once the service as it is now reaches it.
    fn current(&self) -> Held {
        Held {
            version: self.version(),
            endpoints: Some(self.endpoints.index),
            route: Some(self.config.route_version),
            policy: Some(self.config.policy_version),
        }
    }
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
        hello_versions: HashMap<String, u64>,
        credentials: Credentials,
    ) -> Self {
        let own_watch = WatchStream::new(resources.watch(&record.service));
        Self {
            bundle_watch: WatchStream::new(bundle),
            bundle: None,
            bundle_held: None,
            own_watch,
            own: None,
            authorization_held: None,
            addresses: None,
            credentials,
            traffic: None,
            id,
            registry,
            resources,
            config,
            metrics,
            record,
            hello_versions,
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

    /// Sends the sidecar the mesh's address table, which it holds at version `held` already (0
    /// for none): it intercepts its app's connections.
    pub fn intercepting(mut self, table: Arc<AddressTable>, held: u64) -> Self {
        let watch = WatchStream::new(table.watch());
        self.addresses = Some(AddressFeed { table, watch, held: (held > 0).then_some(held), rejected: None });
        self
    }

    /// Adds the sidecar's traffic reports to `traffic`.
    pub fn reporting_traffic(mut self, traffic: Arc<crate::traffic::Traffic>) -> Self {
        self.traffic = Some((traffic, Arc::from(self.record.service.as_str())));
        self
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
                    end_with(&outbound, Status::unavailable("the control plane is shutting down")).await;
                    return Ended::Shutdown;
                }
                () = self.credentials.revoked.cancelled() => {
                    tracing::info!(node = %self.record.node_id, "closing stream: its token was revoked");
                    end_with(&outbound, Status::unauthenticated("the token of this stream was revoked")).await;
                    return Ended::Broken;
                }
                () = sleep_until(expires), if expires.is_some() => {
                    tracing::info!(node = %self.record.node_id, "closing stream: its token expired");
                    end_with(&outbound, Status::unauthenticated("the token of this stream has expired")).await;
                    return Ended::Broken;
                }
                message = inbound.next() => match message {
                    Some(Ok(message)) => match self.handle(message) {
                        Ok(true) => {}
                        Ok(false) => return Ended::Goodbye,
                        Err(status) => {
                            tracing::warn!(node = %self.record.node_id, error = %status.message(), "closing stream: protocol error");
                            end_with(&outbound, status).await;
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
                    if self.bundle_held != Some(bundle.version) {
                        self.dirty_since.get_or_insert_with(Instant::now);
                    }
                    self.bundle = Some(bundle);
                }
                Some(own) = self.own_watch.next() => {
                    if self.authorization_held != Some(own.authorization_version) {
                        self.dirty_since.get_or_insert_with(Instant::now);
                    }
                    self.own = Some(own);
                }
                Some(version) = next_address_version(&mut self.addresses) => {
                    if self.addresses.as_ref().is_some_and(|feed| feed.held != Some(version)) {
                        self.dirty_since.get_or_insert_with(Instant::now);
                    }
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
                    self.record.progress.unsubscribed(&service);
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
            Some(sidecar_message::Message::Traffic(report)) => {
                validate::traffic_report(&report).map_err(|e| Status::invalid_argument(e.within("traffic").to_string()))?;
                if let Some((traffic, service)) = &self.traffic {
                    traffic.record(service, &report);
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
        let held = self.hello_versions.get(service).map(|&version| {
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
        self.record.progress.subscribed(&name, held);
        self.subscriptions.insert(
            name.clone(),
            Subscription {
                endpoints: latest,
                config: current_config,
                dirty: true,
                held,
                rejected_snapshot: None,
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
}

/// The address table's next version, for a sidecar that is sent it; never for the others.
async fn next_address_version(feed: &mut Option<AddressFeed>) -> Option<u64> {
    match feed {
        Some(feed) => feed.watch.next().await,
        None => std::future::pending().await,
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
