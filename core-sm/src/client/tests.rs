//! Client machine tests against the real NodeService machine in memory: no
//! network, no threads. Every command runs on a machine restored from the
//! last persisted snapshot, as the CLI does (one process per command), so
//! persistence is exercised all the time.

use super::*;
use crate::limits::DEFAULT_POOL;
use crate::node::{NodeConfig, Reply};
use crate::testing::{Hooks, Intercept, NodeWorld, Tamper};
use crate::time::Time;
use crate::types::ConnectionId;

struct User {
    saved: Vec<u8>,
    conn: ConnectionId,
}

struct World {
    node: NodeWorld,
    users: Vec<User>,
    /// Every run gets a distinct seed, as OS entropy would give.
    runs: u64,
    /// The `pq` groups users create are sealed ones, as versions before the
    /// post-quantum suite made them.
    sealed_pq: bool,
}

impl World {
    fn new(n: usize) -> World {
        let mut w = World {
            node: NodeWorld::new(NodeConfig::default()),
            users: Vec::new(),
            runs: 0,
            sealed_pq: false,
        };
        for i in 0..n {
            let machine = ClientMachine::generate([i as u8 + 10; 32]);
            w.node.login(i as u64, machine.signing_key());
            w.users.push(User {
                saved: machine.snapshot(),
                conn: ConnectionId(i as u64),
            });
        }
        w
    }

    fn machine(&mut self, who: usize) -> ClientMachine {
        let mut m = self.offline_machine(who);
        // Connected from the start, as a shell that connects up front.
        m.handle_connected(Time::ZERO);
        assert_eq!(m.poll_effect(), Some(Effect::Event(Event::Connected)));
        m
    }

    /// A machine restored from `who`'s state with no connection yet.
    fn offline_machine(&mut self, who: usize) -> ClientMachine {
        self.runs += 1;
        let mut seed = [0xa5; 32];
        seed[..8].copy_from_slice(&self.runs.to_le_bytes());
        let mut m = ClientMachine::restore(&self.users[who].saved, seed).unwrap();
        m.create_sealed_pq_groups(self.sealed_pq);
        m
    }

    fn key(&mut self, who: usize) -> IdentityKey {
        self.machine(who).identity_key()
    }

    fn call(&mut self, conn: ConnectionId, body: RequestBody) -> Reply {
        self.node.call(conn.0, body)
    }

    /// Runs one command to completion on a freshly restored machine.
    fn run(&mut self, who: usize, command: Command) -> (Vec<Event>, Result<Outcome, CommandError>) {
        self.run_with(who, command, &mut |_, _| {})
    }

    fn run_with(
        &mut self,
        who: usize,
        command: Command,
        tamper: Tamper<'_>,
    ) -> (Vec<Event>, Result<Outcome, CommandError>) {
        self.run_full(who, command, &mut |_| None, tamper)
    }

    fn run_full(
        &mut self,
        who: usize,
        command: Command,
        intercept: Intercept<'_>,
        tamper: Tamper<'_>,
    ) -> (Vec<Event>, Result<Outcome, CommandError>) {
        let mut m = self.machine(who);
        let conn = self.users[who].conn.0;
        let mut hooks = Hooks {
            intercept: Some(intercept),
            tamper: Some(tamper),
        };
        let ran = self.node.run_command(&mut m, conn, command, &mut hooks);
        if let Some(saved) = ran.snapshot {
            self.users[who].saved = saved;
        }
        (ran.events, ran.outcome)
    }

    fn texts(&mut self, who: usize) -> Vec<(String, String)> {
        let (events, outcome) = self.run(who, Command::Receive { wait_ms: 0 });
        outcome.unwrap();
        messages(&events)
    }
}

fn messages(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { group, text, .. } => Some((group.clone(), text.clone())),
            Event::Warning { message } => panic!("warning: {message}"),
            _ => None,
        })
        .collect()
}

/// The messages shown, whatever the warnings.
fn messages_lenient(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { group, text, .. } => Some((group.clone(), text.clone())),
            _ => None,
        })
        .collect()
}

/// Registers `who`: 3 KeyPackages and a last resort in each suite's pool.
fn register(w: &mut World, who: usize) {
    let (_, outcome) = w.run(who, Command::Register { count: 3 });
    assert_eq!(
        outcome,
        Ok(Outcome::Registered {
            uploaded: 8,
            already: 0,
            failed: 0
        })
    );
}

fn add(w: &mut World, who: usize, group: &str, member: usize) {
    let (by, member) = (w.key(who), w.key(member));
    let (events, outcome) = w.run(
        who,
        Command::AddMember {
            group: group.into(),
            member,
        },
    );
    // The Commit was taken by the server and merged: shown as made by `who`.
    let added = Event::MemberAdded {
        group: group.into(),
        member,
        by,
    };
    assert_eq!(events, [added]);
    assert!(
        matches!(outcome, Ok(Outcome::MemberAdded { undelivered: 0, .. })),
        "{outcome:?}"
    );
}

fn send(w: &mut World, who: usize, group: &str, text: &str) {
    let (_, outcome) = w.run(
        who,
        Command::Send {
            group: group.into(),
            text: text.into(),
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { undelivered: 0, .. })),
        "{outcome:?}"
    );
}

fn pair(g: &str, t: &str) -> (String, String) {
    (g.to_owned(), t.to_owned())
}

/// Alice creates "team", adds Bob and Carol.
fn team() -> World {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    let (_, r) = w.run(
        0,
        Command::CreateGroup {
            name: "team".into(),
            pq: false,
        },
    );
    assert_eq!(
        r,
        Ok(Outcome::GroupCreated {
            group: "team".into()
        })
    );
    add(&mut w, 0, "team", 1);
    add(&mut w, 0, "team", 2);
    w
}

#[test]
fn life_cycle_phases() {
    let mut w = World::new(2);
    assert_eq!(w.machine(0).phase(), Phase::IdentityGenerated);
    register(&mut w, 0);
    register(&mut w, 1);
    assert_eq!(w.machine(0).phase(), Phase::Registered);
    w.run(
        0,
        Command::CreateGroup {
            name: "g".into(),
            pq: false,
        },
    )
    .1
    .unwrap();
    assert_eq!(w.machine(0).phase(), Phase::GroupOwner);
    add(&mut w, 0, "g", 1);
    w.texts(1);
    assert_eq!(w.machine(1).phase(), Phase::GroupMember);
    send(&mut w, 1, "g", "hi");
    assert_eq!(w.machine(1).phase(), Phase::Active);
}

#[test]
fn three_members_see_every_message_once_and_in_order() {
    let mut w = team();
    // Bob and Carol join from their Welcomes and know the group's name.
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { group, .. } if group == "team"))
    );
    let (events, _) = w.run(2, Command::Receive { wait_ms: 0 });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { group, members: 3 } if group == "team"))
    );
    // Bob also processes the Commit that added Carol.
    assert!(w.texts(1).is_empty());

    send(&mut w, 0, "team", "a1");
    send(&mut w, 1, "team", "b1");
    send(&mut w, 0, "team", "a2");
    send(&mut w, 2, "team", "c1");
    send(&mut w, 1, "team", "b2");
    assert_eq!(
        w.texts(0),
        vec![pair("team", "b1"), pair("team", "c1"), pair("team", "b2")]
    );
    assert_eq!(
        w.texts(1),
        vec![pair("team", "a1"), pair("team", "a2"), pair("team", "c1")]
    );
    assert_eq!(
        w.texts(2),
        vec![
            pair("team", "a1"),
            pair("team", "b1"),
            pair("team", "a2"),
            pair("team", "b2")
        ]
    );
    // Nothing is shown twice.
    for u in 0..3 {
        assert!(w.texts(u).is_empty());
    }
    // Everyone is in the same epoch with the same group state.
    let auth: Vec<_> = (0..3)
        .map(|u| w.machine(u).epoch_authenticator("team"))
        .collect();
    assert!(auth[0].is_some());
    assert_eq!(auth[0], auth[1]);
    assert_eq!(auth[1], auth[2]);
    let summary = &w.machine(2).groups()[0];
    assert_eq!(summary.members.len(), 3);
}

#[test]
fn duplicate_delivery_after_lost_acknowledgement_is_shown_once() {
    let mut w = team();
    w.texts(1);
    send(&mut w, 0, "team", "once");
    // Bob's first fetch answer is delivered, then the server (as after a
    // lost acknowledgement) delivers the same seqs again.
    let mut first: Option<Reply> = None;
    let (events, _) = w.run_with(1, Command::Receive { wait_ms: 0 }, &mut |req, reply| {
        if let RequestBody::Fetch { .. } = req {
            match &first {
                None => first = Some(reply.clone()),
                Some(f) if matches!(reply, Ok(Response::Messages { messages, .. }) if messages.is_empty()) => {
                    // Replay the first batch once instead of the empty answer.
                    *reply = f.clone();
                    first = Some(Ok(Response::Messages {
                        messages: Vec::new(),
                        next_seq: 0,
                        gap: None,
                    }));
                }
                Some(_) => {}
            }
        }
    });
    assert_eq!(messages(&events), vec![pair("team", "once")]);
}

#[test]
fn crash_after_decrypting_before_acknowledging_loses_nothing() {
    let mut w = team();
    w.texts(1);
    send(&mut w, 0, "team", "survives");
    // Bob fetches and decrypts, then crashes before his state is written and
    // before the acknowledging fetch goes out.
    let mut m = w.machine(1);
    let conn = w.users[1].conn;
    m.handle_command(Time::ZERO, Command::Receive { wait_ms: 0 });
    let mut fetched = Vec::new();
    let mut shown = Vec::new();
    while let Some(effect) = m.poll_effect() {
        match effect {
            Effect::Persist => {} // lost in the crash
            Effect::Connect => m.handle_connected(Time::ZERO),
            Effect::Request { token, request } => {
                if let RequestBody::Fetch { channel_id, .. } = &request {
                    if fetched.contains(channel_id) {
                        break; // the acknowledging fetch never leaves
                    }
                    fetched.push(*channel_id);
                }
                let reply = w.call(conn, request);
                m.handle_response(Time::ZERO, token, reply);
            }
            Effect::Event(e) => shown.push(e),
            Effect::DirectSend { .. } | Effect::DirectAnswer { .. } => {
                unreachable!("no direct links")
            }
            Effect::Done(_) => break,
        }
    }
    assert_eq!(messages(&shown), vec![pair("team", "survives")]);
    drop(m);
    // After the restart the message is still there, shown exactly once.
    assert_eq!(w.texts(1), vec![pair("team", "survives")]);
    assert!(w.texts(1).is_empty());
}

/// Acknowledging only after persisting, checked at every point: Bob's
/// queues hold a Welcome, a message, a Commit adding Carol and another
/// message; his `receive` is cut short right after its k-th fetch reached
/// the server (the fetch's answer and every later effect are lost, as in a
/// crash), for every k. Restarted from what he last persisted, Bob has lost
/// nothing: every message was shown before the crash or is shown after the
/// restart, and he is in the group at its current epoch (a new message
/// decrypts). A machine that sends a cursor past what it persisted fails
/// here deterministically: the server has deleted a Welcome or a Commit
/// the restarted machine never processed, so it is not in the group or not
/// at its epoch; one that shows a message only after acknowledging it
/// loses that message.
#[test]
fn a_crash_right_after_any_fetch_reaches_the_server_loses_nothing() {
    for k in 1.. {
        let mut w = World::new(3);
        for u in 0..3 {
            register(&mut w, u);
        }
        let create = Command::CreateGroup {
            name: "team".into(),
            pq: false,
        };
        assert!(w.run(0, create).1.is_ok());
        add(&mut w, 0, "team", 1);
        send(&mut w, 0, "team", "one");
        add(&mut w, 0, "team", 2);
        send(&mut w, 0, "team", "two");
        let mut m = w.machine(1);
        let conn = w.users[1].conn;
        m.handle_command(Time::ZERO, Command::Receive { wait_ms: 0 });
        let (mut fetches, mut cut) = (0, false);
        let mut shown = Vec::new();
        while let Some(effect) = m.poll_effect() {
            match effect {
                Effect::Persist => w.users[1].saved = m.snapshot(),
                Effect::Connect => m.handle_connected(Time::ZERO),
                Effect::Request { token, request } => {
                    let fetch = matches!(
                        request,
                        RequestBody::Fetch { .. }
                            | RequestBody::FetchWait { .. }
                            | RequestBody::FetchWaitChannels { .. }
                    );
                    let reply = w.call(conn, request);
                    if fetch {
                        fetches += 1;
                        if fetches == k {
                            cut = true;
                            break;
                        }
                    }
                    m.handle_response(Time::ZERO, token, reply);
                }
                Effect::Event(Event::Message { text, .. }) => shown.push(text),
                Effect::Event(_) => {}
                Effect::DirectSend { .. } | Effect::DirectAnswer { .. } => {
                    unreachable!("no direct links")
                }
                Effect::Done(outcome) => {
                    outcome.expect("received");
                    break;
                }
            }
        }
        drop(m);
        if !cut {
            // The receive made fewer than k fetches: every point was tried.
            assert!(k > 3, "only {} crash points", k - 1);
            break;
        }
        let after: Vec<String> = w.texts(1).into_iter().map(|(_, t)| t).collect();
        for text in ["one", "two"] {
            assert!(
                shown.iter().any(|t| t == text) || after.iter().any(|t| t == text),
                "crash after fetch {k}: {text:?} lost (shown before the crash: {shown:?}, \
                 after the restart: {after:?})"
            );
        }
        send(&mut w, 0, "team", "three");
        assert_eq!(
            w.texts(1),
            vec![pair("team", "three")],
            "crash after fetch {k}"
        );
    }
}

#[test]
fn bob_restarting_between_messages_carries_on() {
    // Every command in this harness runs in a fresh machine restored from
    // the snapshot; this checks many restarts in a row explicitly.
    let mut w = team();
    w.texts(1);
    for i in 0..5 {
        send(&mut w, 0, "team", &format!("m{i}"));
        assert_eq!(w.texts(1), vec![pair("team", &format!("m{i}"))]);
    }
}

