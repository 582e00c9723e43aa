//! The Delivery Service's queues: enqueue (with its dedup window, its
//! shared payloads and the commit fence), acknowledgement, expiry by the
//! message TTL, and the reference counts of shared payloads.
//!
//! Invariants it keeps (ARCHITECTURE.md § Guarantees, "Queues",
//! "Idempotent enqueue", "Fan-out"):
//! - Per queue, `seq` is strictly increasing, gap-free, and never reused:
//!   only `enqueue` issues seqs, from the queue's `next_seq`, writing the new
//!   counters in the batch that stores the entries; acknowledgement and
//!   expiry only move the head.
//! - An enqueue is one atomic batch (entries, dedup records, shared
//!   payloads, fence, counters), written only after every check passed, so
//!   a refused one stores nothing (only the rate-limit tokens it took stay
//!   spent); the machine's own state (the next shared-payload number,
//!   waiters) changes only after the write.
//! - A retry from the same sender within the dedup window gets its
//!   original seq and stores nothing.
//! - A shared payload is deleted in the batch that drops its last
//!   reference ([`BlobDrops`], `finish_drops`).
//! - A queue holds at most `queue_depth_max` messages and
//!   `queue_bytes_max` payload bytes; expired messages make room first.

use std::collections::BTreeMap;

use crate::error::ServiceError;
use crate::limits;
use crate::store::{Batch, Store, run_key};
use crate::time::Time;
use crate::types::{ChannelId, ConnectionId, IdentityKey, QueueId};

use super::layout::{self, Entry, EntryHead, Fence, QueueMeta};
use super::{NodeService, Outgoing, check_list, corrupt, rate_limited, stamp_ms, store_failure};

/// References to shared payloads one batch drops, per payload.
#[derive(Debug, Default)]
pub(super) struct BlobDrops(BTreeMap<u64, u64>);

impl BlobDrops {
    /// Counts a dropped reference to shared payload `blob`, if any.
    fn count(&mut self, blob: Option<u64>) {
        if let Some(blob) = blob {
            *self.0.entry(blob).or_default() += 1;
        }
    }
}

/// An `enqueueBatch` names each recipient once, and not too many.
pub(super) fn check_recipients(
    recipients: &[IdentityKey],
    method: &str,
) -> Result<(), ServiceError> {
    check_list(
        recipients.iter(),
        limits::ENQUEUE_BATCH_RECIPIENTS_MAX,
        method,
        "recipient",
    )
}

/// An `enqueueMany` holds at least one message, at most
/// [`limits::ENQUEUE_MANY_MESSAGES_MAX`], each id once, at most
/// [`limits::ENQUEUE_MANY_BYTES_MAX`] payload bytes and at most
/// [`limits::ENQUEUE_MANY_ENTRIES_MAX`] entries in all.
pub(super) fn check_many(
    recipients: &[IdentityKey],
    messages: &[Outgoing],
) -> Result<(), ServiceError> {
    check_list(
        messages.iter().map(|m| &m.message_id),
        limits::ENQUEUE_MANY_MESSAGES_MAX,
        "enqueueMany",
        "message id",
    )?;
    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    if bytes > limits::ENQUEUE_MANY_BYTES_MAX {
        return Err(ServiceError::payload_too_large(format!(
            "enqueueMany carries {bytes} payload bytes, more than the limit of {}",
            limits::ENQUEUE_MANY_BYTES_MAX
        )));
    }
    let entries = recipients.len().saturating_mul(messages.len());
    if entries > limits::ENQUEUE_MANY_ENTRIES_MAX {
        return Err(ServiceError::invalid_argument(format!(
            "enqueueMany makes {entries} queue entries ({} recipients times {} messages), more than the limit of {}",
            recipients.len(),
            messages.len(),
            limits::ENQUEUE_MANY_ENTRIES_MAX
        )));
    }
    Ok(())
}

