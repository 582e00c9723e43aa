//! The servers the benches run in this process: the end to end benches
//! start [`InProcessServer`](quicproquo_server::testing::InProcessServer)
//! (the production shell on a loopback port) with [`bench_setup`]; the
//! store benches use [`ServiceRig`], the service task and fjall store
//! without QUIC.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{
    Durability, NodeConfig, NodeService, RateConfig, Reply, Request, RequestBody, Response,
    auth_message,
};
use quicproquo_core::types::{ConnectionId, IdentityKey, Signature};
use quicproquo_server::observe::Observer;
use quicproquo_server::service::{self, ServiceHandle, ServiceStats};
use quicproquo_server::store::fjall_store::FjallStore;
use quicproquo_server::testing::Setup;
use tokio::task::JoinHandle;

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

/// How the end to end benches start their
/// [`InProcessServer`](quicproquo_server::testing::InProcessServer):
/// [`bench_node_config`] for `durability`, the default transport limits,
/// and the server's metrics kept when `metrics` (read them with
/// [`crate::scrape::Samples::parse`] of `Metrics::encode`).
pub fn bench_setup(durability: Durability, metrics: bool) -> Setup {
    Setup {
        node: bench_node_config(durability),
        metrics,
        ..Setup::default()
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
        let (handle, task) = service::spawn(node, Observer::default(), None);
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
