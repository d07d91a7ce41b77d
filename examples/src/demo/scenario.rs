//! The scenarios of `examples/routes/` (routes, and one authorization policy), what each should
//! do to the demo's traffic, and the verdict on whether it did.
//!
//! The YAML is compiled into the binary, so `ferry-demo --scenario canary` works from any
//! directory, and the expectations are read from that same YAML (the canary's weights, the
//! fault's abort share), so editing a file cannot leave the verdict judging something else.

use std::{collections::BTreeMap, time::Duration};

use ferry_proto::{json, v1, validate};

use super::text::count;

/// The services whose routes the scenarios set, and `r` deletes.
pub const ROUTED: [&str; 2] = ["catalog", "frontend"];

/// How many standard deviations a measured share may stray from the configured one before the
/// verdict fails: at 4, an honest run fails about once in 16,000.
const SIGMAS: f64 = 4.0;

/// A routing scenario, from `examples/routes/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 90% of catalog's traffic to v1, 10% to v2.
    Canary,
    /// Requests with `x-canary: true` to catalog v2, the rest to v1.
    HeaderCanary,
    /// A game day: the mesh aborts 10% of calls to catalog and delays 20%; the client retries.
    Fault,
    /// Only frontend may call catalog: the client sidecar's own calls to catalog are refused.
    Lockdown,
}

impl Scenario {
    /// Every scenario, in the order the key help lists them.
    pub const ALL: [Scenario; 4] = [Scenario::Canary, Scenario::HeaderCanary, Scenario::Fault, Scenario::Lockdown];

    /// Its name, as `--scenario` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Canary => "canary",
            Scenario::HeaderCanary => "header-canary",
            Scenario::Fault => "fault",
            Scenario::Lockdown => "lockdown",
        }
    }

    /// The key that applies it while the demo runs.
    pub fn key(self) -> char {
        match self {
            Scenario::Canary => 'c',
            Scenario::HeaderCanary => 'h',
            Scenario::Fault => 'f',
            Scenario::Lockdown => 'l',
        }
    }

    /// Its resources, as multi-document YAML.
    pub fn yaml(self) -> &'static str {
        match self {
            Scenario::Canary => include_str!("../../routes/canary.yaml"),
            Scenario::HeaderCanary => include_str!("../../routes/header-canary.yaml"),
            Scenario::Fault => include_str!("../../routes/fault.yaml"),
            Scenario::Lockdown => include_str!("../../routes/lockdown.yaml"),
        }
    }

    /// Where its YAML lives in the repository.
    pub fn path(self) -> String {
        format!("examples/routes/{}.yaml", self.name())
    }

    /// Whether it sends traffic to catalog v2, which needs a second catalog replica.
    pub fn needs_v2(self) -> bool {
        matches!(self, Scenario::Canary | Scenario::HeaderCanary)
    }

    /// Its resources, parsed and validated.
    pub fn resources(self) -> Result<Vec<v1::Resource>, validate::FieldError> {
        json::resources_from_yaml(self.yaml())
    }

    /// What its traffic should show.
    pub fn expectation(self) -> Result<Expectation, String> {
        let resources = self.resources().map_err(|e| format!("{}: {e}", self.path()))?;
        if self == Scenario::Lockdown {
            let policy = resources.iter().find_map(|r| match &r.kind {
                Some(v1::resource::Kind::Authorization(policy)) if policy.service == "catalog" => Some(policy),
                _ => None,
            });
            let policy = policy.ok_or_else(|| format!("{} has no authorization policy for catalog", self.path()))?;
            let compiled = ferry_proto::authz::Authorization::compile(policy, 1).map_err(|e| format!("{}: {e}", self.path()))?;
            if !compiled.could_allow("frontend") || compiled.could_allow(super::CLIENT_SERVICE) {
                return Err(format!("{}: it must let frontend call catalog, and not {}", self.path(), super::CLIENT_SERVICE));
            }
            return Ok(Expectation::Lockdown);
        }
        let route = resources
            .into_iter()
            .find_map(|r| match r.kind {
                Some(v1::resource::Kind::Route(route)) if route.service == "catalog" => Some(route),
                _ => None,
            })
            .ok_or_else(|| format!("{} has no route for catalog", self.path()))?;
        match self {
            Scenario::Canary => {
                let split = route
                    .rules
                    .iter()
                    .find(|rule| rule.backends.iter().any(|b| b.subset == "v2"))
                    .ok_or_else(|| format!("{}: no rule sends to subset v2", self.path()))?;
                let total: u32 = split.backends.iter().map(|b| b.weight).sum();
                let v2: u32 = split.backends.iter().filter(|b| b.subset == "v2").map(|b| b.weight).sum();
                if total == 0 {
                    return Err(format!("{}: the split's weights add up to 0", self.path()));
                }
                Ok(Expectation::Split { v2_share: f64::from(v2) / f64::from(total) })
            }
            Scenario::HeaderCanary => Ok(Expectation::Header),
            Scenario::Lockdown => Ok(Expectation::Lockdown),
            Scenario::Fault => {
                let fault = route
                    .rules
                    .iter()
                    .find_map(|rule| rule.fault)
                    .ok_or_else(|| format!("{}: no rule of catalog's route injects a fault", self.path()))?;
                let abort_share = fault.abort.map_or(0.0, |a| a.percent / 100.0);
                let delay = fault.delay.and_then(|d| {
                    let duration = validate::duration("delay", d.duration.as_ref()?).ok()?;
                    Some((d.percent / 100.0, duration))
                });
                Ok(Expectation::Fault { abort_share, delay })
            }
        }
    }
}

