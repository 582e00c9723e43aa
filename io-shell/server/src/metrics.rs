//! Server metrics: counters and histograms kept by the shell (never by the
//! core, which stays sans-io) and served as Prometheus text over HTTP on
//! `metrics_listen` when it is set.
//!
//! What is counted, and where:
//! - requests and errors by method and error kind, and request latency
//!   (from the request's last byte to its reply being handed to QUIC,
//!   fsync wait included), in `serve.rs`;
//! - fsyncs (group commits) and the store batches each one covered, and the
//!   depth of the service task's command queue, in `service.rs`;
//! - live connections, long-poll waiters, replies held for durability and
//!   requests in the service, read from [`ServiceGauges`] at scrape time.
//!
//! Per-recipient queue depths are not exported: the shell has no cheap
//! count of them without asking the core to parse its own layout.
//!
//! The endpoint answers `GET /metrics` (and `GET /`) with the OpenMetrics
//! text format and anything else with 404. It serves at most
//! [`SCRAPES_IN_FLIGHT_MAX`] connections at once, reads at most
//! [`REQUEST_HEAD_BYTES_MAX`] of a request within [`SCRAPE_TIMEOUT`], and
//! never exposes keys, payloads or identities — only counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use quicproquo_core::error::ErrorKind;
use quicproquo_core::node::Durability;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::service::ServiceGauges;

/// Scrape connections served at once; more wait for a slot.
pub const SCRAPES_IN_FLIGHT_MAX: usize = 16;
/// Largest HTTP request head read from a scraper.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Time a scraper has to send its request and read the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    method: &'static str,
    kind: &'static str,
}

type LatencyFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// The server's metrics. Cheap to share behind an `Arc`; every update is an
/// atomic operation (a read lock on first use of a new label set).
pub struct Metrics {
    registry: Registry,
    requests: Family<MethodLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: LatencyFamily,
    fsyncs: Counter,
    fsync_batches: Histogram,
    sync_failures: Counter,
    commands_queued: Gauge,
    connections: Gauge,
    waiters: Gauge,
    held_replies: Gauge,
    pending_requests: Gauge,
    gauges: ServiceGauges,
}

