//! `/token`: berth as the token realm its clients see (docs/ARCHITECTURE.md, "Authorization").
//!
//! For `passthrough` upstreams the request is forwarded to the origin's own token service (realm
//! and service discovered from the origin's challenge), with scopes translated to the origin's
//! repository names, and the origin's answer returned. For `service` and `public` upstreams berth
//! authenticates the client locally and issues a token of its own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

use super::{Authorizer, Credential, Principal};
use crate::body::{self, Body};
use crate::config::AuthMode;
use crate::error::Error;
use crate::oci::RepoName;
use crate::upstream::{TokenServiceRequest, Upstream, Upstreams};

/// Largest token request or response body accepted.
const MAX_TOKEN_BODY: usize = 64 << 10;
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
/// space, `%XX` escapes are decoded, bad UTF-8 is replaced. Public so that it can be fuzzed.
pub fn decode_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let d = |x: &str| {
                percent_decode_str(&x.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

/// Encodes parameters for an origin's token service; [`decode_pairs`] reads them back unchanged.
pub fn encode_pairs(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, NON_ALPHANUMERIC),
                utf8_percent_encode(v, NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

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

    fn param(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    /// Every requested scope (repeated `scope` parameters, or space-separated in one).
    fn scopes(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Translates `repository:NAME:ACTIONS` from the name a client uses at berth to the origin's.
fn translate_scope(scope: &str, upstream: &Upstream) -> String {
    let mut parts = scope.splitn(3, ':');
    let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
        return scope.to_owned();
    };
    if kind != "repository" {
        return scope.to_owned();
    }
    let name = name
        .strip_prefix(&format!("{}/", upstream.name()))
        .unwrap_or(name);
    let name = match name.parse::<RepoName>() {
        Ok(n) if upstream.config().docker_hub && n.components() == 1 => {
            n.with_library_prefix().to_string()
        }
        _ => name.to_owned(),
    };
    match &upstream.config().repository_prefix {
        Some(p) => format!("{kind}:{p}/{name}:{actions}"),
        None => format!("{kind}:{name}:{actions}"),
    }
}

/// The repository a `repository:NAME:ACTIONS` scope names.
fn scope_repository(scope: &str) -> Option<&str> {
    let mut parts = scope.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("repository"), Some(name), Some(_)) => Some(name),
        _ => None,
    }
}

/// The repositories (as `upstream` names them) a token request asks to pull from.
fn pull_scopes(req: &TokenRequest, upstream: &Upstream) -> BTreeSet<String> {
    req.scopes()
        .iter()
        .filter_map(|s| {
            let t = translate_scope(s, upstream);
            let mut parts = t.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("repository"), Some(name), Some(actions))
                    if actions.split(',').any(|a| a == "pull" || a == "*") =>
                {
                    Some(name.to_owned())
                }
                _ => None,
            }
        })
        .collect()
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

/// A key for the credential a token request carries (a hash, never the secret), for the
/// refused-login memory; `None` for an anonymous request.
fn login_key(req: &TokenRequest) -> Option<String> {
    let raw = match (&req.principal.credential, req.param("grant_type")) {
        (Credential::Basic { .. }, _) => return Some(req.principal.key.clone()),
        (_, Some("password")) => format!(
            "password\0{}\0{}",
            req.param("username").unwrap_or(""),
            req.param("password").unwrap_or("")
        ),
        (_, Some("refresh_token")) => {
            format!("refresh\0{}", req.param("refresh_token").unwrap_or(""))
        }
        _ => return None,
    };
    Some(
        crate::oci::Digest::sha256_of(raw.as_bytes())
            .hex()
            .to_owned(),
    )
}

/// RFC 3339 UTC time, as token services write `issued_at`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The URL of the origin's token realm (with the query of a GET).
fn realm_uri(realm: &str) -> Result<http::Uri, Error> {
    realm
        .parse()
        .map_err(|_| Error::Internal("the origin's token realm is not a valid URL".into()))
}

fn token_json(token: &str, expires_in: Duration) -> Response<Body> {
    let v = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": expires_in.as_secs(),
        "issued_at": rfc3339(SystemTime::now()),
    });
    json(StatusCode::OK, v)
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let bytes = Bytes::from(v.to_string());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, bytes.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body::full(bytes))
        .expect("static headers are valid")
}

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

    async fn issue_local(
        &self,
        mode: AuthMode,
        upstream: &Upstream,
        req: TokenRequest,
    ) -> Result<Response<Body>, Error> {
        let (user, password) = match (&req.principal.credential, req.param("grant_type")) {
            (_, Some("password")) => (
                req.param("username").unwrap_or("").to_owned(),
                Some(crate::secret::Secret::new(
                    req.param("password").unwrap_or("").to_owned(),
                )),
            ),
            (_, Some(g)) if g != "password" => {
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "unsupported_grant_type"}),
                ));
            }
            (Credential::Basic { user, password }, _) => (user.clone(), Some(password.clone())),
            _ => (String::new(), None),
        };
        // Who this token is for: a local user, a static token's name, or anonymous where the
        // upstream takes anonymous clients. A token berth issued is not a password here: it
        // cannot be traded for a token with another scope or a longer life.
        let subject = match &password {
            None if mode == AuthMode::Public || upstream.config().anonymous => Some(String::new()),
            None => None,
            Some(p) => {
                let ok = self
                    .local
                    .check_password(&user, p)
                    .await
                    .map_err(|e| Error::TooManyRequests(e.to_string()))?;
                if ok {
                    Some(user.clone())
                } else {
                    self.local.static_token(p.expose())
                }
            }
        };
        self.count(if subject.is_some() { "allow" } else { "deny" }, "local");
        let Some(subject) = subject else {
            return Ok(json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "invalid credentials", "detail": null}]}),
            ));
        };
        let (token, ttl) = self
            .local
            .issue(upstream.name(), &subject, pull_scopes(&req, upstream));
        Ok(token_json(token.expose(), ttl))
    }

    /// Sends one request to an origin's token service: its status and (bounded) body.
    async fn exchange(
        &self,
        upstream: &Upstream,
        request: TokenServiceRequest,
    ) -> Result<(StatusCode, Bytes), Error> {
        Ok(upstream
            .send_token_request(&self.metrics, &request, MAX_TOKEN_BODY)
            .await?)
    }

    async fn forward(
        &self,
        upstream: &Upstream,
        req: TokenRequest,
    ) -> Result<Response<Body>, Error> {
        let scopes: Vec<String> = req
            .scopes()
            .iter()
            .map(|s| translate_scope(s, upstream))
            .collect();
        // An origin that asks for no authentication at /v2/ may still ask for it per repository
        // (a regional berth routing by prefix does): the first scope's repository is asked.
        let repo = scopes.iter().find_map(|s| scope_repository(s));
        let challenge = self
            .origin_challenge(upstream, repo)
            .await
            .map_err(Error::Upstream)?;
        let Some(challenge) = challenge else {
            // The origin asks for no authentication: any token will do.
            let (token, ttl) = self
                .local
                .issue(upstream.name(), "", pull_scopes(&req, upstream));
            return Ok(token_json(token.expose(), ttl));
        };
        let login = login_key(&req);
        if let Some(wait) = login.as_deref().and_then(|k| self.logins.blocked(k)) {
            self.count("deny", "backoff");
            return Ok(json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": format!("these credentials were refused by the origin; retry in {} s", wait.as_secs().max(1)), "detail": null}]}),
            ));
        }
        let realm = challenge
            .param("realm")
            .ok_or_else(|| Error::Internal("the origin's challenge names no realm".into()))?
            .to_owned();
        let service = challenge.param("service").map(str::to_owned);
        let mut params: Vec<(String, String)> = req
            .params
            .iter()
            .filter(|(k, _)| k != "scope" && k != "service")
            .cloned()
            .collect();
        if let Some(s) = &service {
            params.push(("service".into(), s.clone()));
        }
        let mut headers = HeaderMap::new();
        let (uri, body) = if req.method == Method::POST {
            if !scopes.is_empty() {
                params.push(("scope".into(), scopes.join(" ")));
            }
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
            (realm.clone(), Bytes::from(encode_pairs(&params)))
        } else {
            for s in &scopes {
                params.push(("scope".into(), s.clone()));
            }
            let sep = if realm.contains('?') { '&' } else { '?' };
            (
                format!("{realm}{sep}{}", encode_pairs(&params)),
                Bytes::new(),
            )
        };
        let request = TokenServiceRequest {
            method: req.method.clone(),
            uri: realm_uri(&uri)?,
            headers,
            authorization: req.authorization.clone(),
            body,
        };
        let (status, raw) = self.exchange(upstream, request).await?;
        // A token service that does not take this method: Docker clients GET with Basic,
        // containerd POSTs OAuth2 forms. Translate a password GET into the POST form.
        let (status, raw) = match (&req.method, &req.principal.credential, status) {
            (
                &Method::GET,
                Credential::Basic { user, password },
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED,
            ) => {
                let mut form: Vec<(String, String)> = vec![
                    ("grant_type".into(), "password".into()),
                    ("username".into(), user.clone()),
                    ("password".into(), password.expose().to_owned()),
                    ("client_id".into(), "berth".into()),
                ];
                if let Some(s) = &service {
                    form.push(("service".into(), s.clone()));
                }
                if !scopes.is_empty() {
                    form.push(("scope".into(), scopes.join(" ")));
                }
                let mut headers = HeaderMap::new();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                );
                let request = TokenServiceRequest {
                    method: Method::POST,
                    uri: realm_uri(&realm)?,
                    headers,
                    authorization: None,
                    body: Bytes::from(encode_pairs(&form)),
                };
                self.exchange(upstream, request).await?
            }
            (_, _, s) => (s, raw),
        };
        if let Some(k) = &login {
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                self.logins.failed(k);
            } else if status.is_success() {
                self.logins.succeeded(k);
            }
        }
        if !status.is_success() {
            self.count("deny", "origin");
            // Statuses a client acts on pass through (containerd falls back from POST to GET on
            // 400/401/404/405); anything else is the origin failing.
            let passed = matches!(
                status,
                StatusCode::BAD_REQUEST
                    | StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
                    | StatusCode::NOT_FOUND
                    | StatusCode::METHOD_NOT_ALLOWED
            );
            let code = if passed {
                "UNAUTHORIZED"
            } else {
                "UNAVAILABLE"
            };
            let message = format!("the origin's token service answered {}", status.as_u16());
            return Ok(json(
                if passed {
                    status
                } else {
                    StatusCode::BAD_GATEWAY
                },
                serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}),
            ));
        }
        let unreachable = |reason: String| {
            Error::Upstream(crate::upstream::UpstreamError::Token {
                upstream: upstream.name().to_owned(),
                reason,
            })
        };
        let mut v: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|_| unreachable("the origin's token answer is not JSON".into()))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .ok_or_else(|| unreachable("the origin's token answer has no token".into()))?;
        if let Some(o) = v.as_object_mut() {
            o.entry("token").or_insert_with(|| token.clone().into());
            o.entry("access_token").or_insert_with(|| token.into());
            o.entry("expires_in").or_insert_with(|| 60.into());
            o.entry("issued_at")
                .or_insert_with(|| rfc3339(SystemTime::now()).into());
        }
        self.count("allow", "origin");
        Ok(json(StatusCode::OK, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

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
    fn scopes_carry_the_upstream_repository_prefix() {
        let ups = upstreams(
            "[[upstream]]\nname = \"region\"\nurl = \"http://r:5000/docker.io\"\naliases = [\"docker.io\"]\ndefault = true\n",
        );
        let u = &ups.all()[0];
        assert_eq!(
            translate_scope("repository:region/alpine:pull", u),
            "repository:docker.io/library/alpine:pull"
        );
        assert_eq!(
            translate_scope("repository:org/app:pull", u),
            "repository:docker.io/org/app:pull"
        );
        assert_eq!(
            translate_scope("registry:catalog:*", u),
            "registry:catalog:*"
        );
    }

    #[test]
    fn pairs_round_trip() {
        let p = decode_pairs(
            "grant_type=password&scope=repository%3Aa%2Fb%3Apull+repository%3Ac%3Apull&x",
        );
        assert_eq!(p[0], ("grant_type".into(), "password".into()));
        assert_eq!(p[1].1, "repository:a/b:pull repository:c:pull");
        assert_eq!(decode_pairs(&encode_pairs(&p)), p);
    }
}
