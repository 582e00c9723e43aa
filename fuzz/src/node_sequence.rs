//! Target `node_sequence`: sequences of inputs to `NodeService<MemStore>`,
//! structured with `arbitrary` — connections opening and closing, logins,
//! requests of every method with arbitrary arguments, clock ticks, full,
//! partial and unannounced syncs, sync failures, crashes and restarts.
//!
//! The machine runs in `fsync` mode with small limits so that sequences
//! reach them. A [`Checker`] that survives crashes looks at every released
//! reply and keeps the invariants of `core-sm/tests/model.rs` that hold
//! without a full reference model:
//! - nothing panics (the machine's own assertions included);
//! - a successful reply is released only once the writes made before its
//!   request are reported durable;
//! - every request is answered exactly once (unless its connection closed
//!   or the process crashed), also after the final sync and deadline;
//! - a reply's kind matches its request, and owner-only successes go to a
//!   connection authenticated as the owner; a forged signature never
//!   authenticates;
//! - a single-use KeyPackage is handed out at most as often as it was
//!   uploaded, a last-resort one only if it was uploaded as such, always
//!   for the identity that uploaded it;
//! - a hybrid key always carries its owner's valid signature;
//! - per queue, a seq once shown names one message id and one payload,
//!   `next_seq` never goes back, fetched seqs are consecutive and after the
//!   cursor;
//! - after a final crash, every acknowledged enqueue that no fetch cursor
//!   covers is still there with a payload sent under its message id;
//! - an `enqueueBatch` answers one seq per recipient, each checked as a
//!   single enqueue's; a `fetchWaitChannels` answers only channels it asked
//!   for, in order, each checked as a fetch's, within one fetch's count;
//! - the commit fence: fetches never show two Commits (payloads, or
//!   framings of sealed ones) for one (channel, group, epoch), and
//!   `staleEpoch` names an epoch after the refused Commit's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use ed25519_dalek::{Signer, SigningKey};
use quicproquo_core::limits::{AUTH_VERSION, FETCH_LIMIT_MAX};
use quicproquo_core::node::{
    Durability, NodeConfig, NodeService, Outgoing, Output, QueuedMessage, RateConfig, Reply,
    Request, RequestBody, Response, auth_message, commit, hybrid_key_message,
};
use quicproquo_core::store::{Lsn, MemStore};
use quicproquo_core::testing::ledger::{FetchView, Ledger, MessageKey};
use quicproquo_core::types::{
    ChannelId, ConnectionId, IdentityKey, MessageId, QueueId, RequestId, Signature,
};
use quicproquo_core::{ErrorKind, Time};
use sha2::{Digest, Sha256};

/// Connection slots the sequence drives.
pub const SLOTS: usize = 4;
/// Identities with known signing keys.
pub const IDENTITIES: usize = 4;
/// Most operations taken from one input, so every run stays fast.
pub const OPS_MAX: usize = 256;
/// Set this environment variable to print every operation as it runs.
pub const TRACE_VAR: &str = "QPQ_FUZZ_TRACE";

/// What one run exercised, for the corpus replay's coverage check.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Successful replies released, by method.
    pub ok: BTreeMap<&'static str, u32>,
    /// Error replies released, by method.
    pub errors: BTreeMap<&'static str, u32>,
    /// Crashes and restarts performed (the final audit's included).
    pub reopens: u32,
    /// Acknowledged messages the final audit found after its crash.
    pub audited: u32,
}

/// The target's body: runs the operations decoded from `data`, then the
/// final sync, deadline and audit; panics on any broken invariant.
pub fn run(data: &[u8]) -> Stats {
    let mut u = Unstructured::new(data);
    let mut h = Harness::new();
    let mut ops = 0;
    // Printing each operation makes a crashing input readable.
    let trace = std::env::var_os(TRACE_VAR).is_some();
    while !u.is_empty() && ops < OPS_MAX {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        if trace {
            eprintln!("{op:?}");
        }
        h.step(&op);
        ops += 1;
    }
    h.finish();
    h.stats
}

/// One input to the machine. Drawn with weights (see the `Arbitrary`
/// impl): mostly requests, crashes and restarts rarely, so sequences get
/// deep between them.
#[derive(Debug, Clone)]
pub enum Op {
    /// Open a connection in an empty slot.
    Open {
        /// Which slot.
        slot: u8,
    },
    /// Close the slot's connection.
    Close {
        /// Which slot.
        slot: u8,
    },
    /// Challenge and authenticate properly (syncing if a reply waits).
    Login {
        /// Which slot.
        slot: u8,
        /// As which identity.
        identity: u8,
    },
    /// One request.
    Request {
        /// Which slot's connection sends it.
        slot: u8,
        /// `None` sends the supported authVersion.
        auth_version: Option<u16>,
        /// The method and arguments.
        body: Body,
    },
    /// Advance the clock and expire due waiters.
    Tick {
        /// Milliseconds.
        ms: u16,
    },
    /// Sync the store (all or a prefix of the unsynced batches) and
    /// optionally tell the machine.
    Sync {
        /// Batches to sync beyond the synced point, less one, modulo the
        /// unsynced count; `None` syncs everything.
        upto: Option<u8>,
        /// Whether the machine hears of it.
        notify: bool,
    },
    /// Tell the machine whatever the store has synced.
    Notify,
    /// A failed fsync: the machine stops taking writes.
    SyncFailed,
    /// Lose everything unsynced and reopen the machine.
    Crash,
    /// Reopen the machine over the same store, unsynced writes kept.
    Restart,
}

