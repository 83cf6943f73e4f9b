//! Peers on this machine (docs/ARCHITECTURE.md, "Scale-out", "Peers"): what the origin sends
//! when N nodes pull one image through one berth, three lone berths, or three clustered
//! replicas; and how soon the first byte of a 4 MiB blob arrives from a peer compared with the
//! local disk (and a cold fill from the origin, for scale).
//!
//! Real servers: a `docker-registry` origin, berth replicas in process (each on its own
//! runtime, as in `tests/cluster.rs`). Plain HTTP on loopback; figures are relative.
//!
//! `cargo bench --bench cluster`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::berth::{Berth, BerthBuilder};
use common::cluster::TestCluster;
use common::content::{pseudo_random, push_blob, sha256_digest};
use common::{push_oci_image, Registry, TestImage};

const MIB: usize = 1 << 20;
/// The image every node pulls: 24 MiB in four layers.
const LAYERS: [usize; 4] = [8 * MIB, 8 * MIB, 4 * MIB, 4 * MIB];
/// Nodes pulling at once.
const NODES: [usize; 2] = [3, 6];
/// TTFB samples per source.
const SAMPLES: usize = 20;
/// The blob size of the TTFB samples.
const TTFB_BLOB: usize = 4 * MIB;

fn replica(origin: &str) -> BerthBuilder {
    Berth::in_front_of(origin).memory_max_object("0")
}

/// Pulls `img` (manifest and blobs, bodies drained and checked) through `url`.
async fn pull(client: &reqwest::Client, url: &str, img: &TestImage) {
    let m = client
        .get(format!("{url}/v2/{}/manifests/{}", img.repo, img.tag))
        .header("accept", common::content::OCI_MANIFEST)
        .send()
        .await
        .expect("manifest");
    assert!(m.status().is_success(), "manifest {}", m.status());
    for (digest, _) in img.blobs() {
        let body = client
            .get(format!("{url}/v2/{}/blobs/{digest}", img.repo))
            .send()
            .await
            .expect("blob")
            .bytes()
            .await
            .expect("blob body");
        assert_eq!(sha256_digest(&body), digest);
    }
}

/// Bytes the origin sent to `berths`, together.
async fn origin_bytes(berths: &[&Berth]) -> f64 {
    let mut sum = 0.0;
    for b in berths {
        sum += b
            .metric("berth_upstream_bytes_total{upstream=\"origin\"}")
            .await;
    }
    sum
}

/// N nodes pull `img` at once, node i through `urls[i % urls.len()]`; the wall time.
async fn nodes_pull(urls: &[String], img: &TestImage, nodes: usize) -> Duration {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let pulls = (0..nodes).map(|i| {
        let (client, url) = (client.clone(), urls[i % urls.len()].clone());
        async move { pull(&client, &url, img).await }
    });
    futures_util::future::join_all(pulls).await;
    started.elapsed()
}

struct Row {
    setup: &'static str,
    nodes: usize,
    ratio: f64,
    wall: Duration,
}

async fn origin_bytes_rows(registry: &Registry) -> Vec<Row> {
    let mut rows = Vec::new();
    let image_bytes: usize = LAYERS.iter().sum();
    for nodes in NODES {
        for setup in ["1 replica", "3 lone replicas", "3 clustered"] {
            // A fresh image per run: every setup starts cold.
            let seed = 100 + rows.len() as u64;
            let tag = format!("s{seed}");
            let img = push_oci_image(&registry.url(), "bench/app", &tag, &LAYERS, seed).await;
            let (bytes, wall) = match setup {
                "1 replica" => {
                    let b = replica(&registry.url()).start().await;
                    let wall = nodes_pull(&[b.url()], &img, nodes).await;
                    (origin_bytes(&[&b]).await, wall)
                }
                "3 lone replicas" => {
                    let mut bs = Vec::new();
                    for _ in 0..3 {
                        bs.push(replica(&registry.url()).start().await);
                    }
                    let urls: Vec<String> = bs.iter().map(Berth::url).collect();
                    let wall = nodes_pull(&urls, &img, nodes).await;
                    let refs: Vec<&Berth> = bs.iter().collect();
                    (origin_bytes(&refs).await, wall)
                }
                _ => {
                    let c = TestCluster::start(3, || replica(&registry.url()), &[]).await;
                    let urls: Vec<String> = c.replicas.iter().map(|r| r.url()).collect();
                    let wall = nodes_pull(&urls, &img, nodes).await;
                    let refs: Vec<&Berth> = c.replicas.iter().map(|r| r.berth()).collect();
                    (origin_bytes(&refs).await, wall)
                }
            };
            rows.push(Row {
                setup,
                nodes,
                ratio: bytes / image_bytes as f64,
                wall,
            });
        }
    }
    rows
}

