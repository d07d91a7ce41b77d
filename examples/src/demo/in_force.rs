//! The routes in force at the control plane, whoever applied them: the demo with a key or
//! `--scenario`, or a person with `ferryctl apply` or curl in another shell.
//!
//! The demo cannot be told about changes it did not make, so it asks: one `GET /v1/routes` a
//! second (the summary's refresh rate), and, only while a change is not yet on every sidecar
//! that calls its service, one `GET /v1/sidecars` to see when it is. Both answer from the
//! control plane's memory.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::{Duration, Instant},
};

use ferry_proto::v1;
use tokio::{sync::watch, task::JoinHandle};

use super::{config_api::ConfigApi, scenario::Scenario};

/// The routes the control plane held at one poll.
#[derive(Debug, Clone)]
pub struct RoutesSeen {
    /// When the poll was sent: it shows every change made before then.
    pub asked_at: Instant,
    /// Every route, by service.
    pub routes: BTreeMap<String, v1::Route>,
    /// The sidecars that do not hold the latest changes yet, with what they hold; empty once
    /// the routes are in force everywhere.
    pub behind: Vec<String>,
    /// Why the last poll failed, if it did; `routes` are then the ones read before.
    pub error: Option<String>,
}

impl RoutesSeen {
    /// Whether every sidecar that calls a service holds its route as seen.
    pub fn in_force(&self) -> bool {
        self.behind.is_empty()
    }
}

/// Polls the routes every `every` until the receiver is dropped or the task aborted.
pub fn watch(api: ConfigApi, every: Duration) -> (watch::Receiver<Option<RoutesSeen>>, JoinHandle<()>) {
    let (sender, receiver) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<RoutesSeen> = None;
        // Services whose route changed since the routes were last in force everywhere.
        let mut unsettled = BTreeSet::new();
        loop {
            tick.tick().await;
            let asked_at = Instant::now();
            let routes = match api.routes().await {
                Ok(routes) => routes,
                Err(error) => {
                    let mut seen =
                        last.clone().unwrap_or(RoutesSeen { asked_at, routes: BTreeMap::new(), behind: Vec::new(), error: None });
                    seen.error = Some(error.to_string());
                    if sender.send(Some(seen)).is_err() {
                        return;
                    }
                    continue;
                }
            };
            let before = last.as_ref().map(|l| versions(&l.routes)).unwrap_or_default();
            let now = versions(&routes);
            unsettled.extend(before.keys().chain(now.keys()).filter(|s| before.get(*s) != now.get(*s)).cloned());
            let behind = if unsettled.is_empty() {
                Vec::new()
            } else {
                match api.routes_behind(&unsettled).await {
                    Ok(behind) => behind,
                    Err(error) => vec![format!("cannot tell which sidecars hold them: {error}")],
                }
            };
            if behind.is_empty() {
                unsettled.clear();
            }
            let seen = RoutesSeen { asked_at, routes, behind, error: None };
            last = Some(seen.clone());
            if sender.send(Some(seen)).is_err() {
                return;
            }
        }
    });
    (receiver, task)
}

/// Each route's version, by service.
pub fn versions(routes: &BTreeMap<String, v1::Route>) -> BTreeMap<String, u64> {
    routes.iter().map(|(service, route)| (service.clone(), route.version)).collect()
}

/// How one service's route in force differs from the one the demo left there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A version the demo did not apply, over the demo's route or where it left none.
    Applied { service: String, version: u64 },
    /// The demo's route was deleted.
    Deleted { service: String },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Applied { service, version } => {
                write!(f, "route/{service} v{} applied outside the demo", ferry_runtime::short::version(*version))
            }
            Change::Deleted { service } => write!(f, "route/{service} deleted outside the demo"),
        }
    }
}

/// How the routes in force differ from `own`, the route versions the demo's actions left.
pub fn changes(own: &BTreeMap<String, u64>, routes: &BTreeMap<String, v1::Route>) -> Vec<Change> {
    let services: BTreeSet<&String> = own.keys().chain(routes.keys()).collect();
    services
        .into_iter()
        .filter_map(|service| match (own.get(service), routes.get(service)) {
            (Some(mine), Some(route)) if *mine == route.version => None,
            (_, Some(route)) => Some(Change::Applied { service: service.clone(), version: route.version }),
            (Some(_), None) => Some(Change::Deleted { service: service.clone() }),
            (None, None) => None,
        })
        .collect()
}

