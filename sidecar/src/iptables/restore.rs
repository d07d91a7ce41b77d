//! The `iptables-restore --noflush` scripts that install and uninstall Ferry's rules, computed
//! from what `iptables-save -t nat` shows now.
//!
//! One script is one transaction: the kernel (legacy) or nftables (nft) takes all of it or
//! none, so an install never leaves half its rules, and a reinstall swaps the old rules for the
//! new ones at once. Declaring a chain that exists (`:FERRY_OUTPUT - [0:0]`) flushes it under
//! `--noflush`, which is how stale rules go without a `-F` per chain.

use std::fmt::Write as _;

use super::rules::{CHAIN_PREFIX, CHAINS, Ruleset};

/// What the nat table holds of Ferry's: its chains, and every rule elsewhere that jumps to one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The chains whose name starts with `FERRY_`.
    pub chains: Vec<String>,
    /// Rules of other chains that jump (`-j`) or go (`-g`) to one of Ferry's, as saved
    /// (`-A OUTPUT -j FERRY_OUTPUT`).
    pub jumps: Vec<String>,
}

impl Installed {
    /// Reads the output of `iptables-save -t nat`.
    pub fn parse(save: &str) -> Self {
        let mut installed = Self::default();
        for line in save.lines().map(str::trim) {
            if let Some(declaration) = line.strip_prefix(':') {
                let name = declaration.split_whitespace().next().unwrap_or_default();
                if name.starts_with(CHAIN_PREFIX) {
                    installed.chains.push(name.to_owned());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let words = words(rule);
                let chain = words.first().map(String::as_str).unwrap_or_default();
                let jumps_to_ferry =
                    words.windows(2).any(|pair| matches!(pair[0].as_str(), "-j" | "-g") && pair[1].starts_with(CHAIN_PREFIX));
                if !chain.starts_with(CHAIN_PREFIX) && jumps_to_ferry {
                    installed.jumps.push(line.to_owned());
                }
            }
        }
        installed
    }

    /// Whether nothing of Ferry's is there.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// The script that replaces whatever of Ferry's is installed with `ruleset`: the old jumps
/// deleted, Ferry's chains declared (created, or flushed if they exist), chains of Ferry's that
/// the new rules do not use deleted, then the new rules appended, jumps last.
pub fn install(installed: &Installed, ruleset: &Ruleset) -> String {
    let mut script = String::from("*nat\n");
    remove_jumps(&mut script, installed);
    for chain in CHAINS {
        let _ = writeln!(script, ":{chain} - [0:0]");
    }
    let stale: Vec<&String> = installed.chains.iter().filter(|c| !CHAINS.contains(&c.as_str())).collect();
    for chain in &stale {
        let _ = writeln!(script, ":{chain} - [0:0]");
    }
    for chain in &stale {
        let _ = writeln!(script, "-X {chain}");
    }
    for rule in &ruleset.rules {
        let _ = writeln!(script, "{rule}");
    }
    script.push_str("COMMIT\n");
    script
}

/// The script that removes everything of Ferry's, or `None` when nothing is installed: the
/// jumps deleted, every chain of Ferry's flushed (so none still jumps to another) and deleted.
pub fn uninstall(installed: &Installed) -> Option<String> {
    if installed.is_empty() {
        return None;
    }
    let mut script = String::from("*nat\n");
    remove_jumps(&mut script, installed);
    for chain in &installed.chains {
        let _ = writeln!(script, ":{chain} - [0:0]");
    }
    for chain in &installed.chains {
        let _ = writeln!(script, "-X {chain}");
    }
    script.push_str("COMMIT\n");
    Some(script)
}

/// The words of a saved rule, as iptables-restore splits them: a double-quoted word (a
/// comment) is one word, so a comment that reads `-j FERRY_X` is not taken for a jump.
fn words(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                word.get_or_insert_with(String::new);
            }
            '\\' if quoted => word.get_or_insert_with(String::new).extend(chars.next()),
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// Deletes each saved jump by its own spec (`-A OUTPUT ...` becomes `-D OUTPUT ...`).
fn remove_jumps(script: &mut String, installed: &Installed) {
    for jump in &installed.jumps {
        let spec = jump.strip_prefix("-A ").unwrap_or(jump);
        let _ = writeln!(script, "-D {spec}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iptables::rules::{Family, Rule};

    /// What `iptables-save -t nat` printed after an install, with a rule of someone else's.
    const SAVED: &str = "# Generated by iptables-save v1.8.9 on Mon Dec  7 09:19:08 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:FERRY_OUTBOUND_REDIRECT - [0:0]
:FERRY_OUTPUT - [0:0]
:FERRY_OLD - [0:0]
-A PREROUTING -j FERRY_PREROUTING
-A OUTPUT -j FERRY_OUTPUT
-A OUTPUT -m comment --comment \"not -j FERRY_X\" -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE
-A FERRY_OUTPUT -o lo -j RETURN
-A FERRY_OUTPUT -p tcp -j FERRY_OUTBOUND_REDIRECT
COMMIT
";

    #[test]
    fn parsing_finds_ferrys_chains_and_the_jumps_to_them_and_nothing_else() {
        let installed = Installed::parse(SAVED);
        assert_eq!(installed.chains, ["FERRY_OUTBOUND_REDIRECT", "FERRY_OUTPUT", "FERRY_OLD"]);
        assert_eq!(installed.jumps, ["-A PREROUTING -j FERRY_PREROUTING", "-A OUTPUT -j FERRY_OUTPUT"]);
        assert!(Installed::parse("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j DOCKER\nCOMMIT\n").is_empty());
    }

    #[test]
    fn uninstall_deletes_the_jumps_then_flushes_and_deletes_every_chain() {
        let script = uninstall(&Installed::parse(SAVED)).expect("something to remove");
        assert_eq!(
            script,
            "*nat
-D PREROUTING -j FERRY_PREROUTING
-D OUTPUT -j FERRY_OUTPUT
:FERRY_OUTBOUND_REDIRECT - [0:0]
:FERRY_OUTPUT - [0:0]
:FERRY_OLD - [0:0]
-X FERRY_OUTBOUND_REDIRECT
-X FERRY_OUTPUT
-X FERRY_OLD
COMMIT
"
        );
        assert_eq!(uninstall(&Installed::default()), None, "nothing installed, nothing to run");
    }

    #[test]
    fn install_over_an_old_install_replaces_it_in_one_script() {
        let ruleset = Ruleset {
            family: Family::V4,
            rules: vec![
                Rule { chain: "FERRY_OUTPUT", spec: "-o lo -j RETURN".into() },
                Rule { chain: "OUTPUT", spec: "-j FERRY_OUTPUT".into() },
            ],
        };
        let script = install(&Installed::parse(SAVED), &ruleset);
        assert_eq!(
            script,
            "*nat
-D PREROUTING -j FERRY_PREROUTING
-D OUTPUT -j FERRY_OUTPUT
:FERRY_OUTPUT - [0:0]
:FERRY_PREROUTING - [0:0]
:FERRY_OUTBOUND_REDIRECT - [0:0]
:FERRY_INBOUND_REDIRECT - [0:0]
:FERRY_OLD - [0:0]
-X FERRY_OLD
-A FERRY_OUTPUT -o lo -j RETURN
-A OUTPUT -j FERRY_OUTPUT
COMMIT
"
        );
        let fresh = install(&Installed::default(), &ruleset);
        assert!(fresh.starts_with("*nat\n:FERRY_OUTPUT - [0:0]\n"), "{fresh}");
    }
}
