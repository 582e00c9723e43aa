//! Target `client_payloads`: a `ClientMachine` that is a member of a group
//! runs `Receive`, and every fetch it makes is answered from the fuzz input
//! as if by its queue: arbitrary bytes, real MLS messages from the group,
//! real messages with one byte changed or cut short, envelopes around
//! garbage, replays, lying seqs, wrong response kinds and errors.
//!
//! The world is built once per process, as `core-sm/src/client/tests.rs`
//! builds its own: an in-memory NodeService, and users A, B and C. A
//! creates group `g` and adds B, who joins. Then A's outgoing payloads are
//! captured instead of delivered: an application message on `g`, a Commit
//! adding C, a message of the next epoch, a Welcome for B into a new group
//! `h`, and a message on `h`. Every run restores B from the same snapshot,
//! so the input alone decides what happens.
//!
//! Checked: nothing panics; the command finishes (within a bound on
//! effects) with one `Done`; every message shown was really sent by A,
//! and none twice; B joins at most one group (`h`); and the state B
//! persists restores.
//!
//! Target `client_direct` ([`run_direct`]) feeds the same B what members
//! send over direct links instead: from A, from C (not in B's copy of
//! `g`), from B itself or from a stranger, on `g`'s channel or any other,
//! with any `after_seq`, carrying the same payloads; links that come up
//! and go down; and B's own sends, whose direct sends and enqueues the
//! input answers. Checked besides: every direct message is answered once,
//! "taken" only after the state that took it was persisted; a message is
//! shown from a direct link only if A sent it on `g` in B's epoch.

use std::collections::VecDeque;
use std::sync::OnceLock;

use quicproquo_core::client::{ClientMachine, Command, Effect, Event, Outcome};
use quicproquo_core::node::{
    ChannelMessages, NodeConfig, QueuedMessage, Reply, RequestBody, Response,
};
use quicproquo_core::protocol::DirectMessage;
use quicproquo_core::testing::{Hooks, NodeWorld};
use quicproquo_core::types::IdentityKey;
use quicproquo_core::types::{ChannelId, MessageId};
use quicproquo_core::{ErrorKind, ServiceError, Time};

/// Effects one run may produce before it counts as not terminating.
pub const EFFECTS_MAX: usize = 100_000;

/// Texts A sends, in the order of [`Fixture::real`]'s messages.
pub const TEXTS: [&str; 3] = ["hello from a", "after the commit", "in h"];

/// Indexes into [`Fixture::real`].
pub mod real {
    /// Application message on `g` (epoch 1).
    pub const MESSAGE_G: u8 = 0;
    /// Commit on `g` adding C.
    pub const COMMIT_G: u8 = 1;
    /// Application message on `g` after the Commit (epoch 2).
    pub const MESSAGE_G_AFTER_COMMIT: u8 = 2;
    /// Welcome for B into `h`, on B's default channel.
    pub const WELCOME_H: u8 = 3;
    /// Application message on `h`.
    pub const MESSAGE_H: u8 = 4;
}

