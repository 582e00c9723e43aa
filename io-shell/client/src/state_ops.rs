//! Whole-file operations on a state file, for `qpq export`, `qpq import`
//! and `qpq passwd`: a file is read and checked without its password
//! ([`Sealed`]), opened with it ([`Opened`]), then written elsewhere as it
//! is, installed as a state file, or sealed again under a new password.
//!
//! An export is the state file itself, byte for byte: the state file holds
//! everything an identity needs (keys, groups, contacts, queue cursors),
//! and the files next to it (`<state>.lock`, `<state>.sock`) exist only
//! while a command or session runs.
//!
//! Invariants:
//! - What is written is what was checked: [`Opened::write_to`] writes the
//!   very bytes that opened with the password and whose client state
//!   restored, and [`change_password`] seals the very plaintext they held.
//! - Nothing is written for a file that does not open: a wrong password,
//!   a file that is not a state file, truncated or modified, or of a newer
//!   format or state layout than this build reads fails before any write.
//! - Every write is atomic ([`state_file::write`]); a file at the target
//!   is replaced only when the caller says so.
//! - A state file is replaced only under its [`StateLock`], taken only
//!   while no session (`qpq recv --stream`, `qpq daemon`) has the file
//!   open ([`lock_idle`]): a session keeps its own key and would write its
//!   state over the change.
//! - A state replaced by [`install`] is first kept aside as
//!   `<state>.bak`, and an earlier one kept there is never overwritten.

use std::io;
use std::path::{Path, PathBuf};

use quicproquo_core::client::{ClientMachine, CommandError, STATE_VERSION, StateError};
use quicproquo_core::types::IdentityKey;
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::daemon;
use crate::state_file::{self, Existing, KdfParams, StateFileError, StateKey, StateLock};

/// Why a state file could not be exported, imported or sealed again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateOpError {
    /// There is no file at the path.
    #[error("no state file at {}", .0.display())]
    Missing(PathBuf),
    /// The file is not a state file this build opens with the password
    /// (wrong password, truncated or modified, a newer format, ...), or
    /// reading or writing it failed.
    #[error("{}: {error}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: StateFileError,
    },
    /// The file opened, but the client state in it has a layout version
    /// this build does not read.
    #[error(
        "{}: the state inside has layout version {found}, but this qpq reads only up to version {supported}; upgrade qpq",
        path.display()
    )]
    NewerLayout {
        /// The file.
        path: PathBuf,
        /// The layout version in the file.
        found: u32,
        /// The newest layout version this build reads.
        supported: u32,
    },
    /// The file opened, but the client state in it does not restore.
    #[error("{}: the state inside does not restore: {reason}", path.display())]
    Unrestorable {
        /// The file.
        path: PathBuf,
        /// Why it does not.
        reason: String,
    },
    /// A file is at the target and was not to be replaced.
    #[error("{} exists already", .0.display())]
    Exists(PathBuf),
    /// The state to be replaced cannot be kept aside: an earlier one is
    /// kept there.
    #[error(
        "{} exists already (a state kept aside by an earlier import); move it elsewhere first",
        .0.display()
    )]
    BackupExists(PathBuf),
    /// A session has the state file open.
    #[error(
        "{} is open in a qpq session (`recv --stream` or `daemon`); stop the session first",
        .0.display()
    )]
    InUse(PathBuf),
}

/// Who has a state file, as [`lock_or_session`] found it.
#[derive(Debug)]
pub enum Held {
    /// This process: its lock.
    Locked(StateLock),
    /// A session (`recv --stream`, `daemon`) answering on this socket.
    Session(PathBuf),
}

/// Takes the lock of the state file at `state`, waiting for a one-shot
/// command that holds it; while a session holds it instead, names the
/// socket the session answers on.
pub fn lock_or_session(state: &Path) -> Result<Held, StateFileError> {
    if let Some(lock) = StateLock::try_acquire(state)? {
        return Ok(Held::Locked(lock));
    }
    // A session answers on its socket. A socket nobody answers was left by
    // a session that was killed, and the lock is another one-shot
    // command's: wait for it.
    let socket = daemon::socket_path(state);
    #[cfg(unix)]
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Ok(Held::Session(socket));
    }
    StateLock::acquire(state).map(Held::Locked)
}

