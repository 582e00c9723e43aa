//! Carrying out one command of the sans-io [`ClientMachine`] against a
//! server: the loop the `qpq` CLI runs for every command, and the
//! simulations run for their MLS clients.
//!
//! The loop starts the command and drains the machine's effects. Persists
//! are merged: the snapshot is handed to the caller's `persist` once, before
//! the next effect that depends on it (a request, an event or the end), or
//! before the loop waits, so nothing leaves the machine — no request, no
//! shown message, no outcome — before the state that produced it is
//! written, and nothing it asked to persist is left unwritten while the
//! loop waits. The connection is made when the machine asks for one
//! ([`Effect::Connect`]), through the caller's `connect`; requests run
//! concurrently, each on its own task, and their answers go back to the
//! machine as they come. The loop sleeps until the machine's
//! [`ClientMachine::poll_timeout`] when a retry is due. How the state is
//! written and how events are shown is the caller's.

use std::time::Duration;

use quicproquo_core::Time;
use quicproquo_core::client::{
    ClientMachine, Command, CommandError, ConnectFailure, Effect, Event, Outcome,
};
use quicproquo_core::error::ServiceError;
use quicproquo_core::node::{RequestBody, Response};
use tokio::task::JoinSet;

use crate::links::{Links, News};
use crate::{Client, ClientError};

/// Why [`drive`] stopped before the command finished.
#[derive(Debug)]
#[non_exhaustive]
pub enum DriveError<E> {
    /// The caller's `persist` failed; nothing after it was carried out.
    Persist(E),
    /// The machine waits for nothing and has not finished (a bug).
    Stalled,
    /// A request task panicked or was cancelled.
    Task(String),
}

impl<E: std::fmt::Display> std::fmt::Display for DriveError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriveError::Persist(e) => write!(f, "{e}"),
            DriveError::Stalled => f.write_str("internal: the client machine stalled"),
            DriveError::Task(e) => write!(f, "a request task failed: {e}"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for DriveError<E> {}

/// The machine's clock: wall-clock [`Time`] (microseconds since the Unix
/// epoch), read once when the clock is made and moved on with tokio's
/// monotonic clock (which a simulation drives). One clock per machine,
/// kept as long as the machine, so its deadlines stay meaningful.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: tokio::time::Instant,
    /// Unix microseconds at `origin`.
    base_micros: u64,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            origin: tokio::time::Instant::now(),
            base_micros: u64::try_from(since_epoch.as_micros()).unwrap_or(0),
        }
    }

    /// The current time.
    pub fn now(&self) -> Time {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        Time::from_micros(self.base_micros.saturating_add(micros))
    }

    /// The instant of `t` (the clock's start for a time before it).
    pub fn instant(&self, t: Time) -> tokio::time::Instant {
        self.origin + Duration::from_micros(t.as_micros().saturating_sub(self.base_micros))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Runs `command` on `machine` to its end: the connection comes from
/// `connect` when the machine asks for one (connected and authenticated as
/// the machine's identity), requests go to it concurrently, every snapshot
/// the machine asks to persist goes to `persist` (merged, and always before
/// the next non-persist effect and before waiting), every event to
/// `on_event`. Returns the command's own result; the outer error means the
/// loop itself could not go on. Requests still in flight at the end are
/// dropped, and the machine is told ([`ClientMachine::handle_disconnected`]),
/// so a later command on the same machine makes them again; the connection
/// is closed ([`Client::close`]).
pub async fn drive<E>(
    machine: &mut ClientMachine,
    clock: &Clock,
    connect: impl AsyncFnMut() -> Result<Client, ClientError>,
    command: Command,
    persist: impl FnMut(&[u8]) -> Result<(), E>,
    on_event: impl FnMut(&Event),
) -> Result<Result<Outcome, CommandError>, DriveError<E>> {
    drive_with_links(machine, clock, connect, command, persist, on_event, None).await
}

/// As [`drive`], with the machine's direct links to other members carried
/// too while the command runs: its direct sends go over `links`, what
/// members send over them reaches the machine, and members are dialed
/// when due. The links outlive the command (a later one on the same
/// machine takes up their news); a machine restored anew needs new links,
/// as the tokens in their news are the old machine's.
pub async fn drive_with_links<E>(
    machine: &mut ClientMachine,
    clock: &Clock,
    mut connect: impl AsyncFnMut() -> Result<Client, ClientError>,
    command: Command,
    mut persist: impl FnMut(&[u8]) -> Result<(), E>,
    mut on_event: impl FnMut(&Event),
    mut links: Option<&mut Links>,
) -> Result<Result<Outcome, CommandError>, DriveError<E>> {
    machine.handle_command(clock.now(), command);
    if let Some(l) = links.as_deref_mut() {
        l.dial_due();
    }
    let mut client: Option<Client> = None;
    let mut calls = JoinSet::new();
    let mut dirty = false;
    let result = 'run: loop {
        while let Some(effect) = machine.poll_effect() {
            if !matches!(effect, Effect::Persist) && dirty {
                persist(&machine.snapshot()).map_err(DriveError::Persist)?;
                dirty = false;
            }
            match effect {
                Effect::Persist => dirty = true,
                Effect::Connect => match connect().await {
                    Ok(c) => {
                        client = Some(c);
                        machine.handle_connected(clock.now());
                    }
                    Err(e) => machine.handle_connect_failed(clock.now(), connect_failure(&e)),
                },
                Effect::Request { token, request } => match &client {
                    Some(c) => {
                        let c = c.clone();
                        calls.spawn(async move { (token, call(&c, request).await) });
                    }
                    // The machine sends only on a connection it was told
                    // is up; answer as a lost one if that ever breaks.
                    None => machine.handle_response(
                        clock.now(),
                        token,
                        Err(ServiceError::unavailable("not connected")),
                    ),
                },
                Effect::Event(e) => {
                    on_event(&e);
                    if crate::links::changes_membership(&e)
                        && let Some(l) = links.as_deref_mut()
                    {
                        l.refresh_allowed(machine, clock.now());
                        l.dial_due();
                    }
                }
                Effect::Done(result) => break 'run result,
                Effect::DirectSend {
                    token,
                    peer,
                    message,
                } => {
                    let sent = links
                        .as_deref_mut()
                        .is_some_and(|l| l.send(token, peer, message));
                    if !sent {
                        // No link: it goes through the server.
                        machine.handle_direct_answer(clock.now(), token, false);
                    }
                }
                Effect::DirectAnswer { token, taken } => {
                    if let Some(l) = links.as_deref_mut() {
                        l.answer(token, taken);
                    }
                }
            }
        }
        // Nothing more to carry out until an answer comes or a retry is
        // due: write a pending persist now, so a command interrupted while
        // it waits keeps it.
        if dirty {
            persist(&machine.snapshot()).map_err(DriveError::Persist)?;
            dirty = false;
        }
        let deadline = machine.poll_timeout().map(|t| clock.instant(t));
        let next_dial = links.as_deref().and_then(Links::next_dial);
        // In the order written, not at random: a simulation replays the
        // same inputs in the same order (tokio's own choice is unseeded).
        tokio::select! {
            biased;
            news = next_news(links.as_deref_mut()) => {
                if let (Some(news), Some(l)) = (news, links.as_deref_mut()) {
                    l.on_news(news, machine, clock.now());
                }
            }
            () = sleep_until(next_dial), if next_dial.is_some() => {
                if let Some(l) = links.as_deref_mut() {
                    l.dial_due();
                }
            }
            joined = calls.join_next(), if !calls.is_empty() => {
                let Some(joined) = joined else { continue };
                let (token, result) = joined.map_err(|e| DriveError::Task(e.to_string()))?;
                match result {
                    Err(Lost) if client.is_some() => {
                        // The connection is gone: every request on it goes
                        // again on the next one.
                        let reason = lost_reason(client.take());
                        calls = JoinSet::new();
                        machine.handle_disconnected(clock.now(), &reason);
                    }
                    Err(Lost) => {}
                    Ok(answer) => machine.handle_response(clock.now(), token, answer),
                }
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                machine.handle_timeout(clock.now());
            }
            else => return Err(DriveError::Stalled),
        }
    };
    calls.abort_all();
    machine.handle_disconnected(clock.now(), "the command ended");
    if let Some(c) = client {
        c.close().await;
    }
    Ok(result)
}

