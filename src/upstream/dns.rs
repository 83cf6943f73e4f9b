//! Name resolution for origin connections without glibc's NSS.
//!
//! The container image ships a statically linked binary in an empty (`scratch`) image, where
//! glibc's `getaddrinfo` cannot load its NSS modules. berth therefore resolves origin host names
//! itself, with hickory's stub resolver: `/etc/hosts` first, then the name servers of
//! `/etc/resolv.conf`, the two files every container runtime and Kubernetes provide. IP literals
//! never reach the resolver (hyper's connector parses them first).
//!
//! Architecture: docs/ARCHITECTURE.md, "Upstream client".

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use hickory_resolver::config::{ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use hyper_util::client::legacy::connect::dns::Name;

/// Why a host name did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}: {reason}")]
pub struct ResolveError {
    /// The host name asked for.
    host: String,
    /// The resolver's answer.
    reason: String,
}

/// The resolver handed to hyper's connector; cheap to clone, one shared stub resolver behind it.
#[derive(Clone, Default)]
pub struct Resolver {
    _private: (),
}

/// One resolver per process, built on first use (inside the runtime) so every upstream shares
/// its cache.
fn shared() -> &'static TokioResolver {
    static RESOLVER: OnceLock<TokioResolver> = OnceLock::new();
    RESOLVER.get_or_init(|| {
        let builder = match TokioResolver::builder_tokio() {
            Ok(builder) => builder,
            Err(e) => {
                // No readable /etc/resolv.conf: /etc/hosts and IP literals still work.
                tracing::warn!(error = %e, "no DNS configuration; resolving from /etc/hosts only");
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(Vec::new()),
                    TokioRuntimeProvider::default(),
                )
            }
        };
        let mut builder = builder;
        builder.options_mut().use_hosts_file = ResolveHosts::Always;
        builder
            .build()
            .expect("a resolver without DNSSEC or encrypted transports always builds")
    })
}

// === impl Resolver ===

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ResolveError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ResolveError>> {
        Poll::Ready(Ok(()))
    }

    /// Resolves `name` to its addresses (port 0: the connector sets the port).
    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let lookup = shared()
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| ResolveError {
                    host: host.clone(),
                    reason: e.to_string(),
                })?;
            let addrs: Vec<SocketAddr> = lookup.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            if addrs.is_empty() {
                return Err(ResolveError {
                    host,
                    reason: "no addresses".into(),
                });
            }
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_service::Service;

    #[tokio::test]
    async fn resolves_localhost_from_the_hosts_file() {
        let mut r = Resolver::default();
        let name: Name = "localhost".parse().expect("valid name");
        let addrs: Vec<_> = r.call(name).await.expect("localhost resolves").collect();
        assert!(
            addrs.iter().any(|a| a.ip().is_loopback()),
            "localhost resolved to {addrs:?}"
        );
    }

    #[tokio::test]
    async fn an_unknown_name_is_an_error_that_names_it() {
        let mut r = Resolver::default();
        let name: Name = "no-such-host.invalid".parse().expect("valid name");
        let err = r.call(name).await.expect_err(".invalid never resolves");
        assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
    }
}
