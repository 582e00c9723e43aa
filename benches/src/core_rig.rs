//! [`CoreRig`]: one NodeService machine over a `MemStore`, driven like the
//! server's service task drives it — feed one request, drain the outputs,
//! sync the store when the machine asks and report it back — but inline,
//! without tasks, channels, sockets or a disk. What it measures is the
//! machine itself plus the in-memory store.
//!
//! Time is virtual: every request advances the rig's clock by
//! [`TICK`], so the per-sender enqueue rate limit (10,000/s by default)
//! refills as it would for a sender well within its budget.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use quicproquo_core::node::{NodeConfig, NodeService, Reply, RequestBody, Response};
use quicproquo_core::store::MemStore;
use quicproquo_core::testing::{self, NodeWorld};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, RequestId};

pub use quicproquo_core::testing::identity;

/// Virtual time that passes per request: 1 ms, so one sender earns ten
/// enqueue tokens per request at the default rate and is never limited.
pub const TICK: Duration = Duration::from_millis(1);

/// The core's in-memory world ([`NodeWorld`]) with what the benches ask
/// of it: each request drained at once, fresh message ids, enqueue and
/// fetch in one call.
pub struct CoreRig {
    world: NodeWorld,
    next_message: u64,
}

impl CoreRig {
    /// A fresh machine in `fsync` mode whose KeyPackage fetch limits are
    /// raised far above any rate a bench reaches (the defaults allow a few
    /// fetches per second per target, which is the point in production and
    /// would only measure refusals here).
    pub fn new() -> CoreRig {
        let open = testing::unlimited(NodeConfig::default());
        Self::with_config(NodeConfig {
            enqueue_rate: NodeConfig::default().enqueue_rate,
            ..open
        })
    }

    /// A fresh machine with `config`.
    pub fn with_config(config: NodeConfig) -> CoreRig {
        let mut world = NodeWorld::new(config);
        world.set_tick(TICK);
        CoreRig {
            world,
            next_message: 0,
        }
    }

    /// The identity of a deterministic test user `n`.
    pub fn user(n: u64) -> SigningKey {
        testing::user(n)
    }

    /// Opens connection `conn` and authenticates it as `key`.
    pub fn login(&mut self, conn: u64, key: &SigningKey) {
        self.world.login(conn, key);
    }

    /// Feeds one request and returns its reply if it is ready now (a
    /// fetchWait with nothing pending parks instead; its reply comes out
    /// of a later call's drain, see [`Self::take_replies`]).
    pub fn call(&mut self, conn: u64, body: RequestBody) -> Reply {
        self.world.call(conn, body)
    }

    /// Feeds one request and drains what it caused; returns its id.
    pub fn send(&mut self, conn: u64, body: RequestBody) -> RequestId {
        let id = self.world.send(conn, body);
        self.world.pump();
        id
    }

    /// Replies collected by [`Self::send`] and not yet taken.
    pub fn take_replies(&mut self) -> Vec<(RequestId, Reply)> {
        self.world.drain()
    }

    /// Enqueues `payload` from `conn` to `recipient`'s default queue with a
    /// fresh message id; returns the seq.
    pub fn enqueue(&mut self, conn: u64, recipient: IdentityKey, payload: Vec<u8>) -> u64 {
        let message_id = self.message_id();
        match self.call(
            conn,
            RequestBody::Enqueue {
                recipient_key: recipient,
                channel_id: ChannelId::DEFAULT,
                payload,
                message_id,
            },
        ) {
            Ok(Response::Enqueued { seq }) => seq,
            other => panic!("enqueue failed: {other:?}"),
        }
    }

    /// Acknowledges `seq <= after_seq` of `owner`'s default queue and reads
    /// up to `limit` messages after it; returns how many came back.
    pub fn fetch(&mut self, conn: u64, owner: IdentityKey, after_seq: u64, limit: u32) -> usize {
        match self.call(
            conn,
            RequestBody::Fetch {
                recipient_key: owner,
                channel_id: ChannelId::DEFAULT,
                after_seq,
                limit,
            },
        ) {
            Ok(Response::Messages { messages, .. }) => messages.len(),
            other => panic!("fetch failed: {other:?}"),
        }
    }

    /// The machine, for inspection.
    pub fn node(&self) -> &NodeService<MemStore> {
        self.world.node()
    }

    /// A message id never used before in this rig.
    pub fn message_id(&mut self) -> MessageId {
        self.next_message += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_message.to_le_bytes());
        MessageId(id)
    }
}

impl Default for CoreRig {
    fn default() -> Self {
        CoreRig::new()
    }
}
