//! Model test of the NodeService machine: the real machine against a tiny
//! reference model, compared after every generated step.
//!
//! proptest generates sequences of operations by four authenticated
//! identities (plus one connection that never authenticates), every method
//! the node has: KeyPackage upload (single-use and last-resort), fetch and
//! count; hybrid key upload (rightly and wrongly signed) and fetch;
//! enqueue, enqueueBatch and enqueueMany, including retries of message ids
//! already used, repeated recipients or ids, empty payloads, and MLS
//! Commits that meet the commit fence; fetch, fetchWait and
//! fetchWaitChannels with the owner's last seen cursor, older ones, the
//! tail, and bogus future ones, also from identities that do not own the
//! queue; clock ticks long enough for the message TTL to drop messages
//! (and fetches to report the gap); full and partial syncs; and crashes
//! followed by a restart. Each runs against the real
//! `NodeService<MemStore>` in `Durability::Fsync` mode and against a tiny
//! reference model, and the two are compared after every step.
//!
//! The model has three parts:
//! - [`Durable`], what the store holds: per queue a `VecDeque` of
//!   `(seq, payload)`, its `next_seq` and the dedup map by sender and message id; per
//!   identity a FIFO of KeyPackages, an optional last-resort one and an
//!   optional signed hybrid key; per channel and group the commit fence.
//!   The model knows how many batches each request writes (an expiry, then
//!   an acknowledgement per queue; asserted) and is snapshotted under the
//!   `Lsn` of each, so a crash rolls it back to the newest snapshot at or
//!   before the store's synced `Lsn`.
//! - Long-poll waiters, in memory only: a crash forgets them.
//! - Pending replies: each request's expected reply together with the `Lsn` of
//!   the last write made before it. A reply must come out exactly when
//!   `handle_synced` covers that `Lsn` (never earlier, never later) and must
//!   equal the model's answer. A crash loses the replies not yet released.
//!
//! On top of the model, [`Seen`] records what clients were told in released
//! replies (its queue part is the shared `testing::ledger::Ledger`, the
//! checker the fuzz target and the simulations use too). It survives crashes and backs checks that do not trust the model:
//! no single-use KeyPackage is handed out twice, and none its target never
//! uploaded; a hybrid key always carries its owner's signature; a
//! `(queue, seq)` pair always names the same payload; an
//! acknowledged message id keeps its seq; `next_seq` never goes backwards;
//! Messages replies hold consecutive seqs after the cursor and after
//! everything acknowledged-deleted; and every acknowledged enqueue the owner
//! has not acknowledged away is delivered. Each case ends with a crash and
//! an audit fetch of every queue, so whatever was acknowledged must have
//! survived.
//!
//! Rate limits are set so high they never trigger (the unit tests cover
//! them); the other limits are small so that the model exercises them.

/// Cases per run unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 2_000;

include!("model/harness.rs");

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn node_matches_reference_model_across_syncs_crashes_and_restarts(
        ops in vec(op(), 1..=OPS_MAX)
    ) {
        let mut run = Run::<MemStore>::new();
        for op in &ops {
            run.step(op);
        }
        run.audit_after_crash();
    }
}

// ----- deterministic regressions of the trickiest scenarios ----------------

#[test]
fn crash_before_sync_of_a_pop_hands_the_key_package_out_again() {
    let mut run = Run::<MemStore>::new();
    run.step(&upload(0, false));
    run.step(&sync_all());
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    assert_eq!(run.pending.len(), 1, "the pop's reply waits for its sync");
    run.step(&Op::Crash);
    run.step(&Op::FetchKeyPackage {
        actor: 2,
        target: 0,
    });
    run.step(&sync_all());
    // Nobody saw the first pop, so the package is handed out now, once.
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::KeyPackage {
            package: package_bytes(0),
            last_resort: false,
        }))
    );
}

#[test]
fn crash_after_sync_of_a_pop_never_hands_the_key_package_out_again() {
    let mut run = Run::<MemStore>::new();
    run.step(&upload(0, false));
    run.step(&sync_all());
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    run.step(&sync_all());
    run.step(&Op::Crash);
    run.step(&Op::FetchKeyPackage {
        actor: 2,
        target: 0,
    });
    run.step(&sync_all());
    assert_eq!(
        run.released.last().map(|r| r.as_ref().map_err(|e| e.kind)),
        Some(Err(ErrorKind::NotFound))
    );
}

