//! The `exp` claim of client and origin bearer tokens (read unverified, to bound how long an
//! authorization decision is reused). Each input is tried as a whole token, as the claims JSON
//! of a token, and (its first eight bytes) as the `exp` of a token, so that mutations reach the
//! claim reader and every expiry a client could state is tried.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use berth::auth::jwt;
use libfuzzer_sys::fuzz_target;

fn check(token: &str) {
    let exp = jwt::expiry(token);
    if let Some(t) = exp {
        assert!(t >= UNIX_EPOCH);
    }
    let left = jwt::remaining(token);
    assert_eq!(left.is_some(), exp.is_some(), "{token:?}");
    // A token may state any expiry; berth only ever shortens a decision with it.
    let _ = left.map(|r| r.min(Duration::from_secs(300)));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check(s);
    }
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data);
    check(&format!("eyJhbGciOiJFUzI1NiJ9.{claims}.c2ln"));
    if let Some(exp) = data.get(..8) {
        let exp = u64::from_le_bytes(exp.try_into().expect("eight bytes"));
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"sub":"ci","exp":{exp}}}"#));
        let token = format!("eyJhbGciOiJFUzI1NiJ9.{claims}.c2ln");
        check(&token);
        // Every expiry `SystemTime` can hold (seconds in an i64 on Unix) is read as one.
        if i64::try_from(exp).is_ok() {
            assert!(jwt::expiry(&token).is_some(), "{token:?}");
        }
    }
});
