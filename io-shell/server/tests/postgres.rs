//! The PostgreSQL store ([`PgStore`]) under the real NodeService machine,
//! driven in turns like the shell drives it: its key-value operations, the
//! machine's requests and a restart, and two machines (two nodes) over one
//! database whose turns conflict, where PostgreSQL rolls one back, the
//! machine answers it `unavailable`, and the retry lands with the next seq
//! (no gap, no seq given twice, no KeyPackage handed out twice).
//!
//! Needs a PostgreSQL server: `QPQ_TEST_POSTGRES_URL` names one whose user
//! may create databases (`.ci/postgres.sh start` makes a throwaway cluster
//! and prints it); each test makes a database of its own. Without it the
//! tests say so and pass, unless `QPQ_POSTGRES_TESTS=require` (set by
//! `.ci/run`).

#[path = "common/mod.rs"]
mod common;

use ed25519_dalek::{Signer, SigningKey};
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{
    Durability, NodeConfig, NodeService, Output, Reply, Request, RequestBody, Response,
    auth_message,
};
use quicproquo_core::store::{Batch, Store, run_key};
use quicproquo_core::time::Time;
use quicproquo_core::types::{
    ChannelId, ConnectionId, IdentityKey, MessageId, RequestId, Signature,
};
use quicproquo_core::{ErrorKind, ServiceError};
use quicproquo_server::store::postgres::{PgOptions, PgStore, PgSync, STATEMENT_TIMEOUT};
use quicproquo_server::store::{ShellStore, StorageError};
use quicproquo_server::testing::{InProcessServer, Setup};

const TLS_EXPORTER: [u8; 32] = [7; 32];
const CONN: ConnectionId = ConnectionId(1);

fn database() -> Option<String> {
    common::postgres_database()
}

fn open(url: &str) -> PgStore {
    PgStore::open(PgOptions {
        url: url.to_owned(),
        synchronous_commit: true,
    })
    .unwrap()
}

/// One node: the machine over a [`PgStore`], one authenticated connection,
/// each call one turn of its own unless [`Node::begin`] opened one.
struct Node {
    node: NodeService<PgStore>,
    sync: PgSync,
    next_request: u64,
    in_turn: bool,
}

impl Node {
    fn start(url: &str, seed: u8) -> Node {
        let store = open(url);
        let sync = store.sync_handle();
        let config = NodeConfig {
            durability: Durability::Fsync,
            ..NodeConfig::default()
        };
        let mut node = NodeService::new(config, [seed; 32], store).unwrap();
        node.handle_connection_opened(Time::ZERO, CONN, TLS_EXPORTER)
            .unwrap();
        Node {
            node,
            sync,
            next_request: 0,
            in_turn: false,
        }
    }

    /// Opens a turn that [`Node::end`] closes.
    fn begin(&mut self) {
        assert!(!self.in_turn);
        self.in_turn = true;
        self.node.store_mut().begin_turn();
    }

    /// Hands a request to the machine inside the open turn.
    fn submit(&mut self, body: RequestBody) -> RequestId {
        assert!(self.in_turn);
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.node.handle_request(
            Time::ZERO,
            CONN,
            id,
            Request {
                auth_version: AUTH_VERSION,
                body,
            },
        );
        id
    }

    /// Closes the turn as the shell does and returns the replies that left,
    /// and whether the turn was rolled back.
    fn end(&mut self) -> (Vec<(RequestId, Reply)>, bool) {
        assert!(self.in_turn);
        self.in_turn = false;
        let aborted = match self.node.store_mut().end_turn() {
            Ok(()) => false,
            Err(StorageError::TurnAborted { kept, reason }) => {
                self.node.handle_turn_aborted(Time::ZERO, kept, &reason);
                true
            }
            Err(e) => panic!("store failed: {e}"),
        };
        self.node.handle_synced(Time::ZERO, self.sync.settled());
        let mut replies = Vec::new();
        while let Some(out) = self.node.poll_output() {
            if let Output::Reply {
                request_id, reply, ..
            } = out
            {
                replies.push((request_id, reply));
            }
        }
        (replies, aborted)
    }

