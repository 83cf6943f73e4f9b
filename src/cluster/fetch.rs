//! A replica that misses a blob it does not own streams it from the owner: [`PeerBlob`], one
//! source of a fill (`proxy/sources.rs` falls back to the shared tier or the origin when it
//! fails). The bytes are verified by the fill like any other; whether they may be served under
//! the client's repository is settled by this replica, with the owner's relayed origin evidence
//! or, without it, by asking the origin.
//!
//! Architecture: docs/ARCHITECTURE.md, "Peers".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::{Cluster, BLOB_PATH, MEMBER_HEADER, UPSTREAM_AUTH_HEADER};
use crate::cache::fill::{BlobFetcher, FetchError, Fetched, FetchedFrom};
use crate::cache::Memberships;
use crate::oci::Digest;
use crate::upstream::{Selected, UpstreamAuth, UpstreamError};

/// Fetches a blob from the replica that owns it.
pub struct PeerBlob {
    cluster: Arc<Cluster>,
    owner: String,
    digest: Digest,
    upstream: String,
    repo: String,
    /// The client's origin credential (passthrough upstreams), marked sensitive.
    upstream_auth: Option<HeaderValue>,
    /// Longest pause between two body chunks (the origin's own idle timeout: the owner
    /// relays the origin's pace).
    idle: Duration,
    /// Where an owner's relayed evidence is recorded.
    members: Arc<Memberships>,
}

impl PeerBlob {
    /// A fetch of `digest` in `sel`'s upstream and repository from `owner`, carrying the
    /// client's origin credential when `sel` holds the client's own.
    pub fn new(
        cluster: Arc<Cluster>,
        owner: String,
        digest: Digest,
        sel: &Selected,
        members: Arc<Memberships>,
    ) -> PeerBlob {
        PeerBlob {
            cluster,
            owner,
            digest,
            upstream: sel.upstream.name().to_owned(),
            repo: sel.name.to_string(),
            upstream_auth: upstream_auth_header(&sel.auth),
            idle: sel.upstream.config().idle_timeout,
            members,
        }
    }

    fn name(&self) -> String {
        format!("peer {}", self.owner)
    }

    fn request(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Result<Request<Empty<Bytes>>, UpstreamError> {
        let uri = format!(
            "http://{}{BLOB_PATH}{}?upstream={}&repo={}",
            self.owner,
            self.digest,
            utf8_percent_encode(&self.upstream, NON_ALPHANUMERIC),
            utf8_percent_encode(&self.repo, NON_ALPHANUMERIC),
        );
        let mut b = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(header::AUTHORIZATION, self.cluster.bearer())
            .header(header::USER_AGENT, crate::upstream::USER_AGENT);
        if start > 0 || end.is_some() {
            let spec = match end {
                Some(e) => format!("bytes={start}-{}", e.saturating_sub(1)),
                None => format!("bytes={start}-"),
            };
            b = b.header(header::RANGE, spec);
        }
        if let Some(a) = &self.upstream_auth {
            b = b.header(UPSTREAM_AUTH_HEADER, a.clone());
        }
        b.body(Empty::new()).map_err(|e| UpstreamError::Invalid {
            upstream: self.name(),
            reason: e.to_string(),
        })
    }
}

impl BlobFetcher for PeerBlob {
    fn fetch(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send>> {
        let request = self.request(start, end);
        let (client, timeout, idle) = (
            self.cluster.client.clone(),
            self.cluster.timeout(),
            self.idle,
        );
        let name = self.name();
        let evidence = (
            self.members.clone(),
            self.upstream.clone(),
            self.repo.clone(),
            self.digest.clone(),
        );
        let counter = {
            let m = self.cluster.metrics.clone();
            move |r: &str| m.scale.peer_requests.with_label_values(&[r]).inc()
        };
        Box::pin(async move {
            let request = request?;
            let resp = match tokio::time::timeout(timeout, client.request(request)).await {
                Err(_) => {
                    counter("timeout");
                    return Err(UpstreamError::Timeout {
                        upstream: name,
                        what: "peer answer",
                    }
                    .into());
                }
                Ok(Err(e)) => {
                    counter("error");
                    return Err(UpstreamError::Unreachable {
                        upstream: name,
                        reason: crate::upstream::error_chain(&e),
                    }
                    .into());
                }
                Ok(Ok(r)) => r,
            };
            let ranged = start > 0 || end.is_some();
            let skip = match resp.status() {
                StatusCode::OK => start,
                StatusCode::PARTIAL_CONTENT if ranged => 0,
                status => {
                    counter(if status == StatusCode::NOT_FOUND {
                        "not_found"
                    } else {
                        "error"
                    });
                    return Err(UpstreamError::Status {
                        upstream: name,
                        status,
                        retry_after: None,
                    }
                    .into());
                }
            };
            counter("ok");
            // The owner's origin answered 2xx for this digest in this repository: evidence,
            // recorded before any waiter of the fill is released. Bytes alone are not.
            if resp.headers().get(MEMBER_HEADER).is_some_and(|v| v == "1") {
                let (members, upstream, repo, digest) = evidence;
                members.record(&upstream, &repo, &digest);
            }
            let total = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(|l| l.saturating_sub(skip));
            let body = resp.into_body();
            let upstream = name.clone();
            let stream = futures_util::stream::unfold(
                Some((body, skip, upstream)),
                move |state| async move {
                    let (mut body, mut skip, upstream) = state?;
                    loop {
                        let frame = match tokio::time::timeout(idle, body.frame()).await {
                            Err(_) => {
                                let e = UpstreamError::Timeout {
                                    upstream,
                                    what: "peer body idle",
                                };
                                return Some((Err(e.into()), None));
                            }
                            Ok(None) => return None,
                            Ok(Some(Err(e))) => {
                                let e = UpstreamError::Unreachable {
                                    reason: crate::upstream::error_chain(&e),
                                    upstream,
                                };
                                return Some((Err(e.into()), None));
                            }
                            Ok(Some(Ok(f))) => f,
                        };
                        let Ok(mut chunk) = frame.into_data() else {
                            continue;
                        };
                        if skip > 0 {
                            let n = skip.min(chunk.len() as u64);
                            skip -= n;
                            chunk = chunk.slice(n as usize..);
                        }
                        if chunk.is_empty() {
                            continue;
                        }
                        return Some((Ok(chunk), Some((body, skip, upstream))));
                    }
                },
            );
            Ok(Fetched {
                total,
                source: name,
                body: Box::pin(stream),
                from: FetchedFrom::Peer,
            })
        })
    }
}

/// The [`UPSTREAM_AUTH_HEADER`] value for a request made with `auth`: the client's own
/// credential, as the client sent it to berth; nothing for berth's own or no credentials (the
/// owner then uses the same mode's default).
pub fn upstream_auth_header(auth: &UpstreamAuth) -> Option<HeaderValue> {
    let text = match auth {
        UpstreamAuth::Own | UpstreamAuth::Anonymous => return None,
        UpstreamAuth::Bearer(t) => format!("Bearer {}", t.expose()),
        UpstreamAuth::Basic { credentials, .. } => {
            let pair = format!("{}:{}", credentials.username, credentials.password.expose());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        }
    };
    let mut v = HeaderValue::from_str(&text).ok()?;
    v.set_sensitive(true);
    Some(v)
}
