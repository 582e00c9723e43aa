//! The Protobuf side of the codec comparison: prost types generated from
//! `proto/bench.proto` (the hot path of the Cap'n Proto schema, by
//! `build.rs`) and their conversion to and from the core's [`Request`] and
//! [`Reply`], so the `codec` benches put the same values through both codecs.
//! Nothing speaks this format on the network.
//!
//! Covered: enqueue and fetch requests; enqueued, messages and error replies.
//! Any other method or response is [`Unsupported`] on encode; on decode the
//! schema has no field for it.
//!
//! The decoders do the work `quicproquo_proto`'s decoders do, so their
//! figures compare: refuse input over the same size limits before parsing,
//! parse every fixed-size field into the core's types once (a wrong length is
//! [`DecodeError::Invalid`] with the core's error), refuse a message list
//! longer than a fetch may return and a gap that is not a range, and never
//! panic. The encoders take the value by move: prost's messages own their
//! fields, and a server owns the reply it sends, so payloads move into the
//! message instead of being copied.

use std::borrow::Cow;
use std::fmt;

use prost::Message;
use quicproquo_core::limits::FETCH_LIMIT_MAX;
use quicproquo_core::node::{Gap, QueuedMessage, Reply, Request, RequestBody, Response};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use quicproquo_core::{ErrorKind, ServiceError};
use quicproquo_proto::{DecodeError, REPLY_BYTES_MAX, REQUEST_BYTES_MAX};

/// The prost types of `proto/bench.proto` (package `quicproquo.bench`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/quicproquo.bench.rs"));
}

/// Serializes a request as one Protobuf `Request` message.
pub fn encode_request(request: Request) -> Result<Vec<u8>, Unsupported> {
    Ok(request_to_wire(request)?.encode_to_vec())
}

/// Parses a request as the server would; never panics.
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    check_len(bytes, REQUEST_BYTES_MAX)?;
    request_from_wire(wire::Request::decode(bytes).map_err(malformed)?)
}

/// Serializes a reply as one Protobuf `Response` message.
pub fn encode_reply(reply: Reply) -> Result<Vec<u8>, Unsupported> {
    Ok(reply_to_wire(reply)?.encode_to_vec())
}

/// Parses a reply as the client would; never panics.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, DecodeError> {
    check_len(bytes, REPLY_BYTES_MAX)?;
    reply_from_wire(wire::Response::decode(bytes).map_err(malformed)?)
}

/// A method or response `proto/bench.proto` does not carry (it holds the
/// hot path only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported {
    /// The method or response, as the Cap'n Proto schema names it.
    pub what: &'static str,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not in the Protobuf bench schema", self.what)
    }
}

impl std::error::Error for Unsupported {}

/// The core's request as a prost message; byte fields move, not copy.
pub fn request_to_wire(request: Request) -> Result<wire::Request, Unsupported> {
    use wire::request::Body;
    let body = match request.body {
        RequestBody::Enqueue {
            recipient_key,
            channel_id,
            payload,
            message_id,
        } => Body::Enqueue(wire::Enqueue {
            recipient_key: recipient_key.0.to_vec(),
            channel_id: channel_id.as_bytes().to_vec(),
            payload,
            message_id: message_id.0.to_vec(),
        }),
        RequestBody::Fetch {
            recipient_key,
            channel_id,
            after_seq,
            limit,
        } => Body::Fetch(wire::Fetch {
            recipient_key: recipient_key.0.to_vec(),
            channel_id: channel_id.as_bytes().to_vec(),
            after_seq,
            limit,
        }),
        other => {
            return Err(Unsupported {
                what: other.method(),
            });
        }
    };
    Ok(wire::Request {
        auth_version: u32::from(request.auth_version),
        body: Some(body),
    })
}