    fn call(&mut self, body: RequestBody) -> Reply {
        self.begin();
        let id = self.submit(body);
        let (replies, _) = self.end();
        assert_eq!(replies.len(), 1, "one reply per call: {replies:?}");
        assert_eq!(replies[0].0, id);
        replies.into_iter().next().unwrap().1
    }

    fn authenticate(&mut self, key: &SigningKey) {
        let Ok(Response::AuthChallenge { nonce }) = self.call(RequestBody::AuthChallenge) else {
            panic!("no challenge");
        };
        let identity_key = IdentityKey(key.verifying_key().to_bytes());
        let message = auth_message(&identity_key, &nonce, &TLS_EXPORTER);
        let signature = Signature(key.sign(&message).to_bytes());
        let reply = self.call(RequestBody::Authenticate {
            identity_key,
            signature,
        });
        assert_eq!(reply, Ok(Response::Authenticated));
    }
}

fn identity(key: &SigningKey) -> IdentityKey {
    IdentityKey(key.verifying_key().to_bytes())
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
        limit: 100,
    }
}

fn seq_of(reply: &Reply) -> u64 {
    match reply {
        Ok(Response::Enqueued { seq }) => *seq,
        other => panic!("expected a seq, got {other:?}"),
    }
}

fn payloads(reply: Reply) -> Vec<(u64, Vec<u8>)> {
    match reply {
        Ok(Response::Messages { messages, .. }) => {
            messages.into_iter().map(|m| (m.seq, m.payload)).collect()
        }
        other => panic!("expected messages, got {other:?}"),
    }
}

fn is_rolled_back(reply: &Reply) -> bool {
    matches!(reply, Err(ServiceError { kind: ErrorKind::Unavailable, message, .. }) if message.contains("rolled this request back"))
}

#[test]
fn the_key_value_map_reads_what_was_written_in_key_order() {
    let Some(url) = database() else { return };
    let mut store = open(&url);
    let mut b = Batch::new();
    for seq in [3u64, 1, 2, 5] {
        b.put(run_key(b"run/", seq), vec![seq as u8; 300]);
    }
    b.put(b"other".to_vec(), b"x".to_vec());
    b.put(b"gone".to_vec(), b"y".to_vec());
    b.delete(b"gone".to_vec());
    let first = store.write(b).unwrap();
    assert_eq!(store.get(b"other").unwrap(), Some(b"x".to_vec()));
    assert_eq!(
        store.get(b"gone").unwrap(),
        None,
        "the batch's last op wins"
    );
    let mut head = [0u8; 4];
    assert_eq!(
        store.get_head(&run_key(b"run/", 2), &mut head).unwrap(),
        Some(300)
    );
    assert_eq!(head, [2; 4]);
    // A run stops at the first missing seq (4).
    let mut seen = Vec::new();
    store
        .get_run(b"run/", 1, 10, &mut |seq, v| {
            seen.push((seq, v.len()));
            true
        })
        .unwrap();
    assert_eq!(seen, vec![(1, 300), (2, 300), (3, 300)]);
    // Scans: by prefix, after a key, bounded.
    let keys = |r: Vec<(Vec<u8>, Vec<u8>)>| r.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(store.scan(b"run/", None, 10).unwrap()),
        [1u64, 2, 3, 5].map(|s| run_key(b"run/", s)).to_vec()
    );
    assert_eq!(
        keys(store.scan(b"run/", Some(&run_key(b"run/", 2)), 2).unwrap()),
        vec![run_key(b"run/", 3), run_key(b"run/", 5)]
    );
    // A turn's writes are visible inside it and gone when it is rolled
    // back; a batch number is never given twice.
    store.begin_turn();
    let mut b = Batch::new();
    b.put(b"turn".to_vec(), b"1".to_vec());
    let second = store.write(b).unwrap();
    assert!(second > first);
    assert_eq!(store.get(b"turn").unwrap(), Some(b"1".to_vec()));
    store.end_turn().unwrap();
    assert_eq!(store.get(b"turn").unwrap(), Some(b"1".to_vec()));
    // Reopened, the data is there.
    drop(store);
    let store = open(&url);
    assert_eq!(store.get(b"turn").unwrap(), Some(b"1".to_vec()));
    assert_eq!(store.get(b"other").unwrap(), Some(b"x".to_vec()));
}

