//! The one checker of the Delivery Service's guarantees from a client's
//! point of view, shared by the model test, the `node_sequence` fuzz target
//! and the simulations' history checker. It is fed what clients sent and
//! what answers told them, and says which guarantee an answer breaks:
//!
//! - a seq is never 0, and one seq of a queue names one message: one
//!   message id and one payload, also across server restarts;
//! - one message of a queue — one sender's message id — is stored at one
//!   seq (a retry is stored once; another sender's message under the same
//!   id is another message);
//! - a payload shown was sent to that queue, and under the id its seq was
//!   acknowledged for;
//! - a fetch answers seqs after its cursor (and after what was
//!   acknowledged away), strictly increasing and consecutive, below the
//!   queue's `next_seq`, at most its limit; `next_seq` never goes back;
//! - an acknowledged message that no cursor of its owner could have
//!   deleted, and that the TTL did not drop, is in every fetch that reaches
//!   it.
//!
//! Each caller decides what a broken guarantee means: the model and the
//! fuzz target panic at once, the simulations collect violations and name
//! the event.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use crate::limits::FETCH_LIMIT_MAX;
use crate::protocol::{Gap, QueuedMessage};
use crate::types::{IdentityKey, MessageId, QueueId};

/// A message as the server recognises a retry of it: its sender and the
/// id the sender gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageKey {
    /// The identity that enqueued it.
    pub sender: IdentityKey,
    /// Its id.
    pub id: MessageId,
}

/// A broken guarantee, with what showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// A seq 0 was issued.
    SeqZero,
    /// One message id was acknowledged or shown at two seqs.
    StoredTwice {
        /// The seq seen first.
        first: u64,
        /// The other one.
        then: u64,
    },
    /// One seq named two messages: two ids, or two payloads, or a payload
    /// not sent under the id acknowledged at that seq.
    SeqReused {
        /// The seq.
        seq: u64,
    },
    /// A payload shown was never sent to the queue.
    Phantom {
        /// Where it was shown.
        seq: u64,
    },
    /// A fetch answered a seq at or before its cursor (or before what was
    /// acknowledged away), out of order, or at or after its `next_seq`.
    SeqOrder {
        /// What was wrong.
        detail: String,
    },
    /// A fetch skipped seqs.
    SeqGap {
        /// The first seq expected.
        expected: u64,
        /// The seq that came.
        got: u64,
    },
    /// `next_seq` went back.
    NextSeqBack {
        /// The highest seen before.
        was: u64,
        /// The one answered.
        now: u64,
    },
    /// A fetch answered more messages than its limit.
    OverLimit {
        /// How many.
        messages: usize,
        /// The limit.
        limit: u32,
    },
    /// An acknowledged message is missing from a fetch that reaches it.
    Missing {
        /// Its seq.
        seq: u64,
    },
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::SeqZero => write!(f, "seq 0 issued"),
            Broken::StoredTwice { first, then } => {
                write!(f, "one message id at seq {first} and at seq {then}")
            }
            Broken::SeqReused { seq } => write!(f, "seq {seq} names two different messages"),
            Broken::Phantom { seq } => {
                write!(f, "seq {seq} carries a payload never sent to this queue")
            }
            Broken::SeqOrder { detail } => write!(f, "{detail}"),
            Broken::SeqGap { expected, got } => {
                write!(f, "a fetch skipped from seq {expected} to {got}")
            }
            Broken::NextSeqBack { was, now } => write!(f, "next_seq went back from {was} to {now}"),
            Broken::OverLimit { messages, limit } => {
                write!(f, "{messages} messages for a limit of {limit}")
            }
            Broken::Missing { seq } => write!(
                f,
                "acknowledged message {seq} is missing from a fetch that reaches it"
            ),
        }
    }
}

/// What a caller knows about one fetch beyond its answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct FetchView {
    /// Its limit, if it had one to check.
    pub limit: Option<u32>,
    /// The `next_seq` no answer may go below, if not the ledger's own
    /// (the model passes the floor as of the request).
    pub next_seq_floor: Option<u64>,
    /// Everything up to here was acknowledged away before the request, if
    /// not the ledger's own record.
    pub deleted_upto: Option<u64>,
    /// With `Some`, the completeness check runs: every acknowledged seq
    /// above this (no cursor of the owner reached it) and below
    /// `next_seq` must be in the answer, unless the limit cut it short.
    pub deletable_upto: Option<u64>,
    /// The first seq must be the one right after the cursor (no message
    /// can have left otherwise, as in the simulations, which have no TTL
    /// and whose owners move their cursor only over what they were shown).
    pub from_cursor: bool,
}

