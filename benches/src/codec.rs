//! The values the `codec` benches encode and decode, shared by both codecs
//! (Cap'n Proto in `quicproquo_proto`, Protobuf in [`crate::pb`]) and by the
//! round-trip and size tests, so every figure is about the same value.

use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{QueuedMessage, Reply, Request, RequestBody, Response};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};

/// An enqueue of a `payload_bytes` payload to a 16-byte channel (a UUID,
/// the longest channel id).
pub fn enqueue_request(payload_bytes: usize) -> Request {
    Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Enqueue {
            recipient_key: IdentityKey([7; 32]),
            channel_id: ChannelId::try_from_slice(&[1; 16]).expect("16 bytes"),
            payload: vec![0x42; payload_bytes],
            message_id: MessageId([9; 16]),
        },
    }
}

/// A fetch on the default channel, as a client's receive loop sends it.
pub fn fetch_request() -> Request {
    Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Fetch {
            recipient_key: IdentityKey([7; 32]),
            channel_id: ChannelId::DEFAULT,
            after_seq: 41,
            limit: 100,
        },
    }
}

/// The answer to an enqueue.
pub fn enqueued_reply() -> Reply {
    Ok(Response::Enqueued { seq: 42 })
}

/// A fetch's answer: `count` messages of `payload_bytes` each, no gap.
pub fn messages_reply(payload_bytes: usize, count: usize) -> Reply {
    Ok(Response::Messages {
        messages: (1..=count as u64)
            .map(|seq| QueuedMessage {
                seq,
                payload: vec![0x42; payload_bytes],
            })
            .collect(),
        next_seq: count as u64 + 1,
        gap: None,
    })
}