/// A request body with arguments drawn from small pools, so that
/// sequences hit the same identities, queues and message ids.
#[derive(Arbitrary, Debug, Clone)]
pub enum Body {
    /// authChallenge.
    AuthChallenge,
    /// authenticate, properly signed over the slot's last nonce, or with an
    /// arbitrary signature.
    Authenticate {
        /// Claimed identity.
        identity: Who,
        /// Sign properly; otherwise send `signature`.
        proper: bool,
        /// The forged signature.
        signature: [u8; 64],
    },
    /// uploadKeyPackage.
    UploadKeyPackage {
        /// Whose pool.
        identity: Who,
        /// The package.
        package: Vec<u8>,
        /// Last resort.
        last_resort: bool,
    },
    /// fetchKeyPackage.
    FetchKeyPackage {
        /// Whose.
        identity: Who,
    },
    /// keyPackageCount.
    KeyPackageCount {
        /// Whose.
        identity: Who,
    },
    /// uploadHybridKey, signed by the identity or not.
    UploadHybridKey {
        /// Whose.
        identity: Who,
        /// The key.
        hybrid_key: Vec<u8>,
        /// Sign with the identity's key; otherwise send `signature`.
        proper: bool,
        /// The forged signature.
        signature: [u8; 64],
    },
    /// fetchHybridKey.
    FetchHybridKey {
        /// Whose.
        identity: Who,
    },
    /// enqueue.
    Enqueue {
        /// Recipient.
        recipient: Who,
        /// Channel.
        channel: Chan,
        /// Payload.
        payload: Vec<u8>,
        /// Message id, from a pool of 8 (so retries happen) or arbitrary.
        message_id: Mid,
    },
    /// fetch.
    Fetch {
        /// Whose queue.
        recipient: Who,
        /// Channel.
        channel: Chan,
        /// Cursor.
        cursor: Cursor,
        /// Limit.
        limit: u16,
    },
    /// fetchWait.
    FetchWait {
        /// Whose queue.
        recipient: Who,
        /// Channel.
        channel: Chan,
        /// Cursor.
        cursor: Cursor,
        /// Limit.
        limit: u16,
        /// Timeout.
        timeout_ms: u16,
    },
    /// enqueueBatch.
    EnqueueBatch {
        /// Recipients (duplicates and empty lists are refusals to reach).
        recipients: Vec<Who>,
        /// Channel.
        channel: Chan,
        /// Payload.
        payload: Payload,
        /// Message id.
        message_id: Mid,
    },
    /// fetchWaitChannels.
    FetchWaitChannels {
        /// Whose queues.
        recipient: Who,
        /// Channels and their cursors.
        cursors: Vec<(Chan, Cursor)>,
        /// Limit per channel.
        limit: u16,
        /// Timeout.
        timeout_ms: u16,
    },
    /// enqueueMany.
    EnqueueMany {
        /// Recipients (duplicates and empty lists are refusals to reach).
        recipients: Vec<Who>,
        /// Channel.
        channel: Chan,
        /// Payloads and their ids (duplicate ids are refusals to reach).
        messages: Vec<(Payload, Mid)>,
    },
}

/// An `enqueueBatch` or `enqueueMany` payload: opaque bytes, or the MLS framing of a
/// Commit the commit fence reads.
#[derive(Arbitrary, Debug, Clone)]
pub enum Payload {
    /// Any bytes.
    Raw(Vec<u8>),
    /// A group envelope around a PrivateMessage Commit header.
    Commit {
        /// Group `n % 2`.
        group: u8,
        /// Epoch `n % 4`.
        epoch: u8,
        /// Distinguishes Commits for one epoch.
        body: u8,
    },
}

/// An identity: one of the known ones, or (one time in eight) any 32
/// bytes.
#[derive(Debug, Clone, Copy)]
pub enum Who {
    /// Known identity `n % IDENTITIES`.
    Known(u8),
    /// Raw key bytes (usually not a valid Ed25519 point).
    Raw([u8; 32]),
}

/// A channel: default, one of a few one-byte ids, or a full 16 bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Chan {
    /// The default channel.
    Default,
    /// A one-byte channel id `n % 3`.
    Small(u8),
    /// A 16-byte channel id.
    Full([u8; 16]),
}

/// A message id.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Mid {
    /// One of 8 ids.
    Pool(u8),
    /// Any id.
    Raw([u8; 16]),
}

/// A fetch cursor.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Cursor {
    /// The highest seq this harness has been shown for the queue.
    LastSeen,
    /// Zero.
    Zero,
    /// The last seq the queue has issued, as far as replies showed.
    Tail,
    /// Any value (usually beyond the tail: refused).
    Raw(u64),
}

impl<'a> Arbitrary<'a> for Op {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(match u.int_in_range(0u8..=99)? {
            0..=54 => Op::Request {
                slot: u.arbitrary()?,
                // Mostly the supported version, so requests get further.
                auth_version: if u.ratio(1u8, 16)? {
                    Some(u.arbitrary()?)
                } else {
                    None
                },
                body: u.arbitrary()?,
            },
            55..=64 => Op::Login {
                slot: u.arbitrary()?,
                identity: u.arbitrary()?,
            },
            65..=71 => Op::Open {
                slot: u.arbitrary()?,
            },
            72..=74 => Op::Close {
                slot: u.arbitrary()?,
            },
            75..=81 => Op::Tick { ms: u.arbitrary()? },
            82..=90 => Op::Sync {
                upto: u.arbitrary()?,
                notify: u.arbitrary()?,
            },
            91..=94 => Op::Notify,
            95 => Op::SyncFailed,
            96..=97 => Op::Crash,
            _ => Op::Restart,
        })
    }
}

impl<'a> Arbitrary<'a> for Who {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        if u.ratio(1u8, 8)? {
            Ok(Who::Raw(u.arbitrary()?))
        } else {
            Ok(Who::Known(u.arbitrary()?))
        }
    }
}

