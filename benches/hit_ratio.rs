//! Hit ratio of eviction policies on skewed registry-like traces: berth's SLRU disk index
//! against plain LRU and moka (TinyLFU admission + LRU), all weighed in bytes.
//!
//! Trace: 20,000 blobs with log-uniform sizes from 4 KiB to 64 MiB; 300,000 requests drawn from
//! a Zipf distribution (s = 0.9 and 1.1); a third trace mixes in one-off scans (20% of requests
//! for blobs never asked again, like a CI job pulling a fresh image). Cache budget: 5% and 20%
//! of the total bytes. Prints request and byte hit ratios.
//!
//! `cargo bench --bench hit_ratio`

use std::collections::{BTreeMap, HashMap};

use berth::cache::{DiskIndex, Key, ObjectKind};
use berth::oci::Digest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OBJECTS: usize = 20_000;
const REQUESTS: usize = 300_000;

trait Policy {
    fn name(&self) -> &'static str;
    /// Returns true on a hit; inserts on a miss.
    fn access(&mut self, id: u64, size: u64) -> bool;
}

struct Lru {
    budget: u64,
    used: u64,
    tick: u64,
    entries: HashMap<u64, (u64, u64)>,
    order: BTreeMap<u64, u64>,
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }
    fn access(&mut self, id: u64, size: u64) -> bool {
        self.tick += 1;
        if let Some((t, _)) = self.entries.get_mut(&id) {
            self.order.remove(t);
            *t = self.tick;
            self.order.insert(self.tick, id);
            return true;
        }
        if size > self.budget {
            return false;
        }
        while self.used + size > self.budget {
            let (&t, &victim) = self.order.iter().next().unwrap();
            self.order.remove(&t);
            self.used -= self.entries.remove(&victim).unwrap().1;
        }
        self.entries.insert(id, (self.tick, size));
        self.order.insert(self.tick, id);
        self.used += size;
        false
    }
}

struct Berth {
    index: std::sync::Arc<DiskIndex>,
    keys: Vec<Key>,
}

impl Policy for Berth {
    fn name(&self) -> &'static str {
        "berth-slru"
    }
    fn access(&mut self, id: u64, size: u64) -> bool {
        let k = &self.keys[id as usize];
        if self.index.touch(k) {
            return true;
        }
        if let Ok((r, _)) = self.index.reserve(size) {
            r.commit(k.clone(), size);
        }
        false
    }
}

struct Moka {
    cache: moka::sync::Cache<u64, ()>,
    n: u64,
}

impl Policy for Moka {
    fn name(&self) -> &'static str {
        "moka-tinylfu"
    }
    fn access(&mut self, id: u64, size: u64) -> bool {
        self.n += 1;
        if self.cache.get(&id).is_some() {
            return true;
        }
        // Weigh in KiB: moka's weights are u32.
        let _ = size;
        self.cache.insert(id, ());
        if self.n.is_multiple_of(64) {
            self.cache.run_pending_tasks();
        }
        false
    }
}

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf = Vec::with_capacity(n);
    for i in 1..=n {
        acc += 1.0 / (i as f64).powf(s);
        cdf.push(acc);
    }
    let total = acc;
    cdf.iter_mut().for_each(|x| *x /= total);
    cdf
}

fn trace(s: f64, scan_share: f64, seed: u64) -> (Vec<u64>, Vec<u64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let total_objects = OBJECTS + REQUESTS;
    let sizes: Vec<u64> = (0..total_objects)
        .map(|_| {
            let exp = rng.gen_range(12.0..26.0f64); // 4 KiB .. 64 MiB
            2f64.powf(exp) as u64
        })
        .collect();
    let cdf = zipf_cdf(OBJECTS, s);
    // Shuffle popularity so that size and rank are independent.
    let mut perm: Vec<u64> = (0..OBJECTS as u64).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.gen_range(0..=i));
    }
    let mut next_scan = OBJECTS as u64;
    let reqs = (0..REQUESTS)
        .map(|_| {
            if rng.gen_bool(scan_share) {
                next_scan += 1;
                next_scan - 1
            } else {
                let u: f64 = rng.gen();
                perm[cdf.partition_point(|&c| c < u).min(OBJECTS - 1)]
            }
        })
        .collect();
    (sizes, reqs)
}

fn run(policy: &mut dyn Policy, sizes: &[u64], reqs: &[u64]) -> (f64, f64) {
    let (mut hits, mut hit_bytes, mut bytes) = (0u64, 0u64, 0u64);
    // Warm up on the first 10% of the trace, measure the rest.
    let warm = reqs.len() / 10;
    for (i, &id) in reqs.iter().enumerate() {
        let size = sizes[id as usize];
        let hit = policy.access(id, size);
        if i >= warm {
            bytes += size;
            if hit {
                hits += 1;
                hit_bytes += size;
            }
        }
    }
    let n = (reqs.len() - warm) as f64;
    (hits as f64 / n, hit_bytes as f64 / bytes as f64)
}

fn main() {
    // `cargo test --benches` runs bench binaries with --bench absent; keep that fast.
    let quick = !std::env::args().any(|a| a == "--bench");
    println!(
        "{:<28} {:<8} {:<14} {:>10} {:>10}",
        "trace", "budget", "policy", "hit%", "bytehit%"
    );
    for (label, s, scan) in [
        ("zipf s=0.9", 0.9, 0.0),
        ("zipf s=1.1", 1.1, 0.0),
        ("zipf s=0.9 + 20% scans", 0.9, 0.2),
    ] {
        let (sizes, mut reqs) = trace(s, scan, 42);
        if quick {
            reqs.truncate(20_000);
        }
        let total: u64 = sizes[..OBJECTS].iter().sum();
        for share in [0.05, 0.2] {
            let budget = (total as f64 * share) as u64;
            let keys: Vec<Key> = (0..sizes.len() as u64)
                .map(|i| Key {
                    kind: ObjectKind::Blob,
                    digest: Digest::sha256_of(&i.to_le_bytes()),
                })
                .collect();
            let sizes_kib: Vec<u32> = sizes.iter().map(|s| (s / 1024).max(1) as u32).collect();
            let moka = moka::sync::Cache::builder()
                .max_capacity(budget / 1024)
                .weigher(move |k: &u64, _v: &()| sizes_kib[*k as usize])
                .build();
            let mut policies: Vec<Box<dyn Policy>> = vec![
                Box::new(Lru {
                    budget,
                    used: 0,
                    tick: 0,
                    entries: HashMap::new(),
                    order: BTreeMap::new(),
                }),
                Box::new(Berth {
                    index: DiskIndex::new(budget),
                    keys,
                }),
                Box::new(Moka { cache: moka, n: 0 }),
            ];
            for p in policies.iter_mut() {
                let (hr, bhr) = run(p.as_mut(), &sizes, &reqs);
                println!(
                    "{:<28} {:<8} {:<14} {:>9.2}% {:>9.2}%",
                    label,
                    format!("{:.0}%", share * 100.0),
                    p.name(),
                    hr * 100.0,
                    bhr * 100.0
                );
            }
        }
    }
}
