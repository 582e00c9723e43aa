//! The MLS provider the client machine runs on: RustCrypto's primitives, a
//! randomness source seeded by the caller, and openmls's in-memory storage,
//! which the machine snapshots into the encrypted state file.
//!
//! The caller seeds the generator from OS entropy in production and from the
//! test seed in tests. (RustCrypto's HPKE draws its own ephemeral randomness
//! internally, so Welcomes and Commits are not byte-reproducible; nothing
//! here relies on that.)

use std::cell::RefCell;

use openmls_rust_crypto::{MemoryStorage, RustCrypto};
use openmls_traits::OpenMlsProvider;
use openmls_traits::random::OpenMlsRand;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// The provider: crypto, seeded randomness, storage.
#[derive(Debug)]
pub struct QpqProvider {
    crypto: RustCrypto,
    rand: SeededRand,
    storage: MemoryStorage,
}

impl QpqProvider {
    /// A provider with empty storage whose randomness comes from `seed`.
    pub fn new(seed: [u8; 32]) -> Self {
        QpqProvider {
            crypto: RustCrypto::default(),
            rand: SeededRand(RefCell::new(ChaCha20Rng::from_seed(seed))),
            storage: MemoryStorage::default(),
        }
    }

    /// Fills `out` from the seeded generator (for ids the machine picks).
    pub fn fill(&self, out: &mut [u8]) {
        self.rand.0.borrow_mut().fill_bytes(out);
    }

    /// Every storage entry, sorted, for the state file.
    pub fn storage_snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let map = self
            .storage
            .values
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut entries: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        entries.sort();
        entries
    }

    /// Replaces the storage with `entries` (from the state file).
    pub fn restore_storage(&self, entries: Vec<(Vec<u8>, Vec<u8>)>) {
        let mut map = self
            .storage
            .values
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        map.clear();
        map.extend(entries);
    }
}

impl OpenMlsProvider for QpqProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = SeededRand;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &MemoryStorage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &SeededRand {
        &self.rand
    }
}

/// A ChaCha20 generator behind a `RefCell`: openmls asks for randomness
/// through `&self`, and the machine is single-threaded.
#[derive(Debug)]
pub struct SeededRand(RefCell<ChaCha20Rng>);

/// Never produced: the generator cannot fail.
#[derive(Debug, thiserror::Error)]
#[error("randomness unavailable")]
pub struct RandError;

impl OpenMlsRand for SeededRand {
    type Error = RandError;

    fn random_array<const N: usize>(&self) -> Result<[u8; N], RandError> {
        let mut out = [0u8; N];
        self.0.borrow_mut().fill_bytes(&mut out);
        Ok(out)
    }

    fn random_vec(&self, len: usize) -> Result<Vec<u8>, RandError> {
        let mut out = vec![0u8; len];
        self.0.borrow_mut().fill_bytes(&mut out);
        Ok(out)
    }
}
