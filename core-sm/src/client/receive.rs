//! Receiving: fetching and long-polling the channels from their cursors,
//! processing Welcomes, Commits, proposals and application messages, the
//! TTL gaps the server reports, and the early messages kept until the
//! Commit of their epoch arrives.

use super::*;

/// What became of a payload that opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Processed {
    /// Processed (shown, merged, joined or stored as a proposal).
    Done,
    /// Of a later epoch than this member's copy of its group: kept until
    /// the Commit of that epoch arrives.
    Early(u64),
    /// Of a later epoch than a group with a pending Commit of ours: that
    /// Commit was accepted but its answer has not come back; the channel
    /// waits for it.
    Blocked,
}

/// Which request brought a channel's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// A fetch of the channel: it is fetched again to acknowledge them.
    Fetch,
    /// The wait of a receive command: the other channels' waits end.
    Wait,
    /// The long-poll of a listening machine: the next long-poll
    /// acknowledges them.
    Listen,
}

impl ClientMachine {
    /// Starts (`true`) or stops keeping a long-poll on every channel, so
    /// messages are processed as they arrive, beside any command. Each
    /// long-poll acknowledges what the previous one brought (after it was
    /// persisted) and waits up to [`LISTEN_WAIT_MS`]; a failed one is tried
    /// again after a pause (doubling from [`RETRY_BACKOFF_INITIAL`] up to
    /// [`RETRY_BACKOFF_MAX`]).
    pub fn handle_listen(&mut self, now: Time, on: bool) {
        self.now = now;
        self.listening = on;
        if !on {
            self.in_flight
                .retain(|_, r| !matches!(r.pending, Pending::Listen));
            self.listen_at = None;
        }
        self.settle();
    }

    /// Makes the long-poll if the machine listens and none is out. Only
    /// called at the end of an input ([`Self::settle`]), after the effects
    /// that persist what moved the cursors it acknowledges.
    pub(super) fn poke_listen(&mut self) {
        if !self.listening || self.link.given_up || self.listen_at.is_some() {
            return;
        }
        if self.listen_stale {
            self.listen_stale = false;
            // Its answer is ignored (nothing in it is acknowledged before a
            // later request says so); the server ends the wait itself.
            self.in_flight
                .retain(|_, r| !matches!(r.pending, Pending::Listen));
        }
        if self
            .in_flight
            .values()
            .any(|r| matches!(r.pending, Pending::Listen))
        {
            return;
        }
        let cursors: Vec<(ChannelId, u64)> = self
            .channels()
            .into_iter()
            .filter(|ch| !self.blocked.contains(ch))
            .map(|ch| (ch, self.cursors.get(&ch).copied().unwrap_or(0)))
            .collect();
        for chunk in cursors.chunks(crate::limits::FETCH_WAIT_CHANNELS_MAX) {
            self.request(
                Pending::Listen,
                RequestBody::FetchWaitChannels {
                    recipient_key: self.identity,
                    cursors: chunk.to_vec(),
                    limit: FETCH_BATCH,
                    timeout_ms: LISTEN_WAIT_MS,
                },
            );
        }
    }

