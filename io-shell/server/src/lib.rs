//! qpq-server: the production shell around the NodeService machine.
//!
//! Bytes move through here and decisions are made in `quicproquo-core`:
//! [`serve`] accepts QUIC connections and request streams, decodes requests
//! with `quicproquo-proto`, and passes them to the [`service`] task that owns
//! the machine; [`store`] implements the machine's storage port over fjall
//! with group commit. [`config`] resolves file, environment and flags;
//! [`tls`] and [`endpoint`] set up TLS 1.3 and QUIC; [`observe`] holds what
//! the server counts (live gauges, Prometheus counters) and [`metrics`]
//! serves it as Prometheus text. [`backup`] writes and restores a fjall
//! server's whole state (`qpq-server backup` / `restore`), over the running
//! server's admin socket. The module `testing` (cargo feature
//! `testing`) runs the whole shell in the calling process for tests and
//! benches.

#[cfg(unix)]
pub mod backup;
pub mod config;
pub mod endpoint;
pub mod health;
pub mod metrics;
pub mod migrate;
pub mod observe;
pub mod serve;
pub mod service;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
