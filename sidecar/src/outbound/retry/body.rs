//! The request body as the retry layer hands it down: kept for another attempt when it may be
//! needed and is small enough, passed through untouched otherwise.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::{Frame, SizeHint};

use crate::http::{Body, BoxError, replay::ReplayBody};

/// Request bodies up to this size are kept so the request can be retried or mirrored.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// One attempt's request body.
pub enum AttemptBody {
    /// No body at all (most requests): every attempt sends nothing, nothing is kept.
    Empty,
    /// Streamed to the first attempt as it arrives, with a copy of up to [`MAX_REPLAY_BODY`]
    /// kept for later ones (gRPC calls, uploads).
    Replay(ReplayBody),
    /// Sent once: no retry may follow, or the body is too large to keep.
    Once(Body),
}

impl AttemptBody {
    /// A body that other attempts may send again, when its size allows.
    pub fn replayable(body: Body, headers: &HeaderMap) -> Self {
        if http_body::Body::is_end_stream(&body) {
            return Self::Empty;
        }
        let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        match length {
            Some(length) if length > MAX_REPLAY_BODY => Self::Once(body),
            _ => Self::Replay(ReplayBody::new(body, MAX_REPLAY_BODY as usize)),
        }
    }

    /// A body sent once.
    pub fn once(body: Body) -> Self {
        if http_body::Body::is_end_stream(&body) { Self::Empty } else { Self::Once(body) }
    }

    /// The body for another attempt, if it can be sent again.
    pub fn replay(&self) -> Option<Self> {
        match self {
            Self::Empty => Some(Self::Empty),
            Self::Replay(body) => body.replay().map(Self::Replay),
            Self::Once(_) => None,
        }
    }

    /// Whether another attempt could have the body.
    pub fn can_replay(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Replay(body) => body.can_replay(),
            Self::Once(_) => false,
        }
    }
}

impl http_body::Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Replay(body) => Pin::new(body).poll_frame(cx),
            Self::Once(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Replay(body) => body.is_end_stream(),
            Self::Once(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Replay(body) => body.size_hint(),
            Self::Once(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http_body_util::BodyExt;

    use super::*;
    use crate::http::{empty, full};

    #[tokio::test]
    async fn bodies_stream_while_a_copy_is_kept_for_the_next_attempt() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let first = AttemptBody::replayable(full("hello"), &headers);
        assert!(matches!(first, AttemptBody::Replay(_)), "streamed, not read first");
        let second = first.replay().expect("a copy for a second attempt");
        assert_eq!(first.collect().await.expect("reads").to_bytes(), "hello");
        assert!(second.can_replay());
        assert_eq!(second.collect().await.expect("replays").to_bytes(), "hello");
    }

    #[test]
    fn empty_bodies_keep_nothing_and_large_ones_are_sent_once() {
        let mut headers = HeaderMap::new();
        assert!(matches!(AttemptBody::replayable(empty(), &headers), AttemptBody::Empty));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(MAX_REPLAY_BODY + 1));
        let large = AttemptBody::replayable(full("x"), &headers);
        assert!(!large.can_replay(), "too large to keep");
        assert!(large.replay().is_none());
    }
}