#[test]
fn tampered_upload_fingerprint_is_reported_and_not_counted() {
    let mut w = World::new(1);
    let (events, outcome) = w.run_with(0, Command::Register { count: 1 }, &mut |req, reply| {
        if let (
            RequestBody::UploadKeyPackage {
                last_resort: false, ..
            },
            Ok(Response::KeyPackageUploaded { fingerprint }),
        ) = (req, reply)
        {
            fingerprint[0] ^= 1;
        }
    });
    assert!(events.iter().any(|e| matches!(e, Event::Tampering { .. })));
    // In each suite's pool: the last resort counted, the other not.
    assert_eq!(
        outcome,
        Ok(Outcome::Registered {
            uploaded: 2,
            already: 0,
            failed: 2
        })
    );
}

#[test]
fn substituted_key_package_is_refused() {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    w.run(
        0,
        Command::CreateGroup {
            name: "g".into(),
            pq: false,
        },
    )
    .1
    .unwrap();
    // The server hands out Carol's KeyPackage when Alice asks for Bob's.
    let carol = w.key(2);
    let carol_conn = w.users[0].conn;
    let carols = w.call(
        carol_conn,
        RequestBody::FetchKeyPackage {
            identity_key: carol,
            cipher_suite: 0,
        },
    );
    let bob = w.key(1);
    let (_, outcome) = w.run_with(
        0,
        Command::AddMember {
            group: "g".into(),
            member: bob,
        },
        &mut |req, reply| {
            if matches!(req, RequestBody::FetchKeyPackage { .. }) {
                *reply = carols.clone();
            }
        },
    );
    assert!(
        matches!(outcome, Err(CommandError::BadKeyPackage(_))),
        "{outcome:?}"
    );
}

#[test]
fn adding_someone_without_key_packages_says_so() {
    let mut w = World::new(2);
    register(&mut w, 0);
    w.run(
        0,
        Command::CreateGroup {
            name: "g".into(),
            pq: false,
        },
    )
    .1
    .unwrap();
    let bob = w.key(1);
    let (_, outcome) = w.run(
        0,
        Command::AddMember {
            group: "g".into(),
            member: bob,
        },
    );
    assert!(
        matches!(outcome, Err(CommandError::NoKeyPackage(_))),
        "{outcome:?}"
    );
}

#[test]
fn register_tops_up_using_the_count() {
    let mut w = World::new(1);
    register(&mut w, 0);
    let (_, outcome) = w.run(0, Command::Register { count: 5 });
    assert_eq!(
        outcome,
        Ok(Outcome::Registered {
            uploaded: 4,
            already: 6,
            failed: 0
        })
    );
}

#[test]
fn last_resort_package_lets_a_drained_user_be_added() {
    let mut w = World::new(2);
    register(&mut w, 0);
    let (_, outcome) = w.run(1, Command::Register { count: 0 });
    assert!(matches!(
        outcome,
        Ok(Outcome::Registered { uploaded: 2, .. })
    ));
    w.run(
        0,
        Command::CreateGroup {
            name: "g".into(),
            pq: false,
        },
    )
    .1
    .unwrap();
    add(&mut w, 0, "g", 1);
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(events.iter().any(|e| matches!(e, Event::Joined { .. })));
}

#[test]
fn group_names_are_validated_and_unique() {
    let mut w = World::new(1);
    assert!(matches!(
        w.run(
            0,
            Command::CreateGroup {
                name: String::new(),
                pq: false,
            }
        )
        .1,
        Err(CommandError::InvalidName(_))
    ));
    assert!(matches!(
        w.run(
            0,
            Command::CreateGroup {
                name: "x".repeat(65),
                pq: false,
            }
        )
        .1,
        Err(CommandError::InvalidName(_))
    ));
    w.run(
        0,
        Command::CreateGroup {
            name: "a".into(),
            pq: false,
        },
    )
    .1
    .unwrap();
    assert!(matches!(
        w.run(
            0,
            Command::CreateGroup {
                name: "a".into(),
                pq: false,
            }
        )
        .1,
        Err(CommandError::GroupExists(_))
    ));
    assert!(matches!(
        w.run(
            0,
            Command::Send {
                group: "nope".into(),
                text: "x".into()
            }
        )
        .1,
        Err(CommandError::UnknownGroup(_))
    ));
}

#[test]
fn undeliverable_sends_stay_in_the_outbox_and_go_out_later() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    // The server is unavailable for Alice's next send.
    let (_, outcome) = w.run_full(
        0,
        Command::Send {
            group: "team".into(),
            text: "later".into(),
        },
        &mut |req| {
            matches!(
                req,
                RequestBody::Enqueue { .. } | RequestBody::EnqueueBatch { .. }
            )
            .then(|| Err(ServiceError::unavailable("down")))
        },
        &mut |_, _| {},
    );
    assert!(
        matches!(
            outcome,
            Ok(Outcome::Sent {
                delivered: 0,
                undelivered: 2,
                ..
            })
        ),
        "{outcome:?}"
    );
    assert!(w.texts(1).is_empty());
    // Her next command delivers it first, with the same message ids.
    send(&mut w, 0, "team", "now");
    assert_eq!(w.texts(1), vec![pair("team", "later"), pair("team", "now")]);
}

/// A command that starts while deliveries of an earlier one wait makes the
/// shell connect for those first; the new message must be in the state
/// file before the shell waits on that connection, where it may be
/// stopped (found by the simulation: a `qpq send` interrupted while
/// connecting lost its message).
#[test]
fn a_new_message_is_persisted_before_the_connection_for_older_deliveries() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let outcome = run_offline(
        &mut w,
        0,
        Command::Send {
            group: "team".into(),
            text: "waiting".into(),
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { delivered: 0, .. })),
        "{outcome:?}"
    );
    let mut m = w.offline_machine(0);
    m.handle_command(
        Time::ZERO,
        Command::Send {
            group: "team".into(),
            text: "new".into(),
        },
    );
    assert_eq!(m.poll_effect(), Some(Effect::Persist));
    assert_eq!(m.poll_effect(), Some(Effect::Connect));
    // The process stops while it connects: what it wrote is all there is.
    w.users[0].saved = m.snapshot();
    drop(m);
    send(&mut w, 0, "team", "after");
    for who in [1, 2] {
        assert_eq!(
            w.texts(who),
            vec![
                pair("team", "waiting"),
                pair("team", "new"),
                pair("team", "after")
            ]
        );
    }
}

/// Runs `command` on a fresh machine of `who`, holding every request until
/// the machine waits for answers, then answering the newest first: a
/// network that reorders concurrent requests.
fn run_newest_first(w: &mut World, who: usize, command: Command) -> Result<Outcome, CommandError> {
    let mut m = w.machine(who);
    let conn = w.users[who].conn;
    m.handle_command(Time::ZERO, command);
    let mut held: Vec<(u64, RequestBody)> = Vec::new();
    loop {
        match m.poll_effect() {
            Some(Effect::Persist) => w.users[who].saved = m.snapshot(),
            Some(Effect::Connect) => m.handle_connected(Time::ZERO),
            Some(Effect::Request { token, request }) => held.push((token, request)),
            Some(Effect::Event(_)) => {}
            Some(Effect::DirectSend { .. } | Effect::DirectAnswer { .. }) => {
                unreachable!("no direct links")
            }
            Some(Effect::Done(outcome)) => return outcome,
            None => {
                let (token, request) = held.pop().expect("machine stalled without finishing");
                let reply = w.call(conn, request);
                m.handle_response(Time::ZERO, token, reply);
            }
        }
    }
}

#[test]
fn deliveries_to_one_queue_keep_their_order_however_answers_arrive() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let (_, outcome) = w.run_full(
        0,
        Command::Send {
            group: "team".into(),
            text: "first".into(),
        },
        &mut |req| {
            matches!(
                req,
                RequestBody::Enqueue { .. } | RequestBody::EnqueueBatch { .. }
            )
            .then(|| Err(ServiceError::unavailable("down")))
        },
        &mut |_, _| {},
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { undelivered: 2, .. })),
        "{outcome:?}"
    );
    // The deferred message and the next one are both due; the network
    // answers the newest request first.
    let outcome = run_newest_first(
        &mut w,
        0,
        Command::Send {
            group: "team".into(),
            text: "second".into(),
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { undelivered: 0, .. })),
        "{outcome:?}"
    );
    for u in 1..3 {
        assert_eq!(
            w.texts(u),
            vec![pair("team", "first"), pair("team", "second")]
        );
    }
}

#[test]
fn a_commit_reaches_a_member_before_the_messages_of_its_epoch() {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    w.run(
        0,
        Command::CreateGroup {
            name: "team".into(),
            pq: false,
        },
    )
    .1
    .unwrap();
    add(&mut w, 0, "team", 1);
    w.texts(1);
    // Adding Carol: the Commit to Bob is deferred.
    let carol = w.key(2);
    let bob = w.key(1);
    let (_, outcome) = w.run_full(
        0,
        Command::AddMember {
            group: "team".into(),
            member: carol,
        },
        &mut |req| {
            matches!(req, RequestBody::Enqueue { recipient_key, .. } if *recipient_key == bob)
                .then(|| Err(ServiceError::unavailable("down")))
        },
        &mut |_, _| {},
    );
    assert!(
        matches!(outcome, Ok(Outcome::MemberAdded { undelivered: 1, .. })),
        "{outcome:?}"
    );
    // Alice's first message of the new epoch goes out with the deferred
    // Commit, answers newest first; Bob still gets the Commit first.
    let outcome = run_newest_first(
        &mut w,
        0,
        Command::Send {
            group: "team".into(),
            text: "welcome carol".into(),
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { undelivered: 0, .. })),
        "{outcome:?}"
    );
    assert_eq!(w.texts(1), vec![pair("team", "welcome carol")]);
    assert_eq!(w.texts(2), vec![pair("team", "welcome carol")]);
}

#[test]
fn a_machine_kept_after_a_failed_command_still_delivers_and_finishes() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let (_, outcome) = w.run_full(
        0,
        Command::Send {
            group: "team".into(),
            text: "kept".into(),
        },
        &mut |req| {
            matches!(
                req,
                RequestBody::Enqueue { .. } | RequestBody::EnqueueBatch { .. }
            )
            .then(|| Err(ServiceError::unavailable("down")))
        },
        &mut |_, _| {},
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { undelivered: 2, .. })),
        "{outcome:?}"
    );
    // One machine for two commands, as a shell that stops carrying
    // requests at Done keeps it. The first fails while the deferred
    // deliveries are in flight; the shell stops at Done, never answers
    // them, and says so.
    let mut m = w.machine(0);
    m.handle_command(Time::ZERO, Command::Register { count: 3 });
    let mut done = None;
    while let Some(effect) = m.poll_effect() {
        match effect {
            Effect::Request {
                token,
                request: RequestBody::KeyPackageCount { .. },
            } => m.handle_response(Time::ZERO, token, Err(ServiceError::unavailable("down"))),
            Effect::Done(outcome) => done = Some(outcome),
            _ => {}
        }
    }
    assert!(
        matches!(done, Some(Err(CommandError::Server(_)))),
        "{done:?}"
    );
    m.handle_disconnected(Time::ZERO, "gone");
    // The next command on the same machine sends them again and finishes.
    let conn = w.users[0].conn;
    m.handle_command(Time::ZERO, Command::Receive { wait_ms: 0 });
    let outcome = loop {
        match m.poll_effect().expect("machine stalled without finishing") {
            Effect::Persist => w.users[0].saved = m.snapshot(),
            Effect::Connect => m.handle_connected(Time::ZERO),
            Effect::Request { token, request } => {
                let reply = w.call(conn, request);
                m.handle_response(Time::ZERO, token, reply);
            }
            Effect::Event(_) => {}
            Effect::DirectSend { .. } | Effect::DirectAnswer { .. } => {
                unreachable!("no direct links")
            }
            Effect::Done(outcome) => break outcome,
        }
    };
    assert_eq!(outcome, Ok(Outcome::Received { messages: 0 }));
    assert_eq!(m.outbox_len(), 0);
    assert_eq!(w.texts(1), vec![pair("team", "kept")]);
}

#[test]
fn garbage_payloads_are_warnings_not_crashes() {
    let mut w = team();
    w.texts(1);
    let bob = w.key(1);
    let conn = w.users[0].conn;
    for (i, junk) in [
        &b"\x01\x02"[..],
        b"\x01\x01\x05",
        b"zzz",
        b"\x01\x02garbage-mls",
    ]
    .iter()
    .enumerate()
    {
        w.call(
            conn,
            RequestBody::Enqueue {
                recipient_key: bob,
                channel_id: ChannelId::DEFAULT,
                payload: junk.to_vec(),
                message_id: MessageId([i as u8 + 100; 16]),
            },
        )
        .unwrap();
    }
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(outcome.is_ok());
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Warning { .. }))
            .count(),
        4
    );
    // And Bob still chats.
    send(&mut w, 0, "team", "fine");
    assert_eq!(w.texts(1), vec![pair("team", "fine")]);
}

fn same_epoch(w: &mut World, users: &[usize], group: &str) {
    let auth: Vec<_> = users
        .iter()
        .map(|u| w.machine(*u).epoch_authenticator(group))
        .collect();
    assert!(auth[0].is_some());
    assert!(auth.windows(2).all(|p| p[0] == p[1]), "members diverged");
}

#[test]
fn removed_member_learns_it_and_gets_nothing_more() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let carol = w.key(2);
    let (_, outcome) = w.run(
        0,
        Command::RemoveMember {
            group: "team".into(),
            member: carol,
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::MemberRemoved { undelivered: 0, .. })),
        "{outcome:?}"
    );
    let (events, _) = w.run(2, Command::Receive { wait_ms: 0 });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Removed { group, .. } if group == "team"))
    );
    assert!(w.machine(2).groups().is_empty());
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::GroupChanged { members: 2, .. }))
    );
    send(&mut w, 0, "team", "without carol");
    assert_eq!(w.texts(1), vec![pair("team", "without carol")]);
    assert!(w.texts(2).is_empty());
    same_epoch(&mut w, &[0, 1], "team");
    // Removing someone who is not a member is refused.
    assert!(matches!(
        w.run(
            0,
            Command::RemoveMember {
                group: "team".into(),
                member: carol
            }
        )
        .1,
        Err(CommandError::NotMember(_))
    ));
}

