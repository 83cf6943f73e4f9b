//! The route parser on `/v2/...` paths: raw paths, and paths assembled from a repository name,
//! an endpoint and a last segment so that most inputs reach the name and reference parsers.
//! Whatever parses names a safe repository and renders back to a path with the same route.
#![no_main]

use arbitrary::Arbitrary;
use berth::router::{self, Route};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Endpoint {
    Manifests,
    Blobs,
    Referrers,
    TagsList,
    Uploads,
    Other(String),
}

/// `/v2/<components joined by '/'>/<endpoint>/<last>`.
#[derive(Arbitrary, Debug)]
struct Built {
    components: Vec<String>,
    endpoint: Endpoint,
    last: String,
    /// Percent-encode the last segment, as some clients do with `:`.
    encode_last: bool,
    query: Option<String>,
}

/// An input starting with `/` is a path as a client could send it (the seeds are such paths);
/// any other input is read as a [`Built`] path.
fn path_of(data: &[u8]) -> Option<(String, Option<String>)> {
    if data.first() == Some(&b'/') {
        let (path, query) = match std::str::from_utf8(data).ok()?.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (std::str::from_utf8(data).ok()?, None),
        };
        return Some((path.to_owned(), query));
    }
    let b = Built::arbitrary_take_rest(arbitrary::Unstructured::new(data)).ok()?;
    let last = if b.encode_last {
        b.last.bytes().map(|x| format!("%{x:02X}")).collect()
    } else {
        b.last
    };
    let tail = match b.endpoint {
        Endpoint::Manifests => format!("manifests/{last}"),
        Endpoint::Blobs => format!("blobs/{last}"),
        Endpoint::Referrers => format!("referrers/{last}"),
        Endpoint::TagsList => "tags/list".to_owned(),
        Endpoint::Uploads => format!("blobs/uploads/{last}"),
        Endpoint::Other(e) => format!("{e}/{last}"),
    };
    Some((format!("/v2/{}/{tail}", b.components.join("/")), b.query))
}

/// The path a client would send for `route`, if it has one.
fn render(route: &Route) -> Option<String> {
    Some(match route {
        Route::Base => "/v2/".to_owned(),
        Route::Catalog => "/v2/_catalog".to_owned(),
        Route::Upload => return None,
        Route::Manifest { name, reference } => format!("/v2/{name}/manifests/{reference}"),
        Route::Blob { name, digest } => format!("/v2/{name}/blobs/{digest}"),
        Route::Tags { name } => format!("/v2/{name}/tags/list"),
        Route::Referrers { name, digest } => format!("/v2/{name}/referrers/{digest}"),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((path, query)) = path_of(data) else {
        return;
    };
    let label = router::classify(&path);
    let _ = router::query_param(query.as_deref(), "ns");
    let _ = router::query_param(query.as_deref(), "n");
    let route = match router::parse(&path) {
        Ok(r) => r,
        Err(e) => {
            assert!(e.status().is_client_error(), "{path:?}: {e:?}");
            return;
        }
    };
    if let Route::Manifest { name, .. }
    | Route::Blob { name, .. }
    | Route::Tags { name }
    | Route::Referrers { name, .. } = &route
    {
        let n = name.as_str();
        assert!(
            !n.split('/').any(|c| c.is_empty() || c == "." || c == ".."),
            "{path:?} gave the unsafe name {n:?}"
        );
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)),
            "{path:?} gave the name {n:?}"
        );
        assert_ne!(label, "unknown", "{path:?} parsed as {route:?}");
    }
    if let Some(again) = render(&route) {
        assert_eq!(
            router::parse(&again).ok().as_ref(),
            Some(&route),
            "{path:?} → {route:?} → {again:?}"
        );
    }
});
