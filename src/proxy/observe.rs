//! Where the cache's fills meet the metrics (docs/ARCHITECTURE.md, "Cache"): the fills report
//! queueing and unverified Range responses as they happen through [`FillObserver`], which
//! [`Metrics`] implements here, in the layer that wires the two together, so that neither
//! imports the other.

use std::time::Duration;

use crate::cache::FillObserver;
use crate::metrics::Metrics;

/// The fills report queueing and unverified Range responses as they happen.
impl FillObserver for Metrics {
    fn fills_queued(&self, queued: usize) {
        self.fills_queued.set(queued as i64);
    }

    fn fill_queue_wait(&self, waited: Duration) {
        self.fill_queue_wait.observe(waited.as_secs_f64());
    }

    fn unverified_range_response(&self) {
        self.unverified_range_responses.inc();
    }
}
