//! The async NodeService client library: connect over QUIC with the server
//! trusted by a pinned certificate fingerprint or a CA file, authenticate an
//! Ed25519 identity, and make typed calls for every method. Used by the
//! tests and simulations and by the `qpq` command-line client. [`drive`]
//! carries out one command of the sans-io client machine over a [`Client`]
//! (the loop `qpq` and the simulations share). [`display`] makes
//! peer-controlled text safe to show on a terminal. [`state_file`] seals
//! the state file; [`state_ops`] exports, imports and re-seals it.
//!
//! [`Client::connect`] tries every address the server's name resolves to
//! and gives up after [`CONNECT_TIMEOUT`], naming the addresses it tried.
//!
//! Each call opens one bidirectional stream, writes one request, finishes
//! the stream and reads one reply. Calls are made once: retrying (with the
//! same `messageId` for an enqueue, so it is stored once) is the caller's
//! decision — the client machine's, for everything it sends.

pub mod daemon;
pub mod display;
mod drive;
pub mod json;
mod links;
mod session;
pub mod state_file;
pub mod state_ops;
mod trust;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use quicproquo_core::error::{ErrorKind, ServiceError};
use quicproquo_core::limits::AUTH_VERSION;
pub use quicproquo_core::limits::DEFAULT_POOL;
use quicproquo_core::node::{
    ChannelMessages, Gap, QueuedMessage, Request, RequestBody, Response, auth_message,
};
use quicproquo_core::types::{ChannelId, Fingerprint, IdentityKey, MessageId, Signature};
use quicproquo_proto::{
    ALPN, AUTH_EXPORTER_LABEL, DecodeError, REPLY_BYTES_MAX, decode_reply, encode_request,
};
use rand_core::{OsRng, RngCore};

pub use drive::{Clock, DriveError, Lost, call, connect_failure, drive, drive_with_links};
pub use links::{Allowed, DirectArgs, DirectConfig, Links, News, admitted};
pub use session::{
    CLOSE_GRACE, COMMANDS_QUEUED, ConnectProblem, EVENTS_BUFFERED, Session, SessionConfig,
    SessionError,
};
use trust::RefusedCert;
pub use trust::{ServerTrust, TrustError};

/// Time a call may take on top of any server-side wait (fetchWait).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest [`Client::connect`] takes, over every address the server's name
/// resolves to, before it gives up: a server that is down or unreachable
/// fails in this time rather than after QUIC's idle timeout (30 s), and a
/// handshake over loopback or a continent takes well under a second.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before [`Client::connect`] also tries the next address while the
/// earlier ones are still pending (RFC 8305 §5, "Connection Attempt
/// Delay"); a failed attempt starts the next one at once.
pub const CONNECT_ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// Most addresses of one name [`Client::connect`] tries; with
/// [`CONNECT_ATTEMPT_DELAY`] they all start within [`CONNECT_TIMEOUT`].
pub const CONNECT_ADDRESSES_MAX: usize = 16;

/// A failed call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with a typed error.
    #[error("server refused: {0}")]
    Service(#[from] ServiceError),
    /// The connection or handshake failed.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The stream broke before the reply arrived.
    #[error("request failed in transit: {0}")]
    Transport(String),
    /// The reply did not decode.
    #[error("undecodable reply: {0}")]
    Decode(#[from] DecodeError),
    /// The reply was of the wrong kind for the request.
    #[error("unexpected reply to {method}: {got}")]
    UnexpectedReply {
        /// The method called.
        method: &'static str,
        /// What came back.
        got: String,
    },
    /// No reply within the call timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server's certificate could not be set up for trust.
    #[error(transparent)]
    Trust(#[from] TrustError),
}

impl ClientError {
    /// The error kind this failure amounts to, in the terms the client
    /// machine uses: the server's own kind, or `unavailable` for a
    /// connection, transport or timeout failure (trying again may work).
    /// [`quicproquo_core::ErrorKind::is_retryable`] tells whether to retry.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Service(e) => e.kind,
            ClientError::Connect(_) | ClientError::Transport(_) | ClientError::Timeout(_) => {
                ErrorKind::Unavailable
            }
            ClientError::Decode(_) | ClientError::UnexpectedReply { .. } => ErrorKind::Internal,
            ClientError::Trust(_) => ErrorKind::InvalidArgument,
        }
    }

    /// True if connecting again cannot help: the trust setting is unusable,
    /// or the server refused to authenticate this identity.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Trust(_) => true,
            ClientError::Service(e) => !e.kind.is_retryable(),
            _ => false,
        }
    }
}

