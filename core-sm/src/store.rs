//! The storage port: the narrow interface through which the NodeService
//! machine reads and writes its durable state, and [`MemStore`], the
//! in-memory implementation used by tests and simulations.
//!
//! The port is a key-value map with atomic batches. Every batch gets a log
//! sequence number ([`Lsn`]); a batch is *durable* once the shell reports that
//! its `Lsn` has been synced (`NodeService::handle_synced`). The machine holds
//! back every reply until all writes it could have observed are durable, so a
//! crash can only forget what nobody was told about.
//!
//! A store may also refuse a write for lack of space ([`StoreErrorKind::Full`]):
//! nothing of the batch is applied, the store stays as it was and takes
//! writes again once space is freed. A store that keeps space in reserve
//! refuses batches that add data before those that only keep things up
//! ([`Batch::upkeep`]), so a full disk can still be drained.
//!
//! [`MemStore`] models exactly that: writes apply at once to the live map, and
//! [`MemStore::crash`] throws away every batch not yet synced. It keeps, for
//! every unsynced batch, the values its writes replaced (an undo log): a sync
//! just forgets them, a crash puts them back newest first, so the live map
//! returns to exactly the synced state without a second copy of the data.
//!
//! The live map is hashed, not ordered: requests only make point reads and
//! writes, and every key of a queue starts with the same ~50 bytes, which
//! an ordered map compares again at every level. What needs key order —
//! [`Store::scan`] (the sweep, a bounded step at a time) and
//! [`MemStore::iter`] (checkers) — sorts on demand. The hasher has fixed
//! keys, so a run is the same every time.

use std::collections::HashMap;

/// The live map's hasher: fast, with fixed keys (the store serves tests,
/// simulations and benches, never a server facing a network).
type Hasher = foldhash::fast::FixedState;

/// A log sequence number: batches are numbered 1, 2, 3, … in write order.
/// `Lsn(0)` means "nothing written yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// A storage failure, or a write refused for lack of space. After a
/// failure the machine answers `unavailable` and stops taking writes,
/// rather than pretending; a refused write is answered `unavailable` and
/// the machine carries on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    /// What failed.
    pub op: StoreOp,
    /// Whether the store failed or refused a write for lack of space.
    pub kind: StoreErrorKind,
    /// The storage engine's own words.
    pub detail: String,
}

impl StoreError {
    /// A failed read.
    pub fn read(detail: impl std::fmt::Display) -> StoreError {
        StoreError {
            op: StoreOp::Read,
            kind: StoreErrorKind::Failed,
            detail: detail.to_string(),
        }
    }

    /// A failed write.
    pub fn write(detail: impl std::fmt::Display) -> StoreError {
        StoreError {
            op: StoreOp::Write,
            kind: StoreErrorKind::Failed,
            detail: detail.to_string(),
        }
    }

    /// A write refused for lack of space before any of it was applied.
    pub fn full(detail: impl std::fmt::Display) -> StoreError {
        StoreError {
            op: StoreOp::Write,
            kind: StoreErrorKind::Full,
            detail: detail.to_string(),
        }
    }

    /// The store rolled back the turn this operation belonged to
    /// ([`StoreErrorKind::Aborted`]).
    pub fn aborted(op: StoreOp, detail: impl std::fmt::Display) -> StoreError {
        StoreError {
            op,
            kind: StoreErrorKind::Aborted,
            detail: detail.to_string(),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            StoreErrorKind::Failed => write!(f, "storage {} failed: {}", self.op, self.detail),
            StoreErrorKind::Full => write!(f, "storage {} refused: {}", self.op, self.detail),
            StoreErrorKind::Aborted => {
                write!(f, "storage {} rolled back: {}", self.op, self.detail)
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// Why a [`StoreError`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store failed: what it holds may no longer match what was
    /// written, so nothing more may be written or taken as durable.
    Failed,
    /// The store refused a write for lack of space before applying any of
    /// it. It is intact, and takes writes again once space is freed.
    Full,
    /// A store shared with other machines ([`Store::shared`]) rolled back
    /// the shell's current turn: it conflicted with another machine's
    /// writes, or the connection to the database failed. Nothing the turn
    /// wrote is kept (after a failed commit, perhaps all of it is); every
    /// further read and write of the turn fails the same way. The store is
    /// intact and takes the next turn; the shell tells the machine
    /// ([`crate::node::NodeService::handle_turn_aborted`]).
    Aborted,
}

/// The operation of a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreOp {
    /// [`Store::get`].
    #[error("read")]
    Read,
    /// [`Store::write`].
    #[error("write")]
    Write,
}

/// One atomic group of writes: either all of them survive a crash or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    upkeep: bool,
}

impl Batch {
    /// An empty batch that may add data (an enqueue, an upload).
    pub fn new() -> Self {
        Batch::default()
    }

