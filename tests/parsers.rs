//! Property tests: the parsers that see client and origin input never panic, accept exactly
//! the spec's grammar, and what they accept round-trips (no path traversal can get through).
//!
//! Random strings almost never form a valid digest or `/v2/<name>/manifests|blobs/...` path, so
//! the generators build valid inputs on purpose and near-valid ones by breaking exactly one
//! part; each property then asserts how many cases reached the accepting branch and how many
//! the refusing one, so a generator that drifts into producing only noise fails the test.

use berth::oci::{Digest, Reference, RepoName};
use berth::proxy::range::{self, RangeRequest};
use berth::router::{self, Route};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CASES: u32 = 3000;

/// A generated input and whether the spec's grammar accepts it.
#[derive(Debug, Clone)]
struct Case {
    text: String,
    valid: bool,
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

/// One name component of the spec: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, sometimes one of the
/// words the router splits paths on.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,2}",
        1 => prop_oneof![
            Just("manifests"),
            Just("blobs"),
            Just("uploads"),
            Just("tags"),
            Just("list"),
            Just("referrers"),
            Just("v2"),
        ]
        .prop_map(str::to_owned),
    ]
}

fn valid_name() -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 1..5).prop_map(|c| c.join("/"))
}

/// A valid name with one component replaced by something the grammar refuses.
fn broken_name() -> impl Strategy<Value = String> {
    let bad = prop_oneof![
        Just(".."),
        Just("."),
        Just(""),
        Just("%2e%2e"),
        Just("Upper"),
        Just("a..b"),
        Just("-a"),
        Just("a-"),
        Just("a_-b"),
        Just("a___b"),
        Just("a b"),
        Just("a:b"),
    ];
    (valid_name(), bad, any::<prop::sample::Index>()).prop_map(|(name, bad, at)| {
        let mut parts: Vec<&str> = name.split('/').collect();
        let i = at.index(parts.len());
        parts[i] = bad;
        parts.join("/")
    })
}

fn name() -> impl Strategy<Value = Case> {
    prop_oneof![
        3 => valid_name().prop_map(|text| Case { text, valid: true }),
        2 => broken_name().prop_map(|text| Case { text, valid: false }),
    ]
}

fn digest() -> impl Strategy<Value = Case> {
    let valid = prop_oneof![
        3 => "sha256:[0-9a-f]{64}",
        1 => "sha512:[0-9a-f]{128}",
    ]
    .prop_map(|text| Case { text, valid: true });
    let broken = prop_oneof![
        "sha256:[0-9a-f]{63}",
        "sha256:[0-9a-f]{65}",
        "sha256:[0-9a-f]{10}[A-F][0-9a-f]{53}",
        "sha512:[0-9a-f]{64}",
        "md5:[0-9a-f]{32}",
        "sha256:[0-9a-f]{60}[g-z./]{4}",
        "sha256;[0-9a-f]{64}",
        ":[0-9a-f]{64}",
    ]
    .prop_map(|text| Case { text, valid: false });
    prop_oneof![3 => valid, 2 => broken]
}

fn tag() -> impl Strategy<Value = Case> {
    let valid = "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}|[a-zA-Z0-9_][a-zA-Z0-9._-]{127}"
        .prop_map(|text| Case { text, valid: true });
    let broken = prop_oneof![
        "[.-][a-zA-Z0-9._-]{0,10}",
        "[a-zA-Z0-9_][a-zA-Z0-9._-]{128}",
        "[a-z]{1,5}[!@ +][a-z]{1,5}",
    ]
    .prop_map(|text| Case { text, valid: false });
    prop_oneof![3 => valid, 2 => broken]
}

/// Tallies which branch each case reached; [`Tally::check`] insists both were exercised.
#[derive(Default)]
struct Tally {
    accepted: u32,
    refused: u32,
}

impl Tally {
    fn count(&mut self, accepted: bool) {
        if accepted {
            self.accepted += 1;
        } else {
            self.refused += 1;
        }
    }

    /// Both branches reached by at least a quarter of the cases.
    fn check(&self, what: &str) {
        let floor = CASES / 4;
        assert!(
            self.accepted >= floor && self.refused >= floor,
            "{what}: {} accepted, {} refused of {CASES}: the generator no longer reaches both",
            self.accepted,
            self.refused
        );
    }
}

