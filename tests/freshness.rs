//! Freshness of what can change, from the origin's own HTTP caching headers (README, "Tags and
//! listings"): listings and tag mappings live as long as the origin's `Cache-Control` /
//! `Expires` say, within `cache.tag_ttl_min ..= cache.tag_ttl_max` (`cache.tag_ttl` when it says
//! nothing), are revalidated with the validators it gave (`If-None-Match`, `If-Modified-Since`:
//! a `304` costs no download), `no-store` keeps nothing fresh, and an origin failure still serves
//! the last answer. The origin is the fault-injecting fake, whose headers and conditional answers
//! are scripted and whose every request is recorded; time passes on berth's freshness clock.

mod common;

use std::time::Duration;

use common::berth::Berth;
use common::content::{sha256_digest, test_manifest, OCI_MANIFEST};
use common::fault::{Fault, FaultUpstream, Recorded};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

const REPO: &str = "fresh/app";

async fn get(url: &str, accept: &str) -> reqwest::Response {
    tokio::time::timeout(
        Duration::from_secs(30),
        Client::new().get(url).header("accept", accept).send(),
    )
    .await
    .expect("berth answers within 30 s")
    .expect("request")
}

/// Lets `secs` pass on berth's freshness clock.
fn advance(berth: &Berth, secs: u64) {
    berth
        .app()
        .cache()
        .tags()
        .clock()
        .advance(Duration::from_secs(secs));
}

fn tags_url(berth: &Berth) -> String {
    format!("{}/v2/{REPO}/tags/list", berth.url())
}

fn manifest_url(berth: &Berth, reference: &str) -> String {
    format!("{}/v2/{REPO}/manifests/{reference}", berth.url())
}

fn listing_gets(fault: &FaultUpstream) -> Vec<Recorded> {
    fault
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::GET && r.path.contains("/tags/list"))
        .collect()
}

fn tag_heads(fault: &FaultUpstream, tag: &str) -> Vec<Recorded> {
    let suffix = format!("/manifests/{tag}");
    fault
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::HEAD && r.path.ends_with(&suffix))
        .collect()
}

async fn listed_tags(resp: reqwest::Response) -> Vec<String> {
    let v: Value = resp.json().await.expect("a tags/list answer");
    v["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

/// `Cache-Control: max-age=60` on tags/list: served from memory for 60 s although `tag_ttl` is
/// 0, then revalidated with the origin's ETag; a `304` refreshes the kept listing (no body
/// downloaded) for another 60 s; a changed listing replaces it. `tag_ttl_max` cuts a longer
/// max-age short.
#[tokio::test]
async fn a_listing_lives_for_its_max_age_and_revalidates_with_its_etag() {
    let fault = FaultUpstream::start().await;
    fault.send_etags(true);
    fault.set_headers("/tags/list", &[("cache-control", "max-age=60")]);
    let d1 = fault.add_manifest(REPO, "1", OCI_MANIFEST, test_manifest(1));
    let berth = Berth::in_front_of(&fault.url()).tag_ttl("0s").start().await;
    let url = tags_url(&berth);

    let first = get(&url, "application/json").await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-berth-cache"], "miss");
    let listing = json!({"name": REPO, "tags": ["1"]}).to_string();
    let etag = format!("\"{}\"", sha256_digest(listing.as_bytes()));
    assert_eq!(listed_tags(first).await, ["1"]);
    let asked = listing_gets(&fault);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].if_none_match, None, "nothing to revalidate yet");

    advance(&berth, 59);
    let kept = get(&url, "application/json").await;
    assert_eq!(kept.headers()["x-berth-cache"], "hit");
    assert_eq!(listed_tags(kept).await, ["1"]);
    assert_eq!(listing_gets(&fault).len(), 1, "within max-age: from memory");

    advance(&berth, 2);
    let revalidated = get(&url, "application/json").await;
    assert_eq!(revalidated.status(), StatusCode::OK);
    assert_eq!(revalidated.headers()["x-berth-cache"], "hit");
    assert_eq!(listed_tags(revalidated).await, ["1"]);
    let asked = listing_gets(&fault);
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[1].if_none_match.as_deref(), Some(etag.as_str()));
    assert_eq!(asked[1].status, Some(304), "the origin sent no body");
    assert_eq!(
        berth
            .metric("berth_revalidations_total{kind=\"listing\",result=\"unchanged\"}")
            .await,
        1.0
    );
    // The 304 renewed the lifetime.
    advance(&berth, 59);
    get(&url, "application/json").await;
    assert_eq!(listing_gets(&fault).len(), 2);

    // A new tag at the origin: the stale listing's ETag no longer matches.
    advance(&berth, 2);
    fault.set_tag(REPO, "2", &d1);
    let changed = get(&url, "application/json").await;
    assert_eq!(changed.headers()["x-berth-cache"], "miss");
    assert_eq!(listed_tags(changed).await, ["1", "2"]);
    let asked = listing_gets(&fault);
    assert_eq!(asked.len(), 3);
    assert_eq!(asked[2].if_none_match.as_deref(), Some(etag.as_str()));
    assert_eq!(asked[2].status, Some(200));
    assert_eq!(
        berth
            .metric("berth_revalidations_total{kind=\"listing\",result=\"changed\"}")
            .await,
        1.0
    );

    // A max-age beyond tag_ttl_max lasts tag_ttl_max.
    let capped = Berth::in_front_of(&fault.url())
        .cache("tag_ttl_max = \"10s\"")
        .start()
        .await;
    fault.set_headers("/tags/list", &[("cache-control", "max-age=86400")]);
    let before = listing_gets(&fault).len();
    get(&tags_url(&capped), "application/json").await;
    advance(&capped, 9);
    get(&tags_url(&capped), "application/json").await;
    assert_eq!(listing_gets(&fault).len(), before + 1);
    advance(&capped, 2);
    get(&tags_url(&capped), "application/json").await;
    assert_eq!(listing_gets(&fault).len(), before + 2, "cut to 10 s");
}

