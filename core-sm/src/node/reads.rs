//! Reading queues into replies: `fetch`, the read half of `fetchWait` and
//! `fetchWaitChannels` (parking is in [`super::waiters`]), and the answer a
//! parked long-poll gets when it is woken or due.
//!
//! Invariants it keeps:
//! - A read never deletes: only an acknowledgement (`afterSeq`, in
//!   [`super::queues`]) does, and only up to a cursor the queue has issued.
//! - A reply is bounded: at most [`limits::FETCH_LIMIT_MAX`] messages in
//!   all, and no more than [`limits::FETCH_RESPONSE_BYTES_MAX`] payload
//!   bytes unless its first message alone is larger.
//! - Seqs the message TTL dropped after a cursor are reported as a [`Gap`],
//!   never skipped silently.
//! - A `fetchWait` reads before it acknowledges, so one refused (at the
//!   waiter limits, say) acknowledges nothing (ARCHITECTURE.md
//!   § Guarantees, "Errors change nothing").

use std::time::Duration;

use crate::error::ServiceError;
use crate::limits;
use crate::store::Store;
use crate::time::Time;
use crate::types::{ChannelId, ConnectionId, IdentityKey, QueueId};

use super::layout::{self, Entry, QueueMeta};
use super::queues::check_cursor;
use super::waiters::Waiter;
use super::{
    ChannelMessages, Gap, NodeService, QueuedMessage, Reply, Response, check_list, store_failure,
};

/// One queue's part of a reply.
#[derive(Debug)]
struct QueueRead {
    messages: Vec<QueuedMessage>,
    next_seq: u64,
    gap: Option<Gap>,
}

/// What one reply may still carry: messages in total and payload bytes
/// (the first message always fits).
#[derive(Debug)]
struct ReadBudget {
    messages: u32,
    bytes: usize,
    taken: bool,
}

impl ReadBudget {
    fn new() -> Self {
        ReadBudget {
            messages: limits::FETCH_LIMIT_MAX,
            bytes: 0,
            taken: false,
        }
    }
}

/// A `fetchWaitChannels` names each channel once, and not too many.
pub(super) fn check_cursors(cursors: &[(ChannelId, u64)]) -> Result<(), ServiceError> {
    check_list(
        cursors.iter().map(|(c, _)| c),
        limits::FETCH_WAIT_CHANNELS_MAX,
        "fetchWaitChannels",
        "channel",
    )
}

impl<S: Store> NodeService<S> {
    pub(super) fn fetch(
        &mut self,
        now: Time,
        conn: ConnectionId,
        recipient_key: IdentityKey,
        channel_id: ChannelId,
        after_seq: u64,
        limit: u32,
    ) -> Reply {
        self.owner(conn, &recipient_key)?;
        let queue = QueueId {
            recipient_key,
            channel_id,
        };
        // The queue's counters are read once: expiry, the cursor check, the
        // acknowledgement and the read go on from them.
        let mut meta = self.queue_meta(&queue)?;
        self.expire_queue(now, &queue, &mut meta)?;
        check_cursor(&meta, after_seq)?;
        let meta = self.acknowledge_from(&queue, meta, after_seq)?;
        self.read_messages(&queue, meta, after_seq, limit)
    }

    /// `fetchWait` and `fetchWaitChannels`: answers at once if any cursor
    /// has messages after it (or on error, with a zero timeout, or once the
    /// machine is shutting down), else
    /// parks `wait` until an enqueue to one of its queues or its deadline.
    pub(super) fn fetch_wait(
        &mut self,
        now: Time,
        mut wait: Waiter,
        timeout_ms: u64,
    ) -> Option<Reply> {
        if let Err(e) = self.owner(wait.conn, &wait.recipient_key) {
            return Some(Err(e));
        }
        if wait.limit == 0 {
            return Some(Err(ServiceError::invalid_argument(
                "fetchWait needs a limit of at least 1",
            )));
        }
        let queues: Vec<QueueId> = wait.queues().collect();
        // Each queue's counters are read once, here; expiry updates them,
        // and the read and the acknowledgement go on from them.
        let mut metas = Vec::with_capacity(queues.len());
        for (queue, (_, after_seq)) in queues.iter().zip(&wait.cursors) {
            match self.cursor_meta(queue, *after_seq) {
                Ok(meta) => metas.push(meta),
                Err(e) => return Some(Err(e)),
            }
        }
        // Expired messages go first (housekeeping, whatever comes of the
        // request), so the read below reports their gap.
        for (queue, meta) in queues.iter().zip(&mut metas) {
            if let Err(e) = self.expire_queue(now, queue, meta) {
                return Some(Err(e));
            }
        }
        // Read before acknowledging: the read does not depend on the
        // acknowledgement, and a request refused below must change nothing.
        let reply = self.answer_from(&wait, Some(&metas));
        let pending = match &reply {
            Ok(Response::Messages { messages, gap, .. }) => !messages.is_empty() || gap.is_some(),
            Ok(Response::ChannelMessages { channels }) => !channels.is_empty(),
            _ => true,
        };
        if pending || timeout_ms == 0 || self.draining {
            return Some(
                self.acknowledge_all(&queues, &wait.cursors, &metas)
                    .and(reply),
            );
        }
        if let Err(e) = self.waiter_room(&wait) {
            return Some(Err(e));
        }
        if let Err(e) = self.acknowledge_all(&queues, &wait.cursors, &metas) {
            return Some(Err(e));
        }
        let timeout = Duration::from_millis(timeout_ms.min(self.config.fetch_wait_timeout_ms_max));
        wait.deadline = now.saturating_add(timeout);
        self.park(wait);
        None
    }

