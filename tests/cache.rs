//! The cache engine against a real upstream: the disk budget under concurrent fills, eviction
//! that spares reads in progress, restarts that keep objects and the hot set, and a full disk.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::berth::Berth;
use common::content::sha256_digest;
use common::{push_oci_image, Registry, Tap};
use reqwest::{Client, Method, StatusCode};

/// Bytes of every file under `dir` (objects, tags, temp files).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            total += du(&e.path());
        } else {
            total += m.len();
        }
    }
    total
}

/// Bytes that count against the disk budget: blobs, manifests and fills in progress.
fn budgeted(cache: &Path) -> u64 {
    du(&cache.join("blobs")) + du(&cache.join("manifests")) + du(&cache.join("tmp"))
}

fn blob_file(cache: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Waits (bounded) until a blob's commit landed: the last bytes reach clients before the fsync
/// and rename that store them.
async fn wait_stored(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if path.is_file() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{} was never stored", path.display());
}

async fn get_blob(berth: &Berth, repo: &str, digest: &str) -> reqwest::Response {
    Client::new()
        .get(format!("{}/v2/{repo}/blobs/{digest}", berth.url()))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn disk_budget_holds_under_concurrent_fills() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "budget/app", "v1", &[1_000_000; 12], 31).await;
    const BUDGET: u64 = 4 << 20;
    let berth = Berth::in_front_of(&registry.url())
        .disk_bytes("4MiB")
        .memory_max_object("0")
        .start()
        .await;
    let cache = berth.cache_dir().to_owned();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, cache) = (done.clone(), peak.clone(), cache.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(budgeted(&cache), Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    let url = berth.url();
    let tasks: Vec<_> = img
        .layers
        .iter()
        .cloned()
        .map(|(d, bytes)| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = Client::new()
                    .get(format!("{url}/v2/budget/app/blobs/{d}"))
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                assert_eq!(sha256_digest(&body), d, "every client gets the right bytes");
                assert_eq!(body.len(), bytes.len());
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= BUDGET, "peak {peak} > budget {BUDGET}");
    assert!(peak > 0, "the sampler saw the cache fill");
    // Where the invariant is kept: the index records the most any fill ever held (checked
    // against the budget, and its totals against its entries, on every change in this debug
    // build), so a moment the sampler missed cannot hide an overshoot. A client has its last
    // byte once the blob is verified; the commit that releases the reservation follows.
    berth.settle().await;
    let usage = berth.app().cache().index().usage();
    assert!(
        usage.peak <= BUDGET,
        "the index saw {} > {BUDGET}",
        usage.peak
    );
    assert!(usage.peak >= 1_000_000, "the index saw fills: {usage:?}");
    assert!(usage.used <= BUDGET && usage.reserved == 0, "{usage:?}");
    assert!(budgeted(&cache) <= BUDGET);
    // Some blobs were stored (the budget is not just refused).
    let stored = img
        .layers
        .iter()
        .filter(|(d, _)| blob_file(&cache, d).is_file())
        .count();
    assert!((1..=4).contains(&stored), "{stored} stored");
}

#[tokio::test]
async fn eviction_spares_a_read_in_progress() {
    let registry = Registry::start().await;
    let img = push_oci_image(
        &registry.url(),
        "evict/app",
        "v1",
        &[8_000_000, 8_000_000],
        32,
    )
    .await;
    let (a, a_bytes) = img.layers[0].clone();
    let (b, _) = img.layers[1].clone();
    let berth = Berth::in_front_of(&registry.url())
        .disk_bytes("12MiB")
        .memory_max_object("0")
        .start()
        .await;
    let cache = berth.cache_dir().to_owned();
    // Store A, then start reading it from disk and stop after the first chunk.
    get_blob(&berth, "evict/app", &a)
        .await
        .bytes()
        .await
        .unwrap();
    wait_stored(&blob_file(&cache, &a)).await;
    let mut reading = get_blob(&berth, "evict/app", &a).await;
    assert_eq!(reading.headers()["x-berth-cache"], "hit");
    let mut got = reading.chunk().await.unwrap().unwrap().to_vec();
    // B does not fit beside A: A is evicted while the read is open.
    let b_body = get_blob(&berth, "evict/app", &b)
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_digest(&b_body), b);
    assert!(!blob_file(&cache, &a).exists(), "A was evicted");
    while let Some(c) = reading.chunk().await.unwrap() {
        got.extend_from_slice(&c);
    }
    assert_eq!(got.len(), a_bytes.len());
    assert_eq!(
        sha256_digest(&got),
        a,
        "the read that began before eviction completes intact"
    );
    assert!(budgeted(&cache) <= 12 << 20);
}