/// `no-store`: relayed, never kept (every request asks, nothing stale to fall back on);
/// `no-cache`: kept but revalidated on every request; `Last-Modified` alone revalidates with
/// `If-Modified-Since`; a kept listing is served stale when the revalidation fails.
#[tokio::test]
async fn no_store_no_cache_last_modified_and_stale_if_error() {
    let fault = FaultUpstream::start().await;
    fault.add_manifest(REPO, "1", OCI_MANIFEST, test_manifest(2));
    let berth = Berth::in_front_of(&fault.url()).start().await;
    let url = tags_url(&berth);

    fault.set_headers("/tags/list", &[("cache-control", "no-store")]);
    for _ in 0..2 {
        let r = get(&url, "application/json").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(listed_tags(r).await, ["1"]);
    }
    let asked = listing_gets(&fault);
    assert_eq!(asked.len(), 2, "never kept, although tag_ttl is 5m");
    assert_eq!(asked[1].if_none_match, None);
    fault.set_fault(Fault::Status(503));
    let down = get(&url, "application/json").await;
    assert_eq!(
        down.status(),
        StatusCode::BAD_GATEWAY,
        "nothing kept, nothing stale"
    );
    fault.clear_faults();

    // no-cache with an ETag: kept, asked every time, 304 each time.
    fault.send_etags(true);
    fault.set_headers("/tags/list", &[("cache-control", "no-cache")]);
    for expect in ["miss", "hit", "hit"] {
        let r = get(&url, "application/json").await;
        assert_eq!(r.headers()["x-berth-cache"], expect);
        assert_eq!(listed_tags(r).await, ["1"]);
    }
    // Asked: two no-store GETs, the failed one, then these three.
    let asked = listing_gets(&fault);
    assert_eq!(asked.len(), 6);
    assert!(asked[4].if_none_match.is_some() && asked[5].if_none_match.is_some());
    assert_eq!((asked[4].status, asked[5].status), (Some(304), Some(304)));

    // Last-Modified, no ETag: If-Modified-Since, answered 304.
    fault.send_etags(false);
    let modified = "Wed, 21 Oct 2015 07:28:00 GMT";
    fault.set_headers(
        "/tags/list",
        &[("cache-control", "max-age=0"), ("last-modified", modified)],
    );
    get(&url, "application/json").await;
    let r = get(&url, "application/json").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(listed_tags(r).await, ["1"]);
    let last = listing_gets(&fault).pop().unwrap();
    assert_eq!(last.if_modified_since.as_deref(), Some(modified));
    assert_eq!(last.if_none_match, None);
    assert_eq!(last.status, Some(304));

    // The origin fails the revalidation: the kept listing, counted stale.
    fault.set_fault(Fault::Status(503));
    let stale = get(&url, "application/json").await;
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(stale.headers()["x-berth-cache"], "stale");
    assert_eq!(listed_tags(stale).await, ["1"]);
    assert_eq!(
        berth
            .metric("berth_stale_served_total{kind=\"tags\"}")
            .await,
        1.0
    );
    assert_eq!(
        berth
            .metric("berth_revalidations_total{kind=\"listing\",result=\"error\"}")
            .await,
        1.0
    );
}

