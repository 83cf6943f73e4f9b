//! berth's configuration: a TOML file described in docs/ARCHITECTURE.md "Configuration", overridden key by key from
//! `--set section.key=value` flags and `BERTH_SECTION__KEY` environment variables, then validated
//! into typed values. Validation reports every problem at once.

mod overrides;
mod prefetch;
mod scale;
pub mod units;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use toml::{Table, Value};

pub use overrides::{apply_env_overrides, apply_override};
pub use prefetch::PrefetchConfig;
pub use scale::{ClusterConfig, SharedConfig};

use crate::secret::Secret;

/// Every problem found in a configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {e}")?;
        }
        Ok(())
    }
}

/// The validated configuration of one berth process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Client-facing listener.
    pub server: ServerConfig,
    /// Admin listener (metrics, health).
    pub admin: AdminConfig,
    /// Cache location and budgets.
    pub cache: CacheConfig,
    /// Origins berth pulls from, in config order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Client authentication and authorization settings.
    pub auth: AuthConfig,
    /// Replicas that know each other (`[cluster]`); `None` for a lone berth.
    pub cluster: Option<ClusterConfig>,
    /// Manifest-driven prefetch (`[prefetch]`).
    pub prefetch: PrefetchConfig,
}

/// `[auth]`: how berth authenticates its own clients and caches authorization decisions
/// (docs/ARCHITECTURE.md, "Authorization").
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// htpasswd file (bcrypt hashes) of local users, for upstreams in `service` mode.
    pub htpasswd_file: Option<PathBuf>,
    /// File of static bearer tokens (one `name:token` or `token` per line), for `service` mode.
    pub tokens_file: Option<PathBuf>,
    /// Lifetime of the tokens berth issues to locally authenticated clients.
    pub token_ttl: Duration,
    /// Longest an allow decision of the origin is reused (never past the client token's expiry).
    pub decision_ttl: Duration,
    /// How long a denial of the origin is remembered.
    pub deny_ttl: Duration,
    /// How long past its expiry a cached allow decision may still be used when the origin cannot
    /// be reached (zero: fail closed).
    pub offline_grace: Duration,
}

/// `[server]`: where clients connect.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the client-facing listener.
    pub listen: SocketAddr,
    /// How clients reach berth (used for the token realm); derived from the request when unset.
    pub external_url: Option<String>,
    /// TLS certificate and key; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    pub shutdown_grace: Duration,
    /// Async worker threads; one per CPU when unset. Fewer than the CPUs cuts tail latency when
    /// berth shares its machine with busy neighbours.
    pub worker_threads: Option<usize>,
    /// Timeouts and keep-alive of client connections (the admin listener uses them too).
    pub connections: ConnectionLimits,
    /// Most client connections held at once; more wait in the kernel's accept queue. Lowered at
    /// start to fit the open-file limit.
    pub max_connections: usize,
}

/// How long a connection may take at each stage before berth closes it, so that clients that
/// connect and say nothing (or too little) cannot hold file descriptors for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accept to the first byte (plain) or to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send a complete request head: the first one counted from the end of the
    /// handshake (including HTTP/2's preface), later HTTP/1 ones from the previous response.
    pub header_timeout: Duration,
    /// How long a connection with no request in flight stays open (HTTP/2: no open stream).
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 PING frames that check a quiet peer is still there.
    pub http2_keepalive_interval: Duration,
    /// How long an HTTP/2 PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Default of `server.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of `upstream[].ratelimit_reserve`: Docker Hub pulls kept for what cannot wait.
const DEFAULT_RATELIMIT_RESERVE: usize = 10;

/// Default of `admin.max_connections`: scrapers and probes need few.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Largest accepted `max_connections`.
const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;

/// `[server.tls]`: PEM files for the client-facing listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[admin]`: the operator-facing listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`; disabled when absent.
    pub listen: Option<SocketAddr>,
    /// Most admin connections held at once (timeouts are the `[server]` ones).
    pub max_connections: usize,
    /// File holding the bearer secret of `POST /events` (registry push notifications); the
    /// endpoint is off without it.
    pub events_secret_file: Option<PathBuf>,
}