/// A request whose connection broke: it was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

/// Sends one request of the machine and returns its answer the way the
/// machine takes it: a call that timed out is `unavailable`; a connection
/// that closed is [`Lost`]. Long-polls (`fetchWait`, `fetchWaitChannels`)
/// get their wait added to the call timeout.
pub async fn call(
    client: &Client,
    request: RequestBody,
) -> Result<Result<Response, ServiceError>, Lost> {
    let wait_ms = match &request {
        RequestBody::FetchWait { timeout_ms, .. }
        | RequestBody::FetchWaitChannels { timeout_ms, .. } => *timeout_ms,
        _ => 0,
    };
    let timeout = crate::CALL_TIMEOUT + Duration::from_millis(wait_ms);
    match client.call_with_timeout(request, timeout).await {
        Ok(r) => Ok(Ok(r)),
        Err(ClientError::Service(e)) => Ok(Err(e)),
        Err(_) if client.connection().close_reason().is_some() => Err(Lost),
        Err(e) => Ok(Err(ServiceError::unavailable(e.to_string()))),
    }
}

/// How the machine should take a failed connection attempt: the server
/// refusing this identity, or a certificate that is not the trusted one,
/// will not change by trying again.
pub fn connect_failure(e: &ClientError) -> ConnectFailure {
    ConnectFailure {
        reason: e.to_string(),
        permanent: e.is_permanent(),
    }
}

/// Why a connection that lost a request closed, for the user.
pub fn lost_reason(client: Option<Client>) -> String {
    client
        .and_then(|c| c.connection().close_reason())
        .map_or_else(
            || "connection lost".to_owned(),
            |r| format!("connection lost: {r}"),
        )
}

/// The next news of the direct links; never, without them.
pub(crate) async fn next_news(links: Option<&mut Links>) -> Option<News> {
    match links {
        Some(l) => l.news().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