/// A prost request as the core's, every fixed-size field parsed.
pub fn request_from_wire(request: wire::Request) -> Result<Request, DecodeError> {
    use wire::request::Body;
    let auth_version = u16::try_from(request.auth_version).map_err(|_| {
        invalid(format!(
            "auth version {} does not fit 16 bits",
            request.auth_version
        ))
    })?;
    let body = match request.body {
        Some(Body::Enqueue(e)) => RequestBody::Enqueue {
            recipient_key: IdentityKey::try_from_slice(&e.recipient_key)
                .map_err(DecodeError::Invalid)?,
            channel_id: ChannelId::try_from_slice(&e.channel_id).map_err(DecodeError::Invalid)?,
            payload: e.payload,
            message_id: MessageId::try_from_slice(&e.message_id).map_err(DecodeError::Invalid)?,
        },
        Some(Body::Fetch(f)) => RequestBody::Fetch {
            recipient_key: IdentityKey::try_from_slice(&f.recipient_key)
                .map_err(DecodeError::Invalid)?,
            channel_id: ChannelId::try_from_slice(&f.channel_id).map_err(DecodeError::Invalid)?,
            after_seq: f.after_seq,
            limit: f.limit,
        },
        // Protobuf skips fields it does not know, so a newer method arrives
        // as a request without a body.
        None => {
            return Err(DecodeError::Malformed(
                "request has no method this side knows".into(),
            ));
        }
    };
    Ok(Request { auth_version, body })
}

/// The core's reply as a prost message; payloads move, not copy.
pub fn reply_to_wire(reply: Reply) -> Result<wire::Response, Unsupported> {
    use wire::response::Result as Body;
    let result = match reply {
        Ok(Response::Enqueued { seq }) => Body::Enqueued(wire::Enqueued { seq }),
        Ok(Response::Messages {
            messages,
            next_seq,
            gap,
        }) => Body::Messages(wire::Messages {
            messages: messages
                .into_iter()
                .map(|m| wire::QueuedMessage {
                    seq: m.seq,
                    payload: m.payload,
                })
                .collect(),
            next_seq,
            gap: gap.map(|g| wire::Gap {
                from: g.from,
                to: g.to,
            }),
        }),
        Ok(other) => {
            return Err(Unsupported {
                what: response_name(&other),
            });
        }
        Err(e) => Body::Error(error_to_wire(e)),
    };
    Ok(wire::Response {
        result: Some(result),
    })
}

/// A prost reply as the core's, with the checks the Cap'n Proto decoder
/// makes.
pub fn reply_from_wire(reply: wire::Response) -> Result<Reply, DecodeError> {
    use wire::response::Result as Body;
    match reply.result {
        Some(Body::Enqueued(e)) => Ok(Ok(Response::Enqueued { seq: e.seq })),
        Some(Body::Messages(m)) => {
            if m.messages.len() > FETCH_LIMIT_MAX as usize {
                return Err(invalid(format!(
                    "reply holds {} messages, more than a fetch may return ({FETCH_LIMIT_MAX})",
                    m.messages.len()
                )));
            }
            Ok(Ok(Response::Messages {
                messages: m
                    .messages
                    .into_iter()
                    .map(|q| QueuedMessage {
                        seq: q.seq,
                        payload: q.payload,
                    })
                    .collect(),
                next_seq: m.next_seq,
                gap: m.gap.map(gap_from_wire).transpose()?,
            }))
        }
        Some(Body::Error(e)) => Ok(Err(error_from_wire(e)?)),
        None => Err(DecodeError::Malformed(
            "reply has no result this side knows".into(),
        )),
    }
}

/// A typed error as a prost message; a kind newer than the schema is sent
/// as internal, keeping its message (as the Cap'n Proto encoder does).
fn error_to_wire(e: ServiceError) -> wire::Error {
    use wire::ErrorKind as K;
    let mut out = wire::Error {
        message: e.message.into_owned(),
        ..wire::Error::default()
    };
    let kind = match e.kind {
        ErrorKind::InvalidArgument => K::InvalidArgument,
        ErrorKind::Unauthenticated => K::Unauthenticated,
        ErrorKind::PermissionDenied => K::PermissionDenied,
        ErrorKind::NotFound => K::NotFound,
        ErrorKind::PayloadTooLarge => K::PayloadTooLarge,
        ErrorKind::RateLimited { retry_after_ms } => {
            out.retry_after_ms = retry_after_ms;
            K::RateLimited
        }
        ErrorKind::QueueFull => K::QueueFull,
        ErrorKind::StaleEpoch { current_epoch } => {
            out.current_epoch = current_epoch;
            K::StaleEpoch
        }
        ErrorKind::Unavailable => K::Unavailable,
        _ => K::Internal,
    };
    out.set_kind(kind);
    out
}