/// A tag's lifetime follows the origin's max-age within the bounds: shorter than `tag_ttl` (and
/// raised to `tag_ttl_min`), longer than it (cut to `tag_ttl_max`), and `tag_ttl` when the
/// origin says nothing. Each revalidation is one HEAD.
#[tokio::test]
async fn a_tag_lives_for_the_origins_max_age_within_the_bounds() {
    let fault = FaultUpstream::start().await;
    fault.add_manifest(REPO, "short", OCI_MANIFEST, test_manifest(3));
    fault.add_manifest(REPO, "long", OCI_MANIFEST, test_manifest(4));
    fault.add_manifest(REPO, "plain", OCI_MANIFEST, test_manifest(5));
    fault.set_headers("/manifests/short", &[("cache-control", "max-age=1")]);
    fault.set_headers("/manifests/long", &[("cache-control", "max-age=86400")]);
    let berth = Berth::in_front_of(&fault.url())
        .tag_ttl("1h")
        .cache("tag_ttl_min = \"5s\"\ntag_ttl_max = \"60s\"")
        .start()
        .await;
    for tag in ["short", "long", "plain"] {
        let r = get(&manifest_url(&berth, tag), OCI_MANIFEST).await;
        assert_eq!(r.status(), StatusCode::OK, "{tag}");
        assert!(
            r.headers().get("cache-control").is_none(),
            "a tag's answer is not long-lived"
        );
    }

    // max-age=1 is raised to tag_ttl_min (5 s), well under tag_ttl (1 h).
    advance(&berth, 4);
    let r = get(&manifest_url(&berth, "short"), OCI_MANIFEST).await;
    assert_eq!(r.headers()["x-berth-cache"], "hit");
    assert_eq!(tag_heads(&fault, "short").len(), 0);
    advance(&berth, 2);
    let r = get(&manifest_url(&berth, "short"), OCI_MANIFEST).await;
    assert_eq!(r.headers()["x-berth-cache"], "hit");
    assert_eq!(tag_heads(&fault, "short").len(), 1, "revalidated after 5 s");

    // max-age=86400 is cut to tag_ttl_max (60 s).
    advance(&berth, 53); // t = 59
    get(&manifest_url(&berth, "long"), OCI_MANIFEST).await;
    assert_eq!(tag_heads(&fault, "long").len(), 0);
    advance(&berth, 2); // t = 61
    get(&manifest_url(&berth, "long"), OCI_MANIFEST).await;
    assert_eq!(tag_heads(&fault, "long").len(), 1, "revalidated after 60 s");

    // No caching headers: tag_ttl (1 h), however long tag_ttl_max is.
    get(&manifest_url(&berth, "plain"), OCI_MANIFEST).await;
    assert_eq!(tag_heads(&fault, "plain").len(), 0);
    advance(&berth, 3600);
    get(&manifest_url(&berth, "plain"), OCI_MANIFEST).await;
    assert_eq!(tag_heads(&fault, "plain").len(), 1);
    assert_eq!(
        berth
            .metric("berth_revalidations_total{kind=\"tag\",result=\"unchanged\"}")
            .await,
        3.0
    );
}

