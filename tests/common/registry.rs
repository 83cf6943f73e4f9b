//! A real `docker-registry` (CNCF distribution 2.8) child process used as the origin.
//!
//! Filesystem storage in a temp dir, plain HTTP on 127.0.0.1, deletes enabled, no auth. The
//! process is killed when the [`Registry`] is dropped, or earlier with [`Registry::stop`] to
//! test serving while the origin is down.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, require_binary};

/// How long a freshly started registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a new port when the chosen one was taken between probing and binding.
const BIND_ATTEMPTS: usize = 4;

/// A running `docker-registry serve` with its own storage; killed on drop.
pub struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: TempDir,
    tls: bool,
}

// === impl Registry ===

impl Registry {
    /// Starts a registry on a free port and waits until `GET /v2/` answers 200.
    ///
    /// Panics (with the registry's stderr) if it never becomes ready: an origin that does not
    /// start is a broken test machine, not a skipped test.
    pub async fn start() -> Registry {
        Registry::start_with_config("").await
    }

    /// Like [`Registry::start`], with `extra` (top-level YAML sections such as `auth:`) appended
    /// to the config; ready then also means a 401 from `GET /v2/`, as an auth-enabled registry
    /// answers. Used by `issuer::TokenIssuer::start_registry`.
    pub async fn start_with_config(extra: &str) -> Registry {
        Registry::start_inner(extra, false).await
    }

    /// A registry serving HTTPS with `ca`'s server certificate (`localhost` and `127.0.0.1`);
    /// [`Registry::url`] is then `https://…`.
    pub async fn start_tls(ca: &super::TestCa) -> Registry {
        let tls = format!(
            "  tls:\n    certificate: \"{}\"\n    key: \"{}\"\n",
            ca.server_cert_path().display(),
            ca.server_key_path().display()
        );
        Registry::start_inner(&tls, true).await
    }

    async fn start_inner(extra: &str, tls: bool) -> Registry {
        let binary = require_binary("docker-registry");
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()
            .expect("create registry temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("create registry storage dir");

        let mut last_error = String::new();
        for attempt in 1..=BIND_ATTEMPTS {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let config = dir.path().join("config.yml");
            let yaml = config_yaml(&storage, addr) + extra;
            std::fs::write(&config, yaml).expect("write registry config");
            let stderr_path = dir.path().join(format!("stderr-{attempt}.log"));
            let stderr = File::create(&stderr_path).expect("create registry stderr file");
            let mut command = Command::new(&binary);
            // `REGISTRY_*` variables override the config file; the host's must not leak in.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("REGISTRY_") {
                    command.env_remove(name);
                }
            }
            let mut child = command
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            match wait_ready(&mut child, addr, &stderr_path, tls).await {
                Ok(()) => {
                    return Registry {
                        child: Some(child),
                        addr,
                        dir,
                        tls,
                    }
                }
                Err(error) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = error;
                    if !last_error.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("docker-registry did not become ready: {last_error}");
    }

    /// The registry's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:5123` (`https` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `host:port` as skopeo and containerd want it in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Directory of the registry's filesystem storage (to inspect or corrupt stored content).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Everything the registry wrote to stderr so far, for assertion messages.
    pub fn stderr(&self) -> String {
        let mut logs = String::new();
        for attempt in 1..=BIND_ATTEMPTS {
            let path = self.dir.path().join(format!("stderr-{attempt}.log"));
            if let Ok(text) = std::fs::read_to_string(path) {
                logs.push_str(&text);
            }
        }
        logs
    }

    /// Kills the registry and waits for it, so the origin is down from here on.
    ///
    /// The port stays unused (connections are refused) unless something else takes it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `GET /v2/` until it answers 200 (401 with auth on), the child exits, or the deadline
/// passes.
async fn wait_ready(
    child: &mut Child,
    addr: SocketAddr,
    stderr_path: &Path,
    tls: bool,
) -> Result<(), String> {
    // Readiness only: the certificate itself is what the tests check, through berth.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .danger_accept_invalid_certs(tls)
        .build()
        .expect("build reqwest client");
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{addr}/v2/");
    let deadline = Instant::now() + READY_TIMEOUT;
    let stderr = || std::fs::read_to_string(stderr_path).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited with {status}; stderr:\n{}", stderr()));
        }
        if let Ok(response) = client.get(&url).send().await {
            if matches!(
                response.status(),
                reqwest::StatusCode::OK | reqwest::StatusCode::UNAUTHORIZED
            ) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no 200 from {url} within {READY_TIMEOUT:?}; stderr:\n{}",
                stderr()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The registry's YAML config: filesystem storage, plain HTTP, deletes on, quiet logs.
///
/// Upload purging is off so a long test run never has its in-progress uploads swept; a fixed
/// `http.secret` silences the warning about generating one.
fn config_yaml(storage: &Path, addr: SocketAddr) -> String {
    format!(
        r#"version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: "{storage}"
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: "{addr}"
  secret: berth-test-secret
"#,
        storage = storage.display(),
    )
}
