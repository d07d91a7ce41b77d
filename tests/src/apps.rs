//! Apps that stand behind sidecars in the tests: an HTTP app that says who it is and what it
//! saw, a gRPC app serving `grpc.health.v1`, and a TCP echo app.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::server::HealthReporter;

/// An HTTP/1.1 and h2c app answering every request with its name, except `/healthz`, which
/// answers the status set with [`HttpApp::set_health`] (200 at first).
pub struct HttpApp {
    pub addr: SocketAddr,
    pub name: String,
    hits: Arc<AtomicU64>,
    health: Arc<std::sync::atomic::AtomicU16>,
    task: JoinHandle<()>,
    stopped: tokio_util::sync::CancellationToken,
}

impl HttpApp {
    /// Starts an app called `name` on a free loopback port.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (app_name, app_hits, app_health) = (name.to_owned(), hits.clone(), health.clone());
        let stopped = tokio_util::sync::CancellationToken::new();
        let connections_stop = stopped.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (name, hits, health) = (app_name.clone(), app_hits.clone(), app_health.clone());
                let stopped = connections_stop.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        if request.uri().path() == "/healthz" {
                            let mut response = Response::new(Full::new(Bytes::from_static(b"health")));
                            *response.status_mut() =
                                http::StatusCode::from_u16(health.load(Ordering::Relaxed)).unwrap_or_default();
                            return std::future::ready(Ok::<_, Infallible>(response));
                        }
                        hits.fetch_add(1, Ordering::Relaxed);
                        let host = request
                            .headers()
                            .get(http::header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_owned)
                            .or_else(|| request.uri().authority().map(|a| a.to_string()))
                            .unwrap_or_default();
                        let response = Response::builder()
                            .header("x-served-by", name.as_str())
                            .header("x-seen-version", format!("{:?}", request.version()))
                            .header("x-seen-host", host)
                            .header("x-seen-path", request.uri().path_and_query().map_or("/", |p| p.as_str()))
                            .body(Full::new(Bytes::from(name.clone())))
                            .expect("valid response");
                        std::future::ready(Ok::<_, Infallible>(response))
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    // A stopped app closes its open connections too, as a dead process would.
                    tokio::select! {
                        _ = connection => {}
                        () = stopped.cancelled() => {}
                    }
                });
            }
        });
        Self { addr, name: name.to_owned(), hits, health, task, stopped }
    }

    /// Makes `/healthz` answer `status`.
    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::Relaxed);
    }

    /// How many requests it has served.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops as a dead process would: the port is closed and so is every open connection.
    pub fn stop(&self) {
        self.task.abort();
        self.stopped.cancel();
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A gRPC app serving the standard health service.
pub struct GrpcApp {
    pub addr: SocketAddr,
    pub reporter: HealthReporter,
    task: JoinHandle<()>,
}

impl GrpcApp {
    /// Starts the app with the service `ferry.test.Echo` reported as serving.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("ferry.test.Echo", tonic_health::ServingStatus::Serving).await;
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self { addr, reporter, task }
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC app whose `grpc.health.v1.Health/Check` fails with UNAVAILABLE as many times as
/// [`FlakyGrpcApp::fail_next`] says, then answers SERVING; it counts the calls it gets.
pub struct FlakyGrpcApp {
    pub addr: SocketAddr,
    state: Arc<FlakyState>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct FlakyState {
    calls: AtomicU64,
    failures: AtomicU64,
}

#[derive(Clone)]
struct FlakyHealth(Arc<FlakyState>);

#[tonic::async_trait]
impl tonic_health::pb::health_server::Health for FlakyHealth {
    type WatchStream = futures::stream::Empty<Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>;

    async fn check(
        &self,
        _request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        self.0.calls.fetch_add(1, Ordering::Relaxed);
        let failing = self.0.failures.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if failing {
            return Err(tonic::Status::unavailable("failing on purpose"));
        }
        Ok(tonic::Response::new(tonic_health::pb::HealthCheckResponse { status: 1 }))
    }

    async fn watch(
        &self,
        _request: tonic::Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this app"))
    }
}

impl FlakyGrpcApp {
    /// Starts the app on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(FlakyState::default());
        let service = tonic_health::pb::health_server::HealthServer::new(FlakyHealth(state.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self { addr, state, task }
    }

    /// Makes the next `count` calls fail with UNAVAILABLE.
    pub fn fail_next(&self, count: u64) {
        self.state.failures.store(count, Ordering::Relaxed);
    }

    /// How many calls it has had.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::Relaxed)
    }
}

impl Drop for FlakyGrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves HTTP/1.1 and h2c on `listener`, answering each request with `answer`, until the task
/// is aborted.
fn serve<F, Fut>(listener: TcpListener, answer: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(request).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

/// A plain answer from an app called `name`, with `x-served-by` and `x-seen-path`.
fn answer_from(name: &str, status: http::StatusCode, path: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-served-by", name)
        .header("x-seen-path", path)
        .body(Full::new(Bytes::from(name.to_owned())))
        .expect("valid response")
}

/// An HTTP app that answers every request (but `/healthz`, at once) only after a fixed delay:
/// the upstream a timeout gives up on.
pub struct SlowApp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl SlowApp {
    /// Starts an app called `name` that takes `delay` to answer.
    pub async fn start(name: &str, delay: std::time::Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let name: Arc<str> = name.into();
        let task = serve(listener, move |request: Request<Incoming>| {
            let name = name.clone();
            async move {
                let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
                if path != "/healthz" {
                    tokio::time::sleep(delay).await;
                }
                answer_from(&name, http::StatusCode::OK, &path)
            }
        });
        Self { addr, task }
    }
}

impl Drop for SlowApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request as an app received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    /// The path and query.
    pub path: String,
    pub headers: http::HeaderMap,
}

/// An HTTP app that records every request it receives (but `/healthz`) and answers with its
/// name in `x-served-by` and the path in `x-seen-path`; it can be told to fail the next few
/// requests with 503.
pub struct RecordingApp {
    pub addr: SocketAddr,
    pub name: String,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    failures: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RecordingApp {
    /// Starts an app called `name` on a free loopback port.
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let failures = Arc::new(AtomicU64::new(0));
        let (app_name, app_seen, app_failures): (Arc<str>, _, _) = (name.into(), seen.clone(), failures.clone());
        let task = serve(listener, move |request: Request<Incoming>| {
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let status = if path == "/healthz" {
                http::StatusCode::OK
            } else {
                let seen = Seen { method: request.method().clone(), path: path.clone(), headers: request.headers().clone() };
                app_seen.lock().unwrap_or_else(|p| p.into_inner()).push(seen);
                let failing = app_failures.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
                if failing { http::StatusCode::SERVICE_UNAVAILABLE } else { http::StatusCode::OK }
            };
            std::future::ready(answer_from(&app_name, status, &path))
        });
        Self { addr, name: name.to_owned(), seen, failures, task }
    }

    /// Every request received so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many requests it has received.
    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Makes the next `count` requests fail with 503.
    pub fn fail_next(&self, count: u64) {
        self.failures.store(count, Ordering::Relaxed);
    }
}

impl Drop for RecordingApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP app that echoes every byte back on each connection until the client closes, and counts
/// the connections it accepted and those still open.
pub struct TcpEchoApp {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TcpEchoApp {
    /// Starts the app on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, open) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (app_accepted, app_open) = (accepted.clone(), open.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                app_accepted.fetch_add(1, Ordering::Relaxed);
                app_open.fetch_add(1, Ordering::Relaxed);
                let open = app_open.clone();
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Self { addr, accepted, open, task }
    }

    /// How many connections it has accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// How many connections are open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for TcpEchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP app that holds every request (but `/healthz`) until [`HoldingApp::release`]: the
/// slow upstream of circuit-breaker and timeout tests, without a fixed delay. On `/stream` it
/// answers at once with headers and a first chunk (`first,`), and holds only the rest of the
/// body (`last`).
pub struct HoldingApp {
    pub addr: SocketAddr,
    arrived: Arc<AtomicU64>,
    released: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

type HeldBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl HoldingApp {
    /// Starts the app on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let arrived = Arc::new(AtomicU64::new(0));
        let released = tokio::sync::watch::Sender::new(false);
        let (app_arrived, app_released) = (arrived.clone(), released.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (arrived, released) = (app_arrived.clone(), app_released.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (arrived, mut released) = (arrived.clone(), released.subscribe());
                        async move { Ok::<_, Infallible>(HoldingApp::answer(request, &arrived, &mut released).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Self { addr, arrived, released, task }
    }

    async fn answer(
        request: Request<Incoming>,
        arrived: &AtomicU64,
        released: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Response<HeldBody> {
        use http_body_util::BodyExt;
        let path = request.uri().path().to_owned();
        if path == "/healthz" {
            return Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
        }
        arrived.fetch_add(1, Ordering::SeqCst);
        if path == "/stream" {
            let mut released = released.clone();
            let rest = async move {
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"last")))
            };
            let first =
                futures::stream::once(async { Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"first,"))) });
            let body = http_body_util::StreamBody::new(futures::StreamExt::chain(first, futures::stream::once(rest)));
            return Response::new(BodyExt::boxed(body));
        }
        let _ = released.wait_for(|r| *r).await;
        Response::new(Full::new(Bytes::from_static(b"released")).boxed())
    }

    /// How many requests have arrived (held or not).
    pub fn arrived(&self) -> u64 {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Lets every held request, and every later one, go.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
}

impl Drop for HoldingApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
