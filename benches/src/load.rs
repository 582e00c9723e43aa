//! The load generator's engine: C connections, each authenticated as its
//! own identity, with S requests in flight per connection, payload P, for a
//! duration or a count of operations. See [`Workload`] for what one
//! operation is in each workload.
//!
//! Throughput counts operations completed inside the measured window (after
//! the warm-up); latency is recorded per operation in an HDR histogram
//! (microseconds, 3 significant digits). When the server's metrics URL is
//! given, the server's counters are read before and after the window and
//! the report adds fsyncs and messages per fsync.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use quicproquo_client::{Client, ClientError, ServerTrust};
use quicproquo_core::error::ErrorKind;
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use quicproquo_proto::REPLY_BYTES_MAX;
use rand_core::{OsRng, RngCore};
use serde::Serialize;

use crate::echo::enqueue_request_bytes;
use crate::scrape::{Samples, scrape};

/// What one operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// One enqueue of P bytes to the connection's own queues (a fresh
    /// channel every few thousand messages, so no queue reaches its depth
    /// limit).
    Enqueue,
    /// One enqueue to the slot's own queue, then one fetch with the cursor
    /// that acknowledges the previous message and returns the new one.
    #[value(name = "enqueue+fetch")]
    #[serde(rename = "enqueue+fetch")]
    EnqueueFetch,
    /// Queues are first filled with `--prefill` messages per slot (not
    /// timed); then one fetch with the cursor returns up to
    /// `--fetch-limit` messages and acknowledges the previous batch.
    /// Items/s is the drain rate.
    Fetch,
    /// Every connection long-polls its own queue with fetchWait while its
    /// S slots enqueue to the next connection's queue; one operation is one
    /// delivered message, and latency is enqueue-to-delivery (send time
    /// carried in the payload).
    Fetchwait,
    /// One KeyPackage upload of P bytes to the connection's own pool and
    /// one pop (fetchKeyPackage) of it. The server's KeyPackage fetch rate
    /// limits must be raised for this (see --help).
    Keypackages,
    /// The soak's mix: every connection long-polls its own queue with
    /// fetchWait (acknowledging with its cursor) while its S slots cycle
    /// through enqueues to the next connection, an enqueueBatch to the next
    /// three, a KeyPackage upload to its own pool, a pop from the next
    /// connection's pool and a KeyPackage count. One operation is one
    /// request; items are messages delivered to the long-polls.
    Mixed,
    /// Bare-QUIC baseline against `qpq-bench baseline-server`: one stream
    /// carrying the bytes of an enqueue request of P bytes, answered with
    /// the bytes of an enqueue reply.
    QuicEcho,
    // The two session workloads run in `crate::session`, not this engine.
    /// The long-lived client: member 0's `Session` sends one message at a
    /// time and waits until member 1's `Session` shows it.
    SessionLatency,
    /// The long-lived client: member 0's `Session` sends messages back to
    /// back; messages/s until the receivers showed the last.
    SessionThroughput,
}

