//! A forwarding proxy that holds large blob bodies in the middle until the test releases them,
//! so that something (a replica being killed) can happen while a blob is half transferred.
//!
//! Put it between the origin and whatever counts or fetches: `Pace::start(registry.addr(),
//! 1 << 20)`. Every blob GET whose body is longer than the threshold passes that many bytes,
//! then waits for [`Pace::release`]; [`Pace::wait_held`] tells when bodies are waiting (a
//! readiness check, not a timer). After a release nothing is held any more.

use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The pacing proxy; stops (with its connections) when dropped.
pub struct Pace {
    addr: SocketAddr,
    released: watch::Sender<bool>,
    held: watch::Sender<usize>,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    upstream: SocketAddr,
    client: Client<HttpConnector, Incoming>,
    hold_after: u64,
    released: watch::Receiver<bool>,
    held: watch::Sender<usize>,
}

impl Pace {
    /// Forwards from a fresh 127.0.0.1 port to `upstream`, holding blob bodies after
    /// `hold_after` bytes.
    pub async fn start(upstream: SocketAddr, hold_after: u64) -> Pace {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind pace listener");
        let addr = listener.local_addr().expect("pace addr");
        let (released, released_rx) = watch::channel(false);
        let held = watch::channel(0).0;
        let shared = Shared {
            upstream,
            client: Client::builder(TokioExecutor::new()).build_http(),
            hold_after,
            released: released_rx,
            held: held.clone(),
        };
        let task = tokio::spawn(super::accept_each(listener, move |stream| {
            let shared = shared.clone();
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { forward(shared, req).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }));
        Pace {
            addr,
            released,
            held,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until at least `n` bodies have been held (counting those already released).
    pub async fn wait_held(&self, n: usize) {
        let mut rx = self.held.subscribe();
        rx.wait_for(|h| *h >= n).await.expect("pace running");
    }

    /// Lets every held body go on, and holds nothing from now on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
}

impl Drop for Pace {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Paced = BoxBody<Bytes, hyper::Error>;

/// An origin that cannot be reached: the connection ends unanswered, as it would without the
/// pacer in between.
#[derive(Debug)]
struct Failure(String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

async fn forward(shared: Shared, req: Request<Incoming>) -> Result<Response<Paced>, Failure> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let holds = parts.method == Method::GET && pq.contains("/blobs/");
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(shared.upstream.to_string())
        .path_and_query(pq)
        .build()
        .expect("upstream URI");
    let resp = shared
        .client
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|e| Failure(format!("pace: origin: {e}")))?;
    if !holds {
        return Ok(resp.map(|b| b.boxed()));
    }
    let (parts, body) = resp.into_parts();
    let state = Body {
        body,
        sent: 0,
        pending: None,
        shared,
    };
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let mut s = state?;
        let mut data = match s.pending.take() {
            Some(d) => d,
            None => loop {
                match s.body.frame().await? {
                    Err(e) => return Some((Err(e), None)),
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            break d;
                        }
                    }
                }
            },
        };
        let mut released = s.shared.released.clone();
        let hold_after = s.shared.hold_after;
        if !*released.borrow() && s.sent + data.len() as u64 > hold_after {
            if s.sent < hold_after {
                // Up to the threshold now; the rest of this chunk after the hold.
                let first = data.split_to((hold_after - s.sent) as usize);
                s.sent = hold_after;
                s.pending = Some(data);
                return Some((Ok(Frame::data(first)), Some(s)));
            }
            s.shared.held.send_modify(|h| *h += 1);
            let _ = released.wait_for(|r| *r).await;
        }
        s.sent += data.len() as u64;
        Some((Ok(Frame::data(data)), Some(s)))
    });
    Ok(Response::from_parts(parts, StreamBody::new(stream).boxed()))
}

/// A blob body on its way through.
struct Body {
    body: Incoming,
    sent: u64,
    /// The part of a chunk held back at the threshold.
    pending: Option<Bytes>,
    shared: Shared,
}
