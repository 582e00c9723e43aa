//! A real qpq-server in this process, for tests and benches (cargo feature
//! `testing`; production builds do not have it).
//!
//! [`InProcessServer`] runs the production shell — [`crate::serve::serve`],
//! the service task, group commit, a fjall database — on a loopback port
//! over a data directory the caller owns, with the self-signed certificate
//! [`crate::tls::load_or_generate`] makes there, and hands out clients that
//! pin it. The server's own integration tests and the end to end benches
//! (`quicproquo-benches`) start it; the simulations (`quicproquo-sim`) run
//! `serve` over turmoil's socket and a simulated store instead.
//!
//! A harness, not a server: starting panics if the data directory, the
//! certificate or the loopback port cannot be had, and the clients it
//! hands out panic if they cannot connect.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use quicproquo_client::{Client, ServerTrust};
use quicproquo_core::node::{Durability, NodeConfig, NodeService};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::TransportLimits;
use crate::observe::{Metrics, Observer};
use crate::service::ServiceStats;
use crate::store::fjall_store::FjallStore;
use crate::store::postgres::{self, PgOptions};
use crate::{endpoint, serve, tls};

/// The machine's nonce seed in every in-process server: runs start from an
/// empty data directory, so a fixed seed repeats nothing that matters.
const NODE_SEED: [u8; 32] = [42; 32];

/// How to start an [`InProcessServer`]. `Setup::default()` is the
/// production defaults without metrics.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// The transport limits the endpoint and the connection tasks keep.
    pub limits: TransportLimits,
    /// The machine's configuration (durability, rate limits, ...).
    pub node: NodeConfig,
    /// A PostgreSQL connection string: the server stores its state there
    /// (`storage = "postgres"`) instead of in a fjall database in its data
    /// directory. Several servers may share one.
    pub postgres_url: Option<String>,
    /// Whether to keep the server's [`Metrics`] (what `metrics_listen`
    /// would serve), read with [`InProcessServer::metrics`]. Counting costs
    /// a few atomic updates per request, as on a server with
    /// `metrics_listen` set.
    pub metrics: bool,
}

/// A qpq-server running in this process on `127.0.0.1`.
///
/// [`InProcessServer::stop`] shuts it down as SIGTERM does `qpq-server`;
/// dropping it does the same in the background, without waiting.
#[derive(Debug)]
pub struct InProcessServer {
    /// Its UDP address.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate, the value clients pin.
    pub fingerprint: [u8; 32],
    metrics: Option<Arc<Metrics>>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<ServiceStats>,
}

impl InProcessServer {
    /// Starts a server over `data_dir` with `Setup::default()`. See
    /// [`InProcessServer::start_with`].
    pub fn start(data_dir: &Path) -> InProcessServer {
        Self::start_with(data_dir, Setup::default())
    }

    /// Starts a server over `data_dir` (which must outlive it): its
    /// certificate and key there (made on first start), its database in
    /// `qpq.db` there. Call from inside a tokio runtime.
    ///
    /// # Panics
    /// If the certificate, the database or the loopback port cannot be had.
    pub fn start_with(data_dir: &Path, setup: Setup) -> InProcessServer {
        let Setup {
            limits,
            node,
            postgres_url,
            metrics,
        } = setup;
        let identity = tls::load_or_generate(data_dir).expect("certificate");
        let mut observer = Observer::default();
        if metrics {
            observer.metrics = Some(Arc::new(Metrics::new(
                node.durability,
                observer.gauges.clone(),
            )));
        }
        let config = endpoint::server_config(&identity, &limits).expect("server config");
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let endpoint = quinn::Endpoint::server(config, loopback).expect("bind loopback");
        let addr = endpoint.local_addr().expect("bound address");
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let metrics = observer.metrics.clone();
        let task = match postgres_url {
            None => {
                let store = FjallStore::open(&data_dir.join("qpq.db")).expect("open store");
                let node = NodeService::new(node, NODE_SEED, store).expect("open node");
                tokio::spawn(serve::serve(endpoint, node, limits, shutdown, observer))
            }
            Some(url) => {
                let options = PgOptions {
                    url,
                    synchronous_commit: node.durability == Durability::Fsync,
                };
                // As qpq-server does: replies wait for their turn's commit.
                let node = NodeConfig {
                    durability: Durability::Fsync,
                    ..node
                };
                // Each server its own nonce seed: they share one store.
                let mut seed = NODE_SEED;
                seed[..2].copy_from_slice(&addr.port().to_be_bytes());
                let node = postgres::open_node(&options, &node, seed)
                    .expect("open the machine over PostgreSQL");
                tokio::spawn(serve::serve(endpoint, node, limits, shutdown, observer))
            }
        };
        InProcessServer {
            addr,
            fingerprint: identity.fingerprint(),
            metrics,
            shutdown: tx,
            task,
        }
    }

    /// The trust setting that pins this server's certificate.
    pub fn trust(&self) -> ServerTrust {
        ServerTrust::Fingerprint(self.fingerprint)
    }

    /// The server's metrics, if it was started with [`Setup::metrics`].
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_deref()
    }

    /// An unauthenticated client.
    ///
    /// # Panics
    /// If it cannot connect.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string(), &self.trust())
            .await
            .expect("connect")
    }

    /// A client authenticated as `key`.
    ///
    /// # Panics
    /// If it cannot connect or authenticate.
    pub async fn login(&self, key: &SigningKey) -> Client {
        Client::connect_as(&self.addr.to_string(), &self.trust(), key)
            .await
            .expect("connect and authenticate")
    }

    /// Stops the server as SIGTERM does (no new connections, in-flight
    /// requests finish within the grace period), waits until its last
    /// writes are synced and returns its counters.
    ///
    /// # Panics
    /// If the server task panicked: with its panic.
    pub async fn stop(self) -> ServiceStats {
        let _ = self.shutdown.send(());
        match self.task.await {
            Ok(stats) => stats,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => ServiceStats::default(),
        }
    }
}
