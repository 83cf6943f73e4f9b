//! berth's own tokens at `/token`, for `service` and `public` upstreams (docs/ARCHITECTURE.md,
//! "Authorization"): the client is authenticated locally and given a token for the repositories
//! of its pull scopes.

use http::{Response, StatusCode};

use super::scope::pull_scopes;
use super::{json, token_json, TokenRequest};
use crate::auth::{Authorizer, Credential};
use crate::body::Body;
use crate::config::AuthMode;
use crate::error::Error;
use crate::upstream::Upstream;

// === impl Authorizer ===

impl Authorizer {
    /// Authenticates the client (password grant, Basic, or anonymous where `mode` and the
    /// upstream allow) and issues berth's own token; a token berth issued is not a password here.
    pub(super) async fn issue_local(
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
}
