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
use quicproquo_core::node::{NodeService, Reply, RequestBody, Response};
use quicproquo_core::types::ConnectionId;
use quicproquo_core::types::hex;
use quicproquo_proto::{
    AUTH_EXPORTER_LABEL, REPLY_BYTES_MAX, REQUEST_BYTES_MAX, decode_request, encode_reply,
};
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tokio::task::JoinSet;

use crate::config::TransportLimits;
use crate::observe::{Metrics, Observer, Summary};
use crate::service::{self, ReplyReservation, ServiceHandle, ServiceStats};
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

/// Serves `endpoint` until `shutdown` resolves or the storage fails (the
/// machine then refuses everything until the database is opened again:
/// [`ServiceStats::storage_failed`] says so), then stops accepting, lets
/// in-flight requests finish within the grace period, closes the
/// connections and waits for the last writes to be synced. The service
/// publishes its live counts (connections, waiters, replies in flight) to
/// `observer.gauges`, so a simulation can check that nothing is left behind
/// after its clients are gone; requests, errors, latencies and fsyncs are
/// counted in `observer.metrics` when given (see [`crate::observe`]).
pub async fn serve<S: ShellStore>(
    endpoint: quinn::Endpoint,
    node: NodeService<S>,
    limits: TransportLimits,
    shutdown: impl Future<Output = ()>,
    observer: Observer,
) -> ServiceStats {
    let metrics = observer.metrics.clone();
    let summary = observer.summary.clone();
    let (svc, service_task) = service::spawn(node, observer, Some(limits.sweep_interval));
    let limits = Arc::new(limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots: Arc<Mutex<Slots>> = Arc::default();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = svc.storage_failed() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // Reap finished connection tasks so the set stays small.
                while connections.try_join_next().is_some() {}
                let ip = incoming.remote_address().ip();
                if connections.len() >= limits.connections_max as usize {
                    tracing::debug!(%ip, "connection refused: too many connections");
                    incoming.refuse();
                    continue;
                }
                // An address counts against its limit once it is proven: by
                // a Retry token here, else by the completed handshake.
                let admission = if incoming.remote_address_validated() {
                    if !lock(&slots).admit(ip, limits.connections_per_ip_max) {
                        tracing::debug!(%ip, "connection refused: too many from this address");
                        incoming.refuse();
                        continue;
                    }
                    Admission::Counted
                } else if lock(&slots).begin_unvalidated(limits.unvalidated_handshakes_max) {
                    Admission::Unvalidated
                } else {
                    // Stateless: the client comes back with a token that
                    // proves its address, or (a forged source) never does.
                    tracing::debug!(%ip, "unproven address: answered with a Retry");
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().refuse();
                    }
                    continue;
                };
                let task = ConnectionTask {
                    svc: svc.clone(),
                    limits: limits.clone(),
                    stop: stop_rx.clone(),
                    slots: slots.clone(),
                    ip,
                    admission,
                    metrics: metrics.clone(),
                    summary: summary.clone(),
                };
                connections.spawn(task.run(incoming));
            }
        }
    }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let deadline = tokio::time::Instant::now() + shutdown_grace();
    // Waiting long-polls are answered now (with what their queues hold)
    // and later ones do not wait: they do no work, and would otherwise
    // hold the grace period up to its end.
    svc.shutdown().await;
    let _ = stop_tx.send(true);
    // In-flight requests have the grace period less what closing takes.
    let grace = tokio::time::sleep_until(deadline - shutdown_close());
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
    // The close is sent; waiting for the peers to take it is bounded by
    // what is left of the grace period (an unreachable peer never does).
    let _ = tokio::time::timeout_at(deadline, endpoint.wait_idle()).await;
    stats
}

fn shutdown_grace() -> std::time::Duration {
    std::time::Duration::from_millis(crate::config::transport::SHUTDOWN_GRACE_MS)
}

fn shutdown_close() -> std::time::Duration {
    std::time::Duration::from_millis(crate::config::transport::SHUTDOWN_CLOSE_MS)
}

