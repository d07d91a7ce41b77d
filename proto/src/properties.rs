//! Property tests of what a peer or a config file reaches in this crate: resource YAML and JSON
//! (`POST /v1/apply`, `ferryctl apply`), their validation, the durations written in them, and
//! the route matchers and regular expressions compiled from them.
//!
//! Each parser must not panic on any input, must keep its output bounded by the input or by the
//! documented limits, and must name the field of an invalid value. The [`wire`] module does the
//! same for the messages gRPC peers send.

use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::{
    authz::Authorization,
    json::{self, documents_from_yaml, resource_from_value, resource_to_value, resource_to_yaml, resources_from_yaml},
    matching::{Matcher, RequestInfo, strip_port},
    v1,
    validate::{self, Limits, MAX_RULES},
};

/// The validation of protobuf messages from gRPC peers.
mod wire;

/// Short, to keep each case cheap: parsers see at most a few hundred bytes.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,64}", "[ -~\n]{0,200}", "[a-z0-9_.:/*&!|{}\\[\\],#'\"\\- \n]{0,120}"]
}

/// A scalar or small structure to put where a resource field was: of the wrong type, out of
/// range, huge, or empty.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(json!(1e300)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        ".{0,24}".prop_map(Value::String),
        "[0-9]{1,30}(\\.[0-9]{0,12})?(ns|us|ms|s|m|h)?".prop_map(Value::String),
        (1usize..3000).prop_map(|n| Value::String("x".repeat(n))),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

