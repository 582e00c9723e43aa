//! Who is who and who did what: contacts, the sender's contact name on
//! messages, the membership events of Commits, and safety numbers.

use super::*;

fn add_contact(w: &mut World, who: usize, name: &str, key: IdentityKey) -> Outcome {
    let (events, outcome) = w.run(
        who,
        Command::AddContact {
            name: name.into(),
            key,
        },
    );
    assert!(events.is_empty(), "{events:?}");
    outcome.unwrap()
}

/// The membership events among `events`, in order.
fn membership(events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::MemberAdded { .. }
                    | Event::MemberRemoved { .. }
                    | Event::MemberLeft { .. }
                    | Event::Removed { .. }
            )
        })
        .cloned()
        .collect()
}

#[test]
fn contacts_are_local_persisted_and_restored() {
    let mut w = World::new(3);
    let (bob, carol) = (w.key(1), w.key(2));
    // Local: nothing goes to the server, not even without a connection.
    let mut m = w.offline_machine(0);
    m.handle_command(
        Time::ZERO,
        Command::AddContact {
            name: "bob".into(),
            key: bob,
        },
    );
    let effects: Vec<Effect> = std::iter::from_fn(|| m.poll_effect()).collect();
    let added = Outcome::ContactAdded {
        name: "bob".into(),
        key: bob,
        renamed_from: None,
    };
    assert_eq!(effects, [Effect::Persist, Effect::Done(Ok(added))]);
    assert_eq!(m.poll_timeout(), None);
    w.users[0].saved = m.snapshot();
    // Every later run (a new process) sees it.
    add_contact(&mut w, 0, "carol", carol);
    let m = w.machine(0);
    assert_eq!(
        m.contacts(),
        [("bob".to_owned(), bob), ("carol".to_owned(), carol)]
    );
    assert_eq!(m.contact_name(&bob), Some("bob"));
    // A new name for a key renames it.
    assert_eq!(
        add_contact(&mut w, 0, "robert", bob),
        Outcome::ContactAdded {
            name: "robert".into(),
            key: bob,
            renamed_from: Some("bob".into()),
        }
    );
    assert_eq!(w.machine(0).contact_name(&bob), Some("robert"));
    let (_, outcome) = w.run(
        0,
        Command::RemoveContact {
            name: "carol".into(),
        },
    );
    assert_eq!(
        outcome,
        Ok(Outcome::ContactRemoved {
            name: "carol".into(),
            key: carol,
        })
    );
    let m = w.machine(0);
    assert_eq!(m.contacts(), [("robert".to_owned(), bob)]);
    assert_eq!(m.contact_name(&carol), None);
}

#[test]
fn contact_commands_refuse_bad_names_clashes_and_unknown_names() {
    let mut w = World::new(3);
    let (bob, carol) = (w.key(1), w.key(2));
    add_contact(&mut w, 0, "bob", bob);
    let saved = w.users[0].saved.clone();
    let mut check = |command: Command, error: CommandError| {
        let (events, outcome) = w.run(0, command);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(outcome, Err(error));
        assert_eq!(
            w.users[0].saved, saved,
            "a refused command persists nothing"
        );
    };
    let add = |name: &str, key| Command::AddContact {
        name: name.into(),
        key,
    };
    check(
        add("", carol),
        CommandError::InvalidContactName("must be 1 to 64 bytes".into()),
    );
    check(
        add(&"c".repeat(CONTACT_NAME_BYTES_MAX + 1), carol),
        CommandError::InvalidContactName("must be 1 to 64 bytes".into()),
    );
    check(
        add("car\u{7}ol", carol),
        CommandError::InvalidContactName("must not contain control characters".into()),
    );
    check(add("bob", carol), CommandError::ContactExists("bob".into()));
    check(
        Command::RemoveContact {
            name: "carol".into(),
        },
        CommandError::UnknownContact("carol".into()),
    );
}

#[test]
fn a_snapshot_from_before_contacts_restores_with_none() {
    let mut w = team();
    w.texts(1);
    // Bob's state as layout version 3 wrote it.
    let p = state::Persisted::decode(&w.users[1].saved).unwrap();
    let old = state::PersistedV3 {
        version: 3,
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
    };
    w.users[1].saved = postcard::to_allocvec(&old).unwrap();
    let m = w.machine(1);
    assert!(m.contacts().is_empty());
    assert_eq!(m.groups().len(), 1);
    send(&mut w, 0, "team", "still here");
    assert_eq!(w.texts(1), vec![pair("team", "still here")]);
    let alice = w.key(0);
    add_contact(&mut w, 1, "alice", alice);
    assert_eq!(
        state::Persisted::decode(&w.users[1].saved).unwrap().version,
        STATE_VERSION
    );
}

