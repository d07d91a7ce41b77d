//! One sidecar's stream: subscriptions, coalesced pushes, and ACK/NACK bookkeeping.
//!
//! A session watches the services its sidecar subscribed to. A change marks the service dirty;
//! dirty services are pushed together, at once when the stream has been quiet for the
//! coalescing bound and otherwise when that bound since the previous push has passed, so no
//! change waits longer than the bound and a burst of changes costs a few pushes. The outbound
//! channel holds a single push: while the sidecar is slow to read, changes keep accumulating
//! and the next push carries the latest state of each service (latest wins).
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
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::{Stream, StreamExt, StreamMap, wrappers::WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::status::SidecarRecord;
use crate::{
    metrics::{KindLabels, PushMetrics},
    registry::{Registry, ServiceSnapshot, SessionId},
};

/// Limits and timing of sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The longest a change waits before it is pushed.
    pub max_delay: Duration,
    /// The most services one sidecar may subscribe to.
    pub max_subscriptions: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self { max_delay: Duration::from_millis(50), max_subscriptions: 10_000 }
    }
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
    config: SessionConfig,
    metrics: PushMetrics,
    record: Arc<SidecarRecord>,
    /// Versions the sidecar said it holds, used when it subscribes.
    held: HashMap<String, u64>,
    subscriptions: HashMap<Arc<str>, Subscription>,
    watches: StreamMap<Arc<str>, WatchStream<Arc<ServiceSnapshot>>>,
    in_flight: VecDeque<InFlight>,
    next_nonce: u64,
    /// When the oldest unpushed change arrived.
    dirty_since: Option<Instant>,
    last_push: Option<Instant>,
}

struct Subscription {
    latest: Arc<ServiceSnapshot>,
    dirty: bool,
    /// The version last pushed and not rejected: what the sidecar holds, or soon will.
    sent: Option<u64>,
    /// The version last acknowledged.
    acked: Option<u64>,
    /// A snapshot of this version was rejected: do not send it again.
    rejected: Option<u64>,
    /// A delta was rejected: the next push must be a full snapshot.
    needs_snapshot: bool,
    /// When the sidecar subscribed: a change older than that waited for the subscription, not
    /// for the push engine.
    subscribed_at: Instant,
}

struct InFlight {
    nonce: String,
    sent_at: Instant,
    /// (service, version, whether it was a full snapshot)
    carried: Vec<(Arc<str>, u64, bool)>,
}

