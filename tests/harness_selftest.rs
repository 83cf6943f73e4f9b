//! Checks the integration-test harness itself against the real registry, without berth:
//! pushed content reads back byte for byte, the tap forwards and counts, skopeo accepts the
//! images, and the test CA's certificates complete a TLS handshake.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::content::{sha256_digest, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use common::{
    push_docker_image, push_oci_image, push_oci_index, require_binary, Registry, Tap, TestCa,
    TestImage,
};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Client, Method, StatusCode};

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// GETs a manifest and checks status, bytes, `Content-Type` and `Docker-Content-Digest`.
async fn assert_manifest(
    client: &Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) {
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let response = client
        .get(&url)
        .header(ACCEPT, ACCEPT_ALL)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    assert_eq!(response.headers()[CONTENT_TYPE], media_type, "GET {url}");
    assert_eq!(
        response.headers()["docker-content-digest"],
        sha256_digest(bytes).as_str(),
        "GET {url}"
    );
    assert_eq!(response.bytes().await.unwrap(), bytes, "GET {url}");
}

/// GETs every blob of `image` and checks the bytes.
async fn assert_blobs(client: &Client, base: &str, image: &TestImage) {
    for (digest, bytes) in image.blobs() {
        let url = format!("{base}/v2/{}/blobs/{digest}", image.repo);
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {url}");
        let body = response.bytes().await.unwrap();
        assert_eq!(body.len(), bytes.len(), "GET {url}");
        assert_eq!(sha256_digest(&body), digest, "GET {url}");
    }
}

