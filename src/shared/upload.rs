//! Background uploads to the shared tier: a bounded queue, at most
//! `cache.shared.max_concurrent_uploads` running, each retried with a growing wait up to
//! `cache.shared.upload_attempts` times. A full queue drops the upload (counted): the blob stays
//! on the local disk and another replica, or this one's next fill, uploads it later. A client
//! never waits for an upload.
//!
//! Architecture: docs/ARCHITECTURE.md, "Shared tier".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::sync::{mpsc, watch, Semaphore};

use super::SharedTier;
use crate::cache::DiskStore;
use crate::config::SharedConfig;
use crate::metrics::Metrics;
use crate::oci::Digest;

/// Size of the reads an upload makes from the local file.
const READ: usize = 1 << 20;
/// Parts of one multipart upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// One verified object to upload.
#[derive(Debug, Clone)]
pub enum Upload {
    /// A blob, read from the local disk tier when its turn comes.
    Blob(Digest),
    /// A manifest and its media type.
    Manifest {
        /// Its digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
        /// Its bytes.
        bytes: Bytes,
    },
}

/// The queue and its workers.
pub(super) struct Uploads {
    tx: mpsc::Sender<Upload>,
    pending: Arc<AtomicUsize>,
    settled: watch::Sender<usize>,
    metrics: Arc<Metrics>,
}

/// How one upload ended.
enum Outcome {
    Uploaded(u64),
    Exists,
    Evicted,
}

impl Uploads {
    /// Starts the dispatcher (needs a Tokio runtime).
    pub(super) fn start(
        tier: Weak<SharedTier>,
        cfg: &SharedConfig,
        disk: Arc<DiskStore>,
        metrics: Arc<Metrics>,
    ) -> Uploads {
        let (tx, mut rx) = mpsc::channel::<Upload>(cfg.max_pending_uploads);
        let pending = Arc::new(AtomicUsize::new(0));
        let settled = watch::channel(0).0;
        let slots = Arc::new(Semaphore::new(cfg.max_concurrent_uploads));
        let (attempts, part) = (cfg.upload_attempts, cfg.part_bytes as usize);
        let (p, s, m) = (pending.clone(), settled.clone(), metrics.clone());
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(tier) = tier.upgrade() else { return };
                let (p, s, m, disk) = (p.clone(), s.clone(), m.clone(), disk.clone());
                tokio::spawn(async move {
                    let result = with_attempts(attempts, || tier.upload(&job, &disk, part)).await;
                    let label = match result {
                        Ok(Outcome::Uploaded(n)) => {
                            m.scale
                                .shared_bytes
                                .with_label_values(&["written"])
                                .inc_by(n);
                            "uploaded"
                        }
                        Ok(Outcome::Exists) => "exists",
                        Ok(Outcome::Evicted) => "evicted",
                        Err(e) => {
                            tracing::warn!(error = %e, "shared tier upload failed; giving up");
                            "failed"
                        }
                    };
                    m.scale.shared_uploads.with_label_values(&[label]).inc();
                    drop(permit);
                    let left = p.fetch_sub(1, Ordering::AcqRel) - 1;
                    m.scale.shared_uploads_pending.set(left as i64);
                    s.send_replace(left);
                });
            }
        });
        Uploads {
            tx,
            pending,
            settled,
            metrics,
        }
    }

    /// Queues an upload, or drops it (counted) when the queue is full.
    pub(super) fn push(&self, job: Upload) {
        let n = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        if self.tx.try_send(job).is_err() {
            let left = self.pending.fetch_sub(1, Ordering::AcqRel) - 1;
            self.settled.send_replace(left);
            self.metrics
                .scale
                .shared_uploads
                .with_label_values(&["dropped"])
                .inc();
            return;
        }
        self.metrics.scale.shared_uploads_pending.set(n as i64);
    }

    pub(super) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    pub(super) async fn settled(&self) {
        let mut rx = self.settled.subscribe();
        while self.pending() > 0 {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Runs `f` up to `attempts` times, waiting 1 s, 2 s, 4 s ... (at most 30 s) in between.
async fn with_attempts<F, Fut, T>(attempts: u32, mut f: F) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, object_store::Error>>,
{
    let mut wait = Duration::from_secs(1);
    let mut n = 1;
    loop {
        match f().await {
            Ok(x) => return Ok(x),
            Err(e) if n >= attempts => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, attempt = n, "shared tier upload failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
                n += 1;
            }
        }
    }
}

impl SharedTier {
    /// One attempt at one upload.
    async fn upload(
        &self,
        job: &Upload,
        disk: &Arc<DiskStore>,
        part: usize,
    ) -> Result<Outcome, object_store::Error> {
        let (kind, digest) = match job {
            Upload::Blob(d) => ("blobs", d),
            Upload::Manifest { digest, .. } => ("manifests", digest),
        };
        let key = self.key(kind, digest);
        // Another replica (or an earlier fill here) may have uploaded it already.
        match self.store.head(&key).await {
            Ok(_) => return Ok(Outcome::Exists),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        match job {
            Upload::Manifest {
                media_type, bytes, ..
            } => {
                let mut body = Vec::with_capacity(media_type.len() + 1 + bytes.len());
                body.extend_from_slice(media_type.as_bytes());
                body.push(b'\n');
                body.extend_from_slice(bytes);
                let n = body.len() as u64;
                self.store.put(&key, PutPayload::from(body)).await?;
                Ok(Outcome::Uploaded(n))
            }
            Upload::Blob(d) => {
                let (store, d2) = (disk.clone(), d.clone());
                let opened = tokio::task::spawn_blocking(move || store.open_blob(&d2))
                    .await
                    .map_err(|e| generic(e.to_string()))?
                    .map_err(|e| generic(e.to_string()))?;
                let Some((file, size)) = opened else {
                    return Ok(Outcome::Evicted);
                };
                let file = Arc::new(file);
                if size as usize <= part {
                    let bytes = read_at(file, 0, size as usize).await?;
                    self.store.put(&key, PutPayload::from(bytes)).await?;
                } else {
                    let upload = self.store.put_multipart(&key).await?;
                    let mut w = WriteMultipart::new_with_chunk_size(upload, part);
                    let mut at = 0u64;
                    while at < size {
                        let n = (size - at).min(READ as u64) as usize;
                        let chunk = match read_at(file.clone(), at, n).await {
                            Ok(c) => c,
                            Err(e) => {
                                let _ = w.abort().await;
                                return Err(e);
                            }
                        };
                        if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                            let _ = w.abort().await;
                            return Err(e);
                        }
                        w.write(&chunk);
                        at += n as u64;
                    }
                    w.finish().await?;
                }
                Ok(Outcome::Uploaded(size))
            }
        }
    }
}

fn generic(msg: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "shared",
        source: msg.into(),
    }
}

async fn read_at(
    file: Arc<std::fs::File>,
    offset: u64,
    len: usize,
) -> Result<Bytes, object_store::Error> {
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok::<_, std::io::Error>(Bytes::from(buf))
    })
    .await
    .map_err(|e| generic(e.to_string()))?
    .map_err(|e| generic(e.to_string()))
}
