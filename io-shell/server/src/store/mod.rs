//! The server's storage: the NodeService machine's storage port
//! ([`quicproquo_core::store::Store`]) over fjall ([`FjallStore`]) and over a
//! shared in-memory store for simulations ([`SharedMemStore`]), plus the
//! group-commit task ([`run_group_commit`]) that makes writes durable.
//!
//! Writes and syncs are separate on purpose. The machine applies each batch
//! at once (visible, not yet durable) and asks for a sync of its [`Lsn`]; the
//! shell forwards those requests to [`run_group_commit`], which answers many
//! of them with one fsync through a [`SyncHandle`] and reports the last `Lsn`
//! that sync covers. The machine releases a reply only once its writes are
//! covered, so group commit changes how many fsyncs happen, never what a
//! client is told.
//!
//! Invariants kept here:
//! - A `SyncHandle` reads the last written `Lsn` *before* it syncs, so the
//!   `Lsn` it reports is never ahead of what reached the disk.
//! - [`run_group_commit`] never reports a sync that did not cover every
//!   request it answers, and after the first failure it reports the error
//!   and stops: nothing is acknowledged after an fsync failed.
//! - Nothing here starts an OS thread except a handle's own sync (fjall's
//!   fsync runs under `tokio::task::spawn_blocking`; the in-memory handle
//!   completes inline), so the same code runs deterministically inside a
//!   turmoil simulation.

use std::path::PathBuf;
use std::time::Duration;

use quicproquo_core::store::{Lsn, Records, Store};
use quicproquo_core::types::QueueId;
use tokio::sync::mpsc::{Sender, UnboundedReceiver, UnboundedSender};

pub mod fjall_store;
pub mod mem;
pub mod postgres;

pub use fjall_store::{FjallStore, FjallSync};
pub use mem::{MemSync, SharedMemStore};
pub use postgres::{PgOptions, PgStore, PgSync};

/// A failure of the server's storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Another `FjallStore` (in this or another process) holds the database.
    #[error(
        "database {} is already in use (fjall's lock file is held); is another qpq-server running on it?",
        path.display()
    )]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// The directory holds a fjall database of a format this build cannot
    /// read (e.g. written by fjall 2, or by a newer fjall).
    #[error(
        "database {} has storage-engine format {found}, but this qpq-server reads fjall format 3",
        path.display()
    )]
    EngineFormat {
        /// The database directory.
        path: PathBuf,
        /// The format found, as fjall reports it.
        found: String,
    },
    /// Opening or recovering the database failed.
    #[error("cannot open database {}: {source}", path.display())]
    Open {
        /// The database directory.
        path: PathBuf,
        /// fjall's error.
        #[source]
        source: fjall::Error,
    },
    /// A batch was refused before it reached the storage engine: it would
    /// have left less free space than the store keeps in reserve. Nothing of
    /// it was written; the store takes writes again once space is freed.
    #[error(
        "disk full: {} has {free_bytes} bytes free, and {reserve_bytes} are kept in reserve",
        path.display()
    )]
    DiskFull {
        /// The database directory.
        path: PathBuf,
        /// Bytes free on its filesystem when the batch came.
        free_bytes: u64,
        /// Bytes kept free (`storage_reserve_bytes`).
        reserve_bytes: u64,
    },
    /// A read, write or sync failed. After a failed write or sync fjall
    /// refuses every further write (`Poisoned`); restart the server to
    /// recover.
    #[error("storage engine failure: {0}")]
    Fjall(#[from] fjall::Error),
    /// A key or value fjall cannot store (keys are 1 to 65535 bytes, values
    /// under 4 GiB); refused before anything is written.
    #[error("a {what} of {bytes} bytes cannot be stored")]
    Unstorable {
        /// `"key"` or `"value"`.
        what: &'static str,
        /// Its length.
        bytes: usize,
    },
    /// The fsync of the journal file failed (or the file could not be
    /// found or opened for it).
    #[error("syncing the journal {}: {source}", path.display())]
    JournalSync {
        /// The journal file (or the database directory, if none was found).
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task running the sync panicked or was cancelled.
    #[error("the sync task did not complete: {0}")]
    SyncTask(String),
    /// A sync reported a lower `Lsn` than was requested: the request came
    /// from another store, which is a bug in the shell.
    #[error("a sync covered only {covered:?} but {requested:?} was requested")]
    SyncBehind {
        /// Highest `Lsn` requested.
        requested: Lsn,
        /// `Lsn` the sync covered.
        covered: Lsn,
    },
    /// The in-memory store's lock is poisoned: a thread panicked inside it.
    #[error("the in-memory store's lock is poisoned")]
    MemPoisoned,
    /// The PostgreSQL store could not be opened (connection, schema).
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// A store shared with other nodes rolled the turn back: nothing it
    /// wrote after `kept` is stored. Not a failure of the store; the shell
    /// tells the machine (`NodeService::handle_turn_aborted`) and goes on.
    #[error("the turn was rolled back: {reason}")]
    TurnAborted {
        /// The last batch the store still holds.
        kept: Lsn,
        /// Why, in the database's terms.
        reason: String,
    },
}

/// Makes written batches durable. Cheap to clone; one clone lives in the
/// group-commit task.
pub trait SyncHandle: Clone + Send + Sync + 'static {
    /// Makes every batch written before the call durable and returns the last Lsn it covers.
    fn sync(&self) -> impl std::future::Future<Output = Result<Lsn, StorageError>> + Send;
}