#[test]
fn leaving_member_is_committed_out_by_the_lowest_leaf() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let (_, outcome) = w.run(
        1,
        Command::Leave {
            group: "team".into(),
        },
    );
    assert_eq!(
        outcome,
        Ok(Outcome::Left {
            group: "team".into()
        })
    );
    assert!(w.machine(1).groups().is_empty());
    // Alice (leaf 0) commits Bob's removal when she sees his proposal;
    // Carol only stores it and then processes Alice's Commit.
    let (events, _) = w.run(2, Command::Receive { wait_ms: 0 });
    assert!(
        !events.iter().any(|e| matches!(e, Event::Warning { .. })),
        "{events:?}"
    );
    let (events, _) = w.run(0, Command::Receive { wait_ms: 0 });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::GroupChanged { members: 2, .. })),
        "{events:?}"
    );
    let (events, _) = w.run(2, Command::Receive { wait_ms: 0 });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::GroupChanged { members: 2, .. })),
        "{events:?}"
    );
    same_epoch(&mut w, &[0, 2], "team");
    send(&mut w, 2, "team", "bye bob");
    assert_eq!(w.texts(0), vec![pair("team", "bye bob")]);
}

#[test]
fn self_update_advances_the_epoch_for_everyone() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let before = w.machine(0).groups()[0].epoch;
    let (_, outcome) = w.run(1, Command::Update { group: None });
    assert!(
        matches!(outcome, Ok(Outcome::Updated { ref groups, undelivered: 0 }) if groups == &["team"]),
        "{outcome:?}"
    );
    w.texts(0);
    w.texts(2);
    assert_eq!(w.machine(0).groups()[0].epoch, before + 1);
    same_epoch(&mut w, &[0, 1, 2], "team");
    send(&mut w, 1, "team", "fresh keys");
    assert_eq!(w.texts(2), vec![pair("team", "fresh keys")]);
}

#[test]
fn five_members_through_removal_update_and_leave_keep_chatting() {
    let mut w = World::new(5);
    for u in 0..5 {
        register(&mut w, u);
    }
    w.run(
        0,
        Command::CreateGroup {
            name: "five".into(),
            pq: false,
        },
    )
    .1
    .unwrap();
    for u in 1..5 {
        add(&mut w, 0, "five", u);
    }
    for u in 1..5 {
        w.run(u, Command::Receive { wait_ms: 0 }).1.unwrap();
    }
    let drain = |w: &mut World, users: &[usize]| {
        for u in users {
            let (events, outcome) = w.run(*u, Command::Receive { wait_ms: 0 });
            outcome.unwrap();
            assert!(
                !events.iter().any(|e| matches!(e, Event::Warning { .. })),
                "{events:?}"
            );
        }
    };
    // Dave (3) removes Erin (4); Bob (1) rotates his keys; Carol (2) leaves.
    let erin = w.key(4);
    w.run(
        3,
        Command::RemoveMember {
            group: "five".into(),
            member: erin,
        },
    )
    .1
    .unwrap();
    drain(&mut w, &[0, 1, 2, 4]);
    w.run(
        1,
        Command::Update {
            group: Some("five".into()),
        },
    )
    .1
    .unwrap();
    drain(&mut w, &[0, 2, 3]);
    w.run(
        2,
        Command::Leave {
            group: "five".into(),
        },
    )
    .1
    .unwrap();
    drain(&mut w, &[0, 1, 3]);
    drain(&mut w, &[1, 3]);
    same_epoch(&mut w, &[0, 1, 3], "five");
    for u in [0, 1, 3] {
        send(&mut w, u, "five", &format!("still here {u}"));
    }
    let got: Vec<Vec<(String, String)>> = [0, 1, 3].iter().map(|u| w.texts(*u)).collect();
    assert_eq!(
        got[0],
        vec![pair("five", "still here 1"), pair("five", "still here 3")]
    );
    assert_eq!(
        got[1],
        vec![pair("five", "still here 0"), pair("five", "still here 3")]
    );
    assert_eq!(
        got[2],
        vec![pair("five", "still here 0"), pair("five", "still here 1")]
    );
    assert!(w.texts(4).is_empty());
    assert!(w.texts(2).is_empty());
}

// ----- post-quantum groups ---------------------------------------------------

/// One enqueue a command made: recipient, channel, payload.
type Sent = (IdentityKey, ChannelId, Vec<u8>);

impl World {
    /// Runs a command and returns, besides its result, every payload it
    /// enqueued (delivered to the server as usual).
    fn run_capturing(
        &mut self,
        who: usize,
        command: Command,
    ) -> (Vec<Event>, Result<Outcome, CommandError>, Vec<Sent>) {
        let mut sent = Vec::new();
        let (events, outcome) = self.run_full(
            who,
            command,
            &mut |req| {
                match req {
                    RequestBody::Enqueue {
                        recipient_key,
                        channel_id,
                        payload,
                        ..
                    } => sent.push((*recipient_key, *channel_id, payload.clone())),
                    RequestBody::EnqueueBatch {
                        recipient_keys,
                        channel_id,
                        payload,
                        ..
                    } => {
                        for r in recipient_keys {
                            sent.push((*r, *channel_id, payload.clone()));
                        }
                    }
                    RequestBody::EnqueueMany {
                        recipient_keys,
                        channel_id,
                        messages,
                    } => {
                        for m in messages {
                            for r in recipient_keys {
                                sent.push((*r, *channel_id, m.payload.clone()));
                            }
                        }
                    }
                    _ => {}
                }
                None
            },
            &mut |_, _| {},
        );
        (events, outcome, sent)
    }

    /// What the server holds in `who`'s queue on `channel`, not
    /// acknowledging anything the user has not processed.
    fn stored(&mut self, who: usize, channel: ChannelId) -> Vec<Vec<u8>> {
        let m = self.machine(who);
        let after_seq = m.cursors.get(&channel).copied().unwrap_or(0);
        let reply = self.call(
            self.users[who].conn,
            RequestBody::Fetch {
                recipient_key: m.identity_key(),
                channel_id: channel,
                after_seq,
                limit: 100,
            },
        );
        let Ok(Response::Messages { messages, .. }) = reply else {
            panic!("fetch: {reply:?}");
        };
        messages.into_iter().map(|m| m.payload).collect()
    }

    fn channel(&mut self, who: usize, group: &str) -> ChannelId {
        let groups = self.machine(who).groups();
        groups
            .iter()
            .find(|g| g.name == group)
            .map(|g| g.channel_id)
            .expect("group exists")
    }
}

fn create(w: &mut World, who: usize, name: &str, pq: bool) {
    let (_, outcome) = w.run(
        who,
        Command::CreateGroup {
            name: name.into(),
            pq,
        },
    );
    assert_eq!(outcome, Ok(Outcome::GroupCreated { group: name.into() }));
}

/// Checks that `payload` is a hybrid payload that opens with `opener`'s keys
/// (and with nobody else's of `others`), and returns what it wraps.
fn check_sealed(w: &mut World, payload: &[u8], opener: usize, others: &[usize]) -> Envelope {
    let Ok(Envelope::Hybrid { framing, .. }) = Envelope::decode(payload) else {
        panic!("not a hybrid payload");
    };
    let kind = if framing.is_some() { 0x04 } else { 0x03 };
    assert_eq!(&payload[..2], &[0x01, kind], "hybrid framing");
    let inner = w
        .machine(opener)
        .open_hybrid_payload(payload)
        .expect("opens with the recipient's key");
    // A Commit, and nothing else, shows its framing in the clear.
    assert_eq!(framing, crate::protocol::framing::commit_framing(&inner));
    assert_eq!(
        payload.len(),
        inner.len() + envelope::HYBRID_OVERHEAD_BYTES + framing.map_or(0, |f| 2 + f.len()),
        "overhead"
    );
    for o in others {
        assert!(
            matches!(
                w.machine(*o).open_hybrid_payload(payload),
                Err(CommandError::HybridEnvelope(_))
            ),
            "opens for user {o} too"
        );
    }
    Envelope::decode(&inner).expect("wraps an envelope")
}

/// Alice creates the pq group "pq" and adds Bob and Carol; both join.
fn pq_team() -> World {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    w.sealed_pq = true;
    create(&mut w, 0, "pq", true);
    add(&mut w, 0, "pq", 1);
    add(&mut w, 0, "pq", 2);
    assert!(w.texts(1).is_empty());
    assert!(w.texts(2).is_empty());
    w
}

fn warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning { message } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

/// KeyPackages left in `who`'s pool of `suite`, as the server counts them.
fn pool(w: &mut World, who: usize, suite: Ciphersuite) -> u32 {
    let identity_key = w.key(who);
    let reply = w.call(
        w.users[who].conn,
        RequestBody::KeyPackageCount {
            identity_key,
            cipher_suite: key_package_pool(suite),
        },
    );
    match reply {
        Ok(Response::KeyPackageCount { count, .. }) => count,
        other => panic!("{other:?}"),
    }
}

#[test]
fn pq_group_is_mls_of_the_pq_suite_with_one_payload_for_every_recipient() {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
        assert_eq!(pool(&mut w, u, CIPHERSUITE), 3);
        assert_eq!(pool(&mut w, u, PQ_CIPHERSUITE), 3);
    }
    create(&mut w, 0, "pq", true);
    let bob = w.key(1);
    // Bob is added with one of his KeyPackages of the PQ suite; the Welcome
    // is a plain one (MLS seals it post-quantum itself).
    let (_, outcome, sent) = w.run_capturing(
        0,
        Command::AddMember {
            group: "pq".into(),
            member: bob,
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::MemberAdded { .. })),
        "{outcome:?}"
    );
    assert_eq!(pool(&mut w, 1, PQ_CIPHERSUITE), 2);
    assert_eq!(pool(&mut w, 1, CIPHERSUITE), 3);
    assert_eq!(sent.len(), 1);
    assert!(matches!(
        Envelope::decode(&sent[0].2),
        Ok(Envelope::Welcome { .. })
    ));
    add(&mut w, 0, "pq", 2);
    assert_eq!(pool(&mut w, 2, PQ_CIPHERSUITE), 2);
    assert!(w.texts(1).is_empty());
    assert!(w.texts(2).is_empty());
    for u in 0..3 {
        let group = &w.machine(u).groups()[0];
        assert!(group.pq, "user {u} knows the group is pq");
        assert_eq!(group.members.len(), 3);
    }
    // One message is one payload, the same for every recipient: store-once
    // fan-out, no per-recipient envelope.
    send(&mut w, 0, "pq", "from alice");
    let channel = w.channel(0, "pq");
    let to_bob = w.stored(1, channel);
    let to_carol = w.stored(2, channel);
    assert_eq!(to_bob.len(), 1);
    assert_eq!(to_bob, to_carol);
    assert!(matches!(
        Envelope::decode(&to_bob[0]),
        Ok(Envelope::Group { .. })
    ));
    send(&mut w, 1, "pq", "from bob");
    assert_eq!(
        w.texts(2),
        vec![pair("pq", "from alice"), pair("pq", "from bob")]
    );
    assert_eq!(w.texts(0), vec![pair("pq", "from bob")]);
    assert_eq!(w.texts(1), vec![pair("pq", "from alice")]);
    // Commits: an update, a removal; everyone stays in step.
    let (_, outcome) = w.run(
        2,
        Command::Update {
            group: Some("pq".into()),
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Updated { .. })),
        "{outcome:?}"
    );
    w.texts(0);
    w.texts(1);
    same_epoch(&mut w, &[0, 1, 2], "pq");
    let (_, outcome) = w.run(
        0,
        Command::RemoveMember {
            group: "pq".into(),
            member: bob,
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::MemberRemoved { .. })),
        "{outcome:?}"
    );
    w.texts(2);
    same_epoch(&mut w, &[0, 2], "pq");
    send(&mut w, 2, "pq", "two of us");
    assert_eq!(w.texts(0), vec![pair("pq", "two of us")]);
}

#[test]
fn a_key_package_of_the_other_suite_is_refused_for_a_group() {
    let mut w = World::new(2);
    register(&mut w, 0);
    register(&mut w, 1);
    create(&mut w, 0, "pq", true);
    let bob = w.key(1);
    // The server answers with one of Bob's classic KeyPackages instead.
    let classic = match w.call(
        w.users[0].conn,
        RequestBody::FetchKeyPackage {
            identity_key: bob,
            cipher_suite: key_package_pool(CIPHERSUITE),
        },
    ) {
        Ok(Response::KeyPackage { package, .. }) => package,
        other => panic!("{other:?}"),
    };
    let (_, outcome) = w.run_with(
        0,
        Command::AddMember {
            group: "pq".into(),
            member: bob,
        },
        &mut |req, reply| {
            if let (RequestBody::FetchKeyPackage { .. }, Ok(Response::KeyPackage { package, .. })) =
                (req, reply)
            {
                *package = classic.clone();
            }
        },
    );
    assert!(
        matches!(&outcome, Err(CommandError::BadKeyPackage(m)) if m.contains("cipher suite")),
        "{outcome:?}"
    );
    assert_eq!(w.machine(0).groups()[0].members.len(), 1);
}

#[test]
fn adding_to_a_pq_group_someone_without_pq_key_packages_says_so() {
    let mut w = World::new(2);
    register(&mut w, 0);
    create(&mut w, 0, "pq", true);
    // Bob's client predates the PQ suite: KeyPackages in the default pool
    // only.
    let bob = w.key(1);
    let mut m = w.machine(1);
    let package = m.key_package(CIPHERSUITE, false).unwrap();
    w.users[1].saved = m.snapshot();
    let reply = w.call(
        w.users[1].conn,
        RequestBody::UploadKeyPackage {
            identity_key: bob,
            package,
            last_resort: false,
            cipher_suite: DEFAULT_POOL,
        },
    );
    assert!(reply.is_ok(), "{reply:?}");
    let (_, outcome) = w.run(
        0,
        Command::AddMember {
            group: "pq".into(),
            member: bob,
        },
    );
    assert!(
        matches!(outcome, Err(CommandError::NoKeyPackage(_))),
        "{outcome:?}"
    );
    assert_eq!(pool(&mut w, 1, CIPHERSUITE), 1, "the classic one is kept");
}

