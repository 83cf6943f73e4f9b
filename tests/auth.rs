//! Client authorization (docs/ARCHITECTURE.md, "Authorization", issue "Pulls authorized by the origin's token service"):
//! berth in front of a real `docker-registry` with `auth.token`, whose RS256 tokens come from
//! the in-process test issuer (`common::issuer`).
//!
//! Principals: alice may pull `private/*` and `public/*`, bob `team-b/*` and `public/*`,
//! anonymous `public/*`. Every client does the real token dance through berth (request → 401 →
//! `WWW-Authenticate` → berth's `/token` → Bearer), and berth's answers are compared with what
//! the origin itself answers the same principal. Logs (captured in process), metrics and error
//! bodies are checked for every password and token the suite used.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use common::berth::Berth;
use common::content::{
    pseudo_random, sha256_digest, tar_with_file, DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX,
    OCI_LAYER_TAR, OCI_MANIFEST,
};
use common::issuer::{
    Access, Algorithm, AuthKind, Grantee, IssuerBuilder, Principal, TokenIssuer,
    REFRESH_TOKEN_USER, SERVICE,
};
use common::{push_blob, push_manifest, require_binary, Registry, TestImage};
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

const ALICE: &str = "alice";
const ALICE_PASSWORD: &str = "pw-alice-7Hq2-zebra";
const BOB: &str = "bob";
const BOB_PASSWORD: &str = "pw-bob-K4m9-walrus";
/// berth's own user at the origin (service mode).
const ROBOT: &str = "berth-robot";
const ROBOT_PASSWORD: &str = "pw-robot-Zp3x-heron";
/// A local (htpasswd) user of berth in service mode.
const CAROL: &str = "carol";
const CAROL_PASSWORD: &str = "pw-carol-Wd8s-otter";
/// A static bearer token of berth in service mode.
const STATIC_TOKEN: &str = "static-tok-Qa5v-9f8e7d6c5b4a";
/// Passwords that must be refused, and must not leak either.
const WRONG_PASSWORD: &str = "pw-wrong-Ur6t-lynx";
/// berth's name for the origin (the `service` of its challenges).
const UPSTREAM: &str = "origin";
/// Longest any single request may take: an auth failure is an answer, not a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

const PRIVATE: &str = "private/app";
const TEAM: &str = "team-b/tool";
const PUBLIC: &str = "public/base";
const OTHER: &str = "public/other";
/// The repositories of the matrix.
const MATRIX_REPOS: [&str; 3] = [PRIVATE, TEAM, PUBLIC];
/// Every repository at the origin.
const ALL_REPOS: [&str; 4] = [PRIVATE, TEAM, PUBLIC, OTHER];

// ---------------------------------------------------------------------------------------------
// Captured logs and the secrets that must never appear in them.

/// Everything the process logged at DEBUG and above since the first test started.
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
/// Every password and token the suite used or received.
static SECRETS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Writes formatted events into [`LOGS`].
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// Installs the capturing subscriber (once per test binary) and registers the fixed passwords.
/// Every test calls it first, so no berth code runs before logs are captured.
fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
            .with_ansi(false)
            .with_target(true)
            .with_writer(Capture(buffer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global tracing subscriber in this test binary");
        buffer
    });
    for (user, password) in [
        (ALICE, ALICE_PASSWORD),
        (BOB, BOB_PASSWORD),
        (ROBOT, ROBOT_PASSWORD),
        (CAROL, CAROL_PASSWORD),
        (ALICE, WRONG_PASSWORD),
        (CAROL, WRONG_PASSWORD),
    ] {
        remember_secret(password);
        remember_secret(&STANDARD.encode(format!("{user}:{password}")));
    }
    remember_secret(STATIC_TOKEN);
}

fn captured_logs() -> String {
    let buffer = LOGS.get().expect("capture_logs() called first");
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}

/// Records a secret; JWTs also by their payload and signature (unique per token), so a
/// truncated or split token is found too.
fn remember_secret(secret: &str) {
    let mut secrets = SECRETS.lock().unwrap();
    secrets.insert(secret.to_owned());
    let parts: Vec<&str> = secret.split('.').collect();
    if parts.len() == 3 {
        for part in &parts[1..] {
            if part.len() >= 16 {
                secrets.insert((*part).to_owned());
            }
        }
    }
}

/// Asserts no secret recorded so far appears in any of `texts` (`(what, text)`).
fn assert_no_secrets(texts: &[(&str, &str)]) {
    let secrets = SECRETS.lock().unwrap().clone();
    for (what, text) in texts {
        for secret in secrets.iter().filter(|s| s.len() >= 8) {
            if let Some(at) = text.find(secret.as_str()) {
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                panic!(
                    "{what} contains a secret ({}…): {}",
                    &secret[..8],
                    &text[line_start..line_end]
                );
            }
        }
    }
}

/// The suite-wide check: captured logs, berth's metrics and `bodies` (error answers) carry no
/// password or token.
async fn assert_nothing_leaked(berth: &Berth, bodies: &[String]) {
    let logs = captured_logs();
    // The capture is shared by every test of this binary: ask for this berth's own start-up
    // line (it names the listener's address), not just any of berth's events.
    let own = format!("addr={}", berth.addr);
    assert!(
        logs.lines()
            .any(|l| l.contains("berth listening") && l.contains(&own)),
        "the log capture saw nothing of this test's berth ({own}), so it proves nothing"
    );
    let metrics = berth.metrics().await;
    let mut texts = vec![
        ("captured logs", logs.as_str()),
        ("metrics", metrics.as_str()),
    ];
    texts.extend(bodies.iter().map(|b| ("an answer body", b.as_str())));
    assert_no_secrets(&texts);
}

// ---------------------------------------------------------------------------------------------
// Principals, the origin, its content.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Who {
    Alice,
    Bob,
    Anonymous,
    /// berth's local user (service mode).
    Carol,
    /// berth's static token `ci` (service mode), sent as a Basic password.
    Ci,
}

const EVERYONE: [Who; 3] = [Who::Alice, Who::Bob, Who::Anonymous];

impl Who {
    fn credentials(self) -> Option<(&'static str, &'static str)> {
        match self {
            Who::Alice => Some((ALICE, ALICE_PASSWORD)),
            Who::Bob => Some((BOB, BOB_PASSWORD)),
            Who::Anonymous => None,
            Who::Carol => Some((CAROL, CAROL_PASSWORD)),
            Who::Ci => Some(("ci", STATIC_TOKEN)),
        }
    }

    /// The issuer's policy, restated: which repositories this principal may pull.
    fn may_pull(self, repo: &str) -> bool {
        repo.starts_with("public/")
            || match self {
                Who::Alice => repo.starts_with("private/"),
                Who::Bob => repo.starts_with("team-b/"),
                Who::Anonymous | Who::Carol | Who::Ci => false,
            }
    }

    /// Who warms the cache before this principal's requests to `repo`: another principal who
    /// may pull it, or (nobody else may) the same principal in another session.
    fn warmer_for(self, repo: &str) -> Who {
        EVERYONE
            .into_iter()
            .find(|w| *w != self && w.may_pull(repo))
            .unwrap_or(self)
    }
}

/// alice: `private/*`, bob: `team-b/*`, everyone (anonymous included): `public/*`; RS256.
fn policy_issuer() -> IssuerBuilder {
    TokenIssuer::builder()
        .rs256()
        .user(ALICE, ALICE_PASSWORD)
        .user(BOB, BOB_PASSWORD)
        .allow(Grantee::user(ALICE), "private/*", &["pull"])
        .allow(Grantee::user(BOB), "team-b/*", &["pull"])
        .allow(Grantee::Anyone, "public/*", &["pull"])
}

/// [`policy_issuer`], plus berth's own user (service mode) allowed to pull `pattern`.
fn robot_issuer(pattern: &str) -> IssuerBuilder {
    policy_issuer()
        .user(ROBOT, ROBOT_PASSWORD)
        .allow(Grantee::user(ROBOT), pattern, &["pull"])
}

/// The images at the origin. `private` shares its first layer with `public` (`shared`).
struct Content {
    private: TestImage,
    team: TestImage,
    public: TestImage,
    other: TestImage,
    shared: String,
}

impl Content {
    fn image(&self, repo: &str) -> &TestImage {
        match repo {
            PRIVATE => &self.private,
            TEAM => &self.team,
            PUBLIC => &self.public,
            OTHER => &self.other,
            other => panic!("no image in {other}"),
        }
    }

    fn belongs(&self, digest: &str, repo: &str) -> bool {
        let image = self.image(repo);
        image.manifest_digest == digest || image.blobs().iter().any(|(d, _)| *d == digest)
    }

    /// Byte strings only alice may ever receive: the private manifest and config whole, and
    /// three 64-byte windows of the private layer (whose content is random).
    fn private_needles(&self) -> Vec<(String, Vec<u8>)> {
        let mut needles = vec![
            (
                "private manifest".to_owned(),
                self.private.manifest_bytes.clone(),
            ),
            (
                "private config".to_owned(),
                self.private.config_bytes.clone(),
            ),
        ];
        for (digest, bytes) in &self.private.layers {
            if *digest == self.shared {
                continue;
            }
            for at in [bytes.len() / 8, bytes.len() / 2, bytes.len() * 7 / 8] {
                needles.push((
                    format!("private layer {digest} @{at}"),
                    bytes[at..at + 64].to_vec(),
                ));
            }
        }
        needles
    }

    /// Where `bodies` hold a byte of alice's private content.
    fn private_leaks(&self, who: Who, bodies: &[(String, Vec<u8>)]) -> Vec<String> {
        let mut leaks = Vec::new();
        for (needle_name, needle) in self.private_needles() {
            for (request, body) in bodies {
                if contains(body, &needle) {
                    leaks.push(format!("{who:?} received {needle_name} from {request}"));
                }
            }
        }
        leaks
    }