impl Workload {
    /// True for the workloads of the long-lived client, which
    /// [`crate::session::run`] runs instead of [`run`].
    pub fn is_session(self) -> bool {
        matches!(self, Workload::SessionLatency | Workload::SessionThroughput)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `host:port` of the server, or of several nodes of one deployment
    /// (sharing a database and a certificate), comma-separated: connection
    /// `i` goes to node `i % n`.
    pub server: String,
    /// How the server's certificate is trusted.
    pub trust: ServerTrust,
    /// The workload.
    pub workload: Workload,
    /// Connections (C).
    pub connections: usize,
    /// Requests in flight per connection (S).
    pub in_flight: usize,
    /// Payload bytes (P).
    pub payload_bytes: usize,
    /// Measured time, unless `count` is set.
    pub duration: Duration,
    /// Stop after this many operations instead of after `duration`.
    pub count: Option<u64>,
    /// Time run before measuring (duration mode only).
    pub warmup: Duration,
    /// Messages per fetch (`fetch`, `fetchwait`).
    pub fetch_limit: u32,
    /// Messages put into each slot's queue before a `fetch` run.
    pub prefill: u64,
    /// The server's Prometheus endpoint, e.g. `http://127.0.0.1:9464/metrics`.
    pub metrics_url: Option<String>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

/// Server-side figures over the measured window, from its metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFigures {
    /// Durability mode the server reports (`fsync` or `buffered`).
    pub durability: String,
    /// fsyncs (group commits) completed.
    pub fsyncs: f64,
    /// Store batches written (one per state-changing request).
    pub batches: f64,
    /// Successful enqueues.
    pub enqueues: f64,
    /// Enqueues per fsync.
    pub messages_per_fsync: f64,
    /// Batches per fsync.
    pub batches_per_fsync: f64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The workload.
    pub workload: Workload,
    /// Connections.
    pub connections: usize,
    /// In flight per connection.
    pub in_flight: usize,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// Measured seconds.
    pub elapsed_s: f64,
    /// Operations completed in the window.
    pub ops: u64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Messages moved in the window (delivered or fetched; equals `ops`
    /// where an operation moves one message).
    pub items: u64,
    /// Items per second.
    pub items_per_s: f64,
    /// Operation latency (enqueue-to-delivery for `fetchwait`).
    pub latency: Latency,
    /// Failed operations.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Server-side figures, when a metrics URL was given.
    pub server: Option<ServerFigures>,
}

/// Longest latency the histograms hold: a minute.
const LATENCY_US_MAX: u64 = 60_000_000;
/// Messages one `enqueue` slot puts into a queue before moving to a fresh
/// channel: half the default queue depth limit (10,000).
const MESSAGES_PER_CHANNEL: u64 = 5_000;
/// fetchWait timeout of the `fetchwait` receivers.
const FETCH_WAIT_TIMEOUT_MS: u64 = 5_000;
/// Time given to the connections' CONNECTION_CLOSE frames to leave.
const CLOSE_GRACE: Duration = Duration::from_millis(100);
/// Prefill enqueues in flight per connection.
const PREFILL_IN_FLIGHT: usize = 16;

/// Shared state of one run.
struct Run {
    /// Set when workers should stop starting operations.
    stop: AtomicBool,
    /// Wakes the long-polling receivers when `stop` is set, so they end
    /// with their histograms instead of being aborted in a wait.
    stopped: tokio::sync::Notify,
    /// Set while operations count.
    measuring: AtomicBool,
    /// Operations left in count mode.
    tickets: Option<AtomicU64>,
    ops: AtomicU64,
    items: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Origin of the timestamps `fetchwait` puts in payloads.
    epoch: Instant,
    /// When the last counted operation completed, in ns since `epoch`.
    last_done_ns: AtomicU64,
}

impl Run {
    fn go_on(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        match &self.tickets {
            None => true,
            Some(t) => t
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }

    fn done(&self, hist: &mut Histogram<u64>, latency: Duration, items: u64) {
        if self.measuring.load(Ordering::Relaxed) {
            self.ops.fetch_add(1, Ordering::Relaxed);
            self.items.fetch_add(items, Ordering::Relaxed);
            let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.last_done_ns.fetch_max(ns, Ordering::Relaxed);
            record(hist, latency);
        }
    }

    fn failed(&self, e: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }
}

/// One connection with its identity.
#[derive(Clone)]
struct Conn {
    client: Client,
    me: IdentityKey,
    index: usize,
    /// Random per run, so message ids never collide with an earlier run
    /// against the same server.
    tag: u64,
}

/// Runs the load described by `config` and returns its report.
pub async fn run(config: LoadConfig) -> anyhow::Result<Report> {
    if config.workload.is_session() {
        bail!("the session workloads run through session::run");
    }
    if config.connections == 0 || config.in_flight == 0 {
        bail!("--connections and --in-flight must be at least 1");
    }
    if config.payload_bytes < 16 && config.workload == Workload::Fetchwait {
        bail!("fetchwait needs a payload of at least 16 bytes (it carries the send time)");
    }
    let conns = connect_all(&config).await?;
    if config.workload == Workload::Fetch {
        prefill(&config, &conns).await?;
    }
    let run = Arc::new(Run {
        stop: AtomicBool::new(false),
        stopped: tokio::sync::Notify::new(),
        measuring: AtomicBool::new(config.count.is_some() || config.warmup.is_zero()),
        tickets: config.count.map(AtomicU64::new),
        ops: AtomicU64::new(0),
        items: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        epoch: Instant::now(),
        last_done_ns: AtomicU64::new(0),
    });
    // In count mode everything counts, from before the first operation.
    let counted_from = match config.count {
        Some(_) => Some((scrape_opt(&config).await?, Instant::now())),
        None => None,
    };
    let (workers, receivers) = spawn_workers(&config, &conns, &run);
    let bar = progress_bar(&config);
    let (before, start) = match counted_from {
        Some((before, start)) => {
            while !workers.iter().all(|w| w.is_finished()) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tick(&bar, &run, start, config.count);
            }
            (before, start)
        }
        None => {
            if !config.warmup.is_zero() {
                bar.set_message("warming up");
                tokio::time::sleep(config.warmup).await;
            }
            let before = scrape_opt(&config).await?;
            let start = Instant::now();
            run.measuring.store(true, Ordering::Relaxed);
            let deadline = start + config.duration;
            while Instant::now() < deadline && !workers.iter().all(|w| w.is_finished()) {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(Duration::from_millis(100).min(left)).await;
                tick(&bar, &run, start, config.count);
            }
            run.measuring.store(false, Ordering::Relaxed);
            (before, start)
        }
    };
    // Workers that ran out of work (a drained `fetch`, a finished count)
    // end the window at their last operation, not at the next poll.
    let elapsed = if workers.iter().all(|w| w.is_finished()) {
        let last = run.epoch + Duration::from_nanos(run.last_done_ns.load(Ordering::Relaxed));
        last.saturating_duration_since(start)
    } else {
        start.elapsed()
    };
    run.stop.store(true, Ordering::Relaxed);
    run.stopped.notify_waiters();
    let mut hist = new_histogram();
    for w in workers.into_iter().chain(receivers) {
        hist.add(w.await.context("load worker panicked")?)
            .context("merging histograms")?;
    }
    bar.finish_and_clear();
    let after = scrape_opt(&config).await?;
    // Close cleanly, so the server frees the connections (and its
    // per-address slots) now rather than after its idle timeout.
    for c in &conns {
        c.client.connection().close(0u32.into(), b"qpq-bench done");
    }
    tokio::time::sleep(CLOSE_GRACE).await;
    let ops = run.ops.load(Ordering::Relaxed);
    let items = run.items.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();
    let first_error = run
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(Report {
        workload: config.workload,
        connections: config.connections,
        in_flight: config.in_flight,
        payload_bytes: config.payload_bytes,
        elapsed_s: secs,
        ops,
        ops_per_s: ops as f64 / secs,
        items,
        items_per_s: items as f64 / secs,
        latency: latency(&hist),
        errors: run.errors.load(Ordering::Relaxed),
        first_error,
        server: match (before, after) {
            (Some(b), Some(a)) => Some(server_figures(&b, &a)),
            _ => None,
        },
    })
}

async fn connect_all(config: &LoadConfig) -> anyhow::Result<Vec<Conn>> {
    let mut tasks = Vec::new();
    let nodes: Vec<String> = config
        .server
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    for index in 0..config.connections {
        let (server, trust, workload) = (
            nodes[index % nodes.len()].clone(),
            config.trust.clone(),
            config.workload,
        );
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&server, &trust)
                .await
                .with_context(|| format!("connecting to {server}"))?;
            let mut seed = [0u8; 32];
            OsRng.fill_bytes(&mut seed);
            let key = SigningKey::from_bytes(&seed);
            if workload != Workload::QuicEcho {
                client.authenticate(&key).await.context("authenticating")?;
            }
            anyhow::Ok(Conn {
                client,
                me: IdentityKey(key.verifying_key().to_bytes()),
                index,
                tag: OsRng.next_u64(),
            })
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.context("connect task panicked")??);
    }
    Ok(conns)
}

