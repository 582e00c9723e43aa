//! The kill loop: a child `qpq-server` on one data directory takes a mixed
//! load from concurrent clients and is killed with SIGKILL at random
//! moments, `QPQ_KILL_LOOP_KILLS` times (10 unless set), restarted on the
//! same directory after each kill. Then it is killed once more with no load
//! running, restarted, and audited: every queue is read to its end and
//! every KeyPackage pool counted and popped until empty. The checker
//! (`checker.rs`) judges the whole history: no acknowledged message lost,
//! duplicated or reordered, seqs gap-free, no KeyPackage handed out twice.
//!
//! The load, per identity, each on its own connection: a sender (enqueue,
//! enqueueBatch and enqueueMany, to its own and the other identities'
//! queues on two channels, each message under a fresh random id; a request
//! whose outcome is unknown is sent again, same ids and payloads, until it
//! is acknowledged, before anything new), a receiver (fetch and fetchWait
//! over its queues, each with the cursor of what it was last shown, which
//! acknowledges it) and a KeyPackage keeper (uploads to its own pool when
//! a count finds it low, now and then a last-resort package, and pops from
//! the other identities' pools). A request cut off by a kill is an unknown
//! outcome: it may or may not have been applied.
//!
//! The same loop runs over three nodes sharing one PostgreSQL database
//! (`storage = "postgres"`): ten identities, thirty clients, each client on
//! a home node and, while that one is down, on another (any client may use
//! any node); each kill takes one node at random. Requests the database
//! rolls back for a conflict between nodes are answered `unavailable` and
//! sent again (counted, not violations). Needs `QPQ_TEST_POSTGRES_URL` (see
//! `tests/postgres.rs`); `QPQ_KILL_LOOP_NODE_KILLS` sets its kills (6).
//!
//! `QPQ_KILL_LOOP_SEED` replays a run's choices (kill moments, operations,
//! ids, payloads); how requests interleave still depends on timing.
//! `QPQ_KILL_LOOP_SERVER` runs another `qpq-server` binary (an absolute
//! path; `benches/kill-loop.sh` gives the release build). SIGKILL keeps the
//! page cache, so this proves that recovery keeps what the process wrote,
//! not that it was synced; `durability.rs` checks the syncs.

#[path = "../common/mod.rs"]
mod common;

