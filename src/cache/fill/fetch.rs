//! What a fill asks of a source (docs/ARCHITECTURE.md, "Cache"): a [`BlobFetcher`] answers a
//! byte range of the blob with a [`Fetched`] body. Implemented above the cache (the origin, the
//! shared tier, a peer replica), so the cache knows nothing of HTTP.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

use crate::upstream::UpstreamError;

/// A stream of upstream chunks.
pub type UpstreamStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// Where a fetch found a blob's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchedFrom {
    /// The origin registry.
    Origin,
    /// The shared tier on object storage.
    Shared,
    /// Another replica of the cluster (the digest's owner).
    Peer,
}

impl FetchedFrom {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FetchedFrom::Origin => "origin",
            FetchedFrom::Shared => "shared",
            FetchedFrom::Peer => "peer",
        }
    }
}

/// What a source answered for a blob GET: the length of this body if known and the body,
/// starting at the offset that was asked for.
pub struct Fetched {
    /// Length of `body`.
    pub total: Option<u64>,
    /// Upstream name, for error messages.
    pub upstream: String,
    /// The body, chunk by chunk.
    pub body: UpstreamStream,
    /// Which source answered.
    pub from: FetchedFrom,
}

/// How a fill (and a reader falling back to pass-through) gets bytes from the origin: bytes
/// `start..end` (`end` = the blob's end when `None`). Implemented by the proxy, so the cache
/// knows nothing of HTTP.
pub trait BlobFetcher: Send + Sync + 'static {
    /// Starts a fetch.
    fn fetch(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, UpstreamError>> + Send>>;

    /// The fill's blob verified (and was committed when storage allowed); its bytes came
    /// from `from`. Called once, from the fill's task.
    fn verified(&self, _from: FetchedFrom) {}

    /// The fill's bytes from `from` did not match the digest: nothing was stored or served as a
    /// complete body. Called once, from the fill's task.
    fn rejected(&self, _from: FetchedFrom) {}
}
