//! Manifest references: a tag or a digest.
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

/// Why a string is not a valid tag or digest reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Not matching `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    #[error("tag does not match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    BadTag,
    /// Looked like a digest (has a `:`) but is not a valid one.
    #[error("invalid digest: {0}")]
    BadDigest(#[from] DigestError),
}

/// A validated tag such as `latest` or `1.27-alpine`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let rest_ok = b[1.min(b.len())..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if first_ok && rest_ok && b.len() <= 128 {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ReferenceError::BadTag)
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A tag, resolved to a digest through the tag cache.
    Tag(Tag),
    /// A digest, served straight from the content-addressed store.
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.contains(':') {
            Ok(Reference::Digest(s.parse()?))
        } else {
            Ok(Reference::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_digests() {
        assert!(matches!("latest".parse(), Ok(Reference::Tag(_))));
        assert!(matches!("_x.Y-1".parse(), Ok(Reference::Tag(_))));
        assert!(matches!(
            format!("sha256:{}", "b".repeat(64)).parse(),
            Ok(Reference::Digest(_))
        ));
        assert_eq!("".parse::<Reference>(), Err(ReferenceError::BadTag));
        assert_eq!(".x".parse::<Reference>(), Err(ReferenceError::BadTag));
        assert_eq!("-x".parse::<Reference>(), Err(ReferenceError::BadTag));
        assert_eq!(
            "a".repeat(129).parse::<Reference>(),
            Err(ReferenceError::BadTag)
        );
        assert!("a".repeat(128).parse::<Reference>().is_ok());
        assert!(matches!(
            "sha1:abc".parse::<Reference>(),
            Err(ReferenceError::BadDigest(_))
        ));
    }
}
