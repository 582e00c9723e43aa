//! `qpq-server migrate --from fjall --to postgres`: copies a stopped
//! server's state from its fjall database into a PostgreSQL database, so
//! that a deployment that outgrows one node can move to several.
//!
//! Offline and all or nothing: the fjall database is opened (which fails
//! while a server holds it), brought to the current format by opening the
//! machine over it, then every record is copied in key order inside one
//! PostgreSQL transaction, which commits only after the copy has been read
//! back from both sides and compared. A failure at any point leaves the
//! PostgreSQL database as it was. The target must hold no qpq data yet.

use std::path::Path;

use quicproquo_core::node::{NodeConfig, NodeService};
use quicproquo_core::store::{Batch, Store};

use crate::store::fjall_store::FjallStore;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::{KeyOrder, ShellStore, StorageError};

/// Records copied per batch (one statement pair each).
pub const MIGRATE_RECORDS_PER_BATCH: usize = 1_000;

/// What a migration copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Records (keys) copied.
    pub records: u64,
    /// Bytes of keys and values copied.
    pub bytes: u64,
}

/// Why a migration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The source database is not there.
    #[error("no fjall database at {0}")]
    NoSource(String),
    /// The target already holds qpq data.
    #[error(
        "the PostgreSQL database already holds qpq data; migrate into an empty one \
         (or drop its tables qpq_kv and qpq_schema)"
    )]
    TargetNotEmpty,
    /// Opening, reading or writing a store failed.
    #[error("{0}")]
    Store(String),
    /// The copy read back differs from the source.
    #[error("the copy differs from the source at record {record}: {what}")]
    Mismatch {
        /// The record's position in key order.
        record: u64,
        /// How.
        what: String,
    },
}

impl From<StorageError> for MigrateError {
    fn from(e: StorageError) -> Self {
        MigrateError::Store(e.to_string())
    }
}

impl From<quicproquo_core::store::StoreError> for MigrateError {
    fn from(e: quicproquo_core::store::StoreError) -> Self {
        MigrateError::Store(e.to_string())
    }
}

/// Copies the fjall database at `db_path` into the PostgreSQL database of
/// `target` (see the module's description). `config` is the machine's
/// configuration, to bring the source to the current format first.
pub fn fjall_to_postgres(
    db_path: &Path,
    target: &PgOptions,
    config: &NodeConfig,
) -> Result<Migrated, MigrateError> {
    if !db_path.exists() {
        return Err(MigrateError::NoSource(db_path.display().to_string()));
    }
    // Opening the machine upgrades an older format in place; its one write
    // is synced before anything is read.
    let source = FjallStore::open(db_path)?;
    let node = NodeService::new(config.clone(), [0; 32], source)
        .map_err(|e| MigrateError::Store(e.to_string()))?;
    let source = node.into_store();
    source.sync_handle().sync_blocking()?;

    let mut pg = PgStore::open(target.clone())?;
    pg.begin_turn();
    let copied = copy_and_compare(&source, &mut pg);
    match copied {
        Ok(migrated) => {
            pg.end_turn()?;
            Ok(migrated)
        }
        Err(e) => {
            // Rolls the transaction back: the target stays as it was.
            let _ = pg.end_turn();
            Err(e)
        }
    }
}

/// Inside `target`'s open turn: refuses a target with data, copies every
/// record of `source` in key order, then reads both back and compares.
fn copy_and_compare(source: &FjallStore, target: &mut PgStore) -> Result<Migrated, MigrateError> {
    if !target.scan(&[], None, 1)?.is_empty() {
        return Err(MigrateError::TargetNotEmpty);
    }
    let mut migrated = Migrated {
        records: 0,
        bytes: 0,
    };
    let mut walk = KeyOrder::new(MIGRATE_RECORDS_PER_BATCH, |after, n| {
        source.scan(&[], after, n)
    });
    while let Some(records) = walk.next_chunk()? {
        let mut batch = Batch::new();
        for (key, value) in records {
            migrated.records += 1;
            migrated.bytes += (key.len() + value.len()) as u64;
            batch.put(key, value);
        }
        target.write(batch)?;
    }
    // Read back, side by side, in key order.
    let mut left = KeyOrder::new(MIGRATE_RECORDS_PER_BATCH, |after, n| {
        source.scan(&[], after, n)
    });
    let mut right = KeyOrder::new(MIGRATE_RECORDS_PER_BATCH, |after, n| {
        target.scan(&[], after, n)
    });
    let mut record = 0u64;
    loop {
        let a = left.next_chunk()?.unwrap_or_default();
        let b = right.next_chunk()?.unwrap_or_default();
        if a.len() != b.len() {
            return Err(MigrateError::Mismatch {
                record,
                what: format!("{} records against {}", a.len(), b.len()),
            });
        }
        if a.is_empty() {
            break;
        }
        for (x, y) in a.iter().zip(&b) {
            if x != y {
                return Err(MigrateError::Mismatch {
                    record,
                    what: "a key or value differs".into(),
                });
            }
            record += 1;
        }
    }
    if record != migrated.records {
        return Err(MigrateError::Mismatch {
            record,
            what: format!("{record} records read back, {} copied", migrated.records),
        });
    }
    Ok(migrated)
}
