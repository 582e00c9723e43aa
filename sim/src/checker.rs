//! The history checker: decides from a run's [`History`] alone whether the
//! server kept the delivery guarantees of ARCHITECTURE.md (§ Guarantees).
//!
//! It checks, per run, once the network has healed and the queues are
//! drained:
//! - no acknowledged enqueue is lost, and it is delivered at the seq its
//!   acknowledgement named; nothing is delivered that was never sent to that
//!   queue;
//! - per queue, the seqs a fetch returns strictly increase from the cursor
//!   on with no gap, the queue's seqs are gap-free from 1, and one seq never
//!   names two payloads (also across server restarts);
//! - a message acknowledged before the same sender sent the next one to the
//!   same queue has the smaller seq;
//! - a message id (retries included) is stored at one seq only;
//! - no KeyPackage is handed out twice or made up; the last-resort package
//!   is served when, and only when, the pool is empty;
//! - requests for another identity's queue are refused;
//! - the server holds no connection, waiter or reply once every client has
//!   gone, and never holds on to a closed connection; nothing panicked; the
//!   run finished;
//! - with MLS clients: each member is shown every plaintext another member
//!   sent exactly once, in its sender's order, and nothing else (not its
//!   own messages, nothing unsent, nothing before it was sent); every
//!   command that failed was failing transiently and was run again; after
//!   the network healed, every member ends with an empty outbox in the
//!   full group.
//!
//! The per-event queue checks (seqs, payloads, message ids) are the shared
//! `quicproquo_core::testing::ledger::Ledger`, which the model test and the
//! `node_sequence` fuzz target use too; this checker adds what only a
//! whole history shows.
//!
//! Every violation names its invariant and the event where it was seen, so
//! a failing seed's report points at the moment things went wrong.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use quicproquo_core::node::QueuedMessage;
use quicproquo_core::testing::ledger::{Broken, FetchView, Ledger, MessageKey};
use quicproquo_core::types::{IdentityKey, QueueId};

use crate::history::{Event, History, brief};

/// The guarantee a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invariant {
    /// An acknowledged enqueue was never delivered.
    AckedLost,
    /// A delivered payload was never sent to that queue.
    Phantom,
    /// One seq of a queue named two different payloads.
    SeqReused,
    /// Seqs skipped: a fetch did not continue at its cursor, or the queue's
    /// seqs are not gap-free.
    SeqGap,
    /// A fetch returned seqs out of order or at or before its cursor.
    SeqOrder,
    /// A sender's messages to one queue got seqs out of the order sent.
    SenderOrder,
    /// One message id was stored at two seqs (a retry stored twice).
    StoredTwice,
    /// A message was delivered at another seq than its acknowledgement named.
    AckMismatch,
    /// A well-formed enqueue was refused for good.
    Refused,
    /// The owner's fetch was refused (e.g. its cursor is beyond the queue's
    /// end, so delivered messages were forgotten).
    FetchRefused,
    /// The final audit found messages nobody fetched or counters that do
    /// not match what was delivered.
    Audit,
    /// A KeyPackage was handed out twice.
    KeyPackageTwice,
    /// A pop returned a KeyPackage never uploaded for that identity.
    KeyPackageForged,
    /// The last-resort package was not served when the pool was empty, was
    /// served while it was not, or was the wrong package.
    LastResort,
    /// A request for another identity's queue was answered.
    ForeignAccess,
    /// The server still held connections, waiters or replies at the end,
    /// or held on to connections that were already closed.
    LeftOpen,
    /// A plaintext one member sent was never shown to another member.
    PlaintextLost,
    /// A plaintext was shown to one member more than once.
    PlaintextTwice,
    /// A member was shown a plaintext its named sender never sent (or had
    /// not sent yet), or one of its own.
    PlaintextInvented,
    /// A member was shown one sender's plaintexts out of the order sent.
    PlaintextOrder,
    /// At the final idle receive, members were on different epochs of
    /// their group, or on one epoch with different epoch authenticators.
    GroupForked,
    /// A member's final epoch does not match the Commits made: fewer than
    /// the adds plus the updates that finished, or more than the adds plus
    /// every update started.
    CommitCount,
    /// A client command failed for good (not a transient failure).
    CommandFailed,
    /// Something panicked.
    Panic,
    /// The run did not finish in its time budget.
    Stuck,
}

/// One broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which guarantee.
    pub invariant: Invariant,
    /// The history index where it was seen, if one event shows it.
    pub at: Option<usize>,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some(i) => write!(f, "{:?} at event {i}: {}", self.invariant, self.detail),
            None => write!(f, "{:?}: {}", self.invariant, self.detail),
        }
    }
}

/// Checks `history`; an empty result means every guarantee held.
pub fn check(history: &History) -> Vec<Violation> {
    let mut c = Checker::default();
    for r in &history.events {
        c.observe(r.index, &r.event);
    }
    c.finish()
}

