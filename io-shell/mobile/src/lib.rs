//! quicproquo for Android and iOS apps: the long-lived client
//! [`quicproquo_client::Session`] behind a UniFFI interface, from which
//! Kotlin, Swift and Python bindings are generated (`regen.sh`).
//!
//! What the foreign side sees:
//! - [`Session`]: `create` / `open` a state file, then register, groups
//!   (create, add, remove, leave, update, list, members, safety number),
//!   send (text, reply, edit, delete, file), contacts, `close`. Events
//!   (messages, membership, delivery, connection) go to an
//!   [`EventListener`] the app implements.
//! - [`sync_once`]: for a push-triggered background wake on a phone,
//!   which cannot hold a long-poll open: open the state, fetch what is
//!   pending (events to the listener), send what waits, save, close.
//! - [`QpqError`]: every failure, typed (wrong password, server
//!   unreachable, fingerprint mismatch, unknown group, ...).
//!
//! Threads. Every call blocks its caller until done (call from a
//! background thread or dispatcher, never an app's UI thread) and may be
//! made from any thread, several at once. The work runs on one tokio
//! runtime for the process ([`RUNTIME_THREADS`] threads). Each session
//! hands its events to its listener on a thread of its own, one event at
//! a time and in order; the listener may call the session, but a listener
//! that blocks holds up that session once [`EVENTS_BUFFERED`] events wait.
//!
//! Panics. UniFFI turns a panic in a call into an internal error on the
//! foreign side instead of unwinding into it; beyond that, nothing here
//! panics on input: every argument is checked and refused with a
//! [`QpqError`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use quicproquo_client::{
    ConnectProblem, ServerTrust, Session as Inner, SessionConfig, SessionError,
};
use quicproquo_core::ErrorKind;
use quicproquo_core::client::{self as core, CommandError, Content, ContentId, Outcome};
use quicproquo_core::types::{IdentityKey, hex};
use tokio::sync::mpsc;

pub use quicproquo_client::EVENTS_BUFFERED;

uniffi::setup_scaffolding!();

/// Threads of the process-wide runtime all sessions run on.
pub const RUNTIME_THREADS: usize = 2;
/// The most a [`sync_once`] may be given to finish, in milliseconds.
pub const SYNC_TIMEOUT_MS_MAX: u64 = 10 * 60 * 1_000;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("qpq-mobile")
            .enable_all()
            .build()
            // Without threads or a timer there is no client at all; this
            // happens only when the OS refuses to start threads.
            .expect("the qpq runtime starts")
    })
}

/// Runs `work` on the runtime and waits for it. Safe from any thread,
/// runtime threads and the listener's thread included (it never enters
/// the runtime from inside it, which would panic).
fn block_on<T: Send + 'static>(
    work: impl Future<Output = Result<T, QpqError>> + Send + 'static,
) -> Result<T, QpqError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(work.await);
    });
    rx.recv().unwrap_or_else(|_| {
        Err(QpqError::Internal {
            detail: "the call's task stopped without an answer".into(),
        })
    })
}

