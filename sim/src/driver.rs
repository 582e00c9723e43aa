//! The driver: builds one turmoil simulation from a [`Plan`], steps it while
//! applying the plan's faults at their simulated times, heals the network,
//! waits until the server holds nothing, runs the final audit and hands the
//! history to the checker.
//!
//! The driver is the only place that crashes or restarts hosts and changes
//! links (besides two actor-side faults that must be placed exactly around
//! one request: a lost enqueue acknowledgement and a lost fetch answer, see
//! [`crate::actors`]). After the last fault it always heals: every link
//! repaired, loss off, the server running; so every run ends with a drained,
//! quiet system the checker can judge.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Once;
use std::time::Duration;

use crate::actors::{
    AuditPlan, Ctx, KeyOwnerPlan, PollerPlan, PopperPlan, Progress, SenderPlan, SnooperPlan,
    run_audit, run_key_owner, run_poller, run_popper, run_sender, run_snooper,
};
use crate::checker::{Violation, check};
use crate::history::{Event, History, Recorder};
use crate::mls::{MemberPlan, run_member};
use crate::net::Loss;
use crate::rng::Rng;
use crate::server::{SERVER_HOST, SimServer, SimStore};

/// One fault, applied by the driver at its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Crash the server at the first moment (within
    /// [`CRASH_AIM_WINDOW`]) when it has written batches not yet synced,
    /// so the crash discards them; start it again after the given time.
    CrashServer(Duration),
    /// Drop everything between the server and `host`, both ways.
    Partition(String),
    /// Drop everything from the server to `host`.
    PartitionToHost(String),
    /// Drop everything from `host` to the server.
    PartitionFromHost(String),
    /// Repair the link between the server and `host`.
    Repair(String),
    /// Drop everything between two client hosts, both ways (their direct
    /// link).
    PartitionPeers(String, String),
    /// Repair the link between two client hosts.
    RepairPeers(String, String),
    /// Crash client host `host` and start it again after the given time.
    CrashClient(String, Duration),
    /// Repair every link, turn loss off and make sure the server runs.
    Heal,
}

/// Everything one run needs: the network, the server's sync timing, the
/// actors and the fault schedule. Built from a seed by a scenario.
#[derive(Debug)]
pub struct Plan {
    /// The scenario's name.
    pub scenario: &'static str,
    /// The run's seed.
    pub seed: u64,
    /// Per-datagram loss rate until the network heals.
    pub loss: f64,
    /// Datagram latency range (turmoil draws per datagram, which reorders).
    pub latency: (Duration, Duration),
    /// Range of the simulated time one sync takes.
    pub sync_delay: (Duration, Duration),
    /// Senders.
    pub senders: Vec<Rc<SenderPlan>>,
    /// Recipients' pollers.
    pub pollers: Vec<Rc<PollerPlan>>,
    /// Snoopers.
    pub snoopers: Vec<Rc<SnooperPlan>>,
    /// The KeyPackage owner, if the scenario has one.
    pub key_owner: Option<Rc<KeyOwnerPlan>>,
    /// KeyPackage poppers.
    pub poppers: Vec<Rc<PopperPlan>>,
    /// Members of an MLS group (full client machines).
    pub members: Vec<Rc<MemberPlan>>,
    /// Faults at simulated times (any order; the driver sorts them).
    pub faults: Vec<(Duration, Fault)>,
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The history.
    pub history: History,
    /// What the checker found; empty when every guarantee held.
    pub violations: Vec<Violation>,
    /// Simulated time the run took.
    pub sim_time: Duration,
    /// How many times the server started.
    pub server_starts: u64,
}

