//! Model test of the NodeService machine: the real machine against a tiny
//! reference model, compared after every generated step.
//!
//! proptest generates sequences of operations by four authenticated
//! identities (plus one connection that never authenticates): KeyPackage
//! upload (single-use and last-resort), fetch and count; hybrid key upload
//! (rightly and wrongly signed) and fetch; enqueue, including
//! retries of message ids already used; fetch and fetchWait with the owner's
//! last seen cursor, older ones, the tail, and bogus future ones, also from
//! identities that do not own the queue; clock ticks; full and partial syncs;
//! and crashes followed by a restart. Each runs against the real
//! `NodeService<MemStore>` in `Durability::Fsync` mode and against a tiny
//! reference model, and the two are compared after every step.
//!
//! The model has three parts:
//! - [`Durable`], what the store holds: per queue a `VecDeque` of
//!   `(seq, payload)`, its `next_seq` and the message-id dedup map; per
//!   identity a FIFO of KeyPackages, an optional last-resort one and an
//!   optional signed hybrid key. Every
//!   request writes at most one batch (asserted), so the model is snapshotted
//!   under the `Lsn` of each batch, and a crash rolls it back to the newest
//!   snapshot at or before the store's synced `Lsn`.
//! - Long-poll waiters, in memory only: a crash forgets them.
//! - Pending replies: each request's expected reply together with the `Lsn` of
//!   the last write made before it. A reply must come out exactly when
//!   `handle_synced` covers that `Lsn` (never earlier, never later) and must
//!   equal the model's answer. A crash loses the replies not yet released.
//!
//! On top of the model, [`Seen`] records what clients were told in released
//! replies. It survives crashes and backs checks that do not trust the model:
//! no single-use KeyPackage is handed out twice, and none its target never
//! uploaded; a hybrid key always carries its owner's signature; a
//! `(queue, seq)` pair always names the same payload; an
//! acknowledged message id keeps its seq; `next_seq` never goes backwards;
//! Messages replies hold consecutive seqs after the cursor and after
//! everything acknowledged-deleted; and every acknowledged enqueue the owner
//! has not acknowledged away is delivered. Each case ends with a crash and
//! an audit fetch of every queue, so whatever was acknowledged must have
//! survived.
//!
//! Rate limits are set so high they never trigger (the unit tests cover
//! them); the other limits are small so that the model exercises them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sha2::{Digest, Sha256};

use quicproquo_core::limits::{AUTH_VERSION, FETCH_LIMIT_MAX, FETCH_WAIT_TIMEOUT_MS_MAX};
use quicproquo_core::node::{
    Durability, NodeConfig, NodeService, Output, QueuedMessage, RateConfig, Reply, Request,
    RequestBody, Response, auth_message, hybrid_key_message,
};
use quicproquo_core::store::{Lsn, MemStore};
use quicproquo_core::types::{
    ChannelId, ConnectionId, IdentityKey, MessageId, RequestId, Signature,
};
use quicproquo_core::{ErrorKind, ServiceError, Time};

/// Cases per run unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 2_000;
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

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn node_matches_reference_model_across_syncs_crashes_and_restarts(
        ops in vec(op(), 1..=OPS_MAX)
    ) {
        let mut run = Run::new();
        for op in &ops {
            run.step(op);
        }
        run.audit_after_crash();
    }
}

// ----- deterministic regressions of the trickiest scenarios ----------------

#[test]
fn crash_before_sync_of_a_pop_hands_the_key_package_out_again() {
    let mut run = Run::new();
    run.step(&upload(0, false));
    run.step(&sync_all());
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    assert_eq!(run.pending.len(), 1, "the pop's reply waits for its sync");
    run.step(&Op::Crash);
    run.step(&Op::FetchKeyPackage {
        actor: 2,
        target: 0,
    });
    run.step(&sync_all());
    // Nobody saw the first pop, so the package is handed out now, once.
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::KeyPackage {
            package: package_bytes(0),
            last_resort: false,
        }))
    );
}

