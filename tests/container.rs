//! The container image, built exactly as README.md tells operators
//! (`bash deploy/container/build.sh`) and run the way a cluster runs it: rootful podman, the root
//! filesystem read-only, the cache on a volume, the config mounted over /etc/berth. A real
//! docker-registry is the origin and skopeo pulls through the container.
//!
//! Needs root and podman (`.ci/install-deps` installs it); like every test here it fails, never
//! skips, when they are missing.

mod common;

use common::content::check_dir_copy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, push_oci_image, require_binary, Registry};

/// The tag build.sh gives the image by default: `berth:<crate version>`.
const IMAGE: &str = concat!("berth:", env!("CARGO_PKG_VERSION"));
/// The uid/gid the image runs as.
const BERTH_UID: u32 = 65532;
/// How long the container may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .expect("Uid line");
    assert_eq!(
        uid, "0",
        "the container test runs rootful podman and needs root (CI runs as root)"
    );
}

/// Runs a command to completion and returns its output, panicking with everything it printed
/// when it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} did not start: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn podman() -> Command {
    Command::new(require_binary("podman"))
}

/// The run options this machine's rootful podman needs (README "Container image"): runc, host
/// network, explicit rlimits (the sandbox cannot raise them past the hard limit).
fn run_options() -> Vec<String> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
    let nofile = hard.min(65536);
    vec![
        "--runtime".into(),
        "runc".into(),
        "--network".into(),
        "host".into(),
        "--ulimit".into(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
    ]
}

/// A container and a volume removed when the test ends, whatever happened.
struct Cleanup {
    container: String,
    volume: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "-f", "-t", "0", &self.container])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = podman()
            .args(["volume", "rm", "-f", &self.volume])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Builds the image with the README's command, timing it.
fn build_image() -> Duration {
    let started = Instant::now();
    run(Command::new("bash")
        .arg("deploy/container/build.sh")
        .current_dir(repo_root()));
    let took = started.elapsed();
    eprintln!("image build took {:.1}s", took.as_secs_f64());
    took
}

/// Polls the admin listener until `/readyz` answers 200, the container stops, or the deadline
/// passes.
async fn wait_ready(admin: &str, container: &str) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(r) = client.get(format!("http://{admin}/readyz")).send().await {
            if r.status() == reqwest::StatusCode::OK {
                return;
            }
        }
        let state = stdout(&run(podman().args([
            "inspect",
            "--format",
            "{{.State.Status}}",
            container,
        ])));
        if state != "running" || Instant::now() > deadline {
            let logs = podman().args(["logs", container]).output().unwrap();
            panic!(
                "container {state}, /readyz not 200 within {READY_TIMEOUT:?}; logs:\n{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn image_builds_runs_read_only_serves_pulls_and_stops_cleanly_on_sigterm() {
    require_root();
    require_binary("podman");
    require_binary("runc");
    let skopeo = require_binary("skopeo");
    let build_time = build_image();

    // The image as built: non-root, labelled, small, berth as entrypoint.
    let inspect = stdout(&run(podman().args(["image", "inspect", IMAGE])));
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("inspect JSON");
    let img = &v[0];
    assert_eq!(img["Config"]["User"], format!("{BERTH_UID}:{BERTH_UID}"));
    assert_eq!(img["Config"]["Entrypoint"][0], "/usr/local/bin/berth");
    assert_eq!(img["Config"]["Cmd"][0], "serve");
    let labels = &img["Config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        labels["org.opencontainers.image.source"].is_string(),
        "{labels}"
    );
    assert!(
        labels["org.opencontainers.image.revision"].is_string(),
        "{labels}"
    );
    let size = img["Size"].as_u64().expect("image size");
    eprintln!(
        "image {IMAGE}: {size} bytes, built in {:.1}s",
        build_time.as_secs_f64()
    );
    assert!(size < 40 << 20, "image is {size} bytes, expected < 40 MiB");
    // The image's own default config is valid (`check-config` through the entrypoint).
    let mut check = podman();
    check
        .args(["run", "--rm", "--read-only"])
        .args(run_options())
        .args([IMAGE, "check-config"]);
    let out = stdout(&run(&mut check));
    assert!(out.contains("/etc/berth/berth.toml: ok"), "{out}");

    // The origin, reached by host name so the static binary's own resolver is exercised.
    let registry = Registry::start().await;
    let pushed = push_oci_image(&registry.url(), "e2e/app", "1.0", &[300_000, 1_200_000], 61).await;
    let port = free_port();
    let admin_port = free_port();
    let config_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        config_dir.path().join("berth.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"10s\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [cache]\ndir = \"/var/cache/berth\"\ndisk_bytes = \"1GiB\"\n\
             [[upstream]]\nname = \"origin\"\nurl = \"http://localhost:{}\"\ndefault = true\nauth = \"public\"\n",
            registry.addr().port()
        ),
    )
    .unwrap();

    let id = std::process::id();
    let guard = Cleanup {
        container: format!("berth-test-{id}"),
        volume: format!("berth-test-cache-{id}"),
    };
    run(podman().args(["volume", "create", &guard.volume]));
    let mut create = podman();
    create
        .args(["run", "-d", "--name", &guard.container, "--read-only"])
        .args(run_options())
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .arg("-v")
        .arg(format!("{}:/var/cache/berth", guard.volume))
        .arg("-v")
        .arg(format!("{}:/etc/berth:ro", config_dir.path().display()))
        .arg(IMAGE);
    run(&mut create);
    let admin = format!("127.0.0.1:{admin_port}");
    wait_ready(&admin, &guard.container).await;

    // Pull through the container.
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("copy");
    run(Command::new(&skopeo)
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://127.0.0.1:{port}/e2e/app:1.0"))
        .arg(format!("dir:{}", dest.display())));
    check_dir_copy(&dest, &pushed);

    // The blobs landed on the volume, owned by the image's user.
    let mountpoint = stdout(&run(podman().args([
        "volume",
        "inspect",
        "--format",
        "{{.Mountpoint}}",
        &guard.volume,
    ])));
    for (digest, _) in pushed.blobs() {
        let hex = digest.trim_start_matches("sha256:");
        let path = Path::new(&mountpoint)
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        let meta = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{} on the volume: {e}", path.display()));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.uid(), BERTH_UID, "{} owner", path.display());
    }

    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("berth_http_requests_total{method=\"GET\",route=\"blob\",status=\"200\"}"),
        "{metrics}"
    );

    // SIGTERM (podman stop's signal for this image) ends berth cleanly, well before the 30 s
    // after which podman would kill it.
    let stopping = Instant::now();
    run(podman().args(["stop", "-t", "30", &guard.container]));
    let stop_time = stopping.elapsed();
    let exit = stdout(&run(podman().args([
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &guard.container,
    ])));
    let logs = podman().args(["logs", &guard.container]).output().unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(exit, "0", "exit code after SIGTERM; logs:\n{logs}");
    assert!(
        stop_time < Duration::from_secs(25),
        "stop took {stop_time:?}"
    );
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "logs to a pipe carry no terminal colour codes:\n{logs}"
    );
    drop(guard);
}
