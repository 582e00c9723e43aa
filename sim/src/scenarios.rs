//! The scenarios: each is a function from a seed to a [`Plan`] (network,
//! actors, fault schedule). Everything random in a plan comes from the seed.
//!
//! | scenario | what it stresses |
//! |---|---|
//! | [`lossy_network`] | 5-20% datagram loss, variable latency (reordering), 8 senders, 4 recipients on 2 channels each, snoopers |
//! | [`server_crash`] | the server crashed 1-3 times mid-traffic with slow syncs, so unsynced writes are lost |
//! | [`lost_ack`] | enqueue acknowledgements dropped after the server handled the request; the sender retries with the same messageId |
//! | [`key_packages`] | six clients popping one identity's KeyPackages while its owner uploads more and the server crashes |
//! | [`partitions`] | links between the server and one client at a time cut (both ways or one way) and healed while traffic runs |
//! | [`lost_fetch_answer`] | a fetch answer dropped after the server handled it, the recipient crashed and restarted from its saved cursor |
//! | [`long_poll_storm`] | twelve long-polling recipients, crashed and restarted at random, with partition flaps |
//! | [`mls_group`] | three full MLS clients form a group and chat under 5-20% loss, with client and server crashes on some seeds |
//! | [`mls_direct`] | three MLS clients with direct links to each other chat while the links between members are cut and mended, a member's server link is cut, under 5-20% loss, with client and server crashes on some seeds |
//! | [`mls_commits`] | three or four MLS clients rotate their keys at the same instants (racing Commits) while they chat, under 5-20% loss and partitions, with client and server crashes on some seeds |

use std::rc::Rc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use quicproquo_core::types::{ChannelId, MessageId, QueueId};

use crate::actors::{
    KeyOwnerPlan, PlannedMessage, PollerPlan, PopperPlan, SenderPlan, SnooperPlan, identity,
};
use crate::coverage::Coverage;
use crate::driver::{Fault, Plan};
use crate::mls::{Action, MemberPlan, What, When};
use crate::rng::Rng;

/// A named scenario and how many seeds the default sweep runs.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Name (also the test's name).
    pub name: &'static str,
    /// Builds the plan for a seed.
    pub plan: fn(u64) -> Plan,
    /// Seeds of the default `cargo test` sweep.
    pub default_seeds: u64,
    /// What a sweep of this scenario must have exercised (over all its
    /// seeds together), in words.
    pub exercises: &'static str,
    /// Whether a sweep's added-up coverage shows [`Self::exercises`].
    pub exercised: fn(&Coverage) -> bool,
}

/// Every scenario.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "lossy_network",
        plan: lossy_network,
        default_seeds: 16,
        exercises: "requests for others' queues refused",
        exercised: |c| c.foreign_refused > 0,
    },
    Scenario {
        name: "server_crash",
        plan: server_crash,
        default_seeds: 16,
        exercises: "server crashes that discard unsynced writes, and enqueue retries",
        exercised: |c| c.unsynced_batches_lost > 0 && c.enqueue_retries > 0,
    },
    Scenario {
        name: "lost_ack",
        plan: lost_ack,
        default_seeds: 16,
        exercises: "enqueues retried after the recipient already had the message",
        exercised: |c| c.retries_after_delivery > 0,
    },
    Scenario {
        name: "key_packages",
        plan: key_packages,
        default_seeds: 16,
        exercises: "KeyPackages popped across server crashes and the last resort served",
        exercised: |c| {
            c.server_crashes > 0 && c.key_packages_popped > 0 && c.last_resort_served > 0
        },
    },
    Scenario {
        name: "partitions",
        plan: partitions,
        default_seeds: 16,
        exercises: "enqueue retries",
        exercised: |c| c.enqueue_retries > 0,
    },
    Scenario {
        name: "lost_fetch_answer",
        plan: lost_fetch_answer,
        default_seeds: 16,
        exercises: "crashed recipients fetching lost answers again",
        exercised: |c| c.client_crashes > 0 && c.lost_answers_refetched > 0,
    },
    Scenario {
        name: "long_poll_storm",
        plan: long_poll_storm,
        default_seeds: 8,
        exercises: "crashed long-polling recipients",
        exercised: |c| c.client_crashes > 0,
    },
    Scenario {
        name: "mls_group",
        plan: mls_group,
        default_seeds: 16,
        exercises: "plaintexts shown across client and server crashes, and commands run again",
        exercised: |c| {
            c.plaintexts_shown > 0
                && c.client_crashes > 0
                && c.server_crashes > 0
                && c.commands_retried > 0
        },
    },
    Scenario {
        name: "mls_direct",
        plan: mls_direct,
        default_seeds: 8,
        exercises: "plaintexts taken over direct links, direct links lost and made again, and plaintexts shown across client and server crashes",
        exercised: |c| {
            c.plaintexts_direct > 0
                && c.direct_links_lost > 0
                && c.plaintexts_shown > c.plaintexts_direct
                && c.client_crashes > 0
                && c.server_crashes > 0
        },
    },
    Scenario {
        name: "mls_commits",
        plan: mls_commits,
        default_seeds: 8,
        exercises: "updates started in the same instant by several members, Commits that lost their epoch and were made again, and plaintexts shown, across client and server crashes, with commands run again",
        exercised: |c| {
            c.updates_made > 0
                && c.updates_same_instant > 0
                && c.updates_raced > 0
                && c.plaintexts_shown > 0
                && c.client_crashes > 0
                && c.server_crashes > 0
                && c.commands_retried > 0
        },
    },
];

