//! The origins berth pulls from (docs/ARCHITECTURE.md, "Upstreams" and "Upstream client"): one [`Upstream`] client per configured origin,
//! and [`Upstreams::select`], which picks the origin for a request.

pub mod challenge;
mod client;
pub mod dns;
mod error;
mod token;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

pub use client::{BuildError, TokenServiceRequest, Upstream, UpstreamAuth, UpstreamRequest};
pub use dns::{ResolveError, Resolver};
pub use error::UpstreamError;
pub use token::{parse_token_response, TokenCache};

use crate::config::UpstreamConfig;
use crate::oci::RepoName;

/// The pooled client type shared by an upstream and its token fetches.
type HttpClient =
    hyper_util::client::legacy::Client<HttpsConnector<HttpConnector<Resolver>>, Full<Bytes>>;

/// User-Agent sent to origins.
pub const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));

/// Renders an error and its sources on one line (hyper's top-level messages are terse).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Why no upstream could be chosen for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// `?ns=` names a registry that is not configured (berth is never an open proxy).
    #[error("registry {0:?} is not mirrored here")]
    UnknownNamespace(String),
    /// No prefix matched and there is no default upstream.
    #[error(
        "no upstream for repository {0:?}: prefix it with an upstream name or configure a default"
    )]
    NoDefault(String),
    /// The upstream's repository prefix (a path in its URL) makes the name too long.
    #[error("repository {0:?} with the upstream's repository prefix is not a valid name")]
    Prefixed(String),
}

/// All configured upstreams.
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    default: Option<usize>,
}

/// The outcome of [`Upstreams::select`]: which origin, and the repository name there.
#[derive(Clone)]
pub struct Selected {
    /// The origin.
    pub upstream: Arc<Upstream>,
    /// Repository name at the origin (the client's prefix removed, `library/` added for Docker
    /// Hub, the upstream's own repository prefix added).
    pub name: RepoName,
    /// The path prefix the client used, if it routed by prefix.
    pub prefix: Option<String>,
    /// Whose credentials requests to the origin carry; set by the authorizer.
    pub auth: UpstreamAuth,
}

impl Upstreams {
    /// Builds a client for every configured upstream.
    pub fn new(configs: &[UpstreamConfig]) -> Result<Upstreams, BuildError> {
        let list = configs
            .iter()
            .cloned()
            .map(Upstream::new)
            .collect::<Result<Vec<_>, _>>()?;
        let default = configs.iter().position(|c| c.default);
        Ok(Upstreams { list, default })
    }

    /// Every upstream, in config order.
    pub fn all(&self) -> &[Arc<Upstream>] {
        &self.list
    }

    /// The default upstream, if one is configured.
    pub fn default_upstream(&self) -> Option<&Arc<Upstream>> {
        self.default.map(|i| &self.list[i])
    }

    /// The upstream a `/v2/` request concerns: the one `ns` names, else the default.
    pub fn for_base(&self, ns: Option<&str>) -> Option<&Arc<Upstream>> {
        match ns {
            Some(ns) => {
                let ns = ns.to_ascii_lowercase();
                self.list.iter().find(|u| u.config().aliases.contains(&ns))
            }
            None => self.default_upstream(),
        }
    }

    /// Upstream by name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.list.iter().find(|u| u.name() == name)
    }

    /// Picks the upstream: `ns` (already percent-decoded) against aliases, then a path prefix
    /// naming an upstream, then the default (docs/ARCHITECTURE.md, "Upstreams").
    pub fn select(&self, ns: Option<&str>, name: RepoName) -> Result<Selected, SelectError> {
        let (upstream, name, prefix) = if let Some(ns) = ns {
            let ns = ns.to_ascii_lowercase();
            let u = self
                .list
                .iter()
                .find(|u| u.config().aliases.contains(&ns))
                .ok_or_else(|| SelectError::UnknownNamespace(ns.chars().take(253).collect()))?;
            (u.clone(), name, None)
        } else if let Some((u, rest)) = self.by_prefix(&name) {
            let prefix = u.name().to_owned();
            (u.clone(), rest, Some(prefix))
        } else {
            let i = self
                .default
                .ok_or_else(|| SelectError::NoDefault(name.to_string()))?;
            (self.list[i].clone(), name, None)
        };
        let name = if upstream.config().docker_hub && name.components() == 1 {
            name.with_library_prefix()
        } else {
            name
        };
        let name = match &upstream.config().repository_prefix {
            Some(p) => format!("{p}/{name}")
                .parse()
                .map_err(|_| SelectError::Prefixed(name.to_string()))?,
            None => name,
        };
        Ok(Selected {
            upstream,
            name,
            prefix,
            auth: UpstreamAuth::Own,
        })
    }

    fn by_prefix(&self, name: &RepoName) -> Option<(&Arc<Upstream>, RepoName)> {
        let (first, rest) = name.as_str().split_once('/')?;
        let u = self.list.iter().find(|u| u.name() == first)?;
        Some((u, rest.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path in an upstream's URL is a repository prefix at the origin, added after the
    /// client's prefix is removed and Docker Hub's `library/` added.
    #[test]
    fn the_url_path_prefixes_repository_names() {
        let c = crate::config::Config::from_toml(
            "[[upstream]]\nname = \"hub\"\nurl = \"http://region:5000/docker.io\"\naliases = [\"docker.io\"]\ndefault = true\n\
             [[upstream]]\nname = \"own\"\nurl = \"http://region:5000/origin/team\"\n",
        )
        .unwrap();
        let ups = Upstreams::new(&c.upstreams).unwrap();
        let name = |s: &str| s.parse::<RepoName>().unwrap();
        let sel = ups.select(None, name("alpine")).unwrap();
        assert_eq!(sel.name.as_str(), "docker.io/library/alpine");
        let sel = ups.select(Some("docker.io"), name("org/app")).unwrap();
        assert_eq!(sel.name.as_str(), "docker.io/org/app");
        let sel = ups.select(None, name("own/app")).unwrap();
        assert_eq!(
            (sel.upstream.name(), sel.name.as_str()),
            ("own", "origin/team/app")
        );
        assert_eq!(sel.prefix.as_deref(), Some("own"));
        let long = format!("own/{}", "a".repeat(250));
        assert!(matches!(
            ups.select(None, name(&long)),
            Err(SelectError::Prefixed(_))
        ));
    }
}
