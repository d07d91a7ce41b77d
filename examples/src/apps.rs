//! The demo's three apps. Each knows only its own port and how it reaches the services it
//! calls ([`Calls`]): through its sidecar's outbound address, or by their plain names, as an app
//! that knows nothing of the mesh does when its sidecar intercepts its connections. Either way
//! the mesh finds the instances of the services it calls.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
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

/// The header in which catalog says which version of it answered.
pub const VERSION_HEADER: &str = "x-version";
/// The header that opts a request into the canary; frontend passes it on to catalog.
pub const CANARY_HEADER: &str = "x-canary";
/// The header in which a sidecar says why it answered a request itself.
pub const FERRY_ERROR_HEADER: &str = "x-ferry-error";

/// What one app instance has done.
#[derive(Debug, Default)]
pub struct Counters {
    pub served: AtomicU64,
    pub failed: AtomicU64,
    /// Calls this app made that the mesh answered with an injected fault (`fault_abort`), which
    /// also count as failed.
    pub injected: AtomicU64,
}

impl Counters {
    fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// How an app reaches the services it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// Through the sidecar's outbound listener at this address, naming the service in `Host`
    /// (HTTP) or as the gRPC origin (`:authority`): the sidecar routes by that name.
    Sidecar(SocketAddr),
    /// By the service's plain name, resolved by the system resolver: catalog calls
    /// [`DIRECT_INVENTORY`], frontend [`DIRECT_CATALOG`]. The app knows nothing of the mesh;
    /// an intercepting sidecar answers the name with the service's virtual IP and takes the
    /// connection.
    Direct,
}

/// Where catalog's gRPC channel connects with [`Calls::Direct`].
pub const DIRECT_INVENTORY: &str = "http://inventory:50051";
/// Where frontend sends its requests with [`Calls::Direct`] (port 80).
pub const DIRECT_CATALOG: &str = "http://catalog";

impl Calls {
    /// The URL of `path` on `service`: the sidecar's address, or the service's name.
    fn url(self, service: &str, path: &str) -> String {
        match self {
            Self::Sidecar(outbound) => format!("http://{outbound}{path}"),
            Self::Direct => format!("http://{service}{path}"),
        }
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
    /// Sent in [`VERSION_HEADER`].
    version: HeaderValue,
    counters: Arc<Counters>,
    inventory: InventoryClient<Channel>,
}

/// Serves catalog's HTTP API on `listener`, calling inventory as `calls` says. Every answer says
/// `version` in [`VERSION_HEADER`].
pub async fn catalog(
    listener: TcpListener,
    instance: String,
    version: &str,
    calls: Calls,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let version = HeaderValue::from_str(version).map_err(|_| anyhow::anyhow!("version {version:?} is not a header value"))?;
    let channel = match calls {
        // The sidecar routes by :authority, so the channel connects to the sidecar but names
        // `inventory` as its origin.
        Calls::Sidecar(outbound) => {
            Endpoint::from_shared(format!("http://{outbound}"))?.origin("http://inventory".parse()?).connect_lazy()
        }
        // Resolved at each (re)connect, so a name that does not resolve yet is tried again.
        Calls::Direct => Endpoint::from_static(DIRECT_INVENTORY).connect_lazy(),
    };
    let app = CatalogApp { instance, version, counters, inventory: InventoryClient::new(channel) };
    let router = Router::new().route("/items", get(list_items)).route("/healthz", get(|| async { "ok\n" })).with_state(app);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn list_items(State(app): State<CatalogApp>) -> axum::response::Response {
    let mut response = items(&app).await;
    response.headers_mut().insert(VERSION_HEADER, app.version.clone());
    response
}

async fn items(app: &CatalogApp) -> axum::response::Response {
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
                tracing::warn!(instance = %app.instance, "GET /items failed: {message}");
                return (StatusCode::BAD_GATEWAY, format!("{message}\n")).into_response();
            }
        }
    }
    app.counters.served();
    json_response(&Items { catalog: app.instance.clone(), items })
}

/// Frontend's answer to `GET /`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page {
    pub frontend: String,
    /// The version of catalog that answered, from its [`VERSION_HEADER`].
    pub catalog_version: String,
    pub catalog: Items,
}

