//! The memory tier: manifests and small blobs in one moka cache weighed in bytes (moka's
//! TinyLFU admission keeps one-off objects from displacing hot ones).
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::sync::Cache;

use super::store::StoredManifest;
use crate::oci::Digest;

#[derive(Clone)]
enum Object {
    Manifest(Arc<StoredManifest>),
    Blob(Bytes),
}

impl Object {
    fn weight(&self) -> u32 {
        let n = match self {
            Object::Manifest(m) => m.bytes.len() + m.media_type.len(),
            Object::Blob(b) => b.len(),
        };
        (n + 128).min(u32::MAX as usize) as u32
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum MemKey {
    Manifest(Digest),
    Blob(Digest),
}

/// Byte-weighed in-memory cache of manifests and small blobs by digest.
pub struct MemoryTier {
    objects: Cache<MemKey, Object>,
    max_object: u64,
    budget: u64,
    evictions: Arc<AtomicU64>,
}

impl MemoryTier {
    /// A tier holding at most `budget` bytes, objects of at most `max_object` bytes.
    pub fn new(budget: u64, max_object: u64) -> MemoryTier {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = evictions.clone();
        let objects = Cache::builder()
            .max_capacity(budget)
            .weigher(|_k: &MemKey, v: &Object| v.weight())
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MemoryTier {
            objects,
            max_object,
            budget,
            evictions,
        }
    }

    /// Whether an object of `size` bytes may live here.
    pub fn fits(&self, size: u64) -> bool {
        size <= self.max_object
    }

    /// A cached manifest.
    pub fn manifest(&self, d: &Digest) -> Option<Arc<StoredManifest>> {
        match self.objects.get(&MemKey::Manifest(d.clone()))? {
            Object::Manifest(m) => Some(m),
            Object::Blob(_) => None,
        }
    }

    /// Keeps a manifest if it is small enough.
    pub fn put_manifest(&self, d: Digest, m: Arc<StoredManifest>) {
        if self.fits(m.bytes.len() as u64) {
            self.objects
                .insert(MemKey::Manifest(d), Object::Manifest(m));
        }
    }

    /// A cached small blob.
    pub fn blob(&self, d: &Digest) -> Option<Bytes> {
        match self.objects.get(&MemKey::Blob(d.clone()))? {
            Object::Blob(b) => Some(b),
            Object::Manifest(_) => None,
        }
    }

    /// Keeps a small blob (verified bytes only).
    pub fn put_blob(&self, d: Digest, b: Bytes) {
        if self.fits(b.len() as u64) {
            self.objects.insert(MemKey::Blob(d), Object::Blob(b));
        }
    }

    /// Forgets a manifest (a purge).
    pub fn remove_manifest(&self, d: &Digest) {
        self.objects.invalidate(&MemKey::Manifest(d.clone()));
    }

    /// Forgets a blob (a purge).
    pub fn remove_blob(&self, d: &Digest) {
        self.objects.invalidate(&MemKey::Blob(d.clone()));
    }

    /// Bytes held (moka's estimate), budget, object count and evictions, for metrics.
    pub fn usage(&self) -> (u64, u64, u64, u64) {
        (
            self.objects.weighted_size(),
            self.budget,
            self.objects.entry_count(),
            self.evictions.load(Ordering::Relaxed),
        )
    }
}
