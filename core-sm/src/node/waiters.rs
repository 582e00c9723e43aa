//! The long-poll waiter table: parked `fetchWait` and `fetchWaitChannels`
//! calls, found by id, by queue (an enqueue to the queue wakes them) and by
//! deadline ([`NodeService::handle_timeout`] answers the due ones).
//!
//! Invariants it keeps:
//! - A parked waiter is in every index or in none: its id is listed under
//!   each of its queues, its `(deadline, id)` is in the deadline set, its
//!   cursors are counted, and its connection lists its id. Every way out
//!   (woken, due, connection closed, storage failed) removes it from all of
//!   them, so each waiter is answered at most once, and a closed
//!   connection leaves none behind.
//! - The table is bounded: a waiter is parked only within the limits per
//!   connection (`waiters_per_connection_max`), in total (`waiters_max`)
//!   and in cursors ([`limits::WAIT_CURSORS_MAX`]); beyond them the
//!   request is refused with an error, never dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::ServiceError;
use crate::limits;
use crate::store::Store;
use crate::time::Time;
use crate::types::{ChannelId, ConnectionId, IdentityKey, QueueId, RequestId};

use super::{NodeService, Response};

/// A parked long-poll: a `fetchWait` (one cursor, answered with
/// [`Response::Messages`](super::Response::Messages)) or a
/// `fetchWaitChannels` (answered with
/// [`Response::ChannelMessages`](super::Response::ChannelMessages)).
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) conn: ConnectionId,
    pub(super) request_id: RequestId,
    pub(super) recipient_key: IdentityKey,
    pub(super) cursors: Vec<(ChannelId, u64)>,
    pub(super) channels: bool,
    pub(super) limit: u32,
    pub(super) deadline: Time,
}

impl Waiter {
    pub(super) fn queues(&self) -> impl Iterator<Item = QueueId> + '_ {
        self.cursors.iter().map(|(channel_id, _)| QueueId {
            recipient_key: self.recipient_key,
            channel_id: *channel_id,
        })
    }
}

/// The parked waiters by id, with their indexes by queue and by deadline.
#[derive(Debug, Default)]
pub(super) struct WaiterTable {
    waiters: BTreeMap<u64, Waiter>,
    by_queue: HashMap<QueueId, Vec<u64>>,
    deadlines: BTreeSet<(Time, u64)>,
    /// Id of the next waiter parked.
    next: u64,
    /// Entries of `by_queue` (cursors of all waiters).
    cursors: usize,
}

impl WaiterTable {
    /// Waiters parked.
    pub(super) fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Cursors of all parked waiters.
    pub(super) fn cursor_count(&self) -> usize {
        self.cursors
    }

    /// The earliest deadline of a parked waiter.
    pub(super) fn poll_timeout(&self) -> Option<Time> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Parks `wait` under a new id, which it returns.
    pub(super) fn park(&mut self, wait: Waiter) -> u64 {
        let id = self.next;
        self.next += 1;
        for queue in wait.queues() {
            self.by_queue.entry(queue).or_default().push(id);
        }
        self.cursors += wait.cursors.len();
        self.deadlines.insert((wait.deadline, id));
        self.waiters.insert(id, wait);
        id
    }

    /// Takes waiter `id` out of the table, if it is parked.
    pub(super) fn remove(&mut self, id: u64) -> Option<Waiter> {
        let w = self.waiters.remove(&id)?;
        self.deadlines.remove(&(w.deadline, id));
        self.cursors = self.cursors.saturating_sub(w.cursors.len());
        for queue in w.queues() {
            if let Some(ids) = self.by_queue.get_mut(&queue) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.by_queue.remove(&queue);
                }
            }
        }
        Some(w)
    }

    /// Takes out the waiters parked on `queue`, in the order they parked.
    pub(super) fn take_queue(&mut self, queue: &QueueId) -> Vec<(u64, Waiter)> {
        // Every enqueue asks; with nobody parked, no hashing.
        if self.by_queue.is_empty() {
            return Vec::new();
        }
        let Some(ids) = self.by_queue.remove(queue) else {
            return Vec::new();
        };
        ids.into_iter()
            .filter_map(|id| self.remove(id).map(|w| (id, w)))
            .collect()
    }

    /// Takes out the waiters whose deadline is due at `now`, earliest
    /// first.
    pub(super) fn take_due(&mut self, now: Time) -> Vec<(u64, Waiter)> {
        let mut due = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            if let Some(w) = self.remove(id) {
                due.push((id, w));
            }
        }
        due
    }

    /// Takes out every waiter, by id.
    pub(super) fn take_all(&mut self) -> Vec<(u64, Waiter)> {
        let ids: Vec<u64> = self.waiters.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| self.remove(id).map(|w| (id, w)))
            .collect()
    }
}

