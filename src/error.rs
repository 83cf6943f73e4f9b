//! The one error type every request handler returns, and the one place it becomes an HTTP
//! answer: status from [`Error::status`], OCI code from [`Error::code`], JSON body built in
//! [`Error::into_response`] (never in `Display`).
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::cache::{FetchError, FetchFailure};
use crate::oci::{DigestError, NameError, ReferenceError};
use crate::upstream::UpstreamError;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repository name fails the spec's grammar.
    #[error("invalid repository name: {0}")]
    NameInvalid(#[from] NameError),
    /// A digest in the path or query is malformed or uses an unknown algorithm.
    #[error("invalid digest: {0}")]
    DigestInvalid(#[from] DigestError),
    /// A manifest reference is neither a valid tag nor a valid digest.
    #[error("invalid manifest reference: {0}")]
    ReferenceInvalid(#[from] ReferenceError),
    /// No configured upstream for this repository or `ns`.
    #[error("{0}")]
    NameUnknown(String),
    /// The manifest does not exist (at the origin, or in this mirror when offline).
    #[error("{0}")]
    ManifestUnknown(String),
    /// The blob does not exist (at the origin, or in this mirror when offline).
    #[error("{0}")]
    BlobUnknown(String),
    /// The origin wants credentials berth does not have.
    #[error("{0}")]
    Unauthorized(String),
    /// The client must authenticate (again): 401 with berth's own Bearer challenge.
    #[error("{message}")]
    AuthRequired {
        /// The `WWW-Authenticate` value.
        challenge: String,
        /// Why.
        message: String,
    },
    /// The origin refused access.
    #[error("{0}")]
    Denied(String),
    /// The origin is rate limiting.
    #[error("{0}")]
    TooManyRequests(String),
    /// A write or an unknown method: berth is a pull-only cache.
    #[error("{0}")]
    Unsupported(String),
    /// No such route.
    #[error("{0}")]
    NotFound(String),
    /// A Range header berth cannot parse or satisfy for an object of `size` bytes.
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable {
        /// The object's length, sent back in `Content-Range: bytes */size`.
        size: u64,
    },
    /// `Cache-Control: only-if-cached` and the object is not cached (RFC 9111: 504).
    #[error("not in the cache (only-if-cached)")]
    NotCached,
    /// A bad query parameter or header.
    #[error("{0}")]
    BadRequest(String),
    /// The origin failed, could not be reached, or sent content that failed verification.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A local failure (disk, internal invariant).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NameInvalid(_)
            | Error::DigestInvalid(_)
            | Error::ReferenceInvalid(_)
            | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::NameUnknown(_)
            | Error::ManifestUnknown(_)
            | Error::BlobUnknown(_)
            | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Unauthorized(_) | Error::AuthRequired { .. } => StatusCode::UNAUTHORIZED,
            Error::Denied(_) => StatusCode::FORBIDDEN,
            Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Error::Upstream(e) => e.status(),
            Error::NotCached => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OCI distribution error code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NameInvalid(_) => "NAME_INVALID",
            Error::DigestInvalid(_) => "DIGEST_INVALID",
            Error::ReferenceInvalid(ReferenceError::BadDigest(_)) => "DIGEST_INVALID",
            Error::ReferenceInvalid(_) => "MANIFEST_INVALID",
            Error::NameUnknown(_) => "NAME_UNKNOWN",
            Error::ManifestUnknown(_) => "MANIFEST_UNKNOWN",
            Error::BlobUnknown(_) => "BLOB_UNKNOWN",
            Error::Unauthorized(_) | Error::AuthRequired { .. } => "UNAUTHORIZED",
            Error::Denied(_) => "DENIED",
            Error::TooManyRequests(_) => "TOOMANYREQUESTS",
            Error::Unsupported(_) | Error::NotFound(_) => "UNSUPPORTED",
            Error::RangeNotSatisfiable { .. } => "RANGE_INVALID",
            Error::BadRequest(_) => "UNSUPPORTED",
            Error::Upstream(e) => e.code(),
            Error::NotCached => "BLOB_UNKNOWN",
            Error::Internal(_) => "UNKNOWN",
        }
    }

    /// Builds the answer: status, OCI JSON error body, and the headers the error calls for.
    /// HEAD answers carry the same headers and no body.
    pub fn into_response(self, head: bool) -> Response<Body> {
        let status = self.status();
        let json = serde_json::json!({
            "errors": [{ "code": self.code(), "message": self.to_string(), "detail": null }]
        });
        let bytes = Bytes::from(json.to_string());
        let mut resp = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, bytes.len())
            .header(crate::oci::API_VERSION_HEADER, crate::oci::API_VERSION);
        match &self {
            Error::RangeNotSatisfiable { size } => {
                resp = resp.header(header::CONTENT_RANGE, format!("bytes */{size}"));
            }
            Error::Unsupported(_) => {
                resp = resp.header(header::ALLOW, "GET, HEAD");
            }
            Error::AuthRequired { challenge, .. } => {
                resp = resp.header(header::WWW_AUTHENTICATE, challenge.as_str());
            }
            Error::Upstream(e) => {
                if let Some(ra) = e.retry_after() {
                    resp = resp.header(header::RETRY_AFTER, ra);
                }
            }
            _ => {}
        }
        let body = if head {
            body::empty()
        } else {
            body::full(bytes)
        };
        let mut r = resp.body(body).expect("static headers are valid");
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

// === impl FetchError ===

/// An upstream client's failure as a fill sees it: its class (the fill failure label), the
/// upstream's name, and the error itself, which the blob handler recovers to answer as it
/// would without the cache.
impl From<UpstreamError> for FetchError {
    fn from(e: UpstreamError) -> FetchError {
        let (failure, name) = match &e {
            UpstreamError::Unreachable { upstream, .. } => (FetchFailure::Unreachable, upstream),
            UpstreamError::Timeout { upstream, .. } => (FetchFailure::Timeout, upstream),
            UpstreamError::Status { upstream, .. } => (FetchFailure::Status, upstream),
            UpstreamError::Token { upstream, .. } => (FetchFailure::Auth, upstream),
            UpstreamError::DigestMismatch { upstream, .. } => {
                (FetchFailure::DigestMismatch, upstream)
            }
            UpstreamError::Invalid { upstream, .. } => (FetchFailure::Invalid, upstream),
            UpstreamError::Offline { upstream } => (FetchFailure::Offline, upstream),
        };
        FetchError::new(failure, name.clone(), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses_follow_the_spec() {
        let e = Error::BlobUnknown("x".into());
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
        );
        let e = Error::from("sha1:x".parse::<crate::oci::Digest>().unwrap_err());
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
        );
        let e = Error::Unsupported("push".into());
        assert_eq!(e.status(), StatusCode::METHOD_NOT_ALLOWED);
        let r = Error::RangeNotSatisfiable { size: 10 }.into_response(false);
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes */10");
    }

    #[test]
    fn an_upstream_error_passes_through_a_fill_whole() {
        let e = UpstreamError::Status {
            upstream: "hub".into(),
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some("7".into()),
        };
        let f = FetchError::from(e.clone());
        assert_eq!(
            (f.failure().as_str(), f.source_name(), f.is_offline()),
            ("status", "hub", false)
        );
        assert_eq!(f.to_string(), e.to_string());
        let back = f
            .downcast_ref::<UpstreamError>()
            .expect("the origin's error");
        assert_eq!((back.status(), back.retry_after()), (e.status(), Some("7")));
        let offline = FetchError::from(UpstreamError::Offline {
            upstream: "hub".into(),
        });
        assert!(offline.is_offline());
        assert_eq!(offline.failure().as_str(), "offline");
    }
}
