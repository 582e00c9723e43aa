//! The Authentication Service: KeyPackages (upload, fetch, count) and
//! hybrid keys (upload, fetch).
//!
//! Invariants it keeps (ARCHITECTURE.md § Guarantees, "KeyPackages are
//! single-use"):
//! - A KeyPackage is removed in the same atomic batch that hands it out,
//!   with the new head, so it is never handed out twice, even across a
//!   crash; the last-resort package is handed out and kept.
//! - Only the owner uploads or counts its keys: `owner` is checked before
//!   anything is read or written.
//! - An identity keeps a pool of KeyPackages per cipher suite it names (the
//!   default pool when it names none; at most the suites of
//!   [`limits::KEY_PACKAGE_SUITES`]), each of at most
//!   `key_packages_per_identity_max` KeyPackages and one last-resort package,
//!   each package at most `key_package_bytes_max` bytes; a hybrid key is stored only
//!   with a valid signature by its identity; fetches are rate limited per
//!   (requester, target) and, for KeyPackages, per target.

use sha2::{Digest, Sha256};

use crate::error::ServiceError;
use crate::limits;
use crate::store::{Batch, Store};
use crate::time::Time;
use crate::types::{ConnectionId, IdentityKey, Signature};

use super::layout::{self, KpMeta};
use super::{NodeService, Reply, Response, corrupt, hybrid_key_message, rate_limited, verify};

/// Which kind of key a requester fetches from a target, for rate limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum KeyFetch {
    KeyPackage,
    HybridKey,
}

impl<S: Store> NodeService<S> {
    pub(super) fn upload_key_package(
        &mut self,
        conn: ConnectionId,
        identity_key: IdentityKey,
        package: Vec<u8>,
        last_resort: bool,
        suite: u16,
    ) -> Reply {
        self.owner(conn, &identity_key)?;
        check_pool(suite)?;
        check_size("KeyPackage", &package, self.config.key_package_bytes_max)?;
        let fingerprint: [u8; 32] = Sha256::digest(&package).into();
        let mut batch = Batch::new();
        if last_resort {
            batch.put(layout::kp_last_resort_key(&identity_key, suite), package);
        } else {
            let mut meta = self.kp_meta(&identity_key, suite)?;
            if meta.count() >= u64::from(self.config.key_packages_per_identity_max) {
                return Err(ServiceError::queue_full(format!(
                    "this identity already has {} KeyPackages in this pool, the most the server keeps",
                    meta.count()
                )));
            }
            batch.put(layout::kp_key(&identity_key, suite, meta.tail), package);
            meta.tail += 1;
            batch.put(layout::kp_meta_key(&identity_key, suite), meta.encode());
        }
        self.write(batch)?;
        Ok(Response::KeyPackageUploaded { fingerprint })
    }

    pub(super) fn fetch_key_package(
        &mut self,
        now: Time,
        conn: ConnectionId,
        target: IdentityKey,
        suite: u16,
    ) -> Reply {
        let me = self.identity(conn)?;
        check_pool(suite)?;
        let pair = (KeyFetch::KeyPackage, me, target);
        self.key_fetch_pair_limiter
            .check(now, pair)
            .map_err(|ms| rate_limited(ms, "KeyPackage fetches for this identity"))?;
        self.key_package_target_limiter
            .check(now, target)
            .map_err(|ms| rate_limited(ms, "KeyPackage fetches for this target"))?;
        self.key_fetch_pair_limiter.take(now, pair);
        self.key_package_target_limiter.take(now, target);

        let mut meta = self.kp_meta(&target, suite)?;
        if meta.count() > 0 {
            let key = layout::kp_key(&target, suite, meta.head);
            let package = self
                .get(&key)?
                .ok_or_else(|| ServiceError::internal("KeyPackage record missing"))?;
            meta.head += 1;
            // Removal and the new head are one atomic batch: the package can
            // never be handed out twice, even across a crash.
            let mut batch = Batch::upkeep();
            batch.delete(key);
            batch.put(layout::kp_meta_key(&target, suite), meta.encode());
            self.write(batch)?;
            return Ok(Response::KeyPackage {
                package,
                last_resort: false,
            });
        }
        match self.get(&layout::kp_last_resort_key(&target, suite))? {
            Some(package) => Ok(Response::KeyPackage {
                package,
                last_resort: true,
            }),
            None => Err(ServiceError::not_found(
                "this identity has no KeyPackage left",
            )),
        }
    }

