//! Every screen driven through its accessibility tree (egui_kittest, no
//! window): type into labelled fields, click buttons by their text, and
//! check what the app asks of the session and what it shows.

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use quicproquo_core::client::{Event, GroupSummary};
use quicproquo_core::types::{ChannelId, IdentityKey};
use quicproquo_gui::app::QpqApp;
use quicproquo_gui::bridge::{Bridge, Request};
use quicproquo_gui::model::{Screen, Update};
use tokio::sync::mpsc::UnboundedReceiver;

/// The app on `screen` in a harness, and what it asks of the session.
fn harness(screen: Screen) -> (Harness<'static, QpqApp>, UnboundedReceiver<Request>) {
    let (bridge, requests, _updates) = Bridge::detached();
    let app = QpqApp::new(screen, bridge);
    let harness = Harness::builder()
        .with_size(egui::vec2(900.0, 640.0))
        // A long conversation measures its lines over a few frames.
        .with_max_steps(16)
        .build_ui_state(|ui, app: &mut QpqApp| app.draw(ui), app);
    (harness, requests)
}

fn requests(rx: &mut UnboundedReceiver<Request>) -> Vec<Request> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn key(n: u8) -> IdentityKey {
    IdentityKey([n; 32])
}

fn group(name: &str, pq: bool) -> GroupSummary {
    GroupSummary {
        name: name.into(),
        channel_id: ChannelId::DEFAULT,
        epoch: 3,
        members: vec![key(1), key(2)],
        pq,
        waiting: 0,
    }
}

/// Types `text` into the field labelled `label`.
fn type_into(h: &mut Harness<'_, QpqApp>, label: &str, text: &str) {
    h.get_by_label(label).focus();
    h.run();
    h.get_by_label(label).type_text(text);
    h.run();
}

#[test]
fn unlock_sends_the_password_and_refuses_an_empty_one() {
    let (mut h, mut rx) = harness(Screen::Unlock);
    h.run();
    h.get_by_label("Unlock").click();
    h.run();
    assert!(requests(&mut rx).is_empty());
    h.get_by_label("the password is empty");
    type_into(&mut h, "Password", "correct horse");
    h.get_by_label("Unlock").click();
    h.run();
    assert_eq!(
        requests(&mut rx),
        [Request::Open {
            password: "correct horse".into()
        }]
    );
    h.get_by_label("Opening…");
    // A wrong password comes back as a notice; the screen stays.
    h.state_mut().apply(Update::OpenFailed(
        "the state does not open: wrong password?".into(),
    ));
    h.run();
    h.get_by_label("the state does not open: wrong password?");
    h.get_by_label("Unlock");
}

#[test]
fn first_run_checks_the_form_then_asks_to_create() {
    let (mut h, mut rx) = harness(Screen::FirstRun);
    h.run();
    type_into(&mut h, "Password", "Tr0ub4dor&3xyz");
    h.get_by_label("Strength: strong");
    type_into(&mut h, "Repeat password", "something else");
    h.get_by_label("Create identity").click();
    h.run();
    h.get_by_label("the two passwords differ");
    assert!(requests(&mut rx).is_empty());
    let repeat = h.get_by_label("Repeat password");
    repeat.focus();
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.run();
    h.get_by_label("Repeat password")
        .type_text("Tr0ub4dor&3xyz");
    h.run();
    type_into(&mut h, "Server address", "chat.example:7443");
    type_into(&mut h, "Server fingerprint", "ab12");
    h.get_by_label("Create identity").click();
    h.run();
    h.get_by_label("the server fingerprint is 64 hex digits");
    type_into(&mut h, "Server fingerprint", &"cd".repeat(30));
    h.get_by_label("Create identity").click();
    h.run();
    assert_eq!(
        requests(&mut rx),
        [Request::Create {
            password: "Tr0ub4dor&3xyz".into(),
            server: "chat.example:7443".into(),
            fingerprint: format!("ab12{}", "cd".repeat(30)),
        }]
    );
}

#[test]
fn the_main_screen_lists_groups_shows_messages_and_sends() {
    let (mut h, mut rx) = harness(Screen::Unlock);
    h.state_mut().apply(Update::Opened {
        identity: key(1),
        groups: vec![group("team", false), group("secret", true)],
        contacts: vec![("bob".into(), key(2))],
    });
    h.state_mut().apply(Update::Event(Event::Message {
        group: "team".into(),
        sender: key(2),
        sender_name: None,
        text: "hello team".into(),
        seq: 1,
        sent_at_ms: Some(3_600_000 * 13 + 60_000 * 7),
        id: None,
        reply_to: None,
        attachment: None,
    }));
    h.state_mut().apply(Update::Event(Event::Message {
        group: "team".into(),
        sender: key(2),
        sender_name: None,
        text: "are you there?".into(),
        seq: 2,
        sent_at_ms: None,
        id: None,
        reply_to: None,
        attachment: None,
    }));
    h.run();
    // "secret" sorts first and is open; "team" has two unread.
    h.get_by_label("secret [pq]");
    h.get_by_label("team (2 new)").click();
    h.run();
    h.get_by_label("hello team");
    h.get_by_label("bob 13:07");
    h.get_by_label("connecting…");
    type_into(&mut h, "Message", "on my way");
    h.get_by_label("Send").click();
    h.run();
    assert_eq!(
        requests(&mut rx),
        [Request::Send {
            group: "team".into(),
            text: "on my way".into()
        }]
    );
    // Enter sends too.
    type_into(&mut h, "Message", "second");
    h.key_press(egui::Key::Enter);
    h.run();
    assert_eq!(
        requests(&mut rx),
        [Request::Send {
            group: "team".into(),
            text: "second".into()
        }]
    );
    h.state_mut().apply(Update::Sent {
        group: "team".into(),
        text: "second".into(),
        sent_at_ms: 0,
    });
    h.run();
    h.get_by_label_contains("sending");
    h.state_mut().apply(Update::Event(Event::Connected));
    h.run();
    h.get_by_label("connected");
}

