//! The NodeService's requests and responses as typed Rust values — the
//! machine's input and output vocabulary. The wire codec
//! (`quicproquo-proto`) converts Cap'n Proto messages to and from these.

use crate::error::ServiceError;
use crate::limits::AUTH_NONCE_BYTES;
use crate::types::{ChannelId, Fingerprint, IdentityKey, MessageId, Signature};

/// One request as it arrives on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The authentication scheme the client speaks; must equal
    /// [`crate::limits::AUTH_VERSION`].
    pub auth_version: u16,
    /// The method and its arguments.
    pub body: RequestBody,
}

/// The NodeService methods (ARCHITECTURE.md § Protocol) with their arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestBody {
    /// Ask for a fresh nonce to sign.
    AuthChallenge,
    /// Prove ownership of `identity_key` by signing the nonce and the
    /// connection's TLS exporter value (see [`crate::node::auth_message`]).
    Authenticate {
        /// The identity being claimed.
        identity_key: IdentityKey,
        /// Ed25519 signature over the auth message.
        signature: Signature,
    },
    /// Append a KeyPackage to the caller's pool (owner only).
    UploadKeyPackage {
        /// Whose pool; must be the connection's identity.
        identity_key: IdentityKey,
        /// The KeyPackage bytes, opaque to the server.
        package: Vec<u8>,
        /// Replace the last-resort package instead of appending.
        last_resort: bool,
        /// Which of the identity's pools:
        /// [`DEFAULT_POOL`](crate::limits::DEFAULT_POOL) or an MLS cipher
        /// suite in [`KEY_PACKAGE_SUITES`](crate::limits::KEY_PACKAGE_SUITES).
        cipher_suite: u16,
    },
    /// Pop the oldest KeyPackage of `identity_key` (any authenticated caller).
    FetchKeyPackage {
        /// Whose package to fetch.
        identity_key: IdentityKey,
        /// From which of its pools.
        cipher_suite: u16,
    },
    /// How many KeyPackages remain (owner only).
    KeyPackageCount {
        /// Whose pool; must be the connection's identity.
        identity_key: IdentityKey,
        /// Which of its pools.
        cipher_suite: u16,
    },
    /// Store the caller's signed hybrid public key (owner only).
    UploadHybridKey {
        /// Whose key; must be the connection's identity.
        identity_key: IdentityKey,
        /// The hybrid (X25519 + ML-KEM-768) public key, opaque to the server.
        hybrid_key: Vec<u8>,
        /// Ed25519 signature by `identity_key` over
        /// [`crate::node::hybrid_key_message`].
        signature: Signature,
    },
    /// Fetch someone's hybrid public key and its signature.
    FetchHybridKey {
        /// Whose key to fetch.
        identity_key: IdentityKey,
    },
    /// Append a payload to the queue `(channel_id, recipient_key)`.
    Enqueue {
        /// The recipient.
        recipient_key: IdentityKey,
        /// The recipient's channel.
        channel_id: ChannelId,
        /// The opaque payload.
        payload: Vec<u8>,
        /// Sender-chosen id; a retry with the same id is stored once.
        message_id: MessageId,
    },
    /// Acknowledge `seq <= after_seq`, return up to `limit` messages after it
    /// (owner only).
    Fetch {
        /// Whose queue; must be the connection's identity.
        recipient_key: IdentityKey,
        /// Which channel.
        channel_id: ChannelId,
        /// Everything at or below this seq is acknowledged and deleted.
        after_seq: u64,
        /// Most messages to return; 0 only acknowledges.
        limit: u32,
    },
    /// Append one payload to the queues `(channel_id, r)` of every
    /// recipient `r` at once: the payload is stored once, each recipient
    /// gets its own entry and seq. All or nothing.
    EnqueueBatch {
        /// The recipients, each at most once.
        recipient_keys: Vec<IdentityKey>,
        /// The recipients' channel.
        channel_id: ChannelId,
        /// The opaque payload.
        payload: Vec<u8>,
        /// Sender-chosen id; a retry with the same id is stored once per
        /// recipient.
        message_id: MessageId,
    },
    /// Append several payloads, in order, to the queues `(channel_id, r)`
    /// of every recipient `r`: each queue gets them one after another in
    /// the order listed. All or nothing; answered with
    /// [`Response::EnqueuedBatch`], message by message, each in recipient
    /// order.
    EnqueueMany {
        /// The recipients, each at most once.
        recipient_keys: Vec<IdentityKey>,
        /// The recipients' channel.
        channel_id: ChannelId,
        /// The messages, oldest first, their ids distinct.
        messages: Vec<Outgoing>,
    },
    /// As `Fetch`, but wait up to `timeout_ms` for a message if none is
    /// pending.
    FetchWait {
        /// Whose queue; must be the connection's identity.
        recipient_key: IdentityKey,
        /// Which channel.
        channel_id: ChannelId,
        /// Everything at or below this seq is acknowledged and deleted.
        after_seq: u64,
        /// Most messages to return; at least 1.
        limit: u32,
        /// How long to wait; clamped to
        /// [`crate::limits::FETCH_WAIT_TIMEOUT_MS_MAX`].
        timeout_ms: u64,
    },
    /// One wait over several channels of the caller's queues: acknowledges
    /// each cursor, then answers with every channel that has messages after
    /// its cursor, waiting up to `timeout_ms` for the first (owner only).
    FetchWaitChannels {
        /// Whose queues; must be the connection's identity.
        recipient_key: IdentityKey,
        /// `(channel, after_seq)` per channel, each channel at most once.
        cursors: Vec<(ChannelId, u64)>,
        /// Most messages returned per channel; at least 1.
        limit: u32,
        /// How long to wait; clamped as for `FetchWait`.
        timeout_ms: u64,
    },
}

