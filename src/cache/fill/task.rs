//! A fill's own task (docs/ARCHITECTURE.md, "Cache"): wait for a fetch slot, fetch, reserve
//! disk budget, write and hash the bytes on two blocking threads as they arrive, verify the
//! digest, commit. Storage that fails or does not fit turns the fill into a pass-through.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{FetchError, FetchStream, Fetched, FetchedFrom, Fill, FillError, FillState, Fills};
use crate::cache::index::{Key, ObjectKind, Reservation, ReserveError};
use crate::oci::{Digest, Hasher};

/// Most bytes a fill gathers from the origin into one write (only what already arrived is
/// joined: a fill never waits to fill a batch).
const FILL_BATCH: usize = 256 * 1024;
/// Chunks queued between a fill and its disk writer (and its hasher). Chunks are at most
/// 256 KiB (FILL_BATCH here; the upstream client's read buffer, 128 KiB, for single chunks),
/// so with its tail a fill holds about 2 MiB of the blob in memory whatever the origin's speed.
const WRITE_QUEUE: usize = 4;
/// How often a storage failure is logged at most.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

// === impl Fills ===

impl Fills {
    /// Runs one fill. Returns the final state to publish (`None` when already published).
    pub(super) async fn run(&self, fill: &Arc<Fill>) -> Result<Option<FillState>, FillError> {
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
        let Some(mut storage) = self.prepare(fill, total).await? else {
            return Ok(Some(self.hand_off(fill, fetched)));
        };
        fill.state.send_replace(FillState::Running {
            total,
            available: 0,
        });
        let Fetched {
            source, mut body, ..
        } = fetched;
        let disk = DiskSide::start(fill, &storage.file, total);
        let copied = self
            .copy(
                fill,
                &mut body,
                total,
                &mut storage.reservation,
                &disk,
                &source,
            )
            .await;
        let (wrote, hasher) = disk.finish().await?;
        if let Some(e) = copied.failure {
            return Err(e);
        }
        let written = match self.written(fill, total, &copied, wrote) {
            Ok(written) => written,
            Err(pass_through) => return Ok(Some(pass_through)),
        };
        verify(fill, from, source, total, written, hasher)?;
        // Verified: readers get the last bytes now, not after the fsync below.
        fill.state.send_replace(FillState::Done { total: written });
        self.commit(fill, storage, written).await?;
        fill.fetcher.verified(from);
        Ok(Some(FillState::Done { total: written }))
    }

    /// Publishes how a fill ended to its waiters; a failure is logged and counted by reason and
    /// source.
    pub(super) fn announce(&self, fill: &Fill, result: Result<Option<FillState>, FillError>) {
        match result {
            Ok(Some(state)) => {
                fill.state.send_replace(state);
            }
            Ok(None) => {}
            Err(e) => {
                if e.is_offline() {
                    tracing::debug!(digest = %fill.digest, "not in this mirror");
                } else {
                    tracing::warn!(digest = %fill.digest, error = %e, "fill failed");
                }
                *self
                    .stats
                    .failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry((e.reason(), e.source_name().to_owned()))
                    .or_default() += 1;
                fill.state.send_replace(FillState::Failed(e));
            }
        }
    }

    /// Reserves disk budget for the blob (`total` bytes, when the source said) and opens a temp
    /// file for it. `None` when the blob will not be stored: too large for the budget, no budget
    /// left, or no temp file.
    async fn prepare(&self, fill: &Fill, total: Option<u64>) -> Result<Option<Storage>, FillError> {
        let reservation = match self.index.reserve(total.unwrap_or(0)) {
            Ok((r, evicted)) => {
                self.delete(evicted).await;
                r
            }
            Err(e @ ReserveError::TooLarge { .. }) => {
                tracing::info!(digest = %fill.digest, reason = %e, "not storing blob");
                return Ok(None);
            }
            Err(e) => {
                self.storage_failed(&fill.digest, "no disk budget", &e);
                return Ok(None);
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
                return Ok(None);
            }
        };
        let file = Arc::new(file);
        let _ = fill.file.set(file.clone());
        Ok(Some(Storage {
            reservation,
            file,
            temp: TempGuard(Some(temp)),
        }))
    }