/// Reads a typed error; the zero kind and kinds this side does not know
/// are refused.
fn error_from_wire(e: wire::Error) -> Result<ServiceError, DecodeError> {
    use wire::ErrorKind as K;
    let kind = match K::try_from(e.kind) {
        Ok(K::InvalidArgument) => ErrorKind::InvalidArgument,
        Ok(K::Unauthenticated) => ErrorKind::Unauthenticated,
        Ok(K::PermissionDenied) => ErrorKind::PermissionDenied,
        Ok(K::NotFound) => ErrorKind::NotFound,
        Ok(K::PayloadTooLarge) => ErrorKind::PayloadTooLarge,
        Ok(K::RateLimited) => ErrorKind::RateLimited {
            retry_after_ms: e.retry_after_ms,
        },
        Ok(K::QueueFull) => ErrorKind::QueueFull,
        Ok(K::StaleEpoch) => ErrorKind::StaleEpoch {
            current_epoch: e.current_epoch,
        },
        Ok(K::Unavailable) => ErrorKind::Unavailable,
        Ok(K::Internal) => ErrorKind::Internal,
        Ok(K::Unspecified) | Err(_) => {
            return Err(match u16::try_from(e.kind) {
                Ok(discriminant) => DecodeError::UnknownVariant {
                    what: "error kind",
                    discriminant,
                },
                Err(_) => DecodeError::Malformed(format!("error kind {} out of range", e.kind)),
            });
        }
    };
    Ok(ServiceError::new(kind, Cow::Owned(e.message)))
}

/// A gap as the wire carries it: `1 <= from <= to`.
fn gap_from_wire(g: wire::Gap) -> Result<Gap, DecodeError> {
    if g.from >= 1 && g.from <= g.to {
        Ok(Gap {
            from: g.from,
            to: g.to,
        })
    } else {
        Err(invalid(format!(
            "gap {}..={} is not a range of seqs",
            g.from, g.to
        )))
    }
}

/// The Cap'n Proto schema's name of a response, for [`Unsupported`].
fn response_name(response: &Response) -> &'static str {
    match response {
        Response::AuthChallenge { .. } => "authChallenge",
        Response::Authenticated => "authenticated",
        Response::KeyPackageUploaded { .. } => "keyPackageUploaded",
        Response::KeyPackage { .. } => "keyPackage",
        Response::KeyPackageCount { .. } => "keyPackageCount",
        Response::HybridKeyUploaded => "hybridKeyUploaded",
        Response::HybridKey { .. } => "hybridKey",
        Response::Enqueued { .. } => "enqueued",
        Response::Messages { .. } => "messages",
        Response::EnqueuedBatch { .. } => "enqueuedBatch",
        Response::ChannelMessages { .. } => "channelMessages",
        _ => "a response newer than this code",
    }
}

/// Refuses input over `bytes_max` before parsing, as the Cap'n Proto
/// decoders do.
fn check_len(bytes: &[u8], bytes_max: usize) -> Result<(), DecodeError> {
    if bytes.len() > bytes_max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: bytes_max,
        });
    }
    Ok(())
}

fn malformed(e: prost::DecodeError) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