/// Valid resources of each kind, and the places in them a mutation may hit: a JSON pointer and
/// the field path an error about that place names.
fn templates() -> Vec<(Value, Vec<(&'static str, &'static str)>)> {
    let route = json!({
        "kind": "Route",
        "service": "catalog",
        "rules": [{
            "name": "canary",
            "match": {
                "path_prefix": "/api",
                "method": "GET",
                "headers": {"x-canary": "true"},
                "header_regex": {"x-user": "[a-z]+"},
                "query": {"debug": "1"},
                "hosts": ["shop.example.com", "*.example.com"]
            },
            "backends": [{"subset": "v2", "weight": 10}, {"subset": "v1", "weight": 90}],
            "timeout": "2s",
            "retries": {"attempts": 3, "per_try_timeout": "500ms", "on": ["connect-failure", "503"]},
            "request_headers": {"set": {"x-from": "mesh"}, "remove": ["x-debug"]},
            "rewrite_path_prefix": "/v2",
            "fault": {"delay": {"percent": 5, "duration": "1s"}, "abort": {"percent": 1, "status": 503}},
            "mirror": {"percent": 10, "backend": {"service": "shadow"}}
        }]
    });
    let route_fields = vec![
        ("/service", "service"),
        ("/rules", "rules"),
        ("/rules/0", "rules[0]"),
        ("/rules/0/name", "rules[0].name"),
        ("/rules/0/match", "rules[0].match"),
        ("/rules/0/match/path_prefix", "rules[0].match.path_prefix"),
        ("/rules/0/match/method", "rules[0].match.method"),
        ("/rules/0/match/headers", "rules[0].match.headers"),
        ("/rules/0/match/headers/x-canary", "rules[0].match.headers[\"x-canary\"]"),
        ("/rules/0/match/header_regex/x-user", "rules[0].match.header_regex[\"x-user\"]"),
        ("/rules/0/match/query/debug", "rules[0].match.query[\"debug\"]"),
        ("/rules/0/match/hosts/1", "rules[0].match.hosts[1]"),
        ("/rules/0/backends/0", "rules[0].backends[0]"),
        ("/rules/0/backends/0/subset", "rules[0].backends[0].subset"),
        ("/rules/0/backends/1/weight", "rules[0].backends[1].weight"),
        ("/rules/0/timeout", "rules[0].timeout"),
        ("/rules/0/retries/attempts", "rules[0].retries.attempts"),
        ("/rules/0/retries/per_try_timeout", "rules[0].retries.per_try_timeout"),
        ("/rules/0/retries/on/1", "rules[0].retries.on[1]"),
        ("/rules/0/request_headers/set/x-from", "rules[0].request_headers.set[\"x-from\"]"),
        ("/rules/0/request_headers/remove/0", "rules[0].request_headers.remove[0]"),
        ("/rules/0/rewrite_path_prefix", "rules[0].rewrite_path_prefix"),
        ("/rules/0/fault/delay/percent", "rules[0].fault.delay.percent"),
        ("/rules/0/fault/delay/duration", "rules[0].fault.delay.duration"),
        ("/rules/0/fault/abort/status", "rules[0].fault.abort.status"),
        ("/rules/0/mirror/percent", "rules[0].mirror.percent"),
        ("/rules/0/mirror/backend/service", "rules[0].mirror.backend.service"),
    ];
    let policy = json!({
        "kind": "ServicePolicy",
        "service": "catalog",
        "subsets": {"v1": {"labels": {"version": "v1"}}, "v2": {"version": "v2"}},
        "load_balancer": "ring-hash",
        "hash_header": "x-user",
        "circuit_breaker": {"max_concurrent": 100, "max_pending": 10},
        "outlier_detection": {"consecutive_failures": 5, "base_ejection": "30s", "max_ejection_percent": 50},
        "retry_budget": {"ratio": 0.2, "min_per_second": 10, "window": "10s"},
        "slow_start": "30s",
        "locality": {"min_passing_percent": 70},
        "connect_timeout": "250ms",
        "opaque_ports": [3306, 25]
    });
    let policy_fields = vec![
        ("/service", "service"),
        ("/subsets", "subsets"),
        ("/subsets/v1", "subsets[\"v1\"]"),
        ("/subsets/v1/labels/version", "subsets[\"v1\"].labels"),
        ("/load_balancer", "load_balancer"),
        ("/hash_header", "hash_header"),
        ("/circuit_breaker/max_concurrent", "circuit_breaker.max_concurrent"),
        ("/outlier_detection/base_ejection", "outlier_detection.base_ejection"),
        ("/outlier_detection/max_ejection_percent", "outlier_detection.max_ejection_percent"),
        ("/retry_budget/ratio", "retry_budget.ratio"),
        ("/retry_budget/window", "retry_budget.window"),
        ("/slow_start", "slow_start"),
        ("/locality/min_passing_percent", "locality.min_passing_percent"),
        ("/connect_timeout", "connect_timeout"),
        ("/opaque_ports", "opaque_ports"),
        ("/opaque_ports/1", "opaque_ports[1]"),
    ];
    let authorization = json!({
        "kind": "AuthorizationPolicy",
        "service": "catalog",
        "default": "deny",
        "rules": [
            {"name": "reads", "from": ["frontend", "*"], "match": {"method": "GET", "path_regex": "/items/[0-9]+"}, "action": "allow"},
            {"from": ["batch"], "action": "deny"}
        ]
    });
    let authorization_fields = vec![
        ("/service", "service"),
        ("/default", "default"),
        ("/rules", "rules"),
        ("/rules/0/name", "rules[0].name"),
        ("/rules/0/from", "rules[0].from"),
        ("/rules/0/from/0", "rules[0].from[0]"),
        ("/rules/0/match/method", "rules[0].match.method"),
        ("/rules/0/match/path_regex", "rules[0].match.path_regex"),
        ("/rules/1/action", "rules[1].action"),
    ];
    vec![(route, route_fields), (policy, policy_fields), (authorization, authorization_fields)]
}

/// The first segment of a field path: `rules[0]` of `rules[0].match.method`, `subsets` of
/// `subsets["v1"].labels`.
fn top(path: &str) -> &str {
    let end = path.find(['.', '[']).unwrap_or(path.len());
    match path[end..].strip_prefix('[') {
        // Keep a list index (`rules[0]`), not a map key, which may hold anything.
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
            let close = rest.find(']').map_or(path.len(), |i| end + 1 + i + 1);
            &path[..close]
        }
        _ => &path[..end],
    }
}

