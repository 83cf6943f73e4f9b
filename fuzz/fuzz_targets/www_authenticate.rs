//! `WWW-Authenticate` from origins. Schemes and parameter names come out lowercased and free of
//! separators, and challenges written back out (every value quoted) parse to the same challenges.
#![no_main]

use berth::upstream::challenge::{self, Challenge};
use libfuzzer_sys::fuzz_target;

fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The challenges with every value quoted. A parameter with an empty name (`realm=a=b` gives
/// one) has no written form: `scheme =v` would read as a parameter named `scheme`.
fn render(challenges: &[Challenge]) -> String {
    challenges
        .iter()
        .map(|c| {
            let mut params: Vec<_> = c.params.iter().filter(|(k, _)| !k.is_empty()).collect();
            params.sort();
            let params: Vec<String> = params
                .into_iter()
                .map(|(k, v)| format!("{k}={}", quote(v)))
                .collect();
            format!("{} {}", c.scheme, params.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = challenge::parse(header);
    for c in &parsed {
        assert!(!c.scheme.is_empty(), "{header:?} → {parsed:?}");
        assert_eq!(c.scheme, c.scheme.to_ascii_lowercase());
        assert!(!c.scheme.contains([' ', '\t', ',', '=']), "{parsed:?}");
        for k in c.params.keys() {
            assert_eq!(*k, k.to_ascii_lowercase());
            assert!(!k.contains([' ', '\t', ',', '=']), "{parsed:?}");
            assert_eq!(c.param(k), c.params.get(k).map(String::as_str));
        }
    }
    let again = render(&parsed);
    let mut named = parsed.clone();
    for c in &mut named {
        c.params.remove("");
    }
    assert_eq!(
        challenge::parse(&again),
        named,
        "{header:?} → {parsed:?} → {again:?}"
    );
});
