//! Chaining (docs/ARCHITECTURE.md, "Scale-out" → "Chaining"; issue 12): an edge berth whose
//! upstream is a regional berth whose upstream is the origin (site → region → origin), with
//! `passthrough` authorization on both hops. Clients log in once, at the edge, with their origin
//! credentials; the token they get is the origin's, and each hop asks the next one with it.
//!
//! The origin is a real `docker-registry` with `auth.token`, trusting the in-process test issuer
//! (`common::issuer`): alice may pull `private/*`, bob `team-b/*`, everyone (anonymous included)
//! `public/*`. Both berths run in process. Two regions: one whose upstream is its default (the
//! edge's upstream URL is the region's), and one that routes only by path prefix (the edge's
//! upstream URL carries the prefix: `http://region/origin`).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::airgap::skopeo;
use common::berth::Berth;
use common::content::{check_dir_copy, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use common::issuer::{Grantee, Principal, TokenIssuer};
use common::{Registry, TestImage};
use reqwest::{header, StatusCode};
use serde_json::Value;
use tempfile::TempDir;

const ALICE: &str = "alice";
const ALICE_PASSWORD: &str = "pw-alice-chain-3Kd8";
const BOB: &str = "bob";
const BOB_PASSWORD: &str = "pw-bob-chain-9Vx2";

const PRIVATE: &str = "private/app";
const TEAM: &str = "team-b/tool";
const PUBLIC: &str = "public/base";

/// The region's name for the origin (its path prefix, and the `service` of its challenges).
const REGION_UPSTREAM: &str = "origin";
/// The edge's name for the region.
const EDGE_UPSTREAM: &str = "region";
/// Longest any single request may take: a refusal is an answer, not a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// The topology.

/// How the region routes to the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    /// The origin is the region's default upstream; the edge's upstream URL is the region's.
    Default,
    /// The region has no default: repositories are `/v2/origin/<name>`; the edge's upstream URL
    /// is `http://<region>/origin`.
    ByPrefix,
    /// As [`Region::ByPrefix`], but the region's default is another upstream, a `public` one:
    /// its `/v2/` asks nobody to log in, so the edge learns the challenge per repository.
    PublicDefault,
}

/// Every shape of region.
const REGIONS: [Region; 3] = [Region::Default, Region::ByPrefix, Region::PublicDefault];

/// Issuer, origin registry, its content, the region and the edge.
struct Chain {
    issuer: TokenIssuer,
    _registry: Registry,
    private: TestImage,
    team: TestImage,
    public: TestImage,
    region: Berth,
    edge: Berth,
    mode: Region,
}

fn upstream_table(name: &str, url: &str, default: bool, auth: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nurl = \"{url}\"\ndefault = {default}\nauth = \"{auth}\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n"
    )
}

impl Chain {
    async fn start(mode: Region) -> Chain {
        let issuer = TokenIssuer::builder()
            .rs256()
            .user(ALICE, ALICE_PASSWORD)
            .user(BOB, BOB_PASSWORD)
            .allow(Grantee::user(ALICE), "private/*", &["pull"])
            .allow(Grantee::user(BOB), "team-b/*", &["pull"])
            .allow(Grantee::Anyone, "public/*", &["pull"])
            .start()
            .await;
        let registry = issuer.start_registry().await;
        let private = issuer
            .push_oci_image(&registry, PRIVATE, "v1", &[70_000, 3_000], 0xa11ce)
            .await;
        let team = issuer
            .push_oci_image(&registry, TEAM, "2.0", &[5_000], 0xb0b)
            .await;
        let public = issuer
            .push_oci_image(&registry, PUBLIC, "1.0", &[4_096, 9_000], 0x9b)
            .await;
        let mut tables = upstream_table(
            REGION_UPSTREAM,
            &registry.url(),
            mode == Region::Default,
            "passthrough",
        );
        if mode == Region::PublicDefault {
            // Another registry the region mirrors for everyone (here: the same origin, read
            // anonymously).
            tables.push_str(&upstream_table("hub", &registry.url(), true, "public"));
        }
        let region = Berth::with_upstreams(&tables).start().await;
        let edge_url = match mode {
            Region::Default => region.url(),
            Region::ByPrefix | Region::PublicDefault => {
                format!("{}/{REGION_UPSTREAM}", region.url())
            }
        };
        let edge = Berth::with_upstreams(&upstream_table(
            EDGE_UPSTREAM,
            &edge_url,
            true,
            "passthrough",
        ))
        .start()
        .await;
        Chain {
            issuer,
            _registry: registry,
            private,
            team,
            public,
            region,
            edge,
            mode,
        }
    }