/// A valid route, built from parts the validation accepts.
fn valid_route() -> impl Strategy<Value = v1::Route> {
    let service = "[a-z][a-z0-9]{0,10}";
    let rule = (
        prop::collection::btree_set("[a-z][a-z0-9]{0,6}", 1..4),
        prop::option::of(1u64..3_600_000),
        prop::option::of("/[a-z0-9/]{0,12}"),
        prop::option::of("[A-Z]{1,7}"),
        prop::collection::btree_map("x-[a-z]{1,8}", "[ -~]{0,16}", 0..3),
    )
        .prop_map(|(subsets, timeout_ms, prefix, method, headers)| {
            let weighted = subsets.len() > 1;
            v1::RouteRule {
                backends: subsets
                    .into_iter()
                    .map(|subset| v1::Backend { subset, weight: if weighted { 10 } else { 0 }, ..Default::default() })
                    .collect(),
                timeout: timeout_ms.map(|ms| crate::types::Duration {
                    seconds: i64::try_from(ms / 1000).unwrap_or(0),
                    nanos: i32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
                }),
                r#match: Some(v1::RouteMatch {
                    path_prefix: prefix.unwrap_or_default(),
                    method: method.unwrap_or_default(),
                    headers: headers.into_iter().collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }
        });
    (service, prop::collection::vec(rule, 0..4)).prop_map(|(service, rules)| v1::Route { service, rules, ..Default::default() })
}

/// A regular expression, written from the characters that give regexes their cost.
fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z.*+?(){}|\\\\^$0-9,\\[\\]w-]{0,40}",
        (1u32..2000, 1u32..2000).prop_map(|(n, m)| format!("(\\w{{{n}}}){{{m}}}")),
        (1u32..400).prop_map(|n| format!("[a-z]{{{n}}}/.*")),
    ]
}

fn request_headers() -> impl Strategy<Value = HeaderMap> {
    prop::collection::vec(("x-[a-z]{1,6}", "[ -~]{0,20}"), 0..4).prop_map(|pairs| {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            if let (Ok(name), Ok(value)) = (http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
                headers.append(name, value);
            }
        }
        headers
    })
}

