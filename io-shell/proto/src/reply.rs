//! Conversion between the core's [`Reply`] (a [`Response`] or a
//! [`ServiceError`]) and the wire's `Response` struct. Decoding checks the
//! fixed-size fields (nonce, fingerprint, signature), refuses a message list
//! longer than any fetch may return, and requires error messages to be
//! UTF-8.

use std::borrow::Cow;

use quicproquo_core::limits::{
    ENQUEUE_BATCH_RECIPIENTS_MAX, ENQUEUE_MANY_ENTRIES_MAX, FETCH_LIMIT_MAX,
    FETCH_WAIT_CHANNELS_MAX,
};
use quicproquo_core::node::{ChannelMessages, Gap, QueuedMessage, Reply, Response};
use quicproquo_core::types::ChannelId;
use quicproquo_core::{ErrorKind, ServiceError};

use crate::error::DecodeError;

/// Most seqs an `enqueuedBatch` answer holds: one per entry an
/// `enqueueBatch` or `enqueueMany` makes.
const SEQS_MAX: usize = if ENQUEUE_MANY_ENTRIES_MAX > ENQUEUE_BATCH_RECIPIENTS_MAX {
    ENQUEUE_MANY_ENTRIES_MAX
} else {
    ENQUEUE_BATCH_RECIPIENTS_MAX
};
use crate::generated::node_capnp::{error, queued_message, response};
use crate::request::signature;

/// Writes `reply` into a freshly initialised root.
pub(crate) fn to_wire(reply: &Reply, mut w: response::Builder<'_>) {
    match reply {
        Ok(resp) => {
            if let Err(gap) = ok_to_wire(resp, w.reborrow().init_ok()) {
                error_to_wire(&gap, w.init_error());
            }
        }
        Err(e) => error_to_wire(e, w.init_error()),
    }
}

/// Reads a reply.
pub(crate) fn from_wire(r: response::Reader<'_>) -> Result<Reply, DecodeError> {
    match r.which() {
        Ok(response::Ok(ok)) => ok_from_wire(ok).map(Ok),
        Ok(response::Error(e)) => error_from_wire(e?).map(Err),
        Err(capnp::NotInSchema(discriminant)) => Err(DecodeError::UnknownVariant {
            what: "reply",
            discriminant,
        }),
    }
}

/// Words the encoding of `reply` needs: root pointer and struct, each byte
/// field padded to a word, and two words plus the payload per queued
/// message. An underestimate only costs a second segment.
pub(crate) fn size_in_words(reply: &Reply) -> usize {
    // Root pointer (1) + Response (3 data words + 2 pointers) + the Error
    // struct or a list tag, and the fixed-size fields (at most 64 bytes).
    const FIXED_WORDS: usize = 24;
    let variable = match reply {
        Ok(Response::KeyPackage { package, .. }) => package.len().div_ceil(8),
        Ok(Response::HybridKey { hybrid_key, .. }) => hybrid_key.len().div_ceil(8),
        Ok(Response::Messages { messages, .. }) => messages_words(messages),
        Ok(Response::EnqueuedBatch { seqs }) => seqs.len(),
        // Per channel: its struct (1 data word, 2 pointers), the channel
        // id, and its messages.
        Ok(Response::ChannelMessages { channels }) => channels
            .iter()
            .map(|c| 5 + messages_words(&c.messages))
            .sum(),
        // The message text and its NUL terminator.
        Err(e) => (e.message.len() + 1).div_ceil(8),
        Ok(_) => 0,
    };
    FIXED_WORDS + variable
}

/// Words of a message list: two per message (its struct and pointer tag)
/// and the payload.
fn messages_words(messages: &[QueuedMessage]) -> usize {
    messages
        .iter()
        .map(|m| 2 + m.payload.len().div_ceil(8))
        .sum()
}

fn messages_to_wire(
    messages: &[QueuedMessage],
    mut list: capnp::struct_list::Builder<'_, queued_message::Owned>,
) {
    for (i, m) in (0..list.len()).zip(messages) {
        let mut entry = list.reborrow().get(i);
        entry.set_seq(m.seq);
        entry.set_payload(&m.payload);
    }
}

fn list_len(n: usize) -> u32 {
    u32::try_from(n).expect("a reply holds far fewer than 2^32 entries (FETCH_LIMIT_MAX)")
}

/// Reads a message list of at most `max` entries.
fn messages_from_wire(
    list: capnp::struct_list::Reader<'_, queued_message::Owned>,
    max: u32,
) -> Result<Vec<QueuedMessage>, DecodeError> {
    // Checked before anything is sized by the list's length: a list of
    // zero-sized structs can claim many elements cheaply.
    if list.len() > max {
        return Err(DecodeError::Invalid(ServiceError::invalid_argument(
            format!(
                "reply holds {} messages, more than a fetch may return ({FETCH_LIMIT_MAX})",
                list.len()
            ),
        )));
    }
    let mut messages = Vec::with_capacity(list.len() as usize);
    for m in list.iter() {
        messages.push(QueuedMessage {
            seq: m.get_seq(),
            payload: m.get_payload()?.to_vec(),
        });
    }
    Ok(messages)
}

