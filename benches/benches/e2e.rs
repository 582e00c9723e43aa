//! End to end: a real qpq-server in this process (QUIC + TLS 1.3 on
//! loopback, service task, group commit, fjall in `fsync` mode) and
//! `quicproquo-client` connections, with 1, 16 and 64 requests in flight
//! over one connection. Names are `e2e/operation_xINFLIGHT/payload_bytes`.
//! Client and server share this machine's cores.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quicproquo_benches::server::{bench_setup, user};
use quicproquo_client::Client;
use quicproquo_core::node::Durability;
use quicproquo_core::types::{ChannelId, MessageId};
use quicproquo_server::testing::InProcessServer;

const IN_FLIGHT: [u64; 3] = [1, 16, 64];
const PAYLOAD_BYTES: usize = 1024;

fn message_id(slot: u64, n: u64) -> MessageId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&slot.to_le_bytes());
    id[8..].copy_from_slice(&n.to_le_bytes());
    MessageId(id)
}

fn channel(slot: u64) -> ChannelId {
    ChannelId::try_from_slice(&slot.to_le_bytes()).expect("8 bytes")
}

/// Runs `iters` operations over `in_flight` tasks sharing `client`.
async fn run<F, Fut>(client: &Client, in_flight: u64, iters: u64, op: F) -> Duration
where
    F: Fn(Client, u64, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for slot in 0..in_flight {
        let share = iters / in_flight + u64::from(slot < iters % in_flight);
        let (client, op) = (client.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..share {
                op(client.clone(), slot, i).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("bench task");
    }
    start.elapsed()
}

fn e2e(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = rt.block_on(async {
        InProcessServer::start_with(dir.path(), bench_setup(Durability::Fsync, false))
    });
    let client = rt.block_on(server.login(&user(1)));
    let me = client.identity().expect("authenticated");
    let payload: std::sync::Arc<[u8]> = vec![0x42; PAYLOAD_BYTES].into();
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));

    let mut g = c.benchmark_group("e2e");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(4));
    g.warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    for in_flight in IN_FLIGHT {
        g.bench_function(
            BenchmarkId::new(format!("enqueue_x{in_flight}"), PAYLOAD_BYTES),
            |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (client, payload) = (client.clone(), payload.clone());
                    let round = rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        run(&client, in_flight, iters, move |c, slot, i| {
                            let payload = payload.clone();
                            async move {
                                let seq = c
                                    .enqueue(
                                        me,
                                        channel(slot),
                                        payload.to_vec(),
                                        message_id(slot, (round << 32) | i),
                                    )
                                    .await
                                    .expect("enqueue");
                                // Keep the queue well under its depth limit.
                                if seq % 1_000 == 0 {
                                    c.fetch(me, channel(slot), seq, 0).await.expect("ack");
                                }
                            }
                        })
                        .await
                    }
                })
            },
        );
        g.bench_function(
            BenchmarkId::new(format!("enqueue_fetch_x{in_flight}"), PAYLOAD_BYTES),
            |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (client, payload) = (client.clone(), payload.clone());
                    let round = rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async move {
                        run(&client, in_flight, iters, move |c, slot, i| {
                            let payload = payload.clone();
                            async move {
                                // A fresh queue per slot and round.
                                let ch = channel(slot + 1_000 * round);
                                let seq = c
                                    .enqueue(me, ch, payload.to_vec(), message_id(slot, i))
                                    .await
                                    .expect("enqueue");
                                let got = c.fetch(me, ch, seq - 1, 1).await.expect("fetch");
                                assert_eq!(got.messages.len(), 1);
                            }
                        })
                        .await
                    }
                })
            },
        );
    }
    g.finish();
    drop(client);
    rt.block_on(server.stop());
}

criterion_group!(benches, e2e);
criterion_main!(benches);
