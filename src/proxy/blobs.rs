//! `GET|HEAD /v2/<name>/blobs/<digest>`: from disk, or from the single fill of a missing blob,
//! with Range (206 / 416) on both.
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{header, HeaderMap, Method, Response, StatusCode};

use super::manifests::{io_err, not_found_as};
use super::range::{self, RangeRequest};
use super::sources::TieredBlob;
use super::{conditional, sourced, App, CacheResult, ServedFrom};
use crate::auth::Target;
use crate::body::{self, Body};
use crate::cache::fill::{
    read_file_range, BlobFetcher, BlobRead, FetchError, Fetched, FetchedFrom, FillError,
};
use crate::cache::{Key, ObjectKind, Tier};
use crate::cluster::fetch::PeerBlob;
use crate::cluster::MEMBER_HEADER;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::oci::DIGEST_HEADER;
use crate::upstream::{Selected, Upstream, UpstreamError, UpstreamRequest};

impl App {
    /// GET|HEAD: /v2/<name>/blobs/<digest>
    pub(super) async fn blob(
        &self,
        sel: &Selected,
        digest: Digest,
        range_header: Option<&str>,
        head: bool,
    ) -> Result<(Response<Body>, CacheResult), Error> {
        if head {
            return self.head_blob(sel, &digest).await;
        }
        let served = self
            .serve_blob(sel, digest.clone(), range_header, Caller::Client)
            .await?;
        // Counted only once the client was admitted: a refused request uses nothing.
        self.prefetch.used(&digest, &self.metrics.prefetch);
        Ok(served)
    }

    /// GET: `/_berth/peer/v1/blobs/<digest>` (`proxy/peer.rs`): another replica asks this
    /// one, the digest's owner, for a blob in `sel`. Served through the same fill as this
    /// replica's own clients, never forwarded to a peer; carries [`MEMBER_HEADER`] when this
    /// replica holds the origin's evidence for the digest in `sel`'s repository. The asking
    /// replica made the authorization decision.
    pub async fn peer_blob(
        &self,
        sel: &Selected,
        digest: Digest,
        range_header: Option<&str>,
    ) -> Result<Response<Body>, Error> {
        let (mut resp, _) = self
            .serve_blob(sel, digest.clone(), range_header, Caller::Peer)
            .await?;
        if self.auth.is_member(sel, &digest) {
            resp.headers_mut()
                .insert(MEMBER_HEADER, http::HeaderValue::from_static("1"));
        }
        Ok(resp)
    }

