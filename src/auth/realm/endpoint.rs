//! The `/token` endpoint (docs/ARCHITECTURE.md, "Authorization"): reads a token request and
//! routes it to an upstream by its `service`, else by its scope, as repository requests are
//! routed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};

use super::scope::scope_repository;
use super::MAX_TOKEN_BODY;
use crate::auth::{Authorizer, Principal};
use crate::body::Body;
use crate::config::AuthMode;
use crate::error::Error;
use crate::oci::RepoName;
use crate::upstream::{Upstream, Upstreams};

/// Longest a client may take to send a token request's body (a form of a few hundred bytes).
const TOKEN_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A token request as a client sent it, method and parameters.
pub struct TokenRequest {
    /// GET or POST.
    pub method: Method,
    /// Query (GET) or form (POST) parameters, decoded, in order.
    pub params: Vec<(String, String)>,
    /// The client's `Authorization` header.
    pub principal: Principal,
    /// The raw `Authorization` header, forwarded as is to an origin's token service.
    pub authorization: Option<HeaderValue>,
}

/// Decodes `/token` parameters (a query string or an `x-www-form-urlencoded` body): `+` is a
/// space, `%XX` escapes are decoded, bad UTF-8 is replaced, empty pairs are skipped, repeated
/// keys are kept in order. Public so that it can be fuzzed.
pub fn decode_pairs(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}

