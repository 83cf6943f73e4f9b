//! `berth warm`: fills the cache ahead of time from a list of images, for air-gapped sites and
//! for clusters that must survive an origin outage.
//!
//! Warming pulls through berth's own request path, so everything a client pull does holds here
//! too (one fill per digest, digests verified, the disk budget kept). Without `--via` it starts
//! an in-process berth on a loopback port over the cache directory of the config (taking the
//! directory's lock: a berth serving that directory must be warmed with `--via URL` instead);
//! with `--via URL` it pulls through a running berth. Already cached blobs are skipped (a HEAD
//! answered from the cache), so a rerun resumes where an interrupted one stopped.
//!
//! Architecture: docs/ARCHITECTURE.md, "Commands".

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;

use crate::cache::{Key, ObjectKind, PinnedImage};
use crate::oci::{media, Digest, ImageRef};
use crate::proxy::App;

/// What to warm and how.
#[derive(Debug, Clone)]
pub struct WarmOptions {
    /// Image references.
    pub images: Vec<String>,
    /// Platforms to keep from multi-platform images (`linux/amd64`, `linux/arm64/v8`); all
    /// when empty.
    pub platforms: Vec<String>,
    /// Also fetch referrers (signatures, SBOMs) of every manifest.
    pub with_referrers: bool,
    /// Blob downloads at once.
    pub concurrency: usize,
    /// Pin the warmed images (never evicted).
    pub pin: bool,
    /// Pull through a running berth at this URL instead of opening the cache directory.
    pub via: Option<String>,
    /// `user:password` to send to berth (for `passthrough` or `service` upstreams).
    pub credentials: Option<String>,
}

/// The outcome of one image.
#[derive(Debug, Clone)]
pub struct ImageResult {
    /// The reference as given.
    pub reference: String,
    /// Bytes downloaded.
    pub fetched: u64,
    /// Bytes already cached (skipped).
    pub skipped: u64,
    /// Blobs in the image (over the selected platforms).
    pub blobs: usize,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

type HttpClient = Client<
    hyper_rustls::HttpsConnector<HttpConnector<crate::upstream::dns::Resolver>>,
    Empty<Bytes>,
>;

struct Puller {
    client: HttpClient,
    base: String,
    authorization: Option<HeaderValue>,
    app: Option<Arc<App>>,
    pin: bool,
    semaphore: Semaphore,
    progress: Progress,
}

enum Progress {
    Bars {
        multi: MultiProgress,
        total: ProgressBar,
    },
    Lines,
}

struct Descriptor {
    digest: Digest,
    size: u64,
    media_type: String,
}

fn descriptors(manifest: &serde_json::Value, field: &str) -> Vec<Descriptor> {
    let list: Vec<&serde_json::Value> = match manifest.get(field) {
        Some(serde_json::Value::Array(a)) => a.iter().collect(),
        Some(v @ serde_json::Value::Object(_)) => vec![v],
        _ => Vec::new(),
    };
    list.into_iter()
        .filter_map(|d| {
            Some(Descriptor {
                digest: d.get("digest")?.as_str()?.parse().ok()?,
                size: d.get("size").and_then(|s| s.as_u64()).unwrap_or(0),
                media_type: d
                    .get("mediaType")
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
                    .to_owned(),
            })
        })
        .collect()
}

fn platform_matches(entry: &serde_json::Value, wanted: &[String]) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let p = entry.get("platform");
    let field = |k: &str| {
        p.and_then(|p| p.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or("")
    };
    let (os, arch, variant) = (field("os"), field("architecture"), field("variant"));
    wanted.iter().any(|w| {
        let mut parts = w.split('/');
        let (wo, wa, wv) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next(),
        );
        wo == os && wa == arch && wv.is_none_or(|v| v == variant)
    })
}

