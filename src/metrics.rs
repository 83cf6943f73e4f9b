//! Prometheus metrics, built once from a registry that `main` creates (never registered inside a
//! handler). Names are fixed by the observability issue; label values come from fixed sets.

use prometheus::{
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry,
    register_int_gauge_vec_with_registry, register_int_gauge_with_registry, Encoder, HistogramVec,
    IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};

/// Every metric berth exports.
pub struct Metrics {
    registry: Registry,
    /// `berth_http_requests_total{route,method,status}`.
    pub http_requests: IntCounterVec,
    /// `berth_http_request_duration_seconds{route,cache}`.
    pub http_duration: HistogramVec,
    /// `berth_cache_lookups_total{kind,tier,result}`.
    pub cache_lookups: IntCounterVec,
    /// `berth_served_bytes_total{source}`.
    pub served_bytes: IntCounterVec,
    /// `berth_upstream_requests_total{upstream,method,status}`.
    pub upstream_requests: IntCounterVec,
    /// `berth_upstream_request_duration_seconds{upstream}`.
    pub upstream_duration: HistogramVec,
    /// `berth_fills_in_flight`.
    pub fills_in_flight: IntGauge,
    /// `berth_fill_waiters_total`.
    pub fill_waiters: prometheus::IntCounter,
    /// `berth_stale_served_total{kind}`.
    pub stale_served: IntCounterVec,
    /// `berth_digest_mismatches_total{upstream}`.
    pub digest_mismatches: IntCounterVec,
    /// `berth_build_info{version}`.
    pub build_info: IntGaugeVec,
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
                "Time to the response head, by route and cache result.",
                &["route", "cache"],
                latency.clone(),
                r
            )?,
            cache_lookups: register_int_counter_vec_with_registry!(
                "berth_cache_lookups_total",
                "Cache lookups by kind, tier and result.",
                &["kind", "tier", "result"],
                r
            )?,
            served_bytes: register_int_counter_vec_with_registry!(
                "berth_served_bytes_total",
                "Body bytes sent to clients, by where they came from.",
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
                latency,
                r
            )?,
            fills_in_flight: register_int_gauge_with_registry!(
                "berth_fills_in_flight",
                "Blob fills from origins in progress.",
                r
            )?,
            fill_waiters: prometheus::register_int_counter_with_registry!(
                "berth_fill_waiters_total",
                "Requests that joined a fill another request started.",
                r
            )?,
            stale_served: register_int_counter_vec_with_registry!(
                "berth_stale_served_total",
                "Answers served stale because the origin failed.",
                &["kind"],
                r
            )?,
            digest_mismatches: register_int_counter_vec_with_registry!(
                "berth_digest_mismatches_total",
                "Origin content that did not match its digest.",
                &["upstream"],
                r
            )?,
            build_info: register_int_gauge_vec_with_registry!(
                "berth_build_info",
                "berth version.",
                &["version"],
                r
            )?,
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