/// Simulated time per turmoil step.
const TICK: Duration = Duration::from_millis(1);
/// Datagrams a simulated socket buffers before dropping: enough for bursts
/// from every client at once.
const UDP_CAPACITY: usize = 4_096;
/// Simulated time the workload may take before the run is declared stuck.
const WORKLOAD_BUDGET: Duration = Duration::from_secs(300);
/// Simulated time the server gets to let go of everything once the clients
/// are gone: the QUIC idle timeout (30 s) for connections whose close was
/// lost, plus the longest fetchWait (25 s) a dead connection may still hold,
/// plus slack.
const QUIESCE_BUDGET: Duration = Duration::from_secs(70);
/// How long the server may track more connections than QUIC has open: a
/// closed connection's task ends its streams and tells the service within
/// milliseconds; the endpoint's count is published every 50 ms.
const RETAINED_MAX: Duration = Duration::from_secs(1);
/// How long a due server crash waits for a moment with unsynced writes
/// before it happens anyway.
pub const CRASH_AIM_WINDOW: Duration = Duration::from_millis(500);
/// Simulated time the final audit may take.
const AUDIT_BUDGET: Duration = Duration::from_secs(60);
/// Most rounds of final receives until idle (each member once per round).
const FINAL_ROUNDS: usize = 3;

/// Runs `plan` and checks its history.
pub fn run(plan: Plan) -> Outcome {
    install_panic_hook();
    take_panics();
    let rec = Recorder::default();
    let loss = Loss::new(plan.loss);
    let progress = Rc::new(Progress::default());
    let ctx = Ctx {
        rec: rec.clone(),
        loss: loss.clone(),
        seed: plan.seed,
        progress: progress.clone(),
    };
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(24 * 3600))
        .tick_duration(TICK)
        .min_message_latency(plan.latency.0)
        .max_message_latency(plan.latency.1)
        .udp_capacity(UDP_CAPACITY)
        .rng_seed(plan.seed)
        .build();
    let store = SimStore::new(
        Rng::new(plan.seed, "store", 0).seed(),
        plan.sync_delay.0,
        plan.sync_delay.1,
    );
    let server = SimServer::new(store, loss.clone(), plan.seed);
    server.register(&mut sim);
    register_actors(&mut sim, &ctx, &plan);

    let mut driver = Driver {
        sim,
        server,
        rec: rec.clone(),
        loss,
        progress,
        rng: Rng::new(plan.seed, "driver", 0),
        faults: sorted(plan.faults.clone()),
        later: Vec::new(),
        server_crash: None,
        retained_since: None,
        clients: client_hosts(&plan),
        failed: false,
    };
    driver.workload();
    driver.heal();
    // Actors still running finish on the healed network.
    driver.workload();
    driver.quiesce();
    if !driver.failed {
        driver.audit(&ctx, &plan);
        driver.quiesce();
    }
    let history = rec.snapshot();
    let violations = check(&history);
    Outcome {
        violations,
        sim_time: driver.sim.elapsed(),
        server_starts: driver.server.starts(),
        history,
    }
}

fn register_actors(sim: &mut turmoil::Sim<'_>, ctx: &Ctx, plan: &Plan) {
    for p in &plan.senders {
        ctx.progress.expect(&p.name);
        ctx.progress
            .senders_left
            .set(ctx.progress.senders_left.get() + 1);
        let (ctx, p) = (ctx.clone(), p.clone());
        sim.host(p.name.clone(), move || run_sender(ctx.clone(), p.clone()));
    }
    for p in &plan.pollers {
        ctx.progress.expect(&p.name);
        let (ctx, p) = (ctx.clone(), p.clone());
        sim.host(p.name.clone(), move || run_poller(ctx.clone(), p.clone()));
    }
    for p in &plan.snoopers {
        ctx.progress.expect(&p.name);
        let (ctx, p) = (ctx.clone(), p.clone());
        sim.host(p.name.clone(), move || run_snooper(ctx.clone(), p.clone()));
    }
    if let Some(p) = &plan.key_owner {
        ctx.progress.expect(&p.name);
        let (ctx, p) = (ctx.clone(), p.clone());
        sim.host(p.name.clone(), move || {
            run_key_owner(ctx.clone(), p.clone())
        });
    }
    for p in &plan.poppers {
        ctx.progress.expect(&p.name);
        let (ctx, p) = (ctx.clone(), p.clone());
        sim.host(p.name.clone(), move || run_popper(ctx.clone(), p.clone()));
    }
    for p in &plan.members {
        ctx.progress.expect(&p.name);
        ctx.rec.record_at(
            Duration::ZERO,
            Event::MlsMember {
                member: p.identity,
                name: p.name.clone(),
            },
        );
        let (ctx, p) = (ctx.clone(), p.clone());
        sim.host(p.name.clone(), move || run_member(ctx.clone(), p.clone()));
    }
}

