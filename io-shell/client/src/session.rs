//! A long-lived client: [`Session`] opens the state file once (one key
//! derivation), keeps one connection, receives continuously and reports
//! what happens as [`Event`]s; commands are async methods callable from
//! several tasks at once.
//!
//! One task owns the [`ClientMachine`], its state file and its connection,
//! and runs the loop: it feeds the machine commands (one at a time, in the
//! order they were asked), answers, connection results and timeouts, and
//! carries out its effects — persists (merged, always before the next
//! effect that depends on them), requests (each on its own task),
//! connecting, events. The machine listens ([`ClientMachine::handle_listen`])
//! and reconnects on its own ([`LinkPolicy::KeepTrying`]), so messages
//! arrive and deliveries go out as long as the session is open, whatever
//! command runs. Persist-before-acknowledge and persist-before-show hold
//! exactly as in a one-shot command: an event reaches subscribers only
//! after the state that produced it is written. (One exception, by
//! design: a delivery the server stored leaves the outbox at once, and
//! its [`Event::Delivered`] may come before the write that records it;
//! that write follows within
//! [`quicproquo_core::client::STORED_PERSIST_DELAY`], and a crash before
//! it only sends the copies again, which the server stores once.)
//!
//! Subscribers get every event from the moment they subscribe, in order,
//! through a bounded channel ([`EVENTS_BUFFERED`]); a subscriber that
//! stops reading holds the session up (nothing is dropped), one that is
//! dropped is forgotten.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quicproquo_core::client::{
    ClientMachine, Command, CommandError, Content, Effect, Event, GroupSummary, LinkPolicy,
    Outcome, SafetyNumber,
};
use quicproquo_core::types::IdentityKey;
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use crate::drive::{Clock, Lost, call, connect_failure, lost_reason};
use crate::links::{DirectConfig, Links};
use crate::state_file::{self, KdfParams, StateFileError, StateKey, StateLock};
use crate::{Client, ClientError, ServerTrust, TrustError};

/// Events a subscriber may have unread before the session waits for it.
pub const EVENTS_BUFFERED: usize = 1_024;
/// Commands that may wait for their turn before callers wait to queue
/// more.
pub const COMMANDS_QUEUED: usize = 256;
/// Inputs (answers, queued commands) one round of the session's loop takes
/// before it writes the state and carries out what they caused: one state
/// write serves them all, and the round still ends soon under a flood.
pub const ROUND_INPUTS_MAX: usize = 64;
/// How long [`Session::close`] lets a running command finish.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Where a session's state lives and which server it talks to.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The encrypted state file.
    pub state: PathBuf,
    /// The server, as `host:port`.
    pub server: String,
    /// How the server's certificate is trusted.
    pub trust: ServerTrust,
    /// Direct links to members, if any: where to answer them and how to
    /// reach them. Without, every message goes through the server.
    pub direct: Option<DirectConfig>,
}

/// Why a session could not open or a call on it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The state file does not open (wrong password, damaged, missing).
    #[error("{path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: StateFileError,
    },
    /// A state file exists already where a new identity was to be made.
    #[error("{0} exists already; it holds an identity")]
    Exists(PathBuf),
    /// Another session or `qpq` command has the state file.
    #[error("{0} is in use by another qpq")]
    InUse(PathBuf),
    /// The password is empty.
    #[error("the password is empty")]
    EmptyPassword,
    /// The state does not restore.
    #[error("{0}")]
    Restore(CommandError),
    /// The command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// Writing the state file failed; the session stopped (nothing after
    /// the failed write was carried out).
    #[error("saving the state failed, the session stopped: {0}")]
    Persist(String),
    /// The session is closed.
    #[error("the session is closed")]
    Closed,
}

