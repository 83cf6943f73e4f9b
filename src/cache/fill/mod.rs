//! One fill per digest (docs/ARCHITECTURE.md, "Cache"): the first request for a missing blob
//! starts a single fetch from its sources in its own task; it and every later request for the same
//! digest read the growing temp file as bytes land (the last few batches written straight from
//! memory). The last bytes are published only after the digest checked out, so no client ever
//! receives a complete-looking body with wrong bytes.
//!
//! When the blob cannot be stored (larger than the disk budget, the budget held by other fills,
//! a full disk, a write error) clients are still served: readers continue from the source
//! with a ranged request from where the file left them (pass-through), verifying whole-blob
//! bodies themselves.
//!
//! A Range request answered while the fill still runs carries bytes not yet verified: the digest
//! covers the whole blob, so a part of it cannot be checked before the last byte arrived. Such a
//! response is served anyway (a client resuming a large layer should not wait for all of it),
//! counted ([`FillObserver::unverified_range_response`]), and never feeds the cache: only the
//! fill's own stream is written, hashed and committed, and only once the whole blob verified. A
//! ranged read passed through from the origin is unverified in the same way and counted alike.
//! A whole-blob response never completes with wrong bytes: its last bytes are held back until
//! the digest checked out, and it is aborted if the check fails.
//!
//! At most `cache.max_concurrent_fills` fills fetch at once (see [`super::queue`]).
//!
//! The parts: `fetch.rs` is what the cache asks of a source ([`BlobFetcher`]), `registry.rs` the
//! one fill per digest ([`Fills`]), `task.rs` a fill's own task (fetch, write, hash, verify,
//! commit), `reader.rs` the bodies read from a fill or a committed file.

mod fetch;
mod reader;
mod registry;
mod task;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::queue::FillObserver;
use crate::oci::Digest;

pub use fetch::{BlobFetcher, FetchError, FetchFailure, FetchStream, Fetched, FetchedFrom};
pub use reader::{read_file_range, BlobStream};
pub(crate) use registry::Committed;
pub use registry::{BlobRead, Fills};

/// Size of the reads and writes a fill and its readers make: one pooled read buffer.
pub const CHUNK: usize = super::readbuf::BUF_SIZE;
/// Most recently written batches a fill keeps in memory for its readers (each at most
/// `task::FILL_BATCH`): a reader that keeps up with the fill takes its bytes from here instead
/// of reading back from the file what was just written.
const TAIL_BATCHES: usize = 8;

/// Why a fill failed; shared by every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The source failed: every waiter's response is aborted.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The source's bytes do not match the digest: nothing was stored or served as a complete
    /// body.
    #[error("content from {source_name} does not match digest {expected} (got {actual})")]
    DigestMismatch {
        /// The source's name.
        source_name: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The source's body was longer or shorter than the length it stated.
    #[error("upstream {source_name} sent an invalid answer: {reason}")]
    WrongLength {
        /// The source's name.
        source_name: String,
        /// By how much.
        reason: String,
    },
    /// Too many fills were fetching: this one waited `waited` for a slot and gave up.
    #[error("too many blob fills in progress (waited {waited:?} for a slot); try again")]
    QueueTimeout {
        /// How long it waited.
        waited: Duration,
    },
    /// Local failure outside storage (a task panicked).
    #[error("fill failed: {0}")]
    Internal(String),
}

/// Where a fill stands, as every waiter sees it.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for the origin's answer.
    Starting,
    /// Bytes are landing; `available` of them may be read from the file.
    Running {
        /// The blob's length, when the origin said.
        total: Option<u64>,
        /// Bytes readers may read now.
        available: u64,
    },
    /// Verified (and, when possible, committed); readers read the rest from the file.
    Done {
        /// The blob's length.
        total: u64,
    },
    /// The blob is not being stored: readers past `available` fetch from the origin.
    PassThrough {
        /// The blob's length, when known.
        total: Option<u64>,
        /// Bytes of the file that are valid and may be read.
        available: u64,
    },
    /// Failed; nothing was stored.
    Failed(FillError),
}

/// A fill in progress.
pub struct Fill {
    digest: Digest,
    state: watch::Sender<FillState>,
    file: OnceLock<Arc<File>>,
    fetcher: Arc<dyn BlobFetcher>,
    /// The fill's own source body when it decided not to store before reading any of it: the
    /// first reader takes it instead of opening another request.
    handoff: Mutex<Option<Fetched>>,
    /// Requests served from this fill after it was verified but before it was committed: hits
    /// that count for recency once the blob is indexed.
    late_hits: AtomicU64,
    /// Which source the fill's own fetch found the bytes at.
    from: OnceLock<FetchedFrom>,
    /// The last [`TAIL_BATCHES`] batches written to the file, with their offsets.
    tail: Mutex<std::collections::VecDeque<(u64, Bytes)>>,
}

