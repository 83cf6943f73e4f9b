//! Helpers for the air-gap tests (`tests/airgap.rs`): config files for the `berth` binary, runs
//! of `berth warm` / `export` / `import` / `serve --offline` as child processes, skopeo runs,
//! cache directory listings, OCI error bodies, and the layout of a tar archive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::{free_port, require_binary};

/// The `berth` binary under test (Cargo builds it for integration tests).
pub const BIN: &str = env!("CARGO_BIN_EXE_berth");

/// One `[[upstream]]` table: default, `public`, aliased to `alias` (the origin's `host:port`, so
/// that references naming that host match it), optionally `offline = true`.
pub fn upstream_table(url: &str, alias: &str, offline: bool) -> String {
    format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{url}\"\naliases = [\"{alias}\"]\ndefault = true\nauth = \"public\"\noffline = {offline}\nconnect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n"
    )
}

/// Writes a config file for the binary at `path`: loopback listener on an ephemeral port (serve
/// overrides it with `--set`), the cache in `cache_dir` with a `disk_bytes` budget, and one
/// online upstream.
pub fn write_config(
    path: &Path,
    cache_dir: &Path,
    disk_bytes: &str,
    url: &str,
    alias: &str,
) -> PathBuf {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[cache]\ndir = \"{}\"\ndisk_bytes = \"{disk_bytes}\"\n{}",
        cache_dir.display(),
        upstream_table(url, alias, false)
    );
    std::fs::write(path, text).expect("write config");
    path.to_owned()
}

/// A finished child process: exit code and both outputs.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub command: String,
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Everything it printed, for assertion messages and the closing note.
    pub fn transcript(&self) -> String {
        format!(
            "$ {}\n[exit {:?}]\n--- stdout ---\n{}--- stderr ---\n{}",
            self.command, self.code, self.stdout, self.stderr
        )
    }

    /// Panics with the transcript unless it exited 0.
    pub fn expect_ok(self) -> Run {
        assert!(self.ok(), "command failed:\n{}", self.transcript());
        self
    }
}

