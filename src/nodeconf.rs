//! `berth node-config`: points a node's container runtimes at berth.
//!
//! For every configured upstream, containerd gets `certs.d/<registry>/hosts.toml` per registry
//! host it is known by (its `aliases`, and its name when that is a host), naming berth as the
//! mirror; containerd then adds `?ns=<registry>`, which berth matches against the aliases. CRI-O,
//! podman and skopeo get one `registries.conf.d` drop-in whose mirrors carry the upstream's name
//! as a path prefix (`berth:5000/docker.io`), since they send no `ns`.
//!
//! Every file written starts with [`MARKER`]. A file without it is never changed or removed, so
//! an operator's own `hosts.toml` survives; running the command again writes only what differs,
//! and removes the files it wrote earlier for hosts no longer configured.
//!
//! Architecture: docs/ARCHITECTURE.md, "Commands".

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use http::Uri;

use crate::config::{Config, UpstreamConfig};

/// First line of every file this command writes; its presence is the permission to change or
/// remove the file later.
pub const MARKER: &str = "# Written by `berth node-config`; it rewrites or removes this file.";

/// Name of the CRI-O / podman drop-in inside the `registries.conf.d` directory.
pub const DROP_IN_NAME: &str = "50-berth.conf";

/// What the origin is to the runtimes when berth does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Fall back to the upstream's origin URL (containerd's `server`, registries.conf's
    /// `location`).
    Origin,
    /// Never go around berth: the origin is not named at all.
    None,
}

/// Where berth is, as the nodes reach it, and how to trust it.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// `http` or `https`.
    scheme: String,
    /// `host[:port]`.
    authority: String,
}

/// What to write where.
#[derive(Debug, Clone)]
pub struct Options {
    /// berth as the nodes reach it.
    pub mirror: Mirror,
    /// Whether runtimes may go to the origin when berth fails.
    pub fallback: Fallback,
    /// containerd's `config_path` (`/etc/containerd/certs.d`); `None` writes nothing there.
    pub containerd_dir: Option<PathBuf>,
    /// The `registries.conf.d` directory (`/etc/containers/registries.conf.d`); `None` writes
    /// nothing there.
    pub registries_dir: Option<PathBuf>,
    /// A CA file (path on the node) containerd trusts for an `https` mirror.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from an `https` mirror (containerd `skip_verify`, registries.conf
    /// `insecure`).
    pub skip_verify: bool,
}

/// One change to a node file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file is missing or differs: write `contents`.
    Write {
        /// The file.
        path: PathBuf,
        /// Its new contents.
        contents: String,
    },
    /// The file already has these contents.
    Unchanged {
        /// The file.
        path: PathBuf,
    },
    /// A file this command wrote that is no longer wanted.
    Remove {
        /// The file.
        path: PathBuf,
    },
    /// The file exists without [`MARKER`]: someone else's, left alone.
    Foreign {
        /// The file.
        path: PathBuf,
    },
}

