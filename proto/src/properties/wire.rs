//! Property tests of the validation of what arrives over gRPC: protobuf bytes from a peer,
//! decoded by prost and then checked before anything uses them. Whatever the bytes, a decoded
//! message is accepted or refused with an error whose path walks the message's own fields
//! (`resources[0].snapshot.endpoints[1].port`), never a panic.

use proptest::prelude::*;
use prost::Message;
use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};
use serde_json::json;

use crate::{FILE_DESCRIPTOR_SET, json, v1, validate};

fn message(name: &str) -> MessageDescriptor {
    let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("the compiled descriptors decode");
    pool.get_message_by_name(name).expect("a ferry.v1 message")
}

/// Whether `path` (`a[0].b["key"].c`) names fields of `message`, one inside the other.
fn walks(message: &MessageDescriptor, path: &str) -> Result<(), String> {
    let mut current = Some(message.clone());
    let mut rest = path;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (name, mut after) = rest.split_at(end);
        // Skip the index or key of a list or map: `[3]` or `["a.b"]` (Debug-quoted).
        while let Some(inner) = after.strip_prefix('[') {
            let close = if let Some(quoted) = inner.strip_prefix('"') {
                let mut escaped = false;
                let end = quoted
                    .char_indices()
                    .find(|&(_, c)| {
                        let ends = c == '"' && !escaped;
                        escaped = c == '\\' && !escaped;
                        ends
                    })
                    .map(|(i, _)| i)
                    .ok_or_else(|| format!("an unterminated key in {path}"))?;
                1 + end + 1
            } else {
                inner.find(']').ok_or_else(|| format!("an unterminated index in {path}"))?
            };
            after = inner[close..].strip_prefix(']').ok_or_else(|| format!("no ] in {path}"))?;
        }
        let Some(at) = current.take() else { return Err(format!("{name} is inside a field that has none in {path}")) };
        if let Some(field) = at.get_field_by_name(name) {
            current = match field.kind() {
                Kind::Message(inner) if field.is_map() => match inner.map_entry_value_field().kind() {
                    Kind::Message(value) => Some(value),
                    _ => None,
                },
                Kind::Message(inner) => Some(inner),
                _ => None,
            };
        } else if !at.oneofs().any(|oneof| oneof.name() == name) {
            return Err(format!("{} has no field {name:?} ({path})", at.name()));
        }
        rest = after.strip_prefix('.').unwrap_or(after);
    }
    Ok(())
}

/// A push as a control plane sends one: a snapshot, a delta and an address table.
fn push() -> Vec<u8> {
    let push: v1::Push = json::decode(
        "ferry.v1.Push",
        json!({
            "nonce": "7",
            "resources": [
                {"service": "catalog", "version": 9, "exists": true, "virtual_ip": "240.240.0.1",
                 "snapshot": {"endpoints": [{"id": "catalog-1", "address": "10.0.0.1", "port": 8080, "health": "HEALTH_PASSING",
                                             "metadata": {"version": "v1"}, "weight": 100}]}},
                {"service": "inventory", "version": 4, "exists": true,
                 "delta": {"base_version": 3, "upserted": [{"id": "inv-2", "address": "db.internal", "port": 9090, "health": "HEALTH_WARNING"}],
                           "removed": ["inv-1"]}}
            ],
            "addresses": {"version": 5, "base_version": 4, "upserted": [{"service": "catalog", "virtual_ip": "240.240.0.1",
                                                                         "endpoints": ["10.0.0.1:8080"]}], "removed": ["old"]}
        }),
    )
    .expect("a valid push");
    assert_eq!(validate::push(&push), Ok(()));
    push.encode_to_vec()
}

/// A registration with two checks.
fn instance() -> Vec<u8> {
    let instance: v1::Instance = json::decode(
        "ferry.v1.Instance",
        json!({
            "service": "catalog", "id": "catalog-1", "address": "10.0.0.1", "port": 8080,
            "metadata": {"version": "v1"}, "region": "eu", "zone": "eu-1a", "weight": 100,
            "checks": [{"http": {"url": "/healthz", "expected_status": 204}, "interval": "5s", "timeout": "1s"},
                       {"ttl": {"ttl": "30s"}, "id": "catalog-1:ttl"}],
            "deregister_critical_after": "10m"
        }),
    )
    .expect("a valid instance");
    assert_eq!(validate::instance(&instance), Ok(()));
    instance.encode_to_vec()
}

