//! The report: a table on stdout, and `reliability.md` (by default `docs/reliability.md`, which
//! each run overwrites) saying how the run was made, what each fault does, the figures, and each
//! target passed or missed.

use std::{fmt::Write as _, path::Path};

use crate::{
    analysis::{Durability, Row, Target},
    driver::Kind,
    faults::Fault,
    mesh::{CHECK, PUSH_BOUND},
    run::{Observations, POLICIES},
    soak::Growth,
};

fn reasons(row: &Row) -> String {
    if row.reasons.is_empty() {
        return "—".into();
    }
    row.reasons.iter().map(|(reason, n)| format!("{reason} {n}")).collect::<Vec<_>>().join(", ")
}

/// The figures as a markdown table (also what is printed).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fault | window | sent | ok | failed idempotent | failed POST | failures by reason | duplicated POSTs | writes acked/tried | lost | p95 | detected | recovered | catalog-1's share back |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        if let Some(why) = row.skipped {
            let _ = writeln!(out, "| {} | not run: {why} ||||||||||||", row.name);
            continue;
        }
        let detect = row.detect.map_or("—".into(), |(s, what)| format!("{s:.1}s ({what})"));
        let recover = match (row.fault, row.recover) {
            (None, _) => "—".into(),
            (Some(_), Some(s)) => format!("{s:.1}s"),
            (Some(_), None) => "not within the window".into(),
        };
        let recover = match row.writes_resumed {
            Some(s) => format!("{recover}; writes after {s:.1}s"),
            None => recover,
        };
        let share = match (row.fault, row.share_back) {
            (Some(f), Some(s)) if f.hits_victim() => format!("{s:.1}s"),
            (Some(f), None) if f.hits_victim() => "not within the window".into(),
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0}s | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} ms | {} | {} | {} |",
            row.name,
            row.seconds,
            row.sent,
            row.ok,
            row.failed_idempotent,
            row.failed_posts,
            reasons(row),
            row.duplicated_posts,
            row.writes_acked,
            row.writes_tried,
            row.writes_lost,
            row.p95_ms,
            detect,
            recover,
            share,
        );
    }
    out
}

/// What the figures mean where they need explaining; written from the runs made so far, and
/// to be read against this run's table.
const FINDINGS: &str = "\
- **An instance whose health came back takes its share back within seconds** (*catalog-1's
  share back* after a partition of it, or a kill of its app or sidecar). A caller starts its
  peak-EWMA latency estimate of an endpoint that becomes routable again from its routable peers'
  fastest, and averages in its first answer (whose new connection's handshake says nothing of
  the answers after it): the timeouts met while it failed (each doubling the estimate, up to
  10 s) would otherwise keep it above a healthy peer's few milliseconds for tens of seconds.
- **After loss or duplication on its link, catalog-1 still gets little traffic for a while**
  though both callers list it routable: it never stopped being routable, so nothing resets the
  slow answers its retransmissions caused; with two endpoints P2C compares both on every pick,
  and the estimate only decays (10 s time constant) while catalog-1 gets no requests. Capacity
  is lost, not requests.
- **Healing a partition of the control plane** fails nothing when the callers, right after they
  reconnect, keep the endpoints they hold while the control plane still lists none routable:
  its keepalive gave up on every sidecar's stream (10 s + 5 s) and marked their instances
  critical, and it lists them so until each of those sidecars has reconnected, within its
  backoff. A caller holds them for at most its longest backoff and 5 s.
- **Loss is absorbed by moving traffic.** Where the *while injected* counts show catalog-1
  serving few requests under loss on its link, the callers moved catalog's requests to
  catalog-2, and the loss target is met by avoidance as much as by retries.
- **A partition is seen twice.** Callers stop sending to a partitioned instance within a couple
  of seconds by its latency (its requests time out, retried elsewhere); the registry marks it
  critical only when the control plane's keepalive on the sidecar's stream gives up (10 s
  interval, 5 s timeout), which is when both callers' views leave it out.
