//! berth's own login at a token-protected origin (docs/ARCHITECTURE.md, "Upstream client"): the Docker token dance against a
//! real `docker-registry` with `auth.token`, whose tokens come from the in-process test issuer
//! (`common::issuer`). Covers credentials, anonymous access, bad passwords, token expiry and
//! the OAuth2 POST fallback.

mod common;

use std::time::Duration;

use common::berth::Berth;
use common::content::OCI_MANIFEST;
use common::issuer::{
    AuthKind, Grantee, IssuerBuilder, Principal, TokenIssuer, ADMIN_PASSWORD, ADMIN_USER, SERVICE,
};
use common::{Registry, Tap, TestImage};
use reqwest::{header, Client, Method, StatusCode};
use serde_json::Value;
use tempfile::TempDir;

/// berth's user at the origin.
const USER: &str = "berth-robot";
/// Its password: distinctive, so a leak into an answer is easy to spot.
const PASSWORD: &str = "pw-Xq7-robot-secret";
/// Longest any single request through berth may take here: an auth failure is an answer, not a
/// hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Token lifetime of the expiry tests, and how long they wait for it to pass (counted from
/// after the token was issued, so the wait always reaches expiry). Expiry is the registry's own
/// wall-clock time; six seconds keeps the "still valid" checks out of reach of a slow machine.
const SHORT_LIFETIME: Duration = Duration::from_secs(6);
const PAST_EXPIRY: Duration = Duration::from_millis(6_500);

/// A token issuer and the registry that trusts it.
struct Origin {
    issuer: TokenIssuer,
    registry: Registry,
}

/// berth in front of an [`Origin`], and the directory holding its password file.
struct Proxy {
    berth: Berth,
    _secrets: TempDir,
}

async fn origin(builder: IssuerBuilder) -> Origin {
    let issuer = builder.start().await;
    let registry = issuer.start_registry().await;
    Origin { issuer, registry }
}

/// The usual issuer: `USER` may pull everything under `team/`.
fn team_issuer() -> IssuerBuilder {
    TokenIssuer::builder()
        .user(USER, PASSWORD)
        .allow(Grantee::user(USER), "team/*", &["pull"])
}

/// Starts berth with `origin` as its default upstream, logging in as `credentials` if given.
async fn berth_for(origin: &Origin, credentials: Option<(&str, &str)>) -> Proxy {
    berth_in_front_of(&origin.registry.url(), credentials).await
}

/// Starts berth with `url` (the origin, or a tap in front of it) as its default upstream.
async fn berth_in_front_of(url: &str, credentials: Option<(&str, &str)>) -> Proxy {
    let secrets = tempfile::Builder::new()
        .prefix("berth-secrets-")
        .tempdir()
        .expect("create secrets dir");
    let mut table = format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{}\"\ndefault = true\nauth = \"public\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n",
        url
    );
    if let Some((user, password)) = credentials {
        let path = secrets.path().join("origin-password");
        std::fs::write(&path, format!("{password}\n")).expect("write password file");
        table.push_str(&format!(
            "username = \"{user}\"\npassword_file = \"{}\"\n",
            path.display()
        ));
    }
    Proxy {
        berth: Berth::with_upstreams(&table).start().await,
        _secrets: secrets,
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build reqwest client")
}

async fn get_manifest(base: &str, repo: &str, reference: &str) -> reqwest::Response {
    client()
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .expect("manifest request answered in time")
}

