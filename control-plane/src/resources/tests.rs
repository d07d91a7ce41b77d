use super::*;
use crate::store::MemoryStore;
use crate::store::{Event, Guard, Table, Write};
use std::collections::HashMap;

async fn resources_on(store: Arc<dyn Store>) -> Arc<Resources> {
    Resources::open(store, Arc::new(Indexes::default()), Duration::from_secs(5), Default::default()).await.expect("opens")
}

async fn resources() -> Arc<Resources> {
    resources_on(Arc::new(MemoryStore::default())).await
}

fn items(yaml: &str) -> Vec<v1::ApplyItem> {
    json::resources_from_yaml(yaml)
        .expect("valid YAML")
        .into_iter()
        .map(|r| v1::ApplyItem { resource: Some(r), expected_version: None })
        .collect()
}

const CANARY: &str =
    "kind: Route\nservice: catalog\nrules: [ { backends: [ { subset: v1, weight: 90 }, { subset: v2, weight: 10 } ] } ]\n";
const POLICY: &str =
    "kind: ServicePolicy\nservice: catalog\nsubsets: { v1: { labels: { version: v1 } }, v2: { labels: { version: v2 } } }\n";

fn route_version(resource: &v1::Resource) -> u64 {
    match &resource.kind {
        Some(v1::resource::Kind::Route(route)) => route.version,
        _ => 0,
    }
}

#[tokio::test]
async fn apply_stores_versions_and_watchers_see_them() {
    let resources = resources().await;
    let mut watch = resources.watch("catalog");
    assert_eq!(watch.borrow_and_update().version, 0);
    let applied = resources.apply(items(&format!("{POLICY}---\n{CANARY}")), false).await.expect("applies");
    assert!(applied.iter().all(|a| a.changed));
    assert!(applied[1].diff.contains("+kind: Route"), "{}", applied[1].diff);
    let config = watch.borrow_and_update().clone();
    assert!(config.version > 0);
    assert_eq!(config.route_version, config.policy_version, "one apply, one version");
    assert_eq!(config.route.as_ref().map(|r| r.rules.len()), Some(1));

    // The same again changes nothing and keeps the version.
    let again = resources.apply(items(CANARY), false).await.expect("applies");
    assert!(!again[0].changed);
    assert_eq!(route_version(again[0].resource.as_ref().expect("resource")), config.route_version);
}

#[tokio::test]
async fn an_invalid_resource_refuses_the_whole_apply() {
    let resources = resources().await;
    resources.apply(items(&format!("{POLICY}---\n{CANARY}")), false).await.expect("applies");
    let before = resources.list(None, None);
    let mut batch = items(POLICY);
    let mut bad = items(CANARY).remove(0);
    if let Some(v1::resource::Kind::Route(route)) = &mut bad.resource.as_mut().expect("resource").kind {
        route.rules[0].backends[0].weight = 20_000;
    }
    batch.push(bad);
    let error = resources.apply(batch, false).await.expect_err("invalid");
    let ResourceError::Invalid(field) = error else { panic!("{error}") };
    assert_eq!(field.field, "items[1].resource.rules[0].backends[0].weight");
    assert_eq!(resources.list(None, None), before, "nothing changed, the valid policy neither");
}

#[tokio::test]
async fn expected_versions_guard_concurrent_edits() {
    let resources = resources().await;
    resources.apply(items(POLICY), false).await.expect("applies");
    let mut first = items(CANARY);
    first[0].expected_version = Some(0);
    let applied = resources.apply(first, false).await.expect("creates");
    let version = route_version(applied[0].resource.as_ref().expect("resource"));

    let mut stale = items(&CANARY.replace("90", "50").replace("10 }", "50 }"));
    stale[0].expected_version = Some(version - 1);
    assert!(matches!(resources.apply(stale, false).await, Err(ResourceError::Conflict { actual, .. }) if actual == version));
    let mut current = items(&CANARY.replace("90", "50").replace("10 }", "50 }"));
    current[0].expected_version = Some(version);
    resources.apply(current, false).await.expect("applies at the expected version");
}

#[tokio::test]
async fn a_resource_carrying_its_version_applies_only_over_that_version() {
    let resources = resources().await;
    let applied = resources.apply(items(&format!("{POLICY}---\n{CANARY}")), false).await.expect("applies");
    let saved = applied[1].resource.clone().expect("resource");
    let edited = |resource: &v1::Resource, weight: u32| {
        let mut resource = resource.clone();
        if let Some(v1::resource::Kind::Route(route)) = &mut resource.kind {
            route.rules[0].backends[0].weight = weight;
        }
        vec![v1::ApplyItem { resource: Some(resource), expected_version: None }]
    };
    let newer = resources.apply(edited(&saved, 80), false).await.expect("over the version it carries");
    let error = resources.apply(edited(&saved, 70), false).await.expect_err("a stale copy");
    let ResourceError::Conflict { field, actual, .. } = error else { panic!("{error}") };
    assert_eq!(field, "items[0].resource.version");
    assert_eq!(actual, route_version(newer[0].resource.as_ref().expect("resource")));
}

