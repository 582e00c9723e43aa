//! Tests of the codec: round trips of every method, response and error
//! kind; field validation; and hostile input (garbage, truncation, oversize,
//! unknown members, far pointers, pointer amplification, deep nesting),
//! which must produce errors and never panics. Hand-built messages are
//! written word by word with the helpers at the bottom.

use proptest::prelude::*;
use quicproquo_core::limits::{
    AUTH_NONCE_BYTES, AUTH_VERSION, FETCH_LIMIT_MAX, FETCH_RESPONSE_BYTES_MAX, PAYLOAD_BYTES_MAX,
};
use quicproquo_core::node::{Outgoing, QueuedMessage, Reply, Request, RequestBody, Response};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, Signature};
use quicproquo_core::{ErrorKind, ServiceError};

use super::*;

// ---------------------------------------------------------------- round trips

#[test]
fn every_request_method_round_trips() {
    check_request(RequestBody::AuthChallenge);
    check_request(RequestBody::Authenticate {
        identity_key: key(1),
        signature: sig(2),
    });
    for last_resort in [false, true] {
        check_request(RequestBody::UploadKeyPackage {
            identity_key: key(3),
            package: vec![4; 301],
            last_resort,
            cipher_suite: 0,
        });
    }
    check_request(RequestBody::FetchKeyPackage {
        identity_key: key(5),
        cipher_suite: 0,
    });
    check_request(RequestBody::KeyPackageCount {
        identity_key: key(6),
        cipher_suite: 0,
    });
    check_request(RequestBody::UploadHybridKey {
        identity_key: key(7),
        hybrid_key: vec![8; 1216],
        signature: sig(9),
    });
    check_request(RequestBody::FetchHybridKey {
        identity_key: key(10),
    });
    for channel in [&[][..], &[11], &[12; 16]] {
        check_request(RequestBody::Enqueue {
            recipient_key: key(13),
            channel_id: chan(channel),
            payload: vec![14; 1025],
            message_id: mid(15),
        });
    }
    check_request(RequestBody::Enqueue {
        recipient_key: key(13),
        channel_id: ChannelId::DEFAULT,
        payload: Vec::new(),
        message_id: mid(15),
    });
    check_request(RequestBody::Fetch {
        recipient_key: key(16),
        channel_id: chan(&[17; 5]),
        after_seq: u64::MAX,
        limit: u32::MAX,
    });
    check_request(RequestBody::FetchWait {
        recipient_key: key(18),
        channel_id: ChannelId::DEFAULT,
        after_seq: 19,
        limit: 20,
        timeout_ms: u64::MAX,
    });
    for n in [0u8, 1, 50] {
        check_request(RequestBody::EnqueueBatch {
            recipient_keys: (0..n).map(key).collect(),
            channel_id: chan(&[21; 16]),
            payload: vec![22; 1025],
            message_id: mid(23),
        });
        check_request(RequestBody::EnqueueMany {
            recipient_keys: (0..n).map(key).collect(),
            channel_id: chan(&[27; 3]),
            messages: (0..n)
                .map(|i| Outgoing {
                    payload: vec![i; usize::from(i) * 30],
                    message_id: mid(i),
                })
                .collect(),
        });
        check_request(RequestBody::FetchWaitChannels {
            recipient_key: key(24),
            cursors: (0..n).map(|i| (chan(&[i; 7]), u64::from(i))).collect(),
            limit: 25,
            timeout_ms: 26,
        });
    }
}

