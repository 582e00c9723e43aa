//! A real qpq-server in this process: the production shell (`serve`,
//! service task, group commit, fjall) on a loopback port over a temporary
//! data directory, for the end to end benches. Also [`ServiceRig`], the
//! service task and fjall store without QUIC, for the store benches.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use quicproquo_client::{Client, ServerTrust};
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{
    Durability, NodeConfig, NodeService, RateConfig, Reply, Request, RequestBody, Response,
    auth_message,
};
use quicproquo_core::types::{ConnectionId, IdentityKey, Signature};
use quicproquo_server::config::TransportLimits;
use quicproquo_server::observe::{Metrics, Observer};
use quicproquo_server::service::{self, ServiceHandle, ServiceStats};
use quicproquo_server::store::fjall_store::FjallStore;
use quicproquo_server::{endpoint, serve, tls};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::scrape::Samples;

/// The machine configuration the benches run with: the defaults of
/// `durability`, except that rate limits are lifted far above what one
/// bench client can reach. The defaults (10,000 enqueues/s per sender, a
/// few KeyPackage fetches per second per target) protect a public server;
/// a bench measures throughput, not refusals.
pub fn bench_node_config(durability: Durability) -> NodeConfig {
    let open = RateConfig {
        burst: u32::MAX,
        per_sec: u32::MAX,
    };
    NodeConfig {
        durability,
        enqueue_rate: open,
        key_fetch_pair_rate: open,
        key_package_fetch_target_rate: open,
        ..NodeConfig::default()
    }
}

/// A qpq-server running in this process.
pub struct InProcessServer {
    /// Its UDP address.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate, for pinning.
    pub fingerprint: [u8; 32],
    /// Its metrics, when started with [`InProcessServer::start_metered`].
    metrics: Option<Arc<Metrics>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<ServiceStats>>,
}

impl InProcessServer {
    /// Starts a server over `data_dir` (which must outlive it) with
    /// [`bench_node_config`] and default transport limits. Call from
    /// inside a tokio runtime.
    pub fn start(data_dir: &Path, durability: Durability) -> InProcessServer {
        Self::start_with(data_dir, durability, false)
    }

    /// As [`InProcessServer::start`], also keeping the server's metrics
    /// (what `metrics_listen` would serve), read with
    /// [`InProcessServer::samples`]. Counting costs a few atomic updates
    /// per request, as on a server with `metrics_listen` set.
    pub fn start_metered(data_dir: &Path, durability: Durability) -> InProcessServer {
        Self::start_with(data_dir, durability, true)
    }

    fn start_with(data_dir: &Path, durability: Durability, metered: bool) -> InProcessServer {
        let identity = tls::load_or_generate(data_dir).expect("certificate");
        let store = FjallStore::open(&data_dir.join("qpq.db")).expect("open store");
        let node =
            NodeService::new(bench_node_config(durability), [42; 32], store).expect("open node");
        let limits = TransportLimits::default();
        let config = endpoint::server_config(&identity, &limits).expect("server config");
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        let endpoint = quinn::Endpoint::server(config, loopback).expect("bind loopback");
        let addr = endpoint.local_addr().expect("bound address");
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let mut observer = Observer::default();
        let metrics = metered.then(|| Arc::new(Metrics::new(durability, observer.gauges.clone())));
        observer.metrics = metrics.clone();
        let task = tokio::spawn(serve::serve(endpoint, node, limits, shutdown, observer));
        InProcessServer {
            addr,
            fingerprint: identity.fingerprint(),
            metrics,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The server's metrics now, if it keeps them.
    pub fn samples(&self) -> Option<Samples> {
        self.metrics.as_ref().map(|m| Samples::parse(&m.encode()))
    }

    /// The trust setting that pins this server's certificate.
    pub fn trust(&self) -> ServerTrust {
        ServerTrust::Fingerprint(self.fingerprint)
    }

    /// A client authenticated as `key`.
    pub async fn login(&self, key: &SigningKey) -> Client {
        let mut c = Client::connect(&self.addr.to_string(), &self.trust())
            .await
            .expect("connect");
        c.authenticate(key).await.expect("authenticate");
        c
    }

    /// Stops the server and waits until its last writes are synced.
    pub async fn stop(mut self) -> ServiceStats {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await.unwrap_or_default(),
            None => ServiceStats::default(),
        }
    }
}

/// The service task (NodeService + group commit) over a fjall store, with
/// no QUIC in front: requests go straight into the service's channel.
pub struct ServiceRig {
    handle: ServiceHandle,
    task: JoinHandle<ServiceStats>,
}

/// One authenticated connection to a [`ServiceRig`].
#[derive(Clone)]
pub struct RigConn {
    handle: ServiceHandle,
    conn: ConnectionId,
    /// The identity the connection is bound to.
    pub identity: IdentityKey,
}

impl ServiceRig {
    /// Opens a fjall database in `data_dir` and starts the service task in
    /// `durability` mode. Call from inside a tokio runtime.
    pub fn start(data_dir: &Path, durability: Durability) -> ServiceRig {
        let store = FjallStore::open(&data_dir.join("qpq.db")).expect("open store");
        let node =
            NodeService::new(bench_node_config(durability), [42; 32], store).expect("open node");
        let (handle, task) = service::spawn(node, Observer::default());
        ServiceRig { handle, task }
    }

    /// Opens a connection and authenticates it as `key`.
    pub async fn login(&self, key: &SigningKey) -> RigConn {
        let exporter = [0x11; 32];
        let conn = self.handle.open(exporter).await.expect("open connection");
        let c = RigConn {
            handle: self.handle.clone(),
            conn,
            identity: IdentityKey(key.verifying_key().to_bytes()),
        };
        let Ok(Response::AuthChallenge { nonce }) = c.call(RequestBody::AuthChallenge).await else {
            panic!("no auth challenge");
        };
        let sig = key.sign(&auth_message(&c.identity, &nonce, &exporter));
        let r = c
            .call(RequestBody::Authenticate {
                identity_key: c.identity,
                signature: Signature(sig.to_bytes()),
            })
            .await;
        assert_eq!(r, Ok(Response::Authenticated), "rig login");
        c
    }

    /// Stops the service once every connection handle is dropped.
    pub async fn stop(self) -> ServiceStats {
        drop(self.handle);
        self.task.await.unwrap_or_default()
    }
}

impl RigConn {
    /// Sends one request through the service and waits for its reply.
    pub async fn call(&self, body: RequestBody) -> Reply {
        self.handle
            .request(
                self.conn,
                Request {
                    auth_version: AUTH_VERSION,
                    body,
                },
            )
            .await
    }
}

/// A deterministic bench identity number `n` (distinct seeds per run are
/// not needed: every run starts from an empty data directory).
pub fn user(n: u64) -> SigningKey {
    let mut seed = [0xa5; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    SigningKey::from_bytes(&seed)
}

/// Shared handle to an in-process server, for benches that run several
/// closures against one server.
pub type SharedServer = Arc<InProcessServer>;
