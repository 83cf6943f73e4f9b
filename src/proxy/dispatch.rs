//! Answering one client request (docs/ARCHITECTURE.md, "Request path"): route, admit, hand to
//! the handler, then the headers every answer carries, the request metrics and the request log.

use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};

use super::{conditional, listing, reqlog, App, CacheResult, ConnInfo, ServedFrom, CACHE_HEADER};
use crate::auth::{Principal, Realm, Target};
use crate::body::{self, Body};
use crate::error::Error;
use crate::router::{self, Route};
use crate::upstream::{SelectError, Selected};

/// What the request log records besides method, path and status.
struct Outcome {
    /// Whether the request log is on: the strings below are built only then.
    log: bool,
    route: &'static str,
    upstream: Option<String>,
    repository: Option<String>,
    reference: Option<String>,
    cache: CacheResult,
}

impl App {
    /// Answers one client request. Never fails: errors become OCI error responses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let start = Instant::now();
        let method = req.method().clone();
        let log = reqlog::enabled();
        let path = if log {
            req.uri().path().to_owned()
        } else {
            String::new()
        };
        let head = method == Method::HEAD;
        let mut outcome = Outcome {
            log,
            route: "unknown",
            upstream: None,
            repository: None,
            reference: None,
            cache: CacheResult::None,
        };
        // The route from the request itself: `path` is only kept for the request log.
        let result = if req.uri().path() == "/token" {
            outcome.route = "token";
            // Boxed, as are listings and every origin request: what a hot cache hit's future
            // does not carry, hyper does not copy on each request.
            Box::pin(async {
                let tr = crate::auth::realm::TokenRequest::read(req).await?;
                self.auth.token(tr, &self.upstreams).await
            })
            .await
        } else {
            self.dispatch(&req, &mut outcome).await
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                if let Error::Upstream(crate::upstream::UpstreamError::DigestMismatch {
                    upstream,
                    ..
                }) = &e
                {
                    self.metrics
                        .digest_mismatches
                        .with_label_values(&[upstream.as_str()])
                        .inc();
                }
                e.into_response(head)
            }
        };
        let h = resp.headers_mut();
        h.insert(
            HeaderName::from_static(crate::oci::API_VERSION_HEADER),
            HeaderValue::from_static(crate::oci::API_VERSION),
        );
        if outcome.cache != CacheResult::None {
            h.insert(
                HeaderName::from_static(CACHE_HEADER),
                HeaderValue::from_static(outcome.cache.as_str()),
            );
        }
        if outcome.cache == CacheResult::Stale {
            h.insert(
                header::WARNING,
                HeaderValue::from_static("110 - \"Response is Stale\""),
            );
        }
        let counter = resp
            .extensions()
            .get::<ServedFrom>()
            .map(|source| self.metrics.served_bytes_of(source.as_str()));
        let status = resp.status();
        let elapsed = start.elapsed();
        self.metrics.count_request(
            outcome.route,
            crate::metrics::method_label(&method),
            status.as_str(),
        );
        self.metrics
            .observe_request(outcome.route, outcome.cache.as_str(), elapsed.as_secs_f64());
        // The request log: one event per request, when its body is done (or abandoned), with
        // the bytes actually sent. Never a header value: no credential can reach the log.
        let (parts, b) = resp.into_parts();
        let done = move |bytes: u64| {
            if !outcome.log {
                return;
            }
            reqlog::RequestLine {
                method: &method,
                path: &path,
                route: outcome.route,
                upstream: outcome.upstream.as_deref().unwrap_or("-"),
                repository: outcome.repository.as_deref().unwrap_or("-"),
                reference: outcome.reference.as_deref().unwrap_or("-"),
                status: status.as_u16(),
                cache: outcome.cache.as_str(),
                bytes,
                head_ms: elapsed.as_secs_f64() * 1000.0,
                duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            }
            .emit();
        };
        Response::from_parts(parts, body::counted(b, counter, done))
    }

    async fn dispatch<B>(
        &self,
        req: &Request<B>,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, Error> {
        let route = router::parse(req.uri().path()).inspect_err(|_| {
            outcome.route = router::classify(req.uri().path());
        })?;
        outcome.route = route.as_str();
        let method = req.method();
        let read = method == Method::GET || method == Method::HEAD;
        if matches!(route, Route::Upload) || !read {
            return Err(Error::Unsupported(format!(
                "{method} is not supported: berth is a pull-through cache (pull only)"
            )));
        }
        let head = method == Method::HEAD;
        let query = req.uri().query();
        let ns = router::query_param(query, "ns");
        let principal =
            Principal::from_headers(req.headers()).map_err(|e| Error::BadRequest(e.to_string()))?;
        let tls = req.extensions().get::<ConnInfo>().is_some_and(|c| c.tls);
        let realm = Realm::from_request(
            self.config.server.external_url.as_deref(),
            tls,
            req.headers(),
            req.uri().authority().map(|a| a.as_str()),
        );
        let who = (&principal, &realm, ns.as_deref());
        match route {
            Route::Base => {
                match self.upstreams.for_base(ns.as_deref()) {
                    Some(u) => self.auth.admit_base(u, &principal, &realm).await?,
                    // No default upstream: credentials are checked per repository, on the pull.
                    None if ns.is_none() => {
                        self.auth
                            .admit_base_unrouted(self.upstreams.all(), &principal, &realm)?
                    }
                    None => {}
                }
                Ok(json_response(
                    StatusCode::OK,
                    Bytes::from_static(b"{}"),
                    head,
                ))
            }
            Route::Catalog => Err(Error::NotFound(
                "the catalog is not offered by a pull-through cache".into(),
            )),
            Route::Upload => unreachable!("refused above"),
            Route::Manifest { name, reference } => {
                outcome.repository = outcome.log.then(|| name.to_string());
                outcome.reference = outcome.log.then(|| reference.to_string());
                let sel = self.admit(who, name, Target::Manifest(&reference)).await?;
                outcome.upstream = outcome.log.then(|| sel.upstream.name().to_owned());
                let accept = accept_values(req.headers());
                let by_digest = matches!(reference, crate::oci::Reference::Digest(_));
                // Authorized above (and by the handler's membership checks): only now may the
                // client's If-None-Match turn the answer into a 304.
                let (mut resp, cache) = self.manifest(&sel, reference, accept, head).await?;
                outcome.cache = cache;
                if by_digest {
                    conditional::immutable(&mut resp);
                }
                Ok(conditional::not_modified_if_held(req.headers(), resp))
            }
            Route::Blob { name, digest } => {
                outcome.repository = outcome.log.then(|| name.to_string());
                outcome.reference = outcome.log.then(|| digest.as_str().to_owned());
                let sel = self.admit(who, name, Target::Blob(&digest)).await?;
                outcome.upstream = outcome.log.then(|| sel.upstream.name().to_owned());
                let range = req
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // RFC 9111 `only-if-cached`: answer from the cache or 504, never ask the origin
                // (`berth warm` checks what it can skip this way).
                let only_if_cached = req
                    .headers()
                    .get_all(header::CACHE_CONTROL)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| {
                        v.split(',')
                            .any(|d| d.trim().eq_ignore_ascii_case("only-if-cached"))
                    });
                if only_if_cached
                    && head
                    && !matches!(self.cache.blob_len(&digest).await, Ok(Some(_)))
                {
                    return Err(Error::NotCached);
                }
                let (mut resp, cache) = self.blob(&sel, digest, range.as_deref(), head).await?;
                outcome.cache = cache;
                conditional::immutable(&mut resp);
                Ok(resp)
            }
            Route::Tags { name } => {
                outcome.repository = outcome.log.then(|| name.to_string());
                let sel = self.admit(who, name, Target::Listing).await?;
                outcome.upstream = outcome.log.then(|| sel.upstream.name().to_owned());
                let mut q = Vec::new();
                for k in ["n", "last"] {
                    if let Some(v) = router::query_param(query, k) {
                        q.push((k, v));
                    }
                }
                let path = format!("/v2/{}/tags/list", sel.name);
                let (resp, cache) =
                    Box::pin(self.listing(&sel, listing::ListingKind::Tags, path, q, head)).await?;
                outcome.cache = cache;
                Ok(resp)
            }
            Route::Referrers { name, digest } => {
                outcome.repository = outcome.log.then(|| name.to_string());
                outcome.reference = outcome.log.then(|| digest.as_str().to_owned());
                let sel = self.admit(who, name, Target::Listing).await?;
                outcome.upstream = outcome.log.then(|| sel.upstream.name().to_owned());
                let mut q = Vec::new();
                if let Some(v) = router::query_param(query, "artifactType") {
                    q.push(("artifactType", v));
                }
                let path = format!("/v2/{}/referrers/{}", sel.name, digest);
                let (resp, cache) =
                    Box::pin(self.listing(&sel, listing::ListingKind::Referrers, path, q, head))
                        .await?;
                outcome.cache = cache;
                Ok(resp)
            }
        }
    }

    /// Picks the upstream for `name` and asks the authorizer whether this client may read
    /// `target` there.
    async fn admit(
        &self,
        (principal, realm, ns): (&Principal, &Realm<'_>, Option<&str>),
        name: crate::oci::RepoName,
        target: Target<'_>,
    ) -> Result<Selected, Error> {
        let visible = name.to_string();
        let mut sel = self
            .upstreams
            .select(ns, name)
            .map_err(|e: SelectError| Error::NameUnknown(e.to_string()))?;
        self.auth
            .admit(&mut sel, principal, target, realm, Some(&visible))
            .await?;
        Ok(sel)
    }
}

/// Every Accept value the client sent, across header lines (skopeo sends several).
fn accept_values(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

fn json_response(status: StatusCode, bytes: Bytes, head: bool) -> Response<Body> {
    let len = bytes.len();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .body(if head {
            body::empty()
        } else {
            body::full(bytes)
        })
        .expect("static headers are valid")
}
