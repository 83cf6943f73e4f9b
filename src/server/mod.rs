//! Listeners: the client-facing server (plain or TLS, HTTP/1.1 and HTTP/2) and the admin server,
//! with graceful shutdown. [`start`] binds everything and returns the bound addresses, so tests
//! and the binary drive berth the same way.

mod conn;
pub mod fd_limit;
mod listener;
mod starting;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::body::{self, Body};
use crate::cache::Cache;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{App, ConnInfo};
use crate::upstream::Upstreams;
use listener::{Listener, ListenerKind};

/// Most connections the peer listener holds at once (other replicas pool theirs).
const PEER_MAX_CONNECTIONS: usize = 1024;

/// How often the cache's recency order is saved.
const RECENCY_INTERVAL: Duration = Duration::from_secs(30);

/// Why berth could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cache directory could not be opened.
    #[error("cache directory {path}: {source}")]
    Cache {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::BuildError),
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Local credential files could not be loaded.
    #[error("auth: {0}")]
    Auth(#[from] crate::auth::local::LocalAuthError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The shared tier's object store could not be set up.
    #[error(transparent)]
    Shared(#[from] crate::shared::OpenError),
    /// The cluster's secret could not be read.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// `admin.events_secret_file` could not be read.
    #[error("admin.events_secret_file: {0}")]
    Events(String),
}

/// A started berth: its bound addresses and the handle to stop it.
pub struct Running {
    /// Address of the client listener.
    pub addr: SocketAddr,
    /// Address of the admin listener, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// Address of the peer listener (`[cluster]`), if configured.
    pub peer_addr: Option<SocketAddr>,
    /// The request path (for tests that inspect the cache).
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (bounded by `server.shutdown_grace`),
    /// and returns when every listener has stopped.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.wait().await;
    }

    /// Waits until the listeners stop (after a shutdown was triggered or a signal), then for
    /// fills still landing (bounded by `server.shutdown_grace`): a blob whose bytes all arrived
    /// is committed, not abandoned.
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        let fills = self.app.cache().fills().clone();
        let deadline = tokio::time::Instant::now() + self.grace;
        if tokio::time::timeout_at(deadline, fills.all_settled())
            .await
            .is_err()
        {
            tracing::warn!(
                fills = fills.in_flight(),
                "exiting with fills in progress; they are discarded"
            );
        }
        // Uploads to the shared tier share that grace; one cut short is done by the next
        // replica that fills the blob.
        if let Some(shared) = self.app.scale().shared.clone() {
            if tokio::time::timeout_at(deadline, shared.uploads_settled())
                .await
                .is_err()
            {
                tracing::warn!(
                    uploads = shared.pending_uploads(),
                    "exiting with shared-tier uploads pending; they are dropped"
                );
            }
        }
        let app = self.app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            app.cache().memberships().flush();
            app.cache().save_recency()
        })
        .await;
    }

    /// A handle that starts a graceful shutdown when sent `true`.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Opens the cache, builds upstream clients, binds the listeners and starts serving.
