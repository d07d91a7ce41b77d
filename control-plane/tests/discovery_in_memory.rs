//! The Discovery, Registry and Identity gRPC services over an in-memory connection, behind the
//! token check: the Hello handshake, its validation, the first push, and what each kind of token
//! may do.

use std::sync::Arc;

use ferry_control_plane::{
    addresses::AddressTable,
    api::{grpc::RegistryService, security::SecurityService},
    auth::{Auth, AuthLayer, Tokens},
    ca::{Authority, CaConfig},
    checks::HealthChecks,
    discovery::{DiscoveryService, SessionConfig, Sidecars},
    metrics::Metrics,
    registry::{Registry, RegistryConfig},
    resources::Resources,
    store::MemoryStore,
};
use ferry_health::RunnerOptions;
use ferry_proto::v1::{
    self, control_message, discovery_client::DiscoveryClient, discovery_server::DiscoveryServer, identity_client::IdentityClient,
    identity_server::IdentityServer, registry_client::RegistryClient, registry_server::RegistryServer, sidecar_message,
};
use ferry_tls::api::{ApiChannel, Bearer};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server, Uri};

/// The server's end: the registry, and the tokens to make callers with.
struct Served {
    channel: Channel,
    registry: Arc<Registry>,
    tokens: Arc<Tokens>,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Served {
    /// The channel with `token`.
    fn with(&self, token: Option<&str>) -> ApiChannel {
        tonic::service::interceptor::InterceptedService::new(self.channel.clone(), Bearer::new(token).expect("token"))
    }

    /// The channel with the admin token.
    fn admin(&self) -> ApiChannel {
        self.with(Some(&self.admin))
    }
}

/// Serves the services on one end of a duplex pipe and returns a channel over the other.
async fn serve() -> Served {
    let metrics = Metrics::unregistered();
    let registry =
        Registry::open(Arc::new(MemoryStore::default()), RegistryConfig::default(), metrics.registry.clone(), Default::default())
            .await
            .expect("opens");
    let shutdown = CancellationToken::new();
    let resources = Resources::open(
        Arc::new(MemoryStore::default()),
        Default::default(),
        std::time::Duration::from_secs(5),
        Default::default(),
    )
    .await
    .expect("opens");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CaConfig {
        trust_domain: "ferry.local".into(),
        cert_ttl: std::time::Duration::from_secs(60),
        operator: None,
        data_dir: dir.path().to_path_buf(),
        key_files: false,
        metrics: Default::default(),
    };
    let authority = Authority::open(ca, Arc::new(MemoryStore::default())).await.expect("CA");
    let tokens = Tokens::open(Arc::new(MemoryStore::default())).await.expect("tokens");
    let (_, admin) = tokens.create(v1::TokenKind::Admin, "", None, "").await.expect("admin token");
    let sidecars = Arc::new(Sidecars::default());
    let addresses = AddressTable::attach(&registry, Default::default());
    let discovery = DiscoveryService::new(
        registry.clone(),
        resources,
        sidecars.clone(),
        authority.clone(),
        tokens.clone(),
        addresses,
        SessionConfig::default(),
        metrics.push,
        shutdown.clone(),
    );
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let checks = HealthChecks::new(registry.clone(), RunnerOptions::default(), metrics.health.clone(), Vec::new());
    let api = RegistryService::new(registry.clone(), checks, shutdown);
    let security = SecurityService { authority, tokens: tokens.clone(), sidecars };
    let auth = Auth { tokens: tokens.clone(), required: true, unauthenticated: Default::default() };
    tokio::spawn(async move {
        Server::builder()
            .layer(AuthLayer::new(auth))
            .add_service(DiscoveryServer::new(discovery))
            .add_service(RegistryServer::new(api))
            .add_service(IdentityServer::new(security))
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_io)))
            .await
    });
    let mut client_io = Some(client_io);
    let channel = Endpoint::try_from("http://in-memory")
        .expect("valid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = client_io.take();
            async move { io.map(TokioIo::new).ok_or_else(|| std::io::Error::other("connected once already")) }
        }))
        .await
        .expect("connects");
    Served { channel, registry, tokens, admin, _dir: dir }
}

fn hello(node_id: &str, service: &str, instance: Option<v1::Instance>) -> v1::SidecarMessage {
    let hello = v1::Hello { node_id: node_id.into(), service: service.into(), instance, ..Default::default() };
    v1::SidecarMessage { message: Some(sidecar_message::Message::Hello(hello)) }
}

fn instance(id: &str, service: &str, port: u32) -> v1::Instance {
    v1::Instance { id: id.into(), service: service.into(), address: "127.0.0.1".into(), port, ..Default::default() }
}

type Opened = (mpsc::Sender<v1::SidecarMessage>, tonic::Streaming<v1::ControlMessage>);

