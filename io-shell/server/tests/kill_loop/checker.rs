//! The kill loop's history and the checker that judges it once the run is
//! over. Clients record what they sent before sending it and what they
//! were told once the answer arrived, so an answer recorded before a
//! request was sent happened before it. A request cut off by a kill is
//! recorded as an unknown outcome: it may or may not have been applied.
//!
//! Over the whole history the checker requires:
//! - the queue guarantees answer by answer, through the shared
//!   `quicproquo_core::testing::ledger::Ledger`: one seq names one message,
//!   one sender's message id is stored at one seq (a retry after an unknown
//!   outcome gets the seq of the first attempt that was applied), fetches
//!   answer consecutive seqs right after their cursor, `next_seq` never
//!   goes back, and an acknowledged message no cursor has passed is in
//!   every fetch that reaches it;
//! - at the end, after the audit read every queue to its end: every
//!   acknowledged message was shown to its recipient at its seq, each
//!   queue's seqs were shown gap-free from 1 up to its `next_seq`, every
//!   message sent was acknowledged in the end (the senders retry until it
//!   is), and one sender's messages to one queue got increasing seqs in the
//!   order sent;
//! - no single-use KeyPackage is handed out twice or made up, a last-resort
//!   answer comes only from an empty pool, no acknowledged package is lost
//!   beyond what pops with an unknown outcome may have taken, the audit
//!   pops what the owner counted, in the order uploaded;
//! - the server refuses no request of the load (which stays within every
//!   limit; a pop's notFound is an answer), never answers out of shape,
//!   never exits on its own and keeps its certificate.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Mutex;

use quicproquo_core::ErrorKind;
use quicproquo_core::protocol::{Gap, QueuedMessage};
use quicproquo_core::testing::ledger::{Broken, FetchView, Ledger, MessageKey};
use quicproquo_core::types::{IdentityKey, QueueId};

/// One thing a client or the driver did or was told.
#[derive(Debug, Clone)]
pub enum Event {
    /// A sender sent one message to one queue (again, for a retry: same
    /// key, same payload).
    EnqueueSent {
        /// The recipient's queue.
        queue: QueueId,
        /// Sender and message id.
        key: MessageKey,
        /// The payload.
        payload: Vec<u8>,
    },
    /// An answer acknowledged that message at `seq`.
    EnqueueAcked {
        /// The sender task (it sends one request at a time).
        task: usize,
        /// The recipient's queue.
        queue: QueueId,
        /// Sender and message id.
        key: MessageKey,
        /// Its seq.
        seq: u64,
    },
    /// The owner of `queue` sent a fetch (or fetchWait) after `cursor`.
    FetchSent {
        /// Names the fetch.
        fetch: u64,
        /// The queue.
        queue: QueueId,
        /// Everything up to here is acknowledged by it.
        cursor: u64,
    },
    /// Its answer.
    Fetched {
        /// The fetch.
        fetch: u64,
        /// The queue.
        queue: QueueId,
        /// Its cursor.
        cursor: u64,
        /// Its limit.
        limit: u32,
        /// The messages after the cursor.
        messages: Vec<QueuedMessage>,
        /// The queue's next seq.
        next_seq: u64,
        /// Seqs the TTL dropped (the kill loop runs without a TTL).
        gap: Option<Gap>,
        /// Part of the final audit.
        audit: bool,
    },
    /// An upload of a KeyPackage was sent.
    KpUploadSent {
        /// Whose pool.
        owner: IdentityKey,
        /// The package.
        package: Vec<u8>,
        /// The last-resort package.
        last_resort: bool,
    },
    /// That upload was acknowledged.
    KpUploaded {
        /// Whose pool.
        owner: IdentityKey,
        /// The package.
        package: Vec<u8>,
        /// The last-resort package.
        last_resort: bool,
    },
    /// A pop (fetchKeyPackage) was sent.
    PopSent {
        /// Names the pop.
        pop: u64,
    },
    /// It handed out `package`.
    Popped {
        /// The pop.
        pop: u64,
        /// Whose pool.
        target: IdentityKey,
        /// The package.
        package: Vec<u8>,
        /// Answered as the last-resort package.
        last_resort: bool,
    },
    /// It was answered notFound.
    PopNotFound {
        /// The pop.
        pop: u64,
        /// Whose pool.
        target: IdentityKey,
    },
    /// A pop's outcome is unknown: it may have taken a package.
    PopUnknown {
        /// Whose pool.
        target: IdentityKey,
    },
    /// The audit counted `owner`'s pool, then popped it until empty.
    KpAudited {
        /// Whose pool.
        owner: IdentityKey,
        /// What keyPackageCount said.
        count: u32,
        /// And whether it holds a last-resort package.
        has_last_resort: bool,
        /// The single-use packages the audit's pops got, in order.
        popped: Vec<Vec<u8>>,
        /// What the pop after them got: `Some(true)` the last-resort
        /// package, `None` notFound.
        then_last_resort: Option<bool>,
    },
    /// A request was answered (a result or a typed error).
    Answered {
        /// Its method.
        method: &'static str,
    },
    /// A request's outcome is unknown: the server was killed while it was
    /// in flight, or its connection broke.
    Unknown {
        /// Its method.
        method: &'static str,
        /// Cut off by a kill (else by a broken connection).
        killed: bool,
    },
    /// A request a shared database rolled back (a conflict between two
    /// nodes' turns): answered `unavailable`, to be sent again. Counted,
    /// and treated as an unknown outcome by the client.
    RolledBack {
        /// Its method.
        method: &'static str,
    },
    /// A request was refused (a pop's notFound is `PopNotFound`).
    Refused {
        /// Its method.
        method: &'static str,
        /// Why.
        kind: ErrorKind,
        /// The server's message.
        detail: String,
    },
    /// An answer that does not fit its request.
    Malformed {
        /// The method.
        method: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The driver killed the server with SIGKILL.
    Killed {
        /// Which kill (from 1); the one before the audit is the last.
        kill: u32,
    },
    /// The server exited before it was killed.
    ServerExited {
        /// How.
        status: String,
    },
    /// A restarted server presented another certificate than it did at
    /// its first start.
    CertificateChanged,
}

/// The events of one run, in the order they happened.
#[derive(Debug, Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
}

