//! The shared tier (docs/ARCHITECTURE.md, "Scale-out"): blobs and manifests on object storage
//! (Azure Blob, S3, GCS, a local directory) that the replicas of one region share, between the
//! disk tier and the origin.
//!
//! Only content-addressed bytes live here, under their digest: `<prefix>/blobs/<alg>/<hex>`
//! and `<prefix>/manifests/<alg>/<hex>` (the manifest's media type on the first line). Every
//! read is verified against the digest: a blob by the fill that streams it (its last bytes are
//! held back until the check), a manifest before it is used. An object that fails is deleted
//! and counted, and the bytes come from the origin instead. Tag mappings and membership
//! evidence are never read from here: who may read what is the origin's word (or an
//! authenticated peer's relay of it), not the content of a bucket.
//!
//! A store that fails (unreachable, timing out, 5xx) is skipped for a while (1 s, doubling to
//! 1 min) so that clients do not each pay its timeout; reads go to the origin meanwhile and the
//! tier is tried again when the wait ends.

mod http;
pub use http::Connector;
mod upload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig};

use crate::cache::fill::{FetchError, Fetched, FetchedFrom};
use crate::cache::DiskStore;
use crate::config::SharedConfig;
use crate::metrics::Metrics;
use crate::oci::{Digest, Hasher};
use crate::upstream::UpstreamError;

pub use upload::Upload;

/// Name errors carry for the shared tier, as an "upstream" of a fill.
const NAME: &str = "shared tier";
/// Longest the tier is skipped after failures.
const MAX_SKIP: Duration = Duration::from_secs(60);

/// Why the shared tier could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cache.shared.url {url}: {reason}")]
pub struct OpenError {
    url: String,
    reason: String,
}

/// The shared tier of one berth process.
pub struct SharedTier {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
    uploads: upload::Uploads,
    skip: std::sync::Mutex<Skip>,
}

/// The failure backoff: skip the tier until `until`; the next wait is `next`.
#[derive(Default)]
struct Skip {
    until: Option<Instant>,
    next: Duration,
}

impl SharedTier {
    /// Opens the store named by `cfg.url` (credentials from the environment, the way the
    /// cloud's SDKs take them) and starts the uploaders. `disk` is where verified blobs are
    /// read from for upload.
    pub fn open(
        cfg: &SharedConfig,
        disk: Arc<DiskStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<SharedTier>, OpenError> {
        let store = build_store(cfg).map_err(|reason| OpenError {
            url: cfg.url.clone(),
            reason,
        })?;
        Ok(Self::with_store(store, cfg, disk, metrics))
    }

    /// A tier over an already built store (tests, other backends).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        cfg: &SharedConfig,
        disk: Arc<DiskStore>,
        metrics: Arc<Metrics>,
    ) -> Arc<SharedTier> {
        Arc::new_cyclic(|weak| SharedTier {
            store: store.clone(),
            prefix: cfg.prefix.clone(),
            timeout: cfg.timeout,
            metrics: metrics.clone(),
            uploads: upload::Uploads::start(weak.clone(), cfg, disk, metrics),
            skip: std::sync::Mutex::new(Skip::default()),
        })
    }

    fn key(&self, kind: &str, d: &Digest) -> StorePath {
        let (alg, hex) = (d.algorithm().as_str(), d.hex());
        let k = if self.prefix.is_empty() {
            format!("{kind}/{alg}/{hex}")
        } else {
            format!("{}/{kind}/{alg}/{hex}", self.prefix)
        };
        StorePath::from(k)
    }

    /// Whether the tier is being skipped after failures (counted as a skipped lookup).
    fn skipping(&self, kind: &str) -> bool {
        let s = self.skip.lock().unwrap_or_else(|p| p.into_inner());
        let skipping = s.until.is_some_and(|u| Instant::now() < u);
        if skipping {
            self.count_lookup(kind, "skipped");
        }
        skipping
    }

