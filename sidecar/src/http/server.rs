//! Serves a listener: HTTP/1.1 and HTTP/2 (h2c prior knowledge included) on every connection,
//! chosen by what the client speaks.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};

use super::Body;
use crate::workers::Workers;

/// The address of the client a request came from, in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection builder of every listener: HTTP/1.1 and HTTP/2 by what the client speaks,
/// with a bound on slow headers and keepalives that notice a vanished peer.
pub fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// Accepts connections on `listener` and serves each with `service`, on the next of `workers`,
/// until `shutdown` fires; then stops accepting and gives open connections up to `drain` to
/// finish. `open` counts the connections being served.
pub async fn serve<S>(
    name: &'static str,
    listener: TcpListener,
    service: S,
    shutdown: CancellationToken,
    drain: Duration,
    open: Gauge,
    workers: Workers,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let builder = builder();
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let service = service.clone().map_request(move |mut request: Request<Incoming>| {
                        request.extensions_mut().insert(ClientAddr(peer));
                        request
                    });
                    let (stream, worker) = match workers.adopt(stream) {
                        Ok(adopted) => adopted,
                        Err(error) => {
                            tracing::warn!(listener = name, %error, "cannot hand the connection to a worker");
                            continue;
                        }
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
                        .into_owned();
                    let connection = graceful.watch(connection);
                    let open = open.clone();
                    open.inc();
                    worker.spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(listener = name, %error, "connection ended with an error");
                        }
                        open.dec();
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::debug!(listener = name, "connections still open after the drain period");
    }
}
