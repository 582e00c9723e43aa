//! Conversion between the core's [`Request`] and the wire's `Request`
//! struct. Decoding parses every byte field into the core's typed values
//! (`IdentityKey`, `ChannelId`, `MessageId`, `Signature`) exactly once;
//! opaque blobs (payloads, packages, hybrid keys) are copied out and left to
//! the core's size checks, which operators can configure.

use quicproquo_core::ServiceError;
use quicproquo_core::limits::{
    ENQUEUE_BATCH_RECIPIENTS_MAX, ENQUEUE_MANY_MESSAGES_MAX, FETCH_WAIT_CHANNELS_MAX,
};
use quicproquo_core::node::{Outgoing, Request, RequestBody};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, Signature};

use crate::error::DecodeError;
use crate::generated::node_capnp::request;
use crate::generated::node_capnp::request::body::Which;

/// Writes `req` into a freshly initialised root.
pub(crate) fn to_wire(req: &Request, mut w: request::Builder<'_>) {
    w.set_auth_version(req.auth_version);
    let mut body = w.init_body();
    match &req.body {
        RequestBody::AuthChallenge => body.set_auth_challenge(()),
        RequestBody::Authenticate {
            identity_key,
            signature,
        } => {
            let mut g = body.init_authenticate();
            g.set_identity_key(identity_key.as_bytes());
            g.set_signature(&signature.0);
        }
        RequestBody::UploadKeyPackage {
            identity_key,
            package,
            last_resort,
            cipher_suite,
        } => {
            let mut g = body.init_upload_key_package();
            g.set_identity_key(identity_key.as_bytes());
            g.set_package(package);
            g.set_last_resort(*last_resort);
            g.set_cipher_suite(*cipher_suite);
        }
        RequestBody::FetchKeyPackage {
            identity_key,
            cipher_suite,
        } => {
            let mut g = body.init_fetch_key_package();
            g.set_identity_key(identity_key.as_bytes());
            g.set_cipher_suite(*cipher_suite);
        }
        RequestBody::KeyPackageCount {
            identity_key,
            cipher_suite,
        } => {
            let mut g = body.init_key_package_count();
            g.set_identity_key(identity_key.as_bytes());
            g.set_cipher_suite(*cipher_suite);
        }
        RequestBody::UploadHybridKey {
            identity_key,
            hybrid_key,
            signature,
        } => {
            let mut g = body.init_upload_hybrid_key();
            g.set_identity_key(identity_key.as_bytes());
            g.set_hybrid_key(hybrid_key);
            g.set_signature(&signature.0);
        }
        RequestBody::FetchHybridKey { identity_key } => {
            body.init_fetch_hybrid_key()
                .set_identity_key(identity_key.as_bytes());
        }
        RequestBody::Enqueue {
            recipient_key,
            channel_id,
            payload,
            message_id,
        } => {
            let mut g = body.init_enqueue();
            g.set_recipient_key(recipient_key.as_bytes());
            g.set_channel_id(channel_id.as_bytes());
            g.set_payload(payload);
            g.set_message_id(&message_id.0);
        }
        RequestBody::Fetch {
            recipient_key,
            channel_id,
            after_seq,
            limit,
        } => {
            let mut g = body.init_fetch();
            g.set_recipient_key(recipient_key.as_bytes());
            g.set_channel_id(channel_id.as_bytes());
            g.set_after_seq(*after_seq);
            g.set_limit(*limit);
        }
        RequestBody::FetchWait {
            recipient_key,
            channel_id,
            after_seq,
            limit,
            timeout_ms,
        } => {
            let mut g = body.init_fetch_wait();
            g.set_recipient_key(recipient_key.as_bytes());
            g.set_channel_id(channel_id.as_bytes());
            g.set_after_seq(*after_seq);
            g.set_limit(*limit);
            g.set_timeout_ms(*timeout_ms);
        }
        RequestBody::EnqueueBatch {
            recipient_keys,
            channel_id,
            payload,
            message_id,
        } => {
            let mut g = body.init_enqueue_batch();
            set_keys(
                g.reborrow().init_recipient_keys(count(recipient_keys)),
                recipient_keys,
            );
            g.set_channel_id(channel_id.as_bytes());
            g.set_payload(payload);
            g.set_message_id(&message_id.0);
        }
        RequestBody::EnqueueMany {
            recipient_keys,
            channel_id,
            messages,
        } => {
            let mut g = body.init_enqueue_many();
            set_keys(
                g.reborrow().init_recipient_keys(count(recipient_keys)),
                recipient_keys,
            );
            g.set_channel_id(channel_id.as_bytes());
            let len = u32::try_from(messages.len())
                .expect("far fewer than 2^32 messages (ENQUEUE_MANY_MESSAGES_MAX)");
            let mut list = g.reborrow().init_messages(len);
            for (i, m) in (0..len).zip(messages) {
                let mut w = list.reborrow().get(i);
                w.set_payload(&m.payload);
                w.set_message_id(&m.message_id.0);
            }
        }
        RequestBody::FetchWaitChannels {
            recipient_key,
            cursors,
            limit,
            timeout_ms,
        } => {
            let mut g = body.init_fetch_wait_channels();
            g.set_recipient_key(recipient_key.as_bytes());
            let len = u32::try_from(cursors.len())
                .expect("far fewer than 2^32 cursors (FETCH_WAIT_CHANNELS_MAX)");
            let mut list = g.reborrow().init_cursors(len);
            for (i, (channel, after_seq)) in (0..len).zip(cursors) {
                let mut c = list.reborrow().get(i);
                c.set_channel_id(channel.as_bytes());
                c.set_after_seq(*after_seq);
            }
            g.set_limit(*limit);
            g.set_timeout_ms(*timeout_ms);
        }
        // `RequestBody` is non-exhaustive; a method the core gains must get a
        // schema member here before a client can send it. Reaching this is a
        // bug in the caller's build, not peer input.
        other => panic!(
            "request method `{}` has no wire encoding in quicproquo-proto",
            other.method()
        ),
    }
}

