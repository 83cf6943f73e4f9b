//! The object store's HTTP client: berth's own hyper client (rustls on ring, web PKI roots
//! compiled in, berth's resolver), so the shared tier needs no second TLS stack and works in the
//! static container image, which has neither CA files nor glibc NSS.
//!
//! Architecture: docs/ARCHITECTURE.md, "Shared tier".

use std::time::Duration;

use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::ClientOptions;

use crate::upstream::dns::Resolver;

/// Builds [`HttpClient`]s on hyper for the object store's builders.
#[derive(Debug, Clone)]
pub struct Connector {
    /// Longest wait for an answer's head (and for a connection).
    pub timeout: Duration,
}

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| object_store::Error::Generic {
            store: "shared",
            source: Box::new(e),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut tcp = TcpConnector::new_with_resolver(Resolver::default());
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(self.timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(16)
            .build(https);
        Ok(HttpClient::new(Service {
            client,
            timeout: self.timeout,
        }))
    }
}

type Hyper = Client<HttpsConnector<TcpConnector<Resolver>>, object_store::client::HttpRequestBody>;

struct Service {
    client: Hyper,
    timeout: Duration,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[async_trait::async_trait]
impl HttpService for Service {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        // A request body is sent before the answer's head: allow it time at a modest 1 MiB/s
        // on top of the timeout, so a large part is not cut off while a dead store still is.
        let len = req.body().content_length() as u64;
        let wait = self.timeout + Duration::from_secs(len >> 20);
        let resp = match tokio::time::timeout(wait, self.client.request(req)).await {
            Err(_) => {
                return Err(HttpError::new(
                    HttpErrorKind::Timeout,
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "object store timed out"),
                ))
            }
            Ok(Err(e)) => {
                let kind = if e.is_connect() {
                    HttpErrorKind::Connect
                } else {
                    HttpErrorKind::Request
                };
                return Err(HttpError::new(kind, e));
            }
            Ok(Ok(r)) => r,
        };
        Ok(resp.map(|body| {
            HttpResponseBody::new(body.map_err(|e| {
                let kind = if e.is_timeout() {
                    HttpErrorKind::Timeout
                } else {
                    HttpErrorKind::Interrupted
                };
                HttpError::new(kind, e)
            }))
        }))
    }
}
