//! The clock berth reads for the expiries it decides itself (docs/ARCHITECTURE.md,
//! "Authorization"): how long an origin's decision is reused, whether a token berth issued is
//! still good. It is the system clock plus an offset that only moves forward, so that tests (and
//! drills) can let time pass without sleeping; origins keep their own clocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The system clock, possibly moved ahead. Clones share the offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    ahead_nanos: Arc<AtomicU64>,
}

impl Clock {
    /// Now, for deadlines berth keeps in memory.
    pub fn now(&self) -> Instant {
        Instant::now() + self.ahead()
    }

    /// Now, for comparing with wall-clock times such as a JWT's `exp`.
    pub fn system_now(&self) -> SystemTime {
        SystemTime::now() + self.ahead()
    }

    /// Moves this clock forward by `by` (tests and drills: expiries come due without waiting).
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.ahead_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    fn ahead(&self) -> Duration {
        Duration::from_nanos(self.ahead_nanos.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_both_readings_and_is_shared_by_clones() {
        let c = Clock::default();
        let other = c.clone();
        let (i, s) = (c.now(), c.system_now());
        other.advance(Duration::from_secs(3600));
        assert!(c.now() >= i + Duration::from_secs(3600));
        assert!(c.system_now() >= s + Duration::from_secs(3600));
    }
}
