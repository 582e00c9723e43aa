//! The reply gate: which replies may leave the machine yet, given which of
//! the writes before them are durable, and the syncs that make them so.
//!
//! It keeps the machine's first invariant, durability before
//! acknowledgement (ARCHITECTURE.md § Guarantees, "Durable before
//! acknowledged"): in [`Durability::Fsync`] mode a reply is held until every
//! batch written before it is reported synced, read-only replies included,
//! so a crash can lose only what nobody was told about and a seq shown to a
//! recipient is never reissued after a crash. The `Lsn`s of the machine's
//! writes only increase (asserted), held replies wait in `Lsn` order, and a
//! sync is asked for once per new write. After a storage failure nothing
//! becomes durable again: every held reply turns into an `unavailable`
//! error, no sync is asked for any more, and later replies (all of them
//! errors by then) go out at once.

use std::collections::VecDeque;

use crate::error::ServiceError;
use crate::store::Lsn;
use crate::types::{ConnectionId, RequestId};

use super::{Durability, Output, Reply};

/// Replies held for durability, replies ready to go, and what the machine
/// knows of its writes.
#[derive(Debug)]
pub(super) struct ReplyGate {
    /// Whether replies wait for their writes (the machine's configured
    /// durability, fixed when it opens).
    durability: Durability,
    /// Last batch this machine wrote.
    last_write: Lsn,
    /// Batches up to here are durable.
    durable: Lsn,
    /// Highest `Lsn` a [`Output::Sync`] was emitted for.
    sync_requested: Lsn,
    /// Replies waiting for their writes to become durable, in `Lsn` order.
    held: VecDeque<(Lsn, Output)>,
    ready: VecDeque<Output>,
    /// Set after a storage failure: the machine takes no more writes.
    failed: Option<String>,
}

impl ReplyGate {
    /// A gate for a machine whose last write is `last_write`, none of which
    /// is known to be durable yet.
    pub(super) fn new(durability: Durability, last_write: Lsn) -> Self {
        ReplyGate {
            durability,
            last_write,
            durable: Lsn(0),
            sync_requested: Lsn(0),
            held: VecDeque::new(),
            ready: VecDeque::new(),
            failed: None,
        }
    }

    /// The machine wrote batch `lsn`; replies from now on wait for it.
    pub(super) fn written(&mut self, lsn: Lsn) {
        assert!(lsn > self.last_write, "store returned a non-increasing Lsn");
        self.last_write = lsn;
    }

    /// Sends `reply` to request `request_id` on `conn` once everything
    /// written so far is durable (at once in [`Durability::Buffered`] mode).
    pub(super) fn reply(&mut self, conn: ConnectionId, request_id: RequestId, reply: Reply) {
        let out = Output::Reply {
            conn,
            request_id,
            reply,
        };
        // After a storage failure nothing will become durable again; replies
        // (all of them errors by then) go out at once.
        if self.durability == Durability::Fsync
            && self.failed.is_none()
            && self.last_write > self.durable
        {
            self.held.push_back((self.last_write, out));
        } else {
            self.ready.push_back(out);
        }
    }

    /// Asks for a sync of everything written so far. Both modes sync (so
    /// the disk keeps up); only [`Durability::Fsync`] makes replies wait.
    pub(super) fn request_sync(&mut self) {
        if self.failed.is_none()
            && self.last_write > self.sync_requested
            && self.last_write > self.durable
        {
            self.sync_requested = self.last_write;
            self.ready.push_back(Output::Sync {
                lsn: self.last_write,
            });
        }
    }

    /// Batches up to `lsn` are durable: releases the replies that waited
    /// for them.
    pub(super) fn synced(&mut self, lsn: Lsn) {
        self.durable = self.durable.max(lsn);
        while let Some((hold, _)) = self.held.front() {
            if *hold > self.durable {
                break;
            }
            if let Some((_, out)) = self.held.pop_front() {
                self.ready.push_back(out);
            }
        }
    }

    /// Storage failed for `reason` (the first reason is kept): every held
    /// reply becomes `unavailable` and goes out, and so does every reply
    /// from now on.
    pub(super) fn fail(&mut self, reason: &str) {
        if self.failed.is_none() {
            self.failed = Some(reason.to_owned());
        }
        while let Some((_, out)) = self.held.pop_front() {
            let out = match out {
                Output::Reply {
                    conn, request_id, ..
                } => Output::Reply {
                    conn,
                    request_id,
                    reply: Err(ServiceError::unavailable(
                        "storage failed before this request was durable; it may or may not have been applied",
                    )),
                },
                other => other,
            };
            self.ready.push_back(out);
        }
    }

    /// The store rolled back the shell's turn, and with it every batch
    /// after `kept`: the replies held for those batches go out as `error`
    /// instead, and so do the replies of the turn that were ready (read
    /// only): what a rolled-back transaction read is not to be trusted
    /// either. The shell takes the outputs after every turn, so those ready
    /// now are the turn's. Later batches get higher `Lsn`s, so a sync that
    /// covers them covers the rolled-back ones too, which by then hold
    /// nothing back.
    pub(super) fn rolled_back(&mut self, kept: Lsn, error: &ServiceError) {
        for out in self.ready.iter_mut() {
            if let Output::Reply { reply, .. } = out {
                *reply = Err(error.clone());
            }
        }
        let mut still_held = VecDeque::with_capacity(self.held.len());
        for (lsn, out) in self.held.drain(..) {
            if lsn <= kept {
                still_held.push_back((lsn, out));
                continue;
            }
            let out = match out {
                Output::Reply {
                    conn, request_id, ..
                } => Output::Reply {
                    conn,
                    request_id,
                    reply: Err(error.clone()),
                },
                other => other,
            };
            self.ready.push_back(out);
        }
        self.held = still_held;
    }

    /// The next output to hand to the shell.
    pub(super) fn poll(&mut self) -> Option<Output> {
        self.ready.pop_front()
    }

    /// Replies waiting for durability.
    pub(super) fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Why storage failed, if it did.
    pub(super) fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
}
