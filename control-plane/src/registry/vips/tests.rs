use std::collections::HashSet;

use ferry_health::Health;
use ferry_proto::v1;

use super::*;
use crate::{
    metrics::Metrics,
    registry::{InstanceSpec, RegistryConfig},
    store::{MemoryStore, RedbStore, Store},
    testing::{Replica, SharedMemory},
};

fn spec(service: &str, id: &str) -> InstanceSpec {
    InstanceSpec::try_from(v1::Instance {
        id: id.into(),
        service: service.into(),
        address: "10.1.0.7".into(),
        port: 8080,
        ..Default::default()
    })
    .expect("valid spec")
}

fn config(range: &str, release_after: Duration) -> RegistryConfig {
    RegistryConfig { virtual_ips: range.parse().expect("a valid range"), vip_release_after: release_after, ..Default::default() }
}

async fn registry_on(store: Arc<dyn Store>, config: RegistryConfig) -> Arc<Registry> {
    Registry::open(store, config, Metrics::unregistered().registry, Default::default()).await.expect("opens")
}

async fn registry(config: RegistryConfig) -> Arc<Registry> {
    registry_on(Arc::new(MemoryStore::default()), config).await
}

fn vip(registry: &Registry, service: &str) -> Option<IpAddr> {
    registry.snapshot(service).and_then(|s| s.virtual_ip)
}

/// Waits (up to a minute of the test's time) until `service` shows an address that `wanted`
/// accepts.
async fn vip_where(registry: &Registry, service: &str, wanted: impl Fn(Option<IpAddr>) -> bool) -> Arc<ServiceSnapshot> {
    let mut watch = registry.watch(service);
    let found = tokio::time::timeout(Duration::from_secs(60), watch.wait_for(|s| wanted(s.virtual_ip))).await;
    found.expect("in time").expect("the registry lives").clone()
}

#[test]
fn a_range_never_hands_out_its_network_or_broadcast_address() {
    let range: VipRange = "10.0.0.0/30".parse().expect("valid");
    assert_eq!(range.capacity(), 2);
    let picked: HashSet<IpAddr> = (0..50).filter_map(|i| range.pick(&format!("svc-{i}"), |_| false, 0)).collect();
    let expected: HashSet<IpAddr> = ["10.0.0.1", "10.0.0.2"].iter().map(|ip| ip.parse().expect("ip")).collect();
    assert_eq!(picked, expected);
    for outside in ["10.0.0.0", "10.0.0.3", "10.0.0.4", "fd00::1"] {
        assert!(!range.contains(outside.parse().expect("ip")), "{outside}");
    }
    let v6: VipRange = "fd00:f0::/127".parse().expect("valid");
    assert_eq!(v6.pick("catalog", |_| false, 0), Some("fd00:f0::1".parse().expect("ip")), "all but the network address");
    let full = range.pick("catalog", |_| true, 2);
    assert_eq!(full, None, "every address taken");
}

#[test]
fn bad_ranges_are_refused_saying_why() {
    let refused = |s: &str| s.parse::<VipRange>().expect_err(s).to_string();
    assert!(refused("240.240.1.0/16").contains("did you mean 240.240.0.0/16"), "{}", refused("240.240.1.0/16"));
    assert!(refused("10.0.0.0/31").contains("no address to hand out"));
    assert!(refused("10.0.0.1/32").contains("no address to hand out"));
    assert!(refused("fd00::/128").contains("no address to hand out"));
    assert!(refused("240.240.0.0").contains("not a CIDR"));
    assert_eq!(VipRange::default().to_string(), "240.240.0.0/16");
    assert_eq!("fd00:f0::/108".parse::<VipRange>().expect("IPv6").capacity(), (1 << 20) - 1);
}

#[test]
fn a_name_hashes_to_the_same_address_in_every_build() {
    let range = VipRange::default();
    // FNV-1a of the name, into the range: pinned, so that no build moves a service's address.
    assert_eq!(range.pick("catalog", |_| false, 0), Some("240.240.149.217".parse().expect("ip")));
    let after = range.pick("catalog", |ip| ip == "240.240.149.217".parse::<IpAddr>().expect("ip"), 1);
    assert_eq!(after, Some("240.240.149.218".parse().expect("ip")), "taken: the next one");
}