/// The target's body: runs one `Receive` fed from `data` and returns the
/// events shown.
pub fn run(data: &[u8]) -> Vec<Event> {
    let f = fixture();
    let mut input = Input(data);
    let wait_ms = if input.byte().unwrap_or(0) & 1 == 1 {
        1_000
    } else {
        0
    };
    let mut m = ClientMachine::restore(&f.snapshot, [0x77; 32]).expect("the fixture restores");
    m.handle_command(Time::ZERO, Command::Receive { wait_ms });
    let mut now = Time::ZERO;
    let mut requests = VecDeque::new();
    let mut events = Vec::new();
    let mut done = None;
    let mut finished = false;
    for _ in 0..EFFECTS_MAX {
        match m.poll_effect() {
            Some(Effect::Persist) => {}
            Some(Effect::Connect) => m.handle_connected(now),
            Some(Effect::Request { token, request }) => requests.push_back((token, request)),
            Some(Effect::Event(e)) => events.push(e),
            // No direct links here.
            Some(Effect::DirectSend { token, .. }) => m.handle_direct_answer(now, token, false),
            Some(Effect::DirectAnswer { .. }) => {}
            Some(Effect::Done(outcome)) => {
                assert!(done.is_none(), "two Done effects for one command");
                done = Some(outcome);
            }
            None => {
                let Some((token, request)) = requests.pop_front() else {
                    // A retry of a delivery the input refused: its time.
                    if let Some(at) = m.poll_timeout() {
                        now = now.max(at);
                        m.handle_timeout(now);
                        continue;
                    }
                    finished = true;
                    break;
                };
                let reply = respond(&mut input, &request, f);
                m.handle_response(now, token, reply);
            }
        }
    }
    assert!(
        finished,
        "Receive did not finish within {EFFECTS_MAX} effects"
    );
    let outcome = done.expect("Receive ended without Done");
    check_events(&events, f);
    if let Ok(Outcome::Received { messages }) = outcome {
        let shown = events
            .iter()
            .filter(|e| matches!(e, Event::Message { .. }))
            .count();
        assert_eq!(messages as usize, shown, "Received counts what was shown");
    }
    ClientMachine::restore(&m.snapshot(), [0x78; 32]).expect("persisted state restores");
    events
}

/// The target `client_direct`: B takes (or refuses) what the input sends
/// it over direct links, and sends over its own; returns the events shown.
pub fn run_direct(data: &[u8]) -> Vec<Event> {
    let f = fixture();
    let mut input = Input(data);
    let mut m = ClientMachine::restore(&f.snapshot, [0x79; 32]).expect("the fixture restores");
    let g = m
        .groups()
        .iter()
        .find(|s| s.name == "g")
        .map(|s| s.channel_id)
        .expect("B is in g");
    let stranger = IdentityKey([0x42; 32]);
    let from_byte = |b: u8, m: &ClientMachine| match b % 4 {
        0 => f.sender,
        1 => f.c,
        2 => m.identity_key(),
        _ => stranger,
    };
    let mut events = Vec::new();
    let mut token = 0u64;
    let mut steps = 0;
    while let Some(tag) = input.byte() {
        steps += 1;
        if steps > DIRECT_STEPS_MAX {
            break;
        }
        match tag % 4 {
            0 | 1 => {
                let from = from_byte(input.byte().unwrap_or(0), &m);
                let channel = match input.byte().unwrap_or(0) % 3 {
                    0 | 1 => g,
                    _ => {
                        let len = usize::from(input.byte().unwrap_or(0) % 17);
                        ChannelId::try_from_slice(input.bytes(len)).unwrap_or(ChannelId::DEFAULT)
                    }
                };
                let after_seq = match input.byte().unwrap_or(0) % 3 {
                    0 => 0,
                    1 => u64::from(input.byte().unwrap_or(0)),
                    _ => input.u64(),
                };
                let payload = payload(&mut input, f);
                token += 1;
                m.handle_direct_message(
                    Time::ZERO,
                    token,
                    from,
                    DirectMessage {
                        channel,
                        message_id: MessageId([7; 16]),
                        after_seq,
                        payload,
                    },
                );
                let mut persisted = false;
                let mut answers = 0;
                while let Some(effect) = m.poll_effect() {
                    match effect {
                        Effect::Persist => persisted = true,
                        Effect::DirectAnswer { token: t, taken } => {
                            assert_eq!(t, token, "the answer names its message");
                            assert!(!taken || persisted, "taken before it was persisted");
                            answers += 1;
                        }
                        Effect::Event(e) => {
                            if matches!(e, Event::Message { .. }) {
                                assert!(persisted, "shown before it was persisted");
                                assert_eq!(from, f.sender, "a direct message shown from {from:?}");
                            }
                            events.push(e);
                        }
                        // A direct message makes no request of its own.
                        other => panic!("unexpected effect of a direct message: {other:?}"),
                    }
                }
                assert_eq!(answers, 1, "every direct message is answered once");
            }
            2 => {
                let peer = from_byte(input.byte().unwrap_or(0), &m);
                let up = input.byte().unwrap_or(0) & 1 == 1;
                m.handle_direct_link(Time::ZERO, peer, up);
                drain_sending(&mut m, &mut input, &mut events);
            }
            _ => {
                m.handle_command(
                    Time::ZERO,
                    Command::Send {
                        group: "g".into(),
                        text: "from b".into(),
                    },
                );
                drain_sending(&mut m, &mut input, &mut events);
            }
        }
    }
    let own: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Message { sender, .. } if *sender == m.identity_key()))
        .collect();
    assert!(own.is_empty(), "B was shown its own message: {own:?}");
    check_events(&events, f);
    ClientMachine::restore(&m.snapshot(), [0x7a; 32]).expect("persisted state restores");
    events
}

