//! Store: the service task (NodeService + group commit) over a real fjall
//! database in a temporary directory, without QUIC in front — requests go
//! straight into the service's channel. `fsync` mode answers after the
//! group commit's fdatasync; `buffered` answers at once and syncs behind.
//! 64 requests are kept in flight so group commit has something to group.
//! Names are `store/operation_mode/payload_bytes`; `store/raw_write_sync`
//! is one fjall batch plus one fdatasync with no grouping, for scale.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quicproquo_benches::PAYLOAD_SIZES;
use quicproquo_benches::server::{RigConn, ServiceRig, user};
use quicproquo_core::node::{Durability, RequestBody, Response};
use quicproquo_core::store::{Batch, Store};
use quicproquo_core::types::{ChannelId, MessageId};
use quicproquo_server::store::ShellStore;
use quicproquo_server::store::fjall_store::FjallStore;

/// Requests in flight against the service.
const IN_FLIGHT: u64 = 64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn modes() -> [(&'static str, Durability); 2] {
    [
        ("fsync", Durability::Fsync),
        ("buffered", Durability::Buffered),
    ]
}

/// A message id unique within one bench process: `(task, n)`.
fn message_id(task: u64, n: u64) -> MessageId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&task.to_le_bytes());
    id[8..].copy_from_slice(&n.to_le_bytes());
    MessageId(id)
}

/// Channel of in-flight slot `slot`, so every slot has its own queue and
/// cursor.
fn channel(slot: u64) -> ChannelId {
    ChannelId::try_from_slice(&slot.to_le_bytes()).expect("8 bytes")
}

async fn enqueue(c: &RigConn, slot: u64, n: u64, payload: &[u8]) -> u64 {
    match c
        .call(RequestBody::Enqueue {
            recipient_key: c.identity,
            channel_id: channel(slot),
            payload: payload.to_vec(),
            message_id: message_id(slot, n),
        })
        .await
    {
        Ok(Response::Enqueued { seq }) => seq,
        other => panic!("enqueue failed: {other:?}"),
    }
}

async fn fetch(c: &RigConn, slot: u64, after_seq: u64, limit: u32) -> u64 {
    match c
        .call(RequestBody::Fetch {
            recipient_key: c.identity,
            channel_id: channel(slot),
            after_seq,
            limit,
        })
        .await
    {
        Ok(Response::Messages { messages, .. }) => messages.last().map_or(after_seq, |m| m.seq),
        other => panic!("fetch failed: {other:?}"),
    }
}

/// Runs `iters` operations split over [`IN_FLIGHT`] tasks, each calling
/// `op(conn, slot, i)`; returns the wall time.
async fn run_in_flight<F, Fut>(conn: &RigConn, iters: u64, op: F) -> Duration
where
    F: Fn(RigConn, u64, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for slot in 0..IN_FLIGHT {
        let share = iters / IN_FLIGHT + u64::from(slot < iters % IN_FLIGHT);
        let (conn, op) = (conn.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..share {
                op(conn.clone(), slot, i).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("bench task");
    }
    start.elapsed()
}

fn service_benches(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    for (mode, durability) in modes() {
        for size in PAYLOAD_SIZES {
            let dir = tempfile::tempdir().expect("tempdir");
            let rig = rt.block_on(async { ServiceRig::start(dir.path(), durability) });
            let conn = rt.block_on(rig.login(&user(1)));
            let payload: std::sync::Arc<[u8]> = vec![0x42; size].into();
            // Sequence numbers per slot carry on across criterion's calls,
            // so message ids stay unique.
            let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));

            // Enqueue, each slot to its own queue; every 1,000 per slot the
            // slot acknowledges its queue so it never fills.
            g.bench_function(BenchmarkId::new(format!("enqueue_{mode}"), size), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (conn, payload) = (conn.clone(), payload.clone());
                    let round = rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        run_in_flight(&conn, iters, move |c, slot, i| {
                            let payload = payload.clone();
                            async move {
                                let n = (round << 32) | i;
                                let seq = enqueue(&c, slot, n, &payload).await;
                                if seq % 1_000 == 0 {
                                    fetch(&c, slot, seq, 0).await;
                                }
                            }
                        })
                        .await
                    }
                })
            });

            // Enqueue then fetch with the cursor: the fetch acknowledges the
            // previous message and returns the new one.
            g.bench_function(
                BenchmarkId::new(format!("enqueue_fetch_{mode}"), size),
                |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let (conn, payload) = (conn.clone(), payload.clone());
                        let round = rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        async move {
                            run_in_flight(&conn, iters, move |c, slot, i| {
                                let payload = payload.clone();
                                async move {
                                    // A fresh channel per round: every slot
                                    // starts with an empty queue and cursor.
                                    let slot = slot + 1_000 * (round + 1);
                                    let seq = enqueue(&c, slot, i, &payload).await;
                                    fetch(&c, slot, seq - 1, 1).await;
                                }
                            })
                            .await
                        }
                    })
                },
            );

            // KeyPackage upload by the owner and pop (fetch) of it.
            g.bench_function(BenchmarkId::new(format!("pop_{mode}"), size), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (conn, payload) = (conn.clone(), payload.clone());
                    async move {
                        run_in_flight(&conn, iters, move |c, _, _| {
                            let payload = payload.clone();
                            async move {
                                let up = c
                                    .call(RequestBody::UploadKeyPackage {
                                        identity_key: c.identity,
                                        package: payload.to_vec(),
                                        last_resort: false,
                                        cipher_suite: 0,
                                    })
                                    .await;
                                assert!(matches!(up, Ok(Response::KeyPackageUploaded { .. })));
                                let pop = c
                                    .call(RequestBody::FetchKeyPackage {
                                        identity_key: c.identity,
                                        cipher_suite: 0,
                                    })
                                    .await;
                                assert!(matches!(pop, Ok(Response::KeyPackage { .. })), "{pop:?}");
                            }
                        })
                        .await
                    }
                })
            });
            drop(conn);
            rt.block_on(rig.stop());
        }
    }
    g.finish();
}

fn raw_write_sync(c: &mut Criterion) {
    let mut g = c.benchmark_group("store/raw_write_sync");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    for size in PAYLOAD_SIZES {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = FjallStore::open(&dir.path().join("qpq.db")).expect("open store");
        let sync = store.sync_handle();
        let value = vec![0x42; size];
        let mut n = 0u64;
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                n += 1;
                let mut batch = Batch::new();
                batch.put(n.to_be_bytes().to_vec(), value.clone());
                store.write(batch).expect("write");
                sync.sync_blocking().expect("fdatasync");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, service_benches, raw_write_sync);
criterion_main!(benches);