#[tokio::test]
async fn restart_keeps_objects_and_drops_leftovers() {
    let mut registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "restart/app", "v1", &[50_000, 60_000], 33).await;
    let cache_root = tempfile::tempdir().unwrap();
    let cache = cache_root.path().join("cache");
    let first = Berth::in_front_of(&registry.url())
        .cache_dir(&cache)
        .tag_ttl("0s")
        .start()
        .await;
    let manifest = Client::new()
        .get(format!("{}/v2/restart/app/manifests/v1", first.url()))
        .header("accept", common::content::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), StatusCode::OK);
    for (d, _) in img.blobs() {
        get_blob(&first, "restart/app", d)
            .await
            .bytes()
            .await
            .unwrap();
    }
    first.stop().await;
    // Debris of a crash: an interrupted fill and a file that is not a digest.
    std::fs::write(cache.join("tmp/12345-0-999"), b"partial").unwrap();
    let stray_dir = cache.join("blobs/sha256/zz");
    std::fs::create_dir_all(&stray_dir).unwrap();
    std::fs::write(stray_dir.join("not-a-digest"), b"x").unwrap();

    registry.stop();
    let second = Berth::in_front_of(&registry.url())
        .cache_dir(&cache)
        .tag_ttl("0s")
        .start()
        .await;
    assert!(!cache.join("tmp/12345-0-999").exists(), "leftover deleted");
    assert!(
        !stray_dir.join("not-a-digest").exists(),
        "stray file deleted"
    );
    for (d, bytes) in img.blobs() {
        let resp = get_blob(&second, "restart/app", d).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-berth-cache"], "hit");
        assert_eq!(&resp.bytes().await.unwrap()[..], bytes);
    }
    // The tag mapping survived too: with the origin down it is served stale.
    let resp = Client::new()
        .get(format!("{}/v2/restart/app/manifests/v1", second.url()))
        .header("accept", common::content::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-berth-cache"], "stale");
    assert_eq!(resp.bytes().await.unwrap(), img.manifest_bytes);
}

#[tokio::test]
async fn the_hot_set_survives_a_restart() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let img = push_oci_image(&registry.url(), "hot/app", "v1", &[1_000_000; 6], 34).await;
    let cache_root = tempfile::tempdir().unwrap();
    let cache = cache_root.path().join("cache");
    let start = || {
        Berth::in_front_of(&tap.url())
            .cache_dir(&cache)
            .disk_bytes("3MiB")
            .memory_max_object("0")
            .start()
    };
    let hot = img.layers[0].0.clone();
    let first = start().await;
    // Hot is stored first (the least recent by time) but pulled again and again: once its fill
    // committed (a request that joins the fill is not a hit), two hits protect it.
    get_blob(&first, "hot/app", &hot)
        .await
        .bytes()
        .await
        .unwrap();
    first.settle().await;
    assert!(blob_file(&cache, &hot).is_file());
    for _ in 0..2 {
        let resp = get_blob(&first, "hot/app", &hot).await;
        assert_eq!(resp.headers()["x-berth-cache"], "hit");
        resp.bytes().await.unwrap();
    }
    get_blob(&first, "hot/app", &img.layers[1].0)
        .await
        .bytes()
        .await
        .unwrap();
    first.stop().await;

    let second = start().await;
    // New blobs push others out; the hot one, protected before the restart, stays.
    for (d, _) in &img.layers[2..5] {
        get_blob(&second, "hot/app", d).await.bytes().await.unwrap();
    }
    tap.clear();
    let resp = get_blob(&second, "hot/app", &hot).await;
    assert_eq!(resp.headers()["x-berth-cache"], "hit");
    assert_eq!(sha256_digest(&resp.bytes().await.unwrap()), hot);
    assert_eq!(
        tap.count(|m, _| m == Method::GET),
        0,
        "{:?}",
        tap.requests()
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs failed: the cache tests must run as root"
        );
        Tmpfs { dir }
    }
}