    /// How a client of the region names the origin's repositories: `""` or `"origin/"`.
    fn region_prefix(&self) -> String {
        match self.mode {
            Region::Default => String::new(),
            Region::ByPrefix | Region::PublicDefault => format!("{REGION_UPSTREAM}/"),
        }
    }

    /// The repository path of `image` as a client of the region names it.
    fn region_repo(&self, image: &TestImage) -> String {
        format!("{}{}", self.region_prefix(), image.repo)
    }

    /// A client of the edge.
    fn at_edge(&self, who: Option<(&'static str, &'static str)>) -> Client {
        Client::new(self.edge.url(), String::new(), who)
    }

    /// A client of the region.
    fn at_region(&self, who: Option<(&'static str, &'static str)>) -> Client {
        Client::new(self.region.url(), self.region_prefix(), who)
    }
}

const ALICE_CREDS: Option<(&str, &str)> = Some((ALICE, ALICE_PASSWORD));
const BOB_CREDS: Option<(&str, &str)> = Some((BOB, BOB_PASSWORD));

// ---------------------------------------------------------------------------------------------
// A registry client doing the token dance (docker's and skopeo's GET flavour).

/// One answer as received.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn refused(&self) -> bool {
        matches!(self.status.as_u16(), 401 | 403)
    }

    /// The parameters of a `WWW-Authenticate: Bearer ...` challenge.
    fn bearer(&self) -> Option<HashMap<String, String>> {
        let v = self.headers.get(header::WWW_AUTHENTICATE)?.to_str().ok()?;
        let rest = v.strip_prefix("Bearer ")?;
        let mut out = HashMap::new();
        for part in rest.split("\",") {
            let (k, v) = part.split_once('=')?;
            out.insert(k.trim().to_owned(), v.trim_matches('"').to_owned());
        }
        Some(out)
    }
}

/// A client of one berth: a token per scope, fetched from the realm berth's 401 names (with
/// Basic credentials when it has some), as docker and skopeo do.
struct Client {
    http: reqwest::Client,
    base: String,
    /// Prepended to repository names (a region routing by prefix).
    prefix: String,
    credentials: Option<(&'static str, &'static str)>,
    tokens: HashMap<String, String>,
}

impl Client {
    fn new(
        base: String,
        prefix: String,
        credentials: Option<(&'static str, &'static str)>,
    ) -> Client {
        Client {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .no_proxy()
                .build()
                .expect("reqwest client"),
            base,
            prefix,
            credentials,
            tokens: HashMap::new(),
        }
    }

    async fn send(&self, path: &str, token: Option<&String>) -> Got {
        let mut b = self.http.get(format!("{}{path}", self.base));
        if path.contains("/manifests/") {
            for a in [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX] {
                b = b.header(header::ACCEPT, a);
            }
        }
        if let Some(t) = token {
            b = b.bearer_auth(t);
        }
        let resp = b.send().await.expect("berth answers");
        Got {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.expect("body").to_vec(),
        }
    }

    /// GET `/v2/<repo>/<what>` with the token held for the repository; on a 401, a token from
    /// the challenge's realm (which must be this berth's) and one retry.
    async fn get(&mut self, repo: &str, what: &str) -> Got {
        let repo = format!("{}{repo}", self.prefix);
        let path = format!("/v2/{repo}/{what}");
        let scope = format!("repository:{repo}:pull");
        let got = self.send(&path, self.tokens.get(&scope)).await;
        if got.status != StatusCode::UNAUTHORIZED {
            return got;
        }
        let challenge = got
            .bearer()
            .unwrap_or_else(|| panic!("401 for {path} without a Bearer challenge"));
        assert_eq!(
            challenge.get("realm").map(String::as_str),
            Some(format!("{}/token", self.base).as_str()),
            "a berth is its clients' token realm: {challenge:?}"
        );
        let mut query = vec![("scope", scope.clone())];
        if let Some(s) = challenge.get("service") {
            query.push(("service", s.clone()));
        }
        let mut b = self.http.get(&challenge["realm"]).query(&query);
        if let Some((u, p)) = self.credentials {
            b = b.basic_auth(u, Some(p));
        }
        let resp = b.send().await.expect("token endpoint answers");
        if resp.status() != StatusCode::OK {
            // Refused at login: the request's own 401 stands.
            return got;
        }
        let v: Value = resp.json().await.expect("token JSON");
        let token = v["token"].as_str().expect("token").to_owned();
        self.tokens.insert(scope.clone(), token);
        self.send(&path, self.tokens.get(&scope)).await
    }

