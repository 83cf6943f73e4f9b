//! One fill per digest (docs/ARCHITECTURE.md, "Cache"): the first request for a missing blob starts a single
//! upstream fetch in its own task; it and every later request for the same digest read the
//! growing temp file as bytes land (the last few batches written straight from memory). The last bytes are published only after the digest checked
//! out, so no client ever receives a complete-looking body with wrong bytes.
//!
//! When the blob cannot be stored (larger than the disk budget, the budget held by other fills,
//! a full disk, a write error) clients are still served: readers continue from the upstream
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

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::watch;

use super::index::{DiskIndex, Key, ObjectKind, ReserveError};
use super::queue::{FillLimits, FillObserver, FillQueue};
use super::store::DiskStore;
use crate::oci::{Digest, Hasher};
use crate::upstream::UpstreamError;

/// Size of the reads and writes a fill and its readers make: one pooled read buffer.
pub const CHUNK: usize = super::readbuf::BUF_SIZE;
/// Most bytes a fill gathers from the origin into one write (only what already arrived is
/// joined: a fill never waits to fill a batch).
const FILL_BATCH: usize = 256 * 1024;
/// Most recently written batches a fill keeps in memory for its readers (each at most
/// FILL_BATCH): a reader that keeps up with the fill takes
/// its bytes from here instead of reading back from the file what was just written.
const TAIL_BATCHES: usize = 8;
/// Chunks queued between a fill and its disk writer (and its hasher). Chunks are at most
/// 256 KiB (FILL_BATCH here; the upstream client's read buffer, 128 KiB, for single chunks),
/// so with its tail a fill holds about 2 MiB of the blob in memory whatever the origin's speed.
const WRITE_QUEUE: usize = 4;
/// How often a storage failure is logged at most.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// A stream of upstream chunks.
pub type UpstreamStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;
/// A stream of a blob's bytes, in [`CHUNK`]-sized frames; an error aborts the response.
pub type BlobStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

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

/// Why a fill failed; shared by every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The origin failed or sent bad bytes: every waiter's response is aborted.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
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
    /// The fill's own upstream body when it decided not to store before reading any of it: the
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
    /// Failed fills by (reason, upstream).
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

// === impl Fill ===

impl FillError {
    /// Label value for `berth_fill_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            FillError::Upstream(UpstreamError::DigestMismatch { .. }) => "digest_mismatch",
            FillError::Upstream(UpstreamError::Timeout { .. }) => "timeout",
            FillError::Upstream(UpstreamError::Unreachable { .. }) => "unreachable",
            FillError::Upstream(UpstreamError::Status { .. }) => "status",
            FillError::Upstream(UpstreamError::Token { .. }) => "auth",
            FillError::Upstream(UpstreamError::Invalid { .. }) => "invalid",
            FillError::Upstream(UpstreamError::Offline { .. }) => "offline",
            FillError::QueueTimeout { .. } => "queue_timeout",
            FillError::Internal(_) => "internal",
        }
    }

    fn upstream(&self) -> String {
        match self {
            FillError::Upstream(
                UpstreamError::DigestMismatch { upstream, .. }
                | UpstreamError::Timeout { upstream, .. }
                | UpstreamError::Unreachable { upstream, .. }
                | UpstreamError::Status { upstream, .. }
                | UpstreamError::Token { upstream, .. }
                | UpstreamError::Invalid { upstream, .. }
                | UpstreamError::Offline { upstream },
            ) => upstream.clone(),
            FillError::QueueTimeout { .. } | FillError::Internal(_) => String::new(),
        }
    }
}

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

    /// A body of bytes `start..end` (`end` = the blob's end when `None`) as they land. Fails
    /// (aborting the response) if the fill fails; continues from the origin if storage fails.
    pub fn reader(
        self: &Arc<Self>,
        start: u64,
        end: Option<u64>,
        stats: Arc<FillStats>,
    ) -> BlobStream {
        let init = Reader {
            fill: self.clone(),
            rx: self.state.subscribe(),
            offset: start,
            start,
            end,
            total: None,
            phase: Phase::File,
            verify: None,
            stats,
            upstream: String::new(),
            counted_unverified: false,
        };
        futures_util::stream::unfold(init, |mut r| async move {
            match r.next().await {
                Ok(Some(b)) => Some((Ok(b), r)),
                Ok(None) => None,
                Err(e) => {
                    r.phase = Phase::Finished;
                    Some((Err(e), r))
                }
            }
        })
        .boxed()
    }
}