#[tokio::test]
async fn subsets_a_route_names_must_be_defined() {
    let resources = resources().await;
    let error = resources.apply(items(CANARY), false).await.expect_err("no policy yet");
    let ResourceError::Invalid(field) = error else { panic!("{error}") };
    assert_eq!(field.field, "items[0].resource.rules[0].backends[0].subset");
    assert!(field.reason.contains("catalog has no policy"), "{}", field.reason);

    // With the policy in the same apply, in either order.
    resources.apply(items(&format!("{CANARY}---\n{POLICY}")), false).await.expect("applies");

    // The policy cannot drop a subset the route uses, nor be deleted under it.
    let narrower = POLICY.replace(", v2: { labels: { version: v2 } }", "");
    let error = resources.apply(items(&narrower), false).await.expect_err("v2 is in use");
    let ResourceError::Invalid(field) = error else { panic!("{error}") };
    assert_eq!(field.field, "items[0].resource.subsets");
    assert!(field.reason.contains("\"v2\" is used by route/catalog rules[0].backends[1]"), "{}", field.reason);
    let error = resources.delete(Kind::Policy, "catalog", None).await.expect_err("in use");
    assert!(matches!(error, ResourceError::InUse(_)), "{error}");

    // Once the route no longer names them, they can go.
    resources.delete(Kind::Route, "catalog", None).await.expect("deletes the route");
    resources.delete(Kind::Policy, "catalog", None).await.expect("deletes the policy");
}

#[tokio::test]
async fn a_dry_run_shows_the_diff_and_stores_nothing() {
    let resources = resources().await;
    resources.apply(items(&format!("{POLICY}---\n{CANARY}")), false).await.expect("applies");
    let dry = resources.apply(items(&CANARY.replace("weight: 10", "weight: 30")), true).await.expect("validates");
    assert!(dry[0].changed);
    assert!(dry[0].diff.contains("-    weight: 10") && dry[0].diff.contains("+    weight: 30"), "{}", dry[0].diff);
    let stored = resources.get(Kind::Route, "catalog").expect("stored");
    assert!(json::resource_to_yaml(&stored).contains("weight: 10"));
}

#[tokio::test]
async fn history_keeps_the_last_versions_and_deletes() {
    let resources = resources().await;
    resources.apply(items(POLICY), false).await.expect("applies");
    for weight in 1..=12 {
        resources.apply(items(&CANARY.replace("weight: 10", &format!("weight: {weight}"))), false).await.expect("applies");
    }
    resources.delete(Kind::Route, "catalog", None).await.expect("deletes");
    assert!(resources.get(Kind::Route, "catalog").is_none());
    let history = resources.history(Kind::Route, "catalog");
    assert_eq!(history.len(), HISTORY);
    assert!(history[0].resource.is_none(), "the newest entry is the delete");
    assert!(history.windows(2).all(|w| w[0].version > w[1].version), "newest first");
    assert!(matches!(resources.delete(Kind::Route, "catalog", None).await, Err(ResourceError::NotFound { .. })));
}

#[tokio::test]
async fn resources_survive_a_restart() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let version = {
        let resources = resources_on(store.clone()).await;
        resources.apply(items(&format!("{POLICY}---\n{CANARY}")), false).await.expect("applies");
        resources.flush().await.expect("flushes");
        resources.config("catalog").version
    };
    let indexes = Arc::new(Indexes::default());
    let reopened = Resources::open(store, indexes.clone(), Duration::from_secs(5), Default::default()).await.expect("reopens");
    assert_eq!(reopened.config("catalog").version, version);
    assert_eq!(reopened.list(None, None).len(), 2);
    assert!(indexes.peek() > version, "new versions come after stored ones");
}

#[test]
fn dependencies_are_the_other_services_a_route_sends_to() {
    let route = "kind: Route\nservice: catalog\nrules:\n  - backends: [ { subset: v1 }, { service: catalog-next, weight: 1 } ]\n    mirror: { backend: { service: shadow }, percent: 5 }\n";
    let Some(v1::resource::Kind::Route(route)) = json::resources_from_yaml(route).expect("valid").remove(0).kind else {
        panic!()
    };
    let config = ServiceConfig { route: Some(Arc::new(route)), ..Default::default() };
    assert_eq!(config.dependencies(), ["catalog-next", "shadow"]);
}

/// A store shared by replicas, as etcd is: guarded transactions, a revision per commit, and
/// every commit's events fed to each replica in order.
/// The store's revision, and each key's version.
type Versions = (u64, HashMap<(Table, String), u64>);