/// Fills every slot's queue with `config.prefill` messages.
/// Times one prefill enqueue is sent again after a retryable refusal.
const PREFILL_RETRIES_MAX: u32 = 100;

async fn prefill(config: &LoadConfig, conns: &[Conn]) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for c in conns {
        for slot in 0..config.in_flight {
            let (c, payload, n) = (c.clone(), vec![0x42; config.payload_bytes], config.prefill);
            tasks.push(tokio::spawn(async move {
                for i in 0..n {
                    // Sent again (same id, stored once) while the server
                    // answers a retryable refusal: several nodes over one
                    // database roll back conflicting requests.
                    let mut attempts = 0;
                    loop {
                        let sent = c
                            .client
                            .enqueue(
                                c.me,
                                channel(slot as u64, 0),
                                payload.clone(),
                                c.message_id(slot, i),
                            )
                            .await;
                        match sent {
                            Ok(_) => break,
                            Err(e) if e.kind().is_retryable() && attempts < PREFILL_RETRIES_MAX => {
                                attempts += 1;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(e) => return Err(e).context("prefill enqueue"),
                        }
                    }
                }
                anyhow::Ok(())
            }));
            if tasks.len() >= conns.len() * PREFILL_IN_FLIGHT {
                for t in tasks.drain(..) {
                    t.await.context("prefill task panicked")??;
                }
            }
        }
    }
    for t in tasks {
        t.await.context("prefill task panicked")??;
    }
    Ok(())
}

