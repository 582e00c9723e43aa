//! The QUIC endpoint configuration: TLS 1.3 only, ALPN `qpq/1`, 0-RTT off
//! (early data is replayable), and bounded streams, windows and idle time.
//! The shell builds the endpoint from this config over a real UDP socket in
//! production and over a simulated socket in `sim/`.

use std::sync::Arc;

use quicproquo_proto::{ALPN, REQUEST_BYTES_MAX};
use quinn::crypto::rustls::QuicServerConfig;

use crate::config::TransportLimits;
use crate::tls::TlsIdentity;

/// Why the endpoint configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS configuration lacks what QUIC needs.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
    /// A limit does not fit QUIC's encoding.
    #[error("transport limit out of range: {0}")]
    Limit(String),
}

/// The quinn server configuration for `tls` and `limits`.
pub fn server_config(
    tls: &TlsIdentity,
    limits: &TransportLimits,
) -> Result<quinn::ServerConfig, EndpointError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(tls.chain.clone(), tls.key.clone_key())?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: early data can be replayed by an attacker.
    crypto.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(crypto).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(limits)?));
    config.max_incoming(limits.pending_handshakes_max as usize);
    // Clients are not expected to roam; refusing migration keeps the
    // per-address accounting honest.
    config.migration(false);
    Ok(config)
}

/// The endpoint configuration for a server whose stateless-reset key is
/// `reset_key` (kept in the data directory): its reset tokens, and the
/// key its connection ids are checked with, are the same after a restart.
/// So a client whose connection a restart ended is answered with a reset
/// it accepts (quinn drops packets whose connection id another key made
/// without answering them), and reconnects at once instead of waiting for
/// its idle timeout.
pub fn endpoint_config(reset_key: &[u8]) -> quinn::EndpointConfig {
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let tag = ring::hmac::sign(&hmac, b"qpq connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(hmac));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// Transport parameters shared by server and client.
pub fn transport_config(limits: &TransportLimits) -> Result<quinn::TransportConfig, EndpointError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(limits.streams_per_connection_max.into());
    t.max_concurrent_uni_streams(0u32.into());
    // One stream carries one request, so its window never needs to exceed
    // the largest request.
    let stream_window = u32::try_from(REQUEST_BYTES_MAX)
        .map_err(|_| EndpointError::Limit("REQUEST_BYTES_MAX".into()))?;
    t.stream_receive_window(stream_window.into());
    t.receive_window(limits.connection_receive_window_bytes.into());
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(limits.idle_timeout)
            .map_err(|e| EndpointError::Limit(format!("idle timeout: {e}")))?,
    ));
    Ok(t)
}
