//! The response body type every handler returns: a boxed stream of `Bytes` frames whose errors
//! abort the response (a client then sees a truncated transfer, never a complete-looking body).
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

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
/// for what it received) into `counter` if given, and calls `done` with the total when the body
/// ends or is dropped. Size hint and end of stream pass through, so lengths survive.
pub fn counted(
    inner: Body,
    counter: Option<IntCounter>,
    done: impl FnOnce(u64) + Send + 'static,
) -> Body {
    Counted {
        inner,
        counter,
        sent: 0,
        done: Some(Box::new(done)),
    }
    .boxed_unsync()
}

struct Counted {
    inner: Body,
    counter: Option<IntCounter>,
    sent: u64,
    done: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.sent);
        }
    }
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
                let n = data.len() as u64;
                self.sent += n;
                if let Some(c) = &self.counter {
                    c.inc_by(n);
                }
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
