//! berth's own caching answers to clients. Content-addressed responses (blobs, manifests by
//! digest) say they never change; a manifest the client already holds (`If-None-Match` naming
//! its `ETag`, the digest) is answered `304 Not Modified` without the body. Both are applied to
//! a response the handler already built, so a `304` is only ever given where the `200` would
//! have been: after authorization, never instead of it.
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// `Cache-Control` of content-addressed answers: a digest names the same bytes forever.
pub const IMMUTABLE: &str = "max-age=31536000, immutable";

/// The entity tag of content `d`: its digest, quoted.
pub(super) fn etag(d: &crate::oci::Digest) -> String {
    let mut q = String::with_capacity(d.as_str().len() + 2);
    q.push('"');
    q.push_str(d.as_str());
    q.push('"');
    q
}

/// Marks a successful answer for a digest as never changing (unless the handler said
/// otherwise).
pub(super) fn immutable(resp: &mut Response<Body>) {
    if resp.status().is_success() && !resp.headers().contains_key(header::CACHE_CONTROL) {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    }
}

/// `resp` (a `200` with an `ETag`) as `304 Not Modified` when the client's `If-None-Match`
/// names that ETag: the same headers, no body, no length.
pub(super) fn not_modified_if_held(request: &HeaderMap, resp: Response<Body>) -> Response<Body> {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let held = resp
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|etag| if_none_match(request, etag));
    if !held {
        return resp;
    }
    let (mut parts, _) = resp.into_parts();
    parts.status = StatusCode::NOT_MODIFIED;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, body::empty())
}

/// Whether `If-None-Match` in `request` matches `etag` (weak comparison, RFC 9110 13.1.2: `*`
/// or any listed tag, `W/` ignored).
fn if_none_match(request: &HeaderMap, etag: &str) -> bool {
    let ours = opaque(etag);
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || (!t.is_empty() && opaque(t) == ours))
}

fn opaque(etag: &str) -> &str {
    etag.trim().trim_start_matches("W/")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "\"sha256:aaaa\"";

    fn ok() -> Response<Body> {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::ETAG, D)
            .header(header::CONTENT_LENGTH, 5)
            .header("docker-content-digest", "sha256:aaaa")
            .body(body::full(bytes::Bytes::from_static(b"hello")))
            .unwrap()
    }

    fn asking(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_held_etag_gets_304_without_length() {
        for v in [D, "W/\"sha256:aaaa\"", "\"other\", \"sha256:aaaa\"", "*"] {
            let r = not_modified_if_held(&asking(v), ok());
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{v}");
            assert!(r.headers().get(header::CONTENT_LENGTH).is_none());
            assert_eq!(r.headers()[header::ETAG], D);
            assert_eq!(r.headers()["docker-content-digest"], "sha256:aaaa");
        }
    }

    #[test]
    fn anything_else_passes() {
        for v in ["\"sha256:bbbb\"", "", "sha256:aaaa"] {
            let r = not_modified_if_held(&asking(v), ok());
            assert_eq!(r.status(), StatusCode::OK, "{v:?}");
        }
        assert_eq!(
            not_modified_if_held(&HeaderMap::new(), ok()).status(),
            StatusCode::OK
        );
        let mut refused = ok();
        *refused.status_mut() = StatusCode::NOT_FOUND;
        assert_eq!(
            not_modified_if_held(&asking("*"), refused).status(),
            StatusCode::NOT_FOUND,
            "only a 200 becomes a 304"
        );
    }

    #[test]
    fn immutable_only_on_success_and_never_overrides() {
        let mut r = ok();
        immutable(&mut r);
        assert_eq!(r.headers()[header::CACHE_CONTROL], IMMUTABLE);
        let mut err = ok();
        *err.status_mut() = StatusCode::NOT_FOUND;
        immutable(&mut err);
        assert!(err.headers().get(header::CACHE_CONTROL).is_none());
        let mut own = ok();
        own.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        immutable(&mut own);
        assert_eq!(own.headers()[header::CACHE_CONTROL], "no-store");
    }
}
