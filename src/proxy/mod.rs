//! The request path (docs/ARCHITECTURE.md, "Request path"): route, pick the upstream, answer
//! from the cache or fill it. [`App::handle`] (in `dispatch.rs`) is the one entry point the
//! listener calls; errors become responses in [`crate::error::Error::into_response`] only.
//!
//! This file holds the [`App`] every handler shares and the vocabulary of an answer
//! ([`CacheResult`], [`ServedFrom`]); each kind of request has its own file.

mod blobs;
mod conditional;
mod dispatch;
pub mod events;
pub mod freshness;
mod listing;
mod manifests;
mod observe;
pub mod peer;
mod prefetch;
pub mod purge;
pub mod range;
pub mod reqlog;
mod snapshot;
mod sources;

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};

use crate::auth::Authorizer;
use crate::body::Body;
use crate::cache::fill::FetchedFrom;
use crate::cache::{Cache, Tier};
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::upstream::{Selected, Upstreams};

/// Facts about the client connection the server attaches to each request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnInfo {
    /// Whether the connection is TLS.
    pub tls: bool,
}

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

/// Where a response body's bytes came from, for `berth_served_bytes_total{source}`: one of
/// this replica's cache tiers ([`Tier`]: a hit), or where the fill fetched them
/// ([`FetchedFrom`]: a miss). Handlers attach it to the response with `sourced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedFrom {
    /// A tier of this replica's cache.
    Tier(Tier),
    /// Fetched on a miss.
    Fetched(FetchedFrom),
}

impl ServedFrom {
    /// Label value (a fetch from the origin is `upstream`, as the label has always said).
    pub fn as_str(self) -> &'static str {
        match self {
            ServedFrom::Tier(t) => t.as_str(),
            ServedFrom::Fetched(FetchedFrom::Origin) => "upstream",
            ServedFrom::Fetched(f) => f.as_str(),
        }
    }
}

impl From<Tier> for ServedFrom {
    fn from(t: Tier) -> ServedFrom {
        ServedFrom::Tier(t)
    }
}

/// Marks where a response's body comes from.
pub(crate) fn sourced(mut resp: Response<Body>, source: ServedFrom) -> Response<Body> {
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

    /// The configuration berth runs with.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
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