/// Steps of one `client_direct` run at most.
const DIRECT_STEPS_MAX: usize = 64;

/// Carries out B's effects while it sends: direct sends and enqueues are
/// answered from the input, retries come due at once.
fn drain_sending(m: &mut ClientMachine, input: &mut Input<'_>, events: &mut Vec<Event>) {
    let mut now = Time::ZERO;
    for _ in 0..EFFECTS_MAX {
        match m.poll_effect() {
            Some(Effect::Persist | Effect::Done(_)) => {}
            Some(Effect::Connect) => m.handle_connected(now),
            Some(Effect::Event(e)) => events.push(e),
            Some(Effect::DirectSend { token, .. }) => {
                let taken = input.byte().unwrap_or(0) & 1 == 1;
                m.handle_direct_answer(now, token, taken);
            }
            Some(Effect::DirectAnswer { .. }) => panic!("an answer nobody asked for"),
            Some(Effect::Request { token, request }) => {
                let reply = match (input.byte().unwrap_or(0) % 3, &request) {
                    (0, _) => Err(ServiceError::unavailable("fuzz")),
                    (_, RequestBody::Enqueue { .. }) => Ok(Response::Enqueued {
                        seq: u64::from(input.byte().unwrap_or(1)),
                    }),
                    (_, RequestBody::EnqueueBatch { recipient_keys, .. }) => {
                        Ok(Response::EnqueuedBatch {
                            seqs: recipient_keys.iter().map(|_| 1).collect(),
                        })
                    }
                    _ => Err(ServiceError::unavailable("fuzz: not answered")),
                };
                m.handle_response(now, token, reply);
            }
            None => match m.poll_timeout() {
                // A retry's time: the clock jumps there, at most so far.
                Some(at) if at.as_micros() < 60_000_000 => {
                    now = now.max(at);
                    m.handle_timeout(now);
                }
                _ => return,
            },
        }
    }
    panic!("B's send did not settle within {EFFECTS_MAX} effects");
}

fn check_events(events: &[Event], f: &Fixture) {
    let mut texts = Vec::new();
    let mut joined = 0;
    for e in events {
        match e {
            Event::Message { sender, text, .. } => {
                assert_eq!(
                    *sender, f.sender,
                    "a message from someone who never sent one"
                );
                assert!(
                    TEXTS.contains(&text.as_str()),
                    "a message nobody sent: {text:?}"
                );
                assert!(!texts.contains(text), "{text:?} shown twice");
                texts.push(text.clone());
            }
            Event::Joined { group, .. } => {
                assert_eq!(group, "h", "joined a group nobody invited B to");
                joined += 1;
            }
            _ => {}
        }
    }
    assert!(joined <= 1, "joined {joined} times from one Welcome");
}

