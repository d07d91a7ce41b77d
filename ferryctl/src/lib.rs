//! `ferryctl`: the command line over the control plane's gRPC API.
//!
//! Tables for people by default, `-o json` or `-o yaml` (the proto3 JSON mapping) for scripts.
//! Input is validated here with the same rules as the server, so mistakes are caught before a
//! round trip. Every call goes over TLS, verified with `--ca-file`, and carries `--token`.
//!
//! It is built on the protocol crate and leaf crates (`ferry-proto`, `ferry-tls`, `ferry-health`,
//! `ferry-runtime`), never on the control-plane server, so none of the server (its store above
//! all) is linked into the CLI.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::anyhow;
use clap::{Parser, Subcommand, ValueEnum};
use ferry_proto::{
    types::Timestamp,
    v1::{self, discovery_client::DiscoveryClient, registry_client::RegistryClient},
    validate,
};
use ferry_runtime::short::{VersionRef, Versions};
use ferry_tls::api::{ApiChannel, ControlPlaneUrls};
use serde::Serialize;

mod control_plane;
mod explain;
mod out;
mod routing;
mod security;
mod table;
mod top;

use self::{control_plane::ControlPlane, routing::KindArg, table::Table};

/// Ferry's command line: inspect and change the mesh through the control plane.
#[derive(Debug, Parser)]
#[command(name = "ferryctl", version)]
pub struct Cli {
    /// The control plane's gRPC address (`http://` for one started with --api-tls off); for
    /// several replicas, their URLs separated by commas. Each address is tried in turn (a host
    /// name that resolves to several addresses counts as several) until one answers.
    #[arg(long, env = "FERRY_CONTROL_PLANE", default_value = "https://127.0.0.1:7070", global = true, value_parser = ControlPlaneUrls::parse, value_name = "URL[,URL...]")]
    pub control_plane: ControlPlaneUrls,

    /// The API token (an admin or read token; the admin token of a new control plane is in
    /// <data-dir>/admin.token).
    #[arg(long, env = "FERRY_TOKEN", global = true, hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,

