//! Authorization decisions of the origin, cached per (principal, upstream, repository), and the
//! repository membership of digests ("a blob is served under R only if it is known to belong
//! to R", DESIGN §5).

use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::oci::Digest;

/// Most decisions and memberships kept in memory.
const MAX_DECISIONS: u64 = 100_000;
const MAX_MEMBERSHIPS: u64 = 1_000_000;

/// What the origin said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Allowed to pull.
    pub allow: bool,
    /// Reusable until then.
    pub until: Instant,
    /// An allow may still be used until then when the origin cannot be reached.
    pub grace_until: Instant,
}

/// The lookup key of a decision.
pub type DecisionKey = (String, String, String);

/// Decisions and memberships.
pub struct Decisions {
    decisions: Cache<DecisionKey, Decision>,
    members: Cache<(String, String, Digest), ()>,
}

impl Default for Decisions {
    fn default() -> Self {
        Decisions {
            decisions: Cache::builder().max_capacity(MAX_DECISIONS).build(),
            members: Cache::builder().max_capacity(MAX_MEMBERSHIPS).build(),
        }
    }
}

impl Decisions {
    /// A decision still valid now.
    pub fn valid(&self, key: &DecisionKey) -> Option<bool> {
        let d = self.decisions.get(key)?;
        (d.until > Instant::now()).then_some(d.allow)
    }

    /// An allow decision that expired but is within its grace period.
    pub fn in_grace(&self, key: &DecisionKey) -> bool {
        self.decisions
            .get(key)
            .is_some_and(|d| d.allow && d.grace_until > Instant::now())
    }

    /// Records an allow for `ttl`, usable offline for `grace` longer.
    pub fn allow(&self, key: DecisionKey, ttl: Duration, grace: Duration) {
        let now = Instant::now();
        self.decisions.insert(
            key,
            Decision {
                allow: true,
                until: now + ttl,
                grace_until: now + ttl + grace,
            },
        );
    }

    /// Records a denial for `ttl`.
    pub fn deny(&self, key: DecisionKey, ttl: Duration) {
        let now = Instant::now();
        self.decisions.insert(
            key,
            Decision {
                allow: false,
                until: now + ttl,
                grace_until: now,
            },
        );
    }

    /// Whether `digest` is known to belong to `repo` at `upstream`.
    pub fn is_member(&self, upstream: &str, repo: &str, digest: &Digest) -> bool {
        self.members
            .contains_key(&(upstream.to_owned(), repo.to_owned(), digest.clone()))
    }

    /// Records that `digest` belongs to `repo` at `upstream`.
    pub fn add_member(&self, upstream: &str, repo: &str, digest: Digest) {
        self.members
            .insert((upstream.to_owned(), repo.to_owned(), digest), ());
    }
}

/// Every digest a manifest or index references (config, layers, child manifests, subject).
pub fn referenced_digests(manifest: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        #[serde(default)]
        manifests: Vec<Descriptor>,
        subject: Option<Descriptor>,
        #[serde(default, rename = "fsLayers")]
        fs_layers: Vec<V1Layer>,
    }
    #[derive(serde::Deserialize)]
    struct V1Layer {
        #[serde(rename = "blobSum")]
        blob_sum: Option<String>,
    }
    let Ok(m) = serde_json::from_slice::<Manifest>(manifest) else {
        return Vec::new();
    };
    m.config
        .into_iter()
        .chain(m.layers)
        .chain(m.manifests)
        .chain(m.subject)
        .filter_map(|d| d.digest)
        .chain(m.fs_layers.into_iter().filter_map(|l| l.blob_sum))
        .filter_map(|d| d.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_references() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bogus"}}]}}"#
        );
        assert_eq!(referenced_digests(m.as_bytes()), vec![a.clone(), b]);
        let idx = format!(r#"{{"manifests":[{{"digest":"{a}"}}]}}"#);
        assert_eq!(referenced_digests(idx.as_bytes()), vec![a]);
        assert!(referenced_digests(b"not json").is_empty());
    }

    #[test]
    fn decisions_expire_and_grace() {
        let d = Decisions::default();
        let k: DecisionKey = ("p".into(), "u".into(), "r".into());
        assert_eq!(d.valid(&k), None);
        d.allow(k.clone(), Duration::ZERO, Duration::from_secs(60));
        assert_eq!(d.valid(&k), None);
        assert!(d.in_grace(&k));
        d.deny(k.clone(), Duration::from_secs(60));
        assert_eq!(d.valid(&k), Some(false));
        assert!(!d.in_grace(&k));
    }
}
