//! A long-poll whose connection is gone holds nothing on the server, and a
//! pending long-poll does not hold up a clean shutdown.
//!
//! Both were found by writing the long-poll storm scenario: the server kept
//! a closed connection's fetchWait (its waiter, the connection in the
//! machine and its per-address slot) until the wait's deadline, up to 25 s,
//! and a shutdown waited for that deadline too.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use quicproquo_core::types::ChannelId;
use quicproquo_server::config::transport::{SHUTDOWN_CLOSE_MS, SHUTDOWN_GRACE_MS};
use quicproquo_sim::actors::{Ctx, Session, identity};
use quicproquo_sim::server::{SERVER_HOST, SimServer, SimStore};

/// A simulation with a server and one client that starts a 20 s
/// fetchWait; the client closes its connection after 1 s if `close` is set,
/// otherwise keeps it open. Returns the sim, the server and a flag set once
/// the long-poll is pending (and, with `close`, the connection closed).
fn long_poll(close: bool) -> (turmoil::Sim<'static>, SimServer, Rc<Cell<bool>>) {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(5))
        .rng_seed(1)
        .build();
    let ctx = Ctx {
        rec: Default::default(),
        loss: Default::default(),
        seed: 1,
        progress: Default::default(),
    };
    let server = SimServer::new(
        SimStore::new(1, Duration::ZERO, Duration::ZERO),
        ctx.loss.clone(),
        1,
    );
    server.register(&mut sim);
    let ready = Rc::new(Cell::new(false));
    let r = ready.clone();
    sim.client("poller", async move {
        let key = SigningKey::from_bytes(&[7; 32]);
        let me = identity(&key);
        let mut session = Session::open(&ctx, 2, Some(key)).await?;
        let client = session.client().await?;
        let waiting = tokio::task::spawn_local(async move {
            client
                .fetch_wait(me, ChannelId::DEFAULT, 0, 10, 20_000)
                .await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        if close {
            session.close().await;
        }
        r.set(true);
        // Without a close the call ends when the server shuts down: it is
        // answered (with nothing), not cut.
        let answered = waiting.await.expect("the long-poll task");
        if !close {
            assert!(answered?.messages.is_empty());
        }
        Ok(())
    });
    while !ready.get() {
        sim.step().unwrap();
    }
    (sim, server, ready)
}

#[test]
fn a_closed_connection_releases_its_waiter() {
    let (mut sim, server, _) = long_poll(true);
    // Two seconds of simulated time after the close.
    for _ in 0..2_000 {
        sim.step().unwrap();
    }
    let (gauges, open) = server.gauges().expect("server running");
    assert_eq!(open, 0, "QUIC connection closed");
    assert_eq!(
        (gauges.connections, gauges.waiters, gauges.pending_requests),
        (0, 0, 0),
        "two seconds after the client closed its connection the server still holds {gauges:?}"
    );
}

#[test]
fn a_pending_long_poll_is_answered_at_shutdown_and_holds_nothing_up() {
    let (mut sim, server, _) = long_poll(false);
    assert_eq!(server.gauges().expect("server running").0.waiters, 1);
    server.shut_down();
    let start = sim.elapsed();
    // The long-poll only waits: it is answered at once rather than held
    // until the grace period ends, so the server is gone well before then.
    let bound = Duration::from_millis(SHUTDOWN_GRACE_MS - SHUTDOWN_CLOSE_MS);
    while sim.is_host_running(SERVER_HOST) {
        sim.step().unwrap();
        assert!(
            sim.elapsed() - start < bound,
            "the server was still shutting down {:?} after the signal",
            sim.elapsed() - start
        );
    }
}
