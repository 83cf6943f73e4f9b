//! One fill per digest (DESIGN §4): the first request for a missing blob starts a single
//! upstream fetch in its own task; it and every later request for the same digest read the
//! growing temp file as bytes land. The last bytes are published only after the digest checked
//! out, so no client ever receives a complete-looking body with wrong bytes.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use super::store::DiskStore;
use crate::oci::{Digest, Hasher};
use crate::upstream::UpstreamError;

/// Size of the reads and writes a fill and its readers make.
pub const CHUNK: usize = 256 * 1024;

/// Why a fill failed; shared by every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The origin failed or sent bad bytes.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The disk failed.
    #[error("cache write failed: {0}")]
    Io(String),
}

/// Where a fill stands, as every waiter sees it.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for the origin's answer.
    Starting,
    /// Bytes are landing; `available` of them may be read.
    Running {
        /// The blob's length, when the origin said.
        total: Option<u64>,
        /// Bytes readers may read now.
        available: u64,
    },
    /// Verified and committed.
    Done {
        /// The blob's length.
        total: u64,
    },
    /// Failed; nothing was stored.
    Failed(FillError),
}

/// A fill in progress.
pub struct Fill {
    state: watch::Sender<FillState>,
    file: OnceLock<Arc<File>>,
}

/// What the origin answered for a blob GET: its length if known and its body.
pub struct Fetched {
    /// Content-Length.
    pub total: Option<u64>,
    /// Upstream name, for error messages.
    pub upstream: String,
    /// The body, chunk by chunk.
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>,
}

// === impl Fill ===

impl Fill {
    fn new() -> Arc<Fill> {
        Arc::new(Fill {
            state: watch::channel(FillState::Starting).0,
            file: OnceLock::new(),
        })
    }

    /// Waits for the origin's answer: the blob's length (if known) once bytes flow, or the
    /// failure. Returns at once for fills that already ended.
    pub async fn ready(&self) -> Result<Option<u64>, FillError> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Starting => {}
                FillState::Running { total, .. } => return Ok(*total),
                FillState::Done { total } => return Ok(Some(*total)),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Io("fill abandoned".into()));
            }
        }
    }

    /// Waits for the fill to end and gives its length once it is known and everything landed.
    pub async fn finished(&self) -> Result<u64, FillError> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Done { total } => return Ok(*total),
                FillState::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Io("fill abandoned".into()));
            }
        }
    }

    /// A body reading bytes `start..end` (`end` = the blob's end when `None`) as they land.
    pub fn reader(self: &Arc<Self>, start: u64, end: Option<u64>) -> io::Result<BlobStream> {
        let file = self
            .file
            .get()
            .cloned()
            .ok_or_else(|| io::Error::other("fill has no file yet"))?;
        Ok(read_range(file, start, end, Some(self.state.subscribe())))
    }
}

/// A stream of a blob's bytes, in [`CHUNK`]-sized frames.
pub type BlobStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Reads `start..end` of `file`; with `progress`, waits for bytes of a fill as they land and
/// fails if the fill fails.
pub fn read_range(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    progress: Option<watch::Receiver<FillState>>,
) -> BlobStream {
    struct R {
        file: Arc<File>,
        offset: u64,
        end: Option<u64>,
        progress: Option<watch::Receiver<FillState>>,
        failed: bool,
    }
    let init = R {
        file,
        offset: start,
        end,
        progress,
        failed: false,
    };
    futures_util::stream::unfold(init, |mut r| async move {
        if r.failed {
            return None;
        }
        let limit = loop {
            if r.end.is_some_and(|e| r.offset >= e) {
                return None;
            }
            let Some(rx) = r.progress.as_mut() else {
                break r.end.expect("a finished read knows its end");
            };
            let state = rx.borrow_and_update().clone();
            match state {
                FillState::Done { total } => {
                    r.end = Some(r.end.map_or(total, |e| e.min(total)));
                    r.progress = None;
                }
                FillState::Failed(e) => {
                    r.failed = true;
                    return Some((Err(io::Error::other(e.to_string())), r));
                }
                FillState::Running { available, .. } if available > r.offset => {
                    break r.end.map_or(available, |e| e.min(available));
                }
                _ => {
                    if rx.changed().await.is_err() {
                        r.failed = true;
                        return Some((Err(io::Error::other("fill abandoned")), r));
                    }
                }
            }
        };
        let len = (limit - r.offset).min(CHUNK as u64) as usize;
        let file = r.file.clone();
        let offset = r.offset;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(len);
            file.read_exact_at(&mut buf, offset)?;
            Ok::<_, io::Error>(buf.freeze())
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match read {
            Ok(b) => {
                r.offset += b.len() as u64;
                Some((Ok(b), r))
            }
            Err(e) => {
                r.failed = true;
                Some((Err(e), r))
            }
        }
    })
    .boxed()
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
    map: Mutex<HashMap<Digest, Arc<Fill>>>,
}

// === impl Fills ===

impl Fills {
    /// No fills yet.
    pub fn new(store: Arc<DiskStore>) -> Arc<Fills> {
        Arc::new(Fills {
            store,
            map: Mutex::new(HashMap::new()),
        })
    }