impl Session {
    pub fn new(
        id: SessionId,
        registry: Arc<Registry>,
        config: SessionConfig,
        metrics: PushMetrics,
        record: Arc<SidecarRecord>,
        held: HashMap<String, u64>,
    ) -> Self {
        Self {
            id,
            registry,
            config,
            metrics,
            record,
            held,
            subscriptions: HashMap::new(),
            watches: StreamMap::new(),
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
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = outbound.try_send(Err(Status::unavailable("the control plane is shutting down")));
                    return Ended::Shutdown;
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
                Some((service, snapshot)) = self.watches.next() => self.changed(&service, snapshot),
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
                    self.watches.remove(service.as_str());
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
                    "subscribe.services: at most {} subscriptions per sidecar",
                    self.config.max_subscriptions
                )));
            }
            let watch = self.registry.watch(&service);
            let latest = watch.borrow().clone();
            let held = self.held.get(&service).copied();
            let name = latest.name.clone();
            self.record.subscribed(&name, held);
            self.subscriptions.insert(
                name.clone(),
                Subscription {
                    latest,
                    dirty: false,
                    sent: held,
                    acked: held,
                    rejected: None,
                    needs_snapshot: false,
                    subscribed_at: Instant::now(),
                },
            );
            // The stream yields the current snapshot first, which marks the service dirty.
            self.watches.insert(name, WatchStream::new(watch));
        }
        Ok(())
    }

    fn changed(&mut self, service: &Arc<str>, snapshot: Arc<ServiceSnapshot>) {
        if let Some(subscription) = self.subscriptions.get_mut(service) {
            subscription.latest = snapshot;
            subscription.dirty = true;
            self.dirty_since.get_or_insert_with(Instant::now);
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
        let mut resources = Vec::new();
        let mut carried = Vec::new();
        let now = Instant::now();
        for (name, subscription) in &mut self.subscriptions {
            if !std::mem::take(&mut subscription.dirty) {
                continue;
            }
            let snapshot = &subscription.latest;
            if subscription.sent == Some(snapshot.index) || subscription.rejected == Some(snapshot.index) {
                continue;
            }
            let endpoints = endpoints_for(snapshot, subscription.sent.filter(|_| !subscription.needs_snapshot));
            let is_snapshot = !matches!(endpoints, Some(Endpoints::Delta(_)));
            let kind = match &endpoints {
                Some(Endpoints::Delta(_)) => "delta",
                Some(Endpoints::Snapshot(_)) => "snapshot",
                None => "absent",
            };
            self.metrics.resources.get_or_create(&KindLabels { kind }).inc();
            resources.push(v1::ServiceResources {
                service: name.to_string(),
                version: snapshot.index,
                exists: snapshot.exists(),
                endpoints,
            });
            carried.push((name.clone(), snapshot.index, is_snapshot));
            subscription.sent = Some(snapshot.index);
            self.record.sent(name, snapshot.index);
            let due_since = snapshot.changed_at.max(subscription.subscribed_at);
            self.metrics.propagation.observe(now.saturating_duration_since(due_since).as_secs_f64());
        }
        if resources.is_empty() {
            return None;
        }
        self.next_nonce += 1;
        let nonce = self.next_nonce.to_string();
        self.last_push = Some(now);
        self.in_flight.push_back(InFlight { nonce: nonce.clone(), sent_at: now, carried });
        while self.in_flight.len() > MAX_IN_FLIGHT {
            self.in_flight.pop_front();
        }
        let message = v1::ControlMessage { message: Some(control_message::Message::Push(v1::Push { nonce, resources })) };
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
        for (service, version, _) in push.carried {
            if let Some(subscription) = self.subscriptions.get_mut(&service) {
                subscription.acked = Some(version);
                subscription.needs_snapshot = false;
                self.record.acked(&service, version);
            }
        }
    }

    fn nacked(&mut self, nack: v1::Nack) {
        self.metrics.nacks.inc();
        tracing::warn!(node = %self.record.node_id, nonce = %nack.nonce, error = %nack.error, "sidecar rejected a push");
        let push = self.take_in_flight(&nack.nonce);
        let versions = push.iter().flat_map(|p| p.carried.iter().map(|(s, v, _)| (s.to_string(), *v))).collect();
        let at_fault: HashSet<String> = nack.services.iter().cloned().collect();
        self.record.nacked(v1::NackStatus {
            nonce: nack.nonce,
            error: nack.error,
            at: Some(crate::registry::timestamp(std::time::SystemTime::now())),
            versions,
        });
        let Some(push) = push else {
            // Too old to know what it carried: resend everything in full.
            for subscription in self.subscriptions.values_mut() {
                subscription.sent = subscription.acked;
                subscription.needs_snapshot = true;
                subscription.dirty = true;
            }
            self.dirty_since.get_or_insert_with(Instant::now);
            return;
        };
        for (service, version, was_snapshot) in push.carried {
            let Some(subscription) = self.subscriptions.get_mut(&service) else { continue };
            // A push is applied whole: the sidecar kept what it had acknowledged, and the
            // resources that were fine are sent again.
            subscription.sent = subscription.acked;
            subscription.dirty = true;
            if at_fault.is_empty() || at_fault.contains(&*service) {
                if was_snapshot {
                    subscription.rejected = Some(version);
                } else {
                    subscription.needs_snapshot = true;
                }
            }
        }
        self.dirty_since.get_or_insert_with(Instant::now);
    }
}

/// The endpoints of `snapshot` for a sidecar holding `held`: a delta when the log allows and it
/// is smaller than the whole set, the full set otherwise, nothing for a service without instances.
fn endpoints_for(snapshot: &ServiceSnapshot, held: Option<u64>) -> Option<Endpoints> {
    if !snapshot.exists() {
        return None;
    }
    if let Some(base) = held
        && let Some(delta) = snapshot.changes_since(base)
        && delta.upserted.len() + delta.removed.len() < snapshot.instances.len()
    {
        return Some(Endpoints::Delta(v1::EndpointDelta {
            base_version: base,
            upserted: delta.upserted.iter().map(|i| i.to_endpoint()).collect(),
            removed: delta.removed,
        }));
    }
    Some(Endpoints::Snapshot(v1::Endpoints { endpoints: snapshot.instances.values().map(|i| i.to_endpoint()).collect() }))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