/// The scenario called `name`.
pub fn scenario(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// A lossy, reordering network: 5-20% of datagrams lost, latency varying
/// per datagram; 8 senders to 4 recipients on 2 channels each, one
/// authenticated and one anonymous snooper.
pub fn lossy_network(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "lossy_network", 0);
    let loss = rng.float(0.05, 0.20);
    let min = rng.millis(0, 10);
    let latency = (min, min + rng.millis(20, 150));
    let w = Workload {
        senders: 8,
        recipients: 4,
        channels: 2,
        messages: (4, 8),
        pause_ms: (0, 100),
        wait_ms_max: 3_000,
        abandon: 0.0,
    }
    .build(seed, &mut rng);
    let snoopers = w.snoopers(&mut rng, 2);
    plan(
        "lossy_network",
        seed,
        loss,
        latency,
        (0, 2),
        w,
        snoopers,
        Vec::new(),
    )
}

/// The server crashes 1-3 times while traffic runs and comes back after up
/// to 1.5 s; syncs take 1-10 ms, so crashes land on unsynced writes.
pub fn server_crash(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "server_crash", 0);
    let loss = rng.float(0.0, 0.05);
    let min = rng.millis(1, 10);
    let latency = (min, min + rng.millis(10, 60));
    let w = Workload {
        senders: 6,
        recipients: 3,
        channels: 2,
        messages: (8, 12),
        pause_ms: (0, 150),
        wait_ms_max: 2_000,
        abandon: 0.0,
    }
    .build(seed, &mut rng);
    let snoopers = w.snoopers(&mut rng, 1);
    let crashes = rng.between(1, 3);
    let faults = server_crashes(&mut rng, crashes, (200, 3_000), 1_500);
    plan(
        "server_crash",
        seed,
        loss,
        latency,
        (1, 10),
        w,
        snoopers,
        faults,
    )
}

/// Enqueue acknowledgements lost after the server handled the request: for
/// two messages per sender the server's answers are dropped for longer than
/// the sender waits, so it retries (on a new connection) with the same
/// messageId; for one more they are dropped briefly, so the answer is only
/// late. Recipients on healthy links usually see the message before the
/// retry.
pub fn lost_ack(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "lost_ack", 0);
    let loss = rng.float(0.0, 0.03);
    let min = rng.millis(1, 5);
    let latency = (min, min + rng.millis(5, 50));
    let mut w = Workload {
        senders: 4,
        recipients: 2,
        channels: 1,
        messages: (6, 8),
        pause_ms: (0, 200),
        wait_ms_max: 2_000,
        abandon: 0.0,
    }
    .build(seed, &mut rng);
    for s in &mut w.senders {
        let s = Rc::get_mut(s).expect("plans are not shared yet");
        let n = s.messages.len() as u64;
        for k in 0..3 {
            let m = &mut s.messages[rng.below(n) as usize];
            m.lose_ack_for = Some(if k < 2 {
                rng.millis(2_500, 4_500)
            } else {
                rng.millis(200, 1_200)
            });
        }
    }
    plan(
        "lost_ack",
        seed,
        loss,
        latency,
        (0, 3),
        w,
        Vec::new(),
        Vec::new(),
    )
}