    fn failed(&self, kind: &str, what: &str, e: &dyn std::fmt::Display) {
        self.count_lookup(kind, "error");
        let mut s = self.skip.lock().unwrap_or_else(|p| p.into_inner());
        let wait = if s.next.is_zero() {
            Duration::from_secs(1)
        } else {
            s.next
        };
        s.until = Some(Instant::now() + wait);
        s.next = (wait * 2).min(MAX_SKIP);
        tracing::warn!(error = %e, skip_for = ?wait, "shared tier {what} failed; using the origin meanwhile");
    }

    fn succeeded(&self) {
        let mut s = self.skip.lock().unwrap_or_else(|p| p.into_inner());
        if s.until.is_some() {
            tracing::info!("shared tier answers again");
        }
        *s = Skip::default();
    }

    fn count_lookup(&self, kind: &str, result: &str) {
        self.metrics
            .scale
            .shared_lookups
            .with_label_values(&[kind, result])
            .inc();
    }

    /// Bytes `start..end` of blob `d` (`end` = its end when `None`), if the tier holds it; the
    /// caller verifies them. `None` on a miss, and on a failure (counted; the tier is skipped
    /// for a while).
    pub async fn fetch_blob(&self, d: &Digest, start: u64, end: Option<u64>) -> Option<Fetched> {
        if self.skipping("blob") {
            return None;
        }
        let range = match (start, end) {
            (0, None) => None,
            (s, None) => Some(GetRange::Offset(s)),
            (s, Some(e)) => Some(GetRange::Bounded(s..e)),
        };
        let opts = GetOptions {
            range,
            ..GetOptions::default()
        };
        let key = self.key("blobs", d);
        let got = tokio::time::timeout(self.timeout, self.store.get_opts(&key, opts)).await;
        let result = match got {
            Ok(Ok(r)) => r,
            Ok(Err(object_store::Error::NotFound { .. })) => {
                self.succeeded();
                self.count_lookup("blob", "miss");
                return None;
            }
            Ok(Err(e)) => {
                self.failed("blob", "read", &e);
                return None;
            }
            Err(_) => {
                self.failed("blob", "read", &"timed out");
                return None;
            }
        };
        self.succeeded();
        self.count_lookup("blob", "hit");
        let total = result.range.end - result.range.start;
        let timeout = self.timeout;
        let read = self.metrics.scale.shared_bytes.with_label_values(&["read"]);
        let inner = result.into_stream();
        // Each chunk must arrive within the timeout: a store that stalls mid-blob fails the
        // fill (its clients retry) instead of holding them forever.
        let body = futures_util::stream::unfold(Some(inner), move |state| {
            let read = read.clone();
            async move {
                let mut inner = state?;
                let item = match tokio::time::timeout(timeout, inner.next()).await {
                    Err(_) => Err(FetchError::from(UpstreamError::Timeout {
                        upstream: NAME.into(),
                        what: "shared tier read",
                    })),
                    Ok(None) => return None,
                    Ok(Some(Ok(b))) => {
                        read.inc_by(b.len() as u64);
                        return Some((Ok(b), Some(inner)));
                    }
                    Ok(Some(Err(e))) => Err(FetchError::from(UpstreamError::Unreachable {
                        upstream: NAME.into(),
                        reason: e.to_string(),
                    })),
                };
                Some((item, None))
            }
        })
        .boxed();
        Some(Fetched {
            total: Some(total),
            source: NAME.into(),
            body,
            from: FetchedFrom::Shared,
        })
    }

