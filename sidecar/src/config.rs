//! The sidecar's command line. Every flag also reads a `FERRY_*` environment variable; values
//! are parsed and checked here, before anything binds, and a bad one names its flag.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use ferry_health::CheckSpec;
use ferry_proto::validate;
use ferry_tls::api::ControlPlaneUrls;

/// Ferry's sidecar: proxies the app's calls into the mesh and the mesh's calls to the app.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-sidecar", version)]
pub struct Config {
    /// The service this sidecar's app belongs to (or, with no app, the name it calls out as;
    /// for a gateway, the service whose route it serves, "gateway" by default).
    #[arg(
        long,
        env = "FERRY_SERVICE",
        value_parser = parse_service,
        value_name = "NAME",
        required = false,
        required_unless_present = "gateway",
        default_value_if("gateway", clap::builder::ArgPredicate::IsPresent, Some("gateway"))
    )]
    pub service: String,

    /// Run as a gateway: no app of its own; requests arriving on --outbound from outside the
    /// mesh are routed by the Route of --service (matching host and path) to mesh services.
    #[arg(long, env = "FERRY_GATEWAY", conflicts_with_all = ["app", "checks"])]
    pub gateway: bool,

    /// The app's address (HOST:PORT). Without it the sidecar registers no instance.
    #[arg(long, env = "FERRY_APP", value_parser = parse_host_port, value_name = "ADDR")]
    pub app: Option<HostPort>,

    /// The control plane's gRPC URL (`http://` for one started with --api-tls off); for
    /// several replicas, their URLs separated by commas, in order of preference. A host name
    /// that resolves to several addresses counts as several replicas. The config stream goes to
    /// one at a time, and to the next when it breaks.
    #[arg(long, env = "FERRY_CONTROL_PLANE", default_value = "https://127.0.0.1:7070", value_parser = ControlPlaneUrls::parse, value_name = "URL[,URL...]")]
    pub control_plane: ControlPlaneUrls,

    /// The roots that verify the control plane's certificate: the ca.pem it writes in its data
    /// directory. Needed for an https:// control plane.
    #[arg(long, env = "FERRY_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// A file holding this sidecar's API token (a sidecar token for --service); the token may
    /// also come in FERRY_TOKEN.
    #[arg(long, env = "FERRY_TOKEN_FILE", value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// The API token itself; prefer --token-file or FERRY_TOKEN, since a command line is
    /// visible to every user of the host.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,

    /// How the inbound listener takes connections: strict (mTLS from a mesh identity only),
    /// permissive (mTLS, and plaintext too) or off (plaintext only; callers reach it without TLS).
    #[arg(long, env = "FERRY_MTLS", value_enum, default_value_t = crate::mesh::MtlsMode::Strict)]
    pub mtls: crate::mesh::MtlsMode,

    /// Inbound connections open at once; past it, new ones wait in the backlog.
    #[arg(long, env = "FERRY_MAX_INBOUND_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1_000_000), value_name = "N")]
    pub max_inbound_connections: u32,

    /// How long a new inbound connection may take to finish its TLS handshake.
    #[arg(long, env = "FERRY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,

    /// Where the app sends its outbound HTTP (as a proxy, or with the service in Host).
    #[arg(long, env = "FERRY_OUTBOUND", default_value = "127.0.0.1:15001", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub outbound: SocketAddr,

    /// Where other sidecars reach this app; the address published in the registry.
    #[arg(long, env = "FERRY_INBOUND", default_value = "0.0.0.0:15006", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub inbound: SocketAddr,

    /// The admin listener: /ready, /live, /config, /explain, /metrics.
    #[arg(long, env = "FERRY_ADMIN", default_value = "127.0.0.1:15000", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub admin: SocketAddr,

    /// The host other sidecars use to reach this one; defaults to the inbound listener's IP, or
    /// the local address that routes to the control plane.
    #[arg(long, env = "FERRY_ADVERTISE", value_parser = parse_address, value_name = "HOST")]
    pub advertise: Option<String>,

    /// A local port for one upstream service, HTTP (the default) or opaque TCP; repeat for more.
    #[arg(long = "upstream", env = "FERRY_UPSTREAM", value_delimiter = ';', value_parser = parse_upstream, value_name = "NAME=ADDR[,protocol=http|tcp]")]
    pub upstreams: Vec<Upstream>,

    /// A metadata label of the instance, such as version=v2; repeat for more.
    #[arg(long = "meta", env = "FERRY_META", value_delimiter = ';', value_parser = parse_key_value, value_name = "KEY=VALUE")]
    pub metadata: Vec<(String, String)>,

    /// The region of the instance.
    #[arg(long, env = "FERRY_REGION", default_value = "", value_parser = parse_locality, hide_default_value = true)]
    pub region: String,

    /// The zone of the instance.
    #[arg(long, env = "FERRY_ZONE", default_value = "", value_parser = parse_locality, hide_default_value = true)]
    pub zone: String,

    /// The instance's load-balancing weight, 1 to 10000.
    #[arg(long, env = "FERRY_WEIGHT", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub weight: u32,

    /// The instance id; defaults to SERVICE-ADVERTISE-PORT.
    #[arg(long, env = "FERRY_ID", value_parser = parse_id, value_name = "ID")]
    pub id: Option<String>,

    /// The sidecar's identity on the config stream; defaults to the instance id, or to
    /// SERVICE-<random> without an app.
    #[arg(long, env = "FERRY_NODE_ID", value_parser = parse_id, value_name = "ID")]
    pub node_id: Option<String>,

    /// How long connecting to an endpoint or to the app may take.
    #[arg(long, env = "FERRY_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// How long a pooled connection to an endpoint or to the app may sit unused before it is
    /// closed.
    #[arg(long, env = "FERRY_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// Threads serving the data path (the outbound, inbound and upstream listeners). Each
    /// serves the connections handed to it from accept to close, with upstream connections of
    /// its own. Defaults to one per CPU core.
    #[arg(long, env = "FERRY_WORKERS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: Option<u16>,

    /// How long to wait for an upstream's response headers (none by default).
    #[arg(long, env = "FERRY_RESPONSE_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub response_timeout: Option<Duration>,

    /// How long a request for a service the sidecar has no config for yet waits for it.
    #[arg(long, env = "FERRY_DISCOVERY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub discovery_timeout: Duration,

    /// A health check of the app, run by the sidecar: http:/PATH, tcp, grpc[:SERVICE],
    /// script:COMMAND ARGS..., ttl:30s; each may add ,interval=D ,timeout=D ,success=N
    /// ,failure=N (and ,expect=STATUS for http). Repeat for more.
    #[arg(long = "check", env = "FERRY_CHECK", value_delimiter = ';', value_parser = parse_check, value_name = "SPEC")]
    pub checks: Vec<String>,

    /// Time between probes of each check that does not set its own.
    #[arg(long, env = "FERRY_CHECK_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub check_interval: Duration,

    /// On SIGTERM or POST /shutdown: how long the instance stays draining (no new traffic is
    /// sent to it, requests still arriving are served) before the sidecar deregisters and exits.
    #[arg(long, env = "FERRY_DRAIN", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain: Duration,

    /// A service this sidecar has not sent a request to for this long is forgotten: its stack
    /// and subscription are dropped (asked for again, it is subscribed again).
    #[arg(long, env = "FERRY_SERVICE_IDLE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub service_idle_timeout: Duration,

    /// A name asked for that is not a service of the mesh is remembered as unknown for this
    /// long after its last use, then forgotten, so that typos and probes leave nothing behind.
    #[arg(long, env = "FERRY_UNKNOWN_SERVICE_TTL", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub unknown_service_ttl: Duration,

    /// How often the traffic figures are reported to the control plane. Hidden: shorter only
    /// makes end-to-end tests quick; the control plane's window counts in 5 s slots.
    #[arg(long, env = "FERRY_TRAFFIC_REPORT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration, hide = true)]
    pub traffic_report_interval: Duration,

    /// Answer DNS for NAME.service.ferry on this address (UDP and TCP) from the config the
    /// sidecar holds, so lookups survive a control-plane outage.
    #[arg(long, env = "FERRY_DNS", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub dns: Option<SocketAddr>,

    /// Keep the last good config in this directory (created if missing) and start from it when
    /// the control plane is unreachable; one directory per sidecar.
    #[arg(long, env = "FERRY_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// TTL of the DNS answers.
    #[arg(long, env = "FERRY_DNS_TTL", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub dns_ttl: Duration,

    /// Domains whose names DNS answers like those of ferry., so that apps set up for Consul
    /// find services as NAME.service.consul and _NAME._tcp.service.consul; repeat or
    /// comma-separate for more, `none` (or an empty value) for none.
    #[arg(long, env = "FERRY_DNS_DOMAIN", default_value = "consul", value_delimiter = ',', value_parser = ferry_dns::AliasDomain::parse_flag, value_name = "DOMAIN[,DOMAIN...]")]
    pub dns_domain: Vec<Option<ferry_dns::AliasDomain>>,

    /// Intercept the app's connections: the outbound listener takes connections that
    /// `ferry-sidecar iptables install` redirected to it, reads where each was going and routes
    /// it (a service's virtual IP or endpoint through the mesh, anything else per
    /// --outbound-policy); the inbound listener hands each connection to the app's port it was
    /// sent to; the instance is registered at --advertise and the --app port; DNS answers on
    /// 127.0.0.1:15053 unless --dns says otherwise.
    #[arg(long, env = "FERRY_INTERCEPT")]
    pub intercept: bool,

    /// With --intercept: what happens to a connection to an address outside the mesh: allow
    /// (relayed untouched, as plain TCP) or deny (closed).
    #[arg(long, env = "FERRY_OUTBOUND_POLICY", value_enum, default_value_t = OutboundPolicy::Allow, requires = "intercept")]
    pub outbound_policy: OutboundPolicy,

    /// With --intercept: destination ports relayed as opaque TCP at once, with no protocol
    /// detection (those where the server speaks first, such as MySQL 3306 or SMTP 25), besides
    /// the opaque_ports of each service's ServicePolicy. Comma-separated.
    #[arg(long, env = "FERRY_OPAQUE_PORTS", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT[,PORT...]", requires = "intercept")]
    pub opaque_ports: Vec<u16>,

    /// With --intercept: how long an intercepted connection may stay silent before the
    /// protocol is decided without its first bytes (as opaque TCP).
    #[arg(long, env = "FERRY_DETECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub detect_timeout: Duration,

    /// With --intercept: the resolvers that names outside the mesh are forwarded to
    /// (IP or IP:PORT, comma-separated); by default the nameservers of /etc/resolv.conf.
    #[arg(long, env = "FERRY_DNS_UPSTREAM", value_delimiter = ',', value_parser = parse_dns_upstream, value_name = "ADDR[,ADDR...]", requires = "intercept")]
    pub dns_upstream: Vec<SocketAddr>,

    /// Log filter, such as `info` or `ferry_sidecar=debug`.
    #[arg(long, env = "FERRY_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,
}

