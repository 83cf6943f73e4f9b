//! Tag → digest mappings: small mutable pointers with a freshness lifetime, kept in memory and
//! persisted so that a restarted berth can still serve by tag when the origin is down.
//!
//! Request handlers use the `async` methods: a memory hit answers at once, anything that
//! touches a file (a read after a restart, a directory scan, a write) runs on the blocking
//! pool, never on an async worker. The plain methods do the same work on the calling thread,
//! for the commands (`import`, `export`) that run outside request handling. A damaged mapping
//! file is logged, deleted and treated as absent (the origin is asked again).
//!
//! A mapping's lifetime is the origin's (its caching headers, within the configured bounds) or
//! `cache.tag_ttl`; it is measured on the store's own [`Clock`], which tests move forward
//! instead of sleeping. Mapping files written before lifetimes and validators existed load as
//! they always did: stale until revalidated, then the default lifetime.
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use super::store::DiskStore;
use crate::clock::Clock;
use crate::oci::{Digest, RepoName, Tag};

/// Most tag mappings held in memory.
const MAX_TAGS_IN_MEMORY: u64 = 100_000;

/// What a tag mapping is keyed by: the origin answers per Accept, so the accepted media types
/// are part of the key (docs/ARCHITECTURE.md, "Protocol surface").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey {
    /// Upstream name.
    pub upstream: String,
    /// Repository at that upstream.
    pub repo: RepoName,
    /// The tag.
    pub tag: Tag,
    /// Normalized accept set (see [`accept_key`]).
    pub accept: String,
}

/// A known mapping.
#[derive(Debug, Clone)]
pub struct TagEntry {
    /// Manifest digest the tag pointed to.
    pub digest: Digest,
    /// The manifest's media type.
    pub media_type: String,
    /// When the origin last confirmed it (on the store's [`Clock`]); `None` when loaded from
    /// disk or made stale by a push event (stale until revalidated).
    pub confirmed: Option<Instant>,
    /// What the origin said with its last confirmation.
    pub validity: Validity,
}

impl TagEntry {
    /// Whether the mapping is still fresh at `now` (the store's clock): for the lifetime the
    /// origin gave, or `default_ttl` (`cache.tag_ttl`) when it gave none.
    pub fn is_fresh(&self, default_ttl: Duration, now: Instant) -> bool {
        let ttl = self.validity.lifetime.unwrap_or(default_ttl);
        self.confirmed
            .is_some_and(|c| now.saturating_duration_since(c) < ttl)
    }
}

/// What an origin says about a tag besides the digest: how long its answer holds and how to ask
/// again cheaply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validity {
    /// Lifetime from the origin's caching headers, already within the configured bounds (zero
    /// for `no-store`); `None` when it stated none and `cache.tag_ttl` applies.
    pub lifetime: Option<Duration>,
    /// The origin's strong `ETag` for the tag's manifest, sent back as `If-None-Match`.
    pub etag: Option<String>,
}

/// A mapping file. `etag` was added later: files without it load with none (and the default
/// lifetime), and berths that predate it ignore it.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    digest: String,
    media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
}