    /// An empty batch that adds no data: it removes records
    /// (acknowledgements, KeyPackage pops, expiry) or rewrites a record of
    /// fixed size (the format version on open). A store that keeps space in
    /// reserve lets such a batch use part of it, so that a full disk can
    /// still be drained and the machine can still open.
    pub fn upkeep() -> Self {
        Batch {
            ops: Vec::new(),
            upkeep: true,
        }
    }

    /// True if this batch was made by [`Batch::upkeep`].
    pub fn is_upkeep(&self) -> bool {
        self.upkeep
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    /// True if the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations in order: `Some(value)` is a put, `None` a delete.
    pub fn ops(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.ops
    }

    /// Consumes the batch into its operations.
    pub fn into_ops(self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.ops
    }
}

/// The storage port. Implementations: [`MemStore`] here, the fjall store in
/// the server shell.
pub trait Store {
    /// The current value of `key`, including writes not yet durable.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The first bytes of `key`'s current value, copied into `head` (as
    /// many as fit), and the value's whole length; `None` if absent. For
    /// the machine's reads that need a record's header and length but not
    /// its payload (acknowledging and expiring messages), so a large value
    /// is not copied. The default reads the whole value.
    fn get_head(&self, key: &[u8], head: &mut [u8]) -> Result<Option<usize>, StoreError> {
        Ok(self.get(key)?.map(|v| copy_head(&v, head)))
    }

    /// Reads the run of records keyed `prefix` + a big-endian `u64` seq,
    /// for seq `from`, `from + 1`, ... below `to`, in order: each value is
    /// lent to `visit`, until `visit` returns `false` or a key is absent. For
    /// the machine's queue reads, whose entries are consecutive. The
    /// default reads each key on its own; a store ordered by key reads the
    /// run as one range. `visit` may read the store (a shared payload is
    /// read from inside it), so a store must not hold a lock of its own
    /// while it visits.
    fn get_run(
        &self,
        prefix: &[u8],
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for seq in from..to {
            let Some(value) = self.get(&run_key(prefix, seq))? else {
                break;
            };
            if !visit(seq, &value) {
                break;
            }
        }
        Ok(())
    }

    /// Applies `batch` atomically and returns its sequence number. The batch
    /// is visible to `get` at once but durable only after a sync that covers
    /// the returned `Lsn`.
    fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError>;

    /// Up to `limit` records whose keys start with `prefix` and sort after
    /// `after` (from the first when `None`), in key order, including writes
    /// not yet durable. Requests never scan; only the machine's sweep
    /// ([`crate::node::NodeService::handle_sweep`]) does, a bounded step at
    /// a time.
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Records, StoreError>;

    /// True if other machines write this store too (several server nodes
    /// over one database). The machine then keeps nothing it read from
    /// the store beyond the request that read it: no cached queue
    /// counters, and the next shared-payload and queue numbers are read
    /// where they are needed. The store must then make each turn of the
    /// shell serializable against the other machines' turns, and roll a
    /// turn back ([`StoreErrorKind::Aborted`]) where it cannot.
    fn shared(&self) -> bool {
        false
    }

