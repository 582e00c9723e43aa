//! The NodeService's on-disk layout: how its state maps onto the storage
//! port's keys and values. This is the on-disk format boundary; changing it
//! means bumping [`FORMAT_VERSION`].
//!
//! Keys start with a one-byte tag so kinds never collide; multi-byte numbers
//! are big-endian so keys sort in numeric order. A queue is addressed by the
//! recipient key, the channel id's length and the channel id padded to 16
//! bytes, so every queue key has the same width.
//!
//! Queues and KeyPackage pools are FIFOs with head and tail counters in a
//! metadata record: reads go straight to `head` with point lookups and never
//! scan over deleted entries (tombstones).

use crate::limits::{
    CHANNEL_ID_BYTES_MAX, COMMIT_FENCE_HISTORY, DEDUP_WINDOW_PER_QUEUE, DEFAULT_POOL,
    IDENTITY_KEY_BYTES, MESSAGE_ID_BYTES, SIGNATURE_BYTES,
};
use crate::types::{ChannelId, IdentityKey, MessageId, QueueId, Signature};

/// Version of this layout. A store written by a newer version is refused.
///
/// - 1: messages stored whole under [`TAG_MESSAGE`].
/// - 2: messages stored as entries under [`TAG_ENTRY`], inline or as a
///   reference to a payload shared by the recipients of one `enqueueBatch`;
///   commit fences. Version 1 records stay readable: a queue's counters say
///   below which seq its messages are still version-1 records, so a
///   version-1 store is upgraded in place by opening it.
/// - 3: a message id is recognised per sender: dedup records are keyed by
///   queue, sender and id under [`TAG_SENDER_DEDUP`], and a dedup ring
///   record holds the sender beside the id. Version-2 dedup records (queue
///   and id only, under [`TAG_DEDUP`]) stay readable: a queue's counters
///   say below which seq they were written
///   ([`QueueMeta::sender_dedup_from`]), and they are consulted until they
///   leave the dedup window, so a retry across the upgrade is still stored
///   once. A commit fence records when its last Commit was accepted (a
///   format-2 fence has no time; the sweep gives it one).
/// - 4: short keys. Each queue gets a number ([`QueueMeta::qid`], from the
///   counter under [`TAG_QUEUE_NEXT`]) the first time a message is
///   enqueued to it, and its entries, dedup and dedup ring records from
///   then on are keyed by that number (`tag + qid + ...`, 17 bytes for an
///   entry) instead of the 50-byte recipient and channel: the storage
///   engine compares keys with `memcmp`, and every key of one queue shared
///   those 50 bytes. The queue's counters stay under the long key and say
///   from which seq on its records are short ([`QueueMeta::short_from`]);
///   records of a format-3 queue below it stay where they are and are read
///   there, so a format-3 store is upgraded in place by opening it. A
///   short dedup key puts the message id before the sender, so keys of one
///   queue differ early.
///
/// KeyPackage pools named by a cipher suite (tags `0x05`-`0x07`) came later
/// without a new version: they are new keys beside the default pool's, which
/// kept its keys, so a store without them reads as it did, and a version
/// that predates them leaves them alone.
pub const FORMAT_VERSION: u32 = 4;

const TAG_VERSION: u8 = 0x00;
const TAG_KP_META: u8 = 0x01;
const TAG_KP: u8 = 0x02;
const TAG_KP_LAST_RESORT: u8 = 0x03;
const TAG_HYBRID_KEY: u8 = 0x04;
const TAG_SUITE_KP_META: u8 = 0x05;
const TAG_SUITE_KP: u8 = 0x06;
const TAG_SUITE_KP_LAST_RESORT: u8 = 0x07;
const TAG_QUEUE_META: u8 = 0x10;
const TAG_MESSAGE: u8 = 0x11;
const TAG_DEDUP: u8 = 0x12;
const TAG_DEDUP_RING: u8 = 0x13;
const TAG_ENTRY: u8 = 0x14;
const TAG_BLOB: u8 = 0x15;
const TAG_BLOB_REFS: u8 = 0x16;
const TAG_BLOB_NEXT: u8 = 0x17;
const TAG_FENCE: u8 = 0x18;
const TAG_SENDER_DEDUP: u8 = 0x19;
const TAG_QUEUE_NEXT: u8 = 0x1a;
const TAG_SHORT_ENTRY: u8 = 0x1b;
const TAG_SHORT_DEDUP: u8 = 0x1c;
const TAG_SHORT_DEDUP_RING: u8 = 0x1d;

/// Bytes of the group id digest in a fence key.
const FENCE_GROUP_BYTES: usize = 16;

const QUEUE_KEY_BYTES: usize = IDENTITY_KEY_BYTES + 1 + CHANNEL_ID_BYTES_MAX;

/// A stored record that does not decode: the store is corrupt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt(pub &'static str);

/// Key of the format version record.
pub fn version_key() -> Vec<u8> {
    vec![TAG_VERSION]
}

