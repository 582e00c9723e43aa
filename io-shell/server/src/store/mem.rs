//! [`SharedMemStore`]: the core's crash-modelling [`MemStore`] behind a
//! shared lock, the storage seam of simulations.
//!
//! A simulation hands one clone to the server it runs and keeps another: it
//! can [`SharedMemStore::crash`] the store (every batch not yet synced is
//! lost), drop the crashed server, start a new one over the same store, and
//! inspect the contents through [`SharedMemStore::inner`] in its checkers.
//!
//! Its [`MemSync`] handle syncs inline, without a thread or a timer, so a
//! turmoil run stays deterministic. Each port call takes the lock once and
//! holds it only for that call.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use quicproquo_core::store::{Batch, Lsn, MemStore, Records, Store, StoreError};

use super::{ShellStore, StorageError, SyncHandle};

/// A [`MemStore`] shared between a server and the simulation that runs it.
/// Clones share the same store.
#[derive(Debug, Clone, Default)]
pub struct SharedMemStore(Arc<Mutex<MemStore>>);

impl SharedMemStore {
    /// An empty store.
    pub fn new() -> Self {
        SharedMemStore::default()
    }

    /// Simulates a crash: every batch not yet synced is lost.
    pub fn crash(&self) {
        self.inner().crash();
    }

    /// The store itself, for checkers. A lock poisoned by a panicking
    /// holder is taken over: checkers should still see the contents.
    pub fn inner(&self) -> MutexGuard<'_, MemStore> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lock for a port call; a poisoned lock is a storage failure.
    fn lock(&self) -> Result<MutexGuard<'_, MemStore>, StorageError> {
        self.0.lock().map_err(|_| StorageError::MemPoisoned)
    }
}

impl From<MemStore> for SharedMemStore {
    fn from(store: MemStore) -> Self {
        SharedMemStore(Arc::new(Mutex::new(store)))
    }
}

impl Store for SharedMemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.lock().map_err(StoreError::read)?.get(key)
    }

    fn get_head(&self, key: &[u8], head: &mut [u8]) -> Result<Option<usize>, StoreError> {
        self.lock().map_err(StoreError::read)?.get_head(key, head)
    }

    fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError> {
        self.lock().map_err(StoreError::write)?.write(batch)
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Records, StoreError> {
        self.lock()
            .map_err(StoreError::read)?
            .scan(prefix, after, limit)
    }
}

impl ShellStore for SharedMemStore {
    type Sync = MemSync;

    fn sync_handle(&self) -> MemSync {
        MemSync(self.clone())
    }
}

/// Syncs a [`SharedMemStore`] inline: everything written so far becomes
/// durable at once.
#[derive(Debug, Clone)]
pub struct MemSync(SharedMemStore);

impl SyncHandle for MemSync {
    fn sync(&self) -> impl std::future::Future<Output = Result<Lsn, StorageError>> + Send {
        std::future::ready(self.0.lock().map(|mut s| s.sync()))
    }
}

#[cfg(test)]
mod tests {
    use quicproquo_core::node::{NodeConfig, NodeService, Output};
    use quicproquo_core::store::run_key;
    use quicproquo_core::time::Time;

    use super::*;

    fn put(store: &mut SharedMemStore, key: &[u8], value: &[u8]) -> Lsn {
        let mut b = Batch::new();
        b.put(key.to_vec(), value.to_vec());
        store.write(b).unwrap()
    }

    fn check(store: &SharedMemStore, key: &[u8], want: Option<&[u8]>) {
        assert_eq!(store.get(key).unwrap().as_deref(), want, "key {key:?}");
    }

    #[test]
    fn a_run_lets_its_visitor_read_the_store() {
        // The machine reads a shared payload from inside a run's visitor,
        // so a run must not hold the store's lock while it visits.
        let mut store = SharedMemStore::new();
        put(&mut store, &run_key(b"p", 1), b"1");
        put(&mut store, b"blob", b"shared");
        let mut seen = Vec::new();
        store
            .get_run(b"p", 1, 2, &mut |seq, value| {
                seen.push((seq, value.to_vec(), store.get(b"blob").unwrap()));
                true
            })
            .unwrap();
        assert_eq!(seen, vec![(1, b"1".to_vec(), Some(b"shared".to_vec()))]);
    }

    #[tokio::test]
    async fn crash_keeps_only_what_a_sync_covered() {
        let mut store = SharedMemStore::new();
        let handle = store.sync_handle();
        let l1 = put(&mut store, b"a", b"1");
        assert_eq!(handle.sync().await.unwrap(), l1);
        put(&mut store, b"b", b"2");
        check(&store, b"b", Some(b"2"));
        store.crash();
        check(&store, b"a", Some(b"1"));
        check(&store, b"b", None);
    }

    #[test]
    fn clones_share_one_store() {
        let mut a = SharedMemStore::new();
        let b = a.clone();
        put(&mut a, b"k", b"v");
        check(&b, b"k", Some(b"v"));
        b.crash();
        check(&a, b"k", None);
        assert_eq!(a.inner().len(), 0);
    }

    #[test]
    fn a_new_machine_restarts_over_the_crashed_store() {
        let store = SharedMemStore::new();
        // The version record is written but not synced: a crash forgets it,
        // and the next machine writes it again with a higher Lsn.
        let mut node = NodeService::new(NodeConfig::default(), [0; 32], store.clone()).unwrap();
        let first = match node.poll_output() {
            Some(Output::Sync { lsn }) => lsn,
            other => panic!("expected a sync request, got {other:?}"),
        };
        drop(node);
        store.crash();
        assert!(store.inner().is_empty());
        let mut node = NodeService::new(NodeConfig::default(), [0; 32], store.clone()).unwrap();
        match node.poll_output() {
            Some(Output::Sync { lsn }) => {
                assert!(lsn > first);
                store.inner().sync();
                node.handle_synced(Time::ZERO, lsn);
            }
            other => panic!("expected a sync request, got {other:?}"),
        }
        assert_eq!(store.inner().len(), 1);
    }
}
