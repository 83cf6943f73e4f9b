//! berth in front of a [`FaultUpstream`]: the origin failures a real registry cannot produce on
//! demand. Corrupt, truncated, reset and stalled transfers must never reach a client as a
//! complete body nor land in the cache; errors come back quickly as OCI JSON; redirects never
//! carry credentials to another host; one held fill streams to every waiting client; stale
//! manifests are served when the origin fails, never when it says the tag is gone; fills past
//! `cache.max_concurrent_fills` wait their turn; a Range answered during a fill is counted as
//! unverified and never stored.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::berth::Berth;
use common::content::{pseudo_random, sha256_digest, test_manifest, OCI_MANIFEST};
use common::fault::{Fault, FaultUpstream, Listener, RETRY_AFTER_SECS};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

const REPO: &str = "fault/app";
const MIB: usize = 1 << 20;
/// The counter of content that failed verification (docs/ARCHITECTURE.md, "Operations").
const MISMATCHES: &str = "berth_digest_mismatches_total";

/// A fake origin and berth (default settings) in front of it.
async fn setup() -> (FaultUpstream, Berth) {
    let fault = FaultUpstream::start().await;
    let berth = Berth::in_front_of(&fault.url()).start().await;
    (fault, berth)
}

/// `fut`, or a panic naming `what` if it takes longer than `secs` (a hang is a failure).
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {secs}s"))
}

async fn get(url: &str, accept: &[&str]) -> reqwest::Response {
    let mut req = Client::new().get(url);
    for a in accept {
        req = req.header("accept", *a);
    }
    within(30, url, req.send()).await.expect("request")
}

fn blob_url(berth: &Berth, digest: &str) -> String {
    format!("{}/v2/{REPO}/blobs/{digest}", berth.url())
}

fn manifest_url(berth: &Berth, reference: &str) -> String {
    format!("{}/v2/{REPO}/manifests/{reference}", berth.url())
}

/// The status and OCI code of an error answer, checking it is the spec's JSON shape.
async fn error_code(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "errors are JSON ({status})"
    );
    let v: Value = resp.json().await.expect("JSON error body");
    let code = v["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_owned();
    assert!(v["errors"][0]["message"].is_string(), "{v}");
    (status, code)
}

/// A blob GET served whole: 200, the right digest, `x-berth-cache: cache`, exact bytes.
async fn expect_blob(url: &str, bytes: &[u8], cache: &str) {
    let resp = get(url, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK, "{url}");
    assert_eq!(resp.headers()["x-berth-cache"], cache, "{url}");
    assert_eq!(
        resp.headers()["docker-content-digest"],
        sha256_digest(bytes).as_str()
    );
    let body = within(30, url, resp.bytes()).await.expect("whole body");
    assert_eq!(body.len(), bytes.len());
    assert!(body == bytes, "{url}: wrong bytes");
}

/// A blob GET after an upstream fault: either an error answer (5xx, OCI JSON) or a 200 whose
/// body breaks off (a connection error). Never a complete body.
async fn expect_failed_blob(url: &str) {
    let resp = within(30, url, Client::new().get(url).send()).await;
    let resp = match resp {
        Ok(r) => r,
        // The connection dropped before a response head: also a clear failure.
        Err(_) => return,
    };
    let status = resp.status();
    if status != StatusCode::OK {
        assert!(status.is_server_error(), "{url}: {status}");
        error_code(resp).await;
        return;
    }
    let declared = resp.content_length();
    match within(30, url, resp.bytes()).await {
        Err(_) => {}
        Ok(body) => assert!(
            declared.is_some_and(|d| (body.len() as u64) < d),
            "{url}: a complete body of {} bytes (Content-Length {declared:?}) after an upstream fault",
            body.len()
        ),
    }
}

/// Every file below `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Blob `digest` is not committed and no temp file is left behind.
async fn assert_not_stored(cache_dir: &Path, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    let blobs = files_under(&cache_dir.join("blobs"));
    assert!(
        !blobs.iter().any(|p| p.ends_with(hex)),
        "{digest} was stored: {blobs:?}"
    );
    // A fill that succeeded just before may still be renaming its temp file into place (clients
    // get the verified last bytes before the fsync): wait for it without blocking the runtime
    // berth itself runs on.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut temps = files_under(&cache_dir.join("tmp"));
    while !temps.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        temps = files_under(&cache_dir.join("tmp"));
    }
    assert!(temps.is_empty(), "temp files left behind: {temps:?}");
}

/// The sum of every sample of the counter `name` in Prometheus text (0 when absent).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let matches = key == name || key.starts_with(&format!("{name}{{"));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .fold(0.0, |sum, v| sum + v)
}

/// Reads `resp` until at least `want` bytes arrived; panics (naming how many did) if they do
/// not arrive within 10 s.
async fn read_at_least(resp: &mut reqwest::Response, want: usize, who: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < want {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => got.extend_from_slice(&chunk),
            Ok(Ok(None)) => panic!("{who}: body ended after {} bytes", got.len()),
            Ok(Err(e)) => panic!("{who}: body failed after {} bytes: {e}", got.len()),
            Err(_) => panic!(
                "{who}: only {} of the {want} bytes the origin already sent reached the client \
                 within 10s (the origin is holding the rest)",
                got.len()
            ),
        }
    }
    got
}

/// Reads the rest of `resp` after `start`.
async fn read_rest(resp: reqwest::Response, mut start: Vec<u8>, who: &str) -> Vec<u8> {
    let rest = within(30, who, resp.bytes()).await.expect("rest of body");
    start.extend_from_slice(&rest);
    start
}

