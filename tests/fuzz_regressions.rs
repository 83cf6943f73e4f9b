//! Inputs the cargo-fuzz targets in `fuzz/` found to crash a parser, fed to the same public
//! entry points, so that each fix stays fixed without a nightly toolchain. Each test names its
//! target and says what the input was.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use berth::auth::jwt;
use berth::bundle::{self, BundleError};
use berth::cache::Cache;
use berth::config::{CacheConfig, Config};
use berth::oci::{media, Digest};
use berth::upstream::{parse_token_response, TokenCache, Upstreams};

/// A JWT whose claims are `json`, as the `jwt_claims` target builds them.
fn token_with_claims(json: &str) -> String {
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    format!("eyJhbGciOiJFUzI1NiJ9.{claims}.c2ln")
}

/// `jwt_claims`: a client's bearer token stating `exp` past what `SystemTime` holds (here
/// 14555742147232889634, from the crash input `"{\xff\xff\\b\x00\xca`) panicked on overflow
/// while berth computed how long to reuse an authorization decision.
#[test]
fn jwt_exp_beyond_system_time_states_no_expiry() {
    for exp in [14_555_742_147_232_889_634u64, u64::MAX, 1 << 63] {
        let t = token_with_claims(&format!(r#"{{"sub":"ci","exp":{exp}}}"#));
        assert_eq!(jwt::expiry(&t), None, "exp {exp}");
        assert_eq!(jwt::remaining(&t), None, "exp {exp}");
    }
    // An ordinary expiry is still read.
    let t = token_with_claims(r#"{"exp":4102444800}"#);
    assert_eq!(
        jwt::expiry(&t),
        Some(UNIX_EPOCH + Duration::from_secs(4_102_444_800))
    );
}

/// `token_response`: a token service granting `expires_in` near `u64::MAX` seconds (here
/// 18381441875293836066, from the crash input's first eight bytes `"\x13a\x1c\xff\xff\x17\xff`)
/// overflowed `Instant` when berth cached the token, a panic any origin's token service could
/// cause on every pull that needs a token.
#[test]
fn token_granted_for_longer_than_instant_holds_is_cached() {
    for n in [18_381_441_875_293_836_066u64, u64::MAX, 1 << 63] {
        let body = format!(r#"{{"token":"t","expires_in":{n}}}"#);
        let (token, life) = parse_token_response(body.as_bytes()).unwrap();
        let cache = TokenCache::default();
        cache.put("repository:library/alpine:pull", token, life);
        let kept = cache.get("repository:library/alpine:pull").unwrap();
        assert_eq!(kept.expose(), "t");
    }
}

/// An OCI layout archive of `members` (name, content), as the `bundle` target writes one.
fn write_bundle(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    std::fs::write(path, tar.into_inner().unwrap()).unwrap();
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// `bundle`: an archive holding the same blob twice staged both copies under one digest and
/// removed only the second temp file, so every refused or accepted import of such a bundle left
/// files in the cache's `tmp/` (crash input: a layout with a repeated blob and an `index.json`
/// listing no images, refused as corrupt with three staged files left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn bundle_with_a_repeated_member_leaves_no_staged_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig {
        dir: dir.path().join("cache"),
        disk_bytes: 1 << 30,
        memory_bytes: 1 << 20,
        memory_max_object_bytes: 64 << 10,
        tag_ttl: Duration::from_secs(300),
        tag_ttl_min: Duration::ZERO,
        tag_ttl_max: Duration::from_secs(86_400),
        max_concurrent_fills: 64,
        fill_queue_timeout: Duration::from_secs(60),
        shared: None,
    };
    let config = Config::from_toml(
        "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\nauth = \"public\"\n",
    )
    .unwrap();
    let upstreams = Upstreams::new(&config.upstreams).unwrap();
    let cache = Cache::open(&cfg).unwrap();

    let layer = b"layer".to_vec();
    let layer_d = Digest::sha256_of(&layer);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"digest": layer_d.to_string(), "size": layer.len()},
        "layers": [{"digest": layer_d.to_string(), "size": layer.len()}],
    })
    .to_string()
    .into_bytes();
    let manifest_d = Digest::sha256_of(&manifest);
    let member = |d: &Digest, b: &[u8]| (format!("blobs/sha256/{}", d.hex()), b.to_vec());
    let index = |images: serde_json::Value| {
        (
            "index.json".to_owned(),
            serde_json::json!({"schemaVersion": 2, "manifests": images})
                .to_string()
                .into_bytes(),
        )
    };

    // Refused: the index lists no images.
    let refused = dir.path().join("refused.tar");
    write_bundle(
        &refused,
        &[
            index(serde_json::json!([])),
            member(&layer_d, &layer),
            member(&layer_d, &layer),
            member(&manifest_d, &manifest),
        ],
    );
    let r = bundle::import(&cache, &upstreams, &refused, false).await;
    assert!(matches!(r, Err(BundleError::Corrupt(_))), "{r:?}");
    assert_eq!(files_in(&cfg.dir.join("tmp")), 0, "after {r:?}");

    // Accepted: the repeated blob is stored once and nothing stays staged.
    let accepted = dir.path().join("accepted.tar");
    write_bundle(
        &accepted,
        &[
            index(serde_json::json!([{
                "mediaType": media::OCI_MANIFEST,
                "digest": manifest_d.to_string(),
                "size": manifest.len(),
            }])),
            member(&layer_d, &layer),
            member(&manifest_d, &manifest),
            member(&layer_d, &layer),
        ],
    );
    let r = bundle::import(&cache, &upstreams, &accepted, false)
        .await
        .unwrap();
    assert_eq!((r.images, r.manifests, r.blobs), (1, 1, 1));
    assert!(cache.store().has_blob(&layer_d));
    assert_eq!(files_in(&cfg.dir.join("tmp")), 0);
}