#[test]
fn the_machine_keeps_what_it_acknowledged_across_a_restart() {
    let Some(url) = database() else { return };
    let alice = SigningKey::from_bytes(&[1; 32]);
    let mut node = Node::start(&url, 1);
    node.authenticate(&alice);
    let me = identity(&alice);
    for i in 1..=5u8 {
        assert_eq!(seq_of(&node.call(enqueue(me, i, &[i; 64]))), u64::from(i));
    }
    // A retried id is stored once.
    assert_eq!(seq_of(&node.call(enqueue(me, 3, &[3; 64]))), 3);
    drop(node);
    let mut node = Node::start(&url, 2);
    node.authenticate(&alice);
    let got = payloads(node.call(fetch(me, 0)));
    assert_eq!(
        got,
        (1..=5u8)
            .map(|i| (u64::from(i), vec![i; 64]))
            .collect::<Vec<_>>()
    );
    // Acknowledged (fetch after seq 3) messages are gone; seqs go on.
    assert_eq!(payloads(node.call(fetch(me, 3))).len(), 2);
    assert_eq!(seq_of(&node.call(enqueue(me, 9, b"next"))), 6);
}

#[test]
fn two_nodes_conflicting_turn_is_rolled_back_and_its_retry_takes_the_next_seq() {
    let Some(url) = database() else { return };
    let alice = SigningKey::from_bytes(&[1; 32]);
    let bob = SigningKey::from_bytes(&[2; 32]);
    let carol = SigningKey::from_bytes(&[3; 32]);
    let mut one = Node::start(&url, 1);
    let mut two = Node::start(&url, 2);
    one.authenticate(&alice);
    two.authenticate(&bob);
    let to = identity(&carol);
    assert_eq!(seq_of(&one.call(enqueue(to, 1, b"first"))), 1);

    // Node one's turn reads carol's queue (its snapshot begins) ...
    one.begin();
    let counted = one.submit(RequestBody::Enqueue {
        recipient_key: identity(&alice),
        channel_id: ChannelId::DEFAULT,
        payload: b"to myself".to_vec(),
        message_id: MessageId([7; 16]),
    });
    // ... node two enqueues to carol and commits ...
    assert_eq!(seq_of(&two.call(enqueue(to, 2, b"from two"))), 2);
    // ... and node one's enqueue to carol, from its older snapshot, cannot
    // be ordered after it: PostgreSQL rolls the whole turn back.
    let late = one.submit(enqueue(to, 3, b"from one"));
    let (replies, aborted) = one.end();
    assert!(aborted, "the turn was rolled back");
    assert_eq!(replies.len(), 2, "{replies:?}");
    for (id, reply) in &replies {
        assert!([counted, late].contains(id));
        assert!(is_rolled_back(reply), "{reply:?}");
    }
    // Sent again, it lands after node two's, and node one's other request
    // too; nothing of the rolled-back turn was kept.
    assert_eq!(seq_of(&one.call(enqueue(to, 3, b"from one"))), 3);
    assert_eq!(
        seq_of(&one.call(RequestBody::Enqueue {
            recipient_key: identity(&alice),
            channel_id: ChannelId::DEFAULT,
            payload: b"to myself".to_vec(),
            message_id: MessageId([7; 16]),
        })),
        1
    );
    let mut reader = Node::start(&url, 3);
    reader.authenticate(&carol);
    assert_eq!(
        payloads(reader.call(fetch(to, 0))),
        vec![
            (1, b"first".to_vec()),
            (2, b"from two".to_vec()),
            (3, b"from one".to_vec())
        ]
    );
}

