//! The simulated clients: each is the real client library
//! (`quicproquo_client::Client`) on its own turmoil host, driven by a small
//! workload loop that records what it sends and what comes back.
//!
//! Every actor behaves like a careful application: it retries transient
//! failures (reconnecting when the connection is gone) with the same
//! `messageId`, sends its next message only after the previous one was
//! acknowledged, and keeps its queue cursors in state that survives a crash
//! of its host (the real client persists them before acknowledging). A plan
//! holds everything an actor needs to start again after a crash.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use quicproquo_client::{Client, ClientError, ServerTrust};
use quicproquo_core::error::ErrorKind;
use quicproquo_core::types::{IdentityKey, MessageId, QueueId};

use crate::history::{Event, Recorder};
use crate::net::{Loss, client_endpoint};
use crate::rng::Rng;
use crate::server::{SERVER_HOST, SimServer};

/// Time an enqueue may take (the library's own retries included) before
/// the actor gives up on the connection and retries on a new one.
pub const ENQUEUE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time any other single call may take on top of its long-poll wait.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a connection plus authentication may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a finished actor waits for its connection to close cleanly.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an impatient poller waits on a long-poll before it drops the
/// connection, in milliseconds.
const ABANDON_AFTER_MS: (u64, u64) = (100, 1_000);
/// Messages a fetch asks for, picked at random per call: small limits make
/// the server split a backlog over several fetches.
const FETCH_LIMITS: [u32; 3] = [1, 3, 100];

/// What every actor of one run shares: the recorder, the network's loss
/// rate, how to trust the server, and the run's progress.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The run's history.
    pub rec: Recorder,
    /// The shared per-datagram loss rate.
    pub loss: Loss,
    /// The run's seed.
    pub seed: u64,
    /// Progress flags and crash requests.
    pub progress: Rc<Progress>,
}

/// The run's progress, read by the actors and the driver.
#[derive(Debug, Default)]
pub struct Progress {
    /// Senders that have not yet had every message acknowledged.
    pub senders_left: Cell<usize>,
    /// Set once the KeyPackage owner has uploaded its first pool.
    pub key_packages_ready: Cell<bool>,
    /// Each actor's name and whether it is done.
    pub done: RefCell<BTreeMap<String, bool>>,
    /// Hosts that asked the driver to crash them (name, down time).
    pub crash_requests: RefCell<Vec<(String, Duration)>>,
    /// The highest acknowledged seq per queue, for the snoopers.
    pub max_acked: RefCell<BTreeMap<QueueId, u64>>,
    /// The next KeyPackage pop id.
    pub next_pop: Cell<u64>,
    /// MLS clients whose KeyPackages are on the server (so they can be
    /// added to the group).
    pub mls_registered: RefCell<BTreeSet<String>>,
    /// When the MLS group's creator had added every member (simulated
    /// time since the start); members' actions due [`When::At`] count
    /// from here.
    ///
    /// [`When::At`]: crate::mls::When::At
    pub mls_formed: Cell<Option<Duration>>,
    /// The MLS epoch authenticators seen in the run, in the order first
    /// seen (their positions are what the history records).
    pub mls_authenticators: RefCell<Vec<Vec<u8>>>,
}

impl Progress {
    /// Registers `name` as an actor that is not done yet.
    pub fn expect(&self, name: &str) {
        self.done.borrow_mut().insert(name.to_owned(), false);
    }

    /// Marks `name` done.
    pub fn finish(&self, name: &str) {
        self.done.borrow_mut().insert(name.to_owned(), true);
    }

    /// Whether `name` is done.
    pub fn is_done(&self, name: &str) -> bool {
        self.done.borrow().get(name).copied().unwrap_or(false)
    }

