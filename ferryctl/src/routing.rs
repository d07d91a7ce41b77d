//! The routing commands of `ferryctl`: apply, get, delete, history, rollback, and the
//! per-resource half of `status`.

use std::io::Read;

use anyhow::Context;
use clap::ValueEnum;
use ferry_proto::{
    json,
    v1::{self, config_client::ConfigClient, registry_client::RegistryClient},
    validate,
};
use ferry_tls::api::ApiChannel;
use serde::Serialize;

use ferry_runtime::short::{Unmatched, VersionRef, Versions};

use super::{ControlPlane, Output, UsageError, ago, connect, table::Table};

/// Which kind of resource a command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Routes (Route resources).
    #[value(alias = "routes")]
    Route,
    /// Service policies (ServicePolicy resources).
    #[value(alias = "policies", alias = "servicepolicy", alias = "servicepolicies")]
    Policy,
    /// Authorization policies (AuthorizationPolicy resources).
    #[value(
        alias = "authorizations",
        alias = "authz",
        alias = "authorizationpolicy",
        alias = "authorizationpolicies",
        alias = "authorization-policy",
        alias = "authorization-policies"
    )]
    Authorization,
}

impl KindArg {
    fn noun(self) -> &'static str {
        match self {
            Self::Route => "route",
            Self::Policy => "policy",
            Self::Authorization => "authorization policy",
        }
    }

    fn proto(self) -> v1::ResourceKind {
        match self {
            Self::Route => v1::ResourceKind::Route,
            Self::Policy => v1::ResourceKind::Policy,
            Self::Authorization => v1::ResourceKind::Authorization,
        }
    }
}

async fn client(api: &ControlPlane) -> anyhow::Result<ConfigClient<ApiChannel>> {
    Ok(ConfigClient::new(connect(api).await?))
}

fn check_service(service: &str) -> Result<(), UsageError> {
    validate::service_name("SERVICE", service).map_err(|e| UsageError(e.to_string()))
}

/// The resources `apply` sends: the text of `-f FILE|-` and the name to call it by.
#[derive(Debug, Clone)]
pub struct Input {
    name: String,
    text: String,
}

impl Input {
    /// Reads `-f FILE`, or standard input for `-`.
    pub fn read(file: &str) -> anyhow::Result<Self> {
        if file == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading the resources from standard input")?;
            return Ok(Self { name: "<stdin>".into(), text });
        }
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        Ok(Self { name: file.to_owned(), text })
    }
}

/// `ferryctl apply -f FILE|- [--dry-run]`.
pub async fn apply(api: &ControlPlane, output: Output, input: &Input, dry_run: bool) -> anyhow::Result<String> {
    let Input { name, text } = input;
    // Checked here with the server's rules, so a mistake is named before anything is sent.
    let documents = json::placed_resources_from_yaml(text).map_err(|e| anyhow::anyhow!("{name}: {e}; nothing was applied"))?;
    if documents.is_empty() {
        return Err(anyhow::anyhow!("{name}: no resources in the file; nothing was applied"));
    }
    let places: Vec<String> = documents.iter().map(|(at, _)| at.clone()).collect();
    let items = documents.into_iter().map(|(_, r)| v1::ApplyItem { resource: Some(r), expected_version: None }).collect();
    let channel = connect(api).await?;
    let response = match ConfigClient::new(channel.clone()).apply(v1::ApplyRequest { items, dry_run }).await {
        Ok(response) => response.into_inner(),
        // Another replica may serve it.
        Err(status) if status.code() == tonic::Code::Unavailable => return Err(status.into()),
        Err(status) => {
            // The server names the item; the user knows the document.
            let message = json::name_item(status.message(), |i| places.get(i).cloned());
            return Err(anyhow::anyhow!("{name}: {message}; nothing was applied"));
        }
    };
    match output {
        Output::Table => {
            let mut notes = notes(channel, response.applied.iter().filter_map(|a| a.resource.as_ref())).await;
            notes.extend(response.notes.iter().cloned());
            let mut text = applied_text(&response, dry_run);
            for note in notes {
                text.push_str(&format!("note: {note}\n"));
            }
            Ok(text)
        }
        _ => render_resources(output, response.applied.iter().filter_map(|a| a.resource.as_ref())),
    }
}

