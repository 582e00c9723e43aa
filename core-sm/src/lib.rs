//! quicproquo's sans-io core: the protocol state machines and nothing else.
//!
//! - [`node::NodeService`]: the server's Authentication Service (KeyPackages,
//!   hybrid keys) and Delivery Service (queues, long-poll), driven by the
//!   shell through `handle_*` inputs and `poll_*` outputs.
//! - [`store`]: the storage port the machine writes through, and the
//!   in-memory store that models crashes.
//!
//! The core performs no I/O, never reads a clock (time is a [`time::Time`]
//! argument) and draws randomness only from a generator seeded by its caller.
//! `tests/sans_io.rs` enforces this.

pub mod client;
pub mod error;
pub mod limits;
pub mod node;
pub mod protocol;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod types;

pub use error::{ErrorKind, ServiceError};
pub use time::Time;