    /// The actors not done yet.
    pub fn pending(&self) -> Vec<String> {
        self.done
            .borrow()
            .iter()
            .filter(|(_, d)| !**d)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn pop_id(&self) -> u64 {
        let id = self.next_pop.get();
        self.next_pop.set(id + 1);
        id
    }
}

impl Ctx {
    /// The generator for `label` and `salt` under the run's seed.
    pub fn rng(&self, label: &str, salt: u64) -> Rng {
        Rng::new(self.seed, label, salt)
    }
}

/// The identity key of `key`.
pub fn identity(key: &SigningKey) -> IdentityKey {
    IdentityKey(key.verifying_key().to_bytes())
}

/// One connection to the server that reconnects (and re-authenticates) on
/// demand after a transport failure.
pub struct Session {
    endpoint: quinn::Endpoint,
    key: Option<SigningKey>,
    trust: ServerTrust,
    client: Option<Client>,
}

impl Session {
    /// A session on a fresh client endpoint of the current host,
    /// authenticated as `key` (or not at all).
    pub async fn open(ctx: &Ctx, seed: u64, key: Option<SigningKey>) -> std::io::Result<Session> {
        Ok(Session {
            endpoint: client_endpoint(ctx.loss.clone(), seed).await?,
            key,
            trust: ServerTrust::Fingerprint(SimServer::fingerprint()),
            client: None,
        })
    }

    /// The current client, connecting and authenticating first if needed.
    pub async fn client(&mut self) -> Result<Client, ClientError> {
        if let Some(c) = &self.client {
            if c.connection().close_reason().is_none() {
                return Ok(c.clone());
            }
            self.reset();
        }
        let endpoint = &self.endpoint;
        let trust = &self.trust;
        let key = self.key.clone();
        let connect = async move {
            let mut c =
                Client::connect_with(endpoint, SimServer::addr(), "qpq-server", trust).await?;
            if let Some(k) = &key {
                c.authenticate(k).await?;
            }
            Ok::<_, ClientError>(c)
        };
        let c = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(r) => r?,
            Err(_) => return Err(ClientError::Timeout(CONNECT_TIMEOUT)),
        };
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Runs one call on the current client within `timeout`.
    pub async fn attempt<T, F, Fut>(&mut self, timeout: Duration, call: F) -> Result<T, ClientError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => {
                self.reset();
                return Err(e);
            }
        };
        let result = match tokio::time::timeout(timeout, call(client)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(timeout)),
        };
        if let Err(e) = &result
            && matches!(
                e,
                ClientError::Transport(_) | ClientError::Timeout(_) | ClientError::Connect(_)
            )
        {
            self.reset();
        }
        result
    }

    /// Drops the current connection (telling the server, if it can hear).
    pub fn reset(&mut self) {
        if let Some(c) = self.client.take() {
            c.connection().close(0u32.into(), b"reconnecting");
        }
    }

    /// Closes the connection and waits (briefly) until the close is sent.
    pub async fn close(mut self) {
        if let Some(c) = self.client.take() {
            c.connection().close(0u32.into(), b"done");
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.endpoint.wait_idle()).await;
    }
}

/// The pause before retrying after `e`: the server's hint when rate
/// limited, otherwise a short random backoff.
pub(crate) async fn back_off(rng: &mut Rng, e: &ClientError) {
    let pause = match e {
        ClientError::Service(s) => match s.kind {
            ErrorKind::RateLimited { retry_after_ms } => {
                Duration::from_millis(retry_after_ms.min(5_000))
            }
            _ => rng.millis(50, 300),
        },
        _ => rng.millis(50, 300),
    };
    tokio::time::sleep(pause).await;
}

/// One message a sender will send.
#[derive(Debug, Clone)]
pub struct PlannedMessage {
    /// The recipient's queue.
    pub queue: QueueId,
    /// Its id (the same on every attempt).
    pub message_id: MessageId,
    /// Its payload (unique within the run).
    pub payload: Vec<u8>,
    /// Think time before sending it.
    pub pause_before: Duration,
    /// If set, the server's answers to this sender are dropped from just
    /// before the first attempt until this much later: the request arrives,
    /// its acknowledgement is lost.
    pub lose_ack_for: Option<Duration>,
}

/// A sender: one identity sending its messages in order, each only after
/// the previous one was acknowledged.
#[derive(Debug, Clone)]
pub struct SenderPlan {
    /// Host name.
    pub name: String,
    /// Identity.
    pub key: SigningKey,
    /// Messages in sending order.
    pub messages: Vec<PlannedMessage>,
}

