use super::*;
use crate::{metrics::Metrics, store::MemoryStore};

fn spec(service: &str, id: &str, port: u16) -> InstanceSpec {
    InstanceSpec::try_from(v1::Instance {
        id: id.into(),
        service: service.into(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ..Default::default()
    })
    .expect("valid spec")
}

async fn registry_with(store: Arc<dyn Store>, grace: Duration) -> Arc<Registry> {
    let config = RegistryConfig { reconnect_grace: grace, ..Default::default() };
    Registry::open(store, config, Metrics::unregistered().registry, Default::default()).await.expect("opens")
}

async fn registry() -> Arc<Registry> {
    registry_with(Arc::new(MemoryStore::default()), Duration::from_secs(30)).await
}

#[tokio::test]
async fn every_change_bumps_the_service_index() {
    let registry = registry().await;
    let mut watch = registry.watch("catalog");
    assert_eq!(watch.borrow_and_update().index, 0);

    registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    assert!(watch.has_changed().expect("open"));
    let first = watch.borrow_and_update().clone();
    assert!(first.index > 0);
    assert_eq!(first.instances.len(), 1);

    registry.register(spec("catalog", "c2", 8081)).await.expect("registers");
    let second = watch.borrow_and_update().clone();
    assert!(second.index > first.index);
    assert_eq!(second.instances.len(), 2);

    registry.deregister("c1").await.expect("deregisters");
    let third = watch.borrow_and_update().clone();
    assert!(third.index > second.index);
    assert_eq!(third.instances.keys().collect::<Vec<_>>(), ["c2"]);
}

#[tokio::test]
async fn an_unchanged_registration_changes_nothing() {
    let registry = registry().await;
    let first = registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    let again = registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    assert_eq!(first.index, again.index);
    let moved = registry.register(spec("catalog", "c1", 9090)).await.expect("re-registers");
    assert!(moved.index > first.index);
    assert_eq!(moved.port, 9090);
}

#[tokio::test]
async fn an_id_cannot_move_to_another_service() {
    let registry = registry().await;
    registry.register(spec("catalog", "x1", 8080)).await.expect("registers");
    let err = registry.register(spec("inventory", "x1", 8080)).await.expect_err("taken");
    let RegistryError::Invalid(field) = err else { panic!("expected a field error, got {err}") };
    assert_eq!(field.field, "id");
    assert_eq!(registry.snapshot("inventory").map(|s| s.exists()), None);
    assert_eq!(registry.instance("x1").map(|i| i.service.to_string()), Some("catalog".into()));
}

#[tokio::test]
async fn services_lists_only_those_with_instances() {
    let registry = registry().await;
    let _watching = registry.watch("nothing-here");
    registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    let names: Vec<_> = registry.services().into_iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["catalog"]);
}

#[tokio::test]
async fn deltas_carry_only_the_changes() {
    let registry = registry().await;
    for i in 0..10 {
        registry.register(spec("catalog", &format!("c{i}"), 8000 + i)).await.expect("registers");
    }
    let before = registry.snapshot("catalog").expect("exists").index;
    registry.deregister("c3").await.expect("deregisters");
    registry.register(spec("catalog", "c4", 9999)).await.expect("moves");
    let snapshot = registry.snapshot("catalog").expect("exists");
    let delta = snapshot.changes_since(before).expect("within the log");
    assert_eq!(delta.removed, ["c3"]);
    assert_eq!(delta.upserted.iter().map(|i| (i.id.as_str(), i.port)).collect::<Vec<_>>(), [("c4", 9999)]);
    assert_eq!(snapshot.changes_since(snapshot.index), Some(Delta::default()));
    assert_eq!(snapshot.changes_since(snapshot.index + 1), None);
}

