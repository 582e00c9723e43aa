//! The encrypted client state file, `qpq-state.bin`: sealing a plaintext
//! under a password, opening it again, and writing it to disk atomically.
//! The caller decides what the plaintext is; this module only guarantees
//! that what comes back is exactly what was sealed under that password.
//!
//! # Format, version 1
//!
//! All integers are big-endian. `S` is the salt length.
//!
//! | offset   | bytes | field |
//! |----------|-------|-------|
//! | 0        | 8     | magic `QPQSTATE` |
//! | 8        | 2     | format version, `1` |
//! | 10       | 1     | KDF id, `1`: Argon2id v1.3 → HKDF-SHA256 → XChaCha20-Poly1305 |
//! | 11       | 4     | Argon2id `m_cost` in KiB |
//! | 15       | 4     | Argon2id `t_cost` (passes) |
//! | 19       | 4     | Argon2id `p_cost` (lanes) |
//! | 23       | 1     | `S`, the salt length, 16 to 32 (new files use 16) |
//! | 24       | S     | Argon2id salt |
//! | 24+S     | 24    | XChaCha20-Poly1305 nonce |
//! | 48+S     | 8     | body length `B` = plaintext length + 16 |
//! | 56+S     | B     | body: the ciphertext followed by the 16-byte Poly1305 tag |
//!
//! The header is bytes `0 .. 56+S`; the file is exactly header + body.
//! The key is `HKDF-SHA256(salt = none, IKM = Argon2id(password, salt,
//! m_cost, t_cost, p_cost) [32 bytes], info = "quicnprotochat/state/v1")`,
//! 32 bytes, and the body is `XChaCha20-Poly1305(key, nonce, plaintext,
//! associated data = the whole header)`.
//!
//! # Guarantees
//!
//! - Any change to any byte, in the header or the body, makes [`open`] fail:
//!   the header is checked field by field and is also the AEAD's associated
//!   data, so what validation lets through the tag catches.
//! - A file can only *raise* the Argon2id cost: [`open`] refuses parameters
//!   below [`KdfParams::FLOOR`] before it derives anything, so a tampered
//!   header cannot make a guess at the password cheaper. It also refuses
//!   parameters above [`KdfParams::CEILING`], so a hostile file cannot make
//!   `open` allocate gigabytes or run for minutes.
//! - [`open`] is total: any input gives `Ok` or a typed [`StateFileError`],
//!   never a panic, and nothing is allocated from an unchecked length.
//! - [`save`] never leaves a partial file: it writes a temporary file in the
//!   same directory, fsyncs it, renames it over the target and fsyncs the
//!   directory. If anything fails before the rename, the previous file is
//!   still there, intact, and the temporary file is removed; a crash leaves
//!   either the old file or the new one, never a mix. [`write`] writes
//!   already sealed bytes the same way; with [`Existing::Refuse`] the
//!   rename itself refuses a file that is there, so nothing is replaced.
//! - The AEAD cannot tell a wrong password from a modified body; both are
//!   reported as [`StateFileError::WrongPassword`].
//! - An empty password is refused before anything is derived, for sealing
//!   and opening alike ([`StateFileError::EmptyPassword`]): it would leave
//!   the file protected by nothing but its salt.
//!
//! # Locking
//!
//! [`StateLock`] keeps processes sharing a state file to one at a time:
//! an exclusive lock on `<state>.lock`, which on Unix exists only while
//! someone holds it or waits for it (after a crash, until the next holder
//! is done). See [`StateLock::acquire`] for why removing it is race-free.
//!
//! Deriving the key is deliberately slow (Argon2id, ~0.35 s with
//! [`KdfParams::RECOMMENDED`]). A process that saves often derives a
//! [`StateKey`] once ([`load_and_keep_key`] or [`StateKey::derive`]) and
//! saves with [`save_with_key`]: same salt, a fresh random nonce per write.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Block, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::{CryptoRngCore, OsRng};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Why a state file could not be sealed, opened, saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateFileError {
    /// The password is empty: no state is sealed or opened with one.
    #[error("the password is empty; a state file needs a password")]
    EmptyPassword,
    /// The AEAD tag did not verify.
    #[error("cannot decrypt the state file: wrong password or the file was modified")]
    WrongPassword,
    /// The file ends before its header or body does.
    #[error("the state file is truncated")]
    Truncated,
    /// The file does not start with the state file's magic bytes.
    #[error("not a qpq state file (bad magic bytes)")]
    NotAStateFile,
    /// The file was written in a format this build does not know.
    #[error(
        "the state file has format version {found}, but this qpq reads only up to version {supported}; upgrade qpq"
    )]
    NewerFormat {
        /// The version in the file.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// The Argon2id parameters are below the floor; nothing was derived.
    #[error(
        "Argon2id parameters m={m_cost_kib} KiB, t={t_cost}, p={p_cost} are below the floor ({floor}); refusing to derive a key from them (a state file asking for them was tampered with or written by an unsafe tool)"
    )]
    KdfBelowFloor {
        /// `m_cost` from the header, in KiB.
        m_cost_kib: u32,
        /// `t_cost` from the header.
        t_cost: u32,
        /// `p_cost` from the header.
        p_cost: u32,
        /// The floor that was not met.
        floor: KdfParams,
    },
    /// The Argon2id parameters are above the ceiling; nothing was derived.
    #[error(
        "Argon2id parameters m={m_cost_kib} KiB, t={t_cost}, p={p_cost} are above the ceiling ({ceiling}); refusing to derive a key from them"
    )]
    KdfAboveCeiling {
        /// `m_cost` from the header, in KiB.
        m_cost_kib: u32,
        /// `t_cost` from the header.
        t_cost: u32,
        /// `p_cost` from the header.
        p_cost: u32,
        /// The ceiling that was exceeded.
        ceiling: KdfParams,
    },
    /// A header field has a value no version-1 writer produces.
    #[error("corrupt state file header: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// Bytes follow the end of the body.
    #[error("the state file has {extra} unexpected bytes after its end")]
    TrailingData {
        /// How many bytes follow the body.
        extra: u64,
    },
    /// The plaintext or the file is larger than this module handles.
    #[error("the state is {bytes} bytes, more than the limit of {max} bytes")]
    TooLarge {
        /// The size found.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// Argon2id or HKDF failed (e.g. memory for Argon2id could not be had).
    #[error("key derivation failed: {reason}")]
    Kdf {
        /// What failed.
        reason: String,
    },
    /// [`write`] was told not to replace a file, and there is one.
    #[error("{} exists already", path.display())]
    Exists {
        /// The file that is there.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("state file I/O on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Argon2id cost parameters, always within [`KdfParams::FLOOR`] and
/// [`KdfParams::CEILING`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    m_cost_kib: u32,
    t_cost: u32,
    p_cost: u32,
}

impl KdfParams {
    /// The least a file may ask for: OWASP's minimum for Argon2id
    /// (Password Storage Cheat Sheet: m = 19 MiB, t = 2, p = 1), a
    /// published, widely used baseline. Each parameter is floored on its
    /// own, so trading memory for passes below it is refused too. A file
    /// asking for less is refused unopened.
    pub const FLOOR: KdfParams = KdfParams {
        m_cost_kib: 19 * 1024,
        t_cost: 2,
        p_cost: 1,
    };

    /// The most a file may ask for: 1 GiB of memory, 10 passes, 16 lanes.
    /// Far above the default, while a hostile file can make `open` allocate
    /// at most 1 GiB and work for at most about 20 s (one pass over 1 GiB
    /// takes about 1.5 s of one x86-64 core). Lanes are computed one after
    /// another (no `parallel` feature), so more than a handful buy nothing.
    pub const CEILING: KdfParams = KdfParams {
        m_cost_kib: 1024 * 1024,
        t_cost: 10,
        p_cost: 16,
    };

    /// What new files use: 128 MiB, 3 passes, 1 lane. About 0.35 s of one
    /// x86-64 core (measured in a release build; the floor takes about
    /// 25 ms), so unlocking stays quick for a person while every password
    /// guess costs an attacker 128 MiB and a third of a second.
    pub const RECOMMENDED: KdfParams = KdfParams {
        m_cost_kib: 128 * 1024,
        t_cost: 3,
        p_cost: 1,
    };

    /// Parameters within the floor and the ceiling, or the error saying
    /// which bound they miss.
    pub fn new(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Result<KdfParams, StateFileError> {
        let (floor, ceiling) = (KdfParams::FLOOR, KdfParams::CEILING);
        if m_cost_kib < floor.m_cost_kib || t_cost < floor.t_cost || p_cost < floor.p_cost {
            return Err(StateFileError::KdfBelowFloor {
                m_cost_kib,
                t_cost,
                p_cost,
                floor,
            });
        }
        if m_cost_kib > ceiling.m_cost_kib || t_cost > ceiling.t_cost || p_cost > ceiling.p_cost {
            return Err(StateFileError::KdfAboveCeiling {
                m_cost_kib,
                t_cost,
                p_cost,
                ceiling,
            });
        }
        Ok(KdfParams {
            m_cost_kib,
            t_cost,
            p_cost,
        })
    }

    /// Memory cost in KiB.
    pub fn m_cost_kib(&self) -> u32 {
        self.m_cost_kib
    }

    /// Number of passes over the memory.
    pub fn t_cost(&self) -> u32 {
        self.t_cost
    }

    /// Number of lanes.
    pub fn p_cost(&self) -> u32 {
        self.p_cost
    }
}

impl Default for KdfParams {
    fn default() -> KdfParams {
        KdfParams::RECOMMENDED
    }
}

impl fmt::Display for KdfParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "m={} KiB, t={}, p={}",
            self.m_cost_kib, self.t_cost, self.p_cost
        )
    }
}

