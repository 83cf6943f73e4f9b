//! End to end with real clients: skopeo (plain HTTP and TLS, with the origin stopped) and
//! containerd (`ctr images pull --hosts-dir`, so requests arrive with `?ns=`).

mod common;

use common::content::check_dir_copy;

use std::process::Stdio;

use common::berth::Berth;
use common::containerd::Containerd;
use common::{push_oci_image, push_oci_index, require_binary, Registry, Tap, TestCa};
use reqwest::Method;
use tokio::process::Command;

async fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .expect("command starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skopeo() -> Command {
    let mut c = Command::new(require_binary("skopeo"));
    c.arg("--insecure-policy");
    c
}

#[tokio::test]
async fn skopeo_pulls_through_berth_then_from_cache_then_with_origin_stopped() {
    let mut registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let berth = Berth::in_front_of(&tap.url()).tag_ttl("0s").start().await;
    let img = push_oci_image(
        &registry.url(),
        "e2e/app",
        "1.0",
        &[200_000, 150_000, 1_000_000],
        21,
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let src = |r: &str| format!("docker://{}/e2e/app{r}", berth.host());

    let first = work.path().join("first");
    run(skopeo()
        .args(["copy", "--src-tls-verify=false", &src(":1.0")])
        .arg(format!("dir:{}", first.display())))
    .await;
    check_dir_copy(&first, &img);
    let gets = tap.count(|m, p| m == Method::GET && p.contains("/blobs/"));
    assert_eq!(
        gets,
        img.blobs().len(),
        "each blob fetched once: {:?}",
        tap.requests()
    );

    // Second pull: no blob request reaches the origin.
    tap.clear();
    let second = work.path().join("second");
    run(skopeo()
        .args(["copy", "--src-tls-verify=false", &src(":1.0")])
        .arg(format!("dir:{}", second.display())))
    .await;
    check_dir_copy(&second, &img);
    assert_eq!(
        tap.count(|_, p| p.contains("/blobs/")),
        0,
        "{:?}",
        tap.requests()
    );

    // skopeo inspect lists tags through berth.
    let out = run(skopeo().args(["inspect", "--tls-verify=false", &src(":1.0")])).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], img.manifest_digest.as_str());
    assert!(
        v["RepoTags"].as_array().unwrap().iter().any(|t| t == "1.0"),
        "{out}"
    );

    // Origin stopped: by tag (stale mapping) and by digest still pull.
    registry.stop();
    for (name, r) in [
        ("by-tag", ":1.0".to_owned()),
        ("by-digest", format!("@{}", img.manifest_digest)),
    ] {
        let dest = work.path().join(name);
        run(skopeo()
            .args(["copy", "--src-tls-verify=false", &src(&r)])
            .arg(format!("dir:{}", dest.display())))
        .await;
        check_dir_copy(&dest, &img);
    }
}

#[tokio::test]
async fn skopeo_pulls_over_tls() {
    let registry = Registry::start().await;
    let img = push_oci_image(&registry.url(), "secure/app", "v2", &[64_000, 10_000], 22).await;
    let ca = TestCa::new();
    let berth = Berth::in_front_of(&registry.url()).tls(&ca).start().await;
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(ca.ca_path(), certs.path().join("ca.crt")).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let out = dest.path().join("img");
    run(skopeo()
        .args(["copy", "--src-cert-dir"])
        .arg(certs.path())
        .arg(format!(
            "docker://localhost:{}/secure/app:v2",
            berth.addr.port()
        ))
        .arg(format!("dir:{}", out.display())))
    .await;
    check_dir_copy(&out, &img);
}