#[test]
fn pq_group_of_three_sends_everything_in_hybrid_envelopes() {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    w.sealed_pq = true;
    create(&mut w, 0, "pq", true);
    let (bob, carol) = (w.key(1), w.key(2));
    // The Welcome to Bob is sealed to Bob's key.
    let (_, outcome, sent) = w.run_capturing(
        0,
        Command::AddMember {
            group: "pq".into(),
            member: bob,
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::MemberAdded { .. })),
        "{outcome:?}"
    );
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].0, sent[0].1), (bob, ChannelId::DEFAULT));
    assert!(matches!(
        check_sealed(&mut w, &sent[0].2, 1, &[0, 2]),
        Envelope::Welcome { .. }
    ));
    // Adding Carol: the Commit to Bob and the Welcome to Carol, each sealed
    // to its recipient only.
    let (_, outcome, sent) = w.run_capturing(
        0,
        Command::AddMember {
            group: "pq".into(),
            member: carol,
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::MemberAdded { .. })),
        "{outcome:?}"
    );
    assert_eq!(sent.len(), 2);
    for (to, _, payload) in &sent {
        let (me, others) = if *to == bob { (1, [0, 2]) } else { (2, [0, 1]) };
        let inner = check_sealed(&mut w, payload, me, &others);
        assert_eq!(
            matches!(inner, Envelope::Welcome { .. }),
            *to == carol,
            "{inner:?}"
        );
    }
    assert!(w.texts(1).is_empty());
    assert!(w.texts(2).is_empty());
    for u in 0..3 {
        assert!(
            w.machine(u).groups()[0].pq,
            "user {u} knows the group is pq"
        );
    }
    // Everyone talks; what the server stores for each recipient is a hybrid
    // envelope that only that recipient opens.
    send(&mut w, 0, "pq", "from alice");
    send(&mut w, 1, "pq", "from bob");
    send(&mut w, 2, "pq", "from carol");
    let channel = w.channel(0, "pq");
    for (me, others) in [(0, [1, 2]), (1, [0, 2]), (2, [0, 1])] {
        let stored = w.stored(me, channel);
        assert_eq!(stored.len(), 2, "user {me}");
        for payload in &stored {
            assert!(matches!(
                check_sealed(&mut w, payload, me, &others),
                Envelope::Group { .. }
            ));
        }
    }
    assert_eq!(
        w.texts(0),
        vec![pair("pq", "from bob"), pair("pq", "from carol")]
    );
    assert_eq!(
        w.texts(1),
        vec![pair("pq", "from alice"), pair("pq", "from carol")]
    );
    assert_eq!(
        w.texts(2),
        vec![pair("pq", "from alice"), pair("pq", "from bob")]
    );
    // Commits too: a self-update reaches the others sealed.
    let (_, outcome, sent) = w.run_capturing(
        1,
        Command::Update {
            group: Some("pq".into()),
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Updated { .. })),
        "{outcome:?}"
    );
    assert_eq!(sent.len(), 2);
    for (to, _, payload) in &sent {
        let me = if *to == w.key(0) { 0 } else { 2 };
        check_sealed(&mut w, payload, me, &[1]);
    }
    w.texts(0);
    w.texts(2);
    same_epoch(&mut w, &[0, 1, 2], "pq");
    send(&mut w, 2, "pq", "after the update");
    assert_eq!(w.texts(1), vec![pair("pq", "after the update")]);
}

#[test]
fn pq_group_refuses_a_member_without_a_hybrid_key_and_keeps_their_key_package() {
    let mut w = World::new(2);
    register(&mut w, 0);
    // Bob registers as an older client would: KeyPackages, no hybrid key.
    let (events, outcome) = w.run_full(
        1,
        Command::Register { count: 3 },
        &mut |req| {
            matches!(req, RequestBody::UploadHybridKey { .. })
                .then(|| Err(ServiceError::unavailable("not supported")))
        },
        &mut |_, _| {},
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(warnings(&events).len(), 1, "{events:?}");
    w.sealed_pq = true;
    create(&mut w, 0, "pq", true);
    let bob = w.key(1);
    let (_, outcome) = w.run(
        0,
        Command::AddMember {
            group: "pq".into(),
            member: bob,
        },
    );
    assert!(
        matches!(outcome, Err(CommandError::NoHybridKey(_))),
        "{outcome:?}"
    );
    assert!(outcome.unwrap_err().to_string().contains("hybrid"));
    // None of Bob's KeyPackages was used up.
    let bob_conn = w.users[1].conn;
    let count = w.call(
        bob_conn,
        RequestBody::KeyPackageCount {
            identity_key: bob,
            cipher_suite: 0,
        },
    );
    assert!(
        matches!(count, Ok(Response::KeyPackageCount { count: 3, .. })),
        "{count:?}"
    );
    // A group without pq takes him.
    create(&mut w, 0, "plain", false);
    add(&mut w, 0, "plain", 1);
}

#[test]
fn pq_group_refuses_a_hybrid_key_not_signed_by_the_member() {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    w.sealed_pq = true;
    create(&mut w, 0, "pq", true);
    // The server hands out Carol's (validly signed by Carol) key for Bob.
    let carol = w.key(2);
    let conn = w.users[0].conn;
    let carols = w.call(
        conn,
        RequestBody::FetchHybridKey {
            identity_key: carol,
        },
    );
    assert!(carols.is_ok());
    let bob = w.key(1);
    let (_, outcome) = w.run_with(
        0,
        Command::AddMember {
            group: "pq".into(),
            member: bob,
        },
        &mut |req, reply| {
            if matches!(req, RequestBody::FetchHybridKey { .. }) {
                *reply = carols.clone();
            }
        },
    );
    assert!(
        matches!(
            outcome,
            Err(CommandError::BadHybridKey(_, HybridError::BadSignature))
        ),
        "{outcome:?}"
    );
    assert_eq!(w.machine(0).groups()[0].members.len(), 1);
}

#[test]
fn creating_a_sealed_pq_group_needs_an_own_hybrid_key() {
    let mut w = World::new(1);
    w.sealed_pq = true;
    let (_, outcome) = w.run(
        0,
        Command::CreateGroup {
            name: "pq".into(),
            pq: true,
        },
    );
    assert_eq!(outcome, Err(CommandError::NoOwnHybridKey));
    register(&mut w, 0);
    w.sealed_pq = true;
    create(&mut w, 0, "pq", true);
}

#[test]
fn tampered_hybrid_envelope_is_refused_and_later_messages_still_arrive() {
    let mut w = pq_team();
    send(&mut w, 0, "pq", "one");
    send(&mut w, 0, "pq", "two");
    // The first payload Bob fetches has one byte changed inside the AEAD
    // ciphertext.
    let mut flipped = false;
    let (events, outcome) = w.run_with(1, Command::Receive { wait_ms: 0 }, &mut |req, reply| {
        if let (RequestBody::Fetch { .. }, Ok(Response::Messages { messages, .. })) = (req, reply)
            && let Some(m) = messages.first_mut()
            && !flipped
        {
            let at = m.payload.len() - 20;
            m.payload[at] ^= 1;
            flipped = true;
        }
    });
    assert!(flipped);
    assert_eq!(outcome, Ok(Outcome::Received { messages: 1 }));
    let warned = warnings(&events);
    assert_eq!(warned.len(), 1, "{events:?}");
    assert!(warned[0].contains("hybrid envelope refused"), "{warned:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Message { text, .. } if text == "two"))
    );
    // Nothing else is lost, and the group carries on.
    send(&mut w, 0, "pq", "three");
    assert_eq!(w.texts(1), vec![pair("pq", "three")]);
    assert_eq!(
        w.texts(2),
        vec![pair("pq", "one"), pair("pq", "two"), pair("pq", "three")]
    );
}

#[test]
fn pq_group_refuses_a_message_without_its_hybrid_envelope() {
    let mut w = pq_team();
    send(&mut w, 0, "pq", "wrapped");
    // Bob is handed the very same MLS message with the envelope taken off
    // (as a downgrading sender would send it).
    let bob = w.machine(1);
    let (events, outcome) = w.run_with(1, Command::Receive { wait_ms: 0 }, &mut |req, reply| {
        if let (RequestBody::Fetch { .. }, Ok(Response::Messages { messages, .. })) = (req, reply) {
            for m in messages.iter_mut() {
                if let Ok(inner) = bob.open_hybrid_payload(&m.payload) {
                    m.payload = inner;
                }
            }
        }
    });
    assert_eq!(outcome, Ok(Outcome::Received { messages: 0 }));
    let warned = warnings(&events);
    assert_eq!(warned.len(), 1, "{events:?}");
    assert!(
        warned[0].contains("without a hybrid envelope"),
        "{warned:?}"
    );
}

#[test]
fn malformed_hybrid_payloads_are_warnings_not_crashes() {
    let mut w = pq_team();
    let bob = w.key(1);
    let channel = w.channel(1, "pq");
    let public = w.machine(1).hybrid_public_key().unwrap().clone();
    let key_id = public.key_id();
    let mut rng = ChaCha20Rng::from_seed([3; 32]);
    let sealed = |inner: &[u8], rng: &mut ChaCha20Rng| {
        Envelope::Hybrid {
            framing: None,
            key_id,
            sealed: hybrid::seal(&public, &key_id, inner, rng),
        }
        .encode()
    };
    let nested = sealed(&sealed(b"x", &mut rng), &mut rng);
    let junk = vec![
        vec![0x01, 0x03],
        // Unknown key id.
        Envelope::Hybrid {
            framing: None,
            key_id: [0; 32],
            sealed: vec![0x01; hybrid::ENVELOPE_OVERHEAD_BYTES],
        }
        .encode(),
        // Bob's key id, but not an envelope made for it.
        Envelope::Hybrid {
            framing: None,
            key_id,
            sealed: vec![0x01; hybrid::ENVELOPE_OVERHEAD_BYTES + 5],
        }
        .encode(),
        // Opens, but what it wraps is not a payload.
        sealed(b"zzz", &mut rng),
        // A hybrid payload inside another.
        nested,
    ];
    let conn = w.users[0].conn;
    for (i, payload) in junk.into_iter().enumerate() {
        w.call(
            conn,
            RequestBody::Enqueue {
                recipient_key: bob,
                channel_id: channel,
                payload,
                message_id: MessageId([i as u8 + 200; 16]),
            },
        )
        .unwrap();
    }
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    assert_eq!(outcome, Ok(Outcome::Received { messages: 0 }));
    let warned = warnings(&events);
    assert_eq!(warned.len(), 5, "{events:?}");
    assert!(
        warned
            .iter()
            .all(|m| m.contains("refused") || m.contains("malformed")),
        "{warned:?}"
    );
    send(&mut w, 0, "pq", "fine");
    assert_eq!(w.texts(1), vec![pair("pq", "fine")]);
}

#[test]
fn rotated_hybrid_key_still_opens_envelopes_in_flight() {
    let mut w = pq_team();
    let bob = w.key(1);
    let k1 = w.machine(1).hybrid_key_ids();
    assert_eq!(k1.len(), 1);
    // In flight: a Welcome to a second pq group, sealed to Bob's first key.
    create(&mut w, 0, "second", true);
    add(&mut w, 0, "second", 1);
    // Bob rotates (update of all groups) before he receives it.
    let (_, outcome) = w.run(1, Command::Update { group: None });
    assert!(
        matches!(outcome, Ok(Outcome::Updated { .. })),
        "{outcome:?}"
    );
    let k2 = w.machine(1).hybrid_key_ids();
    assert_eq!(k2.len(), 2);
    assert_eq!(k2[0], k1[0]);
    // The server now hands out the new key.
    let conn = w.users[0].conn;
    let Ok(Response::HybridKey { hybrid_key, .. }) =
        w.call(conn, RequestBody::FetchHybridKey { identity_key: bob })
    else {
        panic!("fetch");
    };
    assert_eq!(
        HybridPublicKey::from_bytes(&hybrid_key).unwrap().key_id(),
        k2[1]
    );
    // The old envelope still opens.
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(warnings(&events).is_empty(), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { group, .. } if group == "second"))
    );
    // Alice learns of the rotation from Bob's Commit and seals to the new
    // key from then on.
    assert!(w.texts(0).is_empty());
    let (_, outcome, sent) = w.run_capturing(
        0,
        Command::Send {
            group: "pq".into(),
            text: "to the new key".into(),
        },
    );
    assert!(matches!(outcome, Ok(Outcome::Sent { .. })), "{outcome:?}");
    let to_bob = sent.iter().find(|s| s.0 == bob).expect("sent to bob");
    let Ok(Envelope::Hybrid { key_id, .. }) = Envelope::decode(&to_bob.2) else {
        panic!("not hybrid");
    };
    assert_eq!(key_id, k2[1]);
    assert_eq!(w.texts(1), vec![pair("pq", "to the new key")]);
    // Only the last HYBRID_KEYS_KEPT keys are kept.
    for _ in 0..HYBRID_KEYS_KEPT {
        let (_, outcome) = w.run(1, Command::Update { group: None });
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let kept = w.machine(1).hybrid_key_ids();
    assert_eq!(kept.len(), HYBRID_KEYS_KEPT);
    assert!(!kept.contains(&k1[0]));
}

