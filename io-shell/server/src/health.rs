//! `qpq-server health`: asks a running server for one answer over the same
//! path clients take — a QUIC + TLS 1.3 handshake that pins the server's
//! certificate, one request on a stream, one reply — and says how long it
//! took. Container health checks and supervisors run it; it needs no
//! identity (the request is `authChallenge`, which any connection may make
//! and which writes nothing).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{Request, RequestBody, Response};
use quicproquo_core::types::hex;
use quicproquo_proto::pin::PinnedCert;
use quicproquo_proto::{ALPN, REPLY_BYTES_MAX, decode_reply, encode_request};

/// How long `qpq-server health` waits for the whole check (handshake,
/// request and reply) by default.
pub const HEALTH_TIMEOUT_MS: u64 = 5_000;

/// Why the server is not healthy, or could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// No answer within the timeout.
    #[error("no answer from {addr} within {ms} ms")]
    Timeout {
        /// Where the server was asked.
        addr: SocketAddr,
        /// The timeout.
        ms: u128,
    },
    /// The QUIC connection failed (nothing listens, the handshake failed,
    /// or the server's certificate is not the pinned one).
    #[error("connecting to {addr}: {message}")]
    Connect {
        /// Where the server was asked.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The request or its reply did not make it across.
    #[error("asking {addr}: {message}")]
    Exchange {
        /// Where the server was asked.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The server answered something other than a challenge.
    #[error("{addr} answered, but not as a qpq-server does: {message}")]
    Answer {
        /// Where the server was asked.
        addr: SocketAddr,
        /// What it answered.
        message: String,
    },
}

/// Where to ask a server that listens on `listen`: the loopback address
/// of the same family when it listens on all addresses.
pub fn local_target(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// Connects to `addr`, accepting only the certificate whose SHA-256 is
/// `fingerprint`, asks for an authentication challenge and checks the
/// answer; returns how long the whole exchange took.
pub async fn check(
    addr: SocketAddr,
    fingerprint: [u8; 32],
    timeout: Duration,
) -> Result<Duration, HealthError> {
    let started = Instant::now();
    match tokio::time::timeout(timeout, exchange(addr, fingerprint)).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HealthError::Timeout {
            addr,
            ms: timeout.as_millis(),
        }),
    }
}

async fn exchange(addr: SocketAddr, fingerprint: [u8; 32]) -> Result<(), HealthError> {
    let connect = |message: String| HealthError::Connect { addr, message };
    let asking = |message: String| HealthError::Exchange { addr, message };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| connect(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert::new(
            fingerprint,
            provider,
            |_, _| {},
        )))
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| connect(e.to_string()))?;
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(local).map_err(|e| connect(e.to_string()))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, "qpq-server")
        .map_err(|e| connect(e.to_string()))?
        .await
        .map_err(|e| match e {
            quinn::ConnectionError::TransportError(t)
                if t.to_string().contains("certificate") =>
            {
                connect(format!(
                    "its certificate is not the one in this configuration (expected SHA-256 {}): {t}",
                    hex(&fingerprint)
                ))
            }
            e => connect(e.to_string()),
        })?;
    let request = encode_request(&Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::AuthChallenge,
    });
    let answer = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| asking(e.to_string()))?;
        send.write_all(&request)
            .await
            .map_err(|e| asking(e.to_string()))?;
        send.finish().map_err(|e| asking(e.to_string()))?;
        recv.read_to_end(REPLY_BYTES_MAX)
            .await
            .map_err(|e| asking(e.to_string()))
    }
    .await;
    conn.close(0u32.into(), b"health check done");
    endpoint.wait_idle().await;
    let reply = decode_reply(&answer?).map_err(|e| HealthError::Answer {
        addr,
        message: e.to_string(),
    })?;
    match reply {
        Ok(Response::AuthChallenge { .. }) => Ok(()),
        Ok(other) => Err(HealthError::Answer {
            addr,
            message: format!("{other:?}"),
        }),
        Err(e) => Err(HealthError::Answer {
            addr,
            message: format!("{:?}: {}", e.kind, e.message),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_on_every_address_is_asked_on_loopback() {
        let t = |s: &str| local_target(s.parse().unwrap()).to_string();
        assert_eq!(t("0.0.0.0:7443"), "127.0.0.1:7443");
        assert_eq!(t("[::]:7443"), "[::1]:7443");
        assert_eq!(t("192.0.2.1:7443"), "192.0.2.1:7443");
    }
}
