//! The service task: the one place the NodeService machine lives. Connection
//! tasks send it commands over a channel; it feeds the machine, routes
//! replies back to the waiting streams, hands sync requests to the
//! group-commit task and re-arms its timer from `poll_timeout`.
//!
//! This is the shell's whole loop: read (commands, sync completions, timer),
//! feed the core, drain its outputs. It makes no protocol decisions.
//!
//! Once the machine reports a storage failure (a failed sync or write; it
//! then refuses every request), the task logs it and raises the flag
//! [`ServiceHandle::storage_failed`] waits for, on which `serve` stops the
//! server: the storage engine takes nothing more until the database is
//! opened again, so the process ends and a restart recovers it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quicproquo_core::error::ServiceError;
use quicproquo_core::limits::TLS_EXPORTER_BYTES;
use quicproquo_core::node::{
    Durability, NodeService, Output, QueuedMessage, Reply, Request, Response,
};
use quicproquo_core::store::Lsn;
use quicproquo_core::time::Time;
use quicproquo_core::types::{ConnectionId, RequestId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::observe::{GaugeSnapshot, Metrics, Observer, ServiceGauges, Summary};
use crate::store::{
    BUFFERED_SYNC_PAUSE, Change, ShellStore, StorageError, SyncHandle, run_group_commit_timed,
};

/// Commands queued for the service task before senders wait: deep enough to
/// absorb bursts from thousands of streams, bounded so memory is too.
pub const COMMAND_QUEUE_DEPTH: usize = 16_384;
/// Commands handled per wake-up (one turn) before outputs are drained, so
/// replies and sync requests are not starved by a flood of new requests;
/// the writes of one turn reach the storage engine as one batch.
const COMMANDS_PER_TURN_MAX: usize = 256;

/// Changes by other nodes (queues that got messages) waiting for the
/// service task; beyond it the watch reports [`Change::Missed`] once
/// there is room again, and every long-poll is checked instead.
pub const CHANGES_QUEUED_MAX: usize = 4_096;

enum Command {
    Open {
        conn: ConnectionId,
        tls_exporter: [u8; TLS_EXPORTER_BYTES],
        done: oneshot::Sender<Result<(), ServiceError>>,
    },
    Close {
        conn: ConnectionId,
    },
    /// The server is shutting down: long-polls are answered now.
    Shutdown,
    Request {
        conn: ConnectionId,
        request: Request,
        budget: Option<ReplyReservation>,
        reply: oneshot::Sender<BudgetedReply>,
    },
}

/// A reply and the bytes of its connection's reply budget it holds until
/// dropped (see [`ServiceHandle::request_reserved`]).
pub type BudgetedReply = (Reply, Option<OwnedSemaphorePermit>);

/// Bytes of a connection's reply budget set aside for one fetch or
/// fetchWait before it reaches the machine: enough for the largest reply,
/// so whatever the machine answers (and holds until durable) is already
/// paid for. The reservation is cut to the reply's real size when the
/// reply comes out, and given back while a fetchWait waits.
pub struct ReplyReservation {
    /// The connection's reply budget.
    pub budget: Arc<Semaphore>,
    /// The bytes reserved; `None` once given back.
    pub held: Option<OwnedSemaphorePermit>,
}

/// A cloneable handle through which connection tasks talk to the service.
#[derive(Clone)]
pub struct ServiceHandle {
    tx: mpsc::Sender<Command>,
    next_conn: Arc<AtomicU64>,
    failed: watch::Receiver<bool>,
}

impl ServiceHandle {
    /// Registers a new connection with its TLS exporter value.
    pub async fn open(
        &self,
        tls_exporter: [u8; TLS_EXPORTER_BYTES],
    ) -> Result<ConnectionId, ServiceError> {
        let conn = ConnectionId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Open {
                conn,
                tls_exporter,
                done,
            })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())??;
        Ok(conn)
    }

    /// Resolves once the machine has failed for its storage and refuses
    /// every request; never if the service ends without that.
    pub async fn storage_failed(&self) {
        let mut failed = self.failed.clone();
        if failed.wait_for(|f| *f).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Tells the service the connection is gone.
    pub async fn close(&self, conn: ConnectionId) {
        // If the service has stopped there is nothing left to tell.
        let _ = self.tx.send(Command::Close { conn }).await;
    }

    /// The server is shutting down: every waiting fetchWait is answered
    /// now with what its queues hold, and later ones do not wait
    /// ([`NodeService::handle_shutdown`]); other requests are served as
    /// before.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }

    /// Sends one request and waits for its reply.
    pub async fn request(&self, conn: ConnectionId, request: Request) -> Reply {
        self.send_request(conn, request, None).await.0
    }

    /// As [`Self::request`] for a fetch or fetchWait whose largest reply is
    /// reserved in its connection's reply budget (the bytes of replies the
    /// connection may leave unread). The reply comes back holding its real
    /// size in permits, to be dropped once the peer has taken it. A woken
    /// fetchWait, whose reservation was given back while it waited, takes
    /// its bytes anew; if they do not fit it is answered `unavailable` and
    /// its messages stay queued for the next fetch with the same cursor.
    /// So a client that never reads cannot make the server hold more than
    /// its budget.
    pub async fn request_reserved(
        &self,
        conn: ConnectionId,
        request: Request,
        reservation: ReplyReservation,
    ) -> BudgetedReply {
        self.send_request(conn, request, Some(reservation)).await
    }

    async fn send_request(
        &self,
        conn: ConnectionId,
        request: Request,
        budget: Option<ReplyReservation>,
    ) -> BudgetedReply {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::Request {
                conn,
                request,
                budget,
                reply,
            })
            .await
            .is_err()
        {
            return (Err(stopped()), None);
        }
        rx.await.unwrap_or_else(|_| (Err(stopped()), None))
    }
}