/// A sidecar's traffic report.
fn traffic_report() -> Vec<u8> {
    let counts = vec![1u64; crate::traffic::LATENCY_COUNTS];
    let report: v1::TrafficReport = json::decode(
        "ferry.v1.TrafficReport",
        json!({
            "interval_ms": 5000,
            "outbound": [{"service": "inventory", "requests": 18, "failures": 2, "latency_counts": counts}],
            "inbound": {"service": "catalog", "requests": 18, "latency_counts": counts}
        }),
    )
    .expect("a valid report");
    assert_eq!(validate::traffic_report(&report), Ok(()));
    report.encode_to_vec()
}

/// `bytes` with a few of them replaced, some inserted, and maybe cut short.
fn damaged(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = bytes.len();
    (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..2),
        prop::option::of(0..=len),
    )
        .prop_map(move |(replaced, inserted, cut)| {
            let mut bytes = bytes.clone();
            for (at, byte) in replaced {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            for (at, byte) in inserted {
                let i = at.index(bytes.len() + 1);
                bytes.insert(i, byte);
            }
            bytes.truncate(cut.unwrap_or(bytes.len()));
            bytes
        })
}

/// Any bytes, or a valid message damaged: mostly a few bytes replaced, which keeps the
/// framing and so reaches validation with odd values, sometimes its framing broken too.
fn wire(valid: fn() -> Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let bytes = valid();
    // Mostly ASCII: prost refuses strings that are not UTF-8 before validation sees them.
    let byte = prop_oneof![1 => any::<u8>(), 4 => 0x20u8..0x7f, 1 => 0u8..0x20];
    let replaced = prop::collection::vec((any::<prop::sample::Index>(), byte), 1..3).prop_map(move |edits| {
        let mut bytes = bytes.clone();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        bytes
    });
    prop_oneof![1 => prop::collection::vec(any::<u8>(), 0..128), 4 => replaced, 1 => damaged(valid())]
}

proptest! {
    #[test]
    fn a_pushed_message_is_valid_or_names_a_field_of_it(bytes in wire(push)) {
        if let Ok(push) = v1::Push::decode(bytes.as_slice())
            && let Err(error) = validate::push(&push)
        {
            prop_assert!(!error.field.is_empty(), "{error}");
            prop_assert_eq!(walks(&message("ferry.v1.Push"), &error.field), Ok(()), "{}", error);
        }
    }

    #[test]
    fn a_registration_is_valid_or_names_a_field_of_it(bytes in wire(instance)) {
        if let Ok(instance) = v1::Instance::decode(bytes.as_slice())
            && let Err(error) = validate::instance(&instance)
        {
            prop_assert!(!error.field.is_empty(), "{error}");
            prop_assert_eq!(walks(&message("ferry.v1.Instance"), &error.field), Ok(()), "{}", error);
        }
    }

    #[test]
    fn a_traffic_report_is_valid_or_names_a_field_of_it(bytes in wire(traffic_report)) {
        if let Ok(report) = v1::TrafficReport::decode(bytes.as_slice())
            && let Err(error) = validate::traffic_report(&report)
        {
            prop_assert!(!error.field.is_empty(), "{error}");
            prop_assert_eq!(walks(&message("ferry.v1.TrafficReport"), &error.field), Ok(()), "{}", error);
        }
    }
}

#[test]
fn paths_walk_fields_and_nothing_else() {
    let push = message("ferry.v1.Push");
    assert_eq!(walks(&push, "resources[0].snapshot.endpoints[1].port"), Ok(()));
    assert_eq!(walks(&push, "resources[0].snapshot.endpoints[1].metadata[\"a.b[\\\"]\"]"), Ok(()));
    assert_eq!(walks(&push, "resources[0].endpoints"), Ok(()), "a oneof");
    assert!(walks(&push, "resources[0].snapshot.endpoint[1]").is_err());
    assert!(walks(&push, "nonce.length").is_err());
}
