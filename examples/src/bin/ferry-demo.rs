//! `ferry-demo`: runs Ferry's three-service demo; see [`ferry_examples::demo`]. `ferry-demo app
//! NAME` runs one of its apps alone; see [`ferry_examples::standalone`].

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use ferry_examples::{
    demo::{self, process, scenario::Scenario},
    standalone::{self, AppArgs},
};

/// The long explanation `--help` prints after the options (`-h` leaves it out), so that the
/// usage line comes first.
const ABOUT_MORE: &str = r#"With --replicas 2 or more, the last catalog replica runs version v2, the others v1. The
routing scenarios of examples/routes/ change where catalog's traffic goes: apply one with
--scenario once traffic flows, or, when stdin is a terminal, by typing a key and Enter while
the demo runs: c canary, h header-canary, f fault, l lockdown, r reset (delete the routes and
catalog's authorization policy), ? help (with the sidecars' admin addresses), q quit. One
request in 5 carries `x-canary: true`.

The mesh runs with its secure defaults: the control plane authenticates every API call with
a token and serves TLS, and every sidecar holds a token of its own service and talks mTLS to
the others. The demo prints the two lines to paste (FERRY_TOKEN, FERRY_CA_FILE) to use
ferryctl against it. Once a second the client sidecar calls catalog directly, as a service
other than frontend would; the lockdown scenario's authorization policy refuses those calls.

The control plane listens on 127.0.0.1:7070 (gRPC), 7071 (HTTP) and 8600 (DNS), the client
sidecar on 127.0.0.1:15001 (admin 15000), each when it is free; when one is not, the demo
takes any free port and prints why, with the addresses the README's commands need instead.

The summary shows the routes in force at the control plane, read every second, whoever
applied them. Routes applied, changed or deleted outside the demo (with ferryctl or curl) are
not one of its scenarios: the summary says so ("route/catalog v12 applied outside the demo"),
and the verdict reports the requests sent under them, errors included, but never judges them
and never fails because of them: a route of your own may fail requests on purpose (ferryctl
apply -f examples/routes/fault.yaml), and only you know what it should do. Once the routes in
force are the demo's own again, or none at all (whoever deleted them), the verdict judges the
requests sent after every sidecar holds that, as below. If routes changed outside the demo
are still in force at the end, the run passes when every instance served traffic and no
process exited.

With --duration, the exit status judges the scenario the demo put in force and still in force
at the end, on the requests sent after it took effect (once every sidecar that calls the
service acknowledged it). In every case every instance must have served traffic and no
process may have exited; then:

  no scenario: no request failed.

  canary: no request failed, both catalog versions answered, and v2's share is within 4
  standard deviations (and at least 1 point) of the route's weight, 10%.

  header-canary: no request failed; every request with `x-canary: true` was answered by
  catalog v2 and every other one by v1.

  fault: injected aborts are expected, so failures alone do not fail the run. The share of
  frontend's calls to catalog that the mesh aborted must be within 4 standard deviations (and
  at least 1 point) of the route's 10%, and at least 95% of the requests through frontend must
  succeed, thanks to the client's retries.

  lockdown: no request through frontend failed, and every direct call from the client
  sidecar to catalog was refused with 403 forbidden (at least one was made).

`ferry-demo app inventory|catalog|frontend` runs one of the apps alone, calling the services
it depends on by their plain names, for a sidecar that intercepts its connections
(examples/intercept-demo.sh runs them so); see `ferry-demo app --help`."#;

/// Runs Ferry's demo: a control plane, the services frontend, catalog and inventory (2 replicas
/// each unless --replicas says otherwise) with a sidecar per instance, and traffic through them,
/// with a live summary. --help adds the scenarios, the keys and what the exit status judges.
#[derive(Debug, Parser)]
#[command(name = "ferry-demo", version, long_about = None, after_long_help = ABOUT_MORE)]
struct Args {
    /// Stop after this long (such as 10s) and exit 0 only if the traffic did what the scenario
    /// in force says (see `--help`).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,

    /// Apply this scenario of examples/routes/ through the control plane's Config API once
    /// traffic reaches every instance.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,

    /// Requests per second sent to frontend.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rate: u32,

    /// Instances of each service.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=5))]
    replicas: u64,
}

fn main() -> ExitCode {
    let argv = std::env::args_os().skip(1);
    match std::env::args().nth(1).as_deref() {
        Some(process::CONTROL_PLANE) => {
            process::exit_with_parent();
            return ferry_control_plane::main_with_args(std::iter::once("ferry-control-plane".into()).chain(argv.skip(1)));
        }
        Some(process::SIDECAR) => {
            process::exit_with_parent();
            return ferry_sidecar::main_with_args(std::iter::once("ferry-sidecar".into()).chain(argv.skip(1)));
        }
        Some("app") => {
            let argv = std::iter::once("ferry-demo app".into()).chain(argv.skip(1));
            return ferry_runtime::main(argv, |args: &AppArgs| args.log.clone(), standalone::run);
        }
        _ => {}
    }
    let args = match ferry_runtime::parse::<Args, _, _>(std::env::args_os()) {
        Ok(args) => args,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options =
        demo::Options { duration: args.duration, rate: args.rate, replicas: args.replicas as usize, scenario: args.scenario };
    match runtime.block_on(demo::run(options)) {
        // Its output was a pipe that closed (`ferry-demo | head`): stopped cleanly, as a program
        // killed by SIGPIPE would report it.
        _ if ferry_examples::demo::out::closed() => ExitCode::from(141),
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn help_shows_the_usage_first_and_the_long_explanation_after_the_options() {
        let short = Args::command().render_help().to_string();
        let before_usage = short.lines().take_while(|l| !l.starts_with("Usage:")).count();
        assert!(before_usage <= 5, "-h says what it is in a few lines, then the usage:\n{short}");
        assert!(short.lines().count() <= 30, "-h stays short:\n{short}");
        assert!(!short.contains("standard deviations"), "{short}");
        let long = Args::command().render_long_help().to_string();
        let before_usage = long.lines().take_while(|l| !l.starts_with("Usage:")).count();
        assert!(before_usage <= 5, "--help puts the usage first too:\n{long}");
        let (options, after) = long.split_once("standard deviations").expect("--help explains the verdict");
        assert!(options.contains("--duration") && after.contains("lockdown: "), "{long}");
        assert!(long.contains("\n  canary: no request failed"), "the scenarios stay indented:\n{long}");
    }
}
