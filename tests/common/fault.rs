//! A controllable fake OCI registry for the faults a real registry cannot produce on demand:
//! corrupt, truncated, stalled, dripped or held bodies, connection resets, error statuses,
//! redirects to another host and a Bearer token challenge.
//!
//! ```text
//! let fault = FaultUpstream::start().await;
//! let digest = fault.add_blob(bytes);
//! fault.set_blob_fault(&digest, Fault::Hold(1 << 20));
//! let berth = Berth::in_front_of(&fault.url()).start().await;
//! ...
//! fault.release();
//! ```
//!
//! Caching headers are scripted too: [`FaultUpstream::set_headers`] adds headers (such as
//! `Cache-Control`, `ETag`, `Last-Modified`) to the answers for matching paths, and a request
//! whose `If-None-Match` names the `ETag` it would get, or whose `If-Modified-Since` equals the
//! `Last-Modified` it would get, is answered `304 Not Modified` with no body.
//! [`FaultUpstream::send_etags`] gives every object answer `ETag: "<digest>"`. It serves
//! `/v2/<name>/tags/list` from the tags it was given.
//!
//! It has two listeners on 127.0.0.1: the origin (`/v2/...` and `/token`) and a second one on
//! another port that stands for a storage host; [`Fault::Redirect`] sends a `307` there. Every
//! request on either listener is recorded, with whether it carried `Authorization`. `Range` is
//! ignored (answers are always whole, as some origins do). Faults that cut or hold a body wait
//! until the bytes before the cut have left the socket, so what a client receives does not
//! depend on timing.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::content::sha256_digest;

/// `Retry-After` sent with every `429` and `503` of [`Fault::Status`].
pub const RETRY_AFTER_SECS: &str = "7";

/// Largest data frame the fake sends (unless [`Fault::Slow`] asks for smaller ones).
const FRAME: usize = 64 * 1024;

/// How the fake answers a request; set per object or for everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Fault {
    /// Serve the object as it is.
    #[default]
    None,
    /// Same length and headers, one byte (in the middle) flipped.
    Corrupt,
    /// Declare the full `Content-Length`, send this many bytes, then close the connection.
    Truncate(usize),
    /// Close the connection without answering.
    Reset,
    /// Answer with this status and an OCI JSON error body; `429` and `503` carry
    /// `Retry-After: 7` ([`RETRY_AFTER_SECS`]).
    Status(u16),
    /// Wait this long before sending the response head, then serve normally.
    Stall(Duration),
    /// Send `after` bytes, pause for `pause`, then send the rest.
    StallBody {
        /// Bytes sent before the pause.
        after: usize,
        /// How long the body stalls.
        pause: Duration,
    },
    /// Drip the body in `chunk`-byte frames with `delay` between them.
    Slow {
        /// Frame size.
        chunk: usize,
        /// Pause between frames.
        delay: Duration,
    },
    /// `307` to the second listener (another host:port), which serves the object.
    Redirect,
    /// Send this many bytes, then wait until [`FaultUpstream::release`] is called.
    Hold(usize),
    /// [`Fault::Corrupt`] and [`Fault::Hold`] at once: the middle byte flipped, and the body
    /// stops after this many bytes until [`FaultUpstream::release`] (a fill of bad bytes that
    /// is still running).
    CorruptHold(usize),
    /// Right bytes, but a `Docker-Content-Digest` that is not theirs.
    WrongDigestHeader,
    /// Serve these bytes instead of the object, with honest `Content-Length` and
    /// `Docker-Content-Digest` for them: an origin handing out the wrong content.
    Replace(Bytes),
}

/// Which of the fake's two listeners took a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The registry itself ([`FaultUpstream::url`]).
    Origin,
    /// The redirect target ([`FaultUpstream::redirect_url`]), another host:port.
    Redirect,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The listener it arrived on.
    pub listener: Listener,
    /// GET, HEAD, ...
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Whether it carried an `Authorization` header.
    pub authorization: bool,
    /// Its `If-None-Match`, if any.
    pub if_none_match: Option<String>,
    /// Its `If-Modified-Since`, if any.
    pub if_modified_since: Option<String>,
    /// The status the fake answered with (`None`: the connection was reset or it is pending).
    pub status: Option<u16>,
}