#[tokio::test]
async fn the_first_instance_of_a_service_brings_its_address_in_the_same_snapshot() {
    let registry = registry(RegistryConfig::default()).await;
    let mut watch = registry.watch("catalog");
    registry.register(spec("catalog", "c1")).await.expect("registers");
    let first = watch.borrow_and_update().clone();
    let ip = first.virtual_ip.expect("an address with the first instance");
    assert!(VipRange::default().contains(ip));
    assert_eq!(first.virtual_ip_version, first.index, "allocated by the same change");
    registry.register(spec("catalog", "c2")).await.expect("registers");
    let second = watch.borrow_and_update().clone();
    assert_eq!((second.virtual_ip, second.virtual_ip_version), (Some(ip), first.virtual_ip_version), "kept, unchanged");
    assert_eq!(registry.services()[0].virtual_ip, Some(ip));
}

#[tokio::test]
async fn many_services_get_distinct_addresses_in_the_range() {
    let range = "10.96.0.0/20";
    let registry = registry(config(range, Duration::from_secs(3600))).await;
    let session = registry.new_session();
    for i in 0..3000 {
        let service = format!("svc-{i}");
        registry.attach(session, &format!("node-{i}"), spec(&service, &service), Health::Passing).expect("attaches");
    }
    let range: VipRange = range.parse().expect("valid");
    let addresses: Vec<IpAddr> = registry.services().iter().map(|s| s.virtual_ip.expect("every service has one")).collect();
    assert_eq!(addresses.len(), 3000);
    assert!(addresses.iter().all(|ip| range.contains(*ip)));
    assert_eq!(addresses.iter().collect::<HashSet<_>>().len(), 3000, "no address handed out twice");
    // Deterministic: another registry gives the same names the same addresses.
    let again = self::registry(config("10.96.0.0/20", Duration::from_secs(3600))).await;
    for i in 0..3000 {
        let service = format!("svc-{i}");
        again.attach(session, &format!("node-{i}"), spec(&service, &service), Health::Passing).expect("attaches");
    }
    let same: Vec<IpAddr> = again.services().iter().filter_map(|s| s.virtual_ip).collect();
    assert_eq!(same, addresses);
}

#[tokio::test(start_paused = true)]
async fn an_address_is_released_once_its_service_has_had_no_instance_for_the_age() {
    let registry = registry(config("10.96.0.0/24", Duration::from_secs(10))).await;
    registry.register(spec("catalog", "c1")).await.expect("registers");
    let ip = vip(&registry, "catalog").expect("allocated");
    registry.deregister("c1").await.expect("deregisters");
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(vip(&registry, "catalog"), Some(ip), "kept while the service may come back");
    // An instance in time keeps it, and the clock starts again when the service empties again.
    registry.register(spec("catalog", "c2")).await.expect("registers");
    assert_eq!(vip(&registry, "catalog"), Some(ip));
    registry.deregister("c2").await.expect("deregisters");
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(vip(&registry, "catalog"), Some(ip));
    let held = registry.snapshot("catalog").expect("known").version();
    let released = vip_where(&registry, "catalog", |ip| ip.is_none()).await;
    assert!(released.version() > held, "a release is a change sidecars are sent");
}

#[tokio::test(start_paused = true)]
async fn a_full_range_leaves_a_service_without_an_address_until_one_is_released() {
    // Six addresses: 10.0.0.1 to 10.0.0.6.
    let registry = registry(config("10.0.0.0/29", Duration::from_secs(10))).await;
    for i in 0..6 {
        registry.register(spec(&format!("svc-{i}"), &format!("i-{i}"))).await.expect("registers");
    }
    registry.register(spec("late", "late-1")).await.expect("registers all the same");
    assert_eq!(vip(&registry, "late"), None, "no address left");
    assert!(registry.snapshot("late").expect("known").exists());
    let freed = vip(&registry, "svc-3").expect("allocated");
    registry.deregister("i-3").await.expect("deregisters");
    let late = vip_where(&registry, "late", |ip| ip.is_some()).await;
    assert_eq!(late.virtual_ip, Some(freed), "the address released goes to the service waiting");
    assert_eq!(vip(&registry, "svc-3"), None);
}

