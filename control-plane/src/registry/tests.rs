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