    /// Manifest `d` (media type, bytes) if the tier holds it and its bytes verify. A damaged
    /// object is deleted and counted.
    pub async fn manifest(&self, d: &Digest) -> Option<(String, Bytes)> {
        if self.skipping("manifest") {
            return None;
        }
        let key = self.key("manifests", d);
        let got = tokio::time::timeout(self.timeout, async {
            self.store.get(&key).await?.bytes().await
        })
        .await;
        let raw = match got {
            Ok(Ok(b)) => b,
            Ok(Err(object_store::Error::NotFound { .. })) => {
                self.succeeded();
                self.count_lookup("manifest", "miss");
                return None;
            }
            Ok(Err(e)) => {
                self.failed("manifest", "read", &e);
                return None;
            }
            Err(_) => {
                self.failed("manifest", "read", &"timed out");
                return None;
            }
        };
        self.succeeded();
        let parsed = raw
            .iter()
            .position(|&b| b == b'\n')
            .and_then(|nl| {
                let media = std::str::from_utf8(&raw[..nl]).ok()?.to_owned();
                Some((media, raw.slice(nl + 1..)))
            })
            .filter(|(media, bytes)| {
                !media.is_empty() && bytes.len() <= crate::oci::media::MAX_MANIFEST_BYTES && {
                    let mut h = Hasher::new(d.algorithm());
                    h.update(bytes);
                    h.finish() == *d
                }
            });
        match parsed {
            Some(m) => {
                self.count_lookup("manifest", "hit");
                self.metrics
                    .scale
                    .shared_bytes
                    .with_label_values(&["read"])
                    .inc_by(raw.len() as u64);
                Some(m)
            }
            None => {
                self.discard("manifests", d);
                None
            }
        }
    }

    /// Queues verified blob `d` (on the local disk) for upload.
    pub fn upload_blob(&self, d: &Digest) {
        self.uploads.push(Upload::Blob(d.clone()));
    }

    /// Queues a verified manifest for upload.
    pub fn upload_manifest(&self, d: &Digest, media_type: &str, bytes: Bytes) {
        self.uploads.push(Upload::Manifest {
            digest: d.clone(),
            media_type: media_type.to_owned(),
            bytes,
        });
    }

    /// A blob read from the tier did not match its digest: delete the object (so the next
    /// fill goes to the origin and uploads good bytes) and count it.
    pub fn reject_blob(&self, d: &Digest) {
        self.discard("blobs", d);
    }

    fn discard(&self, kind: &'static str, d: &Digest) {
        self.metrics.scale.shared_corrupt.inc();
        tracing::error!(digest = %d, "shared tier object does not match its digest; deleting it");
        let (store, key) = (self.store.clone(), self.key(kind, d));
        tokio::spawn(async move {
            if let Err(e) = store.delete(&key).await {
                tracing::warn!(key = %key, error = %e, "could not delete a damaged shared object");
            }
        });
    }

    /// Uploads waiting or running.
    pub fn pending_uploads(&self) -> usize {
        self.uploads.pending()
    }

    /// Waits until no upload is waiting or running (tests, `berth warm`).
    pub async fn uploads_settled(&self) {
        self.uploads.settled().await
    }
}

/// The object store for `cfg.url`, talking HTTP through berth's own client.
fn build_store(cfg: &SharedConfig) -> Result<Arc<dyn ObjectStore>, String> {
    let (scheme, _) = cfg.url.split_once("://").ok_or("not a URL")?;
    let connector = http::Connector {
        timeout: cfg.timeout,
    };
    // Few retries, bounded by the timeout: a read that fails falls back to the origin, and an
    // upload has its own attempts.
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: cfg.timeout,
        ..RetryConfig::default()
    };
    let opt_err = |k: &str, e: object_store::Error| format!("option {k}: {e}");
    match scheme {
        "file" => {
            let dir = &cfg.url["file://".len()..];
            std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(store))
        }
        "s3" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_url(&cfg.url)
                .with_retry(retry)
                .with_http_connector(connector);
            for (k, v) in &cfg.options {
                b = b.with_config(k.parse().map_err(|e| opt_err(k, e))?, v);
            }
            Ok(Arc::new(b.build().map_err(|e| e.to_string())?))
        }
        "az" | "azure" | "abfs" => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(&cfg.url)
                .with_retry(retry)
                .with_http_connector(connector);
            for (k, v) in &cfg.options {
                b = b.with_config(k.parse().map_err(|e| opt_err(k, e))?, v);
            }
            Ok(Arc::new(b.build().map_err(|e| e.to_string())?))
        }
        "gs" => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(&cfg.url)
                .with_retry(retry)
                .with_http_connector(connector);
            for (k, v) in &cfg.options {
                b = b.with_config(k.parse().map_err(|e| opt_err(k, e))?, v);
            }
            Ok(Arc::new(b.build().map_err(|e| e.to_string())?))
        }
        other => Err(format!("unsupported scheme {other:?}")),
    }
}