/// A derived state-file key together with the salt and parameters it was
/// derived from, so the same state can be sealed again without rerunning
/// Argon2id. The key is wiped from memory when this is dropped.
pub struct StateKey {
    key: Zeroizing<[u8; KEY_BYTES]>,
    params: KdfParams,
    salt: Vec<u8>,
}

impl StateKey {
    /// Derives a key from `password` with a fresh random salt.
    pub fn derive(
        password: &[u8],
        params: KdfParams,
        rng: &mut impl CryptoRngCore,
    ) -> Result<StateKey, StateFileError> {
        let mut salt = vec![0u8; SALT_BYTES_NEW];
        rng.fill_bytes(&mut salt);
        let key = derive_key(password, &salt, params)?;
        Ok(StateKey { key, params, salt })
    }

    /// Seals `plaintext` into a complete state file with a fresh random
    /// nonce. The 24-byte XChaCha20 nonce makes random nonces safe however
    /// often one key is reused.
    pub fn seal(
        &self,
        plaintext: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Vec<u8>, StateFileError> {
        let body_bytes = plaintext.len() as u64 + TAG_BYTES as u64;
        if body_bytes > BODY_BYTES_MAX {
            return Err(StateFileError::TooLarge {
                bytes: plaintext.len() as u64,
                max: BODY_BYTES_MAX - TAG_BYTES as u64,
            });
        }
        let mut nonce = [0u8; NONCE_BYTES];
        rng.fill_bytes(&mut nonce);

        let salt_len = u8::try_from(self.salt.len()).map_err(|_| StateFileError::Malformed {
            reason: "salt longer than 255 bytes".into(),
        })?;
        let mut file =
            Vec::with_capacity(HEADER_FIXED_BYTES + self.salt.len() + body_bytes as usize);
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        file.push(KDF_ID_ARGON2ID_HKDF_XCHACHA);
        file.extend_from_slice(&self.params.m_cost_kib.to_be_bytes());
        file.extend_from_slice(&self.params.t_cost.to_be_bytes());
        file.extend_from_slice(&self.params.p_cost.to_be_bytes());
        file.push(salt_len);
        file.extend_from_slice(&self.salt);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&body_bytes.to_be_bytes());

        let body = cipher(&self.key)
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &file,
                },
            )
            // The AEAD fails only on a plaintext far above BODY_BYTES_MAX.
            .map_err(|_| StateFileError::TooLarge {
                bytes: plaintext.len() as u64,
                max: BODY_BYTES_MAX - TAG_BYTES as u64,
            })?;
        debug_assert_eq!(body.len() as u64, body_bytes);
        file.extend_from_slice(&body);
        Ok(file)
    }

    /// The Argon2id parameters this key was derived with.
    pub fn params(&self) -> KdfParams {
        self.params
    }
}

