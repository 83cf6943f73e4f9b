//! One origin registry: a pooled hyper client over rustls, the token dance, redirects without
//! credentials, and the connect / first-byte / idle timeouts (docs/ARCHITECTURE.md, "Upstream client").

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::challenge;
use super::token::{self, TokenCache};
use super::{error_chain, HttpClient, UpstreamError, USER_AGENT};
use crate::config::{Credentials, UpstreamConfig};
use crate::metrics::{method_label, Metrics};

/// Largest read buffer of an HTTP/1 origin connection (and so the largest body chunk).
const UPSTREAM_READ_BUF: usize = 128 * 1024;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 5;

/// Why an upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configured CA file could not be read or parsed.
    #[error("upstream {upstream}: ca_file {path}: {reason}")]
    CaFile {
        /// Upstream name.
        upstream: String,
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// A configured origin and the client that talks to it.
pub struct Upstream {
    config: UpstreamConfig,
    client: HttpClient,
    tokens: TokenCache,
    received: AtomicU64,
    ratelimit: AtomicI64,
}

/// `ratelimit` before the origin ever sent a `ratelimit-remaining` header.
const RATELIMIT_UNKNOWN: i64 = i64::MIN;

/// What [`Upstream::send_counted`] should ask for.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// GET or HEAD.
    pub method: Method,
    /// Path and query at the origin, starting with `/v2/`.
    pub path_and_query: String,
    /// Headers to send (Accept, Range); never the client's Authorization.
    pub headers: HeaderMap,
    /// Token scope, such as `repository:library/alpine:pull`.
    pub scope: String,
    /// Whose credentials the request is made with.
    pub auth: UpstreamAuth,
}

/// A request to the origin's token service on behalf of a client (`/token` forwarding): the
/// realm the origin's challenge named, with the client's parameters.
#[derive(Debug, Clone)]
pub struct TokenServiceRequest {
    /// GET (parameters in the query) or POST (a form).
    pub method: Method,
    /// The realm's absolute URL, with the query of a GET.
    pub uri: Uri,
    /// Headers to send (Content-Type of a form).
    pub headers: HeaderMap,
    /// The client's `Authorization`, sent to the realm's host only, never after a redirect to
    /// another host.
    pub authorization: Option<HeaderValue>,
    /// The form of a POST; empty for a GET.
    pub body: Bytes,
}

/// Whose credentials a request to the origin carries (docs/ARCHITECTURE.md, "Authorization").
#[derive(Debug, Clone)]
pub enum UpstreamAuth {
    /// berth's own configured credentials (anonymous without them).
    Own,
    /// No credentials, even if berth has some (a `passthrough` client without credentials).
    Anonymous,
    /// The client's bearer token for the origin, sent as is.
    Bearer(crate::secret::Secret),
    /// The client's username and password: berth does the token dance with them; tokens are
    /// cached under `key` (a hash of the credential).
    Basic {
        /// Hash of the credential.
        key: String,
        /// The client's credentials.
        credentials: Credentials,
    },
}

// === impl Upstream ===