/// The invariants `violations` break, each once, in order.
pub fn invariants(violations: &[Violation]) -> Vec<Invariant> {
    violations
        .iter()
        .map(|v| v.invariant)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// An acknowledged message: history index of its first attempt, index of
/// its acknowledgement, its seq.
type AckedMessage = (usize, usize, u64);

#[derive(Debug)]
struct Sent {
    first_sent: usize,
}

#[derive(Debug)]
struct Pop {
    target: IdentityKey,
    sent: usize,
}

#[derive(Debug, Default)]
struct Checker {
    v: Vec<Violation>,
    /// A message is its sender's id: the server tells a retry by both.
    sent: HashMap<(QueueId, MessageKey), Sent>,
    /// First acknowledgement of each message: its seq and event.
    acked: BTreeMap<(QueueId, MessageKey), (u64, usize)>,
    /// The queue guarantees event by event (the checker the model test
    /// and the fuzz target share).
    ledger: Ledger,
    audited: Vec<(usize, QueueId, u64, usize, u64)>,
    /// `(target, package, last_resort)` -> index of the first upload sent.
    kp_sent: HashMap<(IdentityKey, Vec<u8>, bool), usize>,
    /// `(target, package)` of non-last-resort uploads -> index of the ack.
    kp_acked: HashMap<(IdentityKey, Vec<u8>), usize>,
    /// Target -> index of the first acknowledged last-resort upload.
    lr_acked: HashMap<IdentityKey, usize>,
    pops: HashMap<u64, Pop>,
    /// `(target, package)` -> the pop that returned it.
    handed: HashMap<(IdentityKey, Vec<u8>), u64>,
    /// Non-last-resort results: `(pop sent, target, package, result index)`.
    nonlr_results: Vec<(usize, IdentityKey, Vec<u8>, usize)>,
    /// Last-resort results: `(pop sent, target, result index)`.
    lr_results: Vec<(usize, IdentityKey, usize)>,
    /// The MLS group's members, in the order recorded.
    mls_members: Vec<IdentityKey>,
    /// Sender -> `(text, index)` of each plaintext it sent, in order.
    plain_sent: BTreeMap<IdentityKey, Vec<(String, usize)>>,
    /// `(member, sender)` -> `(text, index)` of each plaintext shown.
    plain_shown: BTreeMap<(IdentityKey, IdentityKey), Vec<(String, usize)>>,
    /// Each final idle receive, in order.
    mls_idle: Vec<Idle>,
    /// Member -> updates started.
    updates_started: BTreeMap<IdentityKey, u64>,
    /// Member -> updates finished with `Updated`.
    updates_done: BTreeMap<IdentityKey, u64>,
}

/// How a member ended a final receive until idle.
#[derive(Debug)]
struct Idle {
    at: usize,
    member: IdentityKey,
    outbox: usize,
    group_members: usize,
    epoch: Option<u64>,
    authenticator: Option<u32>,
}

impl Checker {
    fn flag(&mut self, invariant: Invariant, at: Option<usize>, detail: String) {
        self.v.push(Violation {
            invariant,
            at,
            detail,
        });
    }

    fn observe(&mut self, i: usize, e: &Event) {
        match e {
            Event::EnqueueSent {
                sender,
                queue,
                message_id,
                payload,
                ..
            } => {
                let key = MessageKey {
                    sender: *sender,
                    id: *message_id,
                };
                self.sent
                    .entry((*queue, key))
                    .or_insert(Sent { first_sent: i });
                self.ledger.sent(*queue, key, payload);
            }
            Event::EnqueueAcked {
                sender,
                queue,
                message_id,
                seq,
            } => {
                let key = MessageKey {
                    sender: *sender,
                    id: *message_id,
                };
                let broken = self.ledger.acknowledged(*queue, key, *seq);
                self.flag_broken(i, broken);
                self.acked.entry((*queue, key)).or_insert((*seq, i));
            }
            Event::EnqueueFailed {
                error, transient, ..
            } => {
                if !transient {
                    self.flag(Invariant::Refused, Some(i), error.clone());
                }
            }
            Event::Fetched {
                queue,
                after_seq,
                messages,
                next_seq,
            } => self.fetched(i, *queue, *after_seq, messages, *next_seq),
            Event::FetchRefused {
                after_seq, error, ..
            } => self.flag(
                Invariant::FetchRefused,
                Some(i),
                format!("fetch after {after_seq} refused: {error}"),
            ),
            Event::QueueAudited {
                queue,
                cursor,
                pending,
                next_seq,
            } => self
                .audited
                .push((i, *queue, *cursor, *pending, *next_seq)),
            Event::KeyPackageUploadSent {
                owner,
                package,
                last_resort,
            } => {
                self.kp_sent
                    .entry((*owner, package.clone(), *last_resort))
                    .or_insert(i);
            }
            Event::KeyPackageUploaded {
                owner,
                package,
                last_resort,
            } => {
                if *last_resort {
                    self.lr_acked.entry(*owner).or_insert(i);
                } else {
                    self.kp_acked.entry((*owner, package.clone())).or_insert(i);
                }
            }
            Event::KeyPackagePopSent { target, pop, .. } => {
                self.pops.insert(
                    *pop,
                    Pop {
                        target: *target,
                        sent: i,
                    },
                );
            }
            Event::KeyPackagePopped {
                pop,
                target,
                package,
                last_resort,
            } => self.popped(i, *pop, *target, package, *last_resort),
            Event::KeyPackageNotFound { pop, target } => {
                let sent = self.pops.get(pop).map_or(i, |p| p.sent);
                if let Some(lr) = self.lr_acked.get(target)
                    && *lr < sent
                {
                    let lr = *lr;
                    self.flag(
                        Invariant::LastResort,
                        Some(i),
                        format!(
                            "pop {pop} got notFound although a last-resort package was acknowledged at event {lr}"
                        ),
                    );
                }
            }
            Event::KeyPackageAudited {
                owner,
                count,
                has_last_resort,
                popped,
                then_last_resort,
            } => {
                if popped != count {
                    self.flag(
                        Invariant::LastResort,
                        Some(i),
                        format!(
                            "the owner counted {count} packages but the audit popped {popped} before the pool ran dry"
                        ),
                    );
                }
                if then_last_resort != has_last_resort {
                    self.flag(
                        Invariant::LastResort,
                        Some(i),
                        format!(
                            "count said last resort {has_last_resort}, the empty pool answered last resort {then_last_resort}"
                        ),
                    );
                }
                if self.lr_acked.contains_key(owner) && !has_last_resort {
                    self.flag(
                        Invariant::LastResort,
                        Some(i),
                        "an acknowledged last-resort package is gone".into(),
                    );
                }
            }
            Event::ForeignRequest {
                answered: Some(n),
                after_seq,
                detail,
                ..
            } => self.flag(
                Invariant::ForeignAccess,
                Some(i),
                format!("a request for someone else's queue (after {after_seq}) was answered with {n} messages: {detail}"),
            ),
            Event::ServerQuiescent {
                gauges,
                open_connections,
            } => {
                if *gauges != Default::default() || *open_connections != 0 {
                    self.flag(
                        Invariant::LeftOpen,
                        Some(i),
                        format!(
                            "after every client left the server still holds {gauges:?} and {open_connections} QUIC connections"
                        ),
                    );
                }
            }
            Event::Retained {
                tracked,
                open_connections,
                lasted,
            } => self.flag(
                Invariant::LeftOpen,
                Some(i),
                format!(
                    "the server tracked {tracked} connections while QUIC had {open_connections} open, for {lasted:?}"
                ),
            ),
            Event::MlsMember { member, .. } => self.mls_members.push(*member),
            Event::PlaintextSent { sender, text } => self
                .plain_sent
                .entry(*sender)
                .or_default()
                .push((text.clone(), i)),
            Event::PlaintextShown {
                member,
                sender,
                text,
            } => self.shown(i, *member, *sender, text),
            Event::MlsCommandFailed {
                command,
                error,
                retried: false,
                ..
            } => self.flag(
                Invariant::CommandFailed,
                Some(i),
                format!("{command} failed for good: {error}"),
            ),
            Event::MlsIdle {
                member,
                outbox,
                group_members,
                epoch,
                authenticator,
            } => self.mls_idle.push(Idle {
                at: i,
                member: *member,
                outbox: *outbox,
                group_members: *group_members,
                epoch: *epoch,
                authenticator: *authenticator,
            }),
            Event::MlsUpdateStarted { member } => {
                *self.updates_started.entry(*member).or_default() += 1;
            }
            Event::MlsUpdated { member, .. } => {
                *self.updates_done.entry(*member).or_default() += 1;
            }
            Event::Panicked(what) => self.flag(Invariant::Panic, Some(i), what.clone()),
            Event::Stuck(what) => self.flag(Invariant::Stuck, Some(i), what.clone()),
            Event::ForeignRequest { answered: None, .. }
            | Event::ServerCrashed { .. }
            | Event::ServerRestarted
            | Event::ClientCrashed(_)
            | Event::AnswerDropped { .. }
            | Event::MlsCommandDone { .. }
            | Event::MlsCommandFailed { retried: true, .. }
            | Event::MlsWarning { .. }
            | Event::PlaintextDirect { .. }
            | Event::DirectLink { .. }
            | Event::Fault(_) => {}
        }
    }

    fn fetched(
        &mut self,
        i: usize,
        queue: QueueId,
        after_seq: u64,
        messages: &[(u64, Vec<u8>)],
        next_seq: u64,
    ) {
        let messages: Vec<QueuedMessage> = messages
            .iter()
            .map(|(seq, payload)| QueuedMessage {
                seq: *seq,
                payload: payload.clone(),
            })
            .collect();
        // Owners here move their cursor only over what they were shown and
        // the server has no TTL: an answer starts right after its cursor.
        let view = FetchView {
            next_seq_floor: Some(0),
            deleted_upto: Some(0),
            from_cursor: true,
            ..FetchView::default()
        };
        let broken = self
            .ledger
            .fetched(queue, after_seq, &messages, next_seq, None, view);
        self.flag_broken(i, broken);
    }

    /// Flags what the ledger found broken at event `i`.
    fn flag_broken(&mut self, i: usize, broken: Vec<Broken>) {
        for b in broken {
            let invariant = match b {
                Broken::StoredTwice { .. } => Invariant::StoredTwice,
                Broken::SeqReused { .. } => Invariant::SeqReused,
                Broken::Phantom { .. } => Invariant::Phantom,
                Broken::SeqGap { .. } => Invariant::SeqGap,
                Broken::Missing { .. } => Invariant::AckedLost,
                Broken::SeqZero
                | Broken::SeqOrder { .. }
                | Broken::NextSeqBack { .. }
                | Broken::OverLimit { .. } => Invariant::SeqOrder,
            };
            self.flag(invariant, Some(i), b.to_string());
        }
    }

    fn popped(
        &mut self,
        i: usize,
        pop: u64,
        target: IdentityKey,
        package: &[u8],
        last_resort: bool,
    ) {
        let sent = self.pops.get(&pop).map_or(i, |p| p.sent);
        debug_assert!(self.pops.get(&pop).is_none_or(|p| p.target == target));
        if last_resort {
            if !self.kp_sent.contains_key(&(target, package.to_vec(), true)) {
                self.flag(
                    Invariant::LastResort,
                    Some(i),
                    format!("pop {pop} returned a last-resort package never uploaded as one"),
                );
            }
            self.lr_results.push((sent, target, i));
            return;
        }
        if !self
            .kp_sent
            .contains_key(&(target, package.to_vec(), false))
        {
            self.flag(
                Invariant::KeyPackageForged,
                Some(i),
                format!("pop {pop} returned a KeyPackage never uploaded for that identity"),
            );
        }
        if let Some(first) = self.handed.insert((target, package.to_vec()), pop) {
            self.flag(
                Invariant::KeyPackageTwice,
                Some(i),
                format!("pops {first} and {pop} got the same KeyPackage"),
            );
        }
        self.nonlr_results.push((sent, target, package.to_vec(), i));
    }

    /// A plaintext shown to `member`: it must come from another member who
    /// sent it before now.
    fn shown(&mut self, i: usize, member: IdentityKey, sender: IdentityKey, text: &str) {
        if sender == member {
            self.flag(
                Invariant::PlaintextInvented,
                Some(i),
                format!("{} was shown its own message {text:?}", member.short()),
            );
        } else if !self
            .plain_sent
            .get(&sender)
            .is_some_and(|sent| sent.iter().any(|(t, _)| t == text))
        {
            self.flag(
                Invariant::PlaintextInvented,
                Some(i),
                format!(
                    "{} was shown {text:?} from {}, who had not sent it",
                    member.short(),
                    sender.short()
                ),
            );
        }
        self.plain_shown
            .entry((member, sender))
            .or_default()
            .push((text.to_owned(), i));
    }

    fn finish(mut self) -> Vec<Violation> {
        self.check_acked();
        self.check_gap_free_and_audits();
        self.check_sender_order();
        self.check_last_resort_only_when_empty();
        self.check_plaintexts();
        self.check_epochs();
        self.v
    }

    /// At the end every member is on the same epoch of the group with the
    /// same epoch authenticator (the last idle receive of each counts: a
    /// member's final receive may make a change it had queued, which the
    /// members idle before it process in a later round). The creator adds
    /// each other member with one Commit, and every update that finished
    /// made exactly one, every update started at most one: the final epoch
    /// lies between the adds plus the finished updates and the adds plus
    /// the started ones. (An update interrupted by a timeout or a crash may
    /// or may not have reached the state file.)
    fn check_epochs(&mut self) {
        let mut last: BTreeMap<IdentityKey, &Idle> = BTreeMap::new();
        for idle in &self.mls_idle {
            last.insert(idle.member, idle);
        }
        let mut found = Vec::new();
        let mut reference: Option<&Idle> = None;
        for idle in last.values() {
            let (Some(epoch), Some(auth)) = (idle.epoch, idle.authenticator) else {
                // Without the group: the audit reports it.
                continue;
            };
            match reference {
                None => reference = Some(idle),
                Some(r) if r.epoch != Some(epoch) || r.authenticator != Some(auth) => {
                    found.push((
                        Invariant::GroupForked,
                        Some(idle.at),
                        format!(
                            "{} ended on epoch {epoch} (authenticator #{auth}), {} on epoch {} (authenticator #{})",
                            idle.member.short(),
                            r.member.short(),
                            r.epoch.unwrap_or_default(),
                            r.authenticator.unwrap_or_default()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        let adds = self.mls_members.len().saturating_sub(1) as u64;
        let done: u64 = self.updates_done.values().sum();
        let started: u64 = self.updates_started.values().sum();
        for idle in last.values() {
            let Some(epoch) = idle.epoch else {
                continue;
            };
            if epoch < adds + done || epoch > adds + started {
                found.push((
                    Invariant::CommitCount,
                    Some(idle.at),
                    format!(
                        "{} ended on epoch {epoch}, after {adds} adds, {done} updates done and {started} started",
                        idle.member.short()
                    ),
                ));
            }
        }
        for (inv, i, d) in found {
            self.flag(inv, i, d);
        }
    }

    /// Every member was shown each other member's plaintexts exactly once,
    /// in the order sent, and ended idle in the full group.
    fn check_plaintexts(&mut self) {
        let mut found = Vec::new();
        let empty = Vec::new();
        for member in &self.mls_members {
            for (sender, sent) in &self.plain_sent {
                if sender == member {
                    continue;
                }
                let shown = self.plain_shown.get(&(*member, *sender)).unwrap_or(&empty);
                let who = format!("{} (from {})", member.short(), sender.short());
                for (k, (text, i)) in shown.iter().enumerate() {
                    if shown[..k].iter().any(|(t, _)| t == text) {
                        found.push((
                            Invariant::PlaintextTwice,
                            Some(*i),
                            format!("{who} was shown {text:?} again"),
                        ));
                    }
                }
                for (text, i) in sent {
                    if !shown.iter().any(|(t, _)| t == text) {
                        found.push((
                            Invariant::PlaintextLost,
                            Some(*i),
                            format!("{who} was never shown {text:?}"),
                        ));
                    }
                }
                // Positions in the sender's order of the texts as first shown.
                let mut last: Option<(usize, &str)> = None;
                for (k, (text, i)) in shown.iter().enumerate() {
                    if shown[..k].iter().any(|(t, _)| t == text) {
                        continue;
                    }
                    let Some(pos) = sent.iter().position(|(t, _)| t == text) else {
                        continue;
                    };
                    if let Some((before, before_text)) = last
                        && pos < before
                    {
                        found.push((
                            Invariant::PlaintextOrder,
                            Some(*i),
                            format!("{who} was shown {text:?} after {before_text:?}, which was sent later"),
                        ));
                    }
                    if last.is_none_or(|(before, _)| pos > before) {
                        last = Some((pos, text));
                    }
                }
            }
            if !self.mls_idle.iter().any(|idle| idle.member == *member) {
                found.push((
                    Invariant::Audit,
                    None,
                    format!("{} never received until idle", member.short()),
                ));
            }
        }
        let n = self.mls_members.len();
        for idle in &self.mls_idle {
            if idle.outbox != 0 || idle.group_members != n {
                found.push((
                    Invariant::Audit,
                    Some(idle.at),
                    format!(
                        "{} ended with {} undelivered messages in a group of {} (of {n} members)",
                        idle.member.short(),
                        idle.outbox,
                        idle.group_members
                    ),
                ));
            }
        }
        for (inv, i, d) in found {
            self.flag(inv, i, d);
        }
    }

    fn check_acked(&mut self) {
        let mut found = Vec::new();
        for ((queue, mid), (seq, i)) in &self.acked {
            match self.ledger.shown_seq(*queue, *mid).as_ref() {
                None => found.push((
                    Invariant::AckedLost,
                    *i,
                    format!("message acknowledged with seq {seq} was never delivered"),
                )),
                Some(d) if d != seq => found.push((
                    Invariant::AckMismatch,
                    *i,
                    format!("message acknowledged with seq {seq} was delivered at seq {d}"),
                )),
                Some(_) => {}
            }
        }
        for (inv, i, d) in found {
            self.flag(inv, Some(i), d);
        }
    }

    fn check_gap_free_and_audits(&mut self) {
        let mut found = Vec::new();
        for queue in self.ledger.queues() {
            let shown = self.ledger.shown_seqs(queue);
            let max = shown.last().copied().unwrap_or(0);
            let missing: Vec<u64> = (1..=max).filter(|s| !shown.contains(s)).collect();
            if !missing.is_empty() {
                found.push((
                    Invariant::SeqGap,
                    None,
                    format!(
                        "queue {} never delivered seqs {missing:?} below its highest seq {max}",
                        queue.recipient_key.short()
                    ),
                ));
            }
        }
        for (i, queue, cursor, pending, next_seq) in &self.audited {
            let max = self.ledger.shown_seqs(*queue).last().copied().unwrap_or(0);
            if *pending > 0 {
                found.push((
                    Invariant::Audit,
                    Some(*i),
                    format!("{pending} messages still pending after the drain"),
                ));
            }
            if *cursor != max || *next_seq != max + 1 {
                found.push((
                    Invariant::Audit,
                    Some(*i),
                    format!(
                        "after the drain the cursor is {cursor} and the next seq {next_seq}, but the highest seq delivered is {max}"
                    ),
                ));
            }
        }
        for (inv, i, d) in found {
            self.flag(inv, i, d);
        }
    }

    fn check_sender_order(&mut self) {
        // Per (sender, queue): acknowledged messages with when they were
        // first sent, when acknowledged, and their seq.
        let mut per: BTreeMap<(IdentityKey, QueueId), Vec<AckedMessage>> = BTreeMap::new();
        for ((queue, key), (seq, acked_at)) in &self.acked {
            if let Some(s) = self.sent.get(&(*queue, *key)) {
                per.entry((key.sender, *queue))
                    .or_default()
                    .push((s.first_sent, *acked_at, *seq));
            }
        }
        let mut found = Vec::new();
        for msgs in per.values_mut() {
            msgs.sort_unstable();
            for (b, &(b_sent, _, b_seq)) in msgs.iter().enumerate() {
                for &(_, a_acked, a_seq) in &msgs[..b] {
                    if a_acked < b_sent && a_seq >= b_seq {
                        found.push((
                            b_sent,
                            format!(
                                "a message acknowledged (seq {a_seq}) before its sender sent the next one got the larger seq; the next got {b_seq}"
                            ),
                        ));
                    }
                }
            }
        }
        for (i, d) in found {
            self.flag(Invariant::SenderOrder, Some(i), d);
        }
    }

    /// A last-resort answer means the pool was empty while that pop ran. A
    /// package whose upload was acknowledged before the pop was sent, and
    /// which a pop sent after the answer arrived still found, was in the
    /// pool all along.
    fn check_last_resort_only_when_empty(&mut self) {
        let mut found = Vec::new();
        for (lr_sent, lr_target, lr_done) in &self.lr_results {
            for (sent, target, package, i) in &self.nonlr_results {
                if target != lr_target || sent <= lr_done {
                    continue;
                }
                if let Some(up) = self.kp_acked.get(&(*target, package.clone()))
                    && up < lr_sent
                {
                    found.push((
                        *i,
                        format!(
                            "the last-resort package was served (event {lr_done}) while a package uploaded at event {up} was still in the pool"
                        ),
                    ));
                }
            }
        }
        for (i, d) in found {
            self.flag(Invariant::LastResort, Some(i), d);
        }
    }
}

/// Renders `violations` with the events they point at, for a failure report.
pub fn report(history: &History, violations: &[Violation]) -> String {
    let mut out = String::new();
    for v in violations.iter().take(REPORTED_VIOLATIONS_MAX) {
        out.push_str(&format!("  - {v}\n"));
        if let Some(r) = v.at.and_then(|i| history.events.get(i)) {
            out.push_str(&format!("      event: {}\n", brief(&r.event)));
        }
    }
    if violations.len() > REPORTED_VIOLATIONS_MAX {
        out.push_str(&format!(
            "  ... and {} more\n",
            violations.len() - REPORTED_VIOLATIONS_MAX
        ));
    }
    out
}

/// Violations listed in a failure report; the rest are counted.
const REPORTED_VIOLATIONS_MAX: usize = 20;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use quicproquo_core::types::{ChannelId, MessageId};
    use quicproquo_server::observe::GaugeSnapshot;

    use super::*;

    fn key(n: u8) -> IdentityKey {
        IdentityKey([n; 32])
    }

    fn queue(n: u8) -> QueueId {
        QueueId {
            recipient_key: key(n),
            channel_id: ChannelId::default(),
        }
    }

    fn mid(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    fn payload(n: u8) -> Vec<u8> {
        vec![b'p', n]
    }

    /// A synthetic history, built one event at a time.
    #[derive(Default)]
    struct Synth(History);

    impl Synth {
        fn push(&mut self, e: Event) -> &mut Self {
            let at = Duration::from_millis(self.0.events.len() as u64);
            self.0.push(at, e);
            self
        }

        fn send(&mut self, sender: u8, q: u8, m: u8) -> &mut Self {
            self.push(Event::EnqueueSent {
                sender: key(sender),
                queue: queue(q),
                message_id: mid(m),
                payload: payload(m),
                attempt: 1,
            })
        }

        fn ack(&mut self, sender: u8, q: u8, m: u8, seq: u64) -> &mut Self {
            self.push(Event::EnqueueAcked {
                sender: key(sender),
                queue: queue(q),
                message_id: mid(m),
                seq,
            })
        }

        /// Sends and acknowledges message `m` with `seq`.
        fn enqueue(&mut self, sender: u8, q: u8, m: u8, seq: u64) -> &mut Self {
            self.send(sender, q, m).ack(sender, q, m, seq)
        }

        fn fetch(&mut self, q: u8, after: u64, msgs: &[(u64, u8)], next: u64) -> &mut Self {
            self.push(Event::Fetched {
                queue: queue(q),
                after_seq: after,
                messages: msgs.iter().map(|(s, m)| (*s, payload(*m))).collect(),
                next_seq: next,
            })
        }

        fn audit(&mut self, q: u8, cursor: u64, next: u64) -> &mut Self {
            self.push(Event::QueueAudited {
                queue: queue(q),
                cursor,
                pending: 0,
                next_seq: next,
            })
        }

        fn upload(&mut self, owner: u8, pkg: &[u8], last_resort: bool) -> &mut Self {
            let e = |ack| {
                if ack {
                    Event::KeyPackageUploaded {
                        owner: key(owner),
                        package: pkg.to_vec(),
                        last_resort,
                    }
                } else {
                    Event::KeyPackageUploadSent {
                        owner: key(owner),
                        package: pkg.to_vec(),
                        last_resort,
                    }
                }
            };
            self.push(e(false)).push(e(true))
        }

        fn pop(&mut self, pop: u64, target: u8, got: Option<(&[u8], bool)>) -> &mut Self {
            self.push(Event::KeyPackagePopSent {
                requester: key(99),
                target: key(target),
                pop,
            });
            match got {
                Some((pkg, last_resort)) => self.push(Event::KeyPackagePopped {
                    pop,
                    target: key(target),
                    package: pkg.to_vec(),
                    last_resort,
                }),
                None => self.push(Event::KeyPackageNotFound {
                    pop,
                    target: key(target),
                }),
            }
        }

        fn member(&mut self, m: u8) -> &mut Self {
            self.push(Event::MlsMember {
                member: key(m),
                name: format!("member-{m}"),
            })
        }

        fn say(&mut self, sender: u8, text: &str) -> &mut Self {
            self.push(Event::PlaintextSent {
                sender: key(sender),
                text: text.into(),
            })
        }

        fn shown(&mut self, member: u8, sender: u8, text: &str) -> &mut Self {
            self.push(Event::PlaintextShown {
                member: key(member),
                sender: key(sender),
                text: text.into(),
            })
        }

        fn idle(&mut self, member: u8, outbox: usize, group_members: usize) -> &mut Self {
            // The epoch the creator's adds reach.
            let members = self
                .0
                .events
                .iter()
                .filter(|r| matches!(r.event, Event::MlsMember { .. }))
                .count();
            let epoch = members.saturating_sub(1) as u64;
            self.idle_at(member, outbox, group_members, epoch, 0)
        }

        fn idle_at(
            &mut self,
            member: u8,
            outbox: usize,
            group_members: usize,
            epoch: u64,
            authenticator: u32,
        ) -> &mut Self {
            self.push(Event::MlsIdle {
                member: key(member),
                outbox,
                group_members,
                epoch: (group_members > 0).then_some(epoch),
                authenticator: (group_members > 0).then_some(authenticator),
            })
        }

        fn update(&mut self, member: u8, done: bool) -> &mut Self {
            self.push(Event::MlsUpdateStarted {
                member: key(member),
            });
            if done {
                self.push(Event::MlsUpdated {
                    member: key(member),
                    moved: 1,
                });
            }
            self
        }

        fn quiet(&mut self) -> &mut Self {
            self.push(Event::ServerQuiescent {
                gauges: GaugeSnapshot::default(),
                open_connections: 0,
            })
        }
    }

    /// Checks `h` and compares the set of broken invariants with `want`.
    fn check_finds(h: &Synth, want: &[Invariant]) {
        let v = check(&h.0);
        assert_eq!(invariants(&v), want, "violations: {v:#?}");
    }

    /// Two senders, one queue, everything delivered once in order.
    fn clean() -> Synth {
        let mut h = Synth::default();
        h.enqueue(1, 9, 1, 1)
            .enqueue(2, 9, 2, 2)
            .enqueue(1, 9, 3, 3)
            .fetch(9, 0, &[(1, 1), (2, 2)], 3)
            // A lost response: the same cursor gets the same messages again.
            .fetch(9, 0, &[(1, 1), (2, 2), (3, 3)], 4)
            .fetch(9, 3, &[], 4)
            .audit(9, 3, 4)
            .quiet();
        h
    }

    #[test]
    fn a_clean_history_passes() {
        check_finds(&clean(), &[]);
    }

    #[test]
    fn a_lost_acknowledged_message_is_reported() {
        let mut h = Synth::default();
        h.enqueue(1, 9, 1, 1)
            .enqueue(1, 9, 2, 2)
            .fetch(9, 0, &[(1, 1)], 3)
            .fetch(9, 1, &[], 3)
            .audit(9, 1, 3);
        // Seq 2 was acknowledged but never delivered; the audit sees the
        // queue's counter ahead of what was delivered.
        check_finds(&h, &[Invariant::AckedLost, Invariant::Audit]);
    }

    #[test]
    fn a_message_stored_twice_is_reported() {
        let mut h = Synth::default();
        // The first attempt's acknowledgement is lost; the retry is stored
        // again under a new seq.
        h.send(1, 9, 1)
            .send(1, 9, 1)
            .ack(1, 9, 1, 2)
            .fetch(9, 0, &[(1, 1), (2, 1)], 3)
            .audit(9, 2, 3);
        check_finds(&h, &[Invariant::StoredTwice, Invariant::AckMismatch]);
    }

    #[test]
    fn two_acknowledgements_with_different_seqs_are_reported() {
        let mut h = Synth::default();
        h.enqueue(1, 9, 1, 1)
            .ack(1, 9, 1, 2)
            .fetch(9, 0, &[(1, 1)], 2);
        check_finds(&h, &[Invariant::StoredTwice]);
    }

    #[test]
    fn a_reordering_of_one_senders_messages_is_reported() {
        let mut h = Synth::default();
        // Message 1 was acknowledged before message 2 was sent, yet got
        // the larger seq.
        h.enqueue(1, 9, 1, 2)
            .enqueue(1, 9, 2, 1)
            .fetch(9, 0, &[(1, 2), (2, 1)], 3)
            .audit(9, 2, 3);
        check_finds(&h, &[Invariant::SenderOrder]);
    }

    #[test]
    fn concurrent_sends_of_one_sender_may_land_in_any_order() {
        let mut h = Synth::default();
        // Message 2 was sent before message 1 was acknowledged: no order.
        h.send(1, 9, 1)
            .send(1, 9, 2)
            .ack(1, 9, 2, 1)
            .ack(1, 9, 1, 2)
            .fetch(9, 0, &[(1, 2), (2, 1)], 3)
            .audit(9, 2, 3);
        check_finds(&h, &[]);
    }

    #[test]
    fn a_reused_seq_is_reported() {
        let mut h = Synth::default();
        // Seq 1 shown with message 1, then (after a restart) with message 2.
        h.enqueue(1, 9, 1, 1)
            .send(2, 9, 2)
            .fetch(9, 0, &[(1, 1)], 2)
            .fetch(9, 0, &[(1, 2)], 2);
        check_finds(&h, &[Invariant::SeqReused]);
    }

    #[test]
    fn a_gap_and_a_backwards_fetch_are_reported() {
        let mut h = Synth::default();
        h.enqueue(1, 9, 1, 1)
            .enqueue(1, 9, 2, 2)
            .enqueue(1, 9, 3, 3)
            .fetch(9, 0, &[(1, 1), (3, 3)], 4)
            .fetch(9, 1, &[(1, 1)], 4);
        check_finds(
            &h,
            &[Invariant::AckedLost, Invariant::SeqGap, Invariant::SeqOrder],
        );
    }

    #[test]
    fn a_payload_never_sent_is_reported() {
        let mut h = Synth::default();
        // Message 7 was sent to queue 8, not 9.
        h.send(1, 8, 7).fetch(9, 0, &[(1, 7)], 2);
        check_finds(&h, &[Invariant::Phantom]);
    }

    #[test]
    fn a_double_issued_key_package_is_reported() {
        let mut h = Synth::default();
        h.upload(5, b"kp-a", false)
            .upload(5, b"kp-b", false)
            .pop(1, 5, Some((b"kp-a", false)))
            .pop(2, 5, Some((b"kp-a", false)));
        check_finds(&h, &[Invariant::KeyPackageTwice]);
    }

    #[test]
    fn a_made_up_key_package_is_reported() {
        let mut h = Synth::default();
        h.upload(5, b"kp-a", false)
            .pop(1, 5, Some((b"kp-x", false)))
            .pop(2, 6, Some((b"kp-a", false)));
        check_finds(&h, &[Invariant::KeyPackageForged]);
    }

    #[test]
    fn the_last_resort_served_when_empty_passes() {
        let mut h = Synth::default();
        h.upload(5, b"kp-a", false)
            .upload(5, b"lr", true)
            .pop(1, 5, Some((b"kp-a", false)))
            .pop(2, 5, Some((b"lr", true)))
            .pop(3, 5, Some((b"lr", true)))
            .push(Event::KeyPackageAudited {
                owner: key(5),
                count: 0,
                has_last_resort: true,
                popped: 0,
                then_last_resort: true,
            });
        check_finds(&h, &[]);
    }

    #[test]
    fn the_last_resort_served_while_the_pool_is_not_empty_is_reported() {
        let mut h = Synth::default();
        h.upload(5, b"kp-a", false)
            .upload(5, b"lr", true)
            .pop(1, 5, Some((b"lr", true)))
            .pop(2, 5, Some((b"kp-a", false)));
        check_finds(&h, &[Invariant::LastResort]);
    }

    #[test]
    fn not_found_with_a_last_resort_uploaded_is_reported() {
        let mut h = Synth::default();
        h.upload(5, b"lr", true).pop(1, 5, None);
        check_finds(&h, &[Invariant::LastResort]);
    }

    #[test]
    fn an_audit_that_miscounts_the_pool_is_reported() {
        let mut h = Synth::default();
        h.upload(5, b"lr", true).push(Event::KeyPackageAudited {
            owner: key(5),
            count: 2,
            has_last_resort: true,
            popped: 1,
            then_last_resort: true,
        });
        check_finds(&h, &[Invariant::LastResort]);
    }

    #[test]
    fn an_answered_foreign_request_is_reported() {
        let mut h = clean();
        h.push(Event::ForeignRequest {
            requester: Some(key(1)),
            queue: queue(9),
            after_seq: 3,
            answered: None,
            detail: "permissionDenied".into(),
        })
        .push(Event::ForeignRequest {
            requester: Some(key(1)),
            queue: queue(9),
            after_seq: 3,
            answered: Some(0),
            detail: String::new(),
        });
        check_finds(&h, &[Invariant::ForeignAccess]);
    }

    #[test]
    fn a_server_left_with_waiters_is_reported() {
        let mut h = clean();
        h.push(Event::ServerQuiescent {
            gauges: GaugeSnapshot {
                waiters: 1,
                ..GaugeSnapshot::default()
            },
            open_connections: 0,
        });
        check_finds(&h, &[Invariant::LeftOpen]);
    }

    /// A three-member group: members 1 and 2 send two plaintexts each.
    fn mls_clean() -> Synth {
        let mut h = Synth::default();
        for m in 1..=3 {
            h.member(m);
        }
        h.say(1, "a1")
            .say(2, "b1")
            .shown(2, 1, "a1")
            .shown(3, 1, "a1")
            .say(1, "a2")
            .shown(1, 2, "b1")
            .shown(3, 2, "b1")
            .shown(2, 1, "a2")
            .say(2, "b2")
            .shown(3, 1, "a2")
            .shown(1, 2, "b2")
            .shown(3, 2, "b2");
        for m in 1..=3 {
            h.idle(m, 0, 3);
        }
        h
    }

    #[test]
    fn a_group_where_everyone_sees_everything_once_passes() {
        check_finds(&mls_clean(), &[]);
    }

    #[test]
    fn a_plaintext_shown_twice_is_reported() {
        let mut h = mls_clean();
        h.shown(3, 1, "a1");
        check_finds(&h, &[Invariant::PlaintextTwice]);
    }

    #[test]
    fn a_plaintext_never_shown_is_reported() {
        let mut h = mls_clean();
        // Member 2 sends a third plaintext nobody is shown.
        h.say(2, "b3");
        check_finds(&h, &[Invariant::PlaintextLost]);
    }

    #[test]
    fn a_plaintext_shown_out_of_order_is_reported() {
        let mut h = Synth::default();
        for m in 1..=2 {
            h.member(m);
        }
        h.say(1, "a1")
            .say(1, "a2")
            .shown(2, 1, "a2")
            .shown(2, 1, "a1")
            .idle(1, 0, 2)
            .idle(2, 0, 2);
        check_finds(&h, &[Invariant::PlaintextOrder]);
    }

    #[test]
    fn invented_and_own_plaintexts_and_failed_commands_are_reported() {
        let mut h = mls_clean();
        // Shown before it was sent, never sent, and shown to its sender.
        h.shown(2, 1, "a3")
            .say(1, "a3")
            .shown(3, 1, "a3")
            .shown(3, 3, "c1")
            .shown(1, 1, "a1")
            .push(Event::MlsCommandFailed {
                member: key(1),
                command: "send".into(),
                error: "MLS: boom".into(),
                retried: false,
            })
            .push(Event::MlsCommandFailed {
                member: key(1),
                command: "send".into(),
                error: "timed out".into(),
                retried: true,
            });
        check_finds(
            &h,
            &[Invariant::PlaintextInvented, Invariant::CommandFailed],
        );
    }

    #[test]
    fn a_member_left_with_undelivered_messages_or_outside_the_group_is_reported() {
        let mut h = mls_clean();
        h.idle(2, 1, 3).idle(3, 0, 2);
        check_finds(&h, &[Invariant::Audit]);
        let mut h = Synth::default();
        h.member(1).member(2).idle(1, 0, 2);
        check_finds(&h, &[Invariant::Audit]);
    }

    /// The three-member group after two updates that finished and one
    /// that was interrupted and never made: everyone on epoch 4.
    fn mls_updated() -> Synth {
        let mut h = Synth::default();
        for m in 1..=3 {
            h.member(m);
        }
        h.update(1, true).update(2, true).update(3, false);
        h
    }

    #[test]
    fn members_on_one_epoch_with_one_authenticator_pass() {
        let mut h = mls_updated();
        for m in 1..=3 {
            h.idle_at(m, 0, 3, 4, 4);
        }
        check_finds(&h, &[]);
        // The interrupted update made its Commit after all.
        let mut h = mls_updated();
        for m in 1..=3 {
            h.idle_at(m, 0, 3, 5, 5);
        }
        check_finds(&h, &[]);
        // A member behind in the first round caught up in the second.
        let mut h = mls_updated();
        h.idle_at(1, 0, 3, 4, 4)
            .idle_at(2, 0, 3, 5, 5)
            .idle_at(3, 0, 3, 5, 5)
            .idle_at(1, 0, 3, 5, 5);
        check_finds(&h, &[]);
    }

    #[test]
    fn a_forked_group_is_reported() {
        // Same epoch, different authenticators: two Commits both merged.
        let mut h = mls_updated();
        h.idle_at(1, 0, 3, 4, 4)
            .idle_at(2, 0, 3, 4, 7)
            .idle_at(3, 0, 3, 4, 4);
        check_finds(&h, &[Invariant::GroupForked]);
        // A member left behind on an older epoch (each epoch a count the
        // updates allow).
        let mut h = mls_updated();
        h.idle_at(1, 0, 3, 5, 5)
            .idle_at(2, 0, 3, 5, 5)
            .idle_at(3, 0, 3, 4, 4);
        check_finds(&h, &[Invariant::GroupForked]);
    }

    #[test]
    fn an_epoch_that_does_not_match_the_commits_made_is_reported() {
        // An update that finished was never committed.
        let mut h = mls_updated();
        for m in 1..=3 {
            h.idle_at(m, 0, 3, 3, 3);
        }
        check_finds(&h, &[Invariant::CommitCount]);
        // More Commits than updates started (one made twice).
        let mut h = mls_updated();
        for m in 1..=3 {
            h.idle_at(m, 0, 3, 6, 6);
        }
        check_finds(&h, &[Invariant::CommitCount]);
    }

    #[test]
    fn panics_stuck_runs_and_refusals_are_reported() {
        let mut h = clean();
        h.push(Event::Panicked("boom".into()))
            .push(Event::Stuck("recipient 2 not done".into()))
            .push(Event::EnqueueFailed {
                sender: key(1),
                message_id: mid(4),
                error: "queueFull".into(),
                transient: false,
            });
        check_finds(
            &h,
            &[Invariant::Refused, Invariant::Panic, Invariant::Stuck],
        );
    }
}