#[tokio::test]
async fn corrupt_blob_is_never_served_complete_nor_stored() {
    let (fault, berth) = setup().await;
    let mut seen = metric_sum(&berth.metrics().await, MISMATCHES);
    // Smaller than one fill chunk (all bytes land at once) and several chunks long.
    for (seed, len) in [(1, 1_000), (2, 600_000)] {
        let bytes = pseudo_random(seed, len);
        let digest = fault.add_blob(bytes.clone());
        fault.set_blob_fault(&digest, Fault::Corrupt);
        let url = blob_url(&berth, &digest);
        expect_failed_blob(&url).await;
        assert_eq!(fault.blob_gets(&digest), 1, "{len} bytes");
        assert_not_stored(berth.cache_dir(), &digest).await;
        let now = metric_sum(&berth.metrics().await, MISMATCHES);
        assert!(now > seen, "{len} bytes: {MISMATCHES} stayed at {now}");
        seen = now;

        fault.set_blob_fault(&digest, Fault::None);
        expect_blob(&url, &bytes, "miss").await;
        assert_eq!(fault.blob_gets(&digest), 2, "a failed fill is refetched");
        expect_blob(&url, &bytes, "hit").await;
        assert_eq!(fault.blob_gets(&digest), 2, "then served from the cache");
    }
}

#[tokio::test]
async fn truncated_and_reset_transfers_are_not_stored_and_are_refetched() {
    let (fault, berth) = setup().await;
    let cases = [
        (10, Fault::Truncate(300_000)),
        (11, Fault::Truncate(0)),
        (12, Fault::Reset),
    ];
    for (seed, f) in cases {
        let bytes = pseudo_random(seed, 600_000);
        let digest = fault.add_blob(bytes.clone());
        fault.set_blob_fault(&digest, f.clone());
        let url = blob_url(&berth, &digest);
        expect_failed_blob(&url).await;
        let tries = fault.blob_gets(&digest);
        assert!(tries >= 1, "{f:?}");
        assert_not_stored(berth.cache_dir(), &digest).await;

        fault.set_blob_fault(&digest, Fault::None);
        expect_blob(&url, &bytes, "miss").await;
        assert_eq!(fault.blob_gets(&digest), tries + 1, "{f:?}: one fresh GET");
        expect_blob(&url, &bytes, "hit").await;
        assert_eq!(fault.blob_gets(&digest), tries + 1, "{f:?}: then cached");
    }
}

#[tokio::test]
async fn origin_errors_come_back_quickly_as_oci_errors() {
    let (fault, berth) = setup().await;
    for (seed, status) in [(20, 500), (21, 503), (22, 429)] {
        let bytes = pseudo_random(seed, 10_000);
        let digest = fault.add_blob(bytes.clone());
        fault.set_blob_fault(&digest, Fault::Status(status));
        let manifest = test_manifest(seed);
        let tag = format!("t{status}");
        fault.add_manifest(REPO, &tag, OCI_MANIFEST, manifest);
        fault.set_manifest_fault(REPO, &tag, Fault::Status(status));

        for url in [blob_url(&berth, &digest), manifest_url(&berth, &tag)] {
            let before = fault.requests().len();
            // "Quickly" is counted, not timed: berth gives up after a bounded number of origin
            // requests (no retry loop the client waits out). The timeout only guards a hang.
            let resp = within(30, &url, get(&url, &[OCI_MANIFEST])).await;
            let retry_after = resp.headers().get("retry-after").cloned();
            let (got, code) = error_code(resp).await;
            let asked = fault.requests().len() - before;
            assert!(
                (1..=3).contains(&asked),
                "{url}: {asked} origin requests for one client request"
            );
            if status == 429 {
                assert_eq!(
                    (got, code.as_str()),
                    (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
                    "{url}"
                );
                assert_eq!(
                    retry_after.as_ref().map(|v| v.to_str().unwrap()),
                    Some(RETRY_AFTER_SECS),
                    "{url}: Retry-After passed on"
                );
            } else {
                assert!(
                    got == StatusCode::BAD_GATEWAY || got == StatusCode::SERVICE_UNAVAILABLE,
                    "{url}: origin {status} answered as {got} {code}"
                );
            }
            if status == 503 {
                assert_eq!(
                    retry_after.as_ref().map(|v| v.to_str().unwrap()),
                    Some(RETRY_AFTER_SECS),
                    "{url}: a 503's Retry-After passed on"
                );
            }
        }
        assert_not_stored(berth.cache_dir(), &digest).await;
        fault.set_blob_fault(&digest, Fault::None);
        expect_blob(&blob_url(&berth, &digest), &bytes, "miss").await;
    }
}

#[tokio::test]
async fn redirects_are_followed_without_credentials() {
    let (fault, berth) = setup().await;
    fault.require_bearer("origin-only-token");
    let bytes = pseudo_random(30, 300_000);
    let digest = fault.add_blob(bytes.clone());
    fault.set_blob_fault(&digest, Fault::Redirect);
    let url = blob_url(&berth, &digest);
    expect_blob(&url, &bytes, "miss").await;

    let log = fault.requests();
    let storage: Vec<_> = log
        .iter()
        .filter(|r| r.listener == Listener::Redirect)
        .collect();
    assert_eq!(storage.len(), 1, "{log:?}");
    assert!(
        !storage[0].authorization,
        "the redirect target (another host:port) received the origin's Authorization: {log:?}"
    );
    assert!(
        fault.count(|r| r.listener == Listener::Origin
            && r.method == Method::GET
            && r.path.contains("/blobs/")
            && r.authorization)
            >= 1,
        "berth authenticated at the origin: {log:?}"
    );
    assert!(
        fault.count(|r| r.path.starts_with("/token")) >= 1,
        "{log:?}"
    );
    fault.clear();
    expect_blob(&url, &bytes, "hit").await;
    assert!(fault.requests().is_empty(), "{:?}", fault.requests());
}

#[tokio::test]
async fn a_held_fill_streams_to_every_waiting_client() {
    let (fault, berth) = setup().await;
    let bytes = pseudo_random(40, 2 * MIB);
    let digest = fault.add_blob(bytes.clone());
    fault.set_blob_fault(&digest, Fault::Hold(MIB));
    let url = blob_url(&berth, &digest);

    let client = Client::new();
    let mut a = within(10, "first client", client.get(&url).send())
        .await
        .expect("first GET");
    let mut b = within(10, "second client", client.get(&url).send())
        .await
        .expect("second GET");
    for r in [&a, &b] {
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.content_length(), Some(bytes.len() as u64));
    }
    // The origin is holding its second half: what both clients get now came as it arrived.
    let got_a = read_at_least(&mut a, MIB, "first client").await;
    let got_b = read_at_least(&mut b, MIB, "second client").await;
    assert_eq!(fault.blob_gets(&digest), 1, "{:?}", fault.requests());

    fault.release();
    let (all_a, all_b) = tokio::join!(
        read_rest(a, got_a, "first client"),
        read_rest(b, got_b, "second client")
    );
    assert_eq!(sha256_digest(&all_a), digest);
    assert_eq!(sha256_digest(&all_b), digest);
    assert_eq!(fault.blob_gets(&digest), 1);
    expect_blob(&url, &bytes, "hit").await;
}