/// Why the session's last attempt to reach the server failed, typed for
/// callers that act on the kind (a mobile app shows a wrong fingerprint
/// differently from a missing network).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectProblem {
    /// The server presented a certificate other than the pinned one. The
    /// session stops trying until the next command.
    FingerprintMismatch {
        /// The pinned SHA-256.
        expected: [u8; 32],
        /// The SHA-256 of the certificate the server presented.
        got: [u8; 32],
    },
    /// Retrying cannot help: the trust setting is unusable, or the server
    /// refuses this identity. The session stops trying until the next
    /// command.
    Refused(String),
    /// The server could not be reached or the connection broke; the
    /// session tries again.
    Unreachable(String),
}

impl ConnectProblem {
    fn of(e: &ClientError) -> ConnectProblem {
        match e {
            ClientError::Trust(TrustError::FingerprintMismatch { expected, got }) => {
                ConnectProblem::FingerprintMismatch {
                    expected: *expected,
                    got: *got,
                }
            }
            e if e.is_permanent() => ConnectProblem::Refused(e.to_string()),
            e => ConnectProblem::Unreachable(e.to_string()),
        }
    }
}

/// A running client. Cheap to share by reference between tasks; every
/// method may be called from several tasks at once.
#[derive(Debug)]
pub struct Session {
    identity: IdentityKey,
    tx: mpsc::Sender<Call>,
    task: std::sync::Mutex<Option<JoinHandle<Result<(), SessionError>>>>,
    problem: Arc<std::sync::Mutex<Option<ConnectProblem>>>,
    direct_addr: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
}

impl Session {
    /// Makes a new identity in a new state file at `config.state` and opens
    /// a session on it.
    pub async fn create(config: SessionConfig, password: &str) -> Result<Session, SessionError> {
        Ok(Self::create_with_events(config, password).await?.0)
    }

    /// As [`Session::create`], with a subscription taken before the
    /// session starts: it misses no event.
    pub async fn create_with_events(
        config: SessionConfig,
        password: &str,
    ) -> Result<(Session, mpsc::Receiver<Event>), SessionError> {
        if password.is_empty() {
            return Err(SessionError::EmptyPassword);
        }
        let lock = take_lock(&config.state)?;
        if state_file::exists(&config.state) {
            return Err(SessionError::Exists(config.state));
        }
        let path = config.state.clone();
        let password = password.to_owned();
        let (machine, key) = tokio::task::spawn_blocking(move || {
            let machine = ClientMachine::generate(os_seed());
            let key = StateKey::derive(password.as_bytes(), KdfParams::RECOMMENDED, &mut OsRng)?;
            state_file::save_with_key(&path, &key, &machine.snapshot())?;
            Ok::<_, StateFileError>((machine, key))
        })
        .await
        .map_err(|e| SessionError::Persist(e.to_string()))?
        .map_err(|source| SessionError::State {
            path: config.state.clone(),
            source,
        })?;
        Ok(Self::start(config, machine, key, lock))
    }

    /// Opens the state file at `config.state` with `password` (the key is
    /// derived once, here) and starts the session: it connects, receives
    /// and delivers in the background from now on.
    pub async fn open(config: SessionConfig, password: &str) -> Result<Session, SessionError> {
        Ok(Self::open_with_events(config, password).await?.0)
    }

    /// As [`Session::open`], with a subscription taken before the session
    /// starts: it misses no event, not even one from the first fetch.
    pub async fn open_with_events(
        config: SessionConfig,
        password: &str,
    ) -> Result<(Session, mpsc::Receiver<Event>), SessionError> {
        if password.is_empty() {
            return Err(SessionError::EmptyPassword);
        }
        let lock = take_lock(&config.state)?;
        let path = config.state.clone();
        let password = password.to_owned();
        let (plain, key) = tokio::task::spawn_blocking(move || {
            state_file::load_and_keep_key(&path, password.as_bytes())
        })
        .await
        .map_err(|e| SessionError::Persist(e.to_string()))?
        .map_err(|source| SessionError::State {
            path: config.state.clone(),
            source,
        })?;
        let machine = ClientMachine::restore(&plain, os_seed()).map_err(SessionError::Restore)?;
        Ok(Self::start(config, machine, key, lock))
    }

