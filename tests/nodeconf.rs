//! `berth node-config` with the real clients: containerd pulls through berth using only the
//! `hosts.toml` files the command wrote (`ctr images pull --hosts-dir`), and skopeo resolves
//! through berth using only the `registries.conf.d` drop-in it wrote (`--registries-conf`).
//!
//! The image references name a registry host that does not resolve
//! (`registry.berth-test.invalid`): only the written files tie it to berth and to the origin.

mod common;

use common::content::check_dir_copy;

use std::path::Path;
use std::process::{Output, Stdio};

use common::berth::Berth;
use common::containerd::Containerd;
use common::{push_oci_image, push_oci_index, require_binary, Registry};
use tokio::process::Command;

/// The registry host the runtimes are told about; berth knows it as an alias of its upstream.
const REGISTRY_HOST: &str = "registry.berth-test.invalid";

/// The `[[upstream]]` table shared by the running berth and the node-config run.
fn upstream_table(origin_url: &str) -> String {
    format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{origin_url}\"\naliases = [\"{REGISTRY_HOST}\"]\nauth = \"public\"\n"
    )
}

async fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn run(cmd: &mut Command) -> String {
    let out = output(cmd).await;
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `berth node-config` as an operator runs it, against a config file holding `upstreams`.
fn node_config(config: &Path, mirror: &str, dirs: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.arg("node-config")
        .arg("--config")
        .arg(config)
        .args(["--mirror", mirror])
        .arg("--containerd-dir")
        .arg(dirs.join("certs.d"))
        .arg("--registries-dir")
        .arg(dirs.join("registries.conf.d"));
    c
}

fn write_config(dir: &Path, upstreams: &str) -> std::path::PathBuf {
    let path = dir.join("berth.toml");
    std::fs::write(&path, upstreams).unwrap();
    path
}

/// Blob GETs berth answered 200, from its metrics.
fn blob_gets(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("berth_http_requests_total{method=\"GET\",route=\"blob\",status=\"200\"}")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn containerd_pulls_through_berth_with_only_the_written_hosts_dir() {
    let registry = Registry::start().await;
    let berth = Berth::with_upstreams(&upstream_table(&registry.url()))
        .start()
        .await;
    let idx = push_oci_index(
        &registry.url(),
        "ctr/app",
        "v1",
        &[("linux", "amd64"), ("linux", "arm64")],
        71,
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), &upstream_table(&registry.url()));
    let dirs = work.path().join("etc");
    run(&mut node_config(&config, &berth.url(), &dirs)).await;
    let hosts = dirs.join("certs.d");
    assert!(hosts.join(REGISTRY_HOST).join("hosts.toml").is_file());

    let containerd = Containerd::start().await;
    let image = format!("{REGISTRY_HOST}/ctr/app:v1");
    let before = blob_gets(&berth.metrics().await);
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
        .arg(&hosts)
        .arg(&image))
    .await;
    let list = run(containerd.ctr().args(["images", "list"])).await;
    assert!(list.contains(&idx.digest), "{list}");
    let amd64 = idx.image_for("linux", "amd64").unwrap();
    let served = blob_gets(&berth.metrics().await) - before;
    assert_eq!(
        served,
        amd64.blobs().len() as u64,
        "every blob came through berth"
    );
    let content = run(containerd.ctr().args(["content", "ls"])).await;
    for (digest, _) in amd64.blobs() {
        assert!(content.contains(digest), "{content}");
    }
}

#[tokio::test]
async fn skopeo_resolves_through_berth_with_only_the_written_drop_in() {
    let skopeo = require_binary("skopeo");
    let registry = Registry::start().await;
    let berth = Berth::with_upstreams(&upstream_table(&registry.url()))
        .start()
        .await;
    let img = push_oci_image(&registry.url(), "e2e/app", "1.0", &[120_000, 40_000], 72).await;
    let work = tempfile::tempdir().unwrap();
    let config = write_config(work.path(), &upstream_table(&registry.url()));
    let dirs = work.path().join("etc");
    run(&mut node_config(&config, &berth.url(), &dirs)).await;
    let drop_in = dirs.join("registries.conf.d").join("50-berth.conf");

    let before = blob_gets(&berth.metrics().await);
    let dest = work.path().join("copy");
    run(Command::new(&skopeo)
        .arg("--insecure-policy")
        .arg("--registries-conf")
        .arg(&drop_in)
        .arg("copy")
        .arg(format!("docker://{REGISTRY_HOST}/e2e/app:1.0"))
        .arg(format!("dir:{}", dest.display())))
    .await;
    check_dir_copy(&dest, &img);
    let served = blob_gets(&berth.metrics().await) - before;
    assert_eq!(
        served,
        img.blobs().len() as u64,
        "every blob came through berth"
    );
}

#[tokio::test]
async fn node_config_is_idempotent_reversible_and_leaves_foreign_files_alone() {
    let work = tempfile::tempdir().unwrap();
    let upstreams = "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\naliases = [\"docker.io\"]\ndefault = true\nauth = \"public\"\n\
                     [[upstream]]\nname = \"quay\"\nurl = \"https://quay.io\"\naliases = [\"quay.io\"]\nauth = \"public\"\n";
    let config = write_config(work.path(), upstreams);
    let dirs = work.path().join("etc");
    let mirror = "http://127.0.0.1:5000";
    let hub = dirs.join("certs.d/docker.io/hosts.toml");
    let quay = dirs.join("certs.d/quay.io/hosts.toml");
    let drop_in = dirs.join("registries.conf.d/50-berth.conf");

    // --dry-run prints the plan and the contents, writes nothing.
    let out = run(node_config(&config, mirror, &dirs).arg("--dry-run")).await;
    assert!(
        out.contains(&format!("would write {}", hub.display())),
        "{out}"
    );
    assert!(out.contains("[host.\"http://127.0.0.1:5000\"]"), "{out}");
    assert!(!dirs.exists(), "dry run created {}", dirs.display());

    run(&mut node_config(&config, mirror, &dirs)).await;
    let written = std::fs::read_to_string(&hub).unwrap();
    assert!(
        written.contains("server = \"https://registry-1.docker.io\""),
        "{written}"
    );
    assert!(quay.is_file() && drop_in.is_file());

    // A second run changes nothing.
    let out = run(&mut node_config(&config, mirror, &dirs)).await;
    assert_eq!(out.matches("unchanged").count(), 3, "{out}");
    assert!(!out.contains("wrote"), "{out}");

    // An operator's own file is never touched, and the run says so with status 1.
    let own = dirs.join("certs.d/docker.io/hosts.toml");
    std::fs::write(&own, "server = \"https://mine.example\"\n").unwrap();
    let out = output(&mut node_config(&config, mirror, &dirs)).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("not written by berth"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&own).unwrap(),
        "server = \"https://mine.example\"\n"
    );

    // --remove deletes what berth wrote, and only that.
    let out = output(node_config(&config, mirror, &dirs).arg("--remove")).await;
    assert!(
        text(&out).contains(&format!("removed {}", quay.display())),
        "{}",
        text(&out)
    );
    assert!(!quay.exists() && !quay.parent().unwrap().exists());
    assert!(!drop_in.exists());
    assert!(own.is_file(), "the operator's file survives --remove");

    // A bad mirror URL is a usage error.
    let out = output(&mut node_config(&config, "berth:5000", &dirs)).await;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}