/// A stall mid-body must not hide the bytes that did arrive.
#[tokio::test]
async fn bytes_already_received_reach_the_client_while_the_origin_stalls() {
    let (fault, berth) = setup().await;
    let bytes = pseudo_random(45, MIB);
    let digest = fault.add_blob(bytes.clone());
    // Less than any batch a fill might collect before writing: docs/ARCHITECTURE.md "Cache" says waiting clients
    // receive bytes as they arrive, so these must reach the client while the origin stalls.
    let sent = 100_000;
    fault.set_blob_fault(&digest, Fault::Hold(sent));
    let url = blob_url(&berth, &digest);
    let mut resp = get(&url, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let got = read_at_least(&mut resp, sent, "client").await;
    fault.release();
    let all = read_rest(resp, got, "client").await;
    assert_eq!(sha256_digest(&all), digest);
}

/// A fill is no evidence for another repository: while one that a pull from `REPO` started is
/// held mid-body, a HEAD or GET of the same digest in a repository whose origin does not hold
/// it is refused, with none of its bytes, and the first client still gets the whole blob.
#[tokio::test]
async fn a_running_fill_is_not_evidence_for_another_repository() {
    let (fault, berth) = setup().await;
    let bytes = pseudo_random(170, 2 * MIB);
    let digest = fault.add_blob(bytes.clone());
    fault.set_blob_fault(&digest, Fault::Hold(MIB));
    fault.set_repo_blob_fault("other/app", &digest, Fault::Status(404));
    let url = |repo: &str| format!("http://{}/v2/{repo}/blobs/{digest}", berth.addr);

    let mut first = get(&url(REPO), &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    within(10, "origin holding", fault.wait_held(1)).await;
    let head = read_at_least(&mut first, 1, "first client").await;
    for method in [Method::HEAD, Method::GET] {
        let resp = within(
            30,
            "the other repository",
            Client::new()
                .request(method.clone(), url("other/app"))
                .send(),
        )
        .await
        .unwrap();
        let status = resp.status();
        let body = resp.bytes().await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} other/app");
        assert!(
            !body.windows(64).any(|w| w == &bytes[..64]),
            "{method} other/app got blob bytes"
        );
    }
    fault.release();
    let all = read_rest(first, head, "first client").await;
    assert_eq!(sha256_digest(&all), digest);
}

#[tokio::test]
async fn a_fill_outlives_the_client_that_started_it() {
    let (fault, berth) = setup().await;
    let bytes = pseudo_random(50, 2 * MIB);
    let digest = fault.add_blob(bytes.clone());
    fault.set_blob_fault(&digest, Fault::Hold(MIB));
    let url = blob_url(&berth, &digest);

    let mut first = get(&url, &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    within(10, "origin holding", fault.wait_held(1)).await;
    within(10, "first bytes", first.chunk())
        .await
        .expect("first chunk")
        .expect("some bytes");
    drop(first);

    let second = get(&url, &[]).await;
    assert_eq!(second.status(), StatusCode::OK);
    fault.release();
    let body = within(30, "second client", second.bytes())
        .await
        .expect("second body");
    assert_eq!(sha256_digest(&body), digest);

    expect_blob(&url, &bytes, "hit").await;
    assert_eq!(fault.blob_gets(&digest), 1, "{:?}", fault.requests());
}

#[tokio::test]
async fn first_byte_and_idle_timeouts() {
    let fault = FaultUpstream::start().await;
    let berth = Berth::with_upstreams(&format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{}\"\ndefault = true\nauth = \"public\"\nconnect_timeout = \"2s\"\nfirst_byte_timeout = \"1s\"\nidle_timeout = \"1s\"\n",
        fault.url()
    ))
    .start()
    .await;

    // No response head within first_byte_timeout: 504, for blobs and manifests alike.
    // The origin stalls for an hour: any answer at all comes from berth's timeout, however
    // loaded the machine (the outer timeout only turns a hang into a failure).
    let stalled = fault.add_blob(pseudo_random(60, 10_000));
    fault.set_blob_fault(&stalled, Fault::Stall(Duration::from_secs(3600)));
    fault.add_manifest(REPO, "stalled", OCI_MANIFEST, test_manifest(60));
    fault.set_manifest_fault(REPO, "stalled", Fault::Stall(Duration::from_secs(3600)));
    for url in [blob_url(&berth, &stalled), manifest_url(&berth, "stalled")] {
        let resp = within(60, &url, get(&url, &[OCI_MANIFEST])).await;
        let (status, _) = error_code(resp).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{url}");
    }

    // The body stops for longer than idle_timeout: the transfer is aborted, nothing stored.
    let bytes = pseudo_random(61, 600_000);
    let idle = fault.add_blob(bytes.clone());
    fault.set_blob_fault(
        &idle,
        Fault::StallBody {
            after: 300_000,
            pause: Duration::from_secs(3600),
        },
    );
    // The body pauses for an hour: only berth's idle timeout can end the transfer.
    within(
        60,
        "idle stall",
        expect_failed_blob(&blob_url(&berth, &idle)),
    )
    .await;
    assert_not_stored(berth.cache_dir(), &idle).await;

    // Slow but never idle for a whole idle_timeout: the idle timeout is not a deadline.
    let bytes = pseudo_random(62, 600_000);
    let slow = fault.add_blob(bytes.clone());
    fault.set_blob_fault(
        &slow,
        Fault::Slow {
            chunk: 50_000,
            delay: Duration::from_millis(250),
        },
    );
    expect_blob(&blob_url(&berth, &slow), &bytes, "miss").await;
}

#[tokio::test]
async fn manifest_digest_mismatches_are_refused_and_counted() {
    let (fault, berth) = setup().await;
    let manifest = test_manifest(70);
    let digest = fault.add_manifest(REPO, "v1", OCI_MANIFEST, manifest.clone());
    let mismatches = |text: &str| metric_sum(text, MISMATCHES);
    let mut seen = mismatches(&berth.metrics().await);

    // By tag: the bytes are right, the origin's Docker-Content-Digest is not theirs. By
    // digest: flipped bytes (the headers still name the digest asked for), and another
    // manifest entirely under headers honest about it (only the requested digest exposes it).
    let cases = [
        ("v1", Fault::WrongDigestHeader),
        (digest.as_str(), Fault::Corrupt),
        (digest.as_str(), Fault::Replace(test_manifest(71).into())),
    ];
    for (reference, f) in cases {
        fault.set_manifest_fault(REPO, reference, f.clone());
        let resp = get(&manifest_url(&berth, reference), &[OCI_MANIFEST]).await;
        let (status, _) = error_code(resp).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{reference} {f:?}");
        let now = mismatches(&berth.metrics().await);
        assert!(
            now > seen,
            "{reference} {f:?}: berth_digest_mismatches_total stayed {now}"
        );
        seen = now;
        fault.set_manifest_fault(REPO, reference, Fault::None);
    }

    // Nothing bad was cached: the healed origin is asked again and its bytes served.
    for reference in ["v1", digest.as_str()] {
        let resp = get(&manifest_url(&berth, reference), &[OCI_MANIFEST]).await;
        assert_eq!(resp.status(), StatusCode::OK, "{reference}");
        assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
        assert_eq!(resp.bytes().await.unwrap(), manifest);
    }
}

#[tokio::test]
async fn stale_manifests_on_origin_failure_but_not_after_a_404() {
    let fault = FaultUpstream::start().await;
    let berth = Berth::in_front_of(&fault.url()).tag_ttl("0s").start().await;
    let manifest = test_manifest(80);
    let digest = fault.add_manifest(REPO, "v1", OCI_MANIFEST, manifest.clone());
    let url = manifest_url(&berth, "v1");
    let resp = get(&url, &[OCI_MANIFEST]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap(), manifest);

    for status in [503, 500, 429] {
        fault.set_fault(Fault::Status(status));
        let resp = get(&url, &[OCI_MANIFEST]).await;
        assert_eq!(resp.status(), StatusCode::OK, "origin {status}");
        assert_eq!(resp.headers()["x-berth-cache"], "stale", "origin {status}");
        assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
        assert_eq!(resp.bytes().await.unwrap(), manifest);
    }

    // The origin says the tag is gone: that is an answer, not a failure.
    fault.set_fault(Fault::Status(503));
    fault.set_manifest_fault(REPO, "v1", Fault::Status(404));
    let resp = get(&url, &[OCI_MANIFEST]).await;
    let (status, code) = error_code(resp).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    // And a later outage does not bring the deleted tag back.
    fault.set_manifest_fault(REPO, "v1", Fault::None);
    let resp = get(&url, &[OCI_MANIFEST]).await;
    let (status, _) = error_code(resp).await;
    assert!(status.is_server_error(), "{status}");
}

/// berth with a disk budget smaller than the test blobs, so they are passed through and never
/// stored; started by hand since the harness builder has no knob for the budget.
async fn start_with_tiny_disk(origin: &str) -> (berth::Running, tempfile::TempDir) {
    start_with_cache(origin, "disk_bytes = \"100KiB\"\n").await
}

/// berth with extra `[cache]` lines, started by hand (the harness builder has no knob for them).
async fn start_with_cache(origin: &str, cache: &str) -> (berth::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[cache]\ndir = \"{}\"\n{cache}[[upstream]]\nname = \"origin\"\nurl = \"{origin}\"\ndefault = true\nauth = \"public\"\n",
        dir.path().join("cache").display()
    );
    let config = berth::Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
    let running = berth::start(config, prometheus::Registry::new())
        .await
        .expect("berth starts");
    (running, dir)
}

