//! Connections and streams: the accept loop, one task per connection (its
//! handshake included, so handshakes never serialize), one task per request
//! stream. A stream carries one Cap'n Proto request, finished by the client,
//! and gets one reply. Everything here is byte moving and limit keeping; the
//! answers come from the service task.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quicproquo_core::error::ServiceError;
use quicproquo_core::node::{NodeService, Reply};
use quicproquo_core::types::ConnectionId;
use quicproquo_proto::{AUTH_EXPORTER_LABEL, REQUEST_BYTES_MAX, decode_request, encode_reply};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::TransportLimits;
use crate::metrics::Metrics;
use crate::service::{self, ServiceGauges, ServiceHandle, ServiceStats};
use crate::store::ShellStore;

/// QUIC application error codes the server closes or resets with.
pub mod codes {
    /// Clean shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The server or this address has too many connections.
    pub const BUSY: u32 = 1;
    /// The request was not received in time.
    pub const REQUEST_TIMEOUT: u32 = 2;
    /// The client did not read the reply in time.
    pub const REPLY_TIMEOUT: u32 = 3;
    /// The TLS session could not produce an exporter value.
    pub const PROTOCOL: u32 = 4;
}

/// Serves `endpoint` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests finish within the grace period, closes the
/// connections and waits for the last writes to be synced.
pub async fn serve<S: ShellStore>(
    endpoint: quinn::Endpoint,
    node: NodeService<S>,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()>,
) -> ServiceStats {
    serve_with_gauges(endpoint, node, limits, shutdown, ServiceGauges::default()).await
}

/// As [`serve`], publishing the service's live counts (connections,
/// waiters, replies in flight) to `gauges`, so a simulation can check that
/// nothing is left behind after its clients are gone.
pub async fn serve_with_gauges<S: ShellStore>(
    endpoint: quinn::Endpoint,
    node: NodeService<S>,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()>,
    gauges: ServiceGauges,
) -> ServiceStats {
    serve_observed(endpoint, node, limits, shutdown, gauges, None).await
}

/// As [`serve_with_gauges`], also counting requests, errors, latencies
/// and fsyncs in `metrics` when given (see [`crate::metrics`]).
pub async fn serve_observed<S: ShellStore>(
    endpoint: quinn::Endpoint,
    node: NodeService<S>,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()>,
    gauges: ServiceGauges,
    metrics: Option<Arc<Metrics>>,
) -> ServiceStats {
    let (svc, service_task) = service::spawn_observed(node, gauges, metrics.clone());
    let limits = Arc::new(limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    let per_ip: Arc<Mutex<HashMap<IpAddr, u32>>> = Arc::default();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // Reap finished connection tasks so the set stays small.
                while connections.try_join_next().is_some() {}
                let ip = incoming.remote_address().ip();
                let admitted = connections.len() < limits.connections_max as usize
                    && admit(&per_ip, ip, limits.connections_per_ip_max);
                if !admitted {
                    tracing::debug!(%ip, "connection refused: too many connections");
                    incoming.refuse();
                    continue;
                }
                let task = ConnectionTask {
                    svc: svc.clone(),
                    limits: limits.clone(),
                    stop: stop_rx.clone(),
                    per_ip: per_ip.clone(),
                    ip,
                    metrics: metrics.clone(),
                };
                connections.spawn(task.run(incoming));
            }
        }
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    let grace = tokio::time::sleep(limits_shutdown_grace());
    tokio::pin!(grace);
    loop {
        tokio::select! {
            joined = connections.join_next() => if joined.is_none() { break },
            () = &mut grace => {
                tracing::warn!(left = connections.len(), "grace period over; closing connections");
                break;
            }
        }
    }
    endpoint.close(codes::SHUTDOWN.into(), b"server shutting down");
    while connections.join_next().await.is_some() {}
    drop(svc);
    let stats = service_task.await.unwrap_or_default();
    endpoint.wait_idle().await;
    stats
}

fn limits_shutdown_grace() -> std::time::Duration {
    std::time::Duration::from_millis(crate::config::transport::SHUTDOWN_GRACE_MS)
}

fn admit(per_ip: &Mutex<HashMap<IpAddr, u32>>, ip: IpAddr, max: u32) -> bool {
    let mut map = per_ip.lock().unwrap_or_else(|p| p.into_inner());
    let n = map.entry(ip).or_insert(0);
    if *n >= max {
        return false;
    }
    *n += 1;
    true
}

