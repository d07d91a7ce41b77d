//! `ferry-sidecar iptables install|uninstall` against the kernel: in a network namespace of the
//! test's own, installing twice leaves exactly the rules a dry run printed, once; uninstalling
//! leaves the nat tables as they were; a dry run changes nothing; and, where python3 is there
//! to play app and sidecar, connections and DNS really are redirected. Each backend that is
//! installed (iptables-legacy and iptables-nft) is tested.
//!
//! It needs root, `ip` and `iptables` (and python3 for the redirect test); without them each
//! test says it is skipping and passes, unless `FERRY_REQUIRE_NETNS=1` (as CI sets) makes a
//! missing prerequisite fail the test, so that a run that checked nothing cannot pass.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

/// The flags of the install under test, besides the command choosing the backend.
const INSTALL: &[&str] = &[
    "install",
    "--proxy-gid",
    "1337",
    "--capture-dns",
    "--skip-inbound-ports",
    "22",
    "--skip-outbound-ports",
    "5432,6379",
    "--skip-outbound-cidrs",
    "10.96.0.0/12,fd00:96::/64",
    "--control-plane",
    "http://10.0.0.5:7070,http://[fd00::5]:7070",
];

/// A network namespace that is deleted when the test ends, however it ends.
struct Namespace {
    name: String,
}

