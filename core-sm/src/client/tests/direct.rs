//! Direct links: application messages go to a member whose link is up
//! without a server copy, everything else through the server, and a
//! message that crosses from one path to the other is shown once and in
//! order.

use super::*;
use crate::protocol::DirectMessage;

/// What one send over the links and the server gave.
#[derive(Default)]
struct Log {
    /// The sender's events and outcome.
    events: Vec<Event>,
    outcome: Option<Result<Outcome, CommandError>>,
    /// Every direct message sent, and whether it was taken.
    direct: Vec<(DirectMessage, bool)>,
    /// The recipients of every enqueue the sender made.
    enqueued_to: Vec<IdentityKey>,
    /// Each peer's events, by user.
    peer_events: BTreeMap<usize, Vec<Event>>,
}

/// A member's machine that listens, with its user.
struct Peer {
    who: usize,
    m: ClientMachine,
}

/// Carries out the sender's effects: requests go to the server, direct
/// sends to the peer's machine (whose answer comes back unless
/// `lose_answers`).
fn carry(
    w: &mut World,
    who: usize,
    m: &mut ClientMachine,
    peers: &mut [Peer],
    lose_answers: bool,
    log: &mut Log,
) {
    let from = m.identity_key();
    while let Some(effect) = m.poll_effect() {
        match effect {
            Effect::Persist => w.users[who].saved = m.snapshot(),
            Effect::Connect => m.handle_connected(Time::ZERO),
            Effect::Request { token, request } => {
                if let RequestBody::Enqueue { recipient_key, .. } = &request {
                    log.enqueued_to.push(*recipient_key);
                }
                if let RequestBody::EnqueueBatch { recipient_keys, .. }
                | RequestBody::EnqueueMany { recipient_keys, .. } = &request
                {
                    log.enqueued_to.extend(recipient_keys);
                }
                let reply = w.call(w.users[who].conn, request);
                m.handle_response(Time::ZERO, token, reply);
            }
            Effect::Event(e) => log.events.push(e),
            Effect::Done(outcome) => log.outcome = Some(outcome),
            Effect::DirectSend {
                token,
                peer,
                message,
            } => {
                let p = peers
                    .iter_mut()
                    .find(|p| p.m.identity_key() == peer)
                    .expect("a direct send to a peer whose link is up");
                let events = log.peer_events.entry(p.who).or_default();
                let taken = offer(w, p, from, message.clone(), events);
                log.direct.push((message, taken));
                m.handle_direct_answer(Time::ZERO, token, taken && !lose_answers);
            }
            Effect::DirectAnswer { .. } => panic!("the sender was sent nothing"),
        }
    }
}

/// Hands a direct message to a peer's machine; whether it took it. A
/// taken message's state is written before it is shown and answered.
fn offer(
    w: &mut World,
    p: &mut Peer,
    from: IdentityKey,
    message: DirectMessage,
    events: &mut Vec<Event>,
) -> bool {
    p.m.handle_direct_message(Time::ZERO, 7, from, message);
    let mut persisted = false;
    let mut answer = None;
    while let Some(effect) = p.m.poll_effect() {
        match effect {
            Effect::Persist => {
                w.users[p.who].saved = p.m.snapshot();
                persisted = true;
            }
            Effect::Event(e) => {
                assert!(persisted, "shown before it was written: {e:?}");
                events.push(e);
            }
            Effect::DirectAnswer { token, taken } => {
                assert_eq!(token, 7);
                assert!(!taken || persisted, "answered taken before it was written");
                answer = Some(taken);
            }
            Effect::Request { token, request } => {
                let reply = w.call(w.users[p.who].conn, request);
                p.m.handle_response(Time::ZERO, token, reply);
            }
            other => panic!("unexpected: {other:?}"),
        }
    }
    answer.expect("every direct message is answered")
}

/// Sends `text` from `who` to `group` with direct links up to `peers`.
fn send_with_links(
    w: &mut World,
    who: usize,
    group: &str,
    text: &str,
    peers: &mut [Peer],
    lose_answers: bool,
) -> Log {
    let mut m = w.machine(who);
    let mut log = Log::default();
    for p in peers.iter() {
        m.handle_direct_link(Time::ZERO, p.m.identity_key(), true);
    }
    carry(w, who, &mut m, peers, lose_answers, &mut log);
    m.handle_command(
        Time::ZERO,
        Command::Send {
            group: group.into(),
            text: text.into(),
        },
    );
    carry(w, who, &mut m, peers, lose_answers, &mut log);
    log
}

/// `who`'s machine as saved, to take direct messages.
fn peer(w: &mut World, who: usize) -> Peer {
    Peer {
        who,
        m: w.machine(who),
    }
}

