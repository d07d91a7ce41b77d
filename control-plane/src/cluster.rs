//! One replica of the control plane among several on a shared etcd store.
//!
//! - **One order of changes.** The replica loads everything under the prefix at one revision,
//!   then watches from the next one. Every change, its own writes included, reaches the
//!   registry, the resources, the tokens and the CA from that watch, in etcd's order, and the
//!   revision of each becomes its index: a client may move between replicas and keep waiting
//!   with the index it holds. A compacted revision makes it load everything again.
//! - **Liveness.** The replica keeps `replicas/ID` under an etcd lease of `--replica-ttl`. The
//!   sidecar instances whose streams it holds are stored with its id but not under the lease,
//!   so its death is not theirs: the elected replica keeps them as they are for
//!   `--reconnect-grace`, for their sidecars to re-attach elsewhere, and removes only those
//!   whose sidecar does not come back.
//! - **One checker.** `leader` is created under a replica's lease, if absent; the replica that
//!   holds it runs the health checks of API instances, the removal of orphans above, and the
//!   allocation and release of virtual IPs. When it dies, its lease expires and another takes
//!   over within a few seconds.
//! - **Static stability.** With etcd unreachable the replica keeps serving what it has,
//!   reports not ready, refuses writes at once, and catches up from its last revision when
//!   etcd returns.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use ferry_proto::v1;
use ferry_runtime::lock;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    addresses::AddressTable,
    auth::Tokens,
    ca::Authority,
    checks::HealthChecks,
    discovery::Sidecars,
    registry::{Registry, Shared},
    resources::{Kind, Resources},
    store::{Event, StoreError, Table, etcd::EtcdStore},
};

/// How a replica joins the others.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's id: unique among the replicas, new at every start.
    pub id: String,
    /// The lease of its liveness key: how long after its death the others notice.
    pub ttl: Duration,
    /// How long the instances of a dead replica's sidecars are kept for them to re-attach.
    pub grace: Duration,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// What a replica's liveness key holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: String,
    pub grpc: String,
    pub http: String,
}

/// A TTL renewal received by a replica that does not run the checks.
#[derive(Debug, Serialize, Deserialize)]
struct TtlRenewal {
    /// A `ferry.v1.Health`.
    status: i32,
    output: String,
}

/// The components a replica keeps in step with the store.
pub struct Parts {
    pub registry: Arc<Registry>,
    pub resources: Arc<Resources>,
    pub tokens: Arc<Tokens>,
    pub authority: Arc<Authority>,
    pub checks: Arc<HealthChecks>,
    pub sidecars: Arc<Sidecars>,
    /// Sealed as each revision is applied.
    pub addresses: Arc<AddressTable>,
}

/// A running replica.
pub struct Replica {
    store: EtcdStore,
    config: ReplicaConfig,
    shared: Shared,
    parts: Parts,
    /// The replicas alive, by id, as their liveness keys say.
    live: Mutex<HashSet<String>>,
    /// The lease of this replica's liveness key, once granted.
    lease: watch::Sender<Option<i64>>,
    leader: watch::Sender<bool>,
    /// Sidecar instances of dead replicas, with when each was first seen orphaned.
    orphans: Mutex<HashMap<String, Instant>>,
    shutdown: CancellationToken,
}

impl Replica {
    /// Loads everything under the prefix into `parts`, then keeps them in step, keeps this
    /// replica's liveness key, and takes part in the election of the checker.
    pub async fn start(
        store: EtcdStore,
        config: ReplicaConfig,
        shared: Shared,
        parts: Parts,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        let replica = Arc::new(Self {
            store,
            config,
            shared,
            parts,
            live: Mutex::default(),
            lease: watch::Sender::new(None),
            leader: watch::Sender::new(false),
            orphans: Mutex::default(),
            shutdown,
        });
        replica.parts.checks.stand_by();
        replica.parts.authority.set_runs_schedule(false);
        let forwarding = Arc::downgrade(&replica);
        replica.parts.checks.set_forward(Arc::new(move |check, status, output| {
            let replica = forwarding.clone();
            Box::pin(async move {
                let Some(replica) = replica.upgrade() else { return Err("the replica is stopping".to_owned()) };
                replica.forward_ttl(&check, status, output).await
            })
        }));
        let revision = replica.load(false).await?;
        replica.claim_id().await?;
        replica.grant().await?;
        tokio::spawn(replica.clone().watch_loop(revision + 1));
        tokio::spawn(replica.clone().liveness_loop());
        tokio::spawn(replica.clone().election_loop());
        tokio::spawn(replica.clone().janitor_loop());
        tokio::spawn(replica.clone().sessions_loop());
        tracing::info!(replica = %replica.config.id, store = %crate::store::Store::describe(&replica.store), revision, "joined the replicas");
        Ok(replica)
    }

