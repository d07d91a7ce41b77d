//! `ferry-sidecar iptables install|uninstall`: the rules that hand an unmodified app's TCP
//! connections to its sidecar, run as root (or with CAP_NET_ADMIN) in the app's network
//! namespace before the app starts, as Istio's and Linkerd's init containers do.
//!
//! ```text
//! ferry-sidecar iptables install --proxy-uid UID[,UID...] | --proxy-gid GID[,GID...]
//!     [--outbound-port 15001] [--inbound-port 15006] [--admin-port 15000] [--dns-port 15053]
//!     [--capture-dns] [--control-plane URL[,URL...]]
//!     [--skip-outbound-ports P[,P...]] [--skip-outbound-cidrs CIDR[,CIDR...]]
//!     [--skip-inbound-ports P[,P...]]
//!     [--iptables-command PATH] [--ip6tables-command PATH] [--ipv6 auto|on|off]
//!     [--wait SECONDS] [--dry-run]
//! ferry-sidecar iptables uninstall [--iptables-command PATH] [--ip6tables-command PATH]
//!     [--ipv6 auto|on|off] [--wait SECONDS] [--dry-run]
//! ```
//!
//! Everything lives in the nat table, in chains of Ferry's own ([`rules`]): nat OUTPUT jumps to
//! `FERRY_OUTPUT`, which leaves alone the sidecar's own connections (by owner), loopback, the
//! control plane and the skipped ports and CIDRs, optionally redirects DNS to the sidecar's DNS
//! port, and sends every other TCP connection through `FERRY_OUTBOUND_REDIRECT` to the outbound
//! listener; nat PREROUTING jumps to `FERRY_PREROUTING`, which leaves alone lo, the sidecar's
//! own ports and the skipped ones, and sends every other TCP connection through
//! `FERRY_INBOUND_REDIRECT` to the inbound listener. The sidecar reads where each connection
//! was going with `SO_ORIGINAL_DST`.
//!
//! Both families are handled: `iptables` always, and `ip6tables` unless `--ipv6 off`. Rules
//! are written with the `iptables-restore` beside the command chosen (so `--iptables-command
//! iptables-legacy` or `iptables-nft` picks the backend), one transaction per family
//! ([`restore`]). An install first removes whatever of Ferry's is there, so installing twice
//! leaves one copy; `uninstall` removes every `FERRY_` chain and every jump to one. `--dry-run`
//! prints the `iptables-restore` input it would apply, as a shell snippet, and changes nothing.
//!
//! IPv6 rules are not optional where IPv6 can be reached: without them, a connection arriving
//! over IPv6 at an app listening on `[::]` gets no mTLS or authorization, and the app's own
//! IPv6 connections leave unmeshed. So `--ipv6 auto` (the default), when `ip6tables` cannot
//! read or write the nat table (no ip6tables, no IPv6 nat in the kernel, a refused rule),
//! looks at the namespace's IPv6 addresses ([`if_inet6`], read at install time): if every one
//! is loopback or link-local (or the kernel has no IPv6), `install` skips IPv6 with a note on
//! stderr; if any other is there, or the list cannot be read, `install` fails (exit 1) saying
//! so, and `--ipv6 off` is how to accept that risk knowingly. Link-local addresses are let
//! pass because every interface with IPv6 has one: IPv6 over them, from the same link, is not
//! intercepted. An address added after the install is not seen either. `--ipv6 on` fails
//! whenever ip6tables does. `uninstall --ipv6 auto` removes the IPv6 rules whenever ip6tables
//! can list its nat table, and otherwise skips IPv6 with a note (nothing can be removed
//! through it); a dry run shows an unreadable table as empty and says why, and, for `install`,
//! that the real run would stop.
//!
//! Left alone on purpose: a connection the sidecar itself makes to its own instance's address
//! is not sent back through its inbound listener (Istio's `-o lo ! -d 127.0.0.1/32` rule):
//! without a reserved source address on the inbound side, as Istio's 127.0.0.6, such a rule
//! would loop the inbound listener's own connection to the app. The sidecar must recognise
//! its own address instead.

