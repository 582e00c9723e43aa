//! qpq-server: the production shell around the NodeService machine.

pub mod store;
