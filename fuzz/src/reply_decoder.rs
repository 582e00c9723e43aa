//! Target `reply_decoder`: the client's decoder, `decode_reply`, on
//! arbitrary bytes (what a hostile or broken server could send).
//!
//! Checked: it never panics; a refusal maps to `invalidArgument` or
//! `payloadTooLarge`; and whatever it accepts re-encodes to a message that
//! decodes to the same reply.

use quicproquo_core::node::{ChannelMessages, QueuedMessage, Reply, Response};
use quicproquo_core::types::ChannelId;
use quicproquo_core::{ErrorKind, ServiceError};
use quicproquo_proto::{REPLY_BYTES_MAX, decode_reply, encode_reply};

use super::hostile;

/// The target's body.
pub fn run(data: &[u8]) {
    match decode_reply(data) {
        Ok(reply) => {
            let bytes = encode_reply(&reply);
            match decode_reply(&bytes) {
                Ok(again) => assert_eq!(again, reply, "re-encoded reply differs"),
                Err(e) => assert!(
                    bytes.len() > REPLY_BYTES_MAX,
                    "re-encoded reply does not decode: {e}"
                ),
            }
        }
        Err(e) => {
            let kind = e.to_service_error().kind;
            assert!(
                matches!(
                    kind,
                    ErrorKind::InvalidArgument | ErrorKind::PayloadTooLarge
                ),
                "decode error {e} maps to {kind:?}"
            );
        }
    }
}

/// Seeds: one valid encoding of every response and every error kind, and
/// the pointer-amplified fetch reply.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let ok = |name: &str, r: Response| (name.to_owned(), Ok(r));
    let err = |name: &str, kind: ErrorKind| {
        (
            name.to_owned(),
            Err(ServiceError::new(kind, format!("{name} happened"))),
        )
    };
    let replies: Vec<(String, Reply)> = vec![
        ok("auth_challenge", Response::AuthChallenge { nonce: [4; 32] }),
        ok("authenticated", Response::Authenticated),
        ok(
            "key_package_uploaded",
            Response::KeyPackageUploaded {
                fingerprint: [6; 32],
            },
        ),
        ok(
            "key_package",
            Response::KeyPackage {
                package: b"a KeyPackage".to_vec(),
                last_resort: false,
            },
        ),
        ok(
            "key_package_count",
            Response::KeyPackageCount {
                count: 3,
                has_last_resort: true,
            },
        ),
        ok("hybrid_key_uploaded", Response::HybridKeyUploaded),
        ok(
            "hybrid_key",
            Response::HybridKey {
                hybrid_key: vec![8; 40],
                signature: quicproquo_core::types::Signature([9; 64]),
            },
        ),
        ok("enqueued", Response::Enqueued { seq: 42 }),
        ok(
            "messages",
            Response::Messages {
                messages: vec![
                    QueuedMessage {
                        seq: 5,
                        payload: b"first".to_vec(),
                    },
                    QueuedMessage {
                        seq: 6,
                        payload: b"second".to_vec(),
                    },
                ],
                next_seq: 7,
                gap: None,
            },
        ),
        ok(
            "no_messages",
            Response::Messages {
                messages: Vec::new(),
                next_seq: 1,
                gap: None,
            },
        ),
        ok(
            "enqueued_batch",
            Response::EnqueuedBatch {
                seqs: vec![3, 1, 99],
            },
        ),
        ok(
            "channel_messages",
            Response::ChannelMessages {
                channels: vec![
                    ChannelMessages {
                        channel_id: ChannelId::DEFAULT,
                        messages: vec![QueuedMessage {
                            seq: 2,
                            payload: b"a welcome".to_vec(),
                        }],
                        next_seq: 3,
                        gap: None,
                    },
                    ChannelMessages {
                        channel_id: ChannelId::try_from_slice(&[5; 16]).expect("16 bytes"),
                        messages: vec![
                            QueuedMessage {
                                seq: 8,
                                payload: b"one".to_vec(),
                            },
                            QueuedMessage {
                                seq: 9,
                                payload: b"two".to_vec(),
                            },
                        ],
                        next_seq: 10,
                        gap: None,
                    },
                ],
            },
        ),
        err("invalid_argument", ErrorKind::InvalidArgument),
        err("unauthenticated", ErrorKind::Unauthenticated),
        err("permission_denied", ErrorKind::PermissionDenied),
        err("not_found", ErrorKind::NotFound),
        err("payload_too_large", ErrorKind::PayloadTooLarge),
        err(
            "rate_limited",
            ErrorKind::RateLimited {
                retry_after_ms: 250,
            },
        ),
        err("queue_full", ErrorKind::QueueFull),
        err("stale_epoch", ErrorKind::StaleEpoch { current_epoch: 9 }),
        err("unavailable", ErrorKind::Unavailable),
        err("internal", ErrorKind::Internal),
    ];
    let mut out: Vec<(String, Vec<u8>)> = replies
        .into_iter()
        .map(|(name, reply)| (name, encode_reply(&reply)))
        .collect();
    // Two aliases of an 8 KiB blob cost about the message itself; a
    // hundred cost fifty times more.
    out.push((
        "hostile_aliased_messages_2".to_owned(),
        hostile::aliased_messages_reply(2, 8 * 1024),
    ));
    out.push((
        "hostile_aliased_messages_100".to_owned(),
        hostile::aliased_messages_reply(100, 8 * 1024),
    ));
    out.push(("hostile_deep_chain".to_owned(), hostile::deep_chain(200)));
    out
}
