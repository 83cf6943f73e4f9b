//! The pull API through berth against a real upstream (`docker-registry`), with a counting tap
//! between them to see exactly what reaches the origin.

mod common;

use common::berth::Berth;
use common::content::{sha256_digest, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use common::{push_docker_image, push_oci_image, push_oci_index, Registry, Tap, TestCa};
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;

/// A registry, a tap in front of it, and berth in front of the tap.
struct Setup {
    registry: Registry,
    tap: Tap,
    berth: Berth,
}

async fn setup() -> Setup {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url()).start().await;
    Setup {
        registry,
        tap,
        berth,
    }
}

fn blob_gets(tap: &Tap) -> usize {
    tap.count(|m, p| m == Method::GET && p.contains("/blobs/"))
}

async fn get(url: &str, accept: &[&str]) -> reqwest::Response {
    let mut req = Client::new().get(url);
    for a in accept {
        req = req.header("accept", *a);
    }
    req.send().await.expect("request")
}

async fn error_code(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "errors are JSON"
    );
    let v: Value = resp.json().await.expect("JSON error body");
    let code = v["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_owned();
    assert!(v["errors"][0]["message"].is_string());
    (status, code)
}

#[tokio::test]
async fn base_endpoint_answers_with_api_version() {
    let s = setup().await;
    let resp = get(&format!("{}/v2/", s.berth.url()), &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(resp.text().await.unwrap(), "{}");
}

#[tokio::test]
async fn manifests_by_tag_and_digest_in_oci_and_docker_types() {
    let s = setup().await;
    let oci = push_oci_image(&s.registry.url(), "team/app", "v1", &[1000, 2000, 3000], 1).await;
    let docker = push_docker_image(&s.registry.url(), "team/legacy", "v1", &[1500], 2).await;
    for (img, mt) in [(&oci, OCI_MANIFEST), (&docker, DOCKER_MANIFEST)] {
        for reference in [img.tag.clone(), img.manifest_digest.clone()] {
            let url = format!("{}/v2/{}/manifests/{}", s.berth.url(), img.repo, reference);
            let resp = get(&url, &[OCI_MANIFEST, DOCKER_MANIFEST]).await;
            assert_eq!(resp.status(), StatusCode::OK, "{url}");
            let h = resp.headers().clone();
            assert_eq!(h["content-type"], mt);
            assert_eq!(h["docker-content-digest"], img.manifest_digest.as_str());
            assert_eq!(
                h["content-length"],
                img.manifest_bytes.len().to_string().as_str()
            );
            assert!(h.contains_key("x-berth-cache"));
            assert_eq!(resp.bytes().await.unwrap(), img.manifest_bytes);
            // HEAD carries the same headers and no body.
            let head = Client::new()
                .head(&url)
                .header("accept", OCI_MANIFEST)
                .header("accept", DOCKER_MANIFEST)
                .send()
                .await
                .unwrap();
            assert_eq!(head.status(), StatusCode::OK);
            for k in ["content-type", "content-length", "docker-content-digest"] {
                assert_eq!(head.headers()[k], h[k], "HEAD {k}");
            }
        }
    }
    // Second fetch by tag is served from the cache without a request to the origin.
    s.tap.clear();
    let url = format!("{}/v2/team/app/manifests/v1", s.berth.url());
    let resp = get(&url, &[OCI_MANIFEST, DOCKER_MANIFEST]).await;
    assert_eq!(resp.headers()["x-berth-cache"], "hit");
    assert_eq!(s.tap.requests().len(), 0, "{:?}", s.tap.requests());
}

#[tokio::test]
async fn index_and_platform_manifests() {
    let s = setup().await;
    let idx = push_oci_index(
        &s.registry.url(),
        "multi",
        "latest",
        &[("linux", "amd64"), ("linux", "arm64")],
        3,
    )
    .await;
    let url = format!("{}/v2/multi/manifests/latest", s.berth.url());
    let resp = get(&url, &[OCI_INDEX, OCI_MANIFEST]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], OCI_INDEX);
    assert_eq!(resp.headers()["docker-content-digest"], idx.digest.as_str());
    assert_eq!(resp.bytes().await.unwrap(), idx.bytes);
    for p in &idx.images {
        let url = format!(
            "{}/v2/multi/manifests/{}",
            s.berth.url(),
            p.image.manifest_digest
        );
        let resp = get(&url, &[OCI_MANIFEST]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.bytes().await.unwrap(), p.image.manifest_bytes);
    }
}

