//! Client: what a post-quantum group adds per message and recipient — a
//! hybrid (X25519 + ML-KEM-768) seal on send and an open on receive, of a
//! payload the size of an MLS application message. Names are
//! `client/operation/payload_bytes`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quicproquo_benches::PAYLOAD_SIZES;
use quicproquo_core::client::hybrid::{self, HybridSecretKey};
use rand_core::OsRng;

fn pq_envelope(c: &mut Criterion) {
    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Elements(1));
    let secret = HybridSecretKey::generate(&mut OsRng);
    let public = secret.public().clone();
    let key_id = public.key_id();
    for size in PAYLOAD_SIZES {
        let payload = vec![0x42; size];
        let sealed = hybrid::seal(&public, &key_id, &payload, &mut OsRng);
        g.bench_function(BenchmarkId::new("pq_seal", size), |b| {
            b.iter(|| hybrid::seal(&public, &key_id, black_box(&payload), &mut OsRng))
        });
        g.bench_function(BenchmarkId::new("pq_open", size), |b| {
            b.iter(|| hybrid::open(&secret, &key_id, black_box(&sealed)).expect("opens"))
        });
        g.bench_function(BenchmarkId::new("pq_seal_open", size), |b| {
            b.iter(|| {
                let sealed = hybrid::seal(&public, &key_id, black_box(&payload), &mut OsRng);
                hybrid::open(&secret, &key_id, &sealed).expect("opens")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pq_envelope);
criterion_main!(benches);
