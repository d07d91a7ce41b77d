//! Simulated sidecars: each opens its own connection and `ferry.v1.Discovery/Stream`, says Hello
//! as a sidecar without an app (no instance, so the registry keeps its size), subscribes to its
//! services, applies every push to the endpoints it holds (a snapshot replaces them, a delta
//! must build on the version held) and ACKs it by nonce, or NACKs it as a real sidecar would.
//!
//! What each applied push brought, when, and how many bytes it weighed goes on a shared
//! [`Board`], which the benchmark reads to tell when sidecars are configured and when a change
//! reached them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context, bail};
use ferry_proto::v1::{self, control_message, discovery_client::DiscoveryClient, service_resources::Endpoints, sidecar_message};
use ferry_tls::api::Access;
use prost::Message;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, service::interceptor::InterceptedService};

use super::registry::service_name;

/// The largest push accepted, as in the real sidecar.
const MAX_PUSH_BYTES: usize = 64 << 20;

/// The services sidecar `index` subscribes to: `per_sidecar` distinct ones, spread evenly so that
/// consecutive sidecars cover every service.
pub fn subscriptions(index: usize, services: usize, per_sidecar: usize) -> Vec<usize> {
    let step = (services / per_sidecar.max(1)).max(1);
    (0..per_sidecar).map(|slot| (index + slot * step) % services).collect()
}

/// How a push carried a service's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    Snapshot,
    Delta,
    /// No endpoints: the service has no instance.
    Absent,
}

/// One service applied from one push by one sidecar.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    pub sidecar: u32,
    pub service: u32,
    pub version: u64,
    /// When the push had been applied and its ACK sent, since the board's epoch.
    pub at: Duration,
    /// The encoded size of the whole push (`ControlMessage`).
    pub push_bytes: u32,
    /// The encoded size of a push carrying this service alone.
    pub alone_bytes: u32,
    pub carried: Carried,
    /// Endpoints held after applying it.
    pub endpoints: u32,
}

/// What every simulated sidecar has applied.
pub struct Board {
    epoch: Instant,
    per_sidecar: usize,
    state: Mutex<BoardState>,
    changed: watch::Sender<u64>,
}

/// The board's contents.
pub struct BoardState {
    /// The version held of each (sidecar, subscription slot).
    held: Vec<Option<u64>>,
    /// When each sidecar's stream was open and welcomed.
    pub welcomed_at: Vec<Option<Duration>>,
    /// When each sidecar first held all its subscriptions.
    pub configured_at: Vec<Option<Duration>>,
    pub configured: usize,
    pub applied: Vec<Applied>,
    /// Streams that failed, and why the first one did.
    pub failed: usize,
    pub first_failure: Option<String>,
    pub nacks: usize,
    /// Attempts to open a stream that failed and were retried.
    pub connect_retries: usize,
}

impl BoardState {
    /// The version that `sidecar` holds in subscription `slot`.
    pub fn held(&self, sidecar: usize, slot: usize, per_sidecar: usize) -> Option<u64> {
        self.held.get(sidecar * per_sidecar + slot).copied().flatten()
    }
}

