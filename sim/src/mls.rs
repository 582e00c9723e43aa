//! The MLS clients: real [`ClientMachine`]s, each on its own turmoil host,
//! carried out by the client library's own command loop
//! ([`quicproquo_client::drive`], the loop `qpq` runs) over the real
//! [`quicproquo_client::Client`] against the real server.
//!
//! A member behaves like a user of `qpq`: it registers, the group's creator
//! creates the group and adds the others once they are registered, every
//! member waits until it sees the whole group, then carries out its
//! [`Action`]s — its messages one `send` at a time with a `recv` now and
//! then, `update`s of its keys (Commits, which may race other members'),
//! `recv`s — each after a think time or at an offset from the moment the
//! group was complete that all members share, and finally runs `recv`
//! until its outbox is empty. A command that fails for a transient reason
//! (the server unavailable, no answer in time, no connection) is run again;
//! one that hangs is abandoned after [`COMMAND_TIMEOUT`], and the user starts
//! over from the state file, like a `qpq` process that was interrupted.
//!
//! The state file is modelled by an in-memory copy of the last snapshot the
//! machine asked to persist ([`MemberPlan::state`]); it survives a crash of
//! the host, whose restart restores the machine from it. The user's own
//! notes (registered yet, how many messages sent) survive too. A message
//! counts as sent ([`Event::PlaintextSent`]) the moment its `send` starts:
//! the machine persists it before anything else happens, and a crash can
//! only land at an await, after that. An `update` is noted as started
//! ([`Event::MlsUpdateStarted`]) and, when it returns `Updated`, as done
//! ([`Event::MlsUpdated`]); like a message, it is not run again after a
//! timeout.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

use quicproquo_client::{Clock, DirectConfig, Links, admitted, drive_with_links};
use quicproquo_core::client::{ClientMachine, Command, CommandError, Event as Shown, Outcome};
use quicproquo_core::error::ErrorKind;
use quicproquo_core::types::IdentityKey;

use crate::actors::{Ctx, Session};
use crate::history::Event;
use crate::net::direct_endpoint;
use crate::rng::Rng;

/// Longest a command may take (on top of a receive's wait) before the user
/// gives up on it and starts over from the state file.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Single-use KeyPackages each member keeps on the server.
const KEY_PACKAGES: u32 = 3;
/// Longest wait of a `recv` while waiting for the group or between sends,
/// in milliseconds.
const RECEIVE_WAIT_MS_MAX: u64 = 1_000;
/// The UDP port of a member's direct endpoint on its host.
pub const DIRECT_PORT: u16 = 7444;

/// One member of the group under test, with what survives its crashes.
#[derive(Debug)]
pub struct MemberPlan {
    /// Host name.
    pub name: String,
    /// Seed of the machine's first start (its identity comes from it).
    pub seed: [u8; 32],
    /// Its identity key.
    pub identity: IdentityKey,
    /// Whether it creates the group and adds the others.
    pub creator: bool,
    /// The group's name.
    pub group: String,
    /// The other members (told out of band).
    pub peers: Vec<IdentityKey>,
    /// With direct links: the other members' identities and host names
    /// (each member's endpoint is on [`DIRECT_PORT`] of its host). Empty:
    /// everything goes through the server.
    pub direct_peers: Vec<(IdentityKey, String)>,
    /// What it does once it sees the whole group, in order.
    pub actions: Vec<Action>,
    /// The state file: the last snapshot the machine asked to persist.
    pub state: RefCell<Option<Vec<u8>>>,
    /// The user's note that `register` succeeded.
    pub registered: Cell<bool>,
    /// The user's note of how many of its actions it has done.
    pub done: Cell<usize>,
    /// How many times the host has started.
    pub starts: Cell<u64>,
    /// Set by the driver once the network has healed: the next start of
    /// the host only receives until idle.
    pub final_receive: Cell<bool>,
    /// Set once that final receive is over.
    pub idle: Cell<bool>,
    /// Its group's epoch and epoch authenticator at the end of its last
    /// final receive.
    pub ended: RefCell<Option<(u64, Vec<u8>)>>,
}

