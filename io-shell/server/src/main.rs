//! `qpq-server`: runs the NodeService on its embedded defaults or the
//! configuration given by `qpq-server.toml`, `QPQ_*` variables and flags.

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use quicproquo_core::node::{Durability, NodeConfig, NodeService};
use quicproquo_server::config::{Args, ServerCommand, ServerConfig, Storage};
use quicproquo_server::metrics;
use quicproquo_server::observe::{Metrics, Observer, ServiceGauges, Summary};
use quicproquo_server::store::ShellStore;
use quicproquo_server::store::fjall_store::FjallStore;
use quicproquo_server::store::postgres::{self, PgOptions};
use quicproquo_server::{endpoint, health, serve, tls};
use rand_core::{OsRng, RngCore};

/// mimalloc, for the request path's many small allocations (see
/// Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.command {
        None => {}
        Some(ServerCommand::Migrate { from, to }) => {
            let (from, to) = (from.clone(), to.clone());
            return migrate(args, &from, &to);
        }
        Some(ServerCommand::Fingerprint) => return fingerprint(args),
        Some(ServerCommand::CheckConfig) => return check_config(args),
        Some(ServerCommand::Health { timeout_ms }) => {
            let timeout = Duration::from_millis(*timeout_ms);
            return health(args, timeout);
        }
        Some(ServerCommand::Completions { shell }) => {
            clap_complete::generate(
                *shell,
                &mut Args::command(),
                "qpq-server",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Some(ServerCommand::Man { out_dir }) => return man(out_dir.as_deref()),
        Some(ServerCommand::Backup { .. } | ServerCommand::Restore { .. }) => {
            return backup_or_restore(args);
        }
    }
    let config = ServerConfig::load(args)?;
    init_logging(&config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}

/// Logs to stderr through the configured filter (added to the default).
fn init_logging(config: &ServerConfig) -> anyhow::Result<()> {
    let filter = config.log_filter();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .with_context(|| format!("invalid log filter `{}`", config.log))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

async fn run(config: ServerConfig) -> anyhow::Result<()> {
    // The port first: a server that cannot listen leaves nothing behind
    // (no data directory, certificate or database).
    let socket =
        UdpSocket::bind(config.listen).with_context(|| format!("binding UDP {}", config.listen))?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let identity = match &config.tls {
        Some((cert, key)) => tls::load(cert, key)?,
        None => tls::load_or_generate(&config.data_dir)?,
    };
    if identity.generated {
        tracing::info!(path = %identity.cert_path.display(), "generated a self-signed certificate");
    }
    let reset_key = tls::load_or_generate_reset_key(&config.data_dir)?;
    let listener = Listener {
        socket,
        identity,
        reset_key,
    };
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    match &config.storage {
        Storage::Fjall => {
            let db_path = config.db_path();
            let store = FjallStore::open(&db_path)
                .with_context(|| format!("opening database {}", db_path.display()))?
                .with_reserve(config.storage_reserve_bytes);
            let node = NodeService::new(config.node.clone(), seed, store)
                .with_context(|| format!("opening database {}", db_path.display()))?;
            let db = db_path.display().to_string();
            // `qpq-server backup` asks the running server over this socket.
            #[cfg(unix)]
            let admin = quicproquo_server::backup::AdminSocket::start(
                &config.data_dir,
                node.store().reader(),
            )
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no admin socket: `qpq-server backup` cannot reach this server");
            })
            .ok();
            let served = serve_node(&config, listener, node, &db).await;
            #[cfg(unix)]
            if let Some(admin) = admin {
                admin.stop().await;
            }
            served
        }
        Storage::Postgres { url } => {
            let db = postgres::redact_url(url);
            let options = PgOptions {
                url: url.clone(),
                synchronous_commit: config.node.durability == Durability::Fsync,
            };
            // Replies wait for their turn's commit whatever the durability:
            // a turn the database rolls back must not have answered anyone.
            // `durability` sets the sessions' synchronous_commit instead.
            let node_config = NodeConfig {
                durability: Durability::Fsync,
                ..config.node.clone()
            };
            let node =
                tokio::task::block_in_place(|| postgres::open_node(&options, &node_config, seed))
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("opening the PostgreSQL store at {db}"))?;
            serve_node(&config, listener, node, &db).await
        }
    }
}

/// What the server listens with: its bound socket, its TLS identity and
/// its stateless-reset key.
struct Listener {
    socket: UdpSocket,
    identity: tls::TlsIdentity,
    reset_key: [u8; tls::RESET_KEY_BYTES],
}

