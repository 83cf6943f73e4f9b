//! Manifest-driven prefetch (docs/ARCHITECTURE.md, "Prefetch"): a cold pull of an image of
//! `LAYERS` × `LAYER_MIB` MiB by containerd (`ctr images pull --max-concurrent-downloads 3`, the
//! CRI plugin's default that kubelet pulls get; and ctr 1.6's own default, no limit) and by
//! skopeo (`skopeo copy` to a directory, one blob at a time), straight from the origin and
//! through berth with and without prefetch, in the same run. The origin sits behind a paced link (benches/load/
//! ratelink.rs, in process): each connection gets `RATE_MIB` MiB/s, as CDNs shape single flows.
//! The link counts the bytes the origin sent, so extra origin traffic would show.
//!
//! Real servers and clients: a `docker-registry` origin, berth in process on a fresh cache for
//! every pull, a fresh containerd (native snapshotter, private root) for every ctr pull. Needs
//! root (containerd), `docker-registry`, `containerd`, `ctr` and `skopeo`.
//!
//! `cargo bench --bench prefetch` (knobs: `PREFETCH_RUNS`, default 3; `PREFETCH_RATE_MIB`,
//! default 50; `PREFETCH_LAYERS`, default 12; `PREFETCH_LAYER_MIB`, default 32;
//! `PREFETCH_PER_IMAGE`, default berth's `prefetch.per_image`)

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "load/ratelink.rs"]
mod ratelink;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::berth::Berth;
use common::containerd::Containerd;
use common::{push_oci_image, require_binary, Registry, TestImage};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// berth's `[prefetch]` section: on or off, and `PREFETCH_PER_IMAGE` when set.
fn prefetch_section(enabled: bool) -> String {
    let mut s = format!("[prefetch]\nenabled = {enabled}\n");
    if let Ok(n) = std::env::var("PREFETCH_PER_IMAGE") {
        s.push_str(&format!("per_image = {n}\n"));
    }
    s
}

