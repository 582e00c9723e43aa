//! mls-rs as a group member next to the real qpq client, through a real
//! qpq-server (ARCHITECTURE.md § Interoperability): joining by Welcome in
//! both directions, application messages both ways, updates, Commits racing
//! for one epoch at the commit fence, removals, and a member that greases
//! (RFC 9420 §13.5). Every test starts its own server and sessions, and
//! compares what each side shows: members, texts and senders, epochs and
//! safety numbers.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use mls_rs::MlsMessage;
use mls_rs::extension::ExtensionType;
use quicproquo_client::{Session, SessionConfig};
use quicproquo_core::client::{Event, Outcome, SafetyNumber};
use quicproquo_core::types::IdentityKey;
use quicproquo_interop::{Committed, Foreign, Received};
use quicproquo_server::testing::InProcessServer;
use rand_core::OsRng;
use tokio::sync::mpsc;

const PASSWORD: &str = "correct horse battery staple";
/// Longest wait for one expected event or message.
const PATIENCE: Duration = Duration::from_secs(30);
/// One long-poll of the foreign member.
const WAIT_MS: u64 = 2_000;

/// A qpq member: a long-lived `Session` and everything it showed.
struct Qpq {
    session: Session,
    events: mpsc::Receiver<Event>,
    log: Vec<Event>,
    /// Texts sent, and `Delivered` events seen.
    sent: usize,
    delivered: usize,
}

impl Qpq {
    async fn new(dir: &std::path::Path, name: &str, server: &InProcessServer) -> Qpq {
        let config = SessionConfig {
            state: dir.join(format!("{name}.bin")),
            server: server.addr.to_string(),
            trust: server.trust(),
            direct: None,
        };
        let session = Session::create(config, PASSWORD).await.unwrap();
        let events = session.subscribe().await.unwrap();
        let outcome = session.register(2).await.unwrap();
        assert!(
            matches!(outcome, Outcome::Registered { failed: 0, .. }),
            "{outcome:?}"
        );
        Qpq {
            session,
            events,
            log: Vec::new(),
            sent: 0,
            delivered: 0,
        }
    }

    fn identity(&self) -> IdentityKey {
        self.session.identity_key()
    }

    async fn send(&mut self, group: &str, text: &str) {
        self.session.send(group, text).await.unwrap();
        self.sent += 1;
    }

    /// Takes events until one matches `want`, failing after [`PATIENCE`]
    /// without it; a warning or tampering report fails at once.
    async fn until(&mut self, what: &str, want: impl Fn(&Event) -> bool) -> Event {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let e = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("waited {PATIENCE:?} for {what}; saw {:#?}", self.log))
                .expect("the session runs");
            self.log.push(e.clone());
            match &e {
                Event::Warning { message } => panic!("warning while waiting for {what}: {message}"),
                Event::Tampering { what } => panic!("tampering: {what}"),
                Event::Delivered { .. } => self.delivered += 1,
                _ => {}
            }
            if want(&e) {
                return e;
            }
        }
    }

    /// Waits until every text this member sent is stored for everyone.
    async fn until_all_delivered(&mut self) {
        while self.delivered < self.sent {
            self.until("deliveries", |e| matches!(e, Event::Delivered { .. }))
                .await;
        }
    }

    /// Waits until the session shows `text` from `sender` in `group`.
    async fn until_text(&mut self, group: &str, sender: IdentityKey, text: &str) {
        self.until(&format!("{text:?}"), |e| {
            matches!(e, Event::Message { group: g, sender: s, text: t, .. }
                if g == group && *s == sender && t == text)
        })
        .await;
    }

    /// Waits until the session shows another member's Commit moving
    /// `group` to `epoch`.
    async fn until_epoch(&mut self, group: &str, epoch: u64) {
        self.until(&format!("epoch {epoch}"), |e| {
            matches!(e, Event::GroupChanged { group: g, epoch: n, .. } if g == group && *n == epoch)
        })
        .await;
    }

    async fn safety_number(&self, group: &str) -> SafetyNumber {
        self.session
            .safety_number(group)
            .await
            .unwrap()
            .expect("the group exists")
    }
}

/// A foreign (mls-rs) member logged in to `server`; `grease`: one that
/// greases (RFC 9420 §13.5).
async fn foreign(server: &InProcessServer, grease: bool) -> Foreign {
    let key = SigningKey::generate(&mut OsRng);
    let client = server.login(&key).await;
    if grease {
        Foreign::with_grease(key, client)
    } else {
        Foreign::new(key, client)
    }
}