impl Metrics {
    /// Metrics for a server in `durability` mode that publishes its live
    /// counts to `gauges`.
    pub fn new(durability: Durability, gauges: ServiceGauges) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<MethodLabels, Counter>::default();
        registry.register(
            "qpq_requests",
            "Requests answered, by method (undecodable requests as `undecodable`)",
            requests.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "qpq_request_errors",
            "Requests answered with a typed error, by method and error kind",
            errors.clone(),
        );
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "qpq_request_duration_seconds",
            "Time from a request's last byte to its reply, fsync wait included, by method",
            latency.clone(),
        );
        let fsyncs = Counter::default();
        registry.register(
            "qpq_fsyncs",
            "Group commits (journal fdatasyncs) completed",
            fsyncs.clone(),
        );
        // 1, 2, 4, ... 32768 batches.
        let fsync_batches = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register(
            "qpq_fsync_batches",
            "Store batches (one per state-changing request) covered by each group commit",
            fsync_batches.clone(),
        );
        let sync_failures = Counter::default();
        registry.register(
            "qpq_sync_failures",
            "Failed syncs (the server refuses writes after the first)",
            sync_failures.clone(),
        );
        let commands_queued = Gauge::default();
        registry.register(
            "qpq_service_queue_depth",
            "Commands waiting in the service task's queue",
            commands_queued.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "qpq_connections",
            "Connections the service tracks",
            connections.clone(),
        );
        let waiters = Gauge::default();
        registry.register("qpq_waiters", "fetchWait calls waiting", waiters.clone());
        let held_replies = Gauge::default();
        registry.register(
            "qpq_held_replies",
            "Replies held until their writes are durable",
            held_replies.clone(),
        );
        let pending_requests = Gauge::default();
        registry.register(
            "qpq_pending_requests",
            "Requests in the service whose reply has not gone out",
            pending_requests.clone(),
        );
        let fsync_mode = Gauge::<i64>::default();
        fsync_mode.set(i64::from(durability == Durability::Fsync));
        registry.register(
            "qpq_durability_fsync",
            "1 if replies wait for fsync (durability = fsync), 0 if buffered",
            fsync_mode,
        );
        Metrics {
            registry,
            requests,
            errors,
            latency,
            fsyncs,
            fsync_batches,
            sync_failures,
            commands_queued,
            connections,
            waiters,
            held_replies,
            pending_requests,
            gauges,
        }
    }

    /// One request answered: its method (`undecodable` if it did not
    /// decode), its error kind if it failed, and the time it took.
    pub fn request(&self, method: &'static str, error: Option<ErrorKind>, elapsed: Duration) {
        let labels = MethodLabels { method };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    method,
                    kind: kind_name(kind),
                })
                .inc();
        }
    }

    /// One group commit completed, covering `batches` store batches.
    pub fn fsync(&self, batches: u64) {
        self.fsyncs.inc();
        self.fsync_batches.observe(batches as f64);
    }

    /// A sync failed.
    pub fn sync_failed(&self) {
        self.sync_failures.inc();
    }

    /// Commands waiting in the service task's queue.
    pub fn service_queue_depth(&self, depth: usize) {
        self.commands_queued
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let g = self.gauges.snapshot();
        let set = |gauge: &Gauge, v: usize| gauge.set(i64::try_from(v).unwrap_or(i64::MAX));
        set(&self.connections, g.connections);
        set(&self.waiters, g.waiters);
        set(&self.held_replies, g.held_replies);
        set(&self.pending_requests, g.pending_requests);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out = "# encoding the metrics failed\n# EOF\n".to_owned();
        }
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Binds the metrics endpoint (before the runtime serves anything, so a bad
/// address fails at start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `metrics` on `listener` until the task is dropped or aborted.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(SCRAPES_IN_FLIGHT_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                // Accept errors (e.g. out of file descriptors) are usually
                // transient; don't spin on them.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &metrics)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > REQUEST_HEAD_BYTES_MAX {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let response = match (method, path) {
        (Some(b"GET"), Some(b"/metrics" | b"/")) => {
            let body = metrics.encode();
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn latency_histogram() -> Histogram {
    // 25 us, 50 us, ... about 3.3 s.
    Histogram::new(exponential_buckets(0.000_025, 2.0, 18))
}

fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument => "invalidArgument",
        ErrorKind::Unauthenticated => "unauthenticated",
        ErrorKind::PermissionDenied => "permissionDenied",
        ErrorKind::NotFound => "notFound",
        ErrorKind::PayloadTooLarge => "payloadTooLarge",
        ErrorKind::RateLimited { .. } => "rateLimited",
        ErrorKind::QueueFull => "queueFull",
        ErrorKind::StaleEpoch { .. } => "staleEpoch",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Internal => "internal",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_errors_and_fsyncs_in_the_text_format() {
        let m = Metrics::new(Durability::Fsync, ServiceGauges::default());
        m.request("enqueue", None, Duration::from_micros(300));
        m.request(
            "enqueue",
            Some(ErrorKind::QueueFull),
            Duration::from_micros(40),
        );
        m.fsync(12);
        m.fsync(4);
        let text = m.encode();
        assert!(
            text.contains("qpq_requests_total{method=\"enqueue\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("qpq_request_errors_total{method=\"enqueue\",kind=\"queueFull\"} 1"),
            "{text}"
        );
        assert!(text.contains("qpq_fsyncs_total 2"), "{text}");
        assert!(text.contains("qpq_fsync_batches_sum 16"), "{text}");
        assert!(text.contains("qpq_durability_fsync 1"), "{text}");
        assert!(text.contains("qpq_connections 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn the_endpoint_answers_get_metrics_and_404_otherwise() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::new(Durability::Buffered, ServiceGauges::default()));
        m.fsync(3);
        let server = tokio::spawn(serve_metrics(listener, m));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("qpq_fsyncs_total 1"), "{ok}");
        assert!(ok.contains("qpq_durability_fsync 0"), "{ok}");
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