/// As [`lock_or_session`], refusing while a session holds the state file.
pub fn lock_idle(state: &Path) -> Result<StateLock, StateOpError> {
    match lock_or_session(state).map_err(|e| StateOpError::file(state, e))? {
        Held::Locked(lock) => Ok(lock),
        Held::Session(_) => Err(StateOpError::InUse(state.to_owned())),
    }
}

/// A state file's bytes whose header checks out, not yet opened.
#[derive(Debug)]
pub struct Sealed {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Sealed {
    /// Reads the file at `path` and checks what can be checked without the
    /// password ([`state_file::check`]), so a file that is not a state file
    /// is refused before anyone is asked for a password.
    pub fn read(path: &Path) -> Result<Sealed, StateOpError> {
        let bytes = state_file::read(path).map_err(|e| match e {
            StateFileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                StateOpError::Missing(path.to_owned())
            }
            e => StateOpError::file(path, e),
        })?;
        state_file::check(&bytes).map_err(|e| StateOpError::file(path, e))?;
        Ok(Sealed {
            path: path.to_owned(),
            bytes,
        })
    }

    /// Opens the file with `password` and restores the client state in it.
    pub fn open(self, password: &[u8]) -> Result<Opened, StateOpError> {
        let plaintext = Zeroizing::new(
            state_file::open(password, &self.bytes)
                .map_err(|e| StateOpError::file(&self.path, e))?,
        );
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let machine = ClientMachine::restore(&plaintext, seed).map_err(|e| match e {
            CommandError::State(StateError::Version(found)) if found > STATE_VERSION => {
                StateOpError::NewerLayout {
                    path: self.path.clone(),
                    found,
                    supported: STATE_VERSION,
                }
            }
            e => StateOpError::Unrestorable {
                path: self.path.clone(),
                reason: e.to_string(),
            },
        })?;
        Ok(Opened {
            identity_key: machine.identity_key(),
            sealed: self,
            plaintext,
        })
    }
}

/// A state file that opened with its password and whose client state
/// restored.
pub struct Opened {
    sealed: Sealed,
    plaintext: Zeroizing<Vec<u8>>,
    identity_key: IdentityKey,
}

impl Opened {
    /// The identity the state belongs to.
    pub fn identity_key(&self) -> IdentityKey {
        self.identity_key
    }

    /// Writes the file, byte for byte as it was read (still sealed under
    /// its password), to `dest`, atomically and readable by its owner only.
    pub fn write_to(&self, dest: &Path, existing: Existing) -> Result<(), StateOpError> {
        state_file::write(dest, &self.sealed.bytes, existing)
            .map_err(|e| StateOpError::file(dest, e))
    }
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("path", &self.sealed.path)
            .field("identity_key", &self.identity_key)
            .finish_non_exhaustive()
    }
}

/// Installs `opened` as the state file at `state`, whose `lock` the caller
/// holds. A file already there is replaced only if `replace`, and is first
/// kept aside as `<state>.bak` ([`backup_path`]), which must not exist.
/// Returns where the replaced file was kept, if one was.
pub fn install(
    opened: &Opened,
    state: &Path,
    lock: &StateLock,
    replace: bool,
) -> Result<Option<PathBuf>, StateOpError> {
    assert!(lock.guards(state), "install needs the lock of {state:?}");
    if !state_file::exists(state) {
        // Refuse: whatever appeared at `state` that is not a regular file
        // is not ours to replace.
        opened.write_to(state, Existing::Refuse)?;
        return Ok(None);
    }
    if !replace {
        return Err(StateOpError::Exists(state.to_owned()));
    }
    let backup = backup_path(state);
    let old = state_file::read(state).map_err(|e| StateOpError::file(state, e))?;
    state_file::write(&backup, &old, Existing::Refuse).map_err(|e| match e {
        StateFileError::Exists { path } => StateOpError::BackupExists(path),
        e => StateOpError::file(&backup, e),
    })?;
    opened.write_to(state, Existing::Replace)?;
    Ok(Some(backup))
}