/// Answers one of the machine's requests from the input. A wait over
/// several channels is answered for its last channel (the group's, once B
/// is in one), as a fetch of that channel would be.
fn respond(input: &mut Input<'_>, request: &RequestBody, f: &Fixture) -> Reply {
    match request {
        RequestBody::FetchWaitChannels { cursors, .. } => {
            let Some((channel_id, after_seq)) = cursors.last() else {
                return Err(ServiceError::invalid_argument("fuzz: a wait on no channel"));
            };
            respond_fetch(input, *after_seq, f).map(|r| match r {
                Response::Messages {
                    messages,
                    next_seq,
                    gap,
                } => Response::ChannelMessages {
                    channels: if messages.is_empty() && gap.is_none() {
                        Vec::new()
                    } else {
                        vec![ChannelMessages {
                            channel_id: *channel_id,
                            messages,
                            next_seq,
                            gap,
                        }]
                    },
                },
                other => other,
            })
        }
        RequestBody::Fetch { after_seq, .. } | RequestBody::FetchWait { after_seq, .. } => {
            respond_fetch(input, *after_seq, f)
        }
        _ => Err(ServiceError::unavailable("fuzz: only fetches are answered")),
    }
}

/// A fetch's answer after `after_seq`, from the input.
fn respond_fetch(input: &mut Input<'_>, after_seq: u64, f: &Fixture) -> Reply {
    let Some(tag) = input.byte() else {
        return Ok(Response::Messages {
            messages: Vec::new(),
            next_seq: after_seq.saturating_add(1),
            gap: None,
        });
    };
    match tag % 4 {
        1 => Err(ServiceError::new(
            error_kind(input.byte().unwrap_or(0)),
            "fuzz",
        )),
        2 => Ok(Response::Enqueued { seq: 1 }),
        _ => {
            let n = input.byte().unwrap_or(0) % 8;
            let mut seq = after_seq;
            let mut messages = Vec::new();
            for _ in 0..n {
                seq = match input.byte().unwrap_or(0) % 3 {
                    0 => seq.saturating_add(1),
                    1 => seq,
                    _ => input.u64(),
                };
                let payload = payload(input, f);
                messages.push(QueuedMessage { seq, payload });
            }
            Ok(Response::Messages {
                messages,
                next_seq: seq.saturating_add(1),
                gap: None,
            })
        }
    }
}

fn payload(input: &mut Input<'_>, f: &Fixture) -> Vec<u8> {
    let real = |i: u8| f.real[usize::from(i) % f.real.len()].clone();
    match input.byte().unwrap_or(0) % 6 {
        0 => real(input.byte().unwrap_or(0)),
        1 => {
            let mut p = real(input.byte().unwrap_or(0));
            let pos = usize::from(input.u16());
            let xor = input.byte().unwrap_or(1).max(1);
            if !p.is_empty() {
                let i = pos % p.len();
                p[i] ^= xor;
            }
            p
        }
        2 => {
            let len = usize::from(input.u16());
            input.bytes(len).to_vec()
        }
        3 => {
            let len = usize::from(input.u16());
            [&[1u8, 2][..], input.bytes(len)].concat()
        }
        4 => {
            let len = usize::from(input.u16());
            [&[1u8, 1][..], input.bytes(len)].concat()
        }
        _ => {
            let p = real(input.byte().unwrap_or(0));
            let cut = usize::from(input.u16()) % (p.len() + 1);
            p[..cut].to_vec()
        }
    }
}

fn error_kind(b: u8) -> ErrorKind {
    match b % 10 {
        0 => ErrorKind::InvalidArgument,
        1 => ErrorKind::Unauthenticated,
        2 => ErrorKind::PermissionDenied,
        3 => ErrorKind::NotFound,
        4 => ErrorKind::PayloadTooLarge,
        5 => ErrorKind::RateLimited {
            retry_after_ms: 100,
        },
        6 => ErrorKind::QueueFull,
        7 => ErrorKind::StaleEpoch { current_epoch: 1 },
        8 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// The fuzz input, consumed front to back; reads past the end give zeros
/// (or nothing, for [`Input::byte`]).
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte().unwrap_or(0), self.byte().unwrap_or(0)])
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte().unwrap_or(0);
        }
        u64::from_be_bytes(b)
    }

    fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        taken
    }
}

// ----- seeds -----------------------------------------------------------------

/// How a seed message's seq is chosen.
#[derive(Debug, Clone, Copy)]
pub enum SeedSeq {
    /// One after the previous (the cursor for the first).
    Next,
    /// The same as the previous (a redelivery).
    Same,
    /// This value.
    Raw(u64),
}