/// Serves `node` (its store opened as `db` names) until shutdown.
async fn serve_node<S: ShellStore>(
    config: &ServerConfig,
    listener: Listener,
    node: NodeService<S>,
    db: &str,
) -> anyhow::Result<()> {
    let Listener {
        socket,
        identity,
        reset_key,
    } = listener;
    let fingerprint = quicproquo_core::types::hex(&identity.fingerprint());
    let server_config = endpoint::server_config(&identity, &config.transport)?;
    let endpoint = quinn::Endpoint::new(
        endpoint::endpoint_config(&reset_key),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = endpoint.local_addr()?;
    let shutdown = shutdown_signal().context("installing the SIGINT and SIGTERM handlers")?;
    // The fingerprint goes to stdout so scripts can read it; logs go to stderr.
    println!("qpq-server listening on {addr} (UDP)");
    println!("certificate SHA-256 fingerprint: {fingerprint}");
    tracing::info!(
        %addr,
        db,
        durability = ?config.node.durability,
        "qpq-server started"
    );
    let mut observer = Observer::default();
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr)
            .await
            .with_context(|| format!("binding the metrics endpoint on TCP {addr}"))?;
        let metrics = Arc::new(Metrics::new(
            config.node.durability,
            observer.gauges.clone(),
        ));
        tokio::spawn(metrics::serve_metrics(listener, metrics.clone()));
        println!("metrics on http://{addr}/metrics");
        observer.metrics = Some(metrics);
    }
    if let Some(every) = config.log_summary_interval {
        tokio::spawn(log_summaries(
            observer.summary.clone(),
            observer.gauges.clone(),
            every,
        ));
    }
    let stats = serve::serve(endpoint, node, config.transport.clone(), shutdown, observer).await;
    if stats.storage_failed {
        // A nonzero status, so that a supervisor starts it again: opening
        // the database recovers it (ARCHITECTURE.md § Storage).
        anyhow::bail!(
            "qpq-server stopped after a storage failure (logged above); starting it again \
             recovers the database {db}"
        );
    }
    tracing::info!(
        requests = stats.requests,
        syncs = stats.syncs,
        "qpq-server stopped cleanly"
    );
    Ok(())
}

/// `qpq-server migrate --from fjall --to postgres`.
fn migrate(args: Args, from: &str, to: &str) -> anyhow::Result<()> {
    if (from, to) != ("fjall", "postgres") {
        anyhow::bail!(
            "qpq-server migrates from fjall to postgres (--from fjall --to postgres), \
             not from {from} to {to}"
        );
    }
    let config = ServerConfig::load_for_migration(args)?;
    init_logging(&config)?;
    let Storage::Postgres { url } = &config.storage else {
        anyhow::bail!("migrate needs postgres_url");
    };
    let db_path = config.db_path();
    let target = PgOptions {
        url: url.clone(),
        synchronous_commit: true,
    };
    let started = std::time::Instant::now();
    let migrated = quicproquo_server::migrate::fjall_to_postgres(&db_path, &target, &config.node)
        .with_context(|| {
        format!(
            "migrating {} to {}",
            db_path.display(),
            postgres::redact_url(url)
        )
    })?;
    println!(
        "migrated {} records ({} bytes) from {} to {} in {:.1} s, read back and compared; \
         set storage = \"postgres\" to serve from it",
        migrated.records,
        migrated.bytes,
        db_path.display(),
        postgres::redact_url(url),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `qpq-server backup DEST` and `qpq-server restore SRC`.
fn backup_or_restore(args: Args) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use quicproquo_server::backup;
        let command = args.command.clone();
        let config = ServerConfig::load(args)?;
        let started = std::time::Instant::now();
        let done = match &command {
            Some(ServerCommand::Backup { dest, force }) => backup::backup(&config, dest, *force)
                .with_context(|| format!("backing up to {}", dest.display()))?
                .to_string(),
            Some(ServerCommand::Restore { src, force }) => backup::restore(&config, src, *force)
                .with_context(|| format!("restoring {}", src.display()))?
                .to_string(),
            _ => unreachable!("called for backup and restore only"),
        };
        println!("{done} in {:.1} s", started.elapsed().as_secs_f64());
        Ok(())
    }
    #[cfg(not(unix))]
    {
        let _ = args;
        anyhow::bail!("qpq-server backup and restore run on Unix systems only")
    }
}