impl fmt::Debug for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateKey")
            .field("key", &"<redacted>")
            .field("params", &self.params)
            .field("salt_bytes", &self.salt.len())
            .finish()
    }
}

/// Seals `plaintext` under `password` into a complete state file, with a
/// fresh salt and nonce from `rng`.
pub fn seal(
    password: &[u8],
    plaintext: &[u8],
    params: KdfParams,
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, StateFileError> {
    StateKey::derive(password, params, rng)?.seal(plaintext, rng)
}

/// Opens a state file's bytes with `password` and returns the plaintext.
/// Never panics, whatever `file` holds.
pub fn open(password: &[u8], file: &[u8]) -> Result<Vec<u8>, StateFileError> {
    open_and_keep_key(password, file).map(|(plaintext, _)| plaintext)
}

/// As [`open`], and also returns the derived key, so the caller can save
/// again with [`save_with_key`] without rerunning Argon2id.
pub fn open_and_keep_key(
    password: &[u8],
    file: &[u8],
) -> Result<(Vec<u8>, StateKey), StateFileError> {
    // The header (and with it the parameter floor and ceiling) is checked
    // before Argon2id runs, so a hostile header costs nothing to refuse.
    let header = parse_header(file)?;
    let key = derive_key(password, header.salt, header.params)?;
    let plaintext = decrypt(&key, &header, file)?;
    let key = StateKey {
        key,
        params: header.params,
        salt: header.salt.to_vec(),
    };
    Ok((plaintext, key))
}

/// Seals `plaintext` under `password` with [`KdfParams::RECOMMENDED`] and a
/// fresh salt and nonce from the OS, and writes it to `path` atomically.
pub fn save(path: &Path, password: &[u8], plaintext: &[u8]) -> Result<(), StateFileError> {
    save_with_params(path, password, plaintext, KdfParams::RECOMMENDED)
}

/// As [`save`], with explicit Argon2id parameters.
pub fn save_with_params(
    path: &Path,
    password: &[u8],
    plaintext: &[u8],
    params: KdfParams,
) -> Result<(), StateFileError> {
    let key = StateKey::derive(password, params, &mut OsRng)?;
    save_with_key(path, &key, plaintext)
}

/// Seals `plaintext` with an already derived key and a fresh nonce from the
/// OS, and writes it to `path` atomically.
pub fn save_with_key(path: &Path, key: &StateKey, plaintext: &[u8]) -> Result<(), StateFileError> {
    let bytes = key.seal(plaintext, &mut OsRng)?;
    write(path, &bytes, Existing::Replace)
}

/// What [`write`] does when a file is already at its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (in one rename, so it is never missing or partial).
    Replace,
    /// Keep it and fail with [`StateFileError::Exists`]. Checked by the
    /// rename itself, so a file that appears meanwhile is kept too.
    Refuse,
}

/// Writes `bytes` (a sealed state file, as [`read`] returns it) to `path`
/// as [`save`] writes: atomically, fsynced, readable by its owner only.
pub fn write(path: &Path, bytes: &[u8], existing: Existing) -> Result<(), StateFileError> {
    write_atomic(path, existing, |f| f.write_all(bytes))
}

/// Reads the state file at `path` and opens it with `password`.
pub fn load(path: &Path, password: &[u8]) -> Result<Vec<u8>, StateFileError> {
    load_and_keep_key(path, password).map(|(plaintext, _)| plaintext)
}

/// As [`load`], and also returns the derived key for [`save_with_key`].
pub fn load_and_keep_key(
    path: &Path,
    password: &[u8],
) -> Result<(Vec<u8>, StateKey), StateFileError> {
    let bytes = read(path)?;
    open_and_keep_key(password, &bytes)
}

/// Reads the sealed bytes of the file at `path` without opening them,
/// refusing a file larger than the format allows before reading it.
pub fn read(path: &Path) -> Result<Vec<u8>, StateFileError> {
    let io_err = |source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > FILE_BYTES_MAX {
        return Err(StateFileError::TooLarge {
            bytes: len,
            max: FILE_BYTES_MAX,
        });
    }
    let mut bytes = Vec::new();
    // `take` bounds the read even if the file grows after the check.
    file.take(FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    Ok(bytes)
}

/// Checks what can be checked of a state file without its password: the
/// magic bytes, the format version, the key derivation and its parameters,
/// and the lengths. [`open`] checks the same first; this lets a caller
/// refuse a file that is not a state file before asking for a password.
pub fn check(file: &[u8]) -> Result<(), StateFileError> {
    parse_header(file).map(|_| ())
}

/// True if a regular file (or a link to one) exists at `path`.
pub fn exists(path: &Path) -> bool {
    path.is_file()
}

/// The exclusive right to read, change and write one state file, held
/// until dropped. Other processes (and other holders in this one) wait in
/// [`StateLock::acquire`] meanwhile.
#[derive(Debug)]
pub struct StateLock {
    /// The open lock file, kept only for its lock, which goes when it is
    /// closed.
    _file: File,
    /// `<state>.lock`, removed on drop.
    path: PathBuf,
}

impl StateLock {
    /// Waits until no one else holds the lock of the state file at `state`,
    /// then takes it: an exclusive lock on the file `<state>.lock`, created
    /// if missing.
    ///
    /// On Unix the lock file is removed when the lock is dropped, so none
    /// is left behind. That is race-free because the holder removes the
    /// name while it still holds the lock, and a waiter, once it has the
    /// lock, checks that `<state>.lock` still names the file it locked (same
    /// device and inode). If it does not, the waiter had opened a file the
    /// previous holder has since removed — a lock nobody else will ever
    /// contend for — so it starts over with whatever the name holds now.
    /// Hence at most one process at a time holds the lock on the file the
    /// name points to, and only that process removes the name. Elsewhere
    /// the file is left in place (an open file cannot always be removed
    /// there).
    pub fn acquire(state: &Path) -> Result<StateLock, StateFileError> {
        Self::take(state, true).map(|l| l.expect("a waiting take returns a lock"))
    }

    /// As [`Self::acquire`], without waiting: `None` while someone else
    /// holds the lock (a running session, say).
    pub fn try_acquire(state: &Path) -> Result<Option<StateLock>, StateFileError> {
        Self::take(state, false)
    }

    /// True if this is the lock of the state file at `state`.
    pub fn guards(&self, state: &Path) -> bool {
        self.path == lock_path(state)
    }

    fn take(state: &Path, wait: bool) -> Result<Option<StateLock>, StateFileError> {
        let path = lock_path(state);
        let io_err = |source| StateFileError::Io {
            path: path.clone(),
            source,
        };
        for _ in 0..LOCK_ATTEMPTS_MAX {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err)?;
            if wait {
                file.lock().map_err(io_err)?;
            } else {
                match file.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                    Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
                }
            }
            if still_named(&file, &path).map_err(io_err)? {
                return Ok(Some(StateLock { _file: file, path }));
            }
        }
        Err(io_err(io::Error::other(format!(
            "the lock file was replaced {LOCK_ATTEMPTS_MAX} times while waiting for it"
        ))))
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Removed while still locked (`_file` closes after this), so no one
        // else can be holding the lock on what the name points to.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `<state>.lock`.
fn lock_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(LOCK_SUFFIX);
    PathBuf::from(name)
}