/// Long-polls the foreign member until `want` holds for something it
/// processed, failing after [`PATIENCE`]; returns everything processed.
async fn foreign_until(
    f: &mut Foreign,
    what: &str,
    want: impl Fn(&Received) -> bool,
) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while tokio::time::Instant::now() < deadline {
        let got = f.receive(WAIT_MS).await.unwrap();
        let done = got.iter().any(&want);
        seen.extend(got);
        if done {
            return seen;
        }
    }
    panic!("the foreign member waited {PATIENCE:?} for {what}; saw {seen:#?}");
}

/// The foreign member's safety number, derived as qpq derives its own.
fn foreign_safety_number(f: &Foreign) -> SafetyNumber {
    SafetyNumber::derive(f.epoch().unwrap(), &f.epoch_authenticator().unwrap())
}

fn text(sender: IdentityKey, text: &str) -> impl Fn(&Received) -> bool {
    move |r| matches!(r, Received::Text { sender: s, text: t, .. } if *s == sender && t == text)
}

/// The mls-rs member creates `name` and invites Alice with a KeyPackage
/// from the server and a Welcome in qpq's envelope (its first Commit, for
/// epoch 0); Alice joins, both chat (`texts`: the foreign member's, then
/// Alice's answer), with equal safety numbers; then Alice adds Bob, who
/// joins. The foreign member has not yet read Alice's Commit.
async fn foreign_group_with_two_qpq_members(
    frank: &mut Foreign,
    alice: &mut Qpq,
    bob: &mut Qpq,
    name: &str,
    texts: (&str, &str),
) {
    let (a, f) = (alice.identity(), frank.identity());
    frank.create_group(name).unwrap();
    let committed = frank.add(a).await.unwrap();
    assert_eq!(
        committed,
        Committed {
            attempts: 1,
            epoch: 1
        }
    );
    alice
        .until(
            "the invitation",
            |e| matches!(e, Event::Joined { group, members: 2 } if group == name),
        )
        .await;
    assert_eq!(
        alice.safety_number(name).await,
        foreign_safety_number(frank)
    );
    frank.send(texts.0).await.unwrap();
    alice.until_text(name, f, texts.0).await;
    alice.send(name, texts.1).await;
    foreign_until(frank, "Alice's text", text(a, texts.1)).await;

    // qpq adds Bob to the group mls-rs made.
    alice.session.add(name, bob.identity()).await.unwrap();
    bob.until(
        "the invitation",
        |e| matches!(e, Event::Joined { group, members: 3 } if group == name),
    )
    .await;
}

