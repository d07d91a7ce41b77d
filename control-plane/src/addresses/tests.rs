use std::{collections::BTreeMap, time::Duration};

use ferry_health::Health;

use super::*;
use crate::{
    metrics::Metrics,
    registry::{ChangeLog, Instance, InstanceSpec, Origin, RegistryConfig},
    store::MemoryStore,
    testing::{Replica, SharedMemory},
};

fn spec(service: &str, id: &str, address: &str, port: u16) -> InstanceSpec {
    InstanceSpec::try_from(v1::Instance {
        id: id.into(),
        service: service.into(),
        address: address.into(),
        port: u32::from(port),
        ..Default::default()
    })
    .expect("valid spec")
}

/// A snapshot of `service` at `index` with these (id, address, port) instances.
fn snapshot(service: &str, index: u64, vip: Option<&str>, instances: &[(&str, &str, u16)]) -> ServiceSnapshot {
    let instances: BTreeMap<String, Arc<Instance>> = instances
        .iter()
        .map(|(id, address, port)| {
            let instance = Instance::new(spec(service, id, address, *port), Origin::Api, Health::Passing);
            (id.to_string(), Arc::new(instance))
        })
        .collect();
    ServiceSnapshot {
        name: service.into(),
        index,
        instances: Arc::new(instances),
        log: Arc::new(ChangeLog::starting_at(index)),
        changed_at: tokio::time::Instant::now(),
        encoded_bytes: 0,
        virtual_ip: vip.map(|ip| ip.parse().expect("ip")),
        virtual_ip_version: index,
    }
}

fn services(update: &v1::AddressTable) -> Vec<(&str, &str, Vec<&str>)> {
    update
        .upserted
        .iter()
        .map(|s| (s.service.as_str(), s.virtual_ip.as_str(), s.endpoints.iter().map(String::as_str).collect()))
        .collect()
}

#[test]
fn a_sidecar_gets_the_whole_table_then_only_what_changed() {
    let table = AddressTable::new(Some(Arc::default()));
    let start = table.version();
    table.published(&snapshot("catalog", 10, Some("240.240.0.1"), &[("c1", "10.0.0.2", 8080), ("c2", "fd00::2", 8080)]), None);
    // Only IP addresses are in the table; an instance with a host name is reached by its name.
    table.published(&snapshot("db", 11, Some("240.240.0.2"), &[("d1", "db.internal", 5432)]), None);
    let whole = table.update_for(None).expect("everything");
    assert!(whole.full && whole.version > start);
    assert_eq!(
        services(&whole),
        [("catalog", "240.240.0.1", vec!["10.0.0.2:8080", "[fd00::2]:8080"]), ("db", "240.240.0.2", vec![])]
    );
    assert_eq!(table.update_for(Some(whole.version)), None, "held as it is");

    // Health and metadata are not in the table: an unchanged entry is no change.
    table.published(&snapshot("catalog", 12, Some("240.240.0.1"), &[("c1", "10.0.0.2", 8080), ("c2", "fd00::2", 8080)]), None);
    assert_eq!(table.version(), whole.version);

    table.published(&snapshot("catalog", 13, Some("240.240.0.1"), &[("c1", "10.0.0.2", 8080)]), None);
    let delta = table.update_for(Some(whole.version)).expect("a change");
    assert!(!delta.full);
    assert_eq!(delta.base_version, whole.version);
    assert_eq!(services(&delta), [("catalog", "240.240.0.1", vec!["10.0.0.2:8080"])], "db did not change");
    assert!(delta.removed.is_empty());
    ferry_proto::validate::address_table(&delta).expect("a sidecar accepts it");
}