type Worker = tokio::task::JoinHandle<Histogram<u64>>;

fn spawn_workers(
    config: &LoadConfig,
    conns: &[Conn],
    run: &Arc<Run>,
) -> (Vec<Worker>, Vec<Worker>) {
    let mut workers = Vec::new();
    let mut receivers = Vec::new();
    let request: Arc<[u8]> = enqueue_request_bytes(config.payload_bytes).into();
    for c in conns {
        if matches!(config.workload, Workload::Fetchwait | Workload::Mixed) {
            receivers.push(tokio::spawn(receive(
                c.clone(),
                run.clone(),
                config.fetch_limit,
                config.workload == Workload::Fetchwait,
            )));
        }
        for slot in 0..config.in_flight {
            let (c, run, payload) = (c.clone(), run.clone(), vec![0x42; config.payload_bytes]);
            let next = conns[(c.index + 1) % conns.len()].me;
            let batch: Vec<IdentityKey> = (1..=3)
                .map(|k| conns[(c.index + k) % conns.len()].me)
                .filter(|k| *k != c.me)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let (workload, limit, request) = (config.workload, config.fetch_limit, request.clone());
            workers.push(tokio::spawn(async move {
                let mut hist = new_histogram();
                match workload {
                    Workload::Enqueue => enqueue_loop(&c, slot, &run, &mut hist, payload).await,
                    Workload::EnqueueFetch => pair_loop(&c, slot, &run, &mut hist, payload).await,
                    Workload::Fetch => fetch_loop(&c, slot, &run, &mut hist, limit).await,
                    Workload::Fetchwait => send_loop(&c, slot, next, &run, payload).await,
                    Workload::Keypackages => kp_loop(&c, &run, &mut hist, payload).await,
                    Workload::Mixed => {
                        mixed_loop(&c, slot, next, &batch, &run, &mut hist, payload).await;
                    }
                    Workload::QuicEcho => echo_loop(&c, &run, &mut hist, &request).await,
                    // Refused by `run` before any worker starts.
                    Workload::SessionLatency | Workload::SessionThroughput => {}
                }
                hist
            }));
        }
    }
    (workers, receivers)
}