#[tokio::test]
async fn tag_mapping_is_keyed_by_accept() {
    let s = setup().await;
    let idx = push_oci_index(&s.registry.url(), "acc", "v1", &[("linux", "amd64")], 4).await;
    let url = format!("{}/v2/acc/manifests/v1", s.berth.url());
    // With the index type accepted, the index comes back.
    let a = get(&url, &[OCI_INDEX, OCI_MANIFEST]).await;
    assert_eq!(a.headers()["docker-content-digest"], idx.digest.as_str());
    // A client that accepts only single manifests must not be handed the cached index: it gets
    // what the origin itself answers for that Accept (asked directly, past berth and the tap).
    let direct = get(
        &format!("{}/v2/acc/manifests/v1", s.registry.url()),
        &[OCI_MANIFEST],
    )
    .await;
    let b = get(&url, &[OCI_MANIFEST]).await;
    assert_eq!(
        b.status(),
        direct.status(),
        "berth answers as the origin does"
    );
    if b.status() == StatusCode::OK {
        for h in ["content-type", "docker-content-digest"] {
            assert_eq!(b.headers()[h], direct.headers()[h], "{h}");
        }
        assert_ne!(b.headers()["content-type"], OCI_INDEX);
        assert_eq!(b.bytes().await.unwrap(), direct.bytes().await.unwrap());
    } else {
        assert_eq!(b.status(), StatusCode::NOT_FOUND);
        let (_, code) = error_code(b).await;
        assert_eq!(code, "MANIFEST_UNKNOWN");
    }
    // Both answers came from the origin: one manifest GET per Accept, none served from the
    // other's cache entry.
    assert_eq!(
        s.tap
            .count(|m, p| m == Method::GET && p == "/v2/acc/manifests/v1"),
        2,
        "{:?}",
        s.tap.requests()
    );
}

#[tokio::test]
async fn blobs_are_byte_exact_and_cached() {
    let s = setup().await;
    let img = push_oci_image(
        &s.registry.url(),
        "blobs/test",
        "v1",
        &[300_000, 1_000_000],
        5,
    )
    .await;
    for (digest, bytes) in img.blobs() {
        let url = format!("{}/v2/blobs/test/blobs/{}", s.berth.url(), digest);
        let resp = get(&url, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let h = resp.headers().clone();
        assert_eq!(h["docker-content-digest"], digest);
        assert_eq!(h["accept-ranges"], "bytes");
        assert_eq!(h["content-length"], bytes.len().to_string().as_str());
        assert_eq!(h["x-berth-cache"], "miss");
        let body = resp.bytes().await.unwrap();
        assert_eq!(sha256_digest(&body), digest);
        assert_eq!(&body[..], bytes);
    }
    let gets = blob_gets(&s.tap);
    assert_eq!(gets, img.blobs().len(), "one origin GET per blob");
    for (digest, bytes) in img.blobs() {
        let url = format!("{}/v2/blobs/test/blobs/{}", s.berth.url(), digest);
        let resp = get(&url, &[]).await;
        assert_eq!(resp.headers()["x-berth-cache"], "hit");
        assert_eq!(&resp.bytes().await.unwrap()[..], bytes);
        let head = Client::new().head(&url).send().await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(
            head.headers()["content-length"],
            bytes.len().to_string().as_str()
        );
        assert_eq!(head.headers()["docker-content-digest"], digest);
    }
    assert_eq!(blob_gets(&s.tap), gets, "cached blobs cause no origin GET");
}

#[tokio::test]
async fn concurrent_misses_share_one_fetch() {
    let s = setup().await;
    let img = push_oci_image(&s.registry.url(), "coalesce", "v1", &[4_000_000], 6).await;
    let (digest, bytes) = img.layers[0].clone();
    let url = format!("{}/v2/coalesce/blobs/{}", s.berth.url(), digest);
    // The origin holds the fill until all eight clients are inside berth, so that the eight
    // misses are truly concurrent (not one after another, which would also fetch once).
    s.tap.hold();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, &[]).await.bytes().await.unwrap() })
        })
        .collect();
    wait_for_metric(&s.berth, "berth_fill_waiters_total", 7.0).await;
    s.tap.release();
    for t in tasks {
        assert_eq!(t.await.unwrap(), bytes);
    }
    assert_eq!(blob_gets(&s.tap), 1, "{:?}", s.tap.requests());
}

