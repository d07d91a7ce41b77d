//! Consul's JSON shapes, as its Go client (`github.com/hashicorp/consul/api`) decodes them, made
//! from Ferry's instances.
//!
//! Ferry has one synthetic node: the control plane, which plays the agent every service is
//! registered with (see [`super::Consul`]). Every instance is on it; its address is the
//! control plane's, and each instance keeps its own as `ServiceAddress`.

use std::collections::BTreeMap;

use ferry_proto::{v1, validate::DEFAULT_WEIGHT};
use serde::Serialize;

use super::{Consul, filter::Subject, tags};
use crate::registry::Instance;

/// The CheckID of an instance's synthetic check is this and the instance id.
pub const INSTANCE_CHECK_PREFIX: &str = "ferry:";
/// The name of an instance's synthetic check.
pub const INSTANCE_CHECK_NAME: &str = "Ferry instance health";

/// `Weights` of a service.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

/// A service as the agent lists it (`AgentService`), and as `Service` in a health entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub port: u16,
    pub address: String,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub datacenter: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A check as the agent and the health endpoints list it (`HealthCheck`, `AgentCheck`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub status: &'static str,
    pub notes: String,
    pub output: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    #[serde(rename = "Type")]
    pub kind: &'static str,
    pub interval: String,
    pub timeout: String,
    pub definition: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A node (`Node`, `CatalogNode`'s node).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One instance in `GET /v1/catalog/service/{name}` (`CatalogService`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CatalogService {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub node_meta: BTreeMap<String, String>,
    pub service_kind: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub service_address: String,
    pub service_meta: BTreeMap<String, String>,
    pub service_port: u16,
    pub service_weights: Weights,
    pub service_enable_tag_override: bool,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One instance in `GET /v1/health/service/{name}` (`ServiceEntry`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    pub node: Node,
    pub service: AgentService,
    pub checks: Vec<HealthCheck>,
}

/// An instance with what its checks found, as every shape is made from.
pub struct View {
    pub instance: v1::Instance,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

impl View {
    /// The view of `instance`, described by the registry (`described` carries its checks'
    /// statuses).
    pub fn new(instance: &Instance, described: v1::Instance) -> Self {
        Self { tags: tags::tags(&instance.metadata), meta: tags::meta(&instance.metadata), instance: described }
    }

    /// Consul's status of the whole instance: `passing`, `warning` or `critical`.
    pub fn status(&self) -> &'static str {
        status(self.instance.health)
    }

    pub fn agent_service(&self, consul: &Consul) -> AgentService {
        let i = &self.instance;
        AgentService {
            id: i.id.clone(),
            service: i.service.clone(),
            tags: self.tags.clone(),
            meta: self.meta.clone(),
            port: u16::try_from(i.port).unwrap_or(0),
            address: i.address.clone(),
            weights: Weights { passing: consul_weight(i.weight), warning: 1 },
            enable_tag_override: false,
            datacenter: consul.datacenter.clone(),
            create_index: i.index.max(1),
            modify_index: i.index.max(1),
        }
    }

    pub fn catalog_service(&self, consul: &Consul) -> CatalogService {
        let node = consul.node();
        let service = self.agent_service(consul);
        CatalogService {
            id: node.id,
            node: node.node,
            address: node.address,
            datacenter: node.datacenter,
            tagged_addresses: node.tagged_addresses,
            node_meta: node.meta,
            service_kind: String::new(),
            service_id: service.id,
            service_name: service.service,
            service_tags: service.tags,
            service_address: service.address,
            service_meta: service.meta,
            service_port: service.port,
            service_weights: service.weights,
            service_enable_tag_override: false,
            create_index: service.create_index,
            modify_index: service.modify_index,
        }
    }

    pub fn checks(&self, consul: &Consul) -> Vec<HealthCheck> {
        let i = &self.instance;
        i.checks
            .iter()
            .map(|check| {
                use v1::check::Probe;
                let kind = match check.probe {
                    Some(Probe::Http(_)) => "http",
                    Some(Probe::Tcp(_)) => "tcp",
                    Some(Probe::Grpc(_)) => "grpc",
                    Some(Probe::Script(_)) => "script",
                    Some(Probe::Ttl(_)) | None => "ttl",
                };
                let text = |d: &Option<ferry_proto::types::Duration>| {
                    d.as_ref()
                        .and_then(|d| ferry_proto::validate::duration("", d).ok())
                        .map(|d| humantime::format_duration(d).to_string())
                        .unwrap_or_default()
                };
                HealthCheck {
                    node: consul.node_name.clone(),
                    check_id: check.id.clone(),
                    name: format!("Service '{}' check", i.service),
                    status: status(check.status),
                    notes: String::new(),
                    output: check.output.clone(),
                    service_id: i.id.clone(),
                    service_name: i.service.clone(),
                    service_tags: self.tags.clone(),
                    kind,
                    interval: text(&check.interval),
                    timeout: text(&check.timeout),
                    definition: BTreeMap::new(),
                    create_index: i.index.max(1),
                    modify_index: i.index.max(1),
                }
            })
            .collect()
    }

    /// A check that says what Ferry makes of the whole instance, as Consul's `serfHealth` says
    /// what it makes of a node: an instance without checks (a sidecar's) would otherwise show
    /// `Checks: []`, which Consul's consumers (the Go client's `AggregatedStatus`, Prometheus'
    /// `consul_sd`) read as passing even while Ferry has it critical or draining.
    pub fn instance_check(&self, consul: &Consul) -> HealthCheck {
        let i = &self.instance;
        let health = v1::Health::try_from(i.health).map_or("UNKNOWN", |h| h.as_str_name());
        HealthCheck {
            node: consul.node_name.clone(),
            check_id: format!("{INSTANCE_CHECK_PREFIX}{}", i.id),
            name: INSTANCE_CHECK_NAME.to_owned(),
            status: self.status(),
            notes: "The instance's health as Ferry routes by it: its checks, draining, its sidecar.".to_owned(),
            output: format!("Ferry: {health}"),
            service_id: i.id.clone(),
            service_name: i.service.clone(),
            service_tags: self.tags.clone(),
            kind: "",
            interval: String::new(),
            timeout: String::new(),
            definition: BTreeMap::new(),
            create_index: i.index.max(1),
            modify_index: i.index.max(1),
        }
    }

    /// The instance's check and then its own, as `/v1/health/...` lists them.
    pub fn health_checks(&self, consul: &Consul) -> Vec<HealthCheck> {
        let mut checks = vec![self.instance_check(consul)];
        checks.extend(self.checks(consul));
        checks
    }

    pub fn entry(&self, consul: &Consul) -> ServiceEntry {
        ServiceEntry { node: consul.node(), service: self.agent_service(consul), checks: self.health_checks(consul) }
    }

    /// What a `?filter=` reads of this instance.
    pub fn subject<'a>(&'a self, consul: &'a Consul, empty: &'a BTreeMap<String, String>) -> Subject<'a> {
        Subject {
            name: &self.instance.service,
            id: &self.instance.id,
            address: &self.instance.address,
            port: u16::try_from(self.instance.port).unwrap_or(0),
            tags: &self.tags,
            meta: &self.meta,
            node: &consul.node_name,
            node_address: &consul.node_address,
            datacenter: &consul.datacenter,
            node_meta: empty,
        }
    }
}

