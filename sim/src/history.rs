//! The history of one simulated run: every request a simulated client made
//! and what came back, in the order things happened.
//!
//! All hosts of a turmoil simulation run on one thread, so one shared
//! [`Recorder`] sees events in their true execution order; an event's index
//! in [`History::events`] is therefore a real-time order: if a reply was
//! recorded before a request was sent, the request was sent after the reply
//! arrived. The checker ([`crate::checker`]) reasons only from this history
//! and never from the server's internals.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use quicproquo_core::types::{IdentityKey, MessageId, QueueId};
use quicproquo_server::observe::GaugeSnapshot;

/// One thing a simulated client (or the driver) observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An enqueue attempt was sent (`attempt` counts from 1; every attempt
    /// of one message carries the same `message_id` and `payload`).
    EnqueueSent {
        /// Who sent it.
        sender: IdentityKey,
        /// The recipient's queue.
        queue: QueueId,
        /// The sender-chosen id.
        message_id: MessageId,
        /// The payload.
        payload: Vec<u8>,
        /// Which attempt this is.
        attempt: u32,
    },
    /// The server acknowledged an enqueue with `seq`.
    EnqueueAcked {
        /// Who sent it.
        sender: IdentityKey,
        /// The recipient's queue.
        queue: QueueId,
        /// The sender-chosen id.
        message_id: MessageId,
        /// The seq the server reported.
        seq: u64,
    },
    /// An enqueue attempt failed; `transient` failures are retried.
    EnqueueFailed {
        /// Who sent it.
        sender: IdentityKey,
        /// The sender-chosen id.
        message_id: MessageId,
        /// What went wrong.
        error: String,
        /// Whether the sender will retry.
        transient: bool,
    },
    /// The owner of `queue` fetched with cursor `after_seq` and got these
    /// messages (possibly none) and the queue's next seq.
    Fetched {
        /// The queue.
        queue: QueueId,
        /// The cursor sent (acknowledges everything up to it).
        after_seq: u64,
        /// `(seq, payload)` in the order returned.
        messages: Vec<(u64, Vec<u8>)>,
        /// The next seq the server reported.
        next_seq: u64,
    },
    /// The owner's fetch was refused with a non-transient error.
    FetchRefused {
        /// The queue.
        queue: QueueId,
        /// The cursor sent.
        after_seq: u64,
        /// The error.
        error: String,
    },
    /// The final audit of a queue, after the network healed and every
    /// connection closed: a fetch with the recipient's cursor.
    QueueAudited {
        /// The queue.
        queue: QueueId,
        /// The recipient's cursor (the last seq it processed).
        cursor: u64,
        /// Messages still pending after the cursor.
        pending: usize,
        /// The next seq the server reported.
        next_seq: u64,
    },
    /// A KeyPackage upload was sent.
    KeyPackageUploadSent {
        /// The owner.
        owner: IdentityKey,
        /// The package bytes.
        package: Vec<u8>,
        /// Whether it is the last-resort package.
        last_resort: bool,
    },
    /// The server acknowledged a KeyPackage upload.
    KeyPackageUploaded {
        /// The owner.
        owner: IdentityKey,
        /// The package bytes.
        package: Vec<u8>,
        /// Whether it is the last-resort package.
        last_resort: bool,
    },
    /// A KeyPackage fetch (pop) was sent; `pop` pairs it with its result.
    KeyPackagePopSent {
        /// Who asked.
        requester: IdentityKey,
        /// Whose package.
        target: IdentityKey,
        /// Unique id of this pop within the run.
        pop: u64,
    },
    /// A pop returned a package.
    KeyPackagePopped {
        /// Unique id of the pop.
        pop: u64,
        /// Whose package.
        target: IdentityKey,
        /// The package.
        package: Vec<u8>,
        /// Whether the server marked it as the last-resort package.
        last_resort: bool,
    },
    /// A pop came back `notFound`.
    KeyPackageNotFound {
        /// Unique id of the pop.
        pop: u64,
        /// Whose package.
        target: IdentityKey,
    },
    /// The owner's count of its remaining KeyPackages, taken in the final
    /// audit, followed by the audit's pops.
    KeyPackageAudited {
        /// The owner.
        owner: IdentityKey,
        /// Packages the server said remain.
        count: u32,
        /// Whether the server said a last resort exists.
        has_last_resort: bool,
        /// Non-last-resort packages the audit then popped before the first
        /// last-resort (or `notFound`) answer.
        popped: u32,
        /// Whether the pop after those returned the last-resort package.
        then_last_resort: bool,
    },
    /// A request for another identity's queue, and what came back:
    /// `None` if refused, `Some(n)` if it returned `n` messages.
    ForeignRequest {
        /// The identity the connection was authenticated as, if any.
        requester: Option<IdentityKey>,
        /// The queue asked for.
        queue: QueueId,
        /// The cursor sent.
        after_seq: u64,
        /// `None` when refused; the number of messages when answered.
        answered: Option<usize>,
        /// The refusal or error, for the report.
        detail: String,
    },
    /// The server was crashed; `lost_batches` written batches were not yet
    /// synced and are gone.
    ServerCrashed {
        /// Batches discarded by the crash.
        lost_batches: u64,
    },
    /// The server was started again over the same store.
    ServerRestarted,
    /// The owner of `queue` cut the server's answers to it just before
    /// fetching with `after_seq` (the answer will be lost; its host is then
    /// crashed and fetches again from its saved cursor).
    AnswerDropped {
        /// The queue.
        queue: QueueId,
        /// The cursor of the fetch whose answer is lost.
        after_seq: u64,
    },
    /// A client host was crashed (it restarts later from its saved state).
    ClientCrashed(String),
    /// A network fault was injected or healed (for the report).
    Fault(String),
    /// The server's live counts once every client had gone.
    ServerQuiescent {
        /// The service's counts.
        gauges: GaugeSnapshot,
        /// QUIC connections the endpoint still holds.
        open_connections: usize,
    },
    /// The server kept tracking more connections than QUIC still had open,
    /// for longer than a closed connection takes to be released: it held
    /// state (waiters, replies, per-address slots) for connections that
    /// were gone.
    Retained {
        /// Connections the machine tracked.
        tracked: usize,
        /// QUIC connections the endpoint had open.
        open_connections: usize,
        /// How long this had lasted.
        lasted: Duration,
    },
    /// An MLS client of the run's group (recorded once, at the start).
    MlsMember {
        /// Its identity.
        member: IdentityKey,
        /// Its host.
        name: String,
    },
    /// An MLS client started a `Send` of `text`: from here on the message
    /// is in its persisted state (the machine persists it before anything
    /// else happens) and must reach every other member.
    PlaintextSent {
        /// Who sent it.
        sender: IdentityKey,
        /// The text (unique within the run).
        text: String,
    },
    /// An MLS client's machine showed a message to its user.
    PlaintextShown {
        /// Whose machine showed it.
        member: IdentityKey,
        /// The sender the machine named.
        sender: IdentityKey,
        /// The text.
        text: String,
    },
    /// A message an MLS client showed came over a direct link (it is also
    /// recorded as [`Event::PlaintextShown`]).
    PlaintextDirect {
        /// Whose machine showed it.
        member: IdentityKey,
        /// The text.
        text: String,
    },
    /// An MLS client's direct link to another member came up or went down.
    DirectLink {
        /// Whose link.
        member: IdentityKey,
        /// The other end.
        peer: IdentityKey,
        /// Up or down.
        up: bool,
    },
    /// A command of an MLS client finished (for the report).
    MlsCommandDone {
        /// Whose command.
        member: IdentityKey,
        /// The command, briefly.
        command: String,
        /// Its outcome, briefly.
        outcome: String,
    },
    /// A command of an MLS client did not succeed; `retried` ones failed
    /// for a transient reason (the user runs it again).
    MlsCommandFailed {
        /// Whose command.
        member: IdentityKey,
        /// The command, briefly.
        command: String,
        /// What went wrong.
        error: String,
        /// Whether the user runs it again.
        retried: bool,
    },
    /// A warning an MLS client's machine showed (for the report).
    MlsWarning {
        /// Whose machine.
        member: IdentityKey,
        /// The warning.
        message: String,
    },
    /// An MLS client received until idle after the network healed: nothing
    /// more to show, nothing left to deliver.
    MlsIdle {
        /// Who.
        member: IdentityKey,
        /// Deliveries left in its outbox.
        outbox: usize,
        /// Members of its group, as it sees them (0 without the group).
        group_members: usize,
        /// Its group's epoch (`None` without the group).
        epoch: Option<u64>,
        /// Its group's epoch authenticator (members on one epoch of one
        /// group agree on it, members of forked groups do not), by number:
        /// the run's distinct authenticators are numbered from 0 in the
        /// order first seen. (The bytes differ from replay to replay: MLS
        /// draws fresh randomness for its keys.)
        authenticator: Option<u32>,
    },
    /// An MLS client started an `update` of its group's keys (from here on
    /// the Commit may be in its persisted state).
    MlsUpdateStarted {
        /// Who.
        member: IdentityKey,
    },
    /// An MLS client's `update` finished with `Updated`: the change is in
    /// its persisted state, so its Commit is made, now or later, and
    /// accepted once.
    MlsUpdated {
        /// Who.
        member: IdentityKey,
        /// Epochs its group moved on during the command: more than one
        /// when its Commit lost its epoch to another member's and was made
        /// again after catching up (or a change queued earlier was made
        /// too).
        moved: u64,
    },
    /// A panic happened on the simulation thread (server tasks included).
    Panicked(String),
    /// The run did not finish within its simulated time budget.
    Stuck(String),
}

