//! What a fill asks of a source (docs/ARCHITECTURE.md, "Cache"): a [`BlobFetcher`] answers a
//! byte range of the blob with a [`Fetched`] body, or fails with a [`FetchError`]. Implemented
//! above the cache (the origin, the shared tier, a peer replica), so the cache knows nothing of
//! HTTP or of origins: it sees a failure's class, the source's name and whether the source is
//! offline, and hands the source's own error back whole to whoever answers the client.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;

/// A stream of a source's chunks.
pub type FetchStream = Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>;

/// What kind of failure a source had: the `reason` label of `berth_fill_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchFailure {
    /// The source could not be reached, or its body broke off.
    Unreachable,
    /// A connect, first-byte or idle timeout expired.
    Timeout,
    /// The source answered with an error status.
    Status,
    /// The source's authentication (its token service) failed.
    Auth,
    /// The source's bytes did not match the digest asked for.
    DigestMismatch,
    /// The source's answer was unusable.
    Invalid,
    /// The source is offline by configuration: the content is not in this mirror.
    Offline,
}

impl FetchFailure {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FetchFailure::Unreachable => "unreachable",
            FetchFailure::Timeout => "timeout",
            FetchFailure::Status => "status",
            FetchFailure::Auth => "auth",
            FetchFailure::DigestMismatch => "digest_mismatch",
            FetchFailure::Invalid => "invalid",
            FetchFailure::Offline => "offline",
        }
    }
}

/// Why a source could not deliver: its class and name for the cache's counters and logs, and
/// the source's own error, which the layer that built the fetcher recovers with
/// [`FetchError::downcast_ref`] to answer the client as it would have without the cache.
/// Displays as the source's error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct FetchError {
    failure: FetchFailure,
    source_name: String,
    error: Arc<dyn StdError + Send + Sync>,
}

impl FetchError {
    /// A failure of source `source_name`, of class `failure`, carrying the source's `error`.
    pub fn new(
        failure: FetchFailure,
        source_name: impl Into<String>,
        error: impl StdError + Send + Sync + 'static,
    ) -> FetchError {
        FetchError {
            failure,
            source_name: source_name.into(),
            error: Arc::new(error),
        }
    }

    /// The kind of failure.
    pub fn failure(&self) -> FetchFailure {
        self.failure
    }

    /// The name of the source that failed (an upstream's, `shared tier`, `peer <addr>`).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Whether the source is offline by configuration (a miss, not a fault).
    pub fn is_offline(&self) -> bool {
        self.failure == FetchFailure::Offline
    }

    /// The source's own error, if it is an `E`.
    pub fn downcast_ref<E: StdError + 'static>(&self) -> Option<&E> {
        self.error.downcast_ref::<E>()
    }
}

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
    /// The source's name, for error messages and failure labels.
    pub source: String,
    /// The body, chunk by chunk.
    pub body: FetchStream,
    /// Which source answered.
    pub from: FetchedFrom,
}

/// How a fill (and a reader falling back to pass-through) gets a blob's bytes from its sources:
/// bytes `start..end` (`end` = the blob's end when `None`). Implemented by the proxy, so the
/// cache knows nothing of HTTP.
pub trait BlobFetcher: Send + Sync + 'static {
    /// Starts a fetch.
    fn fetch(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send>>;

    /// The fill's blob verified (and was committed when storage allowed); its bytes came
    /// from `from`. Called once, from the fill's task.
    fn verified(&self, _from: FetchedFrom) {}

    /// The fill's bytes from `from` did not match the digest: nothing was stored or served as a
    /// complete body. Called once, from the fill's task.
    fn rejected(&self, _from: FetchedFrom) {}
}
