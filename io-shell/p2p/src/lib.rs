//! Direct links between group members: QUIC with TLS 1.3 and the ALPN
//! `quicnprotochat/p2p/1` (kept from the project's first name, so the
//! peer-to-peer wire stays compatible), where both ends prove their
//! identity key in the handshake.
//!
//! **Identity.** Each end's TLS certificate is self-signed with its
//! Ed25519 identity key itself: the certificate's public key *is* the
//! identity, and TLS 1.3's CertificateVerify, a signature over the
//! handshake transcript by that key, proves the end holds it. The
//! certificate's other fields are not trusted or checked (no names, no
//! dates, no issuer). The connecting end accepts the answering end only if
//! its key is the identity it meant to reach; the answering end requires a
//! client certificate and accepts a peer only if [`Admit`] says its key is
//! a current member of a group both are in. No trust on first use, no
//! unauthenticated path. TLS 1.3 signs a context string ("TLS 1.3, server
//! CertificateVerify" and the client one) before the transcript, so these
//! signatures cannot be taken for an MLS or a server-authentication
//! signature of the same key, which sign their own labels.
//!
//! **Wire.** One bidirectional stream per message. The sender writes one
//! frame ([`DirectMessage`]: version 1, the channel id's length and bytes,
//! the 16-byte message id, `after_seq` as a big-endian u64, the payload's
//! length as a big-endian u32, the payload) and finishes the stream; the receiver answers one byte,
//! [`Ack::Taken`] (0) once the message is safely with it, or
//! [`Ack::Refused`] (1). The sender is the connection's peer; the frame
//! does not name it.
//!
//! **Discovery.** A peer's address is given (`host:port`), or found with
//! mDNS ([`discovery`]: `_qpq._udp.local`, announced under a key-derived
//! id, opt-in).
//!
//! **Limits.** Payloads as through the server
//! ([`PAYLOAD_BYTES_MAX`]); [`DIRECT_STREAMS_MAX`] messages in flight per
//! connection, [`DIRECT_CONNECTIONS_MAX`] connections per endpoint,
//! [`DIRECT_IDLE_TIMEOUT`], [`DIRECT_CONNECT_TIMEOUT`],
//! [`DIRECT_ACK_TIMEOUT`] (`quicproquo_core::limits`).

pub mod discovery;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use quicproquo_core::limits::{
    CHANNEL_ID_BYTES_MAX, DIRECT_ACK_TIMEOUT, DIRECT_CONNECT_TIMEOUT, DIRECT_CONNECTIONS_MAX,
    DIRECT_HEADER_BYTES_MAX, DIRECT_IDLE_TIMEOUT, DIRECT_KEEP_ALIVE, DIRECT_STREAMS_MAX,
    MESSAGE_ID_BYTES, PAYLOAD_BYTES_MAX,
};
use quicproquo_core::protocol::DIRECT_FRAME_VERSION;
pub use quicproquo_core::protocol::DirectMessage;
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The ALPN of direct links, unchanged from the project's first name.
pub const ALPN: &[u8] = b"quicnprotochat/p2p/1";
/// The version byte that starts every frame.
pub const FRAME_VERSION: u8 = DIRECT_FRAME_VERSION;
/// The TLS server name a connecting end sends; it is not checked (the key
/// is), but TLS wants one.
const SERVER_NAME: &str = "qpq-peer";
/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4): the
/// 32-byte key follows it.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Decides whom this endpoint talks to: true if `peer` is a current
/// member of a group this user is in. Asked for every connection, both
/// ways, at its handshake.
pub type Admit = Arc<dyn Fn(&IdentityKey) -> bool + Send + Sync>;

/// Why a direct link could not be made or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum P2pError {
    /// The identity key could not be turned into a TLS certificate.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The TLS or QUIC configuration was refused.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The peer is not one this user talks to directly.
    #[error("{0} is not a member of a group of this user")]
    NotAdmitted(String),
    /// The handshake failed: no answer, the wrong identity, a refused one.
    #[error("connecting: {0}")]
    Connect(String),
    /// The connection or a stream broke.
    #[error("direct link: {0}")]
    Link(String),
    /// The peer did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// A frame broke the format or a limit.
    #[error("bad frame: {0}")]
    Frame(String),
    /// mDNS could not start, announce or ask.
    #[error("mDNS: {0}")]
    Discovery(String),
}