/// `[cache]`: where and how much berth keeps.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Root directory of the disk tier.
    pub dir: PathBuf,
    /// Byte budget of the disk tier.
    pub disk_bytes: u64,
    /// Byte budget of the memory tier.
    pub memory_bytes: u64,
    /// Largest object the memory tier holds.
    pub memory_max_object_bytes: u64,
    /// How long a tag → digest mapping (or a listing) is fresh before it is revalidated with
    /// the origin, when the origin's answer carries no caching headers of its own.
    pub tag_ttl: Duration,
    /// Shortest freshness an origin's `Cache-Control` / `Expires` can give a tag mapping or a
    /// listing (`no-store` still keeps nothing fresh).
    pub tag_ttl_min: Duration,
    /// Longest freshness an origin's `Cache-Control` / `Expires` can give a tag mapping or a
    /// listing.
    pub tag_ttl_max: Duration,
    /// Most blob fills fetching from origins at once; further fills wait for a slot.
    pub max_concurrent_fills: usize,
    /// Longest a fill waits for a slot before its clients get 429.
    pub fill_queue_timeout: Duration,
    /// The tier on object storage replicas share (`[cache.shared]`), if any.
    pub shared: Option<SharedConfig>,
}

/// How clients of an upstream are authorized (docs/ARCHITECTURE.md, "Authorization").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Anyone who reaches berth may pull; berth fetches anonymously or with its own credentials.
    Public,
    /// Clients bring their own origin credentials; the origin decides every pull.
    Passthrough,
    /// berth fetches with its own credentials; clients authenticate locally.
    Service,
}

impl AuthMode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Public => "public",
            AuthMode::Passthrough => "passthrough",
            AuthMode::Service => "service",
        }
    }
}

/// One `[[upstream]]`: an origin registry.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Name used in path prefixes, metrics and logs.
    pub name: String,
    /// Origin base URL (scheme and authority).
    pub url: Uri,
    /// Repository-name prefix at the origin, from a path in the configured URL: with
    /// `url = "http://region:5000/origin"` the repository `a/b` is `origin/a/b` there (an edge
    /// berth reaching one prefix-routed upstream of a regional berth). `None` without a path.
    pub repository_prefix: Option<String>,
    /// Registry host names matched against containerd's `?ns=` (the name is always one).
    pub aliases: Vec<String>,
    /// Serves requests that name no upstream.
    pub default: bool,
    /// Client authorization mode.
    pub auth: AuthMode,
    /// In `service` mode, whether clients without credentials may pull.
    pub anonymous: bool,
    /// berth's own credentials at the origin.
    pub credentials: Option<Credentials>,
    /// Extra CA certificates (PEM) trusted for this origin, beside the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Never contact the origin; serve only what is cached.
    pub offline: bool,
    /// Docker Hub semantics: one-word names get `library/`.
    pub docker_hub: bool,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Time from sending a request to the response head.
    pub first_byte_timeout: Duration,
    /// Longest pause between two body chunks.
    pub idle_timeout: Duration,
    /// When the origin reports at most this many pulls left (`ratelimit-remaining`, Docker
    /// Hub), stale tag mappings are served instead of revalidated, asking the origin at most
    /// once a minute.
    pub ratelimit_reserve: i64,
}

/// Username and password berth uses at an origin.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Username.
    pub username: String,
    /// Password or token, read from `password_file`.
    pub password: Secret,
}

const DOCKER_HUB_HOSTS: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

impl Config {
    /// Marks every upstream offline (`berth serve --offline`). Refused for `passthrough`
    /// upstreams: with no origin to ask, nothing could be authorized.
    pub fn set_offline(&mut self) -> Result<(), String> {
        if let Some(u) = self
            .upstreams
            .iter()
            .find(|u| u.auth == AuthMode::Passthrough)
        {
            return Err(format!(
                "upstream {:?} uses auth = \"passthrough\", which needs the origin; use \"service\" or \"public\" for an offline mirror",
                u.name
            ));
        }
        for u in &mut self.upstreams {
            u.offline = true;
        }
        Ok(())
    }

