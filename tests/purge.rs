//! Purge: an image, a tag mapping or a blob dropped from the cache, through the admin listener
//! of a running berth and with `berth purge` on a stopped cache; pinned content only with
//! force. What is dropped is fetched again from the origin; nothing else is touched.

mod common;

use common::airgap::{args, berth as berth_cmd, blob_file, manifest_file, write_config};
use common::berth::Berth;
use common::{pull_and_verify, push_oci_image, Registry, Tap};
use reqwest::{Client, Method, StatusCode};

async fn purge(berth: &Berth, query: &str) -> (StatusCode, String) {
    let r = Client::new()
        .post(format!("http://{}/purge?{query}", berth.admin_addr))
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

fn gets(tap: &Tap, what: &str) -> usize {
    tap.count(|m, p| m == Method::GET && p.contains(what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_berth_purges_images_tags_and_blobs_on_request() {
    let registry = Registry::start().await;
    let a = push_oci_image(&registry.url(), "purge/a", "v1", &[30_000, 40_000], 71).await;
    let b = push_oci_image(&registry.url(), "purge/b", "v1", &[50_000], 72).await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url()).start().await;
    let cache = berth.cache_dir().to_owned();
    pull_and_verify(&berth.url(), &a).await;
    pull_and_verify(&berth.url(), &b).await;
    berth.settle().await;
    let host = tap.addr().to_string();

    // The image by its tag: the mapping, the manifest and its blobs; b untouched.
    let (status, body) = purge(&berth, &format!("target={host}/purge/a:v1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["manifests"], 1, "{report}");
    assert_eq!(report["blobs"], 3, "{report}");
    assert!(report["tags"].as_u64().unwrap() >= 1, "{report}");
    for (d, _) in a.blobs() {
        assert!(!blob_file(&cache, d).exists(), "{d} dropped");
    }
    assert!(!manifest_file(&cache, &a.manifest_digest).exists());
    for (d, _) in b.blobs() {
        assert!(blob_file(&cache, d).is_file(), "{d} of another image kept");
    }
    assert_eq!(berth.metric("berth_purged_total{kind=\"blob\"}").await, 3.0);
    // Pulled again: everything from the origin once more.
    tap.clear();
    pull_and_verify(&berth.url(), &a).await;
    assert_eq!(gets(&tap, "/purge/a/manifests/"), 1);
    assert_eq!(gets(&tap, "/purge/a/blobs/"), 3);

    // One blob by digest.
    berth.settle().await;
    let (layer, _) = b.layers[0].clone();
    let (status, body) = purge(&berth, &format!("target={layer}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"blobs\":1"), "{body}");
    assert!(!blob_file(&cache, &layer).exists());
    assert!(manifest_file(&cache, &b.manifest_digest).is_file());

    // The tag mapping alone: the next pull by tag asks the origin for the manifest, and finds
    // the blobs (but the purged one) still cached.
    let (status, body) = purge(&berth, &format!("target={host}/purge/b:v1&tag_only=true")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("\"manifests\":0"), "{body}");
    tap.clear();
    pull_and_verify(&berth.url(), &b).await;
    assert_eq!(gets(&tap, "/purge/b/manifests/v1"), 1);
    assert_eq!(gets(&tap, &format!("/blobs/{}", b.config_digest)), 0);
    assert_eq!(gets(&tap, &format!("/blobs/{layer}")), 1);

    // Clients' mistakes and absent targets.
    let gone = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        purge(&berth, &format!("target={gone}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        purge(&berth, "target=Not%20An%20Image").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(purge(&berth, "").await.0, StatusCode::BAD_REQUEST);
    let get = Client::new()
        .get(format!("http://{}/purge?target={gone}", berth.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    berth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_purge_refuses_pinned_images_unless_forced() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "purge/pinned", "1.0", &[20_000], 73).await;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "1GiB",
        &registry.url(),
        &registry.host(),
    );
    let c = config.display().to_string();
    let reference = format!("{}/purge/pinned:1.0", registry.host());
    berth_cmd(&args(&["warm", "--config", &c, "--pin", &reference]))
        .await
        .expect_ok();
    for (d, _) in img.blobs() {
        assert!(blob_file(&cache, d).is_file());
    }

    let refused = berth_cmd(&args(&["purge", "--config", &c, &reference])).await;
    assert!(!refused.ok(), "{}", refused.transcript());
    assert!(
        refused.stderr.contains("is pinned") && refused.stderr.contains("--force"),
        "{}",
        refused.transcript()
    );
    for (d, _) in img.blobs() {
        assert!(blob_file(&cache, d).is_file(), "nothing dropped");
    }

    let forced = berth_cmd(&args(&["purge", "--config", &c, "--force", &reference])).await;
    assert!(forced.ok(), "{}", forced.transcript());
    assert!(
        forced.stdout.contains("unpinned"),
        "{}",
        forced.transcript()
    );
    for (d, _) in img.blobs() {
        assert!(!blob_file(&cache, d).exists(), "{d} dropped");
    }
    let pins = std::fs::read_to_string(cache.join("pins.json")).unwrap_or_default();
    assert!(!pins.contains("purge/pinned"), "{pins}");
    // Not cached any more: purging again says so.
    let again = berth_cmd(&args(&["purge", "--config", &c, &img.manifest_digest])).await;
    assert!(!again.ok());
    assert!(
        again.stderr.contains("not in the cache"),
        "{}",
        again.transcript()
    );
}
