//! The disk tier's file layout and its crash-safe writes: every object is written to a temp file
//! in the same filesystem, verified, fsynced and renamed into place under its digest.
//!
//! ```text
//! <dir>/blobs/sha256/ab/abcdef...     layer and config bytes
//! <dir>/manifests/sha256/ab/abcd...   "<media type>\n" + manifest bytes
//! <dir>/tags/<upstream>/<repo>/_tags/<tag>/<accept-key>.json
//! <dir>/tmp/                          fills in progress; emptied at startup
//! <dir>/recency                       the index's eviction order, saved periodically
//! <dir>/pins.json                     pinned images (see `pins.rs`)
//! ```
//!
//! State files (tag mappings, `recency`, `pins.json`) go through [`DiskStore::write_small`]:
//! temp file, fsync, rename, directory fsync, so a crash leaves the old or the new version,
//! never a torn one. A file damaged anyway (a disk fault, a hand edit) is logged and treated as
//! absent by its reader; it never stops berth from starting.
//!
//! Architecture: docs/ARCHITECTURE.md, "On disk".

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::index::{Key, ObjectKind};
use crate::oci::{Digest, Hasher};

/// Name of the recency snapshot file.
const RECENCY_FILE: &str = "recency";

/// A manifest as stored: its media type and exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// Content-Type the origin gave it.
    pub media_type: String,
    /// The bytes, exactly as the origin sent them.
    pub bytes: Bytes,
}

/// A write failure injected through the store's interface (tests and failure drills): every
/// write of that kind fails with an I/O error until cleared, as a failing disk would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Writes work.
    None = 0,
    /// Creating a temp file fails (every fill and every small-file write).
    TempFile = 1,
    /// The last step of storing a blob or manifest (fsync and rename) fails.
    Commit = 2,
}

/// Paths and atomic writes of the disk tier.
pub struct DiskStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    fault: std::sync::atomic::AtomicU8,
}

impl DiskStore {
    /// Opens (creating if needed) a store at `root` and deletes leftovers of interrupted fills.
    pub fn open(root: &Path) -> io::Result<DiskStore> {
        for sub in ["blobs", "manifests", "tags", "tmp"] {
            fs::create_dir_all(root.join(sub))?;
        }
        for entry in fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(DiskStore {
            root: root.to_owned(),
            tmp_seq: AtomicU64::new(0),
            fault: std::sync::atomic::AtomicU8::new(WriteFault::None as u8),
        })
    }

    /// Makes writes of one kind fail from now on (`WriteFault::None` heals).
    pub fn inject_write_fault(&self, fault: WriteFault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// An injected failure for `at`, if one is set.
    fn injected(&self, at: WriteFault) -> io::Result<()> {
        if self.fault.load(Ordering::SeqCst) == at as u8 {
            return Err(io::Error::other(format!("injected write fault: {at:?}")));
        }
        Ok(())
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn object_path(&self, kind: &str, d: &Digest) -> PathBuf {
        self.root
            .join(kind)
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    /// Where an object lives once committed.
    pub fn path(&self, key: &Key) -> PathBuf {
        self.object_path(key.kind.as_str(), &key.digest)
    }

    /// Where a blob lives once committed.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.object_path("blobs", d)
    }

    /// Deletes a committed object (eviction). Readers that opened it finish undisturbed.
    pub fn delete(&self, key: &Key) {
        if let Err(e) = fs::remove_file(self.path(key)) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(digest = %key.digest, error = %e, "could not delete evicted object");
            }
        }
    }

