//! The bridge against a real server in this process: two users make their
//! identities through it, Alice creates a group and adds Bob, and a
//! message goes from one to the other — everything the window asks, the
//! way it asks it, without a window.

use std::time::{Duration, Instant};

use quicproquo_core::client::Event;
use quicproquo_core::types::hex;
use quicproquo_gui::bridge::{Bridge, Paths, Request};
use quicproquo_gui::model::Update;
use quicproquo_server::testing::InProcessServer;

/// How long a step may take before the test gives up: a bound for a hung
/// step, not a speed check. On an idle machine the whole test takes about
/// 6 s; on a CI machine whose two cores and disk are busy with the rest of
/// the suite, one step (registration: a reply per upload, each after an
/// `fdatasync`) once took more than 30 s.
const STEP: Duration = Duration::from_secs(120);

/// Waits for the first update `want` accepts, keeping nothing else.
fn wait_for<T>(bridge: &Bridge, what: &str, mut want: impl FnMut(&Update) -> Option<T>) -> T {
    let deadline = Instant::now() + STEP;
    loop {
        for u in bridge.updates() {
            if let Update::Failed(e) | Update::OpenFailed(e) = &u {
                panic!("{what}: {e}");
            }
            if let Some(found) = want(&u) {
                return found;
            }
        }
        assert!(Instant::now() < deadline, "no {what} within {STEP:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_users_make_identities_share_a_group_and_a_message() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = {
        let _enter = runtime.enter();
        InProcessServer::start(&dir.path().join("server"))
    };
    let fingerprint = hex(&server.fingerprint);
    let user = |name: &str| {
        let bridge = Bridge::spawn(
            runtime.handle(),
            Paths::beside(dir.path().join(format!("{name}.bin"))),
            || {},
        );
        bridge.request(Request::Create {
            password: format!("{name}'s password"),
            server: server.addr.to_string(),
            fingerprint: fingerprint.clone(),
        });
        let identity = wait_for(&bridge, "identity", |u| match u {
            Update::Opened { identity, .. } => Some(*identity),
            _ => None,
        });
        // Registering follows the opening, in the background.
        wait_for(&bridge, "registration", |u| {
            matches!(u, Update::Registered).then_some(())
        });
        (bridge, identity)
    };
    let (alice, _) = user("alice");
    let (bob, bob_key) = user("bob");
    assert!(dir.path().join("bob.server.json").exists());

    alice.request(Request::CreateGroup {
        name: "team".into(),
        pq: false,
    });
    wait_for(&alice, "the group", |u| match u {
        Update::Groups(g) if g.iter().any(|g| g.name == "team") => Some(()),
        _ => None,
    });
    alice.request(Request::AddMember {
        group: "team".into(),
        key: hex(bob_key.as_bytes()),
    });
    wait_for(&alice, "Bob in the group", |u| match u {
        Update::Groups(g) if g.iter().any(|g| g.name == "team" && g.members.len() == 2) => Some(()),
        _ => None,
    });
    wait_for(&bob, "Bob joining", |u| match u {
        Update::Event(Event::Joined { group, .. }) if group == "team" => Some(()),
        _ => None,
    });
    alice.request(Request::Send {
        group: "team".into(),
        text: "hello bob".into(),
    });
    wait_for(&alice, "the send", |u| match u {
        Update::Sent { text, .. } if text == "hello bob" => Some(()),
        _ => None,
    });
    let shown = wait_for(&bob, "the message", |u| match u {
        Update::Event(Event::Message { text, .. }) => Some(text.clone()),
        _ => None,
    });
    assert_eq!(shown, "hello bob");

    // A second window on Alice's state: a wrong password is refused and
    // says so; the state stays hers.
    drop(alice);
    let again = Bridge::spawn(
        runtime.handle(),
        Paths::beside(dir.path().join("alice.bin")),
        || {},
    );
    again.request(Request::Open {
        password: "not it".into(),
    });
    let deadline = Instant::now() + STEP;
    let refused = loop {
        if let Some(Update::OpenFailed(e)) = again.updates().into_iter().next() {
            break e;
        }
        assert!(Instant::now() < deadline, "no refusal");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!refused.is_empty());
    runtime.block_on(server.stop());
}
