//! A Docker token service for `docker-registry`'s `auth.token`, run in process.
//!
//! Tests decide who exists ([`IssuerBuilder::user`]) and who may do what
//! ([`IssuerBuilder::allow`], [`IssuerBuilder::policy`]); the issuer answers the token endpoint
//! the way Docker Hub and distribution's token servers do, and records every request so tests
//! can assert how often berth asked and with which credentials.
//!
//! - `GET /token?service=..&scope=..` with optional HTTP Basic credentials; with
//!   `offline_token=true` and credentials the answer also carries a `refresh_token`.
//! - `POST /token` with an OAuth2 form: `grant_type=password` (`username`, `password`; a
//!   `refresh_token` is returned when `access_type=offline`), or `grant_type=refresh_token`
//!   (`refresh_token`; the same refresh token is returned). Scopes are space-separated.
//! - Bad credentials or an unknown refresh token → 401. Requested actions the policy does not
//!   allow are left out of the token's `access` claim, so the registry itself answers 401.
//!
//! - Azure Container Registry's flavour: the endpoint can live at another path
//!   ([`IssuerBuilder::realm_path`], e.g. `/oauth2/token`), and the all-zero GUID user name
//!   [`REFRESH_TOKEN_USER`] with a refresh token as password (HTTP Basic or a password grant)
//!   authenticates as that refresh token's owner.
//!
//! Tokens are ES256 JWTs signed with a fresh P-256 key, or RS256 JWTs signed with a fresh
//! 2048-bit RSA key ([`IssuerBuilder::rs256`]; generated with the `openssl` CLI), whose
//! self-signed certificate travels in the `x5c` header and is the registry's `rootcertbundle`
//! ([`TokenIssuer::start_registry`]).
//! Pushing into the token-protected registry goes through a [`PushGate`], which adds an admin
//! token to each request, so every push helper of [`super::content`] works unchanged.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::Url;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{Registry, TestImage};

/// The registry's `auth.token.service`, and the `aud` claim of every token.
pub const SERVICE: &str = "test-registry";
/// The registry's `auth.token.issuer`, and the `iss` claim of every token.
pub const ISSUER: &str = "test-issuer";
/// Built-in principal allowed every action on every resource (pushes, the catalog).
pub const ADMIN_USER: &str = "admin";
/// [`ADMIN_USER`]'s password.
pub const ADMIN_PASSWORD: &str = "admin-password";
/// Clock-skew leeway distribution 2.8 adds to a token's `exp` (registry/auth/token/token.go).
///
/// The issuer writes `exp = iat + lifetime - REGISTRY_LEEWAY` so that a token stops working at
/// the registry `lifetime` after it was issued, which is what `expires_in` announces; without
/// this a 2-second token would stay valid for 62 seconds.
pub const REGISTRY_LEEWAY: Duration = Duration::from_secs(60);
/// The user name Azure Container Registry clients send with a refresh token as password.
pub const REFRESH_TOKEN_USER: &str = "00000000-0000-0000-0000-000000000000";
/// Token lifetime unless the test sets one.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Largest POST form accepted.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The JWS algorithm tokens are signed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// ECDSA P-256 with SHA-256 (the default).
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 over a 2048-bit key.
    Rs256,
}

/// Who a token request authenticated as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// No credentials.
    Anonymous,
    /// A user name (in a [`TokenRequest`], the name presented, even when the password was
    /// wrong: see its `status`).
    User(String),
}

/// Whom an [`IssuerBuilder::allow`] rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grantee {
    /// Everyone, anonymous included.
    Anyone,
    /// Only requests without credentials.
    Anonymous,
    /// Every authenticated user.
    AnyUser,
    /// One user.
    User(String),
}

/// How a token request presented its credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthKind {
    /// GET without credentials.
    Anonymous,
    /// GET with HTTP Basic.
    Basic,
    /// POST `grant_type=password`.
    PasswordGrant,
    /// POST `grant_type=refresh_token`.
    RefreshGrant,
    /// POST with another (or no) `grant_type`; answered 400.
    UnsupportedGrant(String),
    /// A request the issuer was told to refuse outright ([`IssuerBuilder::get_answers`],
    /// [`IssuerBuilder::without_post`]).
    Refused,
}

