//! The outbox: every enqueue this user makes, persisted with a fixed
//! message id, sent one request per queue at a time, oldest first: a run
//! of a queue's oldest entries goes as one `enqueueMany`, and the same
//! payloads to several members as one `enqueueBatch` or `enqueueMany`.
//!
//! [`Outbox`] owns the entries (persisted as `OutboxEntry`s with the next
//! id), and what a run keeps beside them and never persists: the retry
//! clocks of failed deliveries, the entries to send one by one, and the
//! application messages waiting for [`Event::Delivered`]. Ids only grow,
//! so the entries in id order are the entries in the order they were made.

use super::*;
use crate::limits::{
    ENQUEUE_BATCH_RECIPIENTS_MAX, ENQUEUE_MANY_BYTES_MAX, ENQUEUE_MANY_ENTRIES_MAX,
    ENQUEUE_MANY_MESSAGES_MAX,
};
use crate::protocol::{Outgoing, framing};

/// The deliveries waiting to be stored by the server, with their retry
/// clocks and what is shown when they are.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// By id; a lower id was made earlier.
    entries: BTreeMap<u64, OutboxEntry>,
    next_id: u64,
    /// Entries whose last delivery failed with a retryable error. Not
    /// persisted: a new run tries them at once.
    retries: BTreeMap<u64, Retry>,
    /// Entries to send one by one, not in an `enqueueBatch` (a batch with
    /// them was refused for one member's full queue). Not persisted: a new
    /// process tries the batch again first.
    solo: BTreeSet<u64>,
    /// Application messages still in the outbox, by message id, with their
    /// group's name: [`Event::Delivered`] is shown when the last copy is
    /// stored. Not persisted: a message from an earlier run is delivered
    /// without the event.
    texts: BTreeMap<[u8; 16], String>,
}

impl Outbox {
    /// The outbox as persisted: its entries and the next id.
    pub fn restore(entries: Vec<(u64, OutboxEntry)>, next_id: u64) -> Outbox {
        Outbox {
            entries: entries.into_iter().collect(),
            next_id,
            ..Outbox::default()
        }
    }

    /// The entries and the next id, to persist.
    pub fn snapshot(&self) -> (Vec<(u64, OutboxEntry)>, u64) {
        let entries = self.entries.iter().map(|(k, v)| (*k, v.clone())).collect();
        (entries, self.next_id)
    }