/// Encodes the format version.
pub fn encode_version(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// Decodes the format version.
pub fn decode_version(bytes: &[u8]) -> Result<u32, Corrupt> {
    Ok(u32::from_be_bytes(array(bytes, "format version")?))
}

fn identity_key(tag: u8, id: &IdentityKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + IDENTITY_KEY_BYTES + 8);
    k.push(tag);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Key of an identity's pool counters. The default pool keeps the keys it
/// had before pools were named by cipher suite; another pool's keys carry
/// the suite after the identity.
pub fn kp_meta_key(id: &IdentityKey, suite: u16) -> Vec<u8> {
    pool_key(TAG_KP_META, TAG_SUITE_KP_META, id, suite)
}

/// Key of the KeyPackage at position `index` of an identity's pool.
pub fn kp_key(id: &IdentityKey, suite: u16, index: u64) -> Vec<u8> {
    let mut k = pool_key(TAG_KP, TAG_SUITE_KP, id, suite);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Key of the last-resort KeyPackage of an identity's pool.
pub fn kp_last_resort_key(id: &IdentityKey, suite: u16) -> Vec<u8> {
    pool_key(TAG_KP_LAST_RESORT, TAG_SUITE_KP_LAST_RESORT, id, suite)
}

fn pool_key(default_tag: u8, suite_tag: u8, id: &IdentityKey, suite: u16) -> Vec<u8> {
    if suite == DEFAULT_POOL {
        return identity_key(default_tag, id);
    }
    let mut k = identity_key(suite_tag, id);
    k.extend_from_slice(&suite.to_be_bytes());
    k
}

/// Key of an identity's hybrid public key.
pub fn hybrid_key_key(id: &IdentityKey) -> Vec<u8> {
    identity_key(TAG_HYBRID_KEY, id)
}

/// Head and tail of a FIFO of KeyPackages: packages `head..tail` exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KpMeta {
    /// Index of the oldest package.
    pub head: u64,
    /// Index the next upload gets.
    pub tail: u64,
}

impl KpMeta {
    /// Packages in the pool.
    pub fn count(&self) -> u64 {
        self.tail.saturating_sub(self.head)
    }

    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.head.to_be_bytes());
        v.extend_from_slice(&self.tail.to_be_bytes());
        v
    }

    /// Decodes the record.
    pub fn decode(bytes: &[u8]) -> Result<Self, Corrupt> {
        let [head, tail] = u64s::<2>(bytes, "key package counters")?;
        if head > tail {
            return Err(Corrupt("key package counters: head after tail"));
        }
        Ok(KpMeta { head, tail })
    }
}

/// Encodes a hybrid key record: signature, then the key.
pub fn encode_hybrid_key(key: &[u8], signature: &Signature) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIGNATURE_BYTES + key.len());
    v.extend_from_slice(&signature.0);
    v.extend_from_slice(key);
    v
}

/// Decodes a hybrid key record.
pub fn decode_hybrid_key(bytes: &[u8]) -> Result<(Vec<u8>, Signature), Corrupt> {
    if bytes.len() < SIGNATURE_BYTES {
        return Err(Corrupt("hybrid key record too short"));
    }
    let (sig, key) = bytes.split_at(SIGNATURE_BYTES);
    Ok((key.to_vec(), Signature(array(sig, "hybrid key signature")?)))
}

fn queue_key(tag: u8, q: &QueueId, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + QUEUE_KEY_BYTES + extra);
    k.push(tag);
    k.extend_from_slice(q.recipient_key.as_bytes());
    let ch = q.channel_id.as_bytes();
    // At most CHANNEL_ID_BYTES_MAX (16), so it fits a byte.
    k.push(ch.len() as u8);
    k.extend_from_slice(ch);
    k.resize(1 + QUEUE_KEY_BYTES, 0);
    k
}

/// Key of a queue's counters.
pub fn queue_meta_key(q: &QueueId) -> Vec<u8> {
    queue_key(TAG_QUEUE_META, q, 0)
}

/// Whether `key` is a [`queue_meta_key`].
pub fn is_queue_meta_key(key: &[u8]) -> bool {
    key.first() == Some(&TAG_QUEUE_META)
}

/// What every key of [`queue_meta_key`] starts with (the sweep walks them).
pub fn queue_meta_prefix() -> Vec<u8> {
    vec![TAG_QUEUE_META]
}

/// The queue a [`queue_meta_key`] names.
pub fn queue_of_meta_key(key: &[u8]) -> Result<QueueId, Corrupt> {
    let bad = Corrupt("queue counters key");
    if key.len() != 1 + QUEUE_KEY_BYTES || key[0] != TAG_QUEUE_META {
        return Err(bad);
    }
    let recipient_key = IdentityKey(array(
        &key[1..1 + IDENTITY_KEY_BYTES],
        "queue counters key",
    )?);
    let len = usize::from(key[1 + IDENTITY_KEY_BYTES]);
    let start = 2 + IDENTITY_KEY_BYTES;
    let channel = key.get(start..start + len).ok_or(bad.clone())?;
    let channel_id = ChannelId::try_from_slice(channel).map_err(|_| bad)?;
    Ok(QueueId {
        recipient_key,
        channel_id,
    })
}

/// What every key of [`fence_key`] starts with (the sweep walks them).
pub fn fence_prefix() -> Vec<u8> {
    vec![TAG_FENCE]
}

