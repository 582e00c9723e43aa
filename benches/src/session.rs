//! The long-lived client under load: one `Session` per member, each on its
//! own state file with its own connection, all in one group, against a
//! qpq-server started in this process (its own runtime, `fsync` by
//! default, rate limits lifted) or a running one. Member 0 sends; every
//! other member receives, its subscriber read all the time (or, beyond
//! [`SessionLoad::receiving_sessions`], through a bare long-poll); member 1
//! is the measured receiver.
//!
//! - [`Workload::SessionLatency`]: member 0 sends one message and waits
//!   until member 1's subscriber shows it, then sends the next. Latency runs
//!   from calling `send` to the `Event::Message` at member 1.
//! - [`Workload::SessionThroughput`]: member 0 sends each message as soon
//!   as the previous `send` returned, keeps S sends queued at once, or
//!   sends whenever fewer than [`SessionLoad::undelivered_max`] of its
//!   messages wait for `Delivered`; messages/s run from the first `send` to
//!   member 1 showing the last message, and to every receiving session
//!   showing it.
//!
//! A session writes its whole state file (encrypted, fsynced) before a
//! `send` returns and before it shows a message, so every message counted
//! is durable at the sender, on the server and at every receiver. Setup
//! (key derivation, registration, the adds, and [`WARMUP_MESSAGES`]
//! messages every member must show, which also proves everyone reached the
//! group's last epoch) is not timed. A message carries its number in its
//! first [`SEQ_DIGITS`] characters; each receiver must show each one
//! exactly once, or the run fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use quicproquo_client::state_file::{self, KdfParams, StateKey};
use quicproquo_client::{Client, DirectConfig, ServerTrust, Session, SessionConfig};
use quicproquo_core::client::{ClientMachine, Event};
use quicproquo_core::node::Durability;
use quicproquo_server::testing::InProcessServer;
use rand_core::OsRng;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::load::{Latency, Workload, latency, new_histogram, record};
use crate::scrape::{Samples, scrape};
use crate::server::bench_setup;