/// Reads a request, parsing every field into the core's types.
pub(crate) fn from_wire(r: request::Reader<'_>) -> Result<Request, DecodeError> {
    let body = match r.get_body().which() {
        Ok(Which::AuthChallenge(())) => RequestBody::AuthChallenge,
        Ok(Which::Authenticate(g)) => RequestBody::Authenticate {
            identity_key: identity_key(g.get_identity_key()?)?,
            signature: signature(g.get_signature()?)?,
        },
        Ok(Which::UploadKeyPackage(g)) => RequestBody::UploadKeyPackage {
            identity_key: identity_key(g.get_identity_key()?)?,
            package: g.get_package()?.to_vec(),
            last_resort: g.get_last_resort(),
            cipher_suite: g.get_cipher_suite(),
        },
        Ok(Which::FetchKeyPackage(g)) => RequestBody::FetchKeyPackage {
            identity_key: identity_key(g.get_identity_key()?)?,
            cipher_suite: g.get_cipher_suite(),
        },
        Ok(Which::KeyPackageCount(g)) => RequestBody::KeyPackageCount {
            identity_key: identity_key(g.get_identity_key()?)?,
            cipher_suite: g.get_cipher_suite(),
        },
        Ok(Which::UploadHybridKey(g)) => RequestBody::UploadHybridKey {
            identity_key: identity_key(g.get_identity_key()?)?,
            hybrid_key: g.get_hybrid_key()?.to_vec(),
            signature: signature(g.get_signature()?)?,
        },
        Ok(Which::FetchHybridKey(g)) => RequestBody::FetchHybridKey {
            identity_key: identity_key(g.get_identity_key()?)?,
        },
        Ok(Which::Enqueue(g)) => RequestBody::Enqueue {
            recipient_key: identity_key(g.get_recipient_key()?)?,
            channel_id: channel_id(g.get_channel_id()?)?,
            payload: g.get_payload()?.to_vec(),
            message_id: message_id(g.get_message_id()?)?,
        },
        Ok(Which::Fetch(g)) => RequestBody::Fetch {
            recipient_key: identity_key(g.get_recipient_key()?)?,
            channel_id: channel_id(g.get_channel_id()?)?,
            after_seq: g.get_after_seq(),
            limit: g.get_limit(),
        },
        Ok(Which::FetchWait(g)) => RequestBody::FetchWait {
            recipient_key: identity_key(g.get_recipient_key()?)?,
            channel_id: channel_id(g.get_channel_id()?)?,
            after_seq: g.get_after_seq(),
            limit: g.get_limit(),
            timeout_ms: g.get_timeout_ms(),
        },
        Ok(Which::EnqueueBatch(g)) => RequestBody::EnqueueBatch {
            recipient_keys: recipient_keys(g.get_recipient_keys()?, "enqueueBatch")?,
            channel_id: channel_id(g.get_channel_id()?)?,
            payload: g.get_payload()?.to_vec(),
            message_id: message_id(g.get_message_id()?)?,
        },
        Ok(Which::EnqueueMany(g)) => {
            let recipient_keys = recipient_keys(g.get_recipient_keys()?, "enqueueMany")?;
            let list = g.get_messages()?;
            // Checked before anything is sized by the list's length.
            if list.len() as usize > ENQUEUE_MANY_MESSAGES_MAX {
                return Err(DecodeError::Invalid(ServiceError::invalid_argument(
                    format!(
                        "enqueueMany holds {} messages, more than the limit of {ENQUEUE_MANY_MESSAGES_MAX}",
                        list.len()
                    ),
                )));
            }
            let mut messages = Vec::with_capacity(list.len() as usize);
            for m in list.iter() {
                messages.push(Outgoing {
                    payload: m.get_payload()?.to_vec(),
                    message_id: message_id(m.get_message_id()?)?,
                });
            }
            RequestBody::EnqueueMany {
                recipient_keys,
                channel_id: channel_id(g.get_channel_id()?)?,
                messages,
            }
        }
        Ok(Which::FetchWaitChannels(g)) => {
            let list = g.get_cursors()?;
            if list.len() as usize > FETCH_WAIT_CHANNELS_MAX {
                return Err(DecodeError::Invalid(ServiceError::invalid_argument(
                    format!(
                        "fetchWaitChannels names {} channels, more than the limit of {FETCH_WAIT_CHANNELS_MAX}",
                        list.len()
                    ),
                )));
            }
            let mut cursors = Vec::with_capacity(list.len() as usize);
            for c in list.iter() {
                cursors.push((channel_id(c.get_channel_id()?)?, c.get_after_seq()));
            }
            RequestBody::FetchWaitChannels {
                recipient_key: identity_key(g.get_recipient_key()?)?,
                cursors,
                limit: g.get_limit(),
                timeout_ms: g.get_timeout_ms(),
            }
        }
        Err(capnp::NotInSchema(discriminant)) => {
            return Err(DecodeError::UnknownVariant {
                what: "method",
                discriminant,
            });
        }
    };
    Ok(Request {
        auth_version: r.get_auth_version(),
        body,
    })
}

