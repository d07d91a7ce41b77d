//! Network namespaces for the interception tests: a lab of hosts, each a namespace of its own
//! with a veth pair to a bridge in a hub namespace, all created by the test and removed when the
//! lab is dropped. Nothing outside those namespaces is touched.
//!
//! They need root (`ip netns`, `iptables`); [`skip_reason`] says why they cannot run here.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command as StdCommand, Output, Stdio},
};

use tokio::process::Command;

use crate::{PATIENCE, Process, binary};

/// The group the sidecars run as, which `iptables install --proxy-gid` exempts.
pub const PROXY_GID: u32 = 1337;

/// Whether the namespace tests must skip here: says why on stderr when they must, and fails
/// instead when `FERRY_REQUIRE_NETNS` is set (as CI sets it, running as root).
pub fn must_skip(suite: &str) -> bool {
    let Some(why) = skip_reason() else { return false };
    assert!(std::env::var_os("FERRY_REQUIRE_NETNS").is_none(), "{suite}: FERRY_REQUIRE_NETNS is set but {why}");
    eprintln!("skipping {suite}: {why}");
    true
}

/// Why the namespace tests cannot run on this machine, if they cannot.
pub fn skip_reason() -> Option<String> {
    let uid = StdCommand::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.as_deref() != Some("0") {
        return Some("not root: network namespaces and iptables need root (CAP_NET_ADMIN)".into());
    }
    for (program, arg) in [("ip", "-V"), ("iptables", "--version"), ("curl", "--version")] {
        let ran = StdCommand::new(program).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !ran.is_ok_and(|s| s.success()) {
            return Some(format!("`{program}` is missing (apt-get install -y iproute2 iptables curl)"));
        }
    }
    let probe = format!("ferry-probe-{}", std::process::id());
    let created = StdCommand::new("ip").args(["netns", "add", &probe]).stderr(Stdio::null()).status();
    let _ = StdCommand::new("ip").args(["netns", "del", &probe]).stderr(Stdio::null()).status();
    if !created.is_ok_and(|s| s.success()) {
        return Some("`ip netns add` is not permitted here".into());
    }
    None
}

/// Hosts on one bridge, each in its own namespace; the hub holds the bridge at `.1` (and
/// `fd77:SUBNET::1`).
pub struct Lab {
    id: String,
    subnet: u8,
    hosts: Vec<String>,
}