fn client_hosts(plan: &Plan) -> Vec<String> {
    let mut hosts: Vec<String> = plan.senders.iter().map(|p| p.name.clone()).collect();
    hosts.extend(plan.pollers.iter().map(|p| p.name.clone()));
    hosts.extend(plan.snoopers.iter().map(|p| p.name.clone()));
    hosts.extend(plan.key_owner.iter().map(|p| p.name.clone()));
    hosts.extend(plan.poppers.iter().map(|p| p.name.clone()));
    hosts.extend(plan.members.iter().map(|p| p.name.clone()));
    hosts
}

fn sorted(mut faults: Vec<(Duration, Fault)>) -> VecDeque<(Duration, Fault)> {
    faults.sort_by_key(|(t, _)| *t);
    faults.into()
}

struct Driver<'a> {
    sim: turmoil::Sim<'a>,
    server: SimServer,
    rec: Recorder,
    loss: Loss,
    progress: Rc<Progress>,
    rng: Rng,
    faults: VecDeque<(Duration, Fault)>,
    /// Actions the driver scheduled itself (crash requests, restarts).
    later: Vec<(Duration, Later)>,
    /// A server crash that is due: the latest time it may happen and how
    /// long the server then stays down.
    server_crash: Option<(Duration, Duration)>,
    /// Since when the server has tracked more connections than QUIC has
    /// open, and whether that was reported.
    retained_since: Option<(Duration, bool)>,
    clients: Vec<String>,
    /// Set when the simulation itself failed (a host errored or panicked);
    /// the run stops and the checker reports it.
    failed: bool,
}

#[derive(Debug, Clone)]
enum Later {
    Crash(String, Duration),
    Bounce(String),
    RestartServer,
}

