//! The cache (docs/ARCHITECTURE.md, "Cache"): content-addressed manifests and blobs in a memory and a disk tier,
//! tag mappings with a freshness lifetime, and one fill per missing blob. It knows nothing of
//! HTTP routing; the proxy hands it digests and a way to fetch.
//!
//! File access stays off the async workers on request paths: the `async` methods answer a
//! memory hit at once and run every read, open, scan or write on the blocking pool. The plain
//! (blocking) methods are for startup and the commands that own the cache directory.
//!
//! This file is the facade, [`Cache`], and its lookups; opening the directory is in `open.rs`,
//! its lock in `lock.rs`, pinning in `pins.rs`, purging in `purge.rs`, scrubbing in `scrub.rs`.

pub mod fill;
pub mod index;
mod lock;
pub mod membership;
pub mod memory;
mod open;
pub mod pins;
pub mod purge;
pub mod queue;
pub mod readbuf;
pub mod scrub;
pub mod store;
pub mod tags;

use std::io;
use std::sync::Arc;

use bytes::Bytes;

pub use fill::{
    BlobFetcher, BlobRead, BlobStream, FetchError, FetchFailure, Fetched, Fill, FillError,
    FillStats, Fills,
};
pub use index::{DiskIndex, Key, ObjectKind, PinError, Usage};
pub use membership::Memberships;
pub use pins::PinnedImage;
pub use purge::{PurgeError, PurgeReport, PurgeStats};
pub use queue::{FillLimits, FillObserver};
pub use scrub::{CorruptionStats, Finding, ScrubError, ScrubOptions, ScrubReport};
pub use store::{DiskStore, StoredManifest, WriteFault};
pub use tags::{accept_key, TagEntry, TagKey, TagStore, Validity};

use crate::oci::Digest;

/// Which tier answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The memory tier.
    Memory,
    /// The disk tier.
    Disk,
}

impl Tier {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
        }
    }
}

/// Both tiers, the tag mappings and the fills.
pub struct Cache {
    /// Held for the cache's lifetime: one process per cache directory.
    _lock: lock::DirLock,
    pins: std::sync::Mutex<Vec<PinnedImage>>,
    store: Arc<DiskStore>,
    index: Arc<DiskIndex>,
    memory: memory::MemoryTier,
    tags: TagStore,
    fills: Arc<Fills>,
    memberships: Arc<Memberships>,
    corruption: CorruptionStats,
    purged: PurgeStats,
}

impl Cache {
    /// Tag mappings.
    pub fn tags(&self) -> &TagStore {
        &self.tags
    }

    /// Which digests each upstream's origin showed in which repository (the evidence the
    /// authorizer requires before serving cached bytes under a repository).
    pub fn memberships(&self) -> &Arc<Memberships> {
        &self.memberships
    }

    /// Fills in progress.
    pub fn fills(&self) -> &Arc<Fills> {
        &self.fills
    }

    /// The disk tier.
    pub fn store(&self) -> &Arc<DiskStore> {
        &self.store
    }

    /// The disk tier's index.
    pub fn index(&self) -> &Arc<DiskIndex> {
        &self.index
    }

    /// The memory tier.
    pub fn memory(&self) -> &memory::MemoryTier {
        &self.memory
    }

    /// Saves the disk index's recency order if it changed (so a restart keeps the hot set).
    pub fn save_recency(&self) -> io::Result<()> {
        if !self.index.is_dirty() {
            return Ok(());
        }
        self.store.write_recency(&self.index.snapshot())
    }

    /// A manifest by digest from memory, else disk (promoted to memory). Blocking on a memory
    /// miss: request handlers use [`Cache::manifest_async`].
    pub fn manifest(&self, d: &Digest) -> io::Result<Option<(Arc<StoredManifest>, Tier)>> {
        if let Some(m) = self.memory.manifest(d) {
            return Ok(Some((m, Tier::Memory)));
        }
        let Some(key) = self.indexed_manifest(d) else {
            return Ok(None);
        };
        let read = self.store.read_manifest(d)?;
        Ok(self.found_on_disk(key, read))
    }

    /// A manifest by digest from memory at once, else read from disk on the blocking pool
    /// (and promoted to memory).
    pub async fn manifest_async(
        &self,
        d: &Digest,
    ) -> io::Result<Option<(Arc<StoredManifest>, Tier)>> {
        if let Some(m) = self.memory.manifest(d) {
            return Ok(Some((m, Tier::Memory)));
        }
        let Some(key) = self.indexed_manifest(d) else {
            return Ok(None);
        };
        let (store, digest) = (self.store.clone(), d.clone());
        let read = tokio::task::spawn_blocking(move || store.read_manifest(&digest))
            .await
            .map_err(io::Error::other)??;
        Ok(self.found_on_disk(key, read))
    }

