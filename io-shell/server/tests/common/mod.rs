//! Shared harness for the server's integration tests: a real server on
//! loopback (ephemeral port, temporary data directory) and authenticated
//! clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use ed25519_dalek::SigningKey;
use quicproquo_client::{Client, ServerTrust};
use quicproquo_core::node::{NodeConfig, NodeService};
use quicproquo_core::types::IdentityKey;
use quicproquo_server::config::TransportLimits;
use quicproquo_server::observe::Observer;
use quicproquo_server::service::ServiceStats;
use quicproquo_server::store::fjall_store::FjallStore;
use quicproquo_server::{endpoint, serve, tls};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: [u8; 32],
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<ServiceStats>>,
}

impl TestServer {
    /// Starts a server over `data_dir` with default limits.
    pub async fn start(data_dir: &Path) -> TestServer {
        Self::start_with(data_dir, TransportLimits::default(), NodeConfig::default()).await
    }

    /// Starts a server over `data_dir` with the given limits.
    pub async fn start_with(
        data_dir: &Path,
        limits: TransportLimits,
        node: NodeConfig,
    ) -> TestServer {
        let identity = tls::load_or_generate(data_dir).expect("certificate");
        let store = FjallStore::open(&data_dir.join("qpq.db")).expect("open store");
        let node = NodeService::new(node, [42; 32], store).expect("open node");
        let config = endpoint::server_config(&identity, &limits).expect("server config");
        let endpoint =
            quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = endpoint.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(serve::serve(
            endpoint,
            node,
            limits,
            shutdown,
            Observer::default(),
        ));
        TestServer {
            addr,
            fingerprint: identity.fingerprint(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The trust setting that pins this server's certificate.
    pub fn trust(&self) -> ServerTrust {
        ServerTrust::Fingerprint(self.fingerprint)
    }

    /// An unauthenticated client.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string(), &self.trust())
            .await
            .expect("connect")
    }

    /// A client authenticated as `key`.
    pub async fn login(&self, key: &SigningKey) -> Client {
        let mut c = self.client().await;
        c.authenticate(key).await.expect("authenticate");
        c
    }

    /// Stops the server cleanly and returns its counters.
    pub async fn stop(mut self) -> ServiceStats {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.expect("server task")
    }
}

/// A deterministic identity.
pub fn user(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// Its public identity key.
pub fn id(sk: &SigningKey) -> IdentityKey {
    IdentityKey(sk.verifying_key().to_bytes())
}
