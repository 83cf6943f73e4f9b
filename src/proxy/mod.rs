//! The request path (docs/ARCHITECTURE.md, "Request path"): route, pick the upstream, answer from the cache or fill it.
//! [`App::handle`] is the one entry point the listener calls; errors become responses in
//! [`crate::error::Error::into_response`] only.

mod blobs;
mod conditional;
pub mod events;
pub mod freshness;
mod listing;
mod manifests;
mod prefetch;
pub mod purge;
pub mod range;
mod sources;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};

use crate::auth::{Authorizer, Principal, Realm, Target};
use crate::body::{self, Body};
use crate::cache::Cache;
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::router::{self, Route};
use crate::upstream::{SelectError, Selected, Upstreams};

/// Facts about the client connection the server attaches to each request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnInfo {
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// Header name of the distribution API version.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
/// Its value.
pub const API_VERSION: &str = "registry/2.0";
/// Response header telling how the cache answered: hit, miss or stale.
pub const CACHE_HEADER: &str = "x-berth-cache";

/// How the cache answered a request (a log field, a metric label, the [`CACHE_HEADER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from the cache without asking the origin (or after the origin confirmed it).
    Hit,
    /// Fetched from the origin.
    Miss,
    /// Served from the cache because the origin failed.
    Stale,
    /// Not a cacheable request.
    None,
}

impl CacheResult {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::None => "none",
        }
    }
}

/// Where a response body's bytes come from, for `berth_served_bytes_total{source}`. Handlers
/// attach it to the response with [`sourced`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The memory tier.
    Memory,
    /// The disk tier.
    Disk,
    /// The origin (a miss).
    Upstream,
    /// The shared tier (a miss of this replica's tiers).
    Shared,
    /// Another replica of the cluster (a miss of this replica's tiers).
    Peer,
}

impl Source {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Disk => "disk",
            Source::Upstream => "upstream",
            Source::Shared => "shared",
            Source::Peer => "peer",
        }
    }
}

impl From<crate::cache::Tier> for Source {
    fn from(t: crate::cache::Tier) -> Source {
        match t {
            crate::cache::Tier::Memory => Source::Memory,
            crate::cache::Tier::Disk => Source::Disk,
        }
    }
}

/// Marks where a response's body comes from.
pub(crate) fn sourced(mut resp: Response<Body>, source: Source) -> Response<Body> {
    resp.extensions_mut().insert(source);
    resp
}

/// Everything a request handler needs, shared by all connections.
pub struct App {
    config: Arc<Config>,
    auth: Authorizer,
    cache: Cache,
    upstreams: Upstreams,
    metrics: Arc<Metrics>,
    listings: listing::ListingCache,
    /// Per upstream, when a stale tag was last revalidated while its rate limit was low.
    ratelimit_probes: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    scale: Scale,
    /// Manifest-driven prefetch.
    prefetch: Arc<prefetch::Prefetcher>,
}

/// The scale-out parts of a replica (docs/ARCHITECTURE.md, "Scale-out"); empty for a lone
/// berth.
#[derive(Default, Clone)]
pub struct Scale {
    /// The shared tier on object storage.
    pub shared: Option<Arc<crate::shared::SharedTier>>,
    /// The other replicas and who owns which digest.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

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

// === impl App ===

impl App {
    /// Builds the request path from its parts.
    pub fn new(
        config: Arc<Config>,
        cache: Cache,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        auth: Authorizer,
        scale: Scale,
    ) -> Arc<App> {
        cache.fills().set_observer(metrics.clone());
        let prefetch = Arc::new(prefetch::Prefetcher::new(
            config.prefetch.clone(),
            config.cache.max_concurrent_fills,
            &metrics.prefetch,
        ));
        Arc::new(App {
            config,
            auth,
            cache,
            upstreams,
            metrics,
            listings: listing::ListingCache::new(),
            ratelimit_probes: std::sync::Mutex::default(),
            scale,
            prefetch,
        })
    }

    /// The authorizer (decisions, local users, its clock).
    pub fn auth(&self) -> &Authorizer {
        &self.auth
    }

    /// Waits until no manifest-driven prefetch is running (every fill one started has ended).
    pub async fn prefetch_settled(&self) {
        self.prefetch.settled().await;
    }

    /// The scale-out parts.
    pub fn scale(&self) -> &Scale {
        &self.scale
    }

    /// The cache.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The upstream name and repository there that an image reference's host and repository
    /// map to (as a request with `?ns=<host>` would be routed).
    pub fn resolve(
        &self,
        host: Option<&str>,
        name: crate::oci::RepoName,
    ) -> Result<(String, String), Error> {
        let sel = self
            .upstreams
            .select(host, name)
            .map_err(|e| Error::NameUnknown(e.to_string()))?;
        Ok((sel.upstream.name().to_owned(), sel.name.to_string()))
    }