    /// Whether this replica runs the checks now.
    fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.store.prefix())
    }

    /// Loads every table and the live replicas at one revision; with `resync`, also forgets
    /// what the store no longer holds. Returns the revision.
    async fn load(&self, resync: bool) -> Result<u64, StoreError> {
        let loaded = self.store.load_all().await?;
        let mut client = self.store.client();
        let live = client
            .get(self.key("replicas/"), Some(GetOptions::new().with_prefix().with_revision(loaded.revision as i64)))
            .await
            .map_err(|e| StoreError::new(format!("etcd unreachable or failing (reading replicas): {e}")))?;
        {
            let mut set = lock(&self.live);
            set.clear();
            for kv in live.kvs() {
                if let Some(id) = std::str::from_utf8(kv.key()).ok().and_then(|k| k.rsplit('/').next()) {
                    set.insert(id.to_owned());
                }
            }
        }
        let sessions = client
            .get(self.key("sessions/"), Some(GetOptions::new().with_prefix().with_revision(loaded.revision as i64)))
            .await
            .map_err(|e| StoreError::new(format!("etcd unreachable or failing (reading sessions): {e}")))?;
        self.parts.sidecars.clear_remote();
        for kv in sessions.kvs() {
            if let (Some(rest), Ok(status)) = (
                std::str::from_utf8(kv.key()).ok().and_then(|k| k.strip_prefix(self.store.prefix())),
                v1::SidecarStatus::decode(kv.value()),
            ) {
                self.parts.sidecars.set_remote(rest, Some(status));
            }
        }
        if resync {
            let present: HashSet<(Table, &str)> = loaded.events.iter().map(|e| (e.table, e.key.as_str())).collect();
            let gone = |table: Table, key: String| Event {
                table,
                key,
                value: None,
                version: loaded.revision,
                revision: loaded.revision,
            };
            for id in self.parts.registry.all_ids() {
                if !present.contains(&(Table::Instances, id.as_str())) {
                    self.dispatch(&gone(Table::Instances, id));
                }
            }
            for id in self.parts.tokens.ids() {
                if !present.contains(&(Table::Tokens, id.as_str())) {
                    self.dispatch(&gone(Table::Tokens, id));
                }
            }
            for service in self.parts.registry.virtual_ip_services() {
                if !present.contains(&(Table::VirtualIps, service.as_str())) {
                    self.dispatch(&gone(Table::VirtualIps, service));
                }
            }
        }
        for event in &loaded.events {
            self.dispatch(event);
        }
        self.parts.addresses.seal(loaded.revision);
        self.shared.applied.send_if_modified(|applied| {
            let moved = loaded.revision > *applied;
            *applied = (*applied).max(loaded.revision);
            moved
        });
        Ok(loaded.revision)
    }

    /// Hands one change to the part that keeps its table.
    fn dispatch(&self, event: &Event) {
        match event.table {
            Table::Instances => {
                self.parts.registry.apply_event(event);
                self.parts.checks.sync(&event.key);
            }
            Table::Routes | Table::Policies | Table::Authorizations => {
                if let Some(kind) = Kind::of_table(event.table) {
                    self.parts.resources.apply_event(kind, event);
                }
            }
            Table::Tokens => self.parts.tokens.apply_stored(&event.key, event.value.as_deref()),
            Table::Checks => self.parts.registry.apply_checks_event(event),
            Table::VirtualIps => self.parts.registry.apply_virtual_ip_event(event),
            // Written with `virtual_ips` only so that guards can claim an address; nothing to
            // apply.
            Table::VirtualIpOwners => {}
            // Listed on demand (`ListSetAside`); nothing to apply.
            Table::SetAside => {}
            Table::Ca => {
                if let Some(value) = &event.value {
                    self.parts.authority.apply_stored(value);
                }
            }
        }
    }

    /// Follows the store from `from`, applying every change; reconnects after a failure from
    /// the revision after the last applied, and loads everything again after a compaction.
    async fn watch_loop(self: Arc<Self>, mut from: u64) {
        let backoff = ferry_runtime::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut failures = 0;
        while !self.shutdown.is_cancelled() {
            let mut stream = match self.store.watch(from).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch the store; retrying");
                    failures += 1;
                    self.pause(backoff.delay(failures)).await;
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    message = stream.message() => message,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, from, "the store's watch broke; resuming from the last revision applied");
                        break;
                    }
                };
                if response.compact_revision() > 0 || response.canceled() {
                    tracing::warn!(
                        from,
                        compacted = response.compact_revision(),
                        "the store compacted past the last revision applied; loading everything again"
                    );
                    match self.load(true).await {
                        Ok(revision) => from = revision + 1,
                        Err(error) => tracing::warn!(%error, "cannot load the store; retrying"),
                    }
                    break;
                }
                failures = 0;
                let mut last = 0;
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
                    let value = match event.event_type() {
                        EventType::Put => Some(kv.value().to_vec()),
                        EventType::Delete => None,
                    };
                    self.observe(kv.key(), value, revision);
                    last = last.max(revision);
                }
                if last > 0 {
                    // Every change of the revisions in this response is applied.
                    self.parts.addresses.seal(last);
                    from = last + 1;
                    self.shared.applied.send_if_modified(|applied| {
                        let moved = last > *applied;
                        *applied = (*applied).max(last);
                        moved
                    });
                }
            }
            failures += 1;
            self.pause(backoff.delay(failures)).await;
        }
    }

    /// One key changed at `revision`.
    fn observe(&self, key: &[u8], value: Option<Vec<u8>>, revision: u64) {
        if let Some((table, key)) = self.store.parse(key) {
            self.dispatch(&Event { table, key, value, version: revision, revision });
            return;
        }
        let Some(rest) = std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix(self.store.prefix())) else { return };
        if let Some(check) = rest.strip_prefix("ttl/") {
            if let Some(value) = value
                && self.parts.checks.is_active()
            {
                self.renew_here(check.to_owned(), value);
            }
            return;
        }
        if rest.starts_with("sessions/") {
            let status = value.and_then(|v| v1::SidecarStatus::decode(v.as_slice()).ok());
            self.parts.sidecars.set_remote(rest, status);
            return;
        }
        if let Some(id) = rest.strip_prefix("replicas/") {
            let mut live = lock(&self.live);
            if value.is_some() {
                live.insert(id.to_owned());
            } else if live.remove(id) {
                tracing::info!(replica = id, "a replica's liveness key expired or was removed");
            }
        }
    }

    async fn pause(&self, delay: Duration) {
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    fn set_unavailable(&self, why: Option<String>) {
        self.shared.unavailable.send_if_modified(|current| {
            if current.is_some() == why.is_some() {
                return false;
            }
            match &why {
                Some(why) => tracing::warn!(%why, "the store is unavailable: serving the last state, refusing writes"),
                None => tracing::info!("the store is available again"),
            }
            *current = why;
            true
        });
    }

    /// Refuses an id a running replica holds. A replica restarted under its id waits for the
    /// liveness key of its previous run to expire.
    async fn claim_id(&self) -> Result<(), StoreError> {
        let key = self.key(&format!("replicas/{}", self.config.id));
        let deadline = tokio::time::Instant::now() + self.config.ttl + Duration::from_secs(2);
        let mut said = false;
        loop {
            let mut client = self.store.client();
            let held = client
                .get(key.clone(), Some(GetOptions::new().with_count_only()))
                .await
                .map_err(|e| StoreError::new(format!("etcd unreachable or failing (reading replicas): {e}")))?
                .count()
                > 0;
            if !held {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::new(format!(
                    "--replica-id {}: a running replica holds this id; give each replica its own",
                    self.config.id
                )));
            }
            if !said {
                tracing::info!(replica = %self.config.id, "waiting for the liveness key of this id's previous run to expire");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Grants a new lease and puts this replica's liveness key under it; returns the revision
    /// of that put.
    async fn grant(&self) -> Result<u64, StoreError> {
        let failing = |e: etcd_client::Error| StoreError::new(format!("etcd unreachable or failing (liveness): {e}"));
        let mut client = self.store.client();
        let ttl = i64::try_from(self.config.ttl.as_secs().max(2)).unwrap_or(5);
        let lease = client.lease_grant(ttl, None).await.map_err(failing)?.id();
        let info =
            ReplicaInfo { id: self.config.id.clone(), grpc: self.config.grpc.to_string(), http: self.config.http.to_string() };
        let value = serde_json::to_vec(&info).map_err(|e| StoreError::new(e.to_string()))?;
        let put = client
            .put(self.key(&format!("replicas/{}", self.config.id)), value, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(failing)?;
        self.lease.send_replace(Some(lease));
        Ok(put.header().map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0)))
    }

    /// Keeps the lease alive; says the store is unavailable while it cannot, and grants a new
    /// lease (a new liveness key) when the old one expired meanwhile.
    async fn liveness_loop(self: Arc<Self>) {
        let period = (self.config.ttl / 3).max(Duration::from_millis(500));
        while !self.shutdown.is_cancelled() {
            let lease = *self.lease.borrow();
            let Some(lease) = lease else {
                match self.grant().await {
                    Ok(revision) => {
                        self.set_unavailable(None);
                        // What others removed while this replica was cut off comes before its
                        // new liveness key: apply it all, then write back what is still here.
                        if let Err(error) = self.shared.caught_up(revision, Duration::from_secs(5)).await {
                            tracing::warn!(%error, "joined again, but the watch is behind");
                        }
                        let reasserted = self.parts.registry.reassert();
                        if reasserted > 0 {
                            tracing::info!(reasserted, "joined again: wrote back the instances of sidecars still streaming here");
                        }
                    }
                    Err(error) => {
                        self.set_unavailable(Some(error.to_string()));
                        self.pause(Duration::from_millis(500)).await;
                    }
                }
                continue;
            };
            let mut client = self.store.client();
            let kept = tokio::time::timeout(period.max(Duration::from_secs(1)), async {
                let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
                    Ok(kept) => kept,
                    // The client's word for a lease that expired.
                    Err(etcd_client::Error::LeaseKeepAliveError(why)) if why.contains("not found") => return Ok(false),
                    Err(error) => return Err(error),
                };
                loop {
                    keeper.keep_alive().await?;
                    match stream.message().await? {
                        Some(response) if response.ttl() > 0 => return Ok::<bool, etcd_client::Error>(true),
                        Some(_) => return Ok(false),
                        None => continue,
                    }
                }
            })
            .await;
            match kept {
                Ok(Ok(true)) => {
                    self.set_unavailable(None);
                    self.pause(period).await;
                }
                Ok(Ok(false)) => {
                    tracing::warn!(lease, "this replica's lease expired (the store was out of reach too long); joining again");
                    self.lease.send_replace(None);
                    self.leader.send_replace(false);
                    self.parts.checks.set_active(false);
                    self.parts.authority.set_runs_schedule(false);
                    self.parts.registry.set_virtual_ip_duty(false);
                }
                Ok(Err(error)) => {
                    self.set_unavailable(Some(format!("etcd unreachable or failing: {error}")));
                    self.pause(Duration::from_millis(500)).await;
                }
                Err(_) => {
                    self.set_unavailable(Some(format!("etcd did not answer a lease renewal within {period:?}")));
                }
            }
        }
    }

    /// Leaves the replicas at once rather than after the lease's TTL: the liveness key, the
    /// sessions and the checker's key go with the lease, so another replica takes over now.
    pub async fn leave(&self) {
        self.shutdown.cancel();
        let lease = self.lease.send_replace(None);
        if let Some(lease) = lease {
            let mut client = self.store.client();
            let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
        }
    }

    /// Holds or waits for the checker's key.
    async fn election_loop(self: Arc<Self>) {
        let mut lease_changes = self.lease.subscribe();
        while !self.shutdown.is_cancelled() {
            let lease = *lease_changes.borrow_and_update();
            let leader = match lease {
                Some(lease) => self.campaign(lease).await,
                None => false,
            };
            if leader != *self.leader.borrow() {
                self.leader.send_replace(leader);
                self.parts.checks.set_active(leader);
                self.parts.authority.set_runs_schedule(leader);
                self.parts.registry.set_virtual_ip_duty(leader);
                if !leader {
                    lock(&self.orphans).clear();
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = lease_changes.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Takes the checker's key if nobody holds it; whether this replica holds it.
    async fn campaign(&self, lease: i64) -> bool {
        let key = self.key("leader");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), self.config.id.clone(), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None)]);
        let mut client = self.store.client();
        match tokio::time::timeout(Duration::from_secs(2), client.txn(txn)).await {
            Ok(Ok(response)) if response.succeeded() => true,
            Ok(Ok(response)) => response.op_responses().into_iter().any(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().is_some_and(|kv| kv.value() == self.config.id.as_bytes()),
                _ => false,
            }),
            // Unreachable: keep what we were until the lease says otherwise.
            _ => *self.leader.borrow(),
        }
    }

    /// On the checker: removes the sidecar instances of dead replicas whose sidecars did not
    /// re-attach within the grace period.
    async fn janitor_loop(self: Arc<Self>) {
        while !self.shutdown.is_cancelled() {
            self.pause(Duration::from_millis(500)).await;
            if !self.is_leader() || self.shared.unavailable.borrow().is_some() {
                continue;
            }
            let live = lock(&self.live).clone();
            let now = Instant::now();
            let mut expired = Vec::new();
            {
                let mut orphans = lock(&self.orphans);
                let mut seen = HashSet::new();
                for instance in self.parts.registry.sidecar_instances() {
                    if live.contains(&instance.replica) {
                        continue;
                    }
                    seen.insert(instance.id.clone());
                    let since = *orphans.entry(instance.id.clone()).or_insert_with(|| {
                        tracing::info!(id = %instance.id, replica = %instance.replica, grace = ?self.config.grace, "an instance's replica is gone; keeping it for its sidecar to re-attach");
                        now
                    });
                    if now.duration_since(since) >= self.config.grace {
                        expired.push(instance);
                    }
                }
                orphans.retain(|id, _| seen.contains(id));
            }
            for instance in expired {
                self.parts.registry.remove_orphan(&instance.id, &instance);
                lock(&self.orphans).remove(&instance.id);
            }
        }
    }

    /// Records the sessions of this replica's sidecars under its lease, for every replica's
    /// status to show: who each is, what it subscribes to and trusts, not the progress of each
    /// push (only the replica holding the stream shows that). At most once a second, and only
    /// the records that changed: a quiet mesh writes nothing.
    async fn sessions_loop(self: Arc<Self>) {
        let mut written: HashMap<String, Vec<u8>> = HashMap::new();
        let mut written_lease = None;
        while !self.shutdown.is_cancelled() {
            self.pause(Duration::from_secs(1)).await;
            let lease = *self.lease.borrow();
            let Some(lease) = lease else { continue };
            if written_lease != Some(lease) {
                written.clear();
                written_lease = Some(lease);
            }
            let now: HashMap<String, Vec<u8>> = self
                .parts
                .sidecars
                .records(&self.parts.authority)
                .into_iter()
                .map(|status| (status.node_id.clone(), status.encode_to_vec()))
                .collect();
            let mut ops = Vec::new();
            for (node, value) in &now {
                if written.get(node) != Some(value) {
                    ops.push(TxnOp::put(self.session_key(node), value.clone(), Some(PutOptions::new().with_lease(lease))));
                }
            }
            for node in written.keys() {
                if !now.contains_key(node) {
                    ops.push(TxnOp::delete(self.session_key(node), None));
                }
            }
            if ops.is_empty() {
                continue;
            }
            let mut client = self.store.client();
            // etcd takes at most 128 operations in one transaction.
            let mut ok = true;
            for chunk in ops.chunks(100) {
                let txn = Txn::new().and_then(chunk.to_vec());
                if !matches!(tokio::time::timeout(Duration::from_secs(2), client.txn(txn)).await, Ok(Ok(_))) {
                    ok = false;
                    break;
                }
            }
            if ok {
                written = now;
            }
        }
    }

    fn session_key(&self, node: &str) -> String {
        self.key(&format!("sessions/{}/{node}", self.config.id))
    }

    /// Hands a TTL renewal made here to the replica running the checks, through the store.
    async fn forward_ttl(&self, check: &str, status: ferry_health::Health, output: String) -> Result<(), String> {
        self.shared.check_available().map_err(|e| e.to_string())?;
        let renewal = TtlRenewal { status: v1::Health::from(status) as i32, output };
        let value = serde_json::to_vec(&renewal).map_err(|e| e.to_string())?;
        let mut client = self.store.client();
        match tokio::time::timeout(Duration::from_secs(3), client.put(self.key(&format!("ttl/{check}")), value, None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("etcd unreachable or failing: {error}")),
            Err(_) => Err("etcd did not answer within 3s".to_owned()),
        }
    }

    /// On the checker: applies a TTL renewal another replica received, then clears it.
    fn renew_here(&self, check: String, value: Vec<u8>) {
        let Ok(renewal) = serde_json::from_slice::<TtlRenewal>(&value) else { return };
        let Ok(status) = ferry_health::Health::try_from(renewal.status) else { return };
        let checks = self.parts.checks.clone();
        let store = self.store.clone();
        let key = self.key(&format!("ttl/{check}"));
        tokio::spawn(async move {
            if let Err(error) = checks.ttl(&check, status, renewal.output).await {
                tracing::warn!(check, %error, "a TTL renewal received by another replica");
            }
            let mut client = store.client();
            let _ = tokio::time::timeout(Duration::from_secs(3), client.delete(key, None)).await;
        });
    }
}