/// Six clients pop one identity's KeyPackages (more pops than packages, so
/// the last resort is served) while the owner uploads more and the server
/// crashes once or twice.
pub fn key_packages(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "key_packages", 0);
    let loss = rng.float(0.0, 0.05);
    let min = rng.millis(1, 10);
    let latency = (min, min + rng.millis(10, 50));
    let owner = Rc::new(KeyOwnerPlan {
        name: "kp-owner".into(),
        key: signing_key(&mut rng),
        initial: 24,
        last_resort: true,
        later: 6,
    });
    let target = identity(&owner.key);
    let poppers = (0..6)
        .map(|i| {
            Rc::new(PopperPlan {
                name: format!("popper-{i}"),
                key: signing_key(&mut rng),
                target,
                pops: 6,
            })
        })
        .collect();
    let crashes = rng.between(1, 2);
    let faults = server_crashes(&mut rng, crashes, (100, 3_000), 1_000);
    Plan {
        key_owner: Some(owner),
        poppers,
        ..plan(
            "key_packages",
            seed,
            loss,
            latency,
            (1, 10),
            Workload::default().build(seed, &mut rng),
            Vec::new(),
            faults,
        )
    }
}

/// The link between the server and one client at a time is cut (both
/// ways, or only one way) for 0.3-4 s and healed, over about ten seconds
/// of traffic.
pub fn partitions(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "partitions", 0);
    let loss = rng.float(0.0, 0.02);
    let min = rng.millis(1, 10);
    let latency = (min, min + rng.millis(5, 40));
    let w = Workload {
        senders: 6,
        recipients: 3,
        channels: 2,
        messages: (8, 12),
        pause_ms: (100, 600),
        wait_ms_max: 3_000,
        abandon: 0.0,
    }
    .build(seed, &mut rng);
    let hosts = w.hosts();
    let mut faults = Vec::new();
    let mut t = rng.millis(100, 500);
    while t < Duration::from_secs(10) {
        let h = rng.pick(&hosts).clone();
        faults.push((
            t,
            match rng.below(3) {
                0 => Fault::Partition(h.clone()),
                1 => Fault::PartitionToHost(h.clone()),
                _ => Fault::PartitionFromHost(h.clone()),
            },
        ));
        t += rng.millis(300, 4_000);
        faults.push((t, Fault::Repair(h)));
        t += rng.millis(0, 800);
    }
    plan(
        "partitions",
        seed,
        loss,
        latency,
        (0, 3),
        w,
        Vec::new(),
        faults,
    )
}

/// Each recipient has one fetch answer dropped after the server handled
/// it (the fetch acknowledged older messages and returned newer ones); the
/// recipient's host is then crashed and restarted, and fetches again from
/// the cursor it had saved.
pub fn lost_fetch_answer(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "lost_fetch_answer", 0);
    let loss = rng.float(0.0, 0.02);
    let min = rng.millis(1, 10);
    let latency = (min, min + rng.millis(5, 40));
    let mut w = Workload {
        senders: 3,
        recipients: 3,
        channels: 1,
        messages: (8, 10),
        pause_ms: (50, 250),
        wait_ms_max: 1_000,
        abandon: 0.0,
    }
    .build(seed, &mut rng);
    for p in &mut w.pollers {
        let p = Rc::get_mut(p).expect("plans are not shared yet");
        p.lose_answer_from = Some(rng.between(0, 3) as u32);
    }
    plan(
        "lost_fetch_answer",
        seed,
        loss,
        latency,
        (0, 3),
        w,
        Vec::new(),
        Vec::new(),
    )
}