    /// The roots that verify the control plane's certificate: the ca.pem it writes in its data
    /// directory.
    #[arg(long, env = "FERRY_CA_FILE", global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Output format.
    #[arg(short, long, env = "FERRY_OUTPUT", value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

/// What `ferryctl check` reports of a TTL check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckStatusArg {
    /// Passing: the instance takes traffic.
    Pass,
    /// Warning: it still takes traffic.
    Warn,
    /// Critical: it takes none.
    Fail,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// List services with their instance counts.
    Services,
    /// List a service's instances with their health.
    Instances {
        /// The service to list.
        service: String,
        /// Only instances that can take traffic.
        #[arg(long)]
        passing: bool,
        /// Only instances with this metadata label; repeat for more.
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        metadata: Vec<(String, String)>,
        /// Only instances in this zone.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Register a persistent instance (one no sidecar owns, such as a database).
    Register {
        /// The service the instance belongs to.
        #[arg(long)]
        service: String,
        /// The IP address or host name peers connect to.
        #[arg(long)]
        address: String,
        /// The port peers connect to.
        #[arg(long)]
        port: u32,
        /// The instance id; defaults to SERVICE-ADDRESS-PORT.
        #[arg(long)]
        id: Option<String>,
        /// A metadata label such as version=v2; repeat for more.
        #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        metadata: Vec<(String, String)>,
        /// The region of the instance.
        #[arg(long)]
        region: Option<String>,
        /// The zone of the instance.
        #[arg(long)]
        zone: Option<String>,
        /// Relative load-balancing weight, 1 to 10000 (default 100).
        #[arg(long)]
        weight: Option<u32>,
        /// A health check the control plane runs: http://HOST:PORT/PATH, tcp://HOST:PORT,
        /// grpc://HOST:PORT[/SERVICE], ttl:30s, or script:COMMAND ARGS...; repeat for more.
        #[arg(long = "check", value_name = "CHECK", value_parser = parse_check)]
        checks: Vec<v1::Check>,
        /// Time between probes of every check given [default: 10s].
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        interval: Option<Duration>,
        /// Remove the instance once it has been critical this long [default: never].
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        deregister_critical_after: Option<Duration>,
    },
    /// Renew a TTL check (one registered with --check ttl:DURATION): report it passing,
    /// warning or failing, with a note, until its TTL runs out again.
    Check {
        /// pass, warn or fail.
        status: CheckStatusArg,
        /// The check's id, such as db-1:ttl (`ferryctl instances SERVICE` lists them).
        check_id: String,
        /// The check's output, such as why it fails (at most 4096 bytes) [default: none].
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Remove an instance by id.
    Deregister {
        /// The instance's id.
        id: String,
        /// Remove an instance its sidecar registered too (it is out of the mesh until that
        /// sidecar reconnects; drain the sidecar instead to take it out for good).
        #[arg(long)]
        force: bool,
    },
    /// Show connected sidecars, the versions they acknowledged, and any rejected push; then,
    /// for every route and policy, which sidecars run its current version, which have yet to,
    /// and which rejected it and why.
    Status,
    /// Apply Route, ServicePolicy and AuthorizationPolicy resources from multi-document YAML
    /// (or JSON), all or none. A document that is a list of resources, such as what
    /// `ferryctl get -o json` prints, counts as those resources.
    Apply {
        /// The file to read, or - for standard input.
        #[arg(short = 'f', long = "filename", value_name = "FILE|-")]
        file: String,
        /// Validate on the server and print what would change, without applying.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show routes, policies or authorization policies, of one service or all.
    Get {
        /// route, policy or authorization (each plural works too: routes, policies,
        /// authorizations).
        kind: KindArg,
        /// Only this service's.
        service: Option<String>,
    },
    /// Delete a service's route, policy or authorization policy.
    Delete {
        /// route, policy or authorization.
        kind: KindArg,
        /// The service.
        service: String,
        /// Fail unless the resource is at this version: whole, or its last digits as tables show
        /// them (…938275).
        #[arg(long, value_name = "VERSION", value_parser = VersionRef::parse)]
        expected_version: Option<VersionRef>,
    },
    /// The versions kept of a service's route, policy or authorization policy (the last 10),
    /// newest first.
    History {
        /// route, policy or authorization.
        kind: KindArg,
        /// The service.
        service: String,
    },
    /// Apply an earlier version of a route, policy or authorization policy again (the one
    /// before the current by default). Fails if it changed meanwhile.
    Rollback {
        /// route, policy or authorization.
        kind: KindArg,
        /// The service.
        service: String,
        /// The version to return to, from `ferryctl history`: whole, or its last digits as the
        /// table shows them (…938275).
        #[arg(long, value_name = "VERSION", value_parser = VersionRef::parse)]
        to: Option<VersionRef>,
    },
    /// Ask a sidecar how it would route a request: the rule that matches, the backends and
    /// subsets it picks from, the timeout and retries, from the config it holds. With --from,
    /// whether the service's authorization policy lets that caller make the request, and which
    /// rule decides.
    Explain {
        /// The service the request is for.
        service: String,
        /// The request's path, with its query if any.
        #[arg(long, default_value = "/")]
        path: String,
        /// The request's method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, NAME=VALUE or NAME:VALUE; repeat for more.
        #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// The request's host (for a gateway's routes).
        #[arg(long)]
        host: Option<String>,
        /// The sidecar's admin listener.
        #[arg(long, env = "FERRY_SIDECAR_ADMIN", default_value = "127.0.0.1:15000", value_name = "ADDR")]
        sidecar: String,
        /// The calling service: explain the authorization decision for it instead.
        #[arg(long, value_name = "SERVICE")]
        from: Option<String>,
    },
    /// Make, list and revoke API tokens.
    #[command(subcommand)]
    Token(security::TokenCommand),
    /// The mesh's certificate authority: its trust bundle and its rotation.
    #[command(subcommand)]
    Ca(security::CaCommand),
    /// Live traffic of the last minute: requests per second, success rate and p50/p99 latency
    /// per service (in and out) and per caller → destination edge, from the sidecars' reports.
    Top {
        /// Reprint every 2 s until Ctrl-C.
        #[arg(short, long)]
        watch: bool,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once(['=', ':']).ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

/// Parses `--check`: an HTTP URL, `tcp://HOST:PORT`, `grpc://HOST:PORT[/SERVICE]`, `ttl:30s` or
/// `script:COMMAND ARGS...`.
fn parse_check(s: &str) -> Result<v1::Check, String> {
    use v1::check::Probe;
    let probe = if s.starts_with("http://") || s.starts_with("https://") {
        Probe::Http(v1::HttpProbe { url: s.to_owned(), expected_status: 0 })
    } else if let Some(address) = s.strip_prefix("tcp://") {
        Probe::Tcp(v1::TcpProbe { address: address.to_owned() })
    } else if let Some(rest) = s.strip_prefix("grpc://") {
        let (address, service) = rest.split_once('/').unwrap_or((rest, ""));
        Probe::Grpc(v1::GrpcProbe { address: address.to_owned(), service: service.to_owned() })
    } else if let Some(ttl) = s.strip_prefix("ttl:") {
        let ttl = humantime::parse_duration(ttl).map_err(|e| format!("ttl {ttl:?}: {e}"))?;
        Probe::Ttl(v1::TtlProbe { ttl: Some(ferry_health::spec::proto_duration(ttl)) })
    } else if let Some(command) = s.strip_prefix("script:") {
        Probe::Script(v1::ScriptProbe { args: command.split_whitespace().map(str::to_owned).collect() })
    } else {
        return Err(
            "expected http://HOST:PORT/PATH, tcp://HOST:PORT, grpc://HOST:PORT[/SERVICE], ttl:DURATION or script:COMMAND".into(),
        );
    };
    let check = v1::Check { probe: Some(probe), ..Default::default() };
    validate::check(&check).map_err(|e| e.to_string())?;
    Ok(check)
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// The longest note `ferryctl check` sends, as the control plane takes it.
const MAX_CHECK_NOTE_BYTES: usize = 4096;

/// An error from the user's input rather than from the control plane.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Runs `ferryctl` with the process arguments.
pub fn main() -> ExitCode {
    let cli = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let token_given = cli.token.as_ref().is_some_and(|t| !t.trim().is_empty());
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            out::stderr(&format!("error: starting the runtime: {error}\n"));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Top { watch: true } => runtime.block_on(top::watch(&cli)).map(|()| String::new()),
        _ => runtime.block_on(run(cli)),
    };
    let result = result.and_then(|text| out::stdout(&text));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): it wanted no more, and there is nobody to tell.
        Err(error) if error.is::<out::StdoutClosed>() => ExitCode::from(out::EXIT_STDOUT_CLOSED),
        Err(error) if error.is::<UsageError>() => {
            out::stderr(&format!("error: {error}\n"));
            ExitCode::from(ferry_runtime::EXIT_USAGE)
        }
        Err(error) if error.is::<ShownFailure>() => {
            if let Some(failure) = error.downcast_ref::<ShownFailure>()
                && let Err(closed) = out::stdout(&failure.shown)
                && closed.is::<out::StdoutClosed>()
            {
                return ExitCode::from(out::EXIT_STDOUT_CLOSED);
            }
            out::stderr(&format!("error: {error}\n"));
            ExitCode::FAILURE
        }
        Err(error) => {
            let mut text = error_text(&error);
            if !token_given && error.downcast_ref::<tonic::Status>().is_some_and(|s| s.code() == tonic::Code::Unauthenticated) {
                text.push_str(" (no token was given: pass --token or set FERRY_TOKEN)");
            }
            out::stderr(&format!("error: {text}\n"));
            ExitCode::FAILURE
        }
    }
}

/// The flags whose value may come from the environment.
const FROM_ENV: [&str; 4] = ["control_plane", "token", "ca_file", "output"];

/// Parses the command line as [`ferry_runtime::parse`] does, but with usage errors that do not
/// blame what the environment set: clap counts a flag set through its variable (FERRY_TOKEN) as
/// given, and lists it in the usage line of an error (`Usage: ferryctl token create --kind
/// <KIND> --token <TOKEN> --ca-file <FILE>`), which reads as if it were required. The error is
/// told again from a parse that ignores the environment, when that parse fails the same way.
fn parse(args: Vec<std::ffi::OsString>) -> Result<Cli, ExitCode> {
    try_parse(args).map_err(|error| {
        let _ = error.print();
        if error.use_stderr() { ExitCode::from(ferry_runtime::EXIT_USAGE) } else { ExitCode::SUCCESS }
    })
}

/// [`parse`] without the printing: the command, or the error (or help) to show.
fn try_parse(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let error = match Cli::command().try_get_matches_from(&args).and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => return Ok(cli),
        Err(error) => error,
    };
    let mut without_env = Cli::command();
    for id in FROM_ENV {
        without_env = without_env.mut_arg(id, |arg| arg.env(None));
    }
    // Help and version are no errors, and their text shows the variables.
    Err(match without_env.try_get_matches_from(&args) {
        Err(plain) if error.use_stderr() && plain.kind() == error.kind() => plain,
        _ => error,
    })
}

/// An error in one line: a refusal of the control plane in its own words, any other with its
/// causes.
fn error_text(error: &anyhow::Error) -> String {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => status_text(status),
        None => ferry_runtime::error_chain(error.as_ref()),
    }
}

/// A command whose answer is worth showing but means failure, such as `explain` of a request
/// that would fail: `shown` is printed, then the error, and the exit status is 1.
#[derive(Debug, thiserror::Error)]
#[error("{why}")]
pub struct ShownFailure {
    pub shown: String,
    pub why: String,
}

/// What to say of `service` when the mesh has no such service: that, and the closest name.
pub fn no_such_service<'a>(service: &str, names: impl IntoIterator<Item = &'a str>) -> String {
    match ferry_runtime::suggest::closest(service, names) {
        Some(name) => format!("there is no service {service:?} in the mesh; did you mean {name:?}?"),
        None => format!("there is no service {service:?} in the mesh (`ferryctl services` lists them)"),
    }
}