#[test]
fn members_and_groups_are_managed_from_the_main_screen() {
    let (mut h, mut rx) = harness(Screen::Unlock);
    h.state_mut().apply(Update::Opened {
        identity: key(1),
        groups: vec![group("team", false)],
        contacts: Vec::new(),
    });
    h.run();
    type_into(&mut h, "Member key", "not a key");
    h.get_by_label("Add member").click();
    h.run();
    h.get_by_label("an identity key is 64 hex digits");
    let bob = "02".repeat(32);
    h.get_by_label("Member key").focus();
    h.run();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.run();
    h.get_by_label("Member key").type_text(&bob);
    h.run();
    h.get_by_label("Add member").click();
    h.run();
    type_into(&mut h, "New group", "ops");
    h.get_by_label("Post-quantum").click();
    h.run();
    h.get_by_label("Create group").click();
    h.run();
    h.get_by_label("Leave group").click();
    h.run();
    h.get_by_label("Update my keys").click();
    h.run();
    assert_eq!(
        requests(&mut rx),
        [
            Request::AddMember {
                group: "team".into(),
                key: bob
            },
            Request::CreateGroup {
                name: "ops".into(),
                pq: true
            },
            Request::Leave {
                group: "team".into()
            },
            Request::UpdateKeys,
        ]
    );
}

#[test]
fn the_members_panel_removes_names_and_shows_the_safety_number() {
    let (mut h, mut rx) = harness(Screen::Unlock);
    h.state_mut().apply(Update::Opened {
        identity: key(1),
        groups: vec![group("team", false)],
        contacts: vec![("bob".into(), key(2))],
    });
    h.state_mut().apply(Update::Event(Event::Message {
        group: "team".into(),
        sender: key(2),
        sender_name: None,
        text: "first".into(),
        seq: 1,
        sent_at_ms: Some(60_000),
        id: None,
        reply_to: None,
        attachment: None,
    }));
    h.run();
    h.get_by_label("Members");
    // A day separator above the day's first message.
    h.get_by_label("1970-01-01");
    h.get_by_label("Remove bob").click();
    h.run();
    h.get_by_label("Name bob").click();
    h.run();
    h.get_by_label("type a contact name first");
    type_into(&mut h, "Contact name", "Bobby");
    h.get_by_label("Name bob").click();
    h.run();
    h.get_by_label("Show safety number").click();
    h.run();
    assert_eq!(
        requests(&mut rx),
        [
            Request::RemoveMember {
                group: "team".into(),
                member: key(2)
            },
            Request::NameContact {
                name: "Bobby".into(),
                key: key(2)
            },
            Request::SafetyNumber {
                group: "team".into()
            },
        ]
    );
    h.state_mut().apply(Update::SafetyNumber {
        group: "team".into(),
        digits: "12345 67890 12345".into(),
    });
    h.state_mut()
        .apply(Update::Contacts(vec![("Bobby".into(), key(2))]));
    h.run();
    h.get_by_label("12345 67890 12345");
    h.get_by_label("Remove Bobby");
    // A member reached over a direct link says so.
    assert!(h.query_by_label("reached directly").is_none());
    h.state_mut().apply(Update::Event(Event::DirectLink {
        peer: key(2),
        peer_name: Some("Bobby".into()),
        up: true,
    }));
    h.run();
    h.get_by_label("reached directly");
    // The QR code of this user's key draws.
    h.get_by_label("My key as QR code").click();
    h.run();
}

#[test]
fn a_long_conversation_draws_only_what_is_in_view() {
    let (mut h, _rx) = harness(Screen::Unlock);
    h.state_mut().apply(Update::Opened {
        identity: key(1),
        groups: vec![group("long", false)],
        contacts: vec![],
    });
    for seq in 1..=10_000u64 {
        h.state_mut().apply(Update::Event(Event::Message {
            group: "long".into(),
            sender: key(2),
            sender_name: None,
            text: format!("message number {seq}"),
            seq,
            sent_at_ms: Some(seq * 60_000),
            id: None,
            reply_to: None,
            attachment: None,
        }));
    }
    // A few frames: the heights of the lines in view are measured, and
    // the view stays at the bottom.
    h.run();
    // The conversation's last line, and the group list's preview of it.
    assert_eq!(h.get_all_by_label("message number 10000").count(), 2);
    assert!(h.query_by_label("message number 1").is_none());
    let drawn = h.query_all_by_label_contains("message number ").count();
    assert!(
        (5..100).contains(&drawn),
        "{drawn} lines in the accessibility tree; only those in view should be"
    );
}

#[test]
fn cjk_emoji_and_unknown_characters_render() {
    let (mut h, _rx) = harness(Screen::Unlock);
    h.state_mut().apply(Update::Opened {
        identity: key(1),
        groups: vec![group("世界", false)],
        contacts: vec![],
    });
    // Chinese, Japanese, Korean, emoji, and a private-use character no
    // font has.
    let text = "你好世界 こんにちは 안녕하세요 😀🎉👍 \u{F0000}";
    h.state_mut().apply(Update::Event(Event::Message {
        group: "世界".into(),
        sender: key(2),
        sender_name: None,
        text: text.into(),
        seq: 1,
        sent_at_ms: None,
        id: None,
        reply_to: None,
        attachment: None,
    }));
    h.run();
    // The group list and the conversation's heading.
    assert_eq!(h.get_all_by_label("世界").count(), 2);
    // The conversation, and the group list's preview of it.
    assert_eq!(h.get_all_by_label(text).count(), 2);
}
