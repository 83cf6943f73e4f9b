//! The shared tier (docs/ARCHITECTURE.md, "Scale-out"): replicas in front of one real
//! `docker-registry` (behind a counting [`Tap`]) share a tier on object storage. A replica with
//! an empty disk serves what another uploaded without a GET at the origin; a damaged object is
//! never served, is counted and replaced from the origin; a store that is down costs nothing but
//! counted errors and comes back; the tier is never evidence that a repository holds a digest.
//!
//! The tier runs on a local directory (`file://`), on Azurite (Azure Blob) and on moto (S3),
//! each started by the harness.

mod common;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use common::berth::Berth;
use common::content::{sha256_digest, TestImage, OCI_MANIFEST};
use common::{push_oci_image, Registry, Tap};
use reqwest::{Client, Method, StatusCode};

const REPO: &str = "shared/app";
const MIB: usize = 1 << 20;

/// `fut`, or a panic naming `what` if it takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {secs}s"))
}

/// `[cache.shared]` on `url`, with the smallest multipart part so that large blobs take the
/// multipart path.
fn shared_table(url: &str, options: &[(&str, &str)]) -> String {
    let mut s = format!(
        "[cache.shared]\nurl = \"{url}\"\nprefix = \"region-a\"\npart_bytes = \"5MiB\"\ntimeout = \"2s\"\nupload_attempts = 2\n"
    );
    if !options.is_empty() {
        s.push_str("[cache.shared.options]\n");
        for (k, v) in options {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
    }
    s
}

/// A replica in front of `tap` with the shared tier `table`; blobs stay out of memory so every
/// read goes through the disk and shared tiers.
async fn replica(tap: &Tap, table: &str) -> Berth {
    Berth::in_front_of(&tap.url())
        .memory_max_object("0")
        .extra(table)
        .start()
        .await
}

async fn get(url: &str, accept: Option<&str>) -> reqwest::Response {
    let mut req = Client::new().get(url);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    within(60, url, req.send()).await.expect("request")
}

/// Pulls `img` by tag through `berth` and checks every byte.
async fn pull(berth: &Berth, img: &TestImage) {
    common::pull_and_verify(&berth.url(), img).await;
}

fn blob_gets(tap: &Tap) -> usize {
    tap.count(|m, p| m == Method::GET && p.contains("/blobs/"))
}

fn manifest_gets(tap: &Tap) -> usize {
    tap.count(|m, p| m == Method::GET && p.contains("/manifests/"))
}

/// Waits until `berth` has no upload waiting or running.
async fn uploads_settled(berth: &Berth) {
    // A fill queues its upload once it committed: fills first, then their uploads.
    within(
        60,
        "fills settle",
        berth.app().cache().fills().all_settled(),
    )
    .await;
    let shared = berth.app().scale().shared.clone().expect("shared tier");
    within(60, "uploads settle", shared.uploads_settled()).await;
}

/// Files under `dir`, relative, with their sizes.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, e.metadata().unwrap().len()));
            }
        }
    }
    out.sort();
    out
}

