//! Repository names, validated against the distribution spec's grammar.
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

use std::fmt;
use std::str::FromStr;

/// Longest repository name berth accepts (the spec recommends clients keep names under 255).
pub const MAX_NAME_LEN: usize = 255;

/// Why a string is not a valid repository name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty name or empty path component.
    #[error("repository name has an empty component")]
    EmptyComponent,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    /// A character or separator the grammar does not allow.
    #[error("repository name component {0:?} does not match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*")]
    BadComponent(String),
}

/// A repository name such as `library/alpine`, checked against
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Number of `/`-separated components.
    pub fn components(&self) -> usize {
        self.0.split('/').count()
    }

    /// This name with `library/` in front (Docker Hub's official images).
    pub fn with_library_prefix(&self) -> RepoName {
        RepoName(format!("library/{}", self.0))
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        let sep = b[i];
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let run = &b[start..i];
        let ok = match sep {
            b'.' => run.len() == 1,
            b'_' => run.len() <= 2 && run.iter().all(|&x| x == b'_'),
            b'-' => run.iter().all(|&x| x == b'-'),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for c in s.split('/') {
            if c.is_empty() {
                return Err(NameError::EmptyComponent);
            }
            if !valid_component(c) {
                return Err(NameError::BadComponent(c.chars().take(64).collect()));
            }
        }
        Ok(RepoName(s.to_owned()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for n in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "my--app",
            "my_app",
            "my__app",
            "my.app",
            "0x/1",
        ] {
            assert!(n.parse::<RepoName>().is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for n in [
            "", "/", "a//b", "A", "a/", "/a", "..", "a/../b", "a/./b", "a___b", "a..b", "-a", "a-",
            "a_.b", "a b", "a%2fb",
        ] {
            assert!(n.parse::<RepoName>().is_err(), "{n:?}");
        }
        assert_eq!("a".repeat(256).parse::<RepoName>(), Err(NameError::TooLong));
    }
}
