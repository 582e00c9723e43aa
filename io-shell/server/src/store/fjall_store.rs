//! [`FjallStore`]: the machine's storage port over an embedded fjall 3
//! database (`<data_dir>/qpq.db`, ARCHITECTURE.md § Storage), and
//! [`FjallSync`], the handle that fsyncs it for group commit.
//!
//! All of the machine's records live in one keyspace, [`KEYSPACE`]; the
//! machine's own layout (`quicproquo_core::node`) gives every key a one-byte
//! tag, and its format version record sits at key `0x00`. Requests use the
//! port only through point reads and atomic batches, never scans, so they
//! never walk over deleted entries (tombstones); only the machine's
//! background sweep scans, a bounded step at a time.
//!
//! Durability: [`Store::write`] commits a batch to fjall's journal with
//! `PersistMode::Buffer` — handed to the OS, so it survives a crash of the
//! process but not of the machine — and numbers it with an [`Lsn`] from a
//! counter that starts at 0 on every open (the machine compares only `Lsn`s
//! of one process). [`FjallSync`] reads that counter *before* it fsyncs the
//! journal, so the `Lsn` it reports is covered by the fsync. Nothing else
//! here syncs. Data no sync covered yet reaches the disk when the OS writes
//! its page cache back, or when fjall fsyncs on its own: when it seals a
//! journal (rotation after a memtable flush) and when the database is closed
//! (dropping the last handle). With `durability = "buffered"` the machine
//! still requests syncs, but its replies do not wait for them.
//!
//! Turns: between [`ShellStore::begin_turn`] and [`ShellStore::end_turn`]
//! (the service task brackets each turn of requests with them), batches
//! are not committed one by one: each is applied to an in-memory overlay
//! that reads see, and `end_turn` commits the overlay — the last value of
//! every key the turn wrote — to fjall as one atomic batch, one journal
//! write for the whole turn. Batches are numbered as they come, but the
//! counter a [`FjallSync`] reads moves only when `end_turn` has committed
//! them, so a sync never reports a batch still in the overlay. The shell
//! hands the machine's sync requests on only after `end_turn`. A crash
//! loses a turn whole or not at all, and nobody was told of it: replies
//! leave after `end_turn` (and, with `durability = "fsync"`, after the
//! sync). The free-space check below still runs batch by batch, so a full
//! disk refuses the requests that add data and lets the others through.
//! Requests never scan, so a scan inside a turn is refused as a bug.
//!
//! Snapshots: [`FjallStore::reader`] hands out a [`FjallReader`], which
//! another thread uses to read the database as it was at one instant
//! ([`FjallSnapshot`]) while the store goes on writing; `qpq-server backup`
//! reads a running server's records through it. A snapshot sees every
//! batch committed to fjall before it whole and none after, so it falls
//! between turns.
//!
//! Space: a store opened [`FjallStore::with_reserve`] keeps that many bytes
//! free on the database's filesystem. Before each batch it reads the free
//! space (`statvfs`, bytes available to unprivileged users) and refuses a
//! batch that would leave less than the reserve — half of it for an
//! [`Batch::upkeep`] batch — with [`StorageError::DiskFull`], which the
//! machine answers `unavailable` and survives: nothing reached fjall. This
//! is the only way back from a full disk without a restart, because fjall
//! takes no more writes after any failed one: a journal write that meets
//! ENOSPC, or a flush or compaction that does in the background, poisons
//! the database (`Poisoned`) until it is reopened. The reserve must
//! therefore hold what fjall writes on its own: a flushed memtable (up to
//! 64 MiB) and compactions. The first refusal is logged as an error naming
//! the database and its free space, the first batch that adds data after
//! refusals as the end of it.
//!
//! A database is opened once per process: fjall holds an exclusive `flock` on
//! `<db>/lock` while any [`FjallStore`] or [`FjallSync`] of it is alive, and a
//! second open — from this or another process — fails with
//! [`StorageError::Locked`] (after fjall's own three tries, about 0.2 s).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use fjall::{
    Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode, Readable as _,
};
use quicproquo_core::store::{Batch, Lsn, Records, Store, StoreError, copy_head, run_key};

use super::{ShellStore, StorageError, SyncHandle};

/// Name of the keyspace holding the NodeService's records.
pub const KEYSPACE: &str = "node";

/// The NodeService's storage port over a fjall database.
pub struct FjallStore {
    db: Database,
    keyspace: Keyspace,
    lsns: Arc<LsnCounters>,
    path: PathBuf,
    /// Bytes kept free on the filesystem; 0: not checked.
    reserve_bytes: u64,
    /// Whether batches were refused for space since the last batch that
    /// added data went through (so each turn is logged once).
    refusing: bool,
    /// The last reading of the filesystem's free space, if one may still
    /// stand in for a new one.
    space: Option<SpaceReading>,
    /// The last `Lsn` handed out (batches of an open turn included);
    /// `lsns.written` catches up when they are committed.
    assigned: u64,
    /// The open turn's writes, if a turn is open.
    turn: Option<Turn>,
    /// The last turn's overlay, emptied, for the next turn: a map built
    /// afresh each turn grew by rehashing into newly faulted-in memory,
    /// a few percent of the server's CPU.
    spare_overlay: Overlay,
}

/// A turn's writes: every key's last value (`None`: deleted).
type Overlay = HashMap<Vec<u8>, Option<Vec<u8>>, foldhash::fast::RandomState>;

/// Entries a kept overlay may have room for; one that grew beyond this
/// (a turn of many large fetches) is shrunk when it is kept.
const SPARE_OVERLAY_ENTRIES_MAX: usize = 16 * 1024;

/// What the open turn wrote and fjall has not seen yet: every key's last
/// value (`None`: deleted), and the bytes the turn adds (for the space
/// check).
#[derive(Debug, Default)]
struct Turn {
    overlay: Overlay,
    bytes: u64,
}