#[test]
fn largest_batch_and_channel_wait_fit_the_request_limit() {
    use quicproquo_core::limits::{ENQUEUE_BATCH_RECIPIENTS_MAX, FETCH_WAIT_CHANNELS_MAX};
    let req = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::EnqueueBatch {
            recipient_keys: (0..ENQUEUE_BATCH_RECIPIENTS_MAX)
                .map(|i| IdentityKey([(i % 256) as u8; 32]))
                .collect(),
            channel_id: chan(&[2; 16]),
            payload: vec![3; PAYLOAD_BYTES_MAX],
            message_id: mid(4),
        },
    };
    let bytes = encode_request(&req);
    assert!(bytes.len() <= REQUEST_BYTES_MAX, "{} bytes", bytes.len());
    assert_eq!(decode_request(&bytes), Ok(req));
    let req = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::FetchWaitChannels {
            recipient_key: key(1),
            cursors: (0..FETCH_WAIT_CHANNELS_MAX)
                .map(|i| (chan(&[(i % 256) as u8; 16]), u64::MAX))
                .collect(),
            limit: 1,
            timeout_ms: 1,
        },
    };
    let bytes = encode_request(&req);
    assert!(bytes.len() <= REQUEST_BYTES_MAX, "{} bytes", bytes.len());
    assert_eq!(decode_request(&bytes), Ok(req));
    // The largest enqueueMany: the most recipients, the most messages
    // their entries allow, the most payload bytes.
    use quicproquo_core::limits::{
        ENQUEUE_MANY_BYTES_MAX, ENQUEUE_MANY_ENTRIES_MAX, ENQUEUE_MANY_MESSAGES_MAX,
    };
    let messages =
        (ENQUEUE_MANY_ENTRIES_MAX / ENQUEUE_BATCH_RECIPIENTS_MAX).min(ENQUEUE_MANY_MESSAGES_MAX);
    let req = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::EnqueueMany {
            recipient_keys: (0..ENQUEUE_BATCH_RECIPIENTS_MAX)
                .map(|i| IdentityKey([(i % 256) as u8; 32]))
                .collect(),
            channel_id: chan(&[2; 16]),
            messages: (0..messages)
                .map(|i| Outgoing {
                    payload: vec![3; ENQUEUE_MANY_BYTES_MAX / messages],
                    message_id: mid(i as u8),
                })
                .collect(),
        },
    };
    let bytes = encode_request(&req);
    assert!(bytes.len() <= REQUEST_BYTES_MAX, "{} bytes", bytes.len());
    assert_eq!(decode_request(&bytes), Ok(req));
    let req = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::EnqueueMany {
            recipient_keys: vec![key(1)],
            channel_id: chan(&[2; 16]),
            messages: (0..ENQUEUE_MANY_MESSAGES_MAX)
                .map(|i| Outgoing {
                    payload: vec![3; ENQUEUE_MANY_BYTES_MAX / ENQUEUE_MANY_MESSAGES_MAX],
                    message_id: mid(i as u8),
                })
                .collect(),
        },
    };
    let bytes = encode_request(&req);
    assert!(bytes.len() <= REQUEST_BYTES_MAX, "{} bytes", bytes.len());
    assert_eq!(decode_request(&bytes), Ok(req));
    // One message too many is refused by the decoder itself.
    let bytes = encode_request(&Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::EnqueueMany {
            recipient_keys: vec![key(1)],
            channel_id: ChannelId::DEFAULT,
            messages: (0..=ENQUEUE_MANY_MESSAGES_MAX)
                .map(|i| Outgoing {
                    payload: vec![1],
                    message_id: mid(i as u8),
                })
                .collect(),
        },
    });
    assert!(matches!(
        decode_request(&bytes),
        Err(DecodeError::Invalid(e)) if e.kind == ErrorKind::InvalidArgument
    ));
    // One recipient or channel too many is refused by the decoder itself.
    let mut too_many = RequestBody::EnqueueBatch {
        recipient_keys: vec![key(1); ENQUEUE_BATCH_RECIPIENTS_MAX + 1],
        channel_id: ChannelId::DEFAULT,
        payload: vec![1],
        message_id: mid(1),
    };
    for _ in 0..2 {
        let bytes = encode_request(&Request {
            auth_version: AUTH_VERSION,
            body: too_many.clone(),
        });
        let err = decode_request(&bytes).unwrap_err().to_service_error();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
        too_many = RequestBody::FetchWaitChannels {
            recipient_key: key(1),
            cursors: vec![(ChannelId::DEFAULT, 0); FETCH_WAIT_CHANNELS_MAX + 1],
            limit: 1,
            timeout_ms: 1,
        };
    }
}

#[test]
fn largest_channel_messages_reply_fits_the_reply_limit() {
    use quicproquo_core::limits::FETCH_WAIT_CHANNELS_MAX;
    use quicproquo_core::node::ChannelMessages;
    // The core's budget holds across channels: FETCH_LIMIT_MAX messages and
    // max(budget, one payload) bytes in all, spread over every channel.
    let total = FETCH_RESPONSE_BYTES_MAX + PAYLOAD_BYTES_MAX;
    let per_channel = FETCH_LIMIT_MAX as usize / FETCH_WAIT_CHANNELS_MAX;
    let each = (total / FETCH_LIMIT_MAX as usize) / 8 * 8 + 1;
    let channels: Vec<_> = (0..FETCH_WAIT_CHANNELS_MAX)
        .map(|c| ChannelMessages {
            channel_id: chan(&[(c % 256) as u8; 16]),
            messages: (0..per_channel as u64)
                .map(|seq| QueuedMessage {
                    seq,
                    payload: vec![7; each],
                })
                .collect(),
            next_seq: u64::MAX,
            gap: None,
        })
        .collect();
    let reply: Reply = Ok(Response::ChannelMessages { channels });
    let bytes = encode_reply(&reply);
    assert!(bytes.len() <= REPLY_BYTES_MAX, "{} bytes", bytes.len());
    assert_eq!(decode_reply(&bytes), Ok(reply));
}

#[test]
fn auth_version_is_carried_verbatim() {
    for auth_version in [0, AUTH_VERSION, u16::MAX] {
        let req = Request {
            auth_version,
            body: RequestBody::AuthChallenge,
        };
        assert_eq!(decode_request(&encode_request(&req)), Ok(req));
    }
}

