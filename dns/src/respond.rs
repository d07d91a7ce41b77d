//! [`Responder`]: the answer to one question, from the zone's shape and the [`Directory`], and
//! for an intercepting server from the upstream resolvers too.
//!
//! Intercepting, the server is the app's only resolver, and a mesh service's name stands for its
//! virtual IP, so that every connection to the service goes through the sidecar's balancer:
//!
//! - `NAME.service.ferry.`, `NAME.vip.ferry.`, the bare `NAME.` and their spellings under the
//!   resolver's search domains answer A (or AAAA, by the address's family) with the virtual IP
//!   and NODATA for every other type, at once: a resolver asking AAAA beside A must not wait;
//! - SRV of `NAME.service.ferry.` and `TAG.NAME.service.ferry.` keep giving the instances, whose
//!   ports and versions are the point of those names;
//! - the same holds under every alias domain (`NAME.service.consul.`, ...), but only for a
//!   service the address table knows (it has a virtual IP or is listed without one): during a
//!   migration the app still asks a real Consul for its other services and for `X.node.consul.`
//!   or `X.query.consul.`, so every other name under an alias is forwarded (`HEX.addr.` names,
//!   the targets of this server's own SRV answers, excepted);
//! - a name outside `ferry.` and the aliases that is not a mesh service with a virtual IP is
//!   forwarded; a name under `ferry.` never is.
//!
//! Whether a bare name is a service is asked of [`Directory::virtual_ip`] alone, never of
//! [`Directory::lookup`]: the app looks up every host it talks to, and none of those may cost
//! the sidecar a subscription.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use hickory_proto::{
    op::LowerQuery,
    rr::{DNSClass, LowerName, Name, RecordType},
};
use tokio::sync::Semaphore;

use crate::{
    Directory, Lookup, ServeConfig, VirtualIpLookup, ZoneKind,
    answer::{Answer, Zone},
    forward::{Forwarder, RequestFlags},
    name::{self, MeshName},
};

/// How long a question may wait on the [`Directory`] before the answer is SERVFAIL. The
/// sidecar may subscribe on demand; stub resolvers give up after about 5 s, so answer before.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How many questions may wait on the directory at once; past that they get SERVFAIL at once,
/// so a flood of queries cannot pile up tasks behind a slow directory.
pub const MAX_CONCURRENT_LOOKUPS: usize = 1024;

/// Why a question got no answer from the directory.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error("directory lookup timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0} directory lookups already in flight")]
    Overloaded(usize),
}

/// Whether an intercepting server answers a name under an alias or forwards it.
enum AliasClaim {
    /// The mesh's name: answered here, with what the address table said of its service.
    Ours(Option<VirtualIpLookup>),
    /// Not the mesh's: forwarded.
    Upstream,
}

/// What an intercepting server knows beyond the zone.
pub(crate) struct Intercept {
    /// The search domains of the app's resolver, under which it spells mesh names too.
    pub(crate) search: Vec<LowerName>,
    /// Where every other name goes.
    pub(crate) forwarder: Forwarder,
}

/// Answers single questions.
pub(crate) struct Responder {
    directory: Arc<dyn Directory>,
    /// `ferry.` and the aliases, the longest domain first, so that a name under nested aliases
    /// (`dc1.consul.` in `consul.`) belongs to the nearer one.
    zones: Vec<Zone>,
    /// Bumped once per service answer; its value is the round-robin offset.
    rotation: AtomicUsize,
    lookups: Semaphore,
    max_lookups: usize,
    lookup_timeout: Duration,
    intercept: Option<Intercept>,
}

impl Responder {
    /// Answers from `directory`; with `intercept`, as the app's only resolver.
    pub(crate) fn new(directory: Arc<dyn Directory>, config: &ServeConfig, intercept: Option<Intercept>) -> Self {
        Self::with_limits(directory, config, intercept, MAX_CONCURRENT_LOOKUPS, LOOKUP_TIMEOUT)
    }

    fn with_limits(
        directory: Arc<dyn Directory>,
        config: &ServeConfig,
        intercept: Option<Intercept>,
        max_lookups: usize,
        lookup_timeout: Duration,
    ) -> Self {
        let mut aliases = config.aliases.clone();
        aliases.sort_by_key(|alias| alias.to_string());
        aliases.dedup();
        let mut zones: Vec<Zone> = std::iter::once(Zone::ferry(&config.cache))
            .chain(aliases.iter().map(|alias| Zone::alias(&config.cache, alias)))
            .collect();
        zones.sort_by_key(|zone| std::cmp::Reverse(zone.origin().iter().count()));
        Self {
            directory,
            zones,
            rotation: AtomicUsize::new(0),
            lookups: Semaphore::new(max_lookups),
            max_lookups,
            lookup_timeout,
            intercept,
        }
    }