pub async fn start(config: Config, registry: prometheus::Registry) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new(registry)?);
    // The admin socket first: probes are answered while the cache index rebuilds.
    let starting_admin = match config.admin.listen {
        Some(a) => Some(starting::StartingAdmin::serve(
            TcpListener::bind(a)
                .await
                .map_err(|source| StartError::Bind { addr: a, source })?,
            metrics.clone(),
        )),
        None => None,
    };
    let cache_dir = config.cache.dir.clone();
    let cache = tokio::task::spawn_blocking({
        let c = config.cache.clone();
        move || Cache::open(&c)
    })
    .await
    .expect("cache open does not panic")
    .map_err(|source| StartError::Cache {
        path: cache_dir.display().to_string(),
        source,
    })?;
    let upstreams = Upstreams::new(&config.upstreams)?;
    let auth = crate::auth::Authorizer::new(
        config.auth.clone(),
        metrics.clone(),
        cache.memberships().clone(),
    )?;
    let acceptor = match &config.server.tls {
        Some(t) => Some(tls::acceptor(t)?),
        None => None,
    };
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let admin_listener = match starting_admin {
        Some(s) => Some(s.finish().await),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let peer_listener = match &config.cluster {
        Some(c) => Some(
            TcpListener::bind(c.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: c.listen,
                    source,
                })?,
        ),
        None => None,
    };
    let peer_addr = peer_listener.as_ref().and_then(|l| l.local_addr().ok());
    let scale = crate::proxy::Scale {
        shared: match &config.cache.shared {
            Some(c) => Some(crate::shared::SharedTier::open(
                c,
                cache.store().clone(),
                metrics.clone(),
            )?),
            None => None,
        },
        cluster: match &config.cluster {
            Some(c) => Some(Cluster::start(c, metrics.clone()).await?),
            None => None,
        },
    };
    let app = App::new(
        config.clone(),
        cache,
        upstreams,
        metrics.clone(),
        auth,
        scale,
    );
    let (shutdown, rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(true));
    let (client_cap, admin_cap) = connection_caps(&config);
    let limits = config.server.connections;
    let info = ConnInfo {
        tls: acceptor.is_some(),
    };
    let client_app = app.clone();
    let clients = Listener {
        kind: ListenerKind::Client,
        socket: listener,
        setup: Arc::new(conn::Setup::new(
            move |mut req: Request<Incoming>| {
                let app = client_app.clone();
                req.extensions_mut().insert(info);
                async move { app.handle(req).await }
            },
            acceptor,
            limits,
        )),
        cap: client_cap,
    };
    let grace = config.server.shutdown_grace;
    let client_task = tokio::spawn(listener::run(
        clients,
        metrics.clone(),
        rx.clone(),
        grace,
        Some(ready.clone()),
    ));
    // The admin listener outlives the client listener's drain, so that probes see `/readyz`
    // turn 503 ("shutting down") while in-flight requests finish, and metrics stay scrapable.
    let (admin_stop, admin_rx) = watch::channel(false);
    let mut tasks = vec![tokio::spawn(async move {
        let _ = client_task.await;
        let _ = admin_stop.send(true);
    })];
    if let Some(socket) = admin_listener {
        let admin_app = app.clone();
        let events_secret: Option<Arc<crate::secret::Secret>> = config
            .admin
            .events_secret_file
            .as_deref()
            .map(read_events_secret)
            .transpose()?
            .map(Arc::new);
        let admin = Listener {
            kind: ListenerKind::Admin,
            socket,
            setup: Arc::new(conn::Setup::new(
                move |req: Request<Incoming>| {
                    let (app, ready) = (admin_app.clone(), ready.clone());
                    let events_secret = events_secret.clone();
                    async move {
                        if req.uri().path() == "/verify" {
                            return verify_response(&req, &app).await;
                        }
                        if req.uri().path() == "/purge" {
                            return purge_response(&req, &app).await;
                        }
                        if req.uri().path() == "/events" {
                            return events_response(req, &app, events_secret.as_deref()).await;
                        }
                        admin_response(req.uri().path(), &app, &ready)
                    }
                },
                None,
                limits,
            )),
            cap: admin_cap,
        };
        tasks.push(tokio::spawn(listener::run(
            admin,
            metrics.clone(),
            admin_rx,
            grace,
            None,
        )));
    }
    if let (Some(socket), Some(cluster)) = (peer_listener, app.scale().cluster.clone()) {
        tasks.push(tokio::spawn(cluster.clone().refresh_loop(rx.clone())));
        let peer_app = app.clone();
        let peers = Listener {
            kind: ListenerKind::Peer,
            socket,
            setup: Arc::new(conn::Setup::new(
                move |req: Request<Incoming>| {
                    let (app, cluster) = (peer_app.clone(), cluster.clone());
                    async move { crate::cluster::endpoint::handle(&cluster, &app, req).await }
                },
                None,
                limits,
            )),
            cap: client_cap.min(PEER_MAX_CONNECTIONS),
        };
        tasks.push(tokio::spawn(listener::run(
            peers,
            metrics.clone(),
            rx.clone(),
            grace,
            None,
        )));
    }
    tasks.push(tokio::spawn(save_recency(app.clone(), rx)));
    tracing::info!(
        %addr, admin = ?admin_addr, peer = ?peer_addr, tls = config.server.tls.is_some(),
        max_connections = client_cap, admin_max_connections = admin_cap,
        "berth listening"
    );
    Ok(Running {
        addr,
        admin_addr,
        peer_addr,
        app,
        shutdown,
        tasks,
        grace: config.server.shutdown_grace,
    })
}

