//! The machine's connection to the server and its clocks.
//!
//! The machine asks the shell for a connection ([`Effect::Connect`]) when a
//! request needs one, holds requests until the shell reports it up, and
//! decides when to try again after a failure: the pause doubles from
//! [`RECONNECT_BACKOFF_INITIAL`] up to [`RECONNECT_BACKOFF_MAX`]. Under
//! [`LinkPolicy::OneShot`] (one command per process) it gives up after one
//! failed attempt, and under either policy after a permanent failure; once
//! it has given up, requests fail as `unavailable` at once (deliveries stay
//! in the outbox) until the next command. A connection lost with requests
//! on it makes them wait for the next connection and go again (every
//! request the machine makes may be repeated: enqueues carry their message
//! id, fetches their cursor).
//!
//! The retries of failed deliveries and of the long-poll are timed here
//! too; [`ClientMachine::poll_timeout`] is the earliest deadline of all.

use std::time::Duration;

use super::*;

/// What the machine does when the server cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkPolicy {
    /// One connection attempt per command: when it fails, requests that
    /// need the server fail as `unavailable` and deliveries stay in the
    /// outbox for the next command. A command waits for its deliveries
    /// (up to [`RETRY_ATTEMPTS_PER_COMMAND`] attempts each). The `qpq`
    /// command line and the tests.
    #[default]
    OneShot,
    /// Reconnect, with a growing pause, as long as anything waits for the
    /// server; a command ends once its own requests are answered, and its
    /// deliveries go on in the background (reported by
    /// [`Event::Delivered`]). A long-lived session.
    KeepTrying,
}

/// Why the shell could not connect (or authenticate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    /// What went wrong, for the user.
    pub reason: String,
    /// Retrying cannot help: the server's certificate is not the one
    /// trusted, or the server refuses this identity.
    pub permanent: bool,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkState {
    /// No connection, none asked for.
    Down,
    /// [`Effect::Connect`] is out; the shell's answer is awaited.
    Connecting,
    /// Requests go out as they are made.
    Up,
}

/// The connection and its retry clock.
#[derive(Debug)]
pub(super) struct Link {
    pub state: LinkState,
    pub policy: LinkPolicy,
    /// Failed attempts since the last connection was up.
    pub attempts: u32,
    /// When to try connecting again, after a failure.
    pub reconnect_at: Option<Time>,
    /// The machine stopped trying (one-shot failure or a permanent one):
    /// requests fail at once until the next command.
    pub given_up: bool,
}

impl Link {
    pub fn new() -> Link {
        Link {
            state: LinkState::Down,
            policy: LinkPolicy::OneShot,
            attempts: 0,
            reconnect_at: None,
            given_up: false,
        }
    }
}

/// A failed delivery's retry clock.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retry {
    /// Attempts that failed so far (this command, for [`LinkPolicy::OneShot`]).
    pub attempts: u32,
    /// When to try again; `None` once due.
    pub at: Option<Time>,
}

/// The pause before attempt `attempt + 1` after `attempt` failures:
/// `initial`, doubling, at most `max`.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(20);
    initial.saturating_mul(1 << doublings).min(max)
}

impl ClientMachine {
    /// Whether the connection is up (a shell reporting state to a user
    /// who subscribed after the [`Event::Connected`]).
    pub fn is_connected(&self) -> bool {
        self.link.state == LinkState::Up
    }

    /// Sets how the machine treats a server it cannot reach (default
    /// [`LinkPolicy::OneShot`]).
    pub fn set_link_policy(&mut self, policy: LinkPolicy) {
        self.link.policy = policy;
    }

