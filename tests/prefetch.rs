//! Manifest-driven prefetch against a real `docker-registry` (behind a counting tap) and the
//! fault upstream: what is prefetched and what is not, the budget, the per-image limit, the
//! switch, and that a failing prefetch never fails a client.

mod common;

use std::time::Duration;

use common::berth::Berth;
use common::content::{pseudo_random, sha256_digest, OCI_INDEX, OCI_MANIFEST};
use common::fault::{Fault, FaultUpstream};
use common::{push_oci_image, push_oci_index, Registry, Tap, TestImage};
use reqwest::{Client, Method, StatusCode};

/// Waits (at most 30 s) until no prefetch runs.
async fn prefetch_settled(berth: &Berth) {
    tokio::time::timeout(Duration::from_secs(30), berth.app().prefetch_settled())
        .await
        .expect("prefetch settles within 30 s");
}

async fn blobs(berth: &Berth, result: &str) -> f64 {
    berth
        .metric(&format!(
            "berth_prefetch_blobs_total{{result=\"{result}\"}}"
        ))
        .await
}

async fn bytes(berth: &Berth, outcome: &str) -> f64 {
    berth
        .metric(&format!(
            "berth_prefetch_bytes_total{{outcome=\"{outcome}\"}}"
        ))
        .await
}

async fn get_manifest(berth: &Berth, repo: &str, reference: &str, accept: &str) -> StatusCode {
    let resp = Client::new()
        .get(format!("{}/v2/{repo}/manifests/{reference}", berth.url()))
        .header("accept", accept)
        .send()
        .await
        .expect("manifest answer");
    let status = resp.status();
    resp.bytes().await.expect("manifest body");
    status
}

/// GETs every blob of `img` through berth and checks the bytes.
async fn get_blobs(berth: &Berth, img: &TestImage) {
    for (digest, want) in img.blobs() {
        let (status, body) = get_blob(berth, &img.repo, digest).await;
        assert_eq!(status, StatusCode::OK, "{digest}");
        assert_eq!(body.len(), want.len(), "{digest}");
        assert_eq!(sha256_digest(&body), digest);
    }
}

fn blob_gets(tap: &Tap, digest: &str) -> usize {
    let suffix = format!("/blobs/{digest}");
    tap.count(|m, p| m == Method::GET && p.ends_with(&suffix))
}

fn all_blob_gets(tap: &Tap) -> usize {
    tap.count(|m, p| m == Method::GET && p.contains("/blobs/"))
}

fn blob_bytes(img: &TestImage) -> f64 {
    img.blobs().iter().map(|(_, b)| b.len() as f64).sum()
}

