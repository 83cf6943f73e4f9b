//! Content digests (`sha256:<64 hex>`, `sha512:<128 hex>`) and a streaming hasher that checks
//! bytes as they pass.
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// The hash algorithms the OCI image spec registers and berth accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgorithm {
    /// `sha256`, the canonical algorithm.
    Sha256,
    /// `sha512`.
    Sha512,
}

impl DigestAlgorithm {
    /// The algorithm's name as written in a digest string.
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding of this algorithm's output.
    pub fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

/// Why a string is not a digest berth accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `algorithm:` prefix.
    #[error("digest has no algorithm prefix")]
    MissingAlgorithm,
    /// An algorithm other than sha256 / sha512.
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
    /// The encoded part has the wrong length or is not lowercase hex.
    #[error("digest is not lowercase hex of the algorithm's length")]
    BadEncoding,
}

/// A validated content digest. Its string form is safe to use as a file name component.
///
/// Kept as its string form (`algorithm:hex`), which is what headers, paths and logs want:
/// displaying it is a copy. Ordered as that string, which is by algorithm, then hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// `algorithm:hex`.
    full: String,
    algorithm: DigestAlgorithm,
}

impl Digest {
    /// The digest's algorithm.
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The lowercase hex part, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        &self.full[self.algorithm.as_str().len() + 1..]
    }

    /// The string form, `algorithm:hex`.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    fn new(algorithm: DigestAlgorithm, hex: &str) -> Digest {
        let alg = algorithm.as_str();
        let mut full = String::with_capacity(alg.len() + 1 + hex.len());
        full.push_str(alg);
        full.push(':');
        full.push_str(hex);
        Digest { full, algorithm }
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(DigestAlgorithm::Sha256);
        h.update(bytes);
        h.finish()
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s.split_once(':').ok_or(DigestError::MissingAlgorithm)?;
        let algorithm = match alg {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => return Err(DigestError::UnsupportedAlgorithm),
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::BadEncoding);
        }
        Ok(Digest::new(algorithm, hex))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// Incremental hasher for either algorithm, used to verify bytes while they stream.
pub enum Hasher {
    /// sha256 state.
    Sha256(Sha256),
    /// sha512 state.
    Sha512(Sha512),
}

impl Hasher {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: DigestAlgorithm) -> Hasher {
        match algorithm {
            DigestAlgorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            DigestAlgorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (DigestAlgorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (DigestAlgorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest::new(algorithm, &hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(d.algorithm(), DigestAlgorithm::Sha256);
        assert_eq!(d.to_string(), format!("sha256:{}", "a".repeat(64)));
        assert!(format!("sha512:{}", "0".repeat(128))
            .parse::<Digest>()
            .is_ok());
        assert_eq!("abc".parse::<Digest>(), Err(DigestError::MissingAlgorithm));
        assert_eq!(
            format!("md5:{}", "a".repeat(32)).parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert_eq!(
            format!("sha256:{}", "A".repeat(64)).parse::<Digest>(),
            Err(DigestError::BadEncoding)
        );
        assert_eq!(
            "sha256:../../etc/passwd".parse::<Digest>(),
            Err(DigestError::BadEncoding)
        );
        assert_eq!(
            format!("sha256:{}", "a".repeat(63)).parse::<Digest>(),
            Err(DigestError::BadEncoding)
        );
    }

    #[test]
    fn hashes_known_value() {
        assert_eq!(
            Digest::sha256_of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
