//! Target `request_decoder`: the server's decoder, `decode_request`, on
//! arbitrary bytes.
//!
//! Checked: it never panics; a refusal maps to `invalidArgument` or
//! `payloadTooLarge` (what the server answers); and whatever it accepts
//! re-encodes to a message that decodes to the same request, so nothing
//! the server acts on depends on how the peer laid out its bytes.

use quicproquo_core::ErrorKind;
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{Outgoing, Request, RequestBody};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, Signature};
use quicproquo_proto::{REQUEST_BYTES_MAX, decode_request, encode_request};

use super::hostile;

/// The target's body.
pub fn run(data: &[u8]) {
    match decode_request(data) {
        Ok(request) => {
            let bytes = encode_request(&request);
            match decode_request(&bytes) {
                Ok(again) => assert_eq!(again, request, "re-encoded request differs"),
                // Aliased fields can make the canonical encoding longer
                // than the input; only then may it exceed the limit.
                Err(e) => assert!(
                    bytes.len() > REQUEST_BYTES_MAX,
                    "re-encoded request does not decode: {e}"
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

/// Seeds: one valid encoding of every method, and every hostile request of
/// `hostile`.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let key = IdentityKey([7; 32]);
    let channel = ChannelId::try_from_slice(&[9; 16]).expect("16 bytes");
    let bodies = [
        ("auth_challenge", RequestBody::AuthChallenge),
        (
            "authenticate",
            RequestBody::Authenticate {
                identity_key: key,
                signature: Signature([1; 64]),
            },
        ),
        (
            "upload_key_package",
            RequestBody::UploadKeyPackage {
                identity_key: key,
                package: b"a KeyPackage".to_vec(),
                last_resort: true,
                cipher_suite: 0,
            },
        ),
        (
            "fetch_key_package",
            RequestBody::FetchKeyPackage {
                identity_key: key,
                cipher_suite: 0,
            },
        ),
        (
            "key_package_count",
            RequestBody::KeyPackageCount {
                identity_key: key,
                cipher_suite: 0,
            },
        ),
        (
            "upload_hybrid_key",
            RequestBody::UploadHybridKey {
                identity_key: key,
                hybrid_key: vec![3; 40],
                signature: Signature([2; 64]),
            },
        ),
        (
            "fetch_hybrid_key",
            RequestBody::FetchHybridKey { identity_key: key },
        ),
        (
            "enqueue",
            RequestBody::Enqueue {
                recipient_key: key,
                channel_id: channel,
                payload: b"an MLS message".to_vec(),
                message_id: MessageId([5; 16]),
            },
        ),
        (
            "fetch",
            RequestBody::Fetch {
                recipient_key: key,
                channel_id: ChannelId::DEFAULT,
                after_seq: 3,
                limit: 100,
            },
        ),
        (
            "fetch_wait",
            RequestBody::FetchWait {
                recipient_key: key,
                channel_id: channel,
                after_seq: u64::MAX,
                limit: 1,
                timeout_ms: 25_000,
            },
        ),
        (
            "enqueue_batch",
            RequestBody::EnqueueBatch {
                recipient_keys: vec![key, IdentityKey([8; 32]), IdentityKey([6; 32])],
                channel_id: channel,
                payload: b"a group message".to_vec(),
                message_id: MessageId([4; 16]),
            },
        ),
        (
            "enqueue_many",
            RequestBody::EnqueueMany {
                recipient_keys: vec![key, IdentityKey([8; 32])],
                channel_id: channel,
                messages: vec![
                    Outgoing {
                        payload: b"the first message".to_vec(),
                        message_id: MessageId([4; 16]),
                    },
                    Outgoing {
                        payload: b"the second".to_vec(),
                        message_id: MessageId([5; 16]),
                    },
                ],
            },
        ),
        (
            "fetch_wait_channels",
            RequestBody::FetchWaitChannels {
                recipient_key: key,
                cursors: vec![(ChannelId::DEFAULT, 0), (channel, 17)],
                limit: 10,
                timeout_ms: 25_000,
            },
        ),
    ];
    let mut out: Vec<(String, Vec<u8>)> = bodies
        .into_iter()
        .map(|(name, body)| {
            let request = Request {
                auth_version: AUTH_VERSION,
                body,
            };
            (name.to_owned(), encode_request(&request))
        })
        .collect();
    out.extend(
        hostile::requests()
            .into_iter()
            .map(|(name, bytes)| (format!("hostile_{name}"), bytes)),
    );
    out
}
