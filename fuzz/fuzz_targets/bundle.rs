//! `berth import` of an air-gap bundle. Each input describes an OCI image layout (blobs stored
//! under their digests, manifests and indexes that refer to them, `index.json` entries with
//! berth's annotations, stray members, and damage done to the finished archive); it is written
//! as a tar file and imported into a fresh cache in a temp dir. Errors are expected; panics are
//! not, a refused bundle leaves the cache empty, and no staged temp file outlives an import.
//! Set `TMPDIR` to a RAM disk: the importer syncs every object it stages.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use berth::bundle::{self, BundleError};
use berth::cache::Cache;
use berth::config::{CacheConfig, Config};
use berth::oci::{media, Digest};
use berth::upstream::Upstreams;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
enum MediaType {
    OciManifest,
    OciIndex,
    DockerManifest,
    DockerList,
    Other(String),
}

impl MediaType {
    fn as_str(&self) -> &str {
        match self {
            MediaType::OciManifest => media::OCI_MANIFEST,
            MediaType::OciIndex => media::OCI_INDEX,
            MediaType::DockerManifest => media::DOCKER_MANIFEST,
            MediaType::DockerList => media::DOCKER_MANIFEST_LIST,
            MediaType::Other(s) => s,
        }
    }
}

/// An image manifest (or, with children, an index). Indexes past the end of the blob or
/// manifest lists name digests that are not in the archive.
#[derive(Arbitrary, Debug)]
struct Manifest {
    media_type: Option<MediaType>,
    config: Option<u8>,
    layers: Vec<u8>,
    children: Vec<u8>,
    /// Written as a single object rather than an array, as some tools do for `config`.
    layers_as_object: bool,
    /// Referred to, but not put in the archive.
    omit: bool,
    /// Replaces the JSON written (the member keeps the digest of what is written).
    raw: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Name {
    /// The upstream the fuzzing config has.
    Configured,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Image {
    manifest: u8,
    media_type: Option<MediaType>,
    upstream: Option<Name>,
    repository: Option<String>,
    tag: Option<String>,
    reference: Option<String>,
    /// Record `io.berth.manifests` (every manifest of the image), as export does.
    list_manifests: bool,
    /// Extra entries for `io.berth.manifests`.
    listed_extra: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Damage {
    Truncate(u16),
    Flip(u16, u8),
    Append(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Layout {
    blobs: Vec<Vec<u8>>,
    manifests: Vec<Manifest>,
    images: Vec<Image>,
    /// Members at arbitrary paths (`blobs/sha256/<not the content's digest>`, `../x`, ...).
    extra: Vec<(String, Vec<u8>)>,
    /// `index.json` as given instead of the one built.
    raw_index: Option<String>,
    no_index: bool,
    /// `./`-prefixed member names, as `tar -C dir .` writes them.
    dot_slash: bool,
    damage: Vec<Damage>,
    pin: bool,
    /// Disk budget in KiB (zero: 1 GiB).
    budget_kib: u16,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime")
    })
}

fn upstreams() -> &'static Upstreams {
    static U: OnceLock<Upstreams> = OnceLock::new();
    U.get_or_init(|| {
        let c = Config::from_toml(
            "[[upstream]]\nname = \"docker.io\"\nurl = \"https://registry-1.docker.io\"\nauth = \"public\"\ndefault = true\n",
        )
        .expect("fuzz config");
        Upstreams::new(&c.upstreams).expect("upstreams")
    })
}

fn absent(i: u8) -> Digest {
    Digest::sha256_of(&[0xff, i])
}

fn descriptor(d: &Digest, size: usize, media_type: Option<&str>) -> Value {
    let mut v = json!({"digest": d.to_string(), "size": size});
    if let Some(m) = media_type {
        v["mediaType"] = m.into();
    }
    v
}

/// The archive's members, in order, and the digest of each manifest.
fn members(l: &Layout) -> (Vec<(String, Vec<u8>)>, Vec<Digest>) {
    let mut out = Vec::new();
    let blobs: Vec<(Digest, usize)> = l
        .blobs
        .iter()
        .map(|b| (Digest::sha256_of(b), b.len()))
        .collect();
    for (b, (d, _)) in l.blobs.iter().zip(&blobs) {
        out.push((format!("blobs/sha256/{}", d.hex()), b.clone()));
    }
    let blob = |i: u8| {
        blobs
            .get(usize::from(i))
            .map_or((absent(i), 1), |(d, n)| (d.clone(), *n))
    };
    let mut manifests: Vec<(Digest, usize, Option<String>)> = Vec::new();
    for m in &l.manifests {
        let mt = m.media_type.as_ref().map(|t| t.as_str().to_owned());
        let mut v = json!({"schemaVersion": 2});
        if let Some(t) = &mt {
            v["mediaType"] = t.clone().into();
        }
        if !m.children.is_empty() {
            let children: Vec<Value> = m
                .children
                .iter()
                .map(|&c| match manifests.get(usize::from(c)) {
                    Some((d, n, t)) => descriptor(d, *n, t.as_deref()),
                    None => descriptor(&absent(c), 2, Some(media::OCI_MANIFEST)),
                })
                .collect();
            v["manifests"] = children.into();
        }
        if let Some(c) = m.config {
            let (d, n) = blob(c);
            v["config"] = descriptor(&d, n, None);
        }
        let layers: Vec<Value> = m
            .layers
            .iter()
            .map(|&i| {
                let (d, n) = blob(i);
                descriptor(&d, n, None)
            })
            .collect();
        v["layers"] = match (m.layers_as_object, layers.first()) {
            (true, Some(first)) => first.clone(),
            _ => layers.into(),
        };
        let bytes = m.raw.clone().unwrap_or_else(|| v.to_string()).into_bytes();
        let d = Digest::sha256_of(&bytes);
        if !m.omit {
            out.push((format!("blobs/sha256/{}", d.hex()), bytes.clone()));
        }
        manifests.push((d, bytes.len(), mt));
    }
    out.extend(l.extra.iter().cloned());
    (out, manifests.into_iter().map(|(d, _, _)| d).collect())
}

fn index_json(l: &Layout, manifests: &[Digest]) -> String {
    if let Some(raw) = &l.raw_index {
        return raw.clone();
    }
    let entries: Vec<Value> = l
        .images
        .iter()
        .map(|img| {
            let top = manifests
                .get(usize::from(img.manifest))
                .cloned()
                .unwrap_or_else(|| absent(img.manifest));
            let mut ann = serde_json::Map::new();
            match &img.upstream {
                Some(Name::Configured) => {
                    ann.insert("io.berth.upstream".into(), "docker.io".into());
                }
                Some(Name::Other(s)) => {
                    ann.insert("io.berth.upstream".into(), s.clone().into());
                }
                None => {}
            }
            for (k, v) in [
                ("io.berth.repository", &img.repository),
                ("org.opencontainers.image.ref.name", &img.tag),
                ("io.berth.reference", &img.reference),
            ] {
                if let Some(v) = v {
                    ann.insert(k.into(), v.clone().into());
                }
            }
            if img.list_manifests || img.listed_extra.is_some() {
                let mut listed = vec![top.to_string()];
                listed.extend(img.listed_extra.clone());
                ann.insert("io.berth.manifests".into(), listed.join(",").into());
            }
            let mut e = descriptor(&top, 2, img.media_type.as_ref().map(MediaType::as_str));
            e["annotations"] = ann.into();
            e
        })
        .collect();
    json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": entries}).to_string()
}

fn archive(l: &Layout) -> Vec<u8> {
    let (mut members, manifests) = members(l);
    if !l.no_index {
        members.insert(
            0,
            ("index.json".into(), index_json(l, &manifests).into_bytes()),
        );
        members.insert(
            0,
            (
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
        );
    }
    let mut tar = tar::Builder::new(Vec::new());
    for (path, bytes) in &members {
        let path = if l.dot_slash {
            format!("./{path}")
        } else {
            path.clone()
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        // Names tar refuses to write (absolute, `..`) are left out of the archive.
        let _ = tar.append_data(&mut h, &path, bytes.as_slice());
    }
    let mut bytes = tar.into_inner().expect("in-memory archive");
    for d in &l.damage {
        match d {
            Damage::Truncate(n) => {
                let keep = bytes.len().saturating_sub(usize::from(*n));
                bytes.truncate(keep);
            }
            Damage::Flip(at, x) => {
                if !bytes.is_empty() {
                    let i = usize::from(*at) % bytes.len();
                    bytes[i] ^= x | 1;
                }
            }
            Damage::Append(more) => bytes.extend_from_slice(more),
        }
    }
    bytes
}

fn stored_objects(dir: &std::path::Path) -> usize {
    ["blobs", "manifests"]
        .iter()
        .map(|k| count_files(&dir.join(k)))
        .sum()
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    count_files(&p)
                } else {
                    1
                }
            })
            .sum()
    })
}