/// The names of the mesh's services (those with an instance registered).
async fn service_names(api: &ControlPlane) -> anyhow::Result<Vec<String>> {
    let response = registry(api).await?.list_services(v1::ListServicesRequest {}).await?.into_inner();
    Ok(response.services.into_iter().map(|s| s.name).collect())
}

/// The TTL checks of the instance whose id is `id`, when there is one (an instance id given
/// where a check id was meant); best effort, over at most 256 services.
async fn instance_checks(api: &ControlPlane, id: &str) -> Option<Vec<String>> {
    let mut registry = registry(api).await.ok()?;
    let services = registry.list_services(v1::ListServicesRequest {}).await.ok()?.into_inner().services;
    for service in services.into_iter().take(256) {
        let request = v1::ListInstancesRequest { service: service.name, ..Default::default() };
        let Ok(response) = registry.list_instances(request).await else { continue };
        if let Some(instance) = response.into_inner().instances.into_iter().find(|i| i.id == id) {
            let ttl = instance.checks.into_iter().filter(|c| matches!(c.probe, Some(v1::check::Probe::Ttl(_))));
            return Some(ttl.map(|c| c.id).collect());
        }
    }
    None
}

/// Fails, naming the closest service, when `service` is not a service of the mesh.
pub(crate) async fn known_service(api: &ControlPlane, service: &str) -> anyhow::Result<()> {
    let names = service_names(api).await?;
    if names.iter().any(|name| name == service) {
        return Ok(());
    }
    Err(anyhow!(no_such_service(service, names.iter().map(String::as_str))))
}

