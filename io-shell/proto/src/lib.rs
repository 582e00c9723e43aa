//! quicproquo's wire format: the Cap'n Proto schema of the NodeService
//! (`schema/node.capnp`, ARCHITECTURE.md § Protocol) and its conversion to
//! and from the core's typed [`Request`] and [`Reply`] values.
//!
//! One request per QUIC bidirectional stream: the client sends
//! [`encode_request`]'s bytes and finishes the stream, the server answers
//! with [`encode_reply`]'s bytes. Messages use the standard (unpacked)
//! serialization with its segment table.
//!
//! Invariants this crate keeps:
//! - Decoding never panics on any input and never trusts a length: input
//!   longer than [`REQUEST_BYTES_MAX`] / [`REPLY_BYTES_MAX`] is refused before
//!   parsing, the segment table is checked to fit the input before the
//!   library reads it, and every read goes through [`reader_options`], so no
//!   message can make the decoder traverse or copy more than twice its own
//!   size.
//! - Decoded values are the core's parsed types (`IdentityKey`, `ChannelId`,
//!   ...): a field of the wrong length is an [`DecodeError::Invalid`] carrying
//!   the core's `invalidArgument` error, so nothing downstream re-validates.
//! - Every decode failure maps to a typed
//!   [`ServiceError`](quicproquo_core::ServiceError) through
//!   [`DecodeError::to_service_error`], so the server can answer a malformed
//!   request instead of dropping it.
//!
//! [`pin`] is the other half of the transport's contract: the check of
//! the server's certificate by its pinned SHA-256 fingerprint.
//!
//! The generated code in `src/generated/` is committed; `regen.sh`
//! regenerates it and `regen.sh --check` proves it fresh (see README.md).

mod error;
pub mod pin;
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, missing_docs, unused, unreachable_pub)]
mod generated;
mod reply;
mod request;

pub use error::DecodeError;

use capnp::message::{self, HeapAllocator, ReaderOptions};
use capnp::serialize::{self, BufferSegments};
use quicproquo_core::limits::{
    FETCH_LIMIT_MAX, FETCH_RESPONSE_BYTES_MAX, HYBRID_KEY_BYTES_MAX, KEY_PACKAGE_BYTES_MAX,
    PAYLOAD_BYTES_MAX,
};
use quicproquo_core::node::{Reply, Request};

use generated::node_capnp;

/// Largest request accepted on the wire: the largest byte field a request
/// carries (an enqueue payload) plus 64 KiB, many times what the segment
/// table, structs, keys and ids of any request need.
pub const REQUEST_BYTES_MAX: usize = max_usize(
    PAYLOAD_BYTES_MAX,
    max_usize(KEY_PACKAGE_BYTES_MAX, HYBRID_KEY_BYTES_MAX),
) + FRAMING_SLACK_BYTES;

/// Largest reply accepted on the wire: a fetch's payload budget, plus one
/// payload the core may return past the budget (it always returns a pending
/// message), plus each returned message's own framing, plus slack for the
/// rest of the reply.
pub const REPLY_BYTES_MAX: usize = FETCH_RESPONSE_BYTES_MAX
    + PAYLOAD_BYTES_MAX
    + FETCH_LIMIT_MAX as usize * QUEUED_MESSAGE_OVERHEAD_BYTES
    + FRAMING_SLACK_BYTES;

/// Traversal budget per word of message: honest decoding needs 1, and 2
/// bounds what a pointer-amplified message can make us read and copy.
pub const TRAVERSAL_WORDS_PER_MESSAGE_WORD: usize = 2;

/// Nesting limit for every read: the schema nests four levels deep today;
/// 16 leaves room for later methods and keeps any recursive walk shallow.
pub const NESTING_LIMIT: i32 = 16;

/// Most segments a message may have. Our encoder writes one; an encoder
/// with a doubling allocator needs a dozen or so for the largest reply. More
/// can only serve to spread far-pointer tricks over many segments.
pub const SEGMENTS_MAX: usize = 64;

/// The reader options for a message of at most `bytes_max` bytes, never
/// Cap'n Proto's defaults (64 MiB of traversal, 64 levels of nesting).
///
/// The traversal limit is [`TRAVERSAL_WORDS_PER_MESSAGE_WORD`] times the
/// message's size in words. An honest decode reads each object once, so it
/// traverses at most the message itself. A hostile message can aim many
/// pointers at one large object (which the library cannot cheaply detect) or
/// claim a long list of zero-sized structs; each read counts against the
/// limit, so such a message fails once it has cost twice its own size, and
/// the data the decoder copies out stays within that bound too.
///
/// The nesting limit is [`NESTING_LIMIT`]: the schema's deepest path is four
/// levels (reply, message list, message, payload).
///
/// The decoders call this with the input's actual length (after checking it
/// against the maximum), so a small message cannot borrow a large budget.
pub fn reader_options(bytes_max: usize) -> ReaderOptions {
    let words = bytes_max.div_ceil(BYTES_PER_WORD);
    let mut options = ReaderOptions::new();
    options
        .traversal_limit_in_words(Some(words.saturating_mul(TRAVERSAL_WORDS_PER_MESSAGE_WORD)))
        .nesting_limit(NESTING_LIMIT);
    options
}

/// ALPN protocol id of the NodeService over QUIC; a connection offering
/// anything else is refused during the handshake.
pub const ALPN: &[u8] = b"qpq/1";

