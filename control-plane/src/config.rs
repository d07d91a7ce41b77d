//! The control plane's command line. Every flag also reads a `FERRY_*` environment variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{registry::VipRange, store::StoreKind};

/// Ferry's control plane: the service registry, config push to sidecars, and the APIs.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-control-plane", version)]
pub struct Config {
    /// Address of the gRPC API and the sidecars' config streams.
    #[arg(long, env = "FERRY_GRPC", default_value = "0.0.0.0:7070", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub grpc: SocketAddr,

    /// Address of the HTTP/JSON API and /metrics.
    #[arg(long, env = "FERRY_HTTP", default_value = "0.0.0.0:7071", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub http: SocketAddr,

    /// Also serve the Consul-compatible API (see docs/consul.md) on this address, such as
    /// 127.0.0.1:8500, so Consul clients need no change. Plain HTTP (Consul clients' default),
    /// with the same tokens as the API: bind it to loopback or a trusted network.
    #[arg(long, env = "FERRY_CONSUL_HTTP", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub consul_http: Option<SocketAddr>,

    /// The datacenter the Consul-compatible API reports.
    #[arg(long, env = "FERRY_DATACENTER", default_value = "dc1", value_parser = parse_datacenter, value_name = "NAME")]
    pub datacenter: String,

    /// Address of the DNS interface (UDP and TCP): NAME.service.ferry and friends.
    #[arg(long, env = "FERRY_DNS", default_value = "0.0.0.0:8600", value_parser = ferry_runtime::parse_listen_addr, value_name = "ADDR")]
    pub dns: SocketAddr,

    /// TTL of DNS answers, and of the SOA minimum that bounds negative caching.
    #[arg(long, env = "FERRY_DNS_TTL", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub dns_ttl: Duration,

    /// Domains whose names DNS answers like those of ferry., so that apps set up for Consul
    /// find services as NAME.service.consul and _NAME._tcp.service.consul; repeat or
    /// comma-separate for more, `none` (or an empty value) for none.
    #[arg(long, env = "FERRY_DNS_DOMAIN", default_value = "consul", value_delimiter = ',', value_parser = ferry_dns::AliasDomain::parse_flag, value_name = "DOMAIN[,DOMAIN...]")]
    pub dns_domain: Vec<Option<ferry_dns::AliasDomain>>,

    /// Directory of the embedded store.
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "ferry-data", value_name = "DIR")]
    pub data_dir: PathBuf,

    /// Where the registry is kept: `redb` (a file under --data-dir), `memory` (lost on exit), or
    /// `etcd://HOST:PORT[,HOST:PORT...]`, shared by every replica on the same --etcd-prefix
    /// (needs a build with the `etcd` feature).
    #[arg(long, env = "FERRY_STORE", default_value = "redb", value_name = "STORE")]
    pub store: StoreKind,

    /// The key prefix of everything Ferry keeps in etcd; replicas on one prefix form one
    /// control plane.
    #[arg(long, env = "FERRY_ETCD_PREFIX", default_value = "/ferry/", value_parser = parse_etcd_prefix, value_name = "PREFIX")]
    pub etcd_prefix: String,

    /// This replica's id among the replicas on etcd. Default: the host name and a random
    /// suffix, new at every start.
    #[arg(long, env = "FERRY_REPLICA_ID", value_parser = parse_replica_id, value_name = "ID")]
    pub replica_id: Option<String>,

    /// The lease of a replica's liveness key in etcd: how soon after a replica dies the others
    /// notice, and another takes over its health checks.
    #[arg(long, env = "FERRY_REPLICA_TTL", default_value = "5s", value_parser = parse_replica_ttl, value_name = "DURATION")]
    pub replica_ttl: Duration,

    /// The longest a registry change waits before it is pushed to sidecars; changes within it
    /// are coalesced.
    #[arg(long, env = "FERRY_PUSH_MAX_DELAY", default_value = "50ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub push_max_delay: Duration,

    /// The range services' virtual IPs are allocated from (IPv4 or IPv6). Its network address,
    /// and for IPv4 its broadcast address, are never handed out.
    #[arg(long, env = "FERRY_VIP_CIDR", default_value = "240.240.0.0/16", value_name = "CIDR")]
    pub vip_cidr: VipRange,

    /// How long a service that has no instance left keeps its virtual IP before it is released.
    #[arg(long, env = "FERRY_VIP_RELEASE_AFTER", default_value = "24h", value_parser = parse_vip_release_after, value_name = "DURATION")]
    pub vip_release_after: Duration,

    /// How long the instance of a sidecar whose stream broke is kept (critical) for it to
    /// reconnect before it is removed.
    #[arg(long, env = "FERRY_RECONNECT_GRACE", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub reconnect_grace: Duration,

    /// Allow script checks on instances registered through the API: they run commands on the
    /// control plane's host, so they are off unless asked for.
    #[arg(long, env = "FERRY_ENABLE_SCRIPT_CHECKS")]
    pub enable_script_checks: bool,

    /// How API calls are authenticated: `token` (a bearer token on every call) or `none`
    /// (development only: anyone may do anything; workload certificates and mTLS stay on).
    #[arg(long, env = "FERRY_AUTH", value_enum, default_value_t = AuthMode::Token)]
    pub auth: AuthMode,

    /// The secret of the admin token, instead of one made at first start and written to
    /// <data-dir>/admin.token.
    #[arg(long, env = "FERRY_BOOTSTRAP_TOKEN", value_name = "SECRET", hide_env_values = true)]
    pub bootstrap_token: Option<String>,

    /// Whether the gRPC and HTTP listeners speak TLS, with a certificate from the mesh's CA
    /// (`off`: plaintext, for development).
    #[arg(long, env = "FERRY_API_TLS", value_enum, default_value_t = Switch::On)]
    pub api_tls: Switch,

    /// A name (DNS or IP) the API certificate covers; repeat for more. Default: the host name,
    /// localhost, the loopback addresses and the addresses the listeners are bound to.
    #[arg(long = "advertise-name", env = "FERRY_ADVERTISE_NAME", value_delimiter = ',', value_name = "NAME")]
    pub advertise_names: Vec<String>,

    /// The mesh's trust domain: workload identities are spiffe://<trust-domain>/service/<name>.
    #[arg(long, env = "FERRY_TRUST_DOMAIN", default_value = ferry_tls::identity::DEFAULT_TRUST_DOMAIN, value_parser = parse_trust_domain, value_name = "DOMAIN")]
    pub trust_domain: String,

    /// Lifetime of workload certificates; sidecars renew at 70 % of it (10s at least).
    #[arg(long, env = "FERRY_CERT_TTL", default_value = "24h", value_parser = parse_cert_ttl, value_name = "DURATION")]
    pub cert_ttl: Duration,

    /// An operator's issuer certificate (PEM; may be followed by its chain) to sign workload
    /// certificates with, instead of the control plane's own CA. Needs --ca-key.
    #[arg(long, env = "FERRY_CA_CERT", requires = "ca_key", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// The private key of --ca-cert (PEM).
    #[arg(long, env = "FERRY_CA_KEY", requires = "ca_cert", value_name = "FILE")]
    pub ca_key: Option<PathBuf>,

    /// A network health checks may target although it is link-local or a cloud metadata
    /// address (refused by default), such as 169.254.10.0/24; repeat for more.
    #[arg(long = "allow-check-target", env = "FERRY_ALLOW_CHECK_TARGET", value_delimiter = ',', value_name = "CIDR")]
    pub allow_check_targets: Vec<ipnet::IpNet>,

    #[command(flatten)]
    pub limits: LimitsConfig,

    /// Log filter, such as `info` or `ferry_control_plane=debug`.
    #[arg(long, env = "FERRY_LOG", default_value = "info", value_name = "FILTER")]
    pub log: String,
}

