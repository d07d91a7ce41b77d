//! The Discovery and Registry gRPC services over an in-memory connection: the Hello handshake,
//! its validation, and the first push.

use std::sync::Arc;

use ferry_control_plane::{
    api::grpc::RegistryService,
    checks::HealthChecks,
    discovery::{DiscoveryService, SessionConfig, Sidecars},
    metrics::Metrics,
    registry::{Registry, RegistryConfig},
    resources::Resources,
    store::MemoryStore,
};
use ferry_health::RunnerOptions;
use ferry_proto::v1::{
    self, control_message, discovery_client::DiscoveryClient, discovery_server::DiscoveryServer, registry_client::RegistryClient,
    registry_server::RegistryServer, sidecar_message,
};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server, Uri};

/// Serves both services on one end of a duplex pipe and returns a channel over the other.
async fn serve() -> (Channel, Arc<Registry>) {
    let metrics = Metrics::unregistered();
    let registry =
        Registry::open(Arc::new(MemoryStore::default()), RegistryConfig::default(), metrics.registry.clone(), Default::default())
            .await
            .expect("opens");
    let shutdown = CancellationToken::new();
    let resources = Resources::open(Arc::new(MemoryStore::default()), Default::default(), std::time::Duration::from_secs(5))
        .await
        .expect("opens");
    let discovery = DiscoveryService::new(
        registry.clone(),
        resources,
        Arc::new(Sidecars::default()),
        SessionConfig::default(),
        metrics.push,
        shutdown.clone(),
    );
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let checks = HealthChecks::new(registry.clone(), RunnerOptions::default(), metrics.health.clone());
    let api = RegistryService::new(registry.clone(), checks, shutdown);
    tokio::spawn(async move {
        Server::builder()
            .add_service(DiscoveryServer::new(discovery))
            .add_service(RegistryServer::new(api))
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
    (channel, registry)
}

fn hello(node_id: &str, service: &str, instance: Option<v1::Instance>) -> v1::SidecarMessage {
    let hello = v1::Hello { node_id: node_id.into(), service: service.into(), instance, ..Default::default() };
    v1::SidecarMessage { message: Some(sidecar_message::Message::Hello(hello)) }
}

fn instance(id: &str, service: &str, port: u32) -> v1::Instance {
    v1::Instance { id: id.into(), service: service.into(), address: "127.0.0.1".into(), port, ..Default::default() }
}

type Opened = (mpsc::Sender<v1::SidecarMessage>, tonic::Streaming<v1::ControlMessage>);

async fn open(channel: &Channel, first: v1::SidecarMessage) -> Result<Opened, tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.expect("queued");
    let inbound = DiscoveryClient::new(channel.clone()).stream(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

#[tokio::test]
async fn hello_registers_the_instance_and_subscriptions_get_pushes() {
    let (channel, registry) = serve().await;
    let (tx, mut inbound) =
        open(&channel, hello("node-1", "catalog", Some(instance("catalog-1", "catalog", 8080)))).await.expect("accepted");

    let welcome = inbound.message().await.expect("ok").expect("a message");
    let Some(control_message::Message::Welcome(welcome)) = welcome.message else { panic!("expected welcome, got {welcome:?}") };
    assert_eq!(welcome.instance.expect("registered").id, "catalog-1");
    assert_eq!(registry.instance("catalog-1").and_then(|i| i.node_id().map(str::to_owned)), Some("node-1".into()));

    let subscribe = v1::Subscribe { services: vec!["catalog".into()] };
    tx.send(v1::SidecarMessage { message: Some(sidecar_message::Message::Subscribe(subscribe)) }).await.expect("sent");
    let push = inbound.message().await.expect("ok").expect("a message");
    let Some(control_message::Message::Push(push)) = push.message else { panic!("expected a push, got {push:?}") };
    assert_eq!(push.resources[0].service, "catalog");
    assert!(push.resources[0].exists);
}

#[tokio::test]
async fn a_bad_hello_is_refused_naming_the_field() {
    let (channel, registry) = serve().await;
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
