//! The accept loop of one listener, with a cap on connections held at once.
//!
//! At the cap a new connection makes room by shedding the connection that has been idle (no
//! request in flight) the longest, so a flood of silent connections cannot lock out real
//! clients; when every connection is busy the listener pauses, and the kernel queues newcomers.
//! When accept itself fails for lack of resources (`EMFILE`, `ENFILE`, `ENOBUFS`) the listener
//! sheds an idle connection and backs off rather than spinning. Pauses and failures are logged
//! at most once per [`LOG_INTERVAL`] and counted in metrics.
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::conn::{self, Activity, Setup};
use crate::body::Body;
use crate::metrics::Metrics;

/// Least time between two log lines about the same listener trouble.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Connections shed at once when the cap is reached: a burst of new connections then finds
/// slots without a round trip to a closing connection each, and the kernel's accept queue does
/// not overflow (clients whose SYN is dropped wait a second or more to retry).
const SHED_BATCH: usize = 8;

/// How long to wait for a shed connection to free its slot before shedding another.
const SHED_WAIT: Duration = Duration::from_millis(100);

/// How often a listener paused with every connection busy looks again for one gone idle.
const PAUSE_RECHECK: Duration = Duration::from_secs(1);

/// Backoff after a failed accept: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Which listener, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    /// Registry clients.
    Client,
    /// `/metrics`, `/healthz`, `/readyz`.
    Admin,
    /// Other replicas of the cluster (the peer endpoint).
    Peer,
}

impl ListenerKind {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Client => "client",
            ListenerKind::Admin => "admin",
            ListenerKind::Peer => "peer",
        }
    }
}

/// One bound listener and how to serve its connections.
pub(crate) struct Listener<H> {
    /// Which one.
    pub kind: ListenerKind,
    /// The bound socket.
    pub socket: TcpListener,
    /// Shared by its connections.
    pub setup: Arc<Setup<H>>,
    /// Most connections held at once.
    pub cap: usize,
}

/// Accepts until `shutdown`, then lets connections finish for at most `grace` and drops the
/// rest. `ready` is cleared as soon as accepting stops.
pub(crate) async fn run<H, F>(
    l: Listener<H>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    ready: Option<Arc<AtomicBool>>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let kind = l.kind.as_str();
    let permits = Arc::new(Semaphore::new(l.cap));
    let open = Arc::new(Open::default());
    let gauge = metrics.connections_open.with_label_values(&[kind]);
    let mut tasks = JoinSet::new();
    let mut backoff = BACKOFF.0;
    let mut error_log = Throttle::default();
    let mut room = Room {
        kind: l.kind,
        cap: l.cap,
        metrics: metrics.clone(),
        shed_log: Throttle::default(),
        pause_log: Throttle::default(),
    };
    loop {
        let accepted = tokio::select! {
            r = l.socket.accept() => r,
            Some(_) = tasks.join_next() => continue,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = BACKOFF.0;
                x
            }
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                metrics
                    .connections
                    .with_label_values(&[kind, "refused"])
                    .inc();
                metrics
                    .listener_pauses
                    .with_label_values(&[kind, "accept_error"])
                    .inc();
                let shed = open.shed_oldest(1);
                if let Some(suppressed) = error_log.ready() {
                    tracing::warn!(
                        listener = kind, error = %e, open = gauge.get(), shed,
                        pause_ms = backoff.as_millis() as u64, suppressed,
                        "accept failed; pausing the listener"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
                backoff = (backoff * 2).min(BACKOFF.1);
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match room.make(&permits, &open, &mut shutdown).await {
                Some(p) => p,
                None => break,
            },
        };
        metrics
            .connections
            .with_label_values(&[kind, "accepted"])
            .inc();
        let activity = Activity::new();
        let slot = Slot::new(open.clone(), activity.clone(), permit, gauge.clone());
        let setup = l.setup.clone();
        let rx = shutdown.clone();
        let closed = metrics.connections_closed.clone();
        tasks.spawn(async move {
            let _slot = slot;
            if let Some(reason) = conn::serve(stream, peer, &setup, &activity, rx).await {
                closed.with_label_values(&[kind, reason.as_str()]).inc();
                tracing::debug!(%peer, listener = kind, reason = reason.as_str(), "closed connection");
            }
        });
    }
    if let Some(r) = ready {
        r.store(false, Ordering::SeqCst);
    }
    drop(l.socket);
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            listener = kind,
            "shutdown grace period over; dropping remaining connections"
        );
        tasks.abort_all();
    }
}