    /// Adds an entry under the next id.
    pub fn add(&mut self, entry: OutboxEntry) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(id, entry);
        id
    }

    /// Removes an entry.
    pub fn remove(&mut self, id: u64) -> Option<OutboxEntry> {
        self.entries.remove(&id)
    }

    /// Keeps only the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &OutboxEntry) -> bool) {
        self.entries.retain(|id, e| keep(*id, e));
    }

    /// Removes the entries of `message_id` that are not in `in_flight`.
    pub fn remove_copies(&mut self, message_id: [u8; 16], in_flight: &BTreeSet<u64>) {
        self.retain(|id, e| e.message_id != message_id || in_flight.contains(&id));
    }

    pub fn get(&self, id: u64) -> Option<&OutboxEntry> {
        self.entries.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut OutboxEntry> {
        self.entries.get_mut(&id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether a copy of `message_id` is still waiting.
    pub fn has_message(&self, message_id: [u8; 16]) -> bool {
        self.entries.values().any(|e| e.message_id == message_id)
    }

    /// The entries due, as runs, oldest queue first: for each queue
    /// (recipient and channel) with none of its entries in `in_flight` and
    /// its oldest entry not waiting for its retry time, its oldest entries
    /// in order — at most [`ENQUEUE_MANY_MESSAGES_MAX`], at most
    /// [`ENQUEUE_MANY_BYTES_MAX`] on the wire (the first always goes), and
    /// a Commit or an entry sent one by one only alone. Retry clocks of
    /// entries no longer here go.
    pub fn runs_due(&mut self, in_flight: &BTreeSet<u64>) -> Vec<Vec<u64>> {
        let mut held: BTreeSet<(&[u8; 32], &[u8])> = in_flight
            .iter()
            .filter_map(|id| self.entries.get(id))
            .map(|e| (&e.recipient, e.channel_id.as_slice()))
            .collect();
        let entries = &self.entries;
        self.retries.retain(|id, _| entries.contains_key(id));
        let mut runs: Vec<Vec<u64>> = Vec::new();
        let mut open: BTreeMap<(&[u8; 32], &[u8]), Run> = BTreeMap::new();
        for (id, e) in &self.entries {
            let queue = (&e.recipient, e.channel_id.as_slice());
            if held.contains(&queue) {
                continue;
            }
            // An entry waiting for its retry keeps its queue busy too, so
            // nothing behind it overtakes it.
            let waiting = self.retries.get(id).is_some_and(|r| r.at.is_some());
            let alone = self.solo.contains(id) || framing::commit_header(&e.payload).is_some();
            let bytes = wire_bytes(e);
            match open.get_mut(&queue) {
                None if waiting => {
                    held.insert(queue);
                }
                None => {
                    open.insert(
                        queue,
                        Run {
                            index: runs.len(),
                            bytes,
                            closed: alone,
                        },
                    );
                    runs.push(vec![*id]);
                }
                Some(r) => {
                    let run = &mut runs[r.index];
                    if r.closed
                        || waiting
                        || alone
                        || run.len() >= ENQUEUE_MANY_MESSAGES_MAX
                        || r.bytes + bytes > ENQUEUE_MANY_BYTES_MAX
                    {
                        r.closed = true;
                    } else {
                        run.push(*id);
                        r.bytes += bytes;
                    }
                }
            }
        }
        runs
    }

    /// Sends these entries one by one from now on.
    pub fn send_solo(&mut self, ids: &[u64]) {
        self.solo.extend(ids.iter().copied());
    }

    /// Whether this entry goes one by one.
    pub fn is_solo(&self, id: u64) -> bool {
        self.solo.contains(&id)
    }

    /// The retry clock of an entry, a new one if it had none.
    pub fn retry(&mut self, id: u64) -> &mut Retry {
        self.retries.entry(id).or_insert(Retry {
            attempts: 0,
            at: None,
        })
    }

    /// The most attempts made of these entries.
    pub fn attempts_max(&self, ids: &[u64]) -> u32 {
        ids.iter()
            .filter_map(|id| self.retries.get(id))
            .map(|r| r.attempts)
            .max()
            .unwrap_or(0)
    }

    /// The retry clocks.
    pub fn retries(&self) -> impl Iterator<Item = &Retry> {
        self.retries.values()
    }

    /// Makes every retry due by `now` due; whether any was.
    pub fn retries_due(&mut self, now: Time) -> bool {
        let mut due = false;
        for r in self.retries.values_mut() {
            if r.at.is_some_and(|t| t <= now) {
                r.at = None;
                due = true;
            }
        }
        due
    }

    /// Forgets every retry clock: everything is tried at once.
    pub fn clear_retries(&mut self) {
        self.retries.clear();
    }

    /// Shows [`Event::Delivered`] for `message_id` to `group` once its last
    /// copy is stored.
    pub fn add_text(&mut self, message_id: [u8; 16], group: String) {
        self.texts.insert(message_id, group);
    }

    /// The group of an application message whose last copy was stored or
    /// dropped, once.
    pub fn take_text(&mut self, message_id: [u8; 16]) -> Option<String> {
        self.texts.remove(&message_id)
    }
}

impl ClientMachine {
    // ----- outbox -----------------------------------------------------------

    /// Queues `payload` for `recipient`; with `seal`, it is sealed to their
    /// hybrid key when it goes out.
    pub(super) fn add_to_outbox(
        &mut self,
        recipient: IdentityKey,
        channel: ChannelId,
        payload: Vec<u8>,
        seal: bool,
    ) {
        let mut message_id = [0u8; 16];
        self.provider.fill(&mut message_id);
        self.add_entry(recipient, channel, payload, message_id, seal, false);
    }

    /// One payload for several recipients: one entry each, under one
    /// message id, so [`Self::flush_outbox`] can send the entries that are
    /// due together as one `enqueueBatch` (the server stores the payload
    /// once). A retry to the recipients still missing it reuses the id.
    /// An application message (`direct`) may go over a direct link.
    pub(super) fn add_group_to_outbox(
        &mut self,
        recipients: &[IdentityKey],
        channel: ChannelId,
        payload: Vec<u8>,
        seal: bool,
        direct: bool,
    ) -> [u8; 16] {
        let mut message_id = [0u8; 16];
        self.provider.fill(&mut message_id);
        for r in recipients {
            self.add_entry(*r, channel, payload.clone(), message_id, seal, direct);
        }
        message_id
    }

    pub(super) fn add_entry(
        &mut self,
        recipient: IdentityKey,
        channel: ChannelId,
        payload: Vec<u8>,
        message_id: [u8; 16],
        seal: bool,
        direct: bool,
    ) {
        self.outbox.add(OutboxEntry {
            recipient: recipient.0,
            channel_id: channel.as_bytes().to_vec(),
            payload,
            message_id,
            seal,
            direct,
        });
    }

    /// Sends the oldest outbox entries of each queue that has none in
    /// flight.
    ///
    /// A queue (recipient and channel) has one request in flight at a
    /// time, with its oldest entries in the order they were made, the next
    /// only once the previous one is stored: the server numbers a queue in
    /// arrival order, and concurrent enqueues may arrive in any order. A
    /// recipient must get a Commit before the messages of the epoch it
    /// starts (it cannot decrypt them otherwise) and one sender's messages
    /// in the order sent; an entry deferred by a failure would otherwise be
    /// overtaken by a later one sent beside it. One request carries a run
    /// of up to [`ENQUEUE_MANY_MESSAGES_MAX`] entries (`enqueueMany`), so
    /// a sender faster than a round trip still moves everything it made.
    /// Queues whose runs are the same messages (a group message to every
    /// member) share one request.
    ///
    /// An entry still to be sealed is sealed first if the recipient's
    /// hybrid key is known (and keeps its sealed payload, so retries send
    /// the same bytes); otherwise the key is fetched, once per recipient,
    /// and the entry (with the rest of its queue) waits for it.
    pub(super) fn flush_outbox(&mut self) {
        if self.link.given_up {
            // Nothing can go out before the next command.
            return;
        }
        let in_flight = self.outbox_in_flight();
        let mut missing: Vec<IdentityKey> = Vec::new();
        let mut runs = Vec::new();
        for run in self.outbox.runs_due(&in_flight) {
            let mut ready = Vec::with_capacity(run.len());
            for id in run {
                match self.ready_to_send(id, &mut missing) {
                    // Over the recipient's direct link, alone: the rest of
                    // the queue waits for its answer.
                    Ready::Yes if ready.is_empty() && self.goes_direct(id) => {
                        self.send_direct(id);
                        break;
                    }
                    Ready::Yes if self.goes_direct(id) => break,
                    Ready::Yes => ready.push(id),
                    Ready::Gone => {}
                    // The rest of the queue waits behind it.
                    Ready::Waits => break,
                }
            }
            if !ready.is_empty() {
                runs.push(ready);
            }
        }
        for (ids, width) in self.requests_for(runs) {
            self.send_entries(ids, width);
        }
        for member in missing {
            let asked = self
                .in_flight
                .values()
                .any(|r| matches!(r.pending, Pending::HybridKey(m) if m == member));
            if !asked {
                self.request(
                    Pending::HybridKey(member),
                    RequestBody::FetchHybridKey {
                        identity_key: member,
                    },
                );
            }
        }
    }

    /// Whether entry `id` can go: sealed first if it must be and the
    /// recipient's hybrid key is known (else the recipient joins
    /// `missing`); an entry whose channel no longer parses is dropped.
    fn ready_to_send(&mut self, id: u64, missing: &mut Vec<IdentityKey>) -> Ready {
        let Some(e) = self.outbox.get(id) else {
            return Ready::Gone;
        };
        if ChannelId::try_from_slice(&e.channel_id).is_err() {
            self.outbox.remove(id);
            return Ready::Gone;
        }
        if !e.seal {
            return Ready::Yes;
        }
        let recipient = IdentityKey(e.recipient);
        let Some(key) = self.peer_hybrid_keys.get(&recipient) else {
            if !missing.contains(&recipient) {
                missing.push(recipient);
            }
            return Ready::Waits;
        };
        let key_id = key.key_id();
        let sealed = hybrid::seal(key, &key_id, &e.payload, &mut self.rng());
        // A Commit shows its framing, so the fence covers pq groups.
        let payload = Envelope::Hybrid {
            framing: framing::commit_framing(&e.payload),
            key_id,
            sealed,
        }
        .encode();
        if let Some(e) = self.outbox.get_mut(id) {
            e.payload = payload;
            e.seal = false;
        }
        Ready::Yes
    }

    /// Groups runs (each one queue's entries, in order) into requests:
    /// runs of the same messages (ids and payloads, in the same order) on
    /// one channel share one, within the request limits; an entry sent one
    /// by one never shares. Each request is its entries message by message,
    /// each message's in recipient order, with its number of recipients.
    fn requests_for(&self, runs: Vec<Vec<u64>>) -> Vec<(Vec<u64>, usize)> {
        let mut groups: Vec<Vec<Vec<u64>>> = Vec::new();
        for run in runs {
            let joins = groups.iter_mut().find(|g| {
                g.len() < ENQUEUE_BATCH_RECIPIENTS_MAX
                    && (g.len() + 1) * run.len() <= ENQUEUE_MANY_ENTRIES_MAX
                    && !run.iter().any(|id| self.outbox.is_solo(*id))
                    && self.same_messages(&g[0], &run)
            });
            match joins {
                Some(g) => g.push(run),
                None => groups.push(vec![run]),
            }
        }
        groups
            .into_iter()
            .map(|g| {
                let width = g.len();
                let ids = (0..g[0].len())
                    .flat_map(|m| g.iter().map(move |run| run[m]))
                    .collect();
                (ids, width)
            })
            .collect()
    }

    /// Whether two runs are the same messages on the same channel.
    fn same_messages(&self, a: &[u64], b: &[u64]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| match (self.outbox.get(*x), self.outbox.get(*y)) {
                    (Some(x), Some(y)) => {
                        x.message_id == y.message_id
                            && x.channel_id == y.channel_id
                            && x.payload == y.payload
                    }
                    _ => false,
                })
    }

    /// Sends `ids` (message by message, `width` recipients each) as an
    /// `enqueue`, an `enqueueBatch` or an `enqueueMany`.
    fn send_entries(&mut self, ids: Vec<u64>, width: usize) {
        let Some(first) = ids.first().and_then(|id| self.outbox.get(*id)) else {
            return;
        };
        let Ok(channel_id) = ChannelId::try_from_slice(&first.channel_id) else {
            return;
        };
        if let [id] = ids[..] {
            let body = RequestBody::Enqueue {
                recipient_key: IdentityKey(first.recipient),
                channel_id,
                payload: first.payload.clone(),
                message_id: MessageId(first.message_id),
            };
            self.request(Pending::Outbox(id), body);
            return;
        }
        let recipient_keys = ids[..width]
            .iter()
            .filter_map(|id| self.outbox.get(*id))
            .map(|e| IdentityKey(e.recipient))
            .collect();
        let messages: Vec<Outgoing> = ids
            .chunks(width)
            .filter_map(|row| self.outbox.get(row[0]))
            .map(|e| Outgoing {
                payload: e.payload.clone(),
                message_id: MessageId(e.message_id),
            })
            .collect();
        let body = match <[Outgoing; 1]>::try_from(messages) {
            Ok([one]) => RequestBody::EnqueueBatch {
                recipient_keys,
                channel_id,
                payload: one.payload,
                message_id: one.message_id,
            },
            Err(messages) => RequestBody::EnqueueMany {
                recipient_keys,
                channel_id,
                messages,
            },
        };
        self.request(Pending::OutboxBatch(ids), body);
    }

    /// The answer to an `enqueueBatch` or `enqueueMany` of outbox entries:
    /// all stored, or none, and then each entry is handled as a refused
    /// single enqueue would be.
    pub(super) fn on_enqueued_batch(
        &mut self,
        ids: Vec<u64>,
        result: Result<Response, ServiceError>,
    ) {
        let messages = self.messages_of(&ids);
        match result {
            Ok(Response::EnqueuedBatch { seqs }) if seqs.len() == ids.len() => {
                for (id, seq) in ids.iter().zip(seqs) {
                    if let Some(e) = self.outbox.remove(*id) {
                        self.record_seq(&e, seq);
                    }
                }
                self.stored();
                for message_id in messages {
                    self.commit_accepted(message_id);
                    self.maybe_delivered(message_id);
                }
                if let Some(Op::Send { delivered, .. }) = &mut self.op {
                    *delivered = delivered.saturating_add(ids.len() as u32);
                }
                self.flush_outbox();
            }
            Ok(other) => self.warn(format!("unexpected answer to an enqueueBatch: {other:?}")),
            Err(ServiceError {
                kind: ErrorKind::StaleEpoch { current_epoch },
                ..
            }) if messages.len() == 1 => {
                for id in &ids {
                    self.outbox.remove(*id);
                }
                self.commit_lost(messages[0], current_epoch, true);
                self.flush_outbox();
            }
            Err(e) if messages.len() > 1 && !e.kind.is_retryable() => {
                // One of the messages may be what the server refuses: send
                // them one by one, so only that one is dropped.
                self.outbox.send_solo(&ids);
                self.flush_outbox();
            }
            Err(e) if !e.kind.is_retryable() => {
                // Retrying cannot help: drop them and say so, once.
                for id in &ids {
                    if let Some(e) = self.outbox.remove(*id) {
                        self.forget_text(e.message_id);
                    }
                }
                self.effects.push_back(Effect::Persist);
                self.warn(format!(
                    "a message could not be delivered to {} members and was dropped: {e}",
                    ids.len()
                ));
                self.flush_outbox();
            }
            Err(e) => {
                if matches!(e.kind, ErrorKind::QueueFull | ErrorKind::StaleEpoch { .. }) {
                    // One member's full queue must not hold up the others,
                    // nor one message the rest: send these one by one from
                    // now on.
                    self.outbox.send_solo(&ids);
                }
                // The entries behind them in their queues wait too.
                self.deferred(&ids, &e);
                self.flush_outbox();
            }
        }
    }

    pub(super) fn on_enqueued(&mut self, id: u64, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::Enqueued { seq }) => {
                let removed = self.outbox.remove(id);
                self.stored();
                if let Some(e) = removed {
                    self.record_seq(&e, seq);
                    self.commit_accepted(e.message_id);
                    self.maybe_delivered(e.message_id);
                }
                if let Some(Op::Send { delivered, .. }) = &mut self.op {
                    *delivered += 1;
                }
                // The next entry to the same queue may go now.
                self.flush_outbox();
            }
            Err(ServiceError {
                kind: ErrorKind::StaleEpoch { current_epoch },
                ..
            }) => {
                if let Some(e) = self.outbox.remove(id) {
                    self.commit_lost(e.message_id, current_epoch, true);
                }
                self.flush_outbox();
            }
            Err(e) if !e.kind.is_retryable() => {
                // Retrying cannot help: drop it and say so.
                if let Some(e) = self.outbox.remove(id) {
                    self.forget_text(e.message_id);
                }
                self.effects.push_back(Effect::Persist);
                self.warn(format!(
                    "a message could not be delivered and was dropped: {e}"
                ));
                self.flush_outbox();
            }
            // The entries behind it in its queue wait too, so they cannot
            // overtake it.
            Err(e) => {
                self.deferred(&[id], &e);
                self.flush_outbox();
            }
            Ok(other) => self.warn(format!("unexpected answer to an enqueue: {other:?}")),
        }
    }

    /// Keeps the seq the server gave a stored copy of ours, for the
    /// `after_seq` of the next direct message to its queue (a group's
    /// channel: invitations never go directly).
    fn record_seq(&mut self, e: &OutboxEntry, seq: u64) {
        if let Ok(channel) = ChannelId::try_from_slice(&e.channel_id)
            && channel != ChannelId::DEFAULT
        {
            self.direct.stored(IdentityKey(e.recipient), channel, seq);
        }
    }

    /// The distinct message ids of these entries, in their order.
    fn messages_of(&self, ids: &[u64]) -> Vec<[u8; 16]> {
        let mut messages: Vec<[u8; 16]> = Vec::new();
        for e in ids.iter().filter_map(|id| self.outbox.get(*id)) {
            if !messages.contains(&e.message_id) {
                messages.push(e.message_id);
            }
        }
        messages
    }

    /// Deliveries that failed with a retryable error: tried again after a
    /// pause; the user hears of it once the command stops waiting for them.
    fn deferred(&mut self, ids: &[u64], e: &ServiceError) {
        self.retry_later(ids, e);
        let attempts = self.outbox.attempts_max(ids);
        if attempts == RETRY_ATTEMPTS_PER_COMMAND || self.link.given_up {
            self.warn(format!(
                "delivery deferred after {attempts} attempt(s), will retry: {e}"
            ));
        }
    }

    /// Shows [`Event::Delivered`] once the last copy of an application
    /// message left the outbox stored.
    pub(super) fn maybe_delivered(&mut self, message_id: [u8; 16]) {
        if self.outbox.has_message(message_id) {
            return;
        }
        if let Some(group) = self.outbox.take_text(message_id) {
            self.effects
                .push_back(Effect::Event(Event::Delivered { group, message_id }));
        }
    }

    /// A copy of a message was dropped for good: it will never be reported
    /// delivered.
    pub(super) fn forget_text(&mut self, message_id: [u8; 16]) {
        self.outbox.take_text(message_id);
    }
}

