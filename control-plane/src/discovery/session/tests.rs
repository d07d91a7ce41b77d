use std::time::Duration;

use ferry_proto::v1::{self, service_resources::Endpoints};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::*;
use crate::{
    addresses::AddressTable,
    ca::{Authority, CaConfig},
    metrics::Metrics,
    registry::{InstanceSpec, RegistryConfig},
    resources::Resources,
    store::MemoryStore,
};

/// A session driven over channels, as the gRPC layer drives it.
struct Harness {
    registry: Arc<Registry>,
    resources: Arc<Resources>,
    to_session: mpsc::Sender<Result<v1::SidecarMessage, Status>>,
    from_session: mpsc::Receiver<Result<v1::ControlMessage, Status>>,
    record: Arc<SidecarRecord>,
    authority: Arc<Authority>,
    /// The address table, when the sidecar intercepts.
    addresses: Option<Arc<AddressTable>>,
    /// The stream's first push, acknowledged.
    first: v1::Push,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Ended>,
    _dir: tempfile::TempDir,
}

async fn authority(dir: &std::path::Path) -> Arc<Authority> {
    let config = CaConfig {
        trust_domain: "ferry.local".into(),
        cert_ttl: Duration::from_secs(60),
        operator: None,
        data_dir: dir.to_path_buf(),
        key_files: false,
        metrics: Default::default(),
    };
    Authority::open(config, Arc::new(MemoryStore::default())).await.expect("CA")
}

async fn harness_with(held: HashMap<String, u64>, registry: Option<Arc<Registry>>, credentials: Credentials) -> Harness {
    harness_of(held, registry, credentials, None).await
}

/// A harness whose sidecar intercepts, holding the address table at `held` (0: none), over the
/// registry and table given or new ones.
async fn intercepting(held: u64, registry: Option<(Arc<Registry>, Arc<AddressTable>)>) -> Harness {
    let registry = match registry {
        Some(registry) => registry,
        None => {
            let registry = new_registry(RegistryConfig::default()).await;
            let table = AddressTable::attach(&registry, Default::default());
            (registry, table)
        }
    };
    harness_of(HashMap::new(), Some(registry.0), Credentials::default(), Some((registry.1, held))).await
}

async fn new_registry(config: RegistryConfig) -> Arc<Registry> {
    Registry::open(Arc::new(MemoryStore::default()), config, Metrics::unregistered().registry, Default::default())
        .await
        .expect("opens")
}

async fn harness_of(
    held: HashMap<String, u64>,
    registry: Option<Arc<Registry>>,
    credentials: Credentials,
    intercept: Option<(Arc<AddressTable>, u64)>,
) -> Harness {
    let registry = match registry {
        Some(registry) => registry,
        None => Registry::open(
            Arc::new(MemoryStore::default()),
            RegistryConfig::default(),
            Metrics::unregistered().registry,
            Default::default(),
        )
        .await
        .expect("opens"),
    };
    let record =
        Arc::new(SidecarRecord::new("node-1".into(), "frontend".into(), None, "test".into(), "test".into(), String::new()));
    let dir = tempfile::tempdir().expect("tempdir");
    let authority = authority(dir.path()).await;
    let resources = Resources::open(
        Arc::new(MemoryStore::default()),
        Arc::new(Default::default()),
        Duration::from_secs(5),
        Default::default(),
    )
    .await
    .expect("opens");
    let session = Session::new(
        registry.new_session(),
        registry.clone(),
        resources.clone(),
        authority.watch(),
        SessionConfig::default(),
        Metrics::unregistered().push,
        record.clone(),
        held,
        credentials,
    );
    let (session, addresses) = match intercept {
        Some((table, held)) => (session.intercepting(table.clone(), held), Some(table)),
        None => (session, None),
    };
    let (to_session, inbound) = mpsc::channel(16);
    let (outbound, from_session) = mpsc::channel(1);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(session.run(ReceiverStream::new(inbound), outbound, shutdown.clone()));
    let mut harness = Harness {
        registry,
        resources,
        to_session,
        from_session,
        record,
        authority,
        addresses,
        first: v1::Push::default(),
        shutdown,
        task,
        _dir: dir,
    };
    // Every stream starts with the trust bundle and the sidecar's authorization policy.
    let first = harness.push().await;
    assert_eq!(first.trust_bundle.as_ref().map(|b| b.version), Some(harness.authority.bundle().version));
    assert_eq!(first.authorization, Some(v1::AuthorizationUpdate { policy: None, version: 0 }));
    harness.ack(&first.nonce).await;
    harness.first = first;
    harness
}