/// Runs a sender to completion.
pub async fn run_sender(ctx: Ctx, plan: Rc<SenderPlan>) -> turmoil::Result {
    let mut rng = ctx.rng(&plan.name, 0);
    let me = identity(&plan.key);
    let mut session = Session::open(&ctx, rng.seed(), Some(plan.key.clone())).await?;
    for m in &plan.messages {
        tokio::time::sleep(m.pause_before).await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            ctx.rec.record(Event::EnqueueSent {
                sender: me,
                queue: m.queue,
                message_id: m.message_id,
                payload: m.payload.clone(),
                attempt,
            });
            if attempt == 1
                && let Some(d) = m.lose_ack_for
            {
                drop_answers_for(&ctx, &plan.name, d);
            }
            let (queue, id, payload) = (m.queue, m.message_id, m.payload.clone());
            let r = session
                .attempt(ENQUEUE_ATTEMPT_TIMEOUT, |c| async move {
                    c.enqueue(queue.recipient_key, queue.channel_id, payload, id)
                        .await
                })
                .await;
            match r {
                Ok(seq) => {
                    ctx.rec.record(Event::EnqueueAcked {
                        sender: me,
                        queue: m.queue,
                        message_id: m.message_id,
                        seq,
                    });
                    let mut max = ctx.progress.max_acked.borrow_mut();
                    let e = max.entry(m.queue).or_insert(0);
                    *e = (*e).max(seq);
                    break;
                }
                Err(e) => {
                    let transient = e.kind().is_retryable();
                    ctx.rec.record(Event::EnqueueFailed {
                        sender: me,
                        message_id: m.message_id,
                        error: e.to_string(),
                        transient,
                    });
                    if !transient {
                        break;
                    }
                    back_off(&mut rng, &e).await;
                }
            }
        }
    }
    session.close().await;
    ctx.progress
        .senders_left
        .set(ctx.progress.senders_left.get().saturating_sub(1));
    ctx.progress.finish(&plan.name);
    Ok(())
}

/// Drops everything the server sends to `host` for `d`, starting now.
fn drop_answers_for(ctx: &Ctx, host: &str, d: Duration) {
    turmoil::partition_oneway(SERVER_HOST, host);
    ctx.rec.record(Event::Fault(format!(
        "server -> {host} cut for {} ms",
        d.as_millis()
    )));
    let (host, rec) = (host.to_owned(), ctx.rec.clone());
    tokio::task::spawn_local(async move {
        tokio::time::sleep(d).await;
        turmoil::repair_oneway(SERVER_HOST, host.as_str());
        rec.record(Event::Fault(format!("server -> {host} repaired")));
    });
}

/// A recipient polling one of its queues.
#[derive(Debug)]
pub struct PollerPlan {
    /// Host name.
    pub name: String,
    /// Identity (the queue's recipient).
    pub key: SigningKey,
    /// The queue.
    pub queue: QueueId,
    /// Longest long-poll wait, in milliseconds (each call draws up to it).
    pub wait_ms_max: u64,
    /// Chance that the poller gives up on a long-poll after a short while
    /// and drops the connection (an impatient application), leaving the
    /// server a waiter whose connection is gone.
    pub abandon: f64,
    /// If set, the answer to the first fetch from this one on (counted from
    /// 0, first start only) that is sure to return messages (an
    /// acknowledged message lies beyond the cursor) is dropped, and the
    /// host asks to be crashed while the answer is lost.
    pub lose_answer_from: Option<u32>,
    /// The last seq processed: the cursor, kept across crashes of the host.
    pub cursor: Cell<u64>,
    /// How many times the host has started.
    pub starts: Cell<u64>,
}