#[derive(Clone)]
struct FrontendApp {
    instance: String,
    counters: Arc<Counters>,
    calls: Calls,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

/// Serves the frontend on `listener`, calling catalog as `calls` says.
pub async fn frontend(
    listener: TcpListener,
    instance: String,
    calls: Calls,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let app = FrontendApp { instance, counters, calls, client };
    let router = Router::new().route("/", get(page)).route("/healthz", get(|| async { "ok\n" })).with_state(app);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn page(State(app): State<FrontendApp>, headers: HeaderMap) -> axum::response::Response {
    // Routes match on what the caller's sidecar sees: a header the app does not pass on is a
    // header no route of catalog can match.
    let mut forwarded = HeaderMap::new();
    if let Some(canary) = headers.get(CANARY_HEADER) {
        forwarded.insert(CANARY_HEADER, canary.clone());
    }
    match get_json::<Items>(&app.client, app.calls, "catalog", "/items", forwarded).await {
        Ok(reply) => {
            app.counters.served();
            let catalog_version = reply.headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
            let page = Page { frontend: app.instance.clone(), catalog_version: catalog_version.to_owned(), catalog: reply.body };
            json_response(&page)
        }
        Err(error) => {
            app.counters.failed();
            if error.is_injected() {
                app.counters.injected.fetch_add(1, Ordering::Relaxed);
            }
            // The whole chain: a transport error's own text ("client error (Connect)") says
            // nothing of why.
            let error = ferry_runtime::error_chain(&error);
            tracing::warn!(instance = %app.instance, "GET / failed: catalog: {error}");
            (StatusCode::BAD_GATEWAY, format!("catalog: {error}\n")).into_response()
        }
    }
}

/// A request that failed, with the reason the mesh gave when it made the response itself.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Transport(#[from] hyper_util::client::legacy::Error),
    #[error("{status}: {body}")]
    Status {
        status: StatusCode,
        body: String,
        /// The sidecar's [`FERRY_ERROR_HEADER`], when the mesh answered rather than the app.
        mesh_error: Option<String>,
    },
    #[error("reading the body: {0}")]
    Body(#[from] hyper::Error),
    #[error("decoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl CallError {
    /// Whether the mesh failed the call on purpose: a fault injected by a route.
    pub fn is_injected(&self) -> bool {
        matches!(self, Self::Status { mesh_error: Some(reason), .. } if reason.starts_with("fault_abort"))
    }
}

/// A decoded answer with its headers.
#[derive(Debug)]
pub struct Reply<T> {
    pub body: T,
    pub headers: HeaderMap,
}

/// GETs `path` of `service` with `headers` as `calls` says, naming the service in `Host`.
pub async fn get_json<T: for<'de> Deserialize<'de>>(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    calls: Calls,
    service: &str,
    path: &str,
    headers: HeaderMap,
) -> Result<Reply<T>, CallError> {
    let mut request = http::Request::get(calls.url(service, path))
        .header(http::header::HOST, service)
        .body(Empty::new())
        .map_err(|e| CallError::Status { status: StatusCode::BAD_REQUEST, body: e.to_string(), mesh_error: None })?;
    request.headers_mut().extend(headers);
    let response = client.request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    if !parts.status.is_success() {
        let mesh_error = parts.headers.get(FERRY_ERROR_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = String::from_utf8_lossy(&body).trim().to_owned();
        return Err(CallError::Status { status: parts.status, body, mesh_error });
    }
    Ok(Reply { body: serde_json::from_slice(&body)?, headers: parts.headers })
}

impl IntoResponse for CallError {
    fn into_response(self) -> axum::response::Response {
        (StatusCode::BAD_GATEWAY, format!("{self}\n")).into_response()
    }
}

/// `value` as a JSON answer that ends with a newline, as every text answer of the apps does, so
/// that `curl` leaves the shell's prompt on a line of its own.
fn json_response(value: &impl Serialize) -> axum::response::Response {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the answer as JSON: {error}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GETs `path` at `addr`: its status and body.
    async fn get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let request = http::Request::get(format!("http://{addr}{path}")).body(Empty::new()).expect("a valid request");
        let response = client.request(request).await.expect("an answer");
        let status = response.status();
        let body = response.into_body().collect().await.expect("a body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("bound");
        (listener, addr)
    }

    #[tokio::test]
    async fn every_answer_of_the_apps_ends_with_a_newline() {
        let stop = tokio_util::sync::CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let (inventory_listener, inventory_addr) = listener().await;
        let (catalog_listener, catalog_addr) = listener().await;
        let (frontend_listener, frontend_addr) = listener().await;
        // Each app calls the next one straight, as it would call its sidecar.
        tokio::spawn(inventory(inventory_listener, "inventory-1".into(), counters.clone(), stop.clone().cancelled_owned()));
        let calls = Calls::Sidecar(inventory_addr);
        let catalog_app =
            catalog(catalog_listener, "catalog-1".into(), "v1", calls, counters.clone(), stop.clone().cancelled_owned());
        tokio::spawn(catalog_app);
        let calls = Calls::Sidecar(catalog_addr);
        tokio::spawn(frontend(frontend_listener, "frontend-1".into(), calls, counters.clone(), stop.clone().cancelled_owned()));

        let (status, page) = get(frontend_addr, "/").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page.starts_with('{') && page.ends_with("}\n"), "{page:?}");
        let (status, items) = get(catalog_addr, "/items").await;
        assert_eq!(status, StatusCode::OK, "{items}");
        assert!(items.ends_with("}\n"), "{items:?}");
        for addr in [frontend_addr, catalog_addr] {
            assert_eq!(get(addr, "/healthz").await, (StatusCode::OK, "ok\n".to_owned()));
        }
        // An error answer too: a frontend whose catalog is gone.
        let (gone_listener, gone_addr) = listener().await;
        drop(gone_listener);
        let (lonely_listener, lonely_addr) = listener().await;
        let calls = Calls::Sidecar(gone_addr);
        tokio::spawn(frontend(lonely_listener, "frontend-2".into(), calls, counters, stop.clone().cancelled_owned()));
        let (status, error) = get(lonely_addr, "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{error}");
        assert!(error.starts_with("catalog: ") && error.ends_with('\n') && error.matches('\n').count() == 1, "{error:?}");
        stop.cancel();
    }
}
