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
                    read_at(file, self.offset, chunk_len(self.offset, limit)).await?
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
                    let b = read_at(file.clone(), at, chunk_len(at, self.offset)).await?;
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

/// Bytes at `offset` (at most `len`): what the page cache holds right now is read on this
/// thread; otherwise the read runs on the blocking pool.
async fn read_at(file: Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
    match read_cached(&file, offset, len) {
        Some(b) => Ok(b),
        None => joined(on_pool(file, offset, len)).await,
    }
}

/// A read on the blocking pool of a file's chunk.
type Pending = tokio::task::JoinHandle<io::Result<Bytes>>;

/// Starts reading `len` bytes at `offset` on the blocking pool.
fn on_pool(file: Arc<File>, offset: u64, len: usize) -> Pending {
    tokio::task::spawn_blocking(move || read_chunk(&file, offset, len))
}

/// The bytes of a read started with [`on_pool`].
async fn joined(pending: Pending) -> io::Result<Bytes> {
    pending.await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Reads `start..end` of a committed file. Cached bytes are read in place, without a trip to
/// the blocking pool (a hot blob is served by the worker alone); a chunk the page cache does
/// not hold is read on the blocking pool, one chunk ahead, while the one before it is written
/// to the client.
pub fn read_file_range(file: Arc<File>, start: u64, end: u64) -> BlobStream {
    futures_util::stream::unfold(
        (file, start, None::<Pending>),
        move |(file, offset, pending)| async move {
            let len = chunk_len(offset, end);
            let read = match pending {
                Some(p) => joined(p).await,
                None if len == 0 => return None,
                None => match read_cached(&file, offset, len) {
                    // Hot: the next chunk is read in place too, when it is wanted.
                    Some(b) => {
                        let next = offset + b.len() as u64;
                        return Some((Ok(b), (file, next, None)));
                    }
                    None => joined(on_pool(file.clone(), offset, len)).await,
                },
            };
            match read {
                // Cold: keep the disk busy while this chunk goes out.
                Ok(b) => {
                    let next = offset + b.len() as u64;
                    let pending =
                        (next < end).then(|| on_pool(file.clone(), next, chunk_len(next, end)));
                    Some((Ok(b), (file, next, pending)))
                }
                Err(e) => Some((Err(e), (file, end, None))),
            }
        },
    )
    .boxed()
}

/// The length of the chunk at `offset` of a range ending at `end`: [`CHUNK`] or what is left.
fn chunk_len(offset: u64, end: u64) -> usize {
    end.saturating_sub(offset).min(CHUNK as u64) as usize
}

/// Up to `len` (at most [`CHUNK`]) bytes at `offset`, if the page cache holds them: read
/// with `preadv2(RWF_NOWAIT)`, which never waits for the disk. `None` when nothing could be
/// read that way (not cached, end of file, an error, or a kernel or file system without the
/// flag); the caller then reads on the blocking pool, which reports any error.
#[cfg(target_os = "linux")]
fn read_cached(file: &File, offset: u64, len: usize) -> Option<Bytes> {
    use rustix::io::{Errno, ReadWriteFlags};
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Set once the kernel or file system refused the flag: no point asking again.
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    debug_assert!(len <= CHUNK);
    if len == 0 || UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let mut buf = crate::cache::readbuf::take();
    let read = rustix::io::preadv2(
        file,
        &mut [io::IoSliceMut::new(&mut buf[..len])],
        offset,
        ReadWriteFlags::NOWAIT,
    );
    match read {
        Ok(n) if n > 0 => Some(crate::cache::readbuf::freeze(buf, n)),
        other => {
            if let Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) = other {
                UNSUPPORTED.store(true, Ordering::Relaxed);
            }
            crate::cache::readbuf::give_back(buf);
            None
        }
    }
}

/// Without `RWF_NOWAIT`, every read goes to the blocking pool.
#[cfg(not(target_os = "linux"))]
fn read_cached(_file: &File, _offset: u64, _len: usize) -> Option<Bytes> {
    None
}

/// Reads `len` (at most [`CHUNK`]) bytes at `offset` into a pooled buffer; blocking.
fn read_chunk(file: &File, offset: u64, len: usize) -> io::Result<Bytes> {
    debug_assert!(len <= CHUNK);
    let mut buf = crate::cache::readbuf::take();
    file.read_exact_at(&mut buf[..len], offset)?;
    Ok(crate::cache::readbuf::freeze(buf, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A temp file of `len` bytes of a pattern that differs at every chunk boundary.
    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f.flush().unwrap();
        (f, bytes)
    }

    async fn collect(s: BlobStream) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn ranges_read_back_exactly() {
        let len = 3 * CHUNK + 123;
        let (f, bytes) = file_of(len);
        let file = Arc::new(File::open(f.path()).unwrap());
        for (start, end) in [
            (0, len),
            (1, len - 1),
            (CHUNK - 1, CHUNK + 1),
            (2 * CHUNK, 3 * CHUNK),
            (len - 1, len),
            (17, 17),
        ] {
            let got = collect(read_file_range(file.clone(), start as u64, end as u64))
                .await
                .unwrap();
            assert!(got == bytes[start..end], "range {start}..{end}");
        }
    }

    #[test]
    fn a_cached_read_is_a_true_prefix_or_nothing() {
        let (f, bytes) = file_of(CHUNK + 5);
        let file = File::open(f.path()).unwrap();
        for offset in [0, 1, CHUNK, CHUNK + 4] {
            let len = (bytes.len() - offset).min(CHUNK);
            if let Some(b) = read_cached(&file, offset as u64, len) {
                assert!(!b.is_empty() && b.len() <= len);
                assert!(b[..] == bytes[offset..offset + b.len()], "offset {offset}");
            }
        }
        assert!(read_cached(&file, bytes.len() as u64, CHUNK).is_none());
    }

    /// Pages dropped from the page cache (where the file system honours it; tmpfs does not)
    /// send the reads to the blocking pool, one chunk ahead, with the same bytes.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn bytes_only_on_disk_read_back_exactly() {
        let len = 4 * CHUNK + 7;
        let (f, bytes) = file_of(len);
        f.as_file().sync_all().unwrap();
        for (start, end) in [(0, len), (CHUNK + 3, len - 2)] {
            rustix::fs::fadvise(f.as_file(), 0, None, rustix::fs::Advice::DontNeed).unwrap();
            let file = Arc::new(File::open(f.path()).unwrap());
            let got = collect(read_file_range(file, start as u64, end as u64))
                .await
                .unwrap();
            assert!(got == bytes[start..end], "range {start}..{end}");
        }
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_range_fails_the_body() {
        let (f, bytes) = file_of(2 * CHUNK);
        let file = Arc::new(File::open(f.path()).unwrap());
        f.as_file().set_len(CHUNK as u64 + 10).unwrap();
        let err = collect(read_file_range(file, 0, bytes.len() as u64))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