/// What an intercepting sidecar does with a connection to an address outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutboundPolicy {
    /// Relay it untouched, as plain TCP.
    #[default]
    Allow,
    /// Close it.
    Deny,
}

/// The DNS listener of an intercepting sidecar when --dns does not name one.
pub const INTERCEPT_DNS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15053);

/// A host and port, such as `127.0.0.1:8080` or `localhost:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

/// A local listener for one upstream service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub service: Arc<str>,
    pub listen: SocketAddr,
    pub protocol: UpstreamProtocol,
}

/// What an upstream listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, HTTP/2 and gRPC, proxied request by request with the service's route.
    #[default]
    Http,
    /// Opaque bytes: each connection is relayed whole to one endpoint of the service.
    Tcp,
}

impl Config {
    /// The API token, from --token-file, --token or FERRY_TOKEN.
    pub fn token(&self) -> Result<Option<String>, ferry_runtime::UsageError> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ferry_runtime::UsageError(format!("--token-file {}: {e}", path.display())))?;
            let token = text.trim();
            if token.is_empty() {
                return Err(ferry_runtime::UsageError(format!("--token-file {}: the file is empty", path.display())));
            }
            return Ok(Some(token.to_owned()));
        }
        Ok(self.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned))
    }

    /// The roots of --ca-file, required for an https:// control plane.
    pub fn ca_pem(&self) -> Result<Option<String>, ferry_runtime::UsageError> {
        match &self.ca_file {
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| ferry_runtime::UsageError(format!("--ca-file {}: {e}", path.display())))?;
                ferry_tls::pem::certificates(&pem)
                    .map_err(|e| ferry_runtime::UsageError(format!("--ca-file {}: {e}", path.display())))?;
                Ok(Some(pem))
            }
            None => match self.control_plane.first_https() {
                Some(url) => Err(ferry_runtime::UsageError(format!(
                    "--ca-file: needed to verify {url} (the ca.pem in the control plane's data directory), or use http:// for a control plane with --api-tls off",
                ))),
                None => Ok(None),
            },
        }
    }

    /// The alias domains of --dns-domain, without the `none`s.
    pub fn dns_aliases(&self) -> Vec<ferry_dns::AliasDomain> {
        self.dns_domain.iter().flatten().cloned().collect()
    }

    /// Where DNS is served: --dns, or 127.0.0.1:15053 with --intercept.
    pub fn dns_listen(&self) -> Option<SocketAddr> {
        self.dns.or(self.intercept.then_some(INTERCEPT_DNS))
    }

    /// The instance's metadata labels.
    pub fn metadata_map(&self) -> BTreeMap<String, String> {
        self.metadata.iter().cloned().collect()
    }

    /// The app's checks, with `--check-interval` where a check sets none, and their ids.
    pub fn check_specs(&self, instance_id: &str) -> Result<Vec<CheckSpec>, ferry_runtime::UsageError> {
        if !self.checks.is_empty() && self.app.is_none() {
            return Err(ferry_runtime::UsageError("--check: needs --app, the app to check".into()));
        }
        let mut specs = Vec::with_capacity(self.checks.len());
        for text in &self.checks {
            let spec = CheckSpec::parse(text, self.check_interval)
                .map_err(|e| ferry_runtime::UsageError(format!("--check {text:?}: {e}")))?;
            specs.push(spec);
        }
        ferry_health::spec::assign_ids(instance_id, &mut specs);
        Ok(specs)
    }
}

