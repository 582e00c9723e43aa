//! The soak's short form. `benches/soak.sh` runs the `mixed` load of
//! `qpq-bench` for an hour against the release server and samples it every
//! ten seconds (BENCHMARKS.md, "Soak"); this runs the same load for
//! `QPQ_SOAK_SECS` seconds (default 10) against a server in this process
//! and samples its live counts every 100 ms. While the load runs, the
//! counts stay within the bounds the server documents for this load: no
//! more connections than clients, at most one waiting long-poll per
//! connection, at most one request being served per slot and long-poll;
//! no request fails. After the clients close, the counts return to zero
//! and the process's file descriptors to what they were before, so a
//! connection, waiter, reply or socket left behind fails here (the store's
//! own files are not counted: the database keeps the tables it wrote open). What the
//! short form cannot show is slow growth (memory, disk); the hour-long run
//! shows those.

use std::time::Duration;

use quicproquo_benches::load::{self, LoadConfig, Workload};
use quicproquo_benches::scrape::Samples;
use quicproquo_benches::server::bench_setup;
use quicproquo_core::node::Durability;
use quicproquo_server::testing::InProcessServer;

const CONNECTIONS: usize = 20;
const IN_FLIGHT: usize = 2;
/// A hang guard: far beyond the time the counts take to settle.
const GUARD: Duration = Duration::from_secs(30);

/// The server's live counts: connections, waiters, requests being served.
fn counts(server: &InProcessServer) -> (f64, f64, f64) {
    let samples = Samples::parse(&server.metrics().expect("metrics kept").encode());
    (
        samples.sum("qpq_connections", &[]),
        samples.sum("qpq_waiters", &[]),
        samples.sum("qpq_pending_requests", &[]),
    )
}

/// File descriptors of this process, except the store's own files under
/// `data` (the database opens table files as it flushes, and keeps them).
fn open_fds(data: &std::path::Path) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| std::fs::read_link(e.path()).map_or(true, |t| !t.starts_with(data)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mixed_load_keeps_the_server_within_its_bounds_and_leaves_nothing_behind() {
    let secs: f64 = std::env::var("QPQ_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let dir = tempfile::tempdir().expect("data directory");
    let server = InProcessServer::start_with(dir.path(), bench_setup(Durability::Fsync, true));
    let fds_before = open_fds(dir.path());
    let config = LoadConfig {
        server: server.addr.to_string(),
        trust: server.trust(),
        workload: Workload::Mixed,
        connections: CONNECTIONS,
        in_flight: IN_FLIGHT,
        payload_bytes: 256,
        duration: Duration::from_secs_f64(secs),
        count: None,
        warmup: Duration::ZERO,
        fetch_limit: 100,
        prefill: 0,
        metrics_url: None,
        progress: false,
    };
    // The load runs on its own task; this one samples between sleeps.
    let load = tokio::spawn(load::run(config));
    let (mut connections, mut waiters, mut pending) = (0.0f64, 0.0f64, 0.0f64);
    let mut samples = 0u32;
    while !load.is_finished() {
        let (c, w, p) = counts(&server);
        (connections, waiters, pending) = (connections.max(c), waiters.max(w), pending.max(p));
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = load.await.expect("load task");
    let report = report.expect("the load ran");
    eprintln!(
        "soak short form: {:.1} s, {} requests, {} messages delivered, {samples} samples; \
         peaks: {connections} connections, {waiters} waiters, {pending} requests being served",
        report.elapsed_s, report.ops, report.items
    );
    assert_eq!(report.errors, 0, "first error: {:?}", report.first_error);
    assert!(report.ops > 0 && report.items > 0, "the load did nothing");
    assert!(
        connections <= CONNECTIONS as f64,
        "{connections} connections"
    );
    assert!(
        waiters <= CONNECTIONS as f64,
        "{waiters} waiting long-polls"
    );
    assert!(
        pending <= (CONNECTIONS * (IN_FLIGHT + 1)) as f64,
        "{pending} requests being served"
    );
    // The clients closed their connections: everything they held goes.
    let settled = tokio::time::timeout(GUARD, async {
        loop {
            if counts(&server) == (0.0, 0.0, 0.0) && open_fds(dir.path()) <= fds_before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "left behind after the load: (connections, waiters, requests) = {:?}, \
         file descriptors {} (before: {fds_before})",
        counts(&server),
        open_fds(dir.path())
    );
    server.stop().await;
}