use std::{
    ffi::OsString,
    io::{self, Write},
    net::{SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_runtime::{EXIT_USAGE, UsageError};
use ferry_tls::api::ControlPlaneUrls;
use ipnet::IpNet;

use self::{
    exec::{Backend, CommandError},
    if_inet6::{IF_INET6, Ipv6Exposure},
    restore::Installed,
    rules::{Family, Interception},
};

mod exec;
mod if_inet6;
mod restore;
pub mod rules;

/// Installs or removes the iptables rules that hand the app's TCP connections to its sidecar.
/// Run it as root (or with CAP_NET_ADMIN) in the app's network namespace, before the app starts.
#[derive(Debug, Parser)]
#[command(name = "ferry-sidecar iptables", bin_name = "ferry-sidecar iptables", version)]
pub struct Cli {
    #[command(subcommand)]
    pub action: Action,
}

/// What to do with Ferry's rules.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Redirect the namespace's TCP connections to the sidecar, replacing any earlier install.
    Install(InstallArgs),
    /// Remove every chain of Ferry's (FERRY_*) and every jump to one; succeeds when none is there.
    Uninstall(BackendArgs),
}

/// The flags of `install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The sidecar's user ids: their connections are never redirected (so the sidecar's own do
    /// not loop back to it). This or --proxy-gid is required. Comma-separated or repeated.
    #[arg(long, env = "FERRY_PROXY_UID", value_delimiter = ',', value_name = "UID[,UID...]")]
    pub proxy_uid: Vec<u32>,

    /// The sidecar's group ids, as --proxy-uid.
    #[arg(long, env = "FERRY_PROXY_GID", value_delimiter = ',', value_name = "GID[,GID...]")]
    pub proxy_gid: Vec<u32>,

    /// The port of the sidecar's outbound listener, where the app's connections are redirected.
    #[arg(long, env = "FERRY_OUTBOUND_PORT", default_value_t = 15001, value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub outbound_port: u16,

    /// The port of the sidecar's inbound listener, where arriving connections are redirected.
    #[arg(long, env = "FERRY_INBOUND_PORT", default_value_t = 15006, value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub inbound_port: u16,

    /// The port of the sidecar's admin listener, never redirected.
    #[arg(long, env = "FERRY_ADMIN_PORT", default_value_t = 15000, value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub admin_port: u16,

    /// The port of the sidecar's DNS listener: never redirected, and where --capture-dns sends
    /// the app's DNS.
    #[arg(long, env = "FERRY_DNS_PORT", default_value_t = 15053, value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub dns_port: u16,

    /// Redirect the app's DNS (UDP and TCP to port 53, wherever it goes) to --dns-port.
    #[arg(long, env = "FERRY_CAPTURE_DNS")]
    pub capture_dns: bool,

    /// The control plane's URLs, as the sidecar's flag takes them: connections to their
    /// addresses (host names resolved now) are left alone.
    #[arg(long, env = "FERRY_CONTROL_PLANE", value_parser = ControlPlaneUrls::parse, value_name = "URL[,URL...]")]
    pub control_plane: Option<ControlPlaneUrls>,

    /// Destination TCP ports the app's connections to are left alone. Comma-separated.
    #[arg(long, env = "FERRY_SKIP_OUTBOUND_PORTS", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT[,PORT...]")]
    pub skip_outbound_ports: Vec<u16>,

    /// Destination networks (IPv4 or IPv6, CIDR or one address) the app's connections to are
    /// left alone. Comma-separated.
    #[arg(long, env = "FERRY_SKIP_OUTBOUND_CIDRS", value_delimiter = ',', value_parser = parse_cidr, value_name = "CIDR[,CIDR...]")]
    pub skip_outbound_cidrs: Vec<IpNet>,

    /// TCP ports arriving connections to are left alone (such as 22). Comma-separated.
    #[arg(long, env = "FERRY_SKIP_INBOUND_PORTS", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT[,PORT...]")]
    pub skip_inbound_ports: Vec<u16>,

    #[command(flatten)]
    pub backends: BackendArgs,
}

