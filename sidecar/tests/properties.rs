//! Property tests of what the app, a peer or the host reaches in the sidecar: the destination
//! service of an outbound request (absolute-form URI, `:authority`, `Host`), the command line's
//! `HOST:PORT`, `--upstream` and `--meta` values, and the state file read back at start.

use std::time::{Duration, SystemTime};

use clap::Parser;
use ferry_proto::{v1, validate};
use ferry_sidecar::{
    config::{Config, HostPort, parse_host_port},
    outbound::target::{service_of, service_of_authority},
    state::{Saved, SavedTrust, StateDir},
};
use http::{Request, header};
use proptest::prelude::*;
use serde_json::Value;

fn service() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,20}[a-z0-9])?"
}

/// An authority as a client may write one: a service in one of its spellings, a port, case,
/// a trailing dot; or anything.
fn authority() -> impl Strategy<Value = String> {
    let spelled = (
        service(),
        prop_oneof![Just(""), Just(".ferry"), Just(".service.ferry"), Just(".example.com"), Just(".service.consul")],
        prop::option::of(prop_oneof![Just(String::new()), any::<u16>().prop_map(|p| p.to_string()), "[0-9]{6,30}"]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(name, suffix, port, upper, dot)| {
            let mut host = format!("{name}{suffix}{}", if dot { "." } else { "" });
            if upper {
                host = host.to_ascii_uppercase();
            }
            match port {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        });
    prop_oneof![spelled, ".{0,30}", "[a-z0-9.:\\[\\]@_-]{0,30}"]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime builds")
}

/// A state file as a sidecar writes it, as JSON.
fn saved_file() -> Value {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = StateDir::create(temp.path()).expect("creates");
    let endpoint = v1::Endpoint {
        id: "catalog-1".into(),
        address: "127.0.0.1".into(),
        port: 8080,
        health: v1::Health::Passing as i32,
        weight: 100,
        ..Default::default()
    };
    let services = vec![v1::ServiceResources {
        service: "catalog".into(),
        version: 7,
        exists: true,
        endpoints: Some(v1::service_resources::Endpoints::Snapshot(v1::Endpoints { endpoints: vec![endpoint] })),
        ..Default::default()
    }];
    let saved = Saved {
        saved_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        services,
        trust: SavedTrust::default(),
        addresses: None,
    };
    dir.write(&saved).expect("writes");
    serde_json::from_slice(&std::fs::read(dir.file()).expect("written")).expect("JSON")
}

/// Places in the state file a mutation may hit.
const STATE_PLACES: [&str; 8] = [
    "/format",
    "/saved_at",
    "/services",
    "/services/0",
    "/services/0/service",
    "/services/0/version",
    "/services/0/snapshot/endpoints/0/port",
    "/trust",
];

fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,16}".prop_map(Value::String),
        Just(serde_json::json!([])),
        Just(serde_json::json!({"x": 1})),
    ]
}

/// Reads `bytes` back as a state file.
fn read_state(bytes: &[u8]) -> (Result<Option<Saved>, ferry_sidecar::state::StateError>, String) {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = StateDir::create(temp.path()).expect("creates");
    std::fs::write(dir.file(), bytes).expect("writes");
    (runtime().block_on(dir.read()), dir.file().display().to_string())
}