/// fjall's background threads (memtable flushes and compactions). One:
/// with more, fjall 3.1's worker 0 passes each compaction message back to
/// the queue for another worker and, while that one compacts, spins
/// receiving it again (its `WorkerMessage::Compact`); see
/// ARCHITECTURE.md, Storage.
const FJALL_WORKER_THREADS: usize = 1;

/// How long a reading of the free space stands in for a new one at most.
const SPACE_READING_AGE_MAX: Duration = Duration::from_millis(100);

/// A reading stands in for a new one while the bytes written since stay
/// within this fraction (1/N) of the room it left above the reserve, so
/// what fjall writes on top of a batch (its journal, flushes and
/// compactions, or another process) cannot take the reserve unseen.
const SPACE_READING_SHARE: u64 = 4;

/// Free space read from the filesystem (`statvfs`), and the bytes this
/// store has committed since.
#[derive(Debug, Clone, Copy)]
struct SpaceReading {
    free_bytes: u64,
    written: u64,
    at: Instant,
}

impl SpaceReading {
    /// The free space this reading vouches for at `now` before a batch
    /// of `bytes`, keeping `reserve` free: `None` once it is too old or
    /// too much was written since.
    fn stands_for(&self, reserve: u64, bytes: u64, now: Instant) -> Option<u64> {
        let room = self.free_bytes.saturating_sub(reserve);
        (now.saturating_duration_since(self.at) < SPACE_READING_AGE_MAX
            && self.written.saturating_add(bytes) <= room / SPACE_READING_SHARE)
            .then(|| self.free_bytes.saturating_sub(self.written))
    }
}

impl FjallStore {
    /// Opens the database directory at `path` (e.g. `<data_dir>/qpq.db`),
    /// creating it if absent and recovering its journal otherwise. This
    /// blocks on disk I/O (recovery replays the journal); call it before the
    /// runtime starts or from a blocking task.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let path = path.to_path_buf();
        let db = Database::builder(&path)
            .worker_threads(FJALL_WORKER_THREADS)
            .open()
            .map_err(|e| open_error(&path, e))?;
        let keyspace = db
            .keyspace(KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(|e| open_error(&path, e))?;
        tracing::debug!(path = %path.display(), "opened database");
        Ok(FjallStore {
            db,
            keyspace,
            lsns: Arc::default(),
            path,
            reserve_bytes: 0,
            refusing: false,
            space: None,
            assigned: 0,
            turn: None,
            spare_overlay: Overlay::default(),
        })
    }

    /// Keeps `bytes` free on the database's filesystem: a batch that would
    /// leave less is refused with [`StorageError::DiskFull`] before fjall
    /// sees it (an [`Batch::upkeep`] batch may use half of it). 0, the
    /// default, checks nothing.
    pub fn with_reserve(mut self, bytes: u64) -> Self {
        self.reserve_bytes = bytes;
        self.space = None;
        self
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `Lsn` of the last batch committed to fjall since this open.
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.lsns.written.load(Ordering::Acquire))
    }

    /// The number of stored records, counting deletions not yet compacted
    /// away; cheap (no scan), for metrics.
    pub fn approximate_len(&self) -> usize {
        self.keyspace.approximate_len()
    }

    /// A handle that takes snapshots of this database from other threads
    /// (backups); it keeps the database open while it is held.
    pub fn reader(&self) -> FjallReader {
        FjallReader {
            db: self.db.clone(),
            keyspace: self.keyspace.clone(),
        }
    }

    /// Bytes the database occupies on disk (journals and tables), for
    /// metrics.
    pub fn disk_space_bytes(&self) -> Result<u64, StorageError> {
        Ok(self.db.disk_space()?)
    }
}

impl Store for FjallStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if check_key(key).is_err() {
            // fjall cannot hold such a key, so it is not stored.
            return Ok(None);
        }
        if let Some(value) = self.turn.as_ref().and_then(|t| t.overlay.get(key)) {
            return Ok(value.clone());
        }
        let value = self
            .keyspace
            .get(key)
            .map_err(|e| StoreError::read(StorageError::from(e)))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn get_head(&self, key: &[u8], head: &mut [u8]) -> Result<Option<usize>, StoreError> {
        if check_key(key).is_err() {
            return Ok(None);
        }
        if let Some(value) = self.turn.as_ref().and_then(|t| t.overlay.get(key)) {
            return Ok(value.as_deref().map(|v| copy_head(v, head)));
        }
        // fjall hands out a shared slice of the value: nothing is copied
        // but the head.
        let value = self
            .keyspace
            .get(key)
            .map_err(|e| StoreError::read(StorageError::from(e)))?;
        Ok(value.map(|v| copy_head(&v, head)))
    }

    /// One range read from fjall (a single seek, then the next records in
    /// order, instead of a descent of every table per key), with the open
    /// turn's overlay taking precedence key by key.
    fn get_run(
        &self,
        prefix: &[u8],
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let key_of = |seq: u64| run_key(prefix, seq);
        if from >= to || check_key(&key_of(from)).is_err() {
            return Ok(());
        }
        let overlay = self.turn.as_ref().map(|t| &t.overlay);
        let (start, end) = (key_of(from), key_of(to));
        let mut disk = self.keyspace.range::<&[u8], _>((
            std::ops::Bound::Included(start.as_slice()),
            std::ops::Bound::Excluded(end.as_slice()),
        ));
        let mut next_disk: Option<(fjall::Slice, fjall::Slice)> = None;
        for seq in from..to {
            let key = key_of(seq);
            if next_disk.is_none()
                && let Some(guard) = disk.next()
            {
                next_disk = Some(
                    guard
                        .into_inner()
                        .map_err(|e| StoreError::read(StorageError::from(e)))?,
                );
            }
            // The stored record of this key, if the range is at it.
            let stored = match &next_disk {
                Some((k, _)) if k.as_ref() == key.as_slice() => next_disk.take().map(|(_, v)| v),
                _ => None,
            };
            let more = match overlay.and_then(|o| o.get(&key)) {
                Some(Some(written)) => visit(seq, written),
                Some(None) => break,
                None => match &stored {
                    Some(value) => visit(seq, value),
                    None => break,
                },
            };
            if !more {
                break;
            }
        }
        Ok(())
    }

    fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError> {
        self.write_batch(batch).map_err(|e| match e {
            StorageError::DiskFull { .. } => StoreError::full(e),
            e => StoreError::write(e),
        })
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Records, StoreError> {
        if self.turn.as_ref().is_some_and(|t| !t.overlay.is_empty()) {
            // Requests never scan (the sweep runs outside turns); a scan
            // here would miss the turn's writes.
            return Err(StoreError::read("a scan inside a turn of requests"));
        }
        let iter = self.keyspace.range::<&[u8], _>(scan_range(prefix, after));
        take_records(iter, prefix, limit, usize::MAX)
            .map_err(|e| StoreError::read(StorageError::from(e)))
    }
}

