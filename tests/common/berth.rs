//! berth itself, started in process on an ephemeral port with a temporary cache directory:
//! `Berth::in_front_of(&tap.url()).start().await`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::TestCa;

/// How to configure a berth for a test.
pub struct BerthBuilder {
    upstreams: Vec<String>,
    tls: Option<(PathBuf, PathBuf)>,
    tag_ttl: String,
    cache_keys: String,
    server_keys: String,
    admin_listen: String,
    admin_keys: String,
    cache_dir: Option<PathBuf>,
    disk_bytes: String,
    memory_max_object: String,
    extra: String,
}

/// A running berth.
pub struct Berth {
    running: Option<berth::Running>,
    /// Client listener address.
    pub addr: SocketAddr,
    /// Admin listener address.
    pub admin_addr: SocketAddr,
    /// Peer listener address (`[cluster]`), if configured.
    pub peer_addr: Option<SocketAddr>,
    scheme: &'static str,
    cache_dir: PathBuf,
    _dir: TempDir,
}

impl Berth {
    /// A berth whose default upstream (named `origin`, aliased to the origin's host:port so that
    /// `?ns=` matches it) is `url`.
    pub fn in_front_of(url: &str) -> BerthBuilder {
        let host = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_owned();
        BerthBuilder {
            upstreams: vec![format!(
                "[[upstream]]\nname = \"origin\"\nurl = \"{url}\"\naliases = [\"{host}\"]\ndefault = true\nauth = \"public\"\nconnect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n"
            )],
            tls: None,
            tag_ttl: "5m".into(),
            cache_keys: String::new(),
            server_keys: String::new(),
            admin_listen: "127.0.0.1:0".into(),
            admin_keys: String::new(),
            cache_dir: None,
            disk_bytes: "10GiB".into(),
            memory_max_object: "1MiB".into(),
            extra: String::new(),
        }
    }

    /// A berth with exactly the given `[[upstream]]` tables.
    pub fn with_upstreams(tables: &str) -> BerthBuilder {
        BerthBuilder {
            upstreams: vec![tables.to_owned()],
            tls: None,
            tag_ttl: "5m".into(),
            cache_keys: String::new(),
            server_keys: String::new(),
            admin_listen: "127.0.0.1:0".into(),
            admin_keys: String::new(),
            cache_dir: None,
            disk_bytes: "10GiB".into(),
            memory_max_object: "1MiB".into(),
            extra: String::new(),
        }
    }

    /// `http(s)://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// `127.0.0.1:PORT`, as registry clients name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The running request path (cache, shared tier) for assertions.
    pub fn app(&self) -> &std::sync::Arc<berth::proxy::App> {
        &self.running.as_ref().expect("running").app
    }

    /// The value of metric `name{labels}` (labels as written in the exposition, `""` for
    /// none), 0 when absent.
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name_and_labels).then(|| v.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin_addr))
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics body")
    }

    /// Waits (at most 30 s) until no fill is running: every blob fetched so far is committed
    /// (or abandoned) and indexed.
    pub async fn settle(&self) {
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            self.app().cache().fills().all_settled(),
        )
        .await
        .expect("fills settle within 30 s");
    }

    /// Stops berth gracefully.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

impl BerthBuilder {
    /// Serve TLS with the CA's server certificate.
    pub fn tls(mut self, ca: &TestCa) -> Self {
        self.tls = Some((ca.server_cert_path(), ca.server_key_path()));
        self
    }

    /// Tag freshness lifetime (`"0s"` revalidates every time).
    pub fn tag_ttl(mut self, ttl: &str) -> Self {
        self.tag_ttl = ttl.to_owned();
        self
    }

    /// Adds `key = value` lines to the `[cache]` table (e.g. `tag_ttl_max = "2s"`).
    pub fn cache(mut self, lines: &str) -> Self {
        self.cache_keys.push_str(lines);
        if !lines.ends_with('\n') {
            self.cache_keys.push('\n');
        }
        self
    }

    /// Disk tier budget.
    pub fn disk_bytes(mut self, size: &str) -> Self {
        self.disk_bytes = size.to_owned();
        self
    }

    /// Largest object of the memory tier (`"0"` keeps blobs on disk only).
    pub fn memory_max_object(mut self, size: &str) -> Self {
        self.memory_max_object = size.to_owned();
        self
    }

    /// More config text appended as is (tables such as `[cache.shared]` or `[cluster]`).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Reuse a cache directory (to test restarts).
    pub fn cache_dir(mut self, dir: &Path) -> Self {
        self.cache_dir = Some(dir.to_owned());
        self
    }

    /// The config file text this builder produces.
    pub fn config_text(&self, cache_dir: &Path) -> String {
        let mut s = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{}[admin]\nlisten = \"{}\"\n{}[cache]\ndir = \"{}\"\ndisk_bytes = \"{}\"\nmemory_max_object_bytes = \"{}\"\ntag_ttl = \"{}\"\n{}",
            self.server_keys,
            self.admin_listen,
            self.admin_keys,
            cache_dir.display(),
            self.disk_bytes,
            self.memory_max_object,
            self.tag_ttl,
            self.cache_keys
        );
        if let Some((cert, key)) = &self.tls {
            s.push_str(&format!(
                "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.display(),
                key.display()
            ));
        }
        s.push_str(&self.extra);
        for u in &self.upstreams {
            s.push_str(u);
            s.push('\n');
        }
        s
    }

    /// Adds `key = value` lines to the `[server]` table (e.g. `external_url`).
    pub fn server(mut self, lines: &str) -> Self {
        self.server_keys.push_str(lines);
        if !lines.ends_with('\n') {
            self.server_keys.push('\n');
        }
        self
    }

    /// The admin listener's address (`127.0.0.1:0` unless set) and extra `[admin]` lines.
    pub fn admin(mut self, listen: &str, lines: &str) -> Self {
        self.admin_listen = listen.to_owned();
        self.admin_keys.push_str(lines);
        if !lines.is_empty() && !lines.ends_with('\n') {
            self.admin_keys.push('\n');
        }
        self
    }

    /// Starts berth in this process.
    pub async fn start(self) -> Berth {
        self.try_start().await.expect("berth starts")
    }

    /// Starts berth in this process, or says why it could not (a port taken meanwhile).
    pub async fn try_start(self) -> Result<Berth, berth::server::StartError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache_dir = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("cache"));
        let text = self.config_text(&cache_dir);
        let config = berth::Config::from_toml(&text)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
        let running = berth::start(config, prometheus::Registry::new()).await?;
        Ok(Berth {
            addr: running.addr,
            admin_addr: running.admin_addr.expect("admin configured"),
            peer_addr: running.peer_addr,
            running: Some(running),
            scheme: if self.tls.is_some() { "https" } else { "http" },
            cache_dir,
            _dir: dir,
        })
    }
}