/// Writes a successful response, or returns the error to send instead when
/// `resp` is a variant this crate does not know yet (then nothing but the
/// `ok` tag has been written, and the caller overwrites it).
fn ok_to_wire(resp: &Response, mut w: response::ok::Builder<'_>) -> Result<(), ServiceError> {
    match resp {
        Response::AuthChallenge { nonce } => w.init_auth_challenge().set_nonce(nonce),
        Response::Authenticated => w.set_authenticated(()),
        Response::KeyPackageUploaded { fingerprint } => {
            w.init_key_package_uploaded().set_fingerprint(fingerprint);
        }
        Response::KeyPackage {
            package,
            last_resort,
        } => {
            let mut g = w.init_key_package();
            g.set_package(package);
            g.set_last_resort(*last_resort);
        }
        Response::KeyPackageCount {
            count,
            has_last_resort,
        } => {
            let mut g = w.init_key_package_count();
            g.set_count(*count);
            g.set_has_last_resort(*has_last_resort);
        }
        Response::HybridKeyUploaded => w.set_hybrid_key_uploaded(()),
        Response::HybridKey {
            hybrid_key,
            signature,
        } => {
            let mut g = w.init_hybrid_key();
            g.set_hybrid_key(hybrid_key);
            g.set_signature(&signature.0);
        }
        Response::Enqueued { seq } => w.init_enqueued().set_seq(*seq),
        Response::Messages {
            messages,
            next_seq,
            gap,
        } => {
            let mut g = w.init_messages();
            g.set_next_seq(*next_seq);
            if let Some(gap) = gap {
                g.set_gap_from(gap.from);
                g.set_gap_to(gap.to);
            }
            messages_to_wire(messages, g.init_messages(list_len(messages.len())));
        }
        Response::EnqueuedBatch { seqs } => {
            let mut list = w.init_enqueued_batch().init_seqs(list_len(seqs.len()));
            for (i, seq) in (0..list.len()).zip(seqs) {
                list.set(i, *seq);
            }
        }
        Response::ChannelMessages { channels } => {
            let mut list = w
                .init_channel_messages()
                .init_channels(list_len(channels.len()));
            for (i, c) in (0..list.len()).zip(channels) {
                let mut entry = list.reborrow().get(i);
                entry.set_channel_id(c.channel_id.as_bytes());
                entry.set_next_seq(c.next_seq);
                if let Some(gap) = c.gap {
                    entry.set_gap_from(gap.from);
                    entry.set_gap_to(gap.to);
                }
                messages_to_wire(&c.messages, entry.init_messages(list_len(c.messages.len())));
            }
        }
        // `Response` is non-exhaustive: a variant the core gains before the
        // schema does is answered as a server-side bug, not a panic.
        other => {
            return Err(ServiceError::internal(format!(
                "the server cannot encode its response {:?}",
                variant_name(other)
            )));
        }
    }
    Ok(())
}

/// Reads a successful response.
fn ok_from_wire(r: response::ok::Reader<'_>) -> Result<Response, DecodeError> {
    use response::ok::Which;
    Ok(match r.which() {
        Ok(Which::AuthChallenge(g)) => Response::AuthChallenge {
            nonce: fixed(g.get_nonce()?, "nonce")?,
        },
        Ok(Which::Authenticated(())) => Response::Authenticated,
        Ok(Which::KeyPackageUploaded(g)) => Response::KeyPackageUploaded {
            fingerprint: fixed(g.get_fingerprint()?, "fingerprint")?,
        },
        Ok(Which::KeyPackage(g)) => Response::KeyPackage {
            package: g.get_package()?.to_vec(),
            last_resort: g.get_last_resort(),
        },
        Ok(Which::KeyPackageCount(g)) => Response::KeyPackageCount {
            count: g.get_count(),
            has_last_resort: g.get_has_last_resort(),
        },
        Ok(Which::HybridKeyUploaded(())) => Response::HybridKeyUploaded,
        Ok(Which::HybridKey(g)) => Response::HybridKey {
            hybrid_key: g.get_hybrid_key()?.to_vec(),
            signature: signature(g.get_signature()?)?,
        },
        Ok(Which::Enqueued(g)) => Response::Enqueued { seq: g.get_seq() },
        Ok(Which::Messages(g)) => Response::Messages {
            messages: messages_from_wire(g.get_messages()?, FETCH_LIMIT_MAX)?,
            next_seq: g.get_next_seq(),
            gap: gap(g.get_gap_from(), g.get_gap_to())?,
        },
        Ok(Which::EnqueuedBatch(g)) => {
            let list = g.get_seqs()?;
            if list.len() as usize > SEQS_MAX {
                return Err(DecodeError::Invalid(ServiceError::invalid_argument(
                    format!(
                        "reply holds {} seqs, more than a batch or enqueueMany may make ({SEQS_MAX})",
                        list.len()
                    ),
                )));
            }
            Response::EnqueuedBatch {
                seqs: list.iter().collect(),
            }
        }
        Ok(Which::ChannelMessages(g)) => {
            let list = g.get_channels()?;
            if list.len() as usize > FETCH_WAIT_CHANNELS_MAX {
                return Err(DecodeError::Invalid(ServiceError::invalid_argument(
                    format!(
                        "reply holds {} channels, more than a wait may name ({FETCH_WAIT_CHANNELS_MAX})",
                        list.len()
                    ),
                )));
            }
            // The messages of all channels together are within one fetch's
            // count, as the core returns them.
            let mut left = FETCH_LIMIT_MAX;
            let mut channels = Vec::with_capacity(list.len() as usize);
            for c in list.iter() {
                let messages = messages_from_wire(c.get_messages()?, left)?;
                left -= messages.len() as u32;
                let channel_id =
                    ChannelId::try_from_slice(c.get_channel_id()?).map_err(DecodeError::Invalid)?;
                channels.push(ChannelMessages {
                    channel_id,
                    messages,
                    next_seq: c.get_next_seq(),
                    gap: gap(c.get_gap_from(), c.get_gap_to())?,
                });
            }
            Response::ChannelMessages { channels }
        }
        Err(capnp::NotInSchema(discriminant)) => {
            return Err(DecodeError::UnknownVariant {
                what: "response",
                discriminant,
            });
        }
    })
}

