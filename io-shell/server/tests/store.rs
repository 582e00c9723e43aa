//! The server's storage under the real NodeService machine: the machine runs
//! unchanged on [`FjallStore`] with the group-commit task making its writes
//! durable, and what it acknowledged is there after a reopen.
//!
//! Also holds an ignored micro-measurement of durable batches per second,
//! group commit against one fsync per batch:
//! `cargo test --release -p quicproquo-server --test store -- --ignored --nocapture`

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer, SigningKey};
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{
    NodeConfig, NodeService, Output, QueuedMessage, Reply, Request, RequestBody, Response,
    auth_message,
};
use quicproquo_core::store::{Batch, Lsn, Store};
use quicproquo_core::time::Time;
use quicproquo_core::types::{
    ChannelId, ConnectionId, IdentityKey, MessageId, RequestId, Signature,
};
use quicproquo_server::store::{FjallStore, ShellStore, StorageError, run_group_commit};
use tokio::sync::{mpsc, oneshot};

const TLS_EXPORTER: [u8; 32] = [7; 32];
const CONN: ConnectionId = ConnectionId(1);

/// The NodeService over a store, driven like the shell drives it: outputs
/// drained after every input, sync requests through the group-commit task.
struct Driver<S: ShellStore> {
    node: NodeService<S>,
    sync_tx: mpsc::UnboundedSender<Lsn>,
    synced_rx: mpsc::UnboundedReceiver<Result<Lsn, StorageError>>,
    group_commit: tokio::task::JoinHandle<()>,
    next_request: u64,
}

impl<S: ShellStore> Driver<S> {
    fn start(store: S) -> Self {
        let sync = store.sync_handle();
        let node = NodeService::new(NodeConfig::default(), [1; 32], store).unwrap();
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let (synced_tx, synced_rx) = mpsc::unbounded_channel();
        let group_commit = tokio::spawn(run_group_commit(sync, sync_rx, synced_tx, Duration::ZERO));
        let mut driver = Driver {
            node,
            sync_tx,
            synced_rx,
            group_commit,
            next_request: 0,
        };
        driver
            .node
            .handle_connection_opened(Time::ZERO, CONN, TLS_EXPORTER)
            .unwrap();
        driver
    }

    /// Sends one request and waits for its reply, serving syncs meanwhile.
    async fn call(&mut self, body: RequestBody) -> Reply {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        let request = Request {
            auth_version: AUTH_VERSION,
            body,
        };
        self.node.handle_request(Time::ZERO, CONN, id, request);
        loop {
            while let Some(out) = self.node.poll_output() {
                match out {
                    Output::Reply {
                        request_id, reply, ..
                    } if request_id == id => return reply,
                    Output::Reply { .. } => panic!("a reply to no request"),
                    Output::Sync { lsn } => self.sync_tx.send(lsn).unwrap(),
                }
            }
            match self.synced_rx.recv().await.unwrap() {
                Ok(lsn) => self.node.handle_synced(Time::ZERO, lsn),
                Err(e) => self.node.handle_sync_failed(Time::ZERO, &e.to_string()),
            }
        }
    }

    async fn authenticate(&mut self, key: &SigningKey) {
        let Ok(Response::AuthChallenge { nonce }) = self.call(RequestBody::AuthChallenge).await
        else {
            panic!("no challenge");
        };
        let identity_key = IdentityKey(key.verifying_key().to_bytes());
        let message = auth_message(&identity_key, &nonce, &TLS_EXPORTER);
        let signature = Signature(key.sign(&message).to_bytes());
        let reply = self
            .call(RequestBody::Authenticate {
                identity_key,
                signature,
            })
            .await;
        assert_eq!(reply, Ok(Response::Authenticated));
    }

    /// Stops the machine and the group-commit task, giving the store back.
    async fn stop(self) -> S {
        drop(self.sync_tx);
        self.group_commit.await.unwrap();
        self.node.into_store()
    }
}

