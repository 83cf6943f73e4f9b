//! GET /v2/<name>/tags/list and /v2/<name>/referrers/<digest>: forwarded, kept briefly in
//! memory, and served stale when the origin is down.

use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use moka::sync::Cache;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::manifests::not_found_as;
use super::{sourced, App, CacheResult, Source};
use crate::body::{self, Body};
use crate::error::Error;
use crate::upstream::{Selected, UpstreamRequest};

/// Memory the listing cache may use.
const LISTING_BUDGET: u64 = 64 << 20;
/// Largest listing kept or relayed.
const MAX_LISTING: usize = 4 << 20;

/// Which listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
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
    fetched: Instant,
}

/// Recent listings by upstream and origin path + query.
pub(super) struct ListingCache(Cache<String, Listing>);

impl ListingCache {
    pub(super) fn new() -> ListingCache {
        ListingCache(
            Cache::builder()
                .max_capacity(LISTING_BUDGET)
                .weigher(|k: &String, v: &Listing| {
                    (k.len() + v.bytes.len() + 64).min(u32::MAX as usize) as u32
                })
                .build(),
        )
    }
}

impl App {
    /// GET|HEAD: /v2/<name>/tags/list and /v2/<name>/referrers/<digest>
    pub(super) async fn listing(
        &self,
        sel: &Selected,
        kind: Kind,
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
            if l.fetched.elapsed() < self.tag_ttl() {
                return Ok((
                    sourced(listing_response(l, sel, head), Source::Memory),
                    CacheResult::Hit,
                ));
            }
        }
        let mut headers = HeaderMap::new();
        let accept = match kind {
            Kind::Tags => "application/json",
            Kind::Referrers => crate::oci::media::OCI_INDEX,
        };
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
        let req = UpstreamRequest {
            method: Method::GET,
            path_and_query: pq,
            headers,
            scope: format!("repository:{}:pull", sel.name),
            auth: sel.auth.clone(),
        };
        let fetched = async {
            let resp = self.fetch_ok(sel, &req).await?;
            let h = resp.headers();
            let content_type = h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(accept)
                .to_owned();
            let link = h
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let bytes = sel.upstream.collect(resp.into_body(), MAX_LISTING).await?;
            Ok::<_, crate::upstream::UpstreamError>(Listing {
                content_type,
                link,
                bytes,
                fetched: Instant::now(),
            })
        }
        .await;
        match fetched {
            Ok(l) => {
                self.listings.0.insert(key, l.clone());
                Ok((
                    sourced(listing_response(&l, sel, head), Source::Upstream),
                    CacheResult::Miss,
                ))
            }
            Err(e) if e.is_origin_failure() && kept.is_some() => {
                self.metrics
                    .stale_served
                    .with_label_values(&[match kind {
                        Kind::Tags => "tags",
                        Kind::Referrers => "referrers",
                    }])
                    .inc();
                let l = kept.expect("checked above");
                Ok((
                    sourced(listing_response(&l, sel, head), Source::Memory),
                    CacheResult::Stale,
                ))
            }
            Err(e) if e.is_not_found() => Err(match kind {
                Kind::Tags => Error::NameUnknown("repository unknown to the origin".into()),
                Kind::Referrers => not_found_as(e, "manifest"),
            }),
            Err(e) => Err(not_found_as(e, "manifest")),
        }
    }
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