#[test]
fn every_response_round_trips() {
    check_reply(Ok(Response::AuthChallenge {
        nonce: [1; AUTH_NONCE_BYTES],
    }));
    check_reply(Ok(Response::Authenticated));
    check_reply(Ok(Response::KeyPackageUploaded {
        fingerprint: [2; 32],
    }));
    for last_resort in [false, true] {
        check_reply(Ok(Response::KeyPackage {
            package: vec![3; 299],
            last_resort,
        }));
    }
    check_reply(Ok(Response::KeyPackageCount {
        count: u32::MAX,
        has_last_resort: true,
    }));
    check_reply(Ok(Response::KeyPackageCount {
        count: 0,
        has_last_resort: false,
    }));
    check_reply(Ok(Response::HybridKeyUploaded));
    check_reply(Ok(Response::HybridKey {
        hybrid_key: vec![4; 1216],
        signature: sig(5),
    }));
    check_reply(Ok(Response::Enqueued { seq: u64::MAX }));
    check_reply(Ok(Response::Messages {
        messages: Vec::new(),
        next_seq: 1,
        gap: None,
    }));
    check_reply(Ok(Response::Messages {
        messages: (1..=5)
            .map(|seq| QueuedMessage {
                seq,
                payload: vec![seq as u8; seq as usize * 3],
            })
            .collect(),
        next_seq: 6,
        gap: None,
    }));
    check_reply(Ok(Response::Messages {
        messages: vec![QueuedMessage {
            seq: 9,
            payload: vec![1],
        }],
        next_seq: 10,
        gap: Some(quicproquo_core::node::Gap { from: 3, to: 8 }),
    }));
    check_reply(Ok(Response::EnqueuedBatch { seqs: Vec::new() }));
    check_reply(Ok(Response::EnqueuedBatch {
        seqs: vec![1, u64::MAX, 7],
    }));
    // The largest answer: an enqueueMany's every entry.
    let most = quicproquo_core::limits::ENQUEUE_MANY_ENTRIES_MAX
        .max(quicproquo_core::limits::ENQUEUE_BATCH_RECIPIENTS_MAX);
    let seqs: Vec<u64> = (1..=most as u64).collect();
    let reply = Ok(Response::EnqueuedBatch { seqs: seqs.clone() });
    assert_eq!(decode_reply(&encode_reply(&reply)), Ok(reply));
    let mut one_more = seqs;
    one_more.push(0);
    assert!(matches!(
        decode_reply(&encode_reply(&Ok(Response::EnqueuedBatch {
            seqs: one_more
        }))),
        Err(DecodeError::Invalid(_))
    ));
    check_reply(Ok(Response::ChannelMessages {
        channels: Vec::new(),
    }));
    check_reply(Ok(Response::ChannelMessages {
        channels: (0..3u8)
            .map(|c| quicproquo_core::node::ChannelMessages {
                channel_id: chan(&vec![c; usize::from(c) * 5]),
                messages: (1..=u64::from(c))
                    .map(|seq| QueuedMessage {
                        seq,
                        payload: vec![c; 9],
                    })
                    .collect(),
                next_seq: 99,
                gap: None,
            })
            .collect(),
    }));
}

#[test]
fn every_error_kind_round_trips() {
    let kinds = [
        ErrorKind::InvalidArgument,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::NotFound,
        ErrorKind::PayloadTooLarge,
        ErrorKind::RateLimited {
            retry_after_ms: 1_500,
        },
        ErrorKind::RateLimited { retry_after_ms: 0 },
        ErrorKind::QueueFull,
        ErrorKind::StaleEpoch { current_epoch: 42 },
        ErrorKind::StaleEpoch {
            current_epoch: u64::MAX,
        },
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];
    for kind in kinds {
        check_reply(Err(ServiceError::new(kind, "what went wrong")));
    }
    check_reply(Err(ServiceError::not_found("")));
    check_reply(Err(ServiceError::internal("ünïcødé ✓ message")));
}

#[test]
fn largest_enqueue_fits_the_request_limit() {
    let req = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Enqueue {
            recipient_key: key(1),
            channel_id: chan(&[2; 16]),
            payload: vec![3; PAYLOAD_BYTES_MAX],
            message_id: mid(4),
        },
    };
    let bytes = encode_request(&req);
    assert!(bytes.len() <= REQUEST_BYTES_MAX);
    assert_eq!(segment_count(&bytes), 1);
    assert_eq!(decode_request(&bytes), Ok(req));
}

#[test]
fn largest_fetch_reply_fits_the_reply_limit() {
    // The core returns at most FETCH_LIMIT_MAX messages whose payloads
    // total at most max(budget, one payload); this is more than both, and
    // every payload length is 1 mod 8, the worst case for padding.
    let total = FETCH_RESPONSE_BYTES_MAX + PAYLOAD_BYTES_MAX;
    let each = (total / FETCH_LIMIT_MAX as usize) / 8 * 8 + 1;
    let messages: Vec<_> = (0..u64::from(FETCH_LIMIT_MAX))
        .map(|seq| QueuedMessage {
            seq,
            payload: vec![7; each],
        })
        .collect();
    let reply: Reply = Ok(Response::Messages {
        messages,
        next_seq: u64::from(FETCH_LIMIT_MAX),
        gap: None,
    });
    let bytes = encode_reply(&reply);
    assert!(bytes.len() <= REPLY_BYTES_MAX, "{} bytes", bytes.len());
    assert_eq!(segment_count(&bytes), 1);
    assert_eq!(decode_reply(&bytes), Ok(reply));
}

#[test]
fn multi_segment_messages_from_other_encoders_decode() {
    let req = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Enqueue {
            recipient_key: key(1),
            channel_id: chan(&[2; 9]),
            payload: vec![3; 100],
            message_id: mid(4),
        },
    };
    // A one-word first segment forces every object into a later segment,
    // reached through far pointers.
    let mut builder = capnp::message::Builder::new(
        HeapAllocator::new()
            .first_segment_words(1)
            .allocation_strategy(capnp::message::AllocationStrategy::FixedSize),
    );
    request::to_wire(&req, builder.init_root());
    let bytes = serialize::write_message_to_words(&builder);
    assert!(segment_count(&bytes) > 2);
    assert_eq!(decode_request(&bytes), Ok(req));
}

#[test]
fn unaligned_input_decodes() {
    let req = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::FetchKeyPackage {
            identity_key: key(9),
            cipher_suite: 0,
        },
    };
    let mut shifted = vec![0u8];
    shifted.extend(encode_request(&req));
    assert_eq!(decode_request(&shifted[1..]), Ok(req));
}

// ------------------------------------------------------------ field validation

