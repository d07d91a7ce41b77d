//! The JSON and YAML forms of `ferry.v1` messages.
//!
//! Output is the proto3 JSON mapping with the proto field names. Input is the same mapping, made
//! kinder to people: a duration may be written `500ms` or `1m30s` as well as `0.5s`, and a number
//! or boolean where a string is expected is taken as that string (so YAML's `on: [503]` works).
//! Unknown fields are refused. Every error names the field path, such as `rules[0].timeout`.
//!
//! The message's shape comes from the descriptors compiled into this crate, so the rules follow
//! the `.proto` files without a line of per-message code.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{FILE_DESCRIPTOR_SET, v1, validate::FieldError};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("the descriptors compiled into ferry-proto decode"))
}

/// Decodes `value` as the message `name` (such as `ferry.v1.Instance`).
pub fn decode<T: DeserializeOwned>(name: &str, mut value: Value) -> Result<T, FieldError> {
    let message = pool().get_message_by_name(name).ok_or_else(|| FieldError::new("body", format!("unknown message {name}")))?;
    normalize_message(&mut value, &message, "")?;
    serde_json::from_value::<T>(value.clone()).map_err(|error| {
        let path = culprit::<T>(&value, &|inner| inner, String::new());
        if path.is_empty() {
            FieldError::new("body", format!("does not match {name}: {error}"))
        } else {
            FieldError::new(path, format!("invalid value: {error}"))
        }
    })
}

/// Decodes a JSON body as the message `name`.
pub fn decode_slice<T: DeserializeOwned>(name: &str, body: &[u8]) -> Result<T, FieldError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| FieldError::new("body", format!("not JSON: {e}")))?;
    decode(name, value)
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") }
}

fn normalize_message(value: &mut Value, message: &MessageDescriptor, path: &str) -> Result<(), FieldError> {
    let Value::Object(members) = value else {
        return Err(FieldError::new(if path.is_empty() { "body" } else { path }, "must be an object"));
    };
    for (name, member) in members.iter_mut() {
        let field = message.get_field_by_name(name).or_else(|| message.get_field_by_json_name(name)).ok_or_else(|| {
            let known: Vec<String> = message.fields().map(|f| f.name().to_owned()).collect();
            FieldError::new(join(path, name), format!("unknown field; {} has {}", message.name(), known.join(", ")))
        })?;
        normalize_field(member, &field, &join(path, name))?;
    }
    Ok(())
}

fn normalize_field(value: &mut Value, field: &FieldDescriptor, path: &str) -> Result<(), FieldError> {
    if value.is_null() {
        return Ok(());
    }
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else { return Ok(()) };
        let value_field = entry.map_entry_value_field();
        let Value::Object(entries) = value else { return Err(FieldError::new(path, "must be an object (a map)")) };
        for (key, entry_value) in entries.iter_mut() {
            normalize_value(entry_value, &value_field.kind(), &format!("{path}[{key:?}]"))?;
        }
        return Ok(());
    }
    if field.is_list() {
        let Value::Array(items) = value else { return Err(FieldError::new(path, "must be a list")) };
        for (i, item) in items.iter_mut().enumerate() {
            normalize_value(item, &field.kind(), &format!("{path}[{i}]"))?;
        }
        return Ok(());
    }
    normalize_value(value, &field.kind(), path)
}

fn normalize_value(value: &mut Value, kind: &Kind, path: &str) -> Result<(), FieldError> {
    match kind {
        Kind::Message(message) if message.full_name() == "google.protobuf.Duration" => {
            if let Value::String(text) = value {
                *text = proto_duration(text).map_err(|reason| FieldError::new(path, reason))?;
            }
        }
        Kind::Message(message) if message.full_name().starts_with("google.protobuf.") => {}
        Kind::Message(message) => normalize_message(value, message, path)?,
        Kind::String => match value {
            Value::Number(number) => *value = Value::String(number.to_string()),
            Value::Bool(flag) => *value = Value::String(flag.to_string()),
            _ => {}
        },
        Kind::Uint32 | Kind::Fixed32 => whole(value, path, u64::from(u32::MAX))?,
        Kind::Uint64 | Kind::Fixed64 => whole(value, path, u64::MAX)?,
        Kind::Double | Kind::Float => {
            let number = match value {
                Value::Number(number) => number.as_f64(),
                Value::String(text) => text.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
                _ => None,
            };
            if number.is_none() {
                return Err(FieldError::new(path, format!("must be a number, got {}", shown(value))));
            }
        }
        Kind::Bool if !value.is_boolean() => {
            return Err(FieldError::new(path, format!("must be true or false, got {}", shown(value))));
        }
        _ => {}
    }
    Ok(())
}