/// Time to the first body byte of GET `url`, the body then drained.
async fn ttfb(client: &reqwest::Client, url: &str) -> Duration {
    let started = Instant::now();
    let mut resp = client.get(url).send().await.expect("blob");
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let first = resp.chunk().await.expect("first chunk");
    let t = started.elapsed();
    assert!(first.is_some());
    while resp.chunk().await.expect("chunk").is_some() {}
    t
}

fn quantiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[(v.len() * 9 / 10).min(v.len() - 1)])
}

/// TTFB of 4 MiB blobs: from the owner replica (the asking replica has none), from the local
/// disk, and cold from the origin.
async fn ttfb_rows(registry: &Registry) -> Vec<(&'static str, Duration, Duration)> {
    let c = TestCluster::start(2, || replica(&registry.url()), &[]).await;
    let (a, b) = (&c.replicas[0], &c.replicas[1]);
    let repo = "bench/ttfb";
    // Blobs owned by B (served to A by its peer) and by A (cold fills at A).
    let (mut by_b, mut by_a) = (Vec::new(), Vec::new());
    let mut seed = 1_000u64;
    while by_b.len() < SAMPLES || by_a.len() < SAMPLES {
        seed += 1;
        let bytes = pseudo_random(seed, TTFB_BLOB);
        let digest = sha256_digest(&bytes);
        let owner = c.owner(&digest);
        let list = if owner == 1 { &mut by_b } else { &mut by_a };
        if list.len() < SAMPLES {
            push_blob(&registry.url(), repo, &bytes).await;
            list.push(digest);
        }
    }
    let client = reqwest::Client::new();
    let url = |r: &Berth, d: &str| format!("{}/v2/{repo}/blobs/{d}", r.url());
    // Warm B's disk, and settle its fills.
    for d in &by_b {
        ttfb(&client, &url(b, d)).await;
    }
    b.app().cache().fills().all_settled().await;
    let mut peer = Vec::new();
    let mut disk = Vec::new();
    let mut origin = Vec::new();
    for d in &by_b {
        peer.push(ttfb(&client, &url(a, d)).await);
        disk.push(ttfb(&client, &url(b, d)).await);
    }
    for d in &by_a {
        origin.push(ttfb(&client, &url(a, d)).await);
    }
    let (pm, p9) = quantiles(peer);
    let (dm, d9) = quantiles(disk);
    let (om, o9) = quantiles(origin);
    vec![
        ("local disk", dm, d9),
        ("peer (owner's disk)", pm, p9),
        ("origin (cold fill)", om, o9),
    ]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let registry = Registry::start().await;
        let started = Instant::now();
        let rows = origin_bytes_rows(&registry).await;
        println!("\nOrigin bytes per image pulled by N nodes (image: 24 MiB in 4 layers + config)");
        println!("| setup           | nodes | origin bytes / image | wall time |");
        println!("|-----------------|-------|----------------------|-----------|");
        for r in rows {
            println!(
                "| {:<15} | {:>5} | {:>20.2} | {:>7.0} ms |",
                r.setup,
                r.nodes,
                r.ratio,
                r.wall.as_secs_f64() * 1000.0
            );
        }
        let ttfb = ttfb_rows(&registry).await;
        println!("\nTime to first byte of a 4 MiB blob ({SAMPLES} samples each)");
        println!("| source              | median    | p90       |");
        println!("|---------------------|-----------|-----------|");
        for (what, median, p90) in ttfb {
            println!(
                "| {what:<19} | {:>6.2} ms | {:>6.2} ms |",
                median.as_secs_f64() * 1000.0,
                p90.as_secs_f64() * 1000.0
            );
        }
        println!("\n(total {:.1} s)", started.elapsed().as_secs_f64());
    });
}