/// A batch of messages from a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Messages after the cursor, in seq order.
    pub messages: Vec<QueuedMessage>,
    /// The seq the next enqueue to this queue will get.
    pub next_seq: u64,
    /// Messages after the cursor the server dropped by its TTL.
    pub gap: Option<Gap>,
}

/// How long [`Client::close`] waits for the connection's close to be sent.
/// The close leaves on the endpoint driver's next poll, within
/// microseconds; the wait ends when the endpoint goes idle (after the
/// draining period, three probe timeouts, about 200 ms even on loopback)
/// or after this, whichever comes first, so a command's exit is not held
/// up for the draining period.
pub const CLOSE_FLUSH: Duration = Duration::from_millis(100);

/// One connection to a NodeService.
#[derive(Debug, Clone)]
pub struct Client {
    conn: quinn::Connection,
    /// The endpoint the connection runs on, kept so [`Client::close`] can
    /// wait for the close to leave.
    endpoint: quinn::Endpoint,
    identity: Option<IdentityKey>,
}

impl Client {
    /// Connects to `server` as [`Client::connect`] does and proves `key`'s
    /// identity on the connection ([`Client::authenticate`]): what the
    /// client machine's `Effect::Connect` asks for.
    pub async fn connect_as(
        server: &str,
        trust: &ServerTrust,
        key: &SigningKey,
    ) -> Result<Client, ClientError> {
        let mut client = Client::connect(server, trust).await?;
        client.authenticate(key).await?;
        Ok(client)
    }

    /// Connects to `server` (e.g. `localhost:7443`) at any of the addresses
    /// its name resolves to (IPv4 and IPv6 alike), as
    /// [`Client::connect_any`] does.
    pub async fn connect(server: &str, trust: &ServerTrust) -> Result<Client, ClientError> {
        let addrs = resolve(server).await?;
        let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Self::connect_any(&addrs, host, trust).await
    }