#[tokio::test]
async fn passed_through_blobs_are_still_verified() {
    let fault = FaultUpstream::start().await;
    let (running, dir) = start_with_tiny_disk(&fault.url()).await;
    let cache_dir = dir.path().join("cache");
    let bytes = pseudo_random(90, 600_000);
    let digest = fault.add_blob(bytes.clone());
    let url = format!("http://{}/v2/{REPO}/blobs/{digest}", running.addr);

    let metrics = || async {
        let admin = running.admin_addr.expect("admin listener");
        let text = reqwest::get(format!("http://{admin}/metrics")).await;
        metric_sum(&text.unwrap().text().await.unwrap(), MISMATCHES)
    };
    let mut counted = None;
    for f in [Fault::Corrupt, Fault::Truncate(400_000)] {
        fault.set_blob_fault(&digest, f.clone());
        let before = fault.blob_gets(&digest);
        let seen = metrics().await;
        expect_failed_blob(&url).await;
        assert_eq!(fault.blob_gets(&digest), before + 1, "{f:?}");
        assert_not_stored(&cache_dir, &digest).await;
        if f == Fault::Corrupt {
            counted = Some((seen, metrics().await));
        }
    }
    // Healed: served whole and right, every time from the origin (it does not fit).
    fault.set_blob_fault(&digest, Fault::None);
    for _ in 0..2 {
        let before = fault.blob_gets(&digest);
        expect_blob(&url, &bytes, "miss").await;
        assert_eq!(fault.blob_gets(&digest), before + 1);
    }
    assert_not_stored(&cache_dir, &digest).await;
    // The corrupt pass-through counts as a digest mismatch like a corrupt fill does.
    let (before, after) = counted.expect("corrupt case ran");
    assert!(
        after > before,
        "{MISMATCHES} stayed at {after} after a corrupt pass-through"
    );
    running.shutdown().await;
}

