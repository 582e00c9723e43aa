//! The one place the server looks inside a payload: the cleartext framing
//! header of an MLS handshake message (RFC 9420 §6), to accept only the
//! first Commit per epoch of a group on a channel (ARCHITECTURE.md
//! § Guarantees, "One Commit per epoch").
//!
//! A payload is recognised when it is the client's group envelope
//! (`0x01 0x02`, see `crate::client::envelope`; its kinds are defined
//! here, where both machines read them) around an `MLSMessage` of
//! protocol version `mls10` whose wire format is `PublicMessage` or
//! `PrivateMessage`. Of those it reads the group id, the epoch and the
//! content type — fields MLS sends in the clear so that a delivery service
//! can route — and nothing else: no decryption, no signature check, no
//! group state beyond a counter per group and channel. Anything else (a
//! Welcome, an application message, bytes that are not MLS at all) is not a
//! Commit and passes untouched; the server stays a queue for opaque bytes.
//!
//! A post-quantum group seals each payload per recipient, so its Commits
//! carry their framing in the clear beside the sealed envelope (kind
//! `0x01 0x04`, see `crate::client::envelope`): the same header fields, up
//! to the content type, then a SHA-256 of the whole `MLSMessage` that names
//! the Commit, so every recipient's copy of one Commit has the same framing
//! while two Commits for one epoch never do. The fence identifies a Commit
//! by its payload, or for a sealed one by this framing.

/// The version byte every client envelope starts with.
pub const ENVELOPE_VERSION: u8 = 1;
/// Envelope kind: an invitation (MLS Welcome) to a group.
pub const KIND_WELCOME: u8 = 1;
/// Envelope kind: an MLS message of a group.
pub const KIND_GROUP: u8 = 2;
/// Envelope kind: a payload sealed to the recipient's hybrid key.
pub const KIND_HYBRID: u8 = 3;
/// Envelope kind: a sealed Commit with its framing in the clear.
pub const KIND_FRAMED_HYBRID: u8 = 4;
/// The client's envelope prefix for a group message.
pub const GROUP_ENVELOPE_PREFIX: [u8; 2] = [ENVELOPE_VERSION, KIND_GROUP];
/// The client's envelope prefix for a sealed (hybrid) payload with its
/// Commit framing in the clear.
pub const FRAMED_HYBRID_PREFIX: [u8; 2] = [ENVELOPE_VERSION, KIND_FRAMED_HYBRID];
/// Bytes of the Commit digest at the end of a sealed Commit's framing.
pub const FRAMING_DIGEST_BYTES: usize = 32;

const MLS10: u16 = 1;
const WIRE_FORMAT_PUBLIC: u16 = 1;
const WIRE_FORMAT_PRIVATE: u16 = 2;
const CONTENT_TYPE_COMMIT: u8 = 3;
const SENDER_MEMBER: u8 = 1;
const SENDER_EXTERNAL: u8 = 2;
const SENDER_NEW_MEMBER_PROPOSAL: u8 = 3;
const SENDER_NEW_MEMBER_COMMIT: u8 = 4;

/// The framing of a Commit: which group, and the epoch it was made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitHeader<'a> {
    /// The MLS group id (opaque).
    pub group_id: &'a [u8],
    /// The epoch the Commit was made in; it moves the group to `epoch + 1`.
    pub epoch: u64,
    /// The bytes that identify this Commit (equal for every copy of it):
    /// the payload, or a sealed Commit's framing.
    pub identity: &'a [u8],
}