/// Checks an unsigned integer, written as a number or (as proto3 JSON allows) a string.
fn whole(value: &Value, path: &str, max: u64) -> Result<(), FieldError> {
    let number = match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse::<u64>().ok(),
        _ => None,
    };
    match number {
        Some(n) if n <= max => Ok(()),
        _ => Err(FieldError::new(path, format!("must be a whole number from 0 to {max}, got {}", shown(value)))),
    }
}

/// A value as the user wrote it, for an error.
fn shown(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{text:?}"),
        other => other.to_string(),
    }
}

/// A duration in the proto3 JSON form (`1.5s`) from that form or a human one (`1500ms`, `1m`).
fn proto_duration(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    if let Some(seconds) = trimmed.strip_suffix('s')
        && seconds.parse::<f64>().is_ok_and(|s| s.is_finite())
    {
        return Ok(trimmed.to_owned());
    }
    let duration =
        humantime::parse_duration(trimmed).map_err(|e| format!("{text:?} is not a duration such as 500ms or 2s: {e}"))?;
    let nanos = duration.subsec_nanos();
    Ok(if nanos == 0 { format!("{}s", duration.as_secs()) } else { format!("{}.{nanos:09}s", duration.as_secs()) })
}

/// The path of the deepest member of `value` that fails to decode on its own (rewrapped by
/// `wrap` into a whole message), so an error can name `checks[0].interval` rather than the body.
fn culprit<T: DeserializeOwned>(value: &Value, wrap: &dyn Fn(Value) -> Value, path: String) -> String {
    let fails = |candidate: Value| serde_json::from_value::<T>(wrap(candidate)).is_err();
    match value {
        // An empty container failing too means the container itself is the wrong type.
        Value::Object(_) if fails(Value::Object(Default::default())) => path,
        Value::Array(_) if fails(Value::Array(Vec::new())) => path,
        Value::Object(members) => {
            for (name, member) in members {
                let alone = |inner: Value| Value::Object([(name.clone(), inner)].into_iter().collect());
                if fails(alone(member.clone())) {
                    return culprit::<T>(member, &|inner| wrap(alone(inner)), join(&path, name));
                }
            }
            path
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if fails(Value::Array(vec![item.clone()])) {
                    return culprit::<T>(item, &|inner| wrap(Value::Array(vec![inner])), format!("{path}[{i}]"));
                }
            }
            path
        }
        _ => path,
    }
}

/// The `kind:` of a Route in YAML and JSON documents.
pub const ROUTE: &str = "Route";
/// The `kind:` of a ServicePolicy.
pub const POLICY: &str = "ServicePolicy";
/// The `kind:` of an AuthorizationPolicy.
pub const AUTHORIZATION: &str = "AuthorizationPolicy";

/// A resource from one document: an object with `kind: Route`, `kind: ServicePolicy` or `kind:
/// AuthorizationPolicy` and the fields of that message.
pub fn resource_from_value(mut value: Value) -> Result<v1::Resource, FieldError> {
    let Value::Object(members) = &mut value else { return Err(FieldError::new("", "a resource is an object with a kind")) };
    let kind = members
        .shift_remove("kind")
        .ok_or_else(|| FieldError::new("kind", format!("required: {ROUTE}, {POLICY} or {AUTHORIZATION}")))?;
    let kind = match kind.as_str() {
        Some(ROUTE) => v1::resource::Kind::Route(decode("ferry.v1.Route", value)?),
        Some(POLICY) => v1::resource::Kind::Policy(decode("ferry.v1.ServicePolicy", subsets_shorthand(value))?),
        Some(AUTHORIZATION) => v1::resource::Kind::Authorization(decode("ferry.v1.AuthorizationPolicy", value)?),
        _ => return Err(FieldError::new("kind", format!("{kind} is not {ROUTE}, {POLICY} or {AUTHORIZATION}"))),
    };
    Ok(v1::Resource { kind: Some(kind) })
}