/// Twelve recipients long-poll with waits up to the 25 s maximum while
/// their hosts crash and restart at random, links to them flap, and now
/// and then a recipient gives up on a long-poll and drops its connection;
/// the server must let go of a closed connection's waiter at once and end
/// with no waiter and no connection once they are gone.
pub fn long_poll_storm(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "long_poll_storm", 0);
    let loss = rng.float(0.0, 0.03);
    let min = rng.millis(1, 10);
    let latency = (min, min + rng.millis(5, 40));
    let w = Workload {
        senders: 4,
        recipients: 6,
        channels: 2,
        messages: (6, 10),
        pause_ms: (200, 1_000),
        wait_ms_max: 25_000,
        abandon: 0.3,
    }
    .build(seed, &mut rng);
    let pollers: Vec<String> = w.pollers.iter().map(|p| p.name.clone()).collect();
    let mut faults = Vec::new();
    for _ in 0..rng.between(6, 10) {
        let h = rng.pick(&pollers).clone();
        faults.push((
            rng.millis(300, 12_000),
            Fault::CrashClient(h, rng.millis(0, 2_000)),
        ));
    }
    for _ in 0..rng.between(6, 10) {
        let h = rng.pick(&pollers).clone();
        let t = rng.millis(300, 12_000);
        faults.push((t, Fault::Partition(h.clone())));
        faults.push((t + rng.millis(200, 3_000), Fault::Repair(h)));
    }
    plan(
        "long_poll_storm",
        seed,
        loss,
        latency,
        (0, 3),
        w,
        Vec::new(),
        faults,
    )
}

/// Three full MLS clients (the real client machine, driven by the client
/// library's command loop) under 5-20% loss and variable latency: all
/// register, the first creates a group and adds the other two, then each
/// sends 4-6 messages. Seeds 1 and 3 (mod 4) crash members' hosts 1-3
/// times (each restarts from its state file), seeds 2 and 3 crash the
/// server once or twice, in the first 15 s. After the network heals every member receives until idle;
/// each must have been shown every other member's messages exactly once,
/// in order.
pub fn mls_group(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "mls_group", 0);
    let loss = rng.float(0.05, 0.20);
    let min = rng.millis(0, 10);
    let latency = (min, min + rng.millis(20, 150));
    let group = "team".to_owned();
    let mut members: Vec<MemberPlan> = (0..3)
        .map(|i| MemberPlan::new(format!("member-{i}"), rng.bytes(), group.clone()))
        .collect();
    let identities: Vec<_> = members.iter().map(|m| m.identity).collect();
    for (i, m) in members.iter_mut().enumerate() {
        m.creator = i == 0;
        m.peers = identities
            .iter()
            .copied()
            .filter(|id| *id != m.identity)
            .collect();
        m.actions = (0..rng.between(4, 6))
            .map(|k| Action {
                when: When::After(rng.millis(0, 1_000)),
                what: What::Send(format!("mls/{seed}/{i}/{k}")),
            })
            .collect();
    }
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let faults = mls_crashes(seed, &mut rng, &names);
    mls_plan("mls_group", seed, loss, latency, members, faults, &mut rng)
}