/// What would keep the routes among `resources` from taking effect, from the registry now:
/// a backend service with no instance, or a subset with none up. A sidecar holds a new route
/// until that changes (the previous one stays in force).
async fn notes<'a>(channel: ApiChannel, resources: impl Iterator<Item = &'a v1::Resource>) -> Vec<String> {
    let routes: Vec<&v1::Route> = resources
        .filter_map(|r| match &r.kind {
            Some(v1::resource::Kind::Route(route)) => Some(route),
            _ => None,
        })
        .collect();
    if routes.is_empty() {
        return Vec::new();
    }
    let mut registry = RegistryClient::new(channel.clone());
    let policies = ConfigClient::new(channel)
        .list(v1::ListRequest { kind: v1::ResourceKind::Policy as i32, service: String::new() })
        .await
        .map(|r| r.into_inner().resources)
        .unwrap_or_default();
    let mut notes = Vec::new();
    for route in routes {
        notes
            .extend(blockers(route, &policies, &mut registry).await.into_iter().map(|b| format!("route/{}: {b}", route.service)));
    }
    notes
}

/// Why sidecars would hold `route`: the backends it sends to (weight above 0) that have no
/// instance able to take traffic.
async fn blockers(route: &v1::Route, policies: &[v1::Resource], registry: &mut RegistryClient<ApiChannel>) -> Vec<String> {
    let mut blockers = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for rule in &route.rules {
        let single = rule.backends.len() == 1;
        for backend in rule.backends.iter().filter(|b| b.weight > 0 || single) {
            let service = if backend.service.is_empty() { route.service.clone() } else { backend.service.clone() };
            if !seen.insert((service.clone(), backend.subset.clone())) {
                continue;
            }
            let request = v1::ListInstancesRequest { service: service.clone(), passing_only: true, ..Default::default() };
            let instances = match registry.list_instances(request).await {
                Ok(response) => response.into_inner().instances,
                Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
                Err(_) => continue,
            };
            let labels = policies.iter().find_map(|p| match &p.kind {
                Some(v1::resource::Kind::Policy(p)) if p.service == service => p.subsets.get(&backend.subset).map(|s| &s.labels),
                _ => None,
            });
            let up = instances
                .iter()
                .filter(|i| labels.is_none_or(|labels| labels.iter().all(|(k, v)| i.metadata.get(k) == Some(v))))
                .count();
            if up == 0 {
                blockers.push(match backend.subset.as_str() {
                    "" => format!("service {service} has no instance that can take traffic"),
                    subset => format!("subset {subset} of {service} has no instance that can take traffic"),
                });
            }
        }
    }
    if !blockers.is_empty() {
        blockers.push("until then sidecars keep the route they had (a gateway routes by it at once)".into());
    }
    blockers
}

fn label(resource: &v1::Resource) -> (String, u64) {
    match &resource.kind {
        Some(v1::resource::Kind::Route(r)) => (format!("route/{}", r.service), r.version),
        Some(v1::resource::Kind::Policy(p)) => (format!("policy/{}", p.service), p.version),
        Some(v1::resource::Kind::Authorization(a)) => (format!("authorization/{}", a.service), a.version),
        None => ("unknown".into(), 0),
    }
}

