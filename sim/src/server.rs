//! The simulated server host: the real `quicproquo_server::serve` loop over
//! a [`SimStore`], restartable over the same store after a crash.
//!
//! Nothing of the server is copied here. The host builds the endpoint the
//! way `qpq-server` does (`endpoint::server_config` with the default
//! transport limits), opens a `NodeService` over the store and runs `serve`
//! (keeping its observer's gauges for the driver) until turmoil crashes the
//! host. A crash drops every task of the host (the service task, the
//! group-commit task, every connection), then [`SimServer::crash`] discards
//! every write not yet synced; a restart opens a fresh machine over what
//! survived.
//!
//! [`SimStore`] is the shell's [`SharedMemStore`] with a sync that takes
//! simulated time: it records the last written batch, waits, then makes
//! exactly the batches up to that point durable, like an fsync that does not
//! cover writes made while it runs. Without the wait every write would be
//! synced before a crash could land and "unsynced writes are lost" would
//! never be exercised.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use quicproquo_core::node::{NodeConfig, NodeService};
use quicproquo_core::store::{Batch, Lsn, Records, Store, StoreError};
use quicproquo_server::config::TransportLimits;
use quicproquo_server::endpoint::server_config;
use quicproquo_server::observe::{GaugeSnapshot, Observer, ServiceGauges};
use quicproquo_server::serve::serve;
use quicproquo_server::store::{SharedMemStore, ShellStore, StorageError, SyncHandle};
use quicproquo_server::tls::TlsIdentity;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::Notify;

use crate::net::{Loss, server_endpoint};

/// The server's host name in every simulation.
pub const SERVER_HOST: &str = "server";
/// The UDP port the server listens on (the production default).
pub const SERVER_PORT: u16 = 7443;

/// The store a simulated server runs on: a [`SharedMemStore`] whose syncs
/// take a seeded, simulated while. Clones share the store.
#[derive(Debug, Clone)]
pub struct SimStore {
    mem: SharedMemStore,
    delay: SyncDelay,
}

impl SimStore {
    /// An empty store whose syncs take between `min` and `max` of simulated
    /// time, drawn from a generator seeded with `seed`.
    pub fn new(seed: u64, min: Duration, max: Duration) -> Self {
        SimStore {
            mem: SharedMemStore::new(),
            delay: SyncDelay(Arc::new(Mutex::new((
                ChaCha8Rng::seed_from_u64(seed),
                min,
                max,
            )))),
        }
    }

    /// The shared in-memory store underneath.
    pub fn mem(&self) -> &SharedMemStore {
        &self.mem
    }
}

impl Store for SimStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.mem.get(key)
    }

    fn get_head(&self, key: &[u8], head: &mut [u8]) -> Result<Option<usize>, StoreError> {
        self.mem.get_head(key, head)
    }

    fn write(&mut self, batch: Batch) -> Result<Lsn, StoreError> {
        self.mem.write(batch)
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Records, StoreError> {
        self.mem.scan(prefix, after, limit)
    }
}

impl ShellStore for SimStore {
    type Sync = SimSync;

    fn sync_handle(&self) -> SimSync {
        SimSync(self.clone())
    }
}

/// Syncs a [`SimStore`] after a simulated delay, covering only what was
/// written before it started.
#[derive(Debug, Clone)]
pub struct SimSync(SimStore);

impl SyncHandle for SimSync {
    fn sync(&self) -> impl Future<Output = Result<Lsn, StorageError>> + Send {
        let store = self.0.clone();
        async move {
            let target = store.mem.inner().last_lsn();
            let delay = store.delay.next();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(store.mem.inner().sync_up_to(target))
        }
    }
}

#[derive(Debug, Clone)]
struct SyncDelay(Arc<Mutex<(ChaCha8Rng, Duration, Duration)>>);

impl SyncDelay {
    fn next(&self) -> Duration {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (rng, min, max) = &mut *g;
        let span = max.saturating_sub(*min).as_micros() as u64;
        let extra = if span == 0 {
            0
        } else {
            rng.next_u64() % (span + 1)
        };
        *min + Duration::from_micros(extra)
    }
}

/// The simulated server: its store, the gauges of the running incarnation
/// and how many times it has started. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct SimServer {
    store: SimStore,
    loss: Loss,
    seed: u64,
    incarnation: Rc<Cell<u64>>,
    gauges: Rc<RefCell<Option<ServiceGauges>>>,
    open_connections: Arc<AtomicUsize>,
    shutdown: Arc<Notify>,
}

impl SimServer {
    /// A server over `store`, its socket losing datagrams at `loss`.
    pub fn new(store: SimStore, loss: Loss, seed: u64) -> Self {
        SimServer {
            store,
            loss,
            seed,
            incarnation: Rc::default(),
            gauges: Rc::default(),
            open_connections: Arc::default(),
            shutdown: Arc::default(),
        }
    }

    /// Asks the running server to shut down cleanly, as SIGTERM does: it
    /// stops accepting, lets in-flight requests finish within its grace
    /// period, closes the connections and syncs; then the host's software
    /// ends.
    pub fn shut_down(&self) {
        self.shutdown.notify_one();
    }