fn enqueue(to: IdentityKey, id: u8, payload: &[u8]) -> RequestBody {
    RequestBody::Enqueue {
        recipient_key: to,
        channel_id: ChannelId::DEFAULT,
        payload: payload.to_vec(),
        message_id: MessageId([id; 16]),
    }
}

fn fetch(of: IdentityKey, after_seq: u64) -> RequestBody {
    RequestBody::Fetch {
        recipient_key: of,
        channel_id: ChannelId::DEFAULT,
        after_seq,
        limit: 10,
    }
}

fn messages(reply: Reply) -> (Vec<QueuedMessage>, u64) {
    match reply {
        Ok(Response::Messages {
            messages, next_seq, ..
        }) => (messages, next_seq),
        other => panic!("expected messages, got {other:?}"),
    }
}

#[tokio::test]
async fn node_service_runs_on_fjall_and_keeps_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qpq.db");
    let key = SigningKey::from_bytes(&[42; 32]);
    let me = IdentityKey(key.verifying_key().to_bytes());

    let mut d = Driver::start(FjallStore::open(&path).unwrap());
    d.authenticate(&key).await;
    let seq1 = d.call(enqueue(me, 1, b"hello")).await;
    let seq2 = d.call(enqueue(me, 2, b"world")).await;
    assert_eq!(
        d.call(enqueue(me, 2, b"world")).await,
        seq2,
        "idempotent retry"
    );
    let (Ok(Response::Enqueued { seq: seq1 }), Ok(Response::Enqueued { seq: seq2 })) = (seq1, seq2)
    else {
        panic!("enqueue failed");
    };
    assert!(seq2 > seq1);
    // Acknowledge the first message; the second stays.
    let (got, _) = messages(d.call(fetch(me, seq1)).await);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].seq, got[0].payload.as_slice()),
        (seq2, &b"world"[..])
    );
    let store = d.stop().await;
    assert!(store.approximate_len() > 0);
    drop(store);

    // Everything acknowledged is there after reopening, and seq goes on.
    let mut d = Driver::start(FjallStore::open(&path).unwrap());
    d.authenticate(&key).await;
    let (got, next_seq) = messages(d.call(fetch(me, seq1)).await);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].seq, got[0].payload.as_slice()),
        (seq2, &b"world"[..])
    );
    assert_eq!(next_seq, seq2 + 1);
    let reply = d.call(enqueue(me, 3, b"again")).await;
    assert_eq!(reply, Ok(Response::Enqueued { seq: seq2 + 1 }));
    d.stop().await;
}

// ----- measurement -------------------------------------------------------

/// Payload of one measured batch.
const VALUE_BYTES: usize = 1024;
/// How long each configuration runs.
const RUN: Duration = Duration::from_secs(1);

/// One batch like an enqueue: the 1 KiB message and a small queue record.
fn bench_batch(n: u64) -> Batch {
    let mut b = Batch::new();
    let mut key = vec![0x11];
    key.extend_from_slice(&n.to_be_bytes());
    b.put(key, vec![0xAB; VALUE_BYTES]);
    b.put(vec![0x10], n.to_be_bytes().to_vec());
    b
}

