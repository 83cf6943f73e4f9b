//! Client authorization: the origin decides who may pull what, berth enforces it in front of
//! its shared cache (docs/ARCHITECTURE.md, "Authorization").
//!
//! Two questions are asked of every read, in every mode:
//! 1. May this client pull from this repository? `public`: anyone. `service`: a local user,
//!    static token, or a token berth issued for this upstream and repository. `passthrough`:
//!    the origin, asked with the client's own credentials, decision cached per (principal,
//!    upstream, repository) for at most the token's lifetime.
//! 2. Does the digest belong to this repository of this upstream? Only the origin's word
//!    counts ([`crate::cache::Memberships`]); without it the origin is asked (a HEAD in the
//!    repository, with the credentials the mode uses) before cached bytes are served.

pub mod backoff;
mod decisions;
pub mod jwt;
pub mod local;
pub mod principal;
pub mod realm;

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

pub use decisions::Decisions;
pub use local::{LocalAuth, TokenCheck};

use crate::clock::Clock;
pub use principal::{Credential, Principal};

use crate::cache::Memberships;
use crate::config::{AuthConfig, AuthMode, Credentials};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::oci::{media, Digest, Reference};
use crate::upstream::{
    challenge::Challenge, Selected, Upstream, UpstreamAuth, UpstreamError, UpstreamRequest,
};

/// How long an origin's token-service challenge is remembered.
const CHALLENGE_TTL: Duration = Duration::from_secs(3600);
/// How long a repository whose origin asked for no authentication is remembered as open.
const OPEN_REPOSITORY_TTL: Duration = Duration::from_secs(60);
/// Most challenges (per upstream, and per repository where `/v2/` asks for none) remembered.
const MAX_CHALLENGES: u64 = 10_000;

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

impl Target<'_> {
    /// The digest a read by digest names.
    fn digest(&self) -> Option<&Digest> {
        match *self {
            Target::Blob(d) | Target::Manifest(Reference::Digest(d)) => Some(d),
            _ => None,
        }
    }
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
        let mut c = format!("{},service=\"{service}\"", self.unscoped());
        if let Some(r) = repo {
            c.push_str(&format!(",scope=\"repository:{r}:pull\""));
        }
        c
    }

    /// A Bearer challenge naming no service: `/token` then picks the upstream from the
    /// requested scope, as the repository requests are routed (a berth without a default).
    pub fn unscoped(&self) -> String {
        let base = match self.external {
            Some(e) => e.to_owned(),
            None => format!(
                "{}://{}",
                if self.tls { "https" } else { "http" },
                self.host.unwrap_or("localhost")
            ),
        };
        format!("Bearer realm=\"{base}/token\"")
    }
}

/// The authorizer: local users, the origin's cached decisions, repository memberships.
pub struct Authorizer {
    config: AuthConfig,
    local: Arc<LocalAuth>,
    decisions: Decisions,
    members: Arc<Memberships>,
    logins: backoff::Backoff,
    challenges: moka::sync::Cache<String, Option<Challenge>>,
    open_repositories: moka::sync::Cache<String, ()>,
    metrics: Arc<Metrics>,
    /// The clock of every expiry this authorizer decides (decisions, issued tokens).
    clock: Clock,
}

// === impl Authorizer ===

impl Authorizer {
    /// Loads local credentials; `members` is the cache's membership evidence.
    pub fn new(
        config: AuthConfig,
        metrics: Arc<Metrics>,
        members: Arc<Memberships>,
    ) -> Result<Authorizer, local::LocalAuthError> {
        let clock = Clock::default();
        let local = LocalAuth::load(
            config.htpasswd_file.as_deref(),
            config.tokens_file.as_deref(),
            config.token_ttl,
        )?
        .with_clock(clock.clone());
        Ok(Authorizer {
            config,
            local: Arc::new(local),
            decisions: Decisions::new(clock.clone()),
            clock,
            members,
            logins: backoff::Backoff::default(),
            challenges: moka::sync::Cache::builder()
                .max_capacity(MAX_CHALLENGES)
                .time_to_live(CHALLENGE_TTL)
                .build(),
            open_repositories: moka::sync::Cache::builder()
                .max_capacity(MAX_CHALLENGES)
                .time_to_live(OPEN_REPOSITORY_TTL)
                .build(),
            metrics,
        })
    }