/// Who holds connection slots: proven addresses, counted per IP against
/// `connections_per_ip_max`, and handshakes from addresses not yet proven,
/// counted together against `unvalidated_handshakes_max`.
#[derive(Debug, Default)]
struct Slots {
    per_ip: HashMap<IpAddr, u32>,
    unvalidated: u32,
}

impl Slots {
    /// Counts a connection from proven address `ip`, unless it has `max`.
    fn admit(&mut self, ip: IpAddr, max: u32) -> bool {
        let n = self.per_ip.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Takes a slot for a handshake from an unproven address, unless
    /// `max` are in progress.
    fn begin_unvalidated(&mut self, max: u32) -> bool {
        if self.unvalidated >= max {
            return false;
        }
        self.unvalidated += 1;
        true
    }

    fn end_unvalidated(&mut self) {
        self.unvalidated -= 1;
    }
}

fn lock(slots: &Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    slots.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a connection holds its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Counted against its address (proven by a Retry token).
    Counted,
    /// A handshake from an unproven address: counted against its address
    /// once the handshake proves it.
    Unvalidated,
    /// Proven by its handshake, but its address had no room: holds nothing.
    Refused,
}

struct ConnectionTask {
    svc: ServiceHandle,
    limits: Arc<TransportLimits>,
    stop: watch::Receiver<bool>,
    slots: Arc<Mutex<Slots>>,
    ip: IpAddr,
    admission: Admission,
    metrics: Option<Arc<Metrics>>,
    summary: Arc<Summary>,
}

impl ConnectionTask {
    async fn run(mut self, incoming: quinn::Incoming) {
        if let Some((conn, id)) = self.establish(incoming).await {
            self.summary.connection_opened();
            let started = Instant::now();
            self.serve_streams(&conn, id).await;
            self.svc.close(id).await;
            self.summary.connection_closed();
            tracing::debug!(
                conn = id.0,
                ip = %self.ip,
                secs = started.elapsed().as_secs(),
                reason = %conn.close_reason().map_or_else(|| "server shutting down".to_owned(), |r| r.to_string()),
                "connection closed"
            );
        }
        match self.admission {
            Admission::Counted => lock(&self.slots).release(self.ip),
            Admission::Unvalidated => lock(&self.slots).end_unvalidated(),
            Admission::Refused => {}
        }
    }

    /// The handshake, the admission of an address it proved, and the
    /// connection's registration with the service.
    async fn establish(
        &mut self,
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
                self.summary.handshake_failed();
                tracing::debug!(ip = %self.ip, error = %e, "handshake failed");
                return None;
            }
            Err(_) => {
                self.summary.handshake_failed();
                tracing::debug!(ip = %self.ip, "handshake timed out");
                return None;
            }
        };
        if self.admission == Admission::Unvalidated {
            // The handshake proved the address: it counts from now on.
            let mut slots = lock(&self.slots);
            slots.end_unvalidated();
            if slots.admit(self.ip, self.limits.connections_per_ip_max) {
                self.admission = Admission::Counted;
            } else {
                self.admission = Admission::Refused;
                drop(slots);
                tracing::debug!(ip = %self.ip, "connection closed: too many from this address");
                conn.close(
                    codes::BUSY.into(),
                    b"too many connections from this address",
                );
                return None;
            }
        }
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
        let budgets = Arc::new(ConnectionBudgets::new(&self.limits));
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        while streams.try_join_next().is_some() {}
                        let seen = Seen { conn: id, ip: self.ip, metrics: self.metrics.clone(), summary: self.summary.clone() };
                        streams.spawn(serve_stream(send, recv, seen, self.svc.clone(), self.limits.clone(), budgets.clone()));
                    }
                    Err(_) => break,
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

/// The bytes the server holds on behalf of one connection, shared by its
/// streams. Flow control bounds what a peer has in flight, but not what
/// the server has already read or has yet to send: without these, each of
/// a connection's streams could pin a request of nearly the size limit
/// (by never finishing it) or a multi-megabyte fetch reply (by never
/// reading it).
struct ConnectionBudgets {
    /// Bytes of requests read (or being read) and not yet answered; sized
    /// by `connection_receive_window_bytes`.
    requests: Semaphore,
    /// Bytes of fetch replies the peer has not taken yet, or reserved for
    /// fetches in the machine; sized by `connection_reply_bytes_max` (see
    /// [`ServiceHandle::request_reserved`]).
    replies: Arc<Semaphore>,
}