    /// Reads `path`, applies `--set` overrides and `BERTH_*` environment variables, validates.
    pub fn load(path: &Path, sets: &[String]) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        let mut table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        let mut errors = Vec::new();
        apply_env_overrides(&mut table, std::env::vars(), &mut errors);
        for s in sets {
            if let Err(e) = apply_override(&mut table, s) {
                errors.push(e);
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        match Config::from_table(table, base) {
            Ok(c) if errors.is_empty() => Ok(c),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(ConfigErrors(mut more)) => {
                errors.append(&mut more);
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Parses a TOML string (relative paths resolve against the current directory).
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![e.to_string()]))?;
        Config::from_table(table, Path::new("."))
    }

    /// Validates a parsed table; relative file paths are resolved against `base`.
    pub fn from_table(mut table: Table, base: &Path) -> Result<Config, ConfigErrors> {
        let mut e = Errors::default();
        let server = e.server(&mut table, base);
        let admin = e.admin(&mut table, base);
        let cache = e.cache(&mut table, base);
        let auth = e.auth(&mut table, base);
        let cluster = e.cluster(&mut table, base);
        let prefetch = e.prefetch(&mut table);
        let upstreams = e.upstreams(&mut table, base);
        e.unknown(&table, "");
        e.check_upstreams(&upstreams, &auth);
        if e.0.is_empty() {
            Ok(Config {
                server,
                admin,
                cache,
                upstreams,
                auth,
                cluster,
                prefetch,
            })
        } else {
            Err(ConfigErrors(e.0))
        }
    }
}

/// Collects problems while fields are taken out of tables.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    /// `[cache]`.
    fn cache(&mut self, table: &mut Table, base: &Path) -> CacheConfig {
        let mut cache_t = self.table(table, "cache");
        let shared = self.shared(&mut cache_t);
        let cache = CacheConfig {
            dir: self
                .path(&mut cache_t, "cache.dir", base)
                .unwrap_or_else(|| base.join("berth-cache")),
            disk_bytes: self
                .size(&mut cache_t, "cache.disk_bytes")
                .unwrap_or(50 << 30),
            memory_bytes: self
                .size(&mut cache_t, "cache.memory_bytes")
                .unwrap_or(256 << 20),
            memory_max_object_bytes: self
                .size(&mut cache_t, "cache.memory_max_object_bytes")
                .unwrap_or(1 << 20),
            tag_ttl: self
                .duration(&mut cache_t, "cache.tag_ttl")
                .unwrap_or(Duration::from_secs(300)),
            tag_ttl_min: self
                .duration(&mut cache_t, "cache.tag_ttl_min")
                .unwrap_or(Duration::ZERO),
            tag_ttl_max: self
                .duration(&mut cache_t, "cache.tag_ttl_max")
                .unwrap_or(Duration::from_secs(24 * 3600)),
            max_concurrent_fills: self
                .count(&mut cache_t, "cache.max_concurrent_fills", 1..=65_536)
                .unwrap_or(64),
            fill_queue_timeout: self
                .duration(&mut cache_t, "cache.fill_queue_timeout")
                .unwrap_or(Duration::from_secs(60)),
            shared,
        };
        if cache.tag_ttl_min > cache.tag_ttl_max {
            self.push("cache.tag_ttl_min: must not exceed cache.tag_ttl_max".into());
        }
        if cache.fill_queue_timeout.is_zero() {
            self.push("cache.fill_queue_timeout: must be greater than zero".into());
        }
        if cache.disk_bytes == 0 {
            self.push("cache.disk_bytes: must be greater than zero".into());
        }
        self.unknown(&cache_t, "cache");
        cache
    }

