//! Group changes: creating a group, adding, removing, leaving, updating and
//! sending, all through each group's persisted queue of changes; and the
//! Commit race — one pending Commit per group, merged once the server has
//! stored it, made again on top of the winner when it loses its epoch.

use super::*;

impl ClientMachine {
    // ----- groups -----------------------------------------------------------

    /// A post-quantum group is an MLS group of [`PQ_CIPHERSUITE`]; a sealed
    /// one (what `pq` made before that suite, kept so such groups go on
    /// working) is a classic MLS group whose every payload travels in
    /// hybrid envelopes.
    pub(super) fn create_group(&mut self, name: String, pq: bool) -> Result<(), CommandError> {
        check_name(&name)?;
        if self.groups.by_name(&name).is_some() {
            return Err(CommandError::GroupExists(name));
        }
        let sealed = pq && self.sealed_pq_groups;
        // Members seal to each other's hybrid keys, this user's included.
        if sealed && self.hybrid_keys.is_empty() {
            return Err(CommandError::NoOwnHybridKey);
        }
        let suite = if pq && !sealed {
            PQ_CIPHERSUITE
        } else {
            CIPHERSUITE
        };
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(suite)
            .capabilities(capabilities(&self.provider))
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let group = MlsGroup::new(&self.provider, &self.signer, &config, self.credential())
            .map_err(mls(MlsStep::Group))?;
        let mut channel = [0u8; 16];
        self.provider.fill(&mut channel);
        let channel = ChannelId::try_from_slice(&channel)
            .map_err(|_| CommandError::State(StateError::BadChannel(None)))?;
        self.groups.push(Group::new(
            name.clone(),
            group.group_id().clone(),
            channel,
            true,
            sealed,
        ));
        // The long-poll must cover the new channel.
        self.listen_stale = true;
        self.effects.push_back(Effect::Persist);
        self.effects
            .push_back(Effect::Done(Ok(Outcome::GroupCreated { group: name })));
        Ok(())
    }

    pub(super) fn start_add(
        &mut self,
        group: String,
        member: IdentityKey,
    ) -> Result<(), CommandError> {
        let record = self.record(&group)?;
        let g = self.load_group(&record)?;
        if members(&g).contains(&member) {
            return Err(CommandError::AlreadyMember(member.short()));
        }
        // Asked before (an interrupted `group add`): that add is on its way
        // already, with a KeyPackage fetched for it.
        let adding = |c: &Change| matches!(c, Change::Add { member: m, .. } if *m == member.0);
        if record.queue.iter().any(adding)
            || record.commit.as_ref().is_some_and(|c| adding(&c.change))
        {
            self.op = Some(Op::AddMember {
                group,
                member,
                suite: g.ciphersuite(),
                added: true,
            });
            return Ok(());
        }
        let suite = g.ciphersuite();
        self.op = Some(Op::AddMember {
            group,
            member,
            suite,
            added: false,
        });
        if record.pq {
            // The hybrid key first: refusing a member without one must not
            // use up one of their single-use KeyPackages. Always fetched
            // anew (not from the cache), so the Welcome goes to their
            // current key.
            self.request(
                Pending::HybridKeyForAdd,
                RequestBody::FetchHybridKey {
                    identity_key: member,
                },
            );
        } else {
            self.request_key_package(member, suite);
        }
        Ok(())
    }

    /// Takes one of `member`'s KeyPackages of `suite` from the server.
    pub(super) fn request_key_package(&mut self, member: IdentityKey, suite: Ciphersuite) {
        self.request(
            Pending::FetchKeyPackage,
            RequestBody::FetchKeyPackage {
                identity_key: member,
                cipher_suite: key_package_pool(suite),
            },
        );
    }

    pub(super) fn on_hybrid_key_for_add(&mut self, result: Result<Response, ServiceError>) {
        let Some(Op::AddMember { member, .. }) = &self.op else {
            return;
        };
        let member = *member;
        match self.accept_hybrid_key(member, result) {
            // A sealed group is a classic MLS group.
            Ok(()) => self.request_key_package(member, CIPHERSUITE),
            Err(e) => self.fail(e),
        }
    }