impl Driver<'_> {
    /// Steps until every actor is done (or the run fails or runs out of
    /// time), applying faults as they fall due.
    fn workload(&mut self) {
        loop {
            if !self.step() {
                return;
            }
            let now = self.sim.elapsed();
            while self.faults.front().is_some_and(|(t, _)| *t <= now) {
                if let Some((_, f)) = self.faults.pop_front() {
                    self.apply(f);
                }
            }
            self.aim_server_crash(now);
            let requests: Vec<_> = self
                .progress
                .crash_requests
                .borrow_mut()
                .drain(..)
                .collect();
            for (host, down) in requests {
                // Leave the server time to handle the request whose answer
                // is being dropped, then crash the host.
                let at = now + self.rng.millis(300, 800);
                self.later.push((at, Later::Crash(host, down)));
            }
            self.run_later(now);
            if self.progress.pending().is_empty() {
                return;
            }
            if now > WORKLOAD_BUDGET {
                self.fail_stuck(format!(
                    "workload not done after {WORKLOAD_BUDGET:?}: {:?}",
                    self.progress.pending()
                ));
                return;
            }
        }
    }

    /// One turmoil step; false if the simulation failed.
    fn step(&mut self) -> bool {
        if self.failed {
            return false;
        }
        let r = self.sim.step();
        for p in take_panics() {
            self.rec.record_at(self.sim.elapsed(), Event::Panicked(p));
            self.failed = true;
        }
        if let Err(e) = r {
            self.rec.record_at(
                self.sim.elapsed(),
                Event::Panicked(format!("a host failed: {e}")),
            );
            self.failed = true;
        }
        self.watch_retained();
        !self.failed
    }

    /// Reports (once per episode) a server that keeps tracking connections
    /// QUIC has already closed.
    fn watch_retained(&mut self) {
        let now = self.sim.elapsed();
        match self.server.gauges() {
            Some((g, open)) if g.connections > open => {
                let (since, reported) = *self.retained_since.get_or_insert((now, false));
                if !reported && now - since > RETAINED_MAX {
                    self.rec.record_at(
                        now,
                        Event::Retained {
                            tracked: g.connections,
                            open_connections: open,
                            lasted: now - since,
                        },
                    );
                    self.retained_since = Some((since, true));
                }
            }
            _ => self.retained_since = None,
        }
    }

    fn fail_stuck(&mut self, what: String) {
        self.rec.record_at(self.sim.elapsed(), Event::Stuck(what));
        self.failed = true;
    }

    fn note(&self, what: String) {
        self.rec.record_at(self.sim.elapsed(), Event::Fault(what));
    }

    fn apply(&mut self, f: Fault) {
        match f {
            Fault::CrashServer(down) => {
                if self.server_crash.is_none() && self.sim.is_host_running(SERVER_HOST) {
                    self.server_crash = Some((self.sim.elapsed() + CRASH_AIM_WINDOW, down));
                }
            }
            Fault::Partition(h) => {
                self.sim.partition(SERVER_HOST, h.as_str());
                self.note(format!("partition server <-> {h}"));
            }
            Fault::PartitionToHost(h) => {
                self.sim.partition_oneway(SERVER_HOST, h.as_str());
                self.note(format!("partition server -> {h}"));
            }
            Fault::PartitionFromHost(h) => {
                self.sim.partition_oneway(h.as_str(), SERVER_HOST);
                self.note(format!("partition {h} -> server"));
            }
            Fault::Repair(h) => {
                self.sim.repair(SERVER_HOST, h.as_str());
                self.note(format!("repair server <-> {h}"));
            }
            Fault::PartitionPeers(a, b) => {
                self.sim.partition(a.as_str(), b.as_str());
                self.note(format!("partition {a} <-> {b}"));
            }
            Fault::RepairPeers(a, b) => {
                self.sim.repair(a.as_str(), b.as_str());
                self.note(format!("repair {a} <-> {b}"));
            }
            Fault::CrashClient(h, down) => {
                let now = self.sim.elapsed();
                self.later.push((now, Later::Crash(h, down)));
                self.run_later(now);
            }
            Fault::Heal => self.heal(),
        }
    }

    /// Carries out a due server crash once the store holds unsynced writes
    /// (or the aiming window is over).
    fn aim_server_crash(&mut self, now: Duration) {
        let Some((deadline, down)) = self.server_crash else {
            return;
        };
        if self.server.unsynced_batches() == 0 && now < deadline {
            return;
        }
        self.server_crash = None;
        let lost_batches = self.server.crash(&mut self.sim);
        self.rec
            .record_at(now, Event::ServerCrashed { lost_batches });
        self.later.push((now + down, Later::RestartServer));
    }

    fn restart_server(&mut self) {
        if !self.sim.is_host_running(SERVER_HOST) {
            self.server.restart(&mut self.sim);
            self.rec
                .record_at(self.sim.elapsed(), Event::ServerRestarted);
        }
    }

    fn run_later(&mut self, now: Duration) {
        let (due, rest): (Vec<_>, Vec<_>) = self.later.drain(..).partition(|(t, _)| *t <= now);
        self.later = rest;
        for (_, action) in due {
            match action {
                Later::Crash(h, down) => {
                    if self.progress.is_done(&h) {
                        continue;
                    }
                    self.sim.crash(h.as_str());
                    // A crash ends the host's part in any fault around it.
                    self.sim.repair(SERVER_HOST, h.as_str());
                    self.rec
                        .record_at(self.sim.elapsed(), Event::ClientCrashed(h.clone()));
                    self.note(format!("{h} stays down for {} ms", down.as_millis()));
                    self.later.push((now + down, Later::Bounce(h)));
                }
                Later::Bounce(h) => {
                    self.sim.bounce(h.as_str());
                    self.note(format!("restart {h}"));
                }
                Later::RestartServer => self.restart_server(),
            }
        }
    }

    /// Ends every fault: links repaired, loss off, crashed hosts restarted.
    fn heal(&mut self) {
        self.faults.clear();
        self.server_crash = None;
        let clients = self.clients.clone();
        for (i, h) in clients.iter().enumerate() {
            self.sim.repair(SERVER_HOST, h.as_str());
            for other in &clients[i + 1..] {
                self.sim.repair(h.as_str(), other.as_str());
            }
        }
        self.loss.set(0.0);
        let now = self.sim.elapsed();
        let pending: Vec<_> = self.later.drain(..).collect();
        for (_, action) in pending {
            if let Later::Bounce(h) = action {
                self.sim.bounce(h.as_str());
                self.note(format!("restart {h}"));
            }
        }
        self.restart_server();
        self.note(format!("healed at {:.3}s", now.as_secs_f64()));
    }

    /// Steps until the server holds no connection, waiter or reply, and
    /// records what it holds then (or when the budget ran out).
    fn quiesce(&mut self) {
        if self.failed {
            return;
        }
        let start = self.sim.elapsed();
        let mut last = None;
        loop {
            if !self.step() {
                return;
            }
            if let Some((gauges, open)) = self.server.gauges() {
                last = Some((gauges, open));
                if gauges == Default::default() && open == 0 {
                    break;
                }
            }
            if self.sim.elapsed() - start > QUIESCE_BUDGET {
                break;
            }
        }
        if let Some((gauges, open_connections)) = last {
            self.rec.record_at(
                self.sim.elapsed(),
                Event::ServerQuiescent {
                    gauges,
                    open_connections,
                },
            );
        }
    }

    /// Registers the auditor host and steps until it is done, then has
    /// every MLS member receive until idle on its own host.
    fn audit(&mut self, ctx: &Ctx, plan: &Plan) {
        let audit = Rc::new(AuditPlan {
            name: "audit".into(),
            pollers: plan.pollers.clone(),
            key_owner: plan.key_owner.clone(),
        });
        self.progress.expect(&audit.name);
        let (c, a) = (ctx.clone(), audit.clone());
        self.sim
            .host(audit.name.clone(), move || run_audit(c.clone(), a.clone()));
        let start = self.sim.elapsed();
        while !self.progress.is_done(&audit.name) {
            if !self.step() {
                return;
            }
            if self.sim.elapsed() - start > AUDIT_BUDGET {
                self.fail_stuck(format!(
                    "the final audit did not finish in {AUDIT_BUDGET:?}"
                ));
                return;
            }
        }
        // Each MLS member's host starts once more, to receive until idle.
        // A member's final receive may still make a change it had queued
        // (behind a Commit that lost its epoch), which the members idle
        // before it see only in another round: rounds go on until every
        // member ends on the same epoch and authenticator, or
        // FINAL_ROUNDS are over (the checker then reports the fork).
        for _ in 0..FINAL_ROUNDS {
            for m in &plan.members {
                m.final_receive.set(true);
                m.idle.set(false);
                self.sim.bounce(m.name.as_str());
                self.note(format!("restart {} to receive until idle", m.name));
                let start = self.sim.elapsed();
                while !m.idle.get() {
                    if !self.step() {
                        return;
                    }
                    if self.sim.elapsed() - start > AUDIT_BUDGET {
                        self.fail_stuck(format!(
                            "{} did not receive until idle in {AUDIT_BUDGET:?}",
                            m.name
                        ));
                        return;
                    }
                }
            }
            let ends: Vec<_> = plan
                .members
                .iter()
                .map(|m| m.ended.borrow().clone())
                .collect();
            if ends.windows(2).all(|w| w[0] == w[1]) {
                break;
            }
        }
    }
}

thread_local! {
    /// Panics seen on this thread since the last [`take_panics`]. A whole
    /// simulation runs on its test's thread, server tasks included, and
    /// tokio swallows a panicking task's unwind; this is how the driver
    /// notices one.
    static PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.borrow_mut().push(info.to_string()));
            previous(info);
        }));
    });
}

fn take_panics() -> Vec<String> {
    PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()))
}