/// One `access` entry of a token: `type:name` and the actions granted on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// `repository` (or `registry` for the catalog).
    pub kind: String,
    /// Repository name, or `catalog`.
    pub name: String,
    /// Granted actions such as `pull`.
    pub actions: Vec<String>,
}

/// One request the token endpoint answered, as recorded for assertions.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// GET or POST (or anything else a client tried).
    pub method: Method,
    /// How credentials were presented.
    pub auth: AuthKind,
    /// Who the request claimed to be.
    pub principal: Principal,
    /// The `service` parameter.
    pub service: Option<String>,
    /// The requested scopes, one `type:name:actions` each.
    pub scopes: Vec<String>,
    /// The `client_id` parameter (OAuth2 POSTs).
    pub client_id: Option<String>,
    /// The status the issuer answered.
    pub status: StatusCode,
    /// What went into the token (empty unless `status` is 200).
    pub granted: Vec<Access>,
}

/// Decides the repository actions a principal may have: `(principal, repository) → actions`.
pub type PolicyFn = Arc<dyn Fn(&Principal, &str) -> Vec<String> + Send + Sync>;

/// Configures a [`TokenIssuer`]; `TokenIssuer::builder()....start().await`.
pub struct IssuerBuilder {
    settings: Settings,
}

/// A running token service; stops when dropped.
pub struct TokenIssuer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    dir: TempDir,
    task: JoinHandle<()>,
}

/// A forwarding proxy in front of a token-protected registry that authorizes every request as
/// [`ADMIN_USER`]; give its URL to the push helpers of [`super::content`]. Stops when dropped.
pub struct PushGate {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// What the test can change, also while the issuer runs.
#[derive(Clone)]
struct Settings {
    users: HashMap<String, String>,
    rules: Vec<(Grantee, String, Vec<String>)>,
    policy: Option<PolicyFn>,
    lifetime: Duration,
    advertised: Option<Duration>,
    get_status: Option<StatusCode>,
    post_enabled: bool,
    algorithm: Algorithm,
    realm_path: String,
}

/// The signing key.
enum Signer {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

/// State shared by the handle and the server task.
struct Inner {
    key: Signer,
    x5c: String,
    rng: SystemRandom,
    settings: Mutex<Settings>,
    log: Mutex<Vec<TokenRequest>>,
    refresh_tokens: Mutex<HashMap<String, String>>,
    next_id: AtomicU64,
    /// Token requests received so far (counted on arrival, before any hold).
    arrived: AtomicU64,
    /// While true, token requests wait before being answered.
    hold: tokio::sync::watch::Sender<bool>,
}

/// An answer before it is recorded and turned into a response.
struct Answer {
    auth: AuthKind,
    principal: Principal,
    status: StatusCode,
    body: Value,
    granted: Vec<Access>,
}

// === impl Principal ===

impl Principal {
    /// `Principal::User(name)`.
    pub fn user(name: &str) -> Principal {
        Principal::User(name.to_owned())
    }

    /// The `sub` claim: the user name, empty for anonymous (as distribution's servers do).
    pub fn subject(&self) -> &str {
        match self {
            Principal::Anonymous => "",
            Principal::User(name) => name,
        }
    }
}

// === impl Grantee ===

impl Grantee {
    /// `Grantee::User(name)`.
    pub fn user(name: &str) -> Grantee {
        Grantee::User(name.to_owned())
    }

    fn covers(&self, principal: &Principal) -> bool {
        match (self, principal) {
            (Grantee::Anyone, _) => true,
            (Grantee::Anonymous, Principal::Anonymous) => true,
            (Grantee::AnyUser, Principal::User(_)) => true,
            (Grantee::User(want), Principal::User(name)) => want == name,
            _ => false,
        }
    }
}

// === impl IssuerBuilder ===

impl IssuerBuilder {
    /// Adds a user who may authenticate with `password`.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.settings
            .users
            .insert(name.to_owned(), password.to_owned());
        self
    }

    /// Grants `actions` (`"*"` = every requested action) on repositories matching `pattern`,
    /// where `*` matches any run of characters, `/` included: `"private/*"`, `"*"`,
    /// `"team/app"`. Rules add up; nothing is allowed unless a rule or the policy allows it.
    pub fn allow(mut self, who: Grantee, pattern: &str, actions: &[&str]) -> Self {
        self.settings.rules.push((
            who,
            pattern.to_owned(),
            actions.iter().map(|a| (*a).to_owned()).collect(),
        ));
        self
    }

