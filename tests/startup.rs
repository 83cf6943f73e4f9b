//! The admin listener answers while berth is still starting: `/healthz` 200 and `/readyz` 503
//! while the cache is being opened (here: held up by another process's cache lock, as when a
//! pod restarts before the old one let go), then `/readyz` 200 once berth serves.

mod common;

use std::time::Duration;

use common::berth::Berth;
use common::{free_port, Registry};

#[tokio::test(flavor = "multi_thread")]
async fn probes_are_answered_while_the_cache_opens() {
    let registry = Registry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // Hold the cache directory's lock, as a berth still shutting down would.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join("lock"))
        .unwrap();
    lock.lock().unwrap();

    let admin_port = free_port();
    let text = Berth::in_front_of(&registry.url())
        .config_text(&cache)
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\""),
        );
    assert!(text.contains(&format!(":{admin_port}\"")), "{text}");
    let config = berth::Config::from_toml(&text).unwrap();
    let starting = tokio::spawn(berth::start(config, prometheus::Registry::new()));

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{admin_port}{path}");
    // berth binds the admin port before it opens the cache, so this answers while the lock is
    // still held (berth waits up to 5 s for it).
    let mut healthz = None;
    for _ in 0..400 {
        if let Ok(r) = client.get(url("/healthz")).send().await {
            healthz = Some(r.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        healthz,
        Some(reqwest::StatusCode::OK),
        "/healthz while starting"
    );
    let readyz = client.get(url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(readyz.text().await.unwrap(), "starting\n");
    assert!(
        !starting.is_finished(),
        "berth cannot have started: the lock is held"
    );
    let metrics = client.get(url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), reqwest::StatusCode::OK);

    // Let go of the lock: berth finishes starting and the same port reports ready.
    drop(lock);
    let running = starting
        .await
        .unwrap()
        .expect("berth starts once the lock is free");
    assert_eq!(running.admin_addr.map(|a| a.port()), Some(admin_port));
    let readyz = client.get(url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), reqwest::StatusCode::OK);
    running.shutdown().await;
}
