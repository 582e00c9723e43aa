//! The main screens rendered to PNG and compared with the pictures checked
//! in under `tests/snapshots/` (egui_kittest on wgpu, pinned to a CPU
//! adapter: Mesa's lavapipe, Debian package `mesa-vulkan-drivers`). A
//! change to how a screen looks fails here until the pictures are made
//! again with `UPDATE_SNAPSHOTS=1 cargo test -p quicproquo-gui --test
//! snapshots` and looked at. The same pictures illustrate the README.

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use quicproquo_core::client::{Event, GroupSummary};
use quicproquo_core::types::{ChannelId, IdentityKey};
use quicproquo_gui::app::QpqApp;
use quicproquo_gui::bridge::Bridge;
use quicproquo_gui::model::{Screen, Update};

fn harness(screen: Screen) -> Harness<'static, QpqApp> {
    let (bridge, _requests, _updates) = Bridge::detached();
    let app = QpqApp::new(screen, bridge);
    Harness::builder()
        .with_size(egui::vec2(900.0, 640.0))
        .with_max_steps(16)
        .wgpu()
        .build_ui_state(|ui, app: &mut QpqApp| app.draw(ui), app)
}

fn key(n: u8) -> IdentityKey {
    IdentityKey([n; 32])
}

fn type_into(h: &mut Harness<'_, QpqApp>, label: &str, text: &str) {
    h.get_by_label(label).focus();
    h.run();
    h.get_by_label(label).type_text(text);
    h.run();
}

/// 2026-12-06 09:41 UTC, and `minutes` after.
fn at(minutes: u64) -> Option<u64> {
    Some(1_796_549_660_000 + minutes * 60_000)
}

fn message(h: &mut Harness<'_, QpqApp>, sender: u8, text: &str, seq: u64, minutes: u64) {
    h.state_mut().apply(Update::Event(Event::Message {
        group: "team".into(),
        sender: key(sender),
        sender_name: None,
        text: text.into(),
        seq,
        sent_at_ms: at(minutes),
    }));
}

/// Alice's window in the middle of a conversation.
fn conversation() -> Harness<'static, QpqApp> {
    let mut h = harness(Screen::Unlock);
    let group = |name: &str, pq: bool, members: Vec<IdentityKey>| GroupSummary {
        name: name.into(),
        channel_id: ChannelId::DEFAULT,
        epoch: 4,
        members,
        pq,
        waiting: 0,
    };
    h.state_mut().apply(Update::Opened {
        identity: key(1),
        groups: vec![
            group("team", false, vec![key(1), key(2), key(3)]),
            group("lab", true, vec![key(1), key(2)]),
        ],
        contacts: vec![("bob".into(), key(2)), ("carol".into(), key(3))],
    });
    h.state_mut().model.select("team");
    h.state_mut().apply(Update::Event(Event::MemberAdded {
        group: "team".into(),
        member: key(2),
        by: key(1),
    }));
    h.state_mut().apply(Update::Event(Event::MemberAdded {
        group: "team".into(),
        member: key(3),
        by: key(1),
    }));
    message(&mut h, 2, "Morning! Is the demo still at ten?", 1, 0);
    message(&mut h, 3, "Yes — I booked the big room 🎉", 2, 2);
    message(&mut h, 2, "会议室在三楼。 회의실은 3층입니다.", 3, 3);
    h.state_mut().apply(Update::Sent {
        group: "team".into(),
        text: "Great, see you there. I'll bring the slides and the test phones; \
               long messages wrap inside the conversation instead of running off the edge."
            .into(),
        sent_at_ms: at(4).unwrap(),
    });
    h.state_mut().apply(Update::Sent {
        group: "team".into(),
        text: "Stored on the server already?".into(),
        sent_at_ms: at(4).unwrap(),
    });
    h.state_mut().apply(Update::Event(Event::Delivered {
        group: "team".into(),
        message_id: [0; 16],
    }));
    h.state_mut().apply(Update::Event(Event::Message {
        group: "lab".into(),
        sender: key(2),
        sender_name: None,
        text: "new results are in".into(),
        seq: 1,
        sent_at_ms: at(5),
    }));
    h.state_mut().apply(Update::SafetyNumber {
        group: "team".into(),
        digits: "48213 09921 55270 18834 60027 73391".into(),
    });
    h.state_mut().apply(Update::Registered);
    h.state_mut().apply(Update::Event(Event::Connected));
    h.run();
    h
}

#[test]
fn first_run() {
    let mut h = harness(Screen::FirstRun);
    h.run();
    type_into(&mut h, "Password", "correct horse battery");
    type_into(&mut h, "Repeat password", "correct horse battery");
    type_into(&mut h, "Server address", "chat.example.org:7443");
    type_into(&mut h, "Server fingerprint", &"3f".repeat(32));
    h.snapshot("first_run");
}

#[test]
fn unlock() {
    let mut h = harness(Screen::Unlock);
    h.run();
    type_into(&mut h, "Password", "secret");
    h.snapshot("unlock");
}

#[test]
fn main_screen() {
    let mut h = conversation();
    h.snapshot("main");
}

#[test]
fn own_key_as_qr_code() {
    let mut h = conversation();
    h.get_by_label("My key as QR code").click();
    h.run();
    h.snapshot("qr");
}
