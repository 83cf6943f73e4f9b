//! Pinned images: what `berth warm --pin` or `berth import --pin` promised to keep whatever the
//! budget pressure (an air-gapped site cannot refetch). Recorded in `<dir>/pins.json`, written
//! crash-safely (temp file, fsync, rename, directory fsync) so a killed `warm --pin` or `unpin`
//! leaves the old records or the new ones. A file damaged anyway is set aside as
//! `pins.json.damaged` (for the operator to restore from) and berth starts with no pins.
//!
//! Architecture: docs/ARCHITECTURE.md, "On disk".

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::index::{Key, ObjectKind, PinError};
use super::Cache;
use crate::oci::Digest;

/// File name of the pin records.
pub const PINS_FILE: &str = "pins.json";

/// One pinned image: its reference and every object it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedImage {
    /// The reference as given (`docker.io/library/nginx:1.27`).
    pub reference: String,
    /// Upstream name it resolved to.
    pub upstream: String,
    /// Repository at the upstream.
    pub repository: String,
    /// The tag, if the reference named one.
    pub tag: Option<String>,
    /// The top-level manifest (or index) digest.
    pub manifest: String,
    /// Manifests the image needs (the top-level one included).
    pub manifests: Vec<String>,
    /// Blobs the image needs.
    pub blobs: Vec<String>,
}

impl PinnedImage {
    /// Every object as index keys (unparseable digests are skipped).
    pub fn keys(&self) -> Vec<Key> {
        let parse = |kind, d: &String| d.parse::<Digest>().ok().map(|digest| Key { kind, digest });
        self.manifests
            .iter()
            .filter_map(|d| parse(ObjectKind::Manifest, d))
            .chain(self.blobs.iter().filter_map(|d| parse(ObjectKind::Blob, d)))
            .collect()
    }
}

/// Where a damaged pins file is moved, so the next save does not overwrite what an operator
/// might still recover.
pub const DAMAGED_PINS_FILE: &str = "pins.json.damaged";

/// Reads the pin records (none when the file is absent). A file that does not parse (truncated,
/// garbage) is logged, moved to [`DAMAGED_PINS_FILE`] and read as no pins: a damaged state file
/// never stops berth from starting. Other read errors (permissions, I/O) are returned.
pub fn read(dir: &Path) -> std::io::Result<Vec<PinnedImage>> {
    let path = dir.join(PINS_FILE);
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    match serde_json::from_slice(&raw) {
        Ok(pins) => Ok(pins),
        Err(e) => {
            let aside = dir.join(DAMAGED_PINS_FILE);
            let moved = std::fs::rename(&path, &aside);
            tracing::warn!(
                path = %path.display(),
                error = %e,
                moved_to = %aside.display(),
                moved = moved.is_ok(),
                "pin records are damaged; starting with no pinned images (pin them again)"
            );
            Ok(Vec::new())
        }
    }
}

/// The pin records as saved.
pub fn encode(pins: &[PinnedImage]) -> Vec<u8> {
    serde_json::to_vec_pretty(pins).expect("plain records serialize")
}

// === impl Cache ===

impl Cache {
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

    /// Saves the pin records crash-safely (see [`super::DiskStore::write_small`]).
    pub(super) fn save_pins(&self, pins: &[PinnedImage]) {
        let path = self.store.root().join(PINS_FILE);
        if let Err(e) = self.store.write_small(&path, &encode(pins)) {
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
        let still: HashSet<Key> = pins.iter().flat_map(|p| p.keys()).collect();
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
}
