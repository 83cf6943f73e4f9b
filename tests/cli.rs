//! The `berth` binary as an operator runs it: config checking with exit status 64, overrides by
//! flag and environment, and serve → ready → SIGTERM → clean exit.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn example_config() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
}

#[test]
fn example_config_is_valid() {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(example_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_problem_is_listed_with_status_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "surprise = 1\n[server]\nlisten = \"not-an-address\"\n[cache]\ndisk_bytes = \"lots\"\n[[upstream]]\nname = \"x\"\nurl = \"ftp://nope\"\nauth = \"sometimes\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "surprise",
        "server.listen",
        "cache.disk_bytes",
        "upstream[0].url",
        "upstream[0].auth",
    ] {
        assert!(err.contains(needle), "{needle} missing from:\n{err}");
    }
}

#[test]
fn overrides_by_flag_and_environment_are_validated_too() {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(example_config())
        .args(["--set", "cache.tag_ttl=whenever"])
        .env("BERTH_CACHE__DISK_BYTES", "12 parsecs")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.tag_ttl"), "{err}");
    assert!(err.contains("cache.disk_bytes"), "{err}");
}

#[test]
fn serve_with_a_bad_config_binds_nothing() {
    // Hold the port: a serve that bound its listener before checking the config would fail
    // with "address in use" (another exit status) instead of reporting the bad key.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(example_config())
        .args(["--set", &format!("server.listen=127.0.0.1:{port}")])
        .args(["--set", "upstream.0.url=not a url"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("upstream"), "the bad key is named: {err}");
    assert!(
        !err.contains("in use") && !err.to_lowercase().contains("bind"),
        "no listener was attempted: {err}"
    );
    drop(held);
}

/// `berth serve` on the example config with both listeners on ports that were free a moment
/// ago, retried with new ports when another process took one first.
fn spawn_example(cache: &Path) -> (std::process::Child, u16, u16) {
    let mut last = String::new();
    for _ in 0..4 {
        let port = common::free_port();
        let admin = common::free_port();
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(example_config())
            .args(["--set", &format!("server.listen=127.0.0.1:{port}")])
            .args(["--set", &format!("admin.listen=127.0.0.1:{admin}")])
            .args(["--log-format", "json"])
            .env("BERTH_CACHE__DIR", cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Either both listeners answer, or the process exits (a port was taken).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                last = err;
                break;
            }
            let up = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
            if up(port) && up(admin) {
                return (child, port, admin);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "berth serve did not bind within 20 s"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(last.contains("in use"), "berth serve exited: {last}");
    }
    panic!("no free port pair after 4 attempts: {last}");
}

#[tokio::test]
async fn serve_runs_the_example_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (mut child, port, admin) = tokio::task::spawn_blocking(move || spawn_example(&cache))
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut ready = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
        {
            if r.status().is_success() {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "berth did not become ready");
    let base = client
        .get(format!("http://127.0.0.1:{port}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(base.status(), 200);
    let health = client
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = client
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("berth_build_info"), "{metrics}");
    assert!(
        metrics
            .contains("berth_http_requests_total{method=\"GET\",route=\"base\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(
        dir.path().join("cache/blobs").is_dir(),
        "cache directory created from the env override"
    );

    let mut stderr = child.stderr.take().unwrap();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // The request log: one JSON object per line, the request's under its own target, written
    // by the exit at the latest.
    let mut err = String::new();
    use std::io::Read;
    stderr.read_to_string(&mut err).unwrap();
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let requests: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "berth::request")
        .collect();
    assert_eq!(requests.len(), 1, "{err}");
    let r = requests[0];
    assert_eq!(
        (
            &r["method"],
            &r["path"],
            &r["route"],
            &r["status"],
            &r["bytes"]
        ),
        (
            &"GET".into(),
            &"/v2/".into(),
            &"base".into(),
            &200.into(),
            &2.into()
        ),
        "{err}"
    );
    assert!(r["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{err}");
}

#[test]
fn offline_with_passthrough_is_refused_at_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        "[cache]\ndir = \"cache\"\n[[upstream]]\nname = \"hub\"\nurl = \"https://registry-1.docker.io\"\n\
         default = true\nauth = \"passthrough\"\noffline = true\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("offline") && err.contains("passthrough"),
        "the conflict is named: {err}"
    );
    // `serve --offline` refuses a passthrough upstream the same way.
    std::fs::write(
        &config,
        "[cache]\ndir = \"cache\"\n[[upstream]]\nname = \"hub\"\nurl = \"https://registry-1.docker.io\"\n\
         default = true\nauth = \"passthrough\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--offline", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("passthrough"), "{err}");
}