#[tokio::test]
async fn the_change_log_is_bounded() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let config = RegistryConfig { change_log: 4, ..Default::default() };
    let registry = Registry::open(store, config, Metrics::unregistered().registry, Default::default()).await.expect("opens");
    registry.register(spec("catalog", "c0", 8000)).await.expect("registers");
    let old = registry.snapshot("catalog").expect("exists").index;
    for i in 1..10 {
        registry.register(spec("catalog", &format!("c{i}"), 8000 + i)).await.expect("registers");
    }
    let snapshot = registry.snapshot("catalog").expect("exists");
    assert_eq!(snapshot.changes_since(old), None, "too old for a delta");
    assert!(snapshot.changes_since(snapshot.index - 2).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_broken_stream_makes_the_instance_critical_then_removes_it() {
    let registry = registry_with(Arc::new(MemoryStore::default()), Duration::from_secs(30)).await;
    let session = registry.new_session();
    registry.attach(session, "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches");
    registry.detach(session, "c1", false);
    assert_eq!(registry.instance("c1").map(|i| i.health), Some(Health::Critical));

    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(registry.instance("c1").is_some(), "kept during the grace period");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(registry.instance("c1").is_none(), "removed after the grace period");
}

#[tokio::test(start_paused = true)]
async fn a_sidecar_that_reconnects_keeps_its_instance() {
    let registry = registry().await;
    let first = registry.new_session();
    registry.attach(first, "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches");
    registry.detach(first, "c1", false);
    let second = registry.new_session();
    registry.attach(second, "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("re-attaches");
    assert_eq!(registry.instance("c1").map(|i| i.health), Some(Health::Passing));

    // The old stream's late detach and the old timer must not touch the new lease.
    registry.detach(first, "c1", false);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(registry.instance("c1").map(|i| i.health), Some(Health::Passing));
}

#[tokio::test]
async fn goodbye_removes_at_once() {
    let registry = registry().await;
    let session = registry.new_session();
    registry.attach(session, "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches");
    registry.detach(session, "c1", true);
    assert!(registry.instance("c1").is_none());
}

#[tokio::test]
async fn sidecars_and_the_api_cannot_take_each_others_ids() {
    let registry = registry().await;
    registry.register(spec("catalog", "api-1", 8080)).await.expect("registers");
    let err = registry.attach(registry.new_session(), "n", spec("catalog", "api-1", 8080), Health::Passing);
    assert!(matches!(err, Err(RegistryError::Invalid(_))));

    registry.attach(registry.new_session(), "n", spec("catalog", "side-1", 8081), Health::Passing).expect("attaches");
    let err = registry.register(spec("catalog", "side-1", 8081)).await;
    assert!(matches!(err, Err(RegistryError::Invalid(_))));
}

#[tokio::test(start_paused = true)]
async fn persistent_and_sidecar_instances_survive_a_restart() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let old_index;
    {
        let registry = registry_with(store.clone(), Duration::from_secs(30)).await;
        registry.register(spec("db", "db-1", 5432)).await.expect("registers");
        registry.attach(registry.new_session(), "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches");
        registry.flush().await.expect("flushes");
        old_index = registry.snapshot("db").expect("exists").index;
    }
    let registry = registry_with(store, Duration::from_secs(30)).await;
    assert_eq!(registry.instance("db-1").map(|i| i.port), Some(5432));
    assert_eq!(registry.instance("c1").map(|i| i.health), Some(Health::Passing), "no flap on restart");
    assert!(registry.snapshot("db").expect("exists").index > old_index, "indexes never repeat");

    // The sidecar instance waits for its sidecar; the persistent one stays.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(registry.instance("c1").is_none());
    assert!(registry.instance("db-1").is_some());
}

#[tokio::test]
async fn a_recreated_service_refuses_deltas_from_before() {
    let registry = registry().await;
    registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    registry.register(spec("catalog", "c2", 8081)).await.expect("registers");
    let held = registry.snapshot("catalog").expect("exists").index;
    registry.deregister("c1").await.expect("deregisters");
    registry.deregister("c2").await.expect("deregisters");
    // Forget the empty service the way the sweep does, then let it come back.
    registry.lock().services.remove("catalog");
    registry.register(spec("catalog", "c3", 8082)).await.expect("registers");
    let snapshot = registry.snapshot("catalog").expect("exists");
    assert_eq!(snapshot.changes_since(held), None, "a delta from {held} would miss the removals of c1 and c2");
    assert_eq!(snapshot.changes_since(0), None);
}

/// A store shared by replicas, as etcd is to them: each batch gets the next revision, and its
/// events go to every replica's feed, in order, when `deliver` lets them.
#[derive(Default)]
struct SharedStore {
    revision: Mutex<u64>,
    feeds: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<Event>>>,
    held: Mutex<Option<Vec<Event>>>,
}

impl SharedStore {
    fn feed(&self) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        ferry_runtime::lock(&self.feeds).push(tx);
        rx
    }

    fn send(&self, events: Vec<Event>) {
        for feed in ferry_runtime::lock(&self.feeds).iter() {
            for event in &events {
                let _ = feed.send(event.clone());
            }
        }
    }

    /// Holds the events of later commits back (a slow watch) until `release`.
    fn hold(&self) {
        *ferry_runtime::lock(&self.held) = Some(Vec::new());
    }

    fn release(&self) {
        let held = ferry_runtime::lock(&self.held).take().unwrap_or_default();
        self.send(held);
    }
}

