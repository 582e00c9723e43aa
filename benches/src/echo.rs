//! The bare-QUIC baseline: a trivial server with qpq-server's exact QUIC
//! and TLS configuration (the same `endpoint::server_config`, certificate
//! kind, ALPN and limits) that answers every stream with the bytes of an
//! enqueue reply without decoding the request. The load generator's
//! `quic-echo` workload sends real encoded enqueue requests to it over
//! `quicproquo-client` connections, so request and response sizes match the
//! `enqueue` workload byte for byte and the difference between the two runs
//! is qpq-server's own work: decoding, the service task, storage, fsync.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{Request, RequestBody, Response};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use quicproquo_proto::{REQUEST_BYTES_MAX, encode_reply, encode_request};
use quicproquo_server::config::TransportLimits;
use quicproquo_server::{endpoint, tls};

/// The bytes of an enqueue request carrying `payload_bytes` of payload, as
/// the `enqueue` workload sends it.
pub fn enqueue_request_bytes(payload_bytes: usize) -> Vec<u8> {
    encode_request(&Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Enqueue {
            recipient_key: IdentityKey([7; 32]),
            channel_id: ChannelId::try_from_slice(&[1; 8]).expect("8 bytes"),
            payload: vec![0x42; payload_bytes],
            message_id: MessageId([9; 16]),
        },
    })
}

/// The bytes of the reply to an enqueue.
pub fn enqueue_reply_bytes() -> Vec<u8> {
    encode_reply(&Ok(Response::Enqueued { seq: 1 }))
}

/// A bound echo server, not yet serving.
pub struct EchoServer {
    endpoint: quinn::Endpoint,
    /// SHA-256 of its certificate, for pinning.
    pub fingerprint: [u8; 32],
}

impl EchoServer {
    /// Binds `listen` with a certificate generated (or reused) in
    /// `data_dir`, exactly as qpq-server does.
    pub fn bind(listen: SocketAddr, data_dir: &Path) -> anyhow::Result<EchoServer> {
        let identity = tls::load_or_generate(data_dir)?;
        let config = endpoint::server_config(&identity, &TransportLimits::default())?;
        let endpoint = quinn::Endpoint::server(config, listen)
            .with_context(|| format!("binding UDP {listen}"))?;
        Ok(EchoServer {
            endpoint,
            fingerprint: identity.fingerprint(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Serves until `shutdown` resolves: every stream is read to its end
    /// and answered with [`enqueue_reply_bytes`].
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let reply: Arc<[u8]> = enqueue_reply_bytes().into();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(serve_connection(incoming, reply.clone()));
                }
            }
        }
        self.endpoint.close(0u32.into(), b"echo server stopping");
        self.endpoint.wait_idle().await;
    }
}

async fn serve_connection(incoming: quinn::Incoming, reply: Arc<[u8]>) {
    let Ok(connecting) = incoming.accept() else {
        return;
    };
    let Ok(conn) = connecting.await else {
        return;
    };
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let reply = reply.clone();
        tokio::spawn(async move {
            if recv.read_to_end(REQUEST_BYTES_MAX).await.is_ok() {
                let _ = send.write_all(&reply).await;
                let _ = send.finish();
            } else {
                let _ = send.reset(0u32.into());
            }
        });
    }
}