mod checker;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use checker::{Event, History};
use common::{id, read_start_lines, user};
use ed25519_dalek::SigningKey;
use quicproquo_client::{Client, ClientError, Fetched, ServerTrust};
use quicproquo_core::protocol::{Outgoing, RequestBody, Response};
use quicproquo_core::testing::ledger::MessageKey;
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, QueueId};
use quicproquo_core::{ErrorKind, ServiceError};
use rand_chacha::ChaCha8Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_repeated_sigkills() {
    let settings = Settings::from_env("QPQ_KILL_LOOP_KILLS", KILLS_DEFAULT);
    run(
        settings,
        Cluster {
            nodes: 1,
            postgres_url: None,
            identities: IDENTITIES,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_sigkills_of_nodes_sharing_postgres() {
    let Some(url) = common::postgres_database() else {
        return;
    };
    let settings = Settings::from_env("QPQ_KILL_LOOP_NODE_KILLS", NODE_KILLS_DEFAULT);
    run(
        settings,
        Cluster {
            nodes: NODES,
            postgres_url: Some(url),
            identities: NODE_IDENTITIES,
        },
    )
    .await;
}

/// The servers a run kills and restarts.
struct Cluster {
    /// `qpq-server` processes.
    nodes: usize,
    /// Their shared database, if any (else one node on fjall).
    postgres_url: Option<String>,
    /// Identities; each runs a sender, a receiver and a KeyPackage keeper.
    identities: u8,
}

async fn run(settings: Settings, cluster: Cluster) {
    let nodes = cluster.nodes;
    println!(
        "kill loop: {nodes} node(s){}, seed {}, {} kills, server {} (QPQ_KILL_LOOP_SEED={} replays the choices)",
        if cluster.postgres_url.is_some() {
            " on PostgreSQL"
        } else {
            ""
        },
        settings.seed,
        settings.kills,
        settings.server.display(),
        settings.seed
    );
    let started = Instant::now();
    let dirs: Vec<tempfile::TempDir> = (0..nodes).map(|_| tempfile::tempdir().unwrap()).collect();
    for dir in &dirs {
        // An empty config file so a developer's ./qpq-server.toml is not read.
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let postgres_url = cluster.postgres_url.as_deref();
    let mut servers = Vec::new();
    for dir in &dirs {
        servers.push(Some(
            ChildServer::start(&settings.server, dir.path(), postgres_url).await,
        ));
    }
    let (target, target_rx) = watch::channel(Target {
        nodes: servers
            .iter()
            .flatten()
            .map(|s| NodeTarget {
                generation: 0,
                up: Some((s.addr.clone(), s.trust.clone())),
            })
            .collect(),
    });
    let (progress, mut progress_rx) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        history: History::default(),
        target: target_rx,
        progress,
        stop: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
    });
    let keys: Vec<SigningKey> = (0..cluster.identities).map(|i| user(60 + i)).collect();
    let everyone: Vec<IdentityKey> = keys.iter().map(id).collect();

    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut keepers = Vec::new();
    // Clients spread over the nodes: sender, receiver and keeper of one
    // identity each on a node of its own where there are several.
    let mut home = 0usize;
    let mut next_home = || {
        home += 1;
        (home - 1) % nodes
    };
    for (task, key) in keys.iter().enumerate() {
        let seeds = [rng.next_u64(), rng.next_u64(), rng.next_u64()];
        senders.push(tokio::spawn(sender(
            task,
            Link::new(key.clone(), &shared, next_home()),
            everyone.clone(),
            ChaCha8Rng::seed_from_u64(seeds[0]),
        )));
        receivers.push(tokio::spawn(receiver(
            Link::new(key.clone(), &shared, next_home()),
            ChaCha8Rng::seed_from_u64(seeds[1]),
        )));
        keepers.push(tokio::spawn(keeper(
            Link::new(key.clone(), &shared, next_home()),
            everyone.clone(),
            ChaCha8Rng::seed_from_u64(seeds[2]),
        )));
    }

    let driver = Driver {
        binary: settings.server.clone(),
        dirs: dirs.iter().map(|d| d.path().to_owned()).collect(),
        postgres_url: cluster.postgres_url.clone(),
        fingerprints: servers
            .iter()
            .flatten()
            .map(|s| s.fingerprint.clone())
            .collect(),
        target,
        shared: shared.clone(),
    };
    for kill in 1..=settings.kills {
        let answered = *progress_rx.borrow();
        let load = LOAD_MS_MIN + rng.below(LOAD_MS_MAX - LOAD_MS_MIN + 1);
        tokio::time::sleep(Duration::from_millis(load)).await;
        // At least one answer since the last restart before the next
        // kill, so every life of a server does some work however slow the
        // machine.
        tokio::time::timeout(HANG_GUARD, progress_rx.wait_for(|n| *n > answered))
            .await
            .expect("no request was answered since the server started")
            .expect("progress is published");
        let node = rng.below(nodes as u64) as usize;
        let server = servers[node].take().expect("running");
        servers[node] = Some(driver.restart(server, node, kill).await);
    }

    // Stop the load: senders first get every message they sent
    // acknowledged; receivers give their cursors for the audit.
    shared.stop.store(true, Ordering::Relaxed);
    for t in senders.into_iter().chain(keepers) {
        tokio::time::timeout(HANG_GUARD, t)
            .await
            .expect("a client stops")
            .expect("a client task panicked");
    }
    let mut cursors = Vec::new();
    for t in receivers {
        cursors.push(
            tokio::time::timeout(HANG_GUARD, t)
                .await
                .expect("a receiver stops")
                .expect("a receiver task panicked"),
        );
    }

    // The last restarts, with nothing in flight, then the audit.
    for (node, slot) in servers.iter_mut().enumerate() {
        let server = slot.take().expect("running");
        let kill = settings.kills + 1 + node as u32;
        *slot = Some(driver.restart(server, node, kill).await);
    }
    tokio::time::timeout(HANG_GUARD, audit(&shared, &keys, &cursors))
        .await
        .expect("the audit finishes");
    drop(servers);

    let loaded = started.elapsed();
    let events = shared.history.events();
    let (violations, summary) = checker::check(&events);
    println!(
        "kill loop: seed {}, {} SIGKILLs ({} under load, {} before the audit) in {:.1} s, {} events checked in {:.1} s",
        settings.seed,
        summary.kills,
        settings.kills,
        nodes,
        loaded.as_secs_f64(),
        events.len(),
        (started.elapsed() - loaded).as_secs_f64()
    );
    println!("{summary}");
    println!("kill loop: {} violations", violations.len());
    assert!(
        violations.is_empty(),
        "kill loop with seed {} broke {} guarantees:\n{}",
        settings.seed,
        violations.len(),
        checker::report(&violations, REPORTED_VIOLATIONS_MAX)
    );
    assert!(
        summary.messages_acknowledged > 0 && summary.packages_popped > 0,
        "the load did nothing to check"
    );
}

/// SIGKILLs in a run unless `QPQ_KILL_LOOP_KILLS` says otherwise.
const KILLS_DEFAULT: u32 = 10;
/// Identities of the one-node run; each runs a sender, a receiver and a
/// KeyPackage keeper.
const IDENTITIES: u8 = 4;
/// Nodes sharing one PostgreSQL database, their identities (thirty
/// clients) and their SIGKILLs under load unless
/// `QPQ_KILL_LOOP_NODE_KILLS` says otherwise.
const NODES: usize = 3;
const NODE_IDENTITIES: u8 = 10;
const NODE_KILLS_DEFAULT: u32 = 6;
/// Load between a restart and the next kill, at random between these (ms).
const LOAD_MS_MIN: u64 = 50;
const LOAD_MS_MAX: u64 = 500;
/// Longest anything may take before the run is taken to hang: a server
/// start, the first answer after a restart, the clients stopping, the audit.
const HANG_GUARD: Duration = Duration::from_secs(120);
/// Connection attempts to a running server that may fail in a row.
const CONNECT_FAILURES_MAX: u32 = 20;
/// Pause after a failed connection attempt or a refusal a retry may cure.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// The channels of every identity's queues.
const CHANNELS: [&[u8]; 2] = [b"", b"kill-loop"];
/// Most recipients of one enqueueBatch or enqueueMany.
const RECIPIENTS_MAX: u64 = 3;
/// Most messages of one enqueueMany.
const MANY_MESSAGES_MAX: u64 = 4;
/// Most random bytes after a payload's unique prefix.
const PAYLOAD_FILLER_MAX: u64 = 64;
/// Most messages a receiver's fetch asks for; the audit asks for the most
/// the server gives.
const FETCH_LIMIT: u64 = 64;
const AUDIT_FETCH_LIMIT: u32 = quicproquo_core::limits::FETCH_LIMIT_MAX;
/// A receiver's fetchWait waits this long (ms) when nothing is queued.
const FETCH_WAIT_MS: u64 = 100;
/// A keeper uploads a single-use package when its pool holds fewer.
const POOL_LOW: u32 = 32;
/// Violations shown when the run fails.
const REPORTED_VIOLATIONS_MAX: usize = 30;

/// What the environment asks for.
struct Settings {
    kills: u32,
    seed: u64,
    server: PathBuf,
}

impl Settings {
    fn from_env(kills_var: &str, kills_default: u32) -> Settings {
        let number = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
            })
        };
        let server = std::env::var_os("QPQ_KILL_LOOP_SERVER").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_qpq-server")),
            PathBuf::from,
        );
        assert!(
            server.is_absolute() && server.is_file(),
            "QPQ_KILL_LOOP_SERVER must name a qpq-server binary by an absolute path, not {}",
            server.display()
        );
        Settings {
            kills: number(kills_var)
                .map_or(kills_default, |n| u32::try_from(n).expect("kills fit u32")),
            seed: number("QPQ_KILL_LOOP_SEED").unwrap_or_else(|| OsRng.next_u64()),
            server,
        }
    }
}