fn parse_datacenter(s: &str) -> Result<String, String> {
    ferry_proto::validate::locality("--datacenter", s).map_err(|e| e.reason)?;
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_owned())
}

fn parse_etcd_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || !s.ends_with('/') || s.len() > 200 || s.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{s:?}: a key prefix starting and ending with '/', such as /ferry/ (at most 200 characters)"));
    }
    Ok(s.to_owned())
}

fn parse_replica_id(s: &str) -> Result<String, String> {
    let valid =
        !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !valid {
        return Err(format!("{s:?}: 1 to 63 letters, digits, '-', '_' or '.'"));
    }
    Ok(s.to_owned())
}

fn parse_replica_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(2) || ttl > Duration::from_secs(300) || ttl.subsec_nanos() != 0 {
        return Err(format!("{s:?}: whole seconds from 2s to 300s (etcd leases count in seconds)"));
    }
    Ok(ttl)
}

fn parse_vip_release_after(s: &str) -> Result<Duration, String> {
    let after = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if after < Duration::from_secs(1) || after > Duration::from_secs(365 * 24 * 3600) {
        return Err(format!("{s:?} must be 1s to 365 days"));
    }
    Ok(after)
}

/// `--auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    Token,
    None,
}

/// An on/off flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// The bounds on what a peer can make the control plane (and every sidecar) hold. Each error
/// that hits one names it.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsConfig {
    /// Instances one service may have.
    #[arg(long, env = "FERRY_MAX_INSTANCES_PER_SERVICE", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000), value_name = "N")]
    pub max_instances_per_service: u32,

    /// Bytes of metadata (keys and values) one instance may carry.
    #[arg(long, env = "FERRY_MAX_METADATA_BYTES", default_value_t = 16 << 10, value_parser = clap::value_parser!(u32).range(64..=(1 << 20)), value_name = "BYTES")]
    pub max_metadata_bytes: u32,

    /// Checks one instance may have.
    #[arg(long, env = "FERRY_MAX_CHECKS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=(ferry_proto::validate::MAX_CHECKS as i64)), value_name = "N")]
    pub max_checks: u32,

    /// Header conditions (headers, header_regex, header_present) across one route's or
    /// authorization policy's rules.
    #[arg(long, env = "FERRY_MAX_HEADER_RULES", default_value_t = ferry_proto::validate::Limits::DEFAULT.header_rules as u32, value_parser = clap::value_parser!(u32).range(1..=(ferry_proto::validate::Limits::CEILING.header_rules as i64)), value_name = "N")]
    pub max_header_rules: u32,

    /// Regular expressions across one resource's rules.
    #[arg(long, env = "FERRY_MAX_REGEXES", default_value_t = ferry_proto::validate::Limits::DEFAULT.regexes as u32, value_parser = clap::value_parser!(u32).range(1..=(ferry_proto::validate::Limits::CEILING.regexes as i64)), value_name = "N")]
    pub max_regexes: u32,

    /// Compiled size of one resource's regular expressions together, in bytes.
    #[arg(long, env = "FERRY_MAX_REGEX_BYTES", default_value_t = ferry_proto::validate::Limits::DEFAULT.regex_bytes as u32, value_parser = clap::value_parser!(u32).range(1024..=(ferry_proto::validate::Limits::CEILING.regex_bytes as i64)), value_name = "BYTES")]
    pub max_regex_bytes: u32,

    /// Services one sidecar may subscribe to.
    #[arg(long, env = "FERRY_MAX_SUBSCRIPTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000), value_name = "N")]
    pub max_subscriptions: u32,

    /// Concurrent gRPC streams on one connection.
    #[arg(long, env = "FERRY_MAX_STREAMS_PER_CONNECTION", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000), value_name = "N")]
    pub max_streams_per_connection: u32,

    /// Bytes of error text kept from one NACK; the rest is cut.
    #[arg(long, env = "FERRY_MAX_NACK_BYTES", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..=(1 << 20)), value_name = "BYTES")]
    pub max_nack_bytes: u32,

    /// The largest push (encoded) sent to a sidecar; a change that would make a service's
    /// push larger is refused. Sidecars accept up to 64 MiB.
    #[arg(long, env = "FERRY_MAX_PUSH_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u32).range((64 << 10)..=(64 << 20)), value_name = "BYTES")]
    pub max_push_bytes: u32,

    /// Connections each API listener (gRPC, HTTP) holds open at once.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..=1_000_000), value_name = "N")]
    pub max_connections: u32,

    /// How long a new API connection may take to finish its TLS handshake, and an HTTP client
    /// to send a request's headers.
    #[arg(long, env = "FERRY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub handshake_timeout: Duration,
}