/// A pull's wall times and the bytes the origin sent during it.
#[derive(Debug, Clone, Copy)]
struct Pulled {
    /// Until every blob was in.
    fetch: f64,
    /// Until the client was done.
    total: f64,
    origin_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Client {
    /// `ctr images pull --max-concurrent-downloads 3` (the CRI plugin's default).
    Ctr3,
    /// `ctr images pull` (containerd 1.6's ctr: no limit).
    CtrUnlimited,
    Skopeo,
}

impl Client {
    fn label(self) -> &'static str {
        match self {
            Client::Ctr3 => "ctr, 3 downloads at a time",
            Client::CtrUnlimited => "ctr, no download limit",
            Client::Skopeo => "skopeo copy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Direct,
    Berth {
        prefetch: bool,
    },
    /// A berth that holds the whole image already: what the client itself costs.
    Warm,
}

/// The paced link in front of the origin, counting what it sends back.
struct Link {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    async fn start(target: SocketAddr, rate: f64) -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(ratelink::run(listener, target, rate, sent.clone()));
        Link { addr, sent, task }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs a client to success; returns its standard output.
async fn run(cmd: &mut tokio::process::Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .expect("client runs");
    assert!(
        out.status.success(),
        "{:?} failed:\n{}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The download phase of a `ctr images pull`: its last `elapsed: 3.2 s` progress line (printed
/// when every blob is in, before unpacking).
fn ctr_fetch_secs(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("elapsed:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

/// One cold pull of `img` by `client`, from `host` (plain HTTP): seconds until every blob was
/// in, and until the client was done (ctr then unpacks with the native snapshotter, which
/// copies the growing root file system once per layer: the same work in every column).
async fn pull(client: Client, host: &str, img: &TestImage) -> (f64, f64) {
    let reference = format!("{host}/{}:{}", img.repo, img.tag);
    match client {
        Client::Ctr3 | Client::CtrUnlimited => {
            let containerd = Containerd::start().await;
            let mut cmd = containerd.ctr();
            cmd.args(["images", "pull", "--plain-http", "--snapshotter", "native"]);
            if client == Client::Ctr3 {
                cmd.args(["--max-concurrent-downloads", "3"]);
            }
            let t = Instant::now();
            let out = run(cmd.arg(&reference)).await;
            let total = t.elapsed().as_secs_f64();
            let fetch = ctr_fetch_secs(&out).expect("ctr prints its elapsed time");
            (fetch, total)
        }
        Client::Skopeo => {
            let dir = tempfile::tempdir().unwrap();
            let t = Instant::now();
            run(tokio::process::Command::new("skopeo")
                .args([
                    "--insecure-policy",
                    "copy",
                    "--src-tls-verify=false",
                    &format!("docker://{reference}"),
                ])
                .arg(format!("dir:{}", dir.path().join("img").display())))
            .await;
            let total = t.elapsed().as_secs_f64();
            (total, total)
        }
    }
}

async fn measure(client: Client, via: Via, link: &Link, img: &TestImage) -> Pulled {
    let mut before = link.sent.load(Ordering::Relaxed);
    let (fetch, total) = match via {
        Via::Direct => pull(client, &link.addr.to_string(), img).await,
        Via::Warm => {
            let berth = Berth::in_front_of(&format!("http://{}", link.addr))
                .memory_max_object("0")
                .start()
                .await;
            common::pull_and_verify(&berth.url(), img).await;
            berth.settle().await;
            before = link.sent.load(Ordering::Relaxed);
            let secs = pull(client, &berth.host(), img).await;
            berth.stop().await;
            secs
        }
        Via::Berth { prefetch } => {
            let berth = Berth::in_front_of(&format!("http://{}", link.addr))
                .memory_max_object("0")
                .extra(&prefetch_section(prefetch))
                .start()
                .await;
            let secs = pull(client, &berth.host(), img).await;
            // Let the prefetch finish (it has, when the client has every blob) before the
            // origin bytes are read.
            berth.app().prefetch_settled().await;
            berth.settle().await;
            let started = berth
                .metric("berth_prefetch_blobs_total{result=\"started\"}")
                .await;
            if prefetch {
                assert!(started > 0.0, "{client:?}: the pull prefetched nothing");
            }
            berth.stop().await;
            secs
        }
    };
    Pulled {
        fetch,
        total,
        origin_bytes: link.sent.load(Ordering::Relaxed) - before,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    for bin in ["docker-registry", "containerd", "ctr", "skopeo"] {
        require_binary(bin);
    }
    let runs = knob("PREFETCH_RUNS", 3).max(1);
    let rate_mib = knob("PREFETCH_RATE_MIB", 50).max(1);
    let layers = knob("PREFETCH_LAYERS", 12).max(1);
    let layer_mib = knob("PREFETCH_LAYER_MIB", 32).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let registry = Registry::start().await;
        let sizes = vec![layer_mib << 20; layers];
        let img = push_oci_image(&registry.url(), "bench/prefetch", "v1", &sizes, 7).await;
        let image_bytes: usize = img.blobs().iter().map(|(_, b)| b.len()).sum();
        let link = Link::start(registry.addr(), (rate_mib << 20) as f64).await;
        println!(
            "Cold pull of {layers} x {layer_mib} MiB (+ config) over a {rate_mib} MiB/s-per-connection origin link, {runs} runs each"
        );
        println!("Download phase (ctr: its own `elapsed`, before unpacking; skopeo: the whole copy), median of {runs} (all runs):");
        println!("| client | direct | berth, prefetch off | berth, prefetch on | berth, warm (the client's floor) | on / direct | origin bytes / image (direct, off, on) |");
        println!("|---|---:|---:|---:|---:|---:|---|");
        let mut totals = Vec::new();
        for client in [Client::Ctr3, Client::CtrUnlimited, Client::Skopeo] {
            let vias = [
                Via::Direct,
                Via::Berth { prefetch: false },
                Via::Berth { prefetch: true },
                Via::Warm,
            ];
            let mut got: Vec<Vec<Pulled>> = vec![Vec::new(); vias.len()];
            // Interleaved, so that a slow spell of the machine hits every column alike.
            for _ in 0..runs {
                for (i, via) in vias.iter().enumerate() {
                    got[i].push(measure(client, *via, &link, &img).await);
                }
            }
            // (median, "median s (run, run, run)")
            let cell = |i: usize, f: fn(&Pulled) -> f64| {
                let all: Vec<f64> = got[i].iter().map(f).collect();
                let list: Vec<String> = all.iter().map(|s| format!("{s:.2}")).collect();
                let m = median(all);
                (m, format!("{m:.2} s ({})", list.join(", ")))
            };
            let show = |i: usize, f: fn(&Pulled) -> f64| cell(i, f).1;
            let per_image = |i: usize| {
                let max = got[i].iter().map(|p| p.origin_bytes).max().unwrap() as f64;
                format!("{:.2}", max / image_bytes as f64)
            };
            let fetch = |p: &Pulled| p.fetch;
            let total = |p: &Pulled| p.total;
            println!(
                "| {} | {} | {} | {} | {} | {:.2} | {}, {}, {} |",
                client.label(),
                show(0, fetch),
                show(1, fetch),
                show(2, fetch),
                show(3, fetch),
                cell(2, fetch).0 / cell(0, fetch).0,
                per_image(0),
                per_image(1),
                per_image(2),
            );
            if client != Client::Skopeo {
                totals.push(format!(
                    "| {} | {} | {} | {} | {} | {:.2} |",
                    client.label(),
                    show(0, total),
                    show(1, total),
                    show(2, total),
                    show(3, total),
                    cell(2, total).0 / cell(0, total).0,
                ));
            }
        }
        println!();
        println!("Whole `ctr images pull` (download + unpack with the native snapshotter):");
        println!("| client | direct | berth, prefetch off | berth, prefetch on | berth, warm | on / direct |");
        println!("|---|---:|---:|---:|---:|---:|");
        for row in totals {
            println!("{row}");
        }
    });
}