    fn start(
        config: SessionConfig,
        mut machine: ClientMachine,
        key: StateKey,
        lock: StateLock,
    ) -> (Session, mpsc::Receiver<Event>) {
        let identity = machine.identity_key();
        machine.set_link_policy(LinkPolicy::KeepTrying);
        let (tx, rx) = mpsc::channel(COMMANDS_QUEUED);
        let (events_tx, events) = mpsc::channel(EVENTS_BUFFERED);
        let problem = Arc::new(std::sync::Mutex::new(None));
        let direct_addr = Arc::new(std::sync::Mutex::new(None));
        let runner = Runner {
            signing_key: machine.signing_key().clone(),
            machine,
            key,
            config,
            clock: Clock::new(),
            subscribers: vec![events_tx],
            problem: problem.clone(),
            links: None,
            direct_addr: direct_addr.clone(),
            _lock: lock,
        };
        let task = tokio::spawn(runner.run(rx));
        let session = Session {
            identity,
            tx,
            task: std::sync::Mutex::new(Some(task)),
            problem,
            direct_addr,
        };
        (session, events)
    }

    /// This user's identity key.
    pub fn identity_key(&self) -> IdentityKey {
        self.identity
    }

    /// Where this session answers direct links, once its endpoint is
    /// bound (`None` without direct links).
    pub fn direct_addr(&self) -> Option<std::net::SocketAddr> {
        self.direct_addr.lock().ok().and_then(|a| *a)
    }

    /// The members reached directly right now.
    pub async fn direct_links(&self) -> Result<Vec<IdentityKey>, SessionError> {
        self.ask(|reply| {
            Call::Read(Box::new(move |m| {
                let _ = reply.send(m.direct_links());
            }))
        })
        .await
    }

    /// Every event from now on, in order.
    pub async fn subscribe(&self) -> Result<mpsc::Receiver<Event>, SessionError> {
        let (tx, rx) = mpsc::channel(EVENTS_BUFFERED);
        self.ask(|reply| Call::Subscribe(tx, reply)).await?;
        Ok(rx)
    }

    /// Runs a command of the client machine and returns its outcome. It
    /// waits for the commands asked before it. A message or change is
    /// done once it is queued and persisted; [`Event::Delivered`] says when
    /// the server stored a message for everyone.
    pub async fn command(&self, command: Command) -> Result<Outcome, SessionError> {
        let r = self
            .ask(|reply| Call::Command(Box::new(command), reply))
            .await?;
        Ok(r?)
    }

    /// Uploads KeyPackages (and the hybrid key) so others can add this user.
    pub async fn register(&self, count: u32) -> Result<Outcome, SessionError> {
        self.command(Command::Register { count }).await
    }

    /// Creates a group with this user alone in it.
    pub async fn create_group(&self, name: &str, pq: bool) -> Result<Outcome, SessionError> {
        self.command(Command::CreateGroup {
            name: name.to_owned(),
            pq,
        })
        .await
    }

    /// Adds `member` to `group`.
    pub async fn add(&self, group: &str, member: IdentityKey) -> Result<Outcome, SessionError> {
        self.command(Command::AddMember {
            group: group.to_owned(),
            member,
        })
        .await
    }

    /// Removes `member` from `group`.
    pub async fn remove(&self, group: &str, member: IdentityKey) -> Result<Outcome, SessionError> {
        self.command(Command::RemoveMember {
            group: group.to_owned(),
            member,
        })
        .await
    }

    /// Leaves `group`.
    pub async fn leave(&self, group: &str) -> Result<Outcome, SessionError> {
        self.command(Command::Leave {
            group: group.to_owned(),
        })
        .await
    }