impl Conn {
    fn message_id(&self, slot: usize, n: u64) -> MessageId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(self.tag ^ ((slot as u64) << 48)).to_le_bytes());
        id[8..].copy_from_slice(&n.to_le_bytes());
        MessageId(id)
    }
}

/// Channel `epoch` of slot `slot`: 16 bytes, so every slot and epoch has a
/// queue of its own.
fn channel(slot: u64, epoch: u64) -> ChannelId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&slot.to_le_bytes());
    b[8..].copy_from_slice(&epoch.to_le_bytes());
    ChannelId::try_from_slice(&b).expect("16 bytes")
}

async fn enqueue_loop(
    c: &Conn,
    slot: usize,
    run: &Run,
    hist: &mut Histogram<u64>,
    payload: Vec<u8>,
) {
    let mut n = 0u64;
    while run.go_on() {
        let ch = channel(slot as u64, n / MESSAGES_PER_CHANNEL);
        let t = Instant::now();
        match c
            .client
            .enqueue(c.me, ch, payload.clone(), c.message_id(slot, n))
            .await
        {
            Ok(_) => run.done(hist, t.elapsed(), 1),
            Err(e) => fail(run, e).await,
        }
        n += 1;
    }
}

async fn pair_loop(c: &Conn, slot: usize, run: &Run, hist: &mut Histogram<u64>, payload: Vec<u8>) {
    let ch = channel(slot as u64, 1);
    let mut cursor = 0u64;
    let mut n = 0u64;
    while run.go_on() {
        let t = Instant::now();
        let result = async {
            c.client
                .enqueue(c.me, ch, payload.clone(), c.message_id(slot, n))
                .await?;
            c.client.fetch(c.me, ch, cursor, 1).await
        }
        .await;
        n += 1;
        match result {
            Ok(f) => {
                if let Some(last) = f.messages.last() {
                    cursor = last.seq;
                }
                run.done(hist, t.elapsed(), f.messages.len() as u64);
            }
            Err(e) => fail(run, e).await,
        }
    }
}

async fn fetch_loop(c: &Conn, slot: usize, run: &Run, hist: &mut Histogram<u64>, limit: u32) {
    let ch = channel(slot as u64, 0);
    let mut cursor = 0u64;
    while run.go_on() {
        let t = Instant::now();
        match c.client.fetch(c.me, ch, cursor, limit).await {
            Ok(f) => {
                let Some(last) = f.messages.last() else {
                    // Drained: acknowledge what is left and stop.
                    let _ = c.client.fetch(c.me, ch, cursor, 0).await;
                    return;
                };
                cursor = last.seq;
                run.done(hist, t.elapsed(), f.messages.len() as u64);
            }
            Err(e) => fail(run, e).await,
        }
    }
}

/// A `fetchwait` sender: enqueues to `to` with the send time in the first
/// 16 bytes of the payload.
async fn send_loop(c: &Conn, slot: usize, to: IdentityKey, run: &Run, mut payload: Vec<u8>) {
    let mut n = 0u64;
    while run.go_on() {
        let sent = run.epoch.elapsed().as_nanos();
        payload[..16].copy_from_slice(&sent.to_le_bytes());
        if let Err(e) = c
            .client
            .enqueue(
                to,
                ChannelId::DEFAULT,
                payload.clone(),
                c.message_id(slot, n),
            )
            .await
        {
            fail(run, e).await;
        }
        n += 1;
    }
}

