//! Tag → digest mappings: small mutable pointers with a freshness lifetime, kept in memory and
//! persisted so that a restarted berth can still serve by tag when the origin is down.
//!
//! Request handlers use the `async` methods: a memory hit answers at once, anything that
//! touches a file (a read after a restart, a directory scan, a write) runs on the blocking
//! pool, never on an async worker. The plain methods do the same work on the calling thread,
//! for the commands (`import`, `export`) that run outside request handling. A damaged mapping
//! file is logged, deleted and treated as absent (the origin is asked again).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use serde::{Deserialize, Serialize};

use super::store::DiskStore;
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
    /// When the origin last confirmed it; `None` when loaded from disk (stale until revalidated).
    pub confirmed: Option<Instant>,
}

impl TagEntry {
    /// Whether the mapping is still fresh under `ttl`.
    pub fn is_fresh(&self, ttl: Duration) -> bool {
        self.confirmed.is_some_and(|c| c.elapsed() < ttl)
    }
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    digest: String,
    media_type: String,
}

/// Normalizes a client's Accept values: split on commas, parameters dropped, lowercased,
/// sorted, deduplicated, joined.
pub fn accept_key(values: &[String]) -> String {
    let mut v: Vec<String> = values
        .iter()
        .flat_map(|h| h.split(','))
        .map(|a| {
            a.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|a| !a.is_empty())
        .collect();
    v.sort();
    v.dedup();
    v.join(",")
}

/// The tag mappings. Cloning is cheap (shared memory tier and store).
#[derive(Clone)]
pub struct TagStore {
    mem: Cache<TagKey, TagEntry>,
    store: Arc<DiskStore>,
}

impl TagStore {
    /// Mappings persisted under `store`.
    pub fn new(store: Arc<DiskStore>) -> TagStore {
        TagStore {
            mem: Cache::builder().max_capacity(MAX_TAGS_IN_MEMORY).build(),
            store,
        }
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

    /// Records a mapping the origin just confirmed (blocking when the mapping changed).
    pub fn put(&self, k: &TagKey, digest: Digest, media_type: String) {
        if let Some(body) = self.confirm(k, digest, media_type) {
            self.persist(k, &body);
        }
    }

    /// Records a mapping the origin just confirmed; a changed mapping is written on the
    /// blocking pool (a confirmation of what is known costs no file access).
    pub async fn put_async(&self, k: &TagKey, digest: Digest, media_type: String) {
        if let Some(body) = self.confirm(k, digest, media_type) {
            let (this, k) = (self.clone(), k.clone());
            let _ = tokio::task::spawn_blocking(move || this.persist(&k, &body)).await;
        }
    }

    /// Updates memory; returns the file's new contents when the mapping changed (what memory
    /// held came from the file or was written to it, so an unchanged mapping is on disk).
    fn confirm(&self, k: &TagKey, digest: Digest, media_type: String) -> Option<Vec<u8>> {
        let changed = self
            .mem
            .get(k)
            .is_none_or(|old| old.digest != digest || old.media_type != media_type);
        let body = changed.then(|| {
            serde_json::to_vec(&OnDisk {
                digest: digest.to_string(),
                media_type: media_type.clone(),
            })
            .expect("plain struct serializes")
        });
        let entry = TagEntry {
            digest,
            media_type,
            confirmed: Some(Instant::now()),
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
        assert!(!again.is_fresh(Duration::from_secs(60)));
    }
}