/// What the traffic should show while a scenario (or none) is in force.
#[derive(Debug, Clone, PartialEq)]
pub enum Expectation {
    /// No route: every request succeeds.
    Clean,
    /// This share of catalog's requests goes to v2, the rest to v1, and every request succeeds.
    Split { v2_share: f64 },
    /// Requests with `x-canary: true` go to v2, the others to v1, and every request succeeds.
    Header,
    /// This share of frontend's calls to catalog is aborted by the mesh, and the client's
    /// retries keep [`MIN_FAULT_SUCCESS`] of its requests succeeding.
    Fault { abort_share: f64, delay: Option<(f64, Duration)> },
    /// Every request through frontend succeeds, and every probe from the client sidecar
    /// straight to catalog is refused (403 forbidden).
    Lockdown,
}

/// The share of requests that must succeed under the fault scenario.
pub const MIN_FAULT_SUCCESS: f64 = 0.95;

/// What the traffic showed while one scenario was in force.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Requests through frontend that succeeded and failed.
    pub ok: u64,
    pub errors: u64,
    /// Successful requests by the catalog version that answered: (without, with) `x-canary`.
    pub versions: BTreeMap<String, (u64, u64)>,
    /// Calls from frontend to catalog, and those the mesh answered with an injected abort.
    pub catalog_calls: u64,
    pub injected: u64,
    /// The share of recent requests that took at least the scenario's delay, and how many
    /// requests that share is of.
    pub slow: Option<(f64, usize)>,
    /// The client sidecar's own calls to catalog: refused as forbidden, answered, anything else.
    pub probes: super::traffic::Probes,
}

impl Measured {
    fn version(&self, version: &str) -> (u64, u64) {
        self.versions.get(version).copied().unwrap_or_default()
    }
}

/// The outcome, with the lines that explain it.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The scenario judged, or "no routes".
    pub label: String,
    pub passed: bool,
    /// Whether the traffic was judged at all: not when it was sent under routes changed outside
    /// the demo, which it cannot know the intent of.
    pub judged: bool,
    pub lines: Vec<String>,
}

