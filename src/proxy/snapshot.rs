//! The figures other layers keep as plain counters, gathered for a `/metrics` scrape
//! (docs/ARCHITECTURE.md, "Metrics").

use super::App;

impl App {
    /// Figures kept by the cache and upstream clients, for [`crate::metrics::Metrics::refresh`].
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        self.prefetch.sweep();
        let disk = self.cache.index().usage();
        let stats = self.cache.fills().stats();
        let failures = stats
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut by_reason: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let mut mismatches: std::collections::BTreeMap<String, u64> = Default::default();
        for ((reason, upstream), n) in failures {
            *by_reason.entry(reason).or_default() += n;
            if reason == "digest_mismatch" && self.upstreams.by_name(&upstream).is_some() {
                *mismatches.entry(upstream).or_default() += n;
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        crate::metrics::Snapshot {
            disk: (
                disk.used + disk.reserved,
                self.cache.index().budget(),
                disk.objects,
                disk.evictions,
            ),
            memory: self.cache.memory().usage(),
            fills_in_flight: self.cache.fills().in_flight() as u64,
            memberships: self.cache.memberships().len(),
            fill_failures: by_reason.into_iter().collect(),
            fill_digest_mismatches: mismatches.into_iter().collect(),
            write_failures: stats.write_failures.load(Relaxed),
            passthrough: stats.pass_through.load(Relaxed),
            corrupt: (
                stats.corrupt_at_rest.load(Relaxed),
                self.cache.corruption().by_scrub.load(Relaxed),
            ),
            scrubbed: (
                self.cache.corruption().scrubbed_objects.load(Relaxed),
                self.cache.corruption().scrubbed_bytes.load(Relaxed),
            ),
            purged: (
                self.cache.purged().tags.load(Relaxed),
                self.cache.purged().manifests.load(Relaxed),
                self.cache.purged().blobs.load(Relaxed),
            ),
            upstreams: self
                .upstreams
                .all()
                .iter()
                .map(|u| {
                    (
                        u.name().to_owned(),
                        u.bytes_received(),
                        u.ratelimit_remaining(),
                    )
                })
                .collect(),
        }
    }
}
