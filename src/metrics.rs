//! Prometheus metrics, built once from a registry that `main` creates (never registered inside a
//! handler). Names are fixed by the observability issue; label values come from fixed sets
//! (routes, tiers, upstream names from config), never from repository names, tags or digests.
//!
//! Counters that other layers keep as plain atomics (cache usage, fill outcomes, upstream
//! bytes) are copied in by [`Metrics::refresh`] when `/metrics` is scraped.
//!
//! Architecture: docs/ARCHITECTURE.md, "Metrics".

mod hot;
mod labels;
mod prefetch;
mod scale;

pub use labels::method_label;
pub use prefetch::PrefetchMetrics;
pub use scale::ScaleMetrics;

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    register_histogram_vec_with_registry, register_histogram_with_registry,
    register_int_counter_vec_with_registry, register_int_counter_with_registry,
    register_int_gauge_vec_with_registry, register_int_gauge_with_registry, Encoder, Histogram,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};

/// Every metric berth exports.
pub struct Metrics {
    registry: Registry,
    /// `berth_http_requests_total{route,method,status}`.
    pub http_requests: IntCounterVec,
    /// `berth_http_request_duration_seconds{route,cache}`: time to the response head.
    pub http_duration: HistogramVec,
    /// `berth_cache_lookups_total{kind,tier,result}`: one per tier consulted. A manifest or
    /// small blob is looked up in memory, then (on a miss) on disk; a large blob on disk only;
    /// a tag mapping in memory (its disk copy is only a restart aid).
    pub cache_lookups: IntCounterVec,
    /// `berth_cache_size_bytes{tier}`.
    pub cache_size: IntGaugeVec,
    /// `berth_cache_capacity_bytes{tier}`.
    pub cache_capacity: IntGaugeVec,
    /// `berth_cache_objects{tier}`.
    pub cache_objects: IntGaugeVec,
    /// `berth_cache_evictions_total{tier}`.
    pub cache_evictions: IntCounterVec,
    /// `berth_cache_write_failures_total`: disk writes that failed (served pass-through).
    pub cache_write_failures: IntCounter,
    /// `berth_cache_passthrough_total`: blobs served without being stored.
    pub cache_passthrough: IntCounter,
    /// `berth_cache_corrupt_total{found_by}`: stored objects found corrupt at rest (by the
    /// serving path or a scrub) and removed.
    pub cache_corrupt: IntCounterVec,
    /// `berth_scrub_objects_total`: stored objects a scrub re-hashed.
    pub scrub_objects: IntCounter,
    /// `berth_scrub_bytes_total`: bytes a scrub read back.
    pub scrub_bytes: IntCounter,
    /// `berth_purged_total{kind}`: tag mappings, manifests and blobs dropped by purges.
    pub purged: IntCounterVec,
    /// `berth_served_bytes_total{source}`.
    pub served_bytes: IntCounterVec,
    /// `berth_upstream_requests_total{upstream,method,status}`.
    pub upstream_requests: IntCounterVec,
    /// `berth_upstream_request_duration_seconds{upstream}`.
    pub upstream_duration: HistogramVec,
    /// `berth_upstream_bytes_total{upstream}`.
    pub upstream_bytes: IntCounterVec,
    /// `berth_upstream_ratelimit_remaining{upstream}` (Docker Hub's `ratelimit-remaining`).
    pub upstream_ratelimit: IntGaugeVec,
    /// `berth_fills_in_flight`.
    pub fills_in_flight: IntGauge,
    /// `berth_memberships`: (upstream, repository, digest) evidence records held.
    pub memberships: IntGauge,
    /// `berth_fill_waiters_total`: requests that joined a fill another request started.
    pub fill_waiters: IntCounter,
    /// `berth_fills_queued`: fills waiting for a slot under `cache.max_concurrent_fills`.
    pub fills_queued: IntGauge,
    /// `berth_fill_queue_wait_seconds`: how long each fill waited for a slot (zero when one
    /// was free).
    pub fill_queue_wait: Histogram,
    /// `berth_unverified_range_responses_total`: Range responses that carried bytes not yet
    /// verified against the blob's digest (served from a running fill or passed through).
    pub unverified_range_responses: IntCounter,
    /// `berth_fill_failures_total{reason}`.
    pub fill_failures: IntCounterVec,
    /// `berth_digest_mismatches_total{upstream}`.
    pub digest_mismatches: IntCounterVec,
    /// `berth_stale_served_total{kind}`.
    pub stale_served: IntCounterVec,
    /// `berth_revalidations_total{kind,result}`: stale tag mappings (`tag`) and listings
    /// (`listing`) checked with the origin, by what it said: `unchanged` (same digest, or `304`),
    /// `changed`, or `error` (no answer to go by; stale-if-error may serve the old one).
    pub revalidations: IntCounterVec,
    /// `berth_events_total{action,outcome}`: registry notifications received on `/events`.
    pub events: IntCounterVec,
    /// `berth_auth_decisions_total{result,source}`.
    pub auth_decisions: IntCounterVec,
    /// `berth_build_info{version}`.
    pub build_info: IntGaugeVec,
    /// `berth_connections_open{listener}`: connections held now (each holds a file descriptor).
    pub connections_open: IntGaugeVec,
    /// `berth_connections_total{listener,result}`: `accepted`, or `refused` when accept failed
    /// for lack of resources (file descriptors, memory).
    pub connections: IntCounterVec,
    /// `berth_connections_closed_total{listener,reason}`: connections berth closed itself
    /// (`handshake_timeout`, `header_timeout`, `idle_timeout`, `shed`).
    pub connections_closed: IntCounterVec,
    /// `berth_listener_pauses_total{listener,reason}`: times a listener stopped accepting
    /// (`at_capacity`, `accept_error`).
    pub listener_pauses: IntCounterVec,
    /// Shared tier and peers (`berth_shared_*`, `berth_peer*`, `berth_origin_bytes_spared_*`).
    pub scale: ScaleMetrics,
    /// Manifest-driven prefetch (`berth_prefetch_*`).
    pub prefetch: PrefetchMetrics,
    /// Last values copied into counters by `refresh`, to add only the difference.
    last: Mutex<HashMap<String, u64>>,
    /// Handles of the per-request series.
    hot: hot::HotSeries,
}