/// The Commit framing of `payload`, if it is a group envelope around an
/// MLS Commit, or a sealed payload with a Commit's framing in the clear;
/// `None` for anything else.
pub fn commit_header(payload: &[u8]) -> Option<CommitHeader<'_>> {
    if let Some(group) = payload.strip_prefix(&GROUP_ENVELOPE_PREFIX) {
        let (group_id, epoch, _) = mls_header(group)?;
        return Some(CommitHeader {
            group_id,
            epoch,
            identity: payload,
        });
    }
    let mut r = Reader(payload.strip_prefix(&FRAMED_HYBRID_PREFIX)?);
    let len = usize::from(r.u16()?);
    let framing = r.take(len)?;
    let (group_id, epoch, rest) = mls_header(framing)?;
    (rest.len() == FRAMING_DIGEST_BYTES).then_some(CommitHeader {
        group_id,
        epoch,
        identity: framing,
    })
}

/// The framing a sealed copy of the group payload `payload` carries in the
/// clear (see the module docs), if it is a Commit: its MLS header up to the
/// content type, then the SHA-256 of the `MLSMessage`.
pub fn commit_framing(payload: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha256};
    let message = payload.strip_prefix(&GROUP_ENVELOPE_PREFIX)?;
    let (_, _, rest) = mls_header(message)?;
    let mut framing = message[..message.len() - rest.len()].to_vec();
    framing.extend_from_slice(&Sha256::digest(message));
    Some(framing)
}

/// Reads an `MLSMessage` header up to its content type: the group id and
/// epoch if it is a Commit, and the bytes after the content type.
fn mls_header(message: &[u8]) -> Option<(&[u8], u64, &[u8])> {
    let mut r = Reader(message);
    if r.u16()? != MLS10 {
        return None;
    }
    match r.u16()? {
        WIRE_FORMAT_PUBLIC => {
            // FramedContent: group_id, epoch, sender, authenticated_data,
            // content_type.
            let group_id = r.vector()?;
            let epoch = r.u64()?;
            match r.u8()? {
                SENDER_MEMBER | SENDER_EXTERNAL => {
                    r.take(4)?;
                }
                SENDER_NEW_MEMBER_PROPOSAL | SENDER_NEW_MEMBER_COMMIT => {}
                _ => return None,
            }
            r.vector()?;
            (r.u8()? == CONTENT_TYPE_COMMIT).then_some((group_id, epoch, r.0))
        }
        WIRE_FORMAT_PRIVATE => {
            // PrivateMessage: group_id, epoch, content_type, ...
            let group_id = r.vector()?;
            let epoch = r.u64()?;
            (r.u8()? == CONTENT_TYPE_COMMIT).then_some((group_id, epoch, r.0))
        }
        _ => None,
    }
}

