//! The cache (docs/ARCHITECTURE.md, "Cache"): content-addressed manifests and blobs in a memory and a disk tier,
//! tag mappings with a freshness lifetime, and one fill per missing blob. It knows nothing of
//! HTTP routing; the proxy hands it digests and a way to fetch.
//!
//! File access stays off the async workers on request paths: the `async` methods answer a
//! memory hit at once and run every read, open, scan or write on the blocking pool. The plain
//! (blocking) methods are for startup and the commands that own the cache directory.

pub mod fill;
pub mod index;
pub mod membership;
pub mod memory;
pub mod pins;
pub mod purge;
pub mod queue;
pub mod readbuf;
pub mod scrub;
pub mod store;
pub mod tags;

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

pub use fill::{BlobFetcher, BlobSource, BlobStream, Fetched, Fill, FillError, FillStats, Fills};
pub use index::{DiskIndex, Key, ObjectKind, PinError, Usage};
pub use membership::Memberships;
pub use pins::PinnedImage;
pub use purge::{PurgeError, PurgeReport, PurgeStats};
pub use queue::{FillLimits, FillObserver};
pub use scrub::{CorruptionStats, Finding, ScrubError, ScrubOptions, ScrubReport};
pub use store::{DiskStore, StoredManifest, WriteFault};
pub use tags::{accept_key, TagEntry, TagKey, TagStore, Validity};

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
    /// Held for the cache's lifetime: one process per cache directory.
    _lock: std::fs::File,
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
    /// Opens the cache directory: deletes leftovers of interrupted fills and stray files, and
    /// rebuilds the index from what is on disk, in the recency order last saved (objects the
    /// snapshot does not know are ordered by modification time, as least recent). If the disk
    /// holds more than the budget (it shrank), the least recent objects are evicted now.
    pub fn open(cfg: &CacheConfig) -> io::Result<Cache> {
        let started = Instant::now();
        std::fs::create_dir_all(&cfg.dir)?;
        let lock = lock_dir(&cfg.dir)?;
        let store = Arc::new(DiskStore::open(&cfg.dir)?);
        let pinned = pins::read(&cfg.dir)?;
        let memberships = Arc::new(Memberships::open(&cfg.dir));
        let index = DiskIndex::new(cfg.disk_bytes);
        let mut found: HashMap<Key, (u64, std::time::SystemTime)> = store
            .scan()?
            .into_iter()
            .map(|(k, size, mtime)| (k, (size, mtime)))
            .collect();
        let mut unknown: Vec<(Key, u64, std::time::SystemTime)> = Vec::new();
        for p in &pinned {
            for k in p.keys() {
                if let Some((size, _)) = found.remove(&k) {
                    index.load_pinned(k, size);
                }
            }
        }
        let recency = store.read_recency();
        let mut ordered = Vec::with_capacity(recency.len());
        for (k, protected) in recency {
            if let Some((size, _)) = found.remove(&k) {
                ordered.push((k, size, protected));
            }
        }
        for (k, (size, mtime)) in found {
            unknown.push((k, size, mtime));
        }
        unknown.sort_by_key(|(_, _, m)| *m);
        let objects = ordered.len() + unknown.len();
        for (k, size, _) in unknown {
            index.load(k, size, false);
        }
        for (k, size, protected) in ordered {
            index.load(k, size, protected);
        }
        // Over budget (the budget was lowered): evict down to it.
        if let Ok((r, evicted)) = index.reserve(0) {
            drop(r);
            for k in &evicted {
                store.delete(k);
            }
        }
        let usage = index.usage();
        tracing::info!(
            objects,
            bytes = usage.used,
            budget = cfg.disk_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cache index rebuilt"
        );
        Ok(Cache {
            _lock: lock,
            corruption: CorruptionStats::default(),
            purged: PurgeStats::default(),
            pins: std::sync::Mutex::new(pinned),
            memory: memory::MemoryTier::new(cfg.memory_bytes, cfg.memory_max_object_bytes),
            tags: TagStore::new(store.clone()),
            fills: Fills::new(
                store.clone(),
                index.clone(),
                FillLimits {
                    max_concurrent: cfg.max_concurrent_fills,
                    queue_timeout: cfg.fill_queue_timeout,
                },
            ),
            memberships,
            index,
            store,
        })
    }

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

    /// Pins an image: all its objects must be on disk and fit the budget beside what is pinned
    /// already. The record is saved so that pins survive restarts (and `berth export` can list
    /// pinned images).
    pub fn pin_image(&self, image: PinnedImage) -> Result<(), PinError> {
        self.index.pin(&image.keys())?;
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.retain(|p| p.reference != image.reference);
        pins.push(image);
        self.save_pins(&pins);
        Ok(())
    }

    /// Saves the pin records crash-safely (see [`DiskStore::write_small`]).
    fn save_pins(&self, pins: &[PinnedImage]) {
        let path = self.store.root().join(pins::PINS_FILE);
        if let Err(e) = self.store.write_small(&path, &pins::encode(pins)) {
            tracing::warn!(path = %path.display(), error = %e, "could not save pins");
        }
    }

    /// Unpins the images recorded under `reference`: their objects become ordinary cache
    /// entries again (most evictable first), except those another pinned image still needs.
    /// Returns how many records were removed.
    pub fn unpin_image(&self, reference: &str) -> usize {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let before = pins.len();
        let (gone, kept): (Vec<_>, Vec<_>) = pins.drain(..).partition(|p| p.reference == reference);
        *pins = kept;
        let still: std::collections::HashSet<Key> = pins.iter().flat_map(|p| p.keys()).collect();
        let release: Vec<Key> = gone
            .iter()
            .flat_map(|p| p.keys())
            .filter(|k| !still.contains(k))
            .collect();
        self.index.unpin(&release);
        self.save_pins(&pins);
        before - pins.len()
    }

    /// The pinned images.
    pub fn pinned_images(&self) -> Vec<PinnedImage> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
        if !self.index.contains(&key) {
            return Ok(None);
        }
        let (store, digest) = (self.store.clone(), d.clone());
        let opened = tokio::task::spawn_blocking(move || store.open_blob(&digest))
            .await
            .map_err(io::Error::other)??;
        match opened {
            Some((_, len)) if self.index.size_of(&key) == Some(len) => Ok(Some(len)),
            Some((_, len)) => {
                self.fills.stale_size(&key, len);
                Ok(None)
            }
            None => Ok(None),
        }
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