fn invalid(message: String) -> DecodeError {
    DecodeError::Invalid(ServiceError::invalid_argument(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAYLOAD_SIZES;
    use crate::codec::{enqueue_request, enqueued_reply, fetch_request, messages_reply};
    use quicproquo_core::limits::AUTH_VERSION;

    /// Encodes with Protobuf and decodes back; both codecs must give the
    /// value they were given.
    fn check_request(request: Request) {
        let bytes = encode_request(request.clone()).expect("hot-path method");
        assert_eq!(decode_request(&bytes), Ok(request.clone()));
        let capnp = quicproquo_proto::encode_request(&request);
        assert_eq!(quicproquo_proto::decode_request(&capnp), Ok(request));
    }

    fn check_reply(reply: Reply) {
        let bytes = encode_reply(reply.clone()).expect("hot-path response");
        assert_eq!(decode_reply(&bytes), Ok(reply.clone()));
        let capnp = quicproquo_proto::encode_reply(&reply);
        assert_eq!(quicproquo_proto::decode_reply(&capnp), Ok(reply));
    }

    /// Decoding `message`'s bytes fails with `expected`'s variant.
    fn check_refused_request(message: wire::Request, expected: fn(&DecodeError) -> bool) {
        let result = decode_request(&message.encode_to_vec());
        assert!(matches!(&result, Err(e) if expected(e)), "{result:?}");
    }

    fn check_refused_reply(message: wire::Response, expected: fn(&DecodeError) -> bool) {
        let result = decode_reply(&message.encode_to_vec());
        assert!(matches!(&result, Err(e) if expected(e)), "{result:?}");
    }

    fn is_invalid(e: &DecodeError) -> bool {
        matches!(e, DecodeError::Invalid(_))
    }

    fn is_malformed(e: &DecodeError) -> bool {
        matches!(e, DecodeError::Malformed(_))
    }

    #[test]
    fn hot_path_requests_round_trip_to_the_same_value() {
        for size in [0, PAYLOAD_SIZES[0], PAYLOAD_SIZES[1]] {
            check_request(enqueue_request(size));
        }
        check_request(fetch_request());
        check_request(Request {
            auth_version: AUTH_VERSION,
            body: RequestBody::Enqueue {
                recipient_key: IdentityKey([0; 32]),
                channel_id: ChannelId::DEFAULT,
                payload: vec![1, 2, 3],
                message_id: MessageId([0; 16]),
            },
        });
        check_request(Request {
            auth_version: u16::MAX,
            body: RequestBody::Fetch {
                recipient_key: IdentityKey([0xff; 32]),
                channel_id: ChannelId::try_from_slice(&[3; 5]).expect("5 bytes"),
                after_seq: u64::MAX,
                limit: u32::MAX,
            },
        });
    }

    #[test]
    fn hot_path_replies_round_trip_to_the_same_value() {
        check_reply(enqueued_reply());
        check_reply(Ok(Response::Enqueued { seq: 0 }));
        for size in PAYLOAD_SIZES {
            check_reply(messages_reply(size, 1));
            check_reply(messages_reply(size, 100));
        }
        check_reply(messages_reply(0, 0));
        check_reply(Ok(Response::Messages {
            messages: vec![QueuedMessage {
                seq: 9,
                payload: vec![7; 10],
            }],
            next_seq: 10,
            gap: Some(Gap { from: 3, to: 8 }),
        }));
    }

    #[test]
    fn errors_round_trip_with_their_kind_and_message() {
        check_reply(Err(ServiceError::invalid_argument("bad key")));
        check_reply(Err(ServiceError::unauthenticated("")));
        check_reply(Err(ServiceError::permission_denied("not yours")));
        check_reply(Err(ServiceError::not_found("none")));
        check_reply(Err(ServiceError::payload_too_large("big")));
        check_reply(Err(ServiceError::rate_limited(1500, "slow down")));
        check_reply(Err(ServiceError::queue_full("full")));
        check_reply(Err(ServiceError::stale_epoch(7, "stale")));
        check_reply(Err(ServiceError::unavailable("later")));
        check_reply(Err(ServiceError::internal("bug")));
    }

    #[test]
    fn other_methods_and_responses_are_unsupported() {
        let request = Request {
            auth_version: AUTH_VERSION,
            body: RequestBody::AuthChallenge,
        };
        assert_eq!(
            encode_request(request),
            Err(Unsupported {
                what: "authChallenge"
            })
        );
        assert_eq!(
            encode_reply(Ok(Response::Authenticated)),
            Err(Unsupported {
                what: "authenticated"
            })
        );
    }

    #[test]
    fn fields_of_the_wrong_length_are_invalid() {
        let enqueue = |key: usize, channel: usize, id: usize| wire::Request {
            auth_version: 1,
            body: Some(wire::request::Body::Enqueue(wire::Enqueue {
                recipient_key: vec![1; key],
                channel_id: vec![1; channel],
                payload: vec![],
                message_id: vec![1; id],
            })),
        };
        check_refused_request(enqueue(31, 0, 16), is_invalid);
        check_refused_request(enqueue(33, 0, 16), is_invalid);
        check_refused_request(enqueue(32, 17, 16), is_invalid);
        check_refused_request(enqueue(32, 0, 15), is_invalid);
        check_refused_request(enqueue(0, 0, 0), is_invalid);
        let mut too_new = enqueue(32, 0, 16);
        too_new.auth_version = 1 << 16;
        check_refused_request(too_new, is_invalid);
    }

    #[test]
    fn a_request_without_a_known_method_is_malformed() {
        check_refused_request(
            wire::Request {
                auth_version: 1,
                body: None,
            },
            is_malformed,
        );
        // A newer method: a field number this schema does not have.
        let mut bytes = wire::Request {
            auth_version: 1,
            body: None,
        }
        .encode_to_vec();
        prost::encoding::bytes::encode(37, &vec![0u8; 4], &mut bytes);
        assert!(matches!(
            decode_request(&bytes),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_request(&[0xff; 8]),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn replies_breaking_the_rules_are_refused() {
        let messages = |count: usize, gap: Option<wire::Gap>| wire::Response {
            result: Some(wire::response::Result::Messages(wire::Messages {
                messages: vec![wire::QueuedMessage::default(); count],
                next_seq: 1,
                gap,
            })),
        };
        check_refused_reply(messages(FETCH_LIMIT_MAX as usize + 1, None), is_invalid);
        check_refused_reply(messages(0, Some(wire::Gap { from: 0, to: 0 })), is_invalid);
        check_refused_reply(messages(0, Some(wire::Gap { from: 5, to: 4 })), is_invalid);
        check_refused_reply(wire::Response { result: None }, is_malformed);
        let unknown_kind = |kind: i32| wire::Response {
            result: Some(wire::response::Result::Error(wire::Error {
                kind,
                ..wire::Error::default()
            })),
        };
        check_refused_reply(unknown_kind(0), |e| {
            matches!(e, DecodeError::UnknownVariant { .. })
        });
        check_refused_reply(unknown_kind(11), |e| {
            matches!(e, DecodeError::UnknownVariant { .. })
        });
        check_refused_reply(unknown_kind(-1), is_malformed);
    }

    #[test]
    fn input_over_the_limit_is_refused_before_parsing() {
        assert!(matches!(
            decode_request(&vec![0; REQUEST_BYTES_MAX + 1]),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_reply(&vec![0; REPLY_BYTES_MAX + 1]),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    /// Prints the encoded size of every bench value in both codecs
    /// (`cargo test -p quicproquo-benches --lib encoded_sizes -- --nocapture`;
    /// BENCHMARKS.md records them). Protobuf's encoding of a value is
    /// deterministic, so its sizes are checked exactly: a payload's bytes
    /// plus the tags, lengths and fixed fields.
    #[test]
    fn encoded_sizes() {
        let mut requests = Vec::new();
        for size in PAYLOAD_SIZES {
            requests.push((format!("enqueue request/{size}"), enqueue_request(size)));
        }
        requests.push(("fetch request".to_owned(), fetch_request()));
        for (name, request) in &requests {
            let capnp = quicproquo_proto::encode_request(request).len();
            let pb = encode_request(request.clone()).expect("hot path").len();
            println!("{name:<28} capnp {capnp:>7} B   protobuf {pb:>7} B");
        }
        let mut replies = vec![("enqueued reply".to_owned(), enqueued_reply())];
        for size in PAYLOAD_SIZES {
            replies.push((format!("messages1 reply/{size}"), messages_reply(size, 1)));
            replies.push((
                format!("messages100 reply/{size}"),
                messages_reply(size, 100),
            ));
        }
        for (name, reply) in &replies {
            let capnp = quicproquo_proto::encode_reply(reply).len();
            let pb = encode_reply(reply.clone()).expect("hot path").len();
            println!("{name:<28} capnp {capnp:>7} B   protobuf {pb:>7} B");
        }
        // Enqueue: envelope tag+len (1+2), auth version (2), key (2+32),
        // channel (2+16), payload (1+2+n), message id (2+16).
        assert_eq!(
            encode_request(enqueue_request(1024)).map(|b| b.len()),
            Ok(3 + 2 + 34 + 18 + 3 + 1024 + 18)
        );
    }
}
