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

use ed25519_dalek::{Signer, SigningKey};
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{
    NodeConfig, NodeService, Output, Reply, Request, RequestBody, Response, auth_message,
};
use quicproquo_core::store::MemStore;
use quicproquo_core::time::Time;
use quicproquo_core::types::{
    ChannelId, ConnectionId, IdentityKey, MessageId, RequestId, Signature,
};

/// Virtual time that passes per request: 1 ms, so one sender earns ten
/// enqueue tokens per request at the default rate and is never limited.
pub const TICK: Duration = Duration::from_millis(1);

/// The TLS exporter value every rig connection reports.
const EXPORTER: [u8; 32] = [0xee; 32];

/// A NodeService over a `MemStore` with an inline shell loop.
pub struct CoreRig {
    node: NodeService<MemStore>,
    now: Time,
    next_request: u64,
    next_message: u64,
    replies: Vec<(RequestId, Reply)>,
}

impl CoreRig {
    /// A fresh machine in `fsync` mode whose KeyPackage fetch limits are
    /// raised far above any rate a bench reaches (the defaults allow a few
    /// fetches per second per target, which is the point in production and
    /// would only measure refusals here).
    pub fn new() -> CoreRig {
        let mut config = NodeConfig::default();
        let open = quicproquo_core::node::RateConfig {
            burst: u32::MAX,
            per_sec: u32::MAX,
        };
        config.key_fetch_pair_rate = open;
        config.key_package_fetch_target_rate = open;
        Self::with_config(config)
    }

    /// A fresh machine with `config`.
    pub fn with_config(config: NodeConfig) -> CoreRig {
        let node = NodeService::new(config, [7; 32], MemStore::new()).expect("open machine");
        let mut rig = CoreRig {
            node,
            now: Time::from_millis(1),
            next_request: 0,
            next_message: 0,
            replies: Vec::new(),
        };
        rig.drain();
        rig
    }

    /// The identity of a deterministic test user `n`.
    pub fn user(n: u64) -> SigningKey {
        let mut seed = [0x5a; 32];
        seed[..8].copy_from_slice(&n.to_le_bytes());
        SigningKey::from_bytes(&seed)
    }

    /// Opens connection `conn` and authenticates it as `key`.
    pub fn login(&mut self, conn: u64, key: &SigningKey) {
        let c = ConnectionId(conn);
        self.node
            .handle_connection_opened(self.now, c, EXPORTER)
            .expect("connection table has room");
        let Ok(Response::AuthChallenge { nonce }) = self.call(conn, RequestBody::AuthChallenge)
        else {
            panic!("no auth challenge");
        };
        let identity_key = IdentityKey(key.verifying_key().to_bytes());
        let sig = key.sign(&auth_message(&identity_key, &nonce, &EXPORTER));
        let r = self.call(
            conn,
            RequestBody::Authenticate {
                identity_key,
                signature: Signature(sig.to_bytes()),
            },
        );
        assert_eq!(r, Ok(Response::Authenticated), "rig login");
    }

    /// Feeds one request and returns its reply if it is ready now (a
    /// fetchWait with nothing pending parks instead; its reply comes out
    /// of a later call's drain, see [`Self::take_replies`]).
    pub fn call(&mut self, conn: u64, body: RequestBody) -> Reply {
        let id = self.send(conn, body);
        let pos = self
            .replies
            .iter()
            .position(|(r, _)| *r == id)
            .expect("the reply is ready");
        self.replies.swap_remove(pos).1
    }

    /// Feeds one request and drains what it caused; returns its id.
    pub fn send(&mut self, conn: u64, body: RequestBody) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.now = self.now.saturating_add(TICK);
        self.node.handle_request(
            self.now,
            ConnectionId(conn),
            id,
            Request {
                auth_version: AUTH_VERSION,
                body,
            },
        );
        self.drain();
        id
    }

    /// Replies collected by [`Self::send`] and not yet taken.
    pub fn take_replies(&mut self) -> Vec<(RequestId, Reply)> {
        std::mem::take(&mut self.replies)
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
        &self.node
    }

    /// A message id never used before in this rig.
    pub fn message_id(&mut self) -> MessageId {
        self.next_message += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_message.to_le_bytes());
        MessageId(id)
    }

    /// Drains the machine's outputs as the service task does: replies are
    /// collected, each sync request is carried out on the store at once and
    /// reported back, which may release held replies.
    fn drain(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Reply {
                    request_id, reply, ..
                } => self.replies.push((request_id, reply)),
                Output::Sync { lsn } => {
                    let synced = self.node.store_mut().sync_up_to(lsn);
                    self.node.handle_synced(self.now, synced);
                }
            }
        }
    }
}

impl Default for CoreRig {
    fn default() -> Self {
        CoreRig::new()
    }
}

/// The public identity key of `key`.
pub fn identity(key: &SigningKey) -> IdentityKey {
    IdentityKey(key.verifying_key().to_bytes())
}
