//! `qpq-server backup DEST` and `qpq-server restore SRC`: a fjall server's
//! whole state in one file, and back.
//!
//! A backup is a point-in-time snapshot of the database's records
//! ([`FjallSnapshot`]: every turn of the service task whole or not at all,
//! so a queue's counters agree with its messages) together with every
//! regular file of the data directory besides the database and the admin
//! socket — the generated TLS certificate and private key among them, so
//! the fingerprint clients pin survives a restore. While a server runs it
//! holds the database's lock, so the command asks it over its admin socket
//! ([`admin`]) and the server streams the backup; with no server there the
//! command opens the database itself. Either way the same code writes the
//! file ([`format::Writer`] over the snapshot, walked with
//! [`KeyOrder`] as `migrate` walks a store), and the command checks what
//! the server streamed as [`format::Reader`] reads it.
//!
//! Files are written whole or not at all: the backup goes to a temporary
//! file (mode 0600) beside DEST, is synced, and takes DEST's name only when
//! complete — without `--force`, never over an existing file.
//!
//! A restore changes nothing before it has read the whole backup and
//! checked its magic, version, structure and checksum, and refuses while a
//! server holds the database's lock, or — without `--force` — when the data
//! directory already holds a database or a file that differs from the
//! backup's copy. It then builds the database in `qpq.db.restoring` in the
//! data directory, reads it back and compares it with the backup, writes
//! the files beside their places, and swaps everything in with renames:
//! what it replaces is kept aside as `<name>.before-restore-<unix time>`.

pub mod admin;
pub mod format;

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use quicproquo_core::limits::{
    BACKUP_CHUNK_BYTES_MAX, BACKUP_FILE_BYTES_MAX, BACKUP_FILE_NAME_BYTES_MAX, BACKUP_FILES_MAX,
    BACKUP_RECORDS_PER_CHUNK,
};
use quicproquo_core::node::FORMAT_VERSION;
use quicproquo_core::store::{Batch, Store, StoreError};
use sha2::{Digest, Sha256};

pub use admin::AdminSocket;
pub use format::{DataFile, FormatError, Header, Reader, Totals, Writer};

use crate::config::{DB_DIR_NAME, ServerConfig, Storage};
use crate::store::fjall_store::{FjallSnapshot, FjallStore};
use crate::store::{KeyOrder, ShellStore, StorageError};

/// Name of the running server's admin socket in its data directory.
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackedUp {
    /// The backup file.
    pub dest: PathBuf,
    /// Where the snapshot came from.
    pub source: Source,
    /// Its records and size.
    pub totals: Totals,
    /// Files of the data directory it carries.
    pub files: usize,
}

/// Where a backup's snapshot came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The running server, over its admin socket.
    Server(PathBuf),
    /// The database of a stopped server, opened by the command.
    Database(PathBuf),
}

impl fmt::Display for BackedUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.source {
            Source::Server(socket) => format!("the running server ({})", socket.display()),
            Source::Database(db) => format!("the database {}", db.display()),
        };
        write!(
            f,
            "backed up {} records ({} bytes) and {} files from {source} to {} ({} bytes",
            self.totals.records,
            self.totals.record_bytes,
            self.files,
            self.dest.display(),
            self.totals.bytes,
        )?;
        if self.files > 0 {
            f.write_str(
                "; the data directory's files, the TLS private key among them: keep it safe",
            )?;
        }
        f.write_str(")")
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The database it built.
    pub db: PathBuf,
    /// The backup's records and size.
    pub totals: Totals,
    /// Files of the data directory it wrote.
    pub files: usize,
    /// Unix time of the backup's snapshot, seconds.
    pub taken_at: u64,
    /// What it replaced, kept aside under these names.
    pub kept_aside: Vec<PathBuf>,
}

impl fmt::Display for Restored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restored {} records ({} bytes) and {} files of a snapshot taken at Unix time {} \
             into {}, read back and compared",
            self.totals.records,
            self.totals.record_bytes,
            self.files,
            self.taken_at,
            self.db.display(),
        )?;
        if !self.kept_aside.is_empty() {
            let kept: Vec<String> = self
                .kept_aside
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            write!(f, "; kept aside: {}", kept.join(", "))?;
        }
        Ok(())
    }
}

