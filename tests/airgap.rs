//! Air-gapped sites (issue 6): `berth warm` from a real docker-registry, serving offline,
//! `berth export` / `berth import` of OCI layout bundles (refusing corrupt ones without touching
//! the cache), pinning under a small disk budget, resumable warms, and warming a cache that a
//! running berth holds (`--via`), and a `berth warm --pin` killed with SIGKILL mid-write.
//!
//! warm / export / import / serve run as the real `berth` binary on a config file, as an
//! operator runs them.

mod common;

use std::path::{Path, PathBuf};

use common::airgap::{
    args, berth, blob_file, cache_listing, get_error, manifest_file, skopeo, skopeo_pull,
    tar_members, tmp_files, upstream_table, warm_summary, write_config, BerthProcess, OciError,
};
use common::berth::Berth;
use common::content::{pseudo_random, sha256_digest, OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST};
use common::fault::{Fault, FaultUpstream};
use common::{push_blob, push_oci_image, push_oci_index, Registry, Tap, TestImage, TestIndex};
use reqwest::Method;
use tempfile::TempDir;

/// An origin with content, a tap counting what reaches it, and a config for the binary.
struct Site {
    registry: Registry,
    tap: Tap,
    /// `airgap/multi:1.0`: an OCI index for linux/amd64 and linux/arm64; warmed for amd64 only.
    multi: TestIndex,
    /// `airgap/single:2.0`: a single-platform image; warmed.
    single: TestImage,
    /// `airgap/single:2.1`: another tag of a warmed repository; never warmed.
    single_other: TestImage,
    /// `airgap/never:3.0`: never warmed.
    never: TestImage,
    work: TempDir,
    config: PathBuf,
    cache: PathBuf,
    list: PathBuf,
}

impl Site {
    async fn new(disk_bytes: &str) -> Site {
        let registry = Registry::start().await;
        let tap = Tap::start(registry.addr()).await;
        let base = registry.url();
        let multi = push_oci_index(
            &base,
            "airgap/multi",
            "1.0",
            &[("linux", "amd64"), ("linux", "arm64")],
            61,
        )
        .await;
        let single = push_oci_image(&base, "airgap/single", "2.0", &[300_000, 700_000], 62).await;
        let single_other = push_oci_image(&base, "airgap/single", "2.1", &[50_000], 63).await;
        let never = push_oci_image(&base, "airgap/never", "3.0", &[40_000], 64).await;
        let work = tempfile::tempdir().expect("tempdir");
        let cache = work.path().join("cache");
        let config = write_config(
            &work.path().join("berth.toml"),
            &cache,
            disk_bytes,
            &tap.url(),
            &registry.host(),
        );
        // The single image comes from a list file (comments allowed), without a registry host
        // (default upstream); the index is named on the command line with the origin's host.
        let list = work.path().join("images.txt");
        std::fs::write(&list, "# images for the site\nairgap/single:2.0  # app\n\n").unwrap();
        Site {
            registry,
            tap,
            multi,
            single,
            single_other,
            never,
            work,
            config,
            cache,
            list,
        }
    }

    fn multi_ref(&self) -> String {
        format!("{}/airgap/multi:1.0", self.registry.host())
    }

    fn amd64(&self) -> &TestImage {
        self.multi.image_for("linux", "amd64").expect("amd64")
    }

    fn arm64(&self) -> &TestImage {
        self.multi.image_for("linux", "arm64").expect("arm64")
    }

    /// `berth warm` of both images, the index for linux/amd64 only.
    fn warm_args(&self) -> Vec<String> {
        vec![
            "warm".into(),
            "--config".into(),
            self.config.display().to_string(),
            "--platform".into(),
            "linux/amd64".into(),
            "--concurrency".into(),
            "3".into(),
            self.multi_ref(),
            "--file".into(),
            self.list.display().to_string(),
        ]
    }

    /// Every blob the warm must fetch: the amd64 image's and the single image's.
    fn warmed_blobs(&self) -> Vec<(String, usize)> {
        self.amd64()
            .blobs()
            .into_iter()
            .chain(self.single.blobs())
            .map(|(d, b)| (d.to_owned(), b.len()))
            .collect()
    }

    fn warmed_bytes(&self) -> u64 {
        self.warmed_blobs().iter().map(|(_, n)| *n as u64).sum()
    }

    /// Runs the warm, prints its output, checks it succeeded and returns its summary.
    async fn warm(&self, label: &str) -> (usize, usize, u64, u64) {
        let run = berth(&self.warm_args()).await;
        println!("=== {label} ===\n{}", run.transcript());
        let run = run.expect_ok();
        let summary = warm_summary(&run.stdout)
            .unwrap_or_else(|| panic!("no summary line in warm output:\n{}", run.transcript()));
        self.assert_warmed_on_disk(label);
        summary
    }

    /// Once `berth warm` has exited 0, everything it warmed is in the cache directory.
    fn assert_warmed_on_disk(&self, label: &str) {
        let manifests = [
            &self.multi.digest,
            &self.amd64().manifest_digest,
            &self.single.manifest_digest,
        ];
        let missing: Vec<String> = self
            .warmed_blobs()
            .iter()
            .map(|(d, _)| blob_file(&self.cache, d))
            .chain(manifests.iter().map(|d| manifest_file(&self.cache, d)))
            .filter(|f| !f.is_file())
            .map(|f| f.display().to_string())
            .collect();
        assert!(
            missing.is_empty(),
            "{label}: berth warm exited 0 and reported these as fetched, but they are not in the cache directory (the process ended before their fills were committed?): {missing:#?}\ntmp/: {:?}",
            tmp_files(&self.cache)
        );
    }

    /// An offline config (a copy of this one) over `cache`.
    fn config_for(&self, cache: &Path, name: &str) -> PathBuf {
        write_config(
            &self.work.path().join(name),
            cache,
            "1GiB",
            &self.tap.url(),
            &self.registry.host(),
        )
    }
}