    /// Every read of a pull of `image` (manifest by tag and digest, every blob).
    async fn pull_all(&mut self, image: &TestImage) -> Vec<(String, Got, Vec<u8>)> {
        let mut reads = vec![
            (
                format!("manifests/{}", image.tag),
                image.manifest_bytes.clone(),
            ),
            (
                format!("manifests/{}", image.manifest_digest),
                image.manifest_bytes.clone(),
            ),
        ];
        for (d, b) in image.blobs() {
            reads.push((format!("blobs/{d}"), b.to_vec()));
        }
        let mut out = Vec::new();
        for (what, want) in reads {
            let got = self.get(&image.repo, &what).await;
            out.push((what, got, want));
        }
        out
    }

    /// Pulls `image` and checks every byte.
    async fn pull(&mut self, image: &TestImage) {
        for (what, got, want) in self.pull_all(image).await {
            assert_eq!(got.status, StatusCode::OK, "{what}: {}", got.text());
            assert!(got.body == want, "{what}: wrong bytes");
        }
    }

    /// Every read of `image` is refused, and no answer holds a byte of it.
    async fn assert_refused(&mut self, image: &TestImage, who: &str) {
        for (what, got, _) in self.pull_all(image).await {
            assert!(
                got.refused(),
                "{who} at {}: {what} answered {} {}",
                self.base,
                got.status,
                got.text()
            );
            assert_no_bytes_of(image, &got.body, &format!("{who}: {what}"));
            if got.status == StatusCode::UNAUTHORIZED {
                let c = got.bearer().expect("a 401 carries a Bearer challenge");
                assert_eq!(
                    c.get("realm").map(String::as_str),
                    Some(format!("{}/token", self.base).as_str()),
                    "{who}: {what}: the challenge names this berth's realm"
                );
            }
        }
    }
}

/// Asserts `body` holds none of `image`'s manifest, config or (64-byte windows of) layers.
fn assert_no_bytes_of(image: &TestImage, body: &[u8], what: &str) {
    let mut needles = vec![image.manifest_bytes.as_slice(), &image.config_bytes];
    for (_, layer) in &image.layers {
        for at in [layer.len() / 4, layer.len() / 2, layer.len() * 3 / 4] {
            needles.push(&layer[at..(at + 64).min(layer.len())]);
        }
    }
    for n in needles {
        assert!(
            n.is_empty() || !body.windows(n.len()).any(|w| w == n),
            "{what}: the answer holds bytes of {}",
            image.repo
        );
    }
}

// ---------------------------------------------------------------------------------------------
// skopeo, a real client.