enum Phase {
    File,
    Upstream(UpstreamStream),
    Finished,
}

/// Whole-body verification for pass-through reads: hash everything, hold the last chunk back
/// until the digest checked out.
struct Verify {
    hasher: Hasher,
    held: Option<Bytes>,
}

struct Reader {
    fill: Arc<Fill>,
    rx: watch::Receiver<FillState>,
    offset: u64,
    start: u64,
    end: Option<u64>,
    total: Option<u64>,
    phase: Phase,
    verify: Option<Verify>,
    stats: Arc<FillStats>,
    upstream: String,
    /// Whether this response was counted as carrying unverified bytes.
    counted_unverified: bool,
}

impl Reader {
    /// Whether this reader serves part of the blob (a Range), not all of it.
    fn partial(&self) -> bool {
        self.start > 0 || matches!((self.end, self.total), (Some(e), Some(t)) if e < t)
    }

    /// Counts this response once as carrying bytes not verified against the digest.
    fn unverified(&mut self) {
        if !self.counted_unverified {
            self.counted_unverified = true;
            self.stats.unverified_range_response();
        }
    }

    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if self.end.is_some_and(|e| self.offset >= e) && self.verify.is_none() {
                return Ok(None);
            }
            match &mut self.phase {
                Phase::Finished => return Ok(None),
                Phase::Upstream(_) => return self.next_upstream().await,
                Phase::File => {}
            }
            let state = self.rx.borrow_and_update().clone();
            match &state {
                FillState::Running { total, .. } | FillState::PassThrough { total, .. } => {
                    self.total = self.total.or(*total)
                }
                FillState::Done { total } => self.total = Some(*total),
                _ => {}
            }
            let limit = match state {
                FillState::Done { total } => {
                    let end = *self.end.get_or_insert(total);
                    end.min(total)
                }
                FillState::Running { available, .. } if available > self.offset => {
                    self.end.map_or(available, |e| e.min(available))
                }
                FillState::PassThrough { available, total } => {
                    if available > self.offset {
                        self.end.map_or(available, |e| e.min(available))
                    } else {
                        if self.end.is_none() {
                            self.end = total;
                        }
                        self.switch_to_upstream().await?;
                        continue;
                    }
                }
                FillState::Failed(e) => return Err(io::Error::other(e.to_string())),
                FillState::Starting | FillState::Running { .. } => {
                    if self.rx.changed().await.is_err() {
                        return Err(io::Error::other("fill abandoned"));
                    }
                    continue;
                }
            };
            if self.offset >= limit {
                return Ok(None);
            }
            // Bytes just written are usually still in memory; older ones come from the file.
            let b = match self.fill.tail_bytes(self.offset, limit) {
                Some(b) => b,
                None => {
                    let file = self.fill.written_file()?;
                    read_at(
                        file,
                        self.offset,
                        (limit - self.offset).min(CHUNK as u64) as usize,
                    )
                    .await?
                }
            };
            // Bytes of a fill that has not verified yet (or never will: pass-through). A whole
            // body is safe (its last bytes wait for the check); a part is not.
            if !matches!(state, FillState::Done { .. }) && self.partial() {
                self.unverified();
            }
            self.offset += b.len() as u64;
            return Ok(Some(b));
        }
    }

    /// Storage failed or was skipped: continue from the origin at `offset`.
    async fn switch_to_upstream(&mut self) -> io::Result<()> {
        let whole = self.start == 0 && (self.end.is_none() || self.end == self.total);
        if whole {
            // Verify the whole body: hash what the file already gave this client.
            let mut hasher = Hasher::new(self.fill.digest.algorithm());
            if self.offset > 0 {
                let file = self.fill.written_file()?;
                let mut at = 0;
                while at < self.offset {
                    let b = read_at(
                        file.clone(),
                        at,
                        (self.offset - at).min(CHUNK as u64) as usize,
                    )
                    .await?;
                    hasher.update(&b);
                    at += b.len() as u64;
                }
            }
            self.verify = Some(Verify { hasher, held: None });
        }
        let handed = if self.offset == 0 {
            self.fill
                .handoff
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
        } else {
            None
        };
        let fetched = match handed {
            Some(f) => f,
            None => self
                .fill
                .fetcher
                .fetch(self.offset, self.end)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?,
        };
        self.upstream = fetched.upstream;
        self.phase = Phase::Upstream(fetched.body);
        Ok(())
    }

    async fn next_upstream(&mut self) -> io::Result<Option<Bytes>> {
        let Phase::Upstream(body) = &mut self.phase else {
            return Ok(None);
        };
        loop {
            let remaining = self.end.map(|e| e.saturating_sub(self.offset));
            let chunk = if remaining == Some(0) {
                None
            } else {
                body.next().await
            };
            match chunk {
                Some(Ok(mut b)) => {
                    if let Some(r) = remaining {
                        if (b.len() as u64) > r {
                            b.truncate(r as usize);
                        }
                    }
                    if b.is_empty() {
                        continue;
                    }
                    self.offset += b.len() as u64;
                    match &mut self.verify {
                        None => {
                            // A ranged read from the origin: nothing can verify it.
                            self.unverified();
                            return Ok(Some(b));
                        }
                        Some(v) => {
                            v.hasher.update(&b);
                            if let Some(prev) = v.held.replace(b) {
                                return Ok(Some(prev));
                            }
                        }
                    }
                }
                Some(Err(e)) => return Err(io::Error::other(e.to_string())),
                None => {
                    if let Some(e) = self.end {
                        if self.offset < e {
                            return Err(io::Error::other(format!(
                                "origin body ended at {} of {e} bytes",
                                self.offset
                            )));
                        }
                    }
                    let Some(v) = self.verify.take() else {
                        self.phase = Phase::Finished;
                        return Ok(None);
                    };
                    self.phase = Phase::Finished;
                    let actual = v.hasher.finish();
                    if actual != self.fill.digest {
                        *self
                            .stats
                            .failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(("digest_mismatch", self.upstream.clone()))
                            .or_default() += 1;
                        return Err(io::Error::other(format!(
                            "origin content does not match {} (got {actual})",
                            self.fill.digest
                        )));
                    }
                    return Ok(v.held);
                }
            }
        }
    }
}