#[test]
fn a_message_to_a_member_with_a_link_goes_only_directly_and_is_shown_once() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let (bob, carol) = (w.key(1), w.key(2));
    let mut peers = [peer(&mut w, 1)];
    let log = send_with_links(&mut w, 0, "team", "hello", &mut peers, false);
    assert!(
        matches!(log.outcome, Some(Ok(Outcome::Sent { undelivered: 0, .. }))),
        "{:?}",
        log.outcome
    );
    // The link came up, and the message was delivered.
    assert!(
        log.events
            .iter()
            .any(|e| matches!(e, Event::DirectLink { peer, up: true, .. } if *peer == bob))
    );
    assert!(
        log.events
            .iter()
            .any(|e| matches!(e, Event::Delivered { .. }))
    );
    // Bob took it directly; only Carol's copy went through the server.
    assert_eq!(log.direct.len(), 1);
    assert!(log.direct[0].1);
    assert_eq!(log.enqueued_to, vec![carol]);
    let shown = &log.peer_events[&1];
    assert!(
        matches!(&shown[..], [Event::Message { text, seq: 0, sender, .. }] if text == "hello" && *sender == w.key(0)),
        "{shown:?}"
    );
    // Nothing waits for Bob on the server; Carol gets hers from it.
    assert_eq!(w.texts(1), vec![]);
    assert_eq!(w.texts(2), vec![pair("team", "hello")]);
}

#[test]
fn a_taken_message_whose_answer_was_lost_comes_through_the_server_and_is_not_shown_again() {
    let mut w = team();
    w.texts(1);
    let mut peers = [peer(&mut w, 1)];
    let log = send_with_links(&mut w, 0, "team", "once", &mut peers, true);
    assert!(log.direct[0].1, "Bob took it");
    // Alice never heard so: Bob's copy went through the server too.
    assert!(log.enqueued_to.contains(&w.key(1)));
    assert_eq!(log.peer_events[&1].len(), 1);
    // Bob's receive skips the server copy: no second message, no warning.
    let (events, outcome) = w.run(1, Command::Receive { wait_ms: 0 });
    outcome.unwrap();
    assert_eq!(messages(&events), vec![]);
    // And the conversation carries on through the server.
    send(&mut w, 0, "team", "next");
    assert_eq!(w.texts(1), vec![pair("team", "next")]);
}

#[test]
fn a_direct_message_behind_an_unfetched_server_copy_is_refused_and_order_holds() {
    let mut w = team();
    w.texts(1);
    // "first" goes through the server (no link); Bob has not fetched it.
    send(&mut w, 0, "team", "first");
    let mut peers = [peer(&mut w, 1)];
    let log = send_with_links(&mut w, 0, "team", "second", &mut peers, false);
    let (message, taken) = &log.direct[0];
    assert!(message.after_seq > 0, "it names the seq of \"first\"");
    assert!(!taken, "Bob has not processed \"first\"");
    assert!(log.peer_events[&1].is_empty());
    // So it went through the server, behind "first".
    assert!(log.enqueued_to.contains(&w.key(1)));
    assert_eq!(
        w.texts(1),
        vec![pair("team", "first"), pair("team", "second")]
    );
    // Once Bob is up to date, the next one is taken directly.
    let mut peers = [peer(&mut w, 1)];
    let log = send_with_links(&mut w, 0, "team", "third", &mut peers, false);
    assert!(log.direct[0].1);
    assert!(!log.enqueued_to.contains(&w.key(1)));
}

#[test]
fn commits_go_through_the_server_and_a_direct_one_is_refused() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let mut bob = peer(&mut w, 1);
    // Alice's self-update with Bob's link up: the Commit goes through the
    // server, never directly.
    let mut m = w.machine(0);
    m.handle_direct_link(Time::ZERO, bob.m.identity_key(), true);
    m.handle_command(
        Time::ZERO,
        Command::Update {
            group: Some("team".into()),
        },
    );
    let mut log = Log::default();
    carry(
        &mut w,
        0,
        &mut m,
        std::slice::from_mut(&mut bob),
        false,
        &mut log,
    );
    assert!(matches!(log.outcome, Some(Ok(_))), "{:?}", log.outcome);
    assert!(log.direct.is_empty());
    assert!(log.enqueued_to.contains(&w.key(1)));
    // The Commit as Bob's queue holds it, offered directly: refused, and
    // Bob's group is unchanged by it.
    let channel = w.channel(1, "team");
    let commit = w.stored(1, channel).pop().expect("the Commit");
    let epoch = w.machine(1).groups()[0].epoch;
    let alice = w.key(0);
    let mut events = Vec::new();
    let taken = offer(
        &mut w,
        &mut bob,
        alice,
        DirectMessage {
            channel,
            message_id: MessageId([1; 16]),
            after_seq: 0,
            payload: commit,
        },
        &mut events,
    );
    assert!(!taken);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(bob.m.groups()[0].epoch, epoch);
}