/// Every failure a call can report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum QpqError {
    /// The password does not open the state file (or the file was
    /// modified).
    #[error("wrong password, or the state file was modified")]
    WrongPassword,
    /// The password is empty.
    #[error("the password is empty")]
    EmptyPassword,
    /// There is no state file at the path.
    #[error("no state file at {path}")]
    NoStateFile {
        /// The path.
        path: String,
    },
    /// The state file is damaged, not a state file, or of a newer format.
    #[error("the state file at {path} cannot be used: {detail}")]
    BadStateFile {
        /// The path.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A state file exists already where a new identity was to be made.
    #[error("{path} exists already; it holds an identity")]
    IdentityExists {
        /// The path.
        path: String,
    },
    /// Another session or `qpq` command has the state file.
    #[error("{path} is in use by another session")]
    StateInUse {
        /// The path.
        path: String,
    },
    /// An argument is malformed (a key, an id, a fingerprint, a count).
    #[error("invalid {what}: {detail}")]
    InvalidArgument {
        /// Which argument.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The server presented a certificate other than the pinned one: a
    /// wrong fingerprint in the settings, or someone in between.
    #[error("server certificate fingerprint mismatch: expected {expected}, got {got}")]
    FingerprintMismatch {
        /// The pinned fingerprint (64 hex digits).
        expected: String,
        /// The fingerprint of the certificate presented.
        got: String,
    },
    /// The server cannot be reached (or refuses this identity); what was
    /// asked for that needs it is kept and goes out later.
    #[error("server unreachable: {detail}")]
    ServerUnreachable {
        /// Why.
        detail: String,
    },
    /// The server refused a request (a limit, a rate, its disk full).
    #[error("the server refused ({kind}): {detail}")]
    ServerRefused {
        /// Its error kind (`QueueFull`, `Unavailable`,
        /// `RateLimited { retry_after_ms: 100 }`, ...).
        kind: String,
        /// Its message.
        detail: String,
    },
    /// No group has that name.
    #[error("no group named {name}")]
    UnknownGroup {
        /// The name.
        name: String,
    },
    /// A group with that name exists already.
    #[error("a group named {name} exists already")]
    GroupExists {
        /// The name.
        name: String,
    },
    /// No contact has that name.
    #[error("no contact named {name}")]
    UnknownContact {
        /// The name.
        name: String,
    },
    /// The identity is already in the group, or is not in it.
    #[error("{detail}")]
    Membership {
        /// Which.
        detail: String,
    },
    /// The identity has no KeyPackage (or, for a pq group, no hybrid key)
    /// on the server: they need to register.
    #[error("{detail}")]
    NotRegistered {
        /// Who, and what is missing.
        detail: String,
    },
    /// The command was refused for another reason (a name or text too
    /// long, a tampered key, an MLS failure).
    #[error("{detail}")]
    Refused {
        /// Why.
        detail: String,
    },
    /// Saving the state failed; the session stopped.
    #[error("saving the state failed: {detail}")]
    Persist {
        /// Why.
        detail: String,
    },
    /// The session is closed.
    #[error("the session is closed")]
    Closed,
    /// The call did not finish within its time.
    #[error("not finished within {ms} ms")]
    Timeout {
        /// The time it had.
        ms: u64,
    },
    /// A fault of this library (a bug); the message says where.
    #[error("internal error: {detail}")]
    Internal {
        /// What happened.
        detail: String,
    },
}

impl QpqError {
    fn invalid(what: &str, detail: impl Into<String>) -> QpqError {
        QpqError::InvalidArgument {
            what: what.to_owned(),
            detail: detail.into(),
        }
    }

    /// A session error in the foreign terms; `problem` is why the last
    /// connection failed, which names a refusal for want of a server.
    fn of(e: SessionError, problem: Option<ConnectProblem>) -> QpqError {
        use quicproquo_client::state_file::StateFileError;
        match e {
            SessionError::State { path, source } => {
                let path = path.display().to_string();
                match source {
                    StateFileError::WrongPassword => QpqError::WrongPassword,
                    StateFileError::EmptyPassword => QpqError::EmptyPassword,
                    StateFileError::Io { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        QpqError::NoStateFile { path }
                    }
                    other => QpqError::BadStateFile {
                        path,
                        detail: other.to_string(),
                    },
                }
            }
            SessionError::Exists(path) => QpqError::IdentityExists {
                path: path.display().to_string(),
            },
            SessionError::InUse(path) => QpqError::StateInUse {
                path: path.display().to_string(),
            },
            SessionError::EmptyPassword => QpqError::EmptyPassword,
            SessionError::Restore(e) => QpqError::BadStateFile {
                path: String::new(),
                detail: e.to_string(),
            },
            SessionError::Command(e) => QpqError::of_command(e, problem),
            SessionError::Persist(detail) => QpqError::Persist { detail },
            SessionError::Closed => QpqError::Closed,
            other => QpqError::Internal {
                detail: other.to_string(),
            },
        }
    }

    fn of_command(e: CommandError, problem: Option<ConnectProblem>) -> QpqError {
        let detail = e.to_string();
        match e {
            CommandError::Server(s) if s.kind == ErrorKind::Unavailable => match problem {
                Some(p) => QpqError::of_problem(p),
                None => QpqError::ServerRefused {
                    kind: format!("{:?}", s.kind),
                    detail: s.message.into_owned(),
                },
            },
            CommandError::Server(s) => QpqError::ServerRefused {
                kind: format!("{:?}", s.kind),
                detail: s.message.into_owned(),
            },
            CommandError::UnknownGroup(name) => QpqError::UnknownGroup { name },
            CommandError::GroupExists(name) => QpqError::GroupExists { name },
            CommandError::UnknownContact(name) => QpqError::UnknownContact { name },
            CommandError::AlreadyMember(_) | CommandError::NotMember(_) => {
                QpqError::Membership { detail }
            }
            CommandError::NoKeyPackage(_)
            | CommandError::NoHybridKey(_)
            | CommandError::NoOwnHybridKey => QpqError::NotRegistered { detail },
            _ => QpqError::Refused { detail },
        }
    }

    fn of_problem(p: ConnectProblem) -> QpqError {
        match p {
            ConnectProblem::FingerprintMismatch { expected, got } => {
                QpqError::FingerprintMismatch {
                    expected: hex(&expected),
                    got: hex(&got),
                }
            }
            ConnectProblem::Refused(detail) | ConnectProblem::Unreachable(detail) => {
                QpqError::ServerUnreachable { detail }
            }
            other => QpqError::ServerUnreachable {
                detail: format!("{other:?}"),
            },
        }
    }
}

/// Where a session's state lives and which server it talks to.
#[derive(Debug, Clone, uniffi::Record)]
pub struct SessionSettings {
    /// The encrypted state file (in the app's private storage).
    pub state_path: String,
    /// The server, as `host:port`.
    pub server: String,
    /// The server certificate's SHA-256 fingerprint, 64 hex digits
    /// (colons allowed), as `qpq-server` prints it; or `None` with
    /// `server_ca_path`.
    pub server_fingerprint: Option<String>,
    /// A PEM file of CA certificates the server's certificate is issued
    /// by; or `None` with `server_fingerprint`.
    pub server_ca_path: Option<String>,
}

impl SessionSettings {
    fn config(&self) -> Result<SessionConfig, QpqError> {
        let trust = match (&self.server_fingerprint, &self.server_ca_path) {
            (Some(fp), None) => ServerTrust::fingerprint_hex(fp)
                .map_err(|e| QpqError::invalid("server_fingerprint", e.to_string()))?,
            (None, Some(ca)) => ServerTrust::CaFile(PathBuf::from(ca)),
            _ => {
                return Err(QpqError::invalid(
                    "settings",
                    "give exactly one of server_fingerprint and server_ca_path",
                ));
            }
        };
        if self.state_path.is_empty() {
            return Err(QpqError::invalid("state_path", "empty"));
        }
        Ok(SessionConfig {
            state: PathBuf::from(&self.state_path),
            server: self.server.clone(),
            trust,
            direct: None,
        })
    }
}

/// A file a message carries.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Attachment {
    /// Its media type (`type/subtype`), as the sender says.
    pub media_type: String,
    /// Its file name, as the sender says (no path).
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl From<core::Attachment> for Attachment {
    fn from(a: core::Attachment) -> Attachment {
        Attachment {
            media_type: a.media_type,
            name: a.name,
            data: a.data,
        }
    }
}

/// What happens in a session, as its listener hears it. Identity keys are
/// 64 hex digits, message ids 32; names and texts are as the peer sent
/// them (an app escapes them for its own display).
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum SessionEvent {
    /// A message from a group member.
    Message {
        /// The group's name.
        group: String,
        /// Who sent it.
        sender: String,
        /// The sender's contact name, if this user gave them one.
        sender_name: Option<String>,
        /// What it says (an attachment's file name for a file).
        text: String,
        /// Its seq in this user's queue of the group's channel.
        seq: u64,
        /// The sender's clock when it was made (Unix ms), as they say.
        sent_at_ms: Option<u64>,
        /// Its id, which replies, edits and deletions refer to.
        id: Option<String>,
        /// The message it answers.
        reply_to: Option<String>,
        /// The file it carries.
        attachment: Option<Attachment>,
    },
    /// A member's new text for an earlier message of theirs.
    Edited {
        /// The group's name.
        group: String,
        /// Who edited.
        sender: String,
        /// The message edited.
        target: String,
        /// Its new text.
        text: String,
        /// Its seq.
        seq: u64,
    },
    /// A member withdrew an earlier message of theirs.
    Deleted {
        /// The group's name.
        group: String,
        /// Who deleted it.
        sender: String,
        /// The message deleted.
        target: String,
        /// Its seq.
        seq: u64,
    },
    /// This user joined a group from a Welcome.
    Joined {
        /// The group's name.
        group: String,
        /// Members now in it.
        members: u32,
    },
    /// Another member removed this user from a group.
    Removed {
        /// The group's name.
        group: String,
        /// Who removed this user.
        by: String,
    },
    /// `by` added `member`.
    MemberAdded {
        /// The group's name.
        group: String,
        /// The new member.
        member: String,
        /// Who added them.
        by: String,
    },
    /// `by` removed `member`.
    MemberRemoved {
        /// The group's name.
        group: String,
        /// The removed member.
        member: String,
        /// Who removed them.
        by: String,
    },
    /// `member` left.
    MemberLeft {
        /// The group's name.
        group: String,
        /// Who left.
        member: String,
    },
    /// A Commit changed a group.
    GroupChanged {
        /// The group's name.
        group: String,
        /// The new epoch.
        epoch: u64,
        /// Members now in it.
        members: u32,
    },
    /// The server stored this user's message for every other member.
    Delivered {
        /// The group's name.
        group: String,
        /// The delivery's id (32 hex digits).
        message_id: String,
    },
    /// The server returned a KeyPackage that is not the one uploaded.
    Tampering {
        /// What.
        what: String,
    },
    /// Something went wrong that did not stop the session.
    Warning {
        /// What.
        message: String,
    },
    /// The connection to the server is up and authenticated.
    Connected,
    /// The connection failed or broke; the session tries again in
    /// `retry_in_ms`.
    Reconnecting {
        /// Why.
        reason: String,
        /// The pause before the next attempt.
        retry_in_ms: u64,
    },
    /// The session stopped trying until the next command; `permanent`
    /// when retrying cannot help (a wrong fingerprint, a refused
    /// identity).
    Disconnected {
        /// Why.
        reason: String,
        /// Retrying cannot help.
        permanent: bool,
    },
}

fn key_hex(k: &IdentityKey) -> String {
    hex(&k.0)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl From<core::Event> for SessionEvent {
    fn from(e: core::Event) -> SessionEvent {
        use core::Event as E;
        match e {
            E::Message {
                group,
                sender,
                sender_name,
                text,
                seq,
                sent_at_ms,
                id,
                reply_to,
                attachment,
            } => SessionEvent::Message {
                group,
                sender: key_hex(&sender),
                sender_name,
                text,
                seq,
                sent_at_ms,
                id: id.map(|i| i.to_hex()),
                reply_to: reply_to.map(|i| i.to_hex()),
                attachment: attachment.map(Attachment::from),
            },
            E::Edited {
                group,
                sender,
                target,
                text,
                seq,
                ..
            } => SessionEvent::Edited {
                group,
                sender: key_hex(&sender),
                target: target.to_hex(),
                text,
                seq,
            },
            E::Deleted {
                group,
                sender,
                target,
                seq,
                ..
            } => SessionEvent::Deleted {
                group,
                sender: key_hex(&sender),
                target: target.to_hex(),
                seq,
            },
            E::Joined { group, members } => SessionEvent::Joined {
                group,
                members: count(members),
            },
            E::Removed { group, by } => SessionEvent::Removed {
                group,
                by: key_hex(&by),
            },
            E::MemberAdded { group, member, by } => SessionEvent::MemberAdded {
                group,
                member: key_hex(&member),
                by: key_hex(&by),
            },
            E::MemberRemoved { group, member, by } => SessionEvent::MemberRemoved {
                group,
                member: key_hex(&member),
                by: key_hex(&by),
            },
            E::MemberLeft { group, member } => SessionEvent::MemberLeft {
                group,
                member: key_hex(&member),
            },
            E::GroupChanged {
                group,
                epoch,
                members,
            } => SessionEvent::GroupChanged {
                group,
                epoch,
                members: count(members),
            },
            E::Delivered { group, message_id } => SessionEvent::Delivered {
                group,
                message_id: hex(&message_id),
            },
            E::Tampering { what } => SessionEvent::Tampering { what },
            E::Warning { message } => SessionEvent::Warning { message },
            E::Connected => SessionEvent::Connected,
            E::Reconnecting {
                reason,
                retry_in_ms,
            } => SessionEvent::Reconnecting {
                reason,
                retry_in_ms,
            },
            E::Disconnected { reason, permanent } => {
                SessionEvent::Disconnected { reason, permanent }
            }
            // An event of a later core this mapping does not know yet.
            other => SessionEvent::Warning {
                message: format!("{other:?}"),
            },
        }
    }
}

/// Why a listener could not take an event; the session carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, uniffi::Error)]
pub enum ListenerError {
    /// The listener's own failure (an exception it raised).
    #[error("the event listener failed: {detail}")]
    Failed {
        /// What it said.
        detail: String,
    },
}

impl From<uniffi::UnexpectedUniFFICallbackError> for ListenerError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> ListenerError {
        ListenerError::Failed { detail: e.reason }
    }
}

/// What the app implements to hear a session's events. Called on the
/// session's own event thread, one event at a time, in order; an error it
/// returns (or raises) is dropped and the next event still comes.
#[uniffi::export(with_foreign)]
pub trait EventListener: Send + Sync {
    /// One event.
    fn on_event(&self, event: SessionEvent) -> Result<(), ListenerError>;
}

/// Hands `events` to `listener` on a thread of its own until the session
/// ends (the channel closes).
fn dispatch(
    mut events: mpsc::Receiver<core::Event>,
    listener: Option<Arc<dyn EventListener>>,
) -> Result<std::thread::JoinHandle<()>, QpqError> {
    std::thread::Builder::new()
        .name("qpq-events".into())
        .spawn(move || {
            while let Some(e) = events.blocking_recv() {
                if let Some(l) = &listener {
                    // A failing listener loses only its own event.
                    let _ = l.on_event(SessionEvent::from(e));
                }
            }
        })
        .map_err(|e| QpqError::Internal {
            detail: format!("starting the event thread: {e}"),
        })
}

/// A group, as [`Session::groups`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct GroupInfo {
    /// Its name.
    pub name: String,
    /// Its current epoch.
    pub epoch: u64,
    /// Every member (64 hex digits each), this user included.
    pub members: Vec<String>,
    /// Post-quantum (hybrid) group.
    pub pq: bool,
    /// Changes and messages of this user the server has not taken yet.
    pub waiting: u32,
}