impl Store for SharedStore {
    fn load(&self, _: Table) -> futures::future::BoxFuture<'_, Result<crate::store::Rows, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn apply(&self, batch: Vec<Write>) -> futures::future::BoxFuture<'_, Result<u64, StoreError>> {
        let revision = {
            let mut revision = ferry_runtime::lock(&self.revision);
            *revision += 1;
            *revision
        };
        let events: Vec<Event> = batch
            .into_iter()
            .map(|w| Event { table: w.table, key: w.key, value: w.value, version: revision, revision })
            .collect();
        match ferry_runtime::lock(&self.held).as_mut() {
            Some(held) => held.extend(events),
            None => self.send(events),
        }
        Box::pin(async move { Ok(revision) })
    }

    fn create(&self, _: Table, _: String, value: Vec<u8>) -> futures::future::BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        Box::pin(async move { Ok(value) })
    }

    fn describe(&self) -> String {
        "shared".into()
    }
}

/// A replica on `store` whose watch applies the store's events, and its replication state.
async fn replica(store: &Arc<SharedStore>, id: &str, grace: Duration) -> Arc<Registry> {
    let shared = Shared::new(id);
    let config = RegistryConfig { reconnect_grace: grace, ..Default::default() };
    let registry =
        Registry::open_with(store.clone(), config, Metrics::unregistered().registry, Default::default(), Some(shared.clone()))
            .await
            .expect("opens");
    let mut feed = store.feed();
    let watching = registry.clone();
    tokio::spawn(async move {
        while let Some(event) = feed.recv().await {
            watching.apply_event(&event);
            shared.applied.send_modify(|applied| *applied = (*applied).max(event.revision));
        }
    });
    registry
}

#[tokio::test]
async fn replicas_apply_every_change_at_the_stores_revision() {
    let store = Arc::new(SharedStore::default());
    let (a, b) = (replica(&store, "a", Duration::from_secs(30)).await, replica(&store, "b", Duration::from_secs(30)).await);
    let mut on_b = b.watch("catalog");
    let registered = a.register(spec("catalog", "c1", 8080)).await.expect("registers through a");
    assert_eq!(registered.index, 1, "the store's revision is the index");
    assert_eq!(a.snapshot("catalog").expect("on a").index, 1, "a's own write applied before register returned");
    on_b.wait_for(|s| s.index == 1).await.expect("b sees it at the same index");
    b.register(spec("catalog", "c2", 8081)).await.expect("registers through b");
    let on_a = a.snapshot("catalog").expect("on a");
    // b's register returned once b applied it; a applies the same event in the same order.
    let mut watch_a = a.watch("catalog");
    let on_a = watch_a.wait_for(|s| s.index == 2).await.map(|s| s.clone()).unwrap_or(on_a);
    assert_eq!(on_a.instances.keys().collect::<Vec<_>>(), ["c1", "c2"]);
    assert_eq!(b.snapshot("catalog").expect("on b").index, on_a.index);
}

#[tokio::test]
async fn a_replicas_writes_build_on_each_other_before_its_watch_reports_them() {
    let store = Arc::new(SharedStore::default());
    let a = replica(&store, "a", Duration::from_secs(30)).await;
    store.hold();
    let session = a.new_session();
    a.attach(session, "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches");
    // Not applied yet, but the next change sees it: the health report is not lost.
    assert!(a.snapshot("catalog").is_none_or(|s| s.instances.is_empty()), "memory follows the store's watch");
    assert_eq!(a.instance("c1").map(|i| i.health), Some(Health::Passing));
    assert!(a.record_health("c1", Health::Critical, Vec::new(), Some(session)).expect("recorded"));
    store.release();
    let mut watch = a.watch("catalog");
    let snapshot =
        watch.wait_for(|s| s.instances.get("c1").is_some_and(|i| i.health == Health::Critical)).await.expect("applied");
    assert_eq!(snapshot.instances["c1"].replica, "a");
    assert!(a.record_health("c1", Health::Passing, Vec::new(), Some(session)).expect("still its lease"));
}