    /// Whether this is an intercepting server, which offers recursion (the RA bit).
    pub(crate) fn intercepts(&self) -> bool {
        self.intercept.is_some()
    }

    /// The answer to `query`, whose request carried `flags`. Owner names in the answer are
    /// spelled as the question spelled them; matching itself ignores case.
    pub(crate) async fn respond(&self, query: &LowerQuery, flags: RequestFlags) -> Answer {
        let qname: &Name = query.original().name();
        let qtype = query.query_type();
        let Some((zone, mesh_name)) = self.zones.iter().find_map(|zone| Some((zone, zone.parse(query.name())?))) else {
            return match &self.intercept {
                Some(intercept) => self.outside(intercept, query, flags).await,
                None => Answer::refused(),
            };
        };
        // What the address table said of the service an alias name stands for, so that it is
        // not asked twice.
        let mut known_vip = None;
        if let Some(intercept) = &self.intercept
            && zone.kind() == ZoneKind::Alias
        {
            match self.claim_alias_name(query, &mesh_name).await {
                AliasClaim::Ours(vip) => known_vip = vip,
                AliasClaim::Upstream => return intercept.forwarder.forward(query.original(), flags).await,
            }
        }
        if query.query_class() != DNSClass::IN {
            // Ferry's names exist in class IN only; other classes are not ours to answer.
            return Answer::refused();
        }
        match mesh_name {
            MeshName::NotFound => zone.nxdomain(),
            MeshName::Apex => zone.apex(qtype),
            MeshName::EmptyNonTerminal => zone.nodata(),
            MeshName::Addr(ip) => zone.address(qname, qtype, ip),
            MeshName::Vip { name } => self.vip(zone, qname, qtype, &name, known_vip).await,
            MeshName::Service { name, tag } => self.service(zone, qname, qtype, &name, tag.as_deref(), known_vip).await,
        }
    }

    /// Whether an intercepting server answers `query`, a name under an alias, itself: only
    /// when it names a service the address table knows, and `HEX.addr.` names, which need no
    /// directory. Every other name there (Consul's `node.`, `query.`, `connect.`, services
    /// outside the mesh, the apex) belongs to whatever the app resolved it from before the
    /// mesh, which the upstreams still reach. Asked of [`Directory::virtual_ip`] only, so a
    /// name outside the mesh costs no subscription; a directory that cannot tell yet (or does
    /// not answer in time) forwards, as for a bare name.
    async fn claim_alias_name(&self, query: &LowerQuery, mesh_name: &MeshName) -> AliasClaim {
        let service = match mesh_name {
            MeshName::Addr(_) if query.query_class() == DNSClass::IN => return AliasClaim::Ours(None),
            MeshName::Service { name, .. } | MeshName::Vip { name } if query.query_class() == DNSClass::IN => name,
            _ => return AliasClaim::Upstream,
        };
        match self.ask(self.directory.virtual_ip(service)).await {
            Ok(found @ (VirtualIpLookup::Assigned(_) | VirtualIpLookup::Unassigned)) => AliasClaim::Ours(Some(found)),
            Ok(found) => {
                tracing::trace!(service, ?found, "not a mesh service; forwarding the alias name");
                AliasClaim::Upstream
            }
            Err(error) => {
                tracing::debug!(service, %error, "forwarding the alias name");
                AliasClaim::Upstream
            }
        }
    }

    /// The virtual IP of `service`: `known` when the address table was asked already.
    async fn virtual_ip(&self, service: &str, known: Option<VirtualIpLookup>) -> Result<VirtualIpLookup, LookupError> {
        match known {
            Some(found) => Ok(found),
            None => self.ask(self.directory.virtual_ip(service)).await,
        }
    }

    /// `NAME.vip.DOMAIN.`.
    async fn vip(&self, zone: &Zone, qname: &Name, qtype: RecordType, service: &str, known: Option<VirtualIpLookup>) -> Answer {
        match self.virtual_ip(service, known).await {
            Ok(VirtualIpLookup::Assigned(ip)) => zone.address(qname, qtype, ip),
            Ok(VirtualIpLookup::Unassigned) => zone.nodata(),
            Ok(VirtualIpLookup::NoSuchService) => zone.nxdomain(),
            Ok(VirtualIpLookup::Unknown) => {
                tracing::debug!(service, "the directory cannot tell the virtual IP; answering SERVFAIL");
                Answer::servfail()
            }
            Err(error) => Self::failed(service, &error),
        }
    }