#[test]
fn wrong_length_fields_are_invalid_argument_with_the_core_message() {
    let key_err = |len: usize| IdentityKey::try_from_slice(&vec![0; len]).unwrap_err();
    let sig_err = |len: usize| Signature::try_from_slice(&vec![0; len]).unwrap_err();
    let mid_err = |len: usize| MessageId::try_from_slice(&vec![0; len]).unwrap_err();
    let chan_err = |len: usize| ChannelId::try_from_slice(&vec![0; len]).unwrap_err();

    for len in [0, 31, 33, 64] {
        check_invalid_request(key_err(len), |b| {
            let mut g = b.init_authenticate();
            g.set_identity_key(&vec![0; len]);
            g.set_signature(&[0; 64]);
        });
        check_invalid_request(key_err(len), |b| {
            b.init_fetch_key_package().set_identity_key(&vec![0; len]);
        });
        check_invalid_request(key_err(len), |b| {
            b.init_key_package_count().set_identity_key(&vec![0; len]);
        });
        check_invalid_request(key_err(len), |b| {
            b.init_fetch_hybrid_key().set_identity_key(&vec![0; len]);
        });
        check_invalid_request(key_err(len), |b| {
            let mut g = b.init_upload_key_package();
            g.set_identity_key(&vec![0; len]);
            g.set_package(&[1]);
        });
        check_invalid_request(key_err(len), |b| {
            let mut g = b.init_enqueue();
            g.set_recipient_key(&vec![0; len]);
            g.set_message_id(&[0; 16]);
        });
        check_invalid_request(key_err(len), |b| {
            b.init_fetch().set_recipient_key(&vec![0; len]);
        });
        check_invalid_request(key_err(len), |b| {
            b.init_fetch_wait().set_recipient_key(&vec![0; len]);
        });
    }
    for len in [0, 63, 65] {
        check_invalid_request(sig_err(len), |b| {
            let mut g = b.init_authenticate();
            g.set_identity_key(&[0; 32]);
            g.set_signature(&vec![0; len]);
        });
        check_invalid_request(sig_err(len), |b| {
            let mut g = b.init_upload_hybrid_key();
            g.set_identity_key(&[0; 32]);
            g.set_signature(&vec![0; len]);
        });
    }
    for len in [0, 15, 17] {
        check_invalid_request(mid_err(len), |b| {
            let mut g = b.init_enqueue();
            g.set_recipient_key(&[0; 32]);
            g.set_message_id(&vec![0; len]);
        });
    }
    for len in [17, 32] {
        check_invalid_request(chan_err(len), |b| {
            let mut g = b.init_enqueue();
            g.set_recipient_key(&[0; 32]);
            g.set_channel_id(&vec![0; len]);
            g.set_message_id(&[0; 16]);
        });
        check_invalid_request(chan_err(len), |b| {
            let mut g = b.init_fetch();
            g.set_recipient_key(&[0; 32]);
            g.set_channel_id(&vec![0; len]);
        });
        check_invalid_request(chan_err(len), |b| {
            let mut g = b.init_fetch_wait();
            g.set_recipient_key(&[0; 32]);
            g.set_channel_id(&vec![0; len]);
        });
    }
}

#[test]
fn wrong_length_reply_fields_are_invalid() {
    check_invalid_reply(|ok| {
        ok.init_auth_challenge().set_nonce(&[0; 31]);
    });
    check_invalid_reply(|ok| {
        ok.init_key_package_uploaded().set_fingerprint(&[0; 33]);
    });
    check_invalid_reply(|ok| {
        let mut g = ok.init_hybrid_key();
        g.set_hybrid_key(&[1; 10]);
        g.set_signature(&[0; 63]);
    });
    // A gap that is not a range of seqs.
    for (from, to) in [(5, 4), (0, 3), (7, 0)] {
        check_invalid_reply(|ok| {
            let mut g = ok.init_messages();
            g.set_gap_from(from);
            g.set_gap_to(to);
        });
    }
}

#[test]
fn reply_with_more_messages_than_a_fetch_returns_is_refused() {
    let messages = (0..=u64::from(FETCH_LIMIT_MAX))
        .map(|seq| QueuedMessage {
            seq,
            payload: Vec::new(),
        })
        .collect();
    let bytes = encode_reply(&Ok(Response::Messages {
        messages,
        next_seq: 0,
        gap: None,
    }));
    check_decode_error(decode_reply(&bytes), ErrorKind::InvalidArgument);
}

#[test]
fn error_message_must_be_utf8() {
    let mut bytes = encode_reply(&Err(ServiceError::internal("abc")));
    let at = find(&bytes, b"abc");
    bytes[at] = 0xff;
    assert!(matches!(
        decode_reply(&bytes),
        Err(DecodeError::Malformed(m)) if m.contains("UTF-8")
    ));
}

// ------------------------------------------------------------ unknown members

#[test]
fn unknown_method_is_refused_as_unknown_method() {
    for tag in [13, 14, u16::MAX] {
        let mut bytes = encode_request(&Request {
            auth_version: AUTH_VERSION,
            body: RequestBody::AuthChallenge,
        });
        // Request.body's tag: bits [16, 32) of the root struct, which our
        // encoder places right after the root pointer (byte 16).
        patch_u16(&mut bytes, REQUEST_BODY_TAG_AT, 0, tag);
        let err = decode_request(&bytes).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownVariant {
                what: "method",
                discriminant: tag
            }
        );
        let service = err.to_service_error();
        assert_eq!(service.kind, ErrorKind::InvalidArgument);
        assert!(service.message.contains(&format!("unknown method {tag}")));
    }
}

#[test]
fn unknown_reply_members_are_refused() {
    let mut bytes = encode_reply(&Ok(Response::Authenticated));
    patch_u16(&mut bytes, RESPONSE_OK_TAG_AT, 1, 11);
    assert_eq!(
        decode_reply(&bytes),
        Err(DecodeError::UnknownVariant {
            what: "response",
            discriminant: 11
        })
    );

    let mut bytes = encode_reply(&Ok(Response::Authenticated));
    patch_u16(&mut bytes, RESPONSE_TAG_AT, 0, 2);
    assert_eq!(
        decode_reply(&bytes),
        Err(DecodeError::UnknownVariant {
            what: "reply",
            discriminant: 2
        })
    );

    let mut bytes = encode_reply(&Err(ServiceError::internal("x")));
    patch_u16(&mut bytes, ERROR_KIND_TAG_AT, 9, 10);
    assert_eq!(
        decode_reply(&bytes),
        Err(DecodeError::UnknownVariant {
            what: "error kind",
            discriminant: 10
        })
    );
}

