//! quinn over turmoil: a [`quinn::AsyncUdpSocket`] on a simulated
//! [`turmoil::net::UdpSocket`], and the endpoint factories every simulated
//! host uses ([`server_endpoint`], [`client_endpoint`]).
//!
//! turmoil's socket has no poll API and its `readable()` holds the socket's
//! receive lock while it waits, so the adapter keeps exactly one stored
//! `readable()` future: it tries a non-blocking receive first, polls the
//! stored future only when that would block, and drops the future as soon as
//! it resolves (releasing the lock for the next receive). One datagram per
//! send and per receive, no ECN, no GSO/GRO.
//!
//! On top of turmoil's latency (which reorders datagrams) the adapter drops
//! each outgoing datagram with the probability set in its [`Loss`], drawn
//! from a generator seeded per socket, so the loss pattern is a function of
//! the run's seed.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// The per-datagram loss rate all sockets of one simulation share; the
/// driver changes it while the simulation runs (e.g. to zero when it heals
/// the network). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Loss(Arc<AtomicU32>);

impl Loss {
    /// A loss rate of `rate` (0.0 to 1.0).
    pub fn new(rate: f64) -> Self {
        let loss = Loss::default();
        loss.set(rate);
        loss
    }

    /// Sets the loss rate (clamped to 0.0..=1.0).
    pub fn set(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * PPM as f64).round() as u32;
        self.0.store(ppm, Ordering::Relaxed);
    }

    /// The loss rate in parts per million.
    fn ppm(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Parts per million: the unit of [`Loss`].
const PPM: u32 = 1_000_000;

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A [`quinn::AsyncUdpSocket`] over a turmoil UDP socket.
pub struct SimSocket {
    io: Arc<turmoil::net::UdpSocket>,
    /// The one stored `readable()` future (see the module doc).
    readable: Mutex<Option<Readable>>,
    loss: Loss,
    rng: Mutex<ChaCha8Rng>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("local_addr", &self.io.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl SimSocket {
    /// Binds `0.0.0.0:port` (0 for an ephemeral port) on the current host.
    /// Must run inside a turmoil host.
    pub async fn bind(port: u16, loss: Loss, seed: u64) -> io::Result<SimSocket> {
        let io = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
        Ok(SimSocket {
            io: Arc::new(io),
            readable: Mutex::new(None),
            loss,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        })
    }

    fn dropped(&self) -> bool {
        let ppm = self.loss.ppm();
        if ppm == 0 {
            return false;
        }
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        rng.next_u32() % PPM < ppm
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.dropped() {
            return Ok(());
        }
        // A send turmoil refuses (no route) is a lost datagram, as on a real
        // network; QUIC recovers or times out.
        if let Err(e) = self.io.try_send_to(transmit.contents, transmit.destination) {
            tracing::trace!(error = %e, dst = %transmit.destination, "datagram not sent");
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(meta)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        loop {
            match self.io.try_recv_from(buf) {
                Ok((len, addr)) => {
                    *meta = RecvMeta {
                        addr,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: None,
                    };
                    return Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut slot = self.readable.lock().unwrap_or_else(PoisonError::into_inner);
            let fut = slot.get_or_insert_with(|| {
                let io = self.io.clone();
                Box::pin(async move { io.readable().await })
            });
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    *slot = None;
                    r?;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }
}

/// turmoil's UDP sockets never push back, so a send can always be tried.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A server endpoint on `port` of the current host, as the production shell
/// builds it (the server config from
/// `quicproquo_server::endpoint::server_config`), over a simulated socket
/// and with quinn's generator seeded (see [`endpoint_config`]).
pub async fn server_endpoint(
    port: u16,
    config: quinn::ServerConfig,
    loss: Loss,
    seed: u64,
) -> io::Result<quinn::Endpoint> {
    let socket = SimSocket::bind(port, loss, seed).await?;
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(seed),
        Some(config),
        Arc::new(socket),
        Arc::new(quinn::TokioRuntime),
    )
}

/// A client endpoint on an ephemeral port of the current host; the client
/// library connects through it with `Client::connect_with`.
pub async fn client_endpoint(loss: Loss, seed: u64) -> io::Result<quinn::Endpoint> {
    let socket = SimSocket::bind(0, loss, seed).await?;
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(seed),
        None,
        Arc::new(socket),
        Arc::new(quinn::TokioRuntime),
    )
}

/// A member's direct endpoint (`quicproquo-p2p`) on `port` of the current
/// host, for the identity of `key`, admitting whom `admit` admits.
pub async fn direct_endpoint(
    port: u16,
    loss: Loss,
    seed: u64,
    key: &ed25519_dalek::SigningKey,
    admit: quicproquo_p2p::Admit,
) -> io::Result<quicproquo_p2p::Endpoint> {
    let socket = SimSocket::bind(port, loss, seed).await?;
    quicproquo_p2p::Endpoint::with_socket(endpoint_config(seed), Arc::new(socket), key, admit)
        .map_err(io::Error::other)
}

/// quinn's default endpoint configuration with its generator seeded from
/// `seed`: connection ids, packet-number skips, key-update intervals and
/// the GREASE transport parameter (whose random length changes handshake
/// sizes) then repeat from run to run.
fn endpoint_config(seed: u64) -> quinn::EndpointConfig {
    let mut rng_seed = [0u8; 32];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut rng_seed);
    let mut config = quinn::EndpointConfig::default();
    config.rng_seed(Some(rng_seed));
    config
}
