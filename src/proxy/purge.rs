//! Purge targets as operators name them (docs/ARCHITECTURE.md, "Cache"): a digest, or an image
//! reference resolved to an upstream the way `warm` and containerd's `ns` resolve it.

use crate::cache::{Cache, PurgeError, PurgeReport};
use crate::oci::{Digest, ImageRef};
use crate::upstream::Upstreams;

/// Why a purge target did nothing.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target names no digest, image or upstream.
    #[error("{0}")]
    Invalid(String),
    /// The cache refused or had nothing.
    #[error(transparent)]
    Purge(#[from] PurgeError),
}

/// Purges `target`: `sha256:…` (an image by its manifest or index, or a blob), or an image
/// reference (`host/repo:tag` drops the tag mapping and the image it points to, or the mapping
/// alone with `tag_only`; `host/repo@sha256:…` drops that image). Blocking.
pub fn purge(
    cache: &Cache,
    upstreams: &Upstreams,
    target: &str,
    tag_only: bool,
    force: bool,
) -> Result<PurgeReport, TargetError> {
    if let Ok(d) = target.parse::<Digest>() {
        return Ok(cache.purge_digest(&d, force)?);
    }
    let image: ImageRef = target.parse().map_err(|e| {
        TargetError::Invalid(format!(
            "{target:?} is neither a digest nor an image reference: {e}"
        ))
    })?;
    if let Some(d) = &image.digest {
        return Ok(cache.purge_digest(d, force)?);
    }
    let sel = upstreams
        .select(image.host.as_deref(), image.repo.clone())
        .map_err(|e| TargetError::Invalid(format!("{target}: {e}")))?;
    let tag = image
        .tag
        .as_ref()
        .ok_or_else(|| TargetError::Invalid(format!("{target}: no tag")))?;
    Ok(cache.purge_tag(sel.upstream.name(), &sel.name, tag, !tag_only, force)?)
}