/// True if `path` still names `file` (which this process has locked).
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let locked = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == locked.dev() && named.ino() == locked.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Without removal on drop the name always names the locked file.
#[cfg(not(unix))]
fn still_named(_file: &File, _path: &Path) -> io::Result<bool> {
    Ok(true)
}

/// A parsed, validated header borrowing from the file.
struct Header<'a> {
    params: KdfParams,
    salt: &'a [u8],
    nonce: [u8; NONCE_BYTES],
    /// Bytes `0..header_bytes` are the header, the AEAD's associated data.
    header_bytes: usize,
    body_bytes: usize,
}

/// Checks every header field and the file's length, in file order, without
/// deriving anything. Total: never panics, never allocates.
fn parse_header(file: &[u8]) -> Result<Header<'_>, StateFileError> {
    let mut r = Reader { rest: file, at: 0 };

    let magic = r.take(MAGIC.len()).map_err(|e| {
        // A short file that still matches the magic is a truncated state
        // file; anything else is not a state file at all.
        if MAGIC.starts_with(file) {
            e
        } else {
            StateFileError::NotAStateFile
        }
    })?;
    if magic != MAGIC {
        return Err(StateFileError::NotAStateFile);
    }

    let version = r.u16()?;
    if version == 0 {
        return Err(StateFileError::Malformed {
            reason: "format version 0 does not exist".into(),
        });
    }
    if version > FORMAT_VERSION {
        return Err(StateFileError::NewerFormat {
            found: version,
            supported: FORMAT_VERSION,
        });
    }

    let kdf_id = r.u8()?;
    if kdf_id != KDF_ID_ARGON2ID_HKDF_XCHACHA {
        // A new KDF or AEAD comes with a new format version, so in version
        // 1 any other id is corruption.
        return Err(StateFileError::Malformed {
            reason: format!("unknown key-derivation id {kdf_id}"),
        });
    }

    let m_cost_kib = r.u32()?;
    let t_cost = r.u32()?;
    let p_cost = r.u32()?;
    let params = KdfParams::new(m_cost_kib, t_cost, p_cost)?;

    let salt_len = usize::from(r.u8()?);
    if !(SALT_BYTES_MIN..=SALT_BYTES_MAX).contains(&salt_len) {
        return Err(StateFileError::Malformed {
            reason: format!(
                "salt length {salt_len} is outside {SALT_BYTES_MIN}..={SALT_BYTES_MAX}"
            ),
        });
    }
    let salt = r.take(salt_len)?;
    let nonce = r.array::<NONCE_BYTES>()?;

    let body_bytes = r.u64()?;
    if body_bytes < TAG_BYTES as u64 {
        return Err(StateFileError::Malformed {
            reason: format!("body length {body_bytes} is shorter than the {TAG_BYTES}-byte tag"),
        });
    }
    if body_bytes > BODY_BYTES_MAX {
        return Err(StateFileError::TooLarge {
            bytes: body_bytes,
            max: BODY_BYTES_MAX,
        });
    }
    let header_bytes = r.at;
    let rest = r.rest.len() as u64;
    if rest < body_bytes {
        return Err(StateFileError::Truncated);
    }
    if rest > body_bytes {
        return Err(StateFileError::TrailingData {
            extra: rest - body_bytes,
        });
    }
    Ok(Header {
        params,
        salt,
        nonce,
        header_bytes,
        // Checked against BODY_BYTES_MAX and the slice length above.
        body_bytes: rest as usize,
    })
}

/// Decrypts the body of `file` (already parsed into `header`) with `key`.
fn decrypt(
    key: &[u8; KEY_BYTES],
    header: &Header<'_>,
    file: &[u8],
) -> Result<Vec<u8>, StateFileError> {
    let (aad, body) = file
        .split_at_checked(header.header_bytes)
        .ok_or(StateFileError::Truncated)?;
    if body.len() != header.body_bytes {
        return Err(StateFileError::Truncated);
    }
    cipher(key)
        .decrypt(&XNonce::from(header.nonce), Payload { msg: body, aad })
        .map_err(|_| StateFileError::WrongPassword)
}

/// Opens `file` with an already derived key, skipping Argon2id: the AEAD
/// and header layer on its own, so tests can try thousands of corruptions.
#[cfg(test)]
fn open_with_key(key: &[u8; KEY_BYTES], file: &[u8]) -> Result<Vec<u8>, StateFileError> {
    let header = parse_header(file)?;
    decrypt(key, &header, file)
}

fn cipher(key: &[u8; KEY_BYTES]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.into())
}

