//! What can be done to the running demo: apply a scenario, reset the routes, or quit, from
//! `--scenario` or from a key typed on the terminal.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::BufRead,
    time::{Duration, Instant},
};

use ferry_proto::v1;
use tokio::sync::mpsc;

use super::{
    config_api::ConfigApi,
    scenario::{ROUTED, Scenario},
};

/// How long an action waits for the sidecars to put a change in force.
const IN_FORCE_LIMIT: Duration = Duration::from_secs(10);

/// Something to do to the running demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Apply(Scenario),
    /// Delete the routes and catalog's authorization policy, so traffic goes to every instance
    /// again from every caller.
    Reset,
    Help,
    Quit,
}

impl Action {
    /// The action a typed line asks for: a key (`c`) or a name (`canary`).
    pub fn parse(line: &str) -> Option<Action> {
        let line = line.trim().to_ascii_lowercase();
        if let Some(scenario) = Scenario::ALL.into_iter().find(|s| line == s.name() || line == s.key().to_string()) {
            return Some(Action::Apply(scenario));
        }
        match line.as_str() {
            "r" | "reset" => Some(Action::Reset),
            "q" | "quit" => Some(Action::Quit),
            "?" | "help" => Some(Action::Help),
            _ => None,
        }
    }

    /// How it reads in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Action::Apply(scenario) => scenario.name(),
            Action::Reset => "reset",
            Action::Help => "help",
            Action::Quit => "quit",
        }
    }
}

/// The keys, as the summary lists them.
pub fn keys_help() -> String {
    let mut help = String::from("keys (then Enter):");
    for scenario in Scenario::ALL {
        let _ = write!(help, "  {} {}", scenario.key(), scenario.name());
    }
    help.push_str("  r reset  ? help  q quit");
    help
}

/// Lines typed on the terminal. A plain thread rather than `tokio::io::stdin`, whose blocking
/// read would keep the runtime from shutting down until Enter is pressed.
pub fn read_lines() -> mpsc::Receiver<String> {
    let (lines, receiver) = mpsc::channel(8);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if lines.blocking_send(line).is_err() {
                return;
            }
        }
    });
    receiver
}

/// What an action did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub action: Action,
    /// The Config API's answers, and how long the change took to be in force.
    pub report: String,
    /// Whether the Config API took the change (all of it, for a reset).
    pub accepted: bool,
    /// Whether the change is in force on every sidecar it concerns.
    pub in_force: bool,
    /// The routes it changed, by service: the version it applied, or `None` where it deleted the
    /// route (or found none). What the control plane holds beyond these was not the demo's doing.
    pub routes: BTreeMap<String, Option<u64>>,
}

/// Applies `scenario`, deletes the demo's other routes, and waits until the sidecars hold it all.
pub async fn apply(api: &ConfigApi, scenario: Scenario) -> Outcome {
    let started = Instant::now();
    let mut report = format!("{}: POST {}/v1/apply with {}\n", scenario.name(), api.base(), scenario.path());
    let mut routes = BTreeMap::new();
    let fail = |mut report: String, error: String, accepted: bool, routes| {
        let _ = writeln!(report, "  FAILED: {error}");
        Outcome { action: Action::Apply(scenario), report, accepted, in_force: false, routes }
    };
    let applied = match api.apply(scenario.yaml()).await {
        Ok(applied) => applied,
        Err(error) => return fail(report, error.to_string(), false, routes),
    };
    // The version each service must reach for the whole scenario to be in force.
    let mut targets: BTreeMap<String, u64> = BTreeMap::new();
    let mut authorizations: BTreeMap<String, u64> = BTreeMap::new();
    for item in &applied {
        let (kind, service, version) = match item.resource.as_ref().and_then(|r| r.kind.as_ref()) {
            Some(v1::resource::Kind::Route(route)) => ("Route", &route.service, route.version),
            Some(v1::resource::Kind::Policy(policy)) => ("ServicePolicy", &policy.service, policy.version),
            Some(v1::resource::Kind::Authorization(policy)) => ("AuthorizationPolicy", &policy.service, policy.version),
            None => continue,
        };
        let change = if item.changed { "changed" } else { "unchanged" };
        let _ = writeln!(report, "  {kind} {service}: version {version} ({change})");
        for line in item.diff.lines() {
            let _ = writeln!(report, "      {line}");
        }
        match item.resource.as_ref().and_then(|r| r.kind.as_ref()) {
            // Enforced by the service's own sidecars, not by its callers.
            Some(v1::resource::Kind::Authorization(_)) => {
                authorizations.insert(service.clone(), version);
                continue;
            }
            Some(v1::resource::Kind::Route(_)) => {
                routes.insert(service.clone(), Some(version));
            }
            _ => {}
        }
        let target = targets.entry(service.clone()).or_default();
        *target = (*target).max(version);
    }
    // Another scenario's authorization policy goes too.
    if !authorizations.contains_key("catalog") {
        match api.delete_authorization("catalog").await {
            Ok(Some(version)) => {
                let _ =
                    writeln!(report, "  DELETE /v1/authorizations/catalog: deleted at version {version} (another scenario's)");
                authorizations.insert("catalog".to_owned(), version);
            }
            Ok(None) => {}
            Err(error) => return fail(report, error.to_string(), true, routes),
        }
    }
    // The demo's other routes go, so what is in force is exactly this scenario.
    let others: Vec<&str> = ROUTED.into_iter().filter(|s| !targets.contains_key(*s)).collect();
    for service in others {
        match api.delete_route(service).await {
            Ok(Some(version)) => {
                let _ = writeln!(report, "  DELETE /v1/routes/{service}: deleted at version {version} (another scenario's)");
                targets.insert(service.to_owned(), version);
                routes.insert(service.to_owned(), None);
            }
            Ok(None) => {
                routes.insert(service.to_owned(), None);
            }
            Err(error) => return fail(report, error.to_string(), true, routes),
        }
    }
    finish(api, Action::Apply(scenario), report, targets, authorizations, started, routes).await
}

