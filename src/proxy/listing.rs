//! `GET /v2/<name>/tags/list` and `/v2/<name>/referrers/<digest>`: forwarded, kept in memory for
//! as long as the origin's caching headers allow (within `cache.tag_ttl_min ..= tag_ttl_max`;
//! `cache.tag_ttl` when it states nothing; never with `no-store`), revalidated with the
//! validators it gave (`If-None-Match`, `If-Modified-Since`: a `304` refreshes the kept listing
//! without a download), and served stale when the origin is down.
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_cache_semantics::{AfterResponse, BeforeRequest, CachePolicy};
use moka::sync::Cache;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::freshness::{self, Grant, Outcome, Subject};
use super::manifests::not_found_as;
use super::{sourced, App, CacheResult, ServedFrom};
use crate::body::{self, Body};
use crate::cache::fill::FetchedFrom;
use crate::cache::Tier;
use crate::error::Error;
use crate::upstream::{Selected, UpstreamError, UpstreamRequest};

/// Memory the listing cache may use.
const LISTING_BUDGET: u64 = 64 << 20;
/// Largest listing kept or relayed.
const MAX_LISTING: usize = 4 << 20;
/// What a kept listing's caching policy is counted as weighing (request and response heads).
const POLICY_WEIGHT: usize = 1024;

/// Which listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ListingKind {
    /// tags/list
    Tags,
    /// referrers
    Referrers,
}

#[derive(Clone)]
pub(super) struct Listing {
    content_type: String,
    link: Option<String>,
    bytes: Bytes,
    /// The origin's caching policy for this answer: its validators and what it allows.
    policy: Arc<CachePolicy>,
    /// Until when it is served without asking the origin (on the freshness clock).
    fresh_until: Instant,
}

/// Recent listings by upstream and origin path + query.
pub(super) struct ListingCache(Cache<String, Listing>);

impl ListingCache {
    pub(super) fn new() -> ListingCache {
        ListingCache(
            Cache::builder()
                .max_capacity(LISTING_BUDGET)
                .weigher(|k: &String, v: &Listing| {
                    (k.len() + v.bytes.len() + POLICY_WEIGHT).min(u32::MAX as usize) as u32
                })
                .build(),
        )
    }
}

/// What the origin answered for a listing.
enum Answer {
    /// A full listing; whether it may be kept.
    Full(Listing, bool),
    /// `304`: the kept listing, refreshed; whether it may still be kept.
    NotModified(Listing, bool),
}

// === impl App ===