    /// The index key of manifest `d` if the disk tier has it.
    fn indexed_manifest(&self, d: &Digest) -> Option<Key> {
        let key = Key {
            kind: ObjectKind::Manifest,
            digest: d.clone(),
        };
        self.index.contains(&key).then_some(key)
    }

    /// Files what a disk read of an indexed manifest found: promoted to memory, or forgotten
    /// when the file is gone or bad.
    fn found_on_disk(
        &self,
        key: Key,
        read: Option<StoredManifest>,
    ) -> Option<(Arc<StoredManifest>, Tier)> {
        match read {
            Some(m) => {
                self.index.touch(&key);
                let m = Arc::new(m);
                self.memory.put_manifest(key.digest, m.clone());
                Some((m, Tier::Disk))
            }
            None => {
                self.index.remove(&key);
                None
            }
        }
    }

    /// The length of committed blob `d`, checked on the blocking pool (the index may name a
    /// file deleted behind berth's back).
    pub async fn blob_len(&self, d: &Digest) -> io::Result<Option<u64>> {
        let key = Key {
            kind: ObjectKind::Blob,
            digest: d.clone(),
        };
        Ok(match self.fills.open_committed(&key).await? {
            fill::Committed::File(_, len) => Some(len),
            _ => None,
        })
    }

    /// Stores a manifest already verified against `d` in both tiers (the fsynced disk write
    /// runs on the blocking pool; without disk budget it stays in memory only).
    pub async fn put_manifest(
        &self,
        d: &Digest,
        m: StoredManifest,
    ) -> io::Result<Arc<StoredManifest>> {
        let m = Arc::new(m);
        self.memory.put_manifest(d.clone(), m.clone());
        let key = Key {
            kind: ObjectKind::Manifest,
            digest: d.clone(),
        };
        if self.index.contains(&key) {
            return Ok(m);
        }
        let size = (m.media_type.len() + 1 + m.bytes.len()) as u64;
        let Ok((reservation, evicted)) = self.index.reserve(size) else {
            return Ok(m);
        };
        let (store, digest, manifest) = (self.store.clone(), d.clone(), m.clone());
        let written = tokio::task::spawn_blocking(move || {
            for k in &evicted {
                store.delete(k);
            }
            store.write_manifest(&digest, &manifest)
        })
        .await
        .map_err(io::Error::other)?;
        match written {
            Ok(()) => {
                let evicted = reservation.commit(key, size);
                if !evicted.is_empty() {
                    let store = self.store.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        for k in &evicted {
                            store.delete(k);
                        }
                    })
                    .await;
                }
            }
            Err(e) => {
                self.fills
                    .stats()
                    .write_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(digest = %d, error = %e, "could not store manifest; kept in memory only");
            }
        }
        Ok(m)
    }

    /// Moves a verified file (a staged import) into the disk tier as blob `d`, within the
    /// budget. A blob already cached is left as it is.
    pub fn adopt_blob(&self, temp: &std::path::Path, d: &Digest, size: u64) -> io::Result<()> {
        let key = Key {
            kind: ObjectKind::Blob,
            digest: d.clone(),
        };
        if self.index.contains(&key) {
            return Ok(());
        }
        let (reservation, evicted) = self
            .index
            .reserve(size)
            .map_err(|e| io::Error::new(io::ErrorKind::StorageFull, e.to_string()))?;
        for k in &evicted {
            self.store.delete(k);
        }
        let file = std::fs::File::open(temp)?;
        self.store.commit_blob(&file, temp, d)?;
        for k in reservation.commit(key, size) {
            self.store.delete(&k);
        }
        Ok(())
    }

    /// A small blob from the memory tier, or loaded into it from disk when it fits there, with
    /// the tier that had it.
    pub async fn small_blob(&self, d: &Digest, size: u64) -> Option<(Bytes, Tier)> {
        if let Some(b) = self.memory.blob(d) {
            return Some((b, Tier::Memory));
        }
        if !self.memory.fits(size) {
            return None;
        }
        let store = self.store.clone();
        let digest = d.clone();
        let bytes = tokio::task::spawn_blocking(move || store.read_blob(&digest))
            .await
            .ok()?
            .ok()??;
        if bytes.len() as u64 != size {
            return None;
        }
        self.memory.put_blob(d.clone(), bytes.clone());
        Some((bytes, Tier::Disk))
    }
}