fn applied_text(response: &v1::ApplyResponse, dry_run: bool) -> String {
    let mut out = String::new();
    for applied in &response.applied {
        let Some(resource) = &applied.resource else { continue };
        let (name, version) = label(resource);
        let new = applied.diff.lines().all(|l| !l.starts_with('-'));
        let line = match (dry_run, applied.changed) {
            (true, true) if new => format!("{name} would be created (dry run):\n"),
            (true, true) => format!("{name} would change (dry run):\n"),
            (true, false) => format!("{name} unchanged (dry run)\n"),
            (false, true) => format!("{name} applied, version {version}\n"),
            (false, false) => format!("{name} unchanged, version {version}\n"),
        };
        out.push_str(&line);
        if applied.changed && dry_run {
            for diff_line in applied.diff.lines() {
                out.push_str("  ");
                out.push_str(diff_line);
                out.push('\n');
            }
        }
    }
    out
}

/// Resources as YAML documents, a JSON array, or a table.
fn render_resources<'a>(output: Output, resources: impl Iterator<Item = &'a v1::Resource>) -> anyhow::Result<String> {
    let resources: Vec<&v1::Resource> = resources.collect();
    match output {
        Output::Yaml => Ok(resources.iter().map(|r| json::resource_to_yaml(r)).collect::<Vec<_>>().join("---\n")),
        Output::Json => {
            let values: Vec<_> = resources.iter().map(|r| json::resource_to_value(r)).collect();
            Ok(serde_json::to_string_pretty(&values)? + "\n")
        }
        Output::Table => {
            if resources.is_empty() {
                return Ok("no resources\n".into());
            }
            let mut table = Table::new(&["RESOURCE", "VERSION", "APPLIED", "SUMMARY"]);
            let versions = Versions::new(resources.iter().map(|r| label(r).1));
            for resource in resources {
                let (name, version) = label(resource);
                let (applied_at, summary) = match &resource.kind {
                    Some(v1::resource::Kind::Route(r)) => (r.applied_at.as_ref(), route_summary(r)),
                    Some(v1::resource::Kind::Policy(p)) => (p.applied_at.as_ref(), policy_summary(p)),
                    Some(v1::resource::Kind::Authorization(a)) => (a.applied_at.as_ref(), authorization_summary(a)),
                    None => (None, String::new()),
                };
                table.row(vec![name, versions.show(version), ago(applied_at), summary]);
            }
            Ok(table.render())
        }
    }
}

fn route_summary(route: &v1::Route) -> String {
    let rules: Vec<String> = route
        .rules
        .iter()
        .map(|rule| {
            let backends: Vec<String> = rule
                .backends
                .iter()
                .map(|b| {
                    let target = match (b.service.as_str(), b.subset.as_str()) {
                        ("", "") => route.service.clone(),
                        ("", subset) => subset.to_owned(),
                        (service, "") => service.to_owned(),
                        (service, subset) => format!("{service}/{subset}"),
                    };
                    if rule.backends.len() > 1 { format!("{target}:{}", b.weight) } else { target }
                })
                .collect();
            let target = if backends.is_empty() { route.service.clone() } else { backends.join(",") };
            match &rule.name {
                name if !name.is_empty() => format!("{name}→{target}"),
                _ => target,
            }
        })
        .collect();
    format!("{} rule(s): {}", route.rules.len(), rules.join("; "))
}

fn authorization_summary(policy: &v1::AuthorizationPolicy) -> String {
    let rules: Vec<String> = policy
        .rules
        .iter()
        .map(|rule| {
            let action = if rule.action.is_empty() { "allow" } else { rule.action.as_str() };
            let condition = if rule.r#match.is_some() { " (some requests)" } else { "" };
            format!("{action} {}{condition}", rule.from.join(","))
        })
        .collect();
    let default = if policy.default.is_empty() { "deny" } else { policy.default.as_str() };
    format!("default {default}; {}", if rules.is_empty() { "no rules".into() } else { rules.join("; ") })
}

fn policy_summary(policy: &v1::ServicePolicy) -> String {
    let mut subsets: Vec<String> = policy
        .subsets
        .iter()
        .map(|(name, subset)| {
            let mut labels: Vec<String> = subset.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            format!("{name}({})", labels.join(","))
        })
        .collect();
    subsets.sort();
    format!("subsets: {}", if subsets.is_empty() { "-".into() } else { subsets.join(" ") })
}