    /// A blob GET from the memory tier, the disk or a fill, for a client or a peer.
    async fn serve_blob(
        &self,
        sel: &Selected,
        digest: Digest,
        range_header: Option<&str>,
        caller: Caller,
    ) -> Result<(Response<Body>, CacheResult), Error> {
        // Bytes from the cache, or from a fill another request started, are served under this
        // repository only with the origin's evidence that it holds them (asked here when
        // missing); a fill this request leads is this repository's own origin GET, whose 200 is
        // the evidence. A peer's request is settled by the peer.
        let member = caller == Caller::Peer || self.auth.is_member(sel, &digest);
        let confirm = || async {
            if member {
                Ok(())
            } else {
                self.auth.require_member(sel, Target::Blob(&digest)).await
            }
        };
        // The memory tier first: a hot small blob costs no file open.
        if let Some(bytes) = self.cache().memory().blob(&digest) {
            confirm().await?;
            self.cache().index().touch(&Key {
                kind: ObjectKind::Blob,
                digest: digest.clone(),
            });
            self.count_lookup("blob", "memory", true);
            return memory_response(&digest, bytes, range_header, Tier::Memory);
        }
        let fills = self.cache().fills();
        let mut source = fills
            .blob_or_fill(&digest, || self.blob_fetcher(sel, &digest, caller))
            .await
            .map_err(io_err)?;
        // A prefetch must never fail a client: one that failed before its first byte, which
        // this request had joined, is replaced by this request's own fill.
        if let BlobRead::Filling {
            fill,
            leader: false,
        } = &source
        {
            if self.prefetch.started(&digest, fill) && fill.ready().await.is_err() {
                self.metrics.prefetch.blob("client_retried").inc();
                source = fills
                    .blob_or_fill(&digest, || self.blob_fetcher(sel, &digest, caller))
                    .await
                    .map_err(io_err)?;
            }
        }
        match source {
            BlobRead::Cached(file, size) => {
                confirm().await?;
                let eligible = self.cache().memory().fits(size);
                if let Some((bytes, tier)) = self.cache().small_blob(&digest, size).await {
                    self.count_lookup("blob", "memory", tier == Tier::Memory);
                    if tier == Tier::Disk {
                        self.count_lookup("blob", "disk", true);
                    }
                    return memory_response(&digest, bytes, range_header, tier);
                }
                if eligible {
                    self.count_lookup("blob", "memory", false);
                }
                self.count_lookup("blob", "disk", true);
                let file = Arc::new(file);
                let resp = match range::parse(range_header, size) {
                    RangeRequest::Unsatisfiable => return Err(Error::RangeNotSatisfiable { size }),
                    RangeRequest::Full => {
                        let s = read_file_range(file, 0, size);
                        blob_response(&digest, 0, size, size, body::stream(s), false)
                    }
                    RangeRequest::Partial { start, end } => {
                        let s = read_file_range(file, start, end);
                        blob_response(&digest, start, end, size, body::stream(s), true)
                    }
                };
                Ok((
                    sourced(resp, ServedFrom::Tier(Tier::Disk)),
                    CacheResult::Hit,
                ))
            }
            BlobRead::Filling { fill, leader } => {
                // A fill that is verified and only being committed is as good as cached.
                let verified = !leader && fill.verified();
                self.count_lookup("blob", "disk", verified);
                if !leader && !verified {
                    self.metrics.fill_waiters.inc();
                }
                if !member {
                    // A fill of this repository from its origin records its evidence when the
                    // origin answers; a fill another upstream or repository started, or bytes
                    // from the shared tier, prove nothing here. No byte is handed out before
                    // this is settled.
                    let _ = fill.ready().await;
                    if !self.auth.is_member(sel, &digest) {
                        self.auth.require_member(sel, Target::Blob(&digest)).await?;
                    }
                }
                let stats = self.cache().fills().stats().clone();
                let total = fill.ready().await.map_err(fill_err)?;
                let resp = match total {
                    None => {
                        // Unknown length: a Range cannot be checked before the end; serve the
                        // whole blob (RFC 9110 allows ignoring Range).
                        let stream = fill.reader(0, None, stats);
                        Response::builder()
                            .status(StatusCode::OK)
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header(DIGEST_HEADER, digest.as_str())
                            .header(header::ACCEPT_RANGES, "bytes")
                            .body(body::stream(stream))
                            .map_err(|e| Error::Internal(e.to_string()))?
                    }
                    Some(size) => match range::parse(range_header, size) {
                        RangeRequest::Unsatisfiable => {
                            return Err(Error::RangeNotSatisfiable { size })
                        }
                        RangeRequest::Full => {
                            let s = fill.reader(0, Some(size), stats);
                            blob_response(&digest, 0, size, size, body::stream(s), false)
                        }
                        RangeRequest::Partial { start, end } => {
                            let s = fill.reader(start, Some(end), stats);
                            blob_response(&digest, start, end, size, body::stream(s), true)
                        }
                    },
                };
                let source =
                    ServedFrom::Fetched(fill.fetched_from().unwrap_or(FetchedFrom::Origin));
                Ok(if verified {
                    (
                        sourced(resp, ServedFrom::Tier(Tier::Disk)),
                        CacheResult::Hit,
                    )
                } else {
                    (sourced(resp, source), CacheResult::Miss)
                })
            }
        }
    }

