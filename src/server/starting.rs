//! The admin listener while berth starts.
//!
//! Opening the cache rebuilds its index from the files on disk (seconds for 100,000 objects,
//! longer for millions on a slow volume) and may wait for another process's cache lock. The
//! admin socket is bound before that and answers probes meanwhile: `/healthz` 200 (alive),
//! `/readyz` 503 `starting` (not serving yet), `/metrics` what is registered so far. A
//! Kubernetes startup probe can then tell a busy start from a dead process, and a port clash
//! fails the start before the rebuild. Once berth is up, the same socket passes to the real
//! admin listener, so no connection attempt is refused in between.
//!
//! Architecture: docs/ARCHITECTURE.md, "Admin listener".

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::body::Body;
use crate::metrics::Metrics;

/// Longest a start-up admin connection is kept (one request, then closed).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// The admin socket, answering probes until [`StartingAdmin::finish`] takes it back.
pub(super) struct StartingAdmin {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<TcpListener>>,
}

// === impl StartingAdmin ===

impl StartingAdmin {
    /// Starts answering on `listener`.
    pub(super) fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> StartingAdmin {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return listener,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let metrics = metrics.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                                let response = respond(req.uri().path(), &metrics);
                                std::future::ready(Ok::<_, Infallible>(response))
                            });
                            let conn = hyper::server::conn::http1::Builder::new()
                                .keep_alive(false)
                                .serve_connection(TokioIo::new(stream), service);
                            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
                        });
                    }
                }
            }
        });
        StartingAdmin {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops answering and returns the socket for the real admin listener.
    pub(super) async fn finish(mut self) -> TcpListener {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .expect("finish is called once")
            .await
            .expect("the start-up admin task does not panic")
    }
}

impl Drop for StartingAdmin {
    /// A start that failed closes the socket.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `/healthz` 200, `/readyz` 503 `starting`, `/metrics` as registered so far, else 404.
fn respond(path: &str, metrics: &Metrics) -> Response<Body> {
    let (status, ctype, text) = match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "starting\n".to_owned(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    super::admin::admin_text(status, ctype, text)
}