/// A seed message's payload.
#[derive(Debug, Clone)]
pub enum SeedPayload {
    /// A real payload (see [`real`]).
    Real(u8),
    /// A real payload with the byte at `pos` (modulo its length) xored.
    Mutated {
        /// Which real payload.
        index: u8,
        /// Where.
        pos: u16,
        /// With what (non-zero).
        xor: u8,
    },
    /// These bytes.
    Raw(Vec<u8>),
    /// A group envelope around these bytes.
    GroupEnvelope(Vec<u8>),
    /// A Welcome envelope header followed by these bytes.
    WelcomeEnvelope(Vec<u8>),
    /// A real payload cut to `len` bytes (modulo its length + 1).
    Truncated {
        /// Which real payload.
        index: u8,
        /// How long.
        len: u16,
    },
}

/// The answer to one fetch in a seed.
#[derive(Debug, Clone)]
pub enum SeedResponse {
    /// These messages.
    Messages(Vec<(SeedSeq, SeedPayload)>),
    /// No messages.
    Empty,
    /// An error of kind `n` (see `error_kind`).
    Error(u8),
    /// A response of the wrong kind.
    WrongKind,
}

/// Encodes a run: whether `Receive` waits, then the answers to the
/// machine's fetches in the order it makes them.
pub fn encode(wait: bool, responses: &[SeedResponse]) -> Vec<u8> {
    let mut out = vec![u8::from(wait)];
    for r in responses {
        match r {
            SeedResponse::Empty => out.extend([3, 0]),
            SeedResponse::Error(k) => out.extend([1, *k]),
            SeedResponse::WrongKind => out.push(2),
            SeedResponse::Messages(ms) => {
                out.push(0);
                out.push(u8::try_from(ms.len()).unwrap_or(7).min(7));
                for (seq, p) in ms.iter().take(7) {
                    match seq {
                        SeedSeq::Next => out.push(0),
                        SeedSeq::Same => out.push(1),
                        SeedSeq::Raw(v) => {
                            out.push(2);
                            out.extend(v.to_be_bytes());
                        }
                    }
                    encode_payload(&mut out, p);
                }
            }
        }
    }
    out
}

fn encode_payload(out: &mut Vec<u8>, p: &SeedPayload) {
    let len16 = |b: &[u8]| u16::try_from(b.len()).unwrap_or(u16::MAX).to_be_bytes();
    match p {
        SeedPayload::Real(i) => out.extend([0, *i]),
        SeedPayload::Mutated { index, pos, xor } => {
            out.extend([1, *index]);
            out.extend(pos.to_be_bytes());
            out.push(*xor);
        }
        SeedPayload::Raw(b) => {
            out.push(2);
            out.extend(len16(b));
            out.extend(b);
        }
        SeedPayload::GroupEnvelope(b) => {
            out.push(3);
            out.extend(len16(b));
            out.extend(b);
        }
        SeedPayload::WelcomeEnvelope(b) => {
            out.push(4);
            out.extend(len16(b));
            out.extend(b);
        }
        SeedPayload::Truncated { index, len } => {
            out.extend([5, *index]);
            out.extend(len.to_be_bytes());
        }
    }
}

