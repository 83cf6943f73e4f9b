//! Startup index rebuild: time to open a cache directory holding N objects (default 100,000;
//! `REBUILD_OBJECTS=...` to change), with and without a saved recency snapshot.
//!
//! `cargo bench --bench rebuild`

use std::time::{Duration, Instant};

use berth::cache::Cache;
use berth::config::CacheConfig;
use berth::oci::Digest;

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("REBUILD_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2_000 } else { 100_000 });
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = CacheConfig {
        dir: dir.path().join("cache"),
        disk_bytes: 1 << 40,
        memory_bytes: 1 << 20,
        memory_max_object_bytes: 1 << 10,
        tag_ttl: Duration::from_secs(60),
        tag_ttl_min: Duration::ZERO,
        tag_ttl_max: Duration::from_secs(86_400),
        max_concurrent_fills: 64,
        fill_queue_timeout: Duration::from_secs(60),
        shared: None,
    };
    drop(Cache::open(&cfg).expect("create"));
    let t = Instant::now();
    for i in 0..n {
        let body = format!("object {i}");
        let d = Digest::sha256_of(body.as_bytes());
        let shard = cfg.dir.join("blobs/sha256").join(&d.hex()[..2]);
        std::fs::create_dir_all(&shard).unwrap();
        std::fs::write(shard.join(d.hex()), body).unwrap();
    }
    println!("wrote {n} objects in {:.2?}", t.elapsed());
    for round in ["cold index, no snapshot", "again (page cache warm)"] {
        let t = Instant::now();
        let cache = Cache::open(&cfg).expect("open");
        println!(
            "{round}: indexed {} objects in {:.2?}",
            cache.index().usage().objects,
            t.elapsed()
        );
    }
    let cache = Cache::open(&cfg).expect("open");
    let t = Instant::now();
    cache.save_recency().ok();
    cache
        .store()
        .write_recency(&cache.index().snapshot())
        .unwrap();
    println!("saved recency snapshot in {:.2?}", t.elapsed());
    drop(cache);
    let t = Instant::now();
    let cache = Cache::open(&cfg).expect("open");
    println!(
        "with snapshot: indexed {} objects in {:.2?}",
        cache.index().usage().objects,
        t.elapsed()
    );
}