    /// Adds a policy function; its actions are granted in addition to the rules'.
    pub fn policy(
        mut self,
        policy: impl Fn(&Principal, &str) -> Vec<String> + Send + Sync + 'static,
    ) -> Self {
        self.settings.policy = Some(Arc::new(policy));
        self
    }

    /// Token lifetime: `expires_in` in answers and, at the registry, the real one (whole
    /// seconds; see [`REGISTRY_LEEWAY`]).
    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.settings.lifetime = lifetime;
        self
    }

    /// Announces `expires_in = advertised` while tokens still die after [`Self::expires_in`]:
    /// a client that trusts the announcement then holds a token the registry rejects.
    pub fn advertise_expires_in(mut self, advertised: Duration) -> Self {
        self.settings.advertised = Some(advertised);
        self
    }

    /// Every GET of the token endpoint answers `status` (e.g. 405 or 404, as token services that
    /// only speak OAuth2 POST do).
    pub fn get_answers(mut self, status: StatusCode) -> Self {
        self.settings.get_status = Some(status);
        self
    }

    /// POSTs to the token endpoint answer 405.
    pub fn without_post(mut self) -> Self {
        self.settings.post_enabled = false;
        self
    }

    /// Signs tokens with `algorithm` ([`Algorithm::Es256`] unless set).
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.settings.algorithm = algorithm;
        self
    }

    /// Signs tokens RS256, as distribution's reference token servers and Docker Hub do.
    pub fn rs256(self) -> Self {
        self.algorithm(Algorithm::Rs256)
    }

    /// Serves the token endpoint at `path` instead of `/token` (Azure Container Registry:
    /// `/oauth2/token`); [`TokenIssuer::realm`] follows.
    pub fn realm_path(mut self, path: &str) -> Self {
        assert!(path.starts_with('/'), "realm path must start with '/'");
        self.settings.realm_path = path.to_owned();
        self
    }

    /// Generates the signing key and certificate and starts serving on 127.0.0.1.
    pub async fn start(self) -> TokenIssuer {
        let rng = SystemRandom::new();
        let (key_pair, key) = match self.settings.algorithm {
            Algorithm::Es256 => {
                let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .expect("generate P-256 key");
                let key = EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &key_pair.serialize_der(),
                    &rng,
                )
                .expect("ring accepts rcgen's PKCS#8 key");
                (key_pair, Signer::Es256(key))
            }
            Algorithm::Rs256 => {
                // Neither ring nor rcgen generates RSA keys; the openssl CLI does.
                let pem = tokio::task::spawn_blocking(generate_rsa_pkcs8_pem)
                    .await
                    .expect("RSA key generation task");
                let key_pair =
                    rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256)
                        .expect("rcgen accepts openssl's PKCS#8 RSA key");
                let key = RsaKeyPair::from_pkcs8(&key_pair.serialize_der())
                    .expect("ring accepts openssl's PKCS#8 RSA key");
                (key_pair, Signer::Rs256(key))
            }
        };
        let mut params =
            rcgen::CertificateParams::new(vec![ISSUER.to_owned()]).expect("certificate params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, ISSUER);
        let cert = params.self_signed(&key_pair).expect("self-sign token cert");
        let dir = tempfile::Builder::new()
            .prefix("berth-issuer-")
            .tempdir()
            .expect("create issuer temp dir");
        std::fs::write(dir.path().join("token-cert.pem"), cert.pem()).expect("write cert PEM");

        let inner = Arc::new(Inner {
            key,
            x5c: STANDARD.encode(cert.der()),
            rng,
            settings: Mutex::new(self.settings),
            log: Mutex::default(),
            refresh_tokens: Mutex::default(),
            next_id: AtomicU64::new(1),
            arrived: AtomicU64::new(0),
            hold: tokio::sync::watch::channel(false).0,
        });
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind issuer listener");
        let addr = listener.local_addr().expect("issuer local addr");
        let served = inner.clone();
        let task = tokio::spawn(serve(listener, move |request| {
            let inner = served.clone();
            async move { Ok::<_, Infallible>(inner.answer(request).await) }
        }));
        TokenIssuer {
            addr,
            inner,
            dir,
            task,
        }
    }
}