/// An [`Event`] with its position and simulated time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the history: a real-time order (see the module doc).
    pub index: usize,
    /// Simulated time since the start of the run.
    pub at: Duration,
    /// What happened.
    pub event: Event,
}

/// The events of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Every event, in execution order.
    pub events: Vec<Record>,
}

impl History {
    /// Appends `event` at simulated time `at`.
    pub fn push(&mut self, at: Duration, event: Event) {
        let index = self.events.len();
        self.events.push(Record { index, at, event });
    }

    /// A digest of every event and its time, for comparing two replays of
    /// one seed.
    pub fn digest(&self) -> u64 {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        for r in &self.events {
            r.at.hash(&mut h);
            format!("{:?}", r.event).hash(&mut h);
        }
        h.finish()
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.events {
            writeln!(
                f,
                "{:>6} {:>9.3}s {}",
                r.index,
                r.at.as_secs_f64(),
                brief(&r.event)
            )?;
        }
        Ok(())
    }
}

/// A one-line rendering of an event with keys and payloads shortened.
pub fn brief(e: &Event) -> String {
    fn q(q: &QueueId) -> String {
        format!(
            "{}/{}",
            q.recipient_key.short(),
            hex_short(q.channel_id.as_bytes())
        )
    }
    fn m(id: &MessageId) -> String {
        hex_short(&id.0)
    }
    match e {
        Event::EnqueueSent {
            sender,
            queue,
            message_id,
            attempt,
            ..
        } => format!(
            "enqueue sent {} -> {} id {} attempt {attempt}",
            sender.short(),
            q(queue),
            m(message_id)
        ),
        Event::EnqueueAcked {
            queue,
            message_id,
            seq,
            ..
        } => format!("enqueue acked {} id {} seq {seq}", q(queue), m(message_id)),
        Event::EnqueueFailed {
            message_id,
            error,
            transient,
            ..
        } => format!(
            "enqueue failed id {} ({}): {error}",
            m(message_id),
            if *transient { "retry" } else { "final" }
        ),
        Event::Fetched {
            queue,
            after_seq,
            messages,
            next_seq,
        } => format!(
            "fetched {} after {after_seq}: seqs {:?} next {next_seq}",
            q(queue),
            messages.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        ),
        Event::FetchRefused {
            queue,
            after_seq,
            error,
        } => format!("fetch refused {} after {after_seq}: {error}", q(queue)),
        Event::QueueAudited {
            queue,
            cursor,
            pending,
            next_seq,
        } => format!(
            "audit {} cursor {cursor} pending {pending} next {next_seq}",
            q(queue)
        ),
        Event::KeyPackageUploadSent {
            owner, last_resort, ..
        } => format!("kp upload sent {} last_resort {last_resort}", owner.short()),
        Event::KeyPackageUploaded {
            owner,
            package,
            last_resort,
        } => format!(
            "kp uploaded {} {} last_resort {last_resort}",
            owner.short(),
            hex_short(package)
        ),
        Event::KeyPackagePopSent {
            requester,
            target,
            pop,
        } => format!(
            "kp pop {pop} sent {} -> {}",
            requester.short(),
            target.short()
        ),
        Event::KeyPackagePopped {
            pop,
            package,
            last_resort,
            ..
        } => format!(
            "kp pop {pop} got {} last_resort {last_resort}",
            hex_short(package)
        ),
        Event::KeyPackageNotFound { pop, .. } => format!("kp pop {pop} notFound"),
        Event::KeyPackageAudited {
            owner,
            count,
            has_last_resort,
            popped,
            then_last_resort,
        } => format!(
            "kp audit {} count {count} last_resort {has_last_resort} popped {popped} then_last_resort {then_last_resort}",
            owner.short()
        ),
        Event::ForeignRequest {
            queue,
            after_seq,
            answered,
            detail,
            ..
        } => format!(
            "foreign request {} after {after_seq}: {answered:?} {detail}",
            q(queue)
        ),
        Event::ServerCrashed { lost_batches } => {
            format!("server crashed ({lost_batches} unsynced batches lost)")
        }
        Event::ClientCrashed(host) => format!("client {host} crashed"),
        Event::AnswerDropped { queue, after_seq } => {
            format!(
                "answer to fetch {} after {after_seq} will be lost",
                q(queue)
            )
        }
        Event::ServerRestarted => "server restarted".into(),
        Event::Fault(what) => format!("fault: {what}"),
        Event::ServerQuiescent {
            gauges,
            open_connections,
        } => format!("server quiescent: {gauges:?} open_connections {open_connections}"),
        Event::Retained {
            tracked,
            open_connections,
            lasted,
        } => format!(
            "server tracks {tracked} connections but only {open_connections} are open, for {lasted:?}"
        ),
        Event::MlsMember { member, name } => format!("mls member {} on {name}", member.short()),
        Event::PlaintextSent { sender, text } => format!("mls {} sends {text:?}", sender.short()),
        Event::PlaintextShown {
            member,
            sender,
            text,
        } => format!(
            "mls {} shows {text:?} from {}",
            member.short(),
            sender.short()
        ),
        Event::PlaintextDirect { member, text } => {
            format!("mls {} took {text:?} over a direct link", member.short())
        }
        Event::DirectLink { member, peer, up } => format!(
            "mls {} direct link to {} {}",
            member.short(),
            peer.short(),
            if *up { "up" } else { "down" }
        ),
        Event::MlsCommandDone {
            member,
            command,
            outcome,
        } => format!("mls {} {command}: {outcome}", member.short()),
        Event::MlsCommandFailed {
            member,
            command,
            error,
            retried,
        } => format!(
            "mls {} {command} failed ({}): {error}",
            member.short(),
            if *retried { "retry" } else { "final" }
        ),
        Event::MlsWarning { member, message } => {
            format!("mls {} warning: {message}", member.short())
        }
        Event::MlsIdle {
            member,
            outbox,
            group_members,
            epoch,
            authenticator,
        } => format!(
            "mls {} idle: outbox {outbox}, group of {group_members}, epoch {}, authenticator {}",
            member.short(),
            epoch.map_or("-".to_owned(), |e| e.to_string()),
            authenticator.map_or("-".to_owned(), |a| format!("#{a}"))
        ),
        Event::MlsUpdateStarted { member } => format!("mls {} starts an update", member.short()),
        Event::MlsUpdated { member, moved } => {
            format!("mls {} updated, epoch moved by {moved}", member.short())
        }
        Event::Panicked(what) => format!("PANIC: {what}"),
        Event::Stuck(what) => format!("STUCK: {what}"),
    }
}

fn hex_short(bytes: &[u8]) -> String {
    let h = quicproquo_core::types::hex(bytes);
    if h.is_empty() {
        "-".into()
    } else {
        h.chars().take(8).collect()
    }
}

/// The shared, append-only recorder every simulated host writes to. Cheap to
/// clone; not `Send` (the whole simulation runs on one thread).
#[derive(Debug, Clone, Default)]
pub struct Recorder(Rc<RefCell<History>>);

impl Recorder {
    /// Records `event` at the current simulated time.
    pub fn record(&self, event: Event) {
        let at = turmoil::sim_elapsed().unwrap_or_default();
        self.0.borrow_mut().push(at, event);
    }

    /// Records `event` at simulated time `at` (for the driver, which runs
    /// outside any host).
    pub fn record_at(&self, at: Duration, event: Event) {
        self.0.borrow_mut().push(at, event);
    }

    /// A copy of the history so far.
    pub fn snapshot(&self) -> History {
        self.0.borrow().clone()
    }

    /// Runs `f` over the history so far.
    pub fn with<R>(&self, f: impl FnOnce(&History) -> R) -> R {
        f(&self.0.borrow())
    }
}