impl ConnectionBudgets {
    fn new(limits: &TransportLimits) -> Self {
        ConnectionBudgets {
            requests: Semaphore::new(limits.connection_receive_window_bytes as usize),
            replies: Arc::new(Semaphore::new(limits.connection_reply_bytes_max as usize)),
        }
    }
}

/// What a fetch or fetchWait reserves in its connection's reply budget
/// before it reaches the machine: its largest possible reply.
const RESERVED_REPLY_BYTES: u32 = REPLY_BYTES_MAX as u32;

/// Largest piece of a request read at once: its bytes are taken from the
/// connection's request budget before the read, the unused ones returned
/// after it.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Why a request could not be read.
enum ReadFailure {
    /// It is longer than [`REQUEST_BYTES_MAX`].
    TooLong,
    /// The connection's request budget is spent.
    Busy,
    /// The stream failed.
    Stream(quinn::ReadError),
}

/// Reads one whole request, holding its bytes against `budget` until the
/// returned permit is dropped.
async fn read_request<'a>(
    recv: &mut quinn::RecvStream,
    budget: &'a Semaphore,
) -> Result<(Vec<u8>, SemaphorePermit<'a>), ReadFailure> {
    let chunk_permits = READ_CHUNK_BYTES as u32;
    let mut bytes = Vec::new();
    let mut held = budget.try_acquire_many(0).map_err(|_| ReadFailure::Busy)?;
    loop {
        let mut permit = budget
            .try_acquire_many(chunk_permits)
            .map_err(|_| ReadFailure::Busy)?;
        let Some(chunk) = recv
            .read_chunk(READ_CHUNK_BYTES, true)
            .await
            .map_err(ReadFailure::Stream)?
        else {
            return Ok((bytes, held));
        };
        if bytes.len() + chunk.bytes.len() > REQUEST_BYTES_MAX {
            return Err(ReadFailure::TooLong);
        }
        bytes.extend_from_slice(&chunk.bytes);
        // Keep what the chunk used; the rest goes back with `permit`.
        if let Some(used) = permit.split(chunk.bytes.len()) {
            held.merge(used);
        }
    }
}

/// Who a stream's request came from, and where it is counted.
struct Seen {
    conn: ConnectionId,
    ip: IpAddr,
    metrics: Option<Arc<Metrics>>,
    summary: Arc<Summary>,
}

