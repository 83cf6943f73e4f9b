//! Image references as people write them: `nginx`, `docker.io/library/nginx:1.27`,
//! `registry.example:5000/team/app@sha256:...`.
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

use std::fmt;
use std::str::FromStr;

use super::{Digest, NameError, RepoName, Tag};

/// Why an image reference could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    /// The repository part is not a valid name.
    #[error("invalid repository in image reference: {0}")]
    Name(#[from] NameError),
    /// The tag or digest part is invalid.
    #[error("invalid tag or digest in image reference")]
    Reference,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host (`docker.io`, `registry.example:5000`), when the reference names one.
    pub host: Option<String>,
    /// Repository.
    pub repo: RepoName,
    /// Tag, if given (`latest` when neither tag nor digest is).
    pub tag: Option<Tag>,
    /// Digest, if given.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// The reference to ask for: the digest if given, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".into(),
        }
    }
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (host, rest) = match s.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (Some(first.to_ascii_lowercase()), rest)
            }
            _ => (None, s),
        };
        let (name_tag, digest) = match rest.split_once('@') {
            Some((n, d)) => (
                n,
                Some(d.parse::<Digest>().map_err(|_| ImageRefError::Reference)?),
            ),
            None => (rest, None),
        };
        let (name, tag) = match name_tag.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (
                n,
                Some(t.parse::<Tag>().map_err(|_| ImageRefError::Reference)?),
            ),
            _ => (name_tag, None),
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".parse().expect("valid tag"))
        } else {
            tag
        };
        Ok(ImageRef {
            host,
            repo: name.parse()?,
            tag,
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        write!(f, "{}", self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let r: ImageRef = "nginx".parse().unwrap();
        assert_eq!(
            (r.host.clone(), r.repo.as_str(), r.reference()),
            (None, "nginx", "latest".into())
        );
        let r: ImageRef = "docker.io/library/nginx:1.27".parse().unwrap();
        assert_eq!(r.host.as_deref(), Some("docker.io"));
        assert_eq!(r.repo.as_str(), "library/nginx");
        assert_eq!(r.reference(), "1.27");
        let d = format!("sha256:{}", "a".repeat(64));
        let r: ImageRef = format!("127.0.0.1:5000/team/app@{d}").parse().unwrap();
        assert_eq!(r.host.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.reference(), d);
        let r: ImageRef = "localhost/app:v1".parse().unwrap();
        assert_eq!(r.host.as_deref(), Some("localhost"));
        assert!("UPPER/x".parse::<ImageRef>().is_err());
        assert!("app:bad tag".parse::<ImageRef>().is_err());
        assert_eq!(
            "ghcr.io/org/app:v1"
                .parse::<ImageRef>()
                .unwrap()
                .to_string(),
            "ghcr.io/org/app:v1"
        );
    }
}