/// `subsets: { v2: { version: v2 } }` is short for `subsets: { v2: { labels: { version: v2 } } }`:
/// a subset written as labels alone (string values, no `labels` key) is wrapped.
fn subsets_shorthand(mut value: Value) -> Value {
    if let Some(Value::Object(subsets)) = value.get_mut("subsets") {
        for subset in subsets.values_mut() {
            if let Value::Object(fields) = subset
                && !fields.contains_key("labels")
                && !fields.is_empty()
                && fields.values().all(Value::is_string)
            {
                *subset = serde_json::json!({ "labels": std::mem::take(fields) });
            }
        }
    }
    value
}

/// Every resource of a multi-document YAML text (documents separated by `---`), validated.
/// Errors name the document: `documents[1].rules[0].timeout`.
pub fn resources_from_yaml(text: &str) -> Result<Vec<v1::Resource>, FieldError> {
    Ok(documents_from_yaml(text)?.into_iter().map(|(_, resource)| resource).collect())
}

/// The same, each resource with the index of its document (empty documents are skipped).
///
/// Costly YAML is refused before anything is built ([`refuse_costly_yaml`]).
pub fn documents_from_yaml(text: &str) -> Result<Vec<(usize, v1::Resource)>, FieldError> {
    Ok(yaml_resources(text, false)?.into_iter().map(|(document, _, resource)| (document, resource)).collect())
}

/// The same, but a document may also be a list of resources (what `ferryctl get -o json`
/// prints), which count in order; each resource with where it stands: `documents[1]`, or
/// `documents[0][2]` inside a list, as its errors name it.
pub fn placed_resources_from_yaml(text: &str) -> Result<Vec<(String, v1::Resource)>, FieldError> {
    Ok(yaml_resources(text, true)?
        .into_iter()
        .map(|(document, item, resource)| match item {
            Some(item) => (format!("documents[{document}][{item}]"), resource),
            None => (format!("documents[{document}]"), resource),
        })
        .collect())
}

/// The validated resources of `text`, each with its document and, when `lists` lets a
/// document be a list of them, its index in that list.
fn yaml_resources(text: &str, lists: bool) -> Result<Vec<(usize, Option<usize>, v1::Resource)>, FieldError> {
    use serde::Deserialize;
    refuse_costly_yaml(text)?;
    let resource = |at: &str, value: Value| -> Result<v1::Resource, FieldError> {
        let resource = resource_from_value(value).map_err(|e| e.within(at))?;
        crate::validate::resource(&resource).map_err(|e| e.within(at))?;
        Ok(resource)
    };
    let mut resources = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let at = format!("documents[{i}]");
        let value = Value::deserialize(document).map_err(|e| FieldError::new(&at, format!("not valid YAML: {e}")))?;
        match value {
            Value::Null => {}
            Value::Array(items) if lists => {
                for (j, item) in items.into_iter().enumerate() {
                    resources.push((i, Some(j), resource(&format!("{at}[{j}]"), item)?));
                }
            }
            value => resources.push((i, None, resource(&at, value)?)),
        }
    }
    Ok(resources)
}

/// The deepest nesting of lists and maps a YAML document may have. A resource needs about 6
/// levels; the full parser gives up at 128, but only after scanning the whole text in time that
/// grows with the square of the nesting.
pub const MAX_YAML_DEPTH: usize = 64;

