//! What a post-quantum group costs the client machine, measured against a
//! plain group: bytes stored per message and recipient, and the time of a
//! `Send` and of a `Receive`; and what a send to a 50-member group costs. Ignored by default (speed is measured, never
//! asserted); run in release:
//! `cargo test --release -p quicproquo-core --test pq_cost -- --ignored --nocapture`
//! (add a test's name, e.g. `report_fifty_member_group_send`, for one).
//!
//! The machines stay in memory and the NodeService answers inline, so the
//! times are the client machine's own work (MLS, sealing, opening) plus the
//! in-memory server, without the state file or the network.

use std::time::{Duration, Instant};

use quicproquo_core::client::{ClientMachine, Command, Event};
use quicproquo_core::node::{NodeConfig, RequestBody};
use quicproquo_core::testing::{Hooks, NodeWorld, unlimited};
const ROUNDS: u32 = 300;

#[test]
#[ignore = "a measurement, not a check; run in release with --nocapture"]
fn report_pq_group_cost_per_send_and_receive() {
    let mut w = World::new();
    let mut users: Vec<ClientMachine> = (0..3u8)
        .map(|i| ClientMachine::generate([i + 1; 32]))
        .collect();
    for (i, m) in users.iter().enumerate() {
        w.login(i, m);
    }
    for (i, m) in users.iter_mut().enumerate() {
        w.run(m, i, Command::Register { count: 4 });
    }
    let (bob, carol) = (users[1].identity_key(), users[2].identity_key());
    for (name, pq) in [("plain", false), ("pq", true)] {
        let alice = &mut users[0];
        w.run(
            alice,
            0,
            Command::CreateGroup {
                name: name.into(),
                pq,
            },
        );
        for member in [bob, carol] {
            w.run(
                alice,
                0,
                Command::AddMember {
                    group: name.into(),
                    member,
                },
            );
        }
        w.run(&mut users[1], 1, Command::Receive { wait_ms: 0 });
        w.run(&mut users[2], 2, Command::Receive { wait_ms: 0 });
    }
    let text = "x".repeat(1024);
    println!("{ROUNDS} rounds: Alice sends 1 KiB, Bob and Carol receive it");
    let mut results = Vec::new();
    for group in ["plain", "pq"] {
        let (mut send, mut receive) = (Duration::ZERO, Duration::ZERO);
        w.sizes.clear();
        for _ in 0..ROUNDS {
            let start = Instant::now();
            let events = w.run(
                &mut users[0],
                0,
                Command::Send {
                    group: group.into(),
                    text: text.clone(),
                },
            );
            send += start.elapsed();
            assert!(events.is_empty(), "{events:?}");
            for who in [1, 2] {
                let start = Instant::now();
                let events = w.run(&mut users[who], who, Command::Receive { wait_ms: 0 });
                receive += start.elapsed();
                assert_eq!(events.len(), 1, "{events:?}");
            }
        }
        let size = w.sizes.iter().sum::<usize>() / w.sizes.len();
        let send = send / ROUNDS;
        let receive = receive / (2 * ROUNDS);
        println!(
            "{group:>6}: payload {size} bytes per recipient, send (2 recipients) {:.1} µs, receive {:.1} µs",
            micros(send),
            micros(receive)
        );
        results.push((size, send, receive));
    }
    let (plain, pq) = (results[0], results[1]);
    println!(
        " added: {} bytes per message and recipient, {:.1} µs per send to 2 recipients ({:.1} µs per recipient), {:.1} µs per receive",
        pq.0 - plain.0,
        micros(pq.1.saturating_sub(plain.1)),
        micros(pq.1.saturating_sub(plain.1)) / 2.0,
        micros(pq.2.saturating_sub(plain.2))
    );
}

/// Members of the large group in [`report_fifty_member_group_send`].
const LARGE_GROUP: usize = 50;

#[test]
#[ignore = "a measurement, not a check; run in release with --nocapture"]
fn report_fifty_member_group_send() {
    let mut w = World::new();
    let mut users: Vec<ClientMachine> = (0..LARGE_GROUP)
        .map(|i| ClientMachine::generate([i as u8 + 1; 32]))
        .collect();
    for (i, m) in users.iter().enumerate() {
        w.login(i, m);
    }
    for (i, m) in users.iter_mut().enumerate() {
        w.run(m, i, Command::Register { count: 2 });
    }
    let keys: Vec<_> = users.iter().map(|m| m.identity_key()).collect();
    let (alice, rest) = users.split_first_mut().expect("users");
    w.run(
        alice,
        0,
        Command::CreateGroup {
            name: "big".into(),
            pq: false,
        },
    );
    let start = Instant::now();
    for member in &keys[1..] {
        w.run(
            alice,
            0,
            Command::AddMember {
                group: "big".into(),
                member: *member,
            },
        );
    }
    let adds = start.elapsed();
    for (i, m) in rest.iter_mut().enumerate() {
        w.run(m, i + 1, Command::Receive { wait_ms: 0 });
    }
    let text = "x".repeat(1024);
    let rounds = 50u32;
    let (mut send, mut receive) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        w.requests.clear();
        let start = Instant::now();
        w.run(
            &mut users[0],
            0,
            Command::Send {
                group: "big".into(),
                text: text.clone(),
            },
        );
        send += start.elapsed();
        assert_eq!(w.requests, vec!["enqueueBatch"], "one request per send");
        let start = Instant::now();
        let events = w.run(&mut users[7], 7, Command::Receive { wait_ms: 0 });
        receive += start.elapsed();
        assert_eq!(events.len(), 1, "{events:?}");
    }
    println!(
        "{LARGE_GROUP}-member group: building it (49 adds) {:.0} ms; a 1 KiB send (encrypt once, one enqueueBatch to 49 queues, in-memory server) {:.0} µs; one member's receive {:.0} µs",
        adds.as_secs_f64() * 1e3,
        micros(send / rounds),
        micros(receive / rounds)
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct World {
    node: NodeWorld,
    /// Payload sizes of the enqueues since the last clear.
    sizes: Vec<usize>,
    /// Methods of the requests since the last clear.
    requests: Vec<&'static str>,
}

impl World {
    fn new() -> World {
        World {
            node: NodeWorld::new(unlimited(NodeConfig::default())),
            sizes: Vec::new(),
            requests: Vec::new(),
        }
    }

    fn login(&mut self, who: usize, m: &ClientMachine) {
        self.node.login(who as u64, m.signing_key());
    }

    /// Runs one command to its end; it must succeed. Returns its events
    /// (messages only; warnings fail).
    fn run(&mut self, m: &mut ClientMachine, who: usize, command: Command) -> Vec<Event> {
        let (sizes, requests) = (&mut self.sizes, &mut self.requests);
        let mut note = |request: &RequestBody| {
            requests.push(request.method());
            if let RequestBody::Enqueue { payload, .. } = request {
                sizes.push(payload.len());
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
