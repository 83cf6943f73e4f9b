//! Replicas of one berth cluster, in process: `TestCluster::start(3, || Berth::in_front_of(..))`.
//!
//! Each replica runs on a tokio runtime of its own, so that a test can kill one abruptly
//! ([`Replica::kill`]: every task and socket dropped at once, as when a process dies) while the
//! others keep serving. The replicas share a secret file and a static peer list; their peer
//! listeners must be known before any starts, so their ports are picked free beforehand and the
//! whole cluster is started again on other ports should one have been taken meanwhile.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::berth::{Berth, BerthBuilder};
use super::free_port;

/// Attempts with fresh ports when one was taken between picking and binding.
const BIND_ATTEMPTS: usize = 4;

/// One replica on its own runtime.
pub struct Replica {
    berth: Option<Berth>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Its name in the peer set: `127.0.0.1:PORT` of its peer listener.
    pub name: String,
}

/// Replicas that list each other, sharing one secret.
pub struct TestCluster {
    /// The replicas, in start order.
    pub replicas: Vec<Replica>,
    secret: String,
    secret_file: PathBuf,
    _dir: TempDir,
}

// === impl Replica ===

impl Replica {
    /// Starts `builder` on a runtime of its own; `name` is its `cluster.advertise`.
    pub async fn start(
        builder: BerthBuilder,
        name: String,
    ) -> Result<Replica, berth::server::StartError> {
        let started = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("replica runtime");
            // An error drops the runtime here, on a blocking thread, where that is allowed.
            let berth = runtime.block_on(builder.try_start())?;
            Ok::<_, berth::server::StartError>((runtime, berth))
        })
        .await
        .expect("replica start does not panic")?;
        Ok(Replica {
            berth: Some(started.1),
            runtime: Some(started.0),
            name,
        })
    }

    /// Kills the replica: its runtime stops at once, dropping every connection mid-answer and
    /// every fill; nothing is flushed.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        self.berth.take();
    }

    /// The running berth (panics once killed).
    pub fn berth(&self) -> &Berth {
        self.berth.as_ref().expect("replica is running")
    }

    /// The replica's view of the cluster.
    pub fn cluster(&self) -> std::sync::Arc<berth::cluster::Cluster> {
        self.berth()
            .app()
            .scale()
            .cluster
            .clone()
            .expect("[cluster] configured")
    }

    /// Objects (blobs and manifests) on the replica's disk.
    pub fn objects_on_disk(&self) -> u64 {
        self.berth().app().cache().index().usage().objects
    }

    /// Whether the replica's disk holds blob `digest`.
    pub async fn holds(&self, digest: &str) -> bool {
        let d: berth::oci::Digest = digest.parse().expect("digest");
        matches!(self.berth().app().cache().blob_len(&d).await, Ok(Some(_)))
    }
}

impl std::ops::Deref for Replica {
    type Target = Berth;

    fn deref(&self) -> &Berth {
        self.berth()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

// === impl TestCluster ===

impl TestCluster {
    /// `n` replicas, each configured by `builder()` plus a `[cluster]` table that lists all of
    /// them and `extra_peers` (addresses where no replica runs, say).
    pub async fn start(
        n: usize,
        builder: impl Fn() -> BerthBuilder,
        extra_peers: &[String],
    ) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = format!("cluster-secret-{:032x}", rand::random::<u128>());
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("{secret}\n")).expect("write secret");
        let mut last = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let names: Vec<String> = (0..n)
                .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())).to_string())
                .collect();
            let mut peers = names.clone();
            peers.extend(extra_peers.iter().cloned());
            let mut replicas = Vec::new();
            for name in &names {
                let table = cluster_table(name, &peers, None, &secret_file);
                match Replica::start(builder().extra(&table), name.clone()).await {
                    Ok(r) => replicas.push(r),
                    Err(e) => {
                        last = e.to_string();
                        break;
                    }
                }
            }
            if replicas.len() == n {
                return TestCluster {
                    replicas,
                    secret,
                    secret_file,
                    _dir: dir,
                };
            }
        }
        panic!("cluster did not start after {BIND_ATTEMPTS} attempts: {last}");
    }

    /// The shared secret.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The secret file every replica reads.
    pub fn secret_file(&self) -> &Path {
        &self.secret_file
    }

    /// The index of the replica that owns `digest` (every replica agrees; asserted).
    pub fn owner(&self, digest: &str) -> usize {
        let d: berth::oci::Digest = digest.parse().expect("digest");
        let owners: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| r.berth.is_some())
            .map(|r| {
                let set = r.cluster().peers();
                berth::cluster::owner_of(set.members(), &d)
                    .expect("a peer set is never empty")
                    .to_owned()
            })
            .collect();
        assert!(
            owners.windows(2).all(|w| w[0] == w[1]),
            "replicas disagree on the owner of {digest}: {owners:?}"
        );
        self.replicas
            .iter()
            .position(|r| r.name == owners[0])
            .unwrap_or_else(|| panic!("{digest} is owned by {}, not a replica", owners[0]))
    }
}

/// The `[cluster]` table of replica `name` (its peer listener's address), listing `peers`
/// statically and optionally `dns` (`name:port`).
pub fn cluster_table(
    name: &str,
    peers: &[String],
    dns: Option<&str>,
    secret_file: &Path,
) -> String {
    let mut t = format!(
        "[cluster]\nlisten = \"{name}\"\nadvertise = \"{name}\"\nsecret_file = \"{}\"\ntimeout = \"10s\"\n",
        secret_file.display()
    );
    if !peers.is_empty() {
        let list: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
        t.push_str(&format!("peers = [{}]\n", list.join(", ")));
    }
    if let Some(d) = dns {
        t.push_str(&format!("peers_dns = \"{d}\"\nrefresh = \"1s\"\n"));
    }
    t
}
