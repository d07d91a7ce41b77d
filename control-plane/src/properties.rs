//! Property tests of the rows the control plane reads back from its store: an instance row
//! (`ferry.v1.Instance`, protobuf) decoded and restored as the registry does when it opens and
//! when a shared store reports a change. A store is written by this program, but it is also a
//! file on disk or a key in etcd that an operator or another version may have touched.

use std::time::Duration;

use ferry_health::{CheckSpec, Health};
use ferry_proto::{types, v1};
use proptest::prelude::*;
use prost::Message;

use crate::registry::{Instance, InstanceSpec, Origin};

/// Decodes and restores a stored row, as `Registry::open_with` and `Registry::apply_event` do.
fn restore(bytes: &[u8]) -> Result<Instance, String> {
    let stored = v1::Instance::decode(bytes).map_err(|e| e.to_string())?;
    Instance::from_stored(stored).map_err(|e| e.to_string())
}

/// The fields of `ferry.v1.Instance`, which a restore error names.
const INSTANCE_FIELDS: [&str; 13] = [
    "id",
    "service",
    "address",
    "port",
    "metadata",
    "region",
    "zone",
    "weight",
    "health",
    "origin",
    "checks",
    "deregister_critical_after",
    "identity",
];

fn health() -> impl Strategy<Value = Health> {
    prop::sample::select(vec![Health::Passing, Health::Warning, Health::Critical])
}

/// An instance as the registry holds one.
fn instance() -> impl Strategy<Value = Instance> {
    let check = prop_oneof![
        Just("tcp"),
        Just("http:/healthz,interval=2s"),
        Just("ttl:30s"),
        Just("grpc:inventory,timeout=1s"),
        Just("script:/bin/check --fast"),
    ];
    (
        "[a-z][a-z0-9]{0,10}",
        prop_oneof!["[a-z]{1,10}(\\.[a-z]{1,6})?", any::<[u8; 4]>().prop_map(|ip| std::net::Ipv4Addr::from(ip).to_string())],
        1u16..,
        prop::collection::btree_map("[a-z]{1,8}", "[a-z0-9.]{0,8}", 0..3),
        prop::collection::vec(check, 0..3),
        prop::option::of(1u64..86_400),
        health(),
        prop::option::of("[a-z0-9-]{1,12}"),
        any::<u64>(),
        0u64..4_000_000_000_000,
    )
        .prop_map(|(service, address, port, metadata, checks, after, health, node, index, registered_ms)| {
            let proto = v1::Instance {
                service,
                address,
                port: u32::from(port),
                metadata: metadata.into_iter().collect(),
                checks: checks
                    .iter()
                    .map(|text| CheckSpec::parse(text, Duration::from_secs(10)).expect("valid checks").to_proto())
                    .collect(),
                deregister_critical_after: after.map(|secs| types::Duration { seconds: secs as i64, nanos: 0 }),
                ..Default::default()
            };
            let spec = InstanceSpec::try_from(proto).expect("a valid registration");
            let origin = node.map_or(Origin::Api, |node_id| Origin::Sidecar { node_id });
            let mut instance = Instance::new(spec, origin, health);
            instance.index = index;
            instance.registered_at = std::time::UNIX_EPOCH + Duration::from_millis(registered_ms);
            instance
        })
}

/// One field of a stored instance set to a value it may not hold.
#[derive(Debug, Clone)]
enum Damage {
    Service(String),
    Address(String),
    Id(String),
    Port(u32),
    Weight(u32),
    Health(i32),
    Origin(i32),
    Metadata(String, String),
    DeregisterCriticalAfter(i64, i32),
    Check { seconds: i64, nanos: i32, threshold: u32 },
    RegisteredAt(i64, i32),
}

