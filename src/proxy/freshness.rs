//! How long an origin's answer about something mutable (a tag mapping, a tag or referrers
//! listing) stays fresh: its HTTP caching headers (`Cache-Control`, `Expires`, `Age`, `Pragma`)
//! read through `http-cache-semantics` the way a shared cache reads them, clamped to
//! `cache.tag_ttl_min ..= cache.tag_ttl_max`, and `cache.tag_ttl` when the origin states no
//! lifetime. Content-addressed objects never come here: a digest names the same bytes forever.
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_cache_semantics::{CacheOptions, CachePolicy};

use crate::config::CacheConfig;

/// The configured lifetimes of mutable answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// `cache.tag_ttl`: the lifetime when the origin states none.
    pub default: Duration,
    /// `cache.tag_ttl_min`: the shortest lifetime an origin's headers can give.
    pub min: Duration,
    /// `cache.tag_ttl_max`: the longest lifetime an origin's headers can give.
    pub max: Duration,
}

impl Bounds {
    /// The bounds `[cache]` configures.
    pub fn from_config(c: &CacheConfig) -> Bounds {
        Bounds {
            default: c.tag_ttl,
            min: c.tag_ttl_min,
            max: c.tag_ttl_max,
        }
    }

    /// `d` within `min ..= max` (config validation keeps `min <= max`; were it not, `max` wins).
    pub fn clamp(&self, d: Duration) -> Duration {
        d.max(self.min).min(self.max)
    }
}

/// What an origin's answer grants a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Not to be kept (`no-store`, or `private` to a shared cache): relay it, keep nothing fresh.
    NoStore,
    /// The origin stated a lifetime (`max-age`, `s-maxage`, `Expires`, `no-cache`, ...); this is
    /// what is left of it now, already clamped to the bounds.
    Stated(Duration),
    /// The origin stated nothing: the configured default applies.
    Unstated,
}

impl Grant {
    /// The lifetime to keep the answer fresh for (zero when it must not be kept).
    pub fn lifetime(self, bounds: &Bounds) -> Duration {
        match self {
            Grant::NoStore => Duration::ZERO,
            Grant::Stated(d) => d,
            Grant::Unstated => bounds.default,
        }
    }
}

/// What was revalidated (label `kind` of `berth_revalidations_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A tag → digest mapping (a conditional `HEAD` of the manifest).
    Tag,
    /// A tags/list or referrers listing (a conditional `GET`).
    Listing,
}

impl Subject {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Subject::Tag => "tag",
            Subject::Listing => "listing",
        }
    }
}

/// What a revalidation found (label `result` of `berth_revalidations_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The origin confirmed what berth held (`304`, or the same digest).
    Unchanged,
    /// The origin answered with something else (or says it is gone).
    Changed,
    /// No answer to go by (unreachable, 5xx, 429, ...).
    Error,
}

impl Outcome {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Unchanged => "unchanged",
            Outcome::Changed => "changed",
            Outcome::Error => "error",
        }
    }
}

/// How berth reads origin headers: as a shared cache (`private` is not for it, `s-maxage` is),
/// with no heuristic freshness from `Last-Modified` (an origin that states no lifetime gets
/// `cache.tag_ttl`, as before it spoke).
pub fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        cache_heuristic: 0.0,
        ..CacheOptions::default()
    }
}

/// The request a policy is judged against: `method` of `path_and_query` at the origin with
/// `headers` (Accept). Never Authorization: berth checks every client with the origin itself
/// (the authorizer), so what the origin says about keeping its answer is read as for anyone.
pub fn request(method: Method, path_and_query: &str, headers: &HeaderMap) -> http::request::Parts {
    let (mut parts, ()) = http::Request::builder()
        .method(method)
        .uri(path_and_query)
        .body(())
        .unwrap_or_else(|_| http::Request::new(()))
        .into_parts();
    parts.headers = headers.clone();
    parts
}

/// A response head with `status` and `headers`.
pub fn response(status: StatusCode, headers: &HeaderMap) -> http::response::Parts {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.headers = headers.clone();
    parts
}

/// The policy of an answer the origin gave at `at`.
pub fn policy(
    req: &http::request::Parts,
    res: &http::response::Parts,
    at: SystemTime,
) -> CachePolicy {
    CachePolicy::new_options(req, res, at, options())
}

/// What `policy` (built from an answer with `headers`) grants at `now`, within `bounds`.
pub fn grant(policy: &CachePolicy, headers: &HeaderMap, bounds: &Bounds, now: SystemTime) -> Grant {
    if !policy.is_storable() {
        return Grant::NoStore;
    }
    if !states_lifetime(headers) {
        return Grant::Unstated;
    }
    Grant::Stated(bounds.clamp(policy.time_to_live(now)))
}

/// What a `200` with `headers`, answering `req`, grants at `now` (a one-shot [`grant`]).
pub fn grant_of(
    req: &http::request::Parts,
    headers: &HeaderMap,
    bounds: &Bounds,
    now: SystemTime,
) -> Grant {
    let p = policy(req, &response(StatusCode::OK, headers), now);
    grant(&p, headers, bounds, now)
}

/// Whether `headers` state a lifetime or a demand to revalidate: `Expires`, or a
/// `Cache-Control` directive among `max-age`, `s-maxage`, `no-cache`, `no-store`, `private`,
/// `proxy-revalidate`, or (without `Cache-Control`) `Pragma: no-cache`. `public` or
/// `must-revalidate` alone state no lifetime.
pub fn states_lifetime(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::EXPIRES) {
        return true;
    }
    let mut has_cc = false;
    for d in directives(headers.get_all(header::CACHE_CONTROL)) {
        has_cc = true;
        if matches!(
            d.as_str(),
            "max-age" | "s-maxage" | "no-cache" | "no-store" | "private" | "proxy-revalidate"
        ) {
            return true;
        }
    }
    !has_cc && directives(headers.get_all(header::PRAGMA)).any(|d| d == "no-cache")
}