impl Puller {
    fn url(&self, image: &ImageRef, path: &str) -> String {
        let ns = image
            .host
            .as_deref()
            .map(|h| {
                format!(
                    "?ns={}",
                    percent_encoding::utf8_percent_encode(h, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .unwrap_or_default();
        format!("{}/v2/{}/{path}{ns}", self.base, image.repo)
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        accept: &[&str],
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let mut b = Request::builder().method(method).uri(url);
        for a in accept {
            b = b.header(header::ACCEPT, *a);
        }
        self.send(b, url).await
    }

    /// HEAD with `Cache-Control: only-if-cached`: berth answers from its cache or 504, without
    /// asking the origin.
    async fn request_cached_only(
        &self,
        url: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let b = Request::builder()
            .method(Method::HEAD)
            .uri(url)
            .header(header::CACHE_CONTROL, "only-if-cached");
        self.send(b, url).await
    }

    /// Adds the credentials and sends, bounded by a timeout.
    async fn send(
        &self,
        mut b: http::request::Builder,
        url: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        if let Some(a) = &self.authorization {
            b = b.header(header::AUTHORIZATION, a.clone());
        }
        let req = b.body(Empty::new()).map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(120), self.client.request(req))
            .await
            .map_err(|_| format!("{url}: no answer within 120 s"))?
            .map_err(|e| format!("{url}: {}", crate::upstream::error_chain(&e)))
    }

    async fn manifest(
        &self,
        image: &ImageRef,
        reference: &str,
    ) -> Result<(Digest, String, Vec<u8>), String> {
        let url = self.url(image, &format!("manifests/{reference}"));
        let resp = self
            .request(Method::GET, &url, media::DEFAULT_ACCEPT)
            .await?;
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let digest = resp
            .headers()
            .get(crate::oci::DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = Limited::new(resp.into_body(), media::MAX_MANIFEST_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "manifest {reference}: {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
        let digest = digest.unwrap_or_else(|| Digest::sha256_of(&body));
        Ok((digest, ctype, body.to_vec()))
    }

    /// Fetches one blob unless it is cached; returns (fetched, skipped) bytes.
    async fn blob(
        &self,
        image: &ImageRef,
        d: &Descriptor,
        bar: &ProgressBar,
    ) -> Result<(u64, u64), String> {
        let _permit = self.semaphore.acquire().await.map_err(|e| e.to_string())?;
        let url = self.url(image, &format!("blobs/{}", d.digest));
        let head = self.request_cached_only(&url).await?;
        if head.status() == StatusCode::OK
            && head
                .headers()
                .get(crate::proxy::CACHE_HEADER)
                .is_some_and(|v| v == "hit")
        {
            bar.inc(d.size);
            self.total_inc(d.size);
            return Ok((0, d.size));
        }
        let resp = self.request(Method::GET, &url, &[]).await?;
        if resp.status() != StatusCode::OK {
            return Err(format!("blob {}: {}", d.digest, resp.status()));
        }
        let mut body = resp.into_body();
        let mut got = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("blob {}: transfer failed: {e}", d.digest))?;
            if let Ok(data) = frame.into_data() {
                got += data.len() as u64;
                bar.inc(data.len() as u64);
                self.total_inc(data.len() as u64);
            }
        }
        if d.size > 0 && got != d.size {
            return Err(format!("blob {}: got {got} of {} bytes", d.digest, d.size));
        }
        if let (Some(app), true) = (&self.app, self.pin) {
            // Pin as soon as it is stored (the commit lands just after the last byte), so that
            // later fills of this warm cannot evict it before the image is complete.
            let key = Key {
                kind: ObjectKind::Blob,
                digest: d.digest.clone(),
            };
            // The verified last bytes reach this client just before the commit lands.
            app.cache().fills().settled(&d.digest).await;
            app.cache()
                .index()
                .pin(&[key])
                .map_err(|e| format!("cannot pin blob {}: {e}", d.digest))?;
        }
        Ok((got, 0))
    }

    fn total_inc(&self, n: u64) {
        if let Progress::Bars { total, .. } = &self.progress {
            total.inc(n);
        }
    }

    fn log(&self, line: String) {
        match &self.progress {
            Progress::Bars { multi, .. } => {
                let _ = multi.println(line);
            }
            Progress::Lines => eprintln!("{line}"),
        }
    }

    async fn warm_image(&self, reference: &str, opts: &WarmOptions) -> ImageResult {
        let mut result = ImageResult {
            reference: reference.to_owned(),
            fetched: 0,
            skipped: 0,
            blobs: 0,
            error: None,
        };
        if let Err(e) = self.warm_image_inner(reference, opts, &mut result).await {
            result.error = Some(e);
        }
        result
    }

    async fn warm_image_inner(
        &self,
        reference: &str,
        opts: &WarmOptions,
        result: &mut ImageResult,
    ) -> Result<(), String> {
        let image: ImageRef = reference.parse().map_err(|e| format!("{e}"))?;
        let (top, top_type, top_bytes) = self.manifest(&image, &image.reference()).await?;
        let top_json: serde_json::Value =
            serde_json::from_slice(&top_bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
        let mut manifests = vec![(top.clone(), top_json.clone())];
        let is_index = top_type == media::OCI_INDEX
            || top_type == media::DOCKER_MANIFEST_LIST
            || top_json.get("manifests").is_some();
        if is_index {
            self.platform_manifests(&image, &top_json, &opts.platforms, &mut manifests)
                .await?;
        }
        if opts.with_referrers {
            self.referrers(&image, &mut manifests).await?;
        }
        let blobs = unique_blobs(&manifests);
        result.blobs = blobs.len();
        let total: u64 = blobs.iter().map(|b| b.size).sum();
        if opts.pin {
            self.check_pin_room(total)?;
        }
        let bar = self.progress_bar(reference, total);
        let started = Instant::now();
        let results =
            futures_util::future::join_all(blobs.iter().map(|d| self.blob(&image, d, &bar))).await;
        bar.finish();
        for r in results {
            let (f, s) = r?;
            result.fetched += f;
            result.skipped += s;
        }
        if opts.pin {
            self.pin(reference, &image, &top, &manifests, &blobs)?;
        }
        self.log(format!(
            "{reference}: {} manifest(s), {} blob(s), fetched {} bytes, {} bytes already cached, in {:.1?}",
            manifests.len(),
            blobs.len(),
            result.fetched,
            result.skipped,
            started.elapsed()
        ));
        Ok(())
    }

    /// The manifests of an index's entries that match `platforms`, appended to `manifests`.
    async fn platform_manifests(
        &self,
        image: &ImageRef,
        index: &serde_json::Value,
        platforms: &[String],
        manifests: &mut Vec<(Digest, serde_json::Value)>,
    ) -> Result<(), String> {
        let entries = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        let chosen: Vec<_> = entries
            .iter()
            .filter(|e| platform_matches(e, platforms))
            .collect();
        if chosen.is_empty() {
            return Err(format!(
                "no manifest for platform {} in the index",
                platforms.join(",")
            ));
        }
        for e in chosen {
            let Some(d) = e.get("digest").and_then(|d| d.as_str()) else {
                continue;
            };
            let (digest, _, bytes) = self.manifest(image, d).await?;
            let json =
                serde_json::from_slice(&bytes).map_err(|e| format!("manifest is not JSON: {e}"))?;
            manifests.push((digest, json));
        }
        Ok(())
    }

    /// The referrers (signatures, SBOMs) of every manifest so far, appended to `manifests`.
    async fn referrers(
        &self,
        image: &ImageRef,
        manifests: &mut Vec<(Digest, serde_json::Value)>,
    ) -> Result<(), String> {
        let subjects: Vec<Digest> = manifests.iter().map(|(d, _)| d.clone()).collect();
        for subject in subjects {
            let url = self.url(image, &format!("referrers/{subject}"));
            let resp = self.request(Method::GET, &url, &[media::OCI_INDEX]).await?;
            if resp.status() != StatusCode::OK {
                continue;
            }
            let raw = Limited::new(resp.into_body(), media::MAX_MANIFEST_BYTES)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let idx: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
            for r in descriptors(&idx, "manifests") {
                let (digest, _, bytes) = self.manifest(image, &r.digest.to_string()).await?;
                let json = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("referrer is not JSON: {e}"))?;
                manifests.push((digest, json));
            }
        }
        Ok(())
    }

    /// Refuses a pin that would push the pinned bytes past the disk budget (warming in place).
    fn check_pin_room(&self, total: u64) -> Result<(), String> {
        let Some(app) = &self.app else {
            return Ok(());
        };
        let index = app.cache().index();
        let u = index.usage();
        if u.pinned + total > index.budget() {
            return Err(format!(
                "pinning needs {total} bytes but only {} of the {}-byte disk budget are not pinned; raise cache.disk_bytes",
                index.budget() - u.pinned,
                index.budget()
            ));
        }
        Ok(())
    }

    /// This image's progress bar (hidden in line mode), its bytes added to the overall bar.
    fn progress_bar(&self, reference: &str, total: u64) -> ProgressBar {
        match &self.progress {
            Progress::Bars { multi, total: t } => {
                t.inc_length(total);
                let b = multi.add(ProgressBar::new(total));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template"),
                );
                b.set_prefix(reference.to_owned());
                b
            }
            Progress::Lines => ProgressBar::hidden(),
        }
    }

    /// Pins the warmed image (warming in place; `--via` cannot pin).
    fn pin(
        &self,
        reference: &str,
        image: &ImageRef,
        top: &Digest,
        manifests: &[(Digest, serde_json::Value)],
        blobs: &[Descriptor],
    ) -> Result<(), String> {
        let Some(app) = &self.app else {
            return Ok(());
        };
        let (upstream, repository) = app
            .resolve(image.host.as_deref(), image.repo.clone())
            .map_err(|e| e.to_string())?;
        let record = PinnedImage {
            reference: reference.to_owned(),
            upstream,
            repository,
            tag: image.tag.as_ref().map(|t| t.to_string()),
            manifest: top.to_string(),
            manifests: manifests.iter().map(|(d, _)| d.to_string()).collect(),
            blobs: blobs.iter().map(|b| b.digest.to_string()).collect(),
        };
        app.cache()
            .pin_image(record)
            .map_err(|e| format!("cannot pin: {e}"))
    }
}

/// Warms every image; returns one result per image (failures included).
pub async fn warm(base: String, app: Option<Arc<App>>, opts: &WarmOptions) -> Vec<ImageResult> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        roots
    })
    .with_no_client_auth();
    // The same resolver as the upstream client: a static binary in the container image has no
    // glibc NSS, so `--via http://berth.example:5000` must not depend on it.
    let mut http = HttpConnector::new_with_resolver(crate::upstream::dns::Resolver::default());
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new()).build(https);
    let authorization = opts.credentials.as_ref().and_then(|c| {
        use base64::Engine as _;
        let mut v = HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(c)
        ))
        .ok()?;
        v.set_sensitive(true);
        Some(v)
    });
    let progress = if std::io::stderr().is_terminal() {
        let multi = MultiProgress::new();
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template(
                "{prefix:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        total.set_prefix("total");
        Progress::Bars { multi, total }
    } else {
        Progress::Lines
    };
    let puller = Puller {
        client,
        base: base.trim_end_matches('/').to_owned(),
        authorization,
        app,
        pin: opts.pin,
        semaphore: Semaphore::new(opts.concurrency.max(1)),
        progress,
    };
    let mut results = Vec::new();
    for image in &opts.images {
        results.push(puller.warm_image(image, opts).await);
    }
    if let Progress::Bars { total, .. } = &puller.progress {
        total.finish();
    }
    results
}

/// The configs and layers of `manifests`, each once, in order (nested indexes skipped).
fn unique_blobs(manifests: &[(Digest, serde_json::Value)]) -> Vec<Descriptor> {
    let mut blobs: Vec<Descriptor> = Vec::new();
    let mut seen = BTreeSet::new();
    for (_, m) in manifests {
        for d in descriptors(m, "config")
            .into_iter()
            .chain(descriptors(m, "layers"))
        {
            if d.media_type.contains("image.index") || d.media_type.contains("manifest.list") {
                continue;
            }
            if seen.insert(d.digest.clone()) {
                blobs.push(d);
            }
        }
    }
    blobs
}