/// What a fault is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    /// `/v2/<any name>/blobs/<digest>`.
    Blob(String),
    /// `/v2/<name>/blobs/<digest>` in one repository only (checked before [`Target::Blob`]).
    RepoBlob(String, String),
    /// `/v2/<name>/manifests/<reference>`, reference exactly as in the path.
    Manifest(String, String),
}

/// The objects served and the switches that change how.
#[derive(Default)]
struct Content {
    /// Digest to bytes.
    blobs: HashMap<String, Bytes>,
    /// Digest to (media type, bytes).
    manifests: HashMap<String, (String, Bytes)>,
    /// (repository, tag) to manifest digest.
    tags: HashMap<(String, String), String>,
    /// Subject digest to the descriptors of its referrers (OCI 1.1 referrers API).
    referrers: HashMap<String, Vec<serde_json::Value>>,
    /// Faults of single objects; they win over `global`.
    faults: HashMap<Target, Fault>,
    /// Fault for every other `/v2/` request on the origin listener.
    global: Fault,
    /// Token the origin requires, if any.
    bearer: Option<String>,
    /// `ratelimit-remaining` sent with every answer (Docker Hub's header), if any.
    ratelimit: Option<i64>,
    /// Headers added to the answers whose path (with query) contains the needle.
    headers: Vec<(String, Vec<(String, String)>)>,
    /// Whether object answers carry `ETag: "<digest>"`.
    etags: bool,
}

/// State shared by the handle and every connection.
struct State {
    content: Mutex<Content>,
    log: Mutex<Vec<Recorded>>,
    /// Opens every [`Fault::Hold`] gate, now and later.
    released: watch::Sender<bool>,
    /// How many responses have reached a [`Fault::Hold`] gate so far.
    held: watch::Sender<usize>,
    origin: SocketAddr,
    redirect: SocketAddr,
}

/// A running fake registry on two 127.0.0.1 ports; stops (with its connections) when dropped.
pub struct FaultUpstream {
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

/// The response body type: frames from a scripted stream.
type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A service error makes hyper close the connection without an answer ([`Fault::Reset`]).
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault: connection reset")
    }
}

impl std::error::Error for Reset {}

/// One step of a scripted body.
enum Step {
    Data(Bytes),
    Sleep(Duration),
    /// Wait until everything before this step has been written to the socket.
    Flushed,
    Gate,
    Fail,
}

/// Completed socket flushes of one connection. hyper flushes the socket only once its own
/// write buffer is empty, so a flush seen after a body step means the bytes before it left.
type Flushes = Arc<watch::Sender<u64>>;

/// A connection's socket, counting its completed flushes.
struct Counted {
    inner: TcpStream,
    flushes: Flushes,
}

// === impl FaultUpstream ===

impl FaultUpstream {
    /// Binds both listeners on fresh 127.0.0.1 ports and starts serving (nothing yet).
    pub async fn start() -> FaultUpstream {
        let bind = || TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let origin = bind().await.expect("bind fault origin");
        let redirect = bind().await.expect("bind fault redirect target");
        let state = Arc::new(State {
            content: Mutex::new(Content::default()),
            log: Mutex::new(Vec::new()),
            released: watch::channel(false).0,
            held: watch::channel(0).0,
            origin: origin.local_addr().expect("origin addr"),
            redirect: redirect.local_addr().expect("redirect addr"),
        });
        let tasks = vec![
            tokio::spawn(accept_loop(origin, Listener::Origin, state.clone())),
            tokio::spawn(accept_loop(redirect, Listener::Redirect, state.clone())),
        ];
        FaultUpstream { state, tasks }
    }

    /// The origin's address.
    pub fn addr(&self) -> SocketAddr {
        self.state.origin
    }

