//! The running server's admin socket, `<data_dir>/admin.sock`, through
//! which `qpq-server backup` gets a consistent backup while the server
//! serves (the server holds the database's lock, so no other process can
//! open it).
//!
//! The socket is made in a private directory (mode 0700), set to 0600 and
//! then moved into place, so no other user can connect at any moment; one
//! left by a server that did not stop cleanly is replaced (the caller holds
//! the database's lock, so no live server owns it), and it is removed when
//! the server stops. A connection from a user other than the socket's owner
//! (or root) is closed unanswered.
//!
//! The protocol is one request line, [`REQUEST_BACKUP`], answered by the
//! backup itself ([`super::format`]) — the server takes a snapshot when the
//! request arrives and streams it — or by one line starting with
//! [`ERROR_PREFIX`]. At most [`ADMIN_BACKUPS_MAX`] backups stream at once;
//! a request beyond it is answered "a backup is already running". Each
//! connection is served on a blocking thread (fjall reads block), at most
//! [`ADMIN_CONNECTIONS_MAX`] at once (one more is closed unanswered),
//! bounded in time by [`ADMIN_REQUEST_TIMEOUT`] for the request and
//! [`BACKUP_STALL_TIMEOUT`] for every write of the answer; stopping the
//! socket shuts its connections down, which ends a backup in progress
//! (the command reports it as cut short).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use quicproquo_core::limits::{
    ADMIN_BACKUPS_MAX, ADMIN_CONNECTIONS_MAX, ADMIN_ERROR_BYTES_MAX, ADMIN_REQUEST_BYTES_MAX,
    ADMIN_REQUEST_TIMEOUT, BACKUP_STALL_TIMEOUT,
};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::format::{MAGIC, read_up_to};
use super::{ADMIN_SOCKET_NAME, BackupError, data_files, io_error, unix_now, write_records};
use crate::store::fjall_store::FjallReader;

/// The request for a backup: the only one there is.
pub const REQUEST_BACKUP: &[u8] = b"qpq-admin/1 backup\n";

/// How an answer that is not a backup starts; the rest of the line says
/// why.
pub const ERROR_PREFIX: &[u8] = b"qpq-admin/1 error: ";

/// A running admin socket. [`AdminSocket::stop`] ends it.
#[derive(Debug)]
pub struct AdminSocket {
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl AdminSocket {
    /// Listens on `<data_dir>/admin.sock` (see the module's description)
    /// and serves backups of the database `reader` reads. Call from inside
    /// a tokio runtime, after the database was opened (so no other server
    /// owns a socket there).
    pub fn start(data_dir: &Path, reader: FjallReader) -> Result<AdminSocket, BackupError> {
        let path = data_dir.join(ADMIN_SOCKET_NAME);
        let listener = bind_private(&path).map_err(io_error("binding the admin socket", &path))?;
        let owner = std::fs::metadata(&path)
            .map_err(io_error("reading", &path))?
            .uid();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept(
            listener,
            owner,
            reader,
            data_dir.to_path_buf(),
            stopped,
        ));
        tracing::debug!(path = %path.display(), "admin socket listening");
        Ok(AdminSocket { path, stop, task })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, cuts a backup in progress short, waits for its
    /// thread and removes the socket.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A backup as a server streams it.
pub type BackupStream = io::Chain<io::Cursor<[u8; MAGIC.len()]>, UnixStream>;

/// Asks the server listening on `socket` for a backup: `None` if no server
/// listens there (no socket, or one a stopped server left), else the
/// backup as the server streams it.
pub fn request_backup(socket: &Path) -> Result<Option<BackupStream>, BackupError> {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io_error("connecting to", socket)(e)),
    };
    let failed = io_error("talking to the server over", socket);
    stream
        .set_read_timeout(Some(BACKUP_STALL_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(ADMIN_REQUEST_TIMEOUT)))
        .and_then(|()| stream.write_all(REQUEST_BACKUP))
        .map_err(&failed)?;
    let mut first = [0u8; MAGIC.len()];
    let got = read_up_to(&mut stream, &mut first).map_err(&failed)?;
    if got == first.len() && first == MAGIC {
        return Ok(Some(io::Cursor::new(first).chain(stream)));
    }
    let mut answer = first[..got].to_vec();
    if got == first.len() && !answer.ends_with(b"\n") {
        BufReader::new((&mut stream).take(ADMIN_ERROR_BYTES_MAX as u64))
            .read_until(b'\n', &mut answer)
            .map_err(&failed)?;
    }
    let why = match answer.strip_prefix(ERROR_PREFIX) {
        Some(why) => String::from_utf8_lossy(why).trim().to_owned(),
        None if answer.is_empty() => {
            "the server closed the connection without answering (see its log)".into()
        }
        None => "the server's answer is not a backup".into(),
    };
    Err(BackupError::Refused(why))
}