#[test]
fn crash_after_sync_of_a_pop_never_hands_the_key_package_out_again() {
    let mut run = Run::new();
    run.step(&upload(0, false));
    run.step(&sync_all());
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    run.step(&sync_all());
    run.step(&Op::Crash);
    run.step(&Op::FetchKeyPackage {
        actor: 2,
        target: 0,
    });
    run.step(&sync_all());
    assert_eq!(
        run.released.last().map(|r| r.as_ref().map_err(|e| e.kind)),
        Some(Err(ErrorKind::NotFound))
    );
}

#[test]
fn synced_pop_lost_with_its_reply_is_not_returned_again() {
    // The pop is durable but the machine was never told, so its reply is
    // lost in the crash; the package is gone without anyone seeing it.
    let mut run = Run::new();
    run.step(&upload(0, false));
    run.step(&upload(0, true));
    run.step(&sync_all());
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    run.step(&Op::Sync {
        upto: None,
        notify: false,
    });
    run.step(&Op::Crash);
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::KeyPackage {
            package: package_bytes(1),
            last_resort: true,
        }))
    );
}

#[test]
fn restart_keeps_next_seq_after_the_queue_empties() {
    let mut run = Run::new();
    for _ in 0..3 {
        run.step(&enqueue(1, 0));
    }
    run.step(&sync_all());
    run.step(&fetch(0, Cursor::Tail, 1));
    run.step(&sync_all());
    run.step(&Op::Crash);
    run.step(&enqueue(2, 0));
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 4 }))
    );
}

#[test]
fn partial_sync_releases_only_replies_whose_writes_are_covered() {
    let mut run = Run::new();
    run.step(&enqueue(1, 0));
    run.step(&enqueue(2, 0));
    run.step(&Op::Sync {
        upto: Some(0),
        notify: true,
    });
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 1 }))
    );
    assert_eq!(run.pending.len(), 1);
    run.step(&Op::Crash);
    // The second enqueue was lost with its reply; its seq is free again.
    run.step(&enqueue(3, 0));
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 2 }))
    );
}

#[test]
fn retry_after_crash_returns_the_acknowledged_seq() {
    let mut run = Run::new();
    run.step(&enqueue(1, 0));
    run.step(&sync_all());
    run.step(&Op::Crash);
    run.step(&Op::Enqueue {
        actor: 1,
        recipient: 0,
        channel: 0,
        payload_bytes: 5,
        message_id: MessageIdChoice::Retry {
            pick: 0,
            same_queue: true,
        },
    });
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 1 }))
    );
}

#[test]
fn fetch_wait_is_woken_by_enqueue_or_expires_empty() {
    let mut run = Run::new();
    run.step(&fetch_wait(0, 1_000));
    assert_eq!(run.waiters.len(), 1);
    run.step(&enqueue(1, 0));
    run.step(&sync_all());
    assert!(run.waiters.is_empty());
    run.step(&fetch_wait(0, 1_000));
    assert_eq!(run.waiters.len(), 1);
    run.step(&Op::Tick { ms: 999 });
    assert_eq!(run.waiters.len(), 1);
    run.step(&Op::Tick { ms: 1 });
    // The expired wait's reply also waits for the sync of its acknowledgement.
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Messages {
            messages: Vec::new(),
            next_seq: 2,
            gap: None,
        }))
    );
}

/// Regression: after a restart *without* a crash (the process died but the
/// OS still holds its unsynced writes, which the reopened store reads back)
/// the machine once treated those writes as durable and released a reply
/// revealing them at once; an OS crash later could then reissue seq 1 for
/// another payload (ARCHITECTURE.md § Guarantees, § Storage). The machine
/// now writes on every open, so its replies wait for a sync that covers what
/// the previous process left.
#[test]
fn restart_without_crash_holds_replies_until_earlier_writes_are_durable() {
    let mut run = Run::new();
    run.step(&enqueue(1, 0));
    run.restart(false);
    run.step(&fetch(0, Cursor::Zero, 1));
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
        2 => prop_oneof![Just(0u64), Just(100), Just(1_000), Just(25_000), Just(30_000)]
            .prop_map(|ms| Op::Tick { ms }),
        4 => (prop::option::weighted(0.3, any::<u16>()), prop::bool::weighted(0.9))
            .prop_map(|(upto, notify)| Op::Sync { upto, notify }),
        1 => Just(Op::Crash),
        1 => Just(Op::Restart),
    ]
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
}