/// Argon2id, then HKDF-SHA256 with the legacy label. Every key, for
/// sealing or opening, comes from here, so this is where an empty password
/// is refused.
fn derive_key(
    password: &[u8],
    salt: &[u8],
    params: KdfParams,
) -> Result<Zeroizing<[u8; KEY_BYTES]>, StateFileError> {
    if password.is_empty() {
        return Err(StateFileError::EmptyPassword);
    }
    #[cfg(test)]
    tests::DERIVATIONS.with(|n| n.set(n.get() + 1));

    let kdf_err = |reason: String| StateFileError::Kdf { reason };
    let argon_params = argon2::Params::new(
        params.m_cost_kib,
        params.t_cost,
        params.p_cost,
        Some(KEY_BYTES),
    )
    .map_err(|e| kdf_err(format!("Argon2id parameters: {e}")))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);

    // Allocate Argon2id's memory ourselves so a failed allocation is an
    // error rather than an abort, and so the memory is wiped afterwards.
    let blocks_count = argon.params().block_count();
    let mut blocks: Zeroizing<Vec<Block>> = Zeroizing::new(Vec::new());
    blocks.try_reserve_exact(blocks_count).map_err(|_| {
        kdf_err(format!(
            "cannot allocate {} KiB for Argon2id",
            params.m_cost_kib
        ))
    })?;
    blocks.resize(blocks_count, Block::default());

    let mut ikm = Zeroizing::new([0u8; KEY_BYTES]);
    argon
        .hash_password_into_with_memory(password, salt, &mut ikm[..], &mut blocks[..])
        .map_err(|e| kdf_err(format!("Argon2id: {e}")))?;

    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    Hkdf::<Sha256>::new(None, &ikm[..])
        .expand(HKDF_INFO, &mut key[..])
        .map_err(|e| kdf_err(format!("HKDF: {e}")))?;
    Ok(key)
}

/// Replaces the file at `path` with what `write` writes, atomically: a
/// temporary file in the same directory (so the rename cannot cross file
/// systems), fsynced, renamed over `path` (or, with [`Existing::Refuse`],
/// to `path` only if nothing is there), then the directory fsynced so the
/// rename itself is durable. On any failure the temporary file is removed
/// and `path` is untouched. The file is created readable and writable by
/// its owner only.
fn write_atomic(
    path: &Path,
    existing: Existing,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), StateFileError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateFileError::Io { path, source }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Dropping `tmp` on an early return deletes the temporary file.
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    write(tmp.as_file_mut()).map_err(io_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    let persisted = match existing {
        Existing::Replace => tmp.persist(path),
        Existing::Refuse => tmp.persist_noclobber(path),
    };
    persisted.map_err(|e| match e.error.kind() {
        io::ErrorKind::AlreadyExists if existing == Existing::Refuse => StateFileError::Exists {
            path: path.to_path_buf(),
        },
        _ => io_err(path)(e.error),
    })?;
    sync_dir(dir).map_err(io_err(dir))
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    // Windows has no directory fsync; the rename (MoveFileEx with
    // REPLACE_EXISTING) is as durable as the platform makes it.
    Ok(())
}