/// Deletes the demo's routes and catalog's authorization policy, so traffic goes to every
/// instance again, from every caller. Service policies stay: they only name subsets.
pub async fn reset(api: &ConfigApi) -> Outcome {
    let started = Instant::now();
    let mut report = String::from("reset: deleting the demo's routes and catalog's authorization policy\n");
    let mut targets = BTreeMap::new();
    let mut authorizations = BTreeMap::new();
    let mut routes = BTreeMap::new();
    match api.delete_authorization("catalog").await {
        Ok(Some(version)) => {
            let _ = writeln!(report, "  DELETE {}/v1/authorizations/catalog: deleted at version {version}", api.base());
            authorizations.insert("catalog".to_owned(), version);
        }
        Ok(None) => {}
        Err(error) => {
            let _ = writeln!(report, "  FAILED: {error}");
            return Outcome { action: Action::Reset, report, accepted: false, in_force: false, routes };
        }
    }
    for service in ROUTED {
        match api.delete_route(service).await {
            Ok(Some(version)) => {
                let _ = writeln!(report, "  DELETE {}/v1/routes/{service}: deleted at version {version}", api.base());
                targets.insert(service.to_owned(), version);
            }
            Ok(None) => {
                let _ = writeln!(report, "  DELETE {}/v1/routes/{service}: there was none", api.base());
            }
            Err(error) => {
                let _ = writeln!(report, "  FAILED: {error}");
                return Outcome { action: Action::Reset, report, accepted: false, in_force: false, routes };
            }
        }
        routes.insert(service.to_owned(), None);
    }
    finish(api, Action::Reset, report, targets, authorizations, started, routes).await
}

/// Waits until every service in `targets` is at its version on the sidecars that call it, and
/// every authorization policy in `authorizations` at its version on the service's own sidecars.
async fn finish(
    api: &ConfigApi,
    action: Action,
    mut report: String,
    targets: BTreeMap<String, u64>,
    authorizations: BTreeMap<String, u64>,
    started: Instant,
    routes: BTreeMap<String, Option<u64>>,
) -> Outcome {
    let mut in_force = true;
    for (service, version) in authorizations {
        match api.wait_authorization_in_force(&service, version, IN_FORCE_LIMIT).await {
            Ok(sidecars) => {
                let _ = writeln!(
                    report,
                    "  authorization/{service} enforced by every {service} sidecar ({sidecars}), {} ms after the request",
                    started.elapsed().as_millis()
                );
            }
            Err(error) => {
                in_force = false;
                let _ = writeln!(report, "  NOT IN FORCE: {error}");
            }
        }
    }
    for (service, version) in targets {
        match api.wait_in_force(&service, version, IN_FORCE_LIMIT).await {
            Ok(0) => {
                let _ = writeln!(report, "  no sidecar calls {service} yet: they get it with their first request to it");
            }
            Ok(callers) => {
                let _ = writeln!(
                    report,
                    "  in force on every sidecar that calls {service} ({callers}), {} ms after the request",
                    started.elapsed().as_millis()
                );
            }
            Err(error) => {
                in_force = false;
                let _ = writeln!(report, "  NOT IN FORCE: {error}");
            }
        }
    }
    Outcome { action, report, accepted: true, in_force, routes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names_are_actions() {
        assert_eq!(Action::parse("c"), Some(Action::Apply(Scenario::Canary)));
        assert_eq!(Action::parse(" H\n"), Some(Action::Apply(Scenario::HeaderCanary)));
        assert_eq!(Action::parse("fault"), Some(Action::Apply(Scenario::Fault)));
        assert_eq!(Action::parse("r"), Some(Action::Reset));
        assert_eq!(Action::parse("q"), Some(Action::Quit));
        assert_eq!(Action::parse("x"), None);
        assert!(keys_help().contains("h header-canary") && keys_help().contains("? help"));
        assert_eq!(Action::parse("?"), Some(Action::Help));
        assert_eq!(Action::parse("l"), Some(Action::Apply(Scenario::Lockdown)));
    }
}