/// The client and admin connection caps: as configured, lowered (with a warning) to fit the
/// open-file limit.
fn connection_caps(config: &Config) -> (usize, usize) {
    let wanted = (config.server.max_connections, config.admin.max_connections);
    let limit = fd_limit::current();
    let caps = fd_limit::caps(wanted.0, wanted.1, limit.map(|l| l.soft));
    if caps != wanted {
        tracing::warn!(
            open_files_soft = limit.map(|l| l.soft),
            max_connections = caps.0,
            admin_max_connections = caps.1,
            configured = ?wanted,
            "connection caps lowered to fit the open-file limit"
        );
    }
    caps
}

/// Saves the cache's recency order every [`RECENCY_INTERVAL`] and once more at shutdown.
async fn save_recency(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(RECENCY_INTERVAL) => false,
            _ = shutdown.changed() => true,
        };
        let a = app.clone();
        let saved = tokio::task::spawn_blocking(move || a.cache().save_recency()).await;
        if let Ok(Err(e)) = saved {
            tracing::warn!(error = %e, "could not save cache recency");
        }
        if stop {
            return;
        }
    }
}

fn admin_response(path: &str, app: &App, ready: &AtomicBool) -> Response<Body> {
    let (status, ctype, text) = match path {
        "/metrics" => {
            app.metrics().refresh(&app.snapshot());
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                app.metrics().render(),
            )
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" if ready.load(Ordering::SeqCst) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    admin_text(status, ctype, text)
}

/// `POST /verify[?sample=N][&rate=SIZE]`: scrubs the running cache's disk tier on the blocking
/// pool and answers the report as JSON (409 while another scrub runs).
async fn verify_response(req: &Request<Incoming>, app: &Arc<App>) -> Response<Body> {
    if let Some(refused) = post_only(req, "POST /verify scrubs the cache") {
        return refused;
    }
    let query = req.uri().query();
    let sample = match crate::router::query_param(query, "sample").map(|v| v.parse::<usize>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => {
            return admin_text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "sample: a number of objects\n".to_owned(),
            )
        }
    };
    let rate = match crate::router::query_param(query, "rate")
        .map(|v| crate::config::units::parse_size(&v))
    {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            return admin_text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("rate: {e}\n"),
            )
        }
    };
    let app = app.clone();
    let opts = crate::cache::ScrubOptions { sample, rate };
    let result = tokio::task::spawn_blocking(move || app.cache().scrub(&opts)).await;
    match result {
        Ok(Ok(report)) => admin_text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&report).unwrap_or_default(),
        ),
        Ok(Err(crate::cache::ScrubError::Busy)) => admin_text(
            StatusCode::CONFLICT,
            "text/plain",
            "a scrub is already running\n".to_owned(),
        ),
        Ok(Err(e)) => admin_text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
        Err(e) => task_failed("scrub task", &e),
    }
}

