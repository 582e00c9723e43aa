//! Direct links: application messages sent to and taken from members over
//! a link the shell keeps (`quicproquo-p2p`), beside the server.
//!
//! The shell says which peers have a link up
//! ([`ClientMachine::handle_direct_link`]). An outbox entry whose recipient
//! has one, that is an application message and that has not failed
//! directly yet goes as [`Effect::DirectSend`] instead of an enqueue, alone
//! and still one per queue at a time, with the seq the server gave this
//! sender's last copy in the recipient's queue (`after_seq`). Taken, it
//! leaves the outbox as a stored one would; refused, unanswered or lost,
//! it goes through the server with the same message id and bytes
//! ([`ClientMachine::handle_direct_answer`]).
//!
//! A message that arrives ([`ClientMachine::handle_direct_message`]) is
//! taken only if it can be processed now, exactly as the server copy
//! would be: its channel is a group's whose member sent it, this client
//! has processed its queue up to `after_seq`, it is an application
//! message of the group's current epoch, and the group waits for no
//! Commit of ours. Anything else is refused, and the sender sends it
//! through the server, where it queues behind whatever it needs. A taken
//! payload's digest is kept ([`DIRECT_TAKEN_MAX`]), so its server copy,
//! sent when the answer was lost, is skipped; the answer follows the
//! write of the state that took it.

use super::*;
use crate::limits::DIRECT_TAKEN_MAX;
use crate::protocol::DirectMessage;
use receive::Processed;

/// What the machine keeps for direct links.
#[derive(Debug, Default)]
pub(super) struct Direct {
    /// Peers whose link is up, as the shell last said.
    peers: BTreeSet<IdentityKey>,
    /// Outbox entries sent directly, by the token of their send.
    in_flight: BTreeMap<u64, u64>,
    /// Entries that failed directly: they go through the server. Not
    /// persisted (a new run may try the link again).
    server_only: BTreeSet<u64>,
    /// Persisted: the seq the server gave this sender's last copy in each
    /// queue (recipient, channel).
    last_seqs: BTreeMap<(IdentityKey, ChannelId), u64>,
    /// Persisted: digests of the payloads taken directly, oldest first.
    taken: VecDeque<[u8; 32]>,
}

impl Direct {
    /// As persisted: the last seqs and the taken digests.
    pub fn restore(last_seqs: Vec<([u8; 32], Vec<u8>, u64)>, taken: Vec<[u8; 32]>) -> Direct {
        Direct {
            last_seqs: last_seqs
                .into_iter()
                .filter_map(|(r, ch, seq)| {
                    Some(((IdentityKey(r), ChannelId::try_from_slice(&ch).ok()?), seq))
                })
                .collect(),
            taken: taken.into_iter().collect(),
            ..Direct::default()
        }
    }

    /// The last seqs, to persist.
    pub fn last_seqs(&self) -> Vec<([u8; 32], Vec<u8>, u64)> {
        self.last_seqs
            .iter()
            .map(|((r, ch), seq)| (r.0, ch.as_bytes().to_vec(), *seq))
            .collect()
    }

    /// The taken digests, to persist.
    pub fn taken(&self) -> Vec<[u8; 32]> {
        self.taken.iter().copied().collect()
    }

    /// The entries sent directly and not answered yet.
    pub fn in_flight(&self) -> impl Iterator<Item = u64> + '_ {
        self.in_flight.values().copied()
    }

    /// Records the seq the server gave a copy of ours.
    pub fn stored(&mut self, recipient: IdentityKey, channel: ChannelId, seq: u64) {
        let last = self.last_seqs.entry((recipient, channel)).or_insert(0);
        *last = (*last).max(seq);
    }

    /// Whether this payload was taken directly.
    pub fn was_taken(&self, payload: &[u8]) -> bool {
        !self.taken.is_empty() && self.taken.contains(&digest(payload))
    }

    fn remember(&mut self, digest: [u8; 32]) {
        if self.taken.len() >= DIRECT_TAKEN_MAX {
            self.taken.pop_front();
        }
        self.taken.push_back(digest);
    }

    /// Forgets what belongs to a channel this user left.
    pub fn forget_channel(&mut self, channel: ChannelId) {
        self.last_seqs.retain(|(_, ch), _| *ch != channel);
    }
}