    /// The fill does not store the blob: counted, and the source's body is handed to the first
    /// reader, which continues from it instead of opening another request.
    fn hand_off(&self, fill: &Fill, fetched: Fetched) -> FillState {
        self.stats.pass_through.fetch_add(1, Ordering::Relaxed);
        let total = fetched.total;
        *fill.handoff.lock().unwrap_or_else(|p| p.into_inner()) = Some(fetched);
        FillState::PassThrough {
            total,
            available: 0,
        }
    }

    /// Copies the source's body to the disk side, batch by batch, growing the reservation as
    /// bytes exceed it. Stops at the body's end, when the source fails or sends more than it
    /// said, or when storage fails.
    async fn copy(
        &self,
        fill: &Fill,
        body: &mut FetchStream,
        total: Option<u64>,
        reservation: &mut Reservation,
        disk: &DiskSide,
        source: &str,
    ) -> Copied {
        let mut copied = Copied {
            queued: 0,
            storage_failed: false,
            failure: None,
        };
        loop {
            let (data, last) = match next_batch(body).await {
                Batch::Data { data, last } => (data, last),
                Batch::End => break,
                Batch::Failed(e) => {
                    copied.failure = Some(e.into());
                    break;
                }
            };
            let queued = copied.queued + data.len() as u64;
            if total.is_some_and(|t| queued > t) {
                copied.failure = Some(FillError::WrongLength {
                    source_name: source.to_owned(),
                    reason: "body longer than its Content-Length".into(),
                });
                break;
            }
            if queued > reservation.bytes() {
                match reservation.grow(queued - reservation.bytes()) {
                    Ok(evicted) => self.delete(evicted).await,
                    Err(e) => {
                        self.storage_failed(&fill.digest, "disk budget exhausted mid-fill", &e);
                        copied.storage_failed = true;
                        break;
                    }
                }
            }
            if !disk.send(data).await {
                // The writer stopped: a write failed.
                copied.storage_failed = true;
                break;
            }
            copied.queued = queued;
            if last {
                break;
            }
        }
        copied
    }

    /// How many bytes the file holds once the disk side finished, or the pass-through state to
    /// publish when storage failed (readers read what was written, then continue from the
    /// source).
    fn written(
        &self,
        fill: &Fill,
        total: Option<u64>,
        copied: &Copied,
        wrote: Result<u64, (io::Error, u64)>,
    ) -> Result<u64, FillState> {
        match wrote {
            Ok(_) if copied.storage_failed => {
                self.stats.pass_through.fetch_add(1, Ordering::Relaxed);
                // Everything queued was written: readers may read it from the file.
                Err(FillState::PassThrough {
                    total,
                    available: copied
                        .queued
                        .min(total.unwrap_or(u64::MAX).saturating_sub(1)),
                })
            }
            Ok(written) => Ok(written),
            Err((e, written)) => {
                self.storage_failed(&fill.digest, "cache write failed", &e);
                self.stats.pass_through.fetch_add(1, Ordering::Relaxed);
                Err(FillState::PassThrough {
                    total,
                    available: written,
                })
            }
        }
    }