async fn open(channel: &ApiChannel, first: v1::SidecarMessage) -> Result<Opened, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.expect("queued");
    let inbound = DiscoveryClient::new(channel.clone()).stream(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

/// The next push that carries `service`.
async fn push_of(inbound: &mut tonic::Streaming<v1::ControlMessage>, service: &str) -> v1::ServiceResources {
    loop {
        let message = inbound.message().await.expect("ok").expect("a message");
        let Some(control_message::Message::Push(push)) = message.message else { panic!("expected a push, got {message:?}") };
        if let Some(resources) = push.resources.into_iter().find(|r| r.service == service) {
            return resources;
        }
    }
}

#[tokio::test]
async fn hello_registers_the_instance_and_subscriptions_get_pushes() {
    let served = serve().await;
    let (channel, registry) = (served.admin(), served.registry.clone());
    let (tx, mut inbound) =
        open(&channel, hello("node-1", "catalog", Some(instance("catalog-1", "catalog", 8080)))).await.expect("accepted");

    let welcome = inbound.message().await.expect("ok").expect("a message");
    let Some(control_message::Message::Welcome(welcome)) = welcome.message else { panic!("expected welcome, got {welcome:?}") };
    assert_eq!(welcome.instance.expect("registered").id, "catalog-1");
    assert_eq!(registry.instance("catalog-1").and_then(|i| i.node_id().map(str::to_owned)), Some("node-1".into()));

    let subscribe = v1::Subscribe { services: vec!["catalog".into()] };
    tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Subscribe(subscribe)) }).await.expect("sent");
    let resources = push_of(&mut inbound, "catalog").await;
    assert!(resources.exists);
    let endpoint = resources.endpoints.and_then(|e| match e {
        v1::service_resources::Endpoints::Snapshot(s) => s.endpoints.into_iter().next(),
        _ => None,
    });
    assert_eq!(endpoint.map(|e| e.identity), Some(String::new()), "no mTLS in its Hello: reached in plaintext");
}

#[tokio::test]
async fn a_sidecar_that_intercepts_gets_the_address_table_with_its_services_virtual_ips() {
    let served = serve().await;
    let channel = served.admin();
    let first = v1::Hello {
        node_id: "node-1".into(),
        service: "frontend".into(),
        instance: Some(instance("frontend-1", "frontend", 8080)),
        intercept: true,
        ..Default::default()
    };
    let (_tx, mut inbound) =
        open(&channel, v1::SidecarMessage { message: Some(sidecar_message::Message::Hello(first)) }).await.expect("accepted");
    let _welcome = inbound.message().await.expect("ok").expect("a message");
    let message = inbound.message().await.expect("ok").expect("a message");
    let Some(control_message::Message::Push(push)) = message.message else { panic!("expected a push, got {message:?}") };
    let table = push.addresses.expect("the address table in the first push");
    assert!(table.full);
    let own = table.upserted.iter().find(|s| s.service == "frontend").expect("its own service, registered by its Hello");
    assert_eq!(own.endpoints, ["127.0.0.1:8080"]);
    let vip = served.registry.snapshot("frontend").and_then(|s| s.virtual_ip).expect("allocated");
    assert_eq!(own.virtual_ip, vip.to_string());
}

