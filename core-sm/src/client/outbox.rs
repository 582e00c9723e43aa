//! The outbox: every enqueue this user makes, persisted with a fixed
//! message id, sent one entry per queue at a time, oldest first, and
//! grouped into `enqueueBatch`es where one payload goes to several members.

use super::*;

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
        let id = self.next_outbox_id;
        self.next_outbox_id += 1;
        self.outbox.insert(
            id,
            OutboxEntry {
                recipient: recipient.0,
                channel_id: channel.as_bytes().to_vec(),
                payload,
                message_id,
                seal,
            },
        );
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
        let mut busy: BTreeSet<(&[u8; 32], &[u8])> = in_flight
            .iter()
            .filter_map(|id| self.outbox.get(id))
            .map(|e| (&e.recipient, e.channel_id.as_slice()))
            .collect();
        // Retry clocks of entries no longer in the outbox go.
        let outbox = &self.outbox;
        self.retries.retain(|id, _| outbox.contains_key(id));
        let mut next = Vec::new();
        for (id, e) in &self.outbox {
            // An entry waiting for its retry keeps its queue busy too, so
            // nothing behind it overtakes it.
            let waiting = self.retries.get(id).is_some_and(|r| r.at.is_some());
            if busy.insert((&e.recipient, e.channel_id.as_slice())) && !waiting {
                next.push(*id);
            }
        }
        let mut missing: Vec<IdentityKey> = Vec::new();
        let mut due = Vec::new();
        for id in next {
            let Some(e) = self.outbox.get(&id) else {
                continue;
            };
            let Ok(_) = ChannelId::try_from_slice(&e.channel_id) else {
                self.outbox.remove(&id);
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
                if let Some(e) = self.outbox.get_mut(&id) {
                    e.payload = payload;
                    e.seal = false;
                }
            }
            if self.outbox.contains_key(&id) {
                due.push(id);
            }
        }
        // Entries due at once with one channel, message id and payload (a
        // group message to several members) go as one enqueueBatch.
        let mut batches: Vec<Vec<u64>> = Vec::new();
        for id in due {
            let Some(e) = self.outbox.get(&id) else {
                continue;
            };
            let same = batches.iter_mut().find(|b| {
                self.outbox.get(&b[0]).is_some_and(|f| {
                    f.message_id == e.message_id
                        && f.channel_id == e.channel_id
                        && f.payload == e.payload
                        && b.len() < crate::limits::ENQUEUE_BATCH_RECIPIENTS_MAX
                })
            });
            let same = same.filter(|_| !self.solo.contains(&id));
            match same {
                Some(b) => b.push(id),
                None => batches.push(vec![id]),
            }
        }
        for ids in batches {
            let Some(e) = self.outbox.get(&ids[0]) else {
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
                .filter_map(|id| self.outbox.get(id))
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
                let message_id = ids
                    .first()
                    .and_then(|id| self.outbox.get(id))
                    .map(|e| e.message_id);
                for id in &ids {
                    self.outbox.remove(id);
                }
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
                let message_id = ids
                    .first()
                    .and_then(|id| self.outbox.get(id))
                    .map(|e| e.message_id);
                for id in &ids {
                    self.outbox.remove(id);
                }
                if let Some(message_id) = message_id {
                    self.commit_lost(message_id, current_epoch, true);
                }
                self.flush_outbox();
            }
            Err(e) if !e.kind.is_retryable() => {
                // Retrying cannot help: drop them and say so, once.
                for id in &ids {
                    if let Some(e) = self.outbox.remove(id) {
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
                    self.solo.extend(ids.iter().copied());
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
                let removed = self.outbox.remove(&id);
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
                if let Some(e) = self.outbox.remove(&id) {
                    self.commit_lost(e.message_id, current_epoch, true);
                }
                self.flush_outbox();
            }
            Err(e) if !e.kind.is_retryable() => {
                // Retrying cannot help: drop it and say so.
                if let Some(e) = self.outbox.remove(&id) {
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

    /// Deliveries that failed with a retryable error: tried again after a
    /// pause; the user hears of it once the command stops waiting for them.
    fn deferred(&mut self, ids: &[u64], e: &ServiceError) {
        self.retry_later(ids, e);
        let attempts = ids
            .iter()
            .filter_map(|id| self.retries.get(id))
            .map(|r| r.attempts)
            .max()
            .unwrap_or(0);
        if attempts == RETRY_ATTEMPTS_PER_COMMAND || self.link.given_up {
            self.warn(format!(
                "delivery deferred after {attempts} attempt(s), will retry: {e}"
            ));
        }
    }

    /// Shows [`Event::Delivered`] once the last copy of an application
    /// message left the outbox stored.
    fn maybe_delivered(&mut self, message_id: [u8; 16]) {
        if self.outbox.values().any(|e| e.message_id == message_id) {
            return;
        }
        if let Some(group) = self.texts.remove(&message_id) {
            self.effects
                .push_back(Effect::Event(Event::Delivered { group, message_id }));
        }
    }

    /// A copy of a message was dropped for good: it will never be reported
    /// delivered.
    pub(super) fn forget_text(&mut self, message_id: [u8; 16]) {
        self.texts.remove(&message_id);
    }
}
