//! Opening the cache directory (docs/ARCHITECTURE.md, "Cache"): take its lock, delete what
//! interrupted fills left, and rebuild the disk index from the files in the recency order last
//! saved, pinned images first. Damaged state files never stop the cache from opening.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::lock::lock_dir;
use super::{memory, pins};
use super::{
    Cache, CorruptionStats, DiskIndex, DiskStore, FillLimits, Fills, Key, Memberships, PurgeStats,
    TagStore,
};
use crate::config::CacheConfig;

// === impl Cache ===

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
        let mut found: HashMap<Key, (u64, SystemTime)> = store
            .scan()?
            .into_iter()
            .map(|(k, size, mtime)| (k, (size, mtime)))
            .collect();
        let mut unknown: Vec<(Key, u64, SystemTime)> = Vec::new();
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
}

#[cfg(test)]
mod tests {
    //! Crash safety of the state files: whatever a crash or a disk fault left behind, the cache
    //! opens, says what it set aside, and keeps what was whole.

    use super::*;
    use crate::cache::{ObjectKind, PinnedImage, TagKey};
    use crate::oci::Digest;
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
