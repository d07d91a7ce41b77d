//! The shared store: an etcd cluster that every replica of the control plane reads and writes.
//!
//! Each table is a key prefix under `--etcd-prefix` (`/ferry/instances/ID`, `/ferry/routes/SERVICE`,
//! ...). Writes are transactions; a guard ([`Guard`]) is a compare on the key's mod revision, so
//! that a resource's `expected_version` holds across replicas. The replica's own keys (its
//! liveness, its sidecars' sessions, the checks' leadership) live beside the tables and are
//! written by [`crate::cluster`].

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use futures::{FutureExt, future::BoxFuture};

use super::{Event, Guard, Rows, Store, StoreError, Table, Write};

/// How long one etcd request may take before the store reports it unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to an etcd cluster, scoped to one key prefix.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
}

fn error(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::new(format!("etcd unreachable or failing ({context}): {e}"))
}

/// Everything under the prefix as of one revision.
#[derive(Debug, Default)]
pub struct Loaded {
    pub revision: u64,
    pub events: Vec<Event>,
}

impl EtcdStore {
    /// Connects to `endpoints` (`host:port`). The connection is lazy: an etcd that is down at
    /// start is reported by the first request, not here.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&urls, Some(options)).await.map_err(|e| error("connecting", e))?;
        Ok(Self { client, prefix: prefix.to_owned(), endpoints: endpoints.to_vec() })
    }

    /// The client, for the replica's leases and watches.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The key prefix, ending in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full key of `key` in `table`.
    pub fn key(&self, table: Table, key: &str) -> String {
        format!("{}{}/{key}", self.prefix, table.name())
    }

    /// The table and key a full key names, if it is one of the tables'.
    pub fn parse(&self, full: &[u8]) -> Option<(Table, String)> {
        let full = std::str::from_utf8(full).ok()?;
        let rest = full.strip_prefix(&self.prefix)?;
        let (table, key) = rest.split_once('/')?;
        Some((Table::from_name(table)?, key.to_owned()))
    }

    /// Every key of every table as of one revision, for a replica's first load or a resync.
    pub async fn load_all(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded::default();
        let mut kv = self.client.kv_client();
        let mut revision = 0;
        for table in Table::ALL {
            let prefix = format!("{}{}/", self.prefix, table.name());
            let mut options = GetOptions::new().with_prefix();
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = kv.get(prefix, Some(options)).await.map_err(|e| error("reading", e))?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                let Some((table, key)) = self.parse(kv.key()) else { continue };
                loaded.events.push(Event {
                    table,
                    key,
                    value: Some(kv.value().to_vec()),
                    version: u64::try_from(kv.mod_revision()).unwrap_or(0),
                    revision: 0,
                });
            }
        }
        loaded.revision = u64::try_from(revision).unwrap_or(0);
        for event in &mut loaded.events {
            event.revision = loaded.revision;
        }
        Ok(loaded)
    }

    /// A watch of everything under the prefix from `revision` on, with each key's previous
    /// value unneeded.
    pub async fn watch(&self, revision: u64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new().with_prefix().with_start_revision(i64::try_from(revision).unwrap_or(i64::MAX));
        self.client.watch_client().watch(self.prefix.clone(), Some(options)).await.map_err(|e| error("watching", e))
    }

    fn op(&self, write: &Write, lease: Option<i64>) -> TxnOp {
        let key = self.key(write.table, &write.key);
        match &write.value {
            Some(value) => TxnOp::put(key, value.clone(), lease.map(|id| PutOptions::new().with_lease(id))),
            None => TxnOp::delete(key, None),
        }
    }

    /// Runs `txn`, again after a member that could not be reached (the client balances over
    /// every endpoint, and one just restarted may refuse a connection while the others answer),
    /// within [`REQUEST_TIMEOUT`] in all.
    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut pause = Duration::from_millis(25);
        loop {
            let mut kv = self.client.kv_client();
            let error = match tokio::time::timeout_at(deadline, kv.txn(txn.clone())).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(error)) => error,
                Err(_) => return Err(error("writing", format!("no answer within {REQUEST_TIMEOUT:?}"))),
            };
            // Unavailable: most often no member was reached. Running it again is safe either
            // way: Ferry's transactions put final values, or are guarded by a compare that a
            // first run would now fail.
            let unreached = match &error {
                etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::Unavailable,
                etcd_client::Error::TransportError(_) => true,
                _ => false,
            };
            if !unreached || tokio::time::Instant::now() + pause >= deadline {
                return Err(self::error("writing", error));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

fn revision_of(response: &etcd_client::TxnResponse) -> u64 {
    response.header().map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0))
}

impl Store for EtcdStore {
    fn load(&self, table: Table) -> BoxFuture<'_, Result<Rows, StoreError>> {
        async move {
            let prefix = format!("{}{}/", self.prefix, table.name());
            let mut kv = self.client.kv_client();
            let response = kv.get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(|e| error("reading", e))?;
            Ok(response.kvs().iter().filter_map(|kv| self.parse(kv.key()).map(|(_, key)| (key, kv.value().to_vec()))).collect())
        }
        .boxed()
    }

    fn apply(&self, batch: Vec<Write>) -> BoxFuture<'_, Result<u64, StoreError>> {
        async move {
            let ops: Vec<TxnOp> = batch.iter().map(|w| self.op(w, None)).collect();
            let response = self.txn(Txn::new().and_then(ops)).await?;
            Ok(revision_of(&response))
        }
        .boxed()
    }

    fn transact(&self, guards: Vec<Guard>, batch: Vec<Write>) -> BoxFuture<'_, Result<Result<u64, u64>, StoreError>> {
        async move {
            let compares: Vec<Compare> = guards
                .iter()
                .map(|guard| {
                    let key = self.key(guard.table, &guard.key);
                    let version = i64::try_from(guard.version).unwrap_or(i64::MAX);
                    if guard.version == 0 {
                        Compare::create_revision(key, CompareOp::Equal, 0)
                    } else {
                        Compare::mod_revision(key, CompareOp::Equal, version)
                    }
                })
                .collect();
            let ops: Vec<TxnOp> = batch.iter().map(|w| self.op(w, None)).collect();
            let reads: Vec<TxnOp> = guards.iter().map(|g| TxnOp::get(self.key(g.table, &g.key), None)).collect();
            let response = self.txn(Txn::new().when(compares).and_then(ops).or_else(reads)).await?;
            if response.succeeded() {
                return Ok(Ok(revision_of(&response)));
            }
            // The revision of the change that failed the guard, for the caller to wait for.
            let mut latest = 0;
            for op in response.op_responses() {
                if let TxnOpResponse::Get(get) = op {
                    for kv in get.kvs() {
                        latest = latest.max(u64::try_from(kv.mod_revision()).unwrap_or(0));
                    }
                }
            }
            Ok(Err(if latest > 0 { latest } else { revision_of(&response) }))
        }
        .boxed()
    }

    fn create(&self, table: Table, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        async move {
            let full = self.key(table, &key);
            let txn = Txn::new()
                .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(full.clone(), value.clone(), None)])
                .or_else([TxnOp::get(full, None)]);
            let response = self.txn(txn).await?;
            if response.succeeded() {
                return Ok(value);
            }
            for op in response.op_responses() {
                if let TxnOpResponse::Get(get) = op
                    && let Some(kv) = get.kvs().first()
                {
                    return Ok(kv.value().to_vec());
                }
            }
            Err(StoreError::new(format!("{key:?} was neither created nor found")))
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("etcd://{} (prefix {})", self.endpoints.join(","), self.prefix)
    }
}