/// Scenarios 1 to 5 of ARCHITECTURE.md § Interoperability, in one group:
/// qpq adds the mls-rs member by KeyPackage and Welcome; messages both
/// ways; updates from both; Commits racing for one epoch, each side losing
/// once; removals by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mls_rs_member_joins_a_qpq_group_chats_updates_races_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let mut alice = Qpq::new(dir.path(), "alice", &server).await;
    let mut bob = Qpq::new(dir.path(), "bob", &server).await;
    let mut frank = foreign(&server, false).await;
    frank.upload_key_packages(2).await.unwrap();
    let (a, b, f) = (alice.identity(), bob.identity(), frank.identity());

    // 1. Alice adds Frank with a KeyPackage from the server; Frank joins
    // from the Welcome in his queue and opens the group's name (sealed
    // under the new epoch's exporter secret).
    alice.session.create_group("team", false).await.unwrap();
    let added = alice.session.add("team", f).await.unwrap();
    assert!(
        matches!(added, Outcome::MemberAdded { member, .. } if member == f),
        "{added:?}"
    );
    let seen = foreign_until(&mut frank, "the Welcome", |r| {
        matches!(r, Received::Joined { .. })
    })
    .await;
    let joined = Received::Joined {
        name: "team".into(),
        members: 2,
    };
    assert_eq!(seen, vec![joined]);
    assert_eq!(frank.members().unwrap(), vec![a, f]);
    assert_eq!(frank.epoch().unwrap(), 1);
    assert_eq!(
        alice.safety_number("team").await,
        foreign_safety_number(&frank)
    );

    // 2. Messages both ways: text, sender and (from qpq) the send time.
    alice.send("team", "hello from qpq").await;
    let seen = foreign_until(&mut frank, "Alice's text", |r| {
        matches!(r, Received::Text { .. })
    })
    .await;
    assert!(
        matches!(&seen[..], [Received::Text { sender, text, sent_at_ms: Some(_) }]
            if *sender == a && text == "hello from qpq"),
        "{seen:?}"
    );
    frank.send("hello from mls-rs").await.unwrap();
    alice.until_text("team", f, "hello from mls-rs").await;

    // 3. An update from each side; both then agree on the epoch and its
    // authenticator (the safety number). Alice's text is made once her
    // Commit is merged, so when Frank has it both are in epoch 2.
    alice.session.update(Some("team")).await.unwrap();
    alice.send("team", "updated").await;
    let seen = foreign_until(&mut frank, "Alice's update", text(a, "updated")).await;
    assert_eq!(
        seen[0],
        Received::Commit {
            committer: a,
            epoch: 2
        }
    );
    assert_eq!(
        alice.safety_number("team").await,
        foreign_safety_number(&frank)
    );
    let committed = frank.update().await.unwrap();
    assert_eq!(
        committed,
        Committed {
            attempts: 1,
            epoch: 3
        }
    );
    alice.until_epoch("team", 3).await;
    assert_eq!(
        alice.safety_number("team").await,
        foreign_safety_number(&frank)
    );
    frank.send("after both updates").await.unwrap();
    alice.until_text("team", f, "after both updates").await;

    // 4a. Frank's Commit for epoch 3 loses to Alice's: the server's commit
    // fence refuses it, Frank catches up and commits again in epoch 4.
    let late = frank.make_update().unwrap();
    alice.session.update(Some("team")).await.unwrap();
    alice.send("team", "won epoch 3").await;
    alice.until_all_delivered().await;
    assert!(
        !frank.enqueue_commit_to(a, &late).await.unwrap(),
        "the fence refuses a second Commit for epoch 3"
    );
    let committed = frank.redo_update_after_losing().await.unwrap();
    assert_eq!(
        committed,
        Committed {
            attempts: 2,
            epoch: 5
        }
    );
    alice.until_epoch("team", 5).await;
    assert_eq!(
        alice.safety_number("team").await,
        foreign_safety_number(&frank)
    );

    // Bob joins, for a race Alice can lose and a removal Frank can make.
    alice.session.add("team", b).await.unwrap();
    bob.until(
        "the invitation",
        |e| matches!(e, Event::Joined { group, members: 3 } if group == "team"),
    )
    .await;
    alice
        .until(
            "Bob's add",
            |e| matches!(e, Event::MemberAdded { member, .. } if *member == b),
        )
        .await;
    let seen = foreign_until(&mut frank, "Bob's add", |r| {
        matches!(r, Received::Commit { .. })
    })
    .await;
    assert_eq!(
        seen,
        vec![Received::Commit {
            committer: a,
            epoch: 6
        }]
    );
    assert_eq!(frank.members().unwrap(), vec![a, f, b]);
    let n = foreign_safety_number(&frank);
    assert_eq!(alice.safety_number("team").await, n);
    assert_eq!(bob.safety_number("team").await, n);

    // 4b. Alice's Commit for epoch 6 loses to Frank's: his copy to Bob
    // moves the fence first, so hers is refused; his copy to her (the same
    // bytes, which the fence lets through) follows, and she makes her
    // update again in epoch 7. Frank never sees her refused Commit.
    let first = frank.make_update().unwrap();
    assert!(frank.enqueue_commit_to(b, &first).await.unwrap());
    alice.session.update(Some("team")).await.unwrap();
    assert!(
        frank.enqueue_commit_to(a, &first).await.unwrap(),
        "a copy of the accepted Commit passes the fence"
    );
    assert_eq!(frank.apply_pending_commit().unwrap(), 7);
    alice.send("team", "after the race").await;
    let seen = foreign_until(&mut frank, "Alice's update", text(a, "after the race")).await;
    assert_eq!(
        seen[0],
        Received::Commit {
            committer: a,
            epoch: 8
        }
    );
    bob.until_text("team", a, "after the race").await;
    let n = foreign_safety_number(&frank);
    assert_eq!(n.epoch, 8);
    assert_eq!(alice.safety_number("team").await, n);
    assert_eq!(bob.safety_number("team").await, n);

    // 5a. Frank removes Bob: Bob learns it, Alice shows who did it.
    let committed = frank.remove(b).await.unwrap();
    assert_eq!(
        committed,
        Committed {
            attempts: 1,
            epoch: 9
        }
    );
    bob.until(
        "his removal",
        |e| matches!(e, Event::Removed { group, by } if group == "team" && *by == f),
    )
    .await;
    alice
        .until(
            "Bob's removal",
            |e| matches!(e, Event::MemberRemoved { member, by, .. } if *member == b && *by == f),
        )
        .await;
    alice.until_epoch("team", 9).await;
    assert_eq!(frank.members().unwrap(), vec![a, f]);
    assert_eq!(
        alice.safety_number("team").await,
        foreign_safety_number(&frank)
    );

    // 5b. Alice removes Frank: he gets the Commit and learns it.
    alice.session.remove("team", f).await.unwrap();
    let seen = foreign_until(&mut frank, "his removal", |r| {
        matches!(r, Received::Removed { .. })
    })
    .await;
    assert_eq!(seen, vec![Received::Removed { by: a }]);
    assert!(!frank.in_group());
    alice
        .until(
            "Frank's removal",
            |e| matches!(e, Event::MemberRemoved { member, by, .. } if *member == f && *by == a),
        )
        .await;

    for m in [alice, bob] {
        m.session.close().await.unwrap();
    }
}