    /// Connects to whichever of `addrs` answers first, from fresh UDP
    /// sockets (one per address family). Attempts start in order, each
    /// [`CONNECT_ATTEMPT_DELAY`] after the one before or as soon as it
    /// fails, and run side by side (RFC 8305's "Happy Eyeballs"), so an
    /// address that never answers — `::1` when the server listens on IPv4
    /// only — costs a moment, not the connection. After [`CONNECT_TIMEOUT`]
    /// in all it gives up, naming every address tried. A server that
    /// presents the wrong certificate is reported as such
    /// ([`TrustError::FingerprintMismatch`]) unless another address
    /// succeeds.
    pub async fn connect_any(
        addrs: &[SocketAddr],
        server_name: &str,
        trust: &ServerTrust,
    ) -> Result<Client, ClientError> {
        let addrs = &addrs[..addrs.len().min(CONNECT_ADDRESSES_MAX)];
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        // One endpoint per family, shared by the attempts of that family.
        let mut endpoints: [Option<quinn::Endpoint>; 2] = [None, None];
        let mut pending = Vec::new();
        let mut failed: Vec<(SocketAddr, ClientError)> = Vec::new();
        let mut next = addrs.iter();
        loop {
            // Start the next attempt (an address whose family has no
            // socket fails at once, and the one after it starts instead).
            for &addr in next.by_ref() {
                match endpoint_for(&mut endpoints, addr) {
                    Ok(endpoint) => {
                        pending.push((
                            addr,
                            Box::pin(async move {
                                Self::connect_with(&endpoint, addr, server_name, trust).await
                            }),
                        ));
                        break;
                    }
                    Err(e) => failed.push((addr, e)),
                }
            }
            if pending.is_empty() {
                break;
            }
            let more = !next.as_slice().is_empty();
            // Then wait for an attempt to end, for the time to start the
            // next one, or for the deadline.
            tokio::select! {
                (addr, result) = first_done(&mut pending) => match result {
                    Ok(client) => return Ok(client),
                    Err(e) => failed.push((addr, e)),
                },
                () = tokio::time::sleep(CONNECT_ATTEMPT_DELAY), if more => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let unanswered: Vec<SocketAddr> = pending.iter().map(|(addr, _)| *addr).collect();
        Err(all_attempts_failed(failed, &unanswered))
    }

    /// Connects through an existing `endpoint` (a simulation supplies one
    /// over its own socket). `server_name` is checked against the
    /// certificate when trusting a CA; a pinned fingerprint ignores it.
    pub async fn connect_with(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        trust: &ServerTrust,
    ) -> Result<Client, ClientError> {
        let refused = Arc::new(RefusedCert::default());
        let config = client_config(trust, refused.clone())?;
        let connecting = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let conn = connecting.await.map_err(|e| match refused.take() {
            Some(mismatch) => ClientError::Trust(mismatch),
            None => ClientError::Connect(e.to_string()),
        })?;
        Ok(Client {
            conn,
            endpoint: endpoint.clone(),
            identity: None,
        })
    }

    /// Closes the connection and waits, at most [`CLOSE_FLUSH`], for the
    /// close to be sent, so the server frees the connection's slot at once
    /// instead of at its idle timeout. (A process that exits right after
    /// `quinn::Connection::close` may never send it: the endpoint's driver
    /// sends it on a later poll.)
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        drop(self.conn);
        let _ = tokio::time::timeout(CLOSE_FLUSH, self.endpoint.wait_idle()).await;
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The identity this connection is authenticated as, if any.
    pub fn identity(&self) -> Option<IdentityKey> {
        self.identity
    }

    /// Proves ownership of `key`'s identity to the server: fetches a nonce
    /// and signs it together with this connection's TLS exporter value.
    pub async fn authenticate(&mut self, key: &SigningKey) -> Result<(), ClientError> {
        let identity = IdentityKey(key.verifying_key().to_bytes());
        let nonce = match self.call(RequestBody::AuthChallenge).await? {
            Response::AuthChallenge { nonce } => nonce,
            other => return Err(unexpected("authChallenge", &other)),
        };
        let exporter = self.tls_exporter()?;
        let sig = key.sign(&auth_message(&identity, &nonce, &exporter));
        match self
            .call(RequestBody::Authenticate {
                identity_key: identity,
                signature: Signature(sig.to_bytes()),
            })
            .await?
        {
            Response::Authenticated => {
                self.identity = Some(identity);
                Ok(())
            }
            other => Err(unexpected("authenticate", &other)),
        }
    }

    /// This connection's TLS exporter value, as the server derives it.
    pub fn tls_exporter(&self) -> Result<[u8; 32], ClientError> {
        let mut out = [0u8; 32];
        self.conn
            .export_keying_material(&mut out, AUTH_EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Transport("TLS exporter unavailable".into()))?;
        Ok(out)
    }

    /// Uploads a KeyPackage to the default pool and returns the server's
    /// SHA-256 fingerprint of it (compare it with your own to detect
    /// tampering).
    pub async fn upload_key_package(
        &self,
        identity_key: IdentityKey,
        package: Vec<u8>,
        last_resort: bool,
    ) -> Result<Fingerprint, ClientError> {
        self.upload_key_package_to(identity_key, DEFAULT_POOL, package, last_resort)
            .await
    }

    /// Uploads a KeyPackage to the pool `cipher_suite` (the default pool is
    /// [`DEFAULT_POOL`]); see [`Self::upload_key_package`].
    pub async fn upload_key_package_to(
        &self,
        identity_key: IdentityKey,
        cipher_suite: u16,
        package: Vec<u8>,
        last_resort: bool,
    ) -> Result<Fingerprint, ClientError> {
        match self
            .call(RequestBody::UploadKeyPackage {
                identity_key,
                package,
                last_resort,
                cipher_suite,
            })
            .await?
        {
            Response::KeyPackageUploaded { fingerprint } => Ok(fingerprint),
            other => Err(unexpected("uploadKeyPackage", &other)),
        }
    }

    /// Pops one of `identity_key`'s KeyPackages from the default pool;
    /// `true` if it is the last-resort package.
    pub async fn fetch_key_package(
        &self,
        identity_key: IdentityKey,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        self.fetch_key_package_from(identity_key, DEFAULT_POOL)
            .await
    }

    /// Pops one of `identity_key`'s KeyPackages from the pool
    /// `cipher_suite`; see [`Self::fetch_key_package`].
    pub async fn fetch_key_package_from(
        &self,
        identity_key: IdentityKey,
        cipher_suite: u16,
    ) -> Result<(Vec<u8>, bool), ClientError> {
        match self
            .call(RequestBody::FetchKeyPackage {
                identity_key,
                cipher_suite,
            })
            .await?
        {
            Response::KeyPackage {
                package,
                last_resort,
            } => Ok((package, last_resort)),
            other => Err(unexpected("fetchKeyPackage", &other)),
        }
    }

    /// The caller's remaining KeyPackages in the default pool and whether
    /// it has a last resort.
    pub async fn key_package_count(
        &self,
        identity_key: IdentityKey,
    ) -> Result<(u32, bool), ClientError> {
        self.key_package_count_in(identity_key, DEFAULT_POOL).await
    }

    /// The caller's remaining KeyPackages in the pool `cipher_suite`; see
    /// [`Self::key_package_count`].
    pub async fn key_package_count_in(
        &self,
        identity_key: IdentityKey,
        cipher_suite: u16,
    ) -> Result<(u32, bool), ClientError> {
        match self
            .call(RequestBody::KeyPackageCount {
                identity_key,
                cipher_suite,
            })
            .await?
        {
            Response::KeyPackageCount {
                count,
                has_last_resort,
            } => Ok((count, has_last_resort)),
            other => Err(unexpected("keyPackageCount", &other)),
        }
    }

    /// Uploads the caller's hybrid public key with its signature.
    pub async fn upload_hybrid_key(
        &self,
        identity_key: IdentityKey,
        hybrid_key: Vec<u8>,
        signature: Signature,
    ) -> Result<(), ClientError> {
        match self
            .call(RequestBody::UploadHybridKey {
                identity_key,
                hybrid_key,
                signature,
            })
            .await?
        {
            Response::HybridKeyUploaded => Ok(()),
            other => Err(unexpected("uploadHybridKey", &other)),
        }
    }

    /// Fetches someone's hybrid public key and the owner's signature over it.
    pub async fn fetch_hybrid_key(
        &self,
        identity_key: IdentityKey,
    ) -> Result<(Vec<u8>, Signature), ClientError> {
        match self
            .call(RequestBody::FetchHybridKey { identity_key })
            .await?
        {
            Response::HybridKey {
                hybrid_key,
                signature,
            } => Ok((hybrid_key, signature)),
            other => Err(unexpected("fetchHybridKey", &other)),
        }
    }

    /// Enqueues `payload` once; returns the seq. A retry with the same
    /// `message_id` is stored once; when to retry is the caller's (the
    /// client machine decides it for its outbox).
    pub async fn enqueue(
        &self,
        recipient_key: IdentityKey,
        channel_id: ChannelId,
        payload: Vec<u8>,
        message_id: MessageId,
    ) -> Result<u64, ClientError> {
        match self
            .call(RequestBody::Enqueue {
                recipient_key,
                channel_id,
                payload,
                message_id,
            })
            .await?
        {
            Response::Enqueued { seq } => Ok(seq),
            other => Err(unexpected("enqueue", &other)),
        }
    }

    /// Enqueues one payload to every recipient's queue on `channel_id` at
    /// once (stored once on the server); returns each recipient's seq in
    /// the order given.
    pub async fn enqueue_batch(
        &self,
        recipient_keys: Vec<IdentityKey>,
        channel_id: ChannelId,
        payload: Vec<u8>,
        message_id: MessageId,
    ) -> Result<Vec<u64>, ClientError> {
        let n = recipient_keys.len();
        match self
            .call(RequestBody::EnqueueBatch {
                recipient_keys,
                channel_id,
                payload,
                message_id,
            })
            .await?
        {
            Response::EnqueuedBatch { seqs } if seqs.len() == n => Ok(seqs),
            other => Err(unexpected("enqueueBatch", &other)),
        }
    }

    /// Acknowledges `seq <= after_seq` and returns up to `limit` messages
    /// after it.
    pub async fn fetch(
        &self,
        recipient_key: IdentityKey,
        channel_id: ChannelId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Fetched, ClientError> {
        let r = self
            .call(RequestBody::Fetch {
                recipient_key,
                channel_id,
                after_seq,
                limit,
            })
            .await?;
        messages("fetch", r)
    }

    /// As [`Self::fetch`], but waits up to `timeout_ms` for a message.
    pub async fn fetch_wait(
        &self,
        recipient_key: IdentityKey,
        channel_id: ChannelId,
        after_seq: u64,
        limit: u32,
        timeout_ms: u64,
    ) -> Result<Fetched, ClientError> {
        let r = self
            .call_with_timeout(
                RequestBody::FetchWait {
                    recipient_key,
                    channel_id,
                    after_seq,
                    limit,
                    timeout_ms,
                },
                CALL_TIMEOUT + Duration::from_millis(timeout_ms),
            )
            .await?;
        messages("fetchWait", r)
    }

    /// One wait over several channels: acknowledges each `(channel,
    /// after_seq)` cursor and returns the channels with messages after
    /// theirs, waiting up to `timeout_ms` for the first (an empty list when
    /// the wait ran out).
    pub async fn fetch_wait_channels(
        &self,
        recipient_key: IdentityKey,
        cursors: Vec<(ChannelId, u64)>,
        limit: u32,
        timeout_ms: u64,
    ) -> Result<Vec<ChannelMessages>, ClientError> {
        let r = self
            .call_with_timeout(
                RequestBody::FetchWaitChannels {
                    recipient_key,
                    cursors,
                    limit,
                    timeout_ms,
                },
                CALL_TIMEOUT + Duration::from_millis(timeout_ms),
            )
            .await?;
        match r {
            Response::ChannelMessages { channels } => Ok(channels),
            other => Err(unexpected("fetchWaitChannels", &other)),
        }
    }

    /// Sends any request and returns the successful response.
    pub async fn call(&self, body: RequestBody) -> Result<Response, ClientError> {
        self.call_with_timeout(body, CALL_TIMEOUT).await
    }

    /// Sends any request, allowing `timeout` for the answer.
    pub async fn call_with_timeout(
        &self,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let request = Request {
            auth_version: AUTH_VERSION,
            body,
        };
        let bytes = encode_request(&request);
        let exchange = async {
            let (mut send, mut recv) = self
                .conn
                .open_bi()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            send.write_all(&bytes)
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            send.finish()
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            recv.read_to_end(REPLY_BYTES_MAX)
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))
        };
        let reply_bytes = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        Ok(decode_reply(&reply_bytes)??)
    }
}

/// A fresh random message id for a new enqueue.
pub fn random_message_id() -> MessageId {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    MessageId(id)
}

fn messages(method: &'static str, r: Response) -> Result<Fetched, ClientError> {
    match r {
        Response::Messages {
            messages,
            next_seq,
            gap,
        } => Ok(Fetched {
            messages,
            next_seq,
            gap,
        }),
        other => Err(unexpected(method, &other)),
    }
}

fn unexpected(method: &'static str, got: &Response) -> ClientError {
    ClientError::UnexpectedReply {
        method,
        got: format!("{got:?}").chars().take(80).collect(),
    }
}

/// Every address `server` resolves to, in the resolver's order of
/// preference.
async fn resolve(server: &str) -> Result<Vec<SocketAddr>, ClientError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .map_err(|e| ClientError::Connect(format!("resolving `{server}`: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(ClientError::Connect(format!(
            "`{server}` resolves to no address"
        )));
    }
    Ok(addrs)
}

