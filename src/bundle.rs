//! `berth export` / `berth import`: carry cached images into an air-gapped site as an OCI image
//! layout archive (readable by other tools too: `skopeo inspect oci-archive:BUNDLE`).
//!
//! Layout: `oci-layout`, `index.json` (one entry per image; `org.opencontainers.image.ref.name`
//! is the tag, `io.berth.*` annotations record the upstream, repository and reference), and
//! `blobs/<alg>/<hex>` for every manifest and blob. Import verifies every digest while it
//! stages the objects in the cache's temp directory, checks that each image is complete, and
//! only then moves anything into the cache: a corrupt or truncated bundle changes nothing.
//!
//! Architecture: docs/ARCHITECTURE.md, "Commands".

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cache::{accept_key, Cache, PinnedImage, StoredManifest, TagKey};
use crate::oci::{media, Digest, Hasher, ImageRef};
use crate::upstream::Upstreams;

/// Largest `index.json` or `oci-layout` accepted.
const MAX_METADATA: u64 = 16 << 20;
/// Annotation: the upstream an image came from.
const ANN_UPSTREAM: &str = "io.berth.upstream";
/// Annotation: the repository at that upstream.
const ANN_REPOSITORY: &str = "io.berth.repository";
/// Annotation: the reference as given to export.
const ANN_REFERENCE: &str = "io.berth.reference";
/// Annotation: every manifest of the image the archive holds (an index may list platforms that
/// were never warmed; these are the ones that must be present).
const ANN_MANIFESTS: &str = "io.berth.manifests";
/// The OCI ref name annotation (the tag).
const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A reference could not be resolved from the cache.
    #[error("{0}")]
    NotCached(String),
    /// The bundle is damaged or incomplete.
    #[error("bundle refused: {0}")]
    Corrupt(String),
    /// The cache cannot take the bundle.
    #[error("{0}")]
    NoRoom(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What an export or import moved.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Images.
    pub images: usize,
    /// Manifests.
    pub manifests: usize,
    /// Blobs.
    pub blobs: usize,
    /// Bytes of manifests and blobs.
    pub bytes: u64,
}

/// One image to export: its top manifest and everything present under it.
struct Selection {
    reference: String,
    upstream: String,
    repository: String,
    tag: Option<String>,
    top: Digest,
    manifests: Vec<Digest>,
    blobs: Vec<Digest>,
}

fn manifest_json(m: &StoredManifest) -> Value {
    serde_json::from_slice(&m.bytes).unwrap_or(Value::Null)
}

fn digests_of(v: &Value, field: &str) -> Vec<Digest> {
    match v.get(field) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|d| d.get("digest")?.as_str()?.parse().ok())
            .collect(),
        Some(o @ Value::Object(_)) => o
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// Walks an image from its top manifest: children of an index that are in the cache (platforms
/// not warmed are left out), and every blob of each image manifest (all must be cached).
fn walk(
    cache: &Cache,
    top: &Digest,
    reference: &str,
) -> Result<(Vec<Digest>, Vec<Digest>), BundleError> {
    let missing =
        |what: String| BundleError::NotCached(format!("{reference}: {what} is not in the cache"));
    let (m, _) = cache
        .manifest(top)?
        .ok_or_else(|| missing(format!("manifest {top}")))?;
    let json = manifest_json(&m);
    let mut manifests = vec![top.clone()];
    let mut images = vec![json.clone()];
    for child in digests_of(&json, "manifests") {
        if let Some((cm, _)) = cache.manifest(&child)? {
            manifests.push(child);
            images.push(manifest_json(&cm));
        }
    }
    if images.len() == 1 && json.get("manifests").is_some() {
        return Err(missing("every platform of the index".into()));
    }
    let mut blobs = Vec::new();
    for img in &images {
        for d in digests_of(img, "config")
            .into_iter()
            .chain(digests_of(img, "layers"))
        {
            if !cache.store().has_blob(&d) {
                return Err(missing(format!("blob {d}")));
            }
            if !blobs.contains(&d) {
                blobs.push(d);
            }
        }
    }
    Ok((manifests, blobs))
}

