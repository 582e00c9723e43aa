//! A seed is a complete description of a run: replaying it gives the same
//! history, event for event and at the same simulated times. This is what
//! makes a failing seed worth printing.

use quicproquo_sim::scenarios::scenario;
use quicproquo_sim::sweep::run_seed;

fn check(name: &str, seed: u64) {
    let s = scenario(name).expect("scenario exists");
    let first = run_seed(s, seed);
    let second = run_seed(s, seed);
    assert!(first.violations.is_empty(), "{:?}", first.violations);
    assert_eq!(
        first.history, second.history,
        "{name} seed {seed} did not replay identically"
    );
    assert!(first.history.events.len() > 50, "the run did something");
}

#[test]
fn a_seed_with_server_crashes_replays_identically() {
    check("server_crash", 11);
}

#[test]
fn a_seed_with_loss_and_snoopers_replays_identically() {
    check("lossy_network", 12);
}

#[test]
fn a_seed_with_mls_clients_and_crashes_replays_identically() {
    check("mls_group", 3);
}

#[test]
fn a_seed_with_racing_commits_and_crashes_replays_identically() {
    check("mls_commits", 3);
}

#[test]
fn a_seed_with_direct_links_cut_and_mended_replays_identically() {
    check("mls_direct", 3);
}
