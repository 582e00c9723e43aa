//! The NodeService state machine: the Authentication Service (KeyPackages,
//! hybrid keys) and the Delivery Service (queues, long-poll waiters), sans-io.
//!
//! The shell feeds it connection events and decoded requests with
//! `handle_*(now, …)` and drains [`Output`]s with [`NodeService::poll_output`]:
//! replies to send and syncs to perform. It asks
//! [`NodeService::poll_timeout`] when to call [`NodeService::handle_timeout`]
//! for long-poll deadlines.
//!
//! Invariants this module keeps:
//! - Durability before acknowledgement: in [`Durability::Fsync`] mode a reply
//!   is released only once every batch written before it is reported synced
//!   ([`NodeService::handle_synced`]), so a crash can lose only what nobody
//!   was told about — including reads of unsynced data, so a seq shown to a
//!   recipient is never reissued after a crash.
//! - A KeyPackage is removed in the same atomic batch that hands it out.
//! - Per queue, `seq` is strictly increasing, gap-free, and never reused.
//! - A request from the wrong identity changes nothing.
//! - Every collection a peer can grow is bounded (see [`crate::limits`]).

mod layout;
mod ratelimit;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use ed25519_dalek::{Verifier, VerifyingKey};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

use crate::error::ServiceError;
use crate::limits::{self, AUTH_NONCE_BYTES, AUTH_VERSION, TLS_EXPORTER_BYTES};
use crate::store::{Batch, Lsn, Store, StoreError, StoreErrorKind};
use crate::time::Time;
use crate::types::{ChannelId, ConnectionId, IdentityKey, QueueId, RequestId, Signature};

pub use layout::FORMAT_VERSION;
pub use ratelimit::{RateConfig, RateLimiter};
// The vocabulary the machine speaks is defined in `crate::protocol`, which
// the client machine shares; it is named here too, as the node's API.
pub use crate::protocol::framing as commit;
pub use crate::protocol::{
    AUTH_CONTEXT, ChannelMessages, Gap, HYBRID_KEY_CONTEXT, Outgoing, QueuedMessage, Reply,
    Request, RequestBody, Response, auth_message, hybrid_key_message,
};

use layout::{Corrupt, Entry, Fence, KpMeta, QueueMeta};

/// When a reply may be sent relative to its writes reaching disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Replies wait until the writes they depend on are synced (default).
    #[default]
    Fsync,
    /// Replies go out at once and syncs run behind them; a crash may lose
    /// writes that were already acknowledged.
    Buffered,
}

/// The machine's configuration: the durability mode and the limits
/// operators may change. Defaults are the constants of [`crate::limits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Whether replies wait for fsync.
    pub durability: Durability,
    /// Largest enqueued payload.
    pub payload_bytes_max: usize,
    /// Largest KeyPackage.
    pub key_package_bytes_max: usize,
    /// KeyPackages one identity may keep.
    pub key_packages_per_identity_max: u32,
    /// Messages one queue may hold.
    pub queue_depth_max: u64,
    /// Payload bytes one queue may hold.
    pub queue_bytes_max: u64,
    /// Longest fetchWait, in milliseconds.
    pub fetch_wait_timeout_ms_max: u64,
    /// Waiters per connection.
    pub waiters_per_connection_max: usize,
    /// Waiters in total.
    pub waiters_max: usize,
    /// Connections tracked at once.
    pub connections_max: usize,
    /// Enqueues per sender identity.
    pub enqueue_rate: RateConfig,
    /// KeyPackage and hybrid-key fetches per (requester, target).
    pub key_fetch_pair_rate: RateConfig,
    /// KeyPackage fetches per target from all requesters.
    pub key_package_fetch_target_rate: RateConfig,
    /// Messages older than this (by the clock the shell passes in) are
    /// dropped, and the recipient's next fetch reports the gap; `None`
    /// keeps them until fetched.
    pub message_ttl: Option<Duration>,
    /// A commit fence whose last Commit is older than this is deleted by
    /// the sweep ([`NodeService::handle_sweep`]); `None` keeps fences
    /// forever.
    pub fence_ttl: Option<Duration>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            durability: Durability::Fsync,
            payload_bytes_max: limits::PAYLOAD_BYTES_MAX,
            key_package_bytes_max: limits::KEY_PACKAGE_BYTES_MAX,
            key_packages_per_identity_max: limits::KEY_PACKAGES_PER_IDENTITY_MAX,
            queue_depth_max: limits::QUEUE_DEPTH_MAX,
            queue_bytes_max: limits::QUEUE_BYTES_MAX,
            fetch_wait_timeout_ms_max: limits::FETCH_WAIT_TIMEOUT_MS_MAX,
            waiters_per_connection_max: limits::WAITERS_PER_CONNECTION_MAX,
            waiters_max: limits::WAITERS_MAX,
            connections_max: limits::CONNECTIONS_MAX,
            enqueue_rate: RateConfig {
                burst: limits::ENQUEUE_PER_SENDER_BURST,
                per_sec: limits::ENQUEUE_PER_SENDER_PER_SEC,
            },
            key_fetch_pair_rate: RateConfig {
                burst: limits::KEY_PACKAGE_FETCH_PER_PAIR_BURST,
                per_sec: limits::KEY_PACKAGE_FETCH_PER_PAIR_PER_SEC,
            },
            key_package_fetch_target_rate: RateConfig {
                burst: limits::KEY_PACKAGE_FETCH_PER_TARGET_BURST,
                per_sec: limits::KEY_PACKAGE_FETCH_PER_TARGET_PER_SEC,
            },
            message_ttl: None,
            fence_ttl: Some(limits::FENCE_TTL),
        }
    }
}

/// Why a store could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The store was written by a newer version of quicproquo.
    #[error(
        "the database has format version {found}, newer than the {supported} this qpq-server supports; upgrade qpq-server"
    )]
    NewerFormat {
        /// Version found in the store.
        found: u32,
        /// Highest version this build understands.
        supported: u32,
    },
    /// The store's records do not decode.
    #[error("the database is corrupt: {0}")]
    Corrupt(&'static str),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the machine asks the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `reply` on the stream of `request_id` on `conn`. A reply to a
    /// connection that has closed is dropped by the shell.
    Reply {
        /// The connection the request came from.
        conn: ConnectionId,
        /// The request being answered.
        request_id: RequestId,
        /// The answer.
        reply: Reply,
    },
    /// Make every batch up to `lsn` durable, then call
    /// [`NodeService::handle_synced`]. Syncs may be merged: one sync covering
    /// a later `lsn` answers all earlier ones.
    Sync {
        /// The last batch written.
        lsn: Lsn,
    },
}

#[derive(Debug)]
struct Connection {
    tls_exporter: [u8; TLS_EXPORTER_BYTES],
    nonce: Option<[u8; AUTH_NONCE_BYTES]>,
    identity: Option<IdentityKey>,
    waiters: Vec<u64>,
}

/// A parked long-poll: a `fetchWait` (one cursor, answered with
/// [`Response::Messages`]) or a `fetchWaitChannels` (answered with
/// [`Response::ChannelMessages`]).
#[derive(Debug)]
struct Waiter {
    conn: ConnectionId,
    request_id: RequestId,
    recipient_key: IdentityKey,
    cursors: Vec<(ChannelId, u64)>,
    channels: bool,
    limit: u32,
    deadline: Time,
}

impl Waiter {
    fn queues(&self) -> impl Iterator<Item = QueueId> + '_ {
        self.cursors.iter().map(|(channel_id, _)| QueueId {
            recipient_key: self.recipient_key,
            channel_id: *channel_id,
        })
    }
}

/// One queue's part of a reply.
#[derive(Debug)]
struct QueueRead {
    messages: Vec<QueuedMessage>,
    next_seq: u64,
    gap: Option<Gap>,
}

/// References to shared payloads one batch drops, per payload.
#[derive(Debug, Default)]
struct BlobDrops(BTreeMap<u64, u64>);

