//! A fill's own task (docs/ARCHITECTURE.md, "Cache"): wait for a fetch slot, fetch, reserve
//! disk budget, write and hash the bytes on two blocking threads as they arrive, verify the
//! digest, commit. Storage that fails or does not fit turns the fill into a pass-through.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};

use super::{Fetched, Fill, FillError, FillState, Fills};
use crate::cache::index::{Key, ObjectKind, ReserveError};
use crate::oci::{Digest, Hasher};
use crate::upstream::UpstreamError;

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
