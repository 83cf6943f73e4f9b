//! One connection from accept to close, with a deadline at every stage so that a client that
//! connects and says nothing, or too little, cannot hold a file descriptor for ever:
//!
//! 1. handshake: the first byte (plain) or a completed TLS handshake within `handshake_timeout`
//!    (hyper's own HTTP/1 header timeout only starts once it reads, and the HTTP/1-or-2 sniffing
//!    of `auto` has none);
//! 2. the first request head within `header_timeout` of the handshake, HTTP/2's preface
//!    included;
//! 3. then, whenever no request is in flight, `idle_timeout` (hyper has no idle timeout for
//!    HTTP/2, and HTTP/1 keep-alive waits are also bounded by `header_timeout` in hyper).
//!
//! Requests in flight are counted by the service: from the call until the response body is
//! dropped. A connection with none in flight can also be shed by its listener to make room
//! ([`Activity::shed`]).
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::body::Body;
use crate::config::ConnectionLimits;

/// How long an idle connection closed gracefully (HTTP/2 GOAWAY) may take to go before it is
/// dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Why berth closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// No first byte, or no completed TLS handshake, in time.
    HandshakeTimeout,
    /// No complete first request head in time.
    HeaderTimeout,
    /// No request in flight for `idle_timeout`.
    IdleTimeout,
    /// Closed while idle to make room for a new connection at the cap.
    Shed,
}

impl CloseReason {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shed => "shed",
        }
    }
}

/// What every connection of one listener shares: how to answer, TLS, the limits.
pub(crate) struct Setup<H> {
    /// Answers one request.
    pub handler: H,
    /// TLS acceptor; plain HTTP when absent.
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Timeouts and keep-alive.
    pub limits: ConnectionLimits,
    builder: auto::Builder<TokioExecutor>,
}

impl<H> Setup<H> {
    /// HTTP/1.1 and HTTP/2 with hyper's timers set from `limits`.
    pub fn new(
        handler: H,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        limits: ConnectionLimits,
    ) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(limits.http2_keepalive_interval))
            .keep_alive_timeout(limits.http2_keepalive_timeout);
        Setup {
            handler,
            acceptor,
            limits,
            builder,
        }
    }
}

// === impl Activity ===

/// Whether a connection has requests in flight, and since when it has had none.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the moment the connection last became idle.
    idle_since: AtomicU64,
    /// Whether a request was ever seen (then idleness counts against `idle_timeout`, before
    /// against `header_timeout`).
    served: AtomicBool,
    shedding: AtomicBool,
    shed: Notify,
    /// Woken when the first request starts, so the connection recomputes its deadline.
    changed: Notify,
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            served: AtomicBool::new(false),
            shedding: AtomicBool::new(false),
            shed: Notify::new(),
            changed: Notify::new(),
        })
    }

    fn mark_idle_now(&self) {
        let ms = self.opened.elapsed().as_millis();
        self.idle_since
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        // Only the first request can bring the deadline forward (`idle_timeout` may be shorter
        // than `header_timeout`); later ones only push it back, which the connection finds out
        // when its timer fires. Waking it per request cost a task poll and a timer each.
        if !self.served.swap(true, Ordering::SeqCst) {
            self.changed.notify_one();
        }
        InFlight(self.clone())
    }

    /// Since when the connection has had no request in flight; `None` while it has one.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let ms = self.idle_since.load(Ordering::SeqCst);
        Some(self.opened + Duration::from_millis(ms))
    }

    /// Whether the listener already asked this connection to go.
    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::SeqCst)
    }

    /// Asks an idle connection to close now, to make room; false when it is busy or already
    /// asked.
    pub fn shed(&self) -> bool {
        if self.idle_since().is_none() || self.shedding.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.shed.notify_one();
        true
    }

    /// When the connection times out if nothing happens, and why; `None` while a request is in
    /// flight.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, CloseReason)> {
        let since = self.idle_since()?;
        Some(if self.served.load(Ordering::SeqCst) {
            (since + limits.idle_timeout, CloseReason::IdleTimeout)
        } else {
            (since + limits.header_timeout, CloseReason::HeaderTimeout)
        })
    }
}