/// Why a backup or a restore did not happen. Nothing was changed, except
/// where a variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// `storage = "postgres"`: nothing of qpq-server's to back up.
    #[error(
        "storage = \"postgres\": the server's state is in PostgreSQL, and qpq-server backs up \
         only its embedded database; back PostgreSQL up with its own tools (pg_dump, or base \
         backups with WAL archiving)"
    )]
    Postgres,
    /// `storage = "postgres"`: nothing of qpq-server's to restore.
    #[error(
        "storage = \"postgres\": qpq-server restores only its embedded database; restore \
         PostgreSQL with its own tools (pg_restore, or psql for a plain pg_dump)"
    )]
    PostgresRestore,
    /// No database where the configuration says.
    #[error("no database at {}: nothing to back up (is data_dir right?)", .0.display())]
    NoDatabase(PathBuf),
    /// DEST exists and `--force` was not given.
    #[error("{} exists; pass --force to replace it", .0.display())]
    DestExists(PathBuf),
    /// DEST is in the data directory.
    #[error(
        "{} is in the data directory, where every later backup would carry it; write it \
         elsewhere",
        .0.display()
    )]
    DestInDataDir(PathBuf),
    /// A server holds the database but does not answer on its socket.
    #[error(
        "database {} is in use by a running qpq-server, and no server answers on {}: is it an \
         older qpq-server, or one with another data_dir? Stop it, and the backup reads the \
         database itself",
        db.display(),
        socket.display()
    )]
    NoAdminSocket {
        /// The database.
        db: PathBuf,
        /// Where its socket should be.
        socket: PathBuf,
    },
    /// The server answered with an error.
    #[error("the server refused the backup: {0}")]
    Refused(String),
    /// The server's stream ended before the backup did.
    #[error(
        "the backup streamed over {} ended early, at byte {offset}: did the server stop? (see \
         its log)",
        socket.display()
    )]
    CutShort {
        /// The socket.
        socket: PathBuf,
        /// Bytes received.
        offset: u64,
    },
    /// Bytes that are not a backup this build reads (or the server's
    /// stream cut short).
    #[error("{what}: {error}")]
    Format {
        /// Whose bytes.
        what: String,
        /// What is wrong with them.
        error: FormatError,
    },
    /// The data directory holds what a backup cannot carry.
    #[error("data directory {}: {what}", dir.display())]
    DataDir {
        /// The directory.
        dir: PathBuf,
        /// What.
        what: String,
    },
    /// A server holds the database's lock.
    #[error(
        "a qpq-server is running on {} (it holds the database's lock); stop it before restoring",
        .0.display()
    )]
    ServerRunning(PathBuf),
    /// The data directory holds a database and `--force` was not given.
    #[error(
        "{} already holds a database; pass --force to restore over it (the old one is kept \
         aside as {}.before-restore-<unix time>)",
        .0.parent().unwrap_or(Path::new(".")).display(),
        .0.display()
    )]
    DatabaseExists(PathBuf),
    /// A file the backup carries exists with other contents and `--force`
    /// was not given.
    #[error(
        "{} exists and differs from the backup's copy; pass --force to replace it (the old \
         one is kept aside as {}.before-restore-<unix time>)",
        .0.display(),
        .0.display()
    )]
    FileExists(PathBuf),
    /// The backup carries a file under a name the data directory reserves.
    #[error("the backup carries a file named {0:?}, a name the data directory reserves")]
    ReservedName(String),
    /// The name that would keep something aside is taken.
    #[error("{} exists already; restore again in a second", .0.display())]
    AsideTaken(PathBuf),
    /// Another restore is building its database.
    #[error("another restore is building {}", .0.display())]
    RestoreRunning(PathBuf),
    /// The backup's store is of a newer format than this build reads.
    #[error(
        "the backup holds a store of format {found}, and this qpq-server reads format \
         {supported} and older: restore it with a newer qpq-server"
    )]
    NewerStore {
        /// The backup's store format.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The backup file changed between the check and the build.
    #[error("{} changed while it was restored; nothing was replaced", .0.display())]
    SourceChanged(PathBuf),
    /// The database built differs from the backup.
    #[error(
        "the database built from the backup reads back differently ({0}); nothing was replaced"
    )]
    ReadBack(String),
    /// A file operation failed.
    #[error("{what} {}: {error}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// To which path.
        path: PathBuf,
        /// Why it failed.
        error: io::Error,
    },
    /// Opening, writing or reading a database failed.
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// Writing or reading the database being built failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// `qpq-server backup DEST`: writes a backup of the server `config`
/// describes to `dest`, over its admin socket if it runs, else from its
/// database (see the module's description).
pub fn backup(config: &ServerConfig, dest: &Path, force: bool) -> Result<BackedUp, BackupError> {
    let Storage::Fjall = config.storage else {
        return Err(BackupError::Postgres);
    };
    let data_dir = &config.data_dir;
    if !force && fs::symlink_metadata(dest).is_ok() {
        return Err(BackupError::DestExists(dest.to_path_buf()));
    }
    let parent = parent_dir(dest);
    if let (Ok(a), Ok(b)) = (fs::canonicalize(&parent), fs::canonicalize(data_dir))
        && a == b
    {
        return Err(BackupError::DestInDataDir(dest.to_path_buf()));
    }
    let socket = data_dir.join(ADMIN_SOCKET_NAME);
    let db = config.db_path();
    let temp = TempFile::create(dest)?;
    let out = BufWriter::new(temp.file()?);
    let (totals, files, source) = match admin::request_backup(&socket)? {
        Some(stream) => {
            // Check the stream as it is copied: a backup cut short or
            // damaged on the way never takes DEST's name.
            let failed = |error| match error {
                FormatError::Truncated { offset } => BackupError::CutShort {
                    socket: socket.clone(),
                    offset,
                },
                error => BackupError::Format {
                    what: format!("the backup streamed over {}", socket.display()),
                    error,
                },
            };
            let tee = Tee {
                input: stream,
                copy: out,
            };
            let (mut reader, header) = Reader::open(tee).map_err(failed)?;
            while reader.next_record().map_err(failed)?.is_some() {}
            (reader.totals(), header.files.len(), Source::Server(socket))
        }
        None => {
            if !db.is_dir() {
                return Err(BackupError::NoDatabase(db));
            }
            let store = FjallStore::open(&db).map_err(|e| match e {
                StorageError::Locked { .. } => BackupError::NoAdminSocket {
                    db: db.clone(),
                    socket: socket.clone(),
                },
                e => BackupError::Storage(e),
            })?;
            let snapshot = store.reader().snapshot();
            let files = data_files(data_dir)?;
            let (out, totals) = write_records(out, unix_now(), &files, &snapshot)?;
            out.into_inner()
                .map_err(|e| io_error("writing", temp.path())(e.into_error()))?;
            (totals, files.len(), Source::Database(db))
        }
    };
    temp.commit(dest, force)?;
    Ok(BackedUp {
        dest: dest.to_path_buf(),
        source,
        totals,
        files,
    })
}