    /// Asserts none of `bodies` holds a byte of alice's private content.
    fn assert_no_private_bytes(&self, who: Who, bodies: &[(String, Vec<u8>)]) {
        let leaks = self.private_leaks(who, bodies);
        assert!(leaks.is_empty(), "{}", leaks.join("\n"));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The token issuer, the registry trusting it, and the content pushed into it.
struct Origin {
    issuer: TokenIssuer,
    registry: Registry,
    content: Content,
}

async fn start_origin(builder: IssuerBuilder) -> Origin {
    let issuer = builder.start().await;
    let registry = issuer.start_registry().await;
    let content = push_content(&issuer, &registry).await;
    Origin {
        issuer,
        registry,
        content,
    }
}

async fn push_content(issuer: &TokenIssuer, registry: &Registry) -> Content {
    let public = issuer
        .push_oci_image(registry, PUBLIC, "1.0", &[4_096, 9_000], 11)
        .await;
    let team = issuer
        .push_oci_image(registry, TEAM, "2.0", &[3_000, 20_000], 22)
        .await;
    let other = issuer
        .push_oci_image(registry, OTHER, "3.0", &[2_000], 33)
        .await;
    // private/app: public/base's first layer plus a private one.
    let shared = public.layers[0].clone();
    let secret = tar_with_file("secret.bin", &pseudo_random(0x5ec2e7, 70_000));
    let layers = vec![shared.clone(), (sha256_digest(&secret), secret)];
    let config_bytes = serde_json::to_vec(&json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": { "dev.berth.test.owner": "alice", "secret": "private-config-8d1c" } },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|(d, _)| d).collect::<Vec<_>>() },
    }))
    .unwrap();
    let config_digest = sha256_digest(&config_bytes);
    let manifest_bytes = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config_bytes.len() },
        "layers": layers.iter().map(|(d, b)| json!({
            "mediaType": OCI_LAYER_TAR, "digest": d, "size": b.len(),
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let private = TestImage {
        repo: PRIVATE.to_owned(),
        tag: "v1".to_owned(),
        manifest_digest: sha256_digest(&manifest_bytes),
        manifest_bytes,
        media_type: OCI_MANIFEST.to_owned(),
        config_digest,
        config_bytes,
        layers,
    };
    let gate = issuer.push_gate(registry).await;
    for (digest, bytes) in private.blobs() {
        assert_eq!(push_blob(&gate.url(), PRIVATE, bytes).await, digest);
    }
    let pushed = push_manifest(
        &gate.url(),
        PRIVATE,
        &private.tag,
        OCI_MANIFEST,
        &private.manifest_bytes,
    )
    .await;
    assert_eq!(pushed, private.manifest_digest);
    Content {
        private,
        team,
        public,
        other,
        shared: shared.0,
    }
}

/// A passthrough upstream for `origin`'s registry, plus `auth` (an `[auth]` table or nothing).
fn passthrough_config(registry: &Registry, auth: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{UPSTREAM}\"\nurl = \"{}\"\ndefault = true\nauth = \"passthrough\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n{auth}",
        registry.url()
    )
}

async fn passthrough_berth(origin: &Origin, auth: &str) -> Berth {
    Berth::with_upstreams(&passthrough_config(&origin.registry, auth))
        .start()
        .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

// ---------------------------------------------------------------------------------------------
// Requests, answers, and a client doing the token dance.

/// One registry API read.
#[derive(Clone, Debug)]
struct Req {
    method: Method,
    /// `/v2/<name>/manifests/<ref>` or `/v2/<name>/blobs/<digest>`.
    path: String,
    range: Option<&'static str>,
    /// `If-None-Match` to send, if any.
    if_none_match: Option<String>,
}

impl Req {
    fn manifest(repo: &str, reference: &str) -> Req {
        Req {
            method: Method::GET,
            path: format!("/v2/{repo}/manifests/{reference}"),
            range: None,
            if_none_match: None,
        }
    }

    fn blob(repo: &str, digest: &str) -> Req {
        Req {
            method: Method::GET,
            path: format!("/v2/{repo}/blobs/{digest}"),
            range: None,
            if_none_match: None,
        }
    }

    fn head(mut self) -> Req {
        self.method = Method::HEAD;
        self
    }

    fn range(mut self, range: &'static str) -> Req {
        self.range = Some(range);
        self
    }

    fn if_none_match(mut self, etag: &str) -> Req {
        self.if_none_match = Some(etag.to_owned());
        self
    }

    fn repo(&self) -> &str {
        let rest = self.path.strip_prefix("/v2/").expect("a /v2/ path");
        let end = ["/manifests/", "/blobs/", "/referrers/"]
            .iter()
            .filter_map(|m| rest.rfind(m))
            .max()
            .expect("a manifest or blob path");
        &rest[..end]
    }

    fn scope(&self) -> String {
        format!("repository:{}:pull", self.repo())
    }

    fn build(&self, client: &reqwest::Client, base: &str) -> reqwest::RequestBuilder {
        let mut b = client.request(self.method.clone(), format!("{base}{}", self.path));
        if self.path.contains("/manifests/") {
            for accept in [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX] {
                b = b.header(header::ACCEPT, accept);
            }
        }
        if let Some(r) = self.range {
            b = b.header(header::RANGE, r);
        }
        if let Some(e) = &self.if_none_match {
            b = b.header(header::IF_NONE_MATCH, e);
        }
        b
    }

    fn describe(&self) -> String {
        format!(
            "{} {}{}{}",
            self.method,
            self.path,
            self.range.map(|r| format!(" ({r})")).unwrap_or_default(),
            self.if_none_match
                .as_deref()
                .map(|e| format!(" (If-None-Match: {e})"))
                .unwrap_or_default()
        )
    }
}

/// An answer as received.
#[derive(Clone, Debug)]
struct Got {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    async fn read(resp: reqwest::Response) -> Got {
        Got {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.expect("answer body").to_vec(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn outcome(&self) -> Outcome {
        match self.status.as_u16() {
            200 | 206 => Outcome::Ok(self.body.clone()),
            401 | 403 => Outcome::Refused,
            404 => Outcome::NotFound,
            other => Outcome::Other(other),
        }
    }
}

/// What an answer amounts to: the bytes, a refusal (401 or 403), not found, or else.
#[derive(Clone, PartialEq, Eq)]
enum Outcome {
    Ok(Vec<u8>),
    Refused,
    NotFound,
    Other(u16),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok(b) => write!(f, "Ok({} bytes, {})", b.len(), &sha256_digest(b)[..19]),
            Outcome::Refused => f.write_str("Refused"),
            Outcome::NotFound => f.write_str("NotFound"),
            Outcome::Other(s) => write!(f, "Other({s})"),
        }
    }
}

/// `WWW-Authenticate: Bearer k="v",...` parameters (`None` unless a Bearer challenge).
fn bearer_params(got: &Got) -> Option<HashMap<String, String>> {
    let value = got.headers.get(header::WWW_AUTHENTICATE)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(params)
}

/// How a client asks the token endpoint for a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoginStyle {
    /// `GET realm?service&scope` with Basic credentials (docker, skopeo, the token spec).
    Get,
    /// containerd's authorizer: with credentials an OAuth2 `grant_type=password` POST first,
    /// then GET with Basic when the POST answers 400, 401, 404 or 405 (with a user name);
    /// anonymous clients GET.
    PostThenGet,
}

/// A registry client of berth as `who`, doing the token dance like docker or containerd: a
/// token per scope, fetched from the realm of berth's challenge when berth answers 401.
struct Puller {
    client: reqwest::Client,
    base: String,
    who: Who,
    credentials: Option<(&'static str, &'static str)>,
    style: LoginStyle,
    /// The `service` berth's challenges must name; `None`: whichever upstream answers.
    service: Option<&'static str>,
    tokens: HashMap<String, String>,
    /// Every answer body received (for leak assertions), with the request.
    bodies: Vec<(String, Vec<u8>)>,
    /// Every non-2xx body received, as text.
    errors: Vec<String>,
}

impl Puller {
    fn new(berth: &Berth, who: Who) -> Puller {
        Puller {
            client: http(),
            base: berth.url(),
            who,
            credentials: who.credentials(),
            style: LoginStyle::Get,
            service: Some(UPSTREAM),
            tokens: HashMap::new(),
            bodies: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// A client logging in as a user of berth's own (service mode).
    fn local_user(berth: &Berth, user: &'static str, password: &'static str) -> Puller {
        Puller {
            credentials: Some((user, password)),
            ..Puller::new(berth, Who::Anonymous)
        }
    }

    fn style(mut self, style: LoginStyle) -> Puller {
        self.style = style;
        self
    }

    /// A client of a berth with several upstreams: logs in to whichever the challenge names.
    fn any_service(mut self) -> Puller {
        self.service = None;
        self
    }

    /// Sends `req` with the token held for its scope (none at first); on a 401 gets a token
    /// from the challenge's realm and retries once. Panics if the dance itself fails.
    async fn fetch(&mut self, req: &Req) -> Got {
        self.try_fetch(req)
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e}", self.who))
    }

    /// [`Self::fetch`], with a failed challenge or login as `Err`.
    async fn try_fetch(&mut self, req: &Req) -> Result<Got, String> {
        let scope = req.scope();
        let mut fetched = false;
        loop {
            let mut b = req.build(&self.client, &self.base);
            if let Some(t) = self.tokens.get(&scope) {
                b = b.bearer_auth(t);
            }
            let got = Got::read(b.send().await.expect("berth answers")).await;
            self.bodies.push((req.describe(), got.body.clone()));
            if !got.status.is_success() {
                self.errors.push(got.text());
            }
            if got.status != StatusCode::UNAUTHORIZED || fetched {
                return Ok(got);
            }
            let challenge = bearer_params(&got).ok_or_else(|| {
                format!(
                    "401 for {} without a Bearer challenge: {:?}",
                    req.describe(),
                    got.headers
                )
            })?;
            assert_eq!(
                challenge.get("realm").map(String::as_str),
                Some(format!("{}/token", self.base).as_str()),
                "berth is the realm: {challenge:?}"
            );
            let service = challenge
                .get("service")
                .cloned()
                .ok_or_else(|| format!("challenge without a service: {challenge:?}"))?;
            if let Some(want) = self.service {
                assert_eq!(service, want, "{challenge:?}");
            }
            assert_eq!(
                challenge.get("scope"),
                Some(&scope),
                "challenge scope for {}",
                req.describe()
            );
            let token = self.login(&challenge["realm"], &service, &scope).await?;
            self.tokens.insert(scope.clone(), token);
            fetched = true;
        }
    }

    /// Gets a token for `scope` the way [`Self::style`] says; checks the answer's fields.
    async fn login(&mut self, realm: &str, service: &str, scope: &str) -> Result<String, String> {
        let mut got = None;
        if let (LoginStyle::PostThenGet, Some((user, password))) = (self.style, self.credentials) {
            let form = [
                ("grant_type", "password"),
                ("username", user),
                ("password", password),
                ("client_id", "containerd-client"),
                ("service", service),
                ("scope", scope),
            ];
            let posted = Got::read(
                self.client
                    .post(realm)
                    .form(&form)
                    .send()
                    .await
                    .expect("token endpoint answers"),
            )
            .await;
            if !matches!(posted.status.as_u16(), 400 | 401 | 404 | 405) {
                got = Some(("POST", posted));
            } else {
                self.errors.push(posted.text());
            }
        }
        let (method, got) = match got {
            Some(g) => g,
            None => {
                let mut b = self
                    .client
                    .get(realm)
                    .query(&[("service", service), ("scope", scope)]);
                if let Some((user, password)) = self.credentials {
                    b = b.basic_auth(user, Some(password));
                }
                (
                    "GET",
                    Got::read(b.send().await.expect("token endpoint answers")).await,
                )
            }
        };
        if got.status != StatusCode::OK {
            self.errors.push(got.text());
            return Err(format!(
                "{:?} login ({:?}, last {method}) for {scope}: {} {}",
                self.who,
                self.style,
                got.status,
                got.text()
            ));
        }
        let v: Value = serde_json::from_slice(&got.body).expect("token answer is JSON");
        let token = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .expect("token")
            .to_owned();
        remember_secret(&token);
        if let Some(r) = v["refresh_token"].as_str() {
            remember_secret(r);
        }
        assert_eq!(v["access_token"], v["token"], "{v}");
        assert!(v["expires_in"].as_u64().is_some(), "{v}");
        assert!(v["issued_at"].as_str().is_some(), "{v}");
        Ok(token)
    }

    /// Pulls `image` whole (manifest by tag and digest, every blob), asserting exact bytes.
    async fn pull(&mut self, image: &TestImage) {
        self.try_pull(image).await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Self::pull`], with the first failure as `Err`.
    async fn try_pull(&mut self, image: &TestImage) -> Result<(), String> {
        let mut reqs = vec![
            (
                Req::manifest(&image.repo, &image.tag),
                image.manifest_bytes.clone(),
            ),
            (
                Req::manifest(&image.repo, &image.manifest_digest),
                image.manifest_bytes.clone(),
            ),
        ];
        for (d, b) in image.blobs() {
            reqs.push((Req::blob(&image.repo, d), b.to_vec()));
        }
        for (req, want) in reqs {
            let got = self.try_fetch(&req).await?;
            if got.status != StatusCode::OK {
                return Err(format!(
                    "{:?}: {}: {} {}",
                    self.who,
                    req.describe(),
                    got.status,
                    got.text()
                ));
            }
            if got.body != want {
                return Err(format!("{:?}: {}: wrong bytes", self.who, req.describe()));
            }
        }
        Ok(())
    }
}

/// What the origin itself answers each principal: a token from the issuer for the request's
/// scope (as a client of the registry would get), then the same request at the registry.
#[derive(Default)]
struct Reference {
    tokens: HashMap<(Who, String), String>,
    answers: HashMap<(Who, String), Outcome>,
}

impl Reference {
    async fn outcome(&mut self, origin: &Origin, who: Who, req: &Req) -> Outcome {
        let key = (who, req.describe());
        if let Some(o) = self.answers.get(&key) {
            return o.clone();
        }
        let scope = req.scope();
        let token = match self.tokens.get(&(who, scope.clone())) {
            Some(t) => t.clone(),
            None => {
                let t = issuer_token(&origin.issuer, who.credentials(), &scope).await;
                self.tokens.insert((who, scope), t.clone());
                t
            }
        };
        let got = Got::read(
            req.build(&http(), &origin.registry.url())
                .bearer_auth(&token)
                .send()
                .await
                .expect("registry answers"),
        )
        .await;
        let outcome = got.outcome();
        self.answers.insert(key, outcome.clone());
        outcome
    }
}

/// A token straight from the issuer (GET, Basic if `credentials`).
async fn issuer_token(
    issuer: &TokenIssuer,
    credentials: Option<(&str, &str)>,
    scope: &str,
) -> String {
    let mut b = http()
        .get(issuer.realm())
        .query(&[("service", SERVICE), ("scope", scope)]);
    if let Some((user, password)) = credentials {
        b = b.basic_auth(user, Some(password));
    }
    let resp = b.send().await.expect("issuer answers");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("token JSON");
    let token = v["token"].as_str().expect("token").to_owned();
    remember_secret(&token);
    token
}

// ---------------------------------------------------------------------------------------------
// The matrix.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CacheState {
    /// Nothing cached before the principal's requests.
    Cold,
    /// Another principal who may pull the repository pulled every image it may pull first.
    Warm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ManifestByTag,
    ManifestByDigest,
    BlobOwnRepo,
    /// A blob of R via a repository the principal may pull where it does not belong.
    BlobOtherRepo,
    /// R's manifest by digest via such a repository.
    ManifestOtherRepo,
}

/// The requests of one matrix row (principal × repository).
fn probes(who: Who, repo: &str, content: &Content) -> Vec<(Kind, Req)> {
    let image = content.image(repo);
    let mut out = vec![
        (Kind::ManifestByTag, Req::manifest(repo, &image.tag)),
        (
            Kind::ManifestByDigest,
            Req::manifest(repo, &image.manifest_digest),
        ),
    ];
    for (d, _) in image.blobs() {
        out.push((Kind::BlobOwnRepo, Req::blob(repo, d)));
    }
    for other in ALL_REPOS
        .into_iter()
        .filter(|r| *r != repo && who.may_pull(r))
    {
        for (d, _) in image.blobs() {
            if !content.belongs(d, other) {
                out.push((Kind::BlobOtherRepo, Req::blob(other, d)));
            }
        }
        out.push((
            Kind::ManifestOtherRepo,
            Req::manifest(other, &image.manifest_digest),
        ));
    }
    out
}

#[tokio::test]
async fn matrix_berth_answers_what_the_origin_answers_each_principal() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    assert_eq!(origin.issuer.algorithm(), Algorithm::Rs256);
    let content = &origin.content;
    let mut reference = Reference::default();
    let mut total = 0usize;
    let mut failures = Vec::new();
    let mut per_kind: HashMap<String, (usize, usize)> = HashMap::new();
    let mut errors = Vec::new();
    let mut outcomes: HashMap<(Who, &str), usize> = HashMap::new();
    let mut leaks = Vec::new();

    for state in [CacheState::Cold, CacheState::Warm] {
        for who in EVERYONE {
            for repo in MATRIX_REPOS {
                let berth = passthrough_berth(&origin, "").await;
                let mut warmed_by = None;
                if state == CacheState::Warm {
                    let warmer = who.warmer_for(repo);
                    let mut w = Puller::new(&berth, warmer);
                    for r in ALL_REPOS.into_iter().filter(|r| warmer.may_pull(r)) {
                        w.pull(content.image(r)).await;
                    }
                    errors.append(&mut w.errors);
                    warmed_by = Some(warmer);
                }
                let mut p = Puller::new(&berth, who);
                for (kind, req) in probes(who, repo, content) {
                    let have = p.fetch(&req).await.outcome();
                    let want = reference.outcome(&origin, who, &req).await;
                    total += 1;
                    let class = match &want {
                        Outcome::Ok(_) => "ok",
                        Outcome::Refused => "refused",
                        Outcome::NotFound => "not found",
                        Outcome::Other(_) => "other",
                    };
                    *outcomes.entry((who, class)).or_default() += 1;
                    let entry = per_kind.entry(format!("{kind:?}")).or_default();
                    entry.0 += 1;
                    if have == want {
                        entry.1 += 1;
                    } else {
                        failures.push(format!(
                            "{state:?} (warmed by {warmed_by:?}) {who:?} {repo} {kind:?} {}: berth {have:?}, origin {want:?}",
                            req.describe()
                        ));
                    }
                }
                if who != Who::Alice {
                    leaks.extend(content.private_leaks(who, &p.bodies));
                }
                errors.append(&mut p.errors);
                assert_nothing_leaked(&berth, &errors).await;
                berth.stop().await;
            }
        }
    }
    let mut kinds: Vec<_> = per_kind.into_iter().collect();
    kinds.sort();
    println!(
        "auth matrix: {total} cells (3 principals × 3 repositories × 2 cache states × 5 request kinds), {} pass",
        total - failures.len()
    );
    for (kind, (n, ok)) in kinds {
        println!("  {kind}: {ok}/{n}");
    }
    for who in EVERYONE {
        let n = |class| outcomes.get(&(who, class)).copied().unwrap_or(0);
        println!(
            "  {who:?}: origin answers {} ok, {} refused, {} not found",
            n("ok"),
            n("refused"),
            n("not found")
        );
    }
    assert!(
        leaks.is_empty(),
        "bob or anonymous received private content:\n{}",
        leaks.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{} of {total} matrix cells differ from the origin:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// After alice pulled everything through berth, bob and anonymous try every way to reach her
/// private objects: every repository, GET and HEAD, ranges, Basic credentials straight at
/// berth, her password guessed, tokens of other scopes, forged and tampered tokens.
#[tokio::test]
async fn no_request_sequence_gives_bob_or_anonymous_a_byte_of_private_content() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let content = &origin.content;
    let berth = passthrough_berth(&origin, "").await;
    let mut alice = Puller::new(&berth, Who::Alice);
    alice.pull(&content.private).await;
    alice.pull(&content.public).await;

    let private = &content.private;
    let mut targets: Vec<String> = vec![private.manifest_digest.clone()];
    targets.extend(
        private
            .blobs()
            .iter()
            .filter(|(d, _)| *d != content.shared)
            .map(|(d, _)| (*d).to_owned()),
    );
    let mut attempts = Vec::new();
    for repo in ALL_REPOS {
        attempts.push(Req::manifest(repo, &private.tag));
        attempts.push(Req::manifest(repo, &private.tag).head());
        for d in &targets {
            let req = if *d == private.manifest_digest {
                Req::manifest(repo, d)
            } else {
                Req::blob(repo, d)
            };
            attempts.push(req.clone());
            attempts.push(req.clone().head());
            attempts.push(req.range("bytes=0-99"));
        }
    }

    let mut bodies: Vec<(String, Vec<u8>)> = Vec::new();
    let mut errors = Vec::new();
    // Answers other than a refusal or "not found" (checked last, after the byte checks).
    let mut unexpected = Vec::new();
    for who in [Who::Bob, Who::Anonymous] {
        // The token dance, per attempt and again in a repeated sequence (cached decisions).
        let mut p = Puller::new(&berth, who);
        for round in 0..2 {
            for req in &attempts {
                let got = p.fetch(req).await;
                if !matches!(got.status.as_u16(), 401 | 403 | 404) {
                    unexpected.push(format!(
                        "{who:?} round {round}: {} answered {}: {}",
                        req.describe(),
                        got.status,
                        got.text()
                    ));
                }
            }
        }
        bodies.append(&mut p.bodies);
        errors.append(&mut p.errors);
    }

    // Credentials straight at berth, without a token: bob's, and alice's name with a guess.
    let client = http();
    let base = berth.url();
    let mut raw = Vec::new();
    for (user, password) in [(BOB, BOB_PASSWORD), (ALICE, WRONG_PASSWORD)] {
        for req in &attempts {
            let got = Got::read(
                req.build(&client, &base)
                    .basic_auth(user, Some(password))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            raw.push((format!("{user} Basic {}", req.describe()), got));
        }
    }
    // Tokens that are not alice's token for private/app.
    let alice_public = issuer_token(
        &origin.issuer,
        Some((ALICE, ALICE_PASSWORD)),
        &format!("repository:{PUBLIC}:pull"),
    )
    .await;
    let forger = TokenIssuer::builder().rs256().start().await;
    let claim = [Access {
        kind: "repository".into(),
        name: PRIVATE.into(),
        actions: vec!["pull".into()],
    }];
    let forged = forger.mint(&Principal::user(ALICE), &claim);
    let bob_token = issuer_token(
        &origin.issuer,
        Some((BOB, BOB_PASSWORD)),
        &format!("repository:{PRIVATE}:pull"),
    )
    .await;
    // bob's genuine token with alice's claims pasted in: the signature no longer matches.
    let real_claims = origin.issuer.mint(&Principal::user(ALICE), &claim);
    let mut parts: Vec<&str> = bob_token.split('.').collect();
    parts[1] = real_claims.split('.').nth(1).unwrap();
    let tampered = parts.join(".");
    // An unsigned token claiming alice.
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"none"}"#),
        real_claims.split('.').nth(1).unwrap()
    );
    for t in [&forged, &tampered, &unsigned, &real_claims] {
        remember_secret(t);
    }
    for (name, token) in [
        ("alice's public/base token", &alice_public),
        ("a token signed by another key", &forged),
        ("bob's token with alice's claims", &tampered),
        ("an unsigned token", &unsigned),
    ] {
        for req in attempts.iter().filter(|r| r.repo() == PRIVATE) {
            let got = Got::read(
                req.build(&client, &base)
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            raw.push((format!("{name}: {}", req.describe()), got));
        }
    }
    for (what, got) in &raw {
        if !matches!(got.status.as_u16(), 401 | 403 | 404) {
            unexpected.push(format!("{what} answered {}: {}", got.status, got.text()));
        }
        bodies.push((what.clone(), got.body.clone()));
        errors.push(got.text());
    }
    content.assert_no_private_bytes(Who::Bob, &bodies);

    // alice herself still pulls, and so does everyone for public/base.
    let mut alice = Puller::new(&berth, Who::Alice);
    alice.pull(&content.private).await;
    let mut anonymous = Puller::new(&berth, Who::Anonymous);
    anonymous.pull(&content.public).await;
    assert_nothing_leaked(&berth, &errors).await;
    println!(
        "leak probes: {} requests by bob and anonymous, none answered with private bytes",
        bodies.len()
    );
    assert!(
        unexpected.is_empty(),
        "{} answers were neither 401/403 nor 404:\n{}",
        unexpected.len(),
        unexpected
            .iter()
            .take(6)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// berth's `304` for a manifest the client already holds comes after authorization, never
/// instead of it: alice, who may read private/app, gets `304` (no body) for the ETag she holds,
/// by tag and by digest, GET and HEAD; bob, anonymous and bare requests sending the same
/// `If-None-Match` (or `*`) get 401/403/404, never a `304` that would confirm the digest. By
/// digest the answer says it never changes; by tag it says nothing long-lived.
#[tokio::test]
async fn if_none_match_never_turns_a_refusal_into_a_304() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let private = &origin.content.private;
    let berth = passthrough_berth(&origin, "").await;
    let mut alice = Puller::new(&berth, Who::Alice);
    alice.pull(private).await;

    let by_tag = Req::manifest(PRIVATE, &private.tag);
    let by_digest = Req::manifest(PRIVATE, &private.manifest_digest);
    let got = alice.fetch(&by_tag).await;
    assert_eq!(got.status, StatusCode::OK);
    let etag = got.headers[header::ETAG].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", private.manifest_digest));
    assert!(
        got.headers.get(header::CACHE_CONTROL).is_none(),
        "a tag's answer may change: {:?}",
        got.headers
    );
    let got = alice.fetch(&by_digest).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.headers[header::CACHE_CONTROL],
        "max-age=31536000, immutable"
    );
    let blob = alice
        .fetch(&Req::blob(PRIVATE, &private.config_digest))
        .await;
    assert_eq!(blob.status, StatusCode::OK);
    assert_eq!(
        blob.headers[header::CACHE_CONTROL],
        "max-age=31536000, immutable"
    );

    let mut conditional = Vec::new();
    for req in [&by_tag, &by_digest] {
        for tag in [etag.as_str(), "*"] {
            conditional.push(req.clone().if_none_match(tag));
            conditional.push(req.clone().head().if_none_match(tag));
        }
    }
    for req in &conditional {
        let got = alice.fetch(req).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{}", req.describe());
        assert!(got.body.is_empty(), "{}", req.describe());
        assert_eq!(got.headers[header::ETAG], etag.as_str());
    }
    // Another ETag: the manifest, in full.
    let other = alice
        .fetch(&by_tag.clone().if_none_match("\"sha256:0000\""))
        .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.body, private.manifest_bytes);

    let mut answered = Vec::new();
    for who in [Who::Bob, Who::Anonymous] {
        let mut p = Puller::new(&berth, who);
        for req in &conditional {
            answered.push((format!("{who:?} {}", req.describe()), p.fetch(req).await));
        }
    }
    let client = http();
    for req in &conditional {
        let got = Got::read(req.build(&client, &berth.url()).send().await.unwrap()).await;
        answered.push((format!("bare {}", req.describe()), got));
    }
    for (what, got) in &answered {
        assert!(
            matches!(got.status.as_u16(), 401 | 403 | 404),
            "{what} answered {}",
            got.status
        );
    }
}

/// Prefetch fetches an image's blobs as soon as alice has the manifest, before she asks for
/// them: a warm cache she never read from. It must give bob and anonymous nothing more than a
/// cache alice pulled through herself.
#[tokio::test]
async fn prefetched_blobs_give_nobody_but_the_client_a_byte() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let content = &origin.content;
    let private = &content.private;
    let berth = passthrough_berth(&origin, "").await;
    let mut alice = Puller::new(&berth, Who::Alice);
    let got = alice.fetch(&Req::manifest(PRIVATE, &private.tag)).await;
    assert_eq!(got.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(30), berth.app().prefetch_settled())
        .await
        .expect("prefetch settles");
    // Her config and both layers were fetched with her rights, in her repository.
    assert_eq!(
        berth
            .metric("berth_prefetch_blobs_total{result=\"filled\"}")
            .await,
        private.blobs().len() as f64
    );

    let mut unexpected = Vec::new();
    let mut bodies = Vec::new();
    for who in [Who::Bob, Who::Anonymous] {
        let mut p = Puller::new(&berth, who);
        for repo in ALL_REPOS {
            for (d, _) in private.blobs() {
                if d == content.shared && repo == PUBLIC {
                    continue; // public/base's own layer
                }
                for req in [
                    Req::blob(repo, d),
                    Req::blob(repo, d).head(),
                    Req::blob(repo, d).range("bytes=0-99"),
                ] {
                    let got = p.fetch(&req).await;
                    if !matches!(got.status.as_u16(), 401 | 403 | 404) {
                        unexpected.push(format!(
                            "{who:?}: {} answered {}",
                            req.describe(),
                            got.status
                        ));
                    }
                }
            }
        }
        bodies.append(&mut p.bodies);
    }
    content.assert_no_private_bytes(Who::Bob, &bodies);
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));

    // Refused requests used nothing of what was prefetched.
    assert_eq!(
        berth
            .metric("berth_prefetch_bytes_total{outcome=\"used\"}")
            .await,
        0.0
    );
    // alice's own requests find the prefetched blobs.
    for (d, bytes) in private.blobs() {
        let got = alice.fetch(&Req::blob(PRIVATE, d)).await;
        assert_eq!(got.status, StatusCode::OK, "{d}");
        assert_eq!(got.body, bytes, "{d}");
    }
    let total: usize = private.blobs().iter().map(|(_, b)| b.len()).sum();
    assert_eq!(
        berth
            .metric("berth_prefetch_bytes_total{outcome=\"used\"}")
            .await,
        total as f64
    );
}

// ---------------------------------------------------------------------------------------------
// Real clients, token lifetimes, token flavours.

async fn skopeo_copy(source: &str, creds: Option<&str>, dest: &Path, authfile: &Path) -> bool {
    skopeo_copy_output(source, creds, dest, authfile).await.0
}

/// Runs `skopeo copy` and returns whether it succeeded and its stderr.
async fn skopeo_copy_output(
    source: &str,
    creds: Option<&str>,
    dest: &Path,
    authfile: &Path,
) -> (bool, String) {
    let mut c = tokio::process::Command::new(require_binary("skopeo"));
    c.args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg("--src-authfile")
        .arg(authfile);
    if let Some(creds) = creds {
        c.args(["--src-creds", creds]);
    }
    let out = c
        .arg(source)
        .arg(format!("dir:{}", dest.display()))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("skopeo starts");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        println!("skopeo {source} ({creds:?}) failed: {stderr}");
    }
    (out.status.success(), stderr)
}

fn check_dir_copy(dir: &Path, image: &TestImage) {
    let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest.json");
    assert_eq!(manifest, image.manifest_bytes, "manifest bytes");
    for (digest, bytes) in image.blobs() {
        let hex = digest.trim_start_matches("sha256:");
        let got = std::fs::read(dir.join(hex)).unwrap_or_else(|_| panic!("blob {hex} copied"));
        assert_eq!(sha256_digest(&got), digest);
        assert_eq!(got.len(), bytes.len());
    }
}

#[tokio::test]
async fn skopeo_pulls_private_images_only_with_the_right_credentials() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let content = &origin.content;
    let berth = passthrough_berth(&origin, "").await;
    let work = tempfile::tempdir().unwrap();
    let authfile = work.path().join("auth.json");
    std::fs::write(&authfile, r#"{"auths":{}}"#).unwrap();
    let src = |image: &TestImage| format!("docker://{}/{}:{}", berth.host(), image.repo, image.tag);
    let alice_creds = format!("{ALICE}:{ALICE_PASSWORD}");
    let bob_creds = format!("{BOB}:{BOB_PASSWORD}");

    let dest = work.path().join("alice");
    assert!(
        skopeo_copy(&src(&content.private), Some(&alice_creds), &dest, &authfile).await,
        "alice copies private/app"
    );
    check_dir_copy(&dest, &content.private);

    // Right after alice's copy (everything cached): no credentials, bob's, a wrong password.
    for (name, creds) in [
        ("anonymous", None),
        ("bob", Some(bob_creds.as_str())),
        (
            "wrong password",
            Some(&*format!("{ALICE}:{WRONG_PASSWORD}")),
        ),
    ] {
        let dest = work.path().join(format!("refused-{name}"));
        let (copied, stderr) =
            skopeo_copy_output(&src(&content.private), creds, &dest, &authfile).await;
        assert!(!copied, "{name} must not copy private/app");
        // Refused by authorization (berth's 401), not by anything else that fails a copy.
        let lower = stderr.to_lowercase();
        assert!(
            lower.contains("unauthorized") || lower.contains("401"),
            "{name} refused for the wrong reason: {stderr}"
        );
        if let Ok(entries) = std::fs::read_dir(&dest) {
            let needles = content.private_needles();
            for entry in entries.flatten() {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                for (needle_name, needle) in &needles {
                    assert!(
                        !contains(&bytes, needle),
                        "{name}'s failed copy left {needle_name} in {}",
                        entry.path().display()
                    );
                }
            }
        }
    }

    let dest = work.path().join("anonymous-public");
    assert!(
        skopeo_copy(&src(&content.public), None, &dest, &authfile).await,
        "anonymous copies public/base"
    );
    check_dir_copy(&dest, &content.public);
    let dest = work.path().join("bob-team");
    assert!(
        skopeo_copy(&src(&content.team), Some(&bob_creds), &dest, &authfile).await,
        "bob copies team-b/tool"
    );
    check_dir_copy(&dest, &content.team);
    assert_nothing_leaked(&berth, &[]).await;
}

/// `berth_auth_decisions_total{result,source}` from berth's metrics.
async fn decisions(berth: &Berth, result: &str, source: &str) -> u64 {
    let text = berth.metrics().await;
    text.lines()
        .filter(|l| l.starts_with("berth_auth_decisions_total{"))
        .filter(|l| {
            l.contains(&format!("result=\"{result}\""))
                && l.contains(&format!("source=\"{source}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn an_expired_token_is_refused_even_though_a_decision_was_cached_with_it() {
    capture_logs();
    // Tokens live 10 s at the registry (expiry there is wall-clock time: the registry's own),
    // long enough that the pull and the first check cannot outlast the token however slow the
    // machine. decision_ttl is long: only the token bounds the decision.
    let lifetime = Duration::from_secs(10);
    let origin = start_origin(policy_issuer().expires_in(lifetime)).await;
    let image = &origin.content.private;
    let berth = passthrough_berth(&origin, "[auth]\ndecision_ttl = \"1h\"\n").await;
    let mut alice = Puller::new(&berth, Who::Alice);
    alice.pull(image).await;
    // Taken after the pull: the token was issued no later than this, so waiting from here
    // always reaches its expiry.
    let issued = Instant::now();
    let token = alice.tokens[&format!("repository:{PRIVATE}:pull")].clone();
    let manifest = Req::manifest(PRIVATE, &image.tag);
    let with = |token: &str| {
        let req = manifest.build(&http(), &berth.url()).bearer_auth(token);
        async move { Got::read(req.send().await.unwrap()).await }
    };
    assert_eq!(with(&token).await.status, StatusCode::OK);

    tokio::time::sleep(
        (issued + lifetime + Duration::from_millis(500)).saturating_duration_since(Instant::now()),
    )
    .await;
    let direct = Got::read(
        manifest
            .build(&http(), &origin.registry.url())
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        direct.status,
        StatusCode::UNAUTHORIZED,
        "the registry itself refuses the expired token"
    );
    let mut errors = Vec::new();
    for req in [
        manifest.clone(),
        Req::manifest(PRIVATE, &image.manifest_digest),
        Req::blob(PRIVATE, &image.config_digest),
    ] {
        let got = Got::read(
            req.build(&http(), &berth.url())
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            got.status,
            StatusCode::UNAUTHORIZED,
            "{} with the expired token: {}",
            req.describe(),
            got.text()
        );
        let challenge = bearer_params(&got).expect("a Bearer challenge to get a new token");
        assert_eq!(challenge["scope"], format!("repository:{PRIVATE}:pull"));
        errors.push(got.text());
    }
    // The client's usual reaction: a fresh token, which works.
    alice.pull(image).await;
    assert_ne!(alice.tokens[&format!("repository:{PRIVATE}:pull")], token);
    errors.append(&mut alice.errors);
    assert_nothing_leaked(&berth, &errors).await;
}

/// The decision made with a token is reused while the token is valid by its own `exp`, and the
/// origin is asked again once that passed.
#[tokio::test]
async fn decisions_are_reused_only_until_the_token_expires() {
    capture_logs();
    // 660 s at the registry (its 60 s leeway included) means `exp` is 600 s after issue: both
    // requests below fall well inside the token's life however slow the machine. Its end is
    // reached by moving berth's clock forward, not by waiting.
    let origin = start_origin(policy_issuer().expires_in(Duration::from_secs(660))).await;
    let image = &origin.content.private;
    let berth = passthrough_berth(&origin, "[auth]\ndecision_ttl = \"1h\"\n").await;
    let mut alice = Puller::new(&berth, Who::Alice);
    let manifest = Req::manifest(PRIVATE, &image.tag);
    assert_eq!(alice.fetch(&manifest).await.status, StatusCode::OK);
    let from_origin = decisions(&berth, "allow", "origin").await;
    assert!(from_origin >= 1, "the first pull asked the origin");
    let cached = decisions(&berth, "allow", "cache").await;
    assert_eq!(alice.fetch(&manifest).await.status, StatusCode::OK);
    assert_eq!(
        decisions(&berth, "allow", "cache").await,
        cached + 1,
        "a second request within the token's lifetime reuses the decision"
    );
    assert_eq!(decisions(&berth, "allow", "origin").await, from_origin);

    // Just before exp by berth's clock the decision still holds; just after, it does not.
    berth.app().auth().clock().advance(Duration::from_secs(500));
    assert_eq!(alice.fetch(&manifest).await.status, StatusCode::OK);
    assert_eq!(decisions(&berth, "allow", "origin").await, from_origin);
    berth.app().auth().clock().advance(Duration::from_secs(101));
    let got = alice.fetch(&manifest).await;
    // The registry still takes the token (its leeway): the origin's answer is berth's answer.
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(
        decisions(&berth, "allow", "origin").await,
        from_origin + 1,
        "past the token's exp the origin is asked again"
    );
    assert_nothing_leaked(&berth, &alice.errors).await;
}

/// POSTs an OAuth2 form to `url`.
async fn post_form(url: &str, form: &[(&str, &str)]) -> Got {
    Got::read(http().post(url).form(form).send().await.unwrap()).await
}

/// GETs `/v2/<repo>/manifests/<tag>` at berth with `token` and asserts the exact bytes.
async fn assert_pulls_manifest(berth: &Berth, image: &TestImage, token: &str) {
    let got = Got::read(
        Req::manifest(&image.repo, &image.tag)
            .build(&http(), &berth.url())
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.body, image.manifest_bytes);
}

#[tokio::test]
async fn token_endpoint_forwards_password_and_refresh_token_grants() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let image = &origin.content.private;
    let berth = passthrough_berth(&origin, "").await;
    let realm = format!("{}/token", berth.url());
    let scope = format!("repository:{PRIVATE}:pull");
    let mut errors = Vec::new();

    // grant_type=password with access_type=offline: an access token and a refresh token.
    let got = post_form(
        &realm,
        &[
            ("grant_type", "password"),
            ("username", ALICE),
            ("password", ALICE_PASSWORD),
            ("access_type", "offline"),
            ("client_id", "berth-tests"),
            ("service", UPSTREAM),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let v: Value = serde_json::from_slice(&got.body).unwrap();
    let access = v["access_token"].as_str().unwrap().to_owned();
    let refresh = v["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned();
    remember_secret(&access);
    remember_secret(&refresh);
    assert_eq!(v["token"], v["access_token"]);
    let jws_header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(jws_header["alg"], "RS256", "{jws_header}");
    assert!(jws_header["x5c"][0].is_string(), "{jws_header}");
    assert!(
        v["expires_in"].as_u64().is_some() && v["issued_at"].is_string(),
        "{v}"
    );
    let last = origin.issuer.requests().pop().unwrap();
    assert_eq!(last.auth, AuthKind::PasswordGrant);
    assert_eq!(last.principal, Principal::user(ALICE));
    assert_eq!(
        last.service.as_deref(),
        Some(SERVICE),
        "berth names the origin's service"
    );
    assert_eq!(last.scopes, vec![scope.clone()]);
    assert_eq!(last.client_id.as_deref(), Some("berth-tests"));
    assert_pulls_manifest(&berth, image, &access).await;

    // grant_type=refresh_token.
    let got = post_form(
        &realm,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("service", UPSTREAM),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let v: Value = serde_json::from_slice(&got.body).unwrap();
    let refreshed = v["token"].as_str().unwrap().to_owned();
    remember_secret(&refreshed);
    assert_eq!(
        origin.issuer.requests().pop().unwrap().auth,
        AuthKind::RefreshGrant
    );
    assert_pulls_manifest(&berth, image, &refreshed).await;

    // GET with offline_token=true also yields a refresh token.
    let got = Got::read(
        http()
            .get(&realm)
            .query(&[
                ("service", UPSTREAM),
                ("scope", &scope),
                ("offline_token", "true"),
            ])
            .basic_auth(ALICE, Some(ALICE_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let v: Value = serde_json::from_slice(&got.body).unwrap();
    remember_secret(v["token"].as_str().unwrap());
    remember_secret(v["refresh_token"].as_str().expect("refresh_token"));

    // Refusals: a wrong password, an unknown refresh token, bob asking for private/app (a
    // token without access, which berth's pull check then refuses).
    for form in [
        vec![
            ("grant_type", "password"),
            ("username", ALICE),
            ("password", WRONG_PASSWORD),
            ("service", UPSTREAM),
            ("scope", scope.as_str()),
        ],
        vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", "refresh-not-issued-Vb2x"),
            ("service", UPSTREAM),
            ("scope", scope.as_str()),
        ],
    ] {
        let got = post_form(&realm, &form).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
        errors.push(got.text());
    }
    let got = Got::read(
        http()
            .get(&realm)
            .query(&[("service", UPSTREAM), ("scope", &scope)])
            .basic_auth(ALICE, Some(WRONG_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
    errors.push(got.text());
    let got = post_form(
        &realm,
        &[
            ("grant_type", "password"),
            ("username", BOB),
            ("password", BOB_PASSWORD),
            ("service", UPSTREAM),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let bob_token = serde_json::from_slice::<Value>(&got.body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    remember_secret(&bob_token);
    let refused = Got::read(
        Req::manifest(PRIVATE, &image.tag)
            .build(&http(), &berth.url())
            .bearer_auth(&bob_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    errors.push(refused.text());
    assert_nothing_leaked(&berth, &errors).await;
}

/// Token services that serve only GET (OAuth2 POST is optional in the token spec; Docker Hub
/// answers POSTs with 405) or only POST (GET answers 405). Both clients must get through
/// berth: docker (ping `/v2/`, GET token with Basic) and containerd (request, 401, POST
/// password grant, GET when the POST answers 400/401/404/405).
#[tokio::test]
async fn get_only_and_post_only_token_services_work_for_docker_and_containerd() {
    capture_logs();
    let mut failures = Vec::new();
    let flavours = [
        ("GET-only token service", policy_issuer().without_post()),
        (
            "POST-only token service",
            policy_issuer().get_answers(StatusCode::METHOD_NOT_ALLOWED),
        ),
    ];
    for (flavour, builder) in flavours {
        let origin = start_origin(builder).await;
        let image = &origin.content.private;
        let berth = passthrough_berth(&origin, "").await;
        let scope = format!("repository:{PRIVATE}:pull");

        // docker: /v2/ answers 401 with berth's challenge; a token by GET; then the pull.
        let ping = Got::read(
            http()
                .get(format!("{}/v2/", berth.url()))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let mut docker = Puller::new(&berth, Who::Alice);
        match bearer_params(&ping) {
            Some(c) if ping.status == StatusCode::UNAUTHORIZED => {
                match docker.login(&c["realm"], &c["service"], &scope).await {
                    Ok(token) => {
                        docker.tokens.insert(scope.clone(), token);
                        if let Err(e) = docker.try_pull(image).await {
                            failures.push(format!("{flavour}, docker: {e}"));
                        }
                    }
                    Err(e) => failures.push(format!("{flavour}, docker: {e}")),
                }
            }
            _ => failures.push(format!(
                "{flavour}, docker: /v2/ answered {} without a challenge",
                ping.status
            )),
        }

        // containerd.
        let mut containerd = Puller::new(&berth, Who::Alice).style(LoginStyle::PostThenGet);
        if let Err(e) = containerd.try_pull(image).await {
            failures.push(format!("{flavour}, containerd: {e}"));
        }
        // Nobody else gets in either way.
        let mut bob = Puller::new(&berth, Who::Bob).style(LoginStyle::PostThenGet);
        if let Ok(got) = bob.try_fetch(&Req::manifest(PRIVATE, &image.tag)).await {
            assert!(!got.status.is_success(), "{flavour}: bob got private/app");
        }
        origin
            .content
            .assert_no_private_bytes(Who::Bob, &bob.bodies);
        let mut errors = docker.errors;
        errors.append(&mut containerd.errors);
        errors.append(&mut bob.errors);
        assert_nothing_leaked(&berth, &errors).await;
    }
    assert!(
        failures.is_empty(),
        "{} client flavours failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Azure Container Registry's flavour: the origin's realm is `/oauth2/token`, and a client
/// logs in with the all-zero GUID user name and a refresh token as password.
#[tokio::test]
async fn acr_flavour_oauth2_realm_and_refresh_token_as_password() {
    capture_logs();
    let origin = start_origin(policy_issuer().realm_path("/oauth2/token")).await;
    assert!(origin.issuer.realm().ends_with("/oauth2/token"));
    let image = &origin.content.private;
    let berth = passthrough_berth(&origin, "").await;
    let realm = format!("{}/token", berth.url());
    let scope = format!("repository:{PRIVATE}:pull");
    let mut errors = Vec::new();

    // A refresh token, as `az acr login --expose-token` hands out.
    let got = post_form(
        &realm,
        &[
            ("grant_type", "password"),
            ("username", ALICE),
            ("password", ALICE_PASSWORD),
            ("access_type", "offline"),
            ("service", UPSTREAM),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let refresh = serde_json::from_slice::<Value>(&got.body).unwrap()["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_owned();
    remember_secret(&refresh);
    remember_secret(&STANDARD.encode(format!("{REFRESH_TOKEN_USER}:{refresh}")));

    // docker login -u 00000000-0000-0000-0000-000000000000 -p <refresh token>, then a pull:
    // the dance with GET and Basic.
    let client = http();
    let manifest = Req::manifest(PRIVATE, &image.tag);
    let got = Got::read(manifest.build(&client, &berth.url()).send().await.unwrap()).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    let challenge = bearer_params(&got).unwrap();
    assert_eq!(challenge["realm"], realm);
    let got = Got::read(
        client
            .get(&challenge["realm"])
            .query(&[
                ("service", &challenge["service"]),
                ("scope", &challenge["scope"]),
            ])
            .basic_auth(REFRESH_TOKEN_USER, Some(&refresh))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let token = serde_json::from_slice::<Value>(&got.body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    remember_secret(&token);
    let last = origin.issuer.requests().pop().unwrap();
    assert_eq!((last.method, last.auth), (Method::GET, AuthKind::Basic));
    assert_eq!(
        last.principal,
        Principal::user(ALICE),
        "the refresh token's owner"
    );
    assert_pulls_manifest(&berth, image, &token).await;
    for (d, bytes) in image.blobs() {
        let got = Got::read(
            Req::blob(PRIVATE, d)
                .build(&client, &berth.url())
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.body == bytes);
    }

    // The OAuth2 refresh grant at the same realm.
    let got = post_form(
        &realm,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("service", UPSTREAM),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let token = serde_json::from_slice::<Value>(&got.body).unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    remember_secret(&token);
    assert_pulls_manifest(&berth, image, &token).await;

    // A refresh token that was never issued.
    let got = Got::read(
        client
            .get(&realm)
            .query(&[("service", UPSTREAM), ("scope", scope.as_str())])
            .basic_auth(REFRESH_TOKEN_USER, Some("refresh-forged-Lk3p"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
    errors.push(got.text());
    assert!(
        origin
            .issuer
            .requests()
            .iter()
            .all(|r| r.service.as_deref() == Some(SERVICE)),
        "every forwarded request names the origin's service"
    );
    assert_nothing_leaked(&berth, &errors).await;
}

/// A credential the origin's token service refuses (here: alice's password was changed) is
/// refused by berth, also when an allow decision made with it is within `offline_grace`: the
/// origin answered, it is not unreachable.
#[tokio::test]
async fn a_credential_the_token_service_refuses_is_refused_even_within_offline_grace() {
    capture_logs();
    const NEW_PASSWORD: &str = "pw-alice-new-Jc6n-gecko";
    remember_secret(NEW_PASSWORD);
    remember_secret(&STANDARD.encode(format!("{ALICE}:{NEW_PASSWORD}")));
    let origin = start_origin(policy_issuer().expires_in(Duration::from_secs(3))).await;
    let image = &origin.content.private;
    let berth = passthrough_berth(
        &origin,
        "[auth]\ndecision_ttl = \"1s\"\noffline_grace = \"1h\"\n",
    )
    .await;
    let manifest = Req::manifest(PRIVATE, &image.tag);
    let basic = |password: &'static str| {
        let req = manifest
            .build(&http(), &berth.url())
            .basic_auth(ALICE, Some(password));
        async move { Got::read(req.send().await.unwrap()).await }
    };
    let got = basic(ALICE_PASSWORD).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());

    origin.issuer.set_password(ALICE, Some(NEW_PASSWORD));
    // Past the decision's TTL and the origin token berth holds for these credentials.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let got = basic(ALICE_PASSWORD).await;
    let refused = got.text();
    let got_new = basic(NEW_PASSWORD).await;
    assert_eq!(got_new.status, StatusCode::OK, "{}", got_new.text());
    assert_nothing_leaked(&berth, std::slice::from_ref(&refused)).await;
    assert!(
        !contains(&got.body, &image.manifest_bytes),
        "the old password, which the origin's token service now refuses, still got the \
         private manifest ({}): a refusal is taken for an unreachable origin and \
         offline_grace applies",
        got.status
    );
    assert_eq!(
        got.status,
        StatusCode::UNAUTHORIZED,
        "old password after the change: {refused}"
    );
    assert!(bearer_params(&got).is_some(), "a challenge to log in again");
}

// ---------------------------------------------------------------------------------------------
// service mode.

/// berth with its own credentials at the origin and local users: carol (htpasswd, bcrypt) and
/// the static token `STATIC_TOKEN`.
async fn service_berth(origin: &Origin, secrets: &TempDir, anonymous: bool) -> Berth {
    let auth = local_auth_files(secrets.path());
    let table = format!(
        "[[upstream]]\nname = \"{UPSTREAM}\"\nurl = \"{}\"\ndefault = true\nauth = \"service\"\n\
         anonymous = {anonymous}\nusername = \"{ROBOT}\"\npassword_file = \"{}\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n{auth}",
        origin.registry.url(),
        secrets.path().join("origin-password").display(),
    );
    Berth::with_upstreams(&table).start().await
}

#[tokio::test]
async fn service_mode_authenticates_local_users_and_static_tokens() {
    capture_logs();
    let origin = start_origin(robot_issuer("*")).await;
    let image = &origin.content.private;
    let secrets = tempfile::tempdir().unwrap();
    let berth = service_berth(&origin, &secrets, false).await;
    let client = http();
    let base = berth.url();
    let manifest = Req::manifest(PRIVATE, &image.tag);
    let mut errors = Vec::new();

    // Anonymous: 401 with berth's challenge, at /v2/ too; no anonymous token.
    let got = Got::read(manifest.build(&client, &base).send().await.unwrap()).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
    let challenge = bearer_params(&got).expect("Bearer challenge");
    assert_eq!(challenge["realm"], format!("{base}/token"));
    assert_eq!(challenge["service"], UPSTREAM);
    assert_eq!(challenge["scope"], format!("repository:{PRIVATE}:pull"));
    errors.push(got.text());
    let got = Got::read(client.get(format!("{base}/v2/")).send().await.unwrap()).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    assert!(bearer_params(&got).is_some());
    let got = Got::read(
        client
            .get(&challenge["realm"])
            .query(&[
                ("service", UPSTREAM),
                ("scope", challenge["scope"].as_str()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
    errors.push(got.text());

    // carol does the dance with berth's /token (GET with Basic) and pulls.
    let mut carol = Puller::local_user(&berth, CAROL, CAROL_PASSWORD);
    carol.pull(image).await;
    assert_eq!(carol.tokens.len(), 1, "one token for private/app");
    // The same through the OAuth2 password grant.
    let got = post_form(
        &challenge["realm"],
        &[
            ("grant_type", "password"),
            ("username", CAROL),
            ("password", CAROL_PASSWORD),
            ("service", UPSTREAM),
            ("scope", challenge["scope"].as_str()),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let posted = serde_json::from_slice::<Value>(&got.body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    remember_secret(&posted);
    assert_pulls_manifest(&berth, image, &posted).await;
    // Basic credentials straight at berth work as well.
    let got = Got::read(
        manifest
            .build(&client, &base)
            .basic_auth(CAROL, Some(CAROL_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.body, image.manifest_bytes);

    // The static token from tokens_file, as Bearer.
    assert_pulls_manifest(&berth, &origin.content.team, STATIC_TOKEN).await;

    // Wrong password, unknown token: refused with the challenge.
    let got = Got::read(
        client
            .get(&challenge["realm"])
            .query(&[("service", UPSTREAM)])
            .basic_auth(CAROL, Some(WRONG_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
    errors.push(got.text());
    for auth in [
        format!(
            "Basic {}",
            STANDARD.encode(format!("{CAROL}:{WRONG_PASSWORD}"))
        ),
        "Bearer not-a-berth-token-Hh4j".to_owned(),
    ] {
        let got = Got::read(
            manifest
                .build(&client, &base)
                .header(header::AUTHORIZATION, auth)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
        assert!(bearer_params(&got).is_some());
        errors.push(got.text());
    }
    // berth fetched as its own user only.
    assert!(origin.issuer.issued(&Principal::user(ROBOT), None) >= 1);
    assert_eq!(origin.issuer.issued(&Principal::user(CAROL), None), 0);
    errors.append(&mut carol.errors);
    assert_nothing_leaked(&berth, &errors).await;
    berth.stop().await;

    // anonymous = true: anonymous clients pull without any token.
    let berth = service_berth(&origin, &secrets, true).await;
    let mut anonymous = Puller::new(&berth, Who::Anonymous);
    anonymous.pull(image).await;
    assert!(anonymous.tokens.is_empty(), "no token needed");
    assert_nothing_leaked(&berth, &anonymous.errors).await;
}

/// A whole session's worth of dances, pulls and failed logins; then nothing in the logs,
/// metrics or error answers may hold a password or token.
#[tokio::test]
async fn logs_metrics_and_error_bodies_hold_no_password_or_token() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let content = &origin.content;
    let berth = passthrough_berth(&origin, "").await;
    let mut errors = Vec::new();
    let mut alice = Puller::new(&berth, Who::Alice);
    alice.pull(&content.private).await;
    alice.pull(&content.public).await;
    let mut bob = Puller::new(&berth, Who::Bob);
    bob.pull(&content.team).await;
    assert_eq!(
        bob.fetch(&Req::manifest(PRIVATE, &content.private.tag))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // Failed logins, by GET and POST, and wrong Basic credentials straight at berth.
    let realm = format!("{}/token", berth.url());
    let got = Got::read(
        http()
            .get(&realm)
            .query(&[
                ("service", UPSTREAM),
                ("scope", "repository:private/app:pull"),
            ])
            .basic_auth(ALICE, Some(WRONG_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    errors.push(got.text());
    let got = post_form(
        &realm,
        &[
            ("grant_type", "password"),
            ("username", ALICE),
            ("password", WRONG_PASSWORD),
            ("service", UPSTREAM),
        ],
    )
    .await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    errors.push(got.text());
    let got = Got::read(
        Req::manifest(PRIVATE, &content.private.tag)
            .build(&http(), &berth.url())
            .basic_auth(ALICE, Some(WRONG_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let wrong_basic = got.clone();
    errors.push(got.text());
    // Alice's correct Basic credentials straight at berth (berth logs in for her).
    let got = Got::read(
        Req::manifest(PRIVATE, &content.private.tag)
            .build(&http(), &berth.url())
            .basic_auth(ALICE, Some(ALICE_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    errors.append(&mut alice.errors);
    errors.append(&mut bob.errors);
    // The tokens berth forwarded are in the set checked: the clients' ones.
    let logs = captured_logs();
    assert!(
        logs.contains("/token"),
        "the token requests were logged (so their absence of secrets means something)"
    );
    assert_nothing_leaked(&berth, &errors).await;
    // A wrong password sent straight to berth is refused as such, with a challenge.
    assert_eq!(
        wrong_basic.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        wrong_basic.text()
    );
    assert!(bearer_params(&wrong_basic).is_some());
}

// ---------------------------------------------------------------------------------------------
// Tenancy across upstreams: the membership rule in every mode (issue "A shared cache that never
// crosses tenants").

/// How an upstream of the tenancy matrix authorizes its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Public,
    Service,
    Passthrough,
}

/// One upstream of a pair: its name (also its path prefix), `?ns=` alias, mode and origin.
#[derive(Clone, Copy, Debug)]
struct Up {
    name: &'static str,
    alias: &'static str,
    mode: Mode,
    /// Index into the origins of the test.
    origin: usize,
    default: bool,
}

/// How a request names its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Ns,
    Prefix,
    Default,
}

impl Up {
    fn routes(&self) -> Vec<Route> {
        let mut r = vec![Route::Ns, Route::Prefix];
        if self.default {
            r.push(Route::Default);
        }
        r
    }

    /// `req` (a default-route request for the repository at the origin) as `route` names it.
    fn via(&self, route: Route, req: &Req) -> Req {
        let mut r = req.clone();
        match route {
            Route::Default => {}
            Route::Prefix => r.path = r.path.replacen("/v2/", &format!("/v2/{}/", self.name), 1),
            Route::Ns => r.path = format!("{}?ns={}", r.path, self.alias),
        }
        r
    }

    /// The principal whose view of the origin berth serves to `who` through this upstream.
    fn effective(&self, who: Who) -> Option<(&'static str, &'static str)> {
        match self.mode {
            Mode::Public => None,
            Mode::Service => Some((ROBOT, ROBOT_PASSWORD)),
            Mode::Passthrough => who.credentials(),
        }
    }

    /// Who warms this upstream (pulling everything its view allows), and who attacks it.
    fn warmer_and_attacker(&self) -> (Who, Who) {
        match self.mode {
            Mode::Public => (Who::Anonymous, Who::Anonymous),
            Mode::Service => (Who::Ci, Who::Carol),
            Mode::Passthrough => (Who::Alice, Who::Bob),
        }
    }

    fn table(&self, origins: &[&Origin], secrets: &Path) -> String {
        let mut t = format!(
            "[[upstream]]\nname = \"{}\"\nurl = \"{}\"\naliases = [\"{}\"]\ndefault = {}\n\
             connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n",
            self.name,
            origins[self.origin].registry.url(),
            self.alias,
            self.default
        );
        match self.mode {
            Mode::Public => t.push_str("auth = \"public\"\n"),
            Mode::Passthrough => t.push_str("auth = \"passthrough\"\n"),
            Mode::Service => t.push_str(&format!(
                "auth = \"service\"\nanonymous = false\nusername = \"{ROBOT}\"\npassword_file = \"{}\"\n",
                secrets.join("origin-password").display()
            )),
        }
        t
    }
}

/// Local users, static tokens and berth's origin password, written to `dir`; the `[auth]`
/// table naming them.
fn local_auth_files(dir: &Path) -> String {
    std::fs::write(dir.join("origin-password"), format!("{ROBOT_PASSWORD}\n")).unwrap();
    let hash = bcrypt::hash_with_result(CAROL_PASSWORD, 4)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoY);
    std::fs::write(dir.join("htpasswd"), format!("{CAROL}:{hash}\n")).unwrap();
    std::fs::write(dir.join("tokens"), format!("ci:{STATIC_TOKEN}\n")).unwrap();
    format!(
        "[auth]\nhtpasswd_file = \"{}\"\ntokens_file = \"{}\"\n",
        dir.join("htpasswd").display(),
        dir.join("tokens").display()
    )
}

/// What an origin answers a principal (`None`: anonymous), per request, remembered.
#[derive(Default)]
struct OriginView {
    tokens: HashMap<(usize, Option<&'static str>, String), String>,
    answers: HashMap<(usize, Option<&'static str>, String), Outcome>,
}

impl OriginView {
    async fn outcome(
        &mut self,
        origins: &[&Origin],
        origin: usize,
        creds: Option<(&'static str, &'static str)>,
        req: &Req,
    ) -> Outcome {
        let user = creds.map(|c| c.0);
        let key = (origin, user, req.describe());
        if let Some(o) = self.answers.get(&key) {
            return o.clone();
        }
        let scope = req.scope();
        let tkey = (origin, user, scope.clone());
        let token = match self.tokens.get(&tkey) {
            Some(t) => t.clone(),
            None => {
                let t = issuer_token(&origins[origin].issuer, creds, &scope).await;
                self.tokens.insert(tkey, t.clone());
                t
            }
        };
        let got = Got::read(
            req.build(&http(), &origins[origin].registry.url())
                .bearer_auth(&token)
                .send()
                .await
                .expect("registry answers"),
        )
        .await;
        let o = got.outcome();
        self.answers.insert(key, o.clone());
        o
    }
}

/// The probes of one (image, repository): the manifest by digest, the config, and the first
/// layer by GET, HEAD and Range.
fn tenancy_probes(image: &TestImage, repo: &str) -> Vec<(&'static str, Req)> {
    let layer = &image.layers.last().expect("a layer").0;
    vec![
        (
            "manifest by digest",
            Req::manifest(repo, &image.manifest_digest),
        ),
        ("config GET", Req::blob(repo, &image.config_digest)),
        ("layer GET", Req::blob(repo, layer)),
        ("layer HEAD", Req::blob(repo, layer).head()),
        ("layer Range", Req::blob(repo, layer).range("bytes=10-109")),
    ]
}

/// Pulls, through `up` by `route`, every image `who`'s view of the origin allows (manifest by
/// tag and digest, every blob), asserting 200s.
async fn warm_upstream(
    berth: &Berth,
    up: &Up,
    who: Who,
    images: &[&TestImage],
    origins: &[&Origin],
    view: &mut OriginView,
) -> Vec<String> {
    let mut p = Puller::new(berth, who).any_service();
    let mut pulled = Vec::new();
    for image in images {
        let probe = Req::manifest(&image.repo, &image.manifest_digest);
        let at_origin = view
            .outcome(origins, up.origin, up.effective(who), &probe)
            .await;
        if !matches!(at_origin, Outcome::Ok(_)) {
            continue;
        }
        let mut reqs = vec![
            Req::manifest(&image.repo, &image.tag),
            Req::manifest(&image.repo, &image.manifest_digest),
        ];
        for (d, _) in image.blobs() {
            reqs.push(Req::blob(&image.repo, d));
        }
        for r in reqs {
            let got = p.fetch(&up.via(Route::Ns, &r)).await;
            assert_eq!(
                got.status,
                StatusCode::OK,
                "warming {} as {who:?}: {}: {}",
                up.name,
                r.describe(),
                got.text()
            );
        }
        pulled.push(image.repo.clone());
    }
    pulled
}

#[tokio::test]
async fn tenancy_matrix_no_upstream_serves_what_its_origin_would_refuse() {
    capture_logs();
    // Origin 0: alice private/*, bob team-b/*, the robot team-b/* and public/*, anyone
    // public/*. Origin 1: the same principals and policy, holding public/base and team-b/tool
    // (the same bytes as origin 0's) but no private/app.
    let issuer_policy = || robot_issuer("team-b/*");
    let origin0 = start_origin(issuer_policy()).await;
    let issuer1 = issuer_policy().start().await;
    let registry1 = issuer1.start_registry().await;
    issuer1
        .push_oci_image(&registry1, PUBLIC, "1.0", &[4_096, 9_000], 11)
        .await;
    issuer1
        .push_oci_image(&registry1, TEAM, "2.0", &[3_000, 20_000], 22)
        .await;
    let origin1 = Origin {
        issuer: issuer1,
        registry: registry1,
        content: push_nothing(&origin0.content),
    };
    let origins = [&origin0, &origin1];
    let content = &origin0.content;
    let images = [&content.private, &content.team, &content.public];
    let up = |name, alias, mode, origin, default| Up {
        name,
        alias,
        mode,
        origin,
        default,
    };
    let pairs = [
        (
            up("anon", "anon.example", Mode::Public, 0, true),
            up("tok", "tok.example", Mode::Passthrough, 0, false),
        ),
        (
            up("anon", "anon.example", Mode::Public, 0, true),
            up("svc", "svc.example", Mode::Service, 0, false),
        ),
        (
            up("svc", "svc.example", Mode::Service, 0, true),
            up("tok", "tok.example", Mode::Passthrough, 0, false),
        ),
        (
            up("tok", "tok.example", Mode::Passthrough, 0, true),
            up("tok2", "tok2.example", Mode::Passthrough, 1, false),
        ),
    ];
    let mut view = OriginView::default();
    let (mut total, mut failures, mut leaks) = (0usize, Vec::new(), Vec::new());
    let mut by_outcome: HashMap<&'static str, usize> = HashMap::new();
    for (a, b) in pairs {
        for warm in [false, true] {
            let secrets = tempfile::tempdir().unwrap();
            let tables = format!(
                "{}{}{}",
                a.table(&origins, secrets.path()),
                b.table(&origins, secrets.path()),
                local_auth_files(secrets.path())
            );
            let berth = Berth::with_upstreams(&tables).start().await;
            let mut warmed = Vec::new();
            if warm {
                for u in [&a, &b] {
                    let (warmer, _) = u.warmer_and_attacker();
                    let repos =
                        warm_upstream(&berth, u, warmer, &images, &origins, &mut view).await;
                    warmed.push(format!("{} by {warmer:?}: {repos:?}", u.name));
                }
            }
            for u in [&a, &b] {
                let (_, attacker) = u.warmer_and_attacker();
                let mut p = Puller::new(&berth, attacker).any_service();
                for route in u.routes() {
                    for image in images {
                        for repo in [PRIVATE, TEAM, PUBLIC] {
                            for (what, req) in tenancy_probes(image, repo) {
                                let have = match p.try_fetch(&u.via(route, &req)).await {
                                    Ok(got) => got.outcome(),
                                    // A 401 without berth's challenge, or a failed login.
                                    Err(_) => Outcome::Other(401),
                                };
                                let want = view
                                    .outcome(&origins, u.origin, u.effective(attacker), &req)
                                    .await;
                                total += 1;
                                *by_outcome
                                    .entry(match want {
                                        Outcome::Ok(_) => "ok",
                                        Outcome::Refused => "refused",
                                        Outcome::NotFound => "not found",
                                        Outcome::Other(_) => "other",
                                    })
                                    .or_default() += 1;
                                if have != want {
                                    failures.push(format!(
                                        "{}+{} warm={warm} {attacker:?} via {} ({route:?}) {what} of {} in {repo}: berth {have:?}, origin {want:?}",
                                        a.name, b.name, u.name, image.repo
                                    ));
                                }
                            }
                        }
                    }
                }
                if attacker != Who::Alice {
                    leaks.extend(content.private_leaks(attacker, &p.bodies));
                }
            }
            if warm {
                assert!(
                    warmed
                        .iter()
                        .any(|w| w.contains(PRIVATE) || w.contains(TEAM)),
                    "the warm-up cached something an attacker may not read: {warmed:?}"
                );
            }
            berth.stop().await;
        }
    }
    println!(
        "tenancy matrix: {total} cells (4 upstream pairs × {{cold, warmed by another principal}} × routes {{ns, prefix, default}} × 3 images × 3 repositories × {{manifest by digest, config, layer GET/HEAD/Range}}), {} pass; origin answers: {by_outcome:?}",
        total - failures.len()
    );
    assert!(
        leaks.is_empty(),
        "an attacker received private content:\n{}",
        leaks.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{} of {total} cells differ from the origin:\n{}",
        failures.len(),
        failures
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `Content` for an origin that holds only what was pushed separately (the same images as
/// `c`, for probes; nothing is pushed here).
fn push_nothing(c: &Content) -> Content {
    Content {
        private: c.private.clone(),
        team: c.team.clone(),
        public: c.public.clone(),
        other: c.other.clone(),
        shared: c.shared.clone(),
    }
}

/// bob pushes to his own repository a manifest whose `subject` names alice's private manifest
/// (registries accept a subject they cannot resolve), pulls it through berth, asks for its
/// referrers, then asks for alice's manifest and layers under his repository: nothing.
#[tokio::test]
async fn a_subject_or_referrers_listing_is_never_evidence_of_membership() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let content = &origin.content;
    let berth = passthrough_berth(&origin, "").await;
    let mut alice = Puller::new(&berth, Who::Alice);
    alice.pull(&content.private).await;

    let team = &content.team;
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": team.config_digest, "size": team.config_bytes.len() },
        "layers": team.layers.iter().map(|(d, b)| json!({
            "mediaType": OCI_LAYER_TAR, "digest": d, "size": b.len(),
        })).collect::<Vec<_>>(),
        "subject": {
            "mediaType": OCI_MANIFEST,
            "digest": content.private.manifest_digest,
            "size": content.private.manifest_bytes.len(),
        },
    }))
    .unwrap();
    let gate = origin.issuer.push_gate(&origin.registry).await;
    let pushed = push_manifest(&gate.url(), TEAM, "signed", OCI_MANIFEST, &referrer).await;
    assert_eq!(
        pushed,
        sha256_digest(&referrer),
        "the registry took the subject"
    );

    let mut bob = Puller::new(&berth, Who::Bob);
    let own = bob.fetch(&Req::manifest(TEAM, "signed")).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.text());
    assert_eq!(own.body, referrer);
    // The referrers listing of alice's manifest in bob's repository (whatever the origin says).
    let listing = Req {
        method: Method::GET,
        path: format!("/v2/{TEAM}/referrers/{}", content.private.manifest_digest),
        range: None,
        if_none_match: None,
    };
    let _ = bob.fetch(&listing).await;

    let private = &content.private;
    let mut probes = vec![
        Req::manifest(TEAM, &private.manifest_digest),
        Req::manifest(TEAM, &private.manifest_digest).head(),
    ];
    for (d, _) in private.blobs() {
        if *d == content.shared {
            continue;
        }
        probes.push(Req::blob(TEAM, d));
        probes.push(Req::blob(TEAM, d).head());
        probes.push(Req::blob(TEAM, d).range("bytes=0-99"));
    }
    let mut answers = Vec::new();
    for req in &probes {
        let got = bob.fetch(req).await;
        answers.push(format!("{} -> {}", req.describe(), got.status));
        assert_eq!(
            got.status,
            StatusCode::NOT_FOUND,
            "{} under bob's repository: {}",
            req.describe(),
            got.text()
        );
    }
    content.assert_no_private_bytes(Who::Bob, &bob.bodies);
    println!("subject attack: {}", answers.join("; "));
    berth.stop().await;
}

/// Tokens berth issues name their upstream, subject and repositories: one never opens another
/// upstream (a public upstream's anonymous token at a service upstream that refuses anonymous
/// clients, one service upstream's token at another) or another repository.
#[tokio::test]
async fn tokens_open_only_the_upstream_and_repositories_they_were_issued_for() {
    capture_logs();
    let origin = start_origin(robot_issuer("team-b/*")).await;
    let secrets = tempfile::tempdir().unwrap();
    let ups = [
        Up {
            name: "pub",
            alias: "pub.example",
            mode: Mode::Public,
            origin: 0,
            default: true,
        },
        Up {
            name: "svc",
            alias: "svc.example",
            mode: Mode::Service,
            origin: 0,
            default: false,
        },
        Up {
            name: "svc2",
            alias: "svc2.example",
            mode: Mode::Service,
            origin: 0,
            default: false,
        },
        Up {
            name: "tok",
            alias: "tok.example",
            mode: Mode::Passthrough,
            origin: 0,
            default: false,
        },
    ];
    let origins = [&origin];
    let mut tables: String = ups
        .iter()
        .map(|u| u.table(&origins, secrets.path()))
        .collect();
    tables.push_str(&local_auth_files(secrets.path()));
    let berth = Berth::with_upstreams(&tables).start().await;
    let token_for = |service: &'static str, scope: String, creds: Option<(&str, &str)>| {
        let mut b = http()
            .get(format!("{}/token", berth.url()))
            .query(&[("service", service), ("scope", scope.as_str())]);
        if let Some((u, p)) = creds {
            b = b.basic_auth(u, Some(p));
        }
        async move {
            let got = Got::read(b.send().await.unwrap()).await;
            assert_eq!(
                got.status,
                StatusCode::OK,
                "{service} {scope}: {}",
                got.text()
            );
            let v: Value = serde_json::from_slice(&got.body).unwrap();
            let t = v["token"].as_str().unwrap().to_owned();
            remember_secret(&t);
            t
        }
    };
    let team_scope = format!("repository:{TEAM}:pull");
    let anonymous_pub = token_for("pub", team_scope.clone(), None).await;
    let carol_svc = token_for("svc", team_scope.clone(), Some((CAROL, CAROL_PASSWORD))).await;
    // Scope named with the path prefix, as a client of /v2/svc/team-b/... asks for it.
    let carol_prefixed = token_for(
        "svc",
        format!("repository:svc/{TEAM}:pull"),
        Some((CAROL, CAROL_PASSWORD)),
    )
    .await;
    let team_blob = Req::blob(TEAM, &origin.content.team.config_digest);
    let public_blob = Req::blob(PUBLIC, &origin.content.public.config_digest);
    let status = |req: Req, token: String| {
        let b = req.build(&http(), &berth.url()).bearer_auth(token);
        async move { b.send().await.unwrap().status() }
    };
    let svc = &ups[1];
    // Each token where it was issued for: accepted.
    assert_eq!(
        status(svc.via(Route::Ns, &team_blob), carol_svc.clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        status(svc.via(Route::Prefix, &team_blob), carol_prefixed.clone()).await,
        StatusCode::OK
    );
    let mut refused = Vec::new();
    for (what, token) in [
        ("pub's anonymous token", &anonymous_pub),
        ("svc's token for carol", &carol_svc),
    ] {
        for u in &ups[1..] {
            for (req, same_scope) in [(&team_blob, true), (&public_blob, false)] {
                let issued_here = what.starts_with(u.name) && u.name == "svc";
                if issued_here && same_scope {
                    continue;
                }
                for route in [Route::Ns, Route::Prefix] {
                    let got = status(u.via(route, req), token.clone()).await;
                    refused.push(format!(
                        "{what} at {} ({route:?}) {}: {got}",
                        u.name,
                        req.describe()
                    ));
                    assert_eq!(
                        got,
                        StatusCode::UNAUTHORIZED,
                        "{what} presented to {} ({route:?}) for {}",
                        u.name,
                        req.describe()
                    );
                }
            }
        }
    }
    println!("token binding: {} presentations refused", refused.len());
    berth.stop().await;
}

/// A stream of wrong passwords (at berth's `/token` and as Basic credentials on pulls) reaches
/// the origin's token service about once per back-off period, not once per attempt, so clients
/// behind berth cannot get its address locked out; the right password is not held back.
#[tokio::test]
async fn wrong_passwords_are_held_back_from_the_origin_token_service() {
    capture_logs();
    let origin = start_origin(policy_issuer()).await;
    let berth = passthrough_berth(&origin, "").await;
    let image = &origin.content.private;
    let refused_at_origin = || {
        origin.issuer.count(|r| {
            r.principal == Principal::user(ALICE) && r.status == StatusCode::UNAUTHORIZED
        })
    };
    let mut errors = Vec::new();
    let started = Instant::now();
    for _ in 0..20 {
        let got = Got::read(
            http()
                .get(format!("{}/token", berth.url()))
                .query(&[
                    ("service", UPSTREAM),
                    ("scope", &format!("repository:{PRIVATE}:pull")),
                ])
                .basic_auth(ALICE, Some(WRONG_PASSWORD))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
        errors.push(got.text());
        let got = Got::read(
            Req::manifest(PRIVATE, &image.tag)
                .build(&http(), &berth.url())
                .basic_auth(ALICE, Some(WRONG_PASSWORD))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{}", got.text());
        errors.push(got.text());
    }
    let elapsed = started.elapsed();
    let reached = refused_at_origin();
    // The waits double from 1 s: within `elapsed`, at most 1 + log2(elapsed) + 1 attempts.
    let allowed = 2 + elapsed.as_secs_f64().max(1.0).log2().ceil() as usize;
    println!("40 wrong-password attempts in {elapsed:?}: {reached} reached the token service");
    assert!(reached >= 1, "the first attempt is the origin's to refuse");
    assert!(
        reached <= allowed,
        "{reached} of 40 wrong-password attempts reached the origin's token service in {elapsed:?}"
    );
    // The right password is another credential: answered at once.
    let got = Got::read(
        Req::manifest(PRIVATE, &image.tag)
            .build(&http(), &berth.url())
            .basic_auth(ALICE, Some(ALICE_PASSWORD))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_nothing_leaked(&berth, &errors).await;
}

/// `server.external_url` is the realm clients are sent to (berth behind a load balancer or an
/// ingress), and `auth.token_ttl` the lifetime of the tokens berth issues.
#[tokio::test]
async fn external_url_names_the_realm_and_token_ttl_bounds_issued_tokens() {
    capture_logs();
    let origin = start_origin(robot_issuer("*")).await;
    let secrets = tempfile::tempdir().unwrap();
    let auth =
        local_auth_files(secrets.path()).replace("[auth]\n", "[auth]\ntoken_ttl = \"90s\"\n");
    let table = format!(
        "[[upstream]]\nname = \"{UPSTREAM}\"\nurl = \"{}\"\ndefault = true\nauth = \"service\"\n\
         anonymous = false\nusername = \"{ROBOT}\"\npassword_file = \"{}\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n{auth}",
        origin.registry.url(),
        secrets.path().join("origin-password").display(),
    );
    let external = "https://cache.example.test:8443";
    let berth = Berth::with_upstreams(&table)
        .server(&format!("external_url = \"{external}\""))
        .start()
        .await;
    let client = http();
    let manifest = Req::manifest(PRIVATE, &origin.content.private.tag);
    let got = Got::read(manifest.build(&client, &berth.url()).send().await.unwrap()).await;
    assert_eq!(got.status, StatusCode::UNAUTHORIZED);
    let challenge = bearer_params(&got).expect("Bearer challenge");
    assert_eq!(challenge["realm"], format!("{external}/token"));
    // The token endpoint itself is berth's (the external URL is only what clients are told).
    let got = Got::read(
        client
            .get(format!("{}/token", berth.url()))
            .basic_auth(CAROL, Some(CAROL_PASSWORD))
            .query(&[
                ("service", UPSTREAM),
                ("scope", challenge["scope"].as_str()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(v["expires_in"], 90, "{v}");
    let token = v["token"].as_str().expect("token").to_owned();
    remember_secret(&token);
    let got = Got::read(
        manifest
            .build(&client, &berth.url())
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_nothing_leaked(&berth, &[]).await;
}