impl<S: Store> NodeService<S> {
    /// Whether `wait` may be parked: its connection and the machine are
    /// below their waiter limits, and its cursors fit.
    pub(super) fn waiter_room(&self, wait: &Waiter) -> Result<(), ServiceError> {
        let per_conn = self
            .connections
            .get(&wait.conn)
            .map_or(0, |c| c.waiters.len());
        if per_conn >= self.config.waiters_per_connection_max {
            return Err(ServiceError::rate_limited(
                1_000,
                format!(
                    "this connection already has {per_conn} fetchWait calls waiting, its limit"
                ),
            ));
        }
        if self.waiters.len() >= self.config.waiters_max
            || self.waiters.cursor_count() + wait.cursors.len() > limits::WAIT_CURSORS_MAX
        {
            return Err(ServiceError::unavailable(
                "the server holds its maximum number of waiting fetchWait calls",
            ));
        }
        Ok(())
    }

    /// Parks `wait` until an enqueue to one of its queues or its deadline
    /// (the caller checked [`Self::waiter_room`]).
    pub(super) fn park(&mut self, wait: Waiter) {
        let conn = wait.conn;
        let id = self.waiters.park(wait);
        if let Some(c) = self.connections.get_mut(&conn) {
            c.waiters.push(id);
        }
    }

    /// Answers the waiters parked on `queue`, which has new messages.
    pub(super) fn wake_waiters(&mut self, queue: &QueueId) {
        for (id, w) in self.waiters.take_queue(queue) {
            self.answer_waiter(id, w);
        }
    }

    /// Another machine sharing the store added messages to `queue`:
    /// answers the waiters parked on it that now have something to take
    /// (messages after their cursors, or a gap), and leaves the others
    /// parked — a change the waiter has already seen wakes nobody.
    pub(super) fn recheck_queue(&mut self, queue: &QueueId) {
        let woken = self.waiters.take_queue(queue);
        self.recheck(woken);
    }

    /// Changes by other machines may have been missed (the shell lost its
    /// notifications for a while): rechecks every parked waiter.
    pub(super) fn recheck_all(&mut self) {
        let all = self.waiters.take_all();
        self.recheck(all);
    }

    fn recheck(&mut self, taken: Vec<(u64, Waiter)>) {
        for (id, w) in taken {
            let reply = self.answer(&w);
            let nothing = match &reply {
                Ok(Response::Messages { messages, gap, .. }) => {
                    messages.is_empty() && gap.is_none()
                }
                Ok(Response::ChannelMessages { channels }) => channels.is_empty(),
                _ => false,
            };
            self.unlink_waiter(w.conn, id);
            if nothing {
                self.park(w);
            } else {
                self.gate.reply(w.conn, w.request_id, reply);
            }
        }
    }

    /// Storage failed: answers every parked waiter with an error.
    pub(super) fn fail_waiters(&mut self) {
        for (id, w) in self.waiters.take_all() {
            self.unlink_waiter(w.conn, id);
            // The gate has failed, so this goes out at once.
            self.gate.reply(
                w.conn,
                w.request_id,
                Err(ServiceError::unavailable(
                    "storage failed while this long-poll waited; retry after the server restarts",
                )),
            );
        }
    }

    /// Answers waiter `id`, taken out of the table, with what its queues
    /// hold now.
    pub(super) fn answer_waiter(&mut self, id: u64, w: Waiter) {
        self.unlink_waiter(w.conn, id);
        let reply = self.answer(&w);
        self.gate.reply(w.conn, w.request_id, reply);
    }

    /// Drops waiter `id`, taken out of the table, from its connection's
    /// list.
    fn unlink_waiter(&mut self, conn: ConnectionId, id: u64) {
        if let Some(c) = self.connections.get_mut(&conn) {
            c.waiters.retain(|x| *x != id);
        }
    }
}