    /// The origin's base URL (give this to berth), e.g. `http://127.0.0.1:5123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.state.origin)
    }

    /// Base URL of the redirect target, a different host:port than [`FaultUpstream::url`].
    pub fn redirect_url(&self) -> String {
        format!("http://{}", self.state.redirect)
    }

    /// Serves `bytes` as a blob under every repository name; returns its digest.
    pub fn add_blob(&self, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        self.content().blobs.insert(digest.clone(), bytes);
        digest
    }

    /// Serves `bytes` as a manifest of `media_type`, by `repo:tag` and by digest; returns the
    /// digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let mut content = self.content();
        content
            .manifests
            .insert(digest.clone(), (media_type.to_owned(), bytes));
        content
            .tags
            .insert((repo.to_owned(), tag.to_owned()), digest.clone());
        digest
    }

    /// Serves `bytes` (a manifest of `media_type`) by digest and lists it in
    /// `/v2/<any>/referrers/<subject>`; returns its digest.
    pub fn add_referrer(&self, subject: &str, media_type: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let mut content = self.content();
        content
            .manifests
            .insert(digest.clone(), (media_type.to_owned(), bytes.clone()));
        content
            .referrers
            .entry(subject.to_owned())
            .or_default()
            .push(serde_json::json!({
                "mediaType": media_type,
                "digest": digest,
                "size": bytes.len(),
            }));
        digest
    }

    /// How `/v2/*/blobs/<digest>` is answered from now on ([`Fault::None`] to heal it).
    pub fn set_blob_fault(&self, digest: &str, fault: Fault) {
        self.set_target_fault(Target::Blob(digest.to_owned()), fault);
    }

    /// How `/v2/<repo>/blobs/<digest>` is answered from now on, in `repo` only: the origin
    /// holds the blob in some repositories and not in others.
    pub fn set_repo_blob_fault(&self, repo: &str, digest: &str, fault: Fault) {
        self.set_target_fault(Target::RepoBlob(repo.to_owned(), digest.to_owned()), fault);
    }

    /// How `/v2/<repo>/manifests/<reference>` (a tag or a digest, as written in the path) is
    /// answered from now on.
    pub fn set_manifest_fault(&self, repo: &str, reference: &str, fault: Fault) {
        self.set_target_fault(
            Target::Manifest(repo.to_owned(), reference.to_owned()),
            fault,
        );
    }

    /// How every origin `/v2/` request without a fault of its own is answered from now on.
    pub fn set_fault(&self, fault: Fault) {
        self.content().global = fault;
    }

    /// Sends `ratelimit-remaining: N;w=21600` (Docker Hub's header) with every answer from now on
    /// (`None`: not at all).
    pub fn set_ratelimit_remaining(&self, remaining: Option<i64>) {
        self.content().ratelimit = remaining;
    }

    /// From now on, answers (`200` and `304`) to paths containing `needle` carry `headers`
    /// (replacing what an earlier call gave the same needle; an empty slice removes them).
    pub fn set_headers(&self, needle: &str, headers: &[(&str, &str)]) {
        let mut content = self.content();
        content.headers.retain(|(n, _)| n != needle);
        if !headers.is_empty() {
            let hs = headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            content.headers.push((needle.to_owned(), hs));
        }
    }

    /// Whether object answers (blobs, manifests, listings) carry `ETag: "<digest of the
    /// bytes>"` from now on (and a matching `If-None-Match` gets `304`).
    pub fn send_etags(&self, on: bool) {
        self.content().etags = on;
    }

    /// Changes the tags/list answer of `repo`: serves `tag` (pointing at an existing manifest
    /// `digest`) from now on.
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        self.content()
            .tags
            .insert((repo.to_owned(), tag.to_owned()), digest.to_owned());
    }

    /// Heals everything: no per-object faults, no global fault.
    pub fn clear_faults(&self) {
        let mut content = self.content();
        content.faults.clear();
        content.global = Fault::None;
    }

    /// From now on the origin answers `/v2/` requests with `401` and a Bearer challenge whose
    /// realm is its own `/token`, unless they carry `Authorization: Bearer <token>`; `/token`
    /// hands out `token` to anyone.
    pub fn require_bearer(&self, token: &str) {
        self.content().bearer = Some(token.to_owned());
    }

    /// Opens the gate of every [`Fault::Hold`]: held bodies finish, later ones do not stop.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Waits until at least `n` responses have written their first bytes to the socket and
    /// stopped at a [`Fault::Hold`] gate.
    pub async fn wait_held(&self, n: usize) {
        let mut rx = self.state.held.subscribe();
        rx.wait_for(|held| *held >= n)
            .await
            .expect("the fake keeps its sender");
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().unwrap().clone()
    }

    /// How many recorded requests match `filter`.
    pub fn count(&self, filter: impl Fn(&Recorded) -> bool) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| filter(r))
            .count()
    }

    /// GETs of blob `digest` that reached the origin listener.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.count(|r| {
            r.listener == Listener::Origin && r.method == Method::GET && r.path.ends_with(&suffix)
        })
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        self.state.log.lock().unwrap().clear();
    }

    fn content(&self) -> std::sync::MutexGuard<'_, Content> {
        self.state.content.lock().unwrap()
    }

    fn set_target_fault(&self, target: Target, fault: Fault) {
        let mut content = self.content();
        if fault == Fault::None {
            content.faults.remove(&target);
        } else {
            content.faults.insert(target, fault);
        }
    }
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        // Aborting an accept loop drops its JoinSet, which aborts every connection task.
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, which: Listener, state: Arc<State>) {
    super::accept_each(listener, move |stream| {
        let state = state.clone();
        async move {
            let flushes: Flushes = Arc::new(watch::channel(0).0);
            let io = Counted {
                inner: stream,
                flushes: flushes.clone(),
            };
            let service = hyper::service::service_fn(move |request| {
                let conn = Conn {
                    state: state.clone(),
                    which,
                    flushes: flushes.clone(),
                };
                async move { handle(conn, request).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .await;
        }
    })
    .await
}

/// What a request's handler knows of its connection.
struct Conn {
    state: Arc<State>,
    which: Listener,
    flushes: Flushes,
}

/// What the origin found for a request path.
enum Route {
    Blob { name: String, digest: String },
    Manifest { name: String, reference: String },
    Referrers { subject: String },
    Tags { name: String },
    Other,
}

fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Other;
    };
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Route::Tags {
            name: name.to_owned(),
        };
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Route::Blob {
            name: name.to_owned(),
            digest: digest.to_owned(),
        };
    }
    if let Some((_, subject)) = rest.rsplit_once("/referrers/") {
        return Route::Referrers {
            subject: subject.to_owned(),
        };
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Route::Manifest {
            name: name.to_owned(),
            reference: reference.to_owned(),
        };
    }
    Route::Other
}