#[tokio::test]
async fn each_kind_of_token_does_what_it_may_and_nothing_else() {
    let served = serve().await;
    let (_, sidecar) = served.tokens.create(v1::TokenKind::Sidecar, "catalog", None, "").await.expect("token");
    let (_, read) = served.tokens.create(v1::TokenKind::Read, "", None, "").await.expect("token");
    let code = |result: Result<(), tonic::Status>| result.map_err(|s| s.code()).err();

    // No token, or an unknown one: nothing at all.
    for token in [None, Some("ferry_unknown")] {
        let mut registry = RegistryClient::new(served.with(token));
        assert_eq!(
            code(registry.list_services(v1::ListServicesRequest {}).await.map(|_| ())),
            Some(tonic::Code::Unauthenticated)
        );
    }
    // A sidecar token for catalog: catalog's stream, instances and certificate, nothing else.
    let as_sidecar = served.with(Some(&sidecar));
    let mut with_mtls = hello("node-1", "catalog", Some(instance("catalog-1", "catalog", 8080)));
    if let Some(sidecar_message::Message::Hello(hello)) = &mut with_mtls.message {
        hello.mtls = true;
    }
    let (tx, mut inbound) = open(&as_sidecar, with_mtls).await.expect("its own service");
    inbound.message().await.expect("ok").expect("welcome");
    let theirs = open(&as_sidecar, hello("node-2", "payments", Some(instance("payments-1", "payments", 8081)))).await;
    let status = theirs.map(|_| ()).expect_err("another service");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("\"payments\""), "{}", status.message());
    assert!(served.registry.instance("payments-1").is_none(), "nothing was registered");

    let mut registry = RegistryClient::new(as_sidecar.clone());
    let register = |service: &str| v1::RegisterRequest { instance: Some(instance(&format!("{service}-api"), service, 9000)) };
    assert_eq!(code(registry.register(register("catalog")).await.map(|_| ())), None);
    assert_eq!(code(registry.register(register("payments")).await.map(|_| ())), Some(tonic::Code::PermissionDenied));
    assert_eq!(code(registry.list_services(v1::ListServicesRequest {}).await.map(|_| ())), Some(tonic::Code::PermissionDenied));
    // Its stream's instance is the stream's: not even its own token deletes it through the API.
    let deregister = registry.deregister(v1::DeregisterRequest { id: "catalog-1".into(), force: true }).await;
    assert_eq!(code(deregister.map(|_| ())), Some(tonic::Code::PermissionDenied));
    // An admin is told whose it is, and removes it only with force.
    let mut as_admin = RegistryClient::new(served.admin());
    let refused =
        as_admin.deregister(v1::DeregisterRequest { id: "catalog-1".into(), force: false }).await.expect_err("the sidecar's");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(r#"belongs to sidecar "node-1""#) && refused.message().contains("--force"),
        "{}",
        refused.message()
    );
    assert!(served.registry.instance("catalog-1").is_some(), "still registered");

    let csr = ferry_tls::csr::request("catalog").expect("csr");
    let mut identity = IdentityClient::new(as_sidecar);
    let certify =
        |service: &str| v1::CertifyRequest { service: service.into(), csr_pem: csr.csr_pem.clone(), node_id: "node-1".into() };
    let issued = identity.certify(certify("catalog")).await.expect("its own identity").into_inner();
    assert_eq!(issued.identity, "spiffe://ferry.local/service/catalog");
    assert_eq!(code(identity.certify(certify("payments")).await.map(|_| ())), Some(tonic::Code::PermissionDenied));
    let subscribe = v1::Subscribe { services: vec!["catalog".into()] };
    tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Subscribe(subscribe)) }).await.expect("sent");
    let catalog = push_of(&mut inbound, "catalog").await;
    let identities: Vec<String> = match catalog.endpoints {
        Some(v1::service_resources::Endpoints::Snapshot(s)) => s.endpoints.into_iter().map(|e| e.identity).collect(),
        other => panic!("a snapshot, got {other:?}"),
    };
    assert!(identities.contains(&"spiffe://ferry.local/service/catalog".to_owned()), "{identities:?}");

    // A read token reads, and changes nothing.
    let mut registry = RegistryClient::new(served.with(Some(&read)));
    assert_eq!(code(registry.list_services(v1::ListServicesRequest {}).await.map(|_| ())), None);
    assert_eq!(code(registry.register(register("catalog")).await.map(|_| ())), Some(tonic::Code::PermissionDenied));
    let instances = registry
        .list_instances(v1::ListInstancesRequest { service: "catalog".into(), ..Default::default() })
        .await
        .expect("lists")
        .into_inner();
    let meshed = instances.instances.iter().find(|i| i.id == "catalog-1").expect("the sidecar's instance");
    assert_eq!(meshed.identity, "spiffe://ferry.local/service/catalog", "its Hello said mTLS");
}

#[tokio::test]
async fn a_bad_hello_is_refused_naming_the_field() {
    let served = serve().await;
    let (channel, registry) = (served.admin(), served.registry.clone());
    let cases = [
        (hello("", "catalog", None), "hello.node_id: "),
        (hello("node-1", "Catalog", None), "hello.service: "),
        (hello("node-1", "catalog", Some(instance("c-1", "catalog", 0))), "hello.instance.port: "),
        (hello("node-1", "catalog", Some(instance("c-1", "inventory", 80))), "hello.instance.service: "),
        (v1::SidecarMessage { message: Some(sidecar_message::Message::Ack(v1::Ack { nonce: "1".into() })) }, "hello: "),
    ];
    for (message, prefix) in cases {
        let status = open(&channel, message).await.map(|_| ()).expect_err(prefix);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{prefix}: {status:?}");
        assert!(status.message().starts_with(prefix), "{prefix}: {}", status.message());
    }

    // An id the API registered cannot be taken by a sidecar.
    let mut api = RegistryClient::new(channel.clone());
    api.register(v1::RegisterRequest { instance: Some(instance("db-1", "db", 5432)) }).await.expect("registers");
    let status = open(&channel, hello("node-2", "db", Some(instance("db-1", "db", 5432)))).await.map(|_| ()).expect_err("taken");
    assert!(status.message().starts_with("hello.instance.id: "), "{}", status.message());
    assert_eq!(registry.instance("db-1").and_then(|i| i.node_id().map(str::to_owned)), None, "the API's instance is untouched");
}