#[test]
fn a_direct_message_from_a_non_member_or_for_an_unknown_channel_is_refused() {
    let mut w = World::new(4);
    for u in 0..4 {
        register(&mut w, u);
    }
    create(&mut w, 0, "team", false);
    add(&mut w, 0, "team", 1);
    w.texts(1);
    let mut bob = peer(&mut w, 1);
    // Alice sends with a link to Bob; the message is taken.
    let log = send_with_links(
        &mut w,
        0,
        "team",
        "real",
        std::slice::from_mut(&mut bob),
        false,
    );
    let (message, taken) = log.direct[0].clone();
    assert!(taken);
    // Dave, no member, offers a message on the group's channel: refused,
    // whatever it carries (here a copy of a real one).
    let dave = w.key(3);
    let mut events = Vec::new();
    let mut bob = peer(&mut w, 1);
    let fresh = DirectMessage {
        payload: vec![0x01, 0x02, 0, 0],
        ..message.clone()
    };
    assert!(!offer(&mut w, &mut bob, dave, fresh.clone(), &mut events));
    // An unknown channel: refused.
    let elsewhere = DirectMessage {
        channel: ChannelId::try_from_slice(&[9; 16]).unwrap(),
        ..fresh
    };
    let alice = w.key(0);
    assert!(!offer(&mut w, &mut bob, alice, elsewhere, &mut events));
    // The message already taken, offered again (its answer was lost):
    // taken without being shown twice.
    assert!(offer(&mut w, &mut bob, alice, message, &mut events));
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn pq_group_messages_go_directly_sealed_as_through_the_server() {
    let mut w = pq_team();
    w.texts(1);
    w.texts(2);
    let mut peers = [peer(&mut w, 1), peer(&mut w, 2)];
    let log = send_with_links(&mut w, 0, "pq", "sealed", &mut peers, false);
    assert_eq!(log.direct.len(), 2);
    for (m, taken) in &log.direct {
        assert!(taken);
        assert!(matches!(
            Envelope::decode(&m.payload),
            Ok(Envelope::Hybrid { .. })
        ));
    }
    assert!(log.enqueued_to.is_empty());
    for who in [1, 2] {
        assert_eq!(messages(&log.peer_events[&who]), vec![pair("pq", "sealed")]);
    }
}

#[test]
fn a_link_going_down_sends_what_follows_through_the_server() {
    let mut w = team();
    w.texts(1);
    let bob_key = w.key(1);
    let mut m = w.machine(0);
    m.handle_direct_link(Time::ZERO, bob_key, true);
    m.handle_direct_link(Time::ZERO, bob_key, false);
    let events: Vec<Effect> = std::iter::from_fn(|| m.poll_effect()).collect();
    assert!(events.contains(&Effect::Event(Event::DirectLink {
        peer: bob_key,
        peer_name: None,
        up: false
    })));
    assert!(m.direct_links().is_empty());
    let mut log = Log::default();
    m.handle_command(
        Time::ZERO,
        Command::Send {
            group: "team".into(),
            text: "via server".into(),
        },
    );
    carry(&mut w, 0, &mut m, &mut [], false, &mut log);
    assert!(log.direct.is_empty());
    assert_eq!(w.texts(1), vec![pair("team", "via server")]);
    // Members are who may connect.
    let allowed = m.direct_peers_allowed();
    assert!(allowed.contains(&bob_key) && !allowed.contains(&m.identity_key()));
}

#[test]
fn the_direct_state_persists_and_a_version_4_state_restores_without_it() {
    let mut w = team();
    w.texts(1);
    send(&mut w, 0, "team", "recorded");
    // Alice's state records the seq of Bob's copy for the next after_seq.
    let p = state::Persisted::decode(&w.users[0].saved).unwrap();
    assert!(
        p.direct_last_seqs
            .iter()
            .any(|(r, _, seq)| *r == w.key(1).0 && *seq > 0)
    );
    // The same state as version 4 wrote it restores, with nothing direct.
    let old = state::PersistedV4 {
        version: 4,
        identity_seed: p.identity_seed,
        registered: p.registered,
        active: p.active,
        groups: p.groups,
        cursors: p.cursors,
        outbox: Vec::new(),
        next_outbox_id: p.next_outbox_id,
        mls_storage: p.mls_storage,
        hybrid_keys: p.hybrid_keys,
        peer_hybrid_keys: p.peer_hybrid_keys,
        contacts: p.contacts,
    };
    w.users[0].saved = postcard::to_allocvec(&old).unwrap();
    let p = state::Persisted::decode(&w.users[0].saved).unwrap();
    assert_eq!(p.version, STATE_VERSION);
    assert!(p.direct_last_seqs.is_empty() && p.direct_taken.is_empty());
    send(&mut w, 0, "team", "after the upgrade");
    assert_eq!(
        w.texts(1),
        vec![pair("team", "recorded"), pair("team", "after the upgrade")]
    );
}