/// Revalidating a tag sends the origin's ETag as `If-None-Match` on the HEAD; a `304` is
/// "unchanged" (no digest needed). A moved tag is "changed" and fetched. `no-store` keeps the
/// mapping from ever being fresh (a HEAD per request) while the manifest's bytes stay cached
/// by digest. The ETag survives a restart.
#[tokio::test]
async fn tag_revalidation_uses_the_etag_and_no_store_keeps_nothing_fresh() {
    let fault = FaultUpstream::start().await;
    fault.send_etags(true);
    let d1 = fault.add_manifest(REPO, "v", OCI_MANIFEST, test_manifest(6));
    let cache_dir = tempfile::tempdir().unwrap();
    let berth = Berth::in_front_of(&fault.url())
        .cache_dir(cache_dir.path())
        .start()
        .await;
    let url = manifest_url(&berth, "v");
    let r = get(&url, OCI_MANIFEST).await;
    assert_eq!(r.headers()["etag"], format!("\"{d1}\"").as_str());

    advance(&berth, 301); // past tag_ttl (5m)
    let r = get(&url, OCI_MANIFEST).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-berth-cache"], "hit");
    assert_eq!(r.headers()["docker-content-digest"], d1.as_str());
    let heads = tag_heads(&fault, "v");
    assert_eq!(heads.len(), 1);
    let want = format!("\"{d1}\"");
    assert_eq!(heads[0].if_none_match.as_deref(), Some(want.as_str()));
    assert_eq!(heads[0].status, Some(304));

    // The tag moves: the HEAD's ETag does not match, the new manifest is fetched.
    let d2 = fault.add_manifest(REPO, "v", OCI_MANIFEST, test_manifest(7));
    advance(&berth, 301);
    let r = get(&url, OCI_MANIFEST).await;
    assert_eq!(r.headers()["docker-content-digest"], d2.as_str());
    assert_eq!(tag_heads(&fault, "v").last().unwrap().status, Some(200));
    assert_eq!(
        berth
            .metric("berth_revalidations_total{kind=\"tag\",result=\"changed\"}")
            .await,
        1.0
    );

    // After a restart the mapping is stale, and revalidated with the ETag it was given.
    berth.stop().await;
    let berth = Berth::in_front_of(&fault.url())
        .cache_dir(cache_dir.path())
        .start()
        .await;
    let r = get(&manifest_url(&berth, "v"), OCI_MANIFEST).await;
    assert_eq!(r.headers()["docker-content-digest"], d2.as_str());
    let last = tag_heads(&fault, "v").pop().unwrap();
    let want = format!("\"{d2}\"");
    assert_eq!(last.if_none_match.as_deref(), Some(want.as_str()));
    assert_eq!(last.status, Some(304));

    // no-store: every request asks (a HEAD), the bytes come from the cache by digest.
    let d3 = fault.add_manifest(REPO, "nostore", OCI_MANIFEST, test_manifest(8));
    fault.set_headers("/manifests/nostore", &[("cache-control", "no-store")]);
    let url = manifest_url(&berth, "nostore");
    for expect in ["miss", "hit", "hit"] {
        let r = get(&url, OCI_MANIFEST).await;
        assert_eq!(r.headers()["x-berth-cache"], expect);
        assert_eq!(r.bytes().await.unwrap(), test_manifest(8));
    }
    assert_eq!(tag_heads(&fault, "nostore").len(), 2, "a HEAD per request");
    let by_digest = fault.count(|r| r.path.ends_with(&format!("/manifests/{d3}")));
    assert_eq!(by_digest, 0);
    let r = get(&manifest_url(&berth, &d3), OCI_MANIFEST).await;
    assert_eq!(r.headers()["x-berth-cache"], "hit", "the bytes are cached");
    assert_eq!(r.headers()["cache-control"], "max-age=31536000, immutable");
    let gets = fault.count(|r| r.method == Method::GET && r.path.contains("/manifests/"));
    assert_eq!(
        gets, 3,
        "one GET per manifest content, never for no-store again"
    );
}

/// berth's own conditional answers: a client holding a manifest's ETag gets `304` with no body,
/// by tag and by digest, GET and HEAD (the authorization side is in tests/auth.rs).
#[tokio::test]
async fn clients_holding_the_etag_get_304() {
    let fault = FaultUpstream::start().await;
    let d = fault.add_manifest(REPO, "c", OCI_MANIFEST, test_manifest(9));
    let berth = Berth::in_front_of(&fault.url()).start().await;
    let etag = format!("\"{d}\"");
    for reference in ["c", d.as_str()] {
        let url = manifest_url(&berth, reference);
        for method in [Method::GET, Method::HEAD] {
            let r = Client::new()
                .request(method.clone(), &url)
                .header("accept", OCI_MANIFEST)
                .header("if-none-match", &etag)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{method} {reference}");
            assert_eq!(r.headers()["etag"], etag.as_str());
            assert!(r.bytes().await.unwrap().is_empty());
        }
        let other = Client::new()
            .get(&url)
            .header("accept", OCI_MANIFEST)
            .header("if-none-match", "\"sha256:0\"")
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), StatusCode::OK);
        assert_eq!(other.bytes().await.unwrap(), test_manifest(9));
    }
}
