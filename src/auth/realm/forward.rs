//! Passthrough `/token` (docs/ARCHITECTURE.md, "Authorization"): the client's token request is
//! forwarded to the origin's own token service (Docker token GET or OAuth2 form POST), with
//! scopes translated to the origin's names, and the origin's answer returned in the shape
//! clients expect. Refused logins are remembered (`auth/backoff.rs`).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode, Uri};

use super::scope::{pull_scopes, scope_repository, translate_scope};
use super::{encode_pairs, json, rfc3339, token_json, TokenRequest, MAX_TOKEN_BODY};
use crate::auth::{Authorizer, Credential};
use crate::body::Body;
use crate::error::Error;
use crate::secret::Secret;
use crate::upstream::challenge::Challenge;
use crate::upstream::{TokenServiceRequest, Upstream, UpstreamError};

// === impl Authorizer ===

impl Authorizer {
    /// Answers a token request for a `passthrough` upstream with the origin's own answer (or,
    /// where the origin asks for no authentication, a token of berth's worth an anonymous
    /// client).
    pub(super) async fn forward(
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
            return Ok(refused_login(wait));
        }
        let service = TokenService::of(&challenge)?;
        let (status, raw) = self.ask_origin(upstream, &service, &req, &scopes).await?;
        if let Some(k) = &login {
            self.remember_login(k, status);
        }
        if !status.is_success() {
            self.count("deny", "origin");
            return Ok(origin_refusal(status));
        }
        let answer = completed_answer(upstream, &raw)?;
        self.count("allow", "origin");
        Ok(json(StatusCode::OK, answer))
    }

    /// Asks the origin's token service as the client asked. Where it does not take the method
    /// (Docker clients GET with Basic, containerd POSTs OAuth2 forms), a GET with Basic
    /// credentials is asked again as an OAuth2 password-grant POST.
    async fn ask_origin(
        &self,
        upstream: &Upstream,
        service: &TokenService,
        req: &TokenRequest,
        scopes: &[String],
    ) -> Result<(StatusCode, Bytes), Error> {
        let (status, raw) = self
            .exchange(upstream, service.as_sent(req, scopes)?)
            .await?;
        match (&req.method, &req.principal.credential, status) {
            (
                &Method::GET,
                Credential::Basic { user, password },
                StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED,
            ) => {
                let grant = service.password_grant(user, password, scopes)?;
                self.exchange(upstream, grant).await
            }
            _ => Ok((status, raw)),
        }
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

    /// Notes the origin's answer to a login: a refusal delays the next try with these
    /// credentials, a success forgets earlier refusals.
    fn remember_login(&self, key: &str, status: StatusCode) {
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            self.logins.failed(key);
        } else if status.is_success() {
            self.logins.succeeded(key);
        }
    }
}

/// The origin's token service, as its challenge names it.
struct TokenService {
    /// Where tokens are asked for.
    realm: String,
    /// The `service` parameter the origin expects, if any.
    service: Option<String>,
}

// === impl TokenService ===

impl TokenService {
    /// The realm and service of a Bearer challenge.
    fn of(challenge: &Challenge) -> Result<TokenService, Error> {
        let realm = challenge
            .param("realm")
            .ok_or_else(|| Error::Internal("the origin's challenge names no realm".into()))?
            .to_owned();
        Ok(TokenService {
            realm,
            service: challenge.param("service").map(str::to_owned),
        })
    }

    /// The client's request as the origin is asked it: the client's parameters with the
    /// origin's `service` and the translated `scopes`, in the query of a GET or the form of a
    /// POST, and the client's `Authorization`.
    fn as_sent(&self, req: &TokenRequest, scopes: &[String]) -> Result<TokenServiceRequest, Error> {
        let mut params: Vec<(String, String)> = req
            .params
            .iter()
            .filter(|(k, _)| k != "scope" && k != "service")
            .cloned()
            .collect();
        if let Some(s) = &self.service {
            params.push(("service".into(), s.clone()));
        }
        let mut request = if req.method == Method::POST {
            if !scopes.is_empty() {
                params.push(("scope".into(), scopes.join(" ")));
            }
            self.form(&params)?
        } else {
            for s in scopes {
                params.push(("scope".into(), s.clone()));
            }
            let sep = if self.realm.contains('?') { '&' } else { '?' };
            TokenServiceRequest {
                method: req.method.clone(),
                uri: realm_uri(&format!("{}{sep}{}", self.realm, encode_pairs(&params)))?,
                headers: HeaderMap::new(),
                authorization: None,
                body: Bytes::new(),
            }
        };
        request.authorization = req.authorization.clone();
        Ok(request)
    }

    /// An OAuth2 password grant with the client's Basic credentials.
    fn password_grant(
        &self,
        user: &str,
        password: &Secret,
        scopes: &[String],
    ) -> Result<TokenServiceRequest, Error> {
        let mut form: Vec<(String, String)> = vec![
            ("grant_type".into(), "password".into()),
            ("username".into(), user.to_owned()),
            ("password".into(), password.expose().to_owned()),
            ("client_id".into(), "berth".into()),
        ];
        if let Some(s) = &self.service {
            form.push(("service".into(), s.clone()));
        }
        if !scopes.is_empty() {
            form.push(("scope".into(), scopes.join(" ")));
        }
        self.form(&form)
    }

    /// A form POST of `params` to the realm.
    fn form(&self, params: &[(String, String)]) -> Result<TokenServiceRequest, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        Ok(TokenServiceRequest {
            method: Method::POST,
            uri: realm_uri(&self.realm)?,
            headers,
            authorization: None,
            body: Bytes::from(encode_pairs(params)),
        })
    }
}

/// The URL of the origin's token realm (with the query of a GET).
fn realm_uri(realm: &str) -> Result<Uri, Error> {
    realm
        .parse()
        .map_err(|_| Error::Internal("the origin's token realm is not a valid URL".into()))
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

/// The answer to credentials the origin refused moments ago, without asking it again.
fn refused_login(wait: Duration) -> Response<Body> {
    json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": format!("these credentials were refused by the origin; retry in {} s", wait.as_secs().max(1)), "detail": null}]}),
    )
}

/// The answer to a token service that did not grant a token. Statuses a client acts on pass
/// through (containerd falls back from POST to GET on 400/401/404/405); anything else is the
/// origin failing.
fn origin_refusal(status: StatusCode) -> Response<Body> {
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
    json(
        if passed {
            status
        } else {
            StatusCode::BAD_GATEWAY
        },
        serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}),
    )
}

/// The origin's token answer with the fields clients rely on filled in (`token` and
/// `access_token` both, `expires_in`, `issued_at`).
fn completed_answer(upstream: &Upstream, raw: &[u8]) -> Result<serde_json::Value, Error> {
    let unreadable = |reason: &str| {
        Error::Upstream(UpstreamError::Token {
            upstream: upstream.name().to_owned(),
            reason: reason.to_owned(),
        })
    };
    let mut v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|_| unreadable("the origin's token answer is not JSON"))?;
    let token = v
        .get("token")
        .or_else(|| v.get("access_token"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| unreadable("the origin's token answer has no token"))?;
    if let Some(o) = v.as_object_mut() {
        o.entry("token").or_insert_with(|| token.clone().into());
        o.entry("access_token").or_insert_with(|| token.into());
        o.entry("expires_in").or_insert_with(|| 60.into());
        o.entry("issued_at")
            .or_insert_with(|| rfc3339(SystemTime::now()).into());
    }
    Ok(v)
}
