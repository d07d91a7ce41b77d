//! The rules of Ferry's interception as data: which chains exist and which rules each holds,
//! for one address family, computed from the checked flags of `install` and nothing else.
//!
//! Every rule is written exactly as `iptables-save` prints it back (`-p tcp -m tcp --dport 53`,
//! not `-p tcp --dport 53`), so the rules of a dry run can be compared line for line with what
//! the kernel holds after an install.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;

/// The prefix of every chain Ferry owns; `uninstall` removes every chain that has it.
pub const CHAIN_PREFIX: &str = "FERRY_";

/// Jumped to from nat OUTPUT: decides, for each connection the namespace opens, whether it is
/// left alone or redirected.
pub const OUTPUT: &str = "FERRY_OUTPUT";

/// Jumped to from nat PREROUTING: decides, for each connection arriving, whether it is left
/// alone or redirected.
pub const PREROUTING: &str = "FERRY_PREROUTING";

/// Redirects what reaches it to the sidecar's outbound listener.
pub const OUTBOUND_REDIRECT: &str = "FERRY_OUTBOUND_REDIRECT";

/// Redirects what reaches it to the sidecar's inbound listener.
pub const INBOUND_REDIRECT: &str = "FERRY_INBOUND_REDIRECT";

/// Every chain an install creates, in the order they are declared.
pub const CHAINS: [&str; 4] = [OUTPUT, PREROUTING, OUTBOUND_REDIRECT, INBOUND_REDIRECT];

/// The most ports one `-m multiport` match takes.
const MULTIPORT_LIMIT: usize = 15;

/// The DNS port, captured with `--capture-dns`.
const DNS: u16 = 53;

/// An address family: `iptables` handles one, `ip6tables` the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The command that handles this family by default.
    pub fn default_command(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// Whether `ip` belongs to this family.
    pub fn holds(self, ip: IpAddr) -> bool {
        matches!((self, ip), (Self::V4, IpAddr::V4(_)) | (Self::V6, IpAddr::V6(_)))
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// What `install` intercepts and what it leaves alone: its flags, checked, with the control
/// plane's host names resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    /// The sidecar's users and groups: their own connections are never redirected.
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin_port: u16,
    pub dns_port: u16,
    /// Redirect the app's DNS (UDP and TCP port 53) to `dns_port`.
    pub capture_dns: bool,
    /// The control plane's addresses, left alone on the way out.
    pub control_plane: Vec<SocketAddr>,
    pub skip_outbound_ports: Vec<u16>,
    pub skip_outbound_cidrs: Vec<IpNet>,
    pub skip_inbound_ports: Vec<u16>,
}

/// One rule of the nat table, as `iptables-save` prints it: `-A CHAIN SPEC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: String,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec)
    }
}

/// The rules of one family, in the order they are appended: those of Ferry's chains, then the
/// jumps from nat OUTPUT and PREROUTING, so nothing reaches a chain before it is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub rules: Vec<Rule>,
}

impl Interception {
    /// The sidecar's own ports, each once: inbound, outbound, admin, DNS.
    pub fn own_ports(&self) -> Vec<u16> {
        unique([self.inbound_port, self.outbound_port, self.admin_port, self.dns_port])
    }