/// `ferryctl get routes|policies [SERVICE]`.
pub async fn get(api: &ControlPlane, output: Output, kind: KindArg, service: Option<String>) -> anyhow::Result<String> {
    if let Some(service) = &service {
        check_service(service)?;
    }
    let request = v1::ListRequest { kind: kind.proto() as i32, service: service.clone().unwrap_or_default() };
    let response = client(api).await?.list(request).await?.into_inner();
    if let Some(service) = service
        && response.resources.is_empty()
    {
        crate::known_service(api, &service).await?;
        return Err(anyhow::anyhow!("no {} for service {service:?}", kind.noun()));
    }
    // Empty YAML is no text at all: say so where it does not spoil the stream (JSON has `[]`,
    // the table its own line).
    if output == Output::Yaml && response.resources.is_empty() {
        crate::out::stderr("no resources\n");
    }
    render_resources(output, response.resources.iter())
}

/// `ferryctl delete route|policy SERVICE`.
pub async fn delete(
    api: &ControlPlane,
    output: Output,
    kind: KindArg,
    service: String,
    expected: Option<VersionRef>,
) -> anyhow::Result<String> {
    check_service(&service)?;
    let mut config = client(api).await?;
    let expected_version = match expected {
        None => None,
        Some(VersionRef::Whole(whole)) => Some(whole),
        // Its last digits, as a table shows them: they must be those of the current version,
        // which is then the one the control plane checks, as if written whole.
        Some(tail) => {
            let request = v1::HistoryRequest { kind: kind.proto() as i32, service: service.clone() };
            let entries = config.history(request).await?.into_inner().entries;
            let current = entries.first().map_or(0, current_version);
            if current == 0 || !tail.matches(current) {
                let now = if current == 0 { "does not exist".to_owned() } else { format!("is at version {current}") };
                return Err(anyhow::anyhow!(
                    "expected_version: the {} of {service:?} {now}, not {tail}; nothing was deleted",
                    kind.noun()
                ));
            }
            Some(current)
        }
    };
    let request = v1::DeleteRequest { kind: kind.proto() as i32, service, expected_version };
    let response = config.delete(request).await?.into_inner();
    match (output, &response.resource) {
        (Output::Table, Some(resource)) => Ok(format!("{} deleted\n", label(resource).0)),
        (_, resource) => render_resources(output, resource.iter()),
    }
}

#[derive(Serialize)]
struct HistoryRow {
    version: u64,
    at: Option<String>,
    deleted: bool,
    resource: serde_json::Value,
}

/// `ferryctl history route|policy SERVICE`.
pub async fn history(api: &ControlPlane, output: Output, kind: KindArg, service: String) -> anyhow::Result<String> {
    check_service(&service)?;
    let response = client(api)
        .await?
        .history(v1::HistoryRequest { kind: kind.proto() as i32, service: service.clone() })
        .await?
        .into_inner();
    if response.entries.is_empty() {
        return Err(anyhow::anyhow!("{} {service} has no history", kind_name(kind)));
    }
    match output {
        Output::Table => {
            let mut table = Table::new(&["VERSION", "APPLIED", "CHANGE"]);
            let versions = Versions::new(response.entries.iter().map(|e| e.version));
            for entry in &response.entries {
                let change = match &entry.resource {
                    None => "deleted".to_owned(),
                    Some(resource) => match &resource.kind {
                        Some(v1::resource::Kind::Route(r)) => route_summary(r),
                        Some(v1::resource::Kind::Policy(p)) => policy_summary(p),
                        Some(v1::resource::Kind::Authorization(a)) => authorization_summary(a),
                        None => String::new(),
                    },
                };
                table.row(vec![versions.show(entry.version), ago(entry.at.as_ref()), change]);
            }
            Ok(table.render())
        }
        Output::Json | Output::Yaml => {
            let rows: Vec<HistoryRow> = response
                .entries
                .iter()
                .map(|e| HistoryRow {
                    version: e.version,
                    at: e.at.map(|t| humantime::format_rfc3339_seconds(ferry_proto::time::system_time(t)).to_string()),
                    deleted: e.resource.is_none(),
                    resource: e.resource.as_ref().map(json::resource_to_value).unwrap_or_default(),
                })
                .collect();
            super::encode(output, &rows)
        }
    }
}