impl Upstream {
    /// Builds the client: webpki roots plus the configured CA, HTTP/2 when offered, TCP_NODELAY.
    pub fn new(config: UpstreamConfig) -> Result<Arc<Upstream>, BuildError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_file {
            let ca_err = |reason: String| BuildError::CaFile {
                upstream: config.name.clone(),
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            let mut n = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| ca_err(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(ca_err("no PEM certificates found".into()));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // berth's own resolver: a static binary in an empty image has no glibc NSS.
        let mut http = HttpConnector::new_with_resolver(super::dns::Resolver::default());
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            // A body chunk pins the read buffer it was cut from until the fill has written and
            // hashed it; hyper's default (~400 KiB) let 32 concurrent fills hold over 100 MiB.
            .http1_max_buf_size(UPSTREAM_READ_BUF)
            .build(https);
        Ok(Arc::new(Upstream {
            config,
            client,
            tokens: TokenCache::default(),
            received: AtomicU64::new(0),
            ratelimit: AtomicI64::new(RATELIMIT_UNKNOWN),
        }))
    }

    /// The upstream's configured name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Body bytes received from this origin so far.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The last `ratelimit-remaining` the origin reported (Docker Hub: `"76;w=21600"`).
    pub fn ratelimit_remaining(&self) -> Option<i64> {
        Some(self.ratelimit.load(Ordering::Relaxed)).filter(|&v| v != RATELIMIT_UNKNOWN)
    }

    fn note_ratelimit(&self, headers: &http::HeaderMap) {
        let remaining = headers
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|v| v.trim().parse::<i64>().ok());
        if let Some(r) = remaining {
            self.ratelimit.store(r, Ordering::Relaxed);
        }
    }

    /// Sends a request to the origin, counting it in `berth_upstream_requests_total` and
    /// `berth_upstream_request_duration_seconds`. Handles the auth challenge (one retry with a
    /// token or Basic credentials) and follows redirects for GET / HEAD, dropping Authorization
    /// when the target is another host. Returns the final answer whatever its status.
    pub async fn send_counted(
        &self,
        metrics: &Metrics,
        req: &UpstreamRequest,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let started = Instant::now();
        // Boxed: an origin request's future is about 2 KB, and every handler that may make
        // one would otherwise carry it (and copy it) on each request, the cache hits too.
        let resp = Box::pin(self.send(req)).await;
        self.count(
            metrics,
            &req.method,
            resp.as_ref().map(|r| r.status()),
            started,
        );
        resp
    }

    /// Sends a client's request to the origin's token service and reads the answer (at most
    /// `limit` bytes): counted, redirects of a GET followed as for any origin request, the
    /// first-byte timeout on the answer and again on its body. Every failure is a
    /// [`UpstreamError::Token`].
    pub async fn send_token_request(
        &self,
        metrics: &Metrics,
        req: &TokenServiceRequest,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), UpstreamError> {
        let auth = req.authorization.clone().map(|mut a| {
            a.set_sensitive(true);
            a
        });
        let started = Instant::now();
        let resp = Box::pin(self.follow(
            &req.method,
            req.uri.clone(),
            &req.headers,
            auth.as_ref(),
            req.body.clone(),
        ))
        .await;
        self.count(
            metrics,
            &req.method,
            resp.as_ref().map(|r| r.status()),
            started,
        );
        let failed = |reason: String| UpstreamError::Token {
            upstream: self.config.name.clone(),
            reason,
        };
        let resp = resp.map_err(|e| match e {
            UpstreamError::Timeout { .. } => failed("timed out".into()),
            UpstreamError::Unreachable { reason, .. } | UpstreamError::Invalid { reason, .. } => {
                failed(reason)
            }
            other => other,
        })?;
        let status = resp.status();
        let raw = tokio::time::timeout(
            self.config.first_byte_timeout,
            Limited::new(resp.into_body(), limit).collect(),
        )
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(format!("reading the answer: {e}")))?
        .to_bytes();
        Ok((status, raw))
    }