proptest! {
    #[test]
    fn an_authority_names_a_valid_service_or_is_refused(authority in authority()) {
        match service_of_authority(&authority) {
            Ok(name) => {
                prop_assert_eq!(validate::service_name("service", &name), Ok(()));
                prop_assert!(authority.to_ascii_lowercase().starts_with(&name), "{authority} gave {name}");
            }
            Err(error) => {
                let text = error.to_string();
                prop_assert!(text.contains(&format!("{authority:?}")) || text.contains("names no destination"), "{text}");
            }
        }
    }

    #[test]
    fn every_spelling_of_a_service_resolves_to_it(
        name in service(),
        suffix in prop_oneof![Just(""), Just(".ferry"), Just(".service.ferry")],
        port in prop::option::of(any::<u16>()),
        upper in any::<bool>(),
        dot in any::<bool>(),
    ) {
        let mut authority = format!("{name}{suffix}{}", if dot { "." } else { "" });
        if upper {
            authority = authority.to_ascii_uppercase();
        }
        if let Some(port) = port {
            authority = format!("{authority}:{port}");
        }
        prop_assert_eq!(service_of_authority(&authority).ok(), Some(name));
    }

    #[test]
    fn the_absolute_form_wins_over_the_host_header(
        target in prop_oneof![authority(), Just(String::new())],
        path in "/[a-z0-9/?=&]{0,16}",
        host in prop::option::of(authority()),
    ) {
        let uri = if target.is_empty() { path.clone() } else { format!("http://{target}{path}") };
        let mut builder = Request::builder().uri(uri.as_str());
        if let Some(host) = &host {
            builder = builder.header(header::HOST, host.as_str());
        }
        let Ok(request) = builder.body(()) else { return Ok(()) };
        let found = service_of(&request).map_err(|e| e.to_string());
        let expected = match (request.uri().authority(), request.headers().get(header::HOST)) {
            (Some(authority), _) => service_of_authority(authority.as_str()).map_err(|e| e.to_string()),
            (None, Some(host)) => match host.to_str() {
                Ok(host) => service_of_authority(host).map_err(|e| e.to_string()),
                Err(_) => Err(ferry_sidecar::errors::NoDestination.to_string()),
            },
            (None, None) => Err(ferry_sidecar::errors::NoDestination.to_string()),
        };
        prop_assert_eq!(found, expected);
    }

    #[test]
    fn host_ports_are_valid_or_refused(text in prop_oneof![
        ".{0,30}",
        "[a-z0-9.:\\[\\]-]{0,30}",
        ("[a-z]{1,10}(\\.[a-z]{1,6})?", any::<u16>()).prop_map(|(h, p)| format!("{h}:{p}")),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| format!("[{}]:{p}", std::net::Ipv6Addr::from(ip))),
    ]) {
        if let Ok(HostPort { host, port }) = parse_host_port(&text) {
            prop_assert!(port != 0);
            prop_assert_eq!(validate::address("host", &host), Ok(()));
            let again = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            prop_assert_eq!(parse_host_port(&again), Ok(HostPort { host, port }));
        }
    }

    #[test]
    fn a_bad_flag_value_is_refused_naming_the_flag(
        flag in prop_oneof![
            Just("--upstream"),
            Just("--meta"),
            Just("--app"),
            Just("--check"),
            Just("--connect-timeout"),
            Just("--idle-timeout"),
            Just("--check-interval"),
            Just("--dns-ttl"),
        ],
        value in prop_oneof![
            ".{0,30}",
            "[0-9]{1,25}(ns|ms|s|m|h|d|years| )?",
            ("[a-z]{1,8}", "[0-9.:]{0,20}", prop::option::of(".{0,10}")).prop_map(|(n, a, o)| match o {
                Some(o) => format!("{n}={a},{o}"),
                None => format!("{n}={a}"),
            }),
        ],
    ) {
        // `--flag=VALUE`, so that a value starting with '-' is a value, not another flag.
        let argument = format!("{flag}={value}");
        let result = Config::try_parse_from(["ferry-sidecar", "--service", "catalog", argument.as_str()]);
        if let Err(error) = result {
            let text = error.to_string();
            prop_assert!(text.contains(flag), "{flag} {value:?}: {text}");
        }
    }
}

proptest! {
    // Each case writes a file; fewer of them keep the suite quick.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_state_file_is_read_or_refused_naming_it(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let (read, path) = read_state(&bytes);
        if let Err(error) = read {
            prop_assert!(error.to_string().contains(&path), "{error}");
        }
    }

    #[test]
    fn a_mutated_state_file_is_read_or_refused_naming_it(
        place in prop::sample::select(STATE_PLACES.to_vec()),
        replacement in any_json(),
    ) {
        let mut file = saved_file();
        *file.pointer_mut(place).expect("every place is in the file") = replacement;
        let (read, path) = read_state(&serde_json::to_vec(&file).expect("JSON prints"));
        if let Err(error) = read {
            prop_assert!(error.to_string().contains(&path), "{place} replaced, but the error says {error}");
        }
    }
}

/// Found by `a_mutated_state_file_is_read_or_refused_naming_it`: a value of the wrong type was
/// refused with serde's line and column alone (`invalid type: null, expected u32 at line 1
/// column 14`), so an operator had to count characters in a pretty-printed file to find it;
/// the error now gives the field's path.
#[test]
fn a_state_file_error_names_the_field() {
    let unnamed: Vec<String> = [
        ("/format", Value::Null, "format"),
        ("/saved_at", Value::from(5), "saved_at"),
        ("/services/0/service", Value::from(5), "service"),
        ("/services/0/snapshot/endpoints/0/port", Value::from("http"), "port"),
    ]
    .into_iter()
    .filter_map(|(place, replacement, field)| {
        let mut file = saved_file();
        *file.pointer_mut(place).expect("every place is in the file") = replacement;
        let (read, _) = read_state(&serde_json::to_vec(&file).expect("JSON prints"));
        let error = read.expect_err("a value of the wrong type").to_string();
        (!error.contains(field)).then(|| format!("{place}: {error}"))
    })
    .collect();
    assert!(unnamed.is_empty(), "errors that name no field:\n{}", unnamed.join("\n"));
}
