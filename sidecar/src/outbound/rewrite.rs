//! `rewrite`: a rule's changes to the request (headers, then the path prefix) and to the
//! response's headers. It sits below the rule's faults, so an injected abort is answered as the
//! request came, and above its mirror and retries, so copies and every attempt carry the
//! rewritten request.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use pin_project::pin_project;
use tower::{Layer, Service};

use super::route::{Rewrite, rewrite_prefix};
use crate::http::{Body, BoxError};

/// One rule's rewrites.
#[derive(Debug, Clone, Default)]
pub struct Rewrites {
    pub request_headers: Rewrite,
    /// (matched prefix, replacement)
    pub prefix: Option<(String, String)>,
    pub response_headers: Rewrite,
}

impl Rewrites {
    fn is_empty(&self) -> bool {
        self.request_headers.is_empty() && self.prefix.is_none() && self.response_headers.is_empty()
    }
}

/// Wraps a service in [`RewriteService`]; with nothing to rewrite, requests pass untouched.
#[derive(Debug, Clone)]
pub struct RewriteLayer {
    rewrites: Option<Arc<Rewrites>>,
}

impl RewriteLayer {
    /// A layer applying `rewrites`.
    pub fn new(rewrites: Rewrites) -> Self {
        Self { rewrites: (!rewrites.is_empty()).then(|| Arc::new(rewrites)) }
    }
}

impl<S> Layer<S> for RewriteLayer {
    type Service = RewriteService<S>;

    fn layer(&self, inner: S) -> RewriteService<S> {
        RewriteService { inner, rewrites: self.rewrites.clone() }
    }
}

/// A service that rewrites its requests and its responses' headers.
#[derive(Debug, Clone)]
pub struct RewriteService<S> {
    inner: S,
    rewrites: Option<Arc<Rewrites>>,
}

impl<S> Service<Request<Body>> for RewriteService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if let Some(rewrites) = &self.rewrites {
            let (mut parts, body) = request.into_parts();
            rewrites.request_headers.apply(&mut parts.headers);
            if let Some((prefix, replacement)) = &rewrites.prefix {
                rewrite_prefix(&mut parts, prefix, replacement);
            }
            request = Request::from_parts(parts, body);
        }
        ResponseFuture { inner: self.inner.call(request), rewrites: self.rewrites.clone() }
    }
}

/// The response of a [`RewriteService`], its headers rewritten.
#[pin_project]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    rewrites: Option<Arc<Rewrites>>,
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(rewrites) = this.rewrites {
            rewrites.response_headers.apply(response.headers_mut());
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;
    use tower_test::mock;

    use super::*;
    use crate::http::empty;

    fn rule(yaml: &str) -> Rewrites {
        let text = format!("kind: Route\nservice: catalog\nrules:\n  - {yaml}\n");
        let resource = ferry_proto::json::resources_from_yaml(&text).expect("valid").remove(0);
        let Some(ferry_proto::v1::resource::Kind::Route(route)) = resource.kind else { panic!("a route") };
        let table = super::super::route::RouteTable::compile(&"catalog".into(), &route, 1).expect("compiles");
        let rule = &table.rules[0];
        Rewrites {
            request_headers: rule.request_headers.clone(),
            prefix: rule.rewrite_prefix.clone(),
            response_headers: rule.response_headers.clone(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_and_responses_are_rewritten() {
        let rewrites = rule(
            "match: { path_prefix: /old }\n    rewrite_path_prefix: /new\n    request_headers: { set: { x-tenant: blue } }\n    response_headers: { add: { x-served-by: ferry } }",
        );
        let (mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let response = tokio::spawn(
            RewriteLayer::new(rewrites).layer(mock).oneshot(Request::get("/old/items?page=2").body(empty()).expect("request")),
        );
        let (request, answer) = handle.next_request().await.expect("sent on");
        assert_eq!(request.uri(), "/new/items?page=2");
        assert_eq!(request.headers()["x-tenant"], "blue");
        answer.send_response(Response::new(empty()));
        assert_eq!(response.await.expect("joins").expect("answered").headers()["x-served-by"], "ferry");
    }
}
