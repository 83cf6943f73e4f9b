//! The response body type every handler returns: a boxed stream of `Bytes` frames whose errors
//! abort the response (a client then sees a truncated transfer, never a complete-looking body).

use std::io;

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

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
