//! The outbox: every enqueue this user makes, persisted with a fixed
//! message id, sent one entry per queue at a time, oldest first, and
//! grouped into `enqueueBatch`es where one payload goes to several members.
//!
//! [`Outbox`] owns the entries (persisted as `OutboxEntry`s with the next
//! id), and what a run keeps beside them and never persists: the retry
//! clocks of failed deliveries, the entries to send one by one, and the
//! application messages waiting for [`Event::Delivered`]. Ids only grow,
//! so the entries in id order are the entries in the order they were made.

use super::*;

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

    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether a copy of `message_id` is still waiting.
    pub fn has_message(&self, message_id: [u8; 16]) -> bool {
        self.entries.values().any(|e| e.message_id == message_id)
    }

    /// The oldest entry of each queue (recipient and channel) that has
    /// none in `in_flight` and none waiting for its retry time, oldest
    /// first. Retry clocks of entries no longer here go.
    pub fn entries_due(&mut self, in_flight: &BTreeSet<u64>) -> Vec<u64> {
        let mut busy: BTreeSet<(&[u8; 32], &[u8])> = in_flight
            .iter()
            .filter_map(|id| self.entries.get(id))
            .map(|e| (&e.recipient, e.channel_id.as_slice()))
            .collect();
        let entries = &self.entries;
        self.retries.retain(|id, _| entries.contains_key(id));
        let mut due = Vec::new();
        for (id, e) in &self.entries {
            // An entry waiting for its retry keeps its queue busy too, so
            // nothing behind it overtakes it.
            let waiting = self.retries.get(id).is_some_and(|r| r.at.is_some());
            if busy.insert((&e.recipient, e.channel_id.as_slice())) && !waiting {
                due.push(*id);
            }
        }
        due
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
        self.add_entry(recipient, channel, payload, message_id, seal);
    }

    /// One payload for several recipients: one entry each, under one
    /// message id, so [`Self::flush_outbox`] can send the entries that are
    /// due together as one `enqueueBatch` (the server stores the payload
    /// once). A retry to the recipients still missing it reuses the id.
    pub(super) fn add_group_to_outbox(
        &mut self,
        recipients: &[IdentityKey],
        channel: ChannelId,
        payload: Vec<u8>,
        seal: bool,
    ) -> [u8; 16] {
        let mut message_id = [0u8; 16];
        self.provider.fill(&mut message_id);
        for r in recipients {
            self.add_entry(*r, channel, payload.clone(), message_id, seal);
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
    ) {
        self.outbox.add(OutboxEntry {
            recipient: recipient.0,
            channel_id: channel.as_bytes().to_vec(),
            payload,
            message_id,
            seal,
        });
    }

    /// Sends the oldest outbox entry of each queue that has none in flight.
    ///
    /// Entries to one queue (recipient and channel) go one at a time, in the
    /// order they were made, the next only once the previous one is stored:
    /// the server numbers a queue in arrival order, and concurrent enqueues
    /// may arrive in any order. A recipient must get a Commit before the
    /// messages of the epoch it starts (it cannot decrypt them otherwise)
    /// and one sender's messages in the order sent; an entry deferred by a
    /// failure would otherwise be overtaken by a later one sent beside it.
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
        let next = self.outbox.entries_due(&in_flight);
        let mut missing: Vec<IdentityKey> = Vec::new();
        let mut due = Vec::new();
        for id in next {
            let Some(e) = self.outbox.get(id) else {
                continue;
            };
            let Ok(_) = ChannelId::try_from_slice(&e.channel_id) else {
                self.outbox.remove(id);
                continue;
            };
            let recipient = IdentityKey(e.recipient);
            if e.seal {
                let Some(key) = self.peer_hybrid_keys.get(&recipient) else {
                    if !missing.contains(&recipient) {
                        missing.push(recipient);
                    }
                    continue;
                };
                let key_id = key.key_id();
                let sealed = hybrid::seal(key, &key_id, &e.payload, &mut self.rng());
                // A Commit shows its framing, so the fence covers pq groups.
                let payload = Envelope::Hybrid {
                    framing: crate::node::commit::commit_framing(&e.payload),
                    key_id,
                    sealed,
                }
                .encode();
                if let Some(e) = self.outbox.get_mut(id) {
                    e.payload = payload;
                    e.seal = false;
                }
            }
            if self.outbox.contains(id) {
                due.push(id);
            }
        }
        // Entries due at once with one channel, message id and payload (a
        // group message to several members) go as one enqueueBatch.
        let mut batches: Vec<Vec<u64>> = Vec::new();
        for id in due {
            let Some(e) = self.outbox.get(id) else {
                continue;
            };
            let same = batches.iter_mut().find(|b| {
                self.outbox.get(b[0]).is_some_and(|f| {
                    f.message_id == e.message_id
                        && f.channel_id == e.channel_id
                        && f.payload == e.payload
                        && b.len() < crate::limits::ENQUEUE_BATCH_RECIPIENTS_MAX
                })
            });
            let same = same.filter(|_| !self.outbox.is_solo(id));
            match same {
                Some(b) => b.push(id),
                None => batches.push(vec![id]),
            }
        }
        for ids in batches {
            let Some(e) = self.outbox.get(ids[0]) else {
                continue;
            };
            let Ok(channel_id) = ChannelId::try_from_slice(&e.channel_id) else {
                continue;
            };
            let (payload, message_id) = (e.payload.clone(), MessageId(e.message_id));
            if let [id] = ids[..] {
                let body = RequestBody::Enqueue {
                    recipient_key: IdentityKey(e.recipient),
                    channel_id,
                    payload,
                    message_id,
                };
                self.request(Pending::Outbox(id), body);
                continue;
            }
            let recipient_keys = ids
                .iter()
                .filter_map(|id| self.outbox.get(*id))
                .map(|e| IdentityKey(e.recipient))
                .collect();
            let body = RequestBody::EnqueueBatch {
                recipient_keys,
                channel_id,
                payload,
                message_id,
            };
            self.request(Pending::OutboxBatch(ids), body);
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

    /// The answer to an `enqueueBatch` of outbox entries: all stored, or
    /// none, and then each entry is handled as a refused single enqueue
    /// would be.
    pub(super) fn on_enqueued_batch(
        &mut self,
        ids: Vec<u64>,
        result: Result<Response, ServiceError>,
    ) {
        match result {
            Ok(Response::EnqueuedBatch { seqs }) if seqs.len() == ids.len() => {
                let message_id = self.take_batch(&ids);
                self.effects.push_back(Effect::Persist);
                if let Some(message_id) = message_id {
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
            }) => {
                if let Some(message_id) = self.take_batch(&ids) {
                    self.commit_lost(message_id, current_epoch, true);
                }
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
                if matches!(e.kind, ErrorKind::QueueFull) {
                    // One member's full queue must not hold up the others:
                    // send these one by one from now on.
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
            Ok(Response::Enqueued { .. }) => {
                let removed = self.outbox.remove(id);
                self.effects.push_back(Effect::Persist);
                if let Some(e) = removed {
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

    /// Takes a batch's entries (one message to several recipients) out of
    /// the outbox; returns the message id they share.
    fn take_batch(&mut self, ids: &[u64]) -> Option<[u8; 16]> {
        let message_id = ids
            .first()
            .and_then(|id| self.outbox.get(*id))
            .map(|e| e.message_id);
        for id in ids {
            self.outbox.remove(*id);
        }
        message_id
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
    fn maybe_delivered(&mut self, message_id: [u8; 16]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox with one entry per `(recipient, channel)`, ids from 0.
    fn outbox(queues: &[(u8, u8)]) -> Outbox {
        let mut o = Outbox::default();
        for (recipient, channel) in queues {
            o.add(OutboxEntry {
                recipient: [*recipient; 32],
                channel_id: vec![*channel; 16],
                payload: Vec::new(),
                message_id: [0; 16],
                seal: false,
            });
        }
        o
    }

    /// The entries due with `in_flight` in flight.
    fn check(o: &mut Outbox, in_flight: &[u64], due: &[u64]) {
        assert_eq!(o.entries_due(&in_flight.iter().copied().collect()), due);
    }

    #[test]
    fn only_the_oldest_entry_of_each_queue_is_due() {
        let mut o = outbox(&[(1, 1), (1, 1), (1, 2), (2, 1), (1, 2)]);
        check(&mut o, &[], &[0, 2, 3]);
        check(&mut o, &[0], &[2, 3]);
        o.remove(0);
        check(&mut o, &[], &[1, 2, 3]);
    }

    #[test]
    fn an_entry_waiting_for_its_retry_holds_its_queue() {
        let mut o = outbox(&[(1, 1), (1, 1), (2, 1)]);
        o.retry(0).at = Some(Time::from_millis(5));
        check(&mut o, &[], &[2]);
        assert!(!o.retries_due(Time::from_millis(4)));
        assert!(o.retries_due(Time::from_millis(5)));
        check(&mut o, &[], &[0, 2]);
        // The clock of an entry that left goes with it.
        o.remove(0);
        check(&mut o, &[], &[1, 2]);
        assert_eq!(o.retries().count(), 0);
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