/// `qpq-server restore SRC`: restores the backup at `src` into the data
/// directory `config` names (see the module's description).
pub fn restore(config: &ServerConfig, src: &Path, force: bool) -> Result<Restored, BackupError> {
    let Storage::Fjall = config.storage else {
        return Err(BackupError::PostgresRestore);
    };
    let data_dir = &config.data_dir;
    let db = config.db_path();
    // Held until the swap is done: no server starts on the old database
    // meanwhile.
    let _lock = lock_database(&db)?;
    let db_exists = fs::symlink_metadata(&db).is_ok();
    if db_exists && !force {
        return Err(BackupError::DatabaseExists(db));
    }
    let open = || -> io::Result<(BufReader<File>, u64)> {
        let file = File::open(src)?;
        let len = file.metadata()?.len();
        Ok((BufReader::with_capacity(READ_BUFFER_BYTES, file), len))
    };
    let what = || format!("backup {}", src.display());
    let (input, _) = open().map_err(io_error("opening", src))?;
    let (header, totals, checksum) =
        format::verify(input, open).map_err(|error| BackupError::Format {
            what: what(),
            error,
        })?;

    // What the restore will replace, refused without --force.
    let stamp = unix_now();
    let aside = |path: &Path| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".before-restore-{stamp}"));
        PathBuf::from(name)
    };
    let mut plan = Vec::new();
    for file in &header.files {
        let name = OsStr::from_bytes(&file.name);
        if reserved(name) {
            return Err(BackupError::ReservedName(file.display_name()));
        }
        let path = data_dir.join(name);
        let replace = match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error("reading", &path)(e)),
            Ok(meta) if meta.is_file() && meta.len() == file.contents.len() as u64 => {
                fs::read(&path).map_err(io_error("reading", &path))? != file.contents
            }
            Ok(_) => true,
        };
        if replace && !force {
            return Err(BackupError::FileExists(path));
        }
        plan.push((file, path, replace));
    }
    let mut replaced: Vec<&Path> = plan
        .iter()
        .filter(|(_, _, replace)| *replace)
        .map(|(_, path, _)| path.as_path())
        .collect();
    if db_exists {
        replaced.push(&db);
    }
    for path in replaced {
        let kept = aside(path);
        if fs::symlink_metadata(&kept).is_ok() {
            return Err(BackupError::AsideTaken(kept));
        }
    }

    // Build beside the database, then swap.
    fs::create_dir_all(data_dir).map_err(io_error("creating", data_dir))?;
    let mut building = Building::start(&db)?;
    let (input, _) = open().map_err(io_error("opening", src))?;
    build(input, &building.db, checksum, src)?;
    for (file, path, _) in &plan {
        let temp = temp_name(path);
        write_file(&temp, &file.contents, file.mode)?;
        building.files.push(temp);
    }
    let mut kept_aside = Vec::new();
    if db_exists {
        let kept = aside(&db);
        fs::rename(&db, &kept).map_err(io_error("keeping aside", &db))?;
        kept_aside.push(kept);
    }
    if let Err(e) = fs::rename(&building.db, &db) {
        // Put the old database back where it was.
        if let Some(kept) = kept_aside.pop() {
            let _ = fs::rename(kept, &db);
        }
        return Err(io_error("moving the restored database to", &db)(e));
    }
    for (_, path, replace) in &plan {
        if *replace {
            let kept = aside(path);
            fs::rename(path, &kept).map_err(io_error("keeping aside", path))?;
            kept_aside.push(kept);
        }
        fs::rename(temp_name(path), path).map_err(io_error("restoring", path))?;
    }
    building.done();
    sync_dir(data_dir)?;
    Ok(Restored {
        db,
        totals,
        files: plan.len(),
        taken_at: header.taken_at,
        kept_aside,
    })
}