    /// Every committed object with its size and modification time. Files whose names are not
    /// digests (or whose directory does not match) are deleted: nothing unverifiable is served.
    pub fn scan(&self) -> io::Result<Vec<(Key, u64, std::time::SystemTime)>> {
        let mut out = Vec::new();
        for kind in [ObjectKind::Blob, ObjectKind::Manifest] {
            let kind_dir = self.root.join(kind.as_str());
            for alg in fs::read_dir(&kind_dir)? {
                let alg = alg?;
                let alg_name = alg.file_name().to_string_lossy().into_owned();
                if !alg.file_type()?.is_dir() {
                    let _ = fs::remove_file(alg.path());
                    continue;
                }
                for shard in fs::read_dir(alg.path())? {
                    let shard = shard?;
                    if !shard.file_type()?.is_dir() {
                        let _ = fs::remove_file(shard.path());
                        continue;
                    }
                    let shard_name = shard.file_name().to_string_lossy().into_owned();
                    for f in fs::read_dir(shard.path())? {
                        let f = f?;
                        let name = f.file_name().to_string_lossy().into_owned();
                        let digest = format!("{alg_name}:{name}").parse::<Digest>().ok();
                        let meta = f.metadata()?;
                        match digest {
                            Some(d)
                                if meta.is_file()
                                    && name.starts_with(&shard_name)
                                    && shard_name.len() == 2 =>
                            {
                                let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                                out.push((Key { kind, digest: d }, meta.len(), mtime));
                            }
                            _ => {
                                tracing::warn!(path = %f.path().display(), "removing stray file from the cache");
                                let _ = if meta.is_dir() {
                                    fs::remove_dir_all(f.path())
                                } else {
                                    fs::remove_file(f.path())
                                };
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads the recency snapshot: keys in eviction order with their protected flag. Lines
    /// that do not parse (a damaged file) are skipped with a warning: objects the snapshot
    /// does not name are ordered by modification time instead.
    pub fn read_recency(&self) -> Vec<(Key, bool)> {
        let path = self.root.join(RECENCY_FILE);
        let raw = match fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the recency snapshot; ordering by modification time");
                return Vec::new();
            }
        };
        let text = String::from_utf8_lossy(&raw);
        let mut damaged = 0usize;
        let order: Vec<(Key, bool)> = text
            .lines()
            .filter_map(|l| {
                let parsed = parse_recency_line(l);
                damaged += usize::from(parsed.is_none());
                parsed
            })
            .collect();
        if damaged > 0 {
            tracing::warn!(path = %path.display(), damaged, kept = order.len(), "recency snapshot is damaged; skipping the lines that do not parse");
        }
        order
    }

    /// Writes the recency snapshot atomically.
    pub fn write_recency(&self, order: &[(Key, bool)]) -> io::Result<()> {
        let mut text = String::with_capacity(order.len() * 80);
        for (k, protected) in order {
            text.push_str(if *protected { "p " } else { "o " });
            text.push_str(match k.kind {
                ObjectKind::Blob => "b ",
                ObjectKind::Manifest => "m ",
            });
            text.push_str(&k.digest.to_string());
            text.push('\n');
        }
        self.write_small(&self.root.join(RECENCY_FILE), text.as_bytes())
    }

    /// Opens a committed blob: the file and its length.
    pub fn open_blob(&self, d: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(d)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a blob is committed.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// A new temp file for a fill, readable by followers while it grows.
    pub fn temp_file(&self) -> io::Result<(File, PathBuf)> {
        self.injected(WriteFault::TempFile)?;
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("tmp").join(format!(
            "{}-{n}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((f, path))
    }

    /// Makes a verified temp file the blob `d`: fsync, rename, fsync the directory.
    pub fn commit_blob(&self, file: &File, temp: &Path, d: &Digest) -> io::Result<()> {
        self.injected(WriteFault::Commit)?;
        file.sync_all()?;
        let dest = self.blob_path(d);
        rename_into_place(temp, &dest)
    }

    /// Reads a whole small blob (for the memory tier).
    pub fn read_blob(&self, d: &Digest) -> io::Result<Option<Bytes>> {
        match fs::read(self.blob_path(d)) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a stored manifest (blocking: call it from the blocking pool).
    pub fn read_manifest(&self, d: &Digest) -> io::Result<Option<StoredManifest>> {
        let path = self.object_path("manifests", d);
        let raw = match fs::read(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(nl) = raw.iter().position(|&b| b == b'\n') else {
            tracing::warn!(path = %path.display(), "manifest file has no header; treated as absent");
            return Ok(None);
        };
        let media_type = String::from_utf8_lossy(&raw[..nl]).into_owned();
        let bytes = Bytes::from(raw).slice(nl + 1..);
        // A manifest file is only ever renamed into place whole, but check anyway: a bad file is
        // treated as absent, never served.
        let mut h = Hasher::new(d.algorithm());
        h.update(&bytes);
        if h.finish() != *d {
            return Ok(None);
        }
        Ok(Some(StoredManifest { media_type, bytes }))
    }

    /// Stores a manifest whose bytes were already verified against `d`.
    pub fn write_manifest(&self, d: &Digest, m: &StoredManifest) -> io::Result<()> {
        let dest = self.object_path("manifests", d);
        if dest.is_file() {
            return Ok(());
        }
        let (mut f, temp) = self.temp_file()?;
        let r = (|| {
            self.injected(WriteFault::Commit)?;
            f.write_all(m.media_type.as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(&m.bytes)?;
            f.sync_all()?;
            rename_into_place(&temp, &dest)
        })();
        if r.is_err() {
            let _ = fs::remove_file(&temp);
        }
        r
    }

    /// Writes a small state file crash-safely: temp file, fsync, rename over `dest`, fsync of
    /// the directory. A crash at any point leaves the old file or the new one whole; a
    /// leftover temp file is deleted at the next start. Blocking: call it from the blocking
    /// pool on a request path.
    pub fn write_small(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let (mut f, temp) = self.temp_file()?;
        let r = f
            .write_all(bytes)
            .and_then(|_| f.sync_all())
            .and_then(|_| rename_into_place(&temp, dest));
        if r.is_err() {
            let _ = fs::remove_file(&temp);
        }
        r
    }
}

/// One line of the recency snapshot: `p|o b|m <digest>`.
fn parse_recency_line(l: &str) -> Option<(Key, bool)> {
    let mut it = l.split(' ');
    let (seg, kind, digest) = (it.next()?, it.next()?, it.next()?);
    let protected = match seg {
        "p" => true,
        "o" => false,
        _ => return None,
    };
    let kind = match kind {
        "b" => ObjectKind::Blob,
        "m" => ObjectKind::Manifest,
        _ => return None,
    };
    if it.next().is_some() {
        return None;
    }
    Some((
        Key {
            kind,
            digest: digest.parse().ok()?,
        },
        protected,
    ))
}

fn rename_into_place(temp: &Path, dest: &Path) -> io::Result<()> {
    let dir = dest.parent().expect("object paths have a parent");
    fs::create_dir_all(dir)?;
    fs::rename(temp, dest)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_round_trip_and_leftovers_go() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        let bytes = Bytes::from_static(b"{\"schemaVersion\":2}");
        let d = Digest::sha256_of(&bytes);
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes,
        };
        s.write_manifest(&d, &m).unwrap();
        assert_eq!(s.read_manifest(&d).unwrap(), Some(m));
        let (_f, leftover) = s.temp_file().unwrap();
        drop(s);
        let _s = DiskStore::open(dir.path()).unwrap();
        assert!(!leftover.exists());
    }
}