    /// Rotates this user's keys in `group`, or in every group (and the
    /// hybrid key) when `None`.
    pub async fn update(&self, group: Option<&str>) -> Result<Outcome, SessionError> {
        self.command(Command::Update {
            group: group.map(str::to_owned),
        })
        .await
    }

    /// Sends `text` to every other member of `group`.
    pub async fn send(&self, group: &str, text: &str) -> Result<Outcome, SessionError> {
        self.command(Command::Send {
            group: group.to_owned(),
            text: text.to_owned(),
        })
        .await
    }

    /// Sends typed content to every other member of `group`: a text with
    /// a reply-to, an edit or a deletion of one's own earlier message, an
    /// attachment.
    pub async fn send_content(
        &self,
        group: &str,
        content: Content,
    ) -> Result<Outcome, SessionError> {
        self.command(Command::SendContent {
            group: group.to_owned(),
            content,
        })
        .await
    }

    /// This user's groups.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, SessionError> {
        self.ask(|reply| {
            Call::Read(Box::new(move |m| {
                let _ = reply.send(m.groups());
            }))
        })
        .await
    }

    /// This user's contacts: (name, key), by name.
    pub async fn contacts(&self) -> Result<Vec<(String, IdentityKey)>, SessionError> {
        self.ask(|reply| {
            Call::Read(Box::new(move |m| {
                let _ = reply.send(m.contacts());
            }))
        })
        .await
    }

    /// The safety number of `group` at its current epoch, to compare with
    /// the other members; `None` if there is no such group.
    pub async fn safety_number(&self, group: &str) -> Result<Option<SafetyNumber>, SessionError> {
        let group = group.to_owned();
        self.ask(|reply| {
            Call::Read(Box::new(move |m| {
                let _ = reply.send(m.safety_number(&group));
            }))
        })
        .await
    }

    /// Whether the connection to the server is up now (later changes come
    /// as events to subscribers).
    pub async fn is_connected(&self) -> Result<bool, SessionError> {
        self.ask(|reply| {
            Call::Read(Box::new(move |m| {
                let _ = reply.send(m.is_connected());
            }))
        })
        .await
    }

    /// Why the last attempt to reach the server failed, if the connection
    /// is not up since; `None` once a connection is made.
    pub fn connect_problem(&self) -> Option<ConnectProblem> {
        self.problem.lock().map_or(None, |p| p.clone())
    }

    /// Names `key` `name` in this user's contacts.
    pub async fn add_contact(&self, name: &str, key: IdentityKey) -> Result<Outcome, SessionError> {
        self.command(Command::AddContact {
            name: name.to_owned(),
            key,
        })
        .await
    }

    /// Forgets the contact `name`.
    pub async fn remove_contact(&self, name: &str) -> Result<Outcome, SessionError> {
        self.command(Command::RemoveContact {
            name: name.to_owned(),
        })
        .await
    }

    /// Closes the session: no new command is taken, a running one gets
    /// [`CLOSE_GRACE`] to finish, the state is written and the connection
    /// closed. Deliveries still in the outbox go out with the next session
    /// or command. Closing again, or after the session stopped, is
    /// [`SessionError::Closed`].
    pub async fn close(&self) -> Result<(), SessionError> {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Call::Close(reply)).await.is_ok() {
            let _ = done.await;
        }
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        match task {
            Some(task) => match task.await {
                Ok(r) => r,
                Err(e) => Err(SessionError::Persist(e.to_string())),
            },
            None => Err(SessionError::Closed),
        }
    }

    async fn ask<T>(
        &self,
        call: impl FnOnce(oneshot::Sender<T>) -> Call,
    ) -> Result<T, SessionError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(call(reply))
            .await
            .map_err(|_| SessionError::Closed)?;
        answer.await.map_err(|_| SessionError::Closed)
    }
}