impl RequestBody {
    /// The method's name as the wire and the logs spell it.
    pub fn method(&self) -> &'static str {
        match self {
            RequestBody::AuthChallenge => "authChallenge",
            RequestBody::Authenticate { .. } => "authenticate",
            RequestBody::UploadKeyPackage { .. } => "uploadKeyPackage",
            RequestBody::FetchKeyPackage { .. } => "fetchKeyPackage",
            RequestBody::KeyPackageCount { .. } => "keyPackageCount",
            RequestBody::UploadHybridKey { .. } => "uploadHybridKey",
            RequestBody::FetchHybridKey { .. } => "fetchHybridKey",
            RequestBody::Enqueue { .. } => "enqueue",
            RequestBody::Fetch { .. } => "fetch",
            RequestBody::FetchWait { .. } => "fetchWait",
            RequestBody::EnqueueBatch { .. } => "enqueueBatch",
            RequestBody::EnqueueMany { .. } => "enqueueMany",
            RequestBody::FetchWaitChannels { .. } => "fetchWaitChannels",
        }
    }
}

/// One message of an [`RequestBody::EnqueueMany`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The opaque payload.
    pub payload: Vec<u8>,
    /// Sender-chosen id; a retry is stored once per recipient.
    pub message_id: MessageId,
}

/// A queued message as fetch returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Its position in the queue.
    pub seq: u64,
    /// The opaque payload.
    pub payload: Vec<u8>,
}

/// Seqs `from..=to` of a queue that were dropped by the server's message
/// TTL before being fetched: the recipient will never see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// First dropped seq after the cursor.
    pub from: u64,
    /// Last dropped seq.
    pub to: u64,
}

/// A successful answer, one variant per method.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    /// A fresh single-use nonce for [`RequestBody::Authenticate`].
    AuthChallenge {
        /// The nonce to sign.
        nonce: [u8; AUTH_NONCE_BYTES],
    },
    /// The connection is now bound to the identity.
    Authenticated,
    /// The KeyPackage is stored; its SHA-256.
    KeyPackageUploaded {
        /// SHA-256 of the stored package.
        fingerprint: Fingerprint,
    },
    /// One KeyPackage, removed from the pool unless it is the last resort.
    KeyPackage {
        /// The package bytes.
        package: Vec<u8>,
        /// True if this is the (kept) last-resort package.
        last_resort: bool,
    },
    /// The size of the caller's pool.
    KeyPackageCount {
        /// Single-use packages remaining.
        count: u32,
        /// Whether a last-resort package is stored.
        has_last_resort: bool,
    },
    /// The hybrid key is stored.
    HybridKeyUploaded,
    /// Someone's hybrid key with the owner's signature over it.
    HybridKey {
        /// The hybrid public key.
        hybrid_key: Vec<u8>,
        /// The owner's signature, to be checked by the caller.
        signature: Signature,
    },
    /// The payload is stored (and durable) at `seq`.
    Enqueued {
        /// The payload's position in the queue.
        seq: u64,
    },
    /// Messages after the cursor, oldest first.
    Messages {
        /// Up to `limit` messages, in seq order, without gaps.
        messages: Vec<QueuedMessage>,
        /// The seq the next enqueue to this queue will get.
        next_seq: u64,
        /// Messages after the cursor the server dropped by its TTL.
        gap: Option<Gap>,
    },
    /// The payload is stored (and durable) in every recipient's queue.
    EnqueuedBatch {
        /// Each recipient's seq, in the order of the request's recipients.
        seqs: Vec<u64>,
    },
    /// The channels of a [`RequestBody::FetchWaitChannels`] that have
    /// messages, in the order of the request's cursors; empty when the
    /// wait ran out.
    ChannelMessages {
        /// Channels with messages (or a gap).
        channels: Vec<ChannelMessages>,
    },
}

/// One channel's part of a [`Response::ChannelMessages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMessages {
    /// Which channel.
    pub channel_id: ChannelId,
    /// Messages after the channel's cursor, in seq order, without gaps.
    pub messages: Vec<QueuedMessage>,
    /// The seq the next enqueue to this channel's queue will get.
    pub next_seq: u64,
    /// Messages after the cursor the server dropped by its TTL.
    pub gap: Option<Gap>,
}

/// A reply: the answer to one request.
pub type Reply = Result<Response, ServiceError>;
