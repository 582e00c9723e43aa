//! The NodeService state machine: the Authentication Service (KeyPackages,
//! hybrid keys) and the Delivery Service (queues, long-poll waiters), sans-io.
//!
//! The shell feeds it connection events and decoded requests with
//! `handle_*(now, …)` and drains [`Output`]s with [`NodeService::poll_output`]:
//! replies to send and syncs to perform. It asks
//! [`NodeService::poll_timeout`] when to call [`NodeService::handle_timeout`]
//! for long-poll deadlines.
//!
//! This file holds the machine's public types, its inputs and outputs and
//! the dispatch of requests; the rest of the folder holds one concern each:
//! `auth.rs` (connections and authentication), `keys.rs` (KeyPackages and
//! hybrid keys), `queues.rs` (enqueue, acknowledgement, expiry, shared
//! payloads), `fence.rs` (the commit fence), `reads.rs` (reading queues
//! into replies), `waiters.rs` (parked long-polls), `gate.rs` (replies held
//! for durability), `sweep.rs` (the background sweep), `layout.rs` (the
//! on-disk layout) and `ratelimit.rs` (token buckets).
//!
//! Invariants this module keeps, and where:
//! - Durability before acknowledgement: in [`Durability::Fsync`] mode a reply
//!   is released only once every batch written before it is reported synced
//!   ([`NodeService::handle_synced`]), so a crash can lose only what nobody
//!   was told about — including reads of unsynced data, so a seq shown to a
//!   recipient is never reissued after a crash (`gate.rs`; every reply goes
//!   through its gate).
//! - A KeyPackage is removed in the same atomic batch that hands it out
//!   (`keys.rs`).
//! - Per queue, `seq` is strictly increasing, gap-free, and never reused
//!   (`queues.rs`).
//! - A request from the wrong identity changes nothing (`auth.rs`: each
//!   handler checks the identity before it reads or writes).
//! - Every collection a peer can grow is bounded (see [`crate::limits`]):
//!   connections ([`NodeService::handle_connection_opened`]), waiters
//!   (`waiters.rs`), queues and KeyPackages (`queues.rs`, `keys.rs`),
//!   rate-limiter keys (`ratelimit.rs`).

mod auth;
mod fence;
mod gate;
mod keys;
mod layout;
mod queues;
mod ratelimit;
mod reads;
mod sweep;
mod waiters;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::error::ServiceError;
use crate::limits::{self, AUTH_VERSION, TLS_EXPORTER_BYTES};
use crate::store::{Batch, Lsn, Store, StoreError, StoreErrorKind};
use crate::time::Time;
use crate::types::{ConnectionId, IdentityKey, QueueId, RequestId};

pub use layout::FORMAT_VERSION;
pub use ratelimit::{RateConfig, RateLimiter};
// The vocabulary the machine speaks is defined in `crate::protocol`, which
// the client machine shares; it is named here too, as the node's API.
pub use crate::protocol::framing as commit;
pub use crate::protocol::{
    AUTH_CONTEXT, ChannelMessages, Gap, HYBRID_KEY_CONTEXT, Outgoing, QueuedMessage, Reply,
    Request, RequestBody, Response, auth_message, hybrid_key_message,
};

use auth::{Connection, verify};
use gate::ReplyGate;
use keys::KeyFetch;
use layout::{Corrupt, QueueMeta};
use queues::{check_many, check_recipients};
use reads::check_cursors;
use waiters::{Waiter, WaiterTable};

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
    /// KeyPackages one identity may keep in each of its pools.
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

/// The NodeService machine over a store `S`.
#[derive(Debug)]
pub struct NodeService<S> {
    config: NodeConfig,
    store: S,
    rng: ChaCha20Rng,
    /// By the shell's connection number: not chosen by peers, so a fast
    /// unkeyed hash is safe (SipHash here was 4% of the instructions of an
    /// enqueue and a fetch in the core).
    connections: HashMap<ConnectionId, Connection, foldhash::fast::FixedState>,
    /// Parked long-polls.
    waiters: WaiterTable,
    /// Number of the next shared payload.
    next_blob: u64,
    /// Short id the next queue gets ([`layout::QueueMeta::qid`]).
    next_qid: u64,
    /// Queue counters as last written by this machine (at most
    /// [`limits::QUEUE_COUNTERS_CACHED_MAX`]), kept by [`Self::write`].
    counters: HashMap<QueueId, QueueMeta, foldhash::fast::FixedState>,
    enqueue_limiter: RateLimiter<IdentityKey>,
    key_fetch_pair_limiter: RateLimiter<(KeyFetch, IdentityKey, IdentityKey)>,
    key_package_target_limiter: RateLimiter<IdentityKey>,
    /// Replies held until their writes are durable, and the storage
    /// failure, if any.
    gate: ReplyGate,
    /// Where the sweep's walks go on: the last queue-counters key and the
    /// last fence key it finished (from the first when `None`).
    sweep_queues_after: Option<Vec<u8>>,
    sweep_fences_after: Option<Vec<u8>>,
    /// Set by [`NodeService::handle_shutdown`]: long-polls are answered
    /// at once instead of parked.
    draining: bool,
}

