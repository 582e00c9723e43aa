//! qpq: the encoding of stored values.
//!
//! Upstream writes every value as JSON, in which a byte string is an array
//! of decimal numbers (about 3.5 bytes per byte) and costs a number parse
//! per byte to read. openmls writes a group's whole message-secrets store
//! (the member lists of its past epochs included) with every message it
//! sends or reads, and the client reads a group back for every command, so
//! for large groups, and for post-quantum ones whose HPKE keys are 1,216
//! bytes, that JSON was most of a client's time and state.
//!
//! Values are written as [`TAG`] followed by MessagePack with named fields:
//! self-describing, as openmls's storage types need (tls_codec's byte
//! vectors deserialize through `deserialize_any`, one config enum is
//! untagged), and with every sequence of bytes as a MessagePack byte
//! string (`BytesMode::ForceIterables`: a `Vec<u8>` without `serde_bytes`
//! too, such as a member's keys, which read back as a sequence). Values read may be in either form: a value that does not
//! start with [`TAG`] is JSON, as upstream and earlier versions wrote it.
//! Keys are unchanged (JSON), so an old store's entries are found as they
//! are; each value moves to the binary form when it is next written.

use rmp_serde::config::BytesMode;
use serde::{de::DeserializeOwned, Serialize};

use crate::MemoryStorageError;

/// The first byte of a value in the binary form. 0xC1 is the one byte
/// MessagePack never uses, and no JSON text starts with it.
pub(crate) const TAG: u8 = 0xC1;

/// `value` in the binary form.
pub(crate) fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, MemoryStorageError> {
    let mut out = Vec::new();
    to_writer(&mut out, value)?;
    Ok(out)
}

/// Appends `value` in the binary form to `out`.
pub(crate) fn to_writer<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), MemoryStorageError> {
    out.push(TAG);
    let mut serializer = rmp_serde::Serializer::new(out)
        .with_struct_map()
        .with_bytes(BytesMode::ForceIterables);
    value
        .serialize(&mut serializer)
        .map_err(|_| MemoryStorageError::SerializationError)
}

/// A value in either form.
pub(crate) fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MemoryStorageError> {
    match bytes.split_first() {
        Some((&TAG, rest)) => {
            rmp_serde::from_slice(rest).map_err(|_| MemoryStorageError::SerializationError)
        }
        _ => serde_json::from_slice(bytes).map_err(|_| MemoryStorageError::SerializationError),
    }
}