/// An object ready to serve: media type, bytes and the digest they are stored under.
struct Object {
    media_type: String,
    bytes: Bytes,
    digest: String,
}

async fn handle(conn: Conn, request: Request<Incoming>) -> Result<Response<Body>, Reset> {
    let state = conn.state.clone();
    let (ratelimit, extra, etags) = {
        let content = state.content.lock().unwrap();
        let path = request
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let extra: Vec<(String, String)> = content
            .headers
            .iter()
            .filter(|(needle, _)| path.contains(needle.as_str()))
            .flat_map(|(_, hs)| hs.iter().cloned())
            .collect();
        (content.ratelimit, extra, content.etags)
    };
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (if_none_match, if_modified_since) = (header("if-none-match"), header("if-modified-since"));
    let index = {
        let mut log = state.log.lock().unwrap();
        log.push(Recorded {
            listener: conn.which,
            method: request.method().clone(),
            path: request
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str().to_owned())
                .unwrap_or_else(|| "/".to_owned()),
            authorization: request.headers().contains_key(AUTHORIZATION),
            if_none_match: if_none_match.clone(),
            if_modified_since: if_modified_since.clone(),
            status: None,
        });
        log.len() - 1
    };
    let mut response = handle_inner(conn, request).await?;
    if response.status() == StatusCode::OK {
        let h = response.headers_mut();
        if etags {
            if let Some(d) = h
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
            {
                h.insert(
                    hyper::header::ETAG,
                    HeaderValue::from_str(&format!("\"{d}\"")).expect("digest is a header"),
                );
            }
        }
        for (k, v) in &extra {
            h.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        let etag = h.get(hyper::header::ETAG).and_then(|v| v.to_str().ok());
        let matched = etag.is_some_and(|e| {
            if_none_match
                .as_deref()
                .is_some_and(|inm| inm.split(',').any(|t| t.trim() == e || t.trim() == "*"))
        }) || (if_none_match.is_none()
            && h.get(hyper::header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|lm| if_modified_since.as_deref() == Some(lm)));
        if matched {
            let (mut parts, _) = response.into_parts();
            parts.status = StatusCode::NOT_MODIFIED;
            parts.headers.remove(CONTENT_LENGTH);
            response = Response::from_parts(
                parts,
                Full::new(Bytes::new())
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            );
        }
    }
    if let Some(r) = ratelimit {
        if let Ok(v) = format!("{r};w=21600").parse() {
            response.headers_mut().insert("ratelimit-remaining", v);
        }
    }
    if let Some(rec) = state.log.lock().unwrap().get_mut(index) {
        rec.status = Some(response.status().as_u16());
    }
    Ok(response)
}