/// The machine's small limits, so short sequences reach them.
fn config() -> NodeConfig {
    NodeConfig {
        durability: Durability::Fsync,
        payload_bytes_max: 64,
        key_package_bytes_max: 64,
        key_packages_per_identity_max: 3,
        queue_depth_max: 4,
        queue_bytes_max: 128,
        fetch_wait_timeout_ms_max: 1_000,
        waiters_per_connection_max: 2,
        waiters_max: 3,
        // One fewer than the slots: the connection table fills up.
        connections_max: SLOTS - 1,
        enqueue_rate: RateConfig {
            burst: 8,
            per_sec: 2,
        },
        key_fetch_pair_rate: RateConfig {
            burst: 3,
            per_sec: 1,
        },
        key_package_fetch_target_rate: RateConfig {
            burst: 5,
            per_sec: 1,
        },
        // Off: the audit expects every acknowledged message to stay.
        message_ttl: None,
        // Off: the checker holds that one Commit per epoch is ever stored.
        fence_ttl: None,
    }
}

fn keys() -> &'static [SigningKey] {
    static KEYS: OnceLock<Vec<SigningKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..IDENTITIES)
            .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
            .collect()
    })
}

fn identity(i: usize) -> IdentityKey {
    IdentityKey(keys()[i].verifying_key().to_bytes())
}

fn exporter(conn: ConnectionId) -> [u8; 32] {
    let mut e = [0x5a; 32];
    e[..8].copy_from_slice(&conn.0.to_be_bytes());
    e
}

/// What a request asked, as the checker needs it.
#[derive(Debug, Clone)]
enum Sent {
    AuthChallenge,
    Authenticate {
        identity: IdentityKey,
        proper: bool,
    },
    Upload {
        target: IdentityKey,
        package: Vec<u8>,
    },
    FetchKeyPackage {
        target: IdentityKey,
    },
    Count {
        target: IdentityKey,
    },
    UploadHybrid {
        target: IdentityKey,
    },
    FetchHybrid {
        target: IdentityKey,
    },
    Enqueue {
        queue: QueueId,
        message: MessageKey,
    },
    Fetch {
        queue: QueueId,
        after_seq: u64,
        limit: u32,
    },
    Batch {
        queues: Vec<QueueId>,
        message: MessageKey,
        payload: Vec<u8>,
    },
    Many {
        queues: Vec<QueueId>,
        messages: Vec<(MessageKey, Vec<u8>)>,
    },
    FetchChannels {
        recipient: IdentityKey,
        cursors: Vec<(ChannelId, u64)>,
        limit: u32,
    },
}

#[derive(Debug)]
struct Pending {
    conn: ConnectionId,
    slot: usize,
    /// The store's last Lsn right after the machine handled the request.
    lsn: Lsn,
    /// The method, for statistics and error messages.
    method: &'static str,
    sent: Sent,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    conn: ConnectionId,
    nonce: Option<[u8; 32]>,
    /// The identity an `Authenticated` reply confirmed.
    identity: Option<IdentityKey>,
}

/// What clients were told; survives crashes, since what was told was
/// durable.
#[derive(Debug, Default)]
struct Checker {
    /// Upload attempts of single-use packages, per (owner, package).
    uploads: HashMap<(IdentityKey, Vec<u8>), u32>,
    /// Last-resort packages ever sent for upload.
    last_resort_uploads: HashSet<(IdentityKey, Vec<u8>)>,
    /// Single-use packages handed out, per (owner, package).
    handed_out: HashMap<(IdentityKey, Vec<u8>), u32>,
    /// The queues: what was sent, acknowledged and shown (the checker the
    /// model test and the simulations share).
    ledger: Ledger,
    /// The cursors of every fetch not known to have been refused: anything
    /// at or below one may have been acknowledged away.
    cursors: HashMap<RequestId, Vec<(QueueId, u64)>>,
    /// The Commit shown per (channel, group id, epoch): its payload, or a
    /// sealed one's framing.
    commits: HashMap<(ChannelId, Vec<u8>, u64), Vec<u8>>,
}

struct Harness {
    node: NodeService<MemStore>,
    incarnation: u8,
    now: Time,
    next_conn: u64,
    next_request: u64,
    slots: [Option<Slot>; SLOTS],
    pending: HashMap<RequestId, Pending>,
    /// Highest Lsn this incarnation of the machine was told is durable.
    told_durable: Lsn,
    checker: Checker,
    stats: Stats,
    /// The seqs of the last `Messages` reply released.
    last_fetched: Option<Vec<u64>>,
}

