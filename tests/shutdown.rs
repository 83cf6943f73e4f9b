//! `server.shutdown_grace` as README.md promises it, on the real binary: on SIGTERM berth stops
//! accepting at once, `/readyz` answers 503 while in-flight requests drain, a request that
//! finishes within the grace gets its whole body, and one that does not is cut when the grace
//! ends, after which berth exits cleanly.

mod common;

use std::time::Duration;

use common::airgap::{write_config, BerthProcess};
use common::content::sha256_digest;
use common::{push_oci_image, Registry, Tap};
use reqwest::{Method, StatusCode};

const MIB: usize = 1 << 20;

struct Setup {
    _registry: Registry,
    tap: Tap,
    berth: BerthProcess,
    admin: u16,
    digest: String,
    bytes: Vec<u8>,
    _dir: tempfile::TempDir,
}

/// An origin behind a tap, one 4 MiB layer, and `berth serve` with `grace`.
async fn setup(grace: &str) -> Setup {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "drain/app", "v1", &[4 * MIB], 3).await;
    let tap = Tap::start(registry.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir.path().join("berth.toml"),
        &dir.path().join("cache"),
        "1GiB",
        &tap.url(),
        &registry.host(),
    );
    let admin = common::free_port();
    let berth = BerthProcess::serve(
        &config,
        &[
            "--set",
            &format!("admin.listen=127.0.0.1:{admin}"),
            "--set",
            &format!("server.shutdown_grace={grace}"),
        ],
    )
    .await;
    let (digest, bytes) = img.layers[0].clone();
    Setup {
        _registry: registry,
        tap,
        berth,
        admin,
        digest,
        bytes,
        _dir: dir,
    }
}

impl Setup {
    /// Starts a blob GET that waits at the origin (the tap holds it) and returns once the
    /// origin has it.
    async fn held_request(&self) -> tokio::task::JoinHandle<reqwest::Result<bytes::Bytes>> {
        self.tap.hold();
        let url = format!("{}/v2/drain/app/blobs/{}", self.berth.url(), self.digest);
        let request = tokio::spawn(async move {
            let r = reqwest::get(url).await?;
            assert_eq!(r.status(), StatusCode::OK);
            r.bytes().await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self
            .tap
            .count(|m, p| m == Method::GET && p.contains("/blobs/"))
            < 1
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the GET never reached the origin"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        request
    }

    /// Waits until `/readyz` answers 503 "shutting down".
    async fn readyz_goes_unready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = reqwest::get(&url)
                .await
                .expect("admin listener answers while draining");
            if r.status() == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(r.text().await.unwrap(), "shutting down\n");
                return;
            }
            assert_eq!(r.status(), StatusCode::OK);
            assert!(
                std::time::Instant::now() < deadline,
                "/readyz still 200 after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The client port refuses new connections (the listener is dropped right after readiness
    /// turns: wait for it, bounded).
    async fn refuses_new_connections(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.berth.port)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the client listener still accepts 20 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_drain_while_new_ones_are_refused() {
    let mut s = setup("30s").await;
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", s.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let request = s.held_request().await;

    s.berth.terminate();
    s.readyz_goes_unready().await;
    s.refuses_new_connections().await;
    // The process is still there, draining: the in-flight request completes in full.
    s.tap.release();
    let body = request
        .await
        .unwrap()
        .expect("the drained request completes");
    assert_eq!(sha256_digest(&body), s.digest);
    assert_eq!(body.len(), s.bytes.len());
    let status = s.berth.wait_exit(30).await;
    assert!(status.success(), "{status}: {}", s.berth.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_grace_is_cut_and_berth_exits() {
    let mut s = setup("1s").await;
    let request = s.held_request().await;
    s.berth.terminate();
    s.readyz_goes_unready().await;
    // The origin never answers: after the 1 s grace berth drops the connection and exits.
    let status = s.berth.wait_exit(30).await;
    assert!(status.success(), "{status}: {}", s.berth.log());
    let outcome = request.await.unwrap();
    assert!(
        outcome.is_err(),
        "a request cut by the end of the grace is not a complete body"
    );
    assert!(
        s.berth.log().contains("grace"),
        "the cut is logged: {}",
        s.berth.log()
    );
    s.tap.release();
}