    fn count(&self, result: &str, source: &str) {
        self.metrics.count_auth(result, source);
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
                if self.service_ok(upstream, principal, None).await? {
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

    /// GET /v2/ of a berth without a default upstream (and no `?ns=`): no repository, so no
    /// upstream to ask. A client with credentials is admitted (they are checked on each pull);
    /// an anonymous one is told where to log in (a challenge naming no service) unless every
    /// upstream takes anonymous clients. Without that challenge clients that only learn about
    /// authentication from `/v2/` (docker, skopeo) would never send their credentials.
    pub fn admit_base_unrouted(
        &self,
        upstreams: &[Arc<Upstream>],
        principal: &Principal,
        realm: &Realm<'_>,
    ) -> Result<(), Error> {
        let open = |u: &Arc<Upstream>| match u.config().auth {
            AuthMode::Public => true,
            AuthMode::Service => u.config().anonymous,
            AuthMode::Passthrough => false,
        };
        if !principal.is_anonymous() || upstreams.iter().all(open) {
            return Ok(());
        }
        Err(Error::AuthRequired {
            challenge: realm.unscoped(),
            message: "authentication required".into(),
        })
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
            }
            AuthMode::Service => {
                sel.auth = UpstreamAuth::Own;
                let ok = self
                    .service_ok(&sel.upstream, principal, Some(sel.name.as_str()))
                    .await?;
                self.count(if ok { "allow" } else { "deny" }, "local");
                if !ok {
                    return Err(if principal.is_anonymous() {
                        required("authentication required")
                    } else {
                        required("invalid credentials")
                    });
                }
            }
            AuthMode::Passthrough => {
                sel.auth = match &principal.credential {
                    Credential::Anonymous => UpstreamAuth::Anonymous,
                    // A token berth holds itself (issued by its `/token` where the origin asked
                    // for no authentication, or a static token) is never the origin's, so never
                    // sent there: for its own upstream and repository it is worth an anonymous
                    // client; anywhere else it opens nothing.
                    Credential::Bearer(t) => match self.local.check_token(
                        t.expose(),
                        &service,
                        Some(sel.name.as_str()),
                        true,
                    ) {
                        TokenCheck::Unknown => UpstreamAuth::Bearer(t.clone()),
                        TokenCheck::Valid => UpstreamAuth::Anonymous,
                        TokenCheck::OutOfScope => {
                            self.count("deny", "local");
                            return Err(required("this token was not issued for this repository"));
                        }
                    },
                    Credential::Basic { user, password } => UpstreamAuth::Basic {
                        key: principal.key.clone(),
                        credentials: Credentials {
                            username: user.clone(),
                            password: password.clone(),
                        },
                    },
                };
                return self
                    .admit_passthrough(sel, principal, target, &required)
                    .await;
            }
        }
        // Membership of a read by digest is settled by its handler, at the cache lookup: bytes
        // found in the cache need the origin's evidence first (`require_member`), a miss is
        // fetched from this repository's own origin and that answer is the evidence. A cold
        // pull costs one origin request, not two.
        Ok(())
    }

    /// Whether `sel`'s origin has shown `digest` in `sel`'s repository.
    pub fn is_member(&self, sel: &Selected, digest: &Digest) -> bool {
        self.members
            .contains(sel.upstream.name(), sel.name.as_str(), digest)
    }

    /// Records that `sel`'s origin answered 2xx for `digest` in `sel`'s repository.
    pub fn record_member(&self, sel: &Selected, digest: &Digest) {
        self.members
            .record(sel.upstream.name(), sel.name.as_str(), digest);
    }

    /// Whether a `service` upstream accepts this client: anonymous where allowed, a local user,
    /// a static token, or a token berth issued for this upstream (and repository, if given).
    async fn service_ok(
        &self,
        upstream: &Upstream,
        principal: &Principal,
        repo: Option<&str>,
    ) -> Result<bool, Error> {
        let anonymous_ok = upstream.config().anonymous;
        let token_ok = |t: &str| {
            self.local
                .check_token(t, upstream.name(), repo, anonymous_ok)
                == TokenCheck::Valid
        };
        Ok(match &principal.credential {
            Credential::Anonymous => anonymous_ok,
            Credential::Bearer(t) => token_ok(t.expose()),
            Credential::Basic { user, password } => {
                let ok = self
                    .local
                    .check_password(user, password)
                    .await
                    .map_err(|e| Error::TooManyRequests(e.to_string()))?;
                ok || token_ok(password.expose())
            }
        })
    }