/// Batches written with one fsync each, through the store and its handle.
fn per_batch_fsync(path: &Path) -> f64 {
    let mut store = FjallStore::open(path).unwrap();
    let sync = store.sync_handle();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < RUN {
        store.write(bench_batch(n)).unwrap();
        sync.sync_blocking().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Batches committed by fjall itself with `mode` per batch (no group commit).
fn fjall_per_batch(path: &Path, mode: Option<fjall::PersistMode>) -> f64 {
    let db = fjall::Database::builder(path).open().unwrap();
    let ks = db
        .keyspace("node", fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        let mut b = db.batch().durability(mode);
        for (k, v) in bench_batch(n).into_ops() {
            b.insert(&ks, k, v.unwrap());
        }
        b.commit().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `writers` clients each keep one request outstanding; one task owns the
/// store (as the machine does), writes a batch per request, requests its
/// sync and answers once a group commit covered it. Returns durable batches
/// per second and batches per fsync.
async fn group_commit(path: &Path, writers: usize) -> (f64, f64) {
    let mut store = FjallStore::open(path).unwrap();
    let (sync_tx, sync_rx) = mpsc::unbounded_channel();
    let (synced_tx, mut synced_rx) = mpsc::unbounded_channel();
    let gc = tokio::spawn(run_group_commit(
        store.sync_handle(),
        sync_rx,
        synced_tx,
        Duration::ZERO,
    ));
    let (req_tx, mut req_rx) = mpsc::channel::<oneshot::Sender<()>>(writers);
    let done = Arc::new(AtomicU64::new(0));
    for _ in 0..writers {
        let req_tx = req_tx.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            loop {
                let (tx, rx) = oneshot::channel();
                if req_tx.send(tx).await.is_err() || rx.await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    drop(req_tx);
    let mut held: VecDeque<(Lsn, oneshot::Sender<()>)> = VecDeque::new();
    let mut syncs = 0u64;
    let mut n = 0;
    let start = Instant::now();
    while start.elapsed() < RUN {
        tokio::select! {
            Some(reply) = req_rx.recv() => {
                let lsn = store.write(bench_batch(n)).unwrap();
                n += 1;
                held.push_back((lsn, reply));
                sync_tx.send(lsn).unwrap();
            }
            Some(synced) = synced_rx.recv() => {
                let covered = synced.unwrap();
                syncs += 1;
                while held.front().is_some_and(|(l, _)| *l <= covered) {
                    let (_, reply) = held.pop_front().unwrap();
                    let _ = reply.send(());
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let completed = done.load(Ordering::Relaxed);
    drop((req_rx, held, sync_tx));
    gc.await.unwrap();
    (
        completed as f64 / elapsed,
        completed as f64 / syncs.max(1) as f64,
    )
}

#[test]
#[ignore = "a measurement, not a test; run with --release -- --ignored --nocapture"]
fn measure_durable_batches_per_second() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runs = 0;
    let mut fresh = || {
        runs += 1;
        dir.path().join(runs.to_string())
    };
    let writer_counts = [1, 4, 16, 64, 256, 1024];
    let mut names = vec![
        "buffered, never synced".to_owned(),
        "fsync per batch, SyncAll (fjall)".to_owned(),
        "fsync per batch, SyncData (FjallStore)".to_owned(),
    ];
    names.extend(
        writer_counts
            .iter()
            .map(|w| format!("group commit, {w} writers")),
    );
    let mut rates = vec![Vec::new(); names.len()];
    let mut per_sync = vec![Vec::new(); writer_counts.len()];
    // Rounds interleave the configurations, so a burst of other load on the
    // shared disk does not land on one configuration only.
    for _ in 0..ROUNDS {
        rates[1].push(fjall_per_batch(&fresh(), Some(fjall::PersistMode::SyncAll)));
        rates[2].push(per_batch_fsync(&fresh()));
        for (i, writers) in writer_counts.iter().enumerate() {
            let (rate, batches) = rt.block_on(group_commit(&fresh(), *writers));
            rates[3 + i].push(rate);
            per_sync[i].push(batches);
        }
        // Last: it leaves the most data for the OS to write back.
        rates[0].push(fjall_per_batch(&fresh(), Some(fjall::PersistMode::Buffer)));
    }
    println!(
        "durable 1 KiB batches per second (message + queue record), median [min, max] of {ROUNDS} runs of {} s:",
        RUN.as_secs_f64()
    );
    for (i, name) in names.iter().enumerate() {
        let [lo, mid, hi] = spread(&mut rates[i]);
        let extra = i
            .checked_sub(3)
            .map(|g| format!(", {:.1} batches per fsync", spread(&mut per_sync[g])[1]))
            .unwrap_or_default();
        println!("{name:<40} {mid:>8.0} [{lo:>6.0}, {hi:>6.0}]{extra}");
    }
}

/// Rounds of every configuration.
const ROUNDS: usize = 3;

fn spread(xs: &mut [f64]) -> [f64; 3] {
    xs.sort_by(f64::total_cmp);
    [xs[0], xs[xs.len() / 2], xs[xs.len() - 1]]
}