#[test]
fn a_key_package_raced_for_by_two_nodes_is_handed_out_once() {
    let Some(url) = database() else { return };
    let owner = SigningKey::from_bytes(&[4; 32]);
    let a = SigningKey::from_bytes(&[5; 32]);
    let b = SigningKey::from_bytes(&[6; 32]);
    let mut up = Node::start(&url, 1);
    up.authenticate(&owner);
    for i in 1..=2u8 {
        let reply = up.call(RequestBody::UploadKeyPackage {
            identity_key: identity(&owner),
            package: vec![i; 100],
            last_resort: false,
            cipher_suite: 0,
        });
        assert!(reply.is_ok(), "{reply:?}");
    }
    let mut one = Node::start(&url, 2);
    let mut two = Node::start(&url, 3);
    one.authenticate(&a);
    two.authenticate(&b);
    let pop = || RequestBody::FetchKeyPackage {
        identity_key: identity(&owner),
        cipher_suite: 0,
    };
    // Node one's turn reads (its own queue: the turn's snapshot begins);
    // node two pops a package and commits; then node one pops, from its
    // older snapshot.
    one.begin();
    let counted = one.submit(fetch(identity(&a), 0));
    let got_two = two.call(pop());
    let first = one.submit(pop());
    let (mut replies, aborted) = one.end();
    replies.retain(|(id, _)| *id != counted);
    let mut handed = Vec::new();
    if let Ok(Response::KeyPackage { package, .. }) = &got_two {
        handed.push(package.clone());
    } else {
        panic!("node two got no package: {got_two:?}");
    }
    // Node one's pop read the package node two had taken: rolled back.
    assert!(aborted, "node one's pop was rolled back: {replies:?}");
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, first);
    assert!(is_rolled_back(&replies[0].1), "{replies:?}");
    let again = one.call(pop());
    let Ok(Response::KeyPackage { package, .. }) = again else {
        panic!("the retry got no package: {again:?}");
    };
    handed.push(package);
    handed.sort();
    handed.dedup();
    assert_eq!(handed.len(), 2, "each package handed out once");
}

/// Two real servers (the production shell, in this process) over one
/// database: a long-poll on node one is answered by an enqueue through
/// node two, by the notification node two's commit sends — well before
/// the long-poll's own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_one_node_wakes_when_another_node_enqueues() {
    let Some(url) = database() else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let setup = || Setup {
        postgres_url: Some(url.clone()),
        ..Setup::default()
    };
    let one = InProcessServer::start_with(d1.path(), setup());
    let two = InProcessServer::start_with(d2.path(), setup());
    let alice = SigningKey::from_bytes(&[1; 32]);
    let bob = SigningKey::from_bytes(&[2; 32]);
    let a = one.login(&alice).await;
    let b = two.login(&bob).await;
    let me = identity(&alice);
    let mut wakes = Vec::new();
    let mut after = 0;
    for round in 0..5u8 {
        let waiting = tokio::spawn({
            let a = a.clone();
            async move {
                a.fetch_wait(me, ChannelId::DEFAULT, after, 10, 20_000)
                    .await
            }
        });
        // Let the long-poll park on node one.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let sent = std::time::Instant::now();
        let seq = b
            .enqueue(
                me,
                ChannelId::DEFAULT,
                vec![round; 32],
                MessageId([round; 16]),
            )
            .await
            .unwrap();
        let fetched = waiting.await.unwrap().unwrap();
        let woke = sent.elapsed();
        assert_eq!(
            fetched
                .messages
                .iter()
                .map(|m| (m.seq, m.payload.clone()))
                .collect::<Vec<_>>(),
            vec![(seq, vec![round; 32])]
        );
        after = seq;
        wakes.push(woke);
    }
    wakes.sort();
    eprintln!("enqueue on node two to wake-up on node one: {wakes:?}");
    // Its deadline was 20 s; woken by the notification it takes
    // milliseconds (the median is kept under a generous bound for a loaded
    // machine; the figures are printed above).
    assert!(
        wakes[2] < std::time::Duration::from_secs(2),
        "woken by the deadline, not by node two: {wakes:?}"
    );
    drop((a, b));
    one.stop().await;
    two.stop().await;
}