/// Seals the state of `opened` — the same plaintext — under
/// `new_password` with a fresh salt and nonce and [`KdfParams::RECOMMENDED`],
/// and writes it over the state file at `state`, whose `lock` the caller
/// holds. Afterwards only `new_password` opens it.
pub fn change_password(
    opened: &Opened,
    new_password: &[u8],
    state: &Path,
    lock: &StateLock,
) -> Result<(), StateOpError> {
    assert!(
        lock.guards(state),
        "change_password needs the lock of {state:?}"
    );
    let key = StateKey::derive(new_password, KdfParams::RECOMMENDED, &mut OsRng)
        .map_err(|e| StateOpError::file(state, e))?;
    state_file::save_with_key(state, &key, &opened.plaintext)
        .map_err(|e| StateOpError::file(state, e))
}

/// Where [`install`] keeps the state file it replaces: `<state>.bak`.
pub fn backup_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(BACKUP_SUFFIX);
    PathBuf::from(name)
}

impl StateOpError {
    /// `error` about the file at `path`; a refused replacement becomes
    /// [`StateOpError::Exists`].
    fn file(path: &Path, error: StateFileError) -> StateOpError {
        match error {
            StateFileError::Exists { path } => StateOpError::Exists(path),
            error => StateOpError::File {
                path: path.to_owned(),
                error,
            },
        }
    }
}