/// Checks a `dir:` copy: the manifest is the pushed one and every blob file hashes to its name.
fn check_dir_copy(dir: &Path, img: &TestImage) {
    let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest.json in the copy");
    assert_eq!(
        String::from_utf8_lossy(&manifest),
        String::from_utf8_lossy(&img.manifest_bytes),
        "manifest bytes of {}:{}",
        img.repo,
        img.tag
    );
    for (digest, bytes) in img.blobs() {
        let hex = digest.trim_start_matches("sha256:");
        let got = std::fs::read(dir.join(hex)).unwrap_or_else(|_| panic!("blob {hex} copied"));
        assert_eq!(sha256_digest(&got), digest);
        assert_eq!(got.len(), bytes.len());
    }
}

/// Asserts an answer is a 404 with `code` and a message saying the content is not in this
/// mirror.
fn assert_not_in_mirror(what: &str, e: &OciError, code: &str) {
    println!("{what}: {} {}", e.status, e.body);
    assert_eq!(e.status, 404, "{what}: {e:?}");
    assert_eq!(e.code, code, "{what}: {e:?}");
    assert!(
        e.message.contains("not in this mirror"),
        "{what}: the message must say it is not in this mirror: {e:?}"
    );
}

/// What an offline mirror must serve after the site's warm (or an import of it) and what it
/// must refuse, pulled with skopeo at `host` and checked over HTTP at `url`.
async fn check_offline_pulls(site: &Site, host: &str, url: &str, out: &Path, label: &str) {
    std::fs::create_dir_all(out).expect("pull directory");
    // The warmed platform of the index, and the single image, by tag.
    let dest = out.join(format!("{label}-multi-amd64"));
    let run = skopeo_pull(host, "airgap/multi:1.0", "amd64", &dest).await;
    println!(
        "=== {label}: offline pull, warmed platform ===\n{}",
        run.transcript()
    );
    run.expect_ok();
    check_dir_copy(&dest, site.amd64());
    let dest = out.join(format!("{label}-single"));
    let run = skopeo_pull(host, "airgap/single:2.0", "amd64", &dest).await;
    println!(
        "=== {label}: offline pull, single image ===\n{}",
        run.transcript()
    );
    run.expect_ok();
    check_dir_copy(&dest, &site.single);
    // And by digest.
    let dest = out.join(format!("{label}-single-digest"));
    let by_digest = format!("airgap/single@{}", site.single.manifest_digest);
    skopeo_pull(host, &by_digest, "amd64", &dest)
        .await
        .expect_ok();
    check_dir_copy(&dest, &site.single);

    // The platform that was not warmed, and images never warmed, fail.
    for (what, image, arch) in [
        ("arm64 platform", "airgap/multi:1.0", "arm64"),
        ("never warmed image", "airgap/never:3.0", "amd64"),
        ("never warmed tag", "airgap/single:2.1", "amd64"),
    ] {
        let dest = out.join(format!("{label}-{}", what.replace(' ', "-")));
        let run = skopeo_pull(host, image, arch, &dest).await;
        println!(
            "=== {label}: offline pull of the {what} (must fail) ===\n{}",
            run.transcript()
        );
        assert!(
            !run.ok(),
            "{what} must not pull offline:\n{}",
            run.transcript()
        );
        assert!(
            run.stderr.contains("not in this mirror"),
            "skopeo should relay berth's message:\n{}",
            run.transcript()
        );
    }

    // The same at the HTTP level, with the JSON body.
    let any = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ];
    let arm64 = site.arm64();
    assert_not_in_mirror(
        "arm64 manifest",
        &get_error(
            &format!("{url}/v2/airgap/multi/manifests/{}", arm64.manifest_digest),
            &any,
        )
        .await,
        "MANIFEST_UNKNOWN",
    );
    assert_not_in_mirror(
        "never warmed image",
        &get_error(&format!("{url}/v2/airgap/never/manifests/3.0"), &any).await,
        "MANIFEST_UNKNOWN",
    );
    assert_not_in_mirror(
        "never warmed tag",
        &get_error(&format!("{url}/v2/airgap/single/manifests/2.1"), &any).await,
        "MANIFEST_UNKNOWN",
    );
    assert_not_in_mirror(
        "never warmed tag, by digest",
        &get_error(
            &format!(
                "{url}/v2/airgap/single/manifests/{}",
                site.single_other.manifest_digest
            ),
            &any,
        )
        .await,
        "MANIFEST_UNKNOWN",
    );
    assert_not_in_mirror(
        "arm64 layer",
        &get_error(
            &format!("{url}/v2/airgap/multi/blobs/{}", arm64.layers[0].0),
            &[],
        )
        .await,
        "BLOB_UNKNOWN",
    );
    assert_not_in_mirror(
        "never warmed blob",
        &get_error(
            &format!("{url}/v2/airgap/never/blobs/{}", site.never.layers[0].0),
            &[],
        )
        .await,
        "BLOB_UNKNOWN",
    );
    // Bytes the mirror holds, asked for under a repository its evidence does not cover (the
    // warm-up, or the bundle, named another repository): not served.
    assert_not_in_mirror(
        "cached layer under another repository",
        &get_error(
            &format!("{url}/v2/airgap/never/blobs/{}", site.single.layers[0].0),
            &[],
        )
        .await,
        "BLOB_UNKNOWN",
    );
    assert_not_in_mirror(
        "cached manifest under another repository",
        &get_error(
            &format!(
                "{url}/v2/airgap/multi/manifests/{}",
                site.single.manifest_digest
            ),
            &any,
        )
        .await,
        "MANIFEST_UNKNOWN",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_one_platform_then_serve_offline_with_the_origin_stopped() {
    let mut site = Site::new("1GiB").await;
    let (ok, of, fetched, skipped) = site.warm("berth warm (first run)").await;
    assert_eq!((ok, of), (2, 2), "both images warmed");
    assert_eq!(fetched, site.warmed_bytes(), "fetched bytes = warmed blobs");
    assert_eq!(skipped, 0, "nothing was cached before");

    // What reached the origin: each warmed blob once, nothing of arm64 or unwarmed images.
    let requests = site.tap.requests();
    println!("origin requests during the warm:");
    for (m, p) in &requests {
        println!("  {m} {p}");
    }
    for (digest, _) in site.warmed_blobs() {
        let gets = site
            .tap
            .count(|m, p| m == Method::GET && p.contains(&format!("/blobs/{digest}")));
        assert_eq!(gets, 1, "blob {digest} fetched exactly once: {requests:?}");
    }
    let arm64 = site.arm64();
    let mut unwanted: Vec<String> = arm64.blobs().iter().map(|(d, _)| d.to_string()).collect();
    unwanted.push(arm64.manifest_digest.clone());
    unwanted.push("airgap/never".into());
    unwanted.push("/manifests/2.1".into());
    for u in &unwanted {
        assert_eq!(
            site.tap.count(|_, p| p.contains(u.as_str())),
            0,
            "{u} must not be requested when warming linux/amd64 only: {requests:?}"
        );
    }

    // The origin goes away; berth serves offline from the warmed cache.
    site.registry.stop();
    site.tap.clear();
    let server = BerthProcess::serve_offline(&site.config).await;
    let out = site.work.path().join("pulls");
    check_offline_pulls(&site, &server.host(), &server.url(), &out, "offline").await;
    assert_eq!(
        site.tap.requests(),
        vec![],
        "an offline berth never contacts the origin"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_into_a_fresh_cache_and_corrupt_bundles_change_nothing() {
    let mut site = Site::new("1GiB").await;
    site.warm("berth warm").await;
    site.registry.stop();
    let dir = site.work.path().to_owned();

    // Export both images, and the index alone (a one-image archive for skopeo).
    let bundle = dir.join("site.tar");
    let c = site.config.display().to_string();
    let run = berth(&[
        "export".into(),
        "--config".into(),
        c.clone(),
        "--out".into(),
        bundle.display().to_string(),
        site.multi_ref(),
        "airgap/single:2.0".into(),
    ])
    .await;
    println!("{}", run.transcript());
    run.expect_ok();
    let one = dir.join("multi.tar");
    berth(&[
        "export".into(),
        "--config".into(),
        c.clone(),
        "--out".into(),
        one.display().to_string(),
        site.multi_ref(),
    ])
    .await
    .expect_ok();

    // Other tools read the export: skopeo inspects and copies the one-image archive, and finds
    // the single image in the two-image archive by its tag.
    let run = skopeo(&args(&[
        "inspect",
        &format!("oci-archive:{}", one.display()),
    ]))
    .await;
    println!("{}", run.transcript());
    let run = run.expect_ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("inspect JSON");
    assert_eq!(v["Digest"], site.multi.digest.as_str(), "{v}");
    assert_eq!(v["Architecture"], "amd64", "{v}");
    assert_eq!(v["Os"], "linux", "{v}");
    let copy = dir.join("from-archive");
    skopeo(&args(&[
        "--override-arch",
        "amd64",
        "--override-os",
        "linux",
        "copy",
        &format!("oci-archive:{}", one.display()),
        &format!("dir:{}", copy.display()),
    ]))
    .await
    .expect_ok();
    check_dir_copy(&copy, site.amd64());
    let run = skopeo(&args(&[
        "inspect",
        &format!("oci-archive:{}:2.0", bundle.display()),
    ]))
    .await;
    println!("{}", run.transcript());
    let v: serde_json::Value = serde_json::from_str(&run.expect_ok().stdout).expect("inspect JSON");
    assert_eq!(v["Digest"], site.single.manifest_digest.as_str(), "{v}");

    // Damaged copies of the two-image bundle: cut in the middle of its largest blob, and one
    // byte flipped inside it.
    let members = tar_members(&bundle);
    let largest = members
        .iter()
        .filter(|m| m.name.starts_with("blobs/"))
        .max_by_key(|m| m.size)
        .expect("blobs in the bundle")
        .clone();
    println!("bundle members: {members:#?}\ndamaging {largest:?}");
    let good = std::fs::read(&bundle).unwrap();
    let truncated = dir.join("truncated.tar");
    std::fs::write(
        &truncated,
        &good[..(largest.offset + largest.size / 2) as usize],
    )
    .unwrap();
    let flipped = dir.join("flipped.tar");
    let mut bytes = good.clone();
    bytes[(largest.offset + largest.size / 2) as usize] ^= 0x01;
    std::fs::write(&flipped, &bytes).unwrap();

    // A fresh cache that already holds the index (imported from the one-image archive).
    let fresh = dir.join("fresh-cache");
    let fc = site.config_for(&fresh, "fresh.toml").display().to_string();
    let run = berth(&[
        "import".into(),
        "--config".into(),
        fc.clone(),
        one.display().to_string(),
    ])
    .await;
    println!("{}", run.transcript());
    run.expect_ok();
    let before = cache_listing(&fresh);
    let pins_before = std::fs::read(fresh.join("pins.json")).ok();
    assert!(!before.is_empty(), "the first import stored something");

    for (what, path, needle) in [
        ("truncated", &truncated, "truncated"),
        ("flipped byte", &flipped, "does not match"),
    ] {
        let run = berth(&[
            "import".into(),
            "--config".into(),
            fc.clone(),
            "--pin".into(),
            path.display().to_string(),
        ])
        .await;
        println!(
            "=== import of the {what} bundle (must be refused) ===\n{}",
            run.transcript()
        );
        assert!(
            !run.ok(),
            "{what} bundle must be refused:\n{}",
            run.transcript()
        );
        assert!(
            run.stderr.contains("refused") && run.stderr.contains(needle),
            "{what}: the message should say the bundle is refused and why ({needle}):\n{}",
            run.transcript()
        );
        let after = cache_listing(&fresh);
        assert_eq!(
            after, before,
            "{what} bundle changed the cache (files + sizes under blobs/, manifests/, tags/)"
        );
        assert_eq!(
            std::fs::read(fresh.join("pins.json")).ok(),
            pins_before,
            "{what} bundle changed the pins"
        );
        assert_eq!(
            tmp_files(&fresh),
            Vec::<String>::new(),
            "{what}: tmp/ empty"
        );
    }

    // The good bundle imports (pinned) and the fresh cache serves the same pulls offline.
    let run = berth(&[
        "import".into(),
        "--config".into(),
        fc.clone(),
        "--pin".into(),
        bundle.display().to_string(),
    ])
    .await;
    println!("{}", run.transcript());
    run.expect_ok();
    let pins: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fresh.join("pins.json")).expect("pins.json"))
            .unwrap();
    assert_eq!(
        pins.as_array().map(Vec::len),
        Some(2),
        "both pinned: {pins}"
    );
    assert_eq!(tmp_files(&fresh), Vec::<String>::new(), "tmp/ empty");

    site.tap.clear();
    let offline = Berth::with_upstreams(&upstream_table(
        &site.tap.url(),
        &site.registry.host(),
        true,
    ))
    .cache_dir(&fresh)
    .start()
    .await;
    let out = dir.join("pulls");
    check_offline_pulls(&site, &offline.host(), &offline.url(), &out, "imported").await;
    assert_eq!(site.tap.requests(), vec![], "offline: no origin contact");
    offline.stop().await;
}

/// A bundle cut exactly between two tar members (no partial member, no end-of-archive blocks):
/// here right after the index manifest, so that none of its platforms is in the bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_cut_between_members_is_refused_too() {
    let mut site = Site::new("1GiB").await;
    site.warm("berth warm").await;
    site.registry.stop();
    let dir = site.work.path().to_owned();
    let one = dir.join("multi.tar");
    berth(&[
        "export".into(),
        "--config".into(),
        site.config.display().to_string(),
        "--out".into(),
        one.display().to_string(),
        site.multi_ref(),
    ])
    .await
    .expect_ok();
    let members = tar_members(&one);
    let index = members
        .iter()
        .find(|m| {
            m.name
                == format!(
                    "blobs/sha256/{}",
                    site.multi.digest.trim_start_matches("sha256:")
                )
        })
        .unwrap_or_else(|| panic!("the index manifest in the bundle: {members:#?}"));
    let end = index.offset + index.size.div_ceil(512) * 512;
    let cut = dir.join("cut.tar");
    std::fs::write(&cut, &std::fs::read(&one).unwrap()[..end as usize]).unwrap();
    println!(
        "bundle members: {members:#?}\ncut at byte {end}, right after {}",
        index.name
    );

    let fresh = dir.join("fresh-cache");
    let fc = site.config_for(&fresh, "fresh.toml").display().to_string();
    let before = cache_listing(&fresh);
    let run = berth(&[
        "import".into(),
        "--config".into(),
        fc,
        cut.display().to_string(),
    ])
    .await;
    println!(
        "=== import of the cut bundle (must be refused) ===\n{}",
        run.transcript()
    );
    let after = cache_listing(&fresh);
    assert!(
        !run.ok(),
        "a bundle holding an index without any of its platform manifests (cut after {}) must be refused, not imported as a complete image:\n{}\ncache now holds: {after:#?}",
        index.name,
        run.transcript()
    );
    assert_eq!(after, before, "the refused bundle changed the cache");
    assert_eq!(tmp_files(&fresh), Vec::<String>::new(), "tmp/ empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_images_survive_a_cache_filled_far_beyond_its_budget() {
    const BUDGET: u64 = 3 << 20;
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let base = registry.url();
    let pinned = push_oci_image(&base, "airgap/pinned", "1.0", &[600_000, 400_000], 71).await;
    // 2.3 MB: fits the 3 MiB budget alone, not beside the 1 MB already pinned.
    let big = push_oci_image(&base, "airgap/big", "1.0", &[1_300_000, 1_000_000], 72).await;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "3MiB",
        &tap.url(),
        &registry.host(),
    );
    let c = config.display().to_string();

    let run = berth(&args(&[
        "warm",
        "--config",
        &c,
        "--pin",
        "airgap/pinned:1.0",
    ]))
    .await;
    println!("{}", run.transcript());
    let run = run.expect_ok();
    assert_eq!(warm_summary(&run.stdout).map(|s| (s.0, s.1)), Some((1, 1)));
    let pinned_files: Vec<PathBuf> = pinned
        .blobs()
        .iter()
        .map(|(d, _)| blob_file(&cache, d))
        .chain([manifest_file(&cache, &pinned.manifest_digest)])
        .collect();
    for f in &pinned_files {
        assert!(f.is_file(), "{} stored by the warm", f.display());
    }

    // Pull 12 MiB of other blobs through berth (online) over the same cache directory.
    let fillers: Vec<Vec<u8>> = (0..12u64)
        .map(|i| pseudo_random(700 + i, 1 << 20))
        .collect();
    let mut digests = Vec::new();
    for f in &fillers {
        digests.push(push_blob(&base, "airgap/filler", f).await);
    }
    let online = Berth::with_upstreams(&upstream_table(&tap.url(), &registry.host(), false))
        .cache_dir(&cache)
        .disk_bytes("3MiB")
        .start()
        .await;
    let client = reqwest::Client::new();
    for (d, bytes) in digests.iter().zip(&fillers) {
        let resp = client
            .get(format!("{}/v2/airgap/filler/blobs/{d}", online.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "filler {d}");
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), bytes.len(), "filler {d}");
        // Each fill commits before the next is asked for, so that the budget is exercised.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !blob_file(&cache, d).is_file() {
            assert!(
                std::time::Instant::now() < deadline,
                "filler {d} never committed to disk"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let metrics = online.metrics().await;
    online.stop().await;

    let listing = cache_listing(&cache);
    let on_disk: u64 = listing
        .iter()
        .filter(|(p, _)| !p.starts_with("tags"))
        .map(|(_, n)| *n)
        .sum();
    let fillers_left = digests
        .iter()
        .filter(|d| blob_file(&cache, d).is_file())
        .count();
    println!(
        "after filling: {on_disk} bytes on disk (budget {BUDGET}), {fillers_left} of {} fillers left\n{}",
        digests.len(),
        metrics
            .lines()
            .filter(|l| l.starts_with("berth_cache_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(on_disk <= BUDGET, "the budget holds: {listing:#?}");
    for f in &pinned_files {
        assert!(f.is_file(), "pinned {} evicted: {listing:#?}", f.display());
    }
    assert!(
        (1..=2).contains(&fillers_left),
        "unpinned content was evicted, the newest kept ({fillers_left} fillers left; about 2 \
         fit beside the pin)"
    );
    assert!(
        blob_file(&cache, digests.last().unwrap()).is_file(),
        "the most recent filler is the last to go"
    );

    // A pin that would not fit beside what is pinned is refused, and changes no pin.
    let pins_before = std::fs::read(cache.join("pins.json")).expect("pins.json");
    let run = berth(&args(&["warm", "--config", &c, "--pin", "airgap/big:1.0"])).await;
    println!(
        "=== pin that does not fit ({} bytes, budget {BUDGET}) ===\n{}",
        big.blobs().iter().map(|(_, b)| b.len()).sum::<usize>(),
        run.transcript()
    );
    assert!(!run.ok(), "the pin must be refused:\n{}", run.transcript());
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains("airgap/big:1.0") && text.contains("pin") && text.contains("disk_bytes"),
        "the refusal should name the image and the budget to raise:\n{}",
        run.transcript()
    );
    assert_eq!(
        std::fs::read(cache.join("pins.json")).unwrap(),
        pins_before,
        "pins unchanged"
    );
    for f in &pinned_files {
        assert!(f.is_file(), "pinned {} still there", f.display());
    }

    // With no image named, export writes every pinned image.
    let bundle = work.path().join("pinned.tar");
    let run = berth(&[
        "export".into(),
        "--config".into(),
        c.clone(),
        "--out".into(),
        bundle.display().to_string(),
    ])
    .await;
    println!("{}", run.transcript());
    assert!(
        run.expect_ok().stdout.contains("exported 1 image(s)"),
        "the pinned image only"
    );
    let run = skopeo(&args(&[
        "inspect",
        &format!("oci-archive:{}", bundle.display()),
    ]))
    .await;
    let v: serde_json::Value = serde_json::from_str(&run.expect_ok().stdout).expect("inspect JSON");
    assert_eq!(v["Digest"], pinned.manifest_digest.as_str(), "{v}");

    // With the origin gone, the pinned image pulls offline.
    drop(registry);
    tap.clear();
    let offline = Berth::with_upstreams(&upstream_table(&tap.url(), "unused.invalid", true))
        .cache_dir(&cache)
        .disk_bytes("3MiB")
        .start()
        .await;
    let dest = work.path().join("pinned-copy");
    let run = skopeo_pull(&offline.host(), "airgap/pinned:1.0", "amd64", &dest).await;
    println!("{}", run.transcript());
    run.expect_ok();
    check_dir_copy(&dest, &pinned);
    assert_eq!(tap.requests(), vec![], "offline: no origin contact");
    offline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_of_the_same_warm_fetches_no_blob() {
    let site = Site::new("1GiB").await;
    let total = site.warmed_bytes();
    let first = site.warm("berth warm (first run)").await;
    assert_eq!(first, (2, 2, total, 0));

    site.tap.clear();
    let again = site.warm("berth warm (rerun)").await;
    println!("origin requests during the rerun:");
    for (m, p) in site.tap.requests() {
        println!("  {m} {p}");
    }
    assert_eq!(
        site.tap
            .count(|m, p| m == Method::GET && p.contains("/blobs/")),
        0,
        "a rerun GETs no blob from the origin: {:?}",
        site.tap.requests()
    );
    assert_eq!(
        site.tap.count(|_, p| p.contains("/blobs/")),
        0,
        "a rerun asks the origin nothing about blobs (HEADs are answered from the cache): {:?}",
        site.tap.requests()
    );
    assert_eq!(
        again,
        (2, 2, 0, total),
        "everything reported as already cached"
    );

    // An interrupted warm resumes: a blob lost from the cache is the only one fetched again.
    let (lost, size) = site.single.layers[1].clone();
    std::fs::remove_file(blob_file(&site.cache, &lost)).expect("remove a cached layer");
    site.tap.clear();
    let resumed = site.warm("berth warm (after losing one layer)").await;
    let gets: Vec<String> = site
        .tap
        .requests()
        .into_iter()
        .filter(|(m, p)| m == Method::GET && p.contains("/blobs/"))
        .map(|(_, p)| p)
        .collect();
    assert_eq!(gets.len(), 1, "only the lost layer is fetched: {gets:?}");
    assert!(gets[0].contains(&lost), "{gets:?}");
    assert_eq!(
        resumed,
        (2, 2, size.len() as u64, total - size.len() as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_of_a_cache_held_by_a_running_berth_goes_through_it_with_via() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let img = push_oci_image(&registry.url(), "airgap/via", "1.0", &[200_000], 81).await;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "1GiB",
        &tap.url(),
        &registry.host(),
    );
    let c = config.display().to_string();
    let running = Berth::with_upstreams(&upstream_table(&tap.url(), &registry.host(), false))
        .cache_dir(&cache)
        .start()
        .await;

    let image = format!("{}/airgap/via:1.0", registry.host());
    let run = berth(&args(&["warm", "--config", &c, &image])).await;
    println!(
        "=== warm while berth holds the cache ===\n{}",
        run.transcript()
    );
    assert!(
        !run.ok(),
        "must not open a held cache:\n{}",
        run.transcript()
    );
    assert!(
        format!("{}{}", run.stdout, run.stderr).contains("--via"),
        "the message should point at --via:\n{}",
        run.transcript()
    );
    assert_eq!(
        tap.count(|_, p| p.contains("/blobs/")),
        0,
        "the refused warm fetched nothing"
    );

    let run = berth(&args(&[
        "warm",
        "--config",
        &c,
        "--via",
        &running.url(),
        &image,
    ]))
    .await;
    println!("=== warm --via {} ===\n{}", running.url(), run.transcript());
    let run = run.expect_ok();
    let bytes: u64 = img.blobs().iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(warm_summary(&run.stdout), Some((1, 1, bytes, 0)));

    // The running berth now has it: a pull is a hit and reaches no origin.
    tap.clear();
    for (d, b) in img.blobs() {
        let resp = reqwest::get(format!("{}/v2/airgap/via/blobs/{d}", running.url()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()
                .get("x-berth-cache")
                .and_then(|v| v.to_str().ok()),
            Some("hit"),
            "{d}"
        );
        assert_eq!(resp.bytes().await.unwrap().len(), b.len());
    }
    assert_eq!(tap.count(|_, p| p.contains("/blobs/")), 0);
    running.stop().await;
}

/// `--with-referrers` also warms what the origin's referrers API lists for each manifest
/// (signatures, SBOMs), and without the flag they are left out.
#[tokio::test]
async fn warm_with_referrers_fetches_signatures_too() {
    use common::fault::FaultUpstream;
    let fault = FaultUpstream::start().await;
    let host = fault.addr().to_string();
    let descriptor = |media_type: &str, bytes: &[u8]| serde_json::json!({"mediaType": media_type, "digest": sha256_digest(bytes), "size": bytes.len()});
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let layer = pseudo_random(71, 50_000);
    fault.add_blob(config.clone());
    fault.add_blob(layer.clone());
    let image = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": common::content::OCI_MANIFEST,
        "config": descriptor(common::content::OCI_CONFIG, &config),
        "layers": [descriptor(common::content::OCI_LAYER_TAR, &layer)],
    })
    .to_string();
    let subject = fault.add_manifest(
        "signed/app",
        "v1",
        common::content::OCI_MANIFEST,
        image.clone(),
    );
    // A signature: an artifact manifest whose subject is the image.
    let sig_config = b"{}".to_vec();
    let sig_payload = pseudo_random(72, 700);
    fault.add_blob(sig_config.clone());
    fault.add_blob(sig_payload.clone());
    let signature = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": common::content::OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": descriptor("application/vnd.oci.empty.v1+json", &sig_config),
        "layers": [descriptor("application/vnd.dev.cosign.simplesigning.v1+json", &sig_payload)],
        "subject": descriptor(common::content::OCI_MANIFEST, image.as_bytes()),
    })
    .to_string();
    let sig = fault.add_referrer(&subject, common::content::OCI_MANIFEST, signature);

    for with in [true, false] {
        let dir = TempDir::new().unwrap();
        let cache = dir.path().join("cache");
        let config_path = write_config(
            &dir.path().join("berth.toml"),
            &cache,
            "1GiB",
            &fault.url(),
            &host,
        );
        let mut a = args(&["warm", "--config"]);
        a.push(config_path.display().to_string());
        if with {
            a.push("--with-referrers".into());
        }
        a.push(format!("{host}/signed/app:v1"));
        let run = berth(&a).await.expect_ok();
        println!("{}", run.transcript());
        assert!(
            manifest_file(&cache, &subject).is_file(),
            "the image manifest is warmed"
        );
        assert!(blob_file(&cache, &sha256_digest(&layer)).is_file());
        assert_eq!(
            manifest_file(&cache, &sig).is_file(),
            with,
            "signature manifest warmed: {with}"
        );
        assert_eq!(
            blob_file(&cache, &sha256_digest(&sig_payload)).is_file(),
            with,
            "signature payload warmed: {with}"
        );
    }
}

/// `berth unpin` hands a pinned image back to the budget: it is evicted like anything else.
#[tokio::test]
async fn unpinned_images_are_evicted_again() {
    let registry = Registry::start().await;
    let base = registry.url();
    let image = push_oci_image(&base, "airgap/unpin", "1.0", &[600_000, 400_000], 81).await;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "3MiB",
        &base,
        &registry.host(),
    );
    let c = config.display().to_string();
    berth(&args(&[
        "warm",
        "--config",
        &c,
        "--pin",
        "airgap/unpin:1.0",
    ]))
    .await
    .expect_ok();
    let layer = blob_file(&cache, &image.layers[0].0);
    assert!(layer.is_file());

    let run = berth(&args(&["unpin", "--config", &c, "airgap/unpin:1.0"])).await;
    println!("{}", run.transcript());
    assert!(run.expect_ok().stdout.contains("unpinned airgap/unpin:1.0"));
    let pins = std::fs::read_to_string(cache.join("pins.json")).unwrap();
    assert!(!pins.contains("airgap/unpin"), "{pins}");
    let again = berth(&args(&["unpin", "--config", &c, "airgap/unpin:1.0"])).await;
    assert!(
        !again.ok(),
        "unpinning what is not pinned is an error:\n{}",
        again.transcript()
    );
    assert!(
        again.stderr.contains("not pinned"),
        "{}",
        again.transcript()
    );

    // Fill the budget with other blobs: the formerly pinned layer goes.
    let fillers: Vec<Vec<u8>> = (0..4u64).map(|i| pseudo_random(900 + i, 1 << 20)).collect();
    let mut digests = Vec::new();
    for f in &fillers {
        digests.push(push_blob(&base, "airgap/filler", f).await);
    }
    let online = Berth::with_upstreams(&upstream_table(&base, &registry.host(), false))
        .cache_dir(&cache)
        .disk_bytes("3MiB")
        .start()
        .await;
    for d in &digests {
        let resp = reqwest::get(format!("{}/v2/airgap/filler/blobs/{d}", online.url()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        for _ in 0..500 {
            if blob_file(&cache, d).is_file() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    online.stop().await;
    assert!(
        !layer.exists(),
        "the unpinned layer was evicted to make room"
    );
}

/// Serves a one-layer OCI image `repo:tag` from the fake origin; returns its layer's digest.
fn fake_image(fault: &FaultUpstream, repo: &str, tag: &str, seed: u64, layer_len: usize) -> String {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [] },
        "seed": seed,
    }))
    .unwrap();
    let layer = pseudo_random(seed, layer_len);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": sha256_digest(&config), "size": config.len() },
        "layers": [{ "mediaType": OCI_LAYER_TAR, "digest": sha256_digest(&layer), "size": layer.len() }],
    }))
    .unwrap();
    fault.add_blob(config);
    let layer_digest = fault.add_blob(layer);
    fault.add_manifest(repo, tag, OCI_MANIFEST, manifest);
    layer_digest
}