/// Seeds, each with the texts it must show (in order) and whether B joins
/// `h`; the corpus replay checks both.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, Vec<&'static str>, bool)> {
    use SeedPayload as P;
    use SeedResponse as R;
    use SeedSeq as S;
    // B's fetches start with its default channel, then `g`; a batch with
    // messages is followed by a fetch of the same channel (which
    // acknowledges it) and fetches of any channel just joined.
    vec![
        (
            "message",
            encode(
                false,
                &[
                    R::Empty,
                    R::Messages(vec![(S::Next, P::Real(real::MESSAGE_G))]),
                    R::Empty,
                ],
            ),
            vec![TEXTS[0]],
            false,
        ),
        (
            "commit_then_message",
            encode(
                false,
                &[
                    R::Empty,
                    R::Messages(vec![
                        (S::Next, P::Real(real::COMMIT_G)),
                        (S::Next, P::Real(real::MESSAGE_G_AFTER_COMMIT)),
                    ]),
                    R::Empty,
                ],
            ),
            vec![TEXTS[1]],
            false,
        ),
        (
            "welcome_then_message",
            encode(
                false,
                &[
                    R::Messages(vec![(S::Next, P::Real(real::WELCOME_H))]),
                    R::Empty,
                    R::Empty,
                    R::Messages(vec![(S::Next, P::Real(real::MESSAGE_H))]),
                    R::Empty,
                ],
            ),
            vec![TEXTS[2]],
            true,
        ),
        (
            "replays_and_tampering",
            encode(
                false,
                &[
                    R::Empty,
                    R::Messages(vec![
                        (S::Next, P::Real(real::MESSAGE_G)),
                        (S::Same, P::Real(real::MESSAGE_G)),
                        (S::Next, P::Real(real::MESSAGE_G)),
                        (
                            S::Next,
                            P::Mutated {
                                index: real::MESSAGE_G_AFTER_COMMIT,
                                pos: 60,
                                xor: 1,
                            },
                        ),
                        (
                            S::Next,
                            P::Truncated {
                                index: real::COMMIT_G,
                                len: 100,
                            },
                        ),
                        (S::Raw(u64::MAX), P::Real(real::MESSAGE_G)),
                    ]),
                    R::Empty,
                ],
            ),
            vec![TEXTS[0]],
            false,
        ),
        (
            "garbage",
            encode(
                false,
                &[
                    R::Messages(vec![
                        (S::Next, P::Raw(b"not an envelope".to_vec())),
                        (S::Next, P::GroupEnvelope(b"not MLS".to_vec())),
                        (S::Next, P::WelcomeEnvelope(vec![16; 40])),
                        (
                            S::Next,
                            P::Mutated {
                                index: real::WELCOME_H,
                                pos: 300,
                                xor: 0x80,
                            },
                        ),
                    ]),
                    R::Error(5),
                    R::WrongKind,
                ],
            ),
            vec![],
            false,
        ),
        (
            "wait_then_message",
            encode(
                true,
                &[
                    R::Empty,
                    R::Empty,
                    R::Messages(vec![(S::Next, P::Real(real::MESSAGE_G))]),
                    R::Empty,
                ],
            ),
            vec![TEXTS[0]],
            false,
        ),
    ]
}

// ----- seeds of client_direct ------------------------------------------------

/// Who sends a direct message in a seed (or whose link changes).
#[derive(Debug, Clone, Copy)]
pub enum SeedFrom {
    /// A, the real sender.
    A = 0,
    /// C, not in B's copy of `g`.
    C = 1,
    /// B itself.
    B = 2,
    /// Nobody B knows.
    Stranger = 3,
}

/// One step of a `client_direct` seed.
#[derive(Debug, Clone)]
pub enum DirectStep {
    /// A direct message on `g`'s channel, or on these channel bytes.
    Message {
        /// Its sender.
        from: SeedFrom,
        /// `None`: `g`'s channel.
        channel: Option<Vec<u8>>,
        /// Its `after_seq`.
        after_seq: u64,
        /// Its payload.
        payload: SeedPayload,
    },
    /// A link to `peer` goes up or down; B's sends then are answered with
    /// `answers` (one byte each, as [`DirectStep::Send`]).
    Link {
        /// The peer.
        peer: SeedFrom,
        /// Up or down.
        up: bool,
        /// Answers to what it sends meanwhile.
        answers: Vec<u8>,
    },
    /// B sends "from b" to `g`; each byte answers one direct send (odd:
    /// taken) or request (0 mod 3: unavailable, else stored) in turn.
    Send(Vec<u8>),
}