    /// Reads up to `limit` messages after `after_seq` (and after the head),
    /// within the reply byte budget; never deletes.
    fn read_messages(
        &mut self,
        queue: &QueueId,
        meta: QueueMeta,
        after_seq: u64,
        limit: u32,
    ) -> Reply {
        let mut budget = ReadBudget::new();
        let r = self.read_queue_from(queue, meta, after_seq, limit, &mut budget)?;
        Ok(Response::Messages {
            messages: r.messages,
            next_seq: r.next_seq,
            gap: r.gap,
        })
    }

    /// Reads messages of `queue` after `after_seq` into the reply, taking
    /// from `budget`: at most `limit` here, and within the reply's total
    /// message count and payload bytes (at least one message per reply).
    fn read_queue(
        &self,
        queue: &QueueId,
        meta: Option<QueueMeta>,
        after_seq: u64,
        limit: u32,
        budget: &mut ReadBudget,
    ) -> Result<QueueRead, ServiceError> {
        let meta = match meta {
            Some(meta) => meta,
            None => self.queue_meta(queue)?,
        };
        self.read_queue_from(queue, meta, after_seq, limit, budget)
    }

    /// [`Self::read_queue`] with the queue's counters already read.
    fn read_queue_from(
        &self,
        queue: &QueueId,
        meta: QueueMeta,
        after_seq: u64,
        limit: u32,
        budget: &mut ReadBudget,
    ) -> Result<QueueRead, ServiceError> {
        // Seqs after the cursor that the TTL dropped.
        let gap = (after_seq.saturating_add(1) < meta.expired_below).then(|| Gap {
            from: after_seq + 1,
            to: meta.expired_below - 1,
        });
        let limit = u64::from(limit.min(budget.messages));
        let start = meta.head.max(after_seq.saturating_add(1));
        let end = meta.next_seq.min(start.saturating_add(limit));
        let mut messages = Vec::new();
        // Records keyed the long way (a format-3 queue's, below its short
        // id) one by one; the short-keyed rest as one run.
        let mut seq = start;
        let mut full = false;
        while seq < end && !meta.is_short(seq) && !full {
            let (_, entry, _) = self.entry_at(queue, &meta, seq)?;
            full = !self.take(seq, entry, budget, &mut messages)?;
            seq += 1;
        }
        if seq < end && !full {
            let mut failed = None;
            let mut next = seq;
            self.store
                .get_run(
                    &layout::short_entries_prefix(&meta),
                    seq,
                    end,
                    &mut |at, record| {
                        next = at + 1;
                        let taken = layout::decode_entry(record, false)
                            .map_err(super::corrupt)
                            .and_then(|(entry, _)| self.take(at, entry, budget, &mut messages));
                        match taken {
                            Ok(true) => true,
                            Ok(false) => {
                                full = true;
                                false
                            }
                            Err(e) => {
                                failed = Some(e);
                                false
                            }
                        }
                    },
                )
                .map_err(store_failure)?;
            if let Some(e) = failed {
                return Err(e);
            }
            // Every seq from the head on is stored: a run that ended before
            // `end` without the byte budget ending it met a missing record.
            if next < end && !full {
                return Err(ServiceError::internal("queued message record missing"));
            }
        }
        Ok(QueueRead {
            messages,
            next_seq: meta.next_seq,
            gap,
        })
    }

    /// Adds the message at `seq` to a reply within `budget`; `false`, and
    /// not added, when its payload would take the reply past
    /// [`limits::FETCH_RESPONSE_BYTES_MAX`] (the first message always goes).
    fn take(
        &self,
        seq: u64,
        entry: Entry,
        budget: &mut ReadBudget,
        messages: &mut Vec<QueuedMessage>,
    ) -> Result<bool, ServiceError> {
        let payload = match entry {
            Entry::Inline(payload) => payload,
            Entry::Shared { blob, .. } => self
                .get(&layout::blob_key(blob))?
                .ok_or_else(|| ServiceError::internal("shared payload missing"))?,
        };
        let bytes = budget.bytes.saturating_add(payload.len());
        if bytes > limits::FETCH_RESPONSE_BYTES_MAX && budget.taken {
            return Ok(false);
        }
        budget.bytes = bytes;
        budget.taken = true;
        budget.messages -= 1;
        messages.push(QueuedMessage { seq, payload });
        Ok(true)
    }

    /// What a waiting (or due) long-poll answers now.
    pub(super) fn answer(&self, w: &Waiter) -> Reply {
        self.answer_from(w, None)
    }

    /// [`Self::answer`] with the counters of `w`'s queues, in cursor
    /// order, when the caller has them (else each is read).
    fn answer_from(&self, w: &Waiter, metas: Option<&[QueueMeta]>) -> Reply {
        let meta = |i: usize| metas.and_then(|m| m.get(i).copied());
        let mut budget = ReadBudget::new();
        if !w.channels {
            let queue = w
                .queues()
                .next()
                .ok_or_else(|| ServiceError::internal("no cursor"))?;
            let r = self.read_queue(&queue, meta(0), w.cursors[0].1, w.limit, &mut budget)?;
            return Ok(Response::Messages {
                messages: r.messages,
                next_seq: r.next_seq,
                gap: r.gap,
            });
        }
        let mut channels = Vec::new();
        for (i, (queue, (channel_id, after_seq))) in w.queues().zip(&w.cursors).enumerate() {
            if budget.messages == 0 {
                break;
            }
            let r = self.read_queue(&queue, meta(i), *after_seq, w.limit, &mut budget)?;
            if !r.messages.is_empty() || r.gap.is_some() {
                channels.push(ChannelMessages {
                    channel_id: *channel_id,
                    messages: r.messages,
                    next_seq: r.next_seq,
                    gap: r.gap,
                });
            }
        }
        Ok(Response::ChannelMessages { channels })
    }
}