/// A throwaway PostgreSQL cluster of this test's own (`.ci/postgres.sh`),
/// so that it can be crashed and started again; stopped and removed when
/// dropped.
struct OwnCluster {
    dir: String,
    url: String,
}

impl OwnCluster {
    fn script(args: &[&str]) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci/postgres.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .args(args)
            .output()
            .expect("run .ci/postgres.sh");
        assert!(
            out.status.success(),
            ".ci/postgres.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn start() -> OwnCluster {
        let printed = Self::script(&["start"]);
        let value = |name: &str| {
            printed
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} in {printed}"))
                .to_owned()
        };
        OwnCluster {
            dir: value("QPQ_TEST_POSTGRES_DIR"),
            url: value("QPQ_TEST_POSTGRES_URL"),
        }
    }

    fn crash(&self) {
        Self::script(&["crash", &self.dir]);
    }

    fn restart(&self) {
        Self::script(&["restart", &self.dir]);
    }

    fn freeze(&self) {
        Self::script(&["freeze", &self.dir]);
    }

    fn thaw(&self) {
        Self::script(&["thaw", &self.dir]);
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        // A frozen cluster would not stop.
        let _ = std::panic::catch_unwind(|| Self::script(&["thaw", &self.dir]));
        let _ = std::panic::catch_unwind(|| Self::script(&["stop", &self.dir]));
    }
}

/// What the sender of the outage test saw.
#[derive(Default)]
struct Seen {
    /// Message number -> the seq its enqueue was acknowledged with.
    acked: std::collections::BTreeMap<u32, u64>,
    /// Answers `unavailable` while the database was away.
    unavailable: u64,
    /// The longest any call took.
    slowest: std::time::Duration,
}

/// PostgreSQL crashed (immediate shutdown) and started again under load:
/// while it is away every request is answered `unavailable` at once, the
/// node recovers by itself when it returns, and nothing acknowledged is
/// lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_crashing_and_coming_back_under_load_loses_nothing_acknowledged() {
    outage_under_load(Outage::Crash).await;
}

/// PostgreSQL hung (every process of it stopped) for longer than a
/// statement may take, under load, then went on: requests are answered
/// `unavailable` within the bounds (a statement, then a connection
/// attempt), no stream hangs, the node recovers by itself, and a commit
/// that completed after the node gave up on it is found by the retry (the
/// same seq, not a second copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_hanging_under_load_is_answered_within_the_bound() {
    outage_under_load(Outage::Hang).await;
}

/// How the database goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Immediate shutdown, then a start (recovery from its WAL).
    Crash,
    /// SIGSTOP of all its processes, then SIGCONT.
    Hang,
}

