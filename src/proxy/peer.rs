//! The internal endpoint an owner answers other replicas on (`cluster.listen`), never the
//! client listener:
//!
//! `GET /_berth/peer/v1/blobs/<digest>?upstream=<name>&repo=<repository>` with
//! `Authorization: Bearer <cluster secret>` (401 otherwise) and optionally `Range`.
//!
//! The owner serves the blob through its own fill path (one origin fetch shared with its own
//! clients, its disk filled) but never forwards it to another replica. It makes no authorization
//! decision: the asking replica did. It relays membership evidence with
//! [`crate::cluster::MEMBER_HEADER`] only when its origin answered 2xx for the digest in that
//! repository. For `passthrough` upstreams the client's credential arrives in
//! [`UPSTREAM_AUTH_HEADER`] and its origin requests use it.
//!
//! Request handling, so it lives with the proxy; the peer set and the fetch from an owner are
//! in [`crate::cluster`] (docs/ARCHITECTURE.md, "Scale-out").

use http::{header, HeaderMap, Method, Request, Response};

use super::App;
use crate::auth::{Credential, Principal};
use crate::body::Body;
use crate::cluster::{Cluster, BLOB_PATH, UPSTREAM_AUTH_HEADER};
use crate::config::{AuthMode, Credentials};
use crate::error::Error;
use crate::oci::{Digest, RepoName};
use crate::router::query_param;
use crate::upstream::{Selected, UpstreamAuth};

/// GET: `/_berth/peer/v1/blobs/<digest>`
pub async fn handle<B>(cluster: &Cluster, app: &App, req: Request<B>) -> Response<Body> {
    let served = |result: &str| {
        app.metrics()
            .scale
            .peer_served
            .with_label_values(&[result])
            .inc()
    };
    if !cluster.authorized(req.headers().get(header::AUTHORIZATION)) {
        served("denied");
        return Error::Unauthorized("peer requests carry the cluster's secret".into())
            .into_response(false);
    }
    let answer = match request(app, &req) {
        Ok((sel, digest)) => {
            let range = req
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok());
            app.peer_blob(&sel, digest, range).await
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok(resp) => {
            served("ok");
            tracing::debug!(path = %req.uri().path(), status = resp.status().as_u16(), "peer request");
            resp
        }
        Err(e) => {
            served("error");
            tracing::debug!(path = %req.uri().path(), error = %e, "peer request failed");
            e.into_response(req.method() == Method::HEAD)
        }
    }
}

/// The upstream, repository and digest a peer request names, with the credential its origin
/// requests carry.
fn request<B>(app: &App, req: &Request<B>) -> Result<(Selected, Digest), Error> {
    if req.method() != Method::GET {
        return Err(Error::Unsupported(
            "the peer endpoint answers GET only".into(),
        ));
    }
    let digest: Digest = req
        .uri()
        .path()
        .strip_prefix(BLOB_PATH)
        .ok_or_else(|| Error::NotFound("no such peer route".into()))?
        .parse()?;
    let query = req.uri().query();
    let upstream = query_param(query, "upstream")
        .ok_or_else(|| Error::BadRequest("upstream= is required".into()))?;
    let upstream = app
        .upstreams()
        .by_name(&upstream)
        .ok_or_else(|| Error::NameUnknown(format!("no upstream {upstream:?} here")))?
        .clone();
    let repo: RepoName = query_param(query, "repo")
        .ok_or_else(|| Error::BadRequest("repo= is required".into()))?
        .parse()?;
    let auth = match upstream.config().auth {
        AuthMode::Public | AuthMode::Service => UpstreamAuth::Own,
        AuthMode::Passthrough => client_auth(req.headers())?,
    };
    Ok((
        Selected {
            upstream,
            name: repo,
            prefix: None,
            auth,
        },
        digest,
    ))
}

/// The client's origin credential relayed by the asking replica (anonymous without one).
fn client_auth(headers: &HeaderMap) -> Result<UpstreamAuth, Error> {
    let mut h = HeaderMap::new();
    if let Some(v) = headers.get(UPSTREAM_AUTH_HEADER) {
        h.insert(header::AUTHORIZATION, v.clone());
    }
    let principal = Principal::from_headers(&h).map_err(|e| Error::BadRequest(e.to_string()))?;
    Ok(match principal.credential {
        Credential::Anonymous => UpstreamAuth::Anonymous,
        Credential::Bearer(t) => UpstreamAuth::Bearer(t),
        Credential::Basic { user, password } => UpstreamAuth::Basic {
            key: principal.key,
            credentials: Credentials {
                username: user,
                password,
            },
        },
    })
}
