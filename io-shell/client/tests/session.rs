//! Long-lived sessions against a real `qpq-server` process: two members
//! chatting both ways at once, the server restarted under them, a third
//! member joining mid-run.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use quicproquo_client::{ServerTrust, Session, SessionConfig};
use quicproquo_core::client::{Attachment, Content, Event, Outcome};
use quicproquo_core::limits::ATTACHMENT_BYTES_MAX;
use quicproquo_core::types::IdentityKey;
use tokio::sync::mpsc;

use common::Server;

const PASSWORD: &str = "correct horse battery staple";
/// Messages each of Alice and Bob send (`QPQ_SESSION_MESSAGES` to change).
const MESSAGES: usize = 1_000;
/// Longest wait for one expected event.
const PATIENCE: Duration = Duration::from_secs(60);

fn config(dir: &std::path::Path, name: &str, server: &Server) -> SessionConfig {
    SessionConfig {
        state: dir.join(format!("{name}.bin")),
        server: server.addr.clone(),
        trust: ServerTrust::fingerprint_hex(&server.fingerprint).unwrap(),
        direct: None,
    }
}

/// One member's session and everything it was shown.
struct Member {
    session: Session,
    events: mpsc::Receiver<Event>,
    /// Texts shown, per sender, in the order shown.
    seen: BTreeMap<IdentityKey, Vec<String>>,
    delivered: usize,
    log: Vec<Event>,
}

impl Member {
    async fn new(dir: &std::path::Path, name: &str, server: &Server) -> Member {
        let session = Session::create(config(dir, name, server), PASSWORD)
            .await
            .unwrap();
        let events = session.subscribe().await.unwrap();
        let outcome = session.register(5).await.unwrap();
        assert!(
            // Five and a last resort in each suite's pool.
            matches!(outcome, Outcome::Registered { uploaded: 12, .. }),
            "{outcome:?}"
        );
        Member {
            session,
            events,
            seen: BTreeMap::new(),
            delivered: 0,
            log: Vec::new(),
        }
    }

    /// Takes events until `done` says enough, failing after [`PATIENCE`]
    /// without a new event.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Member) -> bool) {
        while !done(self) {
            let e = tokio::time::timeout(PATIENCE, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for {PATIENCE:?} while waiting for {what}"))
                .expect("the session runs");
            match &e {
                Event::Message { sender, text, .. } => {
                    self.seen.entry(*sender).or_default().push(text.clone());
                }
                Event::Delivered { .. } => self.delivered += 1,
                Event::Warning { message } => panic!("warning: {message}"),
                Event::Tampering { what } => panic!("tampering: {what}"),
                _ => {}
            }
            self.log.push(e);
        }
    }

    fn count_from(&self, who: IdentityKey) -> usize {
        self.seen.get(&who).map_or(0, Vec::len)
    }
}

fn texts(who: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{who}-{i}")).collect()
}

