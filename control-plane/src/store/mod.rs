//! Durable storage behind one [`Store`] trait.
//!
//! The registry keeps its working state in memory and writes every change through a
//! [`StoreWriter`], which batches writes into group commits. Implementations: an embedded redb
//! file ([`RedbStore`], the default) and [`MemoryStore`] for tests and throwaway meshes.

use std::{fmt, path::Path, sync::Arc};

use futures::future::BoxFuture;

mod memory;
mod redb;
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
}

impl Table {
    /// Every table, for stores that create them up front.
    pub const ALL: [Table; 6] =
        [Table::Instances, Table::Routes, Table::Policies, Table::Authorizations, Table::Ca, Table::Tokens];

    /// The table's name in the store.
    pub fn name(self) -> &'static str {
        match self {
            Self::Instances => "instances",
            Self::Routes => "routes",
            Self::Policies => "policies",
            Self::Authorizations => "authorizations",
            Self::Ca => "ca",
            Self::Tokens => "tokens",
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

    /// Applies the writes of `batch` in one transaction.
    fn apply(&self, batch: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>>;

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
}

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "redb" => Ok(Self::Redb),
            "memory" => Ok(Self::Memory),
            other if other.starts_with("etcd://") => {
                Err("etcd stores need the `etcd` build feature, which this binary was built without".into())
            }
            other => Err(format!("unknown store {other:?}: expected redb or memory")),
        }
    }
}

/// Opens the store of `kind`, creating `data_dir` when needed.
pub fn open(kind: &StoreKind, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    match kind {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::default())),
        StoreKind::Redb => {
            std::fs::create_dir_all(data_dir)
                .map_err(|e| StoreError::new(format!("creating data directory {}: {e}", data_dir.display())))?;
            Ok(Arc::new(RedbStore::open(&data_dir.join("ferry.redb"))?))
        }
    }
}