#[test]
fn addresses_and_emptiness_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.redb");
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let day = Duration::from_secs(24 * 3600);
    let (catalog, db) = runtime().block_on(async {
        let registry = registry_on(Arc::new(RedbStore::open(&path).expect("opens")), config("10.96.0.0/16", day)).await;
        registry.register(spec("catalog", "c1")).await.expect("registers");
        registry.register(spec("db", "d1")).await.expect("registers");
        registry.deregister("d1").await.expect("deregisters");
        registry.flush().await.expect("flushed");
        (vip(&registry, "catalog").expect("allocated"), vip(&registry, "db").expect("kept"))
    });
    // Dropping the runtime dropped every task holding the database.
    runtime().block_on(async {
        let store = Arc::new(RedbStore::open(&path).expect("reopens"));
        let registry = registry_on(store.clone(), config("10.96.0.0/16", day)).await;
        assert_eq!(vip(&registry, "catalog"), Some(catalog));
        assert_eq!(vip(&registry, "db"), Some(db), "kept: emptied a moment ago");
        assert!(!registry.snapshot("db").expect("known").exists());
        assert_eq!(registry.services().len(), 1, "a service without instances is not listed");
        // The restart did not reset the time db has been empty: say it emptied two days ago.
        let two_days_ago = millis(SystemTime::now() - 2 * day);
        let stored = StoredVip { ip: db, empty_since_ms: Some(two_days_ago) };
        let write = Write { table: Table::VirtualIps, key: "db".into(), value: Some(stored.encode()) };
        store.apply(vec![write]).await.expect("written");
    });
    runtime().block_on(async {
        let registry = registry_on(Arc::new(RedbStore::open(&path).expect("reopens")), config("10.96.0.0/16", day)).await;
        assert_eq!(vip(&registry, "catalog"), Some(catalog));
        vip_where(&registry, "db", |ip| ip.is_none()).await;
        registry.flush().await.expect("flushed");
    });
    runtime().block_on(async {
        let store = RedbStore::open(&path).expect("reopens");
        assert!(store.load(Table::VirtualIps).await.expect("loads").iter().all(|(service, _)| service == "catalog"));
        let owners = store.load(Table::VirtualIpOwners).await.expect("loads");
        assert_eq!(owners, vec![(catalog.to_string(), b"catalog".to_vec())]);
    });
}

#[tokio::test]
async fn a_changed_range_moves_the_addresses_outside_it() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let before = registry_on(store.clone(), config("10.96.0.0/16", Duration::from_secs(60))).await;
    before.register(spec("catalog", "c1")).await.expect("registers");
    before.flush().await.expect("flushed");
    let after = registry_on(store, config("fd00:f0::/108", Duration::from_secs(60))).await;
    let ip = vip(&after, "catalog").expect("a new address");
    assert!(ip.is_ipv6(), "{ip}");
}

#[tokio::test]
async fn only_the_replica_on_duty_allocates_and_every_replica_applies_it() {
    let store = Arc::new(SharedMemory::default());
    let config = config("10.96.0.0/16", Duration::from_secs(60));
    let a = Replica::join(&store, "a", config.clone(), true).await;
    let b = Replica::join(&store, "b", config, false).await;
    b.registry.register(spec("catalog", "c1")).await.expect("registers through b");
    let on_b = vip_where(&b.registry, "catalog", |ip| ip.is_some()).await;
    let on_a = vip_where(&a.registry, "catalog", |ip| ip.is_some()).await;
    assert_eq!((on_a.virtual_ip, on_a.virtual_ip_version), (on_b.virtual_ip, on_b.virtual_ip_version));
    assert!(on_a.virtual_ip_version > on_a.index, "the allocation's own revision");
    let stored = store.get(Table::VirtualIpOwners, &on_a.virtual_ip.expect("set").to_string());
    assert_eq!(stored.as_deref(), Some(&b"catalog"[..]));
}