/// Ferry's weight in Consul's units: [`DEFAULT_WEIGHT`] of Ferry's is Consul's 1 (the
/// registration multiplies by as much), and a weight never reads as 0, which Consul refuses.
pub fn consul_weight(weight: u32) -> u32 {
    let weight = if weight == 0 { DEFAULT_WEIGHT } else { weight };
    (weight / DEFAULT_WEIGHT).max(1)
}

/// Consul's name of a Ferry health: a check not yet run (`HEALTH_NOT_CHECKED`) is critical, as
/// in Consul; a draining instance is critical too (it takes no new traffic).
pub fn status(health: i32) -> &'static str {
    match v1::Health::try_from(health) {
        Ok(v1::Health::Passing) => "passing",
        Ok(v1::Health::Warning) => "warning",
        _ => "critical",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instance_check_says_what_ferry_makes_of_the_instance() {
        let consul = Consul::new("dc1".into(), ([127, 0, 0, 1], 8500).into());
        let view = |health: v1::Health| View {
            instance: v1::Instance { id: "web-1".into(), service: "web".into(), health: health.into(), ..Default::default() },
            tags: Vec::new(),
            meta: BTreeMap::new(),
        };
        for (health, status) in [
            (v1::Health::Passing, "passing"),
            (v1::Health::Warning, "warning"),
            (v1::Health::Critical, "critical"),
            (v1::Health::Draining, "critical"),
        ] {
            let view = view(health);
            let check = view.instance_check(&consul);
            assert_eq!((check.check_id.as_str(), check.status), ("ferry:web-1", status), "{health:?}");
            assert_eq!((check.service_id.as_str(), check.service_name.as_str()), ("web-1", "web"));
            assert_eq!(view.entry(&consul).checks.len(), 1, "an instance without checks still has this one");
        }
    }

    #[test]
    fn a_check_with_no_result_yet_is_critical_as_in_consul() {
        assert_eq!(status(v1::Health::NotChecked as i32), "critical");
        assert_eq!(status(v1::Health::Passing as i32), "passing");
    }

    #[test]
    fn ferry_weights_read_back_in_consuls_units() {
        assert_eq!(consul_weight(0), 1, "unset is Ferry's default, Consul's 1");
        assert_eq!(consul_weight(DEFAULT_WEIGHT), 1);
        assert_eq!(consul_weight(300), 3);
        assert_eq!(consul_weight(10_000), 100);
        assert_eq!(consul_weight(50), 1, "a weight below one unit is still at least 1");
    }
}
