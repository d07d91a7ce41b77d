//! A request body that can be sent again: the first attempt streams it through as it arrives
//! (nothing waits for the whole body, so a gRPC stream flows as usual) while a copy of up to a
//! bound is kept; a later attempt replays the copy and then goes on reading where the last one
//! stopped.
//!
//! Attempts take turns: the body in flight belongs to one copy at a time and goes back to the
//! shared state when that copy is dropped. A retry is only possible while the body kept fits the
//! bound and the previous attempt has given the rest of the body back (or it ended).

use ferry_runtime::lock;
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};

use super::{Body, BoxError};

/// One attempt's copy of a request body.
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The chunks of `Shared::chunks` this copy has already produced.
    position: usize,
    /// Whether this copy has produced the trailers.
    trailers_sent: bool,
    /// The rest of the original body, while this copy reads it.
    body: Option<Body>,
}

struct Shared {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    /// More than `limit` bytes went by: the copy is incomplete, so no replay is possible.
    over: bool,
    /// The rest of the original body, when no copy holds it.
    body: Option<Body>,
    ended: bool,
    trailers: Option<HeaderMap>,
}

impl ReplayBody {
    /// Wraps `body`, keeping up to `limit` bytes for replays.
    pub fn new(body: Body, limit: usize) -> Self {
        let ended = http_body::Body::is_end_stream(&body);
        let shared = Shared { chunks: Vec::new(), len: 0, limit, over: false, body: Some(body), ended, trailers: None };
        Self { shared: Arc::new(Mutex::new(shared)), position: 0, trailers_sent: false, body: None }
    }

    /// A copy for another attempt, if one can be made: everything read so far was kept, and the
    /// rest of the body is not held by a copy still alive.
    pub fn replay(&self) -> Option<Self> {
        self.can_replay().then(|| Self { shared: self.shared.clone(), position: 0, trailers_sent: false, body: None })
    }

    /// Whether [`ReplayBody::replay`] would make a copy.
    pub fn can_replay(&self) -> bool {
        let shared = lock(&self.shared);
        !shared.over && (shared.ended || shared.body.is_some()) && self.body.is_none()
    }

    /// The whole body, when it has been read to its end within the bound.
    pub fn complete(&self) -> Option<Bytes> {
        let shared = lock(&self.shared);
        (shared.ended && !shared.over).then(|| shared.chunks.concat().into())
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(body) = self.body.take() {
            lock(&self.shared).body = Some(body);
        }
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = lock(&this.shared);
        if this.position < shared.chunks.len() {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(shared.chunks[this.position - 1].clone()))));
        }
        if shared.ended {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        if this.body.is_none() {
            if shared.over {
                // Only the copy that read past the bound could go on, and it never gave the
                // body back; anyone else would send the middle of it.
                return Poll::Ready(Some(Err("the request body is too large to send again".into())));
            }
            this.body = shared.body.take();
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(Some(Err("the request body is still held by an earlier attempt".into())));
        };
        // Not held across the poll of the inner body, which may take its time.
        drop(shared);
        let polled = Pin::new(body).poll_frame(cx);
        let mut shared = lock(&this.shared);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                this.body = None;
                // Trailers an earlier copy read (and stored) before it gave the body back.
                if !this.trailers_sent
                    && let Some(trailers) = shared.trailers.clone()
                {
                    this.trailers_sent = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !shared.over {
                            if shared.len + data.len() > shared.limit {
                                shared.over = true;
                                shared.chunks = Vec::new();
                            } else {
                                shared.len += data.len();
                                shared.chunks.push(data.clone());
                                this.position = shared.chunks.len();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            shared.trailers = Some(trailers.clone());
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                // Ended as soon as the original says so, not one empty poll later: an HTTP/2
                // sender then puts END_STREAM on this frame instead of sending an empty DATA
                // frame after it (servers count small frames against a flood budget).
                if this.body.as_ref().is_some_and(http_body::Body::is_end_stream) {
                    shared.ended = true;
                    this.body = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = lock(&self.shared);
        shared.ended && self.position >= shared.chunks.len() && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = lock(&self.shared);
        if shared.over {
            return SizeHint::default();
        }
        let kept: u64 = shared.chunks[self.position.min(shared.chunks.len())..].iter().map(|c| c.len() as u64).sum();
        let rest = match (&self.body, &shared.body) {
            (Some(body), _) | (None, Some(body)) => body.size_hint(),
            _ if shared.ended => SizeHint::with_exact(0),
            _ => return SizeHint::default(),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    /// A body sending `chunks`, then `trailers` if any, one frame per poll.
    fn body(chunks: &[&'static str], trailers: Option<HeaderMap>) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))).collect();
        if let Some(trailers) = trailers {
            frames.push(Ok(Frame::trailers(trailers)));
        }
        super::super::boxed(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn read(body: ReplayBody) -> (Bytes, Option<HeaderMap>) {
        let collected = body.collect().await.expect("reads");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_body_read_whole_is_replayed_whole_with_its_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", "1S".parse().expect("value"));
        let first = ReplayBody::new(body(&["hello ", "world"], Some(trailers.clone())), 1024);
        let second = first.replay().expect("nothing read yet");
        assert_eq!(read(first).await, (Bytes::from("hello world"), Some(trailers.clone())));
        assert_eq!(second.complete(), Some(Bytes::from("hello world")));
        let third = second.replay().expect("replayable");
        assert_eq!(read(second).await, (Bytes::from("hello world"), Some(trailers.clone())));
        assert_eq!(read(third).await, (Bytes::from("hello world"), Some(trailers)));
    }

    #[tokio::test]
    async fn a_replay_goes_on_from_where_an_attempt_stopped() {
        let mut first = ReplayBody::new(body(&["a", "b", "c"], None), 1024);
        let keeper = first.replay().expect("nothing read yet");
        let frame = first.frame().await.expect("a frame").expect("no error");
        assert_eq!(frame.into_data().expect("data"), "a");
        assert!(keeper.replay().is_none(), "the first attempt still holds the rest of the body");
        drop(first);
        let second = keeper.replay().expect("the rest is back");
        assert_eq!(read(second).await.0, Bytes::from("abc"), "the kept chunk, then the rest");
        assert_eq!(keeper.complete(), Some(Bytes::from("abc")));
    }

    #[tokio::test]
    async fn a_body_over_the_bound_streams_once_and_is_not_replayed() {
        let first = ReplayBody::new(body(&["12345", "67890"], None), 8);
        let keeper = first.replay().expect("nothing read yet");
        assert_eq!(read(first).await.0, Bytes::from("1234567890"), "the first attempt gets all of it");
        assert!(keeper.replay().is_none());
        assert_eq!(keeper.complete(), None);
    }

    #[tokio::test]
    async fn the_end_shows_with_the_last_frame() {
        let mut first = ReplayBody::new(crate::http::full("only"), 1024);
        let frame = first.frame().await.expect("a frame").expect("no error");
        assert_eq!(frame.into_data().expect("data"), "only");
        assert!(http_body::Body::is_end_stream(&first), "no empty poll needed to see the end");
        assert_eq!(first.complete(), Some(Bytes::from("only")));
        assert_eq!(read(first.replay().expect("replayable")).await.0, Bytes::from("only"));
    }

    #[tokio::test]
    async fn an_empty_body_is_complete_at_once() {
        let first = ReplayBody::new(crate::http::empty(), 8);
        assert_eq!(first.complete(), Some(Bytes::new()));
        assert!(http_body::Body::is_end_stream(&first.replay().expect("replayable")));
    }
}
