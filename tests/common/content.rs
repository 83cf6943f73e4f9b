//! Test content pushed into a registry through its HTTP push API.
//!
//! Images are small but real: each layer is a valid uncompressed tar holding one file of
//! seeded pseudo-random bytes, and the config's `rootfs.diff_ids` are the layer digests, so
//! skopeo and containerd accept them. The same seed always yields the same bytes; different
//! seeds yield different blobs.

use reqwest::{Client, StatusCode, Url};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer media type.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker schema 2 uncompressed layer media type.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// An image manifest as pushed, with every blob it references, to compare what berth serves.
#[derive(Clone, Debug)]
pub struct TestImage {
    /// Repository it was pushed to.
    pub repo: String,
    /// Reference it was pushed under: the tag, or for the children of an index the manifest
    /// digest (they are pushed by digest only).
    pub tag: String,
    /// `sha256:...` of `manifest_bytes`.
    pub manifest_digest: String,
    /// Exact manifest bytes the registry stores and serves.
    pub manifest_bytes: Vec<u8>,
    /// The manifest's media type (also its `Content-Type`).
    pub media_type: String,
    /// `sha256:...` of `config_bytes`.
    pub config_digest: String,
    /// The config blob.
    pub config_bytes: Vec<u8>,
    /// Layer digests and bytes, in manifest order.
    pub layers: Vec<(String, Vec<u8>)>,
}

/// One platform's entry of a [`TestIndex`].
#[derive(Clone, Debug)]
pub struct PlatformImage {
    /// `platform.os`, e.g. `linux`.
    pub os: String,
    /// `platform.architecture`, e.g. `arm64`.
    pub architecture: String,
    /// The platform's image, pushed by digest.
    pub image: TestImage,
}

/// An OCI image index as pushed, with its per-platform images.
#[derive(Clone, Debug)]
pub struct TestIndex {
    /// Repository it was pushed to.
    pub repo: String,
    /// Tag the index was pushed under.
    pub tag: String,
    /// `sha256:...` of `bytes`.
    pub digest: String,
    /// Exact index bytes.
    pub bytes: Vec<u8>,
    /// Always [`OCI_INDEX`].
    pub media_type: String,
    /// Per-platform images, in the order given to [`push_oci_index`].
    pub images: Vec<PlatformImage>,
}

// === impl TestImage ===

impl TestImage {
    /// Every blob of the image (config first, then layers) as `(digest, bytes)`.
    pub fn blobs(&self) -> Vec<(&str, &[u8])> {
        std::iter::once((self.config_digest.as_str(), self.config_bytes.as_slice()))
            .chain(self.layers.iter().map(|(d, b)| (d.as_str(), b.as_slice())))
            .collect()
    }

    /// Sum of the layer sizes in bytes.
    pub fn layer_bytes(&self) -> usize {
        self.layers.iter().map(|(_, b)| b.len()).sum()
    }
}

// === impl TestIndex ===

impl TestIndex {
    /// The image for `os`/`architecture`, if the index has one.
    pub fn image_for(&self, os: &str, architecture: &str) -> Option<&TestImage> {
        self.images
            .iter()
            .find(|p| p.os == os && p.architecture == architecture)
            .map(|p| &p.image)
    }
}

/// `sha256:` + lowercase hex of `bytes`, the digest form registries use.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Uploads one blob monolithically (`POST /v2/<repo>/blobs/uploads/`, then `PUT ?digest=`)
/// and returns its digest.
pub async fn push_blob(base_url: &str, repo: &str, bytes: &[u8]) -> String {
    push_blob_with(&Client::new(), base_url, repo, bytes).await
}

/// Pushes manifest bytes under `reference` (tag or digest) with `Content-Type: media_type`,
/// checks the registry computed the same digest, and returns it.
pub async fn push_manifest(
    base_url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> String {
    push_manifest_with(&Client::new(), base_url, repo, reference, media_type, bytes).await
}

/// Deletes a manifest by digest (`DELETE /v2/<repo>/manifests/<digest>`), e.g. to make a tag
/// vanish at the origin; the registry must have deletes enabled, which [`super::Registry`]
/// does.
pub async fn delete_manifest(base_url: &str, repo: &str, digest: &str) {
    let url = format!("{base_url}/v2/{repo}/manifests/{digest}");
    let response = Client::new()
        .delete(&url)
        .send()
        .await
        .expect("DELETE manifest");
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "DELETE {url}: {}",
        response.text().await.unwrap_or_default()
    );
}

/// Pushes an OCI image (`application/vnd.oci.image.manifest.v1+json`) with one uncompressed
/// tar layer per entry of `layer_sizes`, each holding a file of about that many bytes.
pub async fn push_oci_image(
    base_url: &str,
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
) -> TestImage {
    push_single(base_url, repo, tag, layer_sizes, seed, &MediaTypes::OCI).await
}

