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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// What the periodic log summary reports, counted always
    /// ([`Summary`]).
    pub summary: Arc<Summary>,
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
    fsync_duration: Histogram,
    sync_failures: Counter,
    turns_aborted: Counter,
    swept_messages: Counter,
    swept_fences: Counter,
    commands_queued: Gauge,
    connections: Gauge,
    waiters: Gauge,
    held_replies: Gauge,
    pending_requests: Gauge,
    auth_refused: Counter,
    queued_messages: Gauge,
    queued_bytes: Gauge,
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
        // 50 us, 100 us, ... about 3.3 s.
        let fsync_duration = Histogram::new(exponential_buckets(0.000_05, 2.0, 17));
        registry.register(
            "qpq_fsync_duration_seconds",
            "Time each group commit's journal fdatasync took (near 0 on PostgreSQL, where a turn is durable when it commits)",
            fsync_duration.clone(),
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
        let auth_refused = Counter::default();
        registry.register(
            "qpq_auth_refused",
            "Authentications refused (a bad signature, a replayed or missing challenge, an unknown version)",
            auth_refused.clone(),
        );
        let queued_messages = Gauge::default();
        registry.register(
            "qpq_queued_messages",
            "Messages held in all queues, as of the background sweep's last full round",
            queued_messages.clone(),
        );
        let queued_bytes = Gauge::default();
        registry.register(
            "qpq_queued_bytes",
            "Payload bytes held in all queues, as of the background sweep's last full round",
            queued_bytes.clone(),
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
            fsync_duration,
            sync_failures,
            turns_aborted,
            swept_messages,
            swept_fences,
            commands_queued,
            connections,
            waiters,
            held_replies,
            pending_requests,
            auth_refused,
            queued_messages,
            queued_bytes,
            gauges,
        }
    }

    /// An authentication was refused.
    pub fn auth_refused(&self) {
        self.auth_refused.inc();
    }

    /// A sweep round counted what the queues hold.
    pub fn queues_counted(&self, messages: u64, bytes: u64) {
        self.queued_messages
            .set(i64::try_from(messages).unwrap_or(i64::MAX));
        self.queued_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
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

    /// One group commit's sync took `took`.
    pub fn fsync_took(&self, took: Duration) {
        self.fsync_duration.observe(took.as_secs_f64());
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

/// Refused authentications logged one by one in a summary period; the
/// rest are only counted in the period's summary, so a flood of bad
/// logins cannot flood the log.
pub const AUTH_REFUSALS_LOGGED_PER_PERIOD_MAX: u64 = 100;

/// The error kinds a summary counts, in the order it reports them.
const SUMMARY_KINDS: [ErrorKind; 10] = [
    ErrorKind::InvalidArgument,
    ErrorKind::Unauthenticated,
    ErrorKind::PermissionDenied,
    ErrorKind::NotFound,
    ErrorKind::PayloadTooLarge,
    ErrorKind::RateLimited { retry_after_ms: 0 },
    ErrorKind::QueueFull,
    ErrorKind::StaleEpoch { current_epoch: 0 },
    ErrorKind::Unavailable,
    ErrorKind::Internal,
];

/// Counts for the server's periodic log summary (`qpq-server` logs one
/// at `info` every `log_summary_interval_ms`): what happened
/// since the last one, and the queue totals of the last sweep round.
/// Relaxed atomics, always kept (a few increments a request); taken and
/// reset by [`Summary::take`].
#[derive(Debug, Default)]
pub struct Summary {
    opened: AtomicU64,
    closed: AtomicU64,
    handshakes_failed: AtomicU64,
    requests: AtomicU64,
    errors: [AtomicU64; SUMMARY_KINDS.len() + 1],
    auth_refused: AtomicU64,
    messages: AtomicU64,
    fsyncs: AtomicU64,
    queued_messages: AtomicU64,
    queued_bytes: AtomicU64,
    /// Whether a sweep round has counted the queues yet.
    queues_counted: std::sync::atomic::AtomicBool,
}

/// One period of [`Summary`], as [`Summary::take`] returns it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SummaryPeriod {
    /// Connections established in the period.
    pub opened: u64,
    /// Connections that ended in the period.
    pub closed: u64,
    /// Handshakes that failed or timed out.
    pub handshakes_failed: u64,
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an error, by kind (only kinds seen).
    pub errors: Vec<(&'static str, u64)>,
    /// Authentications refused.
    pub auth_refused: u64,
    /// Messages stored (each recipient of a batch counts).
    pub messages: u64,
    /// Group commits (fsyncs).
    pub fsyncs: u64,
    /// Messages and payload bytes queued, as of the last sweep round, if
    /// one has finished.
    pub queued: Option<(u64, u64)>,
}

impl Summary {
    /// A connection was established.
    pub fn connection_opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// An established connection ended.
    pub fn connection_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// A handshake failed or timed out.
    pub fn handshake_failed(&self) {
        self.handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was answered: with `error` if it failed, storing
    /// `messages` messages if it was an enqueue.
    pub fn request(&self, error: Option<ErrorKind>, messages: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.messages.fetch_add(messages, Ordering::Relaxed);
        if let Some(kind) = error {
            let i = SUMMARY_KINDS
                .iter()
                .position(|k| kind_name(*k) == kind_name(kind))
                .unwrap_or(SUMMARY_KINDS.len());
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An authentication was refused; returns whether it should be logged
    /// on its own (the first [`AUTH_REFUSALS_LOGGED_PER_PERIOD_MAX`] of a
    /// period are).
    pub fn auth_refused(&self) -> bool {
        self.auth_refused.fetch_add(1, Ordering::Relaxed) < AUTH_REFUSALS_LOGGED_PER_PERIOD_MAX
    }

    /// A group commit completed.
    pub fn fsync(&self) {
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
    }

    /// A sweep round counted what the queues hold.
    pub fn queues_counted(&self, messages: u64, bytes: u64) {
        self.queued_messages.store(messages, Ordering::Relaxed);
        self.queued_bytes.store(bytes, Ordering::Relaxed);
        self.queues_counted.store(true, Ordering::Relaxed);
    }

    /// Messages and payload bytes queued as of the last sweep round.
    pub fn queued(&self) -> Option<(u64, u64)> {
        self.queues_counted.load(Ordering::Relaxed).then(|| {
            (
                self.queued_messages.load(Ordering::Relaxed),
                self.queued_bytes.load(Ordering::Relaxed),
            )
        })
    }

    /// The counts since the last call, which start again from zero.
    pub fn take(&self) -> SummaryPeriod {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        let errors = SUMMARY_KINDS
            .iter()
            .map(|k| kind_name(*k))
            .chain(["other"])
            .zip(&self.errors)
            .map(|(name, n)| (name, take(n)))
            .filter(|(_, n)| *n > 0)
            .collect();
        SummaryPeriod {
            opened: take(&self.opened),
            closed: take(&self.closed),
            handshakes_failed: take(&self.handshakes_failed),
            requests: take(&self.requests),
            errors,
            auth_refused: take(&self.auth_refused),
            messages: take(&self.messages),
            fsyncs: take(&self.fsyncs),
            queued: self.queued(),
        }
    }
}

impl SummaryPeriod {
    /// Errors as `kind:count` pairs joined by commas (`none` if none).
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".to_owned();
        }
        let pairs: Vec<String> = self
            .errors
            .iter()
            .map(|(kind, n)| format!("{kind}:{n}"))
            .collect();
        pairs.join(",")
    }

    /// Messages stored per group commit, to one decimal.
    pub fn messages_per_fsync(&self) -> String {
        if self.fsyncs == 0 {
            return "-".to_owned();
        }
        format!("{:.1}", self.messages as f64 / self.fsyncs as f64)
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