impl Board {
    /// A board for `sidecars` with `per_sidecar` subscriptions each.
    pub fn new(sidecars: usize, per_sidecar: usize) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            per_sidecar,
            state: Mutex::new(BoardState {
                held: vec![None; sidecars * per_sidecar],
                welcomed_at: vec![None; sidecars],
                configured_at: vec![None; sidecars],
                configured: 0,
                applied: Vec::new(),
                failed: 0,
                first_failure: None,
                nacks: 0,
                connect_retries: 0,
            }),
            changed: watch::Sender::new(0),
        })
    }

    /// The time since the board was made.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The time from the board's epoch to `instant`.
    pub fn since_epoch(&self, instant: std::time::Instant) -> Duration {
        Instant::from_std(instant).saturating_duration_since(self.epoch)
    }

    /// Reads the board.
    pub fn lock(&self) -> MutexGuard<'_, BoardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(in crate::cp_bench) fn record(&self, sidecar: usize, applied: Vec<(usize, Applied)>) {
        {
            let mut state = self.lock();
            for (slot, applied) in applied {
                if let Some(held) = state.held.get_mut(sidecar * self.per_sidecar + slot) {
                    *held = Some(applied.version);
                }
                let configured = (0..self.per_sidecar).all(|slot| state.held(sidecar, slot, self.per_sidecar).is_some());
                if configured && state.configured_at[sidecar].is_none() {
                    state.configured_at[sidecar] = Some(applied.at);
                    state.configured += 1;
                }
                state.applied.push(applied);
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn welcomed(&self, sidecar: usize) {
        let at = self.now();
        if let Some(welcomed) = self.lock().welcomed_at.get_mut(sidecar) {
            *welcomed = Some(at);
        }
    }

    fn retried(&self) {
        self.lock().connect_retries += 1;
    }

    fn failed(&self, error: String) {
        let at = self.now();
        {
            let mut state = self.lock();
            state.failed += 1;
            // When, and how far the others had got, to tell a connect storm from a later break.
            let welcomed = state.welcomed_at.iter().flatten().count();
            let configured = state.configured;
            state.first_failure.get_or_insert_with(|| {
                format!(
                    "{error} ({:.1} s after the sidecars began to connect, with {welcomed} streams welcomed and {configured} sidecars configured)",
                    at.as_secs_f64()
                )
            });
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn nacked(&self) {
        self.lock().nacks += 1;
    }

    /// Waits until `done` holds for the board, or `timeout` passes; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&BoardState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut changed = self.changed.subscribe();
        loop {
            changed.borrow_and_update();
            if done(&self.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                return false;
            }
        }
    }
}

/// The endpoints a sidecar holds of one service.
#[derive(Debug)]
struct Held {
    version: u64,
    endpoints: HashMap<String, v1::Endpoint>,
}

/// A push that could not be applied: the NACK's text and the services at fault.
#[derive(Debug, PartialEq, Eq)]
struct Rejected(String, Vec<String>);

/// One simulated sidecar.
pub struct SimSidecar {
    index: usize,
    services: Vec<usize>,
    names: Vec<String>,
    held: Vec<Option<Held>>,
}

impl SimSidecar {
    /// Sidecar `index`, subscribing to `services`.
    pub fn new(index: usize, services: Vec<usize>) -> Self {
        let names = services.iter().map(|&s| service_name(s)).collect();
        let held = services.iter().map(|_| None).collect();
        Self { index, services, names, held }
    }

    /// Runs the stream until the task is dropped; a failure goes on the board.
    pub async fn run(mut self, access: Access, board: Arc<Board>, timeout: Duration) {
        if let Err(error) = self.connect_and_stream(&access, &board, timeout).await {
            board.failed(format!("sidecar {}: {error:#}", self.index));
        }
    }

    /// Opens the stream, retrying with the real sidecar's backoff until `timeout` has passed,
    /// then serves it. A stream that breaks after its Welcome is a failure: nothing in a healthy
    /// run should break one.
    async fn connect_and_stream(&mut self, url: &Access, board: &Board, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut attempt = 0;
        let (outbound, inbound) = loop {
            match self.open(url, timeout).await {
                Ok(stream) => break stream,
                Err(error) => {
                    attempt += 1;
                    let delay = backoff(self.index, attempt);
                    if Instant::now() + delay >= deadline {
                        return Err(error.context(format!("after {attempt} attempts")));
                    }
                    board.retried();
                    tokio::time::sleep(delay).await;
                }
            }
        };
        board.welcomed(self.index);
        self.serve(outbound, inbound, board).await
    }

    /// Connects, says Hello, subscribes, and waits for the Welcome.
    async fn open(
        &self,
        access: &Access,
        timeout: Duration,
    ) -> anyhow::Result<(mpsc::Sender<v1::SidecarMessage>, Streaming<v1::ControlMessage>)> {
        // The settings of the real sidecar's connection: TLS and a token.
        let channel = access
            .endpoint()?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .context("connecting")?;
        let channel = InterceptedService::new(channel, access.bearer()?);
        let mut client = DiscoveryClient::new(channel).max_decoding_message_size(MAX_PUSH_BYTES);
        let (outbound, rx) = mpsc::channel(16);
        let hello = v1::Hello {
            node_id: format!("bench-sidecar-{:06}", self.index),
            service: "bench-client".to_owned(),
            build: "ferry-cp-bench".to_owned(),
            ..Default::default()
        };
        let subscribe = v1::Subscribe { services: self.names.clone() };
        for message in [sidecar_message::Message::Hello(hello), sidecar_message::Message::Subscribe(subscribe)] {
            outbound.try_send(v1::SidecarMessage { message: Some(message) }).context("queueing hello")?;
        }
        let welcome = async {
            let mut inbound = client.stream(ReceiverStream::new(rx)).await.context("opening the stream")?.into_inner();
            match inbound.message().await.context("waiting for the welcome")?.and_then(|m| m.message) {
                Some(control_message::Message::Welcome(_)) => Ok(inbound),
                other => bail!("expected a welcome, got {other:?}"),
            }
        };
        let inbound =
            tokio::time::timeout(timeout, welcome).await.map_err(|_| anyhow::anyhow!("no welcome within {timeout:?}"))??;
        Ok((outbound, inbound))
    }

    /// Applies and answers pushes until the stream ends.
    async fn serve(
        &mut self,
        outbound: mpsc::Sender<v1::SidecarMessage>,
        mut inbound: Streaming<v1::ControlMessage>,
        board: &Board,
    ) -> anyhow::Result<()> {
        loop {
            let Some(message) = inbound.message().await.context("receiving")? else {
                bail!("the control plane closed the stream");
            };
            let push_bytes = message.encoded_len();
            let push = match message.message {
                Some(control_message::Message::Push(push)) => push,
                other => bail!("unexpected message: {other:?}"),
            };
            let answer = match self.apply(&push) {
                Ok(applied) => {
                    let ack = sidecar_message::Message::Ack(v1::Ack { nonce: push.nonce });
                    outbound.send(v1::SidecarMessage { message: Some(ack) }).await.context("sending an ACK")?;
                    let at = board.now();
                    let push_bytes = u32::try_from(push_bytes).unwrap_or(u32::MAX);
                    let applied = applied
                        .into_iter()
                        .map(|(slot, partial)| (slot, Applied { sidecar: self.index as u32, at, push_bytes, ..partial }))
                        .collect();
                    board.record(self.index, applied);
                    continue;
                }
                Err(Rejected(error, services)) => sidecar_message::Message::Nack(v1::Nack { nonce: push.nonce, error, services }),
            };
            board.nacked();
            outbound.send(v1::SidecarMessage { message: Some(answer) }).await.context("sending a NACK")?;
        }
    }

    /// Applies a push whole or not at all; returns what it brought, by subscription slot (with
    /// `sidecar`, `at` and `push_bytes` left for the caller to fill in).
    fn apply(&mut self, push: &v1::Push) -> Result<Vec<(usize, Applied)>, Rejected> {
        let mut slots = Vec::with_capacity(push.resources.len());
        for resources in &push.resources {
            let reject = |error: String| Rejected(error, vec![resources.service.clone()]);
            let slot = self
                .names
                .iter()
                .position(|n| *n == resources.service)
                .ok_or_else(|| reject(format!("{}: not subscribed", resources.service)))?;
            if slots.contains(&slot) {
                return Err(reject(format!("{}: appears twice in one push", resources.service)));
            }
            if let Some(Endpoints::Delta(delta)) = &resources.endpoints {
                let held = self.held[slot].as_ref().map(|h| h.version);
                if held != Some(delta.base_version) {
                    return Err(reject(format!(
                        "{}: delta.base_version {} does not match the version held, {held:?}",
                        resources.service, delta.base_version
                    )));
                }
            }
            slots.push(slot);
        }
        let mut applied = Vec::with_capacity(slots.len());
        for (resources, slot) in push.resources.iter().zip(slots) {
            let held = self.held[slot].get_or_insert_with(|| Held { version: 0, endpoints: HashMap::new() });
            let carried = match &resources.endpoints {
                None => {
                    held.endpoints.clear();
                    Carried::Absent
                }
                Some(Endpoints::Snapshot(set)) => {
                    held.endpoints = set.endpoints.iter().map(|e| (e.id.clone(), e.clone())).collect();
                    Carried::Snapshot
                }
                Some(Endpoints::Delta(delta)) => {
                    for id in &delta.removed {
                        held.endpoints.remove(id);
                    }
                    for endpoint in &delta.upserted {
                        held.endpoints.insert(endpoint.id.clone(), endpoint.clone());
                    }
                    Carried::Delta
                }
            };
            held.version = resources.version;
            let alone = alone_push_len(push.nonce.len(), resources.encoded_len());
            applied.push((
                slot,
                Applied {
                    sidecar: 0,
                    service: self.services[slot] as u32,
                    version: resources.version,
                    at: Duration::ZERO,
                    push_bytes: 0,
                    alone_bytes: u32::try_from(alone).unwrap_or(u32::MAX),
                    carried,
                    endpoints: held.endpoints.len() as u32,
                },
            ));
        }
        Ok(applied)
    }
}

/// The real sidecar's reconnect delay (`ferry_runtime::backoff`: a ceiling of 200 ms doubling
/// up to 10 s, a wait between a quarter and all of it), with the jitter drawn from the
/// sidecar's index and the attempt so that runs repeat.
fn backoff(index: usize, attempt: u32) -> Duration {
    let ceiling = (200u64 << attempt.saturating_sub(1).min(6)).min(10_000);
    // splitmix64 of (index, attempt).
    let mut z = (index as u64) << 32 ^ u64::from(attempt);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    Duration::from_millis(ceiling / 4 + z % (ceiling - ceiling / 4 + 1))
}

/// The encoded size of a `ControlMessage` whose push has a nonce of `nonce_len` bytes and one
/// `ServiceResources` of `resource_len` bytes.
fn alone_push_len(nonce_len: usize, resource_len: usize) -> usize {
    use prost::encoding::{encoded_len_varint, key_len};
    let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
    // proto3 leaves an empty string out.
    let nonce = if nonce_len == 0 { 0 } else { field(1, nonce_len) };
    field(2, nonce + field(2, resource_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str) -> v1::Endpoint {
        v1::Endpoint {
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 80,
            health: v1::Health::Passing as i32,
            ..Default::default()
        }
    }

    fn push(nonce: &str, resources: Vec<v1::ServiceResources>) -> v1::Push {
        v1::Push { nonce: nonce.into(), resources, ..Default::default() }
    }

    fn resources(service: &str, version: u64, endpoints: Endpoints) -> v1::ServiceResources {
        v1::ServiceResources { service: service.into(), version, exists: true, endpoints: Some(endpoints), ..Default::default() }
    }

    #[test]
    fn subscriptions_are_distinct_and_cover_every_service() {
        let mut covered = [false; 10];
        for index in 0..10 {
            let services = subscriptions(index, 10, 3);
            let mut distinct = services.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 3, "{services:?}");
            services.iter().for_each(|&s| covered[s] = true);
        }
        assert!(covered.iter().all(|&c| c));
        assert_eq!(subscriptions(4, 1, 1), [0]);
    }

    #[test]
    fn snapshots_replace_deltas_build_on_the_version_held() {
        let mut sidecar = SimSidecar::new(0, vec![1, 2]);
        let (a, b) = (service_name(1), service_name(2));
        let snapshot = Endpoints::Snapshot(v1::Endpoints { endpoints: vec![endpoint("x"), endpoint("y")] });
        let applied = sidecar.apply(&push("1", vec![resources(&a, 5, snapshot)])).expect("applies");
        assert_eq!((applied[0].0, applied[0].1.version, applied[0].1.endpoints), (0, 5, 2));
        assert_eq!(applied[0].1.carried, Carried::Snapshot);

        let delta = |base| {
            Endpoints::Delta(v1::EndpointDelta { base_version: base, upserted: vec![endpoint("z")], removed: vec!["x".into()] })
        };
        let stale = sidecar.apply(&push("2", vec![resources(&a, 7, delta(4))])).expect_err("not on the version held");
        assert_eq!(stale.1, std::slice::from_ref(&a));
        let unknown = sidecar.apply(&push("3", vec![resources(&b, 7, delta(0))])).expect_err("nothing held");
        assert_eq!(unknown.1, std::slice::from_ref(&b));
        assert!(sidecar.apply(&push("4", vec![resources("other", 7, delta(5))])).is_err(), "not subscribed");

        let applied = sidecar.apply(&push("5", vec![resources(&a, 7, delta(5))])).expect("applies");
        assert_eq!((applied[0].1.version, applied[0].1.endpoints, applied[0].1.carried), (7, 2, Carried::Delta));
        let held = sidecar.held[0].as_ref().expect("held");
        let mut ids: Vec<_> = held.endpoints.keys().cloned().collect();
        ids.sort();
        assert_eq!(ids, ["y", "z"]);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_ten_seconds() {
        for attempt in 1..20 {
            let ceiling = Duration::from_millis((200u64 << (attempt - 1).min(6)).min(10_000));
            for index in 0..50 {
                let delay = backoff(index, attempt);
                assert!(delay <= ceiling && delay >= ceiling / 4, "attempt {attempt}: {delay:?}");
            }
        }
        assert_ne!(backoff(1, 3), backoff(2, 3), "jittered");
    }

    #[test]
    fn the_size_of_a_push_alone_is_what_it_encodes_to() {
        let resource = resources("svc-0001", 9, Endpoints::Snapshot(v1::Endpoints { endpoints: vec![endpoint("x"); 50] }));
        for nonce in ["", "1", "12345"] {
            let message =
                v1::ControlMessage { message: Some(control_message::Message::Push(push(nonce, vec![resource.clone()]))) };
            assert_eq!(alone_push_len(nonce.len(), resource.encoded_len()), message.encoded_len(), "nonce {nonce:?}");
        }
    }
}