    /// Registers the server host with `sim`. Every (re)start of the host
    /// runs [`Self::run`].
    pub fn register(&self, sim: &mut turmoil::Sim<'_>) {
        let me = self.clone();
        sim.host(SERVER_HOST, move || {
            let me = me.clone();
            async move { me.run().await }
        });
    }

    /// Crashes the server host: every task stops at once and every write
    /// not yet synced is lost. Returns how many written batches were lost.
    /// Start it again with [`Self::restart`].
    pub fn crash(&self, sim: &mut turmoil::Sim<'_>) -> u64 {
        sim.crash(SERVER_HOST);
        self.gauges.borrow_mut().take();
        self.open_connections.store(0, Ordering::Relaxed);
        let lost = self.unsynced_batches();
        self.store.mem.crash();
        lost
    }

    /// Batches written but not yet synced: what a crash now would lose.
    pub fn unsynced_batches(&self) -> u64 {
        let m = self.store.mem.inner();
        m.last_lsn().0 - m.synced_lsn().0
    }

    /// Starts the crashed server again over the surviving store.
    pub fn restart(&self, sim: &mut turmoil::Sim<'_>) {
        sim.bounce(SERVER_HOST);
    }

    /// The running incarnation's live counts and the QUIC connections its
    /// endpoint holds; `None` while the server is down or starting.
    pub fn gauges(&self) -> Option<(GaugeSnapshot, usize)> {
        self.gauges
            .borrow()
            .as_ref()
            .map(|g| (g.snapshot(), self.open_connections.load(Ordering::Relaxed)))
    }

    /// How many times the server has started.
    pub fn starts(&self) -> u64 {
        self.incarnation.get()
    }

    /// The server's address, as clients inside the simulation reach it.
    pub fn addr() -> SocketAddr {
        SocketAddr::new(turmoil::lookup(SERVER_HOST), SERVER_PORT)
    }

    /// The SHA-256 fingerprint clients pin.
    pub fn fingerprint() -> [u8; 32] {
        tls_identity().fingerprint()
    }

    /// One incarnation of the server: what `qpq-server` does after reading
    /// its configuration, over the simulated socket and store.
    async fn run(self) -> turmoil::Result {
        let incarnation = self.incarnation.get() + 1;
        self.incarnation.set(incarnation);
        let limits = TransportLimits::default();
        let config = server_config(&tls_identity(), &limits)?;
        let seed = self.seed ^ incarnation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let endpoint = server_endpoint(SERVER_PORT, config, self.loss.clone(), seed).await?;
        let mut node_seed = [0u8; 32];
        ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut node_seed);
        let node = NodeService::new(NodeConfig::default(), node_seed, self.store.clone())?;
        let observer = Observer::default();
        *self.gauges.borrow_mut() = Some(observer.gauges.clone());
        // The endpoint's connection count, published for the driver: a
        // clone of the endpoint kept outside the host would keep its socket
        // bound after a crash.
        let probe = endpoint.clone();
        let open = self.open_connections.clone();
        tokio::spawn(async move {
            loop {
                open.store(probe.open_connections(), Ordering::Relaxed);
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
        let stop = self.shutdown.clone();
        serve(
            endpoint,
            node,
            limits,
            async move { stop.notified().await },
            observer,
        )
        .await;
        self.gauges.borrow_mut().take();
        Ok(())
    }
}

/// How often the server host publishes its endpoint's connection count.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// The server's TLS identity: a self-signed Ed25519 certificate from a
/// fixed key. Ed25519 signatures are deterministic and of fixed length, so
/// the certificate and every handshake have the same size in every run
/// (an ECDSA signature's length varies, which would shift packet sizes and,
/// through pacing, the timing of a replay).
fn tls_identity() -> TlsIdentity {
    static CERT: OnceLock<(CertificateDer<'static>, Vec<u8>)> = OnceLock::new();
    let (cert, key) = CERT.get_or_init(|| {
        let mut pkcs8 = ED25519_PKCS8_V1_PREFIX.to_vec();
        pkcs8.extend_from_slice(&TLS_KEY_SEED);
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.clone()),
            &rcgen::PKCS_ED25519,
        )
        .expect("a fixed Ed25519 key parses");
        let names = vec!["localhost".to_owned(), "qpq-server".to_owned()];
        let cert = rcgen::CertificateParams::new(names)
            .and_then(|p| p.self_signed(&key))
            .expect("rcgen signs a certificate");
        (cert.der().clone(), pkcs8)
    });
    TlsIdentity {
        chain: vec![cert.clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
        cert_path: "<generated in memory by the simulation>".into(),
        generated: true,
    }
}

/// DER prefix of a PKCS#8 v1 Ed25519 private key (RFC 8410 section 7);
/// the 32-byte seed follows.
const ED25519_PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The simulated server's private key seed; a test key, used nowhere else.
const TLS_KEY_SEED: [u8; 32] = *b"quicproquo-sim server test key!!";