/// A cursor over TLS-presentation-language bytes (RFC 9420 §2.1).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A variable-length vector: a QUIC-style variable-length integer
    /// (RFC 9420 §2.1.2; 1, 2 or 4 bytes, minimal), then that many bytes.
    fn vector(&mut self) -> Option<&'a [u8]> {
        let first = self.u8()?;
        let len = match first >> 6 {
            0 => usize::from(first & 0x3f),
            1 => {
                let len = usize::from(first & 0x3f) << 8 | usize::from(self.u8()?);
                (len >= 64).then_some(len)?
            }
            2 => {
                let rest = self.take(3)?;
                let len = usize::from(first & 0x3f) << 24
                    | usize::from(rest[0]) << 16
                    | usize::from(rest[1]) << 8
                    | usize::from(rest[2]);
                (len >= 16_384).then_some(len)?
            }
            _ => return None,
        };
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private(group: &[u8], epoch: u64, content_type: u8) -> Vec<u8> {
        let mut v = GROUP_ENVELOPE_PREFIX.to_vec();
        v.extend_from_slice(&MLS10.to_be_bytes());
        v.extend_from_slice(&WIRE_FORMAT_PRIVATE.to_be_bytes());
        v.push(group.len() as u8);
        v.extend_from_slice(group);
        v.extend_from_slice(&epoch.to_be_bytes());
        v.push(content_type);
        v.extend_from_slice(&[0, 1, 2, 3]);
        v
    }

    #[test]
    fn reads_a_private_commit_and_ignores_other_content() {
        let commit = private(b"group", 7, CONTENT_TYPE_COMMIT);
        let h = commit_header(&commit).unwrap();
        assert_eq!(h.group_id, b"group");
        assert_eq!(h.epoch, 7);
        assert_eq!(commit_header(&private(b"group", 7, 1)), None);
        assert_eq!(commit_header(&private(b"group", 7, 2)), None);
    }

    #[test]
    fn reads_a_public_commit_with_each_sender_kind() {
        for (sender, extra) in [(1u8, 4usize), (2, 4), (3, 0), (4, 0)] {
            let mut v = GROUP_ENVELOPE_PREFIX.to_vec();
            v.extend_from_slice(&MLS10.to_be_bytes());
            v.extend_from_slice(&WIRE_FORMAT_PUBLIC.to_be_bytes());
            // A two-byte length: 64 bytes of group id.
            v.extend_from_slice(&[0x40, 64]);
            v.extend_from_slice(&[9; 64]);
            v.extend_from_slice(&3u64.to_be_bytes());
            v.push(sender);
            v.extend(std::iter::repeat_n(0, extra));
            v.extend_from_slice(&[2, 0xaa, 0xbb]);
            v.push(CONTENT_TYPE_COMMIT);
            let h = commit_header(&v).unwrap();
            assert_eq!((h.group_id.len(), h.epoch), (64, 3));
        }
    }

    #[test]
    fn a_sealed_commit_is_read_from_its_framing() {
        let commit = private(b"group", 7, CONTENT_TYPE_COMMIT);
        let framing = commit_framing(&commit).unwrap();
        // The header up to the content type, then the digest.
        assert_eq!(framing.len(), 2 + 2 + 1 + 5 + 8 + 1 + FRAMING_DIGEST_BYTES);
        let mut sealed = FRAMED_HYBRID_PREFIX.to_vec();
        sealed.extend_from_slice(&(framing.len() as u16).to_be_bytes());
        sealed.extend_from_slice(&framing);
        sealed.extend_from_slice(&[0xee; 100]);
        let h = commit_header(&sealed).unwrap();
        assert_eq!(
            (h.group_id, h.epoch, h.identity),
            (&b"group"[..], 7, &framing[..])
        );
        // Another Commit for the same epoch has another framing.
        let mut other = commit.clone();
        other.push(9);
        assert_ne!(commit_framing(&other), Some(framing.clone()));
        // Not a Commit: no framing; a framing cut short or without its
        // whole digest is not read.
        assert_eq!(commit_framing(&private(b"group", 7, 1)), None);
        for n in 0..framing.len() {
            let mut cut = FRAMED_HYBRID_PREFIX.to_vec();
            cut.extend_from_slice(&(n as u16).to_be_bytes());
            cut.extend_from_slice(&framing[..n]);
            cut.extend_from_slice(&[0xee; 100]);
            assert_eq!(commit_header(&cut), None, "framing of {n} bytes");
        }
        assert_eq!(commit_header(&sealed[..10]), None);
    }

    #[test]
    fn anything_else_is_not_a_commit() {
        let good = private(b"g", 1, CONTENT_TYPE_COMMIT);
        // Every truncation, a wrong envelope, version or wire format.
        for n in 0..good.len() - 4 {
            assert_eq!(commit_header(&good[..n]), None, "prefix of {n}");
        }
        let mut welcome = good.clone();
        welcome[1] = 0x01;
        assert_eq!(commit_header(&welcome), None);
        let mut v2 = good.clone();
        v2[3] = 2;
        assert_eq!(commit_header(&v2), None);
        let mut wf = good.clone();
        wf[5] = 3;
        assert_eq!(commit_header(&wf), None);
        // A non-minimal length and the reserved 8-byte form.
        let mut long = good.clone();
        long.splice(6..7, [0x40, 1]);
        assert_eq!(commit_header(&long), None);
        let mut reserved = good;
        reserved[6] = 0xc0;
        assert_eq!(commit_header(&reserved), None);
    }
}
