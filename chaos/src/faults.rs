//! The faults: what each does to the mesh, how it is injected and how it is removed. Network
//! faults act on one host's link (both ends of its veth pair, so both directions), inside the
//! namespaces the suite created; nothing else is touched.

use std::{path::PathBuf, process::Command as StdCommand};

use crate::mesh::{Mesh, run};

/// The catalog instance network faults and kills are aimed at.
pub const VICTIM: &str = "catalog-1";

/// One fault of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `netem delay 100ms 50ms` on the victim's link.
    Delay,
    /// `netem loss N%` on the victim's link.
    Loss(u8),
    /// `netem duplicate 10%` on the victim's link.
    Duplicate,
    /// `netem delay 10ms reorder 25% 50%` on the victim's link.
    Reorder,
    /// Every packet on the victim's link dropped (iptables in its namespace).
    PartitionInstance,
    /// Every packet on the control plane's link dropped.
    PartitionControlPlane,
    /// `kill -9` of the victim's app, started again at removal.
    KillApp,
    /// `kill -9` of the victim's sidecar, started again at removal.
    KillSidecar,
    /// `kill -9` of the control plane, started again at removal.
    KillControlPlane,
    /// The control plane's data directory (a 16 MiB tmpfs) filled to the last byte.
    DiskFull,
}

impl Fault {
    /// Every fault, in the order the full run injects them.
    pub const ALL: [Fault; 11] = [
        Fault::Delay,
        Fault::Loss(5),
        Fault::Loss(30),
        Fault::Duplicate,
        Fault::Reorder,
        Fault::PartitionInstance,
        Fault::KillApp,
        Fault::KillSidecar,
        Fault::PartitionControlPlane,
        Fault::KillControlPlane,
        Fault::DiskFull,
    ];

    /// The faults of the bounded CI run.
    pub const CI: [Fault; 6] =
        [Fault::Loss(5), Fault::PartitionInstance, Fault::KillApp, Fault::KillSidecar, Fault::KillControlPlane, Fault::DiskFull];

    /// Whether it is done to catalog-1 (its link, its app or its sidecar).
    pub fn hits_victim(self) -> bool {
        !matches!(self, Fault::PartitionControlPlane | Fault::KillControlPlane | Fault::DiskFull)
    }

    /// Its name on the command line (`--fault`).
    pub fn slug(self) -> String {
        match self {
            Fault::Delay => "delay".into(),
            Fault::Loss(percent) => format!("loss-{percent}"),
            Fault::Duplicate => "duplicate".into(),
            Fault::Reorder => "reorder".into(),
            Fault::PartitionInstance => "partition-instance".into(),
            Fault::PartitionControlPlane => "partition-control-plane".into(),
            Fault::KillApp => "kill-app".into(),
            Fault::KillSidecar => "kill-sidecar".into(),
            Fault::KillControlPlane => "kill-control-plane".into(),
            Fault::DiskFull => "disk-full".into(),
        }
    }

    /// The fault named `slug`.
    pub fn parse(slug: &str) -> Result<Fault, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.slug() == slug)
            .ok_or_else(|| format!("no fault {slug}; one of {}", Fault::ALL.map(|f| f.slug()).join(", ")))
    }

    /// A short name, for the table.
    pub fn name(self) -> String {
        match self {
            Fault::Delay => "delay 100ms ±50ms".into(),
            Fault::Loss(percent) => format!("loss {percent}%"),
            Fault::Duplicate => "duplication 10%".into(),
            Fault::Reorder => "reordering 25%".into(),
            Fault::PartitionInstance => "partition catalog-1".into(),
            Fault::PartitionControlPlane => "partition control plane".into(),
            Fault::KillApp => "kill -9 app".into(),
            Fault::KillSidecar => "kill -9 sidecar".into(),
            Fault::KillControlPlane => "kill -9 control plane".into(),
            Fault::DiskFull => "control plane disk full".into(),
        }
    }

    /// What it does, in a sentence, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Fault::Delay => "`tc qdisc add dev VETH root netem delay 100ms 50ms` on both ends of catalog-1's link",
            Fault::Loss(_) => {
                "`netem loss N%` on both ends of catalog-1's link; on a kernel without sch_netem, iptables' `statistic` match drops N% of the packets into and N% of those out of catalog-1's link instead"
            }
            Fault::Duplicate => {
                "`netem duplicate 10%` on both ends of catalog-1's link; on a kernel without sch_netem, an nftables rule on the egress of both ends copies 10% of the packets (`numgen random mod 100 < 10 dup to DEV`)"
            }
            Fault::Reorder => "`netem delay 10ms reorder 25% 50%` on both ends of catalog-1's link",
            Fault::PartitionInstance => {
                "iptables `DROP` of every packet in and out of catalog-1's link, inside its namespace (its app and sidecar keep running)"
            }
            Fault::PartitionControlPlane => {
                "iptables `DROP` of every packet in and out of the control plane's link, inside its namespace"
            }
            Fault::KillApp => "`kill -9` of catalog-1's app; started again when the fault is removed",
            Fault::KillSidecar => {
                "`kill -9` of catalog-1's sidecar; started again (same `--id`, same `--state-dir`) when the fault is removed"
            }
            Fault::KillControlPlane => "`kill -9` of the control plane; started again on the same data directory when removed",
            Fault::DiskFull => {
                "a file fills the control plane's data directory (a 16 MiB tmpfs) until `ENOSPC`; route writes (`ferryctl apply`, `POST /v1/apply`) and registrations are tried meanwhile; the file is deleted at removal"
            }
        }
    }

    /// The netem parameters of a fault made with netem.
    pub fn netem_args(self) -> Option<Vec<&'static str>> {
        match self {
            Fault::Delay => Some(vec!["delay", "100ms", "50ms"]),
            Fault::Loss(5) => Some(vec!["loss", "5%"]),
            Fault::Loss(30) => Some(vec!["loss", "30%"]),
            Fault::Loss(_) => Some(vec!["loss", "10%"]),
            Fault::Duplicate => Some(vec!["duplicate", "10%"]),
            Fault::Reorder => Some(vec!["delay", "10ms", "reorder", "25%", "50%"]),
            _ => None,
        }
    }
}

