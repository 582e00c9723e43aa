//! `qpq-bench`: the load generator. Drives a running qpq-server (or the
//! bare-QUIC baseline server it also contains) and prints throughput and
//! latency percentiles; `--json` prints one JSON object instead.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use quicproquo_benches::echo::EchoServer;
use quicproquo_benches::load::{self, LoadConfig, Workload};
use quicproquo_benches::session::{self, SessionLoad, Target};
use quicproquo_client::ServerTrust;
use quicproquo_core::node::Durability;

const WORKLOADS: &str = "\
Workloads (--workload); one operation is:
  enqueue        one enqueue of P bytes to the connection's own queues. A slot
                 moves to a fresh channel every 5,000 messages, so no queue
                 reaches the server's depth limit (10,000).
  enqueue+fetch  one enqueue to the slot's own queue, then one fetch with the
                 cursor: it acknowledges the previous message and returns the
                 new one (recipients drain with cursors).
  fetch          queues are first filled with --prefill messages per slot (not
                 timed); one fetch with the cursor returns up to --fetch-limit
                 messages and acknowledges the previous batch. Reports items/s,
                 the drain rate. Ends early once the queues are empty.
  fetchwait      every connection long-polls its own queue with fetchWait while
                 its S slots enqueue to the next connection's queue; one
                 operation is one delivered message, latency is
                 enqueue-to-delivery (the send time travels in the payload).
  keypackages    one KeyPackage upload of P bytes to the connection's own pool
                 and one pop (fetchKeyPackage) of it. The server's defaults
                 allow only a few pops per second per target: start it with
                 QPQ_KEY_FETCH_PER_PAIR_PER_SEC, QPQ_KEY_FETCH_PER_PAIR_BURST,
                 QPQ_KEY_PACKAGE_FETCH_PER_TARGET_PER_SEC and
                 QPQ_KEY_PACKAGE_FETCH_PER_TARGET_BURST raised (e.g. 1000000).
  mixed          the soak's mix (benches/soak.sh): every connection long-polls
                 its own queue with fetchWait, acknowledging with its cursor,
                 while its S slots cycle through four enqueues to the next
                 connection, an enqueueBatch to the next three, a KeyPackage
                 upload to its own pool, a pop from the next connection's
                 pool and a KeyPackage count. One operation is one request;
                 items are messages the long-polls delivered. Raise the
                 KeyPackage fetch limits as for keypackages.
  quic-echo      the bare-QUIC baseline against `qpq-bench baseline-server`:
                 one stream carrying the bytes of an enqueue request of P bytes,
                 answered with the bytes of an enqueue reply, over the same
                 QUIC/TLS configuration as qpq-server.
  session-latency
                 the long-lived client: --members sessions (default 2), each on
                 its own state file, in one group; member 0 sends one message
                 of P bytes and waits until member 1's subscriber shows it, -n
                 times (default 1,000). Latency is send -> shown.
  session-throughput
                 as session-latency, but member 0 sends -n messages back to
                 back (S sends queued at once, or each once fewer than
                 --undelivered-max are waiting for Delivered); messages/s from
                 the first send until member 1, and every receiving member,
                 showed the last.
                 Every other member receives throughout: through its own
                 Session, or, beyond --receiving-sessions K, through a bare
                 long-poll that acknowledges without decrypting or writing
                 (the server's work for a receiver, not its device's).
  The session workloads start a qpq-server in this process (its own
  runtime, --durability fsync by default, rate limits lifted, metrics read
  directly) unless --server is given; they ignore --connections, --duration
  and --warmup (20 warm-up messages every member shows are sent first). A
  session writes its whole encrypted state file, fsynced, before a send
  returns and before it shows a message, so --state-dir's file system
  decides much of the result (tmpfs makes fsync free).

Every connection authenticates as its own fresh identity. The server limits
enqueues per sender identity (default 10,000/s, burst 20,000): a run that
pushes one connection past that sees rateLimited errors; raise it for
benchmarks with QPQ_ENQUEUE_PER_SENDER_PER_SEC / QPQ_ENQUEUE_PER_SENDER_BURST
on the server.