/// Writes the selected images (or, with none given, every pinned image) to `out`.
pub fn export(
    cache: &Cache,
    upstreams: &Upstreams,
    refs: &[String],
    out: &Path,
) -> Result<Report, BundleError> {
    let mut selections = Vec::new();
    if refs.is_empty() {
        for p in cache.pinned_images() {
            let top: Digest = p
                .manifest
                .parse()
                .map_err(|_| BundleError::NotCached(format!("{}: bad pin record", p.reference)))?;
            let (manifests, blobs) = walk(cache, &top, &p.reference)?;
            selections.push(Selection {
                reference: p.reference,
                upstream: p.upstream,
                repository: p.repository,
                tag: p.tag,
                top,
                manifests,
                blobs,
            });
        }
        if selections.is_empty() {
            return Err(BundleError::NotCached(
                "no images given and none are pinned".into(),
            ));
        }
    }
    for r in refs {
        let image: ImageRef = r
            .parse()
            .map_err(|e| BundleError::NotCached(format!("{r}: {e}")))?;
        let sel = upstreams
            .select(image.host.as_deref(), image.repo.clone())
            .map_err(|e| BundleError::NotCached(format!("{r}: {e}")))?;
        let top = match (&image.digest, &image.tag) {
            // A digest is exported under a repository only with the origin's evidence that the
            // repository holds it: the bundle's annotations are evidence at the other end.
            (Some(d), _)
                if !cache
                    .memberships()
                    .contains(sel.upstream.name(), sel.name.as_str(), d) =>
            {
                return Err(BundleError::NotCached(format!(
                    "{r}: {} at {} was never shown to hold {d} (pull or warm it through berth first)",
                    sel.name,
                    sel.upstream.name()
                )));
            }
            (Some(d), _) => d.clone(),
            (None, Some(tag)) => {
                let key = TagKey {
                    upstream: sel.upstream.name().to_owned(),
                    repo: sel.name.clone(),
                    tag: tag.clone(),
                    accept: String::new(),
                };
                cache
                    .tags()
                    .get(&key)
                    .or_else(|| cache.tags().any_acceptable(&key, &[]))
                    .ok_or_else(|| {
                        BundleError::NotCached(format!("{r}: tag {tag} is not in the cache"))
                    })?
                    .digest
            }
            (None, None) => unreachable!("an image reference has a tag or a digest"),
        };
        let (manifests, blobs) = walk(cache, &top, r)?;
        selections.push(Selection {
            reference: r.clone(),
            upstream: sel.upstream.name().to_owned(),
            repository: sel.name.to_string(),
            tag: image.tag.as_ref().map(|t| t.to_string()),
            top,
            manifests,
            blobs,
        });
    }
    let temp = out.with_extension("partial");
    let result = write_archive(cache, &selections, &temp);
    match result {
        Ok(report) => {
            std::fs::rename(&temp, out)?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

fn write_archive(
    cache: &Cache,
    selections: &[Selection],
    path: &Path,
) -> Result<Report, BundleError> {
    let file = File::create(path)?;
    let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
    let mut report = Report::default();
    let mut entries = Vec::new();
    for s in selections {
        let (m, _) = cache
            .manifest(&s.top)?
            .ok_or_else(|| BundleError::NotCached(format!("manifest {}", s.top)))?;
        let mut annotations = serde_json::Map::new();
        annotations.insert(
            ANN_REF_NAME.into(),
            s.tag.clone().unwrap_or_else(|| s.reference.clone()).into(),
        );
        annotations.insert(ANN_REFERENCE.into(), s.reference.clone().into());
        annotations.insert(ANN_UPSTREAM.into(), s.upstream.clone().into());
        annotations.insert(ANN_REPOSITORY.into(), s.repository.clone().into());
        annotations.insert(
            ANN_MANIFESTS.into(),
            s.manifests
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        );
        entries.push(json!({
            "mediaType": m.media_type,
            "digest": s.top.to_string(),
            "size": m.bytes.len(),
            "annotations": annotations,
        }));
    }
    let index = json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": entries});
    append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    append_bytes(&mut tar, "index.json", index.to_string().as_bytes())?;
    let mut written = BTreeSet::new();
    for s in selections {
        report.images += 1;
        for d in &s.manifests {
            if written.insert(d.clone()) {
                let (m, _) = cache
                    .manifest(d)?
                    .ok_or_else(|| BundleError::NotCached(format!("manifest {d}")))?;
                append_bytes(&mut tar, &blob_path(d), &m.bytes)?;
                report.manifests += 1;
                report.bytes += m.bytes.len() as u64;
            }
        }
        for d in &s.blobs {
            if written.insert(d.clone()) {
                let (mut f, len) = cache.store().open_blob(d)?.ok_or_else(|| {
                    BundleError::NotCached(format!("blob {d} was evicted during the export"))
                })?;
                let mut header = tar::Header::new_ustar();
                header.set_size(len);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, blob_path(d), &mut f)?;
                report.blobs += 1;
                report.bytes += len;
            }
        }
    }
    let mut w = tar.into_inner()?;
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(report)
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, path, bytes)
}

/// Objects staged from a bundle: verified, in the cache's temp directory, not yet committed.
struct Staged {
    files: BTreeMap<Digest, (PathBuf, u64)>,
    index: Option<Vec<u8>>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (p, _) in self.files.values() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Whether a file ends the way a tar archive must: whole 512-byte blocks, the last two of them
/// zero. An archive cut at an entry boundary reads as a shorter valid archive otherwise.
fn ends_like_tar(file: &mut File) -> io::Result<bool> {
    use std::io::{Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len < 1024 || len % 512 != 0 {
        return Ok(false);
    }
    let mut tail = [0u8; 1024];
    file.seek(SeekFrom::Start(len - 1024))?;
    file.read_exact(&mut tail)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(tail.iter().all(|&b| b == 0))
}

/// Reads and verifies every object of the bundle into temp files.
fn stage(cache: &Cache, bundle: &Path) -> Result<Staged, BundleError> {
    let mut file = File::open(bundle)?;
    if !ends_like_tar(&mut file)? {
        return Err(corrupt(
            "the archive is truncated (it does not end with tar's end-of-archive blocks)".into(),
        ));
    }
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
    let mut staged = Staged {
        files: BTreeMap::new(),
        index: None,
    };
    let entries = archive
        .entries()
        .map_err(|e| corrupt(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(format!("unreadable entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| corrupt(format!("bad entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let path = path.trim_start_matches("./").to_owned();
        if path == "index.json" {
            let mut buf = Vec::new();
            (&mut entry)
                .take(MAX_METADATA)
                .read_to_end(&mut buf)
                .map_err(|e| corrupt(format!("index.json: {e}")))?;
            staged.index = Some(buf);
            continue;
        }
        let Some(rest) = path.strip_prefix("blobs/") else {
            continue;
        };
        let Some((alg, hex)) = rest.split_once('/') else {
            continue;
        };
        let digest: Digest = format!("{alg}:{hex}")
            .parse()
            .map_err(|_| corrupt(format!("{path}: not a digest")))?;
        let declared = entry
            .header()
            .size()
            .map_err(|e| corrupt(format!("{path}: {e}")))?;
        let (mut out, temp) = cache.store().temp_file()?;
        // Record before writing so the temp file is removed whatever happens next. A repeated
        // member replaces the copy staged before it (as tar extraction does): remove that file.
        if let Some((earlier, _)) = staged.files.insert(digest.clone(), (temp, declared)) {
            let _ = std::fs::remove_file(earlier);
        }
        let mut hasher = Hasher::new(digest.algorithm());
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| corrupt(format!("{path}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            got += n as u64;
        }
        if got != declared {
            return Err(corrupt(format!(
                "{path}: truncated ({got} of {declared} bytes)"
            )));
        }
        if hasher.finish() != digest {
            return Err(corrupt(format!(
                "{path}: content does not match its digest"
            )));
        }
        out.sync_all()?;
    }
    if staged.index.is_none() {
        return Err(corrupt(
            "no index.json (not an OCI image layout, or truncated)".into(),
        ));
    }
    Ok(staged)
}

/// Loads a bundle into the cache; pins its images if asked. Nothing is committed unless every
/// object verified and every image is complete.
pub async fn import(
    cache: &Cache,
    upstreams: &Upstreams,
    bundle: &Path,
    pin: bool,
) -> Result<Report, BundleError> {
    let staged = tokio::task::block_in_place(|| stage(cache, bundle))?;
    let plan = Plan::of(&staged)?;
    plan.check_room(cache, &staged, pin)?;
    // Everything verified: commit.
    let mut report = plan.commit_objects(cache, &staged).await?;
    for image in &plan.images {
        report.images += 1;
        plan.record_image(cache, upstreams, image, pin)?;
    }
    Ok(report)
}

/// One image of a bundle's index, as the import records it.
struct ImportedImage {
    /// The digest `index.json` names (an index or a manifest).
    top: Digest,
    upstream: Option<String>,
    repository: Option<String>,
    tag: Option<String>,
    /// The reference it was exported as.
    reference: Option<String>,
    /// `top` and the platform manifests present.
    manifests: Vec<Digest>,
    /// Configs and layers.
    blobs: Vec<Digest>,
}

/// What a staged bundle holds, checked complete: every manifest (with its media type), every
/// blob, and the images that name them.
struct Plan {
    manifests: BTreeMap<Digest, String>,
    blobs: BTreeSet<Digest>,
    images: Vec<ImportedImage>,
}

/// A bundle that is not what it should be (truncated, incomplete, not an image layout).
fn corrupt(m: String) -> BundleError {
    BundleError::Corrupt(m)
}

/// A staged file's bytes; a digest the bundle references but does not hold is corruption.
fn read_staged(staged: &Staged, d: &Digest) -> Result<Vec<u8>, BundleError> {
    let (p, _) = staged
        .files
        .get(d)
        .ok_or_else(|| corrupt(format!("{d} is referenced but missing")))?;
    Ok(std::fs::read(p)?)
}

/// A manifest's `mediaType`, else `fallback`, else the OCI manifest type.
fn media_type_of(v: &Value, fallback: Option<&str>) -> String {
    v.get("mediaType")
        .and_then(|m| m.as_str())
        .or(fallback)
        .unwrap_or(media::OCI_MANIFEST)
        .to_owned()
}

impl Plan {
    /// Walks every image of `index.json`: manifests and blobs, all present.
    fn of(staged: &Staged) -> Result<Plan, BundleError> {
        let index: Value = serde_json::from_slice(staged.index.as_deref().unwrap_or_default())
            .map_err(|e| corrupt(format!("index.json: {e}")))?;
        let entries = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        if entries.is_empty() {
            return Err(corrupt("index.json lists no images".into()));
        }
        let mut plan = Plan {
            manifests: BTreeMap::new(),
            blobs: BTreeSet::new(),
            images: Vec::new(),
        };
        for e in &entries {
            let image = plan.walk(staged, e)?;
            plan.images.push(image);
        }
        Ok(plan)
    }

    /// One `index.json` entry: its manifest, the platforms present and their blobs.
    fn walk(&mut self, staged: &Staged, e: &Value) -> Result<ImportedImage, BundleError> {
        let top: Digest = e
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| corrupt("index.json entry without a digest".into()))?;
        let top_json: Value = serde_json::from_slice(&read_staged(staged, &top)?)
            .map_err(|_| corrupt(format!("{top} is not a manifest")))?;
        self.manifests.insert(
            top.clone(),
            media_type_of(&top_json, e.get("mediaType").and_then(|m| m.as_str())),
        );
        let ann = |k: &str| {
            e.get("annotations")
                .and_then(|a| a.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        if let Some(listed) = ann(ANN_MANIFESTS) {
            let listed = listed.split(',').filter_map(|d| d.parse::<Digest>().ok());
            if let Some(missing) = listed.into_iter().find(|d| !staged.files.contains_key(d)) {
                return Err(corrupt(format!("manifest {missing} of {top} is missing")));
            }
        }
        let mut image_manifests = vec![top.clone()];
        let mut image_blobs = Vec::new();
        let children = digests_of(&top_json, "manifests");
        if !children.is_empty() && !children.iter().any(|c| staged.files.contains_key(c)) {
            return Err(corrupt(format!(
                "the index {top} has none of its platforms in the archive"
            )));
        }
        let mut to_walk = vec![top_json];
        for child in children {
            // Platforms not exported are legitimately absent.
            if staged.files.contains_key(&child) {
                let j: Value = serde_json::from_slice(&read_staged(staged, &child)?)
                    .map_err(|_| corrupt(format!("{child} is not a manifest")))?;
                self.manifests
                    .insert(child.clone(), media_type_of(&j, None));
                image_manifests.push(child);
                to_walk.push(j);
            }
        }
        for m in &to_walk {
            for d in digests_of(m, "config")
                .into_iter()
                .chain(digests_of(m, "layers"))
            {
                if !staged.files.contains_key(&d) {
                    return Err(corrupt(format!("blob {d} of {top} is missing")));
                }
                self.blobs.insert(d.clone());
                image_blobs.push(d);
            }
        }
        Ok(ImportedImage {
            top,
            upstream: ann(ANN_UPSTREAM),
            repository: ann(ANN_REPOSITORY),
            tag: ann(ANN_REF_NAME),
            reference: ann(ANN_REFERENCE),
            manifests: image_manifests,
            blobs: image_blobs,
        })
    }

    /// Refuses a bundle the disk budget cannot hold beside what is pinned (or, with `pin`, that
    /// would push the pinned total past the budget).
    fn check_room(&self, cache: &Cache, staged: &Staged, pin: bool) -> Result<(), BundleError> {
        let total: u64 = self
            .blobs
            .iter()
            .chain(self.manifests.keys())
            .map(|d| staged.files.get(d).map_or(0, |(_, s)| *s))
            .sum();
        let usage = cache.index().usage();
        let budget = cache.index().budget();
        if total > budget.saturating_sub(usage.pinned) || (pin && usage.pinned + total > budget) {
            return Err(BundleError::NoRoom(format!(
                "the bundle holds {total} bytes; the disk budget is {budget} bytes with {} pinned (raise cache.disk_bytes)",
                usage.pinned
            )));
        }
        Ok(())
    }

    /// Puts every manifest and adopts every staged blob into the cache.
    async fn commit_objects(&self, cache: &Cache, staged: &Staged) -> Result<Report, BundleError> {
        let mut report = Report::default();
        for (d, media_type) in &self.manifests {
            let bytes = read_staged(staged, d)?;
            report.bytes += bytes.len() as u64;
            report.manifests += 1;
            cache
                .put_manifest(
                    d,
                    StoredManifest {
                        media_type: media_type.clone(),
                        bytes: bytes.into(),
                    },
                )
                .await?;
        }
        for d in &self.blobs {
            let (temp, size) = staged.files.get(d).cloned().expect("checked above");
            report.blobs += 1;
            report.bytes += size;
            tokio::task::block_in_place(|| cache.adopt_blob(&temp, d, size))?;
        }
        Ok(report)
    }

    /// The bundle's evidence for one image (membership in its repository, its tag mapping)
    /// where its upstream is configured here, and its pin if asked.
    fn record_image(
        &self,
        cache: &Cache,
        upstreams: &Upstreams,
        image: &ImportedImage,
        pin: bool,
    ) -> Result<(), BundleError> {
        let (Some(upstream), Some(repository)) = (&image.upstream, &image.repository) else {
            return Ok(());
        };
        // This repository of this upstream holds these objects. Only what the bundle lists is
        // recorded (an index's platforms left out of the bundle are not).
        if upstreams.by_name(upstream).is_some() {
            let members = cache.memberships();
            for d in std::iter::once(&image.top)
                .chain(image.manifests.iter())
                .chain(image.blobs.iter())
            {
                members.record(upstream, repository, d);
            }
            if let (Some(tag), Ok(repo)) = (&image.tag, repository.parse()) {
                if let Ok(tag) = tag.parse() {
                    let key = TagKey {
                        upstream: upstream.clone(),
                        repo,
                        tag,
                        accept: accept_key(
                            &media::DEFAULT_ACCEPT
                                .iter()
                                .map(|s| s.to_string())
                                .collect::<Vec<_>>(),
                        ),
                    };
                    cache.tags().put(
                        &key,
                        image.top.clone(),
                        self.manifests.get(&image.top).cloned().unwrap_or_default(),
                    );
                }
            }
        }
        if pin {
            cache
                .pin_image(PinnedImage {
                    reference: image
                        .reference
                        .clone()
                        .unwrap_or_else(|| image.top.to_string()),
                    upstream: upstream.clone(),
                    repository: repository.clone(),
                    tag: image.tag.clone(),
                    manifest: image.top.to_string(),
                    manifests: image.manifests.iter().map(|d| d.to_string()).collect(),
                    blobs: image.blobs.iter().map(|d| d.to_string()).collect(),
                })
                .map_err(|e| BundleError::NoRoom(e.to_string()))?;
        }
        Ok(())
    }
}
