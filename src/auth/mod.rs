//! Client authorization (DESIGN §5): the origin decides who may pull what, berth enforces it in
//! front of its shared cache.
//!
//! - `public` upstreams: anyone may pull; berth fetches with its own credentials (if any).
//! - `service` upstreams: clients authenticate locally (htpasswd, static or berth-issued
//!   tokens); berth fetches with its own credentials.
//! - `passthrough` upstreams: clients bring origin credentials (tokens from berth's `/token`,
//!   which forwards to the origin's token service). Before anything is served from the cache the
//!   origin is asked, with the client's token, whether this client may pull from this
//!   repository; the answer is cached per (principal, upstream, repository) for at most the
//!   token's lifetime. A blob or manifest is served under a repository only if it is known to
//!   belong there.

mod decisions;
pub mod jwt;
pub mod local;
pub mod principal;
pub mod realm;

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

pub use decisions::{referenced_digests, Decisions};
pub use local::LocalAuth;
pub use principal::{Credential, Principal};

use crate::config::{AuthConfig, AuthMode, Credentials};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::oci::{media, Digest, Reference};
use crate::upstream::{
    challenge::Challenge, Selected, Upstream, UpstreamAuth, UpstreamError, UpstreamRequest,
};

/// How long an origin's token-service challenge is remembered.
const CHALLENGE_TTL: Duration = Duration::from_secs(3600);

/// What a request wants to read.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A manifest by tag or digest.
    Manifest(&'a Reference),
    /// A blob.
    Blob(&'a Digest),
    /// tags/list or referrers.
    Listing,
}

/// How the client reached berth, to build the token realm it is sent to.
#[derive(Debug, Clone)]
pub struct Realm<'a> {
    /// `server.external_url`, when configured.
    external: Option<&'a str>,
    /// Whether the client connected over TLS.
    tls: bool,
    /// The request's authority or Host header.
    host: Option<&'a str>,
}

impl<'a> Realm<'a> {
    /// The realm from config or, failing that, from the request's scheme and Host. Nothing is
    /// formatted until a challenge is needed (most requests never need one).
    pub fn from_request(
        external: Option<&'a str>,
        tls: bool,
        headers: &'a HeaderMap,
        authority: Option<&'a str>,
    ) -> Realm<'a> {
        let host = authority
            .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .filter(|h| {
                h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            });
        Realm {
            external,
            tls,
            host,
        }
    }

    /// A Bearer challenge for `service`, scoped to `repo` (as the client named it) if given.
    pub fn challenge(&self, service: &str, repo: Option<&str>) -> String {
        let base = match self.external {
            Some(e) => e.to_owned(),
            None => format!(
                "{}://{}",
                if self.tls { "https" } else { "http" },
                self.host.unwrap_or("localhost")
            ),
        };
        let mut c = format!("Bearer realm=\"{base}/token\",service=\"{service}\"");
        if let Some(r) = repo {
            c.push_str(&format!(",scope=\"repository:{r}:pull\""));
        }
        c
    }
}

/// The authorizer: local users, the origin's cached decisions, repository memberships.
pub struct Authorizer {
    config: AuthConfig,
    local: Arc<LocalAuth>,
    decisions: Decisions,
    parsed: moka::sync::Cache<(String, String, Digest), ()>,
    challenges: moka::sync::Cache<String, Option<Challenge>>,
    metrics: Arc<Metrics>,
}

// === impl Authorizer ===