impl LimitsConfig {
    /// The limits resources are validated within.
    pub fn resources(&self) -> ferry_proto::validate::Limits {
        ferry_proto::validate::Limits {
            header_rules: self.max_header_rules as usize,
            regexes: self.max_regexes as usize,
            regex_bytes: self.max_regex_bytes as usize,
        }
    }
}

fn parse_trust_domain(s: &str) -> Result<String, String> {
    ferry_tls::identity::check_trust_domain(s)?;
    Ok(s.to_owned())
}

fn parse_cert_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if ttl < Duration::from_secs(10) || ttl > Duration::from_secs(365 * 24 * 3600) {
        return Err(format!("{s:?} must be 10s to 365 days"));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("ferry-control-plane").chain(args.iter().copied()))
    }

    #[test]
    fn dns_answers_consul_names_unless_told_otherwise() {
        let aliases = |config: &Config| config.dns_domain.iter().flatten().map(|d| d.to_string()).collect::<Vec<_>>();
        assert_eq!(aliases(&parse(&[]).expect("defaults")), ["consul."]);
        assert_eq!(aliases(&parse(&["--dns-domain", "consul,dc1.consul"]).expect("two")), ["consul.", "dc1.consul."]);
        assert!(aliases(&parse(&["--dns-domain", "none"]).expect("none")).is_empty());
        let error = parse(&["--dns-domain", "ferry"]).expect_err("the zone itself").to_string();
        assert!(error.contains("--dns-domain"), "{error}");
    }

    #[test]
    fn virtual_ips_come_from_240_240_0_0_16_and_are_released_after_a_day_by_default() {
        let config = parse(&[]).expect("defaults");
        assert_eq!(config.vip_cidr.to_string(), "240.240.0.0/16");
        assert_eq!(config.vip_release_after, Duration::from_secs(24 * 3600));
        let config = parse(&["--vip-cidr", "fd00:f0::/108", "--vip-release-after", "2s"]).expect("valid");
        assert_eq!((config.vip_cidr.to_string().as_str(), config.vip_release_after), ("fd00:f0::/108", Duration::from_secs(2)));
    }

    #[test]
    fn a_bad_virtual_ip_range_or_age_is_refused_naming_the_flag() {
        let error = parse(&["--vip-cidr", "240.240.1.0/16"]).expect_err("host bits").to_string();
        assert!(error.contains("--vip-cidr") && error.contains("did you mean 240.240.0.0/16"), "{error}");
        let error = parse(&["--vip-cidr", "10.0.0.0/31"]).expect_err("too small").to_string();
        assert!(error.contains("--vip-cidr") && error.contains("no address to hand out"), "{error}");
        let error = parse(&["--vip-release-after", "0s"]).expect_err("too short").to_string();
        assert!(error.contains("--vip-release-after"), "{error}");
    }
}