    /// `queue` got new messages in the current turn. A shared store tells
    /// the other machines once the turn is stored, so that their
    /// long-polls on it wake ([`crate::node::NodeService::handle_queue_changed`]);
    /// a store with one writer has nobody to tell.
    fn changed(&mut self, _queue: &crate::types::QueueId) {}
}

/// The key of seq `seq` in a run under `prefix` ([`Store::get_run`]).
pub fn run_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Copies the first bytes of `value` into `head`; returns `value`'s length.
pub fn copy_head(value: &[u8], head: &mut [u8]) -> usize {
    let n = head.len().min(value.len());
    head[..n].copy_from_slice(&value[..n]);
    value.len()
}

/// Keys and values, as [`Store::scan`] returns them.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// An in-memory store that remembers which batches were synced, so a test can
/// crash it and see only durable state survive.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    live: HashMap<Vec<u8>, Vec<u8>, Hasher>,
    /// Batches written but not yet synced, oldest first, each with the undo
    /// record of its operations in order: the key and the value it had
    /// before (`None`: absent). Undoing every unsynced batch, newest
    /// operation first, yields the synced state.
    unsynced: Vec<(Lsn, Vec<Undo>)>,
    last_lsn: Lsn,
    synced_lsn: Lsn,
    /// Set by [`MemStore::set_full`]: batches that add data are refused.
    full: bool,
}

/// A key and the value it held before one operation overwrote it.
type Undo = (Vec<u8>, Option<Vec<u8>>);

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }

    /// The sequence number of the last batch written.
    pub fn last_lsn(&self) -> Lsn {
        self.last_lsn
    }

    /// The sequence number up to which batches are durable.
    pub fn synced_lsn(&self) -> Lsn {
        self.synced_lsn
    }

    /// Makes every batch written so far durable and returns the last `Lsn`.
    pub fn sync(&mut self) -> Lsn {
        self.sync_up_to(self.last_lsn)
    }

    /// Makes batches up to and including `lsn` durable (a partial sync, as
    /// when a crash interrupts a group commit) and returns the new synced
    /// `Lsn`.
    pub fn sync_up_to(&mut self, lsn: Lsn) -> Lsn {
        let upto = lsn.min(self.last_lsn);
        let split = self.unsynced.partition_point(|(l, _)| *l <= upto);
        // Durable now: their undo records are no longer needed.
        self.unsynced.drain(..split);
        self.synced_lsn = self.synced_lsn.max(upto);
        self.synced_lsn
    }

    /// Simulates a crash: every batch not yet synced is lost. Sequence
    /// numbers keep counting from where they were, as a real log would after
    /// recovery never reuse a number it may have handed out.
    pub fn crash(&mut self) {
        for (_, undo) in self.unsynced.drain(..).rev() {
            for (key, old) in undo.into_iter().rev() {
                match old {
                    Some(v) => {
                        self.live.insert(key, v);
                    }
                    None => {
                        self.live.remove(&key);
                    }
                }
            }
        }
    }

    /// Makes the store behave as one on a full disk that keeps space in
    /// reserve (`true`), or as one with room again (`false`): while full,
    /// every batch but an [`Batch::upkeep`] one is refused with
    /// [`StoreErrorKind::Full`] and nothing of it is applied.
    pub fn set_full(&mut self, full: bool) {
        self.full = full;
    }

    /// Number of keys currently stored (live view).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True if no key is stored (live view).
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The live contents in key order, for tests and checkers (sorted on
    /// each call).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut all: Vec<(&[u8], &[u8])> = self
            .live
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.live.get(key).cloned())
    }

    fn get_head(&self, key: &[u8], head: &mut [u8]) -> Result<Option<usize>, StoreError> {
        Ok(self.live.get(key).map(|v| copy_head(v, head)))
    }

    fn get_run(
        &self,
        prefix: &[u8],
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        // One key, its seq rewritten for each record; values are lent.
        let mut key = run_key(prefix, from);
        for seq in from..to {
            key[prefix.len()..].copy_from_slice(&seq.to_be_bytes());
            match self.live.get(&key) {
                Some(value) if visit(seq, value) => {}
                _ => break,
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Records, StoreError> {
        // The hashed map has no order: take every match, then the first
        // `limit` of them in key order.
        let mut found: Vec<(&Vec<u8>, &Vec<u8>)> = self
            .live
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && after.is_none_or(|a| k.as_slice() > a))
            .collect();
        if found.len() > limit {
            found.select_nth_unstable_by(limit, |a, b| a.0.cmp(b.0));
            found.truncate(limit);
        }
        found.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Ok(found
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError> {
        if self.full && !batch.is_upkeep() {
            return Err(StoreError::full("the in-memory store is set full"));
        }
        self.last_lsn = Lsn(self.last_lsn.0 + 1);
        let ops = batch.into_ops();
        let mut undo = Vec::with_capacity(ops.len());
        for (key, value) in ops {
            let old = match value {
                Some(v) => self.live.insert(key.clone(), v),
                None => self.live.remove(&key),
            };
            undo.push((key, old));
        }
        self.unsynced.push((self.last_lsn, undo));
        Ok(self.last_lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &mut MemStore, k: &[u8], v: &[u8]) -> Lsn {
        let mut b = Batch::new();
        b.put(k.to_vec(), v.to_vec());
        store.write(b).unwrap()
    }

    #[test]
    fn unsynced_writes_are_visible_but_lost_on_crash() {
        let mut s = MemStore::new();
        put(&mut s, b"a", b"1");
        s.sync();
        put(&mut s, b"b", b"2");
        assert_eq!(s.get(b"b").unwrap(), Some(b"2".to_vec()));
        s.crash();
        assert_eq!(s.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get(b"b").unwrap(), None);
    }

    #[test]
    fn partial_sync_keeps_a_prefix_of_batches() {
        let mut s = MemStore::new();
        let l1 = put(&mut s, b"a", b"1");
        let l2 = put(&mut s, b"b", b"2");
        let _l3 = put(&mut s, b"c", b"3");
        assert!(l1 < l2);
        assert_eq!(s.sync_up_to(l2), l2);
        s.crash();
        assert!(s.get(b"b").unwrap().is_some());
        assert!(s.get(b"c").unwrap().is_none());
    }

    #[test]
    fn lsn_never_repeats_after_crash() {
        let mut s = MemStore::new();
        let l1 = put(&mut s, b"a", b"1");
        s.crash();
        let l2 = put(&mut s, b"a", b"2");
        assert!(l2 > l1);
    }

    #[test]
    fn crash_restores_overwritten_and_deleted_values() {
        let mut s = MemStore::new();
        put(&mut s, b"a", b"1");
        put(&mut s, b"b", b"2");
        s.sync();
        put(&mut s, b"a", b"3");
        let mut b = Batch::new();
        b.delete(b"b".to_vec());
        b.put(b"a".to_vec(), b"4".to_vec());
        b.put(b"c".to_vec(), b"5".to_vec());
        s.write(b).unwrap();
        s.crash();
        let all: Vec<_> = s.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(
            all,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        // Writes after the crash continue from the synced state.
        put(&mut s, b"a", b"6");
        s.sync();
        s.crash();
        assert_eq!(s.get(b"a").unwrap(), Some(b"6".to_vec()));
    }

    #[test]
    fn a_full_store_refuses_batches_that_add_data_and_applies_nothing_of_them() {
        let mut s = MemStore::new();
        put(&mut s, b"a", b"1");
        s.set_full(true);
        let mut b = Batch::new();
        b.delete(b"a".to_vec());
        b.put(b"b".to_vec(), b"2".to_vec());
        let e = s.write(b).unwrap_err();
        assert_eq!((e.op, e.kind), (StoreOp::Write, StoreErrorKind::Full));
        assert_eq!(s.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get(b"b").unwrap(), None);
        assert_eq!(s.last_lsn(), Lsn(1), "a refused batch takes no Lsn");
        let mut b = Batch::upkeep();
        b.delete(b"a".to_vec());
        assert_eq!(s.write(b).unwrap(), Lsn(2));
        s.set_full(false);
        assert_eq!(put(&mut s, b"b", b"2"), Lsn(3));
    }

    #[test]
    fn get_head_copies_what_fits_and_tells_the_whole_length() {
        let mut s = MemStore::new();
        put(&mut s, b"k", b"header+payload");
        let mut head = [0u8; 6];
        assert_eq!(s.get_head(b"k", &mut head).unwrap(), Some(14));
        assert_eq!(&head, b"header");
        let mut big = [0u8; 32];
        assert_eq!(s.get_head(b"k", &mut big).unwrap(), Some(14));
        assert_eq!(&big[..14], b"header+payload");
        assert_eq!(s.get_head(b"none", &mut head).unwrap(), None);
    }

    #[test]
    fn batches_are_atomic_across_crash() {
        let mut s = MemStore::new();
        let mut b = Batch::new();
        b.put(b"x".to_vec(), b"1".to_vec());
        b.put(b"y".to_vec(), b"2".to_vec());
        b.delete(b"x".to_vec());
        s.write(b).unwrap();
        s.sync();
        s.crash();
        assert_eq!(s.get(b"x").unwrap(), None);
        assert_eq!(s.get(b"y").unwrap(), Some(b"2".to_vec()));
    }
}