/// A `berth warm --pin` killed with SIGKILL while it writes a blob leaves its temp file and the
/// pins saved before; the cache opens again (the leftover deleted, the earlier pin kept), and
/// even a pins.json damaged some other way does not stop berth from serving.
#[tokio::test]
async fn a_warm_killed_mid_write_leaves_a_cache_that_opens() {
    use std::os::unix::process::ExitStatusExt;

    let fault = FaultUpstream::start().await;
    let host = fault.addr().to_string();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "1GiB",
        &fault.url(),
        &host,
    );
    let c = config.display().to_string();
    let kept = fake_image(&fault, "crash/kept", "1", 130, 200_000);
    berth(&args(&["warm", "--config", &c, "--pin", "crash/kept:1"]))
        .await
        .expect_ok();
    let pins_before = std::fs::read(cache.join("pins.json")).expect("pins saved");

    // The next warm is held by the origin in the middle of its layer, then killed.
    let held = fake_image(&fault, "crash/held", "1", 131, 1 << 20);
    fault.set_blob_fault(&held, Fault::Hold(300_000));
    let mut child = tokio::process::Command::new(common::airgap::BIN)
        .args(args(&["warm", "--config", &c, "--pin", "crash/held:1"]))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start berth warm");
    tokio::time::timeout(std::time::Duration::from_secs(60), fault.wait_held(1))
        .await
        .expect("the warm reached the held layer");
    // Its fill has a temp file (created before the first byte is read).
    for _ in 0..3000 {
        if !tmp_files(&cache).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(
        !tmp_files(&cache).is_empty(),
        "the kill left the fill's temp file behind"
    );
    assert!(!blob_file(&cache, &held).exists());
    assert_eq!(
        std::fs::read(cache.join("pins.json")).unwrap(),
        pins_before,
        "pins.json is the one saved before the kill"
    );

    // berth serves from the cache the killed process left.
    let upstream = upstream_table(&fault.url(), &host, false);
    let online = Berth::with_upstreams(&upstream)
        .cache_dir(&cache)
        .start()
        .await;
    assert!(tmp_files(&cache).is_empty(), "{:?}", tmp_files(&cache));
    let resp = reqwest::get(format!("{}/v2/crash/kept/blobs/{kept}", online.url()))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-berth-cache"], "hit");
    assert_eq!(sha256_digest(&resp.bytes().await.unwrap()), kept);
    online.stop().await;

    // A pins.json cut short (not something berth's renames produce, but disks fail) is set
    // aside and berth starts anyway.
    std::fs::write(
        cache.join("pins.json"),
        &pins_before[..pins_before.len() / 2],
    )
    .unwrap();
    let online = Berth::with_upstreams(&upstream)
        .cache_dir(&cache)
        .start()
        .await;
    assert!(cache.join("pins.json.damaged").is_file());
    let resp = reqwest::get(format!("{}/v2/crash/kept/blobs/{kept}", online.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    online.stop().await;
}

/// Memberships (which repository of which upstream holds which digest) are written as berth
/// learns them and survive a crash: berth is killed with SIGKILL while pulls record new ones,
/// restarts offline (no origin to ask), and serves everything it had recorded before the kill,
/// byte-exact; what was in flight is served whole or refused, never damaged, and the restart is
/// not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_survive_kill_9_and_an_offline_restart() {
    let registry = Registry::start().await;
    let base = registry.url();
    let mut images = Vec::new();
    for i in 0..8u64 {
        images.push(
            push_oci_image(
                &base,
                &format!("crash/app{i}"),
                "1.0",
                &[20_000, 5_000],
                70 + i,
            )
            .await,
        );
    }
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "1GiB",
        &base,
        &registry.host(),
    );
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap();
    let pull = |url: String, img: TestImage| {
        let client = client.clone();
        async move {
            let mut reqs = vec![(
                format!("{url}/v2/{}/manifests/{}", img.repo, img.tag),
                img.manifest_bytes.clone(),
            )];
            for (d, b) in img.blobs() {
                reqs.push((format!("{url}/v2/{}/blobs/{d}", img.repo), b.to_vec()));
            }
            let mut answers = Vec::new();
            for (u, want) in reqs {
                let r = client
                    .get(&u)
                    .header("accept", common::content::OCI_MANIFEST)
                    .send()
                    .await;
                let got = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        (
                            status,
                            r.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
                        )
                    }
                    Err(_) => (0, Vec::new()),
                };
                answers.push((u, got, want));
            }
            answers
        }
    };
    let online = BerthProcess::serve(&config, &[]).await;
    let mut online = online;
    for img in &images[..4] {
        for (u, (status, body), want) in pull(online.url(), img.clone()).await {
            assert_eq!(status, 200, "{u}");
            assert!(body == want, "{u}: wrong bytes");
        }
    }
    // Readiness, not a sleep: the writer has put every membership of the first four images on
    // disk (each blob digest appears in the log under its repository), and every blob's fill
    // has been committed (its file is in place).
    let log = cache.join("memberships.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let missing = images[..4]
            .iter()
            .flat_map(|img| {
                img.blobs()
                    .into_iter()
                    .map(move |(d, _)| (img.repo.clone(), d.to_owned()))
            })
            .filter(|(repo, d)| {
                !text.lines().any(|l| l.contains(&format!(" {repo} {d}")))
                    || !blob_file(&cache, d).is_file()
            })
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing} memberships or blobs never reached {}",
            log.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The other four are pulled concurrently while berth is killed.
    let url = online.url();
    let inflight: Vec<_> = images[4..]
        .iter()
        .map(|img| tokio::spawn(pull(url.clone(), img.clone())))
        .collect();
    // Kill once the first of them has been answered (berth is mid-way through recording).
    let first_done = {
        let probe = format!("{url}/v2/{}/manifests/{}", images[4].repo, images[4].tag);
        client
            .get(&probe)
            .header("accept", common::content::OCI_MANIFEST)
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    online.kill_9();
    for t in inflight {
        let _ = t.await;
    }
    assert!(matches!(first_done, Ok(200)), "{first_done:?}");

    let offline = BerthProcess::serve_offline(&config).await;
    for img in &images[..4] {
        for (u, (status, body), want) in pull(offline.url(), img.clone()).await {
            assert_eq!(
                status,
                200,
                "{u} after the crash: {}",
                String::from_utf8_lossy(&body)
            );
            assert!(body == want, "{u}: wrong bytes after the crash");
        }
    }
    let (mut served, mut refused) = (0, 0);
    for img in &images[4..] {
        for (u, (status, body), want) in pull(offline.url(), img.clone()).await {
            match status {
                200 => {
                    assert!(body == want, "{u}: wrong bytes after the crash");
                    served += 1;
                }
                404 => refused += 1,
                other => panic!(
                    "{u} after the crash answered {other}: {}",
                    String::from_utf8_lossy(&body)
                ),
            }
        }
    }
    println!("kill -9 during membership writes: 4 images complete after restart; of the in-flight four, {served} objects served whole, {refused} refused (404)");
    let log_text = offline.stop().await;
    assert!(!log_text.contains("panicked"), "{log_text}");
}