#[tokio::test]
async fn pushed_content_reads_back_through_the_tap() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let base = registry.url();

    let oci = push_oci_image(&base, "test/oci", "v1", &[1_000, 70_000, 1_500_000], 1).await;
    assert_eq!(oci.layers.len(), 3);
    assert_eq!(oci.media_type, OCI_MANIFEST);
    let index = push_oci_index(
        &base,
        "test/multi",
        "latest",
        &[("linux", "amd64"), ("linux", "arm64")],
        2,
    )
    .await;
    assert_eq!(index.media_type, OCI_INDEX);
    // Pushed through the tap: uploads (POST, then PUT to the Location the registry built from
    // the tap's Host header) stream through it too.
    let docker = push_docker_image(&tap.url(), "library/docker", "3.19", &[5_000, 9_000], 3).await;
    assert_eq!(docker.media_type, DOCKER_MANIFEST);
    assert_eq!(
        tap.count(|m, p| m == Method::POST && p.contains("/blobs/uploads/")),
        3
    );
    assert_eq!(
        tap.count(|m, p| m == Method::PUT && p.contains("digest=sha256")),
        3
    );
    assert_eq!(
        tap.count(|m, p| m == Method::PUT && p.ends_with("/manifests/3.19")),
        1
    );
    tap.clear();
    assert!(tap.requests().is_empty());

    // Different seeds, different blobs.
    let arm64 = index.image_for("linux", "arm64").unwrap();
    let amd64 = index.image_for("linux", "amd64").unwrap();
    assert_ne!(arm64.layers[0].0, amd64.layers[0].0);
    assert_ne!(oci.layers[0].0, docker.layers[0].0);

    let client = Client::new();
    let via = tap.url();
    assert_manifest(
        &client,
        &via,
        "test/oci",
        "v1",
        OCI_MANIFEST,
        &oci.manifest_bytes,
    )
    .await;
    assert_manifest(
        &client,
        &via,
        "test/oci",
        &oci.manifest_digest,
        OCI_MANIFEST,
        &oci.manifest_bytes,
    )
    .await;
    assert_blobs(&client, &via, &oci).await;
    assert_manifest(
        &client,
        &via,
        "test/multi",
        "latest",
        OCI_INDEX,
        &index.bytes,
    )
    .await;
    for platform in &index.images {
        let image = &platform.image;
        assert_eq!(image.tag, image.manifest_digest);
        assert_manifest(
            &client,
            &via,
            "test/multi",
            &image.tag,
            OCI_MANIFEST,
            &image.manifest_bytes,
        )
        .await;
        assert_blobs(&client, &via, image).await;
    }
    assert_manifest(
        &client,
        &via,
        "library/docker",
        "3.19",
        DOCKER_MANIFEST,
        &docker.manifest_bytes,
    )
    .await;
    assert_blobs(&client, &via, &docker).await;

    let manifests = tap.count(|m, p| m == Method::GET && p.contains("/manifests/"));
    let blobs = tap.count(|m, p| m == Method::GET && p.contains("/blobs/sha256:"));
    assert_eq!(manifests, 2 + 1 + 2 + 1);
    assert_eq!(blobs, 4 + 2 * 3 + 3);
    assert_eq!(tap.requests().len(), manifests + blobs);
    let first = &tap.requests()[0];
    assert_eq!(
        (&first.0, first.1.as_str()),
        (&Method::GET, "/v2/test/oci/manifests/v1")
    );

    // Query strings are forwarded and recorded verbatim.
    let response = client
        .get(format!("{via}/v2/test/oci/tags/list?n=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("\"v1\""));
    assert_eq!(tap.count(|_, p| p == "/v2/test/oci/tags/list?n=10"), 1);

    // An unknown manifest passes the registry's error through untouched.
    let response = client
        .get(format!("{via}/v2/test/oci/manifests/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.text().await.unwrap().contains("MANIFEST_UNKNOWN"));
}

#[tokio::test]
async fn tap_speaks_h2c_and_goes_down_on_request() {
    let mut registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let image = push_oci_image(&registry.url(), "down/test", "v1", &[3_000_000], 4).await;
    let layer = format!("{}/v2/down/test/blobs/{}", tap.url(), image.layers[0].0);

    let h2 = Client::builder().http2_prior_knowledge().build().unwrap();
    let response = h2.get(&layer).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        sha256_digest(&response.bytes().await.unwrap()),
        image.layers[0].0
    );

    // HEAD keeps Content-Length and has no body.
    let client = Client::new();
    let response = client.head(&layer).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let length = image.layers[0].1.len().to_string();
    assert_eq!(response.headers()["content-length"], length.as_str());

    // Down: new connections and pooled ones alike fail, and nothing is recorded.
    tap.clear();
    tap.set_down(true);
    assert!(client.get(&layer).send().await.is_err());
    assert!(h2.get(&layer).send().await.is_err());
    assert!(Client::new().get(&layer).send().await.is_err());
    assert_eq!(tap.requests().len(), 0);

    tap.set_down(false);
    let response = Client::new().get(&layer).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(tap.requests().len(), 1);

    // A stopped origin behind the tap: the tap drops the connection as the origin would.
    let direct = format!("{}/v2/", registry.url());
    registry.stop();
    assert!(Client::new().get(&direct).send().await.is_err());
    assert!(Client::new().get(&layer).send().await.is_err());
}

/// Runs `skopeo copy` from the registry into `dir:` and returns the copied manifest.
async fn skopeo_copy(registry: &Registry, reference: &str, dest: &Path, all: bool) -> Vec<u8> {
    let skopeo = require_binary("skopeo");
    let mut command = Command::new(skopeo);
    command
        .args([
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            "--quiet",
        ])
        .args(all.then_some("--all"))
        .arg(format!("docker://{}/{reference}", registry.host()))
        .arg(format!("dir:{}", dest.display()));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run skopeo");
    assert!(
        output.status.success(),
        "skopeo copy {reference}: {}\nregistry stderr:\n{}",
        String::from_utf8_lossy(&output.stderr),
        registry.stderr()
    );
    std::fs::read(dest.join("manifest.json")).expect("skopeo wrote manifest.json")
}

