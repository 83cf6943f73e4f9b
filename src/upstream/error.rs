//! Errors of the upstream client, each knowing the status berth answers its own client with.
//!
//! Architecture: docs/ARCHITECTURE.md, "Upstream client".

use http::StatusCode;

/// Why a request to an origin did not produce a usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// TCP, TLS or HTTP failure before an answer arrived.
    #[error("upstream {upstream} unreachable: {reason}")]
    Unreachable {
        /// Upstream name.
        upstream: String,
        /// What went wrong (no credentials in it).
        reason: String,
    },
    /// A connect, first-byte or idle timeout expired.
    #[error("upstream {upstream} timed out ({what})")]
    Timeout {
        /// Upstream name.
        upstream: String,
        /// Which timeout.
        what: &'static str,
    },
    /// The origin answered with an error status berth passes on in kind.
    #[error("upstream {upstream} answered {status}")]
    Status {
        /// Upstream name.
        upstream: String,
        /// The origin's status.
        status: StatusCode,
        /// The origin's Retry-After, if any.
        retry_after: Option<String>,
    },
    /// The origin's token service refused or failed.
    #[error("token service of {upstream} failed: {reason}")]
    Token {
        /// Upstream name.
        upstream: String,
        /// What went wrong.
        reason: String,
    },
    /// Bytes from the origin do not match the digest they were asked for.
    #[error("content from {upstream} does not match digest {expected} (got {actual})")]
    DigestMismatch {
        /// Upstream name.
        upstream: String,
        /// Digest requested.
        expected: String,
        /// Digest computed from the bytes.
        actual: String,
    },
    /// The origin sent something berth will not accept (oversized manifest, bad header).
    #[error("upstream {upstream} sent an invalid answer: {reason}")]
    Invalid {
        /// Upstream name.
        upstream: String,
        /// What was wrong.
        reason: String,
    },
    /// The upstream is configured offline and the content is not cached.
    #[error("not in this mirror: {upstream} is offline and the content is not cached")]
    Offline {
        /// Upstream name.
        upstream: String,
    },
}

impl UpstreamError {
    /// Status berth answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Unreachable { .. } | UpstreamError::Token { .. } => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Status { status, .. } => match *status {
                StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::NOT_FOUND
                | StatusCode::TOO_MANY_REQUESTS => *status,
                s if s.is_server_error() => StatusCode::BAD_GATEWAY,
                _ => StatusCode::BAD_GATEWAY,
            },
            UpstreamError::DigestMismatch { .. } | UpstreamError::Invalid { .. } => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamError::Offline { .. } => StatusCode::NOT_FOUND,
        }
    }

    /// OCI error code.
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Status { status, .. } => match *status {
                StatusCode::UNAUTHORIZED => "UNAUTHORIZED",
                StatusCode::FORBIDDEN => "DENIED",
                StatusCode::NOT_FOUND => "NAME_UNKNOWN",
                StatusCode::TOO_MANY_REQUESTS => "TOOMANYREQUESTS",
                _ => "UNAVAILABLE",
            },
            UpstreamError::Offline { .. } => "NAME_UNKNOWN",
            _ => "UNAVAILABLE",
        }
    }

    /// Retry-After to pass on (429 and 503 answers).
    pub fn retry_after(&self) -> Option<&str> {
        match self {
            UpstreamError::Status { retry_after, .. } => retry_after.as_deref(),
            _ => None,
        }
    }

    /// Whether the origin is down or failing (as opposed to answering "no"): the condition under
    /// which berth serves stale content (stale-if-error, docs/ARCHITECTURE.md "Cache").
    pub fn is_origin_failure(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Token { .. }
            | UpstreamError::Offline { .. } => true,
            UpstreamError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamError::DigestMismatch { .. } | UpstreamError::Invalid { .. } => false,
        }
    }

    /// Whether the origin said the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}