- `—` under *detected* means nothing the suite watches changed: no failed request, no change in
  the registry or in the callers' views, no failed write.";

/// What the windows showed beyond the table, as a list.
pub fn notes(rows: &[Row]) -> String {
    let mut out = String::new();
    for row in rows.iter().filter(|r| !r.notes.is_empty()) {
        let _ = writeln!(out, "- **{}**: {}.", row.name, row.notes.join("; "));
    }
    out
}

/// The targets as a markdown table.
pub fn targets_table(targets: &[Target]) -> String {
    let mut out = String::from("| target | result | what the run showed |\n|---|---|---|\n");
    for target in targets {
        let result = match target.passed {
            Some(true) => "pass",
            Some(false) => "**miss**",
            None => "not run",
        };
        let _ = writeln!(out, "| {} | {} | {} |", target.what, result, target.showed);
    }
    out
}

/// Where the soak's section of the page begins (it runs to the end of the page).
const SOAK_BEGIN: &str = "<!-- the soak's section, kept by other runs -->";

/// The page to write over `old`: with a soak's `soak` section, `old` up to its soak section (or
/// `main` when there is no page yet) and the new section; else `main` and `old`'s soak section.
fn page(old: &str, main: String, soak: Option<String>) -> String {
    match soak {
        Some(section) => {
            let before = old.split(SOAK_BEGIN).next().unwrap_or_default().trim_end();
            let before = if before.is_empty() { main } else { format!("{before}\n") };
            format!("{}\n{section}", before.trim_end_matches('\n').to_owned() + "\n")
        }
        None => match old.find(SOAK_BEGIN) {
            Some(at) => format!("{}\n{}", main.trim_end_matches('\n').to_owned() + "\n", &old[at..]),
            None => main,
        },
    }
}

/// The soak's figures as a markdown table.
pub fn growth_table(growth: &[Growth]) -> String {
    let mut out = String::from(
        "| process | samples | RSS first fifth | RSS last fifth | fds first fifth | fds last fifth | grows without bound? |\n|---|---|---|---|---|---|---|\n",
    );
    for g in growth {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} MiB | {:.1} MiB | {:.0} | {:.0} | {} |",
            g.role,
            g.samples,
            g.rss_first_mib,
            g.rss_last_mib,
            g.fds_first,
            g.fds_last,
            if g.grows { "**yes**" } else { "no" }
        );
    }
    out
}

/// Everything a report is made of.
pub struct Report<'a> {
    pub obs: &'a Observations,
    pub rows: &'a [Row],
    pub targets: &'a [Target],
    pub durability: &'a Durability,
    pub growth: &'a [Growth],
    pub took: std::time::Duration,
}

