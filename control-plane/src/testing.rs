//! What unit tests of replicas share: a store shared in memory, as etcd is to them (each batch
//! gets the next revision, a transaction's guards are checked against each key's revision, and
//! every batch's events reach every replica as one watch response), and a replica on it that
//! joins before anything is written.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::{
    addresses::AddressTable,
    metrics::Metrics,
    registry::{Registry, RegistryConfig, Shared},
    store::{Event, Guard, Rows, Store, StoreError, Table, Write},
};

/// A replica's registry and address table, kept in step with a [`SharedMemory`] as the
/// replica's watch keeps them with etcd.
pub(crate) struct Replica {
    pub(crate) registry: Arc<Registry>,
    pub(crate) addresses: Arc<AddressTable>,
}

impl Replica {
    /// Replica `id` on `store`; with `duty`, the one that allocates virtual IPs.
    pub(crate) async fn join(store: &Arc<SharedMemory>, id: &str, config: RegistryConfig, duty: bool) -> Self {
        let shared = Shared::new(id);
        let mut feed = store.feed();
        let registry = Registry::open_with(
            store.clone(),
            config,
            Metrics::unregistered().registry,
            Default::default(),
            Some(shared.clone()),
        )
        .await
        .expect("opens");
        registry.set_virtual_ip_duty(duty);
        let addresses = AddressTable::attach(&registry, Default::default());
        let (watching, table) = (registry.clone(), addresses.clone());
        tokio::spawn(async move {
            while let Some(batch) = feed.recv().await {
                let mut last = 0;
                for event in &batch {
                    match event.table {
                        Table::Instances => watching.apply_event(event),
                        Table::VirtualIps => watching.apply_virtual_ip_event(event),
                        _ => {}
                    }
                    last = last.max(event.revision);
                }
                table.seal(last);
                shared.applied.send_modify(|applied| *applied = (*applied).max(last));
            }
        });
        // A replica's first load, of a store empty so far.
        addresses.seal(store.revision());
        Self { registry, addresses }
    }
}

/// The shared store.
#[derive(Default)]
pub(crate) struct SharedMemory {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    revision: u64,
    /// Each key's value and the revision of its last change.
    keys: HashMap<(Table, String), (Vec<u8>, u64)>,
    feeds: Vec<mpsc::UnboundedSender<Vec<Event>>>,
}

impl SharedMemory {
    /// The batches committed from now on.
    pub(crate) fn feed(&self) -> mpsc::UnboundedReceiver<Vec<Event>> {
        let (tx, rx) = mpsc::unbounded_channel();
        ferry_runtime::lock(&self.state).feeds.push(tx);
        rx
    }

    /// The revision of the last batch.
    pub(crate) fn revision(&self) -> u64 {
        ferry_runtime::lock(&self.state).revision
    }

    /// The value of `key`, if any.
    pub(crate) fn get(&self, table: Table, key: &str) -> Option<Vec<u8>> {
        ferry_runtime::lock(&self.state).keys.get(&(table, key.to_owned())).map(|(value, _)| value.clone())
    }

    fn commit(state: &mut State, batch: Vec<Write>) -> u64 {
        state.revision += 1;
        let revision = state.revision;
        let mut events = Vec::with_capacity(batch.len());
        for write in batch {
            let key = (write.table, write.key.clone());
            match &write.value {
                Some(value) => state.keys.insert(key, (value.clone(), revision)),
                None => state.keys.remove(&key),
            };
            events.push(Event { table: write.table, key: write.key, value: write.value, version: revision, revision });
        }
        state.feeds.retain(|feed| feed.send(events.clone()).is_ok());
        revision
    }
}

impl Store for SharedMemory {
    fn load(&self, table: Table) -> BoxFuture<'_, Result<Rows, StoreError>> {
        let state = ferry_runtime::lock(&self.state);
        let rows = state.keys.iter().filter(|((t, _), _)| *t == table).map(|((_, k), (v, _))| (k.clone(), v.clone())).collect();
        Box::pin(std::future::ready(Ok(rows)))
    }

    fn apply(&self, batch: Vec<Write>) -> BoxFuture<'_, Result<u64, StoreError>> {
        let revision = Self::commit(&mut ferry_runtime::lock(&self.state), batch);
        Box::pin(std::future::ready(Ok(revision)))
    }

    fn transact(&self, guards: Vec<Guard>, batch: Vec<Write>) -> BoxFuture<'_, Result<Result<u64, u64>, StoreError>> {
        let mut state = ferry_runtime::lock(&self.state);
        let held = |guard: &Guard| state.keys.get(&(guard.table, guard.key.clone())).map_or(0, |(_, version)| *version);
        let result = match guards.iter().find(|guard| held(guard) != guard.version) {
            Some(lost) => Err(held(lost).max(1)),
            None => Ok(Self::commit(&mut state, batch)),
        };
        Box::pin(std::future::ready(Ok(result)))
    }

    fn create(&self, table: Table, key: String, value: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        let held = self.get(table, &key);
        let result = match held {
            Some(held) => Ok(held),
            None => {
                Self::commit(&mut ferry_runtime::lock(&self.state), vec![Write { table, key, value: Some(value.clone()) }]);
                Ok(value)
            }
        };
        Box::pin(std::future::ready(result))
    }

    fn describe(&self) -> String {
        "shared memory".into()
    }
}