/// The fake itself, checked directly: a fault that silently did nothing would let every test
/// above pass for the wrong reason.
#[tokio::test]
async fn the_fault_upstream_does_what_it_says() {
    let fault = FaultUpstream::start().await;
    let bytes = pseudo_random(100, 200_000);
    let digest = fault.add_blob(bytes.clone());
    let manifest = test_manifest(100);
    let manifest_digest = fault.add_manifest(REPO, "v1", OCI_MANIFEST, manifest.clone());
    let client = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let blob = format!("{}/v2/{REPO}/blobs/{digest}", fault.url());
    let send = |method: Method, url: String| {
        let req = client.request(method, url);
        async move { within(10, "fake", req.send()).await }
    };

    let r = send(Method::GET, blob.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(r.bytes().await.unwrap(), bytes);
    let r = send(Method::HEAD, blob.clone()).await.unwrap();
    assert_eq!(
        r.headers()["content-length"],
        bytes.len().to_string().as_str()
    );
    for reference in ["v1", manifest_digest.as_str()] {
        let url = format!("{}/v2/{REPO}/manifests/{reference}", fault.url());
        let r = send(Method::GET, url).await.unwrap();
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(
            r.headers()["docker-content-digest"],
            manifest_digest.as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), manifest);
    }

    fault.set_blob_fault(&digest, Fault::Corrupt);
    let body = send(Method::GET, blob.clone()).await.unwrap().bytes().await;
    let body = body.unwrap();
    assert_eq!(body.len(), bytes.len());
    assert_ne!(body, bytes);
    fault.set_blob_fault(&digest, Fault::Truncate(1000));
    let mut r = send(Method::GET, blob.clone()).await.unwrap();
    assert_eq!(r.content_length(), Some(bytes.len() as u64));
    let mut got = 0;
    loop {
        match within(10, "truncated", r.chunk()).await {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => panic!("a truncated body completed"),
            Err(_) => break,
        }
    }
    assert_eq!(got, 1000, "bytes before the cut");
    fault.set_blob_fault(&digest, Fault::Reset);
    assert!(send(Method::GET, blob.clone()).await.is_err());
    fault.set_blob_fault(&digest, Fault::WrongDigestHeader);
    let r = send(Method::GET, blob.clone()).await.unwrap();
    assert_ne!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(r.bytes().await.unwrap(), bytes);
    fault.set_fault(Fault::Status(429));
    fault.set_blob_fault(&digest, Fault::None);
    let r = send(
        Method::GET,
        format!("{}/v2/{REPO}/manifests/v1", fault.url()),
    )
    .await
    .unwrap();
    assert_eq!(r.headers()["retry-after"], RETRY_AFTER_SECS);
    assert_eq!(
        error_code(r).await,
        (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS".to_owned())
    );
    fault.clear_faults();

    fault.set_blob_fault(&digest, Fault::Hold(1000));
    let mut r = send(Method::GET, blob.clone()).await.unwrap();
    let first = read_at_least(&mut r, 1000, "held").await;
    within(10, "held", fault.wait_held(1)).await;
    fault.release();
    assert_eq!(read_rest(r, first, "held").await, bytes);

    fault.require_bearer("t0k");
    fault.set_blob_fault(&digest, Fault::Redirect);
    let r = send(Method::GET, blob.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"{}/token\",service=\"fault\",scope=\"repository:{REPO}:pull\"",
            fault.url()
        )
    );
    let token: Value = send(Method::GET, format!("{}/token", fault.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(token["token"], "t0k");
    let r = within(10, "fake", client.get(&blob).bearer_auth("t0k").send())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&fault.redirect_url()), "{location}");
    assert_ne!(fault.redirect_url(), fault.url());
    assert_eq!(
        send(Method::GET, location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        bytes
    );
    let last = fault.requests().pop().unwrap();
    assert_eq!(last.listener, Listener::Redirect);
    assert!(!last.authorization);

    // Corrupt and held at once (a fresh fake: the gates above are open for good).
    let fresh = FaultUpstream::start().await;
    let digest = fresh.add_blob(bytes.clone());
    fresh.set_blob_fault(&digest, Fault::CorruptHold(150_000));
    let url = format!("{}/v2/{REPO}/blobs/{digest}", fresh.url());
    let mut r = send(Method::GET, url).await.unwrap();
    assert_eq!(r.content_length(), Some(bytes.len() as u64));
    let first = read_at_least(&mut r, 150_000, "corrupt held").await;
    within(10, "corrupt held", fresh.wait_held(1)).await;
    fresh.release();
    let all = read_rest(r, first, "corrupt held").await;
    assert_eq!(all.len(), bytes.len());
    let diff: Vec<usize> = (0..all.len()).filter(|&i| all[i] != bytes[i]).collect();
    assert_eq!(
        diff,
        vec![bytes.len() / 2],
        "exactly the middle byte flipped"
    );
}

/// The cache engine's headline: 32 clients ask for one missing blob at once; the origin sees one
/// GET, and every client is streamed the bytes that arrived while the origin still holds the rest.
#[tokio::test]
async fn thirty_two_concurrent_misses_make_one_upstream_get_and_all_stream() {
    let (fault, berth) = setup().await;
    let bytes = pseudo_random(60, 4 * MIB);
    let digest = fault.add_blob(bytes.clone());
    fault.set_blob_fault(&digest, Fault::Hold(2 * MIB));
    let url = blob_url(&berth, &digest);
    let client = Client::new();
    let mut responses = Vec::new();
    for _ in 0..32 {
        let r = within(10, "client", client.get(&url).send())
            .await
            .expect("GET");
        assert_eq!(r.status(), StatusCode::OK);
        responses.push(r);
    }
    let mut partial = Vec::new();
    for r in responses.iter_mut() {
        partial.push(read_at_least(r, 2 * MIB, "client").await);
    }
    assert_eq!(fault.blob_gets(&digest), 1, "{:?}", fault.requests());
    fault.release();
    let rests = responses
        .into_iter()
        .zip(partial)
        .map(|(r, got)| tokio::spawn(read_rest(r, got, "client")));
    for t in rests {
        assert_eq!(sha256_digest(&t.await.unwrap()), digest);
    }
    assert_eq!(fault.blob_gets(&digest), 1);
    expect_blob(&url, &bytes, "hit").await;
}

/// A Range on a blob that is not cached is answered from the single fill as soon as its bytes
/// have arrived, not after the whole blob and not by a second upstream fetch.
#[tokio::test]
async fn a_range_on_a_missing_blob_is_served_as_its_bytes_arrive() {
    let (fault, berth) = setup().await;
    let bytes = pseudo_random(61, 2 * MIB);
    let digest = fault.add_blob(bytes.clone());
    fault.set_blob_fault(&digest, Fault::Hold(MIB));
    let url = blob_url(&berth, &digest);
    let client = Client::new();
    // Inside the part the origin sent: complete while it still holds the rest.
    let early = within(
        10,
        "early range",
        client.get(&url).header("range", "bytes=1000-1999").send(),
    )
    .await
    .expect("GET");
    assert_eq!(early.status(), StatusCode::PARTIAL_CONTENT);
    let body = within(10, "early range body", early.bytes())
        .await
        .expect("body");
    assert_eq!(&body[..], &bytes[1000..2000]);
    // Past it: the head comes now, the bytes when the origin sends them.
    let late = within(
        10,
        "late range",
        client.get(&url).header("range", "bytes=1500000-").send(),
    )
    .await
    .expect("GET");
    assert_eq!(late.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        late.headers()["content-range"],
        format!("bytes 1500000-{}/{}", bytes.len() - 1, bytes.len()).as_str()
    );
    fault.release();
    let body = within(30, "late range body", late.bytes())
        .await
        .expect("body");
    assert_eq!(&body[..], &bytes[1_500_000..]);
    assert_eq!(fault.blob_gets(&digest), 1, "{:?}", fault.requests());
}

/// The admin listener's `/metrics` text of a berth started by hand.
async fn metrics_of(running: &berth::Running) -> String {
    let admin = running.admin_addr.expect("admin listener");
    let resp = within(
        10,
        "metrics",
        reqwest::get(format!("http://{admin}/metrics")),
    )
    .await;
    resp.expect("metrics reachable")
        .text()
        .await
        .expect("metrics body")
}

/// Polls `/metrics` until the sample sum of `name` satisfies `ok` (a hang is a failure).
async fn wait_metric(running: &berth::Running, name: &str, ok: impl Fn(f64) -> bool) {
    within(10, name, async {
        loop {
            if ok(metric_sum(&metrics_of(running).await, name)) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// With one fill slot, a second cold blob waits until the first fill is done: its origin GET is
/// not sent while the first is held, later requests for it join the waiting fill, and every
/// client gets the right bytes once the slot frees.
#[tokio::test]
async fn fills_past_the_cap_wait_for_a_slot_and_still_coalesce() {
    let fault = FaultUpstream::start().await;
    let (running, _dir) = start_with_cache(&fault.url(), "max_concurrent_fills = 1\n").await;
    let url = |d: &str| format!("http://{}/v2/{REPO}/blobs/{d}", running.addr);
    let first_bytes = pseudo_random(110, 2 * MIB);
    let first = fault.add_blob(first_bytes.clone());
    fault.set_blob_fault(&first, Fault::Hold(MIB));
    let second_bytes = pseudo_random(111, 300_000);
    let second = fault.add_blob(second_bytes.clone());

    let client = Client::new();
    let mut a = within(10, "first blob", client.get(url(&first)).send())
        .await
        .expect("GET");
    assert_eq!(a.status(), StatusCode::OK);
    within(10, "origin holds the first blob", fault.wait_held(1)).await;
    let got_a = read_at_least(&mut a, MIB, "first blob").await;

    let fetch = |u: String| {
        let client = client.clone();
        tokio::spawn(async move {
            let resp = client.get(&u).send().await.expect("GET");
            assert_eq!(resp.status(), StatusCode::OK);
            resp.bytes().await.expect("body")
        })
    };
    let b1 = fetch(url(&second));
    wait_metric(&running, "berth_fills_queued", |n| n == 1.0).await;
    let waiters = metric_sum(&metrics_of(&running).await, "berth_fill_waiters_total");
    let b2 = fetch(url(&second));
    wait_metric(&running, "berth_fill_waiters_total", |n| n > waiters).await;
    let text = metrics_of(&running).await;
    assert_eq!(
        metric_sum(&text, "berth_fills_queued"),
        1.0,
        "the second request joined the queued fill instead of queueing another"
    );
    assert_eq!(
        fault.blob_gets(&second),
        0,
        "a queued fill fetched while the only slot was taken: {:?}",
        fault.requests()
    );

    fault.release();
    let all_a = read_rest(a, got_a, "first blob").await;
    assert!(all_a == first_bytes, "first blob: wrong bytes");
    for b in [b1, b2] {
        let body = within(30, "second blob", b).await.expect("client task");
        assert!(body == second_bytes, "second blob: wrong bytes");
    }
    assert_eq!(fault.blob_gets(&second), 1, "one fill for both clients");
    assert_eq!(fault.blob_gets(&first), 1);
    let log = fault.requests();
    let at = |d: &str| {
        log.iter()
            .position(|r| r.path.ends_with(d))
            .expect("fetched")
    };
    assert!(at(&first) < at(&second), "{log:?}");
    let text = metrics_of(&running).await;
    assert_eq!(metric_sum(&text, "berth_fills_queued"), 0.0);
    assert_eq!(
        metric_sum(&text, "berth_fill_queue_wait_seconds_count"),
        2.0,
        "both fills' waits observed"
    );
    assert!(metric_sum(&text, "berth_fill_queue_wait_seconds_sum") > 0.0);
    running.shutdown().await;
}

/// A Range answered from a fill that has not verified yet carries the origin's bytes as they
/// are, wrong ones included: it is counted, the bad blob is never stored, and the whole-body
/// client of the same fill is cut off before its last byte.
#[tokio::test]
async fn a_range_during_a_corrupt_fill_is_counted_and_never_stored() {
    const UNVERIFIED: &str = "berth_unverified_range_responses_total";
    let (fault, berth) = setup().await;
    let bytes = pseudo_random(120, 2 * MIB);
    let digest = fault.add_blob(bytes.clone());
    // The origin flips the middle byte (at MIB) and holds the body after 1.5 MiB.
    fault.set_blob_fault(&digest, Fault::CorruptHold(3 * MIB / 2));
    let url = blob_url(&berth, &digest);
    let client = Client::new();
    let mut full = within(10, "full GET", client.get(&url).send())
        .await
        .expect("GET");
    assert_eq!(full.status(), StatusCode::OK);
    assert_eq!(full.content_length(), Some(bytes.len() as u64));
    within(10, "origin holds", fault.wait_held(1)).await;
    // The flipped byte has reached the fill's file.
    let mut got = read_at_least(&mut full, MIB + 1, "full GET").await;
    let before = berth.metrics().await;

    let range = within(
        10,
        "range",
        client
            .get(&url)
            .header("range", format!("bytes={}-{}", MIB - 10, MIB + 9))
            .send(),
    )
    .await
    .expect("GET");
    assert_eq!(range.status(), StatusCode::PARTIAL_CONTENT);
    let part = within(10, "range body", range.bytes()).await.expect("body");
    let mut expected = bytes[MIB - 10..MIB + 10].to_vec();
    expected[10] ^= 0xff;
    assert_eq!(
        &part[..],
        &expected[..],
        "the origin's unverified bytes, as sent"
    );
    let after = berth.metrics().await;
    assert_eq!(
        metric_sum(&after, UNVERIFIED),
        metric_sum(&before, UNVERIFIED) + 1.0,
        "the unverified Range response is counted"
    );

    fault.release();
    let mut failed = false;
    loop {
        match within(30, "full GET rest", full.chunk()).await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break,
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed && got.len() < bytes.len(),
        "the whole-body client got {} of {} bytes and {}",
        got.len(),
        bytes.len(),
        if failed { "an error" } else { "a clean end" }
    );
    assert_not_stored(berth.cache_dir(), &digest).await;
    let mismatched = berth.metrics().await;
    assert!(metric_sum(&mismatched, MISMATCHES) > metric_sum(&after, MISMATCHES));

    // Nothing of the bad fill (nor of the Range) was kept: the healed origin is asked again.
    fault.set_blob_fault(&digest, Fault::None);
    expect_blob(&url, &bytes, "miss").await;
    assert_eq!(fault.blob_gets(&digest), 2);
    // A Range on the verified, cached blob is not counted.
    let counted = metric_sum(&berth.metrics().await, UNVERIFIED);
    let cached = client
        .get(&url)
        .header("range", "bytes=0-99")
        .send()
        .await
        .expect("GET");
    assert_eq!(cached.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&cached.bytes().await.unwrap()[..], &bytes[..100]);
    assert_eq!(metric_sum(&berth.metrics().await, UNVERIFIED), counted);
}

/// A referrers listing is not evidence that a repository holds what it lists: after the
/// listing of `tenant/app` names a manifest that only `victim/app` holds (and berth cached it
/// for `victim/app`), asking for that manifest under `tenant/app` gets the origin's 404, not the
/// cached bytes; so does the subject named in a manifest the tenant pulled.
#[tokio::test]
async fn a_referrers_listing_is_not_evidence_of_membership() {
    let (fault, berth) = setup().await;
    let layer = pseudo_random(140, 4_000);
    let layer_digest = fault.add_blob(layer);
    let private = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer_digest, "size": 4_000 },
        "layers": [],
        "annotations": { "owner": "victim" },
    }))
    .unwrap();
    let private_digest = fault.add_manifest("victim/app", "1", OCI_MANIFEST, private.clone());
    // The origin holds the private manifest in victim/app only.
    for repo in ["tenant/app", "other/app"] {
        fault.set_manifest_fault(repo, &private_digest, Fault::Status(404));
    }
    // The tenant's own image, and a referrers listing in its repository naming the private one.
    let subject = fault.add_manifest(
        "tenant/app",
        "1",
        OCI_MANIFEST,
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": layer_digest, "size": 4_000 },
            "layers": [],
            "subject": { "mediaType": OCI_MANIFEST, "digest": private_digest, "size": private.len() },
        }))
        .unwrap(),
    );
    fault.add_referrer(&subject, OCI_MANIFEST, private.clone());
    let url = |repo: &str, rest: &str| format!("http://{}/v2/{repo}/{rest}", berth.addr);
    let accept = [OCI_MANIFEST, "application/vnd.oci.image.index.v1+json"];

    // The victim's pull caches the private manifest.
    let got = get(&url("victim/app", "manifests/1"), &accept).await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap(), private);
    // The tenant pulls its manifest (whose subject is the private one) and lists referrers.
    let got = get(&url("tenant/app", "manifests/1"), &accept).await;
    assert_eq!(got.status(), StatusCode::OK);
    let got = get(&url("tenant/app", &format!("referrers/{subject}")), &accept).await;
    assert_eq!(got.status(), StatusCode::OK);
    let listing = got.text().await.unwrap();
    assert!(listing.contains(&private_digest), "{listing}");
    fault.clear();
    for repo in ["tenant/app", "other/app"] {
        for method in [Method::GET, Method::HEAD] {
            let resp = Client::new()
                .request(
                    method.clone(),
                    url(repo, &format!("manifests/{private_digest}")),
                )
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.bytes().await.unwrap();
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{method} {repo}: {}",
                String::from_utf8_lossy(&body)
            );
            assert!(
                !body.windows(6).any(|w| w == b"victim"),
                "private bytes under {repo}"
            );
        }
    }
    // berth asked the origin instead of trusting the listing or the subject.
    let asked = fault.count(|r| r.path.contains("tenant/app/manifests/sha256:"));
    assert!(asked >= 1, "{:?}", fault.requests());
    berth.stop().await;
}

