//! Metrics of a scaled-out berth: the shared tier and the peers of a cluster.
//!
//! Architecture: docs/ARCHITECTURE.md, "Metrics".

use prometheus::{
    register_int_counter_vec_with_registry, register_int_counter_with_registry,
    register_int_gauge_with_registry, IntCounter, IntCounterVec, IntGauge, Registry,
};

/// Shared-tier and peer metrics (all registered even when neither is configured, at zero).
pub struct ScaleMetrics {
    /// `berth_shared_lookups_total{kind,result}`: `hit`, `miss`, `error`, or `skipped` while
    /// the tier is backed off after failures.
    pub shared_lookups: IntCounterVec,
    /// `berth_shared_bytes_total{direction}`: `read` from and `written` to the object store.
    pub shared_bytes: IntCounterVec,
    /// `berth_shared_uploads_total{result}`: `uploaded`, `exists` (another replica was first),
    /// `evicted` (gone from disk before its turn), `failed` (after every attempt), `dropped`
    /// (queue full).
    pub shared_uploads: IntCounterVec,
    /// `berth_shared_uploads_pending`: uploads waiting or running.
    pub shared_uploads_pending: IntGauge,
    /// `berth_shared_corrupt_total`: objects that did not match their digest (deleted, never
    /// served).
    pub shared_corrupt: IntCounter,
    /// `berth_peer_requests_total{result}`: blob fetches forwarded to the digest's owner:
    /// `ok`, `not_found`, `error`, `timeout`.
    pub peer_requests: IntCounterVec,
    /// `berth_peer_fallbacks_total{to}`: forwards that failed and went to the `shared` tier or
    /// the `origin` instead.
    pub peer_fallbacks: IntCounterVec,
    /// `berth_peer_served_total{result}`: requests of other replicas this one answered as owner.
    pub peer_served: IntCounterVec,
    /// `berth_peers`: replicas in the peer set (this one included).
    pub peers: IntGauge,
    /// `berth_origin_bytes_spared_total{source}`: blob bytes fetched from the `shared` tier or
    /// a `peer` instead of the origin.
    pub origin_bytes_spared: IntCounterVec,
}

impl ScaleMetrics {
    /// Registers every family in `r`.
    pub fn new(r: &Registry) -> prometheus::Result<ScaleMetrics> {
        let m = ScaleMetrics {
            shared_lookups: register_int_counter_vec_with_registry!(
                "berth_shared_lookups_total",
                "Shared-tier lookups by kind (blob, manifest) and result (hit, miss, error, skipped).",
                &["kind", "result"],
                r
            )?,
            shared_bytes: register_int_counter_vec_with_registry!(
                "berth_shared_bytes_total",
                "Bytes read from and written to the shared tier.",
                &["direction"],
                r
            )?,
            shared_uploads: register_int_counter_vec_with_registry!(
                "berth_shared_uploads_total",
                "Shared-tier uploads by result (uploaded, exists, evicted, failed, dropped).",
                &["result"],
                r
            )?,
            shared_uploads_pending: register_int_gauge_with_registry!(
                "berth_shared_uploads_pending",
                "Shared-tier uploads waiting or running.",
                r
            )?,
            shared_corrupt: register_int_counter_with_registry!(
                "berth_shared_corrupt_total",
                "Shared-tier objects that did not match their digest (deleted, never served).",
                r
            )?,
            peer_requests: register_int_counter_vec_with_registry!(
                "berth_peer_requests_total",
                "Blob fetches forwarded to the digest's owner replica, by result.",
                &["result"],
                r
            )?,
            peer_fallbacks: register_int_counter_vec_with_registry!(
                "berth_peer_fallbacks_total",
                "Forwards to an owner that failed and went to the shared tier or the origin.",
                &["to"],
                r
            )?,
            peer_served: register_int_counter_vec_with_registry!(
                "berth_peer_served_total",
                "Requests of other replicas this replica answered as a digest's owner, by result.",
                &["result"],
                r
            )?,
            peers: register_int_gauge_with_registry!(
                "berth_peers",
                "Replicas in the peer set, this one included.",
                r
            )?,
            origin_bytes_spared: register_int_counter_vec_with_registry!(
                "berth_origin_bytes_spared_total",
                "Blob bytes fetched from the shared tier or a peer instead of the origin.",
                &["source"],
                r
            )?,
        };
        for kind in ["blob", "manifest"] {
            for result in ["hit", "miss", "error", "skipped"] {
                m.shared_lookups.with_label_values(&[kind, result]);
            }
        }
        for d in ["read", "written"] {
            m.shared_bytes.with_label_values(&[d]);
        }
        for r in ["uploaded", "exists", "evicted", "failed", "dropped"] {
            m.shared_uploads.with_label_values(&[r]);
        }
        for r in ["ok", "not_found", "error", "timeout"] {
            m.peer_requests.with_label_values(&[r]);
        }
        for t in ["shared", "origin"] {
            m.peer_fallbacks.with_label_values(&[t]);
        }
        for r in ["ok", "error", "denied"] {
            m.peer_served.with_label_values(&[r]);
        }
        for s in ["shared", "peer"] {
            m.origin_bytes_spared.with_label_values(&[s]);
        }
        Ok(m)
    }
}