/// The changes in words: `route/catalog v12 and route/frontend v12 applied outside the demo`.
pub fn describe(changes: &[Change]) -> String {
    let applied: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Applied { service, version } => Some(format!("route/{service} v{}", ferry_runtime::short::version(*version))),
            Change::Deleted { .. } => None,
        })
        .collect();
    let deleted: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Deleted { service } => Some(format!("route/{service}")),
            Change::Applied { .. } => None,
        })
        .collect();
    let mut parts = Vec::new();
    if !applied.is_empty() {
        parts.push(format!("{} applied outside the demo", and(&applied)));
    }
    if !deleted.is_empty() {
        parts.push(format!("{} deleted outside the demo", and(&deleted)));
    }
    parts.join("; ")
}

/// `a`, `a and b`, `a, b and c`.
pub fn and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The scenario whose routes `routes` are, rule for rule, whoever applied them.
pub fn same_as_scenario(routes: &BTreeMap<String, v1::Route>) -> Option<Scenario> {
    let rules: BTreeMap<&str, &Vec<v1::RouteRule>> = routes.iter().map(|(s, r)| (s.as_str(), &r.rules)).collect();
    Scenario::ALL.into_iter().find(|scenario| {
        let Ok(resources) = scenario.resources() else { return false };
        let theirs: BTreeMap<&str, &Vec<v1::RouteRule>> = resources
            .iter()
            .filter_map(|r| match &r.kind {
                Some(v1::resource::Kind::Route(route)) => Some((route.service.as_str(), &route.rules)),
                _ => None,
            })
            .collect();
        // A scenario of no routes (an authorization policy) is not told by routes.
        !theirs.is_empty() && theirs == rules
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(pairs: &[(&str, u64)]) -> BTreeMap<String, v1::Route> {
        pairs
            .iter()
            .map(|(s, v)| (s.to_string(), v1::Route { service: s.to_string(), version: *v, ..Default::default() }))
            .collect()
    }

    fn own(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(s, v)| (s.to_string(), *v)).collect()
    }

    #[test]
    fn only_versions_the_demo_did_not_leave_are_changes() {
        assert_eq!(changes(&own(&[]), &routes(&[])), vec![]);
        assert_eq!(changes(&own(&[("catalog", 8)]), &routes(&[("catalog", 8)])), vec![]);
        assert_eq!(
            changes(&own(&[]), &routes(&[("catalog", 12)])),
            vec![Change::Applied { service: "catalog".into(), version: 12 }]
        );
        assert_eq!(
            changes(&own(&[("catalog", 8), ("frontend", 8)]), &routes(&[("catalog", 12)])),
            vec![Change::Applied { service: "catalog".into(), version: 12 }, Change::Deleted { service: "frontend".into() }]
        );
    }

    #[test]
    fn changes_read_as_what_happened() {
        let changes = [
            Change::Applied { service: "catalog".into(), version: 12 },
            Change::Applied { service: "frontend".into(), version: 12 },
            Change::Deleted { service: "inventory".into() },
        ];
        assert_eq!(
            describe(&changes),
            "route/catalog v12 and route/frontend v12 applied outside the demo; route/inventory deleted outside the demo"
        );
        assert_eq!(describe(&changes[..1]), "route/catalog v12 applied outside the demo");
        // The control plane's versions are long: the screen shows their last digits.
        let long = [Change::Applied { service: "catalog".into(), version: 1_796_655_541_938_275 }];
        assert_eq!(describe(&long), "route/catalog v…938275 applied outside the demo");
        assert_eq!(and(&["a".into(), "b".into(), "c".into()]), "a, b and c");
    }

    #[test]
    fn routes_are_recognised_by_their_rules_whatever_their_version() {
        for scenario in Scenario::ALL {
            let mut seen = BTreeMap::new();
            for resource in scenario.resources().expect("valid") {
                if let Some(v1::resource::Kind::Route(mut route)) = resource.kind {
                    route.version = 41;
                    seen.insert(route.service.clone(), route);
                }
            }
            let expected = (!seen.is_empty()).then_some(scenario);
            assert_eq!(same_as_scenario(&seen), expected, "{}", scenario.path());
        }
        assert_eq!(same_as_scenario(&routes(&[("catalog", 3)])), None);
        assert_eq!(same_as_scenario(&BTreeMap::new()), None, "no routes is no scenario");
    }
}
