//! Manifest-driven prefetch (docs/ARCHITECTURE.md, "Prefetch"): when berth serves an image
//! manifest it fetched or revalidated at the origin, it starts fills for the image's config and
//! layers that are not cached, so that a runtime downloading three layers at a time finds the
//! others already streaming in.
//!
//! Prefetch is an ordinary fill started early: it asks the origin in the repository the client
//! was just admitted to, with the client's own upstream credentials (the same request the
//! client's blob GET would make), so it reads nothing that client could not, and the origin's
//! 2xx is the same membership evidence as for any fill. A client that asks for a blob being
//! prefetched joins that fill. Bounded per image, globally (at most half the fill slots), by
//! the images waiting, and by the disk budget; a prefetch that fails never fails a client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::blobs::Caller;
use super::App;
use crate::cache::fill::{BlobFetcher, BlobRead, Fill, Fills};
use crate::cache::{Key, ObjectKind, StoredManifest};
use crate::config::PrefetchConfig;
use crate::metrics::{Metrics, PrefetchMetrics};
use crate::oci::{media, Digest};
use crate::upstream::Selected;

/// Images whose prefetch may wait for slots at once; more are skipped (counted `busy`).
const MAX_IMAGES: usize = 256;
/// How long a prefetched blob waits for a client before its bytes count as wasted.
const USE_WINDOW: Duration = Duration::from_secs(3600);
/// Prefetched blobs remembered for the used/wasted accounting.
const MAX_TRACKED: u64 = 100_000;
/// How long a manifest a HEAD fetched waits for the client's GET of it.
const HEAD_WINDOW: Duration = Duration::from_secs(60);
/// Manifests remembered from HEADs.
const MAX_HEADED: u64 = 10_000;
/// Share of the disk budget not held by pinned objects or running fills one image's missing
/// bytes may take: a larger image is not prefetched (its client's own requests still fill it).
const BUDGET_SHARE: u64 = 4;

/// Prefetch state shared by all requests.
pub(super) struct Prefetcher {
    config: PrefetchConfig,
    /// Prefetch fills running at once, across images.
    slots: Arc<Semaphore>,
    /// Images whose prefetch task runs.
    images: watch::Sender<usize>,
    /// Fills prefetch started, so that a client which joined one that failed can retry.
    led: Mutex<HashMap<Digest, Weak<Fill>>>,
    /// Prefetched blobs no client has asked for yet, with their size; expiry counts them
    /// wasted.
    unused: moka::sync::Cache<Digest, u64>,
    /// Manifests a HEAD just fetched or revalidated at the origin (`upstream|repo|digest`): the
    /// GET of that digest that follows (containerd resolves a tag with a HEAD) prefetches.
    headed: moka::sync::Cache<String, ()>,
}

impl Prefetcher {
    /// Prefetch as configured; `fill_slots` is `cache.max_concurrent_fills`.
    pub(super) fn new(
        config: PrefetchConfig,
        fill_slots: usize,
        metrics: &PrefetchMetrics,
    ) -> Prefetcher {
        let wasted = metrics.bytes("wasted");
        let unused = moka::sync::Cache::builder()
            .max_capacity(MAX_TRACKED)
            .time_to_live(USE_WINDOW)
            .eviction_listener(move |_k, size: u64, cause| {
                if cause.was_evicted() {
                    wasted.inc_by(size);
                }
            })
            .build();
        Prefetcher {
            slots: Arc::new(Semaphore::new(config.effective_max_concurrent(fill_slots))),
            config,
            images: watch::channel(0).0,
            led: Mutex::new(HashMap::new()),
            unused,
            headed: moka::sync::Cache::builder()
                .max_capacity(MAX_HEADED)
                .time_to_live(HEAD_WINDOW)
                .build(),
        }
    }

    /// A client asked for blob `d` (any range): a prefetched blob it is the first to ask for
    /// counts as used.
    pub(super) fn used(&self, d: &Digest, metrics: &PrefetchMetrics) {
        if let Some(size) = self.unused.remove(d) {
            metrics.bytes("used").inc_by(size);
        }
    }

    /// Remembers that a HEAD for `sel` just fetched or revalidated manifest `d` at the origin.
    pub(super) fn remember_head(&self, sel: &Selected, d: &Digest) {
        if self.config.enabled {
            self.headed.insert(headed_key(sel, d), ());
        }
    }

    /// Whether a HEAD for `sel` fetched or revalidated `d` in the last minute (forgotten now:
    /// one GET prefetches).
    pub(super) fn headed(&self, sel: &Selected, d: &Digest) -> bool {
        self.config.enabled && self.headed.remove(&headed_key(sel, d)).is_some()
    }

    /// Whether `fill` is one prefetch started.
    pub(super) fn started(&self, d: &Digest, fill: &Arc<Fill>) -> bool {
        self.led
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(d)
            .and_then(Weak::upgrade)
            .is_some_and(|f| Arc::ptr_eq(&f, fill))
    }

