//! Criterion benches for the cache's hot structures: disk index lookup / insert / evict,
//! membership evidence lookups (every read by digest asks one; every manifest answer records
//! one), and digest hashing throughput (every byte berth stores is hashed once).
//!
//! `cargo bench --bench cache`

use std::hint::black_box;

use berth::cache::{DiskIndex, Key, Memberships, ObjectKind};
use berth::oci::{Digest, DigestAlgorithm, Hasher};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn key(n: u64) -> Key {
    Key {
        kind: ObjectKind::Blob,
        digest: Digest::sha256_of(&n.to_le_bytes()),
    }
}

fn index_ops(c: &mut Criterion) {
    let n = 100_000u64;
    let keys: Vec<Key> = (0..n).map(key).collect();
    let index = DiskIndex::new(u64::MAX / 2);
    for k in &keys {
        let (r, _) = index.reserve(1000).unwrap();
        r.commit(k.clone(), 1000);
    }
    let mut g = c.benchmark_group("index");
    let mut i = 0usize;
    g.bench_function("contains_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(index.contains(&keys[i]))
        })
    });
    g.bench_function("touch_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(index.touch(&keys[i]))
        })
    });
    // Insert into a full index: every insert evicts one object.
    let full = DiskIndex::new(n * 1000);
    for k in &keys {
        let (r, _) = full.reserve(1000).unwrap();
        r.commit(k.clone(), 1000);
    }
    let mut next = n;
    g.bench_function("insert_evict_100k", |b| {
        b.iter(|| {
            next += 1;
            let (r, evicted) = full.reserve(1000).unwrap();
            black_box(r.commit(key(next), 1000));
            black_box(evicted)
        })
    });
    g.finish();
}

fn memberships(c: &mut Criterion) {
    let n = 100_000u64;
    let m = Memberships::in_memory();
    let digests: Vec<Digest> = (0..n).map(|i| key(i).digest).collect();
    for (i, d) in digests.iter().enumerate() {
        m.record("docker.io", &format!("library/app{}", i % 1000), d);
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
        digests[0], digests[1], digests[2]
    );
    let top = Digest::sha256_of(manifest.as_bytes());
    m.record_manifest("docker.io", "library/app0", &top, manifest.as_bytes());
    let mut g = c.benchmark_group("membership");
    let mut i = 0usize;
    g.bench_function("contains_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % digests.len();
            black_box(m.contains(
                "docker.io",
                &format!("library/app{}", i % 1000),
                &digests[i],
            ))
        })
    });
    // The hot manifest path: a manifest answered again (already recorded with its parts).
    g.bench_function("record_manifest_known", |b| {
        b.iter(|| m.record_manifest("docker.io", "library/app0", &top, manifest.as_bytes()))
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("digest");
    for size in [4 << 10, 256 << 10, 4 << 20] {
        let data = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        for alg in [DigestAlgorithm::Sha256, DigestAlgorithm::Sha512] {
            g.bench_with_input(BenchmarkId::new(alg.as_str(), size), &data, |b, d| {
                b.iter(|| {
                    let mut h = Hasher::new(alg);
                    h.update(d);
                    black_box(h.finish())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, index_ops, memberships, hashing);
criterion_main!(benches);