/// Like [`push_oci_image`], through `client` (one that trusts an HTTPS registry's CA, say).
pub async fn push_oci_image_with(
    client: &Client,
    base_url: &str,
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
) -> TestImage {
    let image = build_image(
        repo,
        tag,
        layer_sizes,
        seed,
        ("linux", "amd64"),
        &MediaTypes::OCI,
    );
    push_image(client, base_url, &image).await;
    image
}

/// Pushes a Docker schema 2 image (`application/vnd.docker.distribution.manifest.v2+json`),
/// otherwise like [`push_oci_image`].
pub async fn push_docker_image(
    base_url: &str,
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
) -> TestImage {
    push_single(base_url, repo, tag, layer_sizes, seed, &MediaTypes::DOCKER).await
}

/// Builds and pushes a linux/amd64 image with the given media types.
async fn push_single(
    base_url: &str,
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
    types: &MediaTypes,
) -> TestImage {
    let image = build_image(repo, tag, layer_sizes, seed, ("linux", "amd64"), types);
    push_image(&Client::new(), base_url, &image).await;
    image
}

/// Pushes one small OCI image per `(os, architecture)` by digest, then an OCI image index
/// listing them under `tag`.
pub async fn push_oci_index(
    base_url: &str,
    repo: &str,
    tag: &str,
    platforms: &[(&str, &str)],
    seed: u64,
) -> TestIndex {
    let client = Client::new();
    let mut images = Vec::with_capacity(platforms.len());
    for (i, &(os, architecture)) in platforms.iter().enumerate() {
        let platform_seed = mix(seed, 0x1000 + i as u64);
        let mut image = build_image(
            repo,
            "",
            &[2048, 4096],
            platform_seed,
            (os, architecture),
            &MediaTypes::OCI,
        );
        image.tag = image.manifest_digest.clone();
        push_image(&client, base_url, &image).await;
        images.push(PlatformImage {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            image,
        });
    }
    let manifests: Vec<Value> = images
        .iter()
        .map(|p| {
            json!({
                "mediaType": p.image.media_type,
                "digest": p.image.manifest_digest,
                "size": p.image.manifest_bytes.len(),
                "platform": { "architecture": p.architecture, "os": p.os },
            })
        })
        .collect();
    let bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .expect("serialize index");
    let digest = push_manifest_with(&client, base_url, repo, tag, OCI_INDEX, &bytes).await;
    TestIndex {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        digest,
        bytes,
        media_type: OCI_INDEX.to_owned(),
        images,
    }
}

/// The three media types that differ between OCI and Docker schema 2 images.
struct MediaTypes {
    manifest: &'static str,
    config: &'static str,
    layer: &'static str,
}

impl MediaTypes {
    const OCI: MediaTypes = MediaTypes {
        manifest: OCI_MANIFEST,
        config: OCI_CONFIG,
        layer: OCI_LAYER_TAR,
    };
    const DOCKER: MediaTypes = MediaTypes {
        manifest: DOCKER_MANIFEST,
        config: DOCKER_CONFIG,
        layer: DOCKER_LAYER_TAR,
    };
}

/// Builds layers, config and manifest in memory; nothing is pushed yet.
fn build_image(
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
    seed: u64,
    (os, architecture): (&str, &str),
    types: &MediaTypes,
) -> TestImage {
    let layers: Vec<(String, Vec<u8>)> = layer_sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let content = pseudo_random(mix(seed, i as u64), size);
            let tar = tar_with_file(&format!("layer{i}-{seed:016x}.bin"), &content);
            (sha256_digest(&tar), tar)
        })
        .collect();
    let diff_ids: Vec<&str> = layers.iter().map(|(d, _)| d.as_str()).collect();
    let config_bytes = serde_json::to_vec(&json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": architecture,
        "os": os,
        "config": { "Labels": { "dev.berth.test.seed": seed.to_string() } },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": layers.iter().map(|_| json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": "berth test harness",
        })).collect::<Vec<_>>(),
    }))
    .expect("serialize config");
    let config_digest = sha256_digest(&config_bytes);
    let manifest_bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": types.manifest,
        "config": {
            "mediaType": types.config,
            "digest": config_digest,
            "size": config_bytes.len(),
        },
        "layers": layers.iter().map(|(digest, bytes)| json!({
            "mediaType": types.layer,
            "digest": digest,
            "size": bytes.len(),
        })).collect::<Vec<_>>(),
    }))
    .expect("serialize manifest");
    TestImage {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        manifest_digest: sha256_digest(&manifest_bytes),
        manifest_bytes,
        media_type: types.manifest.to_owned(),
        config_digest,
        config_bytes,
        layers,
    }
}

