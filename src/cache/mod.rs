//! The cache (DESIGN §4): content-addressed manifests and blobs in a memory and a disk tier,
//! tag mappings with a freshness lifetime, and one fill per missing blob. It knows nothing of
//! HTTP routing; the proxy hands it digests and a way to fetch.

pub mod fill;
pub mod memory;
pub mod store;
pub mod tags;

use std::io;
use std::sync::Arc;

pub use fill::{BlobSource, BlobStream, Fetched, Fill, FillError, Fills};
pub use store::{DiskStore, StoredManifest};
pub use tags::{accept_key, TagEntry, TagKey, TagStore};

use crate::config::CacheConfig;
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
    store: Arc<DiskStore>,
    memory: memory::MemoryTier,
    tags: TagStore,
    fills: Arc<Fills>,
}

impl Cache {
    /// Opens the cache directory (deleting leftovers of interrupted fills).
    pub fn open(cfg: &CacheConfig) -> io::Result<Cache> {
        let store = Arc::new(DiskStore::open(&cfg.dir)?);
        Ok(Cache {
            memory: memory::MemoryTier::new(cfg.memory_bytes, cfg.memory_max_object_bytes),
            tags: TagStore::new(store.clone()),
            fills: Fills::new(store.clone()),
            store,
        })
    }

    /// Tag mappings.
    pub fn tags(&self) -> &TagStore {
        &self.tags
    }

    /// Fills in progress.
    pub fn fills(&self) -> &Arc<Fills> {
        &self.fills
    }

    /// The disk tier.
    pub fn store(&self) -> &Arc<DiskStore> {
        &self.store
    }

    /// A manifest by digest from memory, else disk (promoted to memory).
    pub fn manifest(&self, d: &Digest) -> io::Result<Option<(Arc<StoredManifest>, Tier)>> {
        if let Some(m) = self.memory.manifest(d) {
            return Ok(Some((m, Tier::Memory)));
        }
        match self.store.read_manifest(d)? {
            Some(m) => {
                let m = Arc::new(m);
                self.memory.put_manifest(d.clone(), m.clone());
                Ok(Some((m, Tier::Disk)))
            }
            None => Ok(None),
        }
    }

    /// Stores a manifest already verified against `d` in both tiers (the fsynced disk write
    /// runs on the blocking pool).
    pub async fn put_manifest(
        &self,
        d: &Digest,
        m: StoredManifest,
    ) -> io::Result<Arc<StoredManifest>> {
        let m = Arc::new(m);
        self.memory.put_manifest(d.clone(), m.clone());
        let (store, digest, manifest) = (self.store.clone(), d.clone(), m.clone());
        tokio::task::spawn_blocking(move || store.write_manifest(&digest, &manifest))
            .await
            .map_err(io::Error::other)??;
        Ok(m)
    }
}