    pub(super) fn key_package_count(
        &mut self,
        conn: ConnectionId,
        identity_key: IdentityKey,
        suite: u16,
    ) -> Reply {
        self.owner(conn, &identity_key)?;
        check_pool(suite)?;
        let meta = self.kp_meta(&identity_key, suite)?;
        let has_last_resort = self
            .get(&layout::kp_last_resort_key(&identity_key, suite))?
            .is_some();
        Ok(Response::KeyPackageCount {
            count: u32::try_from(meta.count()).unwrap_or(u32::MAX),
            has_last_resort,
        })
    }

    pub(super) fn upload_hybrid_key(
        &mut self,
        conn: ConnectionId,
        identity_key: IdentityKey,
        hybrid_key: Vec<u8>,
        signature: Signature,
    ) -> Reply {
        self.owner(conn, &identity_key)?;
        check_size("hybrid key", &hybrid_key, limits::HYBRID_KEY_BYTES_MAX)?;
        let message = hybrid_key_message(&identity_key, &hybrid_key);
        verify(&identity_key, &message, &signature)
            .map_err(|()| ServiceError::invalid_argument("hybrid key signature does not verify"))?;
        let mut batch = Batch::new();
        batch.put(
            layout::hybrid_key_key(&identity_key),
            layout::encode_hybrid_key(&hybrid_key, &signature),
        );
        self.write(batch)?;
        Ok(Response::HybridKeyUploaded)
    }

    pub(super) fn fetch_hybrid_key(
        &mut self,
        now: Time,
        conn: ConnectionId,
        target: IdentityKey,
    ) -> Reply {
        let me = self.identity(conn)?;
        self.key_fetch_pair_limiter
            .acquire(now, (KeyFetch::HybridKey, me, target))
            .map_err(|ms| rate_limited(ms, "hybrid key fetches for this identity"))?;
        let record = self
            .get(&layout::hybrid_key_key(&target))?
            .ok_or_else(|| ServiceError::not_found("this identity has no hybrid key"))?;
        let (hybrid_key, signature) = layout::decode_hybrid_key(&record).map_err(corrupt)?;
        Ok(Response::HybridKey {
            hybrid_key,
            signature,
        })
    }

    fn kp_meta(&self, id: &IdentityKey, suite: u16) -> Result<KpMeta, ServiceError> {
        match self.get(&layout::kp_meta_key(id, suite))? {
            Some(v) => KpMeta::decode(&v).map_err(corrupt),
            None => Ok(KpMeta::default()),
        }
    }
}

/// A pool is the default one or one of a cipher suite the server keeps
/// pools for.
fn check_pool(suite: u16) -> Result<(), ServiceError> {
    if suite == limits::DEFAULT_POOL || limits::KEY_PACKAGE_SUITES.contains(&suite) {
        return Ok(());
    }
    Err(ServiceError::invalid_argument(format!(
        "no KeyPackage pool for cipher suite 0x{suite:04X}"
    )))
}

/// An uploaded key (`what`) is refused when empty or longer than `max`.
fn check_size(what: &str, bytes: &[u8], max: usize) -> Result<(), ServiceError> {
    if bytes.is_empty() {
        return Err(ServiceError::invalid_argument(format!("{what} is empty")));
    }
    if bytes.len() > max {
        return Err(ServiceError::payload_too_large(format!(
            "{what} of {} bytes exceeds the limit of {max}",
            bytes.len()
        )));
    }
    Ok(())
}