/// Words the encoding of `req` needs: the root pointer and struct, plus
/// each byte field padded to a word. An underestimate only costs a second
/// segment.
pub(crate) fn size_in_words(req: &Request) -> usize {
    // Root pointer (1) + Request struct (3 data words + 4 pointers).
    const FIXED_WORDS: usize = 8;
    let blobs = match &req.body {
        RequestBody::UploadKeyPackage { package, .. } => package.len(),
        RequestBody::UploadHybridKey { hybrid_key, .. } => hybrid_key.len(),
        RequestBody::Enqueue { payload, .. } => payload.len(),
        // Each key a list element of 4 words (32 bytes) plus its pointer.
        RequestBody::EnqueueBatch {
            payload,
            recipient_keys,
            ..
        } => payload.len() + recipient_keys.len() * 40,
        // Each message a struct of 2 pointers, its id two words, its
        // payload padded to a word; the list's tag one more word.
        RequestBody::EnqueueMany {
            messages,
            recipient_keys,
            ..
        } => {
            8 + messages
                .iter()
                .map(|m| m.payload.len().next_multiple_of(8) + 32)
                .sum::<usize>()
                + recipient_keys.len() * 40
        }
        // Each cursor a struct of 1 data word and 1 pointer, its channel
        // two words.
        RequestBody::FetchWaitChannels { cursors, .. } => cursors.len() * 32,
        _ => 0,
    };
    // Keys, signatures, ids and channel ids: at most 32 + 64 words' worth.
    const FIXED_FIELD_WORDS: usize = 16;
    FIXED_WORDS + FIXED_FIELD_WORDS + blobs.div_ceil(8)
}

/// Parses an identity or recipient key (32 bytes).
fn identity_key(bytes: &[u8]) -> Result<IdentityKey, DecodeError> {
    IdentityKey::try_from_slice(bytes).map_err(DecodeError::Invalid)
}

/// A list's length on the wire: the core's limits keep every list far
/// below 2^32 entries.
fn count<T>(items: &[T]) -> u32 {
    u32::try_from(items.len()).expect("lists are bounded far below 2^32 by the core's limits")
}

/// Writes recipient keys into an initialised list.
fn set_keys(mut list: capnp::data_list::Builder<'_>, keys: &[IdentityKey]) {
    for (i, key) in (0..).zip(keys) {
        list.set(i, key.as_bytes());
    }
}

/// Parses the recipients of `method`, at most
/// [`ENQUEUE_BATCH_RECIPIENTS_MAX`] (checked before anything is sized by
/// the list's length).
fn recipient_keys(
    list: capnp::data_list::Reader<'_>,
    method: &str,
) -> Result<Vec<IdentityKey>, DecodeError> {
    if list.len() as usize > ENQUEUE_BATCH_RECIPIENTS_MAX {
        return Err(DecodeError::Invalid(ServiceError::invalid_argument(
            format!(
                "{method} names {} recipients, more than the limit of {ENQUEUE_BATCH_RECIPIENTS_MAX}",
                list.len()
            ),
        )));
    }
    let mut keys = Vec::with_capacity(list.len() as usize);
    for key in list.iter() {
        keys.push(identity_key(key?)?);
    }
    Ok(keys)
}

/// Parses a channel id (empty or at most 16 bytes).
fn channel_id(bytes: &[u8]) -> Result<ChannelId, DecodeError> {
    ChannelId::try_from_slice(bytes).map_err(DecodeError::Invalid)
}

/// Parses a message id (16 bytes).
fn message_id(bytes: &[u8]) -> Result<MessageId, DecodeError> {
    MessageId::try_from_slice(bytes).map_err(DecodeError::Invalid)
}

/// Parses an Ed25519 signature (64 bytes).
pub(crate) fn signature(bytes: &[u8]) -> Result<Signature, DecodeError> {
    Signature::try_from_slice(bytes).map_err(DecodeError::Invalid)
}