/// What another machine sharing the store (another server node) changed,
/// as a [`ShellStore::watch_changes`] task reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The queue got new messages.
    Queue(QueueId),
    /// Changes may have been missed (the watch lost its connection and
    /// opened a new one): every long-poll is to be checked.
    Missed,
}

/// A task that reports other machines' changes until nobody listens.
pub type ChangeWatch = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A storage port the server shell can run: the machine's [`Store`] plus a
/// handle to sync it from another task.
pub trait ShellStore: Store + Send + 'static {
    /// The sync handle of this store.
    type Sync: SyncHandle;

    /// A handle that syncs this store.
    fn sync_handle(&self) -> Self::Sync;

    /// Opens a turn: the batches written until [`Self::end_turn`] may be
    /// held back and committed together (one journal write), visible to
    /// reads meanwhile. A store that commits each batch at once ignores it.
    fn begin_turn(&mut self) {}

    /// Commits what the turn wrote and closes it. Until then a sync may
    /// not cover the turn's batches, so the shell hands sync requests on
    /// only after this. An error is a failure of the store, as a failed
    /// write would be.
    fn end_turn(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    /// For a store other machines write too: a task that reports their
    /// changes on `changes` (the shell hands them to the machine,
    /// `NodeService::handle_queue_changed`) until `changes` is closed;
    /// when `changes` is full it drops them and reports [`Change::Missed`]
    /// once there is room. A store with one writer has none.
    fn watch_changes(&self, _changes: Sender<Change>) -> Option<ChangeWatch> {
        None
    }
}

/// The group-commit task: waits for sync requests (the `Lsn` of
/// `Output::Sync`), takes every request queued by then, runs one sync for
/// all of them and sends the covered `Lsn` on `synced`. Requests that arrive
/// while a sync runs queue up and share the next one.
///
/// After each sync the task waits `pause` before it takes the next
/// requests: zero when replies wait for syncs (`fsync` durability), where
/// the next sync must start at once; [`BUFFERED_SYNC_PAUSE`] when they do
/// not (`buffered`), so the disk is kept up to date without an fsync for
/// every turn of the service task — back to back they took about a fifth
/// of the server's CPU.
///
/// Returns when `requests` is closed and drained, when nobody listens on
/// `synced`, or right after reporting the first failure: once an fsync has
/// failed nothing written since may be acknowledged, so the task stops
/// rather than retry and pretend.
pub async fn run_group_commit<H: SyncHandle>(
    handle: H,
    requests: UnboundedReceiver<Lsn>,
    synced: UnboundedSender<Result<Lsn, StorageError>>,
    pause: Duration,
) {
    run_group_commit_timed(handle, requests, synced, pause, |_| {}).await;
}

/// [`run_group_commit`], telling `timed` how long each sync took (the
/// server's `qpq_fsync_duration_seconds`).
pub async fn run_group_commit_timed<H: SyncHandle>(
    handle: H,
    mut requests: UnboundedReceiver<Lsn>,
    synced: UnboundedSender<Result<Lsn, StorageError>>,
    pause: Duration,
    timed: impl Fn(Duration),
) {
    let mut batch = Vec::new();
    let mut first = true;
    loop {
        batch.clear();
        if !first && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        first = false;
        if requests
            .recv_many(&mut batch, SYNC_REQUESTS_PER_DRAIN_MAX)
            .await
            == 0
        {
            return;
        }
        let requested = batch.iter().copied().max().unwrap_or_default();
        let started = std::time::Instant::now();
        let result = handle.sync().await;
        timed(started.elapsed());
        let result = match result {
            Ok(covered) if covered >= requested => {
                tracing::trace!(requests = batch.len(), ?covered, "group commit");
                Ok(covered)
            }
            Ok(covered) => Err(StorageError::SyncBehind { requested, covered }),
            Err(e) => Err(e),
        };
        let failed = result.is_err();
        if let Err(e) = &result {
            tracing::error!(error = %e, "sync failed; group commit stops");
        }
        if synced.send(result).is_err() || failed {
            return;
        }
    }
}