/// Runs a poller until its queue is drained after every sender is done.
pub async fn run_poller(ctx: Ctx, plan: Rc<PollerPlan>) -> turmoil::Result {
    if ctx.progress.is_done(&plan.name) {
        return Ok(());
    }
    let start = plan.starts.get() + 1;
    plan.starts.set(start);
    let mut rng = ctx.rng(&plan.name, start);
    let mut session = Session::open(&ctx, rng.seed(), Some(plan.key.clone())).await?;
    let (key, channel) = (plan.queue.recipient_key, plan.queue.channel_id);
    let mut fetches = 0u32;
    let mut lost_one = false;
    loop {
        let cursor = plan.cursor.get();
        let draining = ctx.progress.senders_left.get() == 0;
        let acked_beyond = ctx
            .progress
            .max_acked
            .borrow()
            .get(&plan.queue)
            .is_some_and(|max| *max > cursor);
        if start == 1
            && !lost_one
            && acked_beyond
            && plan.lose_answer_from.is_some_and(|from| fetches >= from)
        {
            lost_one = true;
            let down = rng.millis(0, 1_000);
            turmoil::partition_oneway(SERVER_HOST, plan.name.as_str());
            ctx.rec.record(Event::AnswerDropped {
                queue: plan.queue,
                after_seq: cursor,
            });
            ctx.progress
                .crash_requests
                .borrow_mut()
                .push((plan.name.clone(), down));
        }
        let limit = *rng.pick(&FETCH_LIMITS);
        let wait_ms = if draining || rng.chance(0.3) {
            0
        } else {
            rng.between(1, plan.wait_ms_max)
        };
        let patience = if wait_ms > ABANDON_AFTER_MS.1 && rng.chance(plan.abandon) {
            rng.millis(ABANDON_AFTER_MS.0, ABANDON_AFTER_MS.1)
        } else {
            CALL_TIMEOUT + Duration::from_millis(wait_ms)
        };
        let r = session
            .attempt(patience, |c| async move {
                if wait_ms == 0 {
                    c.fetch(key, channel, cursor, limit).await
                } else {
                    c.fetch_wait(key, channel, cursor, limit, wait_ms).await
                }
            })
            .await;
        fetches += 1;
        match r {
            Ok(f) => {
                ctx.rec.record(Event::Fetched {
                    queue: plan.queue,
                    after_seq: cursor,
                    messages: f
                        .messages
                        .iter()
                        .map(|m| (m.seq, m.payload.clone()))
                        .collect(),
                    next_seq: f.next_seq,
                });
                match f.messages.last() {
                    // Persisted before the next call acknowledges it.
                    Some(last) => plan.cursor.set(last.seq.max(cursor)),
                    None if draining => break,
                    None if wait_ms == 0 => tokio::time::sleep(rng.millis(20, 300)).await,
                    None => {}
                }
            }
            Err(e) if e.kind().is_retryable() => back_off(&mut rng, &e).await,
            Err(e) => {
                ctx.rec.record(Event::FetchRefused {
                    queue: plan.queue,
                    after_seq: cursor,
                    error: e.to_string(),
                });
                break;
            }
        }
    }
    session.close().await;
    ctx.progress.finish(&plan.name);
    Ok(())
}

/// A client that keeps asking for other identities' queues.
#[derive(Debug, Clone)]
pub struct SnooperPlan {
    /// Host name.
    pub name: String,
    /// Its own identity, or `None` to stay unauthenticated.
    pub key: Option<SigningKey>,
    /// Queues it asks for (none of them its own).
    pub victims: Vec<QueueId>,
}

/// Runs a snooper until every sender is done.
pub async fn run_snooper(ctx: Ctx, plan: Rc<SnooperPlan>) -> turmoil::Result {
    let mut rng = ctx.rng(&plan.name, 0);
    let requester = plan.key.as_ref().map(identity);
    let mut session = Session::open(&ctx, rng.seed(), plan.key.clone()).await?;
    while ctx.progress.senders_left.get() > 0 {
        tokio::time::sleep(rng.millis(50, 400)).await;
        let queue = *rng.pick(&plan.victims);
        // Acknowledging up to the highest acknowledged seq would delete
        // messages the owner may not have fetched yet.
        let known = ctx
            .progress
            .max_acked
            .borrow()
            .get(&queue)
            .copied()
            .unwrap_or(0);
        let after_seq = rng.between(known.saturating_sub(2), known);
        let long_poll = rng.chance(0.5);
        let (key, channel) = (queue.recipient_key, queue.channel_id);
        let r = session
            .attempt(CALL_TIMEOUT, |c| async move {
                if long_poll {
                    c.fetch_wait(key, channel, after_seq, 10, 200).await
                } else {
                    c.fetch(key, channel, after_seq, 10).await
                }
            })
            .await;
        let (answered, detail) = match r {
            Ok(f) => (Some(f.messages.len()), format!("next seq {}", f.next_seq)),
            Err(e) if e.kind().is_retryable() => {
                back_off(&mut rng, &e).await;
                continue;
            }
            Err(e) => (None, e.to_string()),
        };
        ctx.rec.record(Event::ForeignRequest {
            requester,
            queue,
            after_seq,
            answered,
            detail,
        });
    }
    session.close().await;
    ctx.progress.finish(&plan.name);
    Ok(())
}