#[derive(Debug, Clone)]
struct QueueModel {
    next_seq: u64,
    messages: VecDeque<(u64, Vec<u8>)>,
    /// Message id -> its seq and the payload stored under it.
    dedup: BTreeMap<[u8; 16], (u64, Vec<u8>)>,
}

impl Default for QueueModel {
    fn default() -> Self {
        QueueModel {
            next_seq: 1,
            messages: VecDeque::new(),
            dedup: BTreeMap::new(),
        }
    }
}

impl QueueModel {
    fn bytes(&self) -> usize {
        self.messages.iter().map(|(_, p)| p.len()).sum()
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
    queue: Q,
    after_seq: u64,
    limit: u32,
    deadline: Time,
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
    Enqueue {
        queue: Q,
        message_id: [u8; 16],
        /// The payload stored at the seq the reply names.
        payload: Vec<u8>,
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
    wrote: bool,
    replies: Vec<Expected>,
}

/// What clients sent, and what they learned from released replies;
/// survives crashes.
#[derive(Debug, Default)]
struct Seen {
    /// Every package sent in an upload by its owner -> that owner. (Its
    /// acknowledgement may be lost in a crash although the upload is durable.)
    uploaded: HashMap<Vec<u8>, usize>,
    /// Single-use packages handed out.
    handed_out: HashSet<Vec<u8>>,
    /// The payload each released `(queue, seq)` names.
    payload_at: HashMap<(Q, u64), Vec<u8>>,
    /// Acknowledged enqueues: `(queue, message id)` -> seq.
    seq_of: HashMap<(Q, [u8; 16]), u64>,
    /// The owner's cursor: highest seq shown to it per queue.
    last_seen: HashMap<Q, u64>,
    /// Highest cursor of a released fetch: everything up to it is deleted.
    acked: HashMap<Q, u64>,
    /// Highest cursor the owner ever sent: nothing above it may be deleted.
    cursor_sent: HashMap<Q, u64>,
    /// Highest `next_seq` released per queue.
    next_seq: HashMap<Q, u64>,
}

impl Seen {
    fn record_payload(&mut self, queue: Q, seq: u64, payload: &[u8]) {
        let known = self
            .payload_at
            .entry((queue, seq))
            .or_insert_with(|| payload.to_vec());
        assert_eq!(
            known.as_slice(),
            payload,
            "seq {seq} of queue {queue:?} was released with two different payloads"
        );
    }
}

// ----- the run: machine, model and checks --------------------------------

struct Run {
    node: NodeService<MemStore>,
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

impl Run {
    fn new() -> Self {
        let keys: Vec<SigningKey> = (0..IDENTITIES)
            .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
            .collect();
        let ids = keys
            .iter()
            .map(|k| IdentityKey(k.verifying_key().to_bytes()))
            .collect();
        let node = NodeService::new(config(), seed(0), MemStore::new()).expect("fresh store");
        let mut run = Run {
            node,
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
                    last_resort: *last_resort,
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::FetchKeyPackage { actor, target } => {
                let rid = self.alloc_request();
                let outcome = self.model_fetch_key_package(rid, *actor, *target);
                let body = RequestBody::FetchKeyPackage {
                    identity_key: self.ids[*target],
                };
                self.submit(rid, *actor, body, outcome);
            }
            Op::KeyPackageCount { actor, target } => {
                let target = target.resolve(*actor);
                let rid = self.alloc_request();
                let outcome = self.model_count(rid, *actor, target);
                let body = RequestBody::KeyPackageCount {
                    identity_key: self.ids[target],
                };
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
                let rid = self.alloc_request();
                let outcome = self.model_enqueue(rid, *actor, queue, &payload, id);
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
            Op::Tick { ms } => {
                self.now = self.now.saturating_add(Duration::from_millis(*ms));
                let before = self.node.store().last_lsn();
                let outcome = self.model_expire();
                self.node.handle_timeout(self.now);
                self.settle(before, outcome);
            }
            Op::Sync { upto, notify } => {
                self.sync_store(*upto, *notify);
                let before = self.node.store().last_lsn();
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
        let placeholder =
            NodeService::new(config(), seed(0), MemStore::new()).expect("fresh store");
        let mut store = std::mem::replace(&mut self.node, placeholder).into_store();
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
        self.node = NodeService::new(config(), seed(self.incarnation), store)
            .expect("the store reopens after a restart");
        self.told = Lsn(0);
        self.sync_requested = Lsn(0);
        self.open_connections();
        self.check_invariants();
    }

    // ----- driving the machine --------------------------------------------

    fn alloc_request(&mut self) -> RequestId {
        let rid = RequestId(self.next_request);
        self.next_request += 1;
        rid
    }

    fn send(&mut self, rid: RequestId, actor: usize, body: RequestBody) {
        self.node.handle_request(
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
        let before = self.node.store().last_lsn();
        self.send(rid, actor, body);
        self.settle(before, outcome);
    }

    /// After the machine took one input: check its writes against the
    /// model's, snapshot the model, register the replies this step owes,
    /// drain every output and check the invariants.
    fn settle(&mut self, before: Lsn, outcome: Outcome) {
        let lsn = self.node.store().last_lsn();
        assert_eq!(
            lsn.0 - before.0,
            u64::from(outcome.wrote),
            "the machine wrote {} batches where the model expected {}",
            lsn.0 - before.0,
            u64::from(outcome.wrote)
        );
        if outcome.wrote {
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
        while let Some(out) = self.node.poll_output() {
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
            lsn <= self.node.store().last_lsn(),
            "sync of an unwritten Lsn"
        );
        self.sync_requested = lsn;
    }

    fn release(&mut self, conn: ConnectionId, rid: RequestId, reply: Reply) {
        let Some(p) = self.pending.remove(&rid) else {
            panic!("reply to {rid:?} came out although none was due: {reply:?}");
        };
        assert_eq!(conn, p.conn, "reply to {rid:?} on the wrong connection");
        let store = self.node.store();
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
            (
                Meta::Enqueue {
                    queue,
                    message_id,
                    payload,
                },
                Ok(Response::Enqueued { seq }),
            ) => {
                let first = *self.seen.seq_of.entry((queue, message_id)).or_insert(*seq);
                assert_eq!(
                    first, *seq,
                    "an acknowledged message id came back with another seq"
                );
                self.seen.record_payload(queue, *seq, &payload);
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
                    gap: None,
                }),
            ) => {
                assert!(messages.len() <= limit as usize, "more messages than limit");
                assert!(*next_seq >= next_seq_floor, "next_seq went backwards");
                let mut expect = cursor.max(acked_floor) + 1;
                for m in messages {
                    assert!(
                        m.seq >= expect && m.seq < *next_seq,
                        "seq {} out of place (cursor {cursor}, acknowledged up to \
                         {acked_floor}, next_seq {next_seq})",
                        m.seq
                    );
                    if m.seq != messages[0].seq {
                        assert_eq!(m.seq, expect, "seqs in a reply are consecutive");
                    }
                    expect = m.seq + 1;
                    self.seen.record_payload(queue, m.seq, &m.payload);
                }
                self.check_delivery(queue, messages, *next_seq, limit, deletable_upto);
                if let Some(last) = messages.last() {
                    let seen = self.seen.last_seen.entry(queue).or_default();
                    *seen = (*seen).max(last.seq);
                }
                let acked = self.seen.acked.entry(queue).or_default();
                *acked = (*acked).max(cursor);
                let n = self.seen.next_seq.entry(queue).or_default();
                *n = (*n).max(*next_seq);
            }
            _ => {}
        }
    }

    /// Every acknowledged enqueue to `queue` below `next_seq` that no owner
    /// cursor could have deleted must be in the reply, unless the reply was
    /// cut short by its limit.
    fn check_delivery(
        &self,
        queue: Q,
        messages: &[QueuedMessage],
        next_seq: u64,
        limit: u32,
        deletable_upto: u64,
    ) {
        if limit == 0 {
            return;
        }
        let full = messages.len() == limit as usize;
        for (&(q, _), &seq) in &self.seen.seq_of {
            if q != queue || seq <= deletable_upto || seq >= next_seq {
                continue;
            }
            let shown = match (messages.first(), messages.last()) {
                (Some(first), Some(last)) => first.seq <= seq && (seq <= last.seq || full),
                _ => false,
            };
            assert!(
                shown,
                "acknowledged message {seq} of queue {queue:?} is missing from a fetch \
                 (owner cursors never went past {deletable_upto})"
            );
        }
    }

    fn check_invariants(&self) {
        let store = self.node.store();
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
        assert_eq!(self.node.held_reply_count(), self.pending.len());
        assert_eq!(self.node.waiter_count(), self.waiters.len());
        assert_eq!(
            self.node.poll_timeout(),
            self.waiters.iter().map(|w| w.deadline).min(),
            "poll_timeout must be the earliest waiter deadline"
        );
    }

    /// Syncs the store completely or up to a point in its unsynced range and,
    /// if `notify`, tells the machine.
    fn sync_store(&mut self, upto: Option<u16>, notify: bool) {
        let store = self.node.store_mut();
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
            self.node.handle_synced(self.now, synced);
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
            self.node
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
            while let Some(out) = self.node.poll_output() {
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
            let store = self.node.store();
            assert!(
                store.last_lsn() > store.synced_lsn().max(self.lost_upto),
                "a reply is held although nothing waits for a sync"
            );
            self.sync_store(None, true);
        }
    }

    // ----- the model's side of each operation ----------------------------

    fn cursor(&mut self, actor: usize, queue: Q, c: Cursor) -> u64 {
        let last = self.queue(queue).next_seq - 1;
        let seen = self.seen.last_seen.get(&queue).copied().unwrap_or(0);
        let after_seq = match c {
            Cursor::LastSeen => seen,
            Cursor::Behind(k) => seen.saturating_sub(k),
            Cursor::Zero => 0,
            Cursor::Tail => last,
            Cursor::Future(k) => last + k,
        };
        if actor == queue.0 && !matches!(c, Cursor::Future(_)) {
            let sent = self.seen.cursor_sent.entry(queue).or_default();
            *sent = (*sent).max(after_seq);
        }
        after_seq
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

    fn model_enqueue(
        &mut self,
        rid: RequestId,
        actor: usize,
        q: Q,
        payload: &[u8],
        id: [u8; 16],
    ) -> Outcome {
        let meta = |payload: &[u8]| Meta::Enqueue {
            queue: q,
            message_id: id,
            payload: payload.to_vec(),
        };
        if actor == ANON {
            return answer(
                rid,
                actor,
                error(ErrorKind::Unauthenticated),
                meta(payload),
                false,
            );
        }
        let queue = self.queue(q);
        if let Some((seq, original)) = queue.dedup.get(&id) {
            let reply = Ok(Response::Enqueued { seq: *seq });
            let m = meta(original);
            return answer(rid, actor, reply, m, false);
        }
        if queue.messages.len() >= QUEUE_DEPTH_MAX
            || queue.bytes() + payload.len() > QUEUE_BYTES_MAX
        {
            return answer(
                rid,
                actor,
                error(ErrorKind::QueueFull),
                meta(payload),
                false,
            );
        }
        let seq = queue.next_seq;
        queue.next_seq += 1;
        queue.messages.push_back((seq, payload.to_vec()));
        queue.dedup.insert(id, (seq, payload.to_vec()));
        // The enqueue wakes every waiter of the queue, in arrival order.
        let mut replies = Vec::new();
        let (woken, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.queue == q);
        self.waiters = rest;
        for w in woken {
            replies.push(self.waiter_reply(w));
        }
        replies.push(Expected {
            request_id: rid,
            actor,
            reply: Ok(Response::Enqueued { seq }),
            meta: meta(payload),
        });
        Outcome {
            wrote: true,
            replies,
        }
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
            return answer(
                rid,
                actor,
                error(ErrorKind::InvalidArgument),
                Meta::None,
                false,
            );
        }
        let queue = self.queue(q);
        if after_seq > queue.next_seq - 1 {
            return answer(
                rid,
                actor,
                error(ErrorKind::InvalidArgument),
                Meta::None,
                false,
            );
        }
        // Messages after the cursor do not depend on the acknowledgement, so
        // the reply is read first; the acknowledgement is applied only once
        // the request is accepted (a refused wait changes nothing).
        let reply = self.read(q, after_seq, limit);
        let pending =
            matches!(&reply, Ok(Response::Messages { messages, .. }) if !messages.is_empty());
        let meta = self.messages_meta(q, after_seq, limit);
        let timeout_ms = match wait {
            Some(t) if t > 0 && !pending => t,
            _ => {
                let wrote = self.acknowledge(q, after_seq);
                return answer(rid, actor, reply, meta, wrote);
            }
        };
        let mine = self.waiters.iter().filter(|w| w.actor == actor).count();
        if mine >= WAITERS_PER_CONNECTION_MAX {
            let e = error(ErrorKind::RateLimited {
                retry_after_ms: 1_000,
            });
            return answer(rid, actor, e, Meta::None, false);
        }
        if self.waiters.len() >= WAITERS_MAX {
            return answer(rid, actor, error(ErrorKind::Unavailable), Meta::None, false);
        }
        let wrote = self.acknowledge(q, after_seq);
        let timeout = Duration::from_millis(timeout_ms.min(FETCH_WAIT_TIMEOUT_MS_MAX));
        self.waiters.push(WaiterModel {
            request_id: rid,
            actor,
            queue: q,
            after_seq,
            limit,
            deadline: self.now.saturating_add(timeout),
        });
        Outcome {
            wrote,
            replies: Vec::new(),
        }
    }

    /// Deletes the messages `seq <= after_seq` of `q`; true if any was
    /// stored (the machine then writes a batch).
    fn acknowledge(&mut self, q: Q, after_seq: u64) -> bool {
        let queue = self.queue(q);
        let mut wrote = false;
        while queue.messages.front().is_some_and(|(s, _)| *s <= after_seq) {
            queue.messages.pop_front();
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
            wrote: false,
            replies,
        }
    }

    fn waiter_reply(&mut self, w: WaiterModel) -> Expected {
        Expected {
            request_id: w.request_id,
            actor: w.actor,
            reply: self.read(w.queue, w.after_seq, w.limit),
            meta: self.messages_meta(w.queue, w.after_seq, w.limit),
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
        Ok(Response::Messages {
            messages,
            next_seq: queue.next_seq,
            gap: None,
        })
    }

    fn messages_meta(&self, queue: Q, cursor: u64, limit: u32) -> Meta {
        let get = |m: &HashMap<Q, u64>| m.get(&queue).copied().unwrap_or(0);
        Meta::Messages {
            queue,
            cursor,
            limit,
            next_seq_floor: get(&self.seen.next_seq),
            acked_floor: get(&self.seen.acked),
            deletable_upto: get(&self.seen.cursor_sent),
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
        wrote,
        replies: vec![Expected {
            request_id: rid,
            actor,
            reply,
            meta,
        }],
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