/// One request in flight, until its response body is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        // The idle time is written before the count drops, so whoever sees zero sees it. The
        // connection is not woken: its deadline only moved later.
        self.0.mark_idle_now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Keeps `guard` alive as long as the body, which hyper drops when it is sent or abandoned.
fn hold(body: Body, guard: InFlight) -> Body {
    body.map_frame(move |frame| {
        let _held = &guard;
        frame
    })
    .boxed_unsync()
}

// === connection driving ===

/// Serves one accepted connection until it ends; returns the reason when berth closed it.
pub(crate) async fn serve<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    setup: &Setup<H>,
    activity: &Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<CloseReason>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let limit = setup.limits.handshake_timeout;
    match &setup.acceptor {
        None => {
            let mut byte = [0u8; 1];
            let first = handshake(limit, activity, &mut shutdown, stream.peek(&mut byte)).await;
            match first {
                Ok(Ok(n)) if n > 0 => {
                    drive(TokioIo::new(stream), peer, setup, activity, shutdown).await
                }
                Ok(_) => None,
                Err(reason) => reason,
            }
        }
        Some(acceptor) => {
            let accepted = handshake(limit, activity, &mut shutdown, acceptor.accept(stream)).await;
            match accepted {
                Ok(Ok(tls)) => drive(TokioIo::new(tls), peer, setup, activity, shutdown).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(reason) => reason,
            }
        }
    }
}

/// Runs `fut` unless the handshake time runs out, the listener sheds the connection or berth
/// shuts down (`Err(None)`).
async fn handshake<T>(
    limit: Duration,
    activity: &Activity,
    shutdown: &mut watch::Receiver<bool>,
    fut: impl Future<Output = T>,
) -> Result<T, Option<CloseReason>> {
    tokio::select! {
        r = fut => Ok(r),
        _ = tokio::time::sleep(limit) => Err(Some(CloseReason::HandshakeTimeout)),
        _ = activity.shed.notified() => Err(Some(CloseReason::Shed)),
        _ = shutdown.wait_for(|stop| *stop) => Err(None),
    }
}

/// HTTP on an established connection, closing it when it stays idle past its deadline, is shed,
/// or (gracefully) when berth shuts down.
async fn drive<I, H, F>(
    io: TokioIo<I>,
    peer: SocketAddr,
    setup: &Setup<H>,
    activity: &Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<CloseReason>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    activity.mark_idle_now();
    let handler = setup.handler.clone();
    let counted = activity.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let guard = counted.begin();
        // A combinator rather than an async block, which would hold the handler's future
        // twice (captured and awaited) and so double what hyper copies on every request.
        handler(req).map(move |r| Ok::<_, Infallible>(r.map(|b| hold(b, guard))))
    });
    let conn = setup.builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut stopping = *shutdown.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    // One timer for the connection's life, reset only when it fires or the first request
    // comes: it may fire early (requests since pushed the deadline back), never late.
    let next_wake = || {
        activity
            .deadline(&setup.limits)
            .map_or_else(|| Instant::now() + setup.limits.idle_timeout, |(at, _)| at)
    };
    let timer = tokio::time::sleep_until(next_wake());
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                let Err(e) = r else { return None };
                // hyper's own HTTP/1 header timeout (the same header_timeout) may fire first.
                if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout) {
                    return Some(CloseReason::HeaderTimeout);
                }
                tracing::debug!(%peer, error = %e, "connection ended with an error");
                return None;
            }
            _ = shutdown.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.changed.notified() => timer.as_mut().reset(next_wake()),
            _ = activity.shed.notified() => {
                if activity.idle_since().is_some() {
                    return Some(CloseReason::Shed);
                }
                activity.shedding.store(false, Ordering::SeqCst);
            }
            _ = timer.as_mut() => {
                let due = activity
                    .deadline(&setup.limits)
                    .filter(|(at, _)| Instant::now() >= *at);
                let Some((_, reason)) = due else {
                    timer.as_mut().reset(next_wake());
                    continue;
                };
                if reason == CloseReason::IdleTimeout {
                    // Tell an HTTP/2 client (GOAWAY) rather than just vanish; bounded.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_LINGER, conn.as_mut()).await;
                }
                return Some(reason);
            }
        }
    }
}
