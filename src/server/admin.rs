//! The admin listener's answers (docs/ARCHITECTURE.md, "Admin listener"): `/metrics`,
//! `/healthz`, `/readyz`, and the actions `POST /verify`, `POST /purge`, `POST /events`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::StartError;
use crate::body::{self, Body};
use crate::proxy::App;
use crate::secret::Secret;

/// The admin listener's handler: every admin path, with `ready` for `/readyz` and the events
/// secret when `POST /events` is on.
pub(super) async fn handle(
    req: Request<Incoming>,
    app: Arc<App>,
    ready: Arc<AtomicBool>,
    events_secret: Option<Arc<Secret>>,
) -> Response<Body> {
    match req.uri().path() {
        "/verify" => verify_response(&req, &app).await,
        "/purge" => purge_response(&req, &app).await,
        "/events" => events_response(req, &app, events_secret.as_deref()).await,
        path => admin_response(path, &app, &ready),
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
pub(super) fn read_events_secret(path: &std::path::Path) -> Result<Secret, StartError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StartError::Events(format!("{}: {e}", path.display())))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(StartError::Events(format!("{} is empty", path.display())));
    }
    Ok(Secret::new(secret.to_owned()))
}

/// Most bytes of one notification delivery.
const MAX_EVENTS_BODY: usize = 1 << 20;

/// `POST /events[?upstream=NAME]` with `Authorization: Bearer <admin.events_secret_file>`:
/// registry notifications (distribution envelopes, ACR webhooks) for the upstream named (the
/// default upstream otherwise). 404 when not configured, 401 without the secret.
async fn events_response(
    req: Request<Incoming>,
    app: &Arc<App>,
    secret: Option<&Secret>,
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
pub(super) fn admin_text(status: StatusCode, ctype: &'static str, text: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .body(body::full(text))
        .expect("static headers are valid")
}
