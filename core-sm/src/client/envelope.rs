//! What the client puts inside an enqueued payload. The server never parses
//! it (but for the commit framing of kind 4). Four kinds, each starting
//! with a version byte and a kind byte:
//!
//! ```text
//! welcome: 0x01 0x01 | channel_len u8 | channel_id | nonce[12]
//!          | name_len u16 BE | sealed_name | MLSMessage(Welcome)
//! group:   0x01 0x02 | MLSMessage (PrivateMessage or PublicMessage)
//! hybrid:  0x01 0x03 | key_id[32] | hybrid envelope (hybrid.rs, >= 1161 bytes)
//! framed:  0x01 0x04 | framing_len u16 BE | framing | key_id[32] | hybrid envelope
//! ```
//!
//! A Welcome goes to the new member's default channel and says on which
//! channel the group talks. The group's name is sealed under a key exported
//! from the group's new epoch (RFC 9420 §8.5), so only members can read it
//! and the server sees no names.
//!
//! A hybrid payload wraps one welcome or group payload (never another
//! hybrid one) in a post-quantum envelope sealed to the recipient's hybrid
//! key `key_id` (SHA-256 of the public key, also the AEAD's associated data,
//! see [`super::hybrid`]). The hybrid envelope's own first byte is its suite
//! version, which is why it never stands alone at the start of a payload:
//! the outer `0x01 0x03` says unambiguously what follows, and the key id
//! lets the recipient pick among its current and kept older keys.
//!
//! A framed hybrid payload is a hybrid payload wrapping a Commit, with the
//! Commit's framing in the clear before it (`crate::protocol::framing`): the
//! MLS header fields a delivery service may read anyway (group id, epoch,
//! content type) and a digest naming the Commit, so the server's commit
//! fence covers pq groups too. The recipient checks that the framing is
//! the one of the Commit inside.

use super::hybrid::{ENVELOPE_OVERHEAD_BYTES, KEY_ID_BYTES};
use crate::limits::CHANNEL_ID_BYTES_MAX;
use crate::types::ChannelId;

use crate::protocol::framing::{
    ENVELOPE_VERSION as VERSION, KIND_FRAMED_HYBRID, KIND_GROUP, KIND_HYBRID, KIND_WELCOME,
};
/// Bytes a hybrid payload adds to the payload it wraps: version and kind,
/// key id, and the hybrid envelope's own overhead.
pub const HYBRID_OVERHEAD_BYTES: usize = 2 + KEY_ID_BYTES + ENVELOPE_OVERHEAD_BYTES;
/// Nonce length of the name AEAD (ChaCha20-Poly1305).
pub const NAME_NONCE_BYTES: usize = 12;

/// A decoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// An invitation to a group.
    Welcome {
        /// The channel the group uses.
        channel_id: ChannelId,
        /// Nonce of the sealed name.
        nonce: [u8; NAME_NONCE_BYTES],
        /// The group name, sealed under the epoch's exporter.
        sealed_name: Vec<u8>,
        /// The MLS Welcome as an `MLSMessage`.
        welcome: Vec<u8>,
    },
    /// A handshake or application message of a group.
    Group {
        /// The `MLSMessage`.
        message: Vec<u8>,
    },
    /// A welcome or group payload sealed to the recipient's hybrid key.
    Hybrid {
        /// For a Commit: its framing in the clear, for the commit fence.
        framing: Option<Vec<u8>>,
        /// Which of the recipient's hybrid keys it is sealed to.
        key_id: [u8; KEY_ID_BYTES],
        /// The hybrid envelope ([`super::hybrid::seal`]).
        sealed: Vec<u8>,
    },
}