/// Reads one frame from `recv`, refusing anything beyond the limits
/// before reading it.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<DirectMessage, P2pError> {
    let short = |e: quinn::ReadExactError| P2pError::Frame(format!("truncated: {e}"));
    let mut head = [0u8; 2];
    recv.read_exact(&mut head).await.map_err(short)?;
    if head[0] != FRAME_VERSION {
        return Err(P2pError::Frame(format!("version {}", head[0])));
    }
    let channel_len = usize::from(head[1]);
    if channel_len > CHANNEL_ID_BYTES_MAX {
        return Err(P2pError::Frame(format!(
            "channel id of {channel_len} bytes"
        )));
    }
    let mut channel = [0u8; CHANNEL_ID_BYTES_MAX];
    recv.read_exact(&mut channel[..channel_len])
        .await
        .map_err(short)?;
    let channel = ChannelId::try_from_slice(&channel[..channel_len])
        .map_err(|e| P2pError::Frame(e.to_string()))?;
    let mut id = [0u8; MESSAGE_ID_BYTES];
    recv.read_exact(&mut id).await.map_err(short)?;
    let mut after_seq = [0u8; 8];
    recv.read_exact(&mut after_seq).await.map_err(short)?;
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(short)?;
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len == 0 || len > PAYLOAD_BYTES_MAX {
        return Err(P2pError::Frame(format!(
            "payload of {len} bytes (1 to {PAYLOAD_BYTES_MAX})"
        )));
    }
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(short)?;
    Ok(DirectMessage {
        channel,
        message_id: MessageId(id),
        after_seq: u64::from_be_bytes(after_seq),
        payload,
    })
}

/// The receiver's answer to a direct message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The message is safely with the receiver: the sender need not send
    /// it through the server.
    Taken,
    /// The receiver cannot use it (no such group, not from a member); the
    /// sender sends it through the server.
    Refused,
}

impl Ack {
    fn byte(self) -> u8 {
        match self {
            Ack::Taken => 0,
            Ack::Refused => 1,
        }
    }
}

/// The identity key a certificate carries, if it is an Ed25519 key.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<IdentityKey> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = cert.subject_public_key_info();
    let key = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    IdentityKey::try_from_slice(key).ok()
}

/// A self-signed certificate and its key, both the identity key's.
fn certificate(
    key: &SigningKey,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), P2pError> {
    let cert_err = |e: &dyn fmt::Display| P2pError::Certificate(e.to_string());
    let pkcs8 = key.to_pkcs8_der().map_err(|e| cert_err(&e))?;
    let pkcs8 = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(|e| cert_err(&e))?;
    let params =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()]).map_err(|e| cert_err(&e))?;
    let cert = params.self_signed(&pair).map_err(|e| cert_err(&e))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// Checks a peer certificate's handshake signature with its own key, and
/// whose key it is.
#[derive(Debug)]
struct PeerVerifier {
    provider: Arc<CryptoProvider>,
    /// The connecting side: the one identity it meant to reach.
    expect: Option<IdentityKey>,
    /// The answering side: whom it admits.
    admit: Option<AdmitDebug>,
}

struct AdmitDebug(Admit);

impl fmt::Debug for AdmitDebug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Admit")
    }
}

impl PeerVerifier {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let bad = |why: &str| rustls::Error::General(why.to_owned());
        let peer = identity_of(cert)
            .ok_or_else(|| bad("the peer certificate is not an Ed25519 identity"))?;
        if let Some(expect) = self.expect
            && peer != expect
        {
            return Err(bad("the peer is not the identity asked for"));
        }
        if let Some(admit) = &self.admit
            && !(admit.0)(&peer)
        {
            return Err(bad("the peer is not a member of a group of this user"));
        }
        Ok(())
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// The only signature scheme of a direct link's handshake: the identity's.
const SCHEMES: [SignatureScheme; 1] = [SignatureScheme::ED25519];

/// TLS 1.2 is never offered, so its signatures are never verified.
fn no_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Result<Arc<quinn::TransportConfig>, P2pError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(DIRECT_STREAMS_MAX.into());
    t.max_concurrent_uni_streams(0u32.into());
    let window = u32::try_from(DIRECT_HEADER_BYTES_MAX + PAYLOAD_BYTES_MAX)
        .map_err(|e| P2pError::Tls(e.to_string()))?;
    t.stream_receive_window(window.into());
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(DIRECT_IDLE_TIMEOUT)
            .map_err(|e| P2pError::Tls(e.to_string()))?,
    ));
    t.keep_alive_interval(Some(DIRECT_KEEP_ALIVE));
    Ok(Arc::new(t))
}