/// What a [`Session`] handle asks of its task.
enum Call {
    Command(Box<Command>, oneshot::Sender<Result<Outcome, CommandError>>),
    Subscribe(mpsc::Sender<Event>, oneshot::Sender<()>),
    /// Reads the machine (and answers through the closure's own channel).
    Read(Box<dyn FnOnce(&ClientMachine) + Send>),
    Close(oneshot::Sender<()>),
}

/// The session's task: the machine and everything it needs.
struct Runner {
    machine: ClientMachine,
    signing_key: ed25519_dalek::SigningKey,
    key: StateKey,
    config: SessionConfig,
    clock: Clock,
    subscribers: Vec<mpsc::Sender<Event>>,
    /// Why the last connection attempt failed, for [`Session::connect_problem`].
    problem: Arc<std::sync::Mutex<Option<ConnectProblem>>>,
    /// Direct links, when the configuration asks for them.
    links: Option<Links>,
    /// Where the direct endpoint answers, once bound.
    direct_addr: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    /// Held for the session's life: one writer per state file.
    _lock: StateLock,
}

type Connecting = JoinHandle<Result<Client, ClientError>>;
/// Where a command's outcome goes.
type Reply = oneshot::Sender<Result<Outcome, CommandError>>;
/// Commands waiting for their turn, in the order asked.
type Waiting = std::collections::VecDeque<(Command, Reply)>;
/// Set once the session is closing: whom to tell, and by when.
type Closing = Option<(oneshot::Sender<()>, tokio::time::Instant)>;