/// `POST /purge?target=…[&tag_only=true][&force=true]`: drops an image, a tag mapping or a blob
/// (see `berth purge`) and answers what went as JSON; 404 when it is not cached, 409 when it is
/// pinned and not forced, 400 for a target that names nothing.
async fn purge_response(req: &Request<Incoming>, app: &Arc<App>) -> Response<Body> {
    if let Some(refused) = post_only(
        req,
        "POST /purge?target=IMAGE|DIGEST drops it from the cache",
    ) {
        return refused;
    }
    let query = req.uri().query();
    let flag = |k| crate::router::query_param(query, k).is_some_and(|v| v == "true" || v == "1");
    let Some(target) = crate::router::query_param(query, "target") else {
        return admin_text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "target: an image reference or a digest\n".to_owned(),
        );
    };
    let (tag_only, force) = (flag("tag_only"), flag("force"));
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || {
        crate::proxy::purge::purge(app2.cache(), app2.upstreams(), &target, tag_only, force)
    })
    .await;
    match result {
        Ok(Ok(report)) => admin_text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&report).unwrap_or_default(),
        ),
        Ok(Err(e)) => {
            use crate::cache::PurgeError;
            use crate::proxy::purge::TargetError;
            let status = match &e {
                TargetError::Purge(PurgeError::Pinned(_)) => StatusCode::CONFLICT,
                TargetError::Purge(PurgeError::NotCached(_)) => StatusCode::NOT_FOUND,
                TargetError::Invalid(_) => StatusCode::BAD_REQUEST,
            };
            admin_text(status, "text/plain", format!("{e}\n"))
        }
        Err(e) => task_failed("purge task", &e),
    }
}

/// The bearer secret of `POST /events`, from its file (trimmed; empty refused).
fn read_events_secret(path: &std::path::Path) -> Result<crate::secret::Secret, StartError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StartError::Events(format!("{}: {e}", path.display())))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(StartError::Events(format!("{} is empty", path.display())));
    }
    Ok(crate::secret::Secret::new(secret.to_owned()))
}

/// Most bytes of one notification delivery.
const MAX_EVENTS_BODY: usize = 1 << 20;

/// `POST /events[?upstream=NAME]` with `Authorization: Bearer <admin.events_secret_file>`:
/// registry notifications (distribution envelopes, ACR webhooks) for the upstream named (the
/// default upstream otherwise). 404 when not configured, 401 without the secret.
async fn events_response(
    req: Request<Incoming>,
    app: &Arc<App>,
    secret: Option<&crate::secret::Secret>,
) -> Response<Body> {
    use http_body_util::BodyExt;
    let Some(secret) = secret else {
        return admin_text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "events are off (admin.events_secret_file)\n".to_owned(),
        );
    };
    if let Some(refused) = post_only(&req, "POST registry notifications here") {
        return refused;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !crate::secret::constant_time_eq(given.trim().as_bytes(), secret.expose().as_bytes()) {
        return admin_text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "a bearer secret is required\n".to_owned(),
        );
    }
    let upstream = crate::router::query_param(req.uri().query(), "upstream");
    let limited = http_body_util::Limited::new(req.into_body(), MAX_EVENTS_BODY);
    let body = match tokio::time::timeout(Duration::from_secs(10), limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return admin_text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "body too large, too slow or cut\n".to_owned(),
            )
        }
    };
    let app2 = app.clone();
    let result =
        tokio::task::spawn_blocking(move || app2.apply_events(upstream.as_deref(), &body)).await;
    match result {
        Ok(Ok(applied)) => admin_text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&applied).unwrap_or_default(),
        ),
        Ok(Err(e)) => admin_text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        Err(e) => task_failed("events task", &e),
    }
}

/// 405 with `usage` for anything but a POST to an admin action.
fn post_only(req: &Request<Incoming>, usage: &str) -> Option<Response<Body>> {
    (req.method() != hyper::Method::POST).then(|| {
        admin_text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("{usage}\n"),
        )
    })
}

/// 500 for an admin action whose blocking task died.
fn task_failed(what: &str, e: &tokio::task::JoinError) -> Response<Body> {
    admin_text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "text/plain",
        format!("{what}: {e}\n"),
    )
}

/// An admin listener answer: a status and a small text body (shared with the start-up
/// listener in `starting.rs`).
fn admin_text(status: StatusCode, ctype: &'static str, text: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .body(body::full(text))
        .expect("static headers are valid")
}
