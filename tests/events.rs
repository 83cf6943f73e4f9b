//! Push-driven freshness with a real sender: docker-registry's own notifications
//! (`notifications.endpoints`) reach berth's `POST /events` on the admin listener. With a tag
//! lifetime of an hour, repeated pulls by tag send nothing to the origin between pushes, and a
//! push is served as soon as its event arrives; a delete forgets the tag. The endpoint wants
//! its bearer secret, and events never serve anything by themselves.

mod common;

use std::time::{Duration, Instant};

use common::berth::Berth;
use common::content::OCI_MANIFEST;
use common::{push_oci_image, Registry, Tap};
use reqwest::{Client, Method, StatusCode};

const SECRET: &str = "events-secret-5Jq2";

/// The digest berth answers for `repo:tag`.
async fn digest_of(berth: &Berth, repo: &str, tag: &str) -> String {
    let r = Client::new()
        .get(format!("{}/v2/{repo}/manifests/{tag}", berth.url()))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned()
}

fn manifest_requests(tap: &Tap, repo: &str) -> usize {
    tap.count(|_, p| p.starts_with(&format!("/v2/{repo}/manifests/")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_notifications_keep_tags_fresh_without_polling() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("events-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    // berth's admin port must be in the registry's config before either starts.
    let admin_port = common::free_port();
    let registry = Registry::start_with_config(&format!(
        "notifications:\n  endpoints:\n    - name: berth\n      url: http://127.0.0.1:{admin_port}/events?upstream=origin\n      headers:\n        Authorization: [\"Bearer {SECRET}\"]\n      timeout: 2s\n      threshold: 3\n      backoff: 200ms\n"
    ))
    .await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url())
        .tag_ttl("1h")
        .admin(
            &format!("127.0.0.1:{admin_port}"),
            &format!("events_secret_file = \"{}\"", secret_file.display()),
        )
        .start()
        .await;

    let v1 = push_oci_image(&registry.url(), "events/app", "stable", &[2_000], 81).await;
    assert_eq!(
        digest_of(&berth, "events/app", "stable").await,
        v1.manifest_digest
    );
    // Pod starts between pushes: the mapping is fresh for an hour, the origin sees nothing.
    let before = manifest_requests(&tap, "events/app");
    for _ in 0..20 {
        assert_eq!(
            digest_of(&berth, "events/app", "stable").await,
            v1.manifest_digest
        );
    }
    assert_eq!(manifest_requests(&tap, "events/app"), before, "no polling");

    // A push: served as soon as the registry's event lands (measured, printed).
    let v2 = push_oci_image(&registry.url(), "events/app", "stable", &[3_000], 82).await;
    let pushed = Instant::now();
    let deadline = pushed + Duration::from_secs(30);
    while digest_of(&berth, "events/app", "stable").await != v2.manifest_digest {
        assert!(
            Instant::now() < deadline,
            "the push event never made the tag stale"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("pushed tag served {:?} after the push", pushed.elapsed());
    assert!(
        berth
            .metric("berth_events_total{action=\"push\",outcome=\"stale\"}")
            .await
            >= 1.0
    );
    // And fresh again: no more origin requests until the next push.
    let after = manifest_requests(&tap, "events/app");
    for _ in 0..20 {
        assert_eq!(
            digest_of(&berth, "events/app", "stable").await,
            v2.manifest_digest
        );
    }
    assert_eq!(manifest_requests(&tap, "events/app"), after);
    assert!(tap.count(|m, _| m == Method::HEAD) <= 1 + before);
}

#[tokio::test]
async fn the_events_endpoint_wants_its_secret_and_a_registry_event() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("events-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "events/acr", "v1", &[1_000], 83).await;
    let berth = Berth::in_front_of(&registry.url())
        .tag_ttl("1h")
        .admin(
            "127.0.0.1:0",
            &format!("events_secret_file = \"{}\"", secret_file.display()),
        )
        .start()
        .await;
    assert_eq!(
        digest_of(&berth, "events/acr", "v1").await,
        img.manifest_digest
    );
    let url = format!("http://{}/events", berth.admin_addr);
    let acr_delete = r#"{"id":"1","timestamp":"2026-12-04T00:00:00Z","action":"delete","target":{"repository":"events/acr","tag":"v1"}}"#;
    let post = |auth: Option<&str>, body: &str| {
        let mut r = Client::new().post(&url).body(body.to_owned());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        async move { r.send().await.unwrap() }
    };
    assert_eq!(
        post(None, acr_delete).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post(Some("Bearer wrong"), acr_delete).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let bearer = format!("Bearer {SECRET}");
    assert_eq!(
        post(Some(&bearer), "not json").await.status(),
        StatusCode::BAD_REQUEST
    );
    // An ACR webhook deleting the tag: berth forgets its mapping.
    let r = post(Some(&bearer), acr_delete).await;
    assert_eq!(r.status(), StatusCode::OK);
    let applied: serde_json::Value = r.json().await.unwrap();
    assert!(applied["forgotten"].as_u64().unwrap() >= 1, "{applied}");
    let dir_gone = !berth
        .cache_dir()
        .join("tags/origin/events/acr/_tags/v1")
        .exists();
    assert!(dir_gone, "the mapping file is gone");
    // Events are never evidence: nothing is served on their word (the origin still has it).
    assert_eq!(
        digest_of(&berth, "events/acr", "v1").await,
        img.manifest_digest
    );

    // A berth without the secret file answers 404.
    let plain = Berth::in_front_of(&registry.url()).start().await;
    let r = Client::new()
        .post(format!("http://{}/events", plain.admin_addr))
        .header("authorization", &bearer)
        .body(acr_delete)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}