/// Refuses YAML that would cost far more to parse than its size, naming the document and
/// line: aliases (`*name`), which resources never need and of which a few kilobytes nested
/// expand to gigabytes (the "billion laughs"), and nesting deeper than [`MAX_YAML_DEPTH`]. It
/// reads the text as a stream of parser events: no value is built, so the cost is linear in
/// the text.
pub fn refuse_costly_yaml(text: &str) -> Result<(), FieldError> {
    use yaml_rust2::parser::{Event, Parser};
    let mut parser = Parser::new_from_str(text);
    let mut document = 0usize;
    let mut started = false;
    let mut depth = 0usize;
    let too_deep = format!("lists and maps nest more than {MAX_YAML_DEPTH} deep");
    loop {
        let refused =
            |line: usize, reason: &str| Err(FieldError::new(format!("documents[{document}]"), format!("line {line}: {reason}")));
        let (event, mark) = match parser.next_token() {
            Ok(next) => next,
            // This parser stops at a nesting limit of its own, maybe before it has told us of
            // every level.
            Err(error) if error.info().contains("recursion limit") => return refused(error.marker().line(), &too_deep),
            // Any other syntax error is left for the full parse, which describes it better.
            Err(_) => return Ok(()),
        };
        match event {
            Event::StreamEnd => return Ok(()),
            Event::DocumentStart => {
                if started {
                    document += 1;
                }
                started = true;
                depth = 0;
            }
            Event::Alias(_) => {
                return refused(mark.line(), "YAML aliases (*name) are not accepted; write the value out in full");
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_YAML_DEPTH {
                    return refused(mark.line(), &too_deep);
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
}

/// Renames the item an apply error names (`items[1].resource.rules[0]...`) after the YAML
/// document it came from (`documents[2].rules[0]...`), given each item's document index.
pub fn name_document(text: &str, documents: &[usize]) -> String {
    name_item(text, |i| documents.get(i).map(|document| format!("documents[{document}]")))
}

/// Renames the item an apply error names (`items[1].resource...`) to `place(1)` (`documents[0][1]...`);
/// any other text, or an item `place` does not know, is left as it is.
pub fn name_item(text: &str, place: impl Fn(usize) -> Option<String>) -> String {
    let Some(rest) = text.strip_prefix("items[") else { return text.to_owned() };
    let Some((index, rest)) = rest.split_once(']') else { return text.to_owned() };
    let Some(place) = index.parse::<usize>().ok().and_then(place) else { return text.to_owned() };
    let rest = rest.strip_prefix(".resource").unwrap_or(rest);
    format!("{place}{rest}")
}

/// A resource as a JSON object with its `kind` first.
pub fn resource_to_value(resource: &v1::Resource) -> Value {
    let (kind, body) = match &resource.kind {
        Some(v1::resource::Kind::Route(route)) => (ROUTE, serde_json::to_value(route)),
        Some(v1::resource::Kind::Policy(policy)) => (POLICY, serde_json::to_value(policy)),
        Some(v1::resource::Kind::Authorization(policy)) => (AUTHORIZATION, serde_json::to_value(policy)),
        None => return Value::Null,
    };
    let mut object = serde_json::Map::new();
    object.insert("kind".into(), Value::String(kind.into()));
    if let Ok(Value::Object(fields)) = body {
        object.extend(fields);
    }
    Value::Object(object)
}

/// A resource as a YAML document.
pub fn resource_to_yaml(resource: &v1::Resource) -> String {
    serde_yaml_ng::to_string(&resource_to_value(resource)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED_ROUTE: &str = r#"{"kind": "Route", "service": "catalog", "rules": [{"backends": [{"service": "catalog"}]}]}"#;

    #[test]
    fn a_list_of_resources_counts_as_those_resources_in_order_where_lists_are_taken() {
        let policy = r#"{"kind": "AuthorizationPolicy", "service": "catalog", "default": "deny", "rules": []}"#;
        let text = format!("[{LISTED_ROUTE}, {policy}]\n---\n{LISTED_ROUTE}\n");
        let places: Vec<String> = placed_resources_from_yaml(&text).expect("valid").into_iter().map(|(at, _)| at).collect();
        assert_eq!(places, ["documents[0][0]", "documents[0][1]", "documents[1]"]);
        assert_eq!(placed_resources_from_yaml("[]\n").expect("valid").len(), 0);
        assert!(documents_from_yaml(&text).is_err(), "the server's documents are resources, not lists");
    }

    #[test]
    fn errors_name_the_place_inside_the_list() {
        let bad =
            r#"{"kind": "Route", "service": "catalog", "rules": [{"backends": [{"service": "catalog", "weight": 20000}]}]}"#;
        let error = placed_resources_from_yaml(&format!("[{LISTED_ROUTE}, {bad}]")).expect_err("weight too high").to_string();
        assert!(error.starts_with("documents[0][1].rules[0].backends[0].weight: "), "{error}");
        let error = placed_resources_from_yaml(&format!("[{LISTED_ROUTE}, 7]")).expect_err("not a resource").to_string();
        assert!(error.starts_with("documents[0][1]"), "{error}");
        let places = ["documents[0][0]".to_owned(), "documents[0][1]".to_owned()];
        let place = |i: usize| places.get(i).cloned();
        assert_eq!(name_item("items[1].resource.rules[0]: no", place), "documents[0][1].rules[0]: no");
        assert_eq!(name_item("something else", place), "something else");
    }

    #[test]
    fn numbers_of_the_wrong_kind_are_named() {
        for (yaml, expected) in [
            ("weight: -1", "documents[0].rules[0].backends[0].weight: must be a whole number from 0 to 4294967295, got -1"),
            (
                "weight: \"90%\"",
                "documents[0].rules[0].backends[0].weight: must be a whole number from 0 to 4294967295, got \"90%\"",
            ),
            ("weight: 1.5", "documents[0].rules[0].backends[0].weight: must be a whole number from 0 to 4294967295, got 1.5"),
        ] {
            let text = format!("kind: Route\nservice: catalog\nrules: [ {{ backends: [ {{ {yaml} }} ] }} ]\n");
            assert_eq!(resources_from_yaml(&text).expect_err(yaml).to_string(), expected);
        }
        let text = "kind: Route\nservice: catalog\nrules: [ { backends: [ { weight: \"30\" } ] } ]\n";
        assert!(resources_from_yaml(text).is_ok(), "proto3 JSON allows integers as strings");
        let text = "kind: Route\nservice: catalog\nrules: [ { fault: { abort: { percent: lots, status: 503 } } } ]\n";
        assert_eq!(
            resources_from_yaml(text).expect_err("percent").to_string(),
            "documents[0].rules[0].fault.abort.percent: must be a number, got \"lots\""
        );
    }

    #[test]
    fn apply_errors_are_named_after_their_document() {
        let documents = [0, 2];
        assert_eq!(name_document("items[1].resource.rules[0].timeout: bad", &documents), "documents[2].rules[0].timeout: bad");
        assert_eq!(name_document("items[1].resource: bad", &documents), "documents[2]: bad");
        assert_eq!(name_document("items[5].resource: bad", &documents), "items[5].resource: bad", "unknown items stay");
        assert_eq!(name_document("service: bad", &documents), "service: bad");
    }

    #[test]
    fn subsets_may_be_written_as_their_labels() {
        let long = resources_from_yaml("kind: ServicePolicy\nservice: catalog\nsubsets: { v2: { labels: { version: v2 } } }\n");
        let short = resources_from_yaml("kind: ServicePolicy\nservice: catalog\nsubsets: { v2: { version: v2 } }\n");
        assert_eq!(long.expect("long form"), short.expect("short form"));
    }

    #[test]
    fn durations_may_be_written_for_people() {
        assert_eq!(proto_duration("500ms").as_deref(), Ok("0.500000000s"));
        assert_eq!(proto_duration("2s").as_deref(), Ok("2s"));
        assert_eq!(proto_duration("1.5s").as_deref(), Ok("1.5s"));
        assert_eq!(proto_duration("1m 30s").as_deref(), Ok("90s"));
        assert!(proto_duration("soon").is_err());
        let check: v1::Check = decode("ferry.v1.Check", serde_json::json!({"tcp": {}, "interval": "250ms"})).expect("decodes");
        assert_eq!(check.interval.map(|d| (d.seconds, d.nanos)), Some((0, 250_000_000)));
    }

    #[test]
    fn errors_name_the_nested_field() {
        let bad = serde_json::json!({"service": "web", "checks": [{"tcp": {}, "interval": "soon"}]});
        let error = decode::<v1::Instance>("ferry.v1.Instance", bad).expect_err("bad duration");
        assert_eq!(error.field, "checks[0].interval");
        let unknown = serde_json::json!({"service": "web", "prot": 80});
        let error = decode::<v1::Instance>("ferry.v1.Instance", unknown).expect_err("unknown field");
        assert_eq!(error.field, "prot");
        assert!(error.reason.contains("port"), "{error}");
        let typed = serde_json::json!({"service": "web", "port": "eighty"});
        assert_eq!(decode::<v1::Instance>("ferry.v1.Instance", typed).expect_err("not a number").field, "port");
    }

    #[test]
    fn yaml_documents_round_trip() {
        let yaml = "kind: ServicePolicy\nservice: catalog\nsubsets: { v1: { labels: { version: v1 } } }\n---\nkind: Route\nservice: catalog\nrules: [ { backends: [ { subset: v1 } ], timeout: 1500ms } ]\n";
        let resources = resources_from_yaml(yaml).expect("parses");
        assert_eq!(resources.len(), 2);
        let text = resource_to_yaml(&resources[1]);
        assert!(text.starts_with("kind: Route\n"), "{text}");
        assert_eq!(resources_from_yaml(&text).expect("parses again"), vec![resources[1].clone()]);
    }

    #[test]
    fn aliases_are_refused_before_they_expand() {
        // The "billion laughs": nine levels of nine aliases each, ~50 KB once padded.
        let mut text = String::from("kind: Route\nservice: catalog\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        for i in 1..110 {
            let refs = vec![format!("*a{}", i - 1); 100].join(",");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        assert!(text.len() > 50_000);
        let started = std::time::Instant::now();
        let error = resources_from_yaml(&text).expect_err("aliases");
        assert_eq!(error.field, "documents[0]");
        assert!(error.reason.contains("line 4: YAML aliases"), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "refused in {:?}", started.elapsed());
        let second = "kind: Route\nservice: a\n---\nkind: Route\nservice: &s b\nrules: []\nx: *s\n";
        assert_eq!(resources_from_yaml(second).expect_err("alias").field, "documents[1]");
    }

    #[test]
    fn deep_nesting_is_refused_before_the_full_parse() {
        // Found by a property test: 20 000 `[` took the full parser seconds (quadratic in the
        // nesting) before it reached its recursion limit.
        for open in ["[", "{a: ", "{\"a\": "] {
            let text = format!("kind: Route\nservice: catalog\nrules: {}", open.repeat(20_000));
            let error = resources_from_yaml(&text).expect_err("too deep");
            assert_eq!(error.field, "documents[0]");
            assert!(error.reason.contains("nest more than 64 deep"), "{error}");
        }
        let nested =
            format!("kind: Route\nservice: catalog\nx: {}1{}\n", "[".repeat(MAX_YAML_DEPTH - 1), "]".repeat(MAX_YAML_DEPTH - 1));
        let error = resources_from_yaml(&nested).expect_err("an unknown field, but not too deep");
        assert_eq!(error.field, "documents[0].x");
        let second = format!("kind: Route\nservice: a\n---\nx: {}", "[".repeat(100));
        assert_eq!(resources_from_yaml(&second).expect_err("too deep").field, "documents[1]");
    }

    #[test]
    fn authorization_policies_round_trip() {
        let yaml = "kind: AuthorizationPolicy\nservice: catalog\ndefault: deny\nrules:\n- from:\n  - frontend\n  match:\n    path_prefix: /items\n    method: GET\n  action: allow\n";
        let resources = resources_from_yaml(yaml).expect("parses");
        let text = resource_to_yaml(&resources[0]);
        assert!(text.starts_with("kind: AuthorizationPolicy\n"), "{text}");
        assert_eq!(resources_from_yaml(&text).expect("parses again"), resources);
    }

    #[test]
    fn yaml_errors_name_the_document() {
        let yaml = "kind: Route\nservice: catalog\n---\nkind: Route\nservice: catalog\nrules: [ { timeout: -1s } ]\n";
        let error = resources_from_yaml(yaml).expect_err("bad second document");
        assert!(error.field.starts_with("documents[1].rules[0].timeout"), "{error}");
        let error = resources_from_yaml("kind: Gateway\nservice: x\n").expect_err("unknown kind");
        assert_eq!(error.field, "documents[0].kind");
        let error = resources_from_yaml("kind: Route\nservice: [\n").expect_err("broken YAML");
        assert_eq!(error.field, "documents[0]");
    }
}