/// Pays for `reply`'s message bytes out of `reservation` (the rest goes
/// back to the budget), or out of the budget itself if the reservation was
/// given back; turns the reply into `unavailable` if they do not fit.
fn admit(reply: Reply, reservation: Option<ReplyReservation>) -> BudgetedReply {
    let Some(ReplyReservation { budget, held }) = reservation else {
        return (reply, None);
    };
    let message_bytes = |messages: &[QueuedMessage]| {
        messages
            .iter()
            .map(|m| m.payload.len().saturating_add(MESSAGE_FRAMING_BYTES))
            .fold(0usize, usize::saturating_add)
    };
    let bytes = match &reply {
        Ok(Response::Messages { messages, .. }) => message_bytes(messages),
        Ok(Response::ChannelMessages { channels }) => channels
            .iter()
            .map(|c| message_bytes(&c.messages).saturating_add(CHANNEL_FRAMING_BYTES))
            .fold(0usize, usize::saturating_add),
        _ => 0,
    };
    let paid = match held {
        // Whatever is not split off returns to the budget when `held` drops.
        Some(mut held) => held.split(bytes),
        None => u32::try_from(bytes)
            .ok()
            .and_then(|n| budget.try_acquire_many_owned(n).ok()),
    };
    match paid {
        Some(permit) => (reply, Some(permit)),
        None => (
            Err(ServiceError::unavailable(
                "this connection has too many bytes of replies it has not read; read them, then fetch again (the messages stay queued)",
            )),
            None,
        ),
    }
}

/// Bytes a queued message adds to a reply besides its payload: its struct
/// in the list and the padding of its payload to a word.
const MESSAGE_FRAMING_BYTES: usize = 24;
/// Framing of one channel in a `fetchWaitChannels` reply: its struct (one
/// data word, two pointers) and its channel id, rounded up.
const CHANNEL_FRAMING_BYTES: usize = 48;

fn stopped() -> ServiceError {
    ServiceError::unavailable("the server is shutting down")
}

/// Counters the service exposes for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceStats {
    /// Syncs completed.
    pub syncs: u64,
    /// Requests handled.
    pub requests: u64,
    /// True if the storage failed and the machine refused every request
    /// from then on.
    pub storage_failed: bool,
}