// ----------------------------------------------------------------- framing

#[test]
fn empty_and_short_input_is_malformed() {
    for len in 0..16 {
        let bytes = vec![0u8; len];
        check_both_fail(&bytes, ErrorKind::InvalidArgument);
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = encode_request(&Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Enqueue {
            recipient_key: key(1),
            channel_id: chan(&[2; 16]),
            payload: vec![3; 100],
            message_id: mid(4),
        },
    });
    for len in 0..bytes.len() {
        check_decode_error(decode_request(&bytes[..len]), ErrorKind::InvalidArgument);
    }
    let bytes = encode_reply(&Ok(Response::Messages {
        messages: vec![QueuedMessage {
            seq: 1,
            payload: vec![2; 30],
        }],
        next_seq: 2,
        gap: None,
    }));
    for len in 0..bytes.len() {
        check_decode_error(decode_reply(&bytes[..len]), ErrorKind::InvalidArgument);
    }
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut bytes = encode_request(&Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::AuthChallenge,
    });
    bytes.extend([0; 8]);
    check_decode_error(decode_request(&bytes), ErrorKind::InvalidArgument);
}

#[test]
fn oversize_input_is_payload_too_large_before_parsing() {
    // Zeros would be a valid message prefix; the length alone refuses it.
    let bytes = vec![0u8; REQUEST_BYTES_MAX + 1];
    let err = decode_request(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            len: REQUEST_BYTES_MAX + 1,
            max: REQUEST_BYTES_MAX
        }
    );
    assert_eq!(err.to_service_error().kind, ErrorKind::PayloadTooLarge);
    let bytes = vec![0u8; REPLY_BYTES_MAX + 1];
    check_decode_error(decode_reply(&bytes), ErrorKind::PayloadTooLarge);
}

#[test]
fn segment_table_is_checked_before_use() {
    // 2^32 segments (count - 1 = u32::MAX), more than allowed.
    check_both_fail(
        &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
        ErrorKind::InvalidArgument,
    );
    // SEGMENTS_MAX + 1 segments.
    let mut bytes = (SEGMENTS_MAX as u32).to_le_bytes().to_vec();
    bytes.resize(1024, 0);
    check_both_fail(&bytes, ErrorKind::InvalidArgument);
    // 40 segments whose table does not fit in the 16 bytes given.
    let mut bytes = 39u32.to_le_bytes().to_vec();
    bytes.resize(16, 0);
    check_both_fail(&bytes, ErrorKind::InvalidArgument);
    // A segment claiming 2^32 - 1 words in a short input.
    check_both_fail(
        &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0],
        ErrorKind::InvalidArgument,
    );
}

#[test]
fn garbage_is_refused() {
    let garbage: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for len in [1, 7, 8, 9, 64, 1000, 4096] {
        let bytes = &garbage[..len];
        // Whatever the outcome, it is not a panic.
        let _ = decode_request(bytes);
        let _ = decode_reply(bytes);
    }
    check_both_fail(
        b"hello, world, not capnp at all!!",
        ErrorKind::InvalidArgument,
    );
}

// ------------------------------------------------------------ hostile pointers

#[test]
fn aliased_payload_pointers_hit_the_traversal_limit() {
    // A fetch reply of `n` messages whose payload pointers all aim at one
    // 64 KiB blob: 80 KiB on the wire, 64 MiB if copied out naively.
    let blob_bytes = 64 * 1024;
    let aliased = |n: u32| {
        let mut words = vec![0u64; 7 + 2 * n as usize];
        words[0] = struct_ptr(0, 3, 2); // root -> Response at word 1
        words[1] = 8; // ok tag = messages
        words[4] = list_ptr(1, INLINE_COMPOSITE, 2 * n); // -> tag at word 6
        words[6] = struct_ptr(n as i32, 1, 1); // n elements of 1 data + 1 ptr
        let blob = words.len();
        for i in 0..n as usize {
            words[7 + 2 * i] = i as u64; // seq
            let at = 8 + 2 * i;
            words[at] = list_ptr((blob - at - 1) as i32, BYTE, blob_bytes);
        }
        words.resize(blob + blob_bytes as usize / 8, 0x0101_0101_0101_0101);
        message(&[&words])
    };
    // Two aliases cost about as much as the message: accepted.
    assert!(matches!(
        decode_reply(&aliased(2)),
        Ok(Ok(Response::Messages { messages, .. })) if messages.len() == 2
    ));
    // A thousand are refused once they have cost twice the message's size.
    let err = decode_reply(&aliased(1000)).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Malformed(m) if m.contains("limit")),
        "{err}"
    );
    assert_eq!(err.to_service_error().kind, ErrorKind::InvalidArgument);
}

#[test]
fn list_of_zero_sized_structs_is_refused() {
    // A messages list claiming 2^29 - 1 structs of no size at all, in 48
    // bytes: an attempt to make the decoder loop or allocate per element.
    let words = [
        struct_ptr(0, 3, 2),
        8,
        0,
        0,
        list_ptr(1, INLINE_COMPOSITE, 0),
        0,
        struct_ptr((1 << 29) - 1, 0, 0),
    ];
    check_decode_error(
        decode_reply(&message(&[&words])),
        ErrorKind::InvalidArgument,
    );
}