    /// Number of fills in progress.
    pub fn in_flight(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The fill in progress for `d`, if any.
    pub fn get(&self, d: &Digest) -> Option<Arc<Fill>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .cloned()
    }

    /// The blob from disk, or a fill to read: an existing one, or a new one that runs `fetch`
    /// in its own task (so it completes even if this client goes away).
    pub fn blob_or_fill<Fut>(
        self: &Arc<Self>,
        d: &Digest,
        fetch: impl FnOnce() -> Fut,
    ) -> io::Result<BlobSource>
    where
        Fut: Future<Output = Result<Fetched, UpstreamError>> + Send + 'static,
    {
        if let Some((f, len)) = self.store.open_blob(d)? {
            return Ok(BlobSource::Cached(f, len));
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fill) = map.get(d) {
            return Ok(BlobSource::Filling {
                fill: fill.clone(),
                leader: false,
            });
        }
        // Re-check under the lock: a fill may have committed and left the map just now.
        if let Some((f, len)) = self.store.open_blob(d)? {
            return Ok(BlobSource::Cached(f, len));
        }
        let fill = Fill::new();
        map.insert(d.clone(), fill.clone());
        drop(map);
        let fut = fetch();
        let this = self.clone();
        let digest = d.clone();
        let f = fill.clone();
        tokio::spawn(async move {
            let result = this.run(&digest, &f, fut).await;
            // Remove the entry before announcing the end: later requests then find the
            // committed file (or start afresh after a failure).
            {
                let mut map = this.map.lock().unwrap_or_else(|p| p.into_inner());
                if map.get(&digest).is_some_and(|x| Arc::ptr_eq(x, &f)) {
                    map.remove(&digest);
                }
            }
            match result {
                Ok(total) => f.state.send_replace(FillState::Done { total }),
                Err(e) => {
                    tracing::warn!(digest = %digest, error = %e, "fill failed");
                    f.state.send_replace(FillState::Failed(e))
                }
            };
        });
        Ok(BlobSource::Filling { fill, leader: true })
    }

    async fn run(
        &self,
        d: &Digest,
        fill: &Fill,
        fetch: impl Future<Output = Result<Fetched, UpstreamError>>,
    ) -> Result<u64, FillError> {
        let Fetched {
            total,
            upstream,
            mut body,
        } = fetch.await?;
        let store = self.store.clone();
        let (file, temp) = tokio::task::spawn_blocking(move || store.temp_file())
            .await
            .map_err(|e| FillError::Io(e.to_string()))?
            .map_err(|e| FillError::Io(e.to_string()))?;
        let file = Arc::new(file);
        let _ = fill.file.set(file.clone());
        let guard = TempGuard(Some(temp.clone()));
        fill.state.send_replace(FillState::Running {
            total,
            available: 0,
        });
        let mut hasher = Some(Hasher::new(d.algorithm()));
        let mut written: u64 = 0;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut ended = false;
        while !ended {
            match body.next().await {
                Some(chunk) => buf.extend_from_slice(&chunk?),
                None => ended = true,
            }
            if buf.len() < CHUNK && !ended {
                continue;
            }
            if buf.is_empty() {
                break;
            }
            let data = buf.split().freeze();
            let new_written = written + data.len() as u64;
            if total.is_some_and(|t| new_written > t) {
                return Err(UpstreamError::Invalid {
                    upstream: upstream.clone(),
                    reason: "body longer than its Content-Length".into(),
                }
                .into());
            }
            let f = file.clone();
            let mut h = hasher.take().expect("hasher is returned after each write");
            let at = written;
            hasher = Some(
                tokio::task::spawn_blocking(move || {
                    f.write_all_at(&data, at)?;
                    h.update(&data);
                    Ok::<_, io::Error>(h)
                })
                .await
                .map_err(|e| FillError::Io(e.to_string()))?
                .map_err(|e| FillError::Io(e.to_string()))?,
            );
            written = new_written;
            // Hold back the final bytes until the digest is verified.
            if total.is_none_or(|t| written < t) {
                fill.state.send_replace(FillState::Running {
                    total,
                    available: written,
                });
            }
        }
        if let Some(t) = total {
            if written != t {
                return Err(UpstreamError::Invalid {
                    upstream: upstream.clone(),
                    reason: format!("body ended after {written} of {t} bytes"),
                }
                .into());
            }
        }
        let actual = hasher.take().expect("hasher present").finish();
        if actual != *d {
            return Err(UpstreamError::DigestMismatch {
                upstream: upstream.clone(),
                expected: d.to_string(),
                actual: actual.to_string(),
            }
            .into());
        }
        let store = self.store.clone();
        let digest = d.clone();
        let mut guard = guard;
        let temp_path = guard.0.take().expect("temp path present");
        let f = file.clone();
        let committed =
            tokio::task::spawn_blocking(move || store.commit_blob(&f, &temp_path, &digest))
                .await
                .map_err(|e| FillError::Io(e.to_string()))?;
        if let Err(e) = committed {
            let _ = std::fs::remove_file(&temp);
            return Err(FillError::Io(e.to_string()));
        }
        Ok(written)
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
