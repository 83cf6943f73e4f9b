//! Reads the expiry of a JWT without verifying it: only to bound how long a decision the origin
//! made about this token is reused. The origin verifies the token; berth never trusts its claims.
//!
//! Architecture: docs/ARCHITECTURE.md, "Authorization".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// The `exp` claim of a JWT-shaped token, if it has one.
pub fn expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let exp = serde_json::from_slice::<Claims>(&raw).ok()?.exp?;
    // Clients choose `exp`: one past what `SystemTime` holds states no usable expiry.
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// How long from now until the token's expiry (zero when expired), if it states one.
pub fn remaining(token: &str) -> Option<Duration> {
    remaining_at(token, SystemTime::now())
}

/// How long from `now` until the token's expiry (zero when expired), if it states one.
pub fn remaining_at(token: &str, now: SystemTime) -> Option<Duration> {
    let exp = expiry(token)?;
    Some(exp.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exp() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":4102444800}"#);
        let t = format!("eyJhbGciOiJFUzI1NiJ9.{payload}.sig");
        assert_eq!(
            expiry(&t),
            Some(UNIX_EPOCH + Duration::from_secs(4_102_444_800))
        );
        assert!(remaining(&t).unwrap() > Duration::from_secs(3600));
        assert_eq!(expiry("opaque-token"), None);
        assert_eq!(expiry("a.!!!.c"), None);
        let old = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1}"#);
        assert_eq!(remaining(&format!("x.{old}.y")), Some(Duration::ZERO));
    }
}