/// Figures other layers keep, copied in at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Disk tier: bytes used, capacity, objects, evictions so far.
    pub disk: (u64, u64, u64, u64),
    /// Memory tier: bytes used, capacity, objects, evictions so far.
    pub memory: (u64, u64, u64, u64),
    /// Fills in progress.
    pub fills_in_flight: u64,
    /// Membership evidence records held.
    pub memberships: u64,
    /// Fill failures so far by reason.
    pub fill_failures: Vec<(&'static str, u64)>,
    /// Disk write failures so far.
    pub write_failures: u64,
    /// Blobs served without storing so far.
    pub passthrough: u64,
    /// Stored objects found corrupt at rest so far: by the serving path, by scrubs.
    pub corrupt: (u64, u64),
    /// Objects and bytes scrubbed so far.
    pub scrubbed: (u64, u64),
    /// Tag mappings, manifests and blobs purged so far.
    pub purged: (u64, u64, u64),
    /// Blob fills that failed digest verification so far, per upstream.
    pub fill_digest_mismatches: Vec<(String, u64)>,
    /// Per upstream: name, body bytes received so far, last rate-limit remaining (if seen).
    pub upstreams: Vec<(String, u64, Option<i64>)>,
}

impl Metrics {
    /// Registers every family in `registry`.
    pub fn new(registry: Registry) -> prometheus::Result<Metrics> {
        let r = &registry;
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 300.0,
        ];
        let m = Metrics {
            http_requests: register_int_counter_vec_with_registry!(
                "berth_http_requests_total",
                "Client requests by route, method and status.",
                &["route", "method", "status"],
                r
            )?,
            http_duration: register_histogram_vec_with_registry!(
                "berth_http_request_duration_seconds",
                "Time from request to response head, by route and cache result.",
                &["route", "cache"],
                latency.clone(),
                r
            )?,
            cache_lookups: register_int_counter_vec_with_registry!(
                "berth_cache_lookups_total",
                "Cache lookups by kind (manifest, blob, tag), tier and result.",
                &["kind", "tier", "result"],
                r
            )?,
            cache_size: register_int_gauge_vec_with_registry!(
                "berth_cache_size_bytes",
                "Bytes held by each cache tier.",
                &["tier"],
                r
            )?,
            cache_capacity: register_int_gauge_vec_with_registry!(
                "berth_cache_capacity_bytes",
                "Byte budget of each cache tier.",
                &["tier"],
                r
            )?,
            cache_objects: register_int_gauge_vec_with_registry!(
                "berth_cache_objects",
                "Objects held by each cache tier.",
                &["tier"],
                r
            )?,
            cache_evictions: register_int_counter_vec_with_registry!(
                "berth_cache_evictions_total",
                "Objects evicted from each cache tier to stay within budget.",
                &["tier"],
                r
            )?,
            cache_write_failures: register_int_counter_with_registry!(
                "berth_cache_write_failures_total",
                "Disk writes that failed; the client was served from the origin.",
                r
            )?,
            cache_passthrough: register_int_counter_with_registry!(
                "berth_cache_passthrough_total",
                "Blobs served without being stored (too large, no budget, disk failure).",
                r
            )?,
            cache_corrupt: register_int_counter_vec_with_registry!(
                "berth_cache_corrupt_total",
                "Stored objects found corrupt at rest and removed, by who found them.",
                &["found_by"],
                r
            )?,
            scrub_objects: register_int_counter_with_registry!(
                "berth_scrub_objects_total",
                "Stored objects a scrub re-hashed.",
                r
            )?,
            scrub_bytes: register_int_counter_with_registry!(
                "berth_scrub_bytes_total",
                "Bytes a scrub read back from the disk tier.",
                r
            )?,
            purged: register_int_counter_vec_with_registry!(
                "berth_purged_total",
                "Tag mappings, manifests and blobs dropped by purges, by kind.",
                &["kind"],
                r
            )?,
            served_bytes: register_int_counter_vec_with_registry!(
                "berth_served_bytes_total",
                "Body bytes sent to clients, by where they came from (memory, disk, upstream).",
                &["source"],
                r
            )?,
            upstream_requests: register_int_counter_vec_with_registry!(
                "berth_upstream_requests_total",
                "Requests sent to origins, by upstream, method and status.",
                &["upstream", "method", "status"],
                r
            )?,
            upstream_duration: register_histogram_vec_with_registry!(
                "berth_upstream_request_duration_seconds",
                "Origin time to response head.",
                &["upstream"],
                latency.clone(),
                r
            )?,
            upstream_bytes: register_int_counter_vec_with_registry!(
                "berth_upstream_bytes_total",
                "Body bytes received from each origin.",
                &["upstream"],
                r
            )?,
            upstream_ratelimit: register_int_gauge_vec_with_registry!(
                "berth_upstream_ratelimit_remaining",
                "Pulls left in the origin's rate-limit window (Docker Hub's ratelimit-remaining).",
                &["upstream"],
                r
            )?,
            memberships: register_int_gauge_with_registry!(
                "berth_memberships",
                "Membership evidence records held: which repository of which upstream each digest was shown in.",
                r
            )?,
            fills_in_flight: register_int_gauge_with_registry!(
                "berth_fills_in_flight",
                "Blob fills from origins in progress.",
                r
            )?,
            fill_waiters: register_int_counter_with_registry!(
                "berth_fill_waiters_total",
                "Requests that joined a fill another request started.",
                r
            )?,
            fills_queued: register_int_gauge_with_registry!(
                "berth_fills_queued",
                "Blob fills waiting for a slot under cache.max_concurrent_fills.",
                r
            )?,
            fill_queue_wait: register_histogram_with_registry!(
                "berth_fill_queue_wait_seconds",
                "Time each blob fill waited for a slot before fetching from its origin.",
                latency,
                r
            )?,
            unverified_range_responses: register_int_counter_with_registry!(
                "berth_unverified_range_responses_total",
                "Range responses carrying blob bytes not yet verified against the digest.",
                r
            )?,
            fill_failures: register_int_counter_vec_with_registry!(
                "berth_fill_failures_total",
                "Blob fills that failed, by reason.",
                &["reason"],
                r
            )?,
            digest_mismatches: register_int_counter_vec_with_registry!(
                "berth_digest_mismatches_total",
                "Origin content that did not match its digest.",
                &["upstream"],
                r
            )?,
            events: register_int_counter_vec_with_registry!(
                "berth_events_total",
                "Registry notifications received, by action and what berth did.",
                &["action", "outcome"],
                r
            )?,
            revalidations: register_int_counter_vec_with_registry!(
                "berth_revalidations_total",
                "Stale tag mappings and listings checked with the origin, by kind and result.",
                &["kind", "result"],
                r
            )?,
            stale_served: register_int_counter_vec_with_registry!(
                "berth_stale_served_total",
                "Answers served stale because the origin failed, by kind.",
                &["kind"],
                r
            )?,
            auth_decisions: register_int_counter_vec_with_registry!(
                "berth_auth_decisions_total",
                "Authorization decisions by result and source.",
                &["result", "source"],
                r
            )?,
            build_info: register_int_gauge_vec_with_registry!(
                "berth_build_info",
                "berth version.",
                &["version"],
                r
            )?,
            connections_open: register_int_gauge_vec_with_registry!(
                "berth_connections_open",
                "Client or admin connections open now.",
                &["listener"],
                r
            )?,
            connections: register_int_counter_vec_with_registry!(
                "berth_connections_total",
                "Connections accepted, or refused for lack of resources, by listener.",
                &["listener", "result"],
                r
            )?,
            connections_closed: register_int_counter_vec_with_registry!(
                "berth_connections_closed_total",
                "Connections berth closed itself, by listener and reason.",
                &["listener", "reason"],
                r
            )?,
            listener_pauses: register_int_counter_vec_with_registry!(
                "berth_listener_pauses_total",
                "Times a listener stopped accepting, by listener and reason.",
                &["listener", "reason"],
                r
            )?,
            scale: ScaleMetrics::new(r)?,
            prefetch: PrefetchMetrics::new(r)?,
            last: Mutex::new(HashMap::new()),
            hot: hot::HotSeries::new(),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series that should exist from the start, so that rates and alerts see zeros.
        for source in ["memory", "disk", "upstream", "shared", "peer"] {
            m.served_bytes.with_label_values(&[source]);
        }
        for (kind, tier) in [
            ("manifest", "memory"),
            ("manifest", "disk"),
            ("blob", "memory"),
            ("blob", "disk"),
            ("tag", "memory"),
        ] {
            for result in ["hit", "miss"] {
                m.cache_lookups.with_label_values(&[kind, tier, result]);
            }
        }
        for reason in [
            "digest_mismatch",
            "timeout",
            "unreachable",
            "status",
            "auth",
            "invalid",
            "offline",
            "queue_timeout",
            "internal",
        ] {
            m.fill_failures.with_label_values(&[reason]);
        }
        for listener in ["client", "admin", "peer"] {
            m.connections_open.with_label_values(&[listener]);
            for result in ["accepted", "refused"] {
                m.connections.with_label_values(&[listener, result]);
            }
            for reason in [
                "handshake_timeout",
                "header_timeout",
                "idle_timeout",
                "shed",
            ] {
                m.connections_closed.with_label_values(&[listener, reason]);
            }
            for reason in ["at_capacity", "accept_error"] {
                m.listener_pauses.with_label_values(&[listener, reason]);
            }
        }
        for result in ["allow", "deny", "error"] {
            for source in ["public", "local", "cache", "origin", "grace"] {
                m.auth_decisions.with_label_values(&[result, source]);
            }
        }
        for kind in ["manifest", "tags", "referrers"] {
            m.stale_served.with_label_values(&[kind]);
        }
        Ok(m)
    }