    /// `[auth]`.
    fn auth(&mut self, table: &mut Table, base: &Path) -> AuthConfig {
        let mut auth_t = self.table(table, "auth");
        let auth = AuthConfig {
            htpasswd_file: self.path(&mut auth_t, "auth.htpasswd_file", base),
            tokens_file: self.path(&mut auth_t, "auth.tokens_file", base),
            token_ttl: self
                .duration(&mut auth_t, "auth.token_ttl")
                .unwrap_or(Duration::from_secs(3600)),
            decision_ttl: self
                .duration(&mut auth_t, "auth.decision_ttl")
                .unwrap_or(Duration::from_secs(300)),
            deny_ttl: self
                .duration(&mut auth_t, "auth.deny_ttl")
                .unwrap_or(Duration::from_secs(10)),
            offline_grace: self
                .duration(&mut auth_t, "auth.offline_grace")
                .unwrap_or(Duration::ZERO),
        };
        for (k, p) in [
            ("htpasswd_file", &auth.htpasswd_file),
            ("tokens_file", &auth.tokens_file),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    self.push(format!("auth.{k}: {} is not a readable file", p.display()));
                }
            }
        }
        self.unknown(&auth_t, "auth");
        auth
    }

    /// Every `[[upstream]]`.
    fn upstreams(&mut self, table: &mut Table, base: &Path) -> Vec<UpstreamConfig> {
        let mut upstreams = Vec::new();
        match table.remove("upstream") {
            None => self.push("upstream: at least one [[upstream]] is required".into()),
            Some(Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::Table(t) => {
                            if let Some(u) = self.upstream(t, i, base) {
                                upstreams.push(u);
                            }
                        }
                        _ => self.push(format!("upstream[{i}]: must be a table")),
                    }
                }
            }
            Some(_) => self.push("upstream: must be an array of tables ([[upstream]])".into()),
        }
        upstreams
    }

    /// What no single upstream can check alone: unique names and aliases, one default, and
    /// auth modes that fit the rest of the config.
    fn check_upstreams(&mut self, upstreams: &[UpstreamConfig], auth: &AuthConfig) {
        let mut names = HashSet::new();
        let mut aliases = HashSet::new();
        for u in upstreams {
            if !names.insert(u.name.clone()) {
                self.push(format!("upstream {:?}: name used twice", u.name));
            }
            for a in &u.aliases {
                if !aliases.insert(a.clone()) {
                    self.push(format!(
                        "upstream {:?}: alias {a:?} is used by another upstream",
                        u.name
                    ));
                }
            }
        }
        for u in upstreams {
            if u.offline && u.auth == AuthMode::Passthrough {
                self.push(format!(
                    "upstream {:?}: offline = true cannot go with auth = \"passthrough\" (no origin to ask); use \"service\" or \"public\"",
                    u.name
                ));
            }
            if u.auth == AuthMode::Service
                && !u.anonymous
                && auth.htpasswd_file.is_none()
                && auth.tokens_file.is_none()
            {
                self.push(format!(
                    "upstream {:?}: auth = \"service\" needs auth.htpasswd_file or auth.tokens_file (or anonymous = true)",
                    u.name
                ));
            }
        }
        let defaults = upstreams.iter().filter(|u| u.default).count();
        if defaults > 1 {
            self.push("upstream: more than one upstream has default = true".into());
        }
    }

    fn push(&mut self, s: String) {
        self.0.push(s);
    }

    fn table(&mut self, t: &mut Table, key: &str) -> Table {
        match t.remove(key) {
            None => Table::new(),
            Some(Value::Table(t)) => t,
            Some(_) => {
                self.push(format!("{key}: must be a table"));
                Table::new()
            }
        }
    }

    fn unknown(&mut self, t: &Table, prefix: &str) {
        for k in t.keys() {
            let full = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            self.push(format!("{full}: unknown key"));
        }
    }

    /// `[server]`, with its `[server.tls]` table.
    fn server(&mut self, table: &mut Table, base: &Path) -> ServerConfig {
        let mut t = self.table(table, "server");
        let tls_t = t.remove("tls");
        let listen = self
            .addr(&mut t, "server.listen")
            .unwrap_or_else(|| "0.0.0.0:5000".parse().unwrap());
        let external_url = self.string(&mut t, "server.external_url").map(|u| {
            let u = u.trim_end_matches('/').to_owned();
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.parse::<Uri>().is_err()
            {
                self.push(format!("server.external_url: {u:?} is not an http(s) URL"));
            }
            u
        });
        let shutdown_grace = self
            .duration(&mut t, "server.shutdown_grace")
            .unwrap_or(Duration::from_secs(30));
        let worker_threads = self.count(&mut t, "server.worker_threads", 1..=1024);
        let d = ConnectionLimits::default();
        let mut timeout =
            |key: &str, default: Duration| match self.duration(&mut t, &format!("server.{key}")) {
                Some(v) if v.is_zero() => {
                    self.push(format!("server.{key}: must be greater than zero"));
                    default
                }
                Some(v) => v,
                None => default,
            };
        let connections = ConnectionLimits {
            handshake_timeout: timeout("handshake_timeout", d.handshake_timeout),
            header_timeout: timeout("header_timeout", d.header_timeout),
            idle_timeout: timeout("idle_timeout", d.idle_timeout),
            http2_keepalive_interval: timeout(
                "http2_keepalive_interval",
                d.http2_keepalive_interval,
            ),
            http2_keepalive_timeout: timeout("http2_keepalive_timeout", d.http2_keepalive_timeout),
        };
        let max_connections = self
            .count(&mut t, "server.max_connections", 1..=MAX_CONNECTIONS_LIMIT)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let tls = self.tls(tls_t, base);
        self.unknown(&t, "server");
        ServerConfig {
            listen,
            external_url,
            tls,
            shutdown_grace,
            worker_threads,
            connections,
            max_connections,
        }
    }

    /// `[server.tls]`: both files required and readable.
    fn tls(&mut self, tls_t: Option<Value>, base: &Path) -> Option<TlsConfig> {
        let mut t = match tls_t? {
            Value::Table(t) => t,
            _ => {
                self.push("server.tls: must be a table".into());
                return None;
            }
        };
        let cert = self.path(&mut t, "server.tls.cert", base);
        let key = self.path(&mut t, "server.tls.key", base);
        self.unknown(&t, "server.tls");
        for (k, p) in [("cert", &cert), ("key", &key)] {
            match p {
                None => self.push(format!(
                    "server.tls.{k}: required when [server.tls] is present"
                )),
                Some(p) if !p.is_file() => self.push(format!(
                    "server.tls.{k}: {} is not a readable file",
                    p.display()
                )),
                _ => {}
            }
        }
        Some(TlsConfig {
            cert: cert?,
            key: key?,
        })
    }

    /// `[admin]`.
    fn admin(&mut self, table: &mut Table, base: &Path) -> AdminConfig {
        let mut t = self.table(table, "admin");
        let events_secret_file = self.path(&mut t, "admin.events_secret_file", base);
        if let Some(p) = &events_secret_file {
            if !p.is_file() {
                self.push(format!(
                    "admin.events_secret_file: {} is not a readable file",
                    p.display()
                ));
            }
        }
        let admin = AdminConfig {
            listen: self.addr(&mut t, "admin.listen"),
            max_connections: self
                .count(&mut t, "admin.max_connections", 1..=MAX_CONNECTIONS_LIMIT)
                .unwrap_or(DEFAULT_ADMIN_MAX_CONNECTIONS),
            events_secret_file,
        };
        self.unknown(&t, "admin");
        admin
    }

    fn string(&mut self, t: &mut Table, key: &str) -> Option<String> {
        let field = key.rsplit('.').next().unwrap_or(key);
        match t.remove(field)? {
            Value::String(s) => Some(s),
            other => {
                self.push(format!(
                    "{key}: expected a string, found {}",
                    other.type_str()
                ));
                None
            }
        }
    }

    fn bool(&mut self, t: &mut Table, key: &str) -> Option<bool> {
        let field = key.rsplit('.').next().unwrap_or(key);
        match t.remove(field)? {
            Value::Boolean(b) => Some(b),
            Value::String(s) if s == "true" || s == "false" => Some(s == "true"),
            other => {
                self.push(format!("{key}: expected true or false, found {other}"));
                None
            }
        }
    }

    fn addr(&mut self, t: &mut Table, key: &str) -> Option<SocketAddr> {
        let s = self.string(t, key)?;
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(format!(
                    "{key}: {s:?} is not an address such as \"0.0.0.0:5000\""
                ));
                None
            }
        }
    }

    fn path(&mut self, t: &mut Table, key: &str, base: &Path) -> Option<PathBuf> {
        let s = self.string(t, key)?;
        if s.is_empty() {
            self.push(format!("{key}: must not be empty"));
            return None;
        }
        Some(base.join(s))
    }

    fn size(&mut self, t: &mut Table, key: &str) -> Option<u64> {
        let field = key.rsplit('.').next().unwrap_or(key);
        let r = match t.remove(field)? {
            Value::Integer(i) if i >= 0 => Ok(i as u64),
            Value::String(s) => units::parse_size(&s),
            other => Err(format!("expected a size such as \"512MiB\", found {other}")),
        };
        r.map_err(|m| self.push(format!("{key}: {m}"))).ok()
    }

    /// A whole number within `range` (a string too, as `--set` and the environment give).
    fn count(
        &mut self,
        t: &mut Table,
        key: &str,
        range: std::ops::RangeInclusive<usize>,
    ) -> Option<usize> {
        let field = key.rsplit('.').next().unwrap_or(key);
        let n = match t.remove(field)? {
            Value::Integer(i) => usize::try_from(i).ok(),
            Value::String(s) => s.trim().parse::<usize>().ok(),
            _ => None,
        };
        match n {
            Some(n) if range.contains(&n) => Some(n),
            _ => {
                self.push(format!(
                    "{key}: expected a number from {} to {}",
                    range.start(),
                    range.end()
                ));
                None
            }
        }
    }

    fn duration(&mut self, t: &mut Table, key: &str) -> Option<Duration> {
        let field = key.rsplit('.').next().unwrap_or(key);
        let r = match t.remove(field)? {
            Value::Integer(i) if i >= 0 => Ok(Duration::from_secs(i as u64)),
            Value::String(s) => units::parse_duration(&s),
            other => Err(format!("expected a duration such as \"5m\", found {other}")),
        };
        r.map_err(|m| self.push(format!("{key}: {m}"))).ok()
    }

    fn string_list(&mut self, t: &mut Table, key: &str) -> Vec<String> {
        let field = key.rsplit('.').next().unwrap_or(key);
        match t.remove(field) {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    other => {
                        self.push(format!("{key}: expected strings, found {other}"));
                        None
                    }
                })
                .collect(),
            Some(Value::String(s)) => s.split(',').map(|x| x.trim().to_owned()).collect(),
            Some(other) => {
                self.push(format!("{key}: expected a list of strings, found {other}"));
                Vec::new()
            }
        }
    }

    fn upstream(&mut self, mut t: Table, i: usize, base: &Path) -> Option<UpstreamConfig> {
        let at = |k: &str| format!("upstream[{i}].{k}");
        let before = self.0.len();
        let name = self.string(&mut t, &at("name"));
        match &name {
            None => self.push(format!("{}: required", at("name"))),
            Some(n) if !valid_upstream_name(n) => self.push(format!(
                "{}: {n:?} must be a host-like name of [a-z0-9.-] (optionally :port), as it appears in path prefixes and metrics",
                at("name")
            )),
            _ => {}
        }
        let url = self.string(&mut t, &at("url")).and_then(|u| {
            let parsed = u.parse::<Uri>().ok().filter(|p| {
                matches!(p.scheme_str(), Some("http" | "https"))
                    && p.authority().is_some()
                    && p.query().is_none()
            });
            let Some(parsed) = parsed else {
                self.push(format!(
                    "{}: {u:?} must be an http(s) URL with a host, such as \"https://registry-1.docker.io\"",
                    at("url")
                ));
                return None;
            };
            match split_repository_prefix(&parsed) {
                Ok(split) => Some(split),
                Err(()) => {
                    self.push(format!(
                        "{}: {u:?}: a path in an upstream URL is a repository-name prefix at the origin (such as \"http://region:5000/docker.io\" for a regional berth's upstream docker.io), so it must be repository-name components; the registry API root is always /v2/",
                        at("url")
                    ));
                    None
                }
            }
        });
        if url.is_none()
            && !self
                .0
                .iter()
                .skip(before)
                .any(|m| m.starts_with(&at("url")))
        {
            self.push(format!("{}: required", at("url")));
        }
        let mut aliases: Vec<String> = self
            .string_list(&mut t, &at("aliases"))
            .into_iter()
            .map(|a| a.to_ascii_lowercase())
            .collect();
        let default = self.bool(&mut t, &at("default")).unwrap_or(false);
        let auth = match self.string(&mut t, &at("auth")).as_deref() {
            None => None,
            Some("public") => Some(AuthMode::Public),
            Some("passthrough") => Some(AuthMode::Passthrough),
            Some("service") => Some(AuthMode::Service),
            Some(other) => {
                self.push(format!(
                    "{}: {other:?} is not one of public, passthrough, service",
                    at("auth")
                ));
                None
            }
        };
        let anonymous = self.bool(&mut t, &at("anonymous")).unwrap_or(false);
        let username = self.string(&mut t, &at("username"));
        let password_file = self.path(&mut t, &at("password_file"), base);
        if t.contains_key("password") {
            t.remove("password");
            self.push(format!(
                "{}: passwords are not accepted inline; put it in a file and set password_file",
                at("password")
            ));
        }
        let credentials = match (username, password_file) {
            (None, None) => None,
            (Some(username), Some(pf)) => match std::fs::read_to_string(&pf) {
                Ok(p) => Some(Credentials {
                    username,
                    password: Secret::new(p.trim_end_matches(['\r', '\n']).to_owned()),
                }),
                Err(err) => {
                    self.push(format!(
                        "{}: cannot read {}: {err}",
                        at("password_file"),
                        pf.display()
                    ));
                    None
                }
            },
            _ => {
                self.push(format!(
                    "{}: username and password_file go together",
                    at("username")
                ));
                None
            }
        };
        let ca_file = self.path(&mut t, &at("ca_file"), base);
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                self.push(format!(
                    "{}: {} is not a readable file",
                    at("ca_file"),
                    ca.display()
                ));
            }
        }
        let offline = self.bool(&mut t, &at("offline")).unwrap_or(false);
        let connect_timeout = self
            .duration(&mut t, &at("connect_timeout"))
            .unwrap_or(Duration::from_secs(10));
        let first_byte_timeout = self
            .duration(&mut t, &at("first_byte_timeout"))
            .unwrap_or(Duration::from_secs(30));
        let idle_timeout = self
            .duration(&mut t, &at("idle_timeout"))
            .unwrap_or(Duration::from_secs(60));
        let ratelimit_reserve = self
            .count(&mut t, &at("ratelimit_reserve"), 0..=1_000_000)
            .unwrap_or(DEFAULT_RATELIMIT_RESERVE) as i64;
        self.unknown(&t, &format!("upstream[{i}]"));
        let (name, (url, repository_prefix)) = (name?, url?);
        if self.0.len() > before {
            return None;
        }
        // Without credentials of its own, berth can only pass the clients' through.
        let auth = auth.unwrap_or(if credentials.is_some() {
            AuthMode::Service
        } else {
            AuthMode::Passthrough
        });
        let host = url
            .authority()
            .map(|a| a.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        let docker_hub = DOCKER_HUB_HOSTS.contains(&host.as_str())
            || aliases
                .iter()
                .any(|a| DOCKER_HUB_HOSTS.contains(&a.as_str()));
        if !aliases.contains(&name) {
            aliases.push(name.clone());
        }
        Some(UpstreamConfig {
            name,
            url,
            repository_prefix,
            aliases,
            default,
            auth,
            anonymous,
            credentials,
            ca_file,
            offline,
            docker_hub,
            connect_timeout,
            first_byte_timeout,
            idle_timeout,
            ratelimit_reserve,
        })
    }
}