    /// `[TAG.]NAME.service.DOMAIN.`.
    async fn service(
        &self,
        zone: &Zone,
        qname: &Name,
        qtype: RecordType,
        service: &str,
        tag: Option<&str>,
        known_vip: Option<VirtualIpLookup>,
    ) -> Answer {
        if self.intercept.is_some() && tag.is_none() && qtype != RecordType::SRV {
            match self.virtual_ip(service, known_vip).await {
                Ok(VirtualIpLookup::Assigned(ip)) => return zone.address(qname, qtype, ip),
                // No virtual IP to give: the instances, as without interception (a connection
                // to one of them is intercepted as well).
                Ok(_) => {}
                Err(error) => return Self::failed(service, &error),
            }
        }
        match self.ask(self.directory.lookup(service)).await {
            Ok(Lookup::NoSuchService) => zone.nxdomain(),
            Ok(Lookup::Unknown) => {
                tracing::debug!(service, "the directory cannot tell; answering SERVFAIL");
                Answer::servfail()
            }
            Ok(Lookup::Endpoints(endpoints)) => {
                let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
                zone.service(qname, qtype, &endpoints, tag, rotation)
            }
            Err(error) => Self::failed(service, &error),
        }
    }

    /// A name outside `ferry.` and the aliases, asked of an intercepting server: a mesh
    /// service's virtual IP, or the upstreams' answer.
    async fn outside(&self, intercept: &Intercept, query: &LowerQuery, flags: RequestFlags) -> Answer {
        let origins: Vec<&LowerName> = self.zones.iter().map(Zone::origin).collect();
        if query.query_class() == DNSClass::IN
            && let Some(service) = name::outside_service(query.name(), &intercept.search, &origins)
        {
            // Only a service with a virtual IP is answered here. Without one the mesh has no
            // single address for the name, and the upstream may well have one (a Kubernetes
            // service of the same name); a directory that cannot tell yet (the sidecar before
            // its first address table) must not cost the app its other names either.
            match self.ask(self.directory.virtual_ip(&service)).await {
                Ok(VirtualIpLookup::Assigned(ip)) => {
                    // Any zone will do, and there is always `ferry.`: an answer outside the
                    // domains carries no SOA of theirs.
                    return self.zones[0].outside_address(query.original().name(), query.query_type(), ip);
                }
                Ok(found) => tracing::trace!(service, ?found, "no virtual IP; forwarding"),
                Err(error) => tracing::debug!(service, %error, "forwarding"),
            }
        }
        intercept.forwarder.forward(query.original(), flags).await
    }

    fn failed(service: &str, error: &LookupError) -> Answer {
        match error {
            LookupError::Timeout(_) => tracing::warn!(service, %error, "answering SERVFAIL"),
            // Logged quietly: under a flood, one line per shed query would flood the log too.
            LookupError::Overloaded(_) => tracing::debug!(service, %error, "answering SERVFAIL"),
        }
        Answer::servfail()
    }

    /// `lookup`, within the directory's concurrency limit and timeout.
    async fn ask<T>(&self, lookup: BoxFuture<'_, T>) -> Result<T, LookupError> {
        let _permit = self.lookups.try_acquire().map_err(|_| LookupError::Overloaded(self.max_lookups))?;
        tokio::time::timeout(self.lookup_timeout, lookup).await.map_err(|_| LookupError::Timeout(self.lookup_timeout))
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::IpAddr};

    use futures::FutureExt;
    use hickory_proto::{
        op::{Query, ResponseCode},
        rr::{RData, Record},
    };
    use tokio::sync::Notify;

    use super::*;
    use crate::{
        DnsEndpoint,
        answer::addresses_of,
        forward::fake::{Behaviour, FakeUpstream},
    };

    /// A directory held in memory; `hang` makes every lookup wait until notified. A service in
    /// `services` without an entry in `vips` has no virtual IP.
    #[derive(Default)]
    struct Memory {
        services: HashMap<String, Vec<DnsEndpoint>>,
        vips: HashMap<String, VirtualIpLookup>,
        hang: Option<Arc<Notify>>,
        /// How many times `lookup` was called: a bare name must never cost one.
        lookups: Arc<AtomicUsize>,
    }

    impl Directory for Memory {
        fn lookup(&self, service: &str) -> BoxFuture<'_, Lookup> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let found = Lookup::from(self.services.get(service).cloned());
            let hang = self.hang.clone();
            async move {
                if let Some(hang) = hang {
                    hang.notified().await;
                }
                found
            }
            .boxed()
        }

