//! Metrics of manifest-driven prefetch (docs/ARCHITECTURE.md, "Prefetch").

use prometheus::{
    register_int_counter_vec_with_registry, register_int_gauge_with_registry, IntCounter,
    IntCounterVec, IntGauge, Registry,
};

/// Results a prefetched blob is counted under in `berth_prefetch_blobs_total{result}`.
pub const BLOB_RESULTS: [&str; 8] = [
    "started",
    "present",
    "filled",
    "failed",
    "over_budget",
    "busy",
    "abandoned",
    "client_retried",
];

/// Prefetch counters (registered at zero whether prefetch is on or not).
pub struct PrefetchMetrics {
    /// `berth_prefetch_blobs_total{result}`: blobs of served image manifests, by what prefetch
    /// did with them: `started` a fill, found it `present` (cached or already filling),
    /// `filled` (verified and stored), `failed`, skipped as `over_budget` (the image's missing
    /// bytes exceed a quarter of the unpinned disk budget), `busy` (too many images queued),
    /// `abandoned` (an earlier blob of the image failed); `client_retried`: a client that had
    /// joined a prefetch fill which failed got its own fill.
    pub blobs: IntCounterVec,
    /// `berth_prefetch_bytes_total{outcome}`: `fetched` by prefetch fills (verified), of which
    /// `used` (a client asked for the blob within an hour) or `wasted` (none did).
    pub bytes: IntCounterVec,
    /// `berth_prefetch_images_running`: images whose prefetch is running.
    pub images_running: IntGauge,
}

impl PrefetchMetrics {
    /// Registers every family in `r`.
    pub fn new(r: &Registry) -> prometheus::Result<PrefetchMetrics> {
        let m = PrefetchMetrics {
            blobs: register_int_counter_vec_with_registry!(
                "berth_prefetch_blobs_total",
                "Blobs of served image manifests by what prefetch did (started, present, filled, failed, over_budget, busy, abandoned, client_retried).",
                &["result"],
                r
            )?,
            bytes: register_int_counter_vec_with_registry!(
                "berth_prefetch_bytes_total",
                "Bytes prefetched (fetched), and of those later asked for by a client (used) or not within an hour (wasted).",
                &["outcome"],
                r
            )?,
            images_running: register_int_gauge_with_registry!(
                "berth_prefetch_images_running",
                "Images whose prefetch is running.",
                r
            )?,
        };
        for result in BLOB_RESULTS {
            m.blobs.with_label_values(&[result]);
        }
        for outcome in ["fetched", "used", "wasted"] {
            m.bytes.with_label_values(&[outcome]);
        }
        Ok(m)
    }

    /// The counter of `berth_prefetch_blobs_total{result}`.
    pub fn blob(&self, result: &str) -> IntCounter {
        self.blobs.with_label_values(&[result])
    }

    /// The counter of `berth_prefetch_bytes_total{outcome}`.
    pub fn bytes(&self, outcome: &str) -> IntCounter {
        self.bytes.with_label_values(&[outcome])
    }
}
