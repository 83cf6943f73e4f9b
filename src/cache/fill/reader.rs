//! Bodies read from a fill as its bytes land, continued from the source when the fill stops
//! storing (pass-through), and from committed files one chunk ahead (docs/ARCHITECTURE.md,
//! "Cache").

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use super::{FetchStream, Fill, FillState, FillStats, CHUNK};
use crate::oci::Hasher;

/// A stream of a blob's bytes, in [`CHUNK`]-sized frames; an error aborts the response.
pub type BlobStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

// === impl Fill ===

impl Fill {
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
            source: String::new(),
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
    Source(FetchStream),
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
    /// The name of the source a pass-through read continues from.
    source: String,
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
                Phase::Source(_) => return self.next_from_source().await,
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
                        self.switch_to_source().await?;
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
    async fn switch_to_source(&mut self) -> io::Result<()> {
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
        self.source = fetched.source;
        self.phase = Phase::Source(fetched.body);
        Ok(())
    }

    async fn next_from_source(&mut self) -> io::Result<Option<Bytes>> {
        let Phase::Source(body) = &mut self.phase else {
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
                            .entry(("digest_mismatch", self.source.clone()))
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
    let mut buf = crate::cache::readbuf::take();
    file.read_exact_at(&mut buf[..len], offset)?;
    Ok(crate::cache::readbuf::freeze(buf, len))
}