impl Namespace {
    fn create() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("ferry-ipt-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let output = Command::new("ip").args(["netns", "add", &name]).output().expect("runs ip");
        assert!(output.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&output.stderr));
        let namespace = Self { name };
        namespace.ok("ip", &["link", "set", "lo", "up"]);
        namespace
    }

    /// Runs `program args` inside the namespace.
    fn exec(&self, program: &Path, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {}: {e}", self.name, program.display()))
    }

    /// Runs `program args` inside the namespace, failing the test if it fails; its stdout.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let output = self.exec(Path::new(program), args);
        assert!(output.status.success(), "{program} {args:?}: {}{}", stdout(&output), stderr(&output));
        stdout(&output)
    }

    /// The nat table as `save` prints it, without its comments and with counters zeroed.
    fn nat(&self, save: &str) -> String {
        self.ok(save, &["-t", "nat"])
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| match line.rsplit_once(" [") {
                Some((chain, _counters)) if line.starts_with(':') => format!("{chain} [0:0]"),
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// One backend's commands: `iptables-legacy`, `iptables-nft`, or plain `iptables`.
struct Backend {
    iptables: &'static str,
    ip6tables: &'static str,
}

impl Backend {
    fn save(command: &str) -> String {
        format!("{command}-save")
    }
}

/// Whether a test can run here: when `reason` says it cannot, it skips, unless
/// `FERRY_REQUIRE_NETNS=1` asks for it to run, and then it fails.
fn can_run(reason: Option<String>) -> bool {
    let Some(reason) = reason else { return true };
    if std::env::var_os("FERRY_REQUIRE_NETNS").is_some_and(|v| v == "1") {
        panic!("FERRY_REQUIRE_NETNS=1, but this test cannot run: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some("not root: creating a network namespace and writing its iptables needs root".into());
    }
    for tool in ["ip", "iptables", "iptables-save"] {
        if !on_path(tool) {
            return Some(format!("`{tool}` is not installed (apt-get install iproute2 iptables)"));
        }
    }
    None
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// The backends to test: legacy and nft when both are installed, else whatever `iptables` is.
fn backends() -> Vec<Backend> {
    if on_path("iptables-legacy") && on_path("iptables-nft") {
        vec![
            Backend { iptables: "iptables-legacy", ip6tables: "ip6tables-legacy" },
            Backend { iptables: "iptables-nft", ip6tables: "ip6tables-nft" },
        ]
    } else {
        vec![Backend { iptables: "iptables", ip6tables: "ip6tables" }]
    }
}

fn sidecar() -> PathBuf {
    ferry_tests::binary("ferry-sidecar")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `ferry-sidecar iptables ARGS` in `namespace`, expecting success; its stdout.
fn iptables(namespace: &Namespace, args: &[&str]) -> String {
    let args: Vec<&str> = std::iter::once("iptables").chain(args.iter().copied()).collect();
    let output = namespace.exec(&sidecar(), &args);
    assert!(output.status.success(), "ferry-sidecar {args:?} failed ({}): {}", output.status, stderr(&output));
    stdout(&output)
}

/// The rules of Ferry's in a saved table or a dry run's scripts: those of FERRY_ chains and
/// the jumps to them, by chain, in order.
fn ferry_rules<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<String, Vec<String>> {
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        let Some(rule) = line.strip_prefix("-A ") else { continue };
        let chain = rule.split_whitespace().next().unwrap_or_default();
        if chain.starts_with("FERRY_") || rule.contains(" -j FERRY_") {
            rules.entry(chain.to_owned()).or_default().push(line.to_owned());
        }
    }
    rules
}

/// The dry run's script for one family (`# IPv4` or `# IPv6`): the lines of its heredoc.
fn dry_run_script<'a>(dry_run: &'a str, family: &str) -> Vec<&'a str> {
    let mut lines = dry_run.lines().skip_while(|l| *l != format!("# {family}")).skip(2);
    let script: Vec<&str> = lines.by_ref().take_while(|l| *l != "EOF").collect();
    assert!(!script.is_empty(), "no {family} script in the dry run:\n{dry_run}");
    script
}

/// Whether `ip6tables` can list its nat table in the namespace. A new namespace has no IPv6
/// address but `::1`, so where it cannot, `--ipv6 auto` skips IPv6.
fn has_ipv6(namespace: &Namespace, ip6tables: &str) -> bool {
    namespace.exec(Path::new(&Backend::save(ip6tables)), &["-t", "nat"]).status.success()
}

#[test]
fn install_twice_leaves_one_copy_of_the_dry_runs_rules_and_uninstall_restores_the_tables() {
    if !can_run(skip_reason()) {
        return;
    }
    for backend in backends() {
        let namespace = Namespace::create();
        let (save4, save6) = (Backend::save(backend.iptables), Backend::save(backend.ip6tables));
        let ipv6 = has_ipv6(&namespace, backend.ip6tables);
        let before4 = namespace.nat(&save4);
        let before6 = ipv6.then(|| namespace.nat(&save6));
        let flags: Vec<&str> = INSTALL.iter().copied().chain(["--iptables-command", backend.iptables]).collect();

        let dry_run = iptables(&namespace, &[&flags[..], &["--dry-run"]].concat());
        assert_eq!(namespace.nat(&save4), before4, "{}: a dry run changes nothing", backend.iptables);
        assert_eq!(ipv6.then(|| namespace.nat(&save6)), before6, "{}: a dry run changes nothing", backend.ip6tables);

        iptables(&namespace, &flags);
        iptables(&namespace, &flags);

        let mut families = vec![("IPv4", backend.iptables, save4.as_str(), before4)];
        if let Some(before6) = before6 {
            families.push(("IPv6", backend.ip6tables, save6.as_str(), before6));
        } else {
            eprintln!("{}: no IPv6 nat table in the namespace; only IPv4 checked", backend.ip6tables);
        }
        for (family, command, save, _) in &families {
            let table = namespace.nat(save);
            let expected = ferry_rules(dry_run_script(&dry_run, family).into_iter());
            assert_eq!(ferry_rules(table.lines()), expected, "{command}: the table holds the dry run's rules, once\n{table}");
            for chain in ["FERRY_OUTPUT", "FERRY_PREROUTING", "FERRY_OUTBOUND_REDIRECT", "FERRY_INBOUND_REDIRECT"] {
                let declared = table.lines().filter(|l| l.starts_with(&format!(":{chain} "))).count();
                assert_eq!(declared, 1, "{command}: {chain} exists once\n{table}");
            }
            let rules = |needle: &str| table.lines().filter(|l| l.contains(needle)).count();
            assert_eq!(rules("-m owner --gid-owner 1337 -j RETURN"), 1, "{command}\n{table}");
            assert_eq!(rules("-p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"), 1, "{command}\n{table}");
            assert_eq!(rules("-A FERRY_PREROUTING -p tcp -m tcp --dport 22 -j RETURN"), 1, "{command}\n{table}");
            let (own, other) = if *family == "IPv4" { ("-d 10.0.0.5/32", "fd00") } else { ("-d fd00::5/128", "10.") };
            assert_eq!(rules(&format!("{own} -p tcp -m tcp --dport 7070 -j RETURN")), 1, "{command}\n{table}");
            assert_eq!(rules(other), 0, "{command}: nothing of the other family\n{table}");
            // iptables itself agrees the jumps and the redirects are there.
            namespace.ok(command, &["-t", "nat", "-C", "OUTPUT", "-j", "FERRY_OUTPUT"]);
            namespace.ok(command, &["-t", "nat", "-C", "PREROUTING", "-j", "FERRY_PREROUTING"]);
            namespace.ok(
                command,
                &["-t", "nat", "-C", "FERRY_OUTBOUND_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
            );
            namespace.ok(
                command,
                &["-t", "nat", "-C", "FERRY_INBOUND_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006"],
            );
        }

        let uninstall = ["uninstall", "--iptables-command", backend.iptables];
        iptables(&namespace, &uninstall);
        for (_, command, save, before) in &families {
            assert_eq!(&namespace.nat(save), before, "{command}: uninstall leaves the table as it was");
        }
        iptables(&namespace, &uninstall);
        let dry_run = iptables(&namespace, &[&uninstall[..], &["--dry-run"]].concat());
        assert!(dry_run.starts_with("# IPv4: nothing of Ferry's is installed"), "{dry_run}");
    }
}

#[test]
fn uninstall_with_nothing_installed_succeeds_and_changes_nothing() {
    if !can_run(skip_reason()) {
        return;
    }
    let namespace = Namespace::create();
    let before = namespace.nat("iptables-save");
    iptables(&namespace, &["uninstall"]);
    assert_eq!(namespace.nat("iptables-save"), before);
}

#[test]
fn failures_exit_1_and_bad_usage_64_with_the_reason() {
    if !can_run(skip_reason()) {
        return;
    }
    let namespace = Namespace::create();
    let before = namespace.nat("iptables-save");
    let output = namespace.exec(&sidecar(), &["iptables", "install", "--capture-dns"]);
    assert_eq!(output.status.code(), Some(64), "{}", stderr(&output));
    assert!(stderr(&output).contains("--proxy-uid or --proxy-gid: one is needed"), "{}", stderr(&output));

    let output = namespace
        .exec(&sidecar(), &["iptables", "install", "--proxy-uid", "1337", "--iptables-command", "/nonexistent/iptables"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("/nonexistent/iptables-save: not found"), "{}", stderr(&output));
    assert_eq!(namespace.nat("iptables-save"), before, "nothing was changed");
}

#[test]
fn install_under_auto_fails_rather_than_leave_a_global_ipv6_address_unintercepted() {
    if !can_run(skip_reason()) {
        return;
    }
    let namespace = Namespace::create();
    let before = namespace.nat("iptables-save");
    // An ip6tables that cannot list its table, as where the kernel has no IPv6 NAT.
    let install = ["iptables", "install", "--proxy-gid", "1337", "--ip6tables-command", "/nonexistent/ip6tables"];

    let output = namespace.exec(&sidecar(), &install);
    assert!(output.status.success(), "only ::1: nothing to intercept over IPv6: {}", stderr(&output));
    assert!(stderr(&output).contains("IPv6: skipped, since the rules cannot be read and the namespace has no IPv6 address besides loopback and link-local ones"), "{}", stderr(&output));
    iptables(&namespace, &["uninstall", "--ip6tables-command", "/nonexistent/ip6tables"]);
    assert_eq!(namespace.nat("iptables-save"), before);

    namespace.ok("ip", &["link", "add", "ferry0", "type", "veth", "peer", "name", "ferry1"]);
    namespace.ok("ip", &["link", "set", "ferry0", "up"]);
    namespace.ok("ip", &["addr", "add", "fd00:9::1/64", "dev", "ferry0", "nodad"]);
    let output = namespace.exec(&sidecar(), &install);
    let said = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("error: --ipv6 auto: the namespace has IPv6 addresses (fd00:9::1/64 on ferry0), but the IPv6 rules cannot be read: /nonexistent/ip6tables-save: not found"), "{said}");
    assert!(said.contains("pass --ipv6 off to accept that risk knowingly"), "{said}");
    assert_eq!(namespace.nat("iptables-save"), before, "nothing was changed");

    iptables(&namespace, &[&install[1..], &["--ipv6", "off"]].concat());
    assert_ne!(namespace.nat("iptables-save"), before, "--ipv6 off installs IPv4 alone");
    iptables(&namespace, &["uninstall", "--ip6tables-command", "/nonexistent/ip6tables"]);
    assert_eq!(namespace.nat("iptables-save"), before, "uninstall skips the IPv6 it cannot list");
}

/// Plays the app and the sidecar in the namespace: listens where the sidecar would, then checks
/// that a connection to a remote address arrives at the outbound port with its original
/// destination, DNS arrives at the DNS port, loopback is left alone, and the proxy's group is
/// never redirected. Prints one line per check.
const PLAY: &str = r#"
import os, socket, struct
outbound = socket.socket(); outbound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
outbound.bind(("127.0.0.1", 15001)); outbound.listen(8); outbound.settimeout(5)
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); dns.bind(("127.0.0.1", 15053)); dns.settimeout(5)

app = socket.create_connection(("10.9.0.2", 8080), timeout=5)
accepted, _ = outbound.accept()
raw = accepted.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
port, ip = struct.unpack("!2xH4s8x", raw)
print("outbound", socket.inet_ntoa(ip), port)

query = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); query.sendto(b"query", ("10.9.0.53", 53))
data, _ = dns.recvfrom(100)
print("dns", data.decode())

try:
    socket.create_connection(("127.0.0.1", 8080), timeout=5); print("loopback redirected")
except ConnectionRefusedError:
    print("loopback left alone")

pid = os.fork()
if pid == 0:
    os.setgid(1337)
    s = socket.socket(); s.settimeout(0.5)
    try:
        s.connect(("10.9.0.2", 8080)); os._exit(1)
    except (socket.timeout, OSError):
        os._exit(0)
_, status = os.waitpid(pid, 0)
outbound.settimeout(0.2)
try:
    outbound.accept(); print("proxy redirected")
except socket.timeout:
    print("proxy left alone" if status == 0 else "proxy connected somewhere")
"#;

#[test]
fn installed_rules_redirect_the_apps_connections_and_dns_but_not_loopback_or_the_proxy() {
    if !can_run(skip_reason()) {
        return;
    }
    let python = (!on_path("python3")).then(|| "python3 is not installed, and it plays the app and the sidecar here".into());
    if !can_run(python) {
        return;
    }
    let namespace = Namespace::create();
    // A network besides loopback (a veth pair whose far end answers nothing), so that remote
    // addresses can be dialled.
    namespace.ok("ip", &["link", "add", "ferry0", "type", "veth", "peer", "name", "ferry1"]);
    namespace.ok("ip", &["addr", "add", "10.9.0.1/24", "dev", "ferry0"]);
    namespace.ok("ip", &["link", "set", "ferry0", "up"]);
    namespace.ok("ip", &["link", "set", "ferry1", "up"]);
    iptables(&namespace, &["install", "--proxy-gid", "1337", "--capture-dns", "--ipv6", "off"]);
    let played = namespace.ok("python3", &["-c", PLAY]);
    assert_eq!(played, "outbound 10.9.0.2 8080\ndns query\nloopback left alone\nproxy left alone\n");
}