/// What one step of the sweep ([`NodeService::handle_sweep`]) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Queues whose counters it looked at.
    pub queues: usize,
    /// Messages it dropped for being older than the message TTL.
    pub expired: u64,
    /// Messages the queues it looked at hold (after any it dropped).
    pub queued_messages: u64,
    /// Payload bytes the queues it looked at hold (after any it dropped).
    pub queued_bytes: u64,
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
        // Short queue ids start at 1: 0 means "none yet".
        let next_qid = match store.get(&layout::queue_next_key())? {
            Some(v) => layout::decode_seq(&v).map_err(|Corrupt(w)| OpenError::Corrupt(w))?,
            None => 1,
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
            gate: ReplyGate::new(config.durability, last_write),
            config,
            store,
            rng: ChaCha20Rng::from_seed(seed),
            connections: HashMap::default(),
            waiters: WaiterTable::default(),
            next_blob,
            next_qid,
            counters: HashMap::default(),
            sweep_queues_after: None,
            sweep_fences_after: None,
            draining: false,
        };
        machine.gate.request_sync();
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

    /// The store, mutably: to sync it, or (tests) to crash a
    /// [`crate::store::MemStore`]. The machine keeps copies of the queue
    /// counters it wrote, so records changed here behind its back are for
    /// a machine about to be dropped and opened again.
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
            // The connection has left the table, so only the waiter table
            // still holds its waiters.
            for id in c.waiters {
                self.waiters.remove(id);
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
            self.gate.reply(conn, request_id, reply);
        }
        self.gate.request_sync();
    }

    /// Batches up to `lsn` are durable: release the replies that waited for
    /// them.
    pub fn handle_synced(&mut self, _now: Time, lsn: Lsn) {
        self.gate.synced(lsn);
    }

    /// The shell's turn was rolled back by a store shared with other
    /// machines ([`crate::store::StoreErrorKind::Aborted`]): nothing written
    /// after `kept` (the last batch the store still holds) survives, and
    /// nothing the turn read is to be trusted. Every reply of the turn —
    /// held for its writes or ready, its requests' and those of long-polls
    /// it woke — turns into a retryable `unavailable` error, and the queue
    /// counters the machine remembers are forgotten. The shell calls this
    /// before it takes the turn's outputs. The machine takes the next turn
    /// as usual.
    pub fn handle_turn_aborted(&mut self, _now: Time, kept: Lsn, reason: &str) {
        self.counters.clear();
        self.gate.rolled_back(kept, &turn_aborted(reason));
    }

    /// Another machine sharing the store (another server node) added
    /// messages to `queue`: the long-polls parked on it that now have
    /// something to take are answered; the others stay parked.
    pub fn handle_queue_changed(&mut self, _now: Time, queue: &QueueId) {
        self.recheck_queue(queue);
        self.gate.request_sync();
    }

    /// Changes by other machines sharing the store may have been missed
    /// (their notifications were lost while the shell reconnected): every
    /// parked long-poll is checked as if its queues had changed.
    pub fn handle_changes_missed(&mut self, _now: Time) {
        self.recheck_all();
        self.gate.request_sync();
    }

    /// Syncing failed: the machine stops taking writes, and every reply still
    /// waiting for durability becomes `unavailable` (the request may or may
    /// not have been applied; enqueue retries are idempotent).
    pub fn handle_sync_failed(&mut self, _now: Time, reason: &str) {
        self.fail(reason);
    }

    /// The shell is shutting down: every parked long-poll is answered now
    /// with what its queues hold (usually nothing), and from now on a
    /// fetchWait is answered at once, as if its timeout were 0, instead of
    /// parked. Other requests are served as before, so the ones in flight
    /// finish within the shell's grace period instead of holding it for a
    /// long-poll's whole timeout. There is no way back: the machine is
    /// about to be dropped.
    pub fn handle_shutdown(&mut self, _now: Time) {
        self.draining = true;
        for (id, w) in self.waiters.take_all() {
            self.answer_waiter(id, w);
        }
        self.gate.request_sync();
    }

    /// Time has passed: expire long-poll waiters whose deadline is due. A
    /// call with nothing due does nothing.
    pub fn handle_timeout(&mut self, now: Time) {
        for (id, w) in self.waiters.take_due(now) {
            self.answer_waiter(id, w);
        }
        self.gate.request_sync();
    }

    /// The next thing to do, or `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.gate.poll()
    }

    /// When [`Self::handle_timeout`] should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.waiters.poll_timeout()
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
        self.gate.held_count()
    }

    /// Why the machine refuses every request, if its storage failed (a
    /// failed sync or write; not a write refused for lack of space).
    pub fn failure(&self) -> Option<&str> {
        self.gate.failure()
    }

    // ----- dispatch -------------------------------------------------------

    fn dispatch(
        &mut self,
        now: Time,
        conn: ConnectionId,
        request_id: RequestId,
        request: Request,
    ) -> Option<Reply> {
        if let Some(reason) = self.gate.failure() {
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
                cipher_suite,
            } => self.upload_key_package(conn, identity_key, package, last_resort, cipher_suite),
            RequestBody::FetchKeyPackage {
                identity_key,
                cipher_suite,
            } => self.fetch_key_package(now, conn, identity_key, cipher_suite),
            RequestBody::KeyPackageCount {
                identity_key,
                cipher_suite,
            } => self.key_package_count(conn, identity_key, cipher_suite),
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

    // ----- storage --------------------------------------------------------

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ServiceError> {
        self.store.get(key).map_err(store_failure)
    }

    fn write(&mut self, batch: Batch) -> Result<(), ServiceError> {
        // The queue counters the batch writes, kept once it is stored.
        let mut counters = Vec::new();
        for (key, value) in batch.ops() {
            if layout::is_queue_meta_key(key) {
                let queue = layout::queue_of_meta_key(key).map_err(corrupt)?;
                let meta = value
                    .as_deref()
                    .map(QueueMeta::decode)
                    .transpose()
                    .map_err(corrupt)?;
                counters.push((queue, meta));
            }
        }
        match self.store.write(batch) {
            Ok(lsn) => {
                self.gate.written(lsn);
                // Other machines write a shared store's counters too.
                if self.store.shared() {
                    counters.clear();
                }
                for (queue, meta) in counters {
                    match meta {
                        Some(meta) => {
                            if self.counters.len() >= limits::QUEUE_COUNTERS_CACHED_MAX {
                                self.counters.clear();
                            }
                            self.counters.insert(queue, meta);
                        }
                        None => {
                            self.counters.remove(&queue);
                        }
                    }
                }
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
            // The shell's turn was rolled back (a shared store): this
            // request fails like every other of the turn, and the shell
            // tells the machine when the turn ends.
            Err(StoreError {
                kind: StoreErrorKind::Aborted,
                detail,
                ..
            }) => Err(turn_aborted(&detail)),
            Err(e) => {
                self.fail(&e.detail);
                Err(ServiceError::unavailable(e.to_string()))
            }
        }
    }

    /// Storage failed: the machine takes no more writes, and every reply
    /// still held for durability, and every parked long-poll, is answered
    /// `unavailable`.
    fn fail(&mut self, reason: &str) {
        self.gate.fail(reason);
        // Parked long-polls too: a waiter answered later would read state
        // whose writes may never become durable.
        self.fail_waiters();
    }
}

/// A message's enqueue time as stored: milliseconds of the machine's clock.
fn stamp_ms(now: Time) -> u64 {
    now.as_micros() / 1_000
}

fn rate_limited(retry_after_ms: u64, what: &str) -> ServiceError {
    ServiceError::rate_limited(
        retry_after_ms,
        format!("too many {what}; retry in {retry_after_ms} ms"),
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

/// The answer to a request whose store read or write failed: a rolled-back
/// turn's (a shared store) says to send it again.
fn store_failure(e: StoreError) -> ServiceError {
    match e.kind {
        StoreErrorKind::Aborted => turn_aborted(&e.detail),
        _ => ServiceError::unavailable(e.to_string()),
    }
}

/// The answer to a request whose turn a shared store rolled back.
fn turn_aborted(reason: &str) -> ServiceError {
    ServiceError::unavailable(format!(
        "the database rolled this request back ({reason}); send it again"
    ))
}

#[cfg(test)]
mod tests;