/// Key of the message at `seq` in a queue: a version-1 record below the
/// queue's [`QueueMeta::legacy_below`], an [`Entry`] from there on, under
/// the queue's short id from [`QueueMeta::short_from`] on.
pub fn message_key(q: &QueueId, meta: &QueueMeta, seq: u64) -> Vec<u8> {
    if meta.is_short(seq) {
        let mut k = short_key(TAG_SHORT_ENTRY, meta.qid, 8);
        k.extend_from_slice(&seq.to_be_bytes());
        return k;
    }
    let tag = if seq < meta.legacy_below {
        TAG_MESSAGE
    } else {
        TAG_ENTRY
    };
    let mut k = queue_key(tag, q, 8);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// What the keys of a queue's short-keyed entries start with: the key of
/// seq `s` is this and `s` big-endian ([`crate::store::Store::get_run`]).
/// The queue must have its short id.
pub fn short_entries_prefix(meta: &QueueMeta) -> Vec<u8> {
    short_key(TAG_SHORT_ENTRY, meta.qid, 8)
}

fn short_key(tag: u8, qid: u64, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + extra);
    k.push(tag);
    k.extend_from_slice(&qid.to_be_bytes());
    k
}

/// Key of the counter that numbers queues ([`QueueMeta::qid`]).
pub fn queue_next_key() -> Vec<u8> {
    vec![TAG_QUEUE_NEXT]
}

/// Key of a payload shared by several queues' entries.
pub fn blob_key(blob: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(TAG_BLOB);
    k.extend_from_slice(&blob.to_be_bytes());
    k
}

/// Key of a shared payload's reference count (kept apart from the payload
/// so an acknowledgement rewrites eight bytes, not the payload).
pub fn blob_refs_key(blob: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(TAG_BLOB_REFS);
    k.extend_from_slice(&blob.to_be_bytes());
    k
}

/// Key of the counter that numbers shared payloads.
pub fn blob_next_key() -> Vec<u8> {
    vec![TAG_BLOB_NEXT]
}

/// Key of the commit fence of one MLS group on one channel: the channel
/// (as in a queue key, without a recipient) and a digest of the group id.
pub fn fence_key(channel: &ChannelId, group_digest: &[u8; 32]) -> Vec<u8> {
    let ch = channel.as_bytes();
    let mut k = Vec::with_capacity(2 + CHANNEL_ID_BYTES_MAX + FENCE_GROUP_BYTES);
    k.push(TAG_FENCE);
    // At most CHANNEL_ID_BYTES_MAX (16), so it fits a byte.
    k.push(ch.len() as u8);
    k.extend_from_slice(ch);
    k.resize(2 + CHANNEL_ID_BYTES_MAX, 0);
    k.extend_from_slice(&group_digest[..FENCE_GROUP_BYTES]);
    k
}

/// Key of the dedup record of `message_id` from `sender` in a queue whose
/// counters are `meta` (value: its seq): under the queue's short id once
/// it has one, else [`long_dedup_key`]. Two senders may use the same id;
/// each is its own message.
pub fn dedup_key(
    q: &QueueId,
    meta: &QueueMeta,
    sender: &IdentityKey,
    message_id: &MessageId,
) -> Vec<u8> {
    if meta.qid == 0 {
        return long_dedup_key(q, sender, message_id);
    }
    let mut k = short_key(
        TAG_SHORT_DEDUP,
        meta.qid,
        MESSAGE_ID_BYTES + IDENTITY_KEY_BYTES,
    );
    k.extend_from_slice(&message_id.0);
    k.extend_from_slice(sender.as_bytes());
    k
}

/// Key of a format-3 dedup record (queue, sender and id): where a queue
/// without a short id keeps them, and where those written before it got
/// one stay until they leave the dedup window.
pub fn long_dedup_key(q: &QueueId, sender: &IdentityKey, message_id: &MessageId) -> Vec<u8> {
    let mut k = queue_key(TAG_SENDER_DEDUP, q, IDENTITY_KEY_BYTES + MESSAGE_ID_BYTES);
    k.extend_from_slice(sender.as_bytes());
    k.extend_from_slice(&message_id.0);
    k
}

/// Key of a format-2 dedup record: `message_id` in a queue whatever its
/// sender (value: its seq). Read, and deleted as it leaves the window;
/// never written.
pub fn legacy_dedup_key(q: &QueueId, message_id: &MessageId) -> Vec<u8> {
    let mut k = queue_key(TAG_DEDUP, q, MESSAGE_ID_BYTES);
    k.extend_from_slice(&message_id.0);
    k
}

/// Value of a dedup ring record: the sender and the message id.
pub fn encode_dedup_ring(sender: &IdentityKey, message_id: &MessageId) -> Vec<u8> {
    let mut v = Vec::with_capacity(IDENTITY_KEY_BYTES + MESSAGE_ID_BYTES);
    v.extend_from_slice(sender.as_bytes());
    v.extend_from_slice(&message_id.0);
    v
}

/// The dedup record the ring record of `seq` points to: the sender and
/// the id, or the id alone in a format-2 ring record; short if `seq` is.
pub fn decode_dedup_ring(
    q: &QueueId,
    meta: &QueueMeta,
    seq: u64,
    bytes: &[u8],
) -> Result<Vec<u8>, Corrupt> {
    if bytes.len() == MESSAGE_ID_BYTES {
        return Ok(legacy_dedup_key(q, &decode_message_id(bytes)?));
    }
    let (sender, id) = bytes
        .split_at_checked(IDENTITY_KEY_BYTES)
        .ok_or(Corrupt("dedup ring record"))?;
    let sender = IdentityKey(array(sender, "dedup ring sender")?);
    let id = decode_message_id(id)?;
    Ok(if meta.is_short(seq) {
        dedup_key(q, meta, &sender, &id)
    } else {
        long_dedup_key(q, &sender, &id)
    })
}