/// Writes a typed error. An `ErrorKind` newer than the schema is sent as
/// `internal`, keeping its message.
fn error_to_wire(e: &ServiceError, mut w: error::Builder<'_>) {
    w.set_message(&*e.message);
    let mut kind = w.init_kind();
    match e.kind {
        ErrorKind::InvalidArgument => kind.set_invalid_argument(()),
        ErrorKind::Unauthenticated => kind.set_unauthenticated(()),
        ErrorKind::PermissionDenied => kind.set_permission_denied(()),
        ErrorKind::NotFound => kind.set_not_found(()),
        ErrorKind::PayloadTooLarge => kind.set_payload_too_large(()),
        ErrorKind::RateLimited { retry_after_ms } => {
            kind.init_rate_limited().set_retry_after_ms(retry_after_ms);
        }
        ErrorKind::QueueFull => kind.set_queue_full(()),
        ErrorKind::StaleEpoch { current_epoch } => {
            kind.init_stale_epoch().set_current_epoch(current_epoch);
        }
        ErrorKind::Unavailable => kind.set_unavailable(()),
        ErrorKind::Internal => kind.set_internal(()),
        _ => kind.set_internal(()),
    }
}

/// Reads a typed error.
fn error_from_wire(r: error::Reader<'_>) -> Result<ServiceError, DecodeError> {
    use error::kind::Which;
    let kind = match r.get_kind().which() {
        Ok(Which::InvalidArgument(())) => ErrorKind::InvalidArgument,
        Ok(Which::Unauthenticated(())) => ErrorKind::Unauthenticated,
        Ok(Which::PermissionDenied(())) => ErrorKind::PermissionDenied,
        Ok(Which::NotFound(())) => ErrorKind::NotFound,
        Ok(Which::PayloadTooLarge(())) => ErrorKind::PayloadTooLarge,
        Ok(Which::RateLimited(g)) => ErrorKind::RateLimited {
            retry_after_ms: g.get_retry_after_ms(),
        },
        Ok(Which::QueueFull(())) => ErrorKind::QueueFull,
        Ok(Which::StaleEpoch(g)) => ErrorKind::StaleEpoch {
            current_epoch: g.get_current_epoch(),
        },
        Ok(Which::Unavailable(())) => ErrorKind::Unavailable,
        Ok(Which::Internal(())) => ErrorKind::Internal,
        Err(capnp::NotInSchema(discriminant)) => {
            return Err(DecodeError::UnknownVariant {
                what: "error kind",
                discriminant,
            });
        }
    };
    let message = r
        .get_message()?
        .to_string()
        .map_err(|_| DecodeError::Malformed("error message is not UTF-8".into()))?;
    Ok(ServiceError::new(kind, Cow::Owned(message)))
}

/// A gap as the wire carries it: `to = 0` for none, else `1 <= from <= to`.
fn gap(from: u64, to: u64) -> Result<Option<Gap>, DecodeError> {
    match (from, to) {
        (0, 0) => Ok(None),
        (from, to) if from >= 1 && from <= to => Ok(Some(Gap { from, to })),
        _ => Err(DecodeError::Invalid(ServiceError::invalid_argument(
            format!("gap {from}..={to} is not a range of seqs"),
        ))),
    }
}

/// Copies a fixed-size field, refusing any other length.
fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], DecodeError> {
    <[u8; N]>::try_from(bytes).map_err(|_| {
        DecodeError::Invalid(ServiceError::invalid_argument(format!(
            "{what} must be {N} bytes, got {}",
            bytes.len()
        )))
    })
}

/// The name of a response variant, for the error sent when it cannot be
/// encoded; never its contents, which may hold keys or payloads.
fn variant_name(resp: &Response) -> String {
    let debug = format!("{resp:?}");
    debug
        .split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_owned()
}