    /// Counts one origin request (its final status, or `error`) and its time.
    fn count(
        &self,
        metrics: &Metrics,
        method: &Method,
        status: Result<StatusCode, &UpstreamError>,
        started: Instant,
    ) {
        let status = match status {
            Ok(s) => s.as_str().to_owned(),
            Err(_) => "error".to_owned(),
        };
        metrics
            .upstream_requests
            .with_label_values(&[self.name(), method_label(method), &status])
            .inc();
        metrics
            .upstream_duration
            .with_label_values(&[self.name()])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sends a request to the origin: see [`Upstream::send_counted`].
    async fn send(&self, req: &UpstreamRequest) -> Result<Response<Incoming>, UpstreamError> {
        if self.config.offline {
            return Err(UpstreamError::Offline {
                upstream: self.config.name.clone(),
            });
        }
        let origin = self.origin_uri(&req.path_and_query)?;
        let (token_key, credentials) = match &req.auth {
            UpstreamAuth::Own => (req.scope.clone(), self.config.credentials.as_ref()),
            UpstreamAuth::Anonymous => (format!("anonymous\0{}", req.scope), None),
            UpstreamAuth::Basic { key, credentials } => {
                (format!("{key}\0{}", req.scope), Some(credentials))
            }
            UpstreamAuth::Bearer(token) => {
                // The client's own token: sent as is, never swapped for another credential.
                let auth = self.authorization(&format!("Bearer {}", token.expose()))?;
                return self.follow_request(req, origin, Some(&auth)).await;
            }
        };
        let auth = self
            .tokens
            .get(&token_key)
            .map(|t| format!("Bearer {}", t.expose()));
        let header = auth.as_deref().map(|a| self.authorization(a)).transpose()?;
        let resp = self
            .follow_request(req, origin.clone(), header.as_ref())
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenges = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(challenge::parse)
            .collect::<Vec<_>>();
        let new_auth = if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let scope = bearer.param("scope").unwrap_or(&req.scope).to_owned();
            let failed = auth.as_deref().and_then(|a| a.strip_prefix("Bearer "));
            let tok = self
                .tokens
                .get_or_fetch(&token_key, failed, || {
                    token::fetch(
                        &self.client,
                        &self.config.name,
                        bearer,
                        &scope,
                        credentials,
                        self.config.first_byte_timeout,
                    )
                })
                .await?;
            Some(format!("Bearer {}", tok.expose()))
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            credentials.map(basic_auth)
        } else {
            None
        };
        match new_auth {
            Some(a) if Some(&a) != auth.as_ref() => {
                drop(resp);
                let header = self.authorization(&a)?;
                self.follow_request(req, origin, Some(&header)).await
            }
            _ => Ok(resp),
        }
    }

