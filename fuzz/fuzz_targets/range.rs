//! `Range` on blob GETs. Input: the object size in decimal on the first line, the header value
//! after it (no second line: no header). A partial answer always lies inside the object, and a
//! plain `bytes=A-B` is answered as RFC 9110 says.
#![no_main]

use berth::proxy::range::{self, RangeRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (size, header) = match s.split_once('\n') {
        Some((size, header)) => (size, Some(header)),
        None => (s, None),
    };
    // A size that is not a number still exercises the parser, with a size taken from its bytes.
    let size = size.trim().parse::<u64>().unwrap_or_else(|_| {
        size.bytes()
            .fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)))
    });
    let got = range::parse(header, size);
    match got {
        RangeRequest::Partial { start, end } => {
            assert!(start < end && end <= size, "{header:?} of {size}: {got:?}");
        }
        RangeRequest::Unsatisfiable | RangeRequest::Full => {}
    }
    // Oracle for the common form, digits only: bytes=A-B.
    let Some(spec) = header.and_then(|h| h.strip_prefix("bytes=")) else {
        return;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return;
    };
    let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else {
        return;
    };
    if !spec.bytes().all(|c| c.is_ascii_digit() || c == b'-') {
        return;
    }
    let want = if b < a {
        RangeRequest::Full
    } else if a >= size {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Partial {
            start: a,
            end: b.saturating_add(1).min(size),
        }
    };
    assert_eq!(got, want, "{header:?} of {size}");
});