/// What is in place while a fault is injected, undone by [`Injected::remove`] or, failing
/// that, on drop.
pub enum Injected {
    Qdisc {
        links: Vec<(String, String)>,
    },
    /// iptables rules (the arguments after `-I`/`-D`) inserted in a namespace.
    Rules {
        ns: String,
        rules: Vec<Vec<String>>,
        removed: bool,
    },
    /// An nftables table in each of these namespaces.
    Nft {
        tables: Vec<String>,
    },
    Killed {
        role: String,
    },
    Filled {
        file: PathBuf,
    },
}

/// Why `fault` cannot run here, if it cannot: netem's faults without `sch_netem` in the kernel,
/// except loss (iptables' `statistic` match instead) and duplication (nftables' `dup`).
pub fn unsupported(fault: Fault, netem: bool) -> Option<&'static str> {
    match fault {
        Fault::Delay | Fault::Reorder if !netem => Some("this kernel has no sch_netem, and nothing else delays packets"),
        _ => None,
    }
}

/// Injects `fault` into `mesh`.
pub async fn inject(mesh: &mut Mesh, fault: Fault) -> anyhow::Result<Injected> {
    if mesh.netem
        && let Some(netem) = fault.netem_args()
    {
        let (inside, outside) = mesh.link(VICTIM)?;
        let links = vec![(mesh.lab.ns(VICTIM), inside), (mesh.lab.ns("hub"), outside)];
        for (ns, dev) in &links {
            run(StdCommand::new("tc").args(["-n", ns, "qdisc", "add", "dev", dev, "root", "netem"]).args(&netem))?;
        }
        return Ok(Injected::Qdisc { links });
    }
    match fault {
        Fault::Loss(percent) => {
            // Without netem: the same loss, each direction, from iptables' statistic match.
            let (link, _) = mesh.link(VICTIM)?;
            let p = format!("{:.4}", f64::from(percent) / 100.0);
            let chance = ["-m", "statistic", "--mode", "random", "--probability", &p, "-j", "DROP"];
            let rules = vec![
                ["INPUT", "-i", &link].iter().chain(chance.iter()).map(|s| s.to_string()).collect(),
                ["OUTPUT", "-o", &link].iter().chain(chance.iter()).map(|s| s.to_string()).collect(),
            ];
            rules_in(mesh.lab.ns(VICTIM), rules)
        }
        Fault::Duplicate => {
            // Without netem: nftables copies 10% of the packets leaving each end of the link.
            let (inside, outside) = mesh.link(VICTIM)?;
            let mut tables = Vec::new();
            for (ns, dev) in [(mesh.lab.ns(VICTIM), inside), (mesh.lab.ns("hub"), outside)] {
                let script = format!(
                    "table netdev ferry_chaos {{\n  chain out {{\n    type filter hook egress device \"{dev}\" priority 0;\n    numgen random mod 100 < 10 dup to \"{dev}\"\n  }}\n}}\n"
                );
                let file = mesh.dir.join(format!("dup-{dev}.nft"));
                std::fs::write(&file, script)?;
                run(StdCommand::new("ip").args(["netns", "exec", &ns, "nft", "-f"]).arg(&file))?;
                tables.push(ns);
            }
            Ok(Injected::Nft { tables })
        }
        Fault::PartitionInstance | Fault::PartitionControlPlane => {
            let host = if fault == Fault::PartitionInstance { VICTIM } else { "cp" };
            let (link, _) = mesh.link(host)?;
            let rules = vec![
                vec!["INPUT".into(), "-i".into(), link.clone(), "-j".into(), "DROP".into()],
                vec!["OUTPUT".into(), "-o".into(), link, "-j".into(), "DROP".into()],
            ];
            rules_in(mesh.lab.ns(host), rules)
        }
        Fault::KillApp | Fault::KillSidecar | Fault::KillControlPlane => {
            let role = match fault {
                Fault::KillApp => format!("app {VICTIM}"),
                Fault::KillSidecar => format!("sidecar {VICTIM}"),
                _ => "control-plane".to_owned(),
            };
            mesh.kill(&role).await?;
            Ok(Injected::Killed { role })
        }
        Fault::DiskFull => {
            let file = mesh.data.path.join("filler");
            fill(&file)?;
            Ok(Injected::Filled { file })
        }
        Fault::Delay | Fault::Reorder => anyhow::bail!("{} needs sch_netem", fault.name()),
    }
}