/// A payload that is not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message envelope: {0}")]
pub struct EnvelopeError(pub &'static str);

impl Envelope {
    /// Encodes the envelope.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Envelope::Welcome {
                channel_id,
                nonce,
                sealed_name,
                welcome,
            } => {
                let ch = channel_id.as_bytes();
                let mut out = Vec::with_capacity(
                    5 + ch.len() + NAME_NONCE_BYTES + sealed_name.len() + welcome.len(),
                );
                out.extend_from_slice(&[VERSION, KIND_WELCOME]);
                // At most 16: fits a byte.
                out.push(ch.len() as u8);
                out.extend_from_slice(ch);
                out.extend_from_slice(nonce);
                let name_len = u16::try_from(sealed_name.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&name_len.to_be_bytes());
                out.extend_from_slice(&sealed_name[..usize::from(name_len)]);
                out.extend_from_slice(welcome);
                out
            }
            Envelope::Group { message } => {
                let mut out = Vec::with_capacity(2 + message.len());
                out.extend_from_slice(&[VERSION, KIND_GROUP]);
                out.extend_from_slice(message);
                out
            }
            Envelope::Hybrid {
                framing,
                key_id,
                sealed,
            } => {
                let mut out = Vec::with_capacity(
                    4 + framing.as_ref().map_or(0, Vec::len) + KEY_ID_BYTES + sealed.len(),
                );
                match framing {
                    None => out.extend_from_slice(&[VERSION, KIND_HYBRID]),
                    Some(f) => {
                        // A framing is an MLS header and a digest: far
                        // below 64 KiB.
                        let len = u16::try_from(f.len()).unwrap_or(u16::MAX);
                        out.extend_from_slice(&[VERSION, KIND_FRAMED_HYBRID]);
                        out.extend_from_slice(&len.to_be_bytes());
                        out.extend_from_slice(&f[..usize::from(len)]);
                    }
                }
                out.extend_from_slice(key_id);
                out.extend_from_slice(sealed);
                out
            }
        }
    }

    /// Decodes an envelope; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        let mut r = Reader(bytes);
        if r.byte()? != VERSION {
            return Err(EnvelopeError("unknown version"));
        }
        match r.byte()? {
            KIND_WELCOME => {
                let ch_len = usize::from(r.byte()?);
                if ch_len > CHANNEL_ID_BYTES_MAX {
                    return Err(EnvelopeError("channel id too long"));
                }
                let channel_id = ChannelId::try_from_slice(r.take(ch_len)?)
                    .map_err(|_| EnvelopeError("channel id too long"))?;
                let nonce = <[u8; NAME_NONCE_BYTES]>::try_from(r.take(NAME_NONCE_BYTES)?)
                    .map_err(|_| EnvelopeError("truncated nonce"))?;
                let len_bytes = r.take(2)?;
                let name_len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
                let sealed_name = r.take(name_len)?.to_vec();
                let welcome = r.0.to_vec();
                if welcome.is_empty() {
                    return Err(EnvelopeError("empty welcome"));
                }
                Ok(Envelope::Welcome {
                    channel_id,
                    nonce,
                    sealed_name,
                    welcome,
                })
            }
            KIND_GROUP => {
                if r.0.is_empty() {
                    return Err(EnvelopeError("empty group message"));
                }
                Ok(Envelope::Group {
                    message: r.0.to_vec(),
                })
            }
            kind @ (KIND_HYBRID | KIND_FRAMED_HYBRID) => {
                let framing = if kind == KIND_FRAMED_HYBRID {
                    let len_bytes = r.take(2)?;
                    let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
                    Some(r.take(len)?.to_vec())
                } else {
                    None
                };
                let key_id = <[u8; KEY_ID_BYTES]>::try_from(r.take(KEY_ID_BYTES)?)
                    .map_err(|_| EnvelopeError("truncated key id"))?;
                if r.0.len() < ENVELOPE_OVERHEAD_BYTES {
                    return Err(EnvelopeError("truncated hybrid envelope"));
                }
                Ok(Envelope::Hybrid {
                    framing,
                    key_id,
                    sealed: r.0.to_vec(),
                })
            }
            _ => Err(EnvelopeError("unknown kind")),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, EnvelopeError> {
        Ok(self.take(1)?[0])
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EnvelopeError> {
        if self.0.len() < n {
            return Err(EnvelopeError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let w = Envelope::Welcome {
            channel_id: ChannelId::try_from_slice(&[5; 16]).unwrap(),
            nonce: [1; 12],
            sealed_name: b"sealed".to_vec(),
            welcome: b"mls".to_vec(),
        };
        assert_eq!(Envelope::decode(&w.encode()), Ok(w));
        let g = Envelope::Group {
            message: b"mls".to_vec(),
        };
        assert_eq!(Envelope::decode(&g.encode()), Ok(g));
        let h = Envelope::Hybrid {
            framing: None,
            key_id: [7; KEY_ID_BYTES],
            sealed: vec![1; ENVELOPE_OVERHEAD_BYTES],
        };
        let bytes = h.encode();
        assert_eq!(&bytes[..2], &[0x01, 0x03]);
        assert_eq!(bytes.len(), HYBRID_OVERHEAD_BYTES);
        assert_eq!(Envelope::decode(&bytes), Ok(h));
        let f = Envelope::Hybrid {
            framing: Some(b"framing".to_vec()),
            key_id: [7; KEY_ID_BYTES],
            sealed: vec![1; ENVELOPE_OVERHEAD_BYTES],
        };
        let bytes = f.encode();
        assert_eq!(&bytes[..4], &[0x01, 0x04, 0, 7]);
        assert_eq!(Envelope::decode(&bytes), Ok(f));
    }

    #[test]
    fn hybrid_payload_shorter_than_an_envelope_is_refused() {
        for framing in [None, Some(vec![3; 40])] {
            let h = Envelope::Hybrid {
                framing,
                key_id: [7; KEY_ID_BYTES],
                sealed: vec![1; ENVELOPE_OVERHEAD_BYTES],
            }
            .encode();
            for n in 0..h.len() {
                assert!(Envelope::decode(&h[..n]).is_err(), "prefix of {n} bytes");
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let w = Envelope::Welcome {
            channel_id: ChannelId::try_from_slice(&[5; 16]).unwrap(),
            nonce: [1; 12],
            sealed_name: b"sealed".to_vec(),
            welcome: b"mls".to_vec(),
        }
        .encode();
        // Everything up to the MLS message is checked here; a cut inside the
        // MLS message itself is caught when MLS decodes it.
        let header = w.len() - b"mls".len();
        for n in 0..=header {
            assert!(Envelope::decode(&w[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(Envelope::decode(&[1, 9, 0]).is_err());
        assert!(Envelope::decode(&[2, 2, 0]).is_err());
        assert!(Envelope::decode(&[1, 1, 17]).is_err());
    }
}
