//! `GET|HEAD /v2/<name>/manifests/<reference>`: by digest from the content-addressed cache, by tag
//! through the tag mapping (fresh → cache; stale → HEAD revalidation; origin down → stale).
//!
//! Architecture: docs/ARCHITECTURE.md, "Request path".

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};

use super::freshness::{self, Outcome, Subject};
use super::{conditional, sourced, App, CacheResult, ServedFrom};
use crate::body::{self, Body};
use crate::cache::fill::FetchedFrom;
use crate::cache::{accept_key, StoredManifest, TagEntry, TagKey, Tier, Validity};
use crate::error::Error;
use crate::oci::{media, Digest, Hasher, Reference, Tag, DIGEST_HEADER};
use crate::upstream::{Selected, UpstreamError, UpstreamRequest};

/// How often a stale tag is revalidated while its origin's rate limit is low.
const RATELIMIT_PROBE: std::time::Duration = std::time::Duration::from_secs(60);

impl App {
    /// GET|HEAD: /v2/<name>/manifests/<reference>
    pub(super) async fn manifest(
        &self,
        sel: &Selected,
        reference: Reference,
        accept: Vec<String>,
        head: bool,
    ) -> Result<(Response<Body>, CacheResult), Error> {
        match reference {
            Reference::Digest(d) => {
                let found = self.cache().manifest_async(&d).await.map_err(io_err)?;
                self.count_lookup(
                    "manifest",
                    "memory",
                    matches!(found, Some((_, Tier::Memory))),
                );
                if !matches!(found, Some((_, Tier::Memory))) {
                    self.count_lookup("manifest", "disk", found.is_some());
                }
                if let Some((m, tier)) = found {
                    // Cached bytes need the origin's evidence for this repository; a miss is
                    // fetched from this repository's origin below, and that answer is it.
                    if !self.auth.is_member(sel, &d) {
                        let r = Reference::Digest(d.clone());
                        self.auth
                            .require_member(sel, crate::auth::Target::Manifest(&r))
                            .await?;
                    }
                    // containerd HEADs the tag (which fetched the manifest) and then GETs the
                    // digest: that GET is the one that asks for the image.
                    if !head && self.prefetch.headed(sel, &d) {
                        self.prefetch(sel, &m);
                    }
                    return Ok((
                        sourced(self.respond(sel, &d, &m, head), tier.into()),
                        CacheResult::Hit,
                    ));
                }
                // Boxed, as every step that leaves the machine: their futures are large, and
                // an unboxed one would make every request's future (which hyper copies) carry
                // it, cache hits included.
                if let Some(m) = Box::pin(self.shared_manifest(&d)).await {
                    // Bytes from the shared tier are not evidence: the origin's word first.
                    if !self.auth.is_member(sel, &d) {
                        let r = Reference::Digest(d.clone());
                        self.auth
                            .require_member(sel, crate::auth::Target::Manifest(&r))
                            .await?;
                    }
                    let m = self.cache().put_manifest(&d, m).await.map_err(io_err)?;
                    self.prefetch_unless_head(sel, &d, &m, head);
                    return Ok((
                        sourced(
                            self.respond(sel, &d, &m, head),
                            ServedFrom::Fetched(FetchedFrom::Shared),
                        ),
                        CacheResult::Miss,
                    ));
                }
                let (got, m, _) = Box::pin(self.fetch_manifest(sel, d.as_str(), &accept, Some(&d)))
                    .await
                    .map_err(|e| not_found_as(e, "manifest"))?;
                self.share_manifest(&got, &m);
                let m = self.cache().put_manifest(&got, m).await.map_err(io_err)?;
                self.prefetch_unless_head(sel, &got, &m, head);
                Ok((
                    sourced(
                        self.respond(sel, &got, &m, head),
                        ServedFrom::Fetched(FetchedFrom::Origin),
                    ),
                    CacheResult::Miss,
                ))
            }
            Reference::Tag(tag) => self.manifest_by_tag(sel, tag, accept, head).await,
        }
    }