/// Takes the cache directory's lock: one berth process (serve, warm, export, import) per cache
/// directory. Waits briefly for a process that is shutting down.
fn lock_dir(dir: &std::path::Path) -> io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    for _ in 0..50 {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "{} is in use by another berth process (warm a running berth with --via URL)",
            dir.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    //! Crash safety of the state files: whatever a crash or a disk fault left behind, the cache
    //! opens, says what it set aside, and keeps what was whole.

    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    fn config(dir: &std::path::Path) -> CacheConfig {
        CacheConfig {
            dir: dir.to_owned(),
            disk_bytes: 1 << 30,
            memory_bytes: 1 << 20,
            memory_max_object_bytes: 1 << 10,
            tag_ttl: Duration::from_secs(60),
            tag_ttl_min: Duration::ZERO,
            tag_ttl_max: Duration::from_secs(86_400),
            max_concurrent_fills: 4,
            fill_queue_timeout: Duration::from_secs(60),
            shared: None,
        }
    }

    /// Runs `f` with warnings captured; returns its result and the log text.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (out, text)
    }

    fn pin(reference: &str) -> PinnedImage {
        let d = Digest::sha256_of(reference.as_bytes()).to_string();
        PinnedImage {
            reference: reference.into(),
            upstream: "origin".into(),
            repository: "a/b".into(),
            tag: Some("v1".into()),
            manifest: d.clone(),
            manifests: vec![d],
            blobs: vec![],
        }
    }

    fn tag_key() -> TagKey {
        TagKey {
            upstream: "origin".into(),
            repo: "a/b".parse().unwrap(),
            tag: "v1".parse().unwrap(),
            accept: "x".into(),
        }
    }

    #[test]
    fn garbage_in_every_state_file_is_logged_and_survived() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        {
            let cache = Cache::open(&cfg).unwrap();
            cache
                .tags()
                .put(&tag_key(), Digest::sha256_of(b"m"), "t".into());
        }
        let tag_files: Vec<_> = walk(&dir.path().join("tags"));
        assert_eq!(tag_files.len(), 1, "{tag_files:?}");
        let garbage = b"\x00\xff{not json";
        for f in [
            dir.path().join(pins::PINS_FILE),
            dir.path().join("recency"),
            tag_files[0].clone(),
        ] {
            std::fs::write(f, garbage).unwrap();
        }

        let (cache, log) = logged(|| {
            let cache = Cache::open(&cfg).expect("damaged state files never stop the cache");
            let tag = cache.tags().get(&tag_key());
            (cache, tag)
        });
        let (cache, tag) = cache;
        assert!(cache.pinned_images().is_empty());
        assert!(tag.is_none(), "a damaged mapping is absent, not misread");
        for (what, needle) in [
            ("pins", pins::PINS_FILE),
            ("recency", "recency snapshot is damaged"),
            ("tag", "damaged tag mapping file"),
        ] {
            assert!(log.contains(needle), "{what} not logged:\n{log}");
        }
        assert!(
            log.contains(&dir.path().join(pins::PINS_FILE).display().to_string()),
            "the log names the file:\n{log}"
        );
        // The damaged pins are kept for the operator; the damaged mapping is gone.
        assert_eq!(
            std::fs::read(dir.path().join(pins::DAMAGED_PINS_FILE)).unwrap(),
            garbage
        );
        assert!(!tag_files[0].exists());
        // New state is written whole again.
        cache.unpin_image("nothing");
        assert_eq!(pins::read(dir.path()).unwrap(), vec![]);
    }

    #[test]
    fn a_truncated_pins_file_and_a_leftover_temp_file_are_survived() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let whole = pins::encode(&[pin("a:1"), pin("b:2")]);
        std::fs::write(dir.path().join(pins::PINS_FILE), &whole).unwrap();
        // What a crash between writing the temp file and renaming it leaves behind.
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let leftover = dir.path().join("tmp").join("1-0-42");
        std::fs::write(&leftover, &whole[..whole.len() / 3]).unwrap();
        {
            let cache = Cache::open(&cfg).unwrap();
            assert_eq!(cache.pinned_images(), vec![pin("a:1"), pin("b:2")]);
            assert!(!leftover.exists(), "leftover temp files are deleted");
        }

        // A file cut short (a disk fault; berth's own writes are renamed whole).
        std::fs::write(dir.path().join(pins::PINS_FILE), &whole[..whole.len() / 2]).unwrap();
        let (cache, log) = logged(|| Cache::open(&cfg).expect("opens"));
        assert!(cache.pinned_images().is_empty());
        assert!(log.contains("pin records are damaged"), "{log}");
    }

    #[test]
    fn state_writes_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&config(dir.path())).unwrap();
        cache.save_pins(&[pin("a:1")]);
        cache
            .store()
            .write_recency(&[(
                Key {
                    kind: ObjectKind::Blob,
                    digest: Digest::sha256_of(b"x"),
                },
                true,
            )])
            .unwrap();
        assert!(walk(&dir.path().join("tmp")).is_empty());
        assert_eq!(pins::read(dir.path()).unwrap(), vec![pin("a:1")]);
        assert_eq!(cache.store().read_recency().len(), 1);
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
