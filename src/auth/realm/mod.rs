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

/// RFC 3339 UTC time, as token services write `issued_at`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
    }
}