#[test]
fn pointer_cycles_are_refused_or_harmless() {
    // A Response whose first pointer points at the Response itself: read as
    // a nonce, it is a struct where a list belongs.
    let words = [struct_ptr(0, 3, 2), 0, 0, 0, struct_ptr(-4, 3, 2), 0];
    check_decode_error(
        decode_reply(&message(&[&words])),
        ErrorKind::InvalidArgument,
    );
    // A Request whose body points at itself as the identity key.
    let words = [
        struct_ptr(0, 3, 4),
        3 << 16,
        0,
        0,
        struct_ptr(-4, 3, 4),
        0,
        0,
        0,
    ];
    check_decode_error(
        decode_request(&message(&[&words])),
        ErrorKind::InvalidArgument,
    );
}

#[test]
fn far_pointers_are_followed_only_when_valid() {
    let landing_pad_to_request = [struct_ptr(0, 3, 4), 0, 0, 0, 0, 0, 0, 0];
    // A valid single far pointer: seg 0 word 0 -> landing pad in seg 1.
    let ok = message(&[&[far_ptr(1, 0, false)], &landing_pad_to_request]);
    assert_eq!(
        decode_request(&ok),
        Ok(Request {
            auth_version: 0,
            body: RequestBody::AuthChallenge
        })
    );
    // A far pointer to a segment that does not exist.
    let bad = message(&[&[far_ptr(7, 0, false)]]);
    check_decode_error(decode_request(&bad), ErrorKind::InvalidArgument);
    // A far pointer past the end of its target segment.
    let bad = message(&[&[far_ptr(1, 100, false)], &landing_pad_to_request]);
    check_decode_error(decode_request(&bad), ErrorKind::InvalidArgument);
    // A landing pad that is itself a far pointer, and one pointing at itself.
    let bad = message(&[&[far_ptr(1, 0, false)], &[far_ptr(0, 0, false)]]);
    check_decode_error(decode_request(&bad), ErrorKind::InvalidArgument);
    let bad = message(&[&[far_ptr(0, 0, false)]]);
    check_decode_error(decode_request(&bad), ErrorKind::InvalidArgument);
    // A double-far landing pad whose tag is not a plain pointer.
    let bad = message(&[
        &[far_ptr(1, 0, true)],
        &[far_ptr(0, 0, false), far_ptr(0, 0, false)],
    ]);
    check_decode_error(decode_request(&bad), ErrorKind::InvalidArgument);
}

#[test]
fn deep_nesting_stops_at_the_nesting_limit() {
    // A chain of `depth` structs, each holding one pointer to the next.
    let chain = |depth: usize| {
        let mut words = vec![0u64; depth + 1];
        for w in words.iter_mut().take(depth) {
            *w = struct_ptr(0, 0, 1);
        }
        message(&[&words])
    };
    let target_size = |bytes: &[u8]| {
        let mut rest = bytes;
        let msg = serialize::read_message_from_flat_slice(&mut rest, reader_options(bytes.len()))
            .expect("well-framed");
        msg.get_root::<capnp::any_pointer::Reader<'_>>()
            .and_then(|root| root.target_size())
    };
    // A generic walk of such a message is cut off by our nesting limit.
    assert!(target_size(&chain(NESTING_LIMIT as usize - 1)).is_ok());
    let err = target_size(&chain(NESTING_LIMIT as usize + 1)).unwrap_err();
    assert!(err.to_string().contains("nested"), "{err}");
    // Our decoders never walk recursively; the chain is just a request or
    // reply with unexpected contents, decoded without panicking.
    let deep = chain(200);
    let _ = decode_request(&deep);
    let _ = decode_reply(&deep);
}

#[test]
fn reader_options_scale_with_the_byte_limit() {
    let options = reader_options(REQUEST_BYTES_MAX);
    assert_eq!(
        options.traversal_limit_in_words,
        Some(REQUEST_BYTES_MAX / 8 * TRAVERSAL_WORDS_PER_MESSAGE_WORD)
    );
    assert_eq!(options.nesting_limit, NESTING_LIMIT);
    assert_eq!(reader_options(9).traversal_limit_in_words, Some(4));
    // No overflow at the extreme.
    assert_eq!(
        reader_options(usize::MAX).traversal_limit_in_words,
        Some(usize::MAX.div_ceil(8) * 2)
    );
}

#[test]
fn to_service_error_maps_each_decode_error() {
    let invalid = ServiceError::invalid_argument("identity key must be 32 bytes, got 3");
    assert_eq!(
        DecodeError::Invalid(invalid.clone()).to_service_error(),
        invalid
    );
    let malformed = DecodeError::Malformed("bad".into()).to_service_error();
    assert_eq!(malformed.kind, ErrorKind::InvalidArgument);
    assert_eq!(malformed.message, "malformed message: bad");
    let too_large = DecodeError::TooLarge { len: 9, max: 8 }.to_service_error();
    assert_eq!(too_large.kind, ErrorKind::PayloadTooLarge);
}

// ------------------------------------------------------------------- proptest