/// How far a share measured over `n` samples may stray from `p`.
fn tolerance(p: f64, n: u64) -> f64 {
    // Never tighter than one point: the split is random per request, but not every request of
    // a second is independent of the others (a retry, an endpoint briefly unhealthy).
    (SIGMAS * (p * (1.0 - p) / n.max(1) as f64).sqrt()).clamp(0.01, 1.0)
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

impl Expectation {
    /// Judges what the traffic showed. `label` names the scenario in the lines.
    pub fn judge(&self, label: &str, m: &Measured) -> Verdict {
        let mut lines = Vec::new();
        let mut passed = m.ok > 0;
        if m.ok == 0 {
            lines.push(format!("{label}: no request succeeded"));
        }
        let split = m.versions.iter().map(|(v, (plain, canary))| format!("{v} {}", plain + canary)).collect::<Vec<_>>();
        match self {
            Expectation::Clean | Expectation::Split { .. } | Expectation::Header | Expectation::Lockdown if m.errors > 0 => {
                passed = false;
                lines.push(format!("{label}: {} of {} failed", m.errors, count(m.ok + m.errors, "request")));
            }
            _ => {}
        }
        match self {
            Expectation::Clean => {}
            Expectation::Lockdown => {
                let p = &m.probes;
                lines.push(format!(
                    "{label}: the client sidecar's own calls to catalog: {} refused (403 forbidden), {} answered, {} failed otherwise; {} through frontend succeeded",
                    p.refused, p.answered, p.other, count(m.ok, "request")
                ));
                if p.refused == 0 || p.answered > 0 || p.other > 0 {
                    passed = false;
                    lines.push(format!("{label}: every direct call to catalog must be refused as forbidden, and at least one made (send longer: --duration)"));
                }
            }
            Expectation::Split { v2_share } => {
                let (v1, v2) = (m.version("v1"), m.version("v2"));
                let (v1, v2) = (v1.0 + v1.1, v2.0 + v2.1);
                let n = v1 + v2;
                let share = v2 as f64 / n.max(1) as f64;
                let allowed = tolerance(*v2_share, n);
                lines.push(format!(
                    "{label}: catalog answered {}: v1 {v1} ({}), v2 {v2} ({})",
                    count(n, "request"),
                    percent(1.0 - share),
                    percent(share)
                ));
                let near = (share - v2_share).abs() <= allowed;
                lines.push(format!(
                    "{label}: v2's share {} is {} {:.1} points of the route's {} ({SIGMAS} standard deviations at {})",
                    percent(share),
                    if near { "within" } else { "NOT within" },
                    allowed * 100.0,
                    percent(*v2_share),
                    count(n, "request"),
                ));
                if v1 == 0 || v2 == 0 {
                    passed = false;
                    lines.push(format!("{label}: both versions must answer to show a split; send more (--duration, --rate)"));
                }
                if !near {
                    passed = false;
                }
            }
            Expectation::Header => {
                let ((v1_plain, v1_canary), (v2_plain, v2_canary)) = (m.version("v1"), m.version("v2"));
                let strays: u64 =
                    m.versions.iter().filter(|(v, _)| !matches!(v.as_str(), "v1" | "v2")).map(|(_, c)| c.0 + c.1).sum();
                lines.push(format!(
                    "{label}: with x-canary: true, v2 answered {v2_canary} and v1 {v1_canary}; without it, v1 answered {v1_plain} and v2 {v2_plain}"
                ));
                if v1_canary > 0 || v2_plain > 0 || strays > 0 {
                    passed = false;
                    lines.push(format!(
                        "{label}: {} went to the wrong version (by version: {})",
                        count(v1_canary + v2_plain + strays, "request"),
                        split.join(", ")
                    ));
                }
                if v2_canary == 0 || v1_plain == 0 {
                    passed = false;
                    lines.push(format!(
                        "{label}: both kinds of request must be answered to judge the route; send more (--duration, --rate)"
                    ));
                }
            }
            Expectation::Fault { abort_share, delay } => {
                let n = m.catalog_calls;
                let share = m.injected as f64 / n.max(1) as f64;
                let allowed = tolerance(*abort_share, n);
                let near = n > 0 && (share - abort_share).abs() <= allowed;
                lines.push(format!(
                    "{label}: the mesh aborted {} of frontend's {} to catalog ({}), {} {:.1} points of the route's {} ({SIGMAS} standard deviations)",
                    m.injected,
                    count(n, "call"),
                    percent(share),
                    if near { "within" } else { "NOT within" },
                    allowed * 100.0,
                    percent(*abort_share),
                ));
                let total = m.ok + m.errors;
                let success = m.ok as f64 / total.max(1) as f64;
                let enough = success >= MIN_FAULT_SUCCESS;
                lines.push(format!(
                    "{label}: {} of {} through frontend succeeded ({}; at least {} must), the client's retries absorbing the aborts",
                    m.ok,
                    count(total, "request"),
                    percent(success),
                    percent(MIN_FAULT_SUCCESS),
                ));
                if let (Some((delay_share, duration)), Some((slow, of))) = (delay, m.slow) {
                    lines.push(format!(
                        "{label}: {} of the last {} took {} or more (the route delays {} of catalog calls by that much)",
                        percent(slow),
                        count(of as u64, "request"),
                        humantime::format_duration(*duration),
                        percent(*delay_share),
                    ));
                }
                if !near || !enough {
                    passed = false;
                }
            }
        }
        Verdict { label: label.to_owned(), passed, judged: true, lines }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_parses_and_validates() {
        for scenario in Scenario::ALL {
            let resources = scenario.resources().unwrap_or_else(|e| panic!("{}: {e}", scenario.path()));
            assert!(!resources.is_empty(), "{}", scenario.path());
            for resource in &resources {
                validate::resource(resource).unwrap_or_else(|e| panic!("{}: {e}", scenario.path()));
                let service = match &resource.kind {
                    Some(v1::resource::Kind::Route(route)) => &route.service,
                    Some(v1::resource::Kind::Policy(policy)) => &policy.service,
                    Some(v1::resource::Kind::Authorization(policy)) => &policy.service,
                    None => panic!("{}: a resource without a kind", scenario.path()),
                };
                assert!(ROUTED.contains(&service.as_str()), "{}: {service} is not reset by r", scenario.path());
            }
            scenario.expectation().unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// The curl command of a scenario's comments, its continued lines joined.
    fn curl_in_comments(yaml: &str) -> Option<String> {
        let comments: Vec<&str> = yaml.lines().filter_map(|l| l.strip_prefix('#')).map(str::trim).collect();
        let start = comments.iter().position(|l| l.starts_with("curl "))?;
        let mut command = String::new();
        for line in &comments[start..] {
            match line.strip_suffix('\\') {
                Some(continued) => command.push_str(continued),
                None => {
                    command.push_str(line);
                    return Some(command);
                }
            }
        }
        None
    }

    #[test]
    fn the_curl_in_each_scenarios_comments_is_the_readmes_and_can_work() {
        for scenario in Scenario::ALL {
            let command = curl_in_comments(scenario.yaml()).unwrap_or_else(|| panic!("{}: no curl command", scenario.path()));
            // The API is HTTPS with a token: the README's `api` helper, written out.
            let expected = format!(
                "curl -s --cacert \"$FERRY_CA_FILE\" -H \"authorization: Bearer $FERRY_TOKEN\" \
                 -H 'content-type: application/yaml' --data-binary @{} https://127.0.0.1:7071/v1/apply",
                scenario.path()
            );
            assert_eq!(command, expected, "{}", scenario.path());
            assert!(scenario.yaml().contains(&format!("ferryctl apply -f {}", scenario.path())), "{}", scenario.path());
        }
        let readme = include_str!("../../../README.md");
        assert!(
            readme.contains(r#"api() { curl -s --cacert "$FERRY_CA_FILE" -H "authorization: Bearer $FERRY_TOKEN" "$@"; }"#),
            "the README's api helper changed: change the scenarios' comments with it"
        );
    }

    #[test]
    fn the_scenarios_share_one_policy() {
        let policies: Vec<v1::ServicePolicy> = Scenario::ALL
            .iter()
            .flat_map(|s| s.resources().expect("valid"))
            .filter_map(|r| match r.kind {
                Some(v1::resource::Kind::Policy(policy)) => Some(policy),
                _ => None,
            })
            .collect();
        assert_eq!(policies.len(), 2, "canary and header-canary carry the policy");
        assert_eq!(policies[0], policies[1], "switching scenarios must not churn the policy");
        assert_eq!(policies[0].subsets["v2"].labels["version"], "v2");
    }

    #[test]
    fn expectations_come_from_the_yaml() {
        assert_eq!(Scenario::Canary.expectation(), Ok(Expectation::Split { v2_share: 0.1 }));
        assert_eq!(
            Scenario::Fault.expectation(),
            Ok(Expectation::Fault { abort_share: 0.1, delay: Some((0.2, Duration::from_millis(300))) })
        );
    }

    fn versions(pairs: &[(&str, u64, u64)]) -> BTreeMap<String, (u64, u64)> {
        pairs.iter().map(|(v, plain, canary)| (v.to_string(), (*plain, *canary))).collect()
    }

    #[test]
    fn a_split_passes_near_its_weight_only() {
        let split = Expectation::Split { v2_share: 0.1 };
        let near = Measured { ok: 200, versions: versions(&[("v1", 182, 0), ("v2", 18, 0)]), ..Measured::default() };
        assert!(split.judge("canary", &near).passed, "{:?}", split.judge("canary", &near).lines);
        let even = Measured { ok: 200, versions: versions(&[("v1", 100, 0), ("v2", 100, 0)]), ..Measured::default() };
        assert!(!split.judge("canary", &even).passed);
        let none = Measured { ok: 200, versions: versions(&[("v1", 200, 0)]), ..Measured::default() };
        assert!(!split.judge("canary", &none).passed, "v2 must serve some traffic");
        let failing = Measured { errors: 1, ..near };
        assert!(!split.judge("canary", &failing).passed);
    }

    #[test]
    fn a_header_canary_allows_no_stray_request() {
        let exact = Measured { ok: 100, versions: versions(&[("v1", 80, 0), ("v2", 0, 20)]), ..Measured::default() };
        assert!(Expectation::Header.judge("h", &exact).passed);
        let stray = Measured { ok: 100, versions: versions(&[("v1", 79, 0), ("v2", 1, 20)]), ..Measured::default() };
        assert!(!Expectation::Header.judge("h", &stray).passed);
    }

    #[test]
    fn a_fault_passes_when_aborts_match_and_retries_hold() {
        let fault = Expectation::Fault { abort_share: 0.1, delay: None };
        let good = Measured { ok: 199, errors: 1, catalog_calls: 220, injected: 21, ..Measured::default() };
        assert!(fault.judge("fault", &good).passed, "{:?}", fault.judge("fault", &good).lines);
        let no_aborts = Measured { injected: 0, ..good.clone() };
        assert!(!fault.judge("fault", &no_aborts).passed, "the fault must show");
        let unretried = Measured { ok: 180, errors: 20, ..good };
        assert!(!fault.judge("fault", &unretried).passed, "90% is not enough");
    }

    #[test]
    fn verdicts_count_one_as_one() {
        let one_failed = Measured { ok: 1, errors: 1, ..Measured::default() };
        let lines = Expectation::Clean.judge("no routes", &one_failed).lines;
        assert_eq!(lines, ["no routes: 1 of 2 requests failed"]);
        let stray = Measured { ok: 100, versions: versions(&[("v1", 80, 0), ("v2", 1, 19)]), ..Measured::default() };
        let lines = Expectation::Header.judge("h", &stray).lines;
        assert!(lines.iter().any(|l| l.starts_with("h: 1 request went to the wrong version")), "{lines:?}");
        let one = Measured {
            ok: 1,
            probes: super::super::traffic::Probes { refused: 1, answered: 0, other: 0 },
            ..Measured::default()
        };
        let lines = Expectation::Lockdown.judge("lockdown", &one).lines;
        assert!(lines[0].ends_with("; 1 request through frontend succeeded"), "{lines:?}");
    }

    #[test]
    fn tolerances_shrink_with_samples() {
        assert!((tolerance(0.1, 100) - 0.12).abs() < 1e-9);
        assert!((tolerance(0.1, 10_000) - 0.012).abs() < 1e-9);
        assert_eq!(tolerance(0.0, 100), 0.01);
    }
}
