//! What a post-quantum group costs, measured against a plain group, for
//! both kinds of post-quantum group: an MLS group of the hybrid PQ suite
//! (0x004F, what `group create --pq` makes) and a sealed group (classic MLS
//! with every payload in a hybrid envelope per recipient, what `--pq` made
//! before). For groups of 2 and of 50 members: payload bytes sent and bytes
//! the server stores per 1 KiB message, the time of a send, of one member's
//! receive, of an add and of a self-update, the state file, and the sizes
//! of a KeyPackage, an add's Commit and Welcome, and an update's Commit.
//!
//! Ignored by default (speed is measured, never asserted); run in release:
//! `cargo test --release -p quicproquo-core --test pq_cost -- --ignored --nocapture`
//!
//! The machines stay in memory and the NodeService answers inline, so the
//! times are the client machine's own work (MLS, sealing, opening) plus the
//! in-memory server, without the state file's encryption or the network.

use std::time::{Duration, Instant};

use quicproquo_core::client::{ClientMachine, Command, Event};
use quicproquo_core::node::{NodeConfig, RequestBody};
use quicproquo_core::testing::{Hooks, NodeWorld, unlimited};

/// Messages sent per measurement.
const ROUNDS: u32 = 50;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    PqSuite,
    Sealed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain (0x0001)",
            Kind::PqSuite => "pq suite (0x004F)",
            Kind::Sealed => "sealed (0x0001 + envelope)",
        }
    }
}

#[test]
#[ignore = "a measurement, not a check; run in release with --nocapture"]
fn report_pq_suite_against_sealed_and_plain_groups() {
    println!(
        "| members | group | sent per message | stored per message | send | receive | add | update (commit) | update commit | add commit + welcome | KeyPackage | state file |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for members in [2, 50] {
        let mut line = Vec::new();
        for kind in [Kind::Plain, Kind::PqSuite, Kind::Sealed] {
            let r = measure(kind, members);
            println!(
                "| {members} | {} | {} B | {} B | {:.0} µs | {:.0} µs | {:.1} ms | {:.1} ms | {} B | {} B + {} B | {} B | {} B |",
                kind.name(),
                r.sent,
                r.stored,
                micros(r.send),
                micros(r.receive),
                r.add.as_secs_f64() * 1e3,
                r.update.as_secs_f64() * 1e3,
                r.update_commit,
                r.add_commit,
                r.welcome,
                r.key_package,
                r.state,
            );
            line.push(r);
        }
        let (plain, suite) = (&line[0], &line[1]);
        println!(
            "{members} members: pq suite / plain, bytes sent per message {:.3}, stored {:.3}",
            suite.sent as f64 / plain.sent as f64,
            suite.stored as f64 / plain.stored as f64
        );
    }
}

struct Report {
    /// Payload bytes in the requests of one send.
    sent: usize,
    /// Bytes (keys and values) the server's store grew by with one send.
    stored: usize,
    send: Duration,
    receive: Duration,
    /// Mean time of one add (Commit, Welcome, their delivery).
    add: Duration,
    /// A self-update by a member: its Commit made and delivered.
    update: Duration,
    update_commit: usize,
    /// The last add's Commit (to the members then) and Welcome.
    add_commit: usize,
    welcome: usize,
    key_package: usize,
    /// The creator's persisted state with the group built.
    state: usize,
}