/// Reads fixed-size fields from the front of a byte slice; every read is
/// checked and a short one is [`StateFileError::Truncated`].
struct Reader<'a> {
    rest: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateFileError> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(StateFileError::Truncated)?;
        self.rest = rest;
        self.at += n;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateFileError> {
        self.take(N)?
            .try_into()
            .map_err(|_| StateFileError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, StateFileError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, StateFileError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, StateFileError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, StateFileError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

/// The first bytes of every state file.
const MAGIC: &[u8; 8] = b"QPQSTATE";
/// The format this build writes and the newest it reads.
const FORMAT_VERSION: u16 = 1;
/// KDF id 1: Argon2id v1.3, then HKDF-SHA256, keying XChaCha20-Poly1305.
const KDF_ID_ARGON2ID_HKDF_XCHACHA: u8 = 1;
/// HKDF info label. It keeps the project's old name on purpose
/// (ARCHITECTURE.md § Legacy labels): keys derived by existing installs
/// must stay the same. Never rename it.
const HKDF_INFO: &[u8] = b"quicnprotochat/state/v1";
/// Bytes of the derived Argon2id output and of the AEAD key.
const KEY_BYTES: usize = 32;
/// Salt length of new files (RFC 9106 §3.1 recommends 128 bits).
const SALT_BYTES_NEW: usize = 16;
/// Shortest salt a file may carry: 128 bits, as new files use.
const SALT_BYTES_MIN: usize = 16;
/// Longest salt a file may carry; more adds nothing.
const SALT_BYTES_MAX: usize = 32;
/// XChaCha20-Poly1305 nonce bytes; 192 bits make random nonces safe.
const NONCE_BYTES: usize = 24;
/// Poly1305 tag bytes at the end of the body.
const TAG_BYTES: usize = 16;
/// Header bytes other than the salt: magic, version, KDF id, three costs,
/// salt length, nonce and body length.
const HEADER_FIXED_BYTES: usize = 8 + 2 + 1 + 4 * 3 + 1 + NONCE_BYTES + 8;
/// Largest body: 256 MiB is far beyond any realistic client state (keys,
/// MLS groups and cursors), and keeps a hostile length from forcing a
/// huge read.
const BODY_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Largest file [`load`] reads.
const FILE_BYTES_MAX: u64 = BODY_BYTES_MAX + (HEADER_FIXED_BYTES + SALT_BYTES_MAX) as u64;
/// The lock file is the state file's name with this appended.
const LOCK_SUFFIX: &str = ".lock";
/// Most times [`StateLock::acquire`] starts over. Each retry means another
/// process took and released the lock while this one waited; a thousand in
/// a row means something else keeps replacing the file.
const LOCK_ATTEMPTS_MAX: u32 = 1_000;
/// Temporary files are `.qpq-state.XXXXXX.tmp` next to the target; the
/// name does not grow with the target's, so a long target name still fits.
const TEMP_PREFIX: &str = ".qpq-state.";
/// See [`TEMP_PREFIX`].
const TEMP_SUFFIX: &str = ".tmp";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;
    use std::sync::OnceLock;

    thread_local! {
        /// How many times this thread ran the KDF, to prove a refusal came
        /// before it.
        pub(super) static DERIVATIONS: Cell<u64> = const { Cell::new(0) };
    }

    const PASSWORD: &[u8] = b"correct horse battery staple";
    const PLAINTEXT: &[u8] = b"identity key, MLS groups and queue cursors";

    /// One key at the floor parameters and one small file sealed with it,
    /// shared by all tests so Argon2id runs once for them.
    struct Fixture {
        key: StateKey,
        file: Vec<u8>,
    }

    fn fixture() -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            let key = StateKey::derive(PASSWORD, KdfParams::FLOOR, &mut OsRng).expect("derive");
            let file = key.seal(PLAINTEXT, &mut OsRng).expect("seal");
            Fixture { key, file }
        })
    }

    fn derivations() -> u64 {
        DERIVATIONS.with(Cell::get)
    }

    /// Opens `file` at the AEAD/header layer with the fixture's key.
    fn open_fast(file: &[u8]) -> Result<Vec<u8>, StateFileError> {
        open_with_key(&fixture().key.key, file)
    }

    /// The fixture's file with `mask` XORed into byte `at`.
    fn flipped(at: usize, mask: u8) -> Vec<u8> {
        let mut file = fixture().file.clone();
        file[at] ^= mask;
        file
    }

    /// The fixture's file with the three cost fields replaced.
    fn with_costs(m_cost_kib: u32, t_cost: u32, p_cost: u32) -> Vec<u8> {
        let mut file = fixture().file.clone();
        file[11..15].copy_from_slice(&m_cost_kib.to_be_bytes());
        file[15..19].copy_from_slice(&t_cost.to_be_bytes());
        file[19..23].copy_from_slice(&p_cost.to_be_bytes());
        file
    }

    /// `open` refuses `file` without running the KDF; returns the error.
    fn refused_before_kdf(file: &[u8]) -> StateFileError {
        let before = derivations();
        let err = open(PASSWORD, file).expect_err("must be refused");
        assert_eq!(derivations(), before, "KDF ran before refusing: {err}");
        err
    }

    #[test]
    fn a_held_lock_keeps_others_out_and_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("qpq-state.bin");
        let lock_file = dir.path().join("qpq-state.bin.lock");
        let held = StateLock::acquire(&state).unwrap();
        assert!(held.guards(&state));
        assert!(!held.guards(&dir.path().join("qpq-state.bin.bak")));
        let other = File::open(&lock_file).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        drop(held);
        #[cfg(unix)]
        assert!(!lock_file.exists());
        // The next holder locks a new file, not the one `other` still has
        // open, which is no lock at all any more.
        #[cfg(unix)]
        {
            let _again = StateLock::acquire(&state).unwrap();
            assert!(other.try_lock().is_ok());
        }
    }

    #[test]
    fn lock_holders_never_overlap_while_the_file_comes_and_goes() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // Threads contend as processes would: each acquire opens the lock
        // file anew, so a holder on a removed file and one on its
        // successor could overlap if the name were not checked.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("qpq-state.bin");
        let holders = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        let _held = StateLock::acquire(&state).unwrap();
                        assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        std::thread::yield_now();
                        holders.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        #[cfg(unix)]
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_empty_password_neither_seals_nor_opens() {
        let file = &fixture().file;
        let before = derivations();
        let refused = seal(b"", PLAINTEXT, KdfParams::FLOOR, &mut OsRng);
        assert!(matches!(refused, Err(StateFileError::EmptyPassword)));
        let refused = open(b"", file);
        assert!(matches!(refused, Err(StateFileError::EmptyPassword)));
        assert_eq!(derivations(), before);
    }

    #[test]
    fn round_trip_through_the_password() {
        let file = seal(PASSWORD, PLAINTEXT, KdfParams::FLOOR, &mut OsRng).unwrap();
        assert_eq!(open(PASSWORD, &file).unwrap(), PLAINTEXT);
        assert_eq!(open(PASSWORD, &fixture().file).unwrap(), PLAINTEXT);
    }

    #[test]
    fn header_layout_matches_the_documented_format() {
        let f = &fixture().file;
        assert_eq!(&f[0..8], b"QPQSTATE");
        assert_eq!(&f[8..10], &[0, 1]);
        assert_eq!(f[10], 1);
        assert_eq!(&f[11..15], &(19 * 1024u32).to_be_bytes());
        assert_eq!(&f[15..19], &2u32.to_be_bytes());
        assert_eq!(&f[19..23], &1u32.to_be_bytes());
        assert_eq!(f[23], 16);
        let body = (PLAINTEXT.len() + 16) as u64;
        assert_eq!(&f[64..72], &body.to_be_bytes());
        assert_eq!(f.len(), 72 + PLAINTEXT.len() + 16);
        assert_eq!(HEADER_FIXED_BYTES + SALT_BYTES_NEW, 72);
    }

    #[test]
    fn key_level_round_trip_of_empty_and_large_plaintexts() {
        let key = &fixture().key;
        for plaintext in [Vec::new(), vec![0xAB; 1], vec![7; 1 << 20]] {
            let file = key.seal(&plaintext, &mut OsRng).unwrap();
            assert_eq!(open_fast(&file).unwrap(), plaintext);
        }
    }

    #[test]
    fn a_reused_key_seals_with_a_fresh_nonce_each_time() {
        let key = &fixture().key;
        let a = key.seal(PLAINTEXT, &mut OsRng).unwrap();
        let b = key.seal(PLAINTEXT, &mut OsRng).unwrap();
        assert_eq!(a[..40], b[..40], "same magic, params and salt");
        assert_ne!(a[40..64], b[40..64], "different nonces");
        assert_eq!(open_fast(&a).unwrap(), PLAINTEXT);
        assert_eq!(open_fast(&b).unwrap(), PLAINTEXT);
    }

    #[test]
    fn wrong_password_is_refused() {
        let err = open(b"tr0ub4dor&3", &fixture().file).unwrap_err();
        assert!(matches!(err, StateFileError::WrongPassword), "{err}");
        assert_eq!(
            err.to_string(),
            "cannot decrypt the state file: wrong password or the file was modified"
        );
    }

    #[test]
    fn every_single_byte_flip_is_refused_at_the_key_level() {
        let len = fixture().file.len();
        for at in 0..len {
            for mask in [0x01, 0x80, 0xFF] {
                let result = open_fast(&flipped(at, mask));
                assert!(result.is_err(), "flip {mask:#04x} at byte {at} accepted");
            }
        }
    }

    #[test]
    fn byte_flips_are_refused_through_the_full_open() {
        let f = fixture();
        let body = f.file.len() - PLAINTEXT.len() - TAG_BYTES;
        // Magic, version, KDF id, t_cost lowered, salt length, a salt byte,
        // a nonce byte, body length, a ciphertext byte, the last tag byte.
        let cases = [
            (0, 0x01),
            (9, 0x01),
            (10, 0x02),
            (18, 0x02),
            (23, 0x01),
            (30, 0x01),
            (50, 0x40),
            (71, 0x01),
            (body + 3, 0x01),
            (f.file.len() - 1, 0x80),
        ];
        for (at, mask) in cases {
            let err = open(PASSWORD, &flipped(at, mask)).unwrap_err();
            assert!(
                !matches!(err, StateFileError::Io { .. } | StateFileError::Kdf { .. }),
                "byte {at}: {err}"
            );
        }
    }

    #[test]
    fn truncation_at_every_length_is_refused() {
        let file = &fixture().file;
        for len in 0..file.len() {
            let err = refused_before_kdf(&file[..len]);
            assert!(
                matches!(err, StateFileError::Truncated),
                "length {len}: {err}"
            );
        }
    }

    #[test]
    fn appended_garbage_is_refused() {
        for extra in [&b"\0"[..], b"garbage", &[0xFF; 100]] {
            let mut file = fixture().file.clone();
            file.extend_from_slice(extra);
            let err = refused_before_kdf(&file);
            assert!(
                matches!(err, StateFileError::TrailingData { extra: n } if n == extra.len() as u64),
                "{err}"
            );
        }
    }

    #[test]
    fn a_lowered_kdf_floor_is_refused_before_deriving() {
        let floor = KdfParams::FLOOR;
        for (m, t, p) in [
            (floor.m_cost_kib - 1, floor.t_cost, floor.p_cost),
            (8, floor.t_cost, floor.p_cost),
            (floor.m_cost_kib, 1, floor.p_cost),
            (floor.m_cost_kib, 0, floor.p_cost),
            (floor.m_cost_kib, floor.t_cost, 0),
        ] {
            let err = refused_before_kdf(&with_costs(m, t, p));
            assert!(
                matches!(err, StateFileError::KdfBelowFloor { m_cost_kib, t_cost, p_cost, .. }
                    if (m_cost_kib, t_cost, p_cost) == (m, t, p)),
                "{err}"
            );
            let message = err.to_string();
            assert!(
                message.contains("below the floor (m=19456 KiB, t=2, p=1)"),
                "{message}"
            );
        }
    }

    #[test]
    fn parameters_above_the_ceiling_are_refused_before_deriving() {
        let ceiling = KdfParams::CEILING;
        for (m, t, p) in [
            (u32::MAX, 2, 1),
            (ceiling.m_cost_kib + 1, 2, 1),
            (19 * 1024, ceiling.t_cost + 1, 1),
            (19 * 1024, 2, ceiling.p_cost + 1),
        ] {
            let err = refused_before_kdf(&with_costs(m, t, p));
            assert!(
                matches!(err, StateFileError::KdfAboveCeiling { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("above the ceiling"), "{err}");
        }
    }

    #[test]
    fn raised_parameters_within_the_ceiling_fail_authentication() {
        // A header edit that only makes the KDF costlier still fails, as
        // the header is the AEAD's associated data.
        let err = open_fast(&with_costs(19 * 1024, 3, 1)).unwrap_err();
        assert!(matches!(err, StateFileError::WrongPassword), "{err}");
    }

    #[test]
    fn a_newer_format_version_is_refused() {
        let mut file = fixture().file.clone();
        file[8..10].copy_from_slice(&2u16.to_be_bytes());
        let err = refused_before_kdf(&file);
        assert!(
            matches!(
                err,
                StateFileError::NewerFormat {
                    found: 2,
                    supported: 1
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade qpq"), "{err}");

        file[8..10].copy_from_slice(&0u16.to_be_bytes());
        let err = refused_before_kdf(&file);
        assert!(matches!(err, StateFileError::Malformed { .. }), "{err}");
    }

    #[test]
    fn other_files_are_not_state_files() {
        for file in [
            &b"hello world, this is not a state file"[..],
            b"\x89PNG\r\n\x1a\n0000000000000000000",
            b"QPQSTATF",
            b"X",
        ] {
            let err = refused_before_kdf(file);
            assert!(matches!(err, StateFileError::NotAStateFile), "{err}");
        }
        assert!(matches!(refused_before_kdf(b""), StateFileError::Truncated));
    }

    #[test]
    fn malformed_header_fields_are_refused_before_deriving() {
        let mut bad_kdf = fixture().file.clone();
        bad_kdf[10] = 2;
        let mut short_salt = fixture().file.clone();
        short_salt[23] = 15;
        let mut long_salt = fixture().file.clone();
        long_salt[23] = 33;
        let mut tiny_body = fixture().file.clone();
        tiny_body[64..72].copy_from_slice(&15u64.to_be_bytes());
        for file in [bad_kdf, short_salt, long_salt, tiny_body] {
            let err = refused_before_kdf(&file);
            assert!(matches!(err, StateFileError::Malformed { .. }), "{err}");
        }
        let mut huge_body = fixture().file.clone();
        huge_body[64..72].copy_from_slice(&u64::MAX.to_be_bytes());
        let err = refused_before_kdf(&huge_body);
        assert!(matches!(err, StateFileError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn kdf_params_outside_the_bounds_cannot_be_constructed() {
        assert!(matches!(
            KdfParams::new(1024, 2, 1),
            Err(StateFileError::KdfBelowFloor { .. })
        ));
        assert!(matches!(
            KdfParams::new(19 * 1024, 11, 1),
            Err(StateFileError::KdfAboveCeiling { .. })
        ));
        for p in [KdfParams::FLOOR, KdfParams::RECOMMENDED, KdfParams::CEILING] {
            assert_eq!(KdfParams::new(p.m_cost_kib, p.t_cost, p.p_cost).unwrap(), p);
        }
        assert_eq!(KdfParams::default(), KdfParams::RECOMMENDED);
    }

    #[test]
    fn legacy_label_is_kept() {
        assert_eq!(HKDF_INFO, b"quicnprotochat/state/v1");
    }

    /// A file sealed by this format's first implementation (password
    /// `correct horse battery staple`, floor parameters, salt 0x5a * 16).
    /// If this stops opening, files on users' disks stop opening too.
    const GOLDEN_V1: &str = concat!(
        "515051535441544500010100004c000000000200000001105a5a5a5a5a5a5a5a",
        "5a5a5a5a5a5a5a5a4aebe5031cf2a181a4df3dc1a950b9c031b731b94d5bc0a6",
        "000000000000003a33431331751f329b5333692080fbbe7a17d16fdb6babaa64",
        "6e5c9fe62979ea1b664cb6af7a05749cfe82035b5f3a0ef2be8960483ad171b5",
        "33ac",
    );

    #[test]
    fn a_version_1_file_from_disk_still_opens() {
        let file = hex_decode(GOLDEN_V1);
        assert_eq!(open(PASSWORD, &file).unwrap(), PLAINTEXT);
    }

    fn hex_decode(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Saves `plaintext` at the floor parameters (fast in tests).
    fn save_fast(path: &Path, plaintext: &[u8]) {
        save_with_key(path, &fixture().key, plaintext).unwrap();
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn save_then_load_round_trips_and_a_second_save_replaces_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        assert!(!exists(&path));

        save_with_params(&path, PASSWORD, b"first", KdfParams::FLOOR).unwrap();
        assert!(exists(&path));
        assert_eq!(load(&path, PASSWORD).unwrap(), b"first");

        let (_, key) = load_and_keep_key(&path, PASSWORD).unwrap();
        save_with_key(&path, &key, b"second").unwrap();
        assert_eq!(load(&path, PASSWORD).unwrap(), b"second");
        assert_eq!(dir_entries(dir.path()), ["qpq-state.bin"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        save_fast(&path, b"old state");
        let before = std::fs::read(&path).unwrap();

        // The disk fills up halfway through writing the new state.
        let new = fixture().key.seal(b"new state", &mut OsRng).unwrap();
        let err = write_atomic(&path, Existing::Replace, |f| {
            f.write_all(&new[..new.len() / 2])?;
            Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
        })
        .unwrap_err();
        assert!(matches!(err, StateFileError::Io { .. }), "{err}");

        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(open_fast(&before).unwrap(), b"old state");
        assert_eq!(dir_entries(dir.path()), ["qpq-state.bin"], "temp file left");
    }

    #[test]
    fn writing_without_replacing_keeps_a_file_that_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        std::fs::write(&path, b"mine").unwrap();
        let err = write(&path, &fixture().file, Existing::Refuse).unwrap_err();
        assert!(
            matches!(&err, StateFileError::Exists { path: p } if p == &path),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        assert_eq!(dir_entries(dir.path()), ["qpq-state.bin"], "temp file left");

        let new = dir.path().join("new.bin");
        write(&new, &fixture().file, Existing::Refuse).unwrap();
        assert_eq!(read(&new).unwrap(), fixture().file);
        write(&path, &fixture().file, Existing::Replace).unwrap();
        assert_eq!(read(&path).unwrap(), fixture().file);
    }

    #[test]
    fn check_refuses_without_a_password_what_open_would_refuse_unopened() {
        check(&fixture().file).unwrap();
        let file = &fixture().file;
        for bad in [
            &file[..file.len() - 1],
            b"hello",
            &[file.as_slice(), b"x"].concat(),
        ] {
            let before = derivations();
            let err = check(bad).unwrap_err();
            let refused = refused_before_kdf(bad);
            assert_eq!(err.to_string(), refused.to_string());
            assert_eq!(derivations(), before);
        }
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory, so the rename fails.
        let path = dir.path().join("qpq-state.bin");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("keep"), b"x").unwrap();

        let err = save_with_key(&path, &fixture().key, PLAINTEXT).unwrap_err();
        assert!(matches!(err, StateFileError::Io { .. }), "{err}");
        assert_eq!(dir_entries(dir.path()), ["qpq-state.bin"], "temp file left");
        assert_eq!(dir_entries(&path), ["keep"]);
    }

    #[test]
    fn saving_into_a_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("qpq-state.bin");
        let err = save_with_key(&path, &fixture().key, PLAINTEXT).unwrap_err();
        assert!(matches!(err, StateFileError::Io { .. }), "{err}");
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn loading_a_missing_file_is_a_not_found_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        let err = load(&path, PASSWORD).unwrap_err();
        assert!(
            matches!(&err, StateFileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(err.to_string().contains("qpq-state.bin"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn the_saved_file_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qpq-state.bin");
        save_fast(&path, PLAINTEXT);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    proptest! {
        #[test]
        fn the_header_parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_header(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = parse_header(&with_magic);
        }

        #[test]
        fn arbitrary_edits_never_panic_and_never_open(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..8),
            cut in any::<prop::sample::Index>(),
            shorten in any::<bool>(),
        ) {
            let mut file = fixture().file.clone();
            for (at, mask) in edits {
                let at = at.index(file.len());
                file[at] ^= mask;
            }
            if shorten {
                file.truncate(cut.index(file.len()));
            }
            // Two edits of the same byte can cancel out.
            prop_assume!(file != fixture().file);
            prop_assert!(open_fast(&file).is_err());
        }

        #[test]
        fn any_plaintext_round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let file = fixture().key.seal(&plaintext, &mut OsRng).unwrap();
            prop_assert_eq!(open_fast(&file).unwrap(), plaintext);
        }
    }
}