/// `skopeo copy docker://<host>/<repo>:<tag> dir:<dest>` with `creds` (none: anonymous).
async fn skopeo_copy(
    host: &str,
    repo: &str,
    image: &TestImage,
    creds: Option<(&str, &str)>,
    dest: &Path,
) -> Result<(), String> {
    let authfile = dest.with_extension("auth.json");
    std::fs::write(&authfile, r#"{"auths":{}}"#).unwrap();
    let mut args = vec![
        "copy".to_owned(),
        "--src-tls-verify=false".to_owned(),
        "--src-authfile".to_owned(),
        authfile.display().to_string(),
    ];
    if let Some((u, p)) = creds {
        args.push("--src-creds".into());
        args.push(format!("{u}:{p}"));
    }
    args.push(format!("docker://{host}/{repo}:{}", image.tag));
    args.push(format!("dir:{}", dest.display()));
    let run = skopeo(&args).await;
    if run.ok() {
        Ok(())
    } else {
        Err(run.transcript())
    }
}

/// How many token requests the issuer answered 200 for `principal` since the last `clear`.
fn issued(chain: &Chain, principal: &Principal) -> usize {
    chain.issuer.issued(principal, None)
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// alice logs in at the edge once, with her origin credentials, and skopeo copies her private
/// image through both hops; every byte checks out. The edge's login reached the origin's
/// token service as alice (through the region's `/token`).
#[tokio::test]
async fn alice_pulls_her_private_image_through_the_edge() {
    for mode in REGIONS {
        let chain = Chain::start(mode).await;
        let work = TempDir::new().unwrap();
        let dest = work.path().join("alice");
        skopeo_copy(
            &chain.edge.host(),
            PRIVATE,
            &chain.private,
            ALICE_CREDS,
            &dest,
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: alice copies {PRIVATE} through the edge:\n{e}"));
        check_dir_copy(&dest, &chain.private);
        assert!(
            issued(&chain, &Principal::user(ALICE)) > 0,
            "{mode:?}: alice's login reached the origin's token service"
        );
        // Both hops kept the bytes: a second pull at the edge is a hit there.
        let mut alice = chain.at_edge(ALICE_CREDS);
        alice.pull(&chain.private).await;
        let got = alice
            .get(PRIVATE, &format!("blobs/{}", chain.private.layers[0].0))
            .await;
        assert_eq!(
            got.headers
                .get("x-berth-cache")
                .map(|v| v.to_str().unwrap()),
            Some("hit"),
            "{mode:?}"
        );
        let mut at_region = chain.at_region(ALICE_CREDS);
        let got = at_region
            .get(PRIVATE, &format!("blobs/{}", chain.private.layers[0].0))
            .await;
        assert_eq!(got.status, StatusCode::OK, "{mode:?}: {}", got.text());
        assert_eq!(
            got.headers
                .get("x-berth-cache")
                .map(|v| v.to_str().unwrap()),
            Some("hit"),
            "{mode:?}: the region filled from the origin once"
        );
    }
}

/// The required test: anonymous and bob are refused at the edge while only the region holds
/// alice's bytes (she pulled there directly), and again after she warmed the edge too.
#[tokio::test]
async fn anonymous_and_bob_are_refused_at_the_edge_even_when_the_region_has_the_bytes() {
    for mode in REGIONS {
        let chain = Chain::start(mode).await;
        // alice warms the region only.
        chain.at_region(ALICE_CREDS).pull(&chain.private).await;
        for (who, creds) in [("anonymous", None), ("bob", BOB_CREDS)] {
            chain
                .at_edge(creds)
                .assert_refused(&chain.private, &format!("{mode:?}: {who}, region warm"))
                .await;
        }
        // alice warms the edge as well: its cache holds every byte now.
        chain.at_edge(ALICE_CREDS).pull(&chain.private).await;
        for (who, creds) in [("anonymous", None), ("bob", BOB_CREDS)] {
            chain
                .at_edge(creds)
                .assert_refused(&chain.private, &format!("{mode:?}: {who}, both warm"))
                .await;
        }
        // skopeo, as bob and anonymously: no copy.
        let work = TempDir::new().unwrap();
        for (who, creds) in [("anonymous", None), ("bob", BOB_CREDS)] {
            let dest = work.path().join(who);
            let copied = skopeo_copy(&chain.edge.host(), PRIVATE, &chain.private, creds, &dest)
                .await
                .is_ok();
            assert!(!copied, "{mode:?}: {who} must not copy {PRIVATE}");
            for entry in std::fs::read_dir(&dest).into_iter().flatten().flatten() {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                assert_no_bytes_of(&chain.private, &bytes, &format!("{who}'s failed copy"));
            }
        }
        // bob's own repository still works through the chain.
        chain.at_edge(BOB_CREDS).pull(&chain.team).await;
    }
}

/// Cached bytes at the edge are served to a principal only after the region (and through it
/// the origin) said yes to that principal: bob's refusal is the region's answer, not a cache
/// miss, and alice's later reads are hits without another fill.
#[tokio::test]
async fn edge_cached_content_is_re_authorized_per_principal() {
    let chain = Chain::start(Region::Default).await;
    let mut alice = chain.at_edge(ALICE_CREDS);
    alice.pull(&chain.private).await;
    let layer = format!("blobs/{}", chain.private.layers[0].0);
    let before = chain
        .edge
        .metric(r#"berth_auth_decisions_total{result="deny",source="origin"}"#)
        .await;
    let region_denials = chain
        .region
        .metric(r#"berth_auth_decisions_total{result="deny",source="origin"}"#)
        .await;
    // bob, with a valid origin token for his own repository, asks for alice's cached layer.
    let mut bob = chain.at_edge(BOB_CREDS);
    bob.pull(&chain.team).await;
    let got = bob.get(PRIVATE, &layer).await;
    assert!(got.refused(), "bob: {} {}", got.status, got.text());
    assert_no_bytes_of(&chain.private, &got.body, "bob's read of a cached layer");
    assert!(
        chain
            .edge
            .metric(r#"berth_auth_decisions_total{result="deny",source="origin"}"#)
            .await
            > before,
        "the edge asked its upstream (the region) about bob"
    );
    assert!(
        chain
            .region
            .metric(r#"berth_auth_decisions_total{result="deny",source="origin"}"#)
            .await
            > region_denials,
        "the region asked the origin about bob"
    );
    // A token bob got for his own repository opens nothing else either.
    let team_token = bob
        .tokens
        .get(&format!("repository:{TEAM}:pull"))
        .cloned()
        .expect("bob holds a token for his repository");
    let got = bob
        .send(&format!("/v2/{PRIVATE}/{layer}"), Some(&team_token))
        .await;
    assert!(got.refused(), "bob's team token: {}", got.status);
    // alice again: a hit, and still her bytes.
    let got = alice.get(PRIVATE, &layer).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.headers
            .get("x-berth-cache")
            .map(|v| v.to_str().unwrap()),
        Some("hit")
    );
    assert!(got.body == chain.private.layers[0].1);
}

/// A public repository pulls anonymously through both hops, with skopeo and with the raw API;
/// alice's credentials work for it too.
#[tokio::test]
async fn a_public_repository_pulls_anonymously_through_both_hops() {
    for mode in REGIONS {
        let chain = Chain::start(mode).await;
        let work = TempDir::new().unwrap();
        let dest = work.path().join("anonymous");
        skopeo_copy(&chain.edge.host(), PUBLIC, &chain.public, None, &dest)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: anonymous copies {PUBLIC}:\n{e}"));
        check_dir_copy(&dest, &chain.public);
        chain.at_edge(None).pull(&chain.public).await;
        chain.at_edge(ALICE_CREDS).pull(&chain.public).await;
        let dest = work.path().join("alice");
        skopeo_copy(
            &chain.edge.host(),
            PUBLIC,
            &chain.public,
            ALICE_CREDS,
            &dest,
        )
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: alice copies {PUBLIC}:\n{e}"));
        check_dir_copy(&dest, &chain.public);
        assert!(
            issued(&chain, &Principal::Anonymous) > 0,
            "{mode:?}: anonymous tokens came from the origin's token service"
        );
    }
}

/// A region without a default upstream, used directly: `/v2/` tells anonymous clients where to
/// log in (a challenge naming no service: `/token` routes by the scope's prefix) and admits a
/// client with credentials; alice's credentials work for her private and for a public
/// repository; bob is refused.
#[tokio::test]
async fn a_region_without_a_default_routes_logins_by_the_scope() {
    let chain = Chain::start(Region::ByPrefix).await;
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .unwrap();
    let base = http
        .get(format!("{}/v2/", chain.region.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(base.status(), StatusCode::UNAUTHORIZED);
    let challenge = base
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        challenge,
        format!("Bearer realm=\"{}/token\"", chain.region.url())
    );
    let with_creds = http
        .get(format!("{}/v2/", chain.region.url()))
        .basic_auth(ALICE, Some(ALICE_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(with_creds.status(), StatusCode::OK);

    let work = TempDir::new().unwrap();
    for (image, name) in [(&chain.private, "private"), (&chain.public, "public")] {
        let dest = work.path().join(name);
        skopeo_copy(
            &chain.region.host(),
            &chain.region_repo(image),
            image,
            ALICE_CREDS,
            &dest,
        )
        .await
        .unwrap_or_else(|e| panic!("alice copies {} from the region:\n{e}", image.repo));
        check_dir_copy(&dest, image);
    }
    chain.at_region(None).pull(&chain.public).await;
    chain
        .at_region(BOB_CREDS)
        .assert_refused(&chain.private, "bob at the region")
        .await;
    chain
        .at_region(None)
        .assert_refused(&chain.private, "anonymous at the region")
        .await;
}