/// Key of the ring record that remembers which message got `seq`, so its
/// dedup record can be dropped when it leaves the dedup window.
pub fn dedup_ring_key(q: &QueueId, meta: &QueueMeta, seq: u64) -> Vec<u8> {
    let mut k = if meta.is_short(seq) {
        short_key(TAG_SHORT_DEDUP_RING, meta.qid, 8)
    } else {
        queue_key(TAG_DEDUP_RING, q, 8)
    };
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A queue's counters. Messages `head..next_seq` are stored; everything
/// before `head` was acknowledged. `next_seq` only ever grows, so a seq is
/// never reused, even after the queue empties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueMeta {
    /// The seq the next enqueue gets.
    pub next_seq: u64,
    /// The oldest unacknowledged seq (equals `next_seq` when empty).
    pub head: u64,
    /// Payload bytes stored.
    pub bytes: u64,
    /// Messages below this seq are version-1 records (a queue written
    /// before format 2); 0 when there are none.
    pub legacy_below: u64,
    /// Seqs below this were dropped by the message TTL (or acknowledged
    /// before that); a cursor below it has a gap.
    pub expired_below: u64,
    /// Dedup records of seqs below this are format-2 records, keyed by
    /// queue and id only ([`legacy_dedup_key`]); 0 when there are none.
    pub sender_dedup_from: u64,
    /// The queue's short id, or 0 before its first enqueue in format 4.
    pub qid: u64,
    /// With a short id: the records of seqs from here on are keyed by it,
    /// those below by the long queue key (written before it had one).
    pub short_from: u64,
}

impl Default for QueueMeta {
    fn default() -> Self {
        // Seqs start at 1 so `after_seq = 0` means "nothing seen yet".
        QueueMeta {
            next_seq: 1,
            head: 1,
            bytes: 0,
            legacy_below: 0,
            expired_below: 0,
            sender_dedup_from: 0,
            qid: 0,
            short_from: 1,
        }
    }
}

impl QueueMeta {
    /// Messages stored.
    pub fn depth(&self) -> u64 {
        self.next_seq.saturating_sub(self.head)
    }

    /// Whether a format-2 dedup record may still be inside the dedup
    /// window, so an enqueue must look for one too.
    pub fn has_legacy_dedup(&self) -> bool {
        self.sender_dedup_from > self.next_seq.saturating_sub(DEDUP_WINDOW_PER_QUEUE)
    }

    /// Whether the records of `seq` are keyed by the queue's short id.
    pub fn is_short(&self, seq: u64) -> bool {
        self.qid != 0 && seq >= self.short_from
    }

    /// Whether a format-3 dedup record (long key) written before the queue
    /// got its short id may still be inside the dedup window.
    pub fn has_long_dedup(&self) -> bool {
        self.qid != 0 && self.short_from > self.next_seq.saturating_sub(DEDUP_WINDOW_PER_QUEUE)
    }

    /// Gives the queue the short id `qid`: its records from the next seq on
    /// are keyed by it.
    pub fn shorten(&mut self, qid: u64) {
        self.qid = qid;
        self.short_from = self.next_seq;
    }

    /// Encodes the record (format 4: eight counters).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        for n in [
            self.next_seq,
            self.head,
            self.bytes,
            self.legacy_below,
            self.expired_below,
            self.sender_dedup_from,
            self.qid,
            self.short_from,
        ] {
            v.extend_from_slice(&n.to_be_bytes());
        }
        v
    }

    /// Decodes the record. A format-1 record (three counters) belongs to a
    /// queue whose every stored message is a version-1 record; in a format-1
    /// or format-2 record (five counters) every dedup record is keyed by
    /// queue and id only; a record before format 4 (six counters) has no
    /// short id, so all its records are long.
    pub fn decode(bytes: &[u8]) -> Result<Self, Corrupt> {
        let [
            next_seq,
            head,
            bytes,
            legacy_below,
            expired_below,
            sender_dedup_from,
            qid,
            short_from,
        ] = match bytes.len() {
            24 => {
                let [next_seq, head, b] = u64s::<3>(bytes, "queue counters")?;
                [next_seq, head, b, next_seq, 0, next_seq, 0, next_seq]
            }
            40 => {
                let [next_seq, head, b, legacy, expired] = u64s::<5>(bytes, "queue counters")?;
                [next_seq, head, b, legacy, expired, next_seq, 0, next_seq]
            }
            48 => {
                let [next_seq, head, b, legacy, expired, sender] =
                    u64s::<6>(bytes, "queue counters")?;
                [next_seq, head, b, legacy, expired, sender, 0, next_seq]
            }
            _ => u64s::<8>(bytes, "queue counters")?,
        };
        if head > next_seq
            || head == 0
            || legacy_below > next_seq
            || expired_below > head
            || sender_dedup_from > next_seq
            || short_from > next_seq
            || (qid != 0 && short_from < legacy_below.max(1))
        {
            return Err(Corrupt("queue counters out of order"));
        }
        Ok(QueueMeta {
            next_seq,
            head,
            bytes,
            legacy_below,
            expired_below,
            sender_dedup_from,
            qid,
            short_from,
        })
    }
}

