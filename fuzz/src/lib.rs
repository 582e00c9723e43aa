//! The bodies of quicproquo's fuzz targets, one module per target, each a
//! plain `run(data: &[u8])` that panics exactly when an invariant breaks.
//!
//! The same files are compiled into the workspace's corpus-replay tests
//! (`#[path = ".../fuzz/src/<target>.rs"]`), so a normal `cargo test`
//! replays every file of `corpus/<target>/` through the very code the
//! fuzzer runs. Modules therefore name other crates only by their package
//! names and never refer to `crate::` or to each other, except through
//! [`corpus`] and [`hostile`], which tests include alongside.

pub mod client_payloads;
pub mod corpus;
pub mod hostile;
pub mod node_sequence;
pub mod reply_decoder;
pub mod request_decoder;
pub mod state_file;
