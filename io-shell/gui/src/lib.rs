//! `qpq-gui`, the quicproquo desktop chat app, as a library: the view
//! model ([`model`]), the bridge to the long-lived client session
//! ([`bridge`]) and the window that draws the one and feeds the other
//! ([`app`]). The binary (`src/main.rs`) opens the window; the tests drive
//! the same app through its accessibility tree.

pub mod app;
pub mod bridge;
pub mod fonts;
pub mod model;
pub mod rows;
pub mod stats;

/// The app's identifier (the window's app id, where its files live).
pub const APP_ID: &str = "chat.quicproquo.gui";
