//! What a run actually exercised, counted from its history: crashes that
//! lost unsynced writes, retried enqueues, retries of messages the recipient
//! had already seen, redelivered answers, last-resort KeyPackages served.
//! Sweeps add these up and each scenario states what its sweep must have
//! exercised, so a scenario cannot silently stop testing what it claims.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::history::{Event, History};

/// Counts of what a run (or a sweep) exercised.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// Runs added up.
    pub runs: u64,
    /// Enqueues acknowledged.
    pub messages_acked: u64,
    /// Enqueue attempts after the first.
    pub enqueue_retries: u64,
    /// Messages retried after their recipient had already fetched them: the
    /// retry could only be answered from the server's dedup record.
    pub retries_after_delivery: u64,
    /// Seqs delivered more than once (answers lost and asked for again).
    pub redeliveries: u64,
    /// Fetch answers dropped on purpose whose messages the recipient, after
    /// its crash, got again with the same cursor.
    pub lost_answers_refetched: u64,
    /// Server crashes.
    pub server_crashes: u64,
    /// Written batches the crashes discarded before they were synced.
    pub unsynced_batches_lost: u64,
    /// Client hosts crashed.
    pub client_crashes: u64,
    /// KeyPackages popped (not counting the last resort).
    pub key_packages_popped: u64,
    /// Pops answered with the last-resort package.
    pub last_resort_served: u64,
    /// Requests for another identity's queue that were refused.
    pub foreign_refused: u64,
    /// Plaintexts MLS clients showed.
    pub plaintexts_shown: u64,
    /// Plaintexts MLS clients took over a direct link.
    pub plaintexts_direct: u64,
    /// Direct links that went down (and, while the run went on, were
    /// dialed again).
    pub direct_links_lost: u64,
    /// MLS client commands run again after a transient failure.
    pub commands_retried: u64,
    /// MLS `update`s that finished (each one Commit accepted, now or
    /// later).
    pub updates_made: u64,
    /// MLS `update`s started in the same instant as another member's
    /// (their Commits race for one epoch).
    pub updates_same_instant: u64,
    /// MLS `update`s during which the group moved on by more than one
    /// epoch: the member's Commit lost its epoch to another's and was made
    /// again after catching up (or a change queued earlier was made too).
    pub updates_raced: u64,
}