fn kind_name(kind: KindArg) -> String {
    format!("the {} of", kind.noun())
}

/// `ferryctl rollback route|policy SERVICE [--to VERSION]`: applies an earlier version again
/// (the one before the current by default), on condition that nobody changed it meanwhile.
pub async fn rollback(
    api: &ControlPlane,
    output: Output,
    kind: KindArg,
    service: String,
    to: Option<VersionRef>,
) -> anyhow::Result<String> {
    check_service(&service)?;
    let mut config = client(api).await?;
    let entries =
        config.history(v1::HistoryRequest { kind: kind.proto() as i32, service: service.clone() }).await?.into_inner().entries;
    // Newest first.
    let Some(current) = entries.first() else {
        return Err(anyhow::anyhow!("{} {service} has no history to roll back", kind_name(kind)));
    };
    let target = match to {
        Some(wanted) => {
            let kept = || entries.iter().map(|e| e.version.to_string()).collect::<Vec<_>>().join(", ");
            let version = wanted.pick(entries.iter().map(|e| e.version)).map_err(|unmatched| match unmatched {
                Unmatched::None => UsageError(format!("--to {wanted}: not among the versions kept ({})", kept())),
                Unmatched::Several(several) => UsageError(format!(
                    "--to {wanted}: several versions kept end so ({}); give more digits",
                    several.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
                )),
            })?;
            entries.iter().find(|e| e.version == version).ok_or_else(|| UsageError(format!("--to {wanted}: not kept")))?
        }
        None => entries
            .get(1)
            .ok_or_else(|| anyhow::anyhow!("{} {service} has only one version; nothing to roll back to", kind_name(kind)))?,
    };
    if target.version == current.version {
        return Err(UsageError(format!("--to {}: that is the current version", target.version)).into());
    }
    let applied = match &target.resource {
        Some(resource) => {
            let item = v1::ApplyItem { resource: Some(resource.clone()), expected_version: Some(current_version(current)) };
            let response = config.apply(v1::ApplyRequest { items: vec![item], dry_run: false }).await?.into_inner();
            response.applied.into_iter().next().and_then(|a| a.resource)
        }
        None => {
            let request = v1::DeleteRequest {
                kind: kind.proto() as i32,
                service: service.clone(),
                expected_version: Some(current_version(current)),
            };
            config.delete(request).await?;
            None
        }
    };
    match (output, &applied) {
        (Output::Table, Some(resource)) => {
            Ok(format!("{} rolled back to version {}: now version {}\n", label(resource).0, target.version, label(resource).1))
        }
        (Output::Table, None) => {
            Ok(format!("{}/{service} rolled back to version {}: it is deleted now\n", kind.noun(), target.version))
        }
        (_, applied) => render_resources(output, applied.iter()),
    }
}

/// The version an update must expect: the current one, or 0 when the newest entry deleted it.
fn current_version(entry: &v1::HistoryEntry) -> u64 {
    if entry.resource.is_some() { entry.version } else { 0 }
}