async fn handle_inner(conn: Conn, request: Request<Incoming>) -> Result<Response<Body>, Reset> {
    let state = &conn.state;
    let which = conn.which;
    let method = request.method().clone();
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        return Ok(oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            head,
        ));
    }
    let bare_path = request.uri().path().to_owned();

    if which == Listener::Redirect {
        // The storage host: plain objects by digest, no auth, no faults.
        let digest = bare_path.strip_prefix("/storage/").unwrap_or_default();
        let found = {
            let content = state.content.lock().unwrap();
            find_by_digest(&content, digest)
        };
        return Ok(match found {
            Some(object) => serve(&conn, object, &Fault::None, head),
            None => oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", head),
        });
    }

    if bare_path == "/token" {
        let token = state.content.lock().unwrap().bearer.clone();
        return Ok(match token {
            Some(t) => {
                let body = serde_json::json!({ "token": t, "access_token": t, "expires_in": 300 });
                json(StatusCode::OK, body.to_string(), head)
            }
            None => oci_error(StatusCode::NOT_FOUND, "UNSUPPORTED", head),
        });
    }

    let route = route(&bare_path);
    let (bearer, fault, found) = {
        let content = state.content.lock().unwrap();
        // The most specific target set for this path: a blob in one repository, then the blob
        // in any; a manifest; else the global fault.
        let targets = match &route {
            Route::Blob { name, digest } => vec![
                Target::RepoBlob(name.clone(), digest.clone()),
                Target::Blob(digest.clone()),
            ],
            Route::Manifest { name, reference } => {
                vec![Target::Manifest(name.clone(), reference.clone())]
            }
            Route::Referrers { .. } | Route::Tags { .. } | Route::Other => Vec::new(),
        };
        let fault = targets
            .iter()
            .find_map(|t| content.faults.get(t).cloned())
            .unwrap_or_else(|| content.global.clone());
        let found = match &route {
            Route::Blob { digest, .. } => content.blobs.get(digest).map(|b| Object {
                media_type: "application/octet-stream".to_owned(),
                bytes: b.clone(),
                digest: digest.clone(),
            }),
            Route::Manifest { name, reference } => {
                let digest = if reference.contains(':') {
                    Some(reference.clone())
                } else {
                    content
                        .tags
                        .get(&(name.clone(), reference.clone()))
                        .cloned()
                };
                digest.and_then(|d| find_by_digest(&content, &d))
            }
            Route::Referrers { subject } => {
                let list = content.referrers.get(subject).cloned().unwrap_or_default();
                let bytes = Bytes::from(
                    serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": list,
                    })
                    .to_string(),
                );
                Some(Object {
                    media_type: "application/vnd.oci.image.index.v1+json".to_owned(),
                    digest: sha256_digest(&bytes),
                    bytes,
                })
            }
            Route::Tags { name } => {
                let mut tags: Vec<&String> = content
                    .tags
                    .keys()
                    .filter(|(repo, _)| repo == name)
                    .map(|(_, t)| t)
                    .collect();
                tags.sort();
                (!tags.is_empty()).then(|| {
                    let bytes =
                        Bytes::from(serde_json::json!({ "name": name, "tags": tags }).to_string());
                    Object {
                        media_type: "application/json".to_owned(),
                        digest: sha256_digest(&bytes),
                        bytes,
                    }
                })
            }
            Route::Other => None,
        };
        (content.bearer.clone(), fault, found)
    };

    if let Some(token) = bearer {
        if authorization.as_deref() != Some(format!("Bearer {token}").as_str()) {
            let scope = match &route {
                Route::Blob { name, .. } | Route::Manifest { name, .. } => {
                    format!(",scope=\"repository:{name}:pull\"")
                }
                Route::Referrers { .. } | Route::Tags { .. } | Route::Other => String::new(),
            };
            let challenge = format!(
                "Bearer realm=\"http://{}/token\",service=\"fault\"{scope}",
                state.origin
            );
            let mut resp = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", head);
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_str(&challenge).expect("challenge is a valid header"),
            );
            return Ok(resp);
        }
    }

    match &fault {
        Fault::Reset => return Err(Reset),
        Fault::Stall(d) => tokio::time::sleep(*d).await,
        Fault::Status(code) => {
            let status = StatusCode::from_u16(*code).expect("valid status code");
            let code = match (status, &route) {
                (StatusCode::NOT_FOUND, Route::Blob { .. }) => "BLOB_UNKNOWN",
                (StatusCode::NOT_FOUND, Route::Manifest { .. }) => "MANIFEST_UNKNOWN",
                (StatusCode::NOT_FOUND, Route::Other | Route::Tags { .. }) => "NAME_UNKNOWN",
                (StatusCode::UNAUTHORIZED, _) => "UNAUTHORIZED",
                (StatusCode::FORBIDDEN, _) => "DENIED",
                (StatusCode::TOO_MANY_REQUESTS, _) => "TOOMANYREQUESTS",
                _ => "UNAVAILABLE",
            };
            let mut resp = oci_error(status, code, head);
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            }
            return Ok(resp);
        }
        _ => {}
    }

    let Some(object) = found else {
        return Ok(match route {
            Route::Blob { .. } => oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", head),
            Route::Manifest { .. } | Route::Referrers { .. } => {
                oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", head)
            }
            Route::Tags { .. } => oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", head),
            Route::Other if bare_path == "/v2/" => json(StatusCode::OK, "{}".to_owned(), head),
            Route::Other => oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", head),
        });
    };
    if fault == Fault::Redirect {
        let location = format!("http://{}/storage/{}", state.redirect, object.digest);
        return Ok(Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(LOCATION, location)
            .header(CONTENT_LENGTH, 0)
            .body(scripted(&conn, VecDeque::new()))
            .expect("valid redirect"));
    }
    Ok(serve(&conn, object, &fault, head))
}

