//! `qpq-server`: runs the NodeService on its embedded defaults or the
//! configuration given by `qpq-server.toml`, `QPQ_*` variables and flags.

use std::net::UdpSocket;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use quicproquo_core::node::{Durability, NodeConfig, NodeService};
use quicproquo_server::config::{Args, ServerCommand, ServerConfig, Storage};
use quicproquo_server::metrics;
use quicproquo_server::observe::{Metrics, Observer};
use quicproquo_server::store::ShellStore;
use quicproquo_server::store::fjall_store::FjallStore;
use quicproquo_server::store::postgres::{self, PgOptions};
use quicproquo_server::{endpoint, serve, tls};
use rand_core::{OsRng, RngCore};

/// mimalloc, for the request path's many small allocations (see
/// Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(ServerCommand::Migrate { from, to }) = &args.command {
        let (from, to) = (from.clone(), to.clone());
        return migrate(args, &from, &to);
    }
    let config = ServerConfig::load(args)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .with_context(|| format!("invalid log filter `{}`", config.log))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(config))
}

async fn run(config: ServerConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let identity = match &config.tls {
        Some((cert, key)) => tls::load(cert, key)?,
        None => tls::load_or_generate(&config.data_dir)?,
    };
    if identity.generated {
        tracing::info!(path = %identity.cert_path.display(), "generated a self-signed certificate");
    }
    let fingerprint = quicproquo_core::types::hex(&identity.fingerprint());
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
            serve_node(&config, &identity, &fingerprint, node, &db).await
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
            serve_node(&config, &identity, &fingerprint, node, &db).await
        }
    }
}

/// Serves `node` (its store opened as `db` names) until shutdown.
async fn serve_node<S: ShellStore>(
    config: &ServerConfig,
    identity: &tls::TlsIdentity,
    fingerprint: &str,
    node: NodeService<S>,
    db: &str,
) -> anyhow::Result<()> {
    let socket =
        UdpSocket::bind(config.listen).with_context(|| format!("binding UDP {}", config.listen))?;
    let server_config = endpoint::server_config(identity, &config.transport)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let addr = endpoint.local_addr()?;
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
    let stats = serve::serve(
        endpoint,
        node,
        config.transport.clone(),
        shutdown_signal(),
        observer,
    )
    .await;
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .with_context(|| format!("invalid log filter `{}`", config.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
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

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