/// `--platform a,b` keeps exactly those platforms of an index; an image the origin does not
/// have and a line that is not a reference make the warm exit non-zero, named with their
/// reason, while everything else is still warmed.
#[tokio::test]
async fn warm_keeps_the_platforms_asked_and_fails_loudly_for_the_rest() {
    let registry = Registry::start().await;
    let idx = push_oci_index(
        &registry.url(),
        "airgap/plat",
        "1.0",
        &[("linux", "amd64"), ("linux", "arm64"), ("linux", "s390x")],
        91,
    )
    .await;
    let ok = push_oci_image(&registry.url(), "airgap/ok", "1.0", &[30_000], 92).await;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "1GiB",
        &registry.url(),
        &registry.host(),
    );
    let host = registry.host();
    let list = work.path().join("images.txt");
    std::fs::write(
        &list,
        format!(
            "# the good, the missing and the garbled\n{host}/airgap/ok:1.0\n\
             {host}/airgap/missing:1.0\nNot A Reference!!\n"
        ),
    )
    .unwrap();
    let run = berth(&args(&[
        "warm",
        "--config",
        &config.display().to_string(),
        "--platform",
        "linux/amd64,linux/arm64",
        &format!("{host}/airgap/plat:1.0"),
        "--file",
        &list.display().to_string(),
    ]))
    .await;
    println!("{}", run.transcript());
    assert!(!run.ok(), "a failed image makes the warm fail");
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(text.contains("airgap/missing"), "{text}");
    assert!(text.contains("Not A Reference!!"), "{text}");
    for platform in ["amd64", "arm64"] {
        let img = idx.image_for("linux", platform).unwrap();
        for (d, _) in img.blobs() {
            assert!(
                blob_file(&cache, d).is_file(),
                "linux/{platform} {d} warmed"
            );
        }
    }
    let s390x = idx.image_for("linux", "s390x").unwrap();
    for (d, _) in &s390x.layers {
        assert!(
            !blob_file(&cache, d).exists(),
            "linux/s390x was not asked for"
        );
    }
    for (d, _) in ok.blobs() {
        assert!(
            blob_file(&cache, d).is_file(),
            "the good image is warmed anyway"
        );
    }
}