/// Runs `command`, failing the test with its output when it fails.
fn must(command: &mut StdCommand) {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(output.status.success(), "{command:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

impl Lab {
    /// The hub and one namespace per host in `hosts`, addressed `10.SUBNET.0.2` onwards in the
    /// order given, each with a default route through the hub (so that virtual IPs, which
    /// nothing routes, still leave the app and meet the interception rules).
    pub fn new(hosts: &[&str]) -> Self {
        let id = format!("{:x}", std::process::id() % 0xffff);
        // 10.200-249: away from the usual private ranges.
        let subnet = 200 + (std::process::id() % 50) as u8;
        let mut lab = Self { id, subnet, hosts: Vec::new() };
        let hub = lab.ns("hub");
        must(StdCommand::new("ip").args(["netns", "add", &hub]));
        lab.hosts.push("hub".into());
        let bridge = format!("fb{}", lab.id);
        must(StdCommand::new("ip").args(["-n", &hub, "link", "set", "lo", "up"]));
        must(StdCommand::new("ip").args(["-n", &hub, "link", "add", &bridge, "type", "bridge"]));
        must(StdCommand::new("ip").args(["-n", &hub, "addr", "add", &format!("{}/24", lab.ip("hub")), "dev", &bridge]));
        must(StdCommand::new("ip").args(["-n", &hub, "addr", "add", &format!("{}/64", lab.ip6("hub")), "dev", &bridge, "nodad"]));
        must(StdCommand::new("ip").args(["-n", &hub, "link", "set", &bridge, "up"]));
        for (i, host) in hosts.iter().enumerate() {
            let ns = lab.ns(host);
            must(StdCommand::new("ip").args(["netns", "add", &ns]));
            lab.hosts.push((*host).to_owned());
            let (inside, outside) = (format!("fh{}i{i}", lab.id), format!("fh{}o{i}", lab.id));
            must(StdCommand::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
            must(
                StdCommand::new("ip")
                    .args(["-n", &ns, "link", "add", &inside, "type", "veth", "peer", "name", &outside, "netns", &hub]),
            );
            must(StdCommand::new("ip").args(["-n", &ns, "addr", "add", &format!("{}/24", lab.ip(host)), "dev", &inside]));
            must(StdCommand::new("ip").args([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/64", lab.ip6(host)),
                "dev",
                &inside,
                "nodad",
            ]));
            must(StdCommand::new("ip").args(["-n", &ns, "link", "set", &inside, "up"]));
            must(StdCommand::new("ip").args(["-n", &hub, "link", "set", &outside, "master", &bridge]));
            must(StdCommand::new("ip").args(["-n", &hub, "link", "set", &outside, "up"]));
            must(StdCommand::new("ip").args(["-n", &ns, "route", "add", "default", "via", &lab.ip("hub").to_string()]));
        }
        lab
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("ferry-{}-{host}", self.id)
    }

    /// The address of `host` (the hub's is `.1`).
    pub fn ip(&self, host: &str) -> Ipv4Addr {
        let index = if host == "hub" {
            1
        } else {
            2 + self.hosts.iter().skip(1).position(|h| h == host).unwrap_or(self.hosts.len().saturating_sub(1)) as u8
        };
        Ipv4Addr::new(10, self.subnet, 0, index)
    }

    /// The IPv6 address of `host`: `fd77:SUBNET::N`, N as in [`Lab::ip`].
    pub fn ip6(&self, host: &str) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, u16::from(self.subnet), 0, 0, 0, 0, 0, u16::from(self.ip(host).octets()[3]))
    }

    /// Writes `host`'s `/etc/resolv.conf` (`ip netns exec` mounts `/etc/netns/NS/resolv.conf`).
    pub fn resolv_conf(&self, host: &str, content: &str) {
        let dir = self.etc(host);
        std::fs::create_dir_all(&dir).expect("creates /etc/netns/NS");
        std::fs::write(dir.join("resolv.conf"), content).expect("writes resolv.conf");
    }

    fn etc(&self, host: &str) -> PathBuf {
        PathBuf::from("/etc/netns").join(self.ns(host))
    }

    /// `PROGRAM ARGS` inside `host`, as a command to adjust and start.
    pub fn command(&self, host: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host), program]).args(args).kill_on_drop(true);
        command
    }

    /// Runs `PROGRAM ARGS` inside `host` to its end, within the harness's patience.
    pub async fn run(&self, host: &str, program: &str, args: &[&str]) -> Output {
        let mut command = self.command(host, program, args);
        command.stdin(Stdio::null());
        match tokio::time::timeout(PATIENCE, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => panic!("{program} {args:?} in {host}: {error}"),
            Err(_) => panic!("{program} {args:?} in {host} did not end within {PATIENCE:?}"),
        }
    }

    /// Starts Ferry's `binary_name ARGS` inside `host` (as group `gid`, when given) and waits
    /// for its "listening" line.
    pub async fn start(&self, host: &str, name: &str, binary_name: &str, args: &[String], gid: Option<u32>) -> Process {
        let path = binary(binary_name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = self.command(host, &path.display().to_string(), &args);
        if let Some(gid) = gid {
            command.gid(gid);
        }
        Process::start_command(name, command).await
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = StdCommand::new("ip").args(["netns", "del", &self.ns(host)]).stderr(Stdio::null()).status();
            let _ = std::fs::remove_dir_all(self.etc(host));
        }
    }
}