#[derive(Default)]
struct SharedStore {
    state: std::sync::Mutex<Versions>,
    feeds: std::sync::Mutex<Vec<tokio::sync::mpsc::UnboundedSender<Event>>>,
}

impl Store for SharedStore {
    fn load(&self, _: Table) -> futures::future::BoxFuture<'_, Result<crate::store::Rows, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn apply(&self, batch: Vec<Write>) -> futures::future::BoxFuture<'_, Result<u64, StoreError>> {
        let revision = self.commit(Vec::new(), batch).unwrap_or(0);
        Box::pin(async move { Ok(revision) })
    }

    fn transact(
        &self,
        guards: Vec<Guard>,
        batch: Vec<Write>,
    ) -> futures::future::BoxFuture<'_, Result<Result<u64, u64>, StoreError>> {
        let result = self.commit(guards, batch);
        Box::pin(async move { Ok(result) })
    }

    fn create(&self, _: Table, _: String, value: Vec<u8>) -> futures::future::BoxFuture<'_, Result<Vec<u8>, StoreError>> {
        Box::pin(async move { Ok(value) })
    }

    fn describe(&self) -> String {
        "shared".into()
    }
}

impl SharedStore {
    fn commit(&self, guards: Vec<Guard>, batch: Vec<Write>) -> Result<u64, u64> {
        let mut state = ferry_runtime::lock(&self.state);
        for guard in &guards {
            let version = state.1.get(&(guard.table, guard.key.clone())).copied().unwrap_or(0);
            if version != guard.version {
                return Err(version);
            }
        }
        state.0 += 1;
        let revision = state.0;
        let mut events = Vec::new();
        for write in batch {
            state.1.insert((write.table, write.key.clone()), revision);
            events.push(Event { table: write.table, key: write.key, value: write.value, version: revision, revision });
        }
        for feed in ferry_runtime::lock(&self.feeds).iter() {
            for event in &events {
                let _ = feed.send(event.clone());
            }
        }
        Ok(revision)
    }

    async fn replica(self: &Arc<Self>, id: &str) -> Arc<Resources> {
        let shared = Shared::new(id);
        let resources = Resources::open_with(
            self.clone(),
            Arc::new(Indexes::default()),
            Duration::from_secs(5),
            Default::default(),
            Some(shared.clone()),
        )
        .await
        .expect("opens");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        ferry_runtime::lock(&self.feeds).push(tx);
        let watching = resources.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let Some(kind) = Kind::of_table(event.table) {
                    watching.apply_event(kind, &event);
                }
                shared.applied.send_modify(|applied| *applied = (*applied).max(event.revision));
            }
        });
        resources
    }
}

#[tokio::test]
async fn replicas_version_resources_by_the_stores_revision_and_guard_expected_versions() {
    let store = Arc::new(SharedStore::default());
    let (a, b) = (store.replica("a").await, store.replica("b").await);
    let applied = a.apply(items(POLICY), false).await.expect("applies through a");
    let version = match &applied[0].resource.as_ref().and_then(|r| r.kind.clone()) {
        Some(v1::resource::Kind::Policy(policy)) => policy.version,
        other => panic!("{other:?}"),
    };
    assert_eq!(version, 1, "the store's revision");
    let mut on_b = b.watch("catalog");
    on_b.wait_for(|config| config.policy_version == 1).await.expect("b sees it at the same version");

    // b changes it over the version it holds; a, still offered the old version, is refused.
    let route = a.apply(items(CANARY), false).await.expect("the route, through a");
    assert_eq!(route_version(route[0].resource.as_ref().expect("stored")), 2);
    on_b.wait_for(|config| config.route_version == 2).await.expect("b has the route");
    let mut edited = items(&CANARY.replace("weight: 90", "weight: 80").replace("weight: 10", "weight: 20"));
    edited[0].expected_version = Some(2);
    b.apply(edited.clone(), false).await.expect("applies over version 2 through b");
    let error = a.apply(edited, false).await.expect_err("version 2 is gone");
    match error {
        ResourceError::Conflict { expected: 2, actual: 3, .. } => {}
        other => panic!("{other}"),
    }
    assert_eq!(a.history(Kind::Route, "catalog").len(), 2, "one history on every replica");
}

#[tokio::test]
async fn watchers_of_names_nobody_holds_stay_bounded() {
    let resources = resources().await;
    let held: Vec<_> = (0..10).map(|i| resources.watch(&format!("held-{i}"))).collect();
    for i in 0..10_000 {
        drop(resources.watch(&format!("once-{i}")));
        let watchers = resources.lock().watchers.len();
        assert!(watchers <= 128, "{watchers} watchers after {i} names watched once");
    }
    // The ones still held are kept through every sweep.
    let state = resources.lock();
    assert!((0..10).all(|i| state.watchers.contains_key(format!("held-{i}").as_str())));
    drop(state);
    drop(held);
}