/// The owner of a KeyPackage pool.
#[derive(Debug, Clone)]
pub struct KeyOwnerPlan {
    /// Host name.
    pub name: String,
    /// Identity.
    pub key: SigningKey,
    /// Packages uploaded before anyone pops.
    pub initial: u32,
    /// Whether a last-resort package is uploaded too.
    pub last_resort: bool,
    /// Packages uploaded later, while pops run.
    pub later: u32,
}

/// Uploads `plan.initial` packages (and the last resort), signals the
/// poppers, then uploads `plan.later` more.
pub async fn run_key_owner(ctx: Ctx, plan: Rc<KeyOwnerPlan>) -> turmoil::Result {
    let mut rng = ctx.rng(&plan.name, 0);
    let me = identity(&plan.key);
    let mut session = Session::open(&ctx, rng.seed(), Some(plan.key.clone())).await?;
    let mut counter = 0u32;
    for n in 0..plan.initial + u32::from(plan.last_resort) + plan.later {
        let last_resort = plan.last_resort && n == plan.initial;
        if n == plan.initial + u32::from(plan.last_resort) {
            ctx.progress.key_packages_ready.set(true);
        }
        if ctx.progress.key_packages_ready.get() {
            tokio::time::sleep(rng.millis(50, 600)).await;
        }
        loop {
            // A fresh package per attempt: uploads are not idempotent, and
            // a real client builds a new KeyPackage for every upload.
            counter += 1;
            let package = format!("kp/{}/{counter}/{}", plan.name, rng.seed()).into_bytes();
            ctx.rec.record(Event::KeyPackageUploadSent {
                owner: me,
                package: package.clone(),
                last_resort,
            });
            let p = package.clone();
            let r = session
                .attempt(CALL_TIMEOUT, |c| async move {
                    c.upload_key_package(me, p, last_resort).await
                })
                .await;
            match r {
                Ok(_) => {
                    ctx.rec.record(Event::KeyPackageUploaded {
                        owner: me,
                        package,
                        last_resort,
                    });
                    break;
                }
                Err(e) if e.kind().is_retryable() => back_off(&mut rng, &e).await,
                Err(e) => return Err(format!("KeyPackage upload refused: {e}").into()),
            }
        }
    }
    ctx.progress.key_packages_ready.set(true);
    session.close().await;
    ctx.progress.finish(&plan.name);
    Ok(())
}

/// A client popping someone's KeyPackages.
#[derive(Debug, Clone)]
pub struct PopperPlan {
    /// Host name.
    pub name: String,
    /// Its own identity.
    pub key: SigningKey,
    /// Whose packages.
    pub target: IdentityKey,
    /// Pops that must get an answer (package or notFound).
    pub pops: u32,
}

/// Pops `plan.pops` packages (retrying transient failures as new pops).
pub async fn run_popper(ctx: Ctx, plan: Rc<PopperPlan>) -> turmoil::Result {
    let mut rng = ctx.rng(&plan.name, 0);
    let requester = identity(&plan.key);
    while !ctx.progress.key_packages_ready.get() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut session = Session::open(&ctx, rng.seed(), Some(plan.key.clone())).await?;
    let mut answered = 0;
    while answered < plan.pops {
        tokio::time::sleep(rng.millis(0, 300)).await;
        if pop_once(&ctx, &mut session, &mut rng, requester, plan.target)
            .await?
            .is_some()
        {
            answered += 1;
        }
    }
    session.close().await;
    ctx.progress.finish(&plan.name);
    Ok(())
}

/// The result of one pop, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Popped {
    Package { last_resort: bool },
    NotFound,
}

