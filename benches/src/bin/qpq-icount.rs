//! `qpq-icount`: the instruction-count benches. Each one sets up a machine,
//! warms it up, then runs a fixed number of operations inside one function,
//! [`icount_measured`], which `valgrind --tool=callgrind
//! --toggle-collect='*icount_measured*'` counts the instructions of. The
//! count does not depend on what else the machine is doing, so CI can
//! compare it against a committed baseline (`benches/tests/icount.rs`).
//!
//! `qpq-icount BENCH` runs one bench and prints the number of operations it
//! measured; `qpq-icount --list` prints the benches' names. Run natively it
//! measures nothing; the figures come from callgrind.

use std::hint::black_box;
use std::process::ExitCode;

use quicproquo_benches::core_rig::{CoreRig, TICK, identity};
use quicproquo_core::node::{NodeConfig, Request, RequestBody, Response};
use quicproquo_core::testing::{self, NodeWorld};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use quicproquo_proto::{decode_request, encode_reply, encode_request};

/// qpq-server's allocator, so that allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Payload of every enqueue and KeyPackage: a typical MLS application
/// message with padding.
const PAYLOAD_BYTES: usize = 1024;
/// Operations before the measured ones: the maps and the allocator reach
/// their steady state.
const WARM_UP: u64 = 200;
/// Operations measured.
const OPS: u64 = 1_000;

/// A bench: it sets up, warms up, measures, and returns the operations
/// measured.
type Bench = fn() -> u64;

/// The benches: name and what runs them. Names are `layer/operation/size`,
/// as in the criterion benches.
const BENCHES: [(&str, Bench); 5] = [
    ("core/enqueue/1024", core_enqueue),
    ("core/enqueue_fetch/1024", core_enqueue_fetch),
    ("core/keypackage_pop/1024", core_keypackage_pop),
    ("request/enqueue/1024", request_enqueue),
    ("request/enqueue_fetch/1024", request_enqueue_fetch),
];