/// The records a scan reads: after `after` if given, else from `prefix`.
fn scan_range<'a>(
    prefix: &'a [u8],
    after: Option<&'a [u8]>,
) -> (std::ops::Bound<&'a [u8]>, std::ops::Bound<&'a [u8]>) {
    match after {
        Some(a) => (std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded),
        None => (
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ),
    }
}

/// The first records of `iter` that start with `prefix`: at most `limit`
/// of them, and no more once their keys and values reach `bytes_max`.
fn take_records(
    iter: fjall::Iter,
    prefix: &[u8],
    limit: usize,
    bytes_max: usize,
) -> Result<Records, fjall::Error> {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for guard in iter {
        if out.len() >= limit || bytes >= bytes_max {
            break;
        }
        let (k, v) = guard.into_inner()?;
        if !k.starts_with(prefix) {
            break;
        }
        bytes = bytes.saturating_add(k.len() + v.len());
        out.push((k.to_vec(), v.to_vec()));
    }
    Ok(out)
}

/// Takes point-in-time snapshots of a [`FjallStore`]'s database from any
/// thread, while the store goes on writing (`qpq-server backup` against a
/// running server). Holding one keeps the database open.
#[derive(Clone)]
pub struct FjallReader {
    db: Database,
    keyspace: Keyspace,
}

impl FjallReader {
    /// The database as it is now, for as long as the snapshot is held.
    pub fn snapshot(&self) -> FjallSnapshot {
        FjallSnapshot {
            snapshot: self.db.snapshot(),
            keyspace: self.keyspace.clone(),
        }
    }
}

impl fmt::Debug for FjallReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallReader").finish_non_exhaustive()
    }
}

/// The machine's records as they were at one instant. fjall gives every
/// write batch one sequence number and makes it visible to new snapshots
/// only once all of it is in memory, so a snapshot holds each batch whole
/// or not at all; the store commits a turn of requests, the sweep's steps
/// and the version record each as one batch, so a snapshot falls between
/// turns: a queue's counters agree with its messages, a KeyPackage pop
/// with its pool's head, an `enqueueBatch` is in every queue or in none.
/// fjall keeps what the snapshot reads from being compacted away until it
/// is dropped.
pub struct FjallSnapshot {
    snapshot: fjall::Snapshot,
    keyspace: Keyspace,
}

impl FjallSnapshot {
    /// The records after `after` (from the first if `None`) in key order:
    /// at most `limit`, and no more once their keys and values reach
    /// `bytes_max` (at least one is returned if any is left).
    pub fn scan(
        &self,
        after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Records, StorageError> {
        let iter = self
            .snapshot
            .range::<&[u8], _>(&self.keyspace, scan_range(&[], after));
        Ok(take_records(iter, &[], limit, bytes_max)?)
    }
}

impl fmt::Debug for FjallSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallSnapshot").finish_non_exhaustive()
    }
}