/// Per queue, what the clients know.
#[derive(Debug, Default)]
struct QueueLedger {
    /// Payload of each seq shown.
    shown: BTreeMap<u64, Vec<u8>>,
    /// The id acknowledged at each seq.
    id_at: HashMap<u64, MessageKey>,
    /// The seq each acknowledged id got.
    acked: HashMap<MessageKey, u64>,
    /// Those seqs, in order, so a fetch looks only at the ones it reaches.
    acked_seqs: BTreeSet<u64>,
    /// The seq each id (known by its payload) was shown at.
    shown_at: HashMap<MessageKey, u64>,
    /// No answer may report a lower `next_seq`.
    next_seq_floor: u64,
    /// Highest cursor of an answered fetch: everything at or below it is
    /// gone.
    deleted_upto: u64,
    /// Highest cursor the owner ever sent: nothing above it may be gone.
    deletable_upto: u64,
    /// Highest seq shown.
    last_seen: u64,
}

/// What the clients of a run sent and were told, queue by queue.
#[derive(Debug, Default)]
pub struct Ledger {
    queues: HashMap<QueueId, QueueLedger>,
    /// Payloads sent under each id of each queue.
    sent: HashMap<(QueueId, MessageKey), Vec<Vec<u8>>>,
    /// The ids each payload was sent under, per queue.
    by_payload: HashMap<(QueueId, Vec<u8>), HashSet<MessageKey>>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// A client sent `payload` to `queue` under `id` (a retry may send
    /// another payload under the same id).
    pub fn sent(&mut self, queue: QueueId, id: MessageKey, payload: &[u8]) {
        let sent = self.sent.entry((queue, id)).or_default();
        if !sent.iter().any(|p| p == payload) {
            sent.push(payload.to_vec());
        }
        self.by_payload
            .entry((queue, payload.to_vec()))
            .or_default()
            .insert(id);
    }

    /// The owner of `queue` sent `cursor`: messages up to it may be gone.
    pub fn cursor_sent(&mut self, queue: QueueId, cursor: u64) {
        let q = self.queues.entry(queue).or_default();
        q.deletable_upto = q.deletable_upto.max(cursor);
    }

    /// An answer acknowledged `id` in `queue` at `seq`.
    pub fn acknowledged(&mut self, queue: QueueId, id: MessageKey, seq: u64) -> Vec<Broken> {
        let mut broken = Vec::new();
        if seq == 0 {
            broken.push(Broken::SeqZero);
        }
        let sent = self.sent.get(&(queue, id)).cloned().unwrap_or_default();
        let q = self.queues.entry(queue).or_default();
        match q.acked.get(&id) {
            Some(first) if *first != seq => broken.push(Broken::StoredTwice {
                first: *first,
                then: seq,
            }),
            Some(_) => {}
            None => {
                q.acked.insert(id, seq);
                q.acked_seqs.insert(seq);
            }
        }
        match q.id_at.get(&seq) {
            Some(other) if *other != id => broken.push(Broken::SeqReused { seq }),
            Some(_) => {}
            None => {
                q.id_at.insert(seq, id);
            }
        }
        if let Some(payload) = q.shown.get(&seq)
            && !sent.contains(payload)
        {
            broken.push(Broken::SeqReused { seq });
        }
        q.next_seq_floor = q.next_seq_floor.max(seq + 1);
        broken
    }