async fn outage_under_load(outage: Outage) {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    if database().is_none() {
        return;
    }
    let cluster = OwnCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start_with(
        dir.path(),
        Setup {
            postgres_url: Some(cluster.url.clone()),
            ..Setup::default()
        },
    );
    let alice = SigningKey::from_bytes(&[1; 32]);
    let bob = SigningKey::from_bytes(&[2; 32]);
    let to = identity(&bob);
    let seen = std::sync::Arc::new(Mutex::new(Seen::default()));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sender = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let client = server.login(&alice).await;
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                // Each message until acknowledged, same id and payload.
                loop {
                    let started = Instant::now();
                    let got = client
                        .enqueue(
                            to,
                            ChannelId::DEFAULT,
                            n.to_be_bytes().to_vec(),
                            MessageId([n as u8; 16]).with_number(n),
                        )
                        .await;
                    let took = started.elapsed();
                    let done = {
                        let mut s = seen.lock().unwrap();
                        s.slowest = s.slowest.max(took);
                        match got {
                            Ok(seq) => {
                                s.acked.insert(n, seq);
                                true
                            }
                            Err(e) => {
                                assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                                s.unavailable += 1;
                                false
                            }
                        }
                    };
                    if done {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let acked = |seen: &Mutex<Seen>| seen.lock().unwrap().acked.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(acked(&seen) > 0, "the load runs before the crash");
    let during = match outage {
        Outage::Crash => {
            cluster.crash();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let during = acked(&seen);
            cluster.restart();
            during
        }
        Outage::Hang => {
            cluster.freeze();
            // Longer than a statement may take.
            tokio::time::sleep(STATEMENT_TIMEOUT + Duration::from_secs(2)).await;
            let during = acked(&seen);
            cluster.thaw();
            during
        }
    };
    // Recovered by itself: acknowledgements resume.
    let back = Instant::now();
    while acked(&seen) <= during + 10 {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "no recovery within 30 s of the database's return"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = back.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{outage:?}: {} acknowledged, {} answered unavailable while the database was away, slowest call {:?}, recovered {:?} after its return",
        seen.acked.len(),
        seen.unavailable,
        seen.slowest,
        recovered
    );
    assert!(seen.unavailable > 0, "the outage was seen");
    // A crashed database refuses connections at once; a hung one holds a
    // request for at most a statement and then a connection attempt.
    let bound = match outage {
        Outage::Crash => STATEMENT_TIMEOUT,
        Outage::Hang => STATEMENT_TIMEOUT * 2,
    } + Duration::from_secs(3);
    assert!(
        seen.slowest < bound,
        "a call waited {:?}, longer than {bound:?}",
        seen.slowest
    );
    // Everything acknowledged is there once, at its seq, seqs gap-free.
    let reader = server.login(&bob).await;
    let mut stored = Vec::new();
    let mut cursor = 0;
    loop {
        let f = reader
            .fetch(to, ChannelId::DEFAULT, cursor, 1_000)
            .await
            .unwrap();
        let Some(last) = f.messages.last() else { break };
        cursor = last.seq;
        stored.extend(f.messages);
    }
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "seqs are gap-free");
    }
    for (n, seq) in &seen.acked {
        let m = &stored[(*seq - 1) as usize];
        assert_eq!(
            m.payload,
            n.to_be_bytes().to_vec(),
            "message {n} at its seq {seq}"
        );
    }
    let numbers: std::collections::BTreeSet<Vec<u8>> =
        stored.iter().map(|m| m.payload.clone()).collect();
    assert_eq!(numbers.len(), stored.len(), "no message stored twice");
    drop((reader, cluster));
    server.stop().await;
}

/// A distinct message id per message number.
trait WithNumber {
    fn with_number(self, n: u32) -> MessageId;
}

impl WithNumber for MessageId {
    fn with_number(mut self, n: u32) -> MessageId {
        self.0[..4].copy_from_slice(&n.to_be_bytes());
        self
    }
}

/// An MLS Commit as the fence reads it: group `g`, `epoch`, body `n`.
fn commit_payload(group: u8, epoch: u64, n: u64) -> Vec<u8> {
    let mut v = quicproquo_core::protocol::framing::GROUP_ENVELOPE_PREFIX.to_vec();
    v.extend_from_slice(&[0, 1, 0, 2, 2, b'g', b'0' + group]);
    v.extend_from_slice(&epoch.to_be_bytes());
    v.push(3);
    v.extend_from_slice(format!("commit {n}").as_bytes());
    v
}