async fn run(program: &Path, args: &[String]) -> Run {
    let command = format!(
        "{} {}",
        program.file_name().unwrap_or_default().to_string_lossy(),
        args.join(" ")
    );
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        Command::new(program)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{command}: still running after 180 s"))
    .unwrap_or_else(|e| panic!("{command}: cannot start: {e}"));
    Run {
        command,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the `berth` binary with `args` and waits for it (at most 180 s).
pub async fn berth(args: &[String]) -> Run {
    run(Path::new(BIN), args).await
}

/// Runs `skopeo --insecure-policy <args>`.
pub async fn skopeo(args: &[String]) -> Run {
    let mut all = vec!["--insecure-policy".to_owned()];
    all.extend(args.iter().cloned());
    run(&require_binary("skopeo"), &all).await
}

/// `skopeo copy` of `docker://<host>/<image>` (plain HTTP) into `dir:<dest>` for `os`/`arch`.
pub async fn skopeo_pull(host: &str, image: &str, arch: &str, dest: &Path) -> Run {
    skopeo(&[
        "--override-os".into(),
        "linux".into(),
        "--override-arch".into(),
        arch.into(),
        "copy".into(),
        "--src-tls-verify=false".into(),
        format!("docker://{host}/{image}"),
        format!("dir:{}", dest.display()),
    ])
    .await
}

/// `args` as owned strings.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The summary line of `berth warm`: `warmed A of B image(s): F bytes fetched, S bytes already
/// cached`, as (A, B, F, S).
pub fn warm_summary(stdout: &str) -> Option<(usize, usize, u64, u64)> {
    let line = stdout.lines().find(|l| l.starts_with("warmed "))?;
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums.as_slice() {
        [a, b, f, s] => Some((*a as usize, *b as usize, *f, *s)),
        _ => None,
    }
}

/// Every file under the cache's `blobs/`, `manifests/` and `tags/` with its size, by path
/// relative to the cache directory.
pub fn cache_listing(cache: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for sub in ["blobs", "manifests", "tags"] {
        walk(cache, &cache.join(sub), &mut out);
    }
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let meta = e.metadata().expect("metadata");
        if meta.is_dir() {
            walk(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            out.insert(rel, meta.len());
        }
    }
}

/// Files left in the cache's `tmp/`.
pub fn tmp_files(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("tmp"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Where a blob lives in the cache directory.
pub fn blob_file(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Where a manifest lives in the cache directory.
pub fn manifest_file(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join("manifests/sha256").join(&hex[..2]).join(hex)
}

/// An OCI error answer: status, the first error's code and message, and the raw body.
#[derive(Debug)]
pub struct OciError {
    /// HTTP status.
    pub status: u16,
    /// `errors[0].code`.
    pub code: String,
    /// `errors[0].message`.
    pub message: String,
    /// The body as received.
    pub body: String,
}

/// GETs `url` (with `accept` values, if any) and reads the OCI error body.
pub async fn get_error(url: &str, accept: &[&str]) -> OciError {
    let mut req = reqwest::Client::new().get(url);
    for a in accept {
        req = req.header(reqwest::header::ACCEPT, *a);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    OciError {
        status,
        code: v["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
        message: v["errors"][0]["message"].as_str().unwrap_or("").to_owned(),
        body,
    }
}

/// One member of a tar archive: its name, where its data starts and how long it is.
#[derive(Debug, Clone)]
pub struct TarMember {
    /// Path inside the archive.
    pub name: String,
    /// Offset of the first data byte in the archive file.
    pub offset: u64,
    /// Data length.
    pub size: u64,
}

/// The members of a tar archive, in order.
pub fn tar_members(path: &Path) -> Vec<TarMember> {
    let file = std::fs::File::open(path).expect("open archive");
    let mut archive = tar::Archive::new(file);
    archive
        .entries()
        .expect("tar entries")
        .map(|e| {
            let e = e.expect("tar entry");
            TarMember {
                name: e.path().expect("entry path").to_string_lossy().into_owned(),
                offset: e.raw_file_position(),
                size: e.size(),
            }
        })
        .collect()
}

/// `berth serve --config F --offline` as a child process on a port of its own; SIGKILLed on
/// drop, SIGTERMed by [`BerthProcess::stop`].
pub struct BerthProcess {
    child: Option<std::process::Child>,
    /// The client listener's port.
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl BerthProcess {
    /// Starts `berth serve --config <config> --offline` and waits until `GET /v2/` answers.
    pub async fn serve_offline(config: &Path) -> BerthProcess {
        BerthProcess::serve(config, &["--offline"]).await
    }

    /// Starts `berth serve --config <config> <extra...>` and waits until `GET /v2/` answers.
    pub async fn serve(config: &Path, extra: &[&str]) -> BerthProcess {
        BerthProcess::serve_with_env(config, extra, &[]).await
    }

    /// Like [`BerthProcess::serve`], with `env` added to berth's environment (object-store
    /// credentials, say).
    pub async fn serve_with_env(
        config: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> BerthProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut last = String::new();
        for attempt in 0..4 {
            let port = free_port();
            let log = dir.path().join(format!("serve-{attempt}.log"));
            let mut child = std::process::Command::new(BIN)
                .arg("serve")
                .args(extra)
                .arg("--config")
                .arg(config)
                .args(["--set", &format!("server.listen=127.0.0.1:{port}")])
                .env_remove("RUST_LOG")
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn berth serve");
            match wait_ready(&mut child, port, &log).await {
                Ok(()) => {
                    return BerthProcess {
                        child: Some(child),
                        port,
                        log,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = e;
                    if !last.contains("in use") {
                        break;
                    }
                }
            }
        }
        panic!("berth serve {extra:?} did not become ready: {last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would: no shutdown, no flush.
    pub fn kill_9(&mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and returns at once (the process drains while the test watches); when
    /// it cannot be sent, kills the process and fails the test.
    pub fn terminate(&mut self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            self.kill();
            panic!("could not send SIGTERM to berth serve (pid {pid}); killed it");
        }
    }

    /// Waits at most `secs` for the process to exit and returns its status; panics (after
    /// SIGKILL) when it does not.
    pub async fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("berth serve still running after {secs} s: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits for a clean exit (which releases the cache directory's lock). A
    /// berth that does not exit within its grace (and then some) is a failure, not a hang; if
    /// SIGTERM cannot be sent, the process is killed and the test fails.
    pub async fn stop(mut self) -> String {
        if self.child.is_some() {
            self.terminate();
            let status = self.wait_exit(30).await;
            assert!(
                status.success(),
                "berth serve exited with {status}: {}",
                self.log()
            );
        }
        self.log()
    }
}

impl Drop for BerthProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_ready(child: &mut std::process::Child, port: u16, log: &Path) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}: {}", log()));
        }
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/v2/"))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no answer within 20 s: {}", log()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