impl App {
    /// GET|HEAD: /v2/<name>/tags/list and /v2/<name>/referrers/<digest>
    pub(super) async fn listing(
        &self,
        sel: &Selected,
        kind: ListingKind,
        path: String,
        query: Vec<(&str, String)>,
        head: bool,
    ) -> Result<(Response<Body>, CacheResult), Error> {
        let mut pq = path;
        for (i, (k, v)) in query.iter().enumerate() {
            pq.push(if i == 0 { '?' } else { '&' });
            pq.push_str(k);
            pq.push('=');
            pq.push_str(&utf8_percent_encode(v, NON_ALPHANUMERIC).to_string());
        }
        let key = format!("{}|{}", sel.upstream.name(), pq);
        let kept = self.listings.0.get(&key);
        if let Some(l) = &kept {
            if self.clock().now() < l.fresh_until {
                return Ok((
                    sourced(
                        listing_response(l, sel, head),
                        ServedFrom::Tier(Tier::Memory),
                    ),
                    CacheResult::Hit,
                ));
            }
        }
        let accept = match kind {
            ListingKind::Tags => "application/json",
            ListingKind::Referrers => crate::oci::media::OCI_INDEX,
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
        let req = UpstreamRequest {
            method: Method::GET,
            path_and_query: pq,
            headers,
            scope: format!("repository:{}:pull", sel.name),
            auth: sel.auth.clone(),
        };
        let answer = self.fetch_listing(sel, req, kept.as_ref(), accept).await;
        let revalidated = |outcome| {
            if kept.is_some() {
                self.count_revalidation(Subject::Listing, outcome);
            }
        };
        match answer {
            Ok(Answer::NotModified(l, keep)) => {
                revalidated(Outcome::Unchanged);
                self.keep(key, &l, keep);
                Ok((
                    sourced(
                        listing_response(&l, sel, head),
                        ServedFrom::Tier(Tier::Memory),
                    ),
                    CacheResult::Hit,
                ))
            }
            Ok(Answer::Full(l, keep)) => {
                revalidated(Outcome::Changed);
                self.keep(key, &l, keep);
                Ok((
                    sourced(
                        listing_response(&l, sel, head),
                        ServedFrom::Fetched(FetchedFrom::Origin),
                    ),
                    CacheResult::Miss,
                ))
            }
            Err(e) if e.is_origin_failure() && kept.is_some() => {
                revalidated(Outcome::Error);
                self.metrics
                    .stale_served
                    .with_label_values(&[match kind {
                        ListingKind::Tags => "tags",
                        ListingKind::Referrers => "referrers",
                    }])
                    .inc();
                let l = kept.expect("checked above");
                Ok((
                    sourced(
                        listing_response(&l, sel, head),
                        ServedFrom::Tier(Tier::Memory),
                    ),
                    CacheResult::Stale,
                ))
            }
            Err(e) if e.is_not_found() => {
                revalidated(Outcome::Changed);
                self.listings.0.invalidate(&key);
                Err(match kind {
                    ListingKind::Tags => {
                        Error::NameUnknown("repository unknown to the origin".into())
                    }
                    ListingKind::Referrers => not_found_as(e, "manifest"),
                })
            }
            Err(e) => {
                revalidated(Outcome::Error);
                Err(not_found_as(e, "manifest"))
            }
        }
    }

    /// Keeps a listing the origin allows keeping; forgets the key otherwise (`no-store` now).
    fn keep(&self, key: String, l: &Listing, keep: bool) {
        if keep {
            self.listings.0.insert(key, l.clone());
        } else {
            self.listings.0.invalidate(&key);
        }
    }

    /// Asks the origin for a listing; with `kept` (stale), conditionally, with the validators
    /// its policy gives. A `304` that does not match what is kept is asked again in full.
    async fn fetch_listing(
        &self,
        sel: &Selected,
        mut req: UpstreamRequest,
        kept: Option<&Listing>,
        accept: &str,
    ) -> Result<Answer, UpstreamError> {
        let asked = freshness::request(Method::GET, &req.path_and_query, &req.headers);
        let bounds = self.bounds();
        let mut kept = kept;
        loop {
            if let Some(l) = kept {
                for (name, value) in validators(&l.policy, &req, self.clock().system_now()) {
                    if let Some(name) = name {
                        req.headers.insert(name, value);
                    }
                }
            }
            let resp = sel.upstream.send_counted(&self.metrics, &req).await?;
            let (at, now) = (self.clock().system_now(), self.clock().now());
            if resp.status() == StatusCode::NOT_MODIFIED {
                let (parts, _) = resp.into_parts();
                if let Some(old) = kept {
                    if let AfterResponse::NotModified(policy, merged) =
                        old.policy.after_response(&asked, &parts, at)
                    {
                        let grant = freshness::grant(&policy, &merged.headers, &bounds, at);
                        let l = Listing {
                            policy: Arc::new(policy),
                            fresh_until: now + grant.lifetime(&bounds),
                            ..old.clone()
                        };
                        return Ok(Answer::NotModified(l, grant != Grant::NoStore));
                    }
                }
                tracing::debug!(path = %req.path_and_query, "unmatched 304 for a listing; asking in full");
                if kept.take().is_none() {
                    // An unconditional request answered 304: nothing to go by.
                    return Err(UpstreamError::Status {
                        upstream: sel.upstream.name().to_owned(),
                        status: StatusCode::NOT_MODIFIED,
                        retry_after: None,
                    });
                }
                req.headers.remove(header::IF_NONE_MATCH);
                req.headers.remove(header::IF_MODIFIED_SINCE);
                continue;
            }
            if resp.status() != StatusCode::OK {
                return Err(sel.upstream.status_error(&resp));
            }
            let (parts, incoming) = resp.into_parts();
            let policy = freshness::policy(&asked, &parts, at);
            let grant = freshness::grant(&policy, &parts.headers, &bounds, at);
            let h = &parts.headers;
            let content_type = h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(accept)
                .to_owned();
            let link = h
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = sel.upstream.collect(incoming, MAX_LISTING).await?;
            let l = Listing {
                content_type,
                link,
                bytes,
                policy: Arc::new(policy),
                fresh_until: now + grant.lifetime(&bounds),
            };
            return Ok(Answer::Full(l, grant != Grant::NoStore));
        }
    }
}

/// The validators to revalidate a kept listing with (`If-None-Match` from its ETag,
/// `If-Modified-Since` from its Last-Modified), as `http-cache-semantics` builds a revalidation
/// request. berth decided it is stale (its own bounds may cut the origin's lifetime short), so
/// the policy is asked with `no-cache`, which always yields the revalidation request.
fn validators(
    policy: &CachePolicy,
    req: &UpstreamRequest,
    now: std::time::SystemTime,
) -> HeaderMap {
    let mut forced = freshness::request(Method::GET, &req.path_and_query, &req.headers);
    forced
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let mut out = HeaderMap::new();
    if let BeforeRequest::Stale { request, .. } = policy.before_request(&forced, now) {
        for name in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
            if let Some(v) = request.headers.get(&name) {
                out.insert(name, v.clone());
            }
        }
    }
    out
}

fn listing_response(l: &Listing, sel: &Selected, head: bool) -> Response<Body> {
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, l.content_type.as_str())
        .header(header::CONTENT_LENGTH, l.bytes.len());
    if let Some(link) = &l.link {
        // Pagination links name the origin's path; a client that routed by prefix needs it back.
        let link = match &sel.prefix {
            Some(p) => link.replace("</v2/", &format!("</v2/{p}/")),
            None => link.clone(),
        };
        b = b.header(header::LINK, link);
    }
    b.body(if head {
        body::empty()
    } else {
        body::full(l.bytes.clone())
    })
    .unwrap_or_else(|_| Error::Internal("bad listing headers".into()).into_response(head))
}