    /// The rules of `family`. Items of the other family (its CIDRs, its control-plane
    /// addresses) are left out.
    pub fn ruleset(&self, family: Family) -> Ruleset {
        let mut rules = Vec::new();
        let mut push = |chain: &'static str, spec: String| rules.push(Rule { chain, spec });

        // Outbound. The sidecar's own connections first: they are what the redirect leads to,
        // and redirecting them would loop. Then DNS, before the loopback exemption, since a
        // stub resolver on 127.0.0.53 is reached through lo.
        for uid in &self.proxy_uids {
            push(OUTPUT, format!("-m owner --uid-owner {uid} -j RETURN"));
        }
        for gid in &self.proxy_gids {
            push(OUTPUT, format!("-m owner --gid-owner {gid} -j RETURN"));
        }
        if self.capture_dns {
            push(OUTPUT, format!("-p udp -m udp --dport {DNS} -j REDIRECT --to-ports {}", self.dns_port));
            push(OUTPUT, format!("-p tcp -m tcp --dport {DNS} -j REDIRECT --to-ports {}", self.dns_port));
        }
        // Everything through lo stays local: the app's own localhost services, the sidecar's
        // listeners, and the app calling its own address (as Istio and Linkerd leave it).
        push(OUTPUT, "-o lo -j RETURN".to_owned());
        for addr in self.control_plane.iter().filter(|addr| family.holds(addr.ip())) {
            let host = IpNet::from(addr.ip());
            push(OUTPUT, format!("-d {host} -p tcp -m tcp --dport {} -j RETURN", addr.port()));
        }
        for cidr in self.skip_outbound_cidrs.iter().filter(|cidr| family.holds(cidr.addr())) {
            push(OUTPUT, format!("-d {} -j RETURN", cidr.trunc()));
        }
        for ports in port_matches(&unique(self.skip_outbound_ports.iter().copied())) {
            push(OUTPUT, format!("-p tcp {ports} -j RETURN"));
        }
        push(OUTPUT, format!("-p tcp -j {OUTBOUND_REDIRECT}"));
        push(OUTBOUND_REDIRECT, format!("-p tcp -j REDIRECT --to-ports {}", self.outbound_port));

        // Inbound. What arrives on lo was sent from inside the namespace and was already
        // decided on the way out.
        push(PREROUTING, "-i lo -j RETURN".to_owned());
        for ports in port_matches(&self.own_ports()) {
            push(PREROUTING, format!("-p tcp {ports} -j RETURN"));
        }
        let skipped: Vec<u16> =
            unique(self.skip_inbound_ports.iter().copied()).into_iter().filter(|p| !self.own_ports().contains(p)).collect();
        for ports in port_matches(&skipped) {
            push(PREROUTING, format!("-p tcp {ports} -j RETURN"));
        }
        push(PREROUTING, format!("-p tcp -j {INBOUND_REDIRECT}"));
        push(INBOUND_REDIRECT, format!("-p tcp -j REDIRECT --to-ports {}", self.inbound_port));

        // The jumps: OUTPUT carries UDP too, for DNS; PREROUTING only TCP is redirected.
        push("OUTPUT", format!("-j {OUTPUT}"));
        push("PREROUTING", format!("-j {PREROUTING}"));
        Ruleset { family, rules }
    }
}

/// `ports` without repeats, in their first order.
fn unique(ports: impl IntoIterator<Item = u16>) -> Vec<u16> {
    let mut seen = Vec::new();
    for port in ports {
        if !seen.contains(&port) {
            seen.push(port);
        }
    }
    seen
}

