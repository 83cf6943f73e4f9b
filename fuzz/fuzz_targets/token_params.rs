//! `/token` requests as clients send them: the query or form parameters, and the
//! `Authorization` header. Each input is read as the raw text of both, and as a list of pairs
//! that must survive encoding for an origin's token service and decoding back.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use berth::auth::realm::{decode_pairs, encode_pairs};
use berth::auth::{Credential, Principal};
use http::{header, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let pairs = decode_pairs(&text);
    assert_eq!(decode_pairs(&encode_pairs(&pairs)), pairs, "{text:?}");

    if let Ok(v) = HeaderValue::from_bytes(data) {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v);
        if let Ok(p) = Principal::from_headers(&h) {
            assert!(!p.is_anonymous());
            // The key is a hash, never the credential.
            assert_eq!(p.key.len(), 64, "{p:?}");
            assert!(p.key.bytes().all(|b| b.is_ascii_hexdigit()));
            if let Credential::Bearer(t) = &p.credential {
                assert!(!t.expose().is_empty());
            }
        }
    }

    if let Ok(pairs) = Vec::<(String, String)>::arbitrary_take_rest(Unstructured::new(data)) {
        assert_eq!(decode_pairs(&encode_pairs(&pairs)), pairs);
    }
});