/// This user's direct endpoint: it answers peers and connects to them.
#[derive(Debug)]
pub struct Endpoint {
    endpoint: quinn::Endpoint,
    identity: IdentityKey,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    admit: AdmitDebug,
    /// The id of the next link made.
    next_link: AtomicU64,
}

impl Endpoint {
    /// Binds `addr` (UDP) for the identity of `key`, admitting the peers
    /// `admit` accepts. Call inside a tokio runtime.
    pub fn bind(addr: SocketAddr, key: &SigningKey, admit: Admit) -> Result<Endpoint, P2pError> {
        let (config, cert, private) = Self::server_config(key, &admit)?;
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|source| P2pError::Bind { addr, source })?;
        Ok(Self::around(endpoint, key, cert, private, admit))
    }

    /// As [`Endpoint::bind`], over a socket of the caller's (a simulated
    /// network's) with its endpoint configuration (a seeded one, for a
    /// simulation that replays). Call inside a tokio runtime.
    pub fn with_socket(
        config: quinn::EndpointConfig,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        key: &SigningKey,
        admit: Admit,
    ) -> Result<Endpoint, P2pError> {
        let (server, server_cert, private) = Self::server_config(key, &admit)?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| P2pError::Tls(e.to_string()))?;
        Ok(Self::around(endpoint, key, server_cert, private, admit))
    }

    fn around(
        endpoint: quinn::Endpoint,
        key: &SigningKey,
        cert: CertificateDer<'static>,
        private: PrivateKeyDer<'static>,
        admit: Admit,
    ) -> Endpoint {
        Endpoint {
            endpoint,
            identity: IdentityKey(key.verifying_key().to_bytes()),
            cert,
            key: private,
            admit: AdmitDebug(admit),
            next_link: AtomicU64::new(0),
        }
    }

    /// The answering side's configuration, with this identity's
    /// certificate and key.
    fn server_config(
        key: &SigningKey,
        admit: &Admit,
    ) -> Result<
        (
            quinn::ServerConfig,
            CertificateDer<'static>,
            PrivateKeyDer<'static>,
        ),
        P2pError,
    > {
        let (cert, private) = certificate(key)?;
        let verifier = Arc::new(PeerVerifier {
            provider: provider(),
            expect: None,
            admit: Some(AdmitDebug(admit.clone())),
        });
        let tls_err = |e: &dyn fmt::Display| P2pError::Tls(e.to_string());
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert.clone()], private.clone_key())
            .map_err(|e| tls_err(&e))?;
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        // No 0-RTT: early data can be replayed.
        crypto.max_early_data_size = 0;
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| tls_err(&e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport()?);
        config.max_incoming(DIRECT_CONNECTIONS_MAX as usize);
        Ok((config, cert, private))
    }

    /// Where it listens.
    pub fn local_addr(&self) -> Result<SocketAddr, P2pError> {
        self.endpoint
            .local_addr()
            .map_err(|e| P2pError::Link(e.to_string()))
    }

    /// This user's identity.
    pub fn identity(&self) -> IdentityKey {
        self.identity
    }

    /// Connects to `peer` at `addr`; the answering end must prove it holds
    /// `peer`'s key, and `peer` must be admitted. Gives up after
    /// [`DIRECT_CONNECT_TIMEOUT`].
    pub async fn connect(&self, addr: SocketAddr, peer: IdentityKey) -> Result<Link, P2pError> {
        if !(self.admit.0)(&peer) {
            return Err(P2pError::NotAdmitted(peer.short()));
        }
        if self.endpoint.open_connections() >= DIRECT_CONNECTIONS_MAX as usize {
            return Err(P2pError::Connect(format!(
                "{DIRECT_CONNECTIONS_MAX} direct connections are open already"
            )));
        }
        let verifier = Arc::new(PeerVerifier {
            provider: provider(),
            expect: Some(peer),
            admit: None,
        });
        let tls_err = |e: &dyn fmt::Display| P2pError::Tls(e.to_string());
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| tls_err(&e))?;
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(crypto))
            .map_err(|e| tls_err(&e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport()?);
        let connecting = self
            .endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| P2pError::Connect(e.to_string()))?;
        let conn = tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| P2pError::Timeout(DIRECT_CONNECT_TIMEOUT))?
            .map_err(|e| P2pError::Connect(e.to_string()))?;
        Ok(Link {
            conn,
            peer,
            id: self.next_link.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The next peer that connected and proved an admitted identity;
    /// `None` once the endpoint is closed. A handshake that fails is
    /// skipped (and logged at debug).
    pub async fn accept(&self) -> Option<Link> {
        while let Some(incoming) = self.endpoint.accept().await {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("direct handshake refused: {e}");
                    continue;
                }
            };
            let peer = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|certs| certs.first().and_then(identity_of));
            // Counting this one: a peer cannot hold more than the limit
            // open, however often it connects.
            if self.endpoint.open_connections() > DIRECT_CONNECTIONS_MAX as usize {
                conn.close(2u32.into(), b"too many connections");
                continue;
            }
            match peer {
                Some(peer) => {
                    return Some(Link {
                        conn,
                        peer,
                        id: self.next_link.fetch_add(1, Ordering::Relaxed),
                    });
                }
                // The verifier admitted nothing else; a connection without
                // one is closed.
                None => conn.close(1u32.into(), b"no identity"),
            }
        }
        None
    }

    /// Closes every link and stops answering.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"closing");
    }
}

