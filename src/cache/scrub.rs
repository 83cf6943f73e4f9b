//! Scrubbing the disk tier (docs/ARCHITECTURE.md, "Cache", corruption at rest): every stored
//! object (or a random sample) is read back and hashed, at a bounded rate; one whose size differs
//! from what the index recorded or whose bytes do not match its digest is dropped from the
//! index and deleted, so the next request fetches it again from the origin. Runs on a stopped
//! cache (`berth verify`) or on a running one (`POST /verify` on the admin listener).

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Cache, Key, ObjectKind};
use crate::oci::Hasher;

/// What to scrub and how fast.
#[derive(Debug, Clone, Default)]
pub struct ScrubOptions {
    /// Check at most this many objects, chosen at random; all of them when `None`.
    pub sample: Option<usize>,
    /// Read at most this many bytes per second; unbounded when `None`.
    pub rate: Option<u64>,
}

/// One object the scrub dropped.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// `blob` or `manifest`.
    pub kind: &'static str,
    /// The object's digest.
    pub digest: String,
    /// What was wrong with it.
    pub reason: String,
    /// Whether it was pinned (its image must be warmed or imported again).
    pub pinned: bool,
}

/// What a scrub found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScrubReport {
    /// Objects read back and hashed.
    pub checked: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Objects that did not match and were removed.
    pub corrupt: Vec<Finding>,
    /// Objects the index named whose file had gone (forgotten, not counted as corrupt).
    pub missing: u64,
    /// Seconds the scrub took.
    pub seconds: f64,
}

/// Counters of scrubbing, for `berth_cache_corrupt_total{found_by="scrub"}` and
/// `berth_scrub_*` (the serving path counts its own finds in [`super::FillStats`]).
#[derive(Debug, Default)]
pub struct CorruptionStats {
    /// Found by a scrub.
    pub by_scrub: AtomicU64,
    /// Objects a scrub checked.
    pub scrubbed_objects: AtomicU64,
    /// Bytes a scrub read.
    pub scrubbed_bytes: AtomicU64,
    /// Whether a scrub is running (one at a time).
    running: AtomicBool,
}

/// Why a scrub did not run.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    /// Another scrub of this cache is running.
    #[error("a scrub of this cache is already running")]
    Busy,
    /// Reading the cache failed in a way that is not about one object.
    #[error("scrub failed: {0}")]
    Io(#[from] io::Error),
}

/// Bytes read per step (and between rate checks).
const CHUNK: usize = 1 << 20;

impl Cache {
    /// Scrubs the disk tier (blocking: run it on the blocking pool or a command's thread).
    pub fn scrub(&self, opts: &ScrubOptions) -> Result<ScrubReport, ScrubError> {
        let stats = &self.corruption;
        if stats.running.swap(true, Ordering::SeqCst) {
            return Err(ScrubError::Busy);
        }
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _running = Running(&stats.running);

        let started = Instant::now();
        let mut keys = self.index.entries();
        if let Some(n) = opts.sample {
            if n < keys.len() {
                let picked = rand::seq::index::sample(&mut rand::thread_rng(), keys.len(), n);
                let mut chosen: Vec<_> = picked.iter().map(|i| keys[i].clone()).collect();
                chosen.sort_by_key(|(k, _)| k.digest.to_string());
                keys = chosen;
            }
        }
        let mut report = ScrubReport::default();
        let mut pacer = Pacer::new(opts.rate);
        for (key, indexed) in keys {
            let outcome = self.check(&key, indexed, &mut pacer, &mut report.bytes);
            match outcome {
                Ok(None) => report.checked += 1,
                Ok(Some(reason)) => {
                    report.checked += 1;
                    let pinned = self.index.is_pinned(&key);
                    tracing::error!(
                        kind = key.kind.as_str(), digest = %key.digest, %reason, pinned,
                        "stored object is corrupt; removed (it will be fetched again)"
                    );
                    self.drop_corrupt(&key);
                    stats.by_scrub.fetch_add(1, Ordering::Relaxed);
                    report.corrupt.push(Finding {
                        kind: kind_label(key.kind),
                        digest: key.digest.to_string(),
                        reason,
                        pinned,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Evicted while the scrub ran, or deleted behind berth's back.
                    if self.index.contains(&key) {
                        self.index.remove(&key);
                        report.missing += 1;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        stats
            .scrubbed_objects
            .fetch_add(report.checked, Ordering::Relaxed);
        stats
            .scrubbed_bytes
            .fetch_add(report.bytes, Ordering::Relaxed);
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            checked = report.checked,
            bytes = report.bytes,
            corrupt = report.corrupt.len(),
            missing = report.missing,
            seconds = report.seconds,
            "scrub finished"
        );
        Ok(report)
    }

    /// `None` when the object matches its digest and recorded size, else what is wrong.
    fn check(
        &self,
        key: &Key,
        indexed: u64,
        pacer: &mut Pacer,
        bytes: &mut u64,
    ) -> io::Result<Option<String>> {
        let mut file = std::fs::File::open(self.store.path(key))?;
        let len = file.metadata()?.len();
        if len != indexed {
            return Ok(Some(format!(
                "size {len} differs from the {indexed} bytes recorded"
            )));
        }
        let mut hasher = Hasher::new(key.digest.algorithm());
        let mut buf = vec![0u8; CHUNK];
        // A stored manifest starts with its media type and a newline; the digest covers the
        // rest.
        let mut header = key.kind == ObjectKind::Manifest;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            *bytes += n as u64;
            let mut chunk = &buf[..n];
            if header {
                match chunk.iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        chunk = &chunk[nl + 1..];
                        header = false;
                    }
                    None => continue,
                }
            }
            hasher.update(chunk);
            pacer.account(n as u64);
        }
        if header {
            return Ok(Some("manifest file without its media-type line".into()));
        }
        let got = hasher.finish();
        Ok((got != key.digest).then(|| format!("content hashes to {got}")))
    }

    /// Forgets a corrupt object and deletes its file.
    pub(crate) fn drop_corrupt(&self, key: &Key) {
        self.index.remove(key);
        self.store.delete(key);
    }

    /// Counters of corruption found at rest and of scrubbing.
    pub fn corruption(&self) -> &CorruptionStats {
        &self.corruption
    }
}

fn kind_label(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Blob => "blob",
        ObjectKind::Manifest => "manifest",
    }
}

/// Keeps reading at or under a byte rate by sleeping (the scrub runs on its own thread).
struct Pacer {
    rate: Option<u64>,
    started: Instant,
    done: u64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Pacer {
        Pacer {
            rate: rate.filter(|r| *r > 0),
            started: Instant::now(),
            done: 0,
        }
    }

    fn account(&mut self, n: u64) {
        let Some(rate) = self.rate else { return };
        self.done += n;
        let due = Duration::from_secs_f64(self.done as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}