/// A queue's run being gathered by [`Outbox::runs_due`].
struct Run {
    /// Its place among the runs.
    index: usize,
    /// Its entries' bytes on the wire.
    bytes: usize,
    /// Nothing more of the queue may join it.
    closed: bool,
}

/// Whether an outbox entry can be sent now.
enum Ready {
    Yes,
    /// It left the outbox.
    Gone,
    /// It waits for its recipient's hybrid key.
    Waits,
}

/// What an entry's payload will take on the wire: a payload still to be
/// sealed grows by the hybrid envelope.
fn wire_bytes(e: &OutboxEntry) -> usize {
    let seal = if e.seal {
        envelope::HYBRID_OVERHEAD_BYTES + SEAL_FRAMING_SLACK_BYTES
    } else {
        0
    };
    e.payload.len() + seal
}

/// Room left for the framing a sealed payload shows (its length prefix; a
/// Commit's framing is larger, but a Commit goes alone).
const SEAL_FRAMING_SLACK_BYTES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox with one entry per `(recipient, channel)`, ids from 0.
    fn outbox(queues: &[(u8, u8)]) -> Outbox {
        let mut o = Outbox::default();
        for (recipient, channel) in queues {
            o.add(entry(*recipient, *channel, b"m".to_vec()));
        }
        o
    }

    fn entry(recipient: u8, channel: u8, payload: Vec<u8>) -> OutboxEntry {
        OutboxEntry {
            recipient: [recipient; 32],
            channel_id: vec![channel; 16],
            payload,
            message_id: [0; 16],
            seal: false,
            direct: false,
        }
    }

    /// The runs due with `in_flight` in flight.
    fn check(o: &mut Outbox, in_flight: &[u64], due: &[&[u64]]) {
        let due: Vec<Vec<u64>> = due.iter().map(|r| r.to_vec()).collect();
        assert_eq!(o.runs_due(&in_flight.iter().copied().collect()), due);
    }

    #[test]
    fn a_queue_s_oldest_entries_go_as_one_run_and_a_busy_queue_waits() {
        let mut o = outbox(&[(1, 1), (1, 1), (1, 2), (2, 1), (1, 2)]);
        check(&mut o, &[], &[&[0, 1], &[2, 4], &[3]]);
        check(&mut o, &[0], &[&[2, 4], &[3]]);
        o.remove(0);
        check(&mut o, &[], &[&[1], &[2, 4], &[3]]);
    }

    #[test]
    fn an_entry_waiting_for_its_retry_holds_its_queue() {
        let mut o = outbox(&[(1, 1), (1, 1), (2, 1)]);
        o.retry(0).at = Some(Time::from_millis(5));
        check(&mut o, &[], &[&[2]]);
        assert!(!o.retries_due(Time::from_millis(4)));
        assert!(o.retries_due(Time::from_millis(5)));
        check(&mut o, &[], &[&[0, 1], &[2]]);
        // One behind the head waiting ends the run before it.
        o.retry(1).at = Some(Time::from_millis(9));
        check(&mut o, &[], &[&[0], &[2]]);
        // The clock of an entry that left goes with it.
        o.remove(0);
        o.remove(1);
        check(&mut o, &[], &[&[2]]);
        assert_eq!(o.retries().count(), 0);
    }

    #[test]
    fn a_commit_and_an_entry_sent_one_by_one_go_alone() {
        // A group envelope around an MLS Commit's header.
        let mut commit = vec![0x01, 0x02, 0, 1, 0, 2, 3, b'g', b'r', b'p'];
        commit.extend_from_slice(&5u64.to_be_bytes());
        commit.extend_from_slice(&[3, 0, 0]);
        let mut o = Outbox::default();
        for payload in [b"a".to_vec(), commit.clone(), b"b".to_vec(), b"c".to_vec()] {
            o.add(entry(1, 1, payload));
        }
        check(&mut o, &[], &[&[0]]);
        o.remove(0);
        check(&mut o, &[], &[&[1]]);
        o.remove(1);
        check(&mut o, &[], &[&[2, 3]]);
        o.send_solo(&[2]);
        check(&mut o, &[], &[&[2]]);
        o.remove(2);
        check(&mut o, &[], &[&[3]]);
    }

    #[test]
    fn a_run_is_bounded_in_messages_and_bytes() {
        let mut o = outbox(&[(1, 1); ENQUEUE_MANY_MESSAGES_MAX + 1]);
        let runs = o.runs_due(&BTreeSet::new());
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].len(), ENQUEUE_MANY_MESSAGES_MAX);
        let mut o = Outbox::default();
        let third = ENQUEUE_MANY_BYTES_MAX / 3;
        for _ in 0..4 {
            o.add(entry(1, 1, vec![0; third]));
        }
        check(&mut o, &[], &[&[0, 1, 2]]);
        // The first goes whatever its size.
        let mut o = Outbox::default();
        o.add(entry(1, 1, vec![0; ENQUEUE_MANY_BYTES_MAX + 1]));
        o.add(entry(1, 1, vec![0; 1]));
        check(&mut o, &[], &[&[0]]);
    }

    #[test]
    fn the_outbox_restores_from_its_snapshot() {
        let o = outbox(&[(1, 1), (2, 2)]);
        let (entries, next_id) = o.snapshot();
        let back = Outbox::restore(entries.clone(), next_id);
        assert_eq!(back.snapshot().1, next_id);
        assert_eq!(
            postcard::to_allocvec(&back.snapshot().0).unwrap(),
            postcard::to_allocvec(&entries).unwrap()
        );
    }
}