/// Runs one command and returns what to print: on the first address of `--control-plane` that
/// can serve it.
pub async fn run(cli: Cli) -> anyhow::Result<String> {
    let output = cli.output;
    let api = cli.control_plane()?;
    // Read before the first attempt: standard input can be read only once.
    let input = match &cli.command {
        Command::Apply { file, .. } => Some(routing::Input::read(file)?),
        _ => None,
    };
    loop {
        match execute(cli.command.clone(), output, &api, input.as_ref()).await {
            Ok(text) => return Ok(text),
            Err(error) => api.failed(error).await?,
        }
    }
}

/// Runs one command on the address of the control plane in use.
async fn execute(command: Command, output: Output, api: &ControlPlane, input: Option<&routing::Input>) -> anyhow::Result<String> {
    match command {
        Command::Services => {
            let response = registry(api).await?.list_services(v1::ListServicesRequest {}).await?.into_inner();
            render(output, &response, services_table)
        }
        Command::Instances { service, passing, metadata, zone } => {
            validate::service_name("SERVICE", &service).map_err(|e| UsageError(e.to_string()))?;
            let request = v1::ListInstancesRequest {
                service,
                passing_only: passing,
                metadata: metadata.into_iter().collect(),
                zone: zone.unwrap_or_default(),
            };
            let service = request.service.clone();
            let response = match registry(api).await?.list_instances(request).await {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    known_service(api, &service).await?;
                    return Err(status.into());
                }
                Err(status) => return Err(status.into()),
            };
            render(output, &response, instances_table)
        }
        Command::Register {
            service,
            address,
            port,
            id,
            metadata,
            region,
            zone,
            weight,
            mut checks,
            interval,
            deregister_critical_after,
        } => {
            if let Some(interval) = interval {
                for check in &mut checks {
                    check.interval = Some(ferry_health::spec::proto_duration(interval));
                }
            }
            let instance = v1::Instance {
                checks,
                deregister_critical_after: deregister_critical_after.map(ferry_health::spec::proto_duration),
                id: id.unwrap_or_default(),
                service,
                address,
                port,
                metadata: metadata.into_iter().collect(),
                region: region.unwrap_or_default(),
                zone: zone.unwrap_or_default(),
                weight: weight.unwrap_or_default(),
                ..Default::default()
            };
            validate::instance(&instance).map_err(|e| {
                // Name the flag: checks[0].interval is --interval, port is --port.
                let field = e.field.rsplit('.').next().unwrap_or(&e.field).replace('_', "-");
                UsageError(format!("--{field}: {} ({})", e.reason, e.field))
            })?;
            let response = registry(api).await?.register(v1::RegisterRequest { instance: Some(instance) }).await?.into_inner();
            render(output, &response, |r| {
                let i = r.instance.clone().unwrap_or_default();
                let mut text = format!("registered {} ({}:{}) in service {}\n", i.id, i.address, i.port, i.service);
                for check in i.checks.iter().filter(|c| matches!(c.probe, Some(v1::check::Probe::Ttl(_)))) {
                    text.push_str(&format!("renew it with: ferryctl check pass {}\n", check.id));
                }
                text
            })
        }
        Command::Check { status, check_id, note } => {
            validate::instance_id("CHECK_ID", &check_id).map_err(|e| UsageError(e.to_string()))?;
            let note = note.unwrap_or_default();
            if note.len() > MAX_CHECK_NOTE_BYTES {
                return Err(
                    UsageError(format!("--note: must be at most {MAX_CHECK_NOTE_BYTES} bytes, not {}", note.len())).into()
                );
            }
            let health = match status {
                CheckStatusArg::Pass => v1::Health::Passing,
                CheckStatusArg::Warn => v1::Health::Warning,
                CheckStatusArg::Fail => v1::Health::Critical,
            };
            let request = v1::UpdateTtlRequest { check_id: check_id.clone(), status: health as i32, output: note };
            let response = match registry(api).await?.update_ttl(request).await {
                Ok(response) => response.into_inner(),
                // Another replica may serve it.
                Err(status) if status.code() == tonic::Code::Unavailable => return Err(status.into()),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    let hint = match instance_checks(api, &check_id).await {
                        Some(checks) if checks.is_empty() => format!("; {check_id:?} is an instance, with no TTL check"),
                        Some(checks) => format!("; {check_id:?} is an instance: its TTL check is {}", checks.join(" or ")),
                        None => String::new(),
                    };
                    return Err(anyhow!("check {check_id:?}: {}{hint}", status_text(&status)));
                }
                Err(status) => return Err(anyhow!("check {check_id:?}: {}", status_text(&status))),
            };
            render(output, &response, |r| {
                let check = r.check.clone().unwrap_or_default();
                let id = if check.id.is_empty() { check_id.clone() } else { check.id };
                let output = check.output.lines().next().map(|l| format!(": {l}")).unwrap_or_default();
                format!("check {id} is {}{output}\n", ferry_health::check_status_label(check.status))
            })
        }
        Command::Deregister { id, force } => {
            validate::instance_id("ID", &id).map_err(|e| UsageError(e.to_string()))?;
            let response = registry(api).await?.deregister(v1::DeregisterRequest { id, force }).await?.into_inner();
            render(output, &response, |r| {
                let i = r.instance.clone().unwrap_or_default();
                format!("deregistered {} from service {}\n", i.id, i.service)
            })
        }
        Command::Status => {
            let channel = connect(api).await?;
            let response = DiscoveryClient::new(channel.clone()).list_sidecars(v1::ListSidecarsRequest {}).await?.into_inner();
            let rollouts = routing::rollouts(channel.clone(), &response).await?;
            let set_aside = match RegistryClient::new(channel).list_set_aside(v1::ListSetAsideRequest {}).await {
                Ok(response) => response.into_inner().rows,
                // A control plane of an earlier build sets nothing aside.
                Err(status) if status.code() == tonic::Code::Unimplemented => Vec::new(),
                Err(status) => return Err(status.into()),
            };
            match output {
                Output::Table => {
                    // One short form per version across the whole answer.
                    let versions = Versions::new(
                        response
                            .sidecars
                            .iter()
                            .flat_map(|s| s.subscriptions.iter().flat_map(|s| [s.acked_version, s.current_version]))
                            .chain(rollouts.iter().map(|r| r.version)),
                    );
                    Ok(status_table(&response, &versions)
                        + &routing::rollouts_text(&rollouts, &versions)
                        + &set_aside_text(&set_aside))
                }
                _ => encode(
                    output,
                    &serde_json::json!({ "sidecars": response.sidecars, "resources": rollouts, "set_aside": set_aside }),
                ),
            }
        }
        Command::Apply { file, dry_run } => {
            let input = match input {
                Some(input) => input.clone(),
                None => routing::Input::read(&file)?,
            };
            routing::apply(api, output, &input, dry_run).await
        }
        Command::Get { kind, service } => routing::get(api, output, kind, service).await,
        Command::Delete { kind, service, expected_version } => {
            routing::delete(api, output, kind, service, expected_version).await
        }
        Command::History { kind, service } => routing::history(api, output, kind, service).await,
        Command::Rollback { kind, service, to } => routing::rollback(api, output, kind, service, to).await,
        Command::Explain { service, path, method, headers, host, sidecar, from } => {
            validate::service_name("SERVICE", &service).map_err(|e| UsageError(e.to_string()))?;
            let question = explain::Question { service, path, method, headers, host, sidecar };
            match from {
                Some(caller) => {
                    validate::service_name("--from", &caller).map_err(|e| UsageError(e.to_string()))?;
                    explain::authorization(question, &caller, output, api).await
                }
                None => explain::explain(question, output, api).await,
            }
        }
        Command::Token(command) => security::token(api, output, command).await,
        Command::Ca(command) => security::ca(api, output, command).await,
        Command::Top { .. } => top::top(api, output).await,
    }
}