/// The SHA-256 of a payload.
fn digest(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

impl ClientMachine {
    /// The shell's link to `peer` came up (`true`) or went down. Entries
    /// for a peer whose link is up go directly from now on; one sent on a
    /// link that went down is answered by the shell as not taken.
    pub fn handle_direct_link(&mut self, now: Time, peer: IdentityKey, up: bool) {
        self.now = now;
        let changed = if up {
            self.direct.peers.insert(peer)
        } else {
            self.direct.peers.remove(&peer)
        };
        if changed {
            let peer_name = self.contacts.name(&peer).map(str::to_owned);
            self.effects.push_back(Effect::Event(Event::DirectLink {
                peer,
                peer_name,
                up,
            }));
        }
        if up {
            self.flush_outbox();
        }
        self.settle();
    }

    /// The answer to the direct send `token`: `taken` if the peer took it;
    /// `false` if it refused it, did not answer in time, or the link broke
    /// (the entry then goes through the server).
    pub fn handle_direct_answer(&mut self, now: Time, token: u64, taken: bool) {
        self.now = now;
        let Some(id) = self.direct.in_flight.remove(&token) else {
            return;
        };
        if taken {
            let removed = self.outbox.remove(id);
            self.stored();
            if let Some(e) = removed {
                self.maybe_delivered(e.message_id);
            }
            if let Some(Op::Send { delivered, .. }) = &mut self.op {
                *delivered = delivered.saturating_add(1);
            }
        } else {
            // Entries that left the outbox go from the set, so it stays
            // within the outbox's size.
            let outbox = &self.outbox;
            self.direct
                .server_only
                .retain(|id| outbox.get(*id).is_some());
            self.direct.server_only.insert(id);
        }
        self.flush_outbox();
        self.settle();
    }

    /// The peers this user may talk to directly: every other member of
    /// its groups (the shell admits only these).
    pub fn direct_peers_allowed(&self) -> BTreeSet<IdentityKey> {
        let mut peers = BTreeSet::new();
        for record in self.groups.iter() {
            if let Ok(group) = self.load_group(record) {
                peers.extend(members(&group));
            }
        }
        peers.remove(&self.identity);
        peers
    }

    /// The peers whose direct link is up, as the shell last said.
    pub fn direct_links(&self) -> Vec<IdentityKey> {
        self.direct.peers.iter().copied().collect()
    }

    /// A message `from` sent over a direct link, to answer with
    /// [`Effect::DirectAnswer`] and `token`: taken (after the state that
    /// processed it is written) or refused.
    pub fn handle_direct_message(
        &mut self,
        now: Time,
        token: u64,
        from: IdentityKey,
        message: DirectMessage,
    ) {
        self.now = now;
        let effects_before = self.effects.len();
        let taken = self.take_direct(from, &message);
        if taken {
            // Written before it is shown and before the sender hears it
            // is taken (and so sends no server copy).
            let shown: Vec<Effect> = self.effects.drain(effects_before..).collect();
            self.effects.push_back(Effect::Persist);
            self.effects.extend(shown);
        }
        self.effects
            .push_back(Effect::DirectAnswer { token, taken });
        self.settle();
    }

    /// Processes a direct message if it can be processed now; whether it
    /// was (or had been already).
    fn take_direct(&mut self, from: IdentityKey, message: &DirectMessage) -> bool {
        let digest = digest(&message.payload);
        if self.direct.taken.contains(&digest) {
            // Taken before; the answer was lost.
            return true;
        }
        let channel = message.channel;
        let Some(record) = self.groups.by_channel(channel).map(Group::head) else {
            return false;
        };
        if record.commit.is_some()
            || self.blocked.contains(&channel)
            || self.cursors.get(&channel).copied().unwrap_or(0) < message.after_seq
        {
            return false;
        }
        let Ok(group) = self.load_group(&record) else {
            return false;
        };
        if !members(&group).contains(&from) || from == self.identity {
            return false;
        }
        // Only an application message of the current epoch: Commits,
        // proposals and Welcomes come through the server, and a message
        // of another epoch needs what the queue brings first.
        let Some(inner) = self.direct_group_message(&message.payload, record.pq) else {
            return false;
        };
        let Ok(protocol) = MlsMessageIn::tls_deserialize_exact(&inner)
            .map_err(|_| ())
            .and_then(|m| m.try_into_protocol_message().map_err(|_| ()))
        else {
            return false;
        };
        if protocol.content_type() != ContentType::Application || protocol.epoch() != group.epoch()
        {
            return false;
        }
        let effects_before = self.effects.len();
        match self.process_payload(channel, 0, &message.payload) {
            Ok(Processed::Done) => {}
            // A message MLS refuses (one already taken through the server,
            // say) is refused; its server copy, if any, tells the user.
            _ => {
                self.effects.truncate(effects_before);
                return false;
            }
        }
        let sender_is_from = self.effects.range(effects_before..).all(|e| match e {
            Effect::Event(
                Event::Message { sender, .. }
                | Event::Edited { sender, .. }
                | Event::Deleted { sender, .. },
            ) => *sender == from,
            _ => true,
        });
        if !sender_is_from {
            // Processed (it cannot be undone), but not the link's peer's
            // own message: say so.
            self.warn(format!(
                "{} relayed another member's message over a direct link",
                from.short()
            ));
        }
        self.direct.remember(digest);
        true
    }

    /// The MLS message inside a direct payload, opened if the group is
    /// post-quantum (which must be sealed) and refused if it is not a
    /// group envelope.
    fn direct_group_message(&self, payload: &[u8], pq: bool) -> Option<Vec<u8>> {
        let envelope = match Envelope::decode(payload).ok()? {
            Envelope::Hybrid { key_id, sealed, .. } => {
                let inner = self.open_hybrid(&key_id, &sealed).ok()?;
                Envelope::decode(&inner).ok()?
            }
            _ if pq => return None,
            other => other,
        };
        match envelope {
            Envelope::Group { message } => Some(message),
            _ => None,
        }
    }

    /// Whether outbox entry `id` goes directly: an application message to
    /// a peer whose link is up, not failed directly before.
    pub(super) fn goes_direct(&self, id: u64) -> bool {
        let Some(e) = self.outbox.get(id) else {
            return false;
        };
        e.direct
            && self.direct.peers.contains(&IdentityKey(e.recipient))
            && !self.direct.server_only.contains(&id)
    }

    /// Sends outbox entry `id` over its recipient's direct link.
    pub(super) fn send_direct(&mut self, id: u64) {
        let Some(e) = self.outbox.get(id) else {
            return;
        };
        let Ok(channel) = ChannelId::try_from_slice(&e.channel_id) else {
            return;
        };
        let peer = IdentityKey(e.recipient);
        let message = DirectMessage {
            channel,
            message_id: MessageId(e.message_id),
            after_seq: self
                .direct
                .last_seqs
                .get(&(peer, channel))
                .copied()
                .unwrap_or(0),
            payload: e.payload.clone(),
        };
        let token = self.next_token;
        self.next_token += 1;
        self.direct.in_flight.insert(token, id);
        self.effects.push_back(Effect::DirectSend {
            token,
            peer,
            message,
        });
    }
}