impl FjallStore {
    fn write_batch(&mut self, batch: Batch) -> Result<Lsn, StorageError> {
        let upkeep = batch.is_upkeep();
        let ops = batch.into_ops();
        // fjall writes the journal before it checks key sizes (and
        // truncates a key length to 16 bits there), so an unstorable key
        // must be refused before anything is committed.
        for (key, value) in &ops {
            check_key(key)?;
            if let Some(v) = value
                && u32::try_from(v.len()).is_err()
            {
                return Err(StorageError::Unstorable {
                    what: "value",
                    bytes: v.len(),
                });
            }
        }
        let bytes = ops
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + JOURNAL_BYTES_PER_OP)
            .fold(0u64, |sum, n| sum.saturating_add(n as u64));
        let pending = self.turn.as_ref().map_or(0, |t| t.bytes);
        self.check_space(upkeep, bytes.saturating_add(pending))?;
        if let Some(turn) = &mut self.turn {
            for (key, value) in ops {
                turn.overlay.insert(key, value);
            }
            turn.bytes = turn.bytes.saturating_add(bytes);
            self.assigned += 1;
            return Ok(Lsn(self.assigned));
        }
        let mut wb = OwnedWriteBatch::with_capacity(self.db.clone(), ops.len())
            .durability(Some(PersistMode::Buffer));
        for (key, value) in ops {
            match value {
                Some(v) => wb.insert(&self.keyspace, key, v),
                None => wb.remove(&self.keyspace, key),
            }
        }
        wb.commit().map_err(|e| self.engine_failed(e))?;
        self.space_written(bytes);
        // Numbered only after the commit: whoever reads the counter sees
        // only Lsns of batches already in the journal.
        self.assigned += 1;
        self.lsns.written.store(self.assigned, Ordering::Release);
        Ok(Lsn(self.assigned))
    }

    /// Commits the open turn's overlay as one batch and closes the turn.
    fn commit_turn(&mut self) -> Result<(), StorageError> {
        let Some(turn) = self.turn.take() else {
            return Ok(());
        };
        let mut overlay = turn.overlay;
        let batch = (!overlay.is_empty()).then(|| {
            let mut wb = OwnedWriteBatch::with_capacity(self.db.clone(), overlay.len())
                .durability(Some(PersistMode::Buffer));
            // Each key once, with its last value: the order of keys within
            // one atomic batch does not matter.
            for (key, value) in overlay.drain() {
                match value {
                    Some(v) => wb.insert(&self.keyspace, key, v),
                    None => wb.remove(&self.keyspace, key),
                }
            }
            wb
        });
        overlay.shrink_to(SPARE_OVERLAY_ENTRIES_MAX);
        self.spare_overlay = overlay;
        if let Some(wb) = batch {
            wb.commit().map_err(|e| self.engine_failed(e))?;
            self.space_written(turn.bytes);
        }
        self.lsns.written.store(self.assigned, Ordering::Release);
        Ok(())
    }

    /// Counts `bytes` committed against the last free-space reading.
    fn space_written(&mut self, bytes: u64) {
        if let Some(reading) = &mut self.space {
            reading.written = reading.written.saturating_add(bytes);
        }
    }

    /// The free space: the last reading while it may stand in for a new
    /// one (younger than [`SPACE_READING_AGE_MAX`], with less than
    /// 1/[`SPACE_READING_SHARE`] of its room above the reserve written
    /// since, nothing refused since), else a new reading. Reading it is a
    /// `statvfs` (a path walk and a sum over the filesystem's per-CPU
    /// counters); run for every batch, it took about a tenth of the
    /// server's CPU per enqueue (`benches/ab.sh`: 31-36 against 28-30 µs).
    fn free_space(&mut self, bytes: u64) -> std::io::Result<u64> {
        if !self.refusing
            && let Some(free) = self
                .space
                .and_then(|r| r.stands_for(self.reserve_bytes, bytes, Instant::now()))
        {
            return Ok(free);
        }
        self.space = None;
        let free_bytes = free_bytes(&self.path)?;
        self.space = Some(SpaceReading {
            free_bytes,
            written: 0,
            at: Instant::now(),
        });
        Ok(free_bytes)
    }

    /// Refuses a batch of about `bytes` that would leave less than the
    /// reserve free (half of it for upkeep), logging the first refusal and
    /// the first batch that adds data after refusals. A filesystem whose
    /// free space cannot be read is not checked: fjall meets it as it is.
    fn check_space(&mut self, upkeep: bool, bytes: u64) -> Result<(), StorageError> {
        if self.reserve_bytes == 0 {
            return Ok(());
        }
        let free_bytes = match self.free_space(bytes) {
            Ok(free) => free,
            Err(e) => {
                tracing::debug!(db = %self.path.display(), error = %e, "free space unknown");
                return Ok(());
            }
        };
        let keep = if upkeep {
            self.reserve_bytes / 2
        } else {
            self.reserve_bytes
        };
        if free_bytes >= keep.saturating_add(bytes) {
            if self.refusing && !upkeep {
                self.refusing = false;
                tracing::info!(
                    db = %self.path.display(),
                    free_bytes,
                    reserve_bytes = self.reserve_bytes,
                    "disk space is available again: writes resume"
                );
            }
            return Ok(());
        }
        if !self.refusing {
            self.refusing = true;
            tracing::error!(
                db = %self.path.display(),
                free_bytes,
                reserve_bytes = self.reserve_bytes,
                "disk full: {} has {free_bytes} bytes free, and a write of {bytes} bytes \
                 would leave less than the {keep} it keeps (storage_reserve_bytes); writes \
                 that add data are refused with `unavailable` until space is freed, before \
                 the storage engine meets ENOSPC (no space left on device)",
                self.path.display(),
            );
        }
        Err(StorageError::DiskFull {
            path: self.path.clone(),
            free_bytes,
            reserve_bytes: self.reserve_bytes,
        })
    }

    /// Logs a write fjall refused — after which it takes no more — with
    /// the free space, naming ENOSPC when that is what it met.
    fn engine_failed(&self, e: fjall::Error) -> StorageError {
        let free_bytes = free_bytes(&self.path).ok();
        let cause = if is_out_of_space(&e) {
            "the disk is full (ENOSPC, no space left on device)"
        } else {
            "see the error"
        };
        tracing::error!(
            db = %self.path.display(),
            error = %e,
            ?free_bytes,
            "storage write failed in {}: {cause}; the storage engine takes no more writes \
             until the server is restarted",
            self.path.display(),
        );
        StorageError::Fjall(e)
    }
}

impl ShellStore for FjallStore {
    type Sync = FjallSync;

    fn begin_turn(&mut self) {
        if self.turn.is_none() {
            self.turn = Some(Turn {
                overlay: std::mem::take(&mut self.spare_overlay),
                bytes: 0,
            });
        }
    }

    fn end_turn(&mut self) -> Result<(), StorageError> {
        self.commit_turn()
    }

    fn sync_handle(&self) -> FjallSync {
        FjallSync {
            _db: self.db.clone(),
            lsns: Arc::clone(&self.lsns),
            dir: self.path.clone(),
            journal: Arc::default(),
            #[cfg(test)]
            after_persist: None,
        }
    }
}

impl fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallStore")
            .field("path", &self.path)
            .field("last_lsn", &self.last_lsn())
            .finish_non_exhaustive()
    }
}