/// Encodes a `client_direct` run.
pub fn encode_direct(steps: &[DirectStep]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in steps {
        match s {
            DirectStep::Message {
                from,
                channel,
                after_seq,
                payload,
            } => {
                out.extend([0, *from as u8]);
                match channel {
                    None => out.push(0),
                    Some(bytes) => {
                        out.extend([2, u8::try_from(bytes.len()).unwrap_or(16)]);
                        out.extend(bytes);
                    }
                }
                out.push(2);
                out.extend(after_seq.to_be_bytes());
                encode_payload(&mut out, payload);
            }
            DirectStep::Link { peer, up, answers } => {
                out.extend([2, *peer as u8, u8::from(*up)]);
                out.extend(answers);
            }
            DirectStep::Send(answers) => {
                out.push(3);
                out.extend(answers);
            }
        }
    }
    out
}

/// Seeds of `client_direct`, each with the texts it must show.
pub fn direct_seeds() -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    use DirectStep as D;
    use SeedPayload as P;
    let message = |from, after_seq, payload| D::Message {
        from,
        channel: None,
        after_seq,
        payload,
    };
    vec![
        (
            "direct_message",
            encode_direct(&[message(SeedFrom::A, 0, P::Real(real::MESSAGE_G))]),
            vec![TEXTS[0]],
        ),
        (
            "direct_twice",
            encode_direct(&[
                message(SeedFrom::A, 0, P::Real(real::MESSAGE_G)),
                message(SeedFrom::A, 0, P::Real(real::MESSAGE_G)),
            ]),
            vec![TEXTS[0]],
        ),
        (
            "direct_refused",
            encode_direct(&[
                message(SeedFrom::Stranger, 0, P::Real(real::MESSAGE_G)),
                message(SeedFrom::C, 0, P::Real(real::MESSAGE_G)),
                message(SeedFrom::A, 0, P::Real(real::COMMIT_G)),
                message(SeedFrom::A, 0, P::Real(real::MESSAGE_G_AFTER_COMMIT)),
                message(SeedFrom::A, 0, P::Real(real::WELCOME_H)),
                message(SeedFrom::A, u64::MAX, P::Real(real::MESSAGE_G)),
                D::Message {
                    from: SeedFrom::A,
                    channel: Some(vec![9; 16]),
                    after_seq: 0,
                    payload: P::Real(real::MESSAGE_H),
                },
                // Only now the real one, in order.
                message(SeedFrom::A, 0, P::Real(real::MESSAGE_G)),
            ]),
            vec![TEXTS[0]],
        ),
        (
            "direct_send",
            encode_direct(&[
                D::Link {
                    peer: SeedFrom::A,
                    up: true,
                    answers: vec![],
                },
                D::Send(vec![1]),
                D::Send(vec![0, 1, 1]),
                D::Link {
                    peer: SeedFrom::A,
                    up: false,
                    answers: vec![],
                },
                D::Send(vec![1, 5]),
            ]),
            vec![],
        ),
        (
            "direct_garbage",
            encode_direct(&[
                D::Message {
                    from: SeedFrom::A,
                    channel: Some(b"chan5".to_vec()),
                    after_seq: 1,
                    payload: P::Raw(b"not an envelope".to_vec()),
                },
                message(SeedFrom::B, 0, P::GroupEnvelope(b"not MLS".to_vec())),
                message(
                    SeedFrom::A,
                    0,
                    P::Mutated {
                        index: real::MESSAGE_G,
                        pos: 60,
                        xor: 1,
                    },
                ),
                message(
                    SeedFrom::A,
                    0,
                    P::Truncated {
                        index: real::MESSAGE_G,
                        len: 50,
                    },
                ),
            ]),
            vec![],
        ),
    ]
}

// ----- the world -------------------------------------------------------------

/// B's state in group `g` and what A sent afterwards.
pub struct Fixture {
    /// B's snapshot, taken before any of [`Fixture::real`] was delivered.
    pub snapshot: Vec<u8>,
    /// A's identity, the only sender of real messages.
    pub sender: IdentityKey,
    /// C's identity (a member of `g` only after A's Commit, which B has
    /// not processed).
    pub c: IdentityKey,
    /// A's captured payloads for B (see [`real`]).
    pub real: Vec<Vec<u8>>,
}

/// The world, built on first use.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

struct World {
    node: NodeWorld,
    /// Enqueues captured instead of delivered: (recipient, payload).
    captured: Option<Vec<(IdentityKey, Vec<u8>)>>,
}

