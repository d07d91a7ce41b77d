//! What an exchange with an endpoint says about the endpoint: a success, a failure, or nothing.
//!
//! HTTP responses are judged by their status as soon as the headers arrive. gRPC calls carry
//! their status in the trailers (or, for trailers-only responses, in the headers), so their
//! response body is wrapped and judged when the trailers go by. Either way the exchange counts
//! as in flight until its response body ends or is dropped.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Frame, SizeHint};

use crate::{
    errors::is_grpc,
    http::{Body, BoxError},
};

/// What one exchange says about the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered.
    Success,
    /// 5xx, a gateway error, a connect failure, a reset, gRPC UNAVAILABLE.
    Failure,
    /// Says nothing about the endpoint: the caller gave up, or a gRPC deadline or cancellation.
    Neutral,
}

const GRPC_CANCELLED: u32 = 1;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_UNAVAILABLE: u32 = 14;

/// The `grpc-status` in `headers`, if any.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(crate::errors::GRPC_STATUS).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

/// What a gRPC status says about the endpoint.
pub fn of_grpc(code: u32) -> Outcome {
    match code {
        GRPC_UNAVAILABLE => Outcome::Failure,
        GRPC_CANCELLED | GRPC_DEADLINE_EXCEEDED => Outcome::Neutral,
        _ => Outcome::Success,
    }
}

/// What a response's head says, or `None` when the verdict is in the trailers (a gRPC call
/// whose status is not in the headers).
pub fn of_head(status: StatusCode, headers: &HeaderMap) -> Option<Outcome> {
    if status.is_server_error() {
        return Some(Outcome::Failure);
    }
    if is_grpc(headers) && status == StatusCode::OK {
        return grpc_status(headers).map(of_grpc);
    }
    Some(Outcome::Success)
}

/// Told the verdict once, when the body ends (or is dropped without ending).
pub trait Verdict: Send + 'static {
    /// `Some` when the trailers or the end of the body decided, `None` when dropped early.
    fn decide(self, outcome: Option<Outcome>);
}

/// A response body that reports the exchange's outcome when it ends: from the trailers' gRPC
/// status when `pending` (a gRPC call), else the `known` verdict from the head.
#[pin_project::pin_project(PinnedDrop)]
pub struct Observed<V: Verdict> {
    #[pin]
    body: Body,
    verdict: Option<V>,
    /// The head's verdict; `None` while a gRPC status is awaited in the trailers.
    known: Option<Outcome>,
}

impl<V: Verdict> Observed<V> {
    pub fn new(body: Body, known: Option<Outcome>, verdict: V) -> Self {
        Self { body, verdict: Some(verdict), known }
    }
}

#[pin_project::pinned_drop]
impl<V: Verdict> PinnedDrop for Observed<V> {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        if let Some(verdict) = this.verdict.take() {
            // Dropped before the end: the head's verdict if it had one, else nothing known.
            verdict.decide(*this.known);
        }
    }
}

impl<V: Verdict> http_body::Body for Observed<V> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = std::task::ready!(this.body.poll_frame(cx));
        let decided = match &frame {
            Some(Ok(frame)) => match frame.trailers_ref() {
                Some(trailers) if this.known.is_none() => Some(grpc_status(trailers).map(of_grpc).unwrap_or(Outcome::Failure)),
                _ => None,
            },
            // A gRPC body that ends without a status broke off.
            None => Some(this.known.unwrap_or(Outcome::Failure)),
            Some(Err(_)) => Some(Outcome::Failure),
        };
        if let Some(outcome) = decided
            && let Some(verdict) = this.verdict.take()
        {
            verdict.decide(Some(outcome));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<Option<Outcome>>>>);

    impl Verdict for Seen {
        fn decide(self, outcome: Option<Outcome>) {
            self.0.lock().expect("not poisoned").push(outcome);
        }
    }

    fn grpc_headers(status: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, "application/grpc".parse().expect("valid"));
        if let Some(status) = status {
            headers.insert("grpc-status", status.parse().expect("valid"));
        }
        headers
    }

    #[test]
    fn heads_are_judged_by_status_and_trailers_only_grpc_status() {
        assert_eq!(of_head(StatusCode::OK, &HeaderMap::new()), Some(Outcome::Success));
        assert_eq!(of_head(StatusCode::NOT_FOUND, &HeaderMap::new()), Some(Outcome::Success));
        assert_eq!(of_head(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new()), Some(Outcome::Failure));
        assert_eq!(of_head(StatusCode::OK, &grpc_headers(Some("14"))), Some(Outcome::Failure));
        assert_eq!(of_head(StatusCode::OK, &grpc_headers(Some("4"))), Some(Outcome::Neutral));
        assert_eq!(of_head(StatusCode::OK, &grpc_headers(Some("5"))), Some(Outcome::Success), "NOT_FOUND: it answered");
        assert_eq!(of_head(StatusCode::OK, &grpc_headers(None)), None, "the status comes in the trailers");
    }

    #[tokio::test]
    async fn a_grpc_body_is_judged_by_its_trailers() {
        for (code, outcome) in [("0", Outcome::Success), ("14", Outcome::Failure), ("1", Outcome::Neutral)] {
            let seen = Seen::default();
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                vec![Ok(Frame::data(Bytes::from_static(b"message"))), Ok(Frame::trailers(grpc_headers(Some(code))))];
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            let observed = Observed::new(crate::http::boxed(body), None, seen.clone());
            let collected = observed.collect().await.expect("whole body");
            assert!(collected.trailers().is_some());
            assert_eq!(*seen.0.lock().expect("not poisoned"), vec![Some(outcome)], "grpc-status {code}");
        }
    }

    #[tokio::test]
    async fn a_dropped_body_reports_what_the_head_said() {
        let seen = Seen::default();
        drop(Observed::new(crate::http::full("partial"), Some(Outcome::Failure), seen.clone()));
        let pending = Seen::default();
        drop(Observed::new(crate::http::full("partial"), None, pending.clone()));
        assert_eq!(*seen.0.lock().expect("not poisoned"), vec![Some(Outcome::Failure)]);
        assert_eq!(*pending.0.lock().expect("not poisoned"), vec![None]);
    }
}
