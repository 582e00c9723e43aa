//! The core's model test over the PostgreSQL store: the same generated
//! operation sequences, the same reference model and the same checker as
//! `core-sm/tests/model.rs` (its harness is included here as it is), run
//! against `NodeService<PgStore>` instead of `NodeService<MemStore>`.
//!
//! PostgreSQL makes every batch durable as it is written, so here the
//! store reports everything synced and a crash loses nothing; the model
//! then keeps everything too. What the run checks is that the machine over
//! PostgreSQL — its reads, runs, scans and batches through SQL, and the
//! machine's shared-store mode (no counters kept between requests) —
//! answers exactly as the model says. `DEFAULT_CASES` (256) cases unless
//! `PROPTEST_CASES` says otherwise. Needs `QPQ_TEST_POSTGRES_URL` (see
//! `tests/postgres.rs`).

#![allow(dead_code)]

#[path = "common/mod.rs"]
mod common;

use std::sync::OnceLock;

use quicproquo_core::store::{Batch, Records, StoreError};
use quicproquo_server::store::postgres::{PgOptions, PgStore};

/// Cases per run unless `PROPTEST_CASES` says otherwise: each case talks
/// to a real database, some thousands of statements.
const DEFAULT_CASES: u32 = 256;

include!("../../../core-sm/tests/model/harness.rs");

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn node_over_postgres_matches_reference_model(
        ops in vec(op(), 1..=OPS_MAX)
    ) {
        if database().is_none() {
            return Ok(());
        }
        let mut run = Run::<PgModel>::new();
        for op in &ops {
            run.step(op);
        }
        run.audit_after_crash();
    }
}

/// This process's test database, made once; `None` without a server.
fn database() -> Option<&'static str> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    URL.get_or_init(common::postgres_database).as_deref()
}

/// Empties the machine's table of the test database (a fresh store).
fn empty(url: &str) {
    common::postgres_execute(url, &["DELETE FROM qpq_kv".to_owned()]);
}

/// The PostgreSQL store under the model: every batch is durable once
/// written.
struct PgModel {
    store: PgStore,
    last: Lsn,
}

impl ModelStore for PgModel {
    const DURABLE_ON_WRITE: bool = true;
    fn fresh() -> Self {
        let url = database().expect("a test database");
        let store = PgStore::open(PgOptions {
            url: url.to_owned(),
            synchronous_commit: true,
        })
        .expect("open the PostgreSQL store");
        empty(url);
        PgModel {
            store,
            last: Lsn(0),
        }
    }
    fn last_lsn(&self) -> Lsn {
        self.last
    }
    fn synced_lsn(&self) -> Lsn {
        self.last
    }
    fn sync(&mut self) -> Lsn {
        self.last
    }
    fn sync_up_to(&mut self, _lsn: Lsn) -> Lsn {
        self.last
    }
    fn crash(&mut self) {}
}

impl Store for PgModel {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(key)
    }
    fn get_head(&self, key: &[u8], head: &mut [u8]) -> Result<Option<usize>, StoreError> {
        self.store.get_head(key, head)
    }
    fn get_run(
        &self,
        prefix: &[u8],
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(u64, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.store.get_run(prefix, from, to, visit)
    }
    fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError> {
        let lsn = self.store.write(batch)?;
        self.last = lsn;
        Ok(lsn)
    }
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Records, StoreError> {
        self.store.scan(prefix, after, limit)
    }
    fn shared(&self) -> bool {
        self.store.shared()
    }
    fn changed(&mut self, queue: &QueueId) {
        self.store.changed(queue);
    }
}