#[test]
fn a_removed_service_leaves_a_tombstone_until_too_many_are_kept() {
    let table = AddressTable::new(Some(Arc::default()));
    for i in 0..3 {
        table.published(&snapshot(&format!("svc-{i}"), 1, Some("240.240.0.9"), &[("a", "10.0.0.1", 80)]), None);
    }
    let before = table.version();
    table.published(&snapshot("svc-1", 2, None, &[]), None);
    let delta = table.update_for(Some(before)).expect("a change");
    assert_eq!((delta.upserted.len(), delta.removed.as_slice()), (0, &["svc-1".to_owned()][..]));
    assert_eq!(table.len(), 2);

    let held = table.version();
    for i in 0..MAX_TOMBSTONES + 1 {
        let name = format!("gone-{i}");
        table.published(&snapshot(&name, 3, Some("240.240.0.10"), &[]), None);
        table.published(&snapshot(&name, 4, None, &[]), None);
    }
    let update = table.update_for(Some(held)).expect("a change");
    assert!(update.full, "the oldest tombstones are forgotten: a delta from {held} could miss a removal");
    assert_eq!(update.upserted.len(), 2);
    let recent = table.version();
    table.published(&snapshot("svc-0", 5, None, &[]), None);
    assert_eq!(table.update_for(Some(recent)).expect("a change").removed, ["svc-0"]);
}

#[test]
fn a_version_this_table_never_handed_out_gets_the_whole_table() {
    let before = AddressTable::new(Some(Arc::default()));
    before.published(&snapshot("catalog", 1, Some("240.240.0.1"), &[]), None);
    let held = before.version();
    // A restart: the new table's versions start from the clock, past any handed out before.
    std::thread::sleep(Duration::from_millis(2));
    let after = AddressTable::new(Some(Arc::default()));
    after.published(&snapshot("catalog", 1, Some("240.240.0.1"), &[]), None);
    after.published(&snapshot("db", 1, Some("240.240.0.2"), &[]), None);
    assert!(after.update_for(Some(held)).expect("needed").full);
    assert!(after.update_for(Some(after.version() + 5)).expect("needed").full, "a version from the future");
}

#[test]
fn a_replica_hands_out_a_revision_only_once_all_its_changes_are_applied() {
    let table = AddressTable::new(None);
    table.published(&snapshot("catalog", 7, Some("240.240.0.1"), &[]), None);
    table.seal(7);
    assert_eq!(table.version(), 7, "the store's revision");
    // Revision 9 changes two services; a session reading between them must not see version 9.
    table.published(&snapshot("catalog", 9, Some("240.240.0.1"), &[("c1", "10.0.0.2", 80)]), None);
    assert_eq!(table.version(), 7);
    assert_eq!(table.update_for(Some(7)), None, "nothing sealed to send");
    let early = table.update_for(None).expect("whole");
    assert_eq!(early.version, 7);
    table.published(&snapshot("db", 9, Some("240.240.0.2"), &[]), None);
    table.seal(9);
    let delta = table.update_for(Some(7)).expect("a change");
    assert_eq!((delta.base_version, delta.version), (7, 9));
    assert_eq!(delta.upserted.iter().map(|s| s.service.as_str()).collect::<Vec<_>>(), ["catalog", "db"]);
    // A sidecar that got the whole table early holds catalog already; the delta sends it again.
    assert_eq!(table.update_for(Some(early.version)).expect("a change").upserted.len(), 2);
    // A revision that changes nothing in the table hands out nothing new.
    table.seal(10);
    assert_eq!(table.version(), 9);
}

#[tokio::test]
async fn the_table_follows_the_registry() {
    let registry = crate::registry::Registry::open(
        Arc::new(MemoryStore::default()),
        RegistryConfig::default(),
        Metrics::unregistered().registry,
        Default::default(),
    )
    .await
    .expect("opens");
    registry.register(spec("catalog", "c1", "10.0.0.2", 8080)).await.expect("registers");
    let table = AddressTable::attach(&registry, Default::default());
    let whole = table.update_for(None).expect("what the registry held");
    let vip = registry.snapshot("catalog").and_then(|s| s.virtual_ip).expect("allocated").to_string();
    assert_eq!(services(&whole), [("catalog", vip.as_str(), vec!["10.0.0.2:8080"])]);
    let version = table.watch();
    registry.register(spec("catalog", "c2", "10.0.0.3", 8080)).await.expect("registers");
    assert!(version.has_changed().expect("open"), "the version watch fires");
    registry.deregister("c1").await.expect("deregisters");
    registry.deregister("c2").await.expect("deregisters");
    let delta = table.update_for(Some(whole.version)).expect("a change");
    assert_eq!(services(&delta), [("catalog", vip.as_str(), vec![])], "kept with its address while it has none");
}