/// Three full MLS clients as in [`mls_group`], each with a direct link to
/// the others (`quicproquo-p2p` over the simulated network, carried by
/// the client library's command loop): an application message to a
/// member reached directly goes only to them, anything else through the
/// server. Each sends 6-10 messages. 2-4 times the link between two
/// members is cut for 0.3-3 s and mended (their messages then go through
/// the server, and the link is dialed again), and 0-2 times a member's
/// link to the server is cut for 0.3-3 s (its messages to members it
/// reaches directly go on); 5-20% loss throughout; client and server
/// crashes as in [`mls_group`]. After the network heals every member
/// receives until idle: each plaintext shown exactly once, in its
/// sender's order, whichever path it took.
pub fn mls_direct(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "mls_direct", 0);
    let loss = rng.float(0.05, 0.20);
    let min = rng.millis(0, 10);
    let latency = (min, min + rng.millis(20, 150));
    let group = "team".to_owned();
    let mut members: Vec<MemberPlan> = (0..3)
        .map(|i| MemberPlan::new(format!("member-{i}"), rng.bytes(), group.clone()))
        .collect();
    let everyone: Vec<_> = members
        .iter()
        .map(|m| (m.identity, m.name.clone()))
        .collect();
    for (i, m) in members.iter_mut().enumerate() {
        m.creator = i == 0;
        m.direct_peers = everyone
            .iter()
            .filter(|(id, _)| *id != m.identity)
            .cloned()
            .collect();
        m.peers = m.direct_peers.iter().map(|(id, _)| *id).collect();
        m.actions = (0..rng.between(6, 10))
            .map(|k| Action {
                when: When::After(rng.millis(0, 1_000)),
                what: What::Send(format!("mls/{seed}/{i}/{k}")),
            })
            .collect();
    }
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let mut faults = Vec::new();
    for _ in 0..rng.between(2, 4) {
        let a = rng.below(3) as usize;
        let b = (a + 1 + rng.below(2) as usize) % 3;
        let t = rng.millis(1_000, 12_000);
        faults.push((t, Fault::PartitionPeers(names[a].clone(), names[b].clone())));
        faults.push((
            t + rng.millis(300, 3_000),
            Fault::RepairPeers(names[a].clone(), names[b].clone()),
        ));
    }
    for _ in 0..rng.between(0, 2) {
        let h = rng.pick(&names).clone();
        let t = rng.millis(1_000, 12_000);
        faults.push((t, Fault::Partition(h.clone())));
        faults.push((t + rng.millis(300, 3_000), Fault::Repair(h)));
    }
    faults.extend(mls_crashes(seed, &mut rng, &names));
    mls_plan("mls_direct", seed, loss, latency, members, faults, &mut rng)
}

/// Three or four full MLS clients under 5-20% loss and variable latency,
/// as in [`mls_group`], that rotate their keys while they chat. Once the
/// creator has added everyone and 1.5-2.5 s more have passed, 3-5 update
/// rounds follow, 0.5-2 s apart:
/// in each, 2 or more members start an `update` (a Commit) in the same
/// instant, so their Commits race for one epoch; the server accepts one
/// and the others catch up and commit again. Between and at those
/// instants each member sends 3-5 messages and receives now and then.
/// Every seed cuts the link between the server and a member 1-3 times for
/// 0.3-3 s (both ways or either way only); client and server crashes as
/// in [`mls_group`]. After the network heals every member receives until
/// idle: besides each plaintext shown once and in order, all must end on
/// one epoch with one epoch authenticator, which counts the updates.
pub fn mls_commits(seed: u64) -> Plan {
    let mut rng = Rng::new(seed, "mls_commits", 0);
    let loss = rng.float(0.05, 0.20);
    let min = rng.millis(0, 10);
    let latency = (min, min + rng.millis(20, 150));
    let group = "team".to_owned();
    let n = rng.between(3, 4) as usize;
    let mut members: Vec<MemberPlan> = (0..n)
        .map(|i| MemberPlan::new(format!("member-{i}"), rng.bytes(), group.clone()))
        .collect();
    let identities: Vec<_> = members.iter().map(|m| m.identity).collect();
    let mut actions: Vec<Vec<Action>> = vec![Vec::new(); n];
    let mut instants = Vec::new();
    // Joiners need a moment to take the Welcome and the adds after them.
    let mut at = rng.millis(1_500, 2_500);
    for _ in 0..rng.between(3, 5) {
        // 2..=n distinct members update at `at`.
        let mut who: Vec<usize> = (0..n).collect();
        let k = rng.between(2, n as u64) as usize;
        for j in 0..k {
            let r = j + rng.below((n - j) as u64) as usize;
            who.swap(j, r);
        }
        for &i in &who[..k] {
            actions[i].push(Action {
                when: When::At(at),
                what: What::Update,
            });
        }
        instants.push(at);
        at += rng.millis(500, 2_000);
    }
    let end = at.as_millis() as u64;
    for (i, list) in actions.iter_mut().enumerate() {
        for _ in 0..rng.between(3, 5) {
            // Some messages go out in an update instant, right behind the
            // update (so they queue behind its pending Commit).
            let t = if rng.chance(0.4) {
                *rng.pick(&instants)
            } else {
                rng.millis(0, end)
            };
            list.push(Action {
                when: When::At(t),
                what: What::Send(String::new()),
            });
        }
        for _ in 0..rng.between(1, 3) {
            list.push(Action {
                when: When::At(rng.millis(0, end)),
                what: What::Receive(rng.between(0, 300)),
            });
        }
        // In time order (stable: an update before a message of its
        // instant); the texts numbered in the order sent.
        list.sort_by_key(|a| match a.when {
            When::At(t) | When::After(t) => t,
        });
        let mut k = 0;
        for a in list.iter_mut() {
            if let What::Send(text) = &mut a.what {
                *text = format!("mls/{seed}/{i}/{k}");
                k += 1;
            }
        }
    }
    for ((i, m), list) in members.iter_mut().enumerate().zip(actions) {
        m.creator = i == 0;
        m.peers = identities
            .iter()
            .copied()
            .filter(|id| *id != m.identity)
            .collect();
        m.actions = list;
    }
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let mut faults = Vec::new();
    for _ in 0..rng.between(1, 3) {
        let h = rng.pick(&names).clone();
        let t = rng.millis(300, 12_000);
        faults.push((
            t,
            match rng.below(3) {
                0 => Fault::Partition(h.clone()),
                1 => Fault::PartitionToHost(h.clone()),
                _ => Fault::PartitionFromHost(h.clone()),
            },
        ));
        faults.push((t + rng.millis(300, 3_000), Fault::Repair(h)));
    }
    faults.extend(mls_crashes(seed, &mut rng, &names));
    mls_plan(
        "mls_commits",
        seed,
        loss,
        latency,
        members,
        faults,
        &mut rng,
    )
}