/// Which commands write the rules, and how.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// The iptables command (iptables, iptables-legacy, iptables-nft or a path); its -save and
    /// -restore are the ones beside it.
    #[arg(long, env = "FERRY_IPTABLES_COMMAND", default_value = "iptables", value_name = "PATH")]
    pub iptables_command: PathBuf,

    /// The ip6tables command; by default the one matching --iptables-command (ip6tables-legacy
    /// for iptables-legacy, in the same directory).
    #[arg(long, env = "FERRY_IP6TABLES_COMMAND", value_name = "PATH")]
    pub ip6tables_command: Option<PathBuf>,

    /// IPv6 rules too: auto (skipped when ip6tables cannot read or write them and the namespace
    /// has no IPv6 address but loopback and link-local ones; install fails if it has others), on
    /// (fail whenever ip6tables cannot) or off (IPv6 connections bypass the sidecar).
    #[arg(long, env = "FERRY_IPV6", value_enum, default_value_t = Ipv6::Auto)]
    pub ipv6: Ipv6,

    /// How long to wait for the xtables lock another iptables command holds (0: fail at once).
    #[arg(long, env = "FERRY_IPTABLES_WAIT", default_value_t = 10, value_name = "SECONDS")]
    pub wait: u32,

    /// Print the iptables-restore input that would be applied, and change nothing.
    #[arg(long, env = "FERRY_IPTABLES_DRY_RUN")]
    pub dry_run: bool,
}

/// Whether IPv6 rules are written too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Ipv6 {
    /// When ip6tables can read and write its nat table; when it cannot, install fails if the
    /// namespace has IPv6 addresses besides loopback and link-local ones.
    Auto,
    /// Always; failing when ip6tables cannot.
    On,
    /// Never.
    Off,
}

/// Why `install` or `uninstall` failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("--control-plane {url}: {why}")]
    Unresolved { url: String, why: String },
    #[error("{family} rules: {source}{done}")]
    Command {
        family: Family,
        source: CommandError,
        /// What was already applied, when another family failed after it.
        done: String,
    },
    #[error(
        "--ipv6 auto: {exposure}, but the IPv6 rules cannot be {step}: {source}{done}. Without them, IPv6 connections bypass the sidecar: arriving ones reach an app listening on [::] with no mTLS or authorization, and the app's own leave unmeshed. Make ip6tables work here (or name it with --ip6tables-command), or pass --ipv6 off to accept that risk knowingly"
    )]
    Ipv6Unprotected {
        /// Boxed, since it is rare and large.
        exposure: Box<Ipv6Exposure>,
        step: Ipv6Step,
        source: CommandError,
        /// What was already applied, as for [`Error::Command`].
        done: String,
    },
}

/// What could not be done with the IPv6 rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Step {
    /// `ip6tables-save -t nat` failed.
    Read,
    /// `ip6tables-restore` refused the rules.
    Write,
}

impl std::fmt::Display for Ipv6Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "written",
        })
    }
}

/// What `--ipv6 auto` does when ip6tables cannot read or write the IPv6 rules.
#[derive(Debug, Clone, Copy)]
enum AutoIpv6<'a> {
    /// Uninstall: a table that cannot be read is skipped, since nothing can be removed through
    /// it; one that is read but cannot be written is an error, as for IPv4.
    Uninstall,
    /// Install: IPv6 is skipped only when the namespace, whose addresses `if_inet6` lists, has
    /// none besides loopback and link-local ones; otherwise [`Error::Ipv6Unprotected`].
    Install { if_inet6: &'a Path },
}