// === impl TokenIssuer ===

impl TokenIssuer {
    /// A builder with only the built-in [`ADMIN_USER`] and 5-minute tokens.
    pub fn builder() -> IssuerBuilder {
        IssuerBuilder {
            settings: Settings {
                users: HashMap::from([(ADMIN_USER.to_owned(), ADMIN_PASSWORD.to_owned())]),
                rules: Vec::new(),
                policy: None,
                lifetime: DEFAULT_LIFETIME,
                advertised: None,
                get_status: None,
                post_enabled: true,
                algorithm: Algorithm::Es256,
                realm_path: "/token".to_owned(),
            },
        }
    }

    /// Base URL without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint, the registry's `auth.token.realm` (`/token` unless
    /// [`IssuerBuilder::realm_path`] says otherwise).
    pub fn realm(&self) -> String {
        let path = self.inner.settings.lock().unwrap().realm_path.clone();
        format!("{}{path}", self.url())
    }

    /// The JWS algorithm of this issuer's tokens.
    pub fn algorithm(&self) -> Algorithm {
        match self.inner.key {
            Signer::Es256(_) => Algorithm::Es256,
            Signer::Rs256(_) => Algorithm::Rs256,
        }
    }

    /// Every refresh token issued so far (to assert none leaks).
    pub fn refresh_tokens(&self) -> Vec<String> {
        self.inner
            .refresh_tokens
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    /// PEM file of the signing certificate, the registry's `auth.token.rootcertbundle`.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("token-cert.pem")
    }

