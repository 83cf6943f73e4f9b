//! GET|HEAD /v2/<name>/blobs/<digest>: from disk, or from the single fill of a missing blob,
//! with Range (206 / 416) on both.

use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderMap, Method, Response, StatusCode};

use super::manifests::{io_err, not_found_as, DIGEST_HEADER};
use super::range::{self, RangeRequest};
use super::{App, CacheResult};
use crate::body::{self, Body};
use crate::cache::fill::{read_range, BlobSource, Fetched, FillError};
use crate::error::Error;
use crate::oci::Digest;
use crate::upstream::{Selected, UpstreamError, UpstreamRequest};

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
        let upstream = sel.upstream.clone();
        let req = blob_request(sel, Method::GET, &digest);
        let metrics = self.metrics.clone();
        let source = self
            .cache()
            .fills()
            .blob_or_fill(&digest, move || fetch_blob(upstream, req, metrics))
            .map_err(io_err)?;
        match source {
            BlobSource::Cached(file, size) => {
                self.count_lookup("blob", "disk", true);
                let file = Arc::new(file);
                let resp = match range::parse(range_header, size) {
                    RangeRequest::Unsatisfiable => return Err(Error::RangeNotSatisfiable { size }),
                    RangeRequest::Full => blob_response(
                        &digest,
                        0,
                        size,
                        size,
                        read_range(file, 0, Some(size), None),
                        false,
                    ),
                    RangeRequest::Partial { start, end } => blob_response(
                        &digest,
                        start,
                        end,
                        size,
                        read_range(file, start, Some(end), None),
                        true,
                    ),
                };
                Ok((resp, CacheResult::Hit))
            }
            BlobSource::Filling { fill, leader } => {
                self.count_lookup("blob", "disk", false);
                if !leader {
                    self.metrics.fill_waiters.inc();
                }
                let total = fill.ready().await.map_err(fill_err)?;
                let total = match (total, range_header) {
                    (Some(t), _) => Some(t),
                    // Unknown length and a Range: the range can be checked only at the end.
                    (None, Some(_)) => Some(fill.finished().await.map_err(fill_err)?),
                    (None, None) => None,
                };
                let resp = match total {
                    None => {
                        let stream = fill.reader(0, None).map_err(io_err)?;
                        Response::builder()
                            .status(StatusCode::OK)
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header(DIGEST_HEADER, digest.to_string())
                            .header(header::ACCEPT_RANGES, "bytes")
                            .body(body::stream(stream))
                            .map_err(|e| Error::Internal(e.to_string()))?
                    }
                    Some(size) => match range::parse(range_header, size) {
                        RangeRequest::Unsatisfiable => {
                            return Err(Error::RangeNotSatisfiable { size })
                        }
                        RangeRequest::Full => {
                            let s = fill.reader(0, Some(size)).map_err(io_err)?;
                            blob_response(&digest, 0, size, size, s, false)
                        }
                        RangeRequest::Partial { start, end } => {
                            let s = fill.reader(start, Some(end)).map_err(io_err)?;
                            blob_response(&digest, start, end, size, s, true)
                        }
                    },
                };
                Ok((resp, CacheResult::Miss))
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
        if let Some((_, size)) = self.cache().store().open_blob(digest).map_err(io_err)? {
            self.count_lookup("blob", "disk", true);
            return Ok((blob_head(digest, size), CacheResult::Hit));
        }
        if let Some(fill) = self.cache().fills().get(digest) {
            if let Ok(Some(size)) = fill.ready().await {
                return Ok((blob_head(digest, size), CacheResult::Miss));
            }
        }
        self.count_lookup("blob", "disk", false);
        let req = blob_request(sel, Method::HEAD, digest);
        let started = Instant::now();
        let resp = sel.upstream.send(&req).await;
        self.count_upstream(
            sel,
            &Method::HEAD,
            resp.as_ref().ok().map(|r| r.status()),
            started,
        );
        let resp = resp.map_err(|e| not_found_as(e, "blob"))?;
        if resp.status() != StatusCode::OK {
            return Err(not_found_as(sel.upstream.status_error(&resp), "blob"));
        }
        let size = content_length(resp.headers()).ok_or_else(|| {
            Error::Upstream(UpstreamError::Invalid {
                upstream: sel.upstream.name().to_owned(),
                reason: "blob HEAD without Content-Length".into(),
            })
        })?;
        Ok((blob_head(digest, size), CacheResult::Miss))
    }
}

fn blob_request(sel: &Selected, method: Method, digest: &Digest) -> UpstreamRequest {
    UpstreamRequest {
        method,
        path_and_query: format!("/v2/{}/blobs/{}", sel.name, digest),
        headers: HeaderMap::new(),
        scope: format!("repository:{}:pull", sel.name),
    }
}

/// The fetch a fill runs: GET the blob, hand over its length and body.
async fn fetch_blob(
    upstream: Arc<crate::upstream::Upstream>,
    req: UpstreamRequest,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<Fetched, UpstreamError> {
    let started = Instant::now();
    let resp = upstream.send(&req).await;
    let status = resp
        .as_ref()
        .map(|r| r.status().as_str().to_owned())
        .unwrap_or_else(|_| "error".into());
    metrics
        .upstream_requests
        .with_label_values(&[upstream.name(), "GET", &status])
        .inc();
    metrics
        .upstream_duration
        .with_label_values(&[upstream.name()])
        .observe(started.elapsed().as_secs_f64());
    let resp = resp?;
    if resp.status() != StatusCode::OK {
        return Err(upstream.status_error(&resp));
    }
    let total = content_length(resp.headers());
    let name = upstream.name().to_owned();
    let body = resp.into_body();
    let stream = futures_util::stream::unfold(Some((upstream, body)), |state| async move {
        let (u, mut b) = state?;
        match u.next_chunk(&mut b).await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some((u, b)))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(Fetched {
        total,
        upstream: name,
        body: Box::pin(stream),
    })
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn fill_err(e: FillError) -> Error {
    match e {
        FillError::Upstream(u) => not_found_as(u, "blob"),
        FillError::Io(m) => Error::Internal(m),
    }
}

fn blob_head(d: &Digest, size: u64) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .header(DIGEST_HEADER, d.to_string())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{d}\""))
        .body(body::empty())
        .expect("static headers are valid")
}

fn blob_response(
    d: &Digest,
    start: u64,
    end: u64,
    size: u64,
    stream: crate::cache::BlobStream,
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
        .header(DIGEST_HEADER, d.to_string())
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{d}\""));
    if partial {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    b.body(body::stream(stream))
        .expect("static headers are valid")
}