/// A read-only bind mount of a directory over itself: paths under it resolve through the
/// read-only mount (every write fails with EROFS, for root too) while files already open keep
/// working; unmounted (writable again) on drop.
struct ReadOnly {
    path: std::path::PathBuf,
}

impl ReadOnly {
    fn over(path: &Path) -> ReadOnly {
        let mount = |args: &[&str]| {
            let status = std::process::Command::new("mount")
                .args(args)
                .arg(path)
                .arg(path)
                .status()
                .expect("mount runs");
            assert!(
                status.success(),
                "mount {args:?} failed (tests run as root)"
            );
        };
        mount(&["--bind"]);
        let ro = ReadOnly {
            path: path.to_owned(),
        };
        mount(&["-o", "remount,bind,ro"]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_still_serves_and_damages_nothing() {
    let registry = Registry::start().await;
    let img = push_oci_image(
        &registry.url(),
        "full/app",
        "v1",
        &[100_000, 3_000_000, 3_000_000],
        35,
    )
    .await;
    let fs = Tmpfs::mount("2m");
    let cache = fs.dir.path().join("cache");
    // The budget is larger than the filesystem: writes fail with ENOSPC.
    let berth = Berth::in_front_of(&registry.url())
        .cache_dir(&cache)
        .disk_bytes("1GiB")
        .memory_max_object("0")
        .start()
        .await;
    let (small, small_bytes) = img.layers[0].clone();
    assert_eq!(
        &get_blob(&berth, "full/app", &small)
            .await
            .bytes()
            .await
            .unwrap()[..],
        &small_bytes[..]
    );
    wait_stored(&blob_file(&cache, &small)).await;
    for (d, bytes) in &img.layers[1..] {
        // Twice each: the first runs into the full disk mid-fill, the second starts without
        // space at all. Both are served in full from the origin.
        for _ in 0..2 {
            let resp = get_blob(&berth, "full/app", d).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.bytes().await.unwrap();
            assert_eq!(body.len(), bytes.len());
            assert_eq!(sha256_digest(&body), *d);
        }
        assert!(!blob_file(&cache, d).exists());
    }
    // What was cached before is intact and still served from disk.
    let resp = get_blob(&berth, "full/app", &small).await;
    assert_eq!(resp.headers()["x-berth-cache"], "hit");
    assert_eq!(&resp.bytes().await.unwrap()[..], &small_bytes[..]);
    assert_eq!(
        std::fs::read_dir(cache.join("tmp")).unwrap().count(),
        0,
        "no temp files left"
    );
    berth.stop().await;
}

/// The cache directory turns read-only under a running berth (a filesystem remounted `ro` after
/// an error, say): every pull is still served in full from the origin, the failed writes are
/// counted, nothing cached before is lost, and storing resumes once the directory is writable.
#[tokio::test]
async fn a_read_only_cache_directory_still_serves_and_loses_nothing() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "ro/app", "v1", &[100_000, 400_000], 36).await;
    let later = push_oci_image(&registry.url(), "ro/later", "v1", &[50_000], 37).await;
    let berth = Berth::in_front_of(&registry.url())
        .memory_max_object("0")
        .start()
        .await;
    let cache = berth.cache_dir().to_owned();
    let (cached, cached_bytes) = img.layers[0].clone();
    get_blob(&berth, "ro/app", &cached)
        .await
        .bytes()
        .await
        .unwrap();
    wait_stored(&blob_file(&cache, &cached)).await;

    let read_only = ReadOnly::over(&cache);
    let failures = "berth_cache_write_failures_total";
    let before = berth.metric(failures).await;
    let (fresh, fresh_bytes) = img.layers[1].clone();
    for _ in 0..2 {
        let resp = get_blob(&berth, "ro/app", &fresh).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.bytes().await.unwrap();
        assert_eq!(
            &body[..],
            &fresh_bytes[..],
            "served in full from the origin"
        );
    }
    assert!(!blob_file(&cache, &fresh).exists());
    // A manifest that cannot be written is still served (and kept in memory).
    let m = Client::new()
        .get(format!("{}/v2/ro/later/manifests/v1", berth.url()))
        .header("accept", common::content::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), StatusCode::OK);
    assert_eq!(m.bytes().await.unwrap(), later.manifest_bytes);
    assert!(
        berth.metric(failures).await > before,
        "the failed writes are counted"
    );
    // What was cached before is intact and still served from disk.
    let resp = get_blob(&berth, "ro/app", &cached).await;
    assert_eq!(resp.headers()["x-berth-cache"], "hit");
    assert_eq!(&resp.bytes().await.unwrap()[..], &cached_bytes[..]);