impl Harness {
    fn new() -> Harness {
        let node = NodeService::new(config(), [0; 32], MemStore::new()).expect("open empty store");
        let mut h = Harness {
            node,
            incarnation: 0,
            now: Time::ZERO,
            next_conn: 0,
            next_request: 0,
            slots: [None; SLOTS],
            pending: HashMap::new(),
            told_durable: Lsn(0),
            checker: Checker::default(),
            stats: Stats::default(),
            last_fetched: None,
        };
        h.drain();
        h
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Open { slot } => self.open(usize::from(*slot) % SLOTS),
            Op::Close { slot } => self.close(usize::from(*slot) % SLOTS),
            Op::Login { slot, identity } => self.login(
                usize::from(*slot) % SLOTS,
                usize::from(*identity) % IDENTITIES,
            ),
            Op::Request {
                slot,
                auth_version,
                body,
            } => {
                let slot = usize::from(*slot) % SLOTS;
                let version = auth_version.unwrap_or(AUTH_VERSION);
                self.request(slot, version, body);
            }
            Op::Tick { ms } => {
                self.now = self
                    .now
                    .saturating_add(std::time::Duration::from_millis(u64::from(*ms)));
                self.node.handle_timeout(self.now);
                self.drain();
            }
            Op::Sync { upto, notify } => {
                let store = self.node.store();
                let (synced, last) = (store.synced_lsn().0, store.last_lsn().0);
                let target = match upto {
                    None => last,
                    Some(k) if last > synced => synced + 1 + u64::from(*k) % (last - synced),
                    Some(_) => last,
                };
                self.node.store_mut().sync_up_to(Lsn(target));
                if *notify {
                    self.notify();
                }
            }
            Op::Notify => self.notify(),
            Op::SyncFailed => {
                self.node.handle_sync_failed(self.now, "fuzz: fsync failed");
                self.drain();
            }
            Op::Crash => self.reopen(true),
            Op::Restart => self.reopen(false),
        }
    }

    // ----- operations ----------------------------------------------------

    fn open(&mut self, slot: usize) {
        if self.slots[slot].is_some() {
            return;
        }
        let conn = ConnectionId(self.next_conn);
        self.next_conn += 1;
        let tracked = self.node.connection_count();
        match self
            .node
            .handle_connection_opened(self.now, conn, exporter(conn))
        {
            Ok(()) => {
                self.slots[slot] = Some(Slot {
                    conn,
                    nonce: None,
                    identity: None,
                });
            }
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable, "refused open: {e}");
                assert!(
                    tracked >= config().connections_max,
                    "open refused with only {tracked} connections tracked"
                );
            }
        }
        self.drain();
    }

    fn close(&mut self, slot: usize) {
        if let Some(s) = self.slots[slot].take() {
            self.node.handle_connection_closed(self.now, s.conn);
            self.drain();
        }
    }

    /// Challenge, then authenticate with a proper signature; syncs when a
    /// reply waits for durability, as a shell's group commit would.
    fn login(&mut self, slot: usize, who: usize) {
        let Some(s) = self.slots[slot] else {
            return;
        };
        let rid = self.send(
            slot,
            AUTH_VERSION,
            RequestBody::AuthChallenge,
            Sent::AuthChallenge,
        );
        self.settle(rid);
        let Some(nonce) = self.slots[slot].and_then(|s| s.nonce) else {
            return;
        };
        let id = identity(who);
        let sig = keys()[who].sign(&auth_message(&id, &nonce, &exporter(s.conn)));
        let body = RequestBody::Authenticate {
            identity_key: id,
            signature: Signature(sig.to_bytes()),
        };
        let rid = self.send(
            slot,
            AUTH_VERSION,
            body,
            Sent::Authenticate {
                identity: id,
                proper: true,
            },
        );
        self.settle(rid);
    }

    /// Syncs everything and tells the machine until `rid` is answered (or
    /// cannot be: e.g. a fetchWait left waiting).
    fn settle(&mut self, rid: RequestId) {
        for _ in 0..3 {
            if !self.pending.contains_key(&rid) {
                return;
            }
            self.node.store_mut().sync();
            self.notify();
        }
    }

    fn request(&mut self, slot: usize, version: u16, body: &Body) {
        let Some(s) = self.slots[slot] else {
            return;
        };
        // The server recognises a retry by its sender and id; an
        // unauthenticated enqueue is refused, whoever it names.
        let sender = self
            .node
            .authenticated_identity(s.conn)
            .unwrap_or(IdentityKey([0; 32]));
        let key = move |id: MessageId| MessageKey { sender, id };
        let (body, sent) = match body {
            Body::AuthChallenge => (RequestBody::AuthChallenge, Sent::AuthChallenge),
            Body::Authenticate {
                identity: who,
                proper,
                signature,
            } => {
                let id = self.who(*who);
                let signature = match (proper, s.nonce, self.key_of(*who)) {
                    (true, Some(nonce), Some(key)) => Signature(
                        key.sign(&auth_message(&id, &nonce, &exporter(s.conn)))
                            .to_bytes(),
                    ),
                    _ => Signature(*signature),
                };
                let proper = *proper && s.nonce.is_some() && self.key_of(*who).is_some();
                (
                    RequestBody::Authenticate {
                        identity_key: id,
                        signature,
                    },
                    Sent::Authenticate {
                        identity: id,
                        proper,
                    },
                )
            }
            Body::UploadKeyPackage {
                identity: who,
                package,
                last_resort,
            } => {
                let target = self.who(*who);
                let key = (target, package.clone());
                if *last_resort {
                    self.checker.last_resort_uploads.insert(key);
                } else {
                    *self.checker.uploads.entry(key).or_default() += 1;
                }
                (
                    RequestBody::UploadKeyPackage {
                        identity_key: target,
                        package: package.clone(),
                        last_resort: *last_resort,
                        cipher_suite: 0,
                    },
                    Sent::Upload {
                        target,
                        package: package.clone(),
                    },
                )
            }
            Body::FetchKeyPackage { identity: who } => {
                let target = self.who(*who);
                (
                    RequestBody::FetchKeyPackage {
                        identity_key: target,
                        cipher_suite: 0,
                    },
                    Sent::FetchKeyPackage { target },
                )
            }
            Body::KeyPackageCount { identity: who } => {
                let target = self.who(*who);
                (
                    RequestBody::KeyPackageCount {
                        identity_key: target,
                        cipher_suite: 0,
                    },
                    Sent::Count { target },
                )
            }
            Body::UploadHybridKey {
                identity: who,
                hybrid_key,
                proper,
                signature,
            } => {
                let target = self.who(*who);
                let signature = match (proper, self.key_of(*who)) {
                    (true, Some(key)) => Signature(
                        key.sign(&hybrid_key_message(&target, hybrid_key))
                            .to_bytes(),
                    ),
                    _ => Signature(*signature),
                };
                (
                    RequestBody::UploadHybridKey {
                        identity_key: target,
                        hybrid_key: hybrid_key.clone(),
                        signature,
                    },
                    Sent::UploadHybrid { target },
                )
            }
            Body::FetchHybridKey { identity: who } => {
                let target = self.who(*who);
                (
                    RequestBody::FetchHybridKey {
                        identity_key: target,
                    },
                    Sent::FetchHybrid { target },
                )
            }
            Body::Enqueue {
                recipient,
                channel,
                payload,
                message_id,
            } => {
                let queue = QueueId {
                    recipient_key: self.who(*recipient),
                    channel_id: chan(*channel),
                };
                let message_id = mid(*message_id);
                self.note_sent(queue, key(message_id), payload);
                (
                    RequestBody::Enqueue {
                        recipient_key: queue.recipient_key,
                        channel_id: queue.channel_id,
                        payload: payload.clone(),
                        message_id,
                    },
                    Sent::Enqueue {
                        queue,
                        message: key(message_id),
                    },
                )
            }
            Body::Fetch {
                recipient,
                channel,
                cursor,
                limit,
            } => {
                let queue = QueueId {
                    recipient_key: self.who(*recipient),
                    channel_id: chan(*channel),
                };
                let after_seq = self.cursor(queue, *cursor);
                let limit = u32::from(*limit);
                (
                    RequestBody::Fetch {
                        recipient_key: queue.recipient_key,
                        channel_id: queue.channel_id,
                        after_seq,
                        limit,
                    },
                    Sent::Fetch {
                        queue,
                        after_seq,
                        limit,
                    },
                )
            }
            Body::FetchWait {
                recipient,
                channel,
                cursor,
                limit,
                timeout_ms,
            } => {
                let queue = QueueId {
                    recipient_key: self.who(*recipient),
                    channel_id: chan(*channel),
                };
                let after_seq = self.cursor(queue, *cursor);
                let limit = u32::from(*limit);
                (
                    RequestBody::FetchWait {
                        recipient_key: queue.recipient_key,
                        channel_id: queue.channel_id,
                        after_seq,
                        limit,
                        timeout_ms: u64::from(*timeout_ms),
                    },
                    Sent::Fetch {
                        queue,
                        after_seq,
                        limit,
                    },
                )
            }
            Body::EnqueueBatch {
                recipients,
                channel,
                payload,
                message_id,
            } => {
                let channel_id = chan(*channel);
                let payload = payload_bytes(payload);
                let message_id = mid(*message_id);
                let queues = self.queues_of(recipients, channel_id);
                for queue in &queues {
                    self.note_sent(*queue, key(message_id), &payload);
                }
                (
                    RequestBody::EnqueueBatch {
                        recipient_keys: queues.iter().map(|q| q.recipient_key).collect(),
                        channel_id,
                        payload: payload.clone(),
                        message_id,
                    },
                    Sent::Batch {
                        queues,
                        message: key(message_id),
                        payload,
                    },
                )
            }
            Body::EnqueueMany {
                recipients,
                channel,
                messages,
            } => {
                let channel_id = chan(*channel);
                let queues = self.queues_of(recipients, channel_id);
                let messages: Vec<(MessageId, Vec<u8>)> = messages
                    .iter()
                    .take(8)
                    .map(|(payload, m)| (mid(*m), payload_bytes(payload)))
                    .collect();
                for queue in &queues {
                    for (message_id, payload) in &messages {
                        self.note_sent(*queue, key(*message_id), payload);
                    }
                }
                (
                    RequestBody::EnqueueMany {
                        recipient_keys: queues.iter().map(|q| q.recipient_key).collect(),
                        channel_id,
                        messages: messages
                            .iter()
                            .map(|(message_id, payload)| Outgoing {
                                payload: payload.clone(),
                                message_id: *message_id,
                            })
                            .collect(),
                    },
                    Sent::Many {
                        queues,
                        messages: messages.into_iter().map(|(id, p)| (key(id), p)).collect(),
                    },
                )
            }
            Body::FetchWaitChannels {
                recipient,
                cursors,
                limit,
                timeout_ms,
            } => {
                let recipient = self.who(*recipient);
                let cursors: Vec<(ChannelId, u64)> = cursors
                    .iter()
                    .take(4)
                    .map(|(c, cursor)| {
                        let queue = QueueId {
                            recipient_key: recipient,
                            channel_id: chan(*c),
                        };
                        (queue.channel_id, self.cursor(queue, *cursor))
                    })
                    .collect();
                let limit = u32::from(*limit);
                (
                    RequestBody::FetchWaitChannels {
                        recipient_key: recipient,
                        cursors: cursors.clone(),
                        limit,
                        timeout_ms: u64::from(*timeout_ms),
                    },
                    Sent::FetchChannels {
                        recipient,
                        cursors,
                        limit,
                    },
                )
            }
        };
        self.send(slot, version, body, sent);
    }

    fn who(&self, who: Who) -> IdentityKey {
        match who {
            Who::Known(n) => identity(usize::from(n) % IDENTITIES),
            Who::Raw(bytes) => IdentityKey(bytes),
        }
    }

    /// The queues of (at most six of) `recipients` on `channel_id`.
    fn queues_of(&self, recipients: &[Who], channel_id: ChannelId) -> Vec<QueueId> {
        recipients
            .iter()
            .take(6)
            .map(|r| QueueId {
                recipient_key: self.who(*r),
                channel_id,
            })
            .collect()
    }

    fn key_of(&self, who: Who) -> Option<&'static SigningKey> {
        match who {
            Who::Known(n) => Some(&keys()[usize::from(n) % IDENTITIES]),
            Who::Raw(_) => None,
        }
    }

    fn cursor(&self, queue: QueueId, cursor: Cursor) -> u64 {
        let c = &self.checker;
        match cursor {
            Cursor::LastSeen => c.ledger.last_seen(queue),
            Cursor::Zero => 0,
            Cursor::Tail => c.ledger.next_seq_floor(queue).saturating_sub(1),
            Cursor::Raw(v) => v,
        }
    }

    /// Hands one request to the machine and drains what comes out.
    fn send(&mut self, slot: usize, version: u16, body: RequestBody, sent: Sent) -> RequestId {
        let conn = self.slots[slot].expect("slot checked open").conn;
        let rid = RequestId(self.next_request);
        self.next_request += 1;
        let method = body.method();
        self.node.handle_request(
            self.now,
            conn,
            rid,
            Request {
                auth_version: version,
                body,
            },
        );
        let lsn = self.node.store().last_lsn();
        match &sent {
            Sent::Fetch {
                queue, after_seq, ..
            } => {
                self.checker.cursors.insert(rid, vec![(*queue, *after_seq)]);
            }
            Sent::FetchChannels {
                recipient, cursors, ..
            } => {
                let queues = cursors
                    .iter()
                    .map(|(channel_id, after_seq)| {
                        (
                            QueueId {
                                recipient_key: *recipient,
                                channel_id: *channel_id,
                            },
                            *after_seq,
                        )
                    })
                    .collect();
                self.checker.cursors.insert(rid, queues);
            }
            _ => {}
        }
        self.pending.insert(
            rid,
            Pending {
                conn,
                slot,
                lsn,
                method,
                sent,
            },
        );
        self.drain();
        rid
    }

    fn notify(&mut self) {
        let synced = self.node.store().synced_lsn();
        self.node.handle_synced(self.now, synced);
        self.told_durable = self.told_durable.max(synced);
        self.drain();
    }

    fn reopen(&mut self, crash: bool) {
        let placeholder =
            NodeService::new(config(), [0; 32], MemStore::new()).expect("open empty store");
        let mut store = std::mem::replace(&mut self.node, placeholder).into_store();
        if crash {
            store.crash();
        }
        self.incarnation = self.incarnation.wrapping_add(1);
        self.node = NodeService::new(config(), [self.incarnation; 32], store)
            .expect("reopening a store this machine wrote");
        // The process is gone: its connections, waiters and unsent replies
        // with it.
        self.slots = [None; SLOTS];
        self.pending.clear();
        self.told_durable = Lsn(0);
        self.stats.reopens += 1;
        self.drain();
    }

    /// Drains the machine's outputs, checking every reply.
    fn drain(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match out {
                // Syncs are performed when the sequence says so.
                Output::Sync { lsn } => {
                    assert!(
                        lsn <= self.node.store().last_lsn(),
                        "sync of an unwritten Lsn"
                    );
                }
                Output::Reply {
                    conn,
                    request_id,
                    reply,
                } => self.on_reply(conn, request_id, reply),
            }
        }
    }

    // ----- the checker -----------------------------------------------------

    /// A payload sent to `queue` as `message`.
    fn note_sent(&mut self, queue: QueueId, message: MessageKey, payload: &[u8]) {
        self.checker.ledger.sent(queue, message, payload);
    }

    fn on_reply(&mut self, conn: ConnectionId, rid: RequestId, reply: Reply) {
        let p = self
            .pending
            .remove(&rid)
            .unwrap_or_else(|| panic!("reply to unknown or already answered request {rid:?}"));
        assert_eq!(p.conn, conn, "reply sent to another connection");
        let r = match reply {
            Ok(r) => r,
            Err(e) => {
                *self.stats.errors.entry(p.method).or_default() += 1;
                assert!(!e.message.is_empty(), "error without a message");
                if let ErrorKind::StaleEpoch { current_epoch } = e.kind {
                    let payloads: Vec<&Vec<u8>> = match &p.sent {
                        Sent::Batch { payload, .. } => vec![payload],
                        Sent::Many { messages, .. } => messages.iter().map(|(_, p)| p).collect(),
                        _ => panic!("staleEpoch for {}", p.method),
                    };
                    let epochs: Vec<u64> = payloads
                        .iter()
                        .filter_map(|p| commit::commit_header(p))
                        .map(|h| h.epoch)
                        .collect();
                    assert!(!epochs.is_empty(), "staleEpoch for no Commit");
                    assert!(
                        epochs.iter().any(|epoch| current_epoch > *epoch),
                        "staleEpoch names epoch {current_epoch} for Commits in {epochs:?}"
                    );
                }
                // A refusal changes nothing; only `unavailable` after a
                // storage failure leaves it open whether it was applied.
                if e.kind != ErrorKind::Unavailable {
                    self.checker.cursors.remove(&rid);
                }
                return;
            }
        };
        *self.stats.ok.entry(p.method).or_default() += 1;
        assert!(
            self.told_durable >= p.lsn,
            "{} answered before its writes were durable ({:?} < {:?})",
            p.method,
            self.told_durable,
            p.lsn
        );
        // The slot still holds this connection unless it was closed.
        let slot = self.slots[p.slot].filter(|s| s.conn == conn);
        let authed = slot.and_then(|s| s.identity);
        let owner_ok = |target: &IdentityKey| slot.is_none() || authed == Some(*target);
        let method = p.method;
        match (p.sent, r) {
            (Sent::AuthChallenge, Response::AuthChallenge { nonce }) => {
                if let Some(s) = self.slots[p.slot].as_mut().filter(|s| s.conn == conn) {
                    s.nonce = Some(nonce);
                }
            }
            (Sent::Authenticate { identity, proper }, Response::Authenticated) => {
                assert!(proper, "a forged signature authenticated");
                if let Some(s) = self.slots[p.slot].as_mut().filter(|s| s.conn == conn) {
                    assert!(s.identity.is_none(), "authenticated twice");
                    s.identity = Some(identity);
                    s.nonce = None;
                }
            }
            (Sent::Upload { target, package }, Response::KeyPackageUploaded { fingerprint }) => {
                assert!(
                    owner_ok(&target),
                    "upload to a pool the connection does not own"
                );
                assert_eq!(fingerprint, <[u8; 32]>::from(Sha256::digest(&package)));
            }
            (
                Sent::FetchKeyPackage { target },
                Response::KeyPackage {
                    package,
                    last_resort,
                },
            ) => {
                assert!(slot.is_none() || authed.is_some(), "unauthenticated fetch");
                self.check_key_package(target, package, last_resort);
            }
            (Sent::Count { target }, Response::KeyPackageCount { count, .. }) => {
                assert!(
                    owner_ok(&target),
                    "count of a pool the connection does not own"
                );
                assert!(count <= config().key_packages_per_identity_max);
            }
            (Sent::UploadHybrid { target }, Response::HybridKeyUploaded) => {
                assert!(owner_ok(&target), "hybrid key stored for another identity");
            }
            (
                Sent::FetchHybrid { target },
                Response::HybridKey {
                    hybrid_key,
                    signature,
                },
            ) => {
                let vk = ed25519_dalek::VerifyingKey::from_bytes(target.as_bytes())
                    .expect("a stored hybrid key's owner is a valid key");
                let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
                vk.verify_strict(&hybrid_key_message(&target, &hybrid_key), &sig)
                    .expect("a hybrid key without its owner's signature");
            }
            (Sent::Enqueue { queue, message }, Response::Enqueued { seq }) => {
                assert!(
                    slot.is_none() || authed.is_some(),
                    "unauthenticated enqueue"
                );
                self.check_enqueued(queue, message, seq);
            }
            (
                Sent::Fetch {
                    queue,
                    after_seq,
                    limit,
                },
                Response::Messages {
                    messages,
                    next_seq,
                    gap: None,
                },
            ) => {
                assert!(
                    owner_ok(&queue.recipient_key),
                    "fetch of a queue the connection does not own"
                );
                self.last_fetched = Some(messages.iter().map(|m| m.seq).collect());
                self.check_messages(queue, after_seq, limit, messages, next_seq);
            }
            (
                Sent::Batch {
                    queues, message, ..
                },
                Response::EnqueuedBatch { seqs },
            ) => {
                assert!(slot.is_none() || authed.is_some(), "unauthenticated batch");
                assert_eq!(seqs.len(), queues.len(), "one seq per recipient");
                for (queue, seq) in queues.iter().zip(seqs) {
                    self.check_enqueued(*queue, message, seq);
                }
            }
            (Sent::Many { queues, messages }, Response::EnqueuedBatch { seqs }) => {
                assert!(
                    slot.is_none() || authed.is_some(),
                    "unauthenticated enqueueMany"
                );
                assert_eq!(
                    seqs.len(),
                    queues.len() * messages.len(),
                    "one seq per message and recipient"
                );
                let width = queues.len();
                for (m, (message, _)) in messages.iter().enumerate() {
                    for (i, queue) in queues.iter().enumerate() {
                        self.check_enqueued(*queue, *message, seqs[m * width + i]);
                    }
                }
            }
            (
                Sent::FetchChannels {
                    recipient,
                    cursors,
                    limit,
                },
                Response::ChannelMessages { channels },
            ) => {
                assert!(
                    owner_ok(&recipient),
                    "fetch of queues the connection does not own"
                );
                let total: usize = channels.iter().map(|c| c.messages.len()).sum();
                assert!(
                    total <= FETCH_LIMIT_MAX as usize,
                    "more than one fetch's messages"
                );
                let mut asked = cursors.iter();
                for c in channels {
                    assert!(
                        !c.messages.is_empty(),
                        "a channel without messages answered"
                    );
                    let (_, after_seq) = asked
                        .find(|(ch, _)| *ch == c.channel_id)
                        .expect("a channel not asked for, or out of order");
                    let queue = QueueId {
                        recipient_key: recipient,
                        channel_id: c.channel_id,
                    };
                    self.check_messages(queue, *after_seq, limit, c.messages, c.next_seq);
                }
            }
            (sent, r) => panic!("{method} answered with {r:?} for {sent:?}"),
        }
    }

    /// A fetch's messages of `queue` after `after_seq`.
    fn check_messages(
        &mut self,
        queue: QueueId,
        after_seq: u64,
        limit: u32,
        messages: Vec<QueuedMessage>,
        next_seq: u64,
    ) {
        let view = FetchView {
            limit: Some(limit),
            // Cursors here are arbitrary, so only the cursor itself bounds
            // where an answer may start, and nothing is checked for
            // completeness until the audit.
            deleted_upto: Some(0),
            ..FetchView::default()
        };
        let broken = self
            .checker
            .ledger
            .fetched(queue, after_seq, &messages, next_seq, None, view);
        assert!(broken.is_empty(), "fetch: {broken:?}");
        for m in messages {
            self.check_fence(queue, &m.payload);
        }
    }

    fn check_key_package(&mut self, target: IdentityKey, package: Vec<u8>, last_resort: bool) {
        let key = (target, package);
        if last_resort {
            assert!(
                self.checker.last_resort_uploads.contains(&key),
                "a last-resort KeyPackage its target never uploaded as such"
            );
            return;
        }
        let uploaded = self.checker.uploads.get(&key).copied().unwrap_or(0);
        let n = self.checker.handed_out.entry(key).or_default();
        *n += 1;
        assert!(
            *n <= uploaded,
            "a single-use KeyPackage handed out {n} times, uploaded {uploaded} times"
        );
    }

    fn check_enqueued(&mut self, queue: QueueId, message: MessageKey, seq: u64) {
        let broken = self.checker.ledger.acknowledged(queue, message, seq);
        assert!(broken.is_empty(), "enqueue: {broken:?}");
    }

    /// The commit fence: whatever reached which queue, one Commit per
    /// (channel, group, epoch) was ever stored.
    fn check_fence(&mut self, queue: QueueId, payload: &[u8]) {
        if let Some(header) = commit::commit_header(payload) {
            // A Commit is named by its payload, or a sealed one by its
            // framing (its copies differ per recipient).
            let key = (queue.channel_id, header.group_id.to_vec(), header.epoch);
            let identity = header.identity.to_vec();
            let stored = self.checker.commits.entry(key).or_insert(identity.clone());
            assert_eq!(
                *stored, identity,
                "two Commits stored for epoch {}",
                header.epoch
            );
        }
    }

    // ----- the end of a run ----------------------------------------------

    /// Makes everything durable, lets every deadline pass, and checks that
    /// every request on an open connection was answered; then crashes and
    /// audits the queues.
    fn finish(&mut self) {
        self.node.store_mut().sync();
        self.notify();
        self.now = self
            .now
            .saturating_add(std::time::Duration::from_secs(3_600));
        self.node.handle_timeout(self.now);
        self.drain();
        self.node.store_mut().sync();
        self.notify();
        let open: Vec<ConnectionId> = self.slots.iter().flatten().map(|s| s.conn).collect();
        for (rid, p) in &self.pending {
            assert!(
                !open.contains(&p.conn),
                "{} ({rid:?}) never answered on an open connection",
                p.method
            );
        }
        self.audit();
    }

    fn audit(&mut self) {
        self.reopen(true);
        let mut acked: BTreeMap<QueueId, BTreeMap<u64, MessageKey>> = BTreeMap::new();
        for (queue, id, seq) in self.checker.ledger.acknowledged_all() {
            acked.entry(queue).or_default().insert(seq, id);
        }
        let queues: Vec<(QueueId, Vec<(u64, MessageKey)>)> = acked
            .iter()
            .map(|(q, ids)| {
                let covered = self
                    .checker
                    .cursors
                    .values()
                    .flatten()
                    .filter(|(cq, _)| cq == q)
                    .map(|(_, c)| *c)
                    .max()
                    .unwrap_or(0);
                // A cursor of u64::MAX (sent, and not known refused) covers
                // everything.
                let must: Vec<(u64, MessageKey)> = match covered.checked_add(1) {
                    Some(from) => ids.range(from..).map(|(s, id)| (*s, *id)).collect(),
                    None => Vec::new(),
                };
                (*q, must)
            })
            .filter(|(_, must)| !must.is_empty())
            .collect();
        for (queue, must) in queues {
            let Some(owner) = (0..IDENTITIES).find(|i| identity(*i) == queue.recipient_key) else {
                // Nobody can log in as a raw key; its queue cannot be read.
                continue;
            };
            self.open(0);
            self.login(0, owner);
            self.last_fetched = None;
            let rid = self.send(
                0,
                AUTH_VERSION,
                RequestBody::Fetch {
                    recipient_key: queue.recipient_key,
                    channel_id: queue.channel_id,
                    after_seq: 0,
                    limit: FETCH_LIMIT_MAX,
                },
                Sent::Fetch {
                    queue,
                    after_seq: 0,
                    limit: FETCH_LIMIT_MAX,
                },
            );
            self.settle(rid);
            let fetched = self
                .last_fetched
                .take()
                .expect("the audit fetch is answered with messages");
            // The fetch's answer went through the ledger: each seq shows a
            // payload sent under the id acknowledged there.
            for (seq, _) in must {
                assert!(
                    fetched.contains(&seq),
                    "acknowledged seq {seq} lost in a crash"
                );
                self.stats.audited += 1;
            }
            self.close(0);
        }
    }
}

