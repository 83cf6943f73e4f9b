//! Authorization decisions of the origin, cached per (principal, upstream, repository).
//! Repository membership (which digests belong where) is evidence about content and lives with
//! the cache ([`crate::cache::Memberships`]).
//!
//! Architecture: docs/ARCHITECTURE.md, "Authorization".

use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::clock::Clock;

/// Most decisions kept in memory.
const MAX_DECISIONS: u64 = 100_000;

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

/// Decisions, bounded in number.
pub struct Decisions {
    decisions: Cache<DecisionKey, Decision>,
    clock: Clock,
}

impl Default for Decisions {
    fn default() -> Self {
        Decisions::new(Clock::default())
    }
}

impl Decisions {
    /// Decisions timed by `clock`.
    pub fn new(clock: Clock) -> Decisions {
        Decisions {
            decisions: Cache::builder().max_capacity(MAX_DECISIONS).build(),
            clock,
        }
    }

    /// A decision still valid now.
    pub fn valid(&self, key: &DecisionKey) -> Option<bool> {
        let d = self.decisions.get(key)?;
        (d.until > self.clock.now()).then_some(d.allow)
    }

    /// An allow decision that expired but is within its grace period.
    pub fn in_grace(&self, key: &DecisionKey) -> bool {
        self.decisions
            .get(key)
            .is_some_and(|d| d.allow && d.grace_until > self.clock.now())
    }

    /// Records an allow for `ttl`, usable offline for `grace` longer.
    pub fn allow(&self, key: DecisionKey, ttl: Duration, grace: Duration) {
        let now = self.clock.now();
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
        let now = self.clock.now();
        self.decisions.insert(
            key,
            Decision {
                allow: false,
                until: now + ttl,
                grace_until: now,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