/// A member of a group, as [`Session::members`] lists them.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Member {
    /// Their identity key, 64 hex digits.
    pub key: String,
    /// Their contact name, if this user gave them one.
    pub name: Option<String>,
    /// This user.
    pub is_self: bool,
}

/// A named contact.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Contact {
    /// The name.
    pub name: String,
    /// Their identity key, 64 hex digits.
    pub key: String,
}

/// What [`Session::register`] did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Registration {
    /// KeyPackages uploaded and confirmed.
    pub uploaded: u32,
    /// Already on the server before.
    pub already: u32,
    /// Refused or tampered with.
    pub failed: u32,
}

/// A message handed to the session.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Sent {
    /// Its id (32 hex digits), for replies, edits and deletions.
    pub id: String,
    /// Members the server stored it for already.
    pub delivered: u32,
    /// Deliveries still waiting in the outbox (they go out by themselves;
    /// [`SessionEvent::Delivered`] says when).
    pub undelivered: u32,
}

/// A group's safety number at an epoch: equal on every member's device
/// when nobody is in between.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SafetyNumber {
    /// The epoch; only numbers of one epoch compare.
    pub epoch: u64,
    /// Sixty digits.
    pub digits: String,
    /// The digits in groups of five, for reading aloud.
    pub grouped: String,
}

