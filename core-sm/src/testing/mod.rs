//! The one in-memory world of the tests, fuzz targets, benches and cost
//! reports: a [`NodeService`] over a [`MemStore`], driven inline as the
//! server's service task drives it — feed a request, drain the outputs,
//! sync the store when the machine asks and say so — and client machines
//! run against it ([`NodeWorld::run_command`]).
//!
//! [`ledger`] is the one checker of the queues' delivery guarantees.
//!
//! Compiled for this crate's own tests and, for everyone else, behind the
//! `testing` feature; never part of a production build.

pub mod ledger;

use std::time::Duration;

use ed25519_dalek::{Signer as _, SigningKey};

use crate::client::{ClientMachine, Command, CommandError, Effect, Event, Outcome};
use crate::limits::AUTH_VERSION;
use crate::node::{
    NodeConfig, NodeService, Output, RateConfig, Reply, Request, RequestBody, Response,
    auth_message,
};
use crate::store::MemStore;
use crate::time::Time;
use crate::types::{ConnectionId, IdentityKey, RequestId, Signature};

/// The TLS exporter value every connection of the world reports.
pub const EXPORTER: [u8; 32] = [0xee; 32];

/// The machine's seed when the world opens, and when it reopens after a
/// crash.
const SEED: [u8; 32] = [7; 32];
const REOPEN_SEED: [u8; 32] = [3; 32];

/// The identity of deterministic test user `n`.
pub fn user(n: u64) -> SigningKey {
    let mut seed = [0x5a; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    SigningKey::from_bytes(&seed)
}

/// The identity key of `key`.
pub fn identity(key: &SigningKey) -> IdentityKey {
    IdentityKey(key.verifying_key().to_bytes())
}

/// `config` with every rate limit lifted far above what a test or bench
/// reaches: they measure or check delivery, not refusals.
pub fn unlimited(config: NodeConfig) -> NodeConfig {
    let open = RateConfig {
        burst: u32::MAX,
        per_sec: u32::MAX,
    };
    NodeConfig {
        enqueue_rate: open,
        key_fetch_pair_rate: open,
        key_package_fetch_target_rate: open,
        ..config
    }
}

/// A NodeService over a `MemStore` with an inline shell loop.
pub struct NodeWorld {
    pub(crate) node: NodeService<MemStore>,
    pub(crate) now: Time,
    /// Time that passes with every request.
    tick: Duration,
    next_request: u64,
    /// Replies drained but not yet taken, in order.
    replies: Vec<(RequestId, Reply)>,
    /// Whether a sync the machine asks for happens at once.
    auto_sync: bool,
}

impl NodeWorld {
    /// A fresh machine with `config`, its first writes synced, its clock at
    /// one second.
    pub fn new(config: NodeConfig) -> NodeWorld {
        let node = NodeService::new(config, SEED, MemStore::new()).expect("open an empty store");
        let mut w = NodeWorld {
            node,
            now: Time::from_millis(1_000),
            tick: Duration::ZERO,
            next_request: 0,
            replies: Vec::new(),
            auto_sync: true,
        };
        w.replies = w.drain();
        w
    }

    /// The process dies (unsynced writes are lost) and a machine with
    /// `config` opens the store, its clock at `now`.
    pub fn crash_and_reopen(self, config: NodeConfig, now: Time) -> NodeWorld {
        let mut store = self.node.into_store();
        store.crash();
        NodeWorld {
            node: NodeService::new(config, REOPEN_SEED, store).expect("reopen the store"),
            now,
            tick: self.tick,
            next_request: 0,
            replies: Vec::new(),
            auto_sync: true,
        }
    }

    /// The machine, for good.
    pub fn into_node(self) -> NodeService<MemStore> {
        self.node
    }

    /// The machine.
    pub fn node(&self) -> &NodeService<MemStore> {
        &self.node
    }

    /// The machine, to feed it directly.
    pub fn node_mut(&mut self) -> &mut NodeService<MemStore> {
        &mut self.node
    }

    /// The world's clock.
    pub fn now(&self) -> Time {
        self.now
    }

    /// Sets the world's clock.
    pub fn set_now(&mut self, now: Time) {
        self.now = now;
    }

    /// Moves the clock on by `d` and lets the machine see it.
    pub fn advance(&mut self, d: Duration) {
        self.now = self.now.saturating_add(d);
        self.node.handle_timeout(self.now);
    }

    /// Lets `tick` pass with every request (none by default).
    pub fn set_tick(&mut self, tick: Duration) {
        self.tick = tick;
    }

    /// Whether syncs the machine asks for happen at once (the default), or
    /// wait for [`Self::sync`].
    pub fn set_auto_sync(&mut self, on: bool) {
        self.auto_sync = on;
    }

    /// Syncs everything written so far and tells the machine.
    pub fn sync(&mut self) {
        let lsn = self.node.store_mut().sync();
        self.node.handle_synced(self.now, lsn);
    }

    /// Opens connection `conn`.
    pub fn open(&mut self, conn: u64) {
        self.node
            .handle_connection_opened(self.now, ConnectionId(conn), EXPORTER)
            .expect("the connection table has room");
    }

    /// Opens connection `conn` and authenticates it as `key`.
    pub fn login(&mut self, conn: u64, key: &SigningKey) {
        self.open(conn);
        let Ok(Response::AuthChallenge { nonce }) = self.call(conn, RequestBody::AuthChallenge)
        else {
            panic!("no auth challenge");
        };
        let identity_key = identity(key);
        let sig = key.sign(&auth_message(&identity_key, &nonce, &EXPORTER));
        let r = self.call(
            conn,
            RequestBody::Authenticate {
                identity_key,
                signature: Signature(sig.to_bytes()),
            },
        );
        assert_eq!(r, Ok(Response::Authenticated), "login");
    }

    /// Feeds one request without draining; returns its id.
    pub fn send(&mut self, conn: u64, body: RequestBody) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.now = self.now.saturating_add(self.tick);
        self.node.handle_request(
            self.now,
            ConnectionId(conn),
            id,
            Request {
                auth_version: AUTH_VERSION,
                body,
            },
        );
        id
    }

    /// Feeds one request and returns its reply, which must come out now
    /// (other replies it releases are kept for [`Self::drain`]).
    pub fn call(&mut self, conn: u64, body: RequestBody) -> Reply {
        let id = self.send(conn, body);
        let mut replies = self.drain();
        let pos = replies
            .iter()
            .position(|(r, _)| *r == id)
            .expect("the reply is ready");
        let (_, reply) = replies.remove(pos);
        assert!(
            replies.iter().all(|(r, _)| *r != id),
            "two replies to one request"
        );
        self.replies = replies;
        reply
    }

    /// Drains the machine's outputs, syncing when it asks (with auto-sync
    /// on), and returns every reply not yet taken, in order.
    pub fn drain(&mut self) -> Vec<(RequestId, Reply)> {
        self.pump();
        std::mem::take(&mut self.replies)
    }

    /// Drains the machine's outputs as the server's service task does:
    /// each sync asked for is carried out on the store at once (with
    /// auto-sync on) and reported back, which may release held replies;
    /// replies are kept for [`Self::drain`].
    pub fn pump(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Reply {
                    request_id, reply, ..
                } => self.replies.push((request_id, reply)),
                Output::Sync { lsn } => {
                    if self.auto_sync {
                        let synced = self.node.store_mut().sync_up_to(lsn);
                        self.node.handle_synced(self.now, synced);
                    }
                }
            }
        }
    }

    /// Runs `command` on `m` to its end over connection `conn`. The
    /// machine's clock jumps to each deadline it sets; each request goes
    /// to `hooks.intercept` first (an answer there never reaches the
    /// server), else to the machine, whose answer `hooks.tamper` may
    /// change. `Connect` always succeeds.
    pub fn run_command(
        &mut self,
        m: &mut ClientMachine,
        conn: u64,
        command: Command,
        hooks: &mut Hooks<'_>,
    ) -> Ran {
        let mut now = Time::ZERO;
        m.handle_command(now, command);
        let mut ran = Ran {
            events: Vec::new(),
            outcome: Err(CommandError::Busy),
            snapshot: None,
        };
        loop {
            let Some(effect) = m.poll_effect() else {
                // Waiting for a retry: the fake clock jumps to it.
                let at = m.poll_timeout().expect("machine stalled without finishing");
                now = now.max(at);
                m.handle_timeout(now);
                continue;
            };
            match effect {
                Effect::Persist => ran.snapshot = Some(m.snapshot()),
                Effect::Connect => m.handle_connected(now),
                Effect::Request { token, request } => {
                    let intercepted = hooks.intercept.as_mut().and_then(|f| f(&request));
                    let reply = match intercepted {
                        Some(reply) => reply,
                        None => {
                            let mut reply = self.call(conn, request.clone());
                            if let Some(tamper) = hooks.tamper.as_mut() {
                                tamper(&request, &mut reply);
                            }
                            reply
                        }
                    };
                    m.handle_response(now, token, reply);
                }
                Effect::Event(e) => ran.events.push(e),
                Effect::Done(outcome) => {
                    ran.outcome = outcome;
                    return ran;
                }
                // The world has no direct links: nothing is taken.
                Effect::DirectSend { token, .. } => m.handle_direct_answer(now, token, false),
                Effect::DirectAnswer { .. } => {}
            }
        }
    }

    /// [`Self::run_command`] without hooks; the command must succeed
    /// without a warning. Returns its events.
    pub fn run_ok(&mut self, m: &mut ClientMachine, conn: u64, command: Command) -> Vec<Event> {
        let what = format!("{command:?}");
        self.run_command(m, conn, command, &mut Hooks::default())
            .ok(&what)
    }
}