fn build_fixture() -> Fixture {
    let mut w = World {
        node: NodeWorld::new(NodeConfig::default()),
        captured: None,
    };
    let mut users: Vec<ClientMachine> = (0..3u8)
        .map(|i| ClientMachine::generate([i + 10; 32]))
        .collect();
    for (i, m) in users.iter().enumerate() {
        w.node.login(i as u64, m.signing_key());
    }
    let [a, b, c] = &mut users[..] else {
        unreachable!("three users")
    };
    let (b_key, c_key) = (b.identity_key(), c.identity_key());
    w.run_ok(a, 0, Command::Register { count: 1 });
    w.run_ok(b, 1, Command::Register { count: 3 });
    w.run_ok(c, 2, Command::Register { count: 1 });
    w.run_ok(
        a,
        0,
        Command::CreateGroup {
            name: "g".into(),
            pq: false,
        },
    );
    w.run_ok(
        a,
        0,
        Command::AddMember {
            group: "g".into(),
            member: b_key,
        },
    );
    let events = w.run_ok(b, 1, Command::Receive { wait_ms: 0 });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { group, .. } if group == "g")),
        "B joins g: {events:?}"
    );
    let snapshot = b.snapshot();

    // From here on A's payloads are captured, never delivered.
    w.captured = Some(Vec::new());
    let for_b = |w: &mut World, a: &mut ClientMachine, command: Command| {
        w.run_ok(a, 0, command);
        let captured = w.captured.replace(Vec::new()).unwrap_or_default();
        let mine: Vec<Vec<u8>> = captured
            .into_iter()
            .filter(|(to, _)| *to == b_key)
            .map(|(_, p)| p)
            .collect();
        assert_eq!(mine.len(), 1, "one payload for B");
        mine.into_iter().next().unwrap_or_default()
    };
    let send = |group: &str, text: &str| Command::Send {
        group: group.into(),
        text: text.into(),
    };
    let real = vec![
        for_b(&mut w, a, send("g", TEXTS[0])),
        for_b(
            &mut w,
            a,
            Command::AddMember {
                group: "g".into(),
                member: c_key,
            },
        ),
        for_b(&mut w, a, send("g", TEXTS[1])),
        {
            w.run_ok(
                a,
                0,
                Command::CreateGroup {
                    name: "h".into(),
                    pq: false,
                },
            );
            for_b(
                &mut w,
                a,
                Command::AddMember {
                    group: "h".into(),
                    member: b_key,
                },
            )
        },
        for_b(&mut w, a, send("h", TEXTS[2])),
    ];
    Fixture {
        snapshot,
        sender: a.identity_key(),
        c: c_key,
        real,
    }
}

impl World {
    /// Runs `command` to completion; it must succeed without a warning.
    /// While `captured` is set, enqueues are answered and kept there
    /// instead of reaching the server.
    fn run_ok(&mut self, m: &mut ClientMachine, conn: u64, command: Command) -> Vec<Event> {
        let what = format!("{command:?}");
        let captured = &mut self.captured;
        let mut capture = |request: &RequestBody| {
            let captured = captured.as_mut()?;
            match request {
                RequestBody::Enqueue {
                    recipient_key,
                    payload,
                    ..
                } => {
                    captured.push((*recipient_key, payload.clone()));
                    Some(Ok(Response::Enqueued {
                        seq: captured.len() as u64,
                    }))
                }
                RequestBody::EnqueueBatch {
                    recipient_keys,
                    payload,
                    ..
                } => {
                    let seqs = recipient_keys
                        .iter()
                        .map(|r| {
                            captured.push((*r, payload.clone()));
                            captured.len() as u64
                        })
                        .collect();
                    Some(Ok(Response::EnqueuedBatch { seqs }))
                }
                _ => None,
            }
        };
        let mut hooks = Hooks {
            intercept: Some(&mut capture),
            tamper: None,
        };
        self.node
            .run_command(m, conn, command, &mut hooks)
            .ok(&what)
    }
}