    async fn manifest_by_tag(
        &self,
        sel: &Selected,
        tag: Tag,
        accept: Vec<String>,
        head: bool,
    ) -> Result<(Response<Body>, CacheResult), Error> {
        let key = TagKey {
            upstream: sel.upstream.name().to_owned(),
            repo: sel.name.clone(),
            tag: tag.clone(),
            accept: accept_key(&accept),
        };
        let offline = sel.upstream.config().offline;
        let mut known = self.cache().tags().get_async(&key).await;
        if known.is_none() && offline {
            known = self
                .cache()
                .tags()
                .any_acceptable_async(&key, &accept)
                .await;
        }
        let cached = match &known {
            Some(e) => self
                .cache()
                .manifest_async(&e.digest)
                .await
                .map_err(io_err)?,
            None => None,
        };
        if known.is_some() {
            // The manifest the mapping names, read like one asked for by digest: by tier.
            let in_memory = matches!(cached, Some((_, Tier::Memory)));
            self.count_lookup("manifest", "memory", in_memory);
            if !in_memory {
                self.count_lookup("manifest", "disk", cached.is_some());
            }
        }
        let fresh = known
            .as_ref()
            .is_some_and(|e| e.is_fresh(self.tag_ttl(), self.clock().now()));
        self.count_lookup("tag", "memory", fresh);
        if let (Some(e), Some((m, tier))) = (&known, &cached) {
            let tier = *tier;
            // An offline mirror has nothing to revalidate against: what it holds is current.
            if offline || fresh {
                return Ok((
                    sourced(self.respond(sel, &e.digest, m, head), tier.into()),
                    CacheResult::Hit,
                ));
            }
            // Few pulls left at the origin (Docker Hub's `ratelimit-remaining`): keep them for
            // what cannot wait, serve the known mapping, and ask at most once a minute.
            if self.ratelimit_low(sel) {
                self.metrics
                    .stale_served
                    .with_label_values(&["ratelimit"])
                    .inc();
                return Ok((
                    sourced(self.respond(sel, &e.digest, m, head), tier.into()),
                    CacheResult::Stale,
                ));
            }
            // Stale mapping: revalidate with a HEAD (does not count against Docker Hub's limit),
            // conditional on the origin's ETag when it gave one.
            match self
                .head_manifest(sel, tag.as_str(), &accept, Some(e))
                .await
            {
                Ok(h) if h.not_modified || h.digest.as_ref() == Some(&e.digest) => {
                    self.count_revalidation(Subject::Tag, Outcome::Unchanged);
                    self.cache()
                        .tags()
                        .put_async(&key, e.digest.clone(), m.media_type.clone(), h.validity)
                        .await;
                    self.prefetch_unless_head(sel, &e.digest, m, head);
                    return Ok((
                        sourced(self.respond(sel, &e.digest, m, head), tier.into()),
                        CacheResult::Hit,
                    ));
                }
                Ok(_) => self.count_revalidation(Subject::Tag, Outcome::Changed),
                Err(err) if err.is_origin_failure() => {
                    self.count_revalidation(Subject::Tag, Outcome::Error);
                    return Ok(self.stale(sel, &e.digest, m, tier, head, &err));
                }
                Err(err) if err.is_not_found() => {
                    self.count_revalidation(Subject::Tag, Outcome::Changed);
                    self.cache().tags().remove_async(&key).await;
                    return Err(not_found_as(err, "manifest"));
                }
                Err(err) => {
                    self.count_revalidation(Subject::Tag, Outcome::Error);
                    return Err(err.into());
                }
            }
        }
        // With a shared tier, the origin's HEAD names the digest (its word for this tag, and
        // no Docker Hub pull counted) and the bytes may come from the tier.
        if self.scale().shared.is_some() && !offline {
            if let Ok(OriginHead {
                digest: Some(d),
                validity,
                ..
            }) = self.head_manifest(sel, tag.as_str(), &accept, None).await
            {
                if let Some(m) = Box::pin(self.shared_manifest(&d)).await {
                    let media_type = m.media_type.clone();
                    let m = self.cache().put_manifest(&d, m).await.map_err(io_err)?;
                    self.cache()
                        .tags()
                        .put_async(&key, d.clone(), media_type, validity)
                        .await;
                    self.prefetch_unless_head(sel, &d, &m, head);
                    return Ok((
                        sourced(
                            self.respond(sel, &d, &m, head),
                            ServedFrom::Fetched(FetchedFrom::Shared),
                        ),
                        CacheResult::Miss,
                    ));
                }
            }
        }
        match Box::pin(self.fetch_manifest(sel, tag.as_str(), &accept, None)).await {
            Ok((d, m, validity)) => {
                self.share_manifest(&d, &m);
                let media_type = m.media_type.clone();
                let m = self.cache().put_manifest(&d, m).await.map_err(io_err)?;
                self.cache()
                    .tags()
                    .put_async(&key, d.clone(), media_type, validity)
                    .await;
                self.prefetch_unless_head(sel, &d, &m, head);
                Ok((
                    sourced(
                        self.respond(sel, &d, &m, head),
                        ServedFrom::Fetched(FetchedFrom::Origin),
                    ),
                    CacheResult::Miss,
                ))
            }
            Err(err) if err.is_origin_failure() => {
                if let (Some(e), Some((m, tier))) = (&known, &cached) {
                    return Ok(self.stale(sel, &e.digest, m, *tier, head, &err));
                }
                // The origin is down and this exact Accept was never seen: any mapping of the
                // tag the client can take still beats an error.
                if let Some(e) = self
                    .cache()
                    .tags()
                    .any_acceptable_async(&key, &accept)
                    .await
                {
                    let found = self.cache().manifest_async(&e.digest).await;
                    if let Some((m, tier)) = found.map_err(io_err)? {
                        return Ok(self.stale(sel, &e.digest, &m, tier, head, &err));
                    }
                }
                Err(not_found_as(err, "manifest"))
            }
            Err(err) => {
                if err.is_not_found() {
                    self.cache().tags().remove_async(&key).await;
                }
                Err(not_found_as(err, "manifest"))
            }
        }
    }