/// A `fetchwait` or `mixed` receiver: long-polls its own default queue;
/// when `timed` (`fetchwait`), each message is an operation and its
/// enqueue-to-delivery latency is recorded, else messages only count as
/// items. Ended by the run.
async fn receive(c: Conn, run: Arc<Run>, limit: u32, timed: bool) -> Histogram<u64> {
    let mut hist = new_histogram();
    let mut cursor = 0u64;
    loop {
        // Listening before the flag is read, so a stop set in between
        // still wakes the wait below.
        let stopped = run.stopped.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        if run.stop.load(Ordering::Relaxed) {
            break;
        }
        let fetched = tokio::select! {
            fetched = c.client.fetch_wait(
                c.me,
                ChannelId::DEFAULT,
                cursor,
                limit,
                FETCH_WAIT_TIMEOUT_MS,
            ) => fetched,
            () = &mut stopped => break,
        };
        match fetched {
            Ok(f) if !timed => {
                if let Some(last) = f.messages.last() {
                    cursor = last.seq;
                }
                if run.measuring.load(Ordering::Relaxed) {
                    run.items
                        .fetch_add(f.messages.len() as u64, Ordering::Relaxed);
                }
            }
            Ok(f) => {
                let now = run.epoch.elapsed().as_nanos();
                for m in &f.messages {
                    cursor = m.seq;
                    let sent = m
                        .payload
                        .get(..16)
                        .and_then(|b| <[u8; 16]>::try_from(b).ok())
                        .map_or(now, u128::from_le_bytes);
                    let nanos = u64::try_from(now.saturating_sub(sent)).unwrap_or(u64::MAX);
                    run.done(&mut hist, Duration::from_nanos(nanos), 1);
                }
            }
            Err(e) => {
                if run.stop.load(Ordering::Relaxed) {
                    break;
                }
                fail(&run, e).await;
            }
        }
        if run.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    hist
}

/// A `mixed` slot: one request at a time, cycling through the mix. The
/// long-poll of each connection runs beside it ([`receive`]).
async fn mixed_loop(
    c: &Conn,
    slot: usize,
    next: IdentityKey,
    batch: &[IdentityKey],
    run: &Run,
    hist: &mut Histogram<u64>,
    payload: Vec<u8>,
) {
    let mut n = 0u64;
    while run.go_on() {
        let t = Instant::now();
        let id = c.message_id(slot, n);
        let result = match n % 8 {
            0..=3 => c
                .client
                .enqueue(next, ChannelId::DEFAULT, payload.clone(), id)
                .await
                .map(drop),
            4 => c
                .client
                .enqueue_batch(batch.to_vec(), ChannelId::DEFAULT, payload.clone(), id)
                .await
                .map(drop),
            5 => c
                .client
                .upload_key_package(c.me, payload.clone(), false)
                .await
                .map(drop),
            6 => match c.client.fetch_key_package(next).await {
                // An empty pool is an answer too.
                Err(ClientError::Service(e)) if e.kind == ErrorKind::NotFound => Ok(()),
                other => other.map(drop),
            },
            _ => c.client.key_package_count(c.me).await.map(drop),
        };
        n += 1;
        match result {
            Ok(()) => run.done(hist, t.elapsed(), 0),
            Err(e) => fail(run, e).await,
        }
    }
}

async fn kp_loop(c: &Conn, run: &Run, hist: &mut Histogram<u64>, package: Vec<u8>) {
    while run.go_on() {
        let t = Instant::now();
        let result = async {
            c.client
                .upload_key_package(c.me, package.clone(), false)
                .await?;
            c.client.fetch_key_package(c.me).await
        }
        .await;
        match result {
            Ok(_) => run.done(hist, t.elapsed(), 1),
            Err(e) => fail(run, e).await,
        }
    }
}

async fn echo_loop(c: &Conn, run: &Run, hist: &mut Histogram<u64>, request: &[u8]) {
    let conn = c.client.connection();
    while run.go_on() {
        let t = Instant::now();
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(request).await?;
            send.finish()?;
            recv.read_to_end(REPLY_BYTES_MAX).await?;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => run.done(hist, t.elapsed(), 1),
            Err(e) => fail(run, e).await,
        }
    }
}