const ENTRY_INLINE: u8 = 0;
const ENTRY_SHARED: u8 = 1;

/// A queue's message as stored: its payload inline, or a reference to a
/// payload stored once for all recipients of an `enqueueBatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The payload itself.
    Inline(Vec<u8>),
    /// A shared payload.
    Shared {
        /// Which blob ([`blob_key`]).
        blob: u64,
        /// Its length, so acknowledging needs no read of the payload.
        len: u64,
    },
}

/// Bytes before an entry's payload or reference: kind, message id, the
/// enqueue time (milliseconds of the machine's clock).
const ENTRY_HEADER_BYTES: usize = 1 + MESSAGE_ID_BYTES + 8;

fn entry_header(kind: u8, message_id: &MessageId, stamp_ms: u64, extra: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENTRY_HEADER_BYTES + extra);
    v.push(kind);
    v.extend_from_slice(&message_id.0);
    v.extend_from_slice(&stamp_ms.to_be_bytes());
    v
}

/// Encodes an inline entry: kind, message id, enqueue time, payload.
pub fn encode_inline(message_id: &MessageId, stamp_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = entry_header(ENTRY_INLINE, message_id, stamp_ms, payload.len());
    v.extend_from_slice(payload);
    v
}

/// Encodes a shared entry: kind, message id, enqueue time, blob number,
/// payload length.
pub fn encode_shared(message_id: &MessageId, stamp_ms: u64, blob: u64, len: u64) -> Vec<u8> {
    let mut v = entry_header(ENTRY_SHARED, message_id, stamp_ms, 16);
    v.extend_from_slice(&blob.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Decodes a stored message — a version-1 record (`legacy`: message id,
/// payload) or an entry — into the entry and its enqueue time (none for a
/// version-1 record), reusing the buffer for an inline payload.
pub fn decode_entry(bytes: &[u8], legacy: bool) -> Result<(Entry, Option<u64>), Corrupt> {
    if legacy {
        let payload = bytes
            .get(MESSAGE_ID_BYTES..)
            .ok_or(Corrupt("message record too short"))?;
        return Ok((Entry::Inline(payload.to_vec()), None));
    }
    if bytes.len() < ENTRY_HEADER_BYTES {
        return Err(Corrupt("message entry too short"));
    }
    let stamp = u64::from_be_bytes(array(
        &bytes[1 + MESSAGE_ID_BYTES..ENTRY_HEADER_BYTES],
        "message entry time",
    )?);
    let entry = match bytes[0] {
        ENTRY_INLINE => Entry::Inline(bytes[ENTRY_HEADER_BYTES..].to_vec()),
        ENTRY_SHARED => {
            let [blob, len] = u64s::<2>(&bytes[ENTRY_HEADER_BYTES..], "shared message entry")?;
            Entry::Shared { blob, len }
        }
        _ => return Err(Corrupt("message entry of unknown kind")),
    };
    Ok((entry, Some(stamp)))
}

/// Bytes of a stored message that [`decode_entry_head`] needs: an entry's
/// header and a shared entry's reference.
pub const ENTRY_HEAD_BYTES: usize = ENTRY_HEADER_BYTES + 16;

/// What a stored message is, without its payload: read from the first
/// [`ENTRY_HEAD_BYTES`] of the record and the record's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHead {
    /// Payload bytes the message stands for.
    pub payload_len: u64,
    /// The shared payload it refers to, if any.
    pub blob: Option<u64>,
    /// Its enqueue time (none for a version-1 record).
    pub stamp_ms: Option<u64>,
}

/// Decodes [`EntryHead`] from `head` (the record's first bytes, at most
/// [`ENTRY_HEAD_BYTES`]) and the record's whole length `len`; `legacy` as
/// in [`decode_entry`].
pub fn decode_entry_head(head: &[u8], len: usize, legacy: bool) -> Result<EntryHead, Corrupt> {
    if legacy {
        let payload = len
            .checked_sub(MESSAGE_ID_BYTES)
            .ok_or(Corrupt("message record too short"))?;
        return Ok(EntryHead {
            payload_len: payload as u64,
            blob: None,
            stamp_ms: None,
        });
    }
    if len < ENTRY_HEADER_BYTES || head.len() < ENTRY_HEADER_BYTES {
        return Err(Corrupt("message entry too short"));
    }
    let stamp = u64::from_be_bytes(array(
        &head[1 + MESSAGE_ID_BYTES..ENTRY_HEADER_BYTES],
        "message entry time",
    )?);
    let (payload_len, blob) = match head[0] {
        ENTRY_INLINE => ((len - ENTRY_HEADER_BYTES) as u64, None),
        ENTRY_SHARED => {
            let reference = head
                .get(ENTRY_HEADER_BYTES..ENTRY_HEAD_BYTES)
                .filter(|_| len == ENTRY_HEAD_BYTES)
                .ok_or(Corrupt("shared message entry"))?;
            let [blob, payload_len] = u64s::<2>(reference, "shared message entry")?;
            (payload_len, Some(blob))
        }
        _ => return Err(Corrupt("message entry of unknown kind")),
    };
    Ok(EntryHead {
        payload_len,
        blob,
        stamp_ms: Some(stamp),
    })
}

/// Bytes of the payload digest a fence keeps.
pub const COMMIT_DIGEST_BYTES: usize = 16;

/// The commit fence of one group on one channel: the epoch whose Commit is
/// accepted next, and digests of the Commits accepted for the epochs before
/// it (so the same Commit sent again — to the next recipient, or as a
/// retry, also after the group moved on — is not refused as stale).
///
/// Encoded as the epoch (8 bytes, big-endian), 1 to
/// [`COMMIT_FENCE_HISTORY`] digests, newest first, and (from format 3)
/// the time its last Commit was accepted, in ms (8 bytes, big-endian): a
/// length of 8 + 16 n says which. A record with one digest and no time is
/// the layout format 2 first wrote, so it needs no upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The epoch the group is at: the next Commit accepted is for it.
    pub epoch: u64,
    /// SHA-256 (truncated) of the payloads accepted for `epoch - 1`,
    /// `epoch - 2`, …: newest first, never empty.
    pub accepted: Vec<[u8; COMMIT_DIGEST_BYTES]>,
    /// When the last Commit was accepted (ms of the machine's clock); none
    /// in a record written before format 3. The sweep deletes a fence idle
    /// for longer than the fence TTL.
    pub touched_ms: Option<u64>,
}

impl Fence {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + COMMIT_DIGEST_BYTES * self.accepted.len());
        v.extend_from_slice(&self.epoch.to_be_bytes());
        for d in &self.accepted {
            v.extend_from_slice(d);
        }
        if let Some(ms) = self.touched_ms {
            v.extend_from_slice(&ms.to_be_bytes());
        }
        v
    }

    /// Decodes the record.
    pub fn decode(bytes: &[u8]) -> Result<Self, Corrupt> {
        let (epoch, mut digests) = bytes.split_at_checked(8).ok_or(Corrupt("commit fence"))?;
        let mut touched_ms = None;
        if digests.len() % COMMIT_DIGEST_BYTES == 8 {
            let (d, ms) = digests.split_at(digests.len() - 8);
            touched_ms = Some(u64::from_be_bytes(array(ms, "commit fence")?));
            digests = d;
        }
        let n = digests.len() / COMMIT_DIGEST_BYTES;
        if digests.len() % COMMIT_DIGEST_BYTES != 0 || n == 0 || n > COMMIT_FENCE_HISTORY {
            return Err(Corrupt("commit fence"));
        }
        Ok(Fence {
            epoch: u64::from_be_bytes(array(epoch, "commit fence")?),
            accepted: digests
                .chunks_exact(COMMIT_DIGEST_BYTES)
                .map(|d| array(d, "commit fence"))
                .collect::<Result<_, _>>()?,
            touched_ms,
        })
    }

    /// Whether `digest` is the Commit accepted for `epoch` (one the fence
    /// still remembers).
    pub fn accepted_for(&self, epoch: u64, digest: &[u8; COMMIT_DIGEST_BYTES]) -> bool {
        self.epoch
            .checked_sub(epoch)
            .and_then(|back| back.checked_sub(1))
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.accepted.get(i))
            .is_some_and(|d| d == digest)
    }

    /// The fence after accepting `digest` for `epoch` (the fence's epoch or
    /// a later one): the history carries on only if no epoch was skipped.
    pub fn advance(self, epoch: u64, digest: [u8; COMMIT_DIGEST_BYTES]) -> Option<Fence> {
        let next = epoch.checked_add(1)?;
        let mut accepted = vec![digest];
        if epoch == self.epoch {
            accepted.extend(self.accepted.into_iter().take(COMMIT_FENCE_HISTORY - 1));
        }
        Some(Fence {
            epoch: next,
            accepted,
            touched_ms: self.touched_ms,
        })
    }
}