/// Splits an upstream URL into its base (scheme and authority) and the repository-name prefix
/// its path names (`None` for no path or `/`). `Err` when the path is not a repository name
/// (`/v2/...` included: the API root is not configurable).
fn split_repository_prefix(url: &Uri) -> Result<(Uri, Option<String>), ()> {
    let path = url.path().trim_matches('/');
    let prefix = if path.is_empty() {
        None
    } else {
        let name: crate::oci::RepoName = path.parse().map_err(|_| ())?;
        if name.as_str().split('/').next() == Some("v2") {
            return Err(());
        }
        Some(name.to_string())
    };
    let base = Uri::builder()
        .scheme(url.scheme_str().ok_or(())?)
        .authority(url.authority().ok_or(())?.as_str())
        .path_and_query("/")
        .build()
        .map_err(|_| ())?;
    Ok((base, prefix))
}

fn valid_upstream_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':')
        })
        && !n.starts_with(['.', '-', ':'])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [server]
        listen = "127.0.0.1:5000"
        [admin]
        listen = "127.0.0.1:9090"
        [cache]
        dir = "c"
        disk_bytes = "1GiB"
        tag_ttl = "1m"
        [[upstream]]
        name = "docker.io"
        url = "https://registry-1.docker.io"
        aliases = ["docker.io", "index.docker.io"]
        default = true
    "#;

    #[test]
    fn parses_the_design_shape() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.cache.disk_bytes, 1 << 30);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(60));
        assert_eq!(c.cache.max_concurrent_fills, 64, "default");
        assert_eq!(c.cache.tag_ttl_min, Duration::ZERO, "default");
        assert_eq!(c.cache.tag_ttl_max, Duration::from_secs(86_400), "default");
        assert_eq!(
            c.cache.fill_queue_timeout,
            Duration::from_secs(60),
            "default"
        );
        assert_eq!(c.upstreams.len(), 1);
        assert!(c.upstreams[0].docker_hub);
        assert!(c.upstreams[0].default);
        assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
    }

    #[test]
    fn tag_ttl_bounds_parse_and_must_be_ordered() {
        let ok = GOOD.replace(
            "tag_ttl = \"1m\"",
            "tag_ttl = \"1m\"\ntag_ttl_min = \"10s\"\ntag_ttl_max = \"1h\"",
        );
        let c = Config::from_toml(&ok).unwrap();
        assert_eq!(c.cache.tag_ttl_min, Duration::from_secs(10));
        assert_eq!(c.cache.tag_ttl_max, Duration::from_secs(3600));
        let bad = GOOD.replace(
            "tag_ttl = \"1m\"",
            "tag_ttl_min = \"2h\"\ntag_ttl_max = \"1h\"",
        );
        let errs = Config::from_toml(&bad).unwrap_err().0.join("\n");
        assert!(
            errs.contains("cache.tag_ttl_min: must not exceed"),
            "{errs}"
        );
    }

    #[test]
    fn reports_every_problem() {
        let bad = r#"
            bogus = 1
            [server]
            listen = "nope"
            colour = "blue"
            [cache]
            disk_bytes = "12XB"
            tag_ttl = "soon"
            max_concurrent_fills = 0
            fill_queue_timeout = "0s"
            [[upstream]]
            url = "ftp://x"
            auth = "maybe"
        "#;
        let errs = Config::from_toml(bad).unwrap_err().0;
        let all = errs.join("\n");
        for needle in [
            "bogus: unknown key",
            "server.listen",
            "server.colour: unknown key",
            "cache.disk_bytes",
            "cache.tag_ttl",
            "cache.max_concurrent_fills: expected a number from 1 to 65536",
            "cache.fill_queue_timeout: must be greater than zero",
            "upstream[0].name: required",
            "upstream[0].url",
            "upstream[0].auth",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn connection_keys_have_defaults_and_are_validated() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.server.connections, ConnectionLimits::default());
        assert_eq!(c.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(c.admin.max_connections, DEFAULT_ADMIN_MAX_CONNECTIONS);
        let custom = GOOD.replace(
            "listen = \"127.0.0.1:5000\"",
            "listen = \"127.0.0.1:5000\"\nhandshake_timeout = \"5s\"\nheader_timeout = 7\nidle_timeout = \"1m\"\nhttp2_keepalive_interval = \"3s\"\nhttp2_keepalive_timeout = \"4s\"\nmax_connections = \"500\"",
        );
        let c = Config::from_toml(&custom).unwrap();
        let l = c.server.connections;
        assert_eq!(l.handshake_timeout, Duration::from_secs(5));
        assert_eq!(l.header_timeout, Duration::from_secs(7));
        assert_eq!(l.idle_timeout, Duration::from_secs(60));
        assert_eq!(l.http2_keepalive_interval, Duration::from_secs(3));
        assert_eq!(l.http2_keepalive_timeout, Duration::from_secs(4));
        assert_eq!(c.server.max_connections, 500);

        let bad = r#"
            [server]
            handshake_timeout = "0s"
            idle_timeout = "soon"
            max_connections = 0
            [admin]
            max_connections = "many"
            [[upstream]]
            name = "a"
            url = "http://a"
        "#;
        let all = Config::from_toml(bad).unwrap_err().0.join("\n");
        for needle in [
            "server.handshake_timeout: must be greater than zero",
            "server.idle_timeout",
            "server.max_connections: expected a number from 1 to",
            "admin.max_connections: expected a number from 1 to",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn an_upstream_url_path_is_a_repository_prefix() {
        let t = r#"
            [[upstream]]
            name = "region"
            url = "http://region.example:5000/docker.io/"
            [[upstream]]
            name = "plain"
            url = "https://reg.example"
        "#;
        let c = Config::from_toml(t).unwrap();
        assert_eq!(
            c.upstreams[0].url.to_string(),
            "http://region.example:5000/"
        );
        assert_eq!(
            c.upstreams[0].repository_prefix.as_deref(),
            Some("docker.io")
        );
        assert_eq!(c.upstreams[1].repository_prefix, None);
        for bad in [
            "http://r/v2",
            "http://r/v2/x",
            "http://r/Upper",
            "http://r/a//b",
            "http://r/a?x=1",
        ] {
            let t = format!("[[upstream]]\nname = \"r\"\nurl = \"{bad}\"\n");
            let all = Config::from_toml(&t).unwrap_err().0.join("\n");
            assert!(all.contains("upstream[0].url"), "{bad}: {all}");
        }
    }

    #[test]
    fn rejects_two_defaults_and_duplicate_names() {
        let t = r#"
            [[upstream]]
            name = "a"
            url = "http://a"
            default = true
            [[upstream]]
            name = "a"
            url = "http://b"
            default = true
        "#;
        let all = Config::from_toml(t).unwrap_err().0.join("\n");
        assert!(all.contains("name used twice"), "{all}");
        assert!(all.contains("more than one upstream"), "{all}");
    }
}