    /// Manifest `m` (digest `d`) the origin just sent or confirmed: a GET prefetches its
    /// image's blobs; a HEAD only checks (the client may hold the layers already), so it is
    /// remembered for a minute and the client's GET of `d` that may follow prefetches then.
    /// An answer from the cache alone prefetches nothing.
    fn prefetch_unless_head(&self, sel: &Selected, d: &Digest, m: &StoredManifest, head: bool) {
        if head {
            self.prefetch.remember_head(sel, d);
        } else {
            self.prefetch(sel, m);
        }
    }

    /// Whether `sel`'s origin reported at most `ratelimit_reserve` pulls left and was asked
    /// less than [`RATELIMIT_PROBE`] ago (else this request is the probe, and records it).
    fn ratelimit_low(&self, sel: &Selected) -> bool {
        let up = &sel.upstream;
        let low = up
            .ratelimit_remaining()
            .is_some_and(|r| r <= up.config().ratelimit_reserve);
        if !low {
            return false;
        }
        let mut probes = self
            .ratelimit_probes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match probes.get(up.name()) {
            Some(at) if now.duration_since(*at) < RATELIMIT_PROBE => true,
            _ => {
                probes.insert(up.name().to_owned(), now);
                false
            }
        }
    }

    fn stale(
        &self,
        sel: &Selected,
        d: &Digest,
        m: &StoredManifest,
        tier: Tier,
        head: bool,
        why: &UpstreamError,
    ) -> (Response<Body>, CacheResult) {
        tracing::warn!(digest = %d, reason = %why, "origin failed; serving stale manifest");
        self.metrics
            .stale_served
            .with_label_values(&["manifest"])
            .inc();
        (
            sourced(self.respond(sel, d, m, head), tier.into()),
            CacheResult::Stale,
        )
    }

