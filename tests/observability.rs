//! Observability end to end: a realistic pull workload through berth against a real origin
//! (`docker-registry`), then berth's `/metrics` linted by `promtool check metrics`, its counters
//! compared with what the workload did, the alert rules of deploy/prometheus checked and
//! unit-tested by `promtool`, and every metric the Grafana dashboard and the alert rules query
//! looked up in the exposition.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use common::berth::Berth;
use common::content::{OCI_INDEX, OCI_MANIFEST};
use common::{push_oci_image, require_binary, Registry, Tap, TestImage};
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;

/// Layer sizes: one below the memory tier's largest object (1 MiB in the test config), so it
/// is served from memory once cached, and two above it, served from disk.
const LAYERS: [usize; 3] = [64 * 1024, 1_500_000, 3_000_000];

/// What the Docker Hub stand-in reports in `ratelimit-remaining` (Docker Hub's format).
const RATELIMIT_REMAINING: &str = "187;w=21600";

/// The Grafana dashboard, relative to the crate root.
const DASHBOARD: &str = "deploy/grafana/berth-dashboard.json";
/// The Prometheus alert rules, relative to the crate root.
const ALERTS: &str = "deploy/prometheus/alerts.yml";
/// The alert rules' unit tests, relative to the crate root.
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";

// === /metrics parsing ===