#[tokio::test]
async fn containerd_pulls_through_berth_as_a_mirror_with_ns() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    // The origin is known to berth only by its host as an alias, and is not the default: the
    // pull can only succeed if containerd's `?ns=` reaches berth and is honoured.
    let origin_host = registry.host();
    let berth = Berth::with_upstreams(&format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{}\"\naliases = [\"{origin_host}\"]\nauth = \"public\"\n",
        tap.url()
    ))
    .start()
    .await;
    let idx = push_oci_index(
        &registry.url(),
        "ctr/app",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        23,
    )
    .await;

    let hosts = tempfile::tempdir().unwrap();
    let host_dir = hosts.path().join(&origin_host);
    std::fs::create_dir_all(&host_dir).unwrap();
    // `server` is a dead address: if berth failed, containerd would have nowhere to fall back.
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:9\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            berth.host()
        ),
    )
    .unwrap();

    let containerd = Containerd::start().await;
    let image = format!("{origin_host}/ctr/app:v1");
    run(containerd
        .ctr()
        .args([
            "images",
            "pull",
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            "--hosts-dir",
        ])
        .arg(hosts.path())
        .arg(&image))
    .await;
    let list = run(containerd.ctr().args(["images", "list"])).await;
    assert!(list.contains(&idx.digest), "{list}");
    let amd64 = idx.image_for("linux", "amd64").unwrap();
    for (digest, _) in amd64.blobs() {
        assert_eq!(
            tap.count(|m, p| m == Method::GET && p.ends_with(&format!("/blobs/{digest}"))),
            1,
            "{:?}",
            tap.requests()
        );
    }
    // containerd fetched every blob of the platform through berth (each exactly once: a
    // re-fetch or a fetch that bypassed berth would change the count), and nothing of the
    // other platform.
    let served = berth
        .metric("berth_http_requests_total{method=\"GET\",route=\"blob\",status=\"200\"}")
        .await;
    assert_eq!(served, amd64.blobs().len() as f64);
    let arm64 = idx.image_for("linux", "arm64").unwrap();
    for (digest, _) in arm64.layers.iter() {
        assert_eq!(
            tap.count(|_, p| p.ends_with(&format!("/blobs/{digest}"))),
            0,
            "the other platform's layers are never fetched"
        );
    }
    let content = run(containerd.ctr().args(["content", "ls"])).await;
    for (digest, _) in amd64.blobs() {
        assert!(content.contains(digest), "{content}");
    }
}

/// containerd's own token dance through a `passthrough` upstream: `ctr images pull --user`
/// logs in at berth's realm with the origin credentials, berth passes them to the origin's
/// token service, and the pull completes; a user the origin refuses and an anonymous pull fail
/// with an authorization error, even though berth has every byte cached.
#[tokio::test]
async fn containerd_pulls_a_private_image_with_user_through_passthrough() {
    use common::issuer::{Grantee, TokenIssuer};
    let issuer = TokenIssuer::builder()
        .user("alice", "pw-alice-ctr")
        .user("bob", "pw-bob-ctr")
        .allow(Grantee::user("alice"), "private/*", &["pull"])
        .start()
        .await;
    let registry = issuer.start_registry().await;
    let img = issuer
        .push_oci_image(&registry, "private/app", "v1", &[120_000, 4_000], 61)
        .await;
    let origin_host = registry.host();
    let berth = Berth::with_upstreams(&format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{}\"\naliases = [\"{origin_host}\"]\nauth = \"passthrough\"\n",
        registry.url()
    ))
    .start()
    .await;
    let hosts = tempfile::tempdir().unwrap();
    let host_dir = hosts.path().join(&origin_host);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:9\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            berth.host()
        ),
    )
    .unwrap();
    let containerd = Containerd::start().await;
    let image = format!("{origin_host}/private/app:v1");
    let pull = |user: Option<&str>| {
        let mut cmd = containerd.ctr();
        cmd.args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(hosts.path());
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        cmd.arg(&image).stdin(Stdio::null());
        async move { cmd.output().await.expect("ctr starts") }
    };

    let out = pull(Some("alice:pw-alice-ctr")).await;
    assert!(
        out.status.success(),
        "alice: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = run(containerd.ctr().args(["content", "ls"])).await;
    for (digest, _) in img.blobs() {
        assert!(content.contains(digest), "{content}");
    }
    run(containerd.ctr().args(["images", "rm", &image])).await;
    // Everything is cached now; bob and anonymous still get nothing.
    for user in [Some("bob:pw-bob-ctr"), Some("alice:wrong-password"), None] {
        let out = pull(user).await;
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{user:?} must not pull private/app");
        assert!(
            err.contains("401") || err.contains("unauthorized") || err.contains("authoriz"),
            "{user:?} refused for the wrong reason: {err}"
        );
    }
    let images = run(containerd.ctr().args(["images", "list", "-q"])).await;
    assert!(!images.contains("private/app"), "{images}");
}
