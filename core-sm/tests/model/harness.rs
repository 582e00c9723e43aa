// The model test's harness: operations, the reference model, the run that
// drives a NodeService over a store and checks it against the model. Not a
// test crate of its own: `tests/model.rs` includes it (over MemStore), and
// so does the server's `tests/postgres_model.rs` (over PostgreSQL). The
// includer defines `DEFAULT_CASES` and the tests. What the model checks is
// described at the top of `tests/model.rs`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sha2::{Digest, Sha256};

use quicproquo_core::limits::{
    AUTH_VERSION, COMMIT_FENCE_HISTORY, FETCH_LIMIT_MAX, FETCH_WAIT_TIMEOUT_MS_MAX,
};
use quicproquo_core::node::{
    ChannelMessages, Durability, Gap, NodeConfig, NodeService, Outgoing, Output, QueuedMessage,
    RateConfig, Reply, Request, RequestBody, Response, auth_message, hybrid_key_message,
};
use quicproquo_core::protocol::framing;
use quicproquo_core::store::{Lsn, MemStore, Store};
use quicproquo_core::testing::ledger::{FetchView, Ledger, MessageKey};
use quicproquo_core::types::{
    ChannelId, ConnectionId, IdentityKey, MessageId, QueueId, RequestId, Signature,
};
use quicproquo_core::{ErrorKind, ServiceError, Time};

/// Longest generated operation sequence.
const OPS_MAX: usize = 60;

/// Identities with an authenticated connection each.
const IDENTITIES: usize = 4;
/// The actor index of the connection that never authenticates.
const ANON: usize = IDENTITIES;
/// Channels per recipient: the default one and one named channel.
const CHANNELS: usize = 2;

/// Small limits so sequences of 60 operations run into them.
const KEY_PACKAGES_MAX: usize = 2;
const QUEUE_DEPTH_MAX: usize = 4;
const QUEUE_BYTES_MAX: usize = 100;
const WAITERS_PER_CONNECTION_MAX: usize = 2;
const WAITERS_MAX: usize = 3;
/// Messages older than this are dropped (the message TTL): a long tick
/// expires what came before it.
const MESSAGE_TTL_MS: u64 = 20_000;


/// The running machine of a [`Run`] (a macro, not a method, so that the
/// borrow is of the field alone).
macro_rules! running {
    (&$node:expr) => {
        $node.as_ref().expect("running")
    };
    ($node:expr) => {
        $node.as_mut().expect("running")
    };
}

// ----- the store under the machine ---------------------------------------

/// A store the model can run the machine over: the [`Store`] plus the
/// test's control of durability. Over [`MemStore`] the test decides what is
/// synced and a crash loses the rest; a store that makes every batch
/// durable as it writes it (PostgreSQL) reports everything synced, and a
/// crash loses nothing.
trait ModelStore: Store + Sized {
    /// Whether every batch is durable once written (then only what the
    /// machine was told, not what the store synced, holds replies back).
    const DURABLE_ON_WRITE: bool;
    /// An empty store.
    fn fresh() -> Self;
    /// The last batch written.
    fn last_lsn(&self) -> Lsn;
    /// The last batch that is durable.
    fn synced_lsn(&self) -> Lsn;
    /// Makes everything written durable; returns the last batch covered.
    fn sync(&mut self) -> Lsn;
    /// Makes the batches up to `lsn` durable (at least); returns the last
    /// batch covered.
    fn sync_up_to(&mut self, lsn: Lsn) -> Lsn;
    /// A crash of the machine: what is not durable is lost.
    fn crash(&mut self);
}

impl ModelStore for MemStore {
    const DURABLE_ON_WRITE: bool = false;
    fn fresh() -> Self {
        MemStore::new()
    }
    fn last_lsn(&self) -> Lsn {
        MemStore::last_lsn(self)
    }
    fn synced_lsn(&self) -> Lsn {
        MemStore::synced_lsn(self)
    }
    fn sync(&mut self) -> Lsn {
        MemStore::sync(self)
    }
    fn sync_up_to(&mut self, lsn: Lsn) -> Lsn {
        MemStore::sync_up_to(self, lsn)
    }
    fn crash(&mut self) {
        MemStore::crash(self)
    }
}

// ----- operations --------------------------------------------------------

/// Whose resource a request names: the actor's own, or another identity's.
#[derive(Debug, Clone, Copy)]
enum Target {
    Own,
    Other(usize),
}

impl Target {
    fn resolve(self, actor: usize) -> usize {
        match self {
            // The anonymous connection owns nothing; it names identity 0.
            Target::Own => actor % IDENTITIES,
            Target::Other(i) => i,
        }
    }
}

/// The `afterSeq` a fetch sends.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// The highest seq the owner has been shown (the normal client).
    LastSeen,
    /// An older cursor, as after a lost reply.
    Behind(u64),
    /// Nothing seen yet.
    Zero,
    /// The queue's last seq, seen or not.
    Tail,
    /// Beyond the last seq: must be refused.
    Future(u64),
}

#[derive(Debug, Clone)]
enum MessageIdChoice {
    Fresh,
    /// Reuse a message id sent before, to its queue or to this op's queue.
    Retry {
        /// Which of the ids sent so far (modulo their number).
        pick: usize,
        same_queue: bool,
    },
}

/// One message of an [`Op::EnqueueGroup`].
#[derive(Debug, Clone)]
struct MessageSpec {
    payload_bytes: usize,
    message_id: MessageIdChoice,
    /// A Commit of group `.0 % 2` made in epoch `.1`, instead of opaque
    /// bytes.
    commit: Option<(u8, u8)>,
}

#[derive(Debug, Clone)]
enum Op {
    UploadKeyPackage {
        actor: usize,
        target: Target,
        last_resort: bool,
    },
    FetchKeyPackage {
        actor: usize,
        target: usize,
    },
    KeyPackageCount {
        actor: usize,
        target: Target,
    },
    /// Upload a hybrid key signed by the target's key, or (if not
    /// `signed_right`) by another identity's key.
    UploadHybridKey {
        actor: usize,
        target: Target,
        signed_right: bool,
    },
    FetchHybridKey {
        actor: usize,
        target: usize,
    },
    Enqueue {
        actor: usize,
        recipient: usize,
        channel: usize,
        payload_bytes: usize,
        message_id: MessageIdChoice,
    },
    Fetch {
        actor: usize,
        target: Target,
        channel: usize,
        cursor: Cursor,
        limit: u32,
    },
    FetchWait {
        actor: usize,
        target: Target,
        channel: usize,
        cursor: Cursor,
        limit: u32,
        timeout_ms: u64,
    },
    /// enqueueBatch (one message) or enqueueMany (`many`) to several
    /// recipients on one channel: duplicate or no recipients, no messages
    /// and repeated ids are refusals to reach; Commits meet the fence.
    EnqueueGroup {
        actor: usize,
        recipients: Vec<usize>,
        channel: usize,
        messages: Vec<MessageSpec>,
        many: bool,
    },
    /// fetchWaitChannels over the target's queues on several channels.
    FetchWaitChannels {
        actor: usize,
        target: Target,
        cursors: Vec<(usize, Cursor)>,
        limit: u32,
        timeout_ms: u64,
    },
    Tick {
        ms: u64,
    },
    /// Sync the store (everything, or up to a point in the unsynced range)
    /// and, if `notify`, tell the machine. Without `notify` the sync is
    /// durable but the machine has not heard of it yet.
    Sync {
        /// How many unsynced batches to sync, less one (modulo their
        /// number); `None` syncs everything.
        upto: Option<u16>,
        notify: bool,
    },
    Crash,
    /// The process stops and starts again but the store keeps its unsynced
    /// writes (the OS still holds them).
    Restart,
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model.txt",
        ))),
        ..ProptestConfig::default()
    }
}

fn actor() -> impl Strategy<Value = usize> {
    prop_oneof![12 => 0..IDENTITIES, 1 => Just(ANON)]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![5 => Just(Target::Own), 1 => (0..IDENTITIES).prop_map(Target::Other)]
}

/// Recipients and channels lean towards one queue so that it fills up.
fn recipient() -> impl Strategy<Value = usize> {
    prop_oneof![2 => Just(0), 3 => 0..IDENTITIES]
}

fn channel_index() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(0), 1 => 0..CHANNELS]
}

/// Mostly small payloads, sometimes large ones that hit the byte limit.
fn payload_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1..=8usize, 1 => 30..=60usize]
}