impl Cli {
    /// How to reach the control plane, from the flags.
    fn control_plane(&self) -> Result<ControlPlane, UsageError> {
        let ca_pem = match &self.ca_file {
            Some(path) => {
                Some(std::fs::read_to_string(path).map_err(|e| UsageError(format!("--ca-file {}: {e}", path.display())))?)
            }
            None => None,
        };
        let token = self.token.clone().filter(|t| !t.trim().is_empty());
        Ok(ControlPlane::new(self.control_plane.clone(), ca_pem, token))
    }
}

/// A refusal from the control plane, in its own words: the message already says what is wrong
/// and where, so the code is only named where it adds something.
fn status_text(status: &tonic::Status) -> String {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
            status.message().to_owned()
        }
        Code::Unavailable => format!("the control plane is unavailable: {}", status.message()),
        Code::Unauthenticated => format!("not authenticated: {}", status.message()),
        Code::PermissionDenied => format!("permission denied: {}", status.message()),
        Code::DeadlineExceeded => format!("the control plane did not answer in time: {}", status.message()),
        // Said by whatever answered where a method is not served: its message says what it is.
        Code::Unimplemented if !status.message().is_empty() => status.message().to_owned(),
        code => format!("{}: {}", code.description(), status.message()),
    }
}

pub(crate) async fn connect(api: &ControlPlane) -> anyhow::Result<ApiChannel> {
    api.connect().await
}

