//! `/token`: berth as the token realm its clients see (docs/ARCHITECTURE.md, "Authorization").
//!
//! For `passthrough` upstreams the request is forwarded to the origin's own token service (realm
//! and service discovered from the origin's challenge), with scopes translated to the origin's
//! repository names, and the origin's answer returned. For `service` and `public` upstreams berth
//! authenticates the client locally and issues a token of its own.
//!
//! `endpoint` reads the request and picks the upstream, `scope` translates scopes to the
//! origin's names, `forward` asks the origin's token service, `issue` issues berth's own tokens.

mod endpoint;
mod forward;
mod issue;
mod scope;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Response, StatusCode};

use crate::body::{self, Body};

pub use endpoint::{decode_pairs, encode_pairs, TokenRequest};

/// Largest token request or response body accepted.
const MAX_TOKEN_BODY: usize = 64 << 10;

/// RFC 3339 UTC time to the second, as token services write `issued_at` (a clock set before
/// 1970 reads as 1970).
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t.max(UNIX_EPOCH)).to_string()
}

/// A token answer in the shape token services use (`token` and `access_token` both set).
fn token_json(token: &str, expires_in: Duration) -> Response<Body> {
    let v = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": expires_in.as_secs(),
        "issued_at": rfc3339(SystemTime::now()),
    });
    json(StatusCode::OK, v)
}

/// A JSON answer that no cache may keep.
fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let bytes = Bytes::from(v.to_string());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body::full(bytes))
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00Z"
        );
    }
}
