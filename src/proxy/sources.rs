//! Where a fill finds a blob's bytes, in order (docs/ARCHITECTURE.md, "Scale-out"): the
//! digest's owner replica (when this one is not the owner), the shared tier, the origin. A
//! source that fails or misses hands over to the next; only the origin's answer is final.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt;

use crate::cache::fill::{BlobFetcher, FetchError, FetchStream, Fetched, FetchedFrom};
use crate::metrics::Metrics;
use crate::oci::Digest;
use crate::shared::SharedTier;

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
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send>> {
        let (peer, shared, origin) = (self.peer.clone(), self.shared.clone(), self.origin.clone());
        let (digest, metrics) = (self.digest.clone(), self.metrics.clone());
        Box::pin(async move {
            if let Some(peer) = peer {
                match peer.fetch(start, end).await {
                    Ok(f) => {
                        let rest = Rest {
                            digest,
                            shared,
                            origin,
                            metrics: metrics.clone(),
                        };
                        return Ok(rest.after(spared(f, &metrics), start, end));
                    }
                    Err(e) => {
                        let to = if shared.is_some() { "shared" } else { "origin" };
                        tracing::debug!(digest = %digest, error = %e, to, "owner replica failed; falling back");
                        metrics.scale.peer_fallbacks.with_label_values(&[to]).inc();
                    }
                }
            }
            next_source(&digest, shared.as_deref(), &*origin, &metrics, start, end).await
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

/// The shared tier, else the origin, from `start`.
async fn next_source(
    digest: &Digest,
    shared: Option<&SharedTier>,
    origin: &dyn BlobFetcher,
    metrics: &Metrics,
    start: u64,
    end: Option<u64>,
) -> Result<Fetched, FetchError> {
    if let Some(shared) = shared {
        if let Some(f) = shared.fetch_blob(digest, start, end).await {
            return Ok(spared(f, metrics));
        }
    }
    origin.fetch(start, end).await
}

/// Where the rest of a blob comes from when the owner fails mid-stream.
struct Rest {
    digest: Digest,
    shared: Option<Arc<SharedTier>>,
    origin: Arc<dyn BlobFetcher>,
    metrics: Arc<Metrics>,
}

/// Which body a continued fetch is reading.
enum Leg {
    /// The owner's, with the source of the rest should it fail.
    Peer(FetchStream, Rest),
    /// The shared tier's or the origin's, from where the owner stopped.
    Rest(FetchStream),
}

impl Rest {
    /// `f` (the owner's body for bytes `start..end`), continued from the shared tier or the
    /// origin at the offset reached if the owner fails or stops short: a client still gets the
    /// whole blob, which the fill verifies as a whole.
    fn after(self, f: Fetched, start: u64, end: Option<u64>) -> Fetched {
        // The absolute end, so that the rest is asked for exactly the missing bytes.
        let end = end.or(f.total.map(|t| start + t));
        let state = (Leg::Peer(f.body, self), start);
        let body = futures_util::stream::unfold(Some(state), move |state| async move {
            let (leg, offset) = state?;
            match leg {
                Leg::Rest(mut body) => {
                    let item = body.next().await?;
                    let offset = offset + item.as_ref().map_or(0, |b| b.len() as u64);
                    let next = item.is_ok().then_some((Leg::Rest(body), offset));
                    Some((item, next))
                }
                Leg::Peer(mut body, rest) => {
                    let failure = match body.next().await {
                        Some(Ok(b)) => {
                            let offset = offset + b.len() as u64;
                            return Some((Ok(b), Some((Leg::Peer(body, rest), offset))));
                        }
                        None if end.is_none_or(|e| offset >= e) => return None,
                        None => format!("body ended at byte {offset}"),
                        Some(Err(e)) => e.to_string(),
                    };
                    let to = if rest.shared.is_some() {
                        "shared"
                    } else {
                        "origin"
                    };
                    tracing::warn!(digest = %rest.digest, offset, error = %failure, to, "owner replica failed mid-blob; continuing from the next source");
                    rest.metrics
                        .scale
                        .peer_fallbacks
                        .with_label_values(&[to])
                        .inc();
                    let next = next_source(
                        &rest.digest,
                        rest.shared.as_deref(),
                        &*rest.origin,
                        &rest.metrics,
                        offset,
                        end,
                    )
                    .await;
                    match next {
                        Err(e) => Some((Err(e), None)),
                        Ok(f) => {
                            let mut body = f.body;
                            let item = body.next().await?;
                            let offset = offset + item.as_ref().map_or(0, |b| b.len() as u64);
                            let next = item.is_ok().then_some((Leg::Rest(body), offset));
                            Some((item, next))
                        }
                    }
                }
            }
        });
        Fetched {
            body: Box::pin(body),
            ..f
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
