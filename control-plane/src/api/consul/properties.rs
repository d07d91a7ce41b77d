//! Property tests of what a Consul client sends: durations in Go's form (`wait=30s`, a check's
//! `Interval`, `DeregisterCriticalServiceAfter`), blocking query parameters, registration
//! bodies, and `filter` expressions.

use std::{collections::BTreeMap, time::Duration};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::{
    ConsulError,
    blocking::{Blocking, MAX_WAIT, parse_duration},
    filter::{Filter, Subject},
    register,
};
use crate::registry::InstanceSpec;

/// The longest duration Go's `time.Duration` holds.
const MAX_GO_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

/// A registration as the agent endpoint reads it: folded, read, validated; its error as the
/// client sees it.
fn register(body: Value) -> Result<InstanceSpec, String> {
    let body = register::fold_keys(body);
    let instance = register::instance(&body).map_err(|e| ConsulError::field(e).text)?;
    InstanceSpec::try_from(instance).map_err(|e| ConsulError::field(e).text)
}

fn go_duration_text() -> impl Strategy<Value = String> {
    let unit = prop_oneof![Just("ns"), Just("us"), Just("µs"), Just("ms"), Just("s"), Just("m"), Just("h"), Just("d"), Just("")];
    let part = ("[0-9]{0,22}", prop::option::of("[0-9]{0,14}"), unit).prop_map(|(whole, fraction, unit)| match fraction {
        Some(fraction) => format!("{whole}.{fraction}{unit}"),
        None => format!("{whole}{unit}"),
    });
    prop_oneof![prop::collection::vec(part, 1..4).prop_map(|parts| parts.concat()), ".{0,24}", "[0-9.a-zµ ]{0,24}"]
}

