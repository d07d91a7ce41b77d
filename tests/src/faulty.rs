//! An HTTP app whose answer can be changed while a test runs: the upstream that starts or stops
//! failing, for outlier detection.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinHandle};

/// An HTTP/1.1 and h2c app answering every request (but `/healthz`, always 200) with the status
/// set by [`FaultyApp::set_status`], its name in `x-served-by` and as the body; it counts the
/// requests it answers.
pub struct FaultyApp {
    pub addr: SocketAddr,
    pub name: String,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultyApp {
    /// Starts an app called `name` answering `status`, on a free loopback port.
    pub async fn start(name: &str, status: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicU64::new(0));
        let (app_name, app_status, app_hits): (Arc<str>, _, _) = (name.into(), status.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (name, status, hits) = (app_name.clone(), app_status.clone(), app_hits.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let code = if request.uri().path() == "/healthz" {
                            StatusCode::OK
                        } else {
                            hits.fetch_add(1, Ordering::Relaxed);
                            StatusCode::from_u16(status.load(Ordering::Relaxed)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                        };
                        let response = Response::builder()
                            .status(code)
                            .header("x-served-by", &*name)
                            .body(Full::new(Bytes::from(name.to_string())))
                            .expect("valid response");
                        std::future::ready(Ok::<_, Infallible>(response))
                    });
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Self { addr, name: name.to_owned(), status, hits, task }
    }

    /// Makes every request from now on answer `status`.
    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }

    /// How many requests it has answered (`/healthz` aside).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for FaultyApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