/// When a member's action is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// This long after its previous action (think time).
    After(Duration),
    /// This long after the creator finished adding the members (shared by
    /// every member, so actions due at the same offset start in the same
    /// instant).
    At(Duration),
}

/// What a member does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// Half the time a short `recv`, then `send` of the text (unique in
    /// the run).
    Send(String),
    /// `update` of the group's keys (a Commit).
    Update,
    /// One `recv` that waits up to this many milliseconds.
    Receive(u64),
}

/// One of a member's actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// When it is due.
    pub when: When,
    /// What it is.
    pub what: What,
}

impl MemberPlan {
    /// A member whose machine is generated from `seed`.
    pub fn new(name: String, seed: [u8; 32], group: String) -> MemberPlan {
        MemberPlan {
            identity: ClientMachine::generate(seed).identity_key(),
            name,
            seed,
            creator: false,
            group,
            peers: Vec::new(),
            direct_peers: Vec::new(),
            actions: Vec::new(),
            state: RefCell::new(None),
            registered: Cell::new(false),
            done: Cell::new(0),
            starts: Cell::new(0),
            final_receive: Cell::new(false),
            idle: Cell::new(false),
            ended: RefCell::new(None),
        }
    }
}

/// Runs a member until it has sent every message and its outbox is empty;
/// once the driver asks for the final receive, receives until idle instead.
pub async fn run_member(ctx: Ctx, plan: Rc<MemberPlan>) -> turmoil::Result {
    if plan.final_receive.get() {
        receive_until_idle(&ctx, &plan).await?;
        plan.idle.set(true);
        return Ok(());
    }
    if ctx.progress.is_done(&plan.name) {
        return Ok(());
    }
    let start = plan.starts.get() + 1;
    plan.starts.set(start);
    let mut m = Member::open(&ctx, plan.clone(), start).await?;
    while !plan.registered.get() {
        match m
            .run(Command::Register {
                count: KEY_PACKAGES,
            })
            .await?
        {
            Attempt::Done(Outcome::Registered { failed: 0, .. }, _) => plan.registered.set(true),
            // Some uploads failed: `register` again tops up.
            Attempt::Done(..) | Attempt::Retry => m.pause().await,
            Attempt::Refused(e) => return Err(m.refused("register", e).into()),
        }
    }
    ctx.progress
        .mls_registered
        .borrow_mut()
        .insert(plan.name.clone());
    if plan.creator {
        m.create_and_add().await?;
        if ctx.progress.mls_formed.get().is_none() {
            ctx.progress.mls_formed.set(Some(now()));
        }
    }
    while m.group_size() < plan.peers.len() + 1 {
        let wait_ms = m.rng.between(0, RECEIVE_WAIT_MS_MAX);
        m.receive(wait_ms).await?;
    }
    while plan.done.get() < plan.actions.len() {
        let k = plan.done.get();
        let Action { when, what } = plan.actions[k].clone();
        match when {
            When::After(pause) => tokio::time::sleep(pause).await,
            When::At(at) => {
                let formed = loop {
                    match ctx.progress.mls_formed.get() {
                        Some(t) => break t,
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                };
                tokio::time::sleep((formed + at).saturating_sub(now())).await;
            }
        }
        let (rec, me) = (ctx.rec.clone(), plan.identity);
        match what {
            What::Send(text) => {
                if m.rng.chance(0.5) {
                    let wait_ms = m.rng.between(0, RECEIVE_WAIT_MS_MAX / 2);
                    m.receive(wait_ms).await?;
                }
                let send = Command::Send {
                    group: plan.group.clone(),
                    text: text.clone(),
                };
                let sending = || {
                    plan.done.set(k + 1);
                    rec.record(Event::PlaintextSent { sender: me, text });
                };
                match m.run_with(send, sending).await? {
                    // After a timeout the message is in the state file all
                    // the same and goes out with a later command.
                    Attempt::Done(..) | Attempt::Retry => {}
                    Attempt::Refused(e) => return Err(m.refused("send", e).into()),
                }
            }
            What::Update => {
                let update = Command::Update {
                    group: Some(plan.group.clone()),
                };
                let starting = || {
                    plan.done.set(k + 1);
                    rec.record(Event::MlsUpdateStarted { member: me });
                };
                let before = m.epoch().unwrap_or_default();
                match m.run_with(update, starting).await? {
                    Attempt::Done(Outcome::Updated { .. }, _) => {
                        let moved = m.epoch().unwrap_or_default().saturating_sub(before);
                        ctx.rec.record(Event::MlsUpdated { member: me, moved });
                    }
                    // Like a message, the change is in the state file
                    // before anything is sent; a timeout leaves it there.
                    Attempt::Done(..) | Attempt::Retry => {}
                    Attempt::Refused(e) => return Err(m.refused("update", e).into()),
                }
            }
            What::Receive(wait_ms) => {
                m.receive(wait_ms).await?;
                plan.done.set(k + 1);
            }
        }
    }
    while m.machine.outbox_len() > 0 {
        m.receive(0).await?;
    }
    m.close().await;
    ctx.progress.finish(&plan.name);
    Ok(())
}

/// After the network healed: runs `recv` from the state file until nothing
/// is left to show or deliver, and records how the member ended.
async fn receive_until_idle(ctx: &Ctx, plan: &Rc<MemberPlan>) -> turmoil::Result {
    let mut m = Member::open(ctx, plan.clone(), u64::MAX).await?;
    loop {
        match m.run(Command::Receive { wait_ms: 0 }).await? {
            Attempt::Done(Outcome::Received { messages: 0 }, 0) if m.machine.outbox_len() == 0 => {
                break;
            }
            Attempt::Done(..) | Attempt::Retry => {}
            Attempt::Refused(e) => return Err(m.refused("recv", e).into()),
        }
    }
    let epoch = m.epoch();
    let authenticator = m.machine.epoch_authenticator(&plan.group);
    let numbered = authenticator.as_ref().map(|a| {
        let mut seen = ctx.progress.mls_authenticators.borrow_mut();
        let n = seen.iter().position(|s| s == a).unwrap_or_else(|| {
            seen.push(a.clone());
            seen.len() - 1
        });
        u32::try_from(n).unwrap_or(u32::MAX)
    });
    ctx.rec.record(Event::MlsIdle {
        member: plan.identity,
        outbox: m.machine.outbox_len(),
        group_members: m.group_size(),
        epoch,
        authenticator: numbered,
    });
    *plan.ended.borrow_mut() = epoch.zip(authenticator);
    m.close().await;
    Ok(())
}

/// How one command went.
enum Attempt {
    /// It finished, with this many warnings shown.
    Done(Outcome, u32),
    /// It was refused for a reason other than a transient one.
    Refused(CommandError),
    /// It failed transiently (and was recorded); run it again.
    Retry,
}

/// A member's running client: its machine, its connection, its choices.
struct Member {
    ctx: Ctx,
    plan: Rc<MemberPlan>,
    machine: ClientMachine,
    /// The machine's clock (tokio's, which the simulation drives).
    clock: Clock,
    session: Session,
    /// Direct links to the other members, if the scenario has them; they
    /// live as long as the host runs.
    links: Option<Links>,
    rng: Rng,
}

impl Member {
    /// Starts the member's client from its state file (a first start
    /// creates the identity and writes the file, as `qpq init` does).
    async fn open(ctx: &Ctx, plan: Rc<MemberPlan>, salt: u64) -> Result<Member, String> {
        let mut rng = ctx.rng(&plan.name, salt);
        let machine = restore(&plan, &mut rng)?;
        let session = Session::open(ctx, rng.seed(), Some(machine.signing_key().clone()))
            .await
            .map_err(|e| format!("{}: no endpoint: {e}", plan.name))?;
        let links = if plan.direct_peers.is_empty() {
            None
        } else {
            Some(direct_links(ctx, &plan, &machine, rng.seed()).await?)
        };
        Ok(Member {
            ctx: ctx.clone(),
            plan,
            machine,
            clock: Clock::new(),
            session,
            links,
            rng,
        })
    }

    /// Closes the connection and the direct links.
    async fn close(mut self) {
        if let Some(l) = &mut self.links {
            l.close();
        }
        self.session.close().await;
    }

    /// The creator's part: the group, then each other member added.
    async fn create_and_add(&mut self) -> Result<(), String> {
        let others = self.plan.peers.len();
        while self.ctx.progress.mls_registered.borrow().len() < others + 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let group = self.plan.group.clone();
        if self.group_size() == 0 {
            match self
                .run(Command::CreateGroup {
                    name: group.clone(),
                    pq: false,
                })
                .await?
            {
                Attempt::Done(..) => {}
                Attempt::Retry => {
                    return Err(format!("{}: a local command failed", self.plan.name));
                }
                Attempt::Refused(e) => return Err(self.refused("group create", e)),
            }
        }
        for peer in self.plan.peers.clone() {
            loop {
                let add = Command::AddMember {
                    group: group.clone(),
                    member: peer,
                };
                match self.run(add).await? {
                    // Added by an earlier attempt whose answer was lost.
                    Attempt::Done(..) | Attempt::Refused(CommandError::AlreadyMember(_)) => break,
                    Attempt::Retry => {}
                    Attempt::Refused(e) => return Err(self.refused("group add", e)),
                }
            }
        }
        Ok(())
    }

    /// One `recv` that waits up to `wait_ms` if nothing is pending.
    async fn receive(&mut self, wait_ms: u64) -> Result<(), String> {
        match self.run(Command::Receive { wait_ms }).await? {
            Attempt::Done(..) | Attempt::Retry => Ok(()),
            Attempt::Refused(e) => Err(self.refused("recv", e)),
        }
    }

    async fn run(&mut self, command: Command) -> Result<Attempt, String> {
        self.run_with(command, || {}).await
    }

    /// Runs one command with the client library's loop; `starting` runs
    /// right before the machine starts it (no await in between).
    async fn run_with(
        &mut self,
        command: Command,
        starting: impl FnOnce(),
    ) -> Result<Attempt, String> {
        let what = brief(&command);
        let me = self.plan.identity;
        let limit = match command {
            Command::Receive { wait_ms } => COMMAND_TIMEOUT + Duration::from_millis(wait_ms),
            _ => COMMAND_TIMEOUT,
        };
        let warnings = Cell::new(0u32);
        let (rec, state) = (&self.ctx.rec, &self.plan.state);
        let session = &mut self.session;
        let links = self.links.as_mut();
        let connect = async || {
            let c = session.client().await;
            if c.is_err() {
                session.reset();
            }
            c
        };
        starting();
        let running = drive_with_links(
            &mut self.machine,
            &self.clock,
            connect,
            command,
            |snapshot| {
                *state.borrow_mut() = Some(snapshot.to_vec());
                Ok::<(), Infallible>(())
            },
            |e| match e {
                Shown::Message {
                    sender, text, seq, ..
                } => {
                    rec.record(Event::PlaintextShown {
                        member: me,
                        sender: *sender,
                        text: text.clone(),
                    });
                    // Seq 0: it came over a direct link.
                    if *seq == 0 {
                        rec.record(Event::PlaintextDirect {
                            member: me,
                            text: text.clone(),
                        });
                    }
                }
                Shown::DirectLink { peer, up, .. } => rec.record(Event::DirectLink {
                    member: me,
                    peer: *peer,
                    up: *up,
                }),
                Shown::Warning { message } | Shown::Tampering { what: message } => {
                    warnings.set(warnings.get() + 1);
                    rec.record(Event::MlsWarning {
                        member: me,
                        message: message.clone(),
                    });
                }
                _ => {}
            },
            links,
        );
        match tokio::time::timeout(limit, running).await {
            Err(_) => {
                // Interrupted: start over from the state file, as a new
                // process would.
                self.failed(&what, format!("no outcome within {limit:?}"));
                self.session.reset();
                self.machine = restore(&self.plan, &mut self.rng)?;
                if let Some(l) = &mut self.links {
                    l.machine_replaced();
                }
                Ok(Attempt::Retry)
            }
            Ok(Err(e)) => Err(format!("{}: {what}: {e}", self.plan.name)),
            Ok(Ok(Ok(outcome))) => {
                self.ctx.rec.record(Event::MlsCommandDone {
                    member: me,
                    command: what,
                    outcome: format!("{outcome:?}"),
                });
                Ok(Attempt::Done(outcome, warnings.get()))
            }
            Ok(Ok(Err(CommandError::Server(e))))
                if matches!(
                    e.kind,
                    ErrorKind::Unavailable | ErrorKind::RateLimited { .. }
                ) =>
            {
                self.failed(&what, e.to_string());
                self.pause().await;
                Ok(Attempt::Retry)
            }
            Ok(Ok(Err(e))) => Ok(Attempt::Refused(e)),
        }
    }

    /// Records a transient failure of `what`.
    fn failed(&self, what: &str, error: String) {
        self.ctx.rec.record(Event::MlsCommandFailed {
            member: self.plan.identity,
            command: what.to_owned(),
            error,
            retried: true,
        });
    }

    /// Records a final failure of `what` and returns the error that ends
    /// the host.
    fn refused(&self, what: &str, e: CommandError) -> String {
        self.ctx.rec.record(Event::MlsCommandFailed {
            member: self.plan.identity,
            command: what.to_owned(),
            error: e.to_string(),
            retried: false,
        });
        format!("{}: {what} failed: {e}", self.plan.name)
    }

    /// Members of the group as this member sees it (0 before it has it).
    fn group_size(&self) -> usize {
        self.machine
            .groups()
            .iter()
            .find(|g| g.name == self.plan.group)
            .map_or(0, |g| g.members.len())
    }

    /// Its group's epoch (`None` before it has the group).
    fn epoch(&self) -> Option<u64> {
        self.machine
            .groups()
            .iter()
            .find(|g| g.name == self.plan.group)
            .map(|g| g.epoch)
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.rng.millis(50, 300)).await;
    }
}

