//! Replicas that know each other (docs/ARCHITECTURE.md, "Scale-out", "Peers"): one origin fetch
//! per blob for the whole cluster.
//!
//! The peer set is a static list and a DNS name (a headless Service) re-resolved every
//! `cluster.refresh`; this replica is in it under its `advertise` name. Every replica computes
//! the same owner for a digest by rendezvous (highest random weight) hashing over the set, so a
//! peer that joins or leaves moves only the digests it owns. A replica that misses a blob it does
//! not own streams it from the owner ([`fetch::PeerBlob`]); the owner answers on an internal,
//! secret-protected endpoint (`proxy/peer.rs`) through its own fill path and never
//! forwards again.

pub mod fetch;
mod peers;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

pub use peers::{canonical, owner_of, PeerSet};

use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::secret::Secret;
use crate::upstream::Resolver;

/// Path prefix of the peer endpoint; the digest follows.
pub const BLOB_PATH: &str = "/_berth/peer/v1/blobs/";
/// Response header by which an owner relays that its origin answered 2xx for the digest in the
/// repository the request named (membership evidence, docs/ARCHITECTURE.md "Authorization").
pub const MEMBER_HEADER: &str = "berth-member";
/// Request header carrying the client's credential for a `passthrough` origin, so the owner's
/// origin fetch is made with the client's rights. Never logged.
pub const UPSTREAM_AUTH_HEADER: &str = "berth-upstream-auth";

/// The HTTP client of peer requests: plain HTTP on the cluster's internal network, berth's
/// resolver (peer names such as `berth-0.berth` need no glibc NSS).
type PeerClient = Client<HttpConnector<Resolver>, Empty<Bytes>>;

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The shared secret could not be read.
    #[error("cluster.secret_file {path}: {source}")]
    Secret {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The secret file holds nothing but white space.
    #[error("cluster.secret_file {path}: the file is empty")]
    EmptySecret {
        /// The file.
        path: String,
    },
}

/// This replica's view of the cluster: who the peers are, who owns what, how to reach them.
pub struct Cluster {
    config: ClusterConfig,
    /// This replica's name in the peer set.
    me: String,
    peers: RwLock<Arc<PeerSet>>,
    secret: Secret,
    client: PeerClient,
    metrics: Arc<Metrics>,
}

// === impl Cluster ===

impl Cluster {
    /// Reads the shared secret and resolves the peer set once.
    pub async fn start(
        config: &ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let path = config.secret_file.display().to_string();
        let text = tokio::fs::read_to_string(&config.secret_file)
            .await
            .map_err(|source| ClusterError::Secret {
                path: path.clone(),
                source,
            })?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(ClusterError::EmptySecret { path });
        }
        let mut http = HttpConnector::new_with_resolver(Resolver::default());
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .build(http);
        let me = canonical(&config.advertise);
        let cluster = Arc::new(Cluster {
            peers: RwLock::new(Arc::new(PeerSet::new(&me, &[], &config.peers, &[]))),
            me,
            config: config.clone(),
            secret: Secret::new(secret.to_owned()),
            client,
            metrics,
        });
        cluster.refresh().await;
        Ok(cluster)
    }

    /// This replica's name in the peer set (`cluster.advertise`, canonical).
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The current peer set.
    pub fn peers(&self) -> Arc<PeerSet> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The replica that owns `digest`, or `None` when this one does.
    pub fn owner(&self, digest: &Digest) -> Option<String> {
        let set = self.peers();
        let owner = owner_of(set.members(), digest)?;
        (owner != self.me).then(|| owner.to_owned())
    }

    /// Longest wait for a peer's answer (connect and first byte).
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Whether `value` (an `Authorization` header) carries the cluster's secret. Compared in
    /// time independent of where the values differ.
    pub fn authorized(&self, value: Option<&http::HeaderValue>) -> bool {
        let Some(token) = value
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        peers::constant_time_eq(token.trim(), self.secret.expose())
    }

    /// Resolves `cluster.peers_dns` (and this replica's own name) again and installs the new
    /// set. A name that does not resolve keeps the addresses it had.
    pub async fn refresh(&self) {
        let self_addrs = resolve(&self.config.advertise, self.config.timeout)
            .await
            .unwrap_or_default();
        let current = self.peers();
        let resolved = match &self.config.peers_dns {
            None => Vec::new(),
            Some(name) => match resolve(name, self.config.timeout).await {
                Ok(addrs) if !addrs.is_empty() => one_family(addrs),
                Ok(_) => current.resolved().to_vec(),
                Err(e) => {
                    tracing::warn!(name = %name, error = %e, "cluster.peers_dns did not resolve; keeping the last peer set");
                    current.resolved().to_vec()
                }
            },
        };
        let next = PeerSet::new(&self.me, &self_addrs, &self.config.peers, &resolved);
        if next.members() != current.members() {
            tracing::info!(peers = ?next.members(), "peer set changed");
        }
        self.metrics.scale.peers.set(next.members().len() as i64);
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
    }

    /// Re-resolves the peer set every `cluster.refresh` until `shutdown`; nothing to do without
    /// `cluster.peers_dns`.
    pub async fn refresh_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.config.peers_dns.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.refresh) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.refresh().await;
        }
    }

    /// The `Authorization` value of this replica's peer requests.
    fn bearer(&self) -> http::HeaderValue {
        let mut v = http::HeaderValue::from_str(&format!("Bearer {}", self.secret.expose()))
            .expect("the secret is one line of text");
        v.set_sensitive(true);
        v
    }
}

/// A dual-stack answer names every replica twice (A and AAAA) with nothing to pair them: keep
/// the IPv4 addresses when there are any, so that every replica builds the same set.
fn one_family(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if addrs.iter().any(SocketAddr::is_ipv4) {
        addrs.into_iter().filter(SocketAddr::is_ipv4).collect()
    } else {
        addrs
    }
}

/// The addresses of `host:port` (an IP literal as is), bounded by `timeout`.
async fn resolve(host_port: &str, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    if let Ok(a) = host_port.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    let (host, port) = host_port
        .rsplit_once(':')
        .ok_or_else(|| format!("{host_port:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port in {host_port:?}"))?;
    let name: hyper_util::client::legacy::connect::dns::Name = host
        .parse()
        .map_err(|_| format!("bad host name {host:?}"))?;
    let mut resolver = Resolver::default();
    let lookup = tower_service::Service::call(&mut resolver, name);
    match tokio::time::timeout(timeout, lookup).await {
        Err(_) => Err(format!("resolving {host} timed out")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => Ok(addrs.map(|a| SocketAddr::new(a.ip(), port)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_stack_answer_keeps_one_family() {
        let v4: SocketAddr = "10.0.0.1:5002".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:5002".parse().unwrap();
        assert_eq!(one_family(vec![v6, v4]), vec![v4]);
        assert_eq!(one_family(vec![v6]), vec![v6]);
    }
}
