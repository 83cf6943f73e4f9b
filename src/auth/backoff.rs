//! Refused credentials, remembered with a growing wait: a client retrying a wrong password
//! costs neither a bcrypt run nor a login attempt at the origin until the wait is over, so a
//! stream of wrong passwords cannot get berth's address locked out by the origin.
//!
//! Architecture: docs/ARCHITECTURE.md, "Authorization".

use std::time::{Duration, Instant};

use moka::sync::Cache;

/// Most credentials remembered.
const MAX_REMEMBERED: u64 = 100_000;
/// The wait after a first refusal; it doubles with each further one.
const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// Refusals per credential key (a hash, never the credential).
pub struct Backoff {
    refused: Cache<String, (u32, Instant)>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            refused: Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .time_to_idle(MAX_WAIT * 2)
                .build(),
        }
    }
}

impl Backoff {
    /// How long `key` must still wait, if it was refused recently.
    pub fn blocked(&self, key: &str) -> Option<Duration> {
        let (_, until) = self.refused.get(key)?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a refusal: the wait doubles from [`FIRST_WAIT`] up to [`MAX_WAIT`].
    pub fn failed(&self, key: &str) {
        let n = self
            .refused
            .get(key)
            .map_or(0, |(n, _)| n)
            .saturating_add(1);
        let wait = FIRST_WAIT
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(MAX_WAIT);
        self.refused
            .insert(key.to_owned(), (n, Instant::now() + wait));
    }

    /// Forgets the refusals of a credential that was accepted.
    pub fn succeeded(&self, key: &str) {
        self.refused.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_and_reset() {
        let b = Backoff::default();
        assert_eq!(b.blocked("k"), None);
        b.failed("k");
        let first = b.blocked("k").expect("blocked after a refusal");
        assert!(first <= FIRST_WAIT);
        b.failed("k");
        b.failed("k");
        let third = b.blocked("k").unwrap();
        assert!(third > FIRST_WAIT * 3, "{third:?}");
        for _ in 0..40 {
            b.failed("k");
        }
        assert!(b.blocked("k").unwrap() <= MAX_WAIT);
        assert_eq!(b.blocked("other"), None);
        b.succeeded("k");
        assert_eq!(b.blocked("k"), None);
    }
}