impl Runner {
    async fn run(mut self, mut rx: mpsc::Receiver<Call>) -> Result<(), SessionError> {
        let now = self.clock.now();
        self.machine.handle_listen(now, true);
        self.start_links().await;
        let mut client: Option<Client> = None;
        let mut calls: JoinSet<(u64, Result<_, Lost>)> = JoinSet::new();
        let mut connecting: Option<Connecting> = None;
        let mut running: Option<Reply> = None;
        let mut waiting = Waiting::new();
        let mut closing: Closing = None;
        loop {
            // One round: feed the machine everything that is ready without
            // waiting (answers, queued commands, at most ROUND_INPUTS_MAX),
            // collecting its effects; write the state once; then carry the
            // effects out in order. Every effect still follows a write that
            // covers the state it came from, as in `drive`, but one write
            // serves the whole round (a group commit for the state file).
            let mut held = Vec::new();
            let mut replies = Vec::new();
            let mut dirty = false;
            for _ in 0..ROUND_INPUTS_MAX {
                if running.is_none()
                    && closing.is_none()
                    && let Some((command, reply)) = waiting.pop_front()
                {
                    running = Some(reply);
                    self.machine.handle_command(self.clock.now(), command);
                }
                while let Some(effect) = self.machine.poll_effect() {
                    match effect {
                        Effect::Persist => dirty = true,
                        Effect::Done(result) => {
                            if let Some(reply) = running.take() {
                                replies.push((reply, result));
                            }
                        }
                        other => held.push(other),
                    }
                }
                if running.is_none() && closing.is_none() && !waiting.is_empty() {
                    continue;
                }
                match calls.try_join_next() {
                    Some(Ok((token, Ok(answer)))) => {
                        self.machine
                            .handle_response(self.clock.now(), token, answer);
                        continue;
                    }
                    Some(Ok((_, Err(Lost)))) => {
                        let reason = lost_reason(client.take());
                        calls = JoinSet::new();
                        // Requests not yet out wait for the next connection
                        // in the machine, like those that were.
                        held.retain(|e| !matches!(e, Effect::Request { .. }));
                        self.machine.handle_disconnected(self.clock.now(), &reason);
                        continue;
                    }
                    Some(Err(_)) => continue,
                    None => {}
                }
                if let Some(links) = self.links.as_mut()
                    && let Some(news) = links.try_news()
                {
                    links.on_news(news, &mut self.machine, self.clock.now());
                    continue;
                }
                if closing.is_none()
                    && let Ok(call) = rx.try_recv()
                {
                    self.take_call(call, &mut waiting, &mut closing);
                    continue;
                }
                break;
            }
            if dirty {
                self.persist()?;
            }
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
            let mut fed = false;
            let mut membership = false;
            for effect in held {
                match effect {
                    Effect::Connect => {
                        let (server, trust, key) = (
                            self.config.server.clone(),
                            self.config.trust.clone(),
                            self.signing_key.clone(),
                        );
                        connecting = Some(tokio::spawn(async move {
                            Client::connect_as(&server, &trust, &key).await
                        }));
                    }
                    Effect::Request { token, request } => match &client {
                        Some(c) => {
                            let c = c.clone();
                            calls.spawn(async move { (token, call(&c, request).await) });
                        }
                        None => {
                            self.machine.handle_response(
                                self.clock.now(),
                                token,
                                Err(quicproquo_core::ServiceError::unavailable("not connected")),
                            );
                            fed = true;
                        }
                    },
                    Effect::Event(e) => {
                        membership |= crate::links::changes_membership(&e);
                        self.publish(e).await;
                    }
                    Effect::DirectSend {
                        token,
                        peer,
                        message,
                    } => {
                        let sent = self
                            .links
                            .as_mut()
                            .is_some_and(|l| l.send(token, peer, message));
                        if !sent {
                            self.machine
                                .handle_direct_answer(self.clock.now(), token, false);
                            fed = true;
                        }
                    }
                    Effect::DirectAnswer { token, taken } => {
                        if let Some(l) = self.links.as_mut() {
                            l.answer(token, taken);
                        }
                    }
                    Effect::Persist | Effect::Done(_) => {}
                }
            }
            if membership && let Some(links) = self.links.as_mut() {
                // Whom to admit changed: links to former members close
                // (which the machine hears), new members are dialed.
                links.refresh_allowed(&mut self.machine, self.clock.now());
                links.dial_due();
                fed = true;
            }
            if let Some((_, by)) = &closing
                && (running.is_none() || tokio::time::Instant::now() >= *by)
            {
                break;
            }
            if fed || (running.is_none() && !waiting.is_empty() && closing.is_none()) {
                continue;
            }
            let deadline = self.machine.poll_timeout().map(|t| self.clock.instant(t));
            let close_by = closing.as_ref().map(|(_, by)| *by);
            let next_dial = self.links.as_ref().and_then(Links::next_dial);
            tokio::select! {
                call = rx.recv(), if closing.is_none() => match call {
                    Some(call) => self.take_call(call, &mut waiting, &mut closing),
                    None => closing = Some((oneshot::channel().0, tokio::time::Instant::now())),
                },
                joined = calls.join_next(), if !calls.is_empty() => {
                    let Some(Ok((token, result))) = joined else { continue };
                    match result {
                        Ok(answer) => self.machine.handle_response(self.clock.now(), token, answer),
                        Err(Lost) => {
                            let reason = lost_reason(client.take());
                            calls = JoinSet::new();
                            self.machine.handle_disconnected(self.clock.now(), &reason);
                        }
                    }
                }
                result = wait_connect(&mut connecting), if connecting.is_some() => {
                    connecting = None;
                    let now = self.clock.now();
                    self.set_problem(result.as_ref().err().map(ConnectProblem::of));
                    match result {
                        Ok(c) => {
                            client = Some(c);
                            self.machine.handle_connected(now);
                        }
                        Err(e) => self.machine.handle_connect_failed(now, connect_failure(&e)),
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.machine.handle_timeout(self.clock.now());
                }
                () = sleep_until(close_by), if close_by.is_some() => {}
                news = crate::drive::next_news(self.links.as_mut()) => {
                    if let (Some(news), Some(links)) = (news, self.links.as_mut()) {
                        links.on_news(news, &mut self.machine, self.clock.now());
                    }
                }
                () = sleep_until(next_dial), if next_dial.is_some() => {
                    if let Some(links) = self.links.as_mut() {
                        links.dial_due();
                    }
                }
            }
        }
        // Closing: nothing more goes out; what is in flight goes again with
        // the next session (enqueues carry their message id).
        if let Some(links) = self.links.as_mut() {
            links.close();
        }
        self.machine.handle_listen(self.clock.now(), false);
        calls.abort_all();
        if let Some(c) = connecting.take() {
            c.abort();
        }
        self.machine
            .handle_disconnected(self.clock.now(), "the session closed");
        while self.machine.poll_effect().is_some() {}
        self.persist()?;
        if let Some(c) = client {
            c.close().await;
        }
        if let Some(reply) = running.take() {
            let _ = reply.send(Err(CommandError::Busy));
        }
        for (_, reply) in waiting {
            let _ = reply.send(Err(CommandError::Busy));
        }
        if let Some((reply, _)) = closing {
            let _ = reply.send(());
        }
        Ok(())
    }

    /// Takes a handle's call: a command joins the queue, the rest is
    /// answered at once.
    fn take_call(&mut self, call: Call, waiting: &mut Waiting, closing: &mut Closing) {
        match call {
            Call::Command(command, reply) => waiting.push_back((*command, reply)),
            Call::Subscribe(tx, reply) => {
                self.subscribers.push(tx);
                let _ = reply.send(());
            }
            Call::Read(read) => read(&self.machine),
            Call::Close(reply) => {
                *closing = Some((reply, tokio::time::Instant::now() + CLOSE_GRACE));
            }
        }
    }

    /// Binds the direct endpoint if the configuration asks for one; a
    /// failure is shown and the session goes on through the server alone.
    async fn start_links(&mut self) {
        let Some(config) = self.config.direct.clone() else {
            return;
        };
        match Links::start(&config, &self.signing_key, &self.machine) {
            Ok((mut links, warnings)) => {
                if let Ok(mut a) = self.direct_addr.lock() {
                    *a = links.local_addr();
                }
                links.dial_due();
                self.links = Some(links);
                for message in warnings {
                    self.publish(Event::Warning { message }).await;
                }
            }
            Err(e) => {
                self.publish(Event::Warning {
                    message: format!("direct links are off: {e}"),
                })
                .await;
            }
        }
    }

    fn set_problem(&self, problem: Option<ConnectProblem>) {
        if let Ok(mut p) = self.problem.lock() {
            *p = problem;
        }
    }

    /// Writes the machine's state; a failure stops the session.
    fn persist(&mut self) -> Result<(), SessionError> {
        state_file::save_with_key(&self.config.state, &self.key, &self.machine.snapshot())
            .map_err(|e| SessionError::Persist(format!("{}: {e}", self.config.state.display())))
    }

    /// Hands `event` to every subscriber, waiting for room; subscribers
    /// that went away are forgotten.
    async fn publish(&mut self, event: Event) {
        let mut gone = Vec::new();
        for (i, s) in self.subscribers.iter().enumerate() {
            if s.send(event.clone()).await.is_err() {
                gone.push(i);
            }
        }
        for i in gone.into_iter().rev() {
            self.subscribers.remove(i);
        }
    }
}

async fn wait_connect(connecting: &mut Option<Connecting>) -> Result<Client, ClientError> {
    match connecting {
        Some(c) => match c.await {
            Ok(r) => r,
            Err(e) => Err(ClientError::Connect(e.to_string())),
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Takes the state file's lock without waiting: a session keeps the
/// machine in memory, so nobody else may write the file while it runs.
fn take_lock(state: &Path) -> Result<StateLock, SessionError> {
    match StateLock::try_acquire(state) {
        Ok(Some(lock)) => Ok(lock),
        Ok(None) => Err(SessionError::InUse(state.to_owned())),
        Err(source) => Err(SessionError::State {
            path: state.to_owned(),
            source,
        }),
    }
}

fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    seed
}