    pub(super) fn on_key_package(&mut self, result: Result<Response, ServiceError>) {
        let Some(Op::AddMember {
            group,
            member,
            suite,
            ..
        }) = &self.op
        else {
            return;
        };
        let (group, member, suite) = (group.clone(), *member, *suite);
        let package = match result {
            Ok(Response::KeyPackage { package, .. }) => package,
            Ok(other) => return self.fail(unexpected(&other)),
            Err(e) if e.kind == ErrorKind::NotFound => {
                return self.fail(CommandError::NoKeyPackage(member.short()));
            }
            Err(e) => return self.fail(CommandError::Server(e)),
        };
        match self.add_member(&group, member, &package, suite) {
            Ok(()) => {
                if let Some(Op::AddMember { added, .. }) = &mut self.op {
                    *added = true;
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// Queues the add of `member` with their fetched KeyPackage (checked
    /// now against the group's `suite`, so a bad one fails the command).
    pub(super) fn add_member(
        &mut self,
        group_name: &str,
        member: IdentityKey,
        package: &[u8],
        suite: Ciphersuite,
    ) -> Result<(), CommandError> {
        self.validate_key_package(member, package, suite)?;
        self.queue_change(
            group_name,
            Change::Add {
                member: member.0,
                key_package: package.to_vec(),
            },
        )
    }

    /// Parses and validates a fetched KeyPackage, and checks that it is
    /// really `member`'s and of the group's `suite`: its credential identity
    /// and its signature key must both be the identity asked for, or the
    /// server substituted a key.
    pub(super) fn validate_key_package(
        &self,
        member: IdentityKey,
        package: &[u8],
        suite: Ciphersuite,
    ) -> Result<KeyPackage, CommandError> {
        let bad = |m: String| CommandError::BadKeyPackage(m);
        let key_package_in = match MlsMessageIn::tls_deserialize_exact(package) {
            Ok(msg) => match msg.extract() {
                MlsMessageBodyIn::KeyPackage(kp) => kp,
                _ => return Err(bad("not a KeyPackage message".into())),
            },
            // A bare KeyPackage (no MLSMessage framing) is accepted too.
            Err(_) => KeyPackageIn::tls_deserialize_exact(package)
                .map_err(|e| bad(format!("does not decode: {e}")))?,
        };
        let kp = key_package_in
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| bad(e.to_string()))?;
        if kp.ciphersuite() != suite {
            return Err(bad(format!(
                "its cipher suite is {:?}, not the group's {:?}",
                kp.ciphersuite(),
                suite
            )));
        }
        let credential = BasicCredential::try_from(kp.leaf_node().credential().clone())
            .map_err(|e| bad(e.to_string()))?;
        if credential.identity() != member.as_bytes()
            || kp.leaf_node().signature_key().as_slice() != member.as_bytes()
        {
            return Err(bad(
                "its credential or signature key is not the identity asked for".into(),
            ));
        }
        Ok(kp)
    }

    // ----- lifecycle --------------------------------------------------------

    pub(super) fn remove_member(
        &mut self,
        name: String,
        member: IdentityKey,
    ) -> Result<(), CommandError> {
        if member == self.identity {
            return Err(CommandError::NotMember(
                "you (use `group leave` to leave a group)".into(),
            ));
        }
        let record = self.record(&name)?;
        let group = self.load_group(&record)?;
        if !members(&group).contains(&member) {
            return Err(CommandError::NotMember(member.short()));
        }
        self.queue_change(&name, Change::Remove { member: member.0 })?;
        self.op = Some(Op::Committed {
            outcome: Outcome::MemberRemoved {
                group: name,
                member,
                undelivered: 0,
            },
        });
        Ok(())
    }

    pub(super) fn leave(&mut self, name: String) -> Result<(), CommandError> {
        self.queue_change(&name, Change::Leave)?;
        self.op = Some(Op::Committed {
            outcome: Outcome::Left { group: name },
        });
        Ok(())
    }

    pub(super) fn update(&mut self, only: Option<String>) -> Result<(), CommandError> {
        let all = only.is_none();
        let names: Vec<String> = match only {
            Some(name) => vec![self.record(&name)?.name],
            None => self.groups.iter().map(|g| g.name.clone()).collect(),
        };
        for name in &names {
            self.queue_change(name, Change::Update)?;
        }
        if all {
            // Every group gets a Commit from this user, on which each peer
            // drops its cached copy of this user's hybrid key.
            self.publish_hybrid_key(true);
        }
        self.op = Some(Op::Committed {
            outcome: Outcome::Updated {
                groups: names,
                undelivered: 0,
            },
        });
        Ok(())
    }

    /// Every member of `group` but this user.
    pub(super) fn others(&self, group: &MlsGroup) -> Vec<IdentityKey> {
        members(group)
            .into_iter()
            .filter(|m| *m != self.identity)
            .collect()
    }

    /// Puts one MLS message for the group's channel in the outbox for each
    /// recipient, under one message id, which it returns. An application
    /// message (`application`) may go over a direct link.
    pub(super) fn send_group_message(
        &mut self,
        record: &Group,
        recipients: &[IdentityKey],
        message: MlsMessageOut,
        application: bool,
    ) -> Result<[u8; 16], CommandError> {
        let payload = Envelope::Group {
            message: message.to_bytes().map_err(mls(MlsStep::Encode))?,
        }
        .encode();
        Ok(self.add_group_to_outbox(recipients, record.channel, payload, record.pq, application))
    }

    // ----- send -------------------------------------------------------------

    pub(super) fn start_send(
        &mut self,
        group_name: String,
        content: Content,
    ) -> Result<(), CommandError> {
        if let Content::Text { text, .. } = &content
            && text.len() > TEXT_BYTES_MAX
        {
            return Err(CommandError::TextTooLong(text.len()));
        }
        content.check()?;
        let mut id = [0u8; content::CONTENT_ID_BYTES];
        self.provider.fill(&mut id);
        self.active = true;
        self.op = Some(Op::Send {
            group: group_name.clone(),
            delivered: 0,
            id: ContentId(id),
        });
        // The time is stamped when the message is made.
        let encoded = content::encode(&content, ContentId(id), 0);
        self.queue_change(&group_name, Change::Content { id, encoded })
    }

    // ----- the queue of changes ---------------------------------------------

    /// Queues `change` for the group, persisted, then makes what can be made
    /// now and sends it. A change waits behind the group's Commit that the
    /// server has not accepted yet (MLS allows one pending Commit, and a
    /// message or change made on top of it would be made in an epoch the
    /// group may never reach).
    pub(super) fn queue_change(
        &mut self,
        group_name: &str,
        change: Change,
    ) -> Result<(), CommandError> {
        let record = self.record(group_name)?;
        if let Some(g) = self.groups.by_name_mut(group_name) {
            g.queue.push(change);
        }
        self.effects.push_back(Effect::Persist);
        self.advance(&record.id);
        self.flush_outbox();
        Ok(())
    }

    /// What the start of a command picks up from an earlier run: queued
    /// changes are made, and a group still behind the epoch its lost Commit
    /// met is fetched first.
    pub(super) fn resume(&mut self) {
        let groups: Vec<(GroupId, bool, ChannelId)> = self
            .groups
            .iter()
            .filter(|g| g.commit.is_none() && !g.queue.is_empty())
            .map(|g| (g.id.clone(), g.behind > 0, g.channel))
            .collect();
        for (group_id, behind, channel) in groups {
            if behind {
                self.fetch(channel);
            } else {
                self.advance(&group_id);
            }
        }
        self.flush_outbox();
    }

    /// Makes the group's queued changes in order, until one is a Commit (it
    /// waits for the server's acceptance) or the queue is empty. Nothing is
    /// made while the group is behind the epoch a lost Commit met: those
    /// changes would lose again.
    pub(super) fn advance(&mut self, group_id: &GroupId) {
        loop {
            let Some(record) = self.groups.by_id(group_id).map(Group::head) else {
                return;
            };
            if record.commit.is_some() || record.queue.is_empty() {
                return;
            }
            let mut group = match self.load_group(&record) {
                Ok(g) => g,
                Err(e) => return self.warn(format!("group {}: {e}", record.name)),
            };
            if group.epoch().as_u64() < record.behind {
                return;
            }
            if let Some(g) = self.groups.by_id_mut(group_id) {
                g.queue.remove(0);
                g.behind = 0;
            }
            let change = record.queue[0].clone();
            if let Err(e) = self.make(&record, &mut group, change) {
                self.warn(format!(
                    "a change to group {} could not be made and was dropped: {e}",
                    record.name
                ));
            }
            self.effects.push_back(Effect::Persist);
        }
    }

    /// Makes one change: an application message goes to the outbox; a
    /// Commit goes to the outbox and stays pending (openmls) until the
    /// server accepts it; a leave sends its proposal and forgets the group.
    pub(super) fn make(
        &mut self,
        record: &Group,
        group: &mut MlsGroup,
        change: Change,
    ) -> Result<(), CommandError> {
        let recipients = self.others(group);
        let index_of = |group: &MlsGroup, who: &[u8; 32]| {
            group
                .members()
                .find(|m| m.signature_key == who.as_slice())
                .map(|m| m.index)
        };
        let (commit, welcome) = match &change {
            Change::Text(_) | Change::Content { .. } => {
                // The machine's clock is wall-clock time (see `ClientMachine`).
                let sent_at_ms = self.now.as_micros() / 1_000;
                let data = match &change {
                    Change::Content { encoded, .. } => content::stamp(encoded, sent_at_ms),
                    Change::Text(text) => {
                        let mut id = [0u8; content::CONTENT_ID_BYTES];
                        self.provider.fill(&mut id);
                        content::encode(&Content::text(text.as_str()), ContentId(id), sent_at_ms)
                    }
                    _ => unreachable!("an application message"),
                };
                let message = group
                    .create_message(&self.provider, &self.signer, &data)
                    .map_err(mls(MlsStep::Encrypt))?;
                let message_id = self.send_group_message(record, &recipients, message, true)?;
                if recipients.is_empty() {
                    // Nobody else to store it for.
                    self.effects.push_back(Effect::Event(Event::Delivered {
                        group: record.name.clone(),
                        message_id,
                    }));
                } else {
                    self.outbox.add_text(message_id, record.name.clone());
                }
                return Ok(());
            }
            Change::Leave => {
                let proposal = group
                    .leave_group(&self.provider, &self.signer)
                    .map_err(mls(MlsStep::Commit))?;
                self.send_group_message(record, &recipients, proposal, false)?;
                self.forget(&record.id);
                return Ok(());
            }
            Change::Add {
                member,
                key_package,
            } => {
                let member = IdentityKey(*member);
                if recipients.contains(&member) {
                    self.warn(format!(
                        "{} was added to group {} by another member meanwhile",
                        member.short(),
                        record.name
                    ));
                    return Ok(());
                }
                let key_package =
                    self.validate_key_package(member, key_package, group.ciphersuite())?;
                let (commit, welcome, _) = group
                    .add_members(&self.provider, &self.signer, &[key_package])
                    .map_err(mls(MlsStep::Commit))?;
                (
                    commit,
                    Some((member.0, welcome.to_bytes().map_err(mls(MlsStep::Encode))?)),
                )
            }
            Change::Remove { member } => {
                // Removed by another member meanwhile: nothing to do. The
                // removed member gets the Commit too, so they learn of it.
                let Some(index) = index_of(group, member) else {
                    return Ok(());
                };
                let (commit, _, _) = group
                    .remove_members(&self.provider, &self.signer, &[index])
                    .map_err(mls(MlsStep::Commit))?;
                (commit, None)
            }
            Change::Update => {
                let (commit, _, _) = group
                    .self_update(&self.provider, &self.signer, LeafNodeParameters::default())
                    .map_err(mls(MlsStep::Commit))?
                    .into_contents();
                (commit, None)
            }
            Change::CommitLeave { leaver } => {
                let Some(index) = index_of(group, leaver) else {
                    return Ok(());
                };
                let recipients: Vec<IdentityKey> =
                    recipients.into_iter().filter(|m| m.0 != *leaver).collect();
                // Their proposal, while it is in this epoch; once a Commit
                // has moved the group on, a removal by value.
                let (commit, _, _) = if group.pending_proposals().next().is_some() {
                    group
                        .commit_to_pending_proposals(&self.provider, &self.signer)
                        .map_err(mls(MlsStep::Commit))?
                } else {
                    group
                        .remove_members(&self.provider, &self.signer, &[index])
                        .map_err(mls(MlsStep::Commit))?
                };
                self.commit(record, &recipients, commit, change, None)?;
                return Ok(());
            }
        };
        self.commit(record, &recipients, commit, change, welcome)
    }

    /// Sends a Commit just made and keeps it pending until the server
    /// accepts it; with nobody to send it to, nobody can race it, and it is
    /// merged at once.
    pub(super) fn commit(
        &mut self,
        record: &Group,
        recipients: &[IdentityKey],
        commit: MlsMessageOut,
        change: Change,
        welcome: Option<([u8; 32], Vec<u8>)>,
    ) -> Result<(), CommandError> {
        let message_id = self.send_group_message(record, recipients, commit, false)?;
        if let Some(g) = self.groups.by_id_mut(&record.id) {
            g.commit = Some(CommitRecord {
                message_id,
                change,
                welcome,
            });
        }
        if recipients.is_empty() {
            self.commit_accepted(message_id);
        }
        Ok(())
    }

    /// The server stored a Commit of ours (the outbox entries with
    /// `message_id`) for the first time: it won its epoch. Merge it, send
    /// the Welcome if it added someone, and make what queued behind it.
    pub(super) fn commit_accepted(&mut self, message_id: [u8; 16]) {
        let Some(record) = self.group_committing(message_id) else {
            return;
        };
        let Some(commit) = record.commit.clone() else {
            return;
        };
        if let Some(g) = self.groups.by_id_mut(&record.id) {
            g.commit = None;
        }
        self.accepted_commits.insert(message_id);
        self.effects.push_back(Effect::Persist);
        if let Err(e) = self.merge_own_commit(&record, commit) {
            self.warn(format!("group {}: {e}", record.name));
        }
        self.replay_early(&record.id);
        self.unblock(record.channel);
        self.advance(&record.id);
    }

    pub(super) fn merge_own_commit(
        &mut self,
        record: &Group,
        commit: CommitRecord,
    ) -> Result<(), CommandError> {
        let mut group = self.load_group(record)?;
        let shown = self.own_commit_events(record, &group, &commit.change);
        group
            .merge_pending_commit(&self.provider)
            .map_err(mls(MlsStep::Merge))?;
        check_members(&group)?;
        self.effects.extend(shown.into_iter().map(Effect::Event));
        if matches!(commit.change, Change::CommitLeave { .. }) {
            // Made for another member's leave, not asked for by this user:
            // show it, as any change another member makes.
            self.effects.push_back(Effect::Event(Event::GroupChanged {
                group: record.name.clone(),
                epoch: group.epoch().as_u64(),
                members: group.members().count(),
            }));
        }
        let Some((member, welcome)) = commit.welcome else {
            return Ok(());
        };
        // The group's name is sealed under the new epoch's exporter secret,
        // which the joiner derives from the Welcome.
        let channel = record.channel;
        let mut nonce = [0u8; envelope::NAME_NONCE_BYTES];
        self.provider.fill(&mut nonce);
        let sealed_name = seal_name(&self.provider, &group, &channel, &nonce, &record.name)?;
        let welcome = Envelope::Welcome {
            channel_id: channel,
            nonce,
            sealed_name,
            welcome,
        }
        .encode();
        // The Welcome goes to the new member's default channel: they do not
        // know the group's channel yet.
        self.add_to_outbox(IdentityKey(member), ChannelId::DEFAULT, welcome, record.pq);
        Ok(())
    }

    /// Our Commit with `message_id` lost its epoch to another member's:
    /// forget it and queue its change again, first, to be made once this
    /// member's copy of the group is at epoch `behind` (it has processed the
    /// winning Commit). `refused`: the server refused it with `staleEpoch`
    /// naming `behind`, so the channel is fetched to catch up; otherwise the
    /// winning Commit is being processed right now. Its other copies in the
    /// outbox go too (they would be refused as well); copies in flight are
    /// refused on their own.
    pub(super) fn commit_lost(&mut self, message_id: [u8; 16], behind: u64, refused: bool) {
        self.drop_copies(message_id);
        self.effects.push_back(Effect::Persist);
        let Some(record) = self.group_committing(message_id) else {
            if refused && self.accepted_commits.contains(&message_id) {
                // A Commit accepted earlier whose copy to a member came too
                // late: the group had moved on by more epochs than the
                // server remembers. (A copy of a Commit already known to
                // have lost is refused as expected.)
                self.warn(
                    "a change you made to a group reached some members too late and was refused for them; they cannot follow the group until they are removed and added again".into(),
                );
            }
            return;
        };
        let Some(commit) = record.commit.clone() else {
            return;
        };
        if let Ok(mut group) = self.load_group(&record)
            && let Err(e) = group.clear_pending_commit(self.provider.storage())
        {
            self.warn(format!("group {}: {e:?}", record.name));
        }
        if let Some(g) = self.groups.by_id_mut(&record.id) {
            g.commit = None;
            g.queue.insert(0, commit.change);
            g.behind = g.behind.max(behind);
        }
        self.unblock(record.channel);
        // Catch up with the winning Commit, then make the change again.
        if refused {
            self.fetch(record.channel);
        }
        self.advance(&record.id);
    }

    /// Resumes a channel whose processing waited for a Commit of ours to be
    /// settled.
    pub(super) fn unblock(&mut self, channel: ChannelId) {
        if self.blocked.remove(&channel) {
            self.fetch(channel);
        }
    }

    /// Forgets a group (left or removed), with what it still had to make.
    pub(super) fn forget(&mut self, group_id: &GroupId) {
        let Some(record) = self.groups.by_id(group_id).map(Group::head) else {
            return;
        };
        if let Some(commit) = &record.commit {
            self.drop_copies(commit.message_id);
        }
        let unsent = record
            .queue
            .iter()
            .filter(|c| matches!(c, Change::Text(_) | Change::Content { .. }))
            .count();
        if unsent > 0 {
            self.warn(format!(
                "{unsent} message(s) to group {} were never sent: you are no longer in it",
                record.name
            ));
        }
        self.direct.forget_channel(record.channel);
        self.groups.remove(group_id);
    }

    /// The group whose pending Commit went out under `message_id`.
    pub(super) fn group_committing(&self, message_id: [u8; 16]) -> Option<Group> {
        self.groups
            .iter()
            .find(|g| {
                g.commit
                    .as_ref()
                    .is_some_and(|c| c.message_id == message_id)
            })
            .map(Group::head)
    }

    /// Drops the outbox entries of `message_id` that are not in flight
    /// (those are answered on their own).
    pub(super) fn drop_copies(&mut self, message_id: [u8; 16]) {
        let in_flight = self.outbox_in_flight();
        self.outbox.remove_copies(message_id, &in_flight);
    }

    /// Outbox entries in an enqueue in flight.
    pub(super) fn outbox_in_flight(&self) -> BTreeSet<u64> {
        self.in_flight
            .values()
            .flat_map(|r| match &r.pending {
                Pending::Outbox(id) => vec![*id],
                Pending::OutboxBatch(ids) => ids.clone(),
                _ => Vec::new(),
            })
            .chain(self.direct.in_flight())
            .collect()
    }
}