/// Scenario 6: the mls-rs member creates a group and invites qpq with a
/// KeyPackage from the server and a Welcome in qpq's envelope; qpq joins,
/// both chat, and qpq adds another qpq member to the foreign-made group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qpq_joins_a_group_an_mls_rs_member_made_and_adds_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let mut alice = Qpq::new(dir.path(), "alice", &server).await;
    let mut bob = Qpq::new(dir.path(), "bob", &server).await;
    let mut frank = foreign(&server, false).await;
    let (a, b, f) = (alice.identity(), bob.identity(), frank.identity());
    let name = "made by mls-rs";

    foreign_group_with_two_qpq_members(
        &mut frank,
        &mut alice,
        &mut bob,
        name,
        ("welcome to my group", "glad to be here"),
    )
    .await;
    let seen = foreign_until(&mut frank, "Bob's add", |r| {
        matches!(r, Received::Commit { .. })
    })
    .await;
    assert_eq!(
        seen,
        vec![Received::Commit {
            committer: a,
            epoch: 2
        }]
    );
    assert_eq!(frank.members().unwrap(), vec![f, a, b]);
    frank.send("three of us").await.unwrap();
    alice.until_text(name, f, "three of us").await;
    bob.until_text(name, f, "three of us").await;
    bob.send(name, "hello both").await;
    foreign_until(&mut frank, "Bob's text", text(b, "hello both")).await;
    alice.until_text(name, b, "hello both").await;
    let n = foreign_safety_number(&frank);
    assert_eq!(n.epoch, 2);
    assert_eq!(alice.safety_number(name).await, n);
    assert_eq!(bob.safety_number(name).await, n);

    for m in [alice, bob] {
        m.session.close().await.unwrap();
    }
}

/// Scenario 7: a member that greases (RFC 9420 §13.5) — GREASE extension
/// types in its capabilities, LeafNode and KeyPackages. qpq adds it (its
/// KeyPackage and leaf pass openmls's checks with the GREASE fix in
/// `vendor/openmls`, core-sm/src/client/grease.rs), both chat, and its
/// update Commit, whose new LeafNode carries GREASE again, is processed by
/// qpq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qpq_adds_a_grease_using_mls_rs_member_and_follows_its_updates() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let mut alice = Qpq::new(dir.path(), "alice", &server).await;
    let mut frank = foreign(&server, true).await;
    let (a, f) = (alice.identity(), frank.identity());
    let grease = frank.grease().unwrap();

    // What the server holds is greased.
    let uploaded = frank.upload_key_packages(1).await.unwrap();
    let package = MlsMessage::from_bytes(&uploaded[0]).unwrap();
    let package = package.as_key_package().unwrap();
    assert!(
        package
            .extensions
            .has_extension(ExtensionType::new(grease.key_package))
    );

    alice.session.create_group("greasy", false).await.unwrap();
    let added = alice.session.add("greasy", f).await.unwrap();
    assert!(
        matches!(added, Outcome::MemberAdded { member, .. } if member == f),
        "{added:?}"
    );
    foreign_until(&mut frank, "the Welcome", |r| {
        matches!(r, Received::Joined { .. })
    })
    .await;
    // Frank's leaf as the group holds it, from the KeyPackage qpq added:
    // GREASE in its capabilities and its extensions.
    let group = frank.group().unwrap();
    let own = group
        .roster()
        .members()
        .into_iter()
        .find(|m| m.index == group.current_member_index())
        .unwrap();
    let leaf_type = ExtensionType::new(grease.leaf);
    assert!(own.capabilities.extensions.contains(&leaf_type));
    assert!(own.extensions.has_extension(leaf_type));
    assert_eq!(
        alice.safety_number("greasy").await,
        foreign_safety_number(&frank)
    );

    alice.send("greasy", "hello, greasy").await;
    foreign_until(&mut frank, "Alice's text", text(a, "hello, greasy")).await;
    frank.send("hello, strict").await.unwrap();
    alice.until_text("greasy", f, "hello, strict").await;

    // Frank's update Commit carries a new greased LeafNode.
    let committed = frank.update().await.unwrap();
    assert_eq!(
        committed,
        Committed {
            attempts: 1,
            epoch: 2
        }
    );
    alice.until_epoch("greasy", 2).await;
    assert_eq!(
        alice.safety_number("greasy").await,
        foreign_safety_number(&frank)
    );
    alice.session.update(Some("greasy")).await.unwrap();
    alice.send("greasy", "both updated").await;
    let seen = foreign_until(&mut frank, "Alice's update", text(a, "both updated")).await;
    assert_eq!(
        seen[0],
        Received::Commit {
            committer: a,
            epoch: 3
        }
    );
    assert_eq!(
        alice.safety_number("greasy").await,
        foreign_safety_number(&frank)
    );

    alice.session.close().await.unwrap();
}