/// What [`sync_once`] did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncReport {
    /// Messages, edits and deletions handed to the listener.
    pub messages: u32,
    /// Events of any kind handed to the listener.
    pub events: u32,
}

/// A running client: one identity, one state file, one connection that
/// receives continuously.
#[derive(Debug, uniffi::Object)]
pub struct Session {
    inner: Arc<Inner>,
    events: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Session {
    fn started(
        inner: Inner,
        events: mpsc::Receiver<core::Event>,
        listener: Option<Arc<dyn EventListener>>,
    ) -> Result<Session, QpqError> {
        let inner = Arc::new(inner);
        let thread = match dispatch(events, listener) {
            Ok(t) => t,
            Err(e) => {
                let s = inner.clone();
                let _ = block_on(async move { s.close().await.map_err(|e| QpqError::of(e, None)) });
                return Err(e);
            }
        };
        Ok(Session {
            inner,
            events: Mutex::new(Some(thread)),
        })
    }

    /// Creates (`create`) or opens the state file and starts a session.
    fn begin(
        settings: &SessionSettings,
        password: String,
        listener: Option<Arc<dyn EventListener>>,
        create: bool,
    ) -> Result<Session, QpqError> {
        let config = settings.config()?;
        let (inner, events) = block_on(async move {
            let started = if create {
                Inner::create_with_events(config, &password).await
            } else {
                Inner::open_with_events(config, &password).await
            };
            started.map_err(|e| QpqError::of(e, None))
        })?;
        Session::started(inner, events, listener)
    }

    /// Runs `call` on the session and maps its error.
    fn run<T: Send + 'static, F>(&self, call: impl FnOnce(Arc<Inner>) -> F) -> Result<T, QpqError>
    where
        F: Future<Output = Result<T, SessionError>> + Send + 'static,
    {
        let inner = self.inner.clone();
        let work = call(inner.clone());
        block_on(async move {
            work.await
                .map_err(|e| QpqError::of(e, inner.connect_problem()))
        })
    }

    fn group_of(&self, name: &str) -> Result<core::GroupSummary, QpqError> {
        self.run(|s| async move { s.groups().await })?
            .into_iter()
            .find(|g| g.name == name)
            .ok_or_else(|| QpqError::UnknownGroup {
                name: name.to_owned(),
            })
    }

    fn command(&self, command: core::Command) -> Result<Outcome, QpqError> {
        self.run(|s| async move { s.command(command).await })
    }

    fn send_content(&self, group: String, content: Content) -> Result<Sent, QpqError> {
        match self.command(core::Command::SendContent { group, content })? {
            Outcome::Sent {
                id,
                delivered,
                undelivered,
                ..
            } => Ok(Sent {
                id: id.to_hex(),
                delivered,
                undelivered,
            }),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(outcome: &Outcome) -> QpqError {
    QpqError::Internal {
        detail: format!("unexpected outcome {outcome:?}"),
    }
}

fn parse_key(what: &str, key: &str) -> Result<IdentityKey, QpqError> {
    IdentityKey::from_hex(key.trim()).ok_or_else(|| QpqError::invalid(what, "not 64 hex digits"))
}

fn parse_id(what: &str, id: &str) -> Result<ContentId, QpqError> {
    ContentId::from_hex(id.trim()).ok_or_else(|| QpqError::invalid(what, "not 32 hex digits"))
}

#[uniffi::export]
impl Session {
    /// Makes a new identity in a new state file and opens a session on it.
    /// The password derives the state file's key (Argon2id, slow on
    /// purpose).
    #[uniffi::constructor]
    pub fn create(
        settings: SessionSettings,
        password: String,
        listener: Option<Arc<dyn EventListener>>,
    ) -> Result<Arc<Session>, QpqError> {
        Session::begin(&settings, password, listener, true).map(Arc::new)
    }

    /// Opens an existing state file; from now on the session connects,
    /// receives and delivers in the background, and `listener` hears
    /// every event from the first.
    #[uniffi::constructor]
    pub fn open(
        settings: SessionSettings,
        password: String,
        listener: Option<Arc<dyn EventListener>>,
    ) -> Result<Arc<Session>, QpqError> {
        Session::begin(&settings, password, listener, false).map(Arc::new)
    }

    /// This user's identity key, 64 hex digits: what others add.
    pub fn identity_key(&self) -> String {
        key_hex(&self.inner.identity_key())
    }

    /// Whether the connection to the server is up now.
    pub fn is_connected(&self) -> Result<bool, QpqError> {
        self.run(|s| async move { s.is_connected().await })
    }

    /// Makes sure at least `count` single-use KeyPackages (at most
    /// [`quicproquo_core::limits::REGISTER_COUNT_MAX`]; more count as that),
    /// a last-resort one and the hybrid key are on the server, so others
    /// can add this user.
    pub fn register(&self, count: u32) -> Result<Registration, QpqError> {
        match self.command(core::Command::Register { count })? {
            Outcome::Registered {
                uploaded,
                already,
                failed,
            } => Ok(Registration {
                uploaded,
                already,
                failed,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a group with this user alone in it; `pq` makes it a
    /// post-quantum (hybrid) group.
    pub fn create_group(&self, name: String, pq: bool) -> Result<(), QpqError> {
        self.command(core::Command::CreateGroup { name, pq })
            .map(drop)
    }

    /// Adds `member` (64 hex digits) to `group`.
    pub fn add_member(&self, group: String, member: String) -> Result<(), QpqError> {
        let member = parse_key("member", &member)?;
        self.command(core::Command::AddMember { group, member })
            .map(drop)
    }

    /// Removes `member` (64 hex digits) from `group`.
    pub fn remove_member(&self, group: String, member: String) -> Result<(), QpqError> {
        let member = parse_key("member", &member)?;
        self.command(core::Command::RemoveMember { group, member })
            .map(drop)
    }

    /// Leaves `group`.
    pub fn leave(&self, group: String) -> Result<(), QpqError> {
        self.command(core::Command::Leave { group }).map(drop)
    }

    /// Rotates this user's keys in `group`, or in every group (and the
    /// hybrid key) when `None`; returns the groups whose epoch advanced.
    pub fn update(&self, group: Option<String>) -> Result<Vec<String>, QpqError> {
        match self.command(core::Command::Update { group })? {
            Outcome::Updated { groups, .. } => Ok(groups),
            other => Err(unexpected(&other)),
        }
    }

    /// This user's groups.
    pub fn groups(&self) -> Result<Vec<GroupInfo>, QpqError> {
        let groups = self.run(|s| async move { s.groups().await })?;
        Ok(groups
            .into_iter()
            .map(|g| GroupInfo {
                name: g.name,
                epoch: g.epoch,
                members: g.members.iter().map(key_hex).collect(),
                pq: g.pq,
                waiting: count(g.waiting),
            })
            .collect())
    }

    /// The members of `group`, with their contact names.
    pub fn members(&self, group: String) -> Result<Vec<Member>, QpqError> {
        let g = self.group_of(&group)?;
        let contacts = self.run(|s| async move { s.contacts().await })?;
        let me = self.inner.identity_key();
        Ok(g.members
            .iter()
            .map(|k| Member {
                key: key_hex(k),
                name: contacts
                    .iter()
                    .find(|(_, c)| c == k)
                    .map(|(n, _)| n.clone()),
                is_self: *k == me,
            })
            .collect())
    }

    /// The safety number of `group` at its current epoch.
    pub fn safety_number(&self, group: String) -> Result<SafetyNumber, QpqError> {
        let name = group.clone();
        self.run(|s| async move { s.safety_number(&group).await })?
            .map(|n| SafetyNumber {
                epoch: n.epoch,
                grouped: n.grouped(),
                digits: n.digits,
            })
            .ok_or(QpqError::UnknownGroup { name })
    }

    /// Sends `text` to every other member of `group`.
    pub fn send(&self, group: String, text: String) -> Result<Sent, QpqError> {
        self.send_content(group, Content::text(text))
    }

    /// Sends `text` as a reply to the message `reply_to` (32 hex digits).
    pub fn send_reply(
        &self,
        group: String,
        text: String,
        reply_to: String,
    ) -> Result<Sent, QpqError> {
        let reply_to = Some(parse_id("reply_to", &reply_to)?);
        self.send_content(group, Content::Text { text, reply_to })
    }

    /// Replaces the text of this user's earlier message `target`.
    pub fn edit(&self, group: String, target: String, text: String) -> Result<Sent, QpqError> {
        let target = parse_id("target", &target)?;
        self.send_content(group, Content::Edit { target, text })
    }

    /// Withdraws this user's earlier message `target`.
    pub fn delete(&self, group: String, target: String) -> Result<Sent, QpqError> {
        let target = parse_id("target", &target)?;
        self.send_content(group, Content::Delete { target })
    }

    /// Sends a file.
    pub fn send_file(&self, group: String, attachment: Attachment) -> Result<Sent, QpqError> {
        let attachment = core::Attachment {
            media_type: attachment.media_type,
            name: attachment.name,
            data: attachment.data,
        };
        self.send_content(
            group,
            Content::Attachment {
                attachment,
                reply_to: None,
            },
        )
    }

    /// This user's contacts, by name.
    pub fn contacts(&self) -> Result<Vec<Contact>, QpqError> {
        let contacts = self.run(|s| async move { s.contacts().await })?;
        Ok(contacts
            .into_iter()
            .map(|(name, key)| Contact {
                name,
                key: key_hex(&key),
            })
            .collect())
    }

    /// Names the identity `key` (64 hex digits) `name`.
    pub fn add_contact(&self, name: String, key: String) -> Result<(), QpqError> {
        let key = parse_key("key", &key)?;
        self.command(core::Command::AddContact { name, key })
            .map(drop)
    }

    /// Forgets the contact `name`.
    pub fn remove_contact(&self, name: String) -> Result<(), QpqError> {
        self.command(core::Command::RemoveContact { name })
            .map(drop)
    }

    /// Fetches what is pending now, waiting up to `wait_ms` if nothing is;
    /// returns the messages shown (the listener hears them). The session
    /// receives by itself; this is for an app that wants a definite
    /// round, as on coming back to the foreground.
    pub fn receive(&self, wait_ms: u64) -> Result<u32, QpqError> {
        let wait_ms = wait_ms.min(SYNC_TIMEOUT_MS_MAX);
        match self.command(core::Command::Receive { wait_ms })? {
            Outcome::Received { messages } => Ok(messages),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the session: the state is saved, the connection closed, and
    /// every event is handed to the listener before this returns.
    /// Deliveries still in the outbox go out with the next session. Any
    /// later call is [`QpqError::Closed`].
    pub fn close(&self) -> Result<(), QpqError> {
        let r = self.run(|s| async move { s.close().await });
        let thread = self.events.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
        r
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session the app forgot to close still saves its state.
        if self.events.lock().is_ok_and(|t| t.is_some()) {
            let inner = self.inner.clone();
            runtime().spawn(async move {
                let _ = inner.close().await;
            });
        }
    }
}

/// For a push-triggered background wake: opens the state file, fetches
/// everything pending (the listener hears it), sends what waits in the
/// outbox, saves and closes, all within `timeout_ms` (at most
/// [`SYNC_TIMEOUT_MS_MAX`]). What arrived while no session ran is
/// delivered here. If the server cannot be reached in time, the error
/// says why (unreachable, fingerprint mismatch) and nothing is lost: what
/// was fetched is saved, and the rest waits on the server.
#[uniffi::export]
pub fn sync_once(
    settings: SessionSettings,
    password: String,
    timeout_ms: u64,
    listener: Option<Arc<dyn EventListener>>,
) -> Result<SyncReport, QpqError> {
    let timeout_ms = timeout_ms.min(SYNC_TIMEOUT_MS_MAX);
    let counted = Arc::new(Counter::default());
    let listener: Arc<dyn EventListener> = Arc::new(Counting {
        counted: counted.clone(),
        inner: listener,
    });
    let session = Session::begin(&settings, password, Some(listener), false)?;
    let received = session.run(move |s| async move {
        let wait = Duration::from_millis(timeout_ms);
        tokio::time::timeout(wait, s.command(core::Command::Receive { wait_ms: 0 }))
            .await
            .unwrap_or(Err(SessionError::Closed))
    });
    // A fetch refused for want of a connection ends the round too: the
    // last connection attempt failing (none succeeding since) is the
    // error, as is the timeout.
    // A round that timed out without a connection had no server.
    let problem = session.inner.connect_problem();
    let received = match (received, problem) {
        (Err(QpqError::Closed) | Ok(_), Some(p)) => Err(QpqError::of_problem(p)),
        (Err(QpqError::Closed), None) if !session.is_connected().unwrap_or(false) => {
            Err(QpqError::ServerUnreachable {
                detail: format!("no connection within {timeout_ms} ms"),
            })
        }
        (Err(QpqError::Closed), None) => Err(QpqError::Timeout { ms: timeout_ms }),
        (other, _) => other,
    };
    let closed = session.close();
    received?;
    closed?;
    Ok(SyncReport {
        messages: counted.messages.load(std::sync::atomic::Ordering::Relaxed),
        events: counted.events.load(std::sync::atomic::Ordering::Relaxed),
    })
}

#[derive(Debug, Default)]
struct Counter {
    messages: std::sync::atomic::AtomicU32,
    events: std::sync::atomic::AtomicU32,
}

/// Counts what [`sync_once`] hands to the app's listener.
struct Counting {
    counted: Arc<Counter>,
    inner: Option<Arc<dyn EventListener>>,
}

impl EventListener for Counting {
    fn on_event(&self, event: SessionEvent) -> Result<(), ListenerError> {
        use std::sync::atomic::Ordering::Relaxed;
        if matches!(
            event,
            SessionEvent::Message { .. }
                | SessionEvent::Edited { .. }
                | SessionEvent::Deleted { .. }
        ) {
            self.counted.messages.fetch_add(1, Relaxed);
        }
        self.counted.events.fetch_add(1, Relaxed);
        match &self.inner {
            Some(l) => l.on_event(event),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(fingerprint: Option<&str>, ca: Option<&str>) -> SessionSettings {
        SessionSettings {
            state_path: "state.qpq".into(),
            server: "127.0.0.1:7000".into(),
            server_fingerprint: fingerprint.map(str::to_owned),
            server_ca_path: ca.map(str::to_owned),
        }
    }

    #[test]
    fn a_panic_in_a_call_comes_back_as_an_internal_error() {
        let r: Result<(), QpqError> = block_on(async { panic!("a bug in a call") });
        assert!(matches!(r, Err(QpqError::Internal { .. })), "{r:?}");
        // The runtime carries on.
        assert_eq!(block_on(async { Ok(7) }), Ok(7));
    }

    #[test]
    fn settings_take_exactly_one_way_of_trusting_the_server() {
        let fp = "ab".repeat(32);
        assert!(settings(Some(&fp), None).config().is_ok());
        assert!(settings(None, Some("ca.pem")).config().is_ok());
        for bad in [
            settings(None, None),
            settings(Some(&fp), Some("ca.pem")),
            settings(Some("12:34"), None),
            settings(Some(&"g".repeat(64)), None),
        ] {
            assert!(
                matches!(bad.config(), Err(QpqError::InvalidArgument { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_refusal_for_want_of_a_server_is_named_by_the_connection_problem() {
        let refused = || {
            CommandError::Server(quicproquo_core::ServiceError::unavailable(
                "server unreachable: x",
            ))
        };
        let mismatch = ConnectProblem::FingerprintMismatch {
            expected: [1; 32],
            got: [2; 32],
        };
        assert_eq!(
            QpqError::of_command(refused(), Some(mismatch)),
            QpqError::FingerprintMismatch {
                expected: "01".repeat(32),
                got: "02".repeat(32),
            }
        );
        assert!(matches!(
            QpqError::of_command(
                refused(),
                Some(ConnectProblem::Unreachable("timeout".into()))
            ),
            QpqError::ServerUnreachable { .. }
        ));
        // The server's own `unavailable` (its disk full) is its refusal.
        assert!(matches!(
            QpqError::of_command(refused(), None),
            QpqError::ServerRefused { .. }
        ));
        assert_eq!(
            QpqError::of_command(CommandError::UnknownGroup("g".into()), None),
            QpqError::UnknownGroup { name: "g".into() }
        );
    }

    #[test]
    fn keys_and_ids_are_checked() {
        assert!(parse_key("member", &"ab".repeat(32)).is_ok());
        assert!(parse_key("member", "ab").is_err());
        assert!(parse_id("target", &"cd".repeat(16)).is_ok());
        assert!(parse_id("target", &"cd".repeat(32)).is_err());
    }
}