fn measure(kind: Kind, members: usize) -> Report {
    let mut w = World::new();
    let mut users: Vec<ClientMachine> = (0..members)
        .map(|i| ClientMachine::generate([i as u8 + 1; 32]))
        .collect();
    for (i, m) in users.iter_mut().enumerate() {
        w.login(i, m);
        m.create_sealed_pq_groups(kind == Kind::Sealed);
    }
    for (i, m) in users.iter_mut().enumerate() {
        w.run(m, i, Command::Register { count: 1 });
    }
    let key_package = w.key_package(kind);
    let keys: Vec<_> = users.iter().map(|m| m.identity_key()).collect();
    let (alice, rest) = users.split_first_mut().expect("users");
    w.run(
        alice,
        0,
        Command::CreateGroup {
            name: "g".into(),
            pq: kind != Kind::Plain,
        },
    );
    let start = Instant::now();
    for member in &keys[1..] {
        w.clear();
        w.run(
            alice,
            0,
            Command::AddMember {
                group: "g".into(),
                member: *member,
            },
        );
    }
    let add = start.elapsed() / (members as u32 - 1);
    // The last add: its Commit went to the members before it (none for a
    // group of 2), its Welcome to the new one.
    let welcome = *w.payloads.last().expect("a welcome");
    let add_commit = w.payloads[..w.payloads.len() - 1]
        .first()
        .copied()
        .unwrap_or(0);
    for (i, m) in rest.iter_mut().enumerate() {
        w.run(m, i + 1, Command::Receive { wait_ms: 0 });
    }
    let state = users[0].snapshot().len();

    let text = "x".repeat(1024);
    let (mut send, mut receive) = (Duration::ZERO, Duration::ZERO);
    let (mut sent, mut stored) = (0, 0);
    let reader = members - 1;
    for _ in 0..ROUNDS {
        w.clear();
        let before = w.store_bytes();
        let start = Instant::now();
        w.run(
            &mut users[0],
            0,
            Command::Send {
                group: "g".into(),
                text: text.clone(),
            },
        );
        send += start.elapsed();
        stored += w.store_bytes().saturating_sub(before);
        sent += w.payloads.iter().sum::<usize>();
        let start = Instant::now();
        let events = w.run(&mut users[reader], reader, Command::Receive { wait_ms: 0 });
        receive += start.elapsed();
        assert_eq!(events.len(), 1, "{events:?}");
    }
    // A self-update by the last member, delivered to everyone else.
    w.clear();
    let start = Instant::now();
    w.run(
        &mut users[reader],
        reader,
        Command::Update {
            group: Some("g".into()),
        },
    );
    let update = start.elapsed();
    let update_commit = w.payloads.first().copied().unwrap_or(0);
    Report {
        sent: sent / ROUNDS as usize,
        stored: stored / ROUNDS as usize,
        send: send / ROUNDS,
        receive: receive / ROUNDS,
        add,
        update,
        update_commit,
        add_commit,
        welcome,
        key_package,
        state,
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct World {
    node: NodeWorld,
    /// Payload sizes of the enqueue requests since the last clear: one per
    /// distinct payload (a batch's payload once).
    payloads: Vec<usize>,
    /// Sizes of the KeyPackages uploaded, by pool.
    uploads: Vec<(u16, usize)>,
}

impl World {
    fn new() -> World {
        World {
            node: NodeWorld::new(unlimited(NodeConfig::default())),
            payloads: Vec::new(),
            uploads: Vec::new(),
        }
    }

    fn login(&mut self, who: usize, m: &ClientMachine) {
        self.node.login(who as u64, m.signing_key());
    }

    fn clear(&mut self) {
        self.payloads.clear();
    }

    /// A KeyPackage of the suite a group of `kind` adds members with.
    fn key_package(&self, kind: Kind) -> usize {
        let pool = if kind == Kind::PqSuite { 0x004F } else { 0 };
        self.uploads
            .iter()
            .find(|(p, _)| *p == pool)
            .map(|(_, size)| *size)
            .expect("a KeyPackage of the suite was uploaded")
    }

    /// Bytes of keys and values in the server's store.
    fn store_bytes(&self) -> usize {
        self.node
            .node()
            .store()
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum()
    }

    /// Runs one command to its end; it must succeed. Returns its events
    /// (messages only; warnings fail).
    fn run(&mut self, m: &mut ClientMachine, who: usize, command: Command) -> Vec<Event> {
        let (payloads, uploads) = (&mut self.payloads, &mut self.uploads);
        let mut note = |request: &RequestBody| {
            match request {
                RequestBody::Enqueue { payload, .. }
                | RequestBody::EnqueueBatch { payload, .. } => payloads.push(payload.len()),
                RequestBody::EnqueueMany { messages, .. } => {
                    payloads.extend(messages.iter().map(|m| m.payload.len()))
                }
                RequestBody::UploadKeyPackage {
                    package,
                    cipher_suite,
                    ..
                } => uploads.push((*cipher_suite, package.len())),
                _ => {}
            }
            None
        };
        let mut hooks = Hooks {
            intercept: Some(&mut note),
            tamper: None,
        };
        let ran = self.node.run_command(m, who as u64, command, &mut hooks);
        ran.outcome.expect("the command succeeds");
        ran.events
            .into_iter()
            .filter(|e| {
                if let Event::Warning { message } = e {
                    panic!("warning: {message}");
                }
                matches!(e, Event::Message { .. })
            })
            .collect()
    }
}
