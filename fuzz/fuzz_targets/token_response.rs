//! A token service's JSON answer as berth reads it when it logs in at an origin, then kept in
//! the per-scope token cache for the lifetime it grants. Each input is tried as the body, and
//! its first eight bytes as the `expires_in` of a body.
#![no_main]

use std::time::Duration;

use berth::upstream::{parse_token_response, TokenCache};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    check(body);
    // The first eight bytes as the lifetime granted, so that every `expires_in` is tried.
    if let Some(n) = body.get(..8) {
        let n = u64::from_le_bytes(n.try_into().expect("eight bytes"));
        check(format!(r#"{{"token":"t","expires_in":{n}}}"#).as_bytes());
    }
});

fn check(body: &[u8]) {
    let Ok((token, life)) = parse_token_response(body) else {
        return;
    };
    assert!(!token.expose().is_empty());
    assert!(life >= Duration::from_secs(1));
    // Never longer than the service granted (a missing or zero grant still lasts a second).
    // serde_json skips unknown fields without checking their UTF-8, so only bodies that read
    // as a whole `Value` are checked.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let granted = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(60);
        assert!(life <= Duration::from_secs(granted.max(1)), "{life:?}");
    }
    let cache = TokenCache::default();
    cache.put("repository:library/alpine:pull", token.clone(), life);
    let kept = cache
        .get("repository:library/alpine:pull")
        .expect("a token granted for a second or more is kept");
    assert_eq!(kept.expose(), token.expose());
}