    /// The `auth:` section that makes a registry trust this issuer.
    pub fn registry_auth_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: \"{}\"\n    service: \"{SERVICE}\"\n    issuer: \"{ISSUER}\"\n    rootcertbundle: \"{}\"\n",
            self.realm(),
            self.cert_path().display()
        )
    }

    /// Starts a `docker-registry` that accepts only this issuer's tokens.
    pub async fn start_registry(&self) -> Registry {
        Registry::start_with_config(&self.registry_auth_yaml()).await
    }

    /// Signs a token for `principal` with exactly `access`, without an HTTP round trip and
    /// without consulting the policy (for the push gate, or to hand-craft tokens).
    pub fn mint(&self, principal: &Principal, access: &[Access]) -> String {
        self.inner.mint(principal, access)
    }

    /// Every token request so far, in arrival order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.inner.log.lock().unwrap().clone()
    }

    /// How many recorded requests match `filter`.
    pub fn count(&self, filter: impl Fn(&TokenRequest) -> bool) -> usize {
        self.inner
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| filter(r))
            .count()
    }

    /// Tokens issued (200 answers) to `principal` with `method` (`None`: any method).
    pub fn issued(&self, principal: &Principal, method: Option<Method>) -> usize {
        self.count(|r| {
            r.status == StatusCode::OK
                && &r.principal == principal
                && method.as_ref().is_none_or(|m| *m == r.method)
        })
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        self.inner.log.lock().unwrap().clear();
    }

    /// Changes the token lifetime for tokens issued from now on.
    pub fn set_expires_in(&self, lifetime: Duration) {
        self.inner.settings.lock().unwrap().lifetime = lifetime;
    }

    /// Changes `user`'s password from now on, or (`None`) removes the user: a revoked or
    /// rotated credential. Tokens already issued stay valid until they expire.
    pub fn set_password(&self, user: &str, password: Option<&str>) {
        let mut settings = self.inner.settings.lock().unwrap();
        match password {
            Some(p) => settings.users.insert(user.to_owned(), p.to_owned()),
            None => settings.users.remove(user),
        };
    }

    /// Changes how GETs are answered from now on (`None`: serve them).
    pub fn set_get_answers(&self, status: Option<StatusCode>) {
        self.inner.settings.lock().unwrap().get_status = status;
    }

    /// From now on, token requests are counted on arrival and then wait, unanswered, until
    /// [`TokenIssuer::release`].
    pub fn hold(&self) {
        self.inner.hold.send_replace(true);
    }

    /// Answers the held token requests and stops holding.
    pub fn release(&self) {
        self.inner.hold.send_replace(false);
    }

    /// Token requests that have arrived so far, answered or held.
    pub fn arrived(&self) -> u64 {
        self.inner.arrived.load(Ordering::SeqCst)
    }

    /// Starts a [`PushGate`] in front of `registry`.
    pub async fn push_gate(&self, registry: &Registry) -> PushGate {
        PushGate::start(self.inner.clone(), registry.addr()).await
    }

    /// Pushes an OCI image into the token-protected `registry` as [`ADMIN_USER`]; see
    /// [`super::push_oci_image`].
    pub async fn push_oci_image(
        &self,
        registry: &Registry,
        repo: &str,
        tag: &str,
        layer_sizes: &[usize],
        seed: u64,
    ) -> TestImage {
        let gate = self.push_gate(registry).await;
        super::push_oci_image(&gate.url(), repo, tag, layer_sizes, seed).await
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Inner ===

impl Inner {
    /// Answers one request to the issuer and records it.
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let _ = self.hold.subscribe().wait_for(|held| !*held).await;
        let settings = self.settings.lock().unwrap().clone();
        if request.uri().path() != settings.realm_path {
            return json_response(StatusCode::NOT_FOUND, &json!({"details": "not found"}));
        }
        let method = request.method().clone();
        let mut params = form_pairs(request.uri().query().unwrap_or(""));
        let basic = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_basic);
        let refused = match method {
            Method::GET => settings.get_status,
            Method::POST if !settings.post_enabled => Some(StatusCode::METHOD_NOT_ALLOWED),
            Method::POST => None,
            _ => Some(StatusCode::METHOD_NOT_ALLOWED),
        };
        if method == Method::POST && refused.is_none() {
            let limited = Limited::new(request.into_body(), MAX_FORM_BYTES);
            match limited.collect().await {
                Ok(body) => {
                    params.extend(form_pairs(&String::from_utf8_lossy(&body.to_bytes())));
                }
                Err(_) => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"error": "invalid_request"}),
                    )
                }
            }
        }
        let param = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let scopes: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect();

        let answer = match refused {
            Some(status) => Answer {
                auth: AuthKind::Refused,
                principal: basic
                    .as_ref()
                    .map(|(user, _)| user.clone())
                    .or_else(|| param("username"))
                    .map_or(Principal::Anonymous, Principal::User),
                status,
                body: json!({"details": format!("{method} is not served here")}),
                granted: Vec::new(),
            },
            None if method == Method::GET => {
                let offline = param("offline_token").as_deref() == Some("true");
                match basic {
                    None => self.grant(
                        &settings,
                        AuthKind::Anonymous,
                        Principal::Anonymous,
                        &scopes,
                        false,
                    ),
                    Some((user, password)) => self.login(
                        &settings,
                        AuthKind::Basic,
                        &user,
                        &password,
                        &scopes,
                        offline,
                    ),
                }
            }
            None => match param("grant_type").as_deref() {
                Some("password") => {
                    let user = param("username").unwrap_or_default();
                    let password = param("password").unwrap_or_default();
                    let offline = param("access_type").as_deref() == Some("offline");
                    self.login(
                        &settings,
                        AuthKind::PasswordGrant,
                        &user,
                        &password,
                        &scopes,
                        offline,
                    )
                }
                Some("refresh_token") => {
                    let presented = param("refresh_token").unwrap_or_default();
                    let owner = self.refresh_tokens.lock().unwrap().get(&presented).cloned();
                    match owner {
                        Some(user) => {
                            let mut answer = self.grant(
                                &settings,
                                AuthKind::RefreshGrant,
                                Principal::User(user),
                                &scopes,
                                false,
                            );
                            answer.body["refresh_token"] = Value::String(presented);
                            answer
                        }
                        None => Answer {
                            auth: AuthKind::RefreshGrant,
                            principal: Principal::Anonymous,
                            status: StatusCode::UNAUTHORIZED,
                            body: json!({"error": "invalid_grant"}),
                            granted: Vec::new(),
                        },
                    }
                }
                other => Answer {
                    auth: AuthKind::UnsupportedGrant(other.unwrap_or_default().to_owned()),
                    principal: Principal::Anonymous,
                    status: StatusCode::BAD_REQUEST,
                    body: json!({"error": "unsupported_grant_type"}),
                    granted: Vec::new(),
                },
            },
        };
        let response = json_response(answer.status, &answer.body);
        self.log.lock().unwrap().push(TokenRequest {
            method,
            auth: answer.auth,
            principal: answer.principal,
            service: param("service"),
            scopes,
            client_id: param("client_id"),
            status: answer.status,
            granted: answer.granted,
        });
        response
    }

    /// Checks a user's password, then issues a token (401 on a bad user or password).
    ///
    /// [`REFRESH_TOKEN_USER`] with a known refresh token as password logs in as the refresh
    /// token's owner (Azure Container Registry's `docker login` with a token).
    fn login(
        &self,
        settings: &Settings,
        auth: AuthKind,
        user: &str,
        password: &str,
        scopes: &[String],
        offline: bool,
    ) -> Answer {
        if user == REFRESH_TOKEN_USER {
            let owner = self.refresh_tokens.lock().unwrap().get(password).cloned();
            return match owner {
                Some(owner) => self.grant(settings, auth, Principal::User(owner), scopes, offline),
                None => Answer {
                    auth,
                    principal: Principal::user(user),
                    status: StatusCode::UNAUTHORIZED,
                    body: json!({"details": "invalid refresh token"}),
                    granted: Vec::new(),
                },
            };
        }
        if settings.users.get(user).map(String::as_str) != Some(password) {
            return Answer {
                auth,
                principal: Principal::user(user),
                status: StatusCode::UNAUTHORIZED,
                body: json!({"details": "incorrect username or password"}),
                granted: Vec::new(),
            };
        }
        self.grant(settings, auth, Principal::user(user), scopes, offline)
    }

    /// Issues a token for `principal` with the allowed part of `scopes`.
    fn grant(
        &self,
        settings: &Settings,
        auth: AuthKind,
        principal: Principal,
        scopes: &[String],
        offline: bool,
    ) -> Answer {
        let granted: Vec<Access> = scopes
            .iter()
            .filter_map(|scope| allowed(settings, &principal, scope))
            .collect();
        let token = self.mint_for(&principal, &granted, settings.lifetime);
        let expires_in = settings.advertised.unwrap_or(settings.lifetime).as_secs();
        let mut body = json!({
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": rfc3339(SystemTime::now()),
        });
        if let (true, Principal::User(user)) = (offline, &principal) {
            let refresh = format!("refresh-{}", self.random_hex());
            self.refresh_tokens
                .lock()
                .unwrap()
                .insert(refresh.clone(), user.clone());
            body["refresh_token"] = Value::String(refresh);
        }
        Answer {
            auth,
            principal,
            status: StatusCode::OK,
            body,
            granted,
        }
    }

    fn mint(&self, principal: &Principal, access: &[Access]) -> String {
        let lifetime = self.settings.lock().unwrap().lifetime;
        self.mint_for(principal, access, lifetime)
    }

    /// The compact JWS over `base64url(header).base64url(claims)`: ES256 (signature r‖s) or
    /// RS256 (PKCS#1 v1.5).
    fn mint_for(&self, principal: &Principal, access: &[Access], lifetime: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        let exp = now + lifetime.as_secs() as i64 - REGISTRY_LEEWAY.as_secs() as i64;
        let alg = match self.key {
            Signer::Es256(_) => "ES256",
            Signer::Rs256(_) => "RS256",
        };
        let header = json!({"typ": "JWT", "alg": alg, "x5c": [self.x5c]});
        let claims = json!({
            "iss": ISSUER,
            "sub": principal.subject(),
            "aud": SERVICE,
            "exp": exp,
            "nbf": now.min(exp),
            "iat": now,
            "jti": format!("{}-{}", self.next_id.fetch_add(1, Ordering::Relaxed), self.random_hex()),
            "access": access.iter().map(|a| json!({
                "type": a.kind,
                "name": a.name,
                "actions": a.actions,
            })).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match &self.key {
            Signer::Es256(key) => key
                .sign(&self.rng, signing_input.as_bytes())
                .expect("ES256 signing")
                .as_ref()
                .to_vec(),
            Signer::Rs256(key) => {
                let mut signature = vec![0u8; key.public().modulus_len()];
                key.sign(
                    &RSA_PKCS1_SHA256,
                    &self.rng,
                    signing_input.as_bytes(),
                    &mut signature,
                )
                .expect("RS256 signing");
                signature
            }
        };
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn random_hex(&self) -> String {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes).expect("random bytes");
        hex::encode(bytes)
    }
}

/// A fresh 2048-bit RSA key as PKCS#8 PEM, from `openssl genpkey`.
fn generate_rsa_pkcs8_pem() -> String {
    let openssl = super::require_binary("openssl");
    let output = std::process::Command::new(&openssl)
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", openssl.display()));
    assert!(
        output.status.success(),
        "openssl genpkey failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("PEM is ASCII")
}

/// The granted part of one requested `type:name:actions` scope, if any action is granted.
fn allowed(settings: &Settings, principal: &Principal, scope: &str) -> Option<Access> {
    // The name may contain ':' (a registry host:port); type and actions may not.
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let requested: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
    let admin = *principal == Principal::user(ADMIN_USER);
    let mut may: Vec<String> = Vec::new();
    if kind == "repository" && !admin {
        for (who, pattern, actions) in &settings.rules {
            if who.covers(principal) && glob(pattern, name) {
                may.extend(actions.iter().cloned());
            }
        }
        if let Some(policy) = &settings.policy {
            may.extend(policy(principal, name));
        }
    }
    let granted: Vec<String> = requested
        .iter()
        .filter(|a| admin || may.iter().any(|m| m == "*" || m == *a))
        .map(|a| (*a).to_owned())
        .collect();
    (!granted.is_empty()).then(|| Access {
        kind: kind.to_owned(),
        name: name.to_owned(),
        actions: granted,
    })
}

/// `*` matches any run of characters (`/` included); everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((prefix, rest)) => text.strip_prefix(prefix).is_some_and(|tail| {
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }),
    }
}