/// The plan of an MLS scenario: its members, faults and network, the
/// server's syncs taking 1-5 ms, and the default workload beside them.
fn mls_plan(
    scenario: &'static str,
    seed: u64,
    loss: f64,
    latency: (Duration, Duration),
    members: Vec<MemberPlan>,
    faults: Vec<(Duration, Fault)>,
    rng: &mut Rng,
) -> Plan {
    Plan {
        members: members.into_iter().map(Rc::new).collect(),
        ..plan(
            scenario,
            seed,
            loss,
            latency,
            (1, 5),
            Workload::default().build(seed, rng),
            Vec::new(),
            faults,
        )
    }
}

/// The crashes of the MLS scenarios: seeds 1 and 3 (mod 4) crash members'
/// hosts 1-3 times, seeds 2 and 3 crash the server once or twice, in the
/// first 15 s.
fn mls_crashes(seed: u64, rng: &mut Rng, names: &[String]) -> Vec<(Duration, Fault)> {
    let mut faults = Vec::new();
    if seed % 4 == 1 || seed % 4 == 3 {
        for _ in 0..rng.between(1, 3) {
            let h = rng.pick(names).clone();
            faults.push((
                rng.millis(300, 15_000),
                Fault::CrashClient(h, rng.millis(0, 1_500)),
            ));
        }
    }
    if seed % 4 >= 2 {
        let n = rng.between(1, 2);
        faults.extend(server_crashes(rng, n, (300, 15_000), 1_500));
    }
    faults
}

#[allow(clippy::too_many_arguments)]
fn plan(
    scenario: &'static str,
    seed: u64,
    loss: f64,
    latency: (Duration, Duration),
    sync_delay_ms: (u64, u64),
    w: Built,
    snoopers: Vec<Rc<SnooperPlan>>,
    faults: Vec<(Duration, Fault)>,
) -> Plan {
    Plan {
        scenario,
        seed,
        loss,
        latency,
        sync_delay: (
            Duration::from_millis(sync_delay_ms.0),
            Duration::from_millis(sync_delay_ms.1),
        ),
        senders: w.senders,
        pollers: w.pollers,
        snoopers,
        key_owner: None,
        poppers: Vec::new(),
        members: Vec::new(),
        faults,
    }
}