    // Writable again: the next pull stores.
    drop(read_only);
    get_blob(&berth, "ro/app", &fresh)
        .await
        .bytes()
        .await
        .unwrap();
    wait_stored(&blob_file(&cache, &fresh)).await;
    assert_eq!(
        std::fs::read(blob_file(&cache, &fresh)).unwrap(),
        fresh_bytes
    );
    berth.stop().await;
}

/// I/O errors injected through the store's interface (as a failing disk would give them):
/// creating a temp file fails, or the last step of a commit does. Every pull is still served in
/// full, the failures are counted, no temp file is left behind, what was cached stays, and
/// storing resumes once the fault clears.
#[tokio::test]
async fn injected_write_errors_serve_in_full_and_leave_nothing_behind() {
    use berth::cache::WriteFault;
    let registry = Registry::start().await;
    let img = push_oci_image(
        &registry.url(),
        "fault/app",
        "v1",
        &[60_000, 300_000, 400_000],
        38,
    )
    .await;
    let other = push_oci_image(&registry.url(), "fault/other", "v1", &[10_000], 39).await;
    let berth = Berth::in_front_of(&registry.url())
        .memory_max_object("0")
        .start()
        .await;
    let cache = berth.cache_dir().to_owned();
    let store = berth.app().cache().store().clone();
    let (kept, kept_bytes) = img.layers[0].clone();
    get_blob(&berth, "fault/app", &kept)
        .await
        .bytes()
        .await
        .unwrap();
    wait_stored(&blob_file(&cache, &kept)).await;
    let failures = "berth_cache_write_failures_total";

    for (fault, (d, bytes)) in [
        (WriteFault::Commit, img.layers[1].clone()),
        (WriteFault::TempFile, img.layers[2].clone()),
    ] {
        store.inject_write_fault(fault);
        let before = berth.metric(failures).await;
        let resp = get_blob(&berth, "fault/app", &d).await;
        assert_eq!(resp.status(), StatusCode::OK, "{fault:?}");
        assert_eq!(&resp.bytes().await.unwrap()[..], &bytes[..], "{fault:?}");
        berth.settle().await;
        assert!(!blob_file(&cache, &d).exists(), "{fault:?}: not stored");
        assert!(
            berth.metric(failures).await > before,
            "{fault:?}: the failed write is counted"
        );
        assert_eq!(
            std::fs::read_dir(cache.join("tmp")).unwrap().count(),
            0,
            "{fault:?}: no temp files left"
        );
    }
    // A manifest whose write fails is still served (and kept in memory).
    let m = Client::new()
        .get(format!("{}/v2/fault/other/manifests/v1", berth.url()))
        .header("accept", common::content::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), StatusCode::OK);
    assert_eq!(m.bytes().await.unwrap(), other.manifest_bytes);
    // What was cached before is intact and still served from disk.
    let resp = get_blob(&berth, "fault/app", &kept).await;
    assert_eq!(resp.headers()["x-berth-cache"], "hit");
    assert_eq!(&resp.bytes().await.unwrap()[..], &kept_bytes[..]);

    store.inject_write_fault(WriteFault::None);
    let (d, bytes) = img.layers[1].clone();
    get_blob(&berth, "fault/app", &d)
        .await
        .bytes()
        .await
        .unwrap();
    wait_stored(&blob_file(&cache, &d)).await;
    assert_eq!(std::fs::read(blob_file(&cache, &d)).unwrap(), bytes);
    berth.stop().await;
}