impl BlobDrops {
    /// Counts `entry`'s reference, if it is to a shared payload.
    fn count(&mut self, entry: &Entry) {
        if let Entry::Shared { blob, .. } = entry {
            *self.0.entry(*blob).or_default() += 1;
        }
    }
}

/// A message's enqueue time as stored: milliseconds of the machine's clock.
fn stamp_ms(now: Time) -> u64 {
    now.as_micros() / 1_000
}

/// What one reply may still carry: messages in total and payload bytes
/// (the first message always fits).
#[derive(Debug)]
struct ReadBudget {
    messages: u32,
    bytes: usize,
    taken: bool,
}

impl ReadBudget {
    fn new() -> Self {
        ReadBudget {
            messages: limits::FETCH_LIMIT_MAX,
            bytes: 0,
            taken: false,
        }
    }
}

/// Which kind of key a requester fetches from a target, for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum KeyFetch {
    KeyPackage,
    HybridKey,
}

/// The NodeService machine over a store `S`.
#[derive(Debug)]
pub struct NodeService<S> {
    config: NodeConfig,
    store: S,
    rng: ChaCha20Rng,
    connections: HashMap<ConnectionId, Connection>,
    waiters: BTreeMap<u64, Waiter>,
    waiters_by_queue: HashMap<QueueId, Vec<u64>>,
    deadlines: BTreeSet<(Time, u64)>,
    next_waiter: u64,
    /// Entries of `waiters_by_queue` (cursors of all waiters).
    wait_cursors: usize,
    /// Number of the next shared payload.
    next_blob: u64,
    enqueue_limiter: RateLimiter<IdentityKey>,
    key_fetch_pair_limiter: RateLimiter<(KeyFetch, IdentityKey, IdentityKey)>,
    key_package_target_limiter: RateLimiter<IdentityKey>,
    /// Last batch this machine wrote.
    last_write: Lsn,
    /// Batches up to here are durable.
    durable: Lsn,
    /// Highest `Lsn` a [`Output::Sync`] was emitted for.
    sync_requested: Lsn,
    /// Replies waiting for their writes to become durable, in `Lsn` order.
    held: VecDeque<(Lsn, Output)>,
    ready: VecDeque<Output>,
    /// Set after a storage failure: the machine takes no more writes.
    failed: Option<String>,
    /// Where the sweep's walks go on: the last queue-counters key and the
    /// last fence key it finished (from the first when `None`).
    sweep_queues_after: Option<Vec<u8>>,
    sweep_fences_after: Option<Vec<u8>>,
}

/// What one step of the sweep ([`NodeService::handle_sweep`]) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Queues whose counters it looked at.
    pub queues: usize,
    /// Messages it dropped for being older than the message TTL.
    pub expired: u64,
    /// Commit fences it looked at.
    pub fences: usize,
    /// Fences it deleted for being idle longer than the fence TTL.
    pub fences_deleted: usize,
    /// Whether both walks reached their end (the next step starts over).
    pub round_done: bool,
}

impl<S: Store> NodeService<S> {
    /// Opens the machine over `store`. `seed` seeds the nonce generator: OS
    /// entropy in production, the test seed in tests and simulations.
    pub fn new(config: NodeConfig, seed: [u8; 32], mut store: S) -> Result<Self, OpenError> {
        if let Some(v) = store.get(&layout::version_key())? {
            let found = layout::decode_version(&v).map_err(|Corrupt(w)| OpenError::Corrupt(w))?;
            if found > FORMAT_VERSION {
                return Err(OpenError::NewerFormat {
                    found,
                    supported: FORMAT_VERSION,
                });
            }
        }
        let next_blob = match store.get(&layout::blob_next_key())? {
            Some(v) => layout::decode_seq(&v).map_err(|Corrupt(w)| OpenError::Corrupt(w))?,
            None => 0,
        };
        // Always write on open. A previous process may have died leaving
        // writes the OS still holds unsynced, so nothing in the store is known
        // to be durable: every reply of this machine waits for a sync that
        // covers this batch, and with it everything written before. It adds
        // nothing, so a store kept nearly full still lets it in.
        let mut b = Batch::upkeep();
        b.put(
            layout::version_key(),
            layout::encode_version(FORMAT_VERSION),
        );
        let last_write = store.write(b)?;
        let capacity = limits::RATE_LIMIT_KEYS_MAX;
        let mut machine = NodeService {
            enqueue_limiter: RateLimiter::new(config.enqueue_rate, capacity),
            key_fetch_pair_limiter: RateLimiter::new(config.key_fetch_pair_rate, capacity),
            key_package_target_limiter: RateLimiter::new(
                config.key_package_fetch_target_rate,
                capacity,
            ),
            config,
            store,
            rng: ChaCha20Rng::from_seed(seed),
            connections: HashMap::new(),
            waiters: BTreeMap::new(),
            waiters_by_queue: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_waiter: 0,
            wait_cursors: 0,
            next_blob,
            last_write,
            durable: Lsn(0),
            sync_requested: Lsn(0),
            held: VecDeque::new(),
            ready: VecDeque::new(),
            failed: None,
            sweep_queues_after: None,
            sweep_fences_after: None,
        };
        machine.request_sync();
        Ok(machine)
    }

    /// The machine's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The identity connection `conn` authenticated as, if it did (for
    /// inspection: checkers name the sender of what a connection enqueues).
    pub fn authenticated_identity(&self, conn: ConnectionId) -> Option<IdentityKey> {
        self.connections.get(&conn).and_then(|c| c.identity)
    }

    /// The store, for inspection.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably (tests use it to sync or crash a [`crate::store::MemStore`]).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Gives the store back, e.g. to reopen it after a simulated crash.
    pub fn into_store(self) -> S {
        self.store
    }

    /// A new connection whose TLS session exports `tls_exporter`. Refused
    /// with `unavailable` when the connection table is full; the shell then
    /// closes the connection.
    pub fn handle_connection_opened(
        &mut self,
        _now: Time,
        conn: ConnectionId,
        tls_exporter: [u8; TLS_EXPORTER_BYTES],
    ) -> Result<(), ServiceError> {
        if !self.connections.contains_key(&conn)
            && self.connections.len() >= self.config.connections_max
        {
            return Err(ServiceError::unavailable("too many connections"));
        }
        self.connections.insert(
            conn,
            Connection {
                tls_exporter,
                nonce: None,
                identity: None,
                waiters: Vec::new(),
            },
        );
        Ok(())
    }

    /// The connection is gone: its waiters are dropped and its identity
    /// binding forgotten.
    pub fn handle_connection_closed(&mut self, _now: Time, conn: ConnectionId) {
        if let Some(c) = self.connections.remove(&conn) {
            for id in c.waiters {
                self.remove_waiter(id);
            }
        }
    }

    /// One request from `conn`. The reply comes out of
    /// [`Self::poll_output`], now or (for a waiting fetchWait, or while
    /// writes are not yet durable) later.
    pub fn handle_request(
        &mut self,
        now: Time,
        conn: ConnectionId,
        request_id: RequestId,
        request: Request,
    ) {
        if let Some(reply) = self.dispatch(now, conn, request_id, request) {
            self.reply(conn, request_id, reply);
        }
        self.request_sync();
    }

    /// Batches up to `lsn` are durable: release the replies that waited for
    /// them.
    pub fn handle_synced(&mut self, _now: Time, lsn: Lsn) {
        self.durable = self.durable.max(lsn);
        while let Some((hold, _)) = self.held.front() {
            if *hold > self.durable {
                break;
            }
            if let Some((_, out)) = self.held.pop_front() {
                self.ready.push_back(out);
            }
        }
    }

    /// Syncing failed: the machine stops taking writes, and every reply still
    /// waiting for durability becomes `unavailable` (the request may or may
    /// not have been applied; enqueue retries are idempotent).
    pub fn handle_sync_failed(&mut self, _now: Time, reason: &str) {
        self.fail(reason);
    }