/// `n` server crashes, due at random times within `window_ms`, each down
/// for up to `down_ms_max`.
fn server_crashes(
    rng: &mut Rng,
    n: u64,
    window_ms: (u64, u64),
    down_ms_max: u64,
) -> Vec<(Duration, Fault)> {
    (0..n)
        .map(|_| {
            (
                rng.millis(window_ms.0, window_ms.1),
                Fault::CrashServer(rng.millis(0, down_ms_max)),
            )
        })
        .collect()
}

fn signing_key(rng: &mut Rng) -> SigningKey {
    SigningKey::from_bytes(&rng.bytes::<32>())
}

/// The shape of a queue workload.
#[derive(Debug, Clone, Copy, Default)]
struct Workload {
    senders: usize,
    recipients: usize,
    channels: usize,
    /// Messages per sender, inclusive range.
    messages: (u64, u64),
    /// Think time before each message, inclusive range in milliseconds.
    pause_ms: (u64, u64),
    wait_ms_max: u64,
    /// Chance a poller abandons a long-poll by dropping its connection.
    abandon: f64,
}

/// A built workload: senders with their messages, one poller per queue.
struct Built {
    senders: Vec<Rc<SenderPlan>>,
    pollers: Vec<Rc<PollerPlan>>,
}

impl Workload {
    fn build(self, seed: u64, rng: &mut Rng) -> Built {
        let recipients: Vec<SigningKey> = (0..self.recipients).map(|_| signing_key(rng)).collect();
        let channels: Vec<ChannelId> = (0..self.channels)
            .map(|c| {
                if c == 0 {
                    ChannelId::DEFAULT
                } else {
                    ChannelId::try_from_slice(&rng.bytes::<16>()).expect("16 bytes fit")
                }
            })
            .collect();
        let mut pollers = Vec::new();
        let mut queues = Vec::new();
        for (r, key) in recipients.iter().enumerate() {
            for (c, channel) in channels.iter().enumerate() {
                let queue = QueueId {
                    recipient_key: identity(key),
                    channel_id: *channel,
                };
                queues.push(queue);
                pollers.push(Rc::new(PollerPlan {
                    name: format!("poller-{r}-{c}"),
                    key: key.clone(),
                    queue,
                    wait_ms_max: self.wait_ms_max,
                    abandon: self.abandon,
                    lose_answer_from: None,
                    cursor: Default::default(),
                    starts: Default::default(),
                }));
            }
        }
        let senders = (0..self.senders)
            .map(|s| {
                let n = rng.between(self.messages.0, self.messages.1);
                let messages = (0..n)
                    .map(|k| {
                        let mut payload = format!("m/{seed}/{s}/{k}/").into_bytes();
                        payload.extend((0..rng.between(1, 64)).map(|_| rng.below(256) as u8));
                        PlannedMessage {
                            queue: *rng.pick(&queues),
                            message_id: MessageId(rng.bytes::<16>()),
                            payload,
                            pause_before: rng.millis(self.pause_ms.0, self.pause_ms.1),
                            lose_ack_for: None,
                        }
                    })
                    .collect();
                Rc::new(SenderPlan {
                    name: format!("sender-{s}"),
                    key: signing_key(rng),
                    messages,
                })
            })
            .collect();
        Built { senders, pollers }
    }
}

impl Built {
    /// Every client host of the workload.
    fn hosts(&self) -> Vec<String> {
        self.senders
            .iter()
            .map(|s| s.name.clone())
            .chain(self.pollers.iter().map(|p| p.name.clone()))
            .collect()
    }

    /// `n` snoopers asking for the workload's queues: the first
    /// authenticated as an identity of its own, the second anonymous.
    fn snoopers(&self, rng: &mut Rng, n: usize) -> Vec<Rc<SnooperPlan>> {
        let victims: Vec<QueueId> = self.pollers.iter().map(|p| p.queue).collect();
        (0..n)
            .map(|i| {
                Rc::new(SnooperPlan {
                    name: format!("snooper-{i}"),
                    key: (i % 2 == 0).then(|| signing_key(rng)),
                    victims: victims.clone(),
                })
            })
            .collect()
    }
}
