//! The cap on concurrent origin fills (`cache.max_concurrent_fills`): a burst of cold pulls
//! must not open hundreds of origin transfers at once, each holding a disk reservation and a
//! temp file. A fill past the cap waits for a slot, at most `cache.fill_queue_timeout`; while it
//! waits it is already the one fill of its digest, so every request for that digest joins it
//! rather than queueing a second one.
//!
//! Readers that continue a fill from the origin after storage failed (pass-through) are not
//! counted: they serve a client that is already being answered.
//!
//! Architecture: docs/ARCHITECTURE.md, "Cache".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many fills may fetch at once and how long one may wait for its turn.
#[derive(Debug, Clone, Copy)]
pub struct FillLimits {
    /// Fills fetching from origins at once (at least 1).
    pub max_concurrent: usize,
    /// Longest a fill waits for a slot before it fails (its clients get 429).
    pub queue_timeout: Duration,
}

/// What the metrics layer learns from the fills as it happens (the cache knows nothing of
/// Prometheus). Installed once with [`super::Fills::set_observer`].
pub trait FillObserver: Send + Sync + 'static {
    /// The number of fills waiting for a slot changed to `queued`.
    fn fills_queued(&self, queued: usize);
    /// A fill got its slot after waiting `waited` (zero when a slot was free).
    fn fill_queue_wait(&self, waited: Duration);
    /// A partial (Range) response began carrying bytes that had not been verified against the
    /// blob's digest (read from a fill still running, or passed through from the origin).
    fn unverified_range_response(&self);
}

/// The slots, the waiting count and the observer.
pub(super) struct FillQueue {
    slots: Arc<Semaphore>,
    timeout: Duration,
    queued: AtomicUsize,
    observer: Arc<OnceLock<Arc<dyn FillObserver>>>,
}

/// Why a fill did not get a slot.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueTimeout {
    /// How long it waited.
    pub waited: Duration,
}

// === impl FillQueue ===

impl FillQueue {
    pub(super) fn new(limits: FillLimits, observer: Arc<OnceLock<Arc<dyn FillObserver>>>) -> Self {
        FillQueue {
            slots: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            timeout: limits.queue_timeout,
            queued: AtomicUsize::new(0),
            observer,
        }
    }

    /// Fills waiting for a slot now.
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Waits for a slot (bounded); the fill fetches while it holds the permit.
    pub(super) async fn acquire(&self) -> Result<OwnedSemaphorePermit, QueueTimeout> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            self.observe(|o| o.fill_queue_wait(Duration::ZERO));
            return Ok(permit);
        }
        let started = Instant::now();
        let waiting = Waiting::enter(self);
        let got = tokio::time::timeout(self.timeout, self.slots.clone().acquire_owned()).await;
        drop(waiting);
        let waited = started.elapsed();
        match got {
            Ok(Ok(permit)) => {
                self.observe(|o| o.fill_queue_wait(waited));
                Ok(permit)
            }
            // The semaphore is never closed; a timeout is the only way to fail.
            Ok(Err(_)) | Err(_) => Err(QueueTimeout { waited }),
        }
    }

    fn observe(&self, f: impl FnOnce(&dyn FillObserver)) {
        if let Some(o) = self.observer.get() {
            f(o.as_ref());
        }
    }
}

/// One fill counted as waiting until dropped (also when its task is cancelled).
struct Waiting<'a>(&'a FillQueue);

impl<'a> Waiting<'a> {
    fn enter(q: &'a FillQueue) -> Self {
        let n = q.queued.fetch_add(1, Ordering::Relaxed) + 1;
        q.observe(|o| o.fills_queued(n));
        Waiting(q)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let n = self.0.queued.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.observe(|o| o.fills_queued(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen {
        queued: Mutex<Vec<usize>>,
        waits: Mutex<Vec<Duration>>,
    }

    impl FillObserver for Seen {
        fn fills_queued(&self, queued: usize) {
            self.queued.lock().unwrap().push(queued);
        }
        fn fill_queue_wait(&self, waited: Duration) {
            self.waits.lock().unwrap().push(waited);
        }
        fn unverified_range_response(&self) {}
    }

    fn queue(max: usize, timeout: Duration) -> (FillQueue, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let cell: Arc<OnceLock<Arc<dyn FillObserver>>> = Arc::new(OnceLock::new());
        let _ = cell.set(seen.clone());
        let limits = FillLimits {
            max_concurrent: max,
            queue_timeout: timeout,
        };
        (FillQueue::new(limits, cell), seen)
    }

    #[tokio::test]
    async fn a_fill_past_the_cap_waits_for_a_slot() {
        let (q, seen) = queue(1, Duration::from_secs(30));
        let first = q.acquire().await.expect("a free slot");
        let q = Arc::new(q);
        let second = tokio::spawn({
            let q = q.clone();
            async move { q.acquire().await.map(drop).is_ok() }
        });
        // Counted as waiting while the first holds the only slot.
        while q.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!second.is_finished());
        drop(first);
        assert!(second.await.unwrap(), "the waiting fill got the freed slot");
        assert_eq!(q.queued(), 0);
        assert_eq!(*seen.queued.lock().unwrap(), vec![1, 0]);
        assert_eq!(
            seen.waits.lock().unwrap().len(),
            2,
            "every fill's wait observed"
        );
    }

    #[tokio::test]
    async fn the_wait_is_bounded() {
        let (q, _seen) = queue(1, Duration::from_millis(50));
        let _held = q.acquire().await.expect("a free slot");
        let err = q.acquire().await.expect_err("no slot within the timeout");
        assert!(err.waited >= Duration::from_millis(50), "{err:?}");
        assert_eq!(q.queued(), 0, "a timed-out fill is no longer counted");
    }
}
