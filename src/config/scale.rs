//! `[cache.shared]` and `[cluster]`: the keys of a scaled-out berth (docs/ARCHITECTURE.md,
//! "Scale-out").

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Table;

use super::Errors;

/// `[cache.shared]`: a tier on object storage that replicas of one region share.
#[derive(Debug, Clone)]
pub struct SharedConfig {
    /// Where: `az://<container>`, `s3://<bucket>`, `gs://<bucket>` or `file:///<dir>`.
    pub url: String,
    /// Key prefix inside the container or bucket (no leading or trailing `/`).
    pub prefix: String,
    /// Non-secret options handed to the object store's builder (`endpoint`, `region`,
    /// `allow_http`, ...). Credentials come from the environment or files, never from here.
    pub options: BTreeMap<String, String>,
    /// Uploads running at once.
    pub max_concurrent_uploads: usize,
    /// Uploads waiting for a slot; a verified blob beyond this is not uploaded (counted).
    pub max_pending_uploads: usize,
    /// Attempts per upload before it is given up (counted as failed).
    pub upload_attempts: u32,
    /// Size of the parts of a multipart upload.
    pub part_bytes: u64,
    /// Longest wait for the object store's answer (first byte of a read, each request of an
    /// upload) before the tier is skipped for this request.
    pub timeout: Duration,
}

/// `[cluster]`: replicas that know each other and fetch each blob once per cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The internal peer endpoint's listener.
    pub listen: SocketAddr,
    /// How other replicas reach this one (`host:port`): its identity in the peer set.
    pub advertise: String,
    /// A static peer list (`host:port` each, this replica included or not).
    pub peers: Vec<String>,
    /// A DNS name (`name:port`) whose addresses are the peers, such as a headless Service;
    /// re-resolved every `refresh`.
    pub peers_dns: Option<String>,
    /// How often `peers_dns` is resolved again.
    pub refresh: Duration,
    /// File holding the secret every replica of the cluster shares; peer requests carry it.
    pub secret_file: PathBuf,
    /// Longest wait for a peer's first byte before falling back to the shared tier or origin.
    pub timeout: Duration,
}

/// Option keys of `[cache.shared.options]` that would put a credential into the config file.
const SECRET_OPTION_WORDS: &[&str] = &["key", "secret", "token", "password", "sas", "credential"];

impl Errors {
    /// Takes table `key` out of `t`; `full` is its dotted name for messages.
    fn subtable(&mut self, t: &mut Table, key: &str, full: &str) -> Table {
        match t.remove(key) {
            None => Table::new(),
            Some(toml::Value::Table(t)) => t,
            Some(_) => {
                self.push(format!("{full}: must be a table"));
                Table::new()
            }
        }
    }

    /// `[cache.shared]` from the `[cache]` table; `None` when the table is absent.
    pub(super) fn shared(&mut self, cache_t: &mut Table) -> Option<SharedConfig> {
        cache_t.get("shared")?;
        let mut t = self.subtable(cache_t, "shared", "cache.shared");
        let url = self.string(&mut t, "cache.shared.url");
        match url.as_deref() {
            None => self.push("cache.shared.url: required when [cache.shared] is present".into()),
            Some(u) if !valid_store_url(u) => self.push(format!(
                "cache.shared.url: {u:?} must be az://<container>, s3://<bucket>, gs://<bucket> or file:///<directory>"
            )),
            _ => {}
        }
        let prefix = self
            .string(&mut t, "cache.shared.prefix")
            .unwrap_or_else(|| "berth".into())
            .trim_matches('/')
            .to_owned();
        let mut options = BTreeMap::new();
        let mut opt_t = self.subtable(&mut t, "options", "cache.shared.options");
        for (k, v) in std::mem::take(&mut opt_t) {
            let lower = k.to_ascii_lowercase();
            if SECRET_OPTION_WORDS.iter().any(|w| lower.contains(w)) {
                self.push(format!(
                    "cache.shared.options.{k}: credentials never go in the config file; set them in the environment (AZURE_*, AWS_*, GOOGLE_*) or use workload identity"
                ));
                continue;
            }
            match v {
                toml::Value::String(s) => {
                    options.insert(k, s);
                }
                toml::Value::Boolean(b) => {
                    options.insert(k, b.to_string());
                }
                other => self.push(format!(
                    "cache.shared.options.{k}: expected a string, found {other}"
                )),
            }
        }
        let shared = SharedConfig {
            url: url.unwrap_or_default(),
            prefix,
            options,
            max_concurrent_uploads: self
                .count(&mut t, "cache.shared.max_concurrent_uploads", 1..=256)
                .unwrap_or(4),
            max_pending_uploads: self
                .count(&mut t, "cache.shared.max_pending_uploads", 1..=1_000_000)
                .unwrap_or(4096),
            upload_attempts: self
                .count(&mut t, "cache.shared.upload_attempts", 1..=100)
                .unwrap_or(5) as u32,
            part_bytes: self
                .size(&mut t, "cache.shared.part_bytes")
                .unwrap_or(8 << 20),
            timeout: self
                .duration(&mut t, "cache.shared.timeout")
                .unwrap_or(Duration::from_secs(10)),
        };
        if !(5 << 20..=5 << 30).contains(&shared.part_bytes) {
            self.push("cache.shared.part_bytes: must be between 5MiB and 5GiB (the limits of S3 multipart parts)".into());
        }
        if shared.timeout.is_zero() {
            self.push("cache.shared.timeout: must be greater than zero".into());
        }
        self.unknown(&t, "cache.shared");
        Some(shared)
    }