/// A running `qpq-server` child; killed when dropped.
struct ChildServer {
    child: Child,
    addr: String,
    fingerprint: String,
    trust: ServerTrust,
}

impl ChildServer {
    /// Starts `binary` on `dir` (its certificate; its database too unless
    /// `postgres_url` names a shared one) with limits the load never
    /// reaches.
    async fn start(binary: &Path, dir: &Path, postgres_url: Option<&str>) -> ChildServer {
        let mut command = Command::new(binary);
        command
            .env("QPQ_LISTEN", "127.0.0.1:0")
            .env("QPQ_DATA_DIR", dir)
            .env("QPQ_CONFIG", dir.join("none.toml"))
            .env("QPQ_LOG", "warn")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = postgres_url {
            command
                .env("QPQ_STORAGE", "postgres")
                .env("QPQ_POSTGRES_URL", url);
        }
        // Pops and enqueues as fast as the clients go: the kill loop checks
        // what is stored, not the rate limits.
        for key in [
            "ENQUEUE_PER_SENDER_PER_SEC",
            "ENQUEUE_PER_SENDER_BURST",
            "KEY_FETCH_PER_PAIR_PER_SEC",
            "KEY_FETCH_PER_PAIR_BURST",
            "KEY_PACKAGE_FETCH_PER_TARGET_PER_SEC",
            "KEY_PACKAGE_FETCH_PER_TARGET_BURST",
        ] {
            command.env(format!("QPQ_{key}"), "1000000");
        }
        let mut child = command.spawn().expect("spawn qpq-server");
        let pid = child.id();
        let started = tokio::task::spawn_blocking(move || {
            let (addr, fingerprint) = read_start_lines(&mut child);
            (child, addr, fingerprint)
        });
        let (child, addr, fingerprint) = match tokio::time::timeout(HANG_GUARD, started).await {
            Ok(started) => started.expect("qpq-server printed its address"),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("qpq-server did not print its address");
            }
        };
        let trust = ServerTrust::fingerprint_hex(&fingerprint).expect("a fingerprint");
        ChildServer {
            child,
            addr,
            fingerprint,
            trust,
        }
    }

    /// SIGKILL, after recording whether it had already exited.
    fn kill(mut self, history: &History, kill: u32) {
        if let Ok(Some(status)) = self.child.try_wait() {
            history.push(Event::ServerExited {
                status: status.to_string(),
            });
        }
        let _ = self.child.kill();
        self.child.wait().expect("reap qpq-server");
        history.push(Event::Killed { kill });
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills and restarts the servers.
struct Driver {
    binary: PathBuf,
    /// Each node's data directory.
    dirs: Vec<PathBuf>,
    postgres_url: Option<String>,
    /// Each node's certificate fingerprint at its first start.
    fingerprints: Vec<String>,
    target: watch::Sender<Target>,
    shared: Arc<Shared>,
}

impl Driver {
    /// SIGKILLs `server`, node `node` (kill number `kill`), and starts it
    /// again on the same directory.
    async fn restart(&self, server: ChildServer, node: usize, kill: u32) -> ChildServer {
        server.kill(&self.shared.history, kill);
        // Calls in flight on it now have an unknown outcome; its clients
        // go to another node, or wait until it is back.
        self.target.send_modify(|t| {
            t.nodes[node].generation += 1;
            t.nodes[node].up = None;
        });
        let server =
            ChildServer::start(&self.binary, &self.dirs[node], self.postgres_url.as_deref()).await;
        if server.fingerprint != self.fingerprints[node] {
            self.shared.history.push(Event::CertificateChanged);
        }
        self.target.send_modify(|t| {
            t.nodes[node].generation += 1;
            t.nodes[node].up = Some((server.addr.clone(), server.trust.clone()));
        });
        server
    }
}

/// Where the servers are.
#[derive(Debug, Clone)]
struct Target {
    nodes: Vec<NodeTarget>,
}

/// One server: the generation changes with every kill and start.
#[derive(Debug, Clone)]
struct NodeTarget {
    generation: u64,
    /// Its address and certificate, while it runs.
    up: Option<(String, ServerTrust)>,
}

/// What the driver and the clients share.
struct Shared {
    history: History,
    target: watch::Receiver<Target>,
    /// Requests answered so far.
    progress: watch::Sender<u64>,
    /// Set when the load should stop.
    stop: AtomicBool,
    /// Names fetches and pops.
    next_id: AtomicU64,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// How a call ended.
enum Outcome<T> {
    /// Answered with a result.
    Done(T),
    /// Answered with a typed error.
    Refused(ServiceError),
    /// Cut off: it may or may not have been applied.
    Unknown,
}

/// One client's connection to its home node, or to another node while
/// that one is down; made again after every kill.
struct Link {
    key: SigningKey,
    me: IdentityKey,
    shared: Arc<Shared>,
    target: watch::Receiver<Target>,
    /// The node it prefers.
    home: usize,
    /// The node, its generation and the connection.
    conn: Option<(usize, u64, Client)>,
}

impl Link {
    fn new(key: SigningKey, shared: &Arc<Shared>, home: usize) -> Link {
        Link {
            me: id(&key),
            key,
            shared: shared.clone(),
            target: shared.target.clone(),
            home,
            conn: None,
        }
    }

    /// Runs one request and records whether it was answered; a kill while
    /// it is in flight makes its outcome unknown.
    async fn call<T, F, Fut>(&mut self, method: &'static str, f: F) -> Outcome<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let (node, generation, client) = self.connected().await;
        let mut target = self.target.clone();
        let result = tokio::select! {
            biased;
            r = f(client) => Some(r),
            () = left(&mut target, node, generation) => None,
        };
        let killed = result.is_none();
        match result {
            Some(Ok(v)) => {
                self.answered(method);
                Outcome::Done(v)
            }
            // Rolled back for a concurrent request on another node: not
            // applied, sent again like an unknown outcome.
            Some(Err(ClientError::Service(e)))
                if e.kind == ErrorKind::Unavailable
                    && e.message.contains("rolled this request back") =>
            {
                self.answered(method);
                self.shared.history.push(Event::RolledBack { method });
                tokio::time::sleep(RETRY_PAUSE).await;
                Outcome::Unknown
            }
            Some(Err(ClientError::Service(e))) => {
                self.answered(method);
                Outcome::Refused(e)
            }
            Some(Err(e @ (ClientError::Decode(_) | ClientError::UnexpectedReply { .. }))) => {
                self.shared.history.push(Event::Malformed {
                    method,
                    detail: e.to_string(),
                });
                self.conn = None;
                Outcome::Unknown
            }
            Some(Err(_)) | None => {
                self.shared.history.push(Event::Unknown { method, killed });
                self.conn = None;
                Outcome::Unknown
            }
        }
    }

    fn answered(&self, method: &'static str) {
        self.shared.history.push(Event::Answered { method });
        self.shared.progress.send_modify(|n| *n += 1);
    }

    /// The connection to its home node, or to another running node while
    /// that one is down, authenticated; waits while every node is down.
    async fn connected(&mut self) -> (usize, u64, Client) {
        let mut failures = 0;
        loop {
            let current = self
                .target
                .wait_for(|t| t.nodes.iter().any(|n| n.up.is_some()))
                .await
                .expect("the driver runs")
                .clone();
            if let Some((node, generation, client)) = &self.conn {
                if current.nodes[*node].generation == *generation {
                    return (*node, *generation, client.clone());
                }
                self.conn = None;
            }
            let count = current.nodes.len();
            let node = (0..count)
                .map(|i| (self.home + i) % count)
                .find(|n| current.nodes[*n].up.is_some())
                .expect("a node is up");
            let generation = current.nodes[node].generation;
            let (addr, trust) = current.nodes[node].up.clone().expect("up");
            let key = self.key.clone();
            let mut target = self.target.clone();
            let connected = tokio::select! {
                biased;
                r = Client::connect_as(&addr, &trust, &key) => Some(r),
                () = left(&mut target, node, generation) => None,
            };
            match connected {
                Some(Ok(client)) => self.conn = Some((node, generation, client)),
                Some(Err(e)) => {
                    failures += 1;
                    assert!(
                        failures < CONNECT_FAILURES_MAX,
                        "connecting to a running server failed {failures} times in a row: {e}"
                    );
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                None => {}
            }
        }
    }

    /// Records a refusal the load does not expect.
    fn refused(&self, method: &'static str, e: &ServiceError) {
        self.shared.history.push(Event::Refused {
            method,
            kind: e.kind,
            detail: e.message.to_string(),
        });
    }
}

/// Returns once node `node`'s server of `generation` is gone (killed, or
/// replaced).
async fn left(target: &mut watch::Receiver<Target>, node: usize, generation: u64) {
    let _ = target
        .wait_for(|t| t.nodes[node].generation != generation)
        .await;
}

/// An enqueue, enqueueBatch or enqueueMany, kept to be sent again as it
/// was.
struct Send {
    kind: Kind,
    to: Vec<IdentityKey>,
    channel: ChannelId,
    messages: Vec<Outgoing>,
}

/// Which of the three.
#[derive(Debug, Clone, Copy)]
enum Kind {
    One,
    Batch,
    Many,
}

impl Send {
    fn method(&self) -> &'static str {
        match self.kind {
            Kind::One => "enqueue",
            Kind::Batch => "enqueueBatch",
            Kind::Many => "enqueueMany",
        }
    }

    fn body(&self) -> RequestBody {
        let (channel_id, first) = (self.channel, &self.messages[0]);
        match self.kind {
            Kind::One => RequestBody::Enqueue {
                recipient_key: self.to[0],
                channel_id,
                payload: first.payload.clone(),
                message_id: first.message_id,
            },
            Kind::Batch => RequestBody::EnqueueBatch {
                recipient_keys: self.to.clone(),
                channel_id,
                payload: first.payload.clone(),
                message_id: first.message_id,
            },
            Kind::Many => RequestBody::EnqueueMany {
                recipient_keys: self.to.clone(),
                channel_id,
                messages: self.messages.clone(),
            },
        }
    }
}

/// Sends until stopped, one request at a time, each until acknowledged.
async fn sender(task: usize, mut link: Link, everyone: Vec<IdentityKey>, mut rng: ChaCha8Rng) {
    let mut made = 0u64;
    while !link.shared.stopping() {
        let (kind, recipients, messages) = match rng.below(4) {
            0 | 1 => (Kind::One, 1, 1),
            2 => (Kind::Batch, 2 + rng.below(RECIPIENTS_MAX - 1), 1),
            _ => (
                Kind::Many,
                1 + rng.below(RECIPIENTS_MAX),
                2 + rng.below(MANY_MESSAGES_MAX - 1),
            ),
        };
        let to = pick(&mut rng, &everyone, recipients as usize);
        let channel = channel(CHANNELS[rng.below(CHANNELS.len() as u64) as usize]);
        let messages = (0..messages)
            .map(|_| {
                made += 1;
                let mut id = [0u8; 16];
                rng.fill_bytes(&mut id);
                // Unique per sender and message, so the checker can tell
                // which message a payload is.
                let mut payload = format!("{task}/{made}/").into_bytes();
                let filler = rng.below(PAYLOAD_FILLER_MAX + 1) as usize;
                payload.extend((0..filler).map(|_| rng.next_u32() as u8));
                Outgoing {
                    payload,
                    message_id: MessageId(id),
                }
            })
            .collect();
        let send = Send {
            kind,
            to,
            channel,
            messages,
        };
        deliver(&mut link, task, &send).await;
    }
}

/// Sends `send` until it is acknowledged (or refused for good).
async fn deliver(link: &mut Link, task: usize, send: &Send) {
    let queues: Vec<QueueId> = send
        .to
        .iter()
        .map(|r| QueueId {
            recipient_key: *r,
            channel_id: send.channel,
        })
        .collect();
    let me = link.me;
    let key = |m: &Outgoing| MessageKey {
        sender: me,
        id: m.message_id,
    };
    let method = send.method();
    loop {
        for m in &send.messages {
            for queue in &queues {
                link.shared.history.push(Event::EnqueueSent {
                    queue: *queue,
                    key: key(m),
                    payload: m.payload.clone(),
                });
            }
        }
        let body = send.body();
        match link
            .call(method, |c| async move { c.call(body).await })
            .await
        {
            Outcome::Done(response) => {
                let seqs = match response {
                    Response::Enqueued { seq } => vec![seq],
                    Response::EnqueuedBatch { seqs } => seqs,
                    other => {
                        link.shared.history.push(Event::Malformed {
                            method,
                            detail: format!("{other:?}"),
                        });
                        return;
                    }
                };
                if seqs.len() != queues.len() * send.messages.len() {
                    link.shared.history.push(Event::Malformed {
                        method,
                        detail: format!("{} seqs", seqs.len()),
                    });
                    return;
                }
                // Message by message, each in recipient order.
                for (i, seq) in seqs.into_iter().enumerate() {
                    link.shared.history.push(Event::EnqueueAcked {
                        task,
                        queue: queues[i % queues.len()],
                        key: key(&send.messages[i / queues.len()]),
                        seq,
                    });
                }
                return;
            }
            Outcome::Refused(e) => {
                link.refused(method, &e);
                if !e.kind.is_retryable() {
                    return;
                }
                tokio::time::sleep(e.kind.retry_after().unwrap_or(RETRY_PAUSE)).await;
            }
            Outcome::Unknown => {}
        }
    }
}

/// Fetches its own queues by turns until stopped; returns its cursors.
async fn receiver(mut link: Link, mut rng: ChaCha8Rng) -> Vec<u64> {
    let queues: Vec<QueueId> = CHANNELS
        .iter()
        .map(|c| QueueId {
            recipient_key: link.me,
            channel_id: channel(c),
        })
        .collect();
    let mut cursors = vec![0; queues.len()];
    for turn in 0.. {
        if link.shared.stopping() {
            break;
        }
        let q = turn % queues.len();
        let limit = 1 + rng.below(FETCH_LIMIT) as u32;
        let wait = rng.below(4) == 0;
        if let Some(f) = fetch_once(&mut link, queues[q], cursors[q], limit, wait, false).await
            && let Some(last) = f.messages.last()
        {
            cursors[q] = last.seq;
        }
    }
    cursors
}

/// One fetch (or fetchWait) of `queue` after `cursor`, recorded.
async fn fetch_once(
    link: &mut Link,
    queue: QueueId,
    cursor: u64,
    limit: u32,
    wait: bool,
    audit: bool,
) -> Option<Fetched> {
    let fetch = link.shared.next_id();
    link.shared.history.push(Event::FetchSent {
        fetch,
        queue,
        cursor,
    });
    let QueueId {
        recipient_key,
        channel_id,
    } = queue;
    let method = if wait { "fetchWait" } else { "fetch" };
    let outcome = link
        .call(method, |c| async move {
            if wait {
                c.fetch_wait(recipient_key, channel_id, cursor, limit, FETCH_WAIT_MS)
                    .await
            } else {
                c.fetch(recipient_key, channel_id, cursor, limit).await
            }
        })
        .await;
    match outcome {
        Outcome::Done(f) => {
            link.shared.history.push(Event::Fetched {
                fetch,
                queue,
                cursor,
                limit,
                messages: f.messages.clone(),
                next_seq: f.next_seq,
                gap: f.gap,
                audit,
            });
            Some(f)
        }
        Outcome::Refused(e) => {
            link.refused(method, &e);
            None
        }
        Outcome::Unknown => None,
    }
}

/// Keeps its own KeyPackage pool stocked and pops from the others' until
/// stopped.
async fn keeper(mut link: Link, everyone: Vec<IdentityKey>, mut rng: ChaCha8Rng) {
    let others: Vec<IdentityKey> = everyone.into_iter().filter(|k| *k != link.me).collect();
    let mut made = 0u64;
    while !link.shared.stopping() {
        match rng.below(10) {
            0..=4 => {
                let target = others[rng.below(others.len() as u64) as usize];
                pop_once(&mut link, target).await;
            }
            5..=8 => {
                let me = link.me;
                let count = link
                    .call("keyPackageCount", |c| async move {
                        c.key_package_count(me).await
                    })
                    .await;
                match count {
                    Outcome::Done((count, _)) if count < POOL_LOW => {
                        made += 1;
                        upload(&mut link, &mut rng, made, false).await;
                    }
                    Outcome::Refused(e) => link.refused("keyPackageCount", &e),
                    _ => {}
                }
            }
            _ => {
                made += 1;
                upload(&mut link, &mut rng, made, true).await;
            }
        }
    }
}

/// One upload to the link's own pool, recorded; never sent again (a
/// second copy of a package would be a second package).
async fn upload(link: &mut Link, rng: &mut ChaCha8Rng, made: u64, last_resort: bool) {
    let me = link.me;
    let mut package =
        format!("kp/{}/{made}/", quicproquo_core::types::hex(&me.0[..4])).into_bytes();
    let filler = rng.below(PAYLOAD_FILLER_MAX + 1) as usize;
    package.extend((0..filler).map(|_| rng.next_u32() as u8));
    link.shared.history.push(Event::KpUploadSent {
        owner: me,
        package: package.clone(),
        last_resort,
    });
    let sent = package.clone();
    match link
        .call("uploadKeyPackage", |c| async move {
            c.upload_key_package(me, sent, last_resort).await
        })
        .await
    {
        Outcome::Done(_) => link.shared.history.push(Event::KpUploaded {
            owner: me,
            package,
            last_resort,
        }),
        Outcome::Refused(e) => link.refused("uploadKeyPackage", &e),
        Outcome::Unknown => {}
    }
}

/// What a pop got.
enum Pop {
    Package(Vec<u8>, bool),
    NotFound,
    Nothing,
}

/// One pop of `target`'s pool, recorded.
async fn pop_once(link: &mut Link, target: IdentityKey) -> Pop {
    let pop = link.shared.next_id();
    link.shared.history.push(Event::PopSent { pop });
    match link
        .call("fetchKeyPackage", |c| async move {
            c.fetch_key_package(target).await
        })
        .await
    {
        Outcome::Done((package, last_resort)) => {
            link.shared.history.push(Event::Popped {
                pop,
                target,
                package: package.clone(),
                last_resort,
            });
            Pop::Package(package, last_resort)
        }
        Outcome::Refused(e) if e.kind == ErrorKind::NotFound => {
            link.shared.history.push(Event::PopNotFound { pop, target });
            Pop::NotFound
        }
        Outcome::Refused(e) => {
            link.refused("fetchKeyPackage", &e);
            Pop::Nothing
        }
        Outcome::Unknown => {
            link.shared.history.push(Event::PopUnknown { target });
            Pop::Nothing
        }
    }
}

/// Reads every queue from its owner's cursor to its end, then counts every
/// pool and pops it until empty (by the next identity).
async fn audit(shared: &Arc<Shared>, keys: &[SigningKey], cursors: &[Vec<u64>]) {
    for (key, cursors) in keys.iter().zip(cursors) {
        let mut link = Link::new(key.clone(), shared, 0);
        for (c, mut cursor) in CHANNELS.iter().zip(cursors.iter().copied()) {
            let queue = QueueId {
                recipient_key: link.me,
                channel_id: channel(c),
            };
            loop {
                let f = fetch_once(&mut link, queue, cursor, AUDIT_FETCH_LIMIT, false, true)
                    .await
                    .expect("nothing stops the audit's fetches");
                match f.messages.last() {
                    Some(last) => cursor = last.seq,
                    None => break,
                }
            }
        }
    }
    for (n, key) in keys.iter().enumerate() {
        let mut owner = Link::new(key.clone(), shared, 0);
        let me = owner.me;
        let (count, has_last_resort) = match owner
            .call("keyPackageCount", |c| async move {
                c.key_package_count(me).await
            })
            .await
        {
            Outcome::Done(counted) => counted,
            _ => panic!("the audit's count was not answered"),
        };
        let mut popper = Link::new(keys[(n + 1) % keys.len()].clone(), shared, 0);
        let mut popped = Vec::new();
        let then_last_resort = loop {
            match pop_once(&mut popper, me).await {
                Pop::Package(package, false) if popped.len() < count as usize => {
                    popped.push(package);
                }
                Pop::Package(_, last_resort) => break Some(last_resort),
                Pop::NotFound => break None,
                Pop::Nothing => panic!("the audit's pop was not answered"),
            }
        };
        shared.history.push(Event::KpAudited {
            owner: me,
            count,
            has_last_resort,
            popped,
            then_last_resort,
        });
    }
}

/// The channel named by `bytes`.
fn channel(bytes: &[u8]) -> ChannelId {
    ChannelId::try_from_slice(bytes).expect("a channel id")
}

/// `n` distinct items of `from`, at random.
fn pick(rng: &mut ChaCha8Rng, from: &[IdentityKey], n: usize) -> Vec<IdentityKey> {
    let mut all = from.to_vec();
    for i in 0..n.min(all.len()) {
        let j = i + rng.below((all.len() - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// Uniform draws below a bound.
trait Below {
    fn below(&mut self, n: u64) -> u64;
}

impl Below for ChaCha8Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