/// The name of a replaced state file is the state file's with this
/// appended.
const BACKUP_SUFFIX: &str = ".bak";

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &[u8] = b"correct horse battery staple";

    /// A state file of a new identity at the floor parameters (quick to
    /// open), and its identity key.
    fn state_at(path: &Path) -> IdentityKey {
        let machine = ClientMachine::generate([3; 32]);
        state_file::save_with_params(path, PASSWORD, &machine.snapshot(), KdfParams::FLOOR)
            .unwrap();
        machine.identity_key()
    }

    fn sealed_plaintext(path: &Path, plaintext: &[u8]) {
        let file = state_file::seal(PASSWORD, plaintext, KdfParams::FLOOR, &mut OsRng).unwrap();
        std::fs::write(path, file).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_export_is_the_state_file_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (state, copy) = (dir.path().join("s.bin"), dir.path().join("copy.bin"));
        let key = state_at(&state);
        let opened = Sealed::read(&state).unwrap().open(PASSWORD).unwrap();
        assert_eq!(opened.identity_key(), key);
        opened.write_to(&copy, Existing::Refuse).unwrap();
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(&state).unwrap()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_file_at_the_target_is_kept_unless_replacing() {
        let dir = tempfile::tempdir().unwrap();
        let (state, copy) = (dir.path().join("s.bin"), dir.path().join("copy.bin"));
        state_at(&state);
        std::fs::write(&copy, b"mine").unwrap();
        let opened = Sealed::read(&state).unwrap().open(PASSWORD).unwrap();
        let err = opened.write_to(&copy, Existing::Refuse).unwrap_err();
        assert!(
            matches!(&err, StateOpError::Exists(p) if p == &copy),
            "{err}"
        );
        assert_eq!(std::fs::read(&copy).unwrap(), b"mine");
        assert_eq!(names(dir.path()), ["copy.bin", "s.bin"], "temp file left");
        opened.write_to(&copy, Existing::Replace).unwrap();
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(&state).unwrap()
        );
    }

    #[test]
    fn a_file_that_is_not_a_state_file_is_refused_unopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        for (bytes, want) in [
            (&b"hello, world"[..], "not a qpq state file"),
            (b"QPQST", "truncated"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let err = Sealed::read(&path).unwrap_err();
            assert!(matches!(err, StateOpError::File { .. }), "{err}");
            assert!(err.to_string().contains(want), "{err}");
        }
        let err = Sealed::read(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, StateOpError::Missing(_)), "{err}");
    }

    #[test]
    fn a_newer_state_layout_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        // postcard writes the leading u32 layout version as a varint.
        let newer = u8::try_from(STATE_VERSION + 1).unwrap();
        sealed_plaintext(&path, &[newer, 0, 0, 0]);
        let err = Sealed::read(&path).unwrap().open(PASSWORD).unwrap_err();
        assert!(
            matches!(err, StateOpError::NewerLayout { found, supported, .. }
                if found == STATE_VERSION + 1 && supported == STATE_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade qpq"), "{err}");

        sealed_plaintext(&path, b"\x05garbage");
        let err = Sealed::read(&path).unwrap().open(PASSWORD).unwrap_err();
        assert!(matches!(err, StateOpError::Unrestorable { .. }), "{err}");
    }

    #[test]
    fn install_keeps_the_replaced_state_and_never_overwrites_a_kept_one() {
        let dir = tempfile::tempdir().unwrap();
        let (state, other) = (dir.path().join("s.bin"), dir.path().join("o.bin"));
        state_at(&state);
        let before = std::fs::read(&state).unwrap();
        let machine = ClientMachine::generate([4; 32]);
        state_file::save_with_params(&other, PASSWORD, &machine.snapshot(), KdfParams::FLOOR)
            .unwrap();
        let opened = Sealed::read(&other).unwrap().open(PASSWORD).unwrap();
        let lock = StateLock::acquire(&state).unwrap();

        let err = install(&opened, &state, &lock, false).unwrap_err();
        assert!(matches!(err, StateOpError::Exists(_)), "{err}");
        assert_eq!(std::fs::read(&state).unwrap(), before);

        let kept = install(&opened, &state, &lock, true).unwrap();
        assert_eq!(kept, Some(backup_path(&state)));
        assert_eq!(std::fs::read(backup_path(&state)).unwrap(), before);
        assert_eq!(
            std::fs::read(&state).unwrap(),
            std::fs::read(&other).unwrap()
        );

        // A second replacement would lose the first one kept: refused.
        let again = Sealed::read(&other).unwrap().open(PASSWORD).unwrap();
        let err = install(&again, &state, &lock, true).unwrap_err();
        assert!(matches!(err, StateOpError::BackupExists(_)), "{err}");
        assert_eq!(std::fs::read(backup_path(&state)).unwrap(), before);

        let fresh = dir.path().join("fresh.bin");
        let lock = StateLock::acquire(&fresh).unwrap();
        assert_eq!(install(&opened, &fresh, &lock, false).unwrap(), None);
        drop(lock);
        assert_eq!(
            names(dir.path()),
            ["fresh.bin", "o.bin", "s.bin", "s.bin.bak", "s.bin.lock"]
        );
    }

    #[test]
    fn a_new_password_opens_the_same_state_and_the_old_one_no_longer_does() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s.bin");
        let key = state_at(&state);
        let plaintext = state_file::load(&state, PASSWORD).unwrap();
        let opened = Sealed::read(&state).unwrap().open(PASSWORD).unwrap();
        let lock = StateLock::acquire(&state).unwrap();
        change_password(&opened, b"new password", &state, &lock).unwrap();
        drop(lock);
        assert_eq!(
            state_file::load(&state, b"new password").unwrap(),
            plaintext
        );
        let err = Sealed::read(&state).unwrap().open(PASSWORD).unwrap_err();
        assert!(err.to_string().contains("wrong password"), "{err}");
        let again = Sealed::read(&state).unwrap().open(b"new password").unwrap();
        assert_eq!(again.identity_key(), key);
    }

    #[cfg(unix)]
    #[test]
    fn a_session_holding_the_state_is_named_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("s.bin");
        let held = StateLock::acquire(&state).unwrap();
        let _session = std::os::unix::net::UnixListener::bind(daemon::socket_path(&state)).unwrap();
        let err = lock_idle(&state).unwrap_err();
        assert!(matches!(err, StateOpError::InUse(_)), "{err}");
        assert!(matches!(
            lock_or_session(&state).unwrap(),
            Held::Session(s) if s == daemon::socket_path(&state)
        ));
        drop(held);
        assert!(lock_idle(&state).unwrap().guards(&state));
    }
}