#[test]
fn snapshot_from_before_hybrid_keys_restores_and_register_adds_one() {
    let mut w = team();
    w.texts(1);
    // Bob's state as the previous layout (version 1) wrote it.
    let p = state::Persisted::decode(&w.users[1].saved).unwrap();
    let old = state::PersistedV1 {
        version: 1,
        identity_seed: p.identity_seed,
        registered: p.registered,
        active: p.active,
        groups: p
            .groups
            .into_iter()
            .map(|g| state::GroupRecordV1 {
                name: g.name,
                group_id: g.group_id,
                channel_id: g.channel_id,
                owner: g.owner,
            })
            .collect(),
        cursors: p.cursors,
        outbox: Vec::new(),
        next_outbox_id: p.next_outbox_id,
        mls_storage: p.mls_storage,
    };
    w.users[1].saved = postcard::to_allocvec(&old).unwrap();
    let m = w.machine(1);
    assert!(m.hybrid_key_ids().is_empty());
    assert_eq!(m.groups().len(), 1);
    assert!(!m.groups()[0].pq);
    // Bob carries on in his group.
    send(&mut w, 0, "team", "still here");
    assert_eq!(w.texts(1), vec![pair("team", "still here")]);
    send(&mut w, 1, "team", "me too");
    assert_eq!(w.texts(0), vec![pair("team", "me too")]);
    // A sealed pq group needs a hybrid key, which a later register adds.
    w.sealed_pq = true;
    let (_, outcome) = w.run(
        1,
        Command::CreateGroup {
            name: "pq".into(),
            pq: true,
        },
    );
    assert_eq!(outcome, Err(CommandError::NoOwnHybridKey));
    let (_, outcome) = w.run(1, Command::Register { count: 3 });
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(w.machine(1).hybrid_key_ids().len(), 1);
    create(&mut w, 1, "pq", true);
    add(&mut w, 1, "pq", 0);
    w.texts(0);
    send(&mut w, 0, "pq", "post-quantum");
    assert_eq!(w.texts(1), vec![pair("pq", "post-quantum")]);
    // And the upgraded state restores as the current layout.
    assert!(ClientMachine::restore(&w.users[1].saved, [0; 32]).is_ok());
    let newer = postcard::to_allocvec(&(STATE_VERSION + 1, 0u8)).unwrap();
    assert!(matches!(
        ClientMachine::restore(&newer, [0; 32]),
        Err(CommandError::State(_))
    ));
}

mod direct;
mod who;

mod interleavings {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        Send(usize),
        Receive(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..3usize).prop_map(Step::Send),
            (0..3usize).prop_map(Step::Receive),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
            ..ProptestConfig::default()
        })]

        /// Whatever the interleaving of sends and receives in a 3-member
        /// group, every member ends up seeing every other member's messages
        /// exactly once, in the order each was sent, and all members agree
        /// on the group state.
        #[test]
        fn every_interleaving_delivers_exactly_once_in_order(steps in prop::collection::vec(step(), 1..24)) {
            let mut w = team();
            let keys: Vec<IdentityKey> = (0..3).map(|u| w.key(u)).collect();
            let mut sent: Vec<Vec<String>> = vec![Vec::new(); 3];
            let mut seen: Vec<Vec<(IdentityKey, String)>> = vec![Vec::new(); 3];
            let receive = |w: &mut World, u: usize, seen: &mut Vec<Vec<(IdentityKey, String)>>| {
                let (events, outcome) = w.run(u, Command::Receive { wait_ms: 0 });
                prop_assert!(outcome.is_ok());
                for e in events {
                    match e {
                        Event::Message { sender, text, .. } => seen[u].push((sender, text)),
                        Event::Warning { message } => prop_assert!(false, "member {} warned: {}", u, message),
                        _ => {}
                    }
                }
                Ok(())
            };
            // Bob and Carol must join before they can send.
            receive(&mut w, 1, &mut seen)?;
            receive(&mut w, 2, &mut seen)?;
            for (n, s) in steps.iter().enumerate() {
                match *s {
                    Step::Send(u) => {
                        let text = format!("{u}-{n}");
                        send(&mut w, u, "team", &text);
                        sent[u].push(text);
                    }
                    Step::Receive(u) => receive(&mut w, u, &mut seen)?,
                }
            }
            for u in 0..3 {
                receive(&mut w, u, &mut seen)?;
            }
            for (u, seen_by_u) in seen.iter().enumerate() {
                for (s, sent_by_s) in sent.iter().enumerate() {
                    let from_s: Vec<&String> = seen_by_u
                        .iter()
                        .filter(|(k, _)| *k == keys[s])
                        .map(|(_, t)| t)
                        .collect();
                    let expected: Vec<&String> = if s == u { Vec::new() } else { sent_by_s.iter().collect() };
                    prop_assert_eq!(from_s, expected, "member {} seeing member {}", u, s);
                }
            }
            let auth: Vec<_> = (0..3).map(|u| w.machine(u).epoch_authenticator("team")).collect();
            prop_assert_eq!(&auth[0], &auth[1]);
            prop_assert_eq!(&auth[1], &auth[2]);
        }

        /// Members make Commits while cut off from the server, so several
        /// wait for the same epoch at once, and then resend them in any
        /// order: the server accepts one per epoch, every loser catches up
        /// and makes its change again, and in the end every change is made
        /// exactly once (one epoch each), every member is on the same epoch
        /// with the same group state, and every message arrives once, in
        /// order (fewer than `MAX_PAST_EPOCHS` changes, so even a message
        /// made before all of them still decrypts).
        #[test]
        fn concurrent_commits_converge_on_one_group_state(steps in prop::collection::vec(race_step(), 1..16)) {
            let mut w = team();
            let keys: Vec<IdentityKey> = (0..3).map(|u| w.key(u)).collect();
            let mut sent: Vec<Vec<String>> = vec![Vec::new(); 3];
            let mut seen: Vec<Vec<(IdentityKey, String)>> = vec![Vec::new(); 3];
            let receive = |w: &mut World, u: usize, seen: &mut Vec<Vec<(IdentityKey, String)>>| {
                let (events, outcome) = w.run(u, Command::Receive { wait_ms: 0 });
                prop_assert!(outcome.is_ok(), "{:?}", outcome);
                for e in events {
                    match e {
                        Event::Message { sender, text, .. } => seen[u].push((sender, text)),
                        Event::Warning { message } => prop_assert!(false, "member {} warned: {}", u, message),
                        _ => {}
                    }
                }
                Ok(())
            };
            receive(&mut w, 1, &mut seen)?;
            receive(&mut w, 2, &mut seen)?;
            let start = w.machine(0).groups()[0].epoch;
            let mut changes = 0u64;
            for (n, s) in steps.iter().enumerate() {
                match *s {
                    RaceStep::UpdateOffline(u) => {
                        let outcome = run_offline(&mut w, u, Command::Update { group: Some("team".into()) });
                        prop_assert!(outcome.is_ok(), "{:?}", outcome);
                        changes += 1;
                    }
                    RaceStep::SendOffline(u) => {
                        let text = format!("{u}-{n}");
                        let outcome = run_offline(&mut w, u, Command::Send { group: "team".into(), text: text.clone() });
                        prop_assert!(outcome.is_ok(), "{:?}", outcome);
                        sent[u].push(text);
                    }
                    RaceStep::Receive(u) => receive(&mut w, u, &mut seen)?,
                }
            }
            // Everyone online until nothing moves.
            for _ in 0..4 {
                for u in 0..3 {
                    receive(&mut w, u, &mut seen)?;
                }
            }
            for u in 0..3 {
                prop_assert_eq!(w.machine(u).outbox_len(), 0);
                prop_assert_eq!(w.machine(u).groups()[0].epoch, start + changes);
            }
            let auth: Vec<_> = (0..3).map(|u| w.machine(u).epoch_authenticator("team")).collect();
            prop_assert_eq!(&auth[0], &auth[1]);
            prop_assert_eq!(&auth[1], &auth[2]);
            for (u, seen_by_u) in seen.iter().enumerate() {
                for (s, sent_by_s) in sent.iter().enumerate() {
                    let from_s: Vec<&String> = seen_by_u
                        .iter()
                        .filter(|(k, _)| *k == keys[s])
                        .map(|(_, t)| t)
                        .collect();
                    let expected: Vec<&String> = if s == u { Vec::new() } else { sent_by_s.iter().collect() };
                    prop_assert_eq!(from_s, expected, "member {} seeing member {}", u, s);
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum RaceStep {
        UpdateOffline(usize),
        SendOffline(usize),
        Receive(usize),
    }

    fn race_step() -> impl Strategy<Value = RaceStep> {
        prop_oneof![
            (0..3usize).prop_map(RaceStep::UpdateOffline),
            (0..3usize).prop_map(RaceStep::SendOffline),
            (0..3usize).prop_map(RaceStep::Receive),
        ]
    }
}

#[test]
fn a_group_message_goes_out_as_one_enqueue_batch() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let (mut batches, mut singles) = (Vec::new(), 0);
    let (_, outcome) = w.run_full(
        0,
        Command::Send {
            group: "team".into(),
            text: "to both".into(),
        },
        &mut |req| {
            match req {
                RequestBody::EnqueueBatch { recipient_keys, .. } => {
                    batches.push(recipient_keys.len())
                }
                RequestBody::Enqueue { .. } => singles += 1,
                _ => {}
            }
            None
        },
        &mut |_, _| {},
    );
    assert!(
        matches!(
            outcome,
            Ok(Outcome::Sent {
                delivered: 2,
                undelivered: 0,
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_eq!((batches, singles), (vec![2], 0));
    assert_eq!(w.texts(1), vec![pair("team", "to both")]);
    assert_eq!(w.texts(2), vec![pair("team", "to both")]);
}

#[test]
fn a_batch_refused_for_one_full_queue_goes_out_one_by_one() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let mut refused = 0;
    let (events, outcome) = w.run_full(
        0,
        Command::Send {
            group: "team".into(),
            text: "despite a full queue".into(),
        },
        &mut |req| {
            matches!(req, RequestBody::EnqueueBatch { .. }).then(|| {
                refused += 1;
                Err(ServiceError::queue_full("recipient #1's queue is full"))
            })
        },
        &mut |_, _| {},
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { delivered: 2, .. })),
        "{outcome:?} {events:?}"
    );
    assert_eq!(refused, 1);
    assert_eq!(w.texts(1), vec![pair("team", "despite a full queue")]);
    assert_eq!(w.texts(2), vec![pair("team", "despite a full queue")]);
}

// The server's commit fence against a client that merges its own Commit
// when it makes it: the second of two Commits for one epoch is refused,
// the group is not forked for anyone else, and the loser is told once and
// stops resending. (Retrying the change on the new epoch is not built.)
/// Runs `command` for `who` with every enqueue failing (the server out of
/// reach): what it makes stays in the outbox, a Commit pending.
fn run_offline(w: &mut World, who: usize, command: Command) -> Result<Outcome, CommandError> {
    w.run_full(
        who,
        command,
        &mut |req| {
            matches!(
                req,
                RequestBody::Enqueue { .. } | RequestBody::EnqueueBatch { .. }
            )
            .then(|| Err(ServiceError::unavailable("down")))
        },
        &mut |_, _| {},
    )
    .1
}

#[test]
fn a_commit_losing_the_race_for_its_epoch_is_made_again_on_the_winner() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let before = w.machine(0).groups()[0].epoch;
    // Bob updates while the server is out of reach for him: his Commit
    // waits, unmerged.
    let outcome = run_offline(
        &mut w,
        1,
        Command::Update {
            group: Some("team".into()),
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Updated { undelivered: 2, .. })),
        "{outcome:?}"
    );
    assert_eq!(w.machine(1).groups()[0].epoch, before);
    // Alice's update of the same epoch gets there first.
    let (_, outcome) = w.run(
        0,
        Command::Update {
            group: Some("team".into()),
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    // Bob's next command resends his Commit: refused with staleEpoch; he
    // processes Alice's Commit and makes his update again on top of it.
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Event::Warning { .. })),
        "{events:?}"
    );
    assert_eq!(w.machine(1).outbox_len(), 0);
    assert_eq!(w.machine(1).groups()[0].epoch, before + 2);
    // Everyone follows Alice's Commit, then Bob's: one group state.
    w.texts(0);
    w.texts(2);
    same_epoch(&mut w, &[0, 1, 2], "team");
    assert_eq!(w.machine(2).groups()[0].epoch, before + 2);
    send(&mut w, 1, "team", "still one group");
    assert_eq!(w.texts(2), vec![pair("team", "still one group")]);
    assert_eq!(w.texts(0), vec![pair("team", "still one group")]);
}