/// Pushes every blob of `image`, then its manifest under `image.tag`.
async fn push_image(client: &Client, base_url: &str, image: &TestImage) {
    for (digest, bytes) in image.blobs() {
        let pushed = push_blob_with(client, base_url, &image.repo, bytes).await;
        assert_eq!(pushed, digest);
    }
    let digest = push_manifest_with(
        client,
        base_url,
        &image.repo,
        &image.tag,
        &image.media_type,
        &image.manifest_bytes,
    )
    .await;
    assert_eq!(digest, image.manifest_digest);
}

async fn push_blob_with(client: &Client, base_url: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let start = format!("{base_url}/v2/{repo}/blobs/uploads/");
    let response = client.post(&start).send().await.expect("POST blob upload");
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "POST {start}: {}",
        response.text().await.unwrap_or_default()
    );
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .expect("upload Location header")
        .to_owned();
    // Location may be absolute or relative, and already carries `_state` query parameters.
    let mut url = Url::parse(&start)
        .and_then(|base| base.join(&location))
        .expect("upload Location is a URL");
    url.query_pairs_mut().append_pair("digest", &digest);
    let response = client
        .put(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .expect("PUT blob");
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "PUT {url}: {}",
        response.text().await.unwrap_or_default()
    );
    digest
}

async fn push_manifest_with(
    client: &Client,
    base_url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> String {
    let url = format!("{base_url}/v2/{repo}/manifests/{reference}");
    let response = client
        .put(&url)
        .header(reqwest::header::CONTENT_TYPE, media_type)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("PUT manifest");
    let status = response.status();
    let header_digest = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(
        status,
        StatusCode::CREATED,
        "PUT {url}: {}",
        response.text().await.unwrap_or_default()
    );
    let digest = sha256_digest(bytes);
    assert_eq!(header_digest.as_deref(), Some(digest.as_str()), "PUT {url}");
    digest
}

/// Mixes a seed with a stream index (splitmix64 finalizer), so every layer gets its own stream.
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` deterministic pseudo-random bytes (xorshift64*) from `seed`.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut state = mix(seed, 0xb3e7) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A small OCI image manifest (a 64-byte config, no layers) that differs for every `seed`:
/// for origins that serve manifests whose blobs the test never asks for.
pub fn test_manifest(seed: u64) -> Vec<u8> {
    let config = pseudo_random(seed, 64);
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256_digest(&config),
            "size": config.len(),
        },
        "layers": [],
        "annotations": { "seed": seed.to_string() },
    }))
    .expect("manifest JSON")
}

/// A POSIX ustar archive holding one regular file `name` (mode 0644) with `content`.
///
/// Hand-written to avoid a dependency: one 512-byte header, the data padded to 512 bytes, and
/// the two zero blocks that end an archive.
pub fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    assert!(name.len() < 100, "tar name must fit the 100-byte field");
    let mut header = [0u8; 512];
    let mut put = |offset: usize, bytes: &[u8]| {
        header[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, name.as_bytes());
    put(100, b"0000644\0"); // mode
    put(108, b"0000000\0"); // uid
    put(116, b"0000000\0"); // gid
    put(124, format!("{:011o}\0", content.len()).as_bytes()); // size
    put(136, format!("{:011o}\0", 1_704_067_200u64).as_bytes()); // mtime 2024-01-01
    put(148, b"        "); // checksum, as spaces while summing
    put(156, b"0"); // typeflag: regular file
    put(257, b"ustar\0"); // magic
    put(263, b"00"); // version
    put(265, b"root"); // uname
    put(297, b"root"); // gname
    let checksum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());

    let padding = (512 - content.len() % 512) % 512;
    let mut tar = Vec::with_capacity(512 + content.len() + padding + 1024);
    tar.extend_from_slice(&header);
    tar.extend_from_slice(content);
    tar.resize(tar.len() + padding + 1024, 0);
    tar
}

/// Checks a skopeo `dir:` copy: the manifest is the pushed one and every blob file hashes to its
/// name and has the pushed length.
pub fn check_dir_copy(dir: &std::path::Path, img: &TestImage) {
    let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest.json");
    assert_eq!(manifest, img.manifest_bytes, "manifest bytes");
    for (digest, bytes) in img.blobs() {
        let hex = digest.trim_start_matches("sha256:");
        let got = std::fs::read(dir.join(hex)).unwrap_or_else(|_| panic!("blob {hex} copied"));
        assert_eq!(sha256_digest(&got), digest);
        assert_eq!(got.len(), bytes.len());
    }
}
