//! quicproquo-sim: deterministic network simulations of the real server
//! shell and client library.
//!
//! turmoil runs every host of a simulation on one thread with simulated
//! time: the real `qpq-server` loop (`quicproquo_server::serve`) over an
//! in-memory store that forgets unsynced writes on a crash, and clients
//! built on the real client library (`quicproquo_client`) — among them full
//! MLS clients ([`mls`]): the real client machine carried out by the
//! library's command loop — all speaking QUIC through [`net::SimSocket`]. A [`driver`] applies a scenario's faults
//! (loss, reordering, partitions, crashes of the server and of clients),
//! heals the network, waits until the server holds nothing and runs a final
//! audit; the [`checker`] then judges the recorded [`history`] against the
//! delivery guarantees. Every choice comes from the run's seed, and a
//! failing seed is printed with the command that replays it.
//!
//! The only seams in the shell are the endpoint factory (quinn's abstract
//! socket), the storage port ([`server::SimStore`] over the shell's
//! `SharedMemStore`) and the service's read-only gauges.

pub mod actors;
pub mod checker;
pub mod coverage;
pub mod driver;
pub mod history;
pub mod mls;
pub mod net;
pub mod rng;
pub mod scenarios;
pub mod server;
pub mod sweep;