#[tokio::test]
async fn skopeo_accepts_the_images() {
    let registry = Registry::start().await;
    let base = registry.url();
    let oci = push_oci_image(&base, "skopeo/oci", "v1", &[512, 20_000, 300_000], 11).await;
    let docker = push_docker_image(&base, "skopeo/docker", "v1", &[777, 4_096], 12).await;
    let index = push_oci_index(
        &base,
        "skopeo/multi",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        13,
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();

    for image in [&oci, &docker] {
        let dest = tmp.path().join(image.repo.replace('/', "_"));
        let manifest = skopeo_copy(
            &registry,
            &format!("{}:{}", image.repo, image.tag),
            &dest,
            false,
        )
        .await;
        assert_eq!(manifest, image.manifest_bytes, "{}", image.repo);
        for (digest, bytes) in image.blobs() {
            let file = dest.join(digest.trim_start_matches("sha256:"));
            assert_eq!(std::fs::read(&file).unwrap(), bytes, "{}", file.display());
        }
    }

    let dest = tmp.path().join("multi");
    let manifest = skopeo_copy(&registry, "skopeo/multi:v1", &dest, true).await;
    assert_eq!(manifest, index.bytes);
    for platform in &index.images {
        let hex = platform.image.manifest_digest.trim_start_matches("sha256:");
        let child = std::fs::read(dest.join(format!("{hex}.manifest.json"))).unwrap();
        assert_eq!(child, platform.image.manifest_bytes);
    }
}

#[tokio::test]
async fn test_ca_certificates_complete_a_handshake() {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let ca = TestCa::new();
    for path in [ca.ca_path(), ca.server_cert_path(), ca.server_key_path()] {
        assert!(path.is_file(), "{}", path.display());
        assert!(!path.to_string_lossy().contains(".tmp"));
    }
    assert!(ca.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));

    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let cert_pem = std::fs::read(ca.server_cert_path()).unwrap();
    let key_pem = std::fs::read(ca.server_key_path()).unwrap();
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .unwrap()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let Ok(tls) = acceptor.accept(stream).await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });

    let client = ca.client();
    for host in ["localhost", "127.0.0.1"] {
        let response = client
            .get(format!("https://{host}:{port}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "ok", "{host}");
    }
    // A client without the CA refuses the certificate.
    let untrusting = Client::builder().build().unwrap();
    assert!(untrusting
        .get(format!("https://localhost:{port}/"))
        .send()
        .await
        .is_err());
    server.abort();
}

/// An emulator takes, lists and returns objects through the `object_store` client berth uses,
/// goes down when stopped and comes back on the same port.
async fn object_store_round_trip(kind: common::objstore::Kind) {
    use common::objstore::{Kind, ObjectStoreServer};
    let mut server = ObjectStoreServer::start(kind).await;
    let bytes: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    server.put("p/blobs/x", bytes.clone()).await;
    assert_eq!(
        server.list().await,
        vec![("p/blobs/x".to_owned(), bytes.len() as u64)]
    );
    assert_eq!(server.get("p/blobs/x").await.unwrap().as_ref(), &bytes[..]);
    assert!(server.get("p/blobs/absent").await.is_none());
    server.stop();
    let down = Client::new()
        .get(format!("{}/", server.endpoint()))
        .send()
        .await;
    assert!(down.is_err(), "stopped store still answers");
    server.restart().await;
    // Azurite keeps its data directory; moto keeps nothing but its bucket is made again.
    let expected = match kind {
        Kind::Azurite => vec![("p/blobs/x".to_owned(), bytes.len() as u64)],
        Kind::Moto => vec![],
    };
    assert_eq!(server.list().await, expected, "{}", server.log());
}

#[tokio::test]
async fn azurite_stores_lists_and_restarts() {
    object_store_round_trip(common::objstore::Kind::Azurite).await;
}

#[tokio::test]
async fn moto_stores_lists_and_restarts() {
    object_store_round_trip(common::objstore::Kind::Moto).await;
}