/// One process per cache directory: while a warm holds the cache (its origin held mid-fetch),
/// export and import are refused with a message naming the cause, and change nothing; once the
/// warm is done they run.
#[tokio::test]
async fn warm_export_and_import_exclude_each_other() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let first = push_oci_image(&registry.url(), "airgap/first", "1.0", &[40_000], 93).await;
    let second = push_oci_image(&registry.url(), "airgap/second", "1.0", &[60_000], 94).await;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let config = write_config(
        &work.path().join("berth.toml"),
        &cache,
        "1GiB",
        &tap.url(),
        &registry.host(),
    );
    let c = config.display().to_string();
    let host = registry.host();
    let first_ref = format!("{host}/airgap/first:1.0");
    let second_ref = format!("{host}/airgap/second:1.0");
    berth(&args(&["warm", "--config", &c, &first_ref]))
        .await
        .expect_ok();
    let bundle = work.path().join("first.tar");
    let bundle_s = bundle.display().to_string();
    berth(&args(&[
        "export", "--config", &c, "--out", &bundle_s, &first_ref,
    ]))
    .await
    .expect_ok();

    // A warm that holds the cache: the origin holds its requests.
    tap.clear();
    tap.hold();
    // (Its origin timeout outlasts the refusals below: each waits out the lock's 5 s grace.)
    let warm_args = args(&[
        "warm",
        "--config",
        &c,
        "--set",
        "upstream.0.first_byte_timeout=300s",
        &second_ref,
    ]);
    let warm = tokio::spawn(async move { berth(&warm_args).await });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tap.requests().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the warm never reached the origin"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let listing = cache_listing(&cache);
    let out = work.path().join("during.tar");
    let out_s = out.display().to_string();
    let export_args = args(&["export", "--config", &c, "--out", &out_s, &first_ref]);
    let import_args = args(&["import", "--config", &c, &bundle_s]);
    let (export, import) = tokio::join!(berth(&export_args), berth(&import_args));
    for (what, run) in [("export", export), ("import", import)] {
        println!(
            "=== {what} while a warm holds the cache ===\n{}",
            run.transcript()
        );
        assert!(!run.ok(), "{what} must not open a held cache");
        assert!(
            run.stderr.contains("in use by another berth process"),
            "{what}: {}",
            run.transcript()
        );
    }
    assert!(!out.exists(), "the refused export wrote nothing");
    assert_eq!(
        cache_listing(&cache),
        listing,
        "the refused import changed nothing"
    );

    tap.release();
    let run = warm.await.unwrap();
    println!("{}", run.transcript());
    run.expect_ok();
    for (d, _) in second.blobs() {
        assert!(blob_file(&cache, d).is_file());
    }
    berth(&args(&[
        "export",
        "--config",
        &c,
        "--out",
        &out.display().to_string(),
        &first_ref,
    ]))
    .await
    .expect_ok();
    assert!(out.is_file());
    let _ = first;
}