/// Writes a backup of `files` and the records of `snapshot` to `out`, and
/// returns `out` and what was written.
pub fn write_records<W: Write>(
    out: W,
    taken_at: u64,
    files: &[DataFile],
    snapshot: &FjallSnapshot,
) -> Result<(W, Totals), BackupError> {
    let format = |error| BackupError::Format {
        what: "writing the backup".into(),
        error,
    };
    let mut writer = Writer::start(out, taken_at, files).map_err(format)?;
    let mut walk = KeyOrder::new(BACKUP_RECORDS_PER_CHUNK, |after, n| {
        snapshot.scan(after, n, BACKUP_CHUNK_BYTES_MAX)
    });
    while let Some(records) = walk.next_chunk()? {
        for (key, value) in &records {
            writer.record(key, value).map_err(format)?;
        }
    }
    writer.finish().map_err(format)
}

/// The regular files of `data_dir` a backup carries: every one besides
/// the database and the admin socket, in name order. Symbolic links and
/// directories are left out.
pub fn data_files(data_dir: &Path) -> Result<Vec<DataFile>, BackupError> {
    let refuse = |what: String| BackupError::DataDir {
        dir: data_dir.to_path_buf(),
        what,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(data_dir).map_err(io_error("reading", data_dir))? {
        let entry = entry.map_err(io_error("reading", data_dir))?;
        let name = entry.file_name();
        let path = entry.path();
        if name == DB_DIR_NAME || name == ADMIN_SOCKET_NAME {
            continue;
        }
        // Not followed: a link's metadata.
        let meta = entry.metadata().map_err(io_error("reading", &path))?;
        if !meta.is_file() {
            continue;
        }
        if files.len() == BACKUP_FILES_MAX {
            return Err(refuse(format!(
                "more than {BACKUP_FILES_MAX} files; a backup carries at most that many"
            )));
        }
        if name.len() > BACKUP_FILE_NAME_BYTES_MAX {
            return Err(refuse(format!("the file name {name:?} is too long")));
        }
        let mut contents = Vec::new();
        File::open(&path)
            .and_then(|f| {
                f.take(BACKUP_FILE_BYTES_MAX as u64 + 1)
                    .read_to_end(&mut contents)
            })
            .map_err(io_error("reading", &path))?;
        if contents.len() > BACKUP_FILE_BYTES_MAX {
            return Err(refuse(format!(
                "{} has more than {BACKUP_FILE_BYTES_MAX} bytes, more than a backup carries; \
                 move it out of the data directory",
                path.display()
            )));
        }
        files.push(DataFile {
            name: name.as_bytes().to_vec(),
            mode: meta.permissions().mode() & 0o7777,
            contents,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// The time now, in seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Turns an I/O error on `path` into a [`BackupError::Io`].
pub(crate) fn io_error(what: &'static str, path: &Path) -> impl Fn(io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |error| BackupError::Io {
        what,
        path: path.clone(),
        error,
    }
}

/// Builds the database at `db` from the backup `input` (read from `src`),
/// whose checksum must be `checksum`, then reads it back and compares.
fn build(input: impl Read, db: &Path, checksum: [u8; 32], src: &Path) -> Result<(), BackupError> {
    let format = |error| BackupError::Format {
        what: format!("backup {}", src.display()),
        error,
    };
    let mut store = FjallStore::open(db)?;
    let (mut reader, _) = Reader::open(input).map_err(format)?;
    let mut written = RecordDigest::default();
    let mut batch = Batch::new();
    let (mut records, mut bytes) = (0usize, 0usize);
    while let Some((key, value)) = reader.next_record().map_err(format)? {
        if key == VERSION_KEY
            && let Ok(found) = <[u8; 4]>::try_from(value.as_slice()).map(u32::from_be_bytes)
            && found > FORMAT_VERSION
        {
            return Err(BackupError::NewerStore {
                found,
                supported: FORMAT_VERSION,
            });
        }
        written.add(&key, &value);
        records += 1;
        bytes += key.len() + value.len();
        batch.put(key, value);
        if records == BACKUP_RECORDS_PER_CHUNK || bytes >= BACKUP_CHUNK_BYTES_MAX {
            store.write(std::mem::take(&mut batch))?;
            (records, bytes) = (0, 0);
        }
    }
    if reader.checksum() != Some(checksum) {
        return Err(BackupError::SourceChanged(src.to_path_buf()));
    }
    store.write(batch)?;
    store.sync_handle().sync_blocking()?;
    let snapshot = store.reader().snapshot();
    let mut read = RecordDigest::default();
    let mut walk = KeyOrder::new(BACKUP_RECORDS_PER_CHUNK, |after, n| {
        snapshot.scan(after, n, BACKUP_CHUNK_BYTES_MAX)
    });
    while let Some(chunk) = walk.next_chunk()? {
        for (key, value) in &chunk {
            read.add(key, value);
        }
    }
    if read.records != written.records {
        return Err(BackupError::ReadBack(format!(
            "{} records, the backup holds {}",
            read.records, written.records
        )));
    }
    if read.hasher.finalize() != written.hasher.finalize() {
        return Err(BackupError::ReadBack("a key or value differs".into()));
    }
    Ok(())
}

/// A digest of records in order, to compare two sequences of them.
#[derive(Default)]
struct RecordDigest {
    hasher: Sha256,
    records: u64,
}

impl RecordDigest {
    fn add(&mut self, key: &[u8], value: &[u8]) {
        self.hasher.update((key.len() as u64).to_be_bytes());
        self.hasher.update(key);
        self.hasher.update((value.len() as u64).to_be_bytes());
        self.hasher.update(value);
        self.records += 1;
    }
}

/// A restore in the making: its database directory and the files written
/// beside their places, removed if it does not finish.
struct Building {
    db: PathBuf,
    files: Vec<PathBuf>,
    done: bool,
}

impl Building {
    /// Claims `<db>.restoring`, removing one a restore that did not finish
    /// left behind.
    fn start(db: &Path) -> Result<Building, BackupError> {
        let building = temp_name(db);
        if fs::symlink_metadata(&building).is_ok() {
            let lock = lock_database(&building).map_err(|e| match e {
                BackupError::ServerRunning(p) => BackupError::RestoreRunning(p),
                e => e,
            })?;
            drop(lock);
            fs::remove_dir_all(&building).map_err(io_error("removing", &building))?;
        }
        Ok(Building {
            db: building,
            files: Vec::new(),
            done: false,
        })
    }

    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = fs::remove_dir_all(&self.db);
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// Takes the lock fjall keeps on `<db>/lock` while a database is open:
/// `None` if there is no such file, [`BackupError::ServerRunning`] if a
/// process holds it.
fn lock_database(db: &Path) -> Result<Option<File>, BackupError> {
    let path = db.join("lock");
    let file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("opening", &path)(e)),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Err(BackupError::ServerRunning(db.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(io_error("locking", &path)(e)),
    }
}

/// Names in the data directory a backup may not carry a file under.
fn reserved(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    name == DB_DIR_NAME
        || name == ADMIN_SOCKET_NAME
        || bytes.ends_with(TEMP_SUFFIX.as_bytes())
        || bytes
            .windows(ASIDE_INFIX.len())
            .any(|w| w == ASIDE_INFIX.as_bytes())
}

/// Where a restore writes what will take `path`'s place.
fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMP_SUFFIX);
    PathBuf::from(name)
}

/// Writes `contents` to a new file at `path` with `mode`, synced.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), BackupError> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("creating", path))?;
    file.write_all(contents)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all())
        .map_err(io_error("writing", path))
}

/// The directory `path` is in.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Syncs a directory, so the renames in it are durable.
fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("syncing", dir))
}

