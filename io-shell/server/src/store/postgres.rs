//! The machine's storage port over PostgreSQL ([`PgStore`]), for several
//! `qpq-server` nodes sharing one database (ARCHITECTURE.md § "Several nodes
//! on PostgreSQL").
//!
//! The machine's key-value map is one table, `qpq_kv (key bytea primary
//! key, value bytea)`; keys compare bytewise, as in fjall, so the machine's
//! runs and scans are index range reads. Each turn of the shell's service
//! task is one transaction at `SERIALIZABLE` isolation: PostgreSQL then
//! lets the nodes' turns commit only where the outcome is that of some
//! order of them one after another, so every rule the machine keeps by
//! being the only writer of its store (a KeyPackage popped once, seqs
//! without gaps, one Commit per epoch, dedup) holds across nodes. A turn
//! it cannot order is rolled back (SQLSTATE 40001 or 40P01): every read
//! and write of the rest of that turn fails with
//! [`quicproquo_core::store::StoreErrorKind::Aborted`], [`ShellStore::end_turn`] reports
//! [`StorageError::TurnAborted`], and the shell tells the machine, which
//! answers the turn's requests `unavailable` (retryable). A lost or hung
//! connection rolls a turn back the same way and is opened again for a
//! later turn, at most every [`RECONNECT_INTERVAL`]; each statement is
//! bounded by [`STATEMENT_TIMEOUT`], so no request waits on the database
//! for longer than that.
//!
//! The machine's calls are synchronous: the store drives `tokio-postgres`
//! on a small single-threaded runtime of its own, on the calling thread
//! ([`blocking`]). The shell runs each turn over this store inside
//! `tokio::task::block_in_place`, so the runtime's other tasks move to
//! another thread while the turn waits for the database.
//!
//! Durability: a turn's writes are durable when its `COMMIT` returns with
//! `synchronous_commit = on` (the server's `durability = "fsync"`); with
//! `buffered` the session sets it `off`, and PostgreSQL's WAL writer
//! flushes within its `wal_writer_delay`. Either way the machine holds a
//! turn's replies until the turn committed (the server runs the machine in
//! `fsync` mode over this store), because a turn that is rolled back must
//! not have answered anyone. The [`SyncHandle`] has nothing left to do: it
//! reports every `Lsn` whose turn ended.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quicproquo_core::node::{NodeConfig, NodeService, OpenError};
use quicproquo_core::store::{
    Batch, Lsn, Records, Store, StoreError, StoreErrorKind, StoreOp, run_key,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

use quicproquo_core::types::{ChannelId, IdentityKey, QueueId, hex};
use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;

use super::{Change, ChangeWatch, ShellStore, StorageError, SyncHandle};

/// Longest a statement (or a connection attempt) may take before the turn
/// is rolled back and the connection dropped.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failed connection attempt, turns are rolled back without trying
/// again for this long.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);

/// The schema version this build creates and reads (table `qpq_schema`).
pub const SCHEMA_VERSION: i32 = 1;

/// The statements that take the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the machine's key-value map. Values are ciphertexts and small
    // records: stored out of line when large, never compressed.
    "CREATE TABLE qpq_kv (key bytea PRIMARY KEY, value bytea NOT NULL);
     ALTER TABLE qpq_kv ALTER COLUMN value SET STORAGE EXTERNAL;",
];

/// Key of the advisory lock held while the schema is created or migrated,
/// so that nodes starting together do it once.
const SCHEMA_LOCK: i64 = 0x7170_715f_7363_6865; // "qpq_sche"

/// Where a [`PgStore`] connects and how its sessions are set.
#[derive(Clone)]
pub struct PgOptions {
    /// The connection string (`postgres://user:password@host:port/db` or
    /// `host=... user=...`).
    pub url: String,
    /// `synchronous_commit` of its sessions: on for `durability = "fsync"`.
    pub synchronous_commit: bool,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("PgOptions")
            .field("url", &redact_url(&self.url))
            .field("synchronous_commit", &self.synchronous_commit)
            .finish()
    }
}