fn mid(m: Mid) -> MessageId {
    match m {
        Mid::Pool(n) => MessageId([n % 8; 16]),
        Mid::Raw(bytes) => MessageId(bytes),
    }
}

/// The bytes of a drawn payload.
fn payload_bytes(payload: &Payload) -> Vec<u8> {
    match payload {
        Payload::Raw(bytes) => bytes.clone(),
        Payload::Commit { group, epoch, body } => {
            commit_payload(group % 2, u64::from(epoch % 4), *body)
        }
    }
}

/// A group envelope around the framing of an MLS PrivateMessage Commit
/// (what `quicproquo_core::protocol::framing` reads), then `body`.
/// A Commit of `group` for `epoch`, told apart from others by `body`; with
/// `body`'s top bit set, as a pq group sends it: its framing in the clear,
/// then bytes the server cannot read (a stand-in for the sealed envelope).
fn commit_payload(group: u8, epoch: u64, body: u8) -> Vec<u8> {
    let mut v = commit::GROUP_ENVELOPE_PREFIX.to_vec();
    // mls10, private_message, a one-byte group id.
    v.extend_from_slice(&[0, 1, 0, 2, 1, group]);
    v.extend_from_slice(&epoch.to_be_bytes());
    // content_type commit, then something that differs per Commit.
    v.extend_from_slice(&[3, body]);
    if body & 0x80 == 0 {
        return v;
    }
    let framing = commit::commit_framing(&v).expect("a Commit has a framing");
    let mut sealed = commit::FRAMED_HYBRID_PREFIX.to_vec();
    sealed.extend_from_slice(&(framing.len() as u16).to_be_bytes());
    sealed.extend_from_slice(&framing);
    sealed.extend_from_slice(&[body; 40]);
    sealed
}

fn chan(c: Chan) -> ChannelId {
    match c {
        Chan::Default => ChannelId::DEFAULT,
        Chan::Small(n) => ChannelId::try_from_slice(&[n % 3]).expect("one byte"),
        Chan::Full(bytes) => ChannelId::try_from_slice(&bytes).expect("16 bytes"),
    }
}