#[test]
fn synced_pop_lost_with_its_reply_is_not_returned_again() {
    // The pop is durable but the machine was never told, so its reply is
    // lost in the crash; the package is gone without anyone seeing it.
    let mut run = Run::<MemStore>::new();
    run.step(&upload(0, false));
    run.step(&upload(0, true));
    run.step(&sync_all());
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    run.step(&Op::Sync {
        upto: None,
        notify: false,
    });
    run.step(&Op::Crash);
    run.step(&Op::FetchKeyPackage {
        actor: 1,
        target: 0,
    });
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::KeyPackage {
            package: package_bytes(1),
            last_resort: true,
        }))
    );
}

#[test]
fn another_senders_message_under_a_used_id_is_its_own() {
    let mut run = Run::<MemStore>::new();
    run.step(&enqueue(1, 0));
    run.step(&sync_all());
    // Actor 2 reuses actor 1's id: a message of its own, not a retry.
    let reuse = |actor| Op::Enqueue {
        actor,
        recipient: 0,
        channel: 0,
        payload_bytes: 5,
        message_id: MessageIdChoice::Retry {
            pick: 0,
            same_queue: true,
        },
    };
    run.step(&reuse(2));
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 2 }))
    );
    // Actor 1 sending it again is a retry.
    run.step(&reuse(1));
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 1 }))
    );
}

#[test]
fn restart_keeps_next_seq_after_the_queue_empties() {
    let mut run = Run::<MemStore>::new();
    for _ in 0..3 {
        run.step(&enqueue(1, 0));
    }
    run.step(&sync_all());
    run.step(&fetch(0, Cursor::Tail, 1));
    run.step(&sync_all());
    run.step(&Op::Crash);
    run.step(&enqueue(2, 0));
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 4 }))
    );
}

#[test]
fn partial_sync_releases_only_replies_whose_writes_are_covered() {
    let mut run = Run::<MemStore>::new();
    run.step(&enqueue(1, 0));
    run.step(&enqueue(2, 0));
    run.step(&Op::Sync {
        upto: Some(0),
        notify: true,
    });
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 1 }))
    );
    assert_eq!(run.pending.len(), 1);
    run.step(&Op::Crash);
    // The second enqueue was lost with its reply; its seq is free again.
    run.step(&enqueue(3, 0));
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 2 }))
    );
}

#[test]
fn retry_after_crash_returns_the_acknowledged_seq() {
    let mut run = Run::<MemStore>::new();
    run.step(&enqueue(1, 0));
    run.step(&sync_all());
    run.step(&Op::Crash);
    run.step(&Op::Enqueue {
        actor: 1,
        recipient: 0,
        channel: 0,
        payload_bytes: 5,
        message_id: MessageIdChoice::Retry {
            pick: 0,
            same_queue: true,
        },
    });
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Enqueued { seq: 1 }))
    );
}

#[test]
fn fetch_wait_is_woken_by_enqueue_or_expires_empty() {
    let mut run = Run::<MemStore>::new();
    run.step(&fetch_wait(0, 1_000));
    assert_eq!(run.waiters.len(), 1);
    run.step(&enqueue(1, 0));
    run.step(&sync_all());
    assert!(run.waiters.is_empty());
    run.step(&fetch_wait(0, 1_000));
    assert_eq!(run.waiters.len(), 1);
    run.step(&Op::Tick { ms: 999 });
    assert_eq!(run.waiters.len(), 1);
    run.step(&Op::Tick { ms: 1 });
    // The expired wait's reply also waits for the sync of its acknowledgement.
    run.step(&sync_all());
    assert_eq!(
        run.released.last(),
        Some(&Ok(Response::Messages {
            messages: Vec::new(),
            next_seq: 2,
            gap: None,
        }))
    );
}

/// Regression: after a restart *without* a crash (the process died but the
/// OS still holds its unsynced writes, which the reopened store reads back)
/// the machine once treated those writes as durable and released a reply
/// revealing them at once; an OS crash later could then reissue seq 1 for
/// another payload (ARCHITECTURE.md § Guarantees, § Storage). The machine
/// now writes on every open, so its replies wait for a sync that covers what
/// the previous process left.
#[test]
fn restart_without_crash_holds_replies_until_earlier_writes_are_durable() {
    let mut run = Run::<MemStore>::new();
    run.step(&enqueue(1, 0));
    run.restart(false);
    run.step(&fetch(0, Cursor::Zero, 1));
}