async fn harness() -> Harness {
    harness_with(HashMap::new(), None, Credentials::default()).await
}

fn spec(service: &str, id: &str, port: u16) -> InstanceSpec {
    InstanceSpec::try_from(v1::Instance {
        id: id.into(),
        service: service.into(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ..Default::default()
    })
    .expect("valid")
}

fn message(message: v1::sidecar_message::Message) -> Result<v1::SidecarMessage, Status> {
    Ok(v1::SidecarMessage { message: Some(message) })
}

impl Harness {
    async fn send(&self, m: v1::sidecar_message::Message) {
        self.to_session.send(message(m)).await.expect("session alive");
    }

    async fn subscribe(&self, services: &[&str]) {
        self.send(v1::sidecar_message::Message::Subscribe(v1::Subscribe {
            services: services.iter().map(|s| s.to_string()).collect(),
        }))
        .await;
    }

    async fn ack(&self, nonce: &str) {
        self.send(v1::sidecar_message::Message::Ack(v1::Ack { nonce: nonce.into() })).await;
    }

    async fn nack(&self, nonce: &str, error: &str) {
        self.send(v1::sidecar_message::Message::Nack(v1::Nack {
            nonce: nonce.into(),
            error: error.into(),
            services: Vec::new(),
        }))
        .await;
    }

    /// The next push, failing the test after a minute of (paused) time.
    async fn push(&mut self) -> v1::Push {
        let message = tokio::time::timeout(Duration::from_secs(60), self.from_session.recv())
            .await
            .expect("a push within a minute")
            .expect("stream open")
            .expect("not an error");
        match message.message {
            Some(v1::control_message::Message::Push(push)) => push,
            other => panic!("expected a push, got {other:?}"),
        }
    }

    /// Asserts that nothing is pushed for a while.
    async fn no_push(&mut self) {
        let next = tokio::time::timeout(Duration::from_secs(5), self.from_session.recv()).await;
        assert!(next.is_err(), "unexpected push: {next:?}");
    }
}

fn endpoint_ports(resources: &v1::ServiceResources) -> Vec<u32> {
    match &resources.endpoints {
        Some(Endpoints::Snapshot(set)) => set.endpoints.iter().map(|e| e.port).collect(),
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn pushes_only_what_the_sidecar_subscribed_to() {
    let mut h = harness().await;
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    h.registry.register(spec("inventory", "i1", 9090)).await.expect("registers");

    h.subscribe(&["catalog"]).await;
    let push = h.push().await;
    assert_eq!(push.resources.len(), 1);
    assert_eq!(push.resources[0].service, "catalog");
    assert!(push.resources[0].exists);
    assert_eq!(endpoint_ports(&push.resources[0]), [8080]);
    h.ack(&push.nonce).await;

    h.registry.register(spec("inventory", "i2", 9091)).await.expect("registers");
    h.no_push().await;
}

#[tokio::test(start_paused = true)]
async fn an_unknown_service_is_pushed_as_absent_then_appears() {
    let mut h = harness().await;
    h.subscribe(&["ghost"]).await;
    let push = h.push().await;
    assert_eq!(push.resources[0].service, "ghost");
    assert!(!push.resources[0].exists);
    assert_eq!(push.resources[0].endpoints, None);
    h.ack(&push.nonce).await;

    h.registry.register(spec("ghost", "g1", 7000)).await.expect("registers");
    let push = h.push().await;
    assert!(push.resources[0].exists);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_coalesced_within_the_bound() {
    let mut h = harness().await;
    h.subscribe(&["catalog"]).await;
    let first = h.push().await;
    h.ack(&first.nonce).await;

    let start = Instant::now();
    for i in 0..20u16 {
        h.registry.register(spec("catalog", &format!("c{i}"), 8000 + i)).await.expect("registers");
    }
    let push = h.push().await;
    let waited = start.elapsed();
    assert!(waited <= Duration::from_millis(50), "pushed after {waited:?}");
    assert_eq!(push.resources.len(), 1);
    let version = h.registry.snapshot("catalog").expect("exists").index;
    assert_eq!(push.resources[0].version, version, "one push carries the whole burst");
    h.no_push().await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_sidecar_gets_the_latest_state_not_every_step() {
    let mut h = harness().await;
    h.subscribe(&["catalog"]).await;
    // Do not read: changes pile up behind the one push the channel holds.
    for i in 0..10u16 {
        h.registry.register(spec("catalog", &format!("c{i}"), 8000 + i)).await.expect("registers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let latest = h.registry.snapshot("catalog").expect("exists").index;
    let mut pushes = 0;
    loop {
        let push = h.push().await;
        pushes += 1;
        h.ack(&push.nonce).await;
        if push.resources[0].version == latest {
            break;
        }
    }
    assert!(pushes <= 3, "{pushes} pushes for 10 changes");
}

#[tokio::test(start_paused = true)]
async fn versions_held_from_hello_are_not_resent_and_older_ones_get_a_delta() {
    let registry = Registry::open(
        Arc::new(MemoryStore::default()),
        RegistryConfig::default(),
        Metrics::unregistered().registry,
        Default::default(),
    )
    .await
    .expect("opens");
    for i in 0..5u16 {
        registry.register(spec("catalog", &format!("c{i}"), 8000 + i)).await.expect("registers");
    }
    registry.register(spec("inventory", "i1", 9000)).await.expect("registers");
    let catalog_before = registry.snapshot("catalog").expect("exists").index;
    let inventory_now = registry.snapshot("inventory").expect("exists").index;
    registry.register(spec("catalog", "c5", 8005)).await.expect("registers");

    let held = HashMap::from([("catalog".to_owned(), catalog_before), ("inventory".to_owned(), inventory_now)]);
    let mut h = harness_with(held, Some(registry), Credentials::default()).await;
    h.subscribe(&["catalog", "inventory"]).await;
    let push = h.push().await;
    assert_eq!(push.resources.len(), 1, "inventory is unchanged");
    let Some(Endpoints::Delta(delta)) = &push.resources[0].endpoints else {
        panic!("expected a delta, got {:?}", push.resources[0].endpoints)
    };
    assert_eq!(delta.base_version, catalog_before);
    assert_eq!(delta.upserted.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["c5"]);
    assert!(delta.removed.is_empty());
}

#[tokio::test(start_paused = true)]
async fn acks_and_nacks_are_tracked() {
    let mut h = harness().await;
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    h.subscribe(&["catalog"]).await;
    let push = h.push().await;
    h.ack(&push.nonce).await;
    tokio::task::yield_now().await;
    let status = h.record_status();
    assert_eq!(status.subscriptions[0].acked_version, push.resources[0].version);
    assert!(status.last_nack.is_none());

    // A rejected delta is followed by a snapshot; a rejected snapshot is not resent until the
    // service changes.
    h.registry.register(spec("catalog", "c2", 8081)).await.expect("registers");
    let delta = h.push().await;
    assert!(matches!(delta.resources[0].endpoints, Some(Endpoints::Delta(_))));
    h.nack(&delta.nonce, "cannot apply").await;
    let rejected = h.push().await;
    assert!(matches!(rejected.resources[0].endpoints, Some(Endpoints::Snapshot(_))));
    h.nack(&rejected.nonce, "cannot apply").await;
    h.no_push().await;
    let status = h.record_status();
    let nack = status.last_nack.expect("nack kept");
    assert_eq!(nack.error, "cannot apply");
    assert_eq!(nack.versions.get("catalog"), Some(&rejected.resources[0].version));
    assert_eq!(status.subscriptions[0].acked_version, push.resources[0].version, "still on the last good version");

    h.registry.register(spec("catalog", "c3", 8082)).await.expect("registers");
    let next = h.push().await;
    assert!(next.resources[0].version > rejected.resources[0].version);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_delta_is_followed_by_a_snapshot() {
    let mut h = harness().await;
    for i in 0..4u16 {
        h.registry.register(spec("catalog", &format!("c{i}"), 8000 + i)).await.expect("registers");
    }
    h.subscribe(&["catalog"]).await;
    let push = h.push().await;
    h.ack(&push.nonce).await;
    h.registry.register(spec("catalog", "c9", 8009)).await.expect("registers");
    let delta = h.push().await;
    assert!(matches!(delta.resources[0].endpoints, Some(Endpoints::Delta(_))));
    h.nack(&delta.nonce, "delta base mismatch").await;
    let snapshot = h.push().await;
    assert_eq!(snapshot.resources[0].version, delta.resources[0].version);
    assert_eq!(endpoint_ports(&snapshot.resources[0]).len(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_rejection_blames_only_the_services_the_sidecar_names() {
    let mut h = harness().await;
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    h.registry.register(spec("inventory", "i1", 9090)).await.expect("registers");
    h.subscribe(&["catalog", "inventory"]).await;
    let push = h.push().await;
    assert_eq!(push.resources.len(), 2);
    let nack = v1::Nack { nonce: push.nonce.clone(), error: "resources[1]: bad".into(), services: vec!["inventory".into()] };
    h.send(v1::sidecar_message::Message::Nack(nack)).await;

    // catalog was fine but not applied (a push is applied whole): it comes again, alone.
    let again = h.push().await;
    assert_eq!(again.resources.iter().map(|r| r.service.as_str()).collect::<Vec<_>>(), ["catalog"]);
    h.ack(&again.nonce).await;
    h.no_push().await;
}

#[tokio::test(start_paused = true)]
async fn goodbye_ends_the_session_and_shutdown_too() {
    let h = harness().await;
    h.send(v1::sidecar_message::Message::Goodbye(v1::Goodbye { reason: "done".into() })).await;
    assert_eq!(h.task.await.expect("joins"), Ended::Goodbye);

    let h = harness().await;
    h.shutdown.cancel();
    assert_eq!(h.task.await.expect("joins"), Ended::Shutdown);

    let h = harness().await;
    drop(h.to_session);
    assert_eq!(h.task.await.expect("joins"), Ended::Broken);
}

#[tokio::test(start_paused = true)]
async fn a_bad_subscription_ends_the_stream_with_the_field() {
    let mut h = harness().await;
    h.subscribe(&["Not_A_Name"]).await;
    let error = h.from_session.recv().await.expect("a message").expect_err("an error");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(error.message().starts_with("subscribe.services[0]"), "{}", error.message());
}

impl Harness {
    fn record_status(&self) -> v1::SidecarStatus {
        let sidecars = Arc::new(super::super::Sidecars::default());
        let _guard = sidecars.connect(self.registry.new_session(), self.record.clone());
        sidecars.list(&self.registry, &self.resources, &self.authority).remove(0)
    }
}

#[tokio::test(start_paused = true)]
async fn small_changes_to_a_service_are_pushed_as_deltas() {
    let mut h = harness().await;
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    h.registry.register(spec("catalog", "c2", 8081)).await.expect("registers");
    h.subscribe(&["catalog"]).await;
    let first = h.push().await;
    h.ack(&first.nonce).await;
    for i in 0..5u16 {
        h.registry.register(spec("catalog", &format!("x{i}"), 9000 + i)).await.expect("registers");
        let push = h.push().await;
        assert!(matches!(push.resources[0].endpoints, Some(Endpoints::Delta(_))), "{push:?}");
        h.ack(&push.nonce).await;
        h.registry.deregister(&format!("x{i}")).await.expect("deregisters");
        let push = h.push().await;
        assert!(matches!(push.resources[0].endpoints, Some(Endpoints::Delta(_))), "{push:?}");
        h.ack(&push.nonce).await;
    }
}

async fn apply(resources: &Resources, yaml: &str) {
    let items = ferry_proto::json::resources_from_yaml(yaml)
        .expect("valid")
        .into_iter()
        .map(|r| v1::ApplyItem { resource: Some(r), expected_version: None })
        .collect();
    resources.apply(items, false).await.expect("applies");
}

#[tokio::test(start_paused = true)]
async fn a_route_change_is_pushed_with_the_endpoints_unchanged() {
    let mut h = harness().await;
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    h.subscribe(&["catalog"]).await;
    let first = h.push().await;
    assert!(first.resources[0].route.as_ref().is_some_and(|u| u.route.is_none()), "no route yet: {first:?}");
    h.ack(&first.nonce).await;

    apply(&h.resources, "kind: Route\nservice: catalog\nrules: [ { timeout: 2s } ]\n").await;
    let push = h.push().await;
    let resources = &push.resources[0];
    assert!(resources.version > first.resources[0].version);
    assert_eq!(resources.route.as_ref().and_then(|u| u.route.as_ref()).map(|r| r.rules.len()), Some(1));
    assert!(resources.policy.is_none(), "the policy did not change");
    let Some(Endpoints::Delta(delta)) = &resources.endpoints else {
        panic!("expected an empty delta, got {:?}", resources.endpoints)
    };
    assert!(delta.upserted.is_empty() && delta.removed.is_empty());
    assert_eq!(delta.base_version, first.resources[0].version);
    h.ack(&push.nonce).await;
    h.no_push().await;
}

#[tokio::test(start_paused = true)]
async fn a_route_arrives_with_the_services_it_sends_to() {
    let mut h = harness().await;
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    h.registry.register(spec("catalog-next", "n1", 9090)).await.expect("registers");
    h.subscribe(&["catalog"]).await;
    let first = h.push().await;
    h.ack(&first.nonce).await;

    apply(
        &h.resources,
        "kind: Route\nservice: catalog\nrules: [ { backends: [ { weight: 90 }, { service: catalog-next, weight: 10 } ] } ]\n",
    )
    .await;
    let push = h.push().await;
    let mut services: Vec<&str> = push.resources.iter().map(|r| r.service.as_str()).collect();
    services.sort();
    assert_eq!(services, ["catalog", "catalog-next"], "one push carries the route and its backend");
    let next = push.resources.iter().find(|r| r.service == "catalog-next").expect("carried");
    assert!(matches!(next.endpoints, Some(Endpoints::Snapshot(_))));
}

#[tokio::test(start_paused = true)]
async fn trust_and_the_own_authorization_policy_are_pushed_when_they_change() {
    let mut h = harness().await;
    h.authority.rotate().await.expect("rotates");
    let push = h.push().await;
    let bundle = push.trust_bundle.clone().expect("the new bundle");
    assert!(push.resources.is_empty() && push.authorization.is_none());
    h.ack(&push.nonce).await;
    let yaml = "kind: AuthorizationPolicy\nservice: frontend\nrules:\n  - from: [client]\n";
    let resource = ferry_proto::json::resources_from_yaml(yaml).expect("valid").remove(0);
    let item = v1::ApplyItem { resource: Some(resource), expected_version: None };
    h.resources.apply(vec![item], false).await.expect("applied");
    let push = h.push().await;
    let update = push.authorization.clone().expect("the sidecar's own policy");
    assert_eq!(update.policy.map(|p| p.rules.len()), Some(1));
    assert!(push.trust_bundle.is_none(), "unchanged");
    h.ack(&push.nonce).await;
    tokio::task::yield_now().await;
    let status = h.record_status();
    assert_eq!(status.trust_bundle_acked, bundle.version);
    assert_eq!(status.authorization.map(|a| a.acked_version), Some(update.version));
    // A policy of another service is not this sidecar's business.
    let other =
        ferry_proto::json::resources_from_yaml("kind: AuthorizationPolicy\nservice: catalog\nrules:\n  - from: [frontend]\n")
            .expect("valid")
            .remove(0);
    h.resources.apply(vec![v1::ApplyItem { resource: Some(other), expected_version: None }], false).await.expect("applied");
    h.no_push().await;
}

#[tokio::test(start_paused = true)]
async fn a_revoked_token_ends_its_stream() {
    let revoked = CancellationToken::new();
    let mut h = harness_with(HashMap::new(), None, Credentials { revoked: revoked.clone(), expires: None }).await;
    revoked.cancel();
    assert_eq!((&mut h.task).await.expect("ends"), Ended::Broken);
    let status = h.from_session.recv().await.expect("a last message").expect_err("an error");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

impl Harness {
    fn table(&self) -> &AddressTable {
        self.addresses.as_deref().expect("an intercepting sidecar's harness")
    }
}

fn names(table: &v1::AddressTable) -> Vec<&str> {
    table.upserted.iter().map(|s| s.service.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn an_intercepting_sidecar_gets_the_whole_address_table_first_then_deltas() {
    let mut h = intercepting(0, None).await;
    let first = h.first.addresses.clone().expect("the table in the first push");
    assert!(first.full);
    assert!(first.upserted.is_empty(), "nothing registered yet");
    assert_eq!(first.version, h.table().version());

    // A service the sidecar does not subscribe to still reaches its table, alone in the push.
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    let push = h.push().await;
    assert!(push.resources.is_empty() && push.trust_bundle.is_none() && push.authorization.is_none());
    let delta = push.addresses.clone().expect("the change");
    assert!(!delta.full);
    assert_eq!(delta.base_version, first.version);
    assert_eq!(names(&delta), ["catalog"]);
    assert_eq!(delta.upserted[0].endpoints, ["127.0.0.1:8080"]);
    assert!(!delta.upserted[0].virtual_ip.is_empty());
    h.ack(&push.nonce).await;

    // Changes within the coalescing bound of the last push leave in one push, built on it.
    let start = Instant::now();
    h.registry.register(spec("inventory", "i1", 9090)).await.expect("registers");
    h.registry.register(spec("catalog", "c2", 8081)).await.expect("registers");
    let push = h.push().await;
    assert!(start.elapsed() <= Duration::from_millis(50), "{:?}", start.elapsed());
    let next = push.addresses.expect("the changes");
    assert_eq!((next.base_version, names(&next)), (delta.version, vec!["catalog", "inventory"]));
    h.no_push().await;
}

#[tokio::test(start_paused = true)]
async fn a_sidecar_that_does_not_intercept_never_gets_the_address_table() {
    let mut h = harness().await;
    assert_eq!(h.first.addresses, None);
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    h.no_push().await;
    h.subscribe(&["catalog"]).await;
    let push = h.push().await;
    assert_eq!(push.addresses, None);
    assert!(!push.resources[0].virtual_ip.is_empty(), "its services' virtual IPs it gets");
}

#[tokio::test(start_paused = true)]
async fn a_sidecar_reconnecting_with_the_table_is_sent_only_what_changed() {
    let registry = new_registry(RegistryConfig::default()).await;
    let table = AddressTable::attach(&registry, Default::default());
    registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    let held = table.version();

    let h = intercepting(held, Some((registry.clone(), table.clone()))).await;
    assert_eq!(h.first.addresses, None, "it holds the table as it is");
    drop(h);

    registry.register(spec("inventory", "i1", 9090)).await.expect("registers");
    let h = intercepting(held, Some((registry.clone(), table.clone()))).await;
    let delta = h.first.addresses.clone().expect("what changed");
    assert_eq!((delta.full, delta.base_version, names(&delta)), (false, held, vec!["inventory"]));

    // A version from before the table began (from before a restart) gets the whole table.
    let h = intercepting(1, Some((registry, table))).await;
    let whole = h.first.addresses.clone().expect("everything");
    assert!(whole.full);
    assert_eq!(names(&whole), ["catalog", "inventory"]);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_push_with_the_address_table_is_followed_by_the_whole_table() {
    let mut h = intercepting(0, None).await;
    h.registry.register(spec("catalog", "c1", 8080)).await.expect("registers");
    let delta = h.push().await;
    assert!(!delta.addresses.as_ref().expect("the change").full);
    h.nack(&delta.nonce, "addresses.base_version: the delta builds on version 1 but the sidecar holds 0").await;
    let whole = h.push().await;
    let table = whole.addresses.clone().expect("the table again");
    assert!(table.full);
    assert_eq!(names(&table), ["catalog"]);

    // A whole table refused is not sent again until the table changes.
    h.nack(&whole.nonce, "addresses: bad").await;
    h.no_push().await;
    h.registry.register(spec("catalog", "c2", 8081)).await.expect("registers");
    let again = h.push().await;
    assert!(again.addresses.expect("the new table").full, "still nothing it can build on");
}

#[tokio::test(start_paused = true)]
async fn a_virtual_ip_given_later_is_pushed_to_the_services_subscribers() {
    // Two addresses for three services: the third waits for one to be released.
    let config = RegistryConfig {
        virtual_ips: "10.0.0.0/30".parse().expect("valid"),
        vip_release_after: Duration::from_secs(10),
        ..Default::default()
    };
    let registry = new_registry(config).await;
    for (service, id) in [("a", "a1"), ("b", "b1"), ("c", "c1")] {
        registry.register(spec(service, id, 8080)).await.expect("registers");
    }
    let waiting = ["a", "b", "c"].into_iter().find(|s| registry.snapshot(s).is_some_and(|s| s.virtual_ip.is_none()));
    let waiting = waiting.expect("one service without an address");
    let mut h = harness_with(HashMap::new(), Some(registry.clone()), Credentials::default()).await;
    h.subscribe(&[waiting]).await;
    let push = h.push().await;
    assert_eq!(push.resources[0].virtual_ip, "", "none yet");
    h.ack(&push.nonce).await;

    let leaving = ["a", "b", "c"].into_iter().find(|s| *s != waiting).expect("another");
    registry.deregister(&format!("{leaving}1")).await.expect("deregisters");
    let given = h.push().await;
    let resources = &given.resources[0];
    assert!(resources.version > push.resources[0].version);
    assert!(["10.0.0.1", "10.0.0.2"].contains(&resources.virtual_ip.as_str()), "{resources:?}");
    let Some(Endpoints::Delta(delta)) = &resources.endpoints else { panic!("expected an empty delta: {resources:?}") };
    assert!(delta.upserted.is_empty() && delta.removed.is_empty(), "the instances did not change");
}