/// Waits (at most 30 s) until `metric` (a name with its labels, as exposed) reaches `at_least`.
async fn wait_for_metric(berth: &Berth, metric: &str, at_least: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = berth.metric(metric).await;
        if v >= at_least {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{metric} = {v}, expected ≥ {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ranges_on_cached_and_uncached_blobs() {
    let s = setup().await;
    let img = push_oci_image(&s.registry.url(), "ranges", "v1", &[100_000, 50_000], 7).await;
    let (d0, b0) = img.layers[0].clone();
    let (d1, b1) = img.layers[1].clone();
    // Uncached: the range is served from the single fill.
    let resp = Client::new()
        .get(format!("{}/v2/ranges/blobs/{}", s.berth.url(), d0))
        .header("range", "bytes=10-99")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 10-99/{}", b0.len()).as_str()
    );
    assert_eq!(resp.headers()["content-length"], "90");
    assert_eq!(&resp.bytes().await.unwrap()[..], &b0[10..100]);
    // Cached (fetch whole first).
    assert_eq!(
        &get(&format!("{}/v2/ranges/blobs/{}", s.berth.url(), d1), &[])
            .await
            .bytes()
            .await
            .unwrap()[..],
        &b1[..]
    );
    let url = format!("{}/v2/ranges/blobs/{}", s.berth.url(), d1);
    for (range, want, start, end) in [
        ("bytes=0-0", StatusCode::PARTIAL_CONTENT, 0, 1),
        (
            "bytes=-10",
            StatusCode::PARTIAL_CONTENT,
            b1.len() - 10,
            b1.len(),
        ),
        ("bytes=49990-", StatusCode::PARTIAL_CONTENT, 49990, b1.len()),
    ] {
        let resp = Client::new()
            .get(&url)
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want, "{range}");
        assert_eq!(&resp.bytes().await.unwrap()[..], &b1[start..end], "{range}");
    }
    let resp = Client::new()
        .get(&url)
        .header("range", format!("bytes={}-", b1.len() + 5))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes */{}", b1.len()).as_str()
    );
    // An unparseable Range is ignored: the whole blob.
    let resp = Client::new()
        .get(&url)
        .header("range", "bytes=zz")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().len(), b1.len());
}

#[tokio::test]
async fn stale_content_is_served_when_the_origin_is_down() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    // Tags are never fresh: every by-tag pull revalidates, so the outage is noticed.
    let berth = Berth::in_front_of(&tap.url()).tag_ttl("0s").start().await;
    let img = push_oci_image(&registry.url(), "stale/app", "v1", &[20_000], 8).await;
    let tag_url = format!("{}/v2/stale/app/manifests/v1", berth.url());
    assert_eq!(
        get(&tag_url, &[OCI_MANIFEST]).await.status(),
        StatusCode::OK
    );
    for (d, _) in img.blobs() {
        get(&format!("{}/v2/stale/app/blobs/{d}", berth.url()), &[])
            .await
            .bytes()
            .await
            .unwrap();
    }
    // While the origin is up, a stale mapping is revalidated with a HEAD, not a GET.
    tap.clear();
    let resp = get(&tag_url, &[OCI_MANIFEST]).await;
    assert_eq!(resp.headers()["x-berth-cache"], "hit");
    assert_eq!(tap.count(|m, _| m == Method::HEAD), 1);
    assert_eq!(tap.count(|m, _| m == Method::GET), 0);

    tap.set_down(true);
    let resp = get(&tag_url, &[OCI_MANIFEST]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-berth-cache"], "stale");
    assert_eq!(resp.bytes().await.unwrap(), img.manifest_bytes);
    let by_digest = get(
        &format!(
            "{}/v2/stale/app/manifests/{}",
            berth.url(),
            img.manifest_digest
        ),
        &[OCI_MANIFEST],
    )
    .await;
    assert_eq!(by_digest.status(), StatusCode::OK);
    for (d, bytes) in img.blobs() {
        let resp = get(&format!("{}/v2/stale/app/blobs/{d}", berth.url()), &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&resp.bytes().await.unwrap()[..], bytes);
    }
    // Something never pulled cannot be served: a clear gateway error, not a hang.
    let resp = get(
        &format!("{}/v2/stale/app/manifests/other", berth.url()),
        &[OCI_MANIFEST],
    )
    .await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    error_code(resp).await;
}