async fn get_blob(base: &str, repo: &str, digest: &str) -> reqwest::Response {
    client()
        .get(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .await
        .expect("blob request answered in time")
}

/// Pulls `image` through berth: manifest by tag and by digest, then every blob, byte-exact.
async fn assert_pulls(base: &str, image: &TestImage) {
    for reference in [&image.tag, &image.manifest_digest] {
        let resp = get_manifest(base, &image.repo, reference).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("manifest body");
        assert_eq!(
            status,
            StatusCode::OK,
            "manifest {}:{reference}: {}",
            image.repo,
            String::from_utf8_lossy(&body)
        );
        assert_eq!(headers[header::CONTENT_TYPE], image.media_type.as_str());
        assert_eq!(
            headers["docker-content-digest"],
            image.manifest_digest.as_str()
        );
        assert_eq!(body.as_ref(), image.manifest_bytes.as_slice());
    }
    for (digest, bytes) in image.blobs() {
        let resp = get_blob(base, &image.repo, digest).await;
        let status = resp.status();
        let body = resp.bytes().await.expect("blob body");
        assert_eq!(
            status,
            StatusCode::OK,
            "blob {digest}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(body.as_ref() == bytes, "blob {digest} differs");
    }
}

/// Asserts `resp` is berth's refusal for want of authorization: 401 `UNAUTHORIZED` or 403
/// `DENIED`, as an OCI JSON error. Returns the body text.
async fn assert_refused(resp: reqwest::Response, what: &str) -> String {
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let text = resp.text().await.expect("error body");
    assert!(
        status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
        "{what}: want 401 or 403, got {status}: {text}"
    );
    assert_eq!(content_type.as_deref(), Some("application/json"), "{what}");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {text}"));
    let code = v["errors"][0]["code"].as_str().unwrap_or_default();
    let want = if status == StatusCode::UNAUTHORIZED {
        "UNAUTHORIZED"
    } else {
        "DENIED"
    };
    assert_eq!(code, want, "{what}: {text}");
    assert!(v["errors"][0]["message"].is_string(), "{what}: {text}");
    text
}

/// A token from `issuer` by GET, as `credentials` or anonymously.
async fn fetch_token(
    issuer: &TokenIssuer,
    credentials: Option<(&str, &str)>,
    scope: &str,
) -> Value {
    let mut req = client()
        .get(issuer.realm())
        .query(&[("service", SERVICE), ("scope", scope)]);
    if let Some((user, password)) = credentials {
        req = req.basic_auth(user, Some(password));
    }
    let resp = req.send().await.expect("token request");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.expect("token JSON")
}

/// Status of `GET /v2/<repo>/tags/list` straight at the registry with `token`.
async fn registry_status(registry: &Registry, repo: &str, token: &str) -> StatusCode {
    client()
        .get(format!("{}/v2/{repo}/tags/list", registry.url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("registry request")
        .status()
}

/// Tokens the issuer granted to berth's user.
fn issued_to_berth(issuer: &TokenIssuer) -> usize {
    issuer.issued(&Principal::user(USER), None)
}

#[tokio::test]
async fn harness_issuer_tokens_are_what_the_registry_checks() {
    let o = origin(team_issuer().allow(Grantee::Anonymous, "public/*", &["pull"])).await;
    o.issuer
        .push_oci_image(&o.registry, "team/app", "v1", &[100], 1)
        .await;
    o.issuer
        .push_oci_image(&o.registry, "public/app", "v1", &[100], 2)
        .await;

    // The registry challenges with this issuer's realm and service.
    let resp = client()
        .get(format!("{}/v2/team/app/tags/list", o.registry.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let challenge = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(challenge.contains(&o.issuer.realm()), "{challenge}");
    assert!(challenge.contains(SERVICE), "{challenge}");

    // Granted, not granted, anonymous.
    let scope = "repository:team/app:pull";
    let ok = fetch_token(&o.issuer, Some((USER, PASSWORD)), scope).await;
    let token = ok["token"].as_str().unwrap();
    assert_eq!(ok["access_token"], ok["token"]);
    assert_eq!(ok["expires_in"], 300);
    assert!(ok["issued_at"].as_str().unwrap().ends_with('Z'));
    assert!(ok.get("refresh_token").is_none());
    assert_eq!(
        registry_status(&o.registry, "team/app", token).await,
        StatusCode::OK
    );
    assert_eq!(
        registry_status(&o.registry, "public/app", token).await,
        StatusCode::UNAUTHORIZED,
        "a token for team/app is not one for public/app"
    );
    let anonymous = fetch_token(&o.issuer, None, "repository:public/app:pull").await;
    let anonymous = anonymous["token"].as_str().unwrap();
    assert_eq!(
        registry_status(&o.registry, "public/app", anonymous).await,
        StatusCode::OK
    );
    let denied = fetch_token(&o.issuer, None, scope).await;
    assert_eq!(
        registry_status(&o.registry, "team/app", denied["token"].as_str().unwrap()).await,
        StatusCode::UNAUTHORIZED
    );
    let last = o.issuer.requests().pop().unwrap();
    assert_eq!(last.principal, Principal::Anonymous);
    assert!(last.granted.is_empty(), "{last:?}");
    let forged = o.issuer.mint(&Principal::user(ADMIN_USER), &[]);
    assert_eq!(
        registry_status(&o.registry, "team/app", &format!("{forged}x")).await,
        StatusCode::UNAUTHORIZED,
        "a bad signature is refused"
    );

    // Bad password; OAuth2 password and refresh grants.
    let resp = client()
        .get(o.issuer.realm())
        .basic_auth(USER, Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let form = [
        ("grant_type", "password"),
        ("username", ADMIN_USER),
        ("password", ADMIN_PASSWORD),
        ("access_type", "offline"),
        ("client_id", "harness"),
        ("service", SERVICE),
        (
            "scope",
            "repository:team/app:pull,push repository:public/app:pull",
        ),
    ];
    let resp = client()
        .post(o.issuer.realm())
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    let refresh = answer["refresh_token"].as_str().unwrap().to_owned();
    let last = o.issuer.requests().pop().unwrap();
    assert_eq!(last.auth, AuthKind::PasswordGrant);
    assert_eq!(last.granted.len(), 2, "admin gets every scope: {last:?}");
    let resp = client()
        .post(o.issuer.realm())
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.as_str()),
            ("scope", scope),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["refresh_token"], refresh.as_str());
    assert_eq!(
        registry_status(&o.registry, "team/app", answer["token"].as_str().unwrap()).await,
        StatusCode::OK
    );
    let resp = client()
        .post(o.issuer.realm())
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "bogus")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        o.issuer
            .count(|r| r.method == Method::POST && r.status == StatusCode::OK),
        2
    );
}

#[tokio::test]
async fn pulls_with_its_credentials_and_reuses_a_token_per_repository() {
    let o = origin(team_issuer()).await;
    let first = o
        .issuer
        .push_oci_image(&o.registry, "team/app", "v1", &[3_000, 70_000], 1)
        .await;
    let second = o
        .issuer
        .push_oci_image(&o.registry, "team/app", "v2", &[5_000], 2)
        .await;
    let other = o
        .issuer
        .push_oci_image(&o.registry, "team/other", "v1", &[1_000], 3)
        .await;
    assert!(
        o.issuer.requests().is_empty(),
        "pushes mint tokens in process"
    );
    let p = berth_for(&o, Some((USER, PASSWORD))).await;
    let base = p.berth.url();

    assert_pulls(&base, &first).await;
    let requests = o.issuer.requests();
    assert_eq!(
        requests.len(),
        1,
        "one token for a whole pull: {requests:?}"
    );
    let r = &requests[0];
    assert_eq!(r.method, Method::GET);
    assert_eq!(r.auth, AuthKind::Basic, "berth logs in with Basic");
    assert_eq!(r.principal, Principal::user(USER));
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.service.as_deref(), Some(SERVICE));
    assert_eq!(r.scopes, ["repository:team/app:pull"]);
    assert_eq!(r.granted.len(), 1);
    assert_eq!(r.granted[0].actions, ["pull"]);

    // Another image of the same repository: the cached token serves.
    assert_pulls(&base, &second).await;
    assert_eq!(
        o.issuer.requests().len(),
        1,
        "same scope, same token: {:?}",
        o.issuer.requests()
    );

    // Another repository is another scope: one more token.
    assert_pulls(&base, &other).await;
    let requests = o.issuer.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[1].scopes, ["repository:team/other:pull"]);
    assert_eq!(issued_to_berth(&o.issuer), 2);
}

#[tokio::test]
async fn anonymous_pull_where_the_origin_allows_it_and_refusal_where_not() {
    let o = origin(TokenIssuer::builder().allow(Grantee::Anonymous, "public/*", &["pull"])).await;
    let public = o
        .issuer
        .push_oci_image(&o.registry, "public/app", "v1", &[2_000], 1)
        .await;
    let private = o
        .issuer
        .push_oci_image(&o.registry, "private/app", "v1", &[2_000], 2)
        .await;
    let p = berth_for(&o, None).await;
    let base = p.berth.url();

    assert_pulls(&base, &public).await;
    assert_eq!(o.issuer.issued(&Principal::Anonymous, Some(Method::GET)), 1);
    assert!(o
        .issuer
        .requests()
        .iter()
        .all(|r| r.auth == AuthKind::Anonymous));

    let by_tag = get_manifest(&base, "private/app", "v1").await;
    assert_refused(by_tag, "private manifest by tag").await;
    let by_digest = get_manifest(&base, "private/app", &private.manifest_digest).await;
    assert_refused(by_digest, "private manifest by digest").await;
    let (layer, _) = &private.layers[0];
    assert_refused(get_blob(&base, "private/app", layer).await, "private layer").await;
    let private_tokens = o.issuer.count(|r| {
        r.scopes
            .iter()
            .any(|s| s.starts_with("repository:private/app:"))
    });
    assert!(private_tokens >= 1, "berth asked for a private/app token");
    assert!(
        o.issuer
            .requests()
            .iter()
            .all(|r| r.granted.iter().all(|a| a.name != "private/app")),
        "anonymous never got private/app"
    );
}

#[tokio::test]
async fn wrong_password_is_refused_without_echoing_it() {
    const WRONG: &str = "pw-wrong-Zk9-never-echo";
    let o = origin(team_issuer()).await;
    let image = o
        .issuer
        .push_oci_image(&o.registry, "team/app", "v1", &[1_000], 1)
        .await;
    let p = berth_for(&o, Some((USER, WRONG))).await;
    let base = p.berth.url();

    let mut bodies = Vec::new();
    bodies.push(assert_refused(get_manifest(&base, "team/app", "v1").await, "manifest").await);
    bodies.push(
        assert_refused(
            get_blob(&base, "team/app", &image.config_digest).await,
            "config blob",
        )
        .await,
    );
    for body in &bodies {
        assert!(!body.contains(WRONG), "password in berth's answer: {body}");
        assert!(!body.contains(PASSWORD), "{body}");
    }
    let metrics = p.berth.metrics().await;
    assert!(!metrics.contains(WRONG), "password in metrics");
    // The refusal is remembered briefly: the two pulls above asked the token service once.
    assert_eq!(
        o.issuer.count(|r| r.principal == Principal::user(USER)),
        1,
        "{:?}",
        o.issuer.requests()
    );

    let failed = o.issuer.count(|r| {
        r.status == StatusCode::UNAUTHORIZED
            && r.principal == Principal::user(USER)
            && r.auth == AuthKind::Basic
    });
    assert!(failed >= 1, "{:?}", o.issuer.requests());
    assert_eq!(issued_to_berth(&o.issuer), 0);
}

#[tokio::test]
async fn refetches_a_token_after_it_expired() {
    let o = origin(team_issuer().expires_in(SHORT_LIFETIME)).await;
    let first = o
        .issuer
        .push_oci_image(&o.registry, "team/app", "v1", &[1_000], 1)
        .await;
    let second = o
        .issuer
        .push_oci_image(&o.registry, "team/app", "v2", &[1_000], 2)
        .await;
    let p = berth_for(&o, Some((USER, PASSWORD))).await;
    let base = p.berth.url();

    // One request before the wait: a whole pull could outlive berth's five-second use of a
    // six-second token on a slow machine and fetch a second token early.
    let resp = get_manifest(&base, "team/app", &first.tag).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(issued_to_berth(&o.issuer), 1);
    // A token issued at the same time as berth's, to show the registry really rejects it later.
    let witness = fetch_token(
        &o.issuer,
        Some((ADMIN_USER, ADMIN_PASSWORD)),
        "repository:team/app:pull",
    )
    .await;
    let witness = witness["token"].as_str().unwrap().to_owned();
    assert_eq!(
        registry_status(&o.registry, "team/app", &witness).await,
        StatusCode::OK
    );

    // Expiry is wall-clock time at the registry: nothing to wait on but the clock.
    tokio::time::sleep(PAST_EXPIRY).await;
    assert_eq!(
        registry_status(&o.registry, "team/app", &witness).await,
        StatusCode::UNAUTHORIZED,
        "tokens from that moment have expired at the registry"
    );
    assert_pulls(&base, &second).await;
    assert!(
        issued_to_berth(&o.issuer) >= 2,
        "berth fetched a fresh token"
    );
}

#[tokio::test]
async fn retries_once_with_a_new_token_when_the_origin_rejects_a_cached_one() {
    // The issuer promises five minutes but its tokens die after two seconds: berth's cached
    // token is still "valid" to berth when the registry answers 401 invalid_token.
    let o = origin(
        team_issuer()
            .expires_in(SHORT_LIFETIME)
            .advertise_expires_in(Duration::from_secs(300)),
    )
    .await;
    let first = o
        .issuer
        .push_oci_image(&o.registry, "team/app", "v1", &[1_000], 1)
        .await;
    let second = o
        .issuer
        .push_oci_image(&o.registry, "team/app", "v2", &[1_000], 2)
        .await;
    let p = berth_for(&o, Some((USER, PASSWORD))).await;
    let base = p.berth.url();

    let resp = get_manifest(&base, "team/app", &first.tag).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(issued_to_berth(&o.issuer), 1);
    tokio::time::sleep(PAST_EXPIRY).await;
    let resp = get_manifest(&base, "team/app", "v2").await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
    assert_eq!(
        issued_to_berth(&o.issuer),
        2,
        "one new token after the origin rejected the cached one"
    );
    assert_pulls(&base, &second).await;
}

#[tokio::test]
async fn falls_back_to_an_oauth2_password_post_when_get_is_not_served() {
    for get_status in [StatusCode::METHOD_NOT_ALLOWED, StatusCode::NOT_FOUND] {
        let o = origin(team_issuer().get_answers(get_status)).await;
        let image = o
            .issuer
            .push_oci_image(&o.registry, "team/app", "v1", &[1_000, 20_000], 1)
            .await;
        let p = berth_for(&o, Some((USER, PASSWORD))).await;

        assert_pulls(&p.berth.url(), &image).await;
        let requests = o.issuer.requests();
        let refused_gets = o
            .issuer
            .count(|r| r.method == Method::GET && r.status == get_status);
        assert_eq!(refused_gets, 1, "GET {get_status}: {requests:?}");
        let posts: Vec<_> = requests
            .iter()
            .filter(|r| r.method == Method::POST)
            .collect();
        assert_eq!(posts.len(), 1, "GET {get_status}: {requests:?}");
        let post = posts[0];
        assert_eq!(post.auth, AuthKind::PasswordGrant);
        assert_eq!(post.principal, Principal::user(USER));
        assert_eq!(post.status, StatusCode::OK);
        assert_eq!(post.scopes, ["repository:team/app:pull"]);
        assert_eq!(post.service.as_deref(), Some(SERVICE));
        assert!(post.client_id.is_some(), "OAuth2 POSTs name a client_id");
    }
}

#[tokio::test]
async fn concurrent_cold_requests_share_one_token_fetch() {
    let o = origin(team_issuer()).await;
    let image = o
        .issuer
        .push_oci_image(
            &o.registry,
            "team/burst",
            "v1",
            &[2_000, 3_000, 4_000, 5_000],
            7,
        )
        .await;
    // A tap between berth and the origin shows when each blob GET has been challenged.
    let tap = Tap::start(o.registry.addr()).await;
    let p = berth_in_front_of(&tap.url(), Some((USER, PASSWORD))).await;
    let base = p.berth.url();
    // The issuer holds every token request until all five blob GETs were challenged by the
    // origin: none can reuse a token another finished fetching, so only coalescing keeps the
    // count at one.
    o.issuer.hold();
    let tasks: Vec<_> = image
        .blobs()
        .into_iter()
        .map(|(d, bytes)| {
            let (base, d, bytes) = (base.clone(), d.to_owned(), bytes.to_vec());
            tokio::spawn(async move {
                let resp = get_blob(&base, "team/burst", &d).await;
                assert_eq!(resp.status(), StatusCode::OK);
                assert_eq!(resp.bytes().await.unwrap(), bytes);
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let challenged =
        || tap.answered(|m, p, s| m == Method::GET && p.contains("/blobs/") && s == 401);
    while challenged() < 5 || o.issuer.arrived() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "five challenged GETs and a token request: {:?}",
            tap.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    o.issuer.release();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(o.issuer.arrived(), 1, "{:?}", o.issuer.requests());
    assert_eq!(issued_to_berth(&o.issuer), 1, "{:?}", o.issuer.requests());
}