/// A backup file in the making: `.<name>.tmp-<pid>` beside it, mode 0600,
/// removed unless it is committed.
struct TempFile {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    fn create(dest: &Path) -> Result<TempFile, BackupError> {
        let name = dest
            .file_name()
            .ok_or_else(|| io_error("writing", dest)(io::ErrorKind::InvalidInput.into()))?;
        let mut temp = std::ffi::OsString::from(".");
        temp.push(name);
        temp.push(format!(".tmp-{}", std::process::id()));
        let path = parent_dir(dest).join(temp);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("creating", &path))?;
        Ok(TempFile {
            path,
            file,
            committed: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self) -> Result<File, BackupError> {
        self.file
            .try_clone()
            .map_err(io_error("writing", &self.path))
    }

    /// Syncs the file and gives it `dest`'s name: over an existing file
    /// only if `force`.
    fn commit(mut self, dest: &Path, force: bool) -> Result<(), BackupError> {
        self.file
            .sync_all()
            .map_err(io_error("syncing", &self.path))?;
        if force {
            fs::rename(&self.path, dest).map_err(io_error("renaming to", dest))?;
        } else {
            // A hard link never replaces an existing file.
            match fs::hard_link(&self.path, dest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(BackupError::DestExists(dest.to_path_buf()));
                }
                Err(e) => return Err(io_error("linking to", dest)(e)),
            }
            let _ = fs::remove_file(&self.path);
        }
        self.committed = true;
        sync_dir(&parent_dir(dest))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Copies what is read from `input` to `copy`.
struct Tee<R, W> {
    input: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        if n == 0 {
            self.copy.flush()?;
        }
        Ok(n)
    }
}

/// Key of the machine's format version record (a `u32`, big-endian):
/// a restore refuses a store newer than this build reads before it
/// replaces anything.
const VERSION_KEY: &[u8] = &[0x00];

/// What a restore appends to a name while it builds what will replace it.
const TEMP_SUFFIX: &str = ".restoring";

/// What a restore puts in the name of what it keeps aside.
const ASIDE_INFIX: &str = ".before-restore-";

/// Bytes read from a backup file at a time.
const READ_BUFFER_BYTES: usize = 256 * 1024;