/// `(user, password)` from an `Authorization: Basic ...` value.
fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `application/x-www-form-urlencoded` pairs (query strings and POST forms alike).
fn form_pairs(encoded: &str) -> Vec<(String, String)> {
    let mut url = Url::parse("http://form.invalid/").expect("static URL");
    url.set_query(Some(encoded));
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC), the form of the token answer's `issued_at`.
fn rfc3339(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

// === impl PushGate ===

impl PushGate {
    async fn start(inner: Arc<Inner>, registry: SocketAddr) -> PushGate {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind push gate listener");
        let addr = listener.local_addr().expect("push gate local addr");
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let task = tokio::spawn(serve(listener, move |request| {
            let (inner, client) = (inner.clone(), client.clone());
            async move { forward_as_admin(&inner, &client, registry, request).await }
        }));
        PushGate { addr, task }
    }

    /// Base URL without a trailing slash; registry `Location`s point back here.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for PushGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one request to the registry with an admin token for the repository in its path.
///
/// The client's `Host` is kept, so the upload `Location`s the registry builds from it lead back
/// through the gate.
async fn forward_as_admin(
    inner: &Inner,
    client: &Client<HttpConnector, Incoming>,
    registry: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let access = match repository_of(parts.uri.path()) {
        Some(name) => vec![Access {
            kind: "repository".into(),
            name: name.to_owned(),
            actions: vec!["pull".into(), "push".into(), "delete".into()],
        }],
        None if parts.uri.path() == "/v2/_catalog" => vec![Access {
            kind: "registry".into(),
            name: "catalog".into(),
            actions: vec!["*".into()],
        }],
        None => Vec::new(),
    };
    let token = inner.mint_for(&Principal::user(ADMIN_USER), &access, DEFAULT_LIFETIME);
    parts.headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value"),
    );
    if !parts.headers.contains_key(HOST) {
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(HOST, host);
        }
    }
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(registry.to_string())
        .path_and_query(path_and_query)
        .build()
        .expect("registry URI");
    parts.version = Version::HTTP_11;
    client.request(Request::from_parts(parts, body)).await
}

/// The repository a `/v2/<name>/{blobs,manifests,tags}/...` path names.
fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    // The rightmost marker ends the name: a repository may itself contain `tags/` or `blobs/`.
    ["/blobs/", "/manifests/", "/tags/"]
        .iter()
        .filter_map(|marker| rest.rfind(marker))
        .max()
        .map(|end| &rest[..end])
}

/// Accepts connections on `listener` and serves each with `handler` until aborted.
async fn serve<F, Fut, B, E>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    super::accept_each(listener, move |stream| {
        let handler = handler.clone();
        async move {
            let service = hyper::service::service_fn(handler);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}