impl Coverage {
    /// What `history` exercised.
    pub fn of(history: &History) -> Coverage {
        let mut c = Coverage {
            runs: 1,
            ..Coverage::default()
        };
        let mut by_payload = HashMap::new();
        let mut first_delivery = HashMap::new();
        let mut delivered = HashSet::new();
        let mut counted = HashSet::new();
        let mut dropped = HashSet::new();
        let mut update_starts: HashMap<std::time::Duration, HashSet<_>> = HashMap::new();
        for r in &history.events {
            match &r.event {
                Event::EnqueueSent {
                    queue,
                    message_id,
                    payload,
                    attempt,
                    ..
                } => {
                    by_payload.insert((*queue, payload.clone()), *message_id);
                    if *attempt > 1 {
                        c.enqueue_retries += 1;
                        if first_delivery.contains_key(&(*queue, *message_id))
                            && counted.insert((*queue, *message_id))
                        {
                            c.retries_after_delivery += 1;
                        }
                    }
                }
                Event::EnqueueAcked { .. } => c.messages_acked += 1,
                Event::AnswerDropped { queue, after_seq } => {
                    dropped.insert((*queue, *after_seq));
                }
                Event::Fetched {
                    queue,
                    messages,
                    after_seq,
                    ..
                } => {
                    if !messages.is_empty() && dropped.remove(&(*queue, *after_seq)) {
                        c.lost_answers_refetched += 1;
                    }
                    for (seq, payload) in messages {
                        if !delivered.insert((*queue, *seq)) {
                            c.redeliveries += 1;
                        }
                        if let Some(mid) = by_payload.get(&(*queue, payload.clone())) {
                            first_delivery.entry((*queue, *mid)).or_insert(r.index);
                        }
                    }
                }
                Event::ServerCrashed { lost_batches } => {
                    c.server_crashes += 1;
                    c.unsynced_batches_lost += lost_batches;
                }
                Event::ClientCrashed(_) => c.client_crashes += 1,
                Event::KeyPackagePopped { last_resort, .. } => {
                    if *last_resort {
                        c.last_resort_served += 1;
                    } else {
                        c.key_packages_popped += 1;
                    }
                }
                Event::ForeignRequest { answered: None, .. } => c.foreign_refused += 1,
                Event::PlaintextShown { .. } => c.plaintexts_shown += 1,
                Event::PlaintextDirect { .. } => c.plaintexts_direct += 1,
                Event::DirectLink { up: false, .. } => c.direct_links_lost += 1,
                Event::MlsCommandFailed { retried: true, .. } => c.commands_retried += 1,
                Event::MlsUpdated { moved, .. } => {
                    c.updates_made += 1;
                    if *moved > 1 {
                        c.updates_raced += 1;
                    }
                }
                Event::MlsUpdateStarted { member } => {
                    update_starts.entry(r.at).or_default().insert(*member);
                }
                _ => {}
            }
        }
        c.updates_same_instant = update_starts
            .values()
            .filter(|m| m.len() > 1)
            .map(|m| m.len() as u64)
            .sum();
        c
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Coverage) {
        self.runs += other.runs;
        self.messages_acked += other.messages_acked;
        self.enqueue_retries += other.enqueue_retries;
        self.retries_after_delivery += other.retries_after_delivery;
        self.redeliveries += other.redeliveries;
        self.lost_answers_refetched += other.lost_answers_refetched;
        self.server_crashes += other.server_crashes;
        self.unsynced_batches_lost += other.unsynced_batches_lost;
        self.client_crashes += other.client_crashes;
        self.key_packages_popped += other.key_packages_popped;
        self.last_resort_served += other.last_resort_served;
        self.foreign_refused += other.foreign_refused;
        self.plaintexts_shown += other.plaintexts_shown;
        self.plaintexts_direct += other.plaintexts_direct;
        self.direct_links_lost += other.direct_links_lost;
        self.commands_retried += other.commands_retried;
        self.updates_made += other.updates_made;
        self.updates_raced += other.updates_raced;
        self.updates_same_instant += other.updates_same_instant;
    }
}

impl fmt::Display for Coverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} acked, {} retries ({} after delivery), {} redelivered, {} lost answers fetched again, {} server crashes ({} unsynced batches lost), {} client crashes, {} KeyPackages + {} last resort, {} foreign refused, {} plaintexts shown ({} over direct links, {} links lost), {} commands retried, {} updates ({} started in the same instant as another member's, {} moved the epoch by more than one)",
            self.messages_acked,
            self.enqueue_retries,
            self.retries_after_delivery,
            self.redeliveries,
            self.lost_answers_refetched,
            self.server_crashes,
            self.unsynced_batches_lost,
            self.client_crashes,
            self.key_packages_popped,
            self.last_resort_served,
            self.foreign_refused,
            self.plaintexts_shown,
            self.plaintexts_direct,
            self.direct_links_lost,
            self.commands_retried,
            self.updates_made,
            self.updates_same_instant,
            self.updates_raced
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, QueueId};

    use super::*;

    #[test]
    fn a_retry_after_the_recipient_saw_the_message_is_counted() {
        let queue = QueueId {
            recipient_key: IdentityKey([1; 32]),
            channel_id: ChannelId::DEFAULT,
        };
        let sent = |attempt| Event::EnqueueSent {
            sender: IdentityKey([2; 32]),
            queue,
            message_id: MessageId([3; 16]),
            payload: b"x".to_vec(),
            attempt,
        };
        let fetched = Event::Fetched {
            queue,
            after_seq: 0,
            messages: vec![(1, b"x".to_vec())],
            next_seq: 2,
        };
        let mut h = History::default();
        for e in [sent(1), fetched.clone(), sent(2), fetched, sent(3)] {
            h.push(Duration::ZERO, e);
        }
        let c = Coverage::of(&h);
        assert_eq!(
            (c.enqueue_retries, c.retries_after_delivery, c.redeliveries),
            (2, 1, 1)
        );
    }
}