async fn read_at(file: Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || read_chunk(&file, offset, len))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Reads `start..end` of a committed file, one [`CHUNK`] ahead: the next read runs on the
/// blocking pool while the chunk before it is written to the client.
pub fn read_file_range(file: Arc<File>, start: u64, end: u64) -> BlobStream {
    /// Starts the read of the chunk at `offset`, if any is left.
    fn ahead(
        file: &Arc<File>,
        offset: u64,
        end: u64,
    ) -> Option<tokio::task::JoinHandle<io::Result<Bytes>>> {
        (offset < end).then(|| {
            let len = (end - offset).min(CHUNK as u64) as usize;
            let file = file.clone();
            tokio::task::spawn_blocking(move || read_chunk(&file, offset, len))
        })
    }
    let first = ahead(&file, start, end);
    futures_util::stream::unfold(
        (file, start, first),
        move |(file, offset, pending)| async move {
            let read = pending?.await.unwrap_or_else(|e| Err(io::Error::other(e)));
            match read {
                Ok(b) => {
                    let next = offset + b.len() as u64;
                    let pending = ahead(&file, next, end);
                    Some((Ok(b), (file, next, pending)))
                }
                Err(e) => Some((Err(e), (file, end, None))),
            }
        },
    )
    .boxed()
}

/// Reads `len` (at most [`CHUNK`]) bytes at `offset` into a pooled buffer; blocking.
fn read_chunk(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    debug_assert!(len <= CHUNK);
    let mut buf = super::readbuf::take();
    file.read_exact_at(&mut buf[..len], offset)?;
    Ok(super::readbuf::freeze(buf, len))
}

/// A committed blob or a fill to read from.
pub enum BlobSource {
    /// Already on disk: the file and its length.
    Cached(File, u64),
    /// Being fetched; `leader` is true for the request that started it.
    Filling {
        /// The fill.
        fill: Arc<Fill>,
        /// Whether this request started it.
        leader: bool,
    },
}

/// The fills in progress, at most one per digest.
pub struct Fills {
    store: Arc<DiskStore>,
    index: Arc<DiskIndex>,
    map: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Fills in progress, republished whenever one ends (committed or failed).
    settled: watch::Sender<usize>,
    stats: Arc<FillStats>,
    last_warn: Mutex<Option<Instant>>,
    /// Slots for fetching from origins.
    queue: FillQueue,
}

// === impl Fills ===

impl Fills {
    /// No fills yet; at most `limits.max_concurrent` will fetch at once.
    pub fn new(store: Arc<DiskStore>, index: Arc<DiskIndex>, limits: FillLimits) -> Arc<Fills> {
        let stats = Arc::new(FillStats::default());
        Arc::new(Fills {
            store,
            index,
            map: Mutex::new(HashMap::new()),
            settled: watch::channel(0).0,
            queue: FillQueue::new(limits, stats.observer.clone()),
            stats,
            last_warn: Mutex::new(None),
        })
    }