With --metrics URL (the server's metrics_listen endpoint) the report adds the
server's fsyncs and messages per fsync over the measured window.";

#[derive(Debug, Parser)]
#[command(
    name = "qpq-bench",
    version,
    about = "Load generator for qpq-server: C connections x S requests in flight, payload P, \
for a duration or a count; prints throughput and p50/p99/p99.9 latency.",
    after_long_help = WORKLOADS,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Server address, host:port, or several nodes of one deployment
    /// (one database, one certificate) comma-separated, connections spread
    /// over them in turn [default: localhost:7443; the session workloads
    /// start a server in this process unless given].
    #[arg(long, env = "QPQ_SERVER")]
    server: Option<String>,
    /// SHA-256 fingerprint of the server's certificate (64 hex digits, as
    /// qpq-server or `qpq-bench baseline-server` prints it).
    #[arg(long, env = "QPQ_SERVER_FINGERPRINT", conflicts_with = "server_ca")]
    server_fingerprint: Option<String>,
    /// CA certificate file (PEM) that issued the server's certificate.
    #[arg(long, env = "QPQ_SERVER_CA")]
    server_ca: Option<PathBuf>,
    /// The workload; see below.
    #[arg(long, short, value_enum, default_value = "enqueue")]
    workload: Workload,
    /// Connections (C), each authenticated as its own identity.
    #[arg(long, short, default_value_t = 50)]
    connections: usize,
    /// Requests in flight per connection (S).
    #[arg(long, short = 's', default_value_t = 1)]
    in_flight: usize,
    /// Payload bytes (P).
    #[arg(long, short, default_value_t = 1024)]
    payload: usize,
    /// Seconds to measure (after the warm-up).
    #[arg(long, short, default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many operations instead of after --duration (no
    /// warm-up); messages measured for the session workloads [default
    /// there: 1000].
    #[arg(long, short = 'n', alias = "messages")]
    count: Option<u64>,
    /// Members of the group, the sender included (session workloads).
    #[arg(long, default_value_t = 2)]
    members: usize,
    /// Members after the sender that keep their Session while measuring
    /// [default: all]; the others receive through a bare long-poll that
    /// acknowledges without decrypting or writing (session workloads).
    #[arg(long)]
    receiving_sessions: Option<usize>,
    /// session-throughput: wait before a send while this many messages
    /// are not yet Delivered (keeps the sender's outbox and state file
    /// small) [default: send as soon as send returns].
    #[arg(long)]
    undelivered_max: Option<u64>,
    /// Session workloads: members keep direct links to each other on
    /// loopback, so messages go member to member with no server copy.
    #[arg(long)]
    direct: bool,
    /// Durability of the in-process server (session workloads without
    /// --server).
    #[arg(long, value_enum, default_value = "fsync")]
    durability: DurabilityArg,
    /// Directory for the session workloads' state files and in-process
    /// server data [default: the system's temporary directory].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Seconds to run before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Messages per fetch (fetch, fetchwait).
    #[arg(long, default_value_t = 100)]
    fetch_limit: u32,
    /// Messages enqueued into each slot's queue before a `fetch` run (at
    /// most the server's queue_depth_max).
    #[arg(long, default_value_t = 2_000)]
    prefill: u64,
    /// The server's Prometheus endpoint, e.g. http://127.0.0.1:9464/metrics,
    /// to report fsyncs and messages per fsync.
    #[arg(long, env = "QPQ_BENCH_METRICS")]
    metrics: Option<String>,
    /// Print one JSON object instead of text (and no progress bar).
    #[arg(long)]
    json: bool,
}

/// The in-process server's durability mode.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DurabilityArg {
    /// Replies wait for the fsync of their writes.
    Fsync,
    /// Replies go out at once; syncs run behind them.
    Buffered,
}

/// Messages a session workload measures unless --count says.
const SESSION_MESSAGES: u64 = 1_000;

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bare-QUIC baseline server: qpq-server's QUIC and TLS
    /// configuration answering every stream with the bytes of an enqueue
    /// reply. Prints its address and certificate fingerprint; runs until
    /// SIGINT/SIGTERM.
    BaselineServer {
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7444")]
        listen: SocketAddr,
        /// Directory for its generated certificate.
        #[arg(long, default_value = "qpq-echo-data")]
        data_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.command.is_none() && args.load.workload.is_session() {
        return session_run(args.load);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.command {
        Some(Command::BaselineServer { listen, data_dir }) => {
            rt.block_on(baseline_server(listen, data_dir))
        }
        None => rt.block_on(load_run(args.load)),
    }
}

/// How the server's certificate is trusted, from the flags.
fn trust(a: &LoadArgs) -> anyhow::Result<ServerTrust> {
    Ok(match (&a.server_fingerprint, &a.server_ca) {
        (Some(fp), _) => ServerTrust::fingerprint_hex(fp)?,
        (None, Some(ca)) => ServerTrust::CaFile(ca.clone()),
        (None, None) => {
            bail!("give --server-fingerprint or --server-ca (or QPQ_SERVER_FINGERPRINT)")
        }
    })
}

fn session_run(a: LoadArgs) -> anyhow::Result<()> {
    let target = match &a.server {
        None => Target::InProcess(match a.durability {
            DurabilityArg::Fsync => Durability::Fsync,
            DurabilityArg::Buffered => Durability::Buffered,
        }),
        Some(server) => Target::Running {
            server: server.clone(),
            trust: trust(&a)?,
            metrics_url: a.metrics.clone(),
        },
    };
    let report = session::run(SessionLoad {
        workload: a.workload,
        target,
        members: a.members,
        receiving_sessions: a.receiving_sessions,
        undelivered_max: a.undelivered_max,
        messages: a.count.unwrap_or(SESSION_MESSAGES),
        text_bytes: a.payload,
        in_flight: a.in_flight,
        dir: a.state_dir,
        progress: !a.json,
        direct: a.direct,
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

async fn load_run(a: LoadArgs) -> anyhow::Result<()> {
    let trust = trust(&a)?;
    let seconds = |s: f64, what: &str| {
        Duration::try_from_secs_f64(s).with_context(|| format!("--{what} must be >= 0"))
    };
    let config = LoadConfig {
        server: a.server.unwrap_or_else(|| "localhost:7443".to_owned()),
        trust,
        workload: a.workload,
        connections: a.connections,
        in_flight: a.in_flight,
        payload_bytes: a.payload,
        duration: seconds(a.duration, "duration")?,
        count: a.count,
        warmup: seconds(a.warmup, "warmup")?,
        fetch_limit: a.fetch_limit,
        prefill: a.prefill,
        metrics_url: a.metrics,
        progress: !a.json,
    };
    let report = load::run(config).await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

async fn baseline_server(listen: SocketAddr, data_dir: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let server = EchoServer::bind(listen, &data_dir)?;
    let hex: String = server
        .fingerprint
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Same two lines as qpq-server prints, so scripts read both alike.
    println!(
        "qpq-bench baseline-server listening on {} (UDP)",
        server.local_addr()?
    );
    println!("certificate SHA-256 fingerprint: {hex}");
    server.serve(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