#[tokio::test]
async fn replicas_agree_on_what_each_version_holds() {
    let store = Arc::new(SharedMemory::default());
    let a = Replica::join(&store, "a", RegistryConfig::default(), true).await;
    let b = Replica::join(&store, "b", RegistryConfig::default(), false).await;
    let both_at = |revision: u64| {
        let (a, b) = (a.addresses.clone(), b.addresses.clone());
        async move {
            for table in [a, b] {
                let mut watch = table.watch();
                tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|v| *v >= revision))
                    .await
                    .expect("in time")
                    .expect("open");
            }
        }
    };
    a.registry.register(spec("catalog", "c1", "10.0.0.2", 8080)).await.expect("registers");
    b.registry.register(spec("db", "d1", "10.0.0.9", 5432)).await.expect("registers");
    // Both services get their addresses from a, each in a revision of its own.
    for service in ["catalog", "db"] {
        let mut watch = b.registry.watch(service);
        watch.wait_for(|s| s.virtual_ip.is_some()).await.expect("allocated");
    }
    both_at(store.revision()).await;
    let held = a.addresses.update_for(None).expect("whole");
    assert_eq!(b.addresses.update_for(None), Some(held.clone()), "one version, one table");

    // The sidecar moves from a to b and is sent only what changed.
    a.registry.register(spec("catalog", "c2", "10.0.0.3", 8080)).await.expect("registers");
    both_at(store.revision()).await;
    let from_b = b.addresses.update_for(Some(held.version)).expect("a change");
    assert!(!from_b.full);
    assert_eq!(Some(from_b.clone()), a.addresses.update_for(Some(held.version)));
    assert_eq!(from_b.upserted.iter().map(|s| s.service.as_str()).collect::<Vec<_>>(), ["catalog"]);
}

/// `snapshot`'s next one, at `index`, with instance `id` set to (address, port, health) or
/// removed, as the registry makes it.
fn next(snapshot: &ServiceSnapshot, index: u64, id: &str, instance: Option<(&str, u16, Health)>) -> ServiceSnapshot {
    let mut instances = (*snapshot.instances).clone();
    match instance {
        Some((address, port, health)) => {
            let instance = Instance::new(spec(&snapshot.name, id, address, port), Origin::Api, health);
            instances.insert(id.to_owned(), Arc::new(instance));
        }
        None => {
            instances.remove(id);
        }
    }
    ServiceSnapshot { index, instances: Arc::new(instances), ..snapshot.clone() }
}

fn endpoints_of(table: &AddressTable, service: &str) -> Vec<String> {
    let whole = table.update_for(None).expect("the whole table");
    whole.upserted.into_iter().find(|s| s.service == service).map(|s| s.endpoints).unwrap_or_default()
}

