//! Write-behind to the store with group commit.
//!
//! The registry changes memory first, under its lock, and hands each write here without waiting.
//! A single task commits everything pending in one transaction, so a burst of a thousand sidecars
//! registering costs a handful of fsyncs rather than a thousand. Later writes to a key replace
//! earlier ones that are not yet committed; callers that must know a write is durable (API
//! registrations) wait for its generation. Failed commits are retried with backoff, never dropped.

use ferry_runtime::lock;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, watch};

use super::{Store, StoreError, Table, Write};

/// Hands writes to the background committer.
#[derive(Clone)]
pub struct StoreWriter {
    shared: Arc<Shared>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
    /// The highest generation committed, and the store's revision after it.
    durable: watch::Sender<(u64, u64)>,
    last_error: Mutex<Option<StoreError>>,
}

#[derive(Default)]
struct Pending {
    writes: HashMap<(Table, String), Option<Vec<u8>>>,
    generation: u64,
}

impl StoreWriter {
    /// Starts the committer for `store`.
    pub fn spawn(store: Arc<dyn Store>) -> Self {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            durable: watch::Sender::new((0, 0)),
            last_error: Mutex::new(None),
        });
        tokio::spawn(run(store, shared.clone()));
        Self { shared }
    }

    /// Queues `write` and returns its generation; never waits.
    pub fn enqueue(&self, write: Write) -> u64 {
        let generation = {
            let mut pending = lock(&self.shared.pending);
            pending.generation += 1;
            pending.writes.insert((write.table, write.key), write.value);
            pending.generation
        };
        self.shared.wake.notify_one();
        generation
    }

    /// Waits until `generation` is committed, or reports why it is not after `limit`. Returns
    /// the store's revision after a commit that included it (0 for a local store).
    pub async fn durable(&self, generation: u64, limit: Duration) -> Result<u64, StoreError> {
        let mut durable = self.shared.durable.subscribe();
        match tokio::time::timeout(limit, durable.wait_for(|&(done, _)| done >= generation)).await {
            Ok(Ok(done)) => Ok(done.1),
            Ok(Err(_)) => Err(StoreError::new("the store writer has stopped")),
            Err(_) => {
                let last = lock(&self.shared.last_error).clone();
                Err(last.unwrap_or_else(|| StoreError::new(format!("not committed within {limit:?}"))))
            }
        }
    }

    /// The generation of the latest write queued.
    pub fn pending(&self) -> u64 {
        lock(&self.shared.pending).generation
    }

    /// Waits until everything queued so far is committed, for a clean shutdown.
    pub async fn flush(&self, limit: Duration) -> Result<(), StoreError> {
        self.durable(self.pending(), limit).await.map(drop)
    }
}

async fn run(store: Arc<dyn Store>, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let (writes, generation) = {
            let mut pending = lock(&shared.pending);
            (std::mem::take(&mut pending.writes), pending.generation)
        };
        if writes.is_empty() {
            shared.durable.send_modify(|done| done.0 = generation);
            shared.wake.notified().await;
            continue;
        }
        let batch: Vec<Write> =
            writes.iter().map(|((table, key), value)| Write { table: *table, key: key.clone(), value: value.clone() }).collect();
        match store.apply(batch).await {
            Ok(revision) => {
                backoff = Duration::from_millis(50);
                *lock(&shared.last_error) = None;
                shared.durable.send_replace((generation, revision));
            }
            Err(error) => {
                tracing::error!(%error, writes = writes.len(), retry_in = ?backoff, "store commit failed");
                *lock(&shared.last_error) = Some(error);
                // Put the writes back unless a newer write to the same key arrived meanwhile.
                {
                    let mut pending = lock(&shared.pending);
                    for (key, value) in writes {
                        pending.writes.entry(key).or_insert(value);
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::{FutureExt, future::BoxFuture};

    use super::*;
    use crate::store::{MemoryStore, Rows};

    /// Fails the first `failures` commits, then delegates to memory.
    struct Flaky {
        failures: AtomicUsize,
        inner: MemoryStore,
        commits: AtomicUsize,
    }

    impl Store for Flaky {
        fn load(&self, table: Table) -> BoxFuture<'_, Result<Rows, StoreError>> {
            self.inner.load(table)
        }

        fn apply(&self, batch: Vec<Write>) -> BoxFuture<'_, Result<u64, StoreError>> {
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return futures::future::ready(Err(StoreError::new("disk full"))).boxed();
            }
            self.commits.fetch_add(1, Ordering::SeqCst);
            self.inner.apply(batch)
        }

        fn create(&self, table: Table, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
            self.inner.create(table, key, value)
        }

        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn put(key: &str, value: &str) -> Write {
        Write { table: Table::Instances, key: key.into(), value: Some(value.as_bytes().to_vec()) }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_committed_and_keeps_the_latest_value() {
        let store =
            Arc::new(Flaky { failures: AtomicUsize::new(2), inner: MemoryStore::default(), commits: AtomicUsize::new(0) });
        let writer = StoreWriter::spawn(store.clone());
        writer.enqueue(put("a", "1"));
        let generation = writer.enqueue(put("a", "2"));
        writer.durable(generation, Duration::from_secs(10)).await.expect("committed after retries");
        let rows = store.load(Table::Instances).await.expect("load");
        assert_eq!(rows, vec![("a".to_owned(), b"2".to_vec())]);
    }

    #[tokio::test(start_paused = true)]
    async fn reports_the_store_error_when_not_committed_in_time() {
        let store =
            Arc::new(Flaky { failures: AtomicUsize::new(1000), inner: MemoryStore::default(), commits: AtomicUsize::new(0) });
        let writer = StoreWriter::spawn(store);
        let generation = writer.enqueue(put("a", "1"));
        let err = writer.durable(generation, Duration::from_secs(1)).await.expect_err("never commits");
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[tokio::test]
    async fn groups_a_burst_into_few_commits() {
        let store =
            Arc::new(Flaky { failures: AtomicUsize::new(0), inner: MemoryStore::default(), commits: AtomicUsize::new(0) });
        let writer = StoreWriter::spawn(store.clone());
        let mut last = 0;
        for i in 0..1000 {
            last = writer.enqueue(put(&format!("k{i}"), "v"));
        }
        writer.durable(last, Duration::from_secs(10)).await.expect("committed");
        assert_eq!(store.load(Table::Instances).await.expect("load").len(), 1000);
        assert!(store.commits.load(Ordering::SeqCst) < 10, "{} commits", store.commits.load(Ordering::SeqCst));
    }
}
