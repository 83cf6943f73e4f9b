//! Peers (docs/ARCHITECTURE.md, "Scale-out", "Peers"): replicas in front of one real
//! `docker-registry` (behind a counting [`Tap`]) agree on an owner per digest and fetch each blob
//! from the origin once for the whole cluster. Every replica runs in process on a runtime of its
//! own (`common::cluster`), so that one can be killed mid-transfer.
//!
//! What is shown: three clients through three replicas at once cost one origin GET per blob; a
//! replica with an empty disk serves what others filled without a blob request at the origin; a
//! killed or absent owner never fails a pull (the rest comes from the origin, counted); the peer
//! endpoint wants the cluster's secret; bytes from an owner are not evidence for another
//! repository, and a client the origin refuses is refused at its replica however warm the owner
//! is; a replica finds its peers through DNS.

mod common;

use std::future::Future;

use base64::Engine as _;
use std::time::Duration;

use common::berth::{Berth, BerthBuilder};
use common::cluster::{cluster_table, Replica, TestCluster};
use common::content::{sha256_digest, TestImage, OCI_MANIFEST};
use common::issuer::{Grantee, TokenIssuer};
use common::pace::Pace;
use common::{push_oci_image, Registry, Tap};
use reqwest::{Client, Method, StatusCode};

const REPO: &str = "peers/app";

/// Everything this test binary logged at DEBUG and above once [`capture_logs`] ran.
static LOGS: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
    std::sync::OnceLock::new();

/// Writes formatted events into [`LOGS`].
#[derive(Clone)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

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

/// Captures every replica's logs (they share the process) from now on.
fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
            .with_ansi(false)
            .with_writer(Capture(buffer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global tracing subscriber in this test binary");
        buffer
    });
}

fn captured_logs() -> String {
    let buffer = LOGS.get().expect("capture_logs() called first");
    String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned()
}
const MIB: usize = 1 << 20;

/// `fut`, or a panic naming `what` if it takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {secs}s"))
}

/// Polls `check` (a readiness condition) until it holds, for at most `secs`.
async fn until<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(secs, what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A replica's builder: in front of `origin`, blobs kept out of memory so that every read
/// goes through the disk, the peers and the origin.
fn replica_of(origin: &str) -> impl Fn() -> BerthBuilder + '_ {
    move || Berth::in_front_of(origin).memory_max_object("0")
}

async fn get(url: &str, auth: Option<(&str, &str)>) -> reqwest::Response {
    let mut req = Client::new().get(url).header("accept", OCI_MANIFEST);
    if let Some((user, password)) = auth {
        req = req.basic_auth(user, Some(password));
    }
    within(60, url, req.send()).await.expect("request")
}

/// Pulls `img` by tag through `berth` (as `auth`) and checks every byte.
async fn pull_as(berth: &Berth, img: &TestImage, auth: Option<(&str, &str)>) {
    let m = get(
        &format!("{}/v2/{}/manifests/{}", berth.url(), img.repo, img.tag),
        auth,
    )
    .await;
    assert_eq!(m.status(), StatusCode::OK, "manifest of {}", img.repo);
    assert_eq!(m.bytes().await.unwrap().as_ref(), img.manifest_bytes);
    for (digest, _) in img.blobs() {
        let r = get(
            &format!("{}/v2/{}/blobs/{digest}", berth.url(), img.repo),
            auth,
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "{digest}");
        let body = within(60, digest, r.bytes()).await.expect("complete body");
        assert_eq!(sha256_digest(&body), digest, "served bytes verify");
    }
}