        fn virtual_ip(&self, service: &str) -> BoxFuture<'_, VirtualIpLookup> {
            let found = self.vips.get(service).cloned().unwrap_or(if self.services.contains_key(service) {
                VirtualIpLookup::Unassigned
            } else {
                VirtualIpLookup::NoSuchService
            });
            futures::future::ready(found).boxed()
        }
    }

    fn endpoint(address: &str, version: Option<&str>) -> DnsEndpoint {
        DnsEndpoint {
            id: address.to_owned(),
            address: address.to_owned(),
            port: 80,
            version: version.map(str::to_owned),
            tags: Vec::new(),
            has_tag_list: false,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test addresses are valid")
    }

    /// `catalog` (two instances, VIP 240.240.0.1), `empty` (nothing routable, no VIP), `v6`
    /// (VIP fd00::240), `novip` (one instance, no VIP) and `unsure` (the directory cannot tell).
    fn catalog() -> Memory {
        let mut services = HashMap::new();
        services.insert("catalog".to_owned(), vec![endpoint("10.0.0.1", Some("v1")), endpoint("10.0.0.2", Some("v2"))]);
        services.insert("empty".to_owned(), Vec::new());
        services.insert("v6".to_owned(), vec![endpoint("fd00::6", None)]);
        services.insert("novip".to_owned(), vec![endpoint("10.0.0.9", None)]);
        let mut vips = HashMap::new();
        vips.insert("catalog".to_owned(), VirtualIpLookup::Assigned(ip("240.240.0.1")));
        vips.insert("v6".to_owned(), VirtualIpLookup::Assigned(ip("fd00::240")));
        vips.insert("unsure".to_owned(), VirtualIpLookup::Unknown);
        Memory { services, vips, ..Memory::default() }
    }

    fn responder(directory: Memory) -> Responder {
        Responder::new(Arc::new(directory), &ServeConfig::default(), None)
    }

    fn search() -> Vec<LowerName> {
        ["default.svc.cluster.local.", "svc.cluster.local."]
            .iter()
            .map(|domain| LowerName::new(&Name::from_ascii(domain).expect("valid")))
            .collect()
    }

    fn intercepting(directory: Memory, upstream: &FakeUpstream) -> Responder {
        let intercept = Intercept { search: search(), forwarder: Forwarder::new(vec![upstream.addr], Duration::from_secs(2)) };
        Responder::new(Arc::new(directory), &ServeConfig::default(), Some(intercept))
    }

    fn query(name: &str, qtype: RecordType) -> LowerQuery {
        LowerQuery::query(Query::query(Name::from_ascii(name).expect("test names are valid"), qtype))
    }

    impl Responder {
        /// `respond` for a question built in place, with a stub resolver's flags.
        async fn ask_for(&self, name: &str, qtype: RecordType) -> Answer {
            self.respond(&query(name, qtype), RequestFlags { recursion_desired: true, ..RequestFlags::default() }).await
        }
    }

    /// Code, number of answers, whether an SOA is in the authority section.
    fn shape(answer: &Answer) -> (ResponseCode, usize, bool) {
        let soa = answer.authorities.iter().any(|r| matches!(r.data, RData::SOA(_)));
        (answer.code, answer.answers.len(), soa)
    }

    const NODATA: (ResponseCode, usize, bool) = (ResponseCode::NoError, 0, true);
    const NXDOMAIN: (ResponseCode, usize, bool) = (ResponseCode::NXDomain, 0, true);
    /// NODATA for a name outside `ferry.`, which has no SOA of ours to carry.
    const OUTSIDE_NODATA: (ResponseCode, usize, bool) = (ResponseCode::NoError, 0, false);

    #[tokio::test]
    async fn successive_answers_rotate() {
        let responder = responder(catalog());
        let first = responder.ask_for("catalog.service.ferry.", RecordType::A).await;
        let second = responder.ask_for("catalog.service.ferry.", RecordType::A).await;
        assert_eq!(addresses_of(&first.answers), [ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(addresses_of(&second.answers), [ip("10.0.0.2"), ip("10.0.0.1")]);
    }

    #[tokio::test]
    async fn answers_keep_the_question_spelling() {
        let responder = responder(catalog());
        let answer = responder.ask_for("Catalog.Service.FERRY.", RecordType::A).await;
        assert_eq!(answer.answers.len(), 2);
        assert!(answer.answers.iter().all(|r| r.name.to_ascii() == "Catalog.Service.FERRY."));
    }

    #[tokio::test]
    async fn existence_decides_between_nxdomain_and_nodata() {
        let responder = responder(catalog());
        for (name, qtype, expected) in [
            ("unknown.service.ferry.", RecordType::A, NXDOMAIN),
            ("v2.unknown.service.ferry.", RecordType::A, NXDOMAIN),
            ("empty.service.ferry.", RecordType::A, NODATA),
            ("catalog.service.ferry.", RecordType::TXT, NODATA),
            ("service.ferry.", RecordType::A, NODATA),
            ("vip.ferry.", RecordType::A, NODATA),
            ("bad_name.service.ferry.", RecordType::A, NXDOMAIN),
            ("example.com.", RecordType::A, (ResponseCode::Refused, 0, false)),
            ("catalog.", RecordType::A, (ResponseCode::Refused, 0, false)),
        ] {
            assert_eq!(shape(&responder.ask_for(name, qtype).await), expected, "{qtype} {name}");
        }
    }

    /// The name of the SOA in the authority section.
    fn soa_owner(answer: &Answer) -> Option<String> {
        answer.authorities.iter().find(|r| matches!(r.data, RData::SOA(_))).map(|r| r.name.to_ascii())
    }

    #[tokio::test]
    async fn consul_names_answer_as_ferry_names_do() {
        let responder = responder(catalog());
        for (name, ferry, qtype) in [
            ("Catalog.Service.CONSUL.", "catalog.service.ferry.", RecordType::A),
            ("_catalog._tcp.service.consul.", "catalog.service.ferry.", RecordType::A),
            ("_catalog._TCP.service.consul.", "catalog.service.ferry.", RecordType::SRV),
            ("v2.catalog.service.consul.", "v2.catalog.service.ferry.", RecordType::A),
            ("_catalog._v2.service.consul.", "v2.catalog.service.ferry.", RecordType::SRV),
            ("catalog.vip.consul.", "catalog.vip.ferry.", RecordType::A),
            ("0a000001.addr.consul.", "0a000001.addr.ferry.", RecordType::A),
        ] {
            let (alias, own) = (responder.ask_for(name, qtype).await, responder.ask_for(ferry, qtype).await);
            assert_eq!(shape(&alias), shape(&own), "{qtype} {name} as {ferry}");
            assert!(!alias.answers.is_empty(), "{qtype} {name}");
            assert!(alias.answers.iter().all(|r| r.name.to_ascii() == name && r.ttl == 5), "{qtype} {name}: owner as asked");
        }
        let v2 = responder.ask_for("_catalog._v2.service.consul.", RecordType::A).await;
        assert_eq!(addresses_of(&v2.answers), [ip("10.0.0.2")]);
    }

    #[tokio::test]
    async fn consul_negative_answers_carry_the_consul_soa() {
        let responder = responder(catalog());
        for (name, qtype, expected) in [
            ("unknown.service.consul.", RecordType::A, NXDOMAIN),
            ("_unknown._tcp.service.consul.", RecordType::SRV, NXDOMAIN),
            ("www.consul.", RecordType::A, NXDOMAIN),
            ("catalog.service.dc1.consul.", RecordType::A, NXDOMAIN),
            ("empty.service.consul.", RecordType::A, NODATA),
            ("v9.catalog.service.consul.", RecordType::A, NODATA),
            ("_catalog._udp.service.consul.", RecordType::SRV, NODATA),
            ("catalog.service.consul.", RecordType::TXT, NODATA),
            ("service.consul.", RecordType::A, NODATA),
            ("consul.", RecordType::A, NODATA),
        ] {
            let answer = responder.ask_for(name, qtype).await;
            assert_eq!(shape(&answer), expected, "{qtype} {name}");
            assert_eq!(soa_owner(&answer).as_deref(), Some("consul."), "{qtype} {name}");
        }
        let apex = responder.ask_for("Consul.", RecordType::SOA).await;
        assert_eq!(apex.answers.iter().map(|r| r.name.to_ascii()).collect::<Vec<_>>(), ["consul."]);
        assert_eq!(soa_owner(&responder.ask_for("unknown.service.ferry.", RecordType::A).await).as_deref(), Some("ferry."));
    }

    #[tokio::test]
    async fn aliases_are_configured() {
        let config = |aliases: &[&str]| ServeConfig {
            aliases: aliases.iter().map(|alias| alias.parse().expect("valid")).collect(),
            ..ServeConfig::default()
        };
        let none = Responder::new(Arc::new(catalog()), &config(&[]), None);
        assert_eq!(none.ask_for("catalog.service.consul.", RecordType::A).await.code, ResponseCode::Refused);
        assert_eq!(none.ask_for("catalog.service.ferry.", RecordType::A).await.answers.len(), 2);

        let nested = Responder::new(Arc::new(catalog()), &config(&["consul", "dc1.consul", "mesh.example", "consul."]), None);
        for name in ["catalog.service.consul.", "catalog.service.dc1.consul.", "_catalog._tcp.service.mesh.example."] {
            assert_eq!(nested.ask_for(name, RecordType::A).await.answers.len(), 2, "{name}");
        }
        let missing = nested.ask_for("unknown.service.dc1.consul.", RecordType::A).await;
        assert_eq!(soa_owner(&missing).as_deref(), Some("dc1.consul."), "a name belongs to the longest alias");
        assert_eq!(nested.ask_for("catalog.service.example.", RecordType::A).await.code, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn other_classes_are_refused() {
        let responder = responder(catalog());
        let mut chaos = Query::query(Name::from_ascii("catalog.service.ferry.").expect("valid"), RecordType::A);
        chaos.set_query_class(DNSClass::CH);
        assert_eq!(responder.respond(&LowerQuery::query(chaos), RequestFlags::default()).await.code, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn addr_names_need_no_directory() {
        let responder = responder(Memory::default());
        let answer = responder.ask_for("0A000001.addr.ferry.", RecordType::A).await;
        assert_eq!(addresses_of(&answer.answers), [ip("10.0.0.1")]);
        assert!(matches!(answer.answers[0].data, RData::A(_)));
    }

    #[tokio::test]
    async fn vip_names_answer_the_virtual_ip_by_its_family() {
        let responder = responder(catalog());
        let answer = responder.ask_for("Catalog.vip.ferry.", RecordType::A).await;
        assert_eq!(addresses_of(&answer.answers), [ip("240.240.0.1")]);
        assert!(answer.authoritative);
        assert_eq!(answer.answers[0].name.to_ascii(), "Catalog.vip.ferry.");
        assert_eq!(shape(&responder.ask_for("catalog.vip.ferry.", RecordType::AAAA).await), NODATA);
        assert_eq!(shape(&responder.ask_for("catalog.vip.ferry.", RecordType::SRV).await), NODATA);
        assert_eq!(addresses_of(&responder.ask_for("v6.vip.ferry.", RecordType::AAAA).await.answers), [ip("fd00::240")]);
        assert_eq!(shape(&responder.ask_for("v6.vip.ferry.", RecordType::A).await), NODATA);
    }

    #[tokio::test]
    async fn vip_names_without_a_virtual_ip() {
        let responder = responder(catalog());
        assert_eq!(shape(&responder.ask_for("novip.vip.ferry.", RecordType::A).await), NODATA, "unassigned");
        assert_eq!(shape(&responder.ask_for("unknown.vip.ferry.", RecordType::A).await), NXDOMAIN, "no such service");
        assert_eq!(responder.ask_for("unsure.vip.ferry.", RecordType::A).await.code, ResponseCode::ServFail, "unknown");
        assert_eq!(shape(&responder.ask_for("v2.catalog.vip.ferry.", RecordType::A).await), NXDOMAIN);
    }

    #[tokio::test]
    async fn without_interception_service_names_keep_their_instances() {
        let responder = responder(catalog());
        let answer = responder.ask_for("catalog.service.ferry.", RecordType::A).await;
        assert_eq!(addresses_of(&answer.answers).len(), 2);
        assert!(!answer.answers.iter().any(|r| addresses_of(std::slice::from_ref(r)) == [ip("240.240.0.1")]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_directory_gets_servfail_after_the_timeout() {
        let hang = Arc::new(Notify::new());
        let directory = Memory { hang: Some(hang), ..catalog() };
        let responder = Responder::with_limits(Arc::new(directory), &ServeConfig::default(), None, 4, Duration::from_secs(2));
        let started = tokio::time::Instant::now();
        let answer = responder.ask_for("catalog.service.ferry.", RecordType::A).await;
        assert_eq!(answer.code, ResponseCode::ServFail);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_beyond_the_limit_get_servfail_at_once() {
        let hang = Arc::new(Notify::new());
        let directory = Memory { hang: Some(hang.clone()), ..catalog() };
        let responder = Responder::with_limits(Arc::new(directory), &ServeConfig::default(), None, 1, Duration::from_secs(60));
        let mut waiting = Box::pin(responder.ask_for("catalog.service.ferry.", RecordType::A));
        assert!(futures::poll!(waiting.as_mut()).is_pending(), "the first lookup waits on the directory");

        let started = tokio::time::Instant::now();
        let second = responder.ask_for("catalog.service.ferry.", RecordType::A).await;
        assert_eq!(second.code, ResponseCode::ServFail);
        assert_eq!(started.elapsed(), Duration::ZERO);

        hang.notify_one();
        assert_eq!(waiting.await.answers.len(), 2);
    }

    #[tokio::test]
    async fn intercepting_mesh_names_answer_the_virtual_ip() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let directory = catalog();
        let lookups = directory.lookups.clone();
        let responder = intercepting(directory, &upstream);
        for name in [
            "catalog.",
            "Catalog.",
            "catalog.service.ferry.",
            "catalog.vip.ferry.",
            "catalog.default.svc.cluster.local.",
            "catalog.svc.cluster.local.",
            "catalog.service.ferry.default.svc.cluster.local.",
            "catalog.vip.ferry.svc.cluster.local.",
        ] {
            let answer = responder.ask_for(name, RecordType::A).await;
            assert_eq!(addresses_of(&answer.answers), [ip("240.240.0.1")], "{name}");
            assert_eq!(answer.answers[0].name.to_ascii(), name, "{name}");
        }
        assert_eq!(upstream.udp_count(), 0, "no mesh name is forwarded");
        assert_eq!(lookups.load(Ordering::SeqCst), 0, "and none costs a subscription");
    }

    #[tokio::test]
    async fn intercepting_other_types_of_mesh_names_are_nodata_at_once() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let responder = intercepting(catalog(), &upstream);
        for (name, qtype, expected) in [
            ("catalog.", RecordType::AAAA, OUTSIDE_NODATA),
            ("catalog.", RecordType::MX, OUTSIDE_NODATA),
            ("catalog.", RecordType::SRV, OUTSIDE_NODATA),
            ("catalog.", RecordType::HTTPS, OUTSIDE_NODATA),
            ("catalog.default.svc.cluster.local.", RecordType::AAAA, OUTSIDE_NODATA),
            ("catalog.service.ferry.", RecordType::AAAA, NODATA),
            ("catalog.service.ferry.", RecordType::TXT, NODATA),
            ("catalog.vip.ferry.", RecordType::AAAA, NODATA),
            ("v6.", RecordType::A, OUTSIDE_NODATA),
            ("v6.service.ferry.", RecordType::A, NODATA),
        ] {
            assert_eq!(shape(&responder.ask_for(name, qtype).await), expected, "{qtype} {name}");
        }
        let v6 = responder.ask_for("v6.", RecordType::AAAA).await;
        assert_eq!(addresses_of(&v6.answers), [ip("fd00::240")]);
        assert_eq!(upstream.udp_count(), 0);
    }

    #[tokio::test]
    async fn intercepting_srv_and_tags_keep_the_instances() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let responder = intercepting(catalog(), &upstream);
        let srv = responder.ask_for("catalog.service.ferry.", RecordType::SRV).await;
        assert_eq!(srv.answers.len(), 2);
        assert!(srv.answers.iter().all(|r| matches!(&r.data, RData::SRV(srv) if srv.port == 80)));
        let v2 = responder.ask_for("v2.catalog.service.ferry.", RecordType::A).await;
        assert_eq!(addresses_of(&v2.answers), [ip("10.0.0.2")]);
        // A service without a virtual IP is answered as without interception.
        let novip = responder.ask_for("novip.service.ferry.", RecordType::A).await;
        assert_eq!(addresses_of(&novip.answers), [ip("10.0.0.9")]);
        assert_eq!(upstream.udp_count(), 0);
    }

    #[tokio::test]
    async fn intercepting_names_under_ferry_are_never_forwarded() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let responder = intercepting(catalog(), &upstream);
        for (name, expected) in [
            ("unknown.service.ferry.", NXDOMAIN),
            ("unknown.vip.ferry.", NXDOMAIN),
            ("www.ferry.", NXDOMAIN),
            ("novip.vip.ferry.", NODATA),
            ("ferry.", NODATA),
        ] {
            assert_eq!(shape(&responder.ask_for(name, RecordType::A).await), expected, "{name}");
        }
        assert_eq!(responder.ask_for("unsure.vip.ferry.", RecordType::A).await.code, ResponseCode::ServFail);
        assert_eq!(upstream.udp_count(), 0);
    }

    #[tokio::test]
    async fn intercepting_consul_names_of_mesh_services_answer_the_virtual_ip() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let directory = catalog();
        let lookups = directory.lookups.clone();
        let responder = intercepting(directory, &upstream);
        for name in [
            "catalog.service.consul.",
            "Catalog.Service.Consul.",
            "_catalog._tcp.service.consul.",
            "catalog.vip.consul.",
            "catalog.service.consul.default.svc.cluster.local.",
        ] {
            let answer = responder.ask_for(name, RecordType::A).await;
            assert_eq!(addresses_of(&answer.answers), [ip("240.240.0.1")], "{name}");
            assert_eq!(answer.answers[0].name.to_ascii(), name, "{name}");
        }
        assert_eq!(lookups.load(Ordering::SeqCst), 0, "the virtual IP costs no subscription");
        let srv = responder.ask_for("_catalog._tcp.service.consul.", RecordType::SRV).await;
        assert_eq!(srv.answers.len(), 2, "SRV keeps the instances");
        let v2 = responder.ask_for("v2.catalog.service.consul.", RecordType::A).await;
        assert_eq!(addresses_of(&v2.answers), [ip("10.0.0.2")], "a tag keeps the instances");
        // A service the table lists without a virtual IP is the mesh's all the same.
        let novip = responder.ask_for("novip.service.consul.", RecordType::A).await;
        assert_eq!(addresses_of(&novip.answers), [ip("10.0.0.9")]);
        assert_eq!(shape(&responder.ask_for("novip.vip.consul.", RecordType::A).await), NODATA);
        assert_eq!(shape(&responder.ask_for("empty.service.consul.", RecordType::A).await), NODATA);
        // The targets of its own SRV answers need no directory.
        let addr = responder.ask_for("0a000001.addr.consul.", RecordType::A).await;
        assert_eq!(addresses_of(&addr.answers), [ip("10.0.0.1")]);
        assert_eq!(upstream.udp_count(), 0, "no mesh name under the alias is forwarded");
    }

    #[tokio::test]
    async fn intercepting_other_consul_names_are_forwarded() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let directory = catalog();
        let lookups = directory.lookups.clone();
        let responder = intercepting(directory, &upstream);
        let mut forwarded = 0;
        for name in [
            "vault.service.consul.",
            "_vault._tcp.service.consul.",
            "primary.vault.service.consul.",
            "vault.vip.consul.",
            "db-1.node.consul.",
            "geo-db.query.consul.",
            "web.connect.consul.",
            "www.consul.",
            "service.consul.",
            "consul.",
            // The directory cannot tell yet (no address table): the app keeps its Consul.
            "unsure.service.consul.",
        ] {
            let answer = responder.ask_for(name, RecordType::A).await;
            forwarded += 1;
            assert_eq!(addresses_of(&answer.answers), [FakeUpstream::ANSWER], "{name}");
            assert_eq!(upstream.udp_count(), forwarded, "{name}");
        }
        let missing = responder.ask_for("missing.service.consul.", RecordType::A).await;
        assert_eq!(missing.code, ResponseCode::NXDomain, "the upstream's NXDOMAIN, relayed");
        let mut chaos = Query::query(Name::from_ascii("catalog.service.consul.").expect("valid"), RecordType::TXT);
        chaos.set_query_class(DNSClass::CH);
        responder.respond(&LowerQuery::query(chaos), RequestFlags::default()).await;
        assert_eq!(upstream.udp_count(), forwarded + 2, "another class is forwarded too");
        assert_eq!(lookups.load(Ordering::SeqCst), 0, "no name outside the mesh cost a subscription");

        // Under `ferry.` the same forms stay the mesh's own.
        for name in ["vault.service.ferry.", "db-1.node.ferry."] {
            assert_eq!(shape(&responder.ask_for(name, RecordType::A).await), NXDOMAIN, "{name}");
        }
        assert_eq!(upstream.udp_count(), forwarded + 2, "nothing under ferry. is forwarded");
    }

    #[tokio::test]
    async fn intercepting_other_names_are_forwarded() {
        let upstream = FakeUpstream::start(Behaviour::Answer).await;
        let directory = catalog();
        let lookups = directory.lookups.clone();
        let responder = intercepting(directory, &upstream);
        let mut forwarded = 0;
        for name in [
            "example.com.",
            "unknown.",
            "novip.",
            "unsure.",
            "unknown.default.svc.cluster.local.",
            "novip.default.svc.cluster.local.",
            "catalog.other.example.",
            "v2.catalog.service.ferry.svc.cluster.local.",
        ] {
            let answer = responder.ask_for(name, RecordType::A).await;
            forwarded += 1;
            assert_eq!(addresses_of(&answer.answers), [FakeUpstream::ANSWER], "{name}");
            assert_eq!(upstream.udp_count(), forwarded, "{name}");
        }
        let missing = responder.ask_for("missing.example.com.", RecordType::A).await;
        assert_eq!(missing.code, ResponseCode::NXDomain);
        assert!(matches!(missing.authorities.as_slice(), [Record { data: RData::SOA(_), .. }]));
        let mut chaos = Query::query(Name::from_ascii("catalog.").expect("valid"), RecordType::TXT);
        chaos.set_query_class(DNSClass::CH);
        responder.respond(&LowerQuery::query(chaos), RequestFlags::default()).await;
        assert_eq!(upstream.udp_count(), forwarded + 2, "another class is forwarded too");
        assert_eq!(lookups.load(Ordering::SeqCst), 0, "no name cost a subscription");
    }
}