/// One sample line of the text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape of `/metrics`, parsed.
#[derive(Debug, Clone)]
struct Scrape {
    text: String,
    samples: Vec<Sample>,
    /// Family name -> type, from the `# TYPE` lines.
    families: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        let mut families = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    families.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            samples.push(parse_sample(line));
        }
        Scrape {
            text,
            samples,
            families,
        }
    }

    /// Sum of the samples of `name` whose labels include every `(key, value)` of `filter`.
    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                filter
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// The exposition lines of the given families (samples and their HELP/TYPE), for the log.
    fn excerpt(&self, families: &[&str]) -> String {
        self.text
            .lines()
            .filter(|line| {
                let name = line
                    .trim_start_matches("# HELP ")
                    .trim_start_matches("# TYPE ");
                families.iter().any(|f| {
                    name.strip_prefix(f)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Parses `name{k="v",...} value` (the exposition berth writes has no timestamps).
fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("sample line without value: {line}"));
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    let mut value = String::new();
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                    while let Some((_, c)) = chars.next() {
                        match c {
                            '\\' => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(other) => value.push(other),
                                None => panic!("dangling escape: {line}"),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        }
        let end = end.unwrap_or_else(|| panic!("unterminated labels: {line}"));
        rest = &inner[end..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sample line without value: {line}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("bad sample value in {line}: {e}")),
    };
    Sample {
        name,
        labels,
        value,
    }
}

// === a Docker Hub stand-in ===

/// Forwards every request to an origin and adds Docker Hub's rate-limit headers to manifest
/// answers, as registry-1.docker.io does, so that berth's rate-limit gauge has a value.
struct HubHeaders {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl HubHeaders {
    async fn start(origin: String) -> HubHeaders {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind hub stand-in");
        let addr = listener.local_addr().expect("hub stand-in address");
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("reqwest client");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (client, origin) = (client.clone(), origin.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| forward(client.clone(), origin.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HubHeaders { addr, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for HubHeaders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: Client,
    origin: String,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = client
        .request(parts.method.clone(), format!("{origin}{path}"))
        .body(body);
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST {
            out = out.header(name, value);
        }
    }
    let resp = out.send().await?;
    let mut answer = hyper::Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if name != hyper::header::TRANSFER_ENCODING && name != hyper::header::CONNECTION {
            answer = answer.header(name, value);
        }
    }
    if parts.uri.path().contains("/manifests/") {
        answer = answer
            .header("ratelimit-limit", "200;w=21600")
            .header("ratelimit-remaining", RATELIMIT_REMAINING);
    }
    Ok(answer.body(Full::new(resp.bytes().await?))?)
}

// === the workload ===

/// berth in front of a Docker Hub stand-in in front of a tap in front of a real registry,
/// after a realistic workload, with scrapes of `/metrics` taken between its phases.
struct Workload {
    _registry: Registry,
    _tap: Tap,
    _hub: HubHeaders,
    berth: Berth,
    image: TestImage,
    /// Before any client request.
    before: Scrape,
    /// After the cold pull's manifests, before its blobs.
    cold_manifests: Scrape,
    /// After the cold pull.
    cold: Scrape,
    /// After the warm pull.
    warm: Scrape,
    /// After the extra requests (range, HEADs, tags list, 404, bad request).
    end: Scrape,
    /// Origin requests (tap) during the cold pull's blob phase, and the blob GETs among them.
    cold_blob_phase_origin: (usize, usize),
    /// Origin requests (tap) during the warm pull.
    warm_origin: usize,
}

impl Workload {
    /// Every blob of the image (config and layers).
    fn blob_count(&self) -> usize {
        self.image.blobs().len()
    }

    /// Bytes of every blob of the image.
    fn blob_bytes(&self) -> usize {
        self.image.blobs().iter().map(|(_, b)| b.len()).sum()
    }

    /// Blobs above the memory tier's object limit (served from disk when cached).
    fn disk_only_blobs(&self) -> usize {
        self.image
            .blobs()
            .iter()
            .filter(|(_, b)| b.len() > 1024 * 1024)
            .count()
    }
}

/// Growth of a counter between two scrapes.
fn delta(from: &Scrape, to: &Scrape, name: &str, filter: &[(&str, &str)]) -> f64 {
    to.sum(name, filter) - from.sum(name, filter)
}

/// Fetches and parses `/metrics`.
async fn scrape(berth: &Berth) -> Scrape {
    Scrape::parse(berth.metrics().await)
}

/// Fetches `url`, checks the status, and returns the body.
async fn fetch(client: &Client, method: Method, url: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let (status, body) = fetch_status(client, method.clone(), url, headers).await;
    assert!(status.is_success(), "{method} {url}: {status}");
    body
}

/// Fetches `url` and returns the status and body, whatever the status.
async fn fetch_status(
    client: &Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Vec<u8>) {
    let mut req = client.request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request to berth");
    let status = resp.status();
    let body = resp.bytes().await.expect("response body").to_vec();
    (status, body)
}

/// The first half of a pull as a container runtime does it: `/v2/`, the manifest by tag, then
/// by digest, each checked byte for byte.
async fn pull_manifests(client: &Client, base: &str, image: &TestImage) {
    fetch(client, Method::GET, &format!("{base}/v2/"), &[]).await;
    let accept = [("accept", OCI_MANIFEST), ("accept", OCI_INDEX)];
    for reference in [&image.tag, &image.manifest_digest] {
        let url = format!("{base}/v2/{}/manifests/{reference}", image.repo);
        let body = fetch(client, Method::GET, &url, &accept).await;
        assert_eq!(body, image.manifest_bytes, "{url}");
    }
}

/// The second half of a pull: every blob (config and layers), each checked byte for byte.
async fn pull_blobs(client: &Client, base: &str, image: &TestImage) {
    for (digest, bytes) in image.blobs() {
        let url = format!("{base}/v2/{}/blobs/{digest}", image.repo);
        let body = fetch(client, Method::GET, &url, &[]).await;
        assert!(body == bytes, "{url}: body differs from the pushed blob");
    }
}

/// Runs the workload: a cold pull, a warm pull, then a range, HEADs, a tag listing, a 404 and
/// a bad request.
async fn workload() -> Workload {
    let registry = Registry::start().await;
    let tap = Tap::start(registry.addr()).await;
    let hub = HubHeaders::start(tap.url()).await;
    // The workload pulls manifests first and blobs after, and checks each phase's counters:
    // prefetch would move the blob fetches into the manifest phase (its own counters are
    // checked in tests/prefetch.rs).
    let berth = Berth::in_front_of(&hub.url())
        .extra("[prefetch]\nenabled = false\n")
        .start()
        .await;
    let image = push_oci_image(&registry.url(), "team/app", "v1", &LAYERS, 7).await;
    let client = Client::new();
    let base = berth.url();
    let before = scrape(&berth).await;

    // Cold pull: everything comes from the origin.
    tap.clear();
    pull_manifests(&client, &base, &image).await;
    let cold_manifests = scrape(&berth).await;
    tap.clear();
    pull_blobs(&client, &base, &image).await;
    let cold_blob_phase_origin = (
        tap.requests().len(),
        tap.count(|m, p| m == Method::GET && p.contains("/blobs/")),
    );
    let cold = scrape(&berth).await;

    // Warm pull: everything comes from the cache.
    tap.clear();
    pull_manifests(&client, &base, &image).await;
    pull_blobs(&client, &base, &image).await;
    let warm_origin = tap.requests().len();
    let warm = scrape(&berth).await;

    // What else clients do: a range, HEADs, a tag listing, a 404 and a bad request.
    let (largest, largest_bytes) = image
        .blobs()
        .into_iter()
        .max_by_key(|(_, b)| b.len())
        .expect("image has blobs");
    let blob_url = format!("{base}/v2/{}/blobs/{largest}", image.repo);
    let (status, part) = fetch_status(
        &client,
        Method::GET,
        &blob_url,
        &[("range", "bytes=1000-1999")],
    )
    .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT, "range GET {blob_url}");
    assert_eq!(part, &largest_bytes[1000..2000]);
    let (status, body) = fetch_status(&client, Method::HEAD, &blob_url, &[]).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 0), "HEAD {blob_url}");
    let manifest_url = format!("{base}/v2/{}/manifests/{}", image.repo, image.tag);
    fetch(
        &client,
        Method::HEAD,
        &manifest_url,
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    let tags = fetch(
        &client,
        Method::GET,
        &format!("{base}/v2/{}/tags/list", image.repo),
        &[],
    )
    .await;
    let tags: Value = serde_json::from_slice(&tags).expect("tags/list is JSON");
    assert_eq!(tags["tags"], serde_json::json!(["v1"]), "{tags}");
    let (status, _) = fetch_status(
        &client,
        Method::GET,
        &format!("{base}/v2/{}/manifests/no-such-tag", image.repo),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "unknown tag");
    let (status, _) = fetch_status(
        &client,
        Method::GET,
        &format!("{base}/v2/{}/blobs/sha256:not-a-digest", image.repo),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "malformed digest");
    let end = scrape(&berth).await;

    Workload {
        _registry: registry,
        _tap: tap,
        _hub: hub,
        berth,
        image,
        before,
        cold_manifests,
        cold,
        warm,
        end,
        cold_blob_phase_origin,
        warm_origin,
    }
}

// === helpers for the deploy files ===

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `promtool` with `args` from the crate root, feeding `stdin` if given.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let binary = require_binary("promtool");
    let mut child = Command::new(&binary)
        .args(args)
        .current_dir(crate_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("promtool stdin");
        pipe.write_all(text.as_bytes())
            .expect("write promtool stdin");
    }
    child.wait_with_output().expect("promtool output")
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `berth_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("berth_") {
        let preceded_by_ident = rest[..at].chars().next_back().is_some_and(is_ident);
        let tail = &rest[at..];
        let len = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !preceded_by_ident {
            names.insert(tail[..len].to_owned());
        }
        rest = &tail[len..];
    }
    names
}

/// The `expr` of every panel target of the dashboard and the query of every variable.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) if s.contains("berth_") => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// The `expr:` values of a rules file (plain scalars and `|` / `>` blocks).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        i += 1;
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with(['|', '>']) {
            out.push(value.trim_matches(['"', '\'']).to_owned());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = Vec::new();
        while i < lines.len() {
            let l = lines[i];
            let more_indented = l.len() - l.trim_start().len() > indent;
            if !l.trim().is_empty() && !more_indented {
                break;
            }
            block.push(l.trim());
            i += 1;
        }
        out.push(block.join("\n"));
    }
    out
}

/// The names in `used` that are neither a family of `scrape` nor a histogram's
/// `_bucket` / `_sum` / `_count` series.
fn missing_families(used: &BTreeSet<String>, scrape: &Scrape) -> Vec<String> {
    used.iter()
        .filter(|name| {
            if scrape.families.contains_key(name.as_str()) {
                return false;
            }
            let histogram_part = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix).is_some_and(|base| {
                    scrape.families.get(base).map(String::as_str) == Some("histogram")
                })
            });
            !histogram_part
        })
        .cloned()
        .collect()
}

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(crate_root().join(DASHBOARD)).expect("read dashboard");
    serde_json::from_str(&text).expect("dashboard is JSON")
}

/// Panels, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels array") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

// === tests ===

#[tokio::test]
async fn metrics_after_a_workload_pass_promtool_check_metrics() {
    let w = workload().await;
    let out = promtool(&["check", "metrics"], Some(&w.end.text));
    let report = output_text(&out);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics ({}) reported:\n{report}\n--- /metrics ---\n{}",
        out.status,
        w.end.text
    );
}

#[tokio::test]
async fn counters_say_what_the_workload_did() {
    let w = workload().await;
    let blobs = w.blob_count() as f64;
    let blob_bytes = w.blob_bytes() as f64;
    let lookups = "berth_cache_lookups_total";
    let served = "berth_served_bytes_total";
    let upstream = "berth_upstream_requests_total";

    // Nothing counted before the first request, but the zero series are there.
    assert_eq!(w.before.sum(served, &[]), 0.0);
    for source in ["memory", "disk", "upstream"] {
        assert!(
            w.before
                .samples
                .iter()
                .any(|s| s.name == served
                    && s.labels.get("source").map(String::as_str) == Some(source)),
            "{served}{{source=\"{source}\"}} exported from the start"
        );
    }
    assert_eq!(
        w.before.sum(
            "berth_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Cold pull, blob phase: every blob missed and was fetched once from the origin, and the
    // origin saw exactly those GETs.
    let (origin_requests, origin_blob_gets) = w.cold_blob_phase_origin;
    assert_eq!(origin_blob_gets, w.blob_count(), "one origin GET per blob");
    assert_eq!(origin_requests, w.blob_count(), "nothing but the blob GETs");
    let cold_blob_phase =
        |name, filter: &[(&str, &str)]| delta(&w.cold_manifests, &w.cold, name, filter);
    assert_eq!(
        cold_blob_phase(upstream, &[("method", "GET")]),
        blobs,
        "berth_upstream_requests_total{{method=\"GET\"}} grew by the number of distinct blobs"
    );
    assert_eq!(
        cold_blob_phase(upstream, &[("method", "GET"), ("status", "200")]),
        blobs
    );
    assert_eq!(
        cold_blob_phase(
            lookups,
            &[("kind", "blob"), ("tier", "disk"), ("result", "miss")]
        ),
        blobs
    );
    assert_eq!(
        cold_blob_phase(lookups, &[("kind", "blob"), ("result", "hit")]),
        0.0
    );
    let cold_from_upstream = delta(&w.before, &w.cold, served, &[("source", "upstream")]);
    assert!(
        cold_from_upstream >= blob_bytes,
        "served from upstream in the cold pull: {cold_from_upstream} < {blob_bytes} blob bytes"
    );
    assert!(
        w.cold
            .sum("berth_upstream_bytes_total", &[("upstream", "origin")])
            >= blob_bytes,
        "berth_upstream_bytes_total counts the blob bodies"
    );

    // Warm pull: every blob hit, nothing went to the origin.
    assert_eq!(w.warm_origin, 0, "the warm pull reached the origin");
    let warm = |name, filter: &[(&str, &str)]| delta(&w.cold, &w.warm, name, filter);
    assert_eq!(warm(upstream, &[]), 0.0);
    // Lookups count per tier consulted: a small blob first read from disk is a memory miss and
    // a disk hit. Nothing misses on disk in the warm pull.
    assert_eq!(warm(lookups, &[("tier", "disk"), ("result", "miss")]), 0.0);
    assert!(warm(lookups, &[("kind", "blob"), ("result", "hit")]) >= blobs);
    assert!(
        warm(
            lookups,
            &[("kind", "blob"), ("tier", "disk"), ("result", "hit")]
        ) >= w.disk_only_blobs() as f64,
        "blobs above the memory tier's object limit hit on disk"
    );
    assert!(warm(lookups, &[("kind", "tag"), ("result", "hit")]) >= 1.0);
    assert!(warm(lookups, &[("kind", "manifest"), ("result", "hit")]) >= 1.0);
    let warm_cached = warm(served, &[("source", "memory")]) + warm(served, &[("source", "disk")]);
    assert!(
        warm_cached >= blob_bytes,
        "served from cache in the warm pull: {warm_cached} < {blob_bytes} blob bytes"
    );
    assert_eq!(warm(served, &[("source", "upstream")]), 0.0);
    assert_eq!(
        delta(
            &w.cold,
            &w.warm,
            "berth_http_request_duration_seconds_count",
            &[("route", "blob"), ("cache", "hit")]
        ),
        blobs
    );

    // The extra requests, by route and status.
    let all = |name, filter: &[(&str, &str)]| delta(&w.before, &w.end, name, filter);
    let requests = "berth_http_requests_total";
    assert_eq!(all(requests, &[("route", "blob"), ("status", "206")]), 1.0);
    assert_eq!(
        all(
            requests,
            &[("route", "blob"), ("method", "HEAD"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        all(
            requests,
            &[("route", "blob"), ("method", "GET"), ("status", "200")]
        ),
        2.0 * blobs
    );
    assert_eq!(all(requests, &[("route", "tags"), ("status", "200")]), 1.0);
    assert_eq!(
        all(requests, &[("route", "manifest"), ("status", "404")]),
        1.0
    );
    assert_eq!(all(requests, &[("status", "400")]), 1.0);
    assert_eq!(all(requests, &[("route", "base"), ("status", "200")]), 2.0);
    assert_eq!(
        all(requests, &[]),
        all("berth_http_request_duration_seconds_count", &[]),
        "every request is timed once"
    );

    // Gauges at the end: the disk tier holds the blobs, no fill is left running.
    assert!(w.end.sum("berth_cache_size_bytes", &[("tier", "disk")]) >= blob_bytes);
    assert!(w.end.sum("berth_cache_objects", &[("tier", "disk")]) >= blobs);
    assert_eq!(
        w.end.sum("berth_cache_capacity_bytes", &[("tier", "disk")]),
        10.0 * 1024.0 * 1024.0 * 1024.0
    );
    assert_eq!(w.end.sum("berth_fills_in_flight", &[]), 0.0);
    assert_eq!(
        w.end.sum(
            "berth_upstream_ratelimit_remaining",
            &[("upstream", "origin")]
        ),
        187.0,
        "Docker Hub's ratelimit-remaining: {RATELIMIT_REMAINING}"
    );
    assert_eq!(w.end.sum("berth_stale_served_total", &[]), 0.0);

    // The hit ratios the counters imply.
    let cached_bytes =
        w.end.sum(served, &[("source", "memory")]) + w.end.sum(served, &[("source", "disk")]);
    let byte_ratio = cached_bytes / w.end.sum(served, &[]);
    let blob_hits = w.end.sum(lookups, &[("kind", "blob"), ("result", "hit")]);
    let blob_lookups = w.end.sum(lookups, &[("kind", "blob")]);
    let lookup_ratio = blob_hits / blob_lookups;
    let warm_byte_ratio = warm_cached / warm(served, &[]);
    println!(
        "workload: {} blobs, {} blob bytes, pulled twice, plus range, HEADs, tags/list, 404, 400",
        w.blob_count(),
        w.blob_bytes()
    );
    println!(
        "byte hit ratio (memory+disk)/all of berth_served_bytes_total: {cached_bytes} / {} = {:.1}%",
        w.end.sum(served, &[]),
        byte_ratio * 100.0
    );
    println!(
        "blob lookup hit ratio from berth_cache_lookups_total{{kind=\"blob\"}}: {blob_hits} / {blob_lookups} = {:.1}%",
        lookup_ratio * 100.0
    );
    println!(
        "warm pull alone: byte hit ratio {:.1}%",
        warm_byte_ratio * 100.0
    );
    println!(
        "--- /metrics excerpt ---\n{}",
        w.end.excerpt(&[
            "berth_cache_lookups_total",
            "berth_served_bytes_total",
            "berth_upstream_requests_total",
            "berth_upstream_bytes_total",
            "berth_cache_size_bytes",
            "berth_cache_objects",
            "berth_http_requests_total",
        ])
    );
    // Two identical pulls: the second is all hits, so about half of all bytes were cached.
    assert!(
        (0.45..0.6).contains(&byte_ratio),
        "byte hit ratio {byte_ratio}"
    );
    assert_eq!(warm_byte_ratio, 1.0);
    // 4 blob misses; 4 warm hits plus the range and the HEAD (a small blob first read from disk
    // also counts a memory-tier miss).
    assert!(blob_lookups >= 2.0 * blobs + 2.0, "{blob_lookups}");
    assert!(blob_hits >= blobs + 2.0, "{blob_hits}");
}

#[test]
fn alert_rules_pass_promtool() {
    let out = promtool(&["check", "rules", ALERTS], None);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        output_text(&out)
    );
    let out = promtool(&["test", "rules", ALERTS_TEST], None);
    let report = output_text(&out);
    assert!(out.status.success(), "promtool test rules:\n{report}");
    assert!(report.contains("SUCCESS"), "{report}");

    // Every alert the rules define is exercised by the unit tests.
    let rules = std::fs::read_to_string(crate_root().join(ALERTS)).expect("read alerts");
    let tests = std::fs::read_to_string(crate_root().join(ALERTS_TEST)).expect("read tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    for expected in [
        "BerthDown",
        "BerthHitRatioLow",
        "BerthUpstreamErrors",
        "BerthCacheNearCapacity",
        "BerthDigestMismatch",
        "BerthServingStale",
        "BerthSharedTierErrors",
        "BerthSharedUploadsFailing",
        "BerthPeerFallbacks",
    ] {
        assert!(alerts.contains(&expected), "{ALERTS} lacks {expected}");
    }
    // Each alert has a case where it fires and one where it must not.
    let test_lines: Vec<&str> = tests.lines().map(str::trim).collect();
    for alert in &alerts {
        let mut firing = 0;
        let mut silent = 0;
        for pair in test_lines.windows(2) {
            if pair[0] == format!("alertname: {alert}") {
                match pair[1] {
                    "exp_alerts: []" => silent += 1,
                    "exp_alerts:" => firing += 1,
                    other => panic!("unexpected line after alertname: {alert}: {other}"),
                }
            }
        }
        assert!(
            firing >= 1 && silent >= 1,
            "{alert}: {firing} firing and {silent} silent cases in {ALERTS_TEST}"
        );
    }
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let dashboard = load_dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 38,
        "Grafana 10 schema"
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("dashboard variable ${name}"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    let upstream_query = variable("upstream")["definition"].as_str().unwrap_or("");
    assert!(
        upstream_query.starts_with("label_values(berth_upstream_requests_total")
            && upstream_query.ends_with(", upstream)"),
        "{upstream_query}"
    );
    variable("instance");
    variable("job");

    let panels = panels(&dashboard);
    let mut ids = BTreeSet::new();
    for p in &panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "gridPos of {}",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} uses the datasource variable",
            p["title"]
        );
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "panel {} has a unit",
            p["title"]
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has queries", p["title"]);
    }
    let title_unit: BTreeMap<&str, &str> = panels
        .iter()
        .filter_map(|p| {
            Some((
                p["title"].as_str()?,
                p["fieldConfig"]["defaults"]["unit"].as_str()?,
            ))
        })
        .collect();
    for (title, unit) in [
        ("Hit ratio by kind and tier", "percentunit"),
        ("Bytes served by source", "binBps"),
        ("Share of egress saved", "percentunit"),
        ("Request rate by route and status", "reqps"),
        ("Latency by route (p50 / p95 / p99)", "s"),
        ("Upstream latency (p50 / p95)", "s"),
        ("Upstream errors (non-2xx)", "reqps"),
        ("Fills in flight", "short"),
        ("Fill waiters rate", "reqps"),
        ("Fill failures by reason", "cps"),
        ("Evictions rate", "cps"),
        ("Cache fill level", "percentunit"),
        ("Cache size and capacity", "bytes"),
        ("Stale serves", "cps"),
        ("Digest mismatches", "short"),
        ("Rate-limit remaining", "short"),
        ("Write failures / pass-through", "cps"),
        ("Auth decisions by result and source", "cps"),
        ("Shared tier lookups by result", "cps"),
        ("Shared tier bytes", "binBps"),
        ("Origin bytes spared by source", "binBps"),
        ("Shared uploads by result", "cps"),
        ("Shared uploads pending", "short"),
        ("Shared tier corrupt objects", "short"),
        ("Peer requests by result", "reqps"),
        ("Peer fallbacks", "reqps"),
        ("Peers", "short"),
    ] {
        assert_eq!(
            title_unit.get(title).copied(),
            Some(unit),
            "dashboard panel {title:?} with unit {unit}"
        );
    }

    // Bytes from the shared tier or another replica did not come from an origin: the saved
    // share counts them with the cache's (as BerthHitRatioLow does).
    for title in ["Egress saved", "Share of egress saved"] {
        let panel = panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("dashboard panel {title:?}"));
        let expr = panel["targets"][0]["expr"].as_str().unwrap_or("");
        assert!(expr.contains(r#"source!="upstream""#), "{title}: {expr}");
    }

    // The dashboard's PromQL parses: run it through promtool as recording rules, with the
    // Grafana variables replaced by what Grafana would send.
    let exprs = dashboard_exprs(&dashboard);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs
        .iter()
        .filter(|e| !e.starts_with("label_values("))
        .enumerate()
    {
        let concrete = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "6h")
            .replace("$job", ".*")
            .replace("$instance", ".*")
            .replace("$upstream", ".*");
        assert!(!concrete.contains('$'), "unknown variable in {expr}");
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete).expect("JSON string")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let rules_path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&rules_path, &rules).expect("write rules");
    let out = promtool(
        &["check", "rules", rules_path.to_str().expect("utf-8 path")],
        None,
    );
    assert!(
        out.status.success(),
        "dashboard PromQL does not parse:\n{}\n{rules}",
        output_text(&out)
    );

    // Every metric the dashboard and the alerts query exists after a workload.
    let mut dashboard_names = BTreeSet::new();
    exprs
        .iter()
        .for_each(|e| dashboard_names.extend(metric_names(e)));
    let alerts = std::fs::read_to_string(crate_root().join(ALERTS)).expect("read alerts");
    let alert_exprs = rule_exprs(&alerts);
    assert_eq!(alert_exprs.len(), 12, "{alert_exprs:?}");
    let mut alert_names = BTreeSet::new();
    alert_exprs
        .iter()
        .for_each(|e| alert_names.extend(metric_names(e)));
    assert!(dashboard_names.len() >= 15, "{dashboard_names:?}");
    // The Scale-out row shows every scale-out family (src/metrics/scale.rs).
    for family in [
        "berth_shared_lookups_total",
        "berth_shared_bytes_total",
        "berth_shared_uploads_total",
        "berth_shared_uploads_pending",
        "berth_shared_corrupt_total",
        "berth_peer_requests_total",
        "berth_peer_fallbacks_total",
        "berth_peer_served_total",
        "berth_peers",
        "berth_origin_bytes_spared_total",
    ] {
        assert!(
            dashboard_names.contains(family),
            "the dashboard does not show {family}"
        );
    }
    assert!(alert_names.len() >= 6, "{alert_names:?}");

    let w = workload().await;
    let missing_dashboard = missing_families(&dashboard_names, &w.end);
    let missing_alerts = missing_families(&alert_names, &w.end);
    println!("dashboard queries: {dashboard_names:?}");
    println!("alert rules query: {alert_names:?}");
    assert!(
        missing_dashboard.is_empty() && missing_alerts.is_empty(),
        "not in berth's /metrics after the workload: dashboard {missing_dashboard:?}, alerts \
         {missing_alerts:?} (a family with fixed label values should be exported at 0 from the \
         start, as Metrics::new does for served bytes); families exported: {:?}",
        w.end.families.keys().collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn health_and_readiness_answer_while_running() {
    let w = workload().await;
    let client = Client::new();
    let admin = w.berth.admin_addr;
    for (path, status) in [
        ("/healthz", StatusCode::OK),
        ("/readyz", StatusCode::OK),
        ("/nope", StatusCode::NOT_FOUND),
    ] {
        let url = format!("http://{admin}{path}");
        let resp = client.get(&url).send().await.expect("admin listener");
        assert_eq!(resp.status(), status, "{url}");
    }
    let resp = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), StatusCode::OK);
    let ctype = resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_owned();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    // The client listener still serves after the admin requests.
    let (status, _) =
        fetch_status(&client, Method::GET, &format!("{}/v2/", w.berth.url()), &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn metric_name_extraction() {
    let names = metric_names(
        r#"histogram_quantile(0.95, sum by (le) (rate(berth_http_request_duration_seconds_bucket{job="berth"}[5m]))) / xberth_no"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["berth_http_request_duration_seconds_bucket".to_owned()])
    );
    let exprs = rule_exprs("      - alert: A\n        expr: up == 0\n      - alert: B\n        expr: |\n          berth_a\n            / berth_b\n        for: 1m\n");
    assert_eq!(
        exprs,
        vec!["up == 0".to_owned(), "berth_a\n/ berth_b".to_owned()]
    );
    let s = parse_sample(r#"berth_x{a="1",b="q\"x"} 2.5"#);
    assert_eq!((s.name.as_str(), s.value), ("berth_x", 2.5));
    assert_eq!(s.labels["b"], "q\"x");
}