/// Accepts connections until `stopped`, each served on a blocking thread.
async fn accept(
    listener: tokio::net::UnixListener,
    owner: u32,
    reader: FjallReader,
    data_dir: PathBuf,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(ADMIN_BACKUPS_MAX));
    // The connections being served, with a handle on each one's socket to
    // cut it short on stop; at most ADMIN_CONNECTIONS_MAX.
    let mut running: Vec<(JoinHandle<()>, UnixStream)> = Vec::new();
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: not a reason to spin.
                    tracing::warn!(error = %e, "admin socket: accept failed");
                    tokio::time::sleep(ACCEPT_FAILED_PAUSE).await;
                    continue;
                }
            },
        };
        running.retain(|(task, _)| !task.is_finished());
        match stream.peer_cred() {
            Ok(peer) if peer.uid() == owner || peer.uid() == 0 => {}
            peer => {
                tracing::warn!(
                    uid = ?peer.map(|p| p.uid()),
                    "admin socket: a connection from another user, closed"
                );
                continue;
            }
        }
        if running.len() >= ADMIN_CONNECTIONS_MAX {
            tracing::warn!("admin socket: too many connections; one closed unanswered");
            continue;
        }
        // Blocking from here on: fjall's reads block, and so may the
        // stream's reads and writes (each bounded in time).
        let (stream, handle) = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            let handle = s.try_clone()?;
            Ok((s, handle))
        }) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: connection unusable");
                continue;
            }
        };
        let (reader, data_dir, slots) = (reader.clone(), data_dir.clone(), slots.clone());
        let task = tokio::task::spawn_blocking(move || {
            serve_connection(stream, &slots, &reader, &data_dir);
        });
        running.push((task, handle));
    }
    for (_, handle) in &running {
        let _ = handle.shutdown(Shutdown::Both);
    }
    for (task, _) in running {
        let _ = task.await;
    }
}

/// Answers one connection: reads its request and streams a backup if one
/// of `slots` is free, or answers why not. Failures are logged; the
/// client sees the stream end early.
fn serve_connection(stream: UnixStream, slots: &Semaphore, reader: &FjallReader, data_dir: &Path) {
    let mut request = Vec::new();
    let read = stream
        .set_read_timeout(Some(ADMIN_REQUEST_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(BACKUP_STALL_TIMEOUT)))
        .and_then(|()| {
            BufReader::new(&stream)
                .take(ADMIN_REQUEST_BYTES_MAX as u64)
                .read_until(b'\n', &mut request)
        });
    if let Err(e) = read {
        tracing::debug!(error = %e, "admin socket: no request");
        return;
    }
    if request != REQUEST_BACKUP {
        answer_error(&stream, "unknown request");
        return;
    }
    let Ok(_slot) = slots.try_acquire() else {
        answer_error(&stream, "a backup is already running; try again later");
        return;
    };
    let started = Instant::now();
    // The snapshot first: the backup is the database as the request found it.
    let snapshot = reader.snapshot();
    let taken_at = unix_now();
    let files = match data_files(data_dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(error = %e, "backup refused");
            answer_error(&stream, &e.to_string());
            return;
        }
    };
    let out = BufWriter::with_capacity(STREAM_BUFFER_BYTES, &stream);
    match write_records(out, taken_at, &files, &snapshot) {
        Ok((_, totals)) => {
            let _ = stream.shutdown(Shutdown::Write);
            tracing::info!(
                records = totals.records,
                bytes = totals.bytes,
                files = files.len(),
                seconds = started.elapsed().as_secs_f64(),
                "backup streamed over the admin socket"
            );
        }
        Err(e) => tracing::warn!(error = %e, "backup over the admin socket cut short"),
    }
}

/// Answers `why` and ends the connection (the accept loop keeps a handle
/// on the socket, so dropping this one would not).
fn answer_error(stream: &UnixStream, why: &str) {
    let _ = (&*stream).write_all(&error_line(why));
    let _ = stream.shutdown(Shutdown::Both);
}

/// An error answer: the prefix, `why` on one line (bounded), a newline.
fn error_line(why: &str) -> Vec<u8> {
    let mut line = ERROR_PREFIX.to_vec();
    let why = why.replace('\n', " ");
    let room = ADMIN_ERROR_BYTES_MAX.saturating_sub(ERROR_PREFIX.len() + 1);
    let mut end = why.len().min(room);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    line.extend_from_slice(&why.as_bytes()[..end]);
    line.push(b'\n');
    line
}

/// Binds a Unix socket at `path` that only this user can use: made in a
/// private directory (0700), set to 0600, then moved into place over
/// whatever was there.
fn bind_private(path: &Path) -> io::Result<tokio::net::UnixListener> {
    let dir = path.with_extension(format!("sock-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let inner = dir.join("s");
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&dir);
    bound
}

/// How long the socket waits after a failed accept before the next.
const ACCEPT_FAILED_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Bytes the server buffers before each write to the socket.
const STREAM_BUFFER_BYTES: usize = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_line_is_one_bounded_line() {
        let line = error_line("two\nlines");
        assert_eq!(line, b"qpq-admin/1 error: two lines\n");
        let long = error_line(&"é".repeat(ADMIN_ERROR_BYTES_MAX));
        assert!(long.len() <= ADMIN_ERROR_BYTES_MAX);
        assert!(std::str::from_utf8(&long).is_ok());
        assert_eq!(long.last(), Some(&b'\n'));
    }
}