fuzz_target!(|l: Layout| {
    let bytes = archive(&l);
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle_path = dir.path().join("bundle.tar");
    std::fs::write(&bundle_path, &bytes).expect("write bundle");
    let cfg = CacheConfig {
        dir: dir.path().join("cache"),
        disk_bytes: match l.budget_kib {
            0 => 1 << 30,
            k => u64::from(k) << 10,
        },
        memory_bytes: 1 << 20,
        memory_max_object_bytes: 64 << 10,
        tag_ttl: std::time::Duration::from_secs(300),
        tag_ttl_min: std::time::Duration::ZERO,
        tag_ttl_max: std::time::Duration::from_secs(86_400),
        max_concurrent_fills: 64,
        fill_queue_timeout: std::time::Duration::from_secs(60),
        shared: None,
    };
    let cache = Cache::open(&cfg).expect("fresh cache");
    let result = runtime().block_on(bundle::import(&cache, upstreams(), &bundle_path, l.pin));
    assert_eq!(
        count_files(&cfg.dir.join("tmp")),
        0,
        "staged files left behind after {result:?}"
    );
    match result {
        Ok(report) => {
            assert!(report.images >= 1 && report.manifests >= 1, "{report:?}");
            assert!(stored_objects(&cfg.dir) >= 1);
        }
        Err(BundleError::Corrupt(_)) => {
            assert_eq!(
                stored_objects(&cfg.dir),
                0,
                "a refused bundle changed the cache: {result:?}"
            );
        }
        Err(_) => {}
    }
});