impl Report<'_> {
    /// Prints the tables.
    pub fn print(&self) {
        println!("\n{}", table(self.rows));
        println!("{}", notes(self.rows));
        println!("{}", targets_table(self.targets));
        println!("resources of every process (first fifth of the samples against the last):\n");
        println!("{}", growth_table(self.growth));
        println!("the run took {:.0}s", self.took.as_secs_f64());
    }

    /// Writes `reliability.md` into `dir`. A soak writes its own section of the page (replacing
    /// the last soak's, or added at its end); any other run rewrites the page but keeps the
    /// soak's section, so one page holds both.
    pub fn write(&self, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("reliability.md");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let soak = self.obs.plan.soak.map(|length| self.soak_section(length));
        std::fs::write(&path, page(&old, self.markdown(), soak))?;
        Ok(path)
    }

    /// The soak's section: its targets and every process's memory and descriptors.
    fn soak_section(&self, length: std::time::Duration) -> String {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        format!(
            "{SOAK_BEGIN}
## A soak of {length}

`ferry-chaos --soak {length}`: the same mesh and steady traffic ({rate} requests a second), a
fault injected every minute in turn, and every process's resident memory and open descriptors
sampled each second, on a machine with {cores} cores. A process counts as growing without bound
when the mean of the last fifth of its samples is more than half again the first fifth's and more
than 16 MiB (or 32 descriptors) above it. The run took {took:.0}s.

{targets}
{growth}",
            length = humantime::format_duration(length),
            rate = self.obs.plan.rate,
            took = self.took.as_secs_f64(),
            targets = targets_table(self.targets),
            growth = growth_table(self.growth),
        )
    }

    fn findings(&self) -> String {
        let mut findings = FINDINGS.to_owned();
        let grpc_app_failed = self.obs.traffic().filter(|r| r.kind == Kind::Grpc && !r.ok && r.reason == "app_failed").count();
        if grpc_app_failed > 0 {
            findings.push_str(
                "\n- **A gRPC call answered `app_failed` is not retried**, health check or not: `app_failed` says \
                 the peer sidecar reached its app and the exchange broke, so the call may have done its work, and \
                 the mesh repeats it only for idempotent methods, which a gRPC call (a POST) is not. The failures \
                 listed in the notes above as `grpc ... app_failed` are of this kind.",
            );
            let _ = write!(findings, " This run had {grpc_app_failed}.");
        }
        let partition = self.rows.iter().find(|r| r.fault == Some(Fault::PartitionControlPlane) && r.skipped.is_none());
        if let Some(row) = partition.filter(|r| r.reasons.contains_key("no_endpoints")) {
            let _ = write!(
                findings,
                "\n- **Healing a partition of the control plane failed {} requests with `no_endpoints`** (their times \
                 are in the notes above: at or just after the removal, {} s in), although callers hold their endpoints \
                 while the control plane's view settles after a reconnection: a caller whose hold ended before the \
                 other sidecars reconnected, or that had no endpoint of the service before, can meet it.",
                row.reasons["no_endpoints"],
                self.obs.plan.inject_for.as_secs(),
            );
        }
        if let Some(disk) = self.rows.iter().find(|r| r.fault == Some(Fault::DiskFull) && r.skipped.is_none()) {
            let _ = write!(
                findings,
                "\n- **A full data directory** refused {} of the {} writes tried meanwhile{}.",
                disk.writes_tried - disk.writes_acked,
                disk.writes_tried,
                if disk.writes_acked == disk.writes_tried && disk.writes_lost == 0 {
                    " (the control plane's store reuses the pages it has), and all were read back at the end"
                } else {
                    ""
                }
            );
        }
        findings
    }

    fn durability_text(&self) -> String {
        let d = self.durability;
        format!(
            "Read back at the end: {} registrations were acknowledged and {} of them are missing{}; {} Route writes were acknowledged, the last `write-{}`, and the control plane holds {}.",
            d.registrations_acked,
            d.registrations_lost.len(),
            if d.registrations_lost.is_empty() { String::new() } else { format!(" ({})", d.registrations_lost.join(", ")) },
            d.routes_acked,
            d.last_route_acked.unwrap_or(0),
            d.route_held.map_or("none".into(), |n| format!("`write-{n}`")),
        )
    }

    fn markdown(&self) -> String {
        let plan = &self.obs.plan;
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        let mut md = String::new();
        let _ = write!(
            md,
            "# Reliability

What Ferry does to requests and to the control plane's writes when the network misbehaves and
processes die, measured by `ferry-chaos`, which writes this page (every run rewrites it but keeps
the last soak's section at its end, which only a soak rewrites; `--out DIR` writes it elsewhere,
`--no-docs` nowhere). The figures below are from one `{mode}` run on a
machine with {cores} cores shared with other work; every host is a network namespace on one
Linux bridge on that machine, so the network is veth pairs, not real links. {netem}

```sh
sudo cargo run -p ferry-chaos --bin ferry-chaos              # the full run, ten to twenty minutes
sudo cargo run -p ferry-chaos --bin ferry-chaos -- --ci      # bounded, about two minutes (CI runs it)
sudo cargo run -p ferry-chaos --bin ferry-chaos -- --soak 30m  # a fault a minute, memory and descriptors sampled
```

It needs root (network namespaces, `tc`, `iptables`, a tmpfs mount) and `ip`, `tc`, `iptables`
and `curl`; without them it says why it skips and exits 0, unless `FERRY_REQUIRE_NETNS=1`, when
it fails. Whatever happens, on an error or Ctrl-C too, it kills what it started, unmounts the
tmpfs and deletes its namespaces (its qdiscs and iptables rules go with them).

## The mesh

A namespace per host, each with a veth pair to a bridge in a hub namespace, addressed in
`10.200-249.0.0/24`:

| host | runs |
|---|---|
| `cp` | the control plane, `--data-dir` on a 16 MiB tmpfs, gRPC on `:7070`, API on `:7071` (TLS, token auth: its defaults) |
| `frontend` | the frontend app and its sidecar; each request is passed on to `catalog` |
| `catalog-1`, `catalog-2` | an instance of catalog each, with its sidecar; each request is passed on to `inventory` |
| `inventory` | the inventory app and its sidecar |
| `load` | the load generator and a sidecar of its own (service `load`, no app) |

Sidecars run in proxy mode (the app calls `127.0.0.1:15001`; no interception), with
`--check {check}` (their app's `/healthz`), `--state-dir`, and the admin token. The apps
are `ferry-chaos app`, one process each, so a `kill -9` is real; each appends every request it
serves to a file (`time method id`), which is how POSTs seen twice are counted, across a kill too.

**Steady traffic** from the load host, through its sidecar, at {rate} requests a second in all:
40% HTTP/1.1 `GET /items` to frontend, 20% h2c `GET /items` to frontend, 20% gRPC
`grpc.health.v1.Health/Check` to catalog (these three are counted as idempotent; the
mesh, which sees every gRPC call as a POST, retries a gRPC call only on what its route's
`retries.on` names for gRPC, here `unavailable`), and 20%
HTTP/1.1 `POST /orders` to frontend with a unique `x-chaos-id` (not idempotent: the mesh must
never send one twice to the app), each on a new connection with a 5 s client timeout. GETs and
POSTs go frontend -> catalog -> inventory, three hops of sidecars. A request fails when it gets
no 2xx (or no `SERVING`) within 5 s; its reason is the `x-ferry-error` of the answer (or the
`x-ferry-upstream-error` an app relayed), else `status_N` or the client's own error.

**Writes**: the load generator registers an instance (`PUT /v1/instances`, service
`chaos-writes`, a new id each time) every second, and the suite writes a Route (`kind: Route`,
service `chaos-writes`, a new rule name each time) every two seconds, in turn with `ferryctl
apply -f` and `POST /v1/apply`. At the end every registration that was answered 2xx is read
back (`GET /v1/services/chaos-writes`), and the Route held must be the last one acknowledged or a
later one: anything else is an acknowledged write lost.

### Settings the run used

Applied through the API before any sidecar started, as an operator would:

```yaml
{policies}```

Everything else is Ferry's default: connect timeout 1 s, the control plane's push bound
(`--push-max-delay`) {push} ms, its reconnect grace 30 s, its HTTP/2 keepalive on each sidecar's
stream (a ping every 10 s, 5 s to answer), the retry budget (20% of requests + 10 a second).
Every sidecar uses the admin token; a production mesh gives each a token for its own service,
which none of the faults here depends on.

## Faults

Each is injected for {inject} s while the traffic flows, then removed; the suite then waits up
to {recover} s for the mesh to be whole again (the registry lists both catalog instances passing,
both callers of catalog would route to both, and catalog-1 serves at least 20% of catalog's
requests again), and keeps the traffic {settle} s more. A
fault's window runs from its injection to that point; figures are of requests *sent* within it.

| fault | what it does |
|---|---|
",
            mode = plan.name,
            netem = if self.obs.netem {
                "Its kernel has `sch_netem`: delay, loss, duplication and reordering are `tc netem`."
            } else {
                "Its kernel has no `sch_netem` (no `netem` qdisc at all), so loss is iptables' `statistic` match, duplication an nftables `dup` rule, and delay and reordering, which nothing else can make, were not run."
            },
            check = CHECK,
            rate = plan.rate,
            policies = POLICIES,
            push = PUSH_BOUND.as_millis(),
            inject = plan.inject_for.as_secs(),
            recover = plan.recover_within.as_secs(),
            settle = plan.settle.as_secs(),
        );
        for fault in Fault::ALL {
            let ran = if plan.faults.contains(&fault) { "" } else { " (not in this run)" };
            let _ = writeln!(md, "| {}{ran} | {} |", fault.name(), fault.describe());
        }
        let _ = write!(
            md,
            "
Not run: faults of etcd and of control-plane replicas (`--store etcd`); the suite runs one
control plane on its embedded store.

## Figures

*detected*: from the injection to the first sign of it: a failed request, a change in the
registry's view of catalog (polled four times a second), a change in what a caller of catalog
would route to (its sidecar's `/config`, polled four times a second), or a failed write.
*recovered*: from the removal to the moment after which no request failed and the registry and
both callers were whole again (and, when writes failed, the first write acknowledged after
removal). *catalog-1's share back*: from the removal to the first moment from which catalog-1
served at least 20% of catalog's requests over two seconds (the suite waits for that too before
the next fault, within its bound). *lost*: acknowledged writes of the window missing at the end. p95 is of the
successful requests' latency.

{table}
{notes}
{durability}

## Findings

{findings}

## Targets

{targets}
",
            table = table(self.rows),
            notes = notes(self.rows),
            findings = self.findings(),
            durability = self.durability_text(),
            targets = targets_table(self.targets),
        );
        let misses: Vec<&Target> = self.targets.iter().filter(|t| t.passed == Some(false)).collect();
        if misses.is_empty() {
            md.push_str("Every target run was met in this run.\n");
        } else {
            md.push_str("Missed in this run, as measured (the measurement is not tuned to pass):\n\n");
            for miss in misses {
                let _ = writeln!(md, "- {}: {}.", miss.what, miss.showed);
            }
        }
        let _ = write!(
            md,
            "
## Processes

Resident memory (`VmRSS`) and open descriptors of every process, sampled each second; the mean
of the first fifth of the samples against the last fifth (a process started again by a fault
keeps its row). A soak (`--soak 30m`) prints the same table over its whole length.

{growth}
The run took {took:.0} s, setup included.
",
            growth = growth_table(self.growth),
            took = self.took.as_secs_f64(),
        );
        md
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn a_soak_keeps_the_page_and_other_runs_keep_the_soak() {
        let soak = |n: u32| format!("{SOAK_BEGIN}\n## A soak\n{n}\n");
        // A first soak on no page writes a whole page with its section.
        let first = page("", "# Page\nfull 1\n".into(), Some(soak(1)));
        assert_eq!(first, format!("# Page\nfull 1\n\n{}", soak(1)));
        // A full run rewrites the page and keeps the soak.
        let second = page(&first, "# Page\nfull 2\n".into(), None);
        assert_eq!(second, format!("# Page\nfull 2\n\n{}", soak(1)));
        // Another soak replaces the section and keeps the page.
        let third = page(&second, "# ignored\n".into(), Some(soak(2)));
        assert_eq!(third, format!("# Page\nfull 2\n\n{}", soak(2)));
        // With no soak ever, a full run is the page alone.
        assert_eq!(page("# Old\n", "# New\n".into(), None), "# New\n");
    }
}
