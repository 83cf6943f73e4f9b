//! The memory tier: manifests (and, later, small blobs) in a moka cache weighed in bytes.

use std::sync::Arc;

use moka::sync::Cache;

use super::store::StoredManifest;
use crate::oci::Digest;

/// Byte-weighed in-memory cache of manifests by digest.
pub struct MemoryTier {
    manifests: Cache<Digest, Arc<StoredManifest>>,
    max_object: u64,
}

impl MemoryTier {
    /// A tier holding at most `budget` bytes, objects of at most `max_object` bytes.
    pub fn new(budget: u64, max_object: u64) -> MemoryTier {
        let manifests = Cache::builder()
            .max_capacity(budget)
            .weigher(|_k: &Digest, v: &Arc<StoredManifest>| {
                (v.bytes.len() + v.media_type.len() + 128).min(u32::MAX as usize) as u32
            })
            .build();
        MemoryTier {
            manifests,
            max_object,
        }
    }

    /// A cached manifest.
    pub fn manifest(&self, d: &Digest) -> Option<Arc<StoredManifest>> {
        self.manifests.get(d)
    }

    /// Keeps a manifest if it is small enough.
    pub fn put_manifest(&self, d: Digest, m: Arc<StoredManifest>) {
        if (m.bytes.len() as u64) <= self.max_object {
            self.manifests.insert(d, m);
        }
    }
}