    /// A fetch of `queue` after `cursor` was answered with `messages`,
    /// `next_seq` and `gap`.
    pub fn fetched(
        &mut self,
        queue: QueueId,
        cursor: u64,
        messages: &[QueuedMessage],
        next_seq: u64,
        gap: Option<Gap>,
        view: FetchView,
    ) -> Vec<Broken> {
        let mut broken = Vec::new();
        let q = self.queues.entry(queue).or_default();
        if let Some(limit) = view.limit
            && messages.len() > limit.min(FETCH_LIMIT_MAX) as usize
        {
            broken.push(Broken::OverLimit {
                messages: messages.len(),
                limit,
            });
        }
        let floor = view.next_seq_floor.unwrap_or(q.next_seq_floor);
        if next_seq < floor {
            broken.push(Broken::NextSeqBack {
                was: floor,
                now: next_seq,
            });
        }
        let deleted = view.deleted_upto.unwrap_or(q.deleted_upto);
        let after = cursor.max(deleted).max(gap.map_or(0, |g| g.to));
        let mut expected = cursor + 1;
        for (n, m) in messages.iter().enumerate() {
            if m.seq <= after {
                broken.push(Broken::SeqOrder {
                    detail: format!(
                        "a fetch after {cursor} answered seq {} (gone up to {after})",
                        m.seq
                    ),
                });
            } else if m.seq < expected {
                broken.push(Broken::SeqOrder {
                    detail: format!("a fetch answered seq {} after seq {}", m.seq, expected - 1),
                });
            } else if m.seq > expected && (n > 0 || view.from_cursor) {
                broken.push(Broken::SeqGap {
                    expected,
                    got: m.seq,
                });
            }
            if m.seq >= next_seq {
                broken.push(Broken::SeqOrder {
                    detail: format!("a fetch answered seq {} with next seq {next_seq}", m.seq),
                });
            }
            expected = expected.max(m.seq + 1);
        }
        if let Some(deletable) = view.deletable_upto {
            let deletable = deletable.max(gap.map_or(0, |g| g.to));
            let full = view
                .limit
                .is_some_and(|l| messages.len() >= l.min(FETCH_LIMIT_MAX) as usize);
            let q = self.queues.entry(queue).or_default();
            // The acknowledged seqs above `deletable` and below `next_seq`.
            let from = deletable.saturating_add(1);
            for seq in q.acked_seqs.range(from..next_seq.max(from)) {
                let shown = match (messages.first(), messages.last()) {
                    (Some(first), Some(last)) => first.seq <= *seq && (*seq <= last.seq || full),
                    _ => false,
                };
                if !shown && view.limit != Some(0) {
                    broken.push(Broken::Missing { seq: *seq });
                }
            }
        }
        for m in messages {
            broken.extend(self.shown(queue, m.seq, &m.payload));
        }
        let q = self.queues.entry(queue).or_default();
        q.next_seq_floor = q.next_seq_floor.max(next_seq);
        q.deleted_upto = q.deleted_upto.max(cursor);
        if let Some(last) = messages.last() {
            q.last_seen = q.last_seen.max(last.seq);
        }
        broken
    }

    /// `payload` was shown at `seq` of `queue`.
    pub fn shown(&mut self, queue: QueueId, seq: u64, payload: &[u8]) -> Vec<Broken> {
        let mut broken = Vec::new();
        let ids = self
            .by_payload
            .get(&(queue, payload.to_vec()))
            .cloned()
            .unwrap_or_default();
        if ids.is_empty() {
            // Nothing else can be said of a payload nobody sent.
            return vec![Broken::Phantom { seq }];
        }
        let q = self.queues.entry(queue).or_default();
        match q.shown.get(&seq) {
            Some(p) if p != payload => broken.push(Broken::SeqReused { seq }),
            Some(_) => {}
            None => {
                q.shown.insert(seq, payload.to_vec());
            }
        }
        if let Some(id) = q.id_at.get(&seq)
            && !self
                .sent
                .get(&(queue, *id))
                .is_some_and(|s| s.iter().any(|p| p == payload))
        {
            broken.push(Broken::SeqReused { seq });
        }
        // A payload sent under one id only names that id: it is shown at
        // one seq.
        if let [id] = ids.iter().collect::<Vec<_>>()[..] {
            match q.shown_at.get(id) {
                Some(first) if *first != seq => broken.push(Broken::StoredTwice {
                    first: *first,
                    then: seq,
                }),
                Some(_) => {}
                None => {
                    q.shown_at.insert(*id, seq);
                }
            }
        }
        broken
    }

    /// The highest seq the owner of `queue` was shown.
    pub fn last_seen(&self, queue: QueueId) -> u64 {
        self.queues.get(&queue).map_or(0, |q| q.last_seen)
    }