/// Bytes of a claimed identity key a refused authentication is logged
/// with: enough to tell attempts apart, not the whole key.
const LOGGED_KEY_PREFIX_BYTES: usize = 4;

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    seen: Seen,
    svc: ServiceHandle,
    limits: Arc<TransportLimits>,
    budgets: Arc<ConnectionBudgets>,
) {
    let conn = seen.conn;
    let read = tokio::time::timeout(
        limits.request_timeout,
        read_request(&mut recv, &budgets.requests),
    )
    .await;
    let received = Instant::now();
    // The method as counted in the metrics: requests that never decoded
    // are counted under one name of their own.
    let mut method = "undecodable";
    // For an authentication: the start of the key it claims.
    let mut claimed = None;
    // Bytes of the reply budget the reply holds until the peer takes it.
    let mut reply_permit = None;
    let reply: Reply = match read {
        Err(_) => {
            let _ = recv.stop(codes::REQUEST_TIMEOUT.into());
            Err(ServiceError::invalid_argument(format!(
                "request not finished within {} ms",
                limits.request_timeout.as_millis()
            )))
        }
        Ok(Err(ReadFailure::TooLong)) => {
            let _ = recv.stop(0u32.into());
            Err(ServiceError::payload_too_large(format!(
                "request exceeds {REQUEST_BYTES_MAX} bytes"
            )))
        }
        Ok(Err(ReadFailure::Busy)) => {
            let _ = recv.stop(codes::BUSY.into());
            Err(ServiceError::unavailable(format!(
                "this connection's unanswered requests hold {} bytes, its limit; wait for replies before sending more",
                limits.connection_receive_window_bytes
            )))
        }
        Ok(Err(ReadFailure::Stream(e))) => {
            tracing::debug!(conn = conn.0, error = %e, "request stream failed");
            let _ = send.reset(0u32.into());
            return;
        }
        // The request's bytes stay counted (`_held`) until it is answered:
        // its payload lives on in the service until then.
        Ok(Ok((bytes, _held))) => match decode_request(&bytes) {
            Err(e) => {
                tracing::debug!(conn = conn.0, error = %e, "undecodable request");
                Err(e.to_service_error())
            }
            Ok(request) => {
                method = request.body.method();
                if let RequestBody::Authenticate { identity_key, .. } = &request.body {
                    claimed = Some(*identity_key);
                }
                let (reply, permit) = if matches!(
                    request.body,
                    RequestBody::Fetch { .. }
                        | RequestBody::FetchWait { .. }
                        | RequestBody::FetchWaitChannels { .. }
                ) {
                    // Its largest reply is set aside before the machine
                    // reads anything; a connection whose budget is held by
                    // unread replies waits here, not in memory.
                    let reserve = tokio::time::timeout(
                        limits.request_timeout,
                        budgets
                            .replies
                            .clone()
                            .acquire_many_owned(RESERVED_REPLY_BYTES),
                    )
                    .await;
                    match reserve {
                        Ok(Ok(held)) => {
                            let reservation = ReplyReservation {
                                budget: budgets.replies.clone(),
                                held: Some(held),
                            };
                            svc.request_reserved(conn, request, reservation).await
                        }
                        _ => (
                            Err(ServiceError::unavailable(
                                "this connection has too many bytes of replies it has not read; read them, then fetch again",
                            )),
                            None,
                        ),
                    }
                } else {
                    (svc.request(conn, request).await, None)
                };
                reply_permit = permit;
                if let Err(e) = &reply {
                    tracing::debug!(conn = conn.0, method, kind = ?e.kind, "request refused");
                }
                reply
            }
        },
    };
    let bytes = encode_reply(&reply);
    let kind = reply.as_ref().err().map(|e| e.kind);
    let stored = match &reply {
        Ok(Response::Enqueued { .. }) => 1,
        Ok(Response::EnqueuedBatch { seqs }) => seqs.len() as u64,
        _ => 0,
    };
    if let (Some(key), Err(e)) = (&claimed, &reply) {
        if let Some(m) = &seen.metrics {
            m.auth_refused();
        }
        if seen.summary.auth_refused() {
            tracing::info!(
                ip = %seen.ip,
                key = %format_args!("{}…", hex(&key.0[..LOGGED_KEY_PREFIX_BYTES])),
                kind = ?e.kind,
                "authentication refused"
            );
        }
    }
    // Only the encoded bytes wait for the peer (with their budget permit).
    drop(reply);
    seen.summary.request(kind, stored);
    if let Some(m) = &seen.metrics {
        m.request(method, kind, received.elapsed());
    }
    // Handed to quinn as it is: `write_all` would copy it into a buffer
    // of its own (a whole fetch reply, up to a megabyte, once more).
    let write = async {
        send.write_chunk(bytes::Bytes::from(bytes)).await?;
        send.finish()?;
        Ok::<_, quinn::WriteError>(())
    };
    match tokio::time::timeout(limits.request_timeout, write).await {
        Ok(Ok(())) => {
            // Until the peer has acknowledged the whole reply: its bytes
            // stay counted against the connection's reply budget, and a
            // connection that ends now (at shutdown, its streams done)
            // does not discard a reply still in quinn's send buffer.
            let _ = tokio::time::timeout(limits.request_timeout, send.stopped()).await;
        }
        Ok(Err(e)) => tracing::debug!(conn = conn.0, error = %e, "reply not delivered"),
        Err(_) => {
            let _ = send.reset(codes::REPLY_TIMEOUT.into());
        }
    }
    drop(reply_permit);
}