    /// The upstreams.
    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Figures kept by the cache and upstream clients, for [`Metrics::refresh`].
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        self.prefetch.sweep();
        let disk = self.cache.index().usage();
        let stats = self.cache.fills().stats();
        let failures = stats
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut by_reason: std::collections::BTreeMap<&'static str, u64> = Default::default();
        let mut mismatches: std::collections::BTreeMap<String, u64> = Default::default();
        for ((reason, upstream), n) in failures {
            *by_reason.entry(reason).or_default() += n;
            if reason == "digest_mismatch" && self.upstreams.by_name(&upstream).is_some() {
                *mismatches.entry(upstream).or_default() += n;
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        crate::metrics::Snapshot {
            disk: (
                disk.used + disk.reserved,
                self.cache.index().budget(),
                disk.objects,
                disk.evictions,
            ),
            memory: self.cache.memory().usage(),
            fills_in_flight: self.cache.fills().in_flight() as u64,
            memberships: self.cache.memberships().len(),
            fill_failures: by_reason.into_iter().collect(),
            fill_digest_mismatches: mismatches.into_iter().collect(),
            write_failures: stats.write_failures.load(Relaxed),
            passthrough: stats.pass_through.load(Relaxed),
            corrupt: (
                stats.corrupt_at_rest.load(Relaxed),
                self.cache.corruption().by_scrub.load(Relaxed),
            ),
            scrubbed: (
                self.cache.corruption().scrubbed_objects.load(Relaxed),
                self.cache.corruption().scrubbed_bytes.load(Relaxed),
            ),
            purged: (
                self.cache.purged().tags.load(Relaxed),
                self.cache.purged().manifests.load(Relaxed),
                self.cache.purged().blobs.load(Relaxed),
            ),
            upstreams: self
                .upstreams
                .all()
                .iter()
                .map(|u| {
                    (
                        u.name().to_owned(),
                        u.bytes_received(),
                        u.ratelimit_remaining(),
                    )
                })
                .collect(),
        }
    }

    /// Answers one client request. Never fails: errors become OCI error responses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let start = Instant::now();
        let method = req.method().clone();
        let log = tracing::enabled!(tracing::Level::INFO);
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
            match crate::auth::realm::TokenRequest::read(req).await {
                Ok(tr) => self.auth.token(tr, &self.upstreams).await,
                Err(e) => Err(e),
            }
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
            HeaderName::from_static(API_VERSION_HEADER),
            HeaderValue::from_static(API_VERSION),
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
            .get::<Source>()
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
            tracing::info!(
                method = %method,
                path = %path,
                route = outcome.route,
                upstream = outcome.upstream.as_deref().unwrap_or("-"),
                repository = outcome.repository.as_deref().unwrap_or("-"),
                reference = outcome.reference.as_deref().unwrap_or("-"),
                status = status.as_u16(),
                cache = outcome.cache.as_str(),
                bytes,
                head_ms = elapsed.as_secs_f64() * 1000.0,
                duration_ms = start.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
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
                outcome.reference = outcome.log.then(|| digest.to_string());
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
                let (resp, cache) = self
                    .listing(&sel, listing::Kind::Tags, path, q, head)
                    .await?;
                outcome.cache = cache;
                Ok(resp)
            }
            Route::Referrers { name, digest } => {
                outcome.repository = outcome.log.then(|| name.to_string());
                outcome.reference = outcome.log.then(|| digest.to_string());
                let sel = self.admit(who, name, Target::Listing).await?;
                outcome.upstream = outcome.log.then(|| sel.upstream.name().to_owned());
                let mut q = Vec::new();
                if let Some(v) = router::query_param(query, "artifactType") {
                    q.push(("artifactType", v));
                }
                let path = format!("/v2/{}/referrers/{}", sel.name, digest);
                let (resp, cache) = self
                    .listing(&sel, listing::Kind::Referrers, path, q, head)
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

    fn tag_ttl(&self) -> Duration {
        self.config.cache.tag_ttl
    }

    /// The lifetimes of mutable answers (tag mappings, listings).
    fn bounds(&self) -> freshness::Bounds {
        freshness::Bounds::from_config(&self.config.cache)
    }

    /// The clock lifetimes of mutable answers are measured on.
    fn clock(&self) -> &crate::clock::Clock {
        self.cache.tags().clock()
    }

    fn count_revalidation(&self, what: freshness::Subject, outcome: freshness::Outcome) {
        self.metrics
            .revalidations
            .with_label_values(&[what.as_str(), outcome.as_str()])
            .inc();
    }

    fn count_lookup(&self, kind: &str, tier: &str, hit: bool) {
        self.metrics.count_lookup(kind, tier, hit);
    }

    /// Sends a request to the origin (counted) and requires a 200.
    async fn fetch_ok(
        &self,
        sel: &Selected,
        req: &crate::upstream::UpstreamRequest,
    ) -> Result<Response<hyper::body::Incoming>, crate::upstream::UpstreamError> {
        let resp = sel.upstream.send_counted(&self.metrics, req).await?;
        if resp.status() != StatusCode::OK {
            return Err(sel.upstream.status_error(&resp));
        }
        Ok(resp)
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