    /// The shell connected and authenticated, as [`Effect::Connect`] asked:
    /// held requests go out now.
    pub fn handle_connected(&mut self, now: Time) {
        self.now = now;
        self.link.state = LinkState::Up;
        self.link.attempts = 0;
        self.link.reconnect_at = None;
        self.link.given_up = false;
        self.effects.push_back(Effect::Event(Event::Connected));
        let held: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, r)| !r.sent)
            .map(|(t, _)| *t)
            .collect();
        for token in held {
            self.send(token);
        }
        self.settle();
    }

    /// The shell could not connect (or authenticate). The machine decides
    /// whether and when to try again.
    pub fn handle_connect_failed(&mut self, now: Time, failure: ConnectFailure) {
        self.now = now;
        self.link.state = LinkState::Down;
        self.link.attempts = self.link.attempts.saturating_add(1);
        if !failure.permanent && self.link.policy == LinkPolicy::KeepTrying {
            let pause = backoff(
                self.link.attempts,
                RECONNECT_BACKOFF_INITIAL,
                RECONNECT_BACKOFF_MAX,
            );
            self.link.reconnect_at = Some(now.saturating_add(pause));
            self.effects.push_back(Effect::Event(Event::Reconnecting {
                reason: failure.reason,
                retry_in_ms: u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
            }));
        } else {
            self.link.reconnect_at = None;
            self.link.given_up = true;
            self.effects.push_back(Effect::Event(Event::Disconnected {
                reason: failure.reason.clone(),
                permanent: failure.permanent,
            }));
            // Everything waiting for the connection fails now.
            let held: Vec<u64> = self.in_flight.keys().copied().collect();
            self.refusals.extend(held);
            self.refusal_reason = failure.reason;
        }
        self.settle();
    }

    /// The connection broke (`reason`), or the shell stopped carrying the
    /// requests made on it (a one-shot shell after [`Effect::Done`]): every
    /// request in flight waits for the next connection and goes again. A
    /// connection is asked for at once, and [`Event::Reconnecting`] shown,
    /// if a command or the long-poll needs one.
    pub fn handle_disconnected(&mut self, now: Time, reason: &str) {
        self.now = now;
        let was_up = self.link.state == LinkState::Up;
        self.link.state = LinkState::Down;
        for r in self.in_flight.values_mut() {
            r.sent = false;
        }
        if self.op.is_some() || self.listening {
            if was_up {
                self.effects.push_back(Effect::Event(Event::Reconnecting {
                    reason: reason.to_owned(),
                    retry_in_ms: 0,
                }));
            }
            self.ensure_connecting();
        }
        self.settle();
    }

    /// The earliest moment the machine wants [`Self::handle_timeout`]: a
    /// reconnect, a delivery's retry or the long-poll's retry.
    pub fn poll_timeout(&self) -> Option<Time> {
        let retries = self.outbox.retries().filter_map(|r| r.at);
        [self.link.reconnect_at, self.listen_at, self.persist_at]
            .into_iter()
            .flatten()
            .chain(retries)
            .min()
    }

    /// Time passed: whatever is due is tried again. Calling it early, or
    /// twice, does nothing.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = now;
        if self.link.reconnect_at.is_some_and(|t| t <= now) {
            self.link.reconnect_at = None;
            if self.in_flight.values().any(|r| !r.sent) {
                self.ensure_connecting();
            }
        }
        if self.outbox.retries_due(now) {
            self.flush_outbox();
        }
        if self.listen_at.is_some_and(|t| t <= now) {
            self.listen_at = None;
        }
        if self.persist_at.is_some_and(|t| t <= now) {
            self.persist_at = None;
            self.effects.push_back(Effect::Persist);
        }
        self.settle();
    }

    /// Deliveries left the outbox, stored by the server: a one-shot
    /// command writes that at once; a long-lived machine within
    /// [`STORED_PERSIST_DELAY`], or with the next write.
    pub(super) fn stored(&mut self) {
        match self.link.policy {
            LinkPolicy::OneShot => self.effects.push_back(Effect::Persist),
            LinkPolicy::KeepTrying => {
                if self.persist_at.is_none() {
                    self.persist_at = Some(self.now.saturating_add(STORED_PERSIST_DELAY));
                }
            }
        }
    }

    /// Sends the request `token` if the connection is up; otherwise holds
    /// it and asks for a connection (or, once given up, fails it).
    pub(super) fn send_or_hold(&mut self, token: u64) {
        match self.link.state {
            LinkState::Up => self.send(token),
            _ if self.link.given_up => self.refusals.push(token),
            _ => self.ensure_connecting(),
        }
    }

    fn send(&mut self, token: u64) {
        if let Some(r) = self.in_flight.get_mut(&token) {
            r.sent = true;
            self.effects.push_back(Effect::Request {
                token,
                request: r.body.clone(),
            });
        }
    }

    /// Asks the shell for a connection unless one is up, being made, or
    /// waiting for its retry time.
    pub(super) fn ensure_connecting(&mut self) {
        if self.link.state == LinkState::Down
            && self.link.reconnect_at.is_none()
            && !self.link.given_up
        {
            self.link.state = LinkState::Connecting;
            self.effects.push_back(Effect::Connect);
        }
    }

    /// Schedules the next attempt of outbox entries whose delivery failed
    /// with a retryable error: a doubling pause, at least what a
    /// `rateLimited` answer asked for.
    pub(super) fn retry_later(&mut self, ids: &[u64], error: &ServiceError) {
        for id in ids {
            let given_up = self.link.given_up;
            let now = self.now;
            let r = self.outbox.retry(*id);
            r.attempts = r.attempts.saturating_add(1);
            let mut pause = backoff(r.attempts, RETRY_BACKOFF_INITIAL, RETRY_BACKOFF_MAX);
            if let Some(hint) = error.kind.retry_after() {
                pause = pause.max(hint.min(RETRY_BACKOFF_MAX));
            }
            // Once the machine gave up connecting, nothing is tried before
            // the next command (which tries every delivery at once).
            r.at = (!given_up).then(|| now.saturating_add(pause));
        }
    }

    /// Whether a delivery still being retried holds the running command:
    /// under [`LinkPolicy::OneShot`], until its attempts reach
    /// [`RETRY_ATTEMPTS_PER_COMMAND`] or the machine gave up connecting.
    pub(super) fn retries_hold_command(&self) -> bool {
        self.link.policy == LinkPolicy::OneShot
            && !self.link.given_up
            && self
                .outbox
                .retries()
                .any(|r| r.at.is_some() && r.attempts < RETRY_ATTEMPTS_PER_COMMAND)
    }

    /// Fails the requests that could not be sent because the machine gave
    /// up connecting, then finishes the command if it can. Every input
    /// ends here.
    pub(super) fn settle(&mut self) {
        loop {
            while let Some(token) = self.refusals.pop() {
                let Some(r) = self.in_flight.remove(&token) else {
                    continue;
                };
                let reason = format!("server unreachable: {}", self.refusal_reason);
                self.dispatch(r.pending, Err(ServiceError::unavailable(reason)));
            }
            self.poke_listen();
            self.maybe_done();
            // Finishing a step may make a request (a receive's wait) that
            // fails at once too.
            if self.refusals.is_empty() {
                return;
            }
        }
    }
}
