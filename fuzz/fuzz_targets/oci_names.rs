//! Repository names, tags, references, digests and image references. Whatever parses renders
//! back to the same string (or, for image references, to a string that parses to the same
//! value), and stays inside the grammar: no empty, `.` or `..` name component, lowercase hex.
#![no_main]

use berth::oci::{Digest, DigestAlgorithm, ImageRef, Reference, RepoName, Tag};
use libfuzzer_sys::fuzz_target;

fn names(s: &str) {
    if let Ok(n) = s.parse::<RepoName>() {
        assert_eq!(n.to_string(), s);
        assert_eq!(n.to_string().parse::<RepoName>().as_ref(), Ok(&n));
        assert!(n.as_str().len() <= berth::oci::name::MAX_NAME_LEN);
        assert!(!n
            .as_str()
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".."));
        assert_eq!(n.components(), n.as_str().split('/').count());
        // The Docker Hub prefix keeps a name valid unless it makes it too long.
        let l = n.with_library_prefix();
        if l.as_str().len() <= berth::oci::name::MAX_NAME_LEN {
            assert_eq!(l.as_str().parse::<RepoName>().as_ref(), Ok(&l));
        }
    }
}

fn references(s: &str) {
    if let Ok(t) = s.parse::<Tag>() {
        assert_eq!(t.to_string(), s);
        assert!(t.as_str().len() <= 128);
    }
    match s.parse::<Reference>() {
        Ok(r) => {
            assert_eq!(r.to_string(), s);
            assert_eq!(r.to_string().parse::<Reference>().as_ref(), Ok(&r));
            assert!(!s.contains('/'), "{s:?} → {r:?}");
        }
        Err(_) => assert!(s.parse::<Tag>().is_err() || s.contains(':')),
    }
}

fn digests(s: &str) {
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d));
        assert_eq!(d.hex().len(), d.algorithm().hex_len());
        assert!(d
            .hex()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
}

fn image_refs(s: &str) {
    if let Ok(r) = s.parse::<ImageRef>() {
        assert!(r.tag.is_some() || r.digest.is_some(), "{s:?} → {r:?}");
        let again = r.to_string();
        assert_eq!(
            again.parse::<ImageRef>().as_ref(),
            Ok(&r),
            "{s:?} → {r:?} → {again:?}"
        );
        assert!(r.reference().parse::<Reference>().is_ok(), "{s:?} → {r:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    names(s);
    references(s);
    digests(s);
    image_refs(s);
    // The digest of the input is always valid and round-trips.
    let d = Digest::sha256_of(data);
    assert_eq!(d.algorithm(), DigestAlgorithm::Sha256);
    digests(&d.to_string());
});