    /// A manifest answer. Every caller holds the origin's evidence that `d` is in `sel`'s
    /// repository (fetched there, a tag mapping of that repository, or a membership the
    /// authorizer checked), so `d` and its parts are recorded as members (one lookup when
    /// already known).
    fn respond(
        &self,
        sel: &Selected,
        d: &Digest,
        m: &StoredManifest,
        head: bool,
    ) -> Response<Body> {
        self.cache().memberships().record_manifest(
            sel.upstream.name(),
            sel.name.as_str(),
            d,
            &m.bytes,
        );
        manifest_response(d, m, head)
    }

    /// Manifest `d` from the shared tier (verified there), if there is one and it holds it.
    async fn shared_manifest(&self, d: &Digest) -> Option<StoredManifest> {
        let shared = self.scale().shared.as_ref()?;
        let (media_type, bytes) = shared.manifest(d).await?;
        Some(StoredManifest { media_type, bytes })
    }

    /// Queues a manifest fetched (and verified) from the origin for the shared tier.
    fn share_manifest(&self, d: &Digest, m: &StoredManifest) {
        if let Some(shared) = &self.scale().shared {
            shared.upload_manifest(d, &m.media_type, m.bytes.clone());
        }
    }

    /// HEAD of a manifest at the origin: the digest it reports now, if it reports one. With
    /// `known` (a mapping being revalidated) whose origin gave an ETag, the HEAD carries
    /// `If-None-Match`, and a `304` means unchanged.
    async fn head_manifest(
        &self,
        sel: &Selected,
        reference: &str,
        accept: &[String],
        known: Option<&TagEntry>,
    ) -> Result<OriginHead, UpstreamError> {
        let mut req = manifest_request(sel, Method::HEAD, reference, accept);
        let etag = known.and_then(|e| e.validity.etag.as_deref());
        if let Some(v) = etag.and_then(|t| HeaderValue::from_str(t).ok()) {
            req.headers.insert(header::IF_NONE_MATCH, v);
        }
        let resp = sel.upstream.send_counted(&self.metrics, &req).await?;
        let not_modified = resp.status() == StatusCode::NOT_MODIFIED && etag.is_some();
        if resp.status() != StatusCode::OK && !not_modified {
            return Err(sel.upstream.status_error(&resp));
        }
        let previous = known.filter(|_| not_modified).map(|e| &e.validity);
        Ok(OriginHead {
            digest: resp
                .headers()
                .get(DIGEST_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            not_modified,
            validity: self.tag_validity(&req, resp.headers(), previous),
        })
    }

    /// What the origin's answer to `req` (a tag's manifest GET or HEAD, or a `304` to a
    /// revalidation of a mapping that held `previous`) says about the mapping: its lifetime from
    /// the caching headers within `[cache]`'s bounds, and its ETag.
    fn tag_validity(
        &self,
        req: &UpstreamRequest,
        headers: &HeaderMap,
        previous: Option<&Validity>,
    ) -> Validity {
        let etag =
            freshness::strong_etag(headers).or_else(|| previous.and_then(|p| p.etag.clone()));
        let lifetime = match previous {
            // A 304 that states no lifetime leaves the one the origin gave before (RFC 9111
            // 4.3.4: the stored headers stay, updated by those the 304 carries).
            Some(p) if !freshness::states_lifetime(headers) => p.lifetime,
            _ => {
                let parts =
                    freshness::request(req.method.clone(), &req.path_and_query, &req.headers);
                let bounds = self.bounds();
                match freshness::grant_of(&parts, headers, &bounds, self.clock().system_now()) {
                    freshness::Grant::Unstated => None,
                    g => Some(g.lifetime(&bounds)),
                }
            }
        };
        Validity { lifetime, etag }
    }

    /// GET of a manifest at the origin, verified: against `expected` when fetched by digest, and
    /// against the origin's Docker-Content-Digest when it sends one. With what the origin said
    /// about keeping it (used for a tag's mapping; a digest's bytes never change).
    async fn fetch_manifest(
        &self,
        sel: &Selected,
        reference: &str,
        accept: &[String],
        expected: Option<&Digest>,
    ) -> Result<(Digest, StoredManifest, Validity), UpstreamError> {
        let req = manifest_request(sel, Method::GET, reference, accept);
        let resp = self.fetch_ok(sel, &req).await?;
        let validity = match expected {
            None => self.tag_validity(&req, resp.headers(), None),
            Some(_) => Validity::default(),
        };
        let claimed: Option<Digest> = resp
            .headers()
            .get(DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|v| !v.is_empty() && v != "application/octet-stream" && v != "text/plain");
        let bytes = sel
            .upstream
            .collect(resp.into_body(), media::MAX_MANIFEST_BYTES)
            .await?;
        let algorithm = expected
            .or(claimed.as_ref())
            .map(|d| d.algorithm())
            .unwrap_or(crate::oci::DigestAlgorithm::Sha256);
        let mut h = Hasher::new(algorithm);
        h.update(&bytes);
        let actual = h.finish();
        for want in [expected, claimed.as_ref()].into_iter().flatten() {
            if want.algorithm() == actual.algorithm() && *want != actual {
                return Err(UpstreamError::DigestMismatch {
                    upstream: sel.upstream.name().to_owned(),
                    expected: want.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        let media_type = content_type
            .or_else(|| media_type_from_json(&bytes))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        Ok((actual, StoredManifest { media_type, bytes }, validity))
    }
}

/// What a HEAD of a manifest told.
struct OriginHead {
    /// The digest the origin reports, if it reports one (a `304` may not).
    digest: Option<Digest>,
    /// The origin answered `304 Not Modified` to the ETag berth held: unchanged.
    not_modified: bool,
    /// Lifetime and ETag for the mapping.
    validity: Validity,
}

fn manifest_request(
    sel: &Selected,
    method: Method,
    reference: &str,
    accept: &[String],
) -> UpstreamRequest {
    let mut headers = HeaderMap::new();
    let values: Vec<&str> = if accept.is_empty() {
        media::DEFAULT_ACCEPT.to_vec()
    } else {
        accept.iter().map(String::as_str).collect()
    };
    for v in values {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.append(header::ACCEPT, v);
        }
    }
    UpstreamRequest {
        method,
        path_and_query: format!("/v2/{}/manifests/{}", sel.name, reference),
        headers,
        scope: format!("repository:{}:pull", sel.name),
        auth: sel.auth.clone(),
    }
}

fn media_type_from_json(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.media_type
}

/// A manifest answer: exact bytes, the origin's media type, digest and length; HEAD alike.
fn manifest_response(d: &Digest, m: &StoredManifest, head: bool) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, m.media_type.as_str())
        .header(header::CONTENT_LENGTH, m.bytes.len())
        .header(DIGEST_HEADER, d.as_str())
        .header(header::ETAG, conditional::etag(d))
        .body(if head {
            body::empty()
        } else {
            body::full(m.bytes.clone())
        })
        .unwrap_or_else(|_| Error::Internal("bad manifest media type".into()).into_response(head))
}

/// Maps "the origin says no such thing" to the spec's code for `kind`; other errors pass.
pub(super) fn not_found_as(e: UpstreamError, kind: &str) -> Error {
    match (&e, kind) {
        (UpstreamError::Offline { upstream }, "blob") => {
            Error::BlobUnknown(format!("blob not in this mirror ({upstream} is offline)"))
        }
        (UpstreamError::Offline { upstream }, _) => Error::ManifestUnknown(format!(
            "manifest not in this mirror ({upstream} is offline)"
        )),
        (_, "blob") if e.is_not_found() => Error::BlobUnknown("blob unknown to the origin".into()),
        (_, _) if e.is_not_found() => {
            Error::ManifestUnknown("manifest unknown to the origin".into())
        }
        // The origin refused the credentials the fetch carried (berth's own, or a client's the
        // authorizer already checked): a 401 without a challenge of berth's would only confuse
        // the client; this is a refusal.
        (UpstreamError::Status { status, .. }, _)
            if *status == http::StatusCode::UNAUTHORIZED
                || *status == http::StatusCode::FORBIDDEN =>
        {
            Error::Denied(format!("the origin refused access ({})", status.as_u16()))
        }
        _ => Error::Upstream(e),
    }
}

pub(super) fn io_err(e: std::io::Error) -> Error {
    Error::Internal(format!("cache: {e}"))
}