fn rules_in(ns: String, rules: Vec<Vec<String>>) -> anyhow::Result<Injected> {
    for rule in &rules {
        iptables(&ns, "-I", rule)?;
    }
    Ok(Injected::Rules { ns, rules, removed: false })
}

fn iptables(ns: &str, op: &str, rule: &[String]) -> anyhow::Result<()> {
    run(StdCommand::new("ip").args(["netns", "exec", ns, "iptables", op]).args(rule))?;
    Ok(())
}

/// Writes `file` until the file system is full.
fn fill(file: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::fs::File::create(file)?;
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match out.write(&chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(28) => break,
            Err(error) => return Err(error.into()),
        }
    }
    // The last bytes, below a chunk.
    while let Ok(n) = out.write(&chunk[..512]) {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

impl Injected {
    /// What the injection did that the report should say.
    pub fn note(&self) -> Option<String> {
        match self {
            Injected::Filled { file } => {
                let size = std::fs::metadata(file).map_or(0, |m| m.len());
                Some(format!("the filler took {:.1} MiB, leaving the file system full", size as f64 / 1048576.0))
            }
            _ => None,
        }
    }

    /// Undoes the fault (a killed process is started again).
    pub async fn remove(mut self, mesh: &mut Mesh) -> anyhow::Result<()> {
        match &mut self {
            Injected::Qdisc { links } => {
                for (ns, dev) in std::mem::take(links) {
                    run(StdCommand::new("tc").args(["-n", &ns, "qdisc", "del", "dev", &dev, "root"]))?;
                }
            }
            Injected::Rules { ns, rules, removed } => {
                for rule in rules.iter() {
                    iptables(ns, "-D", rule)?;
                }
                *removed = true;
            }
            Injected::Nft { tables } => {
                for ns in std::mem::take(tables) {
                    run(StdCommand::new("ip").args(["netns", "exec", &ns, "nft", "delete", "table", "netdev", "ferry_chaos"]))?;
                }
            }
            Injected::Killed { role } => mesh.restart(role).await?,
            Injected::Filled { file } => {
                std::fs::remove_file(&*file)?;
                *file = PathBuf::new();
            }
        }
        Ok(())
    }
}

impl Drop for Injected {
    fn drop(&mut self) {
        // Best effort on an error path: the namespaces and the tmpfs go soon after anyway.
        match self {
            Injected::Qdisc { links } => {
                for (ns, dev) in links.iter() {
                    let _ = StdCommand::new("tc").args(["-n", ns, "qdisc", "del", "dev", dev, "root"]).output();
                }
            }
            Injected::Rules { ns, rules, removed: false } => {
                for rule in rules.iter() {
                    let _ = iptables(ns, "-D", rule);
                }
            }
            Injected::Nft { tables } => {
                for ns in tables.iter() {
                    let _ = StdCommand::new("ip")
                        .args(["netns", "exec", ns, "nft", "delete", "table", "netdev", "ferry_chaos"])
                        .output();
                }
            }
            Injected::Filled { file } if !file.as_os_str().is_empty() => {
                let _ = std::fs::remove_file(&*file);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_parses_back_from_its_name_on_the_command_line() {
        for fault in Fault::ALL {
            assert_eq!(Fault::parse(&fault.slug()), Ok(fault));
        }
        assert!(Fault::parse("earthquake").is_err());
    }

    #[test]
    fn only_delay_and_reordering_need_netem() {
        let needs_netem: Vec<Fault> = Fault::ALL.into_iter().filter(|f| unsupported(*f, false).is_some()).collect();
        assert_eq!(needs_netem, [Fault::Delay, Fault::Reorder]);
        assert!(Fault::ALL.into_iter().all(|f| unsupported(f, true).is_none()));
    }
}
