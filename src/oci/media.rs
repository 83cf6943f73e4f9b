//! Manifest media types berth asks origins for and recognises in answers.
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What berth sends upstream when a client sent no `Accept` at all: every modern manifest type,
/// so that the origin does not down-convert to schema 1.
pub const DEFAULT_ACCEPT: &[&str] = &[
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

/// Largest manifest berth accepts from an origin (distribution's own limit is 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Whether a manifest of `media_type` is acceptable to a client that sent `accept` values.
/// An empty accept list, `*/*` or a missing media type accept anything.
pub fn accepts(accept: &[String], media_type: &str) -> bool {
    if accept.is_empty() || media_type.is_empty() {
        return true;
    }
    accept.iter().any(|a| {
        let a = a.split(';').next().unwrap_or("").trim();
        a == "*/*" || a.eq_ignore_ascii_case(media_type)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        assert!(accepts(&[], OCI_MANIFEST));
        assert!(accepts(&[format!("{OCI_MANIFEST}; q=0.5")], OCI_MANIFEST));
        assert!(accepts(&["*/*".into()], OCI_INDEX));
        assert!(!accepts(&[DOCKER_MANIFEST.into()], OCI_INDEX));
    }
}
