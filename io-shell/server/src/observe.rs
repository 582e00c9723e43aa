//! What the server observes about itself, written by the service task and
//! the connection tasks and read by whoever looks: the live gauges
//! ([`ServiceGauges`]) and the Prometheus counters and histograms
//! ([`Metrics`]), bundled as the [`Observer`] that [`crate::serve::serve`]
//! and [`crate::service::spawn`] take. This module imports neither of
//! them, nor the HTTP endpoint in [`crate::metrics`] that serves the text.
//!
//! What is counted, and where:
//! - requests and errors by method and error kind, and request latency
//!   (from the request's last byte to its reply being handed to QUIC,
//!   fsync wait included), in `serve.rs`;
//! - fsyncs (group commits) and the store batches each one covered, and the
//!   depth of the service task's command queue, in `service.rs`;
//! - live connections, long-poll waiters, replies held for durability and
//!   requests in the service, published by the service task to
//!   [`ServiceGauges`] after every turn and read by [`Metrics`] at scrape
//!   time.
//!
//! Per-recipient queue depths are not exported: the shell has no cheap
//! count of them without asking the core to parse its own layout. Nothing
//! here holds keys, payloads or identities — only counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use quicproquo_core::error::ErrorKind;
use quicproquo_core::node::Durability;

/// Where the service and its connections report what they do: the live
/// gauges always, the Prometheus metrics when the server keeps them.
/// `Observer::default()` publishes gauges nobody else holds and keeps no
/// metrics; clone `gauges` before handing the observer over to read them.
#[derive(Debug, Clone, Default)]
pub struct Observer {
    /// The service's live counts, published after every turn of its loop.
    pub gauges: ServiceGauges,
    /// Requests, errors, latencies and fsyncs, counted when given (what
    /// `metrics_listen` serves). Build them with [`Metrics::new`] over a
    /// clone of `gauges` so a scrape reports the live counts too.
    pub metrics: Option<Arc<Metrics>>,
}

/// What the service holds right now, published after every turn of its
/// loop. Simulations and tests read it to check that nothing is left behind
/// once every client has gone; the metrics endpoint reports it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GaugeSnapshot {
    /// Connections the machine tracks.
    pub connections: usize,
    /// Long-poll waiters the machine holds.
    pub waiters: usize,
    /// Replies the machine holds until their writes are durable.
    pub held_replies: usize,
    /// Requests handed to the machine whose reply has not gone out yet.
    pub pending_requests: usize,
}

/// A read-only view of the service's live counts: cheap to clone, written
/// only by the service task (relaxed atomics; a reader sees each count as
/// of some recent turn).
#[derive(Debug, Default, Clone)]
pub struct ServiceGauges(Arc<GaugeCells>);

#[derive(Debug, Default)]
struct GaugeCells {
    connections: AtomicUsize,
    waiters: AtomicUsize,
    held_replies: AtomicUsize,
    pending_requests: AtomicUsize,
}

impl ServiceGauges {
    /// The counts as last published.
    pub fn snapshot(&self) -> GaugeSnapshot {
        let c = &self.0;
        GaugeSnapshot {
            connections: c.connections.load(Ordering::Relaxed),
            waiters: c.waiters.load(Ordering::Relaxed),
            held_replies: c.held_replies.load(Ordering::Relaxed),
            pending_requests: c.pending_requests.load(Ordering::Relaxed),
        }
    }

    /// Publishes the service's counts (the service task does, after every
    /// turn of its loop).
    pub(crate) fn publish(&self, now: GaugeSnapshot) {
        let c = &self.0;
        c.connections.store(now.connections, Ordering::Relaxed);
        c.waiters.store(now.waiters, Ordering::Relaxed);
        c.held_replies.store(now.held_replies, Ordering::Relaxed);
        c.pending_requests
            .store(now.pending_requests, Ordering::Relaxed);
    }
}

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
    turns_aborted: Counter,
    swept_messages: Counter,
    swept_fences: Counter,
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
        let turns_aborted = Counter::default();
        registry.register(
            "qpq_turns_aborted",
            "Turns of the service task the shared database (storage = \"postgres\") rolled back; their requests were answered `unavailable`",
            turns_aborted.clone(),
        );
        let swept_messages = Counter::default();
        registry.register(
            "qpq_swept_messages",
            "Messages older than message_ttl_ms the background sweep dropped",
            swept_messages.clone(),
        );
        let swept_fences = Counter::default();
        registry.register(
            "qpq_swept_fences",
            "Commit fences idle longer than fence_ttl_ms the background sweep deleted",
            swept_fences.clone(),
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
            turns_aborted,
            swept_messages,
            swept_fences,
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

    /// A shared database rolled a turn back.
    pub fn turn_aborted(&self) {
        self.turns_aborted.inc();
    }

    /// One step of the background sweep dropped `messages` expired messages
    /// and deleted `fences` idle commit fences.
    pub fn swept(&self, messages: u64, fences: u64) {
        self.swept_messages.inc_by(messages);
        self.swept_fences.inc_by(fences);
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
}