#[test]
fn pq_groups_are_fenced_too_and_a_losing_commit_is_made_again() {
    let mut w = pq_team();
    let before = w.machine(0).groups()[0].epoch;
    let outcome = run_offline(
        &mut w,
        1,
        Command::Update {
            group: Some("pq".into()),
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    // Alice's Commit goes first; sealed per recipient, it shows its framing
    // so the server can fence it.
    let (_, outcome, sent) = w.run_capturing(
        0,
        Command::Update {
            group: Some("pq".into()),
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(sent.len(), 2);
    let framings: Vec<_> = sent
        .iter()
        .map(|(_, _, p)| {
            assert_eq!(&p[..2], &[0x01, 0x04]);
            crate::protocol::framing::commit_header(p)
                .expect("a fenced Commit")
                .identity
                .to_vec()
        })
        .collect();
    assert_eq!(framings[0], framings[1], "one Commit, one framing");
    // Bob's sealed Commit for the same epoch is refused; he catches up and
    // makes it again.
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(warnings(&events).is_empty(), "{events:?}");
    w.texts(0);
    w.texts(2);
    same_epoch(&mut w, &[0, 1, 2], "pq");
    assert_eq!(w.machine(2).groups()[0].epoch, before + 2);
    send(&mut w, 2, "pq", "one pq group");
    assert_eq!(w.texts(0), vec![pair("pq", "one pq group")]);
    assert_eq!(w.texts(1), vec![pair("pq", "one pq group")]);
}

#[test]
fn a_commit_framing_that_does_not_match_its_content_is_refused() {
    let mut w = pq_team();
    // The server (or a member) swaps the clear framing of Alice's Commit to
    // Carol for the framing of another Commit.
    let mut swapped = false;
    let (_, outcome) = w.run_with(
        0,
        Command::Update {
            group: Some("pq".into()),
        },
        &mut |_, _| {},
    );
    assert!(outcome.is_ok());
    let (carol, conn, channel_id) = (w.key(2), w.users[2].conn, w.channel(2, "pq"));
    let pending = w.call(
        conn,
        RequestBody::Fetch {
            recipient_key: carol,
            channel_id,
            after_seq: 0,
            limit: 10,
        },
    );
    let Ok(Response::Messages { messages, .. }) = pending else {
        panic!("fetch");
    };
    let payload = &messages.last().unwrap().payload;
    let Ok(Envelope::Hybrid {
        framing: Some(mut framing),
        key_id,
        sealed,
    }) = Envelope::decode(payload)
    else {
        panic!("a framed Commit");
    };
    *framing.last_mut().unwrap() ^= 1;
    let forged = Envelope::Hybrid {
        framing: Some(framing),
        key_id,
        sealed,
    }
    .encode();
    let (events, _) = w.run_with(2, Command::Receive { wait_ms: 0 }, &mut |req, reply| {
        if let (RequestBody::Fetch { .. }, Ok(Response::Messages { messages, .. })) = (req, reply) {
            for m in messages.iter_mut() {
                if m.payload == *payload {
                    m.payload = forged.clone();
                    swapped = true;
                }
            }
        }
    });
    assert!(swapped);
    let refused = warnings(&events);
    assert_eq!(refused.len(), 1, "{events:?}");
    assert!(refused[0].contains("commit framing"), "{refused:?}");
}

#[test]
fn a_message_arriving_before_the_commit_of_its_epoch_is_kept_until_it_comes() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let carol = w.key(2);
    // Alice's message and then her update wait in her outbox.
    run_offline(
        &mut w,
        0,
        Command::Send {
            group: "team".into(),
            text: "before".into(),
        },
    )
    .unwrap();
    run_offline(&mut w, 0, Command::Update { group: None }).unwrap();
    // Then only Bob's copies get through (a batch refused for a full
    // queue, then one by one, with Carol's queue out of reach): the server
    // takes Alice's Commit, Carol's copy of it stays behind.
    let (_, outcome) = w.run_full(
        0,
        Command::Receive { wait_ms: 0 },
        &mut |req| match req {
            RequestBody::EnqueueBatch { .. } => Some(Err(ServiceError::queue_full("full"))),
            RequestBody::Enqueue { recipient_key, .. } if *recipient_key == carol => {
                Some(Err(ServiceError::unavailable("down")))
            }
            _ => None,
        },
        &mut |_, _| {},
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(w.machine(0).outbox_len(), 2);
    // Bob follows the Commit and writes in the new epoch: Carol's queue
    // gets his message before Alice's Commit.
    assert_eq!(w.texts(1), vec![pair("team", "before")]);
    send(&mut w, 1, "team", "after");
    w.texts(0);
    // Carol keeps Bob's message until the Commit of its epoch arrives, then
    // shows it: nothing lost, and in the order it was written after.
    assert_eq!(
        w.texts(2),
        vec![pair("team", "before"), pair("team", "after")]
    );
    same_epoch(&mut w, &[0, 1, 2], "team");
}

#[test]
fn messages_after_our_accepted_commit_wait_for_its_lost_answer() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    // The server stores Alice's Commit, but the answer never reaches her:
    // it stays pending in her state.
    let (_, outcome) = w.run_with(
        0,
        Command::Update {
            group: Some("team".into()),
        },
        &mut |req, reply| {
            if matches!(req, RequestBody::EnqueueBatch { .. }) {
                *reply = Err(ServiceError::unavailable("answer lost"));
            }
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    // Bob follows it and writes in the new epoch, and commits again.
    w.texts(1);
    send(&mut w, 1, "team", "new epoch");
    w.run(
        1,
        Command::Update {
            group: Some("team".into()),
        },
    )
    .1
    .unwrap();
    // Alice's next receive: the resent Commit's answer is lost again, and
    // the fetch brings Bob's message and Commit of epochs she has not
    // merged yet. They wait (not skipped, not a warning) ...
    let (events, outcome) = w.run_with(0, Command::Receive { wait_ms: 0 }, &mut |req, reply| {
        if matches!(req, RequestBody::EnqueueBatch { .. }) {
            *reply = Err(ServiceError::unavailable("answer lost"));
        }
    });
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Event::Message { .. })),
        "{events:?}"
    );
    assert!(
        warnings(&events)
            .iter()
            .all(|m| m.starts_with("delivery deferred")),
        "{events:?}"
    );
    // ... until the answer comes: her Commit is merged, then they are read.
    assert_eq!(w.texts(0), vec![pair("team", "new epoch")]);
    w.texts(2);
    same_epoch(&mut w, &[0, 1, 2], "team");
    send(&mut w, 0, "team", "in step");
    assert_eq!(w.texts(1), vec![pair("team", "in step")]);
}

#[test]
fn two_members_making_the_same_change_at_once_make_it_once() {
    // Alice, Bob and Carol in "team"; Dave registered but not in it.
    let mut w = World::new(4);
    for u in 0..4 {
        register(&mut w, u);
    }
    create(&mut w, 0, "team", false);
    add(&mut w, 0, "team", 1);
    add(&mut w, 0, "team", 2);
    w.texts(1);
    w.texts(2);
    let dave = w.key(3);
    let before = w.machine(0).groups()[0].epoch;
    // Bob and Carol both add Dave, each with one of his KeyPackages, while
    // out of reach; Bob's Commit reaches the server first.
    for u in [1, 2] {
        let (_, outcome) = w.run_full(
            u,
            Command::AddMember {
                group: "team".into(),
                member: dave,
            },
            &mut |req| {
                matches!(
                    req,
                    RequestBody::Enqueue { .. } | RequestBody::EnqueueBatch { .. }
                )
                .then(|| Err(ServiceError::unavailable("down")))
            },
            &mut |_, _| {},
        );
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    w.run(1, Command::Receive { wait_ms: 0 }).1.unwrap();
    // Carol's add is refused for its epoch; after catching up she finds
    // Dave added and says so, once, instead of adding him twice.
    let (events, outcome) = w.run(2, Command::Receive { wait_ms: 0 });
    assert!(outcome.is_ok(), "{outcome:?}");
    let said = warnings(&events);
    assert_eq!(said.len(), 1, "{events:?}");
    assert!(said[0].contains("by another member meanwhile"), "{said:?}");
    assert_eq!(w.machine(2).outbox_len(), 0);
    // Dave gets one Welcome (Bob's); everyone is on one epoch.
    let (events, _) = w.run(3, Command::Receive { wait_ms: 0 });
    let joined = events
        .iter()
        .filter(|e| matches!(e, Event::Joined { .. }))
        .count();
    assert_eq!(joined, 1, "{events:?}");
    w.texts(0);
    same_epoch(&mut w, &[0, 1, 2, 3], "team");
    assert_eq!(w.machine(3).groups()[0].epoch, before + 1);
    // Then both remove him at once: one removal, the other is a no-op.
    for u in [1, 2] {
        let outcome = run_offline(
            &mut w,
            u,
            Command::RemoveMember {
                group: "team".into(),
                member: dave,
            },
        );
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    for u in [2, 1, 0] {
        let (events, outcome) = w.run(u, Command::Receive { wait_ms: 0 });
        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(warnings(&events).is_empty(), "{events:?}");
    }
    same_epoch(&mut w, &[0, 1, 2], "team");
    assert_eq!(w.machine(0).groups()[0].epoch, before + 2);
    assert_eq!(w.machine(0).groups()[0].members.len(), 3);
    let (events, _) = w.run(3, Command::Receive { wait_ms: 0 });
    assert!(
        events.iter().any(|e| matches!(e, Event::Removed { .. })),
        "{events:?}"
    );
}

#[test]
fn early_messages_forged_into_a_queue_cannot_grow_the_state_without_bound() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let (bob, channel_id) = (w.key(1), w.channel(1, "team"));
    let epoch = w.machine(1).groups()[0].epoch;
    // A real message of the group, for its cleartext MLS framing.
    let (_, _, sent) = w.run_capturing(
        0,
        Command::Send {
            group: "team".into(),
            text: "real".into(),
        },
    );
    let real = &sent[0].2;
    // 0x01 0x02, mls10, PrivateMessage, then the group id (one-byte length).
    let id_len = usize::from(real[6]);
    let prefix = &real[..7 + id_len];
    let forged = |epoch: u64, len: usize| {
        let mut v = prefix.to_vec();
        v.extend_from_slice(&epoch.to_be_bytes());
        // Application content, no authenticated data, sender data, and a
        // ciphertext of `len` bytes (a minimal variable-length length).
        v.extend_from_slice(&[1, 0, 1, 0xaa]);
        let n = u32::try_from(len).unwrap();
        match n {
            0..64 => v.push(n as u8),
            64..16_384 => v.extend_from_slice(&(n as u16 | 0x4000).to_be_bytes()),
            _ => v.extend_from_slice(&(n | 0x8000_0000).to_be_bytes()),
        }
        v.extend(std::iter::repeat_n(0xbb, len));
        v
    };
    // Whoever can write to Bob's queue (here Alice; the server too) sends
    // bytes that look like messages of the next epoch, 20 of 300 KB, and
    // one of an epoch far ahead.
    let conn = w.users[0].conn;
    let mut payloads: Vec<Vec<u8>> = (0..20).map(|_| forged(epoch + 1, 300_000)).collect();
    payloads.push(forged(epoch + 1_000, 10));
    for (i, payload) in payloads.into_iter().enumerate() {
        let r = w.call(
            conn,
            RequestBody::Enqueue {
                recipient_key: bob,
                channel_id,
                payload,
                message_id: MessageId([i as u8 + 1; 16]),
            },
        );
        assert!(r.is_ok(), "{r:?}");
    }
    let before = w.users[1].saved.len();
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(messages_lenient(&events), vec![pair("team", "real")]);
    // What is kept stays within the bound; the rest is dropped, said once
    // each.
    let grown = w.users[1].saved.len() - before;
    assert!(
        grown <= EARLY_BYTES_MAX + 64 * 1024,
        "state grew by {grown}"
    );
    let dropped = warnings(&events);
    assert_eq!(
        dropped.len(),
        20 - EARLY_BYTES_MAX / 300_000 + 1,
        "{dropped:?}"
    );
    assert!(dropped.last().unwrap().contains("ahead"), "{dropped:?}");
    // The group carries on.
    send(&mut w, 0, "team", "still fine");
    assert_eq!(
        messages_lenient(&w.run(1, Command::Receive { wait_ms: 0 }).0),
        vec![pair("team", "still fine")]
    );
}

#[test]
fn a_message_sent_while_a_change_is_pending_goes_out_after_it() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    run_offline(&mut w, 1, Command::Update { group: None }).unwrap();
    // Queued behind the pending Commit: not made yet, so not sent.
    let outcome = run_offline(
        &mut w,
        1,
        Command::Send {
            group: "team".into(),
            text: "after my update".into(),
        },
    );
    assert!(
        matches!(
            outcome,
            Ok(Outcome::Sent {
                delivered: 0,
                undelivered: 3,
                ..
            })
        ),
        "{outcome:?}"
    );
    // The Commit and the message behind it.
    assert_eq!(w.machine(1).groups()[0].waiting, 2);
    // Carol commits first; Bob's update is made again, then his message.
    let alice = w.key(0);
    let (_, outcome) = w.run(
        2,
        Command::RemoveMember {
            group: "team".into(),
            member: alice,
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(
        !events.iter().any(|e| matches!(e, Event::Warning { .. })),
        "{events:?}"
    );
    assert_eq!(w.machine(1).outbox_len(), 0);
    assert_eq!(w.machine(1).groups()[0].waiting, 0);
    assert_eq!(w.texts(2), vec![pair("team", "after my update")]);
    same_epoch(&mut w, &[1, 2], "team");
    assert_eq!(w.machine(1).groups()[0].members.len(), 2);
    // Alice learns she was removed and sees nothing of the new epochs.
    let (events, _) = w.run(0, Command::Receive { wait_ms: 0 });
    assert!(
        events.iter().any(|e| matches!(e, Event::Removed { .. })),
        "{events:?}"
    );
    assert!(w.machine(0).groups().is_empty());
}

// ----- time, retries and the connection --------------------------------------

const MS: u64 = 1_000;

/// Drains `m`'s effects: requests go to `answer` (with the time), persists
/// to `who`'s saved state, events are collected; returns at `Done` or when
/// the machine waits. `Connect` is answered by `connect`.
fn pump(
    w: &mut World,
    m: &mut ClientMachine,
    who: usize,
    now: Time,
    answer: &mut dyn FnMut(&mut World, Time, &RequestBody) -> Option<Reply>,
    connect: &mut dyn FnMut(Time) -> Result<(), ConnectFailure>,
    events: &mut Vec<Event>,
) -> Option<Result<Outcome, CommandError>> {
    while let Some(effect) = m.poll_effect() {
        match effect {
            Effect::Persist => w.users[who].saved = m.snapshot(),
            Effect::Connect => match connect(now) {
                Ok(()) => m.handle_connected(now),
                Err(f) => m.handle_connect_failed(now, f),
            },
            Effect::Request { token, request } => {
                if let Some(reply) = answer(w, now, &request) {
                    m.handle_response(now, token, reply);
                }
            }
            Effect::Event(e) => events.push(e),
            Effect::Done(outcome) => return Some(outcome),
            Effect::DirectSend { token, .. } => m.handle_direct_answer(now, token, false),
            Effect::DirectAnswer { .. } => {}
        }
    }
    None
}

/// Runs a command to its end on a fake clock that jumps to each deadline;
/// every request goes to `answer`. Returns the events, the outcome and the
/// end time.
fn run_clocked(
    w: &mut World,
    m: &mut ClientMachine,
    who: usize,
    command: Command,
    answer: &mut dyn FnMut(&mut World, Time, &RequestBody) -> Option<Reply>,
) -> (Vec<Event>, Result<Outcome, CommandError>, Time) {
    let mut now = Time::ZERO;
    let mut events = Vec::new();
    m.handle_command(now, command);
    loop {
        if let Some(outcome) = pump(w, m, who, now, answer, &mut |_| Ok(()), &mut events) {
            return (events, outcome, now);
        }
        let at = m.poll_timeout().expect("machine stalled without finishing");
        assert!(at > now, "a deadline in the past: {at:?} at {now:?}");
        now = at;
        m.handle_timeout(now);
    }
}

fn is_enqueue(r: &RequestBody) -> bool {
    matches!(
        r,
        RequestBody::Enqueue { .. }
            | RequestBody::EnqueueBatch { .. }
            | RequestBody::EnqueueMany { .. }
    )
}

/// What draining a long-lived machine's effects gave.
#[derive(Default)]
struct Drained {
    requests: Vec<(u64, RequestBody)>,
    persists: usize,
    done: usize,
}

/// Drains `m`'s effects without answering anything; persists go to
/// `who`'s saved state.
fn drain(w: &mut World, m: &mut ClientMachine, who: usize) -> Drained {
    let mut d = Drained::default();
    while let Some(effect) = m.poll_effect() {
        match effect {
            Effect::Persist => {
                w.users[who].saved = m.snapshot();
                d.persists += 1;
            }
            Effect::Request { token, request } => d.requests.push((token, request)),
            Effect::Done(_) => d.done += 1,
            Effect::Connect
            | Effect::Event(_)
            | Effect::DirectSend { .. }
            | Effect::DirectAnswer { .. } => {}
        }
    }
    d
}

#[test]
fn messages_made_while_a_delivery_is_out_follow_it_in_one_enqueue_many() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let mut m = w.machine(0);
    m.set_link_policy(LinkPolicy::KeepTrying);
    let now = Time::ZERO;
    let send = |m: &mut ClientMachine, text: &str| {
        m.handle_command(
            now,
            Command::Send {
                group: "team".into(),
                text: text.into(),
            },
        );
    };
    send(&mut m, "m0");
    let first = drain(&mut w, &mut m, 0);
    // Written before anything goes out (the shells merge the writes asked
    // for in a row).
    assert!(first.done == 1 && first.persists > 0);
    let [(token, batch)] = &first.requests[..] else {
        panic!("one request: {:?}", first.requests);
    };
    assert!(
        matches!(batch, RequestBody::EnqueueBatch { recipient_keys, .. } if recipient_keys.len() == 2)
    );
    // While it is out, three more messages are made (and written) but wait:
    // each queue has one request in flight.
    for text in ["m1", "m2", "m3"] {
        send(&mut m, text);
        let d = drain(&mut w, &mut m, 0);
        assert!(d.done == 1 && d.persists > 0 && d.requests.is_empty());
    }
    // Its answer sends all three to both members as one request, and asks
    // for no write of its own.
    let reply = w.call(ConnectionId(0), batch.clone());
    m.handle_response(now, *token, reply);
    let second = drain(&mut w, &mut m, 0);
    assert_eq!(second.persists, 0);
    let [(token, many)] = &second.requests[..] else {
        panic!("one request: {:?}", second.requests);
    };
    let RequestBody::EnqueueMany {
        recipient_keys,
        messages,
        ..
    } = many
    else {
        panic!("not an enqueueMany: {many:?}");
    };
    assert_eq!((recipient_keys.len(), messages.len()), (2, 3));
    let reply = w.call(ConnectionId(0), many.clone());
    m.handle_response(now, *token, reply);
    let third = drain(&mut w, &mut m, 0);
    assert_eq!((third.persists, third.requests.len()), (0, 0));
    // The emptied outbox is written within the delay.
    let at = m.poll_timeout().expect("a write is due");
    assert_eq!(at, now.saturating_add(STORED_PERSIST_DELAY));
    m.handle_timeout(at);
    assert_eq!(drain(&mut w, &mut m, 0).persists, 1);
    assert_eq!(m.poll_timeout(), None);
    let pairs: Vec<_> = ["m0", "m1", "m2", "m3"]
        .iter()
        .map(|t| pair("team", t))
        .collect();
    assert_eq!(w.texts(1), pairs);
    assert_eq!(w.texts(2), pairs);
}

#[test]
fn retryable_error_kinds_are_the_transient_ones() {
    for (kind, retry) in [
        (ErrorKind::Unavailable, true),
        (ErrorKind::RateLimited { retry_after_ms: 5 }, true),
        (ErrorKind::QueueFull, true),
        (ErrorKind::Internal, true),
        (ErrorKind::InvalidArgument, false),
        (ErrorKind::Unauthenticated, false),
        (ErrorKind::PermissionDenied, false),
        (ErrorKind::NotFound, false),
        (ErrorKind::PayloadTooLarge, false),
        (ErrorKind::StaleEpoch { current_epoch: 3 }, false),
    ] {
        assert_eq!(kind.is_retryable(), retry, "{kind:?}");
    }
}

#[test]
fn a_failed_delivery_is_retried_with_a_doubling_pause_then_left_for_the_next_command() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let mut m = w.machine(0);
    let mut attempts = Vec::new();
    let (events, outcome, _) = run_clocked(
        &mut w,
        &mut m,
        0,
        Command::Send {
            group: "team".into(),
            text: "patience".into(),
        },
        &mut |w, now, req| {
            if is_enqueue(req) {
                attempts.push(now.as_micros() / MS);
                return Some(Err(ServiceError::unavailable("overloaded")));
            }
            Some(w.call(ConnectionId(0), req.clone()))
        },
    );
    // One attempt, then pauses of 100, 200, 400 and 800 ms.
    assert_eq!(attempts, vec![0, 100, 300, 700, 1500]);
    assert!(
        matches!(outcome, Ok(Outcome::Sent { undelivered: 2, .. })),
        "{outcome:?}"
    );
    assert_eq!(warnings(&events).len(), 1, "{events:?}");
    // The next command delivers it at once.
    assert_eq!(w.texts(1), Vec::<(String, String)>::new());
    send(&mut w, 0, "team", "and now");
    assert_eq!(
        w.texts(1),
        vec![pair("team", "patience"), pair("team", "and now")]
    );
}

#[test]
fn a_rate_limited_delivery_waits_for_the_servers_hint_within_the_cap() {
    let mut w = team();
    let mut m = w.machine(0);
    let mut attempts = Vec::new();
    let (_, outcome, _) = run_clocked(
        &mut w,
        &mut m,
        0,
        Command::Send {
            group: "team".into(),
            text: "slowly".into(),
        },
        &mut |w, now, req| {
            if is_enqueue(req) {
                attempts.push(now.as_micros() / MS);
                // The hint: 2 s, then 60 s (more than the cap).
                let hint = if attempts.len() == 1 { 2_000 } else { 60_000 };
                if attempts.len() < 3 {
                    return Some(Err(ServiceError::rate_limited(hint, "slow down")));
                }
            }
            Some(w.call(ConnectionId(0), req.clone()))
        },
    );
    assert!(
        matches!(outcome, Ok(Outcome::Sent { undelivered: 0, .. })),
        "{outcome:?}"
    );
    let cap = RETRY_BACKOFF_MAX.as_millis() as u64;
    assert_eq!(attempts, vec![0, 2_000, 2_000 + cap]);
}

#[test]
fn a_spurious_or_early_timeout_does_nothing() {
    let mut w = team();
    let mut m = w.machine(0);
    m.handle_timeout(Time::ZERO);
    assert_eq!(m.poll_effect(), None);
    assert_eq!(m.poll_timeout(), None);
    // A delivery waiting for its retry: an early timeout sends nothing.
    let mut events = Vec::new();
    m.handle_command(
        Time::ZERO,
        Command::Send {
            group: "team".into(),
            text: "x".into(),
        },
    );
    let done = pump(
        &mut w,
        &mut m,
        0,
        Time::ZERO,
        &mut |w, _, req| {
            if is_enqueue(req) {
                return Some(Err(ServiceError::unavailable("down")));
            }
            Some(w.call(ConnectionId(0), req.clone()))
        },
        &mut |_| Ok(()),
        &mut events,
    );
    assert_eq!(done, None);
    let at = m.poll_timeout().expect("a retry is due later");
    assert_eq!(at, Time::from_millis(100));
    m.handle_timeout(Time::from_millis(99));
    assert_eq!(m.poll_effect(), None);
    m.handle_timeout(Time::from_millis(100));
    assert!(matches!(
        m.poll_effect(),
        Some(Effect::Request { request, .. }) if is_enqueue(&request)
    ));
}

#[test]
fn one_shot_unreachable_server_fails_fast_and_keeps_what_was_asked() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let unreachable = |_| {
        Err(ConnectFailure {
            reason: "no answer".into(),
            permanent: false,
        })
    };
    // A command that needs an answer fails at once.
    let mut m = w.offline_machine(0);
    let mut events = Vec::new();
    m.handle_command(Time::ZERO, Command::Register { count: 3 });
    let done = pump(
        &mut w,
        &mut m,
        0,
        Time::ZERO,
        &mut |_, _, _| panic!("nothing is sent"),
        &mut { unreachable },
        &mut events,
    );
    assert!(
        matches!(&done, Some(Err(CommandError::Server(e))) if e.kind == ErrorKind::Unavailable),
        "{done:?}"
    );
    assert!(events.contains(&Event::Disconnected {
        reason: "no answer".into(),
        permanent: false
    }));
    // A message is kept for later: the command ends without waiting.
    let mut m = w.offline_machine(0);
    let mut events = Vec::new();
    m.handle_command(
        Time::ZERO,
        Command::Send {
            group: "team".into(),
            text: "queued offline".into(),
        },
    );
    let done = pump(
        &mut w,
        &mut m,
        0,
        Time::ZERO,
        &mut |_, _, _| panic!("nothing is sent"),
        &mut { unreachable },
        &mut events,
    );
    assert!(
        matches!(
            done,
            Some(Ok(Outcome::Sent {
                delivered: 0,
                undelivered: 2,
                ..
            }))
        ),
        "{done:?}"
    );
    assert_eq!(m.poll_timeout(), None, "nothing is retried after giving up");
    // The next command, with the server back, sends it first.
    send(&mut w, 0, "team", "back online");
    assert_eq!(
        w.texts(2),
        vec![pair("team", "queued offline"), pair("team", "back online")]
    );
}

#[test]
fn keep_trying_reconnects_with_a_doubling_pause_and_then_sends_what_waited() {
    let mut w = team();
    w.texts(1);
    let mut m = w.offline_machine(0);
    m.set_link_policy(LinkPolicy::KeepTrying);
    let mut events = Vec::new();
    let mut connects = Vec::new();
    m.handle_command(
        Time::ZERO,
        Command::Send {
            group: "team".into(),
            text: "eventually".into(),
        },
    );
    let mut now = Time::ZERO;
    let mut sent = 0;
    let mut outcome = None;
    // Three failed attempts, then the server is back.
    while sent == 0 {
        let done = pump(
            &mut w,
            &mut m,
            0,
            now,
            &mut |w, _, req| {
                sent += usize::from(is_enqueue(req));
                Some(w.call(ConnectionId(0), req.clone()))
            },
            &mut |t| {
                connects.push(t.as_micros() / MS);
                if connects.len() <= 3 {
                    Err(ConnectFailure {
                        reason: "refused".into(),
                        permanent: false,
                    })
                } else {
                    Ok(())
                }
            },
            &mut events,
        );
        outcome = outcome.or(done);
        if sent > 0 {
            break;
        }
        now = m.poll_timeout().expect("a reconnect is due");
        m.handle_timeout(now);
    }
    // Attempts at 0, then after 250, 500 and 1000 ms.
    assert_eq!(connects, vec![0, 250, 750, 1750]);
    assert!(matches!(
        events.first(),
        Some(Event::Reconnecting {
            retry_in_ms: 250,
            ..
        })
    ));
    // The send ended once its message was queued; the delivery followed.
    assert!(
        matches!(outcome, Some(Ok(Outcome::Sent { .. }))),
        "{outcome:?}"
    );
    assert!(events.contains(&Event::Connected));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Delivered { group, .. } if group == "team")),
        "{events:?}"
    );
    assert_eq!(w.texts(1), vec![pair("team", "eventually")]);
}