/// Fsyncs a [`FjallStore`]'s journal. Holding one keeps the database open.
///
/// It syncs the active journal file through a descriptor of its own rather
/// than with fjall's `persist`, which holds the journal's lock through the
/// whole `fdatasync`: every commit of the service task would wait for the
/// disk, and the requests that arrive during a sync could not be written
/// meanwhile to share the next one. An fsync covers the file, whichever
/// descriptor wrote it. The active journal is the highest-numbered
/// `<n>.jnl` in the database directory; fjall syncs a journal in full
/// before it starts the next one (`rotate`), so a batch written before the
/// sync began is either in the file synced here or in an older one that is
/// durable already.
#[derive(Clone)]
pub struct FjallSync {
    /// Keeps the database, and so its journals, open while a sync may run.
    _db: Database,
    lsns: Arc<LsnCounters>,
    /// The database directory, where the journals are.
    dir: PathBuf,
    /// The journal file last synced, by number, kept open.
    journal: Arc<std::sync::Mutex<Option<(u64, std::fs::File)>>>,
    /// Run right after the fsync returns and before `sync_blocking` does,
    /// so a unit test can write a batch while a sync is in progress.
    #[cfg(test)]
    after_persist: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl FjallSync {
    /// Makes every batch written before the call durable and returns the
    /// last `Lsn` it covers, blocking the calling thread for the fsync.
    pub fn sync_blocking(&self) -> Result<Lsn, StorageError> {
        // Read before the fsync: every batch numbered up to here is already
        // in the journal, so this fsync covers it.
        let covered = self.lsns.written.load(Ordering::Acquire);
        if covered <= self.lsns.synced.load(Ordering::Acquire) {
            // An fsync that completed already covered all of it.
            return Ok(Lsn(covered));
        }
        self.sync_journal()?;
        #[cfg(test)]
        if let Some(hook) = &self.after_persist {
            hook();
        }
        self.lsns.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(Lsn(covered))
    }

    /// `fdatasync` of the active journal file, without fjall's lock.
    /// fdatasync (not fsync) is enough for our data, and skips the
    /// timestamp update fsync also writes:
    /// - fjall creates every journal file with `create_new`, preallocates it
    ///   (`set_len`), fsyncs the file *and* its directory before any batch
    ///   goes into it, so a new journal's name and inode are already
    ///   durable;
    /// - fdatasync still flushes the metadata needed to read the data back —
    ///   block allocation and a changed file size (a recovered journal is
    ///   truncated and then appended to) — per POSIX and Linux
    ///   `fdatasync(2)`;
    /// - a sealed journal was fsynced (`SyncAll`) under the journal lock
    ///   when it was rotated, so batches in older journals are durable
    ///   already;
    /// - every batch is handed to the OS (`PersistMode::Buffer`) when it is
    ///   committed, before its `Lsn` counts as written, so the file's data
    ///   this fdatasync flushes holds it.
    fn sync_journal(&self) -> Result<(), StorageError> {
        let mut open = self
            .journal
            .lock()
            .map_err(|_| StorageError::SyncTask("the journal handle's lock is poisoned".into()))?;
        // A journal found and then deleted before it was opened was sealed
        // (and synced) by fjall in the meantime: look again.
        for _ in 0..JOURNAL_LOOKUPS_MAX {
            let id = self.active_journal()?;
            if open.as_ref().is_none_or(|(at, _)| *at != id) {
                let path = self.dir.join(format!("{id}.jnl"));
                match std::fs::File::open(&path) {
                    Ok(file) => *open = Some((id, file)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(StorageError::JournalSync { path, source }),
                }
            }
            if let Some((id, file)) = open.as_ref() {
                return file
                    .sync_data()
                    .map_err(|source| StorageError::JournalSync {
                        path: self.dir.join(format!("{id}.jnl")),
                        source,
                    });
            }
        }
        Err(StorageError::JournalSync {
            path: self.dir.clone(),
            source: std::io::Error::other("the active journal kept changing"),
        })
    }

    /// The number of the highest-numbered journal file.
    fn active_journal(&self) -> Result<u64, StorageError> {
        let err = |source| StorageError::JournalSync {
            path: self.dir.clone(),
            source,
        };
        let mut highest = None;
        for entry in std::fs::read_dir(&self.dir).map_err(err)? {
            let name = entry.map_err(err)?.file_name();
            let id = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jnl"))
                .and_then(|n| n.parse::<u64>().ok());
            highest = highest.max(id);
        }
        highest.ok_or_else(|| err(std::io::Error::other("no journal file")))
    }
}

/// Times [`FjallSync`] looks for the active journal again when the one it
/// found is gone before it could open it.
const JOURNAL_LOOKUPS_MAX: usize = 8;

impl SyncHandle for FjallSync {
    fn sync(&self) -> impl std::future::Future<Output = Result<Lsn, StorageError>> + Send {
        let handle = self.clone();
        async move {
            tokio::task::spawn_blocking(move || handle.sync_blocking())
                .await
                .map_err(|e| StorageError::SyncTask(e.to_string()))?
        }
    }
}

impl fmt::Debug for FjallSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallSync")
            .field("lsns", &self.lsns)
            .finish_non_exhaustive()
    }
}

/// The `Lsn`s of one open database, shared by the store and its handles.
#[derive(Debug, Default)]
struct LsnCounters {
    /// Last `Lsn` whose batch is committed to fjall's journal (a batch of
    /// an open turn is numbered before that).
    written: AtomicU64,
    /// Highest `Lsn` a completed fsync covered.
    synced: AtomicU64,
}

fn open_error(path: &Path, e: fjall::Error) -> StorageError {
    let path = path.to_path_buf();
    match e {
        fjall::Error::Locked => StorageError::Locked { path },
        fjall::Error::InvalidVersion(found) => StorageError::EngineFormat {
            path,
            found: found.map_or_else(|| "unknown".to_owned(), |v| format!("{v:?}")),
        },
        source => StorageError::Open { path, source },
    }
}

/// Bytes available to unprivileged users on the filesystem holding `path`
/// (an ext4 filesystem keeps some blocks for root; they are left alone).
#[cfg(unix)]
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(not(unix))]
fn free_bytes(_path: &Path) -> std::io::Result<u64> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// True if fjall failed for lack of space (ENOSPC).
fn is_out_of_space(e: &fjall::Error) -> bool {
    matches!(e, fjall::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull)
}