    /// The membership rule: a read by digest is served from the cache only when the upstream's
    /// origin has shown the digest in this repository; otherwise the origin is asked (a HEAD,
    /// with the credentials `sel` carries) and its answer remembered.
    pub async fn require_member(&self, sel: &Selected, target: Target<'_>) -> Result<(), Error> {
        let Some(d) = target.digest() else {
            return Ok(());
        };
        let (up, repo) = (sel.upstream.name(), sel.name.as_str());
        if self.members.contains(up, repo, d) {
            return Ok(());
        }
        let answer = check(&sel.upstream, &self.metrics, &check_request(sel, target)).await;
        let unknown = || match target {
            Target::Blob(_) => Error::BlobUnknown("blob unknown to this repository".into()),
            _ => Error::ManifestUnknown("manifest unknown to this repository".into()),
        };
        match answer {
            Ok((status, _, _)) if status.is_success() => {
                self.members.record(up, repo, d);
                self.count("allow", "membership");
                Ok(())
            }
            Ok((StatusCode::NOT_FOUND, _, _)) => {
                self.count("deny", "membership");
                Err(unknown())
            }
            Ok((StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _, _)) => {
                self.count("deny", "membership");
                Err(Error::Denied(
                    "the origin does not show this repository to berth".into(),
                ))
            }
            Ok((_, _, err)) => {
                self.count("error", "membership");
                Err(Error::Upstream(err))
            }
            // An offline mirror serves exactly what its evidence (warm-up, imported bundles)
            // covers.
            Err(UpstreamError::Offline { .. }) => {
                self.count("deny", "membership");
                Err(match target {
                    Target::Blob(_) => {
                        Error::BlobUnknown(format!("blob not in this mirror ({up} is offline)"))
                    }
                    _ => Error::ManifestUnknown(format!(
                        "manifest not in this mirror ({up} is offline)"
                    )),
                })
            }
            Err(e) if e.is_not_found() => Err(unknown()),
            Err(UpstreamError::Status { status, .. })
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
            {
                self.count("deny", "membership");
                Err(Error::Denied(
                    "the origin does not show this repository to berth".into(),
                ))
            }
            Err(e) => {
                self.count("error", "membership");
                Err(Error::Upstream(e))
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
        let anonymous = matches!(sel.auth, UpstreamAuth::Anonymous);
        let key = (principal.key.clone(), up.clone(), repo.clone());
        let member = |d: &Digest| self.members.contains(&up, &repo, d);
        let needs_member = target.digest();
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
        // A credential the origin's token service refused moments ago is not sent again yet.
        if let (Credential::Basic { .. }, Some(wait)) =
            (&principal.credential, self.logins.blocked(&principal.key))
        {
            self.count("deny", "backoff");
            return Err(required(&format!(
                "these credentials were refused by the origin; retry in {} s",
                wait.as_secs().max(1)
            )));
        }
        // Ask the origin, with the client's credentials.
        let answer = check(&sel.upstream, &self.metrics, &check_request(sel, target)).await;
        let ttl = self.decision_ttl(principal);
        match answer {
            Ok((StatusCode::OK, _, _)) => {
                self.decisions.allow(key, ttl, self.config.offline_grace);
                self.logins.succeeded(&principal.key);
                // The origin showed this digest in this repository: evidence. (The digest it
                // reports for a tag is not recorded here: the manifest it names is recorded
                // when it is fetched and verified.)
                if let Some(d) = needs_member {
                    self.members.record(&up, &repo, d);
                }
                self.count("allow", "origin");
                Ok(())
            }
            Ok((StatusCode::NOT_FOUND, _, _)) => {
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
            Ok((StatusCode::UNAUTHORIZED, _, _)) => {
                self.decisions.deny(key, self.config.deny_ttl);
                self.count("deny", "origin");
                Err(required(if anonymous {
                    "authentication required"
                } else {
                    "the origin does not accept these credentials for this repository"
                }))
            }
            Ok((StatusCode::FORBIDDEN, _, _)) => {
                self.decisions.deny(key, self.config.deny_ttl);
                self.count("deny", "origin");
                Err(Error::Denied(
                    "the origin denies access to this repository".into(),
                ))
            }
            Ok((_, _, err)) => {
                self.count("error", "origin");
                self.grace_or(&key, needs_member.is_none_or(member), || {
                    Error::Upstream(err)
                })
            }
            // The origin's token service refused the client's credentials: a "no", never graced.
            Err(UpstreamError::Status { status, .. })
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN =>
            {
                self.decisions.deny(key, self.config.deny_ttl);
                if matches!(principal.credential, Credential::Basic { .. }) {
                    self.logins.failed(&principal.key);
                }
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
            Err(UpstreamError::Token { .. }) if anonymous => {
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

    /// The clock of this authorizer's expiries (moved forward by tests instead of sleeping).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// How long an allow for this principal may be reused: the configured maximum, never past
    /// the expiry its token states.
    fn decision_ttl(&self, principal: &Principal) -> Duration {
        match &principal.credential {
            Credential::Bearer(t) => jwt::remaining_at(t.expose(), self.clock.system_now())
                .map_or(self.config.decision_ttl, |r| {
                    r.min(self.config.decision_ttl)
                }),
            _ => self.config.decision_ttl,
        }
    }

    /// The origin's token-service challenge, discovered once per hour: from `/v2/`, or, where
    /// `/v2/` asks for no authentication, from `repo` (an origin repository name), whose
    /// requests may still ask for it (a regional berth without a default upstream, registries
    /// that answer `/v2/` to anyone). `None`: no authentication asked for. A repository found
    /// open is asked again after [`OPEN_REPOSITORY_TTL`], so one that turns private is noticed.
    pub async fn origin_challenge(
        &self,
        upstream: &Upstream,
        repo: Option<&str>,
    ) -> Result<Option<Challenge>, UpstreamError> {
        let base = match self.challenges.get(upstream.name()) {
            Some(c) => c,
            None => {
                let c = upstream.discover_challenge(None).await?;
                self.challenges
                    .insert(upstream.name().to_owned(), c.clone());
                c
            }
        };
        let (Some(repo), None) = (repo, &base) else {
            return Ok(base);
        };
        let key = format!("{}\0{repo}", upstream.name());
        if let Some(c) = self.challenges.get(&key) {
            return Ok(c);
        }
        if self.open_repositories.contains_key(&key) {
            return Ok(None);
        }
        let c = upstream.discover_challenge(Some(repo)).await?;
        match &c {
            Some(_) => self.challenges.insert(key, c.clone()),
            None => self.open_repositories.insert(key, ()),
        }
        Ok(c)
    }

    /// Local users and tokens.
    pub fn local(&self) -> &Arc<LocalAuth> {
        &self.local
    }
}

/// The request that asks the origin about `target` in `sel`'s repository: a HEAD of the blob or
/// manifest, or the first tag of the listing.
fn check_request(sel: &Selected, target: Target<'_>) -> UpstreamRequest {
    let repo = &sel.name;
    let (method, path, accept) = match target {
        Target::Blob(d) => (Method::HEAD, format!("/v2/{repo}/blobs/{d}"), false),
        Target::Manifest(r) => (Method::HEAD, format!("/v2/{repo}/manifests/{r}"), true),
        Target::Listing => (Method::GET, format!("/v2/{repo}/tags/list?n=1"), false),
    };
    let mut headers = HeaderMap::new();
    if accept {
        for a in media::DEFAULT_ACCEPT {
            headers.append(header::ACCEPT, HeaderValue::from_static(a));
        }
    }
    UpstreamRequest {
        method,
        path_and_query: path,
        headers,
        scope: format!("repository:{repo}:pull"),
        auth: sel.auth.clone(),
    }
}

/// Sends a check request (counted like every origin request); returns the status, the digest
/// the origin reported, and the error its status amounts to (with its Retry-After).
async fn check(
    upstream: &Upstream,
    metrics: &Metrics,
    req: &UpstreamRequest,
) -> Result<(StatusCode, Option<Digest>, UpstreamError), UpstreamError> {
    let resp = upstream.send_counted(metrics, req).await?;
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Ok((resp.status(), digest, upstream.status_error(&resp)))
}
