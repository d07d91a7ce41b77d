//! Property tests of the check specs a sidecar's command line (`--check`) and the API give:
//! no panic on any input, bounded output, errors that name the option or field, and the
//! command-line form round-tripping through the API form.

use std::time::Duration;

use ferry_health::spec::{CheckSpec, Probe};
use ferry_proto::{types, v1, validate};
use proptest::prelude::*;

const INTERVAL: Duration = Duration::from_secs(10);

/// The options `--check` takes, and the words an error about each must contain.
const OPTIONS: [(&str, &str); 5] =
    [("interval", "interval"), ("timeout", "timeout"), ("success", "success"), ("failure", "failure"), ("expect", "expect")];

fn head() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[a-z0-9/]{0,12}".prop_map(|path| format!("http:{path}")),
        ("[a-z]{1,8}", 1u16..).prop_map(|(host, port)| format!("http:http://{host}:{port}/healthz")),
        Just("tcp".to_owned()),
        ("[a-z]{1,8}", 1u16..).prop_map(|(host, port)| format!("tcp:{host}:{port}")),
        Just("grpc".to_owned()),
        "[a-z.]{1,16}".prop_map(|service| format!("grpc:{service}")),
        "/[a-z/]{1,12}( -[a-z]{1,4}){0,3}".prop_map(|command| format!("script:{command}")),
        (1u64..86_400).prop_map(|secs| format!("ttl:{secs}s")),
    ]
}

/// A value for an option: valid, of the wrong kind, out of range, or huge.
fn option_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..100_000).prop_map(|ms| format!("{ms}ms")),
        (0u32..1000).prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        Just("99999999999999999999999h".to_owned()),
        ".{0,12}",
    ]
}

fn proto_duration() -> impl Strategy<Value = Option<types::Duration>> {
    prop::option::of(prop_oneof![
        (0i64..100_000, 0i32..1_000_000_000).prop_map(|(seconds, nanos)| types::Duration { seconds, nanos }),
        (any::<i64>(), any::<i32>()).prop_map(|(seconds, nanos)| types::Duration { seconds, nanos }),
    ])
}

fn any_check() -> impl Strategy<Value = v1::Check> {
    use v1::check::Probe as P;
    let probe = prop_oneof![
        Just(None),
        (".{0,40}", any::<u32>()).prop_map(|(url, expected_status)| Some(P::Http(v1::HttpProbe { url, expected_status }))),
        ".{0,24}".prop_map(|address| Some(P::Tcp(v1::TcpProbe { address }))),
        (".{0,24}", ".{0,300}").prop_map(|(address, service)| Some(P::Grpc(v1::GrpcProbe { address, service }))),
        prop::collection::vec(".{0,8}", 0..70).prop_map(|args| Some(P::Script(v1::ScriptProbe { args }))),
        proto_duration().prop_map(|ttl| Some(P::Ttl(v1::TtlProbe { ttl }))),
    ];
    (probe, proto_duration(), proto_duration(), 0u32..20, 0u32..20, prop_oneof![Just(String::new()), ".{0,140}"]).prop_map(
        |(probe, interval, timeout, success_threshold, failure_threshold, id)| v1::Check {
            id,
            probe,
            interval,
            timeout,
            success_threshold,
            failure_threshold,
            ..Default::default()
        },
    )
}

/// The fields of `v1::Check` an error may name.
const CHECK_FIELDS: [&str; 13] = [
    "id",
    "probe",
    "http.url",
    "http.expected_status",
    "tcp.address",
    "grpc.address",
    "grpc.service",
    "script.args",
    "ttl.ttl",
    "interval",
    "timeout",
    "success_threshold",
    "failure_threshold",
];

proptest! {
    #[test]
    fn any_text_is_a_check_or_an_error(text in prop_oneof![".{0,64}", "[a-z:/,=0-9. ]{0,64}"]) {
        if let Ok(spec) = CheckSpec::parse(&text, INTERVAL) {
            prop_assert_eq!(validate::check(&spec.to_proto()), Ok(()));
            prop_assert!(spec.timeout <= spec.interval);
            if let Probe::Script { args } = &spec.probe {
                prop_assert!(args.len() <= text.len() / 2 + 1);
            }
        }
    }

    #[test]
    fn a_bad_option_is_named_in_the_error(head in head(), option in 0..OPTIONS.len(), value in option_value()) {
        let (key, words) = OPTIONS[option];
        let text = format!("{head},{key}={value}");
        if let Err(error) = CheckSpec::parse(&text, INTERVAL) {
            prop_assert!(error.contains(words), "{text}: {error}");
        }
    }

    #[test]
    fn valid_command_line_checks_round_trip_through_the_api_form(
        head in head(),
        interval_ms in 100u64..100_000,
        timeout_percent in 1u64..=100,
        success in 1u32..=10,
        failure in 1u32..=10,
    ) {
        let timeout_ms = (interval_ms * timeout_percent / 100).max(1);
        let text = format!("{head},interval={interval_ms}ms,timeout={timeout_ms}ms,success={success},failure={failure}");
        let spec = CheckSpec::parse(&text, INTERVAL);
        prop_assert!(spec.is_ok(), "{text}: {spec:?}");
        let spec = CheckSpec { id: "web-1:check".into(), ..spec.expect("checked above") };
        prop_assert_eq!(CheckSpec::try_from(&spec.to_proto()), Ok(spec));
    }

    #[test]
    fn accepted_thresholds_survive_the_api_form(head in head(), key in prop_oneof![Just("success"), Just("failure")], n in 0u32..=12) {
        let text = format!("{head},{key}={n}");
        if let Ok(spec) = CheckSpec::parse(&text, INTERVAL) {
            let spec = CheckSpec { id: "web-1:check".into(), ..spec };
            prop_assert_eq!(CheckSpec::try_from(&spec.to_proto()), Ok(spec), "{}", text);
        }
    }

    #[test]
    fn any_api_check_is_a_spec_or_names_its_field(check in any_check()) {
        match CheckSpec::try_from(&check) {
            Ok(spec) => {
                prop_assert!(spec.timeout <= spec.interval);
                prop_assert!((1..=10).contains(&spec.success_threshold) && (1..=10).contains(&spec.failure_threshold));
                prop_assert_eq!(CheckSpec::try_from(&spec.to_proto()), Ok(spec));
            }
            Err(error) => prop_assert!(CHECK_FIELDS.contains(&error.field.as_str()), "{error}"),
        }
    }
}