/// Counts a failure and backs off a little, so a server that refuses
/// everything is not hammered in a tight loop.
async fn fail(run: &Run, e: impl Into<FailReason>) {
    let reason = e.into();
    run.failed(&reason.0);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

struct FailReason(String);

impl From<ClientError> for FailReason {
    fn from(e: ClientError) -> Self {
        FailReason(e.to_string())
    }
}

impl From<anyhow::Error> for FailReason {
    fn from(e: anyhow::Error) -> Self {
        FailReason(format!("{e:#}"))
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

pub(crate) fn record(hist: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    hist.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

pub(crate) fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50_us: h.value_at_quantile(0.50),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        mean_us: h.mean(),
    }
}

async fn scrape_opt(config: &LoadConfig) -> anyhow::Result<Option<Samples>> {
    match &config.metrics_url {
        None => Ok(None),
        Some(url) => Ok(Some(scrape(url).await?)),
    }
}

fn server_figures(before: &Samples, after: &Samples) -> ServerFigures {
    let delta = |name: &str, labels: &[&str]| after.sum(name, labels) - before.sum(name, labels);
    let fsyncs = delta("qpq_fsyncs_total", &[]);
    let batches = delta("qpq_fsync_batches_sum", &[]);
    let enqueues = delta("qpq_requests_total", &["method=\"enqueue\""])
        - delta("qpq_request_errors_total", &["method=\"enqueue\""]);
    let per = |x: f64| if fsyncs > 0.0 { x / fsyncs } else { 0.0 };
    let durability = if after.sum("qpq_durability_fsync", &[]) > 0.0 {
        "fsync"
    } else {
        "buffered"
    };
    ServerFigures {
        durability: durability.to_owned(),
        fsyncs,
        batches,
        enqueues,
        messages_per_fsync: per(enqueues),
        batches_per_fsync: per(batches),
    }
}

fn progress_bar(config: &LoadConfig) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let (len, unit) = match config.count {
        Some(n) => (n, "ops"),
        None => (config.duration.as_millis() as u64, "ms"),
    };
    let bar = ProgressBar::new(len);
    let template = format!("{{spinner}} {{wide_bar}} {{pos}}/{{len}} {unit} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

fn tick(bar: &ProgressBar, run: &Run, start: Instant, count: Option<u64>) {
    let ops = run.ops.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    match count {
        Some(_) => bar.set_position(ops),
        None => bar.set_position(start.elapsed().as_millis() as u64),
    }
    bar.set_message(format!("{:.0} ops/s", ops as f64 / secs));
}

impl Report {
    /// The report as the human-readable lines `qpq-bench` prints.
    pub fn human(&self) -> String {
        let mut s = format!(
            "workload {} | {} connections x {} in flight | payload {} B\n\
             {} ops in {:.2} s: {:.0} ops/s",
            serde_json::to_value(self.workload)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.connections,
            self.in_flight,
            self.payload_bytes,
            self.ops,
            self.elapsed_s,
            self.ops_per_s,
        );
        if self.items != self.ops {
            s += &format!(", {} items: {:.0} items/s", self.items, self.items_per_s);
        }
        let l = &self.latency;
        s += &format!(
            "\nlatency p50 {:.3} ms | p99 {:.3} ms | p99.9 {:.3} ms | max {:.3} ms | mean {:.3} ms",
            l.p50_us as f64 / 1e3,
            l.p99_us as f64 / 1e3,
            l.p999_us as f64 / 1e3,
            l.max_us as f64 / 1e3,
            l.mean_us / 1e3
        );
        if self.errors > 0 {
            s += &format!(
                "\nerrors: {} (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        if let Some(f) = &self.server {
            s += &format!(
                "\nserver ({}): {:.0} fsyncs, {:.1} messages per fsync, {:.1} batches per fsync",
                f.durability, f.fsyncs, f.messages_per_fsync, f.batches_per_fsync
            );
        }
        s
    }
}
