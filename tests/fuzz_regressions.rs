//! Inputs the cargo-fuzz targets in `fuzz/` found to crash a parser, fed to the same public
//! entry points, so that each fix stays fixed without a nightly toolchain. Each test names its
//! target and says what the input was.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use berth::auth::jwt;

/// A JWT whose claims are `json`, as the `jwt_claims` target builds them.
fn token_with_claims(json: &str) -> String {
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    format!("eyJhbGciOiJFUzI1NiJ9.{claims}.c2ln")
}

/// `jwt_claims`: a client's bearer token stating `exp` past what `SystemTime` holds (here
/// 14555742147232889634, from the crash input `"{\xff\xff\\b\x00\xca`) panicked on overflow
/// while berth computed how long to reuse an authorization decision.
#[test]
fn jwt_exp_beyond_system_time_states_no_expiry() {
    for exp in [14_555_742_147_232_889_634u64, u64::MAX, 1 << 63] {
        let t = token_with_claims(&format!(r#"{{"sub":"ci","exp":{exp}}}"#));
        assert_eq!(jwt::expiry(&t), None, "exp {exp}");
        assert_eq!(jwt::remaining(&t), None, "exp {exp}");
    }
    // An ordinary expiry is still read.
    let t = token_with_claims(r#"{"exp":4102444800}"#);
    assert_eq!(
        jwt::expiry(&t),
        Some(UNIX_EPOCH + Duration::from_secs(4_102_444_800))
    );
}
