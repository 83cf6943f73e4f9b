//! Where a fill finds a blob's bytes, in order (docs/ARCHITECTURE.md, "Scale-out"): the
//! digest's owner replica (when this one is not the owner), the shared tier, the origin. A
//! source that fails or misses hands over to the next; only the origin's answer is final.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt;

use crate::cache::fill::{BlobFetcher, Fetched, FetchedFrom};
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::shared::SharedTier;
use crate::upstream::UpstreamError;

/// A fill's sources for one digest.
pub(super) struct TieredBlob {
    pub(super) digest: Digest,
    /// The owner replica, when another replica owns the digest.
    pub(super) peer: Option<Arc<dyn BlobFetcher>>,
    pub(super) shared: Option<Arc<SharedTier>>,
    pub(super) origin: Arc<dyn BlobFetcher>,
    pub(super) metrics: Arc<Metrics>,
}

impl BlobFetcher for TieredBlob {
    fn fetch(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, UpstreamError>> + Send>> {
        let (peer, shared, origin) = (self.peer.clone(), self.shared.clone(), self.origin.clone());
        let (digest, metrics) = (self.digest.clone(), self.metrics.clone());
        Box::pin(async move {
            if let Some(peer) = peer {
                match peer.fetch(start, end).await {
                    Ok(f) => return Ok(spared(f, &metrics)),
                    Err(e) => {
                        let to = if shared.is_some() { "shared" } else { "origin" };
                        tracing::debug!(digest = %digest, error = %e, to, "owner replica failed; falling back");
                        metrics.scale.peer_fallbacks.with_label_values(&[to]).inc();
                    }
                }
            }
            if let Some(shared) = &shared {
                if let Some(f) = shared.fetch_blob(&digest, start, end).await {
                    return Ok(spared(f, &metrics));
                }
            }
            origin.fetch(start, end).await
        })
    }

    fn verified(&self, from: FetchedFrom) {
        // The owner uploads what it fetched itself; bytes from the tier are there already.
        if from == FetchedFrom::Origin {
            if let Some(s) = &self.shared {
                s.upload_blob(&self.digest);
            }
        }
    }

    fn rejected(&self, from: FetchedFrom) {
        if from == FetchedFrom::Shared {
            if let Some(s) = &self.shared {
                s.reject_blob(&self.digest);
            }
        }
    }
}

/// Counts the bytes of a body that did not come from the origin as spared.
fn spared(mut f: Fetched, metrics: &Metrics) -> Fetched {
    let counter = metrics
        .scale
        .origin_bytes_spared
        .with_label_values(&[f.from.as_str()]);
    f.body = f
        .body
        .inspect(move |chunk| {
            if let Ok(b) = chunk {
                counter.inc_by(b.len() as u64);
            }
        })
        .boxed();
    f
}
