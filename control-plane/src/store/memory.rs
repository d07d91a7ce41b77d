//! A store that keeps everything in memory, for tests and throwaway meshes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use futures::{FutureExt, future::BoxFuture};

use super::{Rows, Store, StoreError, Table, Write};

/// Keeps every table in memory; nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: Mutex<HashMap<Table, BTreeMap<String, Vec<u8>>>>,
}

impl Store for MemoryStore {
    fn load(&self, table: Table) -> BoxFuture<'_, Result<Rows, StoreError>> {
        let tables = ferry_runtime::lock(&self.tables);
        let rows = tables.get(&table).map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        futures::future::ready(Ok(rows)).boxed()
    }

    fn apply(&self, batch: Vec<Write>) -> BoxFuture<'_, Result<u64, StoreError>> {
        let mut tables = ferry_runtime::lock(&self.tables);
        for write in batch {
            let table = tables.entry(write.table).or_default();
            match write.value {
                Some(value) => table.insert(write.key, value),
                None => table.remove(&write.key),
            };
        }
        futures::future::ready(Ok(0)).boxed()
    }

    fn create(&self, table: Table, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        let mut tables = ferry_runtime::lock(&self.tables);
        let held = tables.entry(table).or_default().entry(key).or_insert(value).clone();
        futures::future::ready(Ok(held)).boxed()
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