/// TCP destination-port matches covering `ports`: `-m tcp --dport P` for one, `-m multiport
/// --dports P,Q` for several, at most [`MULTIPORT_LIMIT`] a rule.
fn port_matches(ports: &[u16]) -> Vec<String> {
    ports
        .chunks(MULTIPORT_LIMIT)
        .map(|chunk| match chunk {
            [one] => format!("-m tcp --dport {one}"),
            several => {
                let list: Vec<String> = several.iter().map(u16::to_string).collect();
                format!("-m multiport --dports {}", list.join(","))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flags of `install --proxy-gid 1337`, everything else by default.
    fn defaults() -> Interception {
        Interception {
            proxy_uids: vec![],
            proxy_gids: vec![1337],
            outbound_port: 15001,
            inbound_port: 15006,
            admin_port: 15000,
            dns_port: 15053,
            capture_dns: false,
            control_plane: vec![],
            skip_outbound_ports: vec![],
            skip_outbound_cidrs: vec![],
            skip_inbound_ports: vec![],
        }
    }

    fn lines(ruleset: &Ruleset) -> Vec<String> {
        ruleset.rules.iter().map(Rule::to_string).collect()
    }

    #[test]
    fn a_default_install_redirects_all_tcp_but_the_proxys_own_and_loopback() {
        let expected = [
            "-A FERRY_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A FERRY_OUTPUT -o lo -j RETURN",
            "-A FERRY_OUTPUT -p tcp -j FERRY_OUTBOUND_REDIRECT",
            "-A FERRY_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A FERRY_PREROUTING -i lo -j RETURN",
            "-A FERRY_PREROUTING -p tcp -m multiport --dports 15006,15001,15000,15053 -j RETURN",
            "-A FERRY_PREROUTING -p tcp -j FERRY_INBOUND_REDIRECT",
            "-A FERRY_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A OUTPUT -j FERRY_OUTPUT",
            "-A PREROUTING -j FERRY_PREROUTING",
        ];
        assert_eq!(lines(&defaults().ruleset(Family::V4)), expected);
        assert_eq!(lines(&defaults().ruleset(Family::V6)), expected, "nothing family-specific by default");
    }

    #[test]
    fn every_rule_lands_in_a_chain_of_ferrys_or_is_one_jump_from_nat_output_or_prerouting() {
        let ruleset = defaults().ruleset(Family::V4);
        let foreign: Vec<&Rule> = ruleset.rules.iter().filter(|r| !r.chain.starts_with(CHAIN_PREFIX)).collect();
        assert_eq!(foreign.len(), 2);
        assert!(foreign.iter().all(|r| r.spec.starts_with("-j FERRY_")), "{foreign:?}");
        assert!(ruleset.rules.iter().all(|r| !r.chain.starts_with(CHAIN_PREFIX) || CHAINS.contains(&r.chain)));
    }

    #[test]
    fn proxy_users_and_groups_each_get_an_exemption_before_anything_else() {
        let interception = Interception { proxy_uids: vec![1337, 1338], proxy_gids: vec![2000], ..defaults() };
        let rules = lines(&interception.ruleset(Family::V4));
        assert_eq!(
            rules[..3],
            [
                "-A FERRY_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A FERRY_OUTPUT -m owner --uid-owner 1338 -j RETURN",
                "-A FERRY_OUTPUT -m owner --gid-owner 2000 -j RETURN",
            ]
        );
    }

    #[test]
    fn capture_dns_redirects_udp_and_tcp_53_after_the_proxy_and_before_loopback() {
        let interception = Interception { capture_dns: true, dns_port: 5353, ..defaults() };
        let rules = lines(&interception.ruleset(Family::V4));
        assert_eq!(
            rules[..4],
            [
                "-A FERRY_OUTPUT -m owner --gid-owner 1337 -j RETURN",
                "-A FERRY_OUTPUT -p udp -m udp --dport 53 -j REDIRECT --to-ports 5353",
                "-A FERRY_OUTPUT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 5353",
                "-A FERRY_OUTPUT -o lo -j RETURN",
            ]
        );
        assert!(rules.contains(&"-A FERRY_PREROUTING -p tcp -m multiport --dports 15006,15001,15000,5353 -j RETURN".to_owned()));
        assert!(
            !lines(&defaults().ruleset(Family::V4)).iter().any(|r| r.contains("--dport 53 ")),
            "no DNS rule without the flag"
        );
    }

    #[test]
    fn skips_come_after_loopback_and_before_the_redirect_each_in_its_family() {
        let interception = Interception {
            control_plane: vec!["10.0.0.5:7070".parse().expect("addr"), "[fd00::5]:7070".parse().expect("addr")],
            skip_outbound_cidrs: vec!["10.1.2.3/16".parse().expect("cidr"), "fd00:1::/64".parse().expect("cidr")],
            skip_outbound_ports: vec![5432, 6379, 5432],
            skip_inbound_ports: vec![22, 15006],
            ..defaults()
        };
        let v4 = lines(&interception.ruleset(Family::V4));
        assert_eq!(
            v4[1..6],
            [
                "-A FERRY_OUTPUT -o lo -j RETURN",
                "-A FERRY_OUTPUT -d 10.0.0.5/32 -p tcp -m tcp --dport 7070 -j RETURN",
                "-A FERRY_OUTPUT -d 10.1.0.0/16 -j RETURN",
                "-A FERRY_OUTPUT -p tcp -m multiport --dports 5432,6379 -j RETURN",
                "-A FERRY_OUTPUT -p tcp -j FERRY_OUTBOUND_REDIRECT",
            ]
        );
        assert!(v4.contains(&"-A FERRY_PREROUTING -p tcp -m tcp --dport 22 -j RETURN".to_owned()));
        assert!(!v4.iter().any(|r| r.contains("fd00")), "{v4:#?}");
        let v6 = lines(&interception.ruleset(Family::V6));
        assert_eq!(
            v6[2..4],
            ["-A FERRY_OUTPUT -d fd00::5/128 -p tcp -m tcp --dport 7070 -j RETURN", "-A FERRY_OUTPUT -d fd00:1::/64 -j RETURN"]
        );
        assert!(!v6.iter().any(|r| r.contains("10.")), "{v6:#?}");
        assert!(v6.contains(&"-A FERRY_PREROUTING -p tcp -m tcp --dport 22 -j RETURN".to_owned()));
    }

    #[test]
    fn more_than_fifteen_ports_take_several_multiport_rules() {
        let interception = Interception { skip_inbound_ports: (1..=20).collect(), ..defaults() };
        let rules = lines(&interception.ruleset(Family::V4));
        let first: Vec<String> = (1..=15).map(|p: u16| p.to_string()).collect();
        assert!(rules.contains(&format!("-A FERRY_PREROUTING -p tcp -m multiport --dports {} -j RETURN", first.join(","))));
        assert!(rules.contains(&"-A FERRY_PREROUTING -p tcp -m multiport --dports 16,17,18,19,20 -j RETURN".to_owned()));
    }

    #[test]
    fn own_ports_are_listed_once_even_when_flags_repeat_one() {
        let interception = Interception { admin_port: 15001, ..defaults() };
        assert_eq!(interception.own_ports(), [15006, 15001, 15053]);
    }
}