/// Answers a request instead of the server; `None` lets the server answer.
pub type Intercept<'a> = &'a mut dyn FnMut(&RequestBody) -> Option<Reply>;
/// Changes the server's answer to a request before the machine sees it.
pub type Tamper<'a> = &'a mut dyn FnMut(&RequestBody, &mut Reply);

/// What [`NodeWorld::run_command`] lets a test do to requests.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Consulted first for every request.
    pub intercept: Option<Intercept<'a>>,
    /// Applied to every answer the server gives.
    pub tamper: Option<Tamper<'a>>,
}

/// What a command run against the world gave.
#[derive(Debug)]
pub struct Ran {
    /// Its events, in order.
    pub events: Vec<Event>,
    /// Its outcome.
    pub outcome: Result<Outcome, CommandError>,
    /// The machine's state at its last persist, if it persisted.
    pub snapshot: Option<Vec<u8>>,
}

impl Ran {
    /// The events of a command (`what`) that had to succeed without a
    /// warning or a tampering report; panics otherwise.
    pub fn ok(self, what: &str) -> Vec<Event> {
        if let Err(e) = &self.outcome {
            panic!("{what} failed: {e}");
        }
        for e in &self.events {
            assert!(
                !matches!(e, Event::Warning { .. } | Event::Tampering { .. }),
                "{what}: {e:?}"
            );
        }
        self.events
    }
}
