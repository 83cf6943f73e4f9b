//! Series handles of the families every request touches, resolved once per label set.
//!
//! `MetricVec::with_label_values` hashes every label value and takes a read lock on each call;
//! a hot manifest by tag made six such lookups, about 2% of berth's CPU in a profile. The label
//! values here come from small fixed sets (routes, tiers, sources, methods), so each series is
//! looked up on first use and its handle kept in a slot found by index. Series are still
//! created lazily, exactly as the plain lookups did; label sets outside the tables fall back to
//! the plain lookup.
//!
//! Architecture: docs/ARCHITECTURE.md, "Metrics".

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

/// Routes as labelled (`Route::as_str`, `classify`, `/token`).
const ROUTES: [&str; 9] = [
    "base",
    "manifest",
    "blob",
    "upload",
    "tags",
    "referrers",
    "catalog",
    "token",
    "unknown",
];
/// `berth_cache_lookups_total` kinds and tiers.
const KINDS: [&str; 3] = ["manifest", "blob", "tag"];
const TIERS: [&str; 2] = ["memory", "disk"];
/// `berth_served_bytes_total` sources.
const SOURCES: [&str; 5] = ["memory", "disk", "upstream", "shared", "peer"];
/// Cache results (`CacheResult::as_str`).
const CACHE: [&str; 4] = ["hit", "miss", "stale", "none"];
/// Methods and statuses of the request counter worth a slot.
const METHODS: [&str; 2] = ["GET", "HEAD"];
const STATUSES: [&str; 4] = ["200", "206", "304", "404"];
/// `berth_auth_decisions_total` results and sources.
const AUTH_RESULTS: [&str; 3] = ["allow", "deny", "error"];
const AUTH_SOURCES: [&str; 5] = ["public", "local", "cache", "origin", "grace"];

fn index(set: &[&str], v: &str) -> Option<usize> {
    set.iter().position(|s| *s == v)
}

/// Resolved handles, filled on first use.
pub(super) struct HotSeries {
    lookups: Vec<OnceLock<IntCounter>>,
    served: Vec<OnceLock<IntCounter>>,
    requests: Vec<OnceLock<IntCounter>>,
    durations: Vec<OnceLock<Histogram>>,
    auth: Vec<OnceLock<IntCounter>>,
}

fn slots<M>(n: usize) -> Vec<OnceLock<M>> {
    (0..n).map(|_| OnceLock::new()).collect()
}

impl HotSeries {
    pub(super) fn new() -> HotSeries {
        HotSeries {
            lookups: slots(KINDS.len() * TIERS.len() * 2),
            served: slots(SOURCES.len()),
            requests: slots(ROUTES.len() * METHODS.len() * STATUSES.len()),
            durations: slots(ROUTES.len() * CACHE.len()),
            auth: slots(AUTH_RESULTS.len() * AUTH_SOURCES.len()),
        }
    }

    pub(super) fn lookup(&self, vec: &IntCounterVec, kind: &str, tier: &str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        let slot = match (index(&KINDS, kind), index(&TIERS, tier)) {
            (Some(k), Some(t)) => Some(&self.lookups[(k * TIERS.len() + t) * 2 + usize::from(hit)]),
            _ => None,
        };
        with(
            slot,
            || vec.with_label_values(&[kind, tier, result]),
            |c| c.inc(),
        );
    }

    pub(super) fn served(&self, vec: &IntCounterVec, source: &str) -> IntCounter {
        let slot = index(&SOURCES, source).map(|i| &self.served[i]);
        let mut out = None;
        with(
            slot,
            || vec.with_label_values(&[source]),
            |c| out = Some(c.clone()),
        );
        out.expect("with calls back")
    }

    pub(super) fn request(&self, vec: &IntCounterVec, route: &str, method: &str, status: &str) {
        let slot = match (
            index(&ROUTES, route),
            index(&METHODS, method),
            index(&STATUSES, status),
        ) {
            (Some(r), Some(m), Some(s)) => {
                Some(&self.requests[(r * METHODS.len() + m) * STATUSES.len() + s])
            }
            _ => None,
        };
        with(
            slot,
            || vec.with_label_values(&[route, method, status]),
            |c| c.inc(),
        );
    }

    pub(super) fn duration(&self, vec: &HistogramVec, route: &str, cache: &str, secs: f64) {
        let slot = match (index(&ROUTES, route), index(&CACHE, cache)) {
            (Some(r), Some(c)) => Some(&self.durations[r * CACHE.len() + c]),
            _ => None,
        };
        with(
            slot,
            || vec.with_label_values(&[route, cache]),
            |h| h.observe(secs),
        );
    }

    pub(super) fn auth(&self, vec: &IntCounterVec, result: &str, source: &str) {
        let slot = match (index(&AUTH_RESULTS, result), index(&AUTH_SOURCES, source)) {
            (Some(r), Some(s)) => Some(&self.auth[r * AUTH_SOURCES.len() + s]),
            _ => None,
        };
        with(
            slot,
            || vec.with_label_values(&[result, source]),
            |c| c.inc(),
        );
    }
}

/// Runs `f` on the slot's series (resolved with `make` the first time), or on a freshly looked
/// up one when the labels have no slot.
fn with<M>(slot: Option<&OnceLock<M>>, make: impl FnOnce() -> M, f: impl FnOnce(&M)) {
    match slot {
        Some(s) => f(s.get_or_init(make)),
        None => f(&make()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_holds_the_series_of_its_labels() {
        let r = prometheus::Registry::new();
        let v = IntCounterVec::new(
            prometheus::Opts::new("t_total", "t"),
            &["route", "method", "status"],
        )
        .unwrap();
        r.register(Box::new(v.clone())).unwrap();
        let hot = HotSeries::new();
        hot.request(&v, "manifest", "GET", "200");
        hot.request(&v, "manifest", "GET", "200");
        hot.request(&v, "blob", "GET", "200");
        hot.request(&v, "manifest", "HEAD", "200");
        hot.request(&v, "manifest", "GET", "503");
        assert_eq!(v.with_label_values(&["manifest", "GET", "200"]).get(), 2);
        assert_eq!(v.with_label_values(&["blob", "GET", "200"]).get(), 1);
        assert_eq!(v.with_label_values(&["manifest", "HEAD", "200"]).get(), 1);
        assert_eq!(v.with_label_values(&["manifest", "GET", "503"]).get(), 1);
    }
}