impl Damage {
    /// The field of `ferry.v1.Instance` it damages.
    fn field(&self) -> &'static str {
        match self {
            Self::Service(_) => "service",
            Self::Address(_) => "address",
            Self::Id(_) => "id",
            Self::Port(_) => "port",
            Self::Weight(_) => "weight",
            Self::Health(_) => "health",
            Self::Origin(_) => "origin",
            Self::Metadata(..) => "metadata",
            Self::DeregisterCriticalAfter(..) => "deregister_critical_after",
            Self::Check { .. } => "checks",
            Self::RegisteredAt(..) => "registered_at",
        }
    }

    fn apply(self, instance: &mut v1::Instance) {
        match self {
            Self::Service(s) => instance.service = s,
            Self::Address(s) => instance.address = s,
            Self::Id(s) => instance.id = s,
            Self::Port(n) => instance.port = n,
            Self::Weight(n) => instance.weight = n,
            Self::Health(n) => instance.health = n,
            Self::Origin(n) => instance.origin = n,
            Self::Metadata(key, value) => {
                instance.metadata.insert(key, value);
            }
            Self::DeregisterCriticalAfter(seconds, nanos) => {
                instance.deregister_critical_after = Some(types::Duration { seconds, nanos })
            }
            Self::Check { seconds, nanos, threshold } => instance.checks.push(v1::Check {
                probe: Some(v1::check::Probe::Tcp(v1::TcpProbe::default())),
                interval: Some(types::Duration { seconds, nanos }),
                failure_threshold: threshold,
                ..Default::default()
            }),
            Self::RegisteredAt(seconds, nanos) => instance.registered_at = Some(types::Timestamp { seconds, nanos }),
        }
    }
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        ".{0,80}".prop_map(Damage::Service),
        ".{0,40}".prop_map(Damage::Address),
        ".{0,140}".prop_map(Damage::Id),
        any::<u32>().prop_map(Damage::Port),
        any::<u32>().prop_map(Damage::Weight),
        any::<i32>().prop_map(Damage::Health),
        any::<i32>().prop_map(Damage::Origin),
        (".{0,70}", ".{0,70}").prop_map(|(key, value)| Damage::Metadata(key, value)),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Damage::DeregisterCriticalAfter(seconds, nanos)),
        (any::<i64>(), any::<i32>(), any::<u32>()).prop_map(|(seconds, nanos, threshold)| Damage::Check {
            seconds,
            nanos,
            threshold
        }),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| Damage::RegisteredAt(seconds, nanos)),
    ]
}

proptest! {
    #[test]
    fn any_bytes_are_restored_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(instance) = restore(&bytes) {
            // Whatever was restored is stored and restored again unchanged.
            prop_assert_eq!(restore(&instance.to_proto().encode_to_vec()), Ok(instance));
        }
    }

    #[test]
    fn instances_round_trip_through_their_rows(instance in instance()) {
        prop_assert_eq!(restore(&instance.to_proto().encode_to_vec()), Ok(instance));
    }

    #[test]
    fn a_damaged_row_is_restored_or_refused(
        instance in instance(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = instance.to_proto().encode_to_vec();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let _ = restore(&bytes);
        bytes.truncate(cut.index(bytes.len() + 1));
        let _ = restore(&bytes);
    }

    #[test]
    fn a_bad_field_in_a_row_is_named(instance in instance(), damage in damage()) {
        let mut stored = instance.to_proto();
        let field = damage.field();
        damage.apply(&mut stored);
        let bytes = stored.encode_to_vec();
        match Instance::from_stored(v1::Instance::decode(bytes.as_slice()).expect("encoded just now")) {
            Ok(restored) => prop_assert_eq!(restore(&restored.to_proto().encode_to_vec()), Ok(restored)),
            Err(error) => {
                let top = error.field.split(['.', '[']).next().unwrap_or_default();
                prop_assert!(INSTANCE_FIELDS.contains(&top), "{field} changed, but the error names {error}");
                prop_assert!(top == field || field == "registered_at", "{field} changed, but the error names {error}");
            }
        }
    }
}
