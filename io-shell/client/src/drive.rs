//! Carrying out one command of the sans-io [`ClientMachine`] against a
//! server: the loop the `qpq` CLI runs for every command, and the
//! simulations run for their MLS clients.
//!
//! The loop starts the command and drains the machine's effects. Persists
//! are merged: the snapshot is handed to the caller's `persist` once, before
//! the next effect that depends on it (a request, an event or the end), or
//! before the loop waits for answers, so nothing leaves the machine — no
//! request, no shown message, no outcome — before the state that produced it
//! is written, and nothing it asked to persist is left unwritten while the
//! loop waits. Requests run concurrently,
//! each on its own task; their answers go back to the machine as they come.
//! How the state is written and how events are shown is the caller's.

use quicproquo_core::client::{ClientMachine, Command, CommandError, Effect, Event, Outcome};
use quicproquo_core::error::ServiceError;
use quicproquo_core::node::{RequestBody, Response};
use tokio::task::JoinSet;

use crate::{Client, ClientError};

/// Why [`drive`] stopped before the command finished.
#[derive(Debug)]
#[non_exhaustive]
pub enum DriveError<E> {
    /// The caller's `persist` failed; nothing after it was carried out.
    Persist(E),
    /// The machine asked for the network, but no client was given.
    NoClient,
    /// The machine waits for nothing and has not finished (a bug).
    Stalled,
    /// A request task panicked or was cancelled.
    Task(String),
}

impl<E: std::fmt::Display> std::fmt::Display for DriveError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriveError::Persist(e) => write!(f, "{e}"),
            DriveError::NoClient => f.write_str("internal: a local command asked for the network"),
            DriveError::Stalled => f.write_str("internal: the client machine stalled"),
            DriveError::Task(e) => write!(f, "a request task failed: {e}"),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for DriveError<E> {}

/// Runs `command` on `machine` to its end: requests go to `client`
/// concurrently, every snapshot the machine asks to persist goes to
/// `persist` (merged, and always before the next non-persist effect and
/// before waiting for an answer), every
/// event to `on_event`. Returns the command's own result; the outer error
/// means the loop itself could not go on. `client` may be `None` for a
/// command that stays local (creating a group).
pub async fn drive<E>(
    machine: &mut ClientMachine,
    client: Option<&Client>,
    command: Command,
    mut persist: impl FnMut(&[u8]) -> Result<(), E>,
    mut on_event: impl FnMut(&Event),
) -> Result<Result<Outcome, CommandError>, DriveError<E>> {
    machine.start(command);
    let mut calls = JoinSet::new();
    // Persists are merged: the state is written before the next effect that
    // depends on it (a request, an event or the end), or before waiting,
    // once.
    let mut dirty = false;
    loop {
        while let Some(effect) = machine.poll_effect() {
            if !matches!(effect, Effect::Persist) && dirty {
                persist(&machine.snapshot()).map_err(DriveError::Persist)?;
                dirty = false;
            }
            match effect {
                Effect::Persist => dirty = true,
                Effect::Request { token, request } => {
                    let Some(client) = client else {
                        return Err(DriveError::NoClient);
                    };
                    let client = client.clone();
                    calls.spawn(async move { (token, call(&client, request).await) });
                }
                Effect::Event(e) => on_event(&e),
                Effect::Done(result) => return Ok(result),
            }
        }
        // Nothing more to carry out until an answer comes: write a pending
        // persist now, so a command interrupted while it waits keeps it (a
        // message the machine queued behind an earlier delivery to the same
        // queue asks for no request yet, only for the persist).
        if dirty {
            persist(&machine.snapshot()).map_err(DriveError::Persist)?;
            dirty = false;
        }
        let Some(joined) = calls.join_next().await else {
            return Err(DriveError::Stalled);
        };
        let (token, result) = joined.map_err(|e| DriveError::Task(e.to_string()))?;
        machine.handle_response(token, result);
    }
}

/// Sends one request of the machine and returns its answer the way the
/// machine takes it: transport failures become `unavailable`. Enqueues go
/// through [`Client::enqueue`] / [`Client::enqueue_batch`] (their
/// same-messageId retries), long-polls (`fetchWait`, `fetchWaitChannels`)
/// get the wait added to their timeout.
pub async fn call(client: &Client, request: RequestBody) -> Result<Response, ServiceError> {
    let result = match request {
        RequestBody::Enqueue {
            recipient_key,
            channel_id,
            payload,
            message_id,
        } => client
            .enqueue(recipient_key, channel_id, payload, message_id)
            .await
            .map(|seq| Response::Enqueued { seq }),
        RequestBody::FetchWait {
            recipient_key,
            channel_id,
            after_seq,
            limit,
            timeout_ms,
        } => client
            .fetch_wait(recipient_key, channel_id, after_seq, limit, timeout_ms)
            .await
            .map(|f| Response::Messages {
                messages: f.messages,
                next_seq: f.next_seq,
                gap: f.gap,
            }),
        RequestBody::EnqueueBatch {
            recipient_keys,
            channel_id,
            payload,
            message_id,
        } => client
            .enqueue_batch(recipient_keys, channel_id, payload, message_id)
            .await
            .map(|seqs| Response::EnqueuedBatch { seqs }),
        RequestBody::FetchWaitChannels {
            recipient_key,
            cursors,
            limit,
            timeout_ms,
        } => client
            .fetch_wait_channels(recipient_key, cursors, limit, timeout_ms)
            .await
            .map(|channels| Response::ChannelMessages { channels }),
        other => client.call(other).await,
    };
    result.map_err(|e| match e {
        ClientError::Service(e) => e,
        other => ServiceError::unavailable(other.to_string()),
    })
}