    /// Waits until no image's prefetch is running (every fill it started has ended).
    pub(super) async fn settled(&self) {
        let mut rx = self.images.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Runs pending expiries (so `wasted` is current when metrics are scraped).
    pub(super) fn sweep(&self) {
        self.unused.run_pending_tasks();
    }

    fn lead(&self, d: &Digest, fill: &Arc<Fill>, size: u64) {
        let mut led = self.led.lock().unwrap_or_else(|p| p.into_inner());
        // Entries of fills nobody holds any more (ended, every reader gone) are dropped here,
        // so the map stays as small as the prefetch fills in use.
        led.retain(|_, w| w.strong_count() > 0);
        led.insert(d.clone(), Arc::downgrade(fill));
        drop(led);
        self.unused.insert(d.clone(), size);
    }

    fn succeeded(&self, d: &Digest) {
        self.led.lock().unwrap_or_else(|p| p.into_inner()).remove(d);
    }
}

fn headed_key(sel: &Selected, d: &Digest) -> String {
    format!("{}|{}|{d}", sel.upstream.name(), sel.name)
}

/// A blob an image manifest lists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Part {
    digest: Digest,
    size: u64,
}

/// The config and layers of an image manifest (OCI or Docker schema 2) in order, config first;
/// nothing for an index, a schema 1 manifest or anything unparsable. Layers an origin does not
/// serve (foreign or non-distributable, or with external `urls`) are left out.
fn image_parts(m: &StoredManifest) -> Vec<Part> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        digest: String,
        #[serde(default)]
        size: u64,
        #[serde(default)]
        urls: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        /// Present in an index; its entries are never read.
        manifests: Option<serde::de::IgnoredAny>,
    }
    if m.media_type == media::OCI_INDEX || m.media_type == media::DOCKER_MANIFEST_LIST {
        return Vec::new();
    }
    let Ok(parsed) = serde_json::from_slice::<Manifest>(&m.bytes) else {
        return Vec::new();
    };
    let index = parsed
        .media_type
        .as_deref()
        .is_some_and(|t| t == media::OCI_INDEX || t == media::DOCKER_MANIFEST_LIST);
    if index || parsed.manifests.is_some() {
        return Vec::new();
    }
    let mut parts: Vec<Part> = Vec::new();
    for d in parsed.config.into_iter().chain(parsed.layers) {
        let external = !d.urls.is_empty()
            || d.media_type.contains("foreign")
            || d.media_type.contains("nondistributable");
        let Ok(digest) = d.digest.parse::<Digest>() else {
            continue;
        };
        if external || parts.iter().any(|p| p.digest == digest) {
            continue;
        }
        parts.push(Part {
            digest,
            size: d.size,
        });
    }
    parts
}