#[tokio::test]
async fn two_replicas_on_duty_at_once_never_hand_out_one_address_twice() {
    let store = Arc::new(SharedMemory::default());
    // Fourteen addresses for twelve services: names collide on addresses often.
    let config = config("10.0.0.0/28", Duration::from_secs(60));
    let a = Replica::join(&store, "a", config.clone(), true).await;
    let b = Replica::join(&store, "b", config, true).await;
    for i in 0..12 {
        let on = if i % 2 == 0 { &a } else { &b };
        on.registry.register(spec(&format!("svc-{i}"), &format!("i-{i}"))).await.expect("registers");
    }
    let mut seen = HashSet::new();
    for i in 0..12 {
        let service = format!("svc-{i}");
        let on_a = vip_where(&a.registry, &service, |ip| ip.is_some()).await.virtual_ip;
        let on_b = vip_where(&b.registry, &service, |ip| ip.is_some()).await.virtual_ip;
        assert_eq!(on_a, on_b, "{service}");
        assert!(seen.insert(on_a), "{service} got an address another holds: {on_a:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_replica_on_duty_records_emptiness_and_releases_after_the_age() {
    let store = Arc::new(SharedMemory::default());
    let config = config("10.96.0.0/16", Duration::from_secs(10));
    let a = Replica::join(&store, "a", config.clone(), true).await;
    let b = Replica::join(&store, "b", config, false).await;
    b.registry.register(spec("catalog", "c1")).await.expect("registers");
    let ip = vip_where(&b.registry, "catalog", |ip| ip.is_some()).await.virtual_ip;
    b.registry.deregister("c1").await.expect("deregisters");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored: StoredVip = serde_json::from_slice(&store.get(Table::VirtualIps, "catalog").expect("kept")).expect("decodes");
    assert_eq!(Some(stored.ip), ip);
    assert!(stored.empty_since_ms.is_some(), "the emptiness is stored, so a new elected replica counts from it");
    assert_eq!(vip(&b.registry, "catalog"), ip, "kept within the age");
    vip_where(&b.registry, "catalog", |ip| ip.is_none()).await;
    vip_where(&a.registry, "catalog", |ip| ip.is_none()).await;
    assert_eq!(store.get(Table::VirtualIps, "catalog"), None);
}

fn stored_event(service: &str, ip: &str, revision: u64) -> Event {
    let stored = StoredVip { ip: ip.parse().expect("ip"), empty_since_ms: None };
    Event { table: Table::VirtualIps, key: service.into(), value: Some(stored.encode()), version: revision, revision }
}

#[tokio::test]
async fn a_reload_in_key_order_takes_an_address_from_the_service_this_replica_still_gave_it() {
    let store = Arc::new(SharedMemory::default());
    let b = Replica::join(&store, "b", config("10.96.0.0/16", Duration::from_secs(60)), false).await;
    b.registry.register(spec("beta", "b1")).await.expect("registers");
    b.registry.register(spec("zeta", "z1")).await.expect("registers");
    // Before a compaction, b last saw zeta at .7; since then zeta moved to .8 and beta got .7.
    b.registry.apply_virtual_ip_event(&stored_event("zeta", "10.96.0.7", 100));
    // The reload applies the store's rows in key order: beta first.
    b.registry.apply_virtual_ip_event(&stored_event("beta", "10.96.0.7", 200));
    assert_eq!(vip(&b.registry, "beta"), Some("10.96.0.7".parse().expect("ip")), "the store is authoritative");
    assert_eq!(vip(&b.registry, "zeta"), None, "its address is beta's now");
    b.registry.apply_virtual_ip_event(&stored_event("zeta", "10.96.0.8", 200));
    assert_eq!(vip(&b.registry, "zeta"), Some("10.96.0.8".parse().expect("ip")));
    {
        let state = b.registry.lock();
        assert!(state.vips.wanted.is_empty() && state.vips.stale.is_empty(), "nothing left for the elected replica");
        let owner = |ip: &str| state.vips.owners.get(&ip.parse::<IpAddr>().expect("ip")).map(|s| s.to_string());
        assert_eq!((owner("10.96.0.7").as_deref(), owner("10.96.0.8").as_deref()), (Some("beta"), Some("zeta")));
    }
    b.registry.set_virtual_ip_duty(true);
    assert_eq!(b.registry.next_wake(), None, "elected, it has no write to retry");
}

#[tokio::test(start_paused = true)]
async fn on_a_full_range_the_replica_on_duty_waits_for_a_release_not_for_a_timer() {
    let store = Arc::new(SharedMemory::default());
    // Six addresses: 10.0.0.1 to 10.0.0.6.
    let config = config("10.0.0.0/29", Duration::from_secs(10));
    let a = Replica::join(&store, "a", config.clone(), true).await;
    let b = Replica::join(&store, "b", config, false).await;
    for i in 0..6 {
        b.registry.register(spec(&format!("svc-{i}"), &format!("i-{i}"))).await.expect("registers");
        vip_where(&a.registry, &format!("svc-{i}"), |ip| ip.is_some()).await;
    }
    b.registry.register(spec("late", "late-1")).await.expect("registers all the same");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(vip(&a.registry, "late"), None, "no address left");
    assert!(a.registry.lock().vips.full, "the range is known full: not scanned again");
    assert_eq!(a.registry.next_wake(), None, "no timer while only a release can help");

    b.registry.deregister("i-3").await.expect("deregisters");
    vip_where(&a.registry, "svc-3", |ip| ip.is_none()).await;
    let released_at = Instant::now();
    let late = vip_where(&b.registry, "late", |ip| ip.is_some()).await;
    assert!(released_at.elapsed() < Duration::from_millis(100), "the release woke it: {:?}", released_at.elapsed());
    assert!(late.virtual_ip.is_some_and(|ip| VipRange::new("10.0.0.0/29".parse().expect("net")).expect("range").contains(ip)));
}
