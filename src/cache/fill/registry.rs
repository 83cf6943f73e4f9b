//! The fills in progress, at most one per digest (docs/ARCHITECTURE.md, "Cache"): a request
//! finds the blob on disk, joins the fill of its digest, or starts one in its own task.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::{BlobFetcher, Fill, FillStats};
use crate::cache::index::{DiskIndex, Key, ObjectKind};
use crate::cache::queue::{FillLimits, FillObserver, FillQueue};
use crate::cache::store::DiskStore;
use crate::oci::Digest;

/// What the disk holds for a blob the index may name.
pub(crate) enum Committed {
    /// Its file, opened, and its length.
    File(File, u64),
    /// Indexed, but the file is gone (deleted behind berth's back).
    Gone,
    /// Not indexed, or a file of the wrong size (now dropped).
    Absent,
}

/// A committed blob or a fill to read from.
pub enum BlobRead {
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
    pub(super) store: Arc<DiskStore>,
    pub(super) index: Arc<DiskIndex>,
    map: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// Fills in progress, republished whenever one ends (committed or failed).
    settled: watch::Sender<usize>,
    pub(super) stats: Arc<FillStats>,
    /// When a storage failure was last logged.
    pub(super) last_warn: Mutex<Option<Instant>>,
    /// Slots for fetching from origins.
    pub(super) queue: FillQueue,
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
        Ok(match self.open_committed(&key).await? {
            Committed::File(f, len) => {
                self.index.touch(&key);
                Some((f, len))
            }
            Committed::Gone => {
                self.index.remove(&key);
                None
            }
            Committed::Absent => None,
        })
    }

    /// Blob `key`'s committed file, opened on the blocking pool, if the index has it at the
    /// size it recorded (a file of another size is dropped as stale and reported absent).
    pub(crate) async fn open_committed(&self, key: &Key) -> io::Result<Committed> {
        if !self.index.contains(key) {
            return Ok(Committed::Absent);
        }
        let (store, digest) = (self.store.clone(), key.digest.clone());
        let opened = tokio::task::spawn_blocking(move || store.open_blob(&digest))
            .await
            .map_err(io::Error::other)??;
        Ok(match opened {
            Some((_, len)) if self.index.size_of(key) != Some(len) => {
                self.stale_size(key, len);
                Committed::Absent
            }
            Some((f, len)) => Committed::File(f, len),
            None => Committed::Gone,
        })
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
    ) -> io::Result<BlobRead> {
        let key = Key {
            kind: ObjectKind::Blob,
            digest: d.clone(),
        };
        let mut map = loop {
            if let Some((f, len)) = self.open_indexed(d).await? {
                return Ok(BlobRead::Cached(f, len));
            }
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(fill) = map.get(d) {
                return Ok(BlobRead::Filling {
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
        let (this, f) = (self.clone(), fill.clone());
        tokio::spawn(async move {
            let result = this.run(&f).await;
            // Leave the map before announcing the end: later requests then find the
            // committed file (or start afresh after a failure).
            this.leave(&f);
            this.announce(&f, result);
        });
        Ok(BlobRead::Filling { fill, leader: true })
    }

    /// Removes an ended fill from the map (unless another one replaced it) and tells those
    /// waiting for fills to settle.
    fn leave(&self, fill: &Arc<Fill>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&fill.digest).is_some_and(|x| Arc::ptr_eq(x, fill)) {
            map.remove(&fill.digest);
        }
        self.settled.send_replace(map.len());
    }
}