/// Which server the sessions talk to.
#[derive(Debug, Clone)]
pub enum Target {
    /// A qpq-server started in this process on its own tokio runtime (as
    /// if it were another process), over a data directory beside the state
    /// files, in this durability mode.
    InProcess(Durability),
    /// A running server.
    Running {
        /// `host:port`.
        server: String,
        /// How its certificate is trusted.
        trust: ServerTrust,
        /// Its Prometheus endpoint, for the server-side figures.
        metrics_url: Option<String>,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SessionLoad {
    /// [`Workload::SessionLatency`] or [`Workload::SessionThroughput`].
    pub workload: Workload,
    /// The server.
    pub target: Target,
    /// Members of the group, the sender included (at least 2).
    pub members: usize,
    /// Members after the sender that keep their `Session` while measuring
    /// (at least 1, at most `members - 1`; all when `None`). The others
    /// close theirs after the warm-up and receive through a bare
    /// long-poll that acknowledges what it gets without decrypting or
    /// writing anything: the server does all it does for a real receiver,
    /// this machine does not do the work of their devices.
    pub receiving_sessions: Option<usize>,
    /// Messages measured (after the warm-up).
    pub messages: u64,
    /// Bytes of each message's text.
    pub text_bytes: usize,
    /// Sends queued at once by the sender (throughput only; latency sends
    /// one at a time).
    pub in_flight: usize,
    /// Throughput only: the sender waits before a send while this many of
    /// its messages are not yet `Delivered` (stored for every recipient),
    /// so its outbox, and its state file with it, stays small. `None`:
    /// it sends as soon as `send` returns.
    pub undelivered_max: Option<u64>,
    /// Where the run's directory (state files, in-process server data) is
    /// made; the system's temporary directory when `None`. Its file system
    /// decides what an fsync costs.
    pub dir: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Members keep direct links to each other on loopback (each session
    /// listens on a port of its own and knows the others'): messages go
    /// directly, with no server copy, once every link is up.
    pub direct: bool,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    /// The workload.
    pub workload: Workload,
    /// Members of the group, the sender included.
    pub members: usize,
    /// Members that received through their `Session` (the others through
    /// a bare long-poll).
    pub receiving_sessions: usize,
    /// Messages measured.
    pub messages: u64,
    /// Bytes of each message's text.
    pub text_bytes: usize,
    /// Sends queued at once.
    pub in_flight: usize,
    /// Most messages the sender let wait for `Delivered`, if limited.
    pub undelivered_max: Option<u64>,
    /// Members kept direct links to each other.
    pub direct: bool,
    /// Untimed setup: sessions created, registered, added, warmed up.
    pub setup_s: f64,
    /// From the first measured `send` to member 1 showing the last message.
    pub elapsed_s: f64,
    /// `messages / elapsed_s`.
    pub messages_per_s: f64,
    /// From the first measured `send` to every receiving session showing
    /// the last message.
    pub all_elapsed_s: f64,
    /// `messages / all_elapsed_s`.
    pub all_messages_per_s: f64,
    /// From the first measured `send` to the sender's `Delivered` for the
    /// last message (the server stored it for every recipient).
    pub delivered_elapsed_s: f64,
    /// From calling `send` to member 1 showing the message.
    pub latency: Latency,
    /// How long `send` took to return (the message queued and the state
    /// file written).
    pub send: Latency,
    /// Largest size of the sender's state file seen during the run.
    pub sender_state_bytes: u64,
    /// Largest size of member 1's state file seen during the run.
    pub receiver_state_bytes: u64,
    /// Every member's state file size after the sessions closed, by
    /// member (the sender first; a member added later has seen fewer
    /// epochs).
    pub final_state_bytes: Vec<u64>,
    /// One state file write at the sender's size, timed after the run.
    pub sender_persist: PersistProbe,
    /// One state file write at member 1's size, timed after the run.
    pub receiver_persist: PersistProbe,
    /// Times a session lost its connection and reconnected.
    pub reconnects: u64,
    /// Messages the bare long-polls of the members without a session
    /// took while measuring.
    pub drained: u64,
    /// Server-side figures over the measured window.
    pub server: Option<SessionServerFigures>,
}

/// What one state file write costs at a given size, measured with the
/// client library's own `state_file` functions on a file beside the
/// sessions' state files.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PersistProbe {
    /// Plaintext bytes sealed (the state file's size less its header and
    /// tag).
    pub plaintext_bytes: u64,
    /// Mean time to seal (XChaCha20-Poly1305), microseconds.
    pub seal_us: f64,
    /// Mean time of `save_with_key`: seal, write a temporary file, fsync
    /// it, rename it over the state file, fsync the directory;
    /// microseconds.
    pub save_us: f64,
}

/// The server's figures over the measured window, from its metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionServerFigures {
    /// Group commits (fsyncs) completed.
    pub fsyncs: f64,
    /// `fsyncs / messages`.
    pub fsyncs_per_message: f64,
    /// `enqueue`, `enqueueBatch` and `enqueueMany` requests.
    pub enqueues: f64,
    /// Their mean time in the server, fsync wait included, ms.
    pub enqueue_ms_mean: f64,
    /// Long-polls (`fetchWaitChannels`) answered.
    pub waits: f64,
    /// Messages shown by receivers per long-poll.
    pub messages_per_wait: f64,
}

/// Messages sent and shown by every member before measuring.
pub const WARMUP_MESSAGES: u64 = 20;
/// Digits of the message number at the start of each text.
pub const SEQ_DIGITS: usize = 12;
/// Messages a bare receiver takes per long-poll (as a session does).
const DRAIN_LIMIT: u32 = 100;
/// How long a bare receiver's long-poll waits.
const DRAIN_WAIT_MS: u64 = 5_000;
/// Pause of a bare receiver after a failed long-poll.
const DRAIN_WAIT_PAUSE: Duration = Duration::from_millis(100);
/// Longest wait for the next event before a run is declared stuck.
const PATIENCE: Duration = Duration::from_secs(60);
/// The members' state file password (each session derives its key once,
/// at create).
const PASSWORD: &str = "qpq-bench session password";
/// The group's name.
const GROUP: &str = "bench";
/// How often (in messages shown by member 1) the state files' sizes are
/// read.
const SIZE_EVERY: u64 = 50;
/// State file writes timed per [`PersistProbe`].
const PROBE_SAVES: u32 = 20;
/// Bytes a state file adds to its plaintext: a 56-byte header with a
/// 16-byte salt, and the 16-byte tag.
const STATE_FILE_OVERHEAD_BYTES: u64 = 56 + 16 + 16;

/// Runs the session workload described by `config`. Builds its own tokio
/// runtimes (one for the sessions, one for an in-process server), so call
/// it from outside any runtime.
pub fn run(config: SessionLoad) -> anyhow::Result<SessionReport> {
    if !config.workload.is_session() {
        bail!("not a session workload: {:?}", config.workload);
    }
    if config.members < 2 {
        bail!("--members must be at least 2 (a sender and a receiver)");
    }
    if !(1..config.members).contains(&config.receiving_sessions.unwrap_or(1)) {
        bail!("--receiving-sessions must be between 1 and --members - 1");
    }
    if config.messages == 0 || config.in_flight == 0 {
        bail!("--count and --in-flight must be at least 1");
    }
    if config.workload == Workload::SessionLatency
        && (config.in_flight != 1 || config.undelivered_max.is_some())
    {
        bail!("session-latency sends one message at a time (--in-flight 1, no --undelivered-max)");
    }
    if config.undelivered_max.is_some() && config.in_flight != 1 {
        bail!("--undelivered-max paces one send at a time (--in-flight 1)");
    }
    if config.undelivered_max == Some(0) {
        bail!("--undelivered-max must be at least 1");
    }
    if config.text_bytes < SEQ_DIGITS {
        bail!("the session workloads need a payload of at least {SEQ_DIGITS} bytes");
    }
    let parent = config.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("qpq-bench-session-")
        .tempdir_in(&parent)
        .with_context(|| format!("making a directory in {}", parent.display()))?;
    let clients = tokio::runtime::Builder::new_multi_thread()
        .thread_name("qpq-bench")
        .enable_all()
        .build()?;
    match &config.target {
        Target::InProcess(durability) => {
            let servers = tokio::runtime::Builder::new_multi_thread()
                .thread_name("qpq-server")
                .enable_all()
                .build()?;
            let data = dir.path().join("server");
            std::fs::create_dir(&data)?;
            let server = servers.block_on(async {
                InProcessServer::start_with(&data, bench_setup(*durability, true))
            });
            let report = clients.block_on(drive(
                &config,
                dir.path(),
                &server.addr.to_string(),
                &server.trust(),
                Metered::InProcess(&server),
            ));
            servers.block_on(server.stop());
            report
        }
        Target::Running {
            server,
            trust,
            metrics_url,
        } => clients.block_on(drive(
            &config,
            dir.path(),
            server,
            trust,
            match metrics_url {
                Some(url) => Metered::Url(url),
                None => Metered::No,
            },
        )),
    }
}

/// Where the server's metrics come from.
#[derive(Clone, Copy)]
enum Metered<'a> {
    InProcess(&'a InProcessServer),
    Url(&'a str),
    No,
}

impl Metered<'_> {
    async fn samples(self) -> anyhow::Result<Option<Samples>> {
        match self {
            Metered::InProcess(s) => Ok(s.metrics().map(|m| Samples::parse(&m.encode()))),
            Metered::Url(url) => Ok(Some(scrape(url).await?)),
            Metered::No => Ok(None),
        }
    }
}

/// One member: its session and its state file.
struct Member {
    session: Arc<Session>,
    state: PathBuf,
}

/// Where the members' subscribers' events arrive: the member, what it
/// saw, and when.
type SeenRx = mpsc::UnboundedReceiver<(usize, Seen, Instant)>;

/// What a member's subscriber saw.
#[derive(Debug)]
enum Seen {
    /// A message, by its number.
    Shown(u64),
    /// One of this member's messages reached every recipient's queue.
    Delivered,
    /// The connection broke; the session reconnects.
    Reconnecting,
    /// A warning, a tampering report or an unexpected text: the run fails.
    Trouble(String),
}

async fn drive(
    config: &SessionLoad,
    dir: &Path,
    server: &str,
    trust: &ServerTrust,
    metered: Metered<'_>,
) -> anyhow::Result<SessionReport> {
    let setup_start = Instant::now();
    let (mut members, mut seen) =
        form_group(config.members, dir, server, trust, config.direct).await?;
    let sender = members[0].session.clone();

    let total = WARMUP_MESSAGES + config.messages;
    let mut t = Tracker::new(config.members, total);
    for seq in 0..WARMUP_MESSAGES {
        sender.send(GROUP, &text(seq, config.text_bytes)).await?;
        t.until(&mut seen, "a warm-up message", |t| t.shown_by(1, seq))
            .await?;
    }
    t.until(&mut seen, "every member to show the warm-up", |t| {
        t.all_shown(WARMUP_MESSAGES) && t.delivered.len() as u64 >= WARMUP_MESSAGES
    })
    .await?;
    let receivers = config.receiving_sessions.unwrap_or(config.members - 1);
    let drained = Arc::new(AtomicU64::new(0));
    let mut drains = Vec::new();
    for m in members.drain(receivers + 1..) {
        drains.push(hand_over(m, server, trust, drained.clone()).await?);
    }
    t.receivers = receivers;
    let setup_s = setup_start.elapsed().as_secs_f64();

    t.bar = progress_bar(config);
    t.states = Some((members[0].state.clone(), members[1].state.clone()));
    let before = metered.samples().await?;
    drained.store(0, Ordering::Relaxed);
    let measured = WARMUP_MESSAGES..total;
    let window = measured.start as usize..measured.end as usize;
    let (starts, send_hist) =
        if config.workload == Workload::SessionLatency || config.undelivered_max.is_some() {
            // One send at a time, each after a wait: for the previous message
            // to be shown (latency) or for room under --undelivered-max.
            let mut starts = Vec::new();
            let mut send_hist = new_histogram();
            for seq in measured.clone() {
                if let Some(most) = config.undelivered_max {
                    // Messages 0..seq were sent; `delivered` of them are stored.
                    t.until(&mut seen, "room under --undelivered-max", |t| {
                        seq - (t.delivered.len() as u64) < most
                    })
                    .await?;
                }
                let start = Instant::now();
                sender.send(GROUP, &text(seq, config.text_bytes)).await?;
                record(&mut send_hist, start.elapsed());
                starts.push(start);
                if config.workload == Workload::SessionLatency {
                    t.until(&mut seen, "a message", |t| t.shown_by(1, seq))
                        .await?;
                }
            }
            (starts, send_hist)
        } else {
            let sending = tokio::spawn(send_all(
                sender.clone(),
                measured.clone(),
                config.text_bytes,
                config.in_flight,
            ));
            // Taking events while the sender runs moves the progress bar.
            t.until(&mut seen, "the receivers to show every message", |t| {
                t.all_shown(total)
            })
            .await?;
            sending.await.context("sender task")??
        };
    t.until(&mut seen, "the receivers to show every message", |t| {
        t.all_shown(total)
    })
    .await?;
    t.until(&mut seen, "the sender's deliveries", |t| {
        t.delivered.len() as u64 >= total
    })
    .await?;
    let after = metered.samples().await?;
    let drained = drained.load(Ordering::Relaxed);
    for d in drains {
        d.abort();
    }
    t.bar.finish_and_clear();
    t.read_sizes();

    // Every figure is taken from the first measured send.
    let first = *starts.first().context("no message sent")?;
    let since = |at: Option<Instant>| at.map_or(0.0, |a| a.duration_since(first).as_secs_f64());
    let last_at = |member: usize| {
        t.shown[member][window.clone()]
            .iter()
            .flatten()
            .max()
            .copied()
    };
    let elapsed_s = since(last_at(1));
    let all_elapsed_s = since((1..=receivers).filter_map(last_at).max());
    let delivered_elapsed_s = since(t.delivered.last().copied());
    let mut hist = new_histogram();
    for (start, shown) in starts.iter().zip(&t.shown[1][window]) {
        if let Some(shown) = shown {
            record(&mut hist, shown.duration_since(*start));
        }
    }
    let shown_in_window = config.messages * receivers as u64;
    let server = match (before, after) {
        (Some(b), Some(a)) => Some(server_figures(&b, &a, config.messages, shown_in_window)),
        _ => None,
    };

    let mut closing = JoinSet::new();
    drop(sender);
    let states: Vec<PathBuf> = (0..config.members)
        .map(|i| dir.join(state_name(i)))
        .collect();
    for m in members {
        let session = m.session;
        closing.spawn(async move { session.close().await });
    }
    while let Some(r) = closing.join_next().await {
        r.context("close task")?.context("closing a session")?;
    }
    let final_state_bytes = states.iter().map(|p| file_bytes(p)).collect();
    let (sender_state_bytes, receiver_state_bytes) = t.sizes;
    let probe_path = dir.join("probe.qpq");
    let (sender_persist, receiver_persist) = tokio::task::spawn_blocking(move || {
        anyhow::Ok((
            probe(&probe_path, sender_state_bytes)?,
            probe(&probe_path, receiver_state_bytes)?,
        ))
    })
    .await
    .context("probe task")??;

    let m = config.messages as f64;
    Ok(SessionReport {
        workload: config.workload,
        members: config.members,
        receiving_sessions: receivers,
        messages: config.messages,
        text_bytes: config.text_bytes,
        in_flight: config.in_flight,
        undelivered_max: config.undelivered_max,
        direct: config.direct,
        setup_s,
        elapsed_s,
        messages_per_s: m / elapsed_s,
        all_elapsed_s,
        all_messages_per_s: m / all_elapsed_s,
        delivered_elapsed_s,
        latency: latency(&hist),
        send: latency(&send_hist),
        sender_state_bytes,
        receiver_state_bytes,
        final_state_bytes,
        sender_persist,
        receiver_persist,
        reconnects: t.reconnects,
        drained,
        server,
    })
}

/// Member `i`'s state file name.
fn state_name(i: usize) -> String {
    format!("member-{i}.qpq")
}

/// Creates `members` sessions (member 0 first), each registered and
/// subscribed, and puts them in one group made by member 0; returns them
/// with the channel where their subscribers' events arrive. With
/// `direct`, the sessions are then opened again with direct links to each
/// other, and it returns once every link is up.
async fn form_group(
    members: usize,
    dir: &Path,
    server: &str,
    trust: &ServerTrust,
    direct: bool,
) -> anyhow::Result<(Vec<Member>, SeenRx)> {
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let mut all = Vec::with_capacity(members);
    // One at a time: each create derives a key with Argon2id (128 MiB).
    for i in 0..members {
        let state = dir.join(state_name(i));
        let session_config = SessionConfig {
            state: state.clone(),
            server: server.to_owned(),
            trust: trust.clone(),
            direct: None,
        };
        let session = Session::create(session_config, PASSWORD)
            .await
            .with_context(|| format!("creating member {i}'s session"))?;
        let events = session.subscribe().await?;
        tokio::spawn(watch(i, events, seen_tx.clone()));
        all.push(Member {
            session: Arc::new(session),
            state,
        });
    }
    let mut registering = JoinSet::new();
    for m in &all {
        let s = m.session.clone();
        registering.spawn(async move { s.register(1).await });
    }
    while let Some(r) = registering.join_next().await {
        r.context("register task")?.context("register")?;
    }
    let sender = &all[0].session;
    sender.create_group(GROUP, false).await?;
    for m in &all[1..] {
        sender
            .add(GROUP, m.session.identity_key())
            .await
            .context("adding a member")?;
    }
    if direct {
        all = with_direct_links(all, server, trust, &seen_tx).await?;
    }
    Ok((all, seen))
}

/// Closes every member's session and opens it again with direct links to
/// all the others, on loopback ports picked now; returns once every
/// member reaches every other directly.
async fn with_direct_links(
    all: Vec<Member>,
    server: &str,
    trust: &ServerTrust,
    seen_tx: &mpsc::UnboundedSender<(usize, Seen, Instant)>,
) -> anyhow::Result<Vec<Member>> {
    let mut addrs = Vec::with_capacity(all.len());
    for _ in &all {
        // A free port, given up just before its session binds it.
        let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
        addrs.push(probe.local_addr()?);
    }
    let keys: Vec<_> = all.iter().map(|m| m.session.identity_key()).collect();
    for m in &all {
        m.session.close().await?;
    }
    let mut reopened = Vec::with_capacity(all.len());
    for (i, m) in all.into_iter().enumerate() {
        let peers = keys
            .iter()
            .zip(&addrs)
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (k, a))| (quicproquo_core::types::hex(k.as_bytes()), a.to_string()))
            .collect();
        let config = SessionConfig {
            state: m.state.clone(),
            server: server.to_owned(),
            trust: trust.clone(),
            direct: Some(DirectConfig {
                listen: Some(addrs[i]),
                peers,
                mdns: false,
            }),
        };
        let (session, events) = Session::open_with_events(config, PASSWORD)
            .await
            .with_context(|| format!("opening member {i}'s session again"))?;
        tokio::spawn(watch(i, events, seen_tx.clone()));
        reopened.push(Member {
            session: Arc::new(session),
            state: m.state,
        });
    }
    let until = Instant::now() + PATIENCE;
    for m in &reopened {
        while m.session.direct_links().await?.len() + 1 < keys.len() {
            if Instant::now() > until {
                bail!("direct links did not come up within {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(reopened)
}

/// Closes member `m`'s session and starts a bare receiver in its place: a
/// connection authenticated as the member that long-polls the group's
/// channel and acknowledges what it gets (counted in `drained`), without
/// decrypting or persisting anything.
async fn hand_over(
    m: Member,
    server: &str,
    trust: &ServerTrust,
    drained: Arc<AtomicU64>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let group = m.session.groups().await?;
    let channel = group
        .iter()
        .find(|g| g.name == GROUP)
        .context("a member without the group")?
        .channel_id;
    let me = m.session.identity_key();
    let session = Arc::try_unwrap(m.session).map_err(|_| anyhow::anyhow!("session in use"))?;
    session.close().await?;
    let plain = state_file::load(&m.state, PASSWORD.as_bytes())?;
    let machine = ClientMachine::restore(&plain, [0; 32])
        .map_err(|e| anyhow::anyhow!("restoring a member's state: {e}"))?;
    let mut client = Client::connect(server, trust).await?;
    client.authenticate(machine.signing_key()).await?;
    Ok(tokio::spawn(async move {
        let mut cursor = 0;
        loop {
            match client
                .fetch_wait(me, channel, cursor, DRAIN_LIMIT, DRAIN_WAIT_MS)
                .await
            {
                Ok(f) => {
                    if let Some(last) = f.messages.last() {
                        cursor = last.seq;
                    }
                    drained.fetch_add(f.messages.len() as u64, Ordering::Relaxed);
                }
                // Nothing to report to: the run goes on without this
                // member, and the figures say how much it drained.
                Err(_) => tokio::time::sleep(DRAIN_WAIT_PAUSE).await,
            }
        }
    }))
}

/// Sends messages `seqs` from `session`, keeping up to `in_flight` sends
/// queued at once; returns when each send started, in message order, and
/// how long each took.
async fn send_all(
    session: Arc<Session>,
    seqs: std::ops::Range<u64>,
    text_bytes: usize,
    in_flight: usize,
) -> anyhow::Result<(Vec<Instant>, Histogram<u64>)> {
    let first = seqs.start;
    let mut starts = vec![None; (seqs.end - seqs.start) as usize];
    let mut hist = new_histogram();
    let mut sending = JoinSet::new();
    for seq in seqs {
        if sending.len() >= in_flight
            && let Some(r) = sending.join_next().await
        {
            let (seq, start) = sent(r, &mut hist)?;
            starts[(seq - first) as usize] = Some(start);
        }
        let (session, text) = (session.clone(), text(seq, text_bytes));
        sending.spawn(async move {
            let start = Instant::now();
            let result = session.send(GROUP, &text).await;
            let took = start.elapsed();
            (
                seq,
                start,
                took,
                result.map(drop).map_err(anyhow::Error::from),
            )
        });
    }
    while let Some(r) = sending.join_next().await {
        let (seq, start) = sent(r, &mut hist)?;
        starts[(seq - first) as usize] = Some(start);
    }
    let starts = starts.into_iter().collect::<Option<Vec<_>>>();
    Ok((starts.context("a send did not finish")?, hist))
}

/// A finished send task of [`send_all`]: its time recorded, its number and
/// start returned.
fn sent(
    r: Result<(u64, Instant, Duration, anyhow::Result<()>), tokio::task::JoinError>,
    hist: &mut Histogram<u64>,
) -> anyhow::Result<(u64, Instant)> {
    let (seq, start, took, result) = r.context("send task")?;
    result?;
    record(hist, took);
    Ok((seq, start))
}

/// Forwards what member `member`'s subscriber sees, stamped on arrival.
async fn watch(
    member: usize,
    mut events: mpsc::Receiver<Event>,
    out: mpsc::UnboundedSender<(usize, Seen, Instant)>,
) {
    while let Some(e) = events.recv().await {
        let at = Instant::now();
        let seen = match e {
            Event::Message { text, .. } => match seq_of(&text) {
                Some(seq) => Seen::Shown(seq),
                None => Seen::Trouble(format!("a text this run did not send: {text:.40}")),
            },
            Event::Delivered { .. } => Seen::Delivered,
            Event::Reconnecting { .. } => Seen::Reconnecting,
            Event::Warning { message } => Seen::Trouble(message),
            Event::Tampering { what } => Seen::Trouble(format!("tampering: {what}")),
            _ => continue,
        };
        if out.send((member, seen, at)).is_err() {
            return;
        }
    }
}

/// Everything the members' subscribers saw, by member and message number.
struct Tracker {
    /// When each member showed each message (member 0, the sender, shows
    /// none).
    shown: Vec<Vec<Option<Instant>>>,
    /// Messages each member showed.
    counts: Vec<u64>,
    /// When the sender saw each `Delivered`, in order.
    delivered: Vec<Instant>,
    /// Members 1 to `receivers` receive through their sessions.
    receivers: usize,
    reconnects: u64,
    bar: ProgressBar,
    /// The sender's and member 1's state files, once measuring.
    states: Option<(PathBuf, PathBuf)>,
    /// Largest sizes seen of those files.
    sizes: (u64, u64),
}

impl Tracker {
    fn new(members: usize, total: u64) -> Tracker {
        Tracker {
            shown: vec![vec![None; total as usize]; members],
            counts: vec![0; members],
            delivered: Vec::new(),
            receivers: members - 1,
            reconnects: 0,
            bar: ProgressBar::hidden(),
            states: None,
            sizes: (0, 0),
        }
    }

    fn shown_by(&self, member: usize, seq: u64) -> bool {
        self.shown[member][seq as usize].is_some()
    }

    /// Every receiving session showed `n` messages.
    fn all_shown(&self, n: u64) -> bool {
        self.counts[1..=self.receivers].iter().all(|c| *c >= n)
    }

    /// Takes events until `done` holds; fails after [`PATIENCE`] without
    /// one, or on anything a run must not see.
    async fn until(
        &mut self,
        seen: &mut SeenRx,
        what: &str,
        done: impl Fn(&Tracker) -> bool,
    ) -> anyhow::Result<()> {
        while !done(self) {
            let next = tokio::time::timeout(PATIENCE, seen.recv())
                .await
                .with_context(|| format!("no event for {PATIENCE:?} waiting for {what}"))?;
            let (member, seen, at) = next.context("every session stopped")?;
            self.take(member, seen, at)?;
        }
        Ok(())
    }

    fn take(&mut self, member: usize, seen: Seen, at: Instant) -> anyhow::Result<()> {
        match seen {
            Seen::Shown(seq) => {
                let Some(slot) = self
                    .shown
                    .get_mut(member)
                    .and_then(|m| m.get_mut(seq as usize))
                    .filter(|_| member > 0)
                else {
                    bail!("member {member} showed message {seq}, which it was not sent");
                };
                if slot.replace(at).is_some() {
                    bail!("member {member} showed message {seq} twice");
                }
                self.counts[member] += 1;
                if member == 1 && seq >= WARMUP_MESSAGES {
                    self.bar.inc(1);
                    if self.counts[1].is_multiple_of(SIZE_EVERY) {
                        self.read_sizes();
                    }
                }
            }
            Seen::Delivered if member == 0 => self.delivered.push(at),
            Seen::Delivered => bail!("member {member} was told of a delivery it never sent"),
            Seen::Reconnecting => self.reconnects += 1,
            Seen::Trouble(what) => bail!("member {member}: {what}"),
        }
        Ok(())
    }

    /// Notes the state files' sizes (a file is replaced whole at every
    /// write, so a failed read is a rename in progress, skipped).
    fn read_sizes(&mut self) {
        if let Some((sender, receiver)) = &self.states {
            self.sizes.0 = self.sizes.0.max(file_bytes(sender));
            self.sizes.1 = self.sizes.1.max(file_bytes(receiver));
        }
    }
}

/// The size of the file at `path`, 0 if it cannot be read.
fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Times [`PROBE_SAVES`] seals and saves of a plaintext as large as a state
/// file of `file_bytes`, at `path`.
fn probe(path: &Path, file_bytes: u64) -> anyhow::Result<PersistProbe> {
    let plaintext_bytes = file_bytes.saturating_sub(STATE_FILE_OVERHEAD_BYTES);
    let plaintext = vec![0x5a; plaintext_bytes as usize];
    // The cost of the key's derivation does not matter here; the floor is
    // quickest.
    let key = StateKey::derive(PASSWORD.as_bytes(), KdfParams::FLOOR, &mut OsRng)?;
    let start = Instant::now();
    for _ in 0..PROBE_SAVES {
        key.seal(&plaintext, &mut OsRng)?;
    }
    let seal = start.elapsed();
    let start = Instant::now();
    for _ in 0..PROBE_SAVES {
        state_file::save_with_key(path, &key, &plaintext)?;
    }
    let save = start.elapsed();
    let mean_us = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(PROBE_SAVES);
    Ok(PersistProbe {
        plaintext_bytes,
        seal_us: mean_us(seal),
        save_us: mean_us(save),
    })
}

/// Message `seq`'s text: its number, then dots up to `bytes`.
fn text(seq: u64, bytes: usize) -> String {
    let mut s = format!("{seq:0SEQ_DIGITS$}");
    s.extend(std::iter::repeat_n('.', bytes.saturating_sub(s.len())));
    s
}

fn seq_of(text: &str) -> Option<u64> {
    text.get(..SEQ_DIGITS)?.parse().ok()
}

fn server_figures(
    before: &Samples,
    after: &Samples,
    messages: u64,
    shown: u64,
) -> SessionServerFigures {
    let delta = |name: &str, labels: &[&str]| after.sum(name, labels) - before.sum(name, labels);
    let both = |name: &str| {
        ["enqueue", "enqueueBatch", "enqueueMany"]
            .iter()
            .map(|m| delta(name, &[&format!("method=\"{m}\"")]))
            .sum::<f64>()
    };
    let fsyncs = delta("qpq_fsyncs_total", &[]);
    let enqueues = both("qpq_requests_total");
    let count = both("qpq_request_duration_seconds_count");
    let waits = delta("qpq_requests_total", &["method=\"fetchWaitChannels\""]);
    let per = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    SessionServerFigures {
        fsyncs,
        fsyncs_per_message: per(fsyncs, messages as f64),
        enqueues,
        enqueue_ms_mean: per(both("qpq_request_duration_seconds_sum") * 1e3, count),
        waits,
        messages_per_wait: per(shown as f64, waits),
    }
}

fn progress_bar(config: &SessionLoad) -> ProgressBar {
    if !config.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(config.messages);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {wide_bar} {pos}/{len} messages {per_sec}")
    {
        bar.set_style(style);
    }
    bar
}

impl SessionReport {
    /// The report as the human-readable lines `qpq-bench` prints.
    pub fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1e3;
        let l = &self.latency;
        let s = &self.send;
        let mut out = format!(
            "workload {} | {} members (1 sender, {} receiving sessions, {} bare receivers) | {} messages of {} B | {} send(s) queued at once\n\
             {}; setup (untimed) {:.2} s\n\
             member 1 showed the last message after {:.3} s: {:.0} messages/s\n\
             every receiving session showed it after {:.3} s: {:.0} messages/s; the sender's last Delivered after {:.3} s\n\
             send -> shown at member 1: p50 {:.3} ms | p99 {:.3} ms | p99.9 {:.3} ms | max {:.3} ms | mean {:.3} ms\n\
             send returned after: p50 {:.3} ms | p99 {:.3} ms | max {:.3} ms | mean {:.3} ms\n\
             state files (largest seen): sender {} B, member 1 {} B; receivers at the end: {} to {} B\n\
             one state write after the run (seal / save with fsyncs): sender {:.3} / {:.3} ms, member 1 {:.3} / {:.3} ms",
            serde_json::to_value(self.workload)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.members,
            self.receiving_sessions,
            self.members - 1 - self.receiving_sessions,
            self.messages,
            self.text_bytes,
            self.in_flight,
            match self.undelivered_max {
                Some(n) => format!("the sender kept at most {n} message(s) waiting for Delivered"),
                None => "the sender sent as soon as send returned".to_owned(),
            },
            self.setup_s,
            self.elapsed_s,
            self.messages_per_s,
            self.all_elapsed_s,
            self.all_messages_per_s,
            self.delivered_elapsed_s,
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            l.mean_us / 1e3,
            ms(s.p50_us),
            ms(s.p99_us),
            ms(s.max_us),
            s.mean_us / 1e3,
            self.sender_state_bytes,
            self.receiver_state_bytes,
            self.final_state_bytes.iter().skip(1).min().unwrap_or(&0),
            self.final_state_bytes.iter().skip(1).max().unwrap_or(&0),
            self.sender_persist.seal_us / 1e3,
            self.sender_persist.save_us / 1e3,
            self.receiver_persist.seal_us / 1e3,
            self.receiver_persist.save_us / 1e3,
        );
        if let Some(f) = &self.server {
            out += &format!(
                "\nserver: {:.0} fsyncs ({:.2} per message), {:.0} enqueues (mean {:.3} ms in the server), \
                 {:.0} long-polls ({:.2} messages shown per long-poll)",
                f.fsyncs,
                f.fsyncs_per_message,
                f.enqueues,
                f.enqueue_ms_mean,
                f.waits,
                f.messages_per_wait
            );
        }
        if self.receiving_sessions + 1 < self.members {
            out += &format!(
                "\nbare receivers took {} messages while measuring",
                self.drained
            );
        }
        if self.direct {
            out += "\nmembers kept direct links to each other";
        }
        if self.reconnects > 0 {
            out += &format!("\nreconnects: {}", self.reconnects);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `workload` with three members and a few messages: the run
    /// fails if a receiver misses a message, shows one twice or warns.
    fn check(
        workload: Workload,
        in_flight: usize,
        receiving_sessions: Option<usize>,
        direct: bool,
    ) -> SessionReport {
        let report = run(SessionLoad {
            workload,
            target: Target::InProcess(Durability::Fsync),
            members: 3,
            receiving_sessions,
            messages: 5,
            text_bytes: 64,
            in_flight,
            undelivered_max: None,
            dir: None,
            progress: false,
            direct,
        })
        .expect("the run completes");
        assert_eq!(report.messages, 5);
        assert!(report.server.is_some(), "the in-process server is metered");
        report
    }

    #[test]
    fn latency_run_shows_every_message_to_every_member() {
        check(Workload::SessionLatency, 1, None, false);
    }

    #[test]
    fn throughput_run_with_sends_queued_and_a_bare_receiver_shows_every_message() {
        check(Workload::SessionThroughput, 4, Some(1), false);
    }

    #[test]
    fn a_direct_run_shows_every_message_and_the_server_stores_none() {
        let report = check(Workload::SessionLatency, 1, None, true);
        let server = report.server.expect("metered");
        assert_eq!(server.enqueues, 0.0, "every message went directly");
    }
}