/// Starts the service task and its group-commit task over `node`,
/// publishing the service's live counts to `observer.gauges` and counting
/// fsyncs, the batches each one covered and the command queue's depth in
/// `observer.metrics` when given; every `sweep_interval` (none: never) the
/// task runs one step of the machine's sweep
/// ([`NodeService::handle_sweep`]). Returns the handle connection tasks use
/// and a join handle that resolves, with the final counters, once every
/// handle is dropped and the last writes are synced.
pub fn spawn<S: ShellStore>(
    node: NodeService<S>,
    observer: Observer,
    sweep_interval: Option<Duration>,
) -> (ServiceHandle, tokio::task::JoinHandle<ServiceStats>) {
    let Observer {
        gauges,
        metrics,
        summary,
    } = observer;
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE_DEPTH);
    let sync = node.store().sync_handle();
    let (sync_tx, sync_rx) = mpsc::unbounded_channel();
    let (synced_tx, synced_rx) = mpsc::unbounded_channel();
    let (failed_tx, failed_rx) = watch::channel(false);
    let pause = match node.config().durability {
        Durability::Fsync => Duration::ZERO,
        Durability::Buffered => BUFFERED_SYNC_PAUSE,
    };
    let sync_metrics = metrics.clone();
    let group_commit = tokio::spawn(run_group_commit_timed(
        sync.clone(),
        sync_rx,
        synced_tx,
        pause,
        move |took| {
            if let Some(m) = &sync_metrics {
                m.fsync_took(took);
            }
        },
    ));
    // Over a store other nodes share, their enqueues wake this node's
    // long-polls; the watch ends when the service drops `changes`.
    let (changes_tx, changes_rx) = mpsc::channel(CHANGES_QUEUED_MAX);
    let changes = node.store().watch_changes(changes_tx).map(|watch| {
        tokio::spawn(watch);
        changes_rx
    });
    let service = Service {
        changes,
        node,
        rx,
        pending: HashMap::new(),
        next_request: 0,
        start: Instant::now(),
        clock_base: wall_clock(),
        sync_tx,
        synced_rx,
        stats: ServiceStats::default(),
        gauges,
        metrics,
        summary,
        round_queued: (0, 0),
        synced_lsn: Lsn(0),
        sweep_interval,
        failed: failed_tx,
    };
    let join = tokio::spawn(async move {
        let stats = service.run().await;
        let _ = group_commit.await;
        // A last sync so buffered mode, too, leaves everything on disk.
        if let Err(e) = sync.sync().await {
            tracing::error!(error = %e, "final sync failed");
        }
        stats
    });
    (
        ServiceHandle {
            tx,
            next_conn: Arc::new(AtomicU64::new(1)),
            failed: failed_rx,
        },
        join,
    )
}

/// A request handed to the machine, waiting for its reply.
struct Pending {
    conn: ConnectionId,
    /// The reply's reservation in its connection's reply budget, if any.
    budget: Option<ReplyReservation>,
    reply: oneshot::Sender<BudgetedReply>,
}

struct Service<S> {
    node: NodeService<S>,
    /// What other nodes sharing the store changed, if it is shared.
    changes: Option<mpsc::Receiver<Change>>,
    rx: mpsc::Receiver<Command>,
    pending: HashMap<RequestId, Pending>,
    next_request: u64,
    start: Instant,
    /// The wall-clock time at `start`: the machine's clock continues across
    /// restarts, so message ages (the TTL) survive them.
    clock_base: Time,
    sync_tx: mpsc::UnboundedSender<Lsn>,
    synced_rx: mpsc::UnboundedReceiver<Result<Lsn, StorageError>>,
    stats: ServiceStats,
    gauges: ServiceGauges,
    metrics: Option<Arc<Metrics>>,
    /// Counts for the periodic log summary.
    summary: Arc<Summary>,
    /// Messages and bytes the sweep's current round has counted so far.
    round_queued: (u64, u64),
    /// Last `Lsn` a sync reported, to count the batches each fsync covers.
    synced_lsn: Lsn,
    /// How often a sweep step runs, if ever.
    sweep_interval: Option<Duration>,
    /// Raised once the machine has failed for its storage.
    failed: watch::Sender<bool>,
}