    /// `[cluster]`; `None` when the table is absent.
    pub(super) fn cluster(&mut self, table: &mut Table, base: &Path) -> Option<ClusterConfig> {
        table.get("cluster")?;
        let mut t = self.table(table, "cluster");
        let listen = self.addr(&mut t, "cluster.listen");
        if listen.is_none() {
            self.push("cluster.listen: required (the internal peer endpoint)".into());
        }
        let advertise = self.string(&mut t, "cluster.advertise");
        match advertise.as_deref() {
            None => self.push(
                "cluster.advertise: required (host:port other replicas reach this one at)".into(),
            ),
            Some(a) if !valid_host_port(a) => {
                self.push(format!("cluster.advertise: {a:?} must be host:port"))
            }
            _ => {}
        }
        let peers = self.string_list(&mut t, "cluster.peers");
        for p in &peers {
            if !valid_host_port(p) {
                self.push(format!("cluster.peers: {p:?} must be host:port"));
            }
        }
        let peers_dns = self.string(&mut t, "cluster.peers_dns");
        if let Some(d) = &peers_dns {
            if !valid_host_port(d) {
                self.push(format!("cluster.peers_dns: {d:?} must be name:port"));
            }
        }
        if peers.is_empty() && peers_dns.is_none() {
            self.push("cluster: set cluster.peers or cluster.peers_dns".into());
        }
        let secret_file = self.path(&mut t, "cluster.secret_file", base);
        match &secret_file {
            None => self.push("cluster.secret_file: required (the secret replicas share)".into()),
            Some(p) if !p.is_file() => self.push(format!(
                "cluster.secret_file: {} is not a readable file",
                p.display()
            )),
            _ => {}
        }
        let cluster = ClusterConfig {
            listen: listen.unwrap_or_else(|| ([0, 0, 0, 0], 5002).into()),
            advertise: advertise.unwrap_or_default(),
            peers,
            peers_dns,
            refresh: self
                .duration(&mut t, "cluster.refresh")
                .unwrap_or(Duration::from_secs(10)),
            secret_file: secret_file.unwrap_or_default(),
            timeout: self
                .duration(&mut t, "cluster.timeout")
                .unwrap_or(Duration::from_secs(2)),
        };
        if cluster.refresh.is_zero() || cluster.timeout.is_zero() {
            self.push("cluster.refresh and cluster.timeout must be greater than zero".into());
        }
        self.unknown(&t, "cluster");
        Some(cluster)
    }
}

fn valid_store_url(u: &str) -> bool {
    let Some((scheme, rest)) = u.split_once("://") else {
        return false;
    };
    match scheme {
        "az" | "azure" | "abfs" | "s3" | "gs" => {
            let bucket = rest.split('/').next().unwrap_or("");
            !bucket.is_empty()
        }
        "file" => rest.starts_with('/') && rest.len() > 1,
        _ => false,
    }
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        for ok in ["az://c", "s3://bucket/x", "gs://b", "file:///var/cache/x"] {
            assert!(valid_store_url(ok), "{ok}");
        }
        for bad in ["", "az://", "http://x", "file://rel", "s3:/b"] {
            assert!(!valid_store_url(bad), "{bad}");
        }
    }

    #[test]
    fn host_ports() {
        assert!(valid_host_port("berth-0.berth:5002"));
        assert!(valid_host_port("[::1]:5002"));
        assert!(!valid_host_port("berth"));
        assert!(!valid_host_port("berth:0"));
        assert!(!valid_host_port(":5002"));
    }
}