    /// HEAD of a blob: from disk or a running fill if possible, else a HEAD at the origin (a
    /// HEAD never starts a fill).
    async fn head_blob(
        &self,
        sel: &Selected,
        digest: &Digest,
    ) -> Result<(Response<Body>, CacheResult), Error> {
        let member = self.auth.is_member(sel, digest);
        let size = self.cache().blob_len(digest).await.map_err(io_err)?;
        let filling = self.cache().fills().get(digest);
        if (size.is_some() || filling.is_some()) && !member {
            self.auth.require_member(sel, Target::Blob(digest)).await?;
        }
        if let Some(size) = size {
            self.count_lookup("blob", "disk", true);
            return Ok((blob_head(digest, size), CacheResult::Hit));
        }
        if let Some(fill) = filling {
            // Counted as a GET joining the fill is: a verified fill that is only being
            // committed is as good as cached (a HEAD in that window used to count nothing).
            let verified = fill.verified();
            if let Ok(Some(size)) = fill.ready().await {
                self.count_lookup("blob", "disk", verified);
                let result = if verified {
                    CacheResult::Hit
                } else {
                    CacheResult::Miss
                };
                return Ok((blob_head(digest, size), result));
            }
        }
        self.count_lookup("blob", "disk", false);
        let req = blob_request(sel, Method::HEAD, digest);
        let resp = self
            .fetch_ok(sel, &req)
            .await
            .map_err(|e| not_found_as(e, "blob"))?;
        self.auth.record_member(sel, digest);
        let size = content_length(resp.headers()).ok_or_else(|| {
            Error::Upstream(UpstreamError::Invalid {
                upstream: sel.upstream.name().to_owned(),
                reason: "blob HEAD without Content-Length".into(),
            })
        })?;
        Ok((blob_head(digest, size), CacheResult::Miss))
    }
}

impl App {
    /// Where a fill of `digest` for `sel` finds its bytes: the owner replica (for a client's
    /// request when another replica owns the digest; a peer's request is never forwarded
    /// again), the shared tier, then the origin (see `sources.rs`).
    pub(super) fn blob_fetcher(
        &self,
        sel: &Selected,
        digest: &Digest,
        caller: Caller,
    ) -> Arc<dyn BlobFetcher> {
        let origin = Arc::new(UpstreamBlob {
            upstream: sel.upstream.clone(),
            request: blob_request(sel, Method::GET, digest),
            metrics: self.metrics.clone(),
            evidence: (
                self.cache().memberships().clone(),
                sel.name.to_string(),
                digest.clone(),
            ),
        });
        let shared = self.scale().shared.clone();
        let peer = match (&self.scale().cluster, caller) {
            (Some(cluster), Caller::Client) => cluster.owner(digest).map(|owner| {
                Arc::new(PeerBlob::new(
                    cluster.clone(),
                    owner,
                    digest.clone(),
                    sel,
                    self.cache().memberships().clone(),
                )) as Arc<dyn BlobFetcher>
            }),
            _ => None,
        };
        if shared.is_none() && peer.is_none() {
            return origin;
        }
        Arc::new(TieredBlob {
            digest: digest.clone(),
            peer,
            shared,
            origin,
            metrics: self.metrics.clone(),
        })
    }
}

/// Who asks for a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Caller {
    /// A registry client, authorized by this replica; its misses may go to the owner replica.
    Client,
    /// Another replica (authenticated by the cluster's secret), which authorized its client
    /// and settles membership itself.
    Peer,
}

/// Fetches a blob (or a range of it) from its origin for a fill or a pass-through reader.
struct UpstreamBlob {
    upstream: Arc<Upstream>,
    request: UpstreamRequest,
    metrics: Arc<Metrics>,
    /// Where the origin's 2xx is recorded as evidence: the repository this fetch asks in.
    evidence: (Arc<crate::cache::Memberships>, String, Digest),
}