/// A valid registration, and the places in it a mutation may hit: a JSON pointer and the
/// Consul field names an error about it may start with.
fn registration() -> (Value, Vec<(&'static str, &'static [&'static str])>) {
    let body = json!({
        "ID": "web-1",
        "Name": "web",
        "Address": "10.0.0.1",
        "Port": 8080,
        "Tags": ["primary", "version=v2"],
        "Meta": {"team": "shop"},
        "Weights": {"Passing": 3, "Warning": 1},
        "Locality": {"Region": "eu", "Zone": "eu-1a"},
        "Check": {"HTTP": "http://10.0.0.1:8080/health", "Interval": "10s", "Timeout": "1s"},
        "Checks": [{"TTL": "30s", "DeregisterCriticalServiceAfter": "90m", "FailuresBeforeCritical": 3}]
    });
    let places: Vec<(&'static str, &'static [&'static str])> = vec![
        ("/ID", &["ID"]),
        ("/Name", &["Name", "ID"]),
        ("/Address", &["Address", "ID"]),
        ("/Port", &["Port", "ID"]),
        ("/Tags", &["Tags", "Meta"]),
        ("/Tags/0", &["Tags", "Meta"]),
        ("/Meta", &["Meta"]),
        ("/Meta/team", &["Meta"]),
        ("/Weights/Passing", &["Weights.Passing"]),
        ("/Locality", &["Locality"]),
        ("/Locality/Zone", &["Locality.Zone"]),
        ("/Check", &["Check", "DeregisterCriticalServiceAfter"]),
        ("/Check/HTTP", &["Check.HTTP", "Check: "]),
        ("/Check/Interval", &["Check.Interval"]),
        ("/Check/Timeout", &["Check.Timeout"]),
        ("/Checks", &["Checks"]),
        ("/Checks/0/TTL", &["Checks[0].TTL", "Checks[0]: "]),
        (
            "/Checks/0/DeregisterCriticalServiceAfter",
            &["Checks[0].DeregisterCriticalServiceAfter", "DeregisterCriticalServiceAfter"],
        ),
        ("/Checks/0/FailuresBeforeCritical", &["Checks[0].FailuresBeforeCritical"]),
    ];
    (body, places)
}

fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        go_duration_text().prop_map(Value::String),
        (1usize..400).prop_map(|n| Value::String("a".repeat(n))),
        Just(json!([])),
        Just(json!(["x", 1])),
        Just(json!({"x": 1})),
    ]
}

proptest! {
    #[test]
    fn go_durations_are_read_exactly_or_refused_naming_the_text(text in go_duration_text()) {
        match parse_duration(&text) {
            Ok(duration) => prop_assert!(duration <= MAX_GO_DURATION, "{text}: {duration:?}"),
            Err(why) => prop_assert!(why.starts_with(&format!("{:?}", text.trim())), "{why}"),
        }
    }

    #[test]
    fn go_durations_round_trip(nanos in 0..=i64::MAX as u64) {
        let duration = Duration::from_nanos(nanos);
        let (h, m) = (duration.as_secs() / 3600, duration.as_secs() % 3600 / 60);
        let s = duration.as_secs() % 60;
        for text in [
            format!("{nanos}ns"),
            format!("{}.{:09}s", duration.as_secs(), duration.subsec_nanos()),
            format!("{h}h{m}m{s}s{}ns", duration.subsec_nanos()),
        ] {
            prop_assert_eq!(parse_duration(&text), Ok(duration), "{}", text);
        }
    }

    #[test]
    fn a_wait_is_capped_and_an_index_is_a_number(key in prop_oneof![Just("wait"), Just("index")], value in go_duration_text()) {
        let mut blocking = Blocking::default();
        match blocking.take(key, &value) {
            Ok(taken) => {
                prop_assert!(taken);
                prop_assert!(!blocking.wait.is_zero() && blocking.wait <= MAX_WAIT);
            }
            Err(error) => prop_assert!(error.text.starts_with(&format!("{key}: ")), "{}", error.text),
        }
    }

    #[test]
    fn a_mutated_registration_is_taken_or_refused_naming_the_field(
        place in any::<prop::sample::Index>(),
        replacement in any_json(),
    ) {
        let (mut body, places) = registration();
        let (pointer, names) = places[place.index(places.len())];
        *body.pointer_mut(pointer).expect("every place is in the body") = replacement;
        if let Err(text) = register(body) {
            prop_assert!(names.iter().any(|name| text.starts_with(name)), "{pointer} replaced, but the error says {text}");
        }
    }

    #[test]
    fn any_body_is_registered_or_refused(body in prop_oneof![
        any_json(),
        prop::collection::btree_map("[A-Za-z_]{1,12}", any_json(), 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
    ]) {
        let _ = register(body);
    }

    #[test]
    fn filters_are_read_or_refused_and_never_panic(expression in prop_oneof![
        ".{0,40}",
        "(Service|ServiceName|ServiceTags|Meta\\.[a-z]{1,4}|NodeMeta\\.x|Port|Bogus) (==|!=|contains|is empty|is not empty|not contains) (\"[a-z]{0,4}\"|[a-z]{1,4}|`x`)( and .{0,20})?",
        "[a-z\" `=!.]{0,30} (not )?in (Tags|Service|Meta\\.v)",
    ]) {
        match Filter::parse(&expression) {
            Ok(filter) => {
                let tags = vec!["primary".to_owned()];
                let meta = BTreeMap::from([("v".to_owned(), "1".to_owned())]);
                let subject = Subject {
                    name: "web",
                    id: "web-1",
                    address: "10.0.0.1",
                    port: 8080,
                    tags: &tags,
                    meta: &meta,
                    node: "node",
                    node_address: "10.0.0.1",
                    datacenter: "dc1",
                    node_meta: &meta,
                };
                let _ = filter.accepts(&subject);
            }
            Err(why) => prop_assert!(why.starts_with("filter: "), "{why}"),
        }
    }
}

#[test]
fn the_registration_of_the_properties_is_valid() {
    let (body, places) = registration();
    for (pointer, _) in &places {
        assert!(body.pointer(pointer).is_some(), "{pointer}");
    }
    register(body).expect("valid");
}