    /// Time has passed: expire long-poll waiters whose deadline is due. A
    /// call with nothing due does nothing.
    pub fn handle_timeout(&mut self, now: Time) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(w) = self.remove_waiter(id) {
                let reply = self.answer(&w);
                self.reply(w.conn, w.request_id, reply);
            }
        }
        self.request_sync();
    }

    /// One bounded step of the background sweep, which the shell runs on
    /// a timer (`sweep_interval_ms`): it walks the queues' counters, at
    /// most [`limits::SWEEP_RECORDS_PER_STEP`] a step, and drops their
    /// messages older than the message TTL (at most
    /// [`limits::TTL_EXPIRY_PER_REQUEST_MAX`] a step), so a queue nobody
    /// reads or writes any more does not keep expired messages on disk;
    /// and it walks the commit fences as far, deleting those whose last
    /// Commit is older than the fence TTL. Each walk carries on where the
    /// last step stopped and starts over at its end. What it changes goes
    /// in one batch (a sync is asked for as after a request); without a
    /// TTL for either there is nothing to walk. Requests never wait for a
    /// sweep, and a failed read or write ends the step (a write refused for
    /// a full disk leaves its work to the next round; any other failed
    /// write fails the machine as any write does).
    pub fn handle_sweep(&mut self, now: Time) -> Swept {
        let mut swept = Swept::default();
        if self.failed.is_some() {
            return swept;
        }
        // It only frees space (or stamps an old fence): a store may let it
        // into its reserve.
        let mut batch = Batch::upkeep();
        let mut drops = BlobDrops::default();
        let walked = self
            .sweep_queues(now, &mut batch, &mut drops, &mut swept)
            .and_then(|queues_done| {
                let fences_done = self.sweep_fences(now, &mut batch, &mut swept)?;
                Ok(queues_done && fences_done)
            });
        swept.round_done = walked.unwrap_or(false);
        if !batch.is_empty() && self.finish_drops(drops, &mut batch).is_ok() {
            // A failed write fails the machine; nothing else to do here.
            let _ = self.write(batch);
            self.request_sync();
        }
        swept
    }

    /// The queue walk of [`Self::handle_sweep`]; whether it reached the end.
    fn sweep_queues(
        &mut self,
        now: Time,
        batch: &mut Batch,
        drops: &mut BlobDrops,
        swept: &mut Swept,
    ) -> Result<bool, ServiceError> {
        if self.config.message_ttl.is_none() {
            self.sweep_queues_after = None;
            return Ok(true);
        }
        let records = self
            .store
            .scan(
                &layout::queue_meta_prefix(),
                self.sweep_queues_after.as_deref(),
                limits::SWEEP_RECORDS_PER_STEP,
            )
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        let done = records.len() < limits::SWEEP_RECORDS_PER_STEP;
        for (key, value) in records {
            if swept.expired >= limits::TTL_EXPIRY_PER_REQUEST_MAX {
                // The budget is spent: this queue comes first next step.
                return Ok(false);
            }
            let queue = layout::queue_of_meta_key(&key).map_err(corrupt)?;
            let mut meta = QueueMeta::decode(&value).map_err(corrupt)?;
            let head = meta.head;
            self.expire(now, &queue, &mut meta, batch, drops)?;
            let dropped = meta.head - head;
            swept.queues += 1;
            swept.expired += dropped;
            if dropped >= limits::TTL_EXPIRY_PER_REQUEST_MAX {
                // It may hold more; it comes first next step.
                return Ok(false);
            }
            self.sweep_queues_after = Some(key);
        }
        if done {
            self.sweep_queues_after = None;
        }
        Ok(done)
    }

    /// The fence walk of [`Self::handle_sweep`]; whether it reached the
    /// end. A fence written before format 3 carries no time: it gets the
    /// sweep's, and its idle time counts from there.
    fn sweep_fences(
        &mut self,
        now: Time,
        batch: &mut Batch,
        swept: &mut Swept,
    ) -> Result<bool, ServiceError> {
        let Some(ttl) = self.config.fence_ttl else {
            self.sweep_fences_after = None;
            return Ok(true);
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let now_ms = stamp_ms(now);
        let records = self
            .store
            .scan(
                &layout::fence_prefix(),
                self.sweep_fences_after.as_deref(),
                limits::SWEEP_RECORDS_PER_STEP,
            )
            .map_err(|e| ServiceError::unavailable(e.to_string()))?;
        let done = records.len() < limits::SWEEP_RECORDS_PER_STEP;
        for (key, value) in records {
            let mut fence = Fence::decode(&value).map_err(corrupt)?;
            swept.fences += 1;
            match fence.touched_ms {
                Some(t) if now_ms.saturating_sub(t) > ttl_ms => {
                    batch.delete(key.clone());
                    swept.fences_deleted += 1;
                }
                Some(_) => {}
                None => {
                    fence.touched_ms = Some(now_ms);
                    batch.put(key.clone(), fence.encode());
                }
            }
            self.sweep_fences_after = Some(key);
        }
        if done {
            self.sweep_fences_after = None;
        }
        Ok(done)
    }

    /// The next thing to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.ready.pop_front()
    }

    /// When [`Self::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Long-poll waiters currently held.
    pub fn waiter_count(&self) -> usize {
        self.waiters.len()
    }

    /// Connections currently tracked.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Replies waiting for durability.
    pub fn held_reply_count(&self) -> usize {
        self.held.len()
    }

    /// Why the machine refuses every request, if its storage failed (a
    /// failed sync or write; not a write refused for lack of space).
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    // ----- dispatch -------------------------------------------------------

    fn dispatch(
        &mut self,
        now: Time,
        conn: ConnectionId,
        request_id: RequestId,
        request: Request,
    ) -> Option<Reply> {
        if let Some(reason) = &self.failed {
            return Some(Err(ServiceError::unavailable(format!(
                "storage failed, server refuses requests until restarted: {reason}"
            ))));
        }
        if request.auth_version != AUTH_VERSION {
            return Some(Err(ServiceError::invalid_argument(format!(
                "unsupported authVersion {}; this server speaks {AUTH_VERSION}",
                request.auth_version
            ))));
        }
        if !self.connections.contains_key(&conn) {
            return Some(Err(ServiceError::unauthenticated("unknown connection")));
        }
        let reply = match request.body {
            RequestBody::AuthChallenge => self.auth_challenge(conn),
            RequestBody::Authenticate {
                identity_key,
                signature,
            } => self.authenticate(conn, identity_key, signature),
            RequestBody::UploadKeyPackage {
                identity_key,
                package,
                last_resort,
            } => self.upload_key_package(conn, identity_key, package, last_resort),
            RequestBody::FetchKeyPackage { identity_key } => {
                self.fetch_key_package(now, conn, identity_key)
            }
            RequestBody::KeyPackageCount { identity_key } => {
                self.key_package_count(conn, identity_key)
            }
            RequestBody::UploadHybridKey {
                identity_key,
                hybrid_key,
                signature,
            } => self.upload_hybrid_key(conn, identity_key, hybrid_key, signature),
            RequestBody::FetchHybridKey { identity_key } => {
                self.fetch_hybrid_key(now, conn, identity_key)
            }
            RequestBody::Enqueue {
                recipient_key,
                channel_id,
                payload,
                message_id,
            } => self
                .enqueue(
                    now,
                    conn,
                    vec![recipient_key],
                    channel_id,
                    vec![Outgoing {
                        payload,
                        message_id,
                    }],
                )
                .map(|seqs| Response::Enqueued { seq: seqs[0] }),
            RequestBody::EnqueueBatch {
                recipient_keys,
                channel_id,
                payload,
                message_id,
            } => check_recipients(&recipient_keys, "enqueueBatch")
                .and_then(|()| {
                    let message = Outgoing {
                        payload,
                        message_id,
                    };
                    self.enqueue(now, conn, recipient_keys, channel_id, vec![message])
                })
                .map(|seqs| Response::EnqueuedBatch { seqs }),
            RequestBody::EnqueueMany {
                recipient_keys,
                channel_id,
                messages,
            } => check_recipients(&recipient_keys, "enqueueMany")
                .and_then(|()| check_many(&recipient_keys, &messages))
                .and_then(|()| self.enqueue(now, conn, recipient_keys, channel_id, messages))
                .map(|seqs| Response::EnqueuedBatch { seqs }),
            RequestBody::Fetch {
                recipient_key,
                channel_id,
                after_seq,
                limit,
            } => self.fetch(now, conn, recipient_key, channel_id, after_seq, limit),
            RequestBody::FetchWait {
                recipient_key,
                channel_id,
                after_seq,
                limit,
                timeout_ms,
            } => {
                let wait = Waiter {
                    conn,
                    request_id,
                    recipient_key,
                    cursors: vec![(channel_id, after_seq)],
                    channels: false,
                    limit,
                    deadline: now,
                };
                return self.fetch_wait(now, wait, timeout_ms);
            }
            RequestBody::FetchWaitChannels {
                recipient_key,
                cursors,
                limit,
                timeout_ms,
            } => {
                if let Err(e) = check_cursors(&cursors) {
                    return Some(Err(e));
                }
                let wait = Waiter {
                    conn,
                    request_id,
                    recipient_key,
                    cursors,
                    channels: true,
                    limit,
                    deadline: now,
                };
                return self.fetch_wait(now, wait, timeout_ms);
            }
        };
        Some(reply)
    }

    // ----- authentication -------------------------------------------------

    fn auth_challenge(&mut self, conn: ConnectionId) -> Reply {
        let mut nonce = [0u8; AUTH_NONCE_BYTES];
        self.rng.fill_bytes(&mut nonce);
        let c = self.connection(conn)?;
        if c.identity.is_some() {
            return Err(ServiceError::invalid_argument(
                "connection is already authenticated",
            ));
        }
        c.nonce = Some(nonce);
        Ok(Response::AuthChallenge { nonce })
    }

    fn authenticate(
        &mut self,
        conn: ConnectionId,
        identity_key: IdentityKey,
        signature: Signature,
    ) -> Reply {
        let c = self.connection(conn)?;
        if c.identity.is_some() {
            return Err(ServiceError::invalid_argument(
                "connection is already authenticated",
            ));
        }
        // The nonce is consumed by the first attempt, right or wrong.
        let Some(nonce) = c.nonce.take() else {
            return Err(ServiceError::unauthenticated(
                "no challenge outstanding on this connection; call authChallenge first",
            ));
        };
        let message = auth_message(&identity_key, &nonce, &c.tls_exporter);
        verify(&identity_key, &message, &signature).map_err(|()| {
            ServiceError::unauthenticated("authentication signature does not verify")
        })?;
        c.identity = Some(identity_key);
        Ok(Response::Authenticated)
    }

    fn connection(&mut self, conn: ConnectionId) -> Result<&mut Connection, ServiceError> {
        self.connections
            .get_mut(&conn)
            .ok_or_else(|| ServiceError::unauthenticated("unknown connection"))
    }

    fn identity(&self, conn: ConnectionId) -> Result<IdentityKey, ServiceError> {
        self.connections
            .get(&conn)
            .and_then(|c| c.identity)
            .ok_or_else(|| {
                ServiceError::unauthenticated(
                    "connection is not authenticated; call authChallenge and authenticate first",
                )
            })
    }

    fn owner(&self, conn: ConnectionId, key: &IdentityKey) -> Result<(), ServiceError> {
        let me = self.identity(conn)?;
        if me != *key {
            return Err(ServiceError::permission_denied(
                "this connection is authenticated as another identity",
            ));
        }
        Ok(())
    }

    // ----- Authentication Service -----------------------------------------

    fn upload_key_package(
        &mut self,
        conn: ConnectionId,
        identity_key: IdentityKey,
        package: Vec<u8>,
        last_resort: bool,
    ) -> Reply {
        self.owner(conn, &identity_key)?;
        if package.is_empty() {
            return Err(ServiceError::invalid_argument("KeyPackage is empty"));
        }
        if package.len() > self.config.key_package_bytes_max {
            return Err(ServiceError::payload_too_large(format!(
                "KeyPackage of {} bytes exceeds the limit of {}",
                package.len(),
                self.config.key_package_bytes_max
            )));
        }
        let fingerprint: [u8; 32] = Sha256::digest(&package).into();
        let mut batch = Batch::new();
        if last_resort {
            batch.put(layout::kp_last_resort_key(&identity_key), package);
        } else {
            let mut meta = self.kp_meta(&identity_key)?;
            if meta.count() >= u64::from(self.config.key_packages_per_identity_max) {
                return Err(ServiceError::queue_full(format!(
                    "this identity already has {} KeyPackages, the most the server keeps",
                    meta.count()
                )));
            }
            batch.put(layout::kp_key(&identity_key, meta.tail), package);
            meta.tail += 1;
            batch.put(layout::kp_meta_key(&identity_key), meta.encode());
        }
        self.write(batch)?;
        Ok(Response::KeyPackageUploaded { fingerprint })
    }

    fn fetch_key_package(&mut self, now: Time, conn: ConnectionId, target: IdentityKey) -> Reply {
        let me = self.identity(conn)?;
        let pair = (KeyFetch::KeyPackage, me, target);
        self.key_fetch_pair_limiter
            .check(now, pair)
            .map_err(|ms| rate_limited(ms, "KeyPackage fetches for this identity"))?;
        self.key_package_target_limiter
            .check(now, target)
            .map_err(|ms| rate_limited(ms, "KeyPackage fetches for this target"))?;
        self.key_fetch_pair_limiter.take(now, pair);
        self.key_package_target_limiter.take(now, target);

        let mut meta = self.kp_meta(&target)?;
        if meta.count() > 0 {
            let key = layout::kp_key(&target, meta.head);
            let package = self
                .get(&key)?
                .ok_or_else(|| ServiceError::internal("KeyPackage record missing"))?;
            meta.head += 1;
            // Removal and the new head are one atomic batch: the package can
            // never be handed out twice, even across a crash.
            let mut batch = Batch::upkeep();
            batch.delete(key);
            batch.put(layout::kp_meta_key(&target), meta.encode());
            self.write(batch)?;
            return Ok(Response::KeyPackage {
                package,
                last_resort: false,
            });
        }
        match self.get(&layout::kp_last_resort_key(&target))? {
            Some(package) => Ok(Response::KeyPackage {
                package,
                last_resort: true,
            }),
            None => Err(ServiceError::not_found(
                "this identity has no KeyPackage left",
            )),
        }
    }

    fn key_package_count(&mut self, conn: ConnectionId, identity_key: IdentityKey) -> Reply {
        self.owner(conn, &identity_key)?;
        let meta = self.kp_meta(&identity_key)?;
        let has_last_resort = self
            .get(&layout::kp_last_resort_key(&identity_key))?
            .is_some();
        Ok(Response::KeyPackageCount {
            count: u32::try_from(meta.count()).unwrap_or(u32::MAX),
            has_last_resort,
        })
    }

    fn upload_hybrid_key(
        &mut self,
        conn: ConnectionId,
        identity_key: IdentityKey,
        hybrid_key: Vec<u8>,
        signature: Signature,
    ) -> Reply {
        self.owner(conn, &identity_key)?;
        if hybrid_key.is_empty() {
            return Err(ServiceError::invalid_argument("hybrid key is empty"));
        }
        if hybrid_key.len() > limits::HYBRID_KEY_BYTES_MAX {
            return Err(ServiceError::payload_too_large(format!(
                "hybrid key of {} bytes exceeds the limit of {}",
                hybrid_key.len(),
                limits::HYBRID_KEY_BYTES_MAX
            )));
        }
        let message = hybrid_key_message(&identity_key, &hybrid_key);
        verify(&identity_key, &message, &signature)
            .map_err(|()| ServiceError::invalid_argument("hybrid key signature does not verify"))?;
        let mut batch = Batch::new();
        batch.put(
            layout::hybrid_key_key(&identity_key),
            layout::encode_hybrid_key(&hybrid_key, &signature),
        );
        self.write(batch)?;
        Ok(Response::HybridKeyUploaded)
    }

    fn fetch_hybrid_key(&mut self, now: Time, conn: ConnectionId, target: IdentityKey) -> Reply {
        let me = self.identity(conn)?;
        self.key_fetch_pair_limiter
            .acquire(now, (KeyFetch::HybridKey, me, target))
            .map_err(|ms| rate_limited(ms, "hybrid key fetches for this identity"))?;
        let record = self
            .get(&layout::hybrid_key_key(&target))?
            .ok_or_else(|| ServiceError::not_found("this identity has no hybrid key"))?;
        let (hybrid_key, signature) = layout::decode_hybrid_key(&record).map_err(corrupt)?;
        Ok(Response::HybridKey {
            hybrid_key,
            signature,
        })
    }

    // ----- Delivery Service -----------------------------------------------

    /// `enqueue` (one recipient, one message), `enqueueBatch` (one message)
    /// and `enqueueMany`: appends each message to the queue
    /// `(channel_id, r)` of every recipient `r`, in the order given, in one
    /// atomic batch, and returns the seqs message by message, each in
    /// recipient order. A recipient whose queue already holds a message's
    /// id from this sender (a retry) keeps its original seq for it and gets
    /// nothing new; another sender's message under the same id is another
    /// message.
    /// Several new entries of one message share one stored payload.
    fn enqueue(
        &mut self,
        now: Time,
        conn: ConnectionId,
        recipients: Vec<IdentityKey>,
        channel_id: ChannelId,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<u64>, ServiceError> {
        let sender = self.identity(conn)?;
        let several = messages.len() > 1;
        for (m, message) in messages.iter().enumerate() {
            let which = || {
                if several {
                    format!("message #{m}: ")
                } else {
                    String::new()
                }
            };
            if message.payload.is_empty() {
                return Err(ServiceError::invalid_argument(format!(
                    "{}payload is empty",
                    which()
                )));
            }
            if message.payload.len() > self.config.payload_bytes_max {
                return Err(ServiceError::payload_too_large(format!(
                    "{}payload of {} bytes exceeds the limit of {}",
                    which(),
                    message.payload.len(),
                    self.config.payload_bytes_max
                )));
            }
        }
        let queues: Vec<QueueId> = recipients
            .iter()
            .map(|recipient_key| QueueId {
                recipient_key: *recipient_key,
                channel_id,
            })
            .collect();
        let mut metas = queues
            .iter()
            .map(|q| self.queue_meta(q))
            .collect::<Result<Vec<_>, _>>()?;
        // A retry of a stored message answers with the original seq, before
        // any limit: it costs nothing and the sender must learn its seq.
        let width = queues.len();
        let mut seqs = vec![0u64; width * messages.len()];
        // Per message, the recipients (by index) it is new to.
        let mut fresh: Vec<Vec<usize>> = Vec::with_capacity(messages.len());
        for (m, message) in messages.iter().enumerate() {
            let mut new = Vec::new();
            for (i, (queue, meta)) in queues.iter().zip(&metas).enumerate() {
                let id = &message.message_id;
                let mut stored = self.get(&layout::dedup_key(queue, &sender, id))?;
                if stored.is_none() && meta.has_legacy_dedup() {
                    stored = self.get(&layout::legacy_dedup_key(queue, id))?;
                }
                match stored {
                    Some(seq) => seqs[m * width + i] = layout::decode_seq(&seq).map_err(corrupt)?,
                    None => new.push(i),
                }
            }
            fresh.push(new);
        }
        let new_messages = fresh.iter().filter(|f| !f.is_empty()).count();
        if new_messages == 0 {
            return Ok(seqs);
        }
        // Commits pass the fence in order; one moved by an earlier message
        // of this request is the one a later Commit meets.
        let mut fences: Vec<(Vec<u8>, Fence)> = Vec::new();
        for (message, new) in messages.iter().zip(&fresh) {
            if new.is_empty() {
                continue;
            }
            if let Some((key, fence)) = self.fence_check(&channel_id, &message.payload, &fences)? {
                fences.retain(|(k, _)| *k != key);
                fences.push((key, fence));
            }
        }
        let tokens = u32::try_from(new_messages).unwrap_or(u32::MAX);
        self.enqueue_limiter
            .acquire_many(now, sender, tokens)
            .map_err(|ms| rate_limited(ms, "enqueues from this identity"))?;
        // What each queue takes: new entries and bytes.
        let mut adds = vec![(0u64, 0u64); width];
        for (message, new) in messages.iter().zip(&fresh) {
            for i in new {
                adds[*i].0 += 1;
                adds[*i].1 = adds[*i].1.saturating_add(message.payload.len() as u64);
            }
        }
        let mut batch = Batch::new();
        let mut drops = BlobDrops::default();
        for (i, (queue, meta)) in queues.iter().zip(&mut metas).enumerate() {
            let (entries, bytes) = adds[i];
            if entries == 0 {
                continue;
            }
            // Expired messages make room before the limits are checked.
            self.expire(now, queue, meta, &mut batch, &mut drops)?;
            // Named only when refused: this is the enqueue hot path.
            let whose = || {
                if width == 1 {
                    "the recipient's queue".to_owned()
                } else {
                    format!("recipient #{i}'s queue")
                }
            };
            if meta.depth().saturating_add(entries) > self.config.queue_depth_max {
                return Err(ServiceError::queue_full(format!(
                    "{} holds {} messages, its limit is {}",
                    whose(),
                    meta.depth(),
                    self.config.queue_depth_max
                )));
            }
            if meta.bytes.saturating_add(bytes) > self.config.queue_bytes_max {
                return Err(ServiceError::queue_full(format!(
                    "{} would exceed its limit of {} bytes",
                    whose(),
                    self.config.queue_bytes_max
                )));
            }
        }
        let mut next_blob = self.next_blob;
        let stamp = stamp_ms(now);
        for (m, (message, new)) in messages.into_iter().zip(&fresh).enumerate() {
            if new.is_empty() {
                continue;
            }
            let len = message.payload.len() as u64;
            let message_id = message.message_id;
            // One new entry holds the payload itself; several share one copy.
            let mut inline = Some(message.payload);
            let mut blob = None;
            if new.len() > 1 {
                if let Some(payload) = inline.take() {
                    batch.put(layout::blob_key(next_blob), payload);
                }
                batch.put(
                    layout::blob_refs_key(next_blob),
                    layout::encode_seq(new.len() as u64),
                );
                blob = Some(next_blob);
                next_blob += 1;
            }
            for i in new {
                let queue = &queues[*i];
                let meta = &mut metas[*i];
                let seq = meta.next_seq;
                // A single new entry takes the payload; shared ones point to
                // the blob (`new` is never empty here).
                let entry = match (blob, inline.take()) {
                    (Some(blob), _) => layout::encode_shared(&message_id, stamp, blob, len),
                    (None, Some(payload)) => layout::encode_inline(&message_id, stamp, &payload),
                    (None, None) => continue,
                };
                batch.put(layout::message_key(queue, meta, seq), entry);
                batch.put(
                    layout::dedup_key(queue, &sender, &message_id),
                    layout::encode_seq(seq),
                );
                batch.put(
                    layout::dedup_ring_key(queue, seq),
                    layout::encode_dedup_ring(&sender, &message_id),
                );
                // The message leaving the window was stored by an earlier
                // request: one request holds fewer messages than the window.
                if let Some(old) = seq
                    .checked_sub(limits::DEDUP_WINDOW_PER_QUEUE)
                    .filter(|s| *s > 0)
                {
                    let ring = layout::dedup_ring_key(queue, old);
                    if let Some(old) = self.get(&ring)? {
                        batch.delete(layout::decode_dedup_ring(queue, &old).map_err(corrupt)?);
                    }
                    batch.delete(ring);
                }
                meta.next_seq += 1;
                meta.bytes = meta.bytes.saturating_add(len);
                seqs[m * width + *i] = seq;
            }
        }
        for (i, (queue, meta)) in queues.iter().zip(&metas).enumerate() {
            if adds[i].0 > 0 {
                batch.put(layout::queue_meta_key(queue), meta.encode());
            }
        }
        if next_blob != self.next_blob {
            batch.put(layout::blob_next_key(), layout::encode_seq(next_blob));
        }
        for (key, mut fence) in fences {
            fence.touched_ms = Some(stamp);
            batch.put(key, fence.encode());
        }
        self.finish_drops(drops, &mut batch)?;
        self.write(batch)?;
        self.next_blob = next_blob;
        for (queue, (entries, _)) in queues.iter().zip(&adds) {
            if *entries > 0 {
                self.wake_waiters(queue);
            }
        }
        Ok(seqs)
    }

    /// The commit fence ([`commit`]; ARCHITECTURE.md § Guarantees): if
    /// `payload` is an MLS Commit, it is accepted only for the group's
    /// current epoch on this channel (or a later one), once; the same Commit
    /// bytes sent again (to the next recipient, or as a retry) pass without
    /// moving it, also after the group moved on (up to
    /// [`limits::COMMIT_FENCE_HISTORY`] epochs). Returns the fence record to
    /// write with the enqueue, if it moves.
    fn fence_check(
        &self,
        channel_id: &ChannelId,
        payload: &[u8],
        moved: &[(Vec<u8>, Fence)],
    ) -> Result<Option<(Vec<u8>, Fence)>, ServiceError> {
        let Some(header) = commit::commit_header(payload) else {
            return Ok(None);
        };
        let key = layout::fence_key(channel_id, &Sha256::digest(header.group_id).into());
        let digest: [u8; 32] = Sha256::digest(header.identity).into();
        let mut this = [0u8; layout::COMMIT_DIGEST_BYTES];
        this.copy_from_slice(&digest[..layout::COMMIT_DIGEST_BYTES]);
        let current = match moved.iter().find(|(k, _)| *k == key) {
            Some((_, f)) => Some(f.clone()),
            None => match self.get(&key)? {
                Some(v) => Some(Fence::decode(&v).map_err(corrupt)?),
                None => None,
            },
        };
        let too_far = || ServiceError::invalid_argument("a Commit for the last possible epoch");
        let Some(f) = current else {
            let epoch = header.epoch.checked_add(1).ok_or_else(too_far)?;
            return Ok(Some((
                key,
                Fence {
                    epoch,
                    accepted: vec![this],
                    touched_ms: None,
                },
            )));
        };
        if header.epoch < f.epoch {
            if f.accepted_for(header.epoch, &this) {
                return Ok(None);
            }
            return Err(ServiceError::stale_epoch(
                f.epoch,
                format!(
                    "the group already has a Commit for epoch {}; it is at epoch {} now",
                    header.epoch, f.epoch
                ),
            ));
        }
        let fence = f.advance(header.epoch, this).ok_or_else(too_far)?;
        Ok(Some((key, fence)))
    }

    fn fetch(
        &mut self,
        now: Time,
        conn: ConnectionId,
        recipient_key: IdentityKey,
        channel_id: ChannelId,
        after_seq: u64,
        limit: u32,
    ) -> Reply {
        self.owner(conn, &recipient_key)?;
        let queue = QueueId {
            recipient_key,
            channel_id,
        };
        self.expire_queue(now, &queue)?;
        let meta = self.acknowledge(&queue, after_seq)?;
        self.read_messages(&queue, meta, after_seq, limit)
    }

    /// `fetchWait` and `fetchWaitChannels`: answers at once if any cursor
    /// has messages after it (or on error, or with a zero timeout), else
    /// parks `wait` until an enqueue to one of its queues or its deadline.
    fn fetch_wait(&mut self, now: Time, mut wait: Waiter, timeout_ms: u64) -> Option<Reply> {
        if let Err(e) = self.owner(wait.conn, &wait.recipient_key) {
            return Some(Err(e));
        }
        if wait.limit == 0 {
            return Some(Err(ServiceError::invalid_argument(
                "fetchWait needs a limit of at least 1",
            )));
        }
        let queues: Vec<QueueId> = wait.queues().collect();
        for (queue, (_, after_seq)) in queues.iter().zip(&wait.cursors) {
            if let Err(e) = self.cursor_meta(queue, *after_seq) {
                return Some(Err(e));
            }
        }
        // Expired messages go first (housekeeping, whatever comes of the
        // request), so the read below reports their gap.
        for queue in &queues {
            if let Err(e) = self.expire_queue(now, queue) {
                return Some(Err(e));
            }
        }
        // Read before acknowledging: the read does not depend on the
        // acknowledgement, and a request refused below must change nothing.
        let reply = self.answer(&wait);
        let pending = match &reply {
            Ok(Response::Messages { messages, gap, .. }) => !messages.is_empty() || gap.is_some(),
            Ok(Response::ChannelMessages { channels }) => !channels.is_empty(),
            _ => true,
        };
        if pending || timeout_ms == 0 {
            return Some(self.acknowledge_all(&queues, &wait.cursors).and(reply));
        }
        let per_conn = self
            .connections
            .get(&wait.conn)
            .map_or(0, |c| c.waiters.len());
        if per_conn >= self.config.waiters_per_connection_max {
            return Some(Err(ServiceError::rate_limited(
                1_000,
                format!(
                    "this connection already has {per_conn} fetchWait calls waiting, its limit"
                ),
            )));
        }
        if self.waiters.len() >= self.config.waiters_max
            || self.wait_cursors + queues.len() > limits::WAIT_CURSORS_MAX
        {
            return Some(Err(ServiceError::unavailable(
                "the server holds its maximum number of waiting fetchWait calls",
            )));
        }
        if let Err(e) = self.acknowledge_all(&queues, &wait.cursors) {
            return Some(Err(e));
        }
        let timeout = Duration::from_millis(timeout_ms.min(self.config.fetch_wait_timeout_ms_max));
        wait.deadline = now.saturating_add(timeout);
        let id = self.next_waiter;
        self.next_waiter += 1;
        for queue in queues {
            self.waiters_by_queue.entry(queue).or_default().push(id);
        }
        self.wait_cursors += wait.cursors.len();
        self.deadlines.insert((wait.deadline, id));
        if let Some(c) = self.connections.get_mut(&wait.conn) {
            c.waiters.push(id);
        }
        self.waiters.insert(id, wait);
        None
    }

    fn acknowledge_all(
        &mut self,
        queues: &[QueueId],
        cursors: &[(ChannelId, u64)],
    ) -> Result<(), ServiceError> {
        for (queue, (_, after_seq)) in queues.iter().zip(cursors) {
            self.acknowledge(queue, *after_seq)?;
        }
        Ok(())
    }

    /// Deletes the messages `seq <= after_seq` of `queue`, and each shared
    /// payload whose last reference that was. Returns the queue's counters
    /// as they are now (a fetch reads on with them instead of reading them
    /// again).
    fn acknowledge(&mut self, queue: &QueueId, after_seq: u64) -> Result<QueueMeta, ServiceError> {
        let mut meta = self.cursor_meta(queue, after_seq)?;
        if after_seq < meta.head {
            return Ok(meta);
        }
        let mut batch = Batch::upkeep();
        let mut drops = BlobDrops::default();
        for seq in meta.head..=after_seq {
            let entry = self.drop_entry(queue, &meta, seq, &mut batch, &mut drops)?;
            meta.bytes = meta.bytes.saturating_sub(entry.payload_len());
        }
        meta.head = after_seq + 1;
        self.finish_drops(drops, &mut batch)?;
        batch.put(layout::queue_meta_key(queue), meta.encode());
        self.write(batch)?;
        Ok(meta)
    }

    /// Deletes the entry at `seq` (the queue's head, about to move past
    /// it) into `batch`, counting a shared payload's reference in `drops`.
    fn drop_entry(
        &self,
        queue: &QueueId,
        meta: &QueueMeta,
        seq: u64,
        batch: &mut Batch,
        drops: &mut BlobDrops,
    ) -> Result<Entry, ServiceError> {
        let (key, entry, _) = self.entry_at(queue, meta, seq)?;
        drops.count(&entry);
        batch.delete(key);
        Ok(entry)
    }

    /// The stored message at `seq` of `queue`: its key, the entry and its
    /// enqueue time (none for a version-1 record).
    fn entry_at(
        &self,
        queue: &QueueId,
        meta: &QueueMeta,
        seq: u64,
    ) -> Result<(Vec<u8>, Entry, Option<u64>), ServiceError> {
        let key = layout::message_key(queue, meta, seq);
        let record = self
            .get(&key)?
            .ok_or_else(|| ServiceError::internal("queued message record missing"))?;
        let (entry, stamp) =
            layout::decode_entry(record, seq < meta.legacy_below).map_err(corrupt)?;
        Ok((key, entry, stamp))
    }

    /// Writes the new reference counts of the shared payloads in `drops`
    /// into `batch`, deleting each payload that lost its last reference.
    /// Counted per batch: one batch may drop several references to one
    /// payload (from several queues).
    fn finish_drops(&self, drops: BlobDrops, batch: &mut Batch) -> Result<(), ServiceError> {
        for (blob, n) in drops.0 {
            let refs_key = layout::blob_refs_key(blob);
            let refs = match self.get(&refs_key)? {
                Some(v) => layout::decode_seq(&v).map_err(corrupt)?,
                None => return Err(ServiceError::internal("shared payload count missing")),
            };
            if refs <= n {
                batch.delete(refs_key);
                batch.delete(layout::blob_key(blob));
            } else {
                batch.put(refs_key, layout::encode_seq(refs - n));
            }
        }
        Ok(())
    }

    /// Drops the messages at the head of `queue` older than the message
    /// TTL (at most [`limits::TTL_EXPIRY_PER_REQUEST_MAX`]) into `batch`
    /// and `drops`, updating `meta`; the caller finishes the drops and
    /// writes. Version-1 records carry no time and never expire.
    fn expire(
        &self,
        now: Time,
        queue: &QueueId,
        meta: &mut QueueMeta,
        batch: &mut Batch,
        drops: &mut BlobDrops,
    ) -> Result<(), ServiceError> {
        let Some(ttl) = self.config.message_ttl else {
            return Ok(());
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let now_ms = stamp_ms(now);
        let mut dropped = 0;
        while meta.head < meta.next_seq
            && meta.head >= meta.legacy_below
            && dropped < limits::TTL_EXPIRY_PER_REQUEST_MAX
        {
            let (key, entry, stamp) = self.entry_at(queue, meta, meta.head)?;
            if stamp.is_none_or(|s| now_ms.saturating_sub(s) <= ttl_ms) {
                break;
            }
            drops.count(&entry);
            batch.delete(key);
            meta.bytes = meta.bytes.saturating_sub(entry.payload_len());
            meta.head += 1;
            meta.expired_below = meta.head;
            dropped += 1;
        }
        if dropped > 0 {
            batch.put(layout::queue_meta_key(queue), meta.encode());
        }
        Ok(())
    }

    /// [`Self::expire`] for one queue on its own batch.
    fn expire_queue(&mut self, now: Time, queue: &QueueId) -> Result<(), ServiceError> {
        if self.config.message_ttl.is_none() {
            return Ok(());
        }
        let mut meta = self.queue_meta(queue)?;
        let mut batch = Batch::upkeep();
        let mut drops = BlobDrops::default();
        self.expire(now, queue, &mut meta, &mut batch, &mut drops)?;
        if batch.is_empty() {
            return Ok(());
        }
        self.finish_drops(drops, &mut batch)?;
        self.write(batch)
    }

    /// The queue's counters, if `after_seq` is a valid cursor for it: a
    /// client may not acknowledge seqs the queue has not issued yet.
    fn cursor_meta(&self, queue: &QueueId, after_seq: u64) -> Result<QueueMeta, ServiceError> {
        let meta = self.queue_meta(queue)?;
        let last = meta.next_seq - 1;
        if after_seq > last {
            return Err(ServiceError::invalid_argument(format!(
                "afterSeq {after_seq} is beyond the last seq {last} of this queue"
            )));
        }
        Ok(meta)
    }

    /// Reads up to `limit` messages after `after_seq` (and after the head),
    /// within the reply byte budget; never deletes.
    fn read_messages(
        &mut self,
        queue: &QueueId,
        meta: QueueMeta,
        after_seq: u64,
        limit: u32,
    ) -> Reply {
        let mut budget = ReadBudget::new();
        let r = self.read_queue_from(queue, meta, after_seq, limit, &mut budget)?;
        Ok(Response::Messages {
            messages: r.messages,
            next_seq: r.next_seq,
            gap: r.gap,
        })
    }

    /// Reads messages of `queue` after `after_seq` into the reply, taking
    /// from `budget`: at most `limit` here, and within the reply's total
    /// message count and payload bytes (at least one message per reply).
    fn read_queue(
        &self,
        queue: &QueueId,
        after_seq: u64,
        limit: u32,
        budget: &mut ReadBudget,
    ) -> Result<QueueRead, ServiceError> {
        let meta = self.queue_meta(queue)?;
        self.read_queue_from(queue, meta, after_seq, limit, budget)
    }

    /// [`Self::read_queue`] with the queue's counters already read.
    fn read_queue_from(
        &self,
        queue: &QueueId,
        meta: QueueMeta,
        after_seq: u64,
        limit: u32,
        budget: &mut ReadBudget,
    ) -> Result<QueueRead, ServiceError> {
        // Seqs after the cursor that the TTL dropped.
        let gap = (after_seq.saturating_add(1) < meta.expired_below).then(|| Gap {
            from: after_seq + 1,
            to: meta.expired_below - 1,
        });
        let limit = u64::from(limit.min(budget.messages));
        let start = meta.head.max(after_seq.saturating_add(1));
        let end = meta.next_seq.min(start.saturating_add(limit));
        let mut messages = Vec::new();
        for seq in start..end {
            let (_, entry, _) = self.entry_at(queue, &meta, seq)?;
            let payload = match entry {
                Entry::Inline(payload) => payload,
                Entry::Shared { blob, .. } => self
                    .get(&layout::blob_key(blob))?
                    .ok_or_else(|| ServiceError::internal("shared payload missing"))?,
            };
            let bytes = budget.bytes.saturating_add(payload.len());
            if bytes > limits::FETCH_RESPONSE_BYTES_MAX && budget.taken {
                break;
            }
            budget.bytes = bytes;
            budget.taken = true;
            budget.messages -= 1;
            messages.push(QueuedMessage { seq, payload });
        }
        Ok(QueueRead {
            messages,
            next_seq: meta.next_seq,
            gap,
        })
    }

    /// What a waiting (or due) long-poll answers now.
    fn answer(&self, w: &Waiter) -> Reply {
        let mut budget = ReadBudget::new();
        if !w.channels {
            let queue = w
                .queues()
                .next()
                .ok_or_else(|| ServiceError::internal("no cursor"))?;
            let r = self.read_queue(&queue, w.cursors[0].1, w.limit, &mut budget)?;
            return Ok(Response::Messages {
                messages: r.messages,
                next_seq: r.next_seq,
                gap: r.gap,
            });
        }
        let mut channels = Vec::new();
        for (queue, (channel_id, after_seq)) in w.queues().zip(&w.cursors) {
            if budget.messages == 0 {
                break;
            }
            let r = self.read_queue(&queue, *after_seq, w.limit, &mut budget)?;
            if !r.messages.is_empty() || r.gap.is_some() {
                channels.push(ChannelMessages {
                    channel_id: *channel_id,
                    messages: r.messages,
                    next_seq: r.next_seq,
                    gap: r.gap,
                });
            }
        }
        Ok(Response::ChannelMessages { channels })
    }

    fn wake_waiters(&mut self, queue: &QueueId) {
        let Some(ids) = self.waiters_by_queue.remove(queue) else {
            return;
        };
        for id in ids {
            if let Some(w) = self.remove_waiter(id) {
                let reply = self.answer(&w);
                self.reply(w.conn, w.request_id, reply);
            }
        }
    }

    fn remove_waiter(&mut self, id: u64) -> Option<Waiter> {
        let w = self.waiters.remove(&id)?;
        self.deadlines.remove(&(w.deadline, id));
        self.wait_cursors = self.wait_cursors.saturating_sub(w.cursors.len());
        for queue in w.queues() {
            if let Some(ids) = self.waiters_by_queue.get_mut(&queue) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.waiters_by_queue.remove(&queue);
                }
            }
        }
        if let Some(c) = self.connections.get_mut(&w.conn) {
            c.waiters.retain(|x| *x != id);
        }
        Some(w)
    }

    // ----- storage and replies --------------------------------------------

    fn kp_meta(&self, id: &IdentityKey) -> Result<KpMeta, ServiceError> {
        match self.get(&layout::kp_meta_key(id))? {
            Some(v) => KpMeta::decode(&v).map_err(corrupt),
            None => Ok(KpMeta::default()),
        }
    }

    fn queue_meta(&self, q: &QueueId) -> Result<QueueMeta, ServiceError> {
        match self.get(&layout::queue_meta_key(q))? {
            Some(v) => QueueMeta::decode(&v).map_err(corrupt),
            None => Ok(QueueMeta::default()),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ServiceError> {
        self.store
            .get(key)
            .map_err(|e| ServiceError::unavailable(e.to_string()))
    }

    fn write(&mut self, batch: Batch) -> Result<(), ServiceError> {
        match self.store.write(batch) {
            Ok(lsn) => {
                assert!(lsn > self.last_write, "store returned a non-increasing Lsn");
                self.last_write = lsn;
                Ok(())
            }
            // Refused for lack of space: nothing was applied and the store
            // is intact, so only this request fails. The callers change
            // their own state (seqs, shared-payload numbers, waiters) only
            // after the write; only the rate-limit tokens the request took
            // stay spent.
            Err(StoreError {
                kind: StoreErrorKind::Full,
                ..
            }) => Err(ServiceError::unavailable(
                "the server's disk is full: nothing was stored; try again later",
            )),
            Err(e) => {
                self.fail(&e.detail);
                Err(ServiceError::unavailable(e.to_string()))
            }
        }
    }

    fn fail(&mut self, reason: &str) {
        if self.failed.is_none() {
            self.failed = Some(reason.to_owned());
        }
        while let Some((_, out)) = self.held.pop_front() {
            let out = match out {
                Output::Reply {
                    conn, request_id, ..
                } => Output::Reply {
                    conn,
                    request_id,
                    reply: Err(ServiceError::unavailable(
                        "storage failed before this request was durable; it may or may not have been applied",
                    )),
                },
                other => other,
            };
            self.ready.push_back(out);
        }
        // Parked long-polls too: a waiter answered later would read state
        // whose writes may never become durable.
        let parked: Vec<u64> = self.waiters.keys().copied().collect();
        for id in parked {
            if let Some(w) = self.remove_waiter(id) {
                self.ready.push_back(Output::Reply {
                    conn: w.conn,
                    request_id: w.request_id,
                    reply: Err(ServiceError::unavailable(
                        "storage failed while this long-poll waited; retry after the server restarts",
                    )),
                });
            }
        }
    }

    fn reply(&mut self, conn: ConnectionId, request_id: RequestId, reply: Reply) {
        let out = Output::Reply {
            conn,
            request_id,
            reply,
        };
        // After a storage failure nothing will become durable again; replies
        // (all of them errors by then) go out at once.
        if self.config.durability == Durability::Fsync
            && self.failed.is_none()
            && self.last_write > self.durable
        {
            self.held.push_back((self.last_write, out));
        } else {
            self.ready.push_back(out);
        }
    }

    /// Asks for a sync of everything written so far. Both modes sync (so
    /// the disk keeps up); only [`Durability::Fsync`] makes replies wait.
    fn request_sync(&mut self) {
        if self.failed.is_none()
            && self.last_write > self.sync_requested
            && self.last_write > self.durable
        {
            self.sync_requested = self.last_write;
            self.ready.push_back(Output::Sync {
                lsn: self.last_write,
            });
        }
    }
}

fn verify(key: &IdentityKey, message: &[u8], signature: &Signature) -> Result<(), ()> {
    let vk = VerifyingKey::from_bytes(key.as_bytes()).map_err(|_| ())?;
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    vk.verify_strict(message, &sig).map_err(|_| ())?;
    // `verify_strict` already rejects weak keys and non-canonical encodings;
    // the plain `Verifier` check is kept as a second line.
    vk.verify(message, &sig).map_err(|_| ())
}

fn rate_limited(retry_after_ms: u64, what: &str) -> ServiceError {
    ServiceError::rate_limited(
        retry_after_ms,
        format!("too many {what}; retry in {retry_after_ms} ms"),
    )
}

/// An `enqueueBatch` names each recipient once, and not too many.
fn check_recipients(recipients: &[IdentityKey], method: &str) -> Result<(), ServiceError> {
    check_list(
        recipients.iter(),
        limits::ENQUEUE_BATCH_RECIPIENTS_MAX,
        method,
        "recipient",
    )
}

/// An `enqueueMany` holds at least one message, at most
/// [`limits::ENQUEUE_MANY_MESSAGES_MAX`], each id once, at most
/// [`limits::ENQUEUE_MANY_BYTES_MAX`] payload bytes and at most
/// [`limits::ENQUEUE_MANY_ENTRIES_MAX`] entries in all.
fn check_many(recipients: &[IdentityKey], messages: &[Outgoing]) -> Result<(), ServiceError> {
    check_list(
        messages.iter().map(|m| &m.message_id),
        limits::ENQUEUE_MANY_MESSAGES_MAX,
        "enqueueMany",
        "message id",
    )?;
    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    if bytes > limits::ENQUEUE_MANY_BYTES_MAX {
        return Err(ServiceError::payload_too_large(format!(
            "enqueueMany carries {bytes} payload bytes, more than the limit of {}",
            limits::ENQUEUE_MANY_BYTES_MAX
        )));
    }
    let entries = recipients.len().saturating_mul(messages.len());
    if entries > limits::ENQUEUE_MANY_ENTRIES_MAX {
        return Err(ServiceError::invalid_argument(format!(
            "enqueueMany makes {entries} queue entries ({} recipients times {} messages), more than the limit of {}",
            recipients.len(),
            messages.len(),
            limits::ENQUEUE_MANY_ENTRIES_MAX
        )));
    }
    Ok(())
}

/// A `fetchWaitChannels` names each channel once, and not too many.
fn check_cursors(cursors: &[(ChannelId, u64)]) -> Result<(), ServiceError> {
    check_list(
        cursors.iter().map(|(c, _)| c),
        limits::FETCH_WAIT_CHANNELS_MAX,
        "fetchWaitChannels",
        "channel",
    )
}

/// A list argument of `method`: at least one `what`, at most `max`, each
/// at most once.
fn check_list<'a, T: std::hash::Hash + Eq + 'a>(
    items: impl ExactSizeIterator<Item = &'a T>,
    max: usize,
    method: &str,
    what: &str,
) -> Result<(), ServiceError> {
    let n = items.len();
    if n == 0 {
        return Err(ServiceError::invalid_argument(format!(
            "{method} needs at least one {what}"
        )));
    }
    if n > max {
        return Err(ServiceError::invalid_argument(format!(
            "{method} names {n} {what}s, more than the limit of {max}"
        )));
    }
    let mut seen = HashSet::with_capacity(n);
    for (i, item) in items.enumerate() {
        if !seen.insert(item) {
            return Err(ServiceError::invalid_argument(format!(
                "{method} names {what} #{i} twice"
            )));
        }
    }
    Ok(())
}

fn corrupt(Corrupt(what): Corrupt) -> ServiceError {
    ServiceError::internal(format!("stored record does not decode: {what}"))
}

#[cfg(test)]
mod tests;