impl BlobFetcher for UpstreamBlob {
    fn fetch(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send>> {
        let upstream = self.upstream.clone();
        let mut request = self.request.clone();
        let metrics = self.metrics.clone();
        let evidence = self.evidence.clone();
        Box::pin(async move {
            let ranged = start > 0 || end.is_some();
            if ranged {
                let spec = match end {
                    Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
                    None => format!("bytes={start}-"),
                };
                if let Ok(v) = http::HeaderValue::from_str(&spec) {
                    request.headers.insert(header::RANGE, v);
                }
            }
            let resp = upstream.send_counted(&metrics, &request).await;
            let resp = resp?;
            // An origin that ignores Range answers 200 with the whole blob: skip to `start`.
            let skip = match resp.status() {
                StatusCode::OK => start,
                StatusCode::PARTIAL_CONTENT if ranged => 0,
                _ => return Err(upstream.status_error(&resp).into()),
            };
            // The origin answered this repository's GET with the blob: evidence, recorded
            // before any waiter of this fill is released.
            let (members, repo, digest) = evidence;
            members.record(upstream.name(), &repo, &digest);
            let total = content_length(resp.headers()).map(|l| l.saturating_sub(skip));
            let name = upstream.name().to_owned();
            let body = resp.into_body();
            let stream =
                futures_util::stream::unfold(Some((upstream, body, skip)), |state| async move {
                    let (u, mut b, mut skip) = state?;
                    loop {
                        match u.next_chunk(&mut b).await {
                            Ok(Some(mut chunk)) => {
                                if skip > 0 {
                                    let n = skip.min(chunk.len() as u64);
                                    skip -= n;
                                    chunk = chunk.slice(n as usize..);
                                    if chunk.is_empty() {
                                        continue;
                                    }
                                }
                                return Some((Ok(chunk), Some((u, b, skip))));
                            }
                            Ok(None) => return None,
                            Err(e) => return Some((Err(e.into()), None)),
                        }
                    }
                });
            Ok(Fetched {
                total,
                source: name,
                body: Box::pin(stream),
                from: FetchedFrom::Origin,
            })
        })
    }
}

/// A blob answered from bytes in memory (Range applied).
fn memory_response(
    digest: &Digest,
    bytes: bytes::Bytes,
    range_header: Option<&str>,
    tier: Tier,
) -> Result<(Response<Body>, CacheResult), Error> {
    let size = bytes.len() as u64;
    let resp = match range::parse(range_header, size) {
        RangeRequest::Unsatisfiable => return Err(Error::RangeNotSatisfiable { size }),
        RangeRequest::Full => blob_response(digest, 0, size, size, body::full(bytes), false),
        RangeRequest::Partial { start, end } => {
            let part = bytes.slice(start as usize..end as usize);
            blob_response(digest, start, end, size, body::full(part), true)
        }
    };
    Ok((sourced(resp, tier.into()), CacheResult::Hit))
}

fn blob_request(sel: &Selected, method: Method, digest: &Digest) -> UpstreamRequest {
    UpstreamRequest {
        method,
        path_and_query: format!("/v2/{}/blobs/{}", sel.name, digest),
        headers: HeaderMap::new(),
        scope: format!("repository:{}:pull", sel.name),
        auth: sel.auth.clone(),
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A failed fill's answer: the source's own error as the origin's would be answered (every
/// fetcher here fails with an [`UpstreamError`]), bytes that failed verification as a bad
/// gateway (counted in `berth_digest_mismatches_total` by `App::handle`), a full fill queue
/// as 429.
fn fill_err(e: FillError) -> Error {
    match e {
        FillError::Fetch(f) => match f.downcast_ref::<UpstreamError>() {
            Some(u) => not_found_as(u.clone(), "blob"),
            None => Error::Upstream(UpstreamError::Unreachable {
                upstream: f.source_name().to_owned(),
                reason: f.to_string(),
            }),
        },
        FillError::DigestMismatch {
            source_name,
            expected,
            actual,
        } => Error::Upstream(UpstreamError::DigestMismatch {
            upstream: source_name,
            expected: expected.to_string(),
            actual: actual.to_string(),
        }),
        FillError::WrongLength {
            source_name,
            reason,
        } => Error::Upstream(UpstreamError::Invalid {
            upstream: source_name,
            reason,
        }),
        e @ FillError::QueueTimeout { .. } => Error::TooManyRequests(e.to_string()),
        FillError::Internal(m) => Error::Internal(m),
    }
}

fn blob_head(d: &Digest, size: u64) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .header(DIGEST_HEADER, d.as_str())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, conditional::etag(d))
        .body(body::empty())
        .expect("static headers are valid")
}

fn blob_response(
    d: &Digest,
    start: u64,
    end: u64,
    size: u64,
    body: Body,
    partial: bool,
) -> Response<Body> {
    let mut b = Response::builder()
        .status(if partial {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(DIGEST_HEADER, d.as_str())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, conditional::etag(d));
    if partial {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    b.body(body).expect("static headers are valid")
}