proptest! {
    #[test]
    fn yaml_of_any_text_is_parsed_or_refused_by_document(text in any_text()) {
        match documents_from_yaml(&text) {
            Ok(documents) => {
                // One resource per document, and a document is at least a line of text.
                prop_assert!(documents.len() <= text.lines().count() + 1);
            }
            Err(error) => prop_assert!(error.field.starts_with("documents["), "{error}"),
        }
    }

    #[test]
    fn json_of_any_bytes_is_decoded_or_refused_by_field(body in prop::collection::vec(any::<u8>(), 0..200)) {
        let errors = [
            json::decode_slice::<v1::Route>("ferry.v1.Route", &body).err(),
            json::decode_slice::<v1::ServicePolicy>("ferry.v1.ServicePolicy", &body).err(),
            json::decode_slice::<v1::AuthorizationPolicy>("ferry.v1.AuthorizationPolicy", &body).err(),
        ];
        for error in errors.into_iter().flatten() {
            prop_assert!(!error.field.is_empty(), "{error}");
        }
    }

    #[test]
    fn a_mutated_resource_is_accepted_or_refused_naming_the_field(
        template in 0usize..3,
        place in any::<prop::sample::Index>(),
        replacement in any_json(),
        as_yaml in any::<bool>(),
    ) {
        let (mut value, places) = templates().swap_remove(template);
        let (pointer, path) = places[place.index(places.len())];
        *value.pointer_mut(pointer).expect("every place is in its template") = replacement;
        let result = if as_yaml {
            let text = serde_yaml_ng::to_string(&value).expect("JSON values are YAML");
            resources_from_yaml(&text).map_err(|e| (e.field.strip_prefix("documents[0].").map(str::to_owned), e))
        } else {
            resource_from_value(value)
                .and_then(|resource| validate::resource(&resource).map(|()| vec![resource]))
                .map_err(|e| (Some(e.field.clone()), e))
        };
        match result {
            Ok(resources) => prop_assert_eq!(resources.len(), 1),
            Err((field, error)) => {
                let field = field.unwrap_or_default();
                // The field hit, one inside it, or (for a rule that ties two fields together,
                // such as a retry's per-try timeout within the rule's timeout) one beside it.
                prop_assert!(field.starts_with(top(path)), "{path} replaced, but the error names {error}");
            }
        }
    }

    #[test]
    fn an_unknown_field_is_named(template in 0usize..3, place in any::<prop::sample::Index>(), key in "x[a-z_]{0,12}") {
        let (mut value, places) = templates().swap_remove(template);
        // Every object of the template: the top and the ones the places point into.
        let mut objects: Vec<String> = vec![String::new()];
        objects.extend(places.iter().map(|(p, _)| p.to_string()).filter(|p| value.pointer(p).is_some_and(|v| {
            let maps = ["/headers", "/header_regex", "/query", "/subsets", "/set", "/labels"];
            v.is_object() && !maps.iter().any(|map| p.ends_with(map))
        })));
        let at = &objects[place.index(objects.len())];
        let Some(Value::Object(members)) = value.pointer_mut(at) else { unreachable!("only objects were kept") };
        members.insert(key.clone(), json!(1));
        let error = resource_from_value(value).expect_err("an unknown field");
        prop_assert!(error.field.ends_with(&key), "{key} added at {at:?}, but the error names {error}");
        prop_assert!(error.reason.starts_with("unknown field"), "{error}");
    }

    #[test]
    fn valid_routes_round_trip_through_yaml_and_json(route in valid_route()) {
        let resource = v1::Resource { kind: Some(v1::resource::Kind::Route(route)) };
        prop_assert_eq!(validate::resource(&resource), Ok(()));
        let yaml = resource_to_yaml(&resource);
        prop_assert_eq!(resources_from_yaml(&yaml), Ok(vec![resource.clone()]), "{}", yaml);
        let text = serde_json::to_string(&resource_to_value(&resource)).expect("a JSON value prints");
        let value: Value = serde_json::from_str(&text).expect("printed JSON parses");
        prop_assert_eq!(resource_from_value(value), Ok(resource));
    }

    #[test]
    fn durations_are_read_or_refused_naming_the_field(text in prop_oneof![
        any_text(),
        "[0-9]{1,25}(\\.[0-9]{0,12})?(ns|us|ms|s|m|h|d| |e)?([0-9]{1,4}(ms|s|m))?",
        "[+-]?[0-9]{0,20}(\\.[0-9]{0,20})?(e[+-]?[0-9]{1,4})?s",
    ]) {
        let check = json!({"tcp": {}, "interval": text});
        match json::decode::<v1::Check>("ferry.v1.Check", check) {
            Ok(check) => {
                let interval = check.interval.expect("given");
                prop_assert!((0..1_000_000_000).contains(&interval.nanos.abs()), "{interval:?}");
            }
            Err(error) => prop_assert_eq!(error.field, "interval", "{}", error.reason),
        }
    }

    #[test]
    fn durations_round_trip_at_millisecond_precision(ms in 1u64..100_000_000_000) {
        let written = humantime::format_duration(std::time::Duration::from_millis(ms)).to_string();
        let check: v1::Check = json::decode("ferry.v1.Check", json!({"tcp": {}, "interval": written})).expect("a human duration");
        let interval = check.interval.expect("given");
        prop_assert_eq!(validate::duration("interval", &interval), Ok(std::time::Duration::from_millis(ms)));
    }

    #[test]
    fn any_route_match_is_validated_before_it_is_compiled(
        path in prop_oneof![Just(String::new()), any_text()],
        method in prop_oneof![Just(String::new()), ".{0,10}"],
        headers in prop::collection::btree_map(".{0,8}", ".{0,8}", 0..3),
        present in prop::collection::vec(".{0,8}", 0..3),
        hosts in prop::collection::vec(prop_oneof![".{0,12}", "(\\*\\.)?[a-z.]{1,12}"], 0..3),
    ) {
        let m = v1::RouteMatch {
            path_prefix: path,
            method,
            headers: headers.into_iter().collect(),
            header_present: present,
            hosts,
            ..Default::default()
        };
        let policy = v1::AuthorizationPolicy {
            service: "catalog".into(),
            rules: vec![v1::AuthorizationRule { from: vec!["*".into()], r#match: Some(m), ..Default::default() }],
            ..Default::default()
        };
        match validate::authorization(&policy) {
            Ok(()) => prop_assert!(Authorization::compile(&policy, 1).is_ok(), "validated but does not compile"),
            Err(error) => prop_assert!(error.field.starts_with("rules[0].match."), "{error}"),
        }
    }

    #[test]
    fn matching_any_request_never_panics(
        host_patterns in prop::collection::vec("(\\*\\.)?[a-z]{1,6}(\\.[a-z]{1,4})?", 0..3),
        regex in "[a-z.*/]{0,12}",
        path in ".{0,32}",
        query in prop::option::of(".{0,32}"),
        host in prop::option::of(".{0,24}"),
        headers in request_headers(),
    ) {
        let m = v1::RouteMatch {
            path_regex: regex,
            hosts: host_patterns,
            query: [("debug".to_owned(), "1".to_owned())].into(),
            header_regex: [("x-a".to_owned(), "[a-z]*".to_owned())].into(),
            ..Default::default()
        };
        if let Ok(matcher) = Matcher::compile(Some(&m)) {
            let request = RequestInfo { method: &Method::GET, path: &path, query: query.as_deref(), headers: &headers, host: host.as_deref() };
            let _ = matcher.matches(&request);
        }
    }

    #[test]
    fn a_request_host_comes_from_its_uri_or_host_header(
        target in prop_oneof![Just(String::new()), "[a-zA-Z0-9.-]{1,16}(:[0-9]{1,5})?\\.?"],
        host in prop::option::of(prop::collection::vec(any::<u8>(), 0..24)),
    ) {
        let uri: http::Uri = if target.is_empty() { "/items".parse() } else { format!("http://{target}/items").parse() }
            .unwrap_or_else(|_| http::Uri::from_static("/items"));
        let mut headers = HeaderMap::new();
        if let Some(value) = host.as_deref().and_then(|h| HeaderValue::from_bytes(h).ok()) {
            headers.insert(http::header::HOST, value);
        }
        let info = RequestInfo::of(&Method::GET, &uri, &headers);
        let expected = uri.host().or_else(|| headers.get(http::header::HOST).and_then(|h| h.to_str().ok()));
        match (info.host, expected) {
            (Some(found), Some(from)) => prop_assert!(from.starts_with(found), "{found} from {from}"),
            (None, None) => {}
            (found, from) => prop_assert!(false, "{found:?} from {from:?}"),
        }
    }

    #[test]
    fn a_stripped_port_leaves_a_prefix_of_the_authority(authority in prop_oneof![".{0,24}", "\\[?[0-9a-f:.]{0,16}\\]?(:[0-9]{0,6})?"]) {
        let host = strip_port(&authority);
        prop_assert!(authority.starts_with(host));
        prop_assert!(host.len() == authority.len() || authority[host.len()..].starts_with(':'));
    }

    #[test]
    fn deep_nesting_is_refused_before_it_costs_much(
        depth in 1usize..3000,
        open in prop_oneof![Just("["), Just("{a: "), Just("- "), Just("{\"a\":")],
    ) {
        let text = format!("kind: Route\nservice: catalog\nrules: {}", open.repeat(depth));
        let error = resources_from_yaml(&text).expect_err("unterminated");
        prop_assert!(error.field.starts_with("documents[0]"), "{error}");
        if depth > json::MAX_YAML_DEPTH && open != "- " {
            // Refused by the linear screen, not by the full parser's recursion limit.
            prop_assert!(error.reason.contains("nest more than"), "{error}");
        }
        let body = format!("{{\"kind\": \"Route\", \"service\": \"catalog\", \"rules\": {}", open.repeat(depth));
        let _ = json::decode_slice::<v1::Route>("ferry.v1.Route", body.as_bytes());
    }

    #[test]
    fn apply_errors_are_renamed_after_their_document(
        item in 0usize..6,
        rest in prop_oneof![Just(String::new()), Just(".resource".to_owned()), ".{0,16}"],
        documents in prop::collection::vec(0usize..100, 0..4),
        junk in ".{0,16}",
    ) {
        let field = format!("items[{item}]{rest}");
        let renamed = json::name_document(&field, &documents);
        match documents.get(item) {
            Some(document) if !rest.starts_with(']') => {
                prop_assert!(renamed.starts_with(&format!("documents[{document}]")), "{field} became {renamed}");
            }
            _ => {}
        }
        let _ = json::name_document(&junk, &documents);
    }

    #[test]
    fn too_many_rules_are_refused_by_count(n in (MAX_RULES - 2)..(MAX_RULES + 3)) {
        let route = v1::Route { service: "catalog".into(), rules: vec![v1::RouteRule::default(); n], ..Default::default() };
        match validate::route(&route) {
            Ok(()) => prop_assert!(n <= MAX_RULES),
            Err(error) => {
                prop_assert!(n > MAX_RULES);
                prop_assert_eq!(error.field, "rules");
            }
        }
    }
}

proptest! {
    // A regex near the size limits takes milliseconds to compile in a debug build: fewer cases.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_valid_regex_compiles_within_the_limits(pattern in pattern(), header in any::<bool>()) {
        let limits = Limits { regex_bytes: 256 << 10, ..Limits::DEFAULT };
        let m = if header {
            v1::RouteMatch { header_regex: [("x-user".to_owned(), pattern.clone())].into(), ..Default::default() }
        } else {
            v1::RouteMatch { path_regex: pattern.clone(), ..Default::default() }
        };
        let route = v1::Route {
            service: "catalog".into(),
            rules: vec![v1::RouteRule { r#match: Some(m.clone()), ..Default::default() }],
            ..Default::default()
        };
        match validate::route_within(&route, &limits) {
            Ok(()) => {
                // What the control plane takes, every sidecar compiles, within the limit.
                let nfa = regex_automata::nfa::thompson::NFA::new(&format!("^(?:{pattern})$")).expect("accepted patterns compile");
                prop_assert!(nfa.memory_usage() <= limits.regex_bytes, "{pattern}: {} bytes", nfa.memory_usage());
                let matcher = Matcher::compile(Some(&m));
                prop_assert!(matcher.is_ok(), "{pattern}: {matcher:?}");
            }
            Err(error) => {
                let expected = if header { "rules[0].match.header_regex[\"x-user\"]" } else { "rules[0].match.path_regex" };
                prop_assert_eq!(error.field, expected, "{}", error.reason);
            }
        }
    }

    #[test]
    fn many_regexes_are_refused_past_the_budget(patterns in prop::collection::vec(pattern(), 1..12)) {
        let limits = Limits { header_rules: 8, regexes: 6, regex_bytes: 64 << 10 };
        let rules = patterns
            .iter()
            .map(|p| v1::RouteRule {
                r#match: Some(v1::RouteMatch { path_regex: p.clone(), ..Default::default() }),
                ..Default::default()
            })
            .collect();
        let route = v1::Route { service: "catalog".into(), rules, ..Default::default() };
        match validate::route_within(&route, &limits) {
            Ok(()) => {
                prop_assert!(patterns.iter().filter(|p| !p.is_empty()).count() <= limits.regexes);
                let bytes: usize = patterns
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| regex_automata::nfa::thompson::NFA::new(&format!("^(?:{p})$")).map_or(usize::MAX, |n| n.memory_usage()))
                    .fold(0usize, usize::saturating_add);
                prop_assert!(bytes <= limits.regex_bytes, "{bytes} bytes");
            }
            Err(error) => {
                let at = error.field.strip_suffix(".match.path_regex").and_then(|r| r.strip_prefix("rules["));
                prop_assert!(at.is_some(), "{error}");
            }
        }
    }
}

#[test]
fn the_places_of_the_templates_exist_and_the_templates_are_valid() {
    for (value, places) in templates() {
        for (pointer, _) in &places {
            assert!(value.pointer(pointer).is_some(), "{pointer}");
        }
        let resource = resource_from_value(value).expect("a template decodes");
        assert_eq!(validate::resource(&resource), Ok(()));
    }
    assert_eq!(top("rules[0].match.method"), "rules[0]");
    assert_eq!(top("subsets[\"v1\"].labels"), "subsets");
    assert_eq!(top("service"), "service");
}