#[test]
fn a_change_of_health_is_no_change_and_a_shared_endpoint_stays_while_an_instance_has_it() {
    let table = AddressTable::new(Some(Arc::default()));
    let first =
        snapshot("catalog", 1, Some("240.240.0.1"), &[("c1", "10.0.0.2", 80), ("c2", "10.0.0.2", 80), ("c3", "10.0.0.3", 80)]);
    table.published(&first, None);
    let held = table.version();
    assert_eq!(endpoints_of(&table, "catalog"), ["10.0.0.2:80", "10.0.0.3:80"]);

    let critical = next(&first, 2, "c1", Some(("10.0.0.2", 80, Health::Critical)));
    table.published(&critical, Some("c1"));
    assert_eq!(table.version(), held, "health is not in the table");
    let one_left = next(&critical, 3, "c1", None);
    table.published(&one_left, Some("c1"));
    assert_eq!(table.version(), held, "c2 still has 10.0.0.2:80");

    let moved = next(&one_left, 4, "c2", Some(("10.0.0.4", 80, Health::Passing)));
    table.published(&moved, Some("c2"));
    assert!(table.version() > held);
    assert_eq!(endpoints_of(&table, "catalog"), ["10.0.0.3:80", "10.0.0.4:80"]);

    // A snapshot that changed more than the instance named is compared whole.
    let two_more =
        next(&next(&moved, 5, "c5", Some(("10.0.0.5", 80, Health::Passing))), 5, "c6", Some(("10.0.0.6", 80, Health::Passing)));
    table.published(&two_more, Some("c5"));
    assert_eq!(endpoints_of(&table, "catalog"), ["10.0.0.3:80", "10.0.0.4:80", "10.0.0.5:80", "10.0.0.6:80"]);

    // The virtual IP alone, the instances shared with the snapshot before.
    let unaddressed = ServiceSnapshot { virtual_ip: None, virtual_ip_version: 6, ..two_more.clone() };
    let before = table.version();
    table.published(&unaddressed, None);
    assert!(table.version() > before);
    assert_eq!(services(&table.update_for(None).expect("whole"))[0].1, "");
}

#[tokio::test]
async fn the_table_holds_what_the_registry_does_after_any_run_of_changes() {
    let registry = crate::registry::Registry::open(
        Arc::new(MemoryStore::default()),
        RegistryConfig::default(),
        Metrics::unregistered().registry,
        Default::default(),
    )
    .await
    .expect("opens");
    let table = AddressTable::attach(&registry, Default::default());
    // A fixed pseudo-random run (an LCG) over few addresses, so instances share them often.
    let mut seed: u64 = 0x5eed;
    let mut roll = |n: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let addresses = ["10.0.0.1", "10.0.0.2", "fd00::1", "db.internal"];
    for step in 0..600 {
        let service = ["catalog", "db", "web"][roll(3) as usize];
        let id = format!("{service}-{}", roll(4));
        match roll(4) {
            0 => {
                let _ = registry.deregister(&id).await;
            }
            1 => {
                let health = if roll(2) == 0 { Health::Passing } else { Health::Critical };
                let _ = registry.set_health(&id, health);
            }
            _ => {
                let address = addresses[roll(addresses.len() as u64) as usize];
                registry.register(spec(service, &id, address, 80 + roll(2) as u16)).await.expect("registers");
            }
        }
        for service in ["catalog", "db", "web"] {
            let mut expected: Vec<String> = registry
                .snapshot(service)
                .map(|s| {
                    s.instances
                        .values()
                        .filter_map(|i| i.address.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, i.port)))
                        .collect::<BTreeSet<_>>()
                })
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect();
            expected.dedup();
            assert_eq!(endpoints_of(&table, service), expected, "{service} after step {step}");
        }
    }
}

#[test]
fn an_oversized_whole_table_is_said_once_per_version() {
    let table = AddressTable::new(Some(Arc::default()));
    table.published(&snapshot("catalog", 1, Some("240.240.0.1"), &[("c1", "10.0.0.2", 8080)]), None);
    let mut state = table.lock();
    let sealed = state.sealed;
    let whole = state.full(sealed);
    assert_eq!(state.measured, whole.version, "measured as it was built");
    assert_eq!(state.oversized(&whole), None, "and not again");
    state.warn_bytes = 10;
    let next = v1::AddressTable { version: whole.version + 1, ..whole.clone() };
    assert_eq!(state.oversized(&next), Some(next.encoded_len()));
    assert_eq!(state.oversized(&next), None, "said once per version, not per push");
}