#[test]
fn the_router_accepts_exactly_valid_pull_paths() {
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Manifest,
        Blob,
        Tags,
        Referrers,
    }
    let kind = prop_oneof![
        Just(Kind::Manifest),
        Just(Kind::Blob),
        Just(Kind::Tags),
        Just(Kind::Referrers)
    ];
    let reference = prop_oneof![tag(), digest()];
    let strategy = (name(), kind, reference, digest());
    let tally = std::cell::RefCell::new(Tally::default());
    runner()
        .run(&strategy, |(name, kind, reference, digest)| {
            let (path, valid) = match kind {
                Kind::Manifest => (
                    format!("/v2/{}/manifests/{}", name.text, reference.text),
                    name.valid && reference.valid,
                ),
                Kind::Blob => (
                    format!("/v2/{}/blobs/{}", name.text, digest.text),
                    name.valid && digest.valid,
                ),
                Kind::Tags => (format!("/v2/{}/tags/list", name.text), name.valid),
                Kind::Referrers => (
                    format!("/v2/{}/referrers/{}", name.text, digest.text),
                    name.valid && digest.valid,
                ),
            };
            let parsed = router::parse(&path);
            tally.borrow_mut().count(parsed.is_ok());
            match (parsed, valid) {
                (Ok(route), true) => {
                    // The route names exactly what was asked for.
                    let got_name = match &route {
                        Route::Manifest { name, .. }
                        | Route::Blob { name, .. }
                        | Route::Tags { name }
                        | Route::Referrers { name, .. } => name.as_str().to_owned(),
                        other => return Err(TestCaseError::fail(format!("{path}: {other:?}"))),
                    };
                    prop_assert_eq!(got_name, name.text.clone(), "{}", path);
                    match (&route, kind) {
                        (Route::Manifest { reference: r, .. }, Kind::Manifest) => {
                            prop_assert_eq!(r.to_string(), reference.text.clone())
                        }
                        (Route::Blob { digest: d, .. }, Kind::Blob)
                        | (Route::Referrers { digest: d, .. }, Kind::Referrers) => {
                            prop_assert_eq!(d.to_string(), digest.text.clone())
                        }
                        (Route::Tags { .. }, Kind::Tags) => {}
                        (r, k) => {
                            return Err(TestCaseError::fail(format!("{path}: {r:?} for {k:?}")))
                        }
                    }
                }
                (Err(e), false) => {
                    // Refused with a client error, never a server error.
                    let status = e.status();
                    prop_assert!(status.is_client_error(), "{}: {:?}", path, status);
                }
                (Ok(route), false) => {
                    return Err(TestCaseError::fail(format!(
                        "{path} is not valid but routed to {route:?}"
                    )))
                }
                (Err(e), true) => {
                    return Err(TestCaseError::fail(format!(
                        "{path} is valid but refused: {e}"
                    )))
                }
            }
            Ok(())
        })
        .unwrap();
    tally.into_inner().check("router");
}

#[test]
fn digests_parse_exactly_the_grammar_and_round_trip() {
    let tally = std::cell::RefCell::new(Tally::default());
    runner()
        .run(&digest(), |case| {
            let parsed = case.text.parse::<Digest>();
            tally.borrow_mut().count(parsed.is_ok());
            prop_assert_eq!(parsed.is_ok(), case.valid, "{}", case.text);
            if let Ok(d) = parsed {
                prop_assert_eq!(d.to_string(), case.text.clone());
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
            }
            Ok(())
        })
        .unwrap();
    tally.into_inner().check("digests");
}

#[test]
fn names_and_references_parse_exactly_the_grammar() {
    let names = std::cell::RefCell::new(Tally::default());
    let references = std::cell::RefCell::new(Tally::default());
    runner()
        .run(&(name(), prop_oneof![tag(), digest()]), |(n, r)| {
            let parsed = n.text.parse::<RepoName>();
            names.borrow_mut().count(parsed.is_ok());
            prop_assert_eq!(parsed.is_ok(), n.valid, "{}", n.text);
            if let Ok(p) = parsed {
                prop_assert_eq!(p.as_str(), n.text.as_str());
                prop_assert!(!p.as_str().split('/').any(|c| c == ".." || c == "."));
            }
            let parsed = r.text.parse::<Reference>();
            references.borrow_mut().count(parsed.is_ok());
            prop_assert_eq!(parsed.is_ok(), r.valid, "{}", r.text);
            if let Ok(x) = parsed {
                prop_assert_eq!(x.to_string(), r.text.clone());
            }
            Ok(())
        })
        .unwrap();
    names.into_inner().check("names");
    references.into_inner().check("references");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_paths_never_panic_and_yield_only_safe_names(path in "(/v2/)?[a-zA-Z0-9._%:/-]{0,80}") {
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

/// Ranges: small objects and the header forms clients send, so that every branch (partial,
/// suffix, open-ended, unsatisfiable, ignored) is reached.
#[test]
fn ranges_reach_every_branch_and_stay_inside() {
    let header = prop_oneof![
        (0u64..200, 0u64..200).prop_map(|(a, b)| format!("bytes={a}-{b}")),
        (0u64..200).prop_map(|a| format!("bytes={a}-")),
        (0u64..200).prop_map(|n| format!("bytes=-{n}")),
        Just("bytes=1-2,4-5".to_owned()),
        Just("items=0-1".to_owned()),
    ];
    let seen = std::cell::RefCell::new([0u32; 3]);
    runner()
        .run(&(header, 0u64..150), |(h, size)| {
            match range::parse(Some(&h), size) {
                RangeRequest::Partial { start, end } => {
                    seen.borrow_mut()[0] += 1;
                    prop_assert!(start < end && end <= size, "{} of {}", h, size);
                }
                RangeRequest::Full => seen.borrow_mut()[1] += 1,
                RangeRequest::Unsatisfiable => seen.borrow_mut()[2] += 1,
            }
            Ok(())
        })
        .unwrap();
    let [partial, full, unsatisfiable] = seen.into_inner();
    assert!(
        partial >= CASES / 5 && full >= CASES / 20 && unsatisfiable >= CASES / 20,
        "partial {partial}, full {full}, unsatisfiable {unsatisfiable}"
    );
}