    /// Installs the observer of queueing and unverified Range responses (once; later calls
    /// are ignored).
    pub fn set_observer(&self, observer: Arc<dyn FillObserver>) {
        let _ = self.stats.observer.set(observer);
    }

    /// Fills waiting for a slot to fetch from their origin.
    pub fn queued(&self) -> usize {
        self.queue.queued()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &Arc<FillStats> {
        &self.stats
    }

    /// Number of fills in progress.
    pub fn in_flight(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits until no fill is in progress for `d` (its blob committed, or the fill failed).
    pub async fn settled(&self, d: &Digest) {
        let mut rx = self.settled.subscribe();
        while self.get(d).is_some() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until no fill at all is in progress.
    pub async fn all_settled(&self) {
        let mut rx = self.settled.subscribe();
        while self.in_flight() > 0 {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The fill in progress for `d`, if any.
    pub fn get(&self, d: &Digest) -> Option<Arc<Fill>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .cloned()
    }

    /// Opens blob `d` if the index has it, on the blocking pool. A file deleted behind berth's
    /// back is forgotten.
    async fn open_indexed(&self, d: &Digest) -> io::Result<Option<(File, u64)>> {
        let key = Key {
            kind: ObjectKind::Blob,
            digest: d.clone(),
        };
        if !self.index.contains(&key) {
            return Ok(None);
        }
        let (store, digest) = (self.store.clone(), d.clone());
        let opened = tokio::task::spawn_blocking(move || store.open_blob(&digest))
            .await
            .map_err(io::Error::other)??;
        match opened {
            Some((_, len)) if self.index.size_of(&key) != Some(len) => {
                self.stale_size(&key, len);
                Ok(None)
            }
            Some(x) => {
                self.index.touch(&key);
                Ok(Some(x))
            }
            None => {
                self.index.remove(&key);
                Ok(None)
            }
        }
    }

    /// A stored blob whose length differs from the index (truncated or grown at rest): never
    /// served, dropped and counted; the request goes on as a miss.
    pub(crate) fn stale_size(&self, key: &Key, len: u64) {
        let Some(indexed) = self.index.remove(key) else {
            return;
        };
        tracing::error!(
            digest = %key.digest, size = len, indexed,
            "stored blob changed size at rest; removed (it will be fetched again)"
        );
        self.store.delete(key);
        self.stats.corrupt_at_rest.fetch_add(1, Ordering::Relaxed);
    }

    /// The blob from disk, or a fill to read: an existing one, or a new one that runs in its
    /// own task (so it completes even if this client goes away). Files are opened on the
    /// blocking pool, never under the map's lock.
    pub async fn blob_or_fill(
        self: &Arc<Self>,
        d: &Digest,
        fetcher: impl FnOnce() -> Arc<dyn BlobFetcher>,
    ) -> io::Result<BlobSource> {
        let key = Key {
            kind: ObjectKind::Blob,
            digest: d.clone(),
        };
        let mut map = loop {
            if let Some((f, len)) = self.open_indexed(d).await? {
                return Ok(BlobSource::Cached(f, len));
            }
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(fill) = map.get(d) {
                return Ok(BlobSource::Filling {
                    fill: fill.clone(),
                    leader: false,
                });
            }
            // A fill commits (indexes its blob) before it leaves the map: one that left just
            // now is found by opening the file again. Otherwise this request starts the fill.
            if !self.index.contains(&key) {
                break map;
            }
        };
        let fill = Fill::new(d.clone(), fetcher());
        map.insert(d.clone(), fill.clone());
        drop(map);
        let this = self.clone();
        let f = fill.clone();
        tokio::spawn(async move {
            let result = this.run(&f).await;
            // Leave the map before announcing the end: later requests then find the
            // committed file (or start afresh after a failure).
            {
                let mut map = this.map.lock().unwrap_or_else(|p| p.into_inner());
                if map.get(&f.digest).is_some_and(|x| Arc::ptr_eq(x, &f)) {
                    map.remove(&f.digest);
                }
                this.settled.send_replace(map.len());
            }
            match result {
                Ok(Some(state)) => {
                    f.state.send_replace(state);
                }
                Ok(None) => {}
                Err(e) => {
                    if matches!(e, FillError::Upstream(UpstreamError::Offline { .. })) {
                        tracing::debug!(digest = %f.digest, "not in this mirror");
                    } else {
                        tracing::warn!(digest = %f.digest, error = %e, "fill failed");
                    }
                    *this
                        .stats
                        .failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry((e.reason(), e.upstream()))
                        .or_default() += 1;
                    f.state.send_replace(FillState::Failed(e));
                }
            }
        });
        Ok(BlobSource::Filling { fill, leader: true })
    }

    fn storage_failed(&self, digest: &Digest, what: &str, e: &dyn std::fmt::Display) {
        self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_warn.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(digest = %digest, error = %e, "{what}; serving from the origin without storing (logged at most once a minute)");
        }
    }

    async fn delete(&self, keys: Vec<Key>) {
        if keys.is_empty() {
            return;
        }
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for k in &keys {
                store.delete(k);
            }
        })
        .await;
    }

    /// Runs one fill. Returns the final state to publish (`None` when already published).
    async fn run(&self, fill: &Arc<Fill>) -> Result<Option<FillState>, FillError> {
        // Held until the fill ends: at most `max_concurrent` fills fetch at once.
        let _slot = self
            .queue
            .acquire()
            .await
            .map_err(|t| FillError::QueueTimeout { waited: t.waited })?;
        let fetched = fill.fetcher.fetch(0, None).await?;
        let from = fetched.from;
        let _ = fill.from.set(from);
        let total = fetched.total;
        let pass_through = |fetched: Fetched| {
            self.stats.pass_through.fetch_add(1, Ordering::Relaxed);
            *fill.handoff.lock().unwrap_or_else(|p| p.into_inner()) = Some(fetched);
            Ok(Some(FillState::PassThrough {
                total,
                available: 0,
            }))
        };
        let mut reservation = match self.index.reserve(total.unwrap_or(0)) {
            Ok((r, evicted)) => {
                self.delete(evicted).await;
                r
            }
            Err(e @ ReserveError::TooLarge { .. }) => {
                tracing::info!(digest = %fill.digest, reason = %e, "not storing blob");
                return pass_through(fetched);
            }
            Err(e) => {
                self.storage_failed(&fill.digest, "no disk budget", &e);
                return pass_through(fetched);
            }
        };
        let store = self.store.clone();
        let temp = tokio::task::spawn_blocking(move || store.temp_file())
            .await
            .map_err(|e| FillError::Internal(e.to_string()))?;
        let (file, temp) = match temp {
            Ok(x) => x,
            Err(e) => {
                self.storage_failed(&fill.digest, "cannot create a temp file", &e);
                return pass_through(fetched);
            }
        };
        let file = Arc::new(file);
        let _ = fill.file.set(file.clone());
        let mut guard = TempGuard(Some(temp));
        fill.state.send_replace(FillState::Running {
            total,
            available: 0,
        });

        let Fetched {
            upstream, mut body, ..
        } = fetched;
        // The disk side runs on its own blocking thread, fed through a bounded queue, so that
        // reading from the origin, writing, hashing and serving readers overlap.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        // Hashing runs on a second thread beside the writer: on a busy origin link the two
        // together cost about as much as the transfer itself, so they must not take turns.
        let (hash_tx, mut hash_rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let hasher_task = {
            let algorithm = fill.digest.algorithm();
            tokio::task::spawn_blocking(move || {
                let mut hasher = Hasher::new(algorithm);
                while let Some(data) = hash_rx.blocking_recv() {
                    hasher.update(&data);
                }
                hasher
            })
        };
        let writer = {
            let (file, fill) = (file.clone(), fill.clone());
            tokio::task::spawn_blocking(move || {
                let mut written: u64 = 0;
                while let Some(data) = rx.blocking_recv() {
                    if let Err(e) = file.write_all_at(&data, written) {
                        return Err((e, written));
                    }
                    let len = data.len() as u64;
                    fill.push_tail(written, data);
                    written += len;
                    // Hold back the final bytes until the digest is verified.
                    if total.is_none_or(|t| written < t) {
                        fill.state.send_replace(FillState::Running {
                            total,
                            available: written,
                        });
                    }
                }
                Ok(written)
            })
        };
        let mut queued: u64 = 0;
        let mut parts: Vec<Bytes> = Vec::new();
        let mut ended = false;
        // Once storage fails the fill stops; readers continue from the origin.
        let mut storage_failed = false;
        // An origin failure ends the fill, but only after the writer stopped: it must not
        // publish progress after the failure is announced.
        let mut failure: Option<FillError> = None;
        while !ended {
            match body.next().await {
                Some(Ok(chunk)) => parts.push(chunk),
                Some(Err(e)) => {
                    failure = Some(e.into());
                    break;
                }
                None => ended = true,
            }
            // Take whatever else has already arrived, without waiting: bytes that reached
            // berth are published to readers now, not when a full batch has gathered.
            let mut batched: usize = parts.iter().map(Bytes::len).sum();
            while !ended && batched < FILL_BATCH {
                match body.next().now_or_never() {
                    Some(Some(Ok(chunk))) => {
                        batched += chunk.len();
                        parts.push(chunk);
                    }
                    Some(Some(Err(e))) => {
                        failure = Some(e.into());
                        break;
                    }
                    Some(None) => ended = true,
                    None => break,
                }
            }
            if failure.is_some() || batched == 0 {
                break;
            }
            // One chunk goes on as it is; several are joined into one write.
            let data = if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                let mut joined = BytesMut::with_capacity(batched);
                for p in parts.drain(..) {
                    joined.extend_from_slice(&p);
                }
                joined.freeze()
            };
            let new_queued = queued + data.len() as u64;
            if total.is_some_and(|t| new_queued > t) {
                failure = Some(
                    UpstreamError::Invalid {
                        upstream: upstream.clone(),
                        reason: "body longer than its Content-Length".into(),
                    }
                    .into(),
                );
                break;
            }
            if new_queued > reservation.bytes() {
                match reservation.grow(new_queued - reservation.bytes()) {
                    Ok(evicted) => self.delete(evicted).await,
                    Err(e) => {
                        self.storage_failed(&fill.digest, "disk budget exhausted mid-fill", &e);
                        storage_failed = true;
                        break;
                    }
                }
            }
            if hash_tx.send(data.clone()).await.is_err() || tx.send(data).await.is_err() {
                // The writer stopped: a write failed.
                storage_failed = true;
                break;
            }
            queued = new_queued;
        }
        drop(tx);
        drop(hash_tx);
        let written_out = writer
            .await
            .map_err(|e| FillError::Internal(e.to_string()))?;
        let hasher = hasher_task
            .await
            .map_err(|e| FillError::Internal(e.to_string()))?;
        if let Some(e) = failure {
            return Err(e);
        }
        let written = match written_out {
            Ok(_) if storage_failed => {
                self.stats.pass_through.fetch_add(1, Ordering::Relaxed);
                // Everything queued was written: readers may read it from the file.
                return Ok(Some(FillState::PassThrough {
                    total,
                    available: queued.min(total.unwrap_or(u64::MAX).saturating_sub(1)),
                }));
            }
            Ok(x) => x,
            Err((e, written)) => {
                self.storage_failed(&fill.digest, "cache write failed", &e);
                self.stats.pass_through.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(FillState::PassThrough {
                    total,
                    available: written,
                }));
            }
        };
        if let Some(t) = total {
            if written != t {
                fill.fetcher.rejected(from);
                return Err(UpstreamError::Invalid {
                    upstream,
                    reason: format!("body ended after {written} of {t} bytes"),
                }
                .into());
            }
        }
        let actual = hasher.finish();
        if actual != fill.digest {
            fill.fetcher.rejected(from);
            return Err(UpstreamError::DigestMismatch {
                upstream,
                expected: fill.digest.to_string(),
                actual: actual.to_string(),
            }
            .into());
        }
        // Verified: readers get the last bytes now, not after the fsync below.
        fill.state.send_replace(FillState::Done { total: written });
        let store = self.store.clone();
        let digest = fill.digest.clone();
        let temp_path = guard.0.clone().expect("temp path present");
        let f = file.clone();
        let committed =
            tokio::task::spawn_blocking(move || store.commit_blob(&f, &temp_path, &digest))
                .await
                .map_err(|e| FillError::Internal(e.to_string()))?;
        match committed {
            Ok(()) => {
                guard.0 = None;
                let key = Key {
                    kind: ObjectKind::Blob,
                    digest: fill.digest.clone(),
                };
                let evicted = reservation.commit(key.clone(), written);
                if fill.late_hits.load(Ordering::Relaxed) > 0 {
                    self.index.touch(&key);
                }
                self.delete(evicted).await;
            }
            // The bytes are verified and readable through the open file: serve them all, keep
            // nothing.
            Err(e) => self.storage_failed(&fill.digest, "cache commit failed", &e),
        }
        fill.fetcher.verified(from);
        Ok(Some(FillState::Done { total: written }))
    }
}

/// Deletes a fill's temp file unless it was committed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