/// Scenario 8: a group a GREASE-using member made. Its Welcome's GroupInfo
/// carries a GREASE extension and its ratchet tree the member's GREASE
/// leaf; qpq joins, both chat, qpq adds a second qpq member (an encrypted
/// Commit mls-rs processes; Bob joins from a tree with the GREASE leaf),
/// then a second GREASE-using member (an encrypted Commit with a GREASE
/// KeyPackage, which Bob and Frank process), and everyone follows Frank's
/// update, whose new leaf carries GREASE again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qpq_joins_a_group_a_grease_using_member_made_and_grows_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let mut alice = Qpq::new(dir.path(), "alice", &server).await;
    let mut bob = Qpq::new(dir.path(), "bob", &server).await;
    let mut frank = foreign(&server, true).await;
    let mut gina = foreign(&server, true).await;
    let (a, b, f, g) = (
        alice.identity(),
        bob.identity(),
        frank.identity(),
        gina.identity(),
    );
    let name = "greasy";

    foreign_group_with_two_qpq_members(
        &mut frank,
        &mut alice,
        &mut bob,
        name,
        ("greased welcome", "strict reply"),
    )
    .await;
    foreign_until(
        &mut frank,
        "Bob's add",
        |r| matches!(r, Received::Commit { committer, epoch: 2 } if *committer == a),
    )
    .await;

    // qpq adds Gina, who greases too: Bob processes Alice's encrypted
    // Commit carrying her GREASE KeyPackage.
    gina.upload_key_packages(1).await.unwrap();
    alice.session.add(name, g).await.unwrap();
    bob.until_epoch(name, 3).await;
    foreign_until(&mut gina, "the Welcome", |r| {
        matches!(r, Received::Joined { .. })
    })
    .await;
    foreign_until(
        &mut frank,
        "Gina's add",
        |r| matches!(r, Received::Commit { committer, epoch: 3 } if *committer == a),
    )
    .await;
    assert_eq!(frank.members().unwrap(), vec![f, a, b, g]);
    assert_eq!(gina.members().unwrap(), vec![f, a, b, g]);

    // Frank's update: a new GREASE leaf, followed by everyone.
    let committed = frank.update().await.unwrap();
    assert_eq!(committed.epoch, 4);
    alice.until_epoch(name, 4).await;
    bob.until_epoch(name, 4).await;
    foreign_until(
        &mut gina,
        "Frank's update",
        |r| matches!(r, Received::Commit { committer, epoch: 4 } if *committer == f),
    )
    .await;
    gina.send("four of us").await.unwrap();
    alice.until_text(name, g, "four of us").await;
    bob.until_text(name, g, "four of us").await;
    foreign_until(&mut frank, "Gina's text", text(g, "four of us")).await;
    let n = foreign_safety_number(&frank);
    assert_eq!(n.epoch, 4);
    assert_eq!(foreign_safety_number(&gina), n);
    assert_eq!(alice.safety_number(name).await, n);
    assert_eq!(bob.safety_number(name).await, n);

    for m in [alice, bob] {
        m.session.close().await.unwrap();
    }
}
