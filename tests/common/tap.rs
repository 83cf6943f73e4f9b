//! A counting HTTP forwarding proxy placed between berth and its origin.
//!
//! Every request is recorded as `(method, path_and_query)` and forwarded unchanged to the
//! upstream; bodies stream in both directions and are never buffered. Tests assert what
//! reached the origin (one fill per blob, no refetch on a hit) and can make the origin
//! unreachable with [`Tap::set_down`], or hold requests (recorded, not yet forwarded) with
//! [`Tap::hold`] until [`Tap::release`], so that a test can make requests truly concurrent.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Response, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Headers that describe one connection, not the message; never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// The recorded requests, in arrival order.
type Log = Arc<Mutex<Vec<(Method, String)>>>;
/// The origin's answers, as `(method, path_and_query, status)`, in the order they came back.
type Answers = Arc<Mutex<Vec<(Method, String, u16)>>>;

/// A running counting proxy on 127.0.0.1; stops (with its connections) when dropped.
pub struct Tap {
    addr: SocketAddr,
    log: Log,
    answers: Answers,
    down: Arc<AtomicBool>,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

/// What each connection needs to forward a request.
#[derive(Clone)]
struct Shared {
    upstream: SocketAddr,
    client: Client<HttpConnector, Incoming>,
    log: Log,
    answers: Answers,
    down: Arc<AtomicBool>,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A service error makes hyper close the connection without an answer, which the client sees
/// as an unreachable origin.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

// === impl Tap ===

impl Tap {
    /// Starts forwarding from a fresh 127.0.0.1 port to `upstream` (plain HTTP).
    pub async fn start(upstream: SocketAddr) -> Tap {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind tap listener");
        let addr = listener.local_addr().expect("tap local addr");
        let log = Log::default();
        let down = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(tokio::sync::watch::channel(false).0);
        let answers = Answers::default();
        let shared = Shared {
            upstream,
            client: Client::builder(TokioExecutor::new()).build_http(),
            log: log.clone(),
            answers: answers.clone(),
            down: down.clone(),
            hold: hold.clone(),
        };
        let task = tokio::spawn(accept_loop(listener, shared));
        Tap {
            addr,
            log,
            answers,
            down,
            hold,
            task,
        }
    }

    /// The tap's listening address (give this to berth as the origin).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:5123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request forwarded so far, as `(method, path_and_query)`.
    pub fn requests(&self) -> Vec<(Method, String)> {
        self.log.lock().unwrap().clone()
    }

    /// How many forwarded requests match `filter(method, path_and_query)`.
    pub fn count(&self, filter: impl Fn(&Method, &str) -> bool) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(method, path)| filter(method, path))
            .count()
    }

    /// How many of the origin's answers (response heads passed back) match
    /// `filter(method, path_and_query, status)`.
    pub fn answered(&self, filter: impl Fn(&Method, &str, u16) -> bool) -> usize {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|(method, path, status)| filter(method, path, *status))
            .count()
    }

    /// Forgets the recorded requests and answers, e.g. after a warm-up pull.
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
        self.answers.lock().unwrap().clear();
    }

    /// While down, new connections are closed at once and requests on open connections are
    /// dropped unanswered; nothing is forwarded or recorded.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// From now on, requests are recorded on arrival but not forwarded until [`Tap::release`].
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    /// Forwards the held requests and stops holding.
    pub fn release(&self) {
        self.hold.send_replace(false);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Shared) {
    super::accept_each(listener, move |stream| {
        let shared = shared.clone();
        async move {
            // A tap that is down refuses: the connection is dropped unanswered.
            if shared.down.load(Ordering::SeqCst) {
                return;
            }
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { forward(shared, request).await }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

/// Forwards one request to the upstream and hands back its response, both bodies streaming.
///
/// Requests are recorded on arrival, before the origin is contacted.
async fn forward(
    shared: Shared,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, Unreachable> {
    if shared.down.load(Ordering::SeqCst) {
        return Err(Unreachable("tap is down".to_owned()));
    }
    let (mut parts, body) = request.into_parts();
    let method = parts.method.clone();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    shared
        .log
        .lock()
        .unwrap()
        .push((parts.method.clone(), path_and_query.clone()));
    // Held requests wait here, already counted; a dropped tap ends the wait too.
    let mut hold = shared.hold.subscribe();
    let _ = hold.wait_for(|held| !*held).await;

    // HTTP/2 clients send the authority in the URI, not a Host header; keep it for the origin.
    if !parts.headers.contains_key(HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, host);
            }
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(shared.upstream.to_string())
        .path_and_query(path_and_query.clone())
        .build()
        .expect("upstream URI");
    // The origin connection is HTTP/1.1 whatever the client spoke to the tap.
    parts.version = Version::HTTP_11;

    // An unreachable origin (e.g. a stopped Registry) drops the client's connection too, so
    // berth sees what it would see without the tap in between.
    let mut response = shared
        .client
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|e| Unreachable(format!("origin: {e}")))?;
    strip_hop_by_hop(response.headers_mut());
    shared
        .answers
        .lock()
        .unwrap()
        .push((method, path_and_query, response.status().as_u16()));
    Ok(response)
}

fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(HeaderName::from_static(name));
    }
}