impl History {
    /// Appends `event`.
    pub fn push(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The guarantee a [`Violation`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// An acknowledged message was never shown to its recipient.
    AckedLost,
    /// One message stored at two seqs.
    StoredTwice,
    /// One seq named two messages.
    SeqReused,
    /// A payload shown was never sent to that queue.
    Phantom,
    /// Seqs skipped, in a fetch or in the queue's whole life.
    SeqGap,
    /// A fetch answered seqs out of order, or `next_seq` went back.
    SeqOrder,
    /// One sender's messages to one queue got seqs out of the order sent.
    SenderOrder,
    /// A message sent was never acknowledged.
    Unresolved,
    /// A request was refused (the load stays within every limit, and a
    /// pop's notFound is no refusal), or answered with something else.
    Refused,
    /// A single-use KeyPackage was handed out twice.
    KeyPackageTwice,
    /// A pop handed out a package never uploaded to that pool.
    KeyPackageForged,
    /// An acknowledged package disappeared without a pop to take it.
    KeyPackageLost,
    /// The audit's pops did not come in the order uploaded, or not as many
    /// as counted.
    KeyPackageAudit,
    /// The last-resort package was served while the pool held a package,
    /// or not served when one was stored.
    LastResort,
    /// The server exited on its own, or changed its certificate.
    Server,
}

/// A broken guarantee, with the event that showed it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which.
    pub invariant: Invariant,
    /// The index of the event, if one showed it.
    pub at: Option<usize>,
    /// What was seen.
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

/// The figures of a run.
#[derive(Debug, Default)]
pub struct Summary {
    /// SIGKILLs, the one before the audit included.
    pub kills: u32,
    /// Requests answered, by method.
    pub answered: BTreeMap<&'static str, u64>,
    /// Requests whose outcome is unknown, by method.
    pub unknown: BTreeMap<&'static str, u64>,
    /// Of them, cut off by a broken connection rather than a kill.
    pub connections_broken: u64,
    /// Requests a shared database rolled back (several nodes), by method.
    pub rolled_back: BTreeMap<&'static str, u64>,
    /// Distinct messages sent (one per queue a message went to).
    pub messages_sent: u64,
    /// Of them, sent again after an unknown outcome.
    pub messages_sent_again: u64,
    /// Of them, acknowledged.
    pub messages_acknowledged: u64,
    /// Seqs shown to their recipients, the audit included.
    pub seqs_shown: u64,
    /// Seqs the audit found still queued.
    pub seqs_audited: u64,
    /// KeyPackage uploads acknowledged.
    pub packages_uploaded: u64,
    /// Single-use packages handed out, the audit's pops included.
    pub packages_popped: u64,
    /// Pops answered with the last-resort package.
    pub last_resort_answers: u64,
    /// Pops answered notFound.
    pub not_found: u64,
}

impl Summary {
    /// Requests answered, all methods.
    pub fn answered_total(&self) -> u64 {
        self.answered.values().sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by_method = |counts: &BTreeMap<&'static str, u64>| {
            let each: Vec<String> = counts.iter().map(|(m, n)| format!("{m} {n}")).collect();
            each.join(", ")
        };
        writeln!(
            f,
            "kill loop: {} requests answered ({})",
            self.answered_total(),
            by_method(&self.answered),
        )?;
        writeln!(
            f,
            "kill loop: {} with an unknown outcome ({}), {} of them cut off by a broken connection rather than a kill",
            self.unknown.values().sum::<u64>(),
            by_method(&self.unknown),
            self.connections_broken,
        )?;
        if !self.rolled_back.is_empty() {
            writeln!(
                f,
                "kill loop: {} rolled back by the database for a concurrent request on another node, and sent again ({})",
                self.rolled_back.values().sum::<u64>(),
                by_method(&self.rolled_back),
            )?;
        }
        writeln!(
            f,
            "kill loop: messages (one per recipient queue): {} sent ({} again, after an unknown outcome), {} acknowledged, {} seqs shown to their recipients ({} of them by the audit)",
            self.messages_sent,
            self.messages_sent_again,
            self.messages_acknowledged,
            self.seqs_shown,
            self.seqs_audited
        )?;
        write!(
            f,
            "kill loop: KeyPackages: {} uploads acknowledged, {} single-use packages popped, {} last-resort answers, {} notFound",
            self.packages_uploaded, self.packages_popped, self.last_resort_answers, self.not_found
        )
    }
}

/// Judges `events`: the violations found and the run's figures.
pub fn check(events: &[Event]) -> (Vec<Violation>, Summary) {
    let mut c = Checker::default();
    for (i, e) in events.iter().enumerate() {
        c.observe(i, e);
    }
    c.finish();
    (c.v, c.summary)
}

/// Renders at most `max` violations, one a line.
pub fn report(violations: &[Violation], max: usize) -> String {
    let mut out = String::new();
    for v in violations.iter().take(max) {
        out.push_str(&format!("  - {v}\n"));
    }
    if violations.len() > max {
        out.push_str(&format!("  ... and {} more\n", violations.len() - max));
    }
    out
}

/// What became of one message sent to one queue.
#[derive(Debug, Default)]
struct Sent {
    /// Times it was sent: more than once after an unknown outcome.
    attempts: u32,
    /// Whether an answer acknowledged it.
    acked: bool,
}

#[derive(Debug, Default)]
struct Checker {
    v: Vec<Violation>,
    summary: Summary,
    ledger: Ledger,
    /// Each message sent.
    sent: BTreeMap<(QueueId, MessageKey), Sent>,
    /// `(sender task, queue)` -> seqs of first acknowledgements, in order.
    sender_seqs: HashMap<(usize, QueueId), Vec<(u64, usize)>>,
    /// Fetch -> the `next_seq` floor when it was sent.
    fetch_floor: HashMap<u64, u64>,
    /// Queue -> the `next_seq` of its last audit fetch.
    audited_next: BTreeMap<QueueId, u64>,
    /// `(owner, package)` -> `(upload index in the owner's order, last
    /// resort)`, for every upload sent.
    kp_sent: HashMap<(IdentityKey, Vec<u8>), (usize, bool)>,
    /// Uploads sent per owner so far (the upload index).
    kp_order: HashMap<IdentityKey, usize>,
    /// `(owner, package)` -> event of the acknowledgement, single-use only.
    kp_acked: HashMap<(IdentityKey, Vec<u8>), usize>,
    /// Owner -> event of its first acknowledged last-resort upload.
    lr_acked: HashMap<IdentityKey, usize>,
    /// Pop -> the event it was sent at.
    pop_sent: HashMap<u64, usize>,
    /// `(target, package)` -> the pop that handed it out.
    handed: HashMap<(IdentityKey, Vec<u8>), u64>,
    /// Target -> pops whose outcome is unknown.
    pops_unknown: HashMap<IdentityKey, u64>,
    /// Single-use answers: `(pop sent, target, package, answer)`.
    single_results: Vec<(usize, IdentityKey, Vec<u8>, usize)>,
    /// Last-resort answers: `(pop sent, target, answer)`.
    lr_results: Vec<(usize, IdentityKey, usize)>,
}

impl Checker {
    fn flag(&mut self, invariant: Invariant, at: Option<usize>, detail: String) {
        self.v.push(Violation {
            invariant,
            at,
            detail,
        });
    }

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