#[tokio::test(start_paused = true)]
async fn an_instance_re_attached_to_another_replica_is_not_expired_by_the_old_one() {
    let store = Arc::new(SharedStore::default());
    let grace = Duration::from_secs(30);
    let (a, b) = (replica(&store, "a", grace).await, replica(&store, "b", grace).await);
    let on_a = a.new_session();
    a.attach(on_a, "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches to a");
    let mut watch = b.watch("catalog");
    watch.wait_for(|s| s.instances.contains_key("c1")).await.expect("b sees it");
    // The stream to a breaks; the sidecar comes back on b before the grace period ends.
    a.detach(on_a, "c1", false);
    watch.wait_for(|s| s.instances.get("c1").is_some_and(|i| i.health == Health::Critical)).await.expect("critical");
    b.attach(b.new_session(), "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("re-attaches to b");
    watch.wait_for(|s| s.instances.get("c1").is_some_and(|i| i.replica == "b")).await.expect("held by b");
    tokio::time::sleep(grace * 2).await;
    for registry in [&a, &b] {
        let instance = registry.instance("c1").expect("kept: its sidecar came back");
        assert_eq!((instance.replica.as_str(), instance.health), ("b", Health::Passing));
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_restarted_under_its_id_gives_its_old_sidecars_the_grace_period() {
    let store = Arc::new(SharedStore::default());
    let grace = Duration::from_secs(30);
    let before = replica(&store, "a", grace).await;
    before.attach(before.new_session(), "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches");
    // The same replica id starts again and loads what the store holds.
    let after = replica(&store, "a", grace).await;
    let mut instance = (*before.instance("c1").expect("held")).clone();
    instance.index = 0;
    let event = Event {
        table: Table::Instances,
        key: "c1".into(),
        value: Some(instance.to_proto().encode_to_vec()),
        version: 1,
        revision: 1,
    };
    after.apply_event(&event);
    assert_eq!(after.instance("c1").map(|i| i.health), Some(Health::Passing), "kept as it was");
    tokio::time::sleep(grace + Duration::from_secs(1)).await;
    assert!(after.instance("c1").is_none(), "removed: its sidecar never came back");
}

#[tokio::test]
async fn a_replica_cut_off_too_long_writes_back_the_instances_of_sidecars_still_streaming_to_it() {
    let store = Arc::new(SharedStore::default());
    let (a, b) = (replica(&store, "a", Duration::from_secs(30)).await, replica(&store, "b", Duration::from_secs(30)).await);
    a.attach(a.new_session(), "node-1", spec("catalog", "c1", 8080), Health::Passing).expect("attaches to a");
    let mut on_b = b.watch("catalog");
    on_b.wait_for(|s| s.instances.contains_key("c1")).await.expect("b sees it");
    // a's lease expired: b, running the janitor, removes its instance as an orphan.
    let seen = b.instance("c1").expect("held");
    b.remove_orphan("c1", &seen);
    let mut on_a = a.watch("catalog");
    on_a.wait_for(|s| !s.instances.contains_key("c1")).await.expect("a applies the removal");
    assert_eq!(b.reassert(), 0, "b holds no stream of it");
    // a joins again: its sidecar still streams to it, so the instance comes back.
    assert_eq!(a.reassert(), 1);
    let back = on_b.wait_for(|s| s.instances.contains_key("c1")).await.expect("back on b").instances["c1"].clone();
    assert_eq!((back.replica.as_str(), back.health), ("a", Health::Passing));
    assert_eq!(a.reassert(), 0, "nothing more to write");
}

#[tokio::test]
async fn placeholders_of_names_nobody_watches_stay_bounded() {
    let registry = registry().await;
    let held: Vec<_> = (0..10).map(|i| registry.watch(&format!("held-{i}"))).collect();
    for i in 0..10_000 {
        drop(registry.watch(&format!("once-{i}")));
        let services = registry.lock().services.len();
        assert!(services <= 512, "{services} services after {i} names watched once");
    }
    let state = registry.lock();
    assert!((0..10).all(|i| state.services.contains_key(format!("held-{i}").as_str())));
    drop(state);
    drop(held);
}