/// The referrers route over berth's HTTP API (README: "referrers"): forwarded with its
/// `artifactType` filter, answered as an OCI index, kept for `tag_ttl` (no second origin
/// request), HEAD answered alike, served stale when the origin fails, and a bad digest refused.
#[tokio::test]
async fn referrers_are_forwarded_kept_briefly_and_served_stale() {
    let (fault, berth) = setup().await;
    let subject = fault.add_manifest(REPO, "1", OCI_MANIFEST, test_manifest(150));
    let signature = fault.add_referrer(&subject, OCI_MANIFEST, test_manifest(151));
    let url = format!(
        "{}/v2/{REPO}/referrers/{subject}?artifactType=application%2Fvnd.example.sig",
        berth.url()
    );
    let index = "application/vnd.oci.image.index.v1+json";

    let first = get(&url, &[index]).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["content-type"], index);
    let listing = first.bytes().await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(v["manifests"][0]["digest"], signature.as_str(), "{v}");
    let asked =
        |f: &FaultUpstream| f.count(|r| r.method == Method::GET && r.path.contains("/referrers/"));
    assert_eq!(asked(&fault), 1);
    let filter = |path: &str| {
        reqwest::Url::parse(&format!("http://origin{path}"))
            .ok()?
            .query_pairs()
            .find(|(k, _)| k == "artifactType")
            .map(|(_, v)| v.into_owned())
    };
    assert!(
        fault
            .requests()
            .iter()
            .any(|r| filter(&r.path).as_deref() == Some("application/vnd.example.sig")),
        "the filter reaches the origin: {:?}",
        fault.requests()
    );

    // Kept for tag_ttl: the same bytes without asking the origin again, HEAD alike.
    let second = get(&url, &[index]).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.bytes().await.unwrap(), listing);
    let head = Client::new().head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["content-length"],
        listing.len().to_string().as_str()
    );
    assert_eq!(asked(&fault), 1, "{:?}", fault.requests());

    // A bad subject digest is the client's mistake.
    let bad = get(
        &format!("{}/v2/{REPO}/referrers/sha256:abc", berth.url()),
        &[],
    )
    .await;
    let (status, code) = error_code(bad).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );

    // With tag_ttl 0 every request asks the origin; when it fails, the last listing is served.
    let eager = Berth::in_front_of(&fault.url()).tag_ttl("0s").start().await;
    let eager_url = url.replace(&berth.url(), &eager.url());
    let fresh = get(&eager_url, &[index]).await;
    assert_eq!(fresh.status(), StatusCode::OK);
    assert_eq!(fresh.bytes().await.unwrap(), listing);
    fault.set_fault(Fault::Status(503));
    let stale = get(&eager_url, &[index]).await;
    assert_eq!(stale.status(), StatusCode::OK);
    assert_eq!(stale.headers()["x-berth-cache"], "stale");
    assert_eq!(stale.bytes().await.unwrap(), listing);
    assert_eq!(
        eager
            .metric("berth_stale_served_total{kind=\"referrers\"}")
            .await,
        1.0
    );
}