/// A member's direct links: its endpoint on [`DIRECT_PORT`], admitting
/// the members of its groups, dialing the others at theirs.
async fn direct_links(
    ctx: &Ctx,
    plan: &MemberPlan,
    machine: &ClientMachine,
    seed: u64,
) -> Result<Links, String> {
    let (allowed, admit) = admitted(machine);
    let endpoint = direct_endpoint(
        DIRECT_PORT,
        ctx.loss.clone(),
        seed,
        machine.signing_key(),
        admit,
    )
    .await
    .map_err(|e| format!("{}: no direct endpoint: {e}", plan.name))?;
    let peers = plan
        .direct_peers
        .iter()
        .map(|(key, host)| {
            (
                quicproquo_core::types::hex(key.as_bytes()),
                format!("{}:{DIRECT_PORT}", turmoil::lookup(host.as_str())),
            )
        })
        .collect();
    let config = DirectConfig {
        listen: None,
        peers,
        mdns: false,
    };
    let (links, warnings) = Links::with_endpoint(endpoint, allowed, &config, machine)
        .map_err(|e| format!("{}: direct links: {e}", plan.name))?;
    if let Some(w) = warnings.first() {
        return Err(format!("{}: {w}", plan.name));
    }
    Ok(links)
}

/// The machine from the state file, or a new identity written to it.
fn restore(plan: &MemberPlan, rng: &mut Rng) -> Result<ClientMachine, String> {
    let saved = plan.state.borrow().clone();
    match saved {
        Some(snapshot) => ClientMachine::restore(&snapshot, rng.bytes())
            .map_err(|e| format!("{}: state does not restore: {e}", plan.name)),
        None => {
            let machine = ClientMachine::generate(plan.seed);
            *plan.state.borrow_mut() = Some(machine.snapshot());
            Ok(machine)
        }
    }
}

/// Simulated time since the run started.
fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn brief(command: &Command) -> String {
    match command {
        Command::Register { .. } => "register".into(),
        Command::CreateGroup { .. } => "group create".into(),
        Command::AddMember { member, .. } => format!("group add {}", member.short()),
        Command::Send { text, .. } => format!("send {text:?}"),
        Command::Update { .. } => "update".into(),
        Command::Receive { wait_ms } => format!("recv (wait {wait_ms} ms)"),
        other => format!("{other:?}"),
    }
}