#[test]
fn a_permanent_connect_failure_stops_retrying_until_the_next_command() {
    let mut w = team();
    let mut m = w.offline_machine(0);
    m.set_link_policy(LinkPolicy::KeepTrying);
    let mut events = Vec::new();
    m.handle_command(Time::ZERO, Command::Register { count: 3 });
    let done = pump(
        &mut w,
        &mut m,
        0,
        Time::ZERO,
        &mut |_, _, _| panic!("nothing is sent"),
        &mut |_| {
            Err(ConnectFailure {
                reason: "certificate mismatch".into(),
                permanent: true,
            })
        },
        &mut events,
    );
    assert!(
        matches!(done, Some(Err(CommandError::Server(_)))),
        "{done:?}"
    );
    assert!(events.contains(&Event::Disconnected {
        reason: "certificate mismatch".into(),
        permanent: true
    }));
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn a_lost_connection_makes_its_requests_again_on_the_next() {
    let mut w = team();
    let mut m = w.machine(0);
    m.handle_command(Time::ZERO, Command::Register { count: 3 });
    let Some(Effect::Request { request: first, .. }) = m.poll_effect() else {
        panic!("a request");
    };
    // The connection breaks before the answer: the machine asks for a new
    // one and makes the same request on it.
    m.handle_disconnected(Time::ZERO, "gone");
    let mut rest = Vec::new();
    while let Some(e) = m.poll_effect() {
        rest.push(e);
    }
    assert!(rest.contains(&Effect::Connect), "{rest:?}");
    m.handle_connected(Time::ZERO);
    let mut again = Vec::new();
    while let Some(e) = m.poll_effect() {
        if let Effect::Request { request, .. } = e {
            again.push(request);
        }
    }
    assert!(again.contains(&first), "{again:?}");
}

#[test]
fn a_listening_machine_shows_messages_as_they_arrive_and_acknowledges_after_persisting() {
    let mut w = team();
    w.texts(1);
    send(&mut w, 0, "team", "pushed");
    let mut m = w.machine(1);
    m.set_link_policy(LinkPolicy::KeepTrying);
    m.handle_listen(Time::ZERO, true);
    let Some(Effect::Request { token, request }) = m.poll_effect() else {
        panic!("the long-poll");
    };
    let RequestBody::FetchWaitChannels {
        cursors,
        timeout_ms,
        ..
    } = &request
    else {
        panic!("a fetchWaitChannels: {request:?}");
    };
    assert_eq!(*timeout_ms, LISTEN_WAIT_MS);
    assert_eq!(cursors.len(), 2, "the invitations channel and the group's");
    let reply = w.call(ConnectionId(1), request.clone());
    m.handle_response(Time::ZERO, token, reply);
    let effects: Vec<Effect> = std::iter::from_fn(|| m.poll_effect()).collect();
    let persist = effects
        .iter()
        .position(|e| *e == Effect::Persist)
        .expect("persisted");
    let shown = effects
        .iter()
        .position(|e| matches!(e, Effect::Event(Event::Message { text, .. }) if text == "pushed"))
        .expect("shown");
    let next = effects
        .iter()
        .position(|e| {
            matches!(
                e,
                Effect::Request {
                    request: RequestBody::FetchWaitChannels { .. },
                    ..
                }
            )
        })
        .expect("the next long-poll");
    assert!(persist < shown && persist < next, "{effects:?}");
    // The next long-poll acknowledges what was shown; no command ran, so
    // nothing is Done.
    let Effect::Request {
        request: RequestBody::FetchWaitChannels { cursors: after, .. },
        ..
    } = &effects[next]
    else {
        unreachable!()
    };
    assert!(after.iter().any(|(_, seq)| *seq > 0), "{after:?}");
    assert!(!effects.iter().any(|e| matches!(e, Effect::Done(_))));
    // A failed long-poll is tried again after a pause.
    let Effect::Request { token, .. } = &effects[next] else {
        unreachable!()
    };
    m.handle_response(
        Time::ZERO,
        *token,
        Err(ServiceError::unavailable("restarting")),
    );
    assert_eq!(m.poll_timeout(), Some(Time::from_millis(100)));
    m.handle_timeout(Time::from_millis(100));
    assert!(matches!(
        m.poll_effect(),
        Some(Effect::Request {
            request: RequestBody::FetchWaitChannels { .. },
            ..
        })
    ));
}

#[test]
fn under_keep_trying_a_send_ends_when_queued_and_delivered_follows() {
    let mut w = team();
    let mut m = w.machine(0);
    m.set_link_policy(LinkPolicy::KeepTrying);
    m.handle_command(
        Time::ZERO,
        Command::Send {
            group: "team".into(),
            text: "async".into(),
        },
    );
    let mut held = Vec::new();
    let mut done = None;
    while let Some(e) = m.poll_effect() {
        match e {
            Effect::Request { token, request } => held.push((token, request)),
            Effect::Done(r) => done = Some(r),
            _ => {}
        }
    }
    assert!(
        matches!(done, Some(Ok(Outcome::Sent { delivered: 0, .. }))),
        "{done:?}"
    );
    let mut events = Vec::new();
    for (token, request) in held {
        let reply = w.call(ConnectionId(0), request);
        m.handle_response(Time::ZERO, token, reply);
        while let Some(e) = m.poll_effect() {
            if let Effect::Event(e) = e {
                events.push(e);
            }
        }
    }
    let delivered: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Delivered { .. }))
        .collect();
    assert_eq!(delivered.len(), 1, "{events:?}");
}