impl App {
    /// Starts the prefetch of image manifest `m`'s blobs that are not cached, for the client
    /// of `sel` it was just served to (a GET that fetched or revalidated it at the origin).
    /// Returns at once; the fills run in their own tasks.
    pub(super) fn prefetch(&self, sel: &Selected, m: &StoredManifest) {
        let p = &self.prefetch;
        if !p.config.enabled || sel.upstream.config().offline {
            return;
        }
        let parts = image_parts(m);
        if parts.is_empty() {
            return;
        }
        let metrics = &self.metrics.prefetch;
        let cache = self.cache();
        let missing: Vec<Part> = parts
            .into_iter()
            .filter(|part| {
                let key = Key {
                    kind: ObjectKind::Blob,
                    digest: part.digest.clone(),
                };
                let present = cache.index().contains(&key)
                    || cache.fills().get(&part.digest).is_some()
                    || cache.memory().blob(&part.digest).is_some();
                if present {
                    metrics.blob("present").inc();
                }
                !present
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        let bytes: u64 = missing.iter().map(|p| p.size).sum();
        let usage = cache.index().usage();
        let room = cache
            .index()
            .budget()
            .saturating_sub(usage.pinned + usage.reserved)
            / BUDGET_SHARE;
        if bytes > room {
            tracing::debug!(
                repository = %sel.name, bytes, room,
                "image too large for the disk budget; not prefetching"
            );
            metrics.blob("over_budget").inc_by(missing.len() as u64);
            return;
        }
        let mut admitted = false;
        p.images.send_if_modified(|n| {
            admitted = *n < MAX_IMAGES;
            *n += usize::from(admitted);
            admitted
        });
        if !admitted {
            metrics.blob("busy").inc_by(missing.len() as u64);
            return;
        }
        let jobs: Vec<(Part, Arc<dyn BlobFetcher>)> = missing
            .into_iter()
            .map(|part| {
                let f = self.blob_fetcher(sel, &part.digest, Caller::Client);
                (part, f)
            })
            .collect();
        let run = PrefetchRun {
            fills: self.cache().fills().clone(),
            prefetch: self.prefetch.clone(),
            metrics: self.metrics.clone(),
            per_image: Arc::new(Semaphore::new(p.config.per_image)),
            failed: Arc::new(AtomicBool::new(false)),
        };
        metrics.images_running.inc();
        tokio::spawn(async move {
            run.image(jobs).await;
            run.prefetch.images.send_modify(|n| *n -= 1);
            run.metrics.prefetch.images_running.dec();
        });
    }
}

/// One image's prefetch.
struct PrefetchRun {
    fills: Arc<Fills>,
    prefetch: Arc<Prefetcher>,
    metrics: Arc<Metrics>,
    per_image: Arc<Semaphore>,
    /// A blob of this image failed: the rest are not started (the origin is refusing or
    /// failing; the client's own requests will tell it).
    failed: Arc<AtomicBool>,
}

impl PrefetchRun {
    async fn image(&self, jobs: Vec<(Part, Arc<dyn BlobFetcher>)>) {
        let mut running = tokio::task::JoinSet::new();
        for (part, fetcher) in jobs {
            let Ok(mine) = self.per_image.clone().acquire_owned().await else {
                return;
            };
            let Ok(slot) = self.prefetch.slots.clone().acquire_owned().await else {
                return;
            };
            let metrics = &self.metrics.prefetch;
            if self.failed.load(Ordering::Relaxed) {
                metrics.blob("abandoned").inc();
                continue;
            }
            match self.fills.blob_or_fill(&part.digest, || fetcher).await {
                Ok(BlobRead::Filling { fill, leader: true }) => {
                    metrics.blob("started").inc();
                    self.prefetch.lead(&part.digest, &fill, part.size);
                    let (prefetch, metrics, failed) = (
                        self.prefetch.clone(),
                        self.metrics.clone(),
                        self.failed.clone(),
                    );
                    running.spawn(async move {
                        let outcome = fill.finished().await;
                        drop(fill);
                        let metrics = &metrics.prefetch;
                        match outcome {
                            Ok(true) => {
                                metrics.blob("filled").inc();
                                metrics.bytes("fetched").inc_by(part.size);
                                prefetch.succeeded(&part.digest);
                            }
                            Ok(false) | Err(_) => {
                                // Not stored or failed: no client should count it as used.
                                metrics.blob("failed").inc();
                                prefetch.unused.invalidate(&part.digest);
                                failed.store(true, Ordering::Relaxed);
                            }
                        }
                        drop((mine, slot));
                    });
                }
                Ok(_) => metrics.blob("present").inc(),
                Err(e) => {
                    tracing::debug!(digest = %part.digest, error = %e, "prefetch could not start");
                    metrics.blob("failed").inc();
                    self.failed.store(true, Ordering::Relaxed);
                }
            }
        }
        while running.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn manifest(media_type: &str, json: &str) -> StoredManifest {
        StoredManifest {
            media_type: media_type.to_owned(),
            bytes: Bytes::from(json.to_owned()),
        }
    }

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn an_image_manifest_yields_config_then_layers() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":7}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":100}},
                      {{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":200}},
                      {{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":100}}]}}"#,
            media::OCI_MANIFEST,
            d('c'),
            d('a'),
            d('b'),
            d('a')
        );
        let parts = image_parts(&manifest(media::OCI_MANIFEST, &json));
        let got: Vec<(String, u64)> = parts
            .iter()
            .map(|p| (p.digest.to_string(), p.size))
            .collect();
        assert_eq!(got, vec![(d('c'), 7), (d('a'), 100), (d('b'), 200)]);
    }

    #[test]
    fn indexes_schema1_and_garbage_yield_nothing() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{}","size":5}}]}}"#,
            media::OCI_MANIFEST,
            d('a')
        );
        assert!(image_parts(&manifest(media::OCI_INDEX, &index)).is_empty());
        // An index served under a manifest media type is still an index.
        assert!(image_parts(&manifest(media::OCI_MANIFEST, &index)).is_empty());
        let schema1 = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{}"}}]}}"#,
            d('a')
        );
        assert!(image_parts(&manifest("application/json", &schema1)).is_empty());
        assert!(image_parts(&manifest(media::OCI_MANIFEST, "not json")).is_empty());
        let bad_digest = r#"{"layers":[{"digest":"sha256:nothex","size":1}]}"#;
        assert!(image_parts(&manifest(media::OCI_MANIFEST, bad_digest)).is_empty());
    }

    #[test]
    fn layers_the_origin_does_not_serve_are_left_out() {
        let json = format!(
            r#"{{"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}","size":1,"urls":["https://example.com/x"]}},
                          {{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{}","size":1}},
                          {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":1,"urls":["https://example.com/y"]}},
                          {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":1}}]}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let parts = image_parts(&manifest(media::DOCKER_MANIFEST, &json));
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].digest.to_string(), d('e'));
    }
}
