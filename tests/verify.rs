//! Corruption at rest: stored objects are flipped and truncated behind berth's back. The serving
//! path refuses a blob whose size differs from what the index recorded (and fetches it again),
//! and the scrub — `berth verify` on a stopped cache, `POST /verify` on a running one — finds
//! and removes every object that does not match its digest. No wrong bytes are ever served as
//! a complete body.

mod common;

use std::path::Path;

use common::airgap::{berth as berth_cmd, blob_file, manifest_file, write_config};
use common::berth::Berth;
use common::content::sha256_digest;
use common::{pull_and_verify, push_oci_image, Registry, Tap, TestImage};
use reqwest::{Client, Method, StatusCode};

const MIB: usize = 1 << 20;

fn blob_gets(tap: &Tap, digest: &str) -> usize {
    tap.count(|m, p| m == Method::GET && p.ends_with(&format!("/blobs/{digest}")))
}

/// Flips one byte of `path` in place (same size: only the digest can tell).
fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = at.min(bytes.len() - 1);
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

/// Cuts `path` to half its size.
fn truncate(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len / 2).unwrap();
}

/// Waits until every blob of `img` is committed in `cache`.
async fn committed(cache: &Path, img: &TestImage) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while img
        .blobs()
        .iter()
        .any(|(d, _)| !blob_file(cache, d).is_file())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "fills never committed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_verify_removes_flipped_and_truncated_objects_of_a_stopped_cache() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "rest/app", "v1", &[3 * MIB, 200_000], 41).await;
    let tap = Tap::start(registry.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = write_config(
        &dir.path().join("berth.toml"),
        &cache,
        "1GiB",
        &tap.url(),
        &registry.host(),
    );
    let config = config.to_string_lossy().into_owned();

    let online = Berth::in_front_of(&tap.url())
        .cache_dir(&cache)
        .start()
        .await;
    pull_and_verify(&online.url(), &img).await;
    committed(&cache, &img).await;
    online.stop().await;

    // A clean cache verifies clean.
    let clean = berth_cmd(&common::airgap::args(&["verify", "--config", &config])).await;
    assert!(clean.ok(), "{}", clean.transcript());
    assert!(
        clean.stdout.contains("verified 4 object(s)"),
        "{}",
        clean.transcript()
    );
    assert!(clean.stdout.contains("0 corrupt"), "{}", clean.transcript());

    let (big, _) = img.layers[0].clone();
    let (small, _) = img.layers[1].clone();
    flip(&blob_file(&cache, &big), 2 * MIB);
    truncate(&blob_file(&cache, &small));
    flip(&manifest_file(&cache, &img.manifest_digest), 10_000);

    let run = berth_cmd(&common::airgap::args(&[
        "verify", "--config", &config, "--json",
    ]))
    .await;
    assert!(!run.ok(), "corrupt objects found means a non-zero exit");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["checked"], 4, "{report}");
    let found: Vec<(String, String)> = report["corrupt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_owned(),
                f["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("blob".to_owned(), big.clone()),
        ("blob".to_owned(), small.clone()),
        ("manifest".to_owned(), img.manifest_digest.clone()),
    ] {
        assert!(found.contains(&want), "{want:?} not reported: {report}");
    }
    assert_eq!(found.len(), 3, "{report}");
    assert!(!blob_file(&cache, &big).exists() && !blob_file(&cache, &small).exists());
    assert!(!manifest_file(&cache, &img.manifest_digest).exists());
    assert!(
        blob_file(&cache, &img.config_digest).is_file(),
        "the good one stays"
    );

    // Again: nothing left to find.
    let again = berth_cmd(&common::airgap::args(&["verify", "--config", &config])).await;
    assert!(again.ok(), "{}", again.transcript());
    assert!(
        again.stdout.contains("verified 1 object(s)"),
        "{}",
        again.transcript()
    );

    // Served again: the removed objects come from the origin, the good one from disk.
    tap.clear();
    let online = Berth::in_front_of(&tap.url())
        .cache_dir(&cache)
        .start()
        .await;
    pull_and_verify(&online.url(), &img).await;
    assert_eq!(blob_gets(&tap, &big), 1);
    assert_eq!(blob_gets(&tap, &small), 1);
    assert_eq!(blob_gets(&tap, &img.config_digest), 0);
    online.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_berth_refuses_a_resized_blob_and_scrubs_on_request() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "rest/run", "v1", &[2 * MIB, 300_000], 42).await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url())
        .memory_max_object("0")
        .start()
        .await;
    let cache = berth.cache_dir().to_owned();
    pull_and_verify(&berth.url(), &img).await;
    committed(&cache, &img).await;

    // Truncated at rest: the serving path sees the size differ from the index and never
    // serves it; the client gets the whole blob, fetched again.
    let (big, big_bytes) = img.layers[0].clone();
    truncate(&blob_file(&cache, &big));
    let url = format!("{}/v2/{}/blobs/{big}", berth.url(), img.repo);
    let head = Client::new().head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        big_bytes.len().to_string().as_str(),
        "HEAD never reports the truncated size"
    );
    let body = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256_digest(&body), big);
    assert_eq!(blob_gets(&tap, &big), 2, "fetched again from the origin");
    assert_eq!(
        berth
            .metric("berth_cache_corrupt_total{found_by=\"serve\"}")
            .await,
        1.0
    );

    committed(&cache, &img).await;
    let admin = format!("http://{}", berth.admin_addr);
    let client = Client::new();
    assert_eq!(
        client
            .get(format!("{admin}/verify"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        client
            .post(format!("{admin}/verify?rate=fast"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    let sampled: serde_json::Value = client
        .post(format!("{admin}/verify?sample=1&rate=1GiB"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sampled["checked"], 1, "{sampled}");
    assert_eq!(sampled["corrupt"].as_array().unwrap().len(), 0, "{sampled}");

    // Flipped at rest (same size): only a scrub can tell.
    let (small, small_bytes) = img.layers[1].clone();
    flip(&blob_file(&cache, &small), 1000);
    let report: serde_json::Value = client
        .post(format!("{admin}/verify"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let corrupt = report["corrupt"].as_array().unwrap();
    assert!(
        corrupt.iter().any(|f| f["digest"] == small.as_str()),
        "{report}"
    );
    assert!(!blob_file(&cache, &small).exists());
    assert!(
        berth
            .metric("berth_cache_corrupt_total{found_by=\"scrub\"}")
            .await
            >= 1.0
    );
    assert!(berth.metric("berth_scrub_objects_total").await >= 4.0);
    // And the next request gets good bytes from the origin.
    let body = reqwest::get(format!("{}/v2/{}/blobs/{small}", berth.url(), img.repo))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], &small_bytes[..]);
    assert_eq!(blob_gets(&tap, &small), 2);
    berth.stop().await;
}