/// `qpq-server migrate --from fjall --to postgres` on a store with messages
/// (one shared by several queues), KeyPackages (and a last-resort one), a
/// hybrid key and a commit fence: a server on PostgreSQL then serves all
/// of it as the fjall one would have, its counters go on, the fence holds,
/// and a second migration into the same database is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_a_fjall_store_into_postgres_whole() {
    use quicproquo_core::node::hybrid_key_message;
    use quicproquo_core::protocol::Outgoing;

    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob, carol) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
        SigningKey::from_bytes(&[3; 32]),
    );
    let (to_bob, to_carol) = (identity(&bob), identity(&carol));
    let hybrid = b"a hybrid public key".to_vec();
    let group = ChannelId::try_from_slice(b"group-1").unwrap();
    {
        let server = InProcessServer::start(dir.path());
        let a = server.login(&alice).await;
        for i in 1..=3u8 {
            a.enqueue(to_bob, ChannelId::DEFAULT, vec![i; 40], MessageId([i; 16]))
                .await
                .unwrap();
        }
        // One payload stored once for two queues.
        let shared = a
            .call(RequestBody::EnqueueMany {
                recipient_keys: vec![to_bob, to_carol],
                channel_id: ChannelId::DEFAULT,
                messages: vec![Outgoing {
                    payload: b"to both".to_vec(),
                    message_id: MessageId([9; 16]),
                }],
            })
            .await
            .unwrap();
        assert!(
            matches!(shared, Response::EnqueuedBatch { .. }),
            "{shared:?}"
        );
        // A Commit moves the group's fence to epoch 6.
        a.enqueue(to_bob, group, commit_payload(1, 5, 1), MessageId([20; 16]))
            .await
            .unwrap();
        let b = server.login(&bob).await;
        b.fetch(to_bob, ChannelId::DEFAULT, 1, 10).await.unwrap(); // acknowledges seq 1
        for (i, last_resort) in [(1u8, false), (2, false), (3, true)] {
            b.upload_key_package(to_bob, vec![i; 64], last_resort)
                .await
                .unwrap();
        }
        let signature = Signature(bob.sign(&hybrid_key_message(&to_bob, &hybrid)).to_bytes());
        b.upload_hybrid_key(to_bob, hybrid.clone(), signature)
            .await
            .unwrap();
        drop((a, b));
        server.stop().await;
    }

    let run = |url: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_qpq-server"))
            .args(["migrate", "--from", "fjall", "--to", "postgres"])
            .env("QPQ_DATA_DIR", dir.path())
            .env("QPQ_POSTGRES_URL", url)
            .env("QPQ_CONFIG", dir.path().join("none.toml"))
            .output()
            .unwrap()
    };
    std::fs::write(dir.path().join("none.toml"), "").unwrap();
    let out = run(&url);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("read back and compared"), "{said}");
    eprintln!("{}", said.trim());

    // Served from PostgreSQL now.
    let pg_dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start_with(
        pg_dir.path(),
        Setup {
            postgres_url: Some(url.clone()),
            ..Setup::default()
        },
    );
    let a = server.login(&alice).await;
    let b = server.login(&bob).await;
    let c = server.login(&carol).await;
    let bobs = b.fetch(to_bob, ChannelId::DEFAULT, 1, 10).await.unwrap();
    assert_eq!(
        bobs.messages
            .iter()
            .map(|m| (m.seq, m.payload.clone()))
            .collect::<Vec<_>>(),
        vec![(2, vec![2; 40]), (3, vec![3; 40]), (4, b"to both".to_vec())],
        "what bob had not acknowledged"
    );
    let carols = c.fetch(to_carol, ChannelId::DEFAULT, 0, 10).await.unwrap();
    assert_eq!(carols.messages.len(), 1);
    assert_eq!(carols.messages[0].payload, b"to both");
    // Counters go on; a retried id still finds its seq.
    assert_eq!(
        a.enqueue(
            to_bob,
            ChannelId::DEFAULT,
            b"after".to_vec(),
            MessageId([10; 16])
        )
        .await
        .unwrap(),
        5
    );
    assert_eq!(
        a.enqueue(to_bob, ChannelId::DEFAULT, vec![3; 40], MessageId([3; 16]))
            .await
            .unwrap(),
        3
    );
    // KeyPackages in upload order, then the last-resort one.
    for expect in [
        (vec![1; 64], false),
        (vec![2; 64], false),
        (vec![3; 64], true),
    ] {
        assert_eq!(a.fetch_key_package(to_bob).await.unwrap(), expect);
    }
    assert_eq!(a.fetch_hybrid_key(to_bob).await.unwrap().0, hybrid);
    // The fence is there: another Commit for epoch 5 is stale.
    let stale = a
        .enqueue(to_bob, group, commit_payload(1, 5, 2), MessageId([21; 16]))
        .await
        .unwrap_err();
    assert!(
        matches!(stale.kind(), ErrorKind::StaleEpoch { current_epoch: 6 }),
        "{stale}"
    );
    drop((a, b, c));
    server.stop().await;

    // The target holds data now: a second migration is refused, typed.
    let out = run(&url);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already holds qpq data"), "{err}");
}