/// Every record of a store in key order, a bounded chunk at a time: each
/// chunk is one `scan` of at most `chunk` records after the last key of the
/// chunk before. `qpq-server migrate` copies and compares stores with it,
/// `qpq-server backup` and `restore` read snapshots and databases with it.
#[derive(Debug)]
pub struct KeyOrder<F> {
    scan: F,
    chunk: usize,
    after: Option<Vec<u8>>,
    done: bool,
}

impl<F, E> KeyOrder<F>
where
    F: FnMut(Option<&[u8]>, usize) -> Result<Records, E>,
{
    /// A walk that calls `scan(after, chunk)` for each chunk; `scan`
    /// returns the records after `after` (from the first if `None`), at
    /// most `chunk` of them, and none at the end.
    pub fn new(chunk: usize, scan: F) -> Self {
        assert!(chunk > 0, "a walk of empty chunks never ends");
        KeyOrder {
            scan,
            chunk,
            after: None,
            done: false,
        }
    }

    /// The next chunk, or `None` once every record was handed out.
    pub fn next_chunk(&mut self) -> Result<Option<Records>, E> {
        if self.done {
            return Ok(None);
        }
        let records = (self.scan)(self.after.as_deref(), self.chunk)?;
        match records.last() {
            Some((last, _)) => {
                self.after = Some(last.clone());
                Ok(Some(records))
            }
            None => {
                self.done = true;
                Ok(None)
            }
        }
    }
}

/// With `durability = "buffered"`, the least time between the end of one
/// sync and the start of the next: what a crash of the machine can lose is
/// about this much of the latest writes, plus one sync.
pub const BUFFERED_SYNC_PAUSE: Duration = Duration::from_millis(50);