/// `url` with any password replaced by `***`, for logs and settings shown.
pub fn redact_url(url: &str) -> String {
    // URL form: scheme://user:password@host...
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        if let Some(at) = rest.find('@')
            && let Some(colon) = rest[..at].find(':')
        {
            return format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &rest[..colon],
                &rest[at..]
            );
        }
        return url.to_owned();
    }
    // Key-value form: password=... up to the next space.
    url.split(' ')
        .map(|part| {
            if part.starts_with("password=") {
                "password=***"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The machine's store in a PostgreSQL database shared with other nodes.
pub struct PgStore {
    /// The connection and its runtime; see [`PgStore::call`].
    db: RefCell<Db>,
    /// Where it connects (for the change watch's own connection).
    config: tokio_postgres::Config,
    /// The next batch's number.
    next_lsn: u64,
    /// The last batch committed.
    committed: Lsn,
    /// Every batch up to here has committed or been rolled back.
    settled: Arc<AtomicU64>,
    /// The shell's current turn, if one is open. Reads take `&self` and may
    /// begin the turn's transaction or find it rolled back.
    turn: RefCell<Option<Turn>>,
}

/// The state of the shell's current turn.
#[derive(Debug, Default)]
struct Turn {
    /// Queues that got messages, told to the other nodes at the commit.
    changed: Vec<String>,
    /// Whether its transaction was begun (at its first statement).
    begun: bool,
    /// Why it was rolled back, once it was.
    aborted: Option<String>,
}

impl PgStore {
    /// Connects, and creates or migrates the schema. Fails if the database
    /// cannot be reached or holds a schema newer than this build's.
    pub fn open(options: PgOptions) -> Result<PgStore, StorageError> {
        let config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e| StorageError::Postgres(format!("invalid postgres_url: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::Postgres(format!("starting the store's runtime: {e}")))?;
        let mut db = Db {
            rt,
            config: config.clone(),
            synchronous_commit: options.synchronous_commit,
            conn: None,
            retry_at: None,
        };
        blocking(|| {
            db.connect()
                .map_err(|e| StorageError::Postgres(format!("opening the database: {e}")))
        })?;
        Ok(PgStore {
            db: RefCell::new(db),
            config,
            next_lsn: 1,
            committed: Lsn(0),
            settled: Arc::new(AtomicU64::new(0)),
            turn: RefCell::new(None),
        })
    }

    /// Runs `f` on the connection, blocking the calling thread until the
    /// database answered (or [`STATEMENT_TIMEOUT`] passed): see
    /// [`blocking`].
    fn call<R: Send>(
        &self,
        _op: StoreOp,
        f: impl FnOnce(&mut Db) -> Result<R, StoreError> + Send,
    ) -> Result<R, StoreError> {
        let mut db = self.db.borrow_mut();
        let db: &mut Db = &mut db;
        blocking(|| f(db))
    }

    /// Runs `f` inside the turn's transaction (begun at the turn's first
    /// statement), or as a statement of its own outside a turn. After a
    /// turn was rolled back, fails at once.
    fn in_turn<R: Send>(
        &self,
        op: StoreOp,
        f: impl FnOnce(&mut Db) -> Result<R, StoreError> + Send,
    ) -> Result<R, StoreError> {
        let begin = {
            let turn = self.turn.borrow();
            let Some(turn) = turn.as_ref() else {
                drop(turn);
                return self.call(op, f);
            };
            if let Some(reason) = &turn.aborted {
                return Err(StoreError::aborted(op, reason));
            }
            !turn.begun
        };
        let result = self.call(op, move |db| {
            if begin {
                db.begin(op)?;
            }
            f(db)
        });
        if let Some(turn) = self.turn.borrow_mut().as_mut() {
            turn.begun |= begin;
            if let Err(e) = &result {
                turn.aborted = Some(e.detail.clone());
            }
        }
        result
    }

    fn take_lsn(&mut self) -> Lsn {
        let lsn = Lsn(self.next_lsn);
        self.next_lsn += 1;
        lsn
    }
}

impl Store for PgStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.in_turn(StoreOp::Read, move |db| db.get(&key))
    }

    fn get_head(&self, key: &[u8], head: &mut [u8]) -> Result<Option<usize>, StoreError> {
        let key = key.to_vec();
        let want = head.len();
        let got = self.in_turn(StoreOp::Read, move |db| db.get_head(&key, want))?;
        Ok(got.map(|(bytes, len)| {
            let n = bytes.len().min(head.len());
            head[..n].copy_from_slice(&bytes[..n]);
            len
        }))
    }

    fn get_run(
        &self,
        prefix: &[u8],
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        if from >= to {
            return Ok(());
        }
        let (start, end) = (run_key(prefix, from), run_key(prefix, to));
        let rows = self.in_turn(StoreOp::Read, move |db| db.range(&start, Some(&end), None))?;
        let mut expect = from;
        for (key, value) in rows {
            // A run's keys are the prefix and an 8-byte seq; anything else
            // in the range is not part of it.
            let Some(seq) = key
                .strip_prefix(prefix)
                .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
                .map(u64::from_be_bytes)
            else {
                continue;
            };
            if seq != expect || !visit(seq, &value) {
                break;
            }
            expect += 1;
        }
        Ok(())
    }

    fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError> {
        let (deletes, puts) = final_ops(batch);
        if self.turn.get_mut().is_some() {
            self.in_turn(StoreOp::Write, move |db| db.apply(&deletes, &puts))?;
            return Ok(self.take_lsn());
        }
        // Outside a turn a batch is a transaction of its own.
        self.call(StoreOp::Write, move |db| {
            db.begin(StoreOp::Write)?;
            let applied = db.apply(&deletes, &puts).and_then(|()| db.commit());
            if applied.is_err() {
                db.rollback();
            }
            applied
        })?;
        let lsn = self.take_lsn();
        self.committed = lsn;
        self.settled.store(lsn.0, Ordering::Release);
        Ok(lsn)
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Records, StoreError> {
        // Strictly after `after`: from its successor in key order.
        let start = match after {
            Some(after) if after >= prefix => {
                let mut start = after.to_vec();
                start.push(0);
                start
            }
            _ => prefix.to_vec(),
        };
        let end = prefix_end(prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.in_turn(StoreOp::Read, move |db| {
            db.range(&start, end.as_deref(), Some(limit))
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn changed(&mut self, queue: &QueueId) {
        let payload = queue_payload(queue);
        match self.turn.get_mut() {
            Some(turn) => {
                if !turn.changed.contains(&payload) {
                    turn.changed.push(payload);
                }
            }
            // Outside a turn the write has committed already.
            None => {
                let _ = self.call(StoreOp::Write, move |db| db.notify(&[payload]));
            }
        }
    }
}

impl ShellStore for PgStore {
    type Sync = PgSync;

    fn sync_handle(&self) -> PgSync {
        PgSync(self.settled.clone())
    }

    fn begin_turn(&mut self) {
        *self.turn.get_mut() = Some(Turn::default());
    }

    fn watch_changes(&self, changes: Sender<Change>) -> Option<ChangeWatch> {
        Some(Box::pin(watch(self.config.clone(), changes)))
    }

    fn end_turn(&mut self) -> Result<(), StorageError> {
        let Some(turn) = self.turn.get_mut().take() else {
            return Ok(());
        };
        let last = Lsn(self.next_lsn - 1);
        let outcome = match (turn.begun, turn.aborted) {
            (false, None) => Ok(()),
            (true, None) => self
                .call(StoreOp::Write, move |db| {
                    // Delivered to the listening nodes when (and only if)
                    // the transaction commits.
                    let committed = db.notify(&turn.changed).and_then(|()| db.commit());
                    if committed.is_err() {
                        db.rollback();
                    }
                    committed
                })
                .map_err(|e| e.detail),
            (begun, Some(reason)) => {
                if begun {
                    let _ = self.call(StoreOp::Write, |db| {
                        db.rollback();
                        Ok(())
                    });
                }
                Err(reason)
            }
        };
        self.settled.store(last.0, Ordering::Release);
        match outcome {
            Ok(()) => {
                self.committed = last;
                Ok(())
            }
            Err(reason) => Err(StorageError::TurnAborted {
                kept: self.committed,
                reason,
            }),
        }
    }
}

/// Attempts at opening the machine over a [`PgStore`] whose opening write
/// the database rolls back (a conflict with another node's turn), and the
/// pause after each.
pub const OPEN_ATTEMPTS_MAX: u32 = 50;
const OPEN_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Opens the store and the machine over it (`config` as given: the caller
/// sets the machine's durability), trying again while the machine's
/// opening write is rolled back for a conflict with another node's turn,
/// up to [`OPEN_ATTEMPTS_MAX`] times.
pub fn open_node(
    options: &PgOptions,
    config: &NodeConfig,
    seed: [u8; 32],
) -> Result<NodeService<PgStore>, String> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let store = PgStore::open(options.clone()).map_err(|e| e.to_string())?;
        match NodeService::new(config.clone(), seed, store) {
            Ok(node) => return Ok(node),
            Err(OpenError::Store(e))
                if e.kind == StoreErrorKind::Aborted && attempt < OPEN_ATTEMPTS_MAX =>
            {
                tracing::debug!(attempt, error = %e, "opening write rolled back; trying again");
                std::thread::sleep(OPEN_RETRY_PAUSE);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The [`SyncHandle`] of a [`PgStore`]: a turn is durable when it
/// committed, so a sync only reports how far turns have ended.
#[derive(Debug, Clone)]
pub struct PgSync(Arc<AtomicU64>);

impl PgSync {
    /// The last batch whose turn ended (committed or rolled back).
    pub fn settled(&self) -> Lsn {
        Lsn(self.0.load(Ordering::Acquire))
    }
}

impl SyncHandle for PgSync {
    fn sync(&self) -> impl std::future::Future<Output = Result<Lsn, StorageError>> + Send {
        std::future::ready(Ok(Lsn(self.0.load(Ordering::Acquire))))
    }
}

/// Runs `f`, which blocks on the store's own single-threaded runtime, from
/// wherever the store is called: directly outside a runtime (or inside
/// `tokio::task::block_in_place`, where the shell runs a turn over this
/// store), inside `block_in_place` on a worker of a multi-threaded
/// runtime, and on a scoped thread of its own inside a single-threaded
/// runtime (which cannot block; slow, for tests only).
fn blocking<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => f(),
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|s| match s.spawn(f).join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

/// A batch as the keys it deletes and the `(key, value)`s it sets, each
/// key once with its last operation.
fn final_ops(batch: Batch) -> (Vec<Vec<u8>>, Records) {
    let mut last: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let mut order = Vec::new();
    for (key, value) in batch.into_ops() {
        if !last.contains_key(&key) {
            order.push(key.clone());
        }
        last.insert(key, value);
    }
    let mut deletes = Vec::new();
    let mut puts = Vec::new();
    for key in order {
        match last.remove(&key).flatten() {
            Some(value) => puts.push((key, value)),
            None => deletes.push(key),
        }
    }
    (deletes, puts)
}

/// The first key after every key that starts with `prefix`, or `None` if
/// there is none (the prefix is all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Runs one statement on `$db`'s connection (opened again if it was
/// lost) within [`STATEMENT_TIMEOUT`]: `$call` is the statement's future,
/// with the connection bound to `$c`.
macro_rules! run {
    ($db:expr, $op:expr, |$c:ident| $call:expr) => {{
        let op: StoreOp = $op;
        match $db.conn(op) {
            Err(e) => Err(e),
            Ok(_) => {
                let result = {
                    let $c = $db.conn.as_ref().expect("connected above");
                    $db.rt
                        .block_on(async { tokio::time::timeout(STATEMENT_TIMEOUT, $call).await })
                };
                $db.finish(op, result)
            }
        }
    }};
}

/// The connection and its prepared statements.
struct Conn {
    client: Client,
    get: Statement,
    get_head: Statement,
    range: Statement,
    range_open: Statement,
    delete: Statement,
    upsert: Statement,
    /// `delete` and `upsert` in one statement.
    replace: Statement,
    notify: Statement,
}

/// What the store's thread owns.
struct Db {
    rt: tokio::runtime::Runtime,
    config: tokio_postgres::Config,
    synchronous_commit: bool,
    conn: Option<Conn>,
    /// No connection attempt before this, after a failed one.
    retry_at: Option<Instant>,
}

impl Db {
    /// Opens the connection, sets up its session and prepares the
    /// statements.
    fn connect(&mut self) -> Result<(), String> {
        let config = self.config.clone();
        let sync = if self.synchronous_commit { "on" } else { "off" };
        let conn = self.rt.block_on(async move {
            let (client, connection) =
                tokio::time::timeout(STATEMENT_TIMEOUT, config.connect(NoTls))
                    .await
                    .map_err(|_| format!("no connection within {STATEMENT_TIMEOUT:?}"))?
                    .map_err(|e| describe(&e))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection ended");
                }
            });
            let setup = async {
                client
                    .batch_execute(&format!(
                        "SET synchronous_commit = {sync}; \
                         SET statement_timeout = {}; \
                         SET idle_in_transaction_session_timeout = {};",
                        STATEMENT_TIMEOUT.as_millis(),
                        STATEMENT_TIMEOUT.as_millis() * 2,
                    ))
                    .await?;
                Ok::<_, tokio_postgres::Error>(client)
            };
            let client = tokio::time::timeout(STATEMENT_TIMEOUT, setup)
                .await
                .map_err(|_| format!("session setup took over {STATEMENT_TIMEOUT:?}"))?
                .map_err(|e| describe(&e))?;
            tokio::time::timeout(STATEMENT_TIMEOUT, Self::migrate(&client))
                .await
                .map_err(|_| format!("the schema check took over {STATEMENT_TIMEOUT:?}"))??;
            let prepare =
                async {
                    Ok::<_, tokio_postgres::Error>(Conn {
                    get: client.prepare("SELECT value FROM qpq_kv WHERE key = $1").await?,
                    get_head: client
                        .prepare(
                            "SELECT substring(value FROM 1 FOR $2::int4), length(value) \
                             FROM qpq_kv WHERE key = $1",
                        )
                        .await?,
                    range: client
                        .prepare(
                            "SELECT key, value FROM qpq_kv WHERE key >= $1 AND key < $2 \
                             ORDER BY key LIMIT $3",
                        )
                        .await?,
                    range_open: client
                        .prepare(
                            "SELECT key, value FROM qpq_kv WHERE key >= $1 ORDER BY key LIMIT $2",
                        )
                        .await?,
                    delete: client
                        .prepare("DELETE FROM qpq_kv WHERE key = ANY($1)")
                        .await?,
                    replace: client
                        .prepare(
                            "WITH gone AS (DELETE FROM qpq_kv WHERE key = ANY($1)) \
                             INSERT INTO qpq_kv (key, value) \
                             SELECT * FROM unnest($2::bytea[], $3::bytea[]) \
                             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        )
                        .await?,
                    notify: client
                        .prepare(&format!(
                            "SELECT pg_notify('{CHANNEL}', q) FROM unnest($1::text[]) AS q"
                        ))
                        .await?,
                    upsert: client
                        .prepare(
                            "INSERT INTO qpq_kv (key, value) \
                             SELECT * FROM unnest($1::bytea[], $2::bytea[]) \
                             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        )
                        .await?,
                    client,
                })
                };
            tokio::time::timeout(STATEMENT_TIMEOUT, prepare)
                .await
                .map_err(|_| format!("preparing statements took over {STATEMENT_TIMEOUT:?}"))?
                .map_err(|e| describe(&e))
        });
        match conn {
            Ok(conn) => {
                self.conn = Some(conn);
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + RECONNECT_INTERVAL);
                Err(e)
            }
        }
    }

    /// The connection, opened again if it was lost (at most every
    /// [`RECONNECT_INTERVAL`]).
    fn conn(&mut self, op: StoreOp) -> Result<&Conn, StoreError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(StoreError::aborted(op, "the database is unreachable"));
            }
            self.connect().map_err(|e| {
                StoreError::aborted(op, format!("the database is unreachable: {e}"))
            })?;
        }
        Ok(self.conn.as_ref().expect("connected above"))
    }

    /// The outcome of a statement run within [`STATEMENT_TIMEOUT`]: its
    /// failure as a [`StoreError`], the connection dropped where it cannot
    /// be trusted any more.
    fn finish<T>(
        &mut self,
        op: StoreOp,
        result: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let (error, drop_conn) = classify(op, &e);
                if drop_conn {
                    self.conn = None;
                }
                Err(error)
            }
            Err(_) => {
                self.conn = None;
                Err(StoreError::aborted(
                    op,
                    format!("the database did not answer within {STATEMENT_TIMEOUT:?}"),
                ))
            }
        }
    }

    fn begin(&mut self, op: StoreOp) -> Result<(), StoreError> {
        run!(self, op, |c| c
            .client
            .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE"))
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        run!(self, StoreOp::Write, |c| c.client.batch_execute("COMMIT"))
    }

    /// Ends a failed transaction; a connection that cannot is dropped.
    fn rollback(&mut self) {
        if self.conn.is_some() {
            let rolled_back: Result<(), StoreError> =
                run!(self, StoreOp::Write, |c| c.client.batch_execute("ROLLBACK"));
            if rolled_back.is_err() {
                self.conn = None;
            }
        }
    }

    /// Tells the listening nodes (`LISTEN qpq_queues`) that these queues
    /// got messages; inside a transaction, delivered at its commit.
    fn notify(&mut self, queues: &[String]) -> Result<(), StoreError> {
        if queues.is_empty() {
            return Ok(());
        }
        run!(self, StoreOp::Write, |c| c
            .client
            .execute(&c.notify, &[&queues]))?;
        Ok(())
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let row = run!(self, StoreOp::Read, |c| c.client.query_opt(&c.get, &[&key]))?;
        row.map(|r| r.try_get::<_, Vec<u8>>(0))
            .transpose()
            .map_err(StoreError::read)
    }

    fn get_head(
        &mut self,
        key: &[u8],
        want: usize,
    ) -> Result<Option<(Vec<u8>, usize)>, StoreError> {
        let want = i32::try_from(want).unwrap_or(i32::MAX);
        let row = run!(self, StoreOp::Read, |c| c
            .client
            .query_opt(&c.get_head, &[&key, &want]))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let head: Vec<u8> = row.try_get(0).map_err(StoreError::read)?;
        let len: i32 = row.try_get(1).map_err(StoreError::read)?;
        Ok(Some((head, usize::try_from(len).unwrap_or(0))))
    }

    fn range(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: Option<i64>,
    ) -> Result<Records, StoreError> {
        let limit = limit.unwrap_or(i64::MAX);
        let rows = match end {
            Some(end) => run!(self, StoreOp::Read, |c| c
                .client
                .query(&c.range, &[&start, &end, &limit]))?,
            None => run!(self, StoreOp::Read, |c| c
                .client
                .query(&c.range_open, &[&start, &limit]))?,
        };
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Records, tokio_postgres::Error>>()
            .map_err(StoreError::read)
    }

    fn apply(
        &mut self,
        deletes: &[Vec<u8>],
        puts: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let gone: Vec<&[u8]> = deletes.iter().map(Vec::as_slice).collect();
        let keys: Vec<&[u8]> = puts.iter().map(|(k, _)| k.as_slice()).collect();
        let values: Vec<&[u8]> = puts.iter().map(|(_, v)| v.as_slice()).collect();
        // One statement (one round trip) either way; each key is in one
        // list only (`final_ops`).
        match (gone.is_empty(), keys.is_empty()) {
            (true, true) => {}
            (false, true) => {
                run!(self, StoreOp::Write, |c| c
                    .client
                    .execute(&c.delete, &[&gone]))?;
            }
            (true, false) => {
                run!(self, StoreOp::Write, |c| c
                    .client
                    .execute(&c.upsert, &[&keys, &values]))?;
            }
            (false, false) => {
                run!(self, StoreOp::Write, |c| c
                    .client
                    .execute(&c.replace, &[&gone, &keys, &values]))?;
            }
        }
        Ok(())
    }

    /// Creates the schema, or migrates it to [`SCHEMA_VERSION`], under an
    /// advisory lock so that nodes starting together do it once; refuses a
    /// newer schema. Run on every new connection, before its statements
    /// are prepared.
    async fn migrate(client: &Client) -> Result<(), String> {
        let step = async {
            client.batch_execute("BEGIN").await?;
            client
                .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .await?;
            client
                .batch_execute("CREATE TABLE IF NOT EXISTS qpq_schema (version integer NOT NULL)")
                .await?;
            let found: Option<i32> = client
                .query_one("SELECT max(version) FROM qpq_schema", &[])
                .await?
                .get(0);
            let found = found.unwrap_or(0);
            if found > SCHEMA_VERSION {
                client.batch_execute("ROLLBACK").await?;
                return Ok(Err(format!(
                    "the database has qpq schema version {found}, but this qpq-server \
                     knows versions up to {SCHEMA_VERSION}"
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                client.batch_execute(sql).await?;
                let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
                client.execute("DELETE FROM qpq_schema", &[]).await?;
                client
                    .execute("INSERT INTO qpq_schema (version) VALUES ($1)", &[&version])
                    .await?;
                tracing::info!(version, "PostgreSQL schema migrated");
            }
            client.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>(Ok(()))
        };
        step.await
            .map_err(|e| format!("creating the schema: {}", describe(&e)))?
    }
}

/// How often the change watch tries again to report a `Missed` it owes.
const MISSED_RETRY: Duration = Duration::from_millis(10);

/// The notification channel (`LISTEN`) on which nodes announce queues
/// that got messages.
pub const CHANNEL: &str = "qpq_queues";

/// A queue as a notification's payload: the recipient's identity key and
/// the channel id, in hex, joined by `/`.
fn queue_payload(queue: &QueueId) -> String {
    format!(
        "{}/{}",
        hex(&queue.recipient_key.0),
        hex(queue.channel_id.as_bytes())
    )
}

/// The queue a notification's payload names; `None` for anything else
/// (a payload no node of this version sends is ignored).
fn parse_queue_payload(payload: &str) -> Option<QueueId> {
    let (key, channel) = payload.split_once('/')?;
    let key = unhex(key)?;
    let channel = unhex(channel)?;
    Some(QueueId {
        recipient_key: IdentityKey(key.try_into().ok()?),
        channel_id: ChannelId::try_from_slice(&channel).ok()?,
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The change watch: a connection of its own that `LISTEN`s on
/// [`CHANNEL`] and reports each queue another node (or this one) announced.
/// After a lost connection it connects again (every
/// [`RECONNECT_INTERVAL`]) and reports [`Change::Missed`], since
/// notifications sent meanwhile are gone; so it does when `changes` was
/// full and it had to drop some. Ends when `changes` is closed.
async fn watch(config: tokio_postgres::Config, changes: Sender<Change>) {
    let mut reporter = Reporter {
        changes,
        missed: false,
    };
    let mut connected_before = false;
    loop {
        let connect = tokio::time::timeout(STATEMENT_TIMEOUT, config.connect(NoTls));
        let (client, mut connection) = tokio::select! {
            c = connect => match c {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(error = %describe(&e), "change watch cannot connect");
                    tokio::time::sleep(RECONNECT_INTERVAL).await;
                    continue;
                }
                Err(_) => continue,
            },
            () = reporter.changes.closed() => return,
        };
        let listen_sql = format!("LISTEN {CHANNEL}");
        let mut listen = std::pin::pin!(client.batch_execute(&listen_sql));
        let mut listening = false;
        loop {
            tokio::select! {
                done = &mut listen, if !listening => {
                    if let Err(e) = done {
                        tracing::debug!(error = %describe(&e), "change watch cannot listen");
                        break;
                    }
                    listening = true;
                    if connected_before {
                        reporter.missed = true;
                    }
                    connected_before = true;
                    if !reporter.flush() {
                        return;
                    }
                }
                message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        if let Some(queue) = parse_queue_payload(n.payload())
                            && !reporter.report(Change::Queue(queue))
                        {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %describe(&e), "change watch connection failed");
                        break;
                    }
                    None => break,
                },
                // An owed `Missed` goes out once there is room, even if
                // no notification comes to carry it.
                () = tokio::time::sleep(MISSED_RETRY), if reporter.missed => {
                    if !reporter.flush() {
                        return;
                    }
                }
                () = reporter.changes.closed() => return,
            }
        }
        tokio::time::sleep(RECONNECT_INTERVAL).await;
    }
}

/// Hands the watch's changes to the service task without waiting for it:
/// when its queue is full a change is dropped and [`Change::Missed`] owed.
struct Reporter {
    changes: Sender<Change>,
    /// Changes were dropped (or may have been): a `Missed` is owed.
    missed: bool,
}

impl Reporter {
    /// Reports the owed `Missed`, if any and if there is room; `false`
    /// once nobody listens.
    fn flush(&mut self) -> bool {
        if self.missed {
            match self.changes.try_send(Change::Missed) {
                Ok(()) => self.missed = false,
                Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Reports `change` (after an owed `Missed`, which covers it); `false`
    /// once nobody listens.
    fn report(&mut self, change: Change) -> bool {
        if !self.flush() {
            return false;
        }
        if self.missed {
            return true;
        }
        match self.changes.try_send(change) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.missed = true;
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// `e` in words, with the database's own message and SQLSTATE when it
/// sent one (tokio-postgres's `Display` says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// What a failed statement means for the turn: the error to report, and
/// whether the connection must be dropped.
fn classify(op: StoreOp, e: &tokio_postgres::Error) -> (StoreError, bool) {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or closed.
        return (
            StoreError::aborted(
                op,
                format!("the connection to the database failed: {}", describe(e)),
            ),
            true,
        );
    };
    let class = &code.code()[..2];
    if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
        (
            StoreError::aborted(
                op,
                "it conflicted with a concurrent request on another node",
            ),
            false,
        )
    } else if class == "08" || class == "57" {
        // Connection exceptions; operator intervention (shutdown, a
        // cancelled or timed-out statement).
        (
            StoreError::aborted(op, format!("the database is unavailable: {}", describe(e))),
            true,
        )
    } else if class == "53" || class == "40" || class == "25" || class == "55" {
        // Out of resources (disk full, too many connections), other
        // rollbacks, a transaction already failed, locks not available.
        (
            StoreError::aborted(op, format!("the database refused: {}", describe(e))),
            false,
        )
    } else {
        let error = match op {
            StoreOp::Read => StoreError::read(describe(e)),
            StoreOp::Write => StoreError::write(describe(e)),
        };
        (error, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_both_url_forms() {
        assert_eq!(
            redact_url("postgres://qpq:s3cret@db:5432/qpq"),
            "postgres://qpq:***@db:5432/qpq"
        );
        assert_eq!(redact_url("postgres://qpq@db/qpq"), "postgres://qpq@db/qpq");
        assert_eq!(
            redact_url("host=db user=qpq password=s3cret dbname=qpq"),
            "host=db user=qpq password=*** dbname=qpq"
        );
    }

    #[test]
    fn a_batch_applies_each_keys_last_operation() {
        let mut b = Batch::new();
        b.put(b"a".to_vec(), b"1".to_vec());
        b.delete(b"b".to_vec());
        b.put(b"b".to_vec(), b"2".to_vec());
        b.put(b"c".to_vec(), b"3".to_vec());
        b.delete(b"c".to_vec());
        let (deletes, puts) = final_ops(b);
        assert_eq!(deletes, vec![b"c".to_vec()]);
        assert_eq!(
            puts,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
    }

    #[test]
    fn a_queue_survives_its_notification_payload() {
        let queue = QueueId {
            recipient_key: IdentityKey([0xab; 32]),
            channel_id: ChannelId::try_from_slice(&[1, 2, 3]).unwrap(),
        };
        assert_eq!(parse_queue_payload(&queue_payload(&queue)), Some(queue));
        let default = QueueId {
            recipient_key: IdentityKey([1; 32]),
            channel_id: ChannelId::DEFAULT,
        };
        assert_eq!(parse_queue_payload(&queue_payload(&default)), Some(default));
        for junk in [
            "",
            "/",
            "zz/",
            "ab/cd",
            &format!("{}/{}", "00".repeat(32), "11".repeat(17)),
        ] {
            assert_eq!(parse_queue_payload(junk), None, "{junk}");
        }
    }

    #[test]
    fn a_full_change_queue_owes_one_missed_and_pays_it_once_there_is_room() {
        let queue = |n: u8| {
            Change::Queue(QueueId {
                recipient_key: IdentityKey([n; 32]),
                channel_id: ChannelId::DEFAULT,
            })
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let mut r = Reporter {
            changes: tx,
            missed: false,
        };
        assert!(r.report(queue(1)) && r.report(queue(2)));
        // Full: dropped, and owed.
        assert!(r.report(queue(3)));
        assert!(r.missed);
        assert_eq!(rx.try_recv().unwrap(), queue(1));
        assert_eq!(rx.try_recv().unwrap(), queue(2));
        // Room again: the owed Missed goes before the next change.
        assert!(r.report(queue(4)));
        assert!(!r.missed);
        assert_eq!(rx.try_recv().unwrap(), Change::Missed);
        assert_eq!(rx.try_recv().unwrap(), queue(4));
        assert!(rx.try_recv().is_err());
        // Full again, and a flush with no room keeps the debt.
        assert!(r.report(queue(5)) && r.report(queue(6)) && r.report(queue(7)));
        assert!(r.flush() && r.missed);
        drop(rx);
        assert!(!r.report(queue(8)), "nobody listens");
    }

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }
}
