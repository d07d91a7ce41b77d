//! The embedded default store: one redb file, crash-safe, fsynced on every commit.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures::{FutureExt, future::BoxFuture};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Rows, Store, StoreError, Table, Write};

/// A redb database file holding every table.
///
/// After an I/O error (a full disk, a failing device) redb refuses every later transaction on
/// the same handle, so the handle is dropped on any failure and the file opened again by the
/// next operation: writes resume once the disk has room again, without a restart. Operations
/// take turns on the handle (the registry's single writer batches writes anyway).
#[derive(Debug, Clone)]
pub struct RedbStore {
    db: Arc<Mutex<Option<Database>>>,
    path: PathBuf,
}

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

fn error(context: &str, e: impl Into<redb::Error>) -> StoreError {
    StoreError::new(format!("{context}: {}", e.into()))
}

impl RedbStore {
    /// Opens the database at `path`, creating it and its tables when missing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Self::open_file(path)?;
        Ok(Self { db: Arc::new(Mutex::new(Some(db))), path: path.to_path_buf() })
    }

    fn open_file(path: &Path) -> Result<Database, StoreError> {
        let db = Database::create(path).map_err(|e| error(&format!("opening {}", path.display()), e))?;
        let txn = db.begin_write().map_err(|e| error("creating tables", e))?;
        for table in Table::ALL {
            txn.open_table(definition(table)).map_err(|e| error("creating tables", e))?;
        }
        txn.commit().map_err(|e| error("creating tables", e))?;
        Ok(db)
    }

    /// Runs `operation` on the open handle, opening the file first when an earlier failure
    /// dropped it, and dropping it when `operation` fails.
    fn with_db<T>(&self, operation: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut held = ferry_runtime::lock(&self.db);
        if held.is_none() {
            *held = Some(Self::open_file(&self.path)?);
            tracing::info!(path = %self.path.display(), "the store is open again");
        }
        let Some(db) = held.as_ref() else { return Err(StoreError::new("the store is not open")) };
        let result = operation(db);
        if result.is_err() {
            *held = None;
        }
        result
    }

    fn load_blocking(&self, table: Table) -> Result<Rows, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(|e| error("reading", e))?;
            let table = txn.open_table(definition(table)).map_err(|e| error("reading", e))?;
            let mut rows = Vec::new();
            for row in table.iter().map_err(|e| error("reading", e))? {
                let (key, value) = row.map_err(|e| error("reading", e))?;
                rows.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(rows)
        })
    }

    fn apply_blocking(&self, batch: Vec<Write>) -> Result<(), StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| error("writing", e))?;
            for write in &batch {
                let mut table = txn.open_table(definition(write.table)).map_err(|e| error("writing", e))?;
                match &write.value {
                    Some(value) => {
                        table.insert(write.key.as_str(), value.as_slice()).map_err(|e| error("writing", e))?;
                    }
                    None => {
                        table.remove(write.key.as_str()).map_err(|e| error("writing", e))?;
                    }
                }
            }
            txn.commit().map_err(|e| error("committing", e))
        })
    }

    fn create_blocking(&self, table: Table, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write().map_err(|e| error("writing", e))?;
            let held = {
                let mut table = txn.open_table(definition(table)).map_err(|e| error("writing", e))?;
                let existing = table.get(key).map_err(|e| error("reading", e))?.map(|v| v.value().to_vec());
                match existing {
                    Some(existing) => existing,
                    None => {
                        table.insert(key, value).map_err(|e| error("writing", e))?;
                        value.to_vec()
                    }
                }
            };
            txn.commit().map_err(|e| error("committing", e))?;
            Ok(held)
        })
    }
}

impl Store for RedbStore {
    fn load(&self, table: Table) -> BoxFuture<'_, Result<Rows, StoreError>> {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || this.load_blocking(table))
                .await
                .map_err(|e| StoreError::new(format!("reading: {e}")))?
        }
        .boxed()
    }

    fn apply(&self, batch: Vec<Write>) -> BoxFuture<'_, Result<u64, StoreError>> {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || this.apply_blocking(batch).map(|()| 0))
                .await
                .map_err(|e| StoreError::new(format!("writing: {e}")))?
        }
        .boxed()
    }

    fn create(&self, table: Table, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        let this = self.clone();
        async move {
            tokio::task::spawn_blocking(move || this.create_blocking(table, &key, &value))
                .await
                .map_err(|e| StoreError::new(format!("writing: {e}")))?
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ferry.redb");
        {
            let store = RedbStore::open(&path).expect("open");
            let put = |key: &str, value: &[u8]| Write { table: Table::Instances, key: key.into(), value: Some(value.to_vec()) };
            store.apply(vec![put("a", b"1"), put("b", b"2")]).await.expect("apply");
            store.apply(vec![Write { table: Table::Instances, key: "a".into(), value: None }]).await.expect("delete");
        }
        let store = RedbStore::open(&path).expect("reopen");
        let rows = store.load(Table::Instances).await.expect("load");
        assert_eq!(rows, vec![("b".to_owned(), b"2".to_vec())]);
    }
}