/// Most sync requests taken from the queue before one sync. Only bounds the
/// drain buffer: requests beyond it are served by the very next sync.
const SYNC_REQUESTS_PER_DRAIN_MAX: usize = 4_096;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use quicproquo_core::store::Batch;
    use tokio::sync::{Semaphore, mpsc};

    use super::*;

    /// A [`SyncHandle`] over a [`SharedMemStore`] that counts syncs, can be
    /// made to wait for a permit before each sync, and can fail or lie.
    #[derive(Clone)]
    struct Counting {
        inner: MemSync,
        syncs: Arc<AtomicUsize>,
        gate: Option<Arc<Semaphore>>,
        behaviour: Behaviour,
    }

    #[derive(Clone, Copy)]
    enum Behaviour {
        Honest,
        Fail,
        ReportZero,
    }

    impl SyncHandle for Counting {
        async fn sync(&self) -> Result<Lsn, StorageError> {
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate open").forget();
            }
            self.syncs.fetch_add(1, Ordering::SeqCst);
            match self.behaviour {
                Behaviour::Honest => self.inner.sync().await,
                Behaviour::Fail => Err(StorageError::SyncTask("injected".into())),
                Behaviour::ReportZero => Ok(Lsn(0)),
            }
        }
    }

    struct Rig {
        store: SharedMemStore,
        handle: Counting,
        requests: mpsc::UnboundedSender<Lsn>,
        synced: mpsc::UnboundedReceiver<Result<Lsn, StorageError>>,
        task: tokio::task::JoinHandle<()>,
    }

    /// Starts the group-commit task over a fresh store. The task does not run
    /// before the test first yields (current-thread runtime).
    fn rig(behaviour: Behaviour, gated: bool) -> Rig {
        paced_rig(behaviour, gated, Duration::ZERO)
    }

    /// [`rig`] with a pause after each sync.
    fn paced_rig(behaviour: Behaviour, gated: bool, pause: Duration) -> Rig {
        let store = SharedMemStore::new();
        let handle = Counting {
            inner: store.sync_handle(),
            syncs: Arc::default(),
            gate: gated.then(|| Arc::new(Semaphore::new(0))),
            behaviour,
        };
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (synced_tx, synced) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_group_commit(
            handle.clone(),
            requests_rx,
            synced_tx,
            pause,
        ));
        Rig {
            store,
            handle,
            requests,
            synced,
            task,
        }
    }

    impl Rig {
        /// Writes one batch and requests its sync, as the machine does.
        fn write_and_request(&mut self) -> Lsn {
            let mut b = Batch::new();
            b.put(b"k".to_vec(), b"v".to_vec());
            let lsn = self.store.write(b).unwrap();
            self.requests.send(lsn).unwrap();
            lsn
        }

        fn syncs(&self) -> usize {
            self.handle.syncs.load(Ordering::SeqCst)
        }

        fn open_gate(&self, permits: usize) {
            self.handle.gate.as_ref().unwrap().add_permits(permits);
        }
    }

    /// Buffered mode: after a sync, the next waits out the pause, and
    /// every request made meanwhile shares it; a request after a quiet
    /// spell is synced at once.
    #[tokio::test(start_paused = true)]
    async fn a_paced_group_commit_waits_between_syncs() {
        let pause = BUFFERED_SYNC_PAUSE;
        let mut r = paced_rig(Behaviour::Honest, false, pause);
        let start = tokio::time::Instant::now();
        r.write_and_request();
        r.synced.recv().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        let last = (0..10).map(|_| r.write_and_request()).last().unwrap();
        assert_eq!(r.synced.recv().await.unwrap().unwrap(), last);
        assert_eq!(start.elapsed(), pause);
        assert_eq!(r.syncs(), 2);
        tokio::time::sleep(pause * 10).await;
        let quiet = tokio::time::Instant::now();
        r.write_and_request();
        r.synced.recv().await.unwrap().unwrap();
        assert_eq!(quiet.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn queued_requests_share_one_sync() {
        let mut r = rig(Behaviour::Honest, false);
        let lsns: Vec<Lsn> = (0..100).map(|_| r.write_and_request()).collect();
        let last = *lsns.last().unwrap();
        assert_eq!(r.synced.recv().await.unwrap().unwrap(), last);
        assert_eq!(r.syncs(), 1);
        assert_eq!(r.store.inner().synced_lsn(), last);
    }

    #[tokio::test]
    async fn requests_during_a_sync_are_served_by_the_next_one() {
        let mut r = rig(Behaviour::Honest, true);
        let first = r.write_and_request();
        // Let the task take the first request and block inside its sync.
        tokio::task::yield_now().await;
        let later: Vec<Lsn> = (0..10).map(|_| r.write_and_request()).collect();
        r.open_gate(1);
        // The first sync runs after all eleven writes, so it reports the
        // last Lsn; what matters is that it covers its own request.
        let covered = r.synced.recv().await.unwrap().unwrap();
        assert!(covered >= first);
        r.open_gate(1);
        let covered = r.synced.recv().await.unwrap().unwrap();
        assert!(covered >= *later.last().unwrap());
        assert_eq!(r.syncs(), 2, "ten queued requests shared the second sync");
    }

    #[tokio::test]
    async fn every_request_is_covered_by_a_reported_lsn() {
        let mut r = rig(Behaviour::Honest, false);
        let mut reported = Vec::new();
        let mut requested = Vec::new();
        for round in 0..20 {
            for _ in 0..round % 4 + 1 {
                requested.push(r.write_and_request());
            }
            reported.push(r.synced.recv().await.unwrap().unwrap());
        }
        let max = reported.iter().copied().max().unwrap();
        assert!(requested.iter().all(|l| *l <= max));
        assert!(reported.windows(2).all(|w| w[0] <= w[1]));
        assert!(r.syncs() <= requested.len());
    }

    #[tokio::test]
    async fn a_failed_sync_is_reported_and_stops_the_task() {
        let mut r = rig(Behaviour::Fail, false);
        r.write_and_request();
        assert!(matches!(
            r.synced.recv().await.unwrap(),
            Err(StorageError::SyncTask(_))
        ));
        // The task ends although its request channel is still open.
        (&mut r.task).await.unwrap();
        assert!(r.synced.recv().await.is_none());
        assert!(r.requests.send(Lsn(2)).is_err());
        assert_eq!(r.store.inner().synced_lsn(), Lsn(0));
    }

    #[tokio::test]
    async fn a_sync_behind_the_request_is_an_error() {
        let mut r = rig(Behaviour::ReportZero, false);
        let lsn = r.write_and_request();
        match r.synced.recv().await.unwrap() {
            Err(StorageError::SyncBehind { requested, covered }) => {
                assert_eq!((requested, covered), (lsn, Lsn(0)));
            }
            other => panic!("expected SyncBehind, got {other:?}"),
        }
        (&mut r.task).await.unwrap();
    }

    #[tokio::test]
    async fn the_task_ends_when_requests_close_after_serving_them() {
        let mut r = rig(Behaviour::Honest, false);
        let lsn = r.write_and_request();
        drop(r.requests);
        assert_eq!(r.synced.recv().await.unwrap().unwrap(), lsn);
        r.task.await.unwrap();
        assert!(r.synced.recv().await.is_none());
    }
}