    fn observe(&mut self, i: usize, e: &Event) {
        match e {
            Event::EnqueueSent {
                queue,
                key,
                payload,
            } => {
                self.ledger.sent(*queue, *key, payload);
                self.sent.entry((*queue, *key)).or_default().attempts += 1;
            }
            Event::EnqueueAcked {
                task,
                queue,
                key,
                seq,
            } => {
                let broken = self.ledger.acknowledged(*queue, *key, *seq);
                self.flag_broken(i, broken);
                let sent = self.sent.entry((*queue, *key)).or_default();
                if !sent.acked {
                    sent.acked = true;
                    self.sender_seqs
                        .entry((*task, *queue))
                        .or_default()
                        .push((*seq, i));
                }
            }
            Event::FetchSent {
                fetch,
                queue,
                cursor,
            } => {
                self.ledger.cursor_sent(*queue, *cursor);
                self.fetch_floor
                    .insert(*fetch, self.ledger.next_seq_floor(*queue));
            }
            Event::Fetched {
                fetch,
                queue,
                cursor,
                limit,
                messages,
                next_seq,
                gap,
                audit,
            } => {
                if let Some(g) = gap {
                    self.flag(
                        Invariant::SeqGap,
                        Some(i),
                        format!(
                            "a fetch reported seqs {}..={} dropped, with no TTL set",
                            g.from, g.to
                        ),
                    );
                }
                // Owners move their cursor only over what they were shown
                // and the server has no TTL: an answer starts right after
                // its cursor. Answers may not go below the `next_seq` known
                // when the fetch was sent (acknowledgements that arrive
                // while it is in flight may be of later enqueues).
                let view = FetchView {
                    limit: Some(*limit),
                    next_seq_floor: Some(self.fetch_floor.remove(fetch).unwrap_or(0)),
                    deleted_upto: None,
                    deletable_upto: Some(self.ledger.deletable_upto(*queue)),
                    from_cursor: true,
                };
                let broken = self
                    .ledger
                    .fetched(*queue, *cursor, messages, *next_seq, *gap, view);
                self.flag_broken(i, broken);
                if *audit {
                    self.audited_next.insert(*queue, *next_seq);
                    self.summary.seqs_audited += messages.len() as u64;
                }
            }
            Event::KpUploadSent {
                owner,
                package,
                last_resort,
            } => {
                let n = self.kp_order.entry(*owner).or_default();
                self.kp_sent
                    .entry((*owner, package.clone()))
                    .or_insert((*n, *last_resort));
                *n += 1;
            }
            Event::KpUploaded {
                owner,
                package,
                last_resort,
            } => {
                self.summary.packages_uploaded += 1;
                if *last_resort {
                    self.lr_acked.entry(*owner).or_insert(i);
                } else {
                    self.kp_acked.entry((*owner, package.clone())).or_insert(i);
                }
            }
            Event::PopSent { pop, .. } => {
                self.pop_sent.insert(*pop, i);
            }
            Event::Popped {
                pop,
                target,
                package,
                last_resort,
            } => self.popped(i, *pop, *target, package, *last_resort),
            Event::PopNotFound { pop, target } => {
                self.summary.not_found += 1;
                let sent = self.pop_sent.get(pop).copied().unwrap_or(i);
                if let Some(lr) = self.lr_acked.get(target).copied()
                    && lr < sent
                {
                    self.flag(
                        Invariant::LastResort,
                        Some(i),
                        format!(
                            "pop {pop} got notFound although a last-resort package was acknowledged at event {lr}"
                        ),
                    );
                }
            }
            Event::PopUnknown { target } => {
                *self.pops_unknown.entry(*target).or_default() += 1;
            }
            Event::KpAudited {
                owner,
                count,
                has_last_resort,
                popped,
                then_last_resort,
            } => self.kp_audited(
                i,
                *owner,
                *count,
                *has_last_resort,
                popped,
                *then_last_resort,
            ),
            Event::Answered { method } => {
                *self.summary.answered.entry(method).or_default() += 1;
            }
            Event::Unknown { method, killed } => {
                *self.summary.unknown.entry(method).or_default() += 1;
                if !killed {
                    self.summary.connections_broken += 1;
                }
            }
            Event::RolledBack { method } => {
                *self.summary.rolled_back.entry(method).or_default() += 1;
            }
            Event::Refused {
                method,
                kind,
                detail,
            } => self.flag(
                Invariant::Refused,
                Some(i),
                format!("{method} refused ({kind:?}): {detail}"),
            ),
            Event::Malformed { method, detail } => self.flag(
                Invariant::Refused,
                Some(i),
                format!("{method} answered out of shape: {detail}"),
            ),
            Event::Killed { kill } => self.summary.kills = self.summary.kills.max(*kill),
            Event::ServerExited { status } => self.flag(
                Invariant::Server,
                Some(i),
                format!("qpq-server exited before it was killed: {status}"),
            ),
            Event::CertificateChanged => self.flag(
                Invariant::Server,
                Some(i),
                "the restarted server presented another certificate".into(),
            ),
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
        let sent = self.pop_sent.get(&pop).copied().unwrap_or(i);
        let uploaded = self.kp_sent.get(&(target, package.to_vec())).copied();
        if last_resort {
            self.summary.last_resort_answers += 1;
            if !matches!(uploaded, Some((_, true))) {
                self.flag(
                    Invariant::KeyPackageForged,
                    Some(i),
                    format!("pop {pop} returned a last-resort package never uploaded as one"),
                );
            }
            self.lr_results.push((sent, target, i));
            return;
        }
        self.summary.packages_popped += 1;
        if !matches!(uploaded, Some((_, false))) {
            self.flag(
                Invariant::KeyPackageForged,
                Some(i),
                format!("pop {pop} returned a KeyPackage never uploaded to that pool"),
            );
        }
        if let Some(first) = self.handed.insert((target, package.to_vec()), pop) {
            self.flag(
                Invariant::KeyPackageTwice,
                Some(i),
                format!("pops {first} and {pop} got the same single-use KeyPackage"),
            );
        }
        self.single_results
            .push((sent, target, package.to_vec(), i));
    }

    fn kp_audited(
        &mut self,
        i: usize,
        owner: IdentityKey,
        count: u32,
        has_last_resort: bool,
        popped: &[Vec<u8>],
        then_last_resort: Option<bool>,
    ) {
        if popped.len() != count as usize {
            self.flag(
                Invariant::KeyPackageAudit,
                Some(i),
                format!(
                    "the owner counted {count} packages, the audit popped {} before the pool ran dry",
                    popped.len()
                ),
            );
        }
        if then_last_resort == Some(false) {
            self.flag(
                Invariant::KeyPackageAudit,
                Some(i),
                "a pop after the pool ran dry got another single-use package".into(),
            );
        }
        if then_last_resort.is_some() != has_last_resort {
            self.flag(
                Invariant::LastResort,
                Some(i),
                format!(
                    "count said last resort {has_last_resort}, the empty pool answered {}",
                    if then_last_resort.is_some() {
                        "with one"
                    } else {
                        "notFound"
                    }
                ),
            );
        }
        if self.lr_acked.contains_key(&owner) && !has_last_resort {
            self.flag(
                Invariant::LastResort,
                Some(i),
                "an acknowledged last-resort package is gone".into(),
            );
        }
        // One owner uploads one package at a time, so its pool is in the
        // order its uploads were sent.
        let order: Vec<Option<usize>> = popped
            .iter()
            .map(|p| self.kp_sent.get(&(owner, p.clone())).map(|(n, _)| *n))
            .collect();
        if order.windows(2).any(|w| w[0] >= w[1]) {
            self.flag(
                Invariant::KeyPackageAudit,
                Some(i),
                "the audit's pops did not come in the order uploaded".into(),
            );
        }
    }

    fn finish(&mut self) {
        self.check_queues();
        self.check_sender_order();
        self.check_last_resort_only_when_empty();
        self.check_packages_kept();
    }

    /// Every acknowledged message was shown at its seq, and every queue's
    /// seqs were shown from 1 to its end with none missing.
    fn check_queues(&mut self) {
        let mut found = Vec::new();
        let mut queues: BTreeSet<QueueId> = self.ledger.queues().into_iter().collect();
        queues.extend(self.audited_next.keys().copied());
        let shown: HashMap<QueueId, BTreeSet<u64>> = queues
            .iter()
            .map(|q| (*q, self.ledger.shown_seqs(*q).into_iter().collect()))
            .collect();
        for (queue, key, seq) in self.ledger.acknowledged_all() {
            if !shown.get(&queue).is_some_and(|s| s.contains(&seq)) {
                found.push((
                    Invariant::AckedLost,
                    format!(
                        "message {} acknowledged at seq {seq} of a queue was never shown to its recipient",
                        brief(&key.id.0)
                    ),
                ));
            }
        }
        for queue in &queues {
            let shown = &shown[queue];
            self.summary.seqs_shown += shown.len() as u64;
            let Some(next) = self.audited_next.get(queue).copied() else {
                found.push((
                    Invariant::AckedLost,
                    "a queue with acknowledged messages was not audited".into(),
                ));
                continue;
            };
            // Shown seqs are never 0 and stay below `next_seq` (the ledger
            // checks both), so as many as `next - 1` means all of them.
            if shown.len() as u64 != next - 1 {
                let missing = (1..next).find(|s| !shown.contains(s));
                found.push((
                    Invariant::SeqGap,
                    format!(
                        "a queue ends at next seq {next} but {} of its seqs were shown (first missing: {missing:?})",
                        shown.len()
                    ),
                ));
            }
        }
        for ((_, key), sent) in &self.sent {
            self.summary.messages_sent += 1;
            if sent.attempts > 1 {
                self.summary.messages_sent_again += 1;
            }
            if sent.acked {
                self.summary.messages_acknowledged += 1;
            } else {
                found.push((
                    Invariant::Unresolved,
                    format!(
                        "message {} was sent but never acknowledged",
                        brief(&key.id.0)
                    ),
                ));
            }
        }
        for (invariant, detail) in found {
            self.flag(invariant, None, detail);
        }
    }

    /// A sender task sends one request at a time and retries it until it is
    /// acknowledged: its messages to one queue must get increasing seqs.
    fn check_sender_order(&mut self) {
        let mut found = Vec::new();
        for seqs in self.sender_seqs.values() {
            for w in seqs.windows(2) {
                if w[1].0 <= w[0].0 {
                    found.push((
                        w[1].1,
                        format!(
                            "a sender's message got seq {} after its previous one to the queue got {}",
                            w[1].0, w[0].0
                        ),
                    ));
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
        // Per pool, the single-use answers whose package's upload was
        // acknowledged, in the order their pops were sent: `(pop sent,
        // upload acknowledged, answer)`; and from each on, the earliest
        // acknowledged upload among them.
        let mut per: HashMap<IdentityKey, Vec<(usize, usize, usize)>> = HashMap::new();
        for (sent, target, package, i) in &self.single_results {
            if let Some(up) = self.kp_acked.get(&(*target, package.clone())) {
                per.entry(*target).or_default().push((*sent, *up, *i));
            }
        }
        let mut earliest: HashMap<IdentityKey, Vec<(usize, usize)>> = HashMap::new();
        for (target, answers) in &mut per {
            answers.sort_unstable();
            let mut from = vec![(usize::MAX, 0); answers.len() + 1];
            for k in (0..answers.len()).rev() {
                from[k] = from[k + 1].min((answers[k].1, answers[k].2));
            }
            earliest.insert(*target, from);
        }
        let mut found = Vec::new();
        for (lr_sent, lr_target, lr_done) in &self.lr_results {
            let (Some(answers), Some(from)) = (per.get(lr_target), earliest.get(lr_target)) else {
                continue;
            };
            let after = answers.partition_point(|(sent, _, _)| sent <= lr_done);
            let (up, i) = from[after];
            if up < *lr_sent {
                found.push((
                    i,
                    format!(
                        "the last-resort package was served (event {lr_done}) while a package acknowledged at event {up} was still in the pool"
                    ),
                ));
            }
        }
        for (i, d) in found {
            self.flag(Invariant::LastResort, Some(i), d);
        }
    }

    /// Every acknowledged single-use package was handed out in the end
    /// (the audit empties every pool), except at most one for each pop
    /// whose outcome is unknown.
    fn check_packages_kept(&mut self) {
        let mut lost: BTreeMap<IdentityKey, u64> = BTreeMap::new();
        for (target, package) in self.kp_acked.keys() {
            if !self.handed.contains_key(&(*target, package.clone())) {
                *lost.entry(*target).or_default() += 1;
            }
        }
        for (target, n) in lost {
            let unknown = self.pops_unknown.get(&target).copied().unwrap_or(0);
            if n > unknown {
                self.flag(
                    Invariant::KeyPackageLost,
                    None,
                    format!(
                        "{n} acknowledged KeyPackages of one pool were never handed out, with {unknown} pops of an unknown outcome to take them"
                    ),
                );
            }
        }
    }
}

/// The first 4 bytes of an id, in hex.
fn brief(bytes: &[u8]) -> String {
    quicproquo_core::types::hex(&bytes[..bytes.len().min(4)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicproquo_core::types::{ChannelId, MessageId};

    fn who(n: u8) -> IdentityKey {
        IdentityKey([n; 32])
    }

    fn queue(n: u8) -> QueueId {
        QueueId {
            recipient_key: who(n),
            channel_id: ChannelId::DEFAULT,
        }
    }

    fn key(sender: u8, n: u8) -> MessageKey {
        MessageKey {
            sender: who(sender),
            id: MessageId([n; 16]),
        }
    }

    /// A history written a call at a time.
    #[derive(Default)]
    struct H(Vec<Event>);

    impl H {
        fn send(mut self, n: u8, seq: Option<u64>) -> Self {
            let (queue, key) = (queue(2), key(1, n));
            self.0.push(Event::EnqueueSent {
                queue,
                key,
                payload: vec![n],
            });
            if let Some(seq) = seq {
                self.0.push(Event::EnqueueAcked {
                    task: 0,
                    queue,
                    key,
                    seq,
                });
            }
            self
        }

        fn fetch(mut self, cursor: u64, shown: &[(u64, u8)], next_seq: u64) -> Self {
            let fetch = self.0.len() as u64;
            self.0.push(Event::FetchSent {
                fetch,
                queue: queue(2),
                cursor,
            });
            self.0.push(Event::Fetched {
                fetch,
                queue: queue(2),
                cursor,
                limit: 100,
                messages: shown
                    .iter()
                    .map(|(seq, n)| QueuedMessage {
                        seq: *seq,
                        payload: vec![*n],
                    })
                    .collect(),
                next_seq,
                gap: None,
                audit: true,
            });
            self
        }

        fn upload(mut self, package: &[u8], last_resort: bool, acked: bool) -> Self {
            self.0.push(Event::KpUploadSent {
                owner: who(5),
                package: package.to_vec(),
                last_resort,
            });
            if acked {
                self.0.push(Event::KpUploaded {
                    owner: who(5),
                    package: package.to_vec(),
                    last_resort,
                });
            }
            self
        }

        fn pop(mut self, got: Option<(&[u8], bool)>) -> Self {
            let pop = self.0.len() as u64;
            let target = who(5);
            self.0.push(Event::PopSent { pop });
            self.0.push(match got {
                Some((package, last_resort)) => Event::Popped {
                    pop,
                    target,
                    package: package.to_vec(),
                    last_resort,
                },
                None => Event::PopUnknown { target },
            });
            self
        }

        fn audit_pool(mut self, popped: &[&[u8]], then_last_resort: Option<bool>) -> Self {
            for p in popped {
                self = self.pop(Some((p, false)));
            }
            self.0.push(Event::KpAudited {
                owner: who(5),
                count: popped.len() as u32,
                has_last_resort: then_last_resort.is_some(),
                popped: popped.iter().map(|p| p.to_vec()).collect(),
                then_last_resort,
            });
            self
        }

        fn found(&self) -> BTreeSet<Invariant> {
            check(&self.0).0.iter().map(|v| v.invariant).collect()
        }
    }

    fn finds(h: H, expected: &[Invariant]) {
        assert_eq!(h.found(), expected.iter().copied().collect());
    }

    #[test]
    fn an_honest_history_with_a_retry_breaks_nothing() {
        // Message 2's first attempt was cut off; its retry got seq 2.
        let h = H::default()
            .send(1, Some(1))
            .send(2, None)
            .send(2, Some(2))
            .fetch(0, &[(1, 1), (2, 2)], 3)
            .fetch(2, &[], 3)
            .upload(b"a", false, true)
            .upload(b"b", false, true)
            .upload(b"r", true, true)
            .pop(Some((b"a", false)))
            .audit_pool(&[b"b"], Some(true));
        finds(h, &[]);
    }

    #[test]
    fn a_retry_stored_twice_is_reported() {
        // The first attempt was stored at seq 1, the retry again at seq 2.
        let h = H::default()
            .send(1, None)
            .send(1, Some(2))
            .fetch(0, &[(1, 1), (2, 1)], 3);
        finds(h, &[Invariant::StoredTwice]);
    }

    #[test]
    fn an_acknowledged_message_missing_at_the_audit_is_reported() {
        let h = H::default()
            .send(1, Some(1))
            .send(2, Some(2))
            .fetch(0, &[(1, 1)], 3);
        finds(h, &[Invariant::AckedLost, Invariant::SeqGap]);
    }

    #[test]
    fn a_seq_issued_again_after_a_restart_is_reported() {
        let h = H::default()
            .send(1, Some(1))
            .send(2, Some(1))
            .fetch(0, &[(1, 2)], 2);
        let found = h.found();
        assert!(found.contains(&Invariant::SeqReused), "{found:?}");
    }

    #[test]
    fn an_unacknowledged_message_is_reported() {
        let h = H::default().send(1, None).fetch(0, &[], 1);
        finds(h, &[Invariant::Unresolved]);
    }

    #[test]
    fn a_package_handed_out_twice_is_reported() {
        let h = H::default()
            .upload(b"a", false, true)
            .pop(Some((b"a", false)))
            .pop(Some((b"a", false)))
            .audit_pool(&[], None);
        finds(h, &[Invariant::KeyPackageTwice]);
    }

    #[test]
    fn a_lost_package_is_reported_unless_a_pop_may_have_taken_it() {
        let lost = H::default().upload(b"a", false, true).audit_pool(&[], None);
        finds(lost, &[Invariant::KeyPackageLost]);
        let taken = H::default()
            .upload(b"a", false, true)
            .pop(None)
            .audit_pool(&[], None);
        finds(taken, &[]);
    }

    #[test]
    fn a_last_resort_answer_from_a_full_pool_is_reported() {
        let h = H::default()
            .upload(b"a", false, true)
            .upload(b"r", true, true)
            .pop(Some((b"r", true)))
            .pop(Some((b"a", false)))
            .audit_pool(&[], Some(true));
        finds(h, &[Invariant::LastResort]);
    }

    #[test]
    fn a_made_up_package_is_reported() {
        let h = H::default()
            .upload(b"a", false, false)
            .pop(Some((b"x", false)))
            .pop(Some((b"a", true)))
            .audit_pool(&[], None);
        finds(h, &[Invariant::KeyPackageForged]);
    }
}
