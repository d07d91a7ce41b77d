//! A small app for the interception tests, run as its own process inside a network namespace:
//! it knows nothing of Ferry.
//!
//! ```text
//! ferry-test-app http ADDR NAME      HTTP/1.1 and h2c on ADDR: every path answers NAME (in the
//!                                    body and `x-instance`); /flaky answers 503 on every other
//!                                    request; gRPC health answers SERVING on the same port
//! ferry-test-app banner ADDR TEXT    TCP on ADDR: says TEXT first, then echoes what it reads
//! ferry-test-app grpc-health URL     calls grpc.health.v1.Health/Check at URL, prints the status
//! ferry-test-app banner-read ADDR    connects to ADDR (HOST:PORT, resolved by the system) and
//!                                    prints the first line the server says
//! ```

#![forbid(unsafe_code)]

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["http", addr, name] => http(addr, name).await,
        ["banner", addr, text] => banner(addr, text).await,
        ["grpc-health", url] => grpc_health(url).await,
        ["banner-read", addr] => banner_read(addr).await,
        _ => Err("usage: ferry-test-app http ADDR NAME | banner ADDR TEXT | grpc-health URL | banner-read ADDR".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ferry-test-app: {error}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn http(addr: &str, name: &str) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("ferry-test-app listening addr={}", listener.local_addr()?);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let name: Arc<str> = name.into();
    let count = Arc::new(AtomicU64::new(0));
    let grpc = tonic::service::Routes::new(health).prepare();
    loop {
        let (stream, _) = listener.accept().await?;
        let (name, count, grpc) = (name.clone(), count.clone(), grpc.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let (name, count, mut grpc) = (name.clone(), count.clone(), grpc.clone());
                async move {
                    use tower::Service;
                    if request
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
                    {
                        let response = grpc.call(request.map(tonic::body::Body::new)).await.unwrap_or_else(|e| match e {});
                        return Ok::<_, std::convert::Infallible>(response);
                    }
                    let flaky = request.uri().path() == "/flaky" && count.fetch_add(1, Ordering::SeqCst) % 2 == 0;
                    let status = if flaky { 503 } else { 200 };
                    let body = tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(format!("{name}\n"))));
                    let response = http::Response::builder()
                        .status(status)
                        .header("x-instance", &*name)
                        .body(body)
                        .expect("a valid response");
                    Ok(response)
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
        });
    }
}

async fn banner(addr: &str, text: &str) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("ferry-test-app listening addr={}", listener.local_addr()?);
    let text = format!("{text}\n");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let text = text.clone();
        tokio::spawn(async move {
            if stream.write_all(text.as_bytes()).await.is_ok() {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            }
        });
    }
}

async fn grpc_health(url: &str) -> Result<(), Error> {
    let channel =
        tonic::transport::Endpoint::from_shared(url.to_owned())?.connect_timeout(Duration::from_secs(5)).connect().await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;
    println!("{:?}", response.into_inner().status());
    Ok(())
}

async fn banner_read(addr: &str) -> Result<(), Error> {
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await??;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(15), BufReader::new(stream).read_line(&mut line)).await??;
    print!("{line}");
    Ok(())
}