struct ConnectionTask {
    svc: ServiceHandle,
    limits: Arc<TransportLimits>,
    stop: watch::Receiver<bool>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
    metrics: Option<Arc<Metrics>>,
}

impl ConnectionTask {
    async fn run(mut self, incoming: quinn::Incoming) {
        if let Some((conn, id)) = self.establish(incoming).await {
            self.serve_streams(&conn, id).await;
            self.svc.close(id).await;
        }
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }

    async fn establish(
        &self,
        incoming: quinn::Incoming,
    ) -> Option<(quinn::Connection, ConnectionId)> {
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "handshake refused");
                return None;
            }
        };
        let conn = match tokio::time::timeout(self.limits.handshake_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(ip = %self.ip, error = %e, "handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(ip = %self.ip, "handshake timed out");
                return None;
            }
        };
        let mut exporter = [0u8; 32];
        if conn
            .export_keying_material(&mut exporter, AUTH_EXPORTER_LABEL, b"")
            .is_err()
        {
            conn.close(codes::PROTOCOL.into(), b"no TLS exporter");
            return None;
        }
        match self.svc.open(exporter).await {
            Ok(id) => {
                tracing::debug!(conn = id.0, ip = %self.ip, "connection open");
                Some((conn, id))
            }
            Err(e) => {
                conn.close(codes::BUSY.into(), e.message.as_bytes());
                None
            }
        }
    }

    async fn serve_streams(&mut self, conn: &quinn::Connection, id: ConnectionId) {
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        while streams.try_join_next().is_some() {}
                        streams.spawn(serve_stream(send, recv, id, self.svc.clone(), self.limits.clone(), self.metrics.clone()));
                    }
                    Err(e) => {
                        tracing::debug!(conn = id.0, reason = %e, "connection closed");
                        break;
                    }
                },
                _ = self.stop.changed() => break,
            }
        }
        // Let the requests already received finish, unless the connection
        // goes away (the peer closed it, it timed out, or shutdown closed
        // the endpoint after its grace period): then no reply can reach the
        // peer, and a fetchWait would otherwise keep its waiter, this
        // connection and its per-address slot until its deadline. Requests
        // already handed to the service still complete there.
        let closed = conn.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                joined = streams.join_next() => if joined.is_none() { break },
                _ = &mut closed => {
                    streams.abort_all();
                    while streams.join_next().await.is_some() {}
                    break;
                }
            }
        }
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    conn: ConnectionId,
    svc: ServiceHandle,
    limits: Arc<TransportLimits>,
    metrics: Option<Arc<Metrics>>,
) {
    let read =
        tokio::time::timeout(limits.request_timeout, recv.read_to_end(REQUEST_BYTES_MAX)).await;
    let received = Instant::now();
    // The method as counted in the metrics: requests that never decoded
    // are counted under one name of their own.
    let mut method = "undecodable";
    let reply: Reply = match read {
        Err(_) => {
            let _ = recv.stop(codes::REQUEST_TIMEOUT.into());
            Err(ServiceError::invalid_argument(format!(
                "request not finished within {} ms",
                limits.request_timeout.as_millis()
            )))
        }
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            let _ = recv.stop(0u32.into());
            Err(ServiceError::payload_too_large(format!(
                "request exceeds {REQUEST_BYTES_MAX} bytes"
            )))
        }
        Ok(Err(e)) => {
            tracing::debug!(conn = conn.0, error = %e, "request stream failed");
            let _ = send.reset(0u32.into());
            return;
        }
        Ok(Ok(bytes)) => match decode_request(&bytes) {
            Err(e) => {
                tracing::debug!(conn = conn.0, error = %e, "undecodable request");
                Err(e.to_service_error())
            }
            Ok(request) => {
                method = request.body.method();
                let reply = svc.request(conn, request).await;
                if let Err(e) = &reply {
                    tracing::debug!(conn = conn.0, method, kind = ?e.kind, "request refused");
                }
                reply
            }
        },
    };
    let bytes = encode_reply(&reply);
    if let Some(m) = &metrics {
        m.request(
            method,
            reply.as_ref().err().map(|e| e.kind),
            received.elapsed(),
        );
    }
    let write = async {
        send.write_all(&bytes).await?;
        send.finish()?;
        Ok::<_, quinn::WriteError>(())
    };
    match tokio::time::timeout(limits.request_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(conn = conn.0, error = %e, "reply not delivered"),
        Err(_) => {
            let _ = send.reset(codes::REPLY_TIMEOUT.into());
        }
    }
}