    /// No answer about `queue` may report a lower `next_seq`.
    pub fn next_seq_floor(&self, queue: QueueId) -> u64 {
        self.queues.get(&queue).map_or(0, |q| q.next_seq_floor)
    }

    /// Everything of `queue` up to here is gone (an answered fetch's
    /// cursor).
    pub fn deleted_upto(&self, queue: QueueId) -> u64 {
        self.queues.get(&queue).map_or(0, |q| q.deleted_upto)
    }

    /// Nothing of `queue` above here may be gone (the owner's highest
    /// cursor).
    pub fn deletable_upto(&self, queue: QueueId) -> u64 {
        self.queues.get(&queue).map_or(0, |q| q.deletable_upto)
    }

    /// The seq `id` was acknowledged at in `queue`.
    pub fn acked_seq(&self, queue: QueueId, id: MessageKey) -> Option<u64> {
        self.queues
            .get(&queue)
            .and_then(|q| q.acked.get(&id).copied())
    }

    /// Every acknowledged message: queue, id and seq.
    pub fn acknowledged_all(&self) -> Vec<(QueueId, MessageKey, u64)> {
        let mut all: Vec<_> = self
            .queues
            .iter()
            .flat_map(|(queue, q)| q.acked.iter().map(|(id, seq)| (*queue, *id, *seq)))
            .collect();
        all.sort();
        all
    }

    /// The seq `id` was shown at in `queue`, if its payload names it alone.
    pub fn shown_seq(&self, queue: QueueId, id: MessageKey) -> Option<u64> {
        self.queues
            .get(&queue)
            .and_then(|q| q.shown_at.get(&id).copied())
    }

