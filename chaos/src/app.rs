//! The app behind each sidecar of the chaos mesh, run as its own process inside its host's
//! namespace (so that `kill -9` kills it for real): HTTP/1.1 and h2c on one port, gRPC health
//! on the same port, and, when it has a next service, every request passed on to that service
//! through its own sidecar, as the demo's frontend calls catalog and catalog calls inventory.
//!
//! Every request it serves (but `/healthz`) is appended to its log file as `MILLIS METHOD ID`
//! before it is passed on, so the suite can count each POST id every instance of a service saw
//! (a duplicate is a POST the mesh sent twice) and when an instance last saw traffic. The file
//! is written by a thread of its own, one `write` per line: a `kill -9` loses no line already
//! handed to the kernel.

use std::{
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, mpsc},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tower::Service as _;

use crate::{ID_HEADER, now_ms};

/// The header an app puts the mesh's error reason of the call it relayed in: an app never sets
/// `x-ferry-error` itself, as Ferry's resilience rules say.
pub const RELAYED_ERROR: &str = "x-ferry-upstream-error";

/// How long an app waits for the next service before it answers 504 itself.
const NEXT_TIMEOUT: Duration = Duration::from_secs(4);

/// What the `app` subcommand was given.
#[derive(Debug, clap::Args)]
pub struct AppArgs {
    /// Where to listen (inside the host's namespace).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The instance's name, in `x-served-by`.
    #[arg(long)]
    pub name: String,
    /// The service each request is passed on to, through `--proxy`.
    #[arg(long)]
    pub next: Option<String>,
    /// The local sidecar's outbound listener.
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub proxy: SocketAddr,
    /// The file every request served is appended to.
    #[arg(long)]
    pub log: PathBuf,
}

struct App {
    name: String,
    next: Option<String>,
    proxy: SocketAddr,
    lines: mpsc::Sender<String>,
}

/// Runs the app until it is killed.
pub async fn run(args: AppArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&args.log)?;
    let (lines, received) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in received {
            // One write per line, so that a kill loses nothing already written.
            let _ = file.write_all(line.as_bytes());
        }
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let grpc = tonic::service::Routes::new(health).prepare();
    let app = Arc::new(App { name: args.name, next: args.next, proxy: args.proxy, lines });
    eprintln!("ferry-chaos app listening addr={}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let (app, grpc) = (app.clone(), grpc.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (app, mut grpc) = (app.clone(), grpc.clone());
                async move {
                    let is_grpc = request
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    if is_grpc {
                        let response = grpc.call(request.map(tonic::body::Body::new)).await.unwrap_or_else(|e| match e {});
                        return Ok::<_, Infallible>(response);
                    }
                    Ok(app.answer(request).await.map(tonic::body::Body::new))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

impl App {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        if path == "/healthz" {
            return self.reply(StatusCode::OK, None, "ok");
        }
        let id = request.headers().get(ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        let _ = self.lines.send(format!("{} {} {id}\n", now_ms(), request.method()));
        let Some(next) = &self.next else {
            return self.reply(StatusCode::OK, None, &self.name);
        };
        let call = Request::builder()
            .method(request.method().clone())
            .uri(format!("http://{next}{path}"))
            .header(http::header::HOST, next.as_str())
            .header(ID_HEADER, id.as_str())
            .body(Empty::<Bytes>::new());
        let call = match call {
            Ok(call) => call,
            Err(error) => return self.reply(StatusCode::BAD_REQUEST, Some(format!("bad_request: {error}")), ""),
        };
        match tokio::time::timeout(NEXT_TIMEOUT, ferry_tests::client::send_h1(self.proxy, call)).await {
            Ok(Ok((status, headers, _))) => {
                let reason = ["x-ferry-error", RELAYED_ERROR]
                    .iter()
                    .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
                    .map(str::to_owned);
                self.reply(status, reason, &self.name)
            }
            Ok(Err(error)) => self.reply(StatusCode::BAD_GATEWAY, Some(format!("app_call_failed: {error}")), ""),
            Err(_) => {
                self.reply(StatusCode::GATEWAY_TIMEOUT, Some(format!("app_call_timeout: {next} after {NEXT_TIMEOUT:?}")), "")
            }
        }
    }

    fn reply(&self, status: StatusCode, reason: Option<String>, body: &str) -> Response<Full<Bytes>> {
        let mut response = Response::builder().status(status).header("x-served-by", self.name.as_str());
        if let Some(reason) = reason.and_then(|r| http::HeaderValue::from_str(&r).ok()) {
            response = response.header(RELAYED_ERROR, reason);
        }
        response.body(Full::new(Bytes::from(body.to_owned()))).expect("a response of valid parts")
    }
}
