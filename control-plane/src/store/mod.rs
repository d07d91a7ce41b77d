//! Durable storage behind one [`Store`] trait.
//!
//! The registry keeps its working state in memory and writes every change through a
//! [`StoreWriter`], which batches writes into group commits. Implementations: an embedded redb
//! file ([`RedbStore`], the default) and [`MemoryStore`] for tests and throwaway meshes.

use std::{fmt, path::Path, sync::Arc};

use futures::future::BoxFuture;

#[cfg(feature = "etcd")]
pub mod etcd;
mod memory;
mod redb;
pub mod set_aside;
mod writer;

pub use self::{memory::MemoryStore, redb::RedbStore, writer::StoreWriter};

/// A keyspace in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Registered instances, keyed by id, valued by an encoded `ferry.v1.Instance`.
    Instances,
    /// Routes, keyed by service, valued by an encoded `ferry.v1.HistoryResponse` (newest first).
    Routes,
    /// Service policies, stored as routes are.
    Policies,
    /// Authorization policies, stored as routes are.
    Authorizations,
    /// The mesh's certificate authority: its roots, issuer and rotation, under one key.
    Ca,
    /// API tokens by id, each with the hash of its secret (never the secret).
    Tokens,
    /// What an instance's checks found last, by instance id; written only by replicas sharing
    /// a store, so that each shows them.
    Checks,
    /// Services' virtual IPs, by service: the address and since when the service has had no
    /// instance (JSON).
    VirtualIps,
    /// The service holding each virtual IP, by address: written with `VirtualIps`, so that a
    /// guarded write can claim an address only while nobody holds it.
    VirtualIpOwners,
    /// Rows that could not be read at start-up, moved here with why (JSON; see [`set_aside`]).
    SetAside,
}

impl Table {
    /// The table named `name`.
    pub fn from_name(name: &str) -> Option<Table> {
        Self::ALL.into_iter().find(|table| table.name() == name)
    }

    /// Every table, for stores that create them up front.
    pub const ALL: [Table; 10] = [
        Table::Instances,
        Table::Routes,
        Table::Policies,
        Table::Authorizations,
        Table::Ca,
        Table::Tokens,
        Table::Checks,
        Table::VirtualIps,
        Table::VirtualIpOwners,
        Table::SetAside,
    ];

    /// The table's name in the store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Instances => "instances",
            Self::Routes => "routes",
            Self::Policies => "policies",
            Self::Authorizations => "authorizations",
            Self::Ca => "ca",
            Self::Tokens => "tokens",
            Self::Checks => "checks",
            Self::VirtualIps => "virtual_ips",
            Self::VirtualIpOwners => "virtual_ip_owners",
            Self::SetAside => "set_aside",
        }
    }
}

/// One write: a put when `value` is set, a delete otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub table: Table,
    pub key: String,
    pub value: Option<Vec<u8>>,
}

/// A condition on a guarded write ([`Store::transact`]): the key is at `version` (the store
/// revision of its last change), or absent when `version` is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub table: Table,
    pub key: String,
    pub version: u64,
}

/// One change seen in a shared store: what `key` holds as of `revision` (none: deleted), and
/// the revision of the key's own last change (`version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub table: Table,
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub version: u64,
    pub revision: u64,
}

/// A failure of the storage backend.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub Arc<str>);

impl StoreError {
    /// A store error with this description.
    pub fn new(message: impl fmt::Display) -> Self {
        Self(message.to_string().into())
    }
}

/// Every key and value of one table.
pub type Rows = Vec<(String, Vec<u8>)>;

/// Durable key-value storage. Batches are applied atomically and in the order given.
pub trait Store: Send + Sync + 'static {
    /// Every key and value in `table`.
    fn load(&self, table: Table) -> BoxFuture<'_, Result<Rows, StoreError>>;

    /// Applies the writes of `batch` in one transaction. Returns the store's revision after
    /// it for a shared store, 0 for a local one.
    fn apply(&self, batch: Vec<Write>) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Applies `batch` in one transaction if every guard holds, returning the revision after
    /// it; when one does not, `Err` carries the store's revision then. Local stores, whose
    /// single writer checks versions under its own lock, apply at once.
    fn transact(&self, guards: Vec<Guard>, batch: Vec<Write>) -> BoxFuture<'_, Result<Result<u64, u64>, StoreError>> {
        let _ = guards;
        let apply = self.apply(batch);
        Box::pin(async move { apply.await.map(Ok) })
    }

    /// Stores `value` under `key` unless the key holds something already, atomically, and
    /// returns what the key holds afterwards: so that processes sharing a store agree on one
    /// value (the CA) whoever writes first.
    fn create(&self, table: Table, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>>;

    /// A short description for logs, such as `redb:/var/lib/ferry/ferry.redb`.
    fn describe(&self) -> String;
}

/// Which store to open, as given by `--store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// A redb file under the data directory.
    Redb,
    /// Memory only: nothing survives a restart.
    Memory,
    /// An etcd cluster shared by every replica: its client endpoints (`host:port`).
    Etcd(Vec<String>),
}

/// What a binary built without the `etcd` feature says when given an etcd store.
pub const ETCD_FEATURE_MISSING: &str = "etcd stores need the `etcd` build feature, which this binary was built without: \
     build it with `cargo build --release -p ferry-control-plane --features etcd` (needs protoc)";

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(Self::Redb),
            "memory" => Ok(Self::Memory),
            other if other.starts_with("etcd://") => {
                let list = &other["etcd://".len()..];
                let mut endpoints = Vec::new();
                for endpoint in list.split(',') {
                    let endpoint = endpoint.trim().trim_end_matches('/');
                    let valid = endpoint.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
                    });
                    if !valid {
                        return Err(format!(
                            "etcd endpoint {endpoint:?} in {other:?}: expected HOST:PORT, as in etcd://127.0.0.1:2379,127.0.0.1:22379"
                        ));
                    }
                    endpoints.push(endpoint.to_owned());
                }
                Ok(Self::Etcd(endpoints))
            }
            other => Err(format!("unknown store {other:?}: expected redb, memory or etcd://HOST:PORT[,HOST:PORT...]")),
        }
    }
}

/// Opens a local store of `kind`, creating `data_dir` when needed (etcd stores are opened by
/// the replica that joins them).
pub fn open(kind: &StoreKind, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    match kind {
        StoreKind::Etcd(_) => Err(StoreError::new("an etcd store is opened by its replica")),
        StoreKind::Memory => Ok(Arc::new(MemoryStore::default())),
        StoreKind::Redb => {
            std::fs::create_dir_all(data_dir)
                .map_err(|e| StoreError::new(format!("creating data directory {}: {e}", data_dir.display())))?;
            Ok(Arc::new(RedbStore::open(&data_dir.join("ferry.redb"))?))
        }
    }
}