fn cursor() -> impl Strategy<Value = Cursor> {
    prop_oneof![
        6 => Just(Cursor::LastSeen),
        2 => (1..3u64).prop_map(Cursor::Behind),
        1 => Just(Cursor::Zero),
        2 => Just(Cursor::Tail),
        1 => (1..3u64).prop_map(Cursor::Future),
    ]
}

fn message_id() -> impl Strategy<Value = MessageIdChoice> {
    prop_oneof![
        4 => Just(MessageIdChoice::Fresh),
        2 => (any::<usize>(), prop::bool::weighted(0.8))
            .prop_map(|(pick, same_queue)| MessageIdChoice::Retry { pick, same_queue }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (actor(), target(), prop::bool::weighted(0.2)).prop_map(
            |(actor, target, last_resort)| Op::UploadKeyPackage { actor, target, last_resort }
        ),
        3 => (actor(), 0..IDENTITIES)
            .prop_map(|(actor, target)| Op::FetchKeyPackage { actor, target }),
        1 => (actor(), target()).prop_map(|(actor, target)| Op::KeyPackageCount { actor, target }),
        1 => (actor(), target(), prop::bool::weighted(0.8)).prop_map(
            |(actor, target, signed_right)| Op::UploadHybridKey { actor, target, signed_right }
        ),
        1 => (actor(), 0..IDENTITIES)
            .prop_map(|(actor, target)| Op::FetchHybridKey { actor, target }),
        7 => (actor(), recipient(), channel_index(), payload_bytes(), message_id())
            .prop_map(|(actor, recipient, channel, payload_bytes, message_id)| Op::Enqueue {
                actor,
                recipient,
                channel,
                payload_bytes,
                message_id,
            }),
        4 => (actor(), target(), channel_index(), cursor(), 0..4u32).prop_map(
            |(actor, target, channel, cursor, limit)| Op::Fetch {
                actor,
                target,
                channel,
                cursor,
                limit,
            }
        ),
        5 => (
            actor(),
            target(),
            channel_index(),
            cursor(),
            prop_oneof![1 => Just(0u32), 12 => 1..4u32],
            prop_oneof![Just(0u64), Just(100), Just(1_000), Just(60_000)],
        )
            .prop_map(|(actor, target, channel, cursor, limit, timeout_ms)| Op::FetchWait {
                actor,
                target,
                channel,
                cursor,
                limit,
                timeout_ms,
            }),
        4 => (
            actor(),
            vec(recipient(), 0..=3),
            channel_index(),
            vec(message_spec(), 0..=3),
            prop::bool::weighted(0.6),
        )
            .prop_map(|(actor, recipients, channel, messages, many)| Op::EnqueueGroup {
                actor,
                recipients,
                channel,
                messages,
                many,
            }),
        3 => (
            actor(),
            target(),
            vec((0..CHANNELS, cursor()), 0..=3),
            prop_oneof![1 => Just(0u32), 12 => 1..4u32],
            prop_oneof![Just(0u64), Just(100), Just(1_000), Just(60_000)],
        )
            .prop_map(|(actor, target, cursors, limit, timeout_ms)| Op::FetchWaitChannels {
                actor,
                target,
                cursors,
                limit,
                timeout_ms,
            }),
        2 => prop_oneof![Just(0u64), Just(100), Just(1_000), Just(25_000), Just(30_000)]
            .prop_map(|ms| Op::Tick { ms }),
        4 => (prop::option::weighted(0.3, any::<u16>()), prop::bool::weighted(0.9))
            .prop_map(|(upto, notify)| Op::Sync { upto, notify }),
        1 => Just(Op::Crash),
        1 => Just(Op::Restart),
    ]
}

fn message_spec() -> impl Strategy<Value = MessageSpec> {
    (
        prop_oneof![1 => Just(0usize), 16 => payload_bytes()],
        message_id(),
        prop::option::weighted(0.3, (0..2u8, 0..4u8)),
    )
        .prop_map(|(payload_bytes, message_id, commit)| MessageSpec {
            payload_bytes,
            message_id,
            commit,
        })
}

fn upload(actor: usize, last_resort: bool) -> Op {
    Op::UploadKeyPackage {
        actor,
        target: Target::Own,
        last_resort,
    }
}

fn enqueue(actor: usize, recipient: usize) -> Op {
    Op::Enqueue {
        actor,
        recipient,
        channel: 0,
        payload_bytes: 5,
        message_id: MessageIdChoice::Fresh,
    }
}

fn fetch(actor: usize, cursor: Cursor, limit: u32) -> Op {
    Op::Fetch {
        actor,
        target: Target::Own,
        channel: 0,
        cursor,
        limit,
    }
}

fn fetch_wait(actor: usize, timeout_ms: u64) -> Op {
    Op::FetchWait {
        actor,
        target: Target::Own,
        channel: 0,
        cursor: Cursor::LastSeen,
        limit: 2,
        timeout_ms,
    }
}

fn sync_all() -> Op {
    Op::Sync {
        upto: None,
        notify: true,
    }
}

// ----- the reference model -----------------------------------------------

/// A queue: (recipient identity, channel index).
type Q = (usize, usize);

/// What the store holds, as the model sees it.
#[derive(Debug, Clone, Default)]
struct Durable {
    queues: BTreeMap<Q, QueueModel>,
    pools: BTreeMap<usize, Pool>,
    /// Identity -> its hybrid key and the signature over it.
    hybrid_keys: BTreeMap<usize, (Vec<u8>, Signature)>,
    /// The commit fence per (channel, MLS group id).
    fences: BTreeMap<FenceKey, FenceModel>,
}

/// A message a queue holds already: its seq and payload.
type Stored = (u64, Vec<u8>);

/// A commit fence's key: channel index and MLS group id.
type FenceKey = (usize, Vec<u8>);

/// A commit fence: the epoch whose Commit is accepted next, and the
/// Commits accepted for the epochs before it, newest first.
#[derive(Debug, Clone)]
struct FenceModel {
    epoch: u64,
    accepted: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct QueueModel {
    next_seq: u64,
    messages: VecDeque<(u64, Vec<u8>)>,
    /// When each stored message was enqueued (ms), for the TTL.
    stamps: BTreeMap<u64, u64>,
    /// Seqs below this were dropped by the TTL (0: none ever).
    expired_below: u64,
    /// (Sender, message id) -> its seq and the payload stored under it.
    dedup: BTreeMap<(usize, [u8; 16]), (u64, Vec<u8>)>,
}

impl Default for QueueModel {
    fn default() -> Self {
        QueueModel {
            next_seq: 1,
            messages: VecDeque::new(),
            stamps: BTreeMap::new(),
            expired_below: 0,
            dedup: BTreeMap::new(),
        }
    }
}

impl QueueModel {
    fn bytes(&self) -> usize {
        self.messages.iter().map(|(_, p)| p.len()).sum()
    }

    /// Drops the messages older than the TTL from the front, as of
    /// `now_ms`; whether any went.
    fn expire(&mut self, now_ms: u64) -> bool {
        let mut dropped = false;
        while let Some((seq, _)) = self.messages.front() {
            let stamp = self.stamps.get(seq).copied().unwrap_or(now_ms);
            if now_ms.saturating_sub(stamp) <= MESSAGE_TTL_MS {
                break;
            }
            let seq = *seq;
            self.messages.pop_front();
            self.stamps.remove(&seq);
            self.expired_below = seq + 1;
            dropped = true;
        }
        dropped
    }
}

#[derive(Debug, Clone, Default)]
struct Pool {
    fifo: VecDeque<Vec<u8>>,
    last_resort: Option<Vec<u8>>,
}

#[derive(Debug)]
struct WaiterModel {
    request_id: RequestId,
    actor: usize,
    /// Its queues and their cursors: one for a fetchWait, one per channel
    /// for a fetchWaitChannels (`channels`).
    cursors: Vec<(Q, u64)>,
    channels: bool,
    limit: u32,
    deadline: Time,
}

impl WaiterModel {
    fn waits_on(&self, q: Q) -> bool {
        self.cursors.iter().any(|(wq, _)| *wq == q)
    }
}

/// A reply the machine owes: what it must say, and the last write before it.
#[derive(Debug)]
struct Pending {
    conn: ConnectionId,
    expected: Reply,
    bound: Lsn,
    meta: Meta,
}

/// What a released reply teaches the clients, for [`Seen`].
#[derive(Debug)]
enum Meta {
    None,
    FetchKeyPackage {
        target: usize,
    },
    FetchHybridKey {
        target: usize,
    },
    /// An enqueue of any kind: per seq of the reply, in order, its queue,
    /// sender and message id, and the payload stored under it.
    Enqueued {
        entries: Vec<(Q, MessageKey, Vec<u8>)>,
    },
    /// A `fetchWaitChannels`: per channel queue, what a Messages reply of it
    /// would carry as meta.
    Channels {
        channels: Vec<Meta>,
    },
    Messages {
        queue: Q,
        cursor: u64,
        limit: u32,
        /// `Seen` as of the reply's creation: what it must not contradict.
        next_seq_floor: u64,
        acked_floor: u64,
        deletable_upto: u64,
    },
}

/// A reply created by one step, before the machine's `Lsn` is known.
struct Expected {
    request_id: RequestId,
    actor: usize,
    reply: Reply,
    meta: Meta,
}

#[derive(Default)]
struct Outcome {
    /// Batches the machine must write for this step.
    writes: u64,
    /// The model after each of them but the last (the last is the model
    /// as the step leaves it).
    mid: Vec<Durable>,
    replies: Vec<Expected>,
}

/// What clients sent, and what they learned from released replies;
/// survives crashes. The queues' part is the shared [`Ledger`]; the
/// KeyPackages' part is the model's own.
#[derive(Debug, Default)]
struct Seen {
    /// Every package sent in an upload by its owner -> that owner. (Its
    /// acknowledgement may be lost in a crash although the upload is durable.)
    uploaded: HashMap<Vec<u8>, usize>,
    /// Single-use packages handed out.
    handed_out: HashSet<Vec<u8>>,
    /// The queues: what was sent, acknowledged, fetched and shown.
    ledger: Ledger,
}

// ----- the run: machine, model and checks --------------------------------

struct Run<S: ModelStore> {
    /// The machine; `None` only while it restarts.
    node: Option<NodeService<S>>,
    keys: Vec<SigningKey>,
    ids: Vec<IdentityKey>,
    now: Time,
    /// One connection per actor; renewed on restart.
    conns: Vec<ConnectionId>,
    next_conn: u64,
    next_request: u64,
    incarnation: u8,
    /// Highest `Lsn` passed to `handle_synced` in this incarnation.
    told: Lsn,
    /// Highest `Output::Sync` in this incarnation.
    sync_requested: Lsn,
    /// The store's last `Lsn` at the latest crash: batches up to it are
    /// durable or gone.
    lost_upto: Lsn,
    model: Durable,
    /// `(Lsn, model after that batch)`, oldest first.
    snapshots: Vec<(Lsn, Durable)>,
    waiters: Vec<WaiterModel>,
    pending: BTreeMap<RequestId, Pending>,
    seen: Seen,
    /// Every reply released, in order, for the deterministic tests.
    released: Vec<Reply>,
    next_package: u64,
    next_message: u64,
    sent_ids: Vec<(Q, [u8; 16])>,
}

impl<S: ModelStore> Run<S> {
    fn new() -> Self {
        let keys: Vec<SigningKey> = (0..IDENTITIES)
            .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
            .collect();
        let ids = keys
            .iter()
            .map(|k| IdentityKey(k.verifying_key().to_bytes()))
            .collect();
        let node = NodeService::new(config(), seed(0), S::fresh()).expect("fresh store");
        let mut run = Run {
            node: Some(node),
            keys,
            ids,
            now: Time::from_millis(1_000),
            conns: Vec::new(),
            next_conn: 1,
            next_request: 1,
            incarnation: 0,
            told: Lsn(0),
            sync_requested: Lsn(0),
            lost_upto: Lsn(0),
            model: Durable::default(),
            snapshots: vec![(Lsn(0), Durable::default())],
            waiters: Vec::new(),
            pending: BTreeMap::new(),
            seen: Seen::default(),
            released: Vec::new(),
            next_package: 0,
            next_message: 0,
            sent_ids: Vec::new(),
        };
        run.open_connections();
        run
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::UploadKeyPackage {
                actor,
                target,
                last_resort,
            } => {
                let target = target.resolve(*actor);
                let package = package_bytes(self.next_package);
                self.next_package += 1;
                let rid = self.alloc_request();
                let outcome = self.model_upload(rid, *actor, target, &package, *last_resort);
                let body = RequestBody::UploadKeyPackage {
                    identity_key: self.ids[target],
                    package,
                    last_resort: *last_resort, cipher_suite: 0, };
                self.submit(rid, *actor, body, outcome);
            }
            Op::FetchKeyPackage { actor, target } => {
                let rid = self.alloc_request();
                let outcome = self.model_fetch_key_package(rid, *actor, *target);
                let body = RequestBody::FetchKeyPackage {
                    identity_key: self.ids[*target], cipher_suite: 0, };
                self.submit(rid, *actor, body, outcome);
            }
            Op::KeyPackageCount { actor, target } => {
                let target = target.resolve(*actor);
                let rid = self.alloc_request();
                let outcome = self.model_count(rid, *actor, target);
                let body = RequestBody::KeyPackageCount {
                    identity_key: self.ids[target], cipher_suite: 0, };
                self.submit(rid, *actor, body, outcome);
            }
            Op::UploadHybridKey {
                actor,
                target,
                signed_right,
            } => {
                let target = target.resolve(*actor);
                let hybrid_key = format!("hybrid-key-{}", self.next_package).into_bytes();
                self.next_package += 1;
                let signer = if *signed_right {
                    target
                } else {
                    (target + 1) % IDENTITIES
                };
                let message = hybrid_key_message(&self.ids[target], &hybrid_key);
                let signature = Signature(self.keys[signer].sign(&message).to_bytes());
                let rid = self.alloc_request();
                let outcome =
                    self.model_upload_hybrid_key(rid, *actor, target, &hybrid_key, signature);
                let body = RequestBody::UploadHybridKey {
                    identity_key: self.ids[target],
                    hybrid_key,
                    signature,
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::FetchHybridKey { actor, target } => {
                let rid = self.alloc_request();
                let outcome = self.model_fetch_hybrid_key(rid, *actor, *target);
                let body = RequestBody::FetchHybridKey {
                    identity_key: self.ids[*target],
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::Enqueue {
                actor,
                recipient,
                channel: ch,
                payload_bytes,
                message_id,
            } => {
                let mut queue = (*recipient, *ch);
                let id = match message_id {
                    MessageIdChoice::Retry { pick, same_queue } if !self.sent_ids.is_empty() => {
                        let (q, id) = self.sent_ids[*pick % self.sent_ids.len()];
                        if *same_queue {
                            queue = q;
                        }
                        id
                    }
                    _ => {
                        let mut id = [0u8; 16];
                        id[..8].copy_from_slice(&self.next_message.to_be_bytes());
                        id
                    }
                };
                if !self.sent_ids.contains(&(queue, id)) {
                    self.sent_ids.push((queue, id));
                }
                let payload = payload_bytes_for(self.next_message, *payload_bytes);
                self.next_message += 1;
                let q = self.qid(queue);
                let key = self.message_key(*actor, id);
                self.seen.ledger.sent(q, key, &payload);
                let rid = self.alloc_request();
                let outcome =
                    self.model_enqueue(rid, *actor, &[queue], &[(id, payload.clone())], false);
                let body = RequestBody::Enqueue {
                    recipient_key: self.ids[queue.0],
                    channel_id: channel(queue.1),
                    payload,
                    message_id: MessageId(id),
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::Fetch {
                actor,
                target,
                channel: ch,
                cursor,
                limit,
            } => {
                let queue = (target.resolve(*actor), *ch);
                let after_seq = self.cursor(*actor, queue, *cursor);
                let rid = self.alloc_request();
                let outcome = self.model_fetch(rid, *actor, queue, after_seq, *limit, None);
                let body = RequestBody::Fetch {
                    recipient_key: self.ids[queue.0],
                    channel_id: channel(queue.1),
                    after_seq,
                    limit: *limit,
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::FetchWait {
                actor,
                target,
                channel: ch,
                cursor,
                limit,
                timeout_ms,
            } => {
                let queue = (target.resolve(*actor), *ch);
                let after_seq = self.cursor(*actor, queue, *cursor);
                let rid = self.alloc_request();
                let outcome =
                    self.model_fetch(rid, *actor, queue, after_seq, *limit, Some(*timeout_ms));
                let body = RequestBody::FetchWait {
                    recipient_key: self.ids[queue.0],
                    channel_id: channel(queue.1),
                    after_seq,
                    limit: *limit,
                    timeout_ms: *timeout_ms,
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::EnqueueGroup {
                actor,
                recipients,
                channel: ch,
                messages,
                many,
            } => {
                let queues: Vec<Q> = recipients.iter().map(|r| (*r, *ch)).collect();
                let default = [MessageSpec {
                    payload_bytes: 5,
                    message_id: MessageIdChoice::Fresh,
                    commit: None,
                }];
                let specs = if *many {
                    &messages[..]
                } else {
                    messages
                        .get(..1)
                        .filter(|m| !m.is_empty())
                        .unwrap_or(&default)
                };
                let mut msgs = Vec::new();
                for spec in specs {
                    let id = self.message_id_for(&spec.message_id);
                    let payload = match spec.commit {
                        Some((group, epoch)) => {
                            commit_payload(group % 2, u64::from(epoch), self.next_message)
                        }
                        None => payload_bytes_for(self.next_message, spec.payload_bytes),
                    };
                    self.next_message += 1;
                    for q in &queues {
                        if !self.sent_ids.contains(&(*q, id)) {
                            self.sent_ids.push((*q, id));
                        }
                        let qid = self.qid(*q);
                        let key = self.message_key(*actor, id);
                        self.seen.ledger.sent(qid, key, &payload);
                    }
                    msgs.push((id, payload));
                }
                let rid = self.alloc_request();
                let refused = dispatch_error(&queues, &msgs, *many);
                let outcome = match refused {
                    Some(kind) => answer(rid, *actor, error(kind), Meta::None, false),
                    None => self.model_enqueue(rid, *actor, &queues, &msgs, true),
                };
                let recipient_keys = queues.iter().map(|q| self.ids[q.0]).collect();
                let body = if *many {
                    RequestBody::EnqueueMany {
                        recipient_keys,
                        channel_id: channel(*ch),
                        messages: msgs
                            .into_iter()
                            .map(|(id, payload)| Outgoing {
                                payload,
                                message_id: MessageId(id),
                            })
                            .collect(),
                    }
                } else {
                    let (id, payload) = msgs.into_iter().next().expect("one message");
                    RequestBody::EnqueueBatch {
                        recipient_keys,
                        channel_id: channel(*ch),
                        payload,
                        message_id: MessageId(id),
                    }
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::FetchWaitChannels {
                actor,
                target,
                cursors,
                limit,
                timeout_ms,
            } => {
                let owner = target.resolve(*actor);
                let mut model_cursors = Vec::new();
                for (ch, c) in cursors {
                    let queue = (owner, *ch);
                    let after_seq = self.cursor(*actor, queue, *c);
                    model_cursors.push((queue, after_seq));
                }
                let rid = self.alloc_request();
                let outcome =
                    self.model_fetch_channels(rid, *actor, &model_cursors, *limit, *timeout_ms);
                let body = RequestBody::FetchWaitChannels {
                    recipient_key: self.ids[owner],
                    cursors: model_cursors
                        .iter()
                        .map(|((_, ch), after_seq)| (channel(*ch), *after_seq))
                        .collect(),
                    limit: *limit,
                    timeout_ms: *timeout_ms,
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::Tick { ms } => {
                self.now = self.now.saturating_add(Duration::from_millis(*ms));
                let before = running!(&self.node).store().last_lsn();
                let outcome = self.model_expire();
                running!(self.node).handle_timeout(self.now);
                self.settle(before, outcome);
            }
            Op::Sync { upto, notify } => {
                self.sync_store(*upto, *notify);
                let before = running!(&self.node).store().last_lsn();
                self.settle(before, Outcome::default());
            }
            Op::Crash => self.restart(true),
            Op::Restart => self.restart(false),
        }
    }

    /// Ends a case: crash, reopen, and read back every queue, pool and
    /// hybrid key (reads only, so nothing changes). What
    /// was acknowledged must have survived (checked by the model and by the
    /// delivery check on the Messages replies).
    fn audit_after_crash(&mut self) {
        self.restart(true);
        for owner in 0..IDENTITIES {
            for ch in 0..CHANNELS {
                self.step(&Op::Fetch {
                    actor: owner,
                    target: Target::Own,
                    channel: ch,
                    cursor: Cursor::Zero,
                    limit: FETCH_LIMIT_MAX,
                });
            }
            self.step(&Op::KeyPackageCount {
                actor: owner,
                target: Target::Own,
            });
            self.step(&Op::FetchHybridKey {
                actor: owner,
                target: owner,
            });
        }
        self.step(&sync_all());
        assert!(self.pending.is_empty(), "audit replies were not released");
    }

    /// Stops the machine and opens a new one over its store. With `crash`
    /// the store first loses every unsynced batch and the model rolls back
    /// to the synced `Lsn`. Replies not yet released and waiters are lost
    /// either way; clients reconnect and authenticate again.
    fn restart(&mut self, crash: bool) {
        let mut store = self.node.take().expect("running").into_store();
        if crash {
            let synced = store.synced_lsn();
            store.crash();
            self.lost_upto = store.last_lsn();
            self.snapshots.retain(|(lsn, _)| *lsn <= synced);
            self.model = self
                .snapshots
                .last()
                .expect("the empty snapshot at Lsn 0 is never dropped")
                .1
                .clone();
        }
        self.pending.clear();
        self.waiters.clear();
        self.incarnation += 1;
        self.node = Some(
            NodeService::new(config(), seed(self.incarnation), store)
                .expect("the store reopens after a restart"),
        );
        self.told = Lsn(0);
        self.sync_requested = Lsn(0);
        self.open_connections();
        self.check_invariants();
    }

    /// Message `id` from `actor`, as the server tells a retry by it (an
    /// anonymous actor's enqueue is refused; its key names nobody).
    fn message_key(&self, actor: usize, id: [u8; 16]) -> MessageKey {
        MessageKey {
            sender: self.ids.get(actor).copied().unwrap_or(IdentityKey([0; 32])),
            id: MessageId(id),
        }
    }

    /// A message id as `choice` says: a fresh one (another actor's, so
    /// another message, or the same actor's, a retry).
    fn message_id_for(&self, choice: &MessageIdChoice) -> [u8; 16] {
        match choice {
            MessageIdChoice::Retry { pick, .. } if !self.sent_ids.is_empty() => {
                self.sent_ids[*pick % self.sent_ids.len()].1
            }
            _ => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&self.next_message.to_be_bytes());
                id
            }
        }
    }

    // ----- driving the machine --------------------------------------------

    fn alloc_request(&mut self) -> RequestId {
        let rid = RequestId(self.next_request);
        self.next_request += 1;
        rid
    }

    fn send(&mut self, rid: RequestId, actor: usize, body: RequestBody) {
        running!(self.node).handle_request(
            self.now,
            self.conns[actor],
            rid,
            Request {
                auth_version: AUTH_VERSION,
                body,
            },
        );
    }

    fn submit(&mut self, rid: RequestId, actor: usize, body: RequestBody, outcome: Outcome) {
        let before = running!(&self.node).store().last_lsn();
        self.send(rid, actor, body);
        self.settle(before, outcome);
    }

    /// After the machine took one input: check its writes against the
    /// model's, snapshot the model, register the replies this step owes,
    /// drain every output and check the invariants.
    fn settle(&mut self, before: Lsn, outcome: Outcome) {
        let lsn = running!(&self.node).store().last_lsn();
        assert_eq!(
            lsn.0 - before.0,
            outcome.writes,
            "the machine wrote {} batches where the model expected {}",
            lsn.0 - before.0,
            outcome.writes
        );
        if outcome.writes > 0 {
            assert_eq!(outcome.mid.len() as u64, outcome.writes - 1);
            for (i, m) in outcome.mid.into_iter().enumerate() {
                self.snapshots.push((Lsn(before.0 + 1 + i as u64), m));
            }
            self.snapshots.push((lsn, self.model.clone()));
        }
        for e in outcome.replies {
            let previous = self.pending.insert(
                e.request_id,
                Pending {
                    conn: self.conns[e.actor],
                    expected: e.reply,
                    bound: lsn,
                    meta: e.meta,
                },
            );
            assert!(previous.is_none(), "two replies owed to one request");
        }
        self.drain();
        self.check_invariants();
    }

    fn drain(&mut self) {
        while let Some(out) = running!(self.node).poll_output() {
            match out {
                Output::Sync { lsn } => self.note_sync_request(lsn),
                Output::Reply {
                    conn,
                    request_id,
                    reply,
                } => self.release(conn, request_id, reply),
            }
        }
    }

    fn note_sync_request(&mut self, lsn: Lsn) {
        assert!(lsn > self.sync_requested, "sync requests must move forward");
        assert!(
            lsn <= running!(&self.node).store().last_lsn(),
            "sync of an unwritten Lsn"
        );
        self.sync_requested = lsn;
    }

    fn release(&mut self, conn: ConnectionId, rid: RequestId, reply: Reply) {
        let Some(p) = self.pending.remove(&rid) else {
            panic!("reply to {rid:?} came out although none was due: {reply:?}");
        };
        assert_eq!(conn, p.conn, "reply to {rid:?} on the wrong connection");
        let store = running!(&self.node).store();
        let durable = store.synced_lsn().max(self.lost_upto);
        assert!(
            p.bound <= durable,
            "reply to {rid:?} released before its writes were durable \
             (needs {:?}, synced {:?}): {reply:?}",
            p.bound,
            store.synced_lsn()
        );
        assert!(
            p.bound <= self.told.max(self.lost_upto),
            "reply to {rid:?} released before handle_synced covered {:?}",
            p.bound
        );
        assert!(
            same(&reply, &p.expected),
            "reply to {rid:?} differs from the model\n machine: {reply:?}\n   model: {:?}",
            p.expected
        );
        self.observe(p.meta, &reply);
        self.released.push(reply);
    }

    fn observe(&mut self, meta: Meta, reply: &Reply) {
        match (meta, reply) {
            (
                Meta::FetchKeyPackage { target },
                Ok(Response::KeyPackage {
                    package,
                    last_resort,
                }),
            ) => {
                assert_eq!(
                    self.seen.uploaded.get(package),
                    Some(&target),
                    "KeyPackage {package:?} was never uploaded by identity {target}"
                );
                if !last_resort {
                    assert!(
                        self.seen.handed_out.insert(package.clone()),
                        "single-use KeyPackage {package:?} handed out twice"
                    );
                }
            }
            (
                Meta::FetchHybridKey { target },
                Ok(Response::HybridKey {
                    hybrid_key,
                    signature,
                }),
            ) => {
                let message = hybrid_key_message(&self.ids[target], hybrid_key);
                let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
                assert!(
                    self.keys[target]
                        .verifying_key()
                        .verify_strict(&message, &signature)
                        .is_ok(),
                    "a hybrid key of identity {target} came back without its owner's signature"
                );
            }
            (Meta::Enqueued { entries }, Ok(Response::Enqueued { seq })) => {
                self.observe_enqueued(entries, &[*seq]);
            }
            (Meta::Enqueued { entries }, Ok(Response::EnqueuedBatch { seqs })) => {
                self.observe_enqueued(entries, seqs);
            }
            (Meta::Channels { channels }, Ok(Response::ChannelMessages { channels: got })) => {
                for (meta, c) in channels.into_iter().zip(got) {
                    let reply = Ok(Response::Messages {
                        messages: c.messages.clone(),
                        next_seq: c.next_seq,
                        gap: c.gap,
                    });
                    self.observe(meta, &reply);
                }
            }
            (
                Meta::Messages {
                    queue,
                    cursor,
                    limit,
                    next_seq_floor,
                    acked_floor,
                    deletable_upto,
                },
                Ok(Response::Messages {
                    messages,
                    next_seq,
                    gap,
                }),
            ) => {
                let view = FetchView {
                    limit: Some(limit),
                    next_seq_floor: Some(next_seq_floor),
                    deleted_upto: Some(acked_floor),
                    deletable_upto: Some(deletable_upto),
                    from_cursor: false,
                };
                let queue = self.qid(queue);
                let broken = self
                    .seen
                    .ledger
                    .fetched(queue, cursor, messages, *next_seq, *gap, view);
                assert!(broken.is_empty(), "fetch of {queue:?}: {broken:?}");
            }
            _ => {}
        }
    }

    fn observe_enqueued(&mut self, entries: Vec<(Q, MessageKey, Vec<u8>)>, seqs: &[u64]) {
        assert_eq!(
            entries.len(),
            seqs.len(),
            "one seq per message and recipient"
        );
        for ((queue, key, payload), seq) in entries.into_iter().zip(seqs) {
            let queue = self.qid(queue);
            let mut broken = self.seen.ledger.acknowledged(queue, key, *seq);
            // The model knows the payload stored at that seq.
            broken.extend(self.seen.ledger.shown(queue, *seq, &payload));
            assert!(broken.is_empty(), "enqueue to {queue:?}: {broken:?}");
        }
    }

    fn check_invariants(&self) {
        let store = running!(&self.node).store();
        let durable = store.synced_lsn().max(self.lost_upto);
        if store.last_lsn() > durable {
            assert_eq!(
                self.sync_requested,
                store.last_lsn(),
                "a write was never asked to be synced"
            );
        }
        let release_point = self.told.max(self.lost_upto);
        for (rid, p) in &self.pending {
            assert!(
                p.bound > release_point,
                "reply to {rid:?} is durable (needs {:?}, told {release_point:?}) but was not released",
                p.bound
            );
        }
        assert_eq!(running!(&self.node).held_reply_count(), self.pending.len());
        assert_eq!(running!(&self.node).waiter_count(), self.waiters.len());
        assert_eq!(
            running!(&self.node).poll_timeout(),
            self.waiters.iter().map(|w| w.deadline).min(),
            "poll_timeout must be the earliest waiter deadline"
        );
    }

    /// Syncs the store completely or up to a point in its unsynced range and,
    /// if `notify`, tells the machine.
    fn sync_store(&mut self, upto: Option<u16>, notify: bool) {
        let store = running!(self.node).store_mut();
        let durable = store.synced_lsn().max(self.lost_upto);
        let last = store.last_lsn();
        let synced = match upto {
            Some(i) if last > durable => {
                // At least one batch, at most all of them.
                let n = u64::from(i) % (last.0 - durable.0);
                store.sync_up_to(Lsn(durable.0 + 1 + n))
            }
            _ => store.sync(),
        };
        if notify {
            running!(self.node).handle_synced(self.now, synced);
            self.told = self.told.max(synced);
        }
    }

    /// Opens one connection per actor and authenticates all but the
    /// anonymous one.
    fn open_connections(&mut self) {
        self.drain();
        self.conns.clear();
        for _ in 0..=IDENTITIES {
            let conn = ConnectionId(self.next_conn);
            self.next_conn += 1;
            running!(self.node)
                .handle_connection_opened(self.now, conn, exporter(conn))
                .expect("connection table has room");
            self.conns.push(conn);
        }
        for actor in 0..IDENTITIES {
            let Ok(Response::AuthChallenge { nonce }) =
                self.call_now(actor, RequestBody::AuthChallenge)
            else {
                panic!("authChallenge refused");
            };
            let message = auth_message(&self.ids[actor], &nonce, &exporter(self.conns[actor]));
            let signature = Signature(self.keys[actor].sign(&message).to_bytes());
            let reply = self.call_now(
                actor,
                RequestBody::Authenticate {
                    identity_key: self.ids[actor],
                    signature,
                },
            );
            assert_eq!(reply, Ok(Response::Authenticated));
        }
    }

    /// A request outside the model (authentication), answered now. Its reply
    /// waits only if the open rewrote the format-version record (a crash
    /// lost the first one); then that record is synced.
    fn call_now(&mut self, actor: usize, body: RequestBody) -> Reply {
        let rid = self.alloc_request();
        self.send(rid, actor, body);
        loop {
            let mut answer = None;
            while let Some(out) = running!(self.node).poll_output() {
                match out {
                    Output::Sync { lsn } => self.note_sync_request(lsn),
                    Output::Reply {
                        request_id, reply, ..
                    } => {
                        assert_eq!(request_id, rid, "unexpected reply during login");
                        assert!(answer.is_none(), "two replies to one request");
                        answer = Some(reply);
                    }
                }
            }
            if let Some(reply) = answer {
                return reply;
            }
            let store = running!(&self.node).store();
            let durable = if S::DURABLE_ON_WRITE {
                self.told
            } else {
                store.synced_lsn()
            };
            assert!(
                store.last_lsn() > durable.max(self.lost_upto),
                "a reply is held although nothing waits for a sync"
            );
            self.sync_store(None, true);
        }
    }

    // ----- the model's side of each operation ----------------------------

    fn cursor(&mut self, actor: usize, queue: Q, c: Cursor) -> u64 {
        let last = self.queue(queue).next_seq - 1;
        let seen = self.seen.ledger.last_seen(self.qid(queue));
        let after_seq = match c {
            Cursor::LastSeen => seen,
            Cursor::Behind(k) => seen.saturating_sub(k),
            Cursor::Zero => 0,
            Cursor::Tail => last,
            Cursor::Future(k) => last + k,
        };
        if actor == queue.0 && !matches!(c, Cursor::Future(_)) {
            let q = self.qid(queue);
            self.seen.ledger.cursor_sent(q, after_seq);
        }
        after_seq
    }

    /// The queue `q` names.
    fn qid(&self, q: Q) -> QueueId {
        QueueId {
            recipient_key: self.ids[q.0],
            channel_id: channel(q.1),
        }
    }

    fn queue(&mut self, q: Q) -> &mut QueueModel {
        self.model.queues.entry(q).or_default()
    }

    fn model_upload(
        &mut self,
        rid: RequestId,
        actor: usize,
        target: usize,
        package: &[u8],
        last_resort: bool,
    ) -> Outcome {
        if let Some(e) = owner_error(actor, target) {
            return answer(rid, actor, Err(e), Meta::None, false);
        }
        self.seen.uploaded.insert(package.to_vec(), target);
        let pool = self.model.pools.entry(target).or_default();
        if last_resort {
            pool.last_resort = Some(package.to_vec());
        } else if pool.fifo.len() >= KEY_PACKAGES_MAX {
            return answer(rid, actor, error(ErrorKind::QueueFull), Meta::None, false);
        } else {
            pool.fifo.push_back(package.to_vec());
        }
        let fingerprint = Sha256::digest(package).into();
        answer(
            rid,
            actor,
            Ok(Response::KeyPackageUploaded { fingerprint }),
            Meta::None,
            true,
        )
    }

    fn model_fetch_key_package(&mut self, rid: RequestId, actor: usize, target: usize) -> Outcome {
        if actor == ANON {
            return answer(
                rid,
                actor,
                error(ErrorKind::Unauthenticated),
                Meta::None,
                false,
            );
        }
        let pool = self.model.pools.entry(target).or_default();
        let (reply, wrote) = if let Some(package) = pool.fifo.pop_front() {
            let reply = Ok(Response::KeyPackage {
                package,
                last_resort: false,
            });
            (reply, true)
        } else if let Some(package) = &pool.last_resort {
            let reply = Ok(Response::KeyPackage {
                package: package.clone(),
                last_resort: true,
            });
            (reply, false)
        } else {
            (error(ErrorKind::NotFound), false)
        };
        answer(rid, actor, reply, Meta::FetchKeyPackage { target }, wrote)
    }

    fn model_count(&mut self, rid: RequestId, actor: usize, target: usize) -> Outcome {
        if let Some(e) = owner_error(actor, target) {
            return answer(rid, actor, Err(e), Meta::None, false);
        }
        let pool = self.model.pools.entry(target).or_default();
        let reply = Ok(Response::KeyPackageCount {
            count: pool.fifo.len() as u32,
            has_last_resort: pool.last_resort.is_some(),
        });
        answer(rid, actor, reply, Meta::None, false)
    }

    fn model_upload_hybrid_key(
        &mut self,
        rid: RequestId,
        actor: usize,
        target: usize,
        hybrid_key: &[u8],
        signature: Signature,
    ) -> Outcome {
        if let Some(e) = owner_error(actor, target) {
            return answer(rid, actor, Err(e), Meta::None, false);
        }
        let message = hybrid_key_message(&self.ids[target], hybrid_key);
        let verifies = self.keys[target]
            .verifying_key()
            .verify_strict(
                &message,
                &ed25519_dalek::Signature::from_bytes(&signature.0),
            )
            .is_ok();
        if !verifies {
            return answer(
                rid,
                actor,
                error(ErrorKind::InvalidArgument),
                Meta::None,
                false,
            );
        }
        self.model
            .hybrid_keys
            .insert(target, (hybrid_key.to_vec(), signature));
        answer(
            rid,
            actor,
            Ok(Response::HybridKeyUploaded),
            Meta::None,
            true,
        )
    }

    fn model_fetch_hybrid_key(&mut self, rid: RequestId, actor: usize, target: usize) -> Outcome {
        let meta = Meta::FetchHybridKey { target };
        if actor == ANON {
            return answer(rid, actor, error(ErrorKind::Unauthenticated), meta, false);
        }
        let reply = match self.model.hybrid_keys.get(&target) {
            Some((hybrid_key, signature)) => Ok(Response::HybridKey {
                hybrid_key: hybrid_key.clone(),
                signature: *signature,
            }),
            None => error(ErrorKind::NotFound),
        };
        answer(rid, actor, reply, meta, false)
    }

    /// enqueue (`batch` false: one queue, one message), enqueueBatch and
    /// enqueueMany, past the request's own checks: every message appended
    /// to every queue in order, in one batch, all or nothing; a message id
    /// a queue holds already keeps its seq there; Commits meet the fence.
    fn model_enqueue(
        &mut self,
        rid: RequestId,
        actor: usize,
        queues: &[Q],
        messages: &[([u8; 16], Vec<u8>)],
        batch: bool,
    ) -> Outcome {
        if actor == ANON {
            let e = error(ErrorKind::Unauthenticated);
            return answer(rid, actor, e, Meta::None, false);
        }
        if messages.iter().any(|(_, p)| p.is_empty()) {
            let e = error(ErrorKind::InvalidArgument);
            return answer(rid, actor, e, Meta::None, false);
        }
        // Per message, per queue: the seq it already has, or none.
        let mut known: Vec<Vec<Option<Stored>>> = Vec::new();
        for (id, _) in messages {
            let row = queues
                .iter()
                .map(|q| self.queue(*q).dedup.get(&(actor, *id)).cloned())
                .collect();
            known.push(row);
        }
        let fresh = |m: usize| known[m].iter().any(Option::is_none);
        let mut fences: Vec<(FenceKey, FenceModel)> = Vec::new();
        for (m, (_, payload)) in messages.iter().enumerate() {
            if !fresh(m) {
                continue;
            }
            match self.fence_check(queues[0].1, payload, &fences) {
                Ok(Some((key, fence))) => {
                    fences.retain(|(k, _)| *k != key);
                    fences.push((key, fence));
                }
                Ok(None) => {}
                Err(current_epoch) => {
                    let e = error(ErrorKind::StaleEpoch { current_epoch });
                    return answer(rid, actor, e, Meta::None, false);
                }
            }
        }
        let any_fresh = (0..messages.len()).any(fresh);
        let now_ms = self.now.as_micros() / 1_000;
        // The queues that take something expire first, in the same batch;
        // a refusal leaves them as they were.
        let mut expired = Vec::new();
        if any_fresh {
            for (i, q) in queues.iter().enumerate() {
                let new: Vec<usize> = (0..messages.len())
                    .filter(|m| known[*m][i].is_none())
                    .collect();
                if new.is_empty() {
                    continue;
                }
                let bytes: usize = new.iter().map(|m| messages[*m].1.len()).sum();
                let mut queue = self.queue(*q).clone();
                queue.expire(now_ms);
                if queue.messages.len() + new.len() > QUEUE_DEPTH_MAX
                    || queue.bytes() + bytes > QUEUE_BYTES_MAX
                {
                    let e = error(ErrorKind::QueueFull);
                    return answer(rid, actor, e, Meta::None, false);
                }
                expired.push(*q);
            }
        }
        for q in expired {
            self.queue(q).expire(now_ms);
        }
        let mut seqs = Vec::new();
        let mut entries = Vec::new();
        for (m, (id, payload)) in messages.iter().enumerate() {
            for (i, q) in queues.iter().enumerate() {
                let (seq, stored) = match &known[m][i] {
                    Some(k) => k.clone(),
                    None => {
                        let queue = self.queue(*q);
                        let seq = queue.next_seq;
                        queue.next_seq += 1;
                        queue.messages.push_back((seq, payload.clone()));
                        queue.stamps.insert(seq, now_ms);
                        queue.dedup.insert((actor, *id), (seq, payload.clone()));
                        (seq, payload.clone())
                    }
                };
                seqs.push(seq);
                entries.push((*q, self.message_key(actor, *id), stored));
            }
        }
        for (key, fence) in fences {
            self.model.fences.insert(key, fence);
        }
        // Each queue that got something wakes its waiters, in arrival order.
        let mut replies = Vec::new();
        if any_fresh {
            for (i, q) in queues.iter().enumerate() {
                if (0..messages.len()).all(|m| known[m][i].is_some()) {
                    continue;
                }
                let (woken, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
                    .into_iter()
                    .partition(|w| w.waits_on(*q));
                self.waiters = rest;
                for w in woken {
                    replies.push(self.waiter_reply(w));
                }
            }
        }
        let reply = if batch {
            Ok(Response::EnqueuedBatch { seqs })
        } else {
            Ok(Response::Enqueued { seq: seqs[0] })
        };
        replies.push(Expected {
            request_id: rid,
            actor,
            reply,
            meta: Meta::Enqueued { entries },
        });
        Outcome {
            writes: u64::from(any_fresh),
            mid: Vec::new(),
            replies,
        }
    }

    /// The commit fence for `payload` on channel `ch`, as it stands after
    /// the fences `moved` earlier in the same request: `Ok(Some)` moves it,
    /// `Ok(None)` passes without moving it (not a Commit, or a Commit it
    /// accepted already), `Err(epoch)` refuses a Commit for an epoch taken.
    fn fence_check(
        &self,
        ch: usize,
        payload: &[u8],
        moved: &[(FenceKey, FenceModel)],
    ) -> Result<Option<(FenceKey, FenceModel)>, u64> {
        let Some(header) = framing::commit_header(payload) else {
            return Ok(None);
        };
        let key = (ch, header.group_id.to_vec());
        let epoch = header.epoch;
        let current = moved
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, f)| f.clone())
            .or_else(|| self.model.fences.get(&key).cloned());
        let Some(f) = current else {
            let fence = FenceModel {
                epoch: epoch + 1,
                accepted: vec![payload.to_vec()],
            };
            return Ok(Some((key, fence)));
        };
        if epoch < f.epoch {
            let back = (f.epoch - epoch - 1) as usize;
            if f.accepted.get(back).is_some_and(|p| p == payload) {
                return Ok(None);
            }
            return Err(f.epoch);
        }
        let mut accepted = vec![payload.to_vec()];
        if epoch == f.epoch {
            accepted.extend(f.accepted.into_iter().take(COMMIT_FENCE_HISTORY - 1));
        }
        Ok(Some((
            key,
            FenceModel {
                epoch: epoch + 1,
                accepted,
            },
        )))
    }

    /// fetchWaitChannels over `cursors` (queue and cursor per channel).
    fn model_fetch_channels(
        &mut self,
        rid: RequestId,
        actor: usize,
        cursors: &[(Q, u64)],
        limit: u32,
        timeout_ms: u64,
    ) -> Outcome {
        let mut channels: Vec<usize> = cursors.iter().map(|(q, _)| q.1).collect();
        channels.sort_unstable();
        channels.dedup();
        if cursors.is_empty() || channels.len() != cursors.len() {
            let e = error(ErrorKind::InvalidArgument);
            return answer(rid, actor, e, Meta::None, false);
        }
        if let Some(e) = owner_error(actor, cursors[0].0.0) {
            return answer(rid, actor, Err(e), Meta::None, false);
        }
        if limit == 0 {
            let e = error(ErrorKind::InvalidArgument);
            return answer(rid, actor, e, Meta::None, false);
        }
        for (q, after_seq) in cursors {
            if *after_seq > self.queue(*q).next_seq - 1 {
                let e = error(ErrorKind::InvalidArgument);
                return answer(rid, actor, e, Meta::None, false);
            }
        }
        let now_ms = self.now.as_micros() / 1_000;
        let mut states = Vec::new();
        for (q, _) in cursors {
            if self.queue(*q).expire(now_ms) {
                states.push(self.model.clone());
            }
        }
        let (reply, meta) = self.read_channels(cursors, limit);
        let pending =
            matches!(&reply, Ok(Response::ChannelMessages { channels }) if !channels.is_empty());
        if pending || timeout_ms == 0 {
            self.acknowledge_all(cursors, &mut states);
            return written(states, vec![expected(rid, actor, reply, meta)]);
        }
        if let Some(e) = self.waiter_refusal(actor) {
            return written(states, vec![expected(rid, actor, e, Meta::None)]);
        }
        self.acknowledge_all(cursors, &mut states);
        let timeout = Duration::from_millis(timeout_ms.min(FETCH_WAIT_TIMEOUT_MS_MAX));
        self.waiters.push(WaiterModel {
            request_id: rid,
            actor,
            cursors: cursors.to_vec(),
            channels: true,
            limit,
            deadline: self.now.saturating_add(timeout),
        });
        written(states, Vec::new())
    }

    /// Why a long-poll of `actor` may not wait: its connection holds its
    /// most waiters, or the server does.
    fn waiter_refusal(&self, actor: usize) -> Option<Reply> {
        let mine = self.waiters.iter().filter(|w| w.actor == actor).count();
        if mine >= WAITERS_PER_CONNECTION_MAX {
            return Some(error(ErrorKind::RateLimited {
                retry_after_ms: 1_000,
            }));
        }
        (self.waiters.len() >= WAITERS_MAX).then(|| error(ErrorKind::Unavailable))
    }

    /// Acknowledges every cursor, each queue its own batch; the model after
    /// each batch joins `states`.
    fn acknowledge_all(&mut self, cursors: &[(Q, u64)], states: &mut Vec<Durable>) {
        for (q, after_seq) in cursors {
            if self.acknowledge(*q, *after_seq) {
                states.push(self.model.clone());
            }
        }
    }

    /// What a fetchWaitChannels answers now: the channels with messages
    /// after their cursors, in the order asked, within one fetch's budget.
    fn read_channels(&mut self, cursors: &[(Q, u64)], limit: u32) -> (Reply, Meta) {
        let mut budget = FETCH_LIMIT_MAX;
        let mut channels = Vec::new();
        let mut metas = Vec::new();
        for (q, after_seq) in cursors {
            if budget == 0 {
                break;
            }
            let Ok(Response::Messages {
                messages,
                next_seq,
                gap,
            }) = self.read(*q, *after_seq, limit.min(budget))
            else {
                unreachable!("read answers Messages");
            };
            budget -= messages.len() as u32;
            if !messages.is_empty() || gap.is_some() {
                metas.push(self.messages_meta(*q, *after_seq, limit));
                channels.push(ChannelMessages {
                    channel_id: channel(q.1),
                    messages,
                    next_seq,
                    gap,
                });
            }
        }
        (
            Ok(Response::ChannelMessages { channels }),
            Meta::Channels { channels: metas },
        )
    }

    /// fetch (`wait` is `None`) or fetchWait (`wait` is the timeout).
    fn model_fetch(
        &mut self,
        rid: RequestId,
        actor: usize,
        q: Q,
        after_seq: u64,
        limit: u32,
        wait: Option<u64>,
    ) -> Outcome {
        if let Some(e) = owner_error(actor, q.0) {
            return answer(rid, actor, Err(e), Meta::None, false);
        }
        if wait.is_some() && limit == 0 {
            let e = error(ErrorKind::InvalidArgument);
            return answer(rid, actor, e, Meta::None, false);
        }
        let valid = after_seq < self.queue(q).next_seq;
        let now_ms = self.now.as_micros() / 1_000;
        // The model after each batch the request writes: expired messages
        // go first (their own batch), then the acknowledgement. A fetch
        // expires before it checks the cursor, a fetchWait after.
        let mut states = Vec::new();
        if wait.is_none() && self.queue(q).expire(now_ms) {
            states.push(self.model.clone());
        }
        if !valid {
            let e = error(ErrorKind::InvalidArgument);
            return written(states, vec![expected(rid, actor, e, Meta::None)]);
        }
        if wait.is_some() && self.queue(q).expire(now_ms) {
            states.push(self.model.clone());
        }
        // Messages after the cursor do not depend on the acknowledgement, so
        // the reply is read first; the acknowledgement is applied only once
        // the request is accepted (a refused wait changes nothing more).
        let reply = self.read(q, after_seq, limit);
        let pending = matches!(&reply, Ok(Response::Messages { messages, gap, .. })
            if !messages.is_empty() || gap.is_some());
        let meta = self.messages_meta(q, after_seq, limit);
        let timeout_ms = match wait {
            Some(t) if t > 0 && !pending => t,
            _ => {
                if self.acknowledge(q, after_seq) {
                    states.push(self.model.clone());
                }
                return written(states, vec![expected(rid, actor, reply, meta)]);
            }
        };
        if let Some(e) = self.waiter_refusal(actor) {
            return written(states, vec![expected(rid, actor, e, Meta::None)]);
        }
        if self.acknowledge(q, after_seq) {
            states.push(self.model.clone());
        }
        let timeout = Duration::from_millis(timeout_ms.min(FETCH_WAIT_TIMEOUT_MS_MAX));
        self.waiters.push(WaiterModel {
            request_id: rid,
            actor,
            cursors: vec![(q, after_seq)],
            channels: false,
            limit,
            deadline: self.now.saturating_add(timeout),
        });
        written(states, Vec::new())
    }

    /// Deletes the messages `seq <= after_seq` of `q`; true if any was
    /// stored (the machine then writes a batch).
    fn acknowledge(&mut self, q: Q, after_seq: u64) -> bool {
        let queue = self.queue(q);
        let mut wrote = false;
        while queue.messages.front().is_some_and(|(s, _)| *s <= after_seq) {
            if let Some((seq, _)) = queue.messages.pop_front() {
                queue.stamps.remove(&seq);
            }
            wrote = true;
        }
        wrote
    }

    /// Expires the waiters whose deadline has passed, earliest first (ties
    /// in arrival order), each with whatever is there (nothing, since an
    /// enqueue would have woken it).
    fn model_expire(&mut self) -> Outcome {
        let now = self.now;
        let (mut due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.deadline <= now);
        self.waiters = rest;
        due.sort_by_key(|w| w.deadline);
        let replies = due.into_iter().map(|w| self.waiter_reply(w)).collect();
        Outcome {
            writes: 0,
            mid: Vec::new(),
            replies,
        }
    }

    fn waiter_reply(&mut self, w: WaiterModel) -> Expected {
        if w.channels {
            let (reply, meta) = self.read_channels(&w.cursors, w.limit);
            return Expected {
                request_id: w.request_id,
                actor: w.actor,
                reply,
                meta,
            };
        }
        let (q, after_seq) = w.cursors[0];
        Expected {
            request_id: w.request_id,
            actor: w.actor,
            reply: self.read(q, after_seq, w.limit),
            meta: self.messages_meta(q, after_seq, w.limit),
        }
    }

    fn read(&mut self, q: Q, after_seq: u64, limit: u32) -> Reply {
        let queue = self.queue(q);
        let messages = queue
            .messages
            .iter()
            .filter(|(s, _)| *s > after_seq)
            .take(limit.min(FETCH_LIMIT_MAX) as usize)
            .map(|(seq, payload)| QueuedMessage {
                seq: *seq,
                payload: payload.clone(),
            })
            .collect();
        let gap = (after_seq + 1 < queue.expired_below).then(|| Gap {
            from: after_seq + 1,
            to: queue.expired_below - 1,
        });
        Ok(Response::Messages {
            messages,
            next_seq: queue.next_seq,
            gap,
        })
    }

    fn messages_meta(&self, queue: Q, cursor: u64, limit: u32) -> Meta {
        let q = self.qid(queue);
        let ledger = &self.seen.ledger;
        Meta::Messages {
            queue,
            cursor,
            limit,
            next_seq_floor: ledger.next_seq_floor(q),
            acked_floor: ledger.deleted_upto(q),
            deletable_upto: ledger.deletable_upto(q),
        }
    }
}

// ----- helpers ---------------------------------------------------------------

fn config() -> NodeConfig {
    // Rate limiting never triggers here; the unit tests cover it.
    let unlimited = RateConfig {
        burst: 1_000_000,
        per_sec: 1_000_000,
    };
    NodeConfig {
        durability: Durability::Fsync,
        key_packages_per_identity_max: KEY_PACKAGES_MAX as u32,
        queue_depth_max: QUEUE_DEPTH_MAX as u64,
        queue_bytes_max: QUEUE_BYTES_MAX as u64,
        waiters_per_connection_max: WAITERS_PER_CONNECTION_MAX,
        waiters_max: WAITERS_MAX,
        message_ttl: Some(Duration::from_millis(MESSAGE_TTL_MS)),
        enqueue_rate: unlimited,
        key_fetch_pair_rate: unlimited,
        key_package_fetch_target_rate: unlimited,
        ..NodeConfig::default()
    }
}

fn seed(incarnation: u8) -> [u8; 32] {
    [incarnation; 32]
}

fn exporter(conn: ConnectionId) -> [u8; 32] {
    let mut e = [0x5a; 32];
    e[..8].copy_from_slice(&conn.0.to_be_bytes());
    e
}

fn channel(index: usize) -> ChannelId {
    match index {
        0 => ChannelId::DEFAULT,
        n => ChannelId::try_from_slice(&[n as u8]).expect("one byte fits"),
    }
}

/// The `n`th KeyPackage of a run; all distinct.
fn package_bytes(n: u64) -> Vec<u8> {
    format!("kp-{n}").into_bytes()
}

/// A payload of `len` bytes that names message `n` (distinct when long
/// enough to hold the number).
fn payload_bytes_for(n: u64, len: usize) -> Vec<u8> {
    format!("{n}:").bytes().cycle().take(len).collect()
}

/// What the machine refuses before anything else in an enqueueBatch or
/// enqueueMany: no recipients or one named twice; for enqueueMany also no
/// messages or an id twice.
fn dispatch_error(queues: &[Q], messages: &[([u8; 16], Vec<u8>)], many: bool) -> Option<ErrorKind> {
    let distinct = |n: usize, keys: Vec<Vec<u8>>| {
        let set: HashSet<Vec<u8>> = keys.into_iter().collect();
        n > 0 && set.len() == n
    };
    let recipients = queues.iter().map(|q| vec![q.0 as u8]).collect();
    if !distinct(queues.len(), recipients) {
        return Some(ErrorKind::InvalidArgument);
    }
    let ids = messages.iter().map(|(id, _)| id.to_vec()).collect();
    if many && !distinct(messages.len(), ids) {
        return Some(ErrorKind::InvalidArgument);
    }
    None
}

/// A group envelope around an MLS PrivateMessage Commit of group `g{group}`
/// made in `epoch`; `n` makes it unique.
fn commit_payload(group: u8, epoch: u64, n: u64) -> Vec<u8> {
    let mut v = framing::GROUP_ENVELOPE_PREFIX.to_vec();
    v.extend_from_slice(&[0, 1, 0, 2, 2, b'g', b'0' + group]);
    v.extend_from_slice(&epoch.to_be_bytes());
    v.push(3);
    v.extend_from_slice(format!("commit {n}").as_bytes());
    v
}

/// The error for `actor` acting on `owner`'s resource, if any.
fn owner_error(actor: usize, owner: usize) -> Option<ServiceError> {
    if actor == ANON {
        Some(ServiceError::new(ErrorKind::Unauthenticated, "model"))
    } else if actor != owner {
        Some(ServiceError::new(ErrorKind::PermissionDenied, "model"))
    } else {
        None
    }
}

fn error(kind: ErrorKind) -> Reply {
    Err(ServiceError::new(kind, "model"))
}

fn answer(rid: RequestId, actor: usize, reply: Reply, meta: Meta, wrote: bool) -> Outcome {
    Outcome {
        writes: u64::from(wrote),
        mid: Vec::new(),
        replies: vec![Expected {
            request_id: rid,
            actor,
            reply,
            meta,
        }],
    }
}

/// A step's outcome from the model after each batch it writes, in order.
fn written(mut states: Vec<Durable>, replies: Vec<Expected>) -> Outcome {
    let writes = states.len() as u64;
    states.pop();
    Outcome {
        writes,
        mid: states,
        replies,
    }
}

fn expected(request_id: RequestId, actor: usize, reply: Reply, meta: Meta) -> Expected {
    Expected {
        request_id,
        actor,
        reply,
        meta,
    }
}

/// Replies agree if results are equal or errors have the same kind (the
/// messages are for humans).
fn same(machine: &Reply, model: &Reply) -> bool {
    match (machine, model) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a.kind == b.kind,
        _ => false,
    }
}

