//! The main screens rendered to PNG and compared with the pictures checked
//! in under `tests/snapshots/` (egui_kittest on wgpu, pinned to Mesa's
//! lavapipe, the CPU Vulkan driver of Debian's `mesa-vulkan-drivers`, so
//! every machine draws the same pixels). A change to how a screen looks
//! fails here until the pictures are made again with `UPDATE_SNAPSHOTS=1
//! cargo test -p quicproquo-gui --test snapshots` and looked at. The same
//! pictures illustrate the README.
//!
//! Without lavapipe these tests say so on stderr and check nothing, unless
//! `QPQ_GUI_TESTS=require` (which `.ci/run` sets after installing it): then
//! they fail.

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use quicproquo_core::client::{Event, GroupSummary};
use quicproquo_core::types::{ChannelId, IdentityKey};
use quicproquo_gui::app::QpqApp;
use quicproquo_gui::bridge::Bridge;
use quicproquo_gui::model::{Screen, Update};

/// Whether Mesa's lavapipe is installed; when it is not, a test that needs
/// it returns early (or fails, with `QPQ_GUI_TESTS=require`).
fn lavapipe_installed() -> bool {
    let found = std::fs::read_dir("/usr/share/vulkan/icd.d").is_ok_and(|dir| {
        dir.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("lvp_icd"))
    });
    if !found {
        let message = "the snapshot tests need Mesa's lavapipe \
                       (apt-get install mesa-vulkan-drivers)";
        assert!(
            std::env::var("QPQ_GUI_TESTS").as_deref() != Ok("require"),
            "{message}"
        );
        eprintln!("SKIPPED: {message}");
    }
    found
}

/// wgpu on lavapipe and nothing else.
fn lavapipe() -> egui_wgpu::WgpuSetup {
    use egui_wgpu::wgpu;
    let egui_wgpu::WgpuSetup::CreateNew(mut setup) = egui_kittest::wgpu::default_wgpu_setup()
    else {
        unreachable!("kittest creates its own wgpu instance");
    };
    setup.instance_descriptor.backends = wgpu::Backends::VULKAN;
    setup.native_adapter_selector = Some(std::sync::Arc::new(|adapters, _surface| {
        adapters
            .iter()
            .find(|a| a.get_info().device_type == wgpu::DeviceType::Cpu)
            .cloned()
            .ok_or_else(|| "no lavapipe adapter (apt-get install mesa-vulkan-drivers)".to_owned())
    }));
    egui_wgpu::WgpuSetup::CreateNew(setup)
}

fn harness(screen: Screen) -> Harness<'static, QpqApp> {
    let (bridge, _requests, _updates) = Bridge::detached();
    let app = QpqApp::new(screen, bridge);
    Harness::builder()
        .with_size(egui::vec2(900.0, 640.0))
        .with_max_steps(16)
        .wgpu_setup(lavapipe())
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
        id: None,
        reply_to: None,
        attachment: None,
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
        id: None,
        reply_to: None,
        attachment: None,
    }));
    h.state_mut().apply(Update::SafetyNumber {
        group: "team".into(),
        digits: "48213 09921 55270 18834 60027 73391".into(),
    });
    h.state_mut().apply(Update::Registered);
    h.state_mut().apply(Update::Event(Event::Connected));
    // Bob is on this network and reached directly.
    h.state_mut().apply(Update::Event(Event::DirectLink {
        peer: key(2),
        peer_name: Some("bob".into()),
        up: true,
    }));
    h.run();
    h
}

#[test]
fn first_run() {
    if !lavapipe_installed() {
        return;
    }
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
    if !lavapipe_installed() {
        return;
    }
    let mut h = harness(Screen::Unlock);
    h.run();
    type_into(&mut h, "Password", "secret");
    h.snapshot("unlock");
}

#[test]
fn main_screen() {
    if !lavapipe_installed() {
        return;
    }
    let mut h = conversation();
    h.snapshot("main");
}

#[test]
fn own_key_as_qr_code() {
    if !lavapipe_installed() {
        return;
    }
    let mut h = conversation();
    h.get_by_label("My key as QR code").click();
    h.run();
    h.snapshot("qr");
}
