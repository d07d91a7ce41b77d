//! The inbound path, assembled, outermost first:
//!
//! ```text
//! Inbound (edge)   counts the request; the in-flight count a drain waits on
//! └ authorize      the authorization policy in force, for the caller its certificate proves
//!   └ identity     x-ferry-peer-identity, set from the certificate and nothing else
//!     └ app        the app's pooled client; its failures named, its own x-ferry-error renamed
//! ```
//!
//! Every layer is always ready: the app's client connects on demand.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use futures::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use pin_project::pin_project;
use tower::{Layer, Service, ServiceBuilder};

use super::{PEER_IDENTITY, Peer, UPSTREAM_ERROR, authorize};
use crate::{
    errors::{AppFailed, AppUnreachable, FERRY_ERROR, Forbidden},
    http::{
        Body, BoxError,
        client::{Client, ConnectError},
    },
    mesh::Mesh,
    metrics::Metrics,
};
use ferry_proto::{authz::Request as AuthzRequest, matching::RequestInfo};

/// The inbound stack of one app.
pub type InboundStack = Authorize<PeerIdentity<App>>;

/// The inbound stack: authorization, then the caller's identity header, then the app.
pub fn inbound(app: Client, service: Arc<str>, mesh: Mesh, metrics: Metrics) -> InboundStack {
    ServiceBuilder::new().layer(AuthorizeLayer { service, mesh, metrics }).layer(PeerIdentityLayer).service(App { client: app })
}

/// Wraps a service in [`Authorize`].
#[derive(Clone)]
pub struct AuthorizeLayer {
    service: Arc<str>,
    mesh: Mesh,
    metrics: Metrics,
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner, layer: self.clone() }
    }
}

/// Lets through what the authorization policy in force allows the caller; refuses the rest
/// with [`Forbidden`].
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    layer: AuthorizeLayer,
}

impl<S> Service<Request<Body>> for Authorize<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures::future::Either<S::Future, futures::future::Ready<Result<Response<Body>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let AuthorizeLayer { service, mesh, metrics } = &self.layer;
        let peer = request.extensions().get::<Peer>().cloned().unwrap_or_default();
        let info = RequestInfo::of(request.method(), request.uri(), request.headers());
        let decision = authorize(mesh, metrics, service, &peer, &AuthzRequest::Http(info));
        if !decision.allowed() {
            let forbidden = Forbidden {
                caller: peer.describe(),
                service: service.clone(),
                because: decision.because(),
                version: decision.version,
            };
            return futures::future::Either::Right(futures::future::ready(Err(Box::new(forbidden))));
        }
        futures::future::Either::Left(self.inner.call(request))
    }
}

/// Wraps a service in [`PeerIdentity`].
#[derive(Clone, Copy, Debug)]
pub struct PeerIdentityLayer;

impl<S> Layer<S> for PeerIdentityLayer {
    type Service = PeerIdentity<S>;

    fn layer(&self, inner: S) -> PeerIdentity<S> {
        PeerIdentity { inner }
    }
}

/// Tells the app who calls: `x-ferry-peer-identity` from the caller's certificate, and never
/// one the caller sent.
#[derive(Clone, Debug)]
pub struct PeerIdentity<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for PeerIdentity<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> S::Future {
        let identity = request.extensions_mut().remove::<Peer>().and_then(|peer| peer.0);
        let headers = request.headers_mut();
        headers.remove(&PEER_IDENTITY);
        if let Some(identity) = identity
            && let Ok(value) = HeaderValue::from_str(&identity.to_string())
        {
            headers.insert(PEER_IDENTITY, value);
        }
        self.inner.call(request)
    }
}

/// The app, through its pooled client. An app that cannot be reached is
/// [`AppUnreachable`] (the caller may retry elsewhere, whatever the method), one that fails
/// mid-exchange [`AppFailed`]; `x-ferry-error` in the app's own answer is renamed
/// `x-ferry-upstream-error`, so that the header only ever means this sidecar.
#[derive(Clone)]
pub struct App {
    client: Client,
}

impl Service<Request<Body>> for App {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = AppFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> AppFuture {
        let client = self.client.clone();
        AppFuture { sent: Box::pin(async move { client.send(request).await }) }
    }
}

/// The response of the [`App`].
#[pin_project]
pub struct AppFuture {
    #[pin]
    sent: BoxFuture<'static, Result<Response<Body>, BoxError>>,
}

impl Future for AppFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(self.project().sent.poll(cx)) {
            Ok(mut response) => {
                if let Some(relayed) = response.headers_mut().remove(FERRY_ERROR) {
                    response.headers_mut().insert(UPSTREAM_ERROR, relayed);
                }
                Ok(response)
            }
            Err(error) if error.is::<ConnectError>() => Err(Box::new(AppUnreachable(error))),
            Err(error) => Err(Box::new(AppFailed(error))),
        })
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;
    use tower_test::mock;

    use super::*;
    use crate::http::empty;

    #[tokio::test(start_paused = true)]
    async fn the_app_learns_the_callers_identity_from_its_certificate_alone() {
        let (mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let service = PeerIdentityLayer.layer(mock);
        let identity: ferry_tls::Identity =
            ferry_tls::Identity::parse("spiffe://ferry.local/service/frontend").expect("an identity");
        let mut request =
            Request::get("/").header(PEER_IDENTITY, "spiffe://ferry.local/service/admin").body(empty()).expect("request");
        request.extensions_mut().insert(Peer(Some(Arc::new(identity))));
        let response = tokio::spawn(service.clone().oneshot(request));
        let (seen, answer) = handle.next_request().await.expect("reaches the app");
        assert_eq!(seen.headers()[PEER_IDENTITY], "spiffe://ferry.local/service/frontend");
        answer.send_response(Response::new(empty()));
        assert!(response.await.expect("joins").is_ok());

        let forged =
            Request::get("/").header(PEER_IDENTITY, "spiffe://ferry.local/service/admin").body(empty()).expect("request");
        let response = tokio::spawn(service.oneshot(forged));
        let (seen, answer) = handle.next_request().await.expect("reaches the app");
        assert!(!seen.headers().contains_key(PEER_IDENTITY), "a plaintext caller's claim is dropped");
        answer.send_response(Response::new(empty()));
        assert!(response.await.expect("joins").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_policy_every_caller_is_let_through_and_counted() {
        let (mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = Metrics::unregistered();
        let layer = AuthorizeLayer {
            service: "catalog".into(),
            mesh: Mesh::new(crate::mesh::MtlsMode::Permissive),
            metrics: metrics.clone(),
        };
        let response = tokio::spawn(layer.layer(mock).oneshot(Request::get("/").body(empty()).expect("request")));
        let (_, answer) = handle.next_request().await.expect("let through");
        answer.send_response(Response::new(empty()));
        assert!(response.await.expect("joins").is_ok());
        let labels =
            crate::metrics::AuthzLabels { decision: "allow", service: "catalog".into(), caller: "unauthenticated".into() };
        assert_eq!(metrics.inbound_authz.get_or_create(&labels).get(), 1);
    }
}