/// One recorded pop: its answer, or `None` after a transient failure (the
/// pop may or may not have taken a package).
async fn pop_once(
    ctx: &Ctx,
    session: &mut Session,
    rng: &mut Rng,
    requester: IdentityKey,
    target: IdentityKey,
) -> Result<Option<Popped>, Box<dyn std::error::Error>> {
    let id = ctx.progress.pop_id();
    ctx.rec.record(Event::KeyPackagePopSent {
        requester,
        target,
        pop: id,
    });
    let r = session
        .attempt(CALL_TIMEOUT, |c| async move {
            c.fetch_key_package(target).await
        })
        .await;
    match r {
        Ok((package, last_resort)) => {
            ctx.rec.record(Event::KeyPackagePopped {
                pop: id,
                target,
                package,
                last_resort,
            });
            Ok(Some(Popped::Package { last_resort }))
        }
        Err(ClientError::Service(e)) if e.kind == ErrorKind::NotFound => {
            ctx.rec
                .record(Event::KeyPackageNotFound { pop: id, target });
            Ok(Some(Popped::NotFound))
        }
        Err(e) if e.kind().is_retryable() => {
            back_off(rng, &e).await;
            Ok(None)
        }
        Err(e) => Err(format!("KeyPackage fetch refused: {e}").into()),
    }
}

/// The final audit, run once the network is healed and every actor is done:
/// fetches every polled queue from its recipient's cursor and counts and
/// drains the KeyPackage pool. (MLS members receive until idle on their own
/// hosts, see [`crate::mls`].)
#[derive(Debug)]
pub struct AuditPlan {
    /// Host name.
    pub name: String,
    /// The pollers whose queues to audit.
    pub pollers: Vec<Rc<PollerPlan>>,
    /// The KeyPackage owner, if any.
    pub key_owner: Option<Rc<KeyOwnerPlan>>,
}

/// Runs the audit.
pub async fn run_audit(ctx: Ctx, plan: Rc<AuditPlan>) -> turmoil::Result {
    let mut rng = ctx.rng(&plan.name, 0);
    for p in &plan.pollers {
        let mut session = Session::open(&ctx, rng.seed(), Some(p.key.clone())).await?;
        let (key, channel, cursor) = (p.queue.recipient_key, p.queue.channel_id, p.cursor.get());
        let f = loop {
            match session
                .attempt(CALL_TIMEOUT, |c| async move {
                    c.fetch(key, channel, cursor, 1_000).await
                })
                .await
            {
                Ok(f) => break f,
                Err(e) if e.kind().is_retryable() => back_off(&mut rng, &e).await,
                Err(e) => {
                    ctx.rec.record(Event::FetchRefused {
                        queue: p.queue,
                        after_seq: cursor,
                        error: e.to_string(),
                    });
                    break quicproquo_client::Fetched {
                        messages: Vec::new(),
                        next_seq: 0,
                        gap: None,
                    };
                }
            }
        };
        ctx.rec.record(Event::QueueAudited {
            queue: p.queue,
            cursor,
            pending: f.messages.len(),
            next_seq: f.next_seq,
        });
        session.close().await;
    }
    if let Some(owner) = &plan.key_owner {
        let me = identity(&owner.key);
        let mut session = Session::open(&ctx, rng.seed(), Some(owner.key.clone())).await?;
        let (count, has_last_resort) = loop {
            match session
                .attempt(
                    CALL_TIMEOUT,
                    |c| async move { c.key_package_count(me).await },
                )
                .await
            {
                Ok(r) => break r,
                Err(e) if e.kind().is_retryable() => back_off(&mut rng, &e).await,
                Err(e) => return Err(format!("KeyPackage count refused: {e}").into()),
            }
        };
        let mut popped = 0;
        let then_last_resort = loop {
            match pop_once(&ctx, &mut session, &mut rng, me, me).await? {
                Some(Popped::Package { last_resort: false }) => popped += 1,
                Some(Popped::Package { last_resort: true }) => break true,
                Some(Popped::NotFound) => break false,
                None => {}
            }
            if popped > count + AUDIT_EXTRA_POPS_MAX {
                break false;
            }
        };
        ctx.rec.record(Event::KeyPackageAudited {
            owner: me,
            count,
            has_last_resort,
            popped,
            then_last_resort,
        });
        session.close().await;
    }
    ctx.progress.finish(&plan.name);
    Ok(())
}

/// Pops beyond the owner's count after which the audit stops: the count was
/// wrong, and the checker reports it.
const AUDIT_EXTRA_POPS_MAX: u32 = 5;