/// Logs a summary line at `info` every `every`.
async fn log_summaries(summary: Arc<Summary>, gauges: ServiceGauges, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = summary.take();
        let now = gauges.snapshot();
        let (queued_messages, queued_bytes) = match p.queued {
            Some((m, b)) => (m.to_string(), b.to_string()),
            None => ("unknown".to_owned(), "unknown".to_owned()),
        };
        tracing::info!(
            connections = now.connections,
            opened = p.opened,
            closed = p.closed,
            handshakes_failed = p.handshakes_failed,
            requests = p.requests,
            errors = %p.errors_text(),
            auth_refused = p.auth_refused,
            messages = p.messages,
            fsyncs = p.fsyncs,
            messages_per_fsync = %p.messages_per_fsync(),
            waiters = now.waiters,
            queued_messages = %queued_messages,
            queued_bytes = %queued_bytes,
            "summary of the last {} ms",
            every.as_millis()
        );
    }
}

/// `qpq-server fingerprint`: the SHA-256 of the certificate the server
/// serves, as clients pin it, without starting the server.
fn fingerprint(args: Args) -> anyhow::Result<()> {
    let config = ServerConfig::load(args)?;
    let identity = match &config.tls {
        Some((cert, key)) => tls::load(cert, key)?,
        None => {
            let cert = config.data_dir.join(tls::GENERATED_CERT_FILE);
            let key = config.data_dir.join(tls::GENERATED_KEY_FILE);
            if !cert.exists() {
                anyhow::bail!(
                    "no certificate yet: {} does not exist. The server makes it on its first \
                     start (or set tls_cert and tls_key)",
                    cert.display()
                );
            }
            tls::load(&cert, &key)?
        }
    };
    println!("{}", quicproquo_core::types::hex(&identity.fingerprint()));
    Ok(())
}

/// `qpq-server check-config`: resolves and checks the configuration as a
/// start would, prints the settings in effect and touches nothing.
fn check_config(args: Args) -> anyhow::Result<()> {
    let (config, set) = ServerConfig::load_explained(args)?;
    tracing_subscriber::EnvFilter::try_new(config.log_filter())
        .with_context(|| format!("invalid value for `log`: `{}`", config.log))?;
    if let Some((cert, key)) = &config.tls {
        let identity = tls::load(cert, key)?;
        endpoint::server_config(&identity, &config.transport).with_context(|| {
            format!("tls_cert {} with tls_key {}", cert.display(), key.display())
        })?;
    }
    let data_dir = &config.data_dir;
    let data_note = match std::fs::metadata(data_dir) {
        Ok(m) if m.is_dir() => match config.storage {
            Storage::Fjall if config.db_path().exists() => "exists, with a database",
            Storage::Fjall => "exists; the database will be created at the first start",
            Storage::Postgres { .. } => "exists",
        },
        Ok(_) => anyhow::bail!(
            "invalid value for `data_dir`: {} is not a directory",
            data_dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "does not exist yet; it will be created at the first start"
        }
        Err(e) => anyhow::bail!("invalid value for `data_dir`: {}: {e}", data_dir.display()),
    };
    print!("{}", config.effective_toml(&set));
    eprintln!("data_dir {}: {data_note}", data_dir.display());
    if let Storage::Postgres { .. } = config.storage {
        eprintln!("postgres_url: not connected to; the server connects at start");
    }
    eprintln!("configuration OK");
    Ok(())
}

/// `qpq-server health`: one request to the server this configuration
/// describes, over QUIC, pinning its certificate.
fn health(args: Args, timeout: Duration) -> anyhow::Result<()> {
    let config = ServerConfig::load(args)?;
    let identity = match &config.tls {
        Some((cert, key)) => tls::load(cert, key)?,
        None => tls::load(
            &config.data_dir.join(tls::GENERATED_CERT_FILE),
            &config.data_dir.join(tls::GENERATED_KEY_FILE),
        )
        .context("no certificate to pin: has the server started in this data_dir?")?,
    };
    let addr = health::local_target(config.listen);
    let took = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(health::check(addr, identity.fingerprint(), timeout))?;
    println!(
        "qpq-server at {addr} answered in {:.1} ms",
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// `qpq-server man`: the manual page on stdout, or every page in `out_dir`.
fn man(out_dir: Option<&Path>) -> anyhow::Result<()> {
    let command = Args::command();
    match out_dir {
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout())?,
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("writing manual pages to {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a signal that arrives
/// between the start lines and the first poll stops the server cleanly
/// instead of killing it.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