/// A connection to one peer, whose identity the handshake proved.
#[derive(Debug, Clone)]
pub struct Link {
    conn: quinn::Connection,
    peer: IdentityKey,
    /// Distinct among the endpoint's links, in the order they were made.
    id: u64,
}

impl Link {
    /// The peer's identity.
    pub fn peer(&self) -> IdentityKey {
        self.peer
    }

    /// This link's id: distinct among the endpoint's links for its whole
    /// life (never reused, unlike a connection's address), numbered in the
    /// order they were made.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends `message` and waits for the peer's answer, at most
    /// [`DIRECT_ACK_TIMEOUT`].
    pub async fn send(&self, message: &DirectMessage) -> Result<Ack, P2pError> {
        if message.payload.is_empty() || message.payload.len() > PAYLOAD_BYTES_MAX {
            return Err(P2pError::Frame(format!(
                "payload of {} bytes (1 to {PAYLOAD_BYTES_MAX})",
                message.payload.len()
            )));
        }
        let link = |e: &dyn fmt::Display| P2pError::Link(e.to_string());
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| link(&e))?;
            send.write_all(&message.encode())
                .await
                .map_err(|e| link(&e))?;
            send.finish().map_err(|e| link(&e))?;
            let mut answer = [0u8; 1];
            recv.read_exact(&mut answer).await.map_err(|e| link(&e))?;
            match answer[0] {
                0 => Ok(Ack::Taken),
                1 => Ok(Ack::Refused),
                b => Err(P2pError::Frame(format!("answer {b}"))),
            }
        };
        tokio::time::timeout(DIRECT_ACK_TIMEOUT, exchange)
            .await
            .map_err(|_| P2pError::Timeout(DIRECT_ACK_TIMEOUT))?
    }

    /// The next message the peer sends; answer it with
    /// [`Received::answer`]. An error means the link is gone (a malformed
    /// frame closes its stream only, and the next one is read).
    pub async fn receive(&self) -> Result<Received, P2pError> {
        loop {
            let (mut send, mut recv) = self
                .conn
                .accept_bi()
                .await
                .map_err(|e| P2pError::Link(e.to_string()))?;
            match read_frame(&mut recv).await {
                Ok(message) => return Ok(Received { message, send }),
                Err(e) => {
                    tracing::debug!("direct frame from {} refused: {e}", self.peer.short());
                    let _ = send.write_all(&[Ack::Refused.byte()]).await;
                    let _ = send.finish();
                }
            }
        }
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"closing");
    }

    /// Why the connection closed, if it did.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.close_reason().map(|r| r.to_string())
    }
}

/// A message a peer sent, waiting for its answer.
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub message: DirectMessage,
    send: quinn::SendStream,
}

impl Received {
    /// Answers the sender. Answer [`Ack::Taken`] only once the message is
    /// as safe as a fetched one would be (processed and saved): the sender
    /// then does not send it through the server.
    pub async fn answer(mut self, ack: Ack) -> Result<(), P2pError> {
        self.send
            .write_all(&[ack.byte()])
            .await
            .map_err(|e| P2pError::Link(e.to_string()))?;
        self.send
            .finish()
            .map_err(|e| P2pError::Link(e.to_string()))
    }
}