    /// Counts one request in `berth_http_requests_total` (a resolved handle, no label lookup
    /// for the common label sets).
    pub fn count_request(&self, route: &str, method: &str, status: &str) {
        self.hot.request(&self.http_requests, route, method, status);
    }

    /// Observes one request's time to the response head in
    /// `berth_http_request_duration_seconds`.
    pub fn observe_request(&self, route: &str, cache: &str, secs: f64) {
        self.hot.duration(&self.http_duration, route, cache, secs);
    }

    /// Counts one lookup in `berth_cache_lookups_total`.
    pub fn count_lookup(&self, kind: &str, tier: &str, hit: bool) {
        self.hot.lookup(&self.cache_lookups, kind, tier, hit);
    }

    /// The `berth_served_bytes_total` counter of `source`.
    pub fn served_bytes_of(&self, source: &str) -> IntCounter {
        self.hot.served(&self.served_bytes, source)
    }

    /// Counts one decision in `berth_auth_decisions_total`.
    pub fn count_auth(&self, result: &str, source: &str) {
        self.hot.auth(&self.auth_decisions, result, source);
    }

    /// Adds the growth of a monotonic figure kept elsewhere to `counter`.
    fn add_delta(&self, key: &str, now: u64, counter: &IntCounter) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let prev = last.insert(key.to_owned(), now).unwrap_or(0);
        counter.inc_by(now.saturating_sub(prev));
    }

    /// Copies figures kept by other layers into the exported families.
    pub fn refresh(&self, s: &Snapshot) {
        for (tier, (used, cap, objects, evictions), key) in [
            ("disk", s.disk, "evict_disk"),
            ("memory", s.memory, "evict_memory"),
        ] {
            self.cache_size.with_label_values(&[tier]).set(used as i64);
            self.cache_capacity
                .with_label_values(&[tier])
                .set(cap as i64);
            self.cache_objects
                .with_label_values(&[tier])
                .set(objects as i64);
            self.add_delta(
                key,
                evictions,
                &self.cache_evictions.with_label_values(&[tier]),
            );
        }
        self.fills_in_flight.set(s.fills_in_flight as i64);
        self.memberships.set(s.memberships as i64);
        for (reason, n) in &s.fill_failures {
            self.add_delta(reason, *n, &self.fill_failures.with_label_values(&[reason]));
        }
        self.add_delta(
            "write_failures",
            s.write_failures,
            &self.cache_write_failures,
        );
        self.add_delta("passthrough", s.passthrough, &self.cache_passthrough);
        for (found_by, n) in [("serve", s.corrupt.0), ("scrub", s.corrupt.1)] {
            let counter = self.cache_corrupt.with_label_values(&[found_by]);
            self.add_delta(&format!("corrupt/{found_by}"), n, &counter);
        }
        self.add_delta("scrub_objects", s.scrubbed.0, &self.scrub_objects);
        self.add_delta("scrub_bytes", s.scrubbed.1, &self.scrub_bytes);
        let (tags, manifests, blobs) = s.purged;
        for (kind, n) in [("tag", tags), ("manifest", manifests), ("blob", blobs)] {
            let counter = self.purged.with_label_values(&[kind]);
            self.add_delta(&format!("purged/{kind}"), n, &counter);
        }
        for (name, n) in &s.fill_digest_mismatches {
            let counter = self.digest_mismatches.with_label_values(&[name]);
            self.add_delta(&format!("fill_mismatch/{name}"), *n, &counter);
        }
        for (name, bytes, ratelimit) in &s.upstreams {
            self.digest_mismatches.with_label_values(&[name]);
            let counter = self.upstream_bytes.with_label_values(&[name]);
            self.add_delta(&format!("upstream_bytes/{name}"), *bytes, &counter);
            if let Some(r) = ratelimit {
                self.upstream_ratelimit.with_label_values(&[name]).set(*r);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
