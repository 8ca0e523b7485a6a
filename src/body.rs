//! The request body sent upstream: streamed as it arrives, with a bounded copy kept so a
//! request refused with 401 can be replayed once with a fresh credential.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// Bodies up to this size are kept for a replay; larger ones are passed through once.
pub const REPLAY_LIMIT: usize = 64 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The copy of a streamed body, filled as the upstream reads it.
#[derive(Default)]
struct Copy {
    bytes: BytesMut,
    overflowed: bool,
    complete: bool,
}

/// A handle on the copy, kept by the forwarder while the body streams.
#[derive(Clone, Default)]
pub struct ReplayCopy(Arc<Mutex<Copy>>);

impl ReplayCopy {
    fn record(&self, data: &Bytes) {
        let mut copy = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if copy.overflowed {
            return;
        }
        if copy.bytes.len() + data.len() > REPLAY_LIMIT {
            copy.overflowed = true;
            copy.bytes = BytesMut::new();
        } else {
            copy.bytes.extend_from_slice(data);
        }
    }

    fn finish(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).complete = true;
    }

    /// The whole body, when it was sent completely and was small enough to keep.
    pub fn replayable(&self) -> Option<Bytes> {
        let copy = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (copy.complete && !copy.overflowed).then(|| copy.bytes.clone().freeze())
    }
}

pub enum ForwardBody {
    /// No body at all (most GETs): nothing to copy.
    Empty,
    /// The caller's body, streamed, with a copy kept.
    Streaming { inner: Incoming, copy: ReplayCopy },
    /// A replayed body.
    Buffered(Option<Bytes>),
}

impl ForwardBody {
    /// Wraps a caller's body; returns the copy handle when there is a body to copy.
    pub fn from_incoming(inner: Incoming) -> (ForwardBody, Option<ReplayCopy>) {
        if inner.is_end_stream() {
            return (ForwardBody::Empty, None);
        }
        let copy = ReplayCopy::default();
        (
            ForwardBody::Streaming {
                inner,
                copy: copy.clone(),
            },
            Some(copy),
        )
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ForwardBody::Empty => Poll::Ready(None),
            ForwardBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ForwardBody::Streaming { inner, copy } => match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        copy.record(data);
                    }
                    // With a Content-Length, the upstream connection stops polling once the
                    // length is reached.
                    if inner.is_end_stream() {
                        copy.finish();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    copy.finish();
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Empty => true,
            ForwardBody::Buffered(bytes) => bytes.is_none(),
            ForwardBody::Streaming { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Empty => SizeHint::with_exact(0),
            ForwardBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ForwardBody::Streaming { inner, .. } => inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_small_bodies_and_forgets_large_ones() {
        let small = ReplayCopy::default();
        small.record(&Bytes::from_static(b"{}"));
        assert!(small.replayable().is_none(), "not complete yet");
        small.finish();
        assert_eq!(small.replayable().unwrap(), Bytes::from_static(b"{}"));

        let large = ReplayCopy::default();
        large.record(&Bytes::from(vec![0u8; REPLAY_LIMIT]));
        large.record(&Bytes::from_static(b"x"));
        large.finish();
        assert!(large.replayable().is_none());
    }
}
