//! Core in memory: the NodeService machine over the core's `MemStore`,
//! driven inline by `CoreRig` (feed, drain, sync when asked) with no I/O.
//! Names are `core/operation/payload_bytes`.
//!
//! The target for the core is at least 1,000,000 enqueue+fetch pairs per
//! second on one core (`core/enqueue_fetch/1024`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quicproquo_benches::PAYLOAD_SIZES;
use quicproquo_benches::core_rig::{CoreRig, identity};
use quicproquo_core::node::{RequestBody, Response};
use quicproquo_core::types::ChannelId;

/// qpq-server's allocator, so that allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Messages enqueued before they are acknowledged in the enqueue-only
/// bench: well under the default queue depth limit (10,000).
const ENQUEUE_CHUNK: u64 = 1_000;

fn enqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("core/enqueue");
    g.throughput(Throughput::Elements(1));
    for size in PAYLOAD_SIZES {
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            let mut rig = CoreRig::new();
            let alice = CoreRig::user(1);
            let me = identity(&alice);
            rig.login(1, &alice);
            let payload = vec![0x42; size];
            let mut acked = 0;
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(ENQUEUE_CHUNK);
                    let start = Instant::now();
                    let mut last = 0;
                    for _ in 0..n {
                        last = rig.enqueue(1, me, black_box(payload.clone()));
                    }
                    spent += start.elapsed();
                    // Acknowledge outside the timing so the queue never
                    // reaches its depth limit.
                    rig.fetch(1, me, last, 0);
                    acked = last;
                    left -= n;
                }
                spent
            });
            black_box(acked);
        });
    }
    g.finish();
}

fn fetch_with_cursor(c: &mut Criterion) {
    for (name, limit) in [("core/fetch_cursor", 1u32), ("core/fetch_cursor100", 100)] {
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(u64::from(limit)));
        for size in PAYLOAD_SIZES {
            g.bench_function(BenchmarkId::from_parameter(size), |b| {
                let mut rig = CoreRig::new();
                let alice = CoreRig::user(1);
                let me = identity(&alice);
                rig.login(1, &alice);
                let payload = vec![0x42; size];
                let mut cursor = 0;
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(ENQUEUE_CHUNK / u64::from(limit).max(1)).max(1);
                        // Fill outside the timing, then drain with the
                        // cursor: each fetch acknowledges what the previous
                        // one returned and reads the next `limit`.
                        for _ in 0..n * u64::from(limit) {
                            rig.enqueue(1, me, payload.clone());
                        }
                        let start = Instant::now();
                        for _ in 0..n {
                            let got = rig.fetch(1, me, cursor, limit);
                            cursor += got as u64;
                        }
                        spent += start.elapsed();
                        left -= n;
                    }
                    spent
                });
            });
        }
        g.finish();
    }
}

fn enqueue_fetch(c: &mut Criterion) {
    let mut g = c.benchmark_group("core/enqueue_fetch");
    g.throughput(Throughput::Elements(1));
    for size in PAYLOAD_SIZES {
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            let mut rig = CoreRig::new();
            let alice = CoreRig::user(1);
            let me = identity(&alice);
            rig.login(1, &alice);
            let payload = vec![0x42; size];
            let mut cursor = 0;
            // One pair: enqueue a message, then fetch acknowledging the
            // previous one and reading the new one.
            b.iter(|| {
                rig.enqueue(1, me, black_box(payload.clone()));
                let got = rig.fetch(1, me, cursor, 1);
                cursor += got as u64;
            });
        });
    }
    g.finish();
}

fn key_package_upload_pop(c: &mut Criterion) {
    let mut g = c.benchmark_group("core/keypackage_upload_pop");
    g.throughput(Throughput::Elements(1));
    for size in PAYLOAD_SIZES {
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            let mut rig = CoreRig::new();
            let (alice, bob) = (CoreRig::user(1), CoreRig::user(2));
            rig.login(1, &alice);
            rig.login(2, &bob);
            let package = vec![0x42; size];
            b.iter(|| {
                let up = rig.call(
                    1,
                    RequestBody::UploadKeyPackage {
                        identity_key: identity(&alice),
                        package: black_box(package.clone()),
                        last_resort: false,
                        cipher_suite: 0,
                    },
                );
                assert!(matches!(up, Ok(Response::KeyPackageUploaded { .. })));
                let pop = rig.call(
                    2,
                    RequestBody::FetchKeyPackage {
                        identity_key: identity(&alice),
                        cipher_suite: 0,
                    },
                );
                assert!(matches!(pop, Ok(Response::KeyPackage { .. })), "{pop:?}");
            });
        });
    }
    g.finish();
}

fn fetch_wait_wake(c: &mut Criterion) {
    let mut g = c.benchmark_group("core/fetchwait_wake");
    g.throughput(Throughput::Elements(1));
    for size in PAYLOAD_SIZES {
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            let mut rig = CoreRig::new();
            let (alice, bob) = (CoreRig::user(1), CoreRig::user(2));
            rig.login(1, &alice);
            rig.login(2, &bob);
            let bob_id = identity(&bob);
            let payload = vec![0x42; size];
            let mut cursor = 0;
            // One cycle: Bob parks a fetchWait (acknowledging what he got
            // last time), Alice enqueues, the enqueue wakes Bob's waiter.
            b.iter(|| {
                rig.send(
                    2,
                    RequestBody::FetchWait {
                        recipient_key: bob_id,
                        channel_id: ChannelId::DEFAULT,
                        after_seq: cursor,
                        limit: 10,
                        timeout_ms: 10_000,
                    },
                );
                debug_assert_eq!(rig.node().waiter_count(), 1);
                let message_id = rig.message_id();
                rig.send(
                    1,
                    RequestBody::Enqueue {
                        recipient_key: bob_id,
                        channel_id: ChannelId::DEFAULT,
                        payload: black_box(payload.clone()),
                        message_id,
                    },
                );
                for (_, reply) in rig.take_replies() {
                    if let Ok(Response::Messages { messages, .. }) = reply {
                        cursor += messages.len() as u64;
                    }
                }
            });
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    enqueue,
    fetch_with_cursor,
    enqueue_fetch,
    key_package_upload_pop,
    fetch_wait_wake
);
criterion_main!(benches);