async fn registry(api: &ControlPlane) -> anyhow::Result<RegistryClient<ApiChannel>> {
    Ok(RegistryClient::new(connect(api).await?))
}

fn render<T: Serialize>(output: Output, value: &T, table: impl Fn(&T) -> String) -> anyhow::Result<String> {
    match output {
        Output::Table => Ok(table(value)),
        _ => encode(output, value),
    }
}

/// `value` as JSON or YAML (a table is the caller's business).
fn encode<T: Serialize>(output: Output, value: &T) -> anyhow::Result<String> {
    match output {
        Output::Yaml => serde_yaml_ng::to_string(value).map_err(|e| anyhow!("encoding YAML: {e}")),
        _ => Ok(serde_json::to_string_pretty(value).map_err(|e| anyhow!("encoding JSON: {e}"))? + "\n"),
    }
}

fn health_label(health: i32) -> &'static str {
    ferry_health::Health::try_from(health).map_or("unknown", |h| h.as_str())
}

fn ago(timestamp: Option<&Timestamp>) -> String {
    let Some(ts) = timestamp else { return "-".into() };
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(ts.seconds).unwrap_or(0));
    match SystemTime::now().duration_since(then) {
        Ok(elapsed) => format!("{} ago", humantime::format_duration(std::time::Duration::from_secs(elapsed.as_secs()))),
        Err(_) => "just now".into(),
    }
}

fn services_table(response: &v1::ListServicesResponse) -> String {
    // Columns added later go last, so scripts that read columns by position keep working.
    let mut table = Table::new(&["SERVICE", "INSTANCES", "PASSING", "INDEX", "VIRTUAL IP"]);
    let indexes = Versions::new(response.services.iter().map(|s| s.index));
    for s in &response.services {
        let virtual_ip = if s.virtual_ip.is_empty() { "-".to_owned() } else { s.virtual_ip.clone() };
        table.row(vec![s.name.clone(), s.instances.to_string(), s.passing.to_string(), indexes.show(s.index), virtual_ip]);
    }
    table.render()
}