    /// Moves the verified temp file into place and indexes it. A failed commit keeps nothing;
    /// readers still read the bytes through the open file.
    async fn commit(
        &self,
        fill: &Fill,
        mut storage: Storage,
        written: u64,
    ) -> Result<(), FillError> {
        let store = self.store.clone();
        let digest = fill.digest.clone();
        let temp_path = storage.temp.0.clone().expect("temp path present");
        let f = storage.file.clone();
        let committed =
            tokio::task::spawn_blocking(move || store.commit_blob(&f, &temp_path, &digest))
                .await
                .map_err(|e| FillError::Internal(e.to_string()))?;
        match committed {
            Ok(()) => {
                storage.temp.0 = None;
                let key = Key {
                    kind: ObjectKind::Blob,
                    digest: fill.digest.clone(),
                };
                let evicted = storage.reservation.commit(key.clone(), written);
                if fill.late_hits.load(Ordering::Relaxed) > 0 {
                    self.index.touch(&key);
                }
                self.delete(evicted).await;
            }
            // The bytes are verified and readable through the open file: serve them all, keep
            // nothing.
            Err(e) => self.storage_failed(&fill.digest, "cache commit failed", &e),
        }
        Ok(())
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
}

/// Checks the fill's bytes against the length the source said and the digest. Bytes that fail
/// are rejected (the fetcher is told which source sent them).
fn verify(
    fill: &Fill,
    from: FetchedFrom,
    source: String,
    total: Option<u64>,
    written: u64,
    hasher: Hasher,
) -> Result<(), FillError> {
    if let Some(t) = total {
        if written != t {
            fill.fetcher.rejected(from);
            return Err(FillError::WrongLength {
                source_name: source,
                reason: format!("body ended after {written} of {t} bytes"),
            });
        }
    }
    let actual = hasher.finish();
    if actual != fill.digest {
        fill.fetcher.rejected(from);
        return Err(FillError::DigestMismatch {
            source_name: source,
            expected: fill.digest.clone(),
            actual,
        });
    }
    Ok(())
}

/// Where a fill that stores its blob writes it: its share of the budget and its temp file.
struct Storage {
    reservation: Reservation,
    file: Arc<File>,
    temp: TempGuard,
}

/// How copying the source's body ended.
struct Copied {
    /// Bytes queued for the disk side (all written, unless a write failed).
    queued: u64,
    /// Storage failed (budget or a write): the fill stops, readers continue from the source.
    storage_failed: bool,
    /// The source failed or sent more than it said. Announced only after the writer stopped: it
    /// must not publish progress after the failure.
    failure: Option<FillError>,
}

/// What the source gave for one write.
enum Batch {
    /// Bytes to write; `last` when the body ended after them.
    Data { data: Bytes, last: bool },
    /// The body ended.
    End,
    /// The source failed; what this batch had gathered is dropped.
    Failed(FetchError),
}

/// The next write: one chunk (waited for), joined with whatever else has already arrived, up
/// to [`FILL_BATCH`], without waiting: bytes that reached berth are published to readers now,
/// not when a full batch has gathered.
async fn next_batch(body: &mut FetchStream) -> Batch {
    let mut parts: Vec<Bytes> = Vec::new();
    match body.next().await {
        Some(Ok(chunk)) => parts.push(chunk),
        Some(Err(e)) => return Batch::Failed(e),
        None => return Batch::End,
    }
    let mut batched: usize = parts[0].len();
    let mut last = false;
    while batched < FILL_BATCH {
        match body.next().now_or_never() {
            Some(Some(Ok(chunk))) => {
                batched += chunk.len();
                parts.push(chunk);
            }
            Some(Some(Err(e))) => return Batch::Failed(e),
            Some(None) => {
                last = true;
                break;
            }
            None => break,
        }
    }
    if batched == 0 {
        return Batch::End;
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
    Batch::Data { data, last }
}

/// The disk side of a fill: a writer and a hasher, each on its own blocking thread and fed
/// through a bounded queue, so that reading from the source, writing, hashing and serving
/// readers overlap. (On a busy origin link writing and hashing together cost about as much as
/// the transfer itself, so they must not take turns.)
struct DiskSide {
    to_writer: mpsc::Sender<Bytes>,
    to_hasher: mpsc::Sender<Bytes>,
    /// Bytes written, or the write error and the bytes written before it.
    writer: JoinHandle<Result<u64, (io::Error, u64)>>,
    hasher: JoinHandle<Hasher>,
}

impl DiskSide {
    /// Starts both threads. The writer publishes each batch to the fill's readers once it is in
    /// the file, holding back the final bytes until the digest is verified.
    fn start(fill: &Arc<Fill>, file: &Arc<File>, total: Option<u64>) -> DiskSide {
        let (to_writer, mut rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let (to_hasher, mut hash_rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let hasher = {
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
        DiskSide {
            to_writer,
            to_hasher,
            writer,
            hasher,
        }
    }

    /// Queues `data` for the hasher and the writer; false when the writer stopped (a write
    /// failed).
    async fn send(&self, data: Bytes) -> bool {
        self.to_hasher.send(data.clone()).await.is_ok() && self.to_writer.send(data).await.is_ok()
    }

    /// Closes the queues and waits for both threads: what the writer wrote, and the hash.
    async fn finish(self) -> Result<(Result<u64, (io::Error, u64)>, Hasher), FillError> {
        let DiskSide {
            to_writer,
            to_hasher,
            writer,
            hasher,
        } = self;
        drop(to_writer);
        drop(to_hasher);
        let wrote = writer
            .await
            .map_err(|e| FillError::Internal(e.to_string()))?;
        let hasher = hasher
            .await
            .map_err(|e| FillError::Internal(e.to_string()))?;
        Ok((wrote, hasher))
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
