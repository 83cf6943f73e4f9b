//! An HTTPS origin, as README.md promises: berth verifies the origin's certificate against the
//! web PKI roots plus `upstream[].ca_file`, pulls when the chain checks out, and refuses (a
//! 502 with an OCI error, nothing cached) when it does not: no CA given, or another CA's.

mod common;

use common::berth::Berth;
use common::content::{push_oci_image_with, sha256_digest, OCI_MANIFEST};
use common::{Registry, TestCa, TestImage};
use reqwest::StatusCode;

/// An HTTPS registry signed by `ca`, holding one image.
async fn origin(ca: &TestCa) -> (Registry, TestImage) {
    let registry = Registry::start_tls(ca).await;
    assert!(registry.url().starts_with("https://"));
    let img =
        push_oci_image_with(&ca.client(), &registry.url(), "tls/app", "v1", &[50_000], 9).await;
    (registry, img)
}

/// berth with the HTTPS origin as its default upstream; `ca_file` when given.
async fn berth(registry: &Registry, ca_file: Option<&std::path::Path>) -> Berth {
    let ca = ca_file
        .map(|p| format!("ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    Berth::with_upstreams(&format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{}\"\ndefault = true\nauth = \"public\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n{ca}",
        registry.url()
    ))
    .start()
    .await
}

async fn manifest(berth: &Berth, img: &TestImage) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!(
            "{}/v2/{}/manifests/{}",
            berth.url(),
            img.repo,
            img.tag
        ))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_https_origin_is_pulled_through_with_its_ca_file() {
    let ca = TestCa::new();
    let (registry, img) = origin(&ca).await;
    let b = berth(&registry, Some(&ca.ca_path())).await;
    let m = manifest(&b, &img).await;
    assert_eq!(m.status(), StatusCode::OK);
    assert_eq!(m.bytes().await.unwrap(), img.manifest_bytes);
    for (digest, bytes) in img.blobs() {
        let r = reqwest::get(format!("{}/v2/{}/blobs/{digest}", b.url(), img.repo))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let body = r.bytes().await.unwrap();
        assert_eq!(sha256_digest(&body), digest);
        assert_eq!(&body[..], bytes);
    }
}

/// Refused: a 502 with an OCI error body, and nothing of the image cached.
async fn assert_refused(b: &Berth, img: &TestImage) {
    let m = manifest(b, img).await;
    assert_eq!(m.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = m.json().await.expect("OCI error body");
    assert!(body["errors"][0]["code"].is_string(), "{body}");
    let r = reqwest::get(format!(
        "{}/v2/{}/blobs/{}",
        b.url(),
        img.repo,
        img.config_digest
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let listing = common::airgap::cache_listing(b.cache_dir());
    assert!(
        listing
            .keys()
            .all(|k| !k.starts_with("blobs/") && !k.starts_with("manifests/")),
        "nothing cached from an unverified origin: {listing:?}"
    );
}

#[tokio::test]
async fn an_origin_whose_ca_is_not_trusted_is_refused() {
    let ca = TestCa::new();
    let (registry, img) = origin(&ca).await;
    // Web PKI roots only: a private CA's certificate does not verify.
    let b = berth(&registry, None).await;
    assert_refused(&b, &img).await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let ca = TestCa::new();
    let (registry, img) = origin(&ca).await;
    let other = TestCa::new();
    let b = berth(&registry, Some(&other.ca_path())).await;
    assert_refused(&b, &img).await;
}