/// Normalizes a client's Accept values: split on commas, parameters dropped, lowercased,
/// sorted, deduplicated, joined.
pub fn accept_key(values: &[String]) -> String {
    // Borrowed where already lowercase (nearly always): one allocation, the key itself.
    let mut v: Vec<std::borrow::Cow<'_, str>> = values
        .iter()
        .flat_map(|h| h.split(','))
        .map(|a| a.split(';').next().unwrap_or("").trim())
        .filter(|a| !a.is_empty())
        .map(|a| {
            if a.bytes().any(|b| b.is_ascii_uppercase()) {
                a.to_ascii_lowercase().into()
            } else {
                a.into()
            }
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v.join(",")
}

/// The tag mappings. Cloning is cheap (shared memory tier and store).
#[derive(Clone)]
pub struct TagStore {
    mem: Cache<TagKey, TagEntry>,
    store: Arc<DiskStore>,
    clock: Clock,
}

impl TagStore {
    /// Mappings persisted under `store`.
    pub fn new(store: Arc<DiskStore>) -> TagStore {
        TagStore {
            mem: Cache::builder().max_capacity(MAX_TAGS_IN_MEMORY).build(),
            store,
            clock: Clock::default(),
        }
    }

    /// The clock lifetimes are measured on (tests move it forward instead of sleeping).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn path(&self, k: &TagKey) -> PathBuf {
        let accept = crate::oci::Digest::sha256_of(k.accept.as_bytes());
        self.tag_dir(&k.upstream, &k.repo, &k.tag)
            .join(format!("{}.json", &accept.hex()[..16]))
    }

    /// The mapping for `k`, from memory or disk (blocking on a memory miss).
    pub fn get(&self, k: &TagKey) -> Option<TagEntry> {
        if let Some(e) = self.mem.get(k) {
            return Some(e);
        }
        self.load(k)
    }

    /// The mapping for `k`: from memory at once, else read from disk on the blocking pool.
    pub async fn get_async(&self, k: &TagKey) -> Option<TagEntry> {
        if let Some(e) = self.mem.get(k) {
            return Some(e);
        }
        let (this, k) = (self.clone(), k.clone());
        tokio::task::spawn_blocking(move || this.load(&k))
            .await
            .ok()
            .flatten()
    }

    /// Reads `k`'s file into memory. A file that does not parse is removed.
    fn load(&self, k: &TagKey) -> Option<TagEntry> {
        let path = self.path(k);
        let raw = std::fs::read(&path).ok()?;
        let Some(e) = parse(&raw) else {
            tracing::warn!(path = %path.display(), "damaged tag mapping file; removed");
            let _ = std::fs::remove_file(&path);
            return None;
        };
        self.mem.insert(k.clone(), e.clone());
        Some(e)
    }

    /// Any known mapping of `tag` whose manifest a client with `accept` can take, whatever Accept
    /// it was recorded under: for a mirror that cannot ask the origin (offline, or the origin is
    /// down), a tag warmed with one Accept must still serve clients sending another.
    ///
    /// Blocking (a directory scan); request handlers use [`TagStore::any_acceptable_async`].
    pub fn any_acceptable(&self, k: &TagKey, accept: &[String]) -> Option<TagEntry> {
        let dir = self.path(k).parent()?.to_owned();
        let mut found: Vec<(std::time::SystemTime, TagEntry)> = Vec::new();
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let Ok(raw) = std::fs::read(e.path()) else {
                continue;
            };
            let Some(entry) = parse(&raw) else {
                tracing::warn!(path = %e.path().display(), "damaged tag mapping file; skipped");
                continue;
            };
            if !crate::oci::media::accepts(accept, &entry.media_type) {
                continue;
            }
            let mtime = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            found.push((mtime, entry));
        }
        // The most recently recorded mapping wins.
        found.into_iter().max_by_key(|(m, _)| *m).map(|(_, e)| e)
    }

    /// Any known mapping of `tag` a client with `accept` can take (see
    /// [`TagStore::any_acceptable`]), scanned on the blocking pool.
    pub async fn any_acceptable_async(&self, k: &TagKey, accept: &[String]) -> Option<TagEntry> {
        let (this, k, accept) = (self.clone(), k.clone(), accept.to_vec());
        tokio::task::spawn_blocking(move || this.any_acceptable(&k, &accept))
            .await
            .ok()
            .flatten()
    }

    /// Records a mapping the origin just confirmed, with the default lifetime and no validator
    /// (blocking when the mapping changed).
    pub fn put(&self, k: &TagKey, digest: Digest, media_type: String) {
        if let Some(body) = self.confirm(k, digest, media_type, Validity::default()) {
            self.persist(k, &body);
        }
    }

    /// Records a mapping the origin just confirmed, with what it said about it; a changed
    /// mapping is written on the blocking pool (a confirmation of what is known costs no file
    /// access).
    pub async fn put_async(
        &self,
        k: &TagKey,
        digest: Digest,
        media_type: String,
        validity: Validity,
    ) {
        if let Some(body) = self.confirm(k, digest, media_type, validity) {
            let (this, k) = (self.clone(), k.clone());
            let _ = tokio::task::spawn_blocking(move || this.persist(&k, &body)).await;
        }
    }

    /// Updates memory; returns the file's new contents when the mapping changed (what memory
    /// held came from the file or was written to it, so an unchanged mapping is on disk).
    fn confirm(
        &self,
        k: &TagKey,
        digest: Digest,
        media_type: String,
        validity: Validity,
    ) -> Option<Vec<u8>> {
        let changed = self.mem.get(k).is_none_or(|old| {
            old.digest != digest
                || old.media_type != media_type
                || old.validity.etag != validity.etag
        });
        let body = changed.then(|| {
            serde_json::to_vec(&OnDisk {
                digest: digest.to_string(),
                media_type: media_type.clone(),
                etag: validity.etag.clone(),
            })
            .expect("plain struct serializes")
        });
        let entry = TagEntry {
            digest,
            media_type,
            confirmed: Some(self.clock.now()),
            validity,
        };
        self.mem.insert(k.clone(), entry);
        body
    }

    fn persist(&self, k: &TagKey, body: &[u8]) {
        if let Err(e) = self.store.write_small(&self.path(k), body) {
            tracing::warn!(error = %e, "could not persist tag mapping");
        }
    }

    /// Every Accept variant of `(upstream, repo, tag)` held in memory.
    fn held_variants(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Vec<(Arc<TagKey>, TagEntry)> {
        self.mem
            .iter()
            .filter(|(k, _)| k.upstream == upstream && k.repo == *repo && k.tag == *tag)
            .collect()
    }

    /// The directory holding every Accept variant of `(upstream, repo, tag)`.
    fn tag_dir(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.store
            .root()
            .join("tags")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags")
            .join(tag.as_str())
    }

    /// The digests `(upstream, repo, tag)` points to, over every Accept variant, from memory
    /// and disk. Blocking.
    pub fn digests_of(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> Vec<Digest> {
        let mut out: Vec<Digest> = self
            .held_variants(upstream, repo, tag)
            .into_iter()
            .map(|(_, e)| e.digest)
            .collect();
        if let Ok(dir) = std::fs::read_dir(self.tag_dir(upstream, repo, tag)) {
            for e in dir.flatten() {
                if let Some(entry) = std::fs::read(e.path()).ok().and_then(|raw| parse(&raw)) {
                    out.push(entry.digest);
                }
            }
        }
        out.sort_by_key(|d| d.to_string());
        out.dedup();
        out
    }

    /// Makes every Accept variant of `(upstream, repo, tag)` stale (the origin says the tag was
    /// pushed): the next request revalidates it. How many were held in memory (mappings read
    /// from disk start stale anyway).
    pub fn mark_stale(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> u64 {
        let held = self.held_variants(upstream, repo, tag);
        let n = held.len() as u64;
        for (k, mut e) in held {
            e.confirmed = None;
            self.mem.insert((*k).clone(), e);
        }
        n
    }

    /// Forgets every Accept variant of `(upstream, repo, tag)`; how many there were. Blocking.
    pub fn remove_all(&self, upstream: &str, repo: &RepoName, tag: &Tag) -> u64 {
        let keys: Vec<Arc<TagKey>> = self
            .held_variants(upstream, repo, tag)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut n = keys.len() as u64;
        for k in keys {
            self.mem.invalidate(&*k);
        }
        let dir = self.tag_dir(upstream, repo, tag);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            n = n.max(entries.count() as u64);
        }
        let _ = std::fs::remove_dir_all(&dir);
        n
    }

    /// Forgets a mapping (the origin says the tag no longer exists). Blocking.
    pub fn remove(&self, k: &TagKey) {
        self.mem.invalidate(k);
        let _ = std::fs::remove_file(self.path(k));
    }

    /// Forgets a mapping; the file is deleted on the blocking pool.
    pub async fn remove_async(&self, k: &TagKey) {
        self.mem.invalidate(k);
        let path = self.path(k);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
    }
}

/// A mapping file's contents, if they parse.
fn parse(raw: &[u8]) -> Option<TagEntry> {
    let d: OnDisk = serde_json::from_slice(raw).ok()?;
    Some(TagEntry {
        digest: d.digest.parse().ok()?,
        media_type: d.media_type,
        confirmed: None,
        validity: Validity {
            lifetime: None,
            etag: d.etag,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_keys_normalize() {
        let a = accept_key(&[
            "application/vnd.oci.image.index.v1+json".into(),
            "application/vnd.docker.distribution.manifest.v2+json; q=0.5, application/vnd.oci.image.index.v1+json".into(),
        ]);
        assert_eq!(
            a,
            "application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.index.v1+json"
        );
    }

    #[test]
    fn persists_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path()).unwrap());
        let k = TagKey {
            upstream: "up".into(),
            repo: "a/b".parse().unwrap(),
            tag: "v1".parse().unwrap(),
            accept: "x".into(),
        };
        let d = Digest::sha256_of(b"m");
        TagStore::new(store.clone()).put(&k, d.clone(), "t".into());
        let again = TagStore::new(store).get(&k).unwrap();
        assert_eq!(again.digest, d);
        assert!(!again.is_fresh(Duration::from_secs(60), Instant::now()));
    }

    fn key() -> TagKey {
        TagKey {
            upstream: "up".into(),
            repo: "a/b".parse().unwrap(),
            tag: "v1".parse().unwrap(),
            accept: "x".into(),
        }
    }

    /// A mapping file written before validators existed loads (stale, default lifetime); one
    /// written now keeps its ETag across a restart.
    #[tokio::test]
    async fn old_mapping_files_load_and_etags_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path()).unwrap());
        let tags = TagStore::new(store.clone());
        let d = Digest::sha256_of(b"m");
        let old = format!(r#"{{"digest":"{d}","media_type":"t"}}"#);
        std::fs::create_dir_all(tags.path(&key()).parent().unwrap()).unwrap();
        std::fs::write(tags.path(&key()), old).unwrap();
        let loaded = tags.get(&key()).expect("an old record loads");
        assert_eq!(loaded.digest, d);
        assert_eq!(loaded.validity, Validity::default());

        let etag = Some(format!("\"{d}\""));
        let v = Validity {
            lifetime: Some(Duration::from_secs(7)),
            etag: etag.clone(),
        };
        tags.put_async(&key(), d.clone(), "t".into(), v).await;
        let again = TagStore::new(store).get(&key()).unwrap();
        assert_eq!(
            again.validity.etag, etag,
            "the validator survives a restart"
        );
        assert_eq!(
            again.validity.lifetime, None,
            "a restart starts stale anyway"
        );
        assert!(again.confirmed.is_none());
    }

    /// The origin's lifetime wins over the default; zero (no-store) is never fresh.
    #[tokio::test]
    async fn freshness_follows_the_origins_lifetime_on_the_stores_clock() {
        let dir = tempfile::tempdir().unwrap();
        let tags = TagStore::new(Arc::new(DiskStore::open(dir.path()).unwrap()));
        let d = Digest::sha256_of(b"m");
        let default_ttl = Duration::from_secs(300);
        let v = Validity {
            lifetime: Some(Duration::from_secs(10)),
            etag: None,
        };
        tags.put_async(&key(), d.clone(), "t".into(), v).await;
        let e = tags.get(&key()).unwrap();
        assert!(e.is_fresh(default_ttl, tags.clock().now()));
        tags.clock().advance(Duration::from_secs(11));
        assert!(
            !e.is_fresh(default_ttl, tags.clock().now()),
            "10 s from the origin, not the 300 s default"
        );

        let none = Validity {
            lifetime: None,
            etag: None,
        };
        tags.put_async(&key(), d.clone(), "t".into(), none).await;
        let e = tags.get(&key()).unwrap();
        tags.clock().advance(Duration::from_secs(299));
        assert!(e.is_fresh(default_ttl, tags.clock().now()), "the default");

        let no_store = Validity {
            lifetime: Some(Duration::ZERO),
            etag: None,
        };
        tags.put_async(&key(), d, "t".into(), no_store).await;
        let e = tags.get(&key()).unwrap();
        assert!(!e.is_fresh(default_ttl, tags.clock().now()));
    }
}