async fn pull(berth: &Berth, img: &TestImage) {
    pull_as(berth, img, None).await
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn blob_requests(tap: &Tap, method: Option<Method>) -> usize {
    tap.count(|m, p| method.as_ref().is_none_or(|x| x == m) && p.contains("/blobs/"))
}

/// Pushes images of `sizes` (seeds 1, 2, ...) into `repo` until `wanted` holds for one; returns
/// it. Ownership depends on digests only, so a test picks content whose owners suit it.
async fn image_where(
    registry: &str,
    repo: &str,
    sizes: &[usize],
    wanted: impl Fn(&TestImage) -> bool,
) -> TestImage {
    for seed in 1..=64 {
        let img = push_oci_image(registry, repo, &format!("v{seed}"), sizes, seed).await;
        if wanted(&img) {
            return img;
        }
    }
    panic!("no image among 64 seeds has the wanted owners");
}

/// One origin behind a tap, and `n` replicas in front of the tap.
async fn setup(n: usize) -> (Registry, Tap, TestCluster) {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let cluster = TestCluster::start(n, replica_of(&tap.url()), &[]).await;
    (registry, tap, cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_clients_through_three_replicas_at_once_cost_one_origin_get_per_blob() {
    let (registry, tap, cluster) = setup(3).await;
    // Owners spread: no replica owns every blob.
    let img = image_where(&registry.url(), REPO, &[3 * MIB, 2 * MIB, MIB], |img| {
        let owners: std::collections::BTreeSet<usize> =
            img.blobs().iter().map(|(d, _)| cluster.owner(d)).collect();
        owners.len() >= 2
    })
    .await;
    for r in &cluster.replicas {
        assert_eq!(r.metric("berth_peers").await, 3.0);
    }
    let pulls = cluster.replicas.iter().map(|r| pull(r, &img));
    within(120, "three pulls", futures_util::future::join_all(pulls)).await;
    let blobs = img.blobs().len();
    assert_eq!(
        blob_requests(&tap, Some(Method::GET)),
        blobs,
        "one origin GET per blob for the cluster: {:?}",
        tap.requests()
    );
    let mut forwarded = 0.0;
    let mut served = 0.0;
    for r in &cluster.replicas {
        forwarded += r.metric("berth_peer_requests_total{result=\"ok\"}").await;
        served += r.metric("berth_peer_served_total{result=\"ok\"}").await;
        assert_eq!(
            r.metric("berth_peer_fallbacks_total{to=\"origin\"}").await,
            0.0
        );
    }
    // Each non-owner asked the owner once per blob.
    assert_eq!(forwarded, (2 * blobs) as f64);
    assert_eq!(served, forwarded);
    // Every replica holds every blob now (once its fills committed).
    for r in &cluster.replicas {
        within(60, "fills settle", r.app().cache().fills().all_settled()).await;
        for (d, _) in img.blobs() {
            assert!(r.holds(d).await, "{} holds {d}", r.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_with_an_empty_disk_serves_an_image_others_filled_without_origin_blob_requests() {
    let (registry, tap, cluster) = setup(3).await;
    // Replica 2 owns none of the image's blobs: its disk stays empty while 0 pulls.
    let img = image_where(&registry.url(), REPO, &[4 * MIB, 64 * 1024], |img| {
        img.blobs().iter().all(|(d, _)| cluster.owner(d) != 2)
    })
    .await;
    let (a, c) = (&cluster.replicas[0], &cluster.replicas[2]);
    pull(a, &img).await;
    assert_eq!(c.objects_on_disk(), 0, "the third replica's disk is empty");
    tap.clear();
    pull(c, &img).await;
    assert_eq!(
        blob_requests(&tap, None),
        0,
        "no blob request of any method reached the origin: {:?}",
        tap.requests()
    );
    // Tags are each replica's own business: one manifest GET.
    assert_eq!(tap.requests().len(), 1, "{:?}", tap.requests());
    within(60, "fills settle", c.app().cache().fills().all_settled()).await;
    for (d, _) in img.blobs() {
        assert!(c.holds(d).await, "kept {d}");
    }
    let spared = c
        .metric("berth_origin_bytes_spared_total{source=\"peer\"}")
        .await;
    assert!(spared >= (4 * MIB) as f64, "spared {spared}");
    // Its disk serves the next pull: no peer asked again.
    let asked = c.metric("berth_peer_requests_total{result=\"ok\"}").await;
    pull(c, &img).await;
    assert_eq!(
        c.metric("berth_peer_requests_total{result=\"ok\"}").await,
        asked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_owner_mid_pull_leaves_every_client_with_verified_bytes() {
    let registry = Registry::start().await;
    // The origin holds every blob body after 1 MiB until released: the kill lands mid-blob.
    let pace = Pace::start(registry.addr(), MIB as u64).await;
    let tap = Tap::start(pace.addr()).await;
    let mut cluster = TestCluster::start(3, replica_of(&tap.url()), &[]).await;
    let img = push_oci_image(&registry.url(), REPO, "v1", &[8 * MIB], 5).await;
    let (layer, _) = img.layers[0].clone();
    let owner = cluster.owner(&layer);
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let pulls: Vec<_> = others
        .iter()
        .map(|&i| {
            let url = cluster.replicas[i].url();
            let img = img.clone();
            tokio::spawn(async move {
                let m = get(&format!("{url}/v2/{}/manifests/v1", img.repo), None).await;
                assert_eq!(m.status(), StatusCode::OK);
                for (digest, _) in img.blobs() {
                    let r = get(&format!("{url}/v2/{}/blobs/{digest}", img.repo), None).await;
                    assert_eq!(r.status(), StatusCode::OK);
                    let body = within(60, digest, r.bytes()).await.expect("complete body");
                    assert_eq!(sha256_digest(&body), digest, "served bytes verify");
                }
            })
        })
        .collect();
    // Both replicas are streaming the layer from the owner, whose origin body is held.
    within(60, "owner's origin body held", pace.wait_held(1)).await;
    for &i in &others {
        let r = &cluster.replicas[i];
        until(
            60,
            "replica streams the layer from the owner",
            || async move {
                r.metric("berth_origin_bytes_spared_total{source=\"peer\"}")
                    .await
                    >= (MIB / 2) as f64
            },
        )
        .await;
    }
    cluster.replicas[owner].kill();
    pace.release();
    for p in pulls {
        within(120, "pull after the kill", p)
            .await
            .expect("pull completes");
    }
    for &i in &others {
        let r = &cluster.replicas[i];
        assert!(
            r.metric("berth_peer_fallbacks_total{to=\"origin\"}").await >= 1.0,
            "fallback counted"
        );
        assert!(
            r.metric("berth_origin_bytes_spared_total{source=\"peer\"}")
                .await
                > 0.0
        );
        // The replica kept the verified blob.
        until(60, "fill committed", || r.holds(&layer)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_down_from_the_start_costs_a_counted_fallback_not_a_pull() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    // A peer in the list where nothing listens, for the whole test.
    let (_held, absent) = common::refusing_addr();
    let absent = absent.to_string();
    let cluster =
        TestCluster::start(2, replica_of(&tap.url()), std::slice::from_ref(&absent)).await;
    let members = cluster.replicas[0].cluster().peers().members().to_vec();
    assert_eq!(members.len(), 3);
    let img = image_where(&registry.url(), REPO, &[2 * MIB], |img| {
        img.blobs().iter().any(|(d, _)| {
            let d: berth::oci::Digest = d.parse().unwrap();
            berth::cluster::owner_of(&members, &d) == Some(absent.as_str())
        })
    })
    .await;
    let a = &cluster.replicas[0];
    within(60, "pull", pull(a, &img)).await;
    assert!(
        a.metric("berth_peer_requests_total{result=\"error\"}")
            .await
            >= 1.0
    );
    assert!(a.metric("berth_peer_fallbacks_total{to=\"origin\"}").await >= 1.0);
    assert_eq!(blob_requests(&tap, Some(Method::GET)), img.blobs().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_peer_endpoint_wants_the_cluster_secret_and_is_not_on_the_client_listener() {
    let (registry, _tap, cluster) = setup(2).await;
    let img = push_oci_image(&registry.url(), REPO, "v1", &[256 * 1024], 9).await;
    let (layer, bytes) = &img.layers[0];
    let r = &cluster.replicas[0];
    let peer = r.peer_addr.expect("peer listener");
    let path = format!("/_berth/peer/v1/blobs/{layer}?upstream=origin&repo={REPO}");
    let client = Client::new();
    let url = format!("http://{peer}{path}");
    for (what, auth) in [
        ("no secret", None),
        ("a wrong secret", Some("Bearer not-the-secret".to_owned())),
        (
            "the secret with a suffix",
            Some(format!("Bearer {}x", cluster.secret())),
        ),
        ("Basic", Some(format!("Basic {}", cluster.secret()))),
    ] {
        let mut req = client.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert!(!contains(&resp.bytes().await.unwrap(), &bytes[..64]));
    }
    assert_eq!(
        r.metric("berth_peer_served_total{result=\"denied\"}").await,
        4.0
    );
    // With the secret: the blob, with the origin's evidence relayed and Range honoured.
    let resp = client
        .get(&url)
        .bearer_auth(cluster.secret())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("berth-member").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(sha256_digest(&resp.bytes().await.unwrap()), *layer);
    let part = client
        .get(&url)
        .bearer_auth(cluster.secret())
        .header("range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.bytes().await.unwrap().as_ref(), &bytes[1000..]);
    // The client listener does not answer the peer route, secret or not.
    let resp = client
        .get(format!("{}{path}", r.url()))
        .bearer_auth(cluster.secret())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_from_the_owner_are_not_evidence_for_another_repository() {
    let (registry, tap, cluster) = setup(2).await;
    let other = push_oci_image(&registry.url(), "peers/other", "v1", &[4096], 99).await;
    // The layer is owned by replica 1; replica 0 is asked for it under the other repository.
    let img = image_where(&registry.url(), REPO, &[MIB], |img| {
        cluster.owner(&img.layers[0].0) == 1
    })
    .await;
    let (a, b) = (&cluster.replicas[0], &cluster.replicas[1]);
    pull(b, &img).await;
    let (layer, _) = &img.layers[0];
    let r = get(
        &format!("{}/v2/{}/blobs/{layer}", a.url(), other.repo),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "not in that repository");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "BLOB_UNKNOWN");
    // The origin was asked about that repository, with a HEAD, by the replica the client used.
    assert_eq!(
        tap.count(|m, p| m == Method::HEAD && p == format!("/v2/{}/blobs/{layer}", other.repo)),
        1
    );
    // Under its own repository the same replica serves it from its disk now, no origin GET.
    let gets = blob_requests(&tap, Some(Method::GET));
    let r = get(&format!("{}/v2/{REPO}/blobs/{layer}", a.url()), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), *layer);
    assert_eq!(blob_requests(&tap, Some(Method::GET)), gets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_the_origin_refuses_is_refused_at_its_replica_however_warm_the_owner() {
    const ALICE: (&str, &str) = ("alice", "pw-alice-Peer-7c1");
    const BOB: (&str, &str) = ("bob", "pw-bob-Peer-2f9");
    capture_logs();
    let issuer = TokenIssuer::builder()
        .rs256()
        .user(ALICE.0, ALICE.1)
        .user(BOB.0, BOB.1)
        .allow(Grantee::user(ALICE.0), "private/*", &["pull"])
        .allow(Grantee::user(BOB.0), "team-b/*", &["pull"])
        .start()
        .await;
    let registry = issuer.start_registry().await;
    let team = issuer
        .push_oci_image(&registry, "team-b/tool", "v1", &[4096], 3)
        .await;
    let tap = Tap::start(registry.addr()).await;
    let upstream = format!(
        "[[upstream]]\nname = \"origin\"\nurl = \"{}\"\ndefault = true\nauth = \"passthrough\"\n\
         connect_timeout = \"2s\"\nfirst_byte_timeout = \"10s\"\nidle_timeout = \"10s\"\n",
        tap.url()
    );
    let cluster = TestCluster::start(
        2,
        || Berth::with_upstreams(&upstream).memory_max_object("0"),
        &[],
    )
    .await;
    // The private layer is owned by replica 1; bob talks to replica 0.
    let mut seed = 10;
    let private = loop {
        let img = issuer
            .push_oci_image(&registry, "private/app", &format!("v{seed}"), &[MIB], seed)
            .await;
        if cluster.owner(&img.layers[0].0) == 1 {
            break img;
        }
        seed += 1;
        assert!(seed < 74, "no private image owned by replica 1");
    };
    let (a, owner) = (&cluster.replicas[0], &cluster.replicas[1]);
    let (layer, secret_bytes) = &private.layers[0];
    // alice pulls through replica 0: the owner fills from the origin with alice's credential
    // (berth has none of its own) and keeps the layer.
    pull_as(a, &private, Some(ALICE)).await;
    within(
        60,
        "owner's fills settle",
        owner.app().cache().fills().all_settled(),
    )
    .await;
    assert!(owner.holds(layer).await, "the owner keeps the layer");
    assert!(owner.metric("berth_peer_served_total{result=\"ok\"}").await >= 1.0);
    let served = owner.metric("berth_peer_served_total{result=\"ok\"}").await;
    let leaks = |body: &[u8]| contains(body, &secret_bytes[4096..4160]);
    for (what, url, auth) in [
        (
            "bob, private repository",
            format!("{}/v2/private/app/blobs/{layer}", a.url()),
            Some(BOB),
        ),
        (
            "bob, his own repository",
            format!("{}/v2/{}/blobs/{layer}", a.url(), team.repo),
            Some(BOB),
        ),
        (
            "anonymous, private repository",
            format!("{}/v2/private/app/blobs/{layer}", a.url()),
            None,
        ),
        (
            "bob, private repository, at the owner",
            format!("{}/v2/private/app/blobs/{layer}", owner.url()),
            Some(BOB),
        ),
    ] {
        let r = get(&url, auth).await;
        let status = r.status();
        let body = r.bytes().await.unwrap_or_default();
        assert!(
            matches!(
                status,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
            ),
            "{what}: {status}"
        );
        assert!(!leaks(&body), "{what}: private bytes served");
    }
    // bob at the peer endpoint with his own credentials: no secret, no bytes.
    let r = Client::new()
        .get(format!(
            "http://{}/_berth/peer/v1/blobs/{layer}?upstream=origin&repo=private/app",
            owner.peer_addr.unwrap()
        ))
        .basic_auth(BOB.0, Some(BOB.1))
        .header("berth-upstream-auth", "Basic Ym9iOnB3LWJvYi1QZWVyLTJmOQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(!leaks(&r.bytes().await.unwrap()));
    // The decisions were made where the client asked: the owner served nothing more.
    assert_eq!(
        owner.metric("berth_peer_served_total{result=\"ok\"}").await,
        served
    );
    // bob's own image through either replica works.
    pull_as(a, &team, Some(BOB)).await;
    // Neither the client credentials relayed to the owner nor the cluster's secret reach a log.
    let logs = captured_logs();
    assert!(logs.contains("peer request"), "peer requests were logged");
    for secret in [
        ALICE.1.to_owned(),
        BOB.1.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ALICE.0, ALICE.1)),
        cluster.secret().to_owned(),
    ] {
        assert!(!logs.contains(&secret), "a secret was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_finds_its_peers_through_dns() {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    // Replica X lists both statically; replica Y knows only `localhost:<X's port>`, which the
    // hosts file resolves to 127.0.0.1 (X's peer listener).
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "dns-secret\n").unwrap();
    let mut attempts = 0;
    let (x, y) = loop {
        attempts += 1;
        assert!(attempts <= 4, "replicas did not start");
        let (px, py) = (common::free_port(), common::free_port());
        let (nx, ny) = (format!("127.0.0.1:{px}"), format!("127.0.0.1:{py}"));
        let peers = vec![nx.clone(), ny.clone()];
        let x = Replica::start(
            replica_of(&tap.url())().extra(&cluster_table(&nx, &peers, None, &secret)),
            nx.clone(),
        )
        .await;
        let dns = format!("localhost:{px}");
        let y = Replica::start(
            replica_of(&tap.url())().extra(&cluster_table(&ny, &[], Some(&dns), &secret)),
            ny.clone(),
        )
        .await;
        if let (Ok(x), Ok(y)) = (x, y) {
            break (x, y);
        }
    };
    assert_eq!(y.metric("berth_peers").await, 2.0);
    assert_eq!(
        y.cluster().peers().members(),
        x.cluster().peers().members(),
        "both see the same set"
    );
    // A blob owned by X, pulled through Y, comes from X.
    let members = x.cluster().peers().members().to_vec();
    let img = image_where(&registry.url(), REPO, &[MIB], |img| {
        img.blobs().iter().all(|(d, _)| {
            let d: berth::oci::Digest = d.parse().unwrap();
            berth::cluster::owner_of(&members, &d) == Some(x.name.as_str())
        })
    })
    .await;
    pull(&y, &img).await;
    pull(&x, &img).await;
    assert_eq!(blob_requests(&tap, Some(Method::GET)), img.blobs().len());
    assert_eq!(
        y.metric("berth_peer_requests_total{result=\"ok\"}").await,
        img.blobs().len() as f64
    );
}