#[tokio::test]
async fn a_manifest_get_prefetches_its_blobs_once_and_clients_use_them() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url()).start().await;
    let img = push_oci_image(
        &registry.url(),
        "pf/app",
        "v1",
        &[300_000, 200_000, 100_000, 50_000],
        1,
    )
    .await;

    assert_eq!(
        get_manifest(&berth, "pf/app", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    // Config and four layers: each fetched once, by prefetch, and stored.
    assert_eq!(blobs(&berth, "started").await, 5.0);
    assert_eq!(blobs(&berth, "filled").await, 5.0);
    assert_eq!(bytes(&berth, "fetched").await, blob_bytes(&img));
    for (d, _) in img.blobs() {
        assert_eq!(blob_gets(&tap, d), 1, "{d}");
    }

    // The client's pull is served from the cache alone.
    tap.set_down(true);
    get_blobs(&berth, &img).await;
    assert_eq!(all_blob_gets(&tap), 5);
    assert_eq!(bytes(&berth, "used").await, blob_bytes(&img));
    assert_eq!(bytes(&berth, "wasted").await, 0.0);

    // A manifest answered from the cache prefetches nothing (there is nothing to fetch, and
    // the hot path stays a lookup).
    tap.set_down(false);
    assert_eq!(
        get_manifest(&berth, "pf/app", &img.manifest_digest, OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    assert_eq!(blobs(&berth, "started").await, 5.0);
    assert_eq!(all_blob_gets(&tap), 5);
}

#[tokio::test]
async fn a_head_or_an_index_alone_prefetches_nothing_the_get_that_follows_does() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url()).start().await;
    let img = push_oci_image(&registry.url(), "pf/head", "v1", &[40_000, 30_000], 2).await;
    let index = push_oci_index(
        &registry.url(),
        "pf/multi",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        3,
    )
    .await;

    // A HEAD only checks whether something changed: the client may hold the layers already.
    let head = Client::new()
        .head(format!("{}/v2/pf/head/manifests/v1", berth.url()))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    // An index names platforms; which one the client wants is not known yet.
    assert_eq!(
        get_manifest(&berth, "pf/multi", "v1", OCI_INDEX).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    assert_eq!(blobs(&berth, "started").await, 0.0);
    assert_eq!(all_blob_gets(&tap), 0);

    // The platform manifest the client then asks for is prefetched, and only that one.
    let arm = index.image_for("linux", "arm64").expect("arm64 image");
    assert_eq!(
        get_manifest(&berth, "pf/multi", &arm.manifest_digest, OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    assert_eq!(blobs(&berth, "filled").await, arm.blobs().len() as f64);
    for (d, _) in arm.blobs() {
        assert_eq!(blob_gets(&tap, d), 1, "{d}");
    }
    let amd = index.image_for("linux", "amd64").expect("amd64 image");
    for (d, _) in amd.blobs() {
        if !arm.blobs().iter().any(|(a, _)| *a == d) {
            assert_eq!(blob_gets(&tap, d), 0, "other platform's {d}");
        }
    }

    // containerd resolves a tag with a HEAD (which fetched the manifest), then GETs its
    // digest from the cache: that GET asks for the image, and prefetches it.
    assert_eq!(
        get_manifest(&berth, "pf/head", &img.manifest_digest, OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    for (d, _) in img.blobs() {
        assert_eq!(
            blob_gets(&tap, d),
            1,
            "pf/head's {d} prefetched after HEAD + GET"
        );
    }
    // Once: a second GET of the digest is a plain cache hit.
    let started = blobs(&berth, "started").await;
    assert_eq!(
        get_manifest(&berth, "pf/head", &img.manifest_digest, OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    assert_eq!(blobs(&berth, "started").await, started);
}

#[tokio::test]
async fn prefetch_is_off_with_the_switch() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url())
        .extra("[prefetch]\nenabled = false\n")
        .start()
        .await;
    let img = push_oci_image(&registry.url(), "pf/off", "v1", &[50_000, 60_000], 4).await;
    assert_eq!(
        get_manifest(&berth, "pf/off", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    berth.settle().await;
    assert_eq!(all_blob_gets(&tap), 0);
    assert_eq!(blobs(&berth, "started").await, 0.0);
    // The client's own requests fill as always.
    get_blobs(&berth, &img).await;
    assert_eq!(all_blob_gets(&tap), img.blobs().len());
    assert_eq!(bytes(&berth, "used").await, 0.0);
}

#[tokio::test]
async fn an_image_beyond_the_budget_share_is_not_prefetched_and_pinned_content_stays() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url())
        .disk_bytes("2MiB")
        .start()
        .await;
    // ~800 KB pulled and pinned: a quarter of the remaining ~1.2 MB is ~300 KB.
    let pinned = push_oci_image(&registry.url(), "pf/pinned", "v1", &[400_000, 400_000], 5).await;
    let big = push_oci_image(&registry.url(), "pf/big", "v1", &[200_000, 200_000], 6).await;
    let small = push_oci_image(&registry.url(), "pf/small", "v1", &[100_000], 7).await;

    assert_eq!(
        get_manifest(&berth, "pf/pinned", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    get_blobs(&berth, &pinned).await;
    berth.settle().await;
    berth
        .app()
        .cache()
        .pin_image(berth::cache::PinnedImage {
            reference: "pf/pinned:v1".into(),
            upstream: "origin".into(),
            repository: "pf/pinned".into(),
            tag: Some("v1".into()),
            manifest: pinned.manifest_digest.clone(),
            manifests: vec![pinned.manifest_digest.clone()],
            blobs: pinned.blobs().iter().map(|(d, _)| d.to_string()).collect(),
        })
        .expect("pinned image fits");
    let before = all_blob_gets(&tap);
    // (pf/pinned itself, ~800 KB, was over a quarter of 2 MiB: its client filled it.)
    let skipped = blobs(&berth, "over_budget").await;
    assert_eq!(skipped, 3.0);

    assert_eq!(
        get_manifest(&berth, "pf/big", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    assert_eq!(blobs(&berth, "over_budget").await, skipped + 3.0);
    assert_eq!(all_blob_gets(&tap), before, "nothing of pf/big prefetched");

    assert_eq!(
        get_manifest(&berth, "pf/small", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    prefetch_settled(&berth).await;
    for (d, _) in small.blobs() {
        assert_eq!(blob_gets(&tap, d), 1, "pf/small's {d} prefetched");
    }

    // The pinned image is whole (served with the origin down), and the big one still pulls
    // through the client's own requests.
    tap.set_down(true);
    get_blobs(&berth, &pinned).await;
    tap.set_down(false);
    get_blobs(&berth, &big).await;
    let usage = berth.app().cache().index().usage();
    assert!(usage.peak <= 2 << 20, "budget held: {usage:?}");
}

/// An OCI image manifest over the fault upstream's blobs `parts` (config first).
fn fault_image(fault: &FaultUpstream, repo: &str, tag: &str, parts: &[Vec<u8>]) -> Vec<String> {
    let digests: Vec<String> = parts.iter().map(|b| fault.add_blob(b.clone())).collect();
    let desc = |i: usize, media: &str| serde_json::json!({"mediaType": media, "digest": digests[i], "size": parts[i].len()});
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(0, "application/vnd.oci.image.config.v1+json"),
        "layers": (1..parts.len())
            .map(|i| desc(i, "application/vnd.oci.image.layer.v1.tar"))
            .collect::<Vec<_>>(),
    });
    fault.add_manifest(
        repo,
        tag,
        OCI_MANIFEST,
        serde_json::to_vec(&manifest).unwrap(),
    );
    digests
}

fn fault_berth(fault: &FaultUpstream, first_byte_timeout: &str) -> String {
    format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{}\"\ndefault = true\nauth = \"public\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"{first_byte_timeout}\"\nidle_timeout = \"10s\"\n",
        fault.url()
    )
}

async fn get_blob(berth: &Berth, repo: &str, digest: &str) -> (StatusCode, Vec<u8>) {
    let resp = Client::new()
        .get(format!("{}/v2/{repo}/blobs/{digest}", berth.url()))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("blob answer");
    let status = resp.status();
    (status, resp.bytes().await.expect("whole body").to_vec())
}

/// Polls `cond` every 10 ms for at most 30 s.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_failing_prefetch_never_fails_a_client() {
    let fault = FaultUpstream::start().await;
    let parts = vec![
        pseudo_random(10, 2_000),
        pseudo_random(11, 150_000),
        pseudo_random(12, 120_000),
        pseudo_random(13, 90_000),
    ];
    let d = fault_image(&fault, "pf/faulty", "v1", &parts);
    // Layer 1: the origin says nothing for an hour (only berth's 1 s timeout ends it);
    // layer 2: the origin fails.
    fault.set_blob_fault(&d[1], Fault::Stall(Duration::from_secs(3600)));
    fault.set_blob_fault(&d[2], Fault::Status(500));
    let berth = Berth::with_upstreams(&fault_berth(&fault, "1s"))
        .start()
        .await;

    assert_eq!(
        get_manifest(&berth, "pf/faulty", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    until("prefetch asked for layers 1 and 2", || {
        fault.blob_gets(&d[1]) == 1 && fault.blob_gets(&d[2]) == 1
    })
    .await;
    // From now on the origin serves everything; the stalled prefetch of layer 1 is still
    // running, and this client joins it.
    fault.clear_faults();
    let (status, body) = get_blob(&berth, "pf/faulty", &d[1]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, parts[1], "layer 1 whole and right");
    assert_eq!(blobs(&berth, "client_retried").await, 1.0);
    // Layer 2's prefetch failed before any client asked: the client's own fill serves it.
    for i in [0, 2, 3] {
        let (status, body) = get_blob(&berth, "pf/faulty", &d[i]).await;
        assert_eq!(status, StatusCode::OK, "part {i}");
        assert_eq!(body, parts[i], "part {i}");
    }
    prefetch_settled(&berth).await;
    assert!(blobs(&berth, "failed").await >= 2.0);
    // Nothing the failed prefetches touched was stored wrong: all four come from disk now.
    berth.settle().await;
    for (i, digest) in d.iter().enumerate() {
        let resp = Client::new()
            .get(format!("{}/v2/pf/faulty/blobs/{digest}", berth.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-berth-cache"], "hit", "part {i}");
        assert_eq!(resp.bytes().await.unwrap().as_ref(), parts[i].as_slice());
    }
}

#[tokio::test]
async fn one_image_prefetches_at_most_per_image_blobs_at_once() {
    let fault = FaultUpstream::start().await;
    let parts: Vec<Vec<u8>> = (0..5).map(|i| pseudo_random(20 + i, 40_000)).collect();
    let d = fault_image(&fault, "pf/limited", "v1", &parts);
    for digest in &d {
        fault.set_blob_fault(digest, Fault::Hold(1_000));
    }
    let berth = Berth::with_upstreams(&fault_berth(&fault, "10s"))
        .extra("[prefetch]\nper_image = 2\n")
        .start()
        .await;
    assert_eq!(
        get_manifest(&berth, "pf/limited", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    fault.wait_held(2).await;
    // A full round trip through berth after two fills are held: a third start would have
    // happened by now if the limit did not hold it back.
    assert_eq!(
        get_manifest(&berth, "pf/limited", "v1", OCI_MANIFEST).await,
        StatusCode::OK
    );
    let started: usize = d.iter().map(|x| fault.blob_gets(x)).sum();
    assert_eq!(started, 2, "two fills at a time");
    assert_eq!(blobs(&berth, "started").await, 2.0);
    fault.release();
    prefetch_settled(&berth).await;
    assert_eq!(blobs(&berth, "filled").await, 5.0);
    for (i, digest) in d.iter().enumerate() {
        assert_eq!(fault.blob_gets(digest), 1, "part {i} fetched once");
    }
}