/// Runs `ferry-sidecar iptables ARGS...` (`args` starts with `iptables`), printing a dry run to
/// stdout and errors to stderr: exit 0 on success, 64 on bad usage, 1 on failure.
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match ferry_runtime::parse::<Cli, _, _>(args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match run(cli.action, &mut io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ Error::Usage(_)) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Installs or uninstalls; a dry run writes its scripts to `out`, notes go to stderr.
pub fn run(action: Action, out: &mut dyn Write) -> Result<(), Error> {
    run_in(action, Path::new(IF_INET6), out)
}

/// [`run`], with the namespace's IPv6 addresses listed in `if_inet6` (a stand-in, in tests).
fn run_in(action: Action, if_inet6: &Path, out: &mut dyn Write) -> Result<(), Error> {
    match action {
        Action::Install(args) => {
            let interception = args.interception()?;
            let auto = AutoIpv6::Install { if_inet6 };
            let plans = read_tables(&args.backends, auto, out)?;
            let changes = plans
                .into_iter()
                .map(|(backend, installed)| {
                    let ruleset = interception.ruleset(backend.family);
                    let count = ruleset.rules.len();
                    let script = Some(restore::install(&installed, &ruleset));
                    Change { backend, script, what: format!("installed {count} rules") }
                })
                .collect();
            apply(&args.backends, auto, changes, out)
        }
        Action::Uninstall(backends) => {
            let plans = read_tables(&backends, AutoIpv6::Uninstall, out)?;
            let changes = plans
                .into_iter()
                .map(|(backend, installed)| {
                    let what = format!("removed {} chains and {} jumps", installed.chains.len(), installed.jumps.len());
                    Change { script: restore::uninstall(&installed), backend, what }
                })
                .collect();
            apply(&backends, AutoIpv6::Uninstall, changes, out)
        }
    }
}

impl InstallArgs {
    /// The flags checked together, with the control plane's host names resolved.
    pub fn interception(&self) -> Result<Interception, Error> {
        if self.proxy_uid.is_empty() && self.proxy_gid.is_empty() {
            return Err(usage(
                "--proxy-uid or --proxy-gid: one is needed, so the sidecar's own connections are not redirected back to itself",
            ));
        }
        let ports = [
            ("--outbound-port", self.outbound_port),
            ("--inbound-port", self.inbound_port),
            ("--admin-port", self.admin_port),
            ("--dns-port", self.dns_port),
        ];
        for (index, (flag, port)) in ports.iter().enumerate() {
            if let Some((other, _)) = ports[index + 1..].iter().find(|(_, p)| p == port) {
                return Err(usage(&format!(
                    "{flag} and {other}: both are {port}; each of the sidecar's listeners needs its own port"
                )));
            }
        }
        if self.capture_dns && self.skip_outbound_ports.contains(&53) {
            return Err(usage("--skip-outbound-ports 53 and --capture-dns: DNS cannot be both left alone and captured"));
        }
        let control_plane = match &self.control_plane {
            Some(urls) => resolve(urls)?,
            None => Vec::new(),
        };
        Ok(Interception {
            proxy_uids: unique(&self.proxy_uid),
            proxy_gids: unique(&self.proxy_gid),
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            dns_port: self.dns_port,
            capture_dns: self.capture_dns,
            control_plane,
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_cidrs: unique(&self.skip_outbound_cidrs),
            skip_inbound_ports: self.skip_inbound_ports.clone(),
        })
    }
}

impl BackendArgs {
    /// The backends to use, IPv4 first; IPv6 unless --ipv6 off.
    fn backends(&self) -> Vec<Backend> {
        let mut backends = vec![Backend::new(Family::V4, self.iptables_command.clone(), "--iptables-command")];
        if self.ipv6 != Ipv6::Off {
            let command = self.ip6tables_command.clone().unwrap_or_else(|| ip6tables_beside(&self.iptables_command));
            backends.push(Backend::new(Family::V6, command, "--ip6tables-command"));
        }
        backends
    }
}

/// Reads what each family's nat table holds of Ferry's, before anything is changed, so that a
/// family that cannot be read stops the run before another is written. An unreadable IPv6
/// table under `--ipv6 auto` is for `auto` to judge ([`without_ipv6`]); in a dry run, an
/// unreadable table is shown as empty.
fn read_tables(args: &BackendArgs, auto: AutoIpv6<'_>, out: &mut dyn Write) -> Result<Vec<(Backend, Installed)>, Error> {
    let mut tables = Vec::new();
    for backend in args.backends() {
        match backend.save_nat() {
            Ok(save) => tables.push((backend, Installed::parse(&save))),
            Err(error) if backend.family == Family::V6 && args.ipv6 == Ipv6::Auto => {
                match without_ipv6(auto, Ipv6Step::Read, error, String::new()) {
                    Ok(note) if args.dry_run => {
                        let _ = writeln!(out, "# {note}");
                    }
                    Ok(note) => eprintln!("ferry-sidecar iptables: {note}"),
                    Err(stop) if args.dry_run => {
                        let _ = writeln!(
                            out,
                            "# IPv6: shown as if nothing of Ferry's were installed; without --dry-run, install would stop here: {stop}"
                        );
                        tables.push((backend, Installed::default()));
                    }
                    Err(stop) => return Err(stop),
                }
            }
            Err(error) if args.dry_run => {
                let _ = writeln!(out, "# {}: shown as if nothing of Ferry's were installed, since: {error}", backend.family);
                tables.push((backend, Installed::default()));
            }
            Err(source) => return Err(Error::Command { family: backend.family, source, done: String::new() }),
        }
    }
    Ok(tables)
}

/// Under `--ipv6 auto`, what it means that the IPv6 rules cannot be `step` because of
/// `source`: a note saying why IPv6 is skipped, or the error that stops the run. `done` is what
/// was already applied.
fn without_ipv6(auto: AutoIpv6<'_>, step: Ipv6Step, source: CommandError, done: String) -> Result<String, Error> {
    match auto {
        AutoIpv6::Uninstall if step == Ipv6Step::Read => {
            Ok(format!("IPv6: skipped, since ip6tables cannot list its nat table (--ipv6 on to insist): {source}"))
        }
        AutoIpv6::Uninstall => Err(Error::Command { family: Family::V6, source, done }),
        AutoIpv6::Install { if_inet6 } => match Ipv6Exposure::read(if_inet6) {
            exposure @ Ipv6Exposure::None => Ok(format!(
                "IPv6: skipped, since the rules cannot be {step} and {exposure}, so IPv6 connections can only come and go over the local link (--ipv6 on to insist): {source}"
            )),
            exposure => Err(Error::Ipv6Unprotected { exposure: Box::new(exposure), step, source, done }),
        },
    }
}

/// One family's change: the script that makes it, and what it does, for the log.
struct Change {
    backend: Backend,
    /// `None` when there is nothing to do.
    script: Option<String>,
    what: String,
}

/// Applies each family's change or, in a dry run, prints them as a shell snippet that would.
/// IPv6 rules that cannot be written under `--ipv6 auto` are for `auto` to judge, as
/// [`read_tables`] does for ones that cannot be read.
fn apply(args: &BackendArgs, auto: AutoIpv6<'_>, changes: Vec<Change>, out: &mut dyn Write) -> Result<(), Error> {
    let mut done: Vec<String> = Vec::new();
    for Change { backend, script, what } in changes {
        let family = backend.family;
        match (script, args.dry_run) {
            (None, true) => {
                let _ = writeln!(out, "# {family}: nothing of Ferry's is installed");
            }
            (Some(script), true) => {
                let _ = write!(out, "# {family}\n{} <<'EOF'\n{script}EOF\n", backend.restore_command_line(args.wait));
            }
            (None, false) => eprintln!("ferry-sidecar iptables: {family}: nothing of Ferry's is installed"),
            (Some(script), false) => {
                if let Err(source) = backend.restore(&script, args.wait) {
                    let done = done.iter().map(|d| format!(" (already done: {d})")).collect();
                    if family == Family::V6 && args.ipv6 == Ipv6::Auto {
                        let note = without_ipv6(auto, Ipv6Step::Write, source, done)?;
                        eprintln!("ferry-sidecar iptables: {note}");
                        continue;
                    }
                    return Err(Error::Command { family, source, done });
                }
                let line = format!("{family}: {what} with {}", backend.restore.display());
                eprintln!("ferry-sidecar iptables: {line}");
                done.push(line);
            }
        }
    }
    Ok(())
}

/// The ip6tables command matching `iptables`: `iptables-nft` gives `ip6tables-nft` in the same
/// directory; a command of another name gives plain `ip6tables`.
fn ip6tables_beside(iptables: &std::path::Path) -> PathBuf {
    match iptables.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("iptables")) {
        Some(rest) => iptables.with_file_name(format!("ip6tables{rest}")),
        None => PathBuf::from(Family::V6.default_command()),
    }
}