/// Whether a failed accept concerns only that connection (the client gave up), rather than the
/// process running out of something.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

// === impl Room ===

/// Finds a slot for a connection accepted at the cap.
struct Room {
    kind: ListenerKind,
    cap: usize,
    metrics: Arc<Metrics>,
    shed_log: Throttle,
    pause_log: Throttle,
}

impl Room {
    /// Sheds idle connections until a slot frees; pauses while every connection is busy.
    /// `None` when berth shuts down meanwhile.
    async fn make(
        &mut self,
        permits: &Arc<Semaphore>,
        open: &Open,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<OwnedSemaphorePermit> {
        let kind = self.kind.as_str();
        let mut paused = false;
        loop {
            let shed = open.shed_oldest(SHED_BATCH);
            let wait = if shed > 0 {
                if let Some(suppressed) = self.shed_log.ready() {
                    tracing::warn!(
                        listener = kind,
                        max_connections = self.cap,
                        suppressed,
                        "at max_connections: closing the longest-idle connections to make room"
                    );
                }
                SHED_WAIT
            } else {
                if !paused {
                    paused = true;
                    self.metrics
                        .listener_pauses
                        .with_label_values(&[kind, "at_capacity"])
                        .inc();
                    if let Some(suppressed) = self.pause_log.ready() {
                        tracing::warn!(
                            listener = kind,
                            max_connections = self.cap,
                            suppressed,
                            "at max_connections with every connection busy: pausing accepts"
                        );
                    }
                }
                PAUSE_RECHECK
            };
            tokio::select! {
                p = permits.clone().acquire_owned() => return p.ok(),
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|stop| *stop) => return None,
            }
        }
    }
}

// === impl Open ===

/// The connections a listener holds, to pick one to shed.
#[derive(Default)]
struct Open {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Open {
    fn insert(&self, a: Arc<Activity>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().expect("open set").insert(id, a);
        id
    }

    fn remove(&self, id: u64) {
        self.conns.lock().expect("open set").remove(&id);
    }

    /// Asks up to `n` of the connections idle the longest to close; returns how many were
    /// asked (zero when none is idle).
    fn shed_oldest(&self, n: usize) -> usize {
        let conns = self.conns.lock().expect("open set");
        let mut idle: Vec<_> = conns
            .values()
            .filter(|a| !a.is_shedding())
            .filter_map(|a| a.idle_since().map(|since| (since, a)))
            .collect();
        if idle.len() > n {
            idle.select_nth_unstable_by_key(n, |(since, _)| *since);
            idle.truncate(n);
        }
        idle.into_iter().filter(|(_, a)| a.shed()).count()
    }
}

/// A connection's place in its listener: frees the slot and leaves the open set when dropped.
struct Slot {
    id: u64,
    open: Arc<Open>,
    gauge: IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(
        open: Arc<Open>,
        a: Arc<Activity>,
        permit: OwnedSemaphorePermit,
        gauge: IntGauge,
    ) -> Self {
        let id = open.insert(a);
        gauge.inc();
        Slot {
            id,
            open,
            gauge,
            _permit: permit,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.remove(self.id);
        self.gauge.dec();
    }
}

/// Lets a log line through at most once per [`LOG_INTERVAL`], counting the ones held back.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(held back since the last line)` when a line may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}