#[test]
fn a_message_carries_the_senders_contact_name() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let alice = w.key(0);
    add_contact(&mut w, 1, "alice", alice);
    send(&mut w, 0, "team", "hi");
    let names = |events: &[Event]| -> Vec<(IdentityKey, Option<String>)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message {
                    sender,
                    sender_name,
                    ..
                } => Some((*sender, sender_name.clone())),
                _ => None,
            })
            .collect()
    };
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    assert_eq!(names(&events), [(alice, Some("alice".to_owned()))]);
    // Carol has no contact for Alice.
    let (events, _) = w.run(2, Command::Receive { wait_ms: 0 });
    assert_eq!(names(&events), [(alice, None)]);
}

#[test]
fn members_see_who_added_whom() {
    let mut w = World::new(3);
    for u in 0..3 {
        register(&mut w, u);
    }
    let (alice, carol) = (w.key(0), w.key(2));
    create(&mut w, 0, "team", false);
    // Alice's own add is shown once the server took her Commit (`add`
    // checks it).
    add(&mut w, 0, "team", 1);
    w.texts(1);
    add(&mut w, 0, "team", 2);
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    assert_eq!(
        membership(&events),
        [Event::MemberAdded {
            group: "team".into(),
            member: carol,
            by: alice,
        }]
    );
    // The who comes before the epoch, which is shown as before.
    let at = |f: fn(&Event) -> bool| events.iter().position(f).unwrap();
    assert!(
        at(|e| matches!(e, Event::MemberAdded { .. }))
            < at(|e| matches!(e, Event::GroupChanged { members: 3, .. })),
        "{events:?}"
    );
}

#[test]
fn members_see_who_removed_whom_and_the_removed_member_by_whom() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let (alice, carol) = (w.key(0), w.key(2));
    let (events, outcome) = w.run(
        0,
        Command::RemoveMember {
            group: "team".into(),
            member: carol,
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    let removed = Event::MemberRemoved {
        group: "team".into(),
        member: carol,
        by: alice,
    };
    assert_eq!(membership(&events), std::slice::from_ref(&removed));
    let (events, _) = w.run(1, Command::Receive { wait_ms: 0 });
    assert_eq!(membership(&events), [removed]);
    let (events, _) = w.run(2, Command::Receive { wait_ms: 0 });
    assert_eq!(
        membership(&events),
        [Event::Removed {
            group: "team".into(),
            by: alice,
        }]
    );
}

#[test]
fn a_member_who_leaves_is_shown_as_leaving_by_everyone() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    let bob = w.key(1);
    let (_, outcome) = w.run(
        1,
        Command::Leave {
            group: "team".into(),
        },
    );
    assert!(outcome.is_ok(), "{outcome:?}");
    let left = Event::MemberLeft {
        group: "team".into(),
        member: bob,
    };
    // Alice (lowest leaf) commits Bob's proposal; Carol gets her Commit.
    w.texts(2);
    let (events, _) = w.run(0, Command::Receive { wait_ms: 0 });
    assert_eq!(membership(&events), std::slice::from_ref(&left));
    let (events, _) = w.run(2, Command::Receive { wait_ms: 0 });
    assert_eq!(membership(&events), [left]);
}

#[test]
fn safety_numbers_agree_within_an_epoch_and_change_with_it() {
    let mut w = team();
    w.texts(1);
    w.texts(2);
    assert_eq!(w.machine(0).safety_number("nope"), None);
    let numbers = |w: &mut World| -> Vec<SafetyNumber> {
        (0..3)
            .map(|u| w.machine(u).safety_number("team").unwrap())
            .collect()
    };
    let before = numbers(&mut w);
    assert!(before.windows(2).all(|p| p[0] == p[1]), "{before:?}");
    assert_eq!(before[0].digits.len(), 60);
    let (_, outcome) = w.run(1, Command::Update { group: None });
    assert!(outcome.is_ok(), "{outcome:?}");
    // Bob has moved on; Alice has not processed his Commit yet.
    assert_ne!(
        w.machine(1).safety_number("team"),
        w.machine(0).safety_number("team")
    );
    w.texts(0);
    w.texts(2);
    let after = numbers(&mut w);
    assert!(after.windows(2).all(|p| p[0] == p[1]), "{after:?}");
    assert_eq!(after[0].epoch, before[0].epoch + 1);
    assert_ne!(after[0].digits, before[0].digits);
    // It is the epoch authenticator's, as the diagnostics show it.
    let auth = w.machine(2).epoch_authenticator("team").unwrap();
    assert_eq!(after[2], SafetyNumber::derive(after[2].epoch, &auth));
}