/// Counters the metrics layer reads.
#[derive(Default)]
pub struct FillStats {
    /// Failed fills by (reason, source name).
    pub failures: Mutex<HashMap<(&'static str, String), u64>>,
    /// Fills that could not store their blob (budget, disk full, write error).
    pub pass_through: AtomicU64,
    /// Disk write or commit failures.
    pub write_failures: AtomicU64,
    /// Stored blobs the serving path refused because their size differs from the index
    /// (truncated or grown at rest); dropped and fetched again.
    pub corrupt_at_rest: AtomicU64,
    /// Told about queueing and unverified Range responses as they happen.
    observer: Arc<OnceLock<Arc<dyn FillObserver>>>,
}

impl FillStats {
    fn unverified_range_response(&self) {
        if let Some(o) = self.observer.get() {
            o.unverified_range_response();
        }
    }
}

// === impl FillError ===

impl FillError {
    /// Label value for `berth_fill_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            FillError::Fetch(e) => e.failure().as_str(),
            FillError::DigestMismatch { .. } => FetchFailure::DigestMismatch.as_str(),
            FillError::WrongLength { .. } => FetchFailure::Invalid.as_str(),
            FillError::QueueTimeout { .. } => "queue_timeout",
            FillError::Internal(_) => "internal",
        }
    }

    /// The name of the source that failed (empty for local failures).
    pub fn source_name(&self) -> &str {
        match self {
            FillError::Fetch(e) => e.source_name(),
            FillError::DigestMismatch { source_name, .. }
            | FillError::WrongLength { source_name, .. } => source_name,
            FillError::QueueTimeout { .. } | FillError::Internal(_) => "",
        }
    }

    /// Whether the source is offline by configuration: the blob is not in this mirror.
    pub fn is_offline(&self) -> bool {
        matches!(self, FillError::Fetch(e) if e.is_offline())
    }
}

// === impl Fill ===

impl Fill {
    /// The file the fill writes, once it has one.
    fn written_file(&self) -> io::Result<Arc<File>> {
        self.file
            .get()
            .cloned()
            .ok_or_else(|| io::Error::other("fill has no file"))
    }

    fn new(digest: Digest, fetcher: Arc<dyn BlobFetcher>) -> Arc<Fill> {
        Arc::new(Fill {
            digest,
            state: watch::channel(FillState::Starting).0,
            file: OnceLock::new(),
            fetcher,
            handoff: Mutex::new(None),
            late_hits: AtomicU64::new(0),
            from: OnceLock::new(),
            tail: Mutex::new(std::collections::VecDeque::with_capacity(TAIL_BATCHES)),
        })
    }

    /// Bytes `offset..limit` (at most [`CHUNK`]) if a batch still in memory holds `offset`.
    fn tail_bytes(&self, offset: u64, limit: u64) -> Option<Bytes> {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let (at, b) = tail
            .iter()
            .find(|(at, b)| *at <= offset && offset < at + b.len() as u64)?;
        let from = (offset - at) as usize;
        let to = (limit - at).min(b.len() as u64) as usize;
        Some(b.slice(from..to.min(from + CHUNK)))
    }

    /// Records a batch just written at `offset`, forgetting the oldest.
    fn push_tail(&self, offset: u64, data: Bytes) {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == TAIL_BATCHES {
            tail.pop_front();
        }
        tail.push_back((offset, data));
    }

    /// Which source the fill's bytes come from, once its fetch answered.
    pub fn fetched_from(&self) -> Option<FetchedFrom> {
        self.from.get().copied()
    }

    /// Whether the blob is complete and verified (it may still be being committed). A request
    /// that joins such a fill is a hit; it is counted for recency.
    pub fn verified(&self) -> bool {
        let done = matches!(&*self.state.borrow(), FillState::Done { .. });
        if done {
            self.late_hits.fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    /// Waits for the origin's answer: the blob's length (if known) once bytes flow, or the
    /// failure. Returns at once for fills that already ended.
    pub async fn ready(&self) -> Result<Option<u64>, FillError> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Starting => {}
                FillState::Running { total, .. } | FillState::PassThrough { total, .. } => {
                    return Ok(*total)
                }
                FillState::Done { total } => return Ok(Some(*total)),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Internal("fill abandoned".into()));
            }
        }
    }

    /// Waits for the fill's end: `Ok(true)` once the blob is verified, `Ok(false)` when it is
    /// not being stored (pass-through), or the failure.
    pub async fn finished(&self) -> Result<bool, FillError> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Starting | FillState::Running { .. } => {}
                FillState::Done { .. } => return Ok(true),
                FillState::PassThrough { .. } => return Ok(false),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Internal("fill abandoned".into()));
            }
        }
    }
}
