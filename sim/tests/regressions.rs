//! Every seed that ever failed, as a named test. A seed names one run of
//! its scenario as the scenario is defined now; keep the scenario's plan
//! stable or re-check these seeds when changing it.

use quicproquo_sim::scenarios::scenario;
use quicproquo_sim::sweep::assert_seed;

fn seed(name: &str, seed: u64) {
    assert_seed(scenario(name).expect("scenario exists"), seed);
}

/// Failed (with seeds 0-5) before the server let go of a closed
/// connection's fetchWait: the server tracked 20 connections while QUIC
/// had 16 open, for over a second, several times in the run.
#[test]
fn long_poll_storm_seed_2() {
    seed("long_poll_storm", 2);
}

/// Same bug, the first seed that showed it.
#[test]
fn long_poll_storm_seed_0() {
    seed("long_poll_storm", 0);
}

/// Failed before the client machine sent the outbox one entry per queue at
/// a time: a member's two messages left in its outbox by a server crash
/// and a host crash went out together with its next one, which the server
/// stored first; the others were shown "mls/387/2/5" before "mls/387/2/3"
/// and "mls/387/2/4" (`PlaintextOrder`).
#[test]
fn mls_group_seed_387() {
    seed("mls_group", 387);
}

/// Same bug: one deferred message overtaken by the next.
#[test]
fn mls_group_seed_723() {
    seed("mls_group", 723);
}

/// Open bug in the client machine (sim/README.md, bug 4): the group's
/// creator crashed right after sending an update's Commit, which the server
/// accepted. Restarted, its `recv` sent the pending Commit again and
/// fetched the group's channel at the same time; the fetch answer came
/// first, and the next member's message and Commit of the new epoch were
/// dropped as "Message epoch differs from the group's epoch" (the cursor
/// moved past them) before the Commit's acceptance merged it. The creator
/// then stayed on epoch 4 while the others reached 15, never sent its
/// messages again (they queue behind its updates, which lose every epoch)
/// and was shown nothing more (`PlaintextLost`, `GroupForked`,
/// `CommitCount`).
#[test]
fn mls_commits_seed_1335() {
    seed("mls_commits", 1335);
}

/// Failed before the client machine put a queued persist ahead of every
/// other effect (bug 5 in sim/README.md): a member's `send` started while
/// an earlier message still waited in its outbox; the machine asked for a
/// connection for that one before the persist of the new message, `drive`
/// connected first, and the member's host crashed during the handshake.
/// Restarted from its state file, the member had never made the message
/// (`PlaintextLost`). 54 of seeds 0-9999 failed the same way.
#[test]
fn mls_group_seed_515() {
    seed("mls_group", 515);
}

/// Same bug, with racing Commits (4 of seeds 0-899).
#[test]
fn mls_commits_seed_275() {
    seed("mls_commits", 275);
}
