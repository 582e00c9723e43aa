//! Protocol nouns as types that cannot hold invalid values. Bytes from the
//! network are parsed into these once, at the boundary (`try_from_slice`), and
//! never validated again.

use std::fmt;

use crate::error::ServiceError;
use crate::limits::{CHANNEL_ID_BYTES_MAX, IDENTITY_KEY_BYTES, MESSAGE_ID_BYTES, SIGNATURE_BYTES};

/// A user's identity: the raw 32-byte Ed25519 public key. It names the
/// user's KeyPackages, hybrid key and queues, and is also the MLS signature
/// key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey(pub [u8; IDENTITY_KEY_BYTES]);

impl IdentityKey {
    /// Parses a key from the wire; anything but 32 bytes is `invalidArgument`.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, ServiceError> {
        <[u8; IDENTITY_KEY_BYTES]>::try_from(bytes)
            .map(IdentityKey)
            .map_err(|_| {
                ServiceError::invalid_argument(format!(
                    "identity key must be {IDENTITY_KEY_BYTES} bytes, got {}",
                    bytes.len()
                ))
            })
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; IDENTITY_KEY_BYTES] {
        &self.0
    }

    /// A short form for logs: the first 8 hex digits, never the whole key.
    pub fn short(&self) -> String {
        hex(&self.0[..4])
    }

    /// Parses 64 hex digits (either case), as [`hex`] writes them.
    pub fn from_hex(s: &str) -> Option<IdentityKey> {
        unhex(s).map(IdentityKey)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({}…)", self.short())
    }
}

/// A channel: empty for the default queue, or up to 16 bytes (a UUID).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ChannelId {
    len: u8,
    bytes: [u8; CHANNEL_ID_BYTES_MAX],
}

impl ChannelId {
    /// The default (empty) channel.
    pub const DEFAULT: ChannelId = ChannelId {
        len: 0,
        bytes: [0; CHANNEL_ID_BYTES_MAX],
    };

    /// Parses a channel id from the wire; longer than 16 bytes is
    /// `invalidArgument`.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, ServiceError> {
        if bytes.len() > CHANNEL_ID_BYTES_MAX {
            return Err(ServiceError::invalid_argument(format!(
                "channel id must be at most {CHANNEL_ID_BYTES_MAX} bytes, got {}",
                bytes.len()
            )));
        }
        let mut out = ChannelId::DEFAULT;
        out.bytes[..bytes.len()].copy_from_slice(bytes);
        // The length fits: it is at most CHANNEL_ID_BYTES_MAX (16).
        out.len = bytes.len() as u8;
        Ok(out)
    }

    /// The channel id's bytes (empty for the default channel).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({})", hex(self.as_bytes()))
    }
}

/// The sender-chosen id that makes an enqueue idempotent.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub [u8; MESSAGE_ID_BYTES]);

impl MessageId {
    /// Parses a message id from the wire; anything but 16 bytes is
    /// `invalidArgument`.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, ServiceError> {
        <[u8; MESSAGE_ID_BYTES]>::try_from(bytes)
            .map(MessageId)
            .map_err(|_| {
                ServiceError::invalid_argument(format!(
                    "message id must be {MESSAGE_ID_BYTES} bytes, got {}",
                    bytes.len()
                ))
            })
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", hex(&self.0))
    }
}

/// An Ed25519 signature as it travels on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_BYTES]);

impl Signature {
    /// Parses a signature from the wire; anything but 64 bytes is
    /// `invalidArgument`.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, ServiceError> {
        <[u8; SIGNATURE_BYTES]>::try_from(bytes)
            .map(Signature)
            .map_err(|_| {
                ServiceError::invalid_argument(format!(
                    "signature must be {SIGNATURE_BYTES} bytes, got {}",
                    bytes.len()
                ))
            })
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(..)")
    }
}

/// A queue's address: who receives it, on which channel.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct QueueId {
    /// The recipient's identity.
    pub recipient_key: IdentityKey,
    /// The channel within the recipient's queues.
    pub channel_id: ChannelId,
}

/// A connection, numbered by the shell; unique for the life of a machine.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ConnectionId(pub u64);

/// A request, numbered by the shell; the machine echoes it in the reply.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RequestId(pub u64);

/// SHA-256 of a KeyPackage, returned on upload so the client can detect a
/// server that altered it.
pub type Fingerprint = [u8; 32];

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses exactly `2 * N` hex digits (either case) into `N` bytes; `None`
/// for anything else (a sign, a space, another length).
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn unhex_takes_exactly_its_digits() {
        let key = IdentityKey([0xab; 32]);
        assert_eq!(IdentityKey::from_hex(&hex(&key.0)), Some(key));
        assert_eq!(
            IdentityKey::from_hex(&hex(&key.0).to_uppercase()),
            Some(key)
        );
        assert_eq!(unhex::<2>("0aff"), Some([0x0a, 0xff]));
        for bad in ["", "0", "0af", "0aff0", "+aff", "0a f", "0ag0", "éa"] {
            assert_eq!(unhex::<2>(bad), None, "{bad:?}");
        }
    }

    fn check_invalid<T: fmt::Debug>(r: Result<T, ServiceError>) {
        assert_eq!(r.unwrap_err().kind, ErrorKind::InvalidArgument);
    }

    #[test]
    fn identity_key_must_be_32_bytes() {
        check_invalid(IdentityKey::try_from_slice(&[]));
        check_invalid(IdentityKey::try_from_slice(&[1; 31]));
        check_invalid(IdentityKey::try_from_slice(&[1; 33]));
        assert_eq!(IdentityKey::try_from_slice(&[7; 32]).unwrap().0, [7; 32]);
    }

    #[test]
    fn channel_id_is_empty_or_up_to_16_bytes() {
        assert_eq!(ChannelId::try_from_slice(&[]).unwrap(), ChannelId::DEFAULT);
        assert_eq!(
            ChannelId::try_from_slice(&[9; 16]).unwrap().as_bytes(),
            &[9; 16]
        );
        check_invalid(ChannelId::try_from_slice(&[9; 17]));
        // Trailing zeros are significant: [0] is not the default channel.
        assert_ne!(ChannelId::try_from_slice(&[0]).unwrap(), ChannelId::DEFAULT);
    }

    #[test]
    fn message_id_and_signature_have_fixed_lengths() {
        check_invalid(MessageId::try_from_slice(&[0; 15]));
        check_invalid(MessageId::try_from_slice(&[0; 17]));
        assert!(MessageId::try_from_slice(&[0; 16]).is_ok());
        check_invalid(Signature::try_from_slice(&[0; 63]));
        assert!(Signature::try_from_slice(&[0; 64]).is_ok());
    }

    #[test]
    fn identity_short_form_never_shows_whole_key() {
        let k = IdentityKey([0xab; 32]);
        assert_eq!(k.short(), "abababab");
        assert_eq!(format!("{k:?}"), "IdentityKey(abababab…)");
    }
}
