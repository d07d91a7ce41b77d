//! The demo's three apps. Each knows only its own port and its sidecar's outbound address; the
//! mesh finds the instances of the services it calls.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint};

use crate::proto::{
    GetStockRequest, Stock,
    inventory_client::InventoryClient,
    inventory_server::{Inventory, InventoryServer},
};

/// What one app instance has done.
#[derive(Debug, Default)]
pub struct Counters {
    pub served: AtomicU64,
    pub failed: AtomicU64,
}

impl Counters {
    fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The items the catalog sells.
pub const SKUS: [&str; 3] = ["ferry-ticket", "life-jacket", "deck-chair"];

struct InventoryApp {
    instance: String,
    counters: Arc<Counters>,
}

#[tonic::async_trait]
impl Inventory for InventoryApp {
    async fn get_stock(&self, request: tonic::Request<GetStockRequest>) -> Result<tonic::Response<Stock>, tonic::Status> {
        let sku = request.into_inner().sku;
        if sku.is_empty() {
            self.counters.failed();
            return Err(tonic::Status::invalid_argument("sku: must not be empty"));
        }
        self.counters.served();
        let quantity = sku.bytes().map(u32::from).sum::<u32>() % 50;
        Ok(tonic::Response::new(Stock { sku, quantity, instance: self.instance.clone() }))
    }
}

/// Serves the inventory gRPC service on `listener` until `shutdown` resolves.
pub async fn inventory(
    listener: TcpListener,
    instance: String,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // The standard health service, which the sidecar's `--check grpc` asks.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<InventoryServer<InventoryApp>>().await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(InventoryServer::new(InventoryApp { instance, counters }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// One item as catalog lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: u32,
    /// The inventory instance that counted it.
    pub inventory: String,
}

/// Catalog's answer to `GET /items`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Items {
    pub catalog: String,
    pub items: Vec<Item>,
}

#[derive(Clone)]
struct CatalogApp {
    instance: String,
    counters: Arc<Counters>,
    inventory: InventoryClient<Channel>,
}

/// Serves catalog's HTTP API on `listener`, calling inventory through the sidecar at `outbound`.
pub async fn catalog(
    listener: TcpListener,
    instance: String,
    outbound: SocketAddr,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The sidecar routes by :authority, so the channel connects to the sidecar but names
    // `inventory` as its origin.
    let channel = Endpoint::from_shared(format!("http://{outbound}"))?.origin("http://inventory".parse()?).connect_lazy();
    let app = CatalogApp { instance, counters, inventory: InventoryClient::new(channel) };
    let router = Router::new().route("/items", get(list_items)).route("/healthz", get(|| async { "ok" })).with_state(app);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn list_items(State(app): State<CatalogApp>) -> axum::response::Response {
    let mut items = Vec::with_capacity(SKUS.len());
    for sku in SKUS {
        match app.inventory.clone().get_stock(GetStockRequest { sku: sku.to_owned() }).await {
            Ok(stock) => {
                let stock = stock.into_inner();
                items.push(Item { sku: stock.sku, quantity: stock.quantity, inventory: stock.instance });
            }
            Err(status) => {
                app.counters.failed();
                let message = format!("inventory: {}: {}", status.code(), status.message());
                return (StatusCode::BAD_GATEWAY, message).into_response();
            }
        }
    }
    app.counters.served();
    Json(Items { catalog: app.instance.clone(), items }).into_response()
}

/// Frontend's answer to `GET /`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page {
    pub frontend: String,
    pub catalog: Items,
}

#[derive(Clone)]
struct FrontendApp {
    instance: String,
    counters: Arc<Counters>,
    outbound: SocketAddr,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

/// Serves the frontend on `listener`, calling catalog through the sidecar at `outbound`.
pub async fn frontend(
    listener: TcpListener,
    instance: String,
    outbound: SocketAddr,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let app = FrontendApp { instance, counters, outbound, client };
    let router = Router::new().route("/", get(page)).route("/healthz", get(|| async { "ok" })).with_state(app);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn page(State(app): State<FrontendApp>) -> axum::response::Response {
    match get_json::<Items>(&app.client, app.outbound, "catalog", "/items").await {
        Ok(items) => {
            app.counters.served();
            Json(Page { frontend: app.instance.clone(), catalog: items }).into_response()
        }
        Err(error) => {
            app.counters.failed();
            (StatusCode::BAD_GATEWAY, format!("catalog: {error}")).into_response()
        }
    }
}

/// A request that failed, with the reason the mesh gave when it made the response itself.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Transport(#[from] hyper_util::client::legacy::Error),
    #[error("{status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("reading the body: {0}")]
    Body(#[from] hyper::Error),
    #[error("decoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// GETs `path` of `service` through the sidecar at `outbound`, naming the service in `Host`.
pub async fn get_json<T: for<'de> Deserialize<'de>>(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    outbound: SocketAddr,
    service: &str,
    path: &str,
) -> Result<T, CallError> {
    let request = http::Request::get(format!("http://{outbound}{path}"))
        .header(http::header::HOST, service)
        .body(Empty::new())
        .map_err(|e| CallError::Status { status: StatusCode::BAD_REQUEST, body: e.to_string() })?;
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(CallError::Status { status, body: String::from_utf8_lossy(&body).trim().to_owned() });
    }
    Ok(serde_json::from_slice(&body)?)
}

impl IntoResponse for CallError {
    fn into_response(self) -> axum::response::Response {
        (StatusCode::BAD_GATEWAY, self.to_string()).into_response()
    }
}