fn find_by_digest(content: &Content, digest: &str) -> Option<Object> {
    if let Some(b) = content.blobs.get(digest) {
        return Some(Object {
            media_type: "application/octet-stream".to_owned(),
            bytes: b.clone(),
            digest: digest.to_owned(),
        });
    }
    content
        .manifests
        .get(digest)
        .map(|(media_type, bytes)| Object {
            media_type: media_type.clone(),
            bytes: bytes.clone(),
            digest: digest.to_owned(),
        })
}

/// The object's answer, shaped by `fault` (only the body-shaping faults matter here).
fn serve(conn: &Conn, object: Object, fault: &Fault, head: bool) -> Response<Body> {
    let Object {
        media_type,
        mut bytes,
        mut digest,
    } = object;
    let declared = match fault {
        Fault::Replace(other) => {
            bytes = other.clone();
            digest = sha256_digest(&bytes);
            bytes.len()
        }
        Fault::WrongDigestHeader => {
            let mut other = bytes.to_vec();
            other.extend_from_slice(b"wrong");
            digest = sha256_digest(&other);
            bytes.len()
        }
        Fault::Corrupt | Fault::CorruptHold(_) if !bytes.is_empty() => {
            let mut flipped = bytes.to_vec();
            let middle = flipped.len() / 2;
            flipped[middle] ^= 0xff;
            bytes = Bytes::from(flipped);
            bytes.len()
        }
        _ => bytes.len(),
    };
    let mut steps = VecDeque::new();
    if !head {
        match fault {
            Fault::Truncate(n) => {
                frames(&mut steps, bytes.slice(..(*n).min(bytes.len())), FRAME);
                steps.push_back(Step::Flushed);
                steps.push_back(Step::Fail);
            }
            Fault::StallBody { after, pause } => {
                let after = (*after).min(bytes.len());
                frames(&mut steps, bytes.slice(..after), FRAME);
                steps.push_back(Step::Sleep(*pause));
                frames(&mut steps, bytes.slice(after..), FRAME);
            }
            Fault::Slow { chunk, delay } => {
                for (i, piece) in bytes.chunks((*chunk).max(1)).enumerate() {
                    if i > 0 {
                        steps.push_back(Step::Sleep(*delay));
                    }
                    steps.push_back(Step::Data(bytes.slice_ref(piece)));
                }
            }
            Fault::Hold(n) | Fault::CorruptHold(n) => {
                let n = (*n).min(bytes.len());
                frames(&mut steps, bytes.slice(..n), FRAME);
                steps.push_back(Step::Flushed);
                steps.push_back(Step::Gate);
                frames(&mut steps, bytes.slice(n..), FRAME);
            }
            _ => frames(&mut steps, bytes, FRAME),
        }
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, media_type)
        .header(CONTENT_LENGTH, declared)
        .header("docker-content-digest", digest)
        .body(scripted(conn, steps))
        .expect("valid object response")
}