impl Authorizer {
    /// Loads local credentials.
    pub fn new(
        config: AuthConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Authorizer, local::LocalAuthError> {
        let local = LocalAuth::load(
            config.htpasswd_file.as_deref(),
            config.tokens_file.as_deref(),
            config.token_ttl,
        )?;
        Ok(Authorizer {
            config,
            local: Arc::new(local),
            decisions: Decisions::default(),
            parsed: moka::sync::Cache::builder().max_capacity(1_000_000).build(),
            challenges: moka::sync::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(CHALLENGE_TTL)
                .build(),
            metrics,
        })
    }

    fn count(&self, result: &str, source: &str) {
        self.metrics
            .auth_decisions
            .with_label_values(&[result, source])
            .inc();
    }

    /// Records what a manifest fetched for `sel`'s repository references: those digests belong
    /// to that repository.
    pub fn learn(&self, sel: &Selected, digest: &Digest, manifest: &[u8]) {
        let (up, repo) = (sel.upstream.name(), sel.name.as_str());
        let key = (up.to_owned(), repo.to_owned(), digest.clone());
        if self.parsed.contains_key(&key) {
            return;
        }
        self.decisions.add_member(up, repo, digest.clone());
        for d in referenced_digests(manifest) {
            self.decisions.add_member(up, repo, d);
        }
        self.parsed.insert(key, ());
    }

    /// GET /v2/: the API version check doubles as the login probe. Anonymous clients of
    /// upstreams that need credentials get the challenge that tells them where to log in.
    pub async fn admit_base(
        &self,
        upstream: &Upstream,
        principal: &Principal,
        realm: &Realm<'_>,
    ) -> Result<(), Error> {
        let required = |message: &str| Error::AuthRequired {
            challenge: realm.challenge(upstream.name(), None),
            message: message.to_owned(),
        };
        match upstream.config().auth {
            AuthMode::Public => Ok(()),
            AuthMode::Service => {
                let ok = match &principal.credential {
                    Credential::Anonymous => upstream.config().anonymous,
                    Credential::Bearer(t) => self.local.verify_token(t.expose()).is_some(),
                    Credential::Basic { user, password } => {
                        self.local.verify_password(user, password).await
                            || self.local.verify_token(password.expose()).is_some()
                    }
                };
                if ok {
                    Ok(())
                } else {
                    Err(required("authentication required"))
                }
            }
            // Without a repository there is nothing to ask the origin: credentials are checked
            // on the first pull.
            AuthMode::Passthrough if principal.is_anonymous() => {
                Err(required("authentication required"))
            }
            AuthMode::Passthrough => Ok(()),
        }
    }

    /// Decides whether `principal` may read `target` through `sel`, and sets whose credentials
    /// `sel`'s origin requests carry. `visible` is the repository as the client named it (for
    /// the challenge).
    pub async fn admit(
        &self,
        sel: &mut Selected,
        principal: &Principal,
        target: Target<'_>,
        realm: &Realm<'_>,
        visible: Option<&str>,
    ) -> Result<(), Error> {
        let service = sel.upstream.name().to_owned();
        let required = |message: &str| Error::AuthRequired {
            challenge: realm.challenge(&service, visible),
            message: message.to_owned(),
        };
        match sel.upstream.config().auth {
            AuthMode::Public => {
                sel.auth = UpstreamAuth::Own;
                self.count("allow", "public");
                Ok(())
            }
            AuthMode::Service => {
                sel.auth = UpstreamAuth::Own;
                let ok = match &principal.credential {
                    Credential::Anonymous => sel.upstream.config().anonymous,
                    Credential::Bearer(t) => self.local.verify_token(t.expose()).is_some(),
                    Credential::Basic { user, password } => {
                        self.local.verify_password(user, password).await
                            || self.local.verify_token(password.expose()).is_some()
                    }
                };
                self.count(if ok { "allow" } else { "deny" }, "local");
                if ok {
                    Ok(())
                } else if principal.is_anonymous() {
                    Err(required("authentication required"))
                } else {
                    Err(required("invalid credentials"))
                }
            }
            AuthMode::Passthrough => {
                sel.auth = match &principal.credential {
                    Credential::Anonymous => UpstreamAuth::Anonymous,
                    Credential::Bearer(t) => UpstreamAuth::Bearer(t.clone()),
                    Credential::Basic { user, password } => UpstreamAuth::Basic {
                        key: principal.key.clone(),
                        credentials: Credentials {
                            username: user.clone(),
                            password: password.clone(),
                        },
                    },
                };
                self.admit_passthrough(sel, principal, target, &required)
                    .await
            }
        }
    }

    async fn admit_passthrough(
        &self,
        sel: &Selected,
        principal: &Principal,
        target: Target<'_>,
        required: &(dyn Fn(&str) -> Error + Sync),
    ) -> Result<(), Error> {
        let up = sel.upstream.name().to_owned();
        let repo = sel.name.as_str().to_owned();
        let key = (principal.key.clone(), up.clone(), repo.clone());
        let member = |d: &Digest| self.decisions.is_member(&up, &repo, d);
        let needs_member = match target {
            Target::Blob(d) => Some(d),
            Target::Manifest(Reference::Digest(d)) => Some(d),
            _ => None,
        };
        match self.decisions.valid(&key) {
            Some(true) if needs_member.is_none_or(member) => {
                self.count("allow", "cache");
                return Ok(());
            }
            Some(false) => {
                self.count("deny", "cache");
                return Err(required("access denied by the origin"));
            }
            _ => {}
        }
        // Ask the origin, with the client's credentials.
        let (method, path, accept) = match target {
            Target::Blob(d) => (Method::HEAD, format!("/v2/{repo}/blobs/{d}"), None),
            Target::Manifest(r) => (Method::HEAD, format!("/v2/{repo}/manifests/{r}"), Some(())),
            Target::Listing => (Method::GET, format!("/v2/{repo}/tags/list?n=1"), None),
        };
        let mut headers = HeaderMap::new();
        if accept.is_some() {
            for a in media::DEFAULT_ACCEPT {
                headers.append(header::ACCEPT, HeaderValue::from_static(a));
            }
        }
        let req = UpstreamRequest {
            method,
            path_and_query: path,
            headers,
            scope: format!("repository:{repo}:pull"),
            auth: sel.auth.clone(),
        };
        let answer = check(&sel.upstream, &self.metrics, &req).await;
        let ttl = self.decision_ttl(principal);
        match answer {
            Ok((StatusCode::OK, digest)) => {
                self.decisions.allow(key, ttl, self.config.offline_grace);
                if let Some(d) = needs_member {
                    self.decisions.add_member(&up, &repo, d.clone());
                }
                if let Some(d) = digest {
                    self.decisions.add_member(&up, &repo, d);
                }
                self.count("allow", "origin");
                Ok(())
            }
            Ok((StatusCode::NOT_FOUND, _)) => {
                // The origin let this client look: it may pull here, but the object is not here.
                self.decisions.allow(key, ttl, self.config.offline_grace);
                self.count("allow", "origin");
                Err(match target {
                    Target::Blob(_) => Error::BlobUnknown("blob unknown to this repository".into()),
                    Target::Listing => {
                        Error::NameUnknown("repository unknown to the origin".into())
                    }
                    _ => Error::ManifestUnknown("manifest unknown to this repository".into()),
                })
            }
            Ok((StatusCode::UNAUTHORIZED, _)) => {
                self.decisions.deny(key, self.config.deny_ttl);
                self.count("deny", "origin");
                Err(required(if principal.is_anonymous() {
                    "authentication required"
                } else {
                    "the origin does not accept these credentials for this repository"
                }))
            }
            Ok((StatusCode::FORBIDDEN, _)) => {
                self.decisions.deny(key, self.config.deny_ttl);
                self.count("deny", "origin");
                Err(Error::Denied(
                    "the origin denies access to this repository".into(),
                ))
            }
            Ok((status, _)) => {
                self.count("error", "origin");
                self.grace_or(&key, needs_member.is_none_or(member), || {
                    Error::Upstream(UpstreamError::Status {
                        upstream: up.clone(),
                        status,
                        retry_after: None,
                    })
                })
            }
            // The origin's token service refused the client's credentials: a "no", never graced.
            Err(UpstreamError::Status { status, .. })
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
            {
                self.decisions.deny(key, self.config.deny_ttl);
                self.count("deny", "origin");
                if status == StatusCode::FORBIDDEN {
                    Err(Error::Denied(
                        "the origin denies access to this repository".into(),
                    ))
                } else {
                    Err(required(
                        "the origin's token service refused these credentials",
                    ))
                }
            }
            // No anonymous token to be had: the client must log in.
            Err(UpstreamError::Token { .. }) if principal.is_anonymous() => {
                self.count("deny", "origin");
                Err(required("authentication required"))
            }
            Err(e) => {
                self.count("error", "origin");
                self.grace_or(&key, needs_member.is_none_or(member), || {
                    Error::Upstream(UpstreamError::Unreachable {
                        upstream: up.clone(),
                        reason: format!("cannot verify access with the origin, refusing to serve cached content: {e}"),
                    })
                })
            }
        }
    }

    fn grace_or(
        &self,
        key: &decisions::DecisionKey,
        member: bool,
        err: impl FnOnce() -> Error,
    ) -> Result<(), Error> {
        if member && self.decisions.in_grace(key) {
            self.count("allow", "grace");
            Ok(())
        } else {
            Err(err())
        }
    }

    /// How long an allow for this principal may be reused: the configured maximum, never past
    /// the expiry its token states.
    fn decision_ttl(&self, principal: &Principal) -> Duration {
        match &principal.credential {
            Credential::Bearer(t) => jwt::remaining(t.expose())
                .map_or(self.config.decision_ttl, |r| {
                    r.min(self.config.decision_ttl)
                }),
            _ => self.config.decision_ttl,
        }
    }

    /// The origin's token-service challenge, discovered once per hour.
    pub async fn origin_challenge(
        &self,
        upstream: &Upstream,
    ) -> Result<Option<Challenge>, UpstreamError> {
        if let Some(c) = self.challenges.get(upstream.name()) {
            return Ok(c);
        }
        let c = upstream.discover_challenge().await?;
        self.challenges
            .insert(upstream.name().to_owned(), c.clone());
        Ok(c)
    }

    /// Local users and tokens.
    pub fn local(&self) -> &Arc<LocalAuth> {
        &self.local
    }
}

/// Sends a check request (counted like every origin request); returns the status and the
/// digest the origin reported.
async fn check(
    upstream: &Upstream,
    metrics: &Metrics,
    req: &UpstreamRequest,
) -> Result<(StatusCode, Option<Digest>), UpstreamError> {
    let resp = crate::proxy::send_counted(upstream, metrics, req).await?;
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok((resp.status(), digest))
}
