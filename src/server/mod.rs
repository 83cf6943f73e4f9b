//! Listeners: the client-facing server (plain or TLS, HTTP/1.1 and HTTP/2) and the admin server,
//! with graceful shutdown. [`start`] binds everything and returns the bound addresses, so tests
//! and the binary drive berth the same way.
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

mod admin;
mod conn;
pub mod fd_limit;
mod listener;
mod recency;
mod starting;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::Cache;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{App, ConnInfo};
use crate::upstream::Upstreams;
use listener::{Listener, ListenerKind};

/// Most connections the peer listener holds at once (other replicas pool theirs).
const PEER_MAX_CONNECTIONS: usize = 1024;

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
            bind(a).await?,
            metrics.clone(),
        )),
        None => None,
    };
    let cache = open_cache(&config).await?;
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
    let listener = bind(config.server.listen).await?;
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
        Some(c) => Some(bind(c.listen).await?),
        None => None,
    };
    let peer_addr = peer_listener.as_ref().and_then(|l| l.local_addr().ok());
    let scale = open_scale(&config, &cache, &metrics).await?;
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
    let caps = connection_caps(&config);
    let tls = acceptor.is_some();
    let client_task = serve_clients(&app, listener, acceptor, caps.0, &rx, ready.clone());
    // The admin listener outlives the client listener's drain, so that probes see `/readyz`
    // turn 503 ("shutting down") while in-flight requests finish, and metrics stay scrapable.
    let (admin_stop, admin_rx) = watch::channel(false);
    let mut tasks = vec![tokio::spawn(async move {
        let _ = client_task.await;
        let _ = admin_stop.send(true);
    })];
    if let Some(socket) = admin_listener {
        tasks.push(serve_admin(&app, socket, caps.1, admin_rx, ready)?);
    }
    if let (Some(socket), Some(cluster)) = (peer_listener, app.scale().cluster.clone()) {
        tasks.push(tokio::spawn(cluster.clone().refresh_loop(rx.clone())));
        tasks.push(serve_peers(&app, cluster, socket, caps.0, &rx));
    }
    tasks.push(tokio::spawn(recency::save_recency(app.clone(), rx)));
    tracing::info!(
        %addr, admin = ?admin_addr, peer = ?peer_addr, tls,
        max_connections = caps.0, admin_max_connections = caps.1,
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

/// A socket bound to `addr`.
async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Opens the cache directory on the blocking pool (the index rebuild reads every file).
async fn open_cache(config: &Config) -> Result<Cache, StartError> {
    let cache_dir = config.cache.dir.clone();
    tokio::task::spawn_blocking({
        let c = config.cache.clone();
        move || Cache::open(&c)
    })
    .await
    .expect("cache open does not panic")
    .map_err(|source| StartError::Cache {
        path: cache_dir.display().to_string(),
        source,
    })
}

/// The shared tier and the cluster, where configured.
async fn open_scale(
    config: &Config,
    cache: &Cache,
    metrics: &Arc<Metrics>,
) -> Result<crate::proxy::Scale, StartError> {
    Ok(crate::proxy::Scale {
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
    })
}

/// Serves the client listener until `shutdown`: every request to [`App::handle`], TLS when
/// configured; `ready` turns false when it stops accepting.
fn serve_clients(
    app: &Arc<App>,
    socket: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    cap: usize,
    shutdown: &watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
) -> JoinHandle<()> {
    let config = app.config();
    let info = ConnInfo {
        tls: acceptor.is_some(),
    };
    let handler_app = app.clone();
    let clients = Listener {
        kind: ListenerKind::Client,
        socket,
        setup: Arc::new(conn::Setup::new(
            move |mut req: Request<Incoming>| {
                let app = handler_app.clone();
                req.extensions_mut().insert(info);
                async move { app.handle(req).await }
            },
            acceptor,
            config.server.connections,
        )),
        cap,
    };
    tokio::spawn(listener::run(
        clients,
        app.metrics().clone(),
        shutdown.clone(),
        config.server.shutdown_grace,
        Some(ready),
    ))
}

/// Serves the admin listener until `shutdown`: probes, metrics and the admin actions
/// ([`admin::handle`]).
fn serve_admin(
    app: &Arc<App>,
    socket: TcpListener,
    cap: usize,
    shutdown: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, StartError> {
    let config = app.config();
    let handler_app = app.clone();
    let events_secret: Option<Arc<crate::secret::Secret>> = config
        .admin
        .events_secret_file
        .as_deref()
        .map(admin::read_events_secret)
        .transpose()?
        .map(Arc::new);
    let admin = Listener {
        kind: ListenerKind::Admin,
        socket,
        setup: Arc::new(conn::Setup::new(
            move |req: Request<Incoming>| {
                admin::handle(
                    req,
                    handler_app.clone(),
                    ready.clone(),
                    events_secret.clone(),
                )
            },
            None,
            config.server.connections,
        )),
        cap,
    };
    Ok(tokio::spawn(listener::run(
        admin,
        app.metrics().clone(),
        shutdown,
        config.server.shutdown_grace,
        None,
    )))
}

/// Serves the peer listener (`[cluster]`) until `shutdown`: other replicas' blob requests
/// ([`crate::proxy::peer`]).
fn serve_peers(
    app: &Arc<App>,
    cluster: Arc<Cluster>,
    socket: TcpListener,
    client_cap: usize,
    shutdown: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let config = app.config();
    let handler_app = app.clone();
    let peers = Listener {
        kind: ListenerKind::Peer,
        socket,
        setup: Arc::new(conn::Setup::new(
            move |req: Request<Incoming>| {
                let (app, cluster) = (handler_app.clone(), cluster.clone());
                async move { crate::proxy::peer::handle(&cluster, &app, req).await }
            },
            None,
            config.server.connections,
        )),
        cap: client_cap.min(PEER_MAX_CONNECTIONS),
    };
    tokio::spawn(listener::run(
        peers,
        app.metrics().clone(),
        shutdown.clone(),
        config.server.shutdown_grace,
        None,
    ))
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
