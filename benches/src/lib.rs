//! Shared pieces of quicproquo's measurements: the criterion benches in
//! `benches/` and the `qpq-bench` load generator use them.
//!
//! - [`core_rig`]: the NodeService machine over the core's `MemStore`, driven
//!   the way the server shell drives it (feed a request, drain outputs, sync
//!   when asked), with no I/O at all.
//! - [`server`]: how the benches run a server in this process: the
//!   end to end benches' setup for `quicproquo_server::testing`, and the
//!   service task over fjall without QUIC for the store benches.
//! - [`load`]: the load generator's workloads against a running server.
//! - [`echo`]: the bare-QUIC baseline, a trivial echo server and client with
//!   the same request and response sizes.
//! - [`codec`] and [`pb`]: the values the codec benches encode, and the
//!   Protobuf codec (prost, `proto/bench.proto`) they compare Cap'n Proto
//!   with.
//! - [`scrape`]: reads the server's Prometheus metrics endpoint.
//! - [`session`]: the long-lived client (`Session`s in one group) under
//!   load, the `session-*` workloads of the load generator.
//!
//! Nothing here asserts a speed; measurements are printed, never tested.

pub mod codec;
pub mod core_rig;
pub mod echo;
pub mod load;
pub mod pb;
pub mod scrape;
pub mod server;
pub mod session;

/// Payload sizes the benches use, in bytes: a small chat message and a
/// typical MLS application message with padding.
pub const PAYLOAD_SIZES: [usize; 2] = [256, 1024];