/// Every address of every URL, now: an IP as it is, a host name through the system's resolver.
fn resolve(urls: &ControlPlaneUrls) -> Result<Vec<SocketAddr>, Error> {
    let mut addrs = Vec::new();
    for url in urls.iter() {
        let unresolved = |why: String| Error::Unresolved { url: url.to_string(), why };
        let found = match url.ip() {
            Some(ip) => vec![SocketAddr::new(ip, url.port())],
            None => (url.host(), url.port())
                .to_socket_addrs()
                .map_err(|e| unresolved(format!("resolving {}: {e}", url.host())))?
                .collect(),
        };
        if found.is_empty() {
            return Err(unresolved(format!("resolving {}: no address", url.host())));
        }
        for addr in found {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
    }
    Ok(addrs)
}

fn usage(message: &str) -> Error {
    Error::Usage(UsageError(message.to_owned()))
}

fn unique<T: PartialEq + Clone>(items: &[T]) -> Vec<T> {
    let mut seen: Vec<T> = Vec::new();
    for item in items {
        if !seen.contains(item) {
            seen.push(item.clone());
        }
    }
    seen
}

/// A network (`10.0.0.0/8`, `fd00::/8`) or one address (`10.0.0.5`, taken as `/32`).
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8, nor an IP address"))
}

#[cfg(test)]
mod tests;