fn instances_table(response: &v1::ListInstancesResponse) -> String {
    let mut table = Table::new(&["ID", "ADDRESS", "HEALTH", "ORIGIN", "ZONE", "WEIGHT", "METADATA"]);
    for i in &response.instances {
        let origin = match v1::Origin::try_from(i.origin) {
            Ok(v1::Origin::Sidecar) => format!("sidecar {}", i.node_id),
            Ok(v1::Origin::Api) => "api".into(),
            _ => "unknown".into(),
        };
        let metadata: BTreeMap<_, _> = i.metadata.iter().collect();
        let metadata = metadata.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let zone = [i.region.as_str(), i.zone.as_str()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join("/");
        table.row(vec![
            i.id.clone(),
            format!("{}:{}", i.address, i.port),
            health_label(i.health).into(),
            origin,
            if zone.is_empty() { "-".into() } else { zone },
            i.weight.to_string(),
            if metadata.is_empty() { "-".into() } else { metadata },
        ]);
    }
    let mut out = table.render();
    let checks: Vec<_> = response.instances.iter().flat_map(|i| i.checks.iter().map(move |c| (i, c))).collect();
    if !checks.is_empty() {
        let mut table = Table::new(&["CHECK", "KIND", "STATUS", "SINCE", "OUTPUT"]);
        for (_, check) in checks {
            let kind = check.probe.as_ref().map_or("-", v1::check::Probe::kind);
            let mut output: String = check.output.lines().next().unwrap_or_default().chars().take(80).collect();
            if output.is_empty() {
                output = "-".into();
            }
            table.row(vec![
                check.id.clone(),
                kind.into(),
                ferry_health::check_status_label(check.status).into(),
                ago(check.last_transition.as_ref()),
                output,
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

/// The stored rows the control plane set aside at start-up, when there are any.
fn set_aside_text(rows: &[v1::SetAsideRow]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&["TABLE", "KEY", "SET ASIDE", "BYTES", "REASON"]);
    for row in rows {
        table.row(vec![
            row.table.clone(),
            row.key.clone(),
            ago(row.set_aside_at.as_ref()),
            row.bytes.to_string(),
            row.reason.clone(),
        ]);
    }
    let count = if rows.len() == 1 { "1 stored row".to_owned() } else { format!("{} stored rows", rows.len()) };
    format!(
        "\n{count} could not be read when the control plane started: each was set aside (kept in the store, not \
         loaded) so that the rest loaded. Write a fixed one again through the API.\n{}",
        table.render()
    )
}

fn status_table(response: &v1::ListSidecarsResponse, versions: &Versions) -> String {
    if response.sidecars.is_empty() {
        return "no sidecars connected\n".into();
    }
    // Replicas on a shared store each hold some of the streams: say which.
    let replicas = response.sidecars.iter().any(|s| !s.replica.is_empty());
    let mut table = if replicas {
        Table::new(&["NODE", "REPLICA", "SERVICE", "CONNECTED", "SUBSCRIPTION", "ACKED", "CURRENT", "STATE"])
    } else {
        Table::new(&["NODE", "SERVICE", "CONNECTED", "SUBSCRIPTION", "ACKED", "CURRENT", "STATE"])
    };
    let mut nacks = Vec::new();
    for sidecar in &response.sidecars {
        let first = |table: &mut Table, cells: [String; 4]| {
            let [subscription, acked, current, state] = cells;
            let mut row = vec![sidecar.node_id.clone()];
            if replicas {
                row.push(sidecar.replica.clone());
            }
            row.extend([sidecar.service.clone(), ago(sidecar.connected_at.as_ref()), subscription, acked, current, state]);
            table.row(row);
        };
        if sidecar.subscriptions.is_empty() {
            first(&mut table, ["-".into(), "-".into(), "-".into(), "-".into()]);
        }
        if sidecar.remote {
            // Its progress is known to the replica holding its stream only.
            for s in &sidecar.subscriptions {
                first(&mut table, [s.service.clone(), "-".into(), "-".into(), format!("ask {}", sidecar.replica)]);
            }
            continue;
        }
        for s in &sidecar.subscriptions {
            let nacked = sidecar
                .last_nack
                .as_ref()
                .is_some_and(|n| n.versions.get(&s.service) == Some(&s.sent_version) && s.acked_version != s.sent_version);
            // Version 0 is the registry's "nothing under this name" (a typo, or a service gone):
            // in sync with nothing is no news that it exists.
            let state = if s.current_version == 0 {
                "no such service"
            } else if s.acked_version == s.current_version {
                "in sync"
            } else if nacked {
                "rejected"
            } else {
                "pending"
            };
            first(
                &mut table,
                [s.service.clone(), versions.show(s.acked_version), versions.show(s.current_version), state.into()],
            );
        }
        if let Some(nack) = &sidecar.last_nack {
            nacks.push(format!("{} rejected push {} {}: {}", sidecar.node_id, nack.nonce, ago(nack.at.as_ref()), nack.error));
        }
    }
    let mut out = table.render();
    if !nacks.is_empty() {
        out.push_str("\nLAST REJECTED PUSH\n");
        for line in nacks {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_help_shows_every_default() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command.find_subcommand_mut("register").expect("register").render_long_help().to_string();
        for default in ["[default: 10s]", "[default: never]", "(default 100)", "defaults to SERVICE-ADDRESS-PORT"] {
            assert!(help.contains(default), "{default} in:\n{help}");
        }
    }

    #[test]
    fn the_services_table_shows_each_virtual_ip_or_a_dash_in_its_last_column() {
        let summary = |name: &str, virtual_ip: &str| v1::ServiceSummary {
            name: name.into(),
            index: 7,
            instances: 2,
            passing: 1,
            virtual_ip: virtual_ip.into(),
        };
        let response = v1::ListServicesResponse { services: vec![summary("catalog", "240.240.149.217"), summary("db", "")] };
        assert_eq!(
            services_table(&response),
            "SERVICE  INSTANCES  PASSING  INDEX  VIRTUAL IP\n\
             catalog  2          1        7      240.240.149.217\n\
             db       2          1        7      -\n"
        );
    }

    #[test]
    fn a_subscription_to_a_name_nothing_exists_under_is_no_such_service_not_in_sync() {
        let subscription = |service: &str, version: u64| v1::SubscriptionStatus {
            service: service.into(),
            current_version: version,
            sent_version: version,
            acked_version: version,
            ..Default::default()
        };
        let response = v1::ListSidecarsResponse {
            sidecars: vec![v1::SidecarStatus {
                node_id: "client-1".into(),
                service: "client".into(),
                subscriptions: vec![subscription("catalog", 7), subscription("nowhere", 0)],
                ..Default::default()
            }],
        };
        let versions = Versions::new([7, 0]);
        let table = status_table(&response, &versions);
        let state = |service: &str| {
            let row = table.lines().find(|l| l.split_whitespace().nth(3) == Some(service)).unwrap_or_else(|| panic!("{table}"));
            row.split("  ").map(str::trim).filter(|c| !c.is_empty()).last().unwrap_or_default().to_owned()
        };
        assert_eq!(state("catalog"), "in sync", "{table}");
        assert_eq!(state("nowhere"), "no such service", "{table}");
    }

    #[test]
    fn usage_errors_come_from_the_flags_given_and_help_still_shows_the_variables() {
        let args = |list: &[&str]| list.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let error = try_parse(args(&["ferryctl", "token", "create", "--token", "x"])).expect_err("no --kind");
        let text = error.render().to_string();
        // A flag given on the command line is still named, as clap would.
        assert!(text.contains("Usage: ferryctl token create --kind <KIND> --token <TOKEN>"), "{text}");
        let help = try_parse(args(&["ferryctl", "token", "create", "--help"])).expect_err("help").render().to_string();
        assert!(help.contains("[env: FERRY_TOKEN]") && help.contains("[env: FERRY_CA_FILE"), "{help}");
    }

    #[test]
    fn get_help_names_the_kinds_as_they_are_accepted() {
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command.find_subcommand_mut("get").expect("get").render_long_help().to_string();
        assert!(help.contains("route, policy or authorization (each plural works too"), "{help}");
        for value in ["route", "policy", "authorization"] {
            assert!(help.contains(&format!("- {value}:")), "{value} in:\n{help}");
        }
        for plural in ["routes", "policies", "authorizations"] {
            let parsed = Cli::try_parse_from(["ferryctl", "get", plural]).expect(plural);
            assert!(matches!(parsed.command, Command::Get { .. }), "{plural}");
        }
    }

    #[test]
    fn tables_show_indexes_by_their_last_digits_and_json_keeps_them_whole() {
        let summary = |name: &str, index: u64| v1::ServiceSummary { name: name.into(), index, ..Default::default() };
        let response = v1::ListServicesResponse {
            services: vec![summary("catalog", 1_796_655_541_938_275), summary("db", 1_796_655_541_938_270)],
        };
        let table = services_table(&response);
        assert!(table.contains("catalog  0          0        …938275"), "{table}");
        assert!(table.contains("db       0          0        …938270"), "{table}");
        let json = encode(Output::Json, &response).expect("JSON");
        assert!(json.contains("1796655541938275"), "{json}");
    }
}
