//! The default sweep: every scenario over its default seeds (see
//! `quicproquo_sim::sweep` for the environment variables that replay one
//! seed or sweep more), plus every seed that ever failed, as a named
//! regression test.

use quicproquo_sim::scenarios::scenario;
use quicproquo_sim::sweep::assert_sweep;

fn sweep(name: &str) {
    assert_sweep(scenario(name).expect("scenario exists"));
}

#[test]
fn lossy_network() {
    sweep("lossy_network");
}

#[test]
fn server_crash() {
    sweep("server_crash");
}

#[test]
fn lost_ack() {
    sweep("lost_ack");
}

#[test]
fn key_packages() {
    sweep("key_packages");
}

#[test]
fn partitions() {
    sweep("partitions");
}

#[test]
fn lost_fetch_answer() {
    sweep("lost_fetch_answer");
}

#[test]
fn long_poll_storm() {
    sweep("long_poll_storm");
}

#[test]
fn mls_group() {
    sweep("mls_group");
}

#[test]
fn mls_direct() {
    sweep("mls_direct");
}

#[test]
fn mls_commits() {
    sweep("mls_commits");
}