/// Bytes fjall's journal adds to each operation of a batch besides its key
/// and value (entry tag, keyspace, lengths, checksum share), rounded up: a
/// bound for the space check, not an exact count.
const JOURNAL_BYTES_PER_OP: usize = 32;

/// Keys fjall can store: 1 to 65535 bytes (lsm-tree asserts both bounds).
fn check_key(key: &[u8]) -> Result<(), StorageError> {
    if key.is_empty() || u16::try_from(key.len()).is_err() {
        return Err(StorageError::Unstorable {
            what: "key",
            bytes: key.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use quicproquo_core::node::{NodeConfig, NodeService, OpenError, Output};
    use quicproquo_core::store::StoreErrorKind;

    use super::*;

    fn open(dir: &tempfile::TempDir) -> FjallStore {
        FjallStore::open(&dir.path().join("qpq.db")).unwrap()
    }

    fn batch(ops: &[(&[u8], Option<&[u8]>)]) -> Batch {
        let mut b = Batch::new();
        for (k, v) in ops {
            match v {
                Some(v) => b.put(k.to_vec(), v.to_vec()),
                None => b.delete(k.to_vec()),
            }
        }
        b
    }

    fn check(store: &FjallStore, key: &[u8], want: Option<&[u8]>) {
        assert_eq!(store.get(key).unwrap().as_deref(), want, "key {key:?}");
    }

    #[test]
    fn put_get_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        check(&s, b"a", None);
        s.write(batch(&[(b"a", Some(b"1"))])).unwrap();
        check(&s, b"a", Some(b"1"));
        s.write(batch(&[(b"a", Some(b"2"))])).unwrap();
        check(&s, b"a", Some(b"2"));
        s.write(batch(&[(b"a", None)])).unwrap();
        check(&s, b"a", None);
        s.write(batch(&[(b"e", Some(b""))])).unwrap();
        check(&s, b"e", Some(b""));
    }

    #[test]
    fn a_batch_applies_all_its_operations_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(b"old", Some(b"0"))])).unwrap();
        s.write(batch(&[
            (b"x", Some(b"1")),
            (b"y", Some(b"2")),
            (b"x", None),
            (b"old", None),
            (b"y", Some(b"3")),
        ]))
        .unwrap();
        check(&s, b"x", None);
        check(&s, b"y", Some(b"3"));
        check(&s, b"old", None);
    }

    #[test]
    fn lsns_increase_strictly_and_restart_at_zero_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        let lsns: Vec<Lsn> = (0..5u8)
            .map(|i| s.write(batch(&[(&[i + 1], Some(b"v"))])).unwrap())
            .collect();
        assert_eq!(lsns, (1..=5).map(Lsn).collect::<Vec<_>>());
        assert_eq!(s.write(Batch::new()).unwrap(), Lsn(6));
        assert_eq!(s.last_lsn(), Lsn(6));
        drop(s);
        let mut s = open(&dir);
        assert_eq!(s.last_lsn(), Lsn(0));
        assert_eq!(s.write(batch(&[(b"k", Some(b"v"))])).unwrap(), Lsn(1));
    }

    #[test]
    fn sync_reports_the_last_lsn_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        let h = s.sync_handle();
        assert_eq!(h.sync_blocking().unwrap(), Lsn(0));
        s.write(batch(&[(b"a", Some(b"1"))])).unwrap();
        let l2 = s.write(batch(&[(b"b", Some(b"2"))])).unwrap();
        assert_eq!(h.sync_blocking().unwrap(), l2);
        assert_eq!(
            h.sync_blocking().unwrap(),
            l2,
            "nothing new: no fsync needed"
        );
    }

    #[test]
    fn a_batch_written_during_a_sync_is_not_reported_durable_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        let before = s.write(batch(&[(b"a", Some(b"1"))])).unwrap();
        let mut h = s.sync_handle();
        let store = Arc::new(std::sync::Mutex::new(s));
        // Each sync, once its fsync has returned, lets one more batch in
        // and counts itself: the batch reached the journal after that
        // fsync, so only a later one covers it.
        let during = Arc::new(std::sync::Mutex::new(Vec::new()));
        let persists = Arc::new(AtomicU64::new(0));
        h.after_persist = Some({
            let (store, during, persists) = (store.clone(), during.clone(), persists.clone());
            Arc::new(move || {
                let n = persists.fetch_add(1, Ordering::SeqCst) as u8;
                let lsn = store
                    .lock()
                    .unwrap()
                    .write(batch(&[(&[b'd', n], Some(b"v"))]))
                    .unwrap();
                during.lock().unwrap().push(lsn);
            })
        });
        assert_eq!(
            h.sync_blocking().unwrap(),
            before,
            "a batch written during the sync was reported durable by it"
        );
        let first_during = during.lock().unwrap()[0];
        assert!(first_during > before);
        // The next sync must fsync again (the batch is not taken as
        // durable already) and covers it.
        assert_eq!(h.sync_blocking().unwrap(), first_during);
        assert_eq!(
            persists.load(Ordering::SeqCst),
            2,
            "the second sync took the batch as durable and skipped its fsync"
        );
    }

    /// The keys `p` + seq of a run, with their values.
    fn run_of(s: &FjallStore, from: u64, to: u64, stop_after: usize) -> Vec<(u64, Vec<u8>)> {
        let mut got = Vec::new();
        s.get_run(b"p", from, to, &mut |seq, v| {
            got.push((seq, v.to_vec()));
            got.len() < stop_after
        })
        .unwrap();
        got
    }

    fn seq_key(seq: u64) -> Vec<u8> {
        let mut k = b"p".to_vec();
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// A run reads consecutive keys in one range, the turn's overlay over
    /// what fjall holds key by key, and stops at the first key missing
    /// either way, or when told to.
    #[test]
    fn a_run_reads_consecutive_records_through_the_turn() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        let mut b = Batch::new();
        for seq in 1..=6 {
            b.put(seq_key(seq), vec![seq as u8]);
        }
        // Beyond the prefix's run, and another prefix: never read.
        b.put(seq_key(9), vec![9]);
        b.put(b"q".to_vec(), b"other".to_vec());
        s.write(b).unwrap();
        let all: Vec<(u64, Vec<u8>)> = (1..=6).map(|q| (q, vec![q as u8])).collect();
        assert_eq!(run_of(&s, 1, 7, 100), all);
        assert_eq!(run_of(&s, 3, 5, 100), all[2..4].to_vec());
        assert_eq!(run_of(&s, 1, 7, 2), all[..2].to_vec());
        assert_eq!(run_of(&s, 5, 12, 100), all[4..].to_vec(), "stops at seq 7");
        assert_eq!(run_of(&s, 4, 4, 100), vec![]);
        s.begin_turn();
        let mut b = Batch::new();
        b.put(seq_key(2), vec![20]);
        b.delete(seq_key(1));
        b.put(seq_key(7), vec![70]);
        s.write(b).unwrap();
        assert_eq!(run_of(&s, 1, 10, 100), vec![], "seq 1 is deleted");
        assert_eq!(
            run_of(&s, 2, 10, 100),
            vec![
                (2, vec![20]),
                (3, vec![3]),
                (4, vec![4]),
                (5, vec![5]),
                (6, vec![6]),
                (7, vec![70])
            ]
        );
        let mut b = Batch::new();
        b.delete(seq_key(4));
        s.write(b).unwrap();
        assert_eq!(run_of(&s, 2, 10, 100), vec![(2, vec![20]), (3, vec![3])]);
        s.end_turn().unwrap();
        assert_eq!(run_of(&s, 2, 10, 100), vec![(2, vec![20]), (3, vec![3])]);
        assert_eq!(
            run_of(&s, 5, 10, 100),
            vec![(5, vec![5]), (6, vec![6]), (7, vec![70])]
        );
    }

    #[test]
    fn a_turn_is_read_back_at_once_and_committed_whole_by_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(b"a", Some(b"0")), (b"gone", Some(b"x"))]))
            .unwrap();
        let h = s.sync_handle();
        let before = h.sync_blocking().unwrap();
        s.begin_turn();
        let l1 = s
            .write(batch(&[(b"a", Some(b"1")), (b"b", Some(b"1"))]))
            .unwrap();
        let l2 = s
            .write(batch(&[(b"b", Some(b"2")), (b"gone", None), (b"c", None)]))
            .unwrap();
        assert!(
            before < l1 && l1 < l2,
            "batches of a turn are numbered as they come"
        );
        // Reads see the turn's writes, last value first.
        check(&s, b"a", Some(b"1"));
        check(&s, b"b", Some(b"2"));
        check(&s, b"gone", None);
        check(&s, b"c", None);
        // Nothing of the turn reached fjall: a sync does not cover it, and
        // requests' scans would miss it, so they are refused.
        assert_eq!(s.last_lsn(), before);
        assert_eq!(h.sync_blocking().unwrap(), before);
        assert!(s.scan(b"", None, 10).is_err());
        s.end_turn().unwrap();
        assert_eq!(s.last_lsn(), l2);
        assert_eq!(h.sync_blocking().unwrap(), l2);
        let all: Vec<(Vec<u8>, Vec<u8>)> = s.scan(b"", None, 10).unwrap();
        assert_eq!(
            all,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        drop((s, h));
        let s = open(&dir);
        check(&s, b"a", Some(b"1"));
        check(&s, b"b", Some(b"2"));
        check(&s, b"gone", None);
    }

    #[test]
    fn a_snapshot_keeps_the_records_of_its_instant_while_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(b"a", Some(b"1")), (b"b", Some(b"1"))]))
            .unwrap();
        let reader = s.reader();
        let snapshot = reader.snapshot();
        s.begin_turn();
        s.write(batch(&[
            (b"a", None),
            (b"b", Some(b"2")),
            (b"c", Some(b"2")),
        ]))
        .unwrap();
        s.end_turn().unwrap();
        let all = |snap: &FjallSnapshot| snap.scan(None, 10, usize::MAX).unwrap();
        let kv = |k: &[u8], v: &[u8]| (k.to_vec(), v.to_vec());
        assert_eq!(all(&snapshot), vec![kv(b"a", b"1"), kv(b"b", b"1")]);
        assert_eq!(
            all(&reader.snapshot()),
            vec![kv(b"b", b"2"), kv(b"c", b"2")]
        );
        // Bounded by count and by bytes, at least one record a call.
        assert_eq!(snapshot.scan(None, 1, usize::MAX).unwrap().len(), 1);
        assert_eq!(snapshot.scan(None, 10, 1).unwrap().len(), 1);
        assert_eq!(
            snapshot.scan(Some(b"a"), 10, usize::MAX).unwrap(),
            vec![kv(b"b", b"1")]
        );
    }

    #[test]
    fn a_turn_never_ended_is_lost_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(b"a", Some(b"0"))])).unwrap();
        s.begin_turn();
        s.write(batch(&[(b"a", Some(b"1"))])).unwrap();
        s.write(batch(&[(b"b", Some(b"1"))])).unwrap();
        // The process dies inside the turn.
        drop(s);
        let s = open(&dir);
        check(&s, b"a", Some(b"0"));
        check(&s, b"b", None);
    }

    #[test]
    fn synced_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(b"a", Some(b"1")), (b"b", Some(b"2"))]))
            .unwrap();
        s.write(batch(&[(b"a", None)])).unwrap();
        s.sync_handle().sync_blocking().unwrap();
        drop(s);
        let s = open(&dir);
        check(&s, b"a", None);
        check(&s, b"b", Some(b"2"));
    }

    #[test]
    fn a_second_open_of_an_open_database_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        let s = FjallStore::open(&path).unwrap();
        let sync = s.sync_handle();
        let err = FjallStore::open(&path).unwrap_err();
        assert!(matches!(&err, StorageError::Locked { path: p } if *p == path));
        assert!(err.to_string().contains("already in use"), "{err}");
        // A sync handle keeps the database open, too.
        drop(s);
        assert!(matches!(
            FjallStore::open(&path),
            Err(StorageError::Locked { .. })
        ));
        drop(sync);
        FjallStore::open(&path).unwrap();
    }

    #[test]
    fn a_directory_that_is_not_a_fjall_3_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq.db");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("version"), b"FJL\x02").unwrap();
        let err = FjallStore::open(&path).unwrap_err();
        assert!(matches!(err, StorageError::EngineFormat { .. }), "{err}");
        std::fs::write(path.join("version"), b"junk").unwrap();
        let err = FjallStore::open(&path).unwrap_err();
        assert!(matches!(err, StorageError::EngineFormat { .. }), "{err}");
    }

    #[test]
    fn unstorable_keys_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        let long = vec![7u8; 65_536];
        for bad in [Vec::new(), long.clone()] {
            let mut b = batch(&[(b"ok", Some(b"1"))]);
            b.put(bad.clone(), b"v".to_vec());
            assert!(s.write(b).is_err());
            assert_eq!(s.get(&bad).unwrap(), None);
        }
        check(&s, b"ok", None);
        assert_eq!(s.last_lsn(), Lsn(0));
        let longest = vec![7u8; 65_535];
        let mut b = Batch::new();
        b.put(longest.clone(), b"v".to_vec());
        s.write(b).unwrap();
        check(&s, &longest, Some(b"v"));
    }

    #[test]
    fn a_batch_that_would_eat_into_the_reserve_is_refused_before_fjall_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(b"a", Some(b"1"))])).unwrap();
        // A reserve between the free space and twice it: batches that add
        // data are refused, upkeep may still use half of it.
        let free = free_bytes(dir.path()).unwrap();
        let mut s = s.with_reserve(free + free / 2);
        let e = s.write(batch(&[(b"b", Some(b"2"))])).unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Full, "{e}");
        assert!(e.detail.contains("disk full"), "{e}");
        check(&s, b"b", None);
        assert_eq!(s.last_lsn(), Lsn(1), "nothing was written");
        let mut upkeep = Batch::upkeep();
        upkeep.delete(b"a".to_vec());
        assert_eq!(s.write(upkeep).unwrap(), Lsn(2));
        check(&s, b"a", None);
        // fjall never saw the refused batch, so it takes writes again as
        // soon as there is room.
        let mut s = s.with_reserve(0);
        s.write(batch(&[(b"b", Some(b"2"))])).unwrap();
        check(&s, b"b", Some(b"2"));
        s.sync_handle().sync_blocking().unwrap();
    }

    #[test]
    fn a_free_space_reading_stands_in_while_young_and_little_was_written() {
        const MIB: u64 = 1 << 20;
        let at = Instant::now();
        // 64 MiB free above a 256 MiB reserve: 16 MiB may be written on it.
        let mut r = SpaceReading {
            free_bytes: 320 * MIB,
            written: 0,
            at,
        };
        assert_eq!(r.stands_for(256 * MIB, MIB, at), Some(320 * MIB));
        r.written = 15 * MIB;
        assert_eq!(r.stands_for(256 * MIB, MIB, at), Some(305 * MIB));
        assert_eq!(r.stands_for(256 * MIB, MIB + 1, at), None, "past the share");
        let later = at + SPACE_READING_AGE_MAX;
        assert_eq!(r.stands_for(256 * MIB, 1, later), None, "too old");
        // Less free than the reserve: every batch takes a new reading.
        r.free_bytes = 200 * MIB;
        r.written = 0;
        assert_eq!(r.stands_for(256 * MIB, 1, at), None);
    }

    #[test]
    fn a_store_reads_the_free_space_again_only_when_its_reading_stops_standing_in() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        let mut s = open(&dir).with_reserve(free / 2);
        s.write(batch(&[(b"a", Some(b"1"))])).unwrap();
        let first = s.space.expect("the first batch reads the free space");
        s.write(batch(&[(b"b", Some(b"2"))])).unwrap();
        let second = s.space.unwrap();
        assert_eq!(second.at, first.at, "a young reading stands in");
        assert!(
            second.written > first.written,
            "and counts what was written"
        );
        std::thread::sleep(SPACE_READING_AGE_MAX);
        s.write(batch(&[(b"c", Some(b"3"))])).unwrap();
        assert!(s.space.unwrap().at > first.at, "an old one is replaced");
    }

    #[test]
    fn node_service_opens_and_reopens_on_fjall() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let h = store.sync_handle();
        let mut node = NodeService::new(NodeConfig::default(), [0; 32], store).unwrap();
        let Some(Output::Sync { lsn }) = node.poll_output() else {
            panic!("a fresh store gets its version record synced");
        };
        assert_eq!(h.sync_blocking().unwrap(), lsn);
        drop((node, h));
        // The reopened machine rewrites its version record (nothing it finds
        // is known to be durable) and numbering starts afresh.
        let mut node = NodeService::new(NodeConfig::default(), [0; 32], open(&dir)).unwrap();
        assert_eq!(node.poll_output(), Some(Output::Sync { lsn: Lsn(1) }));
    }

    #[test]
    fn a_newer_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(&[0x00], Some(&99u32.to_be_bytes()))]))
            .unwrap();
        s.sync_handle().sync_blocking().unwrap();
        drop(s);
        let err = NodeService::new(NodeConfig::default(), [0; 32], open(&dir)).unwrap_err();
        assert!(
            matches!(err, OpenError::NewerFormat { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_version_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = open(&dir);
        s.write(batch(&[(&[0x00], Some(b"\x01\x02\x03"))])).unwrap();
        let err = NodeService::new(NodeConfig::default(), [0; 32], s).unwrap_err();
        assert!(matches!(err, OpenError::Corrupt(_)), "{err}");
    }
}
