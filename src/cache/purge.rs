//! Purging (docs/ARCHITECTURE.md, "Cache"): dropping a tag mapping, an image (a manifest or
//! index with every manifest and blob it lists that the cache holds) or a single blob, from
//! both tiers. The next request fetches them again from the origin. Pinned content is only
//! dropped when forced, and its pins are released with it. Blocking: run it on the blocking
//! pool or a command's thread.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::membership::referenced_digests;
use super::{Cache, Key, ObjectKind};
use crate::oci::{Digest, RepoName, Tag};

/// What a purge removed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PurgeReport {
    /// Tag mappings forgotten (every Accept variant counts once).
    pub tags: u64,
    /// Manifests and indexes removed.
    pub manifests: u64,
    /// Blobs removed.
    pub blobs: u64,
    /// Bytes freed on disk.
    pub bytes: u64,
    /// Pinned images released because the purge was forced.
    pub unpinned: Vec<String>,
}

/// Why a purge did nothing.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// Pinned objects would go; `--force` (`force=true`) drops them and their pins.
    #[error("{0} is pinned; purge it with --force (force=true) to drop it and its pin")]
    Pinned(String),
    /// Nothing of that name is cached.
    #[error("{0} is not in the cache")]
    NotCached(String),
}

/// Counters for `berth_purged_total{kind}`.
#[derive(Debug, Default)]
pub struct PurgeStats {
    /// Tag mappings forgotten.
    pub tags: AtomicU64,
    /// Manifests removed.
    pub manifests: AtomicU64,
    /// Blobs removed.
    pub blobs: AtomicU64,
}

impl Cache {
    /// Drops the object `d`: an image (a manifest or index and every manifest and blob it
    /// lists, recursively, that the cache holds) or a single blob.
    pub fn purge_digest(&self, d: &Digest, force: bool) -> Result<PurgeReport, PurgeError> {
        let mut keys = Vec::new();
        let manifest = Key {
            kind: ObjectKind::Manifest,
            digest: d.clone(),
        };
        let blob = Key {
            kind: ObjectKind::Blob,
            digest: d.clone(),
        };
        if self.index.contains(&manifest) || self.memory.manifest(d).is_some() {
            self.image_closure(d, &mut keys);
        } else if self.index.contains(&blob) || self.memory.blob(d).is_some() {
            keys.push(blob);
        } else {
            return Err(PurgeError::NotCached(d.to_string()));
        }
        self.drop_keys(&keys, force, &d.to_string())
    }

    /// Drops the tag mapping `(upstream, repo, tag)` (every Accept variant) and, with
    /// `with_image`, the images it pointed to.
    pub fn purge_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        with_image: bool,
        force: bool,
    ) -> Result<PurgeReport, PurgeError> {
        let what = format!("{upstream}/{repo}:{tag}");
        let pointed = self.tags.digests_of(upstream, repo, tag);
        if pointed.is_empty() {
            return Err(PurgeError::NotCached(what));
        }
        let mut report = PurgeReport::default();
        if with_image {
            let mut keys = Vec::new();
            for d in &pointed {
                self.image_closure(d, &mut keys);
            }
            report = self.drop_keys(&keys, force, &what)?;
        }
        report.tags = self.tags.remove_all(upstream, repo, tag);
        self.purged.tags.fetch_add(report.tags, Ordering::Relaxed);
        tracing::info!(tag = %what, tags = report.tags, manifests = report.manifests, blobs = report.blobs, bytes = report.bytes, "purged");
        Ok(report)
    }

    /// Counters of what purges removed.
    pub fn purged(&self) -> &PurgeStats {
        &self.purged
    }

    /// The manifest `d` and everything it lists that the cache holds (indexes recursively).
    fn image_closure(&self, d: &Digest, keys: &mut Vec<Key>) {
        let mut todo = vec![d.clone()];
        let mut seen = BTreeSet::new();
        while let Some(m) = todo.pop() {
            if !seen.insert(m.clone()) {
                continue;
            }
            keys.push(Key {
                kind: ObjectKind::Manifest,
                digest: m.clone(),
            });
            // Read where it is, without promoting it to memory or touching its recency: it is
            // about to go.
            let bytes = match self.memory.manifest(&m) {
                Some(stored) => stored.bytes.clone(),
                None => match self.store.read_manifest(&m) {
                    Ok(Some(stored)) => stored.bytes,
                    _ => continue,
                },
            };
            for child in referenced_digests(&bytes) {
                let as_manifest = Key {
                    kind: ObjectKind::Manifest,
                    digest: child.clone(),
                };
                if self.index.contains(&as_manifest) || self.memory.manifest(&child).is_some() {
                    todo.push(child);
                } else {
                    keys.push(Key {
                        kind: ObjectKind::Blob,
                        digest: child,
                    });
                }
            }
        }
    }

    /// Removes `keys` from both tiers (refused as a whole if one is pinned and not `force`).
    fn drop_keys(&self, keys: &[Key], force: bool, what: &str) -> Result<PurgeReport, PurgeError> {
        let pinned: Vec<&Key> = keys.iter().filter(|k| self.index.is_pinned(k)).collect();
        let mut report = PurgeReport::default();
        if !pinned.is_empty() {
            if !force {
                return Err(PurgeError::Pinned(what.to_owned()));
            }
            let gone: BTreeSet<String> = keys.iter().map(|k| k.digest.to_string()).collect();
            for image in self.pinned_images() {
                if image.manifests.iter().any(|m| gone.contains(m)) {
                    self.unpin_image(&image.reference);
                    report.unpinned.push(image.reference);
                }
            }
            let owned: Vec<Key> = pinned.into_iter().cloned().collect();
            self.index.unpin(&owned);
        }
        for k in keys {
            match k.kind {
                ObjectKind::Manifest => self.memory.remove_manifest(&k.digest),
                ObjectKind::Blob => self.memory.remove_blob(&k.digest),
            }
            if let Some(size) = self.index.remove(k) {
                self.store.delete(k);
                report.bytes += size;
                match k.kind {
                    ObjectKind::Manifest => report.manifests += 1,
                    ObjectKind::Blob => report.blobs += 1,
                }
            }
        }
        self.purged
            .manifests
            .fetch_add(report.manifests, Ordering::Relaxed);
        self.purged.blobs.fetch_add(report.blobs, Ordering::Relaxed);
        let _ = self.save_recency();
        tracing::info!(target_name = %what, manifests = report.manifests, blobs = report.blobs, bytes = report.bytes, unpinned = ?report.unpinned, "purged");
        Ok(report)
    }
}