/// One resource's rollout across the sidecars that use it.
#[derive(Debug, Serialize)]
pub struct Rollout {
    pub resource: String,
    pub version: u64,
    pub acked: Vec<String>,
    pub pending: Vec<String>,
    pub rejected: Vec<Rejected>,
    /// What keeps sidecars from putting this version in force, from the registry now.
    pub waiting_for: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Rejected {
    pub node_id: String,
    pub error: String,
}

/// For every route and policy: which sidecars hold its current version, which do not yet, and
/// which rejected it. An authorization policy is held by its own service's sidecars.
pub async fn rollouts(channel: ApiChannel, sidecars: &v1::ListSidecarsResponse) -> anyhow::Result<Vec<Rollout>> {
    let resources = ConfigClient::new(channel.clone()).list(v1::ListRequest::default()).await?.into_inner().resources;
    let mut registry = RegistryClient::new(channel);
    let mut rollouts = Vec::new();
    for resource in &resources {
        let (name, version) = label(resource);
        let (service, kind) = match &resource.kind {
            Some(v1::resource::Kind::Route(r)) => (r.service.as_str(), KindArg::Route),
            Some(v1::resource::Kind::Policy(p)) => (p.service.as_str(), KindArg::Policy),
            Some(v1::resource::Kind::Authorization(a)) => (a.service.as_str(), KindArg::Authorization),
            None => continue,
        };
        let waiting_for = match &resource.kind {
            Some(v1::resource::Kind::Route(route)) => blockers(route, &resources, &mut registry).await,
            _ => Vec::new(),
        };
        let mut rollout =
            Rollout { resource: name, version, acked: Vec::new(), pending: Vec::new(), rejected: Vec::new(), waiting_for };
        for sidecar in &sidecars.sidecars {
            let progress = match kind {
                KindArg::Authorization if sidecar.service == service && !sidecar.instance_id.is_empty() => {
                    sidecar.authorization.unwrap_or_default()
                }
                KindArg::Authorization => continue,
                _ => {
                    let Some(subscription) = sidecar.subscriptions.iter().find(|s| s.service == service) else { continue };
                    if kind == KindArg::Route { subscription.route } else { subscription.policy }.unwrap_or_default()
                }
            };
            if progress.acked_version >= version {
                rollout.acked.push(sidecar.node_id.clone());
            } else if progress.rejected_version >= version {
                let error = sidecar.last_nack.as_ref().map_or_else(String::new, |n| n.error.clone());
                rollout.rejected.push(Rejected { node_id: sidecar.node_id.clone(), error });
            } else {
                rollout.pending.push(sidecar.node_id.clone());
            }
        }
        rollouts.push(rollout);
    }
    Ok(rollouts)
}

/// The rollouts as text, after the sidecar table.
pub fn rollouts_text(rollouts: &[Rollout], versions: &Versions) -> String {
    if rollouts.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&["RESOURCE", "VERSION", "ACKED", "PENDING", "REJECTED", "STATE"]);
    let mut details = String::new();
    for rollout in rollouts {
        let state = if !rollout.rejected.is_empty() {
            "rejected"
        } else if !rollout.waiting_for.is_empty() {
            "held"
        } else if !rollout.pending.is_empty() {
            "rolling out"
        } else if rollout.acked.is_empty() {
            "unused"
        } else {
            "live everywhere"
        };
        let version = versions.show(rollout.version);
        table.row(vec![
            rollout.resource.clone(),
            version.clone(),
            rollout.acked.len().to_string(),
            rollout.pending.len().to_string(),
            rollout.rejected.len().to_string(),
            state.into(),
        ]);
        for node in &rollout.pending {
            details.push_str(&format!("{} v{version}: pending on {node}\n", rollout.resource));
        }
        for reason in &rollout.waiting_for {
            details.push_str(&format!("{} v{version}: {reason}\n", rollout.resource));
        }
        for rejected in &rollout.rejected {
            details.push_str(&format!("{} v{version}: rejected by {}: {}\n", rollout.resource, rejected.node_id, rejected.error));
        }
    }
    let mut out = String::from("\n");
    out.push_str(&table.render());
    if !details.is_empty() {
        out.push('\n');
        out.push_str(&details);
    }
    out
}