/// Docker Hub rate-limit awareness: once the origin reports at most `ratelimit_reserve` pulls
/// left, a stale tag is served from the known mapping (counted as stale) instead of being
/// revalidated, with one probe a minute; with pulls to spare, every stale tag is revalidated.
#[tokio::test]
async fn a_low_rate_limit_serves_known_tags_instead_of_revalidating() {
    let fault = FaultUpstream::start().await;
    let berth = Berth::in_front_of(&fault.url()).tag_ttl("0s").start().await;
    fault.add_manifest(REPO, "rl", OCI_MANIFEST, test_manifest(160));
    fault.set_ratelimit_remaining(Some(150));
    let url = manifest_url(&berth, "rl");
    let origin_manifests = |f: &FaultUpstream| f.count(|r| r.path.contains("/manifests/rl"));
    let first = get(&url, &[OCI_MANIFEST]).await;
    assert_eq!(first.status(), StatusCode::OK);
    // Pulls to spare: with tag_ttl 0 every request revalidates.
    let before = origin_manifests(&fault);
    let r = get(&url, &[OCI_MANIFEST]).await;
    assert_eq!(r.headers()["x-berth-cache"], "hit");
    assert_eq!(origin_manifests(&fault), before + 1);

    // The origin now reports 5 pulls left (berth learns it from the next answer).
    fault.set_ratelimit_remaining(Some(5));
    get(&url, &[OCI_MANIFEST]).await;
    assert_eq!(
        berth
            .metric("berth_upstream_ratelimit_remaining{upstream=\"origin\"}")
            .await,
        5.0
    );
    // One probe, then the known mapping without asking.
    get(&url, &[OCI_MANIFEST]).await;
    let asked = origin_manifests(&fault);
    for _ in 0..3 {
        let r = get(&url, &[OCI_MANIFEST]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-berth-cache"], "stale");
    }
    assert_eq!(
        origin_manifests(&fault),
        asked,
        "no origin request while low"
    );
    assert_eq!(
        berth
            .metric("berth_stale_served_total{kind=\"ratelimit\"}")
            .await,
        3.0
    );
}