#[tokio::test]
async fn tags_list_is_forwarded_and_served_stale() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url()).tag_ttl("0s").start().await;
    push_oci_image(&registry.url(), "listing", "a", &[10], 9).await;
    push_oci_image(&registry.url(), "listing", "b", &[10], 10).await;
    let url = format!("{}/v2/listing/tags/list", berth.url());
    let tags = |v: Value| {
        let mut t: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
        t.sort();
        t
    };
    let resp = get(&url, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(tags(resp.json().await.unwrap()), ["a", "b"]);
    let resp = get(&format!("{url}?n=1"), &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // distribution 2.8 ignores `n` on this path; what matters is that berth forwarded it.
    assert!(!tags(resp.json().await.unwrap()).is_empty());
    assert!(
        tap.count(|_, p| p.contains("tags/list?n=1")) == 1,
        "{:?}",
        tap.requests()
    );
    // Origin down: the last listing is served, marked stale.
    tap.set_down(true);
    let resp = get(&url, &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-berth-cache"], "stale");
    assert_eq!(tags(resp.json().await.unwrap()), ["a", "b"]);
    tap.set_down(false);
    let resp = get(&format!("{}/v2/nothing-here/tags/list", berth.url()), &[]).await;
    let (status, code) = error_code(resp).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
}

#[tokio::test]
async fn upstream_selection_by_ns_prefix_and_default() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "library/hello", "v1", &[10], 11).await;
    let host = registry.host();
    // No default: only ns or a prefix can reach the registry. "docker.io"-style naming on
    // (one-word names get library/), through the alias list.
    let berth = Berth::with_upstreams(&format!(
        "[[upstream]]\nname = \"mirror\"\nurl = \"{}\"\naliases = [\"{host}\", \"docker.io\"]\nauth = \"public\"\n",
        registry.url()
    ))
    .start()
    .await;
    let ns_enc = host.replace(':', "%3A");
    let resp = get(
        &format!("{}/v2/library/hello/manifests/v1?ns={ns_enc}", berth.url()),
        &[OCI_MANIFEST],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        img.manifest_digest.as_str()
    );
    // docker.io alias: one-word name gets library/.
    let resp = get(
        &format!("{}/v2/hello/manifests/v1?ns=docker.io", berth.url()),
        &[OCI_MANIFEST],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Prefix routing.
    let resp = get(
        &format!("{}/v2/mirror/library/hello/manifests/v1", berth.url()),
        &[OCI_MANIFEST],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Unknown ns is refused: never an open proxy.
    let resp = get(
        &format!(
            "{}/v2/library/hello/manifests/v1?ns=evil.example",
            berth.url()
        ),
        &[OCI_MANIFEST],
    )
    .await;
    let (status, code) = error_code(resp).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    // No ns, no prefix, no default.
    let resp = get(
        &format!("{}/v2/library/hello/manifests/v1", berth.url()),
        &[OCI_MANIFEST],
    )
    .await;
    let (status, code) = error_code(resp).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
}

#[tokio::test]
async fn bad_input_gets_clear_client_errors() {
    let s = setup().await;
    let b = s.berth.url();
    let hex = "a".repeat(64);
    let cases: Vec<(Method, String, StatusCode, &str)> = vec![
        (
            Method::GET,
            format!("{b}/v2/UPPER/manifests/latest"),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            format!("{b}/v2/a/blobs/sha256:xyz"),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            format!("{b}/v2/a/blobs/md5:{hex}"),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            format!("{b}/v2/a/manifests/-bad"),
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
        ),
        (
            Method::GET,
            format!("{b}/v2/a/manifests/sha256:short"),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            format!("{b}/v2/a/blobs/sha256:{hex}"),
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
        ),
        (
            Method::GET,
            format!("{b}/v2/a/manifests/nope"),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::PUT,
            format!("{b}/v2/a/manifests/latest"),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::POST,
            format!("{b}/v2/a/blobs/uploads/"),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            format!("{b}/v2/a/blobs/sha256:{hex}"),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::PATCH,
            format!("{b}/v2/a/blobs/uploads/x"),
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::GET,
            format!("{b}/v2/_catalog"),
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
        ),
        (
            Method::GET,
            format!("{b}/nothing"),
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
        ),
    ];
    for (method, url, status, code) in cases {
        let resp = Client::new()
            .request(method.clone(), &url)
            .send()
            .await
            .unwrap();
        let got = error_code(resp).await;
        assert_eq!(got, (status, code.to_owned()), "{method} {url}");
    }
    // The raw path is what berth sees; reqwest would normalize "..", so send it by hand.
    for path in [
        "/v2/../../etc/passwd/blobs/sha256:00".to_owned(),
        "/v2/a/%2e%2e/b/manifests/latest".to_owned(),
        format!("/v2/a/../../blobs/sha256:{hex}"),
        "/v2/a/manifests/..%2f..%2fetc".to_owned(),
    ] {
        let raw = raw_get(s.berth.addr, &path).await;
        assert!(raw.starts_with("HTTP/1.1 400"), "{path}: {raw}");
        assert!(raw.contains("\"errors\""), "{path}: {raw}");
    }
}

async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn tls_listener_speaks_h2_and_http1() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "tls/app", "v1", &[5000], 12).await;
    let ca = TestCa::new();
    let berth = Berth::in_front_of(&registry.url()).tls(&ca).start().await;
    let url = format!(
        "https://localhost:{}/v2/tls/app/manifests/v1",
        berth.addr.port()
    );
    let h2 = ca.client();
    let resp = h2
        .get(&url)
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.bytes().await.unwrap(), img.manifest_bytes);
    let cert = reqwest::Certificate::from_pem(ca.ca_pem().as_bytes()).unwrap();
    let h1 = Client::builder()
        .add_root_certificate(cert)
        .http1_only()
        .build()
        .unwrap();
    let (d, bytes) = &img.layers[0];
    let resp = h1
        .get(format!(
            "https://localhost:{}/v2/tls/app/blobs/{d}",
            berth.addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(&resp.bytes().await.unwrap()[..], &bytes[..]);
    // A plain-HTTP client is not served.
    assert!(Client::new()
        .get(format!("http://{}/v2/", berth.addr))
        .send()
        .await
        .is_err());
}

/// A hot manifest comes from the memory tier without touching the disk: counted by tier, and
/// still served with its file gone from the cache directory.
#[tokio::test]
async fn a_hot_manifest_is_served_from_memory_without_a_disk_read() {
    let s = setup().await;
    let img = push_oci_image(&s.registry.url(), "hot/manifest", "v1", &[1000], 12).await;
    let by_tag = format!("{}/v2/hot/manifest/manifests/v1", s.berth.url());
    let by_digest = format!(
        "{}/v2/hot/manifest/manifests/{}",
        s.berth.url(),
        img.manifest_digest
    );
    let first = get(&by_tag, &[OCI_MANIFEST]).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.bytes().await.unwrap(), img.manifest_bytes);
    let file = common::airgap::manifest_file(s.berth.cache_dir(), &img.manifest_digest);
    assert!(file.is_file(), "stored on disk too");
    let disk_before = disk_lookups(&s.berth).await;
    let memory_hits = "berth_cache_lookups_total{kind=\"manifest\",result=\"hit\",tier=\"memory\"}";
    let hits_before = s.berth.metric(memory_hits).await;
    // The disk copy disappears: only the memory tier can answer now.
    std::fs::remove_file(&file).unwrap();
    for url in [&by_tag, &by_digest, &by_tag] {
        let r = get(url, &[OCI_MANIFEST]).await;
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        assert_eq!(r.headers()["x-berth-cache"], "hit");
        assert_eq!(r.bytes().await.unwrap(), img.manifest_bytes);
    }
    assert_eq!(s.berth.metric(memory_hits).await, hits_before + 3.0);
    assert_eq!(disk_lookups(&s.berth).await, disk_before, "no disk lookup");
    assert_eq!(
        s.tap
            .count(|m, p| m == Method::GET && p.contains("/manifests/")),
        1,
        "{:?}",
        s.tap.requests()
    );
}

/// Every manifest lookup counted against the disk tier, hit or miss.
async fn disk_lookups(berth: &Berth) -> f64 {
    berth
        .metrics()
        .await
        .lines()
        .filter(|l| {
            l.starts_with("berth_cache_lookups_total{kind=\"manifest\"")
                && l.contains("tier=\"disk\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