/// Appends `bytes` as data steps of at most `size` bytes.
fn frames(steps: &mut VecDeque<Step>, bytes: Bytes, size: usize) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let piece = rest.split_to(size.min(rest.len()));
        steps.push_back(Step::Data(piece));
    }
}

/// A body that plays `steps`: data frames, pauses, the hold gate, and a failure that makes
/// hyper cut the connection mid-body.
fn scripted(conn: &Conn, steps: VecDeque<Step>) -> Body {
    struct Script {
        steps: VecDeque<Step>,
        state: Arc<State>,
        flushes: Flushes,
    }
    let script = Script {
        steps,
        state: conn.state.clone(),
        flushes: conn.flushes.clone(),
    };
    let stream = futures_util::stream::unfold(script, |mut script| async move {
        loop {
            match script.steps.pop_front()? {
                Step::Data(b) => return Some((Ok(Frame::data(b)), script)),
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Flushed => {
                    // Pending here makes hyper flush what it holds, which ticks the counter.
                    let mut rx = script.flushes.subscribe();
                    let seen = *rx.borrow_and_update();
                    let _ = rx.wait_for(|n| *n > seen).await;
                }
                Step::Gate => {
                    script.state.held.send_modify(|n| *n += 1);
                    let mut rx = script.state.released.subscribe();
                    let _ = rx.wait_for(|released| *released).await;
                }
                Step::Fail => {
                    let cut = io::Error::other("fault: body cut short");
                    return Some((Err(cut), script));
                }
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

fn json(status: StatusCode, body: String, head: bool) -> Response<Body> {
    let len = body.len();
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(body)
    };
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, len)
        .body(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("valid JSON response")
}

fn oci_error(status: StatusCode, code: &str, head: bool) -> Response<Body> {
    let body = serde_json::json!({
        "errors": [{ "code": code, "message": format!("fault upstream: {code}"), "detail": null }]
    });
    json(status, body.to_string(), head)
}

// === impl Counted ===

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.flushes.send_modify(|n| *n += 1);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