proptest! {
    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = decode_request(&bytes);
        let _ = decode_reply(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_mutated_messages(
        req in arb_request(),
        reply in arb_reply(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        for mut bytes in [encode_request(&req), encode_reply(&reply)] {
            for (at, byte) in &flips {
                let i = at.index(bytes.len());
                bytes[i] ^= byte | 1;
            }
            let _ = decode_request(&bytes);
            let _ = decode_reply(&bytes);
            let len = cut.index(bytes.len());
            let _ = decode_request(&bytes[..len]);
            let _ = decode_reply(&bytes[..len]);
        }
    }

    #[test]
    fn request_round_trips(req in arb_request()) {
        let bytes = encode_request(&req);
        prop_assert_eq!(segment_count(&bytes), 1);
        prop_assert_eq!(decode_request(&bytes), Ok(req));
    }

    #[test]
    fn reply_round_trips(reply in arb_reply()) {
        let bytes = encode_reply(&reply);
        prop_assert_eq!(segment_count(&bytes), 1);
        prop_assert_eq!(decode_reply(&bytes), Ok(reply));
    }
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

fn arb_key() -> impl Strategy<Value = IdentityKey> {
    any::<[u8; 32]>().prop_map(IdentityKey)
}

fn arb_signature() -> impl Strategy<Value = Signature> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut s = [0; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        Signature(s)
    })
}

fn arb_channel() -> impl Strategy<Value = ChannelId> {
    arb_bytes(16).prop_map(|b| chan(&b))
}

fn arb_request() -> impl Strategy<Value = Request> {
    let body = prop_oneof![
        Just(RequestBody::AuthChallenge),
        (arb_key(), arb_signature()).prop_map(|(identity_key, signature)| {
            RequestBody::Authenticate {
                identity_key,
                signature,
            }
        }),
        (arb_key(), arb_bytes(300), any::<bool>()).prop_map(
            |(identity_key, package, last_resort)| RequestBody::UploadKeyPackage {
                identity_key,
                package,
                last_resort,
                cipher_suite: 0,
            }
        ),
        arb_key().prop_map(|identity_key| RequestBody::FetchKeyPackage {
            identity_key,
            cipher_suite: 0,
        }),
        arb_key().prop_map(|identity_key| RequestBody::KeyPackageCount {
            identity_key,
            cipher_suite: 0,
        }),
        (arb_key(), arb_bytes(300), arb_signature()).prop_map(
            |(identity_key, hybrid_key, signature)| RequestBody::UploadHybridKey {
                identity_key,
                hybrid_key,
                signature,
            }
        ),
        arb_key().prop_map(|identity_key| RequestBody::FetchHybridKey { identity_key }),
        (arb_key(), arb_channel(), arb_bytes(300), any::<[u8; 16]>()).prop_map(
            |(recipient_key, channel_id, payload, id)| RequestBody::Enqueue {
                recipient_key,
                channel_id,
                payload,
                message_id: MessageId(id),
            }
        ),
        (arb_key(), arb_channel(), any::<u64>(), any::<u32>()).prop_map(
            |(recipient_key, channel_id, after_seq, limit)| RequestBody::Fetch {
                recipient_key,
                channel_id,
                after_seq,
                limit,
            }
        ),
        (
            arb_key(),
            arb_channel(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(recipient_key, channel_id, after_seq, limit, timeout_ms)| {
                    RequestBody::FetchWait {
                        recipient_key,
                        channel_id,
                        after_seq,
                        limit,
                        timeout_ms,
                    }
                }
            ),
        (
            proptest::collection::vec(arb_key(), 0..5),
            arb_channel(),
            arb_bytes(300),
            any::<[u8; 16]>()
        )
            .prop_map(|(recipient_keys, channel_id, payload, id)| {
                RequestBody::EnqueueBatch {
                    recipient_keys,
                    channel_id,
                    payload,
                    message_id: MessageId(id),
                }
            }),
        (
            arb_key(),
            proptest::collection::vec((arb_channel(), any::<u64>()), 0..5),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(|(recipient_key, cursors, limit, timeout_ms)| {
                RequestBody::FetchWaitChannels {
                    recipient_key,
                    cursors,
                    limit,
                    timeout_ms,
                }
            }),
    ];
    (any::<u16>(), body).prop_map(|(auth_version, body)| Request { auth_version, body })
}

fn arb_error_kind() -> impl Strategy<Value = ErrorKind> {
    prop_oneof![
        Just(ErrorKind::InvalidArgument),
        Just(ErrorKind::Unauthenticated),
        Just(ErrorKind::PermissionDenied),
        Just(ErrorKind::NotFound),
        Just(ErrorKind::PayloadTooLarge),
        any::<u64>().prop_map(|retry_after_ms| ErrorKind::RateLimited { retry_after_ms }),
        Just(ErrorKind::QueueFull),
        any::<u64>().prop_map(|current_epoch| ErrorKind::StaleEpoch { current_epoch }),
        Just(ErrorKind::Unavailable),
        Just(ErrorKind::Internal),
    ]
}

fn arb_reply() -> impl Strategy<Value = Reply> {
    let messages = proptest::collection::vec(
        (any::<u64>(), arb_bytes(64)).prop_map(|(seq, payload)| QueuedMessage { seq, payload }),
        0..8,
    );
    prop_oneof![
        any::<[u8; AUTH_NONCE_BYTES]>().prop_map(|nonce| Ok(Response::AuthChallenge { nonce })),
        Just(Ok(Response::Authenticated)),
        any::<[u8; 32]>().prop_map(|fingerprint| Ok(Response::KeyPackageUploaded { fingerprint })),
        (arb_bytes(300), any::<bool>()).prop_map(|(package, last_resort)| Ok(
            Response::KeyPackage {
                package,
                last_resort
            }
        )),
        (any::<u32>(), any::<bool>()).prop_map(|(count, has_last_resort)| Ok(
            Response::KeyPackageCount {
                count,
                has_last_resort
            }
        )),
        Just(Ok(Response::HybridKeyUploaded)),
        (arb_bytes(300), arb_signature()).prop_map(|(hybrid_key, signature)| Ok(
            Response::HybridKey {
                hybrid_key,
                signature
            }
        )),
        any::<u64>().prop_map(|seq| Ok(Response::Enqueued { seq })),
        (messages, any::<u64>()).prop_map(|(messages, next_seq)| Ok(Response::Messages {
            messages,
            next_seq,
            gap: None,
        })),
        (arb_error_kind(), ".{0,40}")
            .prop_map(|(kind, message)| Err(ServiceError::new(kind, message))),
    ]
}

// -------------------------------------------------------------------- helpers

/// Encodes `body`, checks it is one segment, and decodes it back.
fn check_request(body: RequestBody) {
    let req = Request {
        auth_version: AUTH_VERSION,
        body,
    };
    let bytes = encode_request(&req);
    assert_eq!(segment_count(&bytes), 1, "{req:?}");
    assert_eq!(decode_request(&bytes), Ok(req));
}

/// Encodes `reply`, checks it is one segment, and decodes it back.
fn check_reply(reply: Reply) {
    let bytes = encode_reply(&reply);
    assert_eq!(segment_count(&bytes), 1, "{reply:?}");
    assert_eq!(decode_reply(&bytes), Ok(reply));
}

/// Builds a request body by hand and expects exactly the core's `expected`
/// validation error, also as the server's answer.
fn check_invalid_request(
    expected: ServiceError,
    fill: impl FnOnce(node_capnp::request::body::Builder<'_>),
) {
    let mut builder = capnp::message::Builder::new_default();
    let mut root = builder.init_root::<node_capnp::request::Builder<'_>>();
    root.set_auth_version(AUTH_VERSION);
    fill(root.init_body());
    let bytes = serialize::write_message_to_words(&builder);
    let err = decode_request(&bytes).unwrap_err();
    assert_eq!(err, DecodeError::Invalid(expected.clone()));
    assert_eq!(err.to_service_error(), expected);
}

/// Builds a successful response by hand and expects `invalidArgument`.
fn check_invalid_reply(fill: impl FnOnce(node_capnp::response::ok::Builder<'_>)) {
    let mut builder = capnp::message::Builder::new_default();
    fill(
        builder
            .init_root::<node_capnp::response::Builder<'_>>()
            .init_ok(),
    );
    let bytes = serialize::write_message_to_words(&builder);
    let err = decode_reply(&bytes).unwrap_err();
    assert!(matches!(err, DecodeError::Invalid(_)), "{err:?}");
    assert_eq!(err.to_service_error().kind, ErrorKind::InvalidArgument);
}

/// Expects a decode error that the server answers with `kind`.
fn check_decode_error<T: std::fmt::Debug>(result: Result<T, DecodeError>, kind: ErrorKind) {
    match result {
        Ok(v) => panic!("decoded {v:?}, expected an error"),
        Err(e) => assert_eq!(e.to_service_error().kind, kind, "{e}"),
    }
}

/// Expects both decoders to refuse `bytes` with `kind`.
fn check_both_fail(bytes: &[u8], kind: ErrorKind) {
    check_decode_error(decode_request(bytes), kind);
    check_decode_error(decode_reply(bytes), kind);
}

fn key(b: u8) -> IdentityKey {
    IdentityKey([b; 32])
}

fn sig(b: u8) -> Signature {
    Signature([b; 64])
}

fn mid(b: u8) -> MessageId {
    MessageId([b; 16])
}

fn chan(bytes: &[u8]) -> ChannelId {
    ChannelId::try_from_slice(bytes).expect("test channel ids are at most 16 bytes")
}

/// The number of segments in a serialized message.
fn segment_count(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[..4].try_into().unwrap()) + 1
}

/// Replaces the u16 at `at`, after checking it holds `old` (so a layout
/// change fails loudly instead of patching the wrong field).
fn patch_u16(bytes: &mut [u8], at: usize, old: u16, new: u16) {
    assert_eq!(segment_count(bytes), 1);
    assert_eq!(u16::from_le_bytes([bytes[at], bytes[at + 1]]), old);
    bytes[at..at + 2].copy_from_slice(&new.to_le_bytes());
}

/// The first position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

/// Serializes raw segments with their segment table.
fn message(segments: &[&[u64]]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend((segments.len() as u32 - 1).to_le_bytes());
    for s in segments {
        out.extend((s.len() as u32).to_le_bytes());
    }
    if out.len() % 8 != 0 {
        out.extend([0; 4]);
    }
    for s in segments {
        for w in *s {
            out.extend(w.to_le_bytes());
        }
    }
    out
}

/// A struct pointer `offset` words past its own end.
fn struct_ptr(offset: i32, data_words: u16, pointers: u16) -> u64 {
    u64::from((offset as u32) << 2) | u64::from(data_words) << 32 | u64::from(pointers) << 48
}

/// A list pointer `offset` words past its own end.
fn list_ptr(offset: i32, element_size: u8, count: u32) -> u64 {
    u64::from((offset as u32) << 2 | 1) | u64::from(element_size) << 32 | u64::from(count) << 35
}

/// A far pointer to word `offset` of segment `segment`.
fn far_ptr(segment: u32, offset: u32, double: bool) -> u64 {
    2 | u64::from(double) << 2 | u64::from(offset) << 3 | u64::from(segment) << 32
}

/// List element size codes.
const BYTE: u8 = 2;
const INLINE_COMPOSITE: u8 = 7;

/// Byte offsets of union tags in our single-segment encodings: segment
/// table (8 bytes), root pointer (8), then the root struct's data; the
/// Error struct follows the 7-word Response (5 data words, 2 pointers).
const REQUEST_BODY_TAG_AT: usize = 16 + 2;
const RESPONSE_OK_TAG_AT: usize = 16;
const RESPONSE_TAG_AT: usize = 16 + 16;
const ERROR_KIND_TAG_AT: usize = 16 + 7 * 8;