    /// The origin's Bearer challenge (realm and service of its token service), from an
    /// anonymous `GET /v2/`, or with `repo` (an origin repository name) an anonymous `HEAD` of
    /// its `latest` manifest: origins that answer `/v2/` to anyone may still ask per
    /// repository (a regional berth routing by prefix does). `None` when the origin asks for
    /// no authentication there.
    pub async fn discover_challenge(
        &self,
        repo: Option<&str>,
    ) -> Result<Option<challenge::Challenge>, UpstreamError> {
        if self.config.offline {
            return Err(UpstreamError::Offline {
                upstream: self.config.name.clone(),
            });
        }
        let (method, path_and_query) = match repo {
            None => (Method::GET, "/v2/".to_owned()),
            Some(r) => (Method::HEAD, format!("/v2/{r}/manifests/latest")),
        };
        let req = UpstreamRequest {
            method,
            path_and_query,
            headers: http::HeaderMap::new(),
            scope: String::new(),
            auth: UpstreamAuth::Bearer(crate::secret::Secret::new(String::new())),
        };
        let origin = self.origin_uri(&req.path_and_query)?;
        let resp = self.follow_request(&req, origin, None).await?;
        let found = resp
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(challenge::parse)
            .find(|c| c.scheme == "bearer");
        // An origin failing is not an origin that asks for no authentication (that answer is
        // remembered, and would hand out tokens worth nothing).
        let status = resp.status();
        if found.is_none() && (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
        {
            return Err(self.status_error(&resp));
        }
        Ok(found)
    }

    fn origin_uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        let base = &self.config.url;
        Uri::builder()
            .scheme(base.scheme_str().unwrap_or("https"))
            .authority(base.authority().map(|a| a.as_str()).unwrap_or(""))
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| UpstreamError::Invalid {
                upstream: self.config.name.clone(),
                reason: format!("bad request URI: {e}"),
            })
    }

    /// An `Authorization` value, marked sensitive (kept out of HTTP/2 header compression).
    fn authorization(&self, value: &str) -> Result<HeaderValue, UpstreamError> {
        let mut v = HeaderValue::from_str(value).map_err(|_| UpstreamError::Invalid {
            upstream: self.config.name.clone(),
            reason: "token is not a valid header value".into(),
        })?;
        v.set_sensitive(true);
        Ok(v)
    }

    /// [`Upstream::follow`] for a registry API request (no body).
    async fn follow_request(
        &self,
        req: &UpstreamRequest,
        uri: Uri,
        auth: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.follow(&req.method, uri, &req.headers, auth, Bytes::new())
            .await
    }

    /// Sends one request, following redirects of a GET or HEAD (at most [`MAX_REDIRECTS`]);
    /// `auth` goes only to the host of the first URI. Each hop has the first-byte timeout.
    async fn follow(
        &self,
        method: &Method,
        mut uri: Uri,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let first_authority = uri.authority().cloned();
        let origin_authority = self.config.url.authority();
        for _ in 0..=MAX_REDIRECTS {
            let same_host = uri.authority() == first_authority.as_ref();
            let mut b = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(header::USER_AGENT, USER_AGENT);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            if let (true, Some(a)) = (same_host, auth) {
                b = b.header(header::AUTHORIZATION, a.clone());
            }
            let request = b
                .body(Full::new(body.clone()))
                .map_err(|e| UpstreamError::Invalid {
                    upstream: self.config.name.clone(),
                    reason: e.to_string(),
                })?;
            let resp =
                tokio::time::timeout(self.config.first_byte_timeout, self.client.request(request))
                    .await
                    .map_err(|_| UpstreamError::Timeout {
                        upstream: self.config.name.clone(),
                        what: "first byte",
                    })?
                    .map_err(|e| UpstreamError::Unreachable {
                        upstream: self.config.name.clone(),
                        reason: error_chain(&e),
                    })?;
            let redirect = matches!(
                resp.status(),
                StatusCode::MOVED_PERMANENTLY
                    | StatusCode::FOUND
                    | StatusCode::SEE_OTHER
                    | StatusCode::TEMPORARY_REDIRECT
                    | StatusCode::PERMANENT_REDIRECT
            );
            if uri.authority() == origin_authority {
                self.note_ratelimit(resp.headers());
            }
            if !redirect || !(method == Method::GET || method == Method::HEAD) {
                return Ok(resp);
            }
            let Some(next) = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| resolve(&uri, l))
            else {
                return Ok(resp);
            };
            uri = next;
        }
        Err(UpstreamError::Invalid {
            upstream: self.config.name.clone(),
            reason: "too many redirects".into(),
        })
    }

    /// Next chunk of an origin body, bounded by the idle timeout. `Ok(None)` at the end.
    pub async fn next_chunk(&self, body: &mut Incoming) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let frame = tokio::time::timeout(self.config.idle_timeout, body.frame())
                .await
                .map_err(|_| UpstreamError::Timeout {
                    upstream: self.config.name.clone(),
                    what: "idle body",
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(UpstreamError::Unreachable {
                        upstream: self.config.name.clone(),
                        reason: format!("body: {}", error_chain(&e)),
                    })
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if !data.is_empty() {
                            self.received
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }

    /// Reads a whole (small) body, refusing more than `limit` bytes.
    pub async fn collect(&self, mut body: Incoming, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = self.next_chunk(&mut body).await? {
            if buf.len() + chunk.len() > limit {
                return Err(UpstreamError::Invalid {
                    upstream: self.config.name.clone(),
                    reason: format!("answer larger than {limit} bytes"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// The error for an answer with status `status`.
    pub fn status_error(&self, resp: &Response<Incoming>) -> UpstreamError {
        UpstreamError::Status {
            upstream: self.config.name.clone(),
            status: resp.status(),
            retry_after: resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

fn basic_auth(c: &Credentials) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        c.username,
        c.password.expose()
    ));
    format!("Basic {b}")
}

/// Resolves a `Location` header against the URI it came from.
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().ok();
    }
    if location.starts_with('/') {
        return Uri::builder()
            .scheme(base.scheme_str()?)
            .authority(base.authority()?.as_str())
            .path_and_query(location)
            .build()
            .ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_locations() {
        let base: Uri = "https://reg.example/v2/a/blobs/x".parse().unwrap();
        assert_eq!(
            resolve(&base, "/v2/b").unwrap().to_string(),
            "https://reg.example/v2/b"
        );
        assert_eq!(
            resolve(&base, "https://s3.example/obj?sig=1")
                .unwrap()
                .to_string(),
            "https://s3.example/obj?sig=1"
        );
        assert!(resolve(&base, "relative").is_none());
    }
}
