//! Pinned images: what `berth warm --pin` or `berth import --pin` promised to keep whatever the
//! budget pressure (an air-gapped site cannot refetch). Recorded in `<dir>/pins.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::index::{Key, Kind};
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
            .filter_map(|d| parse(Kind::Manifest, d))
            .chain(self.blobs.iter().filter_map(|d| parse(Kind::Blob, d)))
            .collect()
    }
}

/// Reads the pin records (none when the file is absent).
pub fn read(dir: &Path) -> std::io::Result<Vec<PinnedImage>> {
    match std::fs::read(dir.join(PINS_FILE)) {
        Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{PINS_FILE}: {e}"))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