impl<S: Store> NodeService<S> {
    /// `enqueue` (one recipient, one message), `enqueueBatch` (one message)
    /// and `enqueueMany`: appends each message to the queue
    /// `(channel_id, r)` of every recipient `r`, in the order given, in one
    /// atomic batch, and returns the seqs message by message, each in
    /// recipient order. A recipient whose queue already holds a message's
    /// id from this sender (a retry) keeps its original seq for it and gets
    /// nothing new; another sender's message under the same id is another
    /// message.
    /// Several new entries of one message share one stored payload.
    pub(super) fn enqueue(
        &mut self,
        now: Time,
        conn: ConnectionId,
        recipients: Vec<IdentityKey>,
        channel_id: ChannelId,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<u64>, ServiceError> {
        let sender = self.identity(conn)?;
        let several = messages.len() > 1;
        for (m, message) in messages.iter().enumerate() {
            let which = || {
                if several {
                    format!("message #{m}: ")
                } else {
                    String::new()
                }
            };
            if message.payload.is_empty() {
                return Err(ServiceError::invalid_argument(format!(
                    "{}payload is empty",
                    which()
                )));
            }
            if message.payload.len() > self.config.payload_bytes_max {
                return Err(ServiceError::payload_too_large(format!(
                    "{}payload of {} bytes exceeds the limit of {}",
                    which(),
                    message.payload.len(),
                    self.config.payload_bytes_max
                )));
            }
        }
        let queues: Vec<QueueId> = recipients
            .iter()
            .map(|recipient_key| QueueId {
                recipient_key: *recipient_key,
                channel_id,
            })
            .collect();
        let mut metas = queues
            .iter()
            .map(|q| self.queue_meta(q))
            .collect::<Result<Vec<_>, _>>()?;
        // A retry of a stored message answers with the original seq, before
        // any limit: it costs nothing and the sender must learn its seq.
        let width = queues.len();
        let mut seqs = vec![0u64; width * messages.len()];
        // Per message, the recipients (by index) it is new to.
        let mut fresh: Vec<Vec<usize>> = Vec::with_capacity(messages.len());
        for (m, message) in messages.iter().enumerate() {
            let mut new = Vec::new();
            for (i, (queue, meta)) in queues.iter().zip(&metas).enumerate() {
                let id = &message.message_id;
                let mut stored = self.get(&layout::dedup_key(queue, meta, &sender, id))?;
                if stored.is_none() && meta.has_long_dedup() {
                    stored = self.get(&layout::long_dedup_key(queue, &sender, id))?;
                }
                if stored.is_none() && meta.has_legacy_dedup() {
                    stored = self.get(&layout::legacy_dedup_key(queue, id))?;
                }
                match stored {
                    Some(seq) => seqs[m * width + i] = layout::decode_seq(&seq).map_err(corrupt)?,
                    None => new.push(i),
                }
            }
            fresh.push(new);
        }
        let new_messages = fresh.iter().filter(|f| !f.is_empty()).count();
        if new_messages == 0 {
            return Ok(seqs);
        }
        // Commits pass the fence in order; one moved by an earlier message
        // of this request is the one a later Commit meets.
        let mut fences: Vec<(Vec<u8>, Fence)> = Vec::new();
        for (message, new) in messages.iter().zip(&fresh) {
            if new.is_empty() {
                continue;
            }
            if let Some((key, fence)) = self.fence_check(&channel_id, &message.payload, &fences)? {
                fences.retain(|(k, _)| *k != key);
                fences.push((key, fence));
            }
        }
        let tokens = u32::try_from(new_messages).unwrap_or(u32::MAX);
        self.enqueue_limiter
            .acquire_many(now, sender, tokens)
            .map_err(|ms| rate_limited(ms, "enqueues from this identity"))?;
        // What each queue takes: new entries and bytes.
        let mut adds = vec![(0u64, 0u64); width];
        for (message, new) in messages.iter().zip(&fresh) {
            for i in new {
                adds[*i].0 += 1;
                adds[*i].1 = adds[*i].1.saturating_add(message.payload.len() as u64);
            }
        }
        let mut batch = Batch::new();
        let mut drops = BlobDrops::default();
        for (i, (queue, meta)) in queues.iter().zip(&mut metas).enumerate() {
            let (entries, bytes) = adds[i];
            if entries == 0 {
                continue;
            }
            // Expired messages make room before the limits are checked.
            self.expire(now, queue, meta, &mut batch, &mut drops)?;
            // Named only when refused: this is the enqueue hot path.
            let whose = || {
                if width == 1 {
                    "the recipient's queue".to_owned()
                } else {
                    format!("recipient #{i}'s queue")
                }
            };
            if meta.depth().saturating_add(entries) > self.config.queue_depth_max {
                return Err(ServiceError::queue_full(format!(
                    "{} holds {} messages, its limit is {}",
                    whose(),
                    meta.depth(),
                    self.config.queue_depth_max
                )));
            }
            if meta.bytes.saturating_add(bytes) > self.config.queue_bytes_max {
                return Err(ServiceError::queue_full(format!(
                    "{} would exceed its limit of {} bytes",
                    whose(),
                    self.config.queue_bytes_max
                )));
            }
        }
        // A queue written for the first time in format 4 gets its short id.
        // Another machine on a shared store may have numbered queues and
        // payloads since: read the counters where they are used.
        if self.store.shared() {
            let numbers_queue = metas
                .iter()
                .zip(&adds)
                .any(|(meta, (entries, _))| *entries > 0 && meta.qid == 0);
            if numbers_queue {
                self.next_qid = self.stored_counter(layout::queue_next_key(), 1)?;
            }
            if fresh.iter().any(|new| new.len() > 1) {
                self.next_blob = self.stored_counter(layout::blob_next_key(), 0)?;
            }
        }
        let mut next_qid = self.next_qid;
        for (meta, (entries, _)) in metas.iter_mut().zip(&adds) {
            if *entries > 0 && meta.qid == 0 {
                meta.shorten(next_qid);
                next_qid += 1;
            }
        }
        let mut next_blob = self.next_blob;
        let stamp = stamp_ms(now);
        for (m, (message, new)) in messages.into_iter().zip(&fresh).enumerate() {
            if new.is_empty() {
                continue;
            }
            let len = message.payload.len() as u64;
            let message_id = message.message_id;
            // One new entry holds the payload itself; several share one copy.
            let mut inline = Some(message.payload);
            let mut blob = None;
            if new.len() > 1 {
                if let Some(payload) = inline.take() {
                    batch.put(layout::blob_key(next_blob), payload);
                }
                batch.put(
                    layout::blob_refs_key(next_blob),
                    layout::encode_seq(new.len() as u64),
                );
                blob = Some(next_blob);
                next_blob += 1;
            }
            for i in new {
                let queue = &queues[*i];
                let meta = &mut metas[*i];
                let seq = meta.next_seq;
                // A single new entry takes the payload; shared ones point to
                // the blob (`new` is never empty here).
                let entry = match (blob, inline.take()) {
                    (Some(blob), _) => layout::encode_shared(&message_id, stamp, blob, len),
                    (None, Some(payload)) => layout::encode_inline(&message_id, stamp, &payload),
                    (None, None) => continue,
                };
                batch.put(layout::message_key(queue, meta, seq), entry);
                batch.put(
                    layout::dedup_key(queue, meta, &sender, &message_id),
                    layout::encode_seq(seq),
                );
                batch.put(
                    layout::dedup_ring_key(queue, meta, seq),
                    layout::encode_dedup_ring(&sender, &message_id),
                );
                // The message leaving the window was stored by an earlier
                // request: one request holds fewer messages than the window.
                if let Some(old) = seq
                    .checked_sub(limits::DEDUP_WINDOW_PER_QUEUE)
                    .filter(|s| *s > 0)
                {
                    let ring = layout::dedup_ring_key(queue, meta, old);
                    if let Some(record) = self.get(&ring)? {
                        batch.delete(
                            layout::decode_dedup_ring(queue, meta, old, &record)
                                .map_err(corrupt)?,
                        );
                    }
                    batch.delete(ring);
                }
                meta.next_seq += 1;
                meta.bytes = meta.bytes.saturating_add(len);
                seqs[m * width + *i] = seq;
            }
        }
        for (i, (queue, meta)) in queues.iter().zip(&metas).enumerate() {
            if adds[i].0 > 0 {
                batch.put(layout::queue_meta_key(queue), meta.encode());
            }
        }
        if next_blob != self.next_blob {
            batch.put(layout::blob_next_key(), layout::encode_seq(next_blob));
        }
        if next_qid != self.next_qid {
            batch.put(layout::queue_next_key(), layout::encode_seq(next_qid));
        }
        for (key, mut fence) in fences {
            fence.touched_ms = Some(stamp);
            batch.put(key, fence.encode());
        }
        self.finish_drops(drops, &mut batch)?;
        self.write(batch)?;
        self.next_blob = next_blob;
        self.next_qid = next_qid;
        for (queue, (entries, _)) in queues.iter().zip(&adds) {
            if *entries > 0 {
                self.wake_waiters(queue);
                self.store.changed(queue);
            }
        }
        Ok(seqs)
    }

    /// [`Self::acknowledge_from`] for every cursor, with each queue's
    /// counters as read (and checked against its cursor) before.
    pub(super) fn acknowledge_all(
        &mut self,
        queues: &[QueueId],
        cursors: &[(ChannelId, u64)],
        metas: &[QueueMeta],
    ) -> Result<(), ServiceError> {
        for ((queue, (_, after_seq)), meta) in queues.iter().zip(cursors).zip(metas) {
            self.acknowledge_from(queue, *meta, *after_seq)?;
        }
        Ok(())
    }

    /// Deletes the messages `seq <= after_seq` of `queue`, whose counters
    /// are `meta` (already checked against the cursor), and each shared
    /// payload whose last reference that was. Returns the queue's counters
    /// as they are now (a fetch reads on with them instead of reading them
    /// again).
    pub(super) fn acknowledge_from(
        &mut self,
        queue: &QueueId,
        mut meta: QueueMeta,
        after_seq: u64,
    ) -> Result<QueueMeta, ServiceError> {
        if after_seq < meta.head {
            return Ok(meta);
        }
        let mut batch = Batch::upkeep();
        let mut drops = BlobDrops::default();
        // Records from before the queue's short id, one at a time.
        let short_from = if meta.qid == 0 {
            after_seq + 1
        } else {
            meta.short_from.clamp(meta.head, after_seq + 1)
        };
        for seq in meta.head..short_from {
            let entry = self.drop_entry(queue, &meta, seq, &mut batch, &mut drops)?;
            meta.bytes = meta.bytes.saturating_sub(entry.payload_len);
        }
        // The short-keyed ones as one run: their heads, not their payloads.
        if short_from <= after_seq {
            let prefix = layout::short_entries_prefix(&meta);
            let mut next = short_from;
            let mut failed = None;
            let mut freed = 0u64;
            self.store
                .get_run(&prefix, short_from, after_seq + 1, &mut |seq, record| {
                    let head = &record[..record.len().min(layout::ENTRY_HEAD_BYTES)];
                    match layout::decode_entry_head(head, record.len(), false) {
                        Ok(entry) => {
                            drops.count(entry.blob);
                            freed = freed.saturating_add(entry.payload_len);
                            batch.delete(run_key(&prefix, seq));
                            next = seq + 1;
                            true
                        }
                        Err(e) => {
                            failed = Some(corrupt(e));
                            false
                        }
                    }
                })
                .map_err(store_failure)?;
            if let Some(e) = failed {
                return Err(e);
            }
            if next <= after_seq {
                return Err(ServiceError::internal("queued message record missing"));
            }
            meta.bytes = meta.bytes.saturating_sub(freed);
        }
        meta.head = after_seq + 1;
        self.finish_drops(drops, &mut batch)?;
        batch.put(layout::queue_meta_key(queue), meta.encode());
        self.write(batch)?;
        Ok(meta)
    }

    /// Deletes the entry at `seq` (the queue's head, about to move past
    /// it) into `batch`, counting a shared payload's reference in `drops`.
    fn drop_entry(
        &self,
        queue: &QueueId,
        meta: &QueueMeta,
        seq: u64,
        batch: &mut Batch,
        drops: &mut BlobDrops,
    ) -> Result<EntryHead, ServiceError> {
        let (key, head) = self.entry_head_at(queue, meta, seq)?;
        drops.count(head.blob);
        batch.delete(key);
        Ok(head)
    }

    /// What the stored message at `seq` of `queue` is, without its payload
    /// (read from the record's head): its key and [`EntryHead`].
    fn entry_head_at(
        &self,
        queue: &QueueId,
        meta: &QueueMeta,
        seq: u64,
    ) -> Result<(Vec<u8>, EntryHead), ServiceError> {
        let key = layout::message_key(queue, meta, seq);
        let mut head = [0u8; layout::ENTRY_HEAD_BYTES];
        let len = self
            .store
            .get_head(&key, &mut head)
            .map_err(store_failure)?
            .ok_or_else(|| ServiceError::internal("queued message record missing"))?;
        let entry =
            layout::decode_entry_head(&head[..len.min(head.len())], len, seq < meta.legacy_below)
                .map_err(corrupt)?;
        Ok((key, entry))
    }

    /// The stored message at `seq` of `queue`: its key, the entry and its
    /// enqueue time (none for a version-1 record).
    pub(super) fn entry_at(
        &self,
        queue: &QueueId,
        meta: &QueueMeta,
        seq: u64,
    ) -> Result<(Vec<u8>, Entry, Option<u64>), ServiceError> {
        let key = layout::message_key(queue, meta, seq);
        let record = self
            .get(&key)?
            .ok_or_else(|| ServiceError::internal("queued message record missing"))?;
        let (entry, stamp) =
            layout::decode_entry(&record, seq < meta.legacy_below).map_err(corrupt)?;
        Ok((key, entry, stamp))
    }

    /// Writes the new reference counts of the shared payloads in `drops`
    /// into `batch`, deleting each payload that lost its last reference.
    /// Counted per batch: one batch may drop several references to one
    /// payload (from several queues).
    pub(super) fn finish_drops(
        &self,
        drops: BlobDrops,
        batch: &mut Batch,
    ) -> Result<(), ServiceError> {
        for (blob, n) in drops.0 {
            let refs_key = layout::blob_refs_key(blob);
            let refs = match self.get(&refs_key)? {
                Some(v) => layout::decode_seq(&v).map_err(corrupt)?,
                None => return Err(ServiceError::internal("shared payload count missing")),
            };
            if refs <= n {
                batch.delete(refs_key);
                batch.delete(layout::blob_key(blob));
            } else {
                batch.put(refs_key, layout::encode_seq(refs - n));
            }
        }
        Ok(())
    }

    /// Drops the messages at the head of `queue` older than the message
    /// TTL (at most [`limits::TTL_EXPIRY_PER_REQUEST_MAX`]) into `batch`
    /// and `drops`, updating `meta`; the caller finishes the drops and
    /// writes. Version-1 records carry no time and never expire.
    pub(super) fn expire(
        &self,
        now: Time,
        queue: &QueueId,
        meta: &mut QueueMeta,
        batch: &mut Batch,
        drops: &mut BlobDrops,
    ) -> Result<(), ServiceError> {
        let Some(ttl) = self.config.message_ttl else {
            return Ok(());
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let now_ms = stamp_ms(now);
        let mut dropped = 0;
        while meta.head < meta.next_seq
            && meta.head >= meta.legacy_below
            && dropped < limits::TTL_EXPIRY_PER_REQUEST_MAX
        {
            let (key, entry) = self.entry_head_at(queue, meta, meta.head)?;
            if entry
                .stamp_ms
                .is_none_or(|s| now_ms.saturating_sub(s) <= ttl_ms)
            {
                break;
            }
            drops.count(entry.blob);
            batch.delete(key);
            meta.bytes = meta.bytes.saturating_sub(entry.payload_len);
            meta.head += 1;
            meta.expired_below = meta.head;
            dropped += 1;
        }
        if dropped > 0 {
            batch.put(layout::queue_meta_key(queue), meta.encode());
        }
        Ok(())
    }

    /// [`Self::expire`] for one queue on its own batch, updating its
    /// counters `meta`.
    pub(super) fn expire_queue(
        &mut self,
        now: Time,
        queue: &QueueId,
        meta: &mut QueueMeta,
    ) -> Result<(), ServiceError> {
        if self.config.message_ttl.is_none() {
            return Ok(());
        }
        let mut batch = Batch::upkeep();
        let mut drops = BlobDrops::default();
        self.expire(now, queue, meta, &mut batch, &mut drops)?;
        if batch.is_empty() {
            return Ok(());
        }
        self.finish_drops(drops, &mut batch)?;
        self.write(batch)
    }

    /// The queue's counters, if `after_seq` is a valid cursor for it: a
    /// client may not acknowledge seqs the queue has not issued yet.
    pub(super) fn cursor_meta(
        &self,
        queue: &QueueId,
        after_seq: u64,
    ) -> Result<QueueMeta, ServiceError> {
        let meta = self.queue_meta(queue)?;
        check_cursor(&meta, after_seq)?;
        Ok(meta)
    }

    /// The number stored under `key` (one of the machine's counters), or
    /// `absent` if it was never written.
    fn stored_counter(&self, key: Vec<u8>, absent: u64) -> Result<u64, ServiceError> {
        match self.get(&key)? {
            Some(v) => layout::decode_seq(&v).map_err(corrupt),
            None => Ok(absent),
        }
    }

    pub(super) fn queue_meta(&self, q: &QueueId) -> Result<QueueMeta, ServiceError> {
        if let Some(meta) = self.counters.get(q) {
            return Ok(*meta);
        }
        match self.get(&layout::queue_meta_key(q))? {
            Some(v) => QueueMeta::decode(&v).map_err(corrupt),
            None => Ok(QueueMeta::default()),
        }
    }
}

/// A client may not acknowledge seqs the queue (counters `meta`) has not
/// issued yet.
pub(super) fn check_cursor(meta: &QueueMeta, after_seq: u64) -> Result<(), ServiceError> {
    let last = meta.next_seq - 1;
    if after_seq > last {
        return Err(ServiceError::invalid_argument(format!(
            "afterSeq {after_seq} is beyond the last seq {last} of this queue"
        )));
    }
    Ok(())
}