impl<S: ShellStore> Service<S> {
    async fn run(mut self) -> ServiceStats {
        // Opening the machine already wrote (and asked for a sync).
        self.drain();
        let mut open = true;
        let mut sweep = self.sweep_interval.map(|every| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        // Whether the group-commit task still runs (it stops after a
        // failed sync).
        let mut syncing = true;
        let mut commands = Vec::with_capacity(COMMANDS_PER_TURN_MAX);
        let mut changes = Vec::new();
        // Run until every handle is gone and no reply still waits on disk.
        while open || self.node.held_reply_count() > 0 {
            let timer = self.node.poll_timeout().map(|t| self.instant(t));
            tokio::select! {
                biased;
                synced = self.synced_rx.recv(), if syncing => match synced {
                    Some(Ok(lsn)) => {
                        self.stats.syncs += 1;
                        self.summary.fsync();
                        if let Some(m) = &self.metrics {
                            m.fsync(lsn.0.saturating_sub(self.synced_lsn.0));
                        }
                        self.synced_lsn = self.synced_lsn.max(lsn);
                        let now = self.now();
                        self.node.handle_synced(now, lsn);
                    }
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "sync failed; refusing writes from now on");
                        if let Some(m) = &self.metrics {
                            m.sync_failed();
                        }
                        let now = self.now();
                        self.node.handle_sync_failed(now, &e.to_string());
                    }
                    None => {
                        // The group-commit task stopped after a failure;
                        // nothing more will become durable. Its closed
                        // channel is always ready: polled first again, it
                        // would starve the commands below.
                        syncing = false;
                    }
                },
                n = self.rx.recv_many(&mut commands, COMMANDS_PER_TURN_MAX), if open => {
                    if n == 0 {
                        open = false;
                    }
                    // One turn: what its requests write reaches the
                    // storage engine as one batch, before any reply or
                    // sync request of the turn leaves (`drain` below).
                    self.blocking(|this| {
                        this.node.store_mut().begin_turn();
                        for cmd in commands.drain(..) {
                            this.handle(cmd);
                        }
                        this.end_turn();
                    });
                }
                n = recv_changes(&mut self.changes, &mut changes), if self.changes.is_some() => {
                    if n == 0 {
                        // The watch ended; long-polls still end by their
                        // deadlines.
                        self.changes = None;
                    } else {
                        let now = self.now();
                        self.blocking(|this| {
                            this.node.store_mut().begin_turn();
                            for change in changes.drain(..) {
                                match change {
                                    Change::Queue(queue) => this.node.handle_queue_changed(now, &queue),
                                    Change::Missed => this.node.handle_changes_missed(now),
                                }
                            }
                            this.end_turn();
                        });
                    }
                }
                () = sleep_until(timer), if timer.is_some() => {
                    let now = self.now();
                    self.blocking(|this| {
                        let turn = this.begin_own_turn();
                        this.node.handle_timeout(now);
                        if turn {
                            this.end_turn();
                        }
                    });
                }
                _ = tick(&mut sweep), if sweep.is_some() && open => {
                    let now = self.now();
                    let swept = self.blocking(|this| {
                        let turn = this.begin_own_turn();
                        let swept = this.node.handle_sweep(now);
                        if turn {
                            this.end_turn();
                        }
                        swept
                    });
                    if let Some(m) = &self.metrics {
                        m.swept(swept.expired, swept.fences_deleted as u64);
                    }
                    self.round_queued.0 += swept.queued_messages;
                    self.round_queued.1 += swept.queued_bytes;
                    if swept.round_done {
                        let (messages, bytes) = std::mem::take(&mut self.round_queued);
                        self.summary.queues_counted(messages, bytes);
                        if let Some(m) = &self.metrics {
                            m.queues_counted(messages, bytes);
                        }
                    }
                    if swept.expired > 0 || swept.fences_deleted > 0 {
                        tracing::debug!(
                            expired = swept.expired,
                            fences_deleted = swept.fences_deleted,
                            queues = swept.queues,
                            fences = swept.fences,
                            "sweep step"
                        );
                    }
                }
                // No handle, no sync and no timer left: nothing can happen.
                else => break,
            }
            self.drain();
        }
        self.stats
    }

    /// Runs `f` (a turn) where it may block: over a shared store, whose
    /// statements wait for the database, inside `block_in_place` on a
    /// multi-threaded runtime, so the runtime's other tasks move to another
    /// thread meanwhile (the store blocks on its own for each statement
    /// otherwise). A store of this process's own runs `f` as it is.
    fn blocking<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let multi_thread =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        if self.node.store().shared() && multi_thread {
            tokio::task::block_in_place(|| f(self))
        } else {
            f(self)
        }
    }

    /// Opens a turn for a timeout or a sweep step over a shared store,
    /// where its reads and writes must be one transaction; returns whether
    /// it did. Over a store with one writer these run outside turns (the
    /// sweep scans after it wrote, which a turn's overlay does not allow).
    fn begin_own_turn(&mut self) -> bool {
        let shared = self.node.store().shared();
        if shared {
            self.node.store_mut().begin_turn();
        }
        shared
    }

    /// Closes the store's turn. A turn a shared store rolled back is told
    /// to the machine (its requests are answered `unavailable`, to be sent
    /// again); any other failure is a failure of the store.
    fn end_turn(&mut self) {
        match self.node.store_mut().end_turn() {
            Ok(()) => {}
            Err(StorageError::TurnAborted { kept, reason }) => {
                tracing::debug!(reason, "turn rolled back");
                if let Some(m) = &self.metrics {
                    m.turn_aborted();
                }
                let now = self.now();
                self.node.handle_turn_aborted(now, kept, &reason);
            }
            Err(e) => {
                tracing::error!(error = %e, "storage write failed; refusing writes from now on");
                let now = self.now();
                self.node.handle_sync_failed(now, &e.to_string());
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Open {
                conn,
                tls_exporter,
                done,
            } => {
                let r = self.node.handle_connection_opened(now, conn, tls_exporter);
                let _ = done.send(r);
            }
            Command::Close { conn } => {
                self.node.handle_connection_closed(now, conn);
                // Replies still owed to the closed connection go nowhere.
                self.pending.retain(|_, p| p.conn != conn);
            }
            Command::Shutdown => self.node.handle_shutdown(now),
            Command::Request {
                conn,
                request,
                budget,
                reply,
            } => {
                let id = RequestId(self.next_request);
                self.next_request += 1;
                self.stats.requests += 1;
                self.pending.insert(
                    id,
                    Pending {
                        conn,
                        budget,
                        reply,
                    },
                );
                let waiters = self.node.waiter_count();
                self.node.handle_request(now, conn, id, request);
                // A fetchWait that now waits holds no bytes until it is
                // woken: give its reservation back meanwhile.
                if self.node.waiter_count() > waiters
                    && let Some(r) = self.pending.get_mut(&id).and_then(|p| p.budget.as_mut())
                {
                    r.held = None;
                }
            }
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Reply {
                    request_id, reply, ..
                } => {
                    if let Some(p) = self.pending.remove(&request_id) {
                        // The stream may have gone away meanwhile.
                        let _ = p.reply.send(admit(reply, p.budget));
                    }
                }
                Output::Sync { lsn } => {
                    if self.sync_tx.send(lsn).is_err() {
                        let now = self.now();
                        self.node
                            .handle_sync_failed(now, "the group-commit task has stopped");
                    }
                }
            }
        }
        if !self.stats.storage_failed
            && let Some(reason) = self.node.failure()
        {
            tracing::error!(
                reason,
                "storage failed: every request is refused from now on, and the server stops; \
                 starting it again recovers the database"
            );
            self.stats.storage_failed = true;
            self.failed.send_replace(true);
        }
        self.gauges.publish(GaugeSnapshot {
            connections: self.node.connection_count(),
            waiters: self.node.waiter_count(),
            held_replies: self.node.held_reply_count(),
            pending_requests: self.pending.len(),
        });
        if let Some(m) = &self.metrics {
            m.service_queue_depth(self.rx.len());
        }
    }

    fn now(&self) -> Time {
        self.clock_base.saturating_add(self.start.elapsed())
    }

    fn instant(&self, t: Time) -> Instant {
        self.start + t.saturating_since(self.clock_base)
    }
}

