//! The disk tier's file layout and its crash-safe writes: every object is written to a temp file
//! in the same filesystem, verified, fsynced and renamed into place under its digest.
//!
//! ```text
//! <dir>/blobs/sha256/ab/abcdef...     layer and config bytes
//! <dir>/manifests/sha256/ab/abcd...   "<media type>\n" + manifest bytes
//! <dir>/tags/<upstream>/<repo>/_tags/<tag>/<accept-key>.json
//! <dir>/tmp/                          fills in progress; emptied at startup
//! ```

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::oci::{Digest, Hasher};

/// A manifest as stored: its media type and exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// Content-Type the origin gave it.
    pub media_type: String,
    /// The bytes, exactly as the origin sent them.
    pub bytes: Bytes,
}

/// Paths and atomic writes of the disk tier.
pub struct DiskStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
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
        })
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

    /// Where a blob lives once committed.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.object_path("blobs", d)
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
        file.sync_all()?;
        let dest = self.blob_path(d);
        rename_into_place(temp, &dest)
    }

    /// Reads a stored manifest.
    pub fn read_manifest(&self, d: &Digest) -> io::Result<Option<StoredManifest>> {
        let raw = match fs::read(self.object_path("manifests", d)) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let nl = raw.iter().position(|&b| b == b'\n').ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "manifest file has no header")
        })?;
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

    /// Writes a small file atomically (temp + rename, no fsync: used for re-derivable state).
    pub fn write_small(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let (mut f, temp) = self.temp_file()?;
        let r = f
            .write_all(bytes)
            .and_then(|_| rename_into_place(&temp, dest));
        if r.is_err() {
            let _ = fs::remove_file(&temp);
        }
        r
    }
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