/// Why node configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfError {
    /// `--mirror` is not `http(s)://host[:port]`.
    #[error("mirror URL {url:?}: {reason}")]
    Mirror {
        /// What was given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Reading, writing or removing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

// === impl Mirror ===

impl std::str::FromStr for Mirror {
    type Err = NodeConfError;

    /// Parses `http://host:port` or `https://host[:port]` (no path, query or credentials).
    fn from_str(url: &str) -> Result<Mirror, NodeConfError> {
        let err = |reason| NodeConfError::Mirror {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| err("not a URL"))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s.to_owned(),
            _ => return Err(err("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| err("no host"))?;
        if authority.as_str().contains('@') {
            return Err(err("credentials do not belong in the mirror URL"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(err("the mirror URL takes no path or query"));
        }
        Ok(Mirror {
            scheme,
            authority: authority.as_str().to_owned(),
        })
    }
}

impl Mirror {
    /// `scheme://authority`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }

    fn is_https(&self) -> bool {
        self.scheme == "https"
    }
}

// === planning ===

/// The registry hosts an upstream is known by: its aliases (the config adds its name to them)
/// that look like a registry host (a dot or a port, or `localhost`, as a runtime reads an
/// image reference's first component). Sorted, without duplicates.
pub fn registry_hosts(upstream: &UpstreamConfig) -> BTreeSet<String> {
    upstream
        .aliases
        .iter()
        .filter(|h| h.contains('.') || h.contains(':') || *h == "localhost")
        .cloned()
        .collect()
}

/// containerd's `hosts.toml` for one registry host of `upstream`.
pub fn hosts_toml(upstream: &UpstreamConfig, opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{MARKER}");
    let _ = writeln!(s, "# berth upstream {:?}.", upstream.name);
    let server = match opts.fallback {
        Fallback::Origin => origin_url(upstream),
        // containerd falls back to `server` after the hosts: make that berth too.
        Fallback::None => opts.mirror.url(),
    };
    let _ = writeln!(s, "server = {}", toml_str(&server));
    s.push('\n');
    let _ = writeln!(s, "[host.{}]", toml_str(&opts.mirror.url()));
    let _ = writeln!(s, "  capabilities = [\"pull\", \"resolve\"]");
    if opts.mirror.is_https() {
        if let Some(ca) = &opts.ca_file {
            let _ = writeln!(s, "  ca = {}", toml_str(&ca.display().to_string()));
        }
        if opts.skip_verify {
            let _ = writeln!(s, "  skip_verify = true");
        }
    }
    s
}

/// The CRI-O / podman drop-in: one `[[registry]]` per registry host, berth as its mirror with
/// the upstream's name as path prefix.
pub fn registries_drop_in(config: &Config, opts: &Options) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{MARKER}");
    let _ = writeln!(
        s,
        "# Pulls of these registries go to berth first; berth picks the upstream by path prefix."
    );
    let mut seen = BTreeSet::new();
    for upstream in &config.upstreams {
        for host in registry_hosts(upstream) {
            if !seen.insert(host.clone()) {
                continue;
            }
            let mirror_location = format!("{}/{}", opts.mirror.authority, upstream.name);
            s.push('\n');
            let _ = writeln!(s, "[[registry]]");
            let _ = writeln!(s, "prefix = {}", toml_str(&host));
            match opts.fallback {
                Fallback::Origin => {
                    let _ = writeln!(s, "location = {}", toml_str(&origin_location(upstream)));
                    if upstream.url.scheme_str() == Some("http") {
                        let _ = writeln!(s, "insecure = true");
                    }
                }
                Fallback::None => {
                    let _ = writeln!(s, "location = {}", toml_str(&mirror_location));
                    if !opts.mirror.is_https() || opts.skip_verify {
                        let _ = writeln!(s, "insecure = true");
                    }
                }
            }
            if opts.fallback == Fallback::Origin {
                s.push('\n');
                let _ = writeln!(s, "[[registry.mirror]]");
                let _ = writeln!(s, "location = {}", toml_str(&mirror_location));
                if !opts.mirror.is_https() || opts.skip_verify {
                    let _ = writeln!(s, "insecure = true");
                }
            }
        }
    }
    s
}

/// What must change on this node for `config` (or, with `remove`, to undo every file this
/// command wrote). Reads the directories; writes nothing.
pub fn plan(config: &Config, opts: &Options, remove: bool) -> Result<Vec<Change>, NodeConfError> {
    let mut changes = Vec::new();
    if let Some(dir) = &opts.containerd_dir {
        let mut wanted = BTreeSet::new();
        if !remove {
            for upstream in &config.upstreams {
                for host in registry_hosts(upstream) {
                    let path = dir.join(&host).join("hosts.toml");
                    if wanted.insert(path.clone()) {
                        changes.push(change_for(path, hosts_toml(upstream, opts))?);
                    }
                }
            }
        }
        // Files written earlier for hosts that are no longer configured.
        for path in marked_hosts_files(dir)? {
            if !wanted.contains(&path) {
                changes.push(Change::Remove { path });
            }
        }
    }
    if let Some(dir) = &opts.registries_dir {
        let path = dir.join(DROP_IN_NAME);
        if remove {
            match read_marked(&path)? {
                Some(true) => changes.push(Change::Remove { path }),
                Some(false) => changes.push(Change::Foreign { path }),
                None => {}
            }
        } else {
            changes.push(change_for(path, registries_drop_in(config, opts))?);
        }
    }
    Ok(changes)
}

/// Carries out `changes` (Foreign and Unchanged entries are left as they are). Files are
/// written to a temporary sibling and renamed into place, so a runtime never reads half a file.
pub fn apply(changes: &[Change]) -> Result<(), NodeConfError> {
    for change in changes {
        match change {
            Change::Write { path, contents } => write_atomically(path, contents)?,
            Change::Remove { path } => {
                std::fs::remove_file(path).map_err(|source| io(path, source))?;
                // The per-host directory of a hosts.toml goes too, if nothing else is in it.
                if path.file_name().is_some_and(|n| n == "hosts.toml") {
                    if let Some(parent) = path.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
            }
            Change::Unchanged { .. } | Change::Foreign { .. } => {}
        }
    }
    Ok(())
}

/// Creates the cache directory if missing and gives it to `owner` (uid, gid), not recursively:
/// a hostPath directory the kubelet creates belongs to root, and berth runs as a fixed non-root
/// user. Returns whether anything changed.
pub fn prepare_cache_dir(dir: &Path, owner: (u32, u32)) -> Result<bool, NodeConfError> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
    let meta = std::fs::metadata(dir).map_err(|source| io(dir, source))?;
    if (meta.uid(), meta.gid()) == owner {
        return Ok(false);
    }
    std::os::unix::fs::chown(dir, Some(owner.0), Some(owner.1))
        .map_err(|source| io(dir, source))?;
    Ok(true)
}

/// Parses `UID:GID`.
pub fn parse_owner(s: &str) -> Option<(u32, u32)> {
    let (uid, gid) = s.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// A one-line description of a change, for the command's output.
pub fn describe(change: &Change, dry_run: bool) -> String {
    let (verb, path) = match change {
        Change::Write { path, .. } => (if dry_run { "would write" } else { "wrote" }, path),
        Change::Unchanged { path } => ("unchanged", path),
        Change::Remove { path } => (if dry_run { "would remove" } else { "removed" }, path),
        Change::Foreign { path } => ("left alone (not written by berth)", path),
    };
    format!("{verb} {}", path.display())
}

fn change_for(path: PathBuf, contents: String) -> Result<Change, NodeConfError> {
    match std::fs::read_to_string(&path) {
        Ok(existing) if !existing.starts_with(MARKER) => Ok(Change::Foreign { path }),
        Ok(existing) if existing == contents => Ok(Change::Unchanged { path }),
        Ok(_) => Ok(Change::Write { path, contents }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Change::Write { path, contents }),
        Err(source) => Err(io(&path, source)),
    }
}

/// `Some(true)` if the file exists and carries the marker, `Some(false)` if it exists without,
/// `None` if it does not exist.
fn read_marked(path: &Path) -> Result<Option<bool>, NodeConfError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.starts_with(MARKER))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // Not UTF-8: certainly not ours.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(Some(false)),
        Err(source) => Err(io(path, source)),
    }
}

/// `<dir>/*/hosts.toml` files carrying the marker.
fn marked_hosts_files(dir: &Path) -> Result<Vec<PathBuf>, NodeConfError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(io(dir, source)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| io(dir, source))?;
        let path = entry.path().join("hosts.toml");
        if read_marked(&path)? == Some(true) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn write_atomically(path: &Path, contents: &str) -> Result<(), NodeConfError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
    let tmp = dir.join(format!(
        ".{}.berth-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        io(path, source)
    })
}

fn io(path: &Path, source: std::io::Error) -> NodeConfError {
    NodeConfError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The origin as containerd's `server`: the upstream URL.
fn origin_url(upstream: &UpstreamConfig) -> String {
    upstream.url.to_string().trim_end_matches('/').to_owned()
}

/// The origin as a registries.conf `location`: host[:port], no scheme.
fn origin_location(upstream: &UpstreamConfig) -> String {
    upstream
        .url
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| upstream.name.clone())
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text).expect("valid config")
    }

    fn hub() -> Config {
        config(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\naliases = [\"docker.io\", \"index.docker.io\"]\ndefault = true\nauth = \"public\"\n\
             [[upstream]]\nname = \"ghcr\"\nurl = \"https://ghcr.io\"\naliases = [\"ghcr.io\"]\nauth = \"public\"\n",
        )
    }

    fn opts(dir: &Path) -> Options {
        Options {
            mirror: "http://10.0.0.5:5000".parse().unwrap(),
            fallback: Fallback::Origin,
            containerd_dir: Some(dir.join("certs.d")),
            registries_dir: Some(dir.join("registries.conf.d")),
            ca_file: None,
            skip_verify: false,
        }
    }

    #[test]
    fn cache_dir_is_created_and_owned() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("a/cache");
        let me = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(dir.path()).unwrap();
            (m.uid(), m.gid())
        };
        assert!(prepare_cache_dir(&cache, me).unwrap() || cache.is_dir());
        assert!(cache.is_dir());
        assert!(
            !prepare_cache_dir(&cache, me).unwrap(),
            "second run changes nothing"
        );
        assert_eq!(parse_owner("65532:65532"), Some((65532, 65532)));
        assert_eq!(parse_owner("65532"), None);
    }

    #[test]
    fn mirror_urls_are_checked() {
        assert!("http://berth:5000".parse::<Mirror>().is_ok());
        assert!("https://berth.example/".parse::<Mirror>().is_ok());
        for bad in [
            "berth:5000",
            "ftp://berth",
            "http://berth:5000/v2",
            "http://u:p@berth",
        ] {
            assert!(bad.parse::<Mirror>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn hosts_are_aliases_and_host_like_names() {
        let c = hub();
        assert_eq!(
            registry_hosts(&c.upstreams[0])
                .into_iter()
                .collect::<Vec<_>>(),
            ["docker.io", "index.docker.io"]
        );
        // "ghcr" is no host name; only its alias counts.
        assert_eq!(
            registry_hosts(&c.upstreams[1])
                .into_iter()
                .collect::<Vec<_>>(),
            ["ghcr.io"]
        );
    }

    #[test]
    fn hosts_toml_names_berth_as_mirror_and_the_origin_as_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let text = hosts_toml(&hub().upstreams[0], &opts(dir.path()));
        let v: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(v["server"].as_str(), Some("https://registry-1.docker.io"));
        let caps = &v["host"]["http://10.0.0.5:5000"]["capabilities"];
        assert_eq!(caps.as_array().map(Vec::len), Some(2), "{text}");
        assert!(text.starts_with(MARKER));
    }

    #[test]
    fn drop_in_mirrors_every_host_by_upstream_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let text = registries_drop_in(&hub(), &opts(dir.path()));
        let v: toml::Value = toml::from_str(&text).expect("valid TOML");
        let regs = v["registry"].as_array().unwrap();
        let ghcr = regs
            .iter()
            .find(|r| r["prefix"].as_str() == Some("ghcr.io"))
            .expect("ghcr.io entry");
        assert_eq!(ghcr["location"].as_str(), Some("ghcr.io"));
        assert_eq!(
            ghcr["mirror"][0]["location"].as_str(),
            Some("10.0.0.5:5000/ghcr")
        );
        assert_eq!(ghcr["mirror"][0]["insecure"].as_bool(), Some(true));
        assert_eq!(regs.len(), 3, "{text}");
    }

    #[test]
    fn second_run_changes_nothing_and_removal_undoes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (c, o) = (hub(), opts(dir.path()));
        let first = plan(&c, &o, false).unwrap();
        assert_eq!(first.len(), 4);
        assert!(first.iter().all(|ch| matches!(ch, Change::Write { .. })));
        apply(&first).unwrap();
        let second = plan(&c, &o, false).unwrap();
        assert!(
            second
                .iter()
                .all(|ch| matches!(ch, Change::Unchanged { .. })),
            "{second:?}"
        );
        let removal = plan(&c, &o, true).unwrap();
        assert_eq!(removal.len(), 4, "{removal:?}");
        apply(&removal).unwrap();
        assert!(std::fs::read_dir(dir.path().join("certs.d"))
            .unwrap()
            .next()
            .is_none());
        assert!(!dir
            .path()
            .join("registries.conf.d")
            .join(DROP_IN_NAME)
            .exists());
    }

    #[test]
    fn foreign_files_are_never_touched() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let theirs = dir.path().join("certs.d/docker.io/hosts.toml");
        std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
        std::fs::write(&theirs, "server = \"https://mine.example\"\n").unwrap();
        let changes = plan(&hub(), &o, false).unwrap();
        assert!(changes.contains(&Change::Foreign {
            path: theirs.clone()
        }));
        apply(&changes).unwrap();
        apply(&plan(&hub(), &o, true).unwrap()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            "server = \"https://mine.example\"\n"
        );
    }

    #[test]
    fn hosts_no_longer_configured_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        apply(&plan(&hub(), &o, false).unwrap()).unwrap();
        let only_hub = config(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\naliases = [\"docker.io\", \"index.docker.io\"]\ndefault = true\nauth = \"public\"\n",
        );
        let changes = plan(&only_hub, &o, false).unwrap();
        let ghcr = dir.path().join("certs.d/ghcr.io/hosts.toml");
        assert!(changes.contains(&Change::Remove { path: ghcr.clone() }));
        apply(&changes).unwrap();
        assert!(!ghcr.exists());
        assert!(!ghcr.parent().unwrap().exists());
    }
}