fn parse_dns_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().map_err(|_| format!("{s:?} is not an IP or IP:PORT"))
}

fn parse_check(s: &str) -> Result<String, String> {
    // The syntax is checked here; the interval is applied once every flag is known.
    CheckSpec::parse(s, ferry_health::spec::DEFAULT_INTERVAL)?;
    Ok(s.to_owned())
}

fn parse_service(s: &str) -> Result<String, String> {
    validate::service_name("service", s).map_err(|e| e.reason)?;
    Ok(s.to_owned())
}

fn parse_id(s: &str) -> Result<String, String> {
    validate::instance_id("id", s).map_err(|e| e.reason)?;
    Ok(s.to_owned())
}

fn parse_address(s: &str) -> Result<String, String> {
    validate::address("address", s).map_err(|e| e.reason)?;
    Ok(s.to_owned())
}

fn parse_locality(s: &str) -> Result<String, String> {
    validate::locality("locality", s).map_err(|e| e.reason)?;
    Ok(s.to_owned())
}

/// Parses `HOST:PORT`, `[V6]:PORT` or `IP:PORT`.
pub fn parse_host_port(s: &str) -> Result<HostPort, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("the port must not be 0".into());
        }
        return Ok(HostPort { host: addr.ip().to_string(), port: addr.port() });
    }
    let (host, port) = s.rsplit_once(':').ok_or("must be HOST:PORT")?;
    let port: u16 = port.parse().map_err(|_| format!("{port:?} is not a port"))?;
    if port == 0 {
        return Err("the port must not be 0".into());
    }
    validate::address("host", host).map_err(|e| e.reason)?;
    Ok(HostPort { host: host.to_owned(), port })
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let (name, rest) = s.split_once('=').ok_or("must be NAME=ADDR[,protocol=http|tcp]")?;
    validate::service_name("name", name).map_err(|e| format!("the service {}", e.reason))?;
    let mut parts = rest.split(',');
    let addr = parts.next().unwrap_or_default();
    let listen: SocketAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP:PORT to listen on"))?;
    let mut protocol = UpstreamProtocol::Http;
    for option in parts {
        protocol = match option.split_once('=') {
            Some(("protocol", "http")) => UpstreamProtocol::Http,
            Some(("protocol", "tcp")) => UpstreamProtocol::Tcp,
            Some(("protocol", other)) => return Err(format!("unknown protocol {other:?}: expected http or tcp")),
            _ => return Err(format!("unknown option {option:?}: expected protocol=http or protocol=tcp")),
        };
    }
    Ok(Upstream { service: name.into(), listen, protocol })
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or("must be KEY=VALUE")?;
    let pair = (key.to_owned(), value.to_owned());
    validate::metadata("meta", [(&pair.0, &pair.1)]).map_err(|e| e.reason)?;
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("ferry-sidecar").chain(args.iter().copied()))
    }

    #[test]
    fn a_typical_command_line_parses() {
        let config = parse(&[
            "--service",
            "catalog",
            "--app",
            "127.0.0.1:8080",
            "--meta",
            "version=v2",
            "--zone",
            "eu-1a",
            "--upstream",
            "inventory=127.0.0.1:9001",
            "--upstream",
            "pricing=127.0.0.1:9002,protocol=http",
            "--upstream",
            "db=127.0.0.1:9003,protocol=tcp",
        ])
        .expect("parses");
        assert_eq!(config.app, Some(HostPort { host: "127.0.0.1".into(), port: 8080 }));
        assert_eq!(config.metadata_map().get("version").map(String::as_str), Some("v2"));
        assert_eq!(config.upstreams.len(), 3);
        assert_eq!(&*config.upstreams[1].service, "pricing");
        assert_eq!(config.upstreams[0].protocol, UpstreamProtocol::Http);
        assert_eq!(config.upstreams[1].protocol, UpstreamProtocol::Http);
        assert_eq!(config.upstreams[2].protocol, UpstreamProtocol::Tcp);
    }

    #[test]
    fn a_gateway_needs_no_service_and_no_app() {
        let config = parse(&["--gateway", "--outbound", "0.0.0.0:8080"]).expect("parses");
        assert!(config.gateway);
        assert_eq!(config.service, "gateway");
        assert_eq!(parse(&["--gateway", "--service", "edge"]).expect("parses").service, "edge");
        let error = parse(&["--gateway", "--app", "127.0.0.1:8080"]).expect_err("no app").to_string();
        assert!(error.contains("--app"), "{error}");
        let error = parse(&[]).expect_err("a service or --gateway").to_string();
        assert!(error.contains("--service"), "{error}");
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (vec!["--service", "Bad_Name"], "--service"),
            (vec!["--service", "a", "--app", "nope"], "--app"),
            (vec!["--service", "a", "--app", "localhost:0"], "--app"),
            (vec!["--service", "a", "--upstream", "x"], "--upstream"),
            (vec!["--service", "a", "--upstream", "db=127.0.0.1:9000,protocol=udp"], "--upstream"),
            (vec!["--service", "a", "--upstream", "db=127.0.0.1:9000,mode=tcp"], "--upstream"),
            (vec!["--service", "a", "--meta", "novalue"], "--meta"),
            (vec!["--service", "a", "--control-plane", "ftp://x"], "--control-plane"),
            (vec!["--service", "a", "--control-plane", "https://a:7070,ftp://x"], "ftp://x"),
            (vec!["--service", "a", "--control-plane", "https://a:7070,,https://b:7070"], "--control-plane"),
            (vec!["--service", "a", "--connect-timeout", "soon"], "--connect-timeout"),
        ] {
            let error = parse(&args).expect_err(flag).to_string();
            assert!(error.contains(flag), "{flag}: {error}");
        }
    }

    #[test]
    fn control_plane_takes_one_url_as_before_or_several() {
        let config = parse(&["--service", "a"]).expect("parses");
        assert_eq!(config.control_plane.to_string(), "https://127.0.0.1:7070", "the default");
        let config = parse(&["--service", "a", "--control-plane", "http://10.0.0.5:7070"]).expect("parses");
        assert_eq!(config.control_plane.len(), 1);
        assert_eq!(config.control_plane.first().as_str(), "http://10.0.0.5:7070");
        let config = parse(&["--service", "a", "--control-plane", "https://cp-1:7070,https://cp-2:7070"]).expect("parses");
        let urls: Vec<&str> = config.control_plane.iter().map(|u| u.as_str()).collect();
        assert_eq!(urls, ["https://cp-1:7070", "https://cp-2:7070"]);
        let error =
            parse(&["--service", "a", "--control-plane", "https://a:7070,,https://b:7070"]).expect_err("empty").to_string();
        assert!(error.contains("--control-plane") && error.contains("URL 2 of 3 is empty"), "{error}");
    }

    #[test]
    fn dns_domains_default_to_consul_and_none_turns_them_off() {
        let domains = |args: &[&str]| -> Vec<String> {
            let args: Vec<&str> = ["--service", "a"].iter().chain(args).copied().collect();
            parse(&args).expect("parses").dns_aliases().iter().map(ToString::to_string).collect()
        };
        assert_eq!(domains(&[]), ["consul."]);
        assert_eq!(domains(&["--dns-domain", "none"]), Vec::<String>::new());
        assert_eq!(domains(&["--dns-domain", ""]), Vec::<String>::new());
        assert_eq!(domains(&["--dns-domain", "Consul,dc1.consul"]), ["consul.", "dc1.consul."]);
        assert_eq!(domains(&["--dns-domain", "consul", "--dns-domain", "mesh.example."]), ["consul.", "mesh.example."]);
        let error = parse(&["--service", "a", "--dns-domain", "ferry"]).expect_err("ferry is not an alias").to_string();
        assert!(error.contains("--dns-domain") && error.contains("always Ferry's own zone"), "{error}");
    }

    #[test]
    fn any_https_url_needs_the_ca_file() {
        let config = parse(&["--service", "a", "--control-plane", "http://a:7070,https://b:7070"]).expect("parses");
        let error = config.ca_pem().expect_err("no --ca-file").to_string();
        assert!(error.starts_with("--ca-file") && error.contains("https://b:7070"), "{error}");
        let config = parse(&["--service", "a", "--control-plane", "http://a:7070,http://b:7070"]).expect("parses");
        assert_eq!(config.ca_pem().expect("plaintext needs no roots"), None);
    }
}