/// Encodes parameters for an origin's token service (`application/x-www-form-urlencoded`, as
/// Docker and containerd send them); [`decode_pairs`] reads them back unchanged.
pub fn encode_pairs(pairs: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

// === impl TokenRequest ===

impl TokenRequest {
    /// Reads a `/token` request (the form body of a POST, at most 64 KiB).
    pub async fn read<B>(req: Request<B>) -> Result<TokenRequest, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, b) = req.into_parts();
        let principal = Principal::from_headers(&parts.headers)
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let mut params = decode_pairs(parts.uri.query().unwrap_or(""));
        if parts.method == Method::POST {
            let raw = tokio::time::timeout(
                TOKEN_BODY_TIMEOUT,
                Limited::new(b, MAX_TOKEN_BODY).collect(),
            )
            .await
            .map_err(|_| {
                Error::BadRequest(format!(
                    "token request body not received within {} s",
                    TOKEN_BODY_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| Error::BadRequest(format!("unreadable token request body: {e}")))?
            .to_bytes();
            params.extend(decode_pairs(&String::from_utf8_lossy(&raw)));
        } else if parts.method != Method::GET {
            return Err(Error::Unsupported(
                "the token endpoint takes GET or POST".into(),
            ));
        }
        Ok(TokenRequest {
            method: parts.method,
            params,
            principal,
            authorization: parts.headers.get(header::AUTHORIZATION).cloned(),
        })
    }

    /// The first value of parameter `k`.
    pub(super) fn param(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    /// Every requested scope (repeated `scope` parameters, or space-separated in one).
    pub(super) fn scopes(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

// === impl Authorizer ===

impl Authorizer {
    /// GET|POST: /token
    pub async fn token(
        &self,
        mut req: TokenRequest,
        upstreams: &Upstreams,
    ) -> Result<Response<Body>, Error> {
        let upstream = match req.param("service") {
            Some(s) => upstreams
                .by_name(s)
                .or_else(|| {
                    upstreams
                        .all()
                        .iter()
                        .find(|u| u.config().aliases.iter().any(|a| a == s))
                })
                .cloned(),
            None => route_by_scope(&mut req, upstreams),
        }
        .ok_or_else(|| {
            Error::BadRequest("unknown or missing service: name a configured upstream".into())
        })?;
        match upstream.config().auth {
            AuthMode::Passthrough => self.forward(&upstream, req).await,
            mode => self.issue_local(mode, &upstream, req).await,
        }
    }
}

/// The upstream a token request without `service` is for: the one its first routable
/// `repository` scope would be served by (path prefix, else the default), as the repository
/// requests themselves are routed; scopes routed elsewhere are dropped from the request. Without
/// any repository scope: the default upstream, else the one upstream whose origin decides (a
/// `docker login` to a berth that routes only by prefix).
fn route_by_scope(req: &mut TokenRequest, upstreams: &Upstreams) -> Option<Arc<Upstream>> {
    let scopes = req.scopes();
    let routed = |s: &str| {
        let name: RepoName = scope_repository(s)?.parse().ok()?;
        upstreams.select(None, name).ok().map(|sel| sel.upstream)
    };
    let Some(upstream) = scopes.iter().find_map(|s| routed(s)) else {
        if let Some(d) = upstreams.default_upstream() {
            return Some(d.clone());
        }
        let mut deciding = upstreams
            .all()
            .iter()
            .filter(|u| u.config().auth == AuthMode::Passthrough);
        return match (deciding.next(), deciding.next()) {
            (Some(u), None) => Some(u.clone()),
            _ => None,
        };
    };
    let kept: Vec<String> = scopes
        .into_iter()
        .filter(|s| routed(s).is_none_or(|u| Arc::ptr_eq(&u, &upstream)))
        .collect();
    req.params.retain(|(k, _)| k != "scope");
    req.params
        .extend(kept.into_iter().map(|s| ("scope".to_owned(), s)));
    Some(upstream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams(toml: &str) -> Upstreams {
        let c = crate::config::Config::from_toml(toml).unwrap();
        Upstreams::new(&c.upstreams).unwrap()
    }

    fn token_request(query: &str) -> TokenRequest {
        TokenRequest {
            method: Method::GET,
            params: decode_pairs(query),
            principal: Principal::anonymous(),
            authorization: None,
        }
    }

    #[test]
    fn requests_without_service_route_by_the_scope() {
        let ups = upstreams(
            "[[upstream]]\nname = \"origin\"\nurl = \"http://o\"\nauth = \"passthrough\"\n\
             [[upstream]]\nname = \"hub\"\nurl = \"http://h\"\nauth = \"public\"\n",
        );
        let mut req = token_request("scope=repository:hub/a:pull+repository:origin/b:pull");
        assert_eq!(route_by_scope(&mut req, &ups).unwrap().name(), "hub");
        assert_eq!(req.scopes(), vec!["repository:hub/a:pull"]);
        let mut req = token_request("scope=repository:origin/b:pull");
        assert_eq!(route_by_scope(&mut req, &ups).unwrap().name(), "origin");
        // No scope and no default: the one upstream whose origin decides (a docker login).
        assert_eq!(
            route_by_scope(&mut token_request("account=alice"), &ups)
                .unwrap()
                .name(),
            "origin"
        );
        // A scope no upstream serves, and no default: nothing to pick but the login upstream.
        let mut req = token_request("scope=repository:elsewhere/x:pull");
        assert_eq!(route_by_scope(&mut req, &ups).unwrap().name(), "origin");
        let two = upstreams(
            "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\nauth = \"passthrough\"\n\
             [[upstream]]\nname = \"b\"\nurl = \"http://b\"\nauth = \"passthrough\"\n",
        );
        assert!(route_by_scope(&mut token_request(""), &two).is_none());
    }

    #[test]
    fn pairs_round_trip() {
        let p = decode_pairs(
            "grant_type=password&scope=repository%3Aa%2Fb%3Apull+repository%3Ac%3Apull&x",
        );
        assert_eq!(p[0], ("grant_type".into(), "password".into()));
        assert_eq!(p[1].1, "repository:a/b:pull repository:c:pull");
        assert_eq!(decode_pairs(&encode_pairs(&p)), p);
        // Empty pairs are skipped, repeated keys kept in order.
        assert_eq!(
            decode_pairs("scope=a&&scope=b&"),
            vec![("scope".into(), "a".into()), ("scope".into(), "b".into())]
        );
    }
}