/// Encodes a seq.
pub fn encode_seq(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

/// Decodes a seq.
pub fn decode_seq(bytes: &[u8]) -> Result<u64, Corrupt> {
    Ok(u64::from_be_bytes(array(bytes, "seq")?))
}

/// Decodes a message id.
pub fn decode_message_id(bytes: &[u8]) -> Result<MessageId, Corrupt> {
    Ok(MessageId(array(bytes, "message id")?))
}

fn array<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], Corrupt> {
    <[u8; N]>::try_from(bytes).map_err(|_| Corrupt(what))
}

fn u64s<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u64; N], Corrupt> {
    if bytes.len() != N * 8 {
        return Err(Corrupt(what));
    }
    let mut out = [0u64; N];
    for (o, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *o = u64::from_be_bytes(array(chunk, what)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ChannelId;

    fn q(ch: &[u8]) -> QueueId {
        QueueId {
            recipient_key: IdentityKey([1; 32]),
            channel_id: ChannelId::try_from_slice(ch).unwrap(),
        }
    }

    #[test]
    fn queue_keys_have_fixed_width_and_distinct_channels() {
        assert_eq!(
            queue_meta_key(&q(b"")).len(),
            queue_meta_key(&q(&[7; 16])).len()
        );
        // A channel of one zero byte is not the default channel.
        assert_ne!(queue_meta_key(&q(b"")), queue_meta_key(&q(&[0])));
        let m = QueueMeta::default();
        assert_ne!(message_key(&q(b"a"), &m, 1), message_key(&q(b"b"), &m, 1));
    }

    #[test]
    fn an_entry_head_says_what_the_whole_entry_says() {
        let id = MessageId([5; 16]);
        let head_of = |record: &[u8], legacy: bool| {
            let n = record.len().min(ENTRY_HEAD_BYTES);
            decode_entry_head(&record[..n], record.len(), legacy)
        };
        for payload in [&b"x"[..], &[7; 16], &[9; 1024]] {
            let record = encode_inline(&id, 77, payload);
            let (entry, stamp) = decode_entry(&record, false).unwrap();
            assert_eq!(entry, Entry::Inline(payload.to_vec()));
            let head = head_of(&record, false).unwrap();
            assert_eq!(head.payload_len, payload.len() as u64);
            assert_eq!((head.blob, head.stamp_ms), (None, stamp));
            // A version-1 record: message id, then the payload.
            let mut v1 = id.0.to_vec();
            v1.extend_from_slice(payload);
            let head = head_of(&v1, true).unwrap();
            assert_eq!(head.payload_len, payload.len() as u64);
            assert_eq!((head.blob, head.stamp_ms), (None, None));
        }
        let record = encode_shared(&id, 78, 42, 1000);
        assert_eq!(
            head_of(&record, false),
            Ok(EntryHead {
                payload_len: 1000,
                blob: Some(42),
                stamp_ms: Some(78)
            })
        );
        assert!(head_of(&record[..30], false).is_err());
        assert!(head_of(&[9; 41], false).is_err(), "unknown kind");
        assert!(head_of(&[0; 3], true).is_err());
    }

    #[test]
    fn dedup_ring_records_name_their_dedup_record_in_every_format() {
        let (queue, sender, id) = (q(b"a"), IdentityKey([8; 32]), MessageId([3; 16]));
        let ring = encode_dedup_ring(&sender, &id);
        // A queue without a short id keeps format-3 records.
        let long = QueueMeta::default();
        assert_eq!(
            dedup_key(&queue, &long, &sender, &id),
            long_dedup_key(&queue, &sender, &id)
        );
        assert_eq!(
            decode_dedup_ring(&queue, &long, 1, &ring),
            Ok(long_dedup_key(&queue, &sender, &id))
        );
        // One that got its short id at seq 5: short from there on, long
        // below.
        let mut short = QueueMeta {
            next_seq: 5,
            ..QueueMeta::default()
        };
        short.shorten(7);
        let key = dedup_key(&queue, &short, &sender, &id);
        assert_eq!(key.len(), 1 + 8 + 16 + 32);
        assert_eq!(decode_dedup_ring(&queue, &short, 5, &ring), Ok(key.clone()));
        assert_eq!(
            decode_dedup_ring(&queue, &short, 4, &ring),
            Ok(long_dedup_key(&queue, &sender, &id))
        );
        assert_ne!(
            dedup_ring_key(&queue, &short, 4),
            dedup_ring_key(&queue, &short, 5)
        );
        assert_eq!(dedup_ring_key(&queue, &short, 5).len(), 17);
        // A format-2 ring record holds the id alone.
        assert_eq!(
            decode_dedup_ring(&queue, &short, 2, &id.0),
            Ok(legacy_dedup_key(&queue, &id))
        );
        assert!(decode_dedup_ring(&queue, &short, 5, &[1; 20]).is_err());
        // Two senders' records of one id are two keys, and neither is the
        // format-2 key.
        for meta in [long, short] {
            let other = dedup_key(&queue, &meta, &IdentityKey([9; 32]), &id);
            assert_ne!(dedup_key(&queue, &meta, &sender, &id), other);
            assert_ne!(legacy_dedup_key(&queue, &id), other);
        }
        // Two queues' short keys differ by their ids.
        let mut other_queue = short;
        other_queue.qid = 8;
        assert_ne!(
            dedup_key(&queue, &short, &sender, &id),
            dedup_key(&queue, &other_queue, &sender, &id)
        );
    }

    #[test]
    fn message_keys_sort_by_seq_and_are_short_from_the_queue_id_on() {
        let m = QueueMeta::default();
        assert!(message_key(&q(b"a"), &m, 255) < message_key(&q(b"a"), &m, 256));
        let mut m = QueueMeta {
            next_seq: 300,
            legacy_below: 2,
            ..QueueMeta::default()
        };
        m.shorten(1);
        assert_eq!(message_key(&q(b"a"), &m, 300).len(), 17);
        assert_eq!(
            message_key(&q(b"a"), &m, 300),
            crate::store::run_key(&short_entries_prefix(&m), 300),
            "a run reads the entries' keys"
        );
        assert_eq!(
            message_key(&q(b"a"), &m, 299).len(),
            1 + QUEUE_KEY_BYTES + 8
        );
        assert_eq!(message_key(&q(b"a"), &m, 1)[0], TAG_MESSAGE);
        assert!(message_key(&q(b"a"), &m, 300) < message_key(&q(b"a"), &m, 301));
        assert!(message_key(&q(b"a"), &m, 511) < message_key(&q(b"a"), &m, 512));
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let m = QueueMeta {
            next_seq: 9,
            head: 4,
            bytes: 77,
            legacy_below: 6,
            expired_below: 3,
            sender_dedup_from: 5,
            qid: 12,
            short_from: 7,
        };
        assert_eq!(QueueMeta::decode(&m.encode()), Ok(m));
        assert!(QueueMeta::decode(&[1, 2, 3]).is_err());
        // A format-3 record (six counters) has no short id.
        assert_eq!(
            QueueMeta::decode(&m.encode()[..48]),
            Ok(QueueMeta {
                qid: 0,
                short_from: 9,
                ..m
            })
        );
        for bad in [
            QueueMeta {
                short_from: 10,
                ..m
            },
            QueueMeta { short_from: 5, ..m },
        ] {
            assert!(QueueMeta::decode(&bad.encode()).is_err(), "{bad:?}");
        }
        // A format-2 record (five counters): every dedup record so far is
        // keyed by queue and id.
        let v2 = &m.encode()[..40];
        assert_eq!(
            QueueMeta::decode(v2),
            Ok(QueueMeta {
                sender_dedup_from: 9,
                qid: 0,
                short_from: 9,
                ..m
            })
        );
        assert!(
            QueueMeta::decode(
                &QueueMeta {
                    sender_dedup_from: 10,
                    ..m
                }
                .encode()
            )
            .is_err()
        );
        assert!(
            QueueMeta::decode(
                &QueueMeta {
                    legacy_below: 10,
                    ..m
                }
                .encode()
            )
            .is_err()
        );
        let k = KpMeta { head: 2, tail: 5 };
        assert_eq!(KpMeta::decode(&k.encode()), Ok(k));
        assert!(KpMeta::decode(&KpMeta { head: 6, tail: 5 }.encode()).is_err());
        let id = MessageId([3; 16]);
        let rec = encode_inline(&id, 5, b"hi");
        assert_eq!(
            decode_entry(&rec, false),
            Ok((Entry::Inline(b"hi".to_vec()), Some(5)))
        );
        let rec = encode_shared(&id, 6, 7, 1_000);
        assert_eq!(
            decode_entry(&rec, false),
            Ok((
                Entry::Shared {
                    blob: 7,
                    len: 1_000
                },
                Some(6)
            ))
        );
        assert!(decode_entry(&rec[..30], false).is_err());
        assert!(decode_entry(&[9; 40], false).is_err());
        assert!(decode_entry(&[0; 3], false).is_err());
        let f = Fence {
            epoch: 4,
            accepted: vec![[5; COMMIT_DIGEST_BYTES]],
            touched_ms: None,
        };
        assert_eq!(Fence::decode(&f.encode()), Ok(f.clone()));
        let stamped = Fence {
            touched_ms: Some(77),
            ..f.clone()
        };
        assert_eq!(Fence::decode(&stamped.encode()), Ok(stamped));
        assert!(Fence::decode(&[0; 8]).is_err());
        assert!(Fence::decode(&[0; 8 + COMMIT_DIGEST_BYTES + 1]).is_err());
        assert!(Fence::decode(&[0; 8 + COMMIT_DIGEST_BYTES * (COMMIT_FENCE_HISTORY + 1)]).is_err());
        // Each accepted Commit goes in front; the history keeps its bound
        // and starts over when an epoch was skipped.
        let mut g = f.clone();
        for e in 4..4 + COMMIT_FENCE_HISTORY as u64 + 5 {
            g = g.advance(e, [e as u8; COMMIT_DIGEST_BYTES]).unwrap();
            assert_eq!(Fence::decode(&g.encode()), Ok(g.clone()));
        }
        assert_eq!(g.accepted.len(), COMMIT_FENCE_HISTORY);
        assert!(g.accepted_for(g.epoch - 1, &[(g.epoch - 1) as u8; COMMIT_DIGEST_BYTES]));
        let oldest = g.epoch - COMMIT_FENCE_HISTORY as u64;
        assert!(g.accepted_for(oldest, &[oldest as u8; COMMIT_DIGEST_BYTES]));
        assert!(!g.accepted_for(oldest - 1, &[(oldest - 1) as u8; COMMIT_DIGEST_BYTES]));
        assert!(!g.accepted_for(g.epoch, &[g.epoch as u8; COMMIT_DIGEST_BYTES]));
        let skipped = g.advance(100, [1; COMMIT_DIGEST_BYTES]).unwrap();
        assert_eq!((skipped.epoch, skipped.accepted.len()), (101, 1));
        assert_eq!(f.advance(u64::MAX, [0; COMMIT_DIGEST_BYTES]), None);
    }

    // A store written by format 1: whole records under the old tag, three
    // counters per queue. Format 2 reads them where they are.
    #[test]
    fn format_1_records_stay_readable() {
        let mut v1 = Vec::new();
        for n in [5u64, 2, 100] {
            v1.extend_from_slice(&n.to_be_bytes());
        }
        let meta = QueueMeta::decode(&v1).unwrap();
        assert_eq!(meta.legacy_below, 5);
        let mut old_key = vec![TAG_MESSAGE];
        old_key.extend_from_slice(&message_key(&q(b"a"), &meta, 3)[1..]);
        assert_eq!(message_key(&q(b"a"), &meta, 3), old_key);
        assert_eq!(message_key(&q(b"a"), &meta, 5)[0], TAG_ENTRY);
        let mut record = vec![3; MESSAGE_ID_BYTES];
        record.extend_from_slice(b"payload");
        assert_eq!(
            decode_entry(&record, true),
            Ok((Entry::Inline(b"payload".to_vec()), None))
        );
    }
}