/// One origin, one image with a multipart-sized layer, and a shared directory.
async fn setup() -> (Registry, Tap, TestImage, tempfile::TempDir) {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), REPO, "v1", &[12 * MIB, 64 * 1024], 7).await;
    let tap = Tap::start(registry.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    (registry, tap, img, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_with_an_empty_disk_serves_what_another_uploaded_without_an_origin_get() {
    let (_registry, tap, img, dir) = setup().await;
    let table = shared_table(&format!("file://{}", dir.path().display()), &[]);
    let a = replica(&tap, &table).await;
    pull(&a, &img).await;
    uploads_settled(&a).await;
    let stored = listing(dir.path());
    for (digest, bytes) in img
        .layers
        .iter()
        .chain([&(img.config_digest.clone(), img.config_bytes.clone())])
    {
        let key = format!("region-a/blobs/sha256/{}", &digest["sha256:".len()..]);
        assert!(
            stored.contains(&(key.clone(), bytes.len() as u64)),
            "{key} uploaded whole: {stored:?}"
        );
    }
    let manifest_key = format!(
        "region-a/manifests/sha256/{}",
        &img.manifest_digest["sha256:".len()..]
    );
    assert!(stored.iter().any(|(k, _)| *k == manifest_key), "{stored:?}");
    assert!(
        a.metric("berth_shared_uploads_total{result=\"uploaded\"}")
            .await
            >= 4.0
    );
    let (blob_gets_a, manifest_gets_a) = (blob_gets(&tap), manifest_gets(&tap));
    assert_eq!(blob_gets_a, 3, "replica A fetched each blob once");

    let b = replica(&tap, &table).await;
    pull(&b, &img).await;
    assert_eq!(
        blob_gets(&tap),
        blob_gets_a,
        "no blob GET reached the origin for B"
    );
    assert_eq!(
        manifest_gets(&tap),
        manifest_gets_a,
        "no manifest GET reached the origin for B"
    );
    assert_eq!(
        b.metric("berth_shared_lookups_total{kind=\"blob\",result=\"hit\"}")
            .await,
        3.0
    );
    assert_eq!(
        b.metric("berth_shared_lookups_total{kind=\"manifest\",result=\"hit\"}")
            .await,
        1.0
    );
    let spared = b
        .metric("berth_origin_bytes_spared_total{source=\"shared\"}")
        .await;
    assert!(spared >= (12 * MIB) as f64, "spared {spared}");
    // B's fills came from the tier: nothing to upload again.
    uploads_settled(&b).await;
    assert_eq!(
        b.metric("berth_shared_uploads_total{result=\"uploaded\"}")
            .await,
        0.0
    );
    // And B now holds them on its own disk: a second pull touches neither tier.
    pull(&b, &img).await;
    assert_eq!(
        b.metric("berth_shared_lookups_total{kind=\"blob\",result=\"hit\"}")
            .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_object_is_never_served_and_is_replaced_from_the_origin() {
    let (_registry, tap, img, dir) = setup().await;
    let table = shared_table(&format!("file://{}", dir.path().display()), &[]);
    let a = replica(&tap, &table).await;
    pull(&a, &img).await;
    uploads_settled(&a).await;
    // Same length, different bytes: only the digest can tell.
    let (digest, original) = img.layers[0].clone();
    let object = dir.path().join(format!(
        "region-a/blobs/sha256/{}",
        &digest["sha256:".len()..]
    ));
    let mut damaged = original.clone();
    damaged[5 * MIB] ^= 0xff;
    std::fs::write(&object, &damaged).unwrap();

    let b = replica(&tap, &table).await;
    let url = format!("{}/v2/{REPO}/blobs/{digest}", b.url());
    let before = blob_gets(&tap);
    let first = get(&url, None).await;
    // Either refused outright or cut short: never a complete body with the damaged bytes.
    if first.status() == StatusCode::OK {
        // A body cut short before its last bytes is what a client must see; a complete one
        // must verify.
        if let Ok(body) = first.bytes().await {
            assert_eq!(sha256_digest(&body), digest, "a complete body verifies");
        }
    }
    within(30, "corrupt counted", async {
        while b.metric("berth_shared_corrupt_total").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        b.metric("berth_digest_mismatches_total{upstream=\"shared tier\"}")
            .await
            <= 1.0
    );
    // The damaged object is gone; the retry fetches from the origin and uploads good bytes.
    within(30, "damaged object deleted", async {
        while object.exists() && std::fs::read(&object).unwrap_or_default() == damaged {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let second = get(&url, None).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(sha256_digest(&second.bytes().await.unwrap()), digest);
    assert_eq!(
        blob_gets(&tap),
        before + 1,
        "the retry went to the origin once"
    );
    uploads_settled(&b).await;
    assert_eq!(
        std::fs::read(&object).unwrap(),
        original,
        "good bytes uploaded again"
    );
    // What B keeps on its disk is the good blob.
    let on_disk = common::airgap::blob_file(b.cache_dir(), &digest);
    assert_eq!(std::fs::read(on_disk).unwrap(), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_in_the_tier_are_not_evidence_for_another_repository() {
    let (registry, tap, img, dir) = setup().await;
    // The origin holds a second repository that does NOT hold the image's layers.
    let other = push_oci_image(&registry.url(), "shared/other", "v1", &[4096], 99).await;
    let table = shared_table(&format!("file://{}", dir.path().display()), &[]);
    let a = replica(&tap, &table).await;
    pull(&a, &img).await;
    uploads_settled(&a).await;

    let b = replica(&tap, &table).await;
    let (digest, _) = &img.layers[1];
    let r = get(
        &format!("{}/v2/{}/blobs/{digest}", b.url(), other.repo),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "not in that repository");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");
    // The manifest by digest under the other repository is refused alike.
    let r = get(
        &format!(
            "{}/v2/{}/manifests/{}",
            b.url(),
            other.repo,
            img.manifest_digest
        ),
        Some(OCI_MANIFEST),
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Under its own repository B serves it, asking the origin only with a HEAD.
    let before = blob_gets(&tap);
    let r = get(&format!("{}/v2/{REPO}/blobs/{digest}", b.url()), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), *digest);
    assert_eq!(blob_gets(&tap), before, "served from the tier");
    assert!(tap.count(|m, p| m == Method::HEAD && p.ends_with(digest.as_str())) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_in_the_config_file_are_refused() {
    let text = format!(
        "{}[[upstream]]\nname = \"o\"\nurl = \"http://127.0.0.1:1\"\nauth = \"public\"\n",
        shared_table(
            "s3://bucket",
            &[("aws_secret_access_key", "x"), ("region", "eu-west-1")]
        )
    );
    let err = berth::Config::from_toml(&text).unwrap_err().to_string();
    assert!(
        err.contains("cache.shared.options.aws_secret_access_key"),
        "{err}"
    );
    assert!(!err.contains("region"), "{err}");
    let bad = berth::Config::from_toml(
        "[cache.shared]\nurl = \"ftp://x\"\n[[upstream]]\nname = \"o\"\nurl = \"http://127.0.0.1:1\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("cache.shared.url"), "{bad}");
}

// ---------------------------------------------------------------------------------------------
// On real object stores: Azurite (Azure Blob) and moto (S3), started by the harness. berth runs
// as its own process here, so that the store's endpoint and credentials reach it through the
// environment, as they do in a deployment.

mod stores {
    use super::*;
    use common::airgap::{write_config, BerthProcess};
    use common::objstore::{Kind, ObjectStoreServer};

    /// A `berth serve` child process with a cache directory of its own and the shared tier on
    /// `store`.
    struct Replica {
        process: BerthProcess,
        admin: u16,
        cache: tempfile::TempDir,
    }

    impl Replica {
        async fn start(tap: &Tap, store: &ObjectStoreServer) -> Replica {
            let cache = tempfile::tempdir().unwrap();
            let config = cache.path().join("berth.toml");
            write_config(
                &config,
                &cache.path().join("cache"),
                "10GiB",
                &tap.url(),
                &tap.addr().to_string(),
            );
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(&shared_table(&store.url(), &[]));
            std::fs::write(&config, text).unwrap();
            let admin = common::free_port();
            let admin_listen = format!("admin.listen=127.0.0.1:{admin}");
            let process = BerthProcess::serve_with_env(
                &config,
                &[
                    "--set",
                    &admin_listen,
                    "--set",
                    "cache.memory_max_object_bytes=0",
                ],
                &store.env(),
            )
            .await;
            Replica {
                process,
                admin,
                cache,
            }
        }

        fn url(&self) -> String {
            self.process.url()
        }

        async fn metric(&self, name_and_labels: &str) -> f64 {
            let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin))
                .await
                .expect("metrics reachable")
                .text()
                .await
                .expect("metrics body");
            text.lines()
                .find_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    (k == name_and_labels).then(|| v.parse().ok())?
                })
                .unwrap_or(0.0)
        }

        /// Waits until `metric` reaches `at_least`, with berth's log in the panic message.
        async fn await_metric(&self, metric: &str, at_least: f64) {
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            loop {
                let v = self.metric(metric).await;
                if v >= at_least {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{metric} = {v}, expected ≥ {at_least} within 90 s; berth log:\n{}",
                    self.process.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// Waits until `uploaded` uploads succeeded and none is pending.
        async fn await_uploads(&self, uploaded: f64) {
            self.await_metric("berth_shared_uploads_total{result=\"uploaded\"}", uploaded)
                .await;
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while self.metric("berth_shared_uploads_pending").await > 0.0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "uploads never settled"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        /// Pulls `img` by tag and checks every byte.
        async fn pull(&self, img: &TestImage) {
            common::pull_and_verify(&self.url(), img).await;
        }
    }

    fn blobs_of(img: &TestImage) -> Vec<(String, Vec<u8>)> {
        let mut blobs = vec![(img.config_digest.clone(), img.config_bytes.clone())];
        blobs.extend(img.layers.iter().cloned());
        blobs
    }

    fn blob_key(digest: &str) -> String {
        format!("region-a/blobs/sha256/{}", &digest["sha256:".len()..])
    }

    /// A replica fills from the origin and uploads (the 12 MiB layer in 5 MiB parts); a second
    /// replica with an empty disk serves the image from the store without a blob GET at the
    /// origin.
    async fn replicas_share(kind: Kind) {
        let (_registry, tap, img, _dir) = setup().await;
        let store = ObjectStoreServer::start(kind).await;
        let a = Replica::start(&tap, &store).await;
        a.pull(&img).await;
        a.await_uploads(4.0).await;
        let stored = store.list().await;
        for (digest, bytes) in blobs_of(&img) {
            let key = blob_key(&digest);
            assert!(
                stored.contains(&(key.clone(), bytes.len() as u64)),
                "{key} uploaded whole: {stored:?}"
            );
            assert_eq!(store.get(&key).await.unwrap().as_ref(), &bytes[..]);
        }
        assert!(
            stored
                .iter()
                .any(|(k, _)| k.starts_with("region-a/manifests/sha256/")),
            "{stored:?}"
        );
        let origin_blob_gets = blob_gets(&tap);
        assert_eq!(origin_blob_gets, 3, "replica A fetched each blob once");

        let b = Replica::start(&tap, &store).await;
        b.pull(&img).await;
        assert_eq!(
            blob_gets(&tap),
            origin_blob_gets,
            "no blob GET at the origin for B"
        );
        assert_eq!(
            b.metric("berth_shared_lookups_total{kind=\"blob\",result=\"hit\"}")
                .await,
            3.0
        );
        assert!(
            b.metric("berth_shared_bytes_total{direction=\"read\"}")
                .await
                >= (12 * MIB) as f64
                || b.metric("berth_origin_bytes_spared_total{source=\"shared\"}")
                    .await
                    >= (12 * MIB) as f64
        );
        // B holds the blobs on its own disk once its fills commit (just after the last byte).
        for (digest, bytes) in blobs_of(&img) {
            let on_disk = common::airgap::blob_file(&b.cache.path().join("cache"), &digest);
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !on_disk.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{digest} never committed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(std::fs::read(on_disk).unwrap(), bytes);
        }
    }

    /// A flipped byte in one object and a truncated other: neither is ever served as a
    /// complete body, both are counted, and good bytes from the origin replace them.
    async fn damaged_objects_are_never_served(kind: Kind) {
        let (_registry, tap, img, _dir) = setup().await;
        let store = ObjectStoreServer::start(kind).await;
        let a = Replica::start(&tap, &store).await;
        a.pull(&img).await;
        a.await_uploads(4.0).await;
        let (layer, layer_bytes) = img.layers[0].clone();
        let mut flipped = layer_bytes.clone();
        flipped[5 * MIB + 17] ^= 0x01;
        store.put(&blob_key(&layer), flipped.clone()).await;
        let config = img.config_digest.clone();
        store
            .put(
                &blob_key(&config),
                img.config_bytes[..img.config_bytes.len() / 2].to_vec(),
            )
            .await;

        let b = Replica::start(&tap, &store).await;
        for digest in [&layer, &config] {
            let url = format!("{}/v2/{REPO}/blobs/{digest}", b.url());
            let first = get(&url, None).await;
            if first.status() == StatusCode::OK {
                // Cut short is what a client must see; a complete body must verify.
                if let Ok(body) = first.bytes().await {
                    assert_eq!(sha256_digest(&body), *digest, "a complete body verifies");
                }
            }
        }
        b.await_metric("berth_shared_corrupt_total", 2.0).await;
        let before = blob_gets(&tap);
        for (digest, bytes) in [(&layer, &layer_bytes), (&config, &img.config_bytes)] {
            let r = get(&format!("{}/v2/{REPO}/blobs/{digest}", b.url()), None).await;
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[..]);
        }
        assert!(blob_gets(&tap) <= before + 2);
        // The store holds the good bytes again (uploaded by B after its origin fills).
        for (digest, bytes) in [(&layer, &layer_bytes), (&config, &img.config_bytes)] {
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            while store.get(&blob_key(digest)).await.as_deref() != Some(&bytes[..]) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{digest} not replaced in the store"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // A third replica now fills from the repaired store.
        let c = Replica::start(&tap, &store).await;
        let gets = blob_gets(&tap);
        c.pull(&img).await;
        assert_eq!(blob_gets(&tap), gets, "served from the repaired store");
        assert_eq!(c.metric("berth_shared_corrupt_total").await, 0.0);
    }

    /// The store goes down: pulls are served from the origin (and disk) with the errors
    /// counted; when it returns, uploads succeed again and another replica reads from it.
    async fn outage_and_recovery(kind: Kind) {
        let (registry, tap, img, _dir) = setup().await;
        let mut store = ObjectStoreServer::start(kind).await;
        let a = Replica::start(&tap, &store).await;
        store.stop();
        a.pull(&img).await;
        assert_eq!(
            blob_gets(&tap),
            3,
            "served from the origin while the store is down"
        );
        // Every lookup of the pull failed against the store or, once one had failed, skipped
        // it for the back-off (which of the two each one hit depends on timing): all counted.
        let (mut failed, mut passed_over) = (0.0, 0.0);
        for kind in ["manifest", "blob"] {
            for result in ["error", "skipped"] {
                let v = a
                    .metric(&format!(
                        "berth_shared_lookups_total{{kind=\"{kind}\",result=\"{result}\"}}"
                    ))
                    .await;
                passed_over += v;
                if result == "error" {
                    failed += v;
                }
            }
        }
        assert!(failed >= 1.0, "a failed lookup is counted as an error");
        assert!(
            passed_over >= 4.0,
            "one per object of the image: {passed_over}"
        );
        a.await_metric("berth_shared_uploads_total{result=\"failed\"}", 1.0)
            .await;
        // From disk now: the second pull needs neither the store nor the origin.
        a.pull(&img).await;
        assert_eq!(blob_gets(&tap), 3);

        store.restart().await;
        let next = push_oci_image(&registry.url(), REPO, "v2", &[3 * MIB, 4096], 8).await;
        a.pull(&next).await;
        // Its uploads succeed once the store is back (after the failure back-off).
        a.await_uploads(4.0).await;
        let b = Replica::start(&tap, &store).await;
        let gets = blob_gets(&tap);
        b.pull(&next).await;
        assert_eq!(blob_gets(&tap), gets, "B read the new image from the store");
        assert!(
            b.metric("berth_shared_lookups_total{kind=\"blob\",result=\"hit\"}")
                .await
                >= 3.0
        );
        assert_eq!(
            b.metric("berth_shared_lookups_total{kind=\"blob\",result=\"error\"}")
                .await,
            0.0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn azurite_replicas_share_blobs_without_origin_gets() {
        replicas_share(Kind::Azurite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn moto_replicas_share_blobs_without_origin_gets() {
        replicas_share(Kind::Moto).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn azurite_damaged_objects_are_never_served() {
        damaged_objects_are_never_served(Kind::Azurite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn moto_damaged_objects_are_never_served() {
        damaged_objects_are_never_served(Kind::Moto).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn azurite_outage_is_survived_and_recovered() {
        outage_and_recovery(Kind::Azurite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn moto_outage_is_survived_and_recovered() {
        outage_and_recovery(Kind::Moto).await;
    }
}