    /// The seqs of `queue` shown, in order.
    pub fn shown_seqs(&self, queue: QueueId) -> Vec<u64> {
        self.queues
            .get(&queue)
            .map(|q| q.shown.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every queue something was shown or acknowledged in.
    pub fn queues(&self) -> Vec<QueueId> {
        let mut all: Vec<_> = self.queues.keys().copied().collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ChannelId;

    fn queue() -> QueueId {
        QueueId {
            recipient_key: IdentityKey([1; 32]),
            channel_id: ChannelId::DEFAULT,
        }
    }

    /// Message `n` of one sender.
    fn id(n: u8) -> MessageKey {
        from(0, n)
    }

    /// Message `n` of sender `who`.
    fn from(who: u8, n: u8) -> MessageKey {
        MessageKey {
            sender: IdentityKey([who; 32]),
            id: MessageId([n; 16]),
        }
    }

    fn m(seq: u64, payload: &[u8]) -> QueuedMessage {
        QueuedMessage {
            seq,
            payload: payload.to_vec(),
        }
    }

    /// A ledger where `a` (id 1) and `b` (id 2) were sent and acknowledged
    /// at seqs 1 and 2.
    fn two() -> Ledger {
        let mut l = Ledger::new();
        l.sent(queue(), id(1), b"a");
        l.sent(queue(), id(2), b"b");
        assert!(l.acknowledged(queue(), id(1), 1).is_empty());
        assert!(l.acknowledged(queue(), id(2), 2).is_empty());
        l
    }

    fn complete() -> FetchView {
        FetchView {
            limit: Some(10),
            deletable_upto: Some(0),
            ..FetchView::default()
        }
    }

    #[test]
    fn an_honest_history_breaks_nothing() {
        let mut l = two();
        let fetched = [m(1, b"a"), m(2, b"b")];
        assert!(
            l.fetched(queue(), 0, &fetched, 3, None, complete())
                .is_empty()
        );
        assert_eq!(l.last_seen(queue()), 2);
        // The same cursor again (a lost answer): the same messages.
        assert!(
            l.fetched(queue(), 0, &fetched, 3, None, complete())
                .is_empty()
        );
        l.cursor_sent(queue(), 2);
        let acknowledged = FetchView {
            deletable_upto: Some(l.deletable_upto(queue())),
            ..complete()
        };
        assert!(l.fetched(queue(), 2, &[], 3, None, acknowledged).is_empty());
        assert_eq!(l.shown_seq(queue(), id(2)), Some(2));
    }

    #[test]
    fn acknowledgements_that_disagree_are_broken() {
        let mut l = two();
        assert_eq!(
            l.acknowledged(queue(), id(1), 0),
            [Broken::SeqZero, Broken::StoredTwice { first: 1, then: 0 }]
        );
        assert_eq!(
            l.acknowledged(queue(), id(1), 3),
            [Broken::StoredTwice { first: 1, then: 3 }]
        );
        l.sent(queue(), id(3), b"c");
        assert_eq!(
            l.acknowledged(queue(), id(3), 2),
            [Broken::SeqReused { seq: 2 }]
        );
    }

    #[test]
    fn two_senders_may_use_one_id() {
        let mut l = Ledger::new();
        l.sent(queue(), from(1, 5), b"one");
        l.sent(queue(), from(2, 5), b"two");
        assert!(l.acknowledged(queue(), from(1, 5), 1).is_empty());
        assert!(l.acknowledged(queue(), from(2, 5), 2).is_empty());
        let fetched = [m(1, b"one"), m(2, b"two")];
        assert!(
            l.fetched(queue(), 0, &fetched, 3, None, complete())
                .is_empty()
        );
        // One sender's id at a second seq is still stored twice.
        assert_eq!(
            l.acknowledged(queue(), from(2, 5), 3),
            [Broken::StoredTwice { first: 2, then: 3 }]
        );
        // A seq shown with the other sender's payload was reused.
        let reused = l.shown(queue(), 1, b"two");
        assert!(reused.contains(&Broken::SeqReused { seq: 1 }), "{reused:?}");
    }

    #[test]
    fn answers_out_of_place_are_broken() {
        let mut l = two();
        let view = FetchView {
            from_cursor: true,
            ..complete()
        };
        let at_cursor = l.fetched(queue(), 1, &[m(1, b"a")], 3, None, view);
        assert!(
            matches!(at_cursor[0], Broken::SeqOrder { .. }),
            "{at_cursor:?}"
        );
        let skipped = l.fetched(queue(), 0, &[m(2, b"b")], 3, None, view);
        assert!(skipped.contains(&Broken::SeqGap {
            expected: 1,
            got: 2
        }));
        let past_end = l.fetched(queue(), 0, &[m(1, b"a"), m(2, b"b")], 2, None, complete());
        assert!(
            past_end
                .iter()
                .any(|b| matches!(b, Broken::SeqOrder { .. }))
        );
        assert!(past_end.contains(&Broken::NextSeqBack { was: 3, now: 2 }));
        let limited = FetchView {
            limit: Some(1),
            ..complete()
        };
        let over = l.fetched(queue(), 0, &[m(1, b"a"), m(2, b"b")], 3, None, limited);
        assert!(over.contains(&Broken::OverLimit {
            messages: 2,
            limit: 1
        }));
    }

    #[test]
    fn payloads_that_do_not_fit_are_broken() {
        let mut l = two();
        assert_eq!(
            l.shown(queue(), 3, b"never sent"),
            [Broken::Phantom { seq: 3 }]
        );
        // Another message's payload at an acknowledged seq, then that
        // payload again at a second seq.
        assert_eq!(l.shown(queue(), 1, b"b"), [Broken::SeqReused { seq: 1 }]);
        assert_eq!(
            l.shown(queue(), 2, b"b"),
            [Broken::StoredTwice { first: 1, then: 2 }]
        );
        // A seq whose payload changes.
        assert_eq!(l.shown(queue(), 1, b"a"), [Broken::SeqReused { seq: 1 }]);
    }

    #[test]
    fn an_acknowledged_message_missing_from_a_fetch_is_broken_unless_gone() {
        let mut l = two();
        let missing = l.fetched(queue(), 0, &[m(1, b"a")], 3, None, complete());
        assert_eq!(missing, [Broken::Missing { seq: 2 }]);
        // A limit that cut the answer short, a cursor of the owner past it,
        // or the TTL's gap excuse it.
        let cut = FetchView {
            limit: Some(1),
            ..complete()
        };
        assert!(
            l.fetched(queue(), 0, &[m(1, b"a")], 3, None, cut)
                .is_empty()
        );
        let past = FetchView {
            deletable_upto: Some(2),
            ..complete()
        };
        assert!(l.fetched(queue(), 0, &[], 3, None, past).is_empty());
        let gap = Some(Gap { from: 1, to: 2 });
        assert!(l.fetched(queue(), 0, &[], 3, gap, complete()).is_empty());
    }
}