/// The client endpoint for `addr`'s family, bound on first use.
fn endpoint_for(
    endpoints: &mut [Option<quinn::Endpoint>; 2],
    addr: SocketAddr,
) -> Result<quinn::Endpoint, ClientError> {
    let (slot, bind) = if addr.is_ipv6() {
        (&mut endpoints[1], SocketAddr::from(([0u16; 8], 0)))
    } else {
        (&mut endpoints[0], SocketAddr::from(([0u8; 4], 0)))
    };
    if let Some(endpoint) = slot {
        return Ok(endpoint.clone());
    }
    let endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| ClientError::Connect(format!("binding a UDP socket on {bind}: {e}")))?;
    *slot = Some(endpoint.clone());
    Ok(endpoint)
}

/// The first of the connection attempts in `pending` to finish, taken out
/// of it, with its address. Never completes while `pending` is empty.
async fn first_done<F>(
    pending: &mut Vec<(SocketAddr, std::pin::Pin<Box<F>>)>,
) -> (SocketAddr, Result<Client, ClientError>)
where
    F: std::future::Future<Output = Result<Client, ClientError>>,
{
    std::future::poll_fn(|cx| {
        for i in 0..pending.len() {
            if let std::task::Poll::Ready(result) = pending[i].1.as_mut().poll(cx) {
                let (addr, _) = pending.swap_remove(i);
                return std::task::Poll::Ready((addr, result));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The error of a [`Client::connect_any`] where no address worked: a
/// refused certificate if there was one (it is the server's own answer),
/// else every address with what became of it.
fn all_attempts_failed(
    failed: Vec<(SocketAddr, ClientError)>,
    unanswered: &[SocketAddr],
) -> ClientError {
    let mut reasons = Vec::new();
    for (addr, e) in failed {
        match e {
            ClientError::Trust(e) => return ClientError::Trust(e),
            ClientError::Connect(why) => reasons.push(format!("{addr}: {why}")),
            other => reasons.push(format!("{addr}: {other}")),
        }
    }
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !unanswered.is_empty() {
        let silent = format!(
            "no answer within {} s from {}",
            CONNECT_TIMEOUT.as_secs(),
            list(unanswered)
        );
        reasons.insert(0, silent);
    }
    if reasons.is_empty() {
        return ClientError::Connect("no address to connect to".into());
    }
    ClientError::Connect(reasons.join("; "))
}

fn client_config(
    trust: &ServerTrust,
    refused: Arc<RefusedCert>,
) -> Result<quinn::ClientConfig, ClientError> {
    let mut crypto = trust.rustls_config(refused)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(crypto))
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Keep long-polling connections alive well inside the server's idle
    // timeout.
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Helpers for tests of the server's edge cases; not part of the stable API.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// The QUIC client configuration a [`Client`] connects with, offering
    /// `alpn` (for tests that make QUIC packets themselves).
    pub fn quic_client_config(
        trust: &ServerTrust,
        alpn: &[u8],
    ) -> Result<quinn::ClientConfig, ClientError> {
        let mut crypto = trust.rustls_config(Default::default())?;
        crypto.alpn_protocols = vec![alpn.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(crypto))
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(quinn::ClientConfig::new(Arc::new(crypto)))
    }

    /// Connects offering `alpn` instead of `qpq/1`.
    pub async fn connect_with_alpn(
        addr: SocketAddr,
        trust: &ServerTrust,
        alpn: &[u8],
    ) -> Result<quinn::Connection, ClientError> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal address"))
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        endpoint
            .connect_with(quic_client_config(trust, alpn)?, addr, "localhost")
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))
    }
}