/// Directive names of comma-separated header values, lowercased, arguments dropped.
fn directives<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = String> {
    values
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| {
            d.split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .into_iter()
}

/// The origin's strong `ETag` in `headers`, to send back as `If-None-Match` on a `HEAD` (weak
/// validators are for full GETs only, RFC 9110 13.1.2 as `http-cache-semantics` applies it).
pub fn strong_etag(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::ETAG)?.to_str().ok()?.trim();
    (!v.is_empty() && !v.starts_with("W/")).then(|| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn bounds(min: u64, max: u64) -> Bounds {
        Bounds {
            default: Duration::from_secs(300),
            min: Duration::from_secs(min),
            max: Duration::from_secs(max),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn grant_for(pairs: &[(&'static str, &str)], b: &Bounds) -> Grant {
        let req = request(Method::GET, "/v2/a/tags/list", &HeaderMap::new());
        grant_of(&req, &headers(pairs), b, SystemTime::now())
    }

    #[test]
    fn clamping_keeps_lifetimes_within_the_bounds() {
        let b = bounds(10, 3600);
        assert_eq!(b.clamp(Duration::from_secs(1)), Duration::from_secs(10));
        assert_eq!(b.clamp(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(b.clamp(HOUR * 48), HOUR);
        assert_eq!(b.clamp(Duration::ZERO), Duration::from_secs(10));
        // A misordered pair (refused by config validation) never panics: max wins.
        let odd = bounds(100, 50);
        assert_eq!(odd.clamp(Duration::from_secs(70)), Duration::from_secs(50));
    }

    #[test]
    fn max_age_is_the_lifetime_clamped() {
        let b = bounds(0, 3600);
        assert_eq!(
            grant_for(&[("cache-control", "max-age=60")], &b),
            Grant::Stated(Duration::from_secs(60))
        );
        assert_eq!(
            grant_for(&[("cache-control", "public, max-age=86400")], &b),
            Grant::Stated(HOUR),
            "longer than tag_ttl_max: cut to it"
        );
        let floor = bounds(30, 3600);
        assert_eq!(
            grant_for(&[("cache-control", "max-age=5")], &floor),
            Grant::Stated(Duration::from_secs(30)),
            "shorter than tag_ttl_min: raised to it"
        );
        assert_eq!(
            grant_for(&[("cache-control", "s-maxage=20, max-age=600")], &b),
            Grant::Stated(Duration::from_secs(20)),
            "a shared cache takes s-maxage"
        );
    }

    #[test]
    fn age_is_subtracted() {
        let b = bounds(0, 3600);
        assert_eq!(
            grant_for(&[("cache-control", "max-age=60"), ("age", "50")], &b),
            Grant::Stated(Duration::from_secs(10))
        );
        assert_eq!(
            grant_for(&[("cache-control", "max-age=60"), ("age", "500")], &b),
            Grant::Stated(Duration::ZERO)
        );
    }

    #[test]
    fn expires_counts_from_the_origin_date() {
        let b = bounds(0, 3600);
        let now = SystemTime::now();
        let date = httpdate(now);
        let expires = httpdate(now + Duration::from_secs(120));
        let Grant::Stated(d) = grant_for(&[("date", &date), ("expires", &expires)], &b) else {
            panic!("Expires states a lifetime");
        };
        assert!(
            d > Duration::from_secs(110) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            grant_for(&[("expires", "0")], &b),
            Grant::Stated(Duration::ZERO),
            "an invalid Expires is already expired"
        );
    }

    #[test]
    fn revalidate_and_do_not_store() {
        let b = bounds(0, 3600);
        for v in ["no-cache", "max-age=0", "proxy-revalidate, max-age=60"] {
            assert_eq!(
                grant_for(&[("cache-control", v)], &b),
                Grant::Stated(Duration::ZERO),
                "{v}"
            );
        }
        assert_eq!(
            grant_for(&[("pragma", "no-cache")], &b),
            Grant::Stated(Duration::ZERO)
        );
        for v in ["no-store", "private, max-age=600", "max-age=600, no-store"] {
            assert_eq!(
                grant_for(&[("cache-control", v)], &b),
                Grant::NoStore,
                "{v}"
            );
        }
        assert_eq!(Grant::NoStore.lifetime(&bounds(60, 3600)), Duration::ZERO);
        // The floor raises no-cache (the operator's word), never no-store.
        assert_eq!(
            grant_for(&[("cache-control", "no-cache")], &bounds(15, 3600)),
            Grant::Stated(Duration::from_secs(15))
        );
    }

    #[test]
    fn silence_gets_the_default() {
        let b = bounds(0, 3600);
        for pairs in [
            &[][..],
            &[("cache-control", "public")][..],
            &[("cache-control", "must-revalidate")][..],
            &[("etag", "\"sha256:abc\"")][..],
            &[("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT")][..],
        ] {
            let g = grant_for(pairs, &b);
            assert_eq!(g, Grant::Unstated, "{pairs:?}");
            assert_eq!(g.lifetime(&b), Duration::from_secs(300));
        }
    }

    #[test]
    fn only_strong_etags_go_on_a_head() {
        assert_eq!(
            strong_etag(&headers(&[("etag", "\"sha256:abc\"")])).as_deref(),
            Some("\"sha256:abc\"")
        );
        assert_eq!(strong_etag(&headers(&[("etag", "W/\"x\"")])), None);
        assert_eq!(strong_etag(&HeaderMap::new()), None);
    }

    fn httpdate(t: SystemTime) -> String {
        ::httpdate::fmt_http_date(t)
    }
}