#[test]
fn a_waiting_receive_ends_when_the_server_is_unreachable() {
    let mut w = team();
    let mut m = w.offline_machine(1);
    let mut events = Vec::new();
    m.handle_command(Time::ZERO, Command::Receive { wait_ms: 1_000 });
    // The fetches fail, then the wait it makes once nothing was shown
    // fails too, at once: the command ends instead of stalling.
    let done = pump(
        &mut w,
        &mut m,
        1,
        Time::ZERO,
        &mut |_, _, _| panic!("nothing is sent"),
        &mut |_| {
            Err(ConnectFailure {
                reason: "down".into(),
                permanent: false,
            })
        },
        &mut events,
    );
    assert_eq!(done, Some(Ok(Outcome::Received { messages: 0 })));
}

#[test]
fn a_message_carries_its_seq_and_the_senders_clock() {
    let mut w = team();
    w.texts(1);
    // The machine's clock is wall-clock time.
    let sent_at = Time::from_millis(1_765_000_000_000);
    let mut m = w.machine(0);
    let (_, outcome, _) = run_clocked_from(
        &mut w,
        &mut m,
        0,
        sent_at,
        Command::Send {
            group: "team".into(),
            text: "stamped".into(),
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    let shown: Vec<(u64, Option<u64>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message {
                seq, sent_at_ms, ..
            } => Some((*seq, *sent_at_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(shown.len(), 1, "{events:?}");
    assert!(shown[0].0 > 0);
    assert_eq!(shown[0].1, Some(1_765_000_000_000));
}

/// Runs a command to its end with the real server answering, starting at
/// `start` on a fake clock.
fn run_clocked_from(
    w: &mut World,
    m: &mut ClientMachine,
    who: usize,
    start: Time,
    command: Command,
) -> (Vec<Event>, Result<Outcome, CommandError>, Time) {
    let conn = w.users[who].conn;
    let mut now = start;
    let mut events = Vec::new();
    m.handle_command(now, command);
    loop {
        let answer =
            &mut |w: &mut World, _: Time, req: &RequestBody| Some(w.call(conn, req.clone()));
        if let Some(outcome) = pump(w, m, who, now, answer, &mut |_| Ok(()), &mut events) {
            return (events, outcome, now);
        }
        now = m.poll_timeout().expect("machine stalled without finishing");
        m.handle_timeout(now);
    }
}

#[test]
fn typed_content_arrives_with_its_ids_and_a_queued_text_of_an_earlier_version_still_goes() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let sent = |w: &mut World, who: usize, content: Content| match w.run(
        who,
        Command::SendContent {
            group: "team".into(),
            content,
        },
    ) {
        (_, Ok(Outcome::Sent { id, .. })) => id,
        other => panic!("{other:?}"),
    };
    let hello = sent(&mut w, 0, Content::text("hello"));
    let reply = sent(
        &mut w,
        1,
        Content::Text {
            text: "hi".into(),
            reply_to: Some(hello),
        },
    );
    assert_ne!(hello, reply);
    let file = Attachment {
        media_type: "text/plain".into(),
        name: "notes.txt".into(),
        data: b"some notes".to_vec(),
    };
    let filed = sent(
        &mut w,
        0,
        Content::Attachment {
            attachment: file.clone(),
            reply_to: Some(reply),
        },
    );
    sent(
        &mut w,
        0,
        Content::Edit {
            target: hello,
            text: "hello!".into(),
        },
    );
    sent(&mut w, 0, Content::Delete { target: filed });
    let (alice, bob) = (w.key(0), w.key(1));
    let (events, outcome) = w.run(2, Command::Receive { wait_ms: 0 });
    outcome.unwrap();
    let shown: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message {
                sender,
                text,
                id,
                reply_to,
                attachment,
                sent_at_ms,
                ..
            } => {
                assert!(sent_at_ms.is_some());
                Some(format!(
                    "{} {text} {:?} {:?} {:?}",
                    u8::from(sender == bob),
                    id.map(|i| i == hello || i == reply || i == filed),
                    reply_to.map(|r| (r == hello, r == reply)),
                    attachment.map(|a| a == file)
                ))
            }
            Event::Edited {
                sender,
                target,
                text,
                ..
            } => Some(format!(
                "edit {} {} {text}",
                sender == alice,
                target == hello
            )),
            Event::Deleted { sender, target, .. } => {
                Some(format!("delete {} {}", sender == alice, target == filed))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        shown,
        [
            "0 hello Some(true) None None",
            "1 hi Some(true) Some((true, false)) None",
            "0 notes.txt Some(true) Some((false, true)) Some(true)",
            "edit true true hello!",
            "delete true true",
        ]
    );
    // Content that cannot be sent is refused before anything is queued.
    let (_, outcome) = w.run(
        0,
        Command::SendContent {
            group: "team".into(),
            content: Content::Attachment {
                attachment: Attachment {
                    media_type: "no type".into(),
                    name: "x".into(),
                    data: vec![1],
                },
                reply_to: None,
            },
        },
    );
    assert!(
        matches!(
            outcome,
            Err(CommandError::Content(ContentError::MediaType(_)))
        ),
        "{outcome:?}"
    );
    // A text an earlier version queued (`Change::Text`, persisted before
    // it was made) goes out as a text with an id of its own.
    let mut m = w.machine(0);
    let channel = m.groups()[0].channel_id;
    m.groups
        .by_channel_mut(channel)
        .unwrap()
        .queue
        .push(Change::Text("queued before".into()));
    w.users[0].saved = m.snapshot();
    send(&mut w, 0, "team", "after");
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    let texts: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message { text, id, .. } => Some((text.as_str(), id.is_some())),
            _ => None,
        })
        .collect();
    assert_eq!(
        texts[texts.len() - 2..],
        [("queued before", true), ("after", true)],
        "{events:?}"
    );
}

#[test]
fn key_packages_carry_grease_in_every_capabilities_list_and_still_validate() {
    let mut w = World::new(2);
    register(&mut w, 0);
    register(&mut w, 1);
    let bob = w.key(1);
    for suite in CIPHERSUITES {
        let package = match w.call(
            w.users[0].conn,
            RequestBody::FetchKeyPackage {
                identity_key: bob,
                cipher_suite: key_package_pool(suite),
            },
        ) {
            Ok(Response::KeyPackage { package, .. }) => package,
            other => panic!("{other:?}"),
        };
        let m = w.machine(0);
        let kp = m
            .validate_key_package(bob, &package, suite)
            .expect("another qpq takes it");
        let caps = kp.leaf_node().capabilities();
        assert!(caps.ciphersuites().iter().any(|c| c.is_grease()));
        assert!(caps.extensions().iter().any(|e| e.is_grease()));
        assert!(caps.proposals().iter().any(|p| p.is_grease()));
        assert!(caps.credentials().iter().any(|c| c.is_grease()));
    }
    // And groups form with such leaves, in both suites.
    for (name, pq) in [("plain", false), ("pq", true)] {
        create(&mut w, 0, name, pq);
        add(&mut w, 0, name, 1);
    }
    w.texts(1);
    send(&mut w, 1, "pq", "greased");
    assert_eq!(w.texts(0), vec![pair("pq", "greased")]);
}

/// A state file from before the MLS storage kept its values in binary
/// (vendor/README.md): Alice's, with the values as JSON, written by the
/// previous version from `team()` plus a pq group with Bob, a message, an
/// update by Bob in "team" and one by Alice in "pq". It restores, every
/// group reads as it was (the safety numbers are the ones that version
/// showed), and the groups go on: messages and Commits over entries of
/// both forms.
#[test]
fn a_state_whose_mls_values_are_json_restores_and_carries_on() {
    const LEGACY: &[u8] = include_bytes!("fixtures/state-v4-json.bin");
    let p = state::Persisted::decode(LEGACY).unwrap();
    assert!(
        p.mls_storage.iter().all(|(_, v)| v.first() != Some(&0xC1)),
        "the fixture is all JSON"
    );
    let mut w = World::new(3);
    w.users[0].saved = LEGACY.to_vec();
    let m = w.machine(0);
    let bob = w.key(1);
    let carol = w.key(2);
    let alice = m.identity_key();
    let groups = m.groups();
    let team = groups.iter().find(|g| g.name == "team").unwrap();
    assert_eq!(team.members, vec![alice, bob, carol]);
    let pq = groups.iter().find(|g| g.name == "pq").unwrap();
    assert!(pq.pq);
    assert_eq!(pq.members, vec![alice, bob]);
    let team_number = m.safety_number("team").unwrap();
    assert_eq!(team_number.epoch, 3);
    assert_eq!(
        team_number.digits,
        "283565610996045387976568781074169669680438187552518007496669"
    );
    let pq_number = m.safety_number("pq").unwrap();
    assert_eq!(pq_number.epoch, 2);
    assert_eq!(
        pq_number.digits,
        "461299453636493275591997721930361456190628398374571684763084"
    );

    // Messages and Commits on the restored groups (Bob and Carol here are
    // fresh: the server of this world never saw the groups).
    for group in ["team", "pq"] {
        let (_, r) = w.run(
            0,
            Command::Send {
                group: group.into(),
                text: "after the upgrade".into(),
            },
        );
        assert!(matches!(r, Ok(Outcome::Sent { .. })), "{r:?}");
        let (_, r) = w.run(
            0,
            Command::Update {
                group: Some(group.into()),
            },
        );
        assert!(r.is_ok(), "{r:?}");
    }
    let m = w.machine(0);
    assert_eq!(m.safety_number("team").unwrap().epoch, 4);
    assert_eq!(m.safety_number("pq").unwrap().epoch, 3);
    let p = state::Persisted::decode(&w.users[0].saved).unwrap();
    let binary = p
        .mls_storage
        .iter()
        .filter(|(_, v)| v.first() == Some(&0xC1))
        .count();
    assert!(binary > 0 && binary < p.mls_storage.len(), "{binary}");
}

/// A message made several epochs back still decrypts, and shows its
/// sender, in both suites: the member lists of past epochs are kept without
/// their HPKE keys (vendor/README.md, change 2), which only a sender check
/// reads. Bob sends before he has seen two of Alice's updates and one of
/// Carol's; Carol reads all three Commits first, then his message.
#[test]
fn a_message_from_three_epochs_back_decrypts_with_its_sender_in_both_suites() {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    let bob = w.key(1);
    for (group, pq) in [("plain", false), ("pq", true)] {
        create(&mut w, 0, group, pq);
        add(&mut w, 0, group, 1);
        add(&mut w, 0, group, 2);
        w.texts(1);
        w.texts(2);
        let before = w.machine(1).safety_number(group).unwrap().epoch;
        for who in [0, 0, 2] {
            let (_, r) = w.run(
                who,
                Command::Update {
                    group: Some(group.into()),
                },
            );
            assert!(r.is_ok(), "{r:?}");
            if who == 0 {
                w.texts(2);
            }
        }
        // Bob has not read the Commits: his message is of the old epoch.
        send(&mut w, 1, group, "from three epochs back");
        assert_eq!(w.machine(1).safety_number(group).unwrap().epoch, before);
        let (events, outcome) = w.run(2, Command::Receive { wait_ms: 0 });
        outcome.unwrap();
        let late: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message {
                    group: g,
                    sender,
                    text,
                    ..
                } => Some((g.clone(), *sender, text.clone())),
                Event::Warning { message } => panic!("warning: {message}"),
                _ => None,
            })
            .collect();
        assert_eq!(
            late,
            [(group.to_owned(), bob, "from three epochs back".to_owned())]
        );
        assert_eq!(w.machine(2).safety_number(group).unwrap().epoch, before + 3);
        // And Bob catches up and is understood in the new epoch.
        w.texts(1);
        send(&mut w, 1, group, "caught up");
        assert_eq!(
            w.texts(0),
            vec![
                pair(group, "from three epochs back"),
                pair(group, "caught up")
            ]
        );
    }
}