/// Sends `who`'s messages `range` to "team", one after the other (each
/// returns once queued and persisted).
async fn send_all(m: &Member, who: &str, range: std::ops::Range<usize>) {
    for text in texts(who, range) {
        m.session.send("team", &text).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_chat_both_ways_through_a_restart_and_a_third_joins() {
    let n: usize = std::env::var("QPQ_SESSION_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MESSAGES);
    let (p1, p2) = (n * 3 / 10, n * 6 / 10);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let mut alice = Member::new(dir.path(), "alice", &server).await;
    let mut bob = Member::new(dir.path(), "bob", &server).await;
    let mut carol = Member::new(dir.path(), "carol", &server).await;
    let (a, b, c) = (
        alice.session.identity_key(),
        bob.session.identity_key(),
        carol.session.identity_key(),
    );

    alice.session.create_group("team", false).await.unwrap();
    alice.session.add("team", b).await.unwrap();
    bob.until("the invitation", |m| {
        m.log
            .iter()
            .any(|e| matches!(e, Event::Joined { group, members: 2 } if group == "team"))
    })
    .await;

    // Phase 1: both write at once.
    tokio::join!(send_all(&alice, "a", 0..p1), send_all(&bob, "b", 0..p1));
    alice.until("phase 1", |m| m.count_from(b) == p1).await;
    bob.until("phase 1", |m| m.count_from(a) == p1).await;

    // Phase 2: the server is killed and started again while both write.
    let half = (p1 + p2) / 2;
    tokio::join!(
        send_all(&alice, "a", p1..half),
        send_all(&bob, "b", p1..half)
    );
    server.restart();
    tokio::join!(
        send_all(&alice, "a", half..p2),
        send_all(&bob, "b", half..p2)
    );
    alice.until("phase 2", |m| m.count_from(b) == p2).await;
    bob.until("phase 2", |m| m.count_from(a) == p2).await;
    for m in [&alice, &bob] {
        assert!(
            m.log
                .iter()
                .any(|e| matches!(e, Event::Reconnecting { .. })),
            "the restart was noticed"
        );
    }

    // Carol joins; everyone moves to the new epoch before phase 3.
    alice.session.add("team", c).await.unwrap();
    carol
        .until("the invitation", |m| {
            m.log
                .iter()
                .any(|e| matches!(e, Event::Joined { group, members: 3 } if group == "team"))
        })
        .await;
    bob.until("Carol's add", |m| {
        m.log
            .iter()
            .any(|e| matches!(e, Event::GroupChanged { members: 3, .. }))
    })
    .await;

    // Phase 3: all three read.
    tokio::join!(send_all(&alice, "a", p2..n), send_all(&bob, "b", p2..n));
    alice.until("phase 3", |m| m.count_from(b) == n).await;
    bob.until("phase 3", |m| m.count_from(a) == n).await;
    carol
        .until("phase 3", |m| {
            m.count_from(a) == n - p2 && m.count_from(b) == n - p2
        })
        .await;
    // Every message once, in order per sender; a Delivered for each sent.
    assert_eq!(alice.seen[&b], texts("b", 0..n));
    assert_eq!(bob.seen[&a], texts("a", 0..n));
    assert_eq!(carol.seen[&a], texts("a", p2..n));
    assert_eq!(carol.seen[&b], texts("b", p2..n));
    alice.until("deliveries", |m| m.delivered == n).await;
    bob.until("deliveries", |m| m.delivered == n).await;

    for m in [alice, bob, carol] {
        m.session.close().await.unwrap();
    }
}

/// The last event `m` was shown that `pick` takes.
fn last<T>(m: &Member, pick: impl Fn(&Event) -> Option<T>) -> Option<T> {
    m.log.iter().rev().find_map(pick)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_content_round_trips_through_the_server_in_a_pq_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut alice = Member::new(dir.path(), "alice", &server).await;
    let mut bob = Member::new(dir.path(), "bob", &server).await;
    let (a, b) = (alice.session.identity_key(), bob.session.identity_key());
    alice.session.create_group("pq", true).await.unwrap();
    alice.session.add("pq", b).await.unwrap();
    bob.until("the invitation", |m| {
        m.log
            .iter()
            .any(|e| matches!(e, Event::Joined { group, .. } if group == "pq"))
    })
    .await;
    for m in [&alice, &bob] {
        let groups = m.session.groups().await.unwrap();
        assert!(groups[0].pq, "an MLS group of the PQ suite");
    }
    let sent_id = |outcome: Outcome| match outcome {
        Outcome::Sent { id, .. } => id,
        other => panic!("{other:?}"),
    };

    // A text, and a reply to it.
    let hello = sent_id(
        alice
            .session
            .send_content("pq", Content::text("hello"))
            .await
            .unwrap(),
    );
    bob.until("hello", |m| m.count_from(a) == 1).await;
    let shown = last(&bob, |e| match e {
        Event::Message {
            id, reply_to, text, ..
        } => Some((*id, *reply_to, text.clone())),
        _ => None,
    });
    assert_eq!(shown, Some((Some(hello), None, "hello".to_owned())));
    let reply = sent_id(
        bob.session
            .send_content(
                "pq",
                Content::Text {
                    text: "hi back".into(),
                    reply_to: Some(hello),
                },
            )
            .await
            .unwrap(),
    );
    alice.until("the reply", |m| m.count_from(b) == 1).await;
    let shown = last(&alice, |e| match e {
        Event::Message { id, reply_to, .. } => Some((*id, *reply_to)),
        _ => None,
    });
    assert_eq!(shown, Some((Some(reply), Some(hello))));

    // An edit of the first message.
    alice
        .session
        .send_content(
            "pq",
            Content::Edit {
                target: hello,
                text: "hello, edited".into(),
            },
        )
        .await
        .unwrap();
    bob.until("the edit", |m| {
        m.log.iter().any(|e| matches!(e, Event::Edited { .. }))
    })
    .await;
    let edit = last(&bob, |e| match e {
        Event::Edited {
            sender,
            target,
            text,
            ..
        } => Some((*sender, *target, text.clone())),
        _ => None,
    });
    assert_eq!(edit, Some((a, hello, "hello, edited".to_owned())));

    // A 1 MB file.
    let data: Vec<u8> = (0..ATTACHMENT_BYTES_MAX)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let file = sent_id(
        alice
            .session
            .send_content(
                "pq",
                Content::Attachment {
                    attachment: Attachment {
                        media_type: "application/octet-stream".into(),
                        name: "big.bin".into(),
                        data: data.clone(),
                    },
                    reply_to: None,
                },
            )
            .await
            .unwrap(),
    );
    bob.until("the file", |m| m.count_from(a) == 2).await;
    let got = last(&bob, |e| match e {
        Event::Message {
            id,
            attachment: Some(file),
            ..
        } => Some((*id, file.clone())),
        _ => None,
    })
    .expect("the file is shown");
    assert_eq!(got.0, Some(file));
    assert_eq!(got.1.name, "big.bin");
    assert_eq!(got.1.media_type, "application/octet-stream");
    assert!(got.1.data == data, "the file's bytes arrive whole");

    // A deletion.
    alice
        .session
        .send_content("pq", Content::Delete { target: hello })
        .await
        .unwrap();
    bob.until("the deletion", |m| {
        m.log.iter().any(|e| matches!(e, Event::Deleted { .. }))
    })
    .await;
    let deleted = last(&bob, |e| match e {
        Event::Deleted { sender, target, .. } => Some((*sender, *target)),
        _ => None,
    });
    assert_eq!(deleted, Some((a, hello)));

    // Too large a file is refused before anything is sent.
    let refused = alice
        .session
        .send_content(
            "pq",
            Content::Attachment {
                attachment: Attachment {
                    media_type: "application/octet-stream".into(),
                    name: "huge.bin".into(),
                    data: vec![0; ATTACHMENT_BYTES_MAX + 1],
                },
                reply_to: None,
            },
        )
        .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("exceeds the limit")),
        "{refused:?}"
    );
    alice.session.close().await.unwrap();
    bob.session.close().await.unwrap();
}