fn main() -> ExitCode {
    let arg = std::env::args().nth(1).unwrap_or_default();
    if arg == "--list" {
        for (name, _) in BENCHES {
            println!("{name}");
        }
        return ExitCode::SUCCESS;
    }
    match BENCHES.iter().find(|(name, _)| *name == arg) {
        Some((_, run)) => {
            println!("{}", run());
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "usage: qpq-icount BENCH | --list (run under valgrind --tool=callgrind \
                 --toggle-collect='*icount_measured*'); benches: {}",
                BENCHES.map(|(n, _)| n).join(", ")
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs `op` `ops` times; the only function callgrind counts.
#[inline(never)]
fn icount_measured(ops: u64, mut op: impl FnMut(u64)) {
    for i in 0..ops {
        op(black_box(i));
    }
}

/// Warms up with `op`, then measures it; returns the operations measured.
fn bench(mut op: impl FnMut(u64)) -> u64 {
    for i in 0..WARM_UP {
        op(i);
    }
    icount_measured(OPS, |i| op(WARM_UP + i));
    OPS
}

fn payload() -> Vec<u8> {
    vec![0x42; PAYLOAD_BYTES]
}

/// One enqueue to the sender's own queue (in fsync mode, synced at once).
/// The queue is acknowledged after the warm-up only, so it holds at most
/// `WARM_UP + OPS` messages, under the default depth limit.
fn core_enqueue() -> u64 {
    let mut rig = CoreRig::new();
    let alice = CoreRig::user(1);
    let me = identity(&alice);
    rig.login(1, &alice);
    let payload = payload();
    bench(|_| {
        rig.enqueue(1, me, payload.clone());
    })
}

/// One enqueue and one fetch whose cursor acknowledges the previous
/// message and reads the new one: the steady state of a live chat.
fn core_enqueue_fetch() -> u64 {
    let mut rig = CoreRig::new();
    let alice = CoreRig::user(1);
    let me = identity(&alice);
    rig.login(1, &alice);
    let payload = payload();
    let mut last = 0;
    bench(|_| {
        let seq = rig.enqueue(1, me, payload.clone());
        let got = rig.fetch(1, me, last, 1);
        assert_eq!(got, 1, "the fetch returns the new message");
        last = seq;
    })
}

/// One KeyPackage handed out (removed with its pool's new head in one
/// batch) from a pool filled before: the pop alone.
fn core_keypackage_pop() -> u64 {
    let config = NodeConfig {
        key_packages_per_identity_max: u32::try_from(WARM_UP + OPS).expect("small"),
        ..testing::unlimited(NodeConfig::default())
    };
    let mut rig = CoreRig::with_config(config);
    let (alice, bob) = (CoreRig::user(1), CoreRig::user(2));
    rig.login(1, &alice);
    rig.login(2, &bob);
    for _ in 0..WARM_UP + OPS {
        let up = rig.call(
            1,
            RequestBody::UploadKeyPackage {
                identity_key: identity(&alice),
                package: payload(),
                last_resort: false,
                cipher_suite: 0,
            },
        );
        assert!(matches!(up, Ok(Response::KeyPackageUploaded { .. })));
    }
    let target = identity(&alice);
    bench(|_| {
        let pop = rig.call(
            2,
            RequestBody::FetchKeyPackage {
                identity_key: target,
                cipher_suite: 0,
            },
        );
        assert!(matches!(
            pop,
            Ok(Response::KeyPackage {
                last_resort: false,
                ..
            })
        ));
    })
}

/// The server's request path without its tasks and sockets: the bytes of
/// a request decoded, fed to the machine, its outputs drained (syncing
/// when asked) and the reply encoded to bytes.
struct Wire {
    world: NodeWorld,
}

impl Wire {
    fn new() -> Wire {
        let mut world = NodeWorld::new(NodeConfig::default());
        // A millisecond per request, as in `CoreRig`: the sender stays
        // within its enqueue rate, whose bookkeeping is counted.
        world.set_tick(TICK);
        Wire { world }
    }

    /// Handles the encoded request `bytes` from `conn`; returns the encoded
    /// reply. The machine runs inside `NodeWorld` (the core crate's own
    /// build of it, as the server shell's is the server crate's), which
    /// drains its outputs and syncs when asked.
    fn request(&mut self, conn: u64, bytes: &[u8]) -> Vec<u8> {
        let request = decode_request(bytes).expect("the request decodes");
        let reply = self.world.call(conn, request.body);
        encode_reply(&reply)
    }
}

fn enqueue_bytes(recipient_key: IdentityKey, n: u64) -> Vec<u8> {
    let mut message_id = [0u8; 16];
    message_id[..8].copy_from_slice(&n.to_le_bytes());
    encode_request(&Request {
        auth_version: quicproquo_core::limits::AUTH_VERSION,
        body: RequestBody::Enqueue {
            recipient_key,
            channel_id: ChannelId::DEFAULT,
            payload: payload(),
            message_id: MessageId(message_id),
        },
    })
}

fn fetch_bytes(recipient_key: IdentityKey, after_seq: u64) -> Vec<u8> {
    encode_request(&Request {
        auth_version: quicproquo_core::limits::AUTH_VERSION,
        body: RequestBody::Fetch {
            recipient_key,
            channel_id: ChannelId::DEFAULT,
            after_seq,
            limit: 1,
        },
    })
}

/// An enqueue request's bytes to its reply's bytes.
fn request_enqueue() -> u64 {
    let mut wire = Wire::new();
    let alice = testing::user(1);
    let me = identity(&alice);
    wire.world.login(1, &alice);
    // Encoded before, so the count holds only what the server does.
    let requests: Vec<Vec<u8>> = (0..WARM_UP + OPS).map(|n| enqueue_bytes(me, n)).collect();
    bench(|i| {
        let reply = wire.request(1, &requests[i as usize]);
        black_box(reply);
    })
}

/// An enqueue and a fetch (acknowledging the previous message, reading the
/// new one), bytes to bytes.
fn request_enqueue_fetch() -> u64 {
    let mut wire = Wire::new();
    let alice = testing::user(1);
    let me = identity(&alice);
    wire.world.login(1, &alice);
    // Seqs start at 1, so message n gets seq n + 1 and its fetch
    // acknowledges seq n.
    let requests: Vec<(Vec<u8>, Vec<u8>)> = (0..WARM_UP + OPS)
        .map(|n| (enqueue_bytes(me, n), fetch_bytes(me, n)))
        .collect();
    bench(|i| {
        let (enqueue, fetch) = &requests[i as usize];
        black_box(wire.request(1, enqueue));
        black_box(wire.request(1, fetch));
    })
}
