//! The response body type every handler returns: a boxed stream of `Bytes` frames whose errors
//! abort the response (a client then sees a truncated transfer, never a complete-looking body).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http_body::SizeHint;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use prometheus::IntCounter;

/// Boxed response body.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// An empty body (HEAD answers, 304s).
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of bytes already in memory (manifests, JSON).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body streamed from `stream`; an `Err` item aborts the response.
pub fn stream<S>(stream: S) -> Body
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    use futures_util::StreamExt;
    StreamBody::new(stream.map(|r| r.map(Frame::data))).boxed_unsync()
}

/// Counts the data bytes of a body as they are sent (a client that disconnects early is counted
/// for what it received). Size hint and end of stream pass through, so lengths survive.
pub fn counted(inner: Body, counter: IntCounter) -> Body {
    Counted { inner, counter }.boxed_unsync()
}

struct Counted {
    inner: Body,
    counter: IntCounter,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.counter.inc_by(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
