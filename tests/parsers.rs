//! Property tests: the parsers that see client and origin input never panic, and what they
//! accept round-trips and stays inside the grammar (no path traversal can get through).

use berth::oci::{Digest, Reference, RepoName};
use berth::proxy::range::{self, RangeRequest};
use berth::router::{self, Route};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn router_never_panics_and_accepts_only_safe_names(path in "(/v2/)?[a-zA-Z0-9._%:/-]{0,80}") {
        if let Ok(route) = router::parse(&path) {
            let name = match &route {
                Route::Manifest { name, .. } | Route::Blob { name, .. } | Route::Tags { name } | Route::Referrers { name, .. } => Some(name),
                _ => None,
            };
            if let Some(n) = name {
                prop_assert!(!n.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                prop_assert!(!n.as_str().contains('%'));
            }
        }
    }

    #[test]
    fn digests_round_trip(s in "[a-z0-9]{0,8}:[0-9a-fA-F./]{0,130}") {
        if let Ok(d) = s.parse::<Digest>() {
            prop_assert_eq!(d.to_string(), s.clone());
            prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn names_and_references_round_trip(s in "[a-z0-9._/-]{0,40}", r in "[a-zA-Z0-9._:-]{0,140}") {
        if let Ok(n) = s.parse::<RepoName>() {
            prop_assert_eq!(n.as_str(), s.as_str());
        }
        if let Ok(x) = r.parse::<Reference>() {
            prop_assert_eq!(x.to_string(), r.clone());
        }
    }

    #[test]
    fn ranges_stay_inside_the_object(h in "bytes=[0-9]{0,12}-[0-9]{0,12}", size in 0u64..1_000_000) {
        match range::parse(Some(&h), size) {
            RangeRequest::Partial { start, end } => prop_assert!(start < end && end <= size),
            RangeRequest::Full | RangeRequest::Unsatisfiable => {}
        }
    }

    #[test]
    fn arbitrary_range_headers_never_panic(h in ".{0,40}", size in any::<u64>()) {
        let _ = range::parse(Some(&h), size);
    }

    #[test]
    fn query_params_never_panic(q in ".{0,60}") {
        let _ = router::query_param(Some(&q), "ns");
    }
}