/// Microseconds since the Unix epoch, read once per start. Only message
/// ages depend on it; everything else is relative to `start`.
fn wall_clock() -> Time {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Time::from_micros(u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX))
}

/// Up to [`COMMANDS_PER_TURN_MAX`] changes into `buf`; 0 once the watch
/// has ended.
async fn recv_changes(
    changes: &mut Option<mpsc::Receiver<Change>>,
    buf: &mut Vec<Change>,
) -> usize {
    match changes {
        Some(rx) => rx.recv_many(buf, COMMANDS_PER_TURN_MAX).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SharedMemStore;
    use quicproquo_core::error::ErrorKind;
    use quicproquo_core::limits::AUTH_VERSION;
    use quicproquo_core::node::{NodeConfig, QueuedMessage, RequestBody};
    use quicproquo_core::store::{Batch, StoreError};

    fn messages(sizes: &[usize]) -> Reply {
        Ok(Response::Messages {
            messages: sizes
                .iter()
                .enumerate()
                .map(|(i, n)| QueuedMessage {
                    seq: i as u64 + 1,
                    payload: vec![0; *n],
                })
                .collect(),
            next_seq: sizes.len() as u64 + 1,
            gap: None,
        })
    }

    fn reservation(budget: &Arc<Semaphore>, held: u32) -> ReplyReservation {
        ReplyReservation {
            budget: budget.clone(),
            held: Some(budget.clone().try_acquire_many_owned(held).unwrap()),
        }
    }

    #[test]
    fn a_reply_keeps_only_what_it_needs_of_its_reservation() {
        let budget = Arc::new(Semaphore::new(10_000));
        let (reply, permit) = admit(messages(&[100, 200]), Some(reservation(&budget, 6_000)));
        assert!(reply.is_ok());
        let kept = 100 + 200 + 2 * MESSAGE_FRAMING_BYTES;
        assert_eq!(permit.as_ref().map(|p| p.num_permits()), Some(kept));
        assert_eq!(budget.available_permits(), 10_000 - kept);
        drop(permit);
        assert_eq!(budget.available_permits(), 10_000);
    }

    #[test]
    fn a_reply_without_messages_gives_its_reservation_back() {
        let budget = Arc::new(Semaphore::new(10_000));
        let (reply, permit) = admit(
            Err(ServiceError::not_found("x")),
            Some(reservation(&budget, 6_000)),
        );
        assert_eq!(reply.unwrap_err().kind, ErrorKind::NotFound);
        assert!(permit.is_none_or(|p| p.num_permits() == 0));
        assert_eq!(budget.available_permits(), 10_000);
    }

    #[test]
    fn a_woken_wait_that_does_not_fit_is_answered_unavailable() {
        // The reservation was given back while the fetchWait waited; the
        // budget is meanwhile held by unread replies.
        let budget = Arc::new(Semaphore::new(1_000));
        let unread = budget.clone().try_acquire_many_owned(900).unwrap();
        let waited = ReplyReservation {
            budget: budget.clone(),
            held: None,
        };
        let (reply, permit) = admit(messages(&[500]), Some(waited));
        assert_eq!(reply.unwrap_err().kind, ErrorKind::Unavailable);
        assert!(permit.is_none());
        // Once the peer reads, the same reply fits.
        drop(unread);
        let waited = ReplyReservation {
            budget: budget.clone(),
            held: None,
        };
        let (reply, permit) = admit(messages(&[500]), Some(waited));
        assert!(reply.is_ok());
        assert_eq!(
            permit.map(|p| p.num_permits()),
            Some(500 + MESSAGE_FRAMING_BYTES)
        );
    }

    /// A store whose every sync fails.
    struct SyncFails(SharedMemStore);

    #[derive(Clone)]
    struct FailingSync;

    impl SyncHandle for FailingSync {
        fn sync(&self) -> impl std::future::Future<Output = Result<Lsn, StorageError>> + Send {
            std::future::ready(Err(StorageError::SyncTask("injected".into())))
        }
    }

    impl quicproquo_core::store::Store for SyncFails {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(key)
        }

        fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError> {
            self.0.write(batch)
        }

        fn scan(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<quicproquo_core::store::Records, StoreError> {
            self.0.scan(prefix, after, limit)
        }
    }

    impl ShellStore for SyncFails {
        type Sync = FailingSync;

        fn sync_handle(&self) -> FailingSync {
            FailingSync
        }
    }

    #[tokio::test]
    async fn after_a_failed_sync_the_failure_is_raised_and_requests_are_still_answered() {
        let store = SyncFails(SharedMemStore::new());
        let node = NodeService::new(NodeConfig::default(), [0; 32], store).unwrap();
        let (handle, join) = spawn(node, Observer::default(), None);
        // The sync of the version record written on open fails at once.
        // The first request is refused by the failed machine, or held and
        // refused when the failure comes; the second comes after it.
        tokio::time::timeout(HANG_GUARD, async {
            let conn = handle.open([0; TLS_EXPORTER_BYTES]).await.unwrap();
            for _ in 0..2 {
                let request = Request {
                    auth_version: AUTH_VERSION,
                    body: RequestBody::AuthChallenge,
                };
                let reply = handle.request(conn, request).await;
                assert_eq!(reply.unwrap_err().kind, ErrorKind::Unavailable);
            }
            handle.storage_failed().await;
        })
        .await
        .expect("the service answers after a failed sync and raises the failure");
        drop(handle);
        let stats = tokio::time::timeout(HANG_GUARD, join)
            .await
            .expect("the service ends once its handles are gone")
            .unwrap();
        assert!(stats.storage_failed);
    }

    /// How long a test waits before it calls the service hung.
    const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(10);

    #[test]
    fn unbudgeted_requests_pass_untouched() {
        let (reply, permit) = admit(messages(&[1 << 20]), None);
        assert!(reply.is_ok());
        assert!(permit.is_none());
    }
}