    /// The answer to the long-poll: each channel's messages are processed;
    /// the next long-poll is made at the end of this input.
    pub(super) fn on_listen(&mut self, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::ChannelMessages { channels }) => {
                self.listen_attempts = 0;
                if !channels.is_empty() {
                    // The other chunks' cursors are behind now.
                    self.listen_stale = true;
                }
                for c in channels {
                    self.on_batch(c.channel_id, c.messages, c.gap, Source::Listen);
                }
            }
            Ok(other) => self.warn(format!("unexpected answer to a wait: {other:?}")),
            Err(e) => {
                self.listen_attempts = self.listen_attempts.saturating_add(1);
                let mut pause = backoff(
                    self.listen_attempts,
                    RETRY_BACKOFF_INITIAL,
                    RETRY_BACKOFF_MAX,
                );
                if let Some(hint) = e.kind.retry_after() {
                    pause = pause.max(hint.min(RETRY_BACKOFF_MAX));
                }
                self.listen_at = Some(self.now.saturating_add(pause));
                if !e.kind.is_retryable() {
                    self.warn(format!("waiting for messages refused: {e}"));
                }
            }
        }
    }

    // ----- receive ----------------------------------------------------------

    pub(super) fn start_receive(&mut self, wait_ms: u64) -> Result<(), CommandError> {
        self.op = Some(Op::Receive {
            wait_ms,
            waited: false,
            shown: 0,
        });
        for ch in self.channels() {
            self.fetch(ch);
        }
        Ok(())
    }

    pub(super) fn channels(&self) -> Vec<ChannelId> {
        let mut out = vec![ChannelId::DEFAULT];
        out.extend(self.groups.iter().map(|g| g.channel));
        out
    }

    pub(super) fn fetch(&mut self, channel: ChannelId) {
        // One fetch per channel at a time: a second would only bring the
        // same messages.
        if self
            .in_flight
            .values()
            .any(|r| matches!(r.pending, Pending::Fetch(c) if c == channel))
        {
            return;
        }
        let after_seq = self.cursors.get(&channel).copied().unwrap_or(0);
        self.request(
            Pending::Fetch(channel),
            RequestBody::Fetch {
                recipient_key: self.identity,
                channel_id: channel,
                after_seq,
                limit: FETCH_BATCH,
            },
        );
    }

    /// A long-poll on `channel` from its cursor, answered as `pending`.
    /// One long-poll over every channel from its cursor (one per
    /// [`crate::limits::FETCH_WAIT_CHANNELS_MAX`] channels), answered as
    /// `pending`.
    pub(super) fn wait_all(&mut self, wait_ms: u64, pending: Pending, limit: u32) {
        let cursors: Vec<(ChannelId, u64)> = self
            .channels()
            .into_iter()
            .map(|ch| (ch, self.cursors.get(&ch).copied().unwrap_or(0)))
            .collect();
        for chunk in cursors.chunks(crate::limits::FETCH_WAIT_CHANNELS_MAX) {
            self.request(
                pending.clone(),
                RequestBody::FetchWaitChannels {
                    recipient_key: self.identity,
                    cursors: chunk.to_vec(),
                    limit,
                    timeout_ms: wait_ms,
                },
            );
        }
    }

    /// The answer to a [`Pending::Wait`]: each channel's messages, as a
    /// fetch's.
    pub(super) fn on_channels(&mut self, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::ChannelMessages { channels }) => {
                for c in channels {
                    self.on_batch(c.channel_id, c.messages, c.gap, Source::Wait);
                }
            }
            Ok(other) => self.warn(format!("unexpected answer to a wait: {other:?}")),
            Err(e) => self.warn_refused("wait", &e),
        }
    }

    pub(super) fn on_messages(
        &mut self,
        channel: ChannelId,
        result: Result<Response, ServiceError>,
    ) {
        let (messages, gap) = match result {
            Ok(Response::Messages { messages, gap, .. }) => (messages, gap),
            Ok(other) => {
                self.warn(format!("unexpected answer to a fetch: {other:?}"));
                return;
            }
            Err(e) => {
                self.warn_refused("fetch", &e);
                return;
            }
        };
        self.on_batch(channel, messages, gap, Source::Fetch);
    }

    /// Processes one channel's messages from a fetch or a wait, then fetches
    /// the channel again with the new cursor (acknowledging them); messages
    /// of the long-poll are acknowledged by the next long-poll instead.
    pub(super) fn on_batch(
        &mut self,
        channel: ChannelId,
        messages: Vec<QueuedMessage>,
        gap: Option<Gap>,
        source: Source,
    ) {
        if let Some(gap) = gap {
            self.report_gap(channel, gap);
        }
        if messages.is_empty() {
            return self.drained(channel);
        }
        let full = messages.len() >= FETCH_BATCH as usize;
        let channels_before = self.channels();
        let effects_before = self.effects.len();
        for m in messages {
            if self.blocked.contains(&channel) {
                break;
            }
            self.process(channel, m);
        }
        // Persist what was processed before showing it (a crash in between
        // would otherwise show it twice), then acknowledge it with the next
        // fetch (its cursor), which also drains the rest.
        let shown: Vec<Effect> = self.effects.drain(effects_before..).collect();
        self.effects.push_back(Effect::Persist);
        self.effects.extend(shown);
        if source == Source::Listen {
            // The next long-poll acknowledges these and brings the rest; a
            // batch short of the limit was all there was.
            if !full && !self.blocked.contains(&channel) {
                self.drained(channel);
            }
            return;
        }
        if source == Source::Wait {
            // Something arrived: stop waiting on the other channels.
            self.in_flight
                .retain(|_, r| !matches!(r.pending, Pending::Wait));
        }
        if !self.blocked.contains(&channel) {
            self.fetch(channel);
        }
        // Groups joined from Welcomes in this batch: drain their channels
        // too. (Groups can also disappear, by removal, in the same batch.)
        let joined: Vec<ChannelId> = self
            .channels()
            .into_iter()
            .filter(|ch| !channels_before.contains(ch))
            .collect();
        for ch in joined {
            self.fetch(ch);
        }
    }

    /// A channel has nothing more for now: its groups are as up to date as
    /// the server can make them; make what they queued.
    fn drained(&mut self, channel: ChannelId) {
        let groups: Vec<GroupId> = self
            .groups
            .iter()
            .filter(|g| g.channel == channel && !g.queue.is_empty())
            .map(|g| g.id.clone())
            .collect();
        for group_id in groups {
            self.advance(&group_id);
        }
        self.flush_outbox();
    }

    /// The server dropped `gap` (its message TTL) before this client
    /// fetched it: say so, once, and move the cursor past it (those seqs
    /// are gone; the cursor is persisted with the next state write).
    pub(super) fn report_gap(&mut self, channel: ChannelId, gap: Gap) {
        let cursor = self.cursors.entry(channel).or_insert(0);
        if gap.to <= *cursor {
            return;
        }
        *cursor = gap.to;
        let whose = self
            .groups
            .by_channel(channel)
            .map_or_else(|| "invitations".to_owned(), |g| format!("group {}", g.name));
        let n = gap.to - gap.from + 1;
        self.effects.push_back(Effect::Persist);
        self.warn(format!(
            "{n} message(s) of {whose} (seq {}..={}) expired on the server before they were fetched; they are lost",
            gap.from, gap.to
        ));
    }

    pub(super) fn process(&mut self, channel: ChannelId, message: QueuedMessage) {
        let cursor = self.cursors.entry(channel).or_insert(0);
        if message.seq <= *cursor {
            // Delivered again after a lost acknowledgement: already processed,
            // and MLS cannot decrypt it twice.
            return;
        }
        let before = *cursor;
        *cursor = message.seq;
        if self.direct.was_taken(&message.payload) {
            // The server copy of a message taken over a direct link (the
            // sender never got the answer): shown once already.
            return;
        }
        match self.process_payload(channel, message.seq, &message.payload) {
            Ok(Processed::Done) => {}
            Ok(Processed::Blocked) => {
                // Not processed: read again once our pending Commit is
                // settled.
                self.blocked.insert(channel);
                self.cursors.insert(channel, before);
            }
            Ok(Processed::Early(epoch)) => self.keep_early(channel, epoch, message),
            Err(e) => self.warn(format!(
                "message {} on channel could not be processed: {e}",
                message.seq
            )),
        }
    }

    /// Processes one queued payload. A payload that does not open is an
    /// error (the caller warns and moves on, like an MLS message that does
    /// not decrypt, so it does not block the queue behind it).
    pub(super) fn process_payload(
        &mut self,
        channel: ChannelId,
        seq: u64,
        payload: &[u8],
    ) -> Result<Processed, CommandError> {
        match Envelope::decode(payload) {
            Ok(Envelope::Hybrid {
                framing,
                key_id,
                sealed,
            }) => self
                .open_hybrid(&key_id, &sealed)
                .and_then(|inner| {
                    // A framing in the clear must be the one of the Commit
                    // inside, or the server fenced something else.
                    if framing.is_some()
                        && framing != crate::protocol::framing::commit_framing(&inner)
                    {
                        return Err(CommandError::HybridEnvelope(
                            EnvelopeRefusal::FramingMismatch,
                        ));
                    }
                    Envelope::decode(&inner)
                        .map_err(|e| CommandError::HybridEnvelope(EnvelopeRefusal::Content(e)))
                })
                .and_then(|inner| self.process_envelope(channel, seq, inner, true)),
            Ok(envelope) => self.process_envelope(channel, seq, envelope, false),
            Err(e) => Err(CommandError::Mls(MlsError::new(MlsStep::Envelope, e))),
        }
    }

    /// Keeps a message of a later epoch than its group's until the Commit
    /// that starts that epoch arrives ([`Self::replay_early`]); the cursor
    /// moves past it (it is persisted in the group's record).
    pub(super) fn keep_early(&mut self, channel: ChannelId, epoch: u64, message: QueuedMessage) {
        let Some(g) = self.groups.by_channel_mut(channel) else {
            return;
        };
        let seq = message.seq;
        let kept = g.early.push(EarlyMessage {
            epoch,
            seq,
            payload: message.payload,
        });
        if let Err(group::EarlyFull { waiting, bytes }) = kept {
            let name = g.name.clone();
            self.warn(format!(
                "message {seq} of group {name} is for epoch {epoch}, which this device has not reached, and {waiting} such messages ({bytes} bytes) wait already: dropped"
            ));
        }
    }

    /// Processes the kept messages of a group whose epoch it has reached,
    /// oldest first (after a Commit moved it on).
    pub(super) fn replay_early(&mut self, group_id: &GroupId) {
        loop {
            let Some(record) = self.groups.by_id(group_id) else {
                return;
            };
            let Ok(epoch) = self.load_group(record).map(|g| g.epoch().as_u64()) else {
                return;
            };
            let channel = record.channel;
            let Some(g) = self.groups.by_id_mut(group_id) else {
                return;
            };
            let Some(m) = g.early.take_reached(epoch) else {
                return;
            };
            match self.process_payload(channel, m.seq, &m.payload) {
                Ok(Processed::Done) => {}
                // Still ahead (or waiting for our own Commit): kept again.
                Ok(outcome @ (Processed::Early(_) | Processed::Blocked)) => {
                    let epoch = match outcome {
                        Processed::Early(epoch) => epoch,
                        _ => m.epoch,
                    };
                    self.keep_early(
                        channel,
                        epoch,
                        QueuedMessage {
                            seq: m.seq,
                            payload: m.payload,
                        },
                    );
                    return;
                }
                Err(e) => self.warn(format!(
                    "message {} on channel could not be processed: {e}",
                    m.seq
                )),
            }
        }
    }

    /// Processes a decoded payload; `wrapped` says it came in a hybrid
    /// envelope.
    pub(super) fn process_envelope(
        &mut self,
        channel: ChannelId,
        seq: u64,
        envelope: Envelope,
        wrapped: bool,
    ) -> Result<Processed, CommandError> {
        match envelope {
            Envelope::Welcome {
                channel_id,
                nonce,
                sealed_name,
                welcome,
            } => self
                .join(channel_id, &nonce, &sealed_name, &welcome, wrapped)
                .map(|()| Processed::Done),
            Envelope::Group { message } => {
                self.process_group_message(channel, seq, &message, wrapped)
            }
            Envelope::Hybrid { .. } => Err(CommandError::HybridEnvelope(EnvelopeRefusal::Nested)),
        }
    }

    /// Opens a hybrid envelope sealed to one of the kept hybrid keys.
    pub(super) fn open_hybrid(
        &self,
        key_id: &[u8; hybrid::KEY_ID_BYTES],
        sealed: &[u8],
    ) -> Result<Vec<u8>, CommandError> {
        let key = self
            .hybrid_keys
            .iter()
            .rev()
            .find(|k| k.public().key_id() == *key_id)
            .ok_or_else(|| {
                CommandError::HybridEnvelope(EnvelopeRefusal::UnknownKey(crate::types::hex(
                    &key_id[..4],
                )))
            })?;
        hybrid::open(key, key_id, sealed)
            .map_err(|e| CommandError::HybridEnvelope(EnvelopeRefusal::DoesNotOpen(e)))
    }

    /// Joins from a Welcome; a Welcome that came in a hybrid envelope
    /// (`pq`) makes a pq group, since only a pq group's member seals one.
    pub(super) fn join(
        &mut self,
        channel: ChannelId,
        nonce: &[u8; envelope::NAME_NONCE_BYTES],
        sealed_name: &[u8],
        welcome: &[u8],
        pq: bool,
    ) -> Result<(), CommandError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome).map_err(mls(MlsStep::Decode))?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(CommandError::Mls(MlsError::new(
                MlsStep::Join,
                "not a Welcome",
            )));
        };
        let config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let group = StagedWelcome::new_from_welcome(&self.provider, &config, welcome, None)
            .map_err(mls(MlsStep::Join))?
            .into_group(&self.provider)
            .map_err(mls(MlsStep::Join))?;
        check_members(&group)?;
        let name = open_name(&self.provider, &group, &channel, nonce, sealed_name)?;
        let name = self.unique_name(name);
        let count = group.members().count();
        self.groups.push(Group::new(
            name.clone(),
            group.group_id().clone(),
            channel,
            false,
            pq,
        ));
        // The long-poll must cover the new channel.
        self.listen_stale = true;
        self.effects.push_back(Effect::Event(Event::Joined {
            group: name,
            members: count,
        }));
        Ok(())
    }

    /// The event that shows a decoded application message.
    fn content_event(
        &self,
        group: String,
        sender: IdentityKey,
        seq: u64,
        decoded: content::Decoded,
    ) -> Event {
        let sender_name = self.contacts.name(&sender).map(str::to_owned);
        let content::Decoded {
            content,
            id,
            sent_at_ms,
        } = decoded;
        let message = |text: String, reply_to, attachment| Event::Message {
            group: group.clone(),
            sender,
            sender_name: sender_name.clone(),
            text,
            seq,
            sent_at_ms,
            id,
            reply_to,
            attachment,
        };
        match content {
            Content::Text { text, reply_to } => message(text, reply_to, None),
            Content::Attachment {
                attachment,
                reply_to,
            } => message(attachment.name.clone(), reply_to, Some(attachment)),
            Content::Unsupported { .. } => message(
                "(a message this version of qpq cannot show)".into(),
                None,
                None,
            ),
            Content::Edit { target, text } => Event::Edited {
                group,
                sender,
                sender_name,
                target,
                text,
                seq,
                sent_at_ms,
            },
            Content::Delete { target } => Event::Deleted {
                group,
                sender,
                sender_name,
                target,
                seq,
                sent_at_ms,
            },
        }
    }

    pub(super) fn process_group_message(
        &mut self,
        channel: ChannelId,
        seq: u64,
        bytes: &[u8],
        wrapped: bool,
    ) -> Result<Processed, CommandError> {
        let Some(record) = self.groups.by_channel(channel).map(Group::head) else {
            return Err(CommandError::Mls(MlsError::new(
                MlsStep::Process,
                "message on a channel of no known group",
            )));
        };
        if record.pq && !wrapped {
            // No downgrade: every member of a pq group seals what it sends.
            return Err(CommandError::HybridEnvelope(EnvelopeRefusal::Missing(
                record.name.clone(),
            )));
        }
        let mut group = self.load_group(&record)?;
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(mls(MlsStep::Decode))?;
        let protocol = msg
            .try_into_protocol_message()
            .map_err(mls(MlsStep::Decode))?;
        if record.commit.is_some() && protocol.epoch() > group.epoch() {
            // Others are past the epoch of our pending Commit: the server
            // accepted it, and the answer is still to come (or was lost).
            // This message needs that Commit merged first.
            return Ok(Processed::Blocked);
        }
        if protocol.epoch() > group.epoch() {
            let epoch = protocol.epoch().as_u64();
            if epoch - group.epoch().as_u64() > EARLY_EPOCHS_AHEAD_MAX {
                return Err(CommandError::Mls(MlsError::new(
                    MlsStep::Epoch,
                    format!(
                        "a message for epoch {epoch}, more than {EARLY_EPOCHS_AHEAD_MAX} ahead of this device's epoch {}",
                        group.epoch().as_u64()
                    ),
                )));
            }
            // The Commit that starts that epoch is still to come (its copy
            // to us is behind this message in our queue): keep it.
            return Ok(Processed::Early(epoch));
        }
        let processed = group
            .process_message(&self.provider, protocol)
            .map_err(mls(MlsStep::Process))?;
        let sender = BasicCredential::try_from(processed.credential().clone())
            .ok()
            .and_then(|c| IdentityKey::try_from_slice(c.identity()).ok());
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                let decoded = content::decode(&app.into_bytes());
                self.active = true;
                if let Some(Op::Receive { shown, .. }) = &mut self.op {
                    *shown += 1;
                }
                let sender = sender.ok_or_else(|| {
                    CommandError::Mls(MlsError::new(MlsStep::Process, "sender has no identity"))
                })?;
                let event = self.content_event(record.name, sender, seq, decoded);
                self.effects.push_back(Effect::Event(event));
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                let leaving = match (proposal.proposal(), proposal.sender()) {
                    (Proposal::Remove(r), Sender::Member(from)) if r.removed() == *from => {
                        Some(*from)
                    }
                    _ => None,
                };
                group
                    .store_pending_proposal(self.provider.storage(), *proposal)
                    .map_err(mls(MlsStep::Process))?;
                // A member leaving needs someone to commit its removal: the
                // remaining member with the lowest leaf index does, so the
                // others do not race it. It is queued (made once this
                // channel is drained, behind this member's own changes).
                if let Some(leaver) = leaving {
                    let me = group.own_leaf_index();
                    let committer = group.members().map(|m| m.index).find(|i| *i != leaver);
                    let leaver = group
                        .member(leaver)
                        .and_then(|c| BasicCredential::try_from(c.clone()).ok())
                        .and_then(|c| IdentityKey::try_from_slice(c.identity()).ok());
                    if committer == Some(me)
                        && let Some(leaver) = leaver
                        && let Some(g) = self.groups.by_id_mut(&record.id)
                    {
                        g.queue.push(Change::CommitLeave { leaver: leaver.0 });
                    }
                }
            }
            ProcessedMessageContent::StagedCommitMessage(commit) => {
                for add in commit.add_proposals() {
                    let leaf = add.add_proposal().key_package().leaf_node();
                    let identity = BasicCredential::try_from(leaf.credential().clone())
                        .map_err(mls(MlsStep::Credential))?;
                    if identity.identity() != leaf.signature_key().as_slice() {
                        return Err(CommandError::Mls(MlsError::new(
                            MlsStep::Credential,
                            "a Commit adds a member whose credential is not its signature key",
                        )));
                    }
                }
                // Every member's credential is checked to be an identity
                // (`check_members`), so a Commit always names its committer.
                let committer = sender.ok_or_else(|| {
                    CommandError::Mls(MlsError::new(MlsStep::Process, "a Commit from no identity"))
                })?;
                // The committer may have rotated its hybrid key with this
                // Commit (`update`): fetch it anew before sealing to it.
                self.peer_hybrid_keys.remove(&committer);
                let removed = commit.self_removed();
                let shown = members::commit_events(&group, &record.name, &commit, committer);
                // Another member's Commit for this epoch came first: ours,
                // if one is pending, lost; its change is made again on top.
                if let Some(own) = &record.commit {
                    group
                        .clear_pending_commit(self.provider.storage())
                        .map_err(mls(MlsStep::Process))?;
                    let next = group.epoch().as_u64().saturating_add(1);
                    self.commit_lost(own.message_id, next, false);
                }
                group
                    .merge_staged_commit(&self.provider, *commit)
                    .map_err(mls(MlsStep::Merge))?;
                if removed {
                    // Removed by another member: nothing more can be read or
                    // sent in this group.
                    self.forget(&record.id);
                    let by = shown
                        .into_iter()
                        .find_map(|e| match e {
                            Event::Removed { by, .. } => Some(by),
                            _ => None,
                        })
                        .unwrap_or(committer);
                    self.effects.push_back(Effect::Event(Event::Removed {
                        group: record.name,
                        by,
                    }));
                    return Ok(Processed::Done);
                }
                check_members(&group)?;
                self.effects.extend(shown.into_iter().map(Effect::Event));
                self.effects.push_back(Effect::Event(Event::GroupChanged {
                    group: record.name,
                    epoch: group.epoch().as_u64(),
                    members: group.members().count(),
                }));
                self.replay_early(&record.id);
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {}
            _ => {}
        }
        Ok(Processed::Done)
    }

    pub(super) fn unique_name(&self, name: String) -> String {
        if self.groups.by_name(&name).is_none() {
            return name;
        }
        (2..)
            .map(|n| format!("{name} ({n})"))
            .find(|candidate| self.groups.by_name(candidate).is_none())
            .unwrap_or(name)
    }
}