/// TLS exporter label (RFC 8446 §7.5) for the value a client signs to
/// authenticate a connection; both ends derive 32 bytes with an empty
/// context.
pub const AUTH_EXPORTER_LABEL: &[u8] = b"EXPORTER-quicproquo-auth-v1";

/// Serializes a request as one single-segment Cap'n Proto message.
///
/// # Panics
/// If a byte field exceeds Cap'n Proto's 512 MiB list bound, far beyond any
/// limit the core enforces, or if `request.body` is a method the core gained
/// after this crate (`RequestBody` is non-exhaustive). Both are bugs in the
/// local caller's build; nothing a peer sends reaches this function.
pub fn encode_request(request: &Request) -> Vec<u8> {
    let mut builder = builder_for_words(request::size_in_words(request));
    request::to_wire(
        request,
        builder.init_root::<node_capnp::request::Builder<'_>>(),
    );
    serialize::write_message_to_words(&builder)
}

/// Parses a request received from a peer. Never panics; see [`DecodeError`]
/// for the ways it refuses input.
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let message = read_message(bytes, REQUEST_BYTES_MAX)?;
    request::from_wire(message.get_root::<node_capnp::request::Reader<'_>>()?)
}

/// Serializes a reply (a response or a typed error) as one single-segment
/// Cap'n Proto message.
///
/// A `Response` variant newer than this crate (the enum is non-exhaustive)
/// is sent as an `internal` error naming the variant, and a newer
/// `ErrorKind` as `internal` with its message, rather than panicking the
/// server.
///
/// # Panics
/// Only if a byte field exceeds Cap'n Proto's 512 MiB list bound or a reply
/// holds more than 2^29 messages, far beyond any limit the core enforces.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    let mut builder = builder_for_words(reply::size_in_words(reply));
    reply::to_wire(
        reply,
        builder.init_root::<node_capnp::response::Builder<'_>>(),
    );
    serialize::write_message_to_words(&builder)
}

/// Parses a reply received from the server. Never panics; see
/// [`DecodeError`] for the ways it refuses input.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, DecodeError> {
    let message = read_message(bytes, REPLY_BYTES_MAX)?;
    reply::from_wire(message.get_root::<node_capnp::response::Reader<'_>>()?)
}

/// Frames `bytes` as exactly one message of at most `bytes_max` bytes.
fn read_message(
    bytes: &[u8],
    bytes_max: usize,
) -> Result<message::Reader<BufferSegments<&[u8]>>, DecodeError> {
    if bytes.len() > bytes_max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: bytes_max,
        });
    }
    check_segment_table(bytes)?;
    let mut rest = bytes;
    let message = serialize::read_message_from_flat_slice(&mut rest, reader_options(bytes.len()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the end of the message",
            rest.len()
        )));
    }
    Ok(message)
}

/// Checks the segment count against [`SEGMENTS_MAX`] and that the segment
/// table fits in the input, before the library sizes anything by it.
fn check_segment_table(bytes: &[u8]) -> Result<(), DecodeError> {
    let Some(&[a, b, c, d]) = bytes.get(..4) else {
        return Err(DecodeError::Malformed(format!(
            "{} bytes is too short for a segment table",
            bytes.len()
        )));
    };
    // The table stores the segment count minus one.
    let segments = u64::from(u32::from_le_bytes([a, b, c, d])) + 1;
    if segments > SEGMENTS_MAX as u64 {
        return Err(DecodeError::Malformed(format!(
            "{segments} segments, more than the {SEGMENTS_MAX} allowed"
        )));
    }
    // A 4-byte count, then a 4-byte length per segment, padded to a word.
    let table_bytes = (4 + 4 * segments).next_multiple_of(BYTES_PER_WORD as u64);
    if table_bytes > bytes.len() as u64 {
        return Err(DecodeError::Malformed(format!(
            "the segment table of {segments} segments does not fit in {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}

/// A message builder whose first segment holds `words`, so an encode
/// normally produces one segment and allocates once.
fn builder_for_words(words: usize) -> message::Builder<HeapAllocator> {
    // Cap'n Proto's own bound on a segment; a bigger message just spills
    // into more segments.
    const SEGMENT_WORDS_MAX: u32 = 1 << 29;
    let words = u32::try_from(words)
        .unwrap_or(u32::MAX)
        .clamp(1, SEGMENT_WORDS_MAX);
    message::Builder::new(HeapAllocator::new().first_segment_words(words))
}

/// The larger of two sizes, usable in constants.
const fn max_usize(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// Room for the segment table, the structs and the fixed-size fields of any
/// message; our largest fixed part is well under 1 KiB.
const FRAMING_SLACK_BYTES: usize = 64 * 1024;

/// Framing of one message in a fetch reply: its 2-word struct in the list
/// plus up to 7 bytes padding its payload to a word, rounded up.
const QUEUED_MESSAGE_OVERHEAD_BYTES: usize = 24;

/// Cap'n Proto's word size.
const BYTES_PER_WORD: usize = 8;

#[cfg(test)]
mod tests;

/// Builders of malformed requests, for tests of the server's input
/// validation; not part of the stable API.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// A `fetchKeyPackage` request whose identity key is `key` as given,
    /// whatever its length.
    pub fn fetch_key_package_with_raw_key(key: &[u8]) -> Vec<u8> {
        let mut builder = message::Builder::new_default();
        let mut root = builder.init_root::<node_capnp::request::Builder<'_>>();
        root.set_auth_version(quicproquo_core::limits::AUTH_VERSION);
        root.init_body()
            .init_fetch_key_package()
            .set_identity_key(key);
        serialize::write_message_to_words(&builder)
    }
}
